//! End-to-end tests of the HTTP streaming gateway: a real `ferry-server` with its `[http]`
//! listener, files uploaded with the real `ferry` CLI, URLs signed by `ferry url`, and real
//! clients: curl, ffprobe/ffmpeg, headless Chromium (driven through the DevTools protocol).
//!
//! Tools come from Debian packages that `.ci/run` installs. A test whose tool is missing fails in
//! CI (`CI=true`) and is skipped with a message elsewhere.

use crate::support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use support::{Proc, bin, free_addr, make_file, sha256_file};

const APP: &str = "demo";
const SECRET: &str = "test-url-secret-0123456789abcdef-0123456789";

struct Server {
    proc: Proc,
    addr: SocketAddr,
    http: SocketAddr,
    dir: tempfile::TempDir,
}

impl Server {
    fn start(extra_http: &str) -> Server {
        Server::start_with("", extra_http)
    }

    /// With `top` (top-level keys of the server config) as well.
    fn start_with(top: &str, extra_http: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let http = free_addr();
        let conf = format!(
            "sync_blocks = false\n{top}\n[http]\nlisten = \"{http}\"\n{extra_http}\n\
             [http.secrets]\n{APP} = \"{SECRET}\""
        );
        // Through env(1): Proc sets RUST_LOG for its child, and the gateway's per-request
        // lines (counted by `partial_answers`) are at debug level.
        let mut env = Command::new("env");
        env.arg("RUST_LOG=info,ferry_server::http=debug")
            .arg(bin("ferry-server"));
        let data = dir.path().join("data");
        let support::server::Server { proc, addr, .. } =
            support::server::Server::start_under(env, dir.path(), &data, &conf);
        Server {
            proc,
            addr,
            http,
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Uploads with the real client (straight to the server, no proxy) as app `demo`.
    fn upload(&self, path: &Path) -> String {
        let out = Command::new(bin("ferry"))
            .env("FERRY_KEY", support::auth::key_env())
            .args(["--proxy", &self.addr.to_string(), "--app", APP, "upload"])
            .arg(path)
            .env("FERRY_STATE_DIR", self.dir.path().join("state"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "upload failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// A signed URL printed by `ferry url` (secret from FERRY_SECRET).
    fn url(&self, file_id: &str) -> String {
        self.url_with(file_id, &[])
    }

    /// A signed URL that downloads as an attachment named `name` (`ferry url --name`).
    fn url_named(&self, file_id: &str, name: &str) -> String {
        self.url_with(file_id, &["--name", name])
    }

    fn url_with(&self, file_id: &str, extra: &[&str]) -> String {
        let out = Command::new(bin("ferry"))
            .env("FERRY_KEY", support::auth::key_env())
            .args(["--app", APP, "url", file_id, "--expires", "10m", "--base"])
            .arg(format!("http://{}", self.http))
            .args(extra)
            .env("FERRY_SECRET", SECRET)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ferry url failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// How many 206 answers the gateway logged so far.
    fn partial_answers(&self) -> usize {
        self.proc
            .log_text()
            .lines()
            .filter(|l| l.contains("-> 206"))
            .count()
    }
}

/// One curl exchange: status, response headers (lower-case names), body.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn curl(dir: &Path, url: &str, args: &[&str]) -> Reply {
    let hdr = dir.join("curl.h");
    let body = dir.join("curl.b");
    let _ = std::fs::remove_file(&body);
    let out = Command::new("curl")
        .args(["-s", "--max-time", "20", "-D"])
        .arg(&hdr)
        .arg("-o")
        .arg(&body)
        .args(["-w", "%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    let text = std::fs::read_to_string(&hdr).unwrap_or_default();
    let headers = text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: std::fs::read(&body).unwrap_or_default(),
    }
}

/// Sends raw bytes on a new connection and reads the answer until the server closes (bounded).
fn raw(addr: SocketAddr, req: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(req).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn curl_ranges_conditionals_and_signatures() {
    if !support::have("curl") {
        return;
    }
    let srv = Server::start("");
    let d = srv.dir.path();
    let size = 300_000u64;
    let src = srv.path("clip.mp4");
    make_file(&src, size, 7);
    let data = std::fs::read(&src).unwrap();
    let id = srv.upload(&src);
    let url = srv.url(&id);
    assert!(url.starts_with(&format!("http://{}/files/{id}?app=demo&exp=", srv.http)));

    // Whole file, byte-identical, with every header a player uses.
    let r = curl(d, &url, &[]);
    assert_eq!(r.status, 200);
    assert!(r.body == data, "whole body differs");
    let etag = format!("\"{}\"", sha256_file(&src));
    assert_eq!(r.header("etag"), Some(etag.as_str()));
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
    assert_eq!(r.header("content-type"), Some("video/mp4"));
    assert_eq!(r.header("content-length"), Some("300000"));
    assert_eq!(
        r.header("content-disposition"),
        Some("inline; filename=\"clip.mp4\"; filename*=UTF-8''clip.mp4")
    );
    let lm = r.header("last-modified").unwrap().to_owned();
    assert!(lm.ends_with(" GMT"), "{lm}");

    // Every range form, including clamped and overflowing ones.
    let cases: &[(&str, u64, u64)] = &[
        ("bytes=0-99", 0, 99),
        ("bytes=1000-", 1000, size - 1),
        ("bytes=-500", size - 500, size - 1),
        ("bytes=299000-999999999", 299_000, size - 1),
        ("bytes=5-99999999999999999999999999", 5, size - 1),
        ("bytes=-99999999999999999999999999", 0, size - 1),
        ("bytes=299999-299999", size - 1, size - 1),
    ];
    for &(range, a, b) in cases {
        let r = curl(d, &url, &["-H", &format!("Range: {range}")]);
        assert_eq!(r.status, 206, "{range}");
        let want = format!("bytes {a}-{b}/{size}");
        assert_eq!(r.header("content-range"), Some(want.as_str()), "{range}");
        assert!(
            r.body == data[a as usize..=b as usize],
            "{range}: body differs"
        );
    }
    // curl's own -r option.
    let r = curl(d, &url, &["-r", "100-199"]);
    assert_eq!((r.status, r.body.len()), (206, 100));
    assert!(r.body == data[100..200]);
    // Unsatisfiable: 416 with the size.
    for range in ["bytes=300000-", "bytes=400000-500000", "bytes=-0"] {
        let r = curl(d, &url, &["-H", &format!("Range: {range}")]);
        assert_eq!(r.status, 416, "{range}");
        assert_eq!(r.header("content-range"), Some("bytes */300000"));
    }
    // Invalid, negative or several ranges: the whole body, never a wrong piece.
    for range in [
        "bytes=10-5",
        "bytes=--5",
        "bytes=-5-10",
        "bytes=0-1,5-6",
        "pages=1-2",
    ] {
        let r = curl(d, &url, &["-H", &format!("Range: {range}")]);
        assert_eq!(r.status, 200, "{range}");
        assert!(r.body == data, "{range}");
    }

    // HEAD: the GET's headers, no body.
    let r = curl(d, &url, &["-I"]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("300000"));
    assert_eq!(r.header("etag"), Some(etag.as_str()));
    let path = url.split_once(&srv.http.to_string()).unwrap().1.to_owned();
    let head = raw(
        srv.http,
        format!("HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    assert!(
        head.starts_with("HTTP/1.1 200 ") && head.ends_with("\r\n\r\n"),
        "{head}"
    );
    let r = curl(d, &url, &["-I", "-H", "Range: bytes=10-19"]);
    assert_eq!(r.status, 206);
    assert_eq!(r.header("content-length"), Some("10"));

    // Conditional requests.
    let r = curl(d, &url, &["-H", &format!("If-None-Match: {etag}")]);
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());
    let r = curl(d, &url, &["-H", &format!("If-None-Match: W/{etag}")]);
    assert_eq!(r.status, 304);
    let r = curl(d, &url, &["-H", "If-None-Match: \"other\""]);
    assert_eq!(r.status, 200);
    let r = curl(d, &url, &["-H", &format!("If-Modified-Since: {lm}")]);
    assert_eq!(r.status, 304);
    let r = curl(
        d,
        &url,
        &["-H", "Range: bytes=0-9", "-H", &format!("If-Range: {etag}")],
    );
    assert_eq!((r.status, r.body.len()), (206, 10));
    let r = curl(
        d,
        &url,
        &["-H", "Range: bytes=0-9", "-H", "If-Range: \"stale\""],
    );
    assert_eq!(r.status, 200);
    assert!(r.body == data, "If-Range mismatch must send the whole file");
    let r = curl(
        d,
        &url,
        &["-H", "Range: bytes=0-9", "-H", &format!("If-Range: {lm}")],
    );
    assert_eq!((r.status, r.body.len()), (206, 10));

    // Friendly name: attachment with an RFC 5987 UTF-8 name, signed with the URL (`ferry url
    // --name`); the name of an unnamed URL, or another name, is refused.
    let named = srv.url_named(&id, "café clip.mp4");
    let r = curl(d, &named, &[]);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-disposition"),
        Some("attachment; filename=\"caf_ clip.mp4\"; filename*=UTF-8''caf%C3%A9%20clip.mp4")
    );
    let renamed = named.replacen("clip.mp4", "clip.mp4.exe", 1);
    assert_eq!(curl(d, &renamed, &[]).status, 403);
    let grafted = url.replacen(&id, &format!("{id}/invoice.pdf.exe"), 1);
    assert_eq!(curl(d, &grafted, &[]).status, 403);
    // A URL valid for longer than the gateway allows (7 days by default) is refused, however
    // well signed: even one "for ever".
    for exp in [now() + 8 * 24 * 3600, u64::MAX] {
        let q = ferry_common::signing::signed_query(SECRET.as_bytes(), &id, exp, APP);
        let r = curl(d, &format!("http://{}/files/{id}?{q}", srv.http), &[]);
        assert_eq!(r.status, 403, "exp {exp}");
        assert!(String::from_utf8_lossy(&r.body).contains("max_url_lifetime_secs"));
    }

    // Signatures: unsigned, expired, tampered, for another file or app -> 403, and a 403 for a
    // file that does not exist looks exactly like one for a file that does.
    let base = format!("http://{}/files/{id}", srv.http);
    let missing_id = "00000000000fffff-aaaaaaaaaaaaaaaa";
    let sig = |fid: &str, exp: u64, app: &str| {
        ferry_common::signing::signed_query(SECRET.as_bytes(), fid, exp, app)
    };
    let forbidden = |u: &str| {
        let r = curl(d, u, &[]);
        assert_eq!(r.status, 403, "{u}");
        String::from_utf8(r.body).unwrap()
    };
    let unsigned = forbidden(&base);
    assert_eq!(
        unsigned,
        forbidden(&format!("http://{}/files/{missing_id}", srv.http))
    );
    forbidden(&format!("{base}?app=demo"));
    let expired = forbidden(&format!("{base}?{}", sig(&id, now() - 5, APP)));
    assert!(expired.contains("expired"), "{expired}");
    let mut t = url.clone().into_bytes();
    let last = t.len() - 1;
    t[last] = if t[last] == b'0' { b'1' } else { b'0' };
    let bad = forbidden(&String::from_utf8(t).unwrap());
    assert_eq!(
        bad,
        forbidden(&format!("http://{}/files/{missing_id}?{}", srv.http, {
            // The last hex digit changed (a fixed "0" would leave 1 signature in 16 valid).
            let q = sig(missing_id, now() + 60, APP);
            let flipped = if q.ends_with('0') { '1' } else { '0' };
            format!("{}{flipped}", &q[..q.len() - 1])
        }))
    );
    let later = url.replacen("exp=", "exp=9", 1);
    forbidden(&later);
    forbidden(&format!(
        "http://{}/files/{missing_id}?{}",
        srv.http,
        sig(&id, now() + 60, APP)
    ));
    forbidden(&format!("{base}?{}", sig(&id, now() + 60, "other")));
    // A valid signature for a file that does not exist: 404.
    let r = curl(
        d,
        &format!(
            "http://{}/files/{missing_id}?{}",
            srv.http,
            sig(missing_id, now() + 60, APP)
        ),
        &[],
    );
    assert_eq!(r.status, 404);

    // Everything else.
    let r = curl(d, &url, &["-X", "POST"]);
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    let r = curl(d, &format!("http://{}/other", srv.http), &[]);
    assert_eq!(r.status, 404);
    let bad = raw(srv.http, b"GET /files/x NOT-HTTP\r\n\r\n");
    assert!(bad.starts_with("HTTP/1.1 400 "), "{bad}");
    let no_host = raw(srv.http, b"GET /files/x HTTP/1.1\r\n\r\n");
    assert!(no_host.starts_with("HTTP/1.1 400 "), "{no_host}");

    // Keep-alive: two pipelined requests on one connection, answered in order.
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-3\r\n\r\n\
         HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let both = raw(srv.http, req.as_bytes());
    assert_eq!(both.matches("HTTP/1.1 206 ").count(), 1, "{both}");
    assert_eq!(both.matches("HTTP/1.1 200 ").count(), 1, "{both}");
    assert!(both.find("206").unwrap() < both.find("200 OK").unwrap());

    // The gateway keeps looked-up files open for a while: a delete must still be seen at once.
    assert_eq!(curl(d, &url, &["-r", "0-9"]).status, 206);
    let out = Command::new(bin("ferry"))
        .env("FERRY_KEY", support::auth::key_env())
        .args([
            "--proxy",
            &srv.addr.to_string(),
            "--app",
            APP,
            "delete",
            &id,
        ])
        .env("FERRY_STATE_DIR", srv.path("state"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "delete failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        curl(d, &url, &[]).status,
        404,
        "a deleted file is still served"
    );
}

#[test]
fn ferry_url_reads_the_secret_from_config_or_env_never_a_flag() {
    if !support::have("curl") {
        return;
    }
    let srv = Server::start("");
    let src = srv.path("a.txt");
    make_file(&src, 5000, 9);
    let id = srv.upload(&src);
    let d = srv.dir.path();
    let base = format!("http://{}", srv.http);
    let url_with = |conf: &str, env_secret: Option<&str>| {
        let path = d.join("client.toml");
        std::fs::write(&path, conf).unwrap();
        let mut cmd = Command::new(bin("ferry"));
        cmd.arg("--config")
            .arg(&path)
            .args(["url", &id, "--expires", "2m", "--base", &base])
            .env_remove("FERRY_SECRET")
            .env_remove("FERRY_APP");
        if let Some(s) = env_secret {
            cmd.env("FERRY_SECRET", s);
        }
        cmd.output().unwrap()
    };
    // [secrets] per app, and a plain `secret`: both give working URLs that expire in ~2 min.
    for conf in [
        format!("app = \"{APP}\"\n[secrets]\n{APP} = \"{SECRET}\"\nother = \"x\"\n"),
        format!("app = \"{APP}\"\nsecret = \"{SECRET}\"\n"),
    ] {
        let out = url_with(&conf, None);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let url = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        let exp: u64 = url
            .split("exp=")
            .nth(1)
            .and_then(|e| e.split('&').next())
            .unwrap()
            .parse()
            .unwrap();
        assert!((now() + 100..=now() + 130).contains(&exp), "exp {exp}");
        let r = curl(d, &url, &[]);
        assert_eq!(r.status, 200, "{url}");
        assert!(r.body == std::fs::read(&src).unwrap());
    }
    // FERRY_SECRET wins over the config; a wrong one gives a URL the server refuses.
    let out = url_with(
        &format!("app = \"{APP}\"\nsecret = \"{SECRET}\"\n"),
        Some("wrong-secret"),
    );
    let url = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(curl(d, &url, &[]).status, 403);
    // No secret anywhere: a one-line error, no URL.
    let out = url_with(&format!("app = \"{APP}\"\n"), None);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no secret for app"));
    // There is no flag for the secret.
    let out = Command::new(bin("ferry"))
        .env("FERRY_KEY", support::auth::key_env())
        .args(["url", &id, "--secret", SECRET])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn public_reads_are_scoped_by_app() {
    if !support::have("curl") {
        return;
    }
    let srv = Server::start("public_reads = true");
    let src = srv.path("notes.txt");
    make_file(&src, 1000, 3);
    let id = srv.upload(&src);
    let d = srv.dir.path();
    let r = curl(d, &format!("http://{}/files/{id}?app=demo", srv.http), &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    assert!(r.body == std::fs::read(&src).unwrap());
    // Another app does not see demo's files; no app at all is refused.
    let r = curl(d, &format!("http://{}/files/{id}?app=other", srv.http), &[]);
    assert_eq!(r.status, 404);
    let r = curl(d, &format!("http://{}/files/{id}", srv.http), &[]);
    assert_eq!(r.status, 403);
    // A wrong signature is still refused.
    let r = curl(
        d,
        &format!(
            "http://{}/files/{id}?app=demo&exp=99999999999&sig=00",
            srv.http
        ),
        &[],
    );
    assert_eq!(r.status, 403);
}

#[test]
fn slowloris_and_header_floods_are_cut_off_while_a_download_completes() {
    if !support::have("curl") {
        return;
    }
    let srv = Server::start("header_timeout_ms = 1000\nmax_header_bytes = 8192");
    let src = srv.path("big.bin");
    make_file(&src, 8 << 20, 11);
    let id = srv.upload(&src);
    let url = srv.url(&id);
    // A normal download, read slowly (64 KiB every 20 ms, ~2.6 s) so it overlaps the attacks
    // (the slowloris clients are cut off after the 1 s header timeout).
    let path = url.split_once(&srv.http.to_string()).unwrap().1.to_owned();
    let http = srv.http;
    let download = std::thread::spawn(move || {
        let t = Instant::now();
        let mut s = TcpStream::connect(http).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut all = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let split = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head = String::from_utf8_lossy(&all[..split]).into_owned();
        (head, all.split_off(split), t.elapsed())
    });
    // Slowloris: 20 clients trickling a header line a byte at a time.
    let loris: Vec<_> = (0..20)
        .map(|_| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(http).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                let start = Instant::now();
                let head = b"GET /files/x HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaa";
                let mut got = Vec::new();
                for &b in head.iter().cycle().take(200) {
                    if s.write_all(&[b]).is_err() {
                        break;
                    }
                    let mut buf = [0u8; 512];
                    match s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                        Err(_) => {}
                    }
                    if start.elapsed() > Duration::from_secs(8) {
                        break;
                    }
                }
                (String::from_utf8_lossy(&got).into_owned(), start.elapsed())
            })
        })
        .collect();
    // Header floods: one far over max_header_bytes (the refusal must survive the unread rest:
    // lingering close, no RST), one with too many lines.
    let big = format!(
        "GET /files/x HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(300_000)
    );
    let r = raw(http, big.as_bytes());
    assert!(r.starts_with("HTTP/1.1 431 "), "{r}");
    let mut many = String::from("GET /files/x HTTP/1.1\r\nHost: x\r\n");
    for i in 0..100 {
        many.push_str(&format!("X-{i}: y\r\n"));
    }
    many.push_str("\r\n");
    let r = raw(http, many.as_bytes());
    assert!(r.starts_with("HTTP/1.1 431 "), "{r}");
    for l in loris {
        let (got, took) = l.join().unwrap();
        assert!(got.starts_with("HTTP/1.1 408 "), "slowloris got {got:?}");
        assert!(took < Duration::from_secs(4), "slowloris held {took:?}");
    }
    let (head, body, took) = download.join().unwrap();
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(
        body == std::fs::read(&src).unwrap(),
        "download corrupted under attack"
    );
    assert!(
        took >= Duration::from_millis(1500),
        "download did not overlap: {took:?}"
    );
    // An idle keep-alive connection is closed quietly after the header timeout.
    let mut s = TcpStream::connect(http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(
        s.read(&mut buf).unwrap_or(1),
        0,
        "idle connection not closed"
    );
}

/// A connection from `from` (a loopback address of our choosing) to `to`.
fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let local: SocketAddr = format!("{from}:0").parse().unwrap();
    s.bind(&local.into()).unwrap();
    s.connect(&to.into()).unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// One address cannot hold the gateway: refused requests (403, 404) close their connection, and
/// connections from one address stop at `http.max_connections_per_ip` while a player at another
/// address is served and the same address's binary-protocol peers (proxies) are not counted
/// against it.
#[test]
fn one_address_cannot_hold_every_gateway_slot() {
    if !support::have("curl") {
        return;
    }
    // The binary listener's own per-address cap is as low: were the two counted together, the
    // three HTTP connections would use it up.
    let srv = Server::start_with(
        "max_connections_per_ip = 3",
        "max_connections = 8\nmax_connections_per_ip = 3",
    );
    let src = srv.path("photo.jpg");
    std::fs::write(&src, b"jpeg bytes").unwrap();
    let id = srv.upload(&src);
    let url = srv.url(&id);
    let path = &url[url.find("/files/").unwrap()..];
    // 403 and 404 end their connection: a keep-alive request after them gets no answer.
    for req in [
        "GET /files/x HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let mut s = connect_from("127.0.0.1", srv.http);
        s.write_all(format!("{req}{req}").as_bytes()).unwrap();
        let t = Instant::now();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out);
        assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");
        assert!(t.elapsed() < Duration::from_secs(5), "not closed: {text}");
    }
    // Three idle connections from 127.0.0.1: the fourth is refused, 127.0.0.2 is served.
    let held: Vec<TcpStream> = (0..3)
        .map(|_| connect_from("127.0.0.1", srv.http))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut fourth = connect_from("127.0.0.1", srv.http);
    fourth
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let mut out = Vec::new();
    let _ = fourth.read_to_end(&mut out);
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 503 "));
    let mut other = connect_from("127.0.0.2", srv.http);
    other
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .unwrap();
    let mut out = Vec::new();
    let _ = other.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.starts_with("HTTP/1.1 200 ") && text.ends_with("jpeg bytes"),
        "{text}"
    );
    // The binary listener counts its own connections: 127.0.0.1's proxies still get in.
    assert!(support::probe(srv.addr, Duration::from_secs(2)).is_some());
    drop(held);
}

#[test]
fn connection_limit_answers_503() {
    if !support::have("curl") {
        return;
    }
    let srv = Server::start("max_connections = 3");
    let held: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(srv.http).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let r = raw(srv.http, b"GET /files/x HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 503 "), "{r}");
    drop(held);
    // Slots come back once the held connections close.
    let t = Instant::now();
    loop {
        let r = raw(srv.http, b"GET /files/x HTTP/1.1\r\nHost: x\r\n\r\n");
        if r.starts_with("HTTP/1.1 403 ") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "limit never released: {r}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A 3 s H.264 MP4 with the index at the front (players can start before the end).
fn make_mp4(path: &Path) {
    let st = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-f", "lavfi", "-i"])
        .arg("testsrc=duration=3:size=320x240:rate=25")
        .args(["-pix_fmt", "yuv420p", "-movflags", "+faststart"])
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success(), "ffmpeg could not generate the test video");
}

#[test]
fn ffprobe_reads_and_seeks_a_signed_mp4() {
    if !support::have("ffmpeg") || !support::have("ffprobe") {
        return;
    }
    let srv = Server::start("");
    let src = srv.path("clip.mp4");
    make_mp4(&src);
    let id = srv.upload(&src);
    let url = srv.url(&id);
    let before = srv.partial_answers();
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-rw_timeout", "10000000", "-show_entries"])
        .arg("format=duration,format_name:stream=codec_type,codec_name,width,height")
        .args(["-of", "json"])
        .arg(&url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ffprobe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let dur: f64 = v["format"]["duration"].as_str().unwrap().parse().unwrap();
    assert!((dur - 3.0).abs() < 0.1, "duration {dur}");
    let s = &v["streams"][0];
    assert_eq!(s["codec_type"], "video");
    assert_eq!(s["codec_name"], "h264");
    assert_eq!(
        (s["width"].as_i64(), s["height"].as_i64()),
        (Some(320), Some(240))
    );
    // Stream it: seek to 1.5 s and decode every remaining frame.
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-rw_timeout", "10000000", "-ss", "1.5", "-i"])
        .arg(&url)
        .args(["-f", "framemd5", "-"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ffmpeg streaming failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let frames = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .count();
    assert!(
        (30..=45).contains(&frames),
        "{frames} frames after seeking to 1.5 s"
    );
    assert!(
        srv.partial_answers() > before,
        "ffmpeg's seek should have been served by 206 answers"
    );
    // The MP4 read back byte for byte.
    let back = srv.path("back.mp4");
    let st = Command::new("curl")
        .args(["-s", "-f", "-o"])
        .arg(&back)
        .arg(&url)
        .status();
    if st.is_ok() {
        assert_eq!(sha256_file(&back), sha256_file(&src));
    }
}

// ---- headless Chromium through the DevTools protocol ----

/// A minimal WebSocket client (RFC 6455) over a blocking TcpStream: text frames only, client
/// frames masked, enough for the DevTools protocol.
struct Ws {
    s: TcpStream,
}

impl Ws {
    fn connect(url: &str) -> Ws {
        let rest = url.strip_prefix("ws://").expect("ws:// URL");
        let (host, path) = rest.split_once('/').unwrap();
        let mut s = TcpStream::connect(host).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(
            s,
            "GET /{path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(line.contains(" 101 "), "websocket upgrade refused: {line}");
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
        }
        // The server speaks only after our requests, so nothing is buffered in `r`.
        Ws { s }
    }

    fn send(&mut self, text: &str) {
        let p = text.as_bytes();
        let mut f = vec![0x81u8];
        match p.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n < 65536 => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let mask = [0x12u8, 0x34, 0x56, 0x78];
        f.extend_from_slice(&mask);
        f.extend(p.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.s.write_all(&f).unwrap();
    }

    fn recv(&mut self) -> String {
        let mut msg = Vec::new();
        loop {
            let mut h = [0u8; 2];
            self.s.read_exact(&mut h).unwrap();
            let mut len = u64::from(h[1] & 0x7f);
            if len == 126 {
                let mut b = [0u8; 2];
                self.s.read_exact(&mut b).unwrap();
                len = u64::from(u16::from_be_bytes(b));
            } else if len == 127 {
                let mut b = [0u8; 8];
                self.s.read_exact(&mut b).unwrap();
                len = u64::from_be_bytes(b);
            }
            assert!(len < 64 << 20, "absurd websocket frame");
            let mut p = vec![0u8; len as usize];
            self.s.read_exact(&mut p).unwrap();
            match h[0] & 0x0f {
                0x0 | 0x1 => msg.extend_from_slice(&p),
                0x8 => panic!("devtools closed the websocket"),
                _ => continue, // ping/pong
            }
            if h[0] & 0x80 != 0 {
                return String::from_utf8(msg).unwrap();
            }
        }
    }

    /// Sends a DevTools command and returns its result (events in between are skipped).
    fn call(&mut self, id: u64, method: &str, params: serde_json::Value) -> serde_json::Value {
        self.send(&serde_json::json!({"id": id, "method": method, "params": params}).to_string());
        let t = Instant::now();
        loop {
            assert!(
                t.elapsed() < Duration::from_secs(40),
                "no answer to {method}"
            );
            let v: serde_json::Value = serde_json::from_str(&self.recv()).unwrap();
            if v["id"].as_u64() == Some(id) {
                assert!(v.get("error").is_none(), "{method} failed: {v}");
                return v["result"].clone();
            }
        }
    }
}

/// GET over a fresh TCP connection (DevTools' JSON endpoints); body as text.
fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    // DevTools keeps the connection open: read the head, then Content-Length bytes.
    let mut r = BufReader::new(s);
    let mut len = 0usize;
    let mut line = String::new();
    loop {
        line.clear();
        r.read_line(&mut line).ok()?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            len = v.trim().parse().ok()?;
        }
    }
    let mut body = vec![0u8; len.min(1 << 20)];
    r.read_exact(&mut body).ok()?;
    String::from_utf8(body).ok()
}

/// Serves one HTML page to every request on a thread (the page embeds the signed URL).
fn serve_page(html: String) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().take(20) {
            let Ok(mut s) = s else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{html}",
                html.len()
            );
        }
    });
    addr
}

/// The byte range of a 206 line in the gateway's debug log (`... -> 206 (N bytes, bytes a-b/size)`).
fn logged_range(line: &str) -> Option<(u64, u64, u64)> {
    let (_, r) = line.split_once("-> 206 (")?.1.split_once(", bytes ")?;
    let (span, size) = r.trim_end_matches(')').split_once('/')?;
    let (a, b) = span.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?, size.parse().ok()?))
}

