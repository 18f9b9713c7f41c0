//! Who may talk to a ferry process, and the config that says so.
//!
//! Two proofs, one token format ([`crate::token`]):
//! - a **session token** in every HELLO, minted by whoever holds an app key (the client, or an
//!   app's backend handing tokens to its users), checked by the server and a routing
//!   server-proxy; the session's app, user and scope come from it;
//! - a **link proof**: the first frame (command LINK) on every connection one ferry process
//!   opens to another, a short-lived token of the pseudo-app [`LINK_APP`] signed with the
//!   sender's link key, so a stray client cannot reach a server-proxy or server directly.
//!
//! Secrets live in config files (or the environment), never on a command line, and a process
//! refuses to start with an empty, short or example secret ([`check_secret`]).

use crate::clock::now_secs;
use crate::proto::{self, cmd, status};
use crate::token::{AuthError, Claims, Delegation, NONCE_LEN, Policy, Scope, Verifier};
use rand::RngExt;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;

/// The pseudo-app of link proofs (never a real app: app ids of tokens are checked against the
/// keys of `[auth]`, link proofs against those of `[link]`, by separate verifiers).
pub const LINK_APP: &str = "ferry-link";
/// How long a link proof is valid: it is used at once, on the connection it opens.
pub const LINK_LIFETIME_SECS: u64 = 60;
/// Shortest secret accepted anywhere (bytes). 32 random bytes, hex or base64 encoded, pass.
pub const SECRET_MIN: usize = 32;

/// A fresh random secret (64 hex digits) for configs made by `ferry keygen` and the demo.
pub fn new_secret() -> String {
    hex::encode(rand::rng().random::<[u8; 32]>())
}

/// Refuses secrets that protect nothing: empty, shorter than [`SECRET_MIN`], one repeated
/// character, or a placeholder copied from an example config.
pub fn check_secret(what: &str, secret: &str) -> Result<(), String> {
    let lower = secret.to_ascii_lowercase();
    let why = if secret.is_empty() {
        "is empty"
    } else if secret.len() < SECRET_MIN {
        "is shorter than 32 bytes"
    } else if secret.bytes().all(|b| b == secret.as_bytes()[0]) {
        "is one repeated character"
    } else if ["change-me", "changeme", "example", "placeholder"]
        .iter()
        .any(|p| lower.contains(p))
    {
        "is an example placeholder"
    } else {
        return Ok(());
    };
    Err(format!(
        "{what} {why}; generate one with `ferry keygen` (or `openssl rand -hex 32`)"
    ))
}

/// A key this process signs with: its id (so keys can rotate) and its secret.
#[derive(Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SigningKey {
    pub id: String,
    pub secret: String,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey {{ id: {:?}, secret: <hidden> }}", self.id)
    }
}

impl SigningKey {
    /// Parses `ID:SECRET` (how keys travel in environment variables such as `FERRY_KEY`).
    pub fn from_pair(pair: &str) -> Result<SigningKey, String> {
        match pair.split_once(':') {
            Some((id, secret)) if !id.is_empty() => Ok(SigningKey {
                id: id.to_owned(),
                secret: secret.to_owned(),
            }),
            _ => Err("a key is written KEY_ID:SECRET".to_owned()),
        }
    }

