//! Expiry: sessions idle for their whole lifetime are removed with their temp files, unless a
//! peer recorded activity since (the database's expiry decides); sessions of a node that died
//! and did not come back are adopted once expired, so they go the same way.

use super::*;
use crate::meta::now_ms;
use log::{debug, info, warn};
use std::fs::{self};
use std::sync::Arc;

impl Storage {
    /// Removes expired upload sessions and their temp files; returns how many. Finished
    /// uploads are remembered for one session lifetime, then forgotten too.
    pub fn reap(&self) -> usize {
        let now = now_ms();
        let ttl_ms = self.cfg.session_ttl_secs * 1000;
        if let Err(e) = self.meta.expire_finished(now.saturating_sub(ttl_ms)) {
            warn!("cannot expire finished uploads: {e:#}");
        }
        let candidates: Vec<Arc<Session>> = self.sessions.lock().open.values().cloned().collect();
        let mut n = 0;
        for s in candidates {
            {
                let st = s.state.lock();
                if st.phase() != Phase::Receiving || st.writing_any() || !self.idle_out(&st) {
                    continue;
                }
            }
            // Idle here; a peer may have kept it alive (or ended it) through the DB.
            let seen = match self.meta.session(&s.rec.id) {
                Ok(Some(rec)) => rec.expires_ms,
                Ok(None) => {
                    debug!("upload session {} ended elsewhere", hex::encode(s.rec.id));
                    self.forget(&s.rec.id);
                    continue;
                }
                Err(e) => {
                    warn!("cannot look up session {}: {e:#}", hex::encode(s.rec.id));
                    continue;
                }
            };
            if s.state.lock().db_expires != seen {
                // A peer recorded activity (maybe blocks: the session's lifetime may be the
                // long one now): catch up with the database and look again next time.
                if let Err(e) = self.refresh(&s) {
                    debug!("upload session {}: {e}", hex::encode(s.rec.id));
                }
                continue;
            }
            {
                let mut st = s.state.lock();
                // Late writers here must not record blocks of a session being removed.
                if !st.begin_expiry() {
                    continue;
                }
            }
            // Deleted only if no node recorded activity since `seen`.
            let removed = match self.meta.expire_session(&s.rec.id, seen) {
                Ok(r) => r,
                Err(e) => {
                    warn!("cannot expire session {}: {e:#}", hex::encode(s.rec.id));
                    false
                }
            };
            if !removed {
                s.state.lock().expiry_refused();
                continue;
            }
            info!(
                "upload session {} expired ({} of {} blocks stored); removing it and its temp file",
                hex::encode(s.rec.id),
                s.state.lock().stored.count(),
                s.rec.blocks
            );
            self.forget(&s.rec.id);
            let _ = fs::remove_file(self.root.join(&s.rec.temp_path));
            n += 1;
        }
        self.adopt_orphans(now);
        n
    }

    /// Sessions in the DB that no running node holds (their node died and did not come back)
    /// are taken into memory once their wall-clock expiry has passed, already idle, so the next
    /// reap removes them like any other. A live peer's session is not touched: its node keeps
    /// the expiry in the future while the session is in use.
    pub(super) fn adopt_orphans(&self, now: u64) {
        let all = match self.meta.sessions() {
            Ok(all) => all,
            Err(e) => {
                warn!("cannot list upload sessions: {e:#}");
                return;
            }
        };
        for rec in all {
            if rec.expires_ms > now || self.sessions.lock().open.contains_key(&rec.id) {
                continue;
            }
            let hex_id = hex::encode(rec.id);
            match self.load_session(rec.clone(), Since::Expiry { now_ms: now }) {
                Ok(_) => debug!("adopted expired upload session {hex_id} of a departed node"),
                Err(e) => {
                    // Its temp file is gone: nothing to resume.
                    debug!("upload session {hex_id}: {e:#}; removing it");
                    if let Err(e) = self.meta.expire_session(&rec.id, rec.expires_ms) {
                        warn!("cannot expire session {hex_id}: {e:#}");
                    }
                }
            }
        }
    }
}
