//! The data directory: its layout (`data/`, `tmp/`, `nodes/`), the locks that keep a second
//! server (or a second process with the same node name) out, and the disk helpers every phase
//! uses (directory syncs, preallocation, free space).

use super::*;
use crate::config::Config;
use log::warn;
use rand::RngExt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::Path;

pub(super) const TMP: &str = "tmp";

/// Per-node lock files of the nodes sharing a data dir.
pub(super) const NODES: &str = "nodes";

/// Opens (creating) a lock file.
pub(super) fn open_lock(path: &Path) -> anyhow::Result<File> {
    use anyhow::Context;
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .read(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))
}

/// Node names become file names (lock file, temp dir): short, no path characters.
pub(super) fn valid_node_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n != "."
        && n != ".."
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
}

/// This server's node name: `[cluster] node_name`, else its advertise (or listen) address;
/// "" for a standalone server.
pub(super) fn node_name(cfg: &Config) -> anyhow::Result<String> {
    let Some(c) = &cfg.cluster else {
        return Ok(String::new());
    };
    let name = match &c.node_name {
        Some(n) => n.clone(),
        None => c.advertise.unwrap_or(cfg.listen).to_string(),
    };
    if !valid_node_name(&name) {
        anyhow::bail!(
            "[cluster] node_name {name:?}: use 1-64 letters, digits, '.', '_', '-' or ':'"
        );
    }
    Ok(name)
}

/// Bytes available to unprivileged writers on the volume holding `dir` (0 if unknown).
pub fn free_bytes(dir: &Path) -> u64 {
    match nix::sys::statvfs::statvfs(dir) {
        Ok(s) => s.blocks_available().saturating_mul(s.fragment_size()),
        Err(e) => {
            warn!("cannot statvfs {}: {e}", dir.display());
            0
        }
    }
}

/// The data volume's size in bytes (0 when it cannot be read: no open upload fits then).
pub(super) fn volume_bytes(dir: &Path) -> u64 {
    match nix::sys::statvfs::statvfs(dir) {
        Ok(s) => s.blocks().saturating_mul(s.fragment_size()),
        Err(e) => {
            warn!("cannot statvfs {}: {e}", dir.display());
            0
        }
    }
}

pub(super) fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` and its missing parents below `root`, syncing the parent of each one made: a
/// new directory's own entry must be as durable as the file later renamed into it (a new one
/// is needed once per 512 files). Another worker making the same one at the same moment is
/// fine: whoever finds it made syncs its parent too.
pub(super) fn create_dirs_synced(dir: &Path, root: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut d = dir;
    while d != root && !d.is_dir() {
        missing.push(d);
        match d.parent() {
            Some(p) => d = p,
            None => break,
        }
    }
    for m in missing.into_iter().rev() {
        match fs::create_dir(m) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        fsync_dir(m.parent().unwrap_or(root))?;
    }
    Ok(())
}

/// Allocates one block's range of a temp file before its payload streams in, so the write
/// does not hit ENOSPC halfway; a filesystem without fallocate allocates as it writes.
pub(super) fn allocate(f: &File, off: u64, len: u64) -> io::Result<()> {
    use nix::fcntl::{FallocateFlags, fallocate};
    let (Ok(off), Ok(len)) = (i64::try_from(off), i64::try_from(len)) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    match fallocate(f, FallocateFlags::empty(), off, len) {
        Ok(()) | Err(nix::errno::Errno::EOPNOTSUPP) => Ok(()),
        Err(e) => Err(io::Error::from(e)),
    }
}

pub(super) fn random_hex() -> String {
    hex::encode(rand::rng().random::<[u8; 16]>())
}

impl Storage {
    /// Whether the process that wrote records as `node` may still be running. Standalone, no
    /// other writer can be (the exclusive `LOCK`). On a node: the records of a standalone
    /// server ("") are abandoned (it cannot run beside us), and a peer is alive exactly while
    /// it holds `nodes/<peer>.lock`: the kernel drops that lock when the process dies, however
    /// it dies, so a free lock proves the peer gone.
    pub(super) fn peer_alive(&self, peer: &str) -> bool {
        if peer == self.node {
            return true;
        }
        if self.node.is_empty() || peer.is_empty() || !valid_node_name(peer) {
            return false;
        }
        let path = self.root.join(NODES).join(format!("{peer}.lock"));
        let Ok(f) = OpenOptions::new().read(true).write(true).open(&path) else {
            return false; // never started here
        };
        // Dropping `f` releases the probe lock at once.
        f.try_lock().is_err()
    }
}

/// Takes the data dir's locks, held for the life of the process: standalone, `LOCK`
/// exclusively (nothing else may use the data dir); a node, `LOCK` shared plus
/// `nodes/<node>.lock` exclusively (peers yes, a standalone server or a second process with the
/// same node name no).
pub(super) fn lock_data_dir(root: &Path, node: &str) -> anyhow::Result<Vec<File>> {
    let lock_path = root.join("LOCK");
    let lock = open_lock(&lock_path)?;
    let mut locks = Vec::new();
    if node.is_empty() {
        lock.try_lock().map_err(|_| {
            anyhow::anyhow!(
                "data dir {} is in use by another ferry-server (lock {})",
                root.display(),
                lock_path.display()
            )
        })?;
        locks.push(lock);
    } else {
        lock.try_lock_shared().map_err(|_| {
            anyhow::anyhow!(
                "data dir {} is in use by a standalone ferry-server (lock {})",
                root.display(),
                lock_path.display()
            )
        })?;
        locks.push(lock);
        let node_lock_path = root.join(NODES).join(format!("{node}.lock"));
        let node_lock = open_lock(&node_lock_path)?;
        // A peer checking whether this node is alive (`peer_alive`) holds the lock for an
        // instant: a restart right then must not take that for a running twin, which would
        // hold it for good. Two seconds of retries tell the two apart.
        let mut tries = 0;
        while node_lock.try_lock().is_err() {
            tries += 1;
            if tries >= 40 {
                anyhow::bail!(
                    "node {node} is already running on data dir {} (lock {})",
                    root.display(),
                    node_lock_path.display()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        locks.push(node_lock);
    }
    Ok(locks)
}
