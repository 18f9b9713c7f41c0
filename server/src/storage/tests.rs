use super::*;
use crate::config::Config;
use crate::ids::file_path;
use crate::meta::{Claim, FILE_COMMITTING, FILE_DELETING, FileRec, SessionRec, UploadId, now_ms};
use ferry_common::proto::{BlockAck, BlockMeta, DownloadReq, ErrorCode, UploadInit, UploadMeta};
use sha2::{Digest, Sha256};
use std::fs::{self};
use std::path::Path;
use std::time::Instant;

fn open(dir: &Path) -> Storage {
    Storage::open(Config {
        data: dir.to_path_buf(),
        ..Config::default()
    })
    .unwrap()
}

fn rec(id: &str, num: u64, path: &str) -> FileRec {
    FileRec {
        id: id.into(),
        num,
        app: "a".into(),
        user: "u".into(),
        status: FILE_COMMITTING,
        path: path.into(),
        size: 3,
        sha256: [0; 32],
        name: String::new(),
        block_size: 65536,
        crcs: vec![crc32c::crc32c(b"abc")],
        created: 0,
        node: String::new(),
    }
}

/// A crash between the rename and the final commit, and one before the rename.
#[test]
fn start_up_finishes_or_drops_interrupted_commits() {
    let dir = tempfile::tempdir().unwrap();
    let who = Who {
        app: "a".into(),
        user: "u".into(),
    };
    {
        let st = open(dir.path());
        let placed = file_path(900, 1);
        fs::create_dir_all(dir.path().join(&placed).parent().unwrap()).unwrap();
        fs::write(dir.path().join(&placed), b"abc").unwrap();
        st.meta
            .insert_file(&rec("renamed", 900, &placed), None)
            .unwrap();
        st.meta
            .insert_file(&rec("not-renamed", 901, &file_path(901, 1)), None)
            .unwrap();
        fs::write(dir.path().join(TMP).join("small-stray.part"), b"x").unwrap();
        assert_eq!(
            st.stat(&who, "renamed").unwrap_err().code,
            ErrorCode::NotFound
        );
        // A deletion cut short after the record was marked: invisible at once, and its
        // bytes are gone after the restart.
        let doomed = file_path(902, 1);
        fs::write(dir.path().join(&doomed), b"gone soon").unwrap();
        st.meta
            .insert_file(&rec("doomed", 902, &doomed), None)
            .unwrap();
        st.meta.commit_file("doomed").unwrap();
        assert!(st.meta.delete_file("doomed", "a", None).unwrap().is_some());
        assert_eq!(
            st.stat(&who, "doomed").unwrap_err().code,
            ErrorCode::NotFound
        );
        assert!(dir.path().join(&doomed).exists());
    }
    let st = open(dir.path());
    assert_eq!(st.stat(&who, "renamed").unwrap().size, 3);
    assert_eq!(
        st.stat(&who, "not-renamed").unwrap_err().code,
        ErrorCode::NotFound
    );
    assert!(
        st.meta
            .files_with_status(FILE_COMMITTING)
            .unwrap()
            .is_empty()
    );
    assert_eq!(fs::read_dir(dir.path().join(TMP)).unwrap().count(), 0);
    assert!(!dir.path().join(file_path(902, 1)).exists());
    assert!(st.meta.files_with_status(FILE_DELETING).unwrap().is_empty());
    let dl = st
        .download(
            &who,
            &DownloadReq {
                file_id: "renamed".into(),
                offset: 0,
                len: 10,
            },
        )
        .unwrap();
    assert!(dl.read == 0 && dl.len == 3 && dl.crc == crc32c::crc32c(b"abc"));
}

fn open_node(dir: &Path, name: &str) -> anyhow::Result<Storage> {
    Storage::open(Config {
        data: dir.to_path_buf(),
        cluster: Some(crate::config::ClusterConfig {
            group: "g1".into(),
            trackers: vec!["127.0.0.1:9".parse().unwrap()],
            advertise: None,
            node_name: Some(name.into()),
        }),
        session_ttl_secs: 60,
        ..Config::default()
    })
}

fn who() -> Who {
    Who {
        app: "a".into(),
        user: "u".into(),
    }
}

