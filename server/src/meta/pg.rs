//! The PostgreSQL backend of [`MetaStore`]: the metadata shared by the storage nodes of a group.
//!
//! Sync `postgres` client behind a small r2d2 pool (a connection per busy worker at most; a
//! checkout waits [`CHECKOUT_TIMEOUT`] when the database is slow or gone, so a request fails
//! with an error instead of hanging). Every trait method is one transaction. Writes that other
//! nodes race for are single statements the database serialises: id steps are one
//! `INSERT .. ON CONFLICT .. DO UPDATE .. RETURNING`, key claims rely on the primary key, and
//! conditional deletes say their condition in the `WHERE`.

use super::{
    Challenge, Claim, FILE_COMMITTING, FILE_DELETING, FILE_STORED, FileRec, MetaStore,
    SCHEMA_VERSION, SessionRec, Sha256, UploadId, Usage, blob_to_crcs, crcs_to_blob, int, now_ms,
    now_secs, to_arr,
};
use anyhow::{Context, Result};
use postgres::{NoTls, Row, Transaction};
use r2d2_postgres::PostgresConnectionManager;
use r2d2_postgres::r2d2::Pool;
use std::time::Duration;

/// Connections per process: workers doing metadata at the same moment are few, and a cluster
/// multiplies this by its nodes against the server's `max_connections`.
pub const POOL_MAX: u32 = 8;
/// How long a metadata call waits for a connection (and a new connection for the server).
pub const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(5);

const SCHEMA: &str = include_str!("schema_pg.sql");
/// `pg_advisory_xact_lock` key serialising schema migrations of nodes starting together
/// (concurrent `CREATE TABLE IF NOT EXISTS` can still collide in the catalog).
const MIGRATION_LOCK: i64 = 0x6665_7272_795f_6d31; // "ferry_m1"

pub struct PgStore {
    pool: Pool<PostgresConnectionManager<NoTls>>,
    /// The storage group whose rows this store writes and recovers ("" standalone).
    group: String,
    /// host:port/db, for error context (never the password).
    target: String,
}

