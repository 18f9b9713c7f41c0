//! Metadata store: files, upload sessions with their acknowledged blocks, and id steps.
//!
//! [`MetaStore`] is what the storage code uses; [`SqliteStore`] is the embedded default (WAL +
//! `synchronous=FULL`, so a committed transaction survives a process kill and a power cut). A
//! PostgreSQL backend can implement the same trait with the same schema.

use anyhow::{Context, Result};
use ferry_common::proto::{SHA256_LEN, UPLOAD_ID_LEN};
use parking_lot::Mutex;
use rusqlite::{Connection, OptionalExtension, params};
use std::path::Path;

pub type UploadId = [u8; UPLOAD_ID_LEN];
pub type Sha256 = [u8; SHA256_LEN];

/// File status values (seed 004's `status` column).
pub const FILE_COMMITTING: u8 = 0;
pub const FILE_STORED: u8 = 1;
/// Being deleted: invisible, its bytes are being unlinked; start-up finishes the deletion.
pub const FILE_DELETING: u8 = 2;

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

/// What the storage role needs from a metadata backend. Every method is one transaction.
pub trait MetaStore: Send + Sync {
    /// Reserves `step` ids for `key` and returns the first; the range is never handed out again.
    fn reserve_ids(&self, key: &str, step: u64) -> Result<u64>;
    /// Inserts a committing file record and, in the same transaction, records which upload
    /// (a big file's session id, or a small file's upload key) it finishes.
    fn insert_file(&self, f: &FileRec, upload: Option<&UploadId>) -> Result<()>;
    /// Marks a committing file stored and, in the same transaction, deletes the session it
    /// finishes (if any).
    fn commit_file(&self, id: &str) -> Result<()>;
    /// The stored file an upload (session id or small-file key) of (`app`, `user`) produced.
    fn finished_upload(&self, app: &str, user: &str, upload: &UploadId) -> Result<Option<String>>;
    /// Forgets finished uploads older than `before_ms`; returns how many.
    fn expire_finished(&self, before_ms: u64) -> Result<usize>;
    /// A file visible to `app` (stored, not committing).
    fn file(&self, id: &str, app: &str) -> Result<Option<FileRec>>;
    /// A stored file of `app` with this content, for instant upload.
    fn find_content(&self, app: &str, sha256: &Sha256, size: u64) -> Result<Option<FileRec>>;
    /// Marks a stored file of `app` deleting (invisible from then on), returning it; the caller
    /// unlinks its bytes and then drops the record.
    fn delete_file(&self, id: &str, app: &str) -> Result<Option<FileRec>>;
    /// Deletes any file record (after a deletion's unlink, or start-up clean-up).
    fn drop_file(&self, id: &str) -> Result<()>;
    /// Every file record in `status` (start-up: committing and deleting ones).
    fn files_with_status(&self, status: u8) -> Result<Vec<FileRec>>;
    fn insert_session(&self, s: &SessionRec) -> Result<()>;
    fn sessions(&self) -> Result<Vec<SessionRec>>;
    /// (index, crc) of every acknowledged block of a session.
    fn session_blocks(&self, id: &UploadId) -> Result<Vec<(u32, u32)>>;
    /// Records blocks (upload id, index, crc) as stored, in one transaction, and refreshes
    /// their sessions' expiry.
    fn mark_blocks(&self, blocks: &[(UploadId, u32, u32)], expires_ms: u64) -> Result<()>;
    /// Forgets blocks (found damaged when the file was re-read).
    fn unmark_blocks(&self, id: &UploadId, idx: &[u32]) -> Result<()>;
    fn touch_session(&self, id: &UploadId, expires_ms: u64) -> Result<()>;
    fn set_challenge(&self, id: &UploadId, c: Option<&Challenge>) -> Result<()>;
    fn delete_session(&self, id: &UploadId) -> Result<()>;
}

/// SQLite through one connection behind a mutex: metadata writes are tiny next to the block
/// I/O around them, and one writer is what SQLite serialises to anyway.
pub struct SqliteStore {
    db: Mutex<Connection>,
}

const SCHEMA: &str = include_str!("schema.sql");

fn crcs_to_blob(crcs: &[u32]) -> Vec<u8> {
    crcs.iter().flat_map(|c| c.to_be_bytes()).collect()
}

fn blob_to_crcs(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn to_arr<const N: usize>(v: Vec<u8>, what: &'static str) -> rusqlite::Result<[u8; N]> {
    v.try_into().map_err(|_| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Blob,
            format!("{what} has the wrong length").into(),
        )
    })
}

const FILE_COLS: &str =
    "id, num, app, user, status, path, size, sha256, name, block_size, crcs, created";

