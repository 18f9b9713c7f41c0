//! Limits the security issue asks for, driven past their edge against the real `ferry-server`:
//! each checks a clear outcome, bounded resources and a healthy service for everyone else.

use crate::support;

use ferry_common::proto;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};
use support::raw;
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
    match raw::next_reply(s) {
        raw::Reply::Ok(..) => Fate::Served,
        raw::Reply::Err(proto::ErrorCode::Limit, _) => Fate::Refused,
        raw::Reply::Waiting => Fate::Waiting,
        raw::Reply::Closed => Fate::Dropped,
        other => panic!("unexpected answer at the fd limit: {other:?}"),
    }
}

#[test]
fn accept_survives_emfile_without_spinning() {
    if !support::have("prlimit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    // 48 descriptors in all: after the server's own (listeners, epoll, SQLite, logs) only a
    // few remain for connections (each takes its socket and a wake-up pipe). The server takes
    // 16 connections even so (and logs that the limit is too low), so it meets EMFILE.
    let mut limited = Command::new("prlimit");
    limited.arg("--nofile=48:48").arg(bin("ferry-server"));
    let data = dir.path().join("data");
    let mut cmd = support::server_command(limited, dir.path(), "ferry-server", "", addr, &data);
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

    // Descriptors come back. Connections still in the backlog are accepted as earlier ones
    // close, so each is closed once answered (holding them all open would just refill the
    // table). Each gets an answer: served, or refused with error 17 when it was accepted in the
    // instant between a closing connection's socket and its wake-up pipe being freed.
    let (waiting, answered): (Vec<_>, Vec<_>) = conns
        .into_iter()
        .zip(&fates)
        .partition(|(_, f)| **f == Fate::Waiting);
    drop(answered);
    let mut answers = Vec::new();
    for (mut s, _) in waiting {
        answers.push(fate(&mut s, Duration::from_secs(5)));
    }
    assert!(
        answers
            .iter()
            .all(|f| matches!(f, Fate::Served | Fate::Refused)),
        "waiting connections without an answer once descriptors came back: {answers:?}"
    );
    if !answers.is_empty() {
        assert!(
            answers.contains(&Fate::Served),
            "no waiting connection was served once descriptors came back: {answers:?}"
        );
    }
    // (The server notices the closed connections within moments; until then a newcomer may
    // still be refused with error 17.)
    wait_ready(addr, Duration::from_secs(10));
    let warnings = srv.log_text().matches("accept failed").count();
    assert!(
        warnings < 200,
        "{warnings} accept warnings: the retry must be paced"
    );
}

/// The next reply on a connection.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Ok,
    Error(proto::ErrorCode, String),
    /// Closed, or nothing within the wait.
    Nothing,
}

fn answer(s: &mut TcpStream, wait: Duration) -> Answer {
    let _ = s.set_read_timeout(Some(wait));
    match raw::next_reply(s) {
        raw::Reply::Ok(..) => Answer::Ok,
        raw::Reply::Err(code, text) => Answer::Error(code, text),
        raw::Reply::Waiting | raw::Reply::Closed => Answer::Nothing,
    }
}

/// The error a connection is told (panics on anything else).
fn error_reply(s: &mut TcpStream, wait: Duration) -> (proto::ErrorCode, String) {
    match answer(s, wait) {
        Answer::Error(c, t) => (c, t),
        other => panic!("expected an error frame, got {other:?}"),
    }
}

