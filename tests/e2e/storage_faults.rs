//! Faults the storage must survive, injected into the real `ferry-server` (the security issue's
//! "faults" list): fsync and write errors (libfiu's `fiu-run`/`fiu-ctrl`, Debian `fiu-utils`).
//! After each: the client gets a clear error, no acknowledged byte is lost, no torn file is
//! visible, the upload resumes once the fault is gone, and everything survives kill -9.
//!
//! Tools are installed by `.ci/run`; elsewhere a missing tool skips the test with a message.

use crate::support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::cli::{ferry, ok, one_by_one, run};
use support::server::Server;
use support::{Proc, bin, files_under, free_addr, make_file, sha256_file, wait_ready};

/// A `ferry-server` on `data`, optionally under `fiu-run -x` (fault points controllable at run
/// time with `fiu-ctrl`; fiu-run execs the server, so the child's pid is the server's).
fn start(dir: &Path, data: &Path, under_fiu: bool) -> Server {
    if !under_fiu {
        return Server::start_in(dir, data, "");
    }
    let mut fiu = Command::new("fiu-run");
    fiu.arg("-x").arg(bin("ferry-server"));
    Server::start_under(fiu, dir, data, "")
}

/// Bytes in the server's upload temp files: each grows as its blocks arrive.
fn temp_bytes(data: &Path) -> u64 {
    files_under(&data.join("tmp"))
        .iter()
        .map(|f| f.metadata().map_or(0, |m| m.len()))
        .sum()
}

/// Turns a libfiu fault point on or off in the running server.
fn fiu(srv: &Server, command: &str) {
    let st = Command::new("fiu-ctrl")
        .arg("-c")
        .arg(command)
        .arg(srv.proc.pid().to_string())
        .status()
        .expect("fiu-ctrl runs");
    assert!(st.success(), "fiu-ctrl -c {command:?} failed");
}

fn upload(state: &Path, addr: SocketAddr, file: &Path) -> support::cli::Run {
    run(ferry(
        state,
        &[addr],
        &[
            "--json",
            "upload",
            "--block-size",
            "1MiB",
            file.to_str().unwrap(),
        ],
    ))
}

fn download_sha(state: &Path, addr: SocketAddr, id: &str, out: &Path) -> String {
    let _ = std::fs::remove_file(out);
    ok(ferry(
        state,
        &[addr],
        &["download", id, "-o", out.to_str().unwrap()],
    ));
    sha256_file(out)
}

