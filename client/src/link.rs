//! A thread's connection with failover and retries (seed 002's client rules):
//!
//! - a session that cannot be opened, or a request that cannot be written, moves to the next
//!   proxy at once (the proxy is marked failed so other threads skip it for a while);
//! - no reply within the timeout, a dropped connection or a garbled reply: reconnect and retry;
//!   after `tries_per_proxy` such failures in a row on one proxy, move to the next proxy;
//! - error replies follow the error table's `Retry` (`ferry_common::proto::ERRORS`): next proxy
//!   (`Upstream`: the proxy reached no upstream) moves on; again (`Busy`, `Io`, `Limit`, `Crc`)
//!   retries after a backoff; outage window (`NoNode`, `Unavailable`) cycles through the proxies
//!   like an outage; the rest are returned to the caller;
//! - every retry waits an exponential backoff with jitter (at most 2 s);
//! - a request gives up after `tries_per_proxy x proxies` attempts, unless its last failure
//!   was an outage: no proxy reachable or answering (all down, hung or restarting at the same
//!   moment), servers restarting behind live proxies (`Upstream`), a group with no online
//!   node. An outage is ridden out by cycling through the list until the outage window
//!   (`outage_window_ms`, 60 s by default) has passed, then it fails with a clear error. A
//!   server's own answer (Busy, Io, Limit, Crc) is no outage: it gets the attempts only;
//! - `NoNode` (a routing proxy found no online node in the user's group) or `Unavailable` (the
//!   cluster's database is down): if the window ends on it, the request fails with that error
//!   (code 23 naming the group, or 24), so the user learns what is down rather than
//!   "unreachable".

use crate::conn::{Conn, Fault};
use crate::error::ClientError;
use crate::rotation::{Proxies, backoff};
use ferry_common::proto::{ErrorBody, ErrorCode, Retry};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What every thread of one transfer shares.
pub struct Shared {
    pub proxies: Proxies,
    /// Makes each connection's HELLO (a fresh token every time).
    pub creds: crate::Credentials,
    /// What the operation's sessions need to do.
    pub scope: ferry_common::token::Scope,
    /// The file the operation is about, named in each HELLO (see `Credentials::hello`).
    pub route: Option<String>,
    pub timeout: Duration,
    pub tries_per_proxy: u32,
    /// How long a request keeps cycling through the proxies before it gives up.
    pub outage_window: Duration,
    /// How `tls://` proxies are verified (built once per client; `None` when none is TLS).
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    pub failovers: AtomicU64,
    pub retries: AtomicU64,
}

impl Shared {
    pub fn max_attempts(&self) -> u32 {
        self.tries_per_proxy
            .saturating_mul(self.proxies.len() as u32)
            .max(3)
    }
}

pub struct Link<'a> {
    shared: &'a Shared,
    cur: usize,
    conn: Option<Conn>,
    /// Consecutive failed tries on the current proxy.
    tries_here: u32,
}

impl<'a> Link<'a> {
    pub fn new(shared: &'a Shared) -> Self {
        Link {
            shared,
            cur: shared.proxies.first(),
            conn: None,
            tries_here: 0,
        }
    }

    /// The proxy this link currently uses.
    pub fn peer(&self) -> &crate::settings::Endpoint {
        self.shared.proxies.get(self.cur)
    }

    fn switch(&mut self) {
        self.conn = None;
        self.tries_here = 0;
        self.shared.proxies.mark_failed(self.cur);
        let next = self.shared.proxies.next_after(self.cur);
        if next != self.cur {
            self.shared.failovers.fetch_add(1, Ordering::Relaxed);
            log::info!(
                "failover {} -> {}",
                self.shared.proxies.get(self.cur),
                self.shared.proxies.get(next)
            );
        }
        self.cur = next;
    }

    fn failed_try(&mut self) {
        self.conn = None;
        self.tries_here += 1;
        if self.tries_here >= self.shared.tries_per_proxy {
            self.switch();
        }
    }

