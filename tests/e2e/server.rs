//! End-to-end tests of `ferry-server`: the real binary on a free loopback port, driven by a
//! small blocking client written here against docs/PROTOCOL.md.

use crate::support;

use ferry_common::proto::{
    self, BlockAck, BlockMeta, Breakpoint, DownloadReq, ErrorCode, Prove, StatReply, UploadInit,
    UploadInitReply, UploadMeta, cmd,
};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use support::random_bytes as bytes;
use support::raw::Raw;
use support::server::Server;

type Res<T> = Result<T, (ErrorCode, String)>;

fn sha(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// A blocking protocol client, just enough for the tests: the support's raw client with the
/// requests these tests make.
struct Client {
    raw: Raw,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        Client {
            raw: Raw::connect(addr),
        }
    }

    /// On a socket set up by the test (buffer sizes, timeouts).
    fn on(s: TcpStream) -> Client {
        let peer = s.peer_addr().unwrap();
        Client {
            raw: Raw::over(s, peer),
        }
    }

    fn hello(addr: SocketAddr, app: &str, user: &str) -> Client {
        let mut c = Client::connect(addr);
        let body = support::auth::hello_body(app, user);
        let r = c.call(cmd::HELLO, &body).expect("HELLO accepted");
        assert_eq!(r, vec![0, 1, 2], "identity: version 1, role server");
        c
    }

    /// The socket, for bytes no request builder would write.
    fn s(&self) -> &TcpStream {
        self.raw.stream()
    }

    fn send(&mut self, c: u8, body: &[u8]) {
        assert!(self.raw.send(c, body), "send {}", cmd::name(c));
    }

    fn result(&mut self) -> Res<Vec<u8>> {
        self.raw.recv().result()
    }

    fn call(&mut self, c: u8, body: &[u8]) -> Res<Vec<u8>> {
        self.send(c, body);
        self.result()
    }

    /// True once the server has closed the connection (EOF or reset within the timeout).
    fn closed(&mut self) -> bool {
        self.raw.closed()
    }

    fn upload_small(&mut self, name: &str, data: &[u8]) -> Res<String> {
        self.upload_small_claiming(name, data, sha(data))
    }

    fn upload_small_claiming(&mut self, name: &str, data: &[u8], h: [u8; 32]) -> Res<String> {
        self.upload_small_keyed(name, data, h, rand::random())
    }

    fn upload_small_keyed(
        &mut self,
        name: &str,
        data: &[u8],
        h: [u8; 32],
        key: [u8; 16],
    ) -> Res<String> {
        let meta = UploadMeta {
            key,
            sha256: h,
            name: name.into(),
        }
        .encode()
        .unwrap();
        let mut f = proto::data_frame_head(cmd::UPLOAD, 0, &meta, data.len() as u64);
        f.extend_from_slice(data);
        self.s().write_all(&f).unwrap();
        self.result().map(|b| proto::decode_file_id(&b).unwrap())
    }

    fn init(&mut self, size: u64, bs: u32, h: [u8; 32], name: &str) -> Res<UploadInitReply> {
        let body = UploadInit {
            size,
            block_size: bs,
            sha256: h,
            name: name.into(),
        }
        .encode()
        .unwrap();
        self.call(cmd::UPLOAD_INIT, &body)
            .map(|b| UploadInitReply::decode(&b).unwrap())
    }

    fn block_raw(&mut self, m: BlockMeta, data: &[u8]) -> Res<BlockAck> {
        let mut f = proto::data_frame_head(cmd::UPLOAD_BLOCK, 0, &m.encode(), data.len() as u64);
        f.extend_from_slice(data);
        self.s().write_all(&f).unwrap();
        self.result().map(|b| BlockAck::decode(&b).unwrap())
    }

    fn block(&mut self, id: [u8; 16], bs: u32, idx: u32, file: &[u8]) -> Res<BlockAck> {
        let (off, data) = block_of(file, bs, idx);
        let m = BlockMeta {
            upload_id: id,
            index: idx,
            offset: off,
            len: data.len() as u32,
            crc32c: crc32c::crc32c(data),
        };
        self.block_raw(m, data)
    }

    fn query(&mut self, id: [u8; 16]) -> Res<Breakpoint> {
        self.call(cmd::UPLOAD_QUERY, &id)
            .map(|b| Breakpoint::decode(&b).unwrap())
    }

    fn over(&mut self, id: [u8; 16]) -> Res<String> {
        self.call(cmd::UPLOAD_OVER, &id)
            .map(|b| proto::decode_file_id(&b).unwrap())
    }

    fn prove(&mut self, id: [u8; 16], h: [u8; 32]) -> Res<String> {
        let body = Prove {
            upload_id: id,
            sha256: h,
        }
        .encode();
        self.call(cmd::UPLOAD_PROVE, &body)
            .map(|b| proto::decode_file_id(&b).unwrap())
    }

    fn stat(&mut self, id: &str) -> Res<StatReply> {
        self.call(cmd::STAT, &proto::encode_file_id(id).unwrap())
            .map(|b| StatReply::decode(&b).unwrap())
    }

    /// Returns the CRC from the reply meta and the payload, after checking they agree.
    fn download(&mut self, id: &str, offset: u64, len: u64) -> Res<(u32, Vec<u8>)> {
        let body = DownloadReq {
            file_id: id.into(),
            offset,
            len,
        }
        .encode()
        .unwrap();
        let b = self.call(cmd::DOWNLOAD, &body)?;
        let crc = proto::decode_download_meta(&b[..4]).unwrap();
        let data = b[4..].to_vec();
        assert_eq!(
            crc,
            crc32c::crc32c(&data),
            "download meta CRC matches the bytes"
        );
        Ok((crc, data))
    }

    fn download_all(&mut self, id: &str, size: u64, piece: u64) -> Vec<u8> {
        let mut out = Vec::new();
        while (out.len() as u64) < size {
            let (_, d) = self.download(id, out.len() as u64, piece).unwrap();
            assert!(!d.is_empty());
            out.extend_from_slice(&d);
        }
        out
    }

    fn delete(&mut self, id: &str) -> Res<Vec<u8>> {
        self.call(cmd::DELETE, &proto::encode_file_id(id).unwrap())
    }
}

fn block_of(file: &[u8], bs: u32, idx: u32) -> (u64, &[u8]) {
    let off = idx as usize * bs as usize;
    let end = (off + bs as usize).min(file.len());
    (off as u64, &file[off..end])
}

fn code(r: Res<impl std::fmt::Debug>) -> ErrorCode {
    match r {
        Err((c, _)) => c,
        Ok(v) => panic!("expected an error, got {v:?}"),
    }
}

/// A `ferry-server` over `data` with these tests' defaults (64 KiB blocks, 256 KiB small
/// files, 3 workers) unless `extra` sets them.
fn start(dir: &Path, data: &Path, extra: &str) -> Server {
    Server::start_in(dir, data, &test_conf(extra))
}

/// The same, in a process that may hold at most `nofile` descriptors (prlimit).
fn start_limited(dir: &Path, data: &Path, extra: &str, nofile: u64) -> Server {
    let mut prlimit = Command::new("prlimit");
    prlimit
        .arg(format!("--nofile={nofile}:{nofile}"))
        .arg(support::bin("ferry-server"));
    Server::start_under(prlimit, dir, data, &test_conf(extra))
}

