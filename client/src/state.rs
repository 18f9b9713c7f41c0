//! Resume state on disk (like aria2's control file): a fixed header followed by one or two block
//! bitmaps. Bits are set in place with a one-byte `pwrite`, so marking a block costs one small
//! write and a `kill -9` at any moment leaves a file that is at worst one bit behind.
//!
//! - upload: `<state dir>/up-<key>.state`, header = upload id, SHA-256, size, block size;
//!   bitmap = blocks whose sending began (to count re-sent blocks after a crash).
//! - download: `PATH.part.ferry`, header = file id, size, SHA-256, block size;
//!   bitmaps = blocks begun, blocks whose bytes are written to `PATH.part`.

use crate::error::{ClientError, Result};
use ferry_common::proto::{BLOCKS_MAX, FILE_ID_LEN, SHA256_LEN, UPLOAD_ID_LEN};
use parking_lot::Mutex;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const UP_MAGIC: &[u8; 8] = b"FERRYUP1";
const DL_MAGIC: &[u8; 8] = b"FERRYDL1";

/// A bitmap of `blocks` bits, bit `i % 8` of byte `i / 8` (the protocol's layout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    pub blocks: u32,
    pub bytes: Vec<u8>,
}

impl Bitmap {
    pub fn new(blocks: u32) -> Self {
        Bitmap {
            blocks,
            bytes: vec![0; (blocks as usize).div_ceil(8)],
        }
    }
    pub fn get(&self, i: u32) -> bool {
        i < self.blocks && self.bytes[(i / 8) as usize] & (1 << (i % 8)) != 0
    }
    /// Sets bit `i`; returns whether it was already set.
    pub fn set(&mut self, i: u32) -> bool {
        if i >= self.blocks {
            return false;
        }
        let was = self.get(i);
        self.bytes[(i / 8) as usize] |= 1 << (i % 8);
        was
    }
    pub fn count(&self) -> u32 {
        self.bytes.iter().map(|b| b.count_ones()).sum()
    }
    pub fn missing(&self) -> Vec<u32> {
        (0..self.blocks).filter(|&i| !self.get(i)).collect()
    }
}

/// Header fields of an upload state file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadHead {
    pub upload_id: [u8; UPLOAD_ID_LEN],
    pub sha256: [u8; SHA256_LEN],
    pub size: u64,
    pub block_size: u32,
}

/// Header fields of a download state file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadHead {
    pub file_id: String,
    pub size: u64,
    pub sha256: [u8; SHA256_LEN],
    pub block_size: u32,
}

impl UploadHead {
    fn encode(&self) -> Vec<u8> {
        let mut b = UP_MAGIC.to_vec();
        b.extend_from_slice(&self.upload_id);
        b.extend_from_slice(&self.sha256);
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&self.block_size.to_be_bytes());
        b
    }
    fn decode(b: &[u8]) -> Option<Self> {
        let b = b.strip_prefix(UP_MAGIC)?;
        Some(UploadHead {
            upload_id: b.get(..16)?.try_into().ok()?,
            sha256: b.get(16..48)?.try_into().ok()?,
            size: u64::from_be_bytes(b.get(48..56)?.try_into().ok()?),
            block_size: u32::from_be_bytes(b.get(56..60)?.try_into().ok()?),
        })
    }
    const LEN: usize = 8 + 16 + 32 + 8 + 4;
}

impl DownloadHead {
    fn encode(&self) -> Vec<u8> {
        let mut b = DL_MAGIC.to_vec();
        let mut id = self.file_id.as_bytes().to_vec();
        id.resize(FILE_ID_LEN, 0);
        b.extend_from_slice(&id);
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&self.sha256);
        b.extend_from_slice(&self.block_size.to_be_bytes());
        b
    }
    fn decode(b: &[u8]) -> Option<Self> {
        let b = b.strip_prefix(DL_MAGIC)?;
        let id = b.get(..FILE_ID_LEN)?;
        let end = id.iter().position(|&c| c == 0).unwrap_or(FILE_ID_LEN);
        let f = FILE_ID_LEN;
        Some(DownloadHead {
            file_id: std::str::from_utf8(&id[..end]).ok()?.to_owned(),
            size: u64::from_be_bytes(b.get(f..f + 8)?.try_into().ok()?),
            sha256: b.get(f + 8..f + 40)?.try_into().ok()?,
            block_size: u32::from_be_bytes(b.get(f + 40..f + 44)?.try_into().ok()?),
        })
    }
    const LEN: usize = 8 + FILE_ID_LEN + 8 + 32 + 4;
}

