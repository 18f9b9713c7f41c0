//! Metadata store: files, upload sessions with their acknowledged blocks, small-upload key
//! claims and id steps.
//!
//! [`MetaStore`] is what the storage code uses. Two backends implement it with the same
//! schema and the same tests ([`tests`] runs every test body against both):
//! - [`SqliteStore`] ([`sqlite`]): the embedded default in `<data>/meta.db` (WAL, synced
//!   before a write returns, by one fsync shared among the writers waiting at the same moment:
//!   a returned write survives a process kill and a power cut);
//! - [`PgStore`] ([`pg`]): PostgreSQL through a small connection pool, shared by the storage
//!   nodes of a group (and the tracker and id roles).
//!
//! [`open`] picks the backend from `meta_url`.

pub mod pg;
pub mod sqlite;

pub use pg::PgStore;
pub use sqlite::SqliteStore;

use anyhow::{Context, Result};
use ferry_common::proto::{SHA256_LEN, UPLOAD_ID_LEN};
use std::path::Path;
use std::sync::Arc;

pub type UploadId = [u8; UPLOAD_ID_LEN];
pub type Sha256 = [u8; SHA256_LEN];

/// File status values (seed 004's `status` column).
pub const FILE_COMMITTING: u8 = 0;
pub const FILE_STORED: u8 = 1;
/// Being deleted: invisible, its bytes are being unlinked; start-up finishes the deletion.
pub const FILE_DELETING: u8 = 2;

/// The schema version both backends migrate to at start (table `schema_version`).
/// 1: files, sessions, blocks, finished uploads, id steps. 2: `files.node` (who is committing
/// a file) and `upload_claims` (small-upload keys being written, across nodes). 3: indexes on
/// `finished_uploads` by file (every commit and delete looks its upload up by file id) and by
/// age (the reaper's expiry); without them each of those scanned a day of uploads. 4: the
/// storage group (`grp`) of every file and upload session, so the groups sharing a database
/// keep to their own rows; older rows have group "" (a standalone server's).
pub const SCHEMA_VERSION: i64 = 5;

/// One stored file (or one committing; see [`FILE_COMMITTING`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRec {
    pub id: String,
    pub num: u64,
    pub app: String,
    pub user: String,
    pub status: u8,
    /// Relative to the data dir; always built by the server from `num`.
    pub path: String,
    pub size: u64,
    pub sha256: Sha256,
    pub name: String,
    pub block_size: u32,
    pub crcs: Vec<u32>,
    pub created: u64,
    /// The storage node that wrote the record (its name; empty for a standalone server): while
    /// the file is committing, only that node, or a peer that proved it dead, may finish it.
    pub node: String,
}

/// A user's stored bytes and files (see [`MetaStore::usage`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    pub bytes: u64,
    pub files: u64,
}

/// The proof-of-possession challenge of a session: hash `len` bytes at `off` of `file`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// Id of the stored file holding the same content.
    pub file: String,
    pub off: u64,
    pub len: u64,
}

/// One big-file upload session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRec {
    pub id: UploadId,
    pub app: String,
    pub user: String,
    pub size: u64,
    pub block_size: u32,
    pub blocks: u32,
    pub sha256: Sha256,
    pub name: String,
    /// Relative to the data dir.
    pub temp_path: String,
    pub created: u64,
    /// Unix milliseconds.
    pub expires_ms: u64,
    pub challenge: Option<Challenge>,
}

/// Who holds a small upload's key (see [`MetaStore::claim_key`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The caller holds it now.
    Mine,
    /// Another node holds it (named).
    Held(String),
}

