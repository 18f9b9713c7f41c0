//! Limits the security issue asks for, driven past their edge against the real `ferry-server`:
//! each checks a clear outcome, bounded resources and a healthy service for everyone else.

mod support;

use ferry_common::proto::{self, HEADER_LEN};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};
use support::{Proc, bin, free_addr, wait_ready};

/// User + system CPU time of a process, in clock ticks (USER_HZ, 100 per second here).
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, i.e. 11 and 12 after the name.
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

/// What became of a connection that sent a PROBE.
#[derive(Debug, PartialEq, Eq)]
enum Fate {
    /// Answered.
    Served,
    /// Refused with error 17 (Limit): told why, then closed.
    Refused,
    /// Closed without a word.
    Dropped,
    /// Nothing yet (waiting in the backlog).
    Waiting,
}

fn send_probe(s: &mut TcpStream) {
    let _ = s.write_all(&proto::frame(proto::cmd::PROBE, 0, &proto::probe_body()));
}

fn fate(s: &mut TcpStream, wait: Duration) -> Fate {
    let _ = s.set_read_timeout(Some(wait));
    let mut h = [0u8; HEADER_LEN];
    match s.read_exact(&mut h) {
        Ok(()) => {
            let h = proto::Header::decode(&h);
            if h.status == proto::status::OK {
                return Fate::Served;
            }
            let mut body = vec![0u8; (h.body_len as usize).min(2048)];
            let _ = s.read_exact(&mut body);
            match proto::ErrorBody::decode(&body) {
                Ok(e) if e.code == proto::ErrorCode::Limit => Fate::Refused,
                other => panic!("unexpected answer at the fd limit: {other:?}"),
            }
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Fate::Waiting
        }
        Err(_) => Fate::Dropped,
    }
}

#[test]
fn accept_survives_emfile_without_spinning() {
    if !support::have("prlimit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    // 64 descriptors in all: after the server's own (listeners, epoll, SQLite, logs) only a
    // few dozen remain for connections (each takes its socket and a wake-up pipe).
    let mut cmd = Command::new("prlimit");
    cmd.arg("--nofile=64:64")
        .arg(bin("ferry-server"))
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--data")
        .arg(dir.path().join("data"));
    let srv = Proc::spawn("ferry-server", &mut cmd, dir.path());
    wait_ready(addr, Duration::from_secs(15));

    // Far more connections than descriptors: the kernel completes every handshake into the
    // backlog; the server accepts until it runs out.
    let mut conns: Vec<TcpStream> = (0..120)
        .map(|_| TcpStream::connect(addr).expect("the backlog takes the connection"))
        .collect();
    for s in conns.iter_mut() {
        send_probe(s);
    }
    let t = Instant::now();
    let out_of_fds = |log: &str| log.contains("accept failed") || log.contains("cannot set up");
    while !out_of_fds(&srv.log_text()) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the descriptor limit was never reached"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Stuck at the limit: the accept loop must wait, not spin.
    let before = cpu_ticks(srv.pid());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(srv.pid()) - before;
    assert!(
        used <= 40,
        "{used} ticks of CPU in 2 s at EMFILE: the accept loop spins"
    );

    // Every connection was served, refused with a reason, or waits: none dropped silently.
    let fates: Vec<Fate> = conns
        .iter_mut()
        .map(|s| fate(s, Duration::from_millis(20)))
        .collect();
    let count = |f: Fate| fates.iter().filter(|&x| *x == f).count();
    let (served, refused, waiting) = (
        count(Fate::Served),
        count(Fate::Refused),
        count(Fate::Waiting),
    );
    eprintln!("at the limit: {served} served, {refused} refused, {waiting} waiting");
    assert_eq!(
        count(Fate::Dropped),
        0,
        "connections closed without an answer: {fates:?}"
    );
    assert!(served > 0, "nothing served at the limit");

    // Descriptors come back: whoever waited is served, and so are new connections.
    let mut waiting: Vec<TcpStream> = conns
        .into_iter()
        .zip(&fates)
        .filter(|(_, f)| **f == Fate::Waiting)
        .map(|(s, _)| s)
        .collect();
    for s in waiting.iter_mut() {
        assert_eq!(
            fate(s, Duration::from_secs(5)),
            Fate::Served,
            "a waiting connection"
        );
    }
    drop(waiting);
    // (The server notices the closed connections within moments; until then a newcomer may
    // still be refused with error 17.)
    wait_ready(addr, Duration::from_secs(10));
    let warnings = srv.log_text().matches("accept failed").count();
    assert!(
        warnings < 200,
        "{warnings} accept warnings: the retry must be paced"
    );
}