fn test_conf(extra: &str) -> String {
    // Test defaults, unless `extra` sets the key itself (TOML refuses duplicate keys).
    let mut text: String = [
        "block_size = 65536",
        "small_file_max = 262144",
        "workers = 3",
    ]
    .iter()
    .filter(|l| !extra.contains(l.split(' ').next().unwrap_or_default()))
    .map(|l| format!("{l}\n"))
    .collect();
    text.push_str(extra);
    text
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ferry-server-e2e")
        .tempdir()
        .unwrap()
}

#[test]
fn small_files_stat_download_delete() {
    let dir = tempdir();
    let srv = start(dir.path(), &dir.path().join("data"), "");
    let mut c = Client::hello(srv.addr, "demo", "alice");
    let data = bytes(200_000, 1);
    let id = c.upload_small("photo.jpg", &data).unwrap();
    let id2 = c.upload_small("photo.jpg", &data).unwrap();
    assert_ne!(id, id2, "every upload gets its own id");
    // A retry of an upload whose reply was lost (same key) is answered with the same id and
    // stores nothing new; another user with the same key is a different upload.
    let key = [9u8; 16];
    let k1 = c
        .upload_small_keyed("again.jpg", &data, sha(&data), key)
        .unwrap();
    let k2 = c
        .upload_small_keyed("again.jpg", &data, sha(&data), key)
        .unwrap();
    assert_eq!(k1, k2, "same key, same file");
    let mut other = Client::hello(srv.addr, "demo", "zed");
    let k3 = other
        .upload_small_keyed("again.jpg", &data, sha(&data), key)
        .unwrap();
    assert_ne!(k1, k3);
    let stored = |d: &Path| support::count_files(&d.join("data"));
    assert_eq!(
        stored(&srv.data),
        4,
        "two uploads, one retry, one other user"
    );

    let st = c.stat(&id).unwrap();
    assert_eq!(st.size, data.len() as u64);
    assert_eq!(st.sha256, sha(&data));
    assert_eq!(st.block_size, 65536);
    assert_eq!(st.name, "photo.jpg");

    // Aligned blocks (CRC from the stored table), the short last block, unaligned ranges.
    let (crc, b) = c.download(&id, 65536, 65536).unwrap();
    assert_eq!(b, &data[65536..131072]);
    assert_eq!(crc, crc32c::crc32c(&data[65536..131072]));
    let (_, b) = c.download(&id, 0, 131072).unwrap();
    assert_eq!(b, &data[..131072]);
    let (_, b) = c.download(&id, 196608, 65536).unwrap();
    assert_eq!(b, &data[196608..], "clamped to the end of the file");
    let (_, b) = c.download(&id, 1000, 5000).unwrap();
    assert_eq!(b, &data[1000..6000]);
    assert_eq!(c.download_all(&id, data.len() as u64, 70_000), data);
    let (_, b) = c.download(&id, data.len() as u64, 10).unwrap();
    assert!(b.is_empty(), "a range starting at the end is empty");
    // Download past the end.
    assert_eq!(
        code(c.download(&id, data.len() as u64 + 1, 10)),
        ErrorCode::Range
    );
    // Empty file.
    let empty = c.upload_small("empty", &[]).unwrap();
    assert_eq!(c.stat(&empty).unwrap().size, 0);
    assert!(c.download(&empty, 0, 100).unwrap().1.is_empty());

    // Too big for one frame: 17, and the session goes on (the payload was drained).
    assert_eq!(
        code(c.upload_small("big", &bytes(300_000, 2))),
        ErrorCode::Limit
    );
    // Bytes that do not match the announced SHA-256.
    assert_eq!(
        code(c.upload_small_claiming("x", &data[..1000], [9; 32])),
        ErrorCode::HashMismatch
    );
    assert!(
        srv.temp_files().is_empty(),
        "refused uploads leave no temp file"
    );

    // Another app does not see the file.
    let mut other = Client::hello(srv.addr, "otherapp", "alice");
    assert_eq!(code(other.stat(&id)), ErrorCode::NotFound);
    assert_eq!(code(other.delete(&id)), ErrorCode::NotFound);
    // Another user of the app reads it (the id is the capability) but may not delete it: error
    // 25 naming the rule, the session goes on, the file stays.
    let mut mallory = Client::hello(srv.addr, "demo", "mallory");
    let (e, text) = mallory.delete(&id).unwrap_err();
    assert_eq!(e, ErrorCode::Forbidden);
    assert!(text.contains("only its owner"), "{text}");
    assert_eq!(mallory.stat(&id).unwrap().size, data.len() as u64);

    c.call(cmd::DOWNLOAD_OVER, &proto::encode_file_id(&id).unwrap())
        .unwrap();
    assert!(c.delete(&id).unwrap().is_empty());
    assert_eq!(code(c.stat(&id)), ErrorCode::NotFound);
    assert_eq!(
        code(c.delete(&id)),
        ErrorCode::NotFound,
        "delete of an unknown id"
    );
    assert_eq!(code(c.download(&id, 0, 10)), ErrorCode::NotFound);
    assert_eq!(
        code(c.call(cmd::DOWNLOAD_OVER, &proto::encode_file_id(&id).unwrap())),
        ErrorCode::NotFound
    );
    // The other copy is untouched.
    assert_eq!(c.download_all(&id2, data.len() as u64, 1 << 20), data);

    // Two uploads of the same name at the same time, different contents: two files.
    let addr = srv.addr;
    let handles: Vec<_> = (0..2u64)
        .map(|i| {
            std::thread::spawn(move || {
                let mut c = Client::hello(addr, "demo", "alice");
                let d = bytes(150_000, 10 + i);
                let id = c.upload_small("same-name.bin", &d).unwrap();
                (id, d)
            })
        })
        .collect();
    let got: Vec<(String, Vec<u8>)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_ne!(got[0].0, got[1].0);
    for (id, d) in &got {
        assert_eq!(&c.download_all(id, d.len() as u64, 1 << 20), d);
    }
}