fn file_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<FileRec> {
    Ok(FileRec {
        id: r.get(0)?,
        num: r.get::<_, i64>(1)? as u64,
        app: r.get(2)?,
        user: r.get(3)?,
        status: r.get(4)?,
        path: r.get(5)?,
        size: r.get::<_, i64>(6)? as u64,
        sha256: to_arr(r.get(7)?, "sha256")?,
        name: r.get(8)?,
        block_size: r.get(9)?,
        crcs: blob_to_crcs(&r.get::<_, Vec<u8>>(10)?),
        created: r.get::<_, i64>(11)? as u64,
    })
}

const SESSION_COLS: &str = "id, app, user, size, block_size, blocks, sha256, name, temp_path, \
                            created, expires, challenge_file, challenge_off, challenge_len";

fn session_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SessionRec> {
    let file: Option<String> = r.get(11)?;
    Ok(SessionRec {
        id: to_arr(r.get(0)?, "upload id")?,
        app: r.get(1)?,
        user: r.get(2)?,
        size: r.get::<_, i64>(3)? as u64,
        block_size: r.get(4)?,
        blocks: r.get(5)?,
        sha256: to_arr(r.get(6)?, "sha256")?,
        name: r.get(7)?,
        temp_path: r.get(8)?,
        created: r.get::<_, i64>(9)? as u64,
        expires_ms: r.get::<_, i64>(10)? as u64,
        challenge: match file {
            Some(file) => Some(Challenge {
                file,
                off: r.get::<_, i64>(12)? as u64,
                len: r.get::<_, i64>(13)? as u64,
            }),
            None => None,
        },
    })
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<SqliteStore> {
        let db = Connection::open(path)
            .with_context(|| format!("cannot open metadata db {}", path.display()))?;
        // WAL: readers never block the writer; FULL: a commit is on disk before it returns.
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.busy_timeout(std::time::Duration::from_secs(10))?;
        db.execute_batch(SCHEMA)
            .with_context(|| format!("cannot apply schema to {}", path.display()))?;
        Ok(SqliteStore { db: Mutex::new(db) })
    }

    /// An in-memory store for unit tests.
    pub fn memory() -> Result<SqliteStore> {
        let db = Connection::open_in_memory()?;
        db.execute_batch(SCHEMA)?;
        Ok(SqliteStore { db: Mutex::new(db) })
    }
}

