//! Upload: one UPLOAD frame for a file of at most one block; otherwise the big-file session
//! (UPLOAD_INIT, optional proof of possession, breakpoint query, parallel UPLOAD_BLOCKs,
//! UPLOAD_OVER). The file id is returned only once the server confirmed the file.

use crate::conn::Fault;
use crate::error::{ClientError, Result};
use crate::files::{self, hash_range, read_error};
use crate::link::{Link, Shared};
use crate::pool::{self, Outcome};
use crate::report::{Progress, TransferReport};
use crate::state::{self, BEGUN, Bitmap, UploadHead};
use ferry_common::proto::{
    BlockAck, BlockMeta, Breakpoint, ErrorCode, FILE_ID_LEN, Prove, UPLOAD_ID_LEN,
    UPLOAD_INIT_REPLY_LEN, UploadInit, UploadInitReply, UploadMeta, cmd, decode_file_id,
};
use parking_lot::Mutex;
use rand::RngExt;
use sha2::{Digest, Sha256};
use std::fs::{File, Metadata};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

/// Rounds of "query the breakpoint, send what is missing, file over" before giving up.
const MAX_ROUNDS: u32 = 4;
/// Largest breakpoint reply: block count + a bitmap of 2^20 bits.
const BREAKPOINT_MAX: usize = 4 + (ferry_common::proto::BLOCKS_MAX as usize).div_ceil(8);

pub struct UploadJob<'a> {
    pub shared: &'a Shared,
    pub path: &'a Path,
    pub threads: usize,
    pub block_size: u32,
    pub state_dir: &'a Path,
    pub app: &'a str,
    pub user: &'a str,
    pub progress: &'a dyn Progress,
}

fn garbled<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> Fault {
    move |e| Fault::Garbled(format!("{what}: {e}"))
}

fn file_id_reply(b: &[u8]) -> Result<String, Fault> {
    decode_file_id(b).map_err(garbled("file id reply"))
}

/// Opens the source, refusing what cannot be uploaded with a clear message.
fn open_source(path: &Path) -> Result<(File, Metadata)> {
    let meta = std::fs::metadata(path)
        .map_err(|e| ClientError::Input(format!("cannot upload {}: {e}", path.display())))?;
    if meta.is_dir() {
        return Err(ClientError::Input(format!(
            "cannot upload {}: it is a directory (directory upload is not supported yet)",
            path.display()
        )));
    }
    if !meta.is_file() {
        return Err(ClientError::Input(format!(
            "cannot upload {}: not a regular file",
            path.display()
        )));
    }
    let file = File::open(path)
        .map_err(|e| ClientError::Input(format!("cannot upload {}: {e}", path.display())))?;
    Ok((file, meta))
}

pub fn upload(job: &UploadJob) -> Result<TransferReport> {
    let started = Instant::now();
    let (file, meta) = open_source(job.path)?;
    let size = meta.len();
    let name = files::display_name(job.path);
    let mut report = TransferReport {
        op: "upload".into(),
        bytes: size,
        block_size: job.block_size,
        ..Default::default()
    };
    let mut link = Link::new(job.shared);
    let done = if size <= u64::from(job.block_size) {
        small(job, &mut link, &file, &meta, &name, &mut report)?
    } else {
        None
    };
    if done.is_none() {
        big(job, &mut link, &file, &meta, &name, &mut report)?;
    }
    report.failovers = job.shared.failovers.load(Ordering::Relaxed);
    report.retries = job.shared.retries.load(Ordering::Relaxed);
    report.finish(started.elapsed());
    Ok(report)
}

/// The whole file in one UPLOAD. None when the server's small-file limit is lower than our
/// block size (error Limit): the caller then uses the big-file session.
fn small(
    job: &UploadJob,
    link: &mut Link,
    file: &File,
    fmeta: &Metadata,
    name: &str,
    report: &mut TransferReport,
) -> Result<Option<()>> {
    let size = fmeta.len();
    let mut buf = vec![0u8; size as usize];
    file.read_exact_at(&mut buf, 0)
        .map_err(|e| read_error(job.path, 0, e))?;
    let sha256 = files::sha256(&buf);
    let key_file = small_key(job, fmeta, size, sha256)?;
    let meta = UploadMeta {
        key: key_file.1,
        sha256,
        name: name.to_owned(),
    }
    .encode()
    .map_err(|e| ClientError::Input(format!("cannot upload {}: {e}", job.path.display())))?;
    job.progress.start(size, 0);
    let mut tries = 0u32;
    let id = link.call("upload", |c| {
        tries += 1;
        match c.call_data(cmd::UPLOAD, &meta, &buf, FILE_ID_LEN) {
            Ok(b) => file_id_reply(&b).map(Some),
            Err(Fault::Server(e)) if e.code == ErrorCode::Limit => Ok(None),
            Err(f) => Err(f),
        }
    })?;
    // Answered either way: the key has done its job.
    key_file.0.remove();
    let Some(id) = id else {
        log::info!("server refused {size} bytes as a small file; using a block session");
        return Ok(None);
    };
    job.progress.advance(size);
    report.file_id = id;
    report.blocks_total = 1;
    report.blocks_sent = 1;
    report.blocks_resent = tries - 1;
    report.bytes_transferred = size * u64::from(tries);
    Ok(Some(()))
}

