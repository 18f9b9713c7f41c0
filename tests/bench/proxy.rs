//! Proxy throughput and memory benchmark: `cargo bench --bench proxy`.
//!
//! Streams 1 GiB (FERRY_BENCH_BYTES) over loopback into a sink, in the same run and interleaved:
//! directly, through one ferry-proxy, through a two-proxy chain (client-proxy -> server-proxy),
//! the same two in userspace-buffer mode, and through HAProxy `mode tcp` (one and two hops) when
//! `haproxy` is installed (skipped with a message otherwise). Each topology runs
//! FERRY_BENCH_RUNS times (default 5); printed: median and min-max MB/s, the median's ratio to
//! the direct stream, and the proxies' CPU seconds per GiB (utime+stime from /proc/PID/stat).
//! FERRY_BENCH_PROXY_CONF adds TOML lines to every ferry-proxy config (e.g. "pipe_size = 1048576").
//! The last column is this process's own CPU (the client and sink threads) per GiB: on a small
//! box every hop's CPU comes out of the same cores, so it shows how much is left for proxies.
//! Then one proxy's RSS with 1000 concurrent sessions, each having pushed 64 KiB through.

#[path = "../e2e/support/mod.rs"]
mod support;

use ferry_common::proto::{self, Identity, Role, cmd};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::{env_u64, free_addr, median, rss_kib};

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// A sink: answers PROBE with a server identity; otherwise skips the HELLO frame, reads to EOF
/// and replies with the byte count (so the sender knows everything arrived).
fn start_sink() -> SocketAddr {
    let l = ferry_common::net::listen("127.0.0.1:0".parse().unwrap(), 4096).unwrap();
    l.set_nonblocking(false).unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || sink(s));
        }
    });
    addr
}

fn sink(mut s: TcpStream) {
    let Ok((h, _)) = support::raw::read_frame(&mut s, 1024) else {
        return;
    };
    if h.cmd == cmd::PROBE {
        let id = Identity {
            version: proto::VERSION,
            role: Role::Server,
        };
        let _ = s.write_all(&proto::frame(cmd::REPLY_STORAGE, 0, &id.encode()));
        return;
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => n += k as u64,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
    let _ = s.write_all(&n.to_be_bytes());
}

fn hello() -> Vec<u8> {
    proto::frame(cmd::HELLO, 0, &support::auth::hello_body("bench", "bench"))
}

/// Streams `bytes` to `addr` and waits for the sink's count; returns the seconds taken.
fn stream(addr: SocketAddr, bytes: u64) -> f64 {
    let buf = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&hello()).unwrap();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    s.shutdown(Shutdown::Write).unwrap();
    let mut got = [0u8; 8];
    s.read_exact(&mut got).unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(
        u64::from_be_bytes(got),
        bytes,
        "sink saw a different byte count"
    );
    secs
}

