//! Faults the storage must survive, injected into the real `ferry-server` (the security issue's
//! "faults" list): fsync and write errors (libfiu's `fiu-run`/`fiu-ctrl`, Debian `fiu-utils`).
//! After each: the client gets a clear error, no acknowledged byte is lost, no torn file is
//! visible, the upload resumes once the fault is gone, and everything survives kill -9.
//!
//! Tools are installed by `.ci/run`; elsewhere a missing tool skips the test with a message.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::cli::{ferry, ok, run};
use support::{Proc, bin, free_addr, make_file, sha256_file, wait_ready};

/// A `ferry-server` on `data`, optionally under `fiu-run -x` (fault points controllable at run
/// time with `fiu-ctrl`).
struct Server {
    proc: Proc,
    addr: SocketAddr,
}

impl Server {
    fn start(dir: &Path, data: &Path, under_fiu: bool) -> Server {
        let addr = free_addr();
        let server = bin("ferry-server");
        let mut cmd = if under_fiu {
            let mut c = Command::new("fiu-run");
            c.arg("-x").arg(&server);
            c
        } else {
            Command::new(&server)
        };
        cmd.arg("--listen")
            .arg(addr.to_string())
            .arg("--data")
            .arg(data);
        // fiu-run execs the server, so the child's pid is the server's (fiu-ctrl needs it).
        let proc = Proc::spawn("ferry-server", &mut cmd, dir);
        wait_ready(addr, Duration::from_secs(15));
        Server { proc, addr }
    }

    /// Turns a libfiu fault point on or off in the running server.
    fn fiu(&self, command: &str) {
        let st = Command::new("fiu-ctrl")
            .arg("-c")
            .arg(command)
            .arg(self.proc.pid().to_string())
            .status()
            .expect("fiu-ctrl runs");
        assert!(st.success(), "fiu-ctrl -c {command:?} failed");
    }
}

/// Every regular file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
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
    let srv = Server::start(dir.path(), &data, true);
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
    srv.fiu("enable name=posix/io/sync/*,failinfo=5");
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
    srv.fiu("disable name=posix/io/sync/*");
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
    srv.fiu("enable name=posix/io/rw/pwrite,failinfo=5");
    let r = upload(&state, srv.addr, &d);
    assert!(!r.ok && r.stderr.contains("error 16"), "{}", r.stderr);
    srv.fiu("disable name=posix/io/rw/pwrite");
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
    let srv = Server::start(dir.path(), &data, false);
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
    let srv = Server::start(dir.path(), &data, true);
    // 128 MiB in 64 KiB blocks over one connection, each block fdatasynced before it is
    // acknowledged: long enough for the fault to land mid-upload.
    let f = dir.path().join("video.mp4");
    make_file(&f, 128 << 20, 9);
    let mut cmd = ferry(
        &state,
        &[srv.addr],
        &[
            "--json",
            "upload",
            "--threads",
            "1",
            "--block-size",
            "64KiB",
            f.to_str().unwrap(),
        ],
    );
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
    // Wait for the session to open, then make every sync fail.
    let t = std::time::Instant::now();
    while !srv.proc.log_text().contains("upload session") {
        assert!(t.elapsed() < Duration::from_secs(20), "no session opened");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50));
    srv.fiu("enable name=posix/io/sync/*,failinfo=5");
    let status = client
        .wait_exit(Duration::from_secs(60))
        .expect("client ends");
    assert!(
        !status.success(),
        "the upload finished before the fault landed"
    );
    srv.fiu("disable name=posix/io/sync/*");
    assert!(
        files_under(&data.join("data")).is_empty(),
        "a file became visible without its bytes synced"
    );

    // The rerun resumes: acknowledged blocks were kept, only the rest is sent.
    let r = run(ferry(
        &state,
        &[srv.addr],
        &[
            "--json",
            "upload",
            "--threads",
            "1",
            "--block-size",
            "64KiB",
            f.to_str().unwrap(),
        ],
    ));
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
