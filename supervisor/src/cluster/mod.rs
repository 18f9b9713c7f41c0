//! A local ferry cluster as child processes, all on loopback, started from the binaries next to
//! the running `ferry`:
//!
//! - [`Cluster::start`]: one server, a server-proxy pair and a client-proxy pair, with the configs
//!   in `conf/`. `ferry demo`, `ferry cluster up` and the chaos tests run on it.
//! - [`Cluster::start_groups`]: a multi-node cluster (`ferry cluster up --nodes N --groups G`):
//!   a tracker, G groups of N storage nodes (the nodes of a group share one data dir
//!   and, with the tracker, one PostgreSQL database), a routing server-proxy pair and a
//!   client-proxy pair. Its configs are generated into `<data>/conf/`.
//!
//! Processes are started in dependency order and each is waited for until it answers a PROBE with
//! the right identity. Every child is killed and reaped when the cluster is dropped, so no test
//! or interrupted demo leaves processes behind.

mod configs;
mod groups;
mod member;

pub use configs::MemberConfig;
pub use groups::*;
pub use member::proxy_stats;

use crate::localca::LocalCa;
use crate::secrets::Secrets;
use configs::load;
use ferry_client::error::{ClientError, Result};
use ferry_client::settings::FileConfig;
use ferry_common::proto::Role;
use ferry_proxy::config::Config as ProxyConfig;
use ferry_server::config::Config as ServerConfig;
use member::{prefix_lines, spawn_member, wait_ready};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Names of the cluster's members, in start order.
pub const SERVER: &str = "server";
pub const SERVER_PROXY_A: &str = "server-proxy-a";
pub const SERVER_PROXY_B: &str = "server-proxy-b";
/// Connections one client address may hold on a generated client-proxy (as in
/// conf/client-proxy-*.toml).
pub(crate) const CLIENT_PROXY_PER_IP: usize = 256;
pub const CLIENT_PROXY_A: &str = "client-proxy-a";
pub const CLIENT_PROXY_B: &str = "client-proxy-b";

/// Where each member listens.
#[derive(Debug, Clone)]
pub struct Layout {
    pub server: SocketAddr,
    pub server_proxies: [SocketAddr; 2],
    pub client_proxies: [SocketAddr; 2],
    /// The client-proxies' stats endpoints (`stats_listen`), when their configs set one.
    pub client_proxy_stats: [Option<SocketAddr>; 2],
    /// The client-proxies listen with TLS, with a local CA made at start (`ferry demo`).
    pub tls: bool,
}

impl Layout {
    /// The addresses the configs in `conf_dir` listen on.
    pub fn from_conf(conf_dir: &Path) -> Result<Layout> {
        let server: ServerConfig = load(conf_dir, SERVER)?;
        let proxy = |name: &str| load::<ProxyConfig>(conf_dir, name);
        let [sa, sb, ca, cb] = [
            proxy(SERVER_PROXY_A)?,
            proxy(SERVER_PROXY_B)?,
            proxy(CLIENT_PROXY_A)?,
            proxy(CLIENT_PROXY_B)?,
        ];
        Ok(Layout {
            server: server.listen,
            server_proxies: [sa.listen, sb.listen],
            client_proxies: [ca.listen, cb.listen],
            client_proxy_stats: [ca.stats_listen, cb.stats_listen],
            tls: false,
        })
    }

    /// Fresh loopback ports (for tests, so clusters never collide).
    pub fn free_ports() -> Result<Layout> {
        let mut held = Vec::new();
        let mut next = || -> Result<SocketAddr> {
            // Hold each listener until all five are picked so no port is handed out twice.
            let l = std::net::TcpListener::bind("127.0.0.1:0")
                .map_err(|e| ClientError::io("picking a free port", e))?;
            let a = l
                .local_addr()
                .map_err(|e| ClientError::io("picking a free port", e))?;
            held.push(l);
            Ok(a)
        };
        Ok(Layout {
            server: next()?,
            server_proxies: [next()?, next()?],
            client_proxies: [next()?, next()?],
            client_proxy_stats: [None, None],
            tls: false,
        })
    }
}

