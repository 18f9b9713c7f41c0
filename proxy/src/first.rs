//! The one frame the proxy reads itself: the first frame of a session. PROBE is answered here,
//! HELLO is decoded (this is the single place that parses it, so routing by app or user can be
//! added here) and then forwarded verbatim, anything else is refused.

use ferry_common::proto::{
    self, Decoded, Decoder, ErrorBody, ErrorCode, HEADER_LEN, HELLO_MAX, Header, Hello, Identity,
    Role, cmd, status,
};

/// Most bytes the proxy reads before it has decided what a session is: a header and the
/// largest HELLO body. Any valid first frame fits, so a full buffer always yields a decision.
pub const FIRST_MAX: usize = HEADER_LEN + HELLO_MAX;

/// What the bytes read so far from a new session amount to.
#[derive(Debug, PartialEq, Eq)]
pub enum First {
    /// Not a whole frame yet.
    Pending,
    /// A PROBE: send this reply and close.
    Probe(Vec<u8>),
    /// A valid HELLO: the first `frame_len` bytes of the input are its frame; every byte read
    /// (the HELLO and whatever followed it) is forwarded upstream unchanged.
    Hello { hello: Hello, frame_len: usize },
    /// Not a valid session opening: send this error frame and close.
    Reject { frame: Vec<u8>, why: String },
}

fn reject(code: ErrorCode, why: String) -> First {
    First::Reject {
        frame: ErrorBody::new(code, why.clone()).frame(cmd::REPLY_PROXY),
        why,
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

/// Classifies the bytes a session has sent so far (at most [`FIRST_MAX`] of them). Stateless:
/// the input is small, so it is decoded from the start on every call.
pub fn classify(input: &[u8]) -> First {
    let Some(raw) = input.first_chunk::<HEADER_LEN>() else {
        return First::Pending;
    };
    let header = Header::decode(raw);
    if header.cmd != cmd::HELLO && header.cmd != cmd::PROBE {
        return reject(
            ErrorCode::HelloRequired,
            format!(
                "first frame must be HELLO, got {} ({})",
                cmd::name(header.cmd),
                header.cmd
            ),
        );
    }
    let mut dec = Decoder::requests();
    let mut used = 0;
    while used < input.len() {
        match dec.decode(&input[used..]) {
            Err(e) => return reject(e.code(), format!("bad {}: {e}", cmd::name(header.cmd))),
            Ok((n, Some(Decoded::Frame { header, meta, .. }))) => {
                used += n;
                return frame_done(header, &meta, used);
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

fn frame_done(header: Header, body: &[u8], frame_len: usize) -> First {
    if header.cmd == cmd::PROBE {
        return match proto::decode_probe(body) {
            // Any prober version gets our identity; the prober decides whether it can talk to us.
            Ok(_) => First::Probe(probe_reply()),
            Err(e) => reject(e.code(), format!("bad PROBE: {e}")),
        };
    }
    match Hello::decode(body) {
        Ok(hello) => First::Hello { hello, frame_len },
        Err(e) => reject(e.code(), format!("bad HELLO: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello_frame() -> Vec<u8> {
        let body = Hello::new("demo", "alice", b"secret").encode().unwrap();
        proto::frame(cmd::HELLO, 0, &body)
    }

    fn error_code(frame: &[u8]) -> ErrorCode {
        let h = Header::decode(frame[..HEADER_LEN].try_into().unwrap());
        assert_eq!((h.cmd, h.status), (cmd::REPLY_PROXY, status::ERROR));
        ErrorBody::decode(&frame[HEADER_LEN..]).unwrap().code
    }

    #[test]
    fn hello_in_any_chunking_then_extra_bytes() {
        let mut f = hello_frame();
        let len = f.len();
        for cut in 0..len {
            assert_eq!(classify(&f[..cut]), First::Pending, "cut {cut}");
        }
        f.extend_from_slice(b"next frame bytes");
        match classify(&f) {
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
        let First::Probe(reply) = classify(&p) else {
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
        let First::Reject { frame, .. } = classify(&stat[..HEADER_LEN]) else {
            panic!()
        };
        assert_eq!(error_code(&frame), ErrorCode::HelloRequired);
        let unknown = proto::frame(200, 0, &[]);
        let First::Reject { frame, .. } = classify(&unknown) else {
            panic!()
        };
        assert_eq!(error_code(&frame), ErrorCode::HelloRequired);
        // A HELLO claiming a body over its limit is refused from the header alone.
        let huge = Header::new(cmd::HELLO, 0, u64::MAX).encode();
        let First::Reject { frame, .. } = classify(&huge) else {
            panic!()
        };
        assert_eq!(error_code(&frame), ErrorCode::TooLarge);
        // Wrong version inside a well-formed HELLO.
        let mut h = Hello::new("demo", "alice", b"");
        h.version = 99;
        let f = proto::frame(cmd::HELLO, 0, &h.encode().unwrap());
        let First::Reject { frame, .. } = classify(&f) else {
            panic!()
        };
        assert_eq!(error_code(&frame), ErrorCode::Version);
        // A request with a non-zero status byte.
        let f = proto::frame(cmd::HELLO, 1, &Hello::new("a", "b", b"").encode().unwrap());
        assert!(matches!(classify(&f), First::Reject { .. }));
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
            match classify(&input) {
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
            }
        }
    }
}
