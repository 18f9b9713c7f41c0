//! Library tests against an in-process fake server that speaks docs/PROTOCOL.md (one thread per
//! connection, files in memory) and can inject faults: dropped connections mid-block, a corrupt
//! download payload, hard errors after some blocks, a small-file limit. The real-binary tests are
//! in tests/client_e2e.rs.

use crate::{Client, ClientError, Quiet, Settings};
use ferry_common::proto::{self, *};
use ferry_common::token::{Claims, Scope};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

struct Session {
    size: u64,
    bs: u32,
    sha: [u8; 32],
    name: String,
    data: Vec<u8>,
    have: Breakpoint,
}

#[derive(Default)]
struct Store {
    files: HashMap<String, (Vec<u8>, [u8; 32], String, u32)>,
    sessions: HashMap<[u8; 16], Session>,
    next: u32,
}

#[derive(Default)]
struct Faults {
    /// Close the connection instead of storing this many UPLOAD_BLOCKs.
    drop_blocks: AtomicU32,
    /// Flip a byte in this many DOWNLOAD replies.
    corrupt_downloads: AtomicU32,
    /// After this many stored blocks / served ranges, answer NoSpace / Range (hard errors).
    fail_after: AtomicU32,
    failing: AtomicBool,
    /// Small-file uploads larger than this get Limit.
    small_limit: AtomicU32,
    blocks_written: AtomicU32,
    ranges_served: AtomicU32,
    /// Answer this many HELLOs with error 19, like a proxy whose server is restarting.
    upstream_down_hellos: AtomicU32,
    /// Answer this many HELLOs with error 23, like a routing proxy whose user's group is down.
    no_node_hellos: AtomicU32,
    /// The credential of every HELLO received.
    tokens: Mutex<Vec<Vec<u8>>>,
}

struct Fake {
    addr: SocketAddr,
    faults: Arc<Faults>,
}

fn reply(s: &mut TcpStream, body: &[u8]) {
    let _ = s.write_all(&frame(cmd::REPLY_STORAGE, status::OK, body));
}

fn error(s: &mut TcpStream, code: ErrorCode, text: &str) {
    let _ = s.write_all(&ErrorBody::new(code, text).frame(cmd::REPLY_STORAGE));
}

impl Fake {
    fn start() -> Fake {
        Fake::start_on(TcpListener::bind("127.0.0.1:0").unwrap())
    }

    fn start_on(l: TcpListener) -> Fake {
        let addr = l.local_addr().unwrap();
        let store = Arc::new(Mutex::new(Store::default()));
        let faults = Arc::new(Faults {
            fail_after: AtomicU32::new(u32::MAX),
            small_limit: AtomicU32::new(u32::MAX),
            ..Default::default()
        });
        let (st, fa) = (store.clone(), faults.clone());
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { continue };
                let (st, fa) = (st.clone(), fa.clone());
                std::thread::spawn(move || serve(c, &st, &fa));
            }
        });
        Fake { addr, faults }
    }
}

