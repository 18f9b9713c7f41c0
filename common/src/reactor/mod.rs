//! The reactor: one mio `Poll` thread and N worker threads.
//!
//! mio registers every source edge-triggered and has no EPOLLONESHOT, so oneshot semantics are
//! kept here, by ownership: a connection is either *idle* (parked in the slab, armed in epoll) or
//! *busy* (moved, as a `Box<dyn Conn>`, to exactly one worker through a crossbeam channel). A
//! worker runs the handler until its sockets say WouldBlock, then parks the connection itself:
//! under the lock that guards the slab it re-arms every source with `reregister` (EPOLL_CTL_MOD,
//! which re-checks readiness and queues a fresh event if data arrived meanwhile). Events that
//! arrive while a connection is busy are merged into its `pending` set; the worker that parks it
//! runs it again at once (or queues it, when other connections wait for a worker), so no
//! readiness is lost and no connection is ever run by two workers at once. Parking on the worker
//! rather than handing the connection back to the poll thread saves a thread wake-up per run
//! (the poll thread is woken only for an earlier deadline or the end of a drain).
//!
//! The reactor also owns: non-blocking accept with a connection limit, idle timeouts and
//! per-connection deadlines on a deadline heap, a `Waker` for workers and for shutdown, and
//! SIGTERM/SIGINT handling (stop accepting, let connections drain up to a deadline, exit) and
//! SIGHUP (the service's `reload`).

pub mod echo;
mod events;
mod timers;

pub use events::{Events, MAX_SOURCES, Ready};

use crossbeam_channel::{Receiver, Sender};
use log::{debug, info, warn};
use mio::event::Source;
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Poll, Registry, Token, Waker};
use parking_lot::Mutex;
use slab::Slab;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
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

    /// The last run left every source it reports with an unchanged interest drained: read (or
    /// written) until WouldBlock, or a short read that emptied the socket. Such a source is not
    /// re-armed (no EPOLL_CTL_MOD): its edge-triggered registration reports the next readiness by
    /// itself, and readiness that comes while the connection runs is merged into its pending
    /// events. The default, `false`, re-arms every source, so the kernel re-checks readiness
    /// (needed by a run that stops early with work left, e.g. a spent write budget).
    fn settled(&self) -> bool {
        false
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

    /// SIGHUP (with `handle_signals`): reread what can change without a restart (the
    /// client-proxy's TLS certificate). Runs on the accept thread; keep it short.
    fn reload(&self) {
        info!("SIGHUP: nothing to reload");
    }
}

/// Reactor settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub workers: usize,
    pub max_connections: usize,
    /// Most connections from one peer IP address to one listener (0: no cap); beyond it the
    /// service's `refuse` answers, as for `max_connections`, so one client cannot take every
    /// slot.
    pub max_per_ip: usize,
    /// A connection with no readiness for this long is closed.
    pub idle_timeout: Duration,
    /// How long in-flight connections may run after SIGTERM (or [`Handle::shutdown`]).
    pub shutdown_grace: Duration,
    /// Install SIGTERM/SIGINT/SIGHUP handlers (binaries yes, in-process tests no).
    pub handle_signals: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            workers: 4,
            max_connections: 4096,
            max_per_ip: 0,
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
    /// The listener and peer address, counted in `Core::per_ip` while the slot lives.
    peer: (usize, IpAddr),
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
        let (job_tx, job_rx) = crossbeam_channel::unbounded::<Msg>();
        let shared = Arc::new(Shared {
            core: Mutex::new(Core {
                slab: Slab::new(),
                per_ip: HashMap::new(),
                timers: Timers::default(),
                drain_until: None,
                poll_until: None,
            }),
            registry: self.poll.registry().try_clone()?,
            jobs: job_tx,
            waker: self.handle.waker.clone(),
            stats: self.handle.stats.clone(),
            idle_timeout: self.cfg.idle_timeout,
        });
        let n = self.cfg.workers.max(1);
        let mut workers = Vec::new();
        for i in 0..n {
            let rx = job_rx.clone();
            let sh = shared.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("worker-{i}"))
                    .spawn(move || worker(&sh, &rx))?,
            );
        }
        drop(job_rx);
        let mut lp = Loop {
            poll: self.poll,
            cfg: self.cfg,
            listeners: self.listeners.into_iter().map(Some).collect(),
            handle: self.handle,
            service,
            shared: shared.clone(),
            generation: 0,
            accept_retry: None,
        };
        let result = lp.run();
        // Every worker ends once it has finished what was queued before this message.
        for _ in 0..n {
            let _ = shared.jobs.send(Msg::Exit);
        }
        drop(lp);
        for w in workers {
            let _ = w.join();
        }
        result
    }
}

/// What the job channel carries.
enum Msg {
    Run(Job),
    Exit,
}