/// The upload key of a small file: one key for every try of this file, kept in the state dir
/// until the server has answered, so that a rerun after a give-up or a crash (the server may
/// have stored the file and lost the reply) gets that file's id back instead of a second copy.
fn small_key(
    job: &UploadJob,
    fmeta: &Metadata,
    size: u64,
    sha256: [u8; 32],
) -> Result<(state::StateFile, [u8; 16])> {
    std::fs::create_dir_all(job.state_dir).map_err(|e| {
        ClientError::io(
            format!("cannot create state dir {}", job.state_dir.display()),
            e,
        )
    })?;
    let path = state_path(job, fmeta).with_extension("small");
    if let Some((sf, h)) = state::open_upload(&path)
        && h.size == size
        && h.sha256 == sha256
    {
        return Ok((sf, h.upload_id));
    }
    let key: [u8; 16] = rand::rng().random();
    let head = state::UploadHead {
        upload_id: key,
        sha256,
        size,
        block_size: job.block_size,
    };
    let blocks = state::block_count(size, job.block_size).unwrap_or(0);
    Ok((state::create_upload(&path, &head, blocks)?, key))
}

/// Where the resume state of this upload lives: keyed by what makes it "the same upload".
fn state_path(job: &UploadJob, meta: &Metadata) -> PathBuf {
    let canon = std::fs::canonicalize(job.path).unwrap_or_else(|_| job.path.to_owned());
    let mut h = Sha256::new();
    h.update(canon.as_os_str().as_encoded_bytes());
    h.update([0]);
    h.update(meta.len().to_be_bytes());
    h.update(meta.mtime().to_be_bytes());
    h.update(meta.mtime_nsec().to_be_bytes());
    h.update(job.app.as_bytes());
    h.update([0]);
    h.update(job.user.as_bytes());
    h.update([0]);
    h.update(job.block_size.to_be_bytes());
    let key = hex::encode(&h.finalize()[..16]);
    job.state_dir.join(format!("up-{key}.state"))
}

