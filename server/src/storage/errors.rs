//! What an operation's failure looks like to the client: an error code and a text.

use ferry_common::proto::ErrorCode;
use std::io;

/// An operation's failure as the client will see it: an error code and a human text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError {
    pub code: ErrorCode,
    pub text: String,
}

impl OpError {
    pub fn new(code: ErrorCode, text: impl Into<String>) -> Self {
        OpError {
            code,
            text: text.into(),
        }
    }
}

impl std::fmt::Display for OpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.text)
    }
}

pub type OpResult<T> = Result<T, OpError>;

/// Disk errors: a full disk (or quota) is NoSpace, anything else Io; the text says what failed.
pub(super) fn io_err(e: &io::Error, what: &str) -> OpError {
    let code = match e.raw_os_error() {
        Some(libc_enospc)
            if libc_enospc == nix::libc::ENOSPC || libc_enospc == nix::libc::EDQUOT =>
        {
            ErrorCode::NoSpace
        }
        _ => ErrorCode::Io,
    };
    OpError::new(code, format!("{what}: {e}"))
}

pub(super) fn db_err(e: anyhow::Error, what: &str) -> OpError {
    log::error!("metadata {what}: {e:#}");
    OpError::new(ErrorCode::Io, format!("metadata {what} failed"))
}
