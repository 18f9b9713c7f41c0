//! The embedded SQLite backend of [`MetaStore`].

use super::{
    Challenge, Claim, FILE_COMMITTING, FILE_DELETING, FILE_STORED, FileRec, MetaStore,
    SCHEMA_VERSION, SessionRec, Sha256, UploadId, Usage, blob_to_crcs, crcs_to_blob, int, now_ms,
    now_secs, to_arr,
};
use crate::sync_group::SyncGroup;
use anyhow::{Context, Result};
use parking_lot::Mutex;
use rusqlite::{Connection, OptionalExtension, params};
use std::path::{Path, PathBuf};

/// SQLite through one connection behind a mutex: metadata writes are tiny next to the block
/// I/O around them, and one writer is what SQLite serialises to anyway.
///
/// Group commit: transactions commit to the WAL without a sync (`synchronous=NORMAL`), and a
/// write that must survive a power cut then syncs the WAL through [`SyncGroup`], outside the
/// connection's lock: concurrent writers share one fsync of the WAL, which covers every commit
/// written before it started. That is what `synchronous=FULL` does per commit, once for many.
pub struct SqliteStore {
    pub(super) db: Mutex<Connection>,
    /// `<db>-wal` and the syncs of it; none for an in-memory database.
    wal: Option<(PathBuf, SyncGroup)>,
    /// The storage group whose rows this store writes and recovers ("" standalone).
    group: String,
}

const SCHEMA: &str = include_str!("schema.sql");

const FILE_COLS: &str =
    "id, num, app, user, status, path, size, sha256, name, block_size, crcs, created, node";

/// A column value the record cannot hold, as a rusqlite error (so it fails the query).
fn bad(e: anyhow::Error) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Blob, e.into())
}

fn file_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<FileRec> {
    Ok(FileRec {
        id: r.get(0)?,
        num: int(r.get(1)?, "num").map_err(bad)?,
        app: r.get(2)?,
        user: r.get(3)?,
        status: r.get(4)?,
        path: r.get(5)?,
        size: int(r.get(6)?, "size").map_err(bad)?,
        sha256: to_arr(r.get(7)?, "sha256").map_err(bad)?,
        name: r.get(8)?,
        block_size: r.get(9)?,
        crcs: blob_to_crcs(&r.get::<_, Vec<u8>>(10)?).map_err(bad)?,
        created: int(r.get(11)?, "created").map_err(bad)?,
        node: r.get(12)?,
    })
}

const SESSION_COLS: &str = "id, app, user, size, block_size, blocks, sha256, name, temp_path, \
                            created, expires, challenge_file, challenge_off, challenge_len";

fn session_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SessionRec> {
    let file: Option<String> = r.get(11)?;
    Ok(SessionRec {
        id: to_arr(r.get(0)?, "upload id").map_err(bad)?,
        app: r.get(1)?,
        user: r.get(2)?,
        size: int(r.get(3)?, "size").map_err(bad)?,
        block_size: r.get(4)?,
        blocks: r.get(5)?,
        sha256: to_arr(r.get(6)?, "sha256").map_err(bad)?,
        name: r.get(7)?,
        temp_path: r.get(8)?,
        created: int(r.get(9)?, "created").map_err(bad)?,
        expires_ms: int(r.get(10)?, "expires").map_err(bad)?,
        challenge: match file {
            Some(file) => Some(Challenge {
                file,
                off: int(r.get(12)?, "challenge_off").map_err(bad)?,
                len: int(r.get(13)?, "challenge_len").map_err(bad)?,
            }),
            None => None,
        },
    })
}

