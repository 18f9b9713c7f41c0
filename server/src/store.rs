//! The storage role: the data directory, upload sessions and every file operation.
//!
//! Connections call these methods on their worker threads; the disk I/O (pwrite, pread,
//! fsync, rename) happens inline there. Durability order for every new file: bytes written and
//! fsynced in `tmp/`, a *committing* file row, rename into `data/...`, fsync of the directory,
//! then the row is marked stored (and the upload session deleted) in one transaction. Start-up
//! finishes or rolls back whatever a crash interrupted (see [`Storage::open`]).

use crate::config::Config;
use crate::ids::{IdAllocator, StepAllocator, file_id, file_path};
use crate::meta::{
    Challenge, Claim, FILE_COMMITTING, FILE_DELETING, FileRec, MetaStore, SessionRec,
    Sha256 as Digest32, UploadId, now_ms, now_secs,
};
use ferry_common::proto::{
    BlockAck, BlockMeta, Breakpoint, DownloadReq, ErrorCode, UploadInit, UploadInitReply,
    UploadMeta,
};
use log::{debug, info, warn};
use parking_lot::Mutex;
use rand::RngExt;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// An operation's failure as the client will see it: an error code and a human text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError {
    pub code: ErrorCode,
    pub text: String,
}

impl OpError {
    pub fn new(code: ErrorCode, text: impl Into<String>) -> Self {
        OpError {
            code,
            text: text.into(),
        }
    }
}

impl std::fmt::Display for OpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.text)
    }
}

pub type OpResult<T> = Result<T, OpError>;

/// Disk errors: a full disk (or quota) is NoSpace, anything else Io; the text says what failed.
fn io_err(e: &io::Error, what: &str) -> OpError {
    let code = match e.raw_os_error() {
        Some(libc_enospc)
            if libc_enospc == nix::libc::ENOSPC || libc_enospc == nix::libc::EDQUOT =>
        {
            ErrorCode::NoSpace
        }
        _ => ErrorCode::Io,
    };
    OpError::new(code, format!("{what}: {e}"))
}

fn db_err(e: anyhow::Error, what: &str) -> OpError {
    log::error!("metadata {what}: {e:#}");
    OpError::new(ErrorCode::Io, format!("metadata {what} failed"))
}

/// Who a session speaks for (from its HELLO). Scopes every operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Who {
    pub app: String,
    pub user: String,
}

/// Mutable state of an upload session.
struct SessionState {
    stored: Breakpoint,
    crcs: Vec<u32>,
    /// Blocks some connection is streaming right now (fencing: nobody else may write them).
    writing: HashSet<u32>,
    /// UPLOAD_OVER or UPLOAD_PROVE is assembling the file.
    finishing: bool,
    /// Removed (completed, discarded or expired): late writers must not record anything.
    gone: bool,
    /// Last activity, on the monotonic clock: a session expires after `session_ttl_secs` of
    /// real idleness, so a wall-clock jump neither kills a live session nor keeps a dead one.
    /// The database keeps a wall-clock expiry too, only for sessions found at start-up.
    active: Instant,
    /// The expiry in the session's DB row as this node last wrote or read it. Every node writes
    /// a new one on activity, so a different value in the DB means a peer saw activity: a
    /// comparison for equality, which no clock jump can fool.
    db_expires: u64,
    challenge: Option<Challenge>,
}

/// SHA-256 of the session's stored blocks 0..next, computed in the background as blocks are
/// stored in order, so UPLOAD_OVER only hashes what is left. Lost on restart (then UPLOAD_OVER
/// hashes everything).
#[derive(Default)]
struct HashProgress {
    sha: Sha256,
    next: u32,
    /// Blocks whose bytes on disk no longer match the CRC they were acknowledged with.
    damaged: Vec<u32>,
}

/// A big-file upload session held in memory (its rows in the DB are the durable copy).
pub struct Session {
    rec: SessionRec,
    file: File,
    state: Mutex<SessionState>,
    hash: Mutex<HashProgress>,
}

impl Session {
    pub fn id(&self) -> &UploadId {
        &self.rec.id
    }

    /// Hashes stored blocks in order from where the progress stands, as far as they go.
    /// Called by the background hasher after blocks are stored, and by UPLOAD_OVER.
    pub fn advance_hash(&self, buf: &mut Vec<u8>) -> io::Result<()> {
        let mut h = self.hash.lock();
        self.advance_locked(&mut h, buf)
    }

    fn advance_locked(&self, h: &mut HashProgress, buf: &mut Vec<u8>) -> io::Result<()> {
        buf.resize(HASH_CHUNK, 0);
        while h.next < self.rec.blocks {
            let idx = h.next;
            let want = {
                let st = self.state.lock();
                if st.gone || !st.stored.has(idx) {
                    return Ok(());
                }
                st.crcs[idx as usize]
            };
            let start = u64::from(idx) * u64::from(self.rec.block_size);
            let len = self.block_len(idx);
            // Read the whole block before touching the hash, so an I/O error leaves the
            // progress where it was.
            let mut crc = 0;
            let mut done = 0u64;
            let mut sha = h.sha.clone();
            while done < len {
                let n = (len - done).min(HASH_CHUNK as u64) as usize;
                self.file.read_exact_at(&mut buf[..n], start + done)?;
                sha.update(&buf[..n]);
                crc = crc32c::crc32c_append(crc, &buf[..n]);
                done += n as u64;
            }
            h.sha = sha;
            if crc != want {
                h.damaged.push(idx);
            }
            h.next += 1;
        }
        Ok(())
    }

    fn block_len(&self, idx: u32) -> u64 {
        let start = u64::from(idx) * u64::from(self.rec.block_size);
        u64::from(self.rec.block_size).min(self.rec.size - start)
    }
}

/// The storage role over one data directory.
pub struct Storage {
    pub cfg: Config,
    root: PathBuf,
    meta: Arc<dyn MetaStore>,
    ids: Arc<dyn IdAllocator>,
    sessions: Mutex<HashMap<UploadId, Arc<Session>>>,
    /// Small uploads being written now, by (app, user, upload key): a retry of one that is still
    /// committing waits (Busy) instead of storing a second copy.
    small_keys: KeyClaims,
    /// Bytes of payload written so far, for the test-only write fault (config `faults`).
    written: AtomicU64,
    pub downloads_over: AtomicU64,
    /// Files deleted since start-up (see [`Storage::deletes`]).
    deleted: AtomicU64,
    /// This node's name among the peers sharing the data dir; empty for a standalone server.
    node: String,
    /// This node's temp dir relative to the data dir: `tmp` standalone, `tmp/<node>` on a node.
    tmp_rel: String,
    /// Held for the life of the process: standalone, `LOCK` exclusively (nothing else may use
    /// the data dir); a node, `LOCK` shared plus `nodes/<node>.lock` exclusively (peers yes,
    /// a standalone server or a second process with the same node name no).
    _locks: Vec<File>,
}

const TMP: &str = "tmp";
/// Per-node lock files of the nodes sharing a data dir.
const NODES: &str = "nodes";

/// Opens (creating) a lock file.
fn open_lock(path: &Path) -> anyhow::Result<File> {
    use anyhow::Context;
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .read(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))
}

/// Node names become file names (lock file, temp dir): short, no path characters.
fn valid_node_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n != "."
        && n != ".."
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
}

/// This server's node name: `[cluster] node_name`, else its advertise (or listen) address;
/// "" for a standalone server.
fn node_name(cfg: &Config) -> anyhow::Result<String> {
    let Some(c) = &cfg.cluster else {
        return Ok(String::new());
    };
    let name = match &c.node_name {
        Some(n) => n.clone(),
        None => c.advertise.unwrap_or(cfg.listen).to_string(),
    };
    if !valid_node_name(&name) {
        anyhow::bail!(
            "[cluster] node_name {name:?}: use 1-64 letters, digits, '.', '_', '-' or ':'"
        );
    }
    Ok(name)
}
const HASH_CHUNK: usize = 1 << 20;

