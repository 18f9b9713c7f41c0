//! Finishing an upload: UPLOAD_OVER assembles and checks the blocks, UPLOAD_PROVE links stored
//! content; both place the file with the one commit order (`commit_new_file`).

use super::*;
use crate::ids::{file_id, file_path};
use crate::meta::{FILE_COMMITTING, FileRec, Sha256 as Digest32, UploadId, now_secs};
use ferry_common::proto::ErrorCode;
use log::{info, warn};
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

impl Storage {
    /// The one way a file becomes stored: `content`, verified and synced at `src`, gets a
    /// numeric id, a file id and its path (directories made and synced), then is placed with
    /// [`Storage::commit_new_file`]. `link` hard-links `src` (stored content shared by an
    /// instant upload) instead of renaming it; `upload` is the session or small-file key the
    /// file finishes, so a repeated request gets the same file.
    pub(super) fn store_new_file(
        &self,
        content: NewFile,
        src: &Path,
        link: bool,
        upload: &UploadId,
    ) -> OpResult<FileRec> {
        let num = self.ids.next_id().map_err(|e| db_err(e, "id allocation"))?;
        let path = file_path(num, now_secs());
        if let Some(dir) = self.root.join(&path).parent() {
            create_dirs_synced(dir, &self.root)
                .map_err(|e| io_err(&e, "cannot create data directory"))?;
        }
        let rec = FileRec {
            id: file_id(self.group(), num),
            num,
            app: content.app,
            user: content.user,
            status: FILE_COMMITTING,
            path,
            size: content.size,
            sha256: content.sha256,
            name: content.name,
            block_size: content.block_size,
            crcs: content.crcs,
            created: now_secs(),
            node: self.node.clone(),
        };
        self.commit_new_file(&rec, src, link, upload)?;
        Ok(rec)
    }

    /// Moves a verified, fsynced temp file into its final place and records it. `link` makes
    /// a hard link instead of a rename (instant upload sharing stored content).
    fn commit_new_file(
        &self,
        rec: &FileRec,
        src: &Path,
        link: bool,
        upload: &UploadId,
    ) -> OpResult<()> {
        self.meta
            .insert_file(rec, Some(upload))
            .map_err(|e| db_err(e, "file insert"))?;
        self.phase("file-inserted", &rec.id);
        let dst = self.root.join(&rec.path);
        let placed = if link {
            fs::hard_link(src, &dst)
        } else {
            fs::rename(src, &dst)
        };
        if let Err(e) = placed {
            if self.meta.drop_file(&rec.id).is_err() {
                self.commit_failed.store(true, Ordering::Relaxed);
            }
            return Err(io_err(&e, "cannot place the file"));
        }
        self.phase("file-renamed", &rec.id);
        let synced = fsync_dir(dst.parent().unwrap_or(&self.root))
            .and_then(|_| fsync_dir(&self.root.join(&self.tmp_rel)));
        if let Err(e) = synced {
            // The rename may or may not be durable; the committing row lets start-up decide.
            self.commit_failed.store(true, Ordering::Relaxed);
            return Err(io_err(&e, "cannot sync the data directory"));
        }
        if let Err(e) = self.meta.commit_file(&rec.id) {
            // The file is in place under a committing row (or, if only the reply was lost,
            // stored). The retry finishes this file rather than storing the content again.
            self.commit_failed.store(true, Ordering::Relaxed);
            return Err(db_err(e, "file commit"));
        }
        self.phase("file-committed", &rec.id);
        Ok(())
    }

    /// Under exclusivity (the session `Finishing`, or the small-file key claimed): the file an
    /// earlier attempt of upload `id` on this node placed and could not mark stored (its commit
    /// failed: the database went away under it), finished now. Storing the content again would
    /// leave that file to be committed at the next start as a copy nobody knows (its
    /// `finished_uploads` row would name the new one). Only looked up once a commit of this
    /// node has failed.
    pub(super) fn own_left_commit(
        &self,
        app: &str,
        user: &str,
        id: &UploadId,
    ) -> OpResult<Option<String>> {
        if !self.commit_failed.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let left = self
            .meta
            .committing_upload(app, user, id)
            .map_err(|e| db_err(e, "committing upload lookup"))?;
        match left {
            Some(f) if f.node == self.node => match self.finish_left_commit(&f) {
                Ok(true) => Ok(Some(f.id)),
                Ok(false) => Ok(None),
                Err(e) => Err(db_err(e, "finishing an earlier commit")),
            },
            _ => Ok(None),
        }
    }

    /// The file a finished upload produced: a repeated UPLOAD_OVER or UPLOAD_PROVE whose first
    /// reply was lost (a proxy or the server died after the commit) gets the same file id, not
    /// "unknown upload" and not a second file.
    pub(super) fn already_finished(
        &self,
        who: &Who,
        id: &UploadId,
        unknown: OpError,
    ) -> OpResult<String> {
        let Some(file_id) = self.finished_file(who, id)? else {
            return Err(unknown);
        };
        info!(
            "upload {} was already finished as file {file_id}; answering again",
            hex::encode(id)
        );
        Ok(file_id)
    }

