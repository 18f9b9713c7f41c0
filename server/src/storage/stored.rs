//! Stored files: STAT, the one opener of a stored file (DOWNLOAD, the HTTP gateway and
//! UPLOAD_PROVE all read through it), DOWNLOAD (a range and its CRC32C), DELETE,
//! DOWNLOAD_OVER.

use super::*;
use crate::meta::FileRec;
use ferry_common::proto::{DownloadReq, ErrorCode};
use ferry_common::token::Scope;
use log::{info, warn};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;

impl Storage {
    pub fn stat(&self, who: &Who, id: &str) -> OpResult<FileRec> {
        match self.meta.file(id, &who.app) {
            Ok(Some(f)) => Ok(f),
            Ok(None) => Err(OpError::new(
                ErrorCode::NotFound,
                format!("no such file {id}"),
            )),
            Err(e) => Err(db_err(e, "file lookup")),
        }
    }

    /// Whether the session may read file `id` over the binary protocol. Any user of the app
    /// may, unless the app's files are their owners' to read (`[apps.APP] reads = "owner"`):
    /// then only the owner, a token with the admin scope, or a read share of this very file
    /// (the app's backend vouched for it); anyone else hears what a missing file gets.
    pub fn may_read(&self, who: &Who, id: &str, grant: &crate::access::Grant) -> OpResult<()> {
        if !self.cfg.owner_reads(&who.app)
            || grant.scope.contains(Scope::ADMIN)
            || grant.limits.file.as_deref() == Some(id)
        {
            return Ok(());
        }
        match self.stat(who, id) {
            Ok(f) if f.user != who.user => Err(OpError::new(
                ErrorCode::NotFound,
                format!("no such file {id}"),
            )),
            _ => Ok(()),
        }
    }

    /// The stored file `id` of `who.app`, looked up and opened for reading: NotFound for
    /// another app's file or one that does not exist, Io when the record has no readable file.
    pub fn open_stored(&self, who: &Who, id: &str) -> OpResult<(FileRec, File)> {
        let rec = self.stat(who, id)?;
        let file = open_noatime(&self.root.join(&rec.path))
            .map_err(|e| io_err(&e, &format!("cannot open stored file {id} ({})", rec.path)))?;
        Ok((rec, file))
    }

    /// Opens a range for download and works out its CRC32C: the whole blocks inside the range
    /// from the stored per-block table, only the partial blocks at its edges by reading them.
    /// So the bytes read never exceed the bytes the reply sends (with a table, at most two
    /// partial blocks whatever the range), and the payload goes by sendfile.
    pub fn download(&self, who: &Who, req: &DownloadReq) -> OpResult<Download> {
        let (f, file) = self.open_stored(who, &req.file_id)?;
        if req.offset > f.size {
            return Err(OpError::new(
                ErrorCode::Range,
                format!(
                    "offset {} is past the end of the file ({} bytes)",
                    req.offset, f.size
                ),
            ));
        }
        let len = req.len.min(f.size - req.offset);
        let bs = u64::from(f.block_size);
        let blocks_ok = bs > 0 && f.crcs.len() as u64 == f.size.div_ceil(bs);
        let read_err = |e: io::Error| io_err(&e, &format!("cannot read file {}", f.id));
        let (crc, read) = if blocks_ok {
            table_crc(&file, &f.crcs, bs, f.size, req.offset, len).map_err(read_err)?
        } else {
            (crc_range(&file, req.offset, len).map_err(read_err)?, len)
        };
        Ok(Download {
            file,
            offset: req.offset,
            len,
            crc,
            read,
        })
    }

    /// Deletes a stored file: the session user's own, or (`admin`: a token with the admin
    /// scope) any user's of the app. Reading stays a capability of whoever holds the id.
    pub fn delete(&self, who: &Who, id: &str, admin: bool) -> OpResult<()> {
        let owner = (!admin).then_some(who.user.as_str());
        let f = match self.meta.delete_file(id, &who.app, owner) {
            Ok(Some(f)) => f,
            Ok(None) => {
                // Tell "not yours" from "not there": the file is visible to every reader.
                return Err(match self.meta.file(id, &who.app) {
                    Ok(Some(f)) if f.user != who.user => OpError::new(
                        ErrorCode::Forbidden,
                        format!(
                            "file {id} belongs to another user of app {}: only its owner, or a \
                             token with the admin scope, may delete it",
                            who.app
                        ),
                    ),
                    _ => OpError::new(ErrorCode::NotFound, format!("no such file {id}")),
                });
            }
            Err(e) => return Err(db_err(e, "file delete")),
        };
        self.deleted.fetch_add(1, Ordering::Release);
        // The record is marked deleting (invisible) first, the bytes go next, the record last:
        // a crash anywhere in between is finished at start-up, so no file outlives its record.
        let path = self.root.join(&f.path);
        match fs::remove_file(&path) {
            Ok(()) => {
                let _ = fsync_dir(path.parent().unwrap_or(&self.root));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                // The record stays in `deleting`, so the next start-up tries again.
                warn!("file {id}: cannot remove {}: {e}", path.display());
                return Ok(());
            }
        }
        if let Err(e) = self.meta.drop_file(id) {
            warn!("file {id}: bytes removed but the record stays deleting until restart: {e:#}");
        }
        info!("file {id} deleted by app {} user {}", who.app, who.user);
        Ok(())
    }

