//! From a parsed request head to an answer: route, signature check, file lookup, conditional
//! requests and ranges, and the response head bytes. No I/O except opening the stored file.

use super::directory::Where;
use super::head::{self, Head};
use super::range::{self, Ranged};
use super::{Gateway, HttpConfig, Stored};
use crate::storage::Who;
use ferry_common::proto::{self, APP_ID_LEN, ErrorCode, FILE_ID_LEN, NodeAddr};
use ferry_common::signing;
use log::warn;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::File;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// What follows the response head.
pub enum Body {
    None,
    /// A short generated text (error pages).
    Text(Vec<u8>),
    /// `len` bytes at `off` of a stored file, sent by sendfile.
    File {
        file: Arc<File>,
        off: u64,
        len: u64,
    },
}

/// A complete answer to one request.
pub struct Answer {
    pub status: u16,
    /// The stored file's precomputed header lines, written first: its validators, and with
    /// `true` its content lines too ([`Stored::inline`]).
    pub stored: Option<(Arc<Stored>, bool)>,
    /// Whole header lines written next (the content lines of an attachment).
    pub lines: String,
    pub headers: Vec<(&'static str, String)>,
    /// The `Content-Length` to announce (for a HEAD: what the GET would send); none for 304.
    pub length: Option<u64>,
    /// What follows the head on the wire (nothing for HEAD and 304).
    pub body: Body,
    /// Close the connection once the answer is out.
    pub close: bool,
}

pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        416 => "Range Not Satisfiable",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

impl Answer {
    /// A short text answer; `close` for answers after which the stream cannot be trusted.
    pub fn error(status: u16, text: &str, close: bool) -> Answer {
        let text = format!("{status} {}: {text}\n", reason(status)).into_bytes();
        Answer {
            status,
            stored: None,
            lines: String::new(),
            headers: vec![("Content-Type", "text/plain; charset=utf-8".into())],
            length: Some(text.len() as u64),
            body: Body::Text(text),
            close,
        }
    }

    /// 307 to the same target at another gateway (the signature covers the file id, app and
    /// expiry, not the host, so the URL holds there as it is).
    fn redirect(to: &NodeAddr, target: &str) -> Answer {
        let mut a = Answer::error(307, &format!("served by the gateway at {to}"), false);
        a.headers.push(("Location", format!("http://{to}{target}")));
        a
    }

    fn not_modified(f: Arc<Stored>) -> Answer {
        Answer {
            status: 304,
            stored: Some((f, false)),
            lines: String::new(),
            headers: Vec::new(),
            length: None,
            body: Body::None,
            close: false,
        }
    }