/// What the storage role needs from a metadata backend. Every method is one transaction, and
/// every one is correct when several processes use the same database at once.
///
/// A store belongs to one storage group (see [`open`]): the records it inserts are that
/// group's, and the methods marked "(this group)" see no other group's records, so nothing a
/// node does to its own data directory can touch another group's files or uploads.
pub trait MetaStore: Send + Sync {
    /// Reserves `step` ids for `key` and returns the first; the range is never handed out again.
    fn reserve_ids(&self, key: &str, step: u64) -> Result<u64>;
    /// Inserts a committing file record of this group and, in the same transaction, records
    /// which upload (a big file's session id, or a small file's upload key) it finishes.
    fn insert_file(&self, f: &FileRec, upload: Option<&UploadId>) -> Result<()>;
    /// Marks a committing file stored and, in the same transaction, deletes the session it
    /// finishes (if any).
    fn commit_file(&self, id: &str) -> Result<()>;
    /// The stored file an upload (session id or small-file key) of (`app`, `user`) produced.
    fn finished_upload(&self, app: &str, user: &str, upload: &UploadId) -> Result<Option<String>>;
    /// The file an upload of (`app`, `user`) is being committed as, in this group: its node
    /// renamed the temp file into place and has not marked the record stored yet (or died
    /// in between).
    fn committing_upload(
        &self,
        app: &str,
        user: &str,
        upload: &UploadId,
    ) -> Result<Option<FileRec>>;
    /// Forgets finished uploads older than `before_ms`; returns how many.
    fn expire_finished(&self, before_ms: u64) -> Result<usize>;
    /// A file visible to `app` (stored, not committing).
    fn file(&self, id: &str, app: &str) -> Result<Option<FileRec>>;
    /// What `user` of `app` stores: bytes and files (committing and stored, in every group),
    /// for quotas.
    fn usage(&self, app: &str, user: &str) -> Result<Usage>;
    /// The group holding a stored file of `app` (any group; "" for rows from before groups
    /// were recorded): the tracker routes ids that do not name their group by it.
    fn file_group(&self, id: &str, app: &str) -> Result<Option<String>>;
    /// A stored file of `app` with this content, for instant upload (this group: content in
    /// another group's data directory cannot be linked).
    fn find_content(&self, app: &str, sha256: &Sha256, size: u64) -> Result<Option<FileRec>>;
    /// Marks a stored file of `app` deleting (invisible from then on), returning it; the caller
    /// unlinks its bytes and then drops the record (this group: only it holds the bytes). With
    /// `owner`, only a file that user uploaded (`None` also for another user's file). A file
    /// already deleting is returned again: a retry whose first attempt marked it but never
    /// heard so (the database restarting at the commit) finishes the deletion.
    fn delete_file(&self, id: &str, app: &str, owner: Option<&str>) -> Result<Option<FileRec>>;
    /// Deletes any file record (after a deletion's unlink, or start-up clean-up).
    fn drop_file(&self, id: &str) -> Result<()>;
    /// Every file record in `status` (this group; start-up: committing and deleting ones).
    fn files_with_status(&self, status: u8) -> Result<Vec<FileRec>>;
    /// Inserts a session of this group.
    fn insert_session(&self, s: &SessionRec) -> Result<()>;
    /// Every session (this group: start-up recovery and the reaper's adoption).
    fn sessions(&self) -> Result<Vec<SessionRec>>;
    /// One session (a peer started it, or this node forgot it).
    fn session(&self, id: &UploadId) -> Result<Option<SessionRec>>;
    /// The most recently opened session of this app and user for this content that has not
    /// expired at `now_ms` (this group; UPLOAD_INIT resumes it on any node of the group).
    fn open_session(
        &self,
        app: &str,
        user: &str,
        size: u64,
        block_size: u32,
        sha256: &Sha256,
        now_ms: u64,
    ) -> Result<Option<SessionRec>>;
    /// (index, crc) of every acknowledged block of a session.
    fn session_blocks(&self, id: &UploadId) -> Result<Vec<(u32, u32)>>;
    /// Records blocks (upload id, index, crc) as stored, in one transaction, and refreshes
    /// their sessions' expiry.
    fn mark_blocks(&self, blocks: &[(UploadId, u32, u32)], expires_ms: u64) -> Result<()>;
    /// Forgets blocks (found damaged when the file was re-read).
    fn unmark_blocks(&self, id: &UploadId, idx: &[u32]) -> Result<()>;
    fn set_challenge(&self, id: &UploadId, c: Option<&Challenge>) -> Result<()>;
    fn delete_session(&self, id: &UploadId) -> Result<()>;
    /// Deletes a session (and its blocks) only if its expiry is still `seen_expires_ms`: every
    /// node writes a new expiry on activity, so an unchanged one means no node used the session
    /// since the caller looked. True when it was deleted.
    fn expire_session(&self, id: &UploadId, seen_expires_ms: u64) -> Result<bool>;
    /// Claims a small upload's key for `node` while it writes the file. A claim `node` already
    /// held is left over from its previous life (the per-node lock proves that process dead)
    /// and is taken again.
    fn claim_key(&self, app: &str, user: &str, key: &UploadId, node: &str) -> Result<Claim>;
    /// Moves a claim from a node proved dead to `node`; false when `from` no longer holds it.
    fn take_claim(
        &self,
        app: &str,
        user: &str,
        key: &UploadId,
        from: &str,
        node: &str,
    ) -> Result<bool>;
    /// Releases `node`'s claim (the upload finished or failed).
    fn release_claim(&self, app: &str, user: &str, key: &UploadId, node: &str) -> Result<()>;
}

