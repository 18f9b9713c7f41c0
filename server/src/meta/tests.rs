//! One set of test bodies, run against both backends: `sqlite::NAME` on an in-memory SQLite,
//! `pg::NAME` on a throwaway PostgreSQL database (see [`super::pg::testdb`]).

use super::*;

pub(super) fn file(id: &str, num: u64) -> FileRec {
    FileRec {
        id: id.into(),
        num,
        app: "app".into(),
        user: "u".into(),
        status: FILE_COMMITTING,
        path: format!("data/{num}"),
        size: 10,
        sha256: [7; 32],
        name: "n".into(),
        block_size: 65536,
        crcs: vec![1, 2, u32::MAX],
        created: 5,
        node: "n1".into(),
    }
}

pub(super) fn session(id: u8, expires_ms: u64) -> SessionRec {
    SessionRec {
        id: [id; 16],
        app: "a".into(),
        user: "u".into(),
        size: 100,
        block_size: 65536,
        blocks: 1,
        sha256: [1; 32],
        name: "x".into(),
        temp_path: "tmp/x".into(),
        created: 1,
        expires_ms,
        challenge: None,
    }
}

fn files_are_visible_once_committed_and_only_to_their_app(m: &dyn MetaStore) {
    m.insert_file(&file("a", 1), None).unwrap();
    assert_eq!(m.file("a", "app").unwrap(), None);
    let committing = m.files_with_status(FILE_COMMITTING).unwrap();
    assert_eq!(committing.len(), 1);
    assert_eq!(committing[0].node, "n1");
    m.commit_file("a").unwrap();
    let got = m.file("a", "app").unwrap().unwrap();
    assert_eq!(got.crcs, vec![1, 2, u32::MAX]);
    assert_eq!(got.status, FILE_STORED);
    assert_eq!(m.file("a", "other").unwrap(), None);
    assert!(m.find_content("app", &[7; 32], 10).unwrap().is_some());
    assert!(m.find_content("app", &[7; 32], 11).unwrap().is_none());
    assert!(m.delete_file("a", "other", None).unwrap().is_none());
    // Its owner is user "u": another user's delete changes nothing.
    assert!(m.delete_file("a", "app", Some("v")).unwrap().is_none());
    assert!(m.file("a", "app").unwrap().is_some());
    let gone = m.delete_file("a", "app", Some("u")).unwrap().unwrap();
    assert_eq!((gone.id.as_str(), gone.status), ("a", FILE_STORED));
    assert!(m.file("a", "app").unwrap().is_none());
    // A retry (its first attempt never heard that it marked the file) gets it again, to finish
    // the deletion; the owner rule still holds; once dropped, it is gone.
    let again = m.delete_file("a", "app", Some("u")).unwrap().unwrap();
    assert_eq!(again.id, "a");
    assert!(m.delete_file("a", "app", Some("v")).unwrap().is_none());
    assert_eq!(m.files_with_status(FILE_DELETING).unwrap().len(), 1);
    m.drop_file("a").unwrap();
    assert!(m.files_with_status(FILE_DELETING).unwrap().is_empty());
    assert!(
        m.delete_file("a", "app", None).unwrap().is_none(),
        "dropped"
    );
}

fn a_file_number_is_stored_once(m: &dyn MetaStore) {
    m.insert_file(&file("a", 9), None).unwrap();
    assert!(m.insert_file(&file("b", 9), None).is_err());
}

fn finished_uploads_answer_once_stored(m: &dyn MetaStore) {
    let key = [4; 16];
    m.insert_file(&file("f", 2), Some(&key)).unwrap();
    assert_eq!(m.finished_upload("app", "u", &key).unwrap(), None);
    m.commit_file("f").unwrap();
    assert_eq!(
        m.finished_upload("app", "u", &key).unwrap().as_deref(),
        Some("f")
    );
    assert_eq!(m.finished_upload("app", "other", &key).unwrap(), None);
    assert_eq!(m.expire_finished(0).unwrap(), 0);
    assert_eq!(m.expire_finished(u64::MAX / 2).unwrap(), 1);
    assert_eq!(m.finished_upload("app", "u", &key).unwrap(), None);
}

