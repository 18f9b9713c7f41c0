//! Fuzzing harnesses: one function per fuzz target, each feeding arbitrary bytes to a decoder that
//! faces the network and checking the invariants the code promises (no panic, no unbounded
//! allocation, consumed bytes within the input, results within their bounds).
//!
//! `targets/` (cargo-fuzz, `./fuzz/run.sh`) calls these from libFuzzer; `tests/corpus.rs` replays
//! every committed input in `corpus/<target>/` through them on each `cargo test`.

use ferry_common::proto;
use ferry_common::proto::{
    self as frames, BodySpec, Command, ConnCmd, Decoded, Decoder, FileCmd, ReplyCmd, TrackerCmd,
};
use ferry_server::http::{head, range};

/// A harness: arbitrary bytes in, a panic out if a promise is broken.
pub type Harness = fn(&[u8]);

/// The targets by name, as `corpus/<name>/` and `targets/fuzz_targets/<name>.rs` know them.
pub const TARGETS: &[(&str, Harness)] = &[
    ("frames", frames),
    ("replies", replies),
    ("http_head", http_head),
    ("http_range", http_range),
    ("signed_url", signed_url),
    ("hello_token", hello_token),
    ("proxy_opening", proxy_opening),
];

/// Splits `data` into chunks whose sizes come from `data` itself, so the fuzzer explores every
/// way a stream can be cut (seed 001's half and sticky packets).
fn chunks(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let step = usize::from(data.first().copied().unwrap_or(0) % 17) + 1;
    data.get(1..).unwrap_or_default().chunks(step)
}

/// Drives one decoder over a chunked stream, checking that every call consumes within its input
/// and makes progress, and hands every decoded frame to `on_frame`.
fn drive(mut d: Decoder, data: &[u8], on_frame: impl Fn(u8, u8, &[u8], u64)) {
    for mut input in chunks(data) {
        while !input.is_empty() {
            let Ok((used, item)) = d.decode(input) else {
                return; // the connection would get an error frame and close
            };
            assert!(used <= input.len(), "decoder consumed past its input");
            if let Some(Decoded::Frame {
                header,
                meta,
                payload_len,
            }) = &item
            {
                on_frame(header.cmd, header.status, meta, *payload_len);
            }
            if let Some(Decoded::Payload { data, .. }) = &item {
                assert!(
                    data.len() <= used,
                    "payload slice longer than what was consumed"
                );
            }
            assert!(used > 0 || item.is_some(), "decoder made no progress");
            input = &input[used..];
        }
    }
}

/// Requests as a server or proxy reads them: the frame decoder, then the body parser of the
/// command the frame names (what `server/src/conn.rs` calls).
pub fn frames(data: &[u8]) {
    drive(
        Decoder::requests(),
        data,
        |c, _status, body, payload_len| {
            let command = Command::from_u8(c).expect("the decoder passed an unknown command");
            let spec = command.spec().expect("the decoder passed a reply");
            assert!(body.len() <= spec.meta && payload_len <= spec.payload_max);
            // Results are ignored: the point is that every parser returns instead of panicking.
            let _ = match command {
                Command::Conn(ConnCmd::Hello) => frames::Hello::decode(body).map(drop),
                Command::Conn(ConnCmd::Probe) => frames::decode_probe(body).map(drop),
                Command::Conn(ConnCmd::Link) => {
                    let _ = ferry_common::token::Claims::parse(body);
                    Ok(())
                }
                Command::Tracker(t) => match t {
                    TrackerCmd::Join => frames::NodeHello::decode_join(body).map(drop),
                    TrackerCmd::Beat => frames::NodeHello::decode_beat(body).map(drop),
                    TrackerCmd::Saddrs => frames::SaddrsReq::decode(body).map(drop),
                    TrackerCmd::Users => frames::UsersReq::decode(body).map(drop),
                    // An empty body: the spec is all there is to check.
                    TrackerCmd::Groups => Ok(()),
                },
                Command::File(f) => match f {
                    FileCmd::Upload => frames::UploadMeta::decode(body).map(drop),
                    FileCmd::Stat | FileCmd::Delete | FileCmd::DownloadOver => {
                        frames::decode_file_id(body).map(drop)
                    }
                    FileCmd::Download => frames::DownloadReq::decode(body).map(drop),
                    FileCmd::UploadInit => frames::UploadInit::decode(body).map(drop),
                    FileCmd::UploadQuery | FileCmd::UploadOver => {
                        frames::decode_upload_id(body).map(drop)
                    }
                    FileCmd::UploadBlock => frames::BlockMeta::decode(body, payload_len).map(drop),
                    FileCmd::UploadProve => frames::Prove::decode(body).map(drop),
                    // An empty body: the spec is all there is to check.
                    FileCmd::Usage => Ok(()),
                },
                Command::Reply(_) => unreachable!("replies have no request spec"),
            };
        },
    );
}

/// The largest reply body a client accepts per reply command (storage replies: the largest
/// control reply, then a payload bounded like a block; tracker and id replies as the cluster
/// clients read them).
fn reply_spec(c: u8) -> Option<BodySpec> {
    match Command::from_u8(c)? {
        Command::Reply(ReplyCmd::Storage | ReplyCmd::Proxy) => Some(BodySpec {
            meta: frames::STAT_REPLY_LEN,
            exact: false,
            payload_max: proto::BLOCK_MAX,
        }),
        Command::Reply(ReplyCmd::Tracker) => frames::cluster_reply_spec(c),
        Command::Conn(_) | Command::Tracker(_) | Command::File(_) => None,
    }
}