fn serve(mut s: TcpStream, store: &Mutex<Store>, f: &Faults) {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    loop {
        let mut h = [0u8; HEADER_LEN];
        if s.read_exact(&mut h).is_err() {
            return;
        }
        let h = Header::decode(&h);
        assert!(h.body_len <= 64 << 20);
        if h.cmd == cmd::UPLOAD_BLOCK
            && f.drop_blocks
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            // Read part of the block, then vanish like a killed proxy.
            let mut part = vec![0u8; (h.body_len / 2) as usize];
            let _ = s.read_exact(&mut part);
            return;
        }
        let mut b = vec![0u8; h.body_len as usize];
        if s.read_exact(&mut b).is_err() {
            return;
        }
        let mut st = store.lock();
        match h.cmd {
            cmd::HELLO
                if f.upstream_down_hellos
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok() =>
            {
                error(&mut s, ErrorCode::Upstream, "no upstream could be reached");
                return;
            }
            cmd::HELLO
                if f.no_node_hellos
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok() =>
            {
                error(&mut s, ErrorCode::NoNode, "group g2 has no online node");
                return;
            }
            cmd::HELLO => {
                f.tokens.lock().push(Hello::decode(&b).unwrap().credential);
                reply(
                    &mut s,
                    &Identity {
                        version: VERSION,
                        role: Role::Server,
                    }
                    .encode(),
                );
            }
            cmd::UPLOAD => {
                let m = UploadMeta::decode(&b[..UPLOAD_META]).unwrap();
                let data = b[UPLOAD_META..].to_vec();
                if data.len() as u64 > u64::from(f.small_limit.load(Ordering::SeqCst)) {
                    error(&mut s, ErrorCode::Limit, "small file limit");
                    continue;
                }
                if crate::files::sha256(&data) != m.sha256 {
                    error(&mut s, ErrorCode::HashMismatch, "sha");
                    continue;
                }
                st.next += 1;
                let id = format!("g1/{:06}", st.next);
                st.files
                    .insert(id.clone(), (data, m.sha256, m.name, 4 << 20));
                reply(&mut s, &encode_file_id(&id).unwrap());
            }
            cmd::STAT | cmd::DELETE | cmd::DOWNLOAD_OVER => {
                let id = decode_file_id(&b).unwrap();
                let Some((data, sha, name, bs)) = st.files.get(&id).cloned() else {
                    error(&mut s, ErrorCode::NotFound, "no such file");
                    continue;
                };
                match h.cmd {
                    cmd::STAT => {
                        let r = StatReply {
                            size: data.len() as u64,
                            sha256: sha,
                            created: 1_700_000_000,
                            block_size: bs,
                            name,
                        };
                        reply(&mut s, &r.encode().unwrap());
                    }
                    cmd::DELETE => {
                        st.files.remove(&id);
                        reply(&mut s, &[]);
                    }
                    _ => reply(&mut s, &[]),
                }
            }
            cmd::DOWNLOAD => {
                let r = DownloadReq::decode(&b).unwrap();
                let Some((data, ..)) = st.files.get(&r.file_id) else {
                    error(&mut s, ErrorCode::NotFound, "no such file");
                    continue;
                };
                if f.ranges_served.fetch_add(1, Ordering::SeqCst)
                    >= f.fail_after.load(Ordering::SeqCst)
                {
                    error(&mut s, ErrorCode::Range, "injected failure");
                    continue;
                }
                let end = (r.offset + r.len).min(data.len() as u64) as usize;
                let mut payload = data[r.offset as usize..end].to_vec();
                let crc = crc32c::crc32c(&payload);
                if !payload.is_empty()
                    && f.corrupt_downloads
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok()
                {
                    payload[0] ^= 0xff;
                }
                let mut out = data_frame_head(
                    cmd::REPLY_STORAGE,
                    0,
                    &crc.to_be_bytes(),
                    payload.len() as u64,
                );
                out.extend_from_slice(&payload);
                let _ = s.write_all(&out);
            }
            cmd::UPLOAD_INIT => {
                let i = UploadInit::decode(&b).unwrap();
                let n = i.blocks().unwrap();
                let existing = st
                    .sessions
                    .iter()
                    .find(|(_, v)| v.size == i.size && v.bs == i.block_size && v.sha == i.sha256)
                    .map(|(k, _)| *k);
                let id = existing.unwrap_or_else(|| {
                    let id: [u8; 16] = rand::random();
                    st.sessions.insert(
                        id,
                        Session {
                            size: i.size,
                            bs: i.block_size,
                            sha: i.sha256,
                            name: i.name.clone(),
                            data: vec![0; i.size as usize],
                            have: Breakpoint::new(n),
                        },
                    );
                    id
                });
                let dup = st.files.values().any(|v| v.1 == i.sha256);
                let r = UploadInitReply {
                    upload_id: id,
                    block_size: i.block_size,
                    blocks: n,
                    challenge: dup.then_some((1, i.size.min(100) - 1)),
                };
                reply(&mut s, &r.encode());
            }
            cmd::UPLOAD_QUERY => match st.sessions.get(&decode_upload_id(&b).unwrap()) {
                Some(se) => reply(&mut s, &se.have.encode()),
                None => error(&mut s, ErrorCode::UnknownUpload, "no session"),
            },
            cmd::UPLOAD_BLOCK => {
                let m = BlockMeta::decode(&b[..BLOCK_META], (b.len() - BLOCK_META) as u64).unwrap();
                let payload = &b[BLOCK_META..];
                if f.blocks_written.load(Ordering::SeqCst) >= f.fail_after.load(Ordering::SeqCst) {
                    f.failing.store(true, Ordering::SeqCst);
                    error(&mut s, ErrorCode::NoSpace, "injected failure");
                    continue;
                }
                let Some(se) = st.sessions.get_mut(&m.upload_id) else {
                    error(&mut s, ErrorCode::UnknownUpload, "no session");
                    continue;
                };
                assert_eq!(m.offset, u64::from(m.index) * u64::from(se.bs));
                if crc32c::crc32c(payload) != m.crc32c {
                    error(&mut s, ErrorCode::Crc, "crc");
                    continue;
                }
                if se.have.has(m.index) {
                    reply(&mut s, &[1]);
                    continue;
                }
                se.data[m.offset as usize..m.offset as usize + payload.len()]
                    .copy_from_slice(payload);
                se.have.set(m.index);
                f.blocks_written.fetch_add(1, Ordering::SeqCst);
                reply(&mut s, &[0]);
            }
            cmd::UPLOAD_OVER | cmd::UPLOAD_PROVE => {
                let uid: [u8; 16] = b[..16].try_into().unwrap();
                let Some(se) = st.sessions.get(&uid) else {
                    error(&mut s, ErrorCode::UnknownUpload, "no session");
                    continue;
                };
                if h.cmd == cmd::UPLOAD_PROVE {
                    let p = Prove::decode(&b).unwrap();
                    let Some((data, ..)) = st.files.values().find(|v| v.1 == se.sha) else {
                        error(&mut s, ErrorCode::ProofFailed, "nothing to prove");
                        continue;
                    };
                    if crate::files::sha256(&data[1..(se.size.min(100) as usize)]) != p.sha256 {
                        error(&mut s, ErrorCode::ProofFailed, "wrong proof");
                        continue;
                    }
                } else if se.have.count() != se.have.blocks {
                    error(&mut s, ErrorCode::Incomplete, "missing blocks");
                    continue;
                } else if crate::files::sha256(&se.data) != se.sha {
                    error(&mut s, ErrorCode::HashMismatch, "sha");
                    continue;
                }
                let se = st.sessions.remove(&uid).unwrap();
                st.next += 1;
                let id = format!("g1/{:06}", st.next);
                let data = if h.cmd == cmd::UPLOAD_PROVE {
                    st.files.values().find(|v| v.1 == se.sha).unwrap().0.clone()
                } else {
                    se.data
                };
                st.files.insert(id.clone(), (data, se.sha, se.name, se.bs));
                reply(&mut s, &encode_file_id(&id).unwrap());
            }
            _ => error(&mut s, ErrorCode::UnknownCommand, "?"),
        }
    }
}