fn sessions_and_blocks_round_trip(m: &dyn MetaStore) {
    let s = session(3, 2);
    m.insert_session(&s).unwrap();
    assert_eq!(m.session(&s.id).unwrap().as_ref(), Some(&s));
    assert_eq!(m.session(&[9; 16]).unwrap(), None);
    m.mark_blocks(&[(s.id, 0, 99), (s.id, 1, u32::MAX)], 50)
        .unwrap();
    let c = Challenge {
        file: "f".into(),
        off: 3,
        len: 4,
    };
    m.set_challenge(&s.id, Some(&c)).unwrap();
    let got = m.sessions().unwrap();
    assert_eq!(got[0].expires_ms, 50);
    assert_eq!(got[0].challenge, Some(c));
    let mut blocks = m.session_blocks(&s.id).unwrap();
    blocks.sort_unstable();
    assert_eq!(blocks, vec![(0, 99), (1, u32::MAX)]);
    m.unmark_blocks(&s.id, &[0, 1]).unwrap();
    assert!(m.session_blocks(&s.id).unwrap().is_empty());
    m.delete_session(&s.id).unwrap();
    assert!(m.sessions().unwrap().is_empty());
}

fn a_committed_file_ends_its_session(m: &dyn MetaStore) {
    let s = session(5, 1000);
    m.insert_session(&s).unwrap();
    m.mark_blocks(&[(s.id, 0, 1)], 1000).unwrap();
    m.insert_file(&file("f", 3), Some(&s.id)).unwrap();
    m.commit_file("f").unwrap();
    assert_eq!(m.session(&s.id).unwrap(), None);
    assert!(m.session_blocks(&s.id).unwrap().is_empty());
}

fn sessions_expire_only_if_nobody_used_them_since(m: &dyn MetaStore) {
    let s = session(6, 100);
    m.insert_session(&s).unwrap();
    // A node saw expiry 100; meanwhile a peer recorded a block, moving it to 500.
    m.mark_blocks(&[(s.id, 0, 1)], 500).unwrap();
    assert!(!m.expire_session(&s.id, 100).unwrap());
    assert!(m.session(&s.id).unwrap().is_some());
    assert!(m.expire_session(&s.id, 500).unwrap());
    assert!(m.session(&s.id).unwrap().is_none());
    assert!(m.session_blocks(&s.id).unwrap().is_empty());
    assert!(!m.expire_session(&s.id, 500).unwrap(), "once");
}

fn key_claims_exclude_other_nodes(m: &dyn MetaStore) {
    let k = [8; 16];
    assert_eq!(m.claim_key("a", "u", &k, "n1").unwrap(), Claim::Mine);
    assert_eq!(
        m.claim_key("a", "u", &k, "n2").unwrap(),
        Claim::Held("n1".into())
    );
    // Another user's key is another claim.
    assert_eq!(m.claim_key("a", "v", &k, "n2").unwrap(), Claim::Mine);
    // n1 restarted: its old claim is its own again.
    assert_eq!(m.claim_key("a", "u", &k, "n1").unwrap(), Claim::Mine);
    // n2 proved n1 dead and takes over; n1's stale take fails.
    assert!(m.take_claim("a", "u", &k, "n1", "n2").unwrap());
    assert!(!m.take_claim("a", "u", &k, "n1", "n3").unwrap());
    // Releasing someone else's claim does nothing.
    m.release_claim("a", "u", &k, "n1").unwrap();
    assert_eq!(
        m.claim_key("a", "u", &k, "n1").unwrap(),
        Claim::Held("n2".into())
    );
    m.release_claim("a", "u", &k, "n2").unwrap();
    assert_eq!(m.claim_key("a", "u", &k, "n1").unwrap(), Claim::Mine);
}

fn id_steps_never_overlap(m: &dyn MetaStore) {
    let a = m.reserve_ids("data", 10).unwrap();
    let b = m.reserve_ids("data", 10).unwrap();
    let c = m.reserve_ids("other", 1).unwrap();
    assert_eq!((a, b, c), (1, 11, 1));
}

