//! `cargo bench --bench route`: what routing by user costs at the server-proxy. One storage node
//! (group g1) joined to one tracker+id server, and two server-proxies in front of it: one with
//! the node as its fixed upstream, one routing through the tracker. Measured in one run,
//! interleaved so drift hits both:
//!
//! - session setup: connect + HELLO + the node's HELLO reply, `FERRY_BENCH_SESSIONS` sessions
//!   (default 1000) one after another per round, `FERRY_BENCH_RUNS` rounds (default 5); median
//!   and min-max over the rounds of each round's median. Three rows: fixed upstream; routed with
//!   the user's route cached (the normal case: one lookup per user per `route_cache_ms`); routed
//!   with a new user every session (a cache miss: a SADDRS round trip, and the tracker assigning
//!   the user a group in its database). Target (issue 8): routing adds under 1 ms.
//! - what the session token costs: connect + HELLO (its token verified: HMAC, validity window,
//!   replay cache) + reply straight at the node, next to connect + PROBE + reply (no token) in
//!   the same rounds; the difference is the token check.
//! - upload/download MB/s of a `FERRY_BENCH_MB` file (default 256) with the `ferry` client
//!   through each proxy (4 threads), median and min-max of the runs.
//!
//! The metadata is embedded SQLite (no PostgreSQL needed); the node runs with
//! `sync_blocks = false` so the transfer rows show the relay rather than the disk.

#[path = "../e2e/support/mod.rs"]
mod support;

use ferry_common::proto::{self, cmd};
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{Proc, bin, env_u64, free_addr, make_file, median, wait_ready};

/// One session's setup time: connect, HELLO (a fresh token, made before the clock starts),
/// the HELLO reply.
fn setup(via: SocketAddr, user: &str) -> Duration {
    round_trip(via, &support::auth::hello_frame("bench", user))
}

/// Connect, send `first` (HELLO or PROBE), read its reply: the time it took.
fn round_trip(via: SocketAddr, first: &[u8]) -> Duration {
    let t = Instant::now();
    let mut s = TcpStream::connect(via).expect("connect");
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(first).unwrap();
    match support::raw::next_reply(&mut s) {
        support::raw::Reply::Ok(..) => t.elapsed(),
        other => panic!("via {via}: {other:?}"),
    }
}

fn ferry(state: &Path, via: SocketAddr, args: &[&str]) -> (Duration, String) {
    let t = Instant::now();
    let out = Command::new(bin("ferry"))
        .env("FERRY_KEY", support::auth::key_env())
        .env("FERRY_STATE_DIR", state)
        .env_remove("FERRY_PROXIES")
        .args([
            "--proxy",
            &via.to_string(),
            "--app",
            "bench",
            "--user",
            "mover",
        ])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ferry");
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "ferry {args:?} via {via} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (took, String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn server(d: &Path, name: &str, listen: SocketAddr, conf: &str) -> Proc {
    let path = d.join(format!("{name}.toml"));
    let data = d.join(name);
    std::fs::write(
        &path,
        format!(
            "listen = \"{listen}\"\ndata = \"{}\"\n{conf}\n{}",
            data.display(),
            support::auth::auth_toml()
        ),
    )
    .unwrap();
    let p = Proc::spawn(
        name,
        Command::new(bin("ferry-server"))
            .arg("--config")
            .arg(&path)
            .env_remove("FERRY_META_URL"),
        d,
    );
    wait_ready(listen, Duration::from_secs(30));
    p
}

fn proxy(d: &Path, name: &str, args: &[String]) -> (Proc, SocketAddr) {
    let addr = free_addr();
    let p = Proc::spawn(
        name,
        Command::new(bin("ferry-proxy"))
            .args(["--listen", &addr.to_string()])
            .args(args),
        d,
    );
    wait_ready(addr, Duration::from_secs(30));
    (p, addr)
}

fn cell(v: &[f64], digits: usize) -> String {
    let (m, lo, hi) = median(v);
    format!("{m:.digits$} ({lo:.digits$}-{hi:.digits$})")
}