/// A session found at start-up was last active `ttl - (expires_ms - now_ms)` ago by the wall
/// clock (the only clock that survives a restart); from then on the monotonic clock counts.
fn active_at_start(expires_ms: u64, now_ms: u64, ttl: std::time::Duration) -> Instant {
    let left = std::time::Duration::from_millis(expires_ms.saturating_sub(now_ms)).min(ttl);
    Instant::now()
        .checked_sub(ttl - left)
        .unwrap_or_else(Instant::now)
}

/// Bytes available to unprivileged writers on the volume holding `dir` (0 if unknown).
pub fn free_bytes(dir: &Path) -> u64 {
    match nix::sys::statvfs::statvfs(dir) {
        Ok(s) => s.blocks_available().saturating_mul(s.fragment_size()),
        Err(e) => {
            warn!("cannot statvfs {}: {e}", dir.display());
            0
        }
    }
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` and its missing parents below `root`, syncing the parent of each one made: a
/// new directory's own entry must be as durable as the file later renamed into it (a new one
/// is needed once per 512 files). Another worker making the same one at the same moment is
/// fine: whoever finds it made syncs its parent too.
fn create_dirs_synced(dir: &Path, root: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut d = dir;
    while d != root && !d.is_dir() {
        missing.push(d);
        match d.parent() {
            Some(p) => d = p,
            None => break,
        }
    }
    for m in missing.into_iter().rev() {
        match fs::create_dir(m) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        fsync_dir(m.parent().unwrap_or(root))?;
    }
    Ok(())
}

/// Reserves disk space for a temp file so block writes do not hit ENOSPC halfway.
fn preallocate(f: &File, len: u64) -> io::Result<()> {
    use nix::fcntl::{FallocateFlags, fallocate};
    match fallocate(f, FallocateFlags::empty(), 0, len as i64) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EOPNOTSUPP) => f.set_len(len),
        Err(e) => Err(io::Error::from(e)),
    }
}

fn random_hex() -> String {
    hex::encode(rand::rng().random::<[u8; 16]>())
}

impl Storage {
    /// Opens (creating if needed) the data dir, locks it, opens the metadata DB and recovers from
    /// whatever a crash left behind: committing files are finished or dropped, sessions whose
    /// temp file is gone or which expired are removed, stray temp files are deleted. A node of
    /// a group (`[cluster]`) touches only what it owns or what a dead peer left (see
    /// [`Storage::recover`]).
    pub fn open(cfg: Config) -> anyhow::Result<Storage> {
        use anyhow::Context;
        let root = cfg.data.clone();
        let node = node_name(&cfg)?;
        let tmp_rel = if node.is_empty() {
            TMP.to_string()
        } else {
            format!("{TMP}/{node}")
        };
        fs::create_dir_all(root.join(&tmp_rel))
            .with_context(|| format!("cannot create data dir {}", root.display()))?;
        fs::create_dir_all(root.join("data"))?;
        fs::create_dir_all(root.join(NODES))?;
        let lock_path = root.join("LOCK");
        let lock = open_lock(&lock_path)?;
        let mut locks = Vec::new();
        if node.is_empty() {
            lock.try_lock().map_err(|_| {
                anyhow::anyhow!(
                    "data dir {} is in use by another ferry-server (lock {})",
                    root.display(),
                    lock_path.display()
                )
            })?;
            locks.push(lock);
        } else {
            lock.try_lock_shared().map_err(|_| {
                anyhow::anyhow!(
                    "data dir {} is in use by a standalone ferry-server (lock {})",
                    root.display(),
                    lock_path.display()
                )
            })?;
            locks.push(lock);
            let node_lock_path = root.join(NODES).join(format!("{node}.lock"));
            let node_lock = open_lock(&node_lock_path)?;
            node_lock.try_lock().map_err(|_| {
                anyhow::anyhow!(
                    "node {node} is already running on data dir {} (lock {})",
                    root.display(),
                    node_lock_path.display()
                )
            })?;
            locks.push(node_lock);
        }
        let meta = crate::meta::open(cfg.meta_url.as_deref(), &root)?;
        let ids: Arc<dyn IdAllocator> =
            Arc::new(StepAllocator::new(meta.clone(), "data", cfg.id_step));
        if !node.is_empty() {
            info!(
                "storage node {node} on shared data dir {} (temp files in {tmp_rel})",
                root.display()
            );
        }
        let st = Storage {
            cfg,
            root,
            meta,
            ids,
            sessions: Mutex::new(HashMap::new()),
            small_keys: KeyClaims::default(),
            written: AtomicU64::new(0),
            downloads_over: AtomicU64::new(0),
            deleted: AtomicU64::new(0),
            node,
            tmp_rel,
            _locks: locks,
        };
        st.recover()?;
        Ok(st)
    }

    /// This node's name ("" standalone).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Whether the process that wrote records as `node` may still be running. Standalone, no
    /// other writer can be (the exclusive `LOCK`). On a node: the records of a standalone
    /// server ("") are abandoned (it cannot run beside us), and a peer is alive exactly while
    /// it holds `nodes/<peer>.lock`: the kernel drops that lock when the process dies, however
    /// it dies, so a free lock proves the peer gone.
    fn peer_alive(&self, peer: &str) -> bool {
        if peer == self.node {
            return true;
        }
        if self.node.is_empty() || peer.is_empty() || !valid_node_name(peer) {
            return false;
        }
        let path = self.root.join(NODES).join(format!("{peer}.lock"));
        let Ok(f) = OpenOptions::new().read(true).write(true).open(&path) else {
            return false; // never started here
        };
        // Dropping `f` releases the probe lock at once.
        f.try_lock().is_err()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// How many files were deleted through this server so far: a cache of stored files (the
    /// HTTP gateway's open descriptors) is stale once this moves. Counted as soon as the record
    /// is marked deleting, before the bytes go.
    pub fn deletes(&self) -> u64 {
        self.deleted.load(Ordering::Acquire)
    }

    /// The metadata store (the id role reserves its steps in it).
    pub fn meta(&self) -> Arc<dyn MetaStore> {
        self.meta.clone()
    }

    /// Start-up clean-up. What each step may touch, so that a live peer's work survives:
    /// - deletions cut short (`deleting` rows): any; finishing one is idempotent (unlink, drop).
    /// - `committing` rows: this node's, or a dead peer's ([`Storage::peer_alive`]); a live
    ///   peer may be between its insert and its rename.
    /// - sessions: expired ones (the expiry in the DB is refreshed by whichever node sees
    ///   activity, and the delete is conditional on it), and ones whose temp file is gone
    ///   (temp files are created before their session row and removed only when the session
    ///   ends). Every other session is kept and loaded, whoever started it.
    /// - stray temp files (no session row): in this node's temp dir, and in dead peers' dirs.
    fn recover(&self) -> anyhow::Result<()> {
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
            if self.root.join(&f.path).exists() {
                // Content was verified before the rename; only the final commit was lost.
                info!("recovery: finishing commit of file {} ({})", f.id, f.path);
                self.meta.commit_file(&f.id)?;
                let _ = fsync_dir(&self.root.join(&f.path).with_file_name(""));
            } else {
                info!("recovery: dropping uncommitted file row {}", f.id);
                self.meta.drop_file(&f.id)?;
            }
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
            let active = active_at_start(rec.expires_ms, now, self.cfg.session_ttl());
            match self.load_session(rec, active) {
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

    /// Puts a session from the DB into memory (a restart, or a peer started it): its temp file
    /// opened, its acknowledged blocks from the DB, last `active` then. A session already in
    /// memory wins.
    fn load_session(&self, rec: SessionRec, active: Instant) -> anyhow::Result<Arc<Session>> {
        use anyhow::Context;
        let path = self.root.join(&rec.temp_path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open temp file {}", path.display()))?;
        let (stored, crcs) = self.acknowledged(&rec)?;
        let state = SessionState {
            stored,
            crcs,
            writing: HashSet::new(),
            finishing: false,
            gone: false,
            active,
            db_expires: rec.expires_ms,
            challenge: rec.challenge.clone(),
        };
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
    fn acknowledged(&self, rec: &SessionRec) -> anyhow::Result<(Breakpoint, Vec<u32>)> {
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
    fn refresh(&self, s: &Arc<Session>) -> OpResult<()> {
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

    /// Marks a named phase of storing data (config::PHASES) in the log; test-only
    /// `faults.pause_at` holds the worker there so a test can kill the process at that point.
    fn phase(&self, name: &'static str, what: &dyn std::fmt::Display) {
        debug!("phase {name}: {what}");
        if self.cfg.faults.pause_at.as_deref() == Some(name) {
            let ms = self.cfg.faults.pause_ms.unwrap_or(30_000);
            warn!("phase {name} reached ({what}): pausing {ms} ms (faults.pause_at)");
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
    }

    /// Test-only fault (config `faults.write_fail_after`): fail payload writes past a budget.
    fn fault(&self, n: usize) -> io::Result<()> {
        if let Some(limit) = self.cfg.faults.write_fail_after {
            let before = self.written.fetch_add(n as u64, Ordering::Relaxed);
            if before + n as u64 > limit {
                return Err(io::Error::from_raw_os_error(nix::libc::ENOSPC));
            }
        }
        Ok(())
    }

    fn write_at(&self, f: &File, data: &[u8], off: u64) -> io::Result<()> {
        self.fault(data.len())?;
        f.write_all_at(data, off)
    }

    /// The session `id` of `who`: from memory, else from the DB (a peer started it, or it was
    /// reaped from memory here while a peer kept it alive).
    fn session(&self, who: &Who, id: &UploadId) -> OpResult<Arc<Session>> {
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

    /// Refuses an upload of `size` bytes up front if it would leave less than `min_free_bytes`
    /// free on the data volume (the reserve keeps the metadata database, logs and other
    /// uploads' last blocks writable).
    fn check_reserve(&self, size: u64) -> OpResult<()> {
        let free = free_bytes(&self.root);
        let reserve = self.cfg.min_free_bytes;
        if free < size.saturating_add(reserve) {
            return Err(OpError::new(
                ErrorCode::NoSpace,
                format!(
                    "{size} bytes would leave under the {reserve}-byte free-space reserve \
                     ({free} bytes free)"
                ),
            ));
        }
        Ok(())
    }

    /// The wall-clock expiry recorded in the database for a session active now.
    fn expiry(&self) -> u64 {
        now_ms() + self.cfg.session_ttl_secs * 1000
    }

    /// Whether a session has been idle for its whole lifetime (monotonic clock).
    fn idle_out(&self, st: &SessionState) -> bool {
        st.active.elapsed() >= self.cfg.session_ttl()
    }

    /// Allocates a numeric id, file id and final path, creating the path's directories.
    fn new_file_slot(&self) -> OpResult<(u64, String, String)> {
        let num = self.ids.next_id().map_err(|e| db_err(e, "id allocation"))?;
        let path = file_path(num, now_secs());
        if let Some(dir) = self.root.join(&path).parent() {
            create_dirs_synced(dir, &self.root)
                .map_err(|e| io_err(&e, "cannot create data directory"))?;
        }
        Ok((num, file_id(num), path))
    }

    /// Moves a verified, fsynced temp file into its final place and records it. `link` makes
    /// a hard link instead of a rename (instant upload sharing stored content).
    fn commit_new_file(
        &self,
        rec: &FileRec,
        src: &Path,
        link: bool,
        upload: Option<&UploadId>,
    ) -> OpResult<()> {
        self.meta
            .insert_file(rec, upload)
            .map_err(|e| db_err(e, "file insert"))?;
        self.phase("file-inserted", &rec.id);
        let dst = self.root.join(&rec.path);
        let placed = if link {
            fs::hard_link(src, &dst)
        } else {
            fs::rename(src, &dst)
        };
        if let Err(e) = placed {
            let _ = self.meta.drop_file(&rec.id);
            return Err(io_err(&e, "cannot place the file"));
        }
        self.phase("file-renamed", &rec.id);
        let synced = fsync_dir(dst.parent().unwrap_or(&self.root))
            .and_then(|_| fsync_dir(&self.root.join(&self.tmp_rel)));
        if let Err(e) = synced {
            // The rename may or may not be durable; the committing row lets start-up decide.
            return Err(io_err(&e, "cannot sync the data directory"));
        }
        self.meta
            .commit_file(&rec.id)
            .map_err(|e| db_err(e, "file commit"))?;
        self.phase("file-committed", &rec.id);
        Ok(())
    }

    // ---- small files (UPLOAD 70) ----

    /// Starts a small upload, or answers a repeat: if this app and user already stored a file
    /// with this upload key (the reply was lost), its id comes back and nothing is written.
    pub fn small_begin(&self, who: &Who, meta: UploadMeta, size: u64) -> OpResult<SmallStart> {
        if size > self.cfg.small_file_max {
            return Err(OpError::new(
                ErrorCode::Limit,
                format!(
                    "file of {size} bytes is over the small-file limit of {} bytes; use UPLOAD_INIT",
                    self.cfg.small_file_max
                ),
            ));
        }
        self.check_reserve(size)?;
        let claim = self.claim_key(who, &meta.key)?;
        // Checked while holding the claim, so a copy committing right now cannot slip past.
        let done = self
            .meta
            .finished_upload(&who.app, &who.user, &meta.key)
            .map_err(|e| db_err(e, "finished upload lookup"))?;
        if let Some(id) = done {
            info!("repeated UPLOAD of file {id} (same key): same id, bytes dropped");
            return Ok(SmallStart::Done(id));
        }
        let tmp = self
            .root
            .join(&self.tmp_rel)
            .join(format!("small-{}.part", random_hex()));
        let file = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&tmp)
            .map_err(|e| io_err(&e, "cannot create temp file"))?;
        Ok(SmallStart::Write(Box::new(SmallWriter {
            _claim: claim,
            who: who.clone(),
            meta,
            size,
            file,
            tmp,
            pos: 0,
            sha: Sha256::new(),
            crc: 0,
            crcs: Vec::new(),
            block_size: self.cfg.block_size,
            err: None,
            done: false,
        })))
    }

    /// Claims a small upload's key: in memory against this node's other connections, in the
    /// DB against peers (whose claim is taken over only once they are proved dead).
    fn claim_key(&self, who: &Who, key: &UploadId) -> OpResult<KeyClaim> {
        let busy = || OpError::new(ErrorCode::Busy, "an upload with this key is in progress");
        let k = (who.app.clone(), who.user.clone(), *key);
        if !self.small_keys.lock().insert(k.clone()) {
            return Err(busy());
        }
        // From here on, dropping `claim` releases both claims.
        let claim = KeyClaim {
            set: self.small_keys.clone(),
            key: k,
            meta: self.meta.clone(),
            node: self.node.clone(),
        };
        let held = self
            .meta
            .claim_key(&who.app, &who.user, key, &self.node)
            .map_err(|e| db_err(e, "upload key claim"))?;
        match held {
            Claim::Mine => Ok(claim),
            Claim::Held(peer) if self.peer_alive(&peer) => {
                debug!("upload key held by live node {peer}");
                Err(busy())
            }
            Claim::Held(peer) => {
                let taken = self
                    .meta
                    .take_claim(&who.app, &who.user, key, &peer, &self.node)
                    .map_err(|e| db_err(e, "upload key claim"))?;
                if taken {
                    info!("took over an upload key claim of dead node {peer:?}");
                    Ok(claim)
                } else {
                    Err(busy())
                }
            }
        }
    }

    // ---- big files ----

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
            if !st.gone && !st.finishing && !self.idle_out(&st) {
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
        let state = SessionState {
            stored: Breakpoint::new(blocks),
            crcs: vec![0; blocks as usize],
            writing: HashSet::new(),
            finishing: false,
            gone: false,
            active: Instant::now(),
            db_expires: rec.expires_ms,
            challenge,
        };
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
        if st.gone {
            return Err(OpError::new(
                ErrorCode::UnknownUpload,
                "upload session ended",
            ));
        }
        Ok(st.stored.clone())
    }

    /// Checks a block header and claims the block for this connection. A block that is already
    /// stored, or being written by someone else, is answered without touching the file.
    pub fn block_begin(&self, who: &Who, m: &BlockMeta) -> OpResult<BlockStart> {
        let s = self.session(who, &m.upload_id)?;
        let r = &s.rec;
        if m.index >= r.blocks {
            return Err(OpError::new(
                ErrorCode::BadBlock,
                format!(
                    "block index {} past the last block {}",
                    m.index,
                    r.blocks - 1
                ),
            ));
        }
        let want_off = u64::from(m.index) * u64::from(r.block_size);
        let want_len = s.block_len(m.index);
        if m.offset != want_off || u64::from(m.len) != want_len {
            return Err(OpError::new(
                ErrorCode::BadBlock,
                format!(
                    "block {} must be at offset {want_off} with length {want_len}, got offset {} length {}",
                    m.index, m.offset, m.len
                ),
            ));
        }
        let mut st = s.state.lock();
        if st.gone {
            return Err(OpError::new(
                ErrorCode::UnknownUpload,
                "upload session ended",
            ));
        }
        if st.stored.has(m.index) {
            return Ok(BlockStart::Stored);
        }
        if st.finishing || !st.writing.insert(m.index) {
            return Err(OpError::new(
                ErrorCode::Busy,
                format!("block {} is being written by another connection", m.index),
            ));
        }
        drop(st);
        Ok(BlockStart::Write(BlockWriter {
            session: s,
            idx: m.index,
            offset: m.offset,
            len: u64::from(m.len),
            pos: 0,
            crc: 0,
            expect: m.crc32c,
            err: None,
            done: false,
        }))
    }

    /// The file a finished upload produced: a repeated UPLOAD_OVER or UPLOAD_PROVE whose first
    /// reply was lost (a proxy or the server died after the commit) gets the same file id, not
    /// "unknown upload" and not a second file.
    fn already_finished(&self, who: &Who, id: &UploadId, unknown: OpError) -> OpResult<String> {
        match self.meta.finished_upload(&who.app, &who.user, id) {
            Ok(Some(file_id)) => {
                info!(
                    "upload {} was already finished as file {file_id}; answering again",
                    hex::encode(id)
                );
                Ok(file_id)
            }
            Ok(None) => Err(unknown),
            Err(e) => Err(db_err(e, "finished upload lookup")),
        }
    }

    pub fn over(&self, who: &Who, id: &UploadId) -> OpResult<String> {
        let s = match self.session(who, id) {
            Ok(s) => s,
            Err(e) => return self.already_finished(who, id, e),
        };
        match self.refresh(&s) {
            Ok(()) => {}
            Err(e) if e.code == ErrorCode::UnknownUpload => {
                return self.already_finished(who, id, e);
            }
            Err(e) => return Err(e),
        }
        {
            let mut st = s.state.lock();
            if st.gone {
                let ended = OpError::new(ErrorCode::UnknownUpload, "upload session ended");
                drop(st);
                return self.already_finished(who, id, ended);
            }
            if st.finishing {
                return Err(OpError::new(
                    ErrorCode::Busy,
                    "file over already in progress",
                ));
            }
            let have = st.stored.count();
            if have < s.rec.blocks {
                return Err(OpError::new(
                    ErrorCode::Incomplete,
                    format!("{} of {} blocks missing", s.rec.blocks - have, s.rec.blocks),
                ));
            }
            st.finishing = true;
        }
        let result = self.assemble(&s);
        if result.is_err() {
            s.state.lock().finishing = false;
        }
        result
    }

    /// Re-reads the temp file, checks every block CRC and the whole SHA-256, then commits it.
    fn assemble(&self, s: &Arc<Session>) -> OpResult<String> {
        let r = &s.rec;
        let hex_id = hex::encode(r.id);
        // Every block is stored (checked by the caller): hash what the background hasher has
        // not reached yet. Holding the progress lock keeps the hasher out meanwhile.
        let mut h = s.hash.lock();
        let mut buf = Vec::new();
        s.advance_locked(&mut h, &mut buf)
            .map_err(|e| io_err(&e, "cannot re-read the upload"))?;
        if h.next < r.blocks {
            return Err(OpError::new(ErrorCode::Incomplete, "blocks missing"));
        }
        let damaged = std::mem::take(&mut h.damaged);
        if !damaged.is_empty() {
            // The hash covered damaged bytes: start it over once they are sent again.
            *h = HashProgress::default();
        }
        let sha = h.sha.clone();
        // `h` stays locked until the damaged blocks are unmarked, so the hasher cannot hash
        // their old bytes again in between.
        if !damaged.is_empty() {
            // Acknowledged bytes that changed on disk (e.g. lost in a power cut): ask for them
            // again rather than throwing the whole upload away.
            warn!(
                "upload {hex_id}: {} block(s) no longer match their CRC on disk; marked missing",
                damaged.len()
            );
            self.meta
                .unmark_blocks(&r.id, &damaged)
                .map_err(|e| db_err(e, "block unmark"))?;
            let mut st = s.state.lock();
            for &i in &damaged {
                st.stored.bitmap[(i / 8) as usize] &= !(1 << (i % 8));
            }
            return Err(OpError::new(
                ErrorCode::Incomplete,
                format!(
                    "{} block(s) damaged on disk; send them again",
                    damaged.len()
                ),
            ));
        }
        drop(h);
        let got: Digest32 = sha.finalize().into();
        if got != r.sha256 {
            warn!("upload {hex_id}: SHA-256 mismatch; discarding the session");
            self.discard(s);
            return Err(OpError::new(
                ErrorCode::HashMismatch,
                "assembled file does not match its SHA-256; upload discarded",
            ));
        }
        s.file
            .sync_all()
            .map_err(|e| io_err(&e, "cannot sync the upload"))?;
        let (num, id, path) = self.new_file_slot()?;
        let rec = FileRec {
            id: id.clone(),
            num,
            app: r.app.clone(),
            user: r.user.clone(),
            status: FILE_COMMITTING,
            path,
            size: r.size,
            sha256: r.sha256,
            name: r.name.clone(),
            block_size: r.block_size,
            crcs: s.state.lock().crcs.clone(),
            created: now_secs(),
            node: self.node.clone(),
        };
        self.commit_new_file(&rec, &self.root.join(&r.temp_path), false, Some(&r.id))?;
        self.forget(&r.id);
        info!(
            "upload {hex_id} complete: file {id} ({} bytes, {} blocks) at {}",
            r.size, r.blocks, rec.path
        );
        Ok(id)
    }

    /// Drops a session from memory (after its rows were deleted or committed away).
    fn forget(&self, id: &UploadId) {
        if let Some(s) = self.sessions.lock().remove(id) {
            s.state.lock().gone = true;
        }
    }

    /// Removes a session entirely: memory, rows and temp file.
    fn discard(&self, s: &Arc<Session>) {
        self.forget(&s.rec.id);
        if let Err(e) = self.meta.delete_session(&s.rec.id) {
            log::error!(
                "cannot delete session {} rows: {e:#}",
                hex::encode(s.rec.id)
            );
        }
        let _ = fs::remove_file(self.root.join(&s.rec.temp_path));
    }

    pub fn prove(&self, who: &Who, id: &UploadId, proof: &Digest32) -> OpResult<String> {
        let s = match self.session(who, id) {
            Ok(s) => s,
            Err(e) => return self.already_finished(who, id, e),
        };
        let (gone, challenge) = {
            let st = s.state.lock();
            (st.gone, st.challenge.clone())
        };
        if gone {
            let ended = OpError::new(ErrorCode::UnknownUpload, "upload session ended");
            return self.already_finished(who, id, ended);
        }
        let Some(c) = challenge else {
            return Err(OpError::new(
                ErrorCode::ProofFailed,
                "no stored content to prove for this upload; send the blocks",
            ));
        };
        let src = match self.meta.file(&c.file, &who.app) {
            Ok(Some(f)) => f,
            Ok(None) => {
                // The stored copy was deleted since the challenge was set: no instant upload.
                s.state.lock().challenge = None;
                let _ = self.meta.set_challenge(&s.rec.id, None);
                return Err(OpError::new(
                    ErrorCode::ProofFailed,
                    "the stored content is gone; send the blocks",
                ));
            }
            Err(e) => return Err(db_err(e, "file lookup")),
        };
        let src_path = self.root.join(&src.path);
        let f = File::open(&src_path).map_err(|e| io_err(&e, "cannot open stored content"))?;
        let want = hash_range(&f, c.off, c.len).map_err(|e| io_err(&e, "cannot read content"))?;
        if want != *proof {
            warn!(
                "upload {}: wrong proof of possession from app {} user {}",
                hex::encode(id),
                who.app,
                who.user
            );
            return Err(OpError::new(
                ErrorCode::ProofFailed,
                "wrong proof of possession",
            ));
        }
        {
            let mut st = s.state.lock();
            if st.gone || st.finishing {
                return Err(OpError::new(ErrorCode::Busy, "upload is being completed"));
            }
            st.finishing = true;
        }
        let result = (|| {
            let (num, fid, path) = self.new_file_slot()?;
            let rec = FileRec {
                id: fid.clone(),
                num,
                app: who.app.clone(),
                user: who.user.clone(),
                status: FILE_COMMITTING,
                path,
                size: src.size,
                sha256: src.sha256,
                name: s.rec.name.clone(),
                block_size: src.block_size,
                crcs: src.crcs.clone(),
                created: now_secs(),
                node: self.node.clone(),
            };
            // The temp file goes first: if we crash after the commit below, start-up sees a
            // session without its temp file and removes it.
            let _ = fs::remove_file(self.root.join(&s.rec.temp_path));
            self.commit_new_file(&rec, &src_path, true, Some(&s.rec.id))?;
            Ok(fid)
        })();
        match &result {
            Ok(fid) => {
                self.forget(&s.rec.id);
                info!(
                    "instant upload {}: file {fid} shares the content of {}",
                    hex::encode(id),
                    src.id
                );
            }
            Err(_) => s.state.lock().finishing = false,
        }
        result
    }

    // ---- stored files ----

    pub fn stat(&self, who: &Who, id: &str) -> OpResult<FileRec> {
        match self.meta.file(id, &who.app) {
            Ok(Some(f)) => Ok(f),
            Ok(None) => Err(OpError::new(
                ErrorCode::NotFound,
                format!("no such file {id}"),
            )),
            Err(e) => Err(db_err(e, "file lookup")),
        }
    }

    /// Opens a range for download and works out its CRC32C: from the stored per-block table
    /// when the range is whole blocks (no read at all), else by reading the range once.
    pub fn download(&self, who: &Who, req: &DownloadReq) -> OpResult<Download> {
        let f = self.stat(who, &req.file_id)?;
        if req.offset > f.size {
            return Err(OpError::new(
                ErrorCode::Range,
                format!(
                    "offset {} is past the end of the file ({} bytes)",
                    req.offset, f.size
                ),
            ));
        }
        let len = req.len.min(f.size - req.offset);
        let file = File::open(self.root.join(&f.path))
            .map_err(|e| io_err(&e, &format!("cannot open file {}", f.id)))?;
        let bs = u64::from(f.block_size);
        let end = req.offset + len;
        let blocks_ok = bs > 0 && f.crcs.len() as u64 == f.size.div_ceil(bs);
        let aligned = blocks_ok
            && len > 0
            && req.offset.is_multiple_of(bs)
            && (end.is_multiple_of(bs) || end == f.size);
        let crc = if aligned {
            let first = (req.offset / bs) as usize;
            let last = end.div_ceil(bs) as usize;
            let mut crc = 0u32;
            for i in first..last {
                let blen = bs.min(f.size - i as u64 * bs) as usize;
                crc = if i == first {
                    f.crcs[i]
                } else {
                    crc32c::crc32c_combine(crc, f.crcs[i], blen)
                };
            }
            crc
        } else {
            crc_range(&file, req.offset, len)
                .map_err(|e| io_err(&e, &format!("cannot read file {}", f.id)))?
        };
        Ok(Download {
            file,
            offset: req.offset,
            len,
            crc,
            zero_copy: aligned,
        })
    }

    pub fn delete(&self, who: &Who, id: &str) -> OpResult<()> {
        let f = match self.meta.delete_file(id, &who.app) {
            Ok(Some(f)) => f,
            Ok(None) => {
                return Err(OpError::new(
                    ErrorCode::NotFound,
                    format!("no such file {id}"),
                ));
            }
            Err(e) => return Err(db_err(e, "file delete")),
        };
        self.deleted.fetch_add(1, Ordering::Release);
        // The record is marked deleting (invisible) first, the bytes go next, the record last:
        // a crash anywhere in between is finished at start-up, so no file outlives its record.
        let path = self.root.join(&f.path);
        match fs::remove_file(&path) {
            Ok(()) => {
                let _ = fsync_dir(path.parent().unwrap_or(&self.root));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                // The record stays in `deleting`, so the next start-up tries again.
                warn!("file {id}: cannot remove {}: {e}", path.display());
                return Ok(());
            }
        }
        if let Err(e) = self.meta.drop_file(id) {
            warn!("file {id}: bytes removed but the record stays deleting until restart: {e:#}");
        }
        info!("file {id} deleted by app {} user {}", who.app, who.user);
        Ok(())
    }

    pub fn download_over(&self, who: &Who, id: &str) -> OpResult<()> {
        let f = self.stat(who, id)?;
        let n = self.downloads_over.fetch_add(1, Ordering::Relaxed) + 1;
        info!(
            "download of file {} ({} bytes) finished by app {} user {} ({n} so far)",
            f.id, f.size, who.app, who.user
        );
        Ok(())
    }

    /// Removes expired upload sessions and their temp files; returns how many. Finished
    /// uploads are remembered for one session lifetime, then forgotten too.
    pub fn reap(&self) -> usize {
        let now = now_ms();
        let ttl_ms = self.cfg.session_ttl_secs * 1000;
        if let Err(e) = self.meta.expire_finished(now.saturating_sub(ttl_ms)) {
            warn!("cannot expire finished uploads: {e:#}");
        }
        let candidates: Vec<Arc<Session>> = self.sessions.lock().values().cloned().collect();
        let mut n = 0;
        for s in candidates {
            {
                let st = s.state.lock();
                if !self.idle_out(&st) || st.finishing || !st.writing.is_empty() || st.gone {
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
            {
                let mut st = s.state.lock();
                if st.db_expires != seen {
                    st.active = Instant::now();
                    st.db_expires = seen;
                    continue;
                }
                if st.finishing || !st.writing.is_empty() || st.gone {
                    continue;
                }
                // Late writers here must not record blocks of a session being removed.
                st.gone = true;
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
                s.state.lock().gone = false;
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
    fn adopt_orphans(&self, now: u64) {
        let all = match self.meta.sessions() {
            Ok(all) => all,
            Err(e) => {
                warn!("cannot list upload sessions: {e:#}");
                return;
            }
        };
        for rec in all {
            if rec.expires_ms > now || self.sessions.lock().contains_key(&rec.id) {
                continue;
            }
            let hex_id = hex::encode(rec.id);
            let active = active_at_start(rec.expires_ms, now, self.cfg.session_ttl());
            match self.load_session(rec.clone(), active) {
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

/// SHA-256 of a byte range of a file.
fn hash_range(f: &File, off: u64, len: u64) -> io::Result<Digest32> {
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; HASH_CHUNK.min(len as usize).max(1)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        f.read_exact_at(&mut buf[..n], off + done)?;
        sha.update(&buf[..n]);
        done += n as u64;
    }
    Ok(sha.finalize().into())
}

/// CRC32C of a byte range of a file, read in bounded pieces.
fn crc_range(f: &File, off: u64, len: u64) -> io::Result<u32> {
    let mut buf = vec![0u8; (256 * 1024).min(len as usize).max(1)];
    let mut crc = 0;
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        f.read_exact_at(&mut buf[..n], off + done)?;
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        done += n as u64;
    }
    Ok(crc)
}

/// An opened download range: the connection sends `len` bytes at `offset` of `file`.
pub struct Download {
    pub file: File,
    pub offset: u64,
    pub len: u64,
    pub crc: u32,
    pub zero_copy: bool,
}

/// What to do with an UPLOAD_BLOCK payload.
pub enum BlockStart {
    /// Stream it to the file.
    Write(BlockWriter),
    /// Already stored: drain it unwritten and answer "already stored" (fencing).
    Stored,
}

/// Streams one block's payload to its place in the temp file. Dropped unfinished (connection
/// died mid-block), it releases the block, which stays missing.
pub struct BlockWriter {
    session: Arc<Session>,
    idx: u32,
    offset: u64,
    len: u64,
    pos: u64,
    crc: u32,
    expect: u32,
    err: Option<OpError>,
    done: bool,
}

impl BlockWriter {
    pub fn session(&self) -> &Arc<Session> {
        &self.session
    }

    pub fn write(&mut self, st: &Storage, data: &[u8]) {
        if self.err.is_none() {
            if let Err(e) = st.write_at(&self.session.file, data, self.offset + self.pos) {
                warn!(
                    "upload {} block {}: write failed: {e}",
                    hex::encode(self.session.rec.id),
                    self.idx
                );
                self.err = Some(io_err(&e, &format!("block {} write failed", self.idx)));
            }
            self.crc = crc32c::crc32c_append(self.crc, data);
        }
        self.pos += data.len() as u64;
    }

    /// The whole payload arrived: check it, make it durable, record it, then acknowledge.
    /// The whole payload arrived: checks its length and CRC. A verified block still has to be
    /// made durable and recorded ([`Storage::persist_blocks`]) before it is acknowledged.
    pub fn verify(mut self) -> OpResult<BlockWriter> {
        if let Some(e) = self.err.take() {
            return Err(e);
        }
        if self.pos != self.len {
            return Err(OpError::new(
                ErrorCode::BadBlock,
                "block payload length mismatch",
            ));
        }
        if self.crc != self.expect {
            warn!(
                "upload {} block {}: CRC32C {:08x} != announced {:08x}; block stays missing",
                hex::encode(self.session.rec.id),
                self.idx,
                self.crc,
                self.expect
            );
            return Err(OpError::new(
                ErrorCode::Crc,
                format!("block {} does not match its CRC32C", self.idx),
            ));
        }
        Ok(self)
    }
}

impl Storage {
    /// Makes verified blocks durable and records them, as one group: one fdatasync per file
    /// (`sync_blocks`), then one transaction for every block. Only then is a block stored (and
    /// may be acknowledged). Results come back in the order of `blocks`.
    pub fn persist_blocks(&self, mut blocks: Vec<BlockWriter>) -> Vec<OpResult<BlockAck>> {
        let mut results: Vec<Option<OpResult<BlockAck>>> = vec![None; blocks.len()];
        let group = BlockGroup(&blocks);
        self.phase("block-written", &group);
        if self.cfg.sync_blocks {
            let mut synced: HashMap<UploadId, Option<OpError>> = HashMap::new();
            for (i, w) in blocks.iter().enumerate() {
                let id = w.session.rec.id;
                let failed = synced.entry(id).or_insert_with(|| {
                    w.session
                        .file
                        .sync_data()
                        .err()
                        .map(|e| io_err(&e, "block sync failed"))
                });
                if let Some(e) = failed {
                    results[i] = Some(Err(e.clone()));
                }
            }
        }
        for (i, w) in blocks.iter().enumerate() {
            if results[i].is_none() && w.session.state.lock().gone {
                results[i] = Some(Err(OpError::new(
                    ErrorCode::UnknownUpload,
                    "upload session ended",
                )));
            }
        }
        self.phase("block-synced", &group);
        let expires = self.expiry();
        let marks: Vec<(UploadId, u32, u32)> = blocks
            .iter()
            .zip(&results)
            .filter(|(_, r)| r.is_none())
            .map(|(w, _)| (w.session.rec.id, w.idx, w.crc))
            .collect();
        if !marks.is_empty()
            && let Err(e) = self.meta.mark_blocks(&marks, expires)
        {
            let e = db_err(e, "block record");
            for r in results.iter_mut().filter(|r| r.is_none()) {
                *r = Some(Err(e.clone()));
            }
        }
        self.phase("block-recorded", &BlockGroup(&blocks));
        for (w, r) in blocks.iter_mut().zip(results.iter_mut()) {
            if r.is_some() {
                continue; // failed: dropping the writer releases the block, which stays missing
            }
            let mut state = w.session.state.lock();
            state.stored.set(w.idx);
            state.crcs[w.idx as usize] = w.crc;
            state.writing.remove(&w.idx);
            state.active = Instant::now();
            state.db_expires = expires;
            w.done = true;
            debug!(
                "upload {} block {} stored",
                hex::encode(w.session.rec.id),
                w.idx
            );
            *r = Some(Ok(BlockAck::Written));
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or(Err(OpError::new(
                    ErrorCode::Internal,
                    "block not persisted",
                )))
            })
            .collect()
    }
}

/// A group of blocks as the phase log names them: "upload <id> blocks [i, j, ...]".
struct BlockGroup<'a>(&'a [BlockWriter]);

impl std::fmt::Display for BlockGroup<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, w) in self.0.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(
                f,
                "{sep}upload {} block {}",
                hex::encode(w.session.rec.id),
                w.idx
            )?;
        }
        Ok(())
    }
}

impl Drop for BlockWriter {
    fn drop(&mut self) {
        if !self.done {
            self.session.state.lock().writing.remove(&self.idx);
        }
    }
}

type KeyClaims = Arc<Mutex<HashSet<(String, String, UploadId)>>>;

/// A small upload's key, held while it is written and committed; released on drop.
pub struct KeyClaim {
    set: KeyClaims,
    key: (String, String, UploadId),
    meta: Arc<dyn MetaStore>,
    node: String,
}

impl Drop for KeyClaim {
    fn drop(&mut self) {
        let (app, user, key) = &self.key;
        // The DB claim goes first, so that while the memory claim stands nobody here re-claims.
        if let Err(e) = self.meta.release_claim(app, user, key, &self.node) {
            // Left behind, it is taken over once this node is restarted or proved dead.
            warn!("cannot release the upload key claim of app {app} user {user}: {e:#}");
        }
        self.set.lock().remove(&self.key);
    }
}

/// What starting a small upload gives.
pub enum SmallStart {
    /// Write the payload through this.
    Write(Box<SmallWriter>),
    /// The same upload (same key) was stored before: this is its file id; drop the payload.
    Done(String),
}

/// Streams a small file's payload to a temp file, hashing as it goes. Dropped unfinished, it
/// removes the temp file.
pub struct SmallWriter {
    _claim: KeyClaim,
    who: Who,
    meta: UploadMeta,
    size: u64,
    file: File,
    tmp: PathBuf,
    pos: u64,
    sha: Sha256,
    crc: u32,
    crcs: Vec<u32>,
    block_size: u32,
    err: Option<OpError>,
    done: bool,
}

impl SmallWriter {
    pub fn write(&mut self, st: &Storage, mut data: &[u8]) {
        if self.err.is_none()
            && let Err(e) = st.write_at(&self.file, data, self.pos)
        {
            warn!("small upload {}: write failed: {e}", self.tmp.display());
            self.err = Some(io_err(&e, "file write failed"));
        }
        self.sha.update(data);
        // Per-block CRCs for downloads, even when the small-file limit exceeds the block size.
        let bs = u64::from(self.block_size);
        while !data.is_empty() {
            let in_block = self.pos % bs;
            let n = ((bs - in_block) as usize).min(data.len());
            self.crc = crc32c::crc32c_append(self.crc, &data[..n]);
            self.pos += n as u64;
            if self.pos.is_multiple_of(bs) {
                self.crcs.push(self.crc);
                self.crc = 0;
            }
            data = &data[n..];
        }
    }

    pub fn finish(mut self, st: &Storage) -> OpResult<String> {
        if let Some(e) = self.err.take() {
            return Err(e);
        }
        if !self.pos.is_multiple_of(u64::from(self.block_size)) {
            self.crcs.push(self.crc);
        }
        let sha = std::mem::take(&mut self.sha);
        let got: Digest32 = sha.finalize().into();
        if got != self.meta.sha256 || self.pos != self.size {
            return Err(OpError::new(
                ErrorCode::HashMismatch,
                "file bytes do not match the announced SHA-256",
            ));
        }
        self.file
            .sync_all()
            .map_err(|e| io_err(&e, "cannot sync the file"))?;
        let (num, id, path) = st.new_file_slot()?;
        let rec = FileRec {
            id: id.clone(),
            num,
            app: self.who.app.clone(),
            user: self.who.user.clone(),
            status: FILE_COMMITTING,
            path,
            size: self.size,
            sha256: got,
            name: self.meta.name.clone(),
            block_size: self.block_size,
            crcs: std::mem::take(&mut self.crcs),
            created: now_secs(),
            node: st.node.clone(),
        };
        st.commit_new_file(&rec, &self.tmp, false, Some(&self.meta.key))?;
        self.done = true;
        info!(
            "file {id} stored: {} bytes for app {} user {} at {}",
            self.size, self.who.app, self.who.user, rec.path
        );
        Ok(id)
    }
}

impl Drop for SmallWriter {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> Storage {
        Storage::open(Config {
            data: dir.to_path_buf(),
            ..Config::default()
        })
        .unwrap()
    }

    fn rec(id: &str, num: u64, path: &str) -> FileRec {
        FileRec {
            id: id.into(),
            num,
            app: "a".into(),
            user: "u".into(),
            status: FILE_COMMITTING,
            path: path.into(),
            size: 3,
            sha256: [0; 32],
            name: String::new(),
            block_size: 65536,
            crcs: vec![crc32c::crc32c(b"abc")],
            created: 0,
            node: String::new(),
        }
    }

    /// A crash between the rename and the final commit, and one before the rename.
    #[test]
    fn start_up_finishes_or_drops_interrupted_commits() {
        let dir = tempfile::tempdir().unwrap();
        let who = Who {
            app: "a".into(),
            user: "u".into(),
        };
        {
            let st = open(dir.path());
            let placed = file_path(900, 1);
            fs::create_dir_all(dir.path().join(&placed).parent().unwrap()).unwrap();
            fs::write(dir.path().join(&placed), b"abc").unwrap();
            st.meta
                .insert_file(&rec("renamed", 900, &placed), None)
                .unwrap();
            st.meta
                .insert_file(&rec("not-renamed", 901, &file_path(901, 1)), None)
                .unwrap();
            fs::write(dir.path().join(TMP).join("small-stray.part"), b"x").unwrap();
            assert_eq!(
                st.stat(&who, "renamed").unwrap_err().code,
                ErrorCode::NotFound
            );
            // A deletion cut short after the record was marked: invisible at once, and its
            // bytes are gone after the restart.
            let doomed = file_path(902, 1);
            fs::write(dir.path().join(&doomed), b"gone soon").unwrap();
            st.meta
                .insert_file(&rec("doomed", 902, &doomed), None)
                .unwrap();
            st.meta.commit_file("doomed").unwrap();
            assert!(st.meta.delete_file("doomed", "a").unwrap().is_some());
            assert_eq!(
                st.stat(&who, "doomed").unwrap_err().code,
                ErrorCode::NotFound
            );
            assert!(dir.path().join(&doomed).exists());
        }
        let st = open(dir.path());
        assert_eq!(st.stat(&who, "renamed").unwrap().size, 3);
        assert_eq!(
            st.stat(&who, "not-renamed").unwrap_err().code,
            ErrorCode::NotFound
        );
        assert!(
            st.meta
                .files_with_status(FILE_COMMITTING)
                .unwrap()
                .is_empty()
        );
        assert_eq!(fs::read_dir(dir.path().join(TMP)).unwrap().count(), 0);
        assert!(!dir.path().join(file_path(902, 1)).exists());
        assert!(st.meta.files_with_status(FILE_DELETING).unwrap().is_empty());
        let dl = st
            .download(
                &who,
                &DownloadReq {
                    file_id: "renamed".into(),
                    offset: 0,
                    len: 10,
                },
            )
            .unwrap();
        assert!(dl.zero_copy && dl.len == 3 && dl.crc == crc32c::crc32c(b"abc"));
    }

    fn open_node(dir: &Path, name: &str) -> anyhow::Result<Storage> {
        Storage::open(Config {
            data: dir.to_path_buf(),
            cluster: Some(crate::config::ClusterConfig {
                group: "g1".into(),
                trackers: vec!["127.0.0.1:9".parse().unwrap()],
                advertise: None,
                node_name: Some(name.into()),
            }),
            session_ttl_secs: 60,
            ..Config::default()
        })
    }

    fn who() -> Who {
        Who {
            app: "a".into(),
            user: "u".into(),
        }
    }

    /// Stores block `idx` (all bytes `fill`) of a 2-block, 64 KiB-block session.
    fn store_block(st: &Storage, id: &UploadId, idx: u32, fill: u8) {
        let data = vec![fill; 65536];
        let m = BlockMeta {
            upload_id: *id,
            index: idx,
            offset: u64::from(idx) * 65536,
            len: 65536,
            crc32c: crc32c::crc32c(&data),
        };
        let BlockStart::Write(mut w) = st.block_begin(&who(), &m).unwrap() else {
            panic!("block {idx} is new");
        };
        w.write(st, &data);
        let r = st.persist_blocks(vec![w.verify().unwrap()]);
        assert_eq!(r, vec![Ok(BlockAck::Written)]);
    }

    #[test]
    fn nodes_share_a_data_dir_and_lock_out_a_standalone_server() {
        let dir = tempfile::tempdir().unwrap();
        let a = open_node(dir.path(), "a").unwrap();
        let _b = open_node(dir.path(), "b").unwrap();
        let twin = open_node(dir.path(), "a").err().unwrap();
        assert!(twin.to_string().contains("already running"), "{twin}");
        let alone = Storage::open(Config {
            data: dir.path().to_path_buf(),
            ..Config::default()
        });
        assert!(alone.err().unwrap().to_string().contains("in use"));
        assert!(
            open_node(dir.path(), "../x").is_err(),
            "names are file names"
        );
        assert!(a.peer_alive("b") && !a.peer_alive("c") && !a.peer_alive(""));
    }

    /// A session begun on node A is resumed and finished through node B; B's blocks show in
    /// A's QUERY; B's start-up leaves A's temp file and committing row alone while A lives, and
    /// a later node cleans up after A once it is dead.
    #[test]
    fn a_peer_resumes_a_session_and_recovery_spares_live_peers() {
        let dir = tempfile::tempdir().unwrap();
        let a = open_node(dir.path(), "a").unwrap();
        let data: Vec<u8> = [vec![1u8; 65536], vec![2u8; 65536]].concat();
        let init = UploadInit {
            size: data.len() as u64,
            block_size: 65536,
            sha256: Sha256::digest(&data).into(),
            name: "f".into(),
        };
        let id = a.init(&who(), &init).unwrap().upload_id;
        store_block(&a, &id, 0, 1);
        // A's work in flight: a small upload's temp file and a committing row.
        fs::write(dir.path().join("tmp/a/small-x.part"), b"x").unwrap();
        let mut committing = rec("a-committing", 950, &file_path(950, 1));
        committing.node = "a".into();
        a.meta.insert_file(&committing, None).unwrap();

        let b = open_node(dir.path(), "b").unwrap();
        assert!(dir.path().join("tmp/a/small-x.part").exists());
        assert_eq!(a.meta.files_with_status(FILE_COMMITTING).unwrap().len(), 1);
        assert_eq!(b.query(&who(), &id).unwrap().count(), 1);
        store_block(&b, &id, 1, 2);
        assert_eq!(a.query(&who(), &id).unwrap().count(), 2, "A sees B's block");
        let fid = b.over(&who(), &id).unwrap();
        // A's stale session answers a repeated OVER with the file B made.
        assert_eq!(a.over(&who(), &id).unwrap(), fid);
        assert_eq!(a.stat(&who(), &fid).unwrap().size, 2 * 65536);

        drop(a); // A dies: its lock is free
        let c = open_node(dir.path(), "c").unwrap();
        assert!(!dir.path().join("tmp/a/small-x.part").exists());
        assert!(
            c.meta
                .files_with_status(FILE_COMMITTING)
                .unwrap()
                .is_empty()
        );
        assert_eq!(c.stat(&who(), &fid).unwrap().size, 2 * 65536);
    }

    #[test]
    fn a_small_upload_key_is_written_by_one_node_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let a = open_node(dir.path(), "a").unwrap();
        let b = open_node(dir.path(), "b").unwrap();
        let body = b"hello".to_vec();
        let meta = UploadMeta {
            key: [5; 16],
            sha256: Sha256::digest(&body).into(),
            name: "h".into(),
        };
        let SmallStart::Write(mut w) = a.small_begin(&who(), meta.clone(), 5).unwrap() else {
            panic!("new key");
        };
        let busy = b.small_begin(&who(), meta.clone(), 5);
        assert_eq!(busy.err().map(|e| e.code), Some(ErrorCode::Busy));
        w.write(&a, &body);
        let id = w.finish(&a).unwrap();
        match b.small_begin(&who(), meta.clone(), 5) {
            Ok(SmallStart::Done(again)) => assert_eq!(again, id),
            _ => panic!("the peer answers the finished key with its file id"),
        }
        // A claim left by a node that died mid-write is taken over; one of a live node is not.
        let key = [6; 16];
        let other = UploadMeta { key, ..meta };
        assert_eq!(
            a.meta.claim_key("a", "u", &key, "dead").unwrap(),
            Claim::Mine
        );
        assert!(matches!(
            b.small_begin(&who(), other.clone(), 5),
            Ok(SmallStart::Write(_))
        ));
        assert_eq!(a.meta.claim_key("a", "u", &key, "a").unwrap(), Claim::Mine);
        let busy = b.small_begin(&who(), other, 5);
        assert_eq!(busy.err().map(|e| e.code), Some(ErrorCode::Busy));
    }

    /// Node A's session is idle on A's clock, but B kept it alive in the DB: A must not reap
    /// it. Once nobody touched it for a whole TTL of A's clock, A reaps it.
    #[test]
    fn the_reaper_asks_the_database_before_removing_an_idle_session() {
        let dir = tempfile::tempdir().unwrap();
        let a = open_node(dir.path(), "a").unwrap();
        let init = UploadInit {
            size: 65536,
            block_size: 65536,
            sha256: [0; 32],
            name: "f".into(),
        };
        let id = a.init(&who(), &init).unwrap().upload_id;
        let s = a.sessions.lock().get(&id).cloned().unwrap();
        let long_ago = Instant::now().checked_sub(a.cfg.session_ttl() * 2).unwrap();
        s.state.lock().active = long_ago;
        let peer_expiry = s.state.lock().db_expires + 1;
        a.meta.touch_session(&id, peer_expiry).unwrap(); // B's activity
        assert_eq!(a.reap(), 0);
        assert!(a.meta.session(&id).unwrap().is_some());
        assert!(
            !a.idle_out(&s.state.lock()),
            "B's activity counts as activity"
        );
        s.state.lock().active = long_ago;
        assert_eq!(a.reap(), 1);
        assert!(a.meta.session(&id).unwrap().is_none());
        assert!(!dir.path().join(&s.rec.temp_path).exists());
    }

    /// A session whose node died for good (only in the DB, expired) is removed by a peer.
    #[test]
    fn a_departed_nodes_expired_session_is_reaped_by_a_peer() {
        let dir = tempfile::tempdir().unwrap();
        let b = open_node(dir.path(), "b").unwrap();
        let temp = "tmp/gone-node/x.part";
        fs::create_dir_all(dir.path().join("tmp/gone-node")).unwrap();
        fs::write(dir.path().join(temp), b"x").unwrap();
        let rec = SessionRec {
            id: [7; 16],
            app: "a".into(),
            user: "u".into(),
            size: 1,
            block_size: 65536,
            blocks: 1,
            sha256: [0; 32],
            name: "x".into(),
            temp_path: temp.into(),
            created: 0,
            expires_ms: now_ms() - 1,
            challenge: None,
        };
        b.meta.insert_session(&rec).unwrap();
        assert_eq!(b.reap(), 0, "adopted first");
        assert_eq!(b.reap(), 1);
        assert!(b.meta.session(&rec.id).unwrap().is_none());
        assert!(!dir.path().join(temp).exists());
    }

    #[test]
    fn new_data_directories_are_made_level_by_level_below_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("data/001/002/003");
        create_dirs_synced(&deep, dir.path()).unwrap();
        assert!(deep.is_dir());
        create_dirs_synced(&deep, dir.path()).unwrap();
        fs::write(dir.path().join("data/001/file"), b"x").unwrap();
        let blocked = dir.path().join("data/001/file/004");
        assert!(create_dirs_synced(&blocked, dir.path()).is_err());
    }

    #[test]
    fn a_data_dir_is_locked_by_one_server() {
        let dir = tempfile::tempdir().unwrap();
        let _first = open(dir.path());
        let err = Storage::open(Config {
            data: dir.path().to_path_buf(),
            ..Config::default()
        })
        .err()
        .unwrap();
        assert!(err.to_string().contains("in use"), "{err}");
    }

    #[test]
    fn unaligned_ranges_get_a_computed_crc_and_combined_blocks_match() {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path());
        let who = Who {
            app: "a".into(),
            user: "u".into(),
        };
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let meta = UploadMeta {
            key: [1; 16],
            sha256: Sha256::digest(&data).into(),
            name: "n".into(),
        };
        let SmallStart::Write(mut w) = st
            .small_begin(&who, meta.clone(), data.len() as u64)
            .unwrap()
        else {
            panic!("a new key starts a write");
        };
        // While it is being written, a retry with the same key waits.
        let busy = st.small_begin(&who, meta.clone(), data.len() as u64);
        assert_eq!(busy.err().map(|e| e.code), Some(ErrorCode::Busy));
        // Uneven pieces, as the network delivers them.
        for piece in data.chunks(7777) {
            w.write(&st, piece);
        }
        let id = w.finish(&st).unwrap();
        // Once stored, a retry with the same key gets the same file id and writes nothing.
        match st.small_begin(&who, meta, data.len() as u64) {
            Ok(SmallStart::Done(again)) => assert_eq!(again, id),
            _ => panic!("a finished key answers its file id"),
        }
        assert_eq!(
            st.stat(&who, &id).unwrap().crcs.len(),
            1,
            "4 MiB blocks: one"
        );
        for (off, len, zero_copy) in [(0, 300_000, true), (5, 1000, false), (199_999, 9, false)] {
            let req = DownloadReq {
                file_id: id.clone(),
                offset: off,
                len,
            };
            let dl = st.download(&who, &req).unwrap();
            let end = (off + len).min(data.len() as u64) as usize;
            assert_eq!(dl.crc, crc32c::crc32c(&data[off as usize..end]));
            assert_eq!(dl.zero_copy, zero_copy);
        }
    }
}
