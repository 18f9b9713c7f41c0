//! End-to-end tests of the routing server-proxy (`trackers` instead of `upstreams`): the real
//! `ferry-proxy` binary between a test client and stand-in trackers and storage nodes written
//! here, so the routing rules are checked without PostgreSQL (tests/cluster_e2e.rs runs the real
//! tracker and servers). A stand-in tracker answers TRACKER_SADDRS from a table (user -> group,
//! group -> nodes) and counts the lookups; a stand-in node answers PROBE, and after a HELLO
//! sends one frame naming itself, so the test sees where each session landed. Both take an
//! optional LINK frame first and keep its proof, so a test can check what the proxy sent.
//! The proxy checks the session token in every HELLO (`[auth]`), minted here with the app key
//! the proxy is given.

use crate::support;

use ferry_common::auth::{LinkConfig, SigningKey, new_secret};
use ferry_common::clock::now_secs;
use ferry_common::proto::{
    self, ErrorBody, ErrorCode, Header, Hello, NodeAddr, SaddrsReply, SaddrsReq, cmd, status,
};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{Proc, free_addr, wait_ready};

const IO: Duration = Duration::from_secs(10);

/// A fresh session token for `user` of app demo, made with the tests' shared app key (which
/// the routing proxies get in `[auth.keys.*]`).
fn token(user: &str) -> Vec<u8> {
    support::auth::token("demo", user)
}

/// Link proofs a stand-in received (LINK frame bodies), in arrival order.
type Proofs = Arc<Mutex<Vec<Vec<u8>>>>;

/// Reads the first frame, and the one after it when the first is a LINK (its proof is kept).
fn read_opening(s: &mut TcpStream, proofs: &Proofs) -> std::io::Result<(Header, Vec<u8>)> {
    let (h, body) = read_frame(s)?;
    if h.cmd != cmd::LINK {
        return Ok((h, body));
    }
    proofs.lock().unwrap().push(body);
    read_frame(s)
}

/// One whole frame, at most 64 KiB of body.
fn read_frame(s: &mut TcpStream) -> std::io::Result<(Header, Vec<u8>)> {
    support::raw::read_frame(s, 64 * 1024)
}

/// A stand-in storage node: PROBE -> server identity; HELLO -> one frame "node NAME user USER".
struct Node {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    proofs: Proofs,
}

