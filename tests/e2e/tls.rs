//! TLS on the client leg through the real binaries: a client-proxy with `[tls]` in front of a
//! server, the `ferry` CLI with `tls://` proxies, `--ca` and `--pin`.
//!
//! - Files of every path (one-shot, parallel blocks) move byte-identical over TLS, and a plain
//!   PROBE is still answered (health checks and readiness need no TLS).
//! - The hostile cases each end in one clear error and nothing stored: a plain-TCP client at
//!   the TLS listener, a TLS client at a plain one, a certificate for another host, one from a
//!   CA the client does not trust, a pin that does not match, a malformed pin.
//! - SIGHUP swaps the certificate for new handshakes while a session that shook hands before
//!   keeps working; a reload that cannot load keeps the served certificate.

use crate::support;

use ferry_common::proto::{self, cmd};
use ferry_supervisor::localca::LocalCa;
use nix::sys::signal::Signal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use support::cli::{Run, ferry, run};
use support::raw::{self, Raw};
use support::{Proc, bin, free_addr, make_file, sha256_file, wait_ready};

struct Setup {
    dir: tempfile::TempDir,
    _server: Proc,
    server_addr: SocketAddr,
    /// The TLS client-proxy and its CA; a plain proxy to the same server.
    tls: SocketAddr,
    tls_proc: Proc,
    ca: LocalCa,
    plain: SocketAddr,
    _plain_proc: Proc,
}

/// A client-proxy in front of `upstream`; with `tls`, serving that certificate.
fn proxy(
    dir: &Path,
    name: &str,
    upstream: SocketAddr,
    tls: Option<&LocalCa>,
) -> (SocketAddr, Proc) {
    let addr = free_addr();
    let conf = dir.join(format!("{name}.toml"));
    let c = ferry_proxy::config::Config {
        listen: addr,
        upstreams: vec![upstream],
        tls: tls.map(LocalCa::proxy_tls),
        ..Default::default()
    };
    std::fs::write(&conf, toml::to_string(&c).unwrap()).unwrap();
    let p = Proc::spawn(
        name,
        Command::new(bin("ferry-proxy")).arg("--config").arg(&conf),
        dir,
    );
    // A plain PROBE is answered at a TLS listener too.
    wait_ready(addr, Duration::from_secs(20));
    (addr, p)
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let server = support::start_server(
        dir.path(),
        "server",
        "sync_blocks = false\n",
        addr,
        &dir.path().join("data"),
    );
    let ca = LocalCa::make(&dir.path().join("ca"), &["127.0.0.1".parse().unwrap()]).unwrap();
    let (tls, tls_proc) = proxy(dir.path(), "tls-proxy", addr, Some(&ca));
    let (plain, plain_proc) = proxy(dir.path(), "plain-proxy", addr, None);
    Setup {
        dir,
        _server: server,
        server_addr: addr,
        tls,
        tls_proc,
        ca,
        plain,
        _plain_proc: plain_proc,
    }
}

impl Setup {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `ferry` with `proxy` (written as given: `tls://...` or `host:port`) and `args`.
    fn ferry(&self, proxy: &str, args: &[&str]) -> Run {
        let mut all = vec!["--proxy", proxy];
        all.extend_from_slice(args);
        run(ferry(&self.path("state"), &[], &all))
    }

    fn stored(&self) -> usize {
        support::count_files(&self.path("data").join("data"))
    }
}

fn ca_arg(ca: &LocalCa) -> String {
    ca.ca.display().to_string()
}

fn pin_of(cert: &Path) -> String {
    let certs = ferry_common::tls::load_certs(cert).unwrap();
    ferry_common::tls::pin_of(&certs[0]).unwrap()
}