#[test]
fn logged_range_reads_the_gateway_line() {
    let l = "[.. DEBUG ferry_server::http::conn] 127.0.0.1:5: GET /files/x HTTP/1.1 -> 206 \
             (100 bytes, bytes 1000-1099/5000)";
    assert_eq!(logged_range(l), Some((1000, 1099, 5000)));
    assert_eq!(logged_range("... -> 200 (5000 bytes)"), None);
}

#[test]
fn chromium_plays_and_seeks_a_signed_video() {
    if !support::have("ffmpeg") || !support::have("chromium") {
        return;
    }
    let srv = Server::start("");
    // 10 s of 640x360 noise (~35 MB, a keyframe every second). With preload=metadata the player
    // reads only the head of the file (the index is at the front) and stops; the middle is tens
    // of MB past anything it has buffered, so seeking there needs a new Range request.
    let src = srv.path("noise.mp4");
    let st = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-f", "lavfi", "-i"])
        .arg("testsrc2=duration=10:size=640x360:rate=25")
        .args([
            "-vf",
            "noise=alls=80:allf=t",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-g",
            "25",
        ])
        .args(["-pix_fmt", "yuv420p", "-movflags", "+faststart"])
        .arg(&src)
        .status()
        .unwrap();
    assert!(st.success(), "ffmpeg could not generate the test video");
    let size = std::fs::metadata(&src).unwrap().len();
    assert!(
        size > 20 << 20,
        "test video too small to prove a seek: {size} bytes"
    );
    let id = srv.upload(&src);
    let url = srv.url(&id);
    let page = serve_page(format!(
        "<!doctype html><html><body><video id=v muted playsinline preload=metadata \
         src=\"{url}\"></video></body></html>"
    ));
    let devtools = free_addr();
    let profile = srv.path("chromium-profile");
    let _chrome = Proc::spawn(
        "chromium",
        Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--mute-audio",
                "--autoplay-policy=no-user-gesture-required",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(format!("--remote-debugging-port={}", devtools.port()))
            .arg("about:blank"),
        srv.dir.path(),
    );
    // The page target's WebSocket, once DevTools is up.
    let t = Instant::now();
    let ws_url = loop {
        if let Some(body) = http_get(devtools, "/json/list")
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&body)
            && let Some(u) = v
                .as_array()
                .and_then(|a| a.iter().find(|t| t["type"] == "page"))
                .and_then(|t| t["webSocketDebuggerUrl"].as_str())
        {
            break u.to_owned();
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "chromium DevTools never came up"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut ws = Ws::connect(&ws_url);
    ws.call(
        1,
        "Page.navigate",
        serde_json::json!({"url": format!("http://{page}/")}),
    );
    ws.call(
        1,
        "Page.navigate",
        serde_json::json!({"url": format!("http://{page}/")}),
    );
    // Wait for the metadata only (duration known), without playing.
    let metadata = r#"
        new Promise((resolve) => {
          const fail = (why) => resolve(JSON.stringify({error: why}));
          const start = Date.now();
          setTimeout(() => fail('no metadata in 20 s'), 20000);
          const wait = () => {
            const v = document.getElementById('v');
            if (v && v.error) return fail('media error ' + v.error.code + ' ' + v.error.message);
            if (v && v.readyState >= 1 && v.duration > 0) {
              return resolve(JSON.stringify({duration: v.duration, readyState: v.readyState}));
            }
            if (Date.now() - start > 19000) return;
            setTimeout(wait, 50);
          };
          wait();
        })"#;
    // Seek to the middle, wait until a frame there is ready, then play on from there until the
    // clock has moved, and report.
    let seek_and_play = r#"
        new Promise((resolve) => {
          const fail = (why) => resolve(JSON.stringify({error: why}));
          setTimeout(() => fail('seek and play timed out after 30 s'), 30000);
          const v = document.getElementById('v');
          const mid = v.duration / 2;
          v.addEventListener('seeked', () => {
            const ready = () => {
              if (v.error) return fail('media error ' + v.error.code);
              if (v.readyState < 2) return setTimeout(ready, 20);
              const seeked = {currentTime: v.currentTime, readyState: v.readyState};
              v.play().then(() => {
                const played = () => {
                  if (v.error) return fail('media error ' + v.error.code);
                  if (v.currentTime > mid + 0.3) {
                    v.pause();
                    resolve(JSON.stringify({mid: mid, seeked: seeked,
                                            currentTime: v.currentTime,
                                            readyState: v.readyState}));
                  } else { setTimeout(played, 20); }
                };
                played();
              }, (e) => fail('play() rejected: ' + e));
            };
            ready();
          }, {once: true});
          v.currentTime = mid;
        })"#;
    let eval = |ws: &mut Ws, id: u64, script: &str| -> serde_json::Value {
        let r = ws.call(
            id,
            "Runtime.evaluate",
            serde_json::json!({"expression": script, "awaitPromise": true, "returnByValue": true}),
        );
        let text = r["result"]["value"].as_str().unwrap_or_default().to_owned();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        assert!(
            v.is_object() && v.get("error").is_none(),
            "chromium playback failed: {text}\ngateway log:\n{}",
            srv.proc.log_text()
        );
        v
    };
    let t = Instant::now();
    let meta = loop {
        // The first evaluation may run before the navigation committed.
        let r = ws.call(
            2,
            "Runtime.evaluate",
            serde_json::json!({"expression": "!!document.getElementById('v')", "returnByValue": true}),
        );
        if r["result"]["value"].as_bool() == Some(true) {
            break eval(&mut ws, 3, metadata);
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "the test page never loaded"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let duration = meta["duration"].as_f64().unwrap();
    assert!((duration - 10.0).abs() < 0.1, "duration {duration}");
    let answers = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains(" -> "))
            .map(str::to_owned)
            .collect()
    };
    // A range starts "in the middle" when it starts in the middle fifth of the file: the
    // keyframe at 5 s sits near size/2 in this constant-rate stream.
    let mid_band = |start: u64| start > size * 2 / 5 && start < size * 3 / 5;
    let before = answers(&srv.proc.log_text());
    let v = eval(&mut ws, 4, seek_and_play);
    let after = answers(&srv.proc.log_text());
    let new = &after[before.len().min(after.len())..];
    let report = format!(
        "metadata {meta}, seek and play {v}\nanswers before the seek: {before:#?}\n\
         answers after: {new:#?}"
    );
    // The browser's side: the seek landed in the middle, a frame was ready there, and playback
    // went on from it.
    let mid = v["mid"].as_f64().unwrap();
    let seeked = v["seeked"]["currentTime"].as_f64().unwrap();
    assert!(
        (seeked - mid).abs() < 0.2,
        "currentTime {seeked} after seeking to {mid}: {report}"
    );
    assert!(v["seeked"]["readyState"].as_i64().unwrap() >= 2, "{report}");
    assert!(v["currentTime"].as_f64().unwrap() > mid + 0.3, "{report}");
    assert!(v["readyState"].as_i64().unwrap() >= 2, "{report}");
    // The server's side: nothing near the middle was asked for before the seek, and a new 206
    // whose Content-Range starts there was sent after it.
    assert!(
        before.iter().all(|l| !l.contains(" -> 200 "))
            && new.iter().all(|l| !l.contains(" -> 200 ")),
        "the player was sent a whole-file 200: {report}"
    );
    assert!(
        !before
            .iter()
            .filter_map(|l| logged_range(l))
            .any(|(a, _, _)| mid_band(a)),
        "the middle was requested before the seek: {report}"
    );
    let seek_range = new
        .iter()
        .filter_map(|l| logged_range(l))
        .find(|&(a, _, total)| total == size && mid_band(a));
    assert!(
        seek_range.is_some(),
        "no 206 starting near the middle ({} of {size} bytes) after the seek: {report}",
        size / 2
    );
    eprintln!("chromium: {report}\nseek served by 206 {seek_range:?}");
}
