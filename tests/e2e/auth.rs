//! Authentication and authorization against the real `ferry-server` (issue 9): every request
//! command, opened with a missing, expired, tampered, wrong-key and other-tenant token, and a
//! server that takes linked peers only.

use crate::support;

use ferry_common::auth::{SigningKey, new_secret};
use ferry_common::clock::now_secs;
use ferry_common::proto::{
    self, BlockMeta, DownloadReq, ErrorCode, Hello, Prove, UploadInit, UploadInitReply, UploadMeta,
    cmd,
};
use ferry_common::token::{Claims, Delegation, Scope};
use ferry_server::access::{Need, need};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::time::Duration;
use support::auth::{KEY_ID, key};
use support::raw::{self, Raw};
use support::server::Server;

/// A `ferry-server` with `conf` (the test app keys added unless it has `[auth`) in a scratch
/// dir of its own.
fn server(conf: &str) -> Server {
    Server::scratch(conf)
}

/// What came back for a request.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Ok(Vec<u8>),
    Err(ErrorCode),
    /// The connection closed without (another) answer.
    Closed,
}

struct Conn(Raw);

impl Conn {
    fn open(addr: SocketAddr) -> Conn {
        let c = Raw::connect(addr);
        c.set_timeout(Duration::from_secs(10));
        Conn(c)
    }

    fn send(&mut self, frame: &[u8]) {
        // The peer may already have closed (after refusing an earlier frame).
        self.0.send_raw(frame);
    }

    fn recv(&mut self) -> Reply {
        match self.0.recv() {
            raw::Reply::Ok(_, body) => Reply::Ok(body),
            raw::Reply::Err(code, _) => Reply::Err(code),
            raw::Reply::Waiting | raw::Reply::Closed => Reply::Closed,
        }
    }

    fn call(&mut self, frame: &[u8]) -> Reply {
        self.send(frame);
        self.recv()
    }

    /// Sends `frame`, which must be refused: the error's code and text.
    fn refusal(&mut self, frame: &[u8]) -> (ErrorCode, String) {
        self.send(frame);
        match self.0.recv() {
            raw::Reply::Err(code, text) => (code, text),
            other => panic!("not refused: {other:?}"),
        }
    }

    /// A session of `app`/`user` with a fresh valid token.
    fn session(addr: SocketAddr, app: &str, user: &str) -> Conn {
        let mut c = Conn::open(addr);
        let r = c.call(&support::auth::hello_frame(app, user));
        assert!(matches!(r, Reply::Ok(_)), "HELLO as {app}/{user}: {r:?}");
        c
    }
}

fn hello_with(app: &str, user: &str, token: &[u8]) -> Vec<u8> {
    proto::frame(
        cmd::HELLO,
        0,
        &Hello::new(app, user, token).encode().unwrap(),
    )
}

/// The ways a credential can be bad, each a token for demo/alice (or none).
fn bad_tokens() -> Vec<(&'static str, Vec<u8>)> {
    let now = now_secs();
    let claims = |not_before: u64, expires: u64| Claims {
        key_id: KEY_ID.into(),
        app: "demo".into(),
        user: "alice".into(),
        scope: Scope::ALL,
        not_before,
        expires,
        nonce: rand::random(),
        delegation: None,
    };
    let expired = claims(now - 3600, now - 1800)
        .mint(support::auth::KEY_SECRET.as_bytes())
        .unwrap();
    // A valid token with one bit of its user id flipped ("alice" -> "alicd").
    let mut tampered = key().mint("demo", "alice", Scope::ALL, 300).unwrap();
    let at = tampered.windows(5).position(|w| w == b"alice").unwrap() + 4;
    tampered[at] ^= 1;
    let wrong_key = SigningKey {
        id: KEY_ID.into(),
        secret: new_secret(),
    }
    .mint("demo", "alice", Scope::ALL, 300)
    .unwrap();
    vec![
        ("missing", Vec::new()),
        ("expired", expired),
        ("tampered", tampered),
        ("wrong key", wrong_key),
    ]
}

/// What alice of demo has stored: a small file, and a big upload in progress.
struct Owned {
    file: String,
    upload: [u8; 16],
}

const SMALL: &[u8] = b"alice's private clip";

