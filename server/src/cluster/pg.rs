//! [`ClusterStore`] on PostgreSQL: the database every tracker of a cluster shares.
//!
//! A small r2d2 pool of sync `postgres` clients. The pool is built without connecting, so a
//! tracker starts (and answers from nothing / later from its last view) while the database is
//! down, and every call retries the connection; calls fail after `connection_timeout` instead
//! of hanging.

use super::store::{
    ClusterStore, GATEWAY_FORGET, GATEWAY_UPSERT, Joined, NODES, NodeRow, SCHEMA, USERS_OF,
    from_db, gateway_from_db, port_from_db, to_db,
};

/// Whether [`SCHEMA`]'s newest objects exist and the index it drops is gone.
const SCHEMA_CURRENT: &str = "SELECT to_regclass('cluster_gateways') IS NOT NULL \
     AND to_regclass('cluster_router_members') IS NOT NULL \
     AND to_regclass('cluster_router_grp') IS NULL";
use anyhow::{Context, Result};
use ferry_common::proto::{GROUPS_MAX, NODES_MAX, NodeAddr};
use r2d2_postgres::PostgresConnectionManager;
use r2d2_postgres::postgres::{Config, NoTls, Transaction};
use r2d2_postgres::r2d2::{NopErrorHandler, Pool, PooledConnection};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

type Manager = PostgresConnectionManager<NoTls>;

/// Serialises schema creation between trackers starting at once (CREATE TABLE IF NOT EXISTS is
/// not safe against a concurrent twin in PostgreSQL).
const SCHEMA_LOCK: i64 = 0x6665_7272_7963_6c75; // "ferryclu"

pub struct PgCluster {
    pool: Pool<Manager>,
    /// The schema has been applied (on the first connection that worked).
    ready: AtomicBool,
}

impl PgCluster {
    /// A pool for `url` (`postgres://user@host:port/db`); the schema is applied when the
    /// database first answers, so a tracker may start while it is down.
    pub fn open(url: &str) -> Result<PgCluster> {
        let cfg: Config = url
            .parse()
            // Not echoed: it may carry a password.
            .context("meta_url is not a valid PostgreSQL URL")?;
        Ok(Self::open_config(cfg))
    }

    /// The same, from a parsed configuration.
    pub fn open_config(mut cfg: Config) -> PgCluster {
        cfg.connect_timeout(Duration::from_secs(2));
        let pool = Pool::builder()
            .max_size(4)
            .min_idle(Some(0))
            .connection_timeout(Duration::from_secs(3))
            // Failed connects come back to the caller as errors; the tracker logs them once.
            .error_handler(Box::new(NopErrorHandler))
            .build_unchecked(PostgresConnectionManager::new(cfg, NoTls));
        PgCluster {
            pool,
            ready: AtomicBool::new(false),
        }
    }

    fn conn(&self) -> Result<PooledConnection<Manager>> {
        let mut c = self
            .pool
            .get()
            .context("cluster database (PostgreSQL) unreachable")?;
        if !self.ready.load(Ordering::Acquire) {
            let mut tx = c.transaction()?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])?;
            // Current already (every start but the first after an upgrade): no DDL, whose table
            // locks could deadlock with the other tracker's writes.
            let current: bool = tx.query_one(SCHEMA_CURRENT, &[])?.get(0);
            if !current {
                tx.batch_execute(SCHEMA)
                    .context("cannot apply the cluster schema")?;
            }
            tx.commit()?;
            self.ready.store(true, Ordering::Release);
        }
        Ok(c)
    }
}

fn insert_group(tx: &mut Transaction<'_>, name: &str) -> Result<bool> {
    // Groups are few and created rarely: a table lock makes the count check exact.
    tx.execute("LOCK TABLE cluster_groups IN SHARE ROW EXCLUSIVE MODE", &[])?;
    if tx
        .query_opt("SELECT 1 FROM cluster_groups WHERE name = $1", &[&name])?
        .is_some()
    {
        return Ok(true);
    }
    let n: i64 = tx
        .query_one("SELECT COUNT(*) FROM cluster_groups", &[])?
        .get(0);
    if n >= GROUPS_MAX as i64 {
        return Ok(false);
    }
    tx.execute(
        "INSERT INTO cluster_groups (name, created) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        &[&name, &to_db(crate::meta::now_ms())],
    )?;
    Ok(true)
}

impl ClusterStore for PgCluster {
    fn create_group(&self, name: &str) -> Result<bool> {
        let mut c = self.conn()?;
        let mut tx = c.transaction()?;
        let ok = insert_group(&mut tx, name)?;
        tx.commit()?;
        Ok(ok)
    }

