//! End-to-end tests of ferry-proxy: real proxy processes on loopback, in front of a small
//! upstream written here (the storage server is developed separately). The upstream answers
//! PROBE with a server identity and, after reading a HELLO, does what the HELLO's app id says:
//! "echo" (send everything back, pass the FIN on), "sink" (count and checksum everything, reply
//! with count + CRC32C after the FIN) or "source" (user id = byte count: send that many pattern
//! bytes, then FIN, then wait for the client's FIN). Started with link keys, it wants a valid
//! LINK proof before the HELLO, as a ferry-server with `[link.accept]` does.

use crate::support;

use ferry_common::auth::{LinkConfig, LinkVerifier, SigningKey, new_secret};
use ferry_common::proto::{self, ErrorBody, ErrorCode, Header, Hello, Identity, Role, cmd};
use nix::sys::signal::Signal;
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use support::{Proc, fd_count, free_addr, rss_kib, wait_ready};

const MIB: usize = 1024 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Deterministic test data.

/// An endless xorshift byte stream; two instances with the same seed agree byte for byte, however
/// the stream is cut into pieces.
struct Pattern {
    x: u64,
    word: [u8; 8],
    used: usize,
}

impl Pattern {
    fn new(seed: u64) -> Self {
        Pattern {
            x: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
            word: [0; 8],
            used: 8,
        }
    }
    fn fill(&mut self, out: &mut [u8]) {
        let mut out = out;
        // Finish the current word, then whole words, then start a new one.
        while self.used < 8 && !out.is_empty() {
            out[0] = self.word[self.used];
            self.used += 1;
            out = &mut out[1..];
        }
        let mut chunks = out.chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            self.word = self.next().to_le_bytes();
            let n = rest.len();
            rest.copy_from_slice(&self.word[..n]);
            self.used = n;
        }
    }
    fn next(&mut self) -> u64 {
        self.x ^= self.x << 13;
        self.x ^= self.x >> 7;
        self.x ^= self.x << 17;
        self.x
    }
}

/// Checks a received stream against the pattern, in whatever pieces it arrives.
struct Verifier {
    pat: Pattern,
    spare: Vec<u8>,
    at: u64,
}

