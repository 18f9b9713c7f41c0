//! File ids and paths (seed 004).
//!
//! Numeric ids come from an [`IdAllocator`]: in all-in-one mode a [`StepAllocator`] that counts
//! in memory and reserves ranges ("steps") in the metadata DB, so a restart starts after the
//! last reserved range and never repeats an id (deleted ids included). The file id a client sees
//! is the numeric id plus random characters, so ids cannot be guessed from one another. The
//! path is derived from the numeric id only: `data/aaa/bbb/ccc/<timestamp>_ddd`, where aaa..ddd
//! are the id's base-512 digits.

use crate::meta::MetaStore;
use anyhow::Result;
use parking_lot::{Condvar, Mutex, MutexGuard};
use rand::RngExt;
use std::sync::Arc;

/// Hands out numeric file ids, never the same one twice (across restarts too).
pub trait IdAllocator: Send + Sync {
    fn next_id(&self) -> Result<u64>;
}

/// seed 004's id allocation, inside each storage node: memory increments, DB steps. The next step is reserved ahead, once half
/// of the current one is handed out, by the request that crosses that mark and without holding
/// the lock; so the others keep taking ids from memory while the database works, and a stream
/// of single ids rarely waits for a reservation.
pub struct StepAllocator {
    meta: Arc<dyn MetaStore>,
    key: String,
    step: u64,
    state: Mutex<Steps>,
    /// Signalled when a reservation ends (ok or not).
    reserved: Condvar,
}

#[derive(Default)]
struct Steps {
    /// Ids `cur.0 .. cur.1` are free to hand out.
    cur: (u64, u64),
    /// The step reserved ahead.
    next: Option<(u64, u64)>,
    /// A reservation is running (by some caller, outside the lock).
    reserving: bool,
}

impl StepAllocator {
    pub fn new(meta: Arc<dyn MetaStore>, key: &str, step: u64) -> Self {
        StepAllocator {
            meta,
            key: key.into(),
            step: step.max(1),
            state: Mutex::new(Steps::default()),
            reserved: Condvar::new(),
        }
    }

    /// Reserves `n` ids with the lock released; marks the reservation running meanwhile.
    fn reserve(&self, st: &mut MutexGuard<'_, Steps>, n: u64) -> Result<(u64, u64)> {
        st.reserving = true;
        let r = MutexGuard::unlocked(st, || self.meta.reserve_ids(&self.key, n));
        st.reserving = false;
        self.reserved.notify_all();
        let start = r?;
        Ok((start, start + n))
    }

    /// `count` consecutive ids; returns the first. When the current step has fewer left, its
    /// rest is skipped for the step reserved ahead (or a new step of at least `count` ids): ids
    /// stay unique and increasing; skipped ones are never handed out, like the rest of a step at
    /// a restart.
    pub fn next_ids(&self, count: u64) -> Result<u64> {
        let count = count.max(1);
        let mut st = self.state.lock();
        loop {
            if st.cur.1 - st.cur.0 >= count {
                break;
            }
            if let Some(n) = st.next.take()
                && n.1 - n.0 >= count
            {
                st.cur = n;
                continue;
            }
            if st.reserving {
                self.reserved.wait(&mut st);
                continue;
            }
            let r = self.reserve(&mut st, self.step.max(count))?;
            // Another caller may have moved on meanwhile; keep the range for whoever needs it.
            if st.cur.1 - st.cur.0 < count {
                st.cur = r;
            } else if st.next.is_none() {
                st.next = Some(r);
            }
        }
        let first = st.cur.0;
        st.cur.0 += count;
        if st.cur.1 - st.cur.0 < self.step / 2 && st.next.is_none() && !st.reserving {
            match self.reserve(&mut st, self.step) {
                Ok(r) if st.next.is_none() => st.next = Some(r),
                Ok(_) => {}
                // Not this caller's problem: its ids are taken; the next one tries again.
                Err(e) => log::debug!("reserving ids ahead for {} failed: {e:#}", self.key),
            }
        }
        Ok(first)
    }
}

impl IdAllocator for StepAllocator {
    fn next_id(&self) -> Result<u64> {
        self.next_ids(1)
    }
}

const ID_CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// The client-visible file id: the numeric id in hex, a dash, 16 random characters; a node of
/// a group puts the group and a dot in front (`g1.000000000000002a-...`), so that any proxy
/// can tell from the id alone where the file lives ([`ferry_common::proto::file_group`]).
pub fn file_id(group: &str, num: u64) -> String {
    let mut rng = rand::rng();
    let tail: String = (0..16)
        .map(|_| ID_CHARS[rng.random_range(0..ID_CHARS.len())] as char)
        .collect();
    if group.is_empty() {
        format!("{num:016x}-{tail}")
    } else {
        format!("{group}.{num:016x}-{tail}")
    }
}

