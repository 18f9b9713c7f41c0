//! Multi-node end-to-end tests (issue 8): a real cluster from `Cluster::start_groups` (the code
//! behind `ferry cluster up --nodes N --groups G`): tracker+id server, groups of storage nodes
//! sharing a data dir each, routing server-proxies, client-proxies; driven with the `ferry` CLI.
//!
//! Needs PostgreSQL: `FERRY_PG_URL` names a server where the tests may create databases (each
//! test makes its own and drops it). Unset: each test prints "skipped" and passes, except with
//! CI=true, where it fails.

use crate::support;

use ferry_common::proto::{self, Caller, SaddrsReply, SaddrsReq, cmd};
use ferry_common::token::Scope;
use ferry_supervisor::cluster::{Cluster, GroupsLayout, Logs, Spec};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use support::cli::{self, Run};
use support::procs;
use support::raw::{self, Raw};
use support::{PgDb, make_file, pg_db, sha256_file};

const APP: &str = "demo";

/// One test's cluster, database and scratch space. Field order is drop order: the cluster
/// stops before its database is dropped and its directory removed.
struct Setup {
    cluster: Cluster,
    layout: GroupsLayout,
    logs: PathBuf,
    state: PathBuf,
    dir: tempfile::TempDir,
    _db: PgDb,
}

