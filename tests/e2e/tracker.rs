//! The tracker role end to end, with real `ferry-server` processes on loopback: storage nodes
//! joining and beating, offline/online transitions (SIGSTOP, kill -9), router assignments that
//! survive a tracker restart and agree between two trackers, `ferry groups`, the bad-input
//! cases of issue 8, and stale answers while the database is
//! unreachable. Each test runs against the embedded backend and, where it makes sense, against
//! PostgreSQL (`FERRY_PG_URL`; unset: those parts print "skipped", except under CI=true where
//! they fail). Every PostgreSQL test works in a database of its own, dropped at the end.

use crate::support;

use ferry_common::proto::{
    self, BEAT_REPLY_MAX, BeatReply, CallError, ErrorCode, GROUPS_REPLY_MAX, GroupsReply,
    JOIN_V1_LEN, NodeAddr, NodeHello, SADDRS_REPLY_MAX, SaddrsReply, SaddrsReq, call_once, cmd,
};
use nix::sys::signal::Signal;
use std::collections::HashMap;
use std::io::Read;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::Proc;

const T: Duration = Duration::from_secs(3);

/// The same URL through another host:port (the cuttable forwarder below).
fn via(url: &str, addr: SocketAddr) -> String {
    let scheme_end = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[scheme_end..];
    let (user, hostpath) = match rest.split_once('@') {
        Some((u, h)) => (format!("{u}@"), h),
        None => (String::new(), rest),
    };
    let path = hostpath.find('/').map_or("", |i| &hostpath[i..]);
    format!("{}{user}{addr}{path}", &url[..scheme_end])
}

/// Which metadata backend a test's servers use.
#[derive(Clone)]
enum Backend {
    Embedded,
    Pg(String),
}

impl Backend {
    fn name(&self) -> &'static str {
        match self {
            Backend::Embedded => "embedded",
            Backend::Pg(_) => "postgres",
        }
    }
}

/// Runs `f` on the embedded backend, then on a fresh PostgreSQL database when available.
fn both(test: &str, f: impl Fn(Backend)) {
    f(Backend::Embedded);
    if let Some(db) = support::pg_db(test) {
        f(Backend::Pg(db.url.clone()));
    }
}

/// A running ferry-server; killed when dropped.
struct Srv {
    proc: Proc,
    addr: SocketAddr,
    data: PathBuf,
    conf: PathBuf,
    dir: PathBuf,
    backend: Backend,
}

impl Srv {
    fn start(dir: &Path, name: &str, backend: &Backend, conf_text: &str) -> Srv {
        Srv::start_at(dir, name, backend, conf_text, support::free_addr())
    }

    fn start_at(
        dir: &Path,
        name: &str,
        backend: &Backend,
        conf_text: &str,
        addr: SocketAddr,
    ) -> Srv {
        let data = dir.join(format!("{name}-data"));
        let conf = dir.join(format!("{name}.toml"));
        std::fs::write(
            &conf,
            format!("workers = 3\n{conf_text}\n{}", support::auth::auth_toml()),
        )
        .unwrap();
        let proc = launch(name, &conf, addr, &data, dir, backend);
        Srv {
            proc,
            addr,
            data,
            conf,
            dir: dir.to_path_buf(),
            backend: backend.clone(),
        }
    }

    /// kill -9, then start again on the same address, data and database.
    fn restart(&mut self) {
        let name = self.proc.name.clone();
        self.proc.kill();
        self.proc = launch(
            &name,
            &self.conf,
            self.addr,
            &self.data,
            &self.dir,
            &self.backend,
        );
    }
}

/// Starts a ferry-server and waits until it answers a PROBE.
fn launch(
    name: &str,
    conf: &Path,
    addr: SocketAddr,
    data: &Path,
    dir: &Path,
    backend: &Backend,
) -> Proc {
    let mut cmd = Command::new(support::bin("ferry-server"));
    cmd.arg("--config")
        .arg(conf)
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--data")
        .arg(data);
    match backend {
        Backend::Embedded => cmd.env_remove("FERRY_META_URL"),
        Backend::Pg(url) => cmd.env("FERRY_META_URL", url),
    };
    let proc = Proc::spawn(name, &mut cmd, dir);
    support::wait_ready(addr, Duration::from_secs(15));
    proc
}

