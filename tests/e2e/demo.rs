//! `ferry demo` end to end: the real binary starts its cluster from a conf dir (here a copy of
//! conf/ moved to free ports), kills the primary server-proxy mid-upload, verifies the download,
//! and leaves no process behind; Ctrl-C stops everything it started.

use crate::support;
use support::procs;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{ChildStderr, Command, Stdio};
use std::time::{Duration, Instant};

const MEMBERS: [&str; 5] = [
    "server",
    "server-proxy-a",
    "server-proxy-b",
    "client-proxy-a",
    "client-proxy-b",
];

/// Copies conf/ to `dir` with every listen, upstream and stats address moved to a free port.
fn conf_on_free_ports(dir: &Path) -> Vec<SocketAddr> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf");
    let addrs: Vec<SocketAddr> = (0..5).map(|_| support::free_addr()).collect();
    let (server, sp) = (addrs[0], [addrs[1], addrs[2]]);
    std::fs::create_dir_all(dir).unwrap();
    for (i, name) in MEMBERS.iter().enumerate() {
        let text = std::fs::read_to_string(src.join(format!("{name}.toml"))).unwrap();
        let mut t: toml::Table = text.parse().unwrap();
        t.insert("listen".into(), addrs[i].to_string().into());
        let ups: Vec<String> = match i {
            0 => vec![],
            1 | 2 => vec![server.to_string()],
            _ => sp.iter().map(|a| a.to_string()).collect(),
        };
        if i == 0 {
            // The shipped HTTP port is fixed; tests running side by side must not share it.
            t.remove("http");
            support::auth::add_test_keys(&mut t);
        }
        if i > 0 {
            t.insert("upstreams".into(), ups.into());
            t.insert("check_interval_ms".into(), 200.into());
            if i >= 3 {
                t.insert(
                    "stats_listen".into(),
                    support::free_addr().to_string().into(),
                );
            } else {
                t.remove("stats_listen");
            }
        }
        std::fs::write(
            dir.join(format!("{name}.toml")),
            toml::to_string(&t).unwrap(),
        )
        .unwrap();
    }
    addrs
}

fn none_answer(addrs: &[SocketAddr]) -> bool {
    addrs
        .iter()
        .all(|a| support::probe(*a, Duration::from_millis(300)).is_none())
}

