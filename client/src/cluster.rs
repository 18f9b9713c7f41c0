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

use crate::error::{ClientError, Result};
use crate::localca::LocalCa;
use crate::secrets::Secrets;
use ferry_common::auth::SigningKey;
use ferry_common::proto::{self, Header, Identity, Role, cmd};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Names of the cluster's members, in start order.
pub const SERVER: &str = "server";
pub const SERVER_PROXY_A: &str = "server-proxy-a";
pub const SERVER_PROXY_B: &str = "server-proxy-b";
/// Connections one client address may hold on a generated client-proxy (as in
/// conf/client-proxy-*.toml).
const CLIENT_PROXY_PER_IP: usize = 256;
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
        let table = |name: &str| -> Result<toml::Table> {
            let path = conf_dir.join(format!("{name}.toml"));
            let text = std::fs::read_to_string(&path)
                .map_err(|e| ClientError::io(format!("reading {}", path.display()), e))?;
            text.parse()
                .map_err(|e| ClientError::Cluster(format!("{}: {e}", path.display())))
        };
        let stats = |name: &str| -> Result<Option<SocketAddr>> {
            Ok(table(name)?
                .get("stats_listen")
                .and_then(|v| v.as_str())
                .and_then(|v| v.parse().ok()))
        };
        let listen = |name: &str| -> Result<SocketAddr> {
            let path = conf_dir.join(format!("{name}.toml"));
            table(name)?
                .get("listen")
                .and_then(|v| v.as_str())
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| {
                    ClientError::Cluster(format!(
                        "{} has no valid `listen` address",
                        path.display()
                    ))
                })
        };
        Ok(Layout {
            server: listen(SERVER)?,
            server_proxies: [listen(SERVER_PROXY_A)?, listen(SERVER_PROXY_B)?],
            client_proxies: [listen(CLIENT_PROXY_A)?, listen(CLIENT_PROXY_B)?],
            client_proxy_stats: [stats(CLIENT_PROXY_A)?, stats(CLIENT_PROXY_B)?],
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
        let proxies = self.client_endpoints();
        let list: Vec<String> = proxies.iter().map(|p| toml_str(p)).collect();
        let mut text = format!(
            "# Generated by ferry for this local cluster (it holds the cluster's secrets).\n\
             proxies = [{}]\napp = {}\n",
            list.join(", "),
            toml_str(app),
        );
        if let Some(ca) = &self.tls {
            text.push_str(&format!(
                "# The client-proxies' certificates are signed by this cluster's local CA.\n\
                 ca = {}\n",
                toml_str(&ca.ca.display().to_string())
            ));
        }
        text.push_str(&format!(
            "\n[key]\nid = {}\nsecret = {}\n",
            toml_str(&key.id),
            toml_str(&key.secret),
        ));
        if let Some(link) = self.secrets.link_of(ADMIN_LINK_ID) {
            text.push_str(&format!(
                "\n# For `ferry groups`: the tracker takes only linked peers.\n[link]\nid = {}\nsecret = {}\n",
                toml_str(&link.id),
                toml_str(&link.secret)
            ));
        }
        if let Some(http) = self.secrets.http_of(app) {
            text.push_str(&format!("\n[secrets]\n{app} = {}\n", toml_str(&http)));
        }
        let dir = self.data_dir.join("conf");
        std::fs::create_dir_all(&dir)
            .map_err(|e| ClientError::io(format!("creating {}", dir.display()), e))?;
        write_conf(&dir, "client", &text).map(|p| Some(PathBuf::from(p)))
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
    pub fn client_settings(&self, s: &mut crate::settings::Settings) -> Result<()> {
        s.proxies = crate::settings::parse_proxies("cluster", &self.client_endpoints())?;
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
        // The members run on copies of conf/ with this cluster's own secrets.
        let out = data_dir.join("conf");
        std::fs::create_dir_all(&out)
            .map_err(|e| ClientError::io(format!("creating {}", out.display()), e))?;
        let mut secrets = Secrets::default();
        for name in [
            SERVER,
            SERVER_PROXY_A,
            SERVER_PROXY_B,
            CLIENT_PROXY_A,
            CLIENT_PROXY_B,
        ] {
            let file = format!("{name}.toml");
            secrets.write_filled(&conf_dir.join(&file), &out.join(&file))?;
        }
        let tls = match layout.tls {
            true => Some(local_ca(&out, &layout.client_proxies)?),
            false => None,
        };
        if let Some(ca) = &tls {
            for name in [CLIENT_PROXY_A, CLIENT_PROXY_B] {
                append_conf(&out.join(format!("{name}.toml")), &ca.proxy_section())?;
            }
        }
        let conf = |name: &str| out.join(format!("{name}.toml")).display().to_string();
        let s = |a: &SocketAddr| a.to_string();
        let proxy = |name: &str, listen: &SocketAddr, ups: &[SocketAddr]| {
            let mut a = vec!["--config".into(), conf(name), "--listen".into(), s(listen)];
            for u in ups {
                a.extend(["--upstream".into(), s(u)]);
            }
            a
        };
        let server_args = vec![
            "--config".into(),
            conf(SERVER),
            "--listen".into(),
            s(&layout.server),
            "--data".into(),
            data_dir.display().to_string(),
        ];
        let l = &layout;
        let plan: Vec<(&'static str, Vec<String>, Role, SocketAddr)> = vec![
            (SERVER, server_args, Role::Server, l.server),
            (
                SERVER_PROXY_A,
                proxy(SERVER_PROXY_A, &l.server_proxies[0], &[l.server]),
                Role::Proxy,
                l.server_proxies[0],
            ),
            (
                SERVER_PROXY_B,
                proxy(SERVER_PROXY_B, &l.server_proxies[1], &[l.server]),
                Role::Proxy,
                l.server_proxies[1],
            ),
            (
                CLIENT_PROXY_A,
                proxy(CLIENT_PROXY_A, &l.client_proxies[0], &l.server_proxies),
                Role::Proxy,
                l.client_proxies[0],
            ),
            (
                CLIENT_PROXY_B,
                proxy(CLIENT_PROXY_B, &l.client_proxies[1], &l.server_proxies),
                Role::Proxy,
                l.client_proxies[1],
            ),
        ];
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
        for (name, args, expect, addr) in plan {
            cluster.add(name.to_owned(), args, None, expect, addr)?;
        }
        Ok(cluster)
    }

    /// Appends a member and starts it: `ferry-server` for [`Role::Server`], else `ferry-proxy`.
    fn add(
        &mut self,
        name: String,
        args: Vec<String>,
        meta_env: Option<Option<String>>,
        expect: Role,
        addr: SocketAddr,
    ) -> Result<()> {
        let exe = match expect {
            Role::Server => "ferry-server",
            Role::Proxy => "ferry-proxy",
        };
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
/// Name of the tracker member of a multi-node cluster.
pub const TRACKER: &str = "tracker";
/// The second tracker of a multi-node cluster, on the same database.
pub const TRACKER_B: &str = "tracker-b";
/// Most nodes per group (a tracker's SADDRS answer lists at most 32).
pub const NODES_MAX: usize = proto::NODES_MAX;
/// Most groups a local cluster may have.
pub const GROUPS_MAX: usize = 64;

/// The shape of a multi-node cluster and its timing knobs.
#[derive(Debug, Clone)]
pub struct Spec {
    pub nodes: usize,
    pub groups: usize,
    /// The shared metadata database (`postgres://...`); required when nodes or groups > 1.
    pub meta_url: Option<String>,
    /// The tracker's `beat_interval_ms` and `offline_after_ms`.
    pub beat_interval_ms: u64,
    pub offline_after_ms: u64,
    /// The routing server-proxies' `route_cache_ms`.
    pub route_cache_ms: u64,
    /// The client-proxies listen with TLS, with a local CA made at start.
    pub tls: bool,
    /// The tracker's port; every other port of [`GroupsLayout::fixed`] is relative to it.
    pub port_base: u16,
}

/// The default `--port-base`: the ports of conf/.
pub const PORT_BASE: u16 = 7300;

impl Spec {
    /// Checks the shape, and that several nodes or groups have PostgreSQL to share.
    pub fn validate(&self) -> Result<()> {
        if !(1..=NODES_MAX).contains(&self.nodes) {
            return Err(ClientError::Input(format!(
                "--nodes must be 1 ..= {NODES_MAX}, not {}",
                self.nodes
            )));
        }
        if !(1..=GROUPS_MAX).contains(&self.groups) {
            return Err(ClientError::Input(format!(
                "--groups must be 1 ..= {GROUPS_MAX}, not {}",
                self.groups
            )));
        }
        let last = usize::from(self.port_base) + 301 + 2 * self.groups * self.nodes;
        if self.port_base < 1024 || last > usize::from(u16::MAX) {
            return Err(ClientError::Input(format!(
                "--port-base must leave room for {} ports above it, within 1024 ..= 65535",
                last - usize::from(self.port_base)
            )));
        }
        let pg = self
            .meta_url
            .as_deref()
            .is_some_and(|u| u.starts_with("postgres://") || u.starts_with("postgresql://"));
        if (self.nodes > 1 || self.groups > 1) && !pg {
            return Err(ClientError::Input(format!(
                "a cluster of {} group(s) x {} node(s) shares its metadata in PostgreSQL: pass \
                 --meta-url postgres://USER@HOST:PORT/DB, set {META_URL_ENV}, or set meta_url \
                 in the conf dir's server.toml{}",
                self.groups,
                self.nodes,
                match &self.meta_url {
                    Some(u) => format!(" (got {u:?}, not a postgres:// URL)"),
                    None => String::new(),
                }
            )));
        }
        Ok(())
    }
}

/// Where the members of a multi-node cluster listen.
#[derive(Debug, Clone)]
pub struct GroupsLayout {
    /// The two trackers (one database: either answers alike; nodes and proxies
    /// use both).
    pub trackers: [SocketAddr; 2],
    /// Each group's name (g1, g2, ...) and its nodes' addresses.
    pub groups: Vec<(String, Vec<SocketAddr>)>,
    /// Each group's nodes' HTTP gateways, in the order of `groups`.
    pub http: Vec<Vec<SocketAddr>>,
    pub server_proxies: [SocketAddr; 2],
    pub server_proxy_stats: [SocketAddr; 2],
    pub client_proxies: [SocketAddr; 2],
}

/// The member name of node `n` (from 1) of `group`.
pub fn node_name(group: &str, n: usize) -> String {
    format!("{group}-node{n}")
}

fn group_names(groups: usize) -> Vec<String> {
    (1..=groups).map(|g| format!("g{g}")).collect()
}

impl GroupsLayout {
    /// The ports `ferry cluster up --nodes N --groups G` uses, from `spec.port_base` (B, by
    /// default 7300 as in conf/): trackers B and B+1, nodes from B+301 and their HTTP
    /// gateways right after them (from B+301+G*N), routing server-proxies B+111/B+112 (stats
    /// B+211/B+212), client-proxies B+121/B+122.
    pub fn fixed(spec: &Spec) -> GroupsLayout {
        let b = usize::from(spec.port_base);
        let at = |port: usize| SocketAddr::from(([127, 0, 0, 1], (port - 7300 + b) as u16));
        let total = spec.groups * spec.nodes;
        let node = |g: usize, n: usize| 7601 + g * spec.nodes + n;
        GroupsLayout {
            trackers: [at(7300), at(7301)],
            groups: group_names(spec.groups)
                .into_iter()
                .enumerate()
                .map(|(g, name)| (name, (0..spec.nodes).map(|n| at(node(g, n))).collect()))
                .collect(),
            http: (0..spec.groups)
                .map(|g| (0..spec.nodes).map(|n| at(node(g, n) + total)).collect())
                .collect(),
            server_proxies: [at(7411), at(7412)],
            server_proxy_stats: [at(7511), at(7512)],
            client_proxies: [at(7421), at(7422)],
        }
    }

    /// The same shape on addresses `next` hands out (tests: free ports picked at run time).
    pub fn picked(spec: &Spec, mut next: impl FnMut() -> SocketAddr) -> GroupsLayout {
        let mut nodes = |n: usize| (0..n).map(|_| next()).collect::<Vec<_>>();
        let groups = group_names(spec.groups)
            .into_iter()
            .map(|g| (g, nodes(spec.nodes)))
            .collect();
        let http = (0..spec.groups).map(|_| nodes(spec.nodes)).collect();
        let mut two = || [next(), next()];
        GroupsLayout {
            trackers: two(),
            groups,
            http,
            server_proxies: two(),
            server_proxy_stats: two(),
            client_proxies: two(),
        }
    }

    /// Every storage node: (group, member name, address).
    pub fn nodes(&self) -> Vec<(String, String, SocketAddr)> {
        let mut v = Vec::new();
        for (g, nodes) in &self.groups {
            for (i, a) in nodes.iter().enumerate() {
                v.push((g.clone(), node_name(g, i + 1), *a));
            }
        }
        v
    }

    /// Every node's HTTP gateway, in the order of [`GroupsLayout::nodes`].
    pub fn gateways(&self) -> Vec<SocketAddr> {
        self.http.iter().flatten().copied().collect()
    }
}

/// The app (and its key id) a generated multi-node cluster serves.
pub const CLUSTER_APP: &str = "demo";
pub const CLUSTER_KEY_ID: &str = "k1";
/// The link key id `ferry groups` (and the cluster's own start-up wait) proves to the tracker.
pub const ADMIN_LINK_ID: &str = "admin";

/// A fresh local CA in `conf/tls` for client-proxies listening on `addrs`.
fn local_ca(conf: &Path, addrs: &[SocketAddr]) -> Result<LocalCa> {
    let ips: Vec<std::net::IpAddr> = addrs.iter().map(SocketAddr::ip).collect();
    LocalCa::make(&conf.join("tls"), &ips)
}

/// Appends `text` to the config file at `path`.
fn append_conf(path: &Path, text: &str) -> Result<()> {
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| ClientError::io(format!("writing {}", path.display()), e))
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn toml_list(addrs: &[SocketAddr]) -> String {
    let items: Vec<String> = addrs.iter().map(|a| toml_str(&a.to_string())).collect();
    format!("[{}]", items.join(", "))
}

fn write_conf(dir: &Path, name: &str, text: &str) -> Result<String> {
    let path = dir.join(format!("{name}.toml"));
    crate::secrets::write_private(&path, text)?;
    Ok(path.display().to_string())
}

impl Cluster {
    /// Starts a multi-node cluster: the tracker, then every storage node (waiting
    /// until the tracker lists them all online), then the routing server-proxies and the
    /// client-proxies. Configs go to `<data_dir>/conf/`, the tracker's data to
    /// `<data_dir>/tracker`, group G's shared data dir is `<data_dir>/G`.
    pub fn start_groups(
        bin_dir: &Path,
        spec: &Spec,
        layout: GroupsLayout,
        data_dir: &Path,
        logs: Logs,
    ) -> Result<Cluster> {
        spec.validate()?;
        let conf_dir = data_dir.join("conf");
        for d in [
            &conf_dir,
            &data_dir.join(TRACKER),
            &data_dir.join(TRACKER_B),
        ] {
            std::fs::create_dir_all(d)
                .map_err(|e| ClientError::io(format!("creating {}", d.display()), e))?;
        }
        if let Logs::Dir(d) = &logs {
            std::fs::create_dir_all(d)
                .map_err(|e| ClientError::io(format!("creating {}", d.display()), e))?;
        }
        let l = &layout;
        let mut cluster = Cluster {
            bin_dir: bin_dir.to_path_buf(),
            logs,
            members: Vec::new(),
            layout: Layout {
                server: l.trackers[0],
                server_proxies: l.server_proxies,
                client_proxies: l.client_proxies,
                client_proxy_stats: [None, None],
                tls: spec.tls,
            },
            groups: Some(layout.clone()),
            data_dir: data_dir.to_path_buf(),
            secrets: Secrets::default(),
            tls: match spec.tls {
                true => Some(local_ca(&conf_dir, &l.client_proxies)?),
                false => None,
            },
        };
        // Every member proves a link key to the next hop and requires one from the previous:
        // client-proxies "cp" -> routing server-proxies "sp" -> nodes; each node its own
        // "node-NAME" -> tracker. The tracker names what each key is ([link.members]): each
        // node's key is bound to its group and address, "sp" is a router, "admin" reads.
        let sec = &mut cluster.secrets;
        let app_keys = format!(
            "[auth.keys.{CLUSTER_APP}]\n{} = {}\n",
            CLUSTER_KEY_ID,
            toml_str(&sec.app_key(CLUSTER_APP, CLUSTER_KEY_ID).secret)
        );
        let send = |sec: &mut Secrets, id: &str| {
            let k = sec.link(id);
            format!(
                "[link.send]\nid = {}\nsecret = {}\n",
                toml_str(&k.id),
                toml_str(&k.secret)
            )
        };
        let accept = |sec: &mut Secrets, ids: &[&str]| {
            let lines: Vec<String> = ids
                .iter()
                .map(|id| format!("{id} = {}\n", toml_str(&sec.link(id).secret)))
                .collect();
            format!("[link.accept]\n{}", lines.concat())
        };
        let node_key = |name: &str| format!("node-{name}");
        let nodes = l.nodes();
        let mut tracker_keys: Vec<String> = nodes.iter().map(|(_, n, _)| node_key(n)).collect();
        tracker_keys.extend(["sp".to_owned(), ADMIN_LINK_ID.to_owned()]);
        let tracker_keys: Vec<&str> = tracker_keys.iter().map(String::as_str).collect();
        let mut members = format!(
            "\n[link.members]\nsp = {{ kind = \"router\" }}\n{ADMIN_LINK_ID} = {{ kind = \"admin\" }}\n"
        );
        for (group, name, addr) in &nodes {
            members.push_str(&format!(
                "{} = {{ kind = \"node\", group = {}, addr = {} }}\n",
                node_key(name),
                toml_str(group),
                toml_str(&addr.to_string())
            ));
        }
        let tracker_link = format!("{}{members}", accept(sec, &tracker_keys));
        // Every node serves the HTTP gateway with the app's signed-URL secret; a gateway
        // redirects requests for another group's files to one of that group's gateways.
        let http_secret = format!(
            "[http.secrets]\n{CLUSTER_APP} = {}\n",
            toml_str(&sec.http(CLUSTER_APP))
        );
        let node_links: Vec<String> = nodes
            .iter()
            .map(|(_, name, _)| format!("{}{}", send(sec, &node_key(name)), accept(sec, &["sp"])))
            .collect();
        let sp_link = format!("{}{}", send(sec, "sp"), accept(sec, &["cp"]));
        let cp_link = send(sec, "cp");
        // Every server gets the database in its config and in FERRY_META_URL (which a server
        // prefers), so a different URL in our own environment cannot leak into a member.
        let meta = spec.meta_url.clone();
        let meta_line = meta
            .as_deref()
            .map_or_else(String::new, |u| format!("meta_url = {}\n", toml_str(u)));
        let names: Vec<String> = l.groups.iter().map(|(g, _)| toml_str(g)).collect();
        // Two trackers on the one database: nodes beat and proxies ask either, so losing one
        // changes nothing a user sees.
        for (name, addr) in [(TRACKER, l.trackers[0]), (TRACKER_B, l.trackers[1])] {
            let tracker_conf = format!(
                "# Generated by ferry cluster up: a tracker (one of two).\n\
                 listen = {}\ndata = {}\n{meta_line}roles = [\"tracker\"]\n\n\
                 [tracker]\ngroups = [{}]\nbeat_interval_ms = {}\noffline_after_ms = {}\n\n\
                 {tracker_link}",
                toml_str(&addr.to_string()),
                toml_str(&data_dir.join(name).display().to_string()),
                names.join(", "),
                spec.beat_interval_ms,
                spec.offline_after_ms,
            );
            cluster.add_generated(
                &conf_dir,
                name,
                &tracker_conf,
                Some(meta.clone()),
                Role::Server,
                addr,
            )?;
        }
        for (((group, name, addr), node_link), http) in
            nodes.into_iter().zip(node_links).zip(l.gateways())
        {
            let data = data_dir.join(&group);
            std::fs::create_dir_all(&data)
                .map_err(|e| ClientError::io(format!("creating {}", data.display()), e))?;
            let text = format!(
                "# Generated by ferry cluster up: storage node {name} of group {group}.\n\
                 listen = {}\ndata = {}\n{meta_line}roles = [\"storage\"]\n\n\
                 [cluster]\ngroup = {}\ntrackers = {}\nnode_name = {}\n\n[http]\nlisten = {}\n\n\
                 {http_secret}\n{app_keys}{node_link}",
                toml_str(&addr.to_string()),
                toml_str(&data.display().to_string()),
                toml_str(&group),
                toml_list(&l.trackers),
                toml_str(&name),
                toml_str(&http.to_string()),
            );
            cluster.add_generated(
                &conf_dir,
                &name,
                &text,
                Some(meta.clone()),
                Role::Server,
                addr,
            )?;
        }
        let admin = cluster.secrets.link(ADMIN_LINK_ID);
        wait_joined(
            l.trackers[0],
            Some(&admin),
            l.nodes().len(),
            Duration::from_secs(15),
        )
        .map_err(|e| {
            ClientError::Cluster(format!(
                "the storage nodes did not all join the tracker: {e}"
            ))
        })?;
        for (i, name) in [SERVER_PROXY_A, SERVER_PROXY_B].into_iter().enumerate() {
            let text = format!(
                "# Generated by ferry cluster up: routing server-proxy.\n\
                 listen = {}\ntrackers = {}\nroute_cache_ms = {}\nstats_listen = {}\n\n\
                 {app_keys}{sp_link}",
                toml_str(&l.server_proxies[i].to_string()),
                toml_list(&l.trackers),
                spec.route_cache_ms,
                toml_str(&l.server_proxy_stats[i].to_string()),
            );
            cluster.add_generated(
                &conf_dir,
                name,
                &text,
                None,
                Role::Proxy,
                l.server_proxies[i],
            )?;
        }
        for (i, name) in [CLIENT_PROXY_A, CLIENT_PROXY_B].into_iter().enumerate() {
            let text = format!(
                "# Generated by ferry cluster up: client-proxy.\nlisten = {}\nupstreams = {}\n\
                 # Clients reach this listener: none may hold more than this many connections.\n\
                 max_connections_per_ip = {CLIENT_PROXY_PER_IP}\n\n{cp_link}{}",
                toml_str(&l.client_proxies[i].to_string()),
                toml_list(&l.server_proxies),
                cluster
                    .tls
                    .as_ref()
                    .map(LocalCa::proxy_section)
                    .unwrap_or_default(),
            );
            cluster.add_generated(
                &conf_dir,
                name,
                &text,
                None,
                Role::Proxy,
                l.client_proxies[i],
            )?;
        }
        Ok(cluster)
    }

    /// Writes a generated member config (`conf_dir/<name>.toml`) and starts the member on it.
    fn add_generated(
        &mut self,
        conf_dir: &Path,
        name: &str,
        text: &str,
        meta_env: Option<Option<String>>,
        expect: Role,
        addr: SocketAddr,
    ) -> Result<()> {
        let path = write_conf(conf_dir, name, text)?;
        let args = vec!["--config".into(), path];
        self.add(name.to_owned(), args, meta_env, expect, addr)
    }

    /// The data dir the nodes of `group` share.
    pub fn group_data(&self, group: &str) -> PathBuf {
        self.data_dir.join(group)
    }
}

/// The metadata database for `cluster up`: the flag, else FERRY_META_URL, else `meta_url` in
/// the conf dir's server.toml.
pub fn resolve_meta_url(
    flag: Option<&str>,
    env: Option<String>,
    conf_dir: &Path,
) -> Result<Option<String>> {
    if let Some(u) = flag {
        return Ok(Some(u.to_owned()));
    }
    if let Some(u) = env.filter(|u| !u.is_empty()) {
        return Ok(Some(u));
    }
    let path = conf_dir.join(format!("{SERVER}.toml"));
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ClientError::io(format!("reading {}", path.display()), e)),
    };
    let table: toml::Table = text
        .parse()
        .map_err(|e| ClientError::Cluster(format!("{}: {e}", path.display())))?;
    Ok(table
        .get("meta_url")
        .and_then(|v| v.as_str())
        .map(str::to_owned))
}

/// `ferry cluster up --nodes N --groups G`: runs a multi-node cluster in the foreground, logs
/// prefixed by member, until Ctrl-C (or until a member exits on its own).
pub fn up_groups(spec: &Spec, data: &Path, say: crate::demo::Say) -> Result<()> {
    spec.validate()?;
    let bins = crate::demo::bin_dir()?;
    let layout = GroupsLayout::fixed(spec);
    let slot: std::sync::Arc<parking_lot::Mutex<Option<Cluster>>> = Default::default();
    crate::demo::stop_on_signal(slot.clone(), None, say)?;
    let mut c = Cluster::start_groups(&bins, spec, layout.clone(), data, Logs::Prefixed)?;
    let client_conf = c.write_client_conf(CLUSTER_APP)?;
    *slot.lock() = Some(c);
    if let Some(p) = client_conf {
        say(&format!(
            "client config for this cluster (holds its app key): {}",
            p.display()
        ));
    }
    say(&format!(
        "ferry cluster up: trackers {} {}; {} group(s) x {} node(s), data in {}/<group>:",
        layout.trackers[0],
        layout.trackers[1],
        spec.groups,
        spec.nodes,
        data.display()
    ));
    for ((g, nodes), http) in layout.groups.iter().zip(&layout.http) {
        let list: Vec<String> = nodes.iter().map(|a| a.to_string()).collect();
        let gateways: Vec<String> = http.iter().map(|a| a.to_string()).collect();
        say(&format!(
            "  {g}: {} (HTTP {})",
            list.join(" "),
            gateways.join(" ")
        ));
    }
    say(&format!(
        "routing server-proxies {} {} (stats {} {}), client-proxies {} {}; metadata in {}. \
         Ctrl-C stops all.",
        layout.server_proxies[0],
        layout.server_proxies[1],
        layout.server_proxy_stats[0],
        layout.server_proxy_stats[1],
        layout.client_proxies[0],
        layout.client_proxies[1],
        spec.meta_url
            .as_deref()
            .unwrap_or("each node's embedded SQLite"),
    ));
    say(&format!(
        "try: ferry --config {} --user alice upload FILE; ferry --config {0} groups --tracker {}; \
         ferry --config {0} url --base http://{} FILE_ID (any HTTP gateway serves any file)",
        data.join("conf").join("client.toml").display(),
        layout.trackers[0],
        layout.http[0][0],
    ));
    crate::demo::watch(&slot)
}

/// The tracker's view (TRACKER_GROUPS).
pub fn tracker_groups(
    tracker: SocketAddr,
    link: Option<&SigningKey>,
) -> std::result::Result<proto::GroupsReply, String> {
    let mut c =
        proto::Caller::connect(tracker, Duration::from_secs(2), link).map_err(|e| e.to_string())?;
    let body = c
        .call(
            cmd::TRACKER_GROUPS,
            &[],
            cmd::REPLY_TRACKER,
            proto::GROUPS_REPLY_MAX,
        )
        .map_err(|e| e.to_string())?;
    proto::GroupsReply::decode(&body).map_err(|e| e.to_string())
}

/// Waits until the tracker lists `want` nodes online.
fn wait_joined(
    tracker: SocketAddr,
    link: Option<&SigningKey>,
    want: usize,
    limit: Duration,
) -> std::result::Result<(), String> {
    let t = Instant::now();
    loop {
        let seen = match tracker_groups(tracker, link) {
            Ok(v) => {
                let online = v
                    .groups
                    .iter()
                    .flat_map(|g| &g.nodes)
                    .filter(|n| n.online)
                    .count();
                if online >= want {
                    return Ok(());
                }
                format!("{online} of {want} nodes online")
            }
            Err(e) => e,
        };
        if t.elapsed() >= limit {
            return Err(format!("after {limit:?}: {seen}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(3));
    }
}

fn prefix_lines(name: &str, err: impl Read) {
    let mut out = std::io::stderr();
    for line in BufReader::new(err).lines() {
        let Ok(line) = line else { break };
        let _ = writeln!(out, "[{name:>14}] {line}");
    }
}

/// Reads a proxy's plain-text stats endpoint: `name value` lines (labelled lines are skipped).
pub fn proxy_stats(addr: SocketAddr) -> std::io::Result<std::collections::BTreeMap<String, u64>> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut text = String::new();
    s.take(64 * 1024).read_to_string(&mut text)?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(k, _)| !k.contains('{'))
        .filter_map(|(k, v)| Some((k.to_string(), v.trim().parse().ok()?)))
        .collect())
}

/// Sends a PROBE and checks the answer names the expected role.
pub fn probe(addr: SocketAddr, timeout: Duration) -> std::io::Result<Identity> {
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string());
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(&proto::frame(proto::cmd::PROBE, 0, &proto::probe_body()))?;
    let mut h = [0u8; proto::HEADER_LEN];
    s.read_exact(&mut h)?;
    let h = Header::decode(&h);
    if h.status != proto::status::OK || h.body_len > 16 {
        return Err(bad("not a ferry identity reply"));
    }
    let mut body = vec![0u8; h.body_len as usize];
    s.read_exact(&mut body)?;
    Identity::decode(&body).map_err(|e| bad(&e.to_string()))
}

