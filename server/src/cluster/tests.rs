//! The same [`ClusterStore`] tests against the embedded backend and PostgreSQL
//! (`FERRY_PG_URL`; unset: the PostgreSQL half prints "skipped" and passes, except in CI where
//! it fails), and the tracker's rules over a store that can be switched off.

use super::pg::PgCluster;
use super::store::{ClusterStore, Joined, NodeRow, SqliteCluster};
use super::tracker::Tracker;
use crate::config::TrackerConfig;
use crate::meta::{FILE_COMMITTING, FileRec, MetaStore, SqliteStore, now_ms};
use anyhow::{Result, bail};
use ferry_common::proto::{ErrorCode, NODES_MAX, NodeAddr, NodeHello, SaddrsReq};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Runs `f` against a fresh embedded store and, when available, a fresh PostgreSQL database;
/// `open` makes a second handle on the same database (a second tracker).
fn both(test: &str, f: impl Fn(&dyn Fn() -> Arc<dyn ClusterStore>)) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.db");
    f(&|| Arc::new(SqliteCluster::open(&path).unwrap()) as Arc<dyn ClusterStore>);
    if let Some(db) = crate::meta::pg::testdb::create(test) {
        f(&|| Arc::new(PgCluster::open_config(db.cfg.clone())) as Arc<dyn ClusterStore>);
    }
}

fn row(group: &str, port: u16, free: u64) -> NodeRow {
    NodeRow {
        group: group.into(),
        addr: NodeAddr {
            host: "127.0.0.1".into(),
            port,
        },
        version: 1,
        started: 42,
        free,
        last_beat_ms: now_ms(),
        http: None,
    }
}

#[test]
fn groups_joins_and_beats() {
    both("groups_joins_and_beats", |open| {
        let s = open();
        assert!(s.create_group("g1").unwrap());
        assert!(s.create_group("g1").unwrap(), "idempotent");
        assert_eq!(s.groups().unwrap(), vec!["g1".to_string()]);
        assert_eq!(
            s.join(&row("g9", 1, 0), false).unwrap(),
            Joined::UnknownGroup
        );
        assert_eq!(s.join(&row("g9", 1, 0), true).unwrap(), Joined::Ok);
        assert_eq!(
            s.groups().unwrap(),
            vec!["g1".to_string(), "g9".to_string()]
        );
        let a = row("g1", 7401, 5);
        assert!(!s.beat("g1", &a.addr, 1, 1, 1).unwrap(), "never joined");
        assert_eq!(s.join(&a, false).unwrap(), Joined::Ok);
        assert!(s.beat("g1", &a.addr, 43, 77, 123).unwrap());
        assert!(!s.beat("g2", &a.addr, 43, 77, 123).unwrap(), "wrong group");
        let nodes = s.nodes().unwrap();
        let n = nodes.iter().find(|n| n.addr == a.addr).unwrap();
        assert_eq!(
            (n.group.as_str(), n.started, n.free, n.last_beat_ms),
            ("g1", 43, 77, 123)
        );
        // A second handle (another tracker) sees the same rows.
        assert_eq!(open().nodes().unwrap(), nodes);
        // Values past i64 saturate instead of wrapping negative.
        assert!(s.beat("g1", &a.addr, u64::MAX, u64::MAX, 5).unwrap());
        let n = s
            .nodes()
            .unwrap()
            .into_iter()
            .find(|n| n.addr == a.addr)
            .unwrap();
        assert_eq!(n.free, i64::MAX as u64);
        // Joining another group moves the node.
        assert_eq!(s.join(&row("g9", 7401, 5), false).unwrap(), Joined::Ok);
        assert!(!s.beat("g1", &a.addr, 1, 1, 1).unwrap());
    });
}

#[test]
fn a_join_records_or_forgets_the_nodes_gateway() {
    both("a_join_records_or_forgets_the_nodes_gateway", |open| {
        let s = open();
        s.create_group("g1").unwrap();
        let gw = NodeAddr {
            host: "media.example".into(),
            port: 8080,
        };
        let with = NodeRow {
            http: Some(gw.clone()),
            ..row("g1", 7401, 5)
        };
        let gateway = |s: &dyn ClusterStore| {
            let nodes = s.nodes().unwrap();
            assert_eq!(nodes.len(), 2);
            nodes.into_iter().map(|n| n.http).collect::<Vec<_>>()
        };
        assert_eq!(s.join(&with, false).unwrap(), Joined::Ok);
        assert_eq!(s.join(&row("g1", 7402, 5), false).unwrap(), Joined::Ok);
        assert_eq!(gateway(&*s), vec![Some(gw.clone()), None]);
        // Beats keep it; another tracker reads it.
        assert!(s.beat("g1", &with.addr, 1, 1, 1).unwrap());
        assert_eq!(gateway(&*open()), vec![Some(gw.clone()), None]);
        // A restart without a gateway forgets it.
        assert_eq!(s.join(&row("g1", 7401, 5), false).unwrap(), Joined::Ok);
        assert_eq!(gateway(&*s), vec![None, None]);
    });
}