    pub fn check(&self, what: &str) -> Result<(), String> {
        if self.id.is_empty()
            || self.id.len() > crate::token::KEY_ID_MAX
            || !self.id.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(format!(
                "{what}: key id {:?} must be 1 to 32 printable ASCII characters",
                self.id
            ));
        }
        check_secret(&format!("{what} (key {})", self.id), &self.secret)
    }

    /// A token for `user` of `app` allowing `scope`, valid from now for `lifetime_secs`, with a
    /// fresh random nonce (every token is single-use).
    pub fn mint(
        &self,
        app: &str,
        user: &str,
        scope: Scope,
        lifetime_secs: u64,
    ) -> Result<Vec<u8>, AuthError> {
        self.sign(app, user, scope, lifetime_secs, None)
    }

    /// A delegated token: for `user` of `app`, allowing `scope` within `limits`, valid from now
    /// for `lifetime_secs`, usable for every connection of that user until then. An app's
    /// backend hands it to the user's device instead of the key.
    pub fn delegate(
        &self,
        app: &str,
        user: &str,
        scope: Scope,
        lifetime_secs: u64,
        limits: Delegation,
    ) -> Result<Vec<u8>, AuthError> {
        self.sign(app, user, scope, lifetime_secs, Some(limits))
    }

    /// Either kind of token, valid from now, with a fresh random nonce.
    fn sign(
        &self,
        app: &str,
        user: &str,
        scope: Scope,
        lifetime_secs: u64,
        delegation: Option<Delegation>,
    ) -> Result<Vec<u8>, AuthError> {
        let now = now_secs();
        Claims {
            key_id: self.id.clone(),
            app: app.to_owned(),
            user: user.to_owned(),
            scope,
            not_before: now,
            expires: now.saturating_add(lifetime_secs),
            nonce: rand::rng().random::<[u8; NONCE_LEN]>(),
            delegation,
        }
        .mint(self.secret.as_bytes())
    }

    /// The LINK frame that opens a connection to another ferry process.
    pub fn link_frame(&self) -> Vec<u8> {
        // The link key's id doubles as the sender's name in the receiver's log.
        match self.mint(LINK_APP, &self.id, Scope::READ, LINK_LIFETIME_SECS) {
            Ok(t) => proto::frame(cmd::LINK, status::OK, &t),
            // Only a key id over 32 bytes fails to mint, and `check` refuses those at start.
            Err(e) => unreachable!("link key {} was checked at start: {e}", self.id),
        }
    }
}

/// `[auth]`: the app keys session tokens are checked against, and how strictly.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// App -> key id -> secret. Several key ids per app are accepted at once, so keys rotate.
    pub keys: BTreeMap<String, BTreeMap<String, String>>,
    /// How far a client's clock may be off, both ways (seconds).
    pub skew_secs: u64,
    /// Longest lifetime a token may have (seconds).
    pub max_lifetime_secs: u64,
    /// Most token nonces remembered at once for replay refusal (about 50 bytes each).
    pub max_live_tokens: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            keys: BTreeMap::new(),
            skew_secs: 120,
            max_lifetime_secs: 86_400,
            max_live_tokens: 500_000,
        }
    }
}

impl AuthConfig {
    /// Refuses a config that would let nobody in, or anybody: no app, an app without keys,
    /// or any weak secret.
    pub fn check(&self, section: &str) -> Result<(), String> {
        if self.keys.is_empty() {
            return Err(format!(
                "[{section}.keys] names no app: every session's token is checked against an \
                 app key, so at least one is needed"
            ));
        }
        for (app, keys) in &self.keys {
            if app.is_empty() || app.len() > proto::APP_ID_LEN || app == LINK_APP {
                return Err(format!("[{section}.keys]: app id {app:?} is not usable"));
            }
            if keys.is_empty() {
                return Err(format!("[{section}.keys.{app}] has no key"));
            }
            for (id, secret) in keys {
                SigningKey {
                    id: id.clone(),
                    secret: secret.clone(),
                }
                .check(&format!("[{section}.keys.{app}]"))?;
            }
        }
        if self.max_lifetime_secs == 0 || self.max_live_tokens == 0 {
            return Err(format!(
                "[{section}] max_lifetime_secs and max_live_tokens must be at least 1"
            ));
        }
        Ok(())
    }

