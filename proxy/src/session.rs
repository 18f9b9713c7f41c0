//! One proxied session as a reactor connection: source 0 is the front socket (the peer that
//! connected to us), source 1 the back socket (our connection to an upstream). Both live in this
//! one value, which the reactor keeps in its slab, so the front/back pairing needs no table of
//! its own.
//!
//! Phases: read the opening (bounded, with a deadline: a LINK proof first when `[link.accept]`
//! has keys, then the first frame) -> answer PROBE / refuse junk, or (routing server-proxy) check
//! the HELLO's session token and look the token's user up at a tracker unless cached (source 2,
//! see [`crate::lookup`]) -> connect to an upstream or node (preferred first, failing over in
//! order, each attempt with a deadline) -> relay both ways without parsing until both directions
//! have passed their FIN on, or cut the session at once when the upstream dies under it.

use crate::first::{FIRST_MAX, First, Opening};
use crate::front::Front;
use crate::lookup::{self, Answer, Lookup};
use crate::relay::{End, Failure, Flow, Mode};
use crate::route::{self, Route, RouteCache};
use crate::stats::Counters;
use crate::tls::{Sniff, TlsFront};
use crate::upstream::Upstreams;
use ferry_common::auth::{LinkVerifier, SigningKey};
use ferry_common::clock::now_secs;
use ferry_common::proto::{self, ErrorBody, ErrorCode, Hello, cmd};
use ferry_common::reactor::{Arm, CloseReason, Conn, Events, Service, Step};
use ferry_common::token::{AuthError, Verifier};
use log::{debug, info, warn};
use mio::Interest;
use mio::net::TcpStream;
use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// What every session shares: settings, upstream health and counters.
pub struct Shared {
    pub counters: Arc<Counters>,
    pub ups: Arc<Upstreams>,
    pub mode: Mode,
    pub pipe_size: usize,
    pub connect_timeout: Duration,
    pub hello_timeout: Duration,
    /// Routing by user through trackers; `None`: the fixed upstream list `ups`.
    pub router: Option<Router>,
    /// `[link.accept]`: when set, a session must open with a valid LINK proof.
    pub link_accept: Option<LinkVerifier>,
    /// `[link.send]`: every connection to an upstream or tracker opens with a fresh proof.
    pub link_send: Option<Arc<SigningKey>>,
    /// `[tls]`: the front speaks TLS (client-proxy); sessions relay in userspace then.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// What a routing server-proxy needs: the trackers (asked in turn) and the route cache.
pub struct Router {
    pub trackers: Arc<[SocketAddr]>,
    pub cache: RouteCache,
    /// `[auth]`: checks each HELLO's session token (once: its nonce is then spent).
    pub auth: Verifier,
}

/// Where a session is being connected to.
struct Targets {
    /// Addresses in the order to try them.
    list: Vec<SocketAddr>,
    /// The preferred one (fixed primary, or the group's first node); others count as standby.
    primary: Option<SocketAddr>,
    /// Routed sessions: the group, and whether the route was already refreshed once.
    group: Option<String>,
    refreshed: bool,
}

/// How long a refused peer gets to read our error frame before the socket is closed.
const REPLY_LINGER: Duration = Duration::from_secs(1);

enum Phase {
    /// Reading the opening; `buf` holds what was read and not consumed (a checked LINK frame is
    /// consumed), at most FIRST_MAX bytes.
    First {
        buf: Vec<u8>,
        until: Instant,
        opening: Opening,
    },
    /// Writing a reply of our own (PROBE answer or error), then waiting for the peer to close.
    Reply {
        out: Vec<u8>,
        pos: usize,
        until: Instant,
    },
    /// Asking a tracker where the HELLO's user lives; `head` is every byte read from the front.
    Lookup {
        lookup: Lookup,
        head: Vec<u8>,
        refreshed: bool,
    },
    /// Connecting to `targets.list[tried - 1]`; `head` is every byte read from the front so far.
    Connect {
        back: TcpStream,
        targets: Targets,
        tried: usize,
        until: Instant,
        head: Vec<u8>,
    },
    Relay {
        back: TcpStream,
        up: Flow,
        down: Flow,
        /// The upstream ended the session first; see [`Session::run_relay`].
        gone: bool,
    },
    Done,
}

pub struct Session {
    front: Front,
    peer: SocketAddr,
    phase: Phase,
    sh: Arc<Shared>,
    started: Instant,
    upstream: Option<SocketAddr>,
    /// The (app, user) the session is for: a routing proxy takes them from the verified token,
    /// never from the HELLO's own fields; a fixed one only logs the HELLO's.
    who: Option<(String, String)>,
    /// The file the session is about (the HELLO's route): a routing proxy sends it to the
    /// file's group instead of the user's.
    file: Option<String>,
    /// A TLS listener's client spoke plain TCP: only a PROBE is answered.
    plain_at_tls: bool,
    end: String,
    bytes_up: u64,
    bytes_down: u64,
}

impl Session {
    pub fn new(front: Front, peer: SocketAddr, sh: Arc<Shared>) -> Session {
        let now = Instant::now();
        Session {
            front,
            peer,
            phase: Phase::First {
                buf: Vec::with_capacity(FIRST_MAX),
                until: now + sh.hello_timeout,
                opening: Opening::new(sh.link_accept.is_some()),
            },
            sh,
            started: now,
            upstream: None,
            who: None,
            file: None,
            plain_at_tls: false,
            end: String::from("open"),
            bytes_up: 0,
            bytes_down: 0,
        }
    }

