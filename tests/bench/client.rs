//! `cargo bench --bench client`: the `ferry` client binary moving one file (default 1 GiB,
//! `FERRY_BENCH_MB`) with 1, 2 and 4 threads, through the two-hop chain client -> client-proxy ->
//! server-proxy -> server, next to the same transfer straight to the server and through the
//! same chain with the client leg on TLS (a client-proxy with `[tls]`, the client with
//! `tls://` and `--ca`), in one run.
//!
//! Each configuration runs `FERRY_BENCH_RUNS` times (default 3), direct, chain and TLS chain
//! interleaved so drift hits all; the table shows median and min-max MB/s (10^6 bytes/s of file
//! size over the `ferry` process's wall time, which for uploads includes hashing the file before
//! UPLOAD_INIT), chain/direct and TLS chain/chain as ratios of medians. Every upload changes the file's first 8 bytes so no
//! upload is an instant (dedup) upload. The server runs with `sync_blocks = false` (page cache)
//! so the numbers show the client and relay rather than the disk; `FERRY_BENCH_SYNC=1` turns
//! per-block fdatasync back on.

#[path = "../e2e/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{Proc, bin, env_u64, free_addr, make_file, median, wait_ready};

/// Where a transfer goes: a proxy list entry (`host:port` or `tls://host:port`), and the CA
/// file for TLS.
struct Via {
    proxy: String,
    ca: Option<String>,
}

fn ferry(state: &Path, via: &Via, args: &[&str]) -> (Duration, String) {
    let t = Instant::now();
    let mut cmd = Command::new(bin("ferry"));
    if let Some(ca) = &via.ca {
        cmd.arg("--ca").arg(ca);
    }
    let out = cmd
        .env("FERRY_KEY", support::auth::key_env())
        .env("FERRY_STATE_DIR", state)
        .env_remove("FERRY_PROXIES")
        .arg("--proxy")
        .arg(&via.proxy)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ferry");
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "ferry {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (took, String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let mb = env_u64("FERRY_BENCH_MB", 1024);
    let runs = env_u64("FERRY_BENCH_RUNS", 3).max(1) as usize;
    let sync = env_u64("FERRY_BENCH_SYNC", 0) == 1;
    let size = mb << 20;
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    let srv =
        support::server::Server::start_in(d, &d.join("data"), &format!("sync_blocks = {sync}\n"));
    let server = srv.addr;
    let ca =
        ferry_supervisor::localca::LocalCa::make(&d.join("ca"), &["127.0.0.1".parse().unwrap()])
            .expect("local CA");
    let proxy = |name: &str, up: SocketAddr, tls: bool| {
        let addr = free_addr();
        let conf = d.join(format!("{name}.toml"));
        let c = ferry_proxy::config::Config {
            listen: addr,
            upstreams: vec![up],
            tls: tls.then(|| ca.proxy_tls()),
            ..Default::default()
        };
        std::fs::write(&conf, toml::to_string(&c).unwrap()).unwrap();
        let p = Proc::spawn(
            name,
            Command::new(bin("ferry-proxy")).arg("--config").arg(&conf),
            d,
        );
        wait_ready(addr, Duration::from_secs(30));
        (p, addr)
    };
    let (_sp, sp_addr) = proxy("server-proxy", server, false);
    let (_cp, chain) = proxy("client-proxy", sp_addr, false);
    let (_tp, tls_chain) = proxy("client-proxy-tls", sp_addr, true);
    let vias = [
        Via {
            proxy: server.to_string(),
            ca: None,
        },
        Via {
            proxy: chain.to_string(),
            ca: None,
        },
        Via {
            proxy: format!("tls://{tls_chain}"),
            ca: Some(ca.ca.display().to_string()),
        },
    ];

    let src = d.join("src");
    make_file(&src, size, 42);
    let src_file = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    let out = d.join("out");
    let state = d.join("state");
    println!(
        "ferry client benchmark: {mb} MiB, 4 MiB blocks, {runs} runs per cell, server sync_blocks = {sync}"
    );
    println!(
        "{:<9} {:>7} {:>18} {:>18} {:>18} {:>12} {:>10}",
        "op", "threads", "direct MB/s", "chain MB/s", "TLS chain MB/s", "chain/dir", "TLS/chain"
    );
    let mut counter = 0u64;
    let mb_s = |t: Duration| size as f64 / 1e6 / t.as_secs_f64();
    for threads in [1usize, 2, 4] {
        let t = threads.to_string();
        let mut up = [Vec::new(), Vec::new(), Vec::new()];
        let mut down = [Vec::new(), Vec::new(), Vec::new()];
        for _ in 0..runs {
            for (k, via) in vias.iter().enumerate() {
                counter += 1;
                src_file.write_all_at(&counter.to_le_bytes(), 0).unwrap();
                let (took, id) = ferry(
                    &state,
                    via,
                    &["upload", src.to_str().unwrap(), "--threads", &t],
                );
                up[k].push(mb_s(took));
                let (took, _) = ferry(
                    &state,
                    via,
                    &[
                        "download",
                        &id,
                        "-o",
                        out.to_str().unwrap(),
                        "--threads",
                        &t,
                    ],
                );
                down[k].push(mb_s(took));
                std::fs::remove_file(&out).unwrap();
                ferry(&state, &vias[0], &["delete", &id]);
            }
        }
        for (op, v) in [("upload", up), ("download", down)] {
            let [direct, chain, tls] = v;
            let (dm, dlo, dhi) = median(&direct);
            let (cm, clo, chi) = median(&chain);
            let (tm, tlo, thi) = median(&tls);
            let row = format!(
                "{op:<9} {threads:>7} {:>18} {:>18} {:>18} {:>11.0}% {:>9.0}%",
                format!("{dm:.0} ({dlo:.0}-{dhi:.0})"),
                format!("{cm:.0} ({clo:.0}-{chi:.0})"),
                format!("{tm:.0} ({tlo:.0}-{thi:.0})"),
                cm / dm * 100.0,
                tm / cm * 100.0
            );
            println!("{row}");
        }
    }
    let peak = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .map(|u| u.max_rss())
        .unwrap_or(0);
    println!("peak RSS of the largest finished `ferry` process: {peak} KiB");
}
