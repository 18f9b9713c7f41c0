//! Shared helpers for the end-to-end tests: free loopback ports, child processes that are
//! always killed (even when a test panics), readiness probes, and test data.
#![allow(dead_code)] // each test binary uses a different subset

pub mod auth;
pub mod cli;
pub mod pg_server;
pub mod procs;
pub mod raw;
pub mod server;

use ferry_common::proto::{self, Identity};
use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Test ports come from here, below the kernel's ephemeral range: a port of a server a test has
/// killed must not be taken as the source port of some client connection before the server
/// starts again on it (a restart would then fail to bind). `ferry cluster up` tests take their
/// fixed blocks of ports from below 20000.
const TEST_PORTS_FROM: u16 = 20_000;

/// The kernel's ephemeral port range (`ip_local_port_range`; Linux's default if unreadable).
fn ephemeral_ports() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| {
            let mut it = t.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32_768, 60_999))
}

/// A loopback port that is free now, never one this test process handed out before (tests run
/// in parallel threads, and two of them getting the same port would start two servers racing
/// for it), and outside the ephemeral range when there is room below it.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let (lo, hi) = ephemeral_ports();
    let (from, to) = if lo > TEST_PORTS_FROM + 1000 {
        (TEST_PORTS_FROM, lo - 1)
    } else {
        (hi.saturating_add(1).max(1024), u16::MAX)
    };
    let span = u64::from(to - from) + 1;
    let seed = u64::from(std::process::id()).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for i in 0..20_000u64 {
        let port = from + ((seed.wrapping_add(i.wrapping_mul(7919))) % span) as u16;
        let mut given = GIVEN.lock().unwrap();
        if given.contains(&port) || TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        given.push(port);
        return port;
    }
    panic!("no fresh loopback port in {from}..={to}");
}

pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Paths of the real binaries built by Cargo for this test run.
pub fn bin(name: &str) -> PathBuf {
    match name {
        "ferry" => PathBuf::from(env!("CARGO_BIN_EXE_ferry")),
        "ferry-proxy" => PathBuf::from(env!("CARGO_BIN_EXE_ferry-proxy")),
        "ferry-server" => PathBuf::from(env!("CARGO_BIN_EXE_ferry-server")),
        other => panic!("unknown binary {other}"),
    }
}

/// A child process that is killed and reaped when dropped. Its stderr goes to a log file in the
/// test's temp dir so a failure can show what the process said.
pub struct Proc {
    pub name: String,
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log_dir: &Path) -> Proc {
        let log = log_dir.join(format!("{name}.log"));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        // The test's RUST_LOG (default info), unless the command set its own level.
        if !cmd.get_envs().any(|(k, _)| k == "RUST_LOG") {
            cmd.env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            );
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            name: name.into(),
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("process running").id() as i32
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig);
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the process to exit by itself, up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let t = Instant::now();
        while t.elapsed() < limit {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                self.child = None;
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- {} log ----\n{}", self.name, self.log_text());
        }
    }
}

/// Sends a PROBE and returns who answered, or None if nothing ferry-like answered in time.
pub fn probe(addr: SocketAddr, timeout: Duration) -> Option<Identity> {
    proto::probe(addr, timeout).ok()
}