    fn finish(&mut self, why: impl Into<String>) -> (Phase, Step) {
        self.end = why.into();
        (Phase::Done, Step::Close)
    }

    /// Switches to writing `out` to the front, then closing.
    fn reply(&mut self, out: Vec<u8>, why: impl Into<String>) -> (Phase, Step) {
        self.end = why.into();
        let phase = Phase::Reply {
            out,
            pos: 0,
            until: Instant::now() + REPLY_LINGER,
        };
        self.run_reply(phase)
    }

    fn run_first(
        &mut self,
        mut buf: Vec<u8>,
        until: Instant,
        mut opening: Opening,
        ev: &Events,
    ) -> (Phase, Step) {
        let sh = self.sh.clone();
        let c = &sh.counters;
        if ev.draining {
            return self.finish("shutting down before the first frame");
        }
        match self.front.sniff() {
            Ok(Sniff::Tls) => {}
            Ok(Sniff::Pending) => return self.first_later(buf, until, opening),
            // Plain TCP at a TLS listener: a PROBE is still answered (health checks and
            // readiness probes need no TLS); a HELLO is refused with a plain error frame.
            Ok(Sniff::Plain) => {
                self.front.downgrade();
                self.plain_at_tls = true;
            }
            Err(e) => return self.finish(format!("front error before TLS: {e}")),
        }
        loop {
            let have = buf.len();
            buf.resize(FIRST_MAX, 0);
            let r = self.front.read(&mut buf[have..]);
            buf.truncate(have + *r.as_ref().unwrap_or(&0));
            match r {
                Ok(0) => {
                    c.rejected.fetch_add(1, Ordering::Relaxed);
                    return self.finish("closed before a complete first frame");
                }
                Ok(_) => match opening.advance(&mut buf, sh.link_accept.as_ref()) {
                    First::Pending if buf.len() < FIRST_MAX => continue,
                    First::Pending => {
                        // Cannot happen (any valid first frame fits), but never wait forever.
                        c.rejected.fetch_add(1, Ordering::Relaxed);
                        return self.finish("first frame does not fit");
                    }
                    First::Probe(out) => {
                        c.probes_answered.fetch_add(1, Ordering::Relaxed);
                        return self.reply(out, "PROBE answered");
                    }
                    First::Reject { code, frame, why } => {
                        c.rejected.fetch_add(1, Ordering::Relaxed);
                        if code == ErrorCode::Auth {
                            c.link_refused.fetch_add(1, Ordering::Relaxed);
                            info!("{}: refused: {why}", self.peer);
                        }
                        return self.reply(frame, format!("refused: {why}"));
                    }
                    // Only Opening::advance sees LINK frames; it never hands one out.
                    First::Link { .. } => return self.finish("internal: LINK not consumed"),
                    First::Hello { .. } if self.plain_at_tls => return self.refuse_plain(),
                    First::Hello { hello, .. } => {
                        if let Some(peer) = opening.peer.take() {
                            debug!("{}: linked as {peer}", self.peer);
                        }
                        let who = match &sh.router {
                            Some(router) => {
                                match router.auth.verify(&hello.credential, now_secs()) {
                                    Ok(claims) => (claims.app, claims.user),
                                    Err(e) => return self.refuse_token(&hello, &e),
                                }
                            }
                            None => (hello.app.clone(), hello.user.clone()),
                        };
                        self.who = Some(who);
                        self.file = hello.route;
                        return self.route(buf, false);
                    }
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if self.front.is_tls() {
                        c.tls_failed.fetch_add(1, Ordering::Relaxed);
                        info!("{}: TLS: {e}", self.peer);
                    }
                    return self.finish(format!("front error before HELLO: {e}"));
                }
            }
        }
        self.first_later(buf, until, opening)
    }