#[test]
fn session_opening_and_malformed_frames() {
    let dir = tempdir();
    let srv = start(dir.path(), &dir.path().join("data"), "");
    let hello = support::auth::hello_body("demo", "alice");

    // Anything but HELLO/PROBE first: error 5 and close.
    let mut c = Client::connect(srv.addr);
    assert_eq!(
        code(c.call(cmd::STAT, &proto::encode_file_id("x").unwrap())),
        ErrorCode::HelloRequired
    );
    assert!(c.closed());

    // Empty app id.
    let mut bad = hello.clone();
    bad[4..20].fill(0);
    let mut c = Client::connect(srv.addr);
    assert_eq!(code(c.call(cmd::HELLO, &bad)), ErrorCode::BadFrame);
    assert!(c.closed());
    // Empty user id.
    let mut bad = hello.clone();
    bad[20..276].fill(0);
    let mut c = Client::connect(srv.addr);
    assert_eq!(code(c.call(cmd::HELLO, &bad)), ErrorCode::BadFrame);
    // User id that is not UTF-8.
    let mut bad = hello.clone();
    bad[20] = 0xff;
    bad[21] = 0xfe;
    let mut c = Client::connect(srv.addr);
    assert_eq!(code(c.call(cmd::HELLO, &bad)), ErrorCode::BadFrame);
    assert!(c.closed());
    // App id too long: the 16-byte field is full and the user field starts with its tail
    // ("0123456789abcdefXYZ" written across both); a NUL after text inside one field.
    let mut bad = hello.clone();
    bad[4..20].copy_from_slice(b"0123456789abcdef");
    bad[20..23].copy_from_slice(b"\0YZ");
    let mut c = Client::connect(srv.addr);
    assert_eq!(code(c.call(cmd::HELLO, &bad)), ErrorCode::BadFrame);
    // A HELLO body longer than any HELLO may be.
    let mut c = Client::connect(srv.addr);
    assert_eq!(code(c.call(cmd::HELLO, &[b'a'; 2000])), ErrorCode::TooLarge);
    assert!(c.closed());
    // Another protocol version.
    let mut bad = hello.clone();
    bad[1] = 9;
    let mut c = Client::connect(srv.addr);
    assert_eq!(code(c.call(cmd::HELLO, &bad)), ErrorCode::Version);

    let mut c = Client::hello(srv.addr, "demo", "alice");
    // A second HELLO.
    assert_eq!(code(c.call(cmd::HELLO, &hello)), ErrorCode::BadFrame);
    assert!(c.closed());
    // Unknown command (a cluster role this server does not run), from a member's connection
    // (no HELLO: on a user's session a cluster command is refused before that, with 6).
    let mut c = Client::connect(srv.addr);
    assert_eq!(
        code(c.call(cmd::TRACKER_GROUPS, &[])),
        ErrorCode::UnknownCommand
    );
    assert!(c.closed());
    // A command number nobody serves (seed 004's id server, 40).
    let mut c = Client::connect(srv.addr);
    assert_eq!(code(c.call(40, &[0; 68])), ErrorCode::UnknownCommand);
    assert!(c.closed());
    // Status byte set in a request.
    let mut c = Client::hello(srv.addr, "demo", "alice");
    c.s()
        .write_all(&proto::frame(cmd::STAT, 1, &[0; 128]))
        .unwrap();
    assert_eq!(code(c.result()), ErrorCode::BadFrame);
    // A file id field with bytes after its padding.
    let mut c = Client::hello(srv.addr, "demo", "alice");
    let mut fid = proto::encode_file_id("abc").unwrap();
    fid[100] = b'x';
    assert_eq!(code(c.call(cmd::STAT, &fid)), ErrorCode::BadFrame);
    assert!(c.closed());

    // The server is still fine.
    assert!(support::probe(srv.addr, Duration::from_secs(2)).is_some());
    let mut c = Client::hello(srv.addr, "demo", "alice");
    c.upload_small("ok", b"still serving").unwrap();
}

#[test]
fn big_upload_parallel_blocks_fencing_and_faults() {
    let dir = tempdir();
    let srv = start(dir.path(), &dir.path().join("data"), "");
    let bs = 65536u32;
    let file = bytes(17 * 65536 + 1234, 3);
    let blocks = 18u32;
    let mut c = Client::hello(srv.addr, "demo", "bob");
    let r = c
        .init(file.len() as u64, bs, sha(&file), "movie.mkv")
        .unwrap();
    assert_eq!(r.blocks, blocks);
    assert_eq!(r.challenge, None);
    let id = r.upload_id;
    assert_eq!(c.query(id).unwrap().count(), 0);
    assert!(
        srv.temp_files()
            .iter()
            .any(|p| std::fs::metadata(p).unwrap().len() == 0),
        "temp file made empty: blocks take their disk as they arrive"
    );

    // Unknown upload id.
    assert_eq!(code(c.query([7; 16])), ErrorCode::UnknownUpload);
    assert_eq!(
        code(c.block([7; 16], bs, 0, &file)),
        ErrorCode::UnknownUpload
    );
    assert_eq!(code(c.over([7; 16])), ErrorCode::UnknownUpload);
    // Another user cannot use this session.
    let mut eve = Client::hello(srv.addr, "demo", "eve");
    assert_eq!(code(eve.query(id)), ErrorCode::UnknownUpload);
    // Block index past the end.
    let m = |index: u32, offset: u64, data: &[u8]| BlockMeta {
        upload_id: id,
        index,
        offset,
        len: data.len() as u32,
        crc32c: crc32c::crc32c(data),
    };
    let junk = bytes(65536, 4);
    assert_eq!(
        code(c.block_raw(m(blocks, u64::from(blocks) * 65536, &junk), &junk)),
        ErrorCode::BadBlock
    );
    // A block overlapping its neighbour (offset not index x block size).
    assert_eq!(
        code(c.block_raw(m(2, 65536 + 100, &junk), &junk)),
        ErrorCode::BadBlock
    );
    // Wrong length (not the block size, not the last block).
    assert_eq!(
        code(c.block_raw(m(2, 131072, &junk[..1000]), &junk[..1000])),
        ErrorCode::BadBlock
    );
    // CRC mismatch: refused, block stays missing.
    let (off, b2) = block_of(&file, bs, 2);
    let mut mm = m(2, off, b2);
    mm.crc32c ^= 1;
    assert_eq!(code(c.block_raw(mm, b2)), ErrorCode::Crc);
    assert!(!c.query(id).unwrap().has(2));
    // File over with blocks missing.
    assert_eq!(code(c.over(id)), ErrorCode::Incomplete);

    // Busy: connection A is half-way through block 5 when B sends it.
    let (off5, b5) = block_of(&file, bs, 5);
    let mut a = Client::hello(srv.addr, "demo", "bob");
    let mut f = proto::data_frame_head(cmd::UPLOAD_BLOCK, 0, &m(5, off5, b5).encode(), 65536);
    f.extend_from_slice(&b5[..30000]);
    a.s().write_all(&f).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(code(c.block(id, bs, 5, &file)), ErrorCode::Busy);
    a.s().write_all(&b5[30000..]).unwrap();
    assert_eq!(a.result().unwrap(), vec![BlockAck::Written as u8]);

    // The other blocks over four connections at once, in a scrambled order.
    let addr = srv.addr;
    let shared = std::sync::Arc::new(file.clone());
    let handles: Vec<_> = (0..4u32)
        .map(|k| {
            let file = shared.clone();
            std::thread::spawn(move || {
                let mut c = Client::hello(addr, "demo", "bob");
                let mut acks = Vec::new();
                for i in (0..blocks).rev().filter(|i| i % 4 == k && *i != 5) {
                    acks.push(c.block(id, bs, i, &file).unwrap());
                }
                acks
            })
        })
        .collect();
    for h in handles {
        assert!(h.join().unwrap().iter().all(|a| *a == BlockAck::Written));
    }
    // Fencing: a late copy of a stored block with different bytes (and a valid CRC) is
    // answered "already stored" and not written.
    let (off7, _) = block_of(&file, bs, 7);
    let evil = bytes(65536, 99);
    assert_eq!(
        c.block_raw(m(7, off7, &evil), &evil).unwrap(),
        BlockAck::AlreadyStored
    );
    assert_eq!(c.block(id, bs, 7, &file).unwrap(), BlockAck::AlreadyStored);
    assert_eq!(c.query(id).unwrap().count(), blocks);
    // UPLOAD_INIT of the same file again resumes the same session.
    let again = c
        .init(file.len() as u64, bs, sha(&file), "movie.mkv")
        .unwrap();
    assert_eq!(again.upload_id, id);

    let fid = c.over(id).unwrap();
    assert_eq!(
        code(c.query(id)),
        ErrorCode::UnknownUpload,
        "session gone after file over"
    );
    let st = c.stat(&fid).unwrap();
    assert_eq!(
        (st.size, st.sha256, st.block_size),
        (file.len() as u64, sha(&file), bs)
    );
    assert_eq!(c.download_all(&fid, file.len() as u64, 65536), file);
    assert_eq!(c.download_all(&fid, file.len() as u64, 100_000), file);
    assert!(srv.temp_files().is_empty());

    // Hash mismatch at file over: 12, and the session is discarded.
    let liar = c.init(file.len() as u64, bs, [5; 32], "x").unwrap();
    for i in 0..blocks {
        c.block(liar.upload_id, bs, i, &file).unwrap();
    }
    assert_eq!(code(c.over(liar.upload_id)), ErrorCode::HashMismatch);
    assert_eq!(code(c.query(liar.upload_id)), ErrorCode::UnknownUpload);
    assert!(srv.temp_files().is_empty());

    // Two big uploads of the same name at once with different contents: two sessions.
    let other = bytes(file.len(), 8);
    let s1 = c.init(file.len() as u64, bs, sha(&file), "same").unwrap();
    let s2 = c.init(other.len() as u64, bs, sha(&other), "same").unwrap();
    assert_ne!(s1.upload_id, s2.upload_id);
    for i in 0..blocks {
        c.block(s1.upload_id, bs, i, &file).unwrap();
        c.block(s2.upload_id, bs, i, &other).unwrap();
    }
    let (f1, f2) = (c.over(s1.upload_id).unwrap(), c.over(s2.upload_id).unwrap());
    assert_eq!(c.download_all(&f1, file.len() as u64, 1 << 20), file);
    assert_eq!(c.download_all(&f2, other.len() as u64, 1 << 20), other);
    // Bad UPLOAD_INIT (block size below 64 KiB) is a malformed request.
    assert_eq!(code(c.init(1000, 1000, [0; 32], "x")), ErrorCode::BadFrame);
}

