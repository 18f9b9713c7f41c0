//! One route lookup: TRACKER_SADDRS (12) for a session's (app, user), asked of each tracker in
//! turn over a non-blocking socket that the session owns as one more reactor source.
//!
//! Why here and not elsewhere: the lookup is a few hundred bytes each way, so it runs as a step of
//! the session's own state machine on the worker thread that runs the session, driven by the
//! same epoll readiness as its other sockets. Nothing ever blocks: the poll thread only sees one
//! more socket, a worker never waits on a tracker (a slow tracker costs a deadline, not a thread),
//! and no lookup thread pool or cross-thread wake-up is needed. Each tracker gets
//! `connect_timeout_ms` for the whole exchange (connect, request, reply); then the next is tried.

use crate::route::Route;
use ferry_common::proto::{
    self, ErrorBody, ErrorCode, HEADER_LEN, Header, SaddrsReply, SaddrsReq, cmd, status,
};
use log::{debug, warn};
use mio::net::TcpStream;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest reply body accepted from a tracker: an error, or a SADDRS answer at its node cap.
const REPLY_MAX: u64 = proto::SADDRS_REPLY_MAX as u64;

/// How a lookup ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// The user's group and its online nodes (`stale`: the tracker answered from its last view
    /// because its database is unreachable).
    Found { route: Route, stale: bool },
    /// The tracker says the user's group has no online node (error 23); the text names the group.
    NoNode(String),
    /// No tracker gave an answer; the text says what each one did.
    Failed(String),
}

enum Io {
    /// Waiting for the non-blocking connect to complete.
    Connecting,
    /// Sending the request (`sent` bytes out so far).
    Sending { sent: usize },
    /// Reading the reply (`got` holds what arrived).
    Reading { got: Vec<u8> },
}

/// The lookup in progress. `sock` is the session's source while it runs.
pub struct Lookup {
    trackers: Arc<[SocketAddr]>,
    /// Index of the tracker being asked.
    at: usize,
    request: Vec<u8>,
    timeout: Duration,
    pub sock: Option<TcpStream>,
    io: Io,
    pub until: Instant,
    failures: Vec<String>,
}

/// The SADDRS request frame for (app, user); the file id is reserved and sent empty.
pub fn request(app: &str, user: &str) -> Result<Vec<u8>, proto::ProtoError> {
    let body = SaddrsReq {
        app: app.to_owned(),
        user: user.to_owned(),
        file_id: String::new(),
    }
    .encode()?;
    Ok(proto::frame(cmd::TRACKER_SADDRS, status::OK, &body))
}

impl Lookup {
    /// Starts asking the first tracker. `request` is a whole SADDRS frame.
    pub fn start(trackers: Arc<[SocketAddr]>, request: Vec<u8>, timeout: Duration) -> Self {
        let mut l = Lookup {
            trackers,
            at: 0,
            request,
            timeout,
            sock: None,
            io: Io::Connecting,
            until: Instant::now(),
            failures: Vec::new(),
        };
        l.connect_from(0);
        l
    }

