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

mod groups;
mod member;

pub use groups::*;
pub use member::{probe, proxy_stats};

use crate::localca::LocalCa;
use crate::secrets::Secrets;
use ferry_client::error::{ClientError, Result};
use ferry_common::proto::Role;
use member::{prefix_lines, spawn_member, wait_ready};
use std::io::Write;
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

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(3));
    }
}