/// The steps from one schema version to the next: `(version it brings the database to, SQL)`.
const STEPS: &[(i64, &str)] = &[
    (
        2,
        "ALTER TABLE files ADD COLUMN node TEXT NOT NULL DEFAULT ''; \
         CREATE TABLE upload_claims ( \
             app TEXT NOT NULL, user TEXT NOT NULL, key BLOB NOT NULL, \
             node TEXT NOT NULL, claimed INTEGER NOT NULL, \
             PRIMARY KEY (app, user, key)) WITHOUT ROWID;",
    ),
    (
        3,
        "CREATE INDEX finished_file ON finished_uploads (file_id); \
         CREATE INDEX finished_age ON finished_uploads (finished);",
    ),
    (
        4,
        "ALTER TABLE files ADD COLUMN grp TEXT NOT NULL DEFAULT ''; \
         ALTER TABLE upload_sessions ADD COLUMN grp TEXT NOT NULL DEFAULT '';",
    ),
    (
        5,
        "CREATE INDEX IF NOT EXISTS files_owner ON files (app, user);",
    ),
];

// The last step is the version this server writes.
const _: () = assert!(STEPS[STEPS.len() - 1].0 == SCHEMA_VERSION);

/// Brings a database to [`SCHEMA_VERSION`] in one transaction.
fn migrate(db: &mut Connection) -> Result<()> {
    migrate_to(db, SCHEMA_VERSION)
}

/// Brings a database to `target` in one transaction: the version-1 tables (`schema.sql`,
/// idempotent), then every step the `schema_version` row has not seen. Tests write the
/// databases older servers left with a lower `target`.
pub(super) fn migrate_to(db: &mut Connection, target: i64) -> Result<()> {
    let tx = db.transaction()?;
    tx.execute_batch(SCHEMA)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL); \
         INSERT INTO schema_version (version) \
         SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM schema_version);",
    )?;
    let v: i64 = tx.query_row("SELECT MAX(version) FROM schema_version", [], |r| r.get(0))?;
    if v > SCHEMA_VERSION {
        anyhow::bail!("metadata schema version {v} is newer than this server's {SCHEMA_VERSION}");
    }
    for (to, sql) in STEPS.iter().filter(|(to, _)| *to > v && *to <= target) {
        tx.execute_batch(sql)
            .with_context(|| format!("schema step to version {to}"))?;
    }
    tx.execute("UPDATE schema_version SET version = ?1", [v.max(target)])?;
    tx.commit()?;
    Ok(())
}

/// Prepared statements kept per connection: more than the store has, so none is parsed twice.
const STATEMENT_CACHE: usize = 64;

impl SqliteStore {
    pub fn open(path: &Path) -> Result<SqliteStore> {
        let mut db = Connection::open(path)
            .with_context(|| format!("cannot open metadata db {}", path.display()))?;
        // WAL: readers never block the writer. NORMAL: a commit is written to the WAL but not
        // synced; `durable` syncs it (a checkpoint syncs the WAL before copying it and the
        // database file after, whatever this says).
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "NORMAL")?;
        db.busy_timeout(std::time::Duration::from_secs(10))?;
        db.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        migrate(&mut db).with_context(|| format!("cannot apply schema to {}", path.display()))?;
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        let st = SqliteStore {
            db: Mutex::new(db),
            wal: Some((PathBuf::from(wal), SyncGroup::default())),
            group: String::new(),
        };
        // The migration's commit, like every other, is durable before the server serves.
        st.durable()?;
        Ok(st)
    }

    /// An in-memory store for unit tests.
    pub fn memory() -> Result<SqliteStore> {
        let mut db = Connection::open_in_memory()?;
        db.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        migrate(&mut db)?;
        Ok(SqliteStore {
            db: Mutex::new(db),
            wal: None,
            group: String::new(),
        })
    }

    /// The same store, writing and recovering the rows of storage group `group`.
    pub fn in_group(self, group: &str) -> SqliteStore {
        SqliteStore {
            group: group.to_owned(),
            ..self
        }
    }

    /// A store over an open connection, never synced: tests that write the databases older
    /// servers left.
    #[cfg(test)]
    pub(super) fn over(db: Connection) -> SqliteStore {
        SqliteStore {
            db: Mutex::new(db),
            wal: None,
            group: String::new(),
        }
    }

    /// Points the WAL syncs at `path`: a test that makes them fail sees which writes wait
    /// for one.
    #[cfg(test)]
    pub(super) fn sync_wal_at(&mut self, path: PathBuf) {
        self.wal = Some((path, SyncGroup::default()));
    }

    /// Makes every transaction committed so far survive a power cut: one fsync of the WAL,
    /// shared with the writers that need one at the same time. The WAL is opened for each sync
    /// (a descriptor kept open would outlive a WAL file another process removed).
    fn durable(&self) -> Result<()> {
        let Some((path, group)) = &self.wal else {
            return Ok(());
        };
        group
            .sync(|| std::fs::File::open(path)?.sync_data())
            .with_context(|| format!("cannot sync {}", path.display()))
    }

    /// Runs `f` in one transaction and makes it durable before returning.
    fn write<T>(&self, f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T>) -> Result<T> {
        let v = self.write_unsynced(f)?;
        self.durable()?;
        Ok(v)
    }

    /// Runs `f` in one transaction, durable only with a later [`Self::durable`]: for what a
    /// power cut may take, because it takes the process and the upload it guards with it.
    /// IMMEDIATE: the transaction takes the write lock before its first read, so one that
    /// reads and then writes waits (busy timeout) for another process sharing the file instead
    /// of failing when that process committed in between.
    fn write_unsynced<T>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T>,
    ) -> Result<T> {
        let mut db = self.db.lock();
        let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let v = f(&tx)?;
        tx.commit()?;
        Ok(v)
    }
}

