//! Who may do what on a binary-protocol connection: the LINK proof, the HELLO token, and the one
//! [`authorize`] step that every command passes before it runs.

use crate::config::{Config, Role};
use crate::store::{OpError, Who};
use ferry_common::auth::LinkVerifier;
use ferry_common::clock::now_secs;
use ferry_common::proto::{ErrorCode, Hello, cmd};
use ferry_common::token::{AuthError, Scope, Verifier};
use log::warn;
use std::net::SocketAddr;

/// The process-wide checkers, built once from the config.
pub struct Access {
    /// Session tokens (storage role only).
    tokens: Option<Verifier>,
    /// Link proofs (`[link.accept]`); `None`: peers need none.
    links: Option<LinkVerifier>,
}

/// What one connection has proved so far.
#[derive(Debug, Default, Clone)]
pub struct Session {
    /// The key id of the peer's LINK proof.
    pub link: Option<String>,
    /// The identity and scope of the session's token, once HELLO passed.
    pub who: Option<(Who, Scope)>,
}

/// What a command needs before it may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Nothing: PROBE (it only says who answers) and LINK (it is the proof).
    Nothing,
    /// The connection's LINK proof, when this process requires one: HELLO.
    Link,
    /// The control plane (the tracker and id commands): a cluster member's connection, which
    /// is linked with the member's own key when this process requires links, and never a
    /// user's session. After a HELLO the connection is a relayed user's, whatever proof the
    /// hop before it gave, so it may send file commands only.
    Member,
    /// A session whose token allows this scope.
    Session(Scope),
}

/// The need of every request command; `None` for anything that is not a request (the decoder
/// refuses those before they get here).
pub fn need(c: u8) -> Option<Need> {
    Some(match c {
        // LINK is itself the proof: the connection handler checks it.
        cmd::PROBE | cmd::LINK => Need::Nothing,
        cmd::HELLO => Need::Link,
        cmd::TRACKER_JOIN
        | cmd::TRACKER_BEAT
        | cmd::TRACKER_SADDRS
        | cmd::TRACKER_GROUPS
        | cmd::ID_GET => Need::Member,
        cmd::STAT | cmd::DOWNLOAD | cmd::DOWNLOAD_OVER => Need::Session(Scope::READ),
        cmd::UPLOAD
        | cmd::UPLOAD_INIT
        | cmd::UPLOAD_QUERY
        | cmd::UPLOAD_BLOCK
        | cmd::UPLOAD_OVER
        | cmd::UPLOAD_PROVE => Need::Session(Scope::WRITE),
        cmd::DELETE => Need::Session(Scope::DELETE),
        _ => return None,
    })
}

fn auth_error(text: impl Into<String>) -> OpError {
    OpError::new(ErrorCode::Auth, text)
}

impl Access {
    pub fn new(cfg: &Config) -> Access {
        Access {
            tokens: cfg.has_role(Role::Storage).then(|| cfg.auth.verifier()),
            links: cfg.link.verifier(),
        }
    }

    /// Whether connections must open with a LINK proof.
    pub fn link_required(&self) -> bool {
        self.links.is_some()
    }

    /// The one check every command passes: PROBE needs nothing; with `[link.accept]` everything
    /// else needs the connection's LINK proof; file commands need a session whose token allows
    /// them; cluster commands are refused on a session (a HELLO was sent). Errors are code 6 (Auth), or 5 (HelloRequired) for a file command before HELLO.
    pub fn authorize(&self, c: u8, s: &Session) -> Result<(), OpError> {
        let linked = s.link.is_some() || !self.link_required();
        match need(c) {
            None => Err(OpError::new(
                ErrorCode::UnknownCommand,
                format!("command {c} is not a request"),
            )),
            Some(Need::Nothing) => Ok(()),
            Some(_) if !linked => Err(auth_error(format!(
                "{} refused: this server takes connections from its proxies only (link proof \
                 required)",
                cmd::name(c)
            ))),
            Some(Need::Link) => Ok(()),
            Some(Need::Member) if s.who.is_some() => Err(auth_error(format!(
                "{} refused: a user's session may send file commands only (the cluster's \
                 commands are for its members' own connections)",
                cmd::name(c)
            ))),
            Some(Need::Member) => Ok(()),
            Some(Need::Session(scope)) => match &s.who {
                None => Err(OpError::new(
                    ErrorCode::HelloRequired,
                    format!("{} before HELLO", cmd::name(c)),
                )),
                Some((_, have)) if !have.contains(scope) => Err(auth_error(format!(
                    "{} refused: the session's token does not allow it",
                    cmd::name(c)
                ))),
                Some(_) => Ok(()),
            },
        }
    }

    /// Checks a LINK frame's proof; the peer's key id on success.
    pub fn link(&self, peer: SocketAddr, body: &[u8]) -> Result<Option<String>, OpError> {
        let Some(v) = &self.links else {
            // Nothing to check against: this server takes any peer, so a proof changes nothing.
            return Ok(None);
        };
        v.verify(body)
            .map(Some)
            .map_err(|e| refused(peer, "LINK", &e))
    }

