//! The reactor: one mio `Poll` thread and N worker threads.
//!
//! mio registers every source edge-triggered and has no EPOLLONESHOT, so oneshot semantics are
//! kept here, by ownership: a connection is either *idle* (parked in the slab, armed in epoll) or
//! *busy* (moved, as a `Box<dyn Conn>`, to exactly one worker through a crossbeam channel). A
//! worker runs the handler until its sockets say WouldBlock and sends the connection back; the
//! reactor then re-arms every source with `reregister` (EPOLL_CTL_MOD, which re-checks readiness
//! and queues a fresh event if data arrived meanwhile). Events that arrive while a connection is
//! busy are merged into its `pending` set and dispatched again as soon as it comes back, so no
//! readiness is lost and no connection is ever run by two workers at once.
//!
//! The reactor also owns: non-blocking accept with a connection limit, idle timeouts and
//! per-connection deadlines on a deadline heap, a `Waker` for workers and for shutdown, and
//! SIGTERM/SIGINT handling (stop accepting, let connections drain up to a deadline, exit).

pub mod echo;
mod events;
mod timers;

pub use events::{Events, MAX_SOURCES, Ready};

use crossbeam_channel::{Receiver, Sender};
use log::{debug, info, warn};
use mio::event::Source;
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Poll, Token, Waker};
use slab::Slab;
use std::io;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use timers::Timers;

/// What a handler wants after it ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Keep the connection; re-arm its sources with the interests it reports.
    Keep,
    /// Drop the connection (its sockets close).
    Close,
}

/// Why the reactor dropped a connection, passed to [`Conn::closed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The handler returned [`Step::Close`].
    Handler,
    /// No readiness for the idle timeout.
    Idle,
    /// The shutdown grace period ran out.
    Shutdown,
    /// Registering its sockets failed.
    Register,
}

/// The callback a connection reports its sources to: (source index, source, interest).
pub type Arm<'a> = dyn FnMut(usize, &mut dyn Source, Option<Interest>) + 'a;

/// One connection's state machine. Lives in the reactor's slab while idle and on one worker
/// while it runs; never on two threads at once.
pub trait Conn: Send + 'static {
    /// Runs on a worker thread with the readiness gathered since the last run. Must do I/O until
    /// the sockets it cares about return WouldBlock (edge-triggered), or hold its own record that
    /// work remains (and ask for a deadline).
    fn run(&mut self, ev: &Events) -> Step;

    /// Reports every source the connection holds, with the interest to arm it for (`None`: keep
    /// it out of epoll, e.g. to stop reading while the other side cannot take more). Called on
    /// the reactor thread after accept and after every run.
    fn sources(&mut self, arm: &mut Arm<'_>);

    /// A moment at which the reactor should run the connection with `ev.timer` set.
    fn deadline(&self) -> Option<Instant> {
        None
    }

    /// Called once when the reactor drops the connection for a reason of its own (or after
    /// [`Step::Close`]); for logging and counters.
    fn closed(&mut self, _why: CloseReason) {}
}

/// What the proxy or the server plugs into the reactor.
pub trait Service: Send + Sync + 'static {
    /// A new connection on listener number `listener`. `None` refuses it (the stream closes).
    fn accept(&self, stream: TcpStream, peer: SocketAddr, listener: usize)
    -> Option<Box<dyn Conn>>;

    /// The connection limit is reached: the service may write a short refusal (best effort,
    /// non-blocking) before the stream is closed.
    fn refuse(&self, _stream: TcpStream, _peer: SocketAddr) {}
}

/// Reactor settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub workers: usize,
    pub max_connections: usize,
    /// A connection with no readiness for this long is closed.
    pub idle_timeout: Duration,
    /// How long in-flight connections may run after SIGTERM (or [`Handle::shutdown`]).
    pub shutdown_grace: Duration,
    /// Install SIGTERM/SIGINT handlers (binaries yes, in-process tests no).
    pub handle_signals: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            workers: 4,
            max_connections: 4096,
            idle_timeout: Duration::from_secs(120),
            shutdown_grace: Duration::from_secs(10),
            handle_signals: false,
        }
    }
}

