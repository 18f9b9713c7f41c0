//! Session tokens: the credential a HELLO carries (the security issue).
//!
//! A token says "key `kid` of app `app` lets user `user` do `scope` from `not_before` until
//! `expires`", with a random `nonce`. It is an HMAC-SHA256, keyed with the app's key `kid`, over
//! every other field, so keys can rotate (several key ids per app are accepted at once) and
//! nothing in a token can be changed without the key.
//!
//! Two kinds. A **connection token** (version 1) is minted by a holder of the app key for one
//! connection: its nonce makes it single-use. A **delegated token** (version 2) is minted by an
//! app's backend for one user's device, which holds no key: it serves every connection of that
//! user until it expires (its nonce only names it in logs), within its limits: the largest file
//! it may upload, and the one file it may name (a read share).
//!
//! Wire layout (inside HELLO's credential field, all integers big-endian):
//!
//! ```text
//! 0        1   token version (1: connection, 2: delegated)
//! 1        1   key id length k (1 ..= 32)
//! 2        k   key id (printable ASCII)
//! 2+k      1   app id length a (1 ..= 16)
//! 3+k      a   app id (UTF-8)
//! 3+k+a    2   user id length u (1 ..= 256)
//! 5+k+a    u   user id (UTF-8)
//! 5+k+a+u  1   scope (bit 0 read, bit 1 write, bit 2 delete, bit 3 admin)
//!          8   not before (Unix seconds)
//!          8   expires (Unix seconds)
//!          16  nonce
//!          8   version 2 only: largest upload in bytes (0: no limit)
//!          1   version 2 only: file id length f (0: any file)
//!          f   version 2 only: the one file id the token may name
//!          32  HMAC-SHA256 of every byte before it
//! ```
//!
//! [`Verifier::verify`] checks, in this order: the layout, that the key id is known for the app,
//! the MAC (constant time), the validity window against the clock with a bounded skew, that the
//! lifetime is not longer than allowed, and (connection tokens) that the nonce was not seen
//! before within the token's lifetime. Every failure is the same [`AuthError`] kind to the peer ("not valid"), with
//! the reason kept for the log.

use hmac::{Hmac, KeyInit, Mac};
use parking_lot::Mutex;
use sha2::Sha256;
use std::collections::{BTreeMap, HashMap};

type HmacSha256 = Hmac<Sha256>;

pub const TOKEN_VERSION: u8 = 1;
/// The version byte of a delegated token.
pub const DELEGATED_VERSION: u8 = 2;
pub const KEY_ID_MAX: usize = 32;
pub const NONCE_LEN: usize = 16;
pub const MAC_LEN: usize = 32;
/// The largest token: it must fit HELLO's credential field.
pub const TOKEN_MAX: usize = 2
    + KEY_ID_MAX
    + 1
    + crate::proto::APP_ID_LEN
    + 2
    + crate::proto::USER_ID_LEN
    + 1
    + 8
    + 8
    + NONCE_LEN
    + 8
    + 1
    + crate::proto::FILE_ID_LEN
    + MAC_LEN;
const _: () = assert!(TOKEN_MAX <= crate::proto::CREDENTIAL_MAX);

/// What a token allows. Bits, so one token can carry several.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Scope(pub u8);

impl Scope {
    pub const READ: Scope = Scope(1);
    pub const WRITE: Scope = Scope(2);
    pub const DELETE: Scope = Scope(4);
    /// Read, write and delete: everything a user does with their own files.
    pub const ALL: Scope = Scope(7);
    /// With DELETE: delete any user's file of the app (an app's moderation or clean-up; a
    /// user's own token never needs it). Only ever granted explicitly.
    pub const ADMIN: Scope = Scope(8);

    pub fn contains(self, other: Scope) -> bool {
        self.0 & other.0 == other.0
    }
}

/// The fields of a token (everything but the MAC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub key_id: String,
    pub app: String,
    pub user: String,
    pub scope: Scope,
    pub not_before: u64,
    pub expires: u64,
    pub nonce: [u8; NONCE_LEN],
    /// `Some` for a delegated token (version 2): reusable until it expires, within limits.
    pub delegation: Option<Delegation>,
}

/// The limits of a delegated token.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Delegation {
    /// The largest file it may upload, in bytes (0: no limit).
    pub max_upload: u64,
    /// The one file it may name (STAT, DOWNLOAD, DELETE); `None`: any file. It uploads nothing.
    pub file: Option<String>,
}