struct Proc {
    child: Child,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_connectable(addr: SocketAddr, log: &Path) {
    let t = Instant::now();
    while TcpStream::connect(addr).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{addr} never listened: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ferry_proxy(dir: &Path, name: &str, upstream: SocketAddr, extra: &str) -> (Proc, SocketAddr) {
    let addr = free_addr();
    let conf = dir.join(format!("{name}.toml"));
    std::fs::write(
        &conf,
        format!(
            "listen = \"{addr}\"\nupstreams = [\"{upstream}\"]\nmax_connections = 4000\n\
             idle_timeout_ms = 600000\n{extra}\n{}\n",
            std::env::var("FERRY_BENCH_PROXY_CONF").unwrap_or_default()
        ),
    )
    .unwrap();
    let log = dir.join(format!("{name}.log"));
    let child = Command::new(env!("CARGO_BIN_EXE_ferry-proxy"))
        .arg("--config")
        .arg(&conf)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_connectable(addr, &log);
    (Proc { child }, addr)
}

fn haproxy_path() -> Option<PathBuf> {
    [
        "/usr/sbin/haproxy",
        "/usr/bin/haproxy",
        "/usr/local/sbin/haproxy",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

fn haproxy(
    bin: &Path,
    dir: &Path,
    name: &str,
    upstream: SocketAddr,
    options: &str,
) -> (Proc, SocketAddr) {
    let addr = free_addr();
    let conf = dir.join(format!("{name}.cfg"));
    // Two threads, like ferry-proxy's two workers on this box.
    std::fs::write(
        &conf,
        format!(
            "global\n  maxconn 4000\n  nbthread 2\n\ndefaults\n  mode tcp\n  timeout connect 2s\n  \
             timeout client 600s\n  timeout server 600s\n{options}\nlisten relay\n  bind {addr}\n  \
             server up {upstream}\n"
        ),
    )
    .unwrap();
    let log = dir.join(format!("{name}.log"));
    let child = Command::new(bin)
        .arg("-db")
        .arg("-f")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_connectable(addr, &log);
    (Proc { child }, addr)
}

/// utime + stime of a process in seconds (USER_HZ is 100 on Linux).
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) as f64 / 100.0
}

struct Topology {
    name: String,
    entry: SocketAddr,
    pids: Vec<u32>,
    mbps: Vec<f64>,
    cpu_per_gib: Vec<f64>,
    /// CPU of this process (client and sink threads) per GiB.
    ends_per_gib: Vec<f64>,
    _procs: Vec<Proc>,
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would too. Nothing to filter.
    let bytes = env_u64("FERRY_BENCH_BYTES", 1 << 30);
    let runs = env_u64("FERRY_BENCH_RUNS", 5).max(1) as usize;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sink = start_sink();
    let mut tops = Vec::new();
    let mut add = |name: &str, entry: SocketAddr, procs: Vec<Proc>| {
        tops.push(Topology {
            name: name.into(),
            entry,
            pids: procs.iter().map(Proc::pid).collect(),
            mbps: Vec::new(),
            cpu_per_gib: Vec::new(),
            ends_per_gib: Vec::new(),
            _procs: procs,
        });
    };
    add("direct loopback", sink, vec![]);
    let (p1, a1) = ferry_proxy(d, "one", sink, "");
    add("ferry 1 proxy (splice)", a1, vec![p1]);
    let (sp, sa) = ferry_proxy(d, "server-proxy", sink, "");
    let (cp, ca) = ferry_proxy(d, "client-proxy", sa, "");
    add("ferry 2-proxy chain (splice)", ca, vec![cp, sp]);
    let (u1, ua) = ferry_proxy(d, "one-u", sink, "zero_copy = false");
    add("ferry 1 proxy (userspace)", ua, vec![u1]);
    let (usp, usa) = ferry_proxy(d, "server-proxy-u", sink, "zero_copy = false");
    let (ucp, uca) = ferry_proxy(d, "client-proxy-u", usa, "zero_copy = false");
    add("ferry 2-proxy chain (userspace)", uca, vec![ucp, usp]);
    match haproxy_path() {
        Some(bin) => {
            let (h1, ha) = haproxy(&bin, d, "ha-one", sink, "");
            add("haproxy 1 proxy (mode tcp)", ha, vec![h1]);
            let (hs, hsa) = haproxy(&bin, d, "ha-server", sink, "");
            let (hc, hca) = haproxy(&bin, d, "ha-client", hsa, "");
            add("haproxy 2-proxy chain (mode tcp)", hca, vec![hc, hs]);
            // HAProxy's own kernel splicing, off by default.
            let splice = "  option splice-auto\n";
            let (h1, ha) = haproxy(&bin, d, "ha-one-s", sink, splice);
            add("haproxy 1 proxy (splice-auto)", ha, vec![h1]);
            let (hs, hsa) = haproxy(&bin, d, "ha-server-s", sink, splice);
            let (hc, hca) = haproxy(&bin, d, "ha-client-s", hsa, splice);
            add("haproxy 2-proxy chain (splice-auto)", hca, vec![hc, hs]);
        }
        None => println!("haproxy not installed: skipping the HAProxy comparison"),
    }
    println!(
        "streaming {:.2} GiB per run, {runs} runs per topology, interleaved",
        bytes as f64 / GIB
    );
    for run in 0..runs {
        for t in tops.iter_mut() {
            let me = std::process::id();
            let cpu0: f64 = t.pids.iter().map(|&p| cpu_secs(p)).sum();
            let ends0 = cpu_secs(me);
            let secs = stream(t.entry, bytes);
            let cpu1: f64 = t.pids.iter().map(|&p| cpu_secs(p)).sum();
            let ends1 = cpu_secs(me);
            let gib = bytes as f64 / GIB;
            t.mbps.push(bytes as f64 / 1e6 / secs);
            t.cpu_per_gib.push((cpu1 - cpu0) / gib);
            t.ends_per_gib.push((ends1 - ends0) / gib);
        }
        eprintln!("run {}/{runs} done", run + 1);
    }
    let direct = median(&tops[0].mbps).0;
    println!(
        "{:<36} {:>7} {:>11} {:>6} {:>20} {:>16}",
        "topology", "MB/s", "min-max", "ratio", "proxy CPU s/GiB", "client+sink CPU"
    );
    for t in &tops {
        let (m, lo, hi) = median(&t.mbps);
        let cpu = if t.pids.is_empty() {
            "-".to_string()
        } else {
            let (c, clo, chi) = median(&t.cpu_per_gib);
            format!("{c:.2} ({clo:.2}-{chi:.2})")
        };
        let ends = median(&t.ends_per_gib).0;
        println!(
            "{:<36} {m:>7.0} {:>11} {:>5.0}% {cpu:>20} {ends:>16.2}",
            t.name,
            format!("{lo:.0}-{hi:.0}"),
            100.0 * m / direct
        );
    }
    drop(tops);
    concurrent_rss(d, sink, "");
    concurrent_rss(d, sink, "zero_copy = false");
}

/// One proxy's RSS with 1000 concurrent sessions that have each pushed 64 KiB through.
fn concurrent_rss(dir: &Path, sink: SocketAddr, extra: &str) {
    let (p, addr) = ferry_proxy(dir, "rss", sink, extra);
    let pid = p.pid();
    std::thread::sleep(Duration::from_millis(200));
    let base = rss_kib(pid as i32);
    let chunk = vec![1u8; 64 * 1024];
    let mut live = Vec::new();
    for _ in 0..1000 {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(&hello()).unwrap();
        s.write_all(&chunk).unwrap();
        live.push(s);
    }
    // Let the bytes cross, then measure.
    std::thread::sleep(Duration::from_millis(1000));
    let peak = rss_kib(pid as i32);
    for s in &live {
        let _ = s.shutdown(Shutdown::Write);
    }
    let mut ok = 0;
    for mut s in live {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = [0u8; 8];
        if s.read_exact(&mut got).is_ok() && u64::from_be_bytes(got) == chunk.len() as u64 {
            ok += 1;
        }
    }
    let mode = if extra.is_empty() {
        "splice"
    } else {
        "userspace"
    };
    println!(
        "ferry 1 proxy ({mode}) RSS: {base} KiB idle, {peak} KiB with 1000 concurrent sessions \
         ({ok}/1000 delivered 64 KiB each); target < 65536 KiB"
    );
}