fn the_open_session_of_a_content_is_the_newest_unexpired_one(m: &dyn MetaStore) {
    let find = |user: &str, size: u64, now: u64| {
        let s = session(0, 0);
        m.open_session("a", user, size, s.block_size, &s.sha256, now)
            .unwrap()
            .map(|r| r.id[0])
    };
    assert_eq!(find("u", 100, 0), None);
    let older = SessionRec {
        created: 1,
        ..session(1, 5_000)
    };
    let newer = SessionRec {
        created: 2,
        ..session(2, 2_000)
    };
    m.insert_session(&older).unwrap();
    m.insert_session(&newer).unwrap();
    assert_eq!(find("u", 100, 1_000), Some(2));
    // The newer one expired: the older one is still open.
    assert_eq!(find("u", 100, 3_000), Some(1));
    assert_eq!(find("u", 100, 5_000), None);
    // Another user, another size: not theirs.
    assert_eq!(find("v", 100, 1_000), None);
    assert_eq!(find("u", 101, 1_000), None);
}

/// Two groups' stores on one database: each writes its own rows and recovers, expires,
/// deletes, deduplicates and resumes only its own; a stored file is readable through both.
fn groups_sharing_a_database_keep_to_their_own_rows(g1: &dyn MetaStore, g2: &dyn MetaStore) {
    let s1 = session(1, 9_000);
    let s2 = SessionRec {
        sha256: [2; 32],
        ..session(2, 9_000)
    };
    g1.insert_session(&s1).unwrap();
    g2.insert_session(&s2).unwrap();
    let ids =
        |m: &dyn MetaStore| -> Vec<u8> { m.sessions().unwrap().iter().map(|s| s.id[0]).collect() };
    assert_eq!((ids(g1), ids(g2)), (vec![1], vec![2]));
    let open = |m: &dyn MetaStore, s: &SessionRec| {
        m.open_session("a", "u", s.size, s.block_size, &s.sha256, 0)
            .unwrap()
            .map(|r| r.id[0])
    };
    assert_eq!((open(g1, &s1), open(g2, &s1)), (Some(1), None));
    let f = file("f1", 1);
    g1.insert_file(&f, Some(&s1.id)).unwrap();
    let committing = |m: &dyn MetaStore| m.files_with_status(FILE_COMMITTING).unwrap().len();
    assert_eq!((committing(g1), committing(g2)), (1, 0));
    g1.commit_file(&f.id).unwrap();
    assert!(
        g1.session(&s1.id).unwrap().is_none(),
        "the commit ends the session"
    );
    // Readable from any group (the routing finds its group); its bytes are g1's.
    assert_eq!(g2.file_group("f1", "app").unwrap().as_deref(), Some("g1"));
    assert_eq!(g2.file_group("f1", "other app").unwrap(), None);
    assert_eq!(g2.file_group("f2", "app").unwrap(), None);
    assert!(g1.file("f1", "app").unwrap().is_some());
    assert!(g2.file("f1", "app").unwrap().is_some());
    assert!(g2.find_content("app", &f.sha256, f.size).unwrap().is_none());
    assert!(g1.find_content("app", &f.sha256, f.size).unwrap().is_some());
    assert!(g2.delete_file("f1", "app", None).unwrap().is_none());
    assert!(
        g1.file("f1", "app").unwrap().is_some(),
        "g2 deleted g1's file"
    );
    assert!(g1.delete_file("f1", "app", None).unwrap().is_some());
    let deleting = |m: &dyn MetaStore| m.files_with_status(FILE_DELETING).unwrap().len();
    assert_eq!((deleting(g1), deleting(g2)), (1, 0));
}

#[test]
fn sqlite_groups_sharing_a_database_keep_to_their_own_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.db");
    let g1 = SqliteStore::open(&path).unwrap().in_group("g1");
    let g2 = SqliteStore::open(&path).unwrap().in_group("g2");
    groups_sharing_a_database_keep_to_their_own_rows(&g1, &g2);
}

