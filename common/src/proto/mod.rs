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
mod decoder;
mod errors;
mod frames;

pub use call::{CallError, Caller, call_once};
pub use cluster::*;
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
pub mod cmd {
    /// Opens every client session: version, identity, credential.
    pub const HELLO: u8 = 1;
    /// Health/identity probe answered by whichever ferry process receives it.
    pub const PROBE: u8 = 2;
    /// Link proof: the first frame on a connection one ferry process opens to another (a
    /// token of the pseudo-app `ferry-link`, see `auth`). No reply when valid; error 6 and
    /// close when not.
    pub const LINK: u8 = 3;
    /// A storage node joins its group at a tracker (seed 004's numbers for 10-13; its id
    /// server's 40 and 101 are not used: storage nodes reserve ids in the metadata database).
    pub const TRACKER_JOIN: u8 = 10;
    /// A storage node's heartbeat.
    pub const TRACKER_BEAT: u8 = 11;
    /// Which group (and nodes) serves an app's user.
    pub const TRACKER_SADDRS: u8 = 12;
    /// The tracker's view of every group and node.
    pub const TRACKER_GROUPS: u8 = 13;
    /// One page of the users the router table assigns to a group.
    pub const TRACKER_USERS: u8 = 14;
    /// Small file in one frame.
    pub const UPLOAD: u8 = 70;
    /// File info: size, SHA-256, name, created, block size.
    pub const STAT: u8 = 71;
    /// Ranged read.
    pub const DOWNLOAD: u8 = 72;
    pub const DELETE: u8 = 73;
    /// Big-file upload, phase I: file info -> upload id.
    pub const UPLOAD_INIT: u8 = 74;
    /// Breakpoint query: which blocks the server already holds.
    pub const UPLOAD_QUERY: u8 = 75;
    /// Big-file upload, phase II: one block.
    pub const UPLOAD_BLOCK: u8 = 76;
    /// Big-file upload, phase III: file over.
    pub const UPLOAD_OVER: u8 = 77;
    /// Proof of possession for an instant (deduplicated) upload.
    pub const UPLOAD_PROVE: u8 = 78;
    /// Big-file download finished (lets the server count and log the session).
    pub const DOWNLOAD_OVER: u8 = 79;
    /// What the session's user stores, and the app's quotas for it.
    pub const USAGE: u8 = 80;
    /// Reply from a tracker (seed 004).
    pub const REPLY_TRACKER: u8 = 100;
    /// Reply from a storage server (seed 004), also to HELLO and PROBE.
    pub const REPLY_STORAGE: u8 = 102;
    /// Reply from a proxy (to PROBE, or an error the proxy itself raises).
    pub const REPLY_PROXY: u8 = 103;

    /// Human name for logs and errors.
    pub fn name(c: u8) -> &'static str {
        match c {
            HELLO => "HELLO",
            PROBE => "PROBE",
            LINK => "LINK",
            TRACKER_JOIN => "TRACKER_JOIN",
            TRACKER_BEAT => "TRACKER_BEAT",
            TRACKER_SADDRS => "TRACKER_SADDRS",
            TRACKER_GROUPS => "TRACKER_GROUPS",
            TRACKER_USERS => "TRACKER_USERS",
            UPLOAD => "UPLOAD",
            STAT => "STAT",
            DOWNLOAD => "DOWNLOAD",
            DELETE => "DELETE",
            UPLOAD_INIT => "UPLOAD_INIT",
            UPLOAD_QUERY => "UPLOAD_QUERY",
            UPLOAD_BLOCK => "UPLOAD_BLOCK",
            UPLOAD_OVER => "UPLOAD_OVER",
            UPLOAD_PROVE => "UPLOAD_PROVE",
            DOWNLOAD_OVER => "DOWNLOAD_OVER",
            USAGE => "USAGE",
            REPLY_TRACKER => "REPLY_TRACKER",
            REPLY_STORAGE => "REPLY_STORAGE",
            REPLY_PROXY => "REPLY_PROXY",
            _ => "UNKNOWN",
        }
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

/// The body rules of every request command a server or proxy accepts.
pub fn request_spec(c: u8) -> Option<BodySpec> {
    let control = |meta, exact| {
        Some(BodySpec {
            meta,
            exact,
            payload_max: 0,
        })
    };
    match c {
        cmd::HELLO => control(HELLO_MAX, false),
        cmd::PROBE => control(2, true),
        cmd::LINK => control(crate::token::TOKEN_MAX, false),
        cmd::UPLOAD => Some(BodySpec {
            meta: UPLOAD_META,
            exact: true,
            payload_max: BLOCK_MAX,
        }),
        cmd::STAT | cmd::DELETE | cmd::DOWNLOAD_OVER => control(FILE_ID_LEN, true),
        cmd::DOWNLOAD => control(FILE_ID_LEN + 16, true),
        cmd::UPLOAD_INIT => control(UPLOAD_INIT_LEN, true),
        cmd::UPLOAD_QUERY | cmd::UPLOAD_OVER => control(UPLOAD_ID_LEN, true),
        cmd::UPLOAD_BLOCK => Some(BodySpec {
            meta: BLOCK_META,
            exact: true,
            payload_max: BLOCK_MAX,
        }),
        cmd::UPLOAD_PROVE => control(UPLOAD_ID_LEN + SHA256_LEN, true),
        cmd::USAGE => control(0, true),
        // JOIN_V1_LEN or JOIN_LEN: decode_join takes either, nothing in between.
        cmd::TRACKER_JOIN => control(JOIN_LEN, false),
        cmd::TRACKER_BEAT => control(BEAT_LEN, true),
        cmd::TRACKER_SADDRS => control(SADDRS_LEN, true),
        cmd::TRACKER_GROUPS => control(0, true),
        cmd::TRACKER_USERS => control(USERS_LEN, true),
        _ => None,
    }
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
