//! `cargo bench --bench server`: the storage server alone, over loopback.
//!
//! - upload and download of one file (default 1 GiB, `FERRY_BENCH_MB`) with 1 and 4 connections,
//!   next to a plain TCP copy of the same bytes in the same run (memory to memory, 1 and 4
//!   connections), MB/s and ratios;
//! - server RSS while 16 uploads run at once (default 16 x 256 MiB, `FERRY_BENCH_RSS_MB` per
//!   upload; the 16 x 1 GiB is `FERRY_BENCH_RSS_MB=1024`).
//!
//! Every measurement runs `FERRY_BENCH_RUNS` times (default 3) and prints median and min-max.
//! `FERRY_BENCH_ONLY=throughput` or `=rss` runs one part; `FERRY_BENCH_DIR` picks the disk.
//! Uploads run twice: with `sync_blocks = true` (each block fdatasync'ed before its ack: bound by
//! the disk) and `sync_blocks = false` (page cache; the server's own overhead). "blocks" is the
//! time until the last block is acknowledged; "+over" adds UPLOAD_OVER, which re-reads the file
//! for its SHA-256 and fsyncs it. Downloads read the file from the page cache (it was just written).

#[path = "../e2e/support/mod.rs"]
mod support;

use ferry_common::proto::{
    self, BlockMeta, DownloadReq, HEADER_LEN, Header, UploadInit, UploadInitReply, cmd, status,
};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use support::server::Server;
use support::{env_u64, median, random_bytes, rss_kib};

const BS: u32 = 4 << 20;

fn start(dir: &Path, sync: bool) -> Server {
    let data = dir.join(format!("data-{}", if sync { "sync" } else { "nosync" }));
    let mut server = Command::new(env!("CARGO_BIN_EXE_ferry-server"));
    server.env("RUST_LOG", "warn");
    let conf = format!("workers = 4\nsync_blocks = {sync}\nidle_timeout_ms = 600000\n");
    Server::start_under(server, dir, &data, &conf)
}

struct Conn {
    s: TcpStream,
}

impl Conn {
    fn open(addr: SocketAddr, user: &str) -> Conn {
        let s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        let mut c = Conn { s };
        let hello = support::auth::hello_body("bench", user);
        c.s.write_all(&proto::frame(cmd::HELLO, 0, &hello)).unwrap();
        c.reply();
        c
    }

    fn reply(&mut self) -> Vec<u8> {
        read_reply(&mut self.s)
    }
}

fn read_reply(s: &mut TcpStream) -> Vec<u8> {
    support::raw::next_reply(s).body()
}