impl Node {
    fn start(name: &str) -> Node {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let proofs = Proofs::default();
        let (flag, name, p) = (stop.clone(), name.to_owned(), proofs.clone());
        std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => {
                        let (name, p) = (name.clone(), p.clone());
                        std::thread::spawn(move || serve_node(s, &name, &p));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Node { addr, stop, proofs }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve_node(mut s: TcpStream, name: &str, proofs: &Proofs) {
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(IO)).unwrap();
    let Ok((h, body)) = read_opening(&mut s, proofs) else {
        return;
    };
    let out = match h.cmd {
        cmd::PROBE => proto::frame(
            cmd::REPLY_STORAGE,
            status::OK,
            &proto::Identity {
                version: proto::VERSION,
                role: proto::Role::Server,
            }
            .encode(),
        ),
        cmd::HELLO => {
            let hello = Hello::decode(&body).unwrap();
            let text = format!("node {name} user {}", hello.user);
            proto::frame(cmd::REPLY_STORAGE, status::OK, text.as_bytes())
        }
        _ => return,
    };
    let _ = s.write_all(&out);
}

/// What a stand-in tracker answers.
#[derive(Default)]
struct Table {
    users: HashMap<String, String>,
    groups: HashMap<String, Vec<SocketAddr>>,
}

struct Tracker {
    addr: SocketAddr,
    table: Arc<Mutex<Table>>,
    lookups: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    proofs: Proofs,
    /// The users lookups asked for, in order.
    asked: Arc<Mutex<Vec<String>>>,
}

impl Tracker {
    fn start() -> Tracker {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let table = Arc::new(Mutex::new(Table::default()));
        let lookups = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let proofs = Proofs::default();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let (t, n, flag) = (table.clone(), lookups.clone(), stop.clone());
        let (p, a) = (proofs.clone(), asked.clone());
        std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => {
                        let (t, n, p, a) = (t.clone(), n.clone(), p.clone(), a.clone());
                        std::thread::spawn(move || serve_tracker(s, &t, &n, &p, &a));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Tracker {
            addr,
            table,
            lookups,
            stop,
            proofs,
            asked,
        }
    }

    fn route(&self, user: &str, group: &str) {
        let mut t = self.table.lock().unwrap();
        t.users.insert(user.into(), group.into());
    }

    fn nodes(&self, group: &str, nodes: &[SocketAddr]) {
        let mut t = self.table.lock().unwrap();
        t.groups.insert(group.into(), nodes.to_vec());
    }

    fn lookups(&self) -> usize {
        self.lookups.load(Ordering::SeqCst)
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve_tracker(
    mut s: TcpStream,
    table: &Mutex<Table>,
    lookups: &AtomicUsize,
    proofs: &Proofs,
    asked: &Mutex<Vec<String>>,
) {
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(IO)).unwrap();
    let Ok((h, body)) = read_opening(&mut s, proofs) else {
        return;
    };
    assert_eq!(h.cmd, cmd::TRACKER_SADDRS);
    let req = SaddrsReq::decode(&body).unwrap();
    asked.lock().unwrap().push(req.user.clone());
    lookups.fetch_add(1, Ordering::SeqCst);
    let t = table.lock().unwrap();
    let group = t
        .users
        .get(&req.user)
        .cloned()
        .unwrap_or_else(|| "g1".into());
    let nodes = t.groups.get(&group).cloned().unwrap_or_default();
    let out = if nodes.is_empty() {
        ErrorBody::new(
            ErrorCode::NoNode,
            format!("group {group} has no online node"),
        )
        .frame(cmd::REPLY_TRACKER)
    } else {
        let reply = SaddrsReply {
            group,
            stale: false,
            nodes: nodes
                .iter()
                .map(|a| NodeAddr {
                    host: a.ip().to_string(),
                    port: a.port(),
                })
                .collect(),
        };
        proto::frame(cmd::REPLY_TRACKER, status::OK, &reply.encode().unwrap())
    };
    let _ = s.write_all(&out);
}

/// A routing proxy in front of `trackers`, checking tokens made with the tests' app key.
fn proxy(
    dir: &std::path::Path,
    trackers: &[SocketAddr],
    cache_ms: u64,
) -> (Proc, SocketAddr, SocketAddr) {
    proxy_with(dir, trackers, cache_ms, "")
}

/// [`proxy`] with more config sections (`tables`: TOML tables such as `[link.send]`).
fn proxy_with(
    dir: &std::path::Path,
    trackers: &[SocketAddr],
    cache_ms: u64,
    tables: &str,
) -> (Proc, SocketAddr, SocketAddr) {
    let listen = free_addr();
    let stats = free_addr();
    let list: Vec<String> = trackers.iter().map(|a| format!("\"{a}\"")).collect();
    let conf = dir.join(format!("routed-{}.toml", listen.port()));
    std::fs::write(
        &conf,
        format!(
            "listen = \"{listen}\"\ntrackers = [{}]\nroute_cache_ms = {cache_ms}\n\
             connect_timeout_ms = 300\nstats_listen = \"{stats}\"\nworkers = 2\n{tables}\n{}",
            list.join(", "),
            support::auth::auth_toml()
        ),
    )
    .unwrap();
    let p = Proc::spawn(
        "routed-proxy",
        Command::new(support::bin("ferry-proxy")).args(["--config", conf.to_str().unwrap()]),
        dir,
    );
    wait_ready(listen, Duration::from_secs(10));
    (p, listen, stats)
}

/// Opens a session as `user` (with a fresh token) and returns the first frame that comes back.
fn session(proxy: SocketAddr, user: &str) -> (Header, Vec<u8>) {
    hello_with(proxy, user, &token(user))
}

/// Opens a session with a HELLO for app demo and `user` carrying `credential`.
fn hello_with(proxy: SocketAddr, user: &str, credential: &[u8]) -> (Header, Vec<u8>) {
    let mut s = TcpStream::connect_timeout(&proxy, IO).unwrap();
    s.set_read_timeout(Some(IO)).unwrap();
    let hello = Hello::new("demo", user, credential).encode().unwrap();
    s.write_all(&proto::frame(cmd::HELLO, 0, &hello)).unwrap();
    read_frame(&mut s).unwrap()
}

/// The node a session as `user` landed on.
fn landed(proxy: SocketAddr, user: &str) -> String {
    let (h, body) = session(proxy, user);
    assert_eq!(h.status, status::OK, "{}", String::from_utf8_lossy(&body));
    let text = String::from_utf8(body).unwrap();
    let rest = text.strip_prefix("node ").unwrap();
    let (node, who) = rest.split_once(" user ").unwrap();
    assert_eq!(who, user);
    node.to_owned()
}

/// Which of the named nodes the proxy prefers for `user` of app demo: its own per-user order
/// (`route::preferred`), whatever order the tracker answered in.
fn preferred<'a>(nodes: &[(&'a str, SocketAddr)], user: &str) -> &'a str {
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.1).collect();
    let first = ferry_proxy::route::preferred(&addrs, "demo", user)[0];
    nodes.iter().find(|n| n.1 == first).unwrap().0
}