    fn groups(&self) -> Result<Vec<String>> {
        let mut c = self.conn()?;
        let rows = c.query("SELECT name FROM cluster_groups ORDER BY name", &[])?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    fn join(&self, n: &NodeRow, create_group: bool) -> Result<Joined> {
        let mut c = self.conn()?;
        let mut tx = c.transaction()?;
        let exists = tx
            .query_opt("SELECT 1 FROM cluster_groups WHERE name = $1", &[&n.group])?
            .is_some();
        if !exists {
            if !create_group {
                return Ok(Joined::UnknownGroup);
            }
            if !insert_group(&mut tx, &n.group)? {
                return Ok(Joined::Full);
            }
        }
        // Serialise joins to one group so two nodes joining at once cannot both pass the count.
        tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&n.group])?;
        let port = i32::from(n.addr.port);
        let others: i64 = tx
            .query_one(
                "SELECT COUNT(*) FROM cluster_nodes WHERE grp = $1 AND NOT (host = $2 AND port = $3)",
                &[&n.group, &n.addr.host, &port],
            )?
            .get(0);
        if others >= NODES_MAX as i64 {
            return Ok(Joined::Full);
        }
        tx.execute(
            "INSERT INTO cluster_nodes (host, port, grp, version, started, free, last_beat) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (host, port) DO UPDATE SET grp = $3, version = $4, started = $5, \
             free = $6, last_beat = $7",
            &[
                &n.addr.host,
                &port,
                &n.group,
                &i32::from(n.version),
                &to_db(n.started),
                &to_db(n.free),
                &to_db(n.last_beat_ms),
            ],
        )?;
        match &n.http {
            Some(h) => tx.execute(
                GATEWAY_UPSERT,
                &[&n.addr.host, &port, &h.host, &i32::from(h.port)],
            )?,
            None => tx.execute(GATEWAY_FORGET, &[&n.addr.host, &port])?,
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
        let mut c = self.conn()?;
        let n = c.execute(
            "UPDATE cluster_nodes SET started = $1, free = $2, last_beat = $3 \
             WHERE host = $4 AND port = $5 AND grp = $6",
            &[
                &to_db(started),
                &to_db(free),
                &to_db(now_ms),
                &addr.host,
                &i32::from(addr.port),
                &group,
            ],
        )?;
        Ok(n == 1)
    }

    fn nodes(&self) -> Result<Vec<NodeRow>> {
        let mut c = self.conn()?;
        let rows = c.query(NODES, &[])?;
        rows.iter()
            .map(|r| {
                Ok(NodeRow {
                    group: r.get(0),
                    addr: NodeAddr {
                        host: r.get(1),
                        port: port_from_db(i64::from(r.get::<_, i32>(2)))?,
                    },
                    version: u16::try_from(r.get::<_, i32>(3)).unwrap_or(0),
                    started: from_db(r.get(4)),
                    free: from_db(r.get(5)),
                    last_beat_ms: from_db(r.get(6)),
                    http: gateway_from_db(r.get(7), r.get::<_, Option<i32>>(8).map(i64::from)),
                })
            })
            .collect()
    }

    fn route(&self, app: &str, user: &str) -> Result<Option<String>> {
        let mut c = self.conn()?;
        let row = c.query_opt(
            "SELECT grp FROM cluster_router WHERE app = $1 AND usr = $2",
            &[&app, &user],
        )?;
        Ok(row.map(|r| r.get(0)))
    }

    fn assign(&self, app: &str, user: &str, group: &str) -> Result<String> {
        let mut c = self.conn()?;
        let mut tx = c.transaction()?;
        // ON CONFLICT DO NOTHING waits for a concurrent inserter of the same key; the SELECT
        // (a new snapshot under READ COMMITTED) then sees the winner's row.
        tx.execute(
            "INSERT INTO cluster_router (app, usr, grp, created) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (app, usr) DO NOTHING",
            &[&app, &user, &group, &to_db(crate::meta::now_ms())],
        )?;
        let g: String = tx
            .query_one(
                "SELECT grp FROM cluster_router WHERE app = $1 AND usr = $2",
                &[&app, &user],
            )?
            .get(0);
        tx.commit()?;
        Ok(g)
    }

    fn users_per_group(&self) -> Result<Vec<(String, u64)>> {
        let mut c = self.conn()?;
        let rows = c.query("SELECT grp, COUNT(*) FROM cluster_router GROUP BY grp", &[])?;
        Ok(rows.iter().map(|r| (r.get(0), from_db(r.get(1)))).collect())
    }

    fn users_of(
        &self,
        group: &str,
        after: (&str, &str),
        limit: u32,
    ) -> Result<Vec<(String, String)>> {
        let mut c = self.conn()?;
        let rows = c.query(USERS_OF, &[&group, &after.0, &after.1, &i64::from(limit)])?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }
}