fn data(size: usize, seed: u8) -> Vec<u8> {
    let mut x = u32::from(seed).wrapping_mul(2_654_435_761) | 1;
    (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

const BS: u32 = 64 * 1024;

fn test_key() -> ferry_common::auth::SigningKey {
    ferry_common::auth::SigningKey {
        id: "k1".into(),
        secret: ferry_common::auth::new_secret(),
    }
}

fn client_for(addrs: Vec<SocketAddr>, state: &Path) -> Client {
    let mut s = Settings::direct(addrs, state.to_owned(), test_key());
    s.block_size = BS;
    s.timeout = Duration::from_millis(500);
    s.outage_window = Duration::from_millis(1500);
    Client::new(s).unwrap()
}

fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

#[test]
fn round_trips_of_edge_sizes() {
    let fake = Fake::start();
    let dir = tempfile::tempdir().unwrap();
    let c = client_for(vec![fake.addr], &dir.path().join("state"));
    let bs = BS as usize;
    for (k, size) in [0, 1, bs - 1, bs, bs + 1, 7 * bs + 3]
        .into_iter()
        .enumerate()
    {
        let src = dir.path().join(format!("src{k}"));
        let bytes = data(size, k as u8);
        std::fs::write(&src, &bytes).unwrap();
        let up = c.upload(&src, None, None, &Quiet).unwrap();
        assert_eq!(up.bytes, size as u64);
        assert_eq!(up.blocks_resent, 0);
        let expect_blocks = if size <= bs {
            1
        } else {
            size.div_ceil(bs) as u32
        };
        assert_eq!(up.blocks_total, expect_blocks, "size {size}");
        assert_eq!(up.blocks_sent, expect_blocks, "size {size}");
        let info = c.stat(&up.file_id).unwrap();
        assert_eq!(info.size, size as u64);
        assert_eq!(info.sha256, hex::encode(crate::files::sha256(&bytes)));
        assert_eq!(info.name, format!("src{k}"));
        let out = dir.path().join(format!("out{k}"));
        let down = c.download(&up.file_id, &out, Some(3), &Quiet).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), bytes, "size {size}");
        assert_eq!(down.blocks_resent, 0);
        assert!(!dir.path().join(format!("out{k}.part")).exists());
        assert!(!dir.path().join(format!("out{k}.part.ferry")).exists());
        c.delete(&up.file_id, false).unwrap();
        assert_eq!(
            c.stat(&up.file_id).unwrap_err().code(),
            Some(ErrorCode::NotFound)
        );
    }
    // Finished uploads leave no state behind.
    let left = std::fs::read_dir(dir.path().join("state")).unwrap().count();
    assert_eq!(left, 0);
    // Every connection opened with its own token (servers refuse a nonce twice), naming the
    // settings' app and user, with the scope of what it was for.
    let tokens = fake.faults.tokens.lock();
    let claims: Vec<Claims> = tokens.iter().map(|t| Claims::parse(t).unwrap().0).collect();
    let nonces: std::collections::HashSet<_> = claims.iter().map(|c| c.nonce).collect();
    assert_eq!(nonces.len(), claims.len(), "a token was reused");
    assert!(claims.len() > 12, "{} sessions", claims.len());
    assert!(
        claims
            .iter()
            .all(|c| c.app == "ferry" && c.user == "anonymous")
    );
    let scopes: std::collections::BTreeSet<u8> = claims.iter().map(|c| c.scope.0).collect();
    let (r, w, d) = (Scope::READ.0, Scope::WRITE.0, Scope::DELETE.0);
    assert_eq!(
        scopes,
        [r, w, d].into_iter().collect(),
        "read, upload, delete"
    );
}