#[test]
fn instant_upload_needs_proof_of_possession() {
    let dir = tempdir();
    let srv = start(
        dir.path(),
        &dir.path().join("data"),
        "challenge_max = 100000",
    );
    let bs = 65536u32;
    let file = bytes(300_000, 5);
    let mut alice = Client::hello(srv.addr, "demo", "alice");
    let orig = alice.upload_small("a", &file[..200_000]).unwrap();
    // Store the 300 kB file through the block path.
    let r = alice.init(file.len() as u64, bs, sha(&file), "a").unwrap();
    for i in 0..r.blocks {
        alice.block(r.upload_id, bs, i, &file).unwrap();
    }
    let first = alice.over(r.upload_id).unwrap();
    let _ = orig;

    // Bob (same app) announces the same content: the server asks for proof.
    let mut bob = Client::hello(srv.addr, "demo", "bob");
    let r = bob.init(file.len() as u64, bs, sha(&file), "b").unwrap();
    let (off, len) = r.challenge.expect("challenge for stored content");
    assert!(len > 0 && len <= 100_000 && off + len <= file.len() as u64);
    // Someone who only knows the hash cannot answer.
    assert_eq!(
        code(bob.prove(r.upload_id, sha(b"guess"))),
        ErrorCode::ProofFailed
    );
    assert_eq!(
        bob.query(r.upload_id).unwrap().count(),
        0,
        "session stays usable"
    );
    let right = sha(&file[off as usize..(off + len) as usize]);
    let fid = bob.prove(r.upload_id, right).unwrap();
    assert_ne!(fid, first);
    // The proved session's temp file went with it (after the commit).
    assert_eq!(srv.temp_files(), Vec::<PathBuf>::new());
    assert_eq!(code(bob.query(r.upload_id)), ErrorCode::UnknownUpload);
    assert_eq!(bob.download_all(&fid, file.len() as u64, 1 << 20), file);
    assert_eq!(bob.stat(&fid).unwrap().name, "b");
    // Deleting the original keeps the shared content for the new record, and back.
    alice.delete(&first).unwrap();
    assert_eq!(bob.download_all(&fid, file.len() as u64, 1 << 20), file);

    // Another app gets no challenge: content is deduplicated per app only.
    let mut other = Client::hello(srv.addr, "other", "bob");
    let r = other.init(file.len() as u64, bs, sha(&file), "b").unwrap();
    assert_eq!(r.challenge, None);
    assert_eq!(
        code(other.prove(r.upload_id, right)),
        ErrorCode::ProofFailed
    );
    // Prove of an unknown upload.
    assert_eq!(code(other.prove([1; 16], right)), ErrorCode::UnknownUpload);
}

#[test]
fn kill_9_mid_upload_then_resume() {
    let dir = tempdir();
    let srv = start(dir.path(), &dir.path().join("data"), "");
    let bs = 65536u32;
    let file = bytes(40 * 65536 - 7, 6);
    let blocks = 40u32;
    let mut c = Client::hello(srv.addr, "demo", "carol");
    let small = bytes(100_000, 7);
    let small_id = c.upload_small("kept", &small).unwrap();
    let r = c.init(file.len() as u64, bs, sha(&file), "big").unwrap();
    let id = r.upload_id;
    let acked: HashSet<u32> = (0..blocks).filter(|i| i % 3 == 0 || *i == 39).collect();
    for &i in &acked {
        assert_eq!(c.block(id, bs, i, &file).unwrap(), BlockAck::Written);
    }
    // A block half sent when the server dies.
    let (off, b1) = block_of(&file, bs, 1);
    let meta = BlockMeta {
        upload_id: id,
        index: 1,
        offset: off,
        len: b1.len() as u32,
        crc32c: crc32c::crc32c(b1),
    };
    let mut f = proto::data_frame_head(cmd::UPLOAD_BLOCK, 0, &meta.encode(), b1.len() as u64);
    f.extend_from_slice(&b1[..40000]);
    c.s().write_all(&f).unwrap();
    std::thread::sleep(Duration::from_millis(200));

    let srv = srv.restart();
    let mut c = Client::hello(srv.addr, "demo", "carol");
    let bp = c.query(id).unwrap();
    let have: HashSet<u32> = (0..blocks).filter(|&i| bp.has(i)).collect();
    assert_eq!(have, acked, "breakpoint is exactly the acknowledged blocks");
    // An acknowledged block whose bytes changed on disk (as a power cut can do to unsynced
    // pages): file over finds it by its CRC and asks for it again instead of failing.
    let part = srv
        .data
        .join("tmp")
        .join(format!("{}.part", hex::encode(id)));
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&part).unwrap();
        f.write_all_at(&[0xAA; 100], 3 * 65536 + 10).unwrap();
    }
    let missing: Vec<u32> = bp.missing().collect();
    for i in missing {
        assert_eq!(c.block(id, bs, i, &file).unwrap(), BlockAck::Written);
    }
    assert_eq!(code(c.over(id)), ErrorCode::Incomplete);
    let bp = c.query(id).unwrap();
    assert_eq!(bp.missing().collect::<Vec<_>>(), vec![3]);
    assert_eq!(c.block(id, bs, 3, &file).unwrap(), BlockAck::Written);
    let fid = c.over(id).unwrap();
    let got = c.download_all(&fid, file.len() as u64, 65536 * 3);
    assert_eq!(sha(&got), sha(&file));
    // The file acknowledged before the kill is intact.
    assert_eq!(
        c.download_all(&small_id, small.len() as u64, 1 << 20),
        small
    );
    assert_eq!(c.stat(&small_id).unwrap().sha256, sha(&small));

    // A stored file survives a second kill -9 too; ids are never reused after restarts.
    let srv = srv.restart();
    let mut c = Client::hello(srv.addr, "demo", "carol");
    assert_eq!(c.download_all(&fid, file.len() as u64, 1 << 20), file);
    let new_id = c.upload_small("after", b"after restart").unwrap();
    assert!(new_id != fid && new_id != small_id);
    // A repeated file over (its first reply was lost with a dying proxy) answers the same file
    // id, across the restart, and stores nothing twice; other users still get "unknown".
    assert_eq!(c.over(id).unwrap(), fid);
    let mut eve = Client::hello(srv.addr, "demo", "eve");
    assert_eq!(code(eve.over(id)), ErrorCode::UnknownUpload);
    c.delete(&fid).unwrap();
    assert_eq!(
        code(c.over(id)),
        ErrorCode::UnknownUpload,
        "deleted file is not handed out"
    );
    let num = |s: &str| u64::from_str_radix(&s[..16], 16).unwrap();
    assert!(num(&new_id) > num(&fid) && num(&fid) > num(&small_id));
}

