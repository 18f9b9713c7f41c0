//! The ferry wire protocol: a fixed 10-byte header followed by a body (seed 004's framing).
//!
//! ```text
//! offset 0  u64 BE  body length (bytes after the header)
//! offset 8  u8      command
//! offset 9  u8      status (requests: 0; replies: 0 = ok, 1 = error with an [`ErrorBody`])
//! ```
//!
//! docs/PROTOCOL.md is the contract; this module and that document must agree, and
//! `tests` below check the header layout and some frames against hex copied from it.
//!
//! Bodies come in two shapes. *Control* bodies are small and decoded whole. *Data* bodies
//! (a small-file upload, a block upload, a download reply) are a fixed-size *meta* part followed
//! by a *payload* that receivers stream to disk or socket instead of buffering, so memory does not
//! grow with file or block size.

mod call;
mod cluster;
mod command;
mod decoder;
mod errors;
mod frames;

pub use call::{CallError, Caller, Framed, call_once, is_timeout, probe};
pub use cluster::*;
pub use command::{Command, ConnCmd, FileCmd, ReplyCmd, TrackerCmd};
pub use decoder::{Decoded, Decoder};
pub use errors::{Class, ERRORS, ErrorCode, ErrorInfo, Retry, Side};
pub use frames::*;

use thiserror::Error;

/// Protocol version carried in HELLO and PROBE. Bumped on any incompatible change.
pub const VERSION: u16 = 1;
/// Length of the fixed frame header.
pub const HEADER_LEN: usize = 10;

/// Widths of the fixed identity fields (seed 004).
pub const APP_ID_LEN: usize = 16;
pub const USER_ID_LEN: usize = 256;
pub const FILE_ID_LEN: usize = 128;
/// Original file names are metadata only, NUL-padded to this width (seed 002's `file_name[256]`).
pub const NAME_LEN: usize = 256;
pub const SHA256_LEN: usize = 32;
pub const UPLOAD_ID_LEN: usize = 16;
/// Longest credential a HELLO may carry.
pub const CREDENTIAL_MAX: usize = 512;
/// Longest text in an error body.
pub const ERROR_TEXT_MAX: usize = 1024;
/// Largest block (and so largest small-file payload and download reply) anyone may send.
pub const BLOCK_MAX: u64 = 64 * 1024 * 1024;
/// Smallest block size a big-file upload may use.
pub const BLOCK_MIN: u32 = 64 * 1024;
/// Most blocks one big file may have; bounds the breakpoint bitmap to 128 KiB.
pub const BLOCKS_MAX: u32 = 1 << 20;
/// Widths of the cluster fields: group name, node host (IP literal or DNS name).
pub const GROUP_LEN: usize = 32;
pub const HOST_LEN: usize = 64;
/// Most nodes of one group in a tracker reply, and most groups in a GROUPS reply.
pub const NODES_MAX: usize = 32;
pub const GROUPS_MAX: usize = 256;

/// Command byte values.
/// The commands' wire numbers, for building and matching frames; everything else about a
/// command is [`Command`]'s.
pub mod cmd {
    use super::{Command, ConnCmd, FileCmd, ReplyCmd, TrackerCmd};

