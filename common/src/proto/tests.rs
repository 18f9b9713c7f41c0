use super::*;
use proptest::prelude::*;

/// Hex examples from docs/PROTOCOL.md, by name: a line `example NAME:` followed by a fenced
/// block of hex bytes.
fn doc_example(name: &str) -> Vec<u8> {
    let doc = include_str!("../../../docs/PROTOCOL.md");
    let tag = format!("example {name}:");
    let start = doc
        .find(&tag)
        .unwrap_or_else(|| panic!("PROTOCOL.md has no {tag}"));
    let rest = &doc[start..];
    let open = rest.find("```hex").expect("example opens a ```hex block") + 6;
    let close = rest[open..].find("```").expect("example block closes") + open;
    rest[open..close]
        .split_whitespace()
        .map(|h| u8::from_str_radix(h, 16).expect("hex byte"))
        .collect()
}

/// Feeds `chunks` in order to one decoder and returns every frame with its meta and payload
/// glued back together.
fn decode_chunks(
    dec: &mut Decoder,
    chunks: &[&[u8]],
) -> Result<Vec<(Header, Vec<u8>)>, ProtoError> {
    let mut out: Vec<(Header, Vec<u8>)> = Vec::new();
    for chunk in chunks {
        let mut input = *chunk;
        while !input.is_empty() {
            let (n, item) = dec.decode(input)?;
            assert!(n > 0, "decoder made no progress on non-empty input");
            input = &input[n..];
            match item {
                Some(Decoded::Frame { header, meta, .. }) => out.push((header, meta)),
                Some(Decoded::Payload { data, .. }) => out
                    .last_mut()
                    .expect("payload after a frame")
                    .1
                    .extend_from_slice(data),
                None => {}
            }
        }
    }
    Ok(out)
}

fn decode_all(dec: &mut Decoder, input: &[u8]) -> Result<Vec<(Header, Vec<u8>)>, ProtoError> {
    decode_chunks(dec, &[input])
}

fn sample_frames() -> Vec<Vec<u8>> {
    let hello = Hello::new("demo", "alice", b"token");
    let mut upload = data_frame_head(
        cmd::UPLOAD,
        0,
        &UploadMeta {
            key: [5; 16],
            sha256: [7; 32],
            name: "cat.jpg".into(),
        }
        .encode()
        .unwrap(),
        5,
    );
    upload.extend_from_slice(b"hello");
    let meta = BlockMeta {
        upload_id: [9; 16],
        index: 3,
        offset: 12,
        len: 4,
        crc32c: 42,
    };
    let mut block = data_frame_head(cmd::UPLOAD_BLOCK, 0, &meta.encode(), 4);
    block.extend_from_slice(b"abcd");
    vec![
        frame(cmd::HELLO, 0, &hello.encode().unwrap()),
        frame(cmd::PROBE, 0, &probe_body()),
        upload,
        frame(cmd::STAT, 0, &encode_file_id("f1").unwrap()),
        block,
        frame(cmd::UPLOAD_OVER, 0, &[1; 16]),
    ]
}

#[test]
fn header_layout_matches_the_doc() {
    let h = Header::new(cmd::PROBE, status::OK, 2);
    let doc = doc_example("probe");
    assert_eq!(&h.encode()[..], &doc[..HEADER_LEN]);
    assert_eq!(Header::decode(&h.encode()), h);
    let mut f = h.encode().to_vec();
    f.extend_from_slice(&probe_body());
    assert_eq!(f, doc);
}

#[test]
fn frames_match_the_doc() {
    let hello = Hello::new("demo", "alice", b"");
    assert_eq!(
        frame(cmd::HELLO, 0, &hello.encode().unwrap()),
        doc_example("hello")
    );
    let err = ErrorBody::new(ErrorCode::NotFound, "no such file");
    assert_eq!(err.frame(cmd::REPLY_STORAGE), doc_example("error"));
    let id = Identity {
        version: VERSION,
        role: Role::Server,
    };
    assert_eq!(
        frame(cmd::REPLY_STORAGE, 0, &id.encode()),
        doc_example("identity")
    );
    let meta = BlockMeta {
        upload_id: *b"0123456789abcdef",
        index: 1,
        offset: 4 * 1024 * 1024,
        len: 3,
        crc32c: crc32c::crc32c(b"abc"),
    };
    let mut block = data_frame_head(cmd::UPLOAD_BLOCK, 0, &meta.encode(), 3);
    block.extend_from_slice(b"abc");
    assert_eq!(block, doc_example("block"));
}

#[test]
fn whole_stream_in_one_read() {
    let frames = sample_frames();
    let all: Vec<u8> = frames.concat();
    let got = decode_all(&mut Decoder::requests(), &all).unwrap();
    assert_eq!(got.len(), frames.len());
    for (f, (h, body)) in frames.iter().zip(&got) {
        assert_eq!(&Header::decode(f[..HEADER_LEN].try_into().unwrap()), h);
        assert_eq!(&f[HEADER_LEN..], &body[..]);
    }
}