fn tracker_conf(groups: &[&str], offline_ms: u64) -> String {
    let groups: Vec<String> = groups.iter().map(|g| format!("\"{g}\"")).collect();
    format!(
        "roles = [\"tracker\"]\n[tracker]\noffline_after_ms = {offline_ms}\n\
         beat_interval_ms = 100\ngroups = [{}]\n",
        groups.join(", ")
    )
}

fn node_conf(group: &str, trackers: &[SocketAddr]) -> String {
    let t: Vec<String> = trackers.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[cluster]\ngroup = \"{group}\"\ntrackers = [{}]\n",
        t.join(", ")
    )
}

fn groups(t: SocketAddr) -> Result<GroupsReply, CallError> {
    let b = call_once(
        t,
        T,
        None,
        cmd::TRACKER_GROUPS,
        &[],
        cmd::REPLY_TRACKER,
        GROUPS_REPLY_MAX,
    )?;
    Ok(GroupsReply::decode(&b).expect("a GROUPS reply that decodes"))
}

fn saddrs(t: SocketAddr, app: &str, user: &str) -> Result<SaddrsReply, CallError> {
    let q = SaddrsReq {
        app: app.into(),
        user: user.into(),
        file_id: String::new(),
    };
    let b = call_once(
        t,
        T,
        None,
        cmd::TRACKER_SADDRS,
        &q.encode().unwrap(),
        cmd::REPLY_TRACKER,
        SADDRS_REPLY_MAX,
    )?;
    Ok(SaddrsReply::decode(&b).expect("a SADDRS reply that decodes"))
}

/// A node that is only the test: JOIN (or BEAT) by hand; the beat interval it is told.
fn fake(t: SocketAddr, c: u8, group: &str, port: u16, free: u64) -> Result<u32, CallError> {
    fake_gw(t, c, group, port, free, None).map(|r| r.interval_ms)
}

/// The same for a node whose JOIN announces an HTTP gateway on `http`: the whole reply.
fn fake_gw(
    t: SocketAddr,
    c: u8,
    group: &str,
    port: u16,
    free: u64,
    http: Option<u16>,
) -> Result<BeatReply, CallError> {
    let n = NodeHello {
        group: group.into(),
        host: "127.0.0.1".into(),
        port,
        version: proto::VERSION,
        started: 1,
        free,
        http: http.map(|port| NodeAddr {
            host: "127.0.0.1".into(),
            port,
        }),
    };
    let body = if c == cmd::TRACKER_JOIN {
        n.encode_join()
    } else {
        n.encode_beat()
    };
    let b = call_once(
        t,
        T,
        None,
        c,
        &body.unwrap(),
        cmd::REPLY_TRACKER,
        BEAT_REPLY_MAX,
    )?;
    Ok(BeatReply::decode(&b).unwrap())
}

/// A reply's gateway list as (group, gateway port or 0 for none).
fn listed(r: &BeatReply) -> Vec<(String, u16)> {
    r.gateways
        .iter()
        .map(|g| (g.group.clone(), g.addr.as_ref().map_or(0, |a| a.port)))
        .collect()
}

/// Online state of `node` in the tracker's view (None: not listed).
fn node_online(v: &GroupsReply, node: SocketAddr) -> Option<bool> {
    v.groups
        .iter()
        .flat_map(|g| &g.nodes)
        .find(|n| n.addr.to_string() == node.to_string())
        .map(|n| n.online)
}

fn code(r: Result<impl std::fmt::Debug, CallError>) -> ErrorCode {
    match r {
        Err(e) => e
            .code()
            .unwrap_or_else(|| panic!("not an error reply: {e}")),
        Ok(v) => panic!("expected an error, got {v:?}"),
    }
}

