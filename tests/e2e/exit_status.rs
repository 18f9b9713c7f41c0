//! The `ferry` binary's exit status and `--json` error object, class by class, against a real
//! server behind a server-proxy and a client-proxy: each way a user's command fails ends with
//! its documented status (README, `--help`) and one JSON object on stderr naming the protocol
//! error, its class and the peer.

use crate::support;

use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use support::cli::{Run, ferry, ok, one_by_one, run};
use support::{Proc, free_addr, make_file, start_server};

/// Checks a failed run: its exit status, and the JSON error's class, exit and (when the
/// failure was an error reply) code and name. Returns the JSON.
fn failed(r: &Run, exit: i32, class: &str, code: Option<(u16, &str)>) -> Value {
    assert!(!r.ok, "succeeded: {}", r.stdout);
    let v = r.error();
    assert_eq!(r.code, Some(exit), "{v}");
    assert_eq!(
        (v["class"].as_str(), v["exit"].as_i64()),
        (Some(class), Some(i64::from(exit))),
        "{v}"
    );
    match code {
        Some((n, name)) => assert_eq!(
            (v["code"].as_u64(), v["name"].as_str()),
            (Some(u64::from(n)), Some(name)),
            "{v}"
        ),
        None => assert!(v["code"].is_null(), "{v}"),
    }
    assert!(v["error"].as_str().is_some_and(|t| !t.is_empty()), "{v}");
    v
}

/// A server behind a server-proxy behind a client-proxy, as users reach it.
struct Chain {
    _server: Proc,
    _proxies: Vec<Proc>,
    /// The client-proxy: what `ferry` is given.
    entry: SocketAddr,
}

fn chain(dir: &Path, conf: &str) -> Chain {
    let addr = free_addr();
    let server = start_server(dir, "ferry-server", conf, addr, &dir.join("data"));
    let mut proxies = Vec::new();
    let mut upstream = addr;
    for name in ["server-proxy", "client-proxy"] {
        let listen = free_addr();
        proxies.push(Proc::spawn(
            name,
            std::process::Command::new(support::bin("ferry-proxy"))
                .arg("--listen")
                .arg(listen.to_string())
                .arg("--upstream")
                .arg(upstream.to_string()),
            dir,
        ));
        support::wait_ready(listen, Duration::from_secs(20));
        upstream = listen;
    }
    Chain {
        _server: server,
        _proxies: proxies,
        entry: upstream,
    }
}

#[test]
fn each_failure_class_has_its_exit_status_and_json_error() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let c = chain(dir.path(), "[apps.ferry]\nmax_files = 1\n");
    let addr = c.entry;
    let json = |args: &[&str]| {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        ferry(&state, &[addr], &a)
    };

    // Not found: an id that does not exist; the peer that answered is named.
    let v = failed(
        &run(json(&["stat", "0000000000000009-aaaaaaaaaaaaaaaa"])),
        4,
        "not_found",
        Some((7, "NotFound")),
    );
    assert_eq!(v["peer"], addr.to_string(), "{v}");

    // Auth: a wrong key.
    let mut wrong = json(&["stat", "0000000000000009-aaaaaaaaaaaaaaaa"]);
    let other: String = support::auth::KEY_SECRET.chars().rev().collect();
    wrong.env("FERRY_KEY", format!("{}:{other}", support::auth::KEY_ID));
    failed(&run(wrong), 3, "auth", Some((6, "Auth")));

    // Limit: an upload over the app's quota (one file per user).
    let a = dir.path().join("a.bin");
    let b = dir.path().join("b.bin");
    make_file(&a, 100_000, 1);
    make_file(&b, 100_000, 2);
    ok(json(&["upload", a.to_str().unwrap()]));
    failed(
        &run(json(&["upload", b.to_str().unwrap()])),
        7,
        "limit",
        Some((26, "Quota")),
    );

    // Usage: a bad flag, reported as --json asks.
    failed(
        &run(json(&["upload", "--no-such-flag", "x"])),
        2,
        "usage",
        None,
    );
    // Without --json: clap's message and the same status.
    let r = run(ferry(&state, &[addr], &["upload", "--no-such-flag", "x"]));
    assert_eq!(r.code, Some(2), "{}", r.stderr);

    // Unreachable: every proxy of the list refuses connections.
    let closed = [free_addr(), free_addr()];
    let t = Instant::now();
    let r = run(ferry(
        &state,
        &closed,
        &[
            "--json",
            "--outage-window",
            "1",
            "stat",
            "0000000000000001-x",
        ],
    ));
    let v = failed(&r, 6, "unreachable", None);
    assert!(
        v["peer"]
            .as_str()
            .is_some_and(|p| p.contains(&closed[0].to_string())),
        "{v}"
    );
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
}

/// Integrity: a block of a stored file is damaged on the server's disk; the download does not
/// hand over wrong bytes, it fails with the integrity status.
#[test]
fn a_block_corrupted_on_disk_fails_the_download_with_the_integrity_status() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let c = chain(dir.path(), "");
    let addr = c.entry;
    let src = dir.path().join("clip.bin");
    make_file(&src, 3 << 20, 7);
    let up = ok(ferry(
        &state,
        &[addr],
        &[
            "--json",
            "upload",
            "--block-size",
            "1MiB",
            src.to_str().unwrap(),
        ],
    ));
    let id = up.report()["file_id"].as_str().unwrap().to_string();
    let stored: Vec<_> = support::files_under(&dir.path().join("data/data"));
    assert_eq!(stored.len(), 1, "{stored:?}");
    let mut bytes = std::fs::read(&stored[0]).unwrap();
    bytes[(1 << 20) + 5] ^= 0xff;
    std::fs::write(&stored[0], &bytes).unwrap();
    let out = dir.path().join("copy.bin");
    let r = run(ferry(
        &state,
        &[addr],
        &["--json", "download", &id, "-o", out.to_str().unwrap()],
    ));
    failed(&r, 5, "integrity", None);
    assert!(!out.exists(), "no damaged file handed over");
}

/// Interrupted: Ctrl-C in the middle of an upload exits 130 with the JSON error, and the same
/// command run again resumes.
#[test]
fn ctrl_c_mid_transfer_exits_130_and_the_rerun_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let c = chain(dir.path(), "");
    let addr = c.entry;
    let src = dir.path().join("movie.bin");
    make_file(&src, 128 << 20, 3);
    let args = one_by_one(&src);
    let child = ferry(&state, &[addr], &args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    // The upload session is open and blocks arrive (its temp file grows as they do).
    let tmp = dir.path().join("data").join("tmp");
    support::wait_until("blocks arriving", Duration::from_secs(20), || {
        support::files_under(&tmp)
            .iter()
            .any(|f| f.metadata().is_ok_and(|m| m.len() > 0))
    });
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let r = Run::from(child.wait_with_output().unwrap());
    if r.ok {
        panic!("the upload finished before the interrupt: {}", r.stdout);
    }
    failed(&r, 130, "interrupted", None);
    let again = ok(ferry(&state, &[addr], &args));
    assert_eq!(again.report()["resumed"], true, "{}", again.stdout);
}
