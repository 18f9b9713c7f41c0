//! An upload session of a big file in memory: its phase and the only transitions between
//! phases (LIFECYCLE.md draws them), its acknowledged blocks, and the running hash of its
//! blocks in order.

use super::*;
use crate::meta::{Challenge, SessionRec, UploadId};
use ferry_common::proto::{Breakpoint, ErrorCode};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::time::Instant;

pub(super) const HASH_CHUNK: usize = 1 << 20;

/// Where an upload session is in its life on this node. Only the [`SessionState`] methods
/// below change it, each from the phases it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Open: blocks are written and recorded; UPLOAD_OVER or UPLOAD_PROVE may start.
    Receiving,
    /// UPLOAD_OVER or UPLOAD_PROVE is placing the file: no block is written meanwhile.
    Finishing,
    /// Idle for its whole lifetime: the reaper is deleting its row (only if no node recorded
    /// activity since). Nothing is written or recorded meanwhile; back to `Receiving` if a
    /// peer kept it alive.
    Expiring,
    /// Out of this node's table: stored as a file, discarded, expired, or ended by a peer. A
    /// writer still holding it records nothing.
    Ended,
}

/// Mutable state of an upload session.
pub(super) struct SessionState {
    phase: Phase,
    /// Blocks some connection is streaming right now (fencing: nobody else may write them).
    writing: HashSet<u32>,
    pub(super) stored: Breakpoint,
    pub(super) crcs: Vec<u32>,
    /// Last activity (opening, or a stored block), on the monotonic clock: a session expires
    /// after `session_ttl_secs` of real idleness (`fresh_session_ttl_secs` before its first
    /// block), so a wall-clock jump neither kills a live session nor keeps a dead one.
    /// The database keeps a wall-clock expiry too, only for sessions found at start-up.
    pub(super) active: Instant,
    /// The expiry in the session's DB row as this node last wrote or read it. Every node writes
    /// a new one on activity, so a different value in the DB means a peer saw activity: a
    /// comparison for equality, which no clock jump can fool.
    pub(super) db_expires: u64,
    pub(super) challenge: Option<Challenge>,
}

fn ended() -> OpError {
    OpError::new(ErrorCode::UnknownUpload, "upload session ended")
}

impl SessionState {
    /// A session entering the table `Receiving`: just opened, or loaded from the database
    /// with the blocks it has acknowledged.
    pub(super) fn new(
        stored: Breakpoint,
        crcs: Vec<u32>,
        active: Instant,
        db_expires: u64,
        challenge: Option<Challenge>,
    ) -> SessionState {
        SessionState {
            phase: Phase::Receiving,
            writing: HashSet::new(),
            stored,
            crcs,
            active,
            db_expires,
            challenge,
        }
    }

    pub(super) fn phase(&self) -> Phase {
        self.phase
    }

    /// Still served: `Receiving` or `Finishing`. Otherwise a request gets
    /// "upload session ended" (and a repeated OVER or PROVE the file it ended as).
    pub(super) fn live(&self) -> Result<(), OpError> {
        match self.phase {
            Phase::Receiving | Phase::Finishing => Ok(()),
            Phase::Expiring | Phase::Ended => Err(ended()),
        }
    }

    /// Whether some connection is streaming a block of it.
    pub(super) fn writing_any(&self) -> bool {
        !self.writing.is_empty()
    }

    /// UPLOAD_BLOCK claims block `idx` for one connection (`Receiving` only): `Ok(false)` when
    /// it is already stored, Busy while another connection writes it or the file is being
    /// placed.
    pub(super) fn claim_block(&mut self, idx: u32) -> OpResult<bool> {
        self.live()?;
        if self.stored.has(idx) {
            return Ok(false);
        }
        if self.phase == Phase::Finishing || !self.writing.insert(idx) {
            return Err(OpError::new(
                ErrorCode::Busy,
                format!("block {idx} is being written by another connection"),
            ));
        }
        Ok(true)
    }

    /// A claimed block is durable and recorded with its CRC (the database's row expires at
    /// `db_expires`): it counts as stored from now on.
    pub(super) fn block_stored(&mut self, idx: u32, crc: u32, db_expires: u64) {
        self.stored.set(idx);
        self.crcs[idx as usize] = crc;
        self.writing.remove(&idx);
        self.active = Instant::now();
        self.db_expires = db_expires;
    }

    /// A claimed block was not stored (the connection died, the bytes or the sync failed): it
    /// stays missing and may be written again.
    pub(super) fn release_block(&mut self, idx: u32) {
        self.writing.remove(&idx);
    }

    /// `Receiving` -> `Finishing`: UPLOAD_OVER or UPLOAD_PROVE places the file. Busy while
    /// another one does.
    pub(super) fn begin_finishing(&mut self) -> OpResult<()> {
        self.live()?;
        if self.phase == Phase::Finishing {
            return Err(OpError::new(
                ErrorCode::Busy,
                "the upload is being completed",
            ));
        }
        self.phase = Phase::Finishing;
        Ok(())
    }

    /// `Finishing` -> `Receiving`: placing the file failed; what is stored stays.
    pub(super) fn finishing_failed(&mut self) {
        if self.phase == Phase::Finishing {
            self.phase = Phase::Receiving;
        }
    }

    /// `Receiving` -> `Expiring`, when no block is being written.
    pub(super) fn begin_expiry(&mut self) -> bool {
        let idle = self.phase == Phase::Receiving && self.writing.is_empty();
        if idle {
            self.phase = Phase::Expiring;
        }
        idle
    }