#[test]
fn injected_fsync_and_write_errors_are_clear_and_lose_nothing() {
    if !support::have("fiu-run") || !support::have("fiu-ctrl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (data, state) = (dir.path().join("data"), dir.path().join("state"));
    let srv = start(dir.path(), &data, true);
    let (a, b, c) = (
        dir.path().join("a.jpg"),
        dir.path().join("b.mp4"),
        dir.path().join("c.png"),
    );
    make_file(&a, 3 << 20, 1); // one request
    make_file(&b, (9 << 20) + 7, 2); // ten 1 MiB blocks
    make_file(&c, 200_000, 3);
    let id_a = upload(&state, srv.addr, &a).json()["file_id"]
        .as_str()
        .unwrap()
        .to_owned();

    // fsync and fdatasync fail with EIO: a big and a small upload are refused with a clear,
    // server-side I/O error; nothing half-written becomes visible.
    fiu(&srv, "enable name=posix/io/sync/*,failinfo=5");
    for f in [&b, &c] {
        let r = upload(&state, srv.addr, f);
        assert!(!r.ok, "upload of {} passed a failing fsync", f.display());
        // Error 16 (Io), naming what failed: the metadata database's sync (session insert)
        // or the file's.
        assert!(
            r.stderr.contains("error 16 Io"),
            "unclear error: {}",
            r.stderr
        );
    }
    fiu(&srv, "disable name=posix/io/sync/*");
    let stored = files_under(&data.join("data"));
    assert_eq!(stored.len(), 1, "only a is stored: {stored:?}");

    // The fault is gone: both uploads go in.
    let rb = upload(&state, srv.addr, &b);
    assert!(rb.ok, "{}", rb.stderr);
    let id_b = rb.json()["file_id"].as_str().unwrap().to_owned();
    let rc = upload(&state, srv.addr, &c);
    assert!(rc.ok, "{}", rc.stderr);
    let id_c = rc.json()["file_id"].as_str().unwrap().to_owned();

    // Writes fail (file payloads and the metadata database alike): refused, then served again.
    let d = dir.path().join("d.bin");
    make_file(&d, 2 << 20, 4);
    fiu(&srv, "enable name=posix/io/rw/pwrite,failinfo=5");
    let r = upload(&state, srv.addr, &d);
    assert!(!r.ok && r.stderr.contains("error 16"), "{}", r.stderr);
    fiu(&srv, "disable name=posix/io/rw/pwrite");
    let rd = upload(&state, srv.addr, &d);
    assert!(rd.ok, "{}", rd.stderr);
    let id_d = rd.json()["file_id"].as_str().unwrap().to_owned();

    // Every acknowledged file is whole, before and after a kill -9 and a restart without faults.
    let files = [(&id_a, &a), (&id_b, &b), (&id_c, &c), (&id_d, &d)];
    let out = dir.path().join("out");
    for (id, f) in files {
        assert_eq!(download_sha(&state, srv.addr, id, &out), sha256_file(f));
    }
    let mut srv = srv;
    srv.proc.kill();
    let srv = start(dir.path(), &data, false);
    for (id, f) in files {
        assert_eq!(download_sha(&state, srv.addr, id, &out), sha256_file(f));
    }
    assert_eq!(files_under(&data.join("data")).len(), 4);
    assert!(
        files_under(&data.join("tmp")).is_empty(),
        "temp files left: {:?}",
        files_under(&data.join("tmp"))
    );
}

#[test]
fn fsync_failing_mid_upload_keeps_acknowledged_blocks_and_resumes() {
    if !support::have("fiu-run") || !support::have("fiu-ctrl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (data, state) = (dir.path().join("data"), dir.path().join("state"));
    let srv = start(dir.path(), &data, true);
    // 128 MiB in 64 KiB blocks over one connection, each block fdatasynced before it is
    // acknowledged: long enough for the fault to land mid-upload.
    let f = dir.path().join("video.mp4");
    make_file(&f, 128 << 20, 9);
    let mut cmd = ferry(&state, &[srv.addr], &one_by_one(&f));
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut client = Proc {
        name: "ferry upload".into(),
        child: Some(child),
        log: dir.path().join("unused.log"),
    };
    // Wait for the upload to be under way, then make every sync fail.
    support::wait_until("blocks arriving", Duration::from_secs(20), || {
        temp_bytes(&data) > 0
    });
    fiu(&srv, "enable name=posix/io/sync/*,failinfo=5");
    let status = client
        .wait_exit(Duration::from_secs(60))
        .expect("client ends");
    assert!(
        !status.success(),
        "the upload finished before the fault landed"
    );
    fiu(&srv, "disable name=posix/io/sync/*");
    assert!(
        files_under(&data.join("data")).is_empty(),
        "a file became visible without its bytes synced"
    );

    // The rerun resumes: acknowledged blocks were kept, only the rest is sent.
    let r = run(ferry(&state, &[srv.addr], &one_by_one(&f)));
    assert!(r.ok, "{}", r.stderr);
    let rep = r.report();
    assert_eq!(rep["resumed"], true, "{rep}");
    let (sent, total) = (
        rep["blocks_sent"].as_u64().unwrap(),
        rep["blocks_total"].as_u64().unwrap(),
    );
    assert!(
        sent < total && rep["blocks_skipped"].as_u64().unwrap() > 0,
        "nothing kept: {rep}"
    );
    let id = r.json()["file_id"].as_str().unwrap().to_owned();
    let out = dir.path().join("out");
    assert_eq!(download_sha(&state, srv.addr, &id, &out), sha256_file(&f));
}

/// libfaketime's preload library (Debian package `faketime`).
fn libfaketime() -> Option<PathBuf> {
    if !support::have("faketime") {
        return None;
    }
    let found = [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib",
    ]
    .iter()
    .map(|d| Path::new(d).join("faketime/libfaketimeMT.so.1"))
    .find(|p| p.exists());
    assert!(
        found.is_some(),
        "faketime is installed but libfaketimeMT.so.1 is not found"
    );
    found
}

#[test]
fn wall_clock_jumps_neither_expire_live_sessions_nor_keep_dead_ones() {
    let Some(lib) = libfaketime() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (data, state) = (dir.path().join("data"), dir.path().join("state"));
    // The server's wall clock is whatever this file says, re-read on every call; its
    // monotonic clock stays real (FAKETIME_DONT_FAKE_MONOTONIC).
    let clock = dir.path().join("clock");
    std::fs::write(&clock, "+0\n").unwrap();
    let addr = free_addr();
    // The clients share the server's clock (as hosts synced to one time source would): their
    // session tokens are checked against the server's wall clock.
    let faked = |mut cmd: Command| {
        cmd.env("LD_PRELOAD", &lib)
            .env("FAKETIME_TIMESTAMP_FILE", &clock)
            .env("FAKETIME_NO_CACHE", "1")
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        cmd
    };
    let server = Command::new(bin("ferry-server"));
    let conf = "session_ttl_secs = 6\n";
    let mut cmd = faked(support::server_command(
        server,
        dir.path(),
        "ferry-server",
        conf,
        addr,
        &data,
    ));
    let srv = Proc::spawn("ferry-server", &mut cmd, dir.path());
    wait_ready(addr, Duration::from_secs(15));

    // Half an upload: the client is killed once some blocks are acknowledged.
    let f = dir.path().join("clip.mov");
    make_file(&f, 64 << 20, 5);
    let args = one_by_one(&f);
    let mut client = Proc::spawn(
        "ferry-upload",
        &mut faked(ferry(&state, &[addr], &args)),
        dir.path(),
    );
    // One connection sends the 64 KiB blocks in order: the fourth begun, three are stored.
    support::wait_until("three blocks stored", Duration::from_secs(20), || {
        temp_bytes(&data) >= 4 << 16
    });
    client.kill();

    // The wall clock jumps two days ahead, far past the 6 s session lifetime, while only
    // 2 s really pass: the session is not idle by the monotonic clock, so it must survive.
    std::fs::write(&clock, "+2d\n").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    // A client whose clock was left behind has tokens from two days ago: refused, clearly.
    let stale = run(ferry(&state, &[addr], &args));
    assert!(
        !stale.ok && stale.stderr.contains("error 6"),
        "a two-day-old token was accepted: {}",
        stale.stderr
    );
    let r = run(faked(ferry(&state, &[addr], &args)));
    assert!(r.ok, "{}", r.stderr);
    let rep = r.report();
    assert_eq!(
        rep["resumed"], true,
        "the session died with the clock jump: {rep}"
    );
    assert!(rep["blocks_skipped"].as_u64().unwrap() > 0, "{rep}");
    let id = r.json()["file_id"].as_str().unwrap().to_owned();
    let out = dir.path().join("out");
    let dl = run(faked(ferry(
        &state,
        &[addr],
        &["download", &id, "-o", out.to_str().unwrap()],
    )));
    assert!(dl.ok, "{}", dl.stderr);
    assert_eq!(sha256_file(&out), sha256_file(&f));

    // The clock jumps back a day: an idle session still expires after its 6 real seconds.
    let g = dir.path().join("other.mov");
    make_file(&g, 64 << 20, 6);
    let gargs = one_by_one(&g);
    let mut client = Proc::spawn(
        "ferry-upload2",
        &mut faked(ferry(&state, &[addr], &gargs)),
        dir.path(),
    );
    let before = temp_bytes(&data);
    support::wait_until(
        "the second upload's session",
        Duration::from_secs(20),
        || temp_bytes(&data) > before,
    );
    client.kill();
    std::fs::write(&clock, "-1d\n").unwrap();
    support::wait_until(
        "the idle session to expire after the clock went back",
        Duration::from_secs(20),
        || files_under(&data.join("tmp")).is_empty(),
    );
    assert!(srv.log_text().contains("expired"));
}

/// One upload held in UPLOAD_INIT (a slow disk or database, here a fault that holds its worker
/// after the reservation, before the temp file) holds up nobody else: another big upload on the
/// same server opens its session, sends its blocks and finishes meanwhile, and the held one
/// finishes once released.
#[test]
fn an_upload_held_in_init_does_not_hold_up_another() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let addr = free_addr();
    let srv = support::start_server(
        dir.path(),
        "held",
        "[faults]\npause_at = \"session-reserved\"\npause_ms = 5000\npause_times = 1\n",
        addr,
        &data,
    );
    let (held, other) = (dir.path().join("held.mp4"), dir.path().join("other.mp4"));
    make_file(&held, 3 * 65536 + 7, 31);
    make_file(&other, 3 * 65536 + 9, 32);
    let state = dir.path().join("state");
    let mut first = Proc::spawn(
        "held-upload",
        &mut ferry(&state, &[addr], &one_by_one(&held)),
        dir.path(),
    );
    support::wait_log(
        &srv,
        "phase session-reserved reached",
        Duration::from_secs(20),
    );
    let t = std::time::Instant::now();
    let r = run(ferry(
        &dir.path().join("state2"),
        &[addr],
        &one_by_one(&other),
    ));
    let took = t.elapsed();
    assert!(r.ok, "{}", r.stderr);
    eprintln!("another upload finished in {took:?} while the first was held in INIT");
    assert!(
        took < Duration::from_secs(4),
        "the other upload waited for the held one: {took:?}"
    );
    let id = r.json()["file_id"].as_str().unwrap().to_owned();
    assert_eq!(
        download_sha(&state, addr, &id, &dir.path().join("out")),
        sha256_file(&other)
    );
    let status = first.wait_exit(Duration::from_secs(30));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{}\n{}",
        first.log_text(),
        srv.log_text()
    );
}

