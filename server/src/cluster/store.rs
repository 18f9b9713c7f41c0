//! The tracker's database: groups, nodes with their last beat, and the router table (app, user)
//! -> group (seed 004's group and router tables). Nothing of files lives here; id steps are the
//! metadata store's (`MetaStore::reserve_ids`).
//!
//! Two implementations, one contract: [`SqliteCluster`] (embedded, the `meta.db` of the data
//! dir) and [`super::pg::PgCluster`] (shared by every tracker of a cluster). Every method is one
//! transaction, so trackers sharing a database never see half an update.

use anyhow::{Context, Result};
use ferry_common::proto::{GROUPS_MAX, NODES_MAX, NodeAddr};
use parking_lot::Mutex;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use std::path::Path;

/// A storage node as the database knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRow {
    pub group: String,
    pub addr: NodeAddr,
    pub version: u16,
    /// Unix ms the node reported as its start.
    pub started: u64,
    /// Bytes free on the node's data volume at its last JOIN/BEAT.
    pub free: u64,
    /// Unix ms of its last JOIN/BEAT at any tracker.
    pub last_beat_ms: u64,
    /// Its HTTP gateway, as its last JOIN announced it.
    pub http: Option<NodeAddr>,
}

/// What a JOIN came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joined {
    Ok,
    /// The group does not exist and may not be created.
    UnknownGroup,
    /// The group already has [`NODES_MAX`] nodes, or there are [`GROUPS_MAX`] groups.
    Full,
}

/// The tracker's view of the cluster in the database.
pub trait ClusterStore: Send + Sync {
    /// Creates a group if it is missing (idempotent); false when [`GROUPS_MAX`] groups exist.
    fn create_group(&self, name: &str) -> Result<bool>;
    fn groups(&self) -> Result<Vec<String>>;
    /// Records a node (new, restarted, or moved to another group) as just heard from.
    fn join(&self, n: &NodeRow, create_group: bool) -> Result<Joined>;
    /// Records a beat; false when no node with this address is joined to this group.
    fn beat(
        &self,
        group: &str,
        addr: &NodeAddr,
        started: u64,
        free: u64,
        now_ms: u64,
    ) -> Result<bool>;
    fn nodes(&self) -> Result<Vec<NodeRow>>;
    /// The group the router table assigns this user to.
    fn route(&self, app: &str, user: &str) -> Result<Option<String>>;
    /// Assigns the user to `group` unless another tracker got there first (insert-if-absent in
    /// one transaction); returns the group the user ends up in.
    fn assign(&self, app: &str, user: &str, group: &str) -> Result<String>;
    /// Users routed to each group (groups without users are absent).
    fn users_per_group(&self) -> Result<Vec<(String, u64)>>;
    /// Up to `limit` users of `group` in (app, user) order after `after` (TRACKER_USERS).
    fn users_of(
        &self,
        group: &str,
        after: (&str, &str),
        limit: u32,
    ) -> Result<Vec<(String, String)>>;
}