/// Why a token was refused. Peers only learn "not valid" (error 6); the reason goes to the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no token")]
    Missing,
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("unknown key id {key_id:?} for app {app:?}")]
    UnknownKey { app: String, key_id: String },
    #[error("bad signature")]
    BadMac,
    #[error("token not valid yet (not before {0})")]
    NotYet(u64),
    #[error("token expired at {0}")]
    Expired(u64),
    #[error("token lifetime of {0} s is over the limit")]
    TooLong(u64),
    #[error("token already used (nonce replayed)")]
    Replayed,
    #[error("too many live tokens to remember their nonces")]
    ReplayCacheFull,
}

impl Claims {
    fn body(&self) -> Result<Vec<u8>, AuthError> {
        let (k, a, u) = (
            self.key_id.as_bytes(),
            self.app.as_bytes(),
            self.user.as_bytes(),
        );
        if k.is_empty() || k.len() > KEY_ID_MAX || !k.iter().all(|b| b.is_ascii_graphic()) {
            return Err(AuthError::Malformed("key id"));
        }
        if a.is_empty() || a.len() > crate::proto::APP_ID_LEN {
            return Err(AuthError::Malformed("app id"));
        }
        if u.is_empty() || u.len() > crate::proto::USER_ID_LEN {
            return Err(AuthError::Malformed("user id"));
        }
        let mut b = Vec::with_capacity(TOKEN_MAX);
        b.push(match self.delegation {
            Some(_) => DELEGATED_VERSION,
            None => TOKEN_VERSION,
        });
        b.push(k.len() as u8);
        b.extend_from_slice(k);
        b.push(a.len() as u8);
        b.extend_from_slice(a);
        b.extend_from_slice(&(u.len() as u16).to_be_bytes());
        b.extend_from_slice(u);
        b.push(self.scope.0);
        b.extend_from_slice(&self.not_before.to_be_bytes());
        b.extend_from_slice(&self.expires.to_be_bytes());
        b.extend_from_slice(&self.nonce);
        if let Some(d) = &self.delegation {
            b.extend_from_slice(&d.max_upload.to_be_bytes());
            let f = d.file.as_deref().unwrap_or("").as_bytes();
            if f.len() > crate::proto::FILE_ID_LEN || !f.iter().all(|b| b.is_ascii_graphic()) {
                return Err(AuthError::Malformed("file id"));
            }
            b.push(f.len() as u8);
            b.extend_from_slice(f);
        }
        Ok(b)
    }

    /// The token bytes, signed with `key` (the secret of `self.key_id`).
    pub fn mint(&self, key: &[u8]) -> Result<Vec<u8>, AuthError> {
        let mut b = self.body()?;
        let tag = mac(key, &b).finalize().into_bytes();
        b.extend_from_slice(&tag);
        Ok(b)
    }

    /// Splits token bytes into claims and MAC, checking only the layout.
    pub fn parse(raw: &[u8]) -> Result<(Claims, &[u8], [u8; MAC_LEN]), AuthError> {
        if raw.is_empty() {
            return Err(AuthError::Missing);
        }
        if raw.len() > TOKEN_MAX {
            return Err(AuthError::Malformed("longer than any token"));
        }
        let mut r = Reader { b: raw, at: 0 };
        let delegated = match r.take(1)?[0] {
            TOKEN_VERSION => false,
            DELEGATED_VERSION => true,
            _ => return Err(AuthError::Malformed("unknown token version")),
        };
        let k = usize::from(r.take(1)?[0]);
        let key_id = r.text(k, KEY_ID_MAX, "key id")?;
        if !key_id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(AuthError::Malformed("key id"));
        }
        let a = usize::from(r.take(1)?[0]);
        let app = r.text(a, crate::proto::APP_ID_LEN, "app id")?;
        let u = usize::from(u16::from_be_bytes(r.array()?));
        let user = r.text(u, crate::proto::USER_ID_LEN, "user id")?;
        let scope = Scope(r.take(1)?[0]);
        // At least one of read, write, delete; admin only alongside them.
        if scope.0 & !(Scope::ALL.0 | Scope::ADMIN.0) != 0 || scope.0 & Scope::ALL.0 == 0 {
            return Err(AuthError::Malformed("scope"));
        }
        let not_before = u64::from_be_bytes(r.array()?);
        let expires = u64::from_be_bytes(r.array()?);
        let nonce: [u8; NONCE_LEN] = r.array()?;
        let delegation = if delegated {
            let max_upload = u64::from_be_bytes(r.array()?);
            let f = usize::from(r.take(1)?[0]);
            let file = if f == 0 {
                None
            } else {
                let id = r.text(f, crate::proto::FILE_ID_LEN, "file id")?;
                if !id.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(AuthError::Malformed("file id"));
                }
                Some(id)
            };
            Some(Delegation { max_upload, file })
        } else {
            None
        };
        let signed = &raw[..r.at];
        let tag: [u8; MAC_LEN] = r.array()?;
        if r.at != raw.len() {
            return Err(AuthError::Malformed("bytes after the MAC"));
        }
        let claims = Claims {
            key_id,
            app,
            user,
            scope,
            not_before,
            expires,
            nonce,
            delegation,
        };
        Ok((claims, signed, tag))
    }
}