    /// The status line and headers.
    pub fn head_bytes(&self, keep_alive: bool, now: SystemTime) -> Vec<u8> {
        let mut s = String::with_capacity(512);
        let _ = write!(
            s,
            "HTTP/1.1 {} {}\r\nServer: ferry\r\nDate: {}\r\n",
            self.status,
            reason(self.status),
            httpdate::fmt_http_date(now)
        );
        if let Some((f, with_content)) = &self.stored {
            s.push_str(&f.validators);
            if *with_content {
                s.push_str(&f.inline);
            }
        }
        s.push_str(&self.lines);
        for (k, v) in &self.headers {
            let _ = write!(s, "{k}: {v}\r\n");
        }
        if let Some(n) = self.length {
            let _ = write!(s, "Content-Length: {n}\r\n");
        }
        let _ = write!(
            s,
            "Connection: {}\r\n\r\n",
            if keep_alive && !self.close {
                "keep-alive"
            } else {
                "close"
            }
        );
        s.into_bytes()
    }
}

/// `/files/{file_id}` or `/files/{file_id}/{name}`, decoded.
#[derive(Debug, PartialEq, Eq)]
pub struct Route {
    pub file_id: String,
    pub name: Option<String>,
}

/// The path part of a target, or `None` when it is not one of the gateway's routes.
pub fn route(path: &str) -> Option<Route> {
    let rest = path.strip_prefix("/files/")?;
    let mut parts = rest.splitn(2, '/');
    let id = head::percent_decode(parts.next()?)?;
    // File ids are ASCII letters, digits, `-` and `_`, after `<group>.` in a cluster's;
    // anything else cannot exist.
    let plain = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    let well_formed = match id.split_once('.') {
        Some((_, rest)) => proto::file_group(&id).is_some() && plain(rest),
        None => plain(&id),
    };
    if id.len() > FILE_ID_LEN || !well_formed {
        return None;
    }
    let name = match parts.next() {
        None | Some("") => None,
        Some(n) => {
            let n = head::percent_decode(n)?;
            if n.contains('/') || n.chars().any(char::is_control) {
                return None;
            }
            Some(n)
        }
    };
    Some(Route { file_id: id, name })
}

/// Why a request was not authorized (the 403 text; it depends only on the URL, never on whether
/// the file exists).
#[derive(Debug, PartialEq, Eq)]
pub enum Denied {
    Missing,
    Expired,
    Invalid,
    /// Signed, but valid for longer than `http.max_url_lifetime_secs`.
    TooLong,
}

impl Denied {
    fn text(&self) -> &'static str {
        match self {
            Denied::Missing => "this URL is not signed (see `ferry url`)",
            Denied::Expired => "this signed URL has expired",
            Denied::TooLong => {
                "this signed URL is valid for longer than this gateway allows \
                 (http.max_url_lifetime_secs); sign one that expires sooner"
            }
            Denied::Invalid => "invalid signature",
        }
    }
}

/// What [`authorize`] checks URLs against: `public_reads` and each app's keyed verifier (the
/// secret's HMAC key schedule, computed once).
pub struct Keys {
    public_reads: bool,
    apps: HashMap<String, signing::Verifier>,
    /// `http.max_url_lifetime_secs`.
    max_lifetime: u64,
}

impl Keys {
    pub fn new(cfg: &HttpConfig) -> Keys {
        Keys {
            public_reads: cfg.public_reads,
            max_lifetime: cfg.max_url_lifetime_secs,
            apps: cfg
                .secrets
                .iter()
                .map(|(app, secret)| (app.clone(), signing::Verifier::new(secret.as_bytes())))
                .collect(),
        }
    }
}

/// Checks the signed-URL parameters (or public reads) and returns the app whose files the request
/// may read. `resource` is what the signature covers ([`signing::resource`]: the file id, or
/// `{file_id}/{name}`). Runs before any lookup, so a 403 says nothing about the file.
pub fn authorize(keys: &Keys, resource: &str, query: &str, now: u64) -> Result<String, Denied> {
    let get = |k: &str| head::query_param(query, k).map_err(|_| Denied::Invalid);
    let app = get("app")?;
    let sig = get("sig")?;
    let Some(app) = app.filter(|a| !a.is_empty() && a.len() <= APP_ID_LEN) else {
        return Err(if sig.is_some() {
            Denied::Invalid
        } else {
            Denied::Missing
        });
    };
    let Some(sig) = sig else {
        // Unsigned: only when the operator allows public reads; `app` still scopes the lookup.
        return if keys.public_reads {
            Ok(app)
        } else {
            Err(Denied::Missing)
        };
    };
    let exp = get("exp")?
        .and_then(|e| e.parse::<u64>().ok())
        .ok_or(Denied::Invalid)?;
    let Some(key) = keys.apps.get(&app) else {
        return Err(Denied::Invalid);
    };
    if !key.verify(resource, exp, &app, &sig) {
        return Err(Denied::Invalid);
    }
    // Checked after the MAC so a forged URL learns nothing from the expiry answer either.
    if exp < now {
        return Err(Denied::Expired);
    }
    if exp - now > keys.max_lifetime {
        return Err(Denied::TooLong);
    }
    Ok(app)
}

