//! The foreground commands `ferry cluster up` (one server, or `--nodes N --groups G`): start a
//! local cluster, say where everything is, and keep it running until a signal or a member's
//! exit; and what a signal must undo before the process exits ([`Running`]).

use crate::cluster::{CLUSTER_APP, Cluster, GroupsLayout, Layout, Logs, Spec};
use ferry_client::error::{ClientError, Result};
use parking_lot::Mutex;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The binaries `ferry-server` and `ferry-proxy` are expected next to the running `ferry`.
pub fn bin_dir() -> Result<PathBuf> {
    let exe =
        std::env::current_exe().map_err(|e| ClientError::io("locating the ferry binary", e))?;
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    for b in ["ferry-server", "ferry-proxy"] {
        if !dir.join(b).is_file() {
            return Err(ClientError::Input(format!(
                "{b} not found next to {} (build all binaries: cargo build --release)",
                exe.display()
            )));
        }
    }
    Ok(dir)
}

/// Where status lines go: the CLI passes a function that writes them to stderr (the library
/// itself never prints).
pub type Say = fn(&str);

/// The cluster a foreground command runs and the temp dir it made: what has to be stopped and
/// removed when a signal ends the process. The `ferry` binary's signal watcher calls
/// [`Running::stop`] and then exits; nothing here exits the process.
#[derive(Clone, Default)]
pub struct Running {
    pub(crate) slot: Arc<Mutex<Option<Cluster>>>,
    cleanup: Arc<Mutex<Option<PathBuf>>>,
}

impl Running {
    /// Hands over the started cluster.
    pub(crate) fn set(&self, c: Cluster) {
        *self.slot.lock() = Some(c);
    }

    /// Removes `dir` when stopped (the demo's temp dir).
    pub(crate) fn remove_on_stop(&self, dir: PathBuf) {
        *self.cleanup.lock() = Some(dir);
    }

    /// Stops the members (proxies first, 5 s grace) and removes the temp dir.
    pub fn stop(&self) {
        if let Some(mut c) = self.slot.lock().take() {
            c.stop(Duration::from_secs(5));
        }
        if let Some(dir) = self.cleanup.lock().take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// `ferry cluster up`: the same cluster in the foreground, logs prefixed by member, until Ctrl-C.
pub fn cluster_up(conf_dir: &Path, data: &Path, say: Say, running: &Running) -> Result<()> {
    let bins = bin_dir()?;
    let layout = Layout {
        tls: true,
        ..Layout::from_conf(conf_dir)?
    };
    let mut c = Cluster::start(&bins, conf_dir, layout.clone(), data, Logs::Prefixed)?;
    let client_conf = c.write_client_conf("demo")?;
    running.set(c);
    say(&format!(
        "ferry cluster up: server {}, server-proxies {} {}, client-proxies {} {}; data in {}. Ctrl-C stops all.",
        layout.server,
        layout.server_proxies[0],
        layout.server_proxies[1],
        layout.client_proxies[0],
        layout.client_proxies[1],
        data.display()
    ));
    match client_conf {
        Some(p) => say(&format!(
            "try: ferry --config {} upload FILE (that config holds this cluster's app key)",
            p.display()
        )),
        None => say(&format!(
            "try: FERRY_KEY=ID:SECRET ferry --proxy tls://{} --proxy tls://{} --ca {} upload FILE",
            layout.client_proxies[0],
            layout.client_proxies[1],
            data.join("conf").join("tls").join("ca.pem").display()
        )),
    }
    watch(running)
}

/// `ferry cluster up --nodes N --groups G`: runs a multi-node cluster in the foreground, logs
/// prefixed by member, until Ctrl-C (or until a member exits on its own).
pub fn up_groups(spec: &Spec, data: &Path, say: Say, running: &Running) -> Result<()> {
    spec.validate()?;
    let bins = bin_dir()?;
    let layout = GroupsLayout::fixed(spec);
    let mut c = Cluster::start_groups(&bins, spec, layout.clone(), data, Logs::Prefixed)?;
    let client_conf = c.write_client_conf(CLUSTER_APP)?;
    running.set(c);
    if let Some(p) = client_conf {
        say(&format!(
            "client config for this cluster (holds its app key): {}",
            p.display()
        ));
    }
    say(&format!(
        "ferry cluster up: trackers {} {}; {} group(s) x {} node(s), data in {}/<group>:",
        layout.trackers[0],
        layout.trackers[1],
        spec.groups,
        spec.nodes,
        data.display()
    ));
    for ((g, nodes), http) in layout.groups.iter().zip(&layout.http) {
        let list: Vec<String> = nodes.iter().map(|a| a.to_string()).collect();
        let gateways: Vec<String> = http.iter().map(|a| a.to_string()).collect();
        say(&format!(
            "  {g}: {} (HTTP {})",
            list.join(" "),
            gateways.join(" ")
        ));
    }
    say(&format!(
        "routing server-proxies {} {} (stats {} {}), client-proxies {} {}; metadata in {}. \
         Ctrl-C stops all.",
        layout.server_proxies[0],
        layout.server_proxies[1],
        layout.server_proxy_stats[0],
        layout.server_proxy_stats[1],
        layout.client_proxies[0],
        layout.client_proxies[1],
        spec.meta_url
            .as_deref()
            .unwrap_or("each node's embedded SQLite"),
    ));
    say(&format!(
        "try: ferry --config {} --user alice upload FILE; ferry --config {0} groups --tracker {}; \
         ferry --config {0} url --base http://{} FILE_ID (any HTTP gateway serves any file)",
        data.join("conf").join("client.toml").display(),
        layout.trackers[0],
        layout.http[0][0],
    ));
    watch(running)
}

/// Keeps a foreground cluster running until a signal takes it (see [`Running`]) or one
/// of its members exits on its own (an error naming them).
fn watch(running: &Running) -> Result<()> {
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let mut guard = running.slot.lock();
        let Some(c) = guard.as_mut() else {
            return Ok(());
        };
        let dead = c.exited();
        if !dead.is_empty() {
            return Err(ClientError::Cluster(format!(
                "cluster members exited: {dead:?}"
            )));
        }
    }
}
