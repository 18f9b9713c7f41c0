//! N worker threads, each with its own [`Link`] (connection) and block buffer, taking block
//! indices from one shared queue. A block can be put back (the server said Busy) to be retried
//! after a delay; the first hard error stops every worker after its current block.

use crate::error::{ClientError, Result};
use crate::link::{Link, Shared};
use crate::rotation::backoff;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Most times one block may be put back before the transfer gives up on it. A block stays Busy
/// while a stale connection (through a hung proxy) still holds it on the server, until the
/// server's idle timeout closes that connection (120 s by default): with backoff capped at
/// 2 s (x0.5..1.5 jitter) this waits several minutes before giving up.
pub const MAX_REQUEUES: u32 = 200;

pub enum Outcome {
    Done,
    /// Try this block again later (after a backoff), possibly on another thread.
    Requeue,
}

struct Job {
    index: u32,
    requeues: u32,
    ready_at: Instant,
}

/// Runs `work(link, buffer, index)` for every index on up to `threads` threads.
pub fn run<F>(shared: &Shared, threads: usize, indices: Vec<u32>, what: &str, work: F) -> Result<()>
where
    F: Fn(&mut Link, &mut Vec<u8>, u32) -> Result<Outcome> + Sync,
{
    let now = Instant::now();
    let n = threads.clamp(1, indices.len().max(1));
    let queue: Mutex<VecDeque<Job>> = Mutex::new(
        indices
            .into_iter()
            .map(|index| Job {
                index,
                requeues: 0,
                ready_at: now,
            })
            .collect(),
    );
    let abort = AtomicBool::new(false);
    let first_err: Mutex<Option<ClientError>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..n {
            s.spawn(|| {
                let mut link = Link::new(shared);
                let mut buf = Vec::new();
                while !abort.load(Ordering::Relaxed) {
                    let Some(job) = queue.lock().pop_front() else {
                        break;
                    };
                    let wait = job.ready_at.saturating_duration_since(Instant::now());
                    if !wait.is_zero() {
                        std::thread::sleep(wait.min(Duration::from_secs(5)));
                    }
                    match work(&mut link, &mut buf, job.index) {
                        Ok(Outcome::Done) => {}
                        Ok(Outcome::Requeue) if job.requeues < MAX_REQUEUES => {
                            let requeues = job.requeues + 1;
                            queue.lock().push_back(Job {
                                index: job.index,
                                requeues,
                                ready_at: Instant::now() + backoff(requeues),
                            });
                        }
                        Ok(Outcome::Requeue) => {
                            let e = ClientError::Integrity(format!(
                                "{what}: block {} still busy on the server after {MAX_REQUEUES} tries",
                                job.index
                            ));
                            first_err.lock().get_or_insert(e);
                            abort.store(true, Ordering::Relaxed);
                        }
                        Err(e) => {
                            first_err.lock().get_or_insert(e);
                            abort.store(true, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
    match first_err.into_inner() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