impl Setup {
    fn start(test: &str, nodes: usize, groups: usize) -> Option<Setup> {
        let db = pg_db(test)?;
        let dir = tempfile::tempdir().unwrap();
        let spec = Spec {
            nodes,
            groups,
            meta_url: Some(db.url.clone()),
            beat_interval_ms: 300,
            offline_after_ms: 1500,
            route_cache_ms: 1000,
            port_base: ferry_supervisor::cluster::PORT_BASE,
            tls: false,
        };
        // Ports from support::free_addr, which never hands the same port to two tests of this
        // process (the three tests start clusters at the same time).
        let layout = GroupsLayout::picked(&spec, support::free_addr);
        let logs = dir.path().join("logs");
        let bins = support::bin("ferry-server").parent().unwrap().to_path_buf();
        let cluster = Cluster::start_groups(
            &bins,
            &spec,
            layout.clone(),
            &dir.path().join("cluster"),
            Logs::Dir(logs.clone()),
        )
        .unwrap_or_else(|e| panic!("{test}: cluster did not start: {e}\n{}", tails(&logs)));
        // Short client timeouts keep the failure cases quick; the outage window is 3 s.
        std::fs::write(
            dir.path().join("client.toml"),
            "timeout_ms = 1000\ntries_per_proxy = 3\noutage_window_ms = 3000\n\
             block_size = \"1MiB\"\n",
        )
        .unwrap();
        Some(Setup {
            cluster,
            layout,
            logs,
            state: dir.path().join("state"),
            dir,
            _db: db,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A `ferry` command as `user` through both client-proxies.
    fn ferry(&self, user: &str, args: &[&str]) -> std::process::Command {
        let conf = self.path("client.toml");
        let mut all = vec![
            "--config",
            conf.to_str().unwrap(),
            "--app",
            APP,
            "--user",
            user,
            "--json",
        ];
        all.extend_from_slice(args);
        // The cluster made its own app key; this client uses it.
        let key = self
            .cluster
            .secrets
            .key_of(APP)
            .expect("the cluster's app key");
        let mut cmd = cli::ferry(&self.state, &self.layout.client_proxies, &all);
        cmd.env("FERRY_KEY", format!("{}:{}", key.id, key.secret));
        cmd
    }

    fn upload(&self, user: &str, file: &Path) -> String {
        let r = cli::run(self.ferry(user, &["upload", file.to_str().unwrap()]));
        assert!(
            r.ok,
            "upload as {user}: {}\n{}",
            r.stderr,
            tails(&self.logs)
        );
        r.json()["file_id"].as_str().unwrap().to_owned()
    }

    /// `ferry url` for `id` at the gateway `gw`, with the cluster's signed-URL secret: the
    /// request target (path and query) it signs.
    fn signed_target(&self, id: &str, gw: SocketAddr) -> String {
        let base = format!("http://{gw}");
        let secret = self.cluster.secrets.http_of(APP).expect("an http secret");
        let mut cmd = self.ferry("ann", &["url", "--base", &base, id]);
        cmd.env("FERRY_SECRET", secret);
        let r = cli::run(cmd);
        assert!(r.ok, "ferry url: {}", r.stderr);
        let url = r.json()["url"].as_str().unwrap().to_owned();
        url.strip_prefix(&base).unwrap().to_owned()
    }

    fn download(&self, user: &str, id: &str, out: &Path) -> Run {
        cli::run(self.ferry(user, &["download", id, "-o", out.to_str().unwrap()]))
    }

    /// The tracker's answer for `user`: group and online nodes, preferred first.
    fn saddrs(&self, user: &str) -> SaddrsReply {
        let body = SaddrsReq {
            app: APP.into(),
            user: user.into(),
            file_id: String::new(),
        }
        .encode()
        .unwrap();
        // The tracker answers SADDRS to a routing proxy's link key only.
        let router = self.cluster.secrets.link_of("sp");
        let mut c = Caller::connect(
            self.layout.trackers[0],
            Duration::from_secs(5),
            router.as_ref(),
        )
        .unwrap();
        let reply = c
            .call(
                cmd::TRACKER_SADDRS,
                &body,
                cmd::REPLY_TRACKER,
                proto::SADDRS_REPLY_MAX,
            )
            .unwrap();
        SaddrsReply::decode(&reply).unwrap()
    }

    /// The member name of the node at `addr`.
    fn node_at(&self, addr: SocketAddr) -> String {
        self.layout
            .nodes()
            .into_iter()
            .find(|(_, _, a)| *a == addr)
            .map(|(_, name, _)| name)
            .unwrap_or_else(|| panic!("no node at {addr}"))
    }

    /// The node the routing proxies prefer for `user` (the tracker's first), and its group.
    fn preferred(&self, user: &str) -> (String, String) {
        let r = self.saddrs(user);
        let first = &r.nodes[0];
        let addr: SocketAddr = format!("{}:{}", first.host, first.port).parse().unwrap();
        (r.group, self.node_at(addr))
    }

    /// Waits until the routing proxies relayed `bytes` more than `before` toward the nodes,
    /// while `up` keeps running (60 s at most).
    fn wait_relayed(&self, up: &mut Child, before: u64, bytes: u64) {
        support::wait_until("the upload to start", Duration::from_secs(60), || {
            if self.bytes_to_nodes() - before >= bytes {
                return true;
            }
            assert!(up.try_wait().unwrap().is_none(), "upload ended too soon");
            false
        });
    }

    /// Bytes relayed toward the nodes by both routing server-proxies.
    fn bytes_to_nodes(&self) -> u64 {
        self.layout
            .server_proxy_stats
            .iter()
            .filter_map(|a| ferry_supervisor::cluster::proxy_stats(*a).ok())
            .map(|s| s.get("bytes_up").copied().unwrap_or(0))
            .sum()
    }
}

/// One HTTP/1.1 exchange (`Connection: close`): status, headers (lower-case names), body.
fn http(
    addr: SocketAddr,
    method: &str,
    target: &str,
    extra: &str,
) -> (u16, std::collections::HashMap<String, String>, Vec<u8>) {
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        c,
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\n{extra}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut all = Vec::new();
    c.read_to_end(&mut all).unwrap();
    let end = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8(all[..end].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_owned()))
        .collect();
    (status, headers, all[end + 4..].to_vec())
}

/// Where a 307 points: the gateway's address and the target, which must be the one asked for.
fn redirected(headers: &std::collections::HashMap<String, String>, target: &str) -> SocketAddr {
    let loc = headers.get("location").expect("a Location");
    let rest = loc.strip_prefix("http://").expect("an http:// Location");
    let (addr, t) = rest.split_at(rest.find('/').unwrap());
    assert_eq!(t, target, "the redirect keeps the signed target");
    addr.parse().unwrap()
}

/// The last lines of every member's log, for failure messages.
fn tails(logs: &Path) -> String {
    let mut out = String::new();
    let Ok(rd) = std::fs::read_dir(logs) else {
        return out;
    };
    for e in rd.flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(15);
        out.push_str(&format!(
            "---- {} ----\n{}\n",
            e.file_name().to_string_lossy(),
            lines[from..].join("\n")
        ));
    }
    out
}

/// Stored files (under `data/`) of a group's shared data dir whose bytes hash to `sha`.
fn stored_copies(group_dir: &Path, sha: &str) -> usize {
    fn walk(d: &Path, sha: &str) -> usize {
        let Ok(rd) = std::fs::read_dir(d) else {
            return 0;
        };
        rd.flatten()
            .map(|e| {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, sha)
                } else {
                    usize::from(sha256_file(&p) == sha)
                }
            })
            .sum()
    }
    walk(&group_dir.join("data"), sha)
}