fn closed(s: &mut TcpStream) -> bool {
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut b = [0u8; 16];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn slow_peers_are_cut_off_by_hello_frame_and_progress_deadlines() {
    let dir = tempfile::tempdir().unwrap();
    let (_srv, addr) = server_with(
        dir.path(),
        "idle_timeout_ms = 60000\nhello_timeout_ms = 800\nframe_timeout_ms = 800\n\
         progress_timeout_ms = 800\nblock_size = 65536\n",
    );
    // A fresh token per connection: servers refuse one they have seen.
    let hello = || support::auth::hello_frame("demo", "slowpoke");

    // 1. Connects and says nothing.
    let t = Instant::now();
    let mut silent = TcpStream::connect(addr).unwrap();
    let e = error_reply(&mut silent, Duration::from_secs(5));
    assert_eq!(e.0, proto::ErrorCode::Limit, "{e:?}");
    assert!(e.1.contains("first frame"), "{e:?}");
    assert!(closed(&mut silent));
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "cut off after {:?}",
        t.elapsed()
    );

    // 2. Trickles a STAT header one byte at a time, each byte well within the idle timeout.
    let mut trickle = TcpStream::connect(addr).unwrap();
    trickle.write_all(&hello()).unwrap();
    assert_eq!(
        answer(&mut trickle, Duration::from_secs(5)),
        Answer::Ok,
        "HELLO"
    );
    let stat = proto::frame(proto::cmd::STAT, 0, &proto::encode_file_id("x").unwrap());
    let t = Instant::now();
    let mut cut = false;
    for b in &stat {
        if trickle.write_all(&[*b]).is_err() {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(150));
        if t.elapsed() > Duration::from_secs(4) {
            break;
        }
    }
    let e = answer(&mut trickle, Duration::from_secs(2));
    assert!(
        cut || matches!(&e, Answer::Error(_, t) if t.contains("incomplete")),
        "a trickled header was still accepted after {:?}: {e:?}",
        t.elapsed()
    );

    // 3. Starts a block upload, then lets its payload stall.
    let mut stall = TcpStream::connect(addr).unwrap();
    stall.write_all(&hello()).unwrap();
    assert_eq!(
        answer(&mut stall, Duration::from_secs(5)),
        Answer::Ok,
        "HELLO"
    );
    let data = vec![7u8; 300_000];
    let init = proto::UploadInit {
        size: data.len() as u64,
        block_size: 65536,
        sha256: [0; 32],
        name: "stall.bin".into(),
    };
    stall
        .write_all(&proto::frame(
            proto::cmd::UPLOAD_INIT,
            0,
            &init.encode().unwrap(),
        ))
        .unwrap();
    let _ = stall.set_read_timeout(Some(Duration::from_secs(5)));
    let body = raw::next_reply(&mut stall).body();
    let reply = proto::UploadInitReply::decode(&body).unwrap();
    let block = &data[..65536];
    let meta = proto::BlockMeta {
        upload_id: reply.upload_id,
        index: 0,
        offset: 0,
        len: 65536,
        crc32c: crc32c::crc32c(block),
    };
    let head = proto::data_frame_head(proto::cmd::UPLOAD_BLOCK, 0, &meta.encode(), 65536);
    stall.write_all(&head).unwrap();
    stall.write_all(&block[..1000]).unwrap(); // then nothing more
    let t = Instant::now();
    let e = error_reply(&mut stall, Duration::from_secs(5));
    assert!(e.1.contains("stalled"), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(4));

    // Everyone else is still served.
    assert!(support::probe(addr, Duration::from_secs(2)).is_some());
}

