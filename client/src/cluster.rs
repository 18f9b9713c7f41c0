//! A local ferry cluster as child processes: one server, a server-proxy pair and a client-proxy
//! pair, all on loopback, started from the binaries next to the running `ferry` and the configs
//! in `conf/`. `ferry demo`, `ferry cluster up` and the chaos tests run on it.
//!
//! Processes are started in dependency order and each is waited for until it answers a PROBE with
//! the right identity. Every child is killed and reaped when the cluster is dropped, so no test
//! or interrupted demo leaves processes behind.

use crate::error::{ClientError, Result};
use ferry_common::proto::{self, Header, Identity, Role};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Names of the cluster's members, in start order.
pub const SERVER: &str = "server";
pub const SERVER_PROXY_A: &str = "server-proxy-a";
pub const SERVER_PROXY_B: &str = "server-proxy-b";
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
    name: &'static str,
    args: Vec<String>,
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
    pub layout: Layout,
    pub data_dir: PathBuf,
}

impl Cluster {
    /// Starts the five members from `bin_dir` with the configs in `conf_dir`, listening where
    /// `layout` says (flags override the configs' addresses), and waits until all answer.
    pub fn start(
        bin_dir: &Path,
        conf_dir: &Path,
        layout: Layout,
        data_dir: &Path,
        logs: Logs,
    ) -> Result<Cluster> {
        let conf = |name: &str| conf_dir.join(format!("{name}.toml")).display().to_string();
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
            data_dir: data_dir.to_path_buf(),
        };
        for (name, args, expect, addr) in plan {
            cluster.members.push(Member {
                name,
                args,
                expect,
                addr,
                child: None,
                restarts: 0,
            });
            cluster.start_member(name)?;
        }
        Ok(cluster)
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
        let exe = bin_dir.join(if m.name == SERVER {
            "ferry-server"
        } else {
            "ferry-proxy"
        });
        let mut cmd = Command::new(&exe);
        cmd.args(&m.args).stdin(Stdio::null()).stdout(Stdio::null());
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
        let mut child = cmd
            .spawn()
            .map_err(|e| ClientError::io(format!("starting {} ({})", m.name, exe.display()), e))?;
        if let (Logs::Prefixed, Some(err)) = (&logs, child.stderr.take()) {
            let name = m.name;
            std::thread::spawn(move || prefix_lines(name, err));
        }
        m.child = Some(child);
        let (addr, expect) = (m.addr, m.expect);
        wait_ready(addr, expect, Duration::from_secs(10))
            .map_err(|e| ClientError::Cluster(format!("{name} at {addr} did not come up: {e}")))
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
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        self.members
            .iter()
            .filter_map(|m| m.child.as_ref().map(|c| (m.name, c.id())))
            .collect()
    }

    /// Members that exited on their own (not killed through this cluster).
    pub fn exited(&mut self) -> Vec<&'static str> {
        let mut dead = Vec::new();
        for m in &mut self.members {
            if let Some(c) = m.child.as_mut()
                && !matches!(c.try_wait(), Ok(None))
            {
                dead.push(m.name);
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
