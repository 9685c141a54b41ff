//! Who is calling, and whether they may: pure decisions over two request headers.
//!
//! A caller is one of three principals. A client proved the password (HTTP Basic); a member
//! proved the cluster secret, which only daemons (and the operator's `dynamite` command)
//! hold. Each method needs one of three levels: open (`/health`), client (the key-value
//! methods, `stats`, `/metrics`) or internal (replica batches, anti-entropy, layout
//! exchange, `cluster.*`, the `local.*` inspection methods). A member may do what a client
//! may.
//!
//! Without a cluster secret, internal methods need what client methods need: with a password
//! set, a client's password opens them too (the start-up warning says so), and daemons send
//! the password on their own calls. Without either, everything is open, as before this
//! existed.

use base64::Engine as _;

use super::secret::Secret;

/// The header that carries the cluster secret on internal calls.
pub const SECRET_HEADER: &str = "dynamite-cluster-secret";

/// The realm a 401 names, so that clients know which credentials to send.
pub const REALM_CHALLENGE: &str = "Basic realm=\"dynamite\"";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Principal {
    Anonymous,
    Client,
    Member,
}

/// What a method or path needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Open,
    Client,
    Internal,
}

/// Why a request is turned away before anything in it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No credentials where a password is needed: HTTP 401.
    NoPassword,
    /// A user or password that is not the configured one: HTTP 401.
    WrongPassword,
    /// A cluster secret that is not this daemon's: HTTP 403.
    WrongSecret,
}

impl Refusal {
    pub fn status(self) -> u16 {
        match self {
            Refusal::NoPassword | Refusal::WrongPassword => 401,
            Refusal::WrongSecret => 403,
        }
    }

    /// The label of the `dynamite_auth_failures_total` series this refusal counts in.
    pub fn kind(self) -> &'static str {
        match self {
            Refusal::NoPassword => "no_password",
            Refusal::WrongPassword => "wrong_password",
            Refusal::WrongSecret => "wrong_secret",
        }
    }

    /// The answer's text: what is wrong, never what was expected.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::NoPassword => {
                "401 Unauthorized: this server needs a user and password (HTTP Basic)\n"
            }
            Refusal::WrongPassword => "401 Unauthorized: wrong user or password\n",
            Refusal::WrongSecret => "403 Forbidden: wrong cluster secret\n",
        }
    }
}

/// The credentials a daemon accepts.
#[derive(Clone, Default)]
pub struct Credentials {
    /// `--auth-user` and every password of `--auth-password-file`.
    pub client: Option<(String, Vec<Secret>)>,
    /// Every secret of `--cluster-secret-file` (more than one while one is being rotated).
    pub secrets: Vec<Secret>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.client.as_ref().map(|(user, _)| user))
            .field(
                "passwords",
                &self.client.as_ref().map_or(0, |(_, pw)| pw.len()),
            )
            .field("secrets", &self.secrets.len())
            .finish()
    }
}

impl Credentials {
    /// Whether client calls need a password.
    pub fn needs_password(&self) -> bool {
        self.client.is_some()
    }

    /// Who sent a request with these `Authorization` and secret header values.
    ///
    /// A secret header is checked when this daemon has secrets, and ignored otherwise (so
    /// that daemons given a secret can still call one not given it yet); a wrong one is
    /// refused even when a right password comes with it. Likewise a password is checked only
    /// when one is set.
    pub fn identify(
        &self,
        authorization: Option<&[u8]>,
        secret: Option<&[u8]>,
    ) -> Result<Principal, Refusal> {
        if let Some(offered) = secret
            && !self.secrets.is_empty()
        {
            return if matches_any(&self.secrets, offered) {
                Ok(Principal::Member)
            } else {
                Err(Refusal::WrongSecret)
            };
        }
        let (Some((user, passwords)), Some(authorization)) = (&self.client, authorization) else {
            return Ok(Principal::Anonymous);
        };
        let Some((offered_user, offered_password)) = basic_credentials(authorization) else {
            return Err(Refusal::WrongPassword);
        };
        // Both compared whatever the first gives, so the time taken tells nothing.
        let user_matches = Secret::new(user.as_bytes().to_vec()).matches(&offered_user);
        let password_matches = matches_any(passwords, &offered_password);
        if user_matches & password_matches {
            Ok(Principal::Client)
        } else {
            Err(Refusal::WrongPassword)
        }
    }

    /// Whether `principal` may call something that needs `access`.
    pub fn permits(&self, principal: Principal, access: Access) -> bool {
        match access {
            Access::Open => true,
            Access::Internal if !self.secrets.is_empty() => principal == Principal::Member,
            Access::Client | Access::Internal => {
                !self.needs_password() || principal != Principal::Anonymous
            }
        }
    }
}

/// Checks every candidate, not stopping at the first match, in constant time per candidate.
fn matches_any(candidates: &[Secret], offered: &[u8]) -> bool {
    candidates
        .iter()
        .fold(false, |found, candidate| found | candidate.matches(offered))
}

/// The user and password of an `Authorization: Basic …` value.
pub fn basic_credentials(value: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let (scheme, encoded) = text.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let colon = decoded.iter().position(|&byte| byte == b':')?;
    Some((decoded[..colon].to_vec(), decoded[colon + 1..].to_vec()))
}