    /// The file upload `id` of `who` (a session, or a small file's key) became, if it did: a
    /// stored one, or one a node of this group placed and died before marking stored. That
    /// file would wait for the node's restart while the client, retrying elsewhere, stored the
    /// content a second time; a peer finishes the commit here instead. Busy while a live node
    /// is still committing it.
    pub(super) fn finished_file(&self, who: &Who, id: &UploadId) -> OpResult<Option<String>> {
        let stored = self
            .meta
            .finished_upload(&who.app, &who.user, id)
            .map_err(|e| db_err(e, "finished upload lookup"))?;
        if stored.is_some() {
            return Ok(stored);
        }
        let committing = self
            .meta
            .committing_upload(&who.app, &who.user, id)
            .map_err(|e| db_err(e, "committing upload lookup"))?;
        let Some(f) = committing else {
            return Ok(None);
        };
        if self.peer_alive(&f.node) {
            return Err(OpError::new(
                ErrorCode::Busy,
                format!("upload is being committed by node {:?}", f.node),
            ));
        }
        match self.finish_left_commit(&f) {
            Ok(true) => Ok(Some(f.id)),
            Ok(false) => Ok(None),
            Err(e) => Err(db_err(e, "finishing a dead node's commit")),
        }
    }

    pub fn over(&self, who: &Who, id: &UploadId) -> OpResult<String> {
        let s = match self.session(who, id) {
            Ok(s) => s,
            Err(e) => return self.already_finished(who, id, e),
        };
        match self.refresh(&s) {
            Ok(()) => {}
            Err(e) if e.code == ErrorCode::UnknownUpload => {
                return self.already_finished(who, id, e);
            }
            Err(e) => return Err(e),
        }
        {
            let st = s.state.lock();
            let have = st.stored.count();
            if st.phase() == Phase::Receiving && have < s.rec.blocks {
                info!(
                    "upload {}: OVER with {have} of {} blocks stored",
                    hex::encode(id),
                    s.rec.blocks
                );
                return Err(OpError::new(
                    ErrorCode::Incomplete,
                    format!("{} of {} blocks missing", s.rec.blocks - have, s.rec.blocks),
                ));
            }
        }
        self.finishing(who, &s, || self.assemble(&s))
    }

    /// Runs `place` in the `Finishing` phase. A session that ended meanwhile answers with the
    /// file it ended as; one another connection is finishing is Busy; a failure goes back to
    /// `Receiving` with what is stored.
    fn finishing(
        &self,
        who: &Who,
        s: &Arc<Session>,
        place: impl FnOnce() -> OpResult<String>,
    ) -> OpResult<String> {
        if let Err(e) = s.state.lock().begin_finishing() {
            return match e.code {
                ErrorCode::UnknownUpload => self.already_finished(who, &s.rec.id, e),
                _ => Err(e),
            };
        }
        let placed = place();
        if placed.is_err() {
            s.state.lock().finishing_failed();
        }
        placed
    }

    /// Re-reads the temp file, checks every block CRC and the whole SHA-256, then commits it.
    pub(super) fn assemble(&self, s: &Arc<Session>) -> OpResult<String> {
        let r = &s.rec;
        let hex_id = hex::encode(r.id);
        if let Some(fid) = self.own_left_commit(&r.app, &r.user, &r.id)? {
            self.forget(&r.id);
            info!("upload {hex_id}: its earlier commit as file {fid} finished");
            return Ok(fid);
        }
        // Every block is stored (checked by the caller): hash what the background hasher has
        // not reached yet. Holding the progress lock keeps the hasher out meanwhile.
        let mut h = s.hash.lock();
        let mut buf = Vec::new();
        s.advance_locked(&mut h, &mut buf)
            .map_err(|e| io_err(&e, "cannot re-read the upload"))?;
        if h.next < r.blocks {
            info!(
                "upload {hex_id}: OVER hashed {} of {} blocks ({:?})",
                h.next,
                r.blocks,
                s.state.lock().phase()
            );
            return Err(OpError::new(ErrorCode::Incomplete, "blocks missing"));
        }
        let damaged = std::mem::take(&mut h.damaged);
        if !damaged.is_empty() {
            // The hash covered damaged bytes: start it over once they are sent again.
            *h = HashProgress::default();
        }
        let sha = h.sha.clone();
        // `h` stays locked until the damaged blocks are unmarked, so the hasher cannot hash
        // their old bytes again in between.
        if !damaged.is_empty() {
            // Acknowledged bytes that changed on disk (e.g. lost in a power cut): ask for them
            // again rather than throwing the whole upload away.
            warn!(
                "upload {hex_id}: {} block(s) no longer match their CRC on disk; marked missing",
                damaged.len()
            );
            self.meta
                .unmark_blocks(&r.id, &damaged)
                .map_err(|e| db_err(e, "block unmark"))?;
            let mut st = s.state.lock();
            for &i in &damaged {
                st.stored.bitmap[(i / 8) as usize] &= !(1 << (i % 8));
            }
            return Err(OpError::new(
                ErrorCode::Incomplete,
                format!(
                    "{} block(s) damaged on disk; send them again",
                    damaged.len()
                ),
            ));
        }
        drop(h);
        let got: Digest32 = sha.finalize().into();
        if got != r.sha256 {
            warn!("upload {hex_id}: SHA-256 mismatch; discarding the session");
            self.discard(s);
            return Err(OpError::new(
                ErrorCode::HashMismatch,
                "assembled file does not match its SHA-256; upload discarded",
            ));
        }
        s.file
            .sync_all()
            .map_err(|e| io_err(&e, "cannot sync the upload"))?;
        let content = NewFile {
            app: r.app.clone(),
            user: r.user.clone(),
            size: r.size,
            sha256: r.sha256,
            name: r.name.clone(),
            block_size: r.block_size,
            crcs: s.state.lock().crcs.clone(),
        };
        let rec = self.store_new_file(content, &self.root.join(&r.temp_path), false, &r.id)?;
        self.forget(&r.id);
        info!(
            "upload {hex_id} complete: file {} ({} bytes, {} blocks) at {}",
            rec.id, r.size, r.blocks, rec.path
        );
        Ok(rec.id)
    }

