//! Client settings: the TOML config file, environment variables and command-line flags merged
//! with the precedence flag > environment > config file > default.

use crate::error::{ClientError, Result};
use crate::size;
use ferry_common::auth::SigningKey;
use ferry_common::proto::{APP_ID_LEN, USER_ID_LEN};
use ferry_common::token::Claims;
use serde::{Deserialize, Serialize};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_THREADS: usize = 4;
pub const DEFAULT_BLOCK_SIZE: u32 = 4 << 20;
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request keeps cycling through its proxies while none of them gets it through.
pub const DEFAULT_OUTAGE_WINDOW: Duration = Duration::from_secs(60);
pub const DEFAULT_APP: &str = "ferry";
/// Most worker threads (each holds one connection and one block buffer).
pub const MAX_THREADS: usize = 64;

/// `conf/client.toml`. Every key is optional (and a key left `None` is not written).
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Proxies (or a server) to talk to, `host:port` or `tls://host:port`, tried in order
    /// with failover.
    pub proxies: Option<Vec<String>>,
    /// PEM file of the CA(s) that sign the `tls://` proxies' certificates; default: the
    /// system's roots. `--ca` and `FERRY_CA` win over it.
    pub ca: Option<PathBuf>,
    /// Pins (`sha256:HEX` of a certificate's public key): a `tls://` proxy's certificate must
    /// also carry one of these keys. `--pin` and `FERRY_PINS` win over it.
    pub pins: Option<Vec<String>>,
    pub app: Option<String>,
    pub user: Option<String>,
    pub threads: Option<usize>,
    /// Upload block size, e.g. "4MiB".
    pub block_size: Option<String>,
    /// Connect, send and reply timeout in milliseconds.
    pub timeout_ms: Option<u64>,
    /// Tries of one request on one proxy before moving to the next.
    pub tries_per_proxy: Option<u32>,
    /// How long (milliseconds) a request keeps cycling through the proxies, with backoff,
    /// while none gets it through (all down or restarting at once, servers restarting, no node
    /// online); default 60000. 0: give up after `tries_per_proxy` tries on each proxy.
    pub outage_window_ms: Option<u64>,
    /// Where upload resume state is kept (default `$XDG_CACHE_HOME/ferry` or `~/.cache/ferry`).
    pub state_dir: Option<PathBuf>,
    /// The app key session tokens are made with (`[key] id = "k1"`, `secret = "..."`);
    /// `FERRY_KEY=ID:SECRET` wins over it. Never a flag: flags show in `ps`.
    pub key: Option<SigningKey>,
    /// A file holding a delegated token (hex, from the app's backend: `ferry token`), used
    /// instead of an app key; `--token-file` and `FERRY_TOKEN` win over it.
    pub token_file: Option<PathBuf>,
    /// The link key `ferry groups` proves to trackers that require one (`[link] id`, `secret`);
    /// `FERRY_LINK_KEY=ID:SECRET` wins over it.
    pub link: Option<SigningKey>,
    /// The app's secret for signed HTTP URLs (`ferry url`); `FERRY_SECRET` wins over it.
    pub secret: Option<String>,
    /// Secrets per app for signed HTTP URLs (`[secrets] APP = "..."`); wins over `secret`.
    pub secrets: Option<std::collections::BTreeMap<String, String>>,
}

/// What the command line gave (None/empty = not given).
#[derive(Debug, Default, Clone)]
pub struct Flags {
    pub proxies: Vec<String>,
    pub app: Option<String>,
    pub user: Option<String>,
    /// `--outage-window SECS`.
    pub outage_window: Option<Duration>,
    /// `--token-file PATH`: a delegated token.
    pub token_file: Option<PathBuf>,
    /// `--ca PATH`.
    pub ca: Option<PathBuf>,
    /// `--pin sha256:HEX`, repeated.
    pub pins: Vec<String>,
}

/// The environment variables the client reads, captured once so resolution is testable.
#[derive(Debug, Default, Clone)]
pub struct EnvVars {
    pub proxies: Option<String>,
    pub app: Option<String>,
    pub user: Option<String>,
    pub state_dir: Option<String>,
    /// `FERRY_KEY`: `ID:SECRET` of the app key.
    pub key: Option<String>,
    /// `FERRY_TOKEN`: a delegated token (hex).
    pub token: Option<String>,
    /// `FERRY_LINK_KEY`: `ID:SECRET` of a link key.
    pub link: Option<String>,
    /// `FERRY_CA`: the CA file for `tls://` proxies.
    pub ca: Option<String>,
    /// `FERRY_PINS`: comma-separated pins.
    pub pins: Option<String>,
    pub login: Option<String>,
    pub home: Option<String>,
    pub xdg_cache: Option<String>,
}

