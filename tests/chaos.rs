//! Chaos suite: a real local cluster (server, two server-proxies, two client-proxies), many
//! concurrent transfers through the `ferry` CLI, and faults injected while they run: SIGKILL of
//! the primary client-proxy and server-proxy (restarted after a pause), SIGSTOP/SIGCONT of a
//! proxy, SIGKILL of the server (restarted).
//!
//! Reproducible: a seed picks sizes, operations and the fault schedule; it is printed at start
//! and `FERRY_CHAOS_SEED=N` replays it. The short run (default) is part of the test suite;
//! `FERRY_CHAOS_LONG=1` (optionally `FERRY_CHAOS_SECS`) runs the long one and prints a summary.
//! `FERRY_CHAOS_BASELINE=1` runs the same transfers without faults: comparing the throughput
//! lines gives the time each fault adds.

mod support;

use ferry_client::cluster::{self, Cluster, Layout, Logs};
use nix::sys::signal::Signal;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const BLOCK: u64 = 1 << 20;
const THREADS: u64 = 4;
const CONCURRENCY: usize = 3;

struct Plan {
    seed: u64,
    /// `FERRY_CHAOS_BASELINE=1`: the same transfers with no faults, to measure what faults cost.
    baseline: bool,
    run_for: Duration,
    min_faults: u64,
    min_transfers: u64,
    big_max: u64,
}

