//! The `ferry` command line. `main.rs` only calls [`main`].
//!
//! Output contract: on success, `upload` prints the file id (one line), `stat` prints
//! `key: value` lines, `download` and `delete` print nothing; with `--json` every command prints
//! exactly one JSON object instead. On failure: the exit status of the failure's class
//! ([`EXIT_STATUS`], from the error table for error replies) and one line on stderr, or with
//! `--json` one JSON object on stderr.

use clap::{Parser, Subcommand};
use ferry_client::error::ClientError;
use ferry_client::report::Progress;
use ferry_client::settings::{self, EnvVars, Flags};
use ferry_client::{Client, size};
use ferry_common::proto::{Class, ErrorCode};
use ferry_common::token::{Delegation, Scope};
use ferry_supervisor::up::Running;
use indicatif::{ProgressBar, ProgressStyle};
use parking_lot::Mutex;
use serde_json::json;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    version,
    about = "ferry client: move files through ferry proxies",
    after_help = EXIT_STATUS
)]
pub struct Cli {
    /// Config file (TOML: proxies, app, user, threads, block_size, timeout_ms, state_dir, secret, [secrets]).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Proxy or server address (host:port, or tls://host:port for a client-proxy that listens
    /// with TLS); repeat for a failover list. Overrides FERRY_PROXIES (comma-separated) and
    /// the config's `proxies`.
    #[arg(long = "proxy", global = true, value_name = "ADDR")]
    pub proxies: Vec<String>,
    /// CA certificate file (PEM) that tls:// proxies' certificates are checked against,
    /// instead of the system's roots (FERRY_CA, config `ca`).
    #[arg(long, global = true, value_name = "PATH")]
    pub ca: Option<PathBuf>,
    /// Public-key pin a tls:// proxy's certificate must match (sha256:HEX, as ferry-proxy
    /// logs it), repeated for several (FERRY_PINS comma-separated, config `pins`).
    #[arg(long = "pin", global = true, value_name = "PIN")]
    pub pins: Vec<String>,
    /// Application id (FERRY_APP, config `app`; default "ferry").
    #[arg(long, global = true)]
    pub app: Option<String>,
    /// User id (FERRY_USER, config `user`; default $USER).
    #[arg(long, global = true)]
    pub user: Option<String>,
    /// Print one JSON object per command.
    #[arg(long, global = true)]
    pub json: bool,
    /// While no proxy gets a request through (all down or restarting at once, servers behind
    /// them restarting, no node of the user's group online), keep cycling through the proxies
    /// with backoff for this many seconds before giving up (config `outage_window_ms`;
    /// default 60; 0: give up after `tries_per_proxy` tries on each proxy).
    #[arg(long, global = true, value_name = "SECS")]
    pub outage_window: Option<u64>,
    /// A file holding a delegated token from the app (`ferry token` output), used for every
    /// connection instead of an app key; it names the app and user. FERRY_TOKEN holds one too
    /// (never a flag with the token itself: flags show in `ps`).
    #[arg(long, global = true, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Upload a file; prints its file id.
    Upload {
        path: PathBuf,
        /// Parallel connections for big files (default 4).
        #[arg(long)]
        threads: Option<usize>,
        /// Block size, binary units only: 64KiB ..= 64MiB (default 4MiB). Files of at most one
        /// block go in a single request.
        #[arg(long, value_parser = size::parse_block_size)]
        block_size: Option<u32>,
    },
    /// Download a file to PATH (written as PATH.part, verified, then renamed).
    Download {
        file_id: String,
        #[arg(short = 'o', long = "output", value_name = "PATH")]
        output: PathBuf,
        /// Parallel connections (default 4).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Show size, SHA-256, name and creation time of a file.
    Stat { file_id: String },
    /// Show what your user stores (bytes, files, in every group) and the app's quotas.
    Usage,
    /// Delete a file: one of your own (its owner is the user who uploaded it).
    Delete {
        file_id: String,
        /// Delete any user's file of the app (a token with the admin scope, which only a
        /// holder of the app key can mint; an app's moderation, not an end user's).
        #[arg(long)]
        admin: bool,
    },
    /// Start a local cluster (server, 2 server-proxies, 2 client-proxies), upload a generated
    /// file while killing the primary server-proxy halfway, download it back through the other
    /// client-proxy, verify the SHA-256 and print a report. Stops everything it started.
    Demo {
        /// Size of the generated file, binary units (e.g. 256MiB, 1GiB).
        #[arg(long, default_value = "256MiB", value_parser = size::parse_size)]
        size: u64,
        /// Keep the server's data in this directory instead of a temp dir.
        #[arg(long, value_name = "DIR")]
        data: Option<PathBuf>,
        /// Directory holding server.toml and the four proxy configs.
        #[arg(long, value_name = "DIR", default_value = "conf")]
        conf: PathBuf,
    },
    /// Print a new random secret (64 hex digits) for an app key, a link key or a signed-URL
    /// secret in a config file.
    Keygen,
    /// Mint a delegated token (hex) for one user, with the app key (FERRY_KEY or `[key]`): what
    /// an app's backend hands to that user's device, which then runs `ferry` with FERRY_TOKEN
    /// or --token-file and never holds the key. The token serves every connection until it
    /// expires. The user it is for is --user (required here).
    Token {
        /// What it allows: read, write, delete (own files), admin (with delete: anyone's).
        #[arg(long, default_value = "read,write", value_parser = ferry_client::parse_scope)]
        scope: Scope,
        /// How long it is valid, e.g. 15m, 1h, 1day (at most the servers' max_lifetime_secs).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// The largest file it may upload, binary units (e.g. 100MiB); default: any size.
        #[arg(long, value_parser = size::parse_size)]
        max_upload: Option<u64>,
        /// The one file it may read (a share); such a token cannot write.
        #[arg(long, value_name = "FILE_ID")]
        file: Option<String>,
    },
    /// Print a signed HTTP URL for a stored file (the server's HTTP gateway). The app's secret
    /// comes from FERRY_SECRET or the config (`[secrets] APP = "..."`, or `secret = "..."`),
    /// never from the command line.
    Url {
        file_id: String,
        /// How long the URL stays valid, e.g. 30m, 1h, 7days.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        expires: Duration,
        /// Base URL of the HTTP gateway.
        #[arg(long, env = "FERRY_HTTP_BASE", default_value = "http://127.0.0.1:7480")]
        base: String,
        /// Download as an attachment under this name (`/files/ID/NAME`, the name signed too,
        /// so the URL's holder cannot change it).
        #[arg(long)]
        name: Option<String>,
    },
    /// Print a tracker's view of the cluster: groups, their users, and each node's state
    /// (online/offline), time since its last beat and free bytes.
    Groups {
        /// Tracker address (host:port); repeat to try several in turn.
        #[arg(long = "tracker", value_name = "ADDR", required = true)]
        trackers: Vec<String>,
        /// Give up on a tracker after this long.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Users listed per group ("app/user", in order), or "all".
        #[arg(long, value_name = "N|all", default_value = "20", value_parser = parse_users_max)]
        users: usize,
    },
    /// Manage a local cluster.
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClusterAction {
    /// Run the local cluster in the foreground, logs prefixed by process; Ctrl-C stops all.
    Up {
        /// Directory holding server.toml and the four proxy configs.
        #[arg(long, value_name = "DIR", default_value = "conf")]
        conf: PathBuf,
        /// The server's data directory (with --nodes/--groups: the tracker's and each group's
        /// data dirs go under it, and the generated configs in DIR/conf).
        #[arg(long, value_name = "DIR", default_value = "ferry-data")]
        data: PathBuf,
        /// Storage nodes per group: start a multi-node cluster (two trackers, G groups of
        /// N nodes sharing a data dir each, a routing server-proxy pair, a client-proxy pair).
        #[arg(long, value_name = "N")]
        nodes: Option<usize>,
        /// Groups of storage nodes (multi-node cluster; default 1 with --nodes).
        #[arg(long, value_name = "G")]
        groups: Option<usize>,
        /// PostgreSQL URL for the cluster's metadata (required when N > 1 or G > 1); else
        /// FERRY_META_URL, else `meta_url` in the conf dir's server.toml.
        #[arg(long, value_name = "URL")]
        meta_url: Option<String>,
        /// With --nodes/--groups: the tracker's port; the others follow it (nodes from +301,
        /// routing server-proxies +111/+112 with stats +211/+212, client-proxies +121/+122).
        #[arg(long, value_name = "PORT", default_value_t = ferry_supervisor::cluster::PORT_BASE)]
        port_base: u16,
    },
}

/// Progress bar on stderr, only when stderr is a terminal.
struct Bar(ProgressBar);

impl Bar {
    fn new() -> Option<Bar> {
        if !std::io::stderr().is_terminal() {
            return None;
        }
        let pb = ProgressBar::new(0);
        if let Ok(style) = ProgressStyle::with_template(
            "{bar:30} {bytes}/{total_bytes} {decimal_bytes_per_sec} ETA {eta} {msg}",
        ) {
            pb.set_style(style);
        }
        pb.enable_steady_tick(Duration::from_millis(200));
        Some(Bar(pb))
    }
}

impl Progress for Bar {
    fn start(&self, total: u64, done: u64) {
        self.0.set_length(total);
        self.0.set_position(done);
        self.0.reset_eta();
    }
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
    fn counters(&self, resent: u32, failovers: u64) {
        if resent > 0 || failovers > 0 {
            self.0
                .set_message(format!("re-sent {resent} blocks, {failovers} failovers"));
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

fn client(cli: &Cli) -> Result<Client, ClientError> {
    let file = settings::load_file(cli.config.as_deref())?;
    let flags = Flags {
        proxies: cli.proxies.clone(),
        app: cli.app.clone(),
        user: cli.user.clone(),
        outage_window: cli.outage_window.map(Duration::from_secs),
        token_file: cli.token_file.clone(),
        ca: cli.ca.clone(),
        pins: cli.pins.clone(),
    };
    Client::new(settings::resolve(file, &flags, &EnvVars::from_process())?)
}

/// `ferry token`: a delegated token made with the app key.
fn mint_token(
    cli: &Cli,
    scope: Scope,
    ttl: Duration,
    max_upload: Option<u64>,
    file: Option<String>,
) -> Result<String, ClientError> {
    let Some(user) = cli.user.as_deref() else {
        return Err(ClientError::Input(
            "ferry token --user USER: name the user the token is for".into(),
        ));
    };
    let file_cfg = settings::load_file(cli.config.as_deref())?;
    let env = EnvVars::from_process();
    let app = cli
        .app
        .clone()
        .or(env.app.clone())
        .or(file_cfg.app.clone())
        .unwrap_or_else(|| settings::DEFAULT_APP.into());
    let key = settings::app_key(file_cfg, &env)?.ok_or_else(|| {
        ClientError::Input(
            "ferry token needs the app key: FERRY_KEY=KEY_ID:SECRET or `[key]` in the config"
                .into(),
        )
    })?;
    if file.is_some() && scope.contains(Scope::WRITE) {
        return Err(ClientError::Input(
            "a token for one file (--file) is a read share: it cannot have the write scope".into(),
        ));
    }
    if scope.contains(Scope::ADMIN) && !scope.contains(Scope::DELETE) {
        return Err(ClientError::Input(
            "the admin scope goes with delete".into(),
        ));
    }
    let limits = Delegation {
        max_upload: max_upload.unwrap_or(0),
        file,
    };
    let secs = ttl.as_secs().max(1);
    let raw = key
        .delegate(&app, user, scope, secs, limits)
        .map_err(|e| ClientError::Input(format!("cannot make the token: {e}")))?;
    let token = hex::encode(raw);
    let expires = ferry_common::clock::now_secs().saturating_add(secs);
    Ok(if cli.json {
        json!({"command": "token", "app": app, "user": user, "scope": ferry_client::scope_names(scope),
               "expires": expires, "token": token})
        .to_string()
    } else {
        token
    })
}

/// `--users`: a count, or "all".
fn parse_users_max(s: &str) -> Result<usize, String> {
    match s {
        "all" => Ok(usize::MAX),
        n => n
            .parse()
            .map_err(|_| format!("{n:?} is not a number or \"all\"")),
    }
}

fn created_text(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// Status lines of the local cluster commands go to stderr.
fn say(line: &str) {
    eprintln!("{line}");
}

/// Runs one command; returns what to print on stdout.
pub fn run(cli: &Cli, on_signal: &OnSignal) -> Result<String, ClientError> {
    // The local cluster commands start their own proxies, so they need no proxy list.
    match &cli.command {
        Command::Demo { size, data, conf } => {
            let running = stop_members_on_signal(on_signal);
            let r = ferry_supervisor::demo::run(conf, *size, data.as_deref(), say, &running)?;
            return Ok(if cli.json {
                json!({"command": "demo", "report": r}).to_string()
            } else {
                ferry_supervisor::demo::render(&r)
            });
        }
        Command::Cluster {
            action:
                ClusterAction::Up {
                    conf,
                    data,
                    nodes,
                    groups,
                    meta_url,
                    port_base,
                },
        } => {
            let running = stop_members_on_signal(on_signal);
            if nodes.is_none() && groups.is_none() && meta_url.is_none() {
                ferry_supervisor::up::cluster_up(conf, data, say, &running)?;
            } else {
                let env = std::env::var(ferry_supervisor::cluster::META_URL_ENV).ok();
                let spec = ferry_supervisor::cluster::Spec {
                    nodes: nodes.unwrap_or(1),
                    groups: groups.unwrap_or(1),
                    meta_url: ferry_supervisor::cluster::resolve_meta_url(
                        meta_url.as_deref(),
                        env,
                        conf,
                    )?,
                    beat_interval_ms: 1000,
                    offline_after_ms: 3000,
                    route_cache_ms: 2000,
                    port_base: *port_base,
                    tls: true,
                };
                ferry_supervisor::up::up_groups(&spec, data, say, &running)?;
            }
            return Ok(String::new());
        }
        Command::Groups {
            trackers,
            timeout,
            users,
        } => {
            let link = settings::link_key(
                settings::load_file(cli.config.as_deref())?,
                &EnvVars::from_process(),
            )?;
            let t = ferry_client::groups::Trackers {
                addrs: trackers,
                timeout: *timeout,
                link: link.as_ref(),
            };
            let v = ferry_client::groups::fetch(&t, *users)?;
            return Ok(if cli.json {
                ferry_client::groups::to_json(&v).to_string()
            } else {
                ferry_client::groups::render(&v)
            });
        }
        Command::Token {
            scope,
            ttl,
            max_upload,
            file,
        } => return mint_token(cli, *scope, *ttl, *max_upload, file.clone()),
        Command::Keygen => {
            let secret = ferry_common::auth::new_secret();
            return Ok(if cli.json {
                json!({"command": "keygen", "secret": secret}).to_string()
            } else {
                secret
            });
        }
        Command::Url {
            file_id,
            expires,
            base,
            name,
        } => return signed_url(cli, file_id, *expires, base, name.as_deref()),
        _ => {}
    }
    let c = client(cli)?;
    let bar = Bar::new();
    let progress: &dyn Progress = match &bar {
        Some(b) => b,
        None => &ferry_client::Quiet,
    };
    let out = match &cli.command {
        Command::Upload {
            path,
            threads,
            block_size,
        } => {
            let r = c.upload(path, *threads, *block_size, progress)?;
            if cli.json {
                json!({"command": "upload", "path": path, "file_id": r.file_id, "report": r})
                    .to_string()
            } else {
                r.file_id
            }
        }
        Command::Download {
            file_id,
            output,
            threads,
        } => {
            let r = c.download(file_id, output, *threads, progress)?;
            if cli.json {
                json!({"command": "download", "file_id": file_id, "path": output, "report": r})
                    .to_string()
            } else {
                String::new()
            }
        }
        Command::Stat { file_id } => {
            let i = c.stat(file_id)?;
            if cli.json {
                json!({"command": "stat", "file": i}).to_string()
            } else {
                format!(
                    "file_id: {}\nsize: {}\nsha256: {}\nname: {}\ncreated: {}\nblock_size: {}",
                    i.file_id,
                    i.size,
                    i.sha256,
                    i.name,
                    created_text(i.created),
                    i.block_size
                )
            }
        }
        Command::Usage => {
            let u = c.usage()?;
            if cli.json {
                json!({"command": "usage", "usage": u}).to_string()
            } else {
                let of = |n: u64, max: Option<u64>| match max {
                    Some(m) => format!("{n} of {m}"),
                    None => format!("{n} (no quota)"),
                };
                format!(
                    "user {} of app {}
bytes: {}
files: {}",
                    u.user,
                    u.app,
                    of(u.bytes, u.max_bytes),
                    of(u.files, u.max_files)
                )
            }
        }
        Command::Delete { file_id, admin } => {
            c.delete(file_id, *admin)?;
            if cli.json {
                json!({"command": "delete", "file_id": file_id, "deleted": true}).to_string()
            } else {
                String::new()
            }
        }
        Command::Demo { .. }
        | Command::Cluster { .. }
        | Command::Url { .. }
        | Command::Keygen
        | Command::Token { .. }
        | Command::Groups { .. } => {
            unreachable!("handled above")
        }
    };
    drop(bar);
    Ok(out)
}

/// `ferry url`: a signed URL for the HTTP gateway (see `ferry_common::signing`). Needs no proxy.
fn signed_url(
    cli: &Cli,
    file_id: &str,
    expires: Duration,
    base: &str,
    name: Option<&str>,
) -> Result<String, ClientError> {
    let file = settings::load_file(cli.config.as_deref())?;
    let env = EnvVars::from_process();
    let app = cli
        .app
        .clone()
        .or(env.app)
        .or(file.app)
        .unwrap_or_else(|| settings::DEFAULT_APP.into());
    let secret = std::env::var("FERRY_SECRET")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| file.secrets.and_then(|mut m| m.remove(&app)))
        .or(file.secret)
        .ok_or_else(|| {
            ClientError::Input(format!(
                "no secret for app {app:?}: set FERRY_SECRET, or `secret` / `[secrets] {app} = ...` \
                 in the config"
            ))
        })?;
    if file_id.is_empty() {
        return Err(ClientError::Input("empty file id".into()));
    }
    let now = ferry_common::clock::now_secs();
    let exp = now.saturating_add(expires.as_secs().max(1));
    let url = match name {
        Some(n) if n.is_empty() || n.contains('/') || n.chars().any(char::is_control) => {
            return Err(ClientError::Input(format!(
                "--name {n:?}: a file name, without '/' or control characters"
            )));
        }
        Some(n) => {
            ferry_common::signing::signed_named_url(base, secret.as_bytes(), file_id, n, exp, &app)
        }
        None => ferry_common::signing::signed_url(base, secret.as_bytes(), file_id, exp, &app),
    };
    Ok(if cli.json {
        json!({"command": "url", "file_id": file_id, "app": app, "expires": exp, "url": url})
            .to_string()
    } else {
        url
    })
}

/// The exit status of each failure class, stable across releases (`--help` shows it; the
/// README and a test hold it to [`Class::exit_code`]).
pub const EXIT_STATUS: &str = "\
Exit status (stable; with --json a failure is one JSON object on stderr: error, code, name,
class, exit, peer):
    0  success
    1  other: any other failure
    2  usage: a bad flag, argument or config
    3  auth: the key or token was refused, or the session may not do this
    4  not_found: no such file id (or upload session)
    5  integrity: bytes did not verify
    6  unreachable: no proxy or server answered within the retry window
    7  limit: a quota or limit refused it (disk full included)
  130  interrupted: stopped by Ctrl-C or SIGTERM (an upload or download resumes when run again)";

/// What SIGINT or SIGTERM must say and undo before the process ends: set by the command that
/// runs (a transfer reports the interruption; `demo` and `cluster up` stop their members). The
/// `ferry` binary's signal watcher runs it and then exits with the interrupted status; a
/// signal before any command set it just ends the process with that status.
#[derive(Clone, Default)]
pub struct OnSignal(Arc<Mutex<Option<SignalHook>>>);

type SignalHook = Box<dyn FnOnce(i32) + Send>;

impl OnSignal {
    fn set(&self, hook: impl FnOnce(i32) + Send + 'static) {
        *self.0.lock() = Some(Box::new(hook));
    }

    /// Runs what the command set, once (`sig` is the signal's number).
    pub fn run(&self, sig: i32) {
        let hook = self.0.lock().take();
        if let Some(hook) = hook {
            hook(sig);
        }
    }
}

/// A signal stops the members of the cluster a foreground command runs (and removes its temp
/// dir) before the process exits.
fn stop_members_on_signal(on_signal: &OnSignal) -> Running {
    let running = Running::default();
    let r = running.clone();
    on_signal.set(move |sig| {
        say(&format!("signal {sig}: stopping the cluster"));
        r.stop();
    });
    running
}

/// The exit status of a process ended by SIGINT or SIGTERM.
pub const INTERRUPTED_EXIT: i32 = Class::Interrupted.exit_code() as i32;

/// Entry point of the `ferry` binary: parses, runs and reports; the binary watches signals and
/// runs `on_signal` on one.
pub fn main(on_signal: &OnSignal) -> ExitCode {
    // Known before parsing, so a bad flag is reported as --json asks too.
    let json = std::env::args_os().any(|a| a == "--json");
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help, --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            if !json {
                let _ = e.print();
                return ExitCode::from(Class::Usage.exit_code());
            }
            let text = e.to_string();
            let line = text.lines().next().unwrap_or("bad usage");
            let line = line.strip_prefix("error: ").unwrap_or(line);
            return failure(true, Class::Usage, line, None, None);
        }
    };
    // Quiet by default: stderr carries the one-line error (RUST_LOG=info shows failovers).
    let env = env_logger::Env::default().default_filter_or("warn");
    let _ = env_logger::Builder::from_env(env)
        .format_timestamp_millis()
        .try_init();
    // A transfer stopped by a signal says so; the resume state on disk is current after
    // every block (see the client's `state.rs`), so the same command run again goes on.
    let json = cli.json;
    on_signal.set(move |sig| {
        let line = format!("interrupted by signal {sig}; run the same command again to resume");
        let _ = failure(json, Class::Interrupted, &line, None, None);
    });
    match run(&cli, on_signal) {
        Ok(out) => {
            if !out.is_empty() {
                println!("{out}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            let line = e.to_string().replace('\n', " ");
            failure(cli.json, e.class(), &line, e.code(), e.peer())
        }
    }
}

/// Reports a failure on stderr (one line, or one JSON object) and gives its exit status.
fn failure(
    json: bool,
    class: Class,
    line: &str,
    code: Option<ErrorCode>,
    peer: Option<&str>,
) -> ExitCode {
    if json {
        eprintln!(
            "{}",
            json!({
                "error": line,
                "code": code.map(|c| c as u16),
                "name": code.map(|c| c.name()),
                "class": class.name(),
                "exit": class.exit_code(),
                "peer": peer,
            })
        );
    } else {
        eprintln!("ferry: {line}");
    }
    ExitCode::from(class.exit_code())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--help` and the README list every class with its exit status.
    #[test]
    fn help_and_readme_list_every_exit_status() {
        let readme = include_str!("../../README.md");
        for c in Class::ALL {
            let (code, name) = (c.exit_code(), c.name());
            assert!(
                EXIT_STATUS.contains(&format!("{code:>5}  {name}:")),
                "--help: {name}"
            );
            assert!(
                readme.contains(&format!("| {code} | `{name}` |")),
                "README: {name}"
            );
        }
    }
}