impl EnvVars {
    pub fn from_process() -> Self {
        let get = |k: &str| std::env::var(k).ok();
        EnvVars {
            proxies: get("FERRY_PROXIES"),
            app: get("FERRY_APP"),
            user: get("FERRY_USER"),
            state_dir: get("FERRY_STATE_DIR"),
            key: get("FERRY_KEY"),
            token: get("FERRY_TOKEN"),
            link: get("FERRY_LINK_KEY"),
            ca: get("FERRY_CA"),
            pins: get("FERRY_PINS"),
            login: get("USER"),
            home: get("HOME"),
            xdg_cache: get("XDG_CACHE_HOME"),
        }
    }
}

/// One entry of the proxy list: where to connect and, for `tls://host:port`, the name the
/// proxy's certificate must be valid for (the host as written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub tls: Option<String>,
}

impl Endpoint {
    pub fn plain(addr: SocketAddr) -> Endpoint {
        Endpoint { addr, tls: None }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.tls {
            None => write!(f, "{}", self.addr),
            // Named by its address: nothing to add.
            Some(name) if *name == self.addr.ip().to_string() => write!(f, "tls://{}", self.addr),
            Some(name) => write!(f, "tls://{name}:{} ({})", self.addr.port(), self.addr.ip()),
        }
    }
}

/// How `tls://` proxies are verified.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// CA certificates (PEM) to trust instead of the system's roots.
    pub ca: Option<PathBuf>,
    /// Public-key pins the proxy's certificate must match one of (checked pins, lower case).
    pub pins: Vec<String>,
}

/// Everything a [`crate::Client`] needs, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub proxies: Vec<Endpoint>,
    /// How `tls://` entries of `proxies` are verified.
    pub tls: TlsOptions,
    pub app: String,
    pub user: String,
    /// The app key every connection's HELLO token is made with (transfers need it or `token`).
    pub key: Option<SigningKey>,
    /// A delegated token from the app's backend, sent on every connection instead (it names
    /// the app and user: `app` and `user` are its).
    pub token: Option<Vec<u8>>,
    pub threads: usize,
    pub block_size: u32,
    pub timeout: Duration,
    pub tries_per_proxy: u32,
    /// See [`FileConfig::outage_window_ms`].
    pub outage_window: Duration,
    pub state_dir: PathBuf,
}

impl Settings {
    /// Settings for a client talking straight to `addrs` with `key` (an app key of the default
    /// app) and defaults elsewhere (tests, library users).
    pub fn direct(addrs: Vec<SocketAddr>, state_dir: PathBuf, key: SigningKey) -> Self {
        Settings {
            proxies: addrs.into_iter().map(Endpoint::plain).collect(),
            tls: TlsOptions::default(),
            app: DEFAULT_APP.into(),
            user: "anonymous".into(),
            key: Some(key),
            token: None,
            threads: DEFAULT_THREADS,
            block_size: DEFAULT_BLOCK_SIZE,
            timeout: DEFAULT_TIMEOUT,
            tries_per_proxy: 3,
            outage_window: DEFAULT_OUTAGE_WINDOW,
            state_dir,
        }
    }
}

/// Reads the config file if one was named.
pub fn load_file(path: Option<&Path>) -> Result<FileConfig> {
    match path {
        None => Ok(FileConfig::default()),
        Some(p) => {
            ferry_common::config::load(p).map_err(|e| ClientError::Input(one_line(&e.to_string())))
        }
    }
}

/// toml errors span several lines (with a caret diagram); the CLI prints one line.
fn one_line(s: &str) -> String {
    s.split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('|') && !l.starts_with('^'))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Merges flags, environment and config file.
