//! Storage nodes of one group sharing one data dir and one PostgreSQL database (issue #8,
//! "Multi-node storage"): real `ferry-server` processes with distinct node names, driven by the
//! real `ferry` client.
//!
//! - An upload through node A survives A's SIGKILL: the client fails over to node B, which
//!   loads A's session from the database and finishes it; the file is byte-identical, stored
//!   once, and A restarted on the same dir serves it too (its recovery leaves B's work alone).
//! - Small uploads through both nodes at once get file ids that never collide.
//!
//! The nodes have a `[cluster]` section (that is where the node name lives) whose tracker
//! address has nothing listening: these tests are about the shared storage, not membership.
//! They need `FERRY_PG_URL` (skipped without it, failed without it when CI=true).

use crate::support;

use serde_json::Value;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use support::cli::{ferry, ok};
use support::{PgDb, Proc, bin, count_files, free_addr, make_file, pg_db, sha256_file, wait_ready};

const BS: u64 = 64 * 1024;

struct Group {
    dir: tempfile::TempDir,
    db: PgDb,
    tracker: SocketAddr,
    nodes: Vec<(String, SocketAddr, Option<Proc>)>,
}

impl Group {
    fn new(db: PgDb) -> Group {
        Group {
            dir: tempfile::tempdir().unwrap(),
            db,
            tracker: free_addr(),
            nodes: Vec::new(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts (or restarts) node `name` on the shared data dir and database.
    fn start(&mut self, name: &str) -> SocketAddr {
        self.start_with(name, "")
    }

    /// `start` with `extra` appended to the node's config (a `[faults]` table).
    fn start_with(&mut self, name: &str, extra: &str) -> SocketAddr {
        let addr = match self.nodes.iter().find(|n| n.0 == name) {
            Some(n) => n.1,
            None => free_addr(),
        };
        let conf = self.path(&format!("{name}.toml"));
        std::fs::write(
            &conf,
            format!(
                "meta_url = {:?}\nsync_blocks = false\nid_step = 5\nidle_timeout_ms = 2000\n\
                 [cluster]\ngroup = \"g1\"\ntrackers = [\"{}\"]\nnode_name = \"{name}\"\n{}\n{extra}",
                self.db.url,
                self.tracker,
                support::auth::auth_toml()
            ),
        )
        .unwrap();
        let p = Proc::spawn(
            &format!("node-{name}"),
            Command::new(bin("ferry-server"))
                .arg("--config")
                .arg(&conf)
                .arg("--listen")
                .arg(addr.to_string())
                .arg("--data")
                .arg(self.path("data"))
                .env_remove("FERRY_META_URL"),
            self.dir.path(),
        );
        wait_ready(addr, Duration::from_secs(20));
        self.nodes.retain(|n| n.0 != name);
        self.nodes.push((name.into(), addr, Some(p)));
        addr
    }

    fn node(&mut self, name: &str) -> &mut Proc {
        self.nodes
            .iter_mut()
            .find(|n| n.0 == name)
            .and_then(|n| n.2.as_mut())
            .unwrap()
    }
}

/// Set bits in the first bitmap of a client upload state file (after its 68-byte header).
fn bits_set(path: &Path, blocks: usize) -> u32 {
    let Ok(b) = std::fs::read(path) else { return 0 };
    b.get(68..68 + blocks.div_ceil(8))
        .map(|m| m.iter().map(|x| x.count_ones()).sum())
        .unwrap_or(0)
}

/// Waits until the running upload `child` (state in `state`) has begun a quarter of its
/// `blocks` (30 s at most; the test fails if it ends or stalls before).
fn wait_begun(child: &mut std::process::Child, state: &Path, blocks: usize) {
    let begun = || -> u32 {
        std::fs::read_dir(state)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| bits_set(&e.path(), blocks))
            .sum()
    };
    let t = Instant::now();
    while begun() < blocks as u32 / 4 {
        if t.elapsed() > Duration::from_secs(30) || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the upload made no progress through node A");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Downloads `id` through `node` to `out` and checks that it holds `src`'s bytes.
fn download_matches(state: &Path, node: SocketAddr, id: &str, out: &Path, src: &Path) {
    let args = ["--json", "download", id, "-o", out.to_str().unwrap()];
    ok(ferry(state, &[node], &args));
    assert_eq!(sha256_file(out), sha256_file(src));
}

/// Waits for `child` to exit (60 s at most).
fn wait_exit(child: &mut std::process::Child, what: &str) -> std::process::ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if t.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} within 60 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The numeric id of a node's file id (`<group>.`, 16 hex digits, a dash, random characters).
fn num_of(file_id: &str) -> u64 {
    let (group, rest) = file_id
        .split_once('.')
        .expect("a node's file id names its group");
    assert_eq!(ferry_common::proto::file_group(file_id), Some(group));
    let hex = rest.split('-').next().unwrap();
    u64::from_str_radix(hex, 16).unwrap_or_else(|e| panic!("file id {file_id}: {e}"))
}

#[test]
fn upload_through_a_killed_node_finishes_through_its_peer() {
    let Some(db) = pg_db("upload_through_a_killed_node_finishes_through_its_peer") else {
        return;
    };
    let mut g = Group::new(db);
    let a = g.start("a");
    let b = g.start("b");
    let src = g.path("src");
    let size: u64 = 24 << 20;
    make_file(&src, size, 21);
    let blocks = (size / BS) as usize;
    let state = g.path("state");
    std::fs::create_dir_all(&state).unwrap();
    let conf = g.path("client.toml");
    std::fs::write(&conf, "timeout_ms = 1000\n").unwrap();
    let out = g.path("client.out");
    // Node A first: the client sends everything there until A dies, then fails over to B.
    let mut client = ferry(
        &state,
        &[a, b],
        &[
            "--config",
            conf.to_str().unwrap(),
            "--json",
            "upload",
            src.to_str().unwrap(),
            "--block-size",
            "64KiB",
            "--threads",
            "2",
        ],
    );
    let mut child = client
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(out.with_extension("err")).unwrap())
        .spawn()
        .unwrap();
    wait_begun(&mut child, &state, blocks);
    g.node("a").kill(); // SIGKILL mid-transfer
    let status = wait_exit(&mut child, "the client did not finish through node B");
    let err = std::fs::read_to_string(out.with_extension("err")).unwrap();
    assert!(status.success(), "upload failed after node A died: {err}");
    let v: Value = serde_json::from_str(std::fs::read_to_string(&out).unwrap().trim()).unwrap();
    eprintln!("upload through A (killed) then B: {}", v["report"]);
    assert!(v["report"]["failovers"].as_u64().unwrap() >= 1, "{v}");
    let id = v["file_id"].as_str().unwrap().to_owned();
    let b_log = g.node("b").log_text();
    assert!(
        b_log.contains("loaded from the metadata DB"),
        "node B must resume node A's session, not start another: {b_log}"
    );

    let got = g.path("via-b");
    download_matches(&state, b, &id, &got, &src);
    assert_eq!(count_files(&g.path("data/data")), 1, "stored exactly once");

    // A restarts on the same dir: its recovery must leave B's work alone, and it serves the
    // file B finished. No temp file is left behind by either node.
    let a = g.start("a");
    let again = g.path("via-a");
    download_matches(&state, a, &id, &again, &src);
    assert_eq!(count_files(&g.path("data/tmp")), 0);
    assert_eq!(count_files(&g.path("data/data")), 1);
}

/// Node A dies between placing a big upload's file and marking it stored (the chaos run found
/// this): the session's row is left without a temp file, and until A restarts nothing would
/// finish the file. Node B finishes A's commit when the client's retried UPLOAD_OVER reaches it,
/// so the upload succeeds at once with the file A placed: stored once, byte-identical, and A's
/// restart leaves it alone.
#[test]
fn a_node_killed_mid_commit_has_its_upload_finished_by_its_peer() {
    killed_mid_commit(
        "a_node_killed_mid_commit_has_its_upload_finished_by_its_peer",
        (1 << 20) + 5,
    );
}

/// The same for a small file (one UPLOAD frame): the retried UPLOAD reaches B, which takes over
/// the dead node's claim on the upload key and finishes A's commit instead of writing the bytes
/// a second time (the long chaos run found a second copy here).
#[test]
fn a_node_killed_mid_commit_of_a_small_file_has_it_finished_by_its_peer() {
    killed_mid_commit(
        "a_node_killed_mid_commit_of_a_small_file_has_it_finished_by_its_peer",
        40_000,
    );
}

fn killed_mid_commit(test: &str, size: u64) {
    let Some(db) = pg_db(test) else {
        return;
    };
    let mut g = Group::new(db);
    let a = g.start_with(
        "a",
        "[faults]\npause_at = \"file-renamed\"\npause_ms = 30000\n",
    );
    let b = g.start("b");
    let src = g.path("src");
    make_file(&src, size, 31);
    let state = g.path("state");
    std::fs::create_dir_all(&state).unwrap();
    let conf = g.path("client.toml");
    std::fs::write(&conf, "timeout_ms = 1000\n").unwrap();
    let out = g.path("client.out");
    let args = [
        "--config",
        conf.to_str().unwrap(),
        "--json",
        "upload",
        src.to_str().unwrap(),
        "--block-size",
        "64KiB",
    ];
    let mut child = ferry(&state, &[a, b], &args)
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(out.with_extension("err")).unwrap())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !g
        .node("a")
        .log_text()
        .contains("phase file-renamed reached")
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "A never reached file-renamed"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the upload ended early"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    g.node("a").kill();
    let status = wait_exit(&mut child, "the client did not finish through node B");
    let err = std::fs::read_to_string(out.with_extension("err")).unwrap();
    assert!(
        status.success(),
        "upload failed after A died mid-commit: {err}"
    );
    let v: Value = serde_json::from_str(std::fs::read_to_string(&out).unwrap().trim()).unwrap();
    let id = v["file_id"].as_str().unwrap().to_owned();
    let b_log = g.node("b").log_text();
    assert!(b_log.contains("finishing the commit of file"), "{b_log}");
    assert_eq!(count_files(&g.path("data/data")), 1, "stored exactly once");
    let got = g.path("got");
    download_matches(&state, b, &id, &got, &src);
    // A's restart (without the fault) finds nothing left to do and serves the file too.
    let a = g.start("a");
    let again = g.path("again");
    download_matches(&state, a, &id, &again, &src);
    assert_eq!(count_files(&g.path("data/data")), 1);
    assert_eq!(count_files(&g.path("data/tmp")), 0);
}

/// A session opened through node A is resumed by UPLOAD_INIT through node B from a client with
/// no record of it (another device, a lost state dir, so no earlier request names the session):
/// B loads the session from the database itself, answers with the same upload, and only the
/// blocks A never acknowledged are sent; the file is stored once.
#[test]
fn upload_init_through_a_peer_resumes_the_session_another_node_opened() {
    let Some(db) = pg_db("upload_init_through_a_peer_resumes_the_session_another_node_opened")
    else {
        return;
    };
    let mut g = Group::new(db);
    let a = g.start("a");
    let b = g.start("b");
    let src = g.path("src");
    let size: u64 = 8 << 20;
    make_file(&src, size, 23);
    let blocks = (size / BS) as usize;
    let upload = |state: &Path, node: SocketAddr| {
        let path = src.to_str().unwrap();
        let args = [
            "--json",
            "upload",
            path,
            "--block-size",
            "64KiB",
            "--threads",
            "1",
        ];
        ferry(state, &[node], &args)
    };
    // Through A, until a quarter of the blocks are begun; then the client dies.
    let first_state = g.path("state-a");
    std::fs::create_dir_all(&first_state).unwrap();
    let mut child = upload(&first_state, a)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_begun(&mut child, &first_state, blocks);
    child.kill().unwrap();
    child.wait().unwrap();
    // Through B, from nothing.
    let r = support::cli::run(upload(&g.path("state-b"), b));
    assert!(r.ok, "upload through B: {}", r.stderr);
    let rep = r.report();
    eprintln!("the same content through B with no client state: {rep}");
    let skipped = rep["blocks_skipped"].as_u64().unwrap();
    assert!(skipped >= blocks as u64 / 8, "B started over: {rep}");
    assert_eq!(
        skipped + rep["blocks_sent"].as_u64().unwrap(),
        blocks as u64,
        "{rep}"
    );
    let b_log = g.node("b").log_text();
    assert!(
        b_log.contains("UPLOAD_INIT resumes upload session"),
        "node B must resume node A's session from the database: {b_log}"
    );
    let got = g.path("got");
    ok(ferry(
        &g.path("state-b"),
        &[b],
        &[
            "--json",
            "download",
            r.json()["file_id"].as_str().unwrap(),
            "-o",
            got.to_str().unwrap(),
        ],
    ));
    assert_eq!(sha256_file(&got), sha256_file(&src));
    assert_eq!(count_files(&g.path("data/data")), 1, "stored exactly once");
}

#[test]
fn ids_from_two_nodes_never_collide() {
    let Some(db) = pg_db("ids_from_two_nodes_never_collide") else {
        return;
    };
    let mut g = Group::new(db);
    let nodes = [g.start("a"), g.start("b")];
    const EACH: u64 = 12;
    // Id steps of 5 (the nodes' `id_step`) and 12 files per node: the nodes race for the id
    // row again and again.
    let ids: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = nodes
            .iter()
            .enumerate()
            .map(|(n, &addr)| {
                let g = &g;
                s.spawn(move || {
                    let state = g.path(&format!("state-{n}"));
                    (0..EACH)
                        .map(|i| {
                            let f = g.path(&format!("small-{n}-{i}"));
                            make_file(&f, 1000 + i, 100 * n as u64 + i);
                            let v = ok(ferry(
                                &state,
                                &[addr],
                                &["--json", "upload", f.to_str().unwrap()],
                            ))
                            .json();
                            v["file_id"].as_str().unwrap().to_owned()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let nums: HashSet<u64> = ids.iter().map(|i| num_of(i)).collect();
    assert_eq!(ids.len() as u64, 2 * EACH);
    assert_eq!(
        nums.len(),
        ids.len(),
        "two nodes handed out one id: {ids:?}"
    );
    assert_eq!(count_files(&g.path("data/data")), ids.len());
}
