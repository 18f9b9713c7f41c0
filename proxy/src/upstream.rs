//! The upstream list (primary first, then standbys) and its health: each upstream is probed with
//! a PROBE frame every `check_interval` by its own thread, and marked up or down with HAProxy's
//! hysteresis: down after `fall` failed probes in a row, up after `rise` good ones. A probe only
//! counts as good if a ferry proxy or server answers with a valid identity, so a port that is
//! merely open (or held by another program) does not count.

use ferry_common::proto::{self, Identity};
use log::{info, warn};
use parking_lot::Mutex;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Up/down state with rise/fall hysteresis.
#[derive(Debug, Clone)]
pub struct Hysteresis {
    rise: u32,
    fall: u32,
    up: bool,
    /// Consecutive results that disagree with the current state.
    streak: u32,
}

impl Hysteresis {
    /// Starts up, as HAProxy does: an upstream is trusted until `fall` probes fail.
    pub fn new(rise: u32, fall: u32) -> Self {
        Hysteresis {
            rise: rise.max(1),
            fall: fall.max(1),
            up: true,
            streak: 0,
        }
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Records one probe result; returns the new state if it changed.
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        if ok == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.up { self.fall } else { self.rise };
        if self.streak >= needed {
            self.up = ok;
            self.streak = 0;
            Some(ok)
        } else {
            None
        }
    }
}

/// One upstream and what the health check knows about it.
pub struct Upstream {
    pub addr: SocketAddr,
    up: AtomicBool,
    state: Mutex<Hysteresis>,
    pub probes_failed: AtomicU64,
}

impl Upstream {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn record(&self, result: Result<Identity, String>) {
        let ok = result.is_ok();
        if !ok {
            self.probes_failed.fetch_add(1, Ordering::Relaxed);
        }
        let change = self.state.lock().record(ok);
        if let Some(up) = change {
            self.up.store(up, Ordering::Relaxed);
            match result {
                Ok(id) => info!(
                    "upstream {} is UP ({:?} v{})",
                    self.addr, id.role, id.version
                ),
                Err(why) => warn!("upstream {} is DOWN: {why}", self.addr),
            }
        }
    }
}

/// The ordered upstream list shared by all sessions and the health checkers.
pub struct Upstreams {
    list: Vec<Upstream>,
}

impl Upstreams {
    pub fn new(addrs: &[SocketAddr], rise: u32, fall: u32) -> Self {
        Upstreams {
            list: addrs
                .iter()
                .map(|&addr| Upstream {
                    addr,
                    up: AtomicBool::new(true),
                    state: Mutex::new(Hysteresis::new(rise, fall)),
                    probes_failed: AtomicU64::new(0),
                })
                .collect(),
        }
    }

    pub fn all(&self) -> &[Upstream] {
        &self.list
    }

    pub fn get(&self, i: usize) -> Option<&Upstream> {
        self.list.get(i)
    }

    /// The order a new session tries upstreams in: those marked up in list order (so the
    /// primary wins as soon as it is up again: failback), then those marked down, as a last
    /// resort, since the health state can lag behind reality by a few check periods.
    pub fn order(&self) -> Vec<usize> {
        let up = (0..self.list.len()).filter(|&i| self.list[i].is_up());
        let down = (0..self.list.len()).filter(|&i| !self.list[i].is_up());
        up.chain(down).collect()
    }
}

/// Sends a PROBE and checks the answer is a ferry identity of a compatible version.
pub fn probe(addr: SocketAddr, timeout: Duration) -> Result<Identity, String> {
    let id = proto::probe(addr, timeout).map_err(|e| e.to_string())?;
    if id.version != proto::VERSION {
        return Err(format!("speaks protocol version {}", id.version));
    }
    Ok(id)
}

/// Health checker threads, one per upstream; stopped when dropped.
pub struct Checker {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Checker {
    pub fn start(ups: Arc<Upstreams>, interval: Duration, timeout: Duration) -> Checker {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..ups.all().len())
            .filter_map(|i| {
                let ups = ups.clone();
                let stop = stop.clone();
                std::thread::Builder::new()
                    .name(format!("health-{i}"))
                    .spawn(move || check_loop(&ups, i, interval, timeout, &stop))
                    .map_err(|e| warn!("cannot start health checker {i}: {e}"))
                    .ok()
            })
            .collect();
        Checker { stop, threads }
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn check_loop(ups: &Upstreams, i: usize, interval: Duration, timeout: Duration, stop: &AtomicBool) {
    let Some(up) = ups.get(i) else { return };
    // A probe never takes longer than one period, so results stay one per period.
    let timeout = timeout.min(interval);
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now < next {
            std::thread::sleep((next - now).min(Duration::from_millis(50)));
            continue;
        }
        next = now + interval;
        up.record(probe(up.addr, timeout));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_common::proto::{Role, cmd};
    use std::io::{Read, Write};

    #[test]
    fn hysteresis_follows_rise_and_fall() {
        let mut h = Hysteresis::new(2, 3);
        assert!(h.is_up());
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), None);
        // A success in between resets the count.
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), Some(false));
        assert!(!h.is_up());
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(true), Some(true));
        assert!(h.is_up());
    }

    #[test]
    fn order_prefers_up_upstreams_in_list_order() {
        let addrs: Vec<SocketAddr> = (1..=3)
            .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
            .collect();
        let ups = Upstreams::new(&addrs, 1, 1);
        assert_eq!(ups.order(), vec![0, 1, 2]);
        ups.list[0].record(Err("down".into()));
        assert!(!ups.list[0].is_up());
        assert_eq!(ups.order(), vec![1, 2, 0]);
        ups.list[0].record(Ok(Identity {
            version: proto::VERSION,
            role: Role::Server,
        }));
        assert_eq!(ups.order(), vec![0, 1, 2]);
    }

    #[test]
    fn probe_needs_a_ferry_identity_not_just_an_open_port() {
        // A port that accepts and answers garbage.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut b = [0u8; 12];
            let _ = s.read_exact(&mut b);
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        });
        assert!(probe(addr, Duration::from_secs(2)).is_err());
        t.join().unwrap();
        // A closed port.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(probe(closed, Duration::from_millis(500)).is_err());
        // A real identity.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut b = [0u8; 12];
            s.read_exact(&mut b).unwrap();
            let id = Identity {
                version: proto::VERSION,
                role: Role::Server,
            };
            s.write_all(&proto::frame(cmd::REPLY_STORAGE, 0, &id.encode()))
                .unwrap();
        });
        assert_eq!(
            probe(addr, Duration::from_secs(2)).unwrap().role,
            Role::Server
        );
        t.join().unwrap();
    }
}