#[test]
fn first_proxy_down_goes_through_the_second() {
    let fake = Fake::start();
    let dir = tempfile::tempdir().unwrap();
    let c = client_for(vec![dead_addr(), fake.addr], &dir.path().join("state"));
    let src = dir.path().join("src");
    std::fs::write(&src, data(5 * BS as usize, 1)).unwrap();
    let up = c.upload(&src, Some(2), None, &Quiet).unwrap();
    assert!(up.failovers >= 1, "{up:?}");
    let out = dir.path().join("out");
    c.download(&up.file_id, &out, None, &Quiet).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&src).unwrap());
}

#[test]
fn all_proxies_down_fails_clearly_once_the_outage_window_ends() {
    let dir = tempfile::tempdir().unwrap();
    let c = client_for(vec![dead_addr(), dead_addr()], &dir.path().join("state"));
    let src = dir.path().join("src");
    std::fs::write(&src, b"hello").unwrap();
    let t = Instant::now();
    let e = c.upload(&src, None, None, &Quiet).unwrap_err();
    let took = t.elapsed();
    assert!(
        (Duration::from_millis(1500)..Duration::from_secs(6)).contains(&took),
        "{took:?}"
    );
    assert!(
        matches!(e, ClientError::Unreachable { attempts, .. } if attempts >= 6),
        "{e}"
    );
    assert!(e.to_string().contains("refused"), "{e}");
}

