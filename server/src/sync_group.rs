//! Group sync: callers that each need "everything I wrote so far is on disk" share one fsync.
//!
//! A sync that *starts* after a caller's write covers it. So a caller arriving while a sync
//! runs waits for it to end, then either finds that another caller has started (or finished) a
//! newer one and waits for that, or runs the next one itself for everybody who queued up
//! meanwhile. Under load this turns N fsyncs into about two rounds, whatever N is; alone, a
//! caller pays exactly one fsync as before.

use parking_lot::{Condvar, Mutex};
use std::io;

#[derive(Default)]
pub struct SyncGroup {
    state: Mutex<State>,
    done: Condvar,
}

#[derive(Default)]
struct State {
    /// Generation of the newest sync started (0: none yet).
    started: u64,
    /// Generation of the newest sync finished.
    finished: u64,
    /// The error of the newest finished sync, if it failed.
    failed: Option<(io::ErrorKind, String)>,
}

impl SyncGroup {
    /// Returns once a sync started after this call has succeeded: runs `sync` itself, or waits
    /// for the one that covers it. A failed sync fails every caller that waited for it.
    pub fn sync(&self, sync: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        let mut st = self.state.lock();
        // The first generation to start after now: any running sync is older.
        let need = st.started + 1;
        loop {
            if st.finished >= need {
                // The newest finished sync started after this call, so it covers it.
                return match &st.failed {
                    None => Ok(()),
                    Some((kind, msg)) => Err(io::Error::new(*kind, msg.clone())),
                };
            }
            if st.started == st.finished {
                // Nothing running: this caller syncs for itself and everyone queued behind.
                st.started += 1;
                let mine = st.started;
                drop(st);
                let r = sync();
                st = self.state.lock();
                st.finished = mine;
                st.failed = r.as_ref().err().map(|e| (e.kind(), e.to_string()));
                self.done.notify_all();
                return r;
            }
            self.done.wait(&mut st);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    #[test]
    fn concurrent_callers_share_syncs_and_each_is_covered() {
        let g = Arc::new(SyncGroup::default());
        // `written` counts writes; a sync records how many it covered (all writes before it).
        let written = Arc::new(AtomicU64::new(0));
        let durable = Arc::new(AtomicU64::new(0));
        let syncs = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (g, written, durable, syncs) =
                    (g.clone(), written.clone(), durable.clone(), syncs.clone());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        let mine = written.fetch_add(1, Ordering::SeqCst) + 1;
                        g.sync(|| {
                            let covered = written.load(Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(1));
                            syncs.fetch_add(1, Ordering::SeqCst);
                            durable.fetch_max(covered, Ordering::SeqCst);
                            Ok(())
                        })
                        .unwrap();
                        // Returned: a sync that saw this write has finished.
                        assert!(durable.load(Ordering::SeqCst) >= mine);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let n = syncs.load(Ordering::SeqCst);
        assert!(n < 400, "{n} syncs for 400 callers: none shared");
    }

    #[test]
    fn a_failed_sync_is_reported_and_the_next_one_runs() {
        let g = SyncGroup::default();
        let e = g.sync(|| Err(io::Error::other("disk gone"))).unwrap_err();
        assert!(e.to_string().contains("disk gone"));
        g.sync(|| Ok(())).unwrap();
    }
}
