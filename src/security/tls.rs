//! TLS settings from PEM files, with rustls over its default provider, `aws-lc-rs`.
//!
//! Chosen over `ring` for what ring's provider lacks: post-quantum key exchange (X25519 with
//! ML-KEM, which aws-lc-rs offers first), without which traffic recorded today could be read
//! by a future quantum computer; rustls deprecates its ring provider for that. The price is
//! a longer build, for the C library aws-lc-rs compiles (docs/architecture.md, Security).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::ConfigError;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certificates = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|error| {
            ConfigError(format!(
                "cannot read certificates from {}: {error}",
                path.display()
            ))
        })?;
    if certificates.is_empty() {
        return Err(ConfigError(format!(
            "{} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certificates)
}

/// What a daemon serving HTTPS presents: `cert` (its certificate, then any intermediates)
/// and `key`.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, ConfigError> {
    let chain = certificates(cert)?;
    // The error of a bad key file names the file only: its text is the key.
    let key = PrivateKeyDer::from_pem_file(key).map_err(|_| {
        ConfigError(format!(
            "cannot read a PEM private key from {}",
            key.display()
        ))
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|error| ConfigError(format!("TLS: {error}")))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|error| {
            ConfigError(format!(
                "the certificate in {} and its key do not go together: {error}",
                cert.display()
            ))
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// What a daemon calling others over HTTPS trusts: the CA certificates of `ca`, and only them.
pub fn client_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>, ConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in certificates(ca)? {
        roots.add(certificate).map_err(|error| {
            ConfigError(format!(
                "{} holds a certificate that cannot be a CA: {error}",
                ca.display()
            ))
        })?;
    }
    Ok(Arc::new(
        client_builder()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// A client that trusts nothing: what plain-HTTP clients carry, never used to connect.
pub fn untrusting_client() -> rustls::ClientConfig {
    match client_builder() {
        Ok(builder) => builder
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
        // The provider supports the safe defaults; this cannot happen.
        Err(_) => rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("the provider has TLS 1.3")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
    }
}

fn client_builder()
-> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>, ConfigError> {
    rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|error| ConfigError(format!("TLS: {error}")))
}

#[cfg(test)]
mod tests {
    /// The reason for the provider: daemons offer the post-quantum hybrid first.
    #[test]
    fn post_quantum_key_exchange_comes_first() {
        let groups = &super::provider().kx_groups;
        assert_eq!(
            groups.first().map(|group| group.name()),
            Some(rustls::NamedGroup::X25519MLKEM768)
        );
    }
}
