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
pub mod head;
pub mod range;
pub mod respond;

use crate::meta::FileRec;
use crate::store::{OpResult, Storage, Who};
use anyhow::bail;
use ferry_common::proto::APP_ID_LEN;
use ferry_common::reactor::Conn;
use log::{debug, warn};
use mio::net::TcpStream;
use parking_lot::Mutex;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use std::time::Instant;

/// How long a looked-up file record is reused without asking the metadata store again. A file
/// deleted meanwhile is found out earlier than that when its bytes are gone (opening it fails and
/// the lookup is repeated), so at worst a deleted file stays readable this long, like any HTTP
/// cache would serve it.
pub const META_TTL: Duration = Duration::from_secs(1);
/// Most cached file records; the cache is emptied when it is full (it refills in one TTL).
const META_CACHE_MAX: usize = 8192;

/// (app, file id).
type MetaKey = (String, String);

/// `[http]` in the server config.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of the HTTP listener; the gateway is off when unset.
    pub listen: Option<SocketAddr>,
    /// Allow unsigned reads (`?app=APP` without `exp`/`sig`). Trusted networks only.
    pub public_reads: bool,
    /// Most HTTP connections open at once (beyond it: 503 and close), within the server's
    /// overall `max_connections`.
    pub max_connections: usize,
    /// Largest request head (request line + headers) in bytes; larger is 431.
    pub max_header_bytes: usize,
    /// A request head must be complete this long after the connection opened or the previous
    /// answer was sent, else 408 (slowloris) or, with nothing sent yet, a quiet close (idle
    /// keep-alive). Milliseconds.
    pub header_timeout_ms: u64,
    /// App id -> secret for signed URLs.
    pub secrets: BTreeMap<String, String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: None,
            public_reads: false,
            max_connections: 1024,
            max_header_bytes: 16 * 1024,
            header_timeout_ms: 10_000,
            secrets: BTreeMap::new(),
        }
    }
}

/// Secrets stay out of logs and error messages.
impl std::fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConfig")
            .field("listen", &self.listen)
            .field("public_reads", &self.public_reads)
            .field("max_connections", &self.max_connections)
            .field("max_header_bytes", &self.max_header_bytes)
            .field("header_timeout_ms", &self.header_timeout_ms)
            .field("secrets", &self.secrets.keys().collect::<Vec<_>>())
            .finish()
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
        if self.max_connections == 0 || self.header_timeout_ms == 0 {
            bail!("http.max_connections and http.header_timeout_ms must be at least 1");
        }
        Ok(())
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
    /// The bound address of the HTTP listener (tells HTTP sockets apart in `refuse`).
    pub addr: SocketAddr,
    open: AtomicUsize,
    pub stats: HttpStats,
    /// (app, file id) -> record and when it was looked up. Players fetch the same file in many
    /// small ranges, and the SQLite lookup (behind one mutex) was the largest user-space cost
    /// per request.
    meta: Mutex<HashMap<MetaKey, (Arc<FileRec>, Instant)>>,
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
            st,
            cfg,
            addr,
            open: AtomicUsize::new(0),
            stats: HttpStats::default(),
            meta: Mutex::new(HashMap::new()),
        }
    }

    /// The file record of `id` for `who.app`: from the cache when fresh (and `cached_ok`), else
    /// from the metadata store (which refreshes the cache).
    pub fn lookup(&self, who: &Who, id: &str, cached_ok: bool) -> OpResult<Arc<FileRec>> {
        let key = (who.app.clone(), id.to_owned());
        if cached_ok
            && let Some((f, at)) = self.meta.lock().get(&key)
            && at.elapsed() < META_TTL
        {
            return Ok(f.clone());
        }
        let f = Arc::new(self.st.stat(who, id)?);
        let mut m = self.meta.lock();
        if m.len() >= META_CACHE_MAX {
            m.clear();
        }
        m.insert(key, (f.clone(), Instant::now()));
        Ok(f)
    }

    /// Drops a cached record whose file could not be opened.
    pub fn forget(&self, who: &Who, id: &str) {
        self.meta.lock().remove(&(who.app.clone(), id.to_owned()));
    }

    /// A new HTTP connection, unless the gateway's own connection limit is reached.
    pub fn accept(self: &Arc<Self>, stream: TcpStream, peer: SocketAddr) -> Option<Box<dyn Conn>> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.cfg.max_connections {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.refuse(stream, peer);
            return None;
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

    fn released(&self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
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