    /// `Expiring` -> `Receiving`: a peer recorded activity, the row was not deleted.
    pub(super) fn expiry_refused(&mut self) {
        if self.phase == Phase::Expiring {
            self.phase = Phase::Receiving;
        }
    }

    /// Any phase -> `Ended`: the session left this node's table.
    pub(super) fn end(&mut self) {
        self.phase = Phase::Ended;
    }
}

/// SHA-256 of the session's stored blocks 0..next, computed in the background as blocks are
/// stored in order, so UPLOAD_OVER only hashes what is left. Lost on restart (then UPLOAD_OVER
/// hashes everything).
#[derive(Default)]
pub(super) struct HashProgress {
    pub(super) sha: Sha256,
    pub(super) next: u32,
    /// Blocks whose bytes on disk no longer match the CRC they were acknowledged with.
    pub(super) damaged: Vec<u32>,
}

/// A big-file upload session held in memory (its rows in the DB are the durable copy).
pub struct Session {
    pub(super) rec: SessionRec,
    pub(super) file: File,
    pub(super) state: Mutex<SessionState>,
    pub(super) hash: Mutex<HashProgress>,
}

impl Session {
    pub fn id(&self) -> &UploadId {
        &self.rec.id
    }

    /// Hashes stored blocks in order from where the progress stands, as far as they go.
    /// Called by the background hasher after blocks are stored, and by UPLOAD_OVER.
    pub fn advance_hash(&self, buf: &mut Vec<u8>) -> io::Result<()> {
        let mut h = self.hash.lock();
        self.advance_locked(&mut h, buf)
    }

    pub(super) fn advance_locked(&self, h: &mut HashProgress, buf: &mut Vec<u8>) -> io::Result<()> {
        buf.resize(HASH_CHUNK, 0);
        while h.next < self.rec.blocks {
            let idx = h.next;
            let want = {
                let st = self.state.lock();
                if st.live().is_err() || !st.stored.has(idx) {
                    return Ok(());
                }
                st.crcs[idx as usize]
            };
            let start = u64::from(idx) * u64::from(self.rec.block_size);
            let len = self.block_len(idx);
            // Read the whole block before touching the hash, so an I/O error leaves the
            // progress where it was.
            let mut crc = 0;
            let mut done = 0u64;
            let mut sha = h.sha.clone();
            while done < len {
                let n = (len - done).min(HASH_CHUNK as u64) as usize;
                self.file.read_exact_at(&mut buf[..n], start + done)?;
                sha.update(&buf[..n]);
                crc = crc32c::crc32c_append(crc, &buf[..n]);
                done += n as u64;
            }
            h.sha = sha;
            if crc != want {
                h.damaged.push(idx);
            }
            h.next += 1;
        }
        Ok(())
    }

    pub(super) fn block_len(&self, idx: u32) -> u64 {
        let start = u64::from(idx) * u64::from(self.rec.block_size);
        u64::from(self.rec.block_size).min(self.rec.size - start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(blocks: u32) -> SessionState {
        SessionState::new(
            Breakpoint::new(blocks),
            vec![0; blocks as usize],
            Instant::now(),
            1,
            None,
        )
    }

    fn code<T: std::fmt::Debug>(r: OpResult<T>) -> ErrorCode {
        r.unwrap_err().code
    }

    #[test]
    fn every_phase_allows_only_its_transitions() {
        let mut st = state(3);
        assert_eq!(st.phase(), Phase::Receiving);
        // Receiving: one writer per block; a stored block is answered, not written.
        assert!(st.claim_block(0).unwrap());
        assert_eq!(code(st.claim_block(0)), ErrorCode::Busy);
        st.block_stored(0, 7, 2);
        assert_eq!((st.crcs[0], st.db_expires), (7, 2));
        assert!(!st.claim_block(0).unwrap());
        // Not expired while a block is being written.
        assert!(st.claim_block(1).unwrap());
        assert!(!st.begin_expiry());
        st.release_block(1);
        assert!(!st.stored.has(1));
        // Finishing: no block written, no second finisher; a failure goes back.
        st.begin_finishing().unwrap();
        assert_eq!(st.phase(), Phase::Finishing);
        assert_eq!(code(st.claim_block(1)), ErrorCode::Busy);
        assert!(!st.claim_block(0).unwrap());
        assert_eq!(code(st.begin_finishing()), ErrorCode::Busy);
        assert!(!st.begin_expiry());
        st.finishing_failed();
        assert_eq!(st.phase(), Phase::Receiving);
        // Expiring: nothing served; a peer's activity brings it back.
        assert!(st.begin_expiry());
        assert_eq!(code(st.live()), ErrorCode::UnknownUpload);
        assert_eq!(code(st.claim_block(2)), ErrorCode::UnknownUpload);
        assert_eq!(code(st.begin_finishing()), ErrorCode::UnknownUpload);
        st.finishing_failed();
        assert_eq!(st.phase(), Phase::Expiring);
        st.expiry_refused();
        assert_eq!(st.phase(), Phase::Receiving);
        // Ended is final.
        st.end();
        for _ in 0..2 {
            assert_eq!(code(st.live()), ErrorCode::UnknownUpload);
            assert_eq!(code(st.claim_block(2)), ErrorCode::UnknownUpload);
            assert_eq!(code(st.begin_finishing()), ErrorCode::UnknownUpload);
            assert!(!st.begin_expiry());
            st.expiry_refused();
            st.finishing_failed();
            assert_eq!(st.phase(), Phase::Ended);
        }
    }
}
