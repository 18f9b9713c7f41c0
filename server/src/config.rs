//! Server settings: `conf/server.toml`, with command-line flags overriding the file.

use anyhow::{Context, bail};
use clap::Parser;
use ferry_common::auth::{AuthConfig, LinkConfig};
use ferry_common::proto;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// `ferry-server`: ferry's storage server (storage and tracker roles in one process).
#[derive(Debug, Parser)]
#[command(
    name = "ferry-server",
    version,
    about = "ferry storage server: small files, big files in parallel blocks, breakpoint resume, \
             instant upload, ranged downloads with zero copy",
    after_help = "Every setting lives in the TOML config (see conf/server.toml, every key \
                  commented); --listen and --data override the file. Logging: RUST_LOG=debug."
)]
pub struct Args {
    /// Config file (TOML). Without it the built-in defaults are used.
    #[arg(short, long, env = "FERRY_SERVER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:7400 (overrides `listen`).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Data directory holding stored files, temp files and the metadata DB (overrides `data`).
    #[arg(long)]
    pub data: Option<PathBuf>,
}

/// The roles one `ferry-server` process can run on its one listener (seed 004's servers).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Stores files: uploads, downloads, sessions (commands 70-79) and the HTTP gateway.
    Storage,
    /// Cluster membership and user -> group routing (commands 10-14).
    Tracker,
}

/// A storage node's place in a cluster (`[cluster]`); absent on a standalone server.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The group this node belongs to; the nodes of a group share `data` and the metadata DB.
    pub group: String,
    /// Trackers this node joins and beats to (all of them).
    pub trackers: Vec<SocketAddr>,
    /// The address trackers hand to proxies for this node; defaults to `listen`.
    #[serde(default)]
    pub advertise: Option<SocketAddr>,
    /// This node's name among its group's peers (its lock file and temp dir); defaults to the
    /// advertise address.
    #[serde(default)]
    pub node_name: Option<String>,
}

/// The tracker role's settings (`[tracker]`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TrackerConfig {
    /// A node that has not beaten for this long is offline (milliseconds).
    pub offline_after_ms: u64,
    /// How often nodes beat; told to them in every JOIN/BEAT reply (milliseconds).
    pub beat_interval_ms: u64,
    /// Groups created at start when missing.
    pub groups: Vec<String>,
    /// Let a JOIN naming an unknown group create it (off: such a JOIN is refused).
    pub allow_create_groups: bool,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        TrackerConfig {
            offline_after_ms: 6000,
            beat_interval_ms: 2000,
            groups: Vec::new(),
            allow_create_groups: false,
        }
    }
}

/// The named phases of storing data, in order. The server logs each (debug level) and
/// `faults.pause_at` can hold it at one, so a test can kill -9 it exactly there.
pub const PHASES: &[&str] = &[
    // UPLOAD_INIT reserved a new session's place; no temp file or row yet.
    "session-reserved",
    // A block's bytes are written and CRC-checked, not yet synced.
    "block-written",
    // fdatasync done, the block not yet recorded.
    "block-synced",
    // Recorded in the metadata DB, not yet acknowledged.
    "block-recorded",
    // A new file's committing row is inserted, the file not yet renamed into place.
    "file-inserted",
    // Renamed (or linked) into place, the directory not yet synced, the row not committed.
    "file-renamed",
    // The row is committed (the file is stored), the client not yet answered.
    "file-committed",
];

