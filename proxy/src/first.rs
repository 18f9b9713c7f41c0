//! The frames the proxy reads itself at the start of a session: an optional LINK proof (required
//! when `[link.accept]` names keys), then PROBE (answered here) or HELLO (decoded here, the single
//! place that parses it, then forwarded verbatim). Anything else is refused.

use ferry_common::auth::LinkVerifier;
use ferry_common::proto::{
    self, Command, ConnCmd, Decoded, Decoder, ErrorBody, ErrorCode, HEADER_LEN, HELLO_MAX, Header,
    Hello, Identity, Role, cmd, status,
};
use ferry_common::token::TOKEN_MAX;
use log::debug;

/// Most bytes the proxy holds before it has decided what a session is: a LINK frame with the
/// largest proof, then a header and the largest HELLO body. Any valid opening fits, so a full
/// buffer always yields a decision.
pub const FIRST_MAX: usize = HEADER_LEN + TOKEN_MAX + HEADER_LEN + HELLO_MAX;

/// What the bytes read so far from a new session amount to.
#[derive(Debug, PartialEq, Eq)]
pub enum First {
    /// Not a whole frame yet.
    Pending,
    /// A PROBE: send this reply and close.
    Probe(Vec<u8>),
    /// A whole LINK frame of `frame_len` bytes (its body is the proof); only [`classify`]
    /// returns it, [`Opening::advance`] checks and consumes it.
    Link { frame_len: usize },
    /// A valid HELLO: the first `frame_len` bytes of the input are its frame; every byte read
    /// (the HELLO and whatever followed it) is forwarded upstream unchanged.
    Hello { hello: Hello, frame_len: usize },
    /// Not a valid session opening: send this error frame (error `code`) and close.
    Reject {
        code: ErrorCode,
        frame: Vec<u8>,
        why: String,
    },
}

/// Where a session stands with its link proof.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// This proxy takes any peer (`[link.accept]` is empty); a LINK is dropped unchecked.
    NotRequired,
    /// A valid LINK must come before HELLO.
    Required,
    /// A valid LINK was received; another one is refused.
    Done,
}

fn reject(code: ErrorCode, why: String) -> First {
    First::Reject {
        code,
        frame: ErrorBody::new(code, why.clone()).frame(cmd::REPLY_PROXY),
        why,
    }
}

/// Refuses a session for its link proof. The peer learns only that; `detail` (which may name a
/// key id, never a secret) goes to the session log.
fn refuse_link(text: &str, detail: &str) -> First {
    First::Reject {
        code: ErrorCode::Auth,
        frame: ErrorBody::new(ErrorCode::Auth, text).frame(cmd::REPLY_PROXY),
        why: format!("{text}: {detail}"),
    }
}

/// The proxy's own answer to PROBE.
pub fn probe_reply() -> Vec<u8> {
    let id = Identity {
        version: proto::VERSION,
        role: Role::Proxy,
    };
    proto::frame(cmd::REPLY_PROXY, status::OK, &id.encode())
}

/// Classifies the first frame of `input` (at most [`FIRST_MAX`] bytes), given where the session
/// stands with its link proof. Stateless: the input is small, so it is decoded from the start on
/// every call.
pub fn classify(input: &[u8], link: Link) -> First {
    let Some(raw) = input.first_chunk::<HEADER_LEN>() else {
        return First::Pending;
    };
    let header = Header::decode(raw);
    let not_hello = |c: u8| {
        reject(
            ErrorCode::HelloRequired,
            format!("first frame must be HELLO, got {} ({c})", cmd::name(c)),
        )
    };
    let command = match Command::from_u8(header.cmd) {
        Some(Command::Conn(c)) => c,
        // A session opens with HELLO; the cluster's members reach trackers directly.
        Some(Command::Tracker(_) | Command::File(_) | Command::Reply(_)) | None => {
            return not_hello(header.cmd);
        }
    };
    match command {
        ConnCmd::Probe => {}
        ConnCmd::Link if link == Link::Done => {
            return refuse_link("link proof not valid", "a second LINK");
        }
        ConnCmd::Link => {}
        ConnCmd::Hello if link == Link::Required => {
            return refuse_link("link proof required", "HELLO without a LINK first");
        }
        ConnCmd::Hello => {}
    }
    let mut dec = Decoder::requests();
    let mut used = 0;
    while used < input.len() {
        match dec.decode(&input[used..]) {
            // A LINK that does not even frame is no proof: the same answer as a forged one.
            Err(e) if header.cmd == cmd::LINK => {
                return refuse_link("link proof not valid", &format!("bad LINK frame: {e}"));
            }
            Err(e) => return reject(e.code(), format!("bad {}: {e}", cmd::name(header.cmd))),
            Ok((n, Some(Decoded::Frame { meta, .. }))) => {
                used += n;
                return frame_done(command, &meta, used);
            }
            // Control frames have no payload, so nothing else can come out before the frame.
            Ok((n, _)) => {
                if n == 0 {
                    break;
                }
                used += n;
            }
        }
    }
    First::Pending
}

