//! Who may do what on a binary-protocol connection: the LINK proof and what its key is to this
//! server (`[link.members]`), the HELLO token, and the one [`authorize`] step that every command
//! passes before it runs.

use crate::config::{Config, Role};
use crate::storage::{OpError, Who};
use crate::tenants::{Slot, Tenants};
use ferry_common::auth::{LinkConfig, LinkVerifier, PeerKind};
use ferry_common::clock::now_secs;
use ferry_common::proto::{
    Command, ConnCmd, ErrorCode, FileCmd, Hello, NodeHello, TrackerCmd, cmd,
};
use ferry_common::token::{AuthError, Delegation, Scope, Verifier};
use log::warn;
use std::net::SocketAddr;
use std::sync::Arc;

/// The process-wide checkers, built once from the config.
pub struct Access {
    /// Session tokens (storage role only).
    tokens: Option<Verifier>,
    /// Link proofs (`[link.accept]`); `None`: peers need none.
    links: Option<LinkVerifier>,
    /// `[link]`, for what each accepted key is (`[link.members]`).
    link: LinkConfig,
    /// Connections per app and user.
    tenants: Arc<Tenants>,
}

/// What one connection has proved so far.
#[derive(Debug, Default, Clone)]
pub struct Session {
    /// The key id of the peer's LINK proof.
    pub link: Option<String>,
    /// The identity of the session's token and what it grants, once HELLO passed.
    pub who: Option<(Who, Grant)>,
}

/// What a session's token grants: its scope and, for a delegated token, its limits (a
/// connection token minted with the app key has none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub scope: Scope,
    pub limits: Delegation,
    /// A delegated token's session ends with the token (plus the allowed clock skew): the
    /// Unix second after which its commands are refused. A connection token's session lives
    /// as long as the connection (its token was checked once, at HELLO).
    pub until: Option<u64>,
}

impl Grant {
    /// Whether the session may still send commands at `now` (else error 6, which closes it).
    pub fn live(&self, now: u64) -> Result<(), OpError> {
        match self.until {
            Some(t) if now > t => Err(auth_error(
                "the session's delegated token has expired; reconnect with a fresh one",
            )),
            _ => Ok(()),
        }
    }

    /// A command naming file `id`: refused (error 25) when the token is for another file.
    pub fn may_name(&self, id: &str) -> Result<(), OpError> {
        match &self.limits.file {
            Some(only) if only != id => Err(OpError::new(
                ErrorCode::Forbidden,
                format!("this session's token is for file {only} only, not {id}"),
            )),
            _ => Ok(()),
        }
    }

