//! Signed URLs for the HTTP gateway (like S3 presigned URLs or FastDFS's anti-steal token).
//!
//! A URL `/files/{file_id}?app=APP&exp=UNIX&sig=HEX` is valid until `exp` (seconds since the
//! epoch) for the files of app `APP`. `sig` is the lowercase hex HMAC-SHA256, keyed with the
//! app's secret, of the string
//!
//! ```text
//! GET\n{file_id}\n{exp}\n{app}
//! ```
//!
//! A URL that names the download `/files/{file_id}/{name}?...` (an attachment under that name)
//! signs `{file_id}/{name}` (the name decoded) in place of `{file_id}`: whoever holds the URL
//! cannot rename what it downloads. File ids never contain `/`, so the two cannot collide.
//!
//! The method in the signed string is always `GET`: a HEAD request is verified against the GET
//! signature (HEAD reveals nothing a GET with the same URL would not). The server compares in
//! constant time ([`verify`]). The client (`ferry url`) and the server share this module, so
//! both sides build the string the same way.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The method every signature covers (HEAD is checked against GET).
pub const SIGNED_METHOD: &str = "GET";

/// Length of a signature in hex characters.
pub const SIG_HEX_LEN: usize = 64;

/// The exact bytes that are signed.
pub fn string_to_sign(file_id: &str, exp: u64, app: &str) -> String {
    format!("{SIGNED_METHOD}\n{file_id}\n{exp}\n{app}")
}

fn mac(secret: &[u8], file_id: &str, exp: u64, app: &str) -> HmacSha256 {
    // HMAC accepts keys of any length (long keys are hashed first), so this cannot fail.
    let mut m = <HmacSha256 as KeyInit>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    m.update(string_to_sign(file_id, exp, app).as_bytes());
    m
}

/// The signature as lowercase hex.
pub fn sign(secret: &[u8], file_id: &str, exp: u64, app: &str) -> String {
    hex::encode(mac(secret, file_id, exp, app).finalize().into_bytes())
}

/// Checks a hex signature in constant time. Malformed hex (wrong length, bad digits) is false.
pub fn verify(secret: &[u8], file_id: &str, exp: u64, app: &str, sig_hex: &str) -> bool {
    if sig_hex.len() != SIG_HEX_LEN {
        return false;
    }
    let Ok(sig) = hex::decode(sig_hex) else {
        return false;
    };
    mac(secret, file_id, exp, app).verify_slice(&sig).is_ok()
}

/// One secret's HMAC key schedule, computed once: a server checking many URLs with the same
/// secret saves the two SHA-256 blocks of keying (and the string and hex allocations) that
/// [`verify`] spends on every call. Same answers as [`verify`].
#[derive(Clone)]
pub struct Verifier(HmacSha256);

impl Verifier {
    pub fn new(secret: &[u8]) -> Verifier {
        Verifier(
            <HmacSha256 as KeyInit>::new_from_slice(secret)
                .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length")),
        )
    }

