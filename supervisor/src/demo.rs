//! `ferry demo`: the tour of ferry's promise on one machine. It starts a local cluster, uploads a
//! generated file through the client-proxy pair, SIGKILLs the primary server-proxy halfway
//! through the upload and restarts it, downloads the file back through the other client-proxy,
//! verifies the SHA-256 and reports what happened. Every process it started is stopped at the
//! end, on error, and on Ctrl-C.

use crate::cluster::{self, Cluster, Layout, Logs};
use crate::up::{Running, Say, bin_dir};
use ferry_client::error::{ClientError, Result};
use ferry_client::{Client, Progress, Settings, TransferReport};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What the demo did, printed as a short report (or JSON).
#[derive(Debug, Clone, serde::Serialize)]
pub struct DemoReport {
    pub size: u64,
    pub sha256: String,
    pub file_id: String,
    pub upload: TransferReport,
    pub download: TransferReport,
    /// Milliseconds into the upload at which the primary server-proxy was killed.
    pub killed_at_ms: u64,
    /// Sessions the client-proxies sent to a standby server-proxy because the primary was down
    /// (from their stats endpoints; 0 when the configs set none).
    pub proxy_failovers: u64,
    /// Sessions the client-proxies closed because their server-proxy died under them.
    pub sessions_cut: u64,
    pub verified: bool,
}

/// Counts upload progress and fires once when half of the file is done.
struct Halfway {
    total: u64,
    done: AtomicU64,
    fired: AtomicBool,
    tx: Mutex<Option<std::sync::mpsc::Sender<()>>>,
}

impl Progress for Halfway {
    fn start(&self, _total: u64, done: u64) {
        self.done.store(done, Ordering::Relaxed);
    }
    fn advance(&self, bytes: u64) {
        let done = self.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if done * 2 >= self.total
            && !self.fired.swap(true, Ordering::SeqCst)
            && let Some(tx) = self.tx.lock().take()
        {
            let _ = tx.send(());
        }
    }
}

/// Writes `size` pseudo-random bytes (xorshift) and returns their SHA-256 (hex).
fn generate(path: &Path, size: u64, seed: u64) -> Result<String> {
    let f = std::fs::File::create(path)
        .map_err(|e| ClientError::io(format!("creating {}", path.display()), e))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    let mut h = Sha256::new();
    let mut x = seed | 1;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        let n = left.min(buf.len() as u64) as usize;
        h.update(&buf[..n]);
        w.write_all(&buf[..n])
            .map_err(|e| ClientError::io(format!("writing {}", path.display()), e))?;
        left -= n as u64;
    }
    w.flush()
        .map_err(|e| ClientError::io(format!("writing {}", path.display()), e))?;
    Ok(hex::encode(h.finalize()))
}

fn sha256_of(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| ClientError::io(format!("opening {}", path.display()), e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| ClientError::io(format!("reading {}", path.display()), e))?;
        if n == 0 {
            return Ok(hex::encode(h.finalize()));
        }
        h.update(&buf[..n]);
    }
}

