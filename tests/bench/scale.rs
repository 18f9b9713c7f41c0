//! `cargo bench --bench scale`: one `ferry-server` (default config, SQLite metadata, data on
//! disk) as a busy node sees it, to check that the cost of an upload stays flat as the store
//! grows.
//!
//! - **grow**: `FERRY_SCALE_FILES` small files (default 100,000; `FERRY_SCALE_LONG=1` makes it
//!   1,000,000) of `FERRY_SCALE_KIB` KiB (default 4) uploaded with UPLOAD (one frame, durable
//!   before its reply) over `FERRY_SCALE_CONNS` authenticated connections (default 8). Prints
//!   uploads/s and server CPU per upload for each tenth of the files, the last slice against the
//!   first (the baseline: at least 80% is flat), server RSS, the metadata database's size, then
//!   downloads every file back (checked byte for byte) and restarts the server, timing its
//!   start-up (recovery) with that many rows.
//! - **ingest**: durable uploads/s for 1, 10 and 50 clients, 4 KiB and 64 KiB files, each next
//!   to the same number of threads writing and fsyncing files of that size in one directory on
//!   the same disk (what the disk allows without a server), `FERRY_BENCH_RUNS` runs (default 3)
//!   of `FERRY_INGEST_SECS` seconds each (default 3), median and min-max.
//!
//! `FERRY_BENCH_ONLY=grow` or `=ingest` runs one part; `FERRY_BENCH_DIR` picks the disk.

#[path = "../e2e/support/mod.rs"]
mod support;

use ferry_common::proto::{self, DownloadReq, UploadMeta, cmd};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use support::{env_u64, free_addr, median, peak_rss_kib, random_bytes, rss_kib, start_server};

/// The server config: the defaults, with idle connections kept while the clients think.
const CONF: &str = "idle_timeout_ms = 600000\n";

fn main() {
    let only = std::env::var("FERRY_BENCH_ONLY").unwrap_or_default();
    let base = std::env::var("FERRY_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let dir = tempfile::tempdir_in(base).unwrap();
    if only.is_empty() || only == "grow" {
        grow(dir.path());
    }
    if only.is_empty() || only == "ingest" {
        ingest(dir.path());
    }
}

/// One authenticated protocol connection.
struct Conn {
    s: TcpStream,
}

impl Conn {
    fn open(addr: SocketAddr, user: &str) -> Conn {
        let s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut c = Conn { s };
        c.s.write_all(&support::auth::hello_frame("bench", user))
            .unwrap();
        c.reply().expect("HELLO");
        c
    }

    fn reply(&mut self) -> Result<Vec<u8>, String> {
        match support::raw::next_reply(&mut self.s) {
            support::raw::Reply::Ok(_, body) => Ok(body),
            support::raw::Reply::Err(code, text) => Err(format!("error {code:?}: {text}")),
            other => Err(format!("{other:?}")),
        }
    }

    /// Stores `data` with UPLOAD; the reply (the file id) comes once it is durable.
    fn upload(&mut self, data: &[u8]) -> String {
        let meta = UploadMeta {
            key: rand::random(),
            sha256: Sha256::digest(data).into(),
            name: "photo.jpg".into(),
        }
        .encode()
        .unwrap();
        let mut f = proto::data_frame_head(cmd::UPLOAD, 0, &meta, data.len() as u64);
        f.extend_from_slice(data);
        self.s.write_all(&f).unwrap();
        let body = self.reply().expect("UPLOAD");
        proto::decode_file_id(&body).unwrap()
    }

    fn download(&mut self, id: &str, len: u64) -> Vec<u8> {
        let body = DownloadReq {
            file_id: id.into(),
            offset: 0,
            len,
        }
        .encode()
        .unwrap();
        self.s
            .write_all(&proto::frame(cmd::DOWNLOAD, 0, &body))
            .unwrap();
        let b = self.reply().expect("DOWNLOAD");
        b[4..].to_vec()
    }
}

/// User + system CPU seconds of a process so far.
fn cpu_secs(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) are space-separated; utime and
    // stime are fields 14 and 15 of the whole line.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i)?.parse::<f64>().ok())
        .sum();
    // /proc counts in USER_HZ ticks, which the Linux ABI fixes at 100 per second.
    ticks / 100.0
}