#[test]
fn proxies_down_at_the_same_moment_are_ridden_out_within_the_outage_window() {
    // Both proxies of the list refuse connections for 4 s (one killed, the other restarting):
    // longer than tries x proxies attempts last (6, about 2.3 s of backoff at most), but
    // inside the outage window, so the transfer finishes once one of them is back.
    let (a, b) = (dead_addr(), dead_addr());
    let dir = tempfile::tempdir().unwrap();
    let mut s = Settings::direct(vec![a, b], dir.path().join("state"), test_key());
    s.block_size = BS;
    s.timeout = Duration::from_millis(500);
    s.outage_window = Duration::from_secs(20);
    let c = Client::new(s).unwrap();
    let src = dir.path().join("src");
    std::fs::write(&src, data(3 * BS as usize, 5)).unwrap();
    let back = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(4));
        Fake::start_on(TcpListener::bind(b).unwrap())
    });
    let t = Instant::now();
    let up = c.upload(&src, Some(2), None, &Quiet).unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(3900),
        "{:?}",
        t.elapsed()
    );
    assert!(up.retries >= 6, "more attempts than the list gets: {up:?}");
    let _fake = back.join().unwrap();
    let out = dir.path().join("out");
    c.download(&up.file_id, &out, None, &Quiet).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&src).unwrap());
}

