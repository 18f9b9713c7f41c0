//! Small files (UPLOAD 70): one frame, written to a temp file under a claim on its upload key,
//! committed when the bytes match their SHA-256.

use super::*;
use crate::meta::{Claim, MetaStore, Sha256 as Digest32, UploadId};
use ferry_common::proto::{ErrorCode, UploadMeta};
use log::{debug, info, warn};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::path::PathBuf;
use std::sync::Arc;

impl Storage {
    /// Starts a small upload, or answers a repeat: if this app and user already stored a file
    /// with this upload key (the reply was lost), its id comes back and nothing is written.
    pub fn small_begin(&self, who: &Who, mut meta: UploadMeta, size: u64) -> OpResult<SmallStart> {
        // The client's key names a retry of *its* upload: scoped to its app and user, another
        // tenant using the same 16 bytes can neither take its claim nor overwrite its record.
        meta.key = scoped_key(who, &meta.key);
        if size > self.cfg.small_file_max {
            return Err(OpError::new(
                ErrorCode::Limit,
                format!(
                    "file of {size} bytes is over the small-file limit of {} bytes; use UPLOAD_INIT",
                    self.cfg.small_file_max
                ),
            ));
        }
        self.check_reserve(size)?;
        let claim = self.claim_key(who, &meta.key)?;
        // Checked while holding the claim, so a copy committing right now cannot slip past. Only
        // a claim taken over from a dead node can have a file behind it that the node placed and
        // never marked stored (finished here, not written again); a fresh claim, the common
        // case, needs the one lookup.
        let done = if claim.from_dead_peer {
            self.finished_file(who, &meta.key)?
        } else {
            match self
                .meta
                .finished_upload(&who.app, &who.user, &meta.key)
                .map_err(|e| db_err(e, "finished upload lookup"))?
            {
                Some(id) => Some(id),
                None => self.own_left_commit(&who.app, &who.user, &meta.key)?,
            }
        };
        if let Some(id) = done {
            info!("repeated UPLOAD of file {id} (same key): same id, bytes dropped");
            return Ok(SmallStart::Done(id));
        }
        self.check_quota(who, size)?;
        let tmp = self
            .root
            .join(&self.tmp_rel)
            .join(format!("small-{}.part", random_hex()));
        let file = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&tmp)
            .map_err(|e| io_err(&e, "cannot create temp file"))?;
        Ok(SmallStart::Write(Box::new(SmallWriter {
            _claim: claim,
            who: who.clone(),
            meta,
            size,
            file,
            tmp,
            pos: 0,
            sha: Sha256::new(),
            crc: 0,
            crcs: Vec::new(),
            block_size: self.cfg.block_size,
            err: None,
            done: false,
        })))
    }

    /// Claims a small upload's key: in memory against this node's other connections, in the
    /// DB against peers (whose claim is taken over only once they are proved dead).
    pub(super) fn claim_key(&self, who: &Who, key: &UploadId) -> OpResult<KeyClaim> {
        let busy = || OpError::new(ErrorCode::Busy, "an upload with this key is in progress");
        let k = (who.app.clone(), who.user.clone(), *key);
        if !self.small_keys.lock().insert(k.clone()) {
            return Err(busy());
        }
        // From here on, dropping `claim` releases both claims.
        let mut claim = KeyClaim {
            set: self.small_keys.clone(),
            key: k,
            meta: self.meta.clone(),
            node: self.node.clone(),
            from_dead_peer: false,
        };
        let held = self
            .meta
            .claim_key(&who.app, &who.user, key, &self.node)
            .map_err(|e| db_err(e, "upload key claim"))?;
        match held {
            Claim::Mine => Ok(claim),
            Claim::Held(peer) if self.peer_alive(&peer) => {
                debug!("upload key held by live node {peer}");
                Err(busy())
            }
            Claim::Held(peer) => {
                let taken = self
                    .meta
                    .take_claim(&who.app, &who.user, key, &peer, &self.node)
                    .map_err(|e| db_err(e, "upload key claim"))?;
                if taken {
                    info!("took over an upload key claim of dead node {peer:?}");
                    claim.from_dead_peer = true;
                    Ok(claim)
                } else {
                    Err(busy())
                }
            }
        }
    }
}

pub(super) type KeyClaims = Arc<Mutex<HashSet<(String, String, UploadId)>>>;