#[test]
fn one_byte_at_a_time() {
    let all: Vec<u8> = sample_frames().concat();
    let expected = decode_all(&mut Decoder::requests(), &all).unwrap();
    let bytes: Vec<&[u8]> = all.chunks(1).collect();
    let mut dec = Decoder::requests();
    assert_eq!(decode_chunks(&mut dec, &bytes).unwrap(), expected);
    assert!(dec.is_idle());
}

#[test]
fn split_at_every_position() {
    let all: Vec<u8> = sample_frames().concat();
    let expected = decode_all(&mut Decoder::requests(), &all).unwrap();
    for cut in 0..=all.len() {
        let mut dec = Decoder::requests();
        let got = decode_chunks(&mut dec, &[&all[..cut], &all[cut..]]).unwrap();
        assert_eq!(got, expected, "split at {cut}");
        assert!(dec.is_idle());
    }
}

#[test]
fn oversized_body_is_refused_before_allocation() {
    // Claims an exabyte-long STAT; the decoder must refuse on the header alone.
    let h = Header::new(cmd::STAT, 0, u64::MAX / 2).encode();
    let err = Decoder::requests().decode(&h).unwrap_err();
    assert!(matches!(err, ProtoError::TooLarge { .. }), "{err}");
    assert_eq!(err.code(), ErrorCode::TooLarge);
    // A block payload over 64 MiB.
    let h = Header::new(cmd::UPLOAD_BLOCK, 0, BLOCK_META as u64 + BLOCK_MAX + 1).encode();
    assert!(matches!(
        Decoder::requests().decode(&h),
        Err(ProtoError::TooLarge { .. })
    ));
    // A HELLO longer than its maximum.
    let h = Header::new(cmd::HELLO, 0, HELLO_MAX as u64 + 1).encode();
    assert!(matches!(
        Decoder::requests().decode(&h),
        Err(ProtoError::TooLarge { .. })
    ));
}

#[test]
fn wrong_exact_length_unknown_command_and_status() {
    let h = Header::new(cmd::STAT, 0, 5).encode();
    assert!(matches!(
        Decoder::requests().decode(&h),
        Err(ProtoError::BadLength { .. })
    ));
    let h = Header::new(200, 0, 0).encode();
    assert_eq!(
        Decoder::requests().decode(&h).unwrap_err(),
        ProtoError::UnknownCommand(200)
    );
    let h = Header::new(cmd::PROBE, 7, 2).encode();
    assert_eq!(
        Decoder::requests().decode(&h).unwrap_err(),
        ProtoError::BadStatus(7)
    );
    // Requests never carry the error status.
    let h = Header::new(cmd::PROBE, status::ERROR, 2).encode();
    assert_eq!(
        Decoder::requests().decode(&h).unwrap_err(),
        ProtoError::BadStatus(1)
    );
    // A data frame shorter than its meta.
    let h = Header::new(cmd::UPLOAD_BLOCK, 0, 3).encode();
    assert!(matches!(
        Decoder::requests().decode(&h),
        Err(ProtoError::BadLength { .. })
    ));
}

#[test]
fn truncated_and_bad_fields() {
    let body = Hello::new("a", "b", b"xyz").encode().unwrap();
    for cut in 0..body.len() {
        assert!(Hello::decode(&body[..cut]).is_err(), "cut {cut}");
    }
    // Version mismatch is reported as such, before anything else.
    let mut other = body.clone();
    other[..2].copy_from_slice(&99u16.to_be_bytes());
    assert_eq!(Hello::decode(&other).unwrap_err(), ProtoError::Version(99));
    assert_eq!(ProtoError::Version(99).code(), ErrorCode::Version);
    // Non-UTF-8 app id.
    let mut bad = body.clone();
    bad[4] = 0xff;
    assert_eq!(
        Hello::decode(&bad).unwrap_err(),
        ProtoError::NotUtf8("app id")
    );
    // A NUL inside the user id, with bytes after it.
    let mut nul = body.clone();
    nul[4 + APP_ID_LEN + 1] = 0;
    nul[4 + APP_ID_LEN + 2] = b'x';
    assert_eq!(
        Hello::decode(&nul).unwrap_err(),
        ProtoError::NulInside("user id")
    );
    // Empty app id.
    let mut empty = body.clone();
    empty[4] = 0;
    assert_eq!(
        Hello::decode(&empty).unwrap_err(),
        ProtoError::Empty("app id")
    );
    // Credential length beyond the body.
    let mut long = body.clone();
    let at = 4 + APP_ID_LEN + USER_ID_LEN;
    long[at..at + 2].copy_from_slice(&600u16.to_be_bytes());
    assert!(Hello::decode(&long).is_err());
    // Control characters in a name.
    let mut meta = Vec::new();
    meta.extend_from_slice(&[0; 16 + 32]);
    put_fixed_str(&mut meta, "a\u{1}b", NAME_LEN, "name").unwrap();
    assert!(UploadMeta::decode(&meta).is_err());
    // Fields that do not fit are refused on encode.
    assert!(Hello::new(&"x".repeat(17), "u", b"").encode().is_err());
    assert!(Hello::new("a", "u", b"").for_file("").encode().is_err());
    assert!(
        Hello::new("a", "u", b"")
            .for_file(&"f".repeat(129))
            .encode()
            .is_err()
    );
    assert!(encode_file_id("a\0b").is_err());
}