    /// [`verify`] with this secret.
    pub fn verify(&self, file_id: &str, exp: u64, app: &str, sig_hex: &str) -> bool {
        let mut sig = [0u8; SIG_HEX_LEN / 2];
        if sig_hex.len() != SIG_HEX_LEN || hex::decode_to_slice(sig_hex, &mut sig).is_err() {
            return false;
        }
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        let mut n = exp;
        loop {
            at -= 1;
            digits[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        let mut m = self.0.clone();
        for part in [
            SIGNED_METHOD.as_bytes(),
            b"\n",
            file_id.as_bytes(),
            b"\n",
            &digits[at..],
            b"\n",
            app.as_bytes(),
        ] {
            m.update(part);
        }
        m.verify_slice(&sig).is_ok()
    }
}

/// Percent-encodes everything except RFC 3986 unreserved characters (for query values).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The query string of a signed URL: `app=APP&exp=EXP&sig=HEX`.
pub fn signed_query(secret: &[u8], file_id: &str, exp: u64, app: &str) -> String {
    format!(
        "app={}&exp={exp}&sig={}",
        percent_encode(app),
        sign(secret, file_id, exp, app)
    )
}

/// What a URL's signature covers: the file id, or `{file_id}/{name}` for a named download.
pub fn resource(file_id: &str, name: Option<&str>) -> String {
    match name {
        Some(n) => format!("{file_id}/{n}"),
        None => file_id.to_owned(),
    }
}

/// A signed URL that downloads the file as an attachment named `name` (signed with it).
pub fn signed_named_url(
    base: &str,
    secret: &[u8],
    file_id: &str,
    name: &str,
    exp: u64,
    app: &str,
) -> String {
    format!(
        "{}/files/{}/{}?{}",
        base.trim_end_matches('/'),
        percent_encode(file_id),
        percent_encode(name),
        signed_query(secret, &resource(file_id, Some(name)), exp, app)
    )
}

/// A full signed URL under `base` (e.g. `http://127.0.0.1:7480`), trailing slashes ignored.
/// The file id goes into the path percent-encoded (ids are plain ASCII, so normally unchanged).
pub fn signed_url(base: &str, secret: &[u8], file_id: &str, exp: u64, app: &str) -> String {
    format!(
        "{}/files/{}?{}",
        base.trim_end_matches('/'),
        percent_encode(file_id),
        signed_query(secret, file_id, exp, app)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_an_independent_hmac() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let mut m = <HmacSha256 as KeyInit>::new_from_slice(b"Jefe").unwrap();
        m.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(m.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(string_to_sign("f1", 42, "demo"), "GET\nf1\n42\ndemo");
    }

    #[test]
    fn verify_accepts_only_the_exact_signature() {
        let s = sign(b"k", "0001-abc", 100, "demo");
        assert_eq!(s.len(), SIG_HEX_LEN);
        assert!(verify(b"k", "0001-abc", 100, "demo", &s));
        assert!(!verify(b"k2", "0001-abc", 100, "demo", &s));
        assert!(!verify(b"k", "0001-abd", 100, "demo", &s));
        assert!(!verify(b"k", "0001-abc", 101, "demo", &s));
        assert!(!verify(b"k", "0001-abc", 100, "demo2", &s));
        assert!(!verify(b"k", "0001-abc", 100, "demo", &s[..62]));
        assert!(!verify(b"k", "0001-abc", 100, "demo", &"zz".repeat(32)));
        assert!(!verify(b"k", "0001-abc", 100, "demo", ""));
        // Upper-case hex is the same bytes.
        assert!(verify(
            b"k",
            "0001-abc",
            100,
            "demo",
            &s.to_ascii_uppercase()
        ));
    }

    #[test]
    fn the_keyed_verifier_agrees_with_verify() {
        let v = Verifier::new(b"k");
        for (id, exp, app) in [
            ("0001-abc", 100, "demo"),
            ("x", 0, "a"),
            ("y", u64::MAX, ""),
        ] {
            let s = sign(b"k", id, exp, app);
            assert!(v.verify(id, exp, app, &s));
            assert!(v.verify(id, exp, app, &s.to_ascii_uppercase()));
            assert!(!Verifier::new(b"k2").verify(id, exp, app, &s));
            assert!(!v.verify(id, exp.wrapping_add(1), app, &s));
            assert!(!v.verify(id, exp, "other", &s));
            assert!(!v.verify("z", exp, app, &s));
            assert!(!v.verify(id, exp, app, &s[..62]));
            assert!(!v.verify(id, exp, app, &"zz".repeat(32)));
            assert!(!v.verify(id, exp, app, ""));
        }
    }

    #[test]
    fn urls_encode_the_app() {
        let u = signed_url("http://h:1/", b"k", "id", 5, "a b&c");
        assert!(u.starts_with("http://h:1/files/id?app=a%20b%26c&exp=5&sig="));
        assert_eq!(percent_encode("aZ09-._~/é"), "aZ09-._~%2F%C3%A9");
    }
}