fn small_upload_frame(data: &[u8]) -> Vec<u8> {
    let meta = UploadMeta {
        key: rand::random(),
        sha256: Sha256::digest(data).into(),
        name: "clip.bin".into(),
    }
    .encode()
    .unwrap();
    let mut f = proto::data_frame_head(cmd::UPLOAD, 0, &meta, data.len() as u64);
    f.extend_from_slice(data);
    f
}

fn init_frame() -> Vec<u8> {
    let body = UploadInit {
        size: 256 * 1024,
        block_size: 128 * 1024,
        sha256: [7; 32],
        name: "big.bin".into(),
    }
    .encode()
    .unwrap();
    proto::frame(cmd::UPLOAD_INIT, 0, &body)
}

fn setup(addr: SocketAddr) -> Owned {
    let mut c = Conn::session(addr, "demo", "alice");
    let Reply::Ok(id) = c.call(&small_upload_frame(SMALL)) else {
        panic!("alice's upload failed");
    };
    let file = proto::decode_file_id(&id).unwrap();
    let Reply::Ok(r) = c.call(&init_frame()) else {
        panic!("alice's UPLOAD_INIT failed");
    };
    Owned {
        file,
        upload: UploadInitReply::decode(&r).unwrap().upload_id,
    }
}

/// A well-formed request of command `c` about alice's things.
fn request(c: u8, o: &Owned) -> Vec<u8> {
    let fid = || proto::encode_file_id(&o.file).unwrap();
    match c {
        cmd::UPLOAD => small_upload_frame(b"somebody else's bytes"),
        cmd::STAT | cmd::DELETE | cmd::DOWNLOAD_OVER => proto::frame(c, 0, &fid()),
        cmd::DOWNLOAD => {
            let body = DownloadReq {
                file_id: o.file.clone(),
                offset: 0,
                len: SMALL.len() as u64,
            }
            .encode()
            .unwrap();
            proto::frame(c, 0, &body)
        }
        cmd::UPLOAD_INIT => init_frame(),
        cmd::USAGE => proto::frame(c, 0, &[]),
        cmd::UPLOAD_QUERY | cmd::UPLOAD_OVER => proto::frame(c, 0, &o.upload),
        cmd::UPLOAD_BLOCK => {
            let data = vec![9u8; 128 * 1024];
            let meta = BlockMeta {
                upload_id: o.upload,
                index: 0,
                offset: 0,
                len: data.len() as u32,
                crc32c: crc32c::crc32c(&data),
            }
            .encode();
            let mut f = proto::data_frame_head(c, 0, &meta, data.len() as u64);
            f.extend_from_slice(&data);
            f
        }
        cmd::UPLOAD_PROVE => {
            let body = Prove {
                upload_id: o.upload,
                sha256: [7; 32],
            }
            .encode();
            proto::frame(c, 0, &body)
        }
        other => panic!("no request made for {}", cmd::name(other)),
    }
}

/// The need of wire number `c` (None: no request command).
fn need_of(c: u8) -> Option<Need> {
    proto::Command::from_u8(c).and_then(need)
}

/// Every command that needs a session (all the file commands).
fn file_commands() -> Vec<u8> {
    (0..=255u8)
        .filter(|&c| matches!(need_of(c), Some(Need::Session(_))))
        .collect()
}

/// Alice's things are untouched: the file reads back whole, the upload still answers.
fn intact(addr: SocketAddr, o: &Owned) {
    let mut c = Conn::session(addr, "demo", "alice");
    let r = c.call(&request(cmd::DOWNLOAD, o));
    let Reply::Ok(body) = r else {
        panic!("alice's file is gone: {r:?}");
    };
    assert!(body.ends_with(SMALL), "alice's file changed");
    assert!(matches!(
        c.call(&request(cmd::UPLOAD_QUERY, o)),
        Reply::Ok(_)
    ));
}