#[test]
fn pg_groups_sharing_a_database_keep_to_their_own_rows() {
    if let Some(db) = crate::meta::pg::testdb::create("groups_keep_to_their_rows") {
        let (g1, g2) = (db.store().in_group("g1"), db.store().in_group("g2"));
        groups_sharing_a_database_keep_to_their_own_rows(&g1, &g2);
    }
}

fn usage_counts_a_users_committing_and_stored_files_not_deleting_ones(m: &dyn MetaStore) {
    assert_eq!(m.usage("app", "u").unwrap(), Usage::default());
    for (id, num) in [("a", 1), ("b", 2), ("c", 3)] {
        m.insert_file(&file(id, num), None).unwrap();
    }
    m.commit_file("a").unwrap();
    m.commit_file("b").unwrap();
    // file() is user "u" of app "app", 10 bytes each; "c" is still committing and counts.
    assert_eq!(
        m.usage("app", "u").unwrap(),
        Usage {
            bytes: 30,
            files: 3
        }
    );
    assert_eq!(m.usage("app", "v").unwrap(), Usage::default());
    assert_eq!(m.usage("other", "u").unwrap(), Usage::default());
    m.delete_file("a", "app", Some("u")).unwrap().unwrap();
    assert_eq!(
        m.usage("app", "u").unwrap(),
        Usage {
            bytes: 20,
            files: 2
        }
    );
}

/// Declares `sqlite::NAME` and `pg::NAME` for every test body NAME above.
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[test]
                fn $name() {
                    let m = crate::meta::SqliteStore::memory().unwrap();
                    super::$name(&m);
                }
            )*
        }
        mod pg {
            $(
                #[test]
                fn $name() {
                    if let Some(db) = crate::meta::pg::testdb::create(stringify!($name)) {
                        super::$name(&db.store());
                    }
                }
            )*
        }
    };
}

both_backends!(
    files_are_visible_once_committed_and_only_to_their_app,
    a_file_number_is_stored_once,
    finished_uploads_answer_once_stored,
    sessions_and_blocks_round_trip,
    the_open_session_of_a_content_is_the_newest_unexpired_one,
    a_committed_file_ends_its_session,
    sessions_expire_only_if_nobody_used_them_since,
    key_claims_exclude_other_nodes,
    id_steps_never_overlap,
    usage_counts_a_users_committing_and_stored_files_not_deleting_ones,
);

/// A database from before schema version 2 (as main's server left it) is migrated in place.
#[test]
fn sqlite_migrates_a_version_1_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.db");
    {
        let db = rusqlite::Connection::open(&path).unwrap();
        db.execute_batch(include_str!("schema.sql")).unwrap();
        db.execute(
            "INSERT INTO files (id, num, app, user, status, path, size, sha256, name, \
             block_size, crcs, created, updated) VALUES ('old', 1, 'app', 'u', 1, 'p', 0, \
             zeroblob(32), '', 65536, x'', 0, 0)",
            [],
        )
        .unwrap();
    }
    for _ in 0..2 {
        let m = SqliteStore::open(&path).unwrap();
        let old = m.file("old", "app").unwrap().unwrap();
        assert_eq!(old.node, "");
        assert_eq!(m.claim_key("a", "u", &[1; 16], "n").unwrap(), Claim::Mine);
    }
}