/// Stores block `idx` (all bytes `fill`) of a 2-block, 64 KiB-block session.
fn store_block(st: &Storage, id: &UploadId, idx: u32, fill: u8) {
    let data = vec![fill; 65536];
    let m = BlockMeta {
        upload_id: *id,
        index: idx,
        offset: u64::from(idx) * 65536,
        len: 65536,
        crc32c: crc32c::crc32c(&data),
    };
    let BlockStart::Write(mut w) = st.block_begin(&who(), &m).unwrap() else {
        panic!("block {idx} is new");
    };
    w.write(st, &data);
    let r = st.persist_blocks(vec![w.verify().unwrap()]);
    assert_eq!(r, vec![Ok(BlockAck::Written)]);
}

#[test]
fn nodes_share_a_data_dir_and_lock_out_a_standalone_server() {
    let dir = tempfile::tempdir().unwrap();
    let a = open_node(dir.path(), "a").unwrap();
    let _b = open_node(dir.path(), "b").unwrap();
    let twin = open_node(dir.path(), "a").err().unwrap();
    assert!(twin.to_string().contains("already running"), "{twin}");
    let alone = Storage::open(Config {
        data: dir.path().to_path_buf(),
        ..Config::default()
    });
    assert!(alone.err().unwrap().to_string().contains("in use"));
    assert!(
        open_node(dir.path(), "../x").is_err(),
        "names are file names"
    );
    assert!(a.peer_alive("b") && !a.peer_alive("c") && !a.peer_alive(""));
}

/// A node restarting while a peer probes whether it is alive (the probe holds its lock for an
/// instant) starts: only a lock held for good is a running twin.
#[test]
fn a_restart_during_a_peers_liveness_probe_still_starts() {
    let dir = tempfile::tempdir().unwrap();
    drop(open_node(dir.path(), "a").unwrap());
    let b = open_node(dir.path(), "b").unwrap();
    let probe = std::fs::File::open(dir.path().join("nodes").join("a.lock")).unwrap();
    probe.lock().unwrap();
    let release = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        drop(probe);
    });
    let a = open_node(dir.path(), "a").expect("started once the probe let go");
    release.join().unwrap();
    assert!(b.peer_alive("a") && a.peer_alive("b"));
}

/// A session begun on node A is resumed and finished through node B; B's blocks show in
/// A's QUERY; B's start-up leaves A's temp file and committing row alone while A lives, and
/// a later node cleans up after A once it is dead.
#[test]
fn a_peer_resumes_a_session_and_recovery_spares_live_peers() {
    let dir = tempfile::tempdir().unwrap();
    let a = open_node(dir.path(), "a").unwrap();
    let data: Vec<u8> = [vec![1u8; 65536], vec![2u8; 65536]].concat();
    let init = UploadInit {
        size: data.len() as u64,
        block_size: 65536,
        sha256: Sha256::digest(&data).into(),
        name: "f".into(),
    };
    let id = a.init(&who(), &init).unwrap().upload_id;
    store_block(&a, &id, 0, 1);
    // A's work in flight: a small upload's temp file and a committing row.
    fs::write(dir.path().join("tmp/a/small-x.part"), b"x").unwrap();
    let mut committing = rec("a-committing", 950, &file_path(950, 1));
    committing.node = "a".into();
    a.meta.insert_file(&committing, None).unwrap();

    let b = open_node(dir.path(), "b").unwrap();
    assert!(dir.path().join("tmp/a/small-x.part").exists());
    assert_eq!(a.meta.files_with_status(FILE_COMMITTING).unwrap().len(), 1);
    assert_eq!(b.query(&who(), &id).unwrap().count(), 1);
    store_block(&b, &id, 1, 2);
    assert_eq!(a.query(&who(), &id).unwrap().count(), 2, "A sees B's block");
    let fid = b.over(&who(), &id).unwrap();
    // A's stale session answers a repeated OVER with the file B made.
    assert_eq!(a.over(&who(), &id).unwrap(), fid);
    assert_eq!(a.stat(&who(), &fid).unwrap().size, 2 * 65536);

    drop(a); // A dies: its lock is free
    let c = open_node(dir.path(), "c").unwrap();
    assert!(!dir.path().join("tmp/a/small-x.part").exists());
    assert!(
        c.meta
            .files_with_status(FILE_COMMITTING)
            .unwrap()
            .is_empty()
    );
    assert_eq!(c.stat(&who(), &fid).unwrap().size, 2 * 65536);
}