#[test]
fn every_file_command_with_every_bad_credential_is_refused_and_does_nothing() {
    let srv = server("");
    let addr = srv.addr;
    let owned = setup(addr);
    let commands = file_commands();
    assert_eq!(commands.len(), 11, "{commands:?}");
    let mut tried = 0;
    for &c in &commands {
        // No HELLO at all: error 5, then closed.
        let mut s = Conn::open(addr);
        assert_eq!(
            s.call(&request(c, &owned)),
            Reply::Err(ErrorCode::HelloRequired),
            "{} before HELLO",
            cmd::name(c)
        );
        assert_eq!(s.recv(), Reply::Closed);
        for (what, token) in bad_tokens() {
            // The command sent right behind the refused HELLO is never answered.
            let mut s = Conn::open(addr);
            let mut both = hello_with("demo", "alice", &token);
            both.extend_from_slice(&request(c, &owned));
            s.send(&both);
            assert_eq!(
                s.recv(),
                Reply::Err(ErrorCode::Auth),
                "{} with a {what} token",
                cmd::name(c)
            );
            assert_eq!(
                s.recv(),
                Reply::Closed,
                "{} ran after a {what} token",
                cmd::name(c)
            );
            tried += 1;
        }
        // Another tenant with a valid token of its own: alice's file and upload do not exist
        // for it, exactly as made-up ones do not.
        let mut other = Conn::session(addr, "other", "alice");
        let r = other.call(&request(c, &owned));
        let want = match c {
            cmd::UPLOAD | cmd::UPLOAD_INIT | cmd::USAGE => None,
            cmd::STAT | cmd::DOWNLOAD | cmd::DELETE | cmd::DOWNLOAD_OVER => {
                Some(ErrorCode::NotFound)
            }
            _ => Some(ErrorCode::UnknownUpload),
        };
        match want {
            // Creating is allowed, in its own space.
            None => assert!(matches!(r, Reply::Ok(_)), "{}: {r:?}", cmd::name(c)),
            Some(code) => assert_eq!(r, Reply::Err(code), "other tenant's {}", cmd::name(c)),
        }
        tried += 1;
        intact(addr, &owned);
    }
    eprintln!("{tried} command x credential cases refused, alice's data intact after each");
}

#[test]
fn a_replayed_token_and_a_token_without_the_scope_are_refused() {
    let srv = server("");
    let addr = srv.addr;
    let owned = setup(addr);
    // The same HELLO bytes twice (a captured session opening, replayed).
    let hello = support::auth::hello_frame("demo", "alice");
    assert!(matches!(Conn::open(addr).call(&hello), Reply::Ok(_)));
    assert_eq!(Conn::open(addr).call(&hello), Reply::Err(ErrorCode::Auth));
    // A read-only token reads but cannot write or delete; the refusal closes the session.
    for c in file_commands() {
        // Each connection needs its own token: one per HELLO.
        let mut s = Conn::open(addr);
        let t = key().mint("demo", "alice", Scope::READ, 300).unwrap();
        assert!(matches!(
            s.call(&hello_with("demo", "alice", &t)),
            Reply::Ok(_)
        ));
        let r = s.call(&request(c, &owned));
        match need_of(c) {
            Some(Need::Session(Scope::READ)) => {
                assert!(matches!(r, Reply::Ok(_)), "{}: {r:?}", cmd::name(c))
            }
            _ => {
                assert_eq!(r, Reply::Err(ErrorCode::Auth), "{}", cmd::name(c));
                assert_eq!(s.recv(), Reply::Closed);
            }
        }
    }
    intact(addr, &owned);
    // The HELLO's own app/user fields cannot pick another identity than its token's.
    let t = key().mint("demo", "mallory", Scope::ALL, 300).unwrap();
    assert_eq!(
        Conn::open(addr).call(&hello_with("demo", "alice", &t)),
        Reply::Err(ErrorCode::Auth)
    );
}

/// The link keys a [`linked_server`] accepts, with what `[link.members]` makes them: a relay
/// (`cp`), a router (`sp`), a storage node bound to group g1 at 127.0.0.1:7401 (`node-a`, the
/// address `support::control_plane_attempts` claims) and an admin tool (`admin`).
struct LinkKeys {
    cp: SigningKey,
    sp: SigningKey,
    node: SigningKey,
    admin: SigningKey,
}

/// A server with the storage, tracker and id roles (tracker group `g1`) that takes linked
/// peers only.
fn linked_server(dir: &std::path::Path) -> (support::Proc, SocketAddr, LinkKeys) {
    let addr = support::free_addr();
    let k = |id: &str| SigningKey {
        id: id.into(),
        secret: new_secret(),
    };
    let keys = LinkKeys {
        cp: k("cp"),
        sp: k("sp"),
        node: k("node-a"),
        admin: k("admin"),
    };
    let conf = format!(
        "roles = [\"storage\", \"tracker\"]\n[tracker]\ngroups = [\"g1\"]\n\
         [link.accept]\ncp = \"{}\"\nsp = \"{}\"\nnode-a = \"{}\"\nadmin = \"{}\"\n\
         [link.members]\nsp = {{ kind = \"router\" }}\nadmin = {{ kind = \"admin\" }}\n\
         node-a = {{ kind = \"node\", group = \"g1\", addr = \"127.0.0.1:7401\" }}\n",
        keys.cp.secret, keys.sp.secret, keys.node.secret, keys.admin.secret
    );
    let srv = support::start_server(dir, "ferry-server", &conf, addr, &dir.join("d"));
    (srv, addr, keys)
}

