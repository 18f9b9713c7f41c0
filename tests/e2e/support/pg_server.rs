//! A private PostgreSQL server for one test, for tests that restart the database itself
//! (`pg_ctl restart -m fast`): the shared `FERRY_PG_URL` server cannot be restarted under the
//! other tests. Made like `.ci/run` makes its own: `initdb` in a temp dir (as `postgres` when
//! running as root, since initdb refuses root), trust auth on 127.0.0.1 only, a free port;
//! stopped and removed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub struct PgServer {
    bin: PathBuf,
    dir: tempfile::TempDir,
    as_postgres: bool,
    /// `postgres://ferry@127.0.0.1:PORT/postgres`
    pub url: String,
    port: u16,
}

/// The newest `/usr/lib/postgresql/*/bin` with initdb and pg_ctl, else the one on PATH.
fn pg_bin() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|d| d.join("initdb").exists() && d.join("pg_ctl").exists())
        .collect();
    dirs.sort_by_key(|d| {
        d.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    if let Some(d) = dirs.pop() {
        return Some(d);
    }
    let out = Command::new("sh")
        .args(["-c", "command -v initdb"])
        .output()
        .ok()?;
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    p.parent()
        .filter(|_| out.status.success())
        .map(Path::to_path_buf)
}

impl PgServer {
    /// A running server, or None with a "skipped" note when PostgreSQL is not installed (a
    /// failure under CI=true, which installs it).
    pub fn start(test: &str) -> Option<PgServer> {
        let Some(bin) = pg_bin() else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{test}: PostgreSQL (initdb, pg_ctl) is not installed, but CI=true requires it"
            );
            eprintln!("{test}: skipped: PostgreSQL (initdb, pg_ctl) is not installed");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let uid = Command::new("id").arg("-u").output().unwrap();
        let as_postgres = String::from_utf8_lossy(&uid.stdout).trim() == "0";
        let mut s = PgServer {
            bin,
            dir,
            as_postgres,
            url: String::new(),
            port: 0,
        };
        if as_postgres {
            let ok = Command::new("chown")
                .arg("postgres:")
                .arg(s.dir.path())
                .status()
                .is_ok_and(|st| st.success());
            assert!(ok, "{test}: cannot chown the PostgreSQL dir to postgres");
        }
        let data = s.data();
        s.run("initdb", &["-D", &data, "-U", "ferry", "-A", "trust"]);
        for _ in 0..10 {
            let port = super::free_port();
            if s.try_start(port) {
                s.url = format!("postgres://ferry@127.0.0.1:{port}/postgres");
                s.port = port;
                return Some(s);
            }
        }
        panic!("{test}: PostgreSQL did not start:\n{}", s.log());
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn run(&self, tool: &str, args: &[&str]) -> bool {
        self.command(tool)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn options(&self, port: u16) -> String {
        format!(
            "-c listen_addresses=127.0.0.1 -p {port} -k {} -c max_connections=200 -c fsync=off",
            self.dir.path().display()
        )
    }

    fn try_start(&self, port: u16) -> bool {
        let (data, log) = (self.data(), self.dir.path().join("log"));
        let log = log.display().to_string();
        let o = self.options(port);
        self.run(
            "pg_ctl",
            &["-D", &data, "-l", &log, "-w", "-t", "60", "-o", &o, "start"],
        )
    }

    /// `pg_ctl restart -m fast`: every connection is closed, the server is down for a moment
    /// and comes back on the same port.
    pub fn restart(&self) {
        let data = self.data();
        let ok = self.run(
            "pg_ctl",
            &["-D", &data, "-m", "fast", "-w", "-t", "60", "restart"],
        );
        assert!(ok, "PostgreSQL did not restart:\n{}", self.log());
    }

    /// `pg_ctl stop -m fast`: down until [`PgServer::start_again`].
    pub fn stop(&self) {
        let data = self.data();
        let ok = self.run(
            "pg_ctl",
            &["-D", &data, "-m", "fast", "-w", "-t", "60", "stop"],
        );
        assert!(ok, "PostgreSQL did not stop:\n{}", self.log());
    }

    /// Starts a stopped server again on its port.
    pub fn start_again(&self) {
        assert!(
            self.try_start(self.port),
            "PostgreSQL did not start again:\n{}",
            self.log()
        );
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.data();
        self.run("pg_ctl", &["-D", &data, "-m", "immediate", "stop"]);
    }
}