fn mac(key: &[u8], body: &[u8]) -> HmacSha256 {
    let mut m = <HmacSha256 as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    m.update(body);
    m
}

/// A bounds-checked cursor over token bytes.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], AuthError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or(AuthError::Malformed("truncated"))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], AuthError> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn text(&mut self, n: usize, max: usize, what: &'static str) -> Result<String, AuthError> {
        if n == 0 || n > max {
            return Err(AuthError::Malformed(what));
        }
        let s = std::str::from_utf8(self.take(n)?).map_err(|_| AuthError::Malformed(what))?;
        if s.chars().any(char::is_control) {
            return Err(AuthError::Malformed(what));
        }
        Ok(s.to_owned())
    }
}

/// Token checking policy and keys: app -> key id -> secret.
#[derive(Debug, Clone)]
pub struct Policy {
    pub keys: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    /// How far a peer's clock may be off, both ways (seconds).
    pub skew_secs: u64,
    /// Longest lifetime (expires - not_before) a token may have (seconds).
    pub max_lifetime_secs: u64,
    /// Most nonces remembered at once; beyond it new tokens are refused until old ones expire
    /// (refusing is safe, forgetting a live nonce would allow a replay).
    pub max_live_tokens: usize,
    /// Delegated (reusable) tokens pass; off for LINK proofs, which are single-use only.
    pub delegated: bool,
}

/// Verifies tokens and remembers their nonces until they expire.
pub struct Verifier {
    policy: Policy,
    /// nonce -> the Unix second after which the token can no longer be used anyway.
    seen: Mutex<HashMap<[u8; NONCE_LEN], u64>>,
}

