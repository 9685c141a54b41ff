//! Who may call a daemon, and what its own calls carry: client passwords (HTTP Basic), the
//! cluster secret of internal calls, and TLS on both sides.
//!
//! The threat model (README, "Running it safely"): anyone may reach a daemon's port. Clients
//! prove a password; daemons prove the cluster secret, without which a client could bypass
//! quorums by posting replica batches, or change the layout. TLS keeps both, and the data,
//! from whoever sees the traffic; without it they cross the network in the clear, as HTTP
//! Basic passwords do.

pub mod access;
pub mod secret;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use hyper::header::{AUTHORIZATION, HeaderName, HeaderValue};

use crate::config::ConfigError;
pub use access::{Access, Credentials, Principal, Refusal};
#[cfg(test)]
use secret::Secret;

/// The security flags of a daemon (or of the `dynamite` command), as files.
#[derive(Debug, Clone, Default)]
pub struct SecurityFiles {
    pub auth_user: Option<String>,
    pub auth_password_file: Option<PathBuf>,
    pub cluster_secret_file: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
}

/// A daemon's security settings: what it accepts, how it serves, what it sends.
#[derive(Clone, Default)]
pub struct Security {
    pub credentials: Arc<Credentials>,
    pub acceptor: Option<tokio_rustls::TlsAcceptor>,
    pub outgoing: Outgoing,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("credentials", &self.credentials)
            .field("tls", &self.acceptor.is_some())
            .field("outgoing", &self.outgoing)
            .finish()
    }
}

/// What a daemon's calls to other daemons carry: its credentials (the cluster secret, the
/// client password, or both) and the CAs it trusts, when it calls over HTTPS; and what
/// carries them: TCP, or the network of a simulation that gave it a dialer.
#[derive(Clone, Default)]
pub struct Outgoing {
    pub credentials: Vec<(HeaderName, HeaderValue)>,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Opens the connections to other daemons in place of TCP (`None`: TCP). No flag sets
    /// it; a simulation does (see [`crate::rpc::transport`]).
    pub dialer: Option<Arc<dyn crate::rpc::transport::Dialer>>,
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outgoing")
            .field(
                "credentials",
                &self
                    .credentials
                    .iter()
                    .map(|(name, _)| name)
                    .collect::<Vec<_>>(),
            )
            .field("tls", &self.tls.is_some())
            .field("dialer", &self.dialer.is_some())
            .finish()
    }
}

impl Outgoing {
    /// The URL scheme of calls to other daemons.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }
}

impl Security {
    /// Reads the files. Answers the settings and the warnings to print at start (files with
    /// secrets that others can read).
    pub fn from_files(files: &SecurityFiles) -> Result<(Security, Vec<String>), ConfigError> {
        let mut warnings = Vec::new();
        let mut note = |path: &PathBuf| warnings.extend(secret::readable_by_others(path));
        let client = match (&files.auth_user, &files.auth_password_file) {
            (Some(user), Some(path)) => {
                if user.is_empty() || user.contains(':') {
                    return Err(ConfigError(
                        "--auth-user must be a non-empty name without ':' (HTTP Basic)".into(),
                    ));
                }
                note(path);
                Some((user.clone(), secret::read_lines(path, "password")?))
            }
            (None, None) => None,
            _ => {
                return Err(ConfigError(
                    "--auth-user and --auth-password-file go together".into(),
                ));
            }
        };
        let secrets = match &files.cluster_secret_file {
            Some(path) => {
                note(path);
                secret::read_cluster_secrets(path)?
            }
            None => Vec::new(),
        };
        let acceptor = match (&files.tls_cert, &files.tls_key) {
            (Some(cert), Some(key)) => {
                note(key);
                Some(tokio_rustls::TlsAcceptor::from(tls::server_config(
                    cert, key,
                )?))
            }
            (None, None) => None,
            _ => {
                return Err(ConfigError("--tls-cert and --tls-key go together".into()));
            }
        };
        let tls = match &files.tls_ca {
            Some(ca) => Some(tls::client_config(ca)?),
            None => None,
        };
        let credentials = Credentials { client, secrets };
        let outgoing = Outgoing {
            credentials: outgoing_credentials(&credentials)?,
            tls,
            dialer: None,
        };
        Ok((
            Security {
                credentials: Arc::new(credentials),
                acceptor,
                outgoing,
            },
            warnings,
        ))
    }
}