impl MetaStore for SqliteStore {
    fn reserve_ids(&self, key: &str, step: u64) -> Result<u64> {
        let mut db = self.db.lock();
        let tx = db.transaction()?;
        // Ids start at 1 so that 0 never names a file.
        let next: i64 = tx
            .query_row("SELECT next FROM id_steps WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()?
            .unwrap_or(1);
        let end = (next as u64)
            .checked_add(step)
            .context("id space exhausted")?;
        tx.execute(
            "INSERT INTO id_steps (key, next, updated) VALUES (?1, ?2, ?3) \
             ON CONFLICT(key) DO UPDATE SET next = ?2, updated = ?3",
            params![key, end as i64, now_secs() as i64],
        )?;
        tx.commit()?;
        Ok(next as u64)
    }

    fn insert_file(&self, f: &FileRec, upload: Option<&UploadId>) -> Result<()> {
        let now = now_secs() as i64;
        let mut db = self.db.lock();
        let tx = db.transaction()?;
        tx.execute(
            &format!(
                "INSERT INTO files ({FILE_COLS}, updated) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
            ),
            params![
                f.id,
                f.num as i64,
                f.app,
                f.user,
                f.status,
                f.path,
                f.size as i64,
                f.sha256.as_slice(),
                f.name,
                f.block_size,
                crcs_to_blob(&f.crcs),
                f.created as i64,
                now
            ],
        )?;
        if let Some(u) = upload {
            tx.execute(
                "INSERT OR REPLACE INTO finished_uploads (upload_id, app, user, file_id, finished) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![u.as_slice(), f.app, f.user, f.id, now_ms() as i64],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn commit_file(&self, id: &str) -> Result<()> {
        let mut db = self.db.lock();
        let tx = db.transaction()?;
        tx.execute(
            "UPDATE files SET status = ?2, updated = ?3 WHERE id = ?1",
            params![id, FILE_STORED, now_secs() as i64],
        )?;
        let finishes = "SELECT upload_id FROM finished_uploads WHERE file_id = ?1";
        tx.execute(
            &format!("DELETE FROM session_blocks WHERE upload_id IN ({finishes})"),
            [id],
        )?;
        tx.execute(
            &format!("DELETE FROM upload_sessions WHERE id IN ({finishes})"),
            [id],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn finished_upload(&self, app: &str, user: &str, upload: &UploadId) -> Result<Option<String>> {
        let db = self.db.lock();
        Ok(db
            .query_row(
                "SELECT u.file_id FROM finished_uploads u JOIN files f ON f.id = u.file_id \
                 WHERE u.upload_id = ?1 AND u.app = ?2 AND u.user = ?3 AND f.status = ?4",
                params![upload.as_slice(), app, user, FILE_STORED],
                |r| r.get(0),
            )
            .optional()?)
    }

    fn expire_finished(&self, before_ms: u64) -> Result<usize> {
        let db = self.db.lock();
        Ok(db.execute(
            "DELETE FROM finished_uploads WHERE finished < ?1",
            [before_ms as i64],
        )?)
    }

    fn file(&self, id: &str, app: &str) -> Result<Option<FileRec>> {
        let db = self.db.lock();
        Ok(db
            .query_row(
                &format!(
                    "SELECT {FILE_COLS} FROM files WHERE id = ?1 AND app = ?2 AND status = ?3"
                ),
                params![id, app, FILE_STORED],
                file_row,
            )
            .optional()?)
    }

    fn find_content(&self, app: &str, sha256: &Sha256, size: u64) -> Result<Option<FileRec>> {
        let db = self.db.lock();
        Ok(db
            .query_row(
                &format!(
                    "SELECT {FILE_COLS} FROM files \
                     WHERE app = ?1 AND sha256 = ?2 AND size = ?3 AND status = ?4 LIMIT 1"
                ),
                params![app, sha256.as_slice(), size as i64, FILE_STORED],
                file_row,
            )
            .optional()?)
    }

    fn delete_file(&self, id: &str, app: &str) -> Result<Option<FileRec>> {
        let mut db = self.db.lock();
        let tx = db.transaction()?;
        let rec = tx
            .query_row(
                &format!(
                    "SELECT {FILE_COLS} FROM files WHERE id = ?1 AND app = ?2 AND status = ?3"
                ),
                params![id, app, FILE_STORED],
                file_row,
            )
            .optional()?;
        if rec.is_some() {
            tx.execute(
                "UPDATE files SET status = ?2, updated = ?3 WHERE id = ?1",
                params![id, FILE_DELETING, now_secs() as i64],
            )?;
            tx.execute("DELETE FROM finished_uploads WHERE file_id = ?1", [id])?;
        }
        tx.commit()?;
        Ok(rec)
    }

    fn drop_file(&self, id: &str) -> Result<()> {
        let mut db = self.db.lock();
        let tx = db.transaction()?;
        tx.execute("DELETE FROM finished_uploads WHERE file_id = ?1", [id])?;
        tx.execute("DELETE FROM files WHERE id = ?1", [id])?;
        tx.commit()?;
        Ok(())
    }

    fn files_with_status(&self, status: u8) -> Result<Vec<FileRec>> {
        let db = self.db.lock();
        let mut st = db.prepare(&format!("SELECT {FILE_COLS} FROM files WHERE status = ?1"))?;
        let rows = st.query_map([status], file_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn insert_session(&self, s: &SessionRec) -> Result<()> {
        let (cf, co, cl) = match &s.challenge {
            Some(c) => (Some(c.file.as_str()), c.off as i64, c.len as i64),
            None => (None, 0, 0),
        };
        self.db.lock().execute(
            &format!(
                "INSERT INTO upload_sessions ({SESSION_COLS}) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"
            ),
            params![
                s.id.as_slice(),
                s.app,
                s.user,
                s.size as i64,
                s.block_size,
                s.blocks,
                s.sha256.as_slice(),
                s.name,
                s.temp_path,
                s.created as i64,
                s.expires_ms as i64,
                cf,
                co,
                cl
            ],
        )?;
        Ok(())
    }

    fn sessions(&self) -> Result<Vec<SessionRec>> {
        let db = self.db.lock();
        let mut st = db.prepare(&format!("SELECT {SESSION_COLS} FROM upload_sessions"))?;
        let rows = st.query_map([], session_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn session_blocks(&self, id: &UploadId) -> Result<Vec<(u32, u32)>> {
        let db = self.db.lock();
        let mut st = db.prepare("SELECT idx, crc FROM session_blocks WHERE upload_id = ?1")?;
        let rows = st.query_map([id.as_slice()], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn mark_blocks(&self, blocks: &[(UploadId, u32, u32)], expires_ms: u64) -> Result<()> {
        let mut db = self.db.lock();
        let tx = db.transaction()?;
        for (id, idx, crc) in blocks {
            tx.execute(
                "INSERT OR REPLACE INTO session_blocks (upload_id, idx, crc) VALUES (?1, ?2, ?3)",
                params![id.as_slice(), idx, crc],
            )?;
            tx.execute(
                "UPDATE upload_sessions SET expires = ?2 WHERE id = ?1",
                params![id.as_slice(), expires_ms as i64],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn unmark_blocks(&self, id: &UploadId, idx: &[u32]) -> Result<()> {
        let mut db = self.db.lock();
        let tx = db.transaction()?;
        for i in idx {
            tx.execute(
                "DELETE FROM session_blocks WHERE upload_id = ?1 AND idx = ?2",
                params![id.as_slice(), i],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn touch_session(&self, id: &UploadId, expires_ms: u64) -> Result<()> {
        self.db.lock().execute(
            "UPDATE upload_sessions SET expires = ?2 WHERE id = ?1",
            params![id.as_slice(), expires_ms as i64],
        )?;
        Ok(())
    }

    fn set_challenge(&self, id: &UploadId, c: Option<&Challenge>) -> Result<()> {
        let (cf, co, cl) = match c {
            Some(c) => (Some(c.file.as_str()), c.off as i64, c.len as i64),
            None => (None, 0, 0),
        };
        self.db.lock().execute(
            "UPDATE upload_sessions SET challenge_file = ?2, challenge_off = ?3, \
             challenge_len = ?4 WHERE id = ?1",
            params![id.as_slice(), cf, co, cl],
        )?;
        Ok(())
    }

    fn delete_session(&self, id: &UploadId) -> Result<()> {
        let mut db = self.db.lock();
        let tx = db.transaction()?;
        tx.execute(
            "DELETE FROM session_blocks WHERE upload_id = ?1",
            [id.as_slice()],
        )?;
        tx.execute("DELETE FROM upload_sessions WHERE id = ?1", [id.as_slice()])?;
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(id: &str, num: u64) -> FileRec {
        FileRec {
            id: id.into(),
            num,
            app: "app".into(),
            user: "u".into(),
            status: FILE_COMMITTING,
            path: format!("data/{num}"),
            size: 10,
            sha256: [7; 32],
            name: "n".into(),
            block_size: 65536,
            crcs: vec![1, 2],
            created: 5,
        }
    }

    #[test]
    fn files_are_visible_once_committed_and_only_to_their_app() {
        let m = SqliteStore::memory().unwrap();
        m.insert_file(&file("a", 1), None).unwrap();
        assert_eq!(m.file("a", "app").unwrap(), None);
        assert_eq!(m.files_with_status(FILE_COMMITTING).unwrap().len(), 1);
        m.commit_file("a").unwrap();
        let got = m.file("a", "app").unwrap().unwrap();
        assert_eq!(got.crcs, vec![1, 2]);
        assert_eq!(got.status, FILE_STORED);
        assert_eq!(m.file("a", "other").unwrap(), None);
        assert!(m.find_content("app", &[7; 32], 10).unwrap().is_some());
        assert!(m.find_content("app", &[7; 32], 11).unwrap().is_none());
        assert!(m.delete_file("a", "other").unwrap().is_none());
        assert!(m.delete_file("a", "app").unwrap().is_some());
        assert!(m.file("a", "app").unwrap().is_none());
    }

    #[test]
    fn sessions_and_blocks_round_trip() {
        let m = SqliteStore::memory().unwrap();
        let s = SessionRec {
            id: [3; 16],
            app: "a".into(),
            user: "u".into(),
            size: 100,
            block_size: 65536,
            blocks: 1,
            sha256: [1; 32],
            name: "x".into(),
            temp_path: "tmp/x".into(),
            created: 1,
            expires_ms: 2,
            challenge: None,
        };
        m.insert_session(&s).unwrap();
        m.mark_blocks(&[(s.id, 0, 99)], 50).unwrap();
        let c = Challenge {
            file: "f".into(),
            off: 3,
            len: 4,
        };
        m.set_challenge(&s.id, Some(&c)).unwrap();
        let got = m.sessions().unwrap();
        assert_eq!(got[0].expires_ms, 50);
        assert_eq!(got[0].challenge, Some(c));
        assert_eq!(m.session_blocks(&s.id).unwrap(), vec![(0, 99)]);
        m.unmark_blocks(&s.id, &[0]).unwrap();
        assert!(m.session_blocks(&s.id).unwrap().is_empty());
        m.delete_session(&s.id).unwrap();
        assert!(m.sessions().unwrap().is_empty());
    }

    #[test]
    fn id_steps_never_overlap() {
        let m = SqliteStore::memory().unwrap();
        let a = m.reserve_ids("data", 10).unwrap();
        let b = m.reserve_ids("data", 10).unwrap();
        assert_eq!(a, 1);
        assert_eq!(b, 11);
    }
}