/// `Content-Type` from the stored name's extension.
pub fn content_type(name: &str) -> &'static str {
    let ext = match name.rsplit_once('.') {
        Some((_, e)) => e.to_ascii_lowercase(),
        None => return "application/octet-stream",
    };
    match ext.as_str() {
        "mp4" | "m4v" => "video/mp4",
        "webm" => "video/webm",
        "mov" => "video/quicktime",
        "mkv" => "video/x-matroska",
        "avi" => "video/x-msvideo",
        "ts" => "video/mp2t",
        "m3u8" => "application/vnd.apple.mpegurl",
        "mp3" => "audio/mpeg",
        "m4a" => "audio/mp4",
        "aac" => "audio/aac",
        "ogg" | "oga" => "audio/ogg",
        "opus" => "audio/opus",
        "wav" => "audio/wav",
        "flac" => "audio/flac",
        "jpg" | "jpeg" => "image/jpeg",
        "png" => "image/png",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "avif" => "image/avif",
        "svg" => "image/svg+xml",
        "bmp" => "image/bmp",
        "ico" => "image/x-icon",
        "pdf" => "application/pdf",
        "txt" | "log" => "text/plain; charset=utf-8",
        "csv" => "text/csv; charset=utf-8",
        "json" => "application/json",
        "xml" => "application/xml",
        "html" | "htm" => "text/html; charset=utf-8",
        "zip" => "application/zip",
        "gz" => "application/gzip",
        "tar" => "application/x-tar",
        _ => "application/octet-stream",
    }
}

/// `Content-Disposition` value: an ASCII fallback `filename` and the exact UTF-8 name as RFC 5987
/// `filename*` (attr-char kept, every other byte %-encoded).
pub fn disposition(kind: &str, name: &str) -> String {
    let fallback: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut enc = String::with_capacity(name.len() * 3);
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
            enc.push(b as char);
        } else {
            let _ = write!(enc, "%{b:02X}");
        }
    }
    format!("{kind}; filename=\"{fallback}\"; filename*=UTF-8''{enc}")
}

/// The header lines about a body's content: Content-Type from the stored name, a
/// Content-Disposition of `kind` with `name` (none for an empty name), and the two lines that
/// keep a stored HTML or SVG from running scripts on this origin (stored names are client-given).
pub fn content_lines(stored_name: &str, kind: &str, name: &str) -> String {
    let mut s = format!("Content-Type: {}\r\n", content_type(stored_name));
    if !name.is_empty() {
        let _ = write!(s, "Content-Disposition: {}\r\n", disposition(kind, name));
    }
    s.push_str("X-Content-Type-Options: nosniff\r\nContent-Security-Policy: sandbox\r\n");
    s
}

fn strip_weak(tag: &str) -> &str {
    tag.strip_prefix("W/").unwrap_or(tag)
}

/// `If-None-Match`: weak comparison against our (strong) ETag.
fn none_match_hits(header: &str, etag: &str) -> bool {
    header
        .split(',')
        .map(str::trim)
        .any(|t| t == "*" || strip_weak(t) == etag)
}

/// `If-Range`: the range applies only if the validator matches exactly (a strong ETag, or the
/// exact Last-Modified date).
fn if_range_holds(header: &str, etag: &str, modified: u64) -> bool {
    if header.starts_with('"') || header.starts_with("W/") {
        return header == etag;
    }
    match httpdate::parse_http_date(header) {
        Ok(t) => t.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs()) == Some(modified),
        Err(_) => false,
    }
}

/// On a cluster node, the answer for a file of `group` when this node's group does not hold it:
/// a redirect to a gateway of its group, or why there is none. `None`: serve it here.
fn elsewhere(gw: &Gateway, group: &str, id: &str, target: &str) -> Option<Answer> {
    let unavailable = |text: &str| {
        let mut a = Answer::error(503, text, false);
        a.headers.push(("Retry-After", "2".into()));
        a
    };
    Some(match gw.directory.as_ref()?.locate(group, id) {
        Where::Here => return None,
        Where::There(to) => Answer::redirect(&to, target),
        Where::NoGroup => Answer::error(404, "no such file", true),
        Where::NoGateway => unavailable(&format!("no HTTP gateway of group {group} is online")),
        Where::Unknown => unavailable("no tracker has listed the cluster's gateways yet"),
    })
}

