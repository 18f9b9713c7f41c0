//! The node's table of upload sessions: UPLOAD_INIT opens one (or resumes the one already open
//! for the same content), UPLOAD_QUERY reads its breakpoint, and any command naming a session
//! this node does not hold loads it from the database (a peer or an earlier run started it).

use super::*;
use crate::meta::{Challenge, SessionRec, Sha256 as Digest32, UploadId, now_ms, now_secs};
use ferry_common::proto::{Breakpoint, ErrorCode, UploadInit, UploadInitReply};
use log::{debug, info, warn};
use parking_lot::Mutex;
use rand::RngExt;
use std::collections::{HashMap, HashSet};
use std::fs::{self, OpenOptions};
use std::sync::Arc;
use std::time::Instant;

impl Storage {
    /// Puts a session from the DB into memory (a restart, or a peer started it): its temp file
    /// opened, its acknowledged blocks from the DB, last active as `since` says. A session
    /// already in memory wins.
    pub(super) fn load_session(
        &self,
        rec: SessionRec,
        since: Since,
    ) -> anyhow::Result<Arc<Session>> {
        use anyhow::Context;
        let path = self.root.join(&rec.temp_path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open temp file {}", path.display()))?;
        let (stored, crcs) = self.acknowledged(&rec)?;
        let active = match since {
            Since::Now => Instant::now(),
            Since::Expiry { now_ms } => {
                active_at_start(rec.expires_ms, now_ms, self.ttl(stored.count() > 0))
            }
        };
        let state = SessionState::new(stored, crcs, active, rec.expires_ms, rec.challenge.clone());
        let id = rec.id;
        let s = Arc::new(Session {
            rec,
            file,
            state: Mutex::new(state),
            hash: Mutex::default(),
        });
        Ok(self.sessions.lock().open.entry(id).or_insert(s).clone())
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
            info!(
                "upload session {} ended elsewhere (finished or expired through a peer)",
                hex::encode(s.rec.id)
            );
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
        let mut s = self.sessions.lock().open.get(id).cloned();
        if s.is_none() {
            let rec = self
                .meta
                .session(id)
                .map_err(|e| db_err(e, "session lookup"))?;
            if let Some(rec) = rec.filter(|r| r.app == who.app && r.user == who.user) {
                match self.load_session(rec, Since::Now) {
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

    /// Whether a session has been idle for its whole lifetime (monotonic clock): the short
    /// one while it has stored no block, the full one after.
    pub(super) fn idle_out(&self, st: &SessionState) -> bool {
        st.active.elapsed() >= self.ttl(st.stored.count() > 0)
    }

    /// A session's lifetime: `session_ttl_secs` once it stored a block, the shorter
    /// `fresh_session_ttl_secs` before (a session that sent nothing holds little, and not
    /// for long).
    pub(super) fn ttl(&self, stored_any: bool) -> std::time::Duration {
        if stored_any {
            self.cfg.session_ttl()
        } else {
            self.cfg.fresh_session_ttl()
        }
    }

    /// UPLOAD_INIT: resumes the session already open for this content (in this node's table,
    /// else in the database: a peer or an earlier run opened it), or opens a new one. Opening
    /// reserves the content in the table first (the `Reserved` phase: it counts against the
    /// limits, and a second INIT of the same content is Busy meanwhile), then creates the
    /// (empty) temp file and writes the row with no lock held, so a slow disk or database
    /// stalls this upload only. Disk is taken block by block as blocks arrive
    /// ([`Storage::block_begin`]): a declared size reserves nothing.
    pub fn init(&self, who: &Who, init: &UploadInit) -> OpResult<UploadInitReply> {
        let blocks = init
            .blocks()
            .map_err(|e| OpError::new(ErrorCode::BadFrame, e.to_string()))?;
        let key = ContentKey {
            app: who.app.clone(),
            user: who.user.clone(),
            size: init.size,
            block_size: init.block_size,
            sha256: init.sha256,
        };
        if let Some(reply) = self.resume_in_table(&key, blocks) {
            return Ok(reply);
        }
        let reservation = self.reserve(&key)?;
        // Another connection here may have opened it between the look and the reservation.
        if let Some(reply) = self.resume_in_table(&key, blocks) {
            return Ok(reply);
        }
        if let Some(reply) = self.resume_from_db(&key, blocks)? {
            return Ok(reply);
        }
        self.phase(
            "session-reserved",
            &format_args!("app {} user {}", who.app, who.user),
        );
        self.check_reserve(init.size)?;
        self.check_quota(who, init.size)?;
        let id: UploadId = rand::rng().random();
        let temp_rel = format!("{}/{}.part", self.tmp_rel, hex::encode(id));
        let temp = self.root.join(&temp_rel);
        let file = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&temp)
            .map_err(|e| io_err(&e, "cannot create temp file"))?;
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
            expires_ms: now_ms() + self.cfg.fresh_session_ttl().as_millis() as u64,
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
        reservation.open(Arc::new(Session {
            rec,
            file,
            state: Mutex::new(state),
            hash: Mutex::default(),
        }));
        Ok(reply)
    }

    /// Resumes a session of this content in the table that is `Receiving` and not idle out.
    fn resume_in_table(&self, key: &ContentKey, blocks: u32) -> Option<UploadInitReply> {
        let found: Vec<Arc<Session>> = self
            .sessions
            .lock()
            .open
            .values()
            .filter(|s| key.matches(&s.rec))
            .cloned()
            .collect();
        found.iter().find_map(|s| self.resume(s, blocks))
    }

    /// Loads the session of this content a peer or an earlier run opened, and resumes it.
    fn resume_from_db(&self, key: &ContentKey, blocks: u32) -> OpResult<Option<UploadInitReply>> {
        let rec = self
            .meta
            .open_session(
                &key.app,
                &key.user,
                key.size,
                key.block_size,
                &key.sha256,
                now_ms(),
            )
            .map_err(|e| db_err(e, "session lookup"))?;
        let Some(rec) = rec else {
            return Ok(None);
        };
        let hex_id = hex::encode(rec.id);
        match self.load_session(rec, Since::Now) {
            Ok(s) => {
                info!("UPLOAD_INIT resumes upload session {hex_id} from the metadata DB");
                Ok(self.resume(&s, blocks))
            }
            Err(e) => {
                warn!("upload session {hex_id}: {e:#}; opening a new one");
                Ok(None)
            }
        }
    }

    /// The INIT reply that resumes `s`, if it is `Receiving` and not idle out. Resuming does
    /// not extend the session's life (only stored blocks do), so INITs repeated forever do
    /// not keep a session, and what it holds, forever. A session the database no longer has
    /// ended through a peer (finished or expired): it is forgotten here, never handed to a new
    /// upload (whose OVER would answer the earlier upload's file).
    fn resume(&self, s: &Arc<Session>, blocks: u32) -> Option<UploadInitReply> {
        {
            let st = s.state.lock();
            if st.phase() != Phase::Receiving || self.idle_out(&st) {
                return None;
            }
        }
        match self.meta.session(&s.rec.id) {
            Ok(Some(_)) => {}
            Ok(None) => {
                info!(
                    "upload session {} ended elsewhere; not resumed",
                    hex::encode(s.rec.id)
                );
                self.forget(&s.rec.id);
                return None;
            }
            // The database is unreachable: the session is resumed from memory, as it stands.
            Err(e) => debug!("upload session {}: {e:#}", hex::encode(s.rec.id)),
        }
        let st = s.state.lock();
        if st.phase() != Phase::Receiving {
            return None;
        }
        debug!("UPLOAD_INIT resumes session {}", hex::encode(s.rec.id));
        Some(UploadInitReply {
            upload_id: s.rec.id,
            block_size: s.rec.block_size,
            blocks,
            challenge: st.challenge.as_ref().map(|c| (c.off, c.len)),
        })
    }

    /// Reserves a place in the table for a new session of this content: Busy while another
    /// connection opens the same content; Limit past `max_sessions`, the app's share
    /// ([`Config::app_sessions`]) or the user's `max_sessions_per_user` (sessions being opened
    /// count), and the same for the bytes open sessions declare ([`Config::app_open_bytes`],
    /// [`Config::user_open_bytes`]). The texts name the limit that was hit, never another
    /// tenant's figures.
    fn reserve(&self, key: &ContentKey) -> OpResult<Reservation<'_>> {
        let volume = volume_bytes(&self.root);
        let mut t = self.sessions.lock();
        if t.opening.contains(key) {
            return Err(OpError::new(
                ErrorCode::Busy,
                "an upload of this content is being opened",
            ));
        }
        let total = t.open.len() + t.opening.len();
        if total >= self.cfg.max_sessions {
            return Err(OpError::new(
                ErrorCode::Limit,
                "this server has no room for another upload session now; try later",
            ));
        }
        let (mut app, mut mine, mut app_bytes, mut my_bytes) = (0, 0, 0u64, 0u64);
        let recs = t
            .open
            .values()
            .map(|s| (&s.rec.app, &s.rec.user, s.rec.size));
        for (a, u, size) in recs.chain(t.opening.iter().map(|k| (&k.app, &k.user, k.size))) {
            if *a == key.app {
                app += 1;
                app_bytes = app_bytes.saturating_add(size);
                if *u == key.user {
                    mine += 1;
                    my_bytes = my_bytes.saturating_add(size);
                }
            }
        }
        let app_max = self.cfg.app_sessions(&key.app);
        if app >= app_max {
            return Err(OpError::new(
                ErrorCode::Limit,
                format!(
                    "app {} has {app} upload sessions open, its most (max_sessions_per_app); \
                     finish or abandon some",
                    key.app
                ),
            ));
        }
        if mine >= self.cfg.user_sessions(&key.app) {
            return Err(OpError::new(
                ErrorCode::Limit,
                format!(
                    "user {} already has {mine} upload sessions open, the most allowed \
                     (max_sessions_per_user); finish or abandon one",
                    key.user
                ),
            ));
        }
        if app_bytes.saturating_add(key.size) > self.cfg.app_open_bytes(&key.app, volume) {
            return Err(OpError::new(
                ErrorCode::Limit,
                format!(
                    "app {}'s open uploads would declare more bytes than it may hold \
                     (max_open_bytes_per_app); finish or abandon some",
                    key.app
                ),
            ));
        }
        if my_bytes.saturating_add(key.size) > self.cfg.user_open_bytes(&key.app, volume) {
            return Err(OpError::new(
                ErrorCode::Limit,
                format!(
                    "user {}'s open uploads would declare more bytes than one user may hold \
                     (max_open_bytes_per_user); finish or abandon one",
                    key.user
                ),
            ));
        }
        t.opening.insert(key.clone());
        Ok(Reservation {
            st: self,
            key: key.clone(),
        })
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
        if let Some(s) = self.sessions.lock().open.remove(id) {
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

/// When a session loaded from the database was last active.
pub(super) enum Since {
    /// Now: a request names it.
    Now,
    /// As its DB expiry says (start-up, adopting a departed node's session): last active a
    /// lifetime before that expiry, by the wall clock at `now_ms`.
    Expiry { now_ms: u64 },
}

/// What identifies an upload's content for UPLOAD_INIT: a second INIT with the same key
/// resumes the session instead of opening another.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct ContentKey {
    app: String,
    user: String,
    size: u64,
    block_size: u32,
    sha256: Digest32,
}

impl ContentKey {
    fn matches(&self, r: &SessionRec) -> bool {
        r.app == self.app
            && r.user == self.user
            && r.size == self.size
            && r.block_size == self.block_size
            && r.sha256 == self.sha256
    }
}

/// The node's upload sessions.
#[derive(Default)]
pub(super) struct Table {
    /// Sessions in memory, in any phase but `Ended`.
    pub(super) open: HashMap<UploadId, Arc<Session>>,
    /// Contents whose new session is being opened (`Reserved`).
    opening: HashSet<ContentKey>,
}

/// A reserved place in the table; dropped without [`Reservation::open`] (the open failed), it
/// frees the place.
struct Reservation<'a> {
    st: &'a Storage,
    key: ContentKey,
}

impl Reservation<'_> {
    /// `Reserved` -> `Receiving`: the session takes its place in the table (in one step, so
    /// it is never counted twice or not at all).
    fn open(self, s: Arc<Session>) {
        let mut t = self.st.sessions.lock();
        t.opening.remove(&self.key);
        t.open.insert(s.rec.id, s);
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.st.sessions.lock().opening.remove(&self.key);
    }
}