    /// No complete opening yet: wait for more, up to the deadline.
    fn first_later(&mut self, buf: Vec<u8>, until: Instant, opening: Opening) -> (Phase, Step) {
        if Instant::now() >= until {
            self.sh.counters.rejected.fetch_add(1, Ordering::Relaxed);
            return self.finish(format!(
                "no complete HELLO within {:?}",
                self.sh.hello_timeout
            ));
        }
        (
            Phase::First {
                buf,
                until,
                opening,
            },
            Step::Keep,
        )
    }

    /// A plain-TCP client at a TLS listener: a plain error frame says what to do, then close.
    fn refuse_plain(&mut self) -> (Phase, Step) {
        let c = &self.sh.counters;
        c.rejected.fetch_add(1, Ordering::Relaxed);
        c.tls_failed.fetch_add(1, Ordering::Relaxed);
        info!("{}: refused: plain TCP at a TLS listener", self.peer);
        let frame = ErrorBody::new(
            ErrorCode::HelloRequired,
            "this proxy listens with TLS: connect with tls://HOST:PORT",
        )
        .frame(cmd::REPLY_PROXY);
        self.reply(frame, "plain TCP at a TLS listener")
    }

    /// A routing proxy's answer to a HELLO whose session token does not pass: error 6, saying
    /// only whether it was missing or not valid (the reason goes to the log), and no lookup.
    fn refuse_token(&mut self, hello: &Hello, e: &AuthError) -> (Phase, Step) {
        let c = &self.sh.counters;
        c.rejected.fetch_add(1, Ordering::Relaxed);
        c.token_refused.fetch_add(1, Ordering::Relaxed);
        let text = match e {
            AuthError::Missing => "session token required",
            _ => "session token not valid",
        };
        info!(
            "{}: refused HELLO (app={} user={}): {text}: {e}",
            self.peer, hello.app, hello.user
        );
        let frame = ErrorBody::new(ErrorCode::Auth, text).frame(cmd::REPLY_PROXY);
        self.reply(frame, format!("{text}: {e}"))
    }

    /// Picks where the session goes: the fixed upstreams in health order, or (routing) the
    /// user's group from the cache or a tracker. `refreshed`: the cached route already failed
    /// once, so ask a tracker whatever the cache says.
    fn route(&mut self, head: Vec<u8>, refreshed: bool) -> (Phase, Step) {
        let sh = self.sh.clone();
        let Some(router) = &sh.router else {
            let targets = Targets {
                list: sh
                    .ups
                    .order()
                    .into_iter()
                    .filter_map(|i| sh.ups.get(i).map(|u| u.addr))
                    .collect(),
                primary: sh.ups.get(0).map(|u| u.addr),
                group: None,
                refreshed: true,
            };
            return self.connect_next(targets, 0, head);
        };
        let c = &sh.counters;
        let Some((app, user)) = self.who.clone() else {
            return self.finish("internal: routing without a HELLO");
        };
        // A file whose id names its group needs only the group's nodes; an id from before ids
        // named their group is asked about every time (the tracker looks up its record).
        let file = self.file.as_deref();
        let cached = match file {
            Some(id) => {
                proto::file_group(id).and_then(|g| router.cache.get_group(g, Instant::now()))
            }
            None => router.cache.get(&app, &user, Instant::now()),
        };
        if !refreshed && let Some(route) = cached {
            c.route_cache_hits.fetch_add(1, Ordering::Relaxed);
            return self.connect_route(route, head, false);
        }
        if !refreshed {
            c.route_cache_misses.fetch_add(1, Ordering::Relaxed);
        }
        c.route_lookups.fetch_add(1, Ordering::Relaxed);
        let req = match lookup::request(&app, &user, file) {
            Ok(r) => r,
            // A decoded HELLO's app and user always fit the SADDRS fields.
            Err(e) => return self.finish(format!("internal: cannot build SADDRS: {e}")),
        };
        let lookup = Lookup::start(
            router.trackers.clone(),
            req,
            sh.link_send.clone(),
            sh.connect_timeout,
        );
        self.run_lookup(lookup, head, refreshed)
    }

