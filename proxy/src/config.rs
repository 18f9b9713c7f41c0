//! Proxy settings: a TOML file (every key optional, unknown keys refused) with command-line
//! overrides for the listen address and the upstream (or tracker) list.

use anyhow::{Context, bail};
use ferry_common::auth::{AuthConfig, LinkConfig};
use ferry_common::config::millis;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Everything `ferry-proxy` can be told; conf/*-proxy-*.toml documents each key.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the proxy accepts sessions on.
    pub listen: SocketAddr,
    /// Upstreams in order of preference: the first is the primary, the rest are standbys.
    pub upstreams: Vec<SocketAddr>,
    /// Trackers to ask where a session's user lives (a routing server-proxy); exactly one of
    /// `upstreams` and `trackers` is set.
    pub trackers: Vec<SocketAddr>,
    /// How long a tracker's answer (the user's group and its nodes) is reused.
    #[serde(rename = "route_cache_ms", with = "millis")]
    pub route_cache: Duration,
    /// Longest wait for one upstream's TCP connect (and for one health probe).
    #[serde(rename = "connect_timeout_ms", with = "millis")]
    pub connect_timeout: Duration,
    /// A session that has not sent a complete first frame by then is closed.
    #[serde(rename = "hello_timeout_ms", with = "millis")]
    pub hello_timeout: Duration,
    /// A session with no socket activity for this long is closed.
    #[serde(rename = "idle_timeout_ms", with = "millis")]
    pub idle_timeout: Duration,
    /// Period of the PROBE health check of each upstream.
    #[serde(rename = "check_interval_ms", with = "millis")]
    pub check_interval: Duration,
    /// Consecutive successful probes that mark a down upstream up.
    pub rise: u32,
    /// Consecutive failed probes that mark an up upstream down.
    pub fall: u32,
    /// Most sessions at once; more are answered with error 17 (Limit) and closed.
    pub max_connections: usize,
    /// Most sessions from one client IP address (0: no cap), refused the same way.
    pub max_connections_per_ip: usize,
    /// Reactor worker threads; 0 = one per CPU.
    pub workers: usize,
    /// Relay with splice(2) through a pipe per direction; false = a userspace buffer.
    pub zero_copy: bool,
    /// Bytes one direction of one session may hold in flight (pipe size or buffer size).
    pub pipe_size: usize,
    /// Plain-text counters: connect and read `name value` lines. None = no stats listener.
    pub stats_listen: Option<SocketAddr>,
    /// How long sessions may keep running after SIGTERM before they are cut.
    #[serde(rename = "shutdown_grace_ms", with = "millis")]
    pub shutdown_grace: Duration,
    /// `[link]`: the proof this proxy opens every upstream and tracker connection with
    /// (`send`), and the peers allowed to open sessions here (`accept`; none = anyone).
    pub link: LinkConfig,
    /// `[auth]`: the app keys a routing proxy checks each HELLO's session token against.
    /// Required with `trackers`; a proxy with fixed upstreams leaves tokens to the server.
    pub auth: Option<AuthConfig>,
    /// `[tls]`: clients connect with TLS (a client-proxy); see [`TlsConfig`].
    pub tls: Option<TlsConfig>,
}

/// The certificate a client-proxy serves. Reread on SIGHUP: new handshakes get the new files,
/// sessions in flight keep theirs, and a pair that does not load keeps the old one.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, end-entity first (relative paths from the working directory).
    pub cert: PathBuf,
    /// PEM private key of that certificate (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 7421)),
            upstreams: Vec::new(),
            trackers: Vec::new(),
            route_cache: Duration::from_millis(2000),
            connect_timeout: Duration::from_millis(1000),
            hello_timeout: Duration::from_millis(5000),
            idle_timeout: Duration::from_millis(120_000),
            check_interval: Duration::from_millis(1000),
            rise: 2,
            fall: 2,
            max_connections: 4096,
            max_connections_per_ip: 0,
            workers: 0,
            zero_copy: true,
            pipe_size: 256 * 1024,
            stats_listen: None,
            shutdown_grace: Duration::from_millis(10_000),
            link: LinkConfig::default(),
            auth: None,
            tls: None,
        }
    }
}

/// Smallest and largest per-direction bound: one page, and the unprivileged pipe maximum
/// (`fs.pipe-max-size` defaults to 1 MiB).
pub const PIPE_MIN: usize = 4096;
pub const PIPE_MAX: usize = 1024 * 1024;

impl Config {
    /// Rejects settings the proxy cannot run with, naming the key.
    pub fn validate(&self) -> anyhow::Result<()> {
        match (self.upstreams.is_empty(), self.trackers.is_empty()) {
            (true, true) => bail!(
                "no upstreams: set `upstreams` (or `trackers` for a routing server-proxy) in the \
                 config, or pass --upstream (or --tracker)"
            ),
            (false, false) => bail!(
                "set either `upstreams` (fixed upstreams) or `trackers` (routing by user), not both"
            ),
            _ => {}
        }
        if self.rise == 0 || self.fall == 0 {
            bail!("rise and fall must be at least 1");
        }
        if self.max_connections == 0 {
            bail!("max_connections must be at least 1");
        }
        if !(PIPE_MIN..=PIPE_MAX).contains(&self.pipe_size) {
            bail!("pipe_size must be between {PIPE_MIN} and {PIPE_MAX} bytes");
        }
        for (name, d) in [
            ("connect_timeout_ms", self.connect_timeout),
            ("hello_timeout_ms", self.hello_timeout),
            ("idle_timeout_ms", self.idle_timeout),
            ("check_interval_ms", self.check_interval),
            ("route_cache_ms", self.route_cache),
        ] {
            if d < Duration::from_millis(10) {
                bail!("{name} must be at least 10");
            }
        }
        self.link.check().map_err(anyhow::Error::msg)?;
        if !self.link.members.is_empty() {
            bail!(
                "[link.members] names cluster members for a ferry-server; a proxy relays the \
                 sessions of every key in [link.accept] and serves no cluster command"
            );
        }
        if self.tls.is_some() && !self.link.accept.is_empty() {
            bail!(
                "[tls] is for the client leg: a proxy that requires link proofs ([link.accept]) \
                 is reached by ferry's own proxies, which connect in plain TCP"
            );
        }
        if self.routed() {
            match &self.auth {
                Some(auth) => auth.check("auth").map_err(anyhow::Error::msg)?,
                None => bail!(
                    "a routing proxy (`trackers`) routes by the session token in each HELLO, so it \
                     needs [auth] with the app keys ([auth.keys.APP] KEY_ID = \"SECRET\")"
                ),
            }
        }
        Ok(())
    }

    /// Routing by user through trackers (rather than fixed upstreams).
    pub fn routed(&self) -> bool {
        !self.trackers.is_empty()
    }

    /// Worker threads to start.
    pub fn worker_count(&self) -> usize {
        if self.workers > 0 {
            self.workers
        } else {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        }
    }
}

/// Command line: `ferry-proxy --config FILE [--listen ADDR] [--upstream ADDR]...`.
#[derive(Debug, clap::Parser)]
#[command(
    name = "ferry-proxy",
    about = "ferry relay proxy (client-proxy or server-proxy)"
)]
pub struct Cli {
    /// TOML config file (see conf/client-proxy-a.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Listen address; overrides `listen` in the config.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Upstream address, repeated: the first is the primary, the rest are standbys. Replaces
    /// `upstreams` from the config.
    #[arg(long = "upstream")]
    pub upstreams: Vec<SocketAddr>,
    /// Tracker address, repeated (tried in turn): route each session to its user's group.
    /// Replaces `trackers` from the config (and clears `upstreams`).
    #[arg(long = "tracker", conflicts_with = "upstreams")]
    pub trackers: Vec<SocketAddr>,
}

impl Cli {
    /// The config file (or the defaults) with the command-line overrides applied, validated.
    pub fn resolve(&self) -> anyhow::Result<Config> {
        let mut cfg = match &self.config {
            // The config error's message already names its cause; flatten it so the log does
            // not print the TOML error twice.
            Some(path) => {
                ferry_common::config::load::<Config>(path).map_err(|e| anyhow::anyhow!("{e}"))?
            }
            None => Config::default(),
        };
        if let Some(l) = self.listen {
            cfg.listen = l;
        }
        // A list given on the command line decides the mode, whatever the file said.
        if !self.upstreams.is_empty() {
            cfg.upstreams = self.upstreams.clone();
            cfg.trackers.clear();
        }
        if !self.trackers.is_empty() {
            cfg.trackers = self.trackers.clone();
            cfg.upstreams.clear();
        }
        cfg.validate().context("invalid proxy configuration")?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_common::auth::new_secret;

    fn parse(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn listeners_default_to_loopback_and_stats_to_off() {
        let cfg = Config::default();
        assert!(cfg.listen.ip().is_loopback());
        assert_eq!(cfg.stats_listen, None);
    }

    #[test]
    fn keys_parse_and_unknown_keys_fail() {
        let cfg = parse(
            "listen = \"127.0.0.1:9000\"\nupstreams = [\"127.0.0.1:1\", \"127.0.0.1:2\"]\n\
             connect_timeout_ms = 250\nhello_timeout_ms = 300\nidle_timeout_ms = 400\n\
             check_interval_ms = 500\nrise = 3\nfall = 4\nmax_connections = 10\nworkers = 1\n\
             zero_copy = false\npipe_size = 65536\nstats_listen = \"127.0.0.1:9001\"\n\
             shutdown_grace_ms = 600\n",
        )
        .unwrap();
        assert_eq!(cfg.listen.port(), 9000);
        assert_eq!(cfg.upstreams.len(), 2);
        assert_eq!(cfg.connect_timeout, Duration::from_millis(250));
        assert_eq!(cfg.hello_timeout, Duration::from_millis(300));
        assert_eq!(cfg.idle_timeout, Duration::from_millis(400));
        assert_eq!(cfg.check_interval, Duration::from_millis(500));
        assert_eq!((cfg.rise, cfg.fall), (3, 4));
        assert_eq!((cfg.max_connections, cfg.workers), (10, 1));
        assert!(!cfg.zero_copy);
        assert_eq!(cfg.pipe_size, 65536);
        assert_eq!(cfg.stats_listen.unwrap().port(), 9001);
        assert_eq!(cfg.shutdown_grace, Duration::from_millis(600));
        cfg.validate().unwrap();
        assert!(!cfg.routed());
        assert!(parse("listen = \"127.0.0.1:1\"\nupstream = []\n").is_err());
    }

    #[test]
    fn exactly_one_of_upstreams_and_trackers() {
        let routed = parse(&format!(
            "trackers = [\"127.0.0.1:7300\", \"127.0.0.1:7301\"]\nroute_cache_ms = 500\n\
             [auth.keys.demo]\nk1 = \"{}\"\n",
            new_secret()
        ))
        .unwrap();
        routed.validate().unwrap();
        assert!(routed.routed());
        assert_eq!(routed.route_cache, Duration::from_millis(500));
        let both = Config {
            upstreams: vec!["127.0.0.1:1".parse().unwrap()],
            ..routed.clone()
        };
        assert!(
            both.validate()
                .unwrap_err()
                .to_string()
                .contains("not both")
        );
        let too_short = Config {
            route_cache: Duration::from_millis(1),
            ..routed
        };
        assert!(
            too_short
                .validate()
                .unwrap_err()
                .to_string()
                .contains("route_cache_ms")
        );
    }

    #[test]
    fn validation_names_the_problem() {
        let cfg = Config::default();
        assert!(
            cfg.validate()
                .unwrap_err()
                .to_string()
                .contains("upstreams")
        );
        let cfg = Config {
            upstreams: vec!["127.0.0.1:1".parse().unwrap()],
            pipe_size: 100,
            ..Config::default()
        };
        assert!(
            cfg.validate()
                .unwrap_err()
                .to_string()
                .contains("pipe_size")
        );
        let cfg = Config {
            upstreams: vec!["127.0.0.1:1".parse().unwrap()],
            fall: 0,
            ..Config::default()
        };
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn shipped_confs_parse_but_refuse_to_start_with_their_placeholder_secrets() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf");
        for name in [
            "client-proxy-a",
            "client-proxy-b",
            "server-proxy-a",
            "server-proxy-b",
            "server-proxy-routed",
        ] {
            let path = dir.join(format!("{name}.toml"));
            // What the binary does at start: load, override, validate.
            let cli = Cli {
                config: Some(path.clone()),
                listen: Some("127.0.0.1:9".parse().unwrap()),
                upstreams: Vec::new(),
                trackers: Vec::new(),
            };
            let e = format!("{:#}", cli.resolve().unwrap_err());
            assert!(e.contains("is an example placeholder"), "{name}: {e}");
            assert!(e.contains("ferry keygen"), "{name}: {e}");
            assert!(
                !e.contains("CHANGE-ME"),
                "{name}: the error repeats a secret: {e}"
            );
            // The same file with real secrets starts.
            let mut cfg: Config = ferry_common::config::load(&path).unwrap();
            let send = cfg
                .link
                .send
                .as_mut()
                .expect("every shipped proxy sends a proof");
            send.secret = new_secret();
            for s in cfg.link.accept.values_mut() {
                *s = new_secret();
            }
            if let Some(auth) = cfg.auth.as_mut() {
                for s in auth.keys.values_mut().flat_map(|k| k.values_mut()) {
                    *s = new_secret();
                }
            }
            cfg.validate().unwrap();
            assert_eq!(cfg.routed(), cfg.auth.is_some(), "{name}");
            assert_eq!(
                name.starts_with("server"),
                !cfg.link.accept.is_empty(),
                "{name}"
            );
        }
    }

    #[test]
    fn link_and_auth_sections_are_checked() {
        let strong = new_secret();
        let cfg = parse(&format!(
            "upstreams = [\"127.0.0.1:1\"]\n[link.send]\nid = \"cp-a\"\nsecret = \"{strong}\"\n\
             [link.accept]\ncp-b = \"{strong}\"\n"
        ))
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.link.send.as_ref().unwrap().id, "cp-a");
        assert!(cfg.link.verifier().is_some());
        // A weak secret anywhere refuses start, naming the key but not the secret.
        for bad in ["", "tiny1", "example-CHANGE-ME-0123456789-0123456789"] {
            let mut c = cfg.clone();
            c.link.accept.insert("cp-c".into(), bad.into());
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("[link.accept] (key cp-c)"), "{e}");
            assert!(bad.is_empty() || !e.contains(bad), "{e}");
        }
        let mut c = cfg.clone();
        c.link.send.as_mut().unwrap().secret = "x".repeat(40);
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("[link.send]")
        );
        // Member kinds are a server's: a proxy refuses them rather than ignore them.
        let mut c = cfg.clone();
        c.link.members.insert(
            "cp-b".into(),
            ferry_common::auth::Member {
                kind: ferry_common::auth::PeerKind::Router,
                group: None,
                addr: None,
            },
        );
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("[link.members]"), "{e}");
        assert!(parse("[link]\nsend = { id = \"a\" }\n").is_err());
        assert!(parse("[link.send]\nid = \"a\"\nsecret = \"b\"\nother = 1\n").is_err());
        // A routing proxy needs [auth] with a strong app key; a fixed one does not.
        let routed = Config {
            upstreams: Vec::new(),
            trackers: vec!["127.0.0.1:7300".parse().unwrap()],
            ..cfg.clone()
        };
        let e = routed.validate().unwrap_err().to_string();
        assert!(e.contains("needs [auth]"), "{e}");
        let with = |secret: &str| {
            parse(&format!(
                "trackers = [\"127.0.0.1:7300\"]\n[auth.keys.demo]\nk1 = \"{secret}\"\n"
            ))
            .unwrap()
        };
        with(&strong).validate().unwrap();
        let e = with("example-demo-key-CHANGE-ME-0123456789")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("[auth.keys.demo] (key k1) is an example placeholder"),
            "{e}"
        );
        let empty = parse("trackers = [\"127.0.0.1:7300\"]\n[auth]\nskew_secs = 5\n").unwrap();
        assert!(
            empty
                .validate()
                .unwrap_err()
                .to_string()
                .contains("names no app")
        );
    }
}
