//! Chaos suite: a real local cluster, many concurrent transfers through the `ferry` CLI, and
//! faults injected while they run.
//!
//! - Single server (server, two server-proxies, two client-proxies): SIGKILL of the primary
//!   client-proxy and server-proxy (restarted after a pause), SIGSTOP/SIGCONT of a proxy,
//!   SIGKILL of the server (restarted).
//! - Cluster (2 groups x 2 storage nodes, 2 trackers, a routing server-proxy pair, a
//!   client-proxy pair on TLS (a local CA), a PostgreSQL server of its own): users of both groups download each
//!   other's files while storage nodes of every group, trackers, routing proxies and
//!   client-proxies are SIGKILLed and restarted, sometimes two at once, and PostgreSQL itself
//!   is restarted (`pg_ctl restart -m fast`) now and then.
//!
//! Reproducible: a seed picks sizes, operations and the fault schedule; it is printed at start
//! and `FERRY_CHAOS_SEED=N` replays it. The short runs (default) are part of the test suite;
//! `FERRY_CHAOS_LONG=1` (optionally `FERRY_CHAOS_SECS`) runs long ones and prints a summary,
//! `FERRY_CHAOS_CLUSTER=1` runs only the cluster mode, `FERRY_CHAOS_KEEP=1` keeps the scratch
//! dir with the members' logs; `RUST_LOG` reaches the members and the clients (a client that
//! fails prints its log with its error). `FERRY_CHAOS_BASELINE=1` runs the same
//! transfers without faults: comparing the throughput lines gives the time each fault adds.

use crate::support;

use ferry_supervisor::cluster::{self, Cluster, GroupsLayout, Layout, Logs, Spec};
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
    /// The CA of `tls://` proxies (`--ca`).
    ca: Option<PathBuf>,
    /// The app the users belong to and its key (`FERRY_KEY`).
    app: String,
    key: String,
    tally: Tally,
    stored: Mutex<Vec<Stored>>,
    /// Files their owners never delete, which every user downloads (in a cluster, from
    /// whichever group holds them).
    shared: Mutex<Vec<Stored>>,
    stop: AtomicBool,
}

impl Ctx {
    fn new(dir: &Path, proxies: Vec<String>, ca: Option<PathBuf>, app: &str, key: String) -> Ctx {
        std::fs::create_dir_all(dir.join("state")).unwrap();
        Ctx {
            dir: dir.to_path_buf(),
            proxies,
            ca,
            app: app.to_owned(),
            key,
            tally: Tally::default(),
            stored: Mutex::new(Vec::new()),
            shared: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        }
    }

    /// A `ferry` command as `user` of the app, through the client-proxies.
    fn command(&self, user: &str) -> Command {
        let mut cmd = Command::new(support::bin("ferry"));
        cmd.env("FERRY_KEY", &self.key)
            .env("FERRY_STATE_DIR", self.dir.join("state"));
        for p in &self.proxies {
            cmd.args(["--proxy", p]);
        }
        if let Some(ca) = &self.ca {
            cmd.arg("--ca").arg(ca);
        }
        cmd.args(["--app", &self.app, "--user", user]);
        cmd
    }
}

/// Uploads each worker publishes to everyone (its first ones) instead of keeping.
const SHARED_PER_WORKER: usize = 2;