    fn run_lookup(&mut self, mut lookup: Lookup, head: Vec<u8>, refreshed: bool) -> (Phase, Step) {
        let sh = self.sh.clone();
        let c = &sh.counters;
        let (Some(router), Some((app, user))) = (&sh.router, self.who.clone()) else {
            return self.finish("internal: lookup without a router");
        };
        match lookup.run() {
            None => (
                Phase::Lookup {
                    lookup,
                    head,
                    refreshed,
                },
                Step::Keep,
            ),
            Some(Answer::Found { route, stale }) => {
                if stale {
                    c.route_stale.fetch_add(1, Ordering::Relaxed);
                }
                if route.nodes.is_empty() {
                    c.route_no_node.fetch_add(1, Ordering::Relaxed);
                    let why = format!("group {} has no node with a usable address", route.group);
                    let frame = ErrorBody::new(ErrorCode::NoNode, &why).frame(cmd::REPLY_PROXY);
                    return self.reply(frame, why);
                }
                match &self.file {
                    Some(_) => router.cache.put_group(&route, Instant::now()),
                    None => router.cache.put(&app, &user, &route, Instant::now()),
                }
                self.connect_route(route, head, refreshed)
            }
            Some(Answer::Refused(code, text)) => {
                if code == ErrorCode::NoNode {
                    c.route_no_node.fetch_add(1, Ordering::Relaxed);
                }
                let frame = ErrorBody::new(code, &text).frame(cmd::REPLY_PROXY);
                self.reply(frame, format!("tracker refused: {text}"))
            }
            Some(Answer::Failed(why)) => {
                c.route_failures.fetch_add(1, Ordering::Relaxed);
                warn!(
                    "{}: route lookup for app={app} user={user} failed: {why}",
                    self.peer
                );
                let text = format!("no tracker answered: {why}");
                let frame = ErrorBody::new(ErrorCode::Upstream, &text).frame(cmd::REPLY_PROXY);
                self.reply(frame, text)
            }
        }
    }

    fn connect_route(&mut self, route: Route, head: Vec<u8>, refreshed: bool) -> (Phase, Step) {
        let Some(router) = &self.sh.router else {
            return self.finish("internal: route without a router");
        };
        let (app, user) = self.who.clone().unwrap_or_default();
        let mine = route::preferred(&route.nodes, &app, &user);
        let targets = Targets {
            list: router.cache.order(&mine, Instant::now()),
            primary: mine.first().copied(),
            group: Some(route.group),
            refreshed,
        };
        self.connect_next(targets, 0, head)
    }

