//! A raw-protocol client for tests: sends frames as given, well-formed or not, and reads each
//! reply through the protocol's one frame reader (`proto::Framed`), so a test sees exactly what
//! the peer answered: a body, an error code and text, silence, or a closed connection. Also
//! the stand-in peer's side: [`read_frame`] reads one whole request.

use ferry_common::proto::{self, CallError, ErrorCode, Framed, Header, cmd, status};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// The largest reply body a test reads (a download of a whole test block).
const REPLY_MAX: usize = 80 << 20;

/// What the peer did next.
#[derive(Debug)]
pub enum Reply {
    /// An OK reply: its command and body.
    Ok(u8, Vec<u8>),
    /// An error frame: its code and text.
    Err(ErrorCode, String),
    /// No reply within the read timeout.
    Waiting,
    /// The connection closed (or was reset) instead.
    Closed,
}

impl Reply {
    /// The body of an OK reply; anything else fails the test.
    pub fn body(self) -> Vec<u8> {
        match self {
            Reply::Ok(_, b) => b,
            other => panic!("expected an OK reply, got {other:?}"),
        }
    }

    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Reply::Err(code, _) => Some(*code),
            _ => None,
        }
    }

    /// The body, or the error's code and text; silence or a close fails the test.
    pub fn result(self) -> Result<Vec<u8>, (ErrorCode, String)> {
        match self {
            Reply::Ok(_, b) => Ok(b),
            Reply::Err(code, text) => Err((code, text)),
            other => panic!("expected a reply, got {other:?}"),
        }
    }
}

/// One raw connection (plain TCP unless made [`Raw::over`] another stream, e.g. TLS).
pub struct Raw<S = TcpStream>(Framed<S>);

impl Raw<TcpStream> {
    /// Connects with 20 s timeouts for every read and write.
    pub fn connect(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_nodelay(true).unwrap();
        Raw(Framed::new(s, addr))
    }

    /// A session of `app`/`user`, opened with a fresh valid token.
    pub fn hello(addr: SocketAddr, app: &str, user: &str) -> Raw {
        let mut c = Raw::connect(addr);
        let r = c.call(cmd::HELLO, &super::auth::hello_body(app, user));
        assert!(matches!(r, Reply::Ok(..)), "HELLO as {app}/{user}: {r:?}");
        c
    }

    /// How long a read waits before [`Reply::Waiting`].
    pub fn set_timeout(&self, wait: Duration) {
        self.0.get_ref().set_read_timeout(Some(wait)).unwrap();
    }

    /// True once the peer has closed the connection (EOF or reset within the read timeout).
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 64];
        matches!(self.0.get_ref().read(&mut b), Ok(0) | Err(_))
    }
}

impl<S: Read + Write> Raw<S> {
    pub fn over(s: S, peer: SocketAddr) -> Raw<S> {
        Raw(Framed::new(s, peer))
    }

    /// The stream itself, to write what no frame builder would.
    pub fn stream(&self) -> &S {
        self.0.get_ref()
    }

    /// Sends bytes as given; false when the peer is gone (it may have closed after refusing an
    /// earlier frame).
    pub fn send_raw(&mut self, bytes: &[u8]) -> bool {
        self.0.send(&[bytes]).is_ok()
    }

    /// Sends one OK-status request frame.
    pub fn send(&mut self, command: u8, body: &[u8]) -> bool {
        self.send_raw(&proto::frame(command, status::OK, body))
    }

    /// Reads the next reply (from any reply command).
    pub fn recv(&mut self) -> Reply {
        let replies = [cmd::REPLY_TRACKER, cmd::REPLY_STORAGE, cmd::REPLY_PROXY];
        let got = self
            .0
            .reply_head(&replies)
            .and_then(|h| Ok(Reply::Ok(h.cmd, self.0.body(&h, REPLY_MAX)?)));
        match got {
            Ok(r) => r,
            Err(CallError::Refused { body, .. }) => Reply::Err(body.code, body.text),
            Err(CallError::Recv { e, .. }) if proto::is_timeout(&e) => Reply::Waiting,
            Err(CallError::Recv { .. } | CallError::Send { .. } | CallError::Connect { .. }) => {
                Reply::Closed
            }
            Err(e @ CallError::Garbled { .. }) => panic!("{e}"),
        }
    }

    /// Sends a request and reads its reply.
    pub fn call(&mut self, command: u8, body: &[u8]) -> Reply {
        self.send(command, body);
        self.recv()
    }

    /// Sends bytes as given (a whole frame, or garbage) and reads the reply.
    pub fn call_raw(&mut self, bytes: &[u8]) -> Reply {
        self.send_raw(bytes);
        self.recv()
    }
}

/// The next reply on a socket a test drives by hand (trickled bytes, its own buffer sizes).
pub fn next_reply(s: &mut TcpStream) -> Reply {
    // The address only names the peer in messages; a socket the peer reset has none, and may
    // still hold the reply that came before the reset.
    let peer = s
        .peer_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    Raw::over(s, peer).recv()
}

/// A stand-in peer's side: reads one whole frame, refusing a body over `max` bytes.
pub fn read_frame(s: &mut impl Read, max: u64) -> io::Result<(Header, Vec<u8>)> {
    let mut raw = [0u8; proto::HEADER_LEN];
    s.read_exact(&mut raw)?;
    let h = Header::decode(&raw);
    if h.body_len > max {
        return Err(io::Error::other(format!("frame of {} bytes", h.body_len)));
    }
    let mut body = vec![0u8; h.body_len as usize];
    s.read_exact(&mut body)?;
    Ok((h, body))
}