/// A whole first frame of `command` ([`classify`] lets only PROBE, LINK and HELLO through).
fn frame_done(command: ConnCmd, body: &[u8], frame_len: usize) -> First {
    match command {
        ConnCmd::Probe => match proto::decode_probe(body) {
            // Any prober version gets our identity; the prober decides whether it can talk to us.
            Ok(_) => First::Probe(probe_reply()),
            Err(e) => reject(e.code(), format!("bad PROBE: {e}")),
        },
        ConnCmd::Link => First::Link { frame_len },
        ConnCmd::Hello => match Hello::decode(body) {
            Ok(hello) => First::Hello { hello, frame_len },
            Err(e) => reject(e.code(), format!("bad HELLO: {e}")),
        },
    }
}

/// A session's opening as it is read: checks and consumes the LINK frame (so it is never
/// forwarded), then classifies what follows it.
#[derive(Debug)]
pub struct Opening {
    pub link: Link,
    /// The key id of the peer's valid link proof (its name in the log).
    pub peer: Option<String>,
}

impl Opening {
    /// `required`: this proxy has `[link.accept]` keys.
    pub fn new(required: bool) -> Opening {
        Opening {
            link: if required {
                Link::Required
            } else {
                Link::NotRequired
            },
            peer: None,
        }
    }