#[test]
fn users_spread_over_groups_uploads_land_in_their_group_and_download_through_a_peer() {
    let Some(mut s) = Setup::start("spread", 2, 2) else {
        return;
    };
    let mut seen = std::collections::BTreeSet::new();
    let mut files = Vec::new();
    for (i, user) in ["ann", "ben", "cat", "dan", "eve", "fay"]
        .iter()
        .enumerate()
    {
        let src = s.path(&format!("{user}.bin"));
        make_file(&src, 200_000 + i as u64 * 1000, 40 + i as u64);
        let sha = sha256_file(&src);
        let id = s.upload(user, &src);
        let group = s.saddrs(user).group;
        // The bytes are in the user's group's data dir, and only there.
        for (g, _) in &s.layout.groups {
            let copies = stored_copies(&s.cluster.group_data(g), &sha);
            let want = usize::from(*g == group);
            assert_eq!(
                copies, want,
                "{user} (group {group}): {copies} copies in {g}"
            );
        }
        seen.insert(group.clone());
        files.push((user.to_string(), id, sha, group));
    }
    assert_eq!(seen.len(), 2, "users all went to {seen:?}");
    // The same video sent by users of both groups: instant upload cannot link content that
    // lives in another group's data dir, so the second group stores its own copy (no error 16
    // forever); a repeat in that group is then instant.
    let (a, b) = (&files[0], files.iter().find(|f| f.3 != files[0].3).unwrap());
    let video = s.path("shared.mp4");
    make_file(&video, (3 << 20) + 5, 77);
    let vsha = sha256_file(&video);
    let send = |user: &str| {
        let r = cli::run(s.ferry(user, &["upload", video.to_str().unwrap()]));
        assert!(r.ok, "upload as {user}: {}\n{}", r.stderr, tails(&s.logs));
        r.report()["instant"].as_bool().unwrap()
    };
    assert!(!send(&a.0));
    assert!(!send(&b.0), "{} linked content of another group", b.0);
    assert!(send(&b.0), "a repeat in {}'s own group is instant", b.0);
    // a's group: its upload; b's group: its own copy and the instant upload's hard link to it.
    for (g, want) in [(&a.3, 1), (&b.3, 2)] {
        assert_eq!(stored_copies(&s.cluster.group_data(g), &vsha), want, "{g}");
    }
    // Every file downloads through its group's other node once the preferred one is gone.
    let mut killed = std::collections::BTreeMap::new();
    for (user, _, _, group) in &files {
        let (g, preferred) = s.preferred(user);
        assert_eq!(&g, group);
        killed.entry(g).or_insert(preferred);
    }
    for name in killed.values() {
        s.cluster.kill(name).unwrap();
    }
    for (user, id, sha, _) in &files {
        let out = s.path(&format!("{user}.out"));
        let r = s.download(user, id, &out);
        assert!(r.ok, "download as {user} after its node died: {}", r.stderr);
        assert_eq!(&sha256_file(&out), sha, "{user}");
    }
}