#[test]
fn a_group_holds_at_most_32_nodes() {
    both("a_group_holds_at_most_32_nodes", |open| {
        let s = open();
        s.create_group("g").unwrap();
        for p in 1..=NODES_MAX as u16 {
            assert_eq!(s.join(&row("g", p, 0), false).unwrap(), Joined::Ok);
        }
        assert_eq!(s.join(&row("g", 999, 0), false).unwrap(), Joined::Full);
        assert_eq!(
            s.join(&row("g", 1, 0), false).unwrap(),
            Joined::Ok,
            "rejoin"
        );
    });
}

#[test]
fn routes_are_assigned_once() {
    both("routes_are_assigned_once", |open| {
        let s = open();
        assert_eq!(s.route("demo", "alice").unwrap(), None);
        assert_eq!(s.assign("demo", "alice", "g1").unwrap(), "g1");
        assert_eq!(
            s.assign("demo", "alice", "g2").unwrap(),
            "g1",
            "first one wins"
        );
        assert_eq!(s.route("demo", "alice").unwrap().as_deref(), Some("g1"));
        assert_eq!(s.route("other", "alice").unwrap(), None, "per app");
        s.assign("demo", "bob", "g2").unwrap();
        s.assign("demo", "carol", "g2").unwrap();
        let mut u = s.users_per_group().unwrap();
        u.sort();
        assert_eq!(u, vec![("g1".into(), 1), ("g2".into(), 2)]);
    });
}

#[test]
fn a_groups_users_page_in_order() {
    both("a_groups_users_page_in_order", |open| {
        let s = open();
        for (app, user, g) in [
            ("demo", "dan", "g1"),
            ("demo", "ann", "g1"),
            ("chat", "zoe", "g1"),
            ("demo", "bob", "g2"),
            ("demo", "cat", "g1"),
        ] {
            s.assign(app, user, g).unwrap();
        }
        let page = |after: (&str, &str), n| s.users_of("g1", after, n).unwrap();
        let names = |v: Vec<(String, String)>| -> Vec<String> {
            v.into_iter().map(|(a, u)| format!("{a}/{u}")).collect()
        };
        assert_eq!(names(page(("", ""), 2)), ["chat/zoe", "demo/ann"]);
        assert_eq!(names(page(("demo", "ann"), 2)), ["demo/cat", "demo/dan"]);
        assert!(page(("demo", "dan"), 2).is_empty());
        assert_eq!(names(s.users_of("g2", ("", ""), 10).unwrap()), ["demo/bob"]);
        assert!(s.users_of("g9", ("", ""), 10).unwrap().is_empty());
    });
}