fn big(
    job: &UploadJob,
    link: &mut Link,
    file: &File,
    meta: &Metadata,
    name: &str,
    report: &mut TransferReport,
) -> Result<()> {
    let size = meta.len();
    let bs = job.block_size;
    let blocks = match state::block_count(size, bs) {
        Some(n) if n > 0 => n,
        Some(_) => {
            return Err(ClientError::Integrity(format!(
                "the server refused {} (empty) as a small file, and a block session needs at least one block",
                job.path.display()
            )));
        }
        None => {
            return Err(ClientError::Input(format!(
                "{} needs more than 2^20 blocks of {bs} bytes: use a bigger --block-size",
                job.path.display()
            )));
        }
    };
    std::fs::create_dir_all(job.state_dir).map_err(|e| {
        ClientError::io(
            format!("cannot create state dir {}", job.state_dir.display()),
            e,
        )
    })?;
    let spath = state_path(job, meta);
    // Held until we return; the state file itself is (re)written through other handles.
    let _lock = files::lock_exclusive(&spath, &format!("uploading {}", job.path.display()))?;
    let prior = state::open_upload(&spath).filter(|(_, h)| h.size == size && h.block_size == bs);
    let sha256 = match &prior {
        Some((_, h)) => h.sha256,
        None => hash_range(file, 0, size, job.path)?,
    };
    // An earlier run may have finished on the server with its last reply lost (a proxy died
    // after the commit): file over is idempotent, so ask before opening a new session, which
    // would store the content a second time.
    if let Some((sf, h)) = &prior
        && let Some(file_id) = finished_as(link, h.upload_id)?
    {
        let _ = std::fs::remove_file(sf.path());
        report.file_id = file_id;
        report.resumed = true;
        report.blocks_total = blocks;
        report.blocks_skipped = blocks;
        job.progress.start(size, size);
        return Ok(());
    }
    let init = UploadInit {
        size,
        block_size: bs,
        sha256,
        name: name.to_owned(),
    }
    .encode()
    .map_err(|e| ClientError::Input(format!("cannot upload {}: {e}", job.path.display())))?;
    let reply = link.call("upload init", |c| {
        let b = c.call(cmd::UPLOAD_INIT, &init, UPLOAD_INIT_REPLY_LEN)?;
        UploadInitReply::decode(&b).map_err(garbled("UPLOAD_INIT reply"))
    })?;
    if reply.blocks != blocks || reply.block_size != bs {
        return Err(ClientError::Integrity(format!(
            "upload init: server expects {} blocks of {} bytes, we have {blocks} of {bs}",
            reply.blocks, reply.block_size
        )));
    }
    let head = UploadHead {
        upload_id: reply.upload_id,
        sha256,
        size,
        block_size: bs,
    };
    let (sf, prior_begun) = match prior {
        Some((sf, h)) if h.upload_id == reply.upload_id => {
            let b = sf.bitmap(BEGUN);
            (sf, b)
        }
        _ => (
            state::create_upload(&spath, &head, blocks)?,
            Bitmap::new(blocks),
        ),
    };
    report.blocks_total = blocks;

    if let Some((off, len)) = reply.challenge
        && off.checked_add(len).is_some_and(|end| end <= size)
    {
        let proof = Prove {
            upload_id: reply.upload_id,
            sha256: hash_range(file, off, len, job.path)?,
        }
        .encode();
        let id = link.call("upload prove", |c| {
            match c.call(cmd::UPLOAD_PROVE, &proof, FILE_ID_LEN) {
                Ok(b) => file_id_reply(&b).map(Some),
                Err(Fault::Server(e)) if e.code == ErrorCode::ProofFailed => Ok(None),
                Err(f) => Err(f),
            }
        })?;
        if let Some(id) = id {
            sf.remove();
            report.file_id = id;
            report.instant = true;
            report.blocks_skipped = blocks;
            job.progress.start(size, size);
            return Ok(());
        }
    }

    let sent = AtomicU32::new(0);
    let skipped = AtomicU32::new(0);
    let resent = AtomicU32::new(0);
    let moved = AtomicU64::new(0);
    let this_run = Mutex::new(Bitmap::new(blocks));
    // Distinct blocks counted as re-sent (a block retried twice counts once).
    let resent_map = Mutex::new(Bitmap::new(blocks));
    let upload_id = reply.upload_id;
    let block_len = |i: u32| (size - u64::from(i) * u64::from(bs)).min(u64::from(bs)) as usize;
    for round in 0..MAX_ROUNDS {
        let query = upload_id;
        let bp = link.call("upload query", |c| {
            let b = c.call(cmd::UPLOAD_QUERY, &query, BREAKPOINT_MAX)?;
            Breakpoint::decode(&b).map_err(garbled("breakpoint reply"))
        });
        let bp = match bp {
            Err(e) if e.code() == Some(ErrorCode::UnknownUpload) => {
                report.file_id = ended(link, upload_id, &sf, e)?;
                return Ok(());
            }
            r => r?,
        };
        if bp.blocks != blocks {
            return Err(ClientError::Integrity(format!(
                "upload query: server reports {} blocks, expected {blocks}",
                bp.blocks
            )));
        }
        let missing: Vec<u32> = bp.missing().collect();
        if round == 0 {
            let stored = blocks - missing.len() as u32;
            skipped.store(stored, Ordering::Relaxed);
            report.resumed = stored > 0 || prior_begun.count() > 0;
            let stored_bytes: u64 = (0..blocks)
                .filter(|&i| bp.has(i))
                .map(|i| block_len(i) as u64)
                .sum();
            job.progress.start(size, stored_bytes);
        }
        let work = |link: &mut Link, buf: &mut Vec<u8>, i: u32| -> Result<Outcome> {
            let offset = u64::from(i) * u64::from(bs);
            let len = block_len(i);
            buf.resize(len, 0);
            file.read_exact_at(buf, offset)
                .map_err(|e| read_error(job.path, offset, e))?;
            let meta = BlockMeta {
                upload_id,
                index: i,
                offset,
                len: len as u32,
                crc32c: crc32c::crc32c(buf),
            }
            .encode();
            let again = this_run.lock().set(i) || prior_begun.get(i);
            sf.mark(BEGUN, i)?;
            let mut tries = 0u32;
            let ack = link.call(&format!("upload block {i}"), |c| {
                tries += 1;
                moved.fetch_add(len as u64, Ordering::Relaxed);
                if (tries > 1 || again) && !resent_map.lock().set(i) {
                    resent.fetch_add(1, Ordering::Relaxed);
                }
                match c.call_data(cmd::UPLOAD_BLOCK, &meta, buf, 1) {
                    Ok(b) => BlockAck::decode(&b).map(Some).map_err(garbled("block ack")),
                    Err(Fault::Server(e)) if e.code == ErrorCode::Busy => Ok(None),
                    Err(f) => Err(f),
                }
            });
            let ack = ack?;
            job.progress.counters(
                resent.load(Ordering::Relaxed),
                job.shared.failovers.load(Ordering::Relaxed),
            );
            match ack {
                None => Ok(Outcome::Requeue),
                Some(a) => {
                    match a {
                        BlockAck::Written => sent.fetch_add(1, Ordering::Relaxed),
                        BlockAck::AlreadyStored => skipped.fetch_add(1, Ordering::Relaxed),
                    };
                    job.progress.advance(len as u64);
                    Ok(Outcome::Done)
                }
            }
        };
        match pool::run(job.shared, job.threads, missing, "upload", work) {
            Err(e) if e.code() == Some(ErrorCode::UnknownUpload) => {
                report.file_id = ended(link, upload_id, &sf, e)?;
                return Ok(());
            }
            r => r?,
        }
        let over = upload_id;
        let r = link.call("upload over", |c| {
            match c.call(cmd::UPLOAD_OVER, &over, FILE_ID_LEN) {
                Ok(b) => file_id_reply(&b).map(Some),
                Err(Fault::Server(e)) if e.code == ErrorCode::Incomplete => Ok(None),
                Err(f) => Err(f),
            }
        });
        match r {
            Ok(Some(id)) => {
                sf.remove();
                report.file_id = id;
                report.blocks_sent = sent.load(Ordering::Relaxed);
                report.blocks_skipped = skipped.load(Ordering::Relaxed);
                report.blocks_resent = resent.load(Ordering::Relaxed);
                report.bytes_transferred = moved.load(Ordering::Relaxed);
                return Ok(());
            }
            Ok(None) => log::info!("upload over: blocks still missing, round {}", round + 2),
            Err(e) if e.code() == Some(ErrorCode::HashMismatch) => {
                sf.remove();
                return Err(ClientError::Integrity(format!(
                    "server-side hash mismatch for {}: did it change during the upload? \
                     The server discarded the session; rerun to upload it again",
                    job.path.display()
                )));
            }
            Err(e) if e.code() == Some(ErrorCode::UnknownUpload) => {
                report.file_id = ended(link, upload_id, &sf, e)?;
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    }
    Err(ClientError::Integrity(format!(
        "upload of {}: the server still reports missing blocks after {MAX_ROUNDS} rounds",
        job.path.display()
    )))
}

/// The file the upload `id` ended as, if it did: UPLOAD_OVER is idempotent and answers a
/// finished upload's file id again (also one a node of the group finishes for a peer that died
/// committing it).
fn finished_as(link: &mut Link, id: [u8; UPLOAD_ID_LEN]) -> Result<Option<String>> {
    link.call("upload over", |c| {
        match c.call(cmd::UPLOAD_OVER, &id, FILE_ID_LEN) {
            Ok(b) => file_id_reply(&b).map(Some),
            Err(Fault::Server(e))
                if matches!(
                    e.code,
                    ErrorCode::UnknownUpload | ErrorCode::Incomplete | ErrorCode::HashMismatch
                ) =>
            {
                Ok(None)
            }
            Err(f) => Err(f),
        }
    })
}

/// The server no longer knows session `id` (`e`): it either ended as a file whose reply was
/// lost (a commit on a node that then died, or a retried OVER), whose id this returns, or it
/// expired; then the local state goes, so a rerun starts a fresh session, and the error says so.
fn ended(
    link: &mut Link,
    id: [u8; UPLOAD_ID_LEN],
    sf: &state::StateFile,
    e: ClientError,
) -> Result<String> {
    let _ = std::fs::remove_file(sf.path());
    if let Some(file_id) = finished_as(link, id)? {
        return Ok(file_id);
    }
    Err(ClientError::Integrity(format!(
        "{e}; upload session {} expired on the server, rerun to start a new one",
        hex::encode(id)
    )))
}
