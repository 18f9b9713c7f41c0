//! `cargo bench --bench cluster`: the tracker role over loopback, on the embedded backend and
//! on PostgreSQL in the same run (PostgreSQL from `FERRY_PG_URL`, in a scratch database dropped
//! at the end; without it only the embedded rows are printed): SADDRS requests/s with 1 and 8
//! client threads over `FERRY_BENCH_USERS` users (default 1000, all routed before timing: the
//! steady state a proxy sees).
//!
//! Each client thread keeps one connection and sends one request at a time. Every measurement
//! lasts `FERRY_BENCH_SECS` (default 2) and runs `FERRY_BENCH_RUNS` times (default 3): median
//! and min-max.

#[path = "../e2e/support/mod.rs"]
mod support;

use ferry_common::proto::{self, Caller, NodeHello, SADDRS_REPLY_MAX, SaddrsReq, cmd};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use support::server::Server;
use support::{env_u64, median};

const T: Duration = Duration::from_secs(5);

fn start(dir: &Path, name: &str, conf: &str, meta_url: Option<&str>) -> Server {
    let mut server = Command::new(env!("CARGO_BIN_EXE_ferry-server"));
    server.env("RUST_LOG", "warn");
    match meta_url {
        Some(u) => server.env("FERRY_META_URL", u),
        None => server.env_remove("FERRY_META_URL"),
    };
    let conf = format!("workers = 4\nidle_timeout_ms = 600000\n{conf}\n");
    let own = dir.join(name);
    std::fs::create_dir_all(&own).unwrap();
    Server::start_under(server, &own, &dir.join(format!("{name}-data")), &conf)
}

/// Runs `threads` clients for `secs`; each calls `op` in a loop and returns how many units
/// (ids, requests) it completed. Returns units per second.
fn rate(
    threads: usize,
    secs: Duration,
    op: impl Fn(&mut Caller) -> u64 + Sync,
    addr: SocketAddr,
) -> f64 {
    let t0 = Instant::now();
    let total: u64 = std::thread::scope(|sc| {
        let js: Vec<_> = (0..threads)
            .map(|_| {
                let op = &op;
                sc.spawn(move || {
                    let mut c = Caller::connect(addr, T, None).unwrap();
                    let mut n = 0;
                    while t0.elapsed() < secs {
                        n += op(&mut c);
                    }
                    n
                })
            })
            .collect();
        js.into_iter().map(|j| j.join().unwrap()).sum()
    });
    total as f64 / t0.elapsed().as_secs_f64()
}

fn saddrs_body(user: u64) -> Vec<u8> {
    SaddrsReq {
        app: "bench".into(),
        user: format!("user{user}"),
        file_id: String::new(),
    }
    .encode()
    .unwrap()
}

fn saddrs(c: &mut Caller, user: u64) -> u64 {
    let b = c
        .call(
            cmd::TRACKER_SADDRS,
            &saddrs_body(user),
            cmd::REPLY_TRACKER,
            SADDRS_REPLY_MAX,
        )
        .unwrap();
    assert!(!b.is_empty());
    1
}

fn report(what: &str, samples: &[f64], unit: &str) {
    let (m, lo, hi) = median(samples);
    println!("{what:<44} {m:>12.0} {unit}  (min {lo:.0}, max {hi:.0})");
}

fn bench_backend(label: &str, dir: &Path, url: Option<&str>, runs: usize, secs: Duration) {
    let users = env_u64("FERRY_BENCH_USERS", 1000).max(1);
    let tracker = start(
        dir,
        &format!("tracker-{label}"),
        "roles = [\"tracker\"]\n[tracker]\noffline_after_ms = 600000\ngroups = [\"g1\", \"g2\"]\n",
        url,
    );
    for (g, port) in [("g1", 7401u16), ("g2", 7402)] {
        let j = NodeHello {
            group: g.into(),
            host: "127.0.0.1".into(),
            port,
            version: proto::VERSION,
            started: 1,
            free: 1 << 30,
            http: None,
        };
        proto::call_once(
            tracker.addr,
            T,
            None,
            cmd::TRACKER_JOIN,
            &j.encode_join().unwrap(),
            cmd::REPLY_TRACKER,
            4,
        )
        .unwrap();
    }
    // Route every user once (the assignments hit the database), then time the steady state.
    let t0 = Instant::now();
    let mut c = Caller::connect(tracker.addr, T, None).unwrap();
    for u in 0..users {
        saddrs(&mut c, u);
    }
    let first = users as f64 / t0.elapsed().as_secs_f64();
    println!("{label}: SADDRS first assignment of {users} users (1 thread)    {first:>12.0} req/s");
    for threads in [1usize, 8] {
        let s: Vec<f64> = (0..runs)
            .map(|_| {
                let next = std::sync::atomic::AtomicU64::new(0);
                rate(
                    threads,
                    secs,
                    |c| {
                        saddrs(
                            c,
                            next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % users,
                        )
                    },
                    tracker.addr,
                )
            })
            .collect();
        report(
            &format!("{label}: SADDRS, {threads} thread(s)"),
            &s,
            "req/s",
        );
    }
}

fn main() {
    let runs = env_u64("FERRY_BENCH_RUNS", 3).max(1) as usize;
    let secs = Duration::from_secs(env_u64("FERRY_BENCH_SECS", 2).max(1));
    let dir = tempfile::tempdir().unwrap();
    println!("cluster roles over loopback: {runs} runs of {secs:?} each, median (min, max)");
    bench_backend("embedded", dir.path(), None, runs, secs);
    let Ok(admin) = std::env::var("FERRY_PG_URL") else {
        println!("postgres: skipped (FERRY_PG_URL unset)");
        return;
    };
    let name = format!("ferry_bench_{:016x}", rand::random::<u64>());
    let mut c = postgres::Client::connect(&admin, postgres::NoTls).unwrap();
    c.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
    let url = match admin.rfind('/') {
        Some(i) if i > admin.find("://").map_or(0, |j| j + 2) => format!("{}/{name}", &admin[..i]),
        _ => format!("{admin}/{name}"),
    };
    bench_backend("postgres", dir.path(), Some(&url), runs, secs);
    let _ = c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
}