#[test]
fn expired_sessions_lose_their_temp_files() {
    let dir = tempdir();
    let srv = start(dir.path(), &dir.path().join("data"), "session_ttl_secs = 1");
    let bs = 65536u32;
    let file = bytes(3 * 65536, 8);
    let mut c = Client::hello(srv.addr, "demo", "dan");
    let r = c.init(file.len() as u64, bs, sha(&file), "x").unwrap();
    c.block(r.upload_id, bs, 0, &file).unwrap();
    assert_eq!(srv.temp_files().len(), 1);
    support::wait_until("the temp file reaped", Duration::from_secs(10), || {
        srv.temp_files().is_empty()
    });
    assert_eq!(code(c.query(r.upload_id)), ErrorCode::UnknownUpload);
    assert_eq!(
        code(c.block(r.upload_id, bs, 1, &file)),
        ErrorCode::UnknownUpload
    );
    // A new session for the same file starts from scratch.
    let r2 = c.init(file.len() as u64, bs, sha(&file), "x").unwrap();
    assert_ne!(r2.upload_id, r.upload_id);
    assert_eq!(c.query(r2.upload_id).unwrap().count(), 0);
}

/// A tmpfs mounted for the length of a test (unmounted on drop).
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// `FERRY_TEST_NO_TMPFS=1` skips the mount, to exercise the fault-injection path.
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).ok()?;
        if std::env::var_os("FERRY_TEST_NO_TMPFS").is_some() {
            return None;
        }
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn disk_full_gives_a_clear_error_and_the_server_keeps_serving() {
    let dir = tempdir();
    let data = dir.path().join("mnt");
    // A real 8 MiB filesystem when we may mount one; otherwise the documented test-only fault
    // (`faults.write_fail_after`) makes payload writes fail with ENOSPC after 5 MiB.
    let fs = Tmpfs::mount(&data, "8m");
    // No free-space reserve and no cap on declared bytes: this test is about what happens when
    // the disk really fills.
    let base =
        "small_file_max = 4194304\nmin_free_bytes = 0\nmax_open_bytes_per_app = 1073741824\n";
    let extra = if fs.is_some() {
        format!("{base}sync_blocks = true")
    } else {
        eprintln!("cannot mount a tmpfs here; using the injected ENOSPC fault");
        format!("{base}[faults]\nwrite_fail_after = 5242880")
    };
    let srv = start(dir.path(), &data, &extra);
    let mut c = Client::hello(srv.addr, "demo", "erin");
    let a = bytes(3 << 20, 11);
    let b = bytes(3 << 20, 12);
    let a_id = c.upload_small("a", &a).unwrap();
    let r = c.upload_small("b", &b);
    let b_id = match r {
        // The real filesystem had room for two: the third fills it.
        Ok(id) => {
            let third = bytes(3 << 20, 13);
            let e = c.upload_small("c", &third).unwrap_err();
            assert_eq!(e.0, ErrorCode::NoSpace, "{e:?}");
            Some(id)
        }
        Err(e) => {
            assert_eq!(e.0, ErrorCode::NoSpace, "{e:?}");
            None
        }
    };
    assert!(
        srv.temp_files().is_empty(),
        "the failed upload's temp file is cleaned"
    );
    // No corrupt final file: every stored file is whole, and nothing else was recorded.
    assert_eq!(c.download_all(&a_id, a.len() as u64, 1 << 20), a);
    if let Some(id) = &b_id {
        assert_eq!(c.download_all(id, b.len() as u64, 1 << 20), b);
    }
    // A big upload that cannot fit is refused up front (it does not fit the free space) or
    // when a block arrives that the disk has no room for.
    let big = bytes(16 << 20, 14);
    match c.init(big.len() as u64, 1 << 20, sha(&big), "big") {
        Err(e) => assert_eq!(e.0, ErrorCode::NoSpace, "{e:?}"),
        Ok(r) => {
            let e = c.block(r.upload_id, 1 << 20, 0, &big).unwrap_err();
            assert_eq!(e.0, ErrorCode::NoSpace, "{e:?}");
            assert!(
                !c.query(r.upload_id).unwrap().has(0),
                "failed block stays missing"
            );
        }
    }
    // Everyone else is still served: a new connection, probes, stats, downloads.
    assert!(support::probe(srv.addr, Duration::from_secs(2)).is_some());
    let mut d = Client::hello(srv.addr, "demo", "frank");
    assert_eq!(d.stat(&a_id).unwrap().sha256, sha(&a));
    assert_eq!(d.download_all(&a_id, a.len() as u64, 1 << 20), a);
    if fs.is_some() {
        // Space freed: uploads work again.
        c.delete(&a_id).unwrap();
        let small = bytes(100_000, 15);
        let id = d.upload_small("after", &small).unwrap();
        assert_eq!(d.download_all(&id, small.len() as u64, 1 << 20), small);
    }
    drop(srv);
    drop(fs);
}