/// The `Authorization` value for `user` and `password`.
pub fn basic_value(user: &str, password: &[u8]) -> String {
    let mut plain = user.as_bytes().to_vec();
    plain.push(b':');
    plain.extend_from_slice(password);
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(plain)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(text: &str) -> Secret {
        Secret::new(text.as_bytes().to_vec())
    }

    fn credentials(password: bool, secrets: &[&str]) -> Credentials {
        Credentials {
            client: password.then(|| ("ann".to_owned(), vec![secret("pw1"), secret("pw2")])),
            secrets: secrets.iter().map(|s| secret(s)).collect(),
        }
    }

    #[test]
    fn callers_are_identified_by_what_they_send() {
        let good = basic_value("ann", b"pw1");
        let second = basic_value("ann", b"pw2");
        let wrong_user = basic_value("bob", b"pw1");
        let wrong_password = basic_value("ann", b"pw3");
        type Case<'a> = (
            &'a str,
            Credentials,
            Option<&'a str>,
            Option<&'a str>,
            Result<Principal, Refusal>,
        );
        let cases: Vec<Case> = vec![
            (
                "open daemon",
                credentials(false, &[]),
                None,
                None,
                Ok(Principal::Anonymous),
            ),
            (
                "open daemon ignores a password",
                credentials(false, &[]),
                Some(&good),
                None,
                Ok(Principal::Anonymous),
            ),
            (
                "open daemon ignores a secret",
                credentials(false, &[]),
                None,
                Some("s3cret-s3cret-s3"),
                Ok(Principal::Anonymous),
            ),
            (
                "no password sent",
                credentials(true, &[]),
                None,
                None,
                Ok(Principal::Anonymous),
            ),
            (
                "right password",
                credentials(true, &[]),
                Some(&good),
                None,
                Ok(Principal::Client),
            ),
            (
                "second password",
                credentials(true, &[]),
                Some(&second),
                None,
                Ok(Principal::Client),
            ),
            (
                "wrong user",
                credentials(true, &[]),
                Some(&wrong_user),
                None,
                Err(Refusal::WrongPassword),
            ),
            (
                "wrong password",
                credentials(true, &[]),
                Some(&wrong_password),
                None,
                Err(Refusal::WrongPassword),
            ),
            (
                "not basic",
                credentials(true, &[]),
                Some("Bearer abc"),
                None,
                Err(Refusal::WrongPassword),
            ),
            (
                "not base64",
                credentials(true, &[]),
                Some("Basic !!!"),
                None,
                Err(Refusal::WrongPassword),
            ),
            (
                "right secret",
                credentials(true, &["old-secret", "new-secret"]),
                None,
                Some("new-secret"),
                Ok(Principal::Member),
            ),
            (
                "wrong secret, right password",
                credentials(true, &["old-secret"]),
                Some(&good),
                Some("other"),
                Err(Refusal::WrongSecret),
            ),
            (
                "a prefix of the secret",
                credentials(false, &["old-secret"]),
                None,
                Some("old-secre"),
                Err(Refusal::WrongSecret),
            ),
        ];
        for (name, credentials, authorization, secret, expected) in cases {
            let got =
                credentials.identify(authorization.map(str::as_bytes), secret.map(str::as_bytes));
            assert_eq!(got, expected, "{name}");
        }
    }

    #[test]
    fn who_may_call_what() {
        use Principal::{Anonymous, Member};
        const CLIENT: Principal = Principal::Client;
        const OPEN: Access = Access::Open;
        const INTERNAL: Access = Access::Internal;
        const CLIENT_ACCESS: Access = Access::Client;
        // (password set, secret set, principal, access, permitted)
        let cases = [
            (false, false, Anonymous, CLIENT_ACCESS, true),
            (false, false, Anonymous, INTERNAL, true),
            (true, false, Anonymous, OPEN, true),
            (true, false, Anonymous, CLIENT_ACCESS, false),
            (true, false, CLIENT, CLIENT_ACCESS, true),
            // Without a secret, the password guards internal calls too.
            (true, false, CLIENT, INTERNAL, true),
            (true, false, Anonymous, INTERNAL, false),
            (false, true, Anonymous, CLIENT_ACCESS, true),
            (false, true, Anonymous, INTERNAL, false),
            (true, true, CLIENT, INTERNAL, false),
            (true, true, Member, INTERNAL, true),
            (true, true, Member, CLIENT_ACCESS, true),
            (false, true, Member, OPEN, true),
        ];
        for (password, secret, principal, access, permitted) in cases {
            let credentials = credentials(password, if secret { &["s"] } else { &[] });
            assert_eq!(
                credentials.permits(principal, access),
                permitted,
                "password {password}, secret {secret}, {principal:?} calling {access:?}"
            );
        }
    }

    #[test]
    fn basic_values_round_trip_with_colons_in_the_password() {
        let value = basic_value("ann", b"a:b:c");
        assert_eq!(
            basic_credentials(value.as_bytes()),
            Some((b"ann".to_vec(), b"a:b:c".to_vec()))
        );
        assert_eq!(
            basic_credentials(b"basic YW5uOng="),
            Some((b"ann".to_vec(), b"x".to_vec()))
        );
        assert_eq!(basic_credentials(b"Basic YW5u"), None, "no colon");
    }

    #[test]
    fn debug_output_names_no_secret() {
        let text = format!("{:?}", credentials(true, &["the-secret-value"]));
        assert!(
            !text.contains("pw1") && !text.contains("the-secret-value"),
            "{text}"
        );
    }
}