/// Fault injection for tests that cannot produce the real fault (see `fault_write_fail_after`).
#[derive(Debug, Clone, Deserialize, Serialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    /// After this many bytes of file payload have been written by the whole process, every
    /// further payload write fails with ENOSPC. Only for tests on machines where a small tmpfs
    /// cannot be mounted; never set it in production.
    pub write_fail_after: Option<u64>,
    /// Hold the worker for `pause_ms` each time it reaches this phase (one of [`PHASES`]), after
    /// logging "phase NAME reached". Tests kill -9 the server there. Never in production.
    pub pause_at: Option<String>,
    /// How long `pause_at` holds (milliseconds; default 30000).
    pub pause_ms: Option<u64>,
    /// Hold only the first this many arrivals at `pause_at` (default: every one), so a test
    /// can hold one upload there while others pass.
    pub pause_times: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listen: SocketAddr,
    pub data: PathBuf,
    /// Where metadata lives: unset = embedded SQLite in `data`; `postgres://...` = PostgreSQL
    /// (shared by a cluster). `FERRY_META_URL` overrides it.
    pub meta_url: Option<String>,
    pub roles: Vec<Role>,
    pub cluster: Option<ClusterConfig>,
    pub tracker: TrackerConfig,
    pub block_size: u32,
    pub small_file_max: u64,
    /// Worker threads (default 16, more than the cores: they wait in fsync; see conf/server.toml).
    pub workers: usize,
    pub max_connections: usize,
    /// Most connections from one IP address to one listener (0: no cap; each listener counts
    /// its own). The binary protocol's peers are proxies, each carrying many clients; the HTTP
    /// gateway's are players (and `http.max_connections_per_ip` caps those lower).
    pub max_connections_per_ip: usize,
    /// Most sessions (connections past HELLO) one app may hold, all its users together, so no
    /// app takes every connection; default half of `max_connections` (as lowered to the
    /// open-file limit). `[apps.APP] max_connections` overrides it for one app.
    pub max_connections_per_app: Option<usize>,
    /// Most sessions one user (of one app) may hold.
    pub max_connections_per_user: usize,
    pub idle_timeout_ms: u64,
    /// A connection's first frame (HELLO, PROBE or a cluster command) must arrive this soon.
    pub hello_timeout_ms: u64,
    /// Once a frame has begun, its header and fixed part must arrive this soon (a peer
    /// trickling a header byte by byte is cut off, whatever the idle timeout).
    pub frame_timeout_ms: u64,
    /// While a payload streams in, at least 64 KiB (or the rest of it) must arrive in every
    /// window of this length.
    pub progress_timeout_ms: u64,
    pub session_ttl_secs: u64,
    /// A session that has stored no block yet expires this long after it was opened (at most
    /// `session_ttl_secs`); a repeated UPLOAD_INIT does not extend it, nor any session's life:
    /// only stored blocks do.
    pub fresh_session_ttl_secs: u64,
    pub max_sessions: usize,
    /// Most upload sessions one user (of one app) may have open.
    pub max_sessions_per_user: usize,
    /// Most upload sessions one app may have open (all its users together), so no app fills
    /// the whole table alone; default half of `max_sessions`. `[apps.APP] max_sessions`
    /// overrides it for one app.
    pub max_sessions_per_app: Option<usize>,
    /// Most bytes one app's open upload sessions may declare (all its users; their temp files
    /// grow to that as blocks arrive), so no app can claim the whole volume; default half the
    /// data volume's size. `[apps.APP] max_open_bytes` overrides it for one app.
    pub max_open_bytes_per_app: Option<u64>,
    /// Uploads that would leave less free space than this on the data volume are refused up
    /// front (error 15), so the database and in-flight uploads never hit a full disk.
    pub min_free_bytes: u64,
    pub shutdown_grace_ms: u64,
    pub read_buffer_kib: usize,
    pub sync_blocks: bool,
    pub id_step: u64,
    pub challenge_max: u64,
    pub faults: Faults,
    /// The HTTP streaming gateway (`[http]`; off unless `http.listen` is set).
    pub http: crate::http::HttpConfig,
    /// The app keys every session's HELLO token is checked against (required with the storage
    /// role).
    pub auth: AuthConfig,
    /// LINK proofs: the key this server proves to trackers, and the proxies' keys it requires
    /// before any HELLO or cluster command.
    pub link: LinkConfig,
    /// Per-app policies (`[apps.APP]`); an app without one has the defaults.
    pub apps: BTreeMap<String, AppPolicy>,
}

/// `[apps.APP]`: how one app's files may be used.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AppPolicy {
    pub reads: Reads,
    /// Most bytes one user may store (0: no quota); an upload that would pass it is refused
    /// when it starts (error 26).
    pub max_stored_bytes: u64,
    /// Most files one user may store (0: no quota).
    pub max_files: u64,
    /// Most upload sessions this app may have open (all its users); default the server's
    /// `max_sessions_per_app`.
    pub max_sessions: Option<usize>,
    /// Most upload sessions one user of this app may have open; default the server's
    /// `max_sessions_per_user`.
    pub max_sessions_per_user: Option<usize>,
    /// Most sessions (connections past HELLO) of this app; default the server's
    /// `max_connections_per_app`.
    pub max_connections: Option<usize>,
    /// Most sessions of one user of this app; default the server's `max_connections_per_user`.
    pub max_connections_per_user: Option<usize>,
    /// Most bytes this app's open upload sessions may declare; default the server's
    /// `max_open_bytes_per_app`.
    pub max_open_bytes: Option<u64>,
    /// Most bytes one user's open upload sessions may declare; default the app's limit.
    pub max_open_bytes_per_user: Option<u64>,
}

