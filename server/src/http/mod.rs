//! The HTTP streaming gateway: the `http` role of `ferry-server` (seed 004's HTTP server).
//!
//! Players and browsers (VLC, `<video>`, ffmpeg, curl) read stored files over plain HTTP/1.1 and
//! seek in them with `Range` requests. It runs on the server's own reactor, on a second listener
//! (`[http] listen`, off unless set), and sends bodies with sendfile(2) from the storage role's
//! files, so memory per connection is the bounded head buffer.
//!
//! - [`head`]: the request head (httparse) from a bounded buffer; percent-decoding.
//! - [`range`]: the `Range` header, overflow-safe.
//! - [`respond`]: route, signed-URL check, lookup, conditional requests, response head.
//! - [`conn`]: the connection state machine (keep-alive, header deadline, sendfile bodies).
//! - [`directory`]: the cluster's gateways, for files of other groups (a 307 to one of them).
//!
//! Routes: `GET`/`HEAD /files/{file_id}` and `/files/{file_id}/{name}` (the second form answers
//! `Content-Disposition: attachment` with `name`, the first `inline` with the stored name).
//!
//! Access: every file belongs to an app. A request must carry a signed URL
//! (`?app=APP&exp=UNIX&sig=HEX`, see [`ferry_common::signing`]) made with that app's secret from
//! `[http.secrets]`; a missing, expired or wrong signature is 403 before any lookup, so it says
//! nothing about whether the file exists. With `public_reads = true` (trusted networks only) an
//! unsigned `?app=APP` is enough: the app still scopes the lookup, a wrong app is 404.

pub mod conn;
pub mod directory;
pub mod head;
pub mod range;
pub mod respond;

use crate::meta::FileRec;
use crate::storage::{OpResult, Storage, Who};
use anyhow::bail;
use ferry_common::proto::{APP_ID_LEN, NodeAddr};
use ferry_common::reactor::Conn;
use log::{debug, warn};
use mio::net::TcpStream;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, UNIX_EPOCH};

/// How long a looked-up file (record and open descriptor) is reused without asking the metadata
/// store again. A delete through this server empties the cache at once ([`Storage::deletes`]);
/// a file removed otherwise (by a peer node sharing the data dir, or by hand) stays readable at
/// most this long through a cached descriptor, like any HTTP cache would serve it.
pub const META_TTL: Duration = Duration::from_secs(1);
/// Most cached files; the cache is emptied when it is full (it refills in one TTL). Each holds
/// an open descriptor, so the cache is also kept to a quarter of the open-file limit.
const META_CACHE_MAX: usize = 8192;

/// A stored file as the gateway serves it: its record, its open bytes (shared by every answer
/// that sends them: sendfile reads at an explicit offset) and the response header lines that
/// depend on the record only.
pub struct Stored {
    pub rec: FileRec,
    pub file: Arc<File>,
    /// `"<hex sha256>"`.
    pub etag: String,
    /// Accept-Ranges, ETag, Last-Modified and Cache-Control lines (every answer about the file).
    pub validators: String,
    /// Content-Type, `inline` Content-Disposition with the stored name, X-Content-Type-Options
    /// and Content-Security-Policy lines (answers with the body under `/files/{id}`).
    pub inline: String,
    at: Instant,
    /// [`Storage::deletes`] when it was looked up.
    deletes: u64,
}

impl Stored {
    fn new(rec: FileRec, file: File, deletes: u64) -> Stored {
        let etag = format!("\"{}\"", hex::encode(rec.sha256));
        let modified = UNIX_EPOCH + Duration::from_secs(rec.created);
        let validators = format!(
            "Accept-Ranges: bytes\r\nETag: {etag}\r\nLast-Modified: {}\r\n\
             Cache-Control: private\r\n",
            httpdate::fmt_http_date(modified)
        );
        let inline = respond::content_lines(&rec.name, "inline", &rec.name);
        Stored {
            rec,
            file: Arc::new(file),
            etag,
            validators,
            inline,
            at: Instant::now(),
            deletes,
        }
    }
}