/// Counters the reactor keeps; cheap to read from any thread.
#[derive(Debug, Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    pub refused: AtomicU64,
    pub active: AtomicU64,
    pub idle_closed: AtomicU64,
    pub dispatched: AtomicU64,
}

/// Controls a running reactor from other threads.
#[derive(Clone)]
pub struct Handle {
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
    stats: Arc<Stats>,
}

impl Handle {
    /// Starts a graceful shutdown, as SIGTERM does.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
    }
    pub fn stats(&self) -> &Stats {
        &self.stats
    }
}

const WAKER: Token = Token(usize::MAX);
const SIGNALS: Token = Token(usize::MAX - 1);
const LISTENER_BASE: usize = usize::MAX - 2;
const KEY_BITS: u32 = 32;
const GEN_BITS: u32 = 24;

/// Token layout: slab key in the low 32 bits, a 24-bit generation (so a stale event for a reused
/// slab key is recognised), the source index in the top 8 bits.
fn token(key: usize, generation: u32, source: usize) -> Token {
    Token(key | ((generation as usize) << KEY_BITS) | (source << (KEY_BITS + GEN_BITS)))
}

fn untoken(t: Token) -> (usize, u32, usize) {
    let key = t.0 & ((1 << KEY_BITS) - 1);
    let generation = ((t.0 >> KEY_BITS) & ((1 << GEN_BITS) - 1)) as u32;
    (key, generation, t.0 >> (KEY_BITS + GEN_BITS))
}

fn is_listener(t: Token) -> Option<usize> {
    (t.0 <= LISTENER_BASE && t.0 > LISTENER_BASE - 64).then(|| LISTENER_BASE - t.0)
}

enum State {
    Idle(Box<dyn Conn>),
    Busy { pending: Events },
}

struct Slot {
    generation: u32,
    state: State,
    armed: [Option<Interest>; MAX_SOURCES],
    last_ready: Instant,
    timer: Option<Instant>,
    /// The earliest deadline queued in the heap for this slot.
    queued: Option<Instant>,
}

struct Job {
    key: usize,
    generation: u32,
    conn: Box<dyn Conn>,
    events: Events,
}

struct Done {
    key: usize,
    generation: u32,
    conn: Box<dyn Conn>,
    step: Step,
}

/// A reactor bound to its listeners, ready to [`run`](Reactor::run).
pub struct Reactor {
    poll: Poll,
    cfg: Config,
    listeners: Vec<TcpListener>,
    handle: Handle,
}

impl Reactor {
    /// Takes already-bound (non-blocking) listeners, e.g. from [`crate::net::listen`].
    pub fn new(cfg: Config, listeners: Vec<std::net::TcpListener>) -> io::Result<Reactor> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let mut ls = Vec::new();
        for (i, l) in listeners.into_iter().enumerate() {
            l.set_nonblocking(true)?;
            let mut l = TcpListener::from_std(l);
            poll.registry()
                .register(&mut l, Token(LISTENER_BASE - i), Interest::READABLE)?;
            ls.push(l);
        }
        let handle = Handle {
            waker,
            stop: Arc::new(AtomicBool::new(false)),
            stats: Arc::default(),
        };
        Ok(Reactor {
            poll,
            cfg,
            listeners: ls,
            handle,
        })
    }

    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Runs until shutdown completes. Worker threads are started here and end with it.
    pub fn run(self, service: Arc<dyn Service>) -> io::Result<()> {
        let (job_tx, job_rx) = crossbeam_channel::unbounded::<Job>();
        let (done_tx, done_rx) = crossbeam_channel::unbounded::<Done>();
        let mut workers = Vec::new();
        for i in 0..self.cfg.workers.max(1) {
            let rx = job_rx.clone();
            let tx = done_tx.clone();
            let waker = self.handle.waker.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("worker-{i}"))
                    .spawn(move || worker(rx, tx, waker))?,
            );
        }
        drop(job_rx);
        drop(done_tx);
        let mut lp = Loop {
            poll: self.poll,
            cfg: self.cfg,
            listeners: self.listeners.into_iter().map(Some).collect(),
            handle: self.handle,
            service,
            slab: Slab::new(),
            timers: Timers::default(),
            job_tx,
            done_rx,
            generation: 0,
            drain_until: None,
            accept_retry: None,
        };
        let result = lp.run();
        // Closing the job channel ends the workers once they finish what they hold.
        drop(lp);
        for w in workers {
            let _ = w.join();
        }
        result
    }
}