    /// Classifies `buf` (everything read and not yet consumed). A whole LINK frame is verified
    /// with `verifier` (once: its nonce is then spent) and removed from `buf`, and what follows
    /// it is classified in turn. Never returns [`First::Link`].
    pub fn advance(&mut self, buf: &mut Vec<u8>, verifier: Option<&LinkVerifier>) -> First {
        loop {
            match classify(buf, self.link) {
                First::Link { frame_len } => {
                    match (self.link, verifier) {
                        (Link::Required, Some(v)) => match v.verify(&buf[HEADER_LEN..frame_len]) {
                            Ok(peer) => {
                                self.peer = Some(peer);
                                self.link = Link::Done;
                            }
                            Err(e) => return refuse_link("link proof not valid", &e.to_string()),
                        },
                        (Link::Required, None) => {
                            return refuse_link("link proof not valid", "no link keys to check it");
                        }
                        // Nothing to check it against, and nothing needs it: drop it.
                        _ => {
                            debug!("LINK dropped unchecked: this proxy has no [link.accept] keys");
                            self.link = Link::Done;
                        }
                    }
                    buf.drain(..frame_len);
                }
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_common::auth::{LinkConfig, SigningKey, new_secret};
    use ferry_common::token::Scope;
    use std::collections::BTreeMap;

    fn hello_frame() -> Vec<u8> {
        let body = Hello::new("demo", "alice", b"secret").encode().unwrap();
        proto::frame(cmd::HELLO, 0, &body)
    }

    fn error_code(frame: &[u8]) -> ErrorCode {
        let h = Header::decode(frame[..HEADER_LEN].try_into().unwrap());
        assert_eq!((h.cmd, h.status), (cmd::REPLY_PROXY, status::ERROR));
        ErrorBody::decode(&frame[HEADER_LEN..]).unwrap().code
    }

    /// Link keys as a server-proxy would hold them: `cp` accepted, `cp` also the sender.
    fn keys() -> LinkConfig {
        let secret = new_secret();
        LinkConfig {
            send: Some(SigningKey {
                id: "cp".into(),
                secret: secret.clone(),
            }),
            accept: BTreeMap::from([("cp".to_owned(), secret)]),
            ..LinkConfig::default()
        }
    }

    /// Feeds `input` to a fresh opening in pieces of `cut` bytes, as reads would deliver it.
    fn feed(
        input: &[u8],
        cut: usize,
        required: bool,
        v: Option<&LinkVerifier>,
    ) -> (First, Vec<u8>) {
        let mut op = Opening::new(required);
        let mut buf = Vec::new();
        for piece in input.chunks(cut.max(1)) {
            buf.extend_from_slice(piece);
            match op.advance(&mut buf, v) {
                First::Pending => {}
                other => return (other, buf),
            }
        }
        (First::Pending, buf)
    }

    #[test]
    fn link_then_hello_in_any_chunking_and_the_link_is_not_forwarded() {
        let cfg = keys();
        let v = cfg.verifier().unwrap();
        for cut in [1, 2, 7, 10, 11, 100, 383, 384, 385, FIRST_MAX] {
            let link = cfg.frame().unwrap();
            let mut input = link.clone();
            input.extend_from_slice(&hello_frame());
            input.extend_from_slice(b"then data");
            let (first, rest) = feed(&input, cut, true, Some(&v));
            let First::Hello { hello, frame_len } = first else {
                panic!("cut {cut}: {first:?}");
            };
            assert_eq!(hello.user, "alice");
            assert_eq!(frame_len, hello_frame().len());
            // What is left to forward starts with the HELLO: the LINK was consumed.
            assert!(rest.starts_with(&hello_frame()), "cut {cut}");
            assert!(link.len() + hello_frame().len() <= FIRST_MAX);
        }
        // A PROBE needs no proof, before or after one.
        let probe = proto::frame(cmd::PROBE, 0, &proto::probe_body());
        assert!(matches!(feed(&probe, 3, true, Some(&v)).0, First::Probe(_)));
        let mut after = cfg.frame().unwrap();
        after.extend_from_slice(&probe);
        assert!(matches!(feed(&after, 5, true, Some(&v)).0, First::Probe(_)));
    }

    #[test]
    fn hello_without_link_is_refused_with_auth_when_required() {
        let v = keys().verifier().unwrap();
        for cut in [1, HEADER_LEN, FIRST_MAX] {
            let (first, _) = feed(&hello_frame(), cut, true, Some(&v));
            let First::Reject { code, frame, why } = first else {
                panic!("{first:?}")
            };
            assert_eq!(error_code(&frame), ErrorCode::Auth);
            assert_eq!(code, ErrorCode::Auth);
            let text = ErrorBody::decode(&frame[HEADER_LEN..]).unwrap().text;
            assert_eq!(text, "link proof required");
            assert!(why.contains("link proof required"), "{why}");
        }
    }

    #[test]
    fn garbage_forged_replayed_or_repeated_links_are_refused() {
        let cfg = keys();
        let v = cfg.verifier().unwrap();
        let refused = |input: &[u8]| {
            let (first, _) = feed(input, FIRST_MAX, true, Some(&v));
            let First::Reject { code, frame, why } = first else {
                panic!("{first:?}")
            };
            assert_eq!(error_code(&frame), ErrorCode::Auth, "{why}");
            assert_eq!(code, ErrorCode::Auth);
            let text = ErrorBody::decode(&frame[HEADER_LEN..]).unwrap().text;
            assert_eq!(text, "link proof not valid");
            why
        };
        // Garbage of a plausible length, and a LINK longer than any token.
        refused(&proto::frame(cmd::LINK, 0, &[7u8; 100]));
        refused(&Header::new(cmd::LINK, 0, 1 << 20).encode());
        refused(&proto::frame(cmd::LINK, 0, &[]));
        // Signed with a key this proxy does not accept (same id, other secret).
        let forged = SigningKey {
            id: "cp".into(),
            secret: new_secret(),
        };
        let why = refused(&forged.link_frame());
        assert!(why.contains("bad signature"), "{why}");
        // A session token of a real app is no link proof.
        let token = forged.mint("demo", "alice", Scope::ALL, 60).unwrap();
        refused(&proto::frame(cmd::LINK, 0, &token));
        // A valid proof passes once; the same bytes again are a replay.
        let mut ok = cfg.frame().unwrap();
        let replay = ok.clone();
        ok.extend_from_slice(&hello_frame());
        assert!(matches!(
            feed(&ok, 50, true, Some(&v)).0,
            First::Hello { .. }
        ));
        let why = refused(&replay);
        assert!(why.contains("replayed"), "{why}");
        // Two LINKs in a row.
        let mut twice = cfg.frame().unwrap();
        twice.extend_from_slice(&cfg.frame().unwrap());
        refused(&twice);
        // The error text never carries key material.
        let secret = cfg.accept["cp"].clone();
        let (First::Reject { frame, .. }, _) = feed(&forged.link_frame(), 9, true, Some(&v)) else {
            panic!()
        };
        assert!(!String::from_utf8_lossy(&frame).contains(&secret));
    }

    #[test]
    fn without_accept_keys_a_hello_passes_and_a_link_is_dropped() {
        let (first, rest) = feed(&hello_frame(), 13, false, None);
        assert!(matches!(first, First::Hello { .. }), "{first:?}");
        assert_eq!(rest, hello_frame());
        // A LINK (from a client-proxy with [link.send]) is consumed, not forwarded.
        let mut input = keys().frame().unwrap();
        input.extend_from_slice(&hello_frame());
        let (first, rest) = feed(&input, 64, false, None);
        assert!(matches!(first, First::Hello { .. }), "{first:?}");
        assert_eq!(rest, hello_frame());
    }

    #[test]
    fn hello_in_any_chunking_then_extra_bytes() {
        let mut f = hello_frame();
        let len = f.len();
        for cut in 0..len {
            assert_eq!(
                classify(&f[..cut], Link::NotRequired),
                First::Pending,
                "cut {cut}"
            );
        }
        f.extend_from_slice(b"next frame bytes");
        match classify(&f, Link::NotRequired) {
            First::Hello { hello, frame_len } => {
                assert_eq!(frame_len, len);
                assert_eq!((hello.app.as_str(), hello.user.as_str()), ("demo", "alice"));
                assert_eq!(hello.credential, b"secret");
            }
            other => panic!("{other:?}"),
        }
        assert!(len <= FIRST_MAX);
    }

    #[test]
    fn probe_is_answered_with_proxy_identity() {
        let p = proto::frame(cmd::PROBE, 0, &proto::probe_body());
        let First::Probe(reply) = classify(&p, Link::NotRequired) else {
            panic!()
        };
        let h = Header::decode(reply[..HEADER_LEN].try_into().unwrap());
        assert_eq!((h.cmd, h.status), (cmd::REPLY_PROXY, status::OK));
        let id = Identity::decode(&reply[HEADER_LEN..]).unwrap();
        assert_eq!(id.role, Role::Proxy);
        assert_eq!(id.version, proto::VERSION);
    }

    #[test]
    fn other_first_frames_and_bad_bodies_are_refused() {
        let stat = proto::frame(cmd::STAT, 0, &[0u8; 128]);
        let First::Reject { frame, .. } = classify(&stat[..HEADER_LEN], Link::NotRequired) else {
            panic!()
        };
        assert_eq!(error_code(&frame), ErrorCode::HelloRequired);
        let unknown = proto::frame(200, 0, &[]);
        let First::Reject { frame, .. } = classify(&unknown, Link::NotRequired) else {
            panic!()
        };
        assert_eq!(error_code(&frame), ErrorCode::HelloRequired);
        // A HELLO claiming a body over its limit is refused from the header alone.
        let huge = Header::new(cmd::HELLO, 0, u64::MAX).encode();
        let First::Reject { frame, .. } = classify(&huge, Link::NotRequired) else {
            panic!()
        };
        assert_eq!(error_code(&frame), ErrorCode::TooLarge);
        // Wrong version inside a well-formed HELLO.
        let mut h = Hello::new("demo", "alice", b"");
        h.version = 99;
        let f = proto::frame(cmd::HELLO, 0, &h.encode().unwrap());
        let First::Reject { frame, .. } = classify(&f, Link::NotRequired) else {
            panic!()
        };
        assert_eq!(error_code(&frame), ErrorCode::Version);
        // A request with a non-zero status byte.
        let f = proto::frame(cmd::HELLO, 1, &Hello::new("a", "b", b"").encode().unwrap());
        assert!(matches!(
            classify(&f, Link::NotRequired),
            First::Reject { .. }
        ));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Whatever arrives first, the proxy decides without panicking, waits only while a
        /// valid frame could still be coming, and every refusal is a well-formed error frame.
        #[test]
        fn any_first_bytes_get_a_clean_decision(
            head in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..FIRST_MAX),
            cmd_byte in proptest::prelude::any::<u8>(),
        ) {
            let mut input = head.clone();
            if input.len() > 8 {
                input[8] = cmd_byte;
            }
            match classify(&input, Link::NotRequired) {
                First::Pending => proptest::prop_assert!(input.len() < FIRST_MAX),
                First::Reject { frame, .. } => {
                    let h = Header::decode(frame[..HEADER_LEN].try_into().unwrap());
                    proptest::prop_assert_eq!(h.cmd, cmd::REPLY_PROXY);
                    proptest::prop_assert_eq!(h.body_len as usize, frame.len() - HEADER_LEN);
                    proptest::prop_assert!(ErrorBody::decode(&frame[HEADER_LEN..]).is_ok());
                }
                First::Probe(_) => proptest::prop_assert_eq!(input[8], cmd::PROBE),
                First::Hello { frame_len, .. } => {
                    proptest::prop_assert_eq!(input[8], cmd::HELLO);
                    proptest::prop_assert!(frame_len <= input.len());
                }
                First::Link { frame_len } => {
                    proptest::prop_assert_eq!(input[8], cmd::LINK);
                    proptest::prop_assert!(frame_len <= input.len());
                }
            }
            // With link proofs required, random bytes never open a session.
            let v = keys().verifier().unwrap();
            let mut buf = input.clone();
            match Opening::new(true).advance(&mut buf, Some(&v)) {
                First::Pending => proptest::prop_assert!(input.len() < FIRST_MAX),
                First::Probe(_) => proptest::prop_assert_eq!(input[8], cmd::PROBE),
                First::Reject { .. } => {}
                other => proptest::prop_assert!(false, "{:?}", other),
            }
        }
    }
}