pub fn resolve(file: FileConfig, flags: &Flags, env: &EnvVars) -> Result<Settings> {
    let (source, list): (&str, Vec<String>) = if !flags.proxies.is_empty() {
        ("--proxy", flags.proxies.clone())
    } else if let Some(v) = &env.proxies {
        ("FERRY_PROXIES", v.split(',').map(str::to_owned).collect())
    } else if let Some(v) = file.proxies {
        ("config proxies", v)
    } else {
        return Err(ClientError::Input(
            "no proxy or server address: give --proxy ADDR, FERRY_PROXIES or `proxies` in the config"
                .into(),
        ));
    };
    let proxies = parse_proxies(source, &list)?;
    let pins: Vec<String> = if !flags.pins.is_empty() {
        flags.pins.clone()
    } else if let Some(v) = &env.pins {
        v.split(',').map(str::to_owned).collect()
    } else {
        file.pins.unwrap_or_default()
    };
    let tls = TlsOptions {
        ca: flags
            .ca
            .clone()
            .or_else(|| env.ca.as_ref().filter(|c| !c.is_empty()).map(PathBuf::from))
            .or(file.ca),
        pins: pins
            .iter()
            .filter(|p| !p.trim().is_empty())
            .map(|p| ferry_common::tls::parse_pin(p).map_err(ClientError::Input))
            .collect::<Result<_>>()?,
    };

    let token = pick_token(flags, env, file.token_file.as_deref())?;
    let named_app = flags.app.clone().or_else(|| env.app.clone()).or(file.app);
    let named_user = flags
        .user
        .clone()
        .or_else(|| env.user.clone())
        .or(file.user);
    // A delegated token names its app and user; a different one named elsewhere is a mistake
    // worth stopping on (the server would refuse it anyway).
    let (app, user) = match &token {
        Some(t) => {
            let (c, _, _) = Claims::parse(t)
                .map_err(|e| ClientError::Input(format!("delegated token: {e}")))?;
            for (what, named, is) in [("app", &named_app, &c.app), ("user", &named_user, &c.user)] {
                if let Some(n) = named.as_ref().filter(|n| *n != is) {
                    return Err(ClientError::Input(format!(
                        "the delegated token is for {what} {is:?}, not {n:?}"
                    )));
                }
            }
            (c.app, c.user)
        }
        None => (
            named_app.unwrap_or_else(|| DEFAULT_APP.into()),
            named_user
                .or_else(|| env.login.clone().filter(|u| !u.is_empty()))
                .unwrap_or_else(|| "anonymous".into()),
        ),
    };
    check_id("app", &app, APP_ID_LEN)?;
    check_id("user", &user, USER_ID_LEN)?;

    let threads = file.threads.unwrap_or(DEFAULT_THREADS);
    check_threads(threads)?;
    let block_size = match file.block_size {
        Some(s) => {
            size::parse_block_size(&s).map_err(|e| ClientError::Input(format!("config: {e}")))?
        }
        None => DEFAULT_BLOCK_SIZE,
    };
    let timeout = match file.timeout_ms {
        Some(0) => return Err(ClientError::Input("config: timeout_ms must be > 0".into())),
        Some(ms) => Duration::from_millis(ms),
        None => DEFAULT_TIMEOUT,
    };
    let tries_per_proxy = file.tries_per_proxy.unwrap_or(3).clamp(1, 10);
    let outage_window = flags
        .outage_window
        .or(file.outage_window_ms.map(Duration::from_millis))
        .unwrap_or(DEFAULT_OUTAGE_WINDOW);
    let state_dir = match (&env.state_dir, file.state_dir, &env.xdg_cache, &env.home) {
        (Some(d), _, _, _) if !d.is_empty() => PathBuf::from(d),
        (_, Some(d), _, _) => d,
        (_, _, Some(x), _) if !x.is_empty() => Path::new(x).join("ferry"),
        (_, _, _, Some(h)) if !h.is_empty() => Path::new(h).join(".cache").join("ferry"),
        _ => std::env::temp_dir().join("ferry-state"),
    };
    let key = pick_key("FERRY_KEY", env.key.as_deref(), file.key, "app key")?;
    Ok(Settings {
        proxies,
        tls,
        app,
        user,
        key,
        token,
        threads,
        block_size,
        timeout,
        tries_per_proxy,
        outage_window,
        state_dir,
    })
}

/// A key from the environment (`ID:SECRET`, wins) or the config file, checked.
fn pick_key(
    var: &str,
    env: Option<&str>,
    file: Option<SigningKey>,
    what: &str,
) -> Result<Option<SigningKey>> {
    let key = match env.filter(|v| !v.is_empty()) {
        Some(pair) => Some(
            SigningKey::from_pair(pair).map_err(|e| ClientError::Input(format!("{var}: {e}")))?,
        ),
        None => file,
    };
    if let Some(k) = &key {
        k.check(what).map_err(ClientError::Input)?;
    }
    Ok(key)
}