/// Waits until `addr` answers a PROBE, up to `limit`; panics with the process log otherwise.
pub fn wait_ready(addr: SocketAddr, limit: Duration) -> Identity {
    let t = Instant::now();
    loop {
        if let Some(id) = probe(addr, Duration::from_millis(500)) {
            return id;
        }
        assert!(
            t.elapsed() < limit,
            "{addr} did not answer a PROBE within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// `len` bytes of deterministic pseudo-random data (xorshift64, seeded).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let mut x = seed | 1;
    for c in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    v
}

/// Writes `size` bytes of deterministic pseudo-random data (xorshift, seeded) to `path`, in
/// 64 KiB pieces so memory does not grow with the size.
pub fn make_file(path: &Path, size: u64, seed: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut left = size;
    let mut piece = 0u64;
    while left > 0 {
        let n = left.min(1 << 16) as usize;
        // Each piece has its own seed, derived from the file's, so pieces differ.
        let seed = seed.wrapping_add(piece.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        f.write_all(&random_bytes(n, seed)).unwrap();
        left -= n as u64;
        piece += 1;
    }
    f.flush().unwrap();
}

/// A number from the environment (benchmark and test knobs), or `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Median, min and max of benchmark samples (the mean of the two middle ones for an even count).
pub fn median(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    let mid = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    (mid, s[0], s[n - 1])
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

/// Resident set size of a process in KiB (from /proc), 0 if it is gone.
pub fn rss_kib(pid: i32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// The largest resident set size a process had, in KiB (0 if it is gone).
pub fn peak_rss_kib(pid: i32) -> u64 {
    status_kib(pid, "VmHWM:")
}

/// A KiB figure of /proc/<pid>/status (`field` with its colon).
fn status_kib(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Every regular file under `dir`, recursively (none if it does not exist).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => todo.push(e.path()),
                Ok(t) if t.is_file() => out.push(e.path()),
                _ => {}
            }
        }
    }
    out
}

/// How many regular files are under `dir`, recursively (0 if it does not exist).
pub fn count_files(dir: &Path) -> usize {
    files_under(dir).len()
}

/// Number of open file descriptors of a process.
pub fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Whether the command-line tool `tool` is installed. In CI (`CI` set) a missing tool is a test
/// failure, because `.ci/run` installs every tool the tests use; elsewhere the caller skips,
/// and this says so.
pub fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var("CI").is_err(),
            "{tool} is not installed (CI must install it: .ci/run)"
        );
        eprintln!("SKIPPED: {tool} is not installed (apt-get install it to run this test)");
    }
    found
}

/// A throwaway PostgreSQL database on the server `FERRY_PG_URL` names, dropped (with its
/// connections) when this is dropped.
pub struct PgDb {
    admin: String,
    name: String,
    /// The database's URL, for `meta_url` / `FERRY_META_URL`.
    pub url: String,
}

/// A fresh database, or None with a "skipped" note when `FERRY_PG_URL` is unset. With
/// `CI=true` an unset `FERRY_PG_URL` fails the test instead: CI must run the PostgreSQL tests.
pub fn pg_db(test: &str) -> Option<PgDb> {
    let admin = match std::env::var("FERRY_PG_URL") {
        Ok(u) if !u.is_empty() => u,
        _ => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{test}: FERRY_PG_URL unset, but CI=true requires the PostgreSQL tests"
            );
            eprintln!("{test}: skipped: FERRY_PG_URL unset");
            return None;
        }
    };
    let name = format!("ferry_e2e_{}", hex::encode(random_bytes(8, seed_now())));
    let mut c = postgres::Client::connect(&admin, postgres::NoTls).expect("connect FERRY_PG_URL");
    c.batch_execute(&format!("CREATE DATABASE {name}"))
        .expect("create test database");
    let url = with_dbname(&admin, &name);
    Some(PgDb { admin, name, url })
}

fn seed_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        ^ u64::from(std::process::id())
}

/// `postgres://user@host:port/db?opts` with the database replaced by `name`.
pub fn with_dbname(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[after_scheme..]
        .find('/')
        .map_or(base.len(), |i| after_scheme + i);
    format!("{}/{name}{query}", &base[..host_end])
}

impl Drop for PgDb {
    fn drop(&mut self) {
        match postgres::Client::connect(&self.admin, postgres::NoTls) {
            Ok(mut c) => {
                let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
                if let Err(e) = c.batch_execute(&sql) {
                    eprintln!("cannot drop test database {}: {e}", self.name);
                }
            }
            Err(e) => eprintln!("cannot drop test database {}: {e}", self.name),
        }
    }
}

/// A `ferry-server` on `addr` over `data`, with `conf` as its config file (written to
/// `dir/<name>.toml`; the test app keys of [`auth`] are appended unless `conf` has `[auth`). `program` is the command to start: the server itself, or a wrapper
/// (`fiu-run -x`, `prlimit ...`) already given the server's path as its argument.
pub fn server_command(
    mut program: Command,
    dir: &Path,
    name: &str,
    conf: &str,
    addr: SocketAddr,
    data: &Path,
) -> Command {
    let path = dir.join(format!("{name}.toml"));
    let conf = if conf.contains("[auth") {
        conf.to_owned()
    } else {
        format!("{conf}\n{}", auth::auth_toml())
    };
    std::fs::write(&path, conf).unwrap();
    program
        .arg("--config")
        .arg(&path)
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--data")
        .arg(data);
    program
}

