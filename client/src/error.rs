//! Errors the client library returns. Each carries enough context (file, block, proxy) to be
//! printed as the one-line reason the command line shows.

use ferry_common::proto::{Class, ErrorCode};
use std::io;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Bad input from the user or the config: nothing was sent.
    #[error("{0}")]
    Input(String),
    /// The server (or a proxy) answered with an error that retrying will not fix.
    #[error("{op}: {text} (error {} {})", *code as u16, code.name())]
    Server {
        op: String,
        code: ErrorCode,
        text: String,
        /// The proxy, server or tracker that answered with it.
        peer: Option<String>,
    },
    /// Every attempt on every proxy failed.
    #[error("{op}: gave up after {attempts} attempts on {proxies}; last error: {last}")]
    Unreachable {
        op: String,
        attempts: u32,
        proxies: String,
        last: String,
    },
    /// A local file operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// Data did not verify (whole-file SHA-256, changed source file).
    #[error("{0}")]
    Integrity(String),
    /// The local demo cluster could not be started or run.
    #[error("{0}")]
    Cluster(String),
}

impl ClientError {
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        ClientError::Io {
            context: context.into(),
            source,
        }
    }

    /// The protocol error code, when the failure was an error reply.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// What the failure means to a script (the exit code's class): an error reply's from the
    /// error table, the others by what failed.
    pub fn class(&self) -> Class {
        match self {
            ClientError::Input(_) => Class::Usage,
            ClientError::Server { code, .. } => code.info().class,
            ClientError::Unreachable { .. } => Class::Unreachable,
            ClientError::Integrity(_) => Class::Integrity,
            ClientError::Io { .. } | ClientError::Cluster(_) => Class::Other,
        }
    }

    /// The peer that failed: the one that sent the error reply, or the proxies tried.
    pub fn peer(&self) -> Option<&str> {
        match self {
            ClientError::Server { peer, .. } => peer.as_deref(),
            ClientError::Unreachable { proxies, .. } => Some(proxies),
            _ => None,
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;
