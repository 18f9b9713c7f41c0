//! Group commit for uploaded blocks.
//!
//! A connection that has streamed and verified a block hands it here and goes on reading the
//! next one; the syncer thread takes every block queued meanwhile, makes them durable with one
//! fdatasync per file and one metadata transaction (see [`Storage::persist_blocks`]), then fills
//! each block's [`AckSlot`] and wakes its connection through the connection's wake pipe. The
//! connection sends acks in request order, so a block is still acknowledged only once it is
//! durable; what changes is that the disk's latency overlaps the network instead of stalling it.
//!
//! A second thread, the hasher, follows the sessions whose blocks were stored and extends each
//! one's in-order SHA-256 (re-reading the blocks from the page cache), so UPLOAD_OVER only hashes
//! what is left instead of the whole file.

use crate::storage::{BlockWriter, OpError, OpResult, Session, Storage};
use crossbeam_channel::{Receiver, Sender};
use ferry_common::proto::{BlockAck, ErrorCode};
use mio::unix::pipe;
use parking_lot::Mutex;
use std::io::Write;
use std::sync::Arc;
use std::thread::JoinHandle;

/// Most blocks persisted in one group.
const BATCH_MAX: usize = 256;

/// Where the syncer leaves a block's outcome for its connection.
#[derive(Default)]
pub struct AckSlot(Mutex<Option<OpResult<BlockAck>>>);

impl AckSlot {
    pub fn take(&self) -> Option<OpResult<BlockAck>> {
        self.0.lock().take()
    }
}

pub struct SyncJob {
    pub block: BlockWriter,
    pub slot: Arc<AckSlot>,
    /// The connection's wake pipe: one byte makes the reactor run it.
    pub wake: Arc<pipe::Sender>,
}

pub struct Syncer {
    tx: Option<Sender<SyncJob>>,
    thread: Option<JoinHandle<()>>,
    hasher: Option<JoinHandle<()>>,
}

impl Syncer {
    pub fn start(st: Arc<Storage>) -> std::io::Result<Syncer> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let (htx, hrx) = crossbeam_channel::unbounded();
        let hasher = std::thread::Builder::new()
            .name("hasher".into())
            .spawn(move || hash_loop(&hrx))?;
        let thread = std::thread::Builder::new()
            .name("block-sync".into())
            .spawn(move || run(&st, &rx, &htx))?;
        Ok(Syncer {
            tx: Some(tx),
            thread: Some(thread),
            hasher: Some(hasher),
        })
    }

    /// A handle connections submit jobs with. The queue holds at most a few jobs per
    /// connection (connections bound their blocks in flight), so it needs no bound of its own.
    pub fn sender(&self) -> Sender<SyncJob> {
        self.tx.clone().expect("syncer running")
    }

    /// Finishes the queued jobs and ends the thread (after the reactor stopped).
    pub fn stop(mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // The sync thread held the hasher's only sender, so the hasher ends too.
        if let Some(t) = self.hasher.take() {
            let _ = t.join();
        }
    }
}

fn run(st: &Storage, rx: &Receiver<SyncJob>, hasher: &Sender<Arc<Session>>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < BATCH_MAX {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let (blocks, rest): (Vec<BlockWriter>, Vec<_>) = jobs
            .into_iter()
            .map(|j| (j.block, (j.slot, j.wake)))
            .unzip();
        let mut sessions: Vec<Arc<Session>> = Vec::new();
        for b in &blocks {
            if !sessions.iter().any(|s| s.id() == b.session().id()) {
                sessions.push(b.session().clone());
            }
        }
        let results = st.persist_blocks(blocks);
        for ((slot, wake), r) in rest.into_iter().zip(results) {
            *slot.0.lock() = Some(r);
            // A full pipe already holds a wake-up; a closed one means the connection is gone
            // (its block is stored all the same and shows in a breakpoint query).
            let _ = (&*wake).write(&[1]);
        }
        for s in sessions {
            let _ = hasher.send(s);
        }
    }
}

fn hash_loop(rx: &Receiver<Arc<Session>>) {
    let mut buf = Vec::new();
    while let Ok(first) = rx.recv() {
        // Many notices for one session collapse into one pass.
        let mut todo = vec![first];
        while let Ok(s) = rx.try_recv() {
            if !todo.iter().any(|t| t.id() == s.id()) {
                todo.push(s);
            }
        }
        for s in todo {
            if let Err(e) = s.advance_hash(&mut buf) {
                // UPLOAD_OVER hashes what is left and reports its own error.
                log::debug!("hasher: upload {}: {e}", hex::encode(s.id()));
            }
        }
    }
}

/// The outcome for a job the syncer could not take (it stopped).
pub fn refused() -> OpError {
    OpError::new(ErrorCode::Internal, "server is stopping")
}