/// Starts `ferry-server` (see [`server_command`]) and waits until it answers a PROBE.
pub fn start_server(dir: &Path, name: &str, conf: &str, addr: SocketAddr, data: &Path) -> Proc {
    let mut cmd = server_command(
        Command::new(bin("ferry-server")),
        dir,
        name,
        conf,
        addr,
        data,
    );
    let p = Proc::spawn(name, &mut cmd, dir);
    wait_ready(addr, Duration::from_secs(15));
    p
}

/// Waits until `p`'s log contains `needle`, up to `limit`.
pub fn wait_log(p: &Proc, needle: &str, limit: Duration) {
    let t = Instant::now();
    while !p.log_text().contains(needle) {
        assert!(
            t.elapsed() < limit,
            "{}: no {needle:?} in its log within {limit:?}\n{}",
            p.name,
            p.log_text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A process run in a process group of its own (`ferry demo`, `ferry cluster up`): if the test
/// fails before it stopped the run, the whole group (the run and every member it started) is killed,
/// so a failing test leaves nothing behind.
pub struct Group(pub std::process::Child);

impl Group {
    pub fn spawn(cmd: &mut Command) -> Group {
        use std::os::unix::process::CommandExt;
        Group(cmd.process_group(0).spawn().unwrap())
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let group = nix::unistd::Pid::from_raw(self.0.id() as i32);
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
            let _ = self.0.wait();
        }
    }
}

/// Waits until `done()` is true: polled every millisecond for the first 50 ms (a test that
/// acts at a moment, like a kill at some progress, is not late), then every 10 ms; after
/// `limit` the test fails, saying what it waited for.
pub fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let t = Instant::now();
    while !done() {
        let waited = t.elapsed();
        assert!(
            waited < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        let poll = if waited < Duration::from_millis(50) {
            1
        } else {
            10
        };
        std::thread::sleep(Duration::from_millis(poll));
    }
}

/// Reads `ferry`'s stderr until a line contains `needle` (30 s at most); a failure shows what
/// it said instead.
pub fn wait_for_line(err: &mut impl BufRead, needle: &str) {
    let t = Instant::now();
    let mut said = String::new();
    loop {
        let from = said.len();
        let n = err.read_line(&mut said).unwrap();
        if said[from..].contains(needle) {
            return;
        }
        let tail = &said[said.len().saturating_sub(4000)..];
        assert!(n > 0, "ended before {needle:?}; it said:\n{tail}");
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no {needle:?} in 30 s; it said:\n{tail}"
        );
    }
}

/// Sends SIGINT (Ctrl-C) and waits for the exit status (20 s at most).
pub fn interrupt(child: &mut std::process::Child) -> std::process::ExitStatus {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let t = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "SIGINT ignored");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The frames of a tenant reaching for the control plane: a node of its own in group `g1`
/// (JOIN, BEAT), the route of another user of `app`, the cluster's view and the users of
/// `g1`. A user's session must get error 6 for each and be closed.
pub fn control_plane_attempts(app: &str) -> Vec<Vec<u8>> {
    use ferry_common::proto::{self, NodeHello, SaddrsReq, UsersReq, cmd};
    let node = NodeHello {
        group: "g1".into(),
        host: "127.0.0.1".into(),
        port: 7401,
        version: proto::VERSION,
        started: 1,
        free: 1 << 40,
        http: None,
    };
    let saddrs = SaddrsReq {
        app: app.into(),
        user: "bob".into(),
        file_id: String::new(),
    };
    let users = UsersReq {
        group: "g1".into(),
        after: (String::new(), String::new()),
        limit: 10,
    };
    vec![
        proto::frame(cmd::TRACKER_JOIN, 0, &node.encode_join().unwrap()),
        proto::frame(cmd::TRACKER_BEAT, 0, &node.encode_beat().unwrap()),
        proto::frame(cmd::TRACKER_SADDRS, 0, &saddrs.encode().unwrap()),
        proto::frame(cmd::TRACKER_GROUPS, 0, &[]),
        proto::frame(cmd::TRACKER_USERS, 0, &users.encode().unwrap()),
    ]
}