/// Replies as a client reads them: the reply decoder, error bodies, then every reply parser.
pub fn replies(data: &[u8]) {
    drive(Decoder::replies(reply_spec), data, |_c, status, body, _| {
        if status != proto::status::OK {
            let _ = frames::ErrorBody::decode(body);
            return;
        }
        let _ = frames::Identity::decode(body);
        let _ = frames::StatReply::decode(body);
        let _ = frames::UsageReply::decode(body);
        let _ = frames::UploadInitReply::decode(body);
        let _ = frames::Breakpoint::decode(body);
        let _ = frames::BlockAck::decode(body);
        let _ = frames::decode_download_meta(body);
        let _ = frames::BeatReply::decode(body);
        let _ = frames::SaddrsReply::decode(body);
        let _ = frames::GroupsReply::decode(body);
        let _ = frames::UsersReply::decode(body);
    });
}

/// An HTTP request head as the gateway parses it, then its query and path decoding.
pub fn http_head(data: &[u8]) {
    if let head::Parsed::Complete(h, len) = head::parse(data) {
        assert!(len <= data.len());
        let (path, query) = h.target.split_once('?').unwrap_or((&h.target, ""));
        let _ = head::percent_decode(path);
        for key in ["app", "exp", "sig"] {
            let _ = head::query_param(query, key);
        }
    }
}

/// A `Range` header against a body size: the first 8 bytes are the size, the rest the header.
/// A part must lie inside the body, whatever the numbers (CVE-2017-7529 class).
pub fn http_range(data: &[u8]) {
    let (size, text) = match data.split_first_chunk::<8>() {
        Some((s, rest)) => (u64::from_be_bytes(*s), rest),
        None => (0, data),
    };
    let text = String::from_utf8_lossy(text);
    if let range::Ranged::Part { start, end } = range::resolve(Some(&text), size) {
        assert!(
            start <= end && end < size,
            "range {start}-{end} outside a {size}-byte body"
        );
    }
}

/// Signed-URL checks on hostile values: whatever the inputs, verification answers, and only the
/// right signature passes (hex digits in either case: they are the same MAC bytes).
pub fn signed_url(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(4, '\n');
    let (id, exp, app, sig) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let exp = exp.parse::<u64>().unwrap_or(0);
    let secret = b"fuzzing-secret-0123456789";
    let good = ferry_common::signing::sign(secret, id, exp, app);
    assert!(ferry_common::signing::verify(secret, id, exp, app, &good));
    if !sig.eq_ignore_ascii_case(&good) {
        assert!(!ferry_common::signing::verify(secret, id, exp, app, sig));
    }
}

/// A HELLO body and its session token: the HELLO parser, then token parsing and verification.
/// A token that passes must be exactly what minting its claims with the key gives (one encoding
/// per identity), and must not pass twice (its nonce is spent).
pub fn hello_token(data: &[u8]) {
    use ferry_common::token::{Claims, Policy, Verifier};
    let credential = match frames::Hello::decode(data) {
        Ok(h) => h.credential,
        Err(_) => data.to_vec(),
    };
    let key = b"fuzzing-key-0123456789abcdef".to_vec();
    let keys = [("demo".to_owned(), [("k1".to_owned(), key.clone())].into())].into();
    let v = Verifier::new(Policy {
        keys,
        skew_secs: 60,
        max_lifetime_secs: 86_400,
        max_live_tokens: 16,
        delegated: true,
    });
    let now = 1_800_000_000;
    let _ = Claims::parse(&credential);
    if let Ok(c) = v.verify(&credential, now) {
        assert_eq!(
            c.mint(&key).as_deref(),
            Ok(&credential[..]),
            "two encodings verify"
        );
        assert!(v.verify(&credential, now).is_err(), "a token passed twice");
    }
}

/// A session's opening as a link-requiring proxy reads it (LINK proof, then HELLO or PROBE),
/// delivered in arbitrary pieces, with the proxy's cap on what it reads before deciding. Every
/// outcome must be a decision within that cap, a HELLO whose frame lies within the buffer, and
/// a LINK proof must never pass unless it verifies (the fuzzer cannot forge the MAC).
pub fn proxy_opening(data: &[u8]) {
    use ferry_common::auth::LinkConfig;
    use ferry_proxy::first::{FIRST_MAX, First, Opening};
    let secret = "fuzzing-link-key-0123456789abcdef-0123".to_owned();
    let link = LinkConfig {
        send: None,
        accept: [("cp".to_owned(), secret)].into(),
        ..LinkConfig::default()
    };
    let verifier = link.verifier();
    for required in [true, false] {
        let mut op = Opening::new(required);
        let mut buf = Vec::new();
        for piece in chunks(data) {
            // The session reads at most FIRST_MAX bytes before it must have decided.
            let room = FIRST_MAX.saturating_sub(buf.len());
            buf.extend_from_slice(&piece[..piece.len().min(room)]);
            match op.advance(&mut buf, verifier.as_ref()) {
                First::Pending => assert!(buf.len() < FIRST_MAX, "undecided at the cap"),
                First::Hello { frame_len, .. } => {
                    assert!(frame_len <= buf.len(), "HELLO frame past the buffer");
                    assert!(
                        !required || op.peer.is_some(),
                        "HELLO let through without a verified link proof"
                    );
                    break;
                }
                First::Link { .. } => panic!("advance returned an unconsumed LINK"),
                First::Probe(_) | First::Reject { .. } => break,
            }
        }
    }
}