fn error_of(proxy: SocketAddr, user: &str) -> ErrorBody {
    let (h, body) = session(proxy, user);
    assert_eq!((h.cmd, h.status), (cmd::REPLY_PROXY, status::ERROR));
    ErrorBody::decode(&body).unwrap()
}

fn stats(addr: SocketAddr) -> HashMap<String, u64> {
    let mut s = TcpStream::connect_timeout(&addr, IO).unwrap();
    s.set_read_timeout(Some(IO)).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
        .collect()
}

fn closed_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[test]
fn users_land_in_their_group_and_routes_are_cached() {
    let dir = tempfile::tempdir().unwrap();
    let (a1, a2, b1) = (Node::start("a1"), Node::start("a2"), Node::start("b1"));
    let t = Tracker::start();
    t.nodes("g1", &[a1.addr, a2.addr]);
    t.nodes("g2", &[b1.addr]);
    t.route("alice", "g1");
    t.route("bob", "g2");
    let (_p, px, st) = proxy(dir.path(), &[t.addr], 60_000);
    let g1 = [("a1", a1.addr), ("a2", a2.addr)];
    for _ in 0..5 {
        assert_eq!(
            landed(px, "alice"),
            preferred(&g1, "alice"),
            "every session of a user lands on its preferred node"
        );
        assert_eq!(landed(px, "bob"), "b1");
    }
    // One lookup per user; the other sessions were served from the cache.
    assert_eq!(t.lookups(), 2);
    let s = stats(st);
    assert_eq!(s["route_lookups"], 2);
    assert_eq!(s["route_cache_misses"], 2);
    assert_eq!(s["route_cache_hits"], 8);
    assert_eq!(s["sessions_relayed"], 10);
    assert_eq!(s["route_failures"], 0);
    // Users spread over the group's nodes.
    let users: Vec<String> = (0..8).map(|i| format!("user{i}")).collect();
    for u in &users {
        t.route(u, "g1");
    }
    let mut seen: Vec<String> = users.iter().map(|u| landed(px, u)).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen, ["a1", "a2"]);
}

#[test]
fn entries_expire_after_route_cache_ms() {
    let dir = tempfile::tempdir().unwrap();
    let (a1, b1) = (Node::start("a1"), Node::start("b1"));
    let t = Tracker::start();
    t.nodes("g1", &[a1.addr]);
    t.nodes("g2", &[b1.addr]);
    t.route("alice", "g1");
    let (_p, px, _) = proxy(dir.path(), &[t.addr], 200);
    assert_eq!(landed(px, "alice"), "a1");
    // The tracker moves alice; within the cache period the proxy still uses the old answer.
    t.route("alice", "g2");
    assert_eq!(landed(px, "alice"), "a1");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(landed(px, "alice"), "b1");
    assert_eq!(t.lookups(), 2);
}

#[test]
fn a_dead_node_fails_over_to_its_peer_and_drops_the_group_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let a2 = Node::start("a2");
    let t = Tracker::start();
    let dead = closed_addr();
    t.nodes("g1", &[dead, a2.addr]);
    // Two users who both prefer the dead node (the proxy's per-user order).
    let nodes = [("dead", dead), ("a2", a2.addr)];
    let mut users = (0..100)
        .map(|i| format!("user{i}"))
        .filter(|u| preferred(&nodes, u) == "dead");
    let (alice, bob) = (users.next().unwrap(), users.next().unwrap());
    t.route(&alice, "g1");
    t.route(&bob, "g1");
    let (_p, px, st) = proxy(dir.path(), &[t.addr], 60_000);
    assert_eq!(landed(px, &alice), "a2");
    // The failed connect dropped g1's nodes: bob's session asks again, and tries the dead
    // node last (so it is not even attempted).
    assert_eq!(landed(px, &bob), "a2");
    assert_eq!(t.lookups(), 2);
    let s = stats(st);
    assert_eq!(s["failovers"], 1, "{s:?}");
    assert_eq!(s["standby_sessions"], 2, "{s:?}");
}