/// Bytes of the metadata database with its WAL.
fn db_bytes(data: &Path) -> u64 {
    ["meta.db", "meta.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(data.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

/// The content of file `i`: its number in the first bytes, so every file differs.
fn content(pattern: &[u8], i: u64) -> Vec<u8> {
    let mut d = pattern.to_vec();
    d[..8].copy_from_slice(&i.to_be_bytes());
    d
}

fn grow(dir: &Path) {
    let long = env_u64("FERRY_SCALE_LONG", 0) == 1;
    let total = env_u64("FERRY_SCALE_FILES", if long { 1_000_000 } else { 100_000 });
    let conns = env_u64("FERRY_SCALE_CONNS", 8).max(1);
    let size = (env_u64("FERRY_SCALE_KIB", 4) * 1024).max(8) as usize;
    let slices = 10u64;
    let slice = total.div_ceil(slices);
    let data = dir.join("grow-data");
    let addr = free_addr();
    let mut srv = start_server(dir, "grow", CONF, addr, &data);
    let pid = srv.pid();
    println!(
        "grow: {total} files of {} KiB, {conns} connections, UPLOAD (durable before reply)",
        size / 1024
    );
    println!("| files stored so far | uploads/s | server CPU per upload |");
    println!("|---|---|---|");
    let pattern = random_bytes(size, 26);
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let ids: Arc<parking_lot::Mutex<Vec<(u64, String)>>> = Default::default();
    let workers: Vec<_> = (0..conns)
        .map(|w| {
            let (next, done, ids, pattern) =
                (next.clone(), done.clone(), ids.clone(), pattern.clone());
            std::thread::spawn(move || {
                let mut c = Conn::open(addr, &format!("user{w}"));
                let mut mine = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= total {
                        break;
                    }
                    mine.push((i, c.upload(&content(&pattern, i))));
                    done.fetch_add(1, Ordering::SeqCst);
                }
                ids.lock().extend(mine);
            })
        })
        .collect();
    let mut rates = Vec::new();
    let (mut t0, mut cpu0, mut n0) = (Instant::now(), cpu_secs(pid), 0u64);
    let start = t0;
    for s in 1..=slices {
        let end = (s * slice).min(total);
        while done.load(Ordering::SeqCst) < end {
            assert!(
                workers.iter().any(|w| !w.is_finished()),
                "the uploaders stopped at {} files",
                done.load(Ordering::SeqCst)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let (t, cpu) = (Instant::now(), cpu_secs(pid));
        let n = end - n0;
        let rate = n as f64 / (t - t0).as_secs_f64();
        rates.push(rate);
        println!(
            "| {n0}-{end} | {rate:.0} | {:.2} ms |",
            (cpu - cpu0) * 1000.0 / n as f64
        );
        (t0, cpu0, n0) = (t, cpu, end);
    }
    for w in workers {
        w.join().unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let (first, last) = (rates[0], rates[rates.len() - 1]);
    println!(
        "grow: {total} uploads in {secs:.1} s ({:.0}/s); last slice {:.0}% of the first ({})",
        total as f64 / secs,
        100.0 * last / first,
        if last >= 0.8 * first {
            "flat"
        } else {
            "NOT FLAT: the per-upload cost grows with the store"
        }
    );
    println!(
        "grow: server CPU {:.1} s ({:.2} ms per upload), RSS {} MiB (peak {} MiB), metadata {:.1} MiB ({} bytes per file)",
        cpu_secs(pid),
        cpu_secs(pid) * 1000.0 / total as f64,
        rss_kib(pid) / 1024,
        peak_rss_kib(pid) / 1024,
        db_bytes(&data) as f64 / (1 << 20) as f64,
        db_bytes(&data) / total
    );

    // Every file back, byte for byte, spread over the same connections.
    let ids = Arc::new(std::mem::take(&mut *ids.lock()));
    let t = Instant::now();
    let readers: Vec<_> = (0..conns)
        .map(|w| {
            let (ids, pattern) = (ids.clone(), pattern.clone());
            std::thread::spawn(move || {
                let mut c = Conn::open(addr, &format!("reader{w}"));
                for (i, id) in ids.iter().skip(w as usize).step_by(conns as usize) {
                    assert!(
                        c.download(id, size as u64) == content(&pattern, *i),
                        "file {i} ({id}) came back different"
                    );
                }
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }
    println!(
        "grow: {} downloads checked in {:.1} s ({:.0}/s)",
        ids.len(),
        t.elapsed().as_secs_f64(),
        ids.len() as f64 / t.elapsed().as_secs_f64()
    );

    // Start-up with that many rows: SIGTERM, start again, time until it answers.
    srv.signal(nix::sys::signal::Signal::SIGTERM);
    srv.wait_exit(Duration::from_secs(60));
    drop(srv);
    let t = Instant::now();
    let srv = start_server(dir, "grow-again", CONF, addr, &data);
    println!(
        "grow: restart with {total} files answered after {:.2} s (RSS {} MiB)",
        t.elapsed().as_secs_f64(),
        rss_kib(srv.pid()) / 1024
    );
    let mut c = Conn::open(addr, "after");
    let (i, id) = &ids[ids.len() / 2];
    assert!(c.download(id, size as u64) == content(&pattern, *i));
}

/// Durable uploads/s for each client count and size, next to the disk's write+fsync rate.
fn ingest(dir: &Path) {
    let runs = env_u64("FERRY_BENCH_RUNS", 3).max(1);
    let secs = env_u64("FERRY_INGEST_SECS", 3).max(1);
    println!(
        "ingest: durable uploads/s, {runs} runs of {secs} s, median (min-max); disk = threads writing + fsyncing files of that size"
    );
    println!("| clients | size | ferry uploads/s | disk files/s | ferry / disk |");
    println!("|---|---|---|---|---|");
    let data = dir.join("ingest-data");
    let addr = free_addr();
    let srv = start_server(dir, "ingest", CONF, addr, &data);
    for kib in [4usize, 64] {
        for clients in [1u64, 10, 50] {
            let (mut ferry, mut disk) = (Vec::new(), Vec::new());
            for run in 0..runs {
                ferry.push(ferry_rate(addr, clients, kib * 1024, secs));
                disk.push(disk_rate(
                    &dir.join(format!("disk-{run}")),
                    clients,
                    kib * 1024,
                    secs,
                ));
            }
            let (f, fmin, fmax) = median(&ferry);
            let (d, dmin, dmax) = median(&disk);
            println!(
                "| {clients} | {kib} KiB | {f:.0} ({fmin:.0}-{fmax:.0}) | {d:.0} ({dmin:.0}-{dmax:.0}) | {:.0}% |",
                100.0 * f / d
            );
        }
    }
    println!("ingest: server RSS {} MiB", rss_kib(srv.pid()) / 1024);
}

/// Runs `threads` copies of `f(thread, stop)` for `secs` seconds; returns completions per second.
fn for_secs(threads: u64, secs: u64, f: impl Fn(u64, &AtomicBool) -> u64 + Sync) -> f64 {
    let stop = AtomicBool::new(false);
    let t = Instant::now();
    let n: u64 = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|i| {
                let (f, stop) = (&f, &stop);
                s.spawn(move || f(i, stop))
            })
            .collect();
        std::thread::sleep(Duration::from_secs(secs));
        stop.store(true, Ordering::SeqCst);
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    });
    n as f64 / t.elapsed().as_secs_f64()
}

fn ferry_rate(addr: SocketAddr, clients: u64, size: usize, secs: u64) -> f64 {
    let pattern = random_bytes(size, 64);
    let conns: Vec<parking_lot::Mutex<Conn>> = (0..clients)
        .map(|i| parking_lot::Mutex::new(Conn::open(addr, &format!("ingest{i}"))))
        .collect();
    let seq = AtomicU64::new(0);
    for_secs(clients, secs, |i, stop| {
        let mut c = conns[i as usize].lock();
        let mut n = 0;
        while !stop.load(Ordering::SeqCst) {
            c.upload(&content(&pattern, seq.fetch_add(1, Ordering::SeqCst)));
            n += 1;
        }
        n
    })
}

/// Files of `size` bytes written and fsynced by `threads` threads in one directory (which is
/// fsynced too, as a new file's name must be).
fn disk_rate(dir: &Path, threads: u64, size: usize, secs: u64) -> f64 {
    std::fs::create_dir_all(dir).unwrap();
    let pattern = random_bytes(size, 65);
    let rate = for_secs(threads, secs, |i, stop| {
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let path = dir.join(format!("{i}-{n}"));
            let mut f = std::fs::File::create(&path).unwrap();
            f.write_all(&pattern).unwrap();
            f.sync_all().unwrap();
            std::fs::File::open(dir).unwrap().sync_all().unwrap();
            n += 1;
        }
        n
    });
    std::fs::remove_dir_all(dir).unwrap();
    rate
}
