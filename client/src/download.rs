//! Download: STAT, then N threads fetch block-aligned ranges into a preallocated `PATH.part`
//! (each block's CRC32C checked, written with `pwrite`, recorded in `PATH.part.ferry`), then the
//! whole-file SHA-256 is checked against the server's, and `PATH.part` is renamed to `PATH`.
//! Nothing is ever written to `PATH` itself until it is complete and verified.

use crate::conn::Fault;
use crate::error::{ClientError, Result};
use crate::files::{self, hash_range};
use crate::link::{Link, Shared};
use crate::pool::{self, Outcome};
use crate::report::{Progress, TransferReport};
use crate::settings::DEFAULT_BLOCK_SIZE;
use crate::state::{self, BEGUN, Bitmap, DONE, DownloadHead};
use ferry_common::proto::{
    BLOCK_MAX, BLOCK_MIN, DownloadReq, STAT_REPLY_LEN, StatReply, cmd, encode_file_id,
};
use parking_lot::Mutex;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

pub struct DownloadJob<'a> {
    pub shared: &'a Shared,
    pub file_id: &'a str,
    pub out: &'a Path,
    pub threads: usize,
    pub progress: &'a dyn Progress,
}

pub fn stat(link: &mut Link, file_id: &str) -> Result<StatReply> {
    let body = encode_file_id(file_id).map_err(|e| bad_id(file_id, e))?;
    link.call("stat", |c| {
        let b = c.call(cmd::STAT, &body, STAT_REPLY_LEN)?;
        StatReply::decode(&b).map_err(|e| Fault::Garbled(format!("STAT reply: {e}")))
    })
}

pub fn bad_id(file_id: &str, e: impl std::fmt::Display) -> ClientError {
    ClientError::Input(format!("bad file id {file_id:?}: {e}"))
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s: OsString = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The output's directory must exist; the output must not be a directory.
fn check_output(out: &Path) -> Result<PathBuf> {
    if out.as_os_str().is_empty() {
        return Err(ClientError::Input("empty output path".into()));
    }
    if out.is_dir() {
        return Err(ClientError::Input(format!(
            "output {} is a directory; give a file path",
            out.display()
        )));
    }
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(ClientError::Input(format!(
            "output directory {} does not exist",
            dir.display()
        )));
    }
    Ok(dir)
}

