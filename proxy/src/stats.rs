//! Counters and the plain-text stats endpoint: connect to `stats_listen` and the proxy writes
//! one `name value` line per counter, then closes (no request is read; `nc HOST PORT` is enough).

use crate::upstream::Upstreams;
use log::{info, warn};
use std::fmt::Write as _;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Process-wide counters, updated by the sessions on the worker threads.
#[derive(Debug, Default)]
pub struct Counters {
    /// Sessions open now (any phase).
    pub sessions_active: AtomicU64,
    /// Sessions accepted since start.
    pub sessions_total: AtomicU64,
    /// Sessions that reached an upstream and relayed.
    pub sessions_relayed: AtomicU64,
    /// Bytes relayed front -> upstream.
    pub bytes_up: AtomicU64,
    /// Bytes relayed upstream -> front.
    pub bytes_down: AtomicU64,
    /// Connect attempts that failed and moved on to the next upstream.
    pub failovers: AtomicU64,
    /// Sessions that went to an upstream other than the primary.
    pub standby_sessions: AtomicU64,
    /// Sessions answered with error 19 because no upstream could be reached.
    pub no_upstream: AtomicU64,
    /// PROBE frames answered by the proxy itself.
    pub probes_answered: AtomicU64,
    /// Sessions refused at the connection limit.
    pub refused: AtomicU64,
    /// Sessions closed for a bad or missing first frame (including the HELLO timeout).
    pub rejected: AtomicU64,
    /// Sessions refused for their link proof (missing, forged, expired or replayed LINK).
    pub link_refused: AtomicU64,
    /// Routing: sessions refused for their HELLO's session token (missing or not valid).
    pub token_refused: AtomicU64,
    /// `[tls]`: sessions whose TLS failed before the HELLO (handshake error, bad record, a
    /// plain-TCP client).
    pub tls_failed: AtomicU64,
    /// Sessions cut because their upstream died mid-session.
    pub upstream_lost: AtomicU64,
    /// Routing: sessions whose route came from the cache.
    pub route_cache_hits: AtomicU64,
    /// Routing: sessions that found no fresh cached route.
    pub route_cache_misses: AtomicU64,
    /// Routing: SADDRS lookups started (cache misses plus refreshes after every node failed).
    pub route_lookups: AtomicU64,
    /// Routing: lookups no tracker answered (the session got error 19).
    pub route_failures: AtomicU64,
    /// Routing: sessions answered with error 23 (the user's group has no online node).
    pub route_no_node: AtomicU64,
    /// Routing: answers a tracker marked stale (given from its last view, database down).
    pub route_stale: AtomicU64,
}

impl Counters {
    /// The stats text: one `name value` line per counter and per upstream.
    pub fn render(&self, ups: &Upstreams, zero_copy: bool) -> String {
        let mut out = String::new();
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        for (name, v) in [
            ("sessions_active", g(&self.sessions_active)),
            ("sessions_total", g(&self.sessions_total)),
            ("sessions_relayed", g(&self.sessions_relayed)),
            ("bytes_up", g(&self.bytes_up)),
            ("bytes_down", g(&self.bytes_down)),
            ("failovers", g(&self.failovers)),
            ("standby_sessions", g(&self.standby_sessions)),
            ("no_upstream", g(&self.no_upstream)),
            ("probes_answered", g(&self.probes_answered)),
            ("refused", g(&self.refused)),
            ("rejected", g(&self.rejected)),
            ("upstream_lost", g(&self.upstream_lost)),
            ("link_refused", g(&self.link_refused)),
            ("token_refused", g(&self.token_refused)),
            ("tls_failed", g(&self.tls_failed)),
            ("route_cache_hits", g(&self.route_cache_hits)),
            ("route_cache_misses", g(&self.route_cache_misses)),
            ("route_lookups", g(&self.route_lookups)),
            ("route_failures", g(&self.route_failures)),
            ("route_no_node", g(&self.route_no_node)),
            ("route_stale", g(&self.route_stale)),
            ("zero_copy", zero_copy as u64),
        ] {
            let _ = writeln!(out, "{name} {v}");
        }
        for (i, u) in ups.all().iter().enumerate() {
            let role = if i == 0 { "primary" } else { "standby" };
            let _ = writeln!(
                out,
                "upstream_up{{addr=\"{}\",role=\"{role}\"}} {}",
                u.addr,
                u.is_up() as u8
            );
            let _ = writeln!(
                out,
                "upstream_probes_failed{{addr=\"{}\"}} {}",
                u.addr,
                u.probes_failed.load(Ordering::Relaxed)
            );
        }
        out
    }
}

/// The stats listener thread; stopped when dropped.
pub struct StatsServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StatsServer {
    pub fn start(
        addr: SocketAddr,
        counters: Arc<Counters>,
        ups: Arc<Upstreams>,
        zero_copy: bool,
    ) -> std::io::Result<StatsServer> {
        let l = TcpListener::bind(addr)
            .map_err(|e| std::io::Error::new(e.kind(), format!("stats_listen {addr}: {e}")))?;
        // Non-blocking so the thread can notice the stop flag.
        l.set_nonblocking(true)?;
        let addr = l.local_addr()?;
        info!("stats on {addr}");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("stats".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((mut s, _)) => {
                            let text = counters.render(&ups, zero_copy);
                            let _ = s.set_nonblocking(false);
                            let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
                            let _ = s.write_all(text.as_bytes());
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(e) => {
                            warn!("stats accept failed: {e}");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })?;
        Ok(StatsServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for StatsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