fn worker(rx: Receiver<Job>, tx: Sender<Done>, waker: Arc<Waker>) {
    for mut job in rx {
        // A handler bug must cost one connection, not a worker thread and everyone behind it.
        let step = match std::panic::catch_unwind(AssertUnwindSafe(|| job.conn.run(&job.events))) {
            Ok(step) => step,
            Err(_) => {
                log::error!(
                    "connection handler panicked; closing connection {}",
                    job.key
                );
                Step::Close
            }
        };
        let done = Done {
            key: job.key,
            generation: job.generation,
            conn: job.conn,
            step,
        };
        if tx.send(done).is_err() {
            return;
        }
        let _ = waker.wake();
    }
}

struct Loop {
    poll: Poll,
    cfg: Config,
    listeners: Vec<Option<TcpListener>>,
    handle: Handle,
    service: Arc<dyn Service>,
    slab: Slab<Slot>,
    timers: Timers,
    job_tx: Sender<Job>,
    done_rx: Receiver<Done>,
    generation: u32,
    drain_until: Option<Instant>,
    accept_retry: Option<Instant>,
}

impl Loop {
    fn run(&mut self) -> io::Result<()> {
        let mut signals = if self.cfg.handle_signals {
            use signal_hook::consts::{SIGINT, SIGTERM};
            let mut s = signal_hook_mio::v1_0::Signals::new([SIGTERM, SIGINT])?;
            self.poll
                .registry()
                .register(&mut s, SIGNALS, Interest::READABLE)?;
            Some(s)
        } else {
            None
        };
        let mut events = mio::Events::with_capacity(1024);
        loop {
            let timeout = self.poll_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for ev in events.iter() {
                match ev.token() {
                    WAKER => {}
                    SIGNALS => {
                        if let Some(s) = signals.as_mut() {
                            for sig in s.pending() {
                                info!("signal {sig}: shutting down");
                                self.handle.stop.store(true, Ordering::SeqCst);
                            }
                        }
                    }
                    t => match is_listener(t) {
                        Some(i) => self.accept(i),
                        None => self.ready(t, Ready::from_event(ev)),
                    },
                }
            }
            while let Ok(done) = self.done_rx.try_recv() {
                self.finished(done);
            }
            self.fire_timers();
            if self.handle.stop.load(Ordering::SeqCst) && self.drain_until.is_none() {
                self.begin_drain();
            }
            if let Some(until) = self.drain_until {
                if self.slab.is_empty() {
                    info!("all connections closed; exiting");
                    return Ok(());
                }
                if Instant::now() >= until {
                    self.force_close();
                    return Ok(());
                }
            }
        }
    }

    fn poll_timeout(&self) -> Option<Duration> {
        let next = [self.timers.next(), self.drain_until, self.accept_retry]
            .into_iter()
            .flatten()
            .min()?;
        Some(next.saturating_duration_since(Instant::now()))
    }