#[test]
fn nodes_join_beat_go_offline_and_come_back() {
    both("nodes_join_beat_go_offline_and_come_back", |b| {
        let dir = tempfile::tempdir().unwrap();
        let tr = Srv::start(dir.path(), "tracker", &b, &tracker_conf(&["g1"], 1000));
        let a = Srv::start(dir.path(), "node-a", &b, &node_conf("g1", &[tr.addr]));
        let mut c = Srv::start(dir.path(), "node-b", &b, &node_conf("g1", &[tr.addr]));
        support::wait_until("both nodes online", Duration::from_secs(10), || {
            let v = groups(tr.addr).unwrap();
            node_online(&v, a.addr) == Some(true) && node_online(&v, c.addr) == Some(true)
        });
        let v = groups(tr.addr).unwrap();
        assert!(!v.stale);
        let g = &v.groups[0];
        assert_eq!((g.name.as_str(), g.nodes.len()), ("g1", 2));
        assert!(
            g.nodes.iter().all(|n| n.free > 0 && n.beat_age_ms < 1000),
            "{v:?}"
        );
        // SIGSTOP node a: no beats, offline after the window, and SADDRS leaves it out.
        a.proc.signal(Signal::SIGSTOP);
        support::wait_until("node a offline", Duration::from_secs(10), || {
            node_online(&groups(tr.addr).unwrap(), a.addr) == Some(false)
        });
        assert_eq!(node_online(&groups(tr.addr).unwrap(), c.addr), Some(true));
        let r = saddrs(tr.addr, "demo", "alice").unwrap();
        assert_eq!(r.group, "g1");
        assert_eq!(
            r.nodes.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            vec![c.addr.to_string()]
        );
        // `ferry groups` shows the same view, as text and as JSON.
        let out = Command::new(support::bin("ferry"))
            .env("FERRY_KEY", support::auth::key_env())
            .args(["groups", "--tracker", &tr.addr.to_string()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("g1  users 1  nodes 1/2 online"), "{text}");
        assert!(
            text.contains(&format!("{}", a.addr)) && text.contains("offline"),
            "{text}"
        );
        let out = Command::new(support::bin("ferry"))
            .env("FERRY_KEY", support::auth::key_env())
            .args(["--json", "groups", "--tracker", &tr.addr.to_string()])
            .output()
            .unwrap();
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(j["groups"][0]["users"], 1, "{j}");
        assert_eq!(j["groups"][0]["nodes"].as_array().unwrap().len(), 2, "{j}");
        // SIGCONT: its next beat brings it back.
        a.proc.signal(Signal::SIGCONT);
        support::wait_until("node a online again", Duration::from_secs(10), || {
            node_online(&groups(tr.addr).unwrap(), a.addr) == Some(true)
        });
        // kill -9 of node b: offline; then the group has only a.
        c.proc.kill();
        support::wait_until("node b offline", Duration::from_secs(10), || {
            node_online(&groups(tr.addr).unwrap(), c.addr) == Some(false)
        });
        let r = saddrs(tr.addr, "demo", "alice").unwrap();
        assert_eq!(r.nodes.len(), 1, "{} {r:?}", b.name());
        assert_eq!(r.nodes[0].to_string(), a.addr.to_string());
        // The tracker restarts (kill -9): the node is still listed and beating.
        let mut tr = tr;
        tr.restart();
        support::wait_until(
            "node a online after the tracker restart",
            Duration::from_secs(10),
            || groups(tr.addr).is_ok_and(|v| node_online(&v, a.addr) == Some(true)),
        );
        // A tracker on an empty database at the same address answers the node's BEAT with
        // NotJoined; the node JOINs again by itself.
        if matches!(b, Backend::Embedded) {
            let addr = tr.addr;
            drop(tr);
            let fresh = Srv::start_at(
                dir.path(),
                "tracker-fresh",
                &b,
                &tracker_conf(&["g1"], 1000),
                addr,
            );
            support::wait_until(
                "node a re-joined the fresh tracker",
                Duration::from_secs(10),
                || groups(fresh.addr).is_ok_and(|v| node_online(&v, a.addr) == Some(true)),
            );
            assert!(
                a.proc
                    .log_text()
                    .contains("does not know this node; joining again")
            );
        }
    });
}

#[test]
fn routes_are_balanced_and_survive_a_tracker_restart() {
    both("routes_are_balanced_and_survive_a_tracker_restart", |b| {
        let dir = tempfile::tempdir().unwrap();
        let mut tr = Srv::start(
            dir.path(),
            "tracker",
            &b,
            &tracker_conf(&["g1", "g2"], 60_000),
        );
        fake(tr.addr, cmd::TRACKER_JOIN, "g1", 7401, 1 << 30).unwrap();
        fake(tr.addr, cmd::TRACKER_JOIN, "g2", 7402, 2 << 30).unwrap();
        let users: Vec<String> = (0..20).map(|i| format!("user{i}")).collect();
        let first: HashMap<&String, String> = users
            .iter()
            .map(|u| (u, saddrs(tr.addr, "demo", u).unwrap().group))
            .collect();
        // The first user goes to g2 (equal users, more free bytes), then they alternate.
        assert_eq!(first[&users[0]], "g2");
        let in_g1 = first.values().filter(|g| *g == "g1").count();
        assert_eq!(in_g1, 10, "{first:?}");
        let v = groups(tr.addr).unwrap();
        assert_eq!(
            v.groups.iter().map(|g| g.users).collect::<Vec<_>>(),
            vec![10, 10]
        );
        // Asking again, and after a kill -9 and restart of the tracker, gives the same groups.
        for u in &users {
            assert_eq!(saddrs(tr.addr, "demo", u).unwrap().group, first[u]);
        }
        tr.restart();
        for u in &users {
            assert_eq!(
                saddrs(tr.addr, "demo", u).unwrap().group,
                first[u],
                "{}",
                b.name()
            );
        }
        assert_eq!(groups(tr.addr).unwrap().groups[1].users, 10);
    });
}

/// Nodes that serve HTTP learn every group's online gateways in each JOIN/BEAT reply (so a
/// gateway can redirect to another group's); nodes without one get no list; a node from before
/// gateways (the shorter JOIN) still joins; gateways survive a tracker restart (they are in the
/// database) and drop out of the list when their node goes offline or joins again without one.
#[test]
fn nodes_that_serve_http_learn_every_groups_gateways() {
    both("nodes_that_serve_http_learn_every_groups_gateways", |b| {
        let dir = tempfile::tempdir().unwrap();
        let mut tr = Srv::start(
            dir.path(),
            "tracker",
            &b,
            &tracker_conf(&["g1", "g2", "g3"], 1500),
        );
        let (join, beat) = (cmd::TRACKER_JOIN, cmd::TRACKER_BEAT);
        let g = |name: &str, port: u16| (name.to_owned(), port);
        let r = fake_gw(tr.addr, join, "g1", 7401, 1, Some(8401)).unwrap();
        assert_eq!(r.interval_ms, 100);
        assert_eq!(listed(&r), vec![g("g1", 8401), g("g2", 0), g("g3", 0)]);
        // No gateway, no list.
        let r = fake_gw(tr.addr, join, "g2", 7402, 1, None).unwrap();
        assert_eq!(listed(&r), vec![]);
        let r = fake_gw(tr.addr, join, "g2", 7403, 1, Some(8403)).unwrap();
        assert_eq!(listed(&r), vec![g("g1", 8401), g("g2", 8403), g("g3", 0)]);
        // The JOIN of a node from before gateways: interval only in the body it knows of.
        let old = NodeHello {
            group: "g3".into(),
            host: "127.0.0.1".into(),
            port: 7404,
            version: 1,
            started: 1,
            free: 1,
            http: None,
        }
        .encode_join()
        .unwrap();
        let body = &old[..JOIN_V1_LEN];
        let reply = call_once(
            tr.addr,
            T,
            None,
            join,
            body,
            cmd::REPLY_TRACKER,
            BEAT_REPLY_MAX,
        );
        assert_eq!(BeatReply::decode(&reply.unwrap()).unwrap().interval_ms, 100);
        let r = fake_gw(tr.addr, beat, "g1", 7401, 1, None).unwrap();
        assert_eq!(listed(&r), vec![g("g1", 8401), g("g2", 8403), g("g3", 0)]);
        // kill -9 and restart: the gateways come back from the database.
        tr.restart();
        let r = fake_gw(tr.addr, beat, "g2", 7403, 1, None).unwrap();
        assert_eq!(
            listed(&r),
            vec![g("g1", 8401), g("g2", 8403), g("g3", 0)],
            "{}",
            b.name()
        );
        // 7401 stops beating: once offline, g1 has no gateway.
        support::wait_until(
            "g1's gateway to go offline",
            Duration::from_secs(10),
            || {
                let r = fake_gw(tr.addr, beat, "g2", 7403, 1, None).unwrap();
                listed(&r)[0] == g("g1", 0)
            },
        );
        // Joining again without a gateway takes it out of the list.
        fake_gw(tr.addr, join, "g1", 7401, 1, Some(8401)).unwrap();
        fake_gw(tr.addr, join, "g2", 7403, 1, None).unwrap();
        let r = fake_gw(tr.addr, beat, "g1", 7401, 1, None).unwrap();
        assert_eq!(listed(&r), vec![g("g1", 8401), g("g2", 0), g("g3", 0)]);
    });
}

/// `ferry groups` lists who is in which group: every user with `--users all` (600 users, so
/// more than two 256-user pages per group), the first 20 per group by default, as text and
/// JSON; TRACKER_USERS itself refuses a group the cluster does not have.
#[test]
fn ferry_groups_lists_each_groups_users_page_by_page() {
    both("ferry_groups_lists_each_groups_users_page_by_page", |b| {
        let dir = tempfile::tempdir().unwrap();
        let tr = Srv::start(
            dir.path(),
            "tracker",
            &b,
            &tracker_conf(&["g1", "g2"], 60_000),
        );
        fake(tr.addr, cmd::TRACKER_JOIN, "g1", 7401, 1 << 30).unwrap();
        fake(tr.addr, cmd::TRACKER_JOIN, "g2", 7402, 2 << 30).unwrap();
        let mut want: HashMap<String, Vec<String>> = HashMap::new();
        for i in 0..600 {
            let app = if i % 7 == 0 { "chat" } else { "demo" };
            let user = format!("u{i:03}");
            let g = saddrs(tr.addr, app, &user).unwrap().group;
            want.entry(g).or_default().push(format!("{app}/{user}"));
        }
        for v in want.values_mut() {
            v.sort();
        }
        // The view's user counts follow the database within a refresh (an assignment and a
        // refresh may cross); the lists are read from the database itself.
        support::wait_until("the view's user counts", Duration::from_secs(10), || {
            let v = groups(tr.addr).unwrap();
            v.groups.iter().map(|g| g.users).collect::<Vec<_>>()
                == vec![want["g1"].len() as u64, want["g2"].len() as u64]
        });
        // `ferry [--json] groups --tracker T [extra]`
        let ferry = |json: bool, extra: &[&str]| {
            let tracker = tr.addr.to_string();
            let mut args = vec!["groups", "--tracker", &tracker];
            if json {
                args.insert(0, "--json");
            }
            args.extend_from_slice(extra);
            let out = Command::new(support::bin("ferry"))
                .env("FERRY_KEY", support::auth::key_env())
                .args(&args)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            String::from_utf8(out.stdout).unwrap()
        };
        let listed = |j: &serde_json::Value, g: usize| -> Vec<String> {
            let list = j["groups"][g]["user_list"].as_array().unwrap();
            let name = |u: &serde_json::Value| {
                format!(
                    "{}/{}",
                    u["app"].as_str().unwrap(),
                    u["user"].as_str().unwrap()
                )
            };
            list.iter().map(name).collect()
        };
        let all: serde_json::Value =
            serde_json::from_str(&ferry(true, &["--users", "all"])).unwrap();
        for (i, g) in ["g1", "g2"].iter().enumerate() {
            assert_eq!(all["groups"][i]["group"], *g);
            assert_eq!(listed(&all, i), want[*g], "{g} ({})", b.name());
            assert_eq!(all["groups"][i]["users"], want[*g].len() as u64);
            assert_eq!(all["groups"][i]["user_list_complete"], true);
        }
        let j: serde_json::Value = serde_json::from_str(&ferry(true, &[])).unwrap();
        assert_eq!(listed(&j, 0), want["g1"][..20]);
        assert_eq!(j["groups"][0]["user_list_complete"], false);
        let text = ferry(false, &[]);
        let first = format!("  users: {}, ", want["g1"][0]);
        assert!(text.contains(&first), "{text}");
        let rest = format!("... and {} more", want["g1"].len() - 20);
        assert!(text.contains(&rest), "{text}");
        let q = proto::UsersReq {
            group: "g9".into(),
            after: (String::new(), String::new()),
            limit: 5,
        };
        let r = call_once(
            tr.addr,
            T,
            None,
            cmd::TRACKER_USERS,
            &q.encode().unwrap(),
            cmd::REPLY_TRACKER,
            proto::USERS_REPLY_MAX,
        );
        assert_eq!(code(r), ErrorCode::UnknownGroup);
    });
}

#[test]
fn two_trackers_on_one_database_agree() {
    let Some(db) = support::pg_db("two_trackers_on_one_database_agree") else {
        return;
    };
    let b = Backend::Pg(db.url.clone());
    let dir = tempfile::tempdir().unwrap();
    let t1 = Srv::start(
        dir.path(),
        "tracker-1",
        &b,
        &tracker_conf(&["g1", "g2", "g3"], 60_000),
    );
    let t2 = Srv::start(
        dir.path(),
        "tracker-2",
        &b,
        &tracker_conf(&["g1", "g2", "g3"], 60_000),
    );
    // A node joined at tracker 1 beats at tracker 2 (shared database: it is known there).
    for (g, port) in [("g1", 7401), ("g2", 7402), ("g3", 7403)] {
        fake(t1.addr, cmd::TRACKER_JOIN, g, port, 1 << 30).unwrap();
        fake(t2.addr, cmd::TRACKER_BEAT, g, port, 1 << 30).unwrap();
    }
    // Four threads per tracker ask for the same 40 users at once.
    let answers: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    std::thread::scope(|sc| {
        for i in 0..8 {
            let t = if i % 2 == 0 { t1.addr } else { t2.addr };
            let answers = answers.clone();
            sc.spawn(move || {
                for u in 0..40 {
                    let user = format!("u{}", (u + i * 5) % 40);
                    let g = saddrs(t, "demo", &user).unwrap().group;
                    answers.lock().unwrap().push((user, g));
                }
            });
        }
    });
    let mut by_user: HashMap<String, String> = HashMap::new();
    for (u, g) in answers.lock().unwrap().iter() {
        let prev = by_user.entry(u.clone()).or_insert_with(|| g.clone());
        assert_eq!(prev, g, "user {u} got two groups");
    }
    assert_eq!(by_user.len(), 40);
    // Both views list the same groups, users and nodes once refreshed.
    support::wait_until("both trackers' views agree", Duration::from_secs(5), || {
        let (a, b) = (groups(t1.addr).unwrap(), groups(t2.addr).unwrap());
        let key = |v: &GroupsReply| {
            v.groups
                .iter()
                .map(|g| (g.name.clone(), g.users, g.nodes.len()))
                .collect::<Vec<_>>()
        };
        key(&a) == key(&b) && a.groups.iter().map(|g| g.users).sum::<u64>() == 40
    });
}

/// Seed 004's id role is not ferry's (storage nodes reserve ids in the metadata database): a
/// config naming it is refused at start with a message that says so.
#[test]
fn a_config_with_the_id_role_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("ids.toml");
    std::fs::write(&conf, "roles = [\"tracker\", \"id\"]\n").unwrap();
    let mut child = Command::new(support::bin("ferry-server"))
        .arg("--config")
        .arg(&conf)
        .arg("--listen")
        .arg(support::free_addr().to_string())
        .arg("--data")
        .arg(dir.path().join("data"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("ferry-server started with roles = [\"id\"]");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success());
    assert!(err.contains("unknown variant `id`"), "{err}");
}

/// Sends raw bytes and returns the error code answered, and whether the server then closed.
fn raw(addr: SocketAddr, bytes: &[u8]) -> (ErrorCode, bool) {
    let mut s = support::raw::Raw::connect(addr);
    s.set_timeout(T);
    assert!(s.send_raw(bytes));
    let code = match s.recv() {
        support::raw::Reply::Err(code, _) => code,
        other => panic!("expected an error frame, got {other:?}"),
    };
    (code, s.closed())
}

#[test]
fn bad_input_gets_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let b = Backend::Embedded;
    let tr = Srv::start(
        dir.path(),
        "tracker",
        &b,
        &tracker_conf(&["g1", "g2"], 1500),
    );
    // JOIN with an unknown group; BEAT from a node that never joined.
    let e = fake(tr.addr, cmd::TRACKER_JOIN, "nope", 7401, 1).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::UnknownGroup));
    assert!(e.to_string().contains("nope"), "{e}");
    assert_eq!(
        code(fake(tr.addr, cmd::TRACKER_BEAT, "g1", 7401, 1)),
        ErrorCode::NotJoined
    );
    // A group name that is not UTF-8 or longer than its field: error 1; a body longer than
    // JOIN: error 4. The connection closes after either.
    let good = NodeHello {
        group: "g1".into(),
        host: "127.0.0.1".into(),
        port: 7401,
        version: 1,
        started: 1,
        free: 1,
        http: None,
    }
    .encode_join()
    .unwrap();
    let mut bad = good.clone();
    bad[0] = 0xc3;
    bad[1] = 0x28;
    assert_eq!(
        raw(tr.addr, &proto::frame(cmd::TRACKER_JOIN, 0, &bad)),
        (ErrorCode::BadFrame, true)
    );
    // "ggg...gé": 33 bytes written over the 32-byte field, cut inside the "é".
    let mut long = good.clone();
    long[..31].fill(b'g');
    long[31..33].copy_from_slice("é".as_bytes());
    assert_eq!(
        raw(tr.addr, &proto::frame(cmd::TRACKER_JOIN, 0, &long)),
        (ErrorCode::BadFrame, true)
    );
    let mut longer = good.clone();
    longer.push(0);
    assert_eq!(
        raw(tr.addr, &proto::frame(cmd::TRACKER_JOIN, 0, &longer)),
        (ErrorCode::TooLarge, true)
    );
    // A group of exactly 32 bytes is fine (when the group exists).
    let g32 = "x".repeat(32);
    assert_eq!(
        code(fake(tr.addr, cmd::TRACKER_JOIN, &g32, 7401, 1)),
        ErrorCode::UnknownGroup
    );
    // A user routed to a group whose only node went offline: NoNode naming the group.
    fake(tr.addr, cmd::TRACKER_JOIN, "g1", 7401, 1).unwrap();
    assert_eq!(saddrs(tr.addr, "demo", "alice").unwrap().group, "g1");
    std::thread::sleep(Duration::from_millis(1800));
    let e = saddrs(tr.addr, "demo", "alice").unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NoNode));
    assert!(e.to_string().contains("group g1 has no online node"), "{e}");
    // A new user with no online node anywhere: NoNode too, never a hang.
    assert_eq!(code(saddrs(tr.addr, "demo", "bob")), ErrorCode::NoNode);
    // The tracker runs no storage role: error 3 for HELLO; and 40 (seed 004's ID_GET) is
    // no command at all.
    let hello = support::auth::hello_body("demo", "alice");
    assert_eq!(
        raw(tr.addr, &proto::frame(cmd::HELLO, 0, &hello)).0,
        ErrorCode::UnknownCommand
    );
    assert_eq!(
        raw(tr.addr, &proto::frame(40, 0, &[0; 68])),
        (ErrorCode::UnknownCommand, true)
    );
    // A storage-only server answers the tracker commands with error 3.
    let st = Srv::start(dir.path(), "storage", &b, "");
    assert_eq!(
        raw(st.addr, &proto::frame(cmd::TRACKER_GROUPS, 0, &[])).0,
        ErrorCode::UnknownCommand
    );
}

