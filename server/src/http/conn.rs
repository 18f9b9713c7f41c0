//! One HTTP connection on the reactor: read a request head into a bounded buffer, answer it
//! (head bytes, then the body by sendfile), continue on WRITABLE when the socket is full, then
//! the next request on the same connection (keep-alive; pipelined requests wait their turn).
//!
//! Limits: the head buffer is `max_header_bytes` (a head that does not fit is 431); a head must
//! be complete `header_timeout_ms` after the connection opened or the last answer went out (408
//! for a client that started a request and trickles it, a quiet close for an idle keep-alive).
//! While a body is being sent there is no deadline; the reactor's idle timeout covers a reader
//! that stops reading.

use super::Gateway;
use super::head::{self, Parsed};
use super::respond::{self, Answer, Body};
use crate::outbox::{Outbox, Written};
use ferry_common::reactor::{Arm, CloseReason, Conn, Events, Step};
use log::{debug, info};
use mio::Interest;
use mio::net::TcpStream;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

/// Bytes sent per run before yielding the worker; the WRITABLE re-arm continues it.
const WRITE_BUDGET: u64 = 16 << 20;
/// After refusing a request (400, 408, 431, ...) the connection half-closes and reads and drops
/// what the client still sends, for at most this long and this many bytes, before closing:
/// closing with unread input would send a RST that can destroy the refusal before the client
/// reads it ("lingering close", as Apache and nginx do).
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

enum Flush {
    Done,
    Blocked,
    Failed,
}

pub struct HttpConn {
    sock: TcpStream,
    peer: SocketAddr,
    gw: Arc<Gateway>,
    buf: Box<[u8]>,
    len: usize,
    out: Outbox,
    /// When the request head being read must be complete (none while answering).
    deadline: Option<Instant>,
    /// Close once the answer being sent is out.
    close_after: bool,
    /// The answer was a refusal: linger (see [`LINGER`]) instead of closing at once.
    linger: bool,
    /// Lingering until then, with this many bytes dropped so far.
    lingering: Option<(Instant, usize)>,
    /// The last read filled the free buffer space, so more bytes may be waiting. When it did
    /// not, the socket is drained and the run can end without a read that would only say
    /// WouldBlock: the reactor re-arms with EPOLL_CTL_MOD, which re-checks readiness.
    maybe_more: bool,
    eof: bool,
    /// The last run ended with the socket drained (see [`Conn::settled`]).
    settled: bool,
}

impl HttpConn {
    pub fn new(sock: TcpStream, peer: SocketAddr, gw: Arc<Gateway>) -> HttpConn {
        let buf = vec![0u8; gw.cfg.max_header_bytes].into_boxed_slice();
        let deadline = Some(Instant::now() + gw.cfg.header_timeout());
        HttpConn {
            sock,
            peer,
            gw,
            buf,
            len: 0,
            out: Outbox::default(),
            deadline,
            close_after: false,
            linger: false,
            lingering: None,
            maybe_more: true,
            eof: false,
            settled: false,
        }
    }

    fn writing(&self) -> bool {
        self.out.busy()
    }

    /// Queues an answer: its head, then its body unless this is a HEAD request.
    fn start(&mut self, a: Answer, head_only: bool, keep_alive: bool) {
        let keep = keep_alive && !a.close;
        let mut head = a.head_bytes(keep, SystemTime::now());
        let mut file = None;
        if !head_only {
            match a.body {
                Body::None => {}
                Body::Text(t) => head.extend_from_slice(&t),
                Body::File { file: f, off, len } => file = Some((f, off, len)),
            }
        }
        self.out.start(head, file);
        self.close_after = !keep;
        self.deadline = None;
    }

    fn serve(&mut self, h: &head::Head, draining: bool) {
        self.gw.stats.requests.fetch_add(1, Ordering::Relaxed);
        let a = respond::answer(&self.gw, h, SystemTime::now());
        if a.status == 206 {
            self.gw.stats.partial.fetch_add(1, Ordering::Relaxed);
        }
        // One line per answer, with the range served: the end-to-end tests read these to see
        // which part of a file a player asked for (and when).
        debug!(
            "{}: {} {} HTTP/1.{} -> {} ({} bytes{})",
            self.peer,
            h.method,
            h.target
                .split_once('?')
                .map_or(h.target.as_str(), |(p, _)| p),
            h.minor,
            a.status,
            a.length.unwrap_or(0),
            a.headers
                .iter()
                .find(|(k, _)| *k == "Content-Range")
                .map_or(String::new(), |(_, v)| format!(", {v}"))
        );
        self.start(a, h.method == "HEAD", h.keep_alive && !draining);
    }