/// Seed 002's purpose: user A sends user B a photo or a video, B downloads it wherever it is
/// stored. Four users in two groups; every user STATs and downloads every other user's file
/// through the client-proxies and the routing proxies; an id issued before ids named their
/// group still routes (by its record); a user of the other group deletes a file; an id naming
/// a group the cluster does not have is "not found" at once, not an outage to ride out.
#[test]
fn every_user_reads_every_other_users_file_in_any_group() {
    let Some(mut s) = Setup::start("cross-group", 1, 2) else {
        return;
    };
    let mut files = Vec::new();
    for (i, user) in ["ann", "ben", "cat", "dan"].iter().enumerate() {
        let src = s.path(&format!("{user}.bin"));
        // Two small files (one shot) and two of three blocks.
        let size = if i % 2 == 0 { 100_000 } else { (2 << 20) + 7 };
        make_file(&src, size + i as u64, 60 + i as u64);
        let id = s.upload(user, &src);
        let group = s.saddrs(user).group;
        assert!(
            id.starts_with(&format!("{group}.")),
            "{user}: {id} in {group}"
        );
        files.push((
            user.to_string(),
            id,
            sha256_file(&src),
            group,
            size + i as u64,
        ));
    }
    let groups: std::collections::BTreeSet<_> = files.iter().map(|f| f.3.clone()).collect();
    assert_eq!(groups.len(), 2, "users all went to {groups:?}");
    for (reader, ..) in &files {
        for (owner, id, sha, group, size) in &files {
            let r = cli::run(s.ferry(reader, &["stat", id]));
            assert!(r.ok, "{reader} stat {owner}'s {id}: {}", r.stderr);
            assert_eq!(r.json()["file"]["size"].as_u64(), Some(*size));
            let out = s.path(&format!("{reader}-{owner}.out"));
            let r = s.download(reader, id, &out);
            assert!(
                r.ok,
                "{reader} download {owner}'s file in {group}: {}\n{}",
                r.stderr,
                tails(&s.logs)
            );
            assert_eq!(&sha256_file(&out), sha, "{reader} <- {owner}");
        }
    }
    // HTTP: a signed URL for any file works at every gateway. The file's own group serves it
    // (whole, a range, HEAD); another group's gateway redirects (307) there, target unchanged.
    let gateway_of = |g: &str| {
        let i = s.layout.groups.iter().position(|(n, _)| n == g).unwrap();
        s.layout.http[i][0]
    };
    for (owner, id, _, group, _) in &files {
        let src = std::fs::read(s.path(&format!("{owner}.bin"))).unwrap();
        let home = gateway_of(group);
        for (other, _) in &s.layout.groups {
            let gw = gateway_of(other);
            let target = s.signed_target(id, gw);
            for (method, extra) in [("GET", ""), ("HEAD", ""), ("GET", "Range: bytes=10-19\r\n")] {
                let (status, h, body) = http(gw, method, &target, extra);
                let at = if other == group {
                    (status, h, body)
                } else {
                    assert_eq!(
                        status,
                        307,
                        "{method} {owner}'s {id} at {other}'s gateway: {}",
                        String::from_utf8_lossy(&body)
                    );
                    assert_eq!(redirected(&h, &target), home);
                    http(home, method, &target, extra)
                };
                let what = format!("{method} {extra:?} {owner}'s {id} via {other}");
                let (status, len, want) = match (method, extra) {
                    ("GET", "") => (200, src.len(), &src[..]),
                    ("HEAD", _) => (200, src.len(), &[][..]),
                    _ => (206, 10, &src[10..20]),
                };
                assert_eq!(at.0, status, "{what}: {}", String::from_utf8_lossy(&at.2));
                assert_eq!(at.1["content-length"], len.to_string(), "{what}");
                assert!(at.2 == want, "{what}: other bytes");
            }
        }
    }
    // A group the cluster does not have: 404 at once.
    let bogus = "g9.000000000000002a-abcdefghijklmnop";
    let gw = s.layout.http[0][0];
    let (status, ..) = http(gw, "GET", &s.signed_target(bogus, gw), "");
    assert_eq!(status, 404);
    // An id from before ids named their group: the tracker finds the group in its record.
    let (owner, id, sha, group, _) = &files[0];
    let old = id.split_once('.').unwrap().1;
    let mut db = postgres::Client::connect(&s._db.url, postgres::NoTls).unwrap();
    let n = db
        .execute("UPDATE files SET id = $1 WHERE id = $2", &[&old, id])
        .unwrap();
    assert_eq!(n, 1);
    let reader = &files.iter().find(|f| &f.3 != group).unwrap().0;
    let out = s.path("old-id.out");
    let r = s.download(reader, old, &out);
    assert!(
        r.ok,
        "{reader} download {owner}'s old id {old}: {}",
        r.stderr
    );
    assert_eq!(&sha256_file(&out), sha);
    // Over HTTP, the other group's gateway finds the old id's group in its record too.
    let gw = gateway_of(&files.iter().find(|f| &f.3 != group).unwrap().3);
    let target = s.signed_target(old, gw);
    let (status, h, _) = http(gw, "GET", &target, "");
    assert_eq!(status, 307, "old id {old} at the other group's gateway");
    let (status, _, body) = http(redirected(&h, &target), "GET", &target, "");
    assert_eq!(status, 200);
    assert_eq!(
        body,
        std::fs::read(s.path(&format!("{owner}.bin"))).unwrap()
    );
    // A user of the other group may read dan's file but not delete it: error 25, nothing
    // changes. With the admin scope (an app's moderation) the delete goes through, and its
    // bytes leave dan's group.
    let (_, id, sha, group, _) = &files[3];
    let deleter = &files.iter().find(|f| &f.3 != group).unwrap().0;
    let r = cli::run(s.ferry(deleter, &["delete", id]));
    assert!(
        !r.ok && r.stderr.contains("error 25 Forbidden") && r.stderr.contains("owner"),
        "{deleter} delete dan's {id}: {}",
        r.stderr
    );
    assert_eq!(stored_copies(&s.cluster.group_data(group), sha), 1);
    assert!(cli::run(s.ferry("dan", &["stat", id])).ok);
    let r = cli::run(s.ferry(deleter, &["delete", "--admin", id]));
    assert!(r.ok, "{deleter} delete --admin {id}: {}", r.stderr);
    assert_eq!(stored_copies(&s.cluster.group_data(group), sha), 0);
    // An owner deletes their own file without any admin scope.
    let (_, id, sha, group, _) = &files[1];
    let r = cli::run(s.ferry("ben", &["delete", id]));
    assert!(r.ok, "ben delete {id}: {}", r.stderr);
    assert_eq!(stored_copies(&s.cluster.group_data(group), sha), 0);
    let r = cli::run(s.ferry("dan", &["stat", id]));
    assert!(!r.ok && r.stderr.contains("NotFound"), "{}", r.stderr);
    // A group the cluster does not have: not found, well inside the 3 s outage window.
    let t = Instant::now();
    let r = cli::run(s.ferry("ann", &["stat", "g9.000000000000002a-abcdefghijklmnop"]));
    assert!(!r.ok && r.stderr.contains("g9"), "{}", r.stderr);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // The only node of ann's file's group dies: once the trackers see it offline, the other
    // group's gateway says 503 with Retry-After (a redirect would go nowhere).
    let (_, id, _, group, _) = &files[0];
    let gw = gateway_of(&files.iter().find(|f| &f.3 != group).unwrap().3);
    let target = s.signed_target(id, gw);
    s.cluster
        .kill(&ferry_supervisor::cluster::node_name(group, 1))
        .unwrap();
    let t = Instant::now();
    loop {
        let (status, h, _) = http(gw, "GET", &target, "");
        if status == 503 {
            assert_eq!(h["retry-after"], "2");
            break;
        }
        assert_eq!(status, 307);
        assert!(t.elapsed() < Duration::from_secs(10), "still redirected");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A user's session through the whole linked chain (client-proxy, routing server-proxy, node)
/// cannot reach the control plane: after a valid HELLO, with each scope, JOIN, BEAT, SADDRS,
/// GROUPS and USERS are error 6 and close the session, and the tracker's view is unchanged.
#[test]
fn a_users_session_through_the_proxies_cannot_reach_the_control_plane() {
    let Some(s) = Setup::start("planes", 1, 1) else {
        return;
    };
    let admin = s
        .cluster
        .secrets
        .link_of(ferry_supervisor::cluster::ADMIN_LINK_ID);
    let view = || {
        let mut c =
            Caller::connect(s.layout.trackers[0], Duration::from_secs(5), admin.as_ref()).unwrap();
        let b = c
            .call(
                cmd::TRACKER_GROUPS,
                &[],
                cmd::REPLY_TRACKER,
                proto::GROUPS_REPLY_MAX,
            )
            .unwrap();
        let v = proto::GroupsReply::decode(&b).unwrap();
        let nodes: Vec<(String, String, u16)> = v
            .groups
            .iter()
            .flat_map(|g| {
                g.nodes
                    .iter()
                    .map(|n| (g.name.clone(), n.addr.host.clone(), n.addr.port))
            })
            .collect();
        nodes
    };
    let before = view();
    let attempts = support::control_plane_attempts(APP);
    let key = s
        .cluster
        .secrets
        .key_of(APP)
        .expect("the cluster's app key");
    for scope in [Scope::READ, Scope::WRITE, Scope::DELETE] {
        for frame in &attempts {
            let what = format!("{} with scope {scope:?}", cmd::name(frame[8]));
            let mut c = Raw::connect(s.layout.client_proxies[0]);
            c.set_timeout(Duration::from_secs(10));
            let token = key.mint(APP, "mallory", scope, 300).unwrap();
            let hello = proto::Hello::new(APP, "mallory", &token).encode().unwrap();
            c.send(cmd::HELLO, &hello);
            assert_eq!(reply(&mut c), Some(Ok(())), "HELLO for {what}");
            c.send_raw(frame);
            assert_eq!(reply(&mut c), Some(Err(proto::ErrorCode::Auth)), "{what}");
            assert_eq!(reply(&mut c), None, "{what}: the session was not closed");
        }
    }
    assert_eq!(view(), before, "the tracker's view changed");
    // Members' own keys, written by `cluster up`: the node's key is bound to its group and
    // address, so it cannot register another; the routing proxies' key cannot JOIN at all.
    let (group, name, addr) = s.layout.nodes()[0].clone();
    let node_key = s.cluster.secrets.link_of(&format!("node-{name}")).unwrap();
    let router_key = s.cluster.secrets.link_of("sp").unwrap();
    let join = |group: &str, port: u16| {
        let n = proto::NodeHello {
            group: group.into(),
            host: addr.ip().to_string(),
            port,
            version: proto::VERSION,
            started: 1,
            free: 1 << 40,
            http: None,
        };
        proto::frame(cmd::TRACKER_JOIN, 0, &n.encode_join().unwrap())
    };
    let elsewhere = if addr.port() == 1 { 2 } else { addr.port() - 1 };
    for (key, frame, what) in [
        (
            &node_key,
            join(&group, elsewhere),
            "the node's key, another address",
        ),
        (
            &node_key,
            join("g-other", addr.port()),
            "the node's key, another group",
        ),
        (&router_key, join(&group, addr.port()), "the router's key"),
    ] {
        let mut c = Raw::connect(s.layout.trackers[0]);
        c.set_timeout(Duration::from_secs(10));
        c.send_raw(&key.link_frame());
        c.send_raw(&frame);
        assert_eq!(
            reply(&mut c),
            Some(Err(proto::ErrorCode::Auth)),
            "JOIN with {what}"
        );
        assert_eq!(reply(&mut c), None, "{what}: the connection was not closed");
    }
    assert_eq!(
        view(),
        before,
        "a member's refused JOIN changed the tracker's view"
    );
}

/// `cluster up` runs two trackers on one database: with the first killed, a new user is
/// routed, uploads and downloads through the second, and the nodes' beats reach it (they stay
/// online well past the offline window).
#[test]
fn either_tracker_alone_serves_the_cluster() {
    let Some(mut s) = Setup::start("trackers", 1, 2) else {
        return;
    };
    s.cluster.kill(ferry_supervisor::cluster::TRACKER).unwrap();
    let src = s.path("after.bin");
    make_file(&src, (2 << 20) + 3, 12);
    let id = s.upload("newcomer", &src);
    let out = s.path("after.out");
    let r = s.download("newcomer", &id, &out);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(sha256_file(&out), sha256_file(&src));
    // Twice the offline window (1.5 s) later, the second tracker still sees every node online.
    std::thread::sleep(Duration::from_secs(3));
    let admin = s
        .cluster
        .secrets
        .link_of(ferry_supervisor::cluster::ADMIN_LINK_ID);
    let v = ferry_supervisor::cluster::tracker_groups(s.layout.trackers[1], admin.as_ref())
        .expect("the second tracker answers");
    let nodes: Vec<bool> = v
        .groups
        .iter()
        .flat_map(|g| g.nodes.iter().map(|n| n.online))
        .collect();
    assert_eq!(nodes, vec![true, true], "{v:?}");
}

/// The next answer on a raw connection: Ok, an error code, or None once it is closed.
fn reply(c: &mut Raw) -> Option<Result<(), proto::ErrorCode>> {
    match c.recv() {
        raw::Reply::Ok(..) => Some(Ok(())),
        raw::Reply::Err(code, _) => Some(Err(code)),
        raw::Reply::Waiting | raw::Reply::Closed => None,
    }
}

/// A storage node of one group killed and restarted (its start-up recovery runs on the shared
/// database) leaves the other group's unfinished upload alone: the user's rerun resumes it,
/// sending only the blocks that were missing, and the file is whole.
#[test]
fn a_restart_in_one_group_leaves_another_groups_upload_alone() {
    let Some(mut s) = Setup::start("group-restart", 1, 2) else {
        return;
    };
    let user = "lena";
    let (group, _) = s.preferred(user);
    let other = s
        .layout
        .nodes()
        .into_iter()
        .find(|(g, _, _)| *g != group)
        .expect("a node of the other group")
        .1;
    let size: u64 = 48 << 20;
    let src = s.path("video.mp4");
    make_file(&src, size, 9);
    let before = s.bytes_to_nodes();
    let path = src.to_str().unwrap();
    let mut up: Child = s
        .ferry(user, &["upload", "--threads", "1", path])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // A quarter through, the client dies: an unfinished session stays in the user's group.
    s.wait_relayed(&mut up, before, size / 4);
    up.kill().unwrap();
    up.wait().unwrap();
    s.cluster.restart(&other).unwrap();
    let r = cli::run(s.ferry(user, &["upload", path]));
    assert!(r.ok, "rerun: {}\n{}", r.stderr, tails(&s.logs));
    let rep = r.report();
    eprintln!("rerun after a restart in group {group}'s neighbour: {rep}");
    assert!(
        rep["blocks_skipped"].as_u64().unwrap() >= 4,
        "the upload started over: {rep}\n{}",
        tails(&s.logs)
    );
    let out = s.path("video.out");
    let id = r.json()["file_id"].as_str().unwrap().to_owned();
    let down = s.download(user, &id, &out);
    assert!(down.ok, "{}", down.stderr);
    assert_eq!(sha256_file(&out), sha256_file(&src));
    let log = std::fs::read_to_string(s.logs.join(format!("{other}.log"))).unwrap();
    assert!(
        !log.contains("removing upload session"),
        "{other} removed another group's session: {log}"
    );
}

#[test]
fn kill_9_of_the_node_serving_an_upload_finishes_through_its_peer() {
    let Some(mut s) = Setup::start("kill9", 2, 2) else {
        return;
    };
    let user = "kim";
    let (group, serving) = s.preferred(user);
    let size = support::env_u64("FERRY_CLUSTER_KILL_BYTES", 96 << 20);
    let src = s.path("big.bin");
    make_file(&src, size, 7);
    let sha = sha256_file(&src);
    let before = s.bytes_to_nodes();
    let mut up: Child = s
        .ferry(user, &["upload", "--threads", "2", src.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the serving node once a sixth of the file has gone through.
    s.wait_relayed(&mut up, before, size / 6);
    s.cluster.kill(&serving).unwrap();
    let t = Instant::now();
    while up.try_wait().unwrap().is_none() {
        if t.elapsed() > Duration::from_secs(120) {
            let _ = up.kill();
            panic!("upload did not finish after the kill\n{}", tails(&s.logs));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = up.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "upload failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        tails(&s.logs)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let id = v["file_id"].as_str().unwrap();
    // The kill cut requests in flight: they were retried (through the peer, the only node of
    // the group left).
    let report = &v["report"];
    let redone = report["retries"].as_u64().unwrap() + report["blocks_resent"].as_u64().unwrap();
    assert!(redone > 0, "the kill interrupted nothing: {report}");
    assert_eq!(stored_copies(&s.cluster.group_data(&group), &sha), 1);
    let back = s.path("big.out");
    let r = s.download(user, id, &back);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(sha256_file(&back), sha, "downloaded bytes differ");
}

#[test]
fn a_group_with_no_online_node_is_a_clear_error_in_bounded_time() {
    // One node per group suffices here (no shared data dir needed).
    let Some(mut s) = Setup::start("no_node", 1, 2) else {
        return;
    };
    let (down_group, node) = s.preferred("zed");
    // A user routed to the other group.
    let other_user = (0..20)
        .map(|i| format!("u{i}"))
        .find(|u| s.saddrs(u).group != down_group)
        .expect("no user went to the other group");
    s.cluster.kill(&node).unwrap();
    let t = Instant::now();
    let r = cli::run(s.ferry("zed", &["stat", "1"]));
    let took = t.elapsed();
    assert!(!r.ok);
    assert!(took < Duration::from_secs(20), "took {took:?}");
    let v = r.error();
    let text = v["error"].as_str().unwrap();
    // Until the tracker marks the node offline the proxy reaches no node (19); after that the
    // tracker says the group has no online node (23). The client's window covers the switch.
    assert_eq!(v["code"], 23, "{v}");
    assert!(text.contains(&format!("group {down_group}")), "{text}");
    // The other group is unaffected.
    let src = s.path("ok.bin");
    make_file(&src, 10_000, 3);
    let id = s.upload(&other_user, &src);
    let out = s.path("ok.out");
    assert!(s.download(&other_user, &id, &out).ok);
    assert_eq!(sha256_file(&out), sha256_file(&src));
}

#[test]
fn cluster_up_without_a_shared_database_is_refused_with_the_way_out() {
    // Through the real CLI: several nodes need PostgreSQL, and saying so must not start anything.
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("conf");
    std::fs::create_dir_all(&conf).unwrap();
    let data = dir.path().join("data");
    let mut cmd = support::cli::ferry(
        &dir.path().join("state"),
        &[],
        &[
            "cluster",
            "up",
            "--nodes",
            "2",
            "--groups",
            "2",
            "--conf",
            conf.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ],
    );
    cmd.env_remove("FERRY_META_URL");
    let t = std::time::Instant::now();
    let r = support::cli::run(cmd);
    assert!(!r.ok, "started without a database: {}", r.stdout);
    assert!(
        r.stderr.contains("PostgreSQL") && r.stderr.contains("--meta-url"),
        "{}",
        r.stderr
    );
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(support::count_files(&data), 0, "nothing was started");
}

/// A `--port-base` whose whole block of ports (as `GroupsLayout::fixed` lays them out for
/// `nodes` nodes) is free now and was never handed out before in this process (two tests
/// running at once must not get the same block), below the ports `support::free_port` and
/// the kernel hand out, so no other test can be given one of them.
fn free_port_base(nodes: usize) -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let offsets: Vec<u16> = [0, 1, 111, 112, 121, 122, 211, 212]
        .into_iter()
        // The nodes, then their HTTP gateways.
        .chain((0..2 * nodes as u16).map(|n| 301 + n))
        .collect();
    // Below support::free_port's ports, which start at 20000.
    let start = 10_000 + (std::process::id() % 90) as u16 * 100;
    for base in (start..19_000)
        .step_by(1000)
        .chain((10_000..start).step_by(1000))
    {
        let mut given = GIVEN.lock().unwrap();
        if given.contains(&base) {
            continue;
        }
        let held: Vec<_> = offsets
            .iter()
            .map_while(|o| std::net::TcpListener::bind(("127.0.0.1", base + o)).ok())
            .collect();
        if held.len() == offsets.len() {
            given.push(base);
            return base;
        }
    }
    panic!("no free block of ports for cluster up");
}

#[test]
fn cluster_up_through_the_binary_serves_a_user_and_stops_on_ctrl_c() {
    let Some(db) = pg_db("cluster_up_cli") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (conf, data) = (dir.path().join("conf"), dir.path().join("data"));
    std::fs::create_dir_all(&conf).unwrap();
    let base = free_port_base(2);
    let mut run = support::Group::spawn(
        support::cli::ferry(
            &dir.path().join("state"),
            &[],
            &[
                "cluster",
                "up",
                "--nodes",
                "2",
                "--meta-url",
                &db.url,
                "--port-base",
                &base.to_string(),
                "--conf",
                conf.to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
            ],
        )
        .env_remove("FERRY_KEY")
        .stderr(Stdio::piped()),
    );
    let mut err = std::io::BufReader::new(run.0.stderr.take().unwrap());
    support::wait_for_line(&mut err, "Ctrl-C stops all");
    // Keep draining its log so it never blocks on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));

    // The client config it wrote is all a user needs: client-proxies, app key, admin link key.
    let client_conf = data.join("conf").join("client.toml");
    let tracker = format!("127.0.0.1:{base}");
    let ferry = |args: &[&str]| {
        let mut all = vec!["--config", client_conf.to_str().unwrap(), "--json"];
        all.extend_from_slice(args);
        let mut cmd = cli::ferry(&dir.path().join("state"), &[], &all);
        cmd.env_remove("FERRY_KEY");
        cli::run(cmd)
    };
    let src = dir.path().join("src");
    make_file(&src, 3 << 20, 8);
    let up = ferry(&["--user", "alice", "upload", src.to_str().unwrap()]);
    assert!(up.ok, "upload: {}", up.stderr);
    let id = up.json()["file_id"].as_str().unwrap().to_owned();
    let out = dir.path().join("out");
    let down = ferry(&[
        "--user",
        "alice",
        "download",
        &id,
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(down.ok, "download: {}", down.stderr);
    assert_eq!(sha256_file(&out), sha256_file(&src));
    // The config also holds the signed-URL secret; both nodes' gateways (ports after the
    // nodes') serve the file.
    for gw in [base + 303, base + 304] {
        let gw = SocketAddr::from(([127, 0, 0, 1], gw));
        let base_url = format!("http://{gw}");
        let u = ferry(&["url", "--base", &base_url, &id]);
        assert!(u.ok, "url: {}", u.stderr);
        let target = u.json()["url"].as_str().unwrap()[base_url.len()..].to_owned();
        let (status, _, body) = http(gw, "GET", &target, "");
        assert_eq!(status, 200, "{gw}: {}", String::from_utf8_lossy(&body));
        assert!(body == std::fs::read(&src).unwrap(), "{gw}: other bytes");
    }
    let g = ferry(&["groups", "--tracker", &tracker]);
    assert!(g.ok, "groups: {}", g.stderr);
    let v = g.json();
    let nodes = v["groups"][0]["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2, "{v}");
    assert!(nodes.iter().all(|n| n["online"] == true), "{v}");
    assert_eq!(v["groups"][0]["users"], 1, "{v}");
    // The client-proxies it wrote cap connections per client address: the one past the cap
    // is refused while the others are held.
    let cp: toml::Table = std::fs::read_to_string(data.join("conf").join("client-proxy-a.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let cap = cp
        .get("max_connections_per_ip")
        .and_then(|v| v.as_integer())
        .unwrap_or(0) as usize;
    assert!(
        (1..=1024).contains(&cap),
        "client-proxy cap per address: {cap}"
    );
    let cp_addr: std::net::SocketAddr = cp["listen"].as_str().unwrap().parse().unwrap();
    let held: Vec<std::net::TcpStream> = (0..cap)
        .map(|_| std::net::TcpStream::connect(cp_addr).unwrap())
        .collect();
    let mut over = std::net::TcpStream::connect(cp_addr).unwrap();
    over.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 512];
    let n = std::io::Read::read(&mut over, &mut b).unwrap_or(0);
    if n > 0 {
        // An error frame (17, over a limit), then the close.
        let h = proto::Header::decode(b[..proto::HEADER_LEN].try_into().unwrap());
        assert_ne!(
            h.status,
            proto::status::OK,
            "connection {} was served",
            cap + 1
        );
        while std::io::Read::read(&mut over, &mut b).unwrap_or(0) > 0 {}
    }
    drop(held);
    // Without the link key the tracker says no.
    let mut bare = cli::ferry(
        &dir.path().join("state"),
        &[],
        &["groups", "--tracker", &tracker],
    );
    bare.env_remove("FERRY_LINK_KEY");
    let r = cli::run(bare);
    assert!(!r.ok && r.stderr.contains("error 6"), "{}", r.stderr);

    let status = support::interrupt(&mut run.0);
    assert_eq!(status.code(), Some(130));
    support::wait_until(
        "the tracker to stop after Ctrl-C",
        Duration::from_secs(10),
        || support::probe(tracker.parse().unwrap(), Duration::from_millis(300)).is_none(),
    );
}

/// Members never outlive their supervisor: after `kill -9` of `ferry cluster up` (one node;
/// and two nodes on PostgreSQL when there is one) every member it started exits.
#[test]
fn cluster_up_members_die_with_a_killed_supervisor() {
    let db = pg_db("cluster_up_pdeath");
    for nodes in [1usize, 2] {
        let mut args = vec![
            "cluster".to_owned(),
            "up".into(),
            "--nodes".into(),
            nodes.to_string(),
        ];
        if nodes > 1 {
            let Some(db) = &db else { continue };
            args.extend(["--meta-url".into(), db.url.clone()]);
        }
        let dir = tempfile::tempdir().unwrap();
        let (conf, data) = (dir.path().join("conf"), dir.path().join("data"));
        std::fs::create_dir_all(&conf).unwrap();
        args.extend([
            "--port-base".into(),
            free_port_base(nodes).to_string(),
            "--conf".into(),
            conf.to_str().unwrap().into(),
            "--data".into(),
            data.to_str().unwrap().into(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut run = support::Group::spawn(
            support::cli::ferry(&dir.path().join("state"), &[], &args)
                .env_remove("FERRY_KEY")
                .stderr(Stdio::piped()),
        );
        let mut err = std::io::BufReader::new(run.0.stderr.take().unwrap());
        support::wait_for_line(&mut err, "Ctrl-C stops all");
        std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
        let members = procs::Reap(procs::children_of(run.0.id()));
        assert!(
            members.0.len() >= 5,
            "{nodes} node(s): members {:?}",
            members.0
        );
        let took = procs::kill9_outlived_by_none(&mut run.0, &members);
        eprintln!(
            "{nodes} node(s): {} members gone {took:?} after their supervisor's kill -9",
            members.0.len()
        );
    }
}
