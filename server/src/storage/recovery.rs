//! Start-up recovery: what a crash (or a dead peer) left behind is finished or rolled back.

use super::*;
use crate::meta::{FILE_COMMITTING, FILE_DELETING, FileRec, now_ms};
use log::{debug, info, warn};
use std::collections::HashSet;
use std::fs::{self};
use std::io;
use std::time::Instant;

/// A session found at start-up was last active `ttl - (expires_ms - now_ms)` ago by the wall
/// clock (the only clock that survives a restart); from then on the monotonic clock counts.
pub(super) fn active_at_start(expires_ms: u64, now_ms: u64, ttl: std::time::Duration) -> Instant {
    let left = std::time::Duration::from_millis(expires_ms.saturating_sub(now_ms)).min(ttl);
    Instant::now()
        .checked_sub(ttl - left)
        .unwrap_or_else(Instant::now)
}

impl Storage {
    /// Finishes a commit its node left half done (it died, or this is its restart): the
    /// content was verified before it was renamed into place, so a file at the record's path
    /// only lacks the final mark; a record without one never got its file and is dropped.
    /// True when the file is stored now.
    pub(super) fn finish_left_commit(&self, f: &FileRec) -> anyhow::Result<bool> {
        if self.root.join(&f.path).exists() {
            info!(
                "finishing the commit of file {} ({}) left by node {:?}",
                f.id, f.path, f.node
            );
            self.meta.commit_file(&f.id)?;
            let _ = fsync_dir(&self.root.join(&f.path).with_file_name(""));
            Ok(true)
        } else {
            info!("dropping file row {} that never got its file", f.id);
            self.meta.drop_file(&f.id)?;
            Ok(false)
        }
    }

    /// Start-up clean-up, of this node's group only: the metadata store returns no other
    /// group's rows (another group's files and temp files live in another data directory). What
    /// each step may touch, so that a live peer's work survives:
    /// - deletions cut short (`deleting` rows): any; finishing one is idempotent (unlink, drop).
    /// - `committing` rows: this node's, or a dead peer's ([`Storage::peer_alive`]); a live
    ///   peer may be between its insert and its rename.
    /// - sessions: expired ones (the expiry in the DB is refreshed by whichever node sees
    ///   activity, and the delete is conditional on it), and ones whose temp file is gone
    ///   (temp files are created before their session row and removed only when the session
    ///   ends). Every other session is kept and loaded, whoever started it.
    /// - stray temp files (no session row): in this node's temp dir, and in dead peers' dirs.
    pub(super) fn recover(&self) -> anyhow::Result<()> {
        for f in self.meta.files_with_status(FILE_DELETING)? {
            // A deletion cut short between marking the record and dropping it.
            info!("recovery: finishing deletion of file {} ({})", f.id, f.path);
            match fs::remove_file(self.root.join(&f.path)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(anyhow::Error::new(e).context(format!("removing {}", f.path)));
                }
            }
            self.meta.drop_file(&f.id)?;
        }
        for f in self.meta.files_with_status(FILE_COMMITTING)? {
            if f.node != self.node && self.peer_alive(&f.node) {
                debug!(
                    "recovery: file {} is being committed by live node {}",
                    f.id, f.node
                );
                continue;
            }
            self.finish_left_commit(&f)?;
        }
        let now = now_ms();
        let mut keep = HashSet::new();
        for rec in self.meta.sessions()? {
            let path = self.root.join(&rec.temp_path);
            let hex_id = hex::encode(rec.id);
            if rec.expires_ms <= now {
                if self.meta.expire_session(&rec.id, rec.expires_ms)? {
                    info!("recovery: removed expired upload session {hex_id}");
                    let _ = fs::remove_file(&path);
                    continue;
                }
            } else if !path.exists() {
                info!("recovery: removing upload session {hex_id} (temp file gone)");
                self.meta.delete_session(&rec.id)?;
                continue;
            }
            keep.insert(path);
            match self.load_session(rec, Since::Expiry { now_ms: now }) {
                Ok(s) => {
                    let st = s.state.lock();
                    info!(
                        "recovery: upload session {hex_id} resumes with {}/{} blocks",
                        st.stored.count(),
                        s.rec.blocks
                    );
                }
                Err(e) => warn!("recovery: upload session {hex_id} not loaded: {e:#}"),
            }
        }
        let mut dirs = vec![self.root.join(&self.tmp_rel)];
        if !self.node.is_empty() {
            for entry in fs::read_dir(self.root.join(TMP))? {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if entry.file_type()?.is_dir() && name != self.node && !self.peer_alive(&name) {
                    dirs.push(entry.path());
                }
            }
        }
        for dir in dirs {
            for entry in fs::read_dir(&dir)? {
                let entry = entry?;
                let path = entry.path();
                if entry.file_type()?.is_file() && !keep.contains(&path) {
                    info!("recovery: removing stray temp file {}", path.display());
                    let _ = fs::remove_file(&path);
                }
            }
        }
        Ok(())
    }
}