#[test]
fn block_meta_must_match_payload_length() {
    let m = BlockMeta {
        upload_id: [1; 16],
        index: 0,
        offset: 0,
        len: 10,
        crc32c: 0,
    };
    assert!(BlockMeta::decode(&m.encode(), 10).is_ok());
    assert!(matches!(
        BlockMeta::decode(&m.encode(), 11),
        Err(ProtoError::BadLength { .. })
    ));
}

#[test]
fn upload_init_limits() {
    let init = |size, block_size| UploadInit {
        size,
        block_size,
        sha256: [0; 32],
        name: "n".into(),
    };
    assert_eq!(init(10 * 1024 * 1024, 4 * 1024 * 1024).blocks().unwrap(), 3);
    assert!(
        init(0, 4 << 20).blocks().is_err(),
        "a big file has at least one block"
    );
    assert!(init(1 << 30, 1024).blocks().is_err(), "block below 64 KiB");
    assert!(
        init(1 << 30, u32::MAX).blocks().is_err(),
        "block above 64 MiB"
    );
    assert!(
        init(u64::MAX, 64 << 20).blocks().is_err(),
        "too many blocks"
    );
    let enc = init(5 << 20, 1 << 20).encode().unwrap();
    assert_eq!(UploadInit::decode(&enc).unwrap(), init(5 << 20, 1 << 20));
}

#[test]
fn download_range_overflow_is_refused() {
    let req = DownloadReq {
        file_id: "f".into(),
        offset: u64::MAX - 1,
        len: 10,
    };
    assert!(DownloadReq::decode(&req.encode().unwrap()).is_err());
    let req = DownloadReq {
        file_id: "f".into(),
        offset: 0,
        len: BLOCK_MAX + 1,
    };
    assert!(DownloadReq::decode(&req.encode().unwrap()).is_err());
}

#[test]
fn breakpoint_bitmap() {
    let mut bp = Breakpoint::new(10);
    bp.set(0);
    bp.set(9);
    bp.set(99);
    assert_eq!(bp.count(), 2);
    assert_eq!(
        bp.missing().collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5, 6, 7, 8]
    );
    assert_eq!(Breakpoint::decode(&bp.encode()).unwrap(), bp);
    let mut huge = (BLOCKS_MAX + 1).to_be_bytes().to_vec();
    huge.push(0);
    assert!(Breakpoint::decode(&huge).is_err());
}

#[test]
fn error_text_is_bounded() {
    let e = ErrorBody::new(ErrorCode::Io, "é".repeat(1000));
    assert!(e.text.len() <= ERROR_TEXT_MAX);
    assert_eq!(ErrorBody::decode(&e.encode()).unwrap(), e);
    let mut long = 16u16.to_be_bytes().to_vec();
    long.extend(std::iter::repeat_n(b'a', ERROR_TEXT_MAX + 1));
    assert!(ErrorBody::decode(&long).is_err());
    assert!(ErrorBody::decode(&[0, 99]).is_err(), "unknown code");
}

#[test]
fn reply_decoder_accepts_error_frames() {
    fn spec(_: u8) -> Option<BodySpec> {
        Some(BodySpec {
            meta: DOWNLOAD_REPLY_META,
            exact: true,
            payload_max: BLOCK_MAX,
        })
    }
    let err = ErrorBody::new(ErrorCode::Range, "past the end").frame(cmd::REPLY_STORAGE);
    let got = decode_all(&mut Decoder::replies(spec), &err).unwrap();
    assert_eq!(got[0].0.status, status::ERROR);
    assert_eq!(ErrorBody::decode(&got[0].1).unwrap().code, ErrorCode::Range);
}

fn group_string() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[a-zA-Z0-9_-]{1,32}").unwrap()
}