/// `[http]` in the server config.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of the HTTP listener; the gateway is off when unset.
    pub listen: Option<SocketAddr>,
    /// `host:port` where clients reach this gateway, announced to the trackers so other
    /// groups' gateways redirect requests for this group's files here. Defaults to `listen`
    /// (with `[cluster] advertise`'s host when `listen` is a wildcard address).
    pub advertise: Option<String>,
    /// Allow unsigned reads (`?app=APP` without `exp`/`sig`). Trusted networks only.
    pub public_reads: bool,
    /// Most HTTP connections open at once (beyond it: 503 and close), within the server's
    /// overall `max_connections`.
    pub max_connections: usize,
    /// Most HTTP connections from one IP address (0: no cap), so one address cannot hold every
    /// slot; beyond it 503 and close. The binary listener counts its own (`max_connections_per_ip`).
    pub max_connections_per_ip: usize,
    /// Largest request head (request line + headers) in bytes; larger is 431.
    pub max_header_bytes: usize,
    /// A request head must be complete this long after the connection opened or the previous
    /// answer was sent, else 408 (slowloris) or, with nothing sent yet, a quiet close (idle
    /// keep-alive). Milliseconds.
    pub header_timeout_ms: u64,
    /// App id -> secret for signed URLs.
    pub secrets: BTreeMap<String, String>,
    /// Longest a signed URL may stay valid: one whose `exp` lies further ahead is refused
    /// (403), so a leaked URL (or a secret-holder's mistake) cannot serve a file forever.
    pub max_url_lifetime_secs: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: None,
            advertise: None,
            public_reads: false,
            max_connections: 1024,
            max_connections_per_ip: 64,
            max_header_bytes: 16 * 1024,
            header_timeout_ms: 10_000,
            secrets: BTreeMap::new(),
            max_url_lifetime_secs: 7 * 24 * 3600,
        }
    }
}

/// Secrets stay out of logs and error messages.
impl std::fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConfig")
            .field("listen", &self.listen)
            .field("advertise", &self.advertise)
            .field("public_reads", &self.public_reads)
            .field("max_connections", &self.max_connections)
            .field("max_connections_per_ip", &self.max_connections_per_ip)
            .field("max_header_bytes", &self.max_header_bytes)
            .field("header_timeout_ms", &self.header_timeout_ms)
            .field("max_url_lifetime_secs", &self.max_url_lifetime_secs)
            .field("secrets", &self.secrets.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// `host:port` or `[v6]:port`, as a protocol host (see [`ferry_common::proto::check_host`]).
fn host_port(s: &str) -> anyhow::Result<NodeAddr> {
    let parsed = s.rsplit_once(':').and_then(|(h, p)| {
        let h = h
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(h);
        let port = p.parse::<u16>().ok().filter(|&p| p != 0)?;
        ferry_common::proto::check_host(h).ok()?;
        Some(NodeAddr {
            host: h.to_owned(),
            port,
        })
    });
    match parsed {
        Some(a) => Ok(a),
        None => {
            bail!("http.advertise {s:?} is not host:port (a host name or IP and a port 1-65535)")
        }
    }
}

impl HttpConfig {
    pub fn check(&self) -> anyhow::Result<()> {
        for (app, secret) in &self.secrets {
            if app.is_empty() || app.len() > APP_ID_LEN {
                bail!("http.secrets: app id {app:?} must be 1 ..= {APP_ID_LEN} bytes");
            }
            ferry_common::auth::check_secret(&format!("http.secrets.{app}"), secret)
                .map_err(anyhow::Error::msg)?;
        }
        if !(1024..=1 << 20).contains(&self.max_header_bytes) {
            bail!("http.max_header_bytes must be within 1024 ..= 1048576");
        }
        if self.max_connections == 0
            || self.header_timeout_ms == 0
            || self.max_url_lifetime_secs == 0
        {
            bail!(
                "http.max_connections, http.header_timeout_ms and http.max_url_lifetime_secs must \
                 be at least 1"
            );
        }
        if let Some(a) = &self.advertise {
            host_port(a)?;
        }
        Ok(())
    }

    /// The address this gateway announces (see [`HttpConfig::advertise`]), given where it is
    /// bound and the host the node announces for its binary protocol.
    pub fn announced(&self, bound: SocketAddr, node_host: &str) -> anyhow::Result<NodeAddr> {
        if let Some(a) = &self.advertise {
            return host_port(a);
        }
        let host = if bound.ip().is_unspecified() {
            node_host.to_owned()
        } else {
            bound.ip().to_string()
        };
        Ok(NodeAddr {
            host,
            port: bound.port(),
        })
    }

    pub fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.header_timeout_ms)
    }
}