/// State shared by the poll thread and the workers: the slab and the deadline heap behind one
/// lock, held only for bookkeeping (never while a handler runs).
struct Shared {
    core: Mutex<Core>,
    /// A clone of the poll's registry: workers re-arm the connections they finish themselves.
    registry: Registry,
    jobs: Sender<Msg>,
    waker: Arc<Waker>,
    stats: Arc<Stats>,
    idle_timeout: Duration,
}

struct Core {
    slab: Slab<Slot>,
    /// Live connections per listener and peer address (only when `max_per_ip` is set): each
    /// listener counts its own, so one address's connections to one (an HTTP gateway's
    /// players) cannot use up its allowance on another (the binary protocol's proxies).
    per_ip: HashMap<(usize, IpAddr), usize>,
    timers: Timers,
    drain_until: Option<Instant>,
    /// The deadline the poll thread last planned to wake at (`None`: no deadline, it waits for
    /// events only). A worker that queues an earlier deadline wakes it.
    poll_until: Option<Instant>,
}

fn worker(sh: &Shared, rx: &Receiver<Msg>) {
    while let Ok(Msg::Run(mut job)) = rx.recv() {
        loop {
            // A handler bug must cost one connection, not a worker thread and everyone behind it.
            let step =
                match std::panic::catch_unwind(AssertUnwindSafe(|| job.conn.run(&job.events))) {
                    Ok(step) => step,
                    Err(_) => {
                        log::error!(
                            "connection handler panicked; closing connection {}",
                            job.key
                        );
                        Step::Close
                    }
                };
            // Events that came in while it ran are served here at once when no other
            // connection is waiting for a worker; otherwise it queues behind them.
            match sh.finished(job, step, rx.is_empty()) {
                Some(next) => job = next,
                None => break,
            }
        }
    }
}

impl Shared {
    fn wake(&self) {
        if let Err(e) = self.waker.wake() {
            warn!("cannot wake the poll thread: {e}");
        }
    }

    /// A worker is done with a connection: close it, or re-arm and park it. Returns the
    /// connection again when it must run at once and `inline` allows this worker to do it.
    fn finished(&self, job: Job, step: Step, inline: bool) -> Option<Job> {
        let mut core = self.core.lock();
        let slot = core.slab.get(job.key)?;
        if slot.generation != job.generation {
            return None;
        }
        if step == Step::Close {
            self.remove(&mut core, job.key);
            drop(core);
            let mut conn = job.conn;
            conn.closed(CloseReason::Handler);
            return None;
        }
        self.park(&mut core, job.key, job.conn, inline)
    }

    /// Re-arms a connection's sources and parks it idle, or runs it again at once if events came
    /// in while it was busy (returned to the caller when `inline`, else queued).
    fn park(
        &self,
        core: &mut Core,
        key: usize,
        mut conn: Box<dyn Conn>,
        inline: bool,
    ) -> Option<Job> {
        let slot = &mut core.slab[key];
        let generation = slot.generation;
        let mut seen = [false; MAX_SOURCES];
        let mut failed = None;
        let settled = conn.settled();
        conn.sources(&mut |i, src, want| {
            if i >= MAX_SOURCES {
                failed = Some(io::Error::other("source index out of range"));
                return;
            }
            seen[i] = true;
            if settled && want.is_some() && slot.armed[i] == want {
                return;
            }
            if let Err(e) = arm(
                &self.registry,
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
            self.remove(core, key);
            return None;
        }
        slot.timer = conn.deadline();
        let next = next_deadline(slot, self.idle_timeout);
        if slot.queued.is_none_or(|q| next < q) {
            slot.queued = Some(next);
            core.timers.push(next, key, generation);
            if core.poll_until.is_none_or(|p| next < p) {
                core.poll_until = Some(next);
                self.wake();
            }
        }
        let slot = &mut core.slab[key];
        let pending = match std::mem::replace(&mut slot.state, State::Idle(conn)) {
            State::Busy { pending } => pending,
            State::Idle(_) => Events::default(),
        };
        if pending.is_empty() {
            return None;
        }
        let job = self.take(core, key, pending)?;
        if inline {
            return Some(job);
        }
        self.send(core, job);
        None
    }

    /// Marks an idle slot busy and returns its job, or merges the events if a worker has it.
    fn take(&self, core: &mut Core, key: usize, ev: Events) -> Option<Job> {
        let slot = core.slab.get_mut(key)?;
        match &mut slot.state {
            State::Busy { pending } => {
                pending.merge(&ev);
                None
            }
            State::Idle(_) => {
                let State::Idle(conn) = std::mem::replace(
                    &mut slot.state,
                    State::Busy {
                        pending: Events::default(),
                    },
                ) else {
                    unreachable!()
                };
                self.stats.dispatched.fetch_add(1, Ordering::Relaxed);
                Some(Job {
                    key,
                    generation: slot.generation,
                    conn,
                    events: ev,
                })
            }
        }
    }

    /// Hands the connection to a worker, or remembers the events if a worker has it already.
    fn dispatch(&self, core: &mut Core, key: usize, ev: Events) {
        if let Some(job) = self.take(core, key, ev) {
            self.send(core, job);
        }
    }

    fn send(&self, core: &mut Core, job: Job) {
        if let Err(e) = self.jobs.send(Msg::Run(job)) {
            // Only possible once the workers are gone; close rather than leak.
            if let Msg::Run(mut job) = e.into_inner() {
                job.conn.closed(CloseReason::Handler);
                self.remove(core, job.key);
            }
        }
    }

    /// [`Shared::send`] without the lock held (taken again only if the workers are gone).
    fn send_unlocked(&self, job: Job) {
        if let Err(e) = self.jobs.send(Msg::Run(job))
            && let Msg::Run(mut job) = e.into_inner()
        {
            job.conn.closed(CloseReason::Handler);
            let mut core = self.core.lock();
            if core
                .slab
                .get(job.key)
                .is_some_and(|s| s.generation == job.generation)
            {
                self.remove(&mut core, job.key);
            }
        }
    }

    fn remove(&self, core: &mut Core, key: usize) {
        if let Some(slot) = core.slab.try_remove(key) {
            core.forget_peer(slot.peer);
            self.stats.active.fetch_sub(1, Ordering::Relaxed);
            // A draining poll thread waits for the slab to empty.
            if core.drain_until.is_some() && core.slab.is_empty() {
                self.wake();
            }
        }
    }
}

impl Core {
    fn forget_peer(&mut self, peer: (usize, IpAddr)) {
        if let Some(n) = self.per_ip.get_mut(&peer) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&peer);
            }
        }
    }
}