fn id_string(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[a-zA-Z0-9_.é-]{{1,{}}}", max / 2)).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn hello_round_trip(app in id_string(APP_ID_LEN), user in id_string(USER_ID_LEN),
                        cred in proptest::collection::vec(any::<u8>(), 0..CREDENTIAL_MAX),
                        route in proptest::option::of(id_string(FILE_ID_LEN))) {
        let mut h = Hello::new(&app, &user, &cred);
        if let Some(id) = &route {
            h = h.for_file(id);
        }
        let body = h.encode().unwrap();
        prop_assert!(body.len() <= HELLO_MAX);
        prop_assert_eq!(Hello::decode(&body).unwrap(), h);
    }

    #[test]
    fn stat_round_trip(size in any::<u64>(), sha in any::<[u8; 32]>(), created in any::<u64>(),
                       bs in any::<u32>(), name in id_string(NAME_LEN)) {
        let s = StatReply { size, sha256: sha, created, block_size: bs, name };
        prop_assert_eq!(StatReply::decode(&s.encode().unwrap()).unwrap(), s);
    }

    #[test]
    fn block_round_trip(id in any::<[u8; 16]>(), index in any::<u32>(), offset in any::<u64>(),
                        data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let m = BlockMeta { upload_id: id, index, offset, len: data.len() as u32,
                            crc32c: crc32c::crc32c(&data) };
        let mut f = data_frame_head(cmd::UPLOAD_BLOCK, 0, &m.encode(), data.len() as u64);
        f.extend_from_slice(&data);
        let got = decode_all(&mut Decoder::requests(), &f).unwrap();
        prop_assert_eq!(got.len(), 1);
        let (meta, payload) = got[0].1.split_at(BLOCK_META);
        prop_assert_eq!(BlockMeta::decode(meta, payload.len() as u64).unwrap(), m);
        prop_assert_eq!(payload, &data[..]);
    }

    #[test]
    fn init_reply_round_trip(id in any::<[u8; 16]>(), bs in any::<u32>(), n in any::<u32>(),
                             ch in proptest::option::of((any::<u64>(), any::<u64>()))) {
        let r = UploadInitReply { upload_id: id, block_size: bs, blocks: n, challenge: ch };
        prop_assert_eq!(UploadInitReply::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn random_chunking_of_random_frames(seed in any::<u64>(), cuts in proptest::collection::vec(1usize..64, 1..40)) {
        let frames = sample_frames();
        let all: Vec<u8> = frames.concat();
        let mut dec = Decoder::requests();
        let mut pos = 0usize;
        let mut heads = 0;
        let mut i = 0usize;
        while pos < all.len() {
            let step = cuts[(i + seed as usize) % cuts.len()].min(all.len() - pos);
            i += 1;
            let mut input = &all[pos..pos + step];
            pos += step;
            while !input.is_empty() {
                let (n, item) = dec.decode(input).unwrap();
                input = &input[n..];
                if let Some(Decoded::Frame { .. }) = item { heads += 1; }
            }
        }
        prop_assert_eq!(heads, frames.len());
        prop_assert!(dec.is_idle());
    }

    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let mut dec = Decoder::requests();
        let mut input = &bytes[..];
        while !input.is_empty() {
            match dec.decode(input) {
                Ok((n, _)) => input = &input[n..],
                Err(_) => break,
            }
        }
        let _ = Hello::decode(&bytes);
        let _ = StatReply::decode(&bytes);
        let _ = UploadInit::decode(&bytes);
        let _ = Breakpoint::decode(&bytes);
        let _ = ErrorBody::decode(&bytes);
        let _ = DownloadReq::decode(&bytes);
    }
}

// ---- cluster frames (10-13, 40) ----

fn node(port: u16) -> NodeAddr {
    NodeAddr {
        host: "127.0.0.1".into(),
        port,
    }
}

fn sample_join() -> NodeHello {
    NodeHello {
        group: "g1".into(),
        host: "127.0.0.1".into(),
        port: 7401,
        version: VERSION,
        started: 1_700_000_000_000,
        free: 1 << 30,
        http: Some(node(7481)),
    }
}

fn sample_groups() -> GroupsReply {
    GroupsReply {
        stale: false,
        groups: vec![GroupView {
            name: "g1".into(),
            users: 3,
            nodes: vec![NodeView {
                addr: node(7401),
                online: true,
                started: 1_700_000_000_000,
                beat_age_ms: 1500,
                free: 1 << 30,
            }],
        }],
    }
}