#[test]
fn every_node_dead_refreshes_once_then_error_19_naming_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tracker::start();
    t.nodes("g1", &[closed_addr(), closed_addr()]);
    t.route("alice", "g1");
    let (_p, px, st) = proxy(dir.path(), &[t.addr], 60_000);
    let started = Instant::now();
    let e = error_of(px, "alice");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(e.code, ErrorCode::Upstream);
    assert!(e.text.contains("group g1"), "{}", e.text);
    assert_eq!(t.lookups(), 2, "one lookup and one refresh");
    assert_eq!(stats(st)["no_upstream"], 1);
}

#[test]
fn a_group_without_online_nodes_gets_error_23_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tracker::start();
    t.route("carol", "g3");
    let (_p, px, st) = proxy(dir.path(), &[t.addr], 60_000);
    let started = Instant::now();
    let e = error_of(px, "carol");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(e.code, ErrorCode::NoNode);
    assert_eq!(e.text, "group g3 has no online node");
    // Not cached: the next session asks again and finds the group back.
    let c1 = Node::start("c1");
    t.nodes("g3", &[c1.addr]);
    assert_eq!(landed(px, "carol"), "c1");
    assert_eq!(stats(st)["route_no_node"], 1);
}

#[test]
fn trackers_are_tried_in_turn_and_none_answering_is_error_19() {
    let dir = tempfile::tempdir().unwrap();
    let a1 = Node::start("a1");
    let t = Tracker::start();
    t.nodes("g1", &[a1.addr]);
    // A tracker that accepts but never answers, a closed port, then a working one.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = closed_addr();
    let (_p, px, st) = proxy(
        dir.path(),
        &[silent.local_addr().unwrap(), dead, t.addr],
        60_000,
    );
    assert_eq!(landed(px, "alice"), "a1");
    // Only dead trackers: a clear error in bounded time (one connect timeout per tracker).
    let (_p2, px2, st2) = proxy(dir.path(), &[silent.local_addr().unwrap(), dead], 60_000);
    let started = Instant::now();
    let e = error_of(px2, "alice");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(e.code, ErrorCode::Upstream);
    assert!(e.text.contains("no tracker answered"), "{}", e.text);
    assert!(e.text.contains(&dead.to_string()), "{}", e.text);
    assert_eq!(stats(st2)["route_failures"], 1);
    assert_eq!(stats(st)["route_failures"], 0);
}

#[test]
fn the_client_cli_reports_a_group_without_nodes_clearly_and_in_bounded_time() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tracker::start();
    t.route("dave", "g4");
    let (_p, px, _) = proxy(dir.path(), &[t.addr], 60_000);
    let conf = dir.path().join("client.toml");
    std::fs::write(
        &conf,
        "timeout_ms = 300\ntries_per_proxy = 2\noutage_window_ms = 1500\n",
    )
    .unwrap();
    let started = Instant::now();
    let out = Command::new(support::bin("ferry"))
        .env("FERRY_KEY", support::auth::key_env())
        .args([
            "--config",
            conf.to_str().unwrap(),
            "--proxy",
            &px.to_string(),
        ])
        .args(["--app", "demo", "--user", "dave", "--json", "stat", "g4/1"])
        .env("FERRY_STATE_DIR", dir.path().join("state"))
        .env("FERRY_KEY", support::auth::key_env())
        .output()
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let v: serde_json::Value = serde_json::from_str(stderr.trim()).unwrap();
    assert_eq!(v["code"], 23, "{stderr}");
    assert_eq!(out.status.code(), Some(6), "unreachable: {stderr}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("group g4 has no online node"),
        "{stderr}"
    );
    // It kept asking during its outage window rather than failing on the first answer.
    assert!(t.lookups() >= 2, "{}", t.lookups());
}

/// The error a session with `credential` gets.
fn refused(proxy: SocketAddr, user: &str, credential: &[u8]) -> ErrorBody {
    let (h, body) = hello_with(proxy, user, credential);
    assert_eq!((h.cmd, h.status), (cmd::REPLY_PROXY, status::ERROR));
    ErrorBody::decode(&body).unwrap()
}