#[test]
fn files_move_over_tls_byte_for_byte_with_ca_and_pins() {
    let s = setup();
    let ca = ca_arg(&s.ca);
    let tls_ip = format!("tls://{}", s.tls);
    let tls_name = format!("tls://localhost:{}", s.tls.port());
    for (k, (size, extra)) in [
        (10_000u64, &[][..]),
        (6 << 20, &["--block-size", "256KiB", "--threads", "4"][..]),
    ]
    .into_iter()
    .enumerate()
    {
        let src = s.path(&format!("src-{k}"));
        make_file(&src, size, 40 + k as u64);
        let mut args = vec!["--ca", &ca, "upload", src.to_str().unwrap()];
        args.extend_from_slice(extra);
        let up = s.ferry(&tls_ip, &args);
        assert!(up.ok, "upload over TLS: {}", up.stderr);
        let id = up.stdout.trim().to_owned();
        // Downloaded by name (the certificate names localhost too), through the same proxy.
        let out = s.path(&format!("out-{k}"));
        let down = s.ferry(
            &tls_name,
            &["--ca", &ca, "download", &id, "-o", out.to_str().unwrap()],
        );
        assert!(down.ok, "download over TLS: {}", down.stderr);
        assert_eq!(sha256_file(&out), sha256_file(&src), "{size} bytes");
    }
    // The proxy logs the pin it serves; with it pinned the client connects, and the served
    // key is what it pins (not the CA's).
    let pin = pin_of(&s.ca.cert);
    support::wait_log(&s.tls_proc, &pin, Duration::from_secs(5));
    let usage = s.ferry(&tls_ip, &["--ca", &ca, "--pin", &pin, "usage"]);
    assert!(usage.ok, "pinned: {}", usage.stderr);
    assert_ne!(pin, pin_of(&s.ca.ca));
}

#[test]
fn hostile_tls_cases_get_one_clear_error_and_store_nothing() {
    let s = setup();
    let ca = ca_arg(&s.ca);
    // A second CA whose certificate names only localhost, served by a third proxy.
    let other = LocalCa::make(&s.path("other-ca"), &[]).unwrap();
    let (other_addr, _other_proc) = proxy(s.dir.path(), "other-proxy", s.server_addr, Some(&other));
    let src = s.path("src");
    make_file(&src, 300_000, 7);
    let srcs = src.to_str().unwrap();
    let bad_pin = format!("sha256:{}", "0".repeat(64));
    let cases: Vec<(&str, String, Vec<&str>, &str)> = vec![
        (
            "plain client at the TLS listener",
            s.tls.to_string(),
            vec![],
            "listens with TLS",
        ),
        (
            "TLS client at a plain listener",
            format!("tls://{}", s.plain),
            vec!["--ca", &ca],
            "plain listener",
        ),
        (
            "certificate for another host",
            format!("tls://{other_addr}"),
            vec!["--ca", other.ca.to_str().unwrap()],
            "not valid for name",
        ),
        (
            "certificate from an untrusted CA",
            format!("tls://localhost:{}", other_addr.port()),
            vec!["--ca", &ca],
            "invalid peer certificate",
        ),
        (
            "pin that does not match",
            format!("tls://{}", s.tls),
            vec!["--ca", &ca, "--pin", &bad_pin],
            "matches none of the pinned keys",
        ),
        (
            "malformed pin",
            format!("tls://{}", s.tls),
            vec!["--ca", &ca, "--pin", "sha256:abc"],
            "bad pin",
        ),
    ];
    let before = s.stored();
    for (what, proxy, mut args, expect) in cases {
        args.extend(["upload", srcs]);
        let r = s.ferry(&proxy, &args);
        assert!(!r.ok, "{what}: succeeded");
        let err = r.stderr.trim();
        assert_eq!(err.lines().count(), 1, "{what}: {err}");
        assert!(err.contains(expect), "{what}: {err}");
        assert_eq!(s.stored(), before, "{what}: something was stored");
    }
    // Each proxy counted what it refused, and still serves a good client.
    let ok = s.ferry(&format!("tls://{}", s.tls), &["--ca", &ca, "upload", srcs]);
    assert!(ok.ok, "{}", ok.stderr);
    assert!(
        s.tls_proc
            .log_text()
            .contains("plain TCP at a TLS listener")
    );
}