fn wait_ready(addr: SocketAddr, expect: Role, limit: Duration) -> std::io::Result<()> {
    let t = Instant::now();
    loop {
        let err = match probe(addr, Duration::from_millis(500)) {
            Ok(id) if id.role == expect => return Ok(()),
            Ok(id) => std::io::Error::other(format!("answered as {:?}", id.role)),
            Err(e) => e,
        };
        if t.elapsed() >= limit {
            return Err(err);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts a member so that it never outlives this supervisor: in its own process group (a
/// Ctrl-C at the terminal reaches it only through the supervisor, which stops members in
/// order) and with a parent-death signal (SIGTERM when the supervisor dies, `kill -9`
/// included). The kernel ties that signal to the *thread* that forked, so every member is
/// forked by one thread that lives as long as the process (a member restarted from a
/// short-lived thread, like the demo's killer, would otherwise die with it).
fn spawn_member(mut cmd: Command) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt;
    use std::sync::mpsc;
    type Job = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: std::sync::OnceLock<parking_lot::Mutex<Option<mpsc::Sender<Job>>>> =
        std::sync::OnceLock::new();
    let supervisor = nix::unistd::getpid();
    cmd.process_group(0);
    // SAFETY: the closure runs between fork and exec and calls only prctl(2) and getppid(2),
    // both async-signal-safe; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)?;
            // The supervisor died between the fork and the prctl: nobody would signal us.
            if nix::unistd::getppid() != supervisor {
                return Err(std::io::Error::other("the supervisor is gone"));
            }
            Ok(())
        });
    }
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        let started = std::thread::Builder::new()
            .name("member-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            });
        parking_lot::Mutex::new(started.ok().map(|_| tx))
    });
    let gone = || std::io::Error::other("the member spawner thread is not running");
    let (tx, rx) = mpsc::channel();
    spawner
        .lock()
        .as_ref()
        .ok_or_else(gone)?
        .send((cmd, tx))
        .map_err(|_| gone())?;
    rx.recv().map_err(|_| gone())?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(nodes: usize, groups: usize, meta_url: Option<&str>) -> Spec {
        Spec {
            nodes,
            groups,
            meta_url: meta_url.map(str::to_owned),
            beat_interval_ms: 1000,
            offline_after_ms: 3000,
            route_cache_ms: 2000,
            port_base: PORT_BASE,
            tls: false,
        }
    }

    #[test]
    fn several_nodes_or_groups_need_postgres() {
        spec(1, 1, None).validate().unwrap();
        spec(2, 2, Some("postgres://u@127.0.0.1:5432/db"))
            .validate()
            .unwrap();
        for bad in [spec(2, 1, None), spec(1, 2, None)] {
            let e = bad.validate().unwrap_err().to_string();
            assert!(e.contains("--meta-url") && e.contains(META_URL_ENV), "{e}");
        }
        let e = spec(1, 2, Some("/tmp/meta.db"))
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a postgres:// URL"), "{e}");
        assert!(spec(0, 1, None).validate().is_err());
        assert!(spec(NODES_MAX + 1, 1, None).validate().is_err());
        assert!(spec(1, GROUPS_MAX + 1, None).validate().is_err());
    }

    #[test]
    fn meta_url_comes_from_flag_then_env_then_server_toml() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(resolve_meta_url(None, None, d).unwrap(), None);
        std::fs::write(
            d.join("server.toml"),
            "meta_url = \"postgres://conf@h/db\"\n",
        )
        .unwrap();
        let conf = Some("postgres://conf@h/db".to_owned());
        assert_eq!(resolve_meta_url(None, None, d).unwrap(), conf);
        assert_eq!(
            resolve_meta_url(None, Some(String::new()), d).unwrap(),
            conf
        );
        let env = Some("postgres://env@h/db".to_owned());
        assert_eq!(resolve_meta_url(None, env.clone(), d).unwrap(), env);
        assert_eq!(
            resolve_meta_url(Some("postgres://flag@h/db"), env, d).unwrap(),
            Some("postgres://flag@h/db".to_owned())
        );
    }

    #[test]
    fn fixed_layout_keeps_nodes_clear_of_the_other_ports() {
        let moved = GroupsLayout::fixed(&Spec {
            port_base: 20_000,
            ..spec(2, 1, None)
        });
        assert_eq!(moved.trackers[0].port(), 20_000);
        assert_eq!(moved.client_proxies[0].port(), 20_121);
        assert_eq!(moved.nodes()[1].2.port(), 20_302);
        let pg = Some("postgres://u@h/db");
        for bad in [80, 65_300] {
            let s = Spec {
                port_base: bad,
                ..spec(2, 2, pg)
            };
            assert!(s.validate().is_err(), "port base {bad}");
        }
        let l = GroupsLayout::fixed(&spec(NODES_MAX, 2, None));
        let nodes = l.nodes();
        assert_eq!(nodes.len(), 2 * NODES_MAX);
        assert_eq!(nodes[0].1, "g1-node1");
        assert_eq!(nodes[NODES_MAX].0, "g2");
        let mut all: Vec<SocketAddr> = nodes.iter().map(|n| n.2).collect();
        all.extend(l.trackers);
        all.extend(l.server_proxies);
        all.extend(l.server_proxy_stats);
        all.extend(l.client_proxies);
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "a port is used twice");
    }
}