    /// Starts a connect to the next target from position `from`; when none is left, a routed
    /// session asks a tracker again (once), and otherwise the front gets error 19 (Upstream).
    fn connect_next(&mut self, targets: Targets, from: usize, head: Vec<u8>) -> (Phase, Step) {
        let c = &self.sh.counters;
        for k in from..targets.list.len() {
            let addr = targets.list[k];
            match TcpStream::connect(addr) {
                Ok(back) => {
                    return (
                        Phase::Connect {
                            back,
                            targets,
                            tried: k + 1,
                            until: Instant::now() + self.sh.connect_timeout,
                            head,
                        },
                        Step::Keep,
                    );
                }
                Err(e) => {
                    debug!("{}: connect to {addr} failed: {e}", self.peer);
                    self.connect_failed(&targets, addr);
                    if k + 1 < targets.list.len() {
                        c.failovers.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        if !targets.refreshed {
            return self.route(head, true);
        }
        c.no_upstream.fetch_add(1, Ordering::Relaxed);
        let why = match &targets.group {
            Some(g) => format!("no node of group {g} could be reached"),
            None => String::from("no upstream could be reached"),
        };
        let frame = ErrorBody::new(ErrorCode::Upstream, &why).frame(cmd::REPLY_PROXY);
        self.reply(frame, why)
    }

    /// A routed session's connect failed: its group's cached nodes are no longer trusted.
    fn connect_failed(&self, targets: &Targets, addr: SocketAddr) {
        if let (Some(router), Some(group)) = (&self.sh.router, &targets.group) {
            router.cache.node_failed(group, addr, Instant::now());
        }
    }

    fn run_connect(&mut self, phase: Phase, ev: &Events) -> (Phase, Step) {
        let Phase::Connect {
            back,
            targets,
            tried,
            until,
            head,
        } = phase
        else {
            return (phase, Step::Keep);
        };
        let Some(&addr) = targets.list.get(tried.wrapping_sub(1)) else {
            return self.finish("internal: upstream index lost");
        };
        let mut failed = None;
        if ev.writable(1) || ev.readable(1) {
            match back.take_error() {
                Ok(Some(e)) | Err(e) => failed = Some(e.to_string()),
                Ok(None) => match back.peer_addr() {
                    Ok(_) => {
                        if let Some(router) = &self.sh.router {
                            router.cache.node_ok(addr);
                        }
                        let primary = targets.primary == Some(addr);
                        return self.connected(back, addr, primary, head);
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                    Err(e) => failed = Some(e.to_string()),
                },
            }
        }
        if failed.is_none() && Instant::now() >= until {
            failed = Some(format!("timed out after {:?}", self.sh.connect_timeout));
        }
        match failed {
            None => (
                Phase::Connect {
                    back,
                    targets,
                    tried,
                    until,
                    head,
                },
                Step::Keep,
            ),
            Some(why) => {
                debug!("{}: connect to {addr} failed: {why}", self.peer);
                drop(back);
                self.connect_failed(&targets, addr);
                if tried < targets.list.len() {
                    self.sh.counters.failovers.fetch_add(1, Ordering::Relaxed);
                }
                self.connect_next(targets, tried, head)
            }
        }
    }

    fn connected(
        &mut self,
        back: TcpStream,
        addr: SocketAddr,
        primary: bool,
        head: Vec<u8>,
    ) -> (Phase, Step) {
        let _ = back.set_nodelay(true);
        let c = &self.sh.counters;
        c.sessions_relayed.fetch_add(1, Ordering::Relaxed);
        if !primary {
            c.standby_sessions.fetch_add(1, Ordering::Relaxed);
        }
        self.upstream = Some(addr);
        // TLS bytes are decrypted in userspace: no splice for such a session.
        let mode = if self.front.is_tls() {
            Mode::Userspace
        } else {
            self.sh.mode
        };
        let mut up = Flow::new(mode, self.sh.pipe_size);
        // A fresh proof for this connection: receivers refuse a nonce they have seen, so a
        // session that reaches a standby after a failed attempt never resends old bytes.
        let first = match &self.sh.link_send {
            Some(key) => {
                let mut f = key.link_frame();
                f.extend_from_slice(&head);
                f
            }
            None => head,
        };
        if let Err(e) = up.preload(&first) {
            return self.finish(format!("cannot queue the HELLO: {e}"));
        }
        let down = Flow::new(mode, self.sh.pipe_size);
        debug!("{}: relaying to {addr} ({:?})", self.peer, up.mode());
        self.run_relay(back, up, down, false)
    }

    /// Moves bytes both ways until both sockets say WouldBlock. The event bits are not needed:
    /// trying each direction costs at most one EAGAIN per socket.
    ///
    /// `gone`: the upstream has ended the session while the front still had it open (it died,
    /// or closed after a last reply). The front is no longer read; what the upstream sent is
    /// passed on (bounded by the pipe) and then the front is closed, so the client notices at
    /// once and re-sends what is missing (seed 002) without losing the upstream's last bytes.
    fn run_relay(
        &mut self,
        mut back: TcpStream,
        mut up: Flow,
        mut down: Flow,
        mut gone: bool,
    ) -> (Phase, Step) {
        let c = &self.sh.counters;
        let r_up = if gone {
            Ok(())
        } else {
            up.pump(&mut self.front, &mut back)
        };
        let r_down = if r_up.is_ok() {
            down.pump(&mut back, &mut self.front)
        } else {
            Ok(())
        };
        c.bytes_up
            .fetch_add(up.bytes - self.bytes_up, Ordering::Relaxed);
        c.bytes_down
            .fetch_add(down.bytes - self.bytes_down, Ordering::Relaxed);
        self.bytes_up = up.bytes;
        self.bytes_down = down.bytes;
        match (r_up, r_down) {
            (Err(Failure::Source(e)), _) => return self.finish(format!("front error: {e}")),
            (Err(Failure::Dest(e)), _) => {
                c.upstream_lost.fetch_add(1, Ordering::Relaxed);
                return self.finish(format!("upstream write failed: {e}"));
            }
            (_, Err(Failure::Source(e))) => {
                c.upstream_lost.fetch_add(1, Ordering::Relaxed);
                return self.finish(format!("upstream error: {e}"));
            }
            (_, Err(Failure::Dest(e))) => return self.finish(format!("front write failed: {e}")),
            _ => {}
        }
        if down.eof && !up.eof && !gone {
            gone = true;
            c.upstream_lost.fetch_add(1, Ordering::Relaxed);
        }
        // Under TLS the last records may still wait for the socket: close once they are out.
        let flushed = !self.front.wants_write();
        if gone && down.pending() == 0 && flushed {
            self.front.shutdown_both();
            return self.finish("upstream closed mid-session");
        }
        if up.done() && down.done() && flushed {
            return self.finish("complete");
        }
        (
            Phase::Relay {
                back,
                up,
                down,
                gone,
            },
            Step::Keep,
        )
    }

    /// Writes our own reply, half-closes, then reads and discards until the peer closes (so the
    /// peer sees the reply rather than a reset caused by unread bytes), up to a short linger.
    fn run_reply(&mut self, phase: Phase) -> (Phase, Step) {
        let Phase::Reply {
            out,
            mut pos,
            until,
        } = phase
        else {
            return (phase, Step::Keep);
        };
        while pos < out.len() {
            match self.front.write(&out[pos..]) {
                Ok(n) => {
                    pos += n;
                    if pos == out.len() {
                        self.front.shutdown_write();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return (Phase::Done, Step::Close),
            }
        }
        if pos == out.len() {
            let mut sink = [0u8; 4096];
            loop {
                match self.front.read(&mut sink) {
                    Ok(0) => return (Phase::Done, Step::Close),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return (Phase::Done, Step::Close),
                }
            }
        }
        if Instant::now() >= until {
            return (Phase::Done, Step::Close);
        }
        (Phase::Reply { out, pos, until }, Step::Keep)
    }
}

fn interest(read: bool, write: bool) -> Option<Interest> {
    match (read, write) {
        (true, true) => Some(Interest::READABLE | Interest::WRITABLE),
        (true, false) => Some(Interest::READABLE),
        (false, true) => Some(Interest::WRITABLE),
        (false, false) => None,
    }
}

impl Conn for Session {
    fn run(&mut self, ev: &Events) -> Step {
        // Whatever phase this is, TLS records waiting for the socket go first.
        if let Err(e) = self.front.flush() {
            self.end = format!("front write failed: {e}");
            self.phase = Phase::Done;
            return Step::Close;
        }
        let phase = std::mem::replace(&mut self.phase, Phase::Done);
        let (phase, step) = match phase {
            Phase::First {
                buf,
                until,
                opening,
            } => self.run_first(buf, until, opening, ev),
            p @ Phase::Reply { .. } => self.run_reply(p),
            Phase::Lookup {
                lookup,
                head,
                refreshed,
            } => self.run_lookup(lookup, head, refreshed),
            p @ Phase::Connect { .. } => self.run_connect(p, ev),
            Phase::Relay {
                back,
                up,
                down,
                gone,
            } => self.run_relay(back, up, down, gone),
            Phase::Done => (Phase::Done, Step::Close),
        };
        self.phase = phase;
        step
    }

    fn sources(&mut self, arm: &mut Arm<'_>) {
        // TLS records that did not fit in the socket keep the front armed for WRITABLE.
        let flush = self.front.wants_write();
        let front = &mut self.front.sock;
        match &mut self.phase {
            Phase::First { .. } => arm(0, front, interest(true, flush)),
            Phase::Reply { out, pos, .. } => {
                // Writing the reply, then reading until the peer closes.
                let sent = *pos >= out.len();
                arm(0, front, interest(sent, !sent || flush));
            }
            Phase::Lookup { lookup, .. } => {
                // The front waits (bytes after the HELLO stay in its socket); the tracker
                // socket is source 2 so it never shares a registration slot with the node's.
                arm(0, front, interest(false, flush));
                let want = if lookup.wants_write() {
                    Interest::WRITABLE
                } else {
                    Interest::READABLE
                };
                if let Some(sock) = lookup.sock.as_mut() {
                    arm(2, sock, Some(want));
                }
            }
            Phase::Connect { back, .. } => {
                // Bytes after the HELLO stay in the front socket until the relay starts.
                arm(0, front, interest(false, flush));
                arm(1, back, Some(Interest::WRITABLE));
            }
            Phase::Relay {
                back,
                up,
                down,
                gone,
            } => {
                // Once the upstream is gone only the front's draining matters.
                let live = !*gone;
                let fronti = interest(up.wants_read() && live, down.wants_write() || flush);
                let backi = interest(down.wants_read() && live, up.wants_write() && live);
                arm(0, front, fronti);
                arm(1, back, backi);
            }
            Phase::Done => arm(0, front, None),
        }
    }

    fn deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::First { until, .. }
            | Phase::Reply { until, .. }
            | Phase::Connect { until, .. } => Some(*until),
            Phase::Lookup { lookup, .. } => Some(lookup.until),
            Phase::Relay { .. } | Phase::Done => None,
        }
    }

    fn closed(&mut self, why: CloseReason) {
        match why {
            CloseReason::Handler => {}
            CloseReason::Idle => self.end = String::from("idle timeout"),
            CloseReason::Shutdown => self.end = String::from("shutdown grace period over"),
            CloseReason::Register => self.end = String::from("cannot register sockets"),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.sh
            .counters
            .sessions_active
            .fetch_sub(1, Ordering::Relaxed);
        let upstream = self
            .upstream
            .map_or_else(|| String::from("-"), |a| a.to_string());
        let (app, user) = self
            .who
            .as_ref()
            .map_or(("-", "-"), |(a, u)| (a.as_str(), u.as_str()));
        let file = self.file.as_deref().unwrap_or("-");
        debug!(
            "session {} -> {upstream} app={app} user={user} file={file} up={} down={} bytes in \
             {:?}: {}",
            self.peer,
            self.bytes_up,
            self.bytes_down,
            self.started.elapsed(),
            self.end
        );
    }
}

/// The reactor service: every accepted connection becomes a [`Session`].
pub struct ProxyService {
    pub sh: Arc<Shared>,
    /// `[tls]`'s certificate, reloaded on SIGHUP.
    pub certs: Option<Arc<crate::tls::CertStore>>,
}

impl Service for ProxyService {
    fn accept(&self, stream: TcpStream, peer: SocketAddr, _: usize) -> Option<Box<dyn Conn>> {
        let c = &self.sh.counters;
        let front = match &self.sh.tls {
            None => Front::plain(stream),
            Some(cfg) => match TlsFront::new(cfg.clone()) {
                Ok(t) => Front::tls(stream, t),
                Err(e) => {
                    warn!("{peer}: cannot start TLS: {e}");
                    return None;
                }
            },
        };
        c.sessions_total.fetch_add(1, Ordering::Relaxed);
        c.sessions_active.fetch_add(1, Ordering::Relaxed);
        Some(Box::new(Session::new(front, peer, self.sh.clone())))
    }

    fn reload(&self) {
        match &self.certs {
            Some(store) => store.reload_logged(),
            None => info!("SIGHUP: nothing to reload (no [tls])"),
        }
    }

    fn refuse(&self, stream: TcpStream, peer: SocketAddr) {
        self.sh.counters.refused.fetch_add(1, Ordering::Relaxed);
        debug!("{peer}: refused at the connection limit");
        if self.sh.tls.is_some() {
            // A plain frame means nothing to a TLS client; the close alone tells it to go on.
            return;
        }
        let frame = ErrorBody::new(ErrorCode::Limit, "proxy connection limit reached")
            .frame(cmd::REPLY_PROXY);
        // Best effort: a fresh socket's send buffer takes a short frame without blocking.
        let _ = (&stream).write(&frame);
        let _ = stream.shutdown(Shutdown::Write);
    }
}