#[test]
fn cluster_frames_match_the_doc() {
    let j = sample_join();
    assert_eq!(
        frame(cmd::TRACKER_JOIN, 0, &j.encode_join().unwrap()),
        doc_example("join")
    );
    assert_eq!(
        frame(cmd::TRACKER_BEAT, 0, &j.encode_beat().unwrap()),
        doc_example("beat")
    );
    let reply = BeatReply {
        interval_ms: 2000,
        gateways: vec![
            GatewayEntry {
                group: "g1".into(),
                addr: Some(node(7481)),
            },
            GatewayEntry {
                group: "g2".into(),
                addr: None,
            },
        ],
    };
    assert_eq!(
        frame(cmd::REPLY_TRACKER, 0, &reply.encode().unwrap()),
        doc_example("beat reply")
    );
    let req = SaddrsReq {
        app: "demo".into(),
        user: "alice".into(),
        file_id: String::new(),
    };
    assert_eq!(
        frame(cmd::TRACKER_SADDRS, 0, &req.encode().unwrap()),
        doc_example("saddrs")
    );
    let rep = SaddrsReply {
        group: "g1".into(),
        stale: false,
        nodes: vec![node(7401), node(7402)],
    };
    assert_eq!(
        frame(cmd::REPLY_TRACKER, 0, &rep.encode().unwrap()),
        doc_example("saddrs reply")
    );
    assert_eq!(
        ErrorBody::new(ErrorCode::NoNode, "group g2 has no online node").frame(cmd::REPLY_TRACKER),
        doc_example("no node")
    );
    assert_eq!(frame(cmd::TRACKER_GROUPS, 0, &[]), doc_example("groups"));
    assert_eq!(
        frame(cmd::REPLY_TRACKER, 0, &sample_groups().encode().unwrap()),
        doc_example("groups reply")
    );
    let users = UsersReq {
        group: "g1".into(),
        after: ("demo".into(), "alice".into()),
        limit: 2,
    };
    let users_reply = UsersReply {
        more: true,
        users: vec![("demo".into(), "bob".into())],
    };
    for (name, f) in [
        (
            "users",
            frame(cmd::TRACKER_USERS, 0, &users.encode().unwrap()),
        ),
        (
            "users reply",
            frame(cmd::REPLY_TRACKER, 0, &users_reply.encode().unwrap()),
        ),
    ] {
        assert_eq!(f, doc_example(name), "{name}");
    }
    // The documented frames also pass the request decoder and decode back to the values.
    for (name, c) in [
        ("join", cmd::TRACKER_JOIN),
        ("beat", cmd::TRACKER_BEAT),
        ("saddrs", cmd::TRACKER_SADDRS),
        ("groups", cmd::TRACKER_GROUPS),
        ("users", cmd::TRACKER_USERS),
    ] {
        let got = decode_all(&mut Decoder::requests(), &doc_example(name)).unwrap();
        assert_eq!(got.len(), 1, "{name}");
        assert_eq!(got[0].0.cmd, c, "{name}");
    }
    let body = &doc_example("groups reply")[HEADER_LEN..];
    assert_eq!(GroupsReply::decode(body).unwrap(), sample_groups());
}

#[test]
fn cluster_error_codes() {
    for (v, c) in [
        (21, ErrorCode::NotJoined),
        (22, ErrorCode::UnknownGroup),
        (23, ErrorCode::NoNode),
        (24, ErrorCode::Unavailable),
        (25, ErrorCode::Forbidden),
        (26, ErrorCode::Quota),
    ] {
        assert_eq!(ErrorCode::from_u16(v), Some(c));
        assert_eq!(c as u16, v);
    }
    assert_eq!(ErrorCode::from_u16(27), None);
    assert!(!ErrorCode::Forbidden.retryable());
    assert!(!ErrorCode::Quota.retryable());
    assert!(!ErrorCode::NotJoined.retryable());
    assert!(!ErrorCode::UnknownGroup.retryable());
    assert!(ErrorCode::NoNode.retryable());
    assert!(ErrorCode::Unavailable.retryable());
    // Framing errors and Auth end the session; nothing else does.
    for v in 1..=26 {
        let c = ErrorCode::from_u16(v).unwrap();
        assert_eq!(c.ends_session(), v <= 6, "{c:?}");
    }
    assert_eq!(cmd::name(cmd::TRACKER_USERS), "TRACKER_USERS");
    // seed 004's id server (ID_GET 40, its reply 101) is not part of the protocol.
    assert_eq!(cmd::name(40), "UNKNOWN");
    assert!(
        Decoder::requests()
            .decode(&Header::new(40, 0, 68).encode())
            .is_err()
    );
}

#[test]
fn cluster_request_lengths_are_exact() {
    for (c, len) in [
        (cmd::TRACKER_JOIN, JOIN_LEN),
        (cmd::TRACKER_BEAT, BEAT_LEN),
        (cmd::TRACKER_SADDRS, SADDRS_LEN),
        (cmd::TRACKER_GROUPS, 0),
        (cmd::TRACKER_USERS, USERS_LEN),
    ] {
        let h = Header::new(c, 0, len as u64 + 1).encode();
        assert!(Decoder::requests().decode(&h).is_err(), "{}", cmd::name(c));
        let h = Header::new(c, 0, u64::MAX).encode();
        assert!(Decoder::requests().decode(&h).is_err(), "{}", cmd::name(c));
    }
    assert_eq!(JOIN_V1_LEN, 116);
    assert_eq!(JOIN_LEN, 182);
    assert_eq!(BEAT_REPLY_MAX, 100_358);
    assert_eq!(BEAT_LEN, 114);
    assert_eq!(SADDRS_LEN, 400);
    assert_eq!(USERS_LEN, 306);
    assert_eq!(GROUPS_REPLY_MAX, 756_227);
}