/// How members' logs are kept.
#[derive(Debug, Clone)]
pub enum Logs {
    /// Each line on our stderr, prefixed with the member's name (`ferry cluster up`).
    Prefixed,
    /// One file per member in this directory (demo, tests).
    Dir(PathBuf),
}

struct Member {
    name: String,
    /// The binary: "ferry-server" or "ferry-proxy".
    exe: &'static str,
    args: Vec<String>,
    /// FERRY_META_URL for the child: `Some(Some(url))` set, `Some(None)` removed, `None` inherited.
    meta_env: Option<Option<String>>,
    expect: Role,
    addr: SocketAddr,
    child: Option<Child>,
    restarts: u32,
}

/// A running local cluster. Dropping it kills every member.
pub struct Cluster {
    bin_dir: PathBuf,
    logs: Logs,
    members: Vec<Member>,
    /// Where the members listen. In a multi-node cluster `server` is the tracker.
    pub layout: Layout,
    /// The multi-node cluster's shape, when started with [`Cluster::start_groups`].
    pub groups: Option<GroupsLayout>,
    pub data_dir: PathBuf,
    /// The secrets in the members' generated configs.
    pub secrets: Secrets,
    /// The local CA of TLS client-proxies (`Layout::tls`, `Spec::tls`).
    pub tls: Option<LocalCa>,
}

impl Cluster {
    /// Writes `<data>/conf/client.toml`: the client-proxies, and the key of `app` (and its
    /// signed-URL secret, if the members have one), so `ferry --config` works against this
    /// cluster. `None` when no member config has a key for `app`.
    pub fn write_client_conf(&mut self, app: &str) -> Result<Option<PathBuf>> {
        let Some(key) = self.secrets.key_of(app) else {
            return Ok(None);
        };
        // The client's own config type: `ca` (this cluster's local CA) when the client-proxies
        // listen with TLS, `[link]` for `ferry groups` (the tracker takes linked peers only).
        let conf = FileConfig {
            proxies: Some(self.client_endpoints()),
            ca: self.tls.as_ref().map(|t| t.ca.clone()),
            app: Some(app.to_owned()),
            key: Some(key),
            link: self.secrets.link_of(ADMIN_LINK_ID),
            secrets: self
                .secrets
                .http_of(app)
                .map(|http| [(app.to_owned(), http)].into()),
            ..FileConfig::default()
        };
        let dir = self.data_dir.join("conf");
        std::fs::create_dir_all(&dir)
            .map_err(|e| ClientError::io(format!("creating {}", dir.display()), e))?;
        let path = dir.join("client.toml");
        let text = toml::to_string(&conf)
            .map_err(|e| ClientError::Cluster(format!("writing {}: {e}", path.display())))?;
        let header =
            "# Generated by ferry for this local cluster (it holds the cluster's secrets).\n";
        crate::secrets::write_private(&path, &format!("{header}{text}"))?;
        Ok(Some(path))
    }

    /// The client-proxies as a client names them: `tls://IP:PORT` when they listen with TLS.
    pub fn client_endpoints(&self) -> Vec<String> {
        let scheme = if self.tls.is_some() { "tls://" } else { "" };
        self.layout
            .client_proxies
            .iter()
            .map(|a| format!("{scheme}{a}"))
            .collect()
    }

    /// Client settings' proxy list and TLS options for this cluster's client-proxies.
    pub fn client_settings(&self, s: &mut ferry_client::Settings) -> Result<()> {
        s.proxies = ferry_client::settings::parse_proxies("cluster", &self.client_endpoints())?;
        s.tls.ca = self.tls.as_ref().map(|t| t.ca.clone());
        Ok(())
    }