/// A TCP forwarder to PostgreSQL that the test can cut (every connection reset, new ones
/// refused) and restore: "the database is unreachable" without touching the shared server.
struct Cuttable {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Cuttable {
    fn start(target: SocketAddr) -> Cuttable {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (c2, s2, k2) = (cut.clone(), stop.clone(), conns.clone());
        std::thread::spawn(move || {
            while !s2.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((a, _)) if !c2.load(Ordering::SeqCst) => {
                        let Ok(b) = TcpStream::connect(target) else {
                            continue;
                        };
                        a.set_nonblocking(false).unwrap();
                        for (mut from, mut to) in [
                            (a.try_clone().unwrap(), b.try_clone().unwrap()),
                            (b.try_clone().unwrap(), a.try_clone().unwrap()),
                        ] {
                            std::thread::spawn(move || {
                                let _ = std::io::copy(&mut from, &mut to);
                                let _ = to.shutdown(Shutdown::Both);
                            });
                        }
                        k2.lock().unwrap().extend([a, b]);
                    }
                    Ok((a, _)) => drop(a),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Cuttable {
            addr,
            cut,
            stop,
            conns,
        }
    }

    fn set_cut(&self, on: bool) {
        self.cut.store(on, Ordering::SeqCst);
        if on {
            for c in self.conns.lock().unwrap().drain(..) {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
    }
}

impl Drop for Cuttable {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.set_cut(true);
    }
}

#[test]
fn database_unreachable_gives_stale_answers_then_recovers() {
    let Some(db) = support::pg_db("database_unreachable_gives_stale_answers_then_recovers") else {
        return;
    };
    let pg_addr: SocketAddr = {
        let cfg: postgres::Config = db.url.parse().unwrap();
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        SocketAddr::from(([127, 0, 0, 1], port))
    };
    let fwd = Cuttable::start(pg_addr);
    let b = Backend::Pg(via(&db.url, fwd.addr));
    let dir = tempfile::tempdir().unwrap();
    let tr = Srv::start(dir.path(), "tracker", &b, &tracker_conf(&["g1"], 60_000));
    fake(tr.addr, cmd::TRACKER_JOIN, "g1", 7401, 1).unwrap();
    assert!(!saddrs(tr.addr, "demo", "alice").unwrap().stale);
    fwd.set_cut(true);
    support::wait_until("a stale GROUPS answer", Duration::from_secs(15), || {
        groups(tr.addr).unwrap().stale
    });
    let v = groups(tr.addr).unwrap();
    assert_eq!(v.groups[0].users, 1, "the last view is kept");
    let r = saddrs(tr.addr, "demo", "alice").unwrap();
    assert_eq!((r.group.as_str(), r.stale, r.nodes.len()), ("g1", true, 1));
    // A known node's beat is still taken; a new user cannot be placed: error 24.
    fake(tr.addr, cmd::TRACKER_BEAT, "g1", 7401, 1).unwrap();
    let e = saddrs(tr.addr, "demo", "newcomer").unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unavailable), "{e}");
    fwd.set_cut(false);
    support::wait_until("fresh answers again", Duration::from_secs(15), || {
        !groups(tr.addr).unwrap().stale
    });
    assert!(!saddrs(tr.addr, "demo", "newcomer").unwrap().stale);
    assert!(tr.proc.log_text().contains("database unreachable"));
}