/// A session opened by hand over TLS (rustls, trusting `ca`): handshake, HELLO, then frames.
struct RawSession(Raw<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>>);

impl RawSession {
    fn open(addr: SocketAddr, ca: &Path) -> Result<RawSession, String> {
        let mut roots = rustls::RootCertStore::empty();
        for c in ferry_common::tls::load_certs(ca)? {
            roots.add(c).map_err(|e| e.to_string())?;
        }
        let cfg = rustls::ClientConfig::builder_with_provider(ferry_common::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let conn = rustls::ClientConnection::new(Arc::new(cfg), name).map_err(|e| e.to_string())?;
        let sock = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut s = RawSession(Raw::over(rustls::StreamOwned::new(conn, sock), addr));
        s.request(&support::auth::hello_frame("ferry", "raw"))?;
        Ok(s)
    }

    /// Sends a frame and reads one reply; returns the reply's command.
    fn request(&mut self, frame: &[u8]) -> Result<u8, String> {
        match self.0.call_raw(frame) {
            raw::Reply::Ok(c, _) => Ok(c),
            other => Err(format!("{other:?}")),
        }
    }
}

#[test]
fn sighup_swaps_the_certificate_for_new_handshakes_and_keeps_live_sessions() {
    let s = setup();
    let ca = ca_arg(&s.ca);
    let tls = format!("tls://{}", s.tls);
    let src = s.path("src");
    make_file(&src, 100_000, 9);
    let up = s.ferry(&tls, &["--ca", &ca, "upload", src.to_str().unwrap()]);
    assert!(up.ok, "{}", up.stderr);
    let id = up.stdout.trim().to_owned();
    // A session that shook hands with the first certificate.
    let mut live = RawSession::open(s.tls, &s.ca.ca).unwrap();
    let probe = proto::frame(cmd::PROBE, 0, &proto::probe_body());
    assert_eq!(live.request(&probe).unwrap(), cmd::REPLY_STORAGE);

    // A renewed certificate from a new CA at the same paths, then SIGHUP.
    let next = LocalCa::make(&s.path("next-ca"), &["127.0.0.1".parse().unwrap()]).unwrap();
    std::fs::copy(&next.cert, &s.ca.cert).unwrap();
    std::fs::copy(&next.key, &s.ca.key).unwrap();
    s.tls_proc.signal(Signal::SIGHUP);
    support::wait_log(&s.tls_proc, "TLS: reloaded", Duration::from_secs(10));
    let next_ca = ca_arg(&next);
    // New handshakes get the new certificate: trusted with the new CA, refused with the old.
    let stat = s.ferry(&tls, &["--ca", &next_ca, "stat", &id]);
    assert!(stat.ok, "after reload, new CA: {}", stat.stderr);
    let old = s.ferry(&tls, &["--ca", &ca, "stat", &id]);
    assert!(
        !old.ok && old.stderr.contains("invalid peer certificate"),
        "{}",
        old.stderr
    );
    // The session from before the reload goes on.
    assert_eq!(live.request(&probe).unwrap(), cmd::REPLY_STORAGE);

    // A reload that cannot load (a broken certificate file) keeps serving the current one.
    std::fs::write(&s.ca.cert, "not a certificate\n").unwrap();
    s.tls_proc.signal(Signal::SIGHUP);
    support::wait_log(&s.tls_proc, "TLS: reload failed", Duration::from_secs(10));
    let stat = s.ferry(&tls, &["--ca", &next_ca, "stat", &id]);
    assert!(stat.ok, "after a failed reload: {}", stat.stderr);
    assert_eq!(live.request(&probe).unwrap(), cmd::REPLY_STORAGE);
    assert!(RawSession::open(s.tls, &next.ca).is_ok());
}