/// Bytes a process has read so far (`rchar`: read(2), pread(2) and sendfile(2) alike).
fn read_bytes(pid: i32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

/// Uploads `file` as a big file of `bs`-byte blocks; returns its id.
fn upload_big(c: &mut Client, file: &[u8], bs: u32) -> String {
    let r = c.init(file.len() as u64, bs, sha(file), "big").unwrap();
    for idx in 0..r.blocks {
        c.block(r.upload_id, bs, idx, file).unwrap();
    }
    c.over(r.upload_id).unwrap()
}

/// Fair share, descriptors and CPU (#16 cases 3 and 4). A connection pipelines 33 unaligned
/// DOWNLOADs of a 16 MiB file and never reads: the server opens a download only when it is
/// next to go out and reads only the partial blocks at a range's edges, so the connection
/// holds a few descriptors and the server reads about what the socket took, not 33 x 16 MiB.
/// Another app's user is served meanwhile.
#[test]
fn a_peer_that_does_not_read_holds_few_descriptors_and_costs_little_work() {
    let dir = tempdir();
    let srv = start(dir.path(), &dir.path().join("data"), "");
    let bs = 1 << 20;
    let mine = bytes(16 << 20, 31);
    let mut mallory = Client::hello(srv.addr, "demo", "mallory");
    let id = upload_big(&mut mallory, &mine, bs);
    let theirs = bytes(3 << 20, 32);
    let mut victim = Client::hello(srv.addr, "other", "victor");
    let their_id = upload_big(&mut victim, &theirs, bs);

    // The stalled connection takes little into its receive buffer, so what the server sends
    // it stays small and what the server reads beyond that is the work it did for nothing.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(64 << 10).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    sock.connect(&srv.addr.into()).unwrap();
    let mut stalled = Client::on(sock.into());
    stalled
        .call(cmd::HELLO, &support::auth::hello_body("demo", "mallory"))
        .unwrap();
    let pid = srv.proc.pid();
    let (fds, read) = (support::fd_count(pid), read_bytes(pid));
    let mut reqs = Vec::new();
    for i in 0..33u64 {
        let body = DownloadReq {
            file_id: id.clone(),
            offset: 1 + i,
            len: (16 << 20) - 1 - i,
        }
        .encode()
        .unwrap();
        reqs.extend(proto::frame(cmd::DOWNLOAD, 0, &body));
    }
    stalled.s().write_all(&reqs).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let (fds_after, read_after) = (support::fd_count(pid), read_bytes(pid));
    assert!(
        fds_after <= fds + 1,
        "descriptors {fds} -> {fds_after}: queued downloads hold files"
    );
    let work = read_after - read;
    assert!(
        work < 12 << 20,
        "{work} bytes read for a peer that reads nothing (33 ranges of 16 MiB asked)"
    );
    assert_eq!(
        victim.download_all(&their_id, theirs.len() as u64, 1 << 20),
        theirs
    );
    eprintln!("descriptors {fds} -> {fds_after}; {work} bytes read for the stalled peer");
}

/// Fair share, descriptors (#16 case 3): `max_connections` is derived from the open-file limit
/// at start (and the log says so), so connections that each pin a download's file cannot run
/// the server out of descriptors: past the derived count they are refused with error 17, and
/// a tenant already connected still opens upload sessions and temp files.
#[test]
fn connections_are_capped_by_the_descriptors_they_may_hold() {
    if !support::have("prlimit") {
        return;
    }
    let dir = tempdir();
    // 600 descriptors: 64 for the server, 20 for sessions, 5 per connection: 103 connections.
    let srv = start_limited(
        dir.path(),
        &dir.path().join("data"),
        "max_sessions = 20\nmax_sessions_per_user = 10\nsmall_file_max = 4194304\n",
        600,
    );
    let log = srv.proc.log_text();
    assert!(
        log.contains("max_connections lowered from 4096 to 103"),
        "the derived limit is logged: {log}"
    );
    let bs = 1 << 20;
    let big = bytes(8 << 20, 41);
    let mut mallory = Client::hello(srv.addr, "demo", "mallory");
    let id = upload_big(&mut mallory, &big, bs);
    let mut victim = Client::hello(srv.addr, "other", "victor");

    // Every other slot: a connection pipelining downloads it never reads.
    let req = DownloadReq {
        file_id: id.clone(),
        offset: 0,
        len: big.len() as u64,
    }
    .encode()
    .unwrap();
    let (mut held, mut refused) = (Vec::new(), 0);
    for _ in 0..200 {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.set_recv_buffer_size(16 << 10).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        sock.connect(&srv.addr.into()).unwrap();
        let mut c = Client::on(sock.into());
        c.s()
            .write_all(&support::auth::hello_frame("demo", "mallory"))
            .unwrap();
        match c.result() {
            Ok(_) => {
                let reqs: Vec<u8> = (0..8)
                    .flat_map(|_| proto::frame(cmd::DOWNLOAD, 0, &req))
                    .collect();
                c.s().write_all(&reqs).unwrap();
                held.push(c);
            }
            Err((ErrorCode::Limit, _)) => refused += 1,
            Err(e) => panic!("connection refused with {e:?}"),
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let fds = support::fd_count(srv.proc.pid());
    eprintln!(
        "{} connections held, {refused} refused, {fds} descriptors",
        held.len()
    );
    assert!(refused >= 97, "only {refused} of 200 refused past 103");
    assert!(fds < 600, "{fds} descriptors");

    // The tenant already in still gets temp files: a small upload and a big upload session.
    let small = bytes(2 << 20, 42);
    let small_id = victim.upload_small("s", &small).unwrap();
    let theirs = bytes(2 << 20, 43);
    let their_id = upload_big(&mut victim, &theirs, bs);
    assert_eq!(
        victim.download_all(&small_id, small.len() as u64, 1 << 20),
        small
    );
    assert_eq!(
        victim.download_all(&their_id, theirs.len() as u64, 1 << 20),
        theirs
    );
    let log = srv.proc.log_text();
    assert!(!log.contains("Too many open files"), "EMFILE met: {log}");
}

/// Fair share, disk (#16 case 1). An UPLOAD_INIT declaring nearly the whole volume takes no
/// disk (blocks take theirs as they arrive), so another app's small and big uploads are
/// stored. That session, having sent nothing, expires after the short
/// `fresh_session_ttl_secs` however often its INIT is repeated, while the victim's session,
/// which stored a block, outlives that. Without an override one app may not declare more
/// than half the volume.
#[test]
fn a_declared_upload_holds_no_disk_and_a_silent_one_expires_soon() {
    let dir = tempdir();
    let data = dir.path().join("mnt");
    let Some(_fs) = Tmpfs::mount(&data, "48m") else {
        eprintln!("skipped: cannot mount a 48 MiB tmpfs here");
        return;
    };
    let srv = start(
        dir.path(),
        &data,
        "min_free_bytes = 1048576\nfresh_session_ttl_secs = 2\nsmall_file_max = 4194304\n\
         [apps.demo]\nmax_open_bytes = 1000000000\n",
    );
    let bs = 65536;
    let t0 = Instant::now();
    let mut mallory = Client::hello(srv.addr, "demo", "mallory");
    let claim = mallory.init(44 << 20, bs, [7; 32], "all.bin").unwrap();
    let part = support::files_under(&data)
        .into_iter()
        .find(|p| p.ends_with(format!("{}.part", hex::encode(claim.upload_id))))
        .expect("the session's temp file");
    {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&part).unwrap();
        assert_eq!(
            (m.len(), m.blocks()),
            (0, 0),
            "a declared size holds no disk"
        );
    }

    let mut victim = Client::hello(srv.addr, "other", "victor");
    let small = bytes(2 << 20, 21);
    let small_id = victim.upload_small("small", &small).unwrap();
    let big = bytes(8 << 20, 22);
    let r = victim.init(big.len() as u64, bs, sha(&big), "big").unwrap();
    victim.block(r.upload_id, bs, 0, &big).unwrap();
    // The app's default share of declared bytes is half the volume: 8 MiB open + 20 MiB is
    // past it. The refusal names the limit, not the volume's figures.
    let mut eve = Client::hello(srv.addr, "other", "eve");
    match eve.init(20 << 20, bs, [8; 32], "more") {
        Err((ErrorCode::Limit, t)) => {
            assert!(
                t.contains("max_open_bytes_per_app") && !t.contains("free"),
                "{t}"
            )
        }
        other => panic!("INIT past the app's share: {other:?}"),
    }

    // Repeating the INIT does not keep the silent session: it expires and a new one opens.
    loop {
        let again = mallory.init(44 << 20, bs, [7; 32], "all.bin").unwrap();
        if again.upload_id != claim.upload_id {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "repeated INITs kept a session that never sent a block"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(t0.elapsed() >= Duration::from_secs(2), "expired early");
    // The reaper removes its temp file (it runs a few times per lifetime).
    while part.exists() {
        assert!(t0.elapsed() < Duration::from_secs(10), "temp file kept");
        std::thread::sleep(Duration::from_millis(100));
    }

    // The victim's session stored a block: it lives the full lifetime, and finishes.
    let blocks = big.len().div_ceil(bs as usize) as u32;
    for idx in 1..blocks {
        victim.block(r.upload_id, bs, idx, &big).unwrap();
    }
    let big_id = victim.over(r.upload_id).unwrap();
    assert_eq!(
        victim.download_all(&small_id, small.len() as u64, 1 << 20),
        small
    );
    assert_eq!(victim.download_all(&big_id, big.len() as u64, 1 << 20), big);
}

#[test]
fn sigterm_finishes_the_block_in_flight_and_data_dir_is_locked() {
    let dir = tempdir();
    let data = dir.path().join("data");
    let mut srv = start(dir.path(), &data, "");
    // A second server on the same data dir refuses to start.
    let mut second = support::Proc::spawn(
        "second-server",
        Command::new(support::bin("ferry-server"))
            .arg("--config")
            .arg(dir.path().join("ferry-server.toml"))
            .arg("--listen")
            .arg(support::free_addr().to_string())
            .arg("--data")
            .arg(&data),
        dir.path(),
    );
    let st = second
        .wait_exit(Duration::from_secs(10))
        .expect("second server exits");
    assert!(!st.success());
    assert!(
        second.log_text().contains("in use"),
        "{}",
        second.log_text()
    );

    let bs = 65536u32;
    let file = bytes(2 * 65536, 21);
    let mut c = Client::hello(srv.addr, "demo", "gina");
    let r = c.init(file.len() as u64, bs, sha(&file), "x").unwrap();
    let (off, b0) = block_of(&file, bs, 0);
    let meta = BlockMeta {
        upload_id: r.upload_id,
        index: 0,
        offset: off,
        len: b0.len() as u32,
        crc32c: crc32c::crc32c(b0),
    };
    let mut f = proto::data_frame_head(cmd::UPLOAD_BLOCK, 0, &meta.encode(), b0.len() as u64);
    f.extend_from_slice(&b0[..20000]);
    c.s().write_all(&f).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    srv.proc.signal(nix::sys::signal::Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    // The frame in flight is finished and acknowledged, then the connection closes.
    c.s().write_all(&b0[20000..]).unwrap();
    assert_eq!(c.result().unwrap(), vec![BlockAck::Written as u8]);
    assert!(c.closed());
    let st = srv
        .proc
        .wait_exit(Duration::from_secs(10))
        .expect("server exits on SIGTERM");
    assert!(st.success(), "{st:?}");
    // The acknowledged block is there after a restart.
    let srv = srv.restart();
    let mut c = Client::hello(srv.addr, "demo", "gina");
    let bp = c.query(r.upload_id).unwrap();
    assert!(bp.has(0) && !bp.has(1));
}

/// A client that does not wait: blocks, a corrupt block, a repeated block, a STAT and a
/// DOWNLOAD all written back to back on one connection; the replies come in request order, and
/// each block is acknowledged once stored.
#[test]
fn pipelined_requests_are_answered_in_order() {
    let dir = tempdir();
    let srv = start(dir.path(), &dir.path().join("data"), "");
    let bs = 65536u32;
    let file = bytes(12 * 65536, 31);
    let mut c = Client::hello(srv.addr, "demo", "hana");
    let small = c.upload_small("s", b"small file").unwrap();
    let r = c.init(file.len() as u64, bs, sha(&file), "p").unwrap();
    let id = r.upload_id;
    let frame_of = |idx: u32, corrupt: bool| {
        let (off, d) = block_of(&file, bs, idx);
        let m = BlockMeta {
            upload_id: id,
            index: idx,
            offset: off,
            len: d.len() as u32,
            crc32c: crc32c::crc32c(d) ^ u32::from(corrupt),
        };
        let mut f = proto::data_frame_head(cmd::UPLOAD_BLOCK, 0, &m.encode(), d.len() as u64);
        f.extend_from_slice(d);
        f
    };
    let mut wire = Vec::new();
    let mut expect: Vec<Result<u8, ErrorCode>> = Vec::new();
    for i in 0..12 {
        wire.extend(frame_of(i, i == 4));
        expect.push(if i == 4 { Err(ErrorCode::Crc) } else { Ok(0) });
        if i == 6 {
            // A repeat of a block sent just before: "already stored", or Busy if the block is
            // still being made durable when the repeat is read.
            wire.extend(frame_of(3, false));
            expect.push(Ok(254));
            wire.extend(proto::frame(
                cmd::STAT,
                0,
                &proto::encode_file_id(&small).unwrap(),
            ));
            expect.push(Ok(255)); // the STAT reply
        }
    }
    let dl = DownloadReq {
        file_id: small.clone(),
        offset: 0,
        len: 100,
    };
    wire.extend(proto::frame(cmd::DOWNLOAD, 0, &dl.encode().unwrap()));
    let mut w = c.s().try_clone().unwrap();
    let writer = std::thread::spawn(move || w.write_all(&wire).unwrap());
    for (n, want) in expect.iter().enumerate() {
        let got = c.result();
        match (want, got) {
            (Ok(255), Ok(b)) => assert_eq!(StatReply::decode(&b).unwrap().size, 10),
            (Ok(254), Ok(b)) => assert_eq!(b, vec![BlockAck::AlreadyStored as u8]),
            (Ok(254), Err((c, _))) => assert_eq!(c, ErrorCode::Busy),
            (Ok(ack), Ok(b)) => assert_eq!(b, vec![*ack], "reply {n}"),
            (Err(code), Err((c, _))) => assert_eq!(*code, c, "reply {n}"),
            (w, g) => panic!("reply {n}: wanted {w:?}, got {g:?}"),
        }
    }
    let b = c.result().unwrap();
    assert_eq!(&b[4..], b"small file");
    writer.join().unwrap();
    let bp = c.query(id).unwrap();
    assert_eq!(bp.count(), 11);
    assert_eq!(bp.missing().collect::<Vec<_>>(), vec![4]);
    c.block(id, bs, 4, &file).unwrap();
    let fid = c.over(id).unwrap();
    assert_eq!(c.download_all(&fid, file.len() as u64, 1 << 20), file);
}

#[test]
fn session_and_connection_limits_answer_error_17() {
    let dir = tempdir();
    let srv = start(
        dir.path(),
        &dir.path().join("data"),
        "max_sessions = 1\nmax_connections = 2\nmax_connections_per_app = 2",
    );
    // Let the readiness probe's connection go away first.
    std::thread::sleep(Duration::from_millis(300));
    let mut c = Client::hello(srv.addr, "demo", "ivan");
    let a = bytes(65536, 41);
    let b = bytes(65536, 42);
    c.init(a.len() as u64, 65536, sha(&a), "a").unwrap();
    assert_eq!(
        code(c.init(b.len() as u64, 65536, sha(&b), "b")),
        ErrorCode::Limit
    );
    let _d = Client::hello(srv.addr, "demo", "ivan");
    let mut e = Client::connect(srv.addr);
    assert_eq!(code(e.result()), ErrorCode::Limit);
    assert!(e.closed());
    // The session that was allowed still works.
    c.upload_small("ok", b"fine").unwrap();
}

/// Every regular file under `dir`, as paths relative to it.
fn relative_files(dir: &Path) -> Vec<String> {
    support::files_under(dir)
        .iter()
        .filter_map(|p| p.strip_prefix(dir).ok())
        .map(|r| r.to_string_lossy().into_owned())
        .collect()
}

/// Upload keys are the client's idempotency keys for *its* uploads: another tenant (another
/// app, or another user of the same app) sending the same 16 bytes gets a file of its own and
/// leaves the first one's record alone, so the first one's retry is still answered with its id.
#[test]
fn the_same_upload_key_from_another_tenant_does_not_touch_the_first_ones_retry() {
    let dir = tempdir();
    let data = dir.path().join("data");
    let srv = start(dir.path(), &data, "");
    let key: [u8; 16] = *b"chosen-key-00001";
    let (mine, theirs) = (bytes(4000, 1), bytes(4000, 2));
    let mut victim = Client::hello(srv.addr, "demo", "alice");
    let first = victim
        .upload_small_keyed("a.jpg", &mine, sha(&mine), key)
        .unwrap();
    for (app, user) in [("other", "mallory"), ("demo", "mallory")] {
        let mut attacker = Client::hello(srv.addr, app, user);
        let id = attacker
            .upload_small_keyed("m.jpg", &theirs, sha(&theirs), key)
            .unwrap();
        assert_ne!(id, first, "{app}/{user}");
        assert_eq!(attacker.stat(&id).unwrap().name, "m.jpg");
    }
    // The victim's retry of its finished upload: the same id, no second copy.
    let again = victim
        .upload_small_keyed("a.jpg", &mine, sha(&mine), key)
        .unwrap();
    assert_eq!(again, first);
    assert_eq!(relative_files(&data.join("data")).len(), 3);
    assert_eq!(victim.stat(&first).unwrap().name, "a.jpg");
}

#[test]
fn hostile_names_are_metadata_and_other_tenants_see_not_found() {
    let dir = tempdir();
    let data = dir.path().join("data");
    let srv = start(dir.path(), &data, "");
    let mut c = Client::hello(srv.addr, "demo", "mallory");
    let body = bytes(5000, 77);
    // Names that would escape a naive path join are stored as names, nothing more.
    let long = "x".repeat(proto::NAME_LEN);
    let names = [
        "../../../../etc/passwd",
        "/tmp/absolute.jpg",
        "..",
        "dir/../../up.mp4",
        "名前 with spaces.mp4",
        long.as_str(),
    ];
    let mut ids = Vec::new();
    for n in names {
        let id = c.upload_small(n, &body).unwrap();
        assert_eq!(c.stat(&id).unwrap().name, n, "name kept as given");
        ids.push(id);
    }
    // On disk: only server-made paths (data/aaa/bbb/ccc/<hex>_ddd), nothing outside the data dir.
    let stored = relative_files(&data.join("data"));
    assert_eq!(stored.len(), names.len(), "{stored:?}");
    for p in &stored {
        let parts: Vec<&str> = p.split('/').collect();
        assert!(
            parts.len() == 4
                && parts[..3]
                    .iter()
                    .all(|d| d.len() == 3 && d.bytes().all(|b| b.is_ascii_digit())),
            "unexpected stored path {p}"
        );
    }
    let outside = relative_files(dir.path());
    assert!(
        outside
            .iter()
            .all(|p| !p.contains("passwd") && !p.contains("absolute")),
        "{outside:?}"
    );

    // Names the fixed-width field rules refuse: NUL inside, a control character, not UTF-8.
    for raw in [&b"a\0b.jpg"[..], b"tab\there.jpg", b"\xff\xfe.jpg"] {
        let mut meta = Vec::new();
        meta.extend_from_slice(&rand::random::<[u8; 16]>());
        meta.extend_from_slice(&sha(&body));
        let mut name = raw.to_vec();
        name.resize(proto::NAME_LEN, 0);
        meta.extend_from_slice(&name);
        let mut f = proto::data_frame_head(cmd::UPLOAD, 0, &meta, body.len() as u64);
        f.extend_from_slice(&body);
        let mut bad = Client::hello(srv.addr, "demo", "mallory");
        bad.s().write_all(&f).unwrap();
        assert_eq!(code(bad.result()), ErrorCode::BadFrame, "name {raw:?}");
        assert!(bad.closed());
    }
    assert_eq!(relative_files(&data.join("data")).len(), names.len());

    // Another app asking for these ids hears exactly what a made-up id gets.
    let mut other = Client::hello(srv.addr, "otherapp", "mallory");
    let made_up = "0000000000000001-aaaaaaaaaaaaaaaa";
    let missing_stat = other.stat(made_up).unwrap_err();
    let missing_dl = other.download(made_up, 0, 10).unwrap_err();
    let missing_del = other.delete(made_up).unwrap_err();
    for id in &ids {
        let stat = other.stat(id).unwrap_err();
        let dl = other.download(id, 0, 10).unwrap_err();
        let del = other.delete(id).unwrap_err();
        assert_eq!(stat.0, ErrorCode::NotFound);
        assert_eq!(
            (stat.0, dl.0, del.0),
            (missing_stat.0, missing_dl.0, missing_del.0)
        );
        assert_eq!(
            (
                stat.1.replace(id.as_str(), "ID"),
                dl.1.replace(id.as_str(), "ID")
            ),
            (
                missing_stat.1.replace(made_up, "ID"),
                missing_dl.1.replace(made_up, "ID")
            ),
            "the error text tells a foreign file from a missing one"
        );
    }
    // And the owner still has every file.
    for id in &ids {
        assert_eq!(c.download_all(id, body.len() as u64, 1 << 20), body);
    }
}
