//! Blocks of a big file (UPLOAD_BLOCK 74): claimed by one connection, streamed to their place
//! in the temp file, made durable and recorded as a group before they are acknowledged.

use super::*;
use crate::meta::UploadId;
use ferry_common::proto::{BlockAck, BlockMeta, ErrorCode};
use log::{debug, warn};
use std::collections::HashMap;
use std::sync::Arc;

impl Storage {
    /// Makes verified blocks durable and records them, as one group: one fdatasync per file
    /// (`sync_blocks`), then one transaction for every block. Only then is a block stored (and
    /// may be acknowledged). Results come back in the order of `blocks`.
    pub fn persist_blocks(&self, mut blocks: Vec<BlockWriter>) -> Vec<OpResult<BlockAck>> {
        let mut results: Vec<Option<OpResult<BlockAck>>> = vec![None; blocks.len()];
        let group = BlockGroup(&blocks);
        self.phase("block-written", &group);
        if self.cfg.sync_blocks {
            let mut synced: HashMap<UploadId, Option<OpError>> = HashMap::new();
            for (i, w) in blocks.iter().enumerate() {
                let id = w.session.rec.id;
                let failed = synced.entry(id).or_insert_with(|| {
                    w.session
                        .file
                        .sync_data()
                        .err()
                        .map(|e| io_err(&e, "block sync failed"))
                });
                if let Some(e) = failed {
                    results[i] = Some(Err(e.clone()));
                }
            }
        }
        for (i, w) in blocks.iter().enumerate() {
            if results[i].is_none()
                && let Err(e) = w.session.state.lock().live()
            {
                results[i] = Some(Err(e));
            }
        }
        self.phase("block-synced", &group);
        let expires = self.expiry();
        let marks: Vec<(UploadId, u32, u32)> = blocks
            .iter()
            .zip(&results)
            .filter(|(_, r)| r.is_none())
            .map(|(w, _)| (w.session.rec.id, w.idx, w.crc))
            .collect();
        if !marks.is_empty()
            && let Err(e) = self.meta.mark_blocks(&marks, expires)
        {
            let e = db_err(e, "block record");
            for r in results.iter_mut().filter(|r| r.is_none()) {
                *r = Some(Err(e.clone()));
            }
        }
        self.phase("block-recorded", &BlockGroup(&blocks));
        for (w, r) in blocks.iter_mut().zip(results.iter_mut()) {
            if r.is_some() {
                continue; // failed: dropping the writer releases the block, which stays missing
            }
            w.session.state.lock().block_stored(w.idx, w.crc, expires);
            w.done = true;
            debug!(
                "upload {} block {} stored",
                hex::encode(w.session.rec.id),
                w.idx
            );
            *r = Some(Ok(BlockAck::Written));
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or(Err(OpError::new(
                    ErrorCode::Internal,
                    "block not persisted",
                )))
            })
            .collect()
    }

    /// Checks a block header and claims the block for this connection. A block that is already
    /// stored, or being written by someone else, is answered without touching the file.
    pub fn block_begin(&self, who: &Who, m: &BlockMeta) -> OpResult<BlockStart> {
        let s = self.session(who, &m.upload_id)?;
        let r = &s.rec;
        if m.index >= r.blocks {
            return Err(OpError::new(
                ErrorCode::BadBlock,
                format!(
                    "block index {} past the last block {}",
                    m.index,
                    r.blocks - 1
                ),
            ));
        }
        let want_off = u64::from(m.index) * u64::from(r.block_size);
        let want_len = s.block_len(m.index);
        if m.offset != want_off || u64::from(m.len) != want_len {
            return Err(OpError::new(
                ErrorCode::BadBlock,
                format!(
                    "block {} must be at offset {want_off} with length {want_len}, got offset {} length {}",
                    m.index, m.offset, m.len
                ),
            ));
        }
        if !s.state.lock().claim_block(m.index)? {
            return Ok(BlockStart::Stored);
        }
        // Dropped on an error below, the writer releases the block.
        let w = BlockWriter {
            session: s,
            idx: m.index,
            offset: m.offset,
            len: u64::from(m.len),
            pos: 0,
            crc: 0,
            expect: m.crc32c,
            err: None,
            done: false,
        };
        // Disk is taken a block at a time, as blocks arrive (an INIT reserved none).
        self.check_reserve(w.len)?;
        allocate(&w.session.file, w.offset, w.len)
            .map_err(|e| io_err(&e, &format!("cannot allocate block {}", w.idx)))?;
        Ok(BlockStart::Write(w))
    }
}

/// What to do with an UPLOAD_BLOCK payload.
pub enum BlockStart {
    /// Stream it to the file.
    Write(BlockWriter),
    /// Already stored: drain it unwritten and answer "already stored" (fencing).
    Stored,
}

/// Streams one block's payload to its place in the temp file. Dropped unfinished (connection
/// died mid-block), it releases the block, which stays missing.
pub struct BlockWriter {
    session: Arc<Session>,
    idx: u32,
    offset: u64,
    len: u64,
    pos: u64,
    crc: u32,
    expect: u32,
    err: Option<OpError>,
    done: bool,
}

impl BlockWriter {
    pub fn session(&self) -> &Arc<Session> {
        &self.session
    }

    pub fn write(&mut self, st: &Storage, data: &[u8]) {
        if self.err.is_none() {
            if let Err(e) = st.write_at(&self.session.file, data, self.offset + self.pos) {
                warn!(
                    "upload {} block {}: write failed: {e}",
                    hex::encode(self.session.rec.id),
                    self.idx
                );
                self.err = Some(io_err(&e, &format!("block {} write failed", self.idx)));
            }
            self.crc = crc32c::crc32c_append(self.crc, data);
        }
        self.pos += data.len() as u64;
    }

    /// The whole payload arrived: check it, make it durable, record it, then acknowledge.
    /// The whole payload arrived: checks its length and CRC. A verified block still has to be
    /// made durable and recorded ([`Storage::persist_blocks`]) before it is acknowledged.
    pub fn verify(mut self) -> OpResult<BlockWriter> {
        if let Some(e) = self.err.take() {
            return Err(e);
        }
        if self.pos != self.len {
            return Err(OpError::new(
                ErrorCode::BadBlock,
                "block payload length mismatch",
            ));
        }
        if self.crc != self.expect {
            warn!(
                "upload {} block {}: CRC32C {:08x} != announced {:08x}; block stays missing",
                hex::encode(self.session.rec.id),
                self.idx,
                self.crc,
                self.expect
            );
            return Err(OpError::new(
                ErrorCode::Crc,
                format!("block {} does not match its CRC32C", self.idx),
            ));
        }
        Ok(self)
    }
}

impl Drop for BlockWriter {
    fn drop(&mut self) {
        if !self.done {
            self.session.state.lock().release_block(self.idx);
        }
    }
}

/// A group of blocks as the phase log names them: "upload <id> blocks [i, j, ...]".
struct BlockGroup<'a>(&'a [BlockWriter]);

impl std::fmt::Display for BlockGroup<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, w) in self.0.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(
                f,
                "{sep}upload {} block {}",
                hex::encode(w.session.rec.id),
                w.idx
            )?;
        }
        Ok(())
    }
}