/// Found by the cluster chaos run: node A still holds a session B finished. The same user
/// uploading the same content again through A must get a new session (and so a file of its
/// own), not the finished one, whose OVER would answer the earlier upload's file.
#[test]
fn a_new_upload_never_resumes_a_session_a_peer_finished() {
    let dir = tempfile::tempdir().unwrap();
    let a = open_node(dir.path(), "a").unwrap();
    let b = open_node(dir.path(), "b").unwrap();
    let data: Vec<u8> = [vec![3u8; 65536], vec![4u8; 65536]].concat();
    let init = UploadInit {
        size: data.len() as u64,
        block_size: 65536,
        sha256: Sha256::digest(&data).into(),
        name: "f".into(),
    };
    let first = a.init(&who(), &init).unwrap().upload_id;
    store_block(&a, &first, 0, 3);
    store_block(&b, &first, 1, 4);
    let fid = b.over(&who(), &first).unwrap();
    assert!(
        a.sessions.lock().open.contains_key(&first),
        "A's stale copy"
    );
    let again = a.init(&who(), &init).unwrap();
    assert_ne!(again.upload_id, first, "a finished session was resumed");
    assert!(!a.sessions.lock().open.contains_key(&first));
    // The content is stored already: the new session proves it and gets a file of its own.
    let (off, len) = again
        .challenge
        .expect("content already stored: a challenge");
    let sha: [u8; 32] = Sha256::digest(&data[off as usize..(off + len) as usize]).into();
    let second = a.prove(&who(), &again.upload_id, &sha).unwrap();
    assert_ne!(second, fid);
    assert_eq!(a.stat(&who(), &second).unwrap().size, 2 * 65536);
}

#[test]
fn a_small_upload_key_is_written_by_one_node_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let a = open_node(dir.path(), "a").unwrap();
    let b = open_node(dir.path(), "b").unwrap();
    let body = b"hello".to_vec();
    let meta = UploadMeta {
        key: [5; 16],
        sha256: Sha256::digest(&body).into(),
        name: "h".into(),
    };
    let SmallStart::Write(mut w) = a.small_begin(&who(), meta.clone(), 5).unwrap() else {
        panic!("new key");
    };
    let busy = b.small_begin(&who(), meta.clone(), 5);
    assert_eq!(busy.err().map(|e| e.code), Some(ErrorCode::Busy));
    w.write(&a, &body);
    let id = w.finish(&a).unwrap();
    match b.small_begin(&who(), meta.clone(), 5) {
        Ok(SmallStart::Done(again)) => assert_eq!(again, id),
        _ => panic!("the peer answers the finished key with its file id"),
    }
    // A claim left by a node that died mid-write is taken over; one of a live node is not.
    // (Claims are stored under the key scoped to its app and user.)
    let other = UploadMeta {
        key: [6; 16],
        ..meta
    };
    let key = small::scoped_key(&who(), &other.key);
    assert_eq!(
        a.meta.claim_key("a", "u", &key, "dead").unwrap(),
        Claim::Mine
    );
    assert!(matches!(
        b.small_begin(&who(), other.clone(), 5),
        Ok(SmallStart::Write(_))
    ));
    assert_eq!(a.meta.claim_key("a", "u", &key, "a").unwrap(), Claim::Mine);
    let busy = b.small_begin(&who(), other, 5);
    assert_eq!(busy.err().map(|e| e.code), Some(ErrorCode::Busy));
}

/// Node A's session is idle on A's clock, but B kept it alive in the DB: A must not reap
/// it. Once nobody touched it for a whole TTL of A's clock, A reaps it.
#[test]
fn the_reaper_asks_the_database_before_removing_an_idle_session() {
    let dir = tempfile::tempdir().unwrap();
    let a = open_node(dir.path(), "a").unwrap();
    let init = UploadInit {
        size: 65536,
        block_size: 65536,
        sha256: [0; 32],
        name: "f".into(),
    };
    let id = a.init(&who(), &init).unwrap().upload_id;
    let s = a.sessions.lock().open.get(&id).cloned().unwrap();
    let long_ago = Instant::now().checked_sub(a.cfg.session_ttl() * 2).unwrap();
    s.state.lock().active = long_ago;
    let peer_expiry = s.state.lock().db_expires + 1;
    a.meta.mark_blocks(&[(id, 0, 0)], peer_expiry).unwrap(); // B stored a block
    assert_eq!(a.reap(), 0);
    assert!(a.meta.session(&id).unwrap().is_some());
    assert!(
        !a.idle_out(&s.state.lock()),
        "B's activity counts as activity"
    );
    s.state.lock().active = long_ago;
    assert_eq!(a.reap(), 1);
    assert!(a.meta.session(&id).unwrap().is_none());
    assert!(!dir.path().join(&s.rec.temp_path).exists());
}

