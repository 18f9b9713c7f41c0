//! `cargo bench --bench http`: the HTTP streaming gateway next to nginx (sendfile on), both
//! serving the same bytes over loopback in the same run.
//!
//! - one big file (default 1 GiB, `FERRY_BENCH_MB`): MB/s of a whole-file GET with curl, one
//!   connection;
//! - many small files (default 1000 x 64 KiB, `FERRY_BENCH_SMALL`): requests/s with wrk
//!   (`-t2 -c16`, keep-alive, a Lua script cycling through every file), `FERRY_BENCH_SECS` per run.
//!
//! Every measurement runs `FERRY_BENCH_RUNS` times (default 5), alternating ferry and nginx, and
//! prints median and min-max. For the small files it also prints each server's CPU time per
//! request (all its threads and processes, from /proc): on a loaded machine requests/s mostly
//! says which server got more CPU, CPU per request says which one needs less. `FERRY_BENCH_WORKERS` sets the server's worker threads (default 4).
//! ferry's URLs are signed (the signature is checked on every request);
//! nginx serves plain paths. Tools come from Debian packages (curl, wrk, nginx); a missing one
//! skips its part with a message, so CI does not need them.

#[path = "../e2e/support/mod.rs"]
mod support;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use support::{env_u64, free_addr, median, random_bytes, rss_kib};

const APP: &str = "bench";
const SECRET: &str = "bench-url-secret-0123456789abcdef-0123456789";

fn have(tool: &str) -> bool {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        println!("SKIPPED part: {tool} is not installed (apt-get install {tool})");
    }
    ok
}

struct Kill(Child);

