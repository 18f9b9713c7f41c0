//! Running the `ferry` CLI from tests: bounded in time, output captured, JSON parsed.

use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

pub struct Run {
    pub ok: bool,
    /// The exit status (None: killed by a signal).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?} / {:?}", self.stdout, self.stderr))
    }
    /// A `--json` failure: the one JSON object on stderr.
    pub fn error(&self) -> Value {
        serde_json::from_str(self.stderr.trim())
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?} / {:?}", self.stderr, self.stdout))
    }
    pub fn report(&self) -> Value {
        self.json()["report"].clone()
    }
}

/// A `ferry` command with the test's state dir and app key, and no proxy list or log level
/// from the environment.
pub fn ferry(state: &Path, proxies: &[SocketAddr], args: &[&str]) -> Command {
    let mut c = Command::new(super::bin("ferry"));
    c.env("FERRY_STATE_DIR", state)
        .env("FERRY_KEY", super::auth::key_env())
        .env_remove("FERRY_PROXIES")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    for p in proxies {
        c.arg("--proxy").arg(p.to_string());
    }
    c.args(args);
    c
}

/// Runs to completion; killed (and the test failed) after 60 s. Its output is read while it
/// runs (a child writing more than a pipe holds would block forever otherwise).
pub fn run(mut cmd: Command) -> Run {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    let out = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            panic!("ferry ran over 60 s: {cmd:?}");
        }
    };
    Run::from(out)
}

impl From<std::process::Output> for Run {
    fn from(out: std::process::Output) -> Run {
        Run {
            ok: out.status.success(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// `ferry upload` one block of 64 KiB at a time over one connection: slow enough for a fault to
/// land in the middle.
pub fn one_by_one(file: &Path) -> [&str; 7] {
    let path = file.to_str().unwrap();
    [
        "--json",
        "upload",
        "--threads",
        "1",
        "--block-size",
        "64KiB",
        path,
    ]
}

/// Runs and insists on success.
pub fn ok(cmd: Command) -> Run {
    let r = run(cmd);
    assert!(r.ok, "ferry failed: {}", r.stderr);
    r
}