/// One frame on a fresh connection opened with `key`'s LINK proof.
fn as_member(addr: SocketAddr, key: &SigningKey, frame: &[u8]) -> (Reply, Conn) {
    let mut c = Conn::open(addr);
    c.send(&key.link_frame());
    let r = c.call(frame);
    (r, c)
}

/// The tracker's view, read with the admin key.
fn view(addr: SocketAddr, keys: &LinkKeys) -> proto::GroupsReply {
    match as_member(
        addr,
        &keys.admin,
        &proto::frame(cmd::TRACKER_GROUPS, 0, &[]),
    )
    .0
    {
        Reply::Ok(b) => proto::GroupsReply::decode(&b).unwrap(),
        other => panic!("GROUPS with the admin key: {other:?}"),
    }
}

#[test]
fn a_server_taking_linked_peers_only_refuses_direct_clients() {
    let dir = tempfile::tempdir().unwrap();
    let (_srv, addr, keys) = linked_server(dir.path());
    let link = keys.sp;
    // Every command but PROBE and LINK, sent first by a client with no link proof: error 6.
    let mut refused = Vec::new();
    for c in (0..=255u8).filter(|&c| need_of(c).is_some()) {
        if matches!(need_of(c), Some(Need::Nothing)) {
            continue;
        }
        let frame = match c {
            cmd::HELLO => support::auth::hello_frame("demo", "alice"),
            _ => proto::frame(c, 0, &vec![0u8; proto::request_spec(c).unwrap().meta]),
        };
        let mut s = Conn::open(addr);
        assert_eq!(
            s.call(&frame),
            Reply::Err(ErrorCode::Auth),
            "{} without a link proof",
            cmd::name(c)
        );
        assert_eq!(s.recv(), Reply::Closed);
        refused.push(cmd::name(c));
    }
    eprintln!("refused without a link proof: {refused:?}");
    assert!(refused.contains(&"TRACKER_GROUPS") && refused.contains(&"HELLO"));
    // PROBE needs nothing.
    let probe = proto::frame(cmd::PROBE, 0, &proto::probe_body());
    assert!(matches!(Conn::open(addr).call(&probe), Reply::Ok(_)));
    // A proxy with the key: LINK (no reply), then a session that works.
    let mut s = Conn::open(addr);
    s.send(&link.link_frame());
    assert!(matches!(
        s.call(&support::auth::hello_frame("demo", "alice")),
        Reply::Ok(_)
    ));
    assert!(matches!(
        s.call(&small_upload_frame(b"via a proxy")),
        Reply::Ok(_)
    ));
    // A replayed proof, a proof from a wrong key, a second LINK: refused and closed.
    let proof = link.link_frame();
    let mut first = Conn::open(addr);
    first.send(&proof);
    assert!(matches!(first.call(&probe), Reply::Ok(_)));
    let wrong = SigningKey {
        id: "sp".into(),
        secret: new_secret(),
    }
    .link_frame();
    for (what, frames) in [
        ("replayed", vec![proof.clone()]),
        ("wrong key", vec![wrong]),
        ("second", vec![link.link_frame(), link.link_frame()]),
    ] {
        let mut s = Conn::open(addr);
        let mut bytes: Vec<u8> = frames.concat();
        bytes.extend_from_slice(&support::auth::hello_frame("demo", "alice"));
        s.send(&bytes);
        let r = s.recv();
        assert!(
            matches!(r, Reply::Err(ErrorCode::Auth | ErrorCode::BadFrame)),
            "{what} LINK: {r:?}"
        );
        assert_eq!(s.recv(), Reply::Closed, "{what} LINK");
    }
}

