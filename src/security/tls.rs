//! TLS settings from PEM files, with rustls over the `ring` provider.
//!
//! `ring` rather than rustls's default `aws-lc-rs`: aws-lc-rs compiles a large C library,
//! minutes on the 2-core machines CI runs on, where ring builds in seconds; both are
//! maintained and fast on x86-64 and ARM. What ring lacks is post-quantum key exchange
//! (rustls marks its provider deprecated for that): traffic recorded today could be read by
//! a future quantum computer. For a cluster's own network that is a fair trade; a
//! deployment that disagrees can put its daemons behind a TLS proxy that has it.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::ConfigError;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    // Deprecated for the reason the module's comment gives.
    #[allow(deprecated)]
    Arc::new(rustls::crypto::ring::default_provider())
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
        // The ring provider supports the safe defaults; this cannot happen.
        Err(_) => rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3 with ring")
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