    /// Checks a HELLO's token; the session's identity and scope come from it alone.
    pub fn hello(&self, peer: SocketAddr, hello: &Hello) -> Result<(Who, Scope), OpError> {
        let Some(v) = &self.tokens else {
            return Err(OpError::new(
                ErrorCode::UnknownCommand,
                "HELLO is not served here (no storage role)",
            ));
        };
        let c = v
            .verify(&hello.credential, now_secs())
            .map_err(|e| refused(peer, "HELLO", &e))?;
        // The body's fields are the client's claim; a mismatch is a client bug worth naming.
        if (!hello.app.is_empty() && hello.app != c.app)
            || (!hello.user.is_empty() && hello.user != c.user)
        {
            warn!(
                "{peer}: HELLO names {}/{} but its token is for {}/{}",
                hello.app, hello.user, c.app, c.user
            );
            return Err(auth_error(
                "HELLO's app and user differ from its token's; the token decides",
            ));
        }
        Ok((
            Who {
                app: c.app,
                user: c.user,
            },
            c.scope,
        ))
    }
}

/// The peer learns only that its credential is not valid; the reason goes to the log.
fn refused(peer: SocketAddr, what: &str, e: &AuthError) -> OpError {
    warn!("{peer}: {what} refused: {e}");
    auth_error(format!("{what} refused: credential missing or not valid"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_common::auth::{SigningKey, new_secret};
    use ferry_common::proto::request_spec;
    use std::collections::BTreeMap;

    fn access(link: bool) -> (Access, SigningKey, SigningKey) {
        let app_key = SigningKey {
            id: "k1".into(),
            secret: new_secret(),
        };
        let link_key = SigningKey {
            id: "sp".into(),
            secret: new_secret(),
        };
        let mut cfg = Config::default();
        cfg.auth.keys.insert(
            "demo".into(),
            BTreeMap::from([(app_key.id.clone(), app_key.secret.clone())]),
        );
        if link {
            cfg.link
                .accept
                .insert(link_key.id.clone(), link_key.secret.clone());
        }
        cfg.check().unwrap();
        (Access::new(&cfg), app_key, link_key)
    }

    const PEER: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9);

    #[test]
    fn every_request_command_has_a_need_and_only_requests_do() {
        for c in 0..=255u8 {
            assert_eq!(
                need(c).is_some(),
                request_spec(c).is_some(),
                "command {c} ({})",
                cmd::name(c)
            );
        }
    }

    #[test]
    fn authorize_walks_every_command_through_every_session_state() {
        let (a, key, link) = access(true);
        let hello = Hello::new(
            "demo",
            "alice",
            &key.mint("demo", "alice", Scope::READ, 60).unwrap(),
        );
        let linked = Session {
            link: a
                .link(PEER, &link.link_frame()[ferry_common::proto::HEADER_LEN..])
                .unwrap(),
            who: None,
        };
        assert_eq!(linked.link.as_deref(), Some("sp"));
        let reader = Session {
            who: Some(a.hello(PEER, &hello).unwrap()),
            ..linked.clone()
        };
        let unlinked_reader = Session {
            link: None,
            ..reader.clone()
        };
        for c in (0..=255u8).filter(|&c| need(c).is_some()) {
            let code = |s: &Session| a.authorize(c, s).err().map(|e| e.code);
            match need(c).unwrap() {
                Need::Nothing => {
                    assert_eq!(code(&Session::default()), None);
                }
                Need::Link => {
                    assert_eq!(code(&Session::default()), Some(ErrorCode::Auth));
                    assert_eq!(code(&linked), None);
                }
                Need::Member => {
                    assert_eq!(code(&Session::default()), Some(ErrorCode::Auth));
                    assert_eq!(code(&linked), None);
                    // A linked hop carrying a user's session: the user's standing, not the hop's.
                    assert_eq!(code(&reader), Some(ErrorCode::Auth), "{}", cmd::name(c));
                }
                Need::Session(scope) => {
                    assert_eq!(code(&Session::default()), Some(ErrorCode::Auth));
                    assert_eq!(code(&unlinked_reader), Some(ErrorCode::Auth));
                    assert_eq!(code(&linked), Some(ErrorCode::HelloRequired));
                    let want = (scope != Scope::READ).then_some(ErrorCode::Auth);
                    assert_eq!(code(&reader), want, "{}", cmd::name(c));
                }
            }
        }
    }

    #[test]
    fn tokens_decide_identity_and_bad_ones_are_all_the_same_error() {
        let (a, key, _) = access(false);
        let t = key.mint("demo", "alice", Scope::ALL, 60).unwrap();
        // Body fields empty: the token alone names the session.
        let (who, scope) = a.hello(PEER, &Hello::new("", "", &t)).unwrap();
        assert_eq!((who.app.as_str(), who.user.as_str()), ("demo", "alice"));
        assert_eq!(scope, Scope::ALL);
        // Replayed, missing, tampered, foreign-key and mismatched tokens.
        let mut tampered = key.mint("demo", "alice", Scope::ALL, 60).unwrap();
        let n = tampered.len();
        tampered[n - 40] ^= 1;
        let foreign = SigningKey {
            id: "k1".into(),
            secret: new_secret(),
        }
        .mint("demo", "alice", Scope::ALL, 60)
        .unwrap();
        let fresh = key.mint("demo", "alice", Scope::ALL, 60).unwrap();
        for (what, h) in [
            ("replayed", Hello::new("demo", "alice", &t)),
            ("missing", Hello::new("demo", "alice", b"")),
            ("tampered", Hello::new("demo", "alice", &tampered)),
            ("foreign key", Hello::new("demo", "alice", &foreign)),
            ("body says bob", Hello::new("demo", "bob", &fresh)),
        ] {
            let e = a.hello(PEER, &h).unwrap_err();
            assert_eq!(e.code, ErrorCode::Auth, "{what}");
        }
        // Without [link.accept] a LINK frame is accepted as nothing.
        assert_eq!(a.link(PEER, b"junk").unwrap(), None);
        assert!(!a.link_required());
    }
}