    pub fn verifier(&self) -> Verifier {
        let keys = self
            .keys
            .iter()
            .map(|(app, k)| {
                let k = k
                    .iter()
                    .map(|(id, s)| (id.clone(), s.as_bytes().to_vec()))
                    .collect();
                (app.clone(), k)
            })
            .collect();
        Verifier::new(Policy {
            keys,
            skew_secs: self.skew_secs,
            max_lifetime_secs: self.max_lifetime_secs,
            max_live_tokens: self.max_live_tokens,
            delegated: true,
        })
    }
}

/// `[link]`: the proofs between ferry processes.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct LinkConfig {
    /// The key this process proves on every connection it opens to another ferry process.
    pub send: Option<SigningKey>,
    /// Key id -> secret of the processes allowed to connect here. When any is set, every
    /// connection must open with a valid LINK (PROBE excepted): clients cannot connect directly.
    pub accept: BTreeMap<String, String>,
    /// Key id (of `accept`) -> what that peer is to this server beyond a relay of user
    /// sessions: the cluster commands its key may send ([`Member`]). Read by ferry-server.
    pub members: BTreeMap<String, Member>,
}

/// What an accepted link key is to the process it connects to. A key of `[link.accept]` with no
/// `[link.members]` entry is a [`PeerKind::Relay`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerKind {
    /// A proxy that relays user sessions: HELLO and, after it, file commands.
    Relay,
    /// A routing server-proxy: a relay that also asks the tracker where users live (SADDRS).
    Router,
    /// A storage node: JOIN and BEAT for its own group and address.
    Node,
    /// An operator's tool (`ferry groups`, `ferry cluster up`): reads the cluster view.
    Admin,
}

impl PeerKind {
    pub fn name(self) -> &'static str {
        match self {
            PeerKind::Relay => "relay",
            PeerKind::Router => "router",
            PeerKind::Node => "node",
            PeerKind::Admin => "admin",
        }
    }
}

/// `[link.members.<key id>]`: a cluster member's kind and, for a storage node, the group and
/// address its key is bound to (a JOIN or BEAT naming any other is refused).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub kind: PeerKind,
    /// A node's group.
    #[serde(default)]
    pub group: Option<String>,
    /// A node's advertised address (`[cluster] advertise`, else its listen address).
    #[serde(default)]
    pub addr: Option<SocketAddr>,
}

impl Member {
    /// Whether a JOIN or BEAT naming `group` at `host`:`port` is this member's own: it is a
    /// node, of that group, at that address.
    pub fn binds(&self, group: &str, host: &str, port: u16) -> bool {
        self.kind == PeerKind::Node
            && self.group.as_deref() == Some(group)
            && self
                .addr
                .is_some_and(|a| a.port() == port && host.parse::<std::net::IpAddr>() == Ok(a.ip()))
    }

    fn check(&self, id: &str) -> Result<(), String> {
        let at = format!("[link.members.{id}]");
        match self.kind {
            PeerKind::Node => {
                let group = self.group.as_deref().unwrap_or("");
                if proto::check_group(group).is_err() {
                    return Err(format!(
                        "{at}: a node needs `group`, the group its key may JOIN (1 to {} ASCII \
                         letters, digits, '-' or '_')",
                        proto::GROUP_LEN
                    ));
                }
                if self.addr.is_none_or(|a| a.port() == 0) {
                    return Err(format!(
                        "{at}: a node needs `addr`, the \"ip:port\" it advertises in JOIN"
                    ));
                }
            }
            _ if self.group.is_some() || self.addr.is_some() => {
                return Err(format!(
                    "{at}: `group` and `addr` bind a node's key; a {} has neither",
                    self.kind.name()
                ));
            }
            _ => {}
        }
        Ok(())
    }
}

