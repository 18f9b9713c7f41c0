//! Processes a test did not start itself: the members a supervisor (`ferry demo`,
//! `ferry cluster up`) started, read from /proc.

use std::process::Child;
use std::time::{Duration, Instant};

/// The processes whose parent is `pid` now.
pub fn children_of(pid: u32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| stat_field(*p, 1).is_some_and(|ppid| ppid == pid.to_string()))
        .collect()
}

/// Field `i` after the command name of /proc/PID/stat (0: state, 1: parent pid).
fn stat_field(pid: i32, i: usize) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(i).map(str::to_owned)
}

/// SIGKILLs these processes when dropped: a failing test leaves no member behind.
pub struct Reap(pub Vec<i32>);

impl Drop for Reap {
    fn drop(&mut self) {
        for p in self.0.iter().filter(|p| !dead(**p)) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Gone, or a zombie nobody reaps yet (an orphan's new parent may be slow to).
pub fn dead(pid: i32) -> bool {
    stat_field(pid, 0).is_none_or(|s| s == "Z" || s == "X")
}

/// SIGKILLs `supervisor` (no handler runs, nothing is stopped in order) and waits until every
/// one of `members` is gone (20 s at most; a member that outlives it fails the test). Returns
/// how long they took.
pub fn kill9_outlived_by_none(supervisor: &mut Child, members: &Reap) -> Duration {
    supervisor.kill().unwrap();
    supervisor.wait().unwrap();
    let t = Instant::now();
    super::wait_until(
        "every member to die with its supervisor's kill -9",
        Duration::from_secs(20),
        || members.0.iter().all(|p| dead(*p)),
    );
    t.elapsed()
}