/// Who may read a file of the app over the binary protocol.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Reads {
    /// Any user of the app holding the file id (it has 80+ random bits): how a photo is sent
    /// to a friend.
    #[default]
    Anyone,
    /// Its owner only, or a token with the admin scope, or a read share of that file the app's
    /// backend minted; anyone else hears "not found", as for a file that does not exist.
    Owner,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 7400)),
            data: PathBuf::from("data"),
            meta_url: None,
            roles: vec![Role::Storage],
            cluster: None,
            tracker: TrackerConfig::default(),
            block_size: 4 << 20,
            small_file_max: 4 << 20,
            workers: 16,
            max_connections: 4096,
            max_connections_per_ip: 1024,
            max_connections_per_app: None,
            max_connections_per_user: 64,
            idle_timeout_ms: 120_000,
            hello_timeout_ms: 10_000,
            frame_timeout_ms: 30_000,
            progress_timeout_ms: 60_000,
            session_ttl_secs: 86_400,
            fresh_session_ttl_secs: 900,
            max_sessions: 10_000,
            max_sessions_per_user: 64,
            max_sessions_per_app: None,
            max_open_bytes_per_app: None,
            min_free_bytes: 256 << 20,
            shutdown_grace_ms: 10_000,
            read_buffer_kib: 256,
            sync_blocks: true,
            id_step: 1000,
            challenge_max: 1 << 20,
            faults: Faults::default(),
            http: crate::http::HttpConfig::default(),
            auth: AuthConfig::default(),
            link: LinkConfig::default(),
            apps: BTreeMap::new(),
        }
    }
}

impl Config {
    /// Loads the file named by `--config` (or the defaults) and applies the flag overrides.
    pub fn from_args(args: &Args) -> anyhow::Result<Config> {
        let mut cfg = match &args.config {
            Some(p) => ferry_common::config::load::<Config>(p)?,
            None => Config::default(),
        };
        if let Some(l) = args.listen {
            cfg.listen = l;
        }
        if let Some(d) = &args.data {
            cfg.data = d.clone();
        }
        if let Ok(url) = std::env::var("FERRY_META_URL")
            && !url.is_empty()
        {
            cfg.meta_url = Some(url);
        }
        cfg.check().context("invalid server config")?;
        Ok(cfg)
    }

    /// Refuses settings the server cannot honour, with the key named.
    pub fn check(&self) -> anyhow::Result<()> {
        use ferry_common::proto::{BLOCK_MAX, BLOCK_MIN};
        if self.block_size < BLOCK_MIN || u64::from(self.block_size) > BLOCK_MAX {
            bail!("block_size must be within 64 KiB ..= 64 MiB");
        }
        if self.small_file_max > BLOCK_MAX {
            bail!("small_file_max must be at most 64 MiB (the protocol's payload limit)");
        }
        if self.workers == 0
            || self.max_connections == 0
            || self.max_sessions == 0
            || self.max_sessions_per_user == 0
            || self.max_sessions_per_app == Some(0)
            || self.max_connections_per_app == Some(0)
            || self.max_connections_per_user == 0
            || self.max_open_bytes_per_app == Some(0)
            || self.apps.values().any(|p| {
                p.max_sessions == Some(0)
                    || p.max_sessions_per_user == Some(0)
                    || p.max_connections == Some(0)
                    || p.max_connections_per_user == Some(0)
                    || p.max_open_bytes == Some(0)
                    || p.max_open_bytes_per_user == Some(0)
            })
        {
            bail!(
                "workers, max_connections, max_sessions, max_sessions_per_user, \
                 max_sessions_per_app, max_connections_per_app, max_connections_per_user, \
                 max_open_bytes_per_app and their [apps.*] counterparts must be at least 1"
            );
        }
        if self.hello_timeout_ms == 0 || self.frame_timeout_ms == 0 || self.progress_timeout_ms == 0
        {
            bail!("hello_timeout_ms, frame_timeout_ms and progress_timeout_ms must be at least 1");
        }
        if !(4..=16 * 1024).contains(&self.read_buffer_kib) {
            bail!("read_buffer_kib must be within 4 ..= 16384");
        }
        if self.session_ttl_secs == 0
            || self.fresh_session_ttl_secs == 0
            || self.id_step == 0
            || self.challenge_max == 0
        {
            bail!(
                "session_ttl_secs, fresh_session_ttl_secs, id_step and challenge_max must be \
                 at least 1"
            );
        }
        if self.roles.is_empty() {
            bail!("roles must name at least one of \"storage\", \"tracker\"");
        }
        if let Some(c) = &self.cluster
            && (c.group.is_empty() || c.trackers.is_empty())
        {
            bail!("[cluster] needs a group and at least one tracker");
        }
        let groups = self.cluster.iter().map(|c| &c.group);
        for g in groups.chain(&self.tracker.groups) {
            // The group goes into every file id the node issues, in front of a dot.
            proto::check_group(g).map_err(|e| anyhow::anyhow!("group {g:?}: {e}"))?;
        }
        if self.faults != Faults::default() && !cfg!(feature = "faults") {
            bail!(
                "[faults] injects failures for tests, and this ferry-server was built without \
                 them (the `faults` feature, which only test builds enable): remove [faults]"
            );
        }
        if let Some(p) = &self.faults.pause_at
            && !PHASES.contains(&p.as_str())
        {
            bail!("faults.pause_at must be one of {PHASES:?}");
        }
        self.http.check()?;
        if self.has_role(Role::Storage) {
            self.auth.check("auth").map_err(anyhow::Error::msg)?;
        }
        if let Some(app) = self.apps.keys().find(|a| !self.auth.keys.contains_key(*a)) {
            bail!(
                "[apps.{app}]: no such app in [auth.keys] (a typo would leave its policy unused)"
            );
        }
        self.link.check().map_err(anyhow::Error::msg)?;
        Ok(())
    }

