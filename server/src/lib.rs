//! ferry's storage server (seed 002's server side, seed 004's storage role).
//!
//! - [`access`]: LINK proofs, HELLO tokens and the authorize step every command passes.
//! - [`config`]: `conf/server.toml` and the command line.
//! - [`meta`]: the metadata store (SQLite by default) behind the [`meta::MetaStore`] trait.
//! - [`ids`]: file ids and paths from an id allocator with DB-persisted steps.
//! - [`storage`]: the data directory, upload sessions and every file operation (disk I/O), one
//!   module per lifecycle phase.
//! - [`conn`]: one client connection on the reactor (framing, streaming, sendfile).
//! - [`syncer`]: group commit of uploaded blocks (fdatasync + metadata) off the connections.
//! - [`outbox`]: a connection's outgoing bytes and sendfile ranges (both protocols).
//! - [`reaper`]: expires idle upload sessions.
//! - [`http`]: the HTTP streaming gateway (second listener, `[http]` in the config).
//! - [`cluster`]: the tracker and id roles, and a cluster node's JOIN/BEAT thread.

pub mod access;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod fd_budget;
pub mod http;
pub mod ids;
pub mod meta;
pub mod outbox;
pub mod reaper;
pub mod storage;
pub mod sync_group;
pub mod syncer;
pub mod tenants;

use anyhow::Context;
use clap::Parser;
use ferry_common::reactor::{self, Reactor};
use log::info;
use std::sync::Arc;

/// The binary's entry point: parse flags, load config, open storage, serve until SIGTERM.
pub fn main() -> anyhow::Result<()> {
    let args = config::Args::parse();
    ferry_common::logging::init();
    let cfg = config::Config::from_args(&args)?;
    serve(cfg)
}

/// Runs a server with this config until SIGTERM/SIGINT.
pub fn serve(cfg: config::Config) -> anyhow::Result<()> {
    let fds = ferry_common::net::raise_fd_limit();
    let cache = if cfg.http.listen.is_some() {
        http::cache_max() as u64
    } else {
        0
    };
    let budget = fd_budget::plan(fds, &cfg, cache);
    budget.log(cfg.max_connections);
    let listen = cfg.listen;
    let rcfg = reactor::Config {
        workers: cfg.workers,
        max_connections: budget.connections,
        max_per_ip: cfg.max_connections_per_ip,
        idle_timeout: cfg.idle_timeout(),
        shutdown_grace: cfg.shutdown_grace(),
        handle_signals: true,
    };
    use config::Role;
    if cfg.link.accept.is_empty() && cfg.has_role(Role::Tracker) {
        log::warn!(
            "no [link.accept]: any peer that reaches {listen} may join nodes to the tracker \
             and read its view; list the members' keys in [link.accept] and [link.members] \
             unless the network is trusted"
        );
    }
    if cfg.faults != config::Faults::default() {
        log::warn!("fault injection is ON ([faults]): for tests only");
    }
    let st = Arc::new(storage::Storage::open(cfg)?);
    let mut listeners = vec![ferry_common::net::listen(listen, 1024)?];
    if let Some(h) = st.cfg.http.listen {
        let l = ferry_common::net::listen(h, 1024)
            .with_context(|| format!("cannot listen for http on {h}"))?;
        listeners.push(l);
    }
    let r = Reactor::new(rcfg, listeners).context("cannot start the reactor")?;
    // Listener 1, when present, is the HTTP gateway's (see `conn::ServerService::accept`).
    let http = r.local_addrs().get(1).map(|&a| {
        info!("ferry-server http gateway listening on {a}");
        Arc::new(http::Gateway::new(st.clone(), a))
    });
    info!(
        "ferry-server listening on {} with data in {} ({} workers, block size {}, open files {fds})",
        r.local_addrs()
            .first()
            .map_or_else(|| listen.to_string(), |a| a.to_string()),
        st.root().display(),
        st.cfg.workers,
        st.cfg.block_size,
    );
    let roles = Arc::new(cluster::Roles::start(&st.cfg, st.meta())?);
    // A cluster node announces the address it really listens on (the port may have been 0).
    let beater = match (&st.cfg.cluster, r.local_addrs().first()) {
        (Some(c), Some(&bound)) if roles.storage => {
            let advertise = c.advertise.unwrap_or(bound);
            let gateway = match &http {
                Some(g) => Some((
                    st.cfg.http.announced(g.addr, &advertise.ip().to_string())?,
                    g.directory
                        .clone()
                        .context("a cluster node's gateway has a directory")?,
                )),
                None => None,
            };
            Some(
                cluster::beat::Beater::start(
                    c,
                    st.cfg.link.send.clone(),
                    advertise,
                    gateway,
                    st.root().to_owned(),
                )
                .context("cannot start the tracker beat thread")?,
            )
        }
        _ => None,
    };
    // Expiry, like start-up recovery, is the storage role's: a tracker keeps no
    // uploads of its own and must not touch the storage groups' rows.
    let reaper = roles.storage.then(|| reaper::Reaper::start(st.clone()));
    let syncer = syncer::Syncer::start(st.clone()).context("cannot start the block syncer")?;
    let result = r.run(Arc::new(conn::ServerService {
        st: st.clone(),
        roles: roles.clone(),
        access: Arc::new(access::Access::new(&st.cfg, budget.connections)),
        syncer: syncer.sender(),
        http,
    }));
    drop(beater);
    roles.stop();
    syncer.stop();
    if let Some(r) = reaper {
        r.stop();
    }
    info!("ferry-server stopped");
    result.context("reactor failed")
}