    /// Starts the five members from `bin_dir` with the configs in `conf_dir`, listening where
    /// `layout` says (flags override the configs' addresses), and waits until all answer.
    pub fn start(
        bin_dir: &Path,
        conf_dir: &Path,
        layout: Layout,
        data_dir: &Path,
        logs: Logs,
    ) -> Result<Cluster> {
        // The members run on conf/'s configs with this cluster's addresses, data dir and
        // own secrets, written to <data>/conf/.
        let out = data_dir.join("conf");
        std::fs::create_dir_all(&out)
            .map_err(|e| ClientError::io(format!("creating {}", out.display()), e))?;
        let mut secrets = Secrets::default();
        let tls = match layout.tls {
            true => Some(local_ca(&out, &layout.client_proxies)?),
            false => None,
        };
        let l = &layout;
        let mut server: ServerConfig = load(conf_dir, SERVER)?;
        server.listen = l.server;
        server.data = data_dir.to_path_buf();
        secrets.fill_server(&mut server);
        let mut plan = vec![(SERVER, MemberConfig::Server(Box::new(server)))];
        for (name, listen, ups, tls) in [
            (SERVER_PROXY_A, l.server_proxies[0], &[l.server][..], None),
            (SERVER_PROXY_B, l.server_proxies[1], &[l.server][..], None),
            (
                CLIENT_PROXY_A,
                l.client_proxies[0],
                &l.server_proxies[..],
                tls.as_ref(),
            ),
            (
                CLIENT_PROXY_B,
                l.client_proxies[1],
                &l.server_proxies[..],
                tls.as_ref(),
            ),
        ] {
            let mut c: ProxyConfig = load(conf_dir, name)?;
            c.listen = listen;
            c.upstreams = ups.to_vec();
            c.trackers.clear();
            if let Some(ca) = tls {
                c.tls = Some(ca.proxy_tls());
            }
            secrets.fill_proxy(&mut c);
            plan.push((name, MemberConfig::Proxy(Box::new(c))));
        }
        if let Logs::Dir(d) = &logs {
            std::fs::create_dir_all(d)
                .map_err(|e| ClientError::io(format!("creating {}", d.display()), e))?;
        }
        let mut cluster = Cluster {
            bin_dir: bin_dir.to_path_buf(),
            logs,
            members: Vec::new(),
            layout,
            groups: None,
            data_dir: data_dir.to_path_buf(),
            secrets,
            tls,
        };
        let from = conf_dir.display();
        for (name, conf) in plan {
            let header =
                format!("Generated from {from}/{name}.toml with this cluster's own secrets.");
            cluster.add(name, conf, &header, None)?;
        }
        Ok(cluster)
    }

    /// Writes a member's config (`<data>/conf/<name>.toml`), appends the member and starts it.
    fn add(
        &mut self,
        name: &str,
        conf: MemberConfig,
        header: &str,
        meta_env: Option<Option<String>>,
    ) -> Result<()> {
        let path = conf.write(&self.data_dir.join("conf"), name, header)?;
        let (exe, expect, addr) = (conf.exe(), conf.role(), conf.listen());
        let args = vec!["--config".into(), path.display().to_string()];
        let name = name.to_owned();
        self.members.push(Member {
            name: name.clone(),
            exe,
            args,
            meta_env,
            expect,
            addr,
            child: None,
            restarts: 0,
        });
        self.start_member(&name)
    }

    fn member(&mut self, name: &str) -> Result<&mut Member> {
        self.members
            .iter_mut()
            .find(|m| m.name == name)
            .ok_or_else(|| ClientError::Cluster(format!("no cluster member named {name}")))
    }