#[test]
fn a_server_restart_behind_the_proxies_is_waited_out() {
    // Both proxies answer "no upstream" for more attempts than a request normally gets: they
    // are alive, so the client keeps trying within its retry window instead of giving up.
    let fake = Fake::start();
    let hellos_refused = 10;
    fake.faults
        .upstream_down_hellos
        .store(hellos_refused, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let mut s = Settings::direct(
        vec![fake.addr, fake.addr],
        dir.path().join("state"),
        test_key(),
    );
    s.timeout = Duration::from_secs(2);
    s.outage_window = Duration::from_secs(6); // 10 refusals take about 3 s
    let c = Client::new(s).unwrap();
    let src = dir.path().join("src");
    std::fs::write(&src, b"hello").unwrap();
    let up = c.upload(&src, None, None, &Quiet).unwrap();
    assert!(up.retries >= u64::from(hellos_refused), "{up:?}");
    assert_eq!(fake.faults.upstream_down_hellos.load(Ordering::SeqCst), 0);
}

#[test]
fn a_group_without_nodes_is_waited_out_then_reported_by_name() {
    // A routing proxy answers "no node" a few times (the group's nodes restarting): the request
    // keeps trying within its window and succeeds.
    let fake = Fake::start();
    fake.faults.no_node_hellos.store(6, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let mut s = Settings::direct(
        vec![fake.addr, fake.addr],
        dir.path().join("state"),
        test_key(),
    );
    s.timeout = Duration::from_secs(2);
    s.outage_window = Duration::from_secs(6);
    let c = Client::new(s).unwrap();
    let src = dir.path().join("src");
    std::fs::write(&src, b"hello").unwrap();
    let up = c.upload(&src, None, None, &Quiet).unwrap();
    assert!(up.retries >= 6, "{up:?}");
    assert_eq!(fake.faults.no_node_hellos.load(Ordering::SeqCst), 0);
    // The group never comes back: the request ends after its outage window (1.5 s), not in a
    // hang, with the proxy's error naming the group.
    fake.faults.no_node_hellos.store(u32::MAX, Ordering::SeqCst);
    let c = client_for(vec![fake.addr, fake.addr], &dir.path().join("state"));
    let t = Instant::now();
    let e = c.stat("g2/000000000001").unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
    assert!(
        t.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(e.code(), Some(ErrorCode::NoNode), "{e}");
    assert!(e.to_string().contains("group g2 has no online node"), "{e}");
}

#[test]
fn a_hung_proxy_is_left_after_the_timeout() {
    let fake = Fake::start();
    // Accepts connections (the kernel does) but never answers, like a SIGSTOPped process.
    let hung = TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c = client_for(
        vec![hung.local_addr().unwrap(), fake.addr],
        &dir.path().join("state"),
    );
    let src = dir.path().join("src");
    std::fs::write(&src, data(3 * BS as usize, 2)).unwrap();
    let t = Instant::now();
    let up = c.upload(&src, Some(2), None, &Quiet).unwrap();
    assert!(up.failovers >= 1);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    drop(hung);
}

#[test]
fn dropped_connections_lose_only_their_block() {
    let fake = Fake::start();
    fake.faults.drop_blocks.store(3, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let c = client_for(vec![fake.addr], &dir.path().join("state"));
    let src = dir.path().join("src");
    std::fs::write(&src, data(10 * BS as usize + 5, 3)).unwrap();
    let up = c.upload(&src, Some(4), None, &Quiet).unwrap();
    assert!((1..=3).contains(&up.blocks_resent), "{up:?}");
    assert_eq!(up.blocks_sent, 11);
    assert_eq!(fake.faults.blocks_written.load(Ordering::SeqCst), 11);
    fake.faults.corrupt_downloads.store(2, Ordering::SeqCst);
    let out = dir.path().join("out");
    let down = c.download(&up.file_id, &out, Some(4), &Quiet).unwrap();
    assert_eq!(down.blocks_resent, 2, "{down:?}");
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&src).unwrap());
}

#[test]
fn interrupted_upload_resumes_and_resends_little() {
    let fake = Fake::start();
    fake.faults.fail_after.store(5, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let c = client_for(vec![fake.addr], &state);
    let src = dir.path().join("src");
    std::fs::write(&src, data(20 * BS as usize, 4)).unwrap();
    let e = c.upload(&src, Some(2), None, &Quiet).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NoSpace), "{e}");
    assert_eq!(std::fs::read_dir(&state).unwrap().count(), 1, "state kept");
    fake.faults.fail_after.store(u32::MAX, Ordering::SeqCst);
    let up = c.upload(&src, Some(2), None, &Quiet).unwrap();
    assert!(up.resumed);
    assert_eq!(up.blocks_skipped, 5, "{up:?}");
    assert_eq!(up.blocks_sent, 15);
    assert!(up.blocks_resent >= 1 && up.blocks_resent <= 2, "{up:?}");
    assert_eq!(
        std::fs::read_dir(&state).unwrap().count(),
        0,
        "state removed"
    );
    let out = dir.path().join("out");
    c.download(&up.file_id, &out, None, &Quiet).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&src).unwrap());
}

#[test]
fn interrupted_download_resumes_from_the_part_file() {
    let fake = Fake::start();
    let dir = tempfile::tempdir().unwrap();
    let c = client_for(vec![fake.addr], &dir.path().join("state"));
    let src = dir.path().join("src");
    std::fs::write(&src, data(12 * BS as usize + 9, 5)).unwrap();
    let up = c.upload(&src, None, None, &Quiet).unwrap();
    let out = dir.path().join("out");
    fake.faults.ranges_served.store(0, Ordering::SeqCst);
    fake.faults.fail_after.store(4, Ordering::SeqCst);
    let e = c.download(&up.file_id, &out, Some(1), &Quiet).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Range), "{e}");
    assert!(!out.exists(), "no output left as if complete");
    assert!(dir.path().join("out.part").exists());
    assert!(dir.path().join("out.part.ferry").exists());
    fake.faults.fail_after.store(u32::MAX, Ordering::SeqCst);
    let down = c.download(&up.file_id, &out, Some(3), &Quiet).unwrap();
    assert!(down.resumed);
    assert_eq!(down.blocks_skipped, 4, "{down:?}");
    assert_eq!(down.blocks_sent, 9);
    assert_eq!(down.blocks_resent, 1, "the block that failed was begun");
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&src).unwrap());
    assert!(!dir.path().join("out.part").exists());
    assert!(!dir.path().join("out.part.ferry").exists());
}