/// Counters of the gateway (read by tests and logs).
#[derive(Debug, Default)]
pub struct HttpStats {
    pub requests: AtomicU64,
    pub partial: AtomicU64,
    pub timeouts: AtomicU64,
    pub refused: AtomicU64,
}

/// The gateway: shared by every HTTP connection.
pub struct Gateway {
    pub st: Arc<Storage>,
    pub cfg: HttpConfig,
    /// The URL-signing secrets, keyed once.
    pub keys: respond::Keys,
    /// The bound address of the HTTP listener (tells HTTP sockets apart in `refuse`).
    pub addr: SocketAddr,
    open: AtomicUsize,
    /// Open HTTP connections per peer address (with `max_connections_per_ip`).
    per_ip: Mutex<HashMap<std::net::IpAddr, usize>>,
    pub stats: HttpStats,
    /// File id -> the file as last looked up and opened. Players fetch the same file in many
    /// small ranges, and small files are fetched over and over: the SQLite lookup (behind one
    /// mutex) was the largest user-space cost per request, opening the file the largest system
    /// one.
    cache: Mutex<HashMap<String, Arc<Stored>>>,
    /// Most entries in `cache`.
    cache_max: usize,
    /// A cluster node's: where other groups' files are served.
    pub directory: Option<Arc<directory::Directory>>,
}

impl Gateway {
    pub fn new(st: Arc<Storage>, addr: SocketAddr) -> Gateway {
        let cfg = st.cfg.http.clone();
        if cfg.secrets.is_empty() && !cfg.public_reads {
            warn!(
                "http gateway on {addr} has no [http.secrets] and public_reads is off: every \
                 request will be answered 403"
            );
        }
        Gateway {
            keys: respond::Keys::new(&cfg),
            cfg,
            addr,
            open: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            stats: HttpStats::default(),
            cache: Mutex::new(HashMap::new()),
            cache_max: cache_max(),
            directory: st
                .cfg
                .cluster
                .as_ref()
                .map(|c| Arc::new(directory::Directory::new(&c.group))),
            st,
        }
    }

    /// The file `id` of `who.app`, looked up and opened: from the cache when fresh, else from
    /// the metadata store and the data dir (which refreshes the cache). A file that cannot be
    /// opened is an `Io` error.
    pub fn lookup(&self, who: &Who, id: &str) -> OpResult<Arc<Stored>> {
        let deletes = self.st.deletes();
        if let Some(f) = self.cache.lock().get(id)
            && f.rec.app == who.app
            && f.deletes == deletes
            && f.at.elapsed() < META_TTL
        {
            return Ok(f.clone());
        }
        let (rec, file) = self.st.open_stored(who, id)?;
        let f = Arc::new(Stored::new(rec, file, deletes));
        let mut m = self.cache.lock();
        if m.len() >= self.cache_max {
            m.clear();
        }
        m.insert(id.to_owned(), f.clone());
        Ok(f)
    }

    /// A new HTTP connection, unless the gateway's own connection limit is reached.
    pub fn accept(self: &Arc<Self>, stream: TcpStream, peer: SocketAddr) -> Option<Box<dyn Conn>> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.cfg.max_connections {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.refuse(stream, peer);
            return None;
        }
        let cap = self.cfg.max_connections_per_ip;
        if cap > 0 {
            let mut m = self.per_ip.lock();
            let n = m.entry(peer.ip()).or_insert(0);
            if *n >= cap {
                drop(m);
                self.open.fetch_sub(1, Ordering::AcqRel);
                self.refuse(stream, peer);
                return None;
            }
            *n += 1;
        }
        debug!("{peer}: http connection");
        if let Err(e) = stream.set_nodelay(true) {
            debug!("{peer}: cannot set TCP_NODELAY: {e}");
        }
        Some(Box::new(conn::HttpConn::new(stream, peer, self.clone())))
    }

    /// Whether an accepted socket came in on the HTTP listener.
    pub fn owns(&self, stream: &TcpStream) -> bool {
        stream.local_addr().is_ok_and(|a| a == self.addr)
    }

    /// Best-effort 503 on a fresh socket that is about to be closed (connection limit).
    pub fn refuse(&self, mut stream: TcpStream, peer: SocketAddr) {
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        warn!("{peer}: http connection limit reached; refusing");
        let a = respond::Answer::error(503, "too many connections; try later", true);
        let mut bytes = a.head_bytes(false, std::time::SystemTime::now());
        if let respond::Body::Text(t) = &a.body {
            bytes.extend_from_slice(t);
        }
        let _ = stream.write(&bytes);
    }

    fn released(&self, peer: std::net::IpAddr) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        if self.cfg.max_connections_per_ip > 0 {
            let mut m = self.per_ip.lock();
            if let Some(n) = m.get_mut(&peer) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&peer);
                }
            }
        }
    }
}

