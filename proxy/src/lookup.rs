//! One route lookup: TRACKER_SADDRS (12) for a session's (app, user), asked of each tracker in
//! turn over a non-blocking socket that the session owns as one more reactor source.
//!
//! Why here and not elsewhere: the lookup is a few hundred bytes each way, so it runs as a step of
//! the session's own state machine on the worker thread that runs the session, driven by the
//! same epoll readiness as its other sockets. Nothing ever blocks: the poll thread only sees one
//! more socket, a worker never waits on a tracker (a slow tracker costs a deadline, not a thread),
//! and no lookup thread pool or cross-thread wake-up is needed. Each tracker gets
//! `connect_timeout_ms` for the whole exchange (connect, request, reply); then the next is tried.
//! With `[link.send]` every tracker connection opens with a fresh LINK proof (trackers may
//! require one; a valid LINK has no reply, so the reply read is the SADDRS answer).

use crate::route::Route;
use ferry_common::auth::SigningKey;
use ferry_common::proto::{
    self, ErrorBody, ErrorCode, HEADER_LEN, Header, SaddrsReply, SaddrsReq, Side, cmd, status,
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
    /// The tracker's verdict, passed to the client as it is: the group has no online node
    /// (error 23; the text names the group), or the file's id names no group (error 7).
    Refused(ErrorCode, String),
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
    /// The key to prove this proxy with, minted anew for each tracker connection.
    link: Option<Arc<SigningKey>>,
    /// What goes out on the current connection: a fresh LINK frame (if any), then `request`.
    out: Vec<u8>,
    timeout: Duration,
    pub sock: Option<TcpStream>,
    io: Io,
    pub until: Instant,
    failures: Vec<String>,
}

/// The SADDRS request frame for (app, user), and the file the session is about (if any).
pub fn request(app: &str, user: &str, file: Option<&str>) -> Result<Vec<u8>, proto::ProtoError> {
    let body = SaddrsReq {
        app: app.to_owned(),
        user: user.to_owned(),
        file_id: file.unwrap_or_default().to_owned(),
    }
    .encode()?;
    Ok(proto::frame(cmd::TRACKER_SADDRS, status::OK, &body))
}