/// PROBE answers a stranger but does not keep its connection: without LINK or HELLO it stays
/// under the first-frame deadline for its whole life. A session (HELLO) is not under it.
#[test]
fn probes_do_not_keep_a_strangers_connection_open() {
    let dir = tempfile::tempdir().unwrap();
    let (_srv, addr) = server_with(
        dir.path(),
        "idle_timeout_ms = 60000\nhello_timeout_ms = 800\n",
    );
    let mut squatter = TcpStream::connect(addr).unwrap();
    let t = Instant::now();
    let mut answered = 0;
    let end = loop {
        send_probe(&mut squatter);
        match answer(&mut squatter, Duration::from_secs(2)) {
            Answer::Ok => answered += 1,
            other => break other,
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{answered} PROBEs answered over {:?} and the connection is still open",
            t.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(answered >= 2, "only {answered} PROBEs answered");
    assert!(
        matches!(&end, Answer::Error(proto::ErrorCode::Limit, t) if t.contains("first frame"))
            || end == Answer::Nothing,
        "{end:?}"
    );
    assert!(closed(&mut squatter));
    assert!(
        t.elapsed() >= Duration::from_millis(700) && t.elapsed() < Duration::from_secs(3),
        "closed after {:?}, the deadline is 800 ms",
        t.elapsed()
    );

    // A session outlives the first-frame deadline; its PROBEs are answered.
    let mut session = hello_as(addr, "member");
    std::thread::sleep(Duration::from_millis(1200));
    send_probe(&mut session);
    assert_eq!(answer(&mut session, Duration::from_secs(2)), Answer::Ok);
}

#[test]
fn a_proxy_caps_sessions_per_client_address() {
    let dir = tempfile::tempdir().unwrap();
    let (_srv, srv_addr) = server_with(dir.path(), "");
    let addr = free_addr();
    let conf = dir.path().join("proxy.toml");
    std::fs::write(
        &conf,
        format!(
            "listen = \"{addr}\"\nupstreams = [\"{srv_addr}\"]\nmax_connections_per_ip = 2\n\
             check_interval_ms = 200\n"
        ),
    )
    .unwrap();
    let mut cmd = Command::new(bin("ferry-proxy"));
    cmd.arg("--config").arg(&conf);
    let _proxy = Proc::spawn("ferry-proxy", &mut cmd, dir.path());
    wait_ready(addr, Duration::from_secs(15));
    // A fresh token per connection: servers refuse one they have seen.
    let hello = || support::auth::hello_frame("demo", "many");
    let session = || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(&hello()).unwrap();
        let a = answer(&mut s, Duration::from_secs(5));
        (s, a)
    };
    // Wait until the proxy has marked its upstream up, then hold two sessions.
    let t = Instant::now();
    let (a, b) = loop {
        let (a, ea) = session();
        if ea == Answer::Ok {
            let (b, eb) = session();
            assert_eq!(eb, Answer::Ok, "second session");
            break (a, b);
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "upstream never usable: {ea:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // A third from the same address is refused with a reason.
    let (_c, ec) = session();
    assert!(
        matches!(ec, Answer::Error(proto::ErrorCode::Limit, _)),
        "third session: {ec:?}"
    );
    // One closes: room for another.
    drop(a);
    support::wait_until("the slot freed", Duration::from_secs(5), || {
        session().1 == Answer::Ok
    });
    drop(b);
}

/// A server on a free port over `dir/data` with `conf` as its config.
fn server_with(dir: &std::path::Path, conf: &str) -> (Proc, std::net::SocketAddr) {
    let addr = free_addr();
    let p = support::start_server(dir, "ferry-server", conf, addr, &dir.join("data"));
    (p, addr)
}

fn hello_as(addr: std::net::SocketAddr, user: &str) -> TcpStream {
    hello_app(addr, "demo", user)
}

/// A session of `user` of `app`.
fn hello_app(addr: std::net::SocketAddr, app: &str, user: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    let body = support::auth::hello_body(app, user);
    s.write_all(&proto::frame(proto::cmd::HELLO, 0, &body))
        .unwrap();
    assert_eq!(answer(&mut s, Duration::from_secs(5)), Answer::Ok, "HELLO");
    s
}

fn init(s: &mut TcpStream, size: u64, seed: u8) -> Answer {
    let body = proto::UploadInit {
        size,
        block_size: 65536,
        sha256: [seed; 32],
        name: format!("f{seed}"),
    };
    s.write_all(&proto::frame(
        proto::cmd::UPLOAD_INIT,
        0,
        &body.encode().unwrap(),
    ))
    .unwrap();
    answer(s, Duration::from_secs(5))
}

/// An error 17 (Limit) whose text names each of `words`.
fn refused_with(a: Answer, words: &[&str]) {
    match a {
        Answer::Error(proto::ErrorCode::Limit, t) => {
            assert!(words.iter().all(|w| t.contains(w)), "{t}")
        }
        other => panic!("expected error 17 naming {words:?}: {other:?}"),
    }
}

#[test]
fn upload_sessions_per_user_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let (_srv, addr) = server_with(dir.path(), "max_sessions_per_user = 2\n");
    let mut alice = hello_as(addr, "alice");
    assert_eq!(init(&mut alice, 1 << 20, 1), Answer::Ok);
    assert_eq!(init(&mut alice, 1 << 20, 2), Answer::Ok);
    // The same upload again resumes its session: not a new one, not refused.
    assert_eq!(init(&mut alice, 1 << 20, 2), Answer::Ok);
    refused_with(init(&mut alice, 1 << 20, 3), &["alice"]);
    // Someone else is not affected.
    let mut bob = hello_as(addr, "bob");
    assert_eq!(init(&mut bob, 1 << 20, 3), Answer::Ok);
}

/// An app can set its own per-user session cap (`[apps.APP] max_sessions_per_user`): its users
/// stop there, another app's users keep the server's.
#[test]
fn an_app_sets_its_own_per_user_session_cap() {
    let dir = tempfile::tempdir().unwrap();
    let (_srv, addr) = server_with(
        dir.path(),
        "max_sessions_per_user = 2\n[apps.other]\nmax_sessions_per_user = 1\n",
    );
    let mut strict = hello_app(addr, "other", "dave");
    assert_eq!(init(&mut strict, 1 << 20, 1), Answer::Ok);
    refused_with(
        init(&mut strict, 1 << 20, 2),
        &["dave", "max_sessions_per_user"],
    );
    let mut alice = hello_as(addr, "alice");
    assert_eq!(init(&mut alice, 1 << 20, 3), Answer::Ok);
    assert_eq!(init(&mut alice, 1 << 20, 4), Answer::Ok);
}

/// One app cannot fill the session table for everyone: many users of one app (each within
/// their own cap) stop at the app's share, and another app's user still opens a session. The
/// refusals name the limit, never another tenant's figures.
#[test]
fn one_app_cannot_fill_the_session_table_for_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let (_srv, addr) = server_with(dir.path(), "max_sessions = 6\nmax_sessions_per_user = 2\n");
    // The app's default share is half the table: 3 sessions, from three users.
    let mut seed = 0u8;
    for user in ["u1", "u2", "u3"] {
        let mut c = hello_as(addr, user);
        seed += 1;
        assert_eq!(init(&mut c, 1 << 20, seed), Answer::Ok, "{user}");
    }
    let mut c = hello_as(addr, "u4");
    refused_with(
        init(&mut c, 1 << 20, 99),
        &["app demo", "max_sessions_per_app"],
    );
    // Another app is served.
    let mut victim = hello_app(addr, "other", "victim");
    assert_eq!(init(&mut victim, 1 << 20, 100), Answer::Ok);
}

#[test]
fn uploads_that_would_eat_the_free_space_reserve_are_refused_up_front() {
    let dir = tempfile::tempdir().unwrap();
    // A reserve larger than any disk: every upload would break it.
    let (_srv, addr) = server_with(dir.path(), "min_free_bytes = 1152921504606846976\n");
    let mut c = hello_as(addr, "carol");
    match init(&mut c, 1 << 20, 1) {
        // A clear error that tells the tenant nothing about the volume (no free-byte count).
        Answer::Error(proto::ErrorCode::NoSpace, t) => {
            assert!(t.contains("no room") && !t.contains("free"), "{t}")
        }
        other => panic!("UPLOAD_INIT: {other:?}"),
    }
    let meta = proto::UploadMeta {
        key: [9; 16],
        sha256: [0; 32],
        name: "small".into(),
    }
    .encode()
    .unwrap();
    let mut f = proto::data_frame_head(proto::cmd::UPLOAD, 0, &meta, 1000);
    f.extend_from_slice(&[1u8; 1000]);
    c.write_all(&f).unwrap();
    assert!(matches!(
        answer(&mut c, Duration::from_secs(5)),
        Answer::Error(proto::ErrorCode::NoSpace, _)
    ));
    assert!(
        std::fs::read_dir(dir.path().join("data/data"))
            .map(|d| d.count() == 0)
            .unwrap_or(true),
        "nothing stored"
    );
    assert!(support::probe(addr, Duration::from_secs(2)).is_some());
}

/// A new connection's HELLO as `user` of `app`, and its answer.
fn try_hello(addr: std::net::SocketAddr, app: &str, user: &str) -> (TcpStream, Answer) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&support::auth::hello_frame(app, user)).unwrap();
    let a = answer(&mut s, Duration::from_secs(5));
    (s, a)
}