impl LinkConfig {
    pub fn check(&self) -> Result<(), String> {
        if let Some(k) = &self.send {
            k.check("[link.send]")?;
        }
        for (id, secret) in &self.accept {
            SigningKey {
                id: id.clone(),
                secret: secret.clone(),
            }
            .check("[link.accept]")?;
        }
        let mut nodes = BTreeMap::new();
        for (id, m) in &self.members {
            if !self.accept.contains_key(id) {
                return Err(format!(
                    "[link.members.{id}]: no key {id:?} in [link.accept], so no peer can be it"
                ));
            }
            m.check(id)?;
            if let Some(a) = m.addr
                && let Some(other) = nodes.insert(a, id)
            {
                return Err(format!(
                    "[link.members]: nodes {other} and {id} are both bound to {a}"
                ));
            }
        }
        Ok(())
    }

    /// What the peer with this accepted key is: its `[link.members]` entry's kind, else a relay.
    pub fn kind_of(&self, id: &str) -> PeerKind {
        self.members.get(id).map_or(PeerKind::Relay, |m| m.kind)
    }

    /// The verifier for incoming LINK proofs, or `None` when this process takes any peer.
    pub fn verifier(&self) -> Option<LinkVerifier> {
        if self.accept.is_empty() {
            return None;
        }
        let keys = self
            .accept
            .iter()
            .map(|(id, s)| (id.clone(), s.as_bytes().to_vec()))
            .collect();
        Some(LinkVerifier(Verifier::new(Policy {
            keys: BTreeMap::from([(LINK_APP.to_owned(), keys)]),
            skew_secs: 120,
            max_lifetime_secs: LINK_LIFETIME_SECS,
            max_live_tokens: 200_000,
            delegated: false,
        })))
    }

    /// The LINK frame to open a connection with, if this process proves one.
    pub fn frame(&self) -> Option<Vec<u8>> {
        self.send.as_ref().map(SigningKey::link_frame)
    }
}

/// Checks LINK proofs against the keys of `[link.accept]`.
pub struct LinkVerifier(Verifier);