/// The headers a daemon's own calls carry: the first cluster secret, and the user and first
/// password. Both, so that while a secret is being turned on (balancers first, README
/// "Running it safely"), a node not given it yet takes the password its internal methods
/// then need, and ignores the secret.
fn outgoing_credentials(
    credentials: &Credentials,
) -> Result<Vec<(HeaderName, HeaderValue)>, ConfigError> {
    let mut headers = Vec::new();
    if let Some(secret) = credentials.secrets.first() {
        headers.push((
            HeaderName::from_static(access::SECRET_HEADER),
            secret.expose().to_vec(),
        ));
    }
    if let Some((user, passwords)) = &credentials.client
        && let Some(password) = passwords.first()
    {
        headers.push((
            AUTHORIZATION,
            access::basic_value(user, password.expose()).into_bytes(),
        ));
    }
    headers
        .into_iter()
        .map(|(name, value)| {
            let mut value = HeaderValue::from_bytes(&value).map_err(|_| {
                ConfigError("the credentials cannot be sent in an HTTP header".into())
            })?;
            // Kept out of hyper's debug output and header compression.
            value.set_sensitive(true);
            Ok((name, value))
        })
        .collect()
}

/// The one line a daemon prints at start when whoever reaches its port can write to it, or
/// `None` when that is only the local machine or credentials are needed.
pub fn exposure_warning(
    daemon: &str,
    listen: SocketAddr,
    credentials: &Credentials,
) -> Option<String> {
    if listen.ip().is_loopback() || !credentials.secrets.is_empty() {
        return None;
    }
    Some(if credentials.needs_password() {
        format!(
            "{daemon} listens on {listen} without --cluster-secret-file: anyone with the client \
             password can also call its internal methods (replica writes, cluster.*); give \
             every daemon the same --cluster-secret-file to close them"
        )
    } else {
        format!(
            "{daemon} listens on {listen} with no credentials: anyone who reaches it can read, \
             write and delete every key and change the cluster; give every daemon \
             --cluster-secret-file (and --auth-user/--auth-password-file for clients), or \
             --bind 127.0.0.1"
        )
    })
}

/// The secret-free parts a test needs to read a secret it wrote.
#[cfg(test)]
pub(crate) fn secret_of(bytes: &[u8]) -> Secret {
    Secret::new(bytes.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_reachable_daemons_without_a_secret_warn() {
        let open = Credentials::default();
        let password = Credentials {
            client: Some(("ann".into(), vec![secret_of(b"pw")])),
            secrets: vec![],
        };
        let secret = Credentials {
            client: None,
            secrets: vec![secret_of(b"0123456789abcdef")],
        };
        let any: SocketAddr = "0.0.0.0:20050".parse().expect("address");
        let local: SocketAddr = "127.0.0.1:20050".parse().expect("address");
        let v6: SocketAddr = "[::1]:20050".parse().expect("address");
        assert_eq!(exposure_warning("storage_node", local, &open), None);
        assert_eq!(exposure_warning("storage_node", v6, &open), None);
        assert_eq!(exposure_warning("storage_node", any, &secret), None);
        let warning = exposure_warning("storage_node", any, &open).expect("warned");
        assert!(warning.contains("anyone") && warning.contains("--cluster-secret-file"));
        assert!(!warning.contains('\n'), "one line");
        let warning = exposure_warning("load_balancer", any, &password).expect("warned");
        assert!(warning.contains("--cluster-secret-file"), "{warning}");
    }

    #[test]
    fn daemons_send_the_secret_and_the_password() {
        let both = Credentials {
            client: Some(("ann".into(), vec![secret_of(b"pw")])),
            secrets: vec![
                secret_of(b"0123456789abcdef"),
                secret_of(b"fedcba9876543210"),
            ],
        };
        let headers = outgoing_credentials(&both).expect("valid");
        let names: Vec<&str> = headers.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, [access::SECRET_HEADER, "authorization"]);
        assert_eq!(headers[0].1.as_bytes(), b"0123456789abcdef");
        assert_eq!(
            headers[1].1.as_bytes(),
            access::basic_value("ann", b"pw").as_bytes()
        );
        assert!(headers.iter().all(|(_, value)| value.is_sensitive()));
        assert!(
            outgoing_credentials(&Credentials::default())
                .expect("valid")
                .is_empty()
        );
    }

    #[test]
    fn flags_that_go_together_are_checked() {
        let only_user = SecurityFiles {
            auth_user: Some("ann".into()),
            ..SecurityFiles::default()
        };
        assert!(Security::from_files(&only_user).is_err());
        let only_cert = SecurityFiles {
            tls_cert: Some("/nonexistent".into()),
            ..SecurityFiles::default()
        };
        assert!(Security::from_files(&only_cert).is_err());
        let (security, warnings) = Security::from_files(&SecurityFiles::default()).expect("open");
        assert!(warnings.is_empty() && security.acceptor.is_none());
        assert_eq!(security.outgoing.scheme(), "http");
    }
}
