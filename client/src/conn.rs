//! One blocking session with a proxy or server: connect, HELLO, then request/reply frames.
//!
//! Every read and write has the configured timeout, so a peer that accepts but never answers (a
//! SIGSTOPped proxy) surfaces as [`Fault::Timeout`] instead of a hang. Reply lengths are checked
//! against what the request can legitimately get back before anything is allocated or read.

use crate::settings::Endpoint;
use ferry_common::proto::{
    self, CallError, DOWNLOAD_REPLY_META, ErrorBody, Framed, Header, Identity, Retry, cmd,
    is_timeout, status,
};
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why one attempt failed. The retry policy in [`crate::link`] decides what each means.
#[derive(Debug)]
pub enum Fault {
    /// No session could be opened (connect refused/timed out, HELLO unanswered or refused).
    Connect(String),
    /// The proxy took the session but could reach no upstream (error 19): it is alive and the
    /// servers behind it are down or restarting.
    NoUpstream(String),
    /// The cluster behind the proxy has no answer now: a routing proxy found no online node in
    /// the user's group (error 23; the text names the group) or its database is down (24).
    /// Waited out like [`Fault::NoUpstream`] (the error table's `Retry::Outage`).
    Outage(ErrorBody),
    /// The request could not be written: the peer is gone or not reading.
    Send(String),
    /// No reply within the timeout.
    Timeout(String),
    /// The connection closed or reset while we waited for the reply.
    Dropped(String),
    /// The reply broke the protocol; the stream cannot be trusted any more.
    Garbled(String),
    /// A reply arrived whole and well-formed, but its bytes do not match their checksum. Tried
    /// again like [`Fault::Garbled`] (the path may have damaged them); when the tries run out on
    /// it, the request fails as an integrity failure, not as "unreachable".
    Corrupt(String),
    /// An error frame. The session stays usable unless the code is a framing error (1-5).
    Server(ErrorBody),
    /// TLS with a `tls://` proxy failed for a reason that retrying will not mend: its
    /// certificate (wrong host, unknown CA, no pinned key), or no TLS at all (a plain
    /// listener). The next proxy of the list may do better; no outage to wait out.
    Tls(String),
}

impl Fault {
    /// A proxy answered that it could reach no upstream (error 19) or, routing, no node of
    /// the user's group (error 23).
    /// No proxy (or no server behind it) gets the request through right now: unreachable,
    /// hung, restarting, or a group without an online node. The client's outage window rides
    /// it out; a server's own error answer or a broken reply is no outage.
    pub fn is_outage(&self) -> bool {
        match self {
            Fault::Garbled(_) | Fault::Corrupt(_) | Fault::Tls(_) => false,
            Fault::Server(e) => matches!(e.code.info().retry, Retry::NextProxy | Retry::Outage),
            _ => true,
        }
    }

    pub fn is_upstream_down(&self) -> bool {
        match self {
            Fault::NoUpstream(_) | Fault::Outage(_) => true,
            Fault::Server(e) => matches!(e.code.info().retry, Retry::NextProxy | Retry::Outage),
            _ => false,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Fault::Connect(s)
            | Fault::NoUpstream(s)
            | Fault::Send(s)
            | Fault::Timeout(s)
            | Fault::Dropped(s)
            | Fault::Garbled(s)
            | Fault::Corrupt(s)
            | Fault::Tls(s) => s.clone(),
            Fault::Server(e) | Fault::Outage(e) => {
                format!("error {} {}: {}", e.code as u16, e.code.name(), e.text)
            }
        }
    }
}

/// The connection: plain TCP, or TLS over it (blocking, with the socket's timeouts).
enum Stream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Stream {
    fn sock(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => &t.sock,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(t) => t.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write_vectored(bufs),
            Stream::Tls(t) => t.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(t) => t.flush(),
        }
    }
}

/// TLS with `ep` over `sock`, handshake done: the certificate is checked here, before any
/// byte of ours (the HELLO's token) is sent.
fn handshake(
    sock: TcpStream,
    ep: &Endpoint,
    name: &str,
    cfg: &Arc<ClientConfig>,
) -> Result<Stream, Fault> {
    let peer = ep.addr;
    let server = crate::tls::server_name(name).map_err(Fault::Tls)?;
    let conn = ClientConnection::new(cfg.clone(), server)
        .map_err(|e| Fault::Tls(format!("TLS with {ep}: {e}")))?;
    let mut t = StreamOwned::new(conn, sock);
    while t.conn.is_handshaking() {
        if let Err(e) = t.conn.complete_io(&mut t.sock) {
            return Err(match e.kind() {
                // rustls's own verdicts: the certificate, or bytes that are no TLS at all.
                io::ErrorKind::InvalidData => {
                    let text = e.to_string();
                    let hint = if text.contains("corrupt message")
                        || text.contains("InvalidContentType")
                    {
                        " (the proxy did not answer in TLS: is it a plain listener? then drop tls://)"
                    } else {
                        ""
                    };
                    Fault::Tls(format!("TLS with {ep}: {text}{hint}"))
                }
                _ if is_timeout(&e) => {
                    Fault::Connect(format!("TLS with {peer}: no handshake within the timeout"))
                }
                _ => Fault::Connect(format!(
                    "TLS with {ep}: connection lost in the handshake: {e}"
                )),
            });
        }
    }
    Ok(Stream::Tls(Box::new(t)))
}

pub struct Conn {
    io: Framed<Stream>,
    /// When the last reply arrived: a send that fails on a connection idle for longer than the
    /// timeout more likely hit the peer's idle close than a dead proxy.
    pub last_reply: Instant,
}

