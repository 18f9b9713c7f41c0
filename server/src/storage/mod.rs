//! The storage role: the data directory, upload sessions and every file operation, one module
//! per lifecycle phase. LIFECYCLE.md beside this file draws an upload session's and a stored
//! file's states, the function behind every transition and what survives `kill -9` after it.
//!
//! Connections call these methods on their worker threads; the disk I/O (pwrite, pread,
//! fsync, rename) happens inline there. Durability order for every new file: bytes written and
//! fsynced in `tmp/`, a *committing* file row, rename into `data/...`, fsync of the directory,
//! then the row is marked stored (and the upload session deleted) in one transaction. Start-up
//! finishes or rolls back whatever a crash interrupted (see [`Storage::open`]).

mod blocks;
mod datadir;
mod errors;
mod expiry;
mod faults;
mod finish;
mod quota;
mod recovery;
mod session;
mod sessions;
mod small;
mod stored;
#[cfg(test)]
mod tests;

pub use blocks::{BlockStart, BlockWriter};
pub use datadir::free_bytes;
pub use errors::{OpError, OpResult};
pub use session::Session;
pub use small::{KeyClaim, SmallStart, SmallWriter};
pub use stored::Download;

use datadir::{
    NODES, TMP, allocate, create_dirs_synced, fsync_dir, lock_data_dir, node_name, random_hex,
    volume_bytes,
};
use errors::{db_err, io_err};
use finish::NewFile;
use recovery::active_at_start;
use session::{HASH_CHUNK, HashProgress, Phase, SessionState};
use sessions::Since;
use small::KeyClaims;

use crate::config::Config;
use crate::ids::{IdAllocator, StepAllocator};
use crate::meta::{MetaStore, now_ms};
use ferry_common::proto::ErrorCode;
use log::info;
use parking_lot::Mutex;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Who a session speaks for (from its HELLO). Scopes every operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Who {
    pub app: String,
    pub user: String,
}

/// The storage role over one data directory.
pub struct Storage {
    pub cfg: Config,
    root: PathBuf,
    meta: Arc<dyn MetaStore>,
    ids: Arc<dyn IdAllocator>,
    sessions: Mutex<sessions::Table>,
    /// Small uploads being written now, by (app, user, upload key): a retry of one that is still
    /// committing waits (Busy) instead of storing a second copy.
    small_keys: KeyClaims,
    /// What the test-only faults (config `[faults]`) have counted.
    #[cfg(feature = "faults")]
    faults: faults::Counters,
    pub downloads_over: AtomicU64,
    /// Files deleted since start-up (see [`Storage::deletes`]).
    deleted: AtomicU64,
    /// A commit of this node failed after its row was inserted (see
    /// [`Storage::own_left_commit`]): its uploads' retries look for the file it left.
    commit_failed: std::sync::atomic::AtomicBool,
    /// This node's name among the peers sharing the data dir; empty for a standalone server.
    node: String,
    /// This node's temp dir relative to the data dir: `tmp` standalone, `tmp/<node>` on a node.
    tmp_rel: String,
    /// Held for the life of the process: standalone, `LOCK` exclusively (nothing else may use
    /// the data dir); a node, `LOCK` shared plus `nodes/<node>.lock` exclusively (peers yes,
    /// a standalone server or a second process with the same node name no).
    _locks: Vec<File>,
}

/// The group a node belongs to; "" for a standalone server.
fn group_of(cfg: &Config) -> &str {
    cfg.cluster.as_ref().map_or("", |c| c.group.as_str())
}

impl Storage {
    /// The group this node stores for ("" standalone): it names the group in new file ids.
    pub fn group(&self) -> &str {
        group_of(&self.cfg)
    }

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
        for d in [tmp_rel.as_str(), "data", NODES] {
            fs::create_dir_all(root.join(d))
                .with_context(|| format!("cannot create data dir {}", root.display()))?;
        }
        let locks = lock_data_dir(&root, &node)?;
        let meta = crate::meta::open(cfg.meta_url.as_deref(), &root, group_of(&cfg))?;
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
            sessions: Mutex::default(),
            small_keys: KeyClaims::default(),
            #[cfg(feature = "faults")]
            faults: faults::Counters::default(),
            downloads_over: AtomicU64::new(0),
            deleted: AtomicU64::new(0),
            commit_failed: std::sync::atomic::AtomicBool::new(false),
            node,
            tmp_rel,
            _locks: locks,
        };
        // A process without the storage role (a tracker) keeps no uploads: its
        // start-up must not finish or roll back the rows of the groups sharing its database.
        if st.cfg.has_role(crate::config::Role::Storage) {
            st.recover()?;
        }
        Ok(st)
    }

    /// This node's name ("" standalone).
    pub fn node(&self) -> &str {
        &self.node
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

    /// Refuses an upload of `size` bytes up front if it would leave less than `min_free_bytes`
    /// free on the data volume (the reserve keeps the metadata database, logs and other
    /// uploads' last blocks writable).
    pub(super) fn check_reserve(&self, size: u64) -> OpResult<()> {
        let free = free_bytes(&self.root);
        let reserve = self.cfg.min_free_bytes;
        if free < size.saturating_add(reserve) {
            // The figures go to the log: a tenant learns nothing about the volume (or, from
            // its free space, about other tenants' uploads).
            log::warn!(
                "upload of {size} bytes refused: it would leave under the {reserve}-byte \
                 free-space reserve ({free} bytes free)"
            );
            return Err(OpError::new(
                ErrorCode::NoSpace,
                format!("no room for {size} more bytes on this server now; try later"),
            ));
        }
        Ok(())
    }

    /// The wall-clock expiry recorded in the database for a session that stored a block now.
    pub(super) fn expiry(&self) -> u64 {
        now_ms() + self.cfg.session_ttl_secs * 1000
    }
}