/// A database the version-2 server wrote (finished uploads without an index, so every commit
/// scanned them) gets its indexes at open, keeps its rows, and finishes a pending commit.
#[test]
fn sqlite_migrates_a_version_2_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.db");
    {
        let mut db = rusqlite::Connection::open(&path).unwrap();
        super::sqlite::migrate_to(&mut db, 2).unwrap();
        let plan: String = db
            .query_row(
                "EXPLAIN QUERY PLAN SELECT upload_id FROM finished_uploads WHERE file_id = 'x'",
                [],
                |r| r.get(3),
            )
            .unwrap();
        assert_eq!(plan, "SCAN finished_uploads", "version 2 had no index");
        // The rows as the version-2 server wrote them: a session, and the committing file
        // that finishes it.
        db.execute_batch(
            "INSERT INTO upload_sessions (id, app, user, size, block_size, blocks, sha256, \
             name, temp_path, created, expires) VALUES (x'02020202020202020202020202020202', \
             'a', 'u', 100, 65536, 1, zeroblob(32), 'x', 'tmp/x', 1, 1000); \
             INSERT INTO files (id, num, app, user, status, path, size, sha256, name, \
             block_size, crcs, created, updated, node) VALUES ('old', 1, 'app', 'u', 0, 'p', \
             10, zeroblob(32), 'n', 65536, x'', 5, 5, 'n1'); \
             INSERT INTO finished_uploads (upload_id, app, user, file_id, finished) \
             VALUES (x'02020202020202020202020202020202', 'app', 'u', 'old', 1);",
        )
        .unwrap();
    }
    // Older rows are group "": a standalone server's store still recovers them.
    let m = SqliteStore::open(&path).unwrap();
    assert_eq!(m.sessions().unwrap().len(), 1);
    assert_eq!(m.files_with_status(FILE_COMMITTING).unwrap().len(), 1);
    drop(m);
    for _ in 0..2 {
        let m = SqliteStore::open(&path).unwrap();
        m.commit_file("old").unwrap();
        assert_eq!(
            m.session(&[2; 16]).unwrap(),
            None,
            "the commit ended its session"
        );
        assert_eq!(
            m.finished_upload("app", "u", &[2; 16]).unwrap().as_deref(),
            Some("old")
        );
    }
    let db = rusqlite::Connection::open(&path).unwrap();
    let version: i64 = db
        .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    for index in ["finished_file", "finished_age"] {
        let n: i64 = db
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name = ?1",
                [index],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 1, "{index}");
    }
}

/// Writers on a database file share their WAL syncs (group commit); every write that returned
/// is there when the database is opened again.
#[test]
fn sqlite_group_commit_keeps_every_returned_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.db");
    {
        let m = SqliteStore::open(&path).unwrap();
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let m = &m;
                s.spawn(move || {
                    for i in 0..25 {
                        let num = t * 1000 + i + 1;
                        let f = file(&format!("f{num}"), num);
                        m.insert_file(&f, Some(&[t as u8 * 32 + i as u8; 16]))
                            .unwrap();
                        m.commit_file(&f.id).unwrap();
                    }
                });
            }
        });
    }
    let m = SqliteStore::open(&path).unwrap();
    for t in 0..8u64 {
        for i in 0..25 {
            let num = t * 1000 + i + 1;
            assert!(
                m.file(&format!("f{num}"), "app").unwrap().is_some(),
                "f{num}"
            );
        }
    }
    assert!(m.files_with_status(FILE_COMMITTING).unwrap().is_empty());
}