pub fn download(job: &DownloadJob) -> Result<TransferReport> {
    let started = Instant::now();
    let dir = check_output(job.out)?;
    let req_id = encode_file_id(job.file_id).map_err(|e| bad_id(job.file_id, e))?;
    let mut link = Link::new(job.shared);
    let st = stat(&mut link, job.file_id)?;
    // Ranges aligned to the stored block size are served with sendfile.
    let chunk = if (BLOCK_MIN..=BLOCK_MAX as u32).contains(&st.block_size) {
        st.block_size
    } else {
        DEFAULT_BLOCK_SIZE
    };
    let size = st.size;
    let blocks = state::block_count(size, chunk).ok_or_else(|| {
        ClientError::Integrity(format!(
            "{}: size {size} is beyond 2^20 blocks",
            job.file_id
        ))
    })?;
    let part = with_suffix(job.out, ".part");
    let spath = with_suffix(job.out, ".part.ferry");
    let head = DownloadHead {
        file_id: job.file_id.to_owned(),
        size,
        sha256: st.sha256,
        block_size: chunk,
    };
    // Held until we return, so a second `ferry download -o PATH` cannot write the same .part.
    let _lock = files::lock_exclusive(&part, &format!("downloading to {}", job.out.display()))?;
    let open_part = |create: bool| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(create)
            .open(&part)
            .map_err(|e| ClientError::io(format!("cannot open {}", part.display()), e))
    };
    let resumable = state::open_download(&spath)
        .filter(|(_, h)| *h == head)
        .and_then(|s| {
            let len = std::fs::metadata(&part).ok()?.len();
            (len == size).then_some(s)
        });
    let (sf, pf, resumed) = match resumable {
        Some((sf, _)) => (sf, open_part(false)?, true),
        None => {
            let pf = open_part(true)?;
            files::preallocate(&pf, size, &part)?;
            (state::create_download(&spath, &head, blocks)?, pf, false)
        }
    };
    let prior_begun = sf.bitmap(BEGUN);
    let done_map = sf.bitmap(DONE);
    let missing = done_map.missing();
    let block_len = |i: u32| (size - u64::from(i) * u64::from(chunk)).min(u64::from(chunk));
    let have: u64 = (0..blocks)
        .filter(|&i| done_map.get(i))
        .map(block_len)
        .sum();
    job.progress.start(size, have);

    let mut report = TransferReport {
        op: "download".into(),
        file_id: job.file_id.to_owned(),
        bytes: size,
        block_size: chunk,
        blocks_total: blocks,
        blocks_skipped: blocks - missing.len() as u32,
        resumed,
        ..Default::default()
    };
    let fetched = AtomicU32::new(0);
    let resent = AtomicU32::new(0);
    let moved = AtomicU64::new(0);
    let this_run = Mutex::new(Bitmap::new(blocks));
    // Distinct blocks counted as re-sent (a block retried twice counts once).
    let resent_map = Mutex::new(Bitmap::new(blocks));
    let work = |link: &mut Link, buf: &mut Vec<u8>, i: u32| -> Result<Outcome> {
        let offset = u64::from(i) * u64::from(chunk);
        let len = block_len(i);
        let req = DownloadReq {
            file_id: job.file_id.to_owned(),
            offset,
            len,
        }
        .encode()
        .map_err(|e| bad_id(job.file_id, e))?;
        let again = this_run.lock().set(i) || prior_begun.get(i);
        sf.mark(BEGUN, i)?;
        let mut tries = 0u32;
        link.call(&format!("download block {i}"), |c| {
            tries += 1;
            if (tries > 1 || again) && !resent_map.lock().set(i) {
                resent.fetch_add(1, Ordering::Relaxed);
            }
            moved.fetch_add(len, Ordering::Relaxed);
            let crc = c.download(&req, len as usize, buf)?;
            if crc32c::crc32c(buf) != crc {
                return Err(Fault::Corrupt(format!(
                    "block {i} from {}: CRC32C mismatch",
                    c.peer()
                )));
            }
            Ok(())
        })?;
        pf.write_all_at(buf, offset).map_err(|e| {
            ClientError::io(
                format!("cannot write {} at offset {offset}", part.display()),
                e,
            )
        })?;
        sf.mark(DONE, i)?;
        fetched.fetch_add(1, Ordering::Relaxed);
        job.progress.advance(len);
        job.progress.counters(
            resent.load(Ordering::Relaxed),
            job.shared.failovers.load(Ordering::Relaxed),
        );
        Ok(Outcome::Done)
    };
    pool::run(job.shared, job.threads, missing, "download", work)?;

    verify_and_commit(job, &pf, &part, &dir, &st)?;
    sf.remove();
    let over = req_id;
    if let Err(e) = link.call("download over", |c| c.call(cmd::DOWNLOAD_OVER, &over, 0)) {
        // The file is complete and verified; the server only counts finished downloads.
        log::warn!("download over for {}: {e}", job.file_id);
    }
    report.blocks_sent = fetched.load(Ordering::Relaxed);
    report.blocks_resent = resent.load(Ordering::Relaxed);
    report.bytes_transferred = moved.load(Ordering::Relaxed);
    report.failovers = job.shared.failovers.load(Ordering::Relaxed);
    report.retries = job.shared.retries.load(Ordering::Relaxed);
    report.finish(started.elapsed());
    Ok(report)
}

/// Whole-file SHA-256 against the server's, fsync, atomic rename. A mismatch discards the
/// partial file and its state so a rerun starts clean.
fn verify_and_commit(
    job: &DownloadJob,
    pf: &File,
    part: &Path,
    dir: &Path,
    st: &StatReply,
) -> Result<()> {
    let got = hash_range(pf, 0, st.size, part)?;
    if got != st.sha256 {
        let _ = std::fs::remove_file(part);
        let _ = std::fs::remove_file(with_suffix(job.out, ".part.ferry"));
        return Err(ClientError::Integrity(format!(
            "{}: downloaded bytes hash to {}, the server says {}; partial file discarded",
            job.file_id,
            hex::encode(got),
            hex::encode(st.sha256)
        )));
    }
    pf.sync_all()
        .map_err(|e| ClientError::io(format!("cannot sync {}", part.display()), e))?;
    std::fs::rename(part, job.out).map_err(|e| {
        ClientError::io(
            format!("cannot rename {} to {}", part.display(), job.out.display()),
            e,
        )
    })?;
    files::sync_dir(dir);
    Ok(())
}