#[test]
fn kill_9_at_each_phase_of_a_commit_loses_nothing_and_tears_nothing() {
    use ferry_server::config::PHASES;
    let dir = tempfile::tempdir().unwrap();
    // Big uploads (five 64 KiB blocks) go through every phase; small ones (one request)
    // through the file phases.
    let big = dir.path().join("big.mp4");
    make_file(&big, (5 * 65536) - 100, 21);
    let small = dir.path().join("small.jpg");
    make_file(&small, 30_000, 22);
    let cases = PHASES.iter().map(|p| (*p, &big)).chain(
        PHASES
            .iter()
            .filter(|p| p.starts_with("file-"))
            .map(|p| (*p, &small)),
    );
    for (n, (phase, file)) in cases.enumerate() {
        let case = dir.path().join(format!("case{n}"));
        std::fs::create_dir_all(&case).unwrap();
        let (data, state) = (case.join("data"), case.join("state"));
        let addr = free_addr();
        let mut srv = support::start_server(
            &case,
            "paused",
            &format!("[faults]\npause_at = \"{phase}\"\npause_ms = 60000\n"),
            addr,
            &data,
        );
        let args = one_by_one(file);
        let mut client = Proc::spawn("upload", &mut ferry(&state, &[addr], &args), &case);
        let marker = format!("phase {phase} reached");
        support::wait_log(&srv, &marker, Duration::from_secs(30));
        srv.kill();
        client.kill();

        // Restarted, before any client comes back: whatever is visible is whole.
        let srv = support::start_server(&case, "restarted", "", addr, &data);
        let want = sha256_file(file);
        for f in files_under(&data.join("data")) {
            assert_eq!(sha256_file(&f), want, "{phase}: torn file {}", f.display());
        }
        // The rerun finishes the upload; exactly one copy is stored; no temp file is left.
        let r = run(ferry(&state, &[addr], &args));
        assert!(r.ok, "{phase}: rerun failed: {}", r.stderr);
        let id = r.json()["file_id"].as_str().unwrap().to_owned();
        let out = case.join("out");
        assert_eq!(download_sha(&state, addr, &id, &out), want, "{phase}");
        let stored = files_under(&data.join("data"));
        assert_eq!(stored.len(), 1, "{phase}: {stored:?}");
        // Nothing acknowledged is sent again: at most the block in flight at the kill, and
        // none once every block was acknowledged (file phases).
        let rep = r.report();
        if *file == big {
            let limit = if phase.starts_with("file-") { 0 } else { 1 };
            assert!(
                rep["blocks_resent"].as_u64().unwrap() <= limit,
                "{phase}: {rep}"
            );
            if phase.starts_with("file-") {
                assert_eq!(rep["blocks_sent"], 0, "{phase}: {rep}");
            }
        }
        assert!(
            files_under(&data.join("tmp")).is_empty(),
            "{phase}: temp files left"
        );
        eprintln!(
            "{phase} ({}): rerun ok, report {rep}",
            file.file_name().unwrap().to_string_lossy()
        );
        drop(srv);
    }
}