/// A user's session reaches the server through linked proxies, so the connection carries the
/// server-proxy's LINK; after the user's HELLO it may send file commands only. With every scope,
/// JOIN, BEAT, SADDRS, GROUPS and USERS are error 6 and close the connection, and the cluster
/// is as it was: the same tracker view.
#[test]
fn a_users_session_cannot_reach_the_control_plane() {
    let dir = tempfile::tempdir().unwrap();
    let (_srv, addr, keys) = linked_server(dir.path());
    let link = &keys.sp;
    let view_before = view(addr, &keys);
    let attempts = support::control_plane_attempts("demo");
    for scope in [Scope::READ, Scope::WRITE, Scope::DELETE, Scope::ALL] {
        for frame in &attempts {
            let what = format!("{} with scope {scope:?}", cmd::name(frame[8]));
            let mut c = Conn::open(addr);
            c.send(&link.link_frame());
            let token = key().mint("demo", "mallory", scope, 300).unwrap();
            let r = c.call(&hello_with("demo", "mallory", &token));
            assert!(matches!(r, Reply::Ok(_)), "HELLO for {what}: {r:?}");
            assert_eq!(c.call(frame), Reply::Err(ErrorCode::Auth), "{what}");
            assert_eq!(c.recv(), Reply::Closed, "{what}");
        }
    }
    assert_eq!(view(addr, &keys), view_before, "the tracker's view changed");
    assert!(view_before.groups[0].nodes.is_empty());
}

/// Each member kind's key, on its own connection, may send its own commands only: a relay
/// HELLO, a router HELLO and SADDRS, a node JOIN and BEAT, an admin GROUPS and USERS; anything
/// else is error 6 and a closed connection. A node's key joins and beats only for the group and
/// address it is bound to: another group, another host or port is refused and the view stays.
#[test]
fn each_member_key_sends_only_its_kinds_commands_and_a_node_only_its_own_place() {
    let dir = tempfile::tempdir().unwrap();
    let (_srv, addr, keys) = linked_server(dir.path());
    let attempts = support::control_plane_attempts("demo");
    let mut frames: Vec<Vec<u8>> = vec![support::auth::hello_frame("demo", "alice")];
    frames.extend(attempts.iter().cloned());
    // The node first: its JOIN gives the router's SADDRS a node to answer with.
    let table: [(&SigningKey, &[u8]); 4] = [
        (&keys.node, &[cmd::TRACKER_JOIN, cmd::TRACKER_BEAT]),
        (&keys.cp, &[cmd::HELLO]),
        (&keys.sp, &[cmd::HELLO, cmd::TRACKER_SADDRS]),
        (&keys.admin, &[cmd::TRACKER_GROUPS, cmd::TRACKER_USERS]),
    ];
    for (key, may) in table {
        for frame in &frames {
            let c = frame[8];
            let what = format!("{} with key {}", cmd::name(c), key.id);
            let frame = if c == cmd::HELLO {
                support::auth::hello_frame("demo", "alice")
            } else {
                frame.clone()
            };
            let (r, mut conn) = as_member(addr, key, &frame);
            if may.contains(&c) {
                assert!(matches!(r, Reply::Ok(_)), "{what}: {r:?}");
            } else {
                assert_eq!(r, Reply::Err(ErrorCode::Auth), "{what}");
                assert_eq!(conn.recv(), Reply::Closed, "{what}");
            }
        }
    }
    // The node joined above, at its own place.
    let joined = view(addr, &keys);
    let g1 = joined.groups.iter().find(|g| g.name == "g1").unwrap();
    assert_eq!(g1.nodes.len(), 1, "{joined:?}");
    assert_eq!(
        (g1.nodes[0].addr.host.as_str(), g1.nodes[0].addr.port),
        ("127.0.0.1", 7401)
    );
    let node = |group: &str, host: &str, port: u16| proto::NodeHello {
        group: group.into(),
        host: host.into(),
        port,
        version: proto::VERSION,
        started: 1,
        free: 1 << 40,
        http: None,
    };
    for n in [
        node("g2", "127.0.0.1", 7401),
        node("g1", "127.0.0.1", 7402),
        node("g1", "127.0.0.9", 7401),
    ] {
        for frame in [
            proto::frame(cmd::TRACKER_JOIN, 0, &n.encode_join().unwrap()),
            proto::frame(cmd::TRACKER_BEAT, 0, &n.encode_beat().unwrap()),
        ] {
            let what = format!("{} for {n:?}", cmd::name(frame[8]));
            let (r, mut conn) = as_member(addr, &keys.node, &frame);
            assert_eq!(r, Reply::Err(ErrorCode::Auth), "{what}");
            assert_eq!(conn.recv(), Reply::Closed, "{what}");
        }
    }
    assert_eq!(
        places(&view(addr, &keys)),
        places(&joined),
        "a refused JOIN or BEAT changed the view"
    );
}