/// The stored file's path relative to the data dir, from its numeric id and creation time.
pub fn file_path(num: u64, timestamp: u64) -> String {
    let d = num % 512;
    let c = (num / 512) % 512;
    let b = (num / (512 * 512)) % 512;
    let a = num / (512 * 512 * 512);
    format!("data/{a:03}/{b:03}/{c:03}/{:08X}_{d:03}", timestamp as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::SqliteStore;

    #[test]
    fn paths_follow_seed_004() {
        assert_eq!(file_path(0, 0x5F6E7AD2), "data/000/000/000/5F6E7AD2_000");
        let x = 3 * 512 * 512 * 512 + 2 * 512 * 512 + 511 * 512 + 7;
        assert_eq!(file_path(x, 1), "data/003/002/511/00000001_007");
    }

    #[test]
    fn concurrent_batches_with_reservations_ahead_never_overlap() {
        let meta: Arc<dyn MetaStore> = Arc::new(SqliteStore::memory().unwrap());
        let a = StepAllocator::new(meta, "k", 10);
        let mut ranges: Vec<(u64, u64)> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8u64)
                .map(|t| {
                    let a = &a;
                    s.spawn(move || {
                        (0..500u64)
                            .map(|i| {
                                let n = 1 + (i * 7 + t) % 13;
                                let first = a.next_ids(n).unwrap();
                                (first, first + n)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        ranges.sort();
        assert_eq!(ranges.len(), 4000);
        for w in ranges.windows(2) {
            assert!(w[0].1 <= w[1].0, "{:?} overlaps {:?}", w[0], w[1]);
        }
    }

    #[test]
    fn ids_are_unique_across_restarts_and_unguessable() {
        let meta: Arc<dyn MetaStore> = Arc::new(SqliteStore::memory().unwrap());
        let a = StepAllocator::new(meta.clone(), "data", 3);
        let first: Vec<u64> = (0..5).map(|_| a.next_id().unwrap()).collect();
        assert_eq!(first, vec![1, 2, 3, 4, 5]);
        // A "restart": a new allocator over the same DB starts after the reserved range.
        let b = StepAllocator::new(meta, "data", 3);
        assert_eq!(b.next_id().unwrap(), 7);
        // Batches are consecutive; a step emptied below half has the next one reserved ahead
        // (10..13), which a batch too big for it skips for a step of its own size (13..18).
        assert_eq!(b.next_ids(2).unwrap(), 8);
        assert_eq!(b.next_ids(5).unwrap(), 13);
        assert_eq!(b.next_ids(1).unwrap(), 18);
        let (x, y) = (file_id("", 1), file_id("", 1));
        assert_ne!(x, y);
        assert!(x.starts_with("0000000000000001-") && x.len() == 33);
        assert_eq!(ferry_common::proto::file_group(&x), None);
        let g = file_id("g7", 1);
        assert!(g.starts_with("g7.0000000000000001-") && g.len() == 36);
        assert_eq!(ferry_common::proto::file_group(&g), Some("g7"));
    }

    /// Two nodes (two pools on one PostgreSQL database), many threads each: every id is
    /// handed out once. Small steps make the nodes race for the id row all the time.
    #[test]
    fn two_nodes_on_one_database_never_share_an_id() {
        let Some(db) =
            crate::meta::pg::testdb::create("two_nodes_on_one_database_never_share_an_id")
        else {
            return;
        };
        const THREADS: usize = 8;
        const EACH: usize = 250;
        let nodes: Vec<Arc<StepAllocator>> = (0..2)
            .map(|_| {
                let meta: Arc<dyn MetaStore> = Arc::new(db.store());
                Arc::new(StepAllocator::new(meta, "data", 7))
            })
            .collect();
        let ids: Vec<u64> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..THREADS)
                .map(|t| {
                    let a = nodes[t % 2].clone();
                    s.spawn(move || (0..EACH).map(|_| a.next_id().unwrap()).collect::<Vec<_>>())
                })
                .collect();
            hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        let unique: std::collections::HashSet<u64> = ids.iter().copied().collect();
        assert_eq!(ids.len(), THREADS * EACH);
        assert_eq!(unique.len(), ids.len(), "an id was handed out twice");
        assert!(ids.iter().all(|&i| i >= 1));
    }
}
