//! A `ferry-server` for a test: on a free port over a data dir, its config (the test's keys,
//! plus the test app keys unless it has its own `[auth`) and log in a dir, killed when
//! dropped, restartable over the same data.

use super::{Proc, bin, free_addr, server_command, wait_ready};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub struct Server {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub data: PathBuf,
    /// Where its config and log are.
    pub dir: PathBuf,
    conf: String,
    /// Its own scratch dir, when the test gave none (removed after the process is killed).
    scratch: Option<tempfile::TempDir>,
}

impl Server {
    /// In a scratch dir of its own (data in `d/`).
    pub fn scratch(conf: &str) -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = Server::start_in(tmp.path(), &tmp.path().join("d"), conf);
        s.scratch = Some(tmp);
        s
    }

    /// Over `data`, its config and log in `dir`.
    pub fn start_in(dir: &Path, data: &Path, conf: &str) -> Server {
        Server::start_under(Command::new(bin("ferry-server")), dir, data, conf)
    }

    /// The same, started through `program`: a wrapper already given the server's path
    /// (`fiu-run -x`, `prlimit ...`, `env RUST_LOG=...`).
    pub fn start_under(program: Command, dir: &Path, data: &Path, conf: &str) -> Server {
        let addr = free_addr();
        let mut cmd = server_command(program, dir, "ferry-server", conf, addr, data);
        let proc = Proc::spawn("ferry-server", &mut cmd, dir);
        wait_ready(addr, Duration::from_secs(15));
        Server {
            proc,
            addr,
            data: data.to_path_buf(),
            dir: dir.to_path_buf(),
            conf: conf.to_owned(),
            scratch: None,
        }
    }

    /// kill -9 (when still running), then a plain start over the same data dir and config, on
    /// a new port.
    pub fn restart(self) -> Server {
        let Server {
            mut proc,
            data,
            dir,
            conf,
            scratch,
            ..
        } = self;
        proc.kill();
        let mut s = Server::start_in(&dir, &data, &conf);
        s.scratch = scratch;
        s
    }

    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }

    /// Upload sessions' temp files in the data dir.
    pub fn temp_files(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.data.join("tmp"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    }
}