/// Every write a reply depends on returns only after its WAL sync: with the sync failing, each
/// fails and says so. Key claims, which no reply depends on, do not wait for one.
#[test]
fn sqlite_writes_return_only_after_their_wal_sync() {
    fn unsynced<T: std::fmt::Debug>(what: &str, r: Result<T>) {
        match r {
            Ok(v) => panic!("{what} returned {v:?} without its WAL sync"),
            Err(e) => assert!(format!("{e:#}").contains("cannot sync"), "{what}: {e:#}"),
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let mut m = SqliteStore::open(&dir.path().join("meta.db")).unwrap();
    let s = session(1, 10);
    m.insert_session(&s).unwrap();
    m.sync_wal_at(dir.path().join("gone").join("meta.db-wal"));
    unsynced("reserve_ids", m.reserve_ids("data", 10));
    unsynced("insert_file", m.insert_file(&file("f", 1), Some(&[3; 16])));
    unsynced("commit_file", m.commit_file("f"));
    unsynced("mark_blocks", m.mark_blocks(&[(s.id, 0, 1)], 20));
    unsynced("delete_file", m.delete_file("f", "app", None));
    unsynced("drop_file", m.drop_file("f"));
    unsynced("expire_finished", m.expire_finished(0));
    unsynced("delete_session", m.delete_session(&s.id));
    assert_eq!(
        m.claim_key("app", "u", &[4; 16], "n1").unwrap(),
        Claim::Mine
    );
    m.release_claim("app", "u", &[4; 16], "n1").unwrap();
}

#[test]
fn pg_schema_is_applied_once_by_nodes_starting_together() {
    let Some(db) =
        crate::meta::pg::testdb::create("pg_schema_is_applied_once_by_nodes_starting_together")
    else {
        return;
    };
    let stores: Vec<PgStore> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4).map(|_| s.spawn(|| db.store())).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    stores[0].insert_file(&file("x", 1), None).unwrap();
    assert_eq!(
        stores[3].files_with_status(FILE_COMMITTING).unwrap().len(),
        1
    );
}

/// A PostgreSQL database a version-3 server wrote (no group columns) gets them at the next
/// open; its rows are group "" (a standalone server's), and a group's store writes its own.
#[test]
fn pg_migrates_a_version_3_database() {
    let Some(db) = crate::meta::pg::testdb::create("pg_migrates_a_version_3_database") else {
        return;
    };
    drop(db.store());
    let mut c = db.cfg.connect(postgres::NoTls).unwrap();
    c.batch_execute(
        "ALTER TABLE files DROP COLUMN grp; ALTER TABLE upload_sessions DROP COLUMN grp; \
         DROP INDEX files_owner; UPDATE schema_version SET version = 3; \
         INSERT INTO upload_sessions (id, app, \"user\", size, block_size, blocks, sha256, \
         name, temp_path, created, expires) VALUES (decode(repeat('01', 16), 'hex'), 'a', 'u', \
         1, 65536, 1, decode(repeat('00', 32), 'hex'), 'x', 'tmp/x', 1, 1000);",
    )
    .unwrap();
    let standalone = db.store();
    assert_eq!(
        standalone.sessions().unwrap().len(),
        1,
        "the old row is group \"\""
    );
    let g1 = db.store().in_group("g1");
    assert!(g1.sessions().unwrap().is_empty());
    g1.insert_session(&session(2, 1000)).unwrap();
    assert_eq!(g1.sessions().unwrap().len(), 1);
    let v: i64 = c
        .query_one("SELECT version FROM schema_version", &[])
        .unwrap()
        .get(0);
    assert_eq!(v, SCHEMA_VERSION);
    let owner_index: bool = c
        .query_one("SELECT to_regclass('files_owner') IS NOT NULL", &[])
        .unwrap()
        .get(0);
    assert!(owner_index, "version 5's index");
}

/// Opening a database whose schema is current runs no DDL, so it takes no table lock: it
/// completes while another session holds `files` exclusively (a member restarting beside busy
/// peers once deadlocked on CREATE INDEX IF NOT EXISTS).
#[test]
fn pg_open_of_a_current_schema_takes_no_table_lock() {
    let Some(db) = crate::meta::pg::testdb::create("pg_open_takes_no_table_lock") else {
        return;
    };
    drop(db.store());
    let mut c = db.cfg.connect(postgres::NoTls).unwrap();
    let mut tx = c.transaction().unwrap();
    tx.batch_execute("LOCK TABLE files IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let cfg = db.cfg.clone();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = crate::meta::pg::PgStore::open_config(cfg).map(drop);
        let _ = done_tx.send(r.is_ok());
    });
    let opened = done_rx.recv_timeout(std::time::Duration::from_secs(5));
    tx.rollback().unwrap();
    assert_eq!(opened, Ok(true), "open waited on the table lock");
}

#[test]
fn open_picks_the_backend_from_the_url() {
    let dir = tempfile::tempdir().unwrap();
    open(None, dir.path(), "").unwrap();
    assert!(dir.path().join("meta.db").exists());
    let err = open(Some("mysql://x@h/db"), dir.path(), "").err().unwrap();
    assert!(err.to_string().contains("unsupported"), "{err}");
}