    pub const HELLO: u8 = ConnCmd::Hello as u8;
    pub const PROBE: u8 = ConnCmd::Probe as u8;
    pub const LINK: u8 = ConnCmd::Link as u8;
    pub const TRACKER_JOIN: u8 = TrackerCmd::Join as u8;
    pub const TRACKER_BEAT: u8 = TrackerCmd::Beat as u8;
    pub const TRACKER_SADDRS: u8 = TrackerCmd::Saddrs as u8;
    pub const TRACKER_GROUPS: u8 = TrackerCmd::Groups as u8;
    pub const TRACKER_USERS: u8 = TrackerCmd::Users as u8;
    pub const UPLOAD: u8 = FileCmd::Upload as u8;
    pub const STAT: u8 = FileCmd::Stat as u8;
    pub const DOWNLOAD: u8 = FileCmd::Download as u8;
    pub const DELETE: u8 = FileCmd::Delete as u8;
    pub const UPLOAD_INIT: u8 = FileCmd::UploadInit as u8;
    pub const UPLOAD_QUERY: u8 = FileCmd::UploadQuery as u8;
    pub const UPLOAD_BLOCK: u8 = FileCmd::UploadBlock as u8;
    pub const UPLOAD_OVER: u8 = FileCmd::UploadOver as u8;
    pub const UPLOAD_PROVE: u8 = FileCmd::UploadProve as u8;
    pub const DOWNLOAD_OVER: u8 = FileCmd::DownloadOver as u8;
    pub const USAGE: u8 = FileCmd::Usage as u8;
    pub const REPLY_TRACKER: u8 = ReplyCmd::Tracker as u8;
    pub const REPLY_STORAGE: u8 = ReplyCmd::Storage as u8;
    pub const REPLY_PROXY: u8 = ReplyCmd::Proxy as u8;

    /// Human name for logs and errors ("UNKNOWN" for a number that is no command).
    pub fn name(c: u8) -> &'static str {
        Command::from_u8(c).map_or("UNKNOWN", Command::name)
    }
}

/// Status byte values.
pub mod status {
    pub const OK: u8 = 0;
    pub const ERROR: u8 = 1;
}

/// The fixed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub body_len: u64,
    pub cmd: u8,
    pub status: u8,
}

impl Header {
    pub fn new(cmd: u8, status: u8, body_len: u64) -> Self {
        Header {
            body_len,
            cmd,
            status,
        }
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..8].copy_from_slice(&self.body_len.to_be_bytes());
        b[8] = self.cmd;
        b[9] = self.status;
        b
    }

    pub fn decode(b: &[u8; HEADER_LEN]) -> Self {
        let mut len = [0u8; 8];
        len.copy_from_slice(&b[..8]);
        Header {
            body_len: u64::from_be_bytes(len),
            cmd: b[8],
            status: b[9],
        }
    }
}

/// How a request body is laid out, and how big it may be. The decoder refuses a header that
/// breaks these rules before reading (let alone allocating) the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodySpec {
    /// Bytes of meta (decoded whole); for control bodies this is the largest allowed body.
    pub meta: usize,
    /// Control body of variable length up to `meta`, or exactly `meta`.
    pub exact: bool,
    /// Largest payload after the meta (0 for control frames).
    pub payload_max: u64,
}

/// The body rules of every request command a server or proxy accepts ([`Command::spec`]).
pub fn request_spec(c: u8) -> Option<BodySpec> {
    Command::from_u8(c).and_then(Command::spec)
}

/// Why bytes from the wire could not be decoded. Never panics, never allocates a claimed length.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProtoError {
    #[error("unknown command {0}")]
    UnknownCommand(u8),
    #[error("{cmd} body of {len} bytes is over its limit of {max}")]
    TooLarge {
        cmd: &'static str,
        len: u64,
        max: u64,
    },
    #[error("{cmd} body of {len} bytes, expected {expected}")]
    BadLength {
        cmd: &'static str,
        len: u64,
        expected: u64,
    },
    #[error("field {0} is truncated")]
    Truncated(&'static str),
    #[error("field {0} is not valid UTF-8")]
    NotUtf8(&'static str),
    #[error("field {0} has bytes after its NUL padding")]
    NulInside(&'static str),
    #[error("field {0} is empty")]
    Empty(&'static str),
    #[error("field {field}: {why}")]
    Invalid {
        field: &'static str,
        why: &'static str,
    },
    #[error("bad status byte {0}")]
    BadStatus(u8),
    #[error("unsupported protocol version {0} (this build speaks {VERSION})")]
    Version(u16),
}

impl ProtoError {
    /// The error code a peer is told when its frame fails to decode.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtoError::UnknownCommand(_) => ErrorCode::UnknownCommand,
            ProtoError::TooLarge { .. } => ErrorCode::TooLarge,
            ProtoError::Version(_) => ErrorCode::Version,
            _ => ErrorCode::BadFrame,
        }
    }
}

#[cfg(test)]
mod tests;
