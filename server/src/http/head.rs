//! The request head: request line and headers parsed by `httparse` from a bounded buffer, reduced
//! to what the gateway uses. Percent-decoding of paths and query values lives here too.

/// Most header lines accepted; more is answered 431.
pub const MAX_HEADERS: usize = 64;

/// What the gateway needs from one request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    /// The request target as sent (origin form, or absolute form reduced to its path + query).
    pub target: String,
    /// HTTP/1.`minor`.
    pub minor: u8,
    /// The connection may carry another request after this one (HTTP/1.1 default, or 1.0 with
    /// `Connection: keep-alive`; never with `Connection: close`).
    pub keep_alive: bool,
    pub has_host: bool,
    /// A request body is announced (Content-Length > 0 or Transfer-Encoding): the gateway takes no
    /// bodies, so the connection closes after the answer instead of reading it.
    pub has_body: bool,
    pub range: Option<String>,
    pub if_none_match: Option<String>,
    pub if_range: Option<String>,
    pub if_modified_since: Option<String>,
}

/// The outcome of parsing what is buffered so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// The head is not complete yet.
    Partial,
    /// A head of `len` bytes.
    Complete(Box<Head>, usize),
    /// Malformed (400), with a short reason.
    Bad(&'static str),
    /// Too many header lines (431).
    TooManyHeaders,
}

/// Header values the gateway reads; not UTF-8 means "absent" for these (they are all ASCII).
fn text(v: &[u8]) -> Option<String> {
    std::str::from_utf8(v).ok().map(|s| s.trim().to_owned())
}