    pub fn download_over(&self, who: &Who, id: &str) -> OpResult<()> {
        let f = self.stat(who, id)?;
        let n = self.downloads_over.fetch_add(1, Ordering::Relaxed) + 1;
        info!(
            "download of file {} ({} bytes) finished by app {} user {} ({n} so far)",
            f.id, f.size, who.app, who.user
        );
        Ok(())
    }
}

/// CRC32C of `[off, off + len)` of a stored file of `size` bytes whose blocks of `bs` bytes
/// have the CRCs `crcs`: whole blocks from the table, the partial blocks at the edges read.
/// Returns the CRC and how many bytes were read for it.
fn table_crc(
    file: &File,
    crcs: &[u32],
    bs: u64,
    size: u64,
    off: u64,
    len: u64,
) -> io::Result<(u32, u64)> {
    let end = off + len;
    let (mut crc, mut pos, mut read) = (0u32, off, 0u64);
    while pos < end {
        let idx = pos / bs;
        let (start, stop) = (idx * bs, ((idx + 1) * bs).min(size));
        let piece = stop.min(end) - pos;
        let part = if pos == start && stop <= end {
            crcs[idx as usize]
        } else {
            read += piece;
            crc_range(file, pos, piece)?
        };
        crc = crc32c::crc32c_combine(crc, part, piece as usize);
        pos += piece;
    }
    Ok((crc, read))
}

/// CRC32C of a byte range of a file, read in bounded pieces.
pub(super) fn crc_range(f: &File, off: u64, len: u64) -> io::Result<u32> {
    let mut buf = vec![0u8; (256 * 1024).min(len as usize).max(1)];
    let mut crc = 0;
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        f.read_exact_at(&mut buf[..n], off + done)?;
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        done += n as u64;
    }
    Ok(crc)
}

/// An opened download range: the connection sends `len` bytes at `offset` of `file`.
pub struct Download {
    pub file: File,
    pub offset: u64,
    pub len: u64,
    pub crc: u32,
    /// Bytes read to work out `crc` (only partial blocks are read).
    pub read: u64,
}

/// Opens a stored file for reading without access-time updates (every read or sendfile would
/// touch the inode otherwise); O_NOATIME needs the file's owner, so anything else opens it
/// plainly.
fn open_noatime(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    match fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOATIME)
        .open(path)
    {
        Err(e) if e.raw_os_error() == Some(nix::libc::EPERM) => File::open(path),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Every range of a file of 4.5 blocks: the CRC is the bytes' CRC, and only the partial
    /// blocks at the edges are read (never more than the range, at most two blocks).
    #[test]
    fn range_crcs_come_from_the_table_and_the_edges() {
        let bs = 64u64;
        let data: Vec<u8> = (0..288u32).map(|i| (i * 7 + i / 5) as u8).collect();
        let crcs: Vec<u32> = data.chunks(bs as usize).map(crc32c::crc32c).collect();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&data).unwrap();
        let size = data.len() as u64;
        for off in (0..=size).step_by(7).chain([64, 128, 256]) {
            for len in [0, 1, 63, 64, 65, 128, 200, 288] {
                let len = len.min(size - off);
                let (crc, read) = table_crc(&f, &crcs, bs, size, off, len).unwrap();
                let want = crc32c::crc32c(&data[off as usize..(off + len) as usize]);
                assert_eq!(crc, want, "[{off}, +{len})");
                assert!(read <= len && read < 2 * bs, "[{off}, +{len}) read {read}");
                if off % bs == 0 && ((off + len) % bs == 0 || off + len == size) {
                    assert_eq!(read, 0, "whole blocks read nothing: [{off}, +{len})");
                }
            }
        }
    }
}