/// The database goes away while a commit is under way (the file placed, not yet marked
/// stored) and the server stays up: the commit fails, the client's retry finishes that file
/// once the database is back, and nothing is stored twice (before, the retry stored the
/// content again and the first file was committed at the next start as a copy nobody knew:
/// the long cluster chaos run's one file more on disk than uploads).
#[test]
fn a_commit_cut_by_a_database_outage_is_finished_by_the_retry_not_stored_again() {
    let Some(pg) = support::pg_server::PgServer::start("commit cut by a database outage") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.mp4");
    make_file(&big, (5 * 65536) - 100, 31);
    let small = dir.path().join("small.jpg");
    make_file(&small, 30_000, 32);
    for (n, file) in [&small, &big].into_iter().enumerate() {
        let case = dir.path().join(format!("case{n}"));
        std::fs::create_dir_all(&case).unwrap();
        let (data, state) = (case.join("data"), case.join("state"));
        let addr = free_addr();
        let conf = format!(
            "meta_url = \"{}\"\n[faults]\npause_at = \"file-renamed\"\npause_ms = 1500\n\
             pause_times = 1\n",
            pg.url
        );
        let mut srv = support::start_server(&case, "server", &conf, addr, &data);
        let mut client = Proc::spawn(
            "upload",
            &mut ferry(&state, &[addr], &one_by_one(file)),
            &case,
        );
        support::wait_log(&srv, "phase file-renamed reached", Duration::from_secs(30));
        pg.stop();
        support::wait_log(&srv, "file commit", Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(500));
        pg.start_again();
        let st = client
            .wait_exit(Duration::from_secs(60))
            .expect("upload ends");
        assert!(
            st.success(),
            "case {n}: upload failed:\n{}",
            client.log_text()
        );
        let stored = files_under(&data.join("data"));
        assert_eq!(stored.len(), 1, "case {n}: {stored:?}\n{}", srv.log_text());
        assert!(
            srv.log_text().contains("finishing the commit of file"),
            "case {n}"
        );
        // A restart finds nothing more to commit: still the one file, and it is whole.
        srv.kill();
        let srv = support::start_server(
            &case,
            "restarted",
            &format!("meta_url = \"{}\"\n", pg.url),
            addr,
            &data,
        );
        assert_eq!(
            files_under(&data.join("data")).len(),
            1,
            "case {n} after restart"
        );
        assert_eq!(sha256_file(&stored[0]), sha256_file(file), "case {n}");
        drop(srv);
    }
}