/// A delegated token: `--token-file`, else `FERRY_TOKEN`, else the config's `token_file`; hex
/// text (surrounding whitespace ignored), checked to be a delegated token's layout.
fn pick_token(flags: &Flags, env: &EnvVars, file: Option<&Path>) -> Result<Option<Vec<u8>>> {
    let read = |p: &Path| -> Result<(String, String)> {
        let text = std::fs::read_to_string(p)
            .map_err(|e| ClientError::io(format!("reading the token file {}", p.display()), e))?;
        Ok((format!("token file {}", p.display()), text))
    };
    let (source, text) = match (
        flags.token_file.as_deref(),
        env.token.as_deref().filter(|t| !t.is_empty()),
        file,
    ) {
        (Some(p), _, _) => read(p)?,
        (None, Some(t), _) => ("FERRY_TOKEN".to_owned(), t.to_owned()),
        (None, None, Some(p)) => read(p)?,
        (None, None, None) => return Ok(None),
    };
    let raw = hex::decode(text.trim())
        .map_err(|_| ClientError::Input(format!("{source}: not a token (hex text expected)")))?;
    match Claims::parse(&raw) {
        Ok((c, _, _)) if c.delegation.is_some() => Ok(Some(raw)),
        Ok(_) => Err(ClientError::Input(format!(
            "{source}: a single-use connection token, not a delegated one (`ferry token` makes those)"
        ))),
        Err(e) => Err(ClientError::Input(format!("{source}: not a token ({e})"))),
    }
}

/// The app key: `FERRY_KEY`, else `[key]`.
pub fn app_key(file: FileConfig, env: &EnvVars) -> Result<Option<SigningKey>> {
    pick_key("FERRY_KEY", env.key.as_deref(), file.key, "app key")
}

/// The link key for calls to trackers (`ferry groups`): `FERRY_LINK_KEY`, else `[link]`.
pub fn link_key(file: FileConfig, env: &EnvVars) -> Result<Option<SigningKey>> {
    pick_key("FERRY_LINK_KEY", env.link.as_deref(), file.link, "link key")
}

pub fn check_threads(n: usize) -> Result<()> {
    if n == 0 || n > MAX_THREADS {
        return Err(ClientError::Input(format!(
            "threads must be 1 ..= {MAX_THREADS}, not {n}"
        )));
    }
    Ok(())
}

fn check_id(what: &str, v: &str, width: usize) -> Result<()> {
    if v.is_empty() || v.len() > width || v.chars().any(|c| c.is_control()) {
        return Err(ClientError::Input(format!(
            "{what} id {v:?} must be 1 ..= {width} bytes of printable UTF-8"
        )));
    }
    Ok(())
}