/// Runs one statement through the connection's cache of prepared statements.
fn exec(tx: &rusqlite::Transaction<'_>, sql: &str, p: impl rusqlite::Params) -> Result<usize> {
    Ok(tx.prepare_cached(sql)?.execute(p)?)
}

impl MetaStore for SqliteStore {
    fn reserve_ids(&self, key: &str, step: u64) -> Result<u64> {
        // A step handed out must never be handed out again, even after a power cut; the
        // transaction holds the write lock from its start (see `write_unsynced`), so another
        // process sharing this file cannot read the same `next` in between.
        self.write(|tx| {
            // Ids start at 1 so that 0 never names a file.
            let next: i64 = tx
                .prepare_cached("SELECT next FROM id_steps WHERE key = ?1")?
                .query_row([key], |r| r.get(0))
                .optional()?
                .unwrap_or(1);
            let next: u64 = int(next, "id_steps.next")?;
            let end = next
                .checked_add(step)
                .filter(|&e| i64::try_from(e).is_ok())
                .context("id space exhausted")?;
            exec(
                tx,
                "INSERT INTO id_steps (key, next, updated) VALUES (?1, ?2, ?3) \
                 ON CONFLICT(key) DO UPDATE SET next = ?2, updated = ?3",
                params![key, end as i64, now_secs() as i64],
            )?;
            Ok(next)
        })
    }

    fn insert_file(&self, f: &FileRec, upload: Option<&UploadId>) -> Result<()> {
        let now = now_secs() as i64;
        self.write(|tx| {
            exec(
                tx,
                &format!(
                    "INSERT INTO files ({FILE_COLS}, updated, grp) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"
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
                    f.node,
                    now,
                    self.group
                ],
            )?;
            if let Some(u) = upload {
                exec(
                    tx,
                    "INSERT OR REPLACE INTO finished_uploads \
                     (upload_id, app, user, file_id, finished) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![u.as_slice(), f.app, f.user, f.id, now_ms() as i64],
                )?;
            }
            Ok(())
        })
    }

    fn commit_file(&self, id: &str) -> Result<()> {
        self.write(|tx| {
            exec(
                tx,
                "UPDATE files SET status = ?2, updated = ?3 WHERE id = ?1",
                params![id, FILE_STORED, now_secs() as i64],
            )?;
            exec(
                tx,
                "DELETE FROM session_blocks WHERE upload_id IN \
                 (SELECT upload_id FROM finished_uploads WHERE file_id = ?1)",
                [id],
            )?;
            exec(
                tx,
                "DELETE FROM upload_sessions WHERE id IN \
                 (SELECT upload_id FROM finished_uploads WHERE file_id = ?1)",
                [id],
            )?;
            Ok(())
        })
    }