fn next_deadline(slot: &Slot, idle_timeout: Duration) -> Instant {
    let idle = slot.last_ready + idle_timeout;
    slot.timer.map_or(idle, |t| t.min(idle))
}

struct Loop {
    poll: Poll,
    cfg: Config,
    listeners: Vec<Option<TcpListener>>,
    handle: Handle,
    service: Arc<dyn Service>,
    shared: Arc<Shared>,
    generation: u32,
    accept_retry: Option<Instant>,
}

impl Loop {
    fn run(&mut self) -> io::Result<()> {
        let mut signals = if self.cfg.handle_signals {
            use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
            let mut s = signal_hook_mio::v1_0::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
            self.poll
                .registry()
                .register(&mut s, SIGNALS, Interest::READABLE)?;
            Some(s)
        } else {
            None
        };
        let mut events = mio::Events::with_capacity(1024);
        let shared = self.shared.clone();
        let mut jobs = Vec::new();
        loop {
            let timeout = self.poll_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let mut accept = Vec::new();
            {
                let mut core = shared.core.lock();
                let now = Instant::now();
                for ev in events.iter() {
                    match ev.token() {
                        WAKER => {}
                        SIGNALS => {
                            if let Some(s) = signals.as_mut() {
                                for sig in s.pending() {
                                    if sig == signal_hook::consts::SIGHUP {
                                        self.service.reload();
                                        continue;
                                    }
                                    info!("signal {sig}: shutting down");
                                    self.handle.stop.store(true, Ordering::SeqCst);
                                }
                            }
                        }
                        t => match is_listener(t) {
                            Some(i) => accept.push(i),
                            None => jobs.extend(ready(
                                &shared,
                                &mut core,
                                t,
                                Ready::from_event(ev),
                                now,
                            )),
                        },
                    }
                }
            }
            // Handed to the workers after the lock is released: a send may wake a worker (a
            // futex syscall), and workers parking connections wait for this lock.
            for job in jobs.drain(..) {
                shared.send_unlocked(job);
            }
            for i in accept {
                self.accept(i);
            }
            self.fire_timers();
            let mut core = shared.core.lock();
            if self.handle.stop.load(Ordering::SeqCst) && core.drain_until.is_none() {
                self.begin_drain(&mut core);
            }
            if let Some(until) = core.drain_until {
                if core.slab.is_empty() {
                    info!("all connections closed; exiting");
                    return Ok(());
                }
                if Instant::now() >= until {
                    self.force_close(&mut core);
                    return Ok(());
                }
            }
        }
    }