#[test]
fn demo_kills_a_proxy_mid_upload_and_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let conf = tmp.path().join("conf");
    let addrs = conf_on_free_ports(&conf);
    let out = Command::new(support::bin("ferry"))
        .env("FERRY_KEY", support::auth::key_env())
        .args(["--json", "demo", "--size", "48MiB", "--conf"])
        .arg(&conf)
        .arg("--data")
        .arg(tmp.path().join("data"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed: {stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let r = &v["report"];
    assert_eq!(r["verified"], true, "{v}");
    assert_eq!(r["size"], 48 << 20);
    assert!(stderr.contains("SIGKILL server-proxy-a"), "{stderr}");
    // Killing the primary server-proxy cost at most the blocks in flight (4 threads).
    assert!(r["upload"]["blocks_resent"].as_u64().unwrap() <= 4, "{v}");
    // The client-proxies noticed: sessions were cut or sent to the standby.
    let noticed = r["sessions_cut"].as_u64().unwrap() + r["proxy_failovers"].as_u64().unwrap();
    assert!(noticed > 0, "no proxy saw the kill: {v}");
    // The server kept the file under --data.
    assert!(tmp.path().join("data").exists());
    assert!(none_answer(&addrs), "demo left cluster processes running");
}

/// `ferry ARGS --conf DIR` (the demo, or `cluster up`) running on a copy of conf/ moved to
/// free ports.
struct Demo {
    run: support::Group,
    /// Its stderr, where it says what it does.
    err: BufReader<ChildStderr>,
    /// Where the members listen.
    addrs: Vec<SocketAddr>,
    _tmp: tempfile::TempDir,
}

fn demo(size: &str) -> Demo {
    local_cluster(&["demo", "--size", size])
}

/// `args` with the conf dir (and, for `cluster up`, its data dir) of a fresh temp dir.
fn local_cluster(args: &[&str]) -> Demo {
    let tmp = tempfile::tempdir().unwrap();
    let conf = tmp.path().join("conf");
    let addrs = conf_on_free_ports(&conf);
    let mut cmd = Command::new(support::bin("ferry"));
    cmd.env("FERRY_KEY", support::auth::key_env())
        .args(args)
        .arg("--conf")
        .arg(&conf);
    if args[0] == "cluster" {
        cmd.arg("--data").arg(tmp.path().join("data"));
    }
    let mut run = support::Group::spawn(cmd.stdout(Stdio::null()).stderr(Stdio::piped()));
    let err = BufReader::new(run.0.stderr.take().unwrap());
    Demo {
        run,
        err,
        addrs,
        _tmp: tmp,
    }
}

#[test]
fn ctrl_c_stops_every_process_the_demo_started() {
    let mut d = demo("4GiB");
    // Wait until the cluster is up and the demo is generating or uploading.
    support::wait_for_line(&mut d.err, "generating");
    assert!(!none_answer(&d.addrs[..1]), "the server should be up");
    let status = support::interrupt(&mut d.run.0);
    assert_eq!(status.code(), Some(130));
    assert!(none_answer(&d.addrs), "processes left after Ctrl-C");
}

/// `kill -9` of `ferry demo` mid-upload (no handler runs, nothing is stopped in order) leaves
/// no member running: each dies with its supervisor (parent-death signal), the one the demo's
/// killer thread restarted included.
#[test]
fn kill_9_of_the_demo_leaves_no_member_running() {
    let Demo {
        mut run,
        mut err,
        addrs,
        _tmp,
    } = demo("512MiB");
    // Past the kill and restart of the primary server-proxy: the restarted one is a member too.
    support::wait_for_line(&mut err, "restarting");
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    let t = Instant::now();
    let members = loop {
        let now = procs::Reap(procs::children_of(run.0.id()));
        if now.0.len() == MEMBERS.len() || t.elapsed() > Duration::from_secs(10) {
            break now;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(members.0.len(), MEMBERS.len(), "members {:?}", members.0);
    procs::kill9_outlived_by_none(&mut run.0, &members);
    assert!(none_answer(&addrs), "a member still answers");
}

#[test]
fn cluster_up_serves_transfers_until_ctrl_c() {
    let Demo {
        mut run,
        mut err,
        addrs,
        _tmp: tmp,
    } = local_cluster(&["cluster", "up"]);
    let child = &mut run.0;
    support::wait_for_line(&mut err, "Ctrl-C stops all");
    // Keep draining its log (prefixed by member) so it never blocks on a full pipe.
    let log = std::thread::spawn(move || {
        let mut all = String::new();
        let mut l = String::new();
        while err.read_line(&mut l).unwrap_or(0) > 0 {
            all.push_str(&l);
            l.clear();
        }
        all
    });
    // The members run on generated configs: private, with fresh secrets in place of every
    // placeholder, and a client config that holds the app key and the client-proxies.
    let generated = tmp.path().join("data").join("conf");
    for f in support::files_under(&generated) {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} is readable by others", f.display());
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(
            !text.contains("CHANGE-ME"),
            "{} keeps a placeholder",
            f.display()
        );
    }
    let client_conf = generated.join("client.toml");
    // The client leg runs on TLS with the cluster's local CA.
    let text = std::fs::read_to_string(&client_conf).unwrap();
    assert!(
        text.contains("\"tls://127.0.0.1:") && text.contains("ca = "),
        "{text}"
    );
    // A transfer through the client-proxy pair it started, with that client config alone (as
    // the README says), no key in the environment.
    let src = tmp.path().join("src");
    support::make_file(&src, 3 << 20, 5);
    let up = Command::new(support::bin("ferry"))
        .env_remove("FERRY_KEY")
        .env_remove("FERRY_PROXIES")
        .env("FERRY_STATE_DIR", tmp.path().join("state"))
        .arg("--config")
        .arg(&client_conf)
        .args(["upload", src.to_str().unwrap(), "--block-size", "1MiB"])
        .output()
        .unwrap();
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let id = String::from_utf8(up.stdout).unwrap().trim().to_owned();
    let out = tmp.path().join("out");
    let down = Command::new(support::bin("ferry"))
        .env_remove("FERRY_KEY")
        .env_remove("FERRY_PROXIES")
        .arg("--config")
        .arg(&client_conf)
        .args(["download", &id, "-o", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert_eq!(support::sha256_file(&out), support::sha256_file(&src));

    let status = support::interrupt(child);
    assert_eq!(status.code(), Some(130));
    assert!(none_answer(&addrs), "processes left after Ctrl-C");
    let log = log.join().unwrap();
    assert!(
        log.contains("[        server]"),
        "member logs are prefixed: {log}"
    );
}