#[test]
fn cluster_frames_truncated_anywhere_are_refused() {
    let j = sample_join();
    let join = j.encode_join().unwrap();
    let beat = j.encode_beat().unwrap();
    let groups = sample_groups().encode().unwrap();
    let saddrs = SaddrsReply {
        group: "g1".into(),
        stale: true,
        nodes: vec![node(1), node(2)],
    }
    .encode()
    .unwrap();
    for cut in 0..join.len() {
        let r = NodeHello::decode_join(&join[..cut]);
        if cut == JOIN_V1_LEN {
            // The JOIN of a node from before gateways.
            assert_eq!(
                r.unwrap(),
                NodeHello {
                    http: None,
                    ..j.clone()
                }
            );
        } else {
            assert!(r.is_err(), "join {cut}");
        }
    }
    // A gateway host without a port, or a port without a host.
    let mut no_port = join.clone();
    no_port[JOIN_LEN - 2..].fill(0);
    assert!(NodeHello::decode_join(&no_port).is_err());
    let mut no_host = join.clone();
    no_host[JOIN_V1_LEN..JOIN_LEN - 2].fill(0);
    assert!(NodeHello::decode_join(&no_host).is_err());
    let reply = BeatReply {
        interval_ms: 100,
        gateways: vec![GatewayEntry {
            group: "g1".into(),
            addr: Some(node(1)),
        }],
    }
    .encode()
    .unwrap();
    for cut in 0..reply.len() {
        let r = BeatReply::decode(&reply[..cut]);
        // 4 bytes: an interval without a list, as from a tracker before gateways.
        assert_eq!(r.is_ok(), cut == 4, "beat reply {cut}");
    }
    // A count over the cap, or over the bytes that follow, sizes nothing.
    let mut over = 100u32.to_be_bytes().to_vec();
    over.extend_from_slice(&(GATEWAYS_MAX as u16 + 1).to_be_bytes());
    assert!(BeatReply::decode(&over).is_err());
    let mut lying = 100u32.to_be_bytes().to_vec();
    lying.extend_from_slice(&(GATEWAYS_MAX as u16).to_be_bytes());
    assert!(BeatReply::decode(&lying).is_err());
    for cut in 0..beat.len() {
        assert!(NodeHello::decode_beat(&beat[..cut]).is_err(), "beat {cut}");
    }
    for cut in 0..groups.len() {
        assert!(GroupsReply::decode(&groups[..cut]).is_err(), "groups {cut}");
    }
    for cut in 0..saddrs.len() {
        assert!(SaddrsReply::decode(&saddrs[..cut]).is_err(), "saddrs {cut}");
    }
    // Trailing bytes are refused too.
    let mut long = groups.clone();
    long.push(0);
    assert!(GroupsReply::decode(&long).is_err());
    assert!(BeatReply::decode(&[0, 0, 0, 1, 0]).is_err());
}

#[test]
fn cluster_counts_larger_than_the_bytes() {
    // A SADDRS reply claiming 32 nodes with none following.
    let mut b = Vec::new();
    put_fixed_str(&mut b, "g1", GROUP_LEN, "group").unwrap();
    b.push(0);
    b.extend_from_slice(&32u16.to_be_bytes());
    assert_eq!(
        SaddrsReply::decode(&b).unwrap_err(),
        ProtoError::Truncated("node count")
    );
    // Over the cap.
    let at = GROUP_LEN + 1;
    b[at..at + 2].copy_from_slice(&33u16.to_be_bytes());
    b.extend(std::iter::repeat_n(0u8, 33 * 66));
    assert!(matches!(
        SaddrsReply::decode(&b),
        Err(ProtoError::Invalid { .. })
    ));
    // A GROUPS reply claiming 65535 groups in 3 bytes, and 257 groups.
    assert!(matches!(
        GroupsReply::decode(&[0, 0xff, 0xff]),
        Err(ProtoError::Invalid { .. })
    ));
    let mut g = vec![0u8];
    g.extend_from_slice(&200u16.to_be_bytes());
    assert_eq!(
        GroupsReply::decode(&g).unwrap_err(),
        ProtoError::Truncated("group count")
    );
    // A group claiming more nodes than follow.
    let mut one = sample_groups().encode().unwrap();
    let at = 3 + GROUP_LEN + 8;
    one[at..at + 2].copy_from_slice(&2u16.to_be_bytes());
    assert_eq!(
        GroupsReply::decode(&one).unwrap_err(),
        ProtoError::Truncated("node count")
    );
    // Encoders refuse lists over their caps.
    let many = SaddrsReply {
        group: "g".into(),
        stale: false,
        nodes: (1..=33).map(node).collect(),
    };
    assert!(many.encode().is_err());
    let groups = GroupsReply {
        stale: false,
        groups: (0..257)
            .map(|i| GroupView {
                name: format!("g{i}"),
                users: 0,
                nodes: vec![],
            })
            .collect(),
    };
    assert!(groups.encode().is_err());
}