    fn accept(&mut self, i: usize) {
        loop {
            let Some(listener) = self.listeners.get(i).and_then(Option::as_ref) else {
                return;
            };
            let (stream, peer) = match listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE/ENFILE and friends: the pending connection stays in the backlog and
                    // no new edge will come for it, so retry on a timer instead of spinning.
                    warn!("accept failed: {e}; retrying in 100 ms");
                    self.accept_retry = Some(Instant::now() + Duration::from_millis(100));
                    return;
                }
            };
            let stats = &self.handle.stats;
            if self.slab.len() >= self.cfg.max_connections {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                debug!(
                    "connection limit {} reached; refusing {peer}",
                    self.cfg.max_connections
                );
                self.service.refuse(stream, peer);
                continue;
            }
            let _ = stream.set_nodelay(true);
            let Some(conn) = self.service.accept(stream, peer, i) else {
                continue;
            };
            stats.accepted.fetch_add(1, Ordering::Relaxed);
            stats.active.fetch_add(1, Ordering::Relaxed);
            self.generation = (self.generation + 1) & ((1 << GEN_BITS) - 1);
            let now = Instant::now();
            let key = self.slab.insert(Slot {
                generation: self.generation,
                state: State::Busy {
                    pending: Events::default(),
                },
                armed: [None; MAX_SOURCES],
                last_ready: now,
                timer: None,
                queued: None,
            });
            self.park(key, conn);
        }
    }

    /// A socket event for a connection.
    fn ready(&mut self, t: Token, r: Ready) {
        let (key, generation, source) = untoken(t);
        let Some(slot) = self.slab.get_mut(key) else {
            return;
        };
        if slot.generation != generation {
            return; // stale event for a reused slab key
        }
        slot.last_ready = Instant::now();
        let mut ev = Events {
            draining: self.drain_until.is_some(),
            ..Events::default()
        };
        ev.add(source, r);
        self.dispatch(key, ev);
    }

    /// Hands the connection to a worker, or remembers the events if a worker has it already.
    fn dispatch(&mut self, key: usize, ev: Events) {
        let Some(slot) = self.slab.get_mut(key) else {
            return;
        };
        match &mut slot.state {
            State::Busy { pending } => pending.merge(&ev),
            State::Idle(_) => {
                let State::Idle(conn) = std::mem::replace(
                    &mut slot.state,
                    State::Busy {
                        pending: Events::default(),
                    },
                ) else {
                    unreachable!()
                };
                self.handle.stats.dispatched.fetch_add(1, Ordering::Relaxed);
                let job = Job {
                    key,
                    generation: slot.generation,
                    conn,
                    events: ev,
                };
                if let Err(e) = self.job_tx.send(job) {
                    // Only possible if every worker died; close rather than leak.
                    let mut job = e.into_inner();
                    job.conn.closed(CloseReason::Handler);
                    self.remove(key);
                }
            }
        }
    }

    /// A worker returned a connection.
    fn finished(&mut self, done: Done) {
        let Some(slot) = self.slab.get(done.key) else {
            return;
        };
        if slot.generation != done.generation {
            return;
        }
        if done.step == Step::Close {
            let mut conn = done.conn;
            conn.closed(CloseReason::Handler);
            self.remove(done.key);
            return;
        }
        self.park(done.key, done.conn);
    }

    /// Re-arms a connection's sources and parks it idle, or runs it again at once if events came
    /// in while it was busy.
    fn park(&mut self, key: usize, mut conn: Box<dyn Conn>) {
        let registry = self.poll.registry();
        let slot = &mut self.slab[key];
        let generation = slot.generation;
        let mut seen = [false; MAX_SOURCES];
        let mut failed = None;
        conn.sources(&mut |i, src, want| {
            if i >= MAX_SOURCES {
                failed = Some(io::Error::other("source index out of range"));
                return;
            }
            seen[i] = true;
            if let Err(e) = arm(
                registry,
                src,
                token(key, generation, i),
                slot.armed[i],
                want,
            ) {
                failed = Some(e);
            }
            slot.armed[i] = want;
        });
        for (i, s) in seen.iter().enumerate() {
            if !s {
                slot.armed[i] = None; // the handler dropped it; closing the fd left epoll
            }
        }
        if let Some(e) = failed {
            warn!("cannot arm connection {key}: {e}");
            conn.closed(CloseReason::Register);
            self.remove(key);
            return;
        }
        slot.timer = conn.deadline();
        let next = self.next_deadline(key);
        let slot = &mut self.slab[key];
        if slot.queued.is_none_or(|q| next < q) {
            slot.queued = Some(next);
            self.timers.push(next, key, generation);
        }
        let slot = &mut self.slab[key];
        let pending = match std::mem::replace(&mut slot.state, State::Idle(conn)) {
            State::Busy { pending } => pending,
            State::Idle(_) => Events::default(),
        };
        if !pending.is_empty() {
            self.dispatch(key, pending);
        }
    }

    fn next_deadline(&self, key: usize) -> Instant {
        let slot = &self.slab[key];
        let idle = slot.last_ready + self.cfg.idle_timeout;
        slot.timer.map_or(idle, |t| t.min(idle))
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        if self.accept_retry.is_some_and(|t| t <= now) {
            self.accept_retry = None;
            for i in 0..self.listeners.len() {
                self.accept(i);
            }
        }
        while let Some((key, generation)) = self.timers.pop_due(now) {
            let Some(slot) = self.slab.get_mut(key) else {
                continue;
            };
            if slot.generation != generation {
                continue;
            }
            slot.queued = None;
            let idle_at = slot.last_ready + self.cfg.idle_timeout;
            let busy = matches!(slot.state, State::Busy { .. });
            if idle_at <= now && !busy {
                self.handle
                    .stats
                    .idle_closed
                    .fetch_add(1, Ordering::Relaxed);
                if let Some(Slot {
                    state: State::Idle(mut conn),
                    ..
                }) = self.slab.try_remove(key)
                {
                    debug!(
                        "connection {key} idle for {:?}; closing",
                        self.cfg.idle_timeout
                    );
                    conn.closed(CloseReason::Idle);
                    self.handle.stats.active.fetch_sub(1, Ordering::Relaxed);
                }
                continue;
            }
            if slot.timer.is_some_and(|t| t <= now) {
                slot.timer = None;
                let ev = Events {
                    timer: true,
                    draining: self.drain_until.is_some(),
                    ..Events::default()
                };
                self.dispatch(key, ev);
            }
            // Re-queue at the real next deadline (busy slots are re-queued when they park).
            if let Some(Slot {
                state: State::Idle(_),
                ..
            }) = self.slab.get(key)
            {
                let next = self.next_deadline(key);
                self.slab[key].queued = Some(next);
                self.timers.push(next, key, generation);
            }
        }
    }

    /// Stops accepting and tells every connection to finish up.
    fn begin_drain(&mut self) {
        let until = Instant::now() + self.cfg.shutdown_grace;
        self.drain_until = Some(until);
        for l in self.listeners.iter_mut() {
            if let Some(mut l) = l.take() {
                let _ = self.poll.registry().deregister(&mut l);
            }
        }
        info!(
            "draining {} connection(s) for up to {:?}",
            self.slab.len(),
            self.cfg.shutdown_grace
        );
        let keys: Vec<usize> = self.slab.iter().map(|(k, _)| k).collect();
        for key in keys {
            let ev = Events {
                draining: true,
                timer: true,
                ..Events::default()
            };
            self.dispatch(key, ev);
        }
    }

    fn force_close(&mut self) {
        let n = self.slab.len();
        warn!("shutdown grace period over; closing {n} connection(s)");
        for slot in self.slab.drain() {
            if let State::Idle(mut conn) = slot.state {
                conn.closed(CloseReason::Shutdown);
            }
        }
        self.handle.stats.active.store(0, Ordering::Relaxed);
    }

    fn remove(&mut self, key: usize) {
        if self.slab.try_remove(key).is_some() {
            self.handle.stats.active.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Brings one source's registration from `had` to `want`. Re-registering an armed source is
/// the oneshot re-arm: EPOLL_CTL_MOD re-checks readiness, so nothing that arrived is missed.
fn arm(
    registry: &mio::Registry,
    src: &mut dyn Source,
    t: Token,
    had: Option<Interest>,
    want: Option<Interest>,
) -> io::Result<()> {
    match (had, want) {
        (_, Some(i)) => match registry.reregister(src, t, i) {
            // A new socket in a slot whose old one was closed: register it fresh.
            Err(e) if e.kind() == io::ErrorKind::NotFound => registry.register(src, t, i),
            r => r,
        },
        (Some(_), None) => match registry.deregister(src) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        },
        (None, None) => Ok(()),
    }
}

#[cfg(test)]
mod tests;