    /// (Re)starts a member and waits until it answers a PROBE (10 s at most).
    pub fn start_member(&mut self, name: &str) -> Result<()> {
        let bin_dir = self.bin_dir.clone();
        let logs = self.logs.clone();
        let m = self.member(name)?;
        if m.child.is_some() {
            return Ok(());
        }
        let exe = bin_dir.join(m.exe);
        let mut cmd = Command::new(&exe);
        cmd.args(&m.args).stdin(Stdio::null()).stdout(Stdio::null());
        match &m.meta_env {
            Some(Some(url)) => {
                cmd.env(META_URL_ENV, url);
            }
            Some(None) => {
                cmd.env_remove(META_URL_ENV);
            }
            None => {}
        }
        match &logs {
            Logs::Dir(d) => {
                let path = d.join(format!("{}.log", m.name));
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|e| ClientError::io(format!("opening {}", path.display()), e))?;
                cmd.stderr(f);
            }
            Logs::Prefixed => {
                cmd.stderr(Stdio::piped());
            }
        }
        let mut child = spawn_member(cmd)
            .map_err(|e| ClientError::io(format!("starting {} ({})", m.name, exe.display()), e))?;
        if let (Logs::Prefixed, Some(err)) = (&logs, child.stderr.take()) {
            let name = m.name.clone();
            std::thread::spawn(move || prefix_lines(&name, err));
        }
        m.child = Some(child);
        let (addr, expect) = (m.addr, m.expect);
        wait_ready(addr, expect, Duration::from_secs(10)).map_err(|e| {
            // A member that exited (a port taken, a bad config) says why in its log.
            let log = match &logs {
                Logs::Dir(d) => std::fs::read_to_string(d.join(format!("{name}.log")))
                    .map(|t| {
                        let lines: Vec<&str> = t.lines().collect();
                        lines[lines.len().saturating_sub(3)..].join(" | ")
                    })
                    .unwrap_or_default(),
                Logs::Prefixed => "see its log lines above".into(),
            };
            let exited = match self.member(name).ok().and_then(|m| m.child.as_mut()) {
                Some(c) => match c.try_wait() {
                    Ok(Some(status)) => format!(" (it exited: {status}; its log ends: {log})"),
                    _ => String::new(),
                },
                None => String::new(),
            };
            ClientError::Cluster(format!("{name} at {addr} did not come up: {e}{exited}"))
        })
    }

    /// SIGKILLs a member (a crash, not a shutdown) and reaps it.
    pub fn kill(&mut self, name: &str) -> Result<()> {
        let m = self.member(name)?;
        if let Some(mut c) = m.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        Ok(())
    }

    /// Kills a member and starts it again.
    pub fn restart(&mut self, name: &str) -> Result<()> {
        self.kill(name)?;
        self.member(name)?.restarts += 1;
        self.start_member(name)
    }

    /// Sends a signal to a running member (SIGSTOP/SIGCONT for a hang).
    pub fn signal(&mut self, name: &str, sig: nix::sys::signal::Signal) -> Result<()> {
        let m = self.member(name)?;
        if let Some(c) = &m.child {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            nix::sys::signal::kill(pid, sig)
                .map_err(|e| ClientError::Cluster(format!("signal {sig} to {name}: {e}")))?;
        }
        Ok(())
    }

    /// PIDs of the running members.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.members
            .iter()
            .filter_map(|m| m.child.as_ref().map(|c| (m.name.clone(), c.id())))
            .collect()
    }

    /// Members that exited on their own (not killed through this cluster).
    pub fn exited(&mut self) -> Vec<String> {
        let mut dead = Vec::new();
        for m in &mut self.members {
            if let Some(c) = m.child.as_mut()
                && !matches!(c.try_wait(), Ok(None))
            {
                dead.push(m.name.clone());
            }
        }
        dead
    }

    /// SIGTERM everyone (proxies first), wait up to `grace` for them to exit, then SIGKILL.
    pub fn stop(&mut self, grace: Duration) {
        for m in self.members.iter().rev() {
            if let Some(c) = &m.child {
                let pid = nix::unistd::Pid::from_raw(c.id() as i32);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            }
        }
        let t = Instant::now();
        for m in self.members.iter_mut().rev() {
            if let Some(mut c) = m.child.take() {
                loop {
                    if !matches!(c.try_wait(), Ok(None)) || t.elapsed() >= grace {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// The environment variable that overrides a server's `meta_url` (and gives `cluster up` its
/// database when no flag does).
pub const META_URL_ENV: &str = "FERRY_META_URL";

/// A fresh local CA in `conf/tls` for client-proxies listening on `addrs`.
fn local_ca(conf: &Path, addrs: &[SocketAddr]) -> Result<LocalCa> {
    let ips: Vec<std::net::IpAddr> = addrs.iter().map(SocketAddr::ip).collect();
    LocalCa::make(&conf.join("tls"), &ips)
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(3));
    }
}