    /// Answers a head that cannot be served, then closes.
    fn refuse(&mut self, status: u16, why: &str) {
        debug!("{}: {status} ({why}); closing", self.peer);
        self.start(Answer::error(status, why, true), false, false);
        // Whatever else was buffered belongs to a request we will not read.
        self.len = 0;
        self.linger = true;
    }

    fn flush(&mut self) -> Flush {
        match self.out.write(&self.sock, self.peer, WRITE_BUDGET) {
            Written::Done => Flush::Done,
            Written::Blocked => Flush::Blocked,
            Written::Failed => Flush::Failed,
        }
    }
}

impl HttpConn {
    /// Half-closes, then reads and drops input until the client closes, or the time or byte
    /// allowance runs out.
    fn linger_step(&mut self) -> Step {
        let (until, mut dropped) = match self.lingering {
            Some(l) => l,
            None => {
                if self.sock.shutdown(std::net::Shutdown::Write).is_err() {
                    return Step::Close;
                }
                (Instant::now() + LINGER, 0)
            }
        };
        if Instant::now() >= until {
            return Step::Close;
        }
        loop {
            match self.sock.read(&mut self.buf) {
                Ok(0) => return Step::Close,
                Ok(n) => {
                    dropped += n;
                    if dropped > LINGER_BYTES {
                        return Step::Close;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Step::Close,
            }
        }
        self.lingering = Some((until, dropped));
        self.deadline = Some(until);
        Step::Keep
    }
}

impl Conn for HttpConn {
    fn run(&mut self, ev: &Events) -> Step {
        self.settled = false;
        if ev.timer && !self.writing() && self.deadline.is_some_and(|d| Instant::now() >= d) {
            if self.len == 0 {
                debug!("{}: idle http connection closed", self.peer);
                return Step::Close;
            }
            self.gw.stats.timeouts.fetch_add(1, Ordering::Relaxed);
            info!(
                "{}: request head incomplete after {} ms ({} bytes); 408",
                self.peer, self.gw.cfg.header_timeout_ms, self.len
            );
            self.refuse(408, "request head not received in time");
        }
        loop {
            let was_writing = self.writing();
            match self.flush() {
                Flush::Done => {}
                Flush::Blocked => return Step::Keep,
                Flush::Failed => return Step::Close,
            }
            if self.close_after {
                return if self.linger && !self.eof {
                    self.linger_step()
                } else {
                    Step::Close
                };
            }
            if was_writing {
                // An answer is out: the next head has its own time limit from now.
                self.deadline = Some(Instant::now() + self.gw.cfg.header_timeout());
            }
            if self.len > 0 {
                match head::parse(&self.buf[..self.len]) {
                    Parsed::Complete(h, n) => {
                        self.buf.copy_within(n..self.len, 0);
                        self.len -= n;
                        self.serve(&h, ev.draining);
                        continue;
                    }
                    Parsed::Partial if self.len == self.buf.len() => {
                        self.refuse(431, "request head too large");
                        continue;
                    }
                    Parsed::Partial => {}
                    Parsed::TooManyHeaders => {
                        self.refuse(431, "too many header fields");
                        continue;
                    }
                    Parsed::Bad(why) => {
                        self.refuse(400, why);
                        continue;
                    }
                }
            }
            if self.eof || (ev.draining && self.len == 0) {
                return Step::Close;
            }
            if !self.maybe_more && !ev.timer {
                // The last read emptied the socket: the next request is a new edge.
                self.maybe_more = true;
                self.settled = true;
                return Step::Keep;
            }
            let space = self.buf.len() - self.len;
            match self.sock.read(&mut self.buf[self.len..]) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    self.len += n;
                    self.maybe_more = n == space;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.settled = true;
                    return Step::Keep;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!("{}: read failed: {e}", self.peer);
                    return Step::Close;
                }
            }
        }
    }

    fn sources(&mut self, arm: &mut Arm<'_>) {
        let interest = if self.writing() {
            Some(Interest::WRITABLE)
        } else if self.eof {
            None
        } else {
            Some(Interest::READABLE)
        };
        arm(0, &mut self.sock, interest);
    }

    fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Only after a run that ended reading (not writing: a spent write budget leaves the
    /// socket writable with no new edge to come).
    fn settled(&self) -> bool {
        self.settled
    }

    fn closed(&mut self, why: CloseReason) {
        if self.out.sending_file() {
            debug!("{}: http connection closed ({why:?}) mid-body", self.peer);
        } else {
            debug!("{}: http connection closed ({why:?})", self.peer);
        }
    }
}

impl Drop for HttpConn {
    fn drop(&mut self) {
        self.gw.released(self.peer.ip());
    }
}
