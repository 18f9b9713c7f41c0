//! The cluster roles of a ferry-server (issue 8, seed 004), served on the same listener as the
//! storage role:
//!
//! - [`tracker`]: JOIN/BEAT from storage nodes, SADDRS and GROUPS (commands 10-13).
//! - [`idserver`]: ID_GET (command 40), unique ids over the metadata store's id steps.
//! - [`store`]: the [`store::ClusterStore`] trait (groups, nodes, router table) and its
//!   embedded SQLite backend; [`pg`]: its PostgreSQL backend.
//! - [`beat`]: a storage node's JOIN/BEAT thread (`[cluster]` in the config).

pub mod beat;
pub mod idserver;
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
    pub ids: Option<idserver::IdServer>,
}

impl Roles {
    /// Starts the tracker and id roles the config enables.
    pub fn start(cfg: &Config, meta: Arc<dyn MetaStore>) -> Result<Roles> {
        let tracker = if cfg.has_role(Role::Tracker) {
            Some(tracker::Tracker::start(
                open_store(cfg)?,
                meta.clone(),
                cfg.tracker.clone(),
            ))
        } else {
            None
        };
        let ids = cfg
            .has_role(Role::Id)
            .then(|| idserver::IdServer::new(meta, cfg.id_step));
        Ok(Roles {
            storage: cfg.has_role(Role::Storage),
            tracker,
            ids,
        })
    }

    pub fn stop(&self) {
        if let Some(t) = &self.tracker {
            t.stop();
        }
    }
}
