//! Member processes: how they are started (so they never outlive the supervisor), how the
//! supervisor knows one is ready, and where their logs go.

use ferry_common::proto::{self, Role};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub(super) fn prefix_lines(name: &str, err: impl Read) {
    let mut out = std::io::stderr();
    for line in BufReader::new(err).lines() {
        let Ok(line) = line else { break };
        let _ = writeln!(out, "[{name:>14}] {line}");
    }
}

/// Reads a proxy's plain-text stats endpoint: `name value` lines (labelled lines are skipped).
pub fn proxy_stats(addr: SocketAddr) -> std::io::Result<std::collections::BTreeMap<String, u64>> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut text = String::new();
    s.take(64 * 1024).read_to_string(&mut text)?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(k, _)| !k.contains('{'))
        .filter_map(|(k, v)| Some((k.to_string(), v.trim().parse().ok()?)))
        .collect())
}

/// Waits until `addr` answers a PROBE as `expect`.
pub(super) fn wait_ready(addr: SocketAddr, expect: Role, limit: Duration) -> std::io::Result<()> {
    let t = Instant::now();
    loop {
        let err = match proto::probe(addr, Duration::from_millis(500)) {
            Ok(id) if id.role == expect => return Ok(()),
            Ok(id) => format!("answered as {:?}", id.role),
            Err(e) => e.to_string(),
        };
        if t.elapsed() >= limit {
            return Err(std::io::Error::other(err));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts a member so that it never outlives this supervisor: in its own process group (a
/// Ctrl-C at the terminal reaches it only through the supervisor, which stops members in
/// order) and with a parent-death signal (SIGTERM when the supervisor dies, `kill -9`
/// included). The kernel ties that signal to the *thread* that forked, so every member is
/// forked by one thread that lives as long as the process (a member restarted from a
/// short-lived thread, like the demo's killer, would otherwise die with it).
pub(super) fn spawn_member(mut cmd: Command) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt;
    use std::sync::mpsc;
    type Job = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: std::sync::OnceLock<parking_lot::Mutex<Option<mpsc::Sender<Job>>>> =
        std::sync::OnceLock::new();
    let supervisor = nix::unistd::getpid();
    cmd.process_group(0);
    // SAFETY: the closure runs between fork and exec and calls only prctl(2) and getppid(2),
    // both async-signal-safe; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)?;
            // The supervisor died between the fork and the prctl: nobody would signal us.
            if nix::unistd::getppid() != supervisor {
                return Err(std::io::Error::other("the supervisor is gone"));
            }
            Ok(())
        });
    }
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        let started = std::thread::Builder::new()
            .name("member-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            });
        parking_lot::Mutex::new(started.ok().map(|_| tx))
    });
    let gone = || std::io::Error::other("the member spawner thread is not running");
    let (tx, rx) = mpsc::channel();
    spawner
        .lock()
        .as_ref()
        .ok_or_else(gone)?
        .send((cmd, tx))
        .map_err(|_| gone())?;
    rx.recv().map_err(|_| gone())?
}