    /// What `app`'s own policy sets with `pick` (`[apps.APP]`), if it sets it.
    fn app_sets<T>(&self, app: &str, pick: impl FnOnce(&AppPolicy) -> Option<T>) -> Option<T> {
        self.apps.get(app).and_then(pick)
    }

    /// Most upload sessions `app` may have open: its `[apps.APP] max_sessions`, else
    /// `max_sessions_per_app`, else half the table.
    pub fn app_sessions(&self, app: &str) -> usize {
        self.app_sets(app, |p| p.max_sessions)
            .or(self.max_sessions_per_app)
            .unwrap_or((self.max_sessions / 2).max(1))
    }

    /// Most upload sessions one user of `app` may have open: its `[apps.APP]
    /// max_sessions_per_user`, else the server's.
    pub fn user_sessions(&self, app: &str) -> usize {
        self.app_sets(app, |p| p.max_sessions_per_user)
            .unwrap_or(self.max_sessions_per_user)
    }

    /// Most sessions `app` may hold when the server takes `max_connections`: its `[apps.APP]
    /// max_connections`, else `max_connections_per_app`, else half.
    pub fn app_connections(&self, app: &str, max_connections: usize) -> usize {
        self.app_sets(app, |p| p.max_connections)
            .or(self.max_connections_per_app)
            .unwrap_or((max_connections / 2).max(1))
    }

    /// Most sessions one user of `app` may hold: its `[apps.APP] max_connections_per_user`,
    /// else the server's.
    pub fn user_connections(&self, app: &str) -> usize {
        self.app_sets(app, |p| p.max_connections_per_user)
            .unwrap_or(self.max_connections_per_user)
    }

    /// Most bytes `app`'s open upload sessions may declare on a data volume of `volume`
    /// bytes: its `[apps.APP] max_open_bytes`, else `max_open_bytes_per_app`, else half the
    /// volume.
    pub fn app_open_bytes(&self, app: &str, volume: u64) -> u64 {
        self.app_sets(app, |p| p.max_open_bytes)
            .or(self.max_open_bytes_per_app)
            .unwrap_or(volume / 2)
    }

    /// Most bytes one user's open upload sessions of `app` may declare: its `[apps.APP]
    /// max_open_bytes_per_user`, else the app's limit.
    pub fn user_open_bytes(&self, app: &str, volume: u64) -> u64 {
        self.app_sets(app, |p| p.max_open_bytes_per_user)
            .unwrap_or_else(|| self.app_open_bytes(app, volume))
    }

    /// Whether `app`'s files are readable by their owners only.
    pub fn owner_reads(&self, app: &str) -> bool {
        self.apps.get(app).is_some_and(|p| p.reads == Reads::Owner)
    }