#[test]
fn cluster_bad_fields() {
    let j = sample_join();
    // Group name too long, empty, or not UTF-8.
    let mut long = j.clone();
    long.group = "g".repeat(GROUP_LEN + 1);
    assert!(long.encode_join().is_err());
    let mut empty = j.clone();
    empty.group.clear();
    assert!(empty.encode_join().is_err());
    let mut body = j.encode_join().unwrap();
    body[0] = 0xff;
    assert_eq!(
        NodeHello::decode_join(&body).unwrap_err(),
        ProtoError::NotUtf8("group")
    );
    body[..2].copy_from_slice(&[0, 0]);
    assert_eq!(
        NodeHello::decode_join(&body).unwrap_err(),
        ProtoError::Empty("group")
    );
    // A host with characters no address has, and port 0.
    let mut body = j.encode_join().unwrap();
    body[GROUP_LEN] = b'/';
    assert!(NodeHello::decode_join(&body).is_err());
    let mut bad = j.clone();
    bad.host = "a b".into();
    assert!(bad.encode_join().is_err());
    let mut body = j.encode_beat().unwrap();
    body[GROUP_LEN + HOST_LEN..GROUP_LEN + HOST_LEN + 2].copy_from_slice(&[0, 0]);
    assert!(NodeHello::decode_beat(&body).is_err());
    // A stale flag other than 0/1.
    let mut s = SaddrsReply {
        group: "g1".into(),
        stale: false,
        nodes: vec![],
    }
    .encode()
    .unwrap();
    s[GROUP_LEN] = 2;
    assert!(SaddrsReply::decode(&s).is_err());
    // SADDRS needs app and user; the file id may be empty.
    let mut b = Vec::new();
    put_fixed_str(&mut b, "demo", APP_ID_LEN, "app").unwrap();
    b.extend(std::iter::repeat_n(0u8, USER_ID_LEN + FILE_ID_LEN));
    assert_eq!(
        SaddrsReq::decode(&b).unwrap_err(),
        ProtoError::Empty("user id")
    );
}

#[test]
fn cluster_reply_decoder_bounds() {
    let big = Header::new(cmd::REPLY_TRACKER, 0, GROUPS_REPLY_MAX as u64 + 1).encode();
    assert!(matches!(
        Decoder::replies(cluster_reply_spec).decode(&big),
        Err(ProtoError::TooLarge { .. })
    ));
    let reply = UsersReply {
        more: false,
        users: vec![("demo".into(), "ann".into())],
    };
    let f = frame(cmd::REPLY_TRACKER, 0, &reply.encode().unwrap());
    let got = decode_all(&mut Decoder::replies(cluster_reply_spec), &f).unwrap();
    assert_eq!(UsersReply::decode(&got[0].1).unwrap(), reply);
    // An id server's reply (101) is no cluster reply.
    let f = frame(101, 0, &[0; 12]);
    assert!(decode_all(&mut Decoder::replies(cluster_reply_spec), &f).is_err());
}

fn host_string() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[a-z0-9.:-]{1,64}").unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn join_beat_round_trip(group in group_string(), host in host_string(), port in 1u16..,
                            version in any::<u16>(), started in any::<u64>(), free in any::<u64>()) {
        let http = (port % 3 != 0).then(|| node(port / 2 + 1));
        let n = NodeHello { group, host, port, version, started, free, http };
        prop_assert_eq!(NodeHello::decode_join(&n.encode_join().unwrap()).unwrap(), n.clone());
        let beat = NodeHello::decode_beat(&n.encode_beat().unwrap()).unwrap();
        prop_assert_eq!(beat, NodeHello { version: 0, http: None, ..n });
    }

    #[test]
    fn saddrs_round_trip(app in id_string(APP_ID_LEN), user in id_string(USER_ID_LEN),
                         group in group_string(), stale in any::<bool>(),
                         ports in proptest::collection::vec(1u16.., 0..=NODES_MAX)) {
        let q = SaddrsReq { app, user, file_id: String::new() };
        prop_assert_eq!(SaddrsReq::decode(&q.encode().unwrap()).unwrap(), q);
        let r = SaddrsReply { group, stale, nodes: ports.into_iter().map(node).collect() };
        prop_assert_eq!(SaddrsReply::decode(&r.encode().unwrap()).unwrap(), r);
    }

    #[test]
    fn groups_round_trip(stale in any::<bool>(),
                         groups in proptest::collection::vec(
                             (group_string(), any::<u64>(),
                              proptest::collection::vec((1u16.., any::<bool>(), any::<u64>()), 0..5)),
                             0..8)) {
        let r = GroupsReply {
            stale,
            groups: groups.into_iter().map(|(name, users, nodes)| GroupView {
                name,
                users,
                nodes: nodes.into_iter().map(|(port, online, x)| NodeView {
                    addr: node(port), online, started: x, beat_age_ms: x / 3, free: !x,
                }).collect(),
            }).collect(),
        };
        prop_assert_eq!(GroupsReply::decode(&r.encode().unwrap()).unwrap(), r);
    }

    #[test]
    fn users_round_trip(group in group_string(), app in id_string(APP_ID_LEN),
                        user in id_string(USER_ID_LEN), limit in 1u16..=USERS_PAGE_MAX,
                        more in any::<bool>(),
                        users in proptest::collection::vec(
                            (id_string(APP_ID_LEN), id_string(USER_ID_LEN)), 0..20)) {
        let q = UsersReq { group, after: (app, user), limit };
        let body = q.encode().unwrap();
        prop_assert_eq!(body.len(), USERS_LEN);
        prop_assert_eq!(UsersReq::decode(&body).unwrap(), q);
        let r = UsersReply { more, users };
        let body = r.encode().unwrap();
        prop_assert!(body.len() <= USERS_REPLY_MAX);
        prop_assert_eq!(UsersReply::decode(&body).unwrap(), r);
    }

    #[test]
    fn cluster_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = NodeHello::decode_join(&bytes);
        let _ = NodeHello::decode_beat(&bytes);
        let _ = SaddrsReq::decode(&bytes);
        let _ = SaddrsReply::decode(&bytes);
        let _ = GroupsReply::decode(&bytes);
        let _ = UsersReq::decode(&bytes);
        let _ = UsersReply::decode(&bytes);
        let _ = BeatReply::decode(&bytes);
    }
}

