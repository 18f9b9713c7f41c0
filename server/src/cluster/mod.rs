//! The cluster roles of a ferry-server (issue 8, seed 004), served on the same listener as the
//! storage role:
//!
//! - [`tracker`]: JOIN/BEAT from storage nodes, SADDRS, GROUPS and USERS (commands 10-14).
//!
//! Seed 004 also has an id server; ferry has none. Storage nodes reserve steps of ids in the
//! metadata database they share (`ids::StepAllocator`, one UPDATE per `id_step` files): they
//! need that database for every commit anyway, so an id server in front of it would add a hop
//! and a process that can fail without removing any dependency, and a file id names its group,
//! so ids of different clusters' groups never meet.
//! - [`store`]: the [`store::ClusterStore`] trait (groups, nodes, router table) and its
//!   embedded SQLite backend; [`pg`]: its PostgreSQL backend.
//! - [`beat`]: a storage node's JOIN/BEAT thread (`[cluster]` in the config).

pub mod beat;
pub mod pg;
pub mod store;
pub mod tracker;

#[cfg(test)]
mod tests;

use crate::config::{Config, Role};
use crate::meta::MetaStore;
use anyhow::Result;
use std::sync::Arc;

/// The cluster database for `meta_url`, read by the same rule as the storage role's
/// ([`crate::meta::backend`]): PostgreSQL, or the embedded `meta.db` of the data dir.
pub fn open_store(cfg: &Config) -> Result<Arc<dyn store::ClusterStore>> {
    match crate::meta::backend(cfg.meta_url.as_deref())? {
        crate::meta::Backend::Pg(url) => Ok(Arc::new(pg::PgCluster::open(url)?)),
        crate::meta::Backend::Sqlite => Ok(Arc::new(store::SqliteCluster::open(
            &cfg.data.join("meta.db"),
        )?)),
    }
}

/// The cluster roles this process runs, handed to every connection.
pub struct Roles {
    pub storage: bool,
    pub tracker: Option<Arc<tracker::Tracker>>,
}

impl Roles {
    /// Starts the tracker role if the config enables it.
    pub fn start(cfg: &Config, meta: Arc<dyn MetaStore>) -> Result<Roles> {
        let tracker = if cfg.has_role(Role::Tracker) {
            Some(tracker::Tracker::start(
                open_store(cfg)?,
                meta,
                cfg.tracker.clone(),
            ))
        } else {
            None
        };
        Ok(Roles {
            storage: cfg.has_role(Role::Storage),
            tracker,
        })
    }

    pub fn stop(&self) {
        if let Some(t) = &self.tracker {
            t.stop();
        }
    }
}