fn describe(cfg: &postgres::Config) -> String {
    let host = cfg
        .get_hosts()
        .first()
        .map(|h| match h {
            postgres::config::Host::Tcp(s) => s.clone(),
            postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_default();
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}/{}", cfg.get_dbname().unwrap_or(""))
}

const FILE_COLS: &str =
    r#"id, num, app, "user", status, path, size, sha256, name, block_size, crcs, created, node"#;

fn file_row(r: &Row) -> Result<FileRec> {
    Ok(FileRec {
        id: r.try_get(0)?,
        num: int(r.try_get(1)?, "num")?,
        app: r.try_get(2)?,
        user: r.try_get(3)?,
        status: int(r.try_get(4)?, "status")?,
        path: r.try_get(5)?,
        size: int(r.try_get(6)?, "size")?,
        sha256: to_arr(r.try_get(7)?, "sha256")?,
        name: r.try_get(8)?,
        block_size: int(r.try_get(9)?, "block_size")?,
        crcs: blob_to_crcs(r.try_get::<_, &[u8]>(10)?)?,
        created: int(r.try_get(11)?, "created")?,
        node: r.try_get(12)?,
    })
}

const SESSION_COLS: &str = r#"id, app, "user", size, block_size, blocks, sha256, name, temp_path,
    created, expires, challenge_file, challenge_off, challenge_len"#;

fn session_row(r: &Row) -> Result<SessionRec> {
    let file: Option<String> = r.try_get(11)?;
    Ok(SessionRec {
        id: to_arr(r.try_get(0)?, "upload id")?,
        app: r.try_get(1)?,
        user: r.try_get(2)?,
        size: int(r.try_get(3)?, "size")?,
        block_size: int(r.try_get(4)?, "block_size")?,
        blocks: int(r.try_get(5)?, "blocks")?,
        sha256: to_arr(r.try_get(6)?, "sha256")?,
        name: r.try_get(7)?,
        temp_path: r.try_get(8)?,
        created: int(r.try_get(9)?, "created")?,
        expires_ms: int(r.try_get(10)?, "expires")?,
        challenge: match file {
            Some(file) => Some(Challenge {
                file,
                off: int(r.try_get(12)?, "challenge_off")?,
                len: int(r.try_get(13)?, "challenge_len")?,
            }),
            None => None,
        },
    })
}

/// A u64 for a BIGINT column; refuses what PostgreSQL cannot hold instead of wrapping.
fn big(v: u64, what: &'static str) -> Result<i64> {
    i64::try_from(v).with_context(|| format!("{what} {v} does not fit a BIGINT"))
}

impl PgStore {
    /// Connects to `url` (`postgres://user@host:port/db`), creates or migrates the schema.
    pub fn open(url: &str) -> Result<PgStore> {
        let cfg: postgres::Config = url
            .parse()
            .context("meta_url is not a valid postgres:// URL")?;
        Self::open_config(cfg)
    }

    /// The same store, writing and recovering the rows of storage group `group`.
    pub fn in_group(self, group: &str) -> PgStore {
        PgStore {
            group: group.to_owned(),
            ..self
        }
    }

    pub fn open_config(mut cfg: postgres::Config) -> Result<PgStore> {
        cfg.connect_timeout(CHECKOUT_TIMEOUT);
        let target = describe(&cfg);
        let pool = Pool::builder()
            .max_size(POOL_MAX)
            // Connections are opened on demand: an idle node holds one, not eight.
            .min_idle(Some(1))
            .connection_timeout(CHECKOUT_TIMEOUT)
            .build(PostgresConnectionManager::new(cfg, NoTls))
            .with_context(|| format!("cannot connect to PostgreSQL at {target}"))?;
        let st = PgStore {
            pool,
            target,
            group: String::new(),
        };
        st.tx(|tx| {
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
            // Every start but the first after an upgrade finds the schema current and runs no
            // DDL: CREATE INDEX IF NOT EXISTS locks its table even when the index exists, and
            // those locks, taken in schema order while peers write, deadlocked a restarting
            // member with a node's transaction.
            let exists: bool = tx
                .query_one("SELECT to_regclass('schema_version') IS NOT NULL", &[])?
                .get(0);
            let current: Option<i64> = match exists {
                true => tx
                    .query_one("SELECT MAX(version) FROM schema_version", &[])?
                    .try_get(0)?,
                false => None,
            };
            if current == Some(SCHEMA_VERSION) {
                return Ok(());
            }
            tx.batch_execute(SCHEMA)?;
            let v: Option<i64> = tx
                .query_one("SELECT MAX(version) FROM schema_version", &[])?
                .try_get(0)?;
            match v {
                None => {
                    tx.execute(
                        "INSERT INTO schema_version (version) VALUES ($1)",
                        &[&SCHEMA_VERSION],
                    )?;
                }
                Some(v) if v > SCHEMA_VERSION => anyhow::bail!(
                    "metadata schema version {v} is newer than this server's {SCHEMA_VERSION}"
                ),
                // Versions 1 to 3 differ by objects SCHEMA creates if missing. Version 4 adds
                // the storage group of every file and session (the groups of a cluster share
                // this database, each with its own data directory); older rows get group "".
                // Only then: ALTER TABLE locks the table even when the column exists.
                Some(v) => {
                    if v < 4 {
                        tx.batch_execute(
                            "ALTER TABLE files ADD COLUMN IF NOT EXISTS grp TEXT NOT NULL \
                             DEFAULT ''; ALTER TABLE upload_sessions ADD COLUMN IF NOT EXISTS \
                             grp TEXT NOT NULL DEFAULT '';",
                        )?;
                    }
                    tx.execute("UPDATE schema_version SET version = $1", &[&SCHEMA_VERSION])?;
                }
            }
            Ok(())
        })
        .with_context(|| format!("cannot apply the schema on {}", st.target))?;
        Ok(st)
    }

    /// Runs `f` in one transaction on a pooled connection, committing when it returns Ok.
    fn tx<T>(&self, f: impl FnOnce(&mut Transaction<'_>) -> Result<T>) -> Result<T> {
        let mut conn = self
            .pool
            .get()
            .with_context(|| format!("no PostgreSQL connection to {}", self.target))?;
        let mut tx = conn.transaction()?;
        let v = f(&mut tx)?;
        tx.commit()?;
        Ok(v)
    }
}

impl MetaStore for PgStore {
    fn reserve_ids(&self, key: &str, step: u64) -> Result<u64> {
        let step = big(step, "id step")?;
        let now = big(now_secs(), "time")?;
        // One statement: the row lock it takes serialises nodes reserving at the same moment,
        // and RETURNING gives each the range it moved past. Ids start at 1.
        let first: i64 = self.tx(|tx| {
            Ok(tx
                .query_one(
                    "INSERT INTO id_steps (key, next, updated) VALUES ($1, 1 + $2::BIGINT, $3) \
                     ON CONFLICT (key) DO UPDATE \
                     SET next = id_steps.next + $2::BIGINT, updated = $3 \
                     RETURNING next - $2::BIGINT",
                    &[&key, &step, &now],
                )?
                .try_get(0)?)
        })?;
        int(first, "id_steps.next")
    }

    fn insert_file(&self, f: &FileRec, upload: Option<&UploadId>) -> Result<()> {
        let now = big(now_secs(), "time")?;
        let finished = big(now_ms(), "time")?;
        let (num, size, created) = (
            big(f.num, "num")?,
            big(f.size, "size")?,
            big(f.created, "created")?,
        );
        let crcs = crcs_to_blob(&f.crcs);
        self.tx(|tx| {
            tx.execute(
                &format!(
                    "INSERT INTO files ({FILE_COLS}, updated, grp) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
                ),
                &[
                    &f.id,
                    &num,
                    &f.app,
                    &f.user,
                    &i64::from(f.status),
                    &f.path,
                    &size,
                    &f.sha256.as_slice(),
                    &f.name,
                    &i64::from(f.block_size),
                    &crcs,
                    &created,
                    &f.node,
                    &now,
                    &self.group,
                ],
            )?;
            if let Some(u) = upload {
                tx.execute(
                    r#"INSERT INTO finished_uploads (upload_id, app, "user", file_id, finished)
                       VALUES ($1, $2, $3, $4, $5)
                       ON CONFLICT (upload_id) DO UPDATE SET app = EXCLUDED.app,
                         "user" = EXCLUDED."user", file_id = EXCLUDED.file_id,
                         finished = EXCLUDED.finished"#,
                    &[&u.as_slice(), &f.app, &f.user, &f.id, &finished],
                )?;
            }
            Ok(())
        })
    }

    fn commit_file(&self, id: &str) -> Result<()> {
        let now = big(now_secs(), "time")?;
        self.tx(|tx| {
            tx.execute(
                "UPDATE files SET status = $2, updated = $3 WHERE id = $1",
                &[&id, &i64::from(FILE_STORED), &now],
            )?;
            let finishes = "SELECT upload_id FROM finished_uploads WHERE file_id = $1";
            tx.execute(
                &format!("DELETE FROM session_blocks WHERE upload_id IN ({finishes})"),
                &[&id],
            )?;
            tx.execute(
                &format!("DELETE FROM upload_sessions WHERE id IN ({finishes})"),
                &[&id],
            )?;
            Ok(())
        })
    }

    fn finished_upload(&self, app: &str, user: &str, upload: &UploadId) -> Result<Option<String>> {
        self.tx(|tx| {
            let row = tx.query_opt(
                r#"SELECT u.file_id FROM finished_uploads u JOIN files f ON f.id = u.file_id
                   WHERE u.upload_id = $1 AND u.app = $2 AND u."user" = $3 AND f.status = $4"#,
                &[&upload.as_slice(), &app, &user, &i64::from(FILE_STORED)],
            )?;
            Ok(row.map(|r| r.try_get(0)).transpose()?)
        })
    }

    fn committing_upload(
        &self,
        app: &str,
        user: &str,
        upload: &UploadId,
    ) -> Result<Option<FileRec>> {
        let cols: Vec<String> = FILE_COLS.split(", ").map(|c| format!("f.{c}")).collect();
        self.tx(|tx| {
            tx.query_opt(
                &format!(
                    r#"SELECT {} FROM finished_uploads u JOIN files f ON f.id = u.file_id
                       WHERE u.upload_id = $1 AND u.app = $2 AND u."user" = $3
                       AND f.status = $4 AND f.grp = $5"#,
                    cols.join(", ")
                ),
                &[
                    &upload.as_slice(),
                    &app,
                    &user,
                    &i64::from(FILE_COMMITTING),
                    &self.group,
                ],
            )?
            .as_ref()
            .map(file_row)
            .transpose()
        })
    }

    fn expire_finished(&self, before_ms: u64) -> Result<usize> {
        let before = big(before_ms, "time")?;
        let n = self.tx(|tx| {
            Ok(tx.execute(
                "DELETE FROM finished_uploads WHERE finished < $1",
                &[&before],
            )?)
        })?;
        Ok(n as usize)
    }

    fn file(&self, id: &str, app: &str) -> Result<Option<FileRec>> {
        self.tx(|tx| {
            tx.query_opt(
                &format!(
                    "SELECT {FILE_COLS} FROM files WHERE id = $1 AND app = $2 AND status = $3"
                ),
                &[&id, &app, &i64::from(FILE_STORED)],
            )?
            .as_ref()
            .map(file_row)
            .transpose()
        })
    }

    fn usage(&self, app: &str, user: &str) -> Result<Usage> {
        self.tx(|tx| {
            let r = tx.query_one(
                r#"SELECT COALESCE(SUM(size), 0)::BIGINT, COUNT(*) FROM files
                   WHERE app = $1 AND "user" = $2 AND status <> $3"#,
                &[&app, &user, &i64::from(FILE_DELETING)],
            )?;
            Ok(Usage {
                bytes: int(r.get::<_, i64>(0), "stored bytes")?,
                files: int(r.get::<_, i64>(1), "file count")?,
            })
        })
    }

    fn file_group(&self, id: &str, app: &str) -> Result<Option<String>> {
        self.tx(|tx| {
            Ok(tx
                .query_opt(
                    "SELECT grp FROM files WHERE id = $1 AND app = $2 AND status = $3",
                    &[&id, &app, &i64::from(FILE_STORED)],
                )?
                .map(|r| r.get(0)))
        })
    }

    fn find_content(&self, app: &str, sha256: &Sha256, size: u64) -> Result<Option<FileRec>> {
        let size = big(size, "size")?;
        self.tx(|tx| {
            tx.query_opt(
                &format!(
                    "SELECT {FILE_COLS} FROM files \
                     WHERE app = $1 AND sha256 = $2 AND size = $3 AND status = $4 AND grp = $5 \
                     LIMIT 1"
                ),
                &[
                    &app,
                    &sha256.as_slice(),
                    &size,
                    &i64::from(FILE_STORED),
                    &self.group,
                ],
            )?
            .as_ref()
            .map(file_row)
            .transpose()
        })
    }

    fn delete_file(&self, id: &str, app: &str, owner: Option<&str>) -> Result<Option<FileRec>> {
        let now = big(now_secs(), "time")?;
        self.tx(|tx| {
            // One UPDATE .. RETURNING: of two nodes deleting the same file, one gets the row.
            let rec = tx
                .query_opt(
                    &format!(
                        "UPDATE files SET status = $4, updated = $5 \
                         WHERE id = $1 AND app = $2 AND status IN ($3, $4) AND grp = $6 \
                         AND ($7::TEXT IS NULL OR \"user\" = $7) RETURNING {FILE_COLS}"
                    ),
                    &[
                        &id,
                        &app,
                        &i64::from(FILE_STORED),
                        &i64::from(FILE_DELETING),
                        &now,
                        &self.group,
                        &owner,
                    ],
                )?
                .as_ref()
                .map(file_row)
                .transpose()?;
            if rec.is_some() {
                tx.execute("DELETE FROM finished_uploads WHERE file_id = $1", &[&id])?;
            }
            // The record as it was: stored, now being deleted by the caller.
            Ok(rec.map(|r| FileRec {
                status: FILE_STORED,
                ..r
            }))
        })
    }

    fn drop_file(&self, id: &str) -> Result<()> {
        self.tx(|tx| {
            tx.execute("DELETE FROM finished_uploads WHERE file_id = $1", &[&id])?;
            tx.execute("DELETE FROM files WHERE id = $1", &[&id])?;
            Ok(())
        })
    }

    fn files_with_status(&self, status: u8) -> Result<Vec<FileRec>> {
        self.tx(|tx| {
            tx.query(
                &format!("SELECT {FILE_COLS} FROM files WHERE status = $1 AND grp = $2"),
                &[&i64::from(status), &self.group],
            )?
            .iter()
            .map(file_row)
            .collect()
        })
    }

    fn insert_session(&self, s: &SessionRec) -> Result<()> {
        let (cf, co, cl) = match &s.challenge {
            Some(c) => (
                Some(c.file.as_str()),
                big(c.off, "challenge offset")?,
                big(c.len, "challenge length")?,
            ),
            None => (None, 0, 0),
        };
        let (size, created, expires) = (
            big(s.size, "size")?,
            big(s.created, "created")?,
            big(s.expires_ms, "expiry")?,
        );
        self.tx(|tx| {
            tx.execute(
                &format!(
                    "INSERT INTO upload_sessions ({SESSION_COLS}, grp) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
                ),
                &[
                    &s.id.as_slice(),
                    &s.app,
                    &s.user,
                    &size,
                    &i64::from(s.block_size),
                    &i64::from(s.blocks),
                    &s.sha256.as_slice(),
                    &s.name,
                    &s.temp_path,
                    &created,
                    &expires,
                    &cf,
                    &co,
                    &cl,
                    &self.group,
                ],
            )?;
            Ok(())
        })
    }

    fn sessions(&self) -> Result<Vec<SessionRec>> {
        self.tx(|tx| {
            tx.query(
                &format!("SELECT {SESSION_COLS} FROM upload_sessions WHERE grp = $1"),
                &[&self.group],
            )?
            .iter()
            .map(session_row)
            .collect()
        })
    }

    fn session(&self, id: &UploadId) -> Result<Option<SessionRec>> {
        self.tx(|tx| {
            tx.query_opt(
                &format!("SELECT {SESSION_COLS} FROM upload_sessions WHERE id = $1"),
                &[&id.as_slice()],
            )?
            .as_ref()
            .map(session_row)
            .transpose()
        })
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
        let (size, now) = (big(size, "size")?, big(now_ms, "time")?);
        self.tx(|tx| {
            tx.query_opt(
                &format!(
                    r#"SELECT {SESSION_COLS} FROM upload_sessions WHERE app = $1 AND "user" = $2
                       AND size = $3 AND block_size = $4 AND sha256 = $5 AND expires > $6
                       AND grp = $7 ORDER BY created DESC LIMIT 1"#
                ),
                &[
                    &app,
                    &user,
                    &size,
                    &i64::from(block_size),
                    &sha256.as_slice(),
                    &now,
                    &self.group,
                ],
            )?
            .as_ref()
            .map(session_row)
            .transpose()
        })
    }

    fn session_blocks(&self, id: &UploadId) -> Result<Vec<(u32, u32)>> {
        self.tx(|tx| {
            tx.query(
                "SELECT idx, crc FROM session_blocks WHERE upload_id = $1 ORDER BY idx",
                &[&id.as_slice()],
            )?
            .iter()
            .map(|r| Ok((int(r.try_get(0)?, "idx")?, int(r.try_get(1)?, "crc")?)))
            .collect()
        })
    }

    fn mark_blocks(&self, blocks: &[(UploadId, u32, u32)], expires_ms: u64) -> Result<()> {
        let expires = big(expires_ms, "expiry")?;
        // One lock order for every node (by session, then index), so two nodes recording
        // blocks of the same sessions cannot deadlock.
        let mut sorted: Vec<&(UploadId, u32, u32)> = blocks.iter().collect();
        sorted.sort_unstable_by_key(|b| (b.0, b.1));
        self.tx(|tx| {
            let mut last: Option<&UploadId> = None;
            for (id, idx, crc) in sorted {
                if last != Some(id) {
                    tx.execute(
                        "UPDATE upload_sessions SET expires = $2 WHERE id = $1",
                        &[&id.as_slice(), &expires],
                    )?;
                    last = Some(id);
                }
                tx.execute(
                    "INSERT INTO session_blocks (upload_id, idx, crc) VALUES ($1, $2, $3) \
                     ON CONFLICT (upload_id, idx) DO UPDATE SET crc = EXCLUDED.crc",
                    &[&id.as_slice(), &i64::from(*idx), &i64::from(*crc)],
                )?;
            }
            Ok(())
        })
    }

    fn unmark_blocks(&self, id: &UploadId, idx: &[u32]) -> Result<()> {
        let idx: Vec<i64> = idx.iter().map(|&i| i64::from(i)).collect();
        self.tx(|tx| {
            tx.execute(
                "DELETE FROM session_blocks WHERE upload_id = $1 AND idx = ANY($2)",
                &[&id.as_slice(), &idx],
            )?;
            Ok(())
        })
    }

    fn set_challenge(&self, id: &UploadId, c: Option<&Challenge>) -> Result<()> {
        let (cf, co, cl) = match c {
            Some(c) => (
                Some(c.file.as_str()),
                big(c.off, "challenge offset")?,
                big(c.len, "challenge length")?,
            ),
            None => (None, 0, 0),
        };
        self.tx(|tx| {
            tx.execute(
                "UPDATE upload_sessions SET challenge_file = $2, challenge_off = $3, \
                 challenge_len = $4 WHERE id = $1",
                &[&id.as_slice(), &cf, &co, &cl],
            )?;
            Ok(())
        })
    }

    fn delete_session(&self, id: &UploadId) -> Result<()> {
        self.tx(|tx| {
            tx.execute(
                "DELETE FROM session_blocks WHERE upload_id = $1",
                &[&id.as_slice()],
            )?;
            tx.execute(
                "DELETE FROM upload_sessions WHERE id = $1",
                &[&id.as_slice()],
            )?;
            Ok(())
        })
    }

    fn expire_session(&self, id: &UploadId, seen_expires_ms: u64) -> Result<bool> {
        let seen = big(seen_expires_ms, "expiry")?;
        self.tx(|tx| {
            let n = tx.execute(
                "DELETE FROM upload_sessions WHERE id = $1 AND expires = $2",
                &[&id.as_slice(), &seen],
            )?;
            if n > 0 {
                tx.execute(
                    "DELETE FROM session_blocks WHERE upload_id = $1",
                    &[&id.as_slice()],
                )?;
            }
            Ok(n > 0)
        })
    }

    fn claim_key(&self, app: &str, user: &str, key: &UploadId, node: &str) -> Result<Claim> {
        let now = big(now_ms(), "time")?;
        self.tx(|tx| {
            // Inserted, or already ours (left from this node's previous life): ours. A
            // conflicting row of another node makes the WHERE false and returns nothing.
            let mine = tx.query_opt(
                r#"INSERT INTO upload_claims (app, "user", key, node, claimed)
                   VALUES ($1, $2, $3, $4, $5)
                   ON CONFLICT (app, "user", key) DO UPDATE SET claimed = EXCLUDED.claimed
                   WHERE upload_claims.node = EXCLUDED.node
                   RETURNING node"#,
                &[&app, &user, &key.as_slice(), &node, &now],
            )?;
            if mine.is_some() {
                return Ok(Claim::Mine);
            }
            let holder = tx.query_opt(
                r#"SELECT node FROM upload_claims WHERE app = $1 AND "user" = $2 AND key = $3"#,
                &[&app, &user, &key.as_slice()],
            )?;
            // Released between the two statements: the caller's retry claims it.
            Ok(Claim::Held(match holder {
                Some(r) => r.try_get(0)?,
                None => String::new(),
            }))
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
        let now = big(now_ms(), "time")?;
        self.tx(|tx| {
            let n = tx.execute(
                r#"UPDATE upload_claims SET node = $5, claimed = $6
                   WHERE app = $1 AND "user" = $2 AND key = $3 AND node = $4"#,
                &[&app, &user, &key.as_slice(), &from, &node, &now],
            )?;
            Ok(n > 0)
        })
    }

    fn release_claim(&self, app: &str, user: &str, key: &UploadId, node: &str) -> Result<()> {
        self.tx(|tx| {
            tx.execute(
                r#"DELETE FROM upload_claims
                   WHERE app = $1 AND "user" = $2 AND key = $3 AND node = $4"#,
                &[&app, &user, &key.as_slice(), &node],
            )?;
            Ok(())
        })
    }
}

/// Throwaway PostgreSQL databases for tests, on the server `FERRY_PG_URL` names.
#[cfg(test)]
pub(crate) mod testdb {
    use super::*;
    use rand::RngExt;

    /// A database with a random name, dropped (with its connections) when this is dropped.
    pub struct TestDb {
        admin: postgres::Config,
        pub name: String,
        pub cfg: postgres::Config,
    }

    /// A fresh database, or None (with a "skipped" note) when `FERRY_PG_URL` is unset. In CI
    /// (`CI=true`) an unset `FERRY_PG_URL` fails the test: the PostgreSQL backend must be
    /// tested there.
    pub fn create(test: &str) -> Option<TestDb> {
        let url = match std::env::var("FERRY_PG_URL") {
            Ok(u) if !u.is_empty() => u,
            _ => {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "{test}: FERRY_PG_URL unset, but CI=true requires the PostgreSQL tests"
                );
                eprintln!("{test}: skipped: FERRY_PG_URL unset");
                return None;
            }
        };
        let admin: postgres::Config = url.parse().expect("FERRY_PG_URL parses");
        let name = format!(
            "ferry_test_{}",
            hex::encode(rand::rng().random::<[u8; 8]>())
        );
        let mut c = admin.connect(NoTls).expect("connect to FERRY_PG_URL");
        c.batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("create test database");
        let mut cfg = admin.clone();
        cfg.dbname(&name);
        Some(TestDb { admin, name, cfg })
    }

    impl TestDb {
        pub fn store(&self) -> PgStore {
            PgStore::open_config(self.cfg.clone()).expect("open PgStore")
        }
    }

    impl Drop for TestDb {
        fn drop(&mut self) {
            match self.admin.connect(NoTls) {
                Ok(mut c) => {
                    if let Err(e) = c.batch_execute(&format!(
                        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                        self.name
                    )) {
                        eprintln!("cannot drop test database {}: {e}", self.name);
                    }
                }
                Err(e) => eprintln!("cannot drop test database {}: {e}", self.name),
            }
        }
    }
}
