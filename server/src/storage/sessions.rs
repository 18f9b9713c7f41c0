//! The node's table of upload sessions: UPLOAD_INIT opens one (or resumes the one already open
//! for the same content), UPLOAD_QUERY reads its breakpoint, and any command naming a session
//! this node does not hold loads it from the database (a peer or an earlier run started it).

use super::*;
use crate::meta::{Challenge, SessionRec, UploadId, now_secs};
use ferry_common::proto::{Breakpoint, ErrorCode, UploadInit, UploadInitReply};
use log::{debug, info, warn};
use parking_lot::Mutex;
use rand::RngExt;
use std::fs::{self, OpenOptions};
use std::sync::Arc;
use std::time::Instant;

impl Storage {
    /// Puts a session from the DB into memory (a restart, or a peer started it): its temp file
    /// opened, its acknowledged blocks from the DB, last `active` then. A session already in
    /// memory wins.
    pub(super) fn load_session(
        &self,
        rec: SessionRec,
        active: Instant,
    ) -> anyhow::Result<Arc<Session>> {
        use anyhow::Context;
        let path = self.root.join(&rec.temp_path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open temp file {}", path.display()))?;
        let (stored, crcs) = self.acknowledged(&rec)?;
        let state = SessionState::new(stored, crcs, active, rec.expires_ms, rec.challenge.clone());
        let id = rec.id;
        let s = Arc::new(Session {
            rec,
            file,
            state: Mutex::new(state),
            hash: Mutex::default(),
        });
        Ok(self.sessions.lock().entry(id).or_insert(s).clone())
    }

    /// The acknowledged blocks of a session as the DB has them (every node records there).
    pub(super) fn acknowledged(&self, rec: &SessionRec) -> anyhow::Result<(Breakpoint, Vec<u32>)> {
        let mut stored = Breakpoint::new(rec.blocks);
        let mut crcs = vec![0; rec.blocks as usize];
        for (i, crc) in self.meta.session_blocks(&rec.id)? {
            if i < rec.blocks {
                stored.set(i);
                crcs[i as usize] = crc;
            }
        }
        Ok((stored, crcs))
    }

    /// Brings a session's acknowledged blocks, expiry and challenge up to the DB's before an
    /// answer that depends on them (QUERY, OVER): a peer may have stored blocks of it. A
    /// session the DB no longer has ended elsewhere (finished or expired) and is forgotten.
    pub(super) fn refresh(&self, s: &Arc<Session>) -> OpResult<()> {
        let rec = self
            .meta
            .session(&s.rec.id)
            .map_err(|e| db_err(e, "session lookup"))?;
        let Some(rec) = rec else {
            self.forget(&s.rec.id);
            return Err(OpError::new(
                ErrorCode::UnknownUpload,
                "upload session ended",
            ));
        };
        let (stored, crcs) = self
            .acknowledged(&rec)
            .map_err(|e| db_err(e, "block lookup"))?;
        let mut st = s.state.lock();
        st.stored = stored;
        st.crcs = crcs;
        if st.db_expires != rec.expires_ms {
            // A peer recorded activity since this node last looked.
            st.active = Instant::now();
            st.db_expires = rec.expires_ms;
        }
        st.challenge = rec.challenge;
        Ok(())
    }

    /// The session `id` of `who`: from memory, else from the DB (a peer started it, or it was
    /// reaped from memory here while a peer kept it alive).
    pub(super) fn session(&self, who: &Who, id: &UploadId) -> OpResult<Arc<Session>> {
        let mut s = self.sessions.lock().get(id).cloned();
        if s.is_none() {
            let rec = self
                .meta
                .session(id)
                .map_err(|e| db_err(e, "session lookup"))?;
            if let Some(rec) = rec.filter(|r| r.app == who.app && r.user == who.user) {
                match self.load_session(rec, Instant::now()) {
                    Ok(loaded) => {
                        info!(
                            "upload session {} loaded from the metadata DB",
                            hex::encode(id)
                        );
                        s = Some(loaded);
                    }
                    Err(e) => warn!("upload session {}: {e:#}", hex::encode(id)),
                }
            }
        }
        match s {
            Some(s) if s.rec.app == who.app && s.rec.user == who.user => Ok(s),
            _ => Err(OpError::new(
                ErrorCode::UnknownUpload,
                format!("no upload session {}", hex::encode(id)),
            )),
        }
    }

    /// Whether a session has been idle for its whole lifetime (monotonic clock).
    pub(super) fn idle_out(&self, st: &SessionState) -> bool {
        st.active.elapsed() >= self.cfg.session_ttl()
    }

    pub fn init(&self, who: &Who, init: &UploadInit) -> OpResult<UploadInitReply> {
        let blocks = init
            .blocks()
            .map_err(|e| OpError::new(ErrorCode::BadFrame, e.to_string()))?;
        let mut map = self.sessions.lock();
        let existing = map.values().find(|s| {
            s.rec.app == who.app
                && s.rec.user == who.user
                && s.rec.size == init.size
                && s.rec.block_size == init.block_size
                && s.rec.sha256 == init.sha256
        });
        if let Some(s) = existing {
            let mut st = s.state.lock();
            if st.phase() == Phase::Receiving && !self.idle_out(&st) {
                st.active = Instant::now();
                let expires = self.expiry();
                if self.meta.touch_session(&s.rec.id, expires).is_ok() {
                    st.db_expires = expires;
                }
                debug!("UPLOAD_INIT resumes session {}", hex::encode(s.rec.id));
                return Ok(UploadInitReply {
                    upload_id: s.rec.id,
                    block_size: s.rec.block_size,
                    blocks,
                    challenge: st.challenge.as_ref().map(|c| (c.off, c.len)),
                });
            }
        }
        if map.len() >= self.cfg.max_sessions {
            return Err(OpError::new(
                ErrorCode::Limit,
                format!("{} upload sessions open; try later", map.len()),
            ));
        }
        let mine = map
            .values()
            .filter(|s| s.rec.app == who.app && s.rec.user == who.user)
            .count();
        if mine >= self.cfg.max_sessions_per_user {
            return Err(OpError::new(
                ErrorCode::Limit,
                format!(
                    "user {} already has {mine} upload sessions open (the most allowed); \
                     finish or abandon one",
                    who.user
                ),
            ));
        }
        self.check_reserve(init.size)?;
        let id: UploadId = rand::rng().random();
        let temp_rel = format!("{}/{}.part", self.tmp_rel, hex::encode(id));
        let temp = self.root.join(&temp_rel);
        let file = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&temp)
            .map_err(|e| io_err(&e, "cannot create temp file"))?;
        if let Err(e) = preallocate(&file, init.size) {
            let _ = fs::remove_file(&temp);
            return Err(io_err(&e, "cannot preallocate the upload"));
        }
        let challenge = match self.meta.find_content(&who.app, &init.sha256, init.size) {
            Ok(Some(f)) => {
                let len = self.cfg.challenge_max.min(f.size);
                let off = rand::rng().random_range(0..=f.size - len);
                Some(Challenge {
                    file: f.id,
                    off,
                    len,
                })
            }
            Ok(None) => None,
            Err(e) => {
                let _ = fs::remove_file(&temp);
                return Err(db_err(e, "dedupe lookup"));
            }
        };
        let rec = SessionRec {
            id,
            app: who.app.clone(),
            user: who.user.clone(),
            size: init.size,
            block_size: init.block_size,
            blocks,
            sha256: init.sha256,
            name: init.name.clone(),
            temp_path: temp_rel,
            created: now_secs(),
            expires_ms: self.expiry(),
            challenge: challenge.clone(),
        };
        if let Err(e) = self.meta.insert_session(&rec) {
            let _ = fs::remove_file(&temp);
            return Err(db_err(e, "session insert"));
        }
        info!(
            "upload session {} opened: app {} user {} size {} block {} ({} blocks){}",
            hex::encode(id),
            who.app,
            who.user,
            init.size,
            init.block_size,
            blocks,
            if challenge.is_some() {
                ", content already stored: challenge set"
            } else {
                ""
            }
        );
        let reply = UploadInitReply {
            upload_id: id,
            block_size: init.block_size,
            blocks,
            challenge: challenge.as_ref().map(|c| (c.off, c.len)),
        };
        let state = SessionState::new(
            Breakpoint::new(blocks),
            vec![0; blocks as usize],
            Instant::now(),
            rec.expires_ms,
            challenge,
        );
        map.insert(
            id,
            Arc::new(Session {
                rec,
                file,
                state: Mutex::new(state),
                hash: Mutex::default(),
            }),
        );
        Ok(reply)
    }

    pub fn query(&self, who: &Who, id: &UploadId) -> OpResult<Breakpoint> {
        let s = self.session(who, id)?;
        self.refresh(&s)?;
        let st = s.state.lock();
        st.live()?;
        Ok(st.stored.clone())
    }

    /// Drops a session from memory (after its rows were deleted or committed away).
    pub(super) fn forget(&self, id: &UploadId) {
        if let Some(s) = self.sessions.lock().remove(id) {
            s.state.lock().end();
        }
    }

    /// Removes a session entirely: memory, rows and temp file.
    pub(super) fn discard(&self, s: &Arc<Session>) {
        self.forget(&s.rec.id);
        if let Err(e) = self.meta.delete_session(&s.rec.id) {
            log::error!(
                "cannot delete session {} rows: {e:#}",
                hex::encode(s.rec.id)
            );
        }
        let _ = fs::remove_file(self.root.join(&s.rec.temp_path));
    }
}