#[test]
fn a_hello_route_is_flagged_and_checked() {
    let plain = Hello::new("a", "b", b"xyz").encode().unwrap();
    let routed = Hello::new("a", "b", b"xyz")
        .for_file("g1.00000000000000ff-abc")
        .encode()
        .unwrap();
    assert_eq!(&plain[2..4], &[0, 0]);
    assert_eq!(&routed[2..4], &HELLO_ROUTE.to_be_bytes());
    assert_eq!(routed.len(), plain.len() + FILE_ID_LEN);
    let h = Hello::decode(&routed).unwrap();
    assert_eq!(h.route.as_deref(), Some("g1.00000000000000ff-abc"));
    // The flag without the id, an id without the flag, an empty id, unknown flags.
    let mut no_id = plain.clone();
    no_id[2..4].copy_from_slice(&HELLO_ROUTE.to_be_bytes());
    assert!(Hello::decode(&no_id).is_err());
    let mut no_flag = routed.clone();
    no_flag[2..4].copy_from_slice(&[0, 0]);
    assert!(Hello::decode(&no_flag).is_err());
    let mut empty = plain.clone();
    empty[2..4].copy_from_slice(&HELLO_ROUTE.to_be_bytes());
    empty.extend_from_slice(&[0; FILE_ID_LEN]);
    assert_eq!(
        Hello::decode(&empty).unwrap_err(),
        ProtoError::Empty("route file id")
    );
    let mut unknown = plain.clone();
    unknown[2..4].copy_from_slice(&2u16.to_be_bytes());
    assert!(Hello::decode(&unknown).is_err());
}

#[test]
fn a_file_id_names_its_group_in_front_of_a_dot() {
    assert_eq!(
        file_group("g1.000000000000002a-abcdefghijklmnop"),
        Some("g1")
    );
    assert_eq!(file_group("group_B-2.x"), Some("group_B-2"));
    // A standalone server's ids, and ids from before groups were named in them.
    assert_eq!(file_group("000000000000002a-abcdefghijklmnop"), None);
    // Not a group name in front, or nothing after the dot.
    for id in [
        ".x",
        "g1.",
        "g 1.x",
        "g/1.x",
        &format!("{}.x", "g".repeat(33)),
    ] {
        assert_eq!(file_group(id), None, "{id}");
    }
    assert!(check_group("g1").is_ok());
    for bad in ["", "g.1", "g 1", "g/1", "gé", &"g".repeat(33)] {
        assert!(check_group(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn users_pages_are_bounded() {
    let q = |limit| UsersReq {
        group: "g1".into(),
        after: (String::new(), String::new()),
        limit,
    };
    assert!(q(0).encode().is_err());
    assert!(q(USERS_PAGE_MAX + 1).encode().is_err());
    let mut body = q(1).encode().unwrap();
    let n = body.len();
    body[n - 2..].copy_from_slice(&0u16.to_be_bytes());
    assert!(UsersReq::decode(&body).is_err(), "limit 0");
    // A reply whose count claims more users than it carries, or more than a page.
    let one = UsersReply {
        more: false,
        users: vec![("demo".into(), "ann".into())],
    };
    let mut b = one.encode().unwrap();
    b[1..3].copy_from_slice(&2u16.to_be_bytes());
    assert!(UsersReply::decode(&b).is_err());
    b[1..3].copy_from_slice(&(USERS_PAGE_MAX + 1).to_be_bytes());
    assert!(UsersReply::decode(&b).is_err());
    let too_many = UsersReply {
        more: true,
        users: vec![("a".into(), "u".into()); USERS_PAGE_MAX as usize + 1],
    };
    assert!(too_many.encode().is_err());
}