    /// Opens a connection to the first tracker from `from` whose connect can be started.
    fn connect_from(&mut self, from: usize) {
        self.sock = None;
        for i in from..self.trackers.len() {
            let addr = self.trackers[i];
            match TcpStream::connect(addr) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    self.at = i;
                    self.sock = Some(s);
                    self.io = Io::Connecting;
                    self.until = Instant::now() + self.timeout;
                    return;
                }
                Err(e) => self.failures.push(format!("tracker {addr}: connect: {e}")),
            }
        }
        self.at = self.trackers.len();
    }

    /// The tracker at hand failed; move to the next.
    fn next(&mut self, why: String) {
        let addr = self.trackers[self.at];
        debug!("route lookup: tracker {addr}: {why}");
        self.failures.push(format!("tracker {addr}: {why}"));
        self.connect_from(self.at + 1);
    }

    /// Whether the socket waits to write (else to read).
    pub fn wants_write(&self) -> bool {
        !matches!(self.io, Io::Reading { .. })
    }

    /// Advances as far as the sockets allow. `None`: waiting for readiness or the deadline.
    pub fn run(&mut self) -> Option<Answer> {
        loop {
            if self.sock.is_none() {
                return Some(Answer::Failed(if self.failures.is_empty() {
                    "no trackers configured".into()
                } else {
                    self.failures.join("; ")
                }));
            }
            match self.step() {
                Ok(Some(answer)) => return Some(answer),
                Ok(None) => {
                    if Instant::now() >= self.until {
                        self.next(format!("no answer within {:?}", self.timeout));
                        continue;
                    }
                    return None;
                }
                Err(why) => self.next(why),
            }
        }
    }

    /// One tracker exchange as far as it goes: Ok(None) = would block.
    fn step(&mut self) -> Result<Option<Answer>, String> {
        let Some(sock) = self.sock.as_ref() else {
            return Err("no socket".into());
        };
        if let Io::Connecting = self.io {
            match sock.take_error() {
                Ok(Some(e)) | Err(e) => return Err(format!("connect: {e}")),
                Ok(None) => {}
            }
            match sock.peer_addr() {
                Ok(_) => self.io = Io::Sending { sent: 0 },
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(None),
                Err(e) => return Err(format!("connect: {e}")),
            }
        }
        if let Io::Sending { sent } = &mut self.io {
            while *sent < self.request.len() {
                match (&*sock).write(&self.request[*sent..]) {
                    Ok(0) => return Err("connection closed while sending".into()),
                    Ok(n) => *sent += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("send: {e}")),
                }
            }
            self.io = Io::Reading { got: Vec::new() };
        }
        let Io::Reading { got } = &mut self.io else {
            return Ok(None);
        };
        loop {
            // Read exactly what the frame needs: the header, then the body it announces.
            let need = match got.first_chunk::<HEADER_LEN>() {
                None => HEADER_LEN,
                Some(raw) => {
                    let h = Header::decode(raw);
                    let max = if h.status == status::OK {
                        REPLY_MAX
                    } else {
                        2 + proto::ERROR_TEXT_MAX as u64
                    };
                    if h.body_len > max {
                        return Err(format!("reply body of {} bytes is too long", h.body_len));
                    }
                    HEADER_LEN + h.body_len as usize
                }
            };
            if got.len() >= HEADER_LEN && got.len() == need {
                return decode_reply(got).map(Some);
            }
            let have = got.len();
            got.resize(need, 0);
            let r = (&*sock).read(&mut got[have..]);
            got.truncate(have + *r.as_ref().unwrap_or(&0));
            match r {
                Ok(0) => return Err("connection closed before the reply".into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }
}

/// Turns a whole reply frame into an answer (or a reason to ask the next tracker).
fn decode_reply(frame: &[u8]) -> Result<Answer, String> {
    let Some(raw) = frame.first_chunk::<HEADER_LEN>() else {
        return Err("short reply".into());
    };
    let h = Header::decode(raw);
    let body = &frame[HEADER_LEN..];
    if h.status == status::ERROR {
        let e = ErrorBody::decode(body).map_err(|e| format!("bad error reply: {e}"))?;
        return match e.code {
            ErrorCode::NoNode => Ok(Answer::NoNode(e.text)),
            code => Err(format!("error {} {code:?}: {}", code as u16, e.text)),
        };
    }
    if h.cmd != cmd::REPLY_TRACKER || h.status != status::OK {
        return Err(format!(
            "answered with command {} status {}",
            cmd::name(h.cmd),
            h.status
        ));
    }
    let reply = SaddrsReply::decode(body).map_err(|e| format!("bad SADDRS reply: {e}"))?;
    let mut nodes = Vec::with_capacity(reply.nodes.len());
    for n in &reply.nodes {
        match resolve(&n.host, n.port) {
            Some(a) => nodes.push(a),
            None => warn!(
                "group {}: node {}:{} has no usable address; skipped",
                reply.group, n.host, n.port
            ),
        }
    }
    Ok(Answer::Found {
        route: Route {
            group: reply.group,
            nodes: nodes.into(),
        },
        stale: reply.stale,
    })
}

/// A node's address. Nodes normally advertise IP literals; a DNS name is resolved here, on the
/// worker, once per cache fill (never on the poll thread).
fn resolve(host: &str, port: u16) -> Option<SocketAddr> {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Some(SocketAddr::new(ip, port));
    }
    (host, port).to_socket_addrs().ok()?.next()
}