impl Verifier {
    pub fn new(policy: Policy) -> Verifier {
        Verifier {
            policy,
            seen: Mutex::new(HashMap::new()),
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Checks `raw` at time `now` (Unix seconds) and records its nonce. The claims of a token
    /// that passes are the session's identity.
    pub fn verify(&self, raw: &[u8], now: u64) -> Result<Claims, AuthError> {
        let (c, signed, tag) = Claims::parse(raw)?;
        let key = self
            .policy
            .keys
            .get(&c.app)
            .and_then(|k| k.get(&c.key_id))
            .ok_or_else(|| AuthError::UnknownKey {
                app: c.app.clone(),
                key_id: c.key_id.clone(),
            })?;
        // verify_slice compares in constant time.
        mac(key, signed)
            .verify_slice(&tag)
            .map_err(|_| AuthError::BadMac)?;
        let skew = self.policy.skew_secs;
        if c.not_before > now.saturating_add(skew) {
            return Err(AuthError::NotYet(c.not_before));
        }
        if c.expires.saturating_add(skew) < now {
            return Err(AuthError::Expired(c.expires));
        }
        let life = c.expires.saturating_sub(c.not_before);
        if life > self.policy.max_lifetime_secs || c.expires < c.not_before {
            return Err(AuthError::TooLong(life));
        }
        if c.delegation.is_some() {
            // Reusable by design: its expiry (and its limits, checked per command) bound it.
            if !self.policy.delegated {
                return Err(AuthError::Malformed(
                    "a delegated token where only single-use ones pass",
                ));
            }
            return Ok(c);
        }
        let mut seen = self.seen.lock();
        if seen.contains_key(&c.nonce) {
            return Err(AuthError::Replayed);
        }
        if seen.len() >= self.policy.max_live_tokens {
            // Forget the nonces of tokens that can no longer pass the expiry check.
            seen.retain(|_, &mut until| until >= now);
            if seen.len() >= self.policy.max_live_tokens {
                return Err(AuthError::ReplayCacheFull);
            }
        }
        seen.insert(c.nonce, c.expires.saturating_add(skew));
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn policy() -> Policy {
        let mut keys = BTreeMap::new();
        let mut demo = BTreeMap::new();
        demo.insert("k1".to_owned(), b"key-one-0123456789abcdef".to_vec());
        demo.insert("k2".to_owned(), b"key-two-0123456789abcdef".to_vec());
        keys.insert("demo".to_owned(), demo);
        let mut other = BTreeMap::new();
        other.insert("k1".to_owned(), b"other-app-key-0123456789".to_vec());
        keys.insert("other".to_owned(), other);
        Policy {
            keys,
            skew_secs: 60,
            max_lifetime_secs: 3600,
            max_live_tokens: 4,
            delegated: true,
        }
    }

    fn claims(nonce: u8) -> Claims {
        Claims {
            key_id: "k1".into(),
            app: "demo".into(),
            user: "alice".into(),
            scope: Scope::ALL,
            not_before: NOW - 10,
            expires: NOW + 600,
            nonce: [nonce; NONCE_LEN],
            delegation: None,
        }
    }

    fn mint(c: &Claims, key: &[u8]) -> Vec<u8> {
        c.mint(key).unwrap()
    }

    #[test]
    fn a_good_token_passes_once_and_its_claims_are_the_identity() {
        let v = Verifier::new(policy());
        let c = claims(1);
        let t = mint(&c, b"key-one-0123456789abcdef");
        assert!(t.len() <= TOKEN_MAX);
        assert_eq!(v.verify(&t, NOW).unwrap(), c);
        assert_eq!(v.verify(&t, NOW), Err(AuthError::Replayed));
    }

    #[test]
    fn a_delegated_token_serves_many_connections_within_its_limits_until_it_expires() {
        let v = Verifier::new(policy());
        let key = b"key-one-0123456789abcdef";
        let longest_id = "g".repeat(crate::proto::FILE_ID_LEN);
        for limits in [
            Delegation::default(),
            Delegation {
                max_upload: 1 << 30,
                file: Some(longest_id.clone()),
            },
        ] {
            let mut c = claims(7);
            c.delegation = Some(limits.clone());
            let t = mint(&c, key);
            assert!(t.len() <= TOKEN_MAX);
            assert_eq!(t[0], DELEGATED_VERSION);
            // Reusable: no replay refusal, and nothing cached for it.
            for _ in 0..10 {
                assert_eq!(v.verify(&t, NOW).unwrap().delegation, Some(limits.clone()));
            }
            assert!(matches!(
                v.verify(&t, NOW + 600 + 61),
                Err(AuthError::Expired(_))
            ));
            // Every flipped byte is refused.
            for i in 0..t.len() {
                let mut bad = t.clone();
                bad[i] ^= 1;
                assert!(v.verify(&bad, NOW).is_err(), "byte {i}");
            }
            // Where only single-use proofs pass (LINK), it does not.
            let links = Verifier::new(Policy {
                delegated: false,
                ..policy()
            });
            assert!(matches!(
                links.verify(&t, NOW),
                Err(AuthError::Malformed(_))
            ));
        }
        assert_eq!(v.seen.lock().len(), 0);
        // A file id that is not one cannot be minted.
        let mut c = claims(8);
        c.delegation = Some(Delegation {
            max_upload: 0,
            file: Some(format!("{longest_id}x")),
        });
        assert!(c.mint(key).is_err());
        c.delegation = Some(Delegation {
            max_upload: 0,
            file: Some("a b".into()),
        });
        assert!(c.mint(key).is_err());
    }

    #[test]
    fn rotated_keys_both_verify() {
        let v = Verifier::new(policy());
        let mut c = claims(2);
        c.key_id = "k2".into();
        assert!(
            v.verify(&mint(&c, b"key-two-0123456789abcdef"), NOW)
                .is_ok()
        );
    }

    #[test]
    fn wrong_key_other_tenant_and_unknown_key_are_refused() {
        let v = Verifier::new(policy());
        // Signed with another app's key but claiming app demo.
        let t = mint(&claims(3), b"other-app-key-0123456789");
        assert_eq!(v.verify(&t, NOW), Err(AuthError::BadMac));
        let mut c = claims(4);
        c.key_id = "k9".into();
        assert!(matches!(
            v.verify(&mint(&c, b"key-one-0123456789abcdef"), NOW),
            Err(AuthError::UnknownKey { .. })
        ));
        c.app = "nobody".into();
        c.key_id = "k1".into();
        assert!(matches!(
            v.verify(&mint(&c, b"key-one-0123456789abcdef"), NOW),
            Err(AuthError::UnknownKey { .. })
        ));
    }

    #[test]
    fn every_tampered_byte_is_refused() {
        let t = mint(&claims(5), b"key-one-0123456789abcdef");
        for i in 0..t.len() {
            for flip in [1u8, 0x80] {
                let v = Verifier::new(policy());
                let mut bad = t.clone();
                bad[i] ^= flip;
                assert!(
                    v.verify(&bad, NOW).is_err(),
                    "byte {i} ^ {flip:#x} accepted"
                );
            }
        }
        let v = Verifier::new(policy());
        for n in 0..t.len() {
            assert!(v.verify(&t[..n], NOW).is_err(), "truncated to {n} accepted");
        }
        let mut long = t.clone();
        long.push(0);
        assert!(v.verify(&long, NOW).is_err());
    }

    #[test]
    fn time_window_skew_and_lifetime_are_enforced() {
        let key = b"key-one-0123456789abcdef";
        let v = Verifier::new(policy());
        let mut c = claims(6);
        c.not_before = NOW - 100;
        c.expires = NOW - 61;
        assert_eq!(
            v.verify(&mint(&c, key), NOW),
            Err(AuthError::Expired(NOW - 61))
        );
        c.nonce = [7; NONCE_LEN];
        c.expires = NOW - 59; // within the skew
        assert!(v.verify(&mint(&c, key), NOW).is_ok());
        let mut c = claims(8);
        c.not_before = NOW + 61;
        c.expires = NOW + 100;
        assert_eq!(
            v.verify(&mint(&c, key), NOW),
            Err(AuthError::NotYet(NOW + 61))
        );
        let mut c = claims(9);
        c.expires = c.not_before + 3601;
        assert!(matches!(
            v.verify(&mint(&c, key), NOW),
            Err(AuthError::TooLong(_))
        ));
        let mut c = claims(10);
        c.not_before = NOW + 30;
        c.expires = NOW; // ends before it starts
        assert!(v.verify(&mint(&c, key), NOW).is_err());
    }

    #[test]
    fn the_replay_cache_is_bounded_and_forgets_only_expired_nonces() {
        let key = b"key-one-0123456789abcdef";
        let v = Verifier::new(policy()); // max 4 live tokens
        for n in 20..24 {
            let mut c = claims(n);
            c.expires = NOW + 5 + u64::from(n - 20);
            assert!(v.verify(&mint(&c, key), NOW).is_ok());
        }
        assert_eq!(
            v.verify(&mint(&claims(30), key), NOW),
            Err(AuthError::ReplayCacheFull)
        );
        // Later, the first tokens (expired + skew) are forgotten and room is made.
        let later = NOW + 5 + 60 + 2;
        let mut c = claims(31);
        c.not_before = later;
        c.expires = later + 100;
        assert!(v.verify(&mint(&c, key), later).is_ok());
    }

    #[test]
    fn minting_refuses_fields_that_cannot_be_encoded() {
        let key = b"k";
        let mut c = claims(1);
        c.key_id = "k".repeat(KEY_ID_MAX + 1);
        assert!(c.mint(key).is_err());
        let mut c = claims(1);
        c.app = "a".repeat(17);
        assert!(c.mint(key).is_err());
        let mut c = claims(1);
        c.user = String::new();
        assert!(c.mint(key).is_err());
        assert_eq!(Claims::parse(&[]).unwrap_err(), AuthError::Missing);
    }

    #[test]
    fn scopes_are_bits_and_admin_comes_only_with_another() {
        let key = b"key-one-0123456789abcdef";
        for (bits, ok) in [
            (Scope::READ.0, true),
            (Scope::DELETE.0 | Scope::ADMIN.0, true),
            (Scope::ALL.0 | Scope::ADMIN.0, true),
            (0, false),
            (Scope::ADMIN.0, false),
            (16, false),
            (Scope::ALL.0 | 32, false),
        ] {
            let mut c = claims(1);
            c.scope = Scope(bits);
            let t = mint(&c, key);
            assert_eq!(Claims::parse(&t).is_ok(), ok, "scope bits {bits:#b}");
        }
        assert!(Scope(Scope::DELETE.0 | Scope::ADMIN.0).contains(Scope::ADMIN));
        assert!(!Scope::ALL.contains(Scope::ADMIN));
    }
}
