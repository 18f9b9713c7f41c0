//! Delegated tokens through the real binaries (issue 15): an app's backend mints a token with
//! `ferry token` (it holds the app key); the user's device runs `ferry` with only that token
//! (FERRY_TOKEN or --token-file, no FERRY_KEY) through a proxy, for every connection of its
//! transfers; ownership keeps another user from deleting the file; the token's scope, upload
//! limit, file and expiry hold, each a clear error with nothing changed; an upload cut off by
//! its token's expiry resumes with a fresh one.

use crate::support;

use nix::sys::signal::Signal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use support::cli::{Run, ferry, run};
use support::{Proc, bin, free_addr, make_file, sha256_file, wait_ready};

/// A server and one proxy in front of it, logging at debug level (so the secrets check below
/// reads everything they could say).
struct Setup {
    dir: tempfile::TempDir,
    proxy: SocketAddr,
    procs: Vec<Proc>,
    /// Everything the device's `ferry` runs printed (stdout and stderr, debug logs included).
    printed: std::cell::RefCell<String>,
}

impl Setup {
    fn start() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let server = free_addr();
        let mut cmd = support::server_command(
            Command::new(bin("ferry-server")),
            dir.path(),
            "ferry-server",
            "sync_blocks = false\nidle_timeout_ms = 2000\n\
             [apps.other]\nmax_stored_bytes = 1000\nmax_files = 5\n",
            server,
            &dir.path().join("data"),
        );
        let srv = Proc::spawn("ferry-server", cmd.env("RUST_LOG", "debug"), dir.path());
        wait_ready(server, Duration::from_secs(20));
        let proxy = free_addr();
        let px = Proc::spawn(
            "ferry-proxy",
            Command::new(bin("ferry-proxy"))
                .arg("--listen")
                .arg(proxy.to_string())
                .arg("--upstream")
                .arg(server.to_string())
                .env("RUST_LOG", "debug"),
            dir.path(),
        );
        wait_ready(proxy, Duration::from_secs(20));
        // Short timeouts: a stalled proxy is noticed within a second, and retried for 20 s.
        std::fs::write(
            dir.path().join("client.toml"),
            "timeout_ms = 1000\ntries_per_proxy = 2\noutage_window_ms = 20000\n",
        )
        .unwrap();
        Setup {
            dir,
            proxy,
            procs: vec![srv, px],
            printed: Default::default(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `ferry` on the app's backend, which holds the app key.
    fn backend(&self, args: &[&str]) -> Run {
        run(ferry(&self.path("backend"), &[], args))
    }

    /// `ferry token` as the app's backend: the token's hex text.
    fn mint(&self, user: &str, args: &[&str]) -> String {
        let mut all = vec!["--app", "demo", "--user", user, "--json", "token"];
        all.extend_from_slice(args);
        let r = self.backend(&all);
        assert!(r.ok, "ferry token {args:?}: {}", r.stderr);
        let v = r.json();
        assert_eq!(
            (v["app"].as_str(), v["user"].as_str()),
            (Some("demo"), Some(user))
        );
        v["token"].as_str().unwrap().to_owned()
    }

    /// `ferry` on a user's device: the token only, no app key.
    fn device(&self, token: &str, args: &[&str]) -> Command {
        let conf = self.path("client.toml");
        let mut all = vec!["--config", conf.to_str().unwrap(), "--json"];
        all.extend_from_slice(args);
        let mut cmd = ferry(&self.path("device"), &[self.proxy], &all);
        cmd.env_remove("FERRY_KEY")
            .env("FERRY_TOKEN", token)
            .env("RUST_LOG", "debug");
        cmd
    }

    fn on_device(&self, token: &str, args: &[&str]) -> Run {
        let r = run(self.device(token, args));
        let mut p = self.printed.borrow_mut();
        p.push_str(&r.stdout);
        p.push_str(&r.stderr);
        r
    }

    /// No log line and no output of the device names a secret: the app key, a token (as hex,
    /// or its MAC alone), whatever the run did (refusals included).
    fn assert_no_secrets(&self, tokens: &[&str]) {
        let mut texts = vec![(
            "the device's output".to_owned(),
            self.printed.borrow().clone(),
        )];
        for p in &self.procs {
            texts.push((format!("{}'s log", p.name), p.log_text()));
        }
        assert!(
            texts[1].1.contains("DEBUG"),
            "the server logs at debug level"
        );
        let mut secrets = vec![support::auth::KEY_SECRET.to_owned()];
        for t in tokens {
            secrets.push(t.to_string());
            // Its MAC alone, as hex (the last 32 bytes).
            secrets.push(t[t.len() - 64..].to_owned());
        }
        for (what, text) in &texts {
            for s in &secrets {
                assert!(
                    !text.contains(s.as_str()),
                    "{what} shows a secret ({}...)",
                    &s[..8]
                );
            }
        }
    }
}

fn failed_with(r: &Run, words: &[&str]) {
    assert!(!r.ok, "succeeded: {}", r.stdout);
    // With --json the failure is a JSON object on stderr: its text is the error.
    let json: Option<serde_json::Value> = serde_json::from_str(r.stderr.trim()).ok();
    let text = json
        .as_ref()
        .and_then(|v| v["error"].as_str())
        .unwrap_or(&r.stderr);
    for w in words {
        assert!(text.contains(w), "no {w:?} in: {}", r.stderr);
    }
}

#[test]
fn a_device_with_only_a_delegated_token_transfers_and_is_held_to_its_limits() {
    let s = Setup::start();
    let alice = s.mint("alice", &["--scope", "read,write,delete", "--ttl", "1h"]);
    let src = s.path("clip.bin");
    make_file(&src, (3 << 20) + 11, 5);
    // Blocks in parallel over several connections, every one opened with the same token.
    let up = s.on_device(
        &alice,
        &["upload", src.to_str().unwrap(), "--block-size", "1MiB"],
    );
    assert!(up.ok, "upload with a delegated token: {}", up.stderr);
    let id = up.json()["file_id"].as_str().unwrap().to_owned();
    let out = s.path("back.bin");
    let down = s.on_device(&alice, &["download", &id, "-o", out.to_str().unwrap()]);
    assert!(down.ok, "download: {}", down.stderr);
    assert_eq!(sha256_file(&out), sha256_file(&src));
    // The same from a token file (`--token-file`), with FERRY_TOKEN unset.
    std::fs::write(s.path("alice.token"), format!("{alice}\n")).unwrap();
    let tf = s.path("alice.token");
    let mut cmd = s.device("", &["--token-file", tf.to_str().unwrap(), "stat", &id]);
    cmd.env_remove("FERRY_TOKEN");
    let r = run(cmd);
    assert!(r.ok, "stat with --token-file: {}", r.stderr);

    // Mallory, another user of the app, reads alice's file (the id is the capability) but
    // cannot delete it; alice can.
    let mallory = s.mint("mallory", &["--scope", "read,write,delete"]);
    assert!(s.on_device(&mallory, &["stat", &id]).ok);
    failed_with(
        &s.on_device(&mallory, &["delete", &id]),
        &["error 25 Forbidden", "only its owner"],
    );
    assert!(
        s.on_device(&alice, &["stat", &id]).ok,
        "alice's file is still there"
    );
    // The token names its user: claiming another is refused before anything is sent.
    failed_with(
        &s.on_device(&mallory, &["--user", "alice", "delete", &id]),
        &["for user \"mallory\""],
    );

    // A read-only token cannot upload; the device says so without a round trip.
    let viewer = s.mint("viewer", &["--scope", "read"]);
    failed_with(
        &s.on_device(&viewer, &["upload", src.to_str().unwrap()]),
        &["allows read only", "this needs write"],
    );
    // An upload limit below the file: refused by name; a file within it goes through.
    let capped = s.mint("carol", &["--scope", "write", "--max-upload", "1MiB"]);
    failed_with(
        &s.on_device(&capped, &["upload", src.to_str().unwrap()]),
        &["error 25 Forbidden", "at most 1048576 bytes"],
    );
    let small = s.path("small.bin");
    make_file(&small, 500_000, 6);
    assert!(
        s.on_device(&capped, &["upload", small.to_str().unwrap()])
            .ok
    );
    // A read share: this file only, and it cannot be minted with write.
    let share = s.mint("friend", &["--scope", "read", "--file", &id]);
    let out2 = s.path("shared.bin");
    let r = s.on_device(&share, &["download", &id, "-o", out2.to_str().unwrap()]);
    assert!(r.ok, "download through a read share: {}", r.stderr);
    assert_eq!(sha256_file(&out2), sha256_file(&src));
    failed_with(
        &s.on_device(&share, &["stat", "0000000000000001-aaaaaaaaaaaaaaaa"]),
        &[&format!("for file {id} only")],
    );
    let r = s.backend(&[
        "--user",
        "x",
        "token",
        "--scope",
        "read,write",
        "--file",
        &id,
    ]);
    failed_with(&r, &["read share"]);
    // A token of another app does not see demo's files.
    let r = s.backend(&[
        "--app", "other", "--user", "alice", "token", "--scope", "read",
    ]);
    assert!(r.ok, "{}", r.stderr);
    let other = r.stdout.trim().to_owned();
    failed_with(&s.on_device(&other, &["stat", &id]), &["error 7 NotFound"]);
    // `ferry usage` on the device: alice's bytes and files, no quota in app demo.
    let r = s.on_device(&alice, &["usage"]);
    assert!(r.ok, "usage: {}", r.stderr);
    let u = &r.json()["usage"];
    assert_eq!(
        (u["user"].as_str(), u["bytes"].as_u64(), u["files"].as_u64()),
        (Some("alice"), Some((3 << 20) + 11), Some(1)),
        "{u}"
    );
    assert!(u["max_bytes"].is_null(), "{u}");
    // App other has a 1000-byte quota per user: exactly 1000 is stored, one byte more is
    // refused by name, and usage says where ann stands.
    let r = s.backend(&[
        "--app",
        "other",
        "--user",
        "ann",
        "token",
        "--scope",
        "read,write",
    ]);
    let ann = r.stdout.trim().to_owned();
    let (full, more) = (s.path("full.bin"), s.path("more.bin"));
    make_file(&full, 1000, 7);
    make_file(&more, 1, 8);
    assert!(s.on_device(&ann, &["upload", full.to_str().unwrap()]).ok);
    failed_with(
        &s.on_device(&ann, &["upload", more.to_str().unwrap()]),
        &["error 26 Quota", "max_stored_bytes", "by 1"],
    );
    let u = s.on_device(&ann, &["usage"]).json()["usage"].clone();
    assert_eq!(
        (
            u["bytes"].as_u64(),
            u["max_bytes"].as_u64(),
            u["max_files"].as_u64()
        ),
        (Some(1000), Some(1000), Some(5)),
        "{u}"
    );
    // Not a token at all, and a connection token posing as one.
    failed_with(
        &s.on_device("zz", &["stat", &id]),
        &["FERRY_TOKEN", "not a token"],
    );
    let single_use = support::auth::key()
        .mint("demo", "alice", ferry_common::token::Scope::ALL, 300)
        .unwrap();
    failed_with(
        &s.on_device(&hex::encode(single_use), &["stat", &id]),
        &["not a delegated one"],
    );
    // Tampered: refused by the server (error 6).
    let mut tampered = hex::decode(&alice).unwrap();
    let n = tampered.len();
    tampered[n - 1] ^= 1;
    let tampered = hex::encode(tampered);
    failed_with(&s.on_device(&tampered, &["stat", &id]), &["error 6 Auth"]);
    s.assert_no_secrets(&[
        &alice, &mallory, &viewer, &capped, &share, &other, &ann, &tampered,
    ]);
}

/// Bits set in the block map of the device's one upload state file.
fn blocks_done(state: &Path, blocks: usize) -> u32 {
    let Ok(mut dir) = std::fs::read_dir(state) else {
        return 0;
    };
    let Some(Ok(e)) = dir.next() else { return 0 };
    let Ok(b) = std::fs::read(e.path()) else {
        return 0;
    };
    b.get(68..68 + blocks.div_ceil(8))
        .map(|m| m.iter().map(|x| x.count_ones()).sum())
        .unwrap_or(0)
}

#[test]
fn an_upload_outliving_its_token_stops_with_a_clear_error_and_resumes_with_a_fresh_one() {
    let s = Setup::start();
    let src = s.path("movie.bin");
    let size: u64 = 40 << 20;
    let blocks = (size / (64 << 10)) as usize;
    make_file(&src, size, 9);
    let brief = s.mint("alice", &["--scope", "write", "--ttl", "3s"]);
    let minted = Instant::now();
    let args = [
        "upload",
        src.to_str().unwrap(),
        "--block-size",
        "64KiB",
        "--threads",
        "1",
    ];
    let mut child = s
        .device(&brief, &args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Once a quarter is stored, stall the proxy past the token's expiry, then let it go: the
    // client's next connection needs the token, which is over.
    support::wait_until("upload progress", Duration::from_secs(30), || {
        if blocks_done(&s.path("device"), blocks) >= blocks as u32 / 4 {
            return true;
        }
        assert!(child.try_wait().unwrap().is_none(), "upload ended too soon");
        false
    });
    let px = &s.procs[1];
    px.signal(Signal::SIGSTOP);
    std::thread::sleep(
        Duration::from_secs(3).saturating_sub(minted.elapsed()) + Duration::from_millis(1500),
    );
    px.signal(Signal::SIGCONT);
    support::wait_until(
        "the upload to end on an expired token",
        Duration::from_secs(30),
        || child.try_wait().unwrap().is_some(),
    );
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "finished on an expired token?");
    assert!(
        err.contains("expired") && err.contains("fresh one"),
        "not a clear expiry error: {err}"
    );
    // A fresh token: the rerun continues where it stopped.
    let fresh = s.mint("alice", &["--scope", "write,read", "--ttl", "1h"]);
    let r = s.on_device(&fresh, &args);
    assert!(r.ok, "rerun with a fresh token: {}", r.stderr);
    let rep = r.report();
    assert_eq!(rep["resumed"], true, "{rep}");
    assert!(
        rep["blocks_skipped"].as_u64().unwrap() >= blocks as u64 / 4 - 2,
        "{rep}"
    );
    let id = r.json()["file_id"].as_str().unwrap().to_owned();
    let back = s.path("back.bin");
    assert!(
        s.on_device(&fresh, &["download", &id, "-o", back.to_str().unwrap()])
            .ok
    );
    assert_eq!(sha256_file(&back), sha256_file(&src));
}
