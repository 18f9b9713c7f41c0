//! Echo throughput of the reactor (mio, edge-triggered, worker pool) next to a plain
//! thread-per-connection blocking echo server, measured in the same run on loopback.
//!
//! `cargo bench -p ferry-common --bench echo` — env: FERRY_BENCH_MIB (default 512, bytes echoed
//! per case), FERRY_BENCH_ROUNDS (default 5). Prints MB/s median [min-max] and the ratio, and
//! the server side's CPU time per GB echoed (reactor threads vs the per-connection threads): on a
//! loaded machine MB/s mostly says which side got more CPU, CPU per GB says which side needs less.

use ferry_common::reactor::{Config, Reactor, echo::EchoService};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Sends `bytes` over each of `conns` connections and reads the echo back; returns MB/s echoed.
fn drive(addr: SocketAddr, conns: usize, bytes: u64) -> f64 {
    let per = bytes / conns as u64;
    let t = Instant::now();
    let threads: Vec<_> = (0..conns)
        .map(|_| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_nodelay(true).unwrap();
                let mut r = s.try_clone().unwrap();
                let reader = std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut got = 0u64;
                    while got < per {
                        let n = r.read(&mut buf).unwrap();
                        assert!(n > 0, "echo closed early");
                        got += n as u64;
                    }
                });
                let chunk = vec![0x5au8; 64 * 1024];
                let mut sent = 0u64;
                while sent < per {
                    let n = (per - sent).min(chunk.len() as u64) as usize;
                    s.write_all(&chunk[..n]).unwrap();
                    sent += n as u64;
                }
                reader.join().unwrap();
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    (per * conns as u64) as f64 / t.elapsed().as_secs_f64() / 1e6
}

/// CPU microseconds the baseline's connection threads used (each adds its own when it ends).
static BASELINE_CPU_US: AtomicU64 = AtomicU64::new(0);

fn this_thread_cpu_us() -> u64 {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_THREAD).map_or(0, |u| {
        let us = |t: nix::sys::time::TimeVal| t.tv_sec() as u64 * 1_000_000 + t.tv_usec() as u64;
        us(u.user_time()) + us(u.system_time())
    })
}

/// CPU microseconds used so far by the reactor's threads (named `reactor` and `worker-N`), from
/// the nanoseconds on CPU that /proc/self/task/*/schedstat reports first.
fn reactor_cpu_us() -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let comm = comm.trim();
        if comm != "reactor" && !comm.starts_with("worker-") {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        let ns: u64 = stat
            .split(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        total += ns / 1000;
    }
    total
}

/// The baseline: one blocking thread per connection, 64 KiB buffer.
fn thread_echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                let mut r = s;
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = r.read(&mut buf) {
                    if n == 0 || w.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                BASELINE_CPU_US.fetch_add(this_thread_cpu_us(), Ordering::Relaxed);
            });
        }
    });
    addr
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() {
    let mib = env_u64("FERRY_BENCH_MIB", 512);
    let rounds = env_u64("FERRY_BENCH_ROUNDS", 5).max(1);
    let bytes = mib << 20;
    let listener = ferry_common::net::listen("127.0.0.1:0".parse().unwrap(), 1024).unwrap();
    let cfg = Config {
        workers: 2,
        ..Config::default()
    };
    let reactor = Reactor::new(cfg, vec![listener]).unwrap();
    let reactor_addr = reactor.local_addrs()[0];
    let handle = reactor.handle();
    let svc = Arc::new(EchoService::new(Arc::new(AtomicUsize::new(0))));
    let rt = std::thread::Builder::new()
        .name("reactor".into())
        .spawn(move || reactor.run(svc))
        .unwrap();
    let base_addr = thread_echo();
    println!("echo benchmark: {mib} MiB per case, {rounds} rounds, loopback");
    println!(
        "{:>6} {:>26} {:>26} {:>7} {:>22}",
        "conns",
        "reactor MB/s med [min-max]",
        "threads MB/s med [min-max]",
        "ratio",
        "CPU ms/GB reactor|thr"
    );
    for conns in [1usize, 8, 64] {
        let (mut r, mut b) = (Vec::new(), Vec::new());
        let (mut rc, mut bc) = (0u64, 0u64);
        for _ in 0..rounds {
            // Alternate so drift in machine load hits both sides alike.
            let c0 = reactor_cpu_us();
            r.push(drive(reactor_addr, conns, bytes));
            rc += reactor_cpu_us() - c0;
            let c0 = BASELINE_CPU_US.load(Ordering::Relaxed);
            b.push(drive(base_addr, conns, bytes));
            // The connection threads add their time as they end, just after the clients do.
            std::thread::sleep(std::time::Duration::from_millis(50));
            bc += BASELINE_CPU_US.load(Ordering::Relaxed) - c0;
        }
        let gb = (bytes * rounds) as f64 / 1e9;
        let (rm, rl, rh) = stats(r);
        let (bm, bl, bh) = stats(b);
        println!(
            "{conns:>6} {:>26} {:>26} {:>7.2} {:>22}",
            format!("{rm:.0} [{rl:.0}-{rh:.0}]"),
            format!("{bm:.0} [{bl:.0}-{bh:.0}]"),
            rm / bm,
            format!("{:.0}|{:.0}", rc as f64 / 1e3 / gb, bc as f64 / 1e3 / gb)
        );
    }
    handle.shutdown();
    rt.join().unwrap().unwrap();
}