    fn finished_upload(&self, app: &str, user: &str, upload: &UploadId) -> Result<Option<String>> {
        let db = self.db.lock();
        Ok(db
            .prepare_cached(
                "SELECT u.file_id FROM finished_uploads u JOIN files f ON f.id = u.file_id \
                 WHERE u.upload_id = ?1 AND u.app = ?2 AND u.user = ?3 AND f.status = ?4",
            )?
            .query_row(params![upload.as_slice(), app, user, FILE_STORED], |r| {
                r.get(0)
            })
            .optional()?)
    }

    fn committing_upload(
        &self,
        app: &str,
        user: &str,
        upload: &UploadId,
    ) -> Result<Option<FileRec>> {
        let db = self.db.lock();
        let cols: Vec<String> = FILE_COLS.split(", ").map(|c| format!("f.{c}")).collect();
        let mut q = db.prepare_cached(&format!(
            "SELECT {} FROM finished_uploads u JOIN files f ON f.id = u.file_id \
             WHERE u.upload_id = ?1 AND u.app = ?2 AND u.user = ?3 AND f.status = ?4 \
             AND f.grp = ?5",
            cols.join(", ")
        ))?;
        let args = params![upload.as_slice(), app, user, FILE_COMMITTING, self.group];
        Ok(q.query_row(args, file_row).optional()?)
    }

    fn expire_finished(&self, before_ms: u64) -> Result<usize> {
        self.write(|tx| {
            exec(
                tx,
                "DELETE FROM finished_uploads WHERE finished < ?1",
                [before_ms as i64],
            )
        })
    }

    fn file(&self, id: &str, app: &str) -> Result<Option<FileRec>> {
        let db = self.db.lock();
        let mut q = db.prepare_cached(&format!(
            "SELECT {FILE_COLS} FROM files WHERE id = ?1 AND app = ?2 AND status = ?3"
        ))?;
        Ok(q.query_row(params![id, app, FILE_STORED], file_row)
            .optional()?)
    }

