//! Blocking frame exchanges, written once: [`Framed`] is one stream (plain TCP here, TLS or
//! plain in the client's transfer connection) that writes requests and reads replies, checking
//! every length before anything is allocated. On it: [`Caller`] for the cluster's small control
//! calls (a node's JOIN/BEAT, `ferry groups`, the supervisor, tests), and [`probe`] for
//! readiness and health checks (the proxy's, the supervisor's, the tests').

use super::*;
use crate::auth::SigningKey;
use std::io::{self, IoSlice, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Largest error body: the code and at most [`ERROR_TEXT_MAX`] bytes of text.
const ERROR_BODY_MAX: u64 = 2 + ERROR_TEXT_MAX as u64;

/// Why an exchange failed.
#[derive(Debug, Error)]
pub enum CallError {
    #[error("connect {peer}: {e}")]
    Connect { peer: SocketAddr, e: io::Error },
    /// The request could not be written: the peer is gone or not reading.
    #[error("send to {peer}: {e}")]
    Send { peer: SocketAddr, e: io::Error },
    /// No reply within the timeout, or the connection was lost while one was awaited.
    #[error("{peer}: {e}")]
    Recv { peer: SocketAddr, e: io::Error },
    /// The reply broke the protocol; the stream cannot be trusted any more.
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

/// Whether an I/O error is a socket timeout (`SO_RCVTIMEO`/`SO_SNDTIMEO` expired).
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// A blocking stream of frames with one peer. The stream's own timeouts bound every read and
/// write.
pub struct Framed<S> {
    s: S,
    peer: SocketAddr,
}

impl<S: Read + Write> Framed<S> {
    pub fn new(s: S, peer: SocketAddr) -> Framed<S> {
        Framed { s, peer }
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    pub fn get_ref(&self) -> &S {
        &self.s
    }

    /// Writes all parts with `writev`, so a header and its payload leave in one segment stream
    /// instead of a lone small packet first.
    pub fn send(&mut self, parts: &[&[u8]]) -> Result<(), CallError> {
        let peer = self.peer;
        let mut slices: Vec<IoSlice> = parts.iter().map(|p| IoSlice::new(p)).collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            match self.s.write_vectored(rest) {
                Ok(0) => {
                    let e = io::Error::new(io::ErrorKind::WriteZero, "connection closed");
                    return Err(CallError::Send { peer, e });
                }
                Ok(n) => IoSlice::advance_slices(&mut rest, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(CallError::Send { peer, e }),
            }
        }
        self.s.flush().map_err(|e| CallError::Send { peer, e })
    }

    /// Reads exactly `buf.len()` bytes of a reply.
    pub fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), CallError> {
        let peer = self.peer;
        self.s
            .read_exact(buf)
            .map_err(|e| CallError::Recv { peer, e })
    }

    /// A reply that broke the protocol, from this peer.
    pub fn garbled(&self, why: String) -> CallError {
        CallError::Garbled {
            peer: self.peer,
            why,
        }
    }

    /// Reads a reply's header. An OK reply must come with one of the commands in `replies`; an
    /// error frame (from any reply command: a proxy answers for itself, a server without the
    /// asked role as the storage server it is) is read whole and returned as
    /// [`CallError::Refused`].
    pub fn reply_head(&mut self, replies: &[u8]) -> Result<Header, CallError> {
        let mut raw = [0u8; HEADER_LEN];
        self.read_exact(&mut raw)?;
        let h = Header::decode(&raw);
        let is_reply = matches!(Command::from_u8(h.cmd), Some(Command::Reply(_)));
        match h.status {
            status::OK if replies.contains(&h.cmd) => Ok(h),
            status::OK => Err(self.garbled(format!("reply command {}", cmd::name(h.cmd)))),
            status::ERROR if is_reply => {
                if !(2..=ERROR_BODY_MAX).contains(&h.body_len) {
                    return Err(self.garbled(format!("error body of {} bytes", h.body_len)));
                }
                let mut b = vec![0u8; h.body_len as usize];
                self.read_exact(&mut b)?;
                let body = ErrorBody::decode(&b).map_err(|e| self.garbled(e.to_string()))?;
                Err(CallError::Refused {
                    peer: self.peer,
                    body,
                })
            }
            status::ERROR => Err(self.garbled(format!("error from command {}", h.cmd))),
            s => Err(self.garbled(format!("status byte {s}"))),
        }
    }

    /// Reads the body `h` announces, at most `max` bytes.
    pub fn body(&mut self, h: &Header, max: usize) -> Result<Vec<u8>, CallError> {
        if h.body_len > max as u64 {
            return Err(self.garbled(format!("{} body bytes, at most {max} expected", h.body_len)));
        }
        let mut b = vec![0u8; h.body_len as usize];
        self.read_exact(&mut b)?;
        Ok(b)
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
        let head = Header::new(command, status::OK, body.len() as u64).encode();
        self.send(&[&head, body])?;
        let h = self.reply_head(&[reply_cmd])?;
        self.body(&h, max_reply)
    }
}

/// A plain TCP connection for a series of control calls to one peer.
pub type Caller = Framed<TcpStream>;

impl Framed<TcpStream> {
    /// Connects with `timeout` for the connect and for each read and write after it, and
    /// opens with a LINK proof signed by `link` when given (peers with `[link.accept]` want one).
    pub fn connect(
        peer: SocketAddr,
        timeout: Duration,
        link: Option<&SigningKey>,
    ) -> Result<Caller, CallError> {
        let s = TcpStream::connect_timeout(&peer, timeout)
            .map_err(|e| CallError::Connect { peer, e })?;
        let setup = || -> io::Result<()> {
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))?;
            s.set_nodelay(true)
        };
        setup().map_err(|e| CallError::Connect { peer, e })?;
        let mut c = Framed::new(s, peer);
        if let Some(k) = link {
            c.send(&[&k.link_frame()])?;
        }
        Ok(c)
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

/// Asks who answers at `peer` (PROBE, no proof needed): a proxy or a server, and the protocol
/// version it speaks. `timeout` bounds the connect and each read and write.
pub fn probe(peer: SocketAddr, timeout: Duration) -> Result<Identity, CallError> {
    let mut c = Caller::connect(peer, timeout, None)?;
    let body = probe_body();
    let head = Header::new(cmd::PROBE, status::OK, body.len() as u64).encode();
    c.send(&[&head, &body])?;
    // An identity is 3 bytes; a reply claiming more is no ferry identity.
    let h = c.reply_head(&[cmd::REPLY_PROXY, cmd::REPLY_STORAGE])?;
    let b = c.body(&h, 16)?;
    Identity::decode(&b).map_err(|e| c.garbled(format!("identity: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A peer whose replies are `input`; what we send collects in `output`.
    struct Pipe {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Pipe {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            self.input.read(b)
        }
    }

    impl Write for Pipe {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.output.write(b)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn replying(reply: Vec<u8>) -> Framed<Pipe> {
        let pipe = Pipe {
            input: Cursor::new(reply),
            output: Vec::new(),
        };
        Framed::new(pipe, "127.0.0.1:9".parse().unwrap())
    }

    fn call(reply: Vec<u8>) -> Result<Vec<u8>, CallError> {
        replying(reply).call(cmd::TRACKER_GROUPS, b"q", cmd::REPLY_TRACKER, 8)
    }

    #[test]
    fn a_call_sends_one_frame_and_takes_only_its_own_reply() {
        let mut c = replying(frame(cmd::REPLY_TRACKER, status::OK, b"groups"));
        let body = c.call(cmd::TRACKER_GROUPS, b"q", cmd::REPLY_TRACKER, 8);
        assert_eq!(body.unwrap(), b"groups");
        assert_eq!(
            c.get_ref().output,
            frame(cmd::TRACKER_GROUPS, status::OK, b"q")
        );
        // Another reply command, a body over the limit (refused before it is read), a status
        // byte that is neither OK nor error, a reply cut short: each is its own error.
        let garbled = |r: Result<Vec<u8>, CallError>| matches!(r, Err(CallError::Garbled { .. }));
        assert!(garbled(call(frame(cmd::REPLY_STORAGE, status::OK, b"x"))));
        let mut huge = Header::new(cmd::REPLY_TRACKER, status::OK, u64::MAX)
            .encode()
            .to_vec();
        huge.extend_from_slice(b"abc");
        assert!(garbled(call(huge)));
        assert!(garbled(call(frame(cmd::REPLY_TRACKER, 7, b"x"))));
        let mut short = frame(cmd::REPLY_TRACKER, status::OK, b"groups");
        short.truncate(HEADER_LEN + 2);
        assert!(matches!(call(short), Err(CallError::Recv { .. })));
    }

    #[test]
    fn error_frames_are_refusals_with_their_code_from_any_reply_command() {
        let e = ErrorBody::new(ErrorCode::NotFound, "no such group").encode();
        for reply in [cmd::REPLY_TRACKER, cmd::REPLY_STORAGE, cmd::REPLY_PROXY] {
            let r = call(frame(reply, status::ERROR, &e));
            assert_eq!(
                r.as_ref().err().and_then(CallError::code),
                Some(ErrorCode::NotFound)
            );
        }
        // An error body longer than any error may be, or from a request command, is garbage.
        let long = vec![b'x'; ERROR_TEXT_MAX + 3];
        let r = call(frame(cmd::REPLY_TRACKER, status::ERROR, &long));
        assert!(matches!(r, Err(CallError::Garbled { .. })), "{r:?}");
        let r = call(frame(cmd::HELLO, status::ERROR, &e));
        assert!(matches!(r, Err(CallError::Garbled { .. })), "{r:?}");
    }

    #[test]
    fn probe_wants_a_ferry_identity() {
        let answer = |reply: Vec<u8>| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            let t = std::thread::spawn(move || {
                let (mut s, _) = l.accept().unwrap();
                let mut b = [0u8; HEADER_LEN];
                s.read_exact(&mut b).unwrap();
                let mut body = vec![0u8; Header::decode(&b).body_len as usize];
                s.read_exact(&mut body).unwrap();
                assert_eq!(Header::decode(&b).cmd, cmd::PROBE);
                let _ = s.write_all(&reply);
            });
            let r = probe(addr, Duration::from_secs(5));
            t.join().unwrap();
            r
        };
        let id = Identity {
            version: VERSION,
            role: Role::Proxy,
        };
        let got = answer(frame(cmd::REPLY_PROXY, status::OK, &id.encode())).unwrap();
        assert_eq!((got.version, got.role), (VERSION, Role::Proxy));
        assert!(answer(b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec()).is_err());
        assert!(answer(frame(cmd::REPLY_PROXY, status::OK, &[0u8; 64])).is_err());
    }
}