pub fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Ok(httparse::Status::Complete(n)) => n,
        Err(httparse::Error::TooManyHeaders) => return Parsed::TooManyHeaders,
        Err(_) => return Parsed::Bad("malformed request head"),
    };
    let (Some(method), Some(path), Some(minor)) = (req.method, req.path, req.version) else {
        return Parsed::Bad("incomplete request line");
    };
    let mut h = Head {
        method: method.to_owned(),
        target: path.to_owned(),
        minor,
        keep_alive: minor >= 1,
        has_host: false,
        has_body: false,
        range: None,
        if_none_match: None,
        if_range: None,
        if_modified_since: None,
    };
    let mut content_length: Option<u64> = None;
    for hd in req.headers.iter() {
        let name = hd.name;
        if name.eq_ignore_ascii_case("host") {
            if h.has_host {
                return Parsed::Bad("more than one Host header");
            }
            h.has_host = true;
        } else if name.eq_ignore_ascii_case("connection") {
            for token in hd.value.split(|b| *b == b',') {
                let t = token.trim_ascii();
                if t.eq_ignore_ascii_case(b"close") {
                    h.keep_alive = false;
                } else if t.eq_ignore_ascii_case(b"keep-alive") && minor == 0 {
                    h.keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            let v = text(hd.value).and_then(|v| v.parse::<u64>().ok());
            match (v, content_length) {
                (None, _) => return Parsed::Bad("invalid Content-Length"),
                (Some(a), Some(b)) if a != b => return Parsed::Bad("conflicting Content-Length"),
                (Some(a), _) => content_length = Some(a),
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            h.has_body = true;
        } else if name.eq_ignore_ascii_case("range") {
            if h.range.is_some() {
                // Two Range headers: ambiguous, so no range at all (whole body).
                h.range = Some(String::new());
            } else {
                h.range = Some(text(hd.value).unwrap_or_default());
            }
        } else if name.eq_ignore_ascii_case("if-none-match") {
            h.if_none_match = text(hd.value);
        } else if name.eq_ignore_ascii_case("if-range") {
            h.if_range = text(hd.value);
        } else if name.eq_ignore_ascii_case("if-modified-since") {
            h.if_modified_since = text(hd.value);
        }
    }
    if content_length.is_some_and(|n| n > 0) {
        h.has_body = true;
    }
    if h.has_body {
        h.keep_alive = false;
    }
    // Absolute form (`GET http://host/files/x HTTP/1.1`): keep the path and query.
    if let Some(rest) = h
        .target
        .strip_prefix("http://")
        .or_else(|| h.target.strip_prefix("https://"))
    {
        h.target = match rest.find('/') {
            Some(i) => rest[i..].to_owned(),
            None => "/".to_owned(),
        };
        h.has_host = true;
    }
    if minor >= 1 && !h.has_host {
        return Parsed::Bad("HTTP/1.1 request without Host");
    }
    Parsed::Complete(Box::new(h), len)
}

/// Decodes `%XX` escapes (and nothing else: `+` stays `+`). `None` for a broken escape or bytes
/// that are not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            let hi = (hex[0] as char).to_digit(16)?;
            let lo = (hex[1] as char).to_digit(16)?;
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A `%` escape that does not decode to UTF-8.
#[derive(Debug, PartialEq, Eq)]
pub struct BadEscape;

/// The decoded value of the first `key=` in a query string. `Err` when an escape is broken.
pub fn query_param(query: &str, key: &str) -> Result<Option<String>, BadEscape> {
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        // Without escapes a name is itself (no allocation for the usual case).
        let hit = if k.contains('%') {
            percent_decode(k).as_deref() == Some(key)
        } else {
            k == key
        };
        if hit {
            return percent_decode(v).map(Some).ok_or(BadEscape);
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(raw: &str) -> Head {
        match parse(raw.as_bytes()) {
            Parsed::Complete(h, n) => {
                assert_eq!(n, raw.len());
                *h
            }
            other => panic!("{raw:?}: {other:?}"),
        }
    }

    #[test]
    fn a_typical_player_request() {
        let h = complete(
            "GET /files/0001-abc?app=demo&exp=9&sig=ff HTTP/1.1\r\nHost: x\r\n\
             Range: bytes=0-\r\nIf-Range: \"abc\"\r\nIf-None-Match: W/\"x\", \"y\"\r\n\r\n",
        );
        assert_eq!(h.method, "GET");
        assert_eq!(h.target, "/files/0001-abc?app=demo&exp=9&sig=ff");
        assert!(h.keep_alive && h.has_host && !h.has_body);
        assert_eq!(h.range.as_deref(), Some("bytes=0-"));
        assert_eq!(h.if_range.as_deref(), Some("\"abc\""));
        assert_eq!(h.if_none_match.as_deref(), Some("W/\"x\", \"y\""));
    }

    #[test]
    fn partial_bad_and_too_many() {
        assert_eq!(
            parse(b"GET /files/x HTTP/1.1\r\nHost: x\r\n"),
            Parsed::Partial
        );
        assert_eq!(parse(b"GET /files/x HT"), Parsed::Partial);
        assert!(matches!(
            parse(b"GET /files/x FOO/1.1\r\n\r\n"),
            Parsed::Bad(_)
        ));
        assert!(matches!(
            parse(b"GET /files/x HTTP/1.1\r\n\r\n"),
            Parsed::Bad(_)
        ));
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Parsed::Bad(_)
        ));
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n"),
            Parsed::Bad(_)
        ));
        let mut flood = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
        for i in 0..MAX_HEADERS {
            flood.push_str(&format!("X-{i}: y\r\n"));
        }
        flood.push_str("\r\n");
        assert_eq!(parse(flood.as_bytes()), Parsed::TooManyHeaders);
    }

    #[test]
    fn connection_semantics() {
        assert!(!complete("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(complete("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        assert!(!complete("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").keep_alive);
        let b = complete("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n");
        assert!(b.has_body && !b.keep_alive);
        let b = complete("GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(b.has_body && !b.keep_alive);
        let a = complete("GET http://h:1/files/x?y=1 HTTP/1.1\r\n\r\n");
        assert_eq!(a.target, "/files/x?y=1");
        let two =
            complete("GET / HTTP/1.1\r\nHost: a\r\nRange: bytes=0-1\r\nRange: bytes=2-3\r\n\r\n");
        assert_eq!(two.range.as_deref(), Some(""));
    }

    #[test]
    fn decoding() {
        assert_eq!(percent_decode("a%20b%2Fc+d").as_deref(), Some("a b/c+d"));
        assert_eq!(percent_decode("%C3%A9").as_deref(), Some("é"));
        assert_eq!(percent_decode("%"), None);
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%FF"), None);
        assert_eq!(
            query_param("app=d%20x&exp=5", "app"),
            Ok(Some("d x".into()))
        );
        assert_eq!(query_param("app=d&exp=5", "exp"), Ok(Some("5".into())));
        assert_eq!(query_param("app=d&exp", "exp"), Ok(Some(String::new())));
        assert_eq!(query_param("app=d", "sig"), Ok(None));
        assert_eq!(query_param("sig=%G0", "sig"), Err(BadEscape));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Any bytes get a decision without panicking, and a complete head never claims more
        /// bytes than were given.
        #[test]
        fn any_bytes_are_decided(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            if let Parsed::Complete(_, n) = parse(&b) {
                proptest::prop_assert!(n <= b.len());
            }
        }

        /// Heads built from arbitrary header values parse, and the Range value comes through.
        #[test]
        fn range_values_come_through(v in "[ -~]{0,80}") {
            let raw = format!("GET /files/x HTTP/1.1\r\nHost: a\r\nRange: {v}\r\n\r\n");
            match parse(raw.as_bytes()) {
                Parsed::Complete(h, _) => {
                    proptest::prop_assert_eq!(h.range.as_deref(), Some(v.trim()));
                    // And the range decision stays inside any body.
                    for size in [0u64, 1, 1000, u64::MAX] {
                        if let crate::http::range::Ranged::Part { start, end } =
                            crate::http::range::resolve(h.range.as_deref(), size)
                        {
                            proptest::prop_assert!(start <= end && end < size);
                        }
                    }
                }
                other => proptest::prop_assert!(false, "{:?}", other),
            }
        }
    }
}