#[test]
fn concurrent_assignments_agree() {
    both("concurrent_assignments_agree", |open| {
        // Eight "trackers" (own handles, so own connections) race for the same 20 users.
        let handles: Vec<Arc<dyn ClusterStore>> = (0..8).map(|_| open()).collect();
        let results: Vec<Vec<String>> = std::thread::scope(|sc| {
            let js: Vec<_> = handles
                .iter()
                .enumerate()
                .map(|(i, h)| {
                    sc.spawn(move || {
                        (0..20)
                            .map(|u| h.assign("app", &format!("u{u}"), &format!("g{i}")).unwrap())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            js.into_iter().map(|j| j.join().unwrap()).collect()
        });
        for u in 0..20 {
            let first = &results[0][u];
            assert!(
                results.iter().all(|r| &r[u] == first),
                "user {u}: {results:?}"
            );
            assert_eq!(
                handles[0].route("app", &format!("u{u}")).unwrap().as_ref(),
                Some(first)
            );
        }
    });
}

/// A store that can be made unreachable, to test the tracker's stale answers.
struct Switch {
    inner: SqliteCluster,
    down: AtomicBool,
}

impl Switch {
    fn check(&self) -> Result<()> {
        if self.down.load(Ordering::SeqCst) {
            bail!("connection refused (test switch)");
        }
        Ok(())
    }
}

impl ClusterStore for Switch {
    fn create_group(&self, name: &str) -> Result<bool> {
        self.check()?;
        self.inner.create_group(name)
    }
    fn groups(&self) -> Result<Vec<String>> {
        self.check()?;
        self.inner.groups()
    }
    fn join(&self, n: &NodeRow, c: bool) -> Result<Joined> {
        self.check()?;
        self.inner.join(n, c)
    }
    fn beat(&self, g: &str, a: &NodeAddr, s: u64, f: u64, now: u64) -> Result<bool> {
        self.check()?;
        self.inner.beat(g, a, s, f, now)
    }
    fn nodes(&self) -> Result<Vec<NodeRow>> {
        self.check()?;
        self.inner.nodes()
    }
    fn route(&self, app: &str, user: &str) -> Result<Option<String>> {
        self.check()?;
        self.inner.route(app, user)
    }
    fn assign(&self, app: &str, user: &str, g: &str) -> Result<String> {
        self.check()?;
        self.inner.assign(app, user, g)
    }
    fn users_per_group(&self) -> Result<Vec<(String, u64)>> {
        self.check()?;
        self.inner.users_per_group()
    }
    fn users_of(
        &self,
        group: &str,
        after: (&str, &str),
        limit: u32,
    ) -> Result<Vec<(String, String)>> {
        self.check()?;
        self.inner.users_of(group, after, limit)
    }
}

fn hello(group: &str, port: u16, free: u64) -> NodeHello {
    NodeHello {
        group: group.into(),
        host: "127.0.0.1".into(),
        port,
        version: 1,
        started: 1,
        free,
        http: None,
    }
}

fn saddrs(user: &str) -> SaddrsReq {
    SaddrsReq {
        app: "demo".into(),
        user: user.into(),
        file_id: String::new(),
    }
}

fn tracker(groups: &[&str], offline_ms: u64) -> (Arc<Switch>, Arc<Tracker>) {
    let sw = Arc::new(Switch {
        inner: SqliteCluster::memory().unwrap(),
        down: AtomicBool::new(false),
    });
    let cfg = TrackerConfig {
        offline_after_ms: offline_ms,
        beat_interval_ms: 100,
        groups: groups.iter().map(|g| g.to_string()).collect(),
        allow_create_groups: false,
    };
    let files = Arc::new(SqliteStore::memory().unwrap());
    let t = Tracker::start(sw.clone(), files, cfg);
    (sw, t)
}

#[test]
fn tracker_rules() {
    let (_sw, t) = tracker(&["g1", "g2"], 1000);
    assert_eq!(
        t.beat(&hello("g1", 1, 0)).unwrap_err().code,
        ErrorCode::NotJoined
    );
    assert_eq!(
        t.join(&hello("gx", 1, 0)).unwrap_err().code,
        ErrorCode::UnknownGroup
    );
    // No node online anywhere: a new user cannot be placed.
    assert_eq!(t.saddrs(&saddrs("u0")).unwrap_err().code, ErrorCode::NoNode);
    assert_eq!(t.join(&hello("g1", 1, 100)).unwrap().interval_ms, 100);
    assert_eq!(t.join(&hello("g2", 2, 500)).unwrap().interval_ms, 100);
    // Equal users (0): most free bytes wins, so g2; then g1 has fewer users.
    assert_eq!(t.saddrs(&saddrs("u1")).unwrap().group, "g2");
    assert_eq!(t.saddrs(&saddrs("u2")).unwrap().group, "g1");
    let r = t.saddrs(&saddrs("u1")).unwrap();
    assert_eq!((r.group.as_str(), r.stale, r.nodes.len()), ("g2", false, 1));
    let v = t.groups().unwrap();
    assert_eq!(
        v.groups.iter().map(|g| g.users).collect::<Vec<_>>(),
        vec![1, 1]
    );
    // g2's node stops beating: offline, and its user gets NoNode naming the group.
    std::thread::sleep(Duration::from_millis(1300));
    t.beat(&hello("g1", 1, 100)).unwrap();
    let v = t.groups().unwrap();
    let online: Vec<bool> = v.groups.iter().map(|g| g.nodes[0].online).collect();
    assert_eq!(online, vec![true, false]);
    let e = t.saddrs(&saddrs("u1")).unwrap_err();
    assert_eq!(e.code, ErrorCode::NoNode);
    assert!(e.text.contains("g2"), "{}", e.text);
    // A new user goes to the group with an online node.
    assert_eq!(t.saddrs(&saddrs("u3")).unwrap().group, "g1");
    // Its next beat brings it back.
    t.beat(&hello("g2", 2, 500)).unwrap();
    assert_eq!(t.saddrs(&saddrs("u1")).unwrap().group, "g2");
    t.stop();
}

/// A SADDRS naming a file answers the file's group, whatever the asking user's group: the one
/// the id names, or for an id from before ids named their group, the one its record names.
#[test]
fn tracker_routes_a_file_to_its_group() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.db");
    let sw = Arc::new(Switch {
        inner: SqliteCluster::open(&path).unwrap(),
        down: AtomicBool::new(false),
    });
    let cfg = TrackerConfig {
        offline_after_ms: 5000,
        beat_interval_ms: 100,
        groups: vec!["g1".into(), "g2".into()],
        allow_create_groups: false,
    };
    let t = Tracker::start(sw, Arc::new(SqliteStore::open(&path).unwrap()), cfg);
    t.join(&hello("g1", 1, 100)).unwrap();
    t.join(&hello("g2", 2, 500)).unwrap();
    assert_eq!(t.saddrs(&saddrs("u1")).unwrap().group, "g2");
    let for_file = |id: &str| SaddrsReq {
        file_id: id.into(),
        ..saddrs("u1")
    };
    let r = t
        .saddrs(&for_file("g1.000000000000002a-abcdefghijklmnop"))
        .unwrap();
    assert_eq!(r.group, "g1");
    assert_eq!(r.nodes[0].port, 1);
    let e = t.saddrs(&for_file("g9.000000000000002a-abc")).unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
    assert!(e.text.contains("g9"), "{}", e.text);
    // An id issued before ids named their group: its record says g1.
    let g1 = SqliteStore::open(&path).unwrap().in_group("g1");
    let old = FileRec {
        id: "000000000000002b-abcdefghijklmnop".into(),
        num: 43,
        app: "demo".into(),
        user: "u2".into(),
        status: FILE_COMMITTING,
        path: "data/43".into(),
        size: 1,
        sha256: [1; 32],
        name: "n".into(),
        block_size: 65536,
        crcs: vec![0],
        created: 1,
        node: String::new(),
    };
    g1.insert_file(&old, None).unwrap();
    // Committing: not a file yet, so the user's group answers.
    assert_eq!(t.saddrs(&for_file(&old.id)).unwrap().group, "g2");
    g1.commit_file(&old.id).unwrap();
    assert_eq!(t.saddrs(&for_file(&old.id)).unwrap().group, "g1");
    // Unknown ids, and ids of another app, go to the user's group.
    assert_eq!(
        t.saddrs(&for_file("0000000000000099-x")).unwrap().group,
        "g2"
    );
    let other_app = SaddrsReq {
        app: "other".into(),
        ..for_file(&old.id)
    };
    assert_eq!(
        t.saddrs(&other_app).unwrap().group,
        t.saddrs(&SaddrsReq {
            app: "other".into(),
            ..saddrs("u1")
        })
        .unwrap()
        .group
    );
    t.stop();
}

#[test]
fn tracker_answers_stale_while_the_database_is_down() {
    let (sw, t) = tracker(&["g1"], 5000);
    t.join(&hello("g1", 1, 100)).unwrap();
    assert!(!t.saddrs(&saddrs("u1")).unwrap().stale);
    sw.down.store(true, Ordering::SeqCst);
    t.refresh();
    // Known user and the view: answered, marked stale; beats of known nodes still accepted.
    let r = t.saddrs(&saddrs("u1")).unwrap();
    assert_eq!((r.group.as_str(), r.stale), ("g1", true));
    assert!(t.groups().unwrap().stale);
    t.beat(&hello("g1", 1, 100)).unwrap();
    // What needs the database is refused with 24.
    assert_eq!(
        t.saddrs(&saddrs("new")).unwrap_err().code,
        ErrorCode::Unavailable
    );
    assert_eq!(
        t.join(&hello("g1", 2, 1)).unwrap_err().code,
        ErrorCode::Unavailable
    );
    assert_eq!(
        t.beat(&hello("g1", 3, 1)).unwrap_err().code,
        ErrorCode::Unavailable
    );
    // Back up: fresh again.
    sw.down.store(false, Ordering::SeqCst);
    t.refresh();
    assert!(!t.groups().unwrap().stale);
    assert_eq!(t.saddrs(&saddrs("new")).unwrap().group, "g1");
    t.stop();
}

#[test]
fn tracker_without_a_view_is_unavailable() {
    let sw = Arc::new(Switch {
        inner: SqliteCluster::memory().unwrap(),
        down: AtomicBool::new(true),
    });
    let files = Arc::new(SqliteStore::memory().unwrap());
    let t = Tracker::start(sw, files, TrackerConfig::default());
    assert_eq!(t.groups().unwrap_err().code, ErrorCode::Unavailable);
    t.stop();
}

#[test]
fn the_cluster_store_reads_meta_url_like_the_storage_role() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = crate::config::Config {
        data: dir.path().to_path_buf(),
        ..Default::default()
    };
    super::open_store(&cfg).unwrap();
    assert!(dir.path().join("meta.db").exists());
    // An unknown scheme is an error, not a silent fall-back to the embedded database, and the
    // message does not repeat the URL (it may hold a password).
    cfg.meta_url = Some("mysql://ferry:secret@h/db".into());
    let err = super::open_store(&cfg).err().unwrap().to_string();
    assert!(
        err.contains("unsupported") && !err.contains("secret"),
        "{err}"
    );
    cfg.meta_url = Some("postgres://ferry:secret@[bad".into());
    let err = format!("{:#}", super::open_store(&cfg).err().unwrap());
    assert!(!err.contains("secret"), "{err}");
}