    /// An upload of `size` bytes: refused (error 25) past the token's upload limit.
    pub fn may_upload(&self, size: u64) -> Result<(), OpError> {
        match self.limits.max_upload {
            max if max > 0 && size > max => Err(OpError::new(
                ErrorCode::Forbidden,
                format!(
                    "this session's token allows uploads of at most {max} bytes; this file has \
                     {size}"
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// What a command needs before it may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Nothing: PROBE (it only says who answers) and LINK (it is the proof).
    Nothing,
    /// HELLO opens a user's session, which only a relaying peer does: where this process
    /// requires links, one whose key is a relay or a router.
    Relay,
    /// A cluster command: a member's own connection, never a user's session (after a HELLO the
    /// connection is a relayed user's, whatever proof the hop before it gave, so it may send
    /// file commands only), linked with a key of this kind where links are required.
    Member(PeerKind),
    /// A session whose token allows this scope.
    Session(Scope),
}

/// The need of every request command; `None` for replies, which are no request (the decoder
/// refuses those before they get here). This is the authorization table of docs/PROTOCOL.md.
pub fn need(c: Command) -> Option<Need> {
    Some(match c {
        // LINK is itself the proof: the connection handler checks it.
        Command::Conn(ConnCmd::Probe | ConnCmd::Link) => Need::Nothing,
        Command::Conn(ConnCmd::Hello) => Need::Relay,
        // A storage node announces itself.
        Command::Tracker(TrackerCmd::Join | TrackerCmd::Beat) => Need::Member(PeerKind::Node),
        // A routing proxy asks where a user lives (which may record the user's group).
        Command::Tracker(TrackerCmd::Saddrs) => Need::Member(PeerKind::Router),
        // An operator reads the cluster's view and who is in which group.
        Command::Tracker(TrackerCmd::Groups | TrackerCmd::Users) => Need::Member(PeerKind::Admin),
        Command::File(f) => Need::Session(match f {
            FileCmd::Stat | FileCmd::Download | FileCmd::DownloadOver => Scope::READ,
            FileCmd::Upload
            | FileCmd::UploadInit
            | FileCmd::UploadQuery
            | FileCmd::UploadBlock
            | FileCmd::UploadOver
            | FileCmd::UploadProve => Scope::WRITE,
            FileCmd::Delete => Scope::DELETE,
            // Quotas bound uploads: whoever may upload may see where they stand.
            FileCmd::Usage => Scope::WRITE,
        }),
        Command::Reply(_) => return None,
    })
}

fn auth_error(text: impl Into<String>) -> OpError {
    OpError::new(ErrorCode::Auth, text)
}

/// Who the peer of a connection is taken for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing<'a> {
    /// This process requires no links: it trusts its network, every peer is anything.
    Trusted,
    /// Links are required and none was proved.
    Unlinked,
    /// Linked with this key, of this kind.
    Key(&'a str, PeerKind),
}

impl Access {
    /// `max_connections`: the server's connection limit as the reactor applies it.
    pub fn new(cfg: &Config, max_connections: usize) -> Access {
        Access {
            tokens: cfg.has_role(Role::Storage).then(|| cfg.auth.verifier()),
            links: cfg.link.verifier(),
            link: cfg.link.clone(),
            tenants: Tenants::new(cfg, max_connections),
        }
    }

    /// A slot for a session of `who` that passed HELLO, within its app's and user's share of
    /// the connections ([`Tenants::admit`]).
    pub fn admit(&self, who: &Who) -> Result<Slot, OpError> {
        self.tenants.admit(who)
    }

    /// Whether connections must open with a LINK proof.
    pub fn link_required(&self) -> bool {
        self.links.is_some()
    }

    fn standing<'a>(&self, s: &'a Session) -> Standing<'a> {
        match &s.link {
            _ if !self.link_required() => Standing::Trusted,
            None => Standing::Unlinked,
            Some(id) => Standing::Key(id, self.link.kind_of(id)),
        }
    }

    /// The one check every command passes, by [`need`]: PROBE needs nothing; with
    /// `[link.accept]` everything else needs the connection's LINK proof, HELLO from a relaying
    /// key and each cluster command from its member kind's key; file commands need a session
    /// whose token allows them; cluster commands are refused on a session (a HELLO was sent).
    /// Errors are code 6 (Auth), or 5 (HelloRequired) for a file command before HELLO.
    pub fn authorize(&self, c: u8, s: &Session) -> Result<(), OpError> {
        let standing = self.standing(s);
        let wrong_kind = |id: &str, have: PeerKind, want: &str| {
            auth_error(format!(
                "{} refused: it is for {want}; this connection's key {id} is a {}",
                cmd::name(c),
                have.name()
            ))
        };
        match Command::from_u8(c).and_then(need) {
            None => Err(OpError::new(
                ErrorCode::UnknownCommand,
                format!("command {c} is not a request"),
            )),
            Some(Need::Nothing) => Ok(()),
            Some(_) if standing == Standing::Unlinked => Err(auth_error(format!(
                "{} refused: this server takes connections from its proxies only (link proof \
                 required)",
                cmd::name(c)
            ))),
            Some(Need::Relay) => match standing {
                Standing::Key(id, k @ (PeerKind::Node | PeerKind::Admin)) => {
                    Err(wrong_kind(id, k, "a relay's or a router's key"))
                }
                _ => Ok(()),
            },
            Some(Need::Member(_)) if s.who.is_some() => Err(auth_error(format!(
                "{} refused: a user's session may send file commands only (the cluster's \
                 commands are for its members' own connections)",
                cmd::name(c)
            ))),
            Some(Need::Member(want)) => match standing {
                Standing::Key(id, have) if have != want => {
                    Err(wrong_kind(id, have, &format!("a {}'s key", want.name())))
                }
                _ => Ok(()),
            },
            Some(Need::Session(scope)) => match &s.who {
                None => Err(OpError::new(
                    ErrorCode::HelloRequired,
                    format!("{} before HELLO", cmd::name(c)),
                )),
                Some((_, have)) if !have.scope.contains(scope) => Err(auth_error(format!(
                    "{} refused: the session's token does not allow it",
                    cmd::name(c)
                ))),
                Some(_) => Ok(()),
            },
        }
    }

    /// A node's JOIN or BEAT names its group and address: where links are required, they must
    /// be the ones `[link.members]` binds the connection's key to, so no member (let alone a
    /// tenant) can register a machine or a group that is not its own.
    pub fn node_claim(&self, c: u8, s: &Session, n: &NodeHello) -> Result<(), OpError> {
        let Standing::Key(id, _) = self.standing(s) else {
            return Ok(());
        };
        let (group, host, port) = (n.group.as_str(), n.host.as_str(), n.port);
        if self
            .link
            .members
            .get(id)
            .is_some_and(|m| m.binds(group, host, port))
        {
            return Ok(());
        }
        Err(auth_error(format!(
            "{} refused: key {id} is not bound to group {group} at {host}:{port} \
             ([link.members.{id}] of this tracker)",
            cmd::name(c)
        )))
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
    pub fn hello(&self, peer: SocketAddr, hello: &Hello) -> Result<(Who, Grant), OpError> {
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
        let until = c
            .delegation
            .is_some()
            .then(|| c.expires.saturating_add(v.policy().skew_secs));
        let limits = c.delegation.unwrap_or_default();
        // A read share names one file; it may not write (an upload names no file yet).
        if limits.file.is_some() && c.scope.contains(Scope::WRITE) {
            return Err(refused(
                peer,
                "HELLO",
                &AuthError::Malformed("a token bound to one file with the write scope"),
            ));
        }
        Ok((
            Who {
                app: c.app,
                user: c.user,
            },
            Grant {
                scope: c.scope,
                limits,
                until,
            },
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

    /// The link keys of [`access`]: a relay, a router, a node bound to g1 at 127.0.0.1:7401,
    /// an admin.
    const KEYS: [(&str, Option<PeerKind>); 4] = [
        ("cp", None),
        ("sp", Some(PeerKind::Router)),
        ("node-a", Some(PeerKind::Node)),
        ("admin", Some(PeerKind::Admin)),
    ];

    fn access(link: bool) -> (Access, SigningKey, BTreeMap<String, SigningKey>) {
        let app_key = SigningKey {
            id: "k1".into(),
            secret: new_secret(),
        };
        let mut cfg = Config::default();
        cfg.auth.keys.insert(
            "demo".into(),
            BTreeMap::from([(app_key.id.clone(), app_key.secret.clone())]),
        );
        let mut keys = BTreeMap::new();
        for (id, kind) in KEYS {
            let k = SigningKey {
                id: id.into(),
                secret: new_secret(),
            };
            if link {
                cfg.link.accept.insert(k.id.clone(), k.secret.clone());
                if let Some(kind) = kind {
                    let node = kind == PeerKind::Node;
                    let m = ferry_common::auth::Member {
                        kind,
                        group: node.then(|| "g1".into()),
                        addr: node.then(|| SocketAddr::from(([127, 0, 0, 1], 7401))),
                    };
                    cfg.link.members.insert(id.into(), m);
                }
            }
            keys.insert(id.to_owned(), k);
        }
        cfg.check().unwrap();
        (Access::new(&cfg, cfg.max_connections), app_key, keys)
    }

    fn need_u8(c: u8) -> Option<Need> {
        Command::from_u8(c).and_then(need)
    }

    const PEER: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9);

    #[test]
    fn every_request_command_has_a_need_and_only_requests_do() {
        for c in 0..=255u8 {
            assert_eq!(
                need_u8(c).is_some(),
                request_spec(c).is_some(),
                "command {c} ({})",
                cmd::name(c)
            );
        }
    }

    fn linked(a: &Access, k: &SigningKey) -> Session {
        let link = a
            .link(PEER, &k.link_frame()[ferry_common::proto::HEADER_LEN..])
            .unwrap();
        assert_eq!(link.as_deref(), Some(k.id.as_str()));
        Session { link, who: None }
    }

    #[test]
    fn authorize_walks_every_command_through_every_session_state_and_key_kind() {
        let (a, key, keys) = access(true);
        let hello = Hello::new(
            "demo",
            "alice",
            &key.mint("demo", "alice", Scope::READ, 60).unwrap(),
        );
        let reader = Session {
            who: Some(a.hello(PEER, &hello).unwrap()),
            ..linked(&a, &keys["sp"])
        };
        let unlinked_reader = Session {
            link: None,
            ..reader.clone()
        };
        for c in (0..=255u8).filter(|&c| need_u8(c).is_some()) {
            let code = |s: &Session| a.authorize(c, s).err().map(|e| e.code);
            let kind_may = |kind: PeerKind| match need_u8(c).unwrap() {
                Need::Nothing => true,
                Need::Relay => matches!(kind, PeerKind::Relay | PeerKind::Router),
                Need::Member(want) => kind == want,
                Need::Session(_) => false,
            };
            // Every key, on its own connection (no HELLO): only its kind's commands pass.
            for (id, kind) in KEYS {
                let kind = kind.unwrap_or(PeerKind::Relay);
                let s = linked(&a, &keys[id]);
                let want = match need_u8(c).unwrap() {
                    Need::Session(_) => Some(ErrorCode::HelloRequired),
                    _ if kind_may(kind) => None,
                    _ => Some(ErrorCode::Auth),
                };
                assert_eq!(code(&s), want, "{} with key {id}", cmd::name(c));
            }
            match need_u8(c).unwrap() {
                Need::Nothing => assert_eq!(code(&Session::default()), None),
                Need::Relay => assert_eq!(code(&Session::default()), Some(ErrorCode::Auth)),
                Need::Member(_) => {
                    assert_eq!(code(&Session::default()), Some(ErrorCode::Auth));
                    // A linked hop carrying a user's session: the user's standing, not the hop's.
                    assert_eq!(code(&reader), Some(ErrorCode::Auth), "{}", cmd::name(c));
                }
                Need::Session(scope) => {
                    assert_eq!(code(&Session::default()), Some(ErrorCode::Auth));
                    assert_eq!(code(&unlinked_reader), Some(ErrorCode::Auth));
                    let want = (scope != Scope::READ).then_some(ErrorCode::Auth);
                    assert_eq!(code(&reader), want, "{}", cmd::name(c));
                }
            }
        }
        // Without [link.accept] the network is trusted: any command but the file ones passes
        // before HELLO.
        let (open, _, _) = access(false);
        for c in (0..=255u8).filter(|&c| need_u8(c).is_some()) {
            let r = open.authorize(c, &Session::default()).err().map(|e| e.code);
            let want =
                matches!(need_u8(c), Some(Need::Session(_))).then_some(ErrorCode::HelloRequired);
            assert_eq!(r, want, "{}", cmd::name(c));
        }
    }

    #[test]
    fn a_node_key_joins_and_beats_only_for_its_own_group_and_address() {
        let (a, _, keys) = access(true);
        let node = |group: &str, host: &str, port: u16| NodeHello {
            group: group.into(),
            host: host.into(),
            port,
            version: ferry_common::proto::VERSION,
            started: 1,
            free: 1,
            http: None,
        };
        let s = linked(&a, &keys["node-a"]);
        for c in [cmd::TRACKER_JOIN, cmd::TRACKER_BEAT] {
            assert!(a.node_claim(c, &s, &node("g1", "127.0.0.1", 7401)).is_ok());
            for other in [
                node("g2", "127.0.0.1", 7401),
                node("g1", "127.0.0.2", 7401),
                node("g1", "127.0.0.1", 7402),
                node("g1", "localhost", 7401),
            ] {
                let e = a.node_claim(c, &s, &other).unwrap_err();
                assert_eq!(e.code, ErrorCode::Auth, "{other:?}");
            }
        }
        // A key that is no node is bound to nothing.
        let sp = linked(&a, &keys["sp"]);
        assert!(
            a.node_claim(cmd::TRACKER_JOIN, &sp, &node("g1", "127.0.0.1", 7401))
                .is_err()
        );
        // Without links a trusted network names its own nodes.
        let (open, _, _) = access(false);
        let none = Session::default();
        assert!(
            open.node_claim(cmd::TRACKER_JOIN, &none, &node("g9", "h", 1))
                .is_ok()
        );
    }

    #[test]
    fn tokens_decide_identity_and_bad_ones_are_all_the_same_error() {
        let (a, key, _) = access(false);
        let t = key.mint("demo", "alice", Scope::ALL, 60).unwrap();
        // Body fields empty: the token alone names the session.
        let (who, grant) = a.hello(PEER, &Hello::new("", "", &t)).unwrap();
        assert_eq!((who.app.as_str(), who.user.as_str()), ("demo", "alice"));
        assert_eq!(grant.scope, Scope::ALL);
        assert_eq!(grant.limits, Delegation::default());
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
        // A delegated token passes again and again, with its limits as the session's.
        let share = Delegation {
            max_upload: 0,
            file: Some("0001-ab".into()),
        };
        let d = key
            .delegate("demo", "bob", Scope::READ, 60, share.clone())
            .unwrap();
        for _ in 0..3 {
            let (who, grant) = a.hello(PEER, &Hello::new("demo", "bob", &d)).unwrap();
            assert_eq!((who.user.as_str(), &grant.limits), ("bob", &share));
            assert!(grant.may_name("0001-ab").is_ok());
            assert_eq!(
                grant.may_name("0002-cd").unwrap_err().code,
                ErrorCode::Forbidden
            );
        }
        // A read share may not write.
        let rw = key
            .delegate(
                "demo",
                "bob",
                Scope(Scope::READ.0 | Scope::WRITE.0),
                60,
                share,
            )
            .unwrap();
        assert_eq!(
            a.hello(PEER, &Hello::new("demo", "bob", &rw))
                .unwrap_err()
                .code,
            ErrorCode::Auth
        );
        let capped = Grant {
            scope: Scope::WRITE,
            limits: Delegation {
                max_upload: 100,
                file: None,
            },
            until: Some(1000),
        };
        assert!(capped.live(1000).is_ok());
        assert_eq!(capped.live(1001).unwrap_err().code, ErrorCode::Auth);
        assert!(capped.may_upload(100).is_ok());
        let e = capped.may_upload(101).unwrap_err();
        assert!(
            e.code == ErrorCode::Forbidden && e.text.contains("at most 100 bytes"),
            "{e}"
        );
        // Without [link.accept] a LINK frame is accepted as nothing.
        assert_eq!(a.link(PEER, b"junk").unwrap(), None);
        assert!(!a.link_required());
    }
}