/// Runs one CLI transfer, rerunning it (resume) if the client gives up; returns the JSON report.
fn ferry(ctx: &Ctx, user: &str, args: &[&str]) -> Option<serde_json::Value> {
    for attempt in 0..3 {
        let out = ctx.command(user).arg("--json").args(args).output().unwrap();
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
        let out = ctx.command(user).args(["delete", id]).output().unwrap();
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
    let mut published = 0;
    let mut sources: Vec<(PathBuf, u64)> = Vec::new();
    let mut i = 0;
    while !ctx.stop.load(Ordering::Relaxed) {
        i += 1;
        let op = rng.random_range(0..10);
        // Half the downloads are of files other users published.
        let pick = if rng.random_bool(0.5) {
            let shared = ctx.shared.lock();
            (!shared.is_empty()).then(|| {
                let f = &shared[rng.random_range(0..shared.len())];
                (f.id.clone(), f.sha.clone(), f.size)
            })
        } else {
            (!mine.is_empty()).then(|| {
                let f = &mine[rng.random_range(0..mine.len())];
                (f.id.clone(), f.sha.clone(), f.size)
            })
        };
        if op < 3
            && let Some((id, sha, size)) = pick
        {
            // Download a stored file and compare.
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
                    if published < SHARED_PER_WORKER {
                        published += 1;
                        ctx.shared.lock().push(Stored { id, sha, size });
                    } else {
                        mine.push(Stored { id, sha, size });
                    }
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

/// The run's scratch dir (configs, data, logs, files); `FERRY_CHAOS_KEEP=1` keeps it, to read
/// the members' logs after a failure.
fn scratch() -> tempfile::TempDir {
    let mut t = tempfile::Builder::new()
        .prefix("ferry-chaos")
        .tempdir()
        .unwrap();
    if std::env::var("FERRY_CHAOS_KEEP").is_ok_and(|v| v == "1") {
        t.disable_cleanup(true);
        eprintln!("chaos: scratch dir {} is kept", t.path().display());
    }
    t
}

/// What the fault loop came to.
struct Outcome {
    elapsed: Duration,
    faults: BTreeMap<&'static str, u64>,
    total_faults: u64,
}

/// Runs the workers while `inject` injects one fault at a time (returning its name) until the
/// plan's time, fault and transfer counts are reached; `dead` names members that exited on
/// their own (none may).
fn run(
    p: &Plan,
    ctx: &Arc<Ctx>,
    mut inject: impl FnMut(&mut StdRng) -> &'static str,
    mut dead: impl FnMut() -> Vec<String>,
) -> Outcome {
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
        *faults.entry(inject(&mut rng)).or_default() += 1;
        total_faults += 1;
        let dead = dead();
        assert!(dead.is_empty(), "members died on their own: {dead:?}");
    }
    ctx.stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    Outcome {
        elapsed: started.elapsed(),
        faults,
        total_faults,
    }
}

/// Downloads every file still stored (kept and published) as a user of its own and checks
/// its bytes; returns how many there are.
fn verify_stored(ctx: &Ctx) -> usize {
    let mut stored: Vec<(String, String, u64)> = Vec::new();
    for s in ctx.stored.lock().iter().chain(ctx.shared.lock().iter()) {
        stored.push((s.id.clone(), s.sha.clone(), s.size));
    }
    for (k, (id, sha, size)) in stored.iter().enumerate() {
        let out = ctx.dir.join(format!("final-{k}"));
        let outs = out.display().to_string();
        let r = ferry(ctx, "verifier", &["download", id, "-o", &outs]);
        assert!(r.is_some(), "final download of {id} failed");
        assert_eq!(
            &support::sha256_file(&out),
            sha,
            "final check of {id} ({size} bytes)"
        );
        let _ = std::fs::remove_file(&out);
    }
    stored.len()
}

/// Files under `dir`'s temp dirs once sessions had `wait` to expire.
fn temp_files_left(dirs: &[PathBuf], wait: Duration) -> usize {
    let deadline = Instant::now() + wait;
    loop {
        let n: usize = dirs.iter().map(|d| support::count_files(d)).sum();
        if n == 0 || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Stops the cluster; the members still running afterwards.
fn stop_cluster(cl: &mut Cluster) -> Vec<(String, u32)> {
    let pids = cl.pids();
    cl.stop(Duration::from_secs(5));
    pids.into_iter()
        .filter(|(_, pid)| Path::new(&format!("/proc/{pid}")).exists())
        .collect()
}

/// What the end of a run found.
struct Found {
    /// Stored files on disk, and the successful, undeleted uploads there should be.
    on_disk: usize,
    uploads_ok: usize,
    leftovers: usize,
    /// Whether temp files left over fail the run (a cluster's sessions outlive the run).
    leftovers_fail: bool,
    leaked: Vec<(String, u32)>,
}

/// Prints the run's summary, then checks it: no failed or corrupt transfer, enough faults and
/// transfers, re-sent blocks within their bound, every upload stored exactly once, nothing left.
fn report(name: &str, p: &Plan, ctx: &Ctx, o: &Outcome, f: &Found) {
    let t = &ctx.tally;
    let transfers = t.transfers.load(Ordering::Relaxed);
    let resent = t.resent.load(Ordering::Relaxed);
    let bound = o.total_faults * THREADS * CONCURRENCY as u64;
    eprintln!("chaos summary: {name} (seed {})", p.seed);
    eprintln!("  elapsed            {:.1} s", o.elapsed.as_secs_f64());
    eprintln!(
        "  transfers          {transfers} ({} uploads, {} downloads, {} instant), {:.1} MiB",
        t.uploads.load(Ordering::Relaxed),
        t.downloads.load(Ordering::Relaxed),
        t.instant.load(Ordering::Relaxed),
        t.bytes.load(Ordering::Relaxed) as f64 / (1 << 20) as f64
    );
    eprintln!(
        "  throughput         {:.1} MB/s (all transfers, all workers)",
        t.bytes.load(Ordering::Relaxed) as f64 / 1e6 / o.elapsed.as_secs_f64()
    );
    eprintln!("  faults             {}", o.total_faults);
    for (k, n) in &o.faults {
        eprintln!("    {k:<28} {n}");
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
    eprintln!("  temp files left    {}", f.leftovers);
    eprintln!(
        "  files stored       {} (undeleted successful uploads: {}; deleted {})",
        f.on_disk,
        f.uploads_ok,
        t.deleted.load(Ordering::Relaxed)
    );
    assert_eq!(
        t.failures.load(Ordering::Relaxed),
        0,
        "transfers that never finished"
    );
    assert_eq!(t.corrupt.load(Ordering::Relaxed), 0, "corrupt transfers");
    assert!(transfers >= p.min_transfers && (p.baseline || o.total_faults >= p.min_faults));
    assert!(resent <= bound, "{resent} blocks re-sent, bound {bound}");
    assert_eq!(
        f.on_disk, f.uploads_ok,
        "stored files vs successful, undeleted uploads"
    );
    assert!(
        f.leftovers == 0 || !f.leftovers_fail,
        "{} upload temp files left",
        f.leftovers
    );
    assert!(
        f.leaked.is_empty(),
        "processes left running: {:?}",
        f.leaked
    );
}

#[test]
fn transfers_survive_dying_proxies_and_server() {
    if std::env::var("FERRY_CHAOS_CLUSTER").is_ok_and(|v| v == "1") {
        eprintln!("FERRY_CHAOS_CLUSTER=1: the single-server mode is skipped");
        return;
    }
    let p = plan();
    eprintln!(
        "chaos: seed {} (replay with FERRY_CHAOS_SEED={}), running {:?}",
        p.seed, p.seed, p.run_for
    );
    let tmp = scratch();
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
    let ctx = Arc::new(Ctx::new(
        tmp.path(),
        layout
            .client_proxies
            .iter()
            .map(|a| a.to_string())
            .collect(),
        None,
        "chaos",
        support::auth::key_env(),
    ));
    let cell = std::cell::RefCell::new(&mut cl);
    let inject = |rng: &mut StdRng| {
        let mut cl = cell.borrow_mut();
        match rng.random_range(0..10) {
            0..=2 => {
                cl.kill(cluster::CLIENT_PROXY_A).unwrap();
                pause(rng, 200, 2000);
                cl.start_member(cluster::CLIENT_PROXY_A).unwrap();
                "kill client-proxy-a"
            }
            3..=5 => {
                cl.kill(cluster::SERVER_PROXY_A).unwrap();
                pause(rng, 200, 2000);
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
                pause(rng, 1000, 3000);
                cl.signal(who, Signal::SIGCONT).unwrap();
                "stop/cont proxy"
            }
            _ => {
                cl.kill(cluster::SERVER).unwrap();
                pause(rng, 200, 1500);
                cl.start_member(cluster::SERVER).unwrap();
                "kill server"
            }
        }
    };
    let o = run(&p, &ctx, inject, || cell.borrow_mut().exited());
    // Every file still stored is there and intact after all the faults.
    let uploads_ok = verify_stored(&ctx);
    // Every upload is stored exactly once: one file in the data dir per successful upload not
    // deleted since (instant uploads are hard links with their own path), none twice, none
    // from a failed one.
    let on_disk = support::count_files(&data.join("data"));
    // No upload session or temp file is left once sessions have expired.
    let leftovers = temp_files_left(&[data.join("tmp")], Duration::from_secs(75));
    let leaked = stop_cluster(&mut cl);
    let found = Found {
        on_disk,
        uploads_ok,
        leftovers,
        leftovers_fail: true,
        leaked,
    };
    report("single server", &p, &ctx, &o, &found);
}

/// The cluster mode: two groups of two storage nodes on a PostgreSQL server of the test's
/// own, two trackers, the routing server-proxy pair and the client-proxy pair. Users land in
/// both groups and download each other's files while members of every kind die.
#[test]
fn cluster_transfers_cross_groups_while_members_and_the_database_restart() {
    let p = plan();
    let Some(pg) = support::pg_server::PgServer::start("chaos cluster") else {
        return;
    };
    eprintln!(
        "chaos cluster: seed {} (replay with FERRY_CHAOS_SEED={}), running {:?}",
        p.seed, p.seed, p.run_for
    );
    let tmp = scratch();
    let spec = Spec {
        nodes: 2,
        groups: 2,
        meta_url: Some(pg.url.clone()),
        beat_interval_ms: 300,
        offline_after_ms: 1500,
        route_cache_ms: 1000,
        port_base: cluster::PORT_BASE,
        tls: true,
    };
    let layout = GroupsLayout::picked(&spec, support::free_addr);
    let bin_dir = support::bin("ferry").parent().unwrap().to_path_buf();
    let data = tmp.path().join("cluster");
    let mut cl = Cluster::start_groups(
        &bin_dir,
        &spec,
        layout.clone(),
        &data,
        Logs::Dir(tmp.path().join("logs")),
    )
    .unwrap();
    let key = cl.secrets.key_of(cluster::CLUSTER_APP).unwrap();
    // End users reach the client-proxies over TLS, as a deployment's do.
    let ctx = Arc::new(Ctx::new(
        tmp.path(),
        cl.client_endpoints(),
        cl.tls.as_ref().map(|t| t.ca.clone()),
        cluster::CLUSTER_APP,
        format!("{}:{}", key.id, key.secret),
    ));
    let nodes: Vec<String> = layout.nodes().into_iter().map(|(_, n, _)| n).collect();
    let pairs = [
        [cluster::TRACKER, cluster::TRACKER_B],
        [cluster::SERVER_PROXY_A, cluster::SERVER_PROXY_B],
        [cluster::CLIENT_PROXY_A, cluster::CLIENT_PROXY_B],
    ];
    let cell = std::cell::RefCell::new(&mut cl);
    let inject = |rng: &mut StdRng| {
        let mut cl = cell.borrow_mut();
        let mut restart = |names: &[&str], rng: &mut StdRng| {
            for n in names {
                cl.kill(n).unwrap();
            }
            pause(rng, 200, 2000);
            for n in names {
                cl.start_member(n).unwrap();
            }
        };
        let node = nodes[rng.random_range(0..nodes.len())].clone();
        let one_of = |pair: &[&'static str; 2], rng: &mut StdRng| pair[rng.random_range(0..2)];
        match rng.random_range(0..12) {
            0..=3 => {
                restart(&[&node], rng);
                "kill storage node"
            }
            4 => {
                restart(&[one_of(&pairs[0], rng)], rng);
                "kill tracker"
            }
            5 | 6 => {
                restart(&[one_of(&pairs[1], rng)], rng);
                "kill routing proxy"
            }
            7 | 8 => {
                restart(&[one_of(&pairs[2], rng)], rng);
                "kill client-proxy"
            }
            9 | 10 => {
                // Two faults at once: a storage node and a routing proxy.
                restart(&[&node, one_of(&pairs[1], rng)], rng);
                "kill node + routing proxy"
            }
            _ => {
                pg.restart();
                "restart PostgreSQL"
            }
        }
    };
    let o = run(&p, &ctx, inject, || cell.borrow_mut().exited());
    let uploads_ok = verify_stored(&ctx);
    let groups: Vec<PathBuf> = layout
        .groups
        .iter()
        .map(|(g, _)| cl.group_data(g))
        .collect();
    let on_disk = groups
        .iter()
        .map(|g| support::count_files(&g.join("data")))
        .sum();
    // Sessions of abandoned attempts live for the nodes' session lifetime, longer than a run;
    // what is left is reported, not failed.
    let tmps: Vec<PathBuf> = groups.iter().map(|g| g.join("tmp")).collect();
    let leftovers = temp_files_left(&tmps, Duration::ZERO);
    let leaked = stop_cluster(&mut cl);
    let found = Found {
        on_disk,
        uploads_ok,
        leftovers,
        leftovers_fail: false,
        leaked,
    };
    report("cluster", &p, &ctx, &o, &found);
}