/// A session whose node died for good (only in the DB, expired) is removed by a peer.
#[test]
fn a_departed_nodes_expired_session_is_reaped_by_a_peer() {
    let dir = tempfile::tempdir().unwrap();
    let b = open_node(dir.path(), "b").unwrap();
    let temp = "tmp/gone-node/x.part";
    fs::create_dir_all(dir.path().join("tmp/gone-node")).unwrap();
    fs::write(dir.path().join(temp), b"x").unwrap();
    let rec = SessionRec {
        id: [7; 16],
        app: "a".into(),
        user: "u".into(),
        size: 1,
        block_size: 65536,
        blocks: 1,
        sha256: [0; 32],
        name: "x".into(),
        temp_path: temp.into(),
        created: 0,
        expires_ms: now_ms() - 1,
        challenge: None,
    };
    b.meta.insert_session(&rec).unwrap();
    assert_eq!(b.reap(), 0, "adopted first");
    assert_eq!(b.reap(), 1);
    assert!(b.meta.session(&rec.id).unwrap().is_none());
    assert!(!dir.path().join(temp).exists());
}

#[test]
fn new_data_directories_are_made_level_by_level_below_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let deep = dir.path().join("data/001/002/003");
    create_dirs_synced(&deep, dir.path()).unwrap();
    assert!(deep.is_dir());
    create_dirs_synced(&deep, dir.path()).unwrap();
    fs::write(dir.path().join("data/001/file"), b"x").unwrap();
    let blocked = dir.path().join("data/001/file/004");
    assert!(create_dirs_synced(&blocked, dir.path()).is_err());
}

#[test]
fn a_data_dir_is_locked_by_one_server() {
    let dir = tempfile::tempdir().unwrap();
    let _first = open(dir.path());
    let err = Storage::open(Config {
        data: dir.path().to_path_buf(),
        ..Config::default()
    })
    .err()
    .unwrap();
    assert!(err.to_string().contains("in use"), "{err}");
}

#[test]
fn unaligned_ranges_get_a_computed_crc_and_combined_blocks_match() {
    let dir = tempfile::tempdir().unwrap();
    let st = open(dir.path());
    let who = Who {
        app: "a".into(),
        user: "u".into(),
    };
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let meta = UploadMeta {
        key: [1; 16],
        sha256: Sha256::digest(&data).into(),
        name: "n".into(),
    };
    let SmallStart::Write(mut w) = st
        .small_begin(&who, meta.clone(), data.len() as u64)
        .unwrap()
    else {
        panic!("a new key starts a write");
    };
    // While it is being written, a retry with the same key waits.
    let busy = st.small_begin(&who, meta.clone(), data.len() as u64);
    assert_eq!(busy.err().map(|e| e.code), Some(ErrorCode::Busy));
    // Uneven pieces, as the network delivers them.
    for piece in data.chunks(7777) {
        w.write(&st, piece);
    }
    let id = w.finish(&st).unwrap();
    // Once stored, a retry with the same key gets the same file id and writes nothing.
    match st.small_begin(&who, meta, data.len() as u64) {
        Ok(SmallStart::Done(again)) => assert_eq!(again, id),
        _ => panic!("a finished key answers its file id"),
    }
    assert_eq!(
        st.stat(&who, &id).unwrap().crcs.len(),
        1,
        "4 MiB blocks: one"
    );
    for (off, len, read) in [(0, 300_000, 0), (5, 1000, 1000), (199_999, 9, 1)] {
        let req = DownloadReq {
            file_id: id.clone(),
            offset: off,
            len,
        };
        let dl = st.download(&who, &req).unwrap();
        let end = (off + len).min(data.len() as u64) as usize;
        assert_eq!(dl.crc, crc32c::crc32c(&data[off as usize..end]));
        assert_eq!(dl.read, read, "bytes read for the CRC");
    }
    // The one opener: the owner's app reads it; another app's "file" does not exist, and a
    // record whose bytes are gone is an I/O error, never an empty file.
    let (rec, f) = st.open_stored(&who, &id).unwrap();
    assert_eq!(f.metadata().unwrap().len(), rec.size);
    let other = Who {
        app: "b".into(),
        user: "u".into(),
    };
    let code = |w: &Who| st.open_stored(w, &id).err().map(|e| e.code);
    assert_eq!(code(&other), Some(ErrorCode::NotFound));
    fs::remove_file(st.root().join(&rec.path)).unwrap();
    assert_eq!(code(&who), Some(ErrorCode::Io));
}
