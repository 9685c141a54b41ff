//! One error type for the whole crate, and the single place where it becomes an XML-RPC fault.
//!
//! Every failure a client can see goes through [`Error::fault_code`] and [`Error::fault_string`],
//! so the codes promised in docs/protocol.md live in exactly one match. Fault strings are short
//! and never echo the request back: a hostile body must not be reflected to anyone.

use crate::storage::StorageError;

/// XML-RPC fault code for a body that is not well-formed XML or not a method call.
pub const FAULT_PARSE: i32 = -32700;
/// XML-RPC fault code for a method nobody serves.
pub const FAULT_UNKNOWN_METHOD: i32 = -32601;
/// XML-RPC fault code for wrong parameter counts, types or contents.
pub const FAULT_INVALID_PARAMS: i32 = -32602;
/// XML-RPC fault code for a failure inside the daemon.
pub const FAULT_INTERNAL: i32 = -32603;
/// Fault code when too few replicas answered; chosen to read like the HTTP status it means.
pub const FAULT_UNAVAILABLE: i32 = 503;
/// Fault code for a method the caller may not call (an internal one without the cluster
/// secret); like the HTTP status it means.
pub const FAULT_FORBIDDEN: i32 = 403;

/// Which quorum a request failed to reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuorumKind {
    /// W, for put and delete.
    Write,
    /// R, for get.
    Read,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request body is not an XML-RPC call we can read.
    #[error("parse error: {0}")]
    Parse(String),
    #[error("unknown method: {0}")]
    UnknownMethod(String),
    /// Wrong number, type or content of parameters.
    #[error("invalid params: {0}")]
    InvalidParams(String),
    /// Fewer replicas answered than the quorum needs.
    #[error("{} quorum not met: {needed} of {replicas} replicas needed, {answered} answered{}",
        match .kind { QuorumKind::Write => "write (W)", QuorumKind::Read => "read (R)" },
        .detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Quorum {
        kind: QuorumKind,
        needed: usize,
        answered: usize,
        replicas: usize,
        /// The first replica failure, to tell an operator where to look.
        detail: Option<String>,
    },
    /// The replica asked to coordinate a write took the request and gave no answer: it may
    /// have stored the write, or not. Asking another replica would risk storing it twice, as
    /// two versions a later read could see only one of (see `balancer::coordinator::Write`).
    #[error(
        "the write may or may not have been applied: {addr}, asked to coordinate it, did not answer ({why}); read the key before writing it again"
    )]
    OutcomeUnknown { addr: String, why: String },
    /// Another daemon answered with an error or could not be reached.
    #[error("remote {addr}: {message}")]
    Remote { addr: String, message: String },
    /// The caller's credentials do not open this method.
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error("internal error: {0}")]
    Internal(String),
    /// A fault already rendered where the operation ran (a replica operation answered in a
    /// batch), passed on exactly as it was.
    #[error("{message}")]
    Fault { code: i32, message: String },
}

impl Error {
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::InvalidParams(message.into())
    }

    pub fn fault_code(&self) -> i32 {
        match self {
            Error::Parse(_) => FAULT_PARSE,
            Error::UnknownMethod(_) => FAULT_UNKNOWN_METHOD,
            Error::InvalidParams(_) => FAULT_INVALID_PARAMS,
            Error::Quorum { .. } | Error::OutcomeUnknown { .. } => FAULT_UNAVAILABLE,
            Error::Forbidden(_) => FAULT_FORBIDDEN,
            Error::Remote { .. } | Error::Storage(_) | Error::Internal(_) => FAULT_INTERNAL,
            Error::Fault { code, .. } => *code,
        }
    }

    /// The text sent to the client: the display form, cut to a bounded length so that nothing
    /// large (such as an echoed key) can ride back on a fault.
    pub fn fault_string(&self) -> String {
        const MAX_FAULT_CHARS: usize = 300;
        let text = self.to_string();
        match text.char_indices().nth(MAX_FAULT_CHARS) {
            Some((cut, _)) => format!("{}...", &text[..cut]),
            None => text,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_maps_to_the_spec_fault_code() {
        let cases: Vec<(Error, i32)> = vec![
            (Error::Parse("x".into()), -32700),
            (Error::UnknownMethod("x".into()), -32601),
            (Error::invalid("x"), -32602),
            (
                Error::Quorum {
                    kind: QuorumKind::Write,
                    needed: 2,
                    answered: 1,
                    replicas: 3,
                    detail: None,
                },
                503,
            ),
            (
                Error::OutcomeUnknown {
                    addr: "a".into(),
                    why: "timed out".into(),
                },
                503,
            ),
            (Error::Internal("x".into()), -32603),
            (Error::Forbidden("x".into()), 403),
            (
                Error::Remote {
                    addr: "a".into(),
                    message: "b".into(),
                },
                -32603,
            ),
            (
                Error::Fault {
                    code: -32602,
                    message: "invalid params: too many siblings".into(),
                },
                -32602,
            ),
        ];
        for (error, code) in cases {
            assert_eq!(error.fault_code(), code, "{error}");
        }
    }

    #[test]
    fn a_passed_on_fault_keeps_its_text() {
        let error = Error::Fault {
            code: -32602,
            message: "invalid params: too many siblings".into(),
        };
        assert_eq!(error.fault_string(), "invalid params: too many siblings");
    }

    #[test]
    fn quorum_fault_names_the_quorum_and_the_count() {
        let error = Error::Quorum {
            kind: QuorumKind::Write,
            needed: 2,
            answered: 1,
            replicas: 3,
            detail: None,
        };
        assert_eq!(
            error.fault_string(),
            "write (W) quorum not met: 2 of 3 replicas needed, 1 answered"
        );
        let error = Error::Quorum {
            kind: QuorumKind::Read,
            needed: 2,
            answered: 0,
            replicas: 3,
            detail: Some("127.0.0.1:1: timed out".into()),
        };
        assert!(
            error
                .fault_string()
                .starts_with("read (R) quorum not met: 2 of 3")
        );
        assert!(error.fault_string().contains("timed out"));
    }

    #[test]
    fn fault_strings_are_bounded() {
        let error = Error::UnknownMethod("m".repeat(10_000));
        assert!(error.fault_string().len() < 400);
    }
}