#[test]
fn sessions_need_a_valid_token_and_are_routed_by_its_user() {
    let dir = tempfile::tempdir().unwrap();
    let (a1, b1) = (Node::start("a1"), Node::start("b1"));
    let t = Tracker::start();
    t.nodes("g1", &[a1.addr]);
    t.nodes("g2", &[b1.addr]);
    t.route("alice", "g1");
    t.route("bob", "g2");
    let (_p, px, st) = proxy(dir.path(), &[t.addr], 60_000);
    // No token at all.
    let e = refused(px, "alice", b"");
    assert_eq!(
        (e.code, e.text.as_str()),
        (ErrorCode::Auth, "session token required")
    );
    // One changed byte (the MAC no longer matches).
    let mut tampered = token("alice");
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let e = refused(px, "alice", &tampered);
    assert_eq!(
        (e.code, e.text.as_str()),
        (ErrorCode::Auth, "session token not valid")
    );
    // The user field rewritten to someone else's (same length), MAC unchanged.
    let mut moved = token("alice");
    let at = moved.windows(5).position(|w| w == b"alice").unwrap();
    moved[at..at + 5].copy_from_slice(b"bobby");
    assert_eq!(refused(px, "bobby", &moved).code, ErrorCode::Auth);
    // Signed with a key the proxy does not have.
    let stranger = SigningKey {
        id: support::auth::KEY_ID.into(),
        secret: new_secret(),
    };
    let forged = stranger
        .mint("demo", "alice", ferry_common::token::Scope::ALL, 300)
        .unwrap();
    assert_eq!(refused(px, "alice", &forged).code, ErrorCode::Auth);
    // Expired half an hour ago (well past the allowed clock skew).
    let now = now_secs();
    let expired = ferry_common::token::Claims {
        key_id: support::auth::KEY_ID.into(),
        app: "demo".into(),
        user: "alice".into(),
        scope: ferry_common::token::Scope::ALL,
        not_before: now - 3600,
        expires: now - 1800,
        nonce: [9; 16],
        delegation: None,
    }
    .mint(support::auth::KEY_SECRET.as_bytes())
    .unwrap();
    let e = refused(px, "alice", &expired);
    assert_eq!(
        (e.code, e.text.as_str()),
        (ErrorCode::Auth, "session token not valid")
    );
    // A valid token opens one session; the same token again is a replay.
    let once = token("alice");
    let (h, body) = hello_with(px, "alice", &once);
    assert_eq!(h.status, status::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(body, b"node a1 user alice");
    assert_eq!(refused(px, "alice", &once).code, ErrorCode::Auth);
    // No refused session cost a tracker lookup.
    assert_eq!(t.lookups(), 1);
    // A HELLO that says alice but carries bob's token goes where bob lives: the route follows
    // the token, never the HELLO's own user field (which is forwarded as it came).
    let (h, body) = hello_with(px, "alice", &token("bob"));
    assert_eq!(h.status, status::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(body, b"node b1 user alice");
    assert_eq!(*t.asked.lock().unwrap(), ["alice", "bob"]);
    let s = stats(st);
    assert_eq!(s["token_refused"], 6, "{s:?}");
    assert_eq!(s["sessions_relayed"], 2, "{s:?}");
    assert_eq!(s["route_lookups"], 2, "{s:?}");
    // The secret never reaches the log.
    assert!(!_p.log_text().contains(support::auth::KEY_SECRET));
}

#[test]
fn a_routing_proxy_proves_itself_to_trackers_and_nodes_with_fresh_links() {
    let dir = tempfile::tempdir().unwrap();
    let secret = new_secret();
    let (a1, a2) = (Node::start("a1"), Node::start("a2"));
    let t = Tracker::start();
    let dead = closed_addr();
    t.nodes("g1", &[a1.addr, a2.addr]);
    t.nodes("g2", &[dead, a2.addr]);
    t.route("alice", "g1");
    t.route("bob", "g2");
    let link = format!("[link.send]\nid = \"sp\"\nsecret = \"{secret}\"\n");
    let (_p, px, _) = proxy_with(dir.path(), &[t.addr], 200, &link);
    let alices = preferred(&[("a1", a1.addr), ("a2", a2.addr)], "alice");
    assert_eq!(landed(px, "alice"), alices);
    assert_eq!(landed(px, "bob"), "a2");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(landed(px, "alice"), alices);
    assert_eq!(landed(px, "bob"), "a2");
    // Every tracker and node connection opened with a proof; each passes a receiver that has
    // the key exactly once (a proof reused anywhere would be a replay here).
    let v = LinkConfig {
        send: None,
        accept: [("sp".to_owned(), secret)].into(),
        ..LinkConfig::default()
    }
    .verifier()
    .unwrap();
    let tracker_proofs = t.proofs.lock().unwrap().clone();
    assert_eq!(tracker_proofs.len(), t.lookups());
    assert!(t.lookups() >= 4, "{}", t.lookups());
    let mut all = tracker_proofs;
    all.extend(a1.proofs.lock().unwrap().iter().cloned());
    all.extend(a2.proofs.lock().unwrap().iter().cloned());
    assert_eq!(all.len(), t.lookups() + 4);
    for p in &all {
        assert_eq!(v.verify(p).unwrap(), "sp");
    }
}