/// Parses `host:port` and `tls://host:port` entries; an empty list, an empty entry or an
/// unresolvable one is an error.
pub fn parse_proxies(source: &str, list: &[String]) -> Result<Vec<Endpoint>> {
    let mut out = Vec::new();
    for raw in list {
        let written = raw.trim();
        if written.is_empty() {
            return Err(ClientError::Input(format!(
                "{source}: empty entry in the proxy list {list:?}"
            )));
        }
        let (entry, tls) = match written.strip_prefix("tls://") {
            Some(rest) => (rest, true),
            None if written.contains("://") => {
                return Err(ClientError::Input(format!(
                    "{source}: {written:?}: a proxy is host:port or tls://host:port"
                )));
            }
            None => (written, false),
        };
        let addr = entry
            .to_socket_addrs()
            .map_err(|e| ClientError::Input(format!("{source}: bad proxy address {entry:?}: {e}")))?
            .next()
            .ok_or_else(|| {
                ClientError::Input(format!("{source}: {entry:?} resolves to no address"))
            })?;
        // The certificate is checked against the host as written (brackets off an IPv6
        // address), not against what it resolved to.
        let name = tls.then(|| {
            let host = entry.rsplit_once(':').map_or(entry, |(h, _)| h);
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned()
        });
        out.push(Endpoint { addr, tls: name });
    }
    if out.is_empty() {
        return Err(ClientError::Input(format!(
            "{source}: the proxy list is empty"
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(a: &str) -> Endpoint {
        Endpoint::plain(a.parse().unwrap())
    }

    #[test]
    fn tls_entries_keep_their_host_for_the_certificate() {
        let list: Vec<String> = ["tls://localhost:7443", "127.0.0.1:7421", "tls://[::1]:7444"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let eps = parse_proxies("--proxy", &list).unwrap();
        assert_eq!(eps[0].tls.as_deref(), Some("localhost"));
        assert_eq!(eps[0].addr.port(), 7443);
        assert_eq!(eps[1], plain("127.0.0.1:7421"));
        assert_eq!(eps[2].tls.as_deref(), Some("::1"));
        assert_eq!(eps[2].to_string(), "tls://[::1]:7444");
        assert_eq!(
            eps[0].to_string(),
            format!("tls://localhost:7443 ({})", eps[0].addr.ip())
        );
        let e = parse_proxies("--proxy", &["http://127.0.0.1:1".to_string()]).unwrap_err();
        assert!(e.to_string().contains("tls://host:port"), "{e}");
        // CA and pins: flag > environment > file; a malformed pin is refused.
        let pin = format!("sha256:{}", "ab".repeat(32));
        let env = EnvVars {
            ca: Some("/env/ca.pem".into()),
            pins: Some(format!("{pin},")),
            ..Default::default()
        };
        let cfg = || FileConfig {
            ca: Some("/file/ca.pem".into()),
            ..file(&["tls://localhost:1"])
        };
        let s = resolve(cfg(), &Flags::default(), &env).unwrap();
        assert_eq!(s.tls.ca.as_deref(), Some(Path::new("/env/ca.pem")));
        assert_eq!(s.tls.pins, vec![pin.clone()]);
        let flags = Flags {
            ca: Some("/flag/ca.pem".into()),
            pins: vec!["sha256:00".into()],
            ..Default::default()
        };
        let e = resolve(cfg(), &flags, &env).unwrap_err();
        assert!(e.to_string().contains("bad pin"), "{e}");
        let s = resolve(cfg(), &Flags::default(), &EnvVars::default()).unwrap();
        assert_eq!(s.tls.ca.as_deref(), Some(Path::new("/file/ca.pem")));
        assert!(s.tls.pins.is_empty());
    }

    fn file(proxies: &[&str]) -> FileConfig {
        FileConfig {
            proxies: Some(proxies.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        }
    }

    #[test]
    fn proxies_precedence_flag_env_config() {
        let env = EnvVars {
            proxies: Some("127.0.0.1:2,127.0.0.1:3".into()),
            ..Default::default()
        };
        let flags = Flags {
            proxies: vec!["127.0.0.1:1".into()],
            ..Default::default()
        };
        let s = resolve(file(&["127.0.0.1:9"]), &flags, &env).unwrap();
        assert_eq!(s.proxies, vec![plain("127.0.0.1:1")]);
        let s = resolve(file(&["127.0.0.1:9"]), &Flags::default(), &env).unwrap();
        assert_eq!(s.proxies.len(), 2);
        assert_eq!(s.proxies[1], plain("127.0.0.1:3"));
        let s = resolve(
            file(&["127.0.0.1:9"]),
            &Flags::default(),
            &EnvVars::default(),
        )
        .unwrap();
        assert_eq!(s.proxies, vec![plain("127.0.0.1:9")]);
    }

    #[test]
    fn bad_proxy_lists_are_errors() {
        let none = resolve(
            FileConfig::default(),
            &Flags::default(),
            &EnvVars::default(),
        );
        assert!(none.unwrap_err().to_string().contains("no proxy"));
        let empty_env = EnvVars {
            proxies: Some(String::new()),
            ..Default::default()
        };
        let e = resolve(FileConfig::default(), &Flags::default(), &empty_env).unwrap_err();
        assert!(e.to_string().contains("FERRY_PROXIES"), "{e}");
        let e = resolve(file(&[]), &Flags::default(), &EnvVars::default()).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        let e = resolve(file(&["nonsense"]), &Flags::default(), &EnvVars::default()).unwrap_err();
        assert!(e.to_string().contains("bad proxy address"), "{e}");
        let e = resolve(
            file(&["127.0.0.1:1", " "]),
            &Flags::default(),
            &EnvVars::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("empty entry"), "{e}");
    }

    #[test]
    fn identity_and_state_dir_precedence() {
        let env = EnvVars {
            app: Some("envapp".into()),
            user: Some("envuser".into()),
            login: Some("login".into()),
            home: Some("/home/x".into()),
            ..Default::default()
        };
        let f = FileConfig {
            app: Some("fileapp".into()),
            user: Some("fileuser".into()),
            ..tests::file(&["127.0.0.1:1"])
        };
        let flags = Flags {
            app: Some("flagapp".into()),
            ..Default::default()
        };
        let s = resolve(f, &flags, &env).unwrap();
        assert_eq!((s.app.as_str(), s.user.as_str()), ("flagapp", "envuser"));
        assert_eq!(s.state_dir, PathBuf::from("/home/x/.cache/ferry"));
        let s = resolve(
            file(&["127.0.0.1:1"]),
            &Flags::default(),
            &EnvVars {
                login: Some("login".into()),
                state_dir: Some("/tmp/st".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!((s.app.as_str(), s.user.as_str()), (DEFAULT_APP, "login"));
        assert_eq!(s.state_dir, PathBuf::from("/tmp/st"));
        let long = Flags {
            app: Some("x".repeat(17)),
            ..Default::default()
        };
        assert!(resolve(file(&["127.0.0.1:1"]), &long, &EnvVars::default()).is_err());
    }

    #[test]
    fn config_file_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "proxies = [\"127.0.0.1:7421\"]\nblock_size = \"1MiB\"\ntimeout_ms = 1500\nthreads = 2\n\
             outage_window_ms = 5000\n",
        )
        .unwrap();
        let s = resolve(
            load_file(Some(&p)).unwrap(),
            &Flags::default(),
            &EnvVars::default(),
        )
        .unwrap();
        assert_eq!(s.block_size, 1 << 20);
        assert_eq!(s.timeout, Duration::from_millis(1500));
        assert_eq!(s.threads, 2);
        assert_eq!(s.outage_window, Duration::from_secs(5));
        // `--outage-window` wins over the file; without either, the default.
        let flag = Flags {
            outage_window: Some(Duration::from_secs(2)),
            ..Default::default()
        };
        let s = resolve(load_file(Some(&p)).unwrap(), &flag, &EnvVars::default()).unwrap();
        assert_eq!(s.outage_window, Duration::from_secs(2));
        let s = resolve(
            file(&["127.0.0.1:1"]),
            &Flags::default(),
            &EnvVars::default(),
        )
        .unwrap();
        assert_eq!(s.outage_window, DEFAULT_OUTAGE_WINDOW);
        std::fs::write(&p, "proxy = [\"127.0.0.1:7421\"]\n").unwrap();
        let e = load_file(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("proxy") && !e.contains('\n'), "{e}");
        std::fs::write(&p, "block_size = \"4MB\"\nproxies=[\"127.0.0.1:1\"]\n").unwrap();
        assert!(
            resolve(
                load_file(Some(&p)).unwrap(),
                &Flags::default(),
                &EnvVars::default()
            )
            .is_err()
        );
    }

    #[test]
    fn app_and_link_keys_come_from_config_or_env_and_weak_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        let (a, b) = (
            ferry_common::auth::new_secret(),
            ferry_common::auth::new_secret(),
        );
        std::fs::write(
            &p,
            format!(
                "proxies = [\"127.0.0.1:7421\"]\n[key]\nid = \"k1\"\nsecret = \"{a}\"\n\
                 [link]\nid = \"admin\"\nsecret = \"{b}\"\n"
            ),
        )
        .unwrap();
        let file = || load_file(Some(&p)).unwrap();
        let s = resolve(file(), &Flags::default(), &EnvVars::default()).unwrap();
        assert_eq!(
            s.key.as_ref().map(|k| (k.id.as_str(), k.secret.as_str())),
            Some(("k1", a.as_str()))
        );
        let link = link_key(file(), &EnvVars::default()).unwrap().unwrap();
        assert_eq!(
            (link.id.as_str(), link.secret.as_str()),
            ("admin", b.as_str())
        );
        // The environment wins over the file.
        let env = EnvVars {
            key: Some(format!("k2:{b}")),
            link: Some(format!("ops:{a}")),
            ..EnvVars::default()
        };
        assert_eq!(
            resolve(file(), &Flags::default(), &env)
                .unwrap()
                .key
                .unwrap()
                .id,
            "k2"
        );
        assert_eq!(link_key(file(), &env).unwrap().unwrap().id, "ops");
        // Placeholders and malformed pairs are refused, naming the way out.
        for bad in ["k1:example-CHANGE-ME", "no-colon", "k1:short"] {
            let env = EnvVars {
                key: Some(bad.into()),
                ..EnvVars::default()
            };
            let e = resolve(file(), &Flags::default(), &env)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("FERRY_KEY") || e.contains("keygen"),
                "{bad}: {e}"
            );
        }
        // Without a key a client cannot be made, and says how to give one.
        let mut s = resolve(file(), &Flags::default(), &EnvVars::default()).unwrap();
        s.key = None;
        let e = crate::Client::new(s).err().unwrap().to_string();
        assert!(e.contains("FERRY_KEY"), "{e}");
    }

    #[test]
    fn a_delegated_token_names_the_app_and_user_and_comes_from_a_flag_env_or_config() {
        let key = SigningKey {
            id: "k1".into(),
            secret: ferry_common::auth::new_secret(),
        };
        let mint = |user: &str| {
            let t = key
                .delegate(
                    "demo",
                    user,
                    ferry_common::token::Scope::READ,
                    60,
                    Default::default(),
                )
                .unwrap();
            hex::encode(t)
        };
        let dir = tempfile::tempdir().unwrap();
        let (from_flag, from_file) = (dir.path().join("flag.tok"), dir.path().join("file.tok"));
        std::fs::write(&from_flag, format!("  {}\n", mint("flag"))).unwrap();
        std::fs::write(&from_file, mint("file")).unwrap();
        let flags = |p: Option<&Path>| Flags {
            token_file: p.map(Path::to_path_buf),
            ..Default::default()
        };
        let env = |t: Option<String>| EnvVars {
            token: t,
            ..Default::default()
        };
        let cfg = || FileConfig {
            token_file: Some(from_file.clone()),
            ..file(&["127.0.0.1:1"])
        };
        let user = |f: &Flags, e: &EnvVars, c: FileConfig| resolve(c, f, e).map(|s| s.user);
        // The flag wins over FERRY_TOKEN, which wins over the config's token_file.
        let e = env(Some(mint("env")));
        assert_eq!(user(&flags(Some(&from_flag)), &e, cfg()).unwrap(), "flag");
        assert_eq!(user(&flags(None), &e, cfg()).unwrap(), "env");
        assert_eq!(user(&flags(None), &env(None), cfg()).unwrap(), "file");
        let s = resolve(cfg(), &flags(None), &env(None)).unwrap();
        assert_eq!((s.app.as_str(), s.token.is_some()), ("demo", true));
        // A user or app named elsewhere must be the token's.
        let named = Flags {
            user: Some("someone".into()),
            ..flags(Some(&from_flag))
        };
        let err = resolve(cfg(), &named, &env(None)).unwrap_err().to_string();
        assert!(err.contains("for user \"flag\""), "{err}");
        let other_app = FileConfig {
            app: Some("other".into()),
            ..cfg()
        };
        assert!(resolve(other_app, &flags(None), &env(None)).is_err());
        // Not hex, not a token, a connection token: each named.
        for (text, want) in [
            ("xyz".to_owned(), "hex text expected"),
            ("00ff".to_owned(), "not a token"),
            (
                hex::encode(
                    key.mint("demo", "u", ferry_common::token::Scope::READ, 60)
                        .unwrap(),
                ),
                "not a delegated one",
            ),
        ] {
            let err = resolve(file(&["127.0.0.1:1"]), &flags(None), &env(Some(text)))
                .unwrap_err()
                .to_string();
            assert!(err.contains("FERRY_TOKEN") && err.contains(want), "{err}");
        }
        assert_eq!(
            crate::parse_scope("read,delete,admin").unwrap().0,
            1 | 4 | 8
        );
        assert!(crate::parse_scope("admin").is_err());
        assert!(crate::parse_scope("read,root").is_err());
        assert_eq!(
            crate::scope_names(crate::parse_scope("write,read").unwrap()),
            "read,write"
        );
    }
}

#[cfg(test)]
mod shipped_config {
    use super::*;

    #[test]
    fn conf_client_toml_parses() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf/client.toml");
        let s = resolve(
            load_file(Some(&p)).unwrap(),
            &Flags::default(),
            &EnvVars::default(),
        )
        .unwrap();
        assert_eq!(s.proxies.len(), 2);
        assert_eq!(s.proxies[0].addr, "127.0.0.1:7421".parse().unwrap());
        assert_eq!(s.block_size, DEFAULT_BLOCK_SIZE);
    }
}