/// Opens the backend `meta_url` names: unset = SQLite at `<data>/meta.db`,
/// `postgres://` or `postgresql://` = PostgreSQL. The store writes its files and sessions as
/// storage group `group`'s ("" standalone), and recovery, expiry, deletes, deduplication and
/// resuming by content see only that group's: the groups of a cluster share one database but
/// each has its own data directory.
pub fn open(meta_url: Option<&str>, data: &Path, group: &str) -> Result<Arc<dyn MetaStore>> {
    match backend(meta_url)? {
        Backend::Sqlite => Ok(Arc::new(
            SqliteStore::open(&data.join("meta.db"))?.in_group(group),
        )),
        Backend::Pg(url) => Ok(Arc::new(PgStore::open(url)?.in_group(group))),
    }
}

/// Where `meta_url` puts metadata (the storage role's and the cluster roles' alike).
pub enum Backend<'a> {
    /// The embedded database, `<data>/meta.db`.
    Sqlite,
    /// PostgreSQL at this URL.
    Pg(&'a str),
}

/// Reads `meta_url`: unset = SQLite, `postgres://` or `postgresql://` = PostgreSQL, anything
/// else an error naming only the scheme (the URL may carry a password).
pub fn backend(meta_url: Option<&str>) -> Result<Backend<'_>> {
    match meta_url {
        None => Ok(Backend::Sqlite),
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            Ok(Backend::Pg(url))
        }
        Some(url) => {
            let scheme = url.split(':').next().unwrap_or("");
            anyhow::bail!("meta_url: unsupported scheme {scheme:?} (use postgres://...)")
        }
    }
}

pub(crate) fn crcs_to_blob(crcs: &[u32]) -> Vec<u8> {
    crcs.iter().flat_map(|c| c.to_be_bytes()).collect()
}

pub(crate) fn blob_to_crcs(b: &[u8]) -> Result<Vec<u32>> {
    if !b.len().is_multiple_of(4) {
        anyhow::bail!("crcs column of {} bytes is not a list of u32", b.len());
    }
    Ok(b.chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// A fixed-size byte column (ids, hashes) checked for its length.
pub(crate) fn to_arr<const N: usize>(v: Vec<u8>, what: &'static str) -> Result<[u8; N]> {
    let len = v.len();
    v.try_into()
        .map_err(|_| anyhow::anyhow!("{what} column has {len} bytes, want {N}"))
}

/// An integer column converted to the type the record holds, refusing what does not fit.
pub(crate) fn int<T: TryFrom<i64>>(v: i64, what: &'static str) -> Result<T> {
    T::try_from(v)
        .ok()
        .with_context(|| format!("{what} column holds {v}, out of range"))
}

pub use ferry_common::clock::{now_ms, now_secs};

#[cfg(test)]
mod plans;
#[cfg(test)]
pub(crate) mod tests;