fn plan() -> Plan {
    let seed = std::env::var("FERRY_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    let long = std::env::var("FERRY_CHAOS_LONG").is_ok_and(|v| v == "1");
    let baseline = std::env::var("FERRY_CHAOS_BASELINE").is_ok_and(|v| v == "1");
    let secs = std::env::var("FERRY_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok());
    if long {
        Plan {
            seed,
            baseline,
            run_for: Duration::from_secs(secs.unwrap_or(1800)),
            min_faults: 100,
            min_transfers: 200,
            big_max: 300 << 20,
        }
    } else {
        Plan {
            seed,
            baseline,
            run_for: Duration::from_secs(secs.unwrap_or(75)),
            min_faults: 10,
            min_transfers: 20,
            big_max: 40 << 20,
        }
    }
}

/// Test configs: the shipped ones with faster health checks and a short session expiry, so
/// faults are noticed in time and leftover sessions are reaped before the final check.
fn write_conf(dir: &Path) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf");
    std::fs::create_dir_all(dir).unwrap();
    for name in [
        cluster::SERVER,
        cluster::SERVER_PROXY_A,
        cluster::SERVER_PROXY_B,
        cluster::CLIENT_PROXY_A,
        cluster::CLIENT_PROXY_B,
    ] {
        let text = std::fs::read_to_string(src.join(format!("{name}.toml"))).unwrap();
        let mut t: toml::Table = text.parse().unwrap();
        if name == cluster::SERVER {
            t.insert("session_ttl_secs".into(), 60.into());
            // The shipped HTTP port is fixed; this suite does not use the gateway.
            t.remove("http");
            t.insert("sync_blocks".into(), false.into());
            support::auth::add_test_keys(&mut t);
        } else {
            // The shipped stats ports are fixed; tests must not bind them.
            t.remove("stats_listen");
            t.insert("check_interval_ms".into(), 200.into());
            t.insert("connect_timeout_ms".into(), 500.into());
        }
        std::fs::write(
            dir.join(format!("{name}.toml")),
            toml::to_string(&t).unwrap(),
        )
        .unwrap();
    }
}

#[derive(Default)]
struct Tally {
    transfers: AtomicU64,
    uploads: AtomicU64,
    downloads: AtomicU64,
    instant: AtomicU64,
    resent: AtomicU64,
    failovers: AtomicU64,
    reruns: AtomicU64,
    failures: AtomicU64,
    corrupt: AtomicU64,
    bytes: AtomicU64,
    deleted: AtomicU64,
}

struct Stored {
    id: String,
    sha: String,
    size: u64,
}

struct Ctx {
    dir: PathBuf,
    proxies: Vec<String>,
    tally: Tally,
    stored: Mutex<Vec<Stored>>,
    stop: AtomicBool,
}

/// Runs one CLI transfer, rerunning it (resume) if the client gives up; returns the JSON report.
fn ferry(ctx: &Ctx, user: &str, args: &[&str]) -> Option<serde_json::Value> {
    for attempt in 0..3 {
        let mut cmd = Command::new(support::bin("ferry"));
        cmd.env("FERRY_KEY", support::auth::key_env());
        for p in &ctx.proxies {
            cmd.args(["--proxy", p]);
        }
        cmd.args(["--app", "chaos", "--user", user, "--json"])
            .args(args);
        cmd.env("FERRY_STATE_DIR", ctx.dir.join("state"));
        let out = cmd.output().unwrap();
        if out.status.success() {
            let text = String::from_utf8_lossy(&out.stdout);
            return Some(
                serde_json::from_str(text.trim())
                    .unwrap_or_else(|e| panic!("ferry {args:?} printed no JSON ({e}): {text}")),
            );
        }
        ctx.tally.reruns.fetch_add(1, Ordering::Relaxed);
        eprintln!(
            "chaos: ferry {args:?} attempt {attempt} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    None
}

/// Adds one CLI run's report (`{"report": {...}}` from `ferry --json`) to the tally.
fn count(ctx: &Ctx, out: &serde_json::Value) {
    let report = &out["report"];
    let n = |k: &str| report.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    ctx.tally
        .resent
        .fetch_add(n("blocks_resent"), Ordering::Relaxed);
    ctx.tally
        .failovers
        .fetch_add(n("failovers"), Ordering::Relaxed);
    ctx.tally.bytes.fetch_add(n("bytes"), Ordering::Relaxed);
    if report.get("instant").and_then(|v| v.as_bool()) == Some(true) {
        ctx.tally.instant.fetch_add(1, Ordering::Relaxed);
    }
}

/// Most files one worker keeps stored (older ones are deleted through the CLI) and most source
/// files it keeps for re-uploads: the disk used by a run stays bounded however long it runs.
const KEEP_STORED: usize = 8;
const KEEP_SOURCES: usize = 3;

/// `ferry delete` with reruns; a rerun that finds the file gone means an earlier attempt
/// deleted it and only its reply was lost.
fn delete(ctx: &Ctx, user: &str, id: &str) -> bool {
    for attempt in 0..3 {
        let mut cmd = Command::new(support::bin("ferry"));
        cmd.env("FERRY_KEY", support::auth::key_env());
        for p in &ctx.proxies {
            cmd.args(["--proxy", p]);
        }
        cmd.args(["--app", "chaos", "--user", user, "delete", id]);
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || (attempt > 0 && err.contains("NotFound")) {
            return true;
        }
        ctx.tally.reruns.fetch_add(1, Ordering::Relaxed);
        eprintln!(
            "chaos: ferry delete {id} attempt {attempt} failed: {}",
            err.trim()
        );
    }
    false
}

fn transfer_loop(ctx: &Ctx, worker: usize, seed: u64, big_max: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let user = format!("user{worker}");
    // This worker's stored files (downloads and deletes pick from them, so no other worker
    // deletes a file under a download) and its recent source files (re-uploads pick from them).
    let mut mine: Vec<Stored> = Vec::new();
    let mut sources: Vec<(PathBuf, u64)> = Vec::new();
    let mut i = 0;
    while !ctx.stop.load(Ordering::Relaxed) {
        i += 1;
        let op = rng.random_range(0..10);
        if op < 3 && !mine.is_empty() {
            // Download a stored file and compare.
            let f = &mine[rng.random_range(0..mine.len())];
            let (id, sha, size) = (f.id.clone(), f.sha.clone(), f.size);
            let out = ctx.dir.join(format!("w{worker}-{i}.down"));
            let outs = out.display().to_string();
            let threads = THREADS.to_string();
            match ferry(
                ctx,
                &user,
                &["download", &id, "-o", &outs, "--threads", &threads],
            ) {
                Some(r) => {
                    count(ctx, &r);
                    if support::sha256_file(&out) != sha
                        || std::fs::metadata(&out).map(|m| m.len()).ok() != Some(size)
                    {
                        eprintln!("chaos: CORRUPT download of {id} ({size} bytes)");
                        ctx.tally.corrupt.fetch_add(1, Ordering::Relaxed);
                    }
                }
                None => {
                    ctx.tally.failures.fetch_add(1, Ordering::Relaxed);
                }
            }
            let _ = std::fs::remove_file(&out);
            ctx.tally.downloads.fetch_add(1, Ordering::Relaxed);
        } else {
            // One upload in five repeats content this worker sent before: the instant path.
            let (path, size) = if rng.random_bool(0.2) && !sources.is_empty() {
                sources[rng.random_range(0..sources.len())].clone()
            } else {
                let size = match rng.random_range(0..8) {
                    0 => 0,
                    1 => 1,
                    2 => BLOCK - 1,
                    3 => BLOCK,
                    4 => BLOCK + 1,
                    _ => rng.random_range(10 << 20..=big_max),
                };
                let path = ctx.dir.join(format!("w{worker}-{i}.up"));
                support::make_file(&path, size, seed ^ i);
                sources.push((path.clone(), size));
                if sources.len() > KEEP_SOURCES {
                    let _ = std::fs::remove_file(sources.remove(0).0);
                }
                (path, size)
            };
            let paths = path.display().to_string();
            let threads = THREADS.to_string();
            let args = [
                "upload",
                &paths,
                "--threads",
                &threads,
                "--block-size",
                "1MiB",
            ];
            match ferry(ctx, &user, &args) {
                Some(r) => {
                    count(ctx, &r);
                    let id = r["file_id"]
                        .as_str()
                        .expect("upload report has file_id")
                        .to_owned();
                    let sha = support::sha256_file(&path);
                    mine.push(Stored { id, sha, size });
                }
                None => {
                    ctx.tally.failures.fetch_add(1, Ordering::Relaxed);
                }
            }
            ctx.tally.uploads.fetch_add(1, Ordering::Relaxed);
            if mine.len() > KEEP_STORED {
                let gone = mine.remove(rng.random_range(0..mine.len()));
                if delete(ctx, &user, &gone.id) {
                    ctx.tally.deleted.fetch_add(1, Ordering::Relaxed);
                } else {
                    ctx.tally.failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        ctx.tally.transfers.fetch_add(1, Ordering::Relaxed);
    }
    for (p, _) in sources {
        let _ = std::fs::remove_file(p);
    }
    ctx.stored.lock().extend(mine);
}

fn pause(rng: &mut StdRng, lo_ms: u64, hi_ms: u64) {
    std::thread::sleep(Duration::from_millis(rng.random_range(lo_ms..=hi_ms)));
}

#[test]
fn transfers_survive_dying_proxies_and_server() {
    let p = plan();
    eprintln!(
        "chaos: seed {} (replay with FERRY_CHAOS_SEED={}), running {:?}",
        p.seed, p.seed, p.run_for
    );
    let tmp = tempfile::tempdir().unwrap();
    let conf = tmp.path().join("conf");
    write_conf(&conf);
    let layout = Layout::free_ports().unwrap();
    let bin_dir = support::bin("ferry").parent().unwrap().to_path_buf();
    let data = tmp.path().join("data");
    let logs = tmp.path().join("logs");
    let mut cl = Cluster::start(
        &bin_dir,
        &conf,
        layout.clone(),
        &data,
        Logs::Dir(logs.clone()),
    )
    .unwrap();
    let ctx = Arc::new(Ctx {
        dir: tmp.path().to_path_buf(),
        proxies: layout
            .client_proxies
            .iter()
            .map(|a| a.to_string())
            .collect(),
        tally: Tally::default(),
        stored: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
    });
    std::fs::create_dir_all(tmp.path().join("state")).unwrap();
    let started = Instant::now();
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|w| {
            let ctx = ctx.clone();
            let seed = p.seed.wrapping_add(w as u64 * 7919);
            let big = p.big_max;
            std::thread::spawn(move || transfer_loop(&ctx, w, seed, big))
        })
        .collect();

    let mut rng = StdRng::seed_from_u64(p.seed);
    let mut faults: BTreeMap<&str, u64> = BTreeMap::new();
    let mut total_faults = 0u64;
    while started.elapsed() < p.run_for
        || (total_faults < p.min_faults && !p.baseline)
        || ctx.tally.transfers.load(Ordering::Relaxed) < p.min_transfers
    {
        assert!(
            started.elapsed() < p.run_for * 3 + Duration::from_secs(60),
            "chaos run overran: {total_faults} faults, {} transfers",
            ctx.tally.transfers.load(Ordering::Relaxed)
        );
        pause(&mut rng, 1500, 4000);
        if p.baseline {
            continue;
        }
        let kind = match rng.random_range(0..10) {
            0..=2 => {
                cl.kill(cluster::CLIENT_PROXY_A).unwrap();
                pause(&mut rng, 200, 2000);
                cl.start_member(cluster::CLIENT_PROXY_A).unwrap();
                "kill client-proxy-a"
            }
            3..=5 => {
                cl.kill(cluster::SERVER_PROXY_A).unwrap();
                pause(&mut rng, 200, 2000);
                cl.start_member(cluster::SERVER_PROXY_A).unwrap();
                "kill server-proxy-a"
            }
            6 | 7 => {
                let who = if rng.random_bool(0.5) {
                    cluster::CLIENT_PROXY_A
                } else {
                    cluster::SERVER_PROXY_A
                };
                cl.signal(who, Signal::SIGSTOP).unwrap();
                pause(&mut rng, 1000, 3000);
                cl.signal(who, Signal::SIGCONT).unwrap();
                "stop/cont proxy"
            }
            _ => {
                cl.kill(cluster::SERVER).unwrap();
                pause(&mut rng, 200, 1500);
                cl.start_member(cluster::SERVER).unwrap();
                "kill server"
            }
        };
        *faults.entry(kind).or_default() += 1;
        total_faults += 1;
        let dead = cl.exited();
        assert!(dead.is_empty(), "members died on their own: {dead:?}");
    }
    ctx.stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let elapsed = started.elapsed();

    // Every file still stored is there and intact after all the faults.
    let stored: Vec<(String, String, u64)> = ctx
        .stored
        .lock()
        .iter()
        .map(|s| (s.id.clone(), s.sha.clone(), s.size))
        .collect();
    let t = &ctx.tally;
    for (k, (id, sha, size)) in stored.iter().enumerate() {
        let out = tmp.path().join(format!("final-{k}"));
        let outs = out.display().to_string();
        let r = ferry(&ctx, "verifier", &["download", id, "-o", &outs]);
        assert!(r.is_some(), "final download of {id} failed");
        assert_eq!(
            &support::sha256_file(&out),
            sha,
            "final check of {id} ({size} bytes)"
        );
        let _ = std::fs::remove_file(&out);
    }

    // Every upload is stored exactly once: one file in the data dir per successful upload not
    // deleted since (instant uploads are hard links with their own path), none twice, none
    // from a failed one.
    let on_disk = support::count_files(&data.join("data"));
    let uploads_ok = stored.len();
    assert_eq!(
        on_disk, uploads_ok,
        "stored files vs successful, undeleted uploads"
    );

    // No upload session or temp file is left once sessions have expired.
    let tmpdir = data.join("tmp");
    let deadline = Instant::now() + Duration::from_secs(75);
    let leftovers = loop {
        let n = std::fs::read_dir(&tmpdir).map(|d| d.count()).unwrap_or(0);
        if n == 0 || Instant::now() > deadline {
            break n;
        }
        std::thread::sleep(Duration::from_millis(250));
    };

    let pids = cl.pids();
    cl.stop(Duration::from_secs(5));
    let leaked: Vec<_> = pids
        .iter()
        .filter(|(_, pid)| std::path::Path::new(&format!("/proc/{pid}")).exists())
        .collect();

    let transfers = t.transfers.load(Ordering::Relaxed);
    let resent = t.resent.load(Ordering::Relaxed);
    let bound = total_faults * THREADS * CONCURRENCY as u64;
    eprintln!("chaos summary (seed {})", p.seed);
    eprintln!("  elapsed            {:.1} s", elapsed.as_secs_f64());
    eprintln!(
        "  transfers          {transfers} ({} uploads, {} downloads, {} instant), {:.1} MiB",
        t.uploads.load(Ordering::Relaxed),
        t.downloads.load(Ordering::Relaxed),
        t.instant.load(Ordering::Relaxed),
        t.bytes.load(Ordering::Relaxed) as f64 / (1 << 20) as f64
    );
    eprintln!(
        "  throughput         {:.1} MB/s (all transfers, all workers)",
        t.bytes.load(Ordering::Relaxed) as f64 / 1e6 / elapsed.as_secs_f64()
    );
    eprintln!("  faults             {total_faults}");
    for (k, n) in &faults {
        eprintln!("    {k:<20} {n}");
    }
    eprintln!(
        "  failures           {}",
        t.failures.load(Ordering::Relaxed)
    );
    eprintln!("  corrupt files      {}", t.corrupt.load(Ordering::Relaxed));
    eprintln!("  client reruns      {}", t.reruns.load(Ordering::Relaxed));
    eprintln!("  blocks re-sent     {resent} (bound: faults x threads x concurrency = {bound})");
    eprintln!(
        "  failovers seen     {}",
        t.failovers.load(Ordering::Relaxed)
    );
    eprintln!("  temp files left    {leftovers}");
    eprintln!(
        "  files stored       {on_disk} (undeleted successful uploads: {uploads_ok}; deleted {})",
        t.deleted.load(Ordering::Relaxed)
    );

    assert_eq!(
        t.failures.load(Ordering::Relaxed),
        0,
        "transfers that never finished"
    );
    assert_eq!(t.corrupt.load(Ordering::Relaxed), 0, "corrupt transfers");
    assert!(transfers >= p.min_transfers && (p.baseline || total_faults >= p.min_faults));
    assert!(resent <= bound, "{resent} blocks re-sent, bound {bound}");
    assert_eq!(
        leftovers,
        0,
        "upload temp files left in {}",
        tmpdir.display()
    );
    assert!(leaked.is_empty(), "processes left running: {leaked:?}");
}
