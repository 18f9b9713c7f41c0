//! Reactor tests with an echo service over real loopback sockets.

use super::echo::EchoService;
use super::*;
use rand::RngExt;
use std::io::{Read, Write};
use std::net::TcpStream as StdStream;
use std::sync::atomic::AtomicUsize;

struct Running {
    addr: SocketAddr,
    handle: Handle,
    closed: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<io::Result<()>>>,
}

impl Running {
    fn stop(mut self) -> Duration {
        let t = Instant::now();
        self.handle.shutdown();
        self.thread.take().unwrap().join().unwrap().unwrap();
        t.elapsed()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.handle.shutdown();
            let _ = t.join();
        }
    }
}

fn start(cfg: Config) -> Running {
    let l = crate::net::listen("127.0.0.1:0".parse().unwrap(), 1024).unwrap();
    let r = Reactor::new(cfg, vec![l]).unwrap();
    let addr = r.local_addrs()[0];
    let handle = r.handle();
    let closed = Arc::new(AtomicUsize::new(0));
    let svc = Arc::new(EchoService::new(closed.clone()));
    let thread = Some(std::thread::spawn(move || r.run(svc)));
    Running {
        addr,
        handle,
        closed,
        thread,
    }
}

fn client(addr: SocketAddr) -> StdStream {
    let s = StdStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

#[test]
fn token_round_trip() {
    let t = token(12345, (1 << GEN_BITS) - 1, 3);
    assert_eq!(untoken(t), (12345, (1 << GEN_BITS) - 1, 3));
    assert!(is_listener(t).is_none());
    assert_eq!(is_listener(Token(LISTENER_BASE - 2)), Some(2));
}

#[test]
fn echo_many_concurrent_clients_random_writes() {
    let r = start(Config {
        workers: 3,
        ..Config::default()
    });
    let addr = r.addr;
    let threads: Vec<_> = (0..32)
        .map(|c| {
            std::thread::spawn(move || {
                let mut rng = rand::rng();
                let total = rng.random_range(1..600_000usize);
                let data: Vec<u8> = (0..total).map(|i| (i * 31 + c) as u8).collect();
                let mut s = client(addr);
                let mut reader = s.try_clone().unwrap();
                let expect = data.clone();
                let rd = std::thread::spawn(move || {
                    let mut got = Vec::with_capacity(expect.len());
                    reader.read_to_end(&mut got).unwrap();
                    assert!(
                        got == expect,
                        "client {c}: {} of {} bytes echoed",
                        got.len(),
                        expect.len()
                    );
                });
                let mut pos = 0;
                while pos < data.len() {
                    let n = rng.random_range(1..20_000).min(data.len() - pos);
                    s.write_all(&data[pos..pos + n]).unwrap();
                    pos += n;
                }
                s.shutdown(std::net::Shutdown::Write).unwrap();
                rd.join().unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    r.stop();
}

#[test]
fn tiny_writes_with_pauses_never_hang() {
    // Provokes the lost-wake-up race: each byte arrives just as the worker may be hitting
    // WouldBlock and handing the connection back. A lost edge shows up as a read timeout.
    let r = start(Config {
        workers: 2,
        ..Config::default()
    });
    let addr = r.addr;
    let threads: Vec<_> = (0..8)
        .map(|c| {
            std::thread::spawn(move || {
                let mut rng = rand::rng();
                let mut s = client(addr);
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                for i in 0..300u32 {
                    let b = [(i as u8) ^ (c as u8)];
                    s.write_all(&b).unwrap();
                    let mut got = [0u8; 1];
                    s.read_exact(&mut got)
                        .unwrap_or_else(|e| panic!("client {c} byte {i}: {e}"));
                    assert_eq!(got, b);
                    if rng.random_bool(0.3) {
                        std::thread::sleep(Duration::from_micros(rng.random_range(0..300)));
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    r.stop();
}

#[test]
fn idle_connections_are_closed() {
    let r = start(Config {
        idle_timeout: Duration::from_millis(300),
        ..Config::default()
    });
    let mut s = client(r.addr);
    let t = Instant::now();
    let mut b = [0u8; 1];
    assert_eq!(
        s.read(&mut b).unwrap(),
        0,
        "server closes the idle connection"
    );
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    assert_eq!(r.handle.stats().idle_closed.load(Ordering::SeqCst), 1);
    // An active connection is not idle.
    let mut a = client(r.addr);
    for _ in 0..6 {
        a.write_all(b"x").unwrap();
        a.read_exact(&mut b).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    r.stop();
}

#[test]
fn connection_limit_refuses_without_harming_others() {
    let r = start(Config {
        max_connections: 2,
        ..Config::default()
    });
    let mut a = client(r.addr);
    let mut b = client(r.addr);
    let mut one = [0u8; 1];
    a.write_all(b"a").unwrap();
    a.read_exact(&mut one).unwrap();
    b.write_all(b"b").unwrap();
    b.read_exact(&mut one).unwrap();
    let mut c = client(r.addr);
    let _ = c.write_all(b"c");
    let refused = matches!(c.read(&mut one), Ok(0) | Err(_));
    assert!(refused, "third connection must be closed");
    a.write_all(b"still").unwrap();
    let mut five = [0u8; 5];
    a.read_exact(&mut five).unwrap();
    assert_eq!(&five, b"still");
    assert_eq!(r.handle.stats().refused.load(Ordering::SeqCst), 1);
    r.stop();
}

#[test]
fn per_ip_cap_refuses_one_address_and_frees_its_slots_on_close() {
    let r = start(Config {
        max_per_ip: 2,
        idle_timeout: Duration::from_millis(300),
        ..Config::default()
    });
    let echo = |s: &mut std::net::TcpStream| {
        let mut one = [0u8; 1];
        s.write_all(b"x").is_ok() && s.read_exact(&mut one).is_ok()
    };
    let mut a = client(r.addr);
    let mut b = client(r.addr);
    assert!(echo(&mut a) && echo(&mut b));
    // Loopback is one address: a third connection from it is refused.
    let mut c = client(r.addr);
    let _ = c.write_all(b"c");
    let mut one = [0u8; 1];
    assert!(
        matches!(c.read(&mut one), Ok(0) | Err(_)),
        "third connection refused"
    );
    assert_eq!(r.handle.stats().refused.load(Ordering::SeqCst), 1);
    // A closed connection frees its slot; so does one closed for idleness.
    drop(a);
    std::thread::sleep(Duration::from_millis(100));
    let mut d = client(r.addr);
    assert!(echo(&mut d), "a freed slot is usable");
    std::thread::sleep(Duration::from_millis(700)); // b and d go idle and are closed
    let mut e = client(r.addr);
    let mut f = client(r.addr);
    assert!(echo(&mut e) && echo(&mut f), "idle-closed slots are freed");
    r.stop();
}

#[test]
fn shutdown_stops_accepting_and_drains() {
    let r = start(Config {
        shutdown_grace: Duration::from_secs(3),
        ..Config::default()
    });
    let addr = r.addr;
    let mut s = client(addr);
    s.write_all(b"hi").unwrap();
    let mut two = [0u8; 2];
    s.read_exact(&mut two).unwrap();
    let closed = r.closed.clone();
    let took = r.stop();
    assert!(
        took < Duration::from_secs(3),
        "idle echo connections close at once: {took:?}"
    );
    assert_eq!(closed.load(Ordering::SeqCst), 1);
    assert!(
        StdStream::connect(addr).is_err(),
        "listener is closed after shutdown"
    );
}

#[test]
fn busy_connection_gets_the_grace_period() {
    // A connection that keeps a full buffer (peer never reads) does not close on drain; the
    // reactor waits for the grace period and then closes it.
    let r = start(Config {
        shutdown_grace: Duration::from_millis(500),
        ..Config::default()
    });
    let mut s = client(r.addr);
    s.set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let chunk = vec![7u8; 64 * 1024];
    for _ in 0..200 {
        if s.write_all(&chunk).is_err() {
            break;
        }
    }
    let took = r.stop();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

/// Answers each byte it reads with "T" once a deadline it sets after that run has passed.
struct Delayed {
    sock: TcpStream,
    delay: Duration,
    due: Option<Instant>,
}

impl Conn for Delayed {
    fn run(&mut self, ev: &Events) -> Step {
        if ev.draining {
            return Step::Close;
        }
        if ev.timer && self.due.is_some_and(|d| Instant::now() >= d) {
            self.due = None;
            return match self.sock.write(b"T") {
                Ok(1) => Step::Keep,
                _ => Step::Close,
            };
        }
        let mut b = [0u8; 64];
        loop {
            match self.sock.read(&mut b) {
                Ok(0) => return Step::Close,
                Ok(_) => self.due = Some(Instant::now() + self.delay),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Keep,
                Err(_) => return Step::Close,
            }
        }
    }
    fn sources(&mut self, arm: &mut Arm<'_>) {
        arm(0, &mut self.sock, Some(Interest::READABLE));
    }
    fn deadline(&self) -> Option<Instant> {
        self.due
    }
}

struct DelayedService(Duration);

impl Service for DelayedService {
    fn accept(&self, sock: TcpStream, _: SocketAddr, _: usize) -> Option<Box<dyn Conn>> {
        Some(Box::new(Delayed {
            sock,
            delay: self.0,
            due: None,
        }))
    }
}

#[test]
fn a_deadline_set_on_a_worker_wakes_the_sleeping_poll_thread() {
    // Workers park connections themselves. The poll thread sleeps until the earliest deadline it
    // knows (here the 60 s idle timeout), so a worker that queues an earlier one must wake it.
    let l = crate::net::listen("127.0.0.1:0".parse().unwrap(), 64).unwrap();
    let r = Reactor::new(
        Config {
            workers: 2,
            idle_timeout: Duration::from_secs(60),
            ..Config::default()
        },
        vec![l],
    )
    .unwrap();
    let addr = r.local_addrs()[0];
    let handle = r.handle();
    let delay = Duration::from_millis(200);
    let thread = std::thread::spawn(move || r.run(Arc::new(DelayedService(delay))));
    let mut s = client(addr);
    for round in 0..3 {
        // Let the poll thread settle into its long sleep first.
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        s.write_all(b"x").unwrap();
        let mut got = [0u8; 1];
        s.read_exact(&mut got)
            .unwrap_or_else(|e| panic!("round {round}: no timer answer: {e}"));
        let took = t.elapsed();
        assert_eq!(&got, b"T");
        assert!(
            took >= delay && took < Duration::from_secs(5),
            "round {round}: timer fired after {took:?}, asked for {delay:?}"
        );
    }
    handle.shutdown();
    thread.join().unwrap().unwrap();
}
