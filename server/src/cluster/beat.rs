//! The storage node's side of the tracker protocol: a thread that JOINs every tracker of
//! `[cluster]` and BEATs each one every beat interval (the tracker says how often), with the
//! free bytes of the data volume. A tracker that forgot the node (NotJoined: restarted on an
//! empty database, or the node was moved) gets a JOIN again. Unreachable trackers are logged
//! once per outage, not on every beat. A node with an HTTP gateway announces it in its JOIN and
//! keeps the gateway list each reply brings in its [`Directory`].

use crate::config::ClusterConfig;
use crate::http::directory::Directory;
use crate::meta::now_ms;
use crossbeam_channel::{Sender, bounded};
use ferry_common::auth::SigningKey;
use ferry_common::proto::{
    self, BEAT_REPLY_MAX, BeatReply, CallError, ErrorCode, NodeAddr, NodeHello, call_once, cmd,
};
use log::{info, warn};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Until a tracker says otherwise.
const DEFAULT_INTERVAL: Duration = Duration::from_millis(2000);
/// Beats are never closer than this, whatever a tracker asks.
const MIN_INTERVAL: Duration = Duration::from_millis(50);
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

struct TrackerLink {
    addr: SocketAddr,
    /// The LINK proof key (`[link.send]`), for trackers that require one.
    link: Option<SigningKey>,
    joined: bool,
    /// An outage of this tracker has been logged.
    down: bool,
    interval: Duration,
}

pub struct Beater {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Beater {
    /// Starts beating for the node serving on `advertise` in `cfg.group`, with its HTTP gateway
    /// (announced address, and the directory the replies fill) when it serves one.
    pub fn start(
        cfg: &ClusterConfig,
        link: Option<SigningKey>,
        advertise: SocketAddr,
        http: Option<(NodeAddr, Arc<Directory>)>,
        data: PathBuf,
    ) -> std::io::Result<Beater> {
        if advertise.ip().is_unspecified() {
            warn!(
                "[cluster] advertises {advertise}, which proxies cannot connect to; set \
                 cluster.advertise to this node's reachable address"
            );
        }
        let me = NodeHello {
            group: cfg.group.clone(),
            host: advertise.ip().to_string(),
            port: advertise.port(),
            version: proto::VERSION,
            started: now_ms(),
            free: 0,
            http: http.as_ref().map(|(a, _)| a.clone()),
        };
        let directory = http.map(|(_, d)| d);
        let mut links: Vec<TrackerLink> = cfg
            .trackers
            .iter()
            .map(|&addr| TrackerLink {
                addr,
                link: link.clone(),
                joined: false,
                down: false,
                interval: DEFAULT_INTERVAL,
            })
            .collect();
        let (tx, rx) = bounded::<()>(1);
        let thread = std::thread::Builder::new()
            .name("tracker-beat".into())
            .spawn(move || {
                loop {
                    let mut me = me.clone();
                    me.free = crate::storage::free_bytes(&data);
                    let started = Instant::now();
                    for l in &mut links {
                        l.exchange(&me, directory.as_deref());
                    }
                    let every = links
                        .iter()
                        .map(|l| l.interval)
                        .min()
                        .unwrap_or(DEFAULT_INTERVAL)
                        .max(MIN_INTERVAL);
                    let wait = every.saturating_sub(started.elapsed());
                    if !matches!(
                        rx.recv_timeout(wait),
                        Err(crossbeam_channel::RecvTimeoutError::Timeout)
                    ) {
                        return;
                    }
                }
            })?;
        Ok(Beater {
            stop: Some(tx),
            thread: Some(thread),
        })
    }

    /// Stops beating (shutdown); trackers mark the node offline after their window.
    pub fn stop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Beater {
    fn drop(&mut self) {
        self.stop();
    }
}

impl TrackerLink {
    /// One JOIN (if not joined) or BEAT (re-JOIN on NotJoined).
    fn exchange(&mut self, me: &NodeHello, directory: Option<&Directory>) {
        let r = if self.joined {
            match self.send(cmd::TRACKER_BEAT, me) {
                Err(e) if e.code() == Some(ErrorCode::NotJoined) => {
                    info!(
                        "tracker {} does not know this node; joining again",
                        self.addr
                    );
                    self.joined = false;
                    self.send(cmd::TRACKER_JOIN, me)
                }
                r => r,
            }
        } else {
            self.send(cmd::TRACKER_JOIN, me)
        };
        match r {
            Ok(reply) => {
                let ms = reply.interval_ms;
                if let Some(d) = directory {
                    d.update(&reply.gateways);
                }
                if !self.joined {
                    info!(
                        "joined tracker {} as {}:{} in group {} (beat every {ms} ms)",
                        self.addr, me.host, me.port, me.group
                    );
                } else if self.down {
                    info!("tracker {} reachable again", self.addr);
                }
                self.joined = true;
                self.down = false;
                self.interval = Duration::from_millis(u64::from(ms));
            }
            Err(e) => {
                if !self.down {
                    warn!("tracker {} failed (retrying every beat): {e}", self.addr);
                    self.down = true;
                }
                // A refused request (unknown group, a limit): JOIN again next time. An
                // unreachable tracker may still know us; if not, its NotJoined says so.
                if e.code().is_some_and(|c| c != ErrorCode::Unavailable) {
                    self.joined = false;
                }
            }
        }
    }

    fn send(&self, c: u8, me: &NodeHello) -> Result<BeatReply, CallError> {
        let body = if c == cmd::TRACKER_JOIN {
            me.encode_join()
        } else {
            me.encode_beat()
        }
        .map_err(|e| CallError::Garbled {
            peer: self.addr,
            why: format!("cannot encode our own {}: {e}", cmd::name(c)),
        })?;
        let b = call_once(
            self.addr,
            CALL_TIMEOUT,
            self.link.as_ref(),
            c,
            &body,
            cmd::REPLY_TRACKER,
            BEAT_REPLY_MAX,
        )?;
        BeatReply::decode(&b).map_err(|e| CallError::Garbled {
            peer: self.addr,
            why: e.to_string(),
        })
    }
}