impl Verifier {
    fn new(seed: u64) -> Self {
        Verifier {
            pat: Pattern::new(seed),
            spare: Vec::new(),
            at: 0,
        }
    }
    fn check(&mut self, got: &[u8]) {
        let mut got = got;
        while !got.is_empty() {
            if self.spare.is_empty() {
                let mut block = vec![0u8; 8 * 1024];
                self.pat.fill(&mut block);
                self.spare = block;
                self.spare.reverse();
            }
            let n = got.len().min(self.spare.len());
            for &b in &got[..n] {
                let want = self.spare.pop().unwrap();
                assert_eq!(b, want, "byte {} differs", self.at);
                self.at += 1;
            }
            got = &got[n..];
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The test upstream.

struct Upstream {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    /// Sessions that sent a HELLO.
    served: Arc<AtomicUsize>,
    /// Bytes "source" sessions have written so far.
    sourced: Arc<AtomicU64>,
    /// Sessions whose handler has returned (the connection is closed).
    finished: Arc<AtomicUsize>,
    /// Link proofs accepted, and sessions refused for a missing or bad one.
    links: Arc<AtomicUsize>,
    link_refused: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Upstream {
    fn start(addr: SocketAddr) -> Upstream {
        Upstream::start_with(addr, None)
    }

    /// An upstream that wants a LINK proof checked by `link` (shared between upstreams, a
    /// proof used twice anywhere is a replay).
    fn start_linked(addr: SocketAddr, link: Arc<LinkVerifier>) -> Upstream {
        Upstream::start_with(addr, Some(link))
    }

    fn start_with(addr: SocketAddr, link: Option<Arc<LinkVerifier>>) -> Upstream {
        let t = Instant::now();
        let listener = loop {
            match ferry_common::net::listen(addr, 1024) {
                Ok(l) => break l,
                Err(e) if t.elapsed() < Duration::from_secs(5) => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("test upstream cannot listen on {addr}: {e}"),
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let served = Arc::new(AtomicUsize::new(0));
        let sourced = Arc::new(AtomicU64::new(0));
        let finished = Arc::new(AtomicUsize::new(0));
        let links = Arc::new(AtomicUsize::new(0));
        let link_refused = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (stop, conns, served, sourced, finished) = (
                stop.clone(),
                conns.clone(),
                served.clone(),
                sourced.clone(),
                finished.clone(),
            );
            let (links, link_refused) = (links.clone(), link_refused.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            s.set_nonblocking(false).unwrap();
                            if let Ok(c) = s.try_clone() {
                                conns.lock().unwrap().push(c);
                            }
                            let (served, sourced) = (served.clone(), sourced.clone());
                            let finished = finished.clone();
                            let link = link.clone();
                            let (links, link_refused) = (links.clone(), link_refused.clone());
                            std::thread::spawn(move || {
                                if linked(&s, link.as_deref(), &links, &link_refused) {
                                    serve(s, &served, &sourced);
                                }
                                finished.fetch_add(1, Ordering::SeqCst);
                            });
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(2))
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        Upstream {
            addr,
            stop,
            conns,
            served,
            sourced,
            finished,
            links,
            link_refused,
            thread: Some(thread),
        }
    }

    /// Dies: stops listening and cuts every live connection.
    fn kill(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One whole frame, at most 4 KiB of body (all a stand-in peer is ever sent here).
fn read_frame(s: &mut TcpStream) -> std::io::Result<(Header, Vec<u8>)> {
    support::raw::read_frame(s, 4096)
}

/// With link keys: reads the LINK frame and checks it, answering error 6 and closing on a
/// missing or bad one (a PROBE is answered without one). Returns whether the session goes on.
fn linked(
    s: &TcpStream,
    link: Option<&LinkVerifier>,
    links: &AtomicUsize,
    refused: &AtomicUsize,
) -> bool {
    let Some(v) = link else {
        return true;
    };
    let mut s = s.try_clone().unwrap();
    let why = match read_frame(&mut s) {
        Ok((h, _)) if h.cmd == cmd::PROBE => {
            let id = Identity {
                version: proto::VERSION,
                role: Role::Server,
            };
            let _ = s.write_all(&proto::frame(cmd::REPLY_STORAGE, 0, &id.encode()));
            return false;
        }
        Ok((h, body)) if h.cmd == cmd::LINK => match v.verify(&body) {
            Ok(_) => {
                links.fetch_add(1, Ordering::SeqCst);
                return true;
            }
            Err(e) => format!("link proof not valid: {e}"),
        },
        Ok((h, _)) => format!("link proof required, got {}", cmd::name(h.cmd)),
        Err(e) => format!("no frame: {e}"),
    };
    refused.fetch_add(1, Ordering::SeqCst);
    let _ = s.write_all(&ErrorBody::new(ErrorCode::Auth, why).frame(cmd::REPLY_STORAGE));
    false
}

fn serve(mut s: TcpStream, served: &AtomicUsize, sourced: &AtomicU64) {
    let Ok((h, body)) = read_frame(&mut s) else {
        return;
    };
    if h.cmd == cmd::PROBE {
        let id = Identity {
            version: proto::VERSION,
            role: Role::Server,
        };
        let _ = s.write_all(&proto::frame(cmd::REPLY_STORAGE, 0, &id.encode()));
        return;
    }
    assert_eq!(
        h.cmd,
        cmd::HELLO,
        "test upstream got a non-HELLO first frame"
    );
    let hello = Hello::decode(&body).expect("HELLO relayed intact");
    served.fetch_add(1, Ordering::SeqCst);
    let mut buf = vec![0u8; 64 * 1024];
    match hello.app.as_str() {
        "echo" => {
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = s.shutdown(Shutdown::Write);
        }
        "sink" => {
            let (mut count, mut crc) = (0u64, 0u32);
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        count += n as u64;
                        crc = crc32c::crc32c_append(crc, &buf[..n]);
                    }
                    Err(_) => return,
                }
            }
            let mut reply = count.to_be_bytes().to_vec();
            reply.extend_from_slice(&crc.to_be_bytes());
            let _ = s.write_all(&reply);
            let _ = s.shutdown(Shutdown::Write);
        }
        "source" => {
            let total: u64 = hello.user.parse().expect("source size in the user id");
            let mut pat = Pattern::new(total);
            let mut left = total;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                pat.fill(&mut buf[..n]);
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
                sourced.fetch_add(n as u64, Ordering::SeqCst);
                left -= n as u64;
            }
            let _ = s.shutdown(Shutdown::Write);
            while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
        }
        other => panic!("unknown test mode {other}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Proxies and clients.

struct Proxy {
    proc: Proc,
    addr: SocketAddr,
    stats: SocketAddr,
}

impl Proxy {
    fn start(dir: &Path, name: &str, upstreams: &[SocketAddr], extra: &str) -> Proxy {
        Proxy::start_at(dir, name, free_addr(), upstreams, extra)
    }

    fn start_at(
        dir: &Path,
        name: &str,
        addr: SocketAddr,
        upstreams: &[SocketAddr],
        extra: &str,
    ) -> Proxy {
        let stats = free_addr();
        let ups: Vec<String> = upstreams.iter().map(|a| format!("\"{a}\"")).collect();
        let conf = dir.join(format!("{name}.toml"));
        std::fs::write(
            &conf,
            format!(
                "listen = \"{addr}\"\nupstreams = [{}]\nstats_listen = \"{stats}\"\n\
                 workers = 2\n{extra}\n",
                ups.join(", ")
            ),
        )
        .unwrap();
        Proxy::launch(
            dir,
            name,
            addr,
            stats,
            &conf,
            Command::new(support::bin("ferry-proxy")),
        )
    }

    /// Runs `cmd` (the proxy binary, maybe behind a wrapper) on `conf`.
    fn launch(
        dir: &Path,
        name: &str,
        addr: SocketAddr,
        stats: SocketAddr,
        conf: &Path,
        mut cmd: Command,
    ) -> Proxy {
        cmd.arg("--config").arg(conf);
        let proc = Proc::spawn(name, &mut cmd, dir);
        let id = wait_ready(addr, Duration::from_secs(20));
        assert_eq!(id.role, Role::Proxy, "the proxy answers PROBE itself");
        Proxy { proc, addr, stats }
    }

    fn stats(&self) -> HashMap<String, u64> {
        let mut s = TcpStream::connect(self.stats).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text.lines()
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    }

    fn stat(&self, name: &str) -> u64 {
        *self
            .stats()
            .get(name)
            .unwrap_or_else(|| panic!("no stat {name}"))
    }
}

fn hello_frame(app: &str, user: &str) -> Vec<u8> {
    proto::frame(cmd::HELLO, 0, &Hello::new(app, user, b"").encode().unwrap())
}

/// Opens a session through `proxy` with a HELLO for the given test mode.
fn session(proxy: SocketAddr, app: &str, user: &str) -> TcpStream {
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(&hello_frame(app, user)).unwrap();
    s
}

/// Sends `size` pattern bytes through an echo session (writes of `piece` bytes, or random small
/// writes if `piece` is 0) while reading them back, and checks every byte and the final FIN.
fn echo(proxy: SocketAddr, size: usize, piece: usize, seed: u64) {
    let s = session(proxy, "echo", "u");
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut pat = Pattern::new(seed);
        let mut buf = vec![0u8; piece.max(1)];
        let mut left = size;
        let mut x = seed | 1;
        while left > 0 {
            let n = if piece == 0 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 33) as usize % 200 + 1).min(left)
            } else {
                piece.min(left)
            };
            if buf.len() < n {
                buf.resize(n, 0);
            }
            pat.fill(&mut buf[..n]);
            w.write_all(&buf[..n]).unwrap();
            left -= n;
            if piece == 0 && x.is_multiple_of(64) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut r = s;
    let mut v = Verifier::new(seed);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        v.check(&buf[..n]);
    }
    writer.join().unwrap();
    assert_eq!(v.at, size as u64, "echoed byte count for size {size}");
}

/// Downloads `size` bytes from a "source" session, checking them.
fn source(proxy: SocketAddr, size: u64) {
    let mut s = session(proxy, "source", &size.to_string());
    let mut v = Verifier::new(size);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        v.check(&buf[..n]);
    }
    assert_eq!(v.at, size);
}

/// Uploads `size` bytes to a "sink" session and checks the count and CRC the upstream saw.
fn sink(proxy: SocketAddr, size: usize, seed: u64) {
    let mut s = session(proxy, "sink", "u");
    let mut pat = Pattern::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let (mut left, mut crc) = (size, 0u32);
    while left > 0 {
        let n = left.min(buf.len());
        pat.fill(&mut buf[..n]);
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        s.write_all(&buf[..n]).unwrap();
        left -= n;
    }
    s.shutdown(Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).unwrap();
    assert_eq!(reply.len(), 12, "sink reply");
    assert_eq!(
        u64::from_be_bytes(reply[..8].try_into().unwrap()),
        size as u64
    );
    assert_eq!(u32::from_be_bytes(reply[8..].try_into().unwrap()), crc);
}

/// True if the peer closed (EOF or reset) within `limit`.
fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    let t = Instant::now();
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {
                if t.elapsed() > limit {
                    return false;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

fn expect_error_frame(s: &mut TcpStream, code: ErrorCode) {
    let (h, body) = read_frame(s).expect("an error frame");
    assert_eq!((h.cmd, h.status), (cmd::REPLY_PROXY, proto::status::ERROR));
    assert_eq!(ErrorBody::decode(&body).unwrap().code, code);
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Byte exactness.

const SIZES: [usize; 6] = [0, 1, 64 * 1024 - 1, 64 * 1024, 64 * 1024 + 1, 100 * MIB];

fn exact_sizes(zero_copy: bool, chain: bool) {
    let dir = tmp();
    let up = Upstream::start(free_addr());
    let extra = format!("zero_copy = {zero_copy}");
    let back = Proxy::start(dir.path(), "server-proxy", &[up.addr], &extra);
    let front = chain.then(|| Proxy::start(dir.path(), "client-proxy", &[back.addr], &extra));
    let entry = front.as_ref().map_or(back.addr, |p| p.addr);
    let mode = if zero_copy {
        "splice"
    } else {
        "userspace buffer"
    };
    for p in [Some(&back), front.as_ref()].into_iter().flatten() {
        assert!(
            p.proc.log_text().contains(&format!("relay mode: {mode}")),
            "mode not logged: {}",
            p.proc.log_text()
        );
    }
    for (i, &size) in SIZES.iter().enumerate() {
        echo(entry, size, 64 * 1024, i as u64 + 1);
    }
    // One direction at a time too: upload with a half-close, then a download.
    sink(entry, 64 * 1024 + 1, 7);
    source(entry, 100 * MIB as u64);
    source(entry, 0);
    assert_eq!(up.served(), SIZES.len() + 3);
    let st = back.stats();
    assert!(
        st["bytes_up"] >= (100 * MIB + 3 * 64 * 1024) as u64,
        "{st:?}"
    );
    assert!(st["bytes_down"] >= (200 * MIB) as u64, "{st:?}");
    assert_eq!(st["zero_copy"], zero_copy as u64);
}

#[test]
fn exact_bytes_one_proxy_splice() {
    exact_sizes(true, false);
}

#[test]
fn exact_bytes_chain_splice() {
    exact_sizes(true, true);
}

#[test]
fn exact_bytes_one_proxy_userspace() {
    exact_sizes(false, false);
}

#[test]
fn exact_bytes_chain_userspace() {
    exact_sizes(false, true);
}

#[test]
fn random_small_writes_both_modes_through_a_chain() {
    let dir = tmp();
    let up = Upstream::start(free_addr());
    let b = Proxy::start(
        dir.path(),
        "sp",
        &[up.addr],
        "zero_copy = true\npipe_size = 4096",
    );
    let a = Proxy::start(
        dir.path(),
        "cp",
        &[b.addr],
        "zero_copy = false\npipe_size = 4096",
    );
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let addr = a.addr;
            std::thread::spawn(move || echo(addr, 150_000 + i * 7919, 0, 100 + i as u64))
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    sink(a.addr, 300_001, 9);
}

// ---------------------------------------------------------------------------------------------
// Backpressure: a slow reader while a big stream crosses. 1 GiB is scaled down to 256 MiB by
// default (FERRY_TEST_SLOW_MIB=1024 for the full size); the bound checked is the same.

fn slow_reader(zero_copy: bool) {
    let dir = tmp();
    let up = Upstream::start(free_addr());
    let p = Proxy::start(
        dir.path(),
        "proxy",
        &[up.addr],
        &format!("zero_copy = {zero_copy}"),
    );
    let pid = p.proc.pid();
    let base = rss_kib(pid);
    // FERRY_TEST_SLOW_MIB=1024 runs the full 1 GiB.
    let total = std::env::var("FERRY_TEST_SLOW_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(256)
        * MIB as u64;
    let mut s = session(p.addr, "source", &total.to_string());
    let mut v = Verifier::new(total);
    let mut buf = vec![0u8; 16 * 1024];
    let (mut peak_rss, mut peak_ahead) = (0u64, 0u64);
    // Slow phase: ~3 MB/s for 2 s while the upstream could send at GB/s.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(2) {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0);
        v.check(&buf[..n]);
        std::thread::sleep(Duration::from_millis(5));
        peak_rss = peak_rss.max(rss_kib(pid));
        peak_ahead = peak_ahead.max(up.sourced.load(Ordering::SeqCst) - v.at);
    }
    // The upstream was held back: only socket buffers and one pipe's worth are in flight.
    assert!(
        peak_ahead < 48 * MIB as u64,
        "upstream ran {peak_ahead} bytes ahead of the slow reader"
    );
    assert!(up.sourced.load(Ordering::SeqCst) < total / 2);
    let mut big = vec![0u8; 256 * 1024];
    loop {
        let n = s.read(&mut big).unwrap();
        if n == 0 {
            break;
        }
        v.check(&big[..n]);
        peak_rss = peak_rss.max(rss_kib(pid));
    }
    assert_eq!(v.at, total);
    assert!(
        peak_rss < base + 16 * 1024,
        "proxy RSS grew from {base} KiB to {peak_rss} KiB while relaying"
    );
}

#[test]
fn slow_reader_bounds_memory_splice() {
    slow_reader(true);
}

#[test]
fn slow_reader_bounds_memory_userspace() {
    slow_reader(false);
}

// ---------------------------------------------------------------------------------------------
// First frame handling.

#[test]
fn probe_and_bad_first_frames_are_answered_by_the_proxy() {
    let dir = tmp();
    let dead = free_addr();
    let p = Proxy::start(dir.path(), "proxy", &[dead], "connect_timeout_ms = 300");
    let id = support::probe(p.addr, Duration::from_secs(2)).unwrap();
    assert_eq!(id.role, Role::Proxy);
    // A non-HELLO first frame.
    let mut s = TcpStream::connect(p.addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(&proto::frame(cmd::STAT, 0, &[0u8; 128]))
        .unwrap();
    expect_error_frame(&mut s, ErrorCode::HelloRequired);
    assert!(closed_within(&mut s, Duration::from_secs(2)));
    // A HELLO with an oversized length is refused from its header.
    let mut s = TcpStream::connect(p.addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(&Header::new(cmd::HELLO, 0, 1 << 40).encode())
        .unwrap();
    expect_error_frame(&mut s, ErrorCode::TooLarge);
    // No upstream reachable: error 19.
    let mut s = session(p.addr, "echo", "u");
    expect_error_frame(&mut s, ErrorCode::Upstream);
    assert!(closed_within(&mut s, Duration::from_secs(2)));
    let st = p.stats();
    assert_eq!(st["no_upstream"], 1);
    assert!(st["probes_answered"] >= 2, "{st:?}");
    assert_eq!(st["rejected"], 2);
}

// ---------------------------------------------------------------------------------------------
// Failover and failback.

#[test]
fn primary_down_at_start_sessions_go_to_standby() {
    let dir = tmp();
    let primary = free_addr(); // nothing listens there
    let standby = Upstream::start(free_addr());
    let p = Proxy::start(
        dir.path(),
        "proxy",
        &[primary, standby.addr],
        "check_interval_ms = 200\nconnect_timeout_ms = 300",
    );
    // Before the health check has marked it down, the refused connect fails over.
    echo(p.addr, 1000, 100, 1);
    // Then sessions go straight to the standby once it is marked down.
    let primary_up = format!("upstream_up{{addr=\"{primary}\",role=\"primary\"}}");
    support::wait_until("the primary marked down", Duration::from_secs(5), || {
        p.stat(&primary_up) == 0
    });
    for i in 0..5 {
        echo(p.addr, 10_000, 1000, i);
    }
    assert_eq!(standby.served(), 6);
    let st = p.stats();
    assert!(st["failovers"] >= 1, "{st:?}");
    assert_eq!(st["standby_sessions"], 6);
    assert_eq!(
        st[&format!("upstream_up{{addr=\"{primary}\",role=\"primary\"}}")],
        0
    );
    assert_eq!(
        st[&format!("upstream_up{{addr=\"{}\",role=\"standby\"}}", standby.addr)],
        1
    );
}

#[test]
fn a_port_that_is_open_but_not_ferry_is_marked_down() {
    let dir = tmp();
    // Accepts, reads, answers garbage: not a ferry process.
    let impostor = TcpListener::bind("127.0.0.1:0").unwrap();
    let iaddr = impostor.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    impostor.set_nonblocking(true).unwrap();
    let t = std::thread::spawn(move || {
        while !flag.load(Ordering::SeqCst) {
            if let Ok((mut c, _)) = impostor.accept() {
                let _ = c.write_all(b"SSH-2.0-OpenSSH\r\n");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let standby = Upstream::start(free_addr());
    let p = Proxy::start(
        dir.path(),
        "proxy",
        &[iaddr, standby.addr],
        "check_interval_ms = 100\nfall = 2",
    );
    let t0 = Instant::now();
    let key = format!("upstream_up{{addr=\"{iaddr}\",role=\"primary\"}}");
    while p.stat(&key) != 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "impostor never marked down"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    echo(p.addr, 5000, 500, 3);
    assert_eq!(standby.served(), 1);
    stop.store(true, Ordering::SeqCst);
    t.join().unwrap();
}

#[test]
fn primary_killed_mid_session_then_failback() {
    let dir = tmp();
    let paddr = free_addr();
    let mut primary = Upstream::start(paddr);
    let standby = Upstream::start(free_addr());
    let interval = Duration::from_millis(300);
    let p = Proxy::start(
        dir.path(),
        "proxy",
        &[paddr, standby.addr],
        "check_interval_ms = 300\nrise = 1\nfall = 1\nconnect_timeout_ms = 300",
    );
    // A live session on the primary.
    let mut s = session(p.addr, "echo", "u");
    s.write_all(b"ping").unwrap();
    let mut four = [0u8; 4];
    s.read_exact(&mut four).unwrap();
    assert_eq!(&four, b"ping");
    assert_eq!(primary.served(), 1);
    // Kill the primary: the front must be closed at once.
    let t = Instant::now();
    primary.kill();
    assert!(
        closed_within(&mut s, Duration::from_secs(1)),
        "front not closed within 1 s of the upstream dying"
    );
    assert!(t.elapsed() < Duration::from_secs(1));
    // New sessions go to the standby.
    echo(p.addr, 10_000, 1000, 5);
    assert_eq!(standby.served(), 1);
    // Keep a session open on the standby across the failback.
    let mut live = session(p.addr, "echo", "u");
    live.write_all(b"before").unwrap();
    let mut six = [0u8; 6];
    live.read_exact(&mut six).unwrap();
    assert_eq!(standby.served(), 2);
    // The health check marks the primary down (within a few periods); then it comes back.
    let key = format!("upstream_up{{addr=\"{paddr}\",role=\"primary\"}}");
    support::wait_until("the primary marked down", interval * 10, || {
        p.stat(&key) == 0
    });
    let primary = Upstream::start(paddr);
    let back_at = Instant::now();
    loop {
        echo(p.addr, 100, 100, 6);
        if primary.served() > 0 {
            break;
        }
        assert!(
            back_at.elapsed() < interval * 2,
            "no failback within two check periods"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Failback did not cut the live standby session.
    live.write_all(b"after!").unwrap();
    live.read_exact(&mut six).unwrap();
    assert_eq!(&six, b"after!");
    live.shutdown(Shutdown::Write).unwrap();
    assert!(closed_within(&mut live, Duration::from_secs(2)));
    assert!(p.stat("upstream_lost") >= 1);
}

// ---------------------------------------------------------------------------------------------
// Limits.

#[test]
fn thousand_concurrent_sessions_release_fds_and_memory() {
    let dir = tmp();
    let up = Upstream::start(free_addr());
    let p = Proxy::start(dir.path(), "proxy", &[up.addr], "max_connections = 2000");
    let pid = p.proc.pid();
    echo(p.addr, 1000, 1000, 1); // warm up threads and allocator
    std::thread::sleep(Duration::from_millis(200));
    let (fd0, rss0) = (fd_count(pid), rss_kib(pid));
    let mut live = Vec::new();
    for i in 0..1000u32 {
        let mut s = session(p.addr, "echo", "u");
        let msg = i.to_be_bytes();
        s.write_all(&msg).unwrap();
        let mut got = [0u8; 4];
        s.read_exact(&mut got).unwrap();
        assert_eq!(got, msg);
        live.push(s);
    }
    let (fd1, rss1) = (fd_count(pid), rss_kib(pid));
    assert_eq!(p.stat("sessions_active"), 1000);
    // Two sockets and two pipes (four fds) per spliced session.
    assert!(fd1 >= fd0 + 2000, "fds {fd0} -> {fd1}");
    assert!(rss1 < 64 * 1024, "RSS at 1000 sessions: {rss1} KiB");
    for s in &live {
        s.shutdown(Shutdown::Write).unwrap();
    }
    for mut s in live {
        assert!(closed_within(&mut s, Duration::from_secs(5)));
    }
    support::wait_until(
        &format!("fds back to the baseline of {fd0}, no session active"),
        Duration::from_secs(5),
        || fd_count(pid) <= fd0 && p.stat("sessions_active") == 0,
    );
    let rss2 = rss_kib(pid);
    eprintln!(
        "proxy: fds {fd0} -> {fd1} -> {}; RSS {rss0} -> {rss1} -> {rss2} KiB",
        fd_count(pid)
    );
    assert!(
        rss2 <= rss1 + 1024 && rss2 < rss0 + 16 * 1024,
        "RSS {rss0} -> {rss1} -> {rss2}"
    );
}

#[test]
fn idle_peers_are_dropped() {
    let dir = tmp();
    let up = Upstream::start(free_addr());
    let p = Proxy::start(
        dir.path(),
        "proxy",
        &[up.addr],
        "hello_timeout_ms = 400\nidle_timeout_ms = 1000",
    );
    // Connects and sends nothing: dropped at the HELLO deadline.
    let t = Instant::now();
    let mut silent = TcpStream::connect(p.addr).unwrap();
    assert!(closed_within(&mut silent, Duration::from_secs(3)));
    let e = t.elapsed();
    assert!(
        e >= Duration::from_millis(350) && e < Duration::from_secs(2),
        "{e:?}"
    );
    // Sends a HELLO, then nothing: dropped after the idle timeout.
    let t = Instant::now();
    let mut quiet = session(p.addr, "echo", "u");
    // A chatty session in parallel stays up past the idle timeout.
    let mut chatty = session(p.addr, "echo", "u");
    for _ in 0..8 {
        chatty.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        chatty.read_exact(&mut b).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(closed_within(&mut quiet, Duration::from_secs(3)));
    let e = t.elapsed();
    assert!(
        e >= Duration::from_millis(900) && e < Duration::from_secs(4),
        "{e:?}"
    );
    chatty.write_all(b"y").unwrap();
    let mut b = [0u8; 1];
    chatty.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"y");
}

/// Each established echo session still carries bytes both ways.
fn echo_each(est: &mut [TcpStream]) {
    for (i, s) in est.iter_mut().enumerate() {
        let msg = [i as u8; 1000];
        s.write_all(&msg).unwrap();
        let mut got = [0u8; 1000];
        s.read_exact(&mut got).unwrap();
        assert_eq!(got, msg);
    }
}

/// Sessions are capped by the descriptors they hold: under a 300-descriptor limit the proxy
/// takes (300 - 64) / 6 = 39 splice sessions and logs it; a flood past that is refused with
/// error 17, never met with EMFILE, and the sessions in place carry on.
#[test]
fn sessions_are_capped_by_the_open_file_limit() {
    if !support::have("prlimit") {
        return;
    }
    let dir = tmp();
    let up = Upstream::start(free_addr());
    let (addr, stats) = (free_addr(), free_addr());
    let conf = dir.path().join("limited.toml");
    std::fs::write(
        &conf,
        format!(
            "listen = \"{addr}\"\nupstreams = [\"{}\"]\nstats_listen = \"{stats}\"\n",
            up.addr
        ),
    )
    .unwrap();
    let mut cmd = Command::new("prlimit");
    cmd.arg("--nofile=300:300").arg(support::bin("ferry-proxy"));
    let p = Proxy::launch(dir.path(), "limited", addr, stats, &conf, cmd);
    let log = p.proc.log_text();
    assert!(
        log.contains("max_connections lowered from 4096 to 39"),
        "{log}"
    );
    let (mut est, mut refused) = (Vec::new(), 0);
    for _ in 0..60 {
        let mut s = session(p.addr, "echo", "u");
        let _ = s.write_all(b"hi");
        let mut b = [0u8; 2];
        match s.read_exact(&mut b) {
            Ok(()) if &b == b"hi" => est.push(s),
            // The error frame's header starts with its length, and the proxy closes.
            _ => refused += 1,
        }
    }
    assert_eq!((est.len(), refused), (39, 21));
    let log = p.proc.log_text();
    assert!(
        !log.contains("cannot create a pipe") && !log.contains("accept failed"),
        "{log}"
    );
    echo_each(&mut est);
}

#[test]
fn flood_past_the_limit_is_refused_and_established_sessions_continue() {
    let dir = tmp();
    let up = Upstream::start(free_addr());
    let p = Proxy::start(dir.path(), "proxy", &[up.addr], "max_connections = 10");
    let mut est: Vec<TcpStream> = (0..10)
        .map(|_| {
            let mut s = session(p.addr, "echo", "u");
            s.write_all(b"hi").unwrap();
            let mut b = [0u8; 2];
            s.read_exact(&mut b).unwrap();
            s
        })
        .collect();
    assert_eq!(up.served(), 10);
    let mut refused = 0;
    for _ in 0..50 {
        let Ok(mut s) = TcpStream::connect(p.addr) else {
            refused += 1;
            continue;
        };
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        match support::raw::next_reply(&mut s) {
            support::raw::Reply::Err(ErrorCode::Limit, _) | support::raw::Reply::Closed => {
                refused += 1
            }
            support::raw::Reply::Waiting => panic!("a connection past the limit was kept open"),
            other => panic!("a connection past the limit was answered {other:?}"),
        }
    }
    assert_eq!(refused, 50);
    assert_eq!(
        up.served(),
        10,
        "nothing past the limit reached the upstream"
    );
    assert!(p.stat("refused") >= 50);
    echo_each(&mut est);
    // Room again once one session ends.
    let mut one = est.pop().unwrap();
    one.shutdown(Shutdown::Write).unwrap();
    assert!(closed_within(&mut one, Duration::from_secs(2)));
    std::thread::sleep(Duration::from_millis(100));
    echo(p.addr, 1000, 100, 2);
}

#[test]
fn sigterm_drains_sessions_then_exits() {
    let dir = tmp();
    let up = Upstream::start(free_addr());
    let mut p = Proxy::start(dir.path(), "proxy", &[up.addr], "shutdown_grace_ms = 2500");
    let mut busy = session(p.addr, "echo", "u");
    let mut idle = session(p.addr, "echo", "u");
    for s in [&mut busy, &mut idle] {
        s.write_all(b"ab").unwrap();
        let mut b = [0u8; 2];
        s.read_exact(&mut b).unwrap();
    }
    let t = Instant::now();
    p.proc.signal(Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    // No new sessions.
    assert!(
        TcpStream::connect(p.addr).is_err(),
        "still accepting after SIGTERM"
    );
    // Sessions in flight keep working during the drain.
    let msg = vec![5u8; 200_000];
    let mut w = busy.try_clone().unwrap();
    let m2 = msg.clone();
    let wt = std::thread::spawn(move || w.write_all(&m2).unwrap());
    let mut got = vec![0u8; msg.len()];
    busy.read_exact(&mut got).unwrap();
    wt.join().unwrap();
    assert_eq!(got, msg);
    busy.shutdown(Shutdown::Write).unwrap();
    assert!(closed_within(&mut busy, Duration::from_secs(2)));
    // The idle session holds the proxy until the grace period ends, then it is cut.
    assert!(p.proc.wait_exit(Duration::from_millis(1500)).is_none());
    let st = p
        .proc
        .wait_exit(Duration::from_secs(5))
        .expect("proxy exited");
    assert!(st.success(), "{st:?}");
    let e = t.elapsed();
    assert!(
        e >= Duration::from_millis(2400) && e < Duration::from_secs(5),
        "{e:?}"
    );
    assert!(closed_within(&mut idle, Duration::from_secs(1)));
}

#[test]
fn a_primary_that_never_answers_the_connect_times_out_to_the_standby() {
    let dir = tmp();
    // A listener that never accepts, with its accept queue filled: further SYNs are dropped,
    // so connects to it hang instead of being refused.
    let hole = ferry_common::net::listen("127.0.0.1:0".parse().unwrap(), 0).unwrap();
    let haddr = hole.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(s) = TcpStream::connect_timeout(&haddr, Duration::from_millis(200)) {
            fillers.push(s);
        }
    }
    assert!(
        TcpStream::connect_timeout(&haddr, Duration::from_millis(300)).is_err(),
        "could not make a connect hang on this kernel"
    );
    let standby = Upstream::start(free_addr());
    let p = Proxy::start(
        dir.path(),
        "proxy",
        &[haddr, standby.addr],
        "connect_timeout_ms = 400\ncheck_interval_ms = 5000\nfall = 3",
    );
    // The health check cannot have marked it down yet (3 failures at 5 s intervals).
    let t = Instant::now();
    echo(p.addr, 2000, 100, 4);
    let e = t.elapsed();
    assert!(
        e >= Duration::from_millis(350) && e < Duration::from_secs(3),
        "{e:?}"
    );
    assert_eq!(standby.served(), 1);
    assert!(p.stat("failovers") >= 1);
    drop(hole);
}

#[test]
fn killing_real_proxies_in_a_chain() {
    let dir = tmp();
    let up = Upstream::start(free_addr());
    let checks = "check_interval_ms = 300\nrise = 1\nfall = 1\nconnect_timeout_ms = 300";
    let spa_addr = free_addr();
    let mut spa = Proxy::start_at(dir.path(), "server-proxy-a", spa_addr, &[up.addr], checks);
    let spb = Proxy::start(dir.path(), "server-proxy-b", &[up.addr], checks);
    let mut cp = Proxy::start(dir.path(), "client-proxy", &[spa_addr, spb.addr], checks);
    let ping = |s: &mut TcpStream, msg: &[u8]| {
        s.write_all(msg).unwrap();
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).unwrap();
        assert_eq!(got, msg);
    };
    // SIGKILL the primary server-proxy mid-session: the client-proxy closes the client's
    // connection at once, and new sessions go through the standby.
    let mut s = session(cp.addr, "echo", "u");
    ping(&mut s, b"one");
    assert_eq!(spa.stat("sessions_relayed"), 1);
    let t = Instant::now();
    spa.proc.kill();
    assert!(
        closed_within(&mut s, Duration::from_secs(1)),
        "client not told within 1 s that its server-proxy died"
    );
    assert!(t.elapsed() < Duration::from_secs(1));
    echo(cp.addr, 100_000, 4096, 11);
    assert_eq!(spb.stat("sessions_relayed"), 1);
    // The primary comes back: new sessions fail back to it within two check periods.
    let spa = Proxy::start_at(dir.path(), "server-proxy-a2", spa_addr, &[up.addr], checks);
    support::wait_until(
        "failback within two periods",
        Duration::from_millis(600),
        || {
            if spa.stat("sessions_relayed") > 0 {
                return true;
            }
            echo(cp.addr, 100, 100, 12);
            false
        },
    );
    // SIGKILL the client-proxy mid-session: the server-proxy closes the upstream side too.
    let mut s = session(cp.addr, "echo", "u");
    ping(&mut s, b"two");
    let done = up.finished.load(Ordering::SeqCst);
    cp.proc.kill();
    support::wait_until(
        "the upstream session closed after the client-proxy died",
        Duration::from_secs(1),
        || up.finished.load(Ordering::SeqCst) != done,
    );
    assert!(closed_within(&mut s, Duration::from_secs(1)));
}

// ---------------------------------------------------------------------------------------------
// Link proofs: client-proxy --LINK--> server-proxy --LINK--> upstream.

fn link_send(id: &str, secret: &str) -> String {
    format!("[link.send]\nid = \"{id}\"\nsecret = \"{secret}\"\n")
}

fn link_accept(keys: &[(&str, &str)]) -> String {
    let mut out = String::from("[link.accept]\n");
    for (id, secret) in keys {
        out.push_str(&format!("{id} = \"{secret}\"\n"));
    }
    out
}

/// A receiver's check of proofs made with `id`/`secret`.
fn verifier(id: &str, secret: &str) -> Arc<LinkVerifier> {
    let cfg = LinkConfig {
        send: None,
        accept: [(id.to_owned(), secret.to_owned())].into(),
        ..LinkConfig::default()
    };
    Arc::new(cfg.verifier().unwrap())
}

/// Reads the error frame the proxy answers with, checks it is `code` and returns its text, and
/// that the proxy then closes.
fn refused_with(s: &mut TcpStream, code: ErrorCode) -> String {
    let (h, body) = read_frame(s).expect("an error frame");
    assert_eq!((h.cmd, h.status), (cmd::REPLY_PROXY, proto::status::ERROR));
    let e = ErrorBody::decode(&body).unwrap();
    assert_eq!(e.code, code, "{}", e.text);
    assert!(
        closed_within(s, Duration::from_secs(2)),
        "not closed after error {code:?}"
    );
    e.text
}

/// Sends `bytes` (then nothing) straight to `addr` and returns the connection.
fn raw_session(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(bytes).unwrap();
    s
}

#[test]
fn link_proofs_let_proxied_sessions_through_and_keep_stray_clients_out() {
    let dir = tmp();
    let (cp_secret, sp_secret) = (new_secret(), new_secret());
    let up = Upstream::start_linked(free_addr(), verifier("sp", &sp_secret));
    let sp = Proxy::start(
        dir.path(),
        "server-proxy",
        &[up.addr],
        &format!(
            "{}{}",
            link_accept(&[("cp-a", &cp_secret)]),
            link_send("sp", &sp_secret)
        ),
    );
    // (Proxy::start already saw the server-proxy answer a PROBE without a proof.)
    // A stray client with a valid HELLO straight to the server-proxy: error 6, nothing forwarded.
    let mut s = session(sp.addr, "echo", "u");
    assert_eq!(refused_with(&mut s, ErrorCode::Auth), "link proof required");
    // Garbage in a LINK frame, and a LINK of another key id.
    let mut junk = proto::frame(cmd::LINK, 0, &[7u8; 120]);
    junk.extend_from_slice(&hello_frame("echo", "u"));
    let mut s = raw_session(sp.addr, &junk);
    assert_eq!(
        refused_with(&mut s, ErrorCode::Auth),
        "link proof not valid"
    );
    let other = SigningKey {
        id: "cp-z".into(),
        secret: cp_secret.clone(),
    };
    let mut s = raw_session(sp.addr, &other.link_frame());
    let text = refused_with(&mut s, ErrorCode::Auth);
    assert!(
        !text.contains(&cp_secret) && !text.contains("cp-z"),
        "{text}"
    );
    // A valid proof opens one session; the same bytes again are a replay.
    let key = SigningKey {
        id: "cp-a".into(),
        secret: cp_secret.clone(),
    };
    let proof = key.link_frame();
    let mut once = proof.clone();
    once.extend_from_slice(&hello_frame("echo", "u"));
    once.extend_from_slice(b"ping");
    let mut s = raw_session(sp.addr, &once);
    let mut four = [0u8; 4];
    s.read_exact(&mut four).unwrap();
    assert_eq!(&four, b"ping", "the upstream saw the HELLO, not our LINK");
    drop(s);
    let mut again = proof;
    again.extend_from_slice(&hello_frame("echo", "u"));
    let mut s = raw_session(sp.addr, &again);
    assert_eq!(
        refused_with(&mut s, ErrorCode::Auth),
        "link proof not valid"
    );
    assert_eq!(up.served(), 1, "no refused session reached the upstream");
    // Through a client-proxy that proves itself: sessions pass, each with its own proof both
    // hops (the upstream checks the server-proxy's, and would refuse a replay).
    let cp = Proxy::start(
        dir.path(),
        "client-proxy",
        &[sp.addr],
        &link_send("cp-a", &cp_secret),
    );
    for i in 0..3 {
        echo(cp.addr, 100_000, 4096, i);
    }
    sink(cp.addr, 300_001, 9);
    source(cp.addr, 1 << 20);
    assert_eq!(up.served(), 6);
    assert_eq!(up.links.load(Ordering::SeqCst), 6);
    assert_eq!(up.link_refused.load(Ordering::SeqCst), 0);
    // The client-proxy's health check probes the server-proxy without a proof, and sees it up.
    assert_eq!(
        cp.stat(&format!(
            "upstream_up{{addr=\"{}\",role=\"primary\"}}",
            sp.addr
        )),
        1
    );
    // A client-proxy with the wrong secret: its clients get the server-proxy's error 6.
    let bad = Proxy::start(
        dir.path(),
        "client-proxy-bad",
        &[sp.addr],
        &link_send("cp-a", &new_secret()),
    );
    let mut s = session(bad.addr, "echo", "u");
    assert_eq!(
        refused_with(&mut s, ErrorCode::Auth),
        "link proof not valid"
    );
    assert_eq!(up.served(), 6);
    let st = sp.stats();
    assert_eq!(st["link_refused"], 5, "{st:?}");
    assert_eq!(st["sessions_relayed"], 6, "{st:?}");
    // The refusals are logged with the reason, never with a secret.
    let log = sp.proc.log_text();
    assert!(log.contains("bad signature"), "{log}");
    assert!(log.contains("replayed"), "{log}");
    assert!(!log.contains(&cp_secret) && !log.contains(&sp_secret));
}

#[test]
fn a_proxy_with_a_placeholder_secret_refuses_to_start() {
    let dir = tmp();
    let up = free_addr();
    let conf = dir.path().join("proxy.toml");
    std::fs::write(
        &conf,
        format!(
            "listen = \"{}\"\nupstreams = [\"{up}\"]\n{}",
            free_addr(),
            link_send("cp-a", "example-client-proxy-a-link-key-CHANGE-ME")
        ),
    )
    .unwrap();
    let mut cmd = Command::new(support::bin("ferry-proxy"));
    cmd.arg("--config").arg(&conf);
    let mut p = Proc::spawn("proxy", &mut cmd, dir.path());
    let st = p.wait_exit(Duration::from_secs(10)).expect("exits");
    assert!(!st.success());
    let log = p.log_text();
    assert!(
        log.contains("[link.send] (key cp-a) is an example placeholder"),
        "{log}"
    );
    assert!(!log.contains("CHANGE-ME"), "{log}");
}

#[test]
fn failover_and_failback_with_a_fresh_link_proof_per_connection() {
    let dir = tmp();
    let secret = new_secret();
    // Primary and standby share one replay cache: a proof sent twice anywhere is refused.
    let v = verifier("cp-a", &secret);
    let paddr = free_addr();
    let mut primary = Upstream::start_linked(paddr, v.clone());
    let standby = Upstream::start_linked(free_addr(), v.clone());
    let p = Proxy::start(
        dir.path(),
        "proxy",
        &[paddr, standby.addr],
        &format!(
            "check_interval_ms = 300\nrise = 1\nfall = 1\nconnect_timeout_ms = 300\n{}",
            link_send("cp-a", &secret)
        ),
    );
    for i in 0..3 {
        echo(p.addr, 10_000, 1000, i);
    }
    assert_eq!(primary.served(), 3);
    // The primary dies: the first session after it may try it and fail over within itself,
    // the rest go to the standby; every one arrives with a proof of its own.
    primary.kill();
    for i in 0..3 {
        echo(p.addr, 10_000, 1000, 10 + i);
    }
    assert_eq!(standby.served(), 3);
    let first_links = primary.links.load(Ordering::SeqCst);
    assert_eq!(first_links, 3);
    // Back up: new sessions fail back to the primary.
    let primary = Upstream::start_linked(paddr, v.clone());
    support::wait_until("failback", Duration::from_secs(3), || {
        if primary.served() > 0 {
            return true;
        }
        echo(p.addr, 100, 100, 20);
        false
    });
    let sessions = 6 + primary.served() + (standby.served() - 3);
    let refused =
        primary.link_refused.load(Ordering::SeqCst) + standby.link_refused.load(Ordering::SeqCst);
    assert_eq!(refused, 0, "a proof was reused or bad");
    let links =
        first_links + primary.links.load(Ordering::SeqCst) + standby.links.load(Ordering::SeqCst);
    assert_eq!(links, sessions, "one proof per session");
    assert_eq!(p.stat("sessions_relayed") as usize, sessions);
}

#[test]
fn a_chain_with_link_proofs_fails_over_to_the_standby_server_proxy() {
    let dir = tmp();
    let (cp_secret, sp_secret) = (new_secret(), new_secret());
    let up = Upstream::start_linked(free_addr(), verifier("sp", &sp_secret));
    let sp_conf = format!(
        "check_interval_ms = 300\nrise = 1\nfall = 1\nconnect_timeout_ms = 300\n{}{}",
        link_accept(&[("cp-a", &cp_secret)]),
        link_send("sp", &sp_secret)
    );
    let mut spa = Proxy::start(dir.path(), "server-proxy-a", &[up.addr], &sp_conf);
    let spb = Proxy::start(dir.path(), "server-proxy-b", &[up.addr], &sp_conf);
    let cp = Proxy::start(
        dir.path(),
        "client-proxy",
        &[spa.addr, spb.addr],
        &format!(
            "check_interval_ms = 300\nrise = 1\nfall = 1\nconnect_timeout_ms = 300\n{}",
            link_send("cp-a", &cp_secret)
        ),
    );
    echo(cp.addr, 50_000, 4096, 1);
    assert_eq!(spa.stat("sessions_relayed"), 1);
    spa.proc.kill();
    for i in 0..3 {
        echo(cp.addr, 50_000, 4096, 2 + i);
    }
    assert_eq!(spb.stat("sessions_relayed"), 3);
    assert_eq!(spb.stat("link_refused"), 0);
    assert_eq!(up.links.load(Ordering::SeqCst), 4);
    assert_eq!(up.link_refused.load(Ordering::SeqCst), 0);
}

/// The real ferry-server behind a linked client-proxy -> server-proxy chain: the CLI's uploads
/// and downloads pass, and skipping the client-proxy gets error 6. With `server_link`, the
/// server requires the server-proxy's proof too, and skipping both proxies gets 6 from it.
fn real_server_chain(server_link: bool) {
    let dir = tmp();
    let (cp_secret, sp_secret) = (new_secret(), new_secret());
    let server = free_addr();
    // The test app keys are appended by start_server.
    let mut conf = String::from("sync_blocks = false\n");
    if server_link {
        conf.push_str(&link_accept(&[("sp", &sp_secret)]));
    }
    let _srv = support::start_server(
        dir.path(),
        "ferry-server",
        &conf,
        server,
        &dir.path().join("data"),
    );
    let sp = Proxy::start(
        dir.path(),
        "server-proxy",
        &[server],
        &format!(
            "{}{}",
            link_accept(&[("cp-a", &cp_secret)]),
            link_send("sp", &sp_secret)
        ),
    );
    let cp = Proxy::start(
        dir.path(),
        "client-proxy",
        &[sp.addr],
        &link_send("cp-a", &cp_secret),
    );
    let src = dir.path().join("src");
    support::make_file(&src, 5 << 20, 17);
    let state = dir.path().join("state");
    let ferry = |via: SocketAddr, args: &[&str]| support::cli::ferry(&state, &[via], args);
    let up = support::cli::ok(ferry(cp.addr, &["--json", "upload", src.to_str().unwrap()]));
    let id = up.json()["file_id"].as_str().unwrap().to_owned();
    let out = dir.path().join("out");
    support::cli::ok(ferry(
        cp.addr,
        &["--json", "download", &id, "-o", out.to_str().unwrap()],
    ));
    assert_eq!(support::sha256_file(&src), support::sha256_file(&out));
    // Skipping the client-proxy (and, when the server wants proofs, both proxies) gets error
    // 6, however valid the client's token is.
    let shortcuts: &[SocketAddr] = if server_link {
        &[sp.addr, server]
    } else {
        &[sp.addr]
    };
    for &via in shortcuts {
        let r = support::cli::run(ferry(via, &["--json", "stat", &id]));
        assert!(!r.ok, "{via}: {}", r.stdout);
        assert_eq!(r.error()["code"], 6, "{via}: {}", r.stderr);
        assert_eq!(r.code, Some(3), "auth: {}", r.stderr);
    }
    assert!(sp.stat("link_refused") >= 1);
}

#[test]
fn the_real_server_behind_linked_proxies_serves_clients_and_refuses_shortcuts() {
    real_server_chain(false);
}

#[test]
fn the_real_server_requiring_links_behind_linked_proxies() {
    real_server_chain(true);
}