    /// How long to sleep in `poll`; also tells the workers when this thread will wake.
    fn poll_timeout(&self) -> Option<Duration> {
        let mut core = self.shared.core.lock();
        let next = [core.timers.next(), core.drain_until, self.accept_retry]
            .into_iter()
            .flatten()
            .min();
        core.poll_until = next;
        Some(next?.saturating_duration_since(Instant::now()))
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
            let (total, from_peer) = {
                let core = self.shared.core.lock();
                let n = core.per_ip.get(&(i, peer.ip())).copied().unwrap_or(0);
                (core.slab.len(), n)
            };
            let per_ip = self.cfg.max_per_ip;
            if total >= self.cfg.max_connections || (per_ip > 0 && from_peer >= per_ip) {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                debug!(
                    "connection limit reached ({total} of {}, {from_peer} of {per_ip} from {}); \
                     refusing {peer}",
                    self.cfg.max_connections,
                    peer.ip()
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
            let shared = &self.shared;
            let mut core = shared.core.lock();
            if per_ip > 0 {
                *core.per_ip.entry((i, peer.ip())).or_insert(0) += 1;
            }
            let key = core.slab.insert(Slot {
                generation: self.generation,
                peer: (i, peer.ip()),
                state: State::Busy {
                    pending: Events::default(),
                },
                armed: [None; MAX_SOURCES],
                last_ready: Instant::now(),
                timer: None,
                queued: None,
            });
            shared.park(&mut core, key, conn, false);
        }
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        if self.accept_retry.is_some_and(|t| t <= now) {
            self.accept_retry = None;
            for i in 0..self.listeners.len() {
                self.accept(i);
            }
        }
        let shared = self.shared.clone();
        let mut closing = Vec::new();
        let mut core = shared.core.lock();
        let idle_timeout = self.cfg.idle_timeout;
        while let Some((key, generation)) = core.timers.pop_due(now) {
            let draining = core.drain_until.is_some();
            let Some(slot) = core.slab.get_mut(key) else {
                continue;
            };
            if slot.generation != generation {
                continue;
            }
            slot.queued = None;
            let idle_at = slot.last_ready + idle_timeout;
            let busy = matches!(slot.state, State::Busy { .. });
            if idle_at <= now && !busy {
                shared.stats.idle_closed.fetch_add(1, Ordering::Relaxed);
                if let Some(Slot {
                    state: State::Idle(conn),
                    peer,
                    ..
                }) = core.slab.try_remove(key)
                {
                    core.forget_peer(peer);
                    debug!("connection {key} idle for {idle_timeout:?}; closing");
                    closing.push(conn);
                    shared.stats.active.fetch_sub(1, Ordering::Relaxed);
                }
                continue;
            }
            if slot.timer.is_some_and(|t| t <= now) {
                slot.timer = None;
                let ev = Events {
                    timer: true,
                    draining,
                    ..Events::default()
                };
                shared.dispatch(&mut core, key, ev);
            }
            // Re-queue at the real next deadline (busy slots are re-queued when they park).
            if let Some(slot) = core.slab.get_mut(key)
                && matches!(slot.state, State::Idle(_))
            {
                let next = next_deadline(slot, idle_timeout);
                slot.queued = Some(next);
                core.timers.push(next, key, generation);
            }
        }
        drop(core);
        for mut conn in closing {
            conn.closed(CloseReason::Idle);
        }
    }

    /// Stops accepting and tells every connection to finish up.
    fn begin_drain(&mut self, core: &mut Core) {
        let until = Instant::now() + self.cfg.shutdown_grace;
        core.drain_until = Some(until);
        for l in self.listeners.iter_mut() {
            if let Some(mut l) = l.take() {
                let _ = self.poll.registry().deregister(&mut l);
            }
        }
        info!(
            "draining {} connection(s) for up to {:?}",
            core.slab.len(),
            self.cfg.shutdown_grace
        );
        let keys: Vec<usize> = core.slab.iter().map(|(k, _)| k).collect();
        for key in keys {
            let ev = Events {
                draining: true,
                timer: true,
                ..Events::default()
            };
            self.shared.dispatch(core, key, ev);
        }
    }

    fn force_close(&mut self, core: &mut Core) {
        let n = core.slab.len();
        warn!("shutdown grace period over; closing {n} connection(s)");
        // Busy connections are dropped by their workers, who no longer find their slot.
        for slot in core.slab.drain() {
            if let State::Idle(mut conn) = slot.state {
                conn.closed(CloseReason::Shutdown);
            }
        }
        self.handle.stats.active.store(0, Ordering::Relaxed);
    }
}

/// A socket event for a connection: its job when a worker must run it now (`None` when the
/// event is stale or merged into a busy connection's pending set).
fn ready(shared: &Shared, core: &mut Core, t: Token, r: Ready, now: Instant) -> Option<Job> {
    let (key, generation, source) = untoken(t);
    let draining = core.drain_until.is_some();
    let slot = core.slab.get_mut(key)?;
    if slot.generation != generation {
        return None; // stale event for a reused slab key
    }
    slot.last_ready = now;
    let mut ev = Events {
        draining,
        ..Events::default()
    };
    ev.add(source, r);
    shared.take(core, key, ev)
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
