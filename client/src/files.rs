//! Local file helpers: hashing with `pread` in bounded chunks, preallocation, names.

use crate::error::{ClientError, Result};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

const CHUNK: usize = 1 << 20;

/// SHA-256 of `len` bytes of `file` from `offset`. A file shorter than expected is an error
/// (it changed under us).
pub fn hash_range(file: &File, offset: u64, len: u64, path: &Path) -> Result<[u8; 32]> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK.min(len as usize).max(1)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], offset + done)
            .map_err(|e| read_error(path, offset + done, e))?;
        h.update(&buf[..n]);
        done += n as u64;
    }
    Ok(h.finalize().into())
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

pub fn read_error(path: &Path, offset: u64, e: std::io::Error) -> ClientError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        ClientError::Integrity(format!(
            "{} became shorter than {offset} bytes while reading it: it changed during the transfer",
            path.display()
        ))
    } else {
        ClientError::io(
            format!("cannot read {} at offset {offset}", path.display()),
            e,
        )
    }
}

/// Reserves `size` bytes for `file` (fallocate, or a sparse `set_len` where unsupported).
pub fn preallocate(file: &File, size: u64, path: &Path) -> Result<()> {
    if size > 0 && i64::try_from(size).is_ok() {
        let r = nix::fcntl::fallocate(file, nix::fcntl::FallocateFlags::empty(), 0, size as i64);
        if let Err(nix::errno::Errno::ENOSPC) = r {
            return Err(ClientError::io(
                format!("no space for {} bytes at {}", size, path.display()),
                std::io::Error::from_raw_os_error(nix::errno::Errno::ENOSPC as i32),
            ));
        }
    }
    file.set_len(size)
        .map_err(|e| ClientError::io(format!("cannot size {}", path.display()), e))
}

/// The name recorded on the server: the file name, cut to the protocol's 256 bytes, control
/// characters replaced (names are metadata only).
pub fn display_name(path: &Path) -> String {
    let raw = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut s: String = raw
        .chars()
        .map(|c| if c.is_control() { '_' } else { c })
        .collect();
    let mut cut = s.len().min(ferry_common::proto::NAME_LEN);
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s.truncate(cut);
    s
}

/// Takes an advisory exclusive lock on `path` (created if missing, never truncated) for as long
/// as the returned file is open, so two ferry processes cannot work on the same resume state or
/// `.part` file at once. A filesystem without locks is not an error.
pub fn lock_exclusive(path: &Path, what: &str) -> Result<File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| ClientError::io(format!("cannot open {}", path.display()), e))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(ClientError::Input(format!(
            "another ferry process is {what} (lock on {} is held)",
            path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => {
            log::debug!("no lock on {}: {e}", path.display());
            Ok(f)
        }
    }
}

/// Makes a rename durable: fsync the directory holding the new name.
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.part");
        let a = lock_exclusive(&p, "downloading x").unwrap();
        let e = lock_exclusive(&p, "downloading x").unwrap_err();
        assert!(
            e.to_string()
                .contains("another ferry process is downloading x"),
            "{e}"
        );
        drop(a);
        lock_exclusive(&p, "downloading x").unwrap();
    }

    #[test]
    fn names_are_cut_and_cleaned() {
        assert_eq!(display_name(Path::new("/a/b/c.txt")), "c.txt");
        assert_eq!(display_name(Path::new("x\ny")), "x_y");
        let long = "é".repeat(200);
        let n = display_name(Path::new(&long));
        assert!(n.len() <= 256 && n.len() >= 254, "{}", n.len());
    }

    #[test]
    fn hash_range_matches_whole_hash_and_detects_short_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let data: Vec<u8> = (0..3 * CHUNK + 17).map(|i| (i * 7) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let f = File::open(&p).unwrap();
        assert_eq!(
            hash_range(&f, 0, data.len() as u64, &p).unwrap(),
            sha256(&data)
        );
        assert_eq!(hash_range(&f, 5, 100, &p).unwrap(), sha256(&data[5..105]));
        assert_eq!(hash_range(&f, 0, 0, &p).unwrap(), sha256(b""));
        assert!(matches!(
            hash_range(&f, 0, data.len() as u64 + 1, &p),
            Err(ClientError::Integrity(_))
        ));
    }
}
