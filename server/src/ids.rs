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
use parking_lot::Mutex;
use rand::RngExt;
use std::sync::Arc;

/// Hands out numeric file ids, never the same one twice (across restarts too).
pub trait IdAllocator: Send + Sync {
    fn next_id(&self) -> Result<u64>;
}

/// seed 004's id role: memory increments, DB steps.
pub struct StepAllocator {
    meta: Arc<dyn MetaStore>,
    key: String,
    step: u64,
    range: Mutex<(u64, u64)>,
}

impl StepAllocator {
    pub fn new(meta: Arc<dyn MetaStore>, key: &str, step: u64) -> Self {
        StepAllocator {
            meta,
            key: key.into(),
            step: step.max(1),
            range: Mutex::new((0, 0)),
        }
    }
}

impl StepAllocator {
    /// `count` consecutive ids; returns the first. When the current step has fewer left, its
    /// rest is skipped and a new step of at least `count` ids is reserved (ids stay unique and
    /// increasing; skipped ones are never handed out, like the rest of a step at a restart).
    pub fn next_ids(&self, count: u64) -> Result<u64> {
        let count = count.max(1);
        let mut r = self.range.lock();
        if r.1 - r.0 < count {
            let n = self.step.max(count);
            let start = self.meta.reserve_ids(&self.key, n)?;
            *r = (start, start + n);
        }
        let first = r.0;
        r.0 += count;
        Ok(first)
    }
}

impl IdAllocator for StepAllocator {
    fn next_id(&self) -> Result<u64> {
        let mut r = self.range.lock();
        if r.0 >= r.1 {
            let start = self.meta.reserve_ids(&self.key, self.step)?;
            *r = (start, start + self.step);
        }
        let id = r.0;
        r.0 += 1;
        Ok(id)
    }
}

const ID_CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// The client-visible file id: the numeric id in hex, a dash, 16 random characters.
pub fn file_id(num: u64) -> String {
    let mut rng = rand::rng();
    let tail: String = (0..16)
        .map(|_| ID_CHARS[rng.random_range(0..ID_CHARS.len())] as char)
        .collect();
    format!("{num:016x}-{tail}")
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
    fn ids_are_unique_across_restarts_and_unguessable() {
        let meta: Arc<dyn MetaStore> = Arc::new(SqliteStore::memory().unwrap());
        let a = StepAllocator::new(meta.clone(), "data", 3);
        let first: Vec<u64> = (0..5).map(|_| a.next_id().unwrap()).collect();
        assert_eq!(first, vec![1, 2, 3, 4, 5]);
        // A "restart": a new allocator over the same DB starts after the reserved range.
        let b = StepAllocator::new(meta, "data", 3);
        assert_eq!(b.next_id().unwrap(), 7);
        // Batches are consecutive and skip to a new step when the current one is too short.
        assert_eq!(b.next_ids(2).unwrap(), 8);
        assert_eq!(b.next_ids(5).unwrap(), 10);
        assert_eq!(b.next_ids(1).unwrap(), 15);
        let (x, y) = (file_id(1), file_id(1));
        assert_ne!(x, y);
        assert!(x.starts_with("0000000000000001-") && x.len() == 33);
    }
}