/// Fair share, connections (#16): a user holds at most `max_connections_per_user` sessions and
/// an app at most its share of the server's connections (half by default); the refused
/// connection is told which limit and closed, another app's user is served, and a closed
/// connection gives its slot back.
#[test]
fn one_tenant_cannot_hold_every_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (_srv, addr) = server_with(
        dir.path(),
        "max_connections = 8\nmax_connections_per_user = 2\n",
    );
    let mut held = vec![hello_as(addr, "alice"), hello_as(addr, "alice")];
    let (mut s, a) = try_hello(addr, "demo", "alice");
    refused_with(a, &["alice", "max_connections_per_user"]);
    assert!(closed(&mut s), "a refused session is closed");
    // The app's share is 4 of 8: bob fills it, carol is refused.
    held.push(hello_as(addr, "bob"));
    held.push(hello_as(addr, "bob"));
    let (_s, a) = try_hello(addr, "demo", "carol");
    refused_with(a, &["app demo", "max_connections_per_app"]);
    // Another app is served meanwhile.
    let _victim = hello_app(addr, "other", "victor");
    // A closed connection gives its slot back (once the server has seen it close).
    held.remove(0);
    support::wait_until("the slot freed", Duration::from_secs(5), || {
        try_hello(addr, "demo", "carol").1 == Answer::Ok
    });
}
