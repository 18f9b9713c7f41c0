//! One blocking request/reply exchange over a std TCP stream, for the cluster's small control
//! calls (a node's JOIN/BEAT, `ferry groups`, tests): no HELLO, an optional LINK proof, bounded
//! reply.

use super::*;
use crate::auth::SigningKey;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Why a call failed.
#[derive(Debug, Error)]
pub enum CallError {
    #[error("{peer}: {e}")]
    Io { peer: SocketAddr, e: io::Error },
    #[error("{peer}: bad reply: {why}")]
    Garbled { peer: SocketAddr, why: String },
    /// The peer answered with an error frame.
    #[error("{peer}: error {} ({:?}): {}", .body.code as u16, .body.code, .body.text)]
    Refused { peer: SocketAddr, body: ErrorBody },
}

impl CallError {
    /// The error code, when the peer answered with an error frame.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            CallError::Refused { body, .. } => Some(body.code),
            _ => None,
        }
    }
}

/// A connection for a series of calls to one peer.
pub struct Caller {
    s: TcpStream,
    peer: SocketAddr,
}

impl Caller {
    /// Connects with `timeout` for the connect and for each read and write after it, and
    /// opens with a LINK proof signed by `link` when given (peers with `[link.accept]` want one).
    pub fn connect(
        peer: SocketAddr,
        timeout: Duration,
        link: Option<&SigningKey>,
    ) -> Result<Caller, CallError> {
        let io = |e| CallError::Io { peer, e };
        let mut s = TcpStream::connect_timeout(&peer, timeout).map_err(io)?;
        s.set_read_timeout(Some(timeout)).map_err(io)?;
        s.set_write_timeout(Some(timeout)).map_err(io)?;
        let _ = s.set_nodelay(true);
        if let Some(k) = link {
            s.write_all(&k.link_frame()).map_err(io)?;
        }
        Ok(Caller { s, peer })
    }

    /// Sends one request and reads its reply body, which must come with command `reply_cmd`
    /// and be at most `max_reply` bytes.
    pub fn call(
        &mut self,
        command: u8,
        body: &[u8],
        reply_cmd: u8,
        max_reply: usize,
    ) -> Result<Vec<u8>, CallError> {
        let peer = self.peer;
        let io = |e| CallError::Io { peer, e };
        self.s
            .write_all(&frame(command, status::OK, body))
            .map_err(io)?;
        let mut hb = [0u8; HEADER_LEN];
        self.s.read_exact(&mut hb).map_err(io)?;
        let h = Header::decode(&hb);
        let garbled = |why: String| CallError::Garbled { peer, why };
        // An error frame may come with another reply command: a server without the role
        // answers error 3 as the storage server it is.
        if h.cmd != reply_cmd && h.status != status::ERROR {
            return Err(garbled(format!(
                "reply command {} to {}, expected {}",
                cmd::name(h.cmd),
                cmd::name(command),
                cmd::name(reply_cmd)
            )));
        }
        let max = match h.status {
            status::OK => max_reply,
            status::ERROR => 2 + ERROR_TEXT_MAX,
            s => return Err(garbled(format!("status byte {s}"))),
        };
        if h.body_len > max as u64 {
            return Err(garbled(format!(
                "reply of {} bytes, over its limit of {max}",
                h.body_len
            )));
        }
        let mut b = vec![0u8; h.body_len as usize];
        self.s.read_exact(&mut b).map_err(io)?;
        if h.status == status::ERROR {
            let body = ErrorBody::decode(&b).map_err(|e| garbled(e.to_string()))?;
            return Err(CallError::Refused { peer, body });
        }
        Ok(b)
    }
}

/// Connects (with a LINK proof when `link` is given), makes one call, closes.
pub fn call_once(
    peer: SocketAddr,
    timeout: Duration,
    link: Option<&SigningKey>,
    command: u8,
    body: &[u8],
    reply_cmd: u8,
    max_reply: usize,
) -> Result<Vec<u8>, CallError> {
    Caller::connect(peer, timeout, link)?.call(command, body, reply_cmd, max_reply)
}
