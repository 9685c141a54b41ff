//! Secrets read from files, and kept out of everything printed.
//!
//! A secret is never a flag's value (it would show in `ps` and shell history), only a file's
//! content; its `Debug` form hides it, so no log line, panic or config dump can carry it.

use std::path::Path;

use subtle::ConstantTimeEq;

use crate::config::ConfigError;

/// Shortest cluster secret accepted: a guessable one protects nothing.
pub const MIN_CLUSTER_SECRET_CHARS: usize = 16;

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<hidden>)")
    }
}

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Self {
        Secret(bytes)
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Compares in time that depends on the lengths only, never on where the bytes differ.
    pub fn matches(&self, offered: &[u8]) -> bool {
        bool::from(self.0.as_slice().ct_eq(offered))
    }
}

/// The secrets of `path`: one per non-empty line, surrounding blanks cut. The first is the
/// one this daemon sends; every one is accepted, so that a secret can be replaced by a
/// rolling restart (README, "Running it safely").
pub fn read_lines(path: &Path, what: &str) -> Result<Vec<Secret>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| {
        ConfigError(format!(
            "cannot read the {what} file {}: {error}",
            path.display()
        ))
    })?;
    let secrets: Vec<Secret> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(|line| Secret(line.as_bytes().to_vec()))
        .collect();
    if secrets.is_empty() {
        return Err(ConfigError(format!(
            "the {what} file {} is empty",
            path.display()
        )));
    }
    Ok(secrets)
}

/// The cluster secrets of `path`, each long enough and fit for an HTTP header.
pub fn read_cluster_secrets(path: &Path) -> Result<Vec<Secret>, ConfigError> {
    let secrets = read_lines(path, "cluster secret")?;
    for (line, secret) in secrets.iter().enumerate() {
        let text = secret.expose();
        if text.len() < MIN_CLUSTER_SECRET_CHARS || !text.iter().all(u8::is_ascii_graphic) {
            return Err(ConfigError(format!(
                "secret {} of {} is not at least {MIN_CLUSTER_SECRET_CHARS} printable ASCII \
                 characters without blanks; make one with `openssl rand -hex 32`",
                line + 1,
                path.display()
            )));
        }
    }
    Ok(secrets)
}

/// A warning when users other than the owner can read `path`, which holds a secret.
pub fn readable_by_others(path: &Path) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
        (mode & 0o044 != 0).then(|| {
            format!(
                "{} holds a secret and other users can read it (mode {mode:o}); chmod 600 it",
                path.display()
            )
        })
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str, mode: u32) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), text).expect("write");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(mode))
                .expect("chmod");
        }
        #[cfg(not(unix))]
        let _ = mode;
        file
    }

    #[test]
    fn every_line_is_a_secret_and_the_first_is_sent() {
        let secrets =
            read_lines(file("new\r\n\n  old  \n", 0o600).path(), "password").expect("reads");
        assert_eq!(
            secrets.iter().map(Secret::expose).collect::<Vec<_>>(),
            [b"new".as_slice(), b"old"]
        );
    }

    #[test]
    fn bad_files_are_refused_without_echoing_them() {
        let empty = file("\n \n", 0o600);
        let error = read_lines(empty.path(), "password").expect_err("empty");
        assert!(error.0.contains("empty"), "{error}");
        let short = file("tiny-secret\n", 0o600);
        let error = read_cluster_secrets(short.path()).expect_err("short");
        assert!(
            error.0.contains("16") && !error.0.contains("tiny-secret"),
            "{error}"
        );
        let spaced = file("a secret with blanks inside\n", 0o600);
        assert!(read_cluster_secrets(spaced.path()).is_err());
        let missing = std::path::Path::new("/nonexistent/secret");
        assert!(read_lines(missing, "password").is_err());
        let good = file("0123456789abcdef0123\n", 0o600);
        assert_eq!(read_cluster_secrets(good.path()).expect("good").len(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn files_others_can_read_are_named() {
        assert_eq!(readable_by_others(file("x", 0o600).path()), None);
        assert_eq!(readable_by_others(file("x", 0o400).path()), None);
        let warning = readable_by_others(file("x", 0o644).path()).expect("warned");
        assert!(
            warning.contains("644") && warning.contains("chmod 600"),
            "{warning}"
        );
        assert!(readable_by_others(file("x", 0o640).path()).is_some());
    }

    #[test]
    fn a_secret_never_prints() {
        let secret = Secret::new(b"hunter2-hunter2-hunter2".to_vec());
        assert!(!format!("{secret:?}").contains("hunter2"));
        assert!(secret.matches(b"hunter2-hunter2-hunter2"));
        assert!(!secret.matches(b"hunter2"));
    }
}
