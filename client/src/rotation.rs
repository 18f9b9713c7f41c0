//! Which proxy to use next (seed 002's failover): round robin over the list, skipping proxies that
//! failed a moment ago, with exponential backoff and jitter between attempts.
//!
//! One [`Proxies`] is shared by all threads of a transfer, so when one thread finds a proxy dead
//! the others skip it too on their next connect instead of rediscovering it one timeout each.

use crate::settings::Endpoint;
use parking_lot::Mutex;
use rand::RngExt;
use std::time::{Duration, Instant};

/// How long a failed proxy is skipped when others are available.
pub const COOLDOWN: Duration = Duration::from_secs(5);
const BACKOFF_BASE: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

pub struct Proxies {
    addrs: Vec<Endpoint>,
    failed_at: Mutex<Vec<Option<Instant>>>,
}

impl Proxies {
    pub fn new(addrs: Vec<Endpoint>) -> Self {
        let n = addrs.len();
        Proxies {
            addrs,
            failed_at: Mutex::new(vec![None; n]),
        }
    }

    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }

    pub fn get(&self, i: usize) -> &Endpoint {
        &self.addrs[i % self.addrs.len()]
    }

    pub fn list(&self) -> String {
        self.addrs
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The first proxy a new thread should use: the first in list order that is not cooling down.
    pub fn first(&self) -> usize {
        self.pick(self.addrs.len() - 1, Instant::now())
    }

    pub fn mark_failed(&self, i: usize) {
        self.failed_at.lock()[i] = Some(Instant::now());
    }

    /// Whether `i` failed within the cooldown (possibly seen by another thread).
    pub fn is_cooling(&self, i: usize) -> bool {
        self.failed_at.lock()[i].is_some_and(|t| t.elapsed() < COOLDOWN)
    }

    pub fn mark_ok(&self, i: usize) {
        self.failed_at.lock()[i] = None;
    }

    /// The proxy after `cur` in round-robin order, skipping those that failed within the
    /// cooldown. When every proxy failed recently, the one that failed longest ago.
    pub fn next_after(&self, cur: usize) -> usize {
        self.pick(cur, Instant::now())
    }

    fn pick(&self, cur: usize, now: Instant) -> usize {
        let failed = self.failed_at.lock();
        let n = failed.len();
        let order = (1..=n).map(|k| (cur + k) % n);
        let fresh = |i: &usize| match failed[*i] {
            None => true,
            Some(t) => now.duration_since(t) >= COOLDOWN,
        };
        if let Some(i) = order.clone().find(fresh) {
            return i;
        }
        order.min_by_key(|&i| failed[i].unwrap_or(now)).unwrap_or(0)
    }
}

/// Sleep before attempt number `attempt` (1 = the first retry): base x 2^(attempt-1), capped,
/// with +-50% jitter so threads that failed together do not retry together.
pub fn backoff(attempt: u32) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let d = exp.min(BACKOFF_MAX);
    let jitter: f64 = rand::rng().random_range(0.5..1.5);
    d.mul_f64(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> Proxies {
        Proxies::new(
            ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
                .iter()
                .map(|a| Endpoint::plain(a.parse().unwrap()))
                .collect(),
        )
    }

    #[test]
    fn round_robin_skips_recent_failures() {
        let p = three();
        assert_eq!(p.first(), 0);
        assert_eq!(p.next_after(0), 1);
        assert_eq!(p.next_after(2), 0);
        p.mark_failed(1);
        assert!(p.is_cooling(1) && !p.is_cooling(0));
        assert_eq!(p.next_after(0), 2, "1 failed just now");
        p.mark_failed(0);
        assert_eq!(p.first(), 2);
        p.mark_ok(1);
        assert_eq!(p.next_after(2), 1);
    }

    #[test]
    fn all_failed_picks_the_oldest_failure() {
        let p = three();
        p.mark_failed(2);
        std::thread::sleep(Duration::from_millis(2));
        p.mark_failed(0);
        std::thread::sleep(Duration::from_millis(2));
        p.mark_failed(1);
        assert_eq!(p.next_after(1), 2);
        assert_eq!(p.next_after(0), 2);
        // Cooldown expiry makes a proxy eligible again in list order.
        let later = Instant::now() + COOLDOWN;
        assert_eq!(p.pick(1, later), 2);
        assert_eq!(p.pick(2, later), 0);
    }

    #[test]
    fn single_proxy_is_always_chosen() {
        let p = Proxies::new(vec![Endpoint::plain("127.0.0.1:1".parse().unwrap())]);
        p.mark_failed(0);
        assert_eq!(p.next_after(0), 0);
        assert_eq!(p.first(), 0);
    }

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        for _ in 0..50 {
            let b1 = backoff(1);
            assert!(
                b1 >= BACKOFF_BASE / 2 && b1 <= BACKOFF_BASE * 3 / 2,
                "{b1:?}"
            );
            let b4 = backoff(4);
            assert!(b4 >= BACKOFF_BASE * 4 && b4 <= BACKOFF_BASE * 12, "{b4:?}");
            assert!(backoff(40) <= BACKOFF_MAX * 3 / 2);
        }
    }
}