fn main() {
    let sessions = env_u64("FERRY_BENCH_SESSIONS", 1000).max(1) as usize;
    let runs = env_u64("FERRY_BENCH_RUNS", 5).max(1) as usize;
    let mb = env_u64("FERRY_BENCH_MB", 256);
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();

    let tracker = free_addr();
    let _tracker = server(
        d,
        "tracker",
        tracker,
        "roles = [\"tracker\", \"id\"]\n[tracker]\ngroups = [\"g1\"]\nbeat_interval_ms = 500\n",
    );
    let node = free_addr();
    let _node = server(
        d,
        "node",
        node,
        &format!("sync_blocks = false\n[cluster]\ngroup = \"g1\"\ntrackers = [\"{tracker}\"]\n"),
    );
    let t = Instant::now();
    while !ferry_supervisor::cluster::tracker_groups(tracker, None)
        .is_ok_and(|v| v.groups.iter().any(|g| g.nodes.iter().any(|n| n.online)))
    {
        assert!(t.elapsed() < Duration::from_secs(20), "node never joined");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_fixed, fixed) = proxy(d, "fixed-proxy", &["--upstream".into(), node.to_string()]);
    // A routing proxy checks session tokens, so it holds the app keys.
    let routed_conf = d.join("routed-proxy.toml");
    std::fs::write(&routed_conf, support::auth::auth_toml()).unwrap();
    let (_routed, routed) = proxy(
        d,
        "routed-proxy",
        &[
            "--config".into(),
            routed_conf.display().to_string(),
            "--tracker".into(),
            tracker.to_string(),
        ],
    );

    // Warm both paths (and the routed proxy's cache for "cached").
    for _ in 0..50 {
        setup(fixed, "cached");
        setup(routed, "cached");
    }
    let us = |v: &mut Vec<f64>| -> f64 {
        let (m, _, _) = median(v);
        v.clear();
        m
    };
    let probe = proto::frame(cmd::PROBE, 0, &proto::probe_body());
    let mut rows: [Vec<f64>; 5] = Default::default();
    let mut fresh = 0u64;
    let mut samples = Vec::with_capacity(sessions);
    for _ in 0..runs {
        for (k, row) in rows.iter_mut().enumerate() {
            for _ in 0..sessions {
                let took = match k {
                    0 => setup(fixed, "cached"),
                    1 => setup(routed, "cached"),
                    2 => {
                        fresh += 1;
                        setup(routed, &format!("new{fresh}"))
                    }
                    3 => round_trip(node, &probe),
                    _ => setup(node, "cached"),
                };
                samples.push(took.as_secs_f64() * 1e6);
            }
            row.push(us(&mut samples));
        }
    }
    println!(
        "ferry routing benchmark: session setup (connect + HELLO + reply), {runs} rounds x \
         {sessions} sessions, microseconds per session: median of round medians (min-max)"
    );
    let (fixed_m, _, _) = median(&rows[0]);
    for (name, v) in [
        ("fixed upstream", &rows[0]),
        ("routed, route cached", &rows[1]),
        ("routed, new user (lookup)", &rows[2]),
    ] {
        let (m, _, _) = median(v);
        println!(
            "  {name:<27} {:>22}   routing adds {:+.0} us",
            cell(v, 0),
            m - fixed_m
        );
    }
    let (probe_m, _, _) = median(&rows[3]);
    println!("straight at the node, microseconds per connection (same rounds):");
    for (name, v) in [
        ("PROBE (no token)", &rows[3]),
        ("HELLO (token verified)", &rows[4]),
    ] {
        let (m, _, _) = median(v);
        println!(
            "  {name:<27} {:>22}   token check adds {:+.0} us",
            cell(v, 0),
            m - probe_m
        );
    }

    let size = mb << 20;
    let src = d.join("src");
    make_file(&src, size, 9);
    let src_file = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    let out = d.join("out");
    let state = d.join("state");
    let mb_s = |t: Duration| size as f64 / 1e6 / t.as_secs_f64();
    let mut up: [Vec<f64>; 2] = Default::default();
    let mut down: [Vec<f64>; 2] = Default::default();
    let mut counter = 0u64;
    let tr = runs.min(3);
    for _ in 0..tr {
        for (k, via) in [fixed, routed].into_iter().enumerate() {
            // A new first word each time, so no upload is an instant (dedup) upload.
            counter += 1;
            src_file.write_all_at(&counter.to_le_bytes(), 0).unwrap();
            let (took, id) = ferry(&state, via, &["upload", src.to_str().unwrap()]);
            up[k].push(mb_s(took));
            let (took, _) = ferry(&state, via, &["download", &id, "-o", out.to_str().unwrap()]);
            down[k].push(mb_s(took));
            std::fs::remove_file(&out).unwrap();
            ferry(&state, via, &["delete", &id]);
        }
    }
    println!("transfers of {mb} MiB with `ferry` (4 threads), MB/s, median (min-max) of {tr} runs");
    println!(
        "  {:<9} {:>22} {:>22} {:>7}",
        "op", "fixed", "routed", "ratio"
    );
    for (op, v) in [("upload", &up), ("download", &down)] {
        let (f, _, _) = median(&v[0]);
        let (r, _, _) = median(&v[1]);
        println!(
            "  {op:<9} {:>22} {:>22} {:>6.0}%",
            cell(&v[0], 0),
            cell(&v[1], 0),
            r / f * 100.0
        );
    }
}
