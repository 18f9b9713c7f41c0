//! ferry-proxy: the relay in front of clients (client-proxy) and in front of servers
//! (server-proxy). It reads the first frame of a session itself (answers PROBE, checks a LINK
//! proof when `[link.accept]` asks for one, checks HELLO and, routing, its session token),
//! connects to the first healthy upstream (primary, then standbys) or, configured with trackers,
//! to a node of the HELLO user's group, forwards the HELLO and then relays bytes both ways with
//! splice(2), without parsing them. See docs/PROXY.md.

pub mod config;
pub mod first;
pub mod front;
pub mod lookup;
pub mod relay;
pub mod route;
pub mod session;
pub mod stats;
pub mod tls;
pub mod upstream;

pub use config::{Cli, Config};

use anyhow::Context;
use ferry_common::reactor::{self, Reactor};
use log::{error, info, warn};
use relay::Mode;
use route::RouteCache;
use session::{ProxyService, Router, Shared};
use stats::{Counters, StatsServer};
use std::sync::Arc;
use upstream::{Checker, Upstreams};

/// Descriptors of the process itself (listener, epoll, stats listener, health checks, tracker
/// lookups, logs), with room to spare.
const FIXED_FDS: u64 = 64;

/// The sessions the proxy takes: `max_connections`, lowered (with a warning) to what the
/// open-file limit `fds` holds, so sessions never run the proxy into EMFILE. A session holds
/// the client's socket and the upstream's, and in splice mode a pipe (two ends) each way.
fn session_budget(fds: u64, mode: Mode, max_connections: usize) -> usize {
    let per = match mode {
        Mode::Splice => 6,
        Mode::Userspace => 2,
    };
    let (_, take) = ferry_common::net::connections_within(fds, FIXED_FDS, per, max_connections);
    if take < max_connections {
        warn!(
            "open-file limit {fds}: {FIXED_FDS} kept for the proxy, {per} per session ({}): \
             max_connections lowered from {max_connections} to {take}. Raise the limit \
             (ulimit -n, LimitNOFILE=) for more",
            mode.name()
        );
    }
    take
}

/// Runs the proxy until SIGTERM/SIGINT (when `handle_signals`) has drained every session.
pub fn run(cfg: &Config, handle_signals: bool) -> anyhow::Result<()> {
    let fds = ferry_common::net::raise_fd_limit();
    let mode = if !cfg.zero_copy {
        Mode::Userspace
    } else {
        match relay::splice_works() {
            Ok(()) => Mode::Splice,
            Err(why) => {
                warn!("{why}; falling back to userspace buffers");
                Mode::Userspace
            }
        }
    };
    let certs = match &cfg.tls {
        Some(t) => {
            Some(tls::CertStore::load(t.cert.clone(), t.key.clone()).map_err(anyhow::Error::msg)?)
        }
        None => None,
    };
    let tls_config = match &certs {
        Some(store) => Some(store.server_config().map_err(anyhow::Error::msg)?),
        None => None,
    };
    let ups = Arc::new(Upstreams::new(&cfg.upstreams, cfg.rise, cfg.fall));
    let counters = Arc::new(Counters::default());
    let listener = ferry_common::net::listen(cfg.listen, 1024)?;
    let rcfg = reactor::Config {
        workers: cfg.worker_count(),
        max_connections: session_budget(fds, mode, cfg.max_connections),
        max_per_ip: cfg.max_connections_per_ip,
        idle_timeout: cfg.idle_timeout,
        shutdown_grace: cfg.shutdown_grace,
        handle_signals,
    };
    let reactor = Reactor::new(rcfg.clone(), vec![listener]).context("cannot start reactor")?;
    let _stats = match cfg.stats_listen {
        Some(addr) => Some(StatsServer::start(
            addr,
            counters.clone(),
            ups.clone(),
            mode == Mode::Splice,
        )?),
        None => None,
    };
    let _checker = Checker::start(ups.clone(), cfg.check_interval, cfg.connect_timeout);
    let list = |v: &[std::net::SocketAddr]| {
        v.iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let target = match cfg.upstreams.split_first() {
        Some((primary, standbys)) => format!("primary {primary} standbys [{}]", list(standbys)),
        None => format!(
            "routing by user via trackers [{}], routes cached {:?}",
            list(&cfg.trackers),
            cfg.route_cache
        ),
    };
    if cfg.auth.is_some() && !cfg.routed() {
        warn!(
            "[auth] is ignored: only a routing proxy (`trackers`) checks session tokens; with \
             fixed upstreams the server behind checks them"
        );
    }
    let link = format!(
        "link proofs: {} in, {} out",
        if cfg.link.accept.is_empty() {
            String::from("not required")
        } else {
            format!(
                "required from [{}]",
                cfg.link
                    .accept
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
        cfg.link
            .send
            .as_ref()
            .map_or_else(|| String::from("none"), |k| format!("as {}", k.id)),
    );
    info!(
        "ferry-proxy listening on {}{} -> {target}; {link}; relay mode: {}, {} bytes per \
         direction; {} workers, max {} sessions, fd limit {fds}",
        reactor
            .local_addrs()
            .first()
            .map_or_else(|| cfg.listen.to_string(), |a| a.to_string()),
        if certs.is_some() {
            " with TLS (sessions relay in userspace)"
        } else {
            ""
        },
        mode.name(),
        cfg.pipe_size,
        rcfg.workers,
        rcfg.max_connections,
    );
    let service = Arc::new(ProxyService {
        sh: Arc::new(Shared {
            counters: counters.clone(),
            ups,
            mode,
            pipe_size: cfg.pipe_size,
            connect_timeout: cfg.connect_timeout,
            hello_timeout: cfg.hello_timeout,
            router: match (cfg.routed(), &cfg.auth) {
                (true, Some(auth)) => Some(Router {
                    trackers: cfg.trackers.clone().into(),
                    cache: RouteCache::new(cfg.route_cache),
                    auth: auth.verifier(),
                }),
                // Config::validate refuses a routing proxy without [auth].
                (true, None) => anyhow::bail!("a routing proxy needs [auth]"),
                (false, _) => None,
            },
            link_accept: cfg.link.verifier(),
            link_send: cfg.link.send.clone().map(Arc::new),
            tls: tls_config,
        }),
        certs,
    });
    reactor.run(service).context("reactor failed")?;
    info!(
        "ferry-proxy stopped after {} sessions",
        counters
            .sessions_total
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    Ok(())
}

/// The `ferry-proxy` binary: parse the command line, load the config, run.
pub fn main() -> std::process::ExitCode {
    use clap::Parser;
    let cli = Cli::parse();
    ferry_common::logging::init();
    let result = cli.resolve().and_then(|cfg| run(&cfg, true));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_derived_from_the_open_file_limit() {
        assert_eq!(session_budget(1 << 20, Mode::Splice, 4096), 4096);
        assert_eq!(
            session_budget(20_000, Mode::Splice, 4096),
            (20_000 - 64) / 6
        );
        assert_eq!(session_budget(20_000, Mode::Userspace, 4096), 4096);
        assert_eq!(
            session_budget(100, Mode::Splice, 4096),
            16,
            "never below 16"
        );
    }
}
