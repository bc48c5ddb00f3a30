//! The client's one error type.
//!
//! A caller branches on three things: the server refused (a typed [`CtlError`] whose
//! [`ErrorKind`] is stable), the bus could not be reached or did not answer in time
//! (transient: retry), or something local was wrong (a seed file, a URL, a CA path). The
//! CLI maps them to exit codes 1, 1 and 2.

use crate::membership::api::{CtlError, ErrorKind};

use super::e2e::CryptoError;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The control plane (or the server's admission) refused, with its typed reason.
    #[error("{}: {}", .0.kind.as_str(), .0.message)]
    Refused(CtlError),
    /// Nobody serves the operation's subject right now (no node up, or not yet ready).
    #[error("no node answered {subject}: is the cluster up and ready?")]
    NoResponders { subject: String },
    /// The request or publish was not answered in time.
    #[error("timed out waiting for {what}; the cluster may be failing over, retry")]
    Timeout { what: String },
    /// The connection dropped while a reply to `op` was awaited: whether the server acted
    /// on it is unknown (as with a timeout).
    #[error(
        "timed out waiting for a reply to {op} (the connection dropped); the cluster may be failing over, retry"
    )]
    Dropped { op: &'static str },
    /// Connecting failed (network, TLS, authentication).
    #[error("cannot connect to {servers}: {reason}")]
    Connect { servers: String, reason: String },
    /// Bad local input: a seed file, a server URL, a CA path, an argument.
    #[error("{0}")]
    Local(String),
    /// A reply or message that does not decode as the contract says.
    #[error("unexpected reply: {0}")]
    Protocol(String),
    /// An end-to-end encrypted message or key that cannot be opened.
    #[error("{0}")]
    Crypto(#[from] CryptoError),
    /// The connection is closed for good.
    #[error("connection closed: {0}")]
    Closed(String),
}

impl ClientError {
    /// The server's typed error kind, if the server refused.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            ClientError::Refused(e) => Some(e.kind),
            _ => None,
        }
    }

    /// True when retrying the same call may succeed (transport trouble, `unavailable`).
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::NoResponders { .. }
            | ClientError::Timeout { .. }
            | ClientError::Dropped { .. } => true,
            ClientError::Refused(e) => e.kind == ErrorKind::Unavailable,
            _ => false,
        }
    }

    pub(crate) fn refused(kind: ErrorKind, message: impl Into<String>) -> Self {
        ClientError::Refused(CtlError::new(kind, message))
    }
}

impl From<CtlError> for ClientError {
    fn from(e: CtlError) -> Self {
        ClientError::Refused(e)
    }
}
