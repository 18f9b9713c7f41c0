//! Expires upload sessions: a background thread removes sessions idle longer than
//! their lifetime (`fresh_session_ttl_secs` before their first block, `session_ttl_secs` after),
//! with their temp files (start-up recovery handles those left by a crash).

use crate::storage::Storage;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

pub struct Reaper {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Reaper {
    pub fn start(st: Arc<Storage>) -> Reaper {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        // Check a few times per TTL so a session outlives its TTL by a fraction of it at most.
        let every = (st.cfg.fresh_session_ttl() / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(30));
        let thread = std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || {
                while !flag.load(Ordering::SeqCst) {
                    std::thread::park_timeout(every);
                    if flag.load(Ordering::SeqCst) {
                        break;
                    }
                    st.reap();
                }
            })
            .ok();
        if thread.is_none() {
            log::error!("cannot start the session reaper thread; sessions expire only at start-up");
        }
        Reaper { stop, thread }
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}