/// A small upload's key, held while it is written and committed; released on drop.
pub struct KeyClaim {
    set: KeyClaims,
    key: (String, String, UploadId),
    meta: Arc<dyn MetaStore>,
    node: String,
    /// Taken over from a node proved dead, which may have left this key's file committing.
    from_dead_peer: bool,
}

impl Drop for KeyClaim {
    fn drop(&mut self) {
        let (app, user, key) = &self.key;
        // The DB claim goes first, so that while the memory claim stands nobody here re-claims.
        if let Err(e) = self.meta.release_claim(app, user, key, &self.node) {
            // Left behind, it is taken over once this node is restarted or proved dead.
            warn!("cannot release the upload key claim of app {app} user {user}: {e:#}");
        }
        self.set.lock().remove(&self.key);
    }
}

/// What starting a small upload gives.
pub enum SmallStart {
    /// Write the payload through this.
    Write(Box<SmallWriter>),
    /// The same upload (same key) was stored before: this is its file id; drop the payload.
    Done(String),
}

/// Streams a small file's payload to a temp file, hashing as it goes. Dropped unfinished, it
/// removes the temp file.
pub struct SmallWriter {
    _claim: KeyClaim,
    who: Who,
    meta: UploadMeta,
    size: u64,
    file: File,
    tmp: PathBuf,
    pos: u64,
    sha: Sha256,
    crc: u32,
    crcs: Vec<u32>,
    block_size: u32,
    err: Option<OpError>,
    done: bool,
}

impl SmallWriter {
    pub fn write(&mut self, st: &Storage, mut data: &[u8]) {
        if self.err.is_none()
            && let Err(e) = st.write_at(&self.file, data, self.pos)
        {
            warn!("small upload {}: write failed: {e}", self.tmp.display());
            self.err = Some(io_err(&e, "file write failed"));
        }
        self.sha.update(data);
        // Per-block CRCs for downloads, even when the small-file limit exceeds the block size.
        let bs = u64::from(self.block_size);
        while !data.is_empty() {
            let in_block = self.pos % bs;
            let n = ((bs - in_block) as usize).min(data.len());
            self.crc = crc32c::crc32c_append(self.crc, &data[..n]);
            self.pos += n as u64;
            if self.pos.is_multiple_of(bs) {
                self.crcs.push(self.crc);
                self.crc = 0;
            }
            data = &data[n..];
        }
    }

    pub fn finish(mut self, st: &Storage) -> OpResult<String> {
        if let Some(e) = self.err.take() {
            return Err(e);
        }
        if !self.pos.is_multiple_of(u64::from(self.block_size)) {
            self.crcs.push(self.crc);
        }
        let sha = std::mem::take(&mut self.sha);
        let got: Digest32 = sha.finalize().into();
        if got != self.meta.sha256 || self.pos != self.size {
            return Err(OpError::new(
                ErrorCode::HashMismatch,
                "file bytes do not match the announced SHA-256",
            ));
        }
        self.file
            .sync_all()
            .map_err(|e| io_err(&e, "cannot sync the file"))?;
        let content = NewFile {
            app: self.who.app.clone(),
            user: self.who.user.clone(),
            size: self.size,
            sha256: got,
            name: self.meta.name.clone(),
            block_size: self.block_size,
            crcs: std::mem::take(&mut self.crcs),
        };
        let rec = st.store_new_file(content, &self.tmp, false, &self.meta.key)?;
        self.done = true;
        info!(
            "file {} stored: {} bytes for app {} user {} at {}",
            rec.id, self.size, self.who.app, self.who.user, rec.path
        );
        Ok(rec.id)
    }
}

impl Drop for SmallWriter {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// A small file's upload key as stored: the first 16 bytes of SHA-256 over a domain tag, the
/// app, the user and the client's key (each length-prefixed), so equal client keys of two
/// tenants are two keys here.
pub(super) fn scoped_key(who: &Who, key: &UploadId) -> UploadId {
    let mut h = Sha256::new();
    h.update(b"ferry small-upload key v1");
    for part in [who.app.as_bytes(), who.user.as_bytes(), key.as_slice()] {
        h.update((part.len() as u32).to_be_bytes());
        h.update(part);
    }
    let d = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&d[..16]);
    out
}