    fn usage(&self, app: &str, user: &str) -> Result<Usage> {
        let db = self.db.lock();
        let mut q = db.prepare_cached(
            "SELECT COALESCE(SUM(size), 0), COUNT(*) FROM files \
             WHERE app = ?1 AND user = ?2 AND status <> ?3",
        )?;
        let (bytes, files): (i64, i64) = q.query_row(params![app, user, FILE_DELETING], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
        Ok(Usage {
            bytes: int(bytes, "stored bytes")?,
            files: int(files, "file count")?,
        })
    }

    fn file_group(&self, id: &str, app: &str) -> Result<Option<String>> {
        let db = self.db.lock();
        let mut q =
            db.prepare_cached("SELECT grp FROM files WHERE id = ?1 AND app = ?2 AND status = ?3")?;
        Ok(q.query_row(params![id, app, FILE_STORED], |r| r.get(0))
            .optional()?)
    }

    fn find_content(&self, app: &str, sha256: &Sha256, size: u64) -> Result<Option<FileRec>> {
        let db = self.db.lock();
        let mut q = db.prepare_cached(&format!(
            "SELECT {FILE_COLS} FROM files \
             WHERE app = ?1 AND sha256 = ?2 AND size = ?3 AND status = ?4 AND grp = ?5 LIMIT 1"
        ))?;
        Ok(q.query_row(
            params![app, sha256.as_slice(), size as i64, FILE_STORED, self.group],
            file_row,
        )
        .optional()?)
    }

    fn delete_file(&self, id: &str, app: &str, owner: Option<&str>) -> Result<Option<FileRec>> {
        self.write(|tx| {
            let rec = tx
                .prepare_cached(&format!(
                    "SELECT {FILE_COLS} FROM files WHERE id = ?1 AND app = ?2 \
                     AND status IN (?3, ?6) AND grp = ?4 AND (?5 IS NULL OR user = ?5)"
                ))?
                .query_row(
                    params![id, app, FILE_STORED, self.group, owner, FILE_DELETING],
                    file_row,
                )
                .optional()?;
            if rec.is_some() {
                exec(
                    tx,
                    "UPDATE files SET status = ?2, updated = ?3 WHERE id = ?1",
                    params![id, FILE_DELETING, now_secs() as i64],
                )?;
                exec(tx, "DELETE FROM finished_uploads WHERE file_id = ?1", [id])?;
            }
            Ok(rec)
        })
    }

    fn drop_file(&self, id: &str) -> Result<()> {
        self.write(|tx| {
            exec(tx, "DELETE FROM finished_uploads WHERE file_id = ?1", [id])?;
            exec(tx, "DELETE FROM files WHERE id = ?1", [id])?;
            Ok(())
        })
    }

    fn files_with_status(&self, status: u8) -> Result<Vec<FileRec>> {
        let db = self.db.lock();
        let mut st = db.prepare(&format!(
            "SELECT {FILE_COLS} FROM files WHERE status = ?1 AND grp = ?2"
        ))?;
        let rows = st.query_map(params![status, self.group], file_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn insert_session(&self, s: &SessionRec) -> Result<()> {
        let (cf, co, cl) = match &s.challenge {
            Some(c) => (Some(c.file.as_str()), c.off as i64, c.len as i64),
            None => (None, 0, 0),
        };
        self.write(|tx| {
            exec(
                tx,
                &format!(
                    "INSERT INTO upload_sessions ({SESSION_COLS}, grp) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"
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
                    cl,
                    self.group
                ],
            )?;
            Ok(())
        })
    }

    fn sessions(&self) -> Result<Vec<SessionRec>> {
        let db = self.db.lock();
        let mut st = db.prepare_cached(&format!(
            "SELECT {SESSION_COLS} FROM upload_sessions WHERE grp = ?1"
        ))?;
        let rows = st.query_map([&self.group], session_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn session(&self, id: &UploadId) -> Result<Option<SessionRec>> {
        let db = self.db.lock();
        let mut q = db.prepare_cached(&format!(
            "SELECT {SESSION_COLS} FROM upload_sessions WHERE id = ?1"
        ))?;
        Ok(q.query_row([id.as_slice()], session_row).optional()?)
    }

    fn open_session(
        &self,
        app: &str,
        user: &str,
        size: u64,
        block_size: u32,
        sha256: &Sha256,
        now_ms: u64,
    ) -> Result<Option<SessionRec>> {
        let db = self.db.lock();
        let mut q = db.prepare_cached(&format!(
            "SELECT {SESSION_COLS} FROM upload_sessions WHERE app = ?1 AND user = ?2 \
             AND size = ?3 AND block_size = ?4 AND sha256 = ?5 AND expires > ?6 AND grp = ?7 \
             ORDER BY created DESC LIMIT 1"
        ))?;
        let size = i64::try_from(size)?;
        let now = i64::try_from(now_ms)?;
        Ok(q.query_row(
            params![
                app,
                user,
                size,
                block_size,
                sha256.as_slice(),
                now,
                self.group
            ],
            session_row,
        )
        .optional()?)
    }

    fn session_blocks(&self, id: &UploadId) -> Result<Vec<(u32, u32)>> {
        let db = self.db.lock();
        let mut st =
            db.prepare_cached("SELECT idx, crc FROM session_blocks WHERE upload_id = ?1")?;
        let rows = st.query_map([id.as_slice()], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn mark_blocks(&self, blocks: &[(UploadId, u32, u32)], expires_ms: u64) -> Result<()> {
        self.write(|tx| {
            for (id, idx, crc) in blocks {
                exec(
                    tx,
                    "INSERT OR REPLACE INTO session_blocks (upload_id, idx, crc) \
                     VALUES (?1, ?2, ?3)",
                    params![id.as_slice(), idx, crc],
                )?;
                exec(
                    tx,
                    "UPDATE upload_sessions SET expires = ?2 WHERE id = ?1",
                    params![id.as_slice(), expires_ms as i64],
                )?;
            }
            Ok(())
        })
    }

    fn unmark_blocks(&self, id: &UploadId, idx: &[u32]) -> Result<()> {
        self.write(|tx| {
            for i in idx {
                exec(
                    tx,
                    "DELETE FROM session_blocks WHERE upload_id = ?1 AND idx = ?2",
                    params![id.as_slice(), i],
                )?;
            }
            Ok(())
        })
    }

    fn set_challenge(&self, id: &UploadId, c: Option<&Challenge>) -> Result<()> {
        let (cf, co, cl) = match c {
            Some(c) => (Some(c.file.as_str()), c.off as i64, c.len as i64),
            None => (None, 0, 0),
        };
        self.write(|tx| {
            exec(
                tx,
                "UPDATE upload_sessions SET challenge_file = ?2, challenge_off = ?3, \
                 challenge_len = ?4 WHERE id = ?1",
                params![id.as_slice(), cf, co, cl],
            )?;
            Ok(())
        })
    }

    fn delete_session(&self, id: &UploadId) -> Result<()> {
        self.write(|tx| {
            exec(
                tx,
                "DELETE FROM session_blocks WHERE upload_id = ?1",
                [id.as_slice()],
            )?;
            exec(
                tx,
                "DELETE FROM upload_sessions WHERE id = ?1",
                [id.as_slice()],
            )?;
            Ok(())
        })
    }

    fn expire_session(&self, id: &UploadId, seen_expires_ms: u64) -> Result<bool> {
        self.write(|tx| {
            let n = exec(
                tx,
                "DELETE FROM upload_sessions WHERE id = ?1 AND expires = ?2",
                params![id.as_slice(), seen_expires_ms as i64],
            )?;
            if n > 0 {
                exec(
                    tx,
                    "DELETE FROM session_blocks WHERE upload_id = ?1",
                    [id.as_slice()],
                )?;
            }
            Ok(n > 0)
        })
    }

    // Key claims are not synced: they guard an upload in progress, and a power cut that loses
    // one takes that upload (unacknowledged) and the node holding it too. The commit that
    // acknowledges the upload syncs the WAL, and with it every claim written before.

    fn claim_key(&self, app: &str, user: &str, key: &UploadId, node: &str) -> Result<Claim> {
        self.write_unsynced(|tx| {
            let holder: Option<String> = tx
                .prepare_cached(
                    "SELECT node FROM upload_claims WHERE app = ?1 AND user = ?2 AND key = ?3",
                )?
                .query_row(params![app, user, key.as_slice()], |r| r.get(0))
                .optional()?;
            Ok(match holder {
                Some(h) if h != node => Claim::Held(h),
                _ => {
                    exec(
                        tx,
                        "INSERT OR REPLACE INTO upload_claims (app, user, key, node, claimed) \
                         VALUES (?1, ?2, ?3, ?4, ?5)",
                        params![app, user, key.as_slice(), node, now_ms() as i64],
                    )?;
                    Claim::Mine
                }
            })
        })
    }

    fn take_claim(
        &self,
        app: &str,
        user: &str,
        key: &UploadId,
        from: &str,
        node: &str,
    ) -> Result<bool> {
        self.write_unsynced(|tx| {
            let n = exec(
                tx,
                "UPDATE upload_claims SET node = ?5, claimed = ?6 \
                 WHERE app = ?1 AND user = ?2 AND key = ?3 AND node = ?4",
                params![app, user, key.as_slice(), from, node, now_ms() as i64],
            )?;
            Ok(n > 0)
        })
    }

    fn release_claim(&self, app: &str, user: &str, key: &UploadId, node: &str) -> Result<()> {
        self.write_unsynced(|tx| {
            exec(
                tx,
                "DELETE FROM upload_claims \
                 WHERE app = ?1 AND user = ?2 AND key = ?3 AND node = ?4",
                params![app, user, key.as_slice(), node],
            )?;
            Ok(())
        })
    }
}