impl Lookup {
    /// Starts asking the first tracker. `request` is a whole SADDRS frame; `link`: the key to
    /// open each tracker connection with a LINK proof.
    pub fn start(
        trackers: Arc<[SocketAddr]>,
        request: Vec<u8>,
        link: Option<Arc<SigningKey>>,
        timeout: Duration,
    ) -> Self {
        let mut l = Lookup {
            trackers,
            at: 0,
            request,
            link,
            out: Vec::new(),
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
                    self.out = match &self.link {
                        Some(k) => k.link_frame(),
                        None => Vec::new(),
                    };
                    self.out.extend_from_slice(&self.request);
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
            while *sent < self.out.len() {
                match (&*sock).write(&self.out[*sent..]) {
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
        // The error table says whose the failure is: one about the request itself (no such
        // file, a group without a node) is the answer every tracker would give, so it goes to
        // the client; one of this tracker (its database, its disk) or of this connection (a
        // refused link, a protocol mismatch) sends the lookup to the next tracker.
        let info = e.code.info();
        return if info.side != Side::Server && !info.ends_session {
            Ok(Answer::Refused(e.code, e.text))
        } else {
            Err(format!(
                "error {} {}: {}",
                e.code as u16,
                e.code.name(),
                e.text
            ))
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

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_common::proto::NodeAddr;
    use std::net::TcpListener;

    /// A one-connection tracker stand-in: reads one request, answers with `reply` (or nothing).
    fn tracker(reply: Option<Vec<u8>>) -> (SocketAddr, std::thread::JoinHandle<Vec<u8>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut req = vec![0u8; HEADER_LEN + proto::SADDRS_LEN];
            s.read_exact(&mut req).unwrap();
            match reply {
                Some(r) => s.write_all(&r).unwrap(),
                // Hold the connection open without answering until the client gives up.
                None => {
                    let _ = s.read(&mut [0u8; 1]);
                }
            }
            req
        });
        (addr, t)
    }

    fn closed_port() -> SocketAddr {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    fn found(group: &str, nodes: &[(&str, u16)], stale: bool) -> Vec<u8> {
        let body = SaddrsReply {
            group: group.into(),
            stale,
            nodes: nodes
                .iter()
                .map(|&(h, p)| NodeAddr {
                    host: h.into(),
                    port: p,
                })
                .collect(),
        }
        .encode()
        .unwrap();
        proto::frame(cmd::REPLY_TRACKER, status::OK, &body)
    }

    /// Drives a lookup the way the reactor would, minus epoll: run until it answers.
    fn finish(mut l: Lookup) -> Answer {
        let t = Instant::now();
        loop {
            if let Some(a) = l.run() {
                return a;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "lookup never ended");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn start(trackers: Vec<SocketAddr>, timeout: Duration) -> Lookup {
        Lookup::start(
            trackers.into(),
            request("demo", "alice", None).unwrap(),
            None,
            timeout,
        )
    }

    /// A one-connection tracker that wants a LINK frame before the request; returns its body.
    fn linked_tracker(reply: Vec<u8>) -> (SocketAddr, std::thread::JoinHandle<Vec<u8>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut h = [0u8; HEADER_LEN];
            s.read_exact(&mut h).unwrap();
            let h = Header::decode(&h);
            assert_eq!(h.cmd, cmd::LINK);
            let mut proof = vec![0u8; h.body_len as usize];
            s.read_exact(&mut proof).unwrap();
            let mut req = vec![0u8; HEADER_LEN + proto::SADDRS_LEN];
            s.read_exact(&mut req).unwrap();
            assert_eq!(req[8], cmd::TRACKER_SADDRS);
            s.write_all(&reply).unwrap();
            proof
        });
        (addr, t)
    }

    #[test]
    fn each_tracker_connection_opens_with_a_fresh_link_proof() {
        use ferry_common::auth::{LinkConfig, new_secret};
        let key = SigningKey {
            id: "sp".into(),
            secret: new_secret(),
        };
        let accept = LinkConfig {
            send: None,
            accept: [("sp".to_owned(), key.secret.clone())].into(),
            ..LinkConfig::default()
        };
        let v = accept.verifier().unwrap();
        let (t1, j1) = linked_tracker(
            ErrorBody::new(ErrorCode::Unavailable, "db down").frame(cmd::REPLY_TRACKER),
        );
        let (t2, j2) = linked_tracker(found("g1", &[("127.0.0.1", 1)], false));
        let l = Lookup::start(
            vec![t1, t2].into(),
            request("demo", "alice", None).unwrap(),
            Some(Arc::new(key)),
            Duration::from_secs(2),
        );
        let a = finish(l);
        assert!(matches!(a, Answer::Found { .. }), "{a:?}");
        // Both proofs are valid for the same receiver: a reused one would be a replay.
        assert_eq!(v.verify(&j1.join().unwrap()).unwrap(), "sp");
        assert_eq!(v.verify(&j2.join().unwrap()).unwrap(), "sp");
    }

    #[test]
    fn asks_each_tracker_in_turn_until_one_answers() {
        let (good, t) = tracker(Some(found(
            "g2",
            &[("127.0.0.1", 9001), ("::1", 9002)],
            true,
        )));
        let answer = finish(start(vec![closed_port(), good], Duration::from_secs(2)));
        let Answer::Found { route, stale } = answer else {
            panic!("{answer:?}")
        };
        assert!(stale);
        assert_eq!(route.group, "g2");
        assert_eq!(
            route.nodes.to_vec(),
            vec![
                "127.0.0.1:9001".parse::<SocketAddr>().unwrap(),
                "[::1]:9002".parse().unwrap()
            ]
        );
        // The request names the HELLO's app and user.
        let req = t.join().unwrap();
        let h = Header::decode(req[..HEADER_LEN].try_into().unwrap());
        assert_eq!(h.cmd, cmd::TRACKER_SADDRS);
        let body = SaddrsReq::decode(&req[HEADER_LEN..]).unwrap();
        assert_eq!((body.app.as_str(), body.user.as_str()), ("demo", "alice"));
    }

    #[test]
    fn no_node_is_an_answer_other_errors_move_on() {
        let text = "group g1 has no online node";
        let (t1, j1) = tracker(Some(
            ErrorBody::new(ErrorCode::NoNode, text).frame(cmd::REPLY_TRACKER),
        ));
        assert_eq!(
            finish(start(vec![t1], Duration::from_secs(2))),
            Answer::Refused(ErrorCode::NoNode, text.into())
        );
        j1.join().unwrap();
        // A tracker that cannot answer (database down, no view) is skipped like a dead one.
        let (t1, j1) = tracker(Some(
            ErrorBody::new(ErrorCode::Unavailable, "db down").frame(cmd::REPLY_TRACKER),
        ));
        let (t2, j2) = tracker(Some(found("g1", &[("127.0.0.1", 1)], false)));
        let a = finish(start(vec![t1, t2], Duration::from_secs(2)));
        assert!(matches!(a, Answer::Found { .. }), "{a:?}");
        j1.join().unwrap();
        j2.join().unwrap();
        // The error table decides the rest: a missing file is the answer; a refused link (it
        // ends the connection) or the tracker's own failure moves on to the next tracker.
        let (t1, j1) = tracker(Some(
            ErrorBody::new(ErrorCode::NotFound, "no file").frame(cmd::REPLY_TRACKER),
        ));
        assert_eq!(
            finish(start(vec![t1], Duration::from_secs(2))),
            Answer::Refused(ErrorCode::NotFound, "no file".into())
        );
        j1.join().unwrap();
        for code in [ErrorCode::Auth, ErrorCode::Io, ErrorCode::UnknownCommand] {
            let (t1, j1) = tracker(Some(ErrorBody::new(code, "x").frame(cmd::REPLY_TRACKER)));
            let (t2, j2) = tracker(Some(found("g1", &[("127.0.0.1", 1)], false)));
            let a = finish(start(vec![t1, t2], Duration::from_secs(2)));
            assert!(matches!(a, Answer::Found { .. }), "{code:?}: {a:?}");
            j1.join().unwrap();
            j2.join().unwrap();
        }
    }

    #[test]
    fn silent_garbled_and_dead_trackers_end_in_a_failure_naming_each() {
        let (silent, j1) = tracker(None);
        // A reply claiming a body over the SADDRS cap is refused from its header.
        let huge = Header::new(cmd::REPLY_TRACKER, status::OK, 1 << 40).encode();
        let (garbled, j2) = tracker(Some(huge.to_vec()));
        let dead = closed_port();
        let t = Instant::now();
        let a = finish(start(
            vec![silent, garbled, dead],
            Duration::from_millis(300),
        ));
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        let Answer::Failed(why) = a else {
            panic!("{a:?}")
        };
        assert!(
            why.contains(&format!("tracker {silent}: no answer within")),
            "{why}"
        );
        assert!(
            why.contains(&format!("tracker {garbled}: reply body of")),
            "{why}"
        );
        assert!(why.contains(&format!("tracker {dead}: ")), "{why}");
        j1.join().unwrap();
        j2.join().unwrap();
        assert_eq!(
            finish(start(vec![], Duration::from_millis(100))),
            Answer::Failed("no trackers configured".into())
        );
    }

    #[test]
    fn replies_are_checked_before_use() {
        // Wrong reply command, bad node count, an empty group list is still an answer.
        let wrong = proto::frame(cmd::REPLY_STORAGE, status::OK, &[0u8; 35]);
        assert!(decode_reply(&wrong).unwrap_err().contains("REPLY_STORAGE"));
        let mut body = found("g1", &[("127.0.0.1", 1)], false)[HEADER_LEN..].to_vec();
        body[33..35].copy_from_slice(&2u16.to_be_bytes());
        let f = proto::frame(cmd::REPLY_TRACKER, status::OK, &body);
        assert!(decode_reply(&f).unwrap_err().contains("bad SADDRS reply"));
        let empty = found("g1", &[], false);
        let Ok(Answer::Found { route, .. }) = decode_reply(&empty) else {
            panic!()
        };
        assert!(route.nodes.is_empty());
    }
}