    pub fn has_role(&self, r: Role) -> bool {
        self.roles.contains(&r)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
    pub fn session_ttl(&self) -> Duration {
        Duration::from_secs(self.session_ttl_secs)
    }
    /// How long a session that has stored no block lives.
    pub fn fresh_session_ttl(&self) -> Duration {
        Duration::from_secs(self.fresh_session_ttl_secs.min(self.session_ttl_secs))
    }
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_config_parses_but_its_example_secrets_refuse_start() {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../conf/server.toml");
        let args = Args {
            config: Some(path.clone()),
            listen: Some("127.0.0.1:9".parse().unwrap()),
            data: Some(PathBuf::from("/tmp/x")),
        };
        let e = format!("{:#}", Config::from_args(&args).unwrap_err());
        assert!(
            e.contains("example placeholder") && e.contains("ferry keygen"),
            "{e}"
        );
        // With real secrets in place of the placeholders it starts, and flags override.
        let mut cfg: Config = ferry_common::config::load(&path).unwrap();
        for keys in cfg.auth.keys.values_mut() {
            for s in keys.values_mut() {
                *s = ferry_common::auth::new_secret();
            }
        }
        for s in cfg
            .link
            .accept
            .values_mut()
            .chain(cfg.http.secrets.values_mut())
        {
            *s = ferry_common::auth::new_secret();
        }
        if let Some(k) = &mut cfg.link.send {
            k.secret = ferry_common::auth::new_secret();
        }
        cfg.check().unwrap();
        assert_eq!(cfg.block_size, 4 << 20);
        assert_eq!(cfg.faults, Faults::default());
        assert!(
            !cfg.link.accept.is_empty(),
            "the example requires link proofs"
        );
    }

    #[test]
    fn listeners_default_to_loopback_and_the_gateway_to_off() {
        let cfg = Config::default();
        assert!(cfg.listen.ip().is_loopback());
        assert_eq!(cfg.http.listen, None);
    }

    #[test]
    fn bad_values_are_refused() {
        let cfg = Config {
            block_size: 1000,
            ..Config::default()
        };
        assert!(cfg.check().is_err());
        let cfg = Config {
            small_file_max: 1 << 30,
            ..Config::default()
        };
        assert!(cfg.check().is_err());
    }

    #[test]
    fn app_policies_name_known_apps_and_known_read_rules() {
        let secret = ferry_common::auth::new_secret();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.toml");
        let parse = |apps: &str| -> anyhow::Result<Config> {
            let text = format!("[auth.keys.demo]\nk1 = \"{secret}\"\n{apps}");
            std::fs::write(&path, text)?;
            let cfg: Config = ferry_common::config::load(&path)?;
            cfg.check()?;
            Ok(cfg)
        };
        let cfg = parse("[apps.demo]\nreads = \"owner\"\n").unwrap();
        assert!(cfg.owner_reads("demo") && !cfg.owner_reads("other"));
        assert!(
            !parse("[apps.demo]\nreads = \"anyone\"\n")
                .unwrap()
                .owner_reads("demo")
        );
        assert!(!parse("").unwrap().owner_reads("demo"));
        let e = parse("[apps.dmeo]\nreads = \"owner\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no such app"), "{e}");
        assert!(parse("[apps.demo]\nreads = \"friends\"\n").is_err());
        // A limit of 0 would refuse everything: it is refused, naming the key.
        for zero in [
            "max_open_bytes",
            "max_open_bytes_per_user",
            "max_connections",
        ] {
            let e = parse(&format!("[apps.demo]\n{zero} = 0\n")).unwrap_err();
            assert!(format!("{e:#}").contains("at least 1"), "{zero}: {e:#}");
        }
        // An app without its own limits takes the server's.
        let cfg = parse("[apps.demo]\nmax_open_bytes = 10\n").unwrap();
        assert_eq!(cfg.app_open_bytes("demo", 1000), 10);
        assert_eq!(cfg.user_open_bytes("demo", 1000), 10);
        assert_eq!(cfg.app_open_bytes("other", 1000), 500);
    }

    /// `[faults]` works only in a build with the `faults` feature (test builds); any other
    /// build refuses to start with it rather than ignore it. `.ci/run` runs this test both ways.
    #[test]
    fn faults_need_a_build_that_has_them() {
        let mut cfg = Config {
            roles: vec![Role::Tracker],
            ..Config::default()
        };
        cfg.check().unwrap();
        cfg.faults.pause_at = Some("file-renamed".into());
        let r = cfg.check();
        if cfg!(feature = "faults") {
            r.unwrap();
            cfg.faults.pause_at = Some("nowhere".into());
            assert!(cfg.check().unwrap_err().to_string().contains("pause_at"));
        } else {
            let e = r.unwrap_err().to_string();
            assert!(
                e.contains("built without") && e.contains("remove [faults]"),
                "{e}"
            );
        }
    }
}
