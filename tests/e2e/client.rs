//! End-to-end tests of the `ferry` client binary against the real `ferry-server` and
//! `ferry-proxy` on loopback: edge sizes direct and through a two-proxy chain, kill -9 of the
//! client mid-upload and mid-download then a rerun that re-sends at most one block per thread,
//! failover when the first proxy is down or hangs (SIGSTOP), and the bad-input cases.
//!
//! The "300 MiB" file is 40 MiB here with 64 KiB blocks (640 blocks, more than a
//! 300 MiB file has at 4 MiB) to keep this file well under a minute; the 1 GiB transfers are in
//! the benchmark (tests/bench/client.rs).

use crate::support;

use nix::sys::signal::Signal;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use support::cli::{Run, ferry, ok, run};
use support::{Proc, bin, free_addr, make_file, sha256_file, wait_ready};

const BS: u64 = 64 * 1024;
/// Size of the files the kill -9 and failover tests move.
const BIG_FIXED: u64 = 40 << 20;

/// The big file of the edge-size test: 40 MiB in 64 KiB blocks (640 blocks) by default to keep
/// the suite fast; `FERRY_TEST_BIG_MIB=300` runs the full 300 MiB.
fn big_size() -> u64 {
    std::env::var("FERRY_TEST_BIG_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(40)
        << 20
}

struct Cluster {
    dir: tempfile::TempDir,
    server: SocketAddr,
    /// Client-side entry points: proxies that relay to the server (directly or via a chain).
    entries: Vec<SocketAddr>,
    procs: Vec<Proc>,
}

impl Cluster {
    /// A server and `chain` proxies: with `pair`, two proxies both relaying to the server;
    /// otherwise a client-proxy -> server-proxy chain.
    fn start(pair: bool) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        // A short server idle timeout releases blocks held by connections through a hung proxy.
        let conf = "idle_timeout_ms = 2000\nsync_blocks = false\n";
        let data = dir.path().join("data");
        let support::server::Server {
            proc, addr: server, ..
        } = support::server::Server::start_in(dir.path(), &data, conf);
        let mut procs = vec![proc];
        let mut proxy = |name: &str, upstream: SocketAddr| {
            let addr = free_addr();
            procs.push(Proc::spawn(
                name,
                Command::new(bin("ferry-proxy"))
                    .arg("--listen")
                    .arg(addr.to_string())
                    .arg("--upstream")
                    .arg(upstream.to_string()),
                dir.path(),
            ));
            wait_ready(addr, Duration::from_secs(20));
            addr
        };
        let entries = if pair {
            vec![proxy("proxy-a", server), proxy("proxy-b", server)]
        } else {
            let sp = proxy("server-proxy", server);
            vec![proxy("client-proxy", sp)]
        };
        Cluster {
            dir,
            server,
            entries,
            procs,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn proc(&self, name: &str) -> &Proc {
        self.procs.iter().find(|p| p.name == name).unwrap()
    }
}

fn upload(c: &Cluster, via: &[SocketAddr], file: &Path, extra: &[&str]) -> Run {
    let mut args = vec!["--json", "upload", file.to_str().unwrap()];
    args.extend_from_slice(extra);
    ok(ferry(&c.path("state"), via, &args))
}

fn download(c: &Cluster, via: &[SocketAddr], id: &str, out: &Path, extra: &[&str]) -> Run {
    let mut args = vec!["--json", "download", id, "-o", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    ok(ferry(&c.path("state"), via, &args))
}

#[test]
fn edge_sizes_direct_and_through_a_proxy_chain() {
    let c = Cluster::start(false);
    let direct = [c.server];
    let chain = [c.entries[0]];
    let big_file = big_size();
    let sizes = [0, 1, BS - 1, BS, BS + 1, big_file];
    for (k, &size) in sizes.iter().enumerate() {
        let src = c.path(&format!("src{k}"));
        make_file(&src, size, 100 + k as u64);
        // Up through the chain, down directly; and the other way round.
        for (n, (up_via, down_via)) in [(&chain, &direct), (&direct, &chain)].iter().enumerate() {
            let bs = if n == 0 { "64KiB" } else { "128KiB" };
            let up = upload(&c, &up_via[..], &src, &["--block-size", bs]);
            let id = up.json()["file_id"].as_str().unwrap().to_owned();
            let rep = up.report();
            assert_eq!(rep["bytes"], size, "size {size}");
            assert_eq!(rep["blocks_resent"], 0);
            let out = c.path(&format!("out{k}-{n}"));
            let down = download(&c, &down_via[..], &id, &out, &["--threads", "3"]);
            assert_eq!(down.report()["bytes"], size);
            assert_eq!(sha256_file(&out), sha256_file(&src), "size {size} via {n}");
            assert!(!c.path(&format!("out{k}-{n}.part")).exists());
            assert!(!c.path(&format!("out{k}-{n}.part.ferry")).exists());
            let stat = ok(ferry(&c.path("state"), &chain, &["--json", "stat", &id])).json();
            assert_eq!(stat["file"]["size"], size);
            assert_eq!(stat["file"]["sha256"], sha256_file(&src));
            if n == 1 {
                // The second upload of the same bytes (big ones) is an instant upload.
                assert_eq!(rep["instant"], size > 128 * 1024, "size {size}: {rep}");
            }
        }
        // Plain output: the file id alone on one line.
        let plain = ok(ferry(
            &c.path("state"),
            &chain,
            &["upload", src.to_str().unwrap()],
        ));
        assert_eq!(plain.stdout.lines().count(), 1);
        let id = plain.stdout.trim();
        ok(ferry(&c.path("state"), &chain, &["delete", id]));
        let gone = run(ferry(&c.path("state"), &direct, &["stat", id]));
        assert!(
            !gone.ok && gone.stderr.contains("NotFound"),
            "{}",
            gone.stderr
        );
    }
    let big = upload(&c, &chain, &c.path("src5"), &["--block-size", "64KiB"]).report();
    assert_eq!(big["blocks_total"], big_file / BS);
    let left = std::fs::read_dir(c.path("state")).unwrap().count();
    assert_eq!(left, 0, "finished uploads leave no state files");
}

/// Blocks begun by the uploads whose resume state is in `state` (the bitmap after the
/// state file's 68-byte head).
fn blocks_begun(state: &Path, blocks: usize) -> u32 {
    std::fs::read_dir(state)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| bits_set(&e.path(), 68, 0, blocks))
        .sum()
}

/// Number of set bits after `skip` bytes of header, in the first of `maps` bitmaps of a state file.
fn bits_set(path: &Path, skip: usize, map: usize, blocks: usize) -> u32 {
    let Ok(b) = std::fs::read(path) else { return 0 };
    let len = blocks.div_ceil(8);
    b.get(skip + map * len..skip + (map + 1) * len)
        .map(|m| m.iter().map(|x| x.count_ones()).sum())
        .unwrap_or(0)
}

/// A client started in the background, killed and reaped when dropped.
struct Bg(std::process::Child);

impl Bg {
    fn start(cmd: &mut Command, stdout: &Path) -> Bg {
        let out = std::fs::File::create(stdout).unwrap();
        let err = std::fs::File::create(stdout.with_extension("err")).unwrap();
        Bg(cmd.stdout(out).stderr(err).spawn().unwrap())
    }
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.0.try_wait().unwrap()
    }
    fn wait(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let t = Instant::now();
        while t.elapsed() < limit {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cmd`, waits until `progress()` reaches `at`, then kills it with SIGKILL.
fn kill_when(cmd: &mut Command, out: &Path, at: u32, progress: impl Fn() -> u32) {
    let mut p = Bg::start(cmd, out);
    support::wait_until("upload progress", Duration::from_secs(30), || {
        if progress() >= at {
            return true;
        }
        assert!(p.exited().is_none(), "client exited before the kill");
        false
    });
    drop(p);
}

#[test]
fn kill_9_mid_upload_and_mid_download_then_rerun() {
    let c = Cluster::start(false);
    let via = [c.entries[0]];
    let src = c.path("src");
    make_file(&src, BIG_FIXED, 7);
    let blocks = (BIG_FIXED / BS) as usize;
    let state = c.path("state");
    std::fs::create_dir_all(&state).unwrap();
    let args = [
        "--json",
        "upload",
        src.to_str().unwrap(),
        "--block-size",
        "64KiB",
    ];
    let upload_state = || blocks_begun(&state, blocks);
    kill_when(
        &mut ferry(&state, &via, &args),
        &c.path("killed-up.out"),
        blocks as u32 / 4,
        upload_state,
    );
    let rerun = ok(ferry(&state, &via, &args[..]));
    let rep = rerun.report();
    eprintln!("upload rerun after kill -9: {rep}");
    assert_eq!(rep["resumed"], true, "{rep}");
    assert!(
        rep["blocks_skipped"].as_u64().unwrap() >= blocks as u64 / 4 - 4,
        "{rep}"
    );
    assert!(
        rep["blocks_resent"].as_u64().unwrap() <= 4,
        "re-sent more than one per thread: {rep}"
    );
    assert_eq!(
        rep["blocks_sent"].as_u64().unwrap() + rep["blocks_skipped"].as_u64().unwrap(),
        blocks as u64
    );
    let id = rerun.json()["file_id"].as_str().unwrap().to_owned();

    let out = c.path("out");
    let dl_state = c.path("out.part.ferry");
    let dl_args = [
        "--json",
        "download",
        &id,
        "-o",
        out.to_str().unwrap(),
        "--threads",
        "4",
    ];
    let done = || bits_set(&dl_state, 180, 1, blocks);
    kill_when(
        &mut ferry(&state, &via, &dl_args),
        &c.path("killed-down.out"),
        blocks as u32 / 4,
        done,
    );
    assert!(
        !out.exists(),
        "a killed download must not leave PATH as if complete"
    );
    assert!(c.path("out.part").exists());
    let rep = ok(ferry(&state, &via, &dl_args)).report();
    eprintln!("download rerun after kill -9: {rep}");
    assert_eq!(rep["resumed"], true, "{rep}");
    assert!(
        rep["blocks_skipped"].as_u64().unwrap() >= blocks as u64 / 4,
        "{rep}"
    );
    assert!(rep["blocks_resent"].as_u64().unwrap() <= 4, "{rep}");
    assert_eq!(sha256_file(&out), sha256_file(&src));
    assert!(!c.path("out.part").exists() && !dl_state.exists());
}

#[test]
fn first_proxy_down_and_hung_proxy_mid_transfer() {
    let c = Cluster::start(true);
    let state = c.path("state");
    // First proxy in the list is down (nothing listens): everything goes through the second.
    let dead = free_addr();
    let src = c.path("src");
    make_file(&src, 8 << 20, 11);
    let via = [dead, c.entries[1]];
    let up = upload(&c, &via, &src, &["--block-size", "256KiB"]);
    assert!(up.report()["failovers"].as_u64().unwrap() >= 1);
    let id = up.json()["file_id"].as_str().unwrap().to_owned();
    let out = c.path("out-dead");
    download(&c, &via, &id, &out, &[]);
    assert_eq!(sha256_file(&out), sha256_file(&src));

    // Proxy A hangs (SIGSTOP) mid-upload: the client leaves it after its timeout and finishes
    // through proxy B.
    let conf = c.path("client.toml");
    std::fs::write(&conf, "timeout_ms = 1000\n").unwrap();
    let big = c.path("big");
    make_file(&big, BIG_FIXED, 12);
    let blocks = (BIG_FIXED / BS) as usize;
    let pair = [c.entries[0], c.entries[1]];
    let conf_s = conf.to_str().unwrap();
    let args = [
        "--config",
        conf_s,
        "--json",
        "upload",
        big.to_str().unwrap(),
        "--block-size",
        "64KiB",
    ];
    let log = c.path("client-hung.out");
    let mut p = Bg::start(&mut ferry(&state, &pair, &args), &log);
    let t = Instant::now();
    let begun = || -> u32 {
        std::fs::read_dir(&state)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| bits_set(&e.path(), 68, 0, blocks))
            .sum()
    };
    while begun() < blocks as u32 / 5 {
        assert!(t.elapsed() < Duration::from_secs(30), "no progress");
        std::thread::sleep(Duration::from_millis(1));
    }
    c.proc("proxy-a").signal(Signal::SIGSTOP);
    let stopped = Instant::now();
    let status = p.wait(Duration::from_secs(45)).expect("client finished");
    let took = stopped.elapsed();
    eprintln!("upload finished {took:?} after proxy A hung");
    c.proc("proxy-a").signal(Signal::SIGCONT);
    let err = std::fs::read_to_string(log.with_extension("err")).unwrap();
    assert!(status.success(), "upload failed: {err}");
    let v: Value = serde_json::from_str(std::fs::read_to_string(&log).unwrap().trim()).unwrap();
    eprintln!("hung-proxy upload: {}", v["report"]);
    assert!(v["report"]["failovers"].as_u64().unwrap() >= 1, "{v}");
    assert!(
        took < Duration::from_secs(30),
        "took {took:?} after the proxy hung"
    );
    let id = v["file_id"].as_str().unwrap().to_owned();

    // The same for a download: A hangs once a fifth of the blocks are written.
    let out = c.path("out-hung");
    let dl_state = c.path("out-hung.part.ferry");
    let dl_args = [
        "--config",
        conf_s,
        "--json",
        "download",
        &id,
        "-o",
        out.to_str().unwrap(),
    ];
    let log = c.path("client-hung-down.out");
    let mut p = Bg::start(&mut ferry(&state, &pair, &dl_args), &log);
    support::wait_until("download progress", Duration::from_secs(30), || {
        if bits_set(&dl_state, 180, 1, blocks) >= blocks as u32 / 5 {
            return true;
        }
        assert!(p.exited().is_none(), "download ended before the proxy hung");
        false
    });
    c.proc("proxy-a").signal(Signal::SIGSTOP);
    let stopped = Instant::now();
    let status = p.wait(Duration::from_secs(45)).expect("client finished");
    let took = stopped.elapsed();
    c.proc("proxy-a").signal(Signal::SIGCONT);
    let err = std::fs::read_to_string(log.with_extension("err")).unwrap();
    assert!(status.success(), "download failed: {err}");
    let v: Value = serde_json::from_str(std::fs::read_to_string(&log).unwrap().trim()).unwrap();
    eprintln!(
        "download finished {took:?} after proxy A hung: {}",
        v["report"]
    );
    assert!(v["report"]["failovers"].as_u64().unwrap() >= 1, "{v}");
    assert!(
        took < Duration::from_secs(30),
        "took {took:?} after the proxy hung"
    );
    assert_eq!(sha256_file(&out), sha256_file(&big));

    // Proxy A killed (SIGKILL) mid-upload: each thread loses only the block it had in flight.
    let big2 = c.path("big2");
    make_file(&big2, BIG_FIXED, 20); // not 13: make_file ORs the seed with 1, so 13 = 12
    let args = [
        "--config",
        conf_s,
        "--json",
        "upload",
        big2.to_str().unwrap(),
        "--block-size",
        "64KiB",
    ];
    let log = c.path("client-killed-proxy.out");
    let mut p = Bg::start(&mut ferry(&state, &pair, &args), &log);
    support::wait_until("upload progress", Duration::from_secs(30), || {
        if begun() >= blocks as u32 / 5 {
            return true;
        }
        assert!(
            p.exited().is_none(),
            "upload ended before the proxy was killed: {} {}",
            std::fs::read_to_string(&log).unwrap(),
            std::fs::read_to_string(log.with_extension("err")).unwrap()
        );
        false
    });
    c.proc("proxy-a").signal(Signal::SIGKILL);
    let status = p.wait(Duration::from_secs(45)).expect("client finished");
    let err = std::fs::read_to_string(log.with_extension("err")).unwrap();
    assert!(status.success(), "upload failed: {err}");
    let v: Value = serde_json::from_str(std::fs::read_to_string(&log).unwrap().trim()).unwrap();
    let rep = &v["report"];
    eprintln!("upload with proxy A killed: {rep}");
    assert!(rep["failovers"].as_u64().unwrap() >= 1, "{rep}");
    assert!(
        rep["blocks_resent"].as_u64().unwrap() <= 4,
        "more than one block per thread: {rep}"
    );
    let id = v["file_id"].as_str().unwrap().to_owned();
    let out = c.path("out-killed");
    download(&c, &pair, &id, &out, &[]);
    assert_eq!(sha256_file(&out), sha256_file(&big2));
}

#[test]
fn bad_input_fails_with_one_line_and_no_output() {
    let c = Cluster::start(false);
    let state = c.path("state");
    let via = [c.server];
    let src = c.path("src");
    make_file(&src, 1000, 3);
    let id = ok(ferry(&state, &via, &["upload", src.to_str().unwrap()]))
        .stdout
        .trim()
        .to_owned();
    let missing_dir = c.path("no/such/dir/out");
    let dead = [free_addr(), free_addr()];
    // A live proxy whose only upstream (the server) is down answers HELLO with error 19.
    let orphan = free_addr();
    let _orphan = Proc::spawn(
        "orphan-proxy",
        Command::new(bin("ferry-proxy"))
            .arg("--listen")
            .arg(orphan.to_string())
            .arg("--upstream")
            .arg(free_addr().to_string()),
        c.dir.path(),
    );
    wait_ready(orphan, Duration::from_secs(20));
    let cases: Vec<(&str, Command, &str)> = vec![
        (
            "missing file",
            ferry(&state, &via, &["upload", c.path("nope").to_str().unwrap()]),
            "No such file",
        ),
        (
            "directory",
            ferry(&state, &via, &["upload", c.dir.path().to_str().unwrap()]),
            "directory",
        ),
        (
            "missing output dir",
            ferry(
                &state,
                &via,
                &["download", &id, "-o", missing_dir.to_str().unwrap()],
            ),
            "does not exist",
        ),
        (
            "unknown id",
            ferry(
                &state,
                &via,
                &[
                    "download",
                    "0000000000099999-zzzz",
                    "-o",
                    c.path("o1").to_str().unwrap(),
                ],
            ),
            "NotFound",
        ),
        (
            "empty proxy list",
            {
                let mut cmd = ferry(&state, &[], &["stat", &id]);
                cmd.env("FERRY_PROXIES", "");
                cmd
            },
            "empty",
        ),
        (
            "unparsable proxy",
            ferry(&state, &[], &["--proxy", "not-an-address", "stat", &id]),
            "bad proxy address",
        ),
        (
            "no proxy at all",
            ferry(&state, &[], &["stat", &id]),
            "no proxy",
        ),
        (
            "every proxy down (past a 1 s outage window)",
            ferry(
                &state,
                &dead,
                &["--outage-window", "1", "upload", src.to_str().unwrap()],
            ),
            "gave up after",
        ),
        (
            // A live proxy without a server is waited on for the outage window (here 3 s),
            // long enough to ride out a server restart, then reported.
            "server behind the proxy down",
            {
                let conf = c.path("short-timeout.toml");
                std::fs::write(&conf, "timeout_ms = 1000\noutage_window_ms = 3000\n").unwrap();
                let conf = conf.to_str().unwrap().to_owned();
                ferry(&state, &[orphan], &["--config", &conf, "stat", &id])
            },
            "Upstream",
        ),
        (
            "decimal block size",
            ferry(
                &state,
                &via,
                &["upload", src.to_str().unwrap(), "--block-size", "4MB"],
            ),
            "binary unit",
        ),
    ];
    for (what, cmd, needle) in cases {
        let t = Instant::now();
        let r = run(cmd);
        assert!(!r.ok, "{what}: succeeded");
        assert!(r.stdout.is_empty(), "{what}: stdout {:?}", r.stdout);
        let lines: Vec<&str> = r.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        if what != "decimal block size" {
            // clap's own usage errors span several lines; ours are exactly one.
            assert_eq!(lines.len(), 1, "{what}: {:?}", r.stderr);
        }
        assert!(r.stderr.contains(needle), "{what}: {:?}", r.stderr);
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "{what} took {:?}",
            t.elapsed()
        );
    }
    for o in ["o1", "o1.part", "o1.part.ferry"] {
        assert!(!c.path(o).exists(), "{o} left behind");
    }
    // An env proxy list is used when no --proxy flag is given.
    let mut cmd = ferry(&state, &[], &["stat", &id]);
    cmd.env("FERRY_PROXIES", format!("{},{}", free_addr(), c.server));
    let r = ok(cmd);
    assert!(r.stdout.contains("size: 1000"), "{}", r.stdout);
}

#[test]
fn file_changed_behind_stale_state_is_a_server_side_hash_mismatch() {
    let c = Cluster::start(false);
    let via = [c.server];
    let src = c.path("src");
    make_file(&src, BIG_FIXED, 31);
    let blocks = (BIG_FIXED / BS) as usize;
    let state = c.path("state");
    std::fs::create_dir_all(&state).unwrap();
    let args = ["upload", src.to_str().unwrap(), "--block-size", "64KiB"];
    let begun = || blocks_begun(&state, blocks);
    kill_when(
        &mut ferry(&state, &via, &args),
        &c.path("killed.out"),
        blocks as u32 / 10,
        begun,
    );
    // Change the tail without changing size or mtime: the resume state (keyed by path, size,
    // mtime) still holds the old SHA-256, so only the server's whole-file check can catch it.
    let mtime = std::fs::metadata(&src).unwrap().modified().unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
        f.write_all_at(&[0x5a; 4096], BIG_FIXED - 4096).unwrap();
        f.set_modified(mtime).unwrap();
    }
    let r = run(ferry(&state, &via, &args));
    assert!(!r.ok, "upload of a changed file succeeded: {}", r.stdout);
    assert!(r.stdout.is_empty(), "no file id for a failed upload");
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("server-side hash mismatch"),
        "{}",
        r.stderr
    );
    assert_eq!(
        std::fs::read_dir(&state).unwrap().count(),
        0,
        "stale state dropped"
    );
    // The next run hashes the file afresh and succeeds with the new bytes.
    let id = ok(ferry(&state, &via, &args)).stdout.trim().to_owned();
    let out = c.path("out");
    ok(ferry(
        &state,
        &via,
        &["download", &id, "-o", out.to_str().unwrap()],
    ));
    assert_eq!(sha256_file(&out), sha256_file(&src));
}