/// Uploads `file` with `conns` connections (block i on connection i % conns), each connection
/// pipelining its blocks (a reader thread takes the acks). Returns (blocks time, total time).
fn upload(addr: SocketAddr, file: &Arc<Vec<u8>>, conns: usize, user: &str) -> (f64, f64) {
    // The client hashes before it uploads; that is not the server's time.
    let init = UploadInit {
        size: file.len() as u64,
        block_size: BS,
        sha256: Sha256::digest(&file[..]).into(),
        name: "bench.bin".into(),
    };
    let start = Instant::now();
    let mut c = Conn::open(addr, user);
    c.s.write_all(&proto::frame(cmd::UPLOAD_INIT, 0, &init.encode().unwrap()))
        .unwrap();
    let r = UploadInitReply::decode(&c.reply()).unwrap();
    let blocks = r.blocks;
    let threads: Vec<_> = (0..conns)
        .map(|k| {
            let file = file.clone();
            let user = user.to_string();
            std::thread::spawn(move || {
                let mut c = Conn::open(addr, &user);
                let mine: Vec<u32> = (0..blocks).filter(|i| *i as usize % conns == k).collect();
                let n = mine.len();
                let mut rd = c.s.try_clone().unwrap();
                let acks = std::thread::spawn(move || {
                    for _ in 0..n {
                        let b = read_reply(&mut rd);
                        assert_eq!(b, vec![0]);
                    }
                });
                for i in mine {
                    let off = i as usize * BS as usize;
                    let end = (off + BS as usize).min(file.len());
                    let d = &file[off..end];
                    let m = BlockMeta {
                        upload_id: r.upload_id,
                        index: i,
                        offset: off as u64,
                        len: d.len() as u32,
                        crc32c: crc32c::crc32c(d),
                    };
                    let head =
                        proto::data_frame_head(cmd::UPLOAD_BLOCK, 0, &m.encode(), d.len() as u64);
                    c.s.write_all(&head).unwrap();
                    c.s.write_all(d).unwrap();
                }
                acks.join().unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let blocks_t = start.elapsed().as_secs_f64();
    c.s.write_all(&proto::frame(cmd::UPLOAD_OVER, 0, &r.upload_id))
        .unwrap();
    let id = proto::decode_file_id(&c.reply()).unwrap();
    let total = start.elapsed().as_secs_f64();
    LAST_ID.with(|l| *l.borrow_mut() = id);
    (blocks_t, total)
}

thread_local! {
    static LAST_ID: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// Downloads file `id` of `size` bytes in 4 MiB aligned ranges over `conns` connections,
/// pipelined, checking every CRC. Returns seconds.
fn download(addr: SocketAddr, id: &str, size: u64, conns: usize) -> f64 {
    let start = Instant::now();
    let ranges = size.div_ceil(u64::from(BS));
    let threads: Vec<_> = (0..conns)
        .map(|k| {
            let id = id.to_string();
            std::thread::spawn(move || {
                let mut c = Conn::open(addr, "reader");
                let mine: Vec<u64> = (0..ranges).filter(|i| *i as usize % conns == k).collect();
                let n = mine.len();
                let mut rd = c.s.try_clone().unwrap();
                let reader = std::thread::spawn(move || {
                    let mut buf = vec![0u8; BS as usize];
                    let mut got = 0u64;
                    for _ in 0..n {
                        let mut h = [0u8; HEADER_LEN + 4];
                        rd.read_exact(&mut h).unwrap();
                        let hd = Header::decode(h[..HEADER_LEN].try_into().unwrap());
                        assert_eq!(hd.status, status::OK);
                        let crc = u32::from_be_bytes(h[HEADER_LEN..].try_into().unwrap());
                        let len = hd.body_len as usize - 4;
                        rd.read_exact(&mut buf[..len]).unwrap();
                        assert_eq!(crc32c::crc32c(&buf[..len]), crc);
                        got += len as u64;
                    }
                    got
                });
                for i in mine {
                    let req = DownloadReq {
                        file_id: id.clone(),
                        offset: i * u64::from(BS),
                        len: u64::from(BS),
                    };
                    c.s.write_all(&proto::frame(cmd::DOWNLOAD, 0, &req.encode().unwrap()))
                        .unwrap();
                }
                reader.join().unwrap()
            })
        })
        .collect();
    let total: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(total, size);
    start.elapsed().as_secs_f64()
}

/// Plain TCP copy of `file` from memory to memory over `conns` loopback connections.
fn tcp_copy_run(file: &Arc<Vec<u8>>, conns: usize) -> f64 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let senders: Vec<TcpStream> = (0..conns)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    let sinks: Vec<_> = (0..conns)
        .map(|_| {
            let (mut s, _) = l.accept().unwrap();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                let mut n = 0u64;
                while let Ok(k) = s.read(&mut buf) {
                    if k == 0 {
                        break;
                    }
                    n += k as u64;
                }
                n
            })
        })
        .collect();
    let start = Instant::now();
    let piece = file.len().div_ceil(conns);
    let writers: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(k, mut s)| {
            let file = file.clone();
            std::thread::spawn(move || {
                let a = (k * piece).min(file.len());
                let b = ((k + 1) * piece).min(file.len());
                s.write_all(&file[a..b]).unwrap();
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let n: u64 = sinks.into_iter().map(|s| s.join().unwrap()).sum();
    assert_eq!(n, file.len() as u64);
    start.elapsed().as_secs_f64()
}

/// The disk's own rate for the same bytes: write them to a file in the bench dir and fsync, as
/// a durable upload must. A second baseline: a durable upload cannot beat it.
fn disk_write(dir: &Path, file: &[u8]) -> f64 {
    let path = dir.join("disk-baseline.bin");
    let start = Instant::now();
    let mut f = std::fs::File::create(&path).unwrap();
    for piece in file.chunks(4 << 20) {
        f.write_all(piece).unwrap();
    }
    f.sync_all().unwrap();
    let t = start.elapsed().as_secs_f64();
    std::fs::remove_file(&path).unwrap();
    t
}

fn show(label: &str, mbs: &mut [f64], base: Option<f64>) -> f64 {
    let (med, lo, hi) = median(mbs);
    match base {
        Some(b) => println!(
            "{label:<44} {med:>8.0} MB/s  (min {lo:.0}, max {hi:.0})  {:>5.0}% of plain TCP",
            100.0 * med / b
        ),
        None => println!("{label:<44} {med:>8.0} MB/s  (min {lo:.0}, max {hi:.0})"),
    }
    med
}

/// Deletes `id` as `owner` (only a file's uploader may delete it).
fn delete(addr: SocketAddr, owner: &str, id: &str) {
    let mut c = Conn::open(addr, owner);
    c.s.write_all(&proto::frame(
        cmd::DELETE,
        0,
        &proto::encode_file_id(id).unwrap(),
    ))
    .unwrap();
    c.reply();
}

fn main() {
    // `cargo bench` passes `--bench`; settings come from the environment.
    let mb = env_u64("FERRY_BENCH_MB", 1024) as usize;
    let rss_mb = env_u64("FERRY_BENCH_RSS_MB", 256) as usize;
    let runs = env_u64("FERRY_BENCH_RUNS", 3).max(1) as usize;
    let base_dir: PathBuf = std::env::var_os("FERRY_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("ferry-bench-server")
        .tempdir_in(&base_dir)
        .unwrap();
    println!(
        "ferry-server bench: {mb} MiB file, block {} MiB, {runs} run(s), data in {}",
        BS >> 20,
        dir.path().display()
    );
    let only = std::env::var("FERRY_BENCH_ONLY").unwrap_or_default();
    if only != "rss" {
        throughput(dir.path(), mb, runs);
    }
    if only != "throughput" {
        rss(dir.path(), rss_mb, runs);
    }
}

/// Upload and download MB/s next to the plain TCP copy and the disk.
fn throughput(dir: &Path, mb: usize, runs: usize) {
    let file = Arc::new(random_bytes(mb << 20, 42));
    let size_mb = file.len() as f64 / 1e6;

    let mut tcp1 = Vec::new();
    let mut tcp4 = Vec::new();
    let mut disk = Vec::new();
    let mut rows: Vec<(String, Vec<f64>)> = Vec::new();
    let push = |label: String, v: f64, rows: &mut Vec<(String, Vec<f64>)>| match rows
        .iter_mut()
        .find(|(l, _)| *l == label)
    {
        Some((_, xs)) => xs.push(v),
        None => rows.push((label, vec![v])),
    };
    for sync in [true, false] {
        let srv = start(dir, sync);
        for run in 0..runs {
            tcp1.push(size_mb / tcp_copy_run(&file, 1));
            tcp4.push(size_mb / tcp_copy_run(&file, 4));
            if sync {
                disk.push(size_mb / disk_write(dir, &file));
            }
            for conns in [1usize, 4] {
                let user = format!("u{run}-{conns}-{sync}");
                let (b, t) = upload(srv.addr, &file, conns, &user);
                let id = LAST_ID.with(|l| l.borrow().clone());
                let tag = if sync { "sync_blocks" } else { "no sync" };
                push(
                    format!("upload {conns} conn, {tag}, blocks"),
                    size_mb / b,
                    &mut rows,
                );
                push(
                    format!("upload {conns} conn, {tag}, +over"),
                    size_mb / t,
                    &mut rows,
                );
                if !sync {
                    let d = download(srv.addr, &id, file.len() as u64, conns);
                    push(
                        format!("download {conns} conn (sendfile)"),
                        size_mb / d,
                        &mut rows,
                    );
                }
                delete(srv.addr, &user, &id);
            }
        }
        drop(srv);
    }
    println!();
    let t1 = show("plain TCP copy, 1 conn", &mut tcp1, None);
    let t4 = show("plain TCP copy, 4 conn", &mut tcp4, None);
    show(
        "disk: write + fsync the same bytes (4 MiB writes)",
        &mut disk,
        None,
    );
    for (label, xs) in rows.iter_mut() {
        let base = if label.contains(" 1 conn") { t1 } else { t4 };
        show(label, xs, Some(base));
    }
}

/// Server RSS during 16 concurrent uploads of `rss_mb` MiB each.
fn rss(dir: &Path, rss_mb: usize, runs: usize) {
    let srv = start(dir, true);
    let pid = srv.proc.pid();
    let idle = rss_kib(pid);
    let one = Arc::new(random_bytes(rss_mb << 20, 7));
    let mut peaks = Vec::new();
    for run in 0..runs {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let sampler = {
            let (stop, peak) = (stop.clone(), peak.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    peak.fetch_max(rss_kib(pid), Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        let t = Instant::now();
        let ups: Vec<_> = (0..16)
            .map(|k| {
                let one = one.clone();
                let addr = srv.addr;
                std::thread::spawn(move || {
                    let user = format!("rss{run}-{k}");
                    let (_, t) = upload(addr, &one, 1, &user);
                    let id = LAST_ID.with(|l| l.borrow().clone());
                    (id, user, t)
                })
            })
            .collect();
        let ids: Vec<(String, String, f64)> = ups.into_iter().map(|u| u.join().unwrap()).collect();
        let secs = t.elapsed().as_secs_f64();
        stop.store(true, Ordering::SeqCst);
        sampler.join().unwrap();
        let p = peak.load(Ordering::SeqCst);
        println!(
            "16 x {rss_mb} MiB concurrent uploads (sync_blocks): {:.0} MB/s aggregate, \
             server RSS peak {} MiB (idle {} MiB)",
            16.0 * one.len() as f64 / 1e6 / secs,
            p / 1024,
            idle / 1024
        );
        peaks.push(p as f64 / 1024.0);
        for (id, user, _) in ids {
            delete(srv.addr, &user, &id);
        }
    }
    let (med, lo, hi) = median(&peaks);
    println!(
        "server RSS peak during 16 concurrent uploads: median {med:.0} MiB (min {lo:.0}, max {hi:.0})"
    );
}