impl LinkVerifier {
    /// The key id of a valid proof (the peer's name for logs).
    pub fn verify(&self, body: &[u8]) -> Result<String, AuthError> {
        let c = self.0.verify(body, now_secs())?;
        // The verifier only knows LINK_APP keys, so any other app already failed as unknown.
        Ok(c.key_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strong() -> String {
        new_secret()
    }

    #[test]
    fn weak_secrets_are_refused_with_the_way_out() {
        for bad in [
            "",
            "short",
            &"a".repeat(40),
            "example-demo-secret-CHANGE-ME-0123456789",
            "this-is-a-placeholder-secret-0123456789",
        ] {
            let e = check_secret("[x]", bad).unwrap_err();
            assert!(e.contains("ferry keygen"), "{e}");
        }
        assert!(check_secret("[x]", &strong()).is_ok());
        assert_ne!(new_secret(), new_secret());
    }

    #[test]
    fn link_proofs_pass_once_and_only_with_an_accepted_key() {
        let send = SigningKey {
            id: "cp".into(),
            secret: strong(),
        };
        let link = LinkConfig {
            send: Some(send.clone()),
            accept: BTreeMap::from([("cp".to_owned(), send.secret.clone())]),
            ..LinkConfig::default()
        };
        link.check().unwrap();
        let v = link.verifier().unwrap();
        let frame = link.frame().unwrap();
        let body = &frame[proto::HEADER_LEN..];
        assert_eq!(v.verify(body).unwrap(), "cp");
        assert!(matches!(v.verify(body), Err(AuthError::Replayed)));
        // Another key, or a session token of a real app, is no link proof.
        let other = SigningKey {
            id: "cp".into(),
            secret: strong(),
        };
        assert!(v.verify(&other.link_frame()[proto::HEADER_LEN..]).is_err());
        let token = send.mint("demo", "alice", Scope::ALL, 60).unwrap();
        assert!(v.verify(&token).is_err());
        assert!(LinkConfig::default().verifier().is_none());
    }

    #[test]
    fn members_name_accepted_keys_and_bind_each_node_to_one_group_and_address() {
        let k = strong();
        let parse = |members: &str| -> Result<LinkConfig, String> {
            let text = format!(
                "[accept]\ncp = \"{k}\"\nsp = \"{k}\"\nn1 = \"{k}\"\nn2 = \"{k}\"\n{members}"
            );
            let c: LinkConfig = toml::from_str(&text).map_err(|e| e.to_string())?;
            c.check().map(|()| c)
        };
        let c = parse(
            "[members.sp]\nkind = \"router\"\n\
             [members.n1]\nkind = \"node\"\ngroup = \"g1\"\naddr = \"10.0.0.1:7400\"\n\
             [members.n2]\nkind = \"node\"\ngroup = \"g1\"\naddr = \"[::1]:7400\"\n",
        )
        .unwrap();
        assert_eq!(c.kind_of("cp"), PeerKind::Relay);
        assert_eq!(c.kind_of("sp"), PeerKind::Router);
        let (n1, n2) = (&c.members["n1"], &c.members["n2"]);
        assert!(n1.binds("g1", "10.0.0.1", 7400));
        assert!(n2.binds("g1", "::1", 7400) && n2.binds("g1", "0:0:0:0:0:0:0:1", 7400));
        for (g, h, p) in [
            ("g2", "10.0.0.1", 7400),
            ("g1", "10.0.0.2", 7400),
            ("g1", "10.0.0.1", 1),
        ] {
            assert!(!n1.binds(g, h, p), "{g} {h}:{p}");
        }
        assert!(!n1.binds("g1", "host.example", 7400));
        assert!(!c.members["sp"].binds("g1", "10.0.0.1", 7400));
        for (bad, says) in [
            ("[members.x]\nkind = \"admin\"\n", "no key \"x\""),
            (
                "[members.n1]\nkind = \"node\"\naddr = \"10.0.0.9:1\"\n",
                "needs `group`",
            ),
            (
                "[members.n1]\nkind = \"node\"\ngroup = \"g1\"\n",
                "needs `addr`",
            ),
            (
                "[members.n1]\nkind = \"node\"\ngroup = \"g1\"\naddr = \"10.0.0.9:0\"\n",
                "needs `addr`",
            ),
            (
                "[members.sp]\nkind = \"router\"\ngroup = \"g1\"\n",
                "a router has",
            ),
            ("[members.sp]\nkind = \"boss\"\n", "unknown variant"),
            (
                "[members.n1]\nkind = \"node\"\ngroup = \"g1\"\naddr = \"node-a:7400\"\n",
                "socket address",
            ),
            (
                "[members.n1]\nkind = \"node\"\ngroup = \"g1\"\naddr = \"10.0.0.9:1\"\n\
                 [members.n2]\nkind = \"node\"\ngroup = \"g2\"\naddr = \"10.0.0.9:1\"\n",
                "both bound to 10.0.0.9:1",
            ),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn auth_config_needs_apps_with_strong_keys() {
        let mut cfg = AuthConfig::default();
        assert!(cfg.check("auth").is_err());
        cfg.keys.insert(
            "demo".into(),
            BTreeMap::from([("k1".to_owned(), "example-CHANGE-ME".to_owned())]),
        );
        assert!(cfg.check("auth").is_err());
        cfg.keys
            .insert("demo".into(), BTreeMap::from([("k1".to_owned(), strong())]));
        cfg.check("auth").unwrap();
        let key = SigningKey {
            id: "k1".into(),
            secret: cfg.keys["demo"]["k1"].clone(),
        };
        let c = cfg
            .verifier()
            .verify(
                &key.mint("demo", "alice", Scope::READ, 60).unwrap(),
                now_secs(),
            )
            .unwrap();
        assert_eq!((c.app.as_str(), c.user.as_str()), ("demo", "alice"));
        assert!(SigningKey::from_pair("k1:abc").is_ok());
        assert!(SigningKey::from_pair("nocolon").is_err());
    }
}