/// SIGTERM first, SIGKILL after 5 s: nginx's master stops its workers on SIGTERM, while a
/// SIGKILLed master leaves them running (orphans holding the port and taking CPU from later runs).
impl Drop for Kill {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_port(addr: SocketAddr) {
    let t = Instant::now();
    while TcpStream::connect(addr).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{addr} never came up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Uploads with the real client (4 processes at a time), returning the file ids in order.
fn upload_all(addr: SocketAddr, paths: &[PathBuf], state: &Path) -> Vec<String> {
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let mine: Vec<(usize, PathBuf)> = paths
                .iter()
                .cloned()
                .enumerate()
                .filter(|(i, _)| i % 4 == t)
                .collect();
            let state = state.to_owned();
            std::thread::spawn(move || {
                mine.into_iter()
                    .map(|(i, p)| {
                        let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
                            .args(["--proxy", &addr.to_string(), "--app", APP, "upload"])
                            .arg(&p)
                            .env("FERRY_STATE_DIR", &state)
                            .env("FERRY_KEY", support::auth::key_env())
                            .output()
                            .unwrap();
                        assert!(
                            out.status.success(),
                            "upload of {} failed: {}",
                            p.display(),
                            String::from_utf8_lossy(&out.stderr)
                        );
                        (i, String::from_utf8(out.stdout).unwrap().trim().to_owned())
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut ids = vec![String::new(); paths.len()];
    for h in handles {
        for (i, id) in h.join().unwrap() {
            ids[i] = id;
        }
    }
    ids
}

/// MB/s of one whole-file GET with curl, checking status and size.
fn curl_mbps(url: &str, size: u64) -> f64 {
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download} %{time_total}",
        ])
        .arg(url)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let f: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(f.first(), Some(&"200"), "curl {url}: {text}");
    assert_eq!(f[1].parse::<u64>().unwrap(), size, "short body from {url}");
    let secs: f64 = f[2].parse().unwrap();
    size as f64 / 1e6 / secs
}

/// Nanoseconds on CPU of process `pid`, its threads and (recursively) its child processes.
fn cpu_ns(pid: u32) -> u64 {
    let mut total = 0;
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"));
    for task in tasks.into_iter().flatten().flatten() {
        let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        total += stat
            .split(' ')
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
            total += cpu_ns(child);
        }
    }
    total
}

/// Requests/s and MB/s of wrk cycling through `paths`, and the server's (`pid`) CPU
/// microseconds per request; panics on any error answer.
fn wrk_rps(base: &str, paths_file: &Path, script: &Path, secs: u64, pid: u32) -> (f64, f64, f64) {
    let cpu0 = cpu_ns(pid);
    let out = Command::new("wrk")
        .args(["-t2", "-c16", &format!("-d{secs}s"), "-s"])
        .arg(script)
        .arg(base)
        .env("PATHS_FILE", paths_file)
        .output()
        .unwrap();
    let cpu = cpu_ns(pid).saturating_sub(cpu0);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        !text.contains("Non-2xx") && !text.contains("Socket errors"),
        "wrk saw errors:\n{text}"
    );
    let find = |key: &str| -> &str {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in wrk output:\n{text}"))
            .trim()
    };
    let rps: f64 = find("Requests/sec:").parse().unwrap();
    let t = find("Transfer/sec:");
    let mb = if let Some(v) = t.strip_suffix("GB") {
        v.parse::<f64>().unwrap() * 1073.741824
    } else if let Some(v) = t.strip_suffix("MB") {
        v.parse::<f64>().unwrap() * 1.048576
    } else {
        t.trim_end_matches("KB").parse::<f64>().unwrap_or(0.0) / 1000.0
    };
    let requests: f64 = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("no request count in wrk output:\n{text}"));
    (rps, mb, cpu as f64 / 1e3 / requests.max(1.0))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` lists harness=false benches this way
    }
    let runs = env_u64("FERRY_BENCH_RUNS", 5).max(1) as usize;
    let big = env_u64("FERRY_BENCH_MB", 1024) << 20;
    let n_small = env_u64("FERRY_BENCH_SMALL", 1000) as usize;
    let secs = env_u64("FERRY_BENCH_SECS", 5);
    // ferry-server worker threads (nginx runs `worker_processes auto`: one per core).
    let workers = env_u64("FERRY_BENCH_WORKERS", 4);
    if !have("curl") {
        return;
    }
    let base_dir =
        std::env::var("FERRY_BENCH_DIR").map_or_else(|_| std::env::temp_dir(), PathBuf::from);
    let tmp = tempfile::tempdir_in(base_dir).unwrap();
    let d = tmp.path();
    // nginx's workers run as an unprivileged user: they must be able to read the files.
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    let root = d.join("www");
    std::fs::create_dir_all(root.join("files")).unwrap();

    let addr = free_addr();
    let http = free_addr();
    let conf = d.join("server.toml");
    std::fs::write(
        &conf,
        format!(
            "listen = \"{addr}\"\ndata = \"{}\"\nsync_blocks = false\nidle_timeout_ms = 600000\n\
             workers = {workers}\n\
             [http]\nlisten = \"{http}\"\n[http.secrets]\n{APP} = \"{SECRET}\"\n{}",
            d.join("data").display(),
            support::auth::auth_toml()
        ),
    )
    .unwrap();
    let srv = Kill(
        Command::new(env!("CARGO_BIN_EXE_ferry-server"))
            .arg("--config")
            .arg(&conf)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_port(addr);
    wait_port(http);
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 86_400;
    let signed = |id: &str| ferry_common::signing::signed_query(SECRET.as_bytes(), id, exp, APP);

    // The big file: uploaded with the real client; nginx gets the same bytes.
    let big_src = root.join("files").join("big.bin");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&big_src).unwrap());
        let chunk = random_bytes(8 << 20, 1);
        let mut left = big;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            f.write_all(&chunk[..n]).unwrap();
            left -= n as u64;
        }
        f.flush().unwrap();
    }
    let t = Instant::now();
    let big_id = upload_all(addr, std::slice::from_ref(&big_src), &d.join("state")).remove(0);
    println!(
        "setup: uploaded {} MiB in {:.1} s",
        big >> 20,
        t.elapsed().as_secs_f64()
    );

    // The small files.
    let small: Vec<String> = (0..n_small).map(|i| format!("s{i:04}.bin")).collect();
    let small_paths: Vec<PathBuf> = small.iter().map(|n| root.join("files").join(n)).collect();
    for (i, p) in small_paths.iter().enumerate() {
        std::fs::write(p, random_bytes(64 << 10, 100 + i as u64)).unwrap();
    }
    let t = Instant::now();
    let ids = upload_all(addr, &small_paths, &d.join("state"));
    println!(
        "setup: uploaded {n_small} x 64 KiB in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let ferry_paths = d.join("ferry-paths.txt");
    let nginx_paths = d.join("nginx-paths.txt");
    std::fs::write(
        &ferry_paths,
        ids.iter()
            .map(|id| format!("/files/{id}?{}\n", signed(id)))
            .collect::<String>(),
    )
    .unwrap();
    std::fs::write(
        &nginx_paths,
        small
            .iter()
            .map(|n| format!("/files/{n}\n"))
            .collect::<String>(),
    )
    .unwrap();
    let script = d.join("paths.lua");
    std::fs::write(
        &script,
        "local paths = {}\n\
         for line in io.lines(os.getenv(\"PATHS_FILE\")) do paths[#paths + 1] = line end\n\
         local i = math.random(#paths)\n\
         request = function()\n  i = i % #paths + 1\n  return wrk.format(\"GET\", paths[i])\nend\n",
    )
    .unwrap();

    let nginx_addr = free_addr();
    let _nginx = if have("nginx") {
        let nconf = d.join("nginx.conf");
        let user = if nix_is_root() {
            "user nobody nogroup;\n"
        } else {
            ""
        };
        std::fs::write(
            &nconf,
            format!(
                "{user}daemon off;\nworker_processes auto;\npid {d}/nginx.pid;\n\
                 error_log {d}/nginx-error.log warn;\nevents {{ worker_connections 1024; }}\n\
                 http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n\
                 keepalive_requests 1000000;\n  default_type application/octet-stream;\n\
                 client_body_temp_path {d}/ngx-body;\n  proxy_temp_path {d}/ngx-proxy;\n\
                 fastcgi_temp_path {d}/ngx-fcgi;\n  uwsgi_temp_path {d}/ngx-uwsgi;\n\
                 scgi_temp_path {d}/ngx-scgi;\n\
                 server {{ listen {nginx_addr}; root {root}; }}\n}}\n",
                d = d.display(),
                root = root.display()
            ),
        )
        .unwrap();
        let k = Kill(
            Command::new("nginx")
                .arg("-c")
                .arg(&nconf)
                .arg("-p")
                .arg(d)
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        );
        wait_port(nginx_addr);
        Some(k)
    } else {
        None
    };

    let ferry_big = format!("http://{http}/files/{big_id}?{}", signed(&big_id));
    let nginx_big = format!("http://{nginx_addr}/files/big.bin");
    // Warm the page cache for both copies.
    curl_mbps(&ferry_big, big);
    if _nginx.is_some() {
        curl_mbps(&nginx_big, big);
    }
    let (mut fb, mut nb) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        fb.push(curl_mbps(&ferry_big, big));
        if _nginx.is_some() {
            nb.push(curl_mbps(&nginx_big, big));
        }
    }
    let report = |what: &str, f: &mut Vec<f64>, n: &mut Vec<f64>, unit: &str| {
        let (fm, fl, fh) = median(f);
        print!("{what}: ferry {fm:.0} {unit} (min {fl:.0}, max {fh:.0})");
        if !n.is_empty() {
            let (nm, nl, nh) = median(n);
            print!(
                " | nginx {nm:.0} {unit} (min {nl:.0}, max {nh:.0}) | ferry/nginx {:.0}%",
                fm / nm * 100.0
            );
        }
        println!();
    };
    println!("\n== {} runs each, loopback, same machine, same run", runs);
    report(
        &format!("{} MiB file, curl, 1 connection", big >> 20),
        &mut fb,
        &mut nb,
        "MB/s",
    );

    if have("wrk") {
        let (mut fr, mut nr, mut fm, mut nm) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut fc, mut nc) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let (r, m, c) = wrk_rps(
                &format!("http://{http}"),
                &ferry_paths,
                &script,
                secs,
                srv.0.id(),
            );
            fr.push(r);
            fm.push(m);
            fc.push(c);
            if let Some(n) = &_nginx {
                let (r, m, c) = wrk_rps(
                    &format!("http://{nginx_addr}"),
                    &nginx_paths,
                    &script,
                    secs,
                    n.0.id(),
                );
                nr.push(r);
                nm.push(m);
                nc.push(c);
            }
        }
        report(
            &format!("{n_small} x 64 KiB files, wrk -t2 -c16 {secs}s"),
            &mut fr,
            &mut nr,
            "req/s",
        );
        report("  same, transfer", &mut fm, &mut nm, "MB/s");
        // Lower is better here: the "ferry/nginx" figure is ferry's CPU cost relative to nginx's.
        report("  same, server CPU per request", &mut fc, &mut nc, "us");
    }
    println!(
        "ferry-server RSS after the runs: {} MiB",
        rss_kib(srv.0.id() as i32) / 1024
    );
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next().map(|u| u == "0"))
        .unwrap_or(false)
}