/// Runs the demo. `data` keeps the server's data there instead of in a temp dir.
/// A signal meanwhile stops the cluster and removes the temp dir through `running`.
pub fn run(
    conf_dir: &Path,
    size: u64,
    data: Option<&Path>,
    say: Say,
    running: &Running,
) -> Result<DemoReport> {
    let bins = bin_dir()?;
    // The client leg on TLS, with a local CA made for this run.
    let layout = Layout {
        tls: true,
        ..Layout::from_conf(conf_dir)?
    };
    let tmp = tempfile::Builder::new()
        .prefix("ferry-demo-")
        .tempdir()
        .map_err(|e| ClientError::io("creating a temp dir", e))?;
    let data_dir = data
        .map(Path::to_path_buf)
        .unwrap_or_else(|| tmp.path().join("data"));
    let logs = tmp.path().join("logs");
    running.remove_on_stop(tmp.path().to_path_buf());
    let slot = running.slot.clone();

    say(&format!(
        "demo: starting server, 2 server-proxies, 2 client-proxies (logs in {})",
        logs.display()
    ));
    let started = Cluster::start(
        &bins,
        conf_dir,
        layout.clone(),
        &data_dir,
        Logs::Dir(logs.clone()),
    );
    let mut started = started?;
    let key = started.secrets.key_of("demo").ok_or_else(|| {
        ClientError::Cluster(format!(
            "{}/server.toml has no [auth.keys.demo]: the demo uploads as app demo",
            conf_dir.display()
        ))
    })?;
    if let Some(p) = started.write_client_conf("demo")? {
        say(&format!(
            "demo: client config for this cluster: {}",
            p.display()
        ));
    }
    running.set(started);

    let src = tmp.path().join("demo.bin");
    say(&format!("demo: generating {} MiB of test data", size >> 20));
    let sha = generate(&src, size, 0x00fe_4447)?;

    let state = tmp.path().join("state");
    let mut up_settings = Settings::direct(layout.client_proxies.to_vec(), state.clone(), key);
    up_settings.app = "demo".into();
    up_settings.user = "demo".into();
    if let Some(c) = slot.lock().as_ref() {
        c.client_settings(&mut up_settings)?;
    }
    let uploader = Client::new(up_settings.clone())?;

    // The killer waits for the halfway mark, then SIGKILLs the primary server-proxy and restarts it.
    let (tx, rx) = std::sync::mpsc::channel();
    let progress = Halfway {
        total: size,
        done: AtomicU64::new(0),
        fired: AtomicBool::new(false),
        tx: Mutex::new(Some(tx)),
    };
    let t0 = Instant::now();
    let killer_slot = slot.clone();
    let killer = std::thread::spawn(move || -> Result<Option<u64>> {
        if rx.recv().is_err() {
            return Ok(None); // the upload ended before halfway (tiny file)
        }
        let at = t0.elapsed().as_millis() as u64;
        let mut guard = killer_slot.lock();
        let Some(c) = guard.as_mut() else {
            return Ok(None);
        };
        say(&format!(
            "demo: upload halfway: SIGKILL {}",
            cluster::SERVER_PROXY_A
        ));
        c.kill(cluster::SERVER_PROXY_A)?;
        drop(guard);
        std::thread::sleep(Duration::from_millis(500));
        let mut guard = killer_slot.lock();
        if let Some(c) = guard.as_mut() {
            say(&format!("demo: restarting {}", cluster::SERVER_PROXY_A));
            c.start_member(cluster::SERVER_PROXY_A)?;
        }
        Ok(Some(at))
    });
    say(&format!(
        "demo: uploading through {} and {}",
        up_settings.proxies[0], up_settings.proxies[1]
    ));
    let upload = uploader.upload(&src, None, None, &progress);
    drop(progress); // lets the killer go if halfway never came
    let killed = killer
        .join()
        .map_err(|_| ClientError::Cluster("killer thread panicked".into()))?;
    let upload = upload?;
    let killed_at_ms = killed?.unwrap_or(0);

    // Download back through the other client-proxy first.
    let mut down_settings = up_settings;
    down_settings.proxies.reverse();
    say(&format!(
        "demo: downloading {} through {}",
        upload.file_id, down_settings.proxies[0]
    ));
    let downloader = Client::new(down_settings)?;
    let out = tmp.path().join("demo.out");
    let download = downloader.download(&upload.file_id, &out, None, &ferry_client::Quiet)?;
    let got = sha256_of(&out)?;
    let (mut proxy_failovers, mut sessions_cut) = (0, 0);
    for addr in layout.client_proxy_stats.iter().flatten() {
        if let Ok(st) = cluster::proxy_stats(*addr) {
            proxy_failovers += st.get("failovers").copied().unwrap_or(0);
            sessions_cut += st.get("upstream_lost").copied().unwrap_or(0);
        }
    }
    let verified = got == sha;

    if let Some(mut c) = slot.lock().take() {
        c.stop(Duration::from_secs(5));
    }
    let report = DemoReport {
        size,
        sha256: sha,
        file_id: upload.file_id.clone(),
        upload,
        download,
        killed_at_ms,
        proxy_failovers,
        sessions_cut,
        verified,
    };
    if !verified {
        return Err(ClientError::Cluster(format!(
            "downloaded file's SHA-256 {got} does not match the original {}",
            report.sha256
        )));
    }
    Ok(report)
}

/// The human report.
pub fn render(r: &DemoReport) -> String {
    let mib = r.size as f64 / (1 << 20) as f64;
    let verified = if r.verified {
        "yes, byte-identical"
    } else {
        "NO"
    };
    [
        format!("ferry demo: {mib:.1} MiB, SHA-256 {}", r.sha256),
        format!("  file id          {}", r.file_id),
        format!(
            "  upload           {:.1} MB/s, {} blocks, {} re-sent, {} failovers; primary server-proxy killed at {:.1} s",
            r.upload.mb_per_s,
            r.upload.blocks_total,
            r.upload.blocks_resent,
            r.upload.failovers,
            r.killed_at_ms as f64 / 1000.0
        ),
        format!(
            "  download         {:.1} MB/s, {} blocks, {} re-sent, {} failovers",
            r.download.mb_per_s, r.download.blocks_total, r.download.blocks_resent, r.download.failovers
        ),
        format!(
            "  proxies          {} session(s) cut when the server-proxy died, {} failover(s) to the standby",
            r.sessions_cut, r.proxy_failovers
        ),
        format!("  verified         {verified}"),
    ]
    .join("\n")
}