/// Number of blocks for a size and block size (0 for an empty file).
pub fn block_count(size: u64, block_size: u32) -> Option<u32> {
    if block_size == 0 {
        return None;
    }
    let n = size.div_ceil(u64::from(block_size));
    (n <= u64::from(BLOCKS_MAX)).then_some(n as u32)
}

/// An open state file: header, then `maps.len()` bitmaps, kept in memory and on disk.
pub struct StateFile {
    path: PathBuf,
    inner: Mutex<(File, Vec<Bitmap>)>,
    head_len: usize,
    map_len: usize,
}

impl StateFile {
    fn create(path: &Path, head: &[u8], blocks: u32, maps: usize) -> Result<Self> {
        let map_len = (blocks as usize).div_ceil(8);
        let mut bytes = head.to_vec();
        bytes.resize(head.len() + maps * map_len, 0);
        let ctx = || format!("cannot write state file {}", path.display());
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| ClientError::io(ctx(), e))?;
        f.write_all(&bytes).map_err(|e| ClientError::io(ctx(), e))?;
        Ok(StateFile {
            path: path.to_owned(),
            inner: Mutex::new((f, vec![Bitmap::new(blocks); maps])),
            head_len: head.len(),
            map_len,
        })
    }

    /// Opens an existing state file; None when it is missing, damaged or of another shape.
    fn open(
        path: &Path,
        head_len: usize,
        blocks_of: impl Fn(&[u8]) -> Option<u32>,
        maps: usize,
    ) -> Option<(Self, Vec<u8>)> {
        let f = OpenOptions::new().read(true).write(true).open(path).ok()?;
        let len = f.metadata().ok()?.len();
        // Bounded: a header plus at most two 128 KiB bitmaps.
        if len > (head_len + 2 * (BLOCKS_MAX as usize / 8)) as u64 {
            return None;
        }
        let mut bytes = vec![0u8; len as usize];
        f.read_exact_at(&mut bytes, 0).ok()?;
        let head = bytes.get(..head_len)?.to_vec();
        let blocks = blocks_of(&head)?;
        let map_len = (blocks as usize).div_ceil(8);
        if bytes.len() != head_len + maps * map_len {
            return None;
        }
        let bitmaps = (0..maps)
            .map(|m| Bitmap {
                blocks,
                bytes: bytes[head_len + m * map_len..head_len + (m + 1) * map_len].to_vec(),
            })
            .collect();
        Some((
            StateFile {
                path: path.to_owned(),
                inner: Mutex::new((f, bitmaps)),
                head_len,
                map_len,
            },
            head,
        ))
    }

    /// Sets bit `i` of bitmap `map` in memory and on disk; returns whether it was set before.
    pub fn mark(&self, map: usize, i: u32) -> Result<bool> {
        let mut g = self.inner.lock();
        let (file, maps) = &mut *g;
        let was = maps[map].set(i);
        if !was {
            let byte = maps[map].bytes[(i / 8) as usize];
            let at = (self.head_len + map * self.map_len) as u64 + u64::from(i / 8);
            file.write_all_at(&[byte], at).map_err(|e| {
                ClientError::io(
                    format!("cannot update state file {}", self.path.display()),
                    e,
                )
            })?;
        }
        Ok(was)
    }

    pub fn bitmap(&self, map: usize) -> Bitmap {
        self.inner.lock().1[map].clone()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Bitmap indices in state files.
pub const BEGUN: usize = 0;
pub const DONE: usize = 1;

pub fn create_upload(path: &Path, head: &UploadHead, blocks: u32) -> Result<StateFile> {
    StateFile::create(path, &head.encode(), blocks, 1)
}

pub fn open_upload(path: &Path) -> Option<(StateFile, UploadHead)> {
    let blocks_of = |h: &[u8]| {
        let u = UploadHead::decode(h)?;
        block_count(u.size, u.block_size)
    };
    let (sf, head) = StateFile::open(path, UploadHead::LEN, blocks_of, 1)?;
    Some((sf, UploadHead::decode(&head)?))
}

pub fn create_download(path: &Path, head: &DownloadHead, blocks: u32) -> Result<StateFile> {
    StateFile::create(path, &head.encode(), blocks, 2)
}

pub fn open_download(path: &Path) -> Option<(StateFile, DownloadHead)> {
    let blocks_of = |h: &[u8]| {
        let d = DownloadHead::decode(h)?;
        block_count(d.size, d.block_size)
    };
    let (sf, head) = StateFile::open(path, DownloadHead::LEN, blocks_of, 2)?;
    Some((sf, DownloadHead::decode(&head)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_bits_and_missing() {
        let mut b = Bitmap::new(10);
        assert_eq!(b.bytes.len(), 2);
        assert!(!b.set(0));
        assert!(b.set(0));
        b.set(9);
        b.set(42);
        assert_eq!(b.bytes, vec![0b1, 0b10]);
        assert_eq!(b.count(), 2);
        assert_eq!(b.missing(), (1..9).collect::<Vec<_>>());
        assert!(!b.get(42));
    }

    #[test]
    fn upload_state_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("up.state");
        let head = UploadHead {
            upload_id: [7; 16],
            sha256: [9; 32],
            size: 10 * 65536 + 1,
            block_size: 65536,
        };
        let sf = create_upload(&p, &head, 11).unwrap();
        assert!(!sf.mark(BEGUN, 3).unwrap());
        assert!(sf.mark(BEGUN, 3).unwrap());
        sf.mark(BEGUN, 10).unwrap();
        drop(sf);
        let (sf, back) = open_upload(&p).unwrap();
        assert_eq!(back, head);
        let m = sf.bitmap(BEGUN);
        assert!(m.get(3) && m.get(10) && !m.get(4));
        assert_eq!(m.count(), 2);
        sf.remove();
        assert!(!p.exists());
    }

    #[test]
    fn download_state_round_trip_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.part.ferry");
        let head = DownloadHead {
            file_id: "g1/000001".into(),
            size: 3 * 65536,
            sha256: [1; 32],
            block_size: 65536,
        };
        let sf = create_download(&p, &head, 3).unwrap();
        sf.mark(BEGUN, 0).unwrap();
        sf.mark(BEGUN, 1).unwrap();
        sf.mark(DONE, 0).unwrap();
        drop(sf);
        let (sf, back) = open_download(&p).unwrap();
        assert_eq!(back, head);
        assert_eq!(sf.bitmap(DONE).missing(), vec![1, 2]);
        assert_eq!(sf.bitmap(BEGUN).count(), 2);
        drop(sf);
        // A truncated or foreign file is ignored, not trusted.
        let full = std::fs::read(&p).unwrap();
        std::fs::write(&p, &full[..full.len() - 1]).unwrap();
        assert!(open_download(&p).is_none());
        std::fs::write(&p, b"FERRYUP1 something else").unwrap();
        assert!(open_download(&p).is_none());
        assert!(open_upload(&dir.path().join("missing")).is_none());
    }

    #[test]
    fn block_counts() {
        assert_eq!(block_count(0, 65536), Some(0));
        assert_eq!(block_count(1, 65536), Some(1));
        assert_eq!(block_count(65536, 65536), Some(1));
        assert_eq!(block_count(65537, 65536), Some(2));
        assert_eq!(block_count(u64::MAX, 65536), None);
        assert_eq!(block_count(5, 0), None);
    }
}