/// A cluster node's lookup of an id that does not name its group (issued before ids did)
/// failed here: the group its record names, when that is another group's.
fn recorded_elsewhere(gw: &Gateway, who: &Who, id: &str, target: &str) -> Option<Answer> {
    gw.directory.as_ref()?;
    match gw.st.meta().file_group(id, &who.app) {
        Ok(Some(g)) if !g.is_empty() => elsewhere(gw, &g, id, target),
        Ok(_) => None,
        Err(e) => {
            warn!("http: group lookup of file {id} failed: {e:#}");
            None
        }
    }
}

/// Looks the file up (cache first) with its open bytes.
fn open_stored(gw: &Gateway, who: &Who, id: &str) -> Result<Arc<Stored>, Answer> {
    match gw.lookup(who, id) {
        Ok(f) => Ok(f),
        Err(e) if e.code == ErrorCode::NotFound => Err(Answer::error(404, "no such file", true)),
        Err(e) if e.code == ErrorCode::Io => {
            warn!("http: {}", e.text);
            Err(Answer::error(500, "stored file unreadable", false))
        }
        Err(e) => {
            warn!("http: lookup of file {id} failed: {e}");
            Err(Answer::error(500, "metadata lookup failed", false))
        }
    }
}

/// The whole answer to a request for a stored file.
pub fn answer(gw: &Gateway, h: &Head, now: SystemTime) -> Answer {
    let is_head = h.method == "HEAD";
    if h.method != "GET" && !is_head {
        let mut a = Answer::error(405, "only GET and HEAD are served", h.has_body);
        a.headers.push(("Allow", "GET, HEAD".into()));
        return a;
    }
    let (path, query) = h.target.split_once('?').unwrap_or((&h.target, ""));
    let Some(r) = route(path) else {
        return Answer::error(404, "no such path (use /files/{file_id})", true);
    };
    let now_secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let resource = signing::resource(&r.file_id, r.name.as_deref());
    let app = match authorize(&gw.keys, &resource, query, now_secs) {
        Ok(app) => app,
        Err(d) => return Answer::error(403, d.text(), true),
    };
    let who = Who {
        app,
        user: "http".into(),
    };
    let grouped = proto::file_group(&r.file_id);
    if let Some(g) = grouped
        && let Some(a) = elsewhere(gw, g, &r.file_id, &h.target)
    {
        return a;
    }
    let f = match open_stored(gw, &who, &r.file_id) {
        Ok(x) => x,
        Err(a) if grouped.is_none() && matches!(a.status, 404 | 500) => {
            return recorded_elsewhere(gw, &who, &r.file_id, &h.target).unwrap_or(a);
        }
        Err(a) => return a,
    };
    let rec = &f.rec;
    if let Some(inm) = &h.if_none_match {
        if none_match_hits(inm, &f.etag) {
            return Answer::not_modified(f);
        }
    } else if let Some(ims) = &h.if_modified_since
        && let Ok(t) = httpdate::parse_http_date(ims)
        && t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) >= rec.created
    {
        return Answer::not_modified(f);
    }
    let mut headers = Vec::new();
    // `/files/{id}/{name}`: an attachment under the name from the URL; `/files/{id}`: the
    // stored file's own (precomputed) lines.
    let lines = match &r.name {
        Some(name) => content_lines(&rec.name, "attachment", name),
        None => String::new(),
    };
    let inline = r.name.is_none();
    let range_applies = match &h.if_range {
        Some(v) => if_range_holds(v, &f.etag, rec.created),
        None => true,
    };
    let ranged = if range_applies {
        range::resolve(h.range.as_deref(), rec.size)
    } else {
        Ranged::Full
    };
    let (status, off, len) = match ranged {
        Ranged::Full => (200, 0, rec.size),
        Ranged::Part { start, end } => {
            headers.push(("Content-Range", format!("bytes {start}-{end}/{}", rec.size)));
            (206, start, end - start + 1)
        }
        Ranged::Unsatisfiable => {
            let mut a = Answer::error(416, "range not satisfiable", false);
            a.headers
                .push(("Content-Range", format!("bytes */{}", rec.size)));
            return a;
        }
    };
    let body = if is_head || len == 0 {
        Body::None
    } else {
        Body::File {
            file: f.file.clone(),
            off,
            len,
        }
    };
    Answer {
        status,
        stored: Some((f, inline)),
        lines,
        headers,
        length: Some(len),
        body,
        close: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cfg(public: bool) -> Keys {
        let mut c = HttpConfig {
            public_reads: public,
            ..HttpConfig::default()
        };
        c.secrets
            .insert("demo".into(), "0123456789abcdef-secret".into());
        Keys::new(&c)
    }

    #[test]
    fn urls_live_at_most_the_configured_lifetime_and_sign_their_name() {
        let c = cfg(false);
        let week = HttpConfig::default().max_url_lifetime_secs;
        let secret = b"0123456789abcdef-secret";
        let q = signing::signed_query(secret, "f-1", 10 + week, "demo");
        assert_eq!(authorize(&c, "f-1", &q, 10), Ok("demo".into()));
        assert_eq!(authorize(&c, "f-1", &q, 9), Err(Denied::TooLong));
        let forever = signing::signed_query(secret, "f-1", u64::MAX, "demo");
        assert_eq!(authorize(&c, "f-1", &forever, 10), Err(Denied::TooLong));
        // A named download signs its name: the same URL under another name is refused, and
        // the unnamed URL cannot be given a name.
        let named = signing::resource("f-1", Some("photo.jpg"));
        let nq = signing::signed_query(secret, &named, 1000, "demo");
        assert_eq!(authorize(&c, &named, &nq, 999), Ok("demo".into()));
        let renamed = signing::resource("f-1", Some("photo.jpg.exe"));
        assert_eq!(authorize(&c, &renamed, &nq, 999), Err(Denied::Invalid));
        let plain = signing::signed_query(secret, "f-1", 1000, "demo");
        assert_eq!(authorize(&c, &named, &plain, 999), Err(Denied::Invalid));
        assert_eq!(authorize(&c, "f-1", &nq, 999), Err(Denied::Invalid));
    }

    #[test]
    fn signed_urls() {
        let c = cfg(false);
        let q = signing::signed_query(b"0123456789abcdef-secret", "f-1", 1000, "demo");
        assert_eq!(authorize(&c, "f-1", &q, 999), Ok("demo".into()));
        assert_eq!(authorize(&c, "f-1", &q, 1000), Ok("demo".into()));
        assert_eq!(authorize(&c, "f-1", &q, 1001), Err(Denied::Expired));
        // Another file, a later expiry, another app, a flipped digit: all invalid.
        assert_eq!(authorize(&c, "f-2", &q, 999), Err(Denied::Invalid));
        let later = q.replace("exp=1000", "exp=2000");
        assert_eq!(authorize(&c, "f-1", &later, 999), Err(Denied::Invalid));
        let other = q.replace("app=demo", "app=other");
        assert_eq!(authorize(&c, "f-1", &other, 999), Err(Denied::Invalid));
        let last = q.chars().last().unwrap();
        let flipped = format!(
            "{}{}",
            &q[..q.len() - 1],
            if last == '0' { '1' } else { '0' }
        );
        assert_eq!(authorize(&c, "f-1", &flipped, 999), Err(Denied::Invalid));
        // Unsigned: refused unless public reads are on, and then scoped by app.
        assert_eq!(authorize(&c, "f-1", "", 0), Err(Denied::Missing));
        assert_eq!(authorize(&c, "f-1", "app=demo", 0), Err(Denied::Missing));
        assert_eq!(
            authorize(&cfg(true), "f-1", "app=demo", 0),
            Ok("demo".into())
        );
        assert_eq!(authorize(&cfg(true), "f-1", "", 0), Err(Denied::Missing));
        // A wrong signature stays wrong with public reads on.
        assert_eq!(authorize(&cfg(true), "f-2", &q, 0), Err(Denied::Invalid));
        // Broken escapes and a missing exp.
        assert_eq!(
            authorize(&c, "f-1", "app=%zz&sig=00", 0),
            Err(Denied::Invalid)
        );
        let no_exp = q.replace("exp=1000&", "");
        assert_eq!(authorize(&c, "f-1", &no_exp, 0), Err(Denied::Invalid));
    }

    #[test]
    fn routes() {
        assert_eq!(
            route("/files/0001-ab"),
            Some(Route {
                file_id: "0001-ab".into(),
                name: None
            })
        );
        assert_eq!(
            route("/files/0001-ab/My%20Clip.mp4"),
            Some(Route {
                file_id: "0001-ab".into(),
                name: Some("My Clip.mp4".into())
            })
        );
        assert_eq!(route("/files/0001-ab/").map(|r| r.name), Some(None));
        // A cluster's id names its group before a dot.
        assert_eq!(
            route("/files/g1.0001-ab").map(|r| r.file_id),
            Some("g1.0001-ab".into())
        );
        for bad in [
            "/files/",
            "/files/a/b/c",
            "/files/a%2Fb",
            "/files/../x",
            "/files/..",
            "/files/g1.",
            "/files/.x",
            "/files/g1.a.b",
            "/files/g%2F1.a",
            "/file/x",
            "/",
            "/files/x/%0a",
            "/files/%zz",
        ] {
            assert_eq!(route(bad), None, "{bad}");
        }
        assert_eq!(
            route(&format!("/files/{}", "a".repeat(FILE_ID_LEN + 1))),
            None
        );
    }

    #[test]
    fn content_types() {
        assert_eq!(content_type("clip.MP4"), "video/mp4");
        assert_eq!(content_type("a.b.webm"), "video/webm");
        assert_eq!(content_type("x.mkv"), "video/x-matroska");
        assert_eq!(content_type("song.mp3"), "audio/mpeg");
        assert_eq!(content_type("p.JPEG"), "image/jpeg");
        assert_eq!(content_type("p.jpg"), "image/jpeg");
        assert_eq!(content_type("doc.pdf"), "application/pdf");
        assert_eq!(content_type("notes.txt"), "text/plain; charset=utf-8");
        assert_eq!(content_type("noext"), "application/octet-stream");
        assert_eq!(content_type("weird.xyz"), "application/octet-stream");
        assert_eq!(content_type(""), "application/octet-stream");
    }

    #[test]
    fn rfc5987_names() {
        assert_eq!(
            disposition("inline", "clip.mp4"),
            "inline; filename=\"clip.mp4\"; filename*=UTF-8''clip.mp4"
        );
        assert_eq!(
            disposition("attachment", "été \"x\".mp4"),
            "attachment; filename=\"_t_ _x_.mp4\"; filename*=UTF-8''%C3%A9t%C3%A9%20%22x%22.mp4"
        );
        let d = disposition("inline", "a\r\nb;c'd%e");
        assert!(!d.contains('\r') && !d.contains('\n'), "{d}");
        assert!(d.ends_with("filename*=UTF-8''a%0D%0Ab%3Bc%27d%25e"), "{d}");
    }

    #[test]
    fn validators() {
        let etag = "\"abc\"";
        assert!(none_match_hits("\"abc\"", etag));
        assert!(none_match_hits("W/\"abc\"", etag));
        assert!(none_match_hits("\"x\", \"abc\"", etag));
        assert!(none_match_hits("*", etag));
        assert!(!none_match_hits("\"abd\"", etag));
        assert!(if_range_holds("\"abc\"", etag, 0));
        assert!(!if_range_holds("W/\"abc\"", etag, 0));
        assert!(!if_range_holds("\"abd\"", etag, 0));
        let date = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        assert!(if_range_holds(&date, etag, 1_700_000_000));
        assert!(!if_range_holds(&date, etag, 1_700_000_001));
        assert!(!if_range_holds("garbage", etag, 0));
    }
}