/// [`META_CACHE_MAX`], or a quarter of the open-file limit when that is less (each cached file
/// holds a descriptor; connections need theirs).
pub(crate) fn cache_max() -> usize {
    use nix::sys::resource::{Resource, getrlimit};
    let soft = getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft);
    usize::try_from(soft / 4).map_or(META_CACHE_MAX, |n| n.clamp(1, META_CACHE_MAX))
}

/// A summary when the server stops (the reactor drops the service last).
impl Drop for Gateway {
    fn drop(&mut self) {
        let s = &self.stats;
        log::info!(
            "http gateway on {}: {} requests, {} answered 206, {} header timeouts (408), {} \
             refused at the connection limit",
            self.addr,
            s.requests.load(Ordering::Relaxed),
            s.partial.load(Ordering::Relaxed),
            s.timeouts.load(Ordering::Relaxed),
            s.refused.load(Ordering::Relaxed)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_or_short_secrets_are_refused() {
        let mut c = HttpConfig::default();
        assert!(c.check().is_ok());
        c.secrets.insert("demo".into(), String::new());
        assert!(c.check().is_err());
        c.secrets.insert("demo".into(), "short".into());
        assert!(c.check().is_err());
        c.secrets
            .insert("demo".into(), "x".repeat(ferry_common::auth::SECRET_MIN));
        assert!(c.check().is_err(), "one repeated character");
        c.secrets
            .insert("demo".into(), "example-CHANGE-ME-0123456789abcdef".into());
        assert!(c.check().is_err(), "a placeholder");
        c.secrets
            .insert("demo".into(), ferry_common::auth::new_secret());
        assert!(c.check().is_ok());
        c.secrets.insert(
            "an-app-id-too-long".into(),
            ferry_common::auth::new_secret(),
        );
        assert!(c.check().is_err());
        let c = HttpConfig {
            max_header_bytes: 100,
            ..HttpConfig::default()
        };
        assert!(c.check().is_err());
        // Secrets never show in Debug output (logs, config errors).
        let mut c = HttpConfig::default();
        c.secrets
            .insert("demo".into(), "do-not-print-me-0123".into());
        assert!(!format!("{c:?}").contains("do-not-print-me"));
    }

    #[test]
    fn the_announced_gateway_address() {
        let bound: SocketAddr = "127.0.0.1:7480".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:7480".parse().unwrap();
        let c = HttpConfig::default();
        let a = |c: &HttpConfig, b| c.announced(b, "10.0.0.5").unwrap().to_string();
        assert_eq!(a(&c, bound), "127.0.0.1:7480");
        // A wildcard listener: the node's own announced host.
        assert_eq!(a(&c, any), "10.0.0.5:7480");
        for (text, want) in [
            ("media.example.com:443", "media.example.com:443"),
            ("[::1]:8080", "[::1]:8080"),
        ] {
            let c = HttpConfig {
                advertise: Some(text.into()),
                ..HttpConfig::default()
            };
            assert!(c.check().is_ok(), "{text}");
            assert_eq!(a(&c, any), want);
        }
        for bad in ["media", "media:0", "media:99999", ":80", "a b:80", "x/y:80"] {
            let c = HttpConfig {
                advertise: Some(bad.into()),
                ..HttpConfig::default()
            };
            assert!(c.check().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_shipped_example_enables_the_gateway() {
        let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../conf/server.toml");
        let cfg: crate::config::Config = ferry_common::config::load(&path).unwrap();
        assert_eq!(
            cfg.http.listen,
            Some(SocketAddr::from(([127, 0, 0, 1], 7480)))
        );
        assert!(!cfg.http.public_reads);
        assert!(cfg.http.secrets.contains_key("demo"));
        // Its secret is a placeholder, which the server refuses to run with.
        assert!(cfg.http.check().is_err());
    }
}