    pub fn prove(&self, who: &Who, id: &UploadId, proof: &Digest32) -> OpResult<String> {
        let s = match self.session(who, id) {
            Ok(s) => s,
            Err(e) => return self.already_finished(who, id, e),
        };
        let (live, challenge) = {
            let st = s.state.lock();
            (st.live(), st.challenge.clone())
        };
        if let Err(ended) = live {
            return self.already_finished(who, id, ended);
        }
        let Some(c) = challenge else {
            return Err(OpError::new(
                ErrorCode::ProofFailed,
                "no stored content to prove for this upload; send the blocks",
            ));
        };
        let (src, f) = match self.open_stored(who, &c.file) {
            Ok(found) => found,
            Err(e) if e.code == ErrorCode::NotFound => {
                // The stored copy was deleted since the challenge was set: no instant upload.
                s.state.lock().challenge = None;
                let _ = self.meta.set_challenge(&s.rec.id, None);
                return Err(OpError::new(
                    ErrorCode::ProofFailed,
                    "the stored content is gone; send the blocks",
                ));
            }
            Err(e) => return Err(e),
        };
        let src_path = self.root.join(&src.path);
        let want = hash_range(&f, c.off, c.len).map_err(|e| io_err(&e, "cannot read content"))?;
        if want != *proof {
            warn!(
                "upload {}: wrong proof of possession from app {} user {}",
                hex::encode(id),
                who.app,
                who.user
            );
            return Err(OpError::new(
                ErrorCode::ProofFailed,
                "wrong proof of possession",
            ));
        }
        let placed = self.finishing(who, &s, || {
            if let Some(fid) = self.own_left_commit(&who.app, &who.user, &s.rec.id)? {
                let _ = fs::remove_file(self.root.join(&s.rec.temp_path));
                self.forget(&s.rec.id);
                return Ok(fid);
            }
            let content = NewFile {
                app: who.app.clone(),
                user: who.user.clone(),
                size: src.size,
                sha256: src.sha256,
                name: s.rec.name.clone(),
                block_size: src.block_size,
                crcs: src.crcs.clone(),
            };
            let fid = self.store_new_file(content, &src_path, true, &s.rec.id)?.id;
            // Only now: a failed commit leaves the session whole (OVER still works), and a
            // crash before this line leaves a temp file whose session row the commit deleted,
            // which start-up removes as stray.
            let _ = fs::remove_file(self.root.join(&s.rec.temp_path));
            self.forget(&s.rec.id);
            info!(
                "instant upload {}: file {fid} shares the content of {}",
                hex::encode(id),
                src.id
            );
            Ok(fid)
        })?;
        Ok(placed)
    }
}

/// SHA-256 of a byte range of a file.
pub(super) fn hash_range(f: &File, off: u64, len: u64) -> io::Result<Digest32> {
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; HASH_CHUNK.min(len as usize).max(1)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        f.read_exact_at(&mut buf[..n], off + done)?;
        sha.update(&buf[..n]);
        done += n as u64;
    }
    Ok(sha.finalize().into())
}

/// What a new file holds, before it has an id and a place ([`Storage::store_new_file`]).
pub(super) struct NewFile {
    pub(super) app: String,
    pub(super) user: String,
    pub(super) size: u64,
    pub(super) sha256: Digest32,
    pub(super) name: String,
    pub(super) block_size: u32,
    /// CRC32C of every block.
    pub(super) crcs: Vec<u32>,
}