#[test]
fn small_file_limit_falls_back_to_blocks_and_instant_upload_dedupes() {
    let fake = Fake::start();
    fake.faults.small_limit.store(1000, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let c = client_for(vec![fake.addr], &dir.path().join("state"));
    let src = dir.path().join("src");
    let bytes = data(BS as usize - 10, 6);
    std::fs::write(&src, &bytes).unwrap();
    let up = c.upload(&src, None, None, &Quiet).unwrap();
    assert!(!up.instant);
    assert_eq!(up.blocks_total, 1);
    let again = dir.path().join("again");
    std::fs::write(&again, &bytes).unwrap();
    let dup = c.upload(&again, None, None, &Quiet).unwrap();
    assert!(dup.instant, "{dup:?}");
    assert_ne!(dup.file_id, up.file_id);
    let out = dir.path().join("out");
    c.download(&dup.file_id, &out, None, &Quiet).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), bytes);
}

#[test]
fn bad_input_is_refused_before_sending() {
    let fake = Fake::start();
    let dir = tempfile::tempdir().unwrap();
    let c = client_for(vec![fake.addr], &dir.path().join("state"));
    let e = c
        .upload(&dir.path().join("nope"), None, None, &Quiet)
        .unwrap_err();
    assert!(
        matches!(&e, ClientError::Input(m) if m.contains("No such file")),
        "{e}"
    );
    let e = c.upload(dir.path(), None, None, &Quiet).unwrap_err();
    assert!(e.to_string().contains("directory"), "{e}");
    let e = c
        .download(
            "g1/000001",
            &dir.path().join("no/such/dir/out"),
            None,
            &Quiet,
        )
        .unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
    let e = c
        .download("g1/999999", &dir.path().join("out"), None, &Quiet)
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound), "{e}");
    assert!(!dir.path().join("out").exists() && !dir.path().join("out.part").exists());
    let e = c.stat(&"x".repeat(200)).unwrap_err();
    assert!(e.to_string().contains("bad file id"), "{e}");
    assert!(
        c.upload(&dir.path().join("nope"), Some(0), None, &Quiet)
            .is_err()
    );
    let _ = proto::VERSION;
}

/// `Client::renew_token` swaps the delegated token every later connection sends (transfers in
/// flight share it); it takes only a delegated token of the same app and user, and a client
/// signing with the app key has none to renew.
#[test]
fn a_renewed_token_is_what_later_connections_send() {
    let key = test_key();
    let mint = |user: &str| {
        key.delegate("ferry", user, Scope::ALL, 60, Default::default())
            .unwrap()
    };
    let (first, second) = (mint("anonymous"), mint("anonymous"));
    let dir = tempfile::tempdir().unwrap();
    let mut s = Settings::direct(vec![dead_addr()], dir.path().to_owned(), key.clone());
    s.key = None;
    s.token = Some(first.clone());
    let c = Client::new(s).unwrap();
    let sent = |c: &Client| Hello::decode(&c.creds.hello(Scope::READ, None).unwrap()).unwrap();
    assert_eq!(sent(&c).credential, first);
    c.renew_token(second.clone()).unwrap();
    assert_eq!(sent(&c).credential, second);
    // Another user's token, a connection token: refused, the current one kept.
    let e = c.renew_token(mint("mallory")).unwrap_err().to_string();
    assert!(e.contains("mallory"), "{e}");
    let single = key.mint("ferry", "anonymous", Scope::ALL, 60).unwrap();
    assert!(c.renew_token(single).is_err());
    assert_eq!(sent(&c).credential, second);
    let with_key = client_for(vec![dead_addr()], dir.path());
    assert!(with_key.renew_token(second).is_err());
}