/// The nodes of a view by group and address (what a JOIN registers; beat ages always move).
fn places(v: &proto::GroupsReply) -> Vec<(String, String, u16)> {
    v.groups
        .iter()
        .flat_map(|g| {
            g.nodes
                .iter()
                .map(|n| (g.name.clone(), n.addr.host.clone(), n.addr.port))
        })
        .collect()
}

#[test]
fn placeholder_secrets_and_missing_keys_stop_the_binaries_with_the_way_out() {
    let dir = tempfile::tempdir().unwrap();
    // The shipped server config, as is: its secrets are placeholders.
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/server.toml");
    let out = std::process::Command::new(support::bin("ferry-server"))
        .arg("--config")
        .arg(&shipped)
        .arg("--listen")
        .arg(support::free_addr().to_string())
        .arg("--data")
        .arg(dir.path().join("d"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with placeholder secrets");
    assert!(
        err.contains("placeholder") && err.contains("ferry keygen"),
        "{err}"
    );
    assert!(
        !dir.path().join("d").exists(),
        "it created its data dir before refusing"
    );
    // The client: no key, a malformed one, a placeholder one. Each is refused before connecting
    // (the address is a closed port), naming where the key comes from.
    let state = dir.path().join("state");
    let nowhere = support::free_addr();
    for (key, want) in [
        (None, "FERRY_KEY"),
        (Some("no-colon"), "FERRY_KEY"),
        (
            Some("k1:example-CHANGE-ME-0123456789abcdef0123"),
            "ferry keygen",
        ),
    ] {
        let mut cmd = support::cli::ferry(&state, &[nowhere], &["stat", "1-x"]);
        match key {
            Some(k) => cmd.env("FERRY_KEY", k),
            None => cmd.env_remove("FERRY_KEY"),
        };
        let r = support::cli::run(cmd);
        assert!(!r.ok && r.stderr.contains(want), "{key:?}: {}", r.stderr);
        assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    }
}

/// Delegated tokens at the server itself (the client checks the same things first, so only raw
/// frames reach these paths): reusable for many sessions; every flipped byte refused; a read
/// share names its file only and cannot write; an upload over the token's limit is refused
/// with the payload drained and the session going on; the session ends when the token does.
#[test]
fn delegated_tokens_are_reusable_within_their_limits_and_end_with_their_expiry() {
    // Little clock skew allowed, so expiry shows within the test.
    let conf = format!("[auth]\nskew_secs = 1\n{}", support::auth::auth_toml());
    let srv = server(&conf);
    let addr = srv.addr;
    let owned = setup(addr);
    let delegate = |scope: Scope, ttl: u64, limits: Delegation| {
        key().delegate("demo", "bob", scope, ttl, limits).unwrap()
    };
    let stat = |id: &str| proto::frame(cmd::STAT, 0, &proto::encode_file_id(id).unwrap());
    // One token, many sessions: each reads alice's file (the id is the capability).
    let reader = delegate(Scope::READ, 300, Delegation::default());
    for _ in 0..5 {
        let mut s = Conn::open(addr);
        assert!(matches!(
            s.call(&hello_with("demo", "bob", &reader)),
            Reply::Ok(_)
        ));
        assert!(matches!(s.call(&stat(&owned.file)), Reply::Ok(_)));
    }
    // Every flipped byte: refused, and the session closed.
    for i in 0..reader.len() {
        let mut bad = reader.clone();
        bad[i] ^= 0x01;
        let mut s = Conn::open(addr);
        assert_eq!(
            s.call(&hello_with("demo", "bob", &bad)),
            Reply::Err(ErrorCode::Auth),
            "byte {i} flipped"
        );
        assert_eq!(s.recv(), Reply::Closed);
    }
    // A read share: its file only (error 25, the session goes on), never a write.
    let share = Delegation {
        max_upload: 0,
        file: Some(owned.file.clone()),
    };
    let mut s = Conn::open(addr);
    let t = delegate(Scope::READ, 300, share.clone());
    assert!(matches!(
        s.call(&hello_with("demo", "bob", &t)),
        Reply::Ok(_)
    ));
    assert_eq!(
        s.call(&stat("0000000000000001-aaaaaaaaaaaaaaaa")),
        Reply::Err(ErrorCode::Forbidden)
    );
    assert!(matches!(
        s.call(&request(cmd::DOWNLOAD, &owned)),
        Reply::Ok(_)
    ));
    let rw = delegate(Scope(Scope::READ.0 | Scope::WRITE.0), 300, share);
    assert_eq!(
        Conn::open(addr).call(&hello_with("demo", "bob", &rw)),
        Reply::Err(ErrorCode::Auth)
    );
    // An upload limit below the file: error 25 for a small upload (its payload drained, so
    // the next request is understood) and for UPLOAD_INIT; within it, stored.
    let capped = delegate(
        Scope::WRITE,
        300,
        Delegation {
            max_upload: 10,
            file: None,
        },
    );
    let mut s = Conn::open(addr);
    assert!(matches!(
        s.call(&hello_with("demo", "bob", &capped)),
        Reply::Ok(_)
    ));
    assert_eq!(
        s.call(&small_upload_frame(SMALL)),
        Reply::Err(ErrorCode::Forbidden)
    );
    assert_eq!(s.call(&init_frame()), Reply::Err(ErrorCode::Forbidden));
    assert!(matches!(s.call(&small_upload_frame(b"tiny")), Reply::Ok(_)));
    // A token that expires while its session is open: refused from then on (error 6, closed).
    let brief = delegate(Scope::READ, 2, Delegation::default());
    let mut s = Conn::open(addr);
    assert!(matches!(
        s.call(&hello_with("demo", "bob", &brief)),
        Reply::Ok(_)
    ));
    assert!(matches!(s.call(&stat(&owned.file)), Reply::Ok(_)));
    std::thread::sleep(Duration::from_millis(4200));
    assert_eq!(s.call(&stat(&owned.file)), Reply::Err(ErrorCode::Auth));
    assert_eq!(s.recv(), Reply::Closed);
    assert_eq!(
        Conn::open(addr).call(&hello_with("demo", "bob", &brief)),
        Reply::Err(ErrorCode::Auth),
        "an expired token opens no session"
    );
    intact(addr, &owned);
}

/// An app whose files are their owners' to read (`[apps.APP] reads = "owner"`): another user's
/// STAT and DOWNLOAD get exactly what a missing file gets; the owner, a token with the admin
/// scope and a read share of that file still read it; other apps keep capability reads.
#[test]
fn owner_only_reads_hide_other_users_files() {
    let conf = "[apps.demo]\nreads = \"owner\"\n";
    let srv = server(conf);
    let addr = srv.addr;
    let owned = setup(addr);
    let stat = |id: &str| proto::frame(cmd::STAT, 0, &proto::encode_file_id(id).unwrap());
    let made_up = "0000000000000001-aaaaaaaaaaaaaaaa";
    let mut bob = Conn::session(addr, "demo", "bob");
    let (code, text) = bob.refusal(&stat(&owned.file));
    let (missing_code, missing_text) = bob.refusal(&stat(made_up));
    assert_eq!(code, ErrorCode::NotFound);
    assert_eq!(
        (code, text.replace(&owned.file, "ID")),
        (missing_code, missing_text.replace(made_up, "ID"))
    );
    assert_eq!(
        bob.call(&request(cmd::DOWNLOAD, &owned)),
        Reply::Err(ErrorCode::NotFound)
    );
    // The owner, an admin token and a read share of the file read it.
    let mut alice = Conn::session(addr, "demo", "alice");
    assert!(matches!(alice.call(&stat(&owned.file)), Reply::Ok(_)));
    let admin = key()
        .mint(
            "demo",
            "mod",
            Scope(Scope::READ.0 | Scope::DELETE.0 | Scope::ADMIN.0),
            300,
        )
        .unwrap();
    let mut m = Conn::open(addr);
    assert!(matches!(
        m.call(&hello_with("demo", "mod", &admin)),
        Reply::Ok(_)
    ));
    assert!(matches!(m.call(&stat(&owned.file)), Reply::Ok(_)));
    let share = key()
        .delegate(
            "demo",
            "bob",
            Scope::READ,
            300,
            Delegation {
                max_upload: 0,
                file: Some(owned.file.clone()),
            },
        )
        .unwrap();
    let mut s = Conn::open(addr);
    assert!(matches!(
        s.call(&hello_with("demo", "bob", &share)),
        Reply::Ok(_)
    ));
    assert!(matches!(
        s.call(&request(cmd::DOWNLOAD, &owned)),
        Reply::Ok(_)
    ));
    // Another app without the policy: capability reads as before.
    let mut o = Conn::session(addr, "other", "ann");
    let Reply::Ok(id) = o.call(&small_upload_frame(b"other app's file")) else {
        panic!("upload in app other");
    };
    let id = proto::decode_file_id(&id).unwrap();
    let mut o2 = Conn::session(addr, "other", "ben");
    assert!(matches!(o2.call(&stat(&id)), Reply::Ok(_)));
}

/// Per-user quotas of an app (`[apps.APP] max_stored_bytes`, `max_files`): an upload one byte
/// over is refused when it starts (error 26, naming the quota; the session goes on, nothing is
/// stored), whether small or in blocks; every user has their own; deleting frees room.
#[test]
fn quotas_refuse_the_upload_one_byte_over_and_every_user_has_their_own() {
    let conf = "[apps.demo]\nmax_stored_bytes = 300000\n[apps.other]\nmax_files = 2\n";
    let srv = server(conf);
    let addr = srv.addr;
    let upload = |c: &mut Conn, len: usize, seed: u8| c.call(&small_upload_frame(&vec![seed; len]));
    let init = |size: u64| {
        let body = UploadInit {
            size,
            block_size: 128 * 1024,
            sha256: [size as u8; 32],
            name: "big.bin".into(),
        }
        .encode()
        .unwrap();
        proto::frame(cmd::UPLOAD_INIT, 0, &body)
    };
    let mut alice = Conn::session(addr, "demo", "alice");
    let Reply::Ok(first) = upload(&mut alice, 100_000, 1) else {
        panic!("first upload refused");
    };
    // 200,000 more would be exactly the quota: a block upload may open for it, one byte more
    // may not, nor a small upload one byte over.
    assert!(matches!(alice.call(&init(200_000)), Reply::Ok(_)));
    assert_eq!(alice.call(&init(200_001)), Reply::Err(ErrorCode::Quota));
    let (code, text) = alice.refusal(&small_upload_frame(&vec![2; 200_001]));
    assert_eq!(code, ErrorCode::Quota);
    assert!(
        text.contains("max_stored_bytes") && text.contains("by 1"),
        "{}",
        text
    );
    // The session goes on: exactly the quota is stored.
    assert!(matches!(upload(&mut alice, 200_000, 3), Reply::Ok(_)));
    assert_eq!(upload(&mut alice, 1, 4), Reply::Err(ErrorCode::Quota));
    // Bob has a quota of his own.
    let mut bob = Conn::session(addr, "demo", "bob");
    assert!(matches!(upload(&mut bob, 300_000, 5), Reply::Ok(_)));
    // Deleting makes room again.
    let first = proto::decode_file_id(&first).unwrap();
    let del = proto::frame(cmd::DELETE, 0, &proto::encode_file_id(&first).unwrap());
    assert!(matches!(alice.call(&del), Reply::Ok(_)));
    assert!(matches!(upload(&mut alice, 1, 4), Reply::Ok(_)));
    // A file-count quota.
    let mut ann = Conn::session(addr, "other", "ann");
    assert!(matches!(upload(&mut ann, 10, 6), Reply::Ok(_)));
    assert!(matches!(upload(&mut ann, 10, 7), Reply::Ok(_)));
    assert_eq!(upload(&mut ann, 10, 8), Reply::Err(ErrorCode::Quota));
    // A repeat of a stored upload (same key) is its id again, not a new file, even with the
    // quota full.
    let same = small_upload_frame(b"same bytes, same key");
    let mut ben = Conn::session(addr, "other", "ben");
    assert!(matches!(upload(&mut ben, 10, 9), Reply::Ok(_)));
    let Reply::Ok(a) = ben.call(&same) else {
        panic!("ben's second file refused")
    };
    let Reply::Ok(b) = ben.call(&same) else {
        panic!("a repeated upload counted against the quota")
    };
    assert_eq!(a, b);
}