/// The schema both backends apply at start (idempotent; the SQL is common to both).
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS cluster_groups (
    name     TEXT PRIMARY KEY,
    created  BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS cluster_nodes (
    host       TEXT NOT NULL,
    port       INTEGER NOT NULL,
    grp        TEXT NOT NULL,
    version    INTEGER NOT NULL,
    started    BIGINT NOT NULL,
    free       BIGINT NOT NULL,
    last_beat  BIGINT NOT NULL,
    PRIMARY KEY (host, port)
);
CREATE TABLE IF NOT EXISTS cluster_router (
    app      TEXT NOT NULL,
    usr      TEXT NOT NULL,
    grp      TEXT NOT NULL,
    created  BIGINT NOT NULL,
    PRIMARY KEY (app, usr)
);
CREATE TABLE IF NOT EXISTS cluster_gateways (
    host       TEXT NOT NULL,
    port       INTEGER NOT NULL,
    http_host  TEXT NOT NULL,
    http_port  INTEGER NOT NULL,
    PRIMARY KEY (host, port)
);
DROP INDEX IF EXISTS cluster_router_grp;
CREATE INDEX IF NOT EXISTS cluster_router_members ON cluster_router (grp, app, usr);
";

/// Every node with its gateway (a table of its own, so databases from before gateways need no
/// migration beyond `CREATE TABLE IF NOT EXISTS`); the same SQL for both backends.
pub const NODES: &str = "SELECT n.grp, n.host, n.port, n.version, n.started, n.free, \
     n.last_beat, g.http_host, g.http_port FROM cluster_nodes n LEFT JOIN cluster_gateways g \
     ON g.host = n.host AND g.port = n.port ORDER BY n.grp, n.host, n.port";
/// A JOIN's gateway: recorded, or (`$3` empty) forgotten.
pub const GATEWAY_UPSERT: &str = "INSERT INTO cluster_gateways (host, port, http_host, http_port) \
     VALUES ($1, $2, $3, $4) ON CONFLICT (host, port) DO UPDATE SET http_host = $3, \
     http_port = $4";
pub const GATEWAY_FORGET: &str = "DELETE FROM cluster_gateways WHERE host = $1 AND port = $2";

/// A gateway read back from [`NODES`]' last two columns (NULL: the node has none).
pub fn gateway_from_db(host: Option<String>, port: Option<i64>) -> Option<NodeAddr> {
    match (host, port.and_then(|p| u16::try_from(p).ok())) {
        (Some(host), Some(port)) if !host.is_empty() && port != 0 => Some(NodeAddr { host, port }),
        _ => None,
    }
}

/// A page of a group's users, on the (grp, app, usr) index; the same SQL for both backends.
pub const USERS_OF: &str = "SELECT app, usr FROM cluster_router \
     WHERE grp = $1 AND (app, usr) > ($2, $3) ORDER BY app, usr LIMIT $4";

/// u64 values (bytes, ms) in a signed BIGINT column: saturate instead of wrapping negative.
pub fn to_db(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A BIGINT read back; negative values (never written by us) read as 0.
pub fn from_db(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A port read back, refusing what no node could have joined with.
pub fn port_from_db(v: i64) -> Result<u16> {
    u16::try_from(v)
        .ok()
        .filter(|&p| p != 0)
        .with_context(|| format!("cluster_nodes has an invalid port {v}"))
}

/// The embedded backend: its own connection to the data dir's SQLite database.
pub struct SqliteCluster {
    db: Mutex<Connection>,
}

impl SqliteCluster {
    pub fn open(path: &Path) -> Result<SqliteCluster> {
        let db = Connection::open(path)
            .with_context(|| format!("cannot open cluster db {}", path.display()))?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.busy_timeout(std::time::Duration::from_secs(10))?;
        db.execute_batch(SCHEMA)
            .with_context(|| format!("cannot apply the cluster schema to {}", path.display()))?;
        Ok(SqliteCluster { db: Mutex::new(db) })
    }

    /// An in-memory store for unit tests.
    pub fn memory() -> Result<SqliteCluster> {
        let db = Connection::open_in_memory()?;
        db.execute_batch(SCHEMA)?;
        Ok(SqliteCluster { db: Mutex::new(db) })
    }
}

fn group_count(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<i64> {
    tx.query_row("SELECT COUNT(*) FROM cluster_groups", [], |r| r.get(0))
}

fn insert_group(tx: &rusqlite::Transaction<'_>, name: &str) -> Result<bool> {
    let exists: Option<i64> = tx
        .query_row(
            "SELECT 1 FROM cluster_groups WHERE name = ?1",
            [name],
            |r| r.get(0),
        )
        .optional()?;
    if exists.is_some() {
        return Ok(true);
    }
    if group_count(tx)? >= GROUPS_MAX as i64 {
        return Ok(false);
    }
    tx.execute(
        "INSERT INTO cluster_groups (name, created) VALUES (?1, ?2)",
        params![name, to_db(crate::meta::now_ms())],
    )?;
    Ok(true)
}

impl ClusterStore for SqliteCluster {
    fn create_group(&self, name: &str) -> Result<bool> {
        let mut db = self.db.lock();
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let ok = insert_group(&tx, name)?;
        tx.commit()?;
        Ok(ok)
    }

    fn groups(&self) -> Result<Vec<String>> {
        let db = self.db.lock();
        let mut q = db.prepare("SELECT name FROM cluster_groups ORDER BY name")?;
        let rows = q.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn join(&self, n: &NodeRow, create_group: bool) -> Result<Joined> {
        let mut db = self.db.lock();
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let exists: Option<i64> = tx
            .query_row(
                "SELECT 1 FROM cluster_groups WHERE name = ?1",
                [&n.group],
                |r| r.get(0),
            )
            .optional()?;
        if exists.is_none() {
            if !create_group {
                return Ok(Joined::UnknownGroup);
            }
            if !insert_group(&tx, &n.group)? {
                return Ok(Joined::Full);
            }
        }
        let others: i64 = tx.query_row(
            "SELECT COUNT(*) FROM cluster_nodes WHERE grp = ?1 AND NOT (host = ?2 AND port = ?3)",
            params![n.group, n.addr.host, n.addr.port],
            |r| r.get(0),
        )?;
        if others >= NODES_MAX as i64 {
            return Ok(Joined::Full);
        }
        tx.execute(
            "INSERT INTO cluster_nodes (host, port, grp, version, started, free, last_beat) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
             ON CONFLICT (host, port) DO UPDATE SET grp = ?3, version = ?4, started = ?5, \
             free = ?6, last_beat = ?7",
            params![
                n.addr.host,
                n.addr.port,
                n.group,
                n.version,
                to_db(n.started),
                to_db(n.free),
                to_db(n.last_beat_ms)
            ],
        )?;
        match &n.http {
            Some(h) => tx.execute(
                GATEWAY_UPSERT,
                params![n.addr.host, n.addr.port, h.host, h.port],
            )?,
            None => tx.execute(GATEWAY_FORGET, params![n.addr.host, n.addr.port])?,
        };
        tx.commit()?;
        Ok(Joined::Ok)
    }

    fn beat(
        &self,
        group: &str,
        addr: &NodeAddr,
        started: u64,
        free: u64,
        now_ms: u64,
    ) -> Result<bool> {
        let db = self.db.lock();
        let n = db.execute(
            "UPDATE cluster_nodes SET started = ?1, free = ?2, last_beat = ?3 \
             WHERE host = ?4 AND port = ?5 AND grp = ?6",
            params![
                to_db(started),
                to_db(free),
                to_db(now_ms),
                addr.host,
                addr.port,
                group
            ],
        )?;
        Ok(n == 1)
    }

    fn nodes(&self) -> Result<Vec<NodeRow>> {
        let db = self.db.lock();
        let mut q = db.prepare_cached(NODES)?;
        let mut rows = q.query([])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            out.push(NodeRow {
                group: r.get(0)?,
                addr: NodeAddr {
                    host: r.get(1)?,
                    port: port_from_db(r.get(2)?)?,
                },
                version: u16::try_from(r.get::<_, i64>(3)?).unwrap_or(0),
                started: from_db(r.get(4)?),
                free: from_db(r.get(5)?),
                last_beat_ms: from_db(r.get(6)?),
                http: gateway_from_db(r.get(7)?, r.get(8)?),
            });
        }
        Ok(out)
    }

    fn route(&self, app: &str, user: &str) -> Result<Option<String>> {
        let db = self.db.lock();
        Ok(db
            .query_row(
                "SELECT grp FROM cluster_router WHERE app = ?1 AND usr = ?2",
                [app, user],
                |r| r.get(0),
            )
            .optional()?)
    }

    fn assign(&self, app: &str, user: &str, group: &str) -> Result<String> {
        let mut db = self.db.lock();
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO cluster_router (app, usr, grp, created) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (app, usr) DO NOTHING",
            params![app, user, group, to_db(crate::meta::now_ms())],
        )?;
        let g: String = tx.query_row(
            "SELECT grp FROM cluster_router WHERE app = ?1 AND usr = ?2",
            [app, user],
            |r| r.get(0),
        )?;
        tx.commit()?;
        Ok(g)
    }

    fn users_per_group(&self) -> Result<Vec<(String, u64)>> {
        let db = self.db.lock();
        let mut q = db.prepare("SELECT grp, COUNT(*) FROM cluster_router GROUP BY grp")?;
        let rows = q.query_map([], |r| Ok((r.get(0)?, from_db(r.get(1)?))))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn users_of(
        &self,
        group: &str,
        after: (&str, &str),
        limit: u32,
    ) -> Result<Vec<(String, String)>> {
        let db = self.db.lock();
        let mut q = db.prepare_cached(USERS_OF)?;
        let rows = q.query_map(params![group, after.0, after.1, limit], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}