/// What a failed exchange means to the retry policy.
fn fault(e: CallError) -> Fault {
    match e {
        CallError::Connect { peer, e } => Fault::Connect(format!("connect {peer}: {e}")),
        CallError::Send { peer, e } if is_timeout(&e) => Fault::Send(format!(
            "send to {peer}: peer not reading within the timeout"
        )),
        CallError::Send { peer, e } => Fault::Send(format!("send to {peer}: {e}")),
        CallError::Recv { peer, e } if is_timeout(&e) => {
            Fault::Timeout(format!("no reply from {peer} within the timeout"))
        }
        CallError::Recv { peer, e } => Fault::Dropped(format!("connection to {peer} lost: {e}")),
        CallError::Garbled { peer, why } => Fault::Garbled(format!("bad reply from {peer}: {why}")),
        CallError::Refused { body, .. } => Fault::Server(body),
    }
}

/// Replies come from the server (storage) or, for errors it raises itself, the proxy.
const REPLIES: [u8; 2] = [cmd::REPLY_STORAGE, cmd::REPLY_PROXY];

impl Conn {
    /// Connects (with TLS for a `tls://` entry, verified with `tls`) and opens the session with
    /// `hello` (an encoded HELLO body).
    pub fn open(
        ep: &Endpoint,
        tls: Option<&Arc<ClientConfig>>,
        timeout: Duration,
        hello: &[u8],
    ) -> Result<Conn, Fault> {
        let peer = ep.addr;
        let stream = TcpStream::connect_timeout(&peer, timeout)
            .map_err(|e| Fault::Connect(format!("connect {peer}: {e}")))?;
        let setup = || -> io::Result<()> {
            stream.set_read_timeout(Some(timeout))?;
            stream.set_write_timeout(Some(timeout))?;
            stream.set_nodelay(true)
        };
        setup().map_err(|e| Fault::Connect(format!("socket options for {peer}: {e}")))?;
        let stream = match (&ep.tls, tls) {
            (None, _) => Stream::Plain(stream),
            (Some(name), Some(cfg)) => handshake(stream, ep, name, cfg)?,
            (Some(_), None) => {
                return Err(Fault::Tls(format!("{ep}: no TLS config (internal)")));
            }
        };
        let mut c = Conn {
            io: Framed::new(stream, peer),
            last_reply: Instant::now(),
        };
        // A peer that takes the connection but cannot open a session is as good as down.
        let body = c.call(cmd::HELLO, hello, 3).map_err(|f| match f {
            Fault::Server(e) if e.code.info().retry == Retry::Outage => Fault::Outage(e),
            Fault::Server(e) if !e.code.retryable() => Fault::Server(e),
            other if other.is_upstream_down() => {
                Fault::NoUpstream(format!("HELLO to {peer}: {}", other.describe()))
            }
            other => Fault::Connect(format!("HELLO to {peer}: {}", other.describe())),
        })?;
        Identity::decode(&body)
            .map_err(|e| Fault::Connect(format!("HELLO reply from {peer}: {e}")))?;
        Ok(c)
    }

    /// Who this session is with.
    pub fn peer(&self) -> SocketAddr {
        self.io.peer()
    }

    /// Reads a reply header and, for an error reply, its body. Returns the OK header.
    fn reply_head(&mut self) -> Result<Header, Fault> {
        let r = self.io.reply_head(&REPLIES);
        if matches!(r, Ok(_) | Err(CallError::Refused { .. })) {
            self.last_reply = Instant::now();
        }
        if let Err(CallError::Refused { body, .. }) = &r
            && body.code.ends_session()
        {
            // The peer closes after such errors; so do we.
            let _ = self.io.get_ref().sock().shutdown(Shutdown::Both);
        }
        r.map_err(fault)
    }

    /// Sends a control request and returns the OK reply body (at most `max_reply` bytes).
    pub fn call(&mut self, command: u8, body: &[u8], max_reply: usize) -> Result<Vec<u8>, Fault> {
        let head = Header::new(command, status::OK, body.len() as u64).encode();
        self.io.send(&[&head, body]).map_err(fault)?;
        let h = self.reply_head()?;
        self.io.body(&h, max_reply).map_err(fault)
    }

    /// Sends a data request (meta + payload) and returns the OK reply body.
    pub fn call_data(
        &mut self,
        command: u8,
        meta: &[u8],
        payload: &[u8],
        max_reply: usize,
    ) -> Result<Vec<u8>, Fault> {
        let head = proto::data_frame_head(command, status::OK, meta, payload.len() as u64);
        self.io.send(&[&head, payload]).map_err(fault)?;
        let h = self.reply_head()?;
        self.io.body(&h, max_reply).map_err(fault)
    }

    /// Sends DOWNLOAD and reads the reply payload into `buf`, which must be exactly `expect`
    /// bytes (the range clamped to the file). Returns the CRC32C the server sent.
    pub fn download(&mut self, req: &[u8], expect: usize, buf: &mut Vec<u8>) -> Result<u32, Fault> {
        let head = Header::new(cmd::DOWNLOAD, status::OK, req.len() as u64).encode();
        self.io.send(&[&head, req]).map_err(fault)?;
        let h = self.reply_head()?;
        let want = (DOWNLOAD_REPLY_META + expect) as u64;
        if h.body_len != want {
            return Err(fault(self.io.garbled(format!(
                "DOWNLOAD reply of {} bytes, expected {want}",
                h.body_len
            ))));
        }
        let mut meta = [0u8; DOWNLOAD_REPLY_META];
        self.io.read_exact(&mut meta).map_err(fault)?;
        let crc = proto::decode_download_meta(&meta)
            .map_err(|e| fault(self.io.garbled(e.to_string())))?;
        buf.resize(expect, 0);
        self.io.read_exact(buf).map_err(fault)?;
        Ok(crc)
    }
}