    /// Runs `f` on a live session until it succeeds, fails for good, or the attempts run out.
    /// `f` may run several times (on different connections), so it must be idempotent.
    pub fn call<T>(
        &mut self,
        op: &str,
        mut f: impl FnMut(&mut Conn) -> Result<T, Fault>,
    ) -> Result<T, ClientError> {
        let max = self.shared.max_attempts();
        let started = Instant::now();
        let mut last = String::new();
        let mut attempt = 0u32;
        // Set when a proxy answered `Upstream`: it lives, its servers are (re)starting.
        let mut upstream_down = false;
        // The last failure was an outage (see the module doc), which the window rides out.
        let mut outage = false;
        // The last failure was an outage error reply (`NoNode`, `Unavailable`): the error to
        // give up with.
        let mut outage_reply: Option<ErrorBody> = None;
        // The last failure was bytes that did not verify: an integrity failure if it stays.
        let mut corrupt = false;
        loop {
            if attempt >= max && !(outage && started.elapsed() < self.shared.outage_window) {
                break;
            }
            if attempt > 0 {
                self.shared.retries.fetch_add(1, Ordering::Relaxed);
                // Waiting out a server restart: poll every few hundred ms, not every 2 s.
                let step = if upstream_down {
                    attempt.min(4)
                } else {
                    attempt
                };
                std::thread::sleep(backoff(step));
            }
            attempt += 1;
            // Another thread found this proxy dead a moment ago: do not spend a timeout
            // rediscovering it (even on a connection we still hold) when a proxy that has not
            // failed is available.
            let p = &self.shared.proxies;
            if p.is_cooling(self.cur) {
                let next = p.next_after(self.cur);
                if next != self.cur && !p.is_cooling(next) {
                    self.shared.failovers.fetch_add(1, Ordering::Relaxed);
                    self.conn = None;
                    self.cur = next;
                    self.tries_here = 0;
                }
            }
            if self.conn.is_none() {
                let hello =
                    (self.shared.creds).hello(self.shared.scope, self.shared.route.as_deref())?;
                let tls = self.shared.tls.as_ref();
                match Conn::open(self.peer(), tls, self.shared.timeout, &hello) {
                    Ok(c) => self.conn = Some(c),
                    Err(Fault::Server(e)) if !e.code.retryable() => {
                        return Err(server_error(op, e.code, &e.text, Some(self.peer())));
                    }
                    Err(fault) => {
                        last = fault.describe();
                        corrupt = false;
                        log::debug!("{op}: {last}");
                        outage = fault.is_outage();
                        upstream_down |= fault.is_upstream_down();
                        outage_reply = match fault {
                            Fault::Outage(e) => Some(e),
                            _ => None,
                        };
                        self.switch();
                        continue;
                    }
                }
            }
            let Some(conn) = self.conn.as_mut() else {
                continue;
            };
            let idle = conn.last_reply.elapsed() > self.shared.timeout;
            match f(conn) {
                Ok(v) => {
                    self.tries_here = 0;
                    self.shared.proxies.mark_ok(self.cur);
                    return Ok(v);
                }
                Err(fault) => {
                    last = fault.describe();
                    corrupt = matches!(fault, Fault::Corrupt(_));
                    log::debug!("{op} via {}: {last}", self.peer());
                    outage_reply = None;
                    outage = fault.is_outage();
                    match fault {
                        // The peer closed a long-idle session (its idle timeout): reconnect
                        // to the same proxy before calling it dead.
                        Fault::Send(_) if idle => self.failed_try(),
                        Fault::Connect(_) | Fault::Send(_) | Fault::Tls(_) => self.switch(),
                        Fault::NoUpstream(_) => {
                            upstream_down = true;
                            self.switch()
                        }
                        Fault::Outage(e) => {
                            upstream_down = true;
                            outage_reply = Some(e);
                            self.switch()
                        }
                        Fault::Timeout(_)
                        | Fault::Dropped(_)
                        | Fault::Garbled(_)
                        | Fault::Corrupt(_) => self.failed_try(),
                        Fault::Server(e) => match e.code.info().retry {
                            Retry::NextProxy => {
                                upstream_down = true;
                                self.switch()
                            }
                            Retry::Outage => {
                                upstream_down = true;
                                outage_reply = Some(e);
                                self.switch()
                            }
                            Retry::Again => {}
                            Retry::No => {
                                if e.code.ends_session() {
                                    // The peer closed: we disagree on framing or it refused
                                    // us, and a new session will not help.
                                    self.conn = None;
                                }
                                return Err(server_error(op, e.code, &e.text, Some(self.peer())));
                            }
                        },
                    }
                }
            }
        }
        if let Some(e) = outage_reply {
            return Err(server_error(
                op,
                e.code,
                &format!(
                    "{} (still so after {attempt} attempts in {:.1?})",
                    e.text,
                    started.elapsed()
                ),
                Some(self.peer()),
            ));
        }
        if corrupt {
            return Err(ClientError::Integrity(format!(
                "{op}: {last} (still so after {attempt} attempts)"
            )));
        }
        Err(ClientError::Unreachable {
            op: op.to_owned(),
            attempts: attempt,
            proxies: self.shared.proxies.list(),
            last,
        })
    }
}

/// An error reply that ends the request; `peer`: the proxy (or server) that sent it.
pub fn server_error(
    op: &str,
    code: ErrorCode,
    text: &str,
    peer: Option<&crate::settings::Endpoint>,
) -> ClientError {
    ClientError::Server {
        op: op.to_owned(),
        code,
        text: text.to_owned(),
        peer: peer.map(|p| p.to_string()),
    }
}
