//! What a transfer did, returned by the library and printed by `ferry --json`, and the progress
//! hook the library calls (it never prints itself).

use serde::Serialize;
use std::time::Duration;

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct TransferReport {
    /// "upload" or "download".
    pub op: String,
    pub file_id: String,
    /// File size.
    pub bytes: u64,
    /// Bytes actually moved over the network in this run (re-sends included).
    pub bytes_transferred: u64,
    pub block_size: u32,
    pub blocks_total: u32,
    /// Blocks sent (upload) or fetched (download) in this run, counting each block once.
    pub blocks_sent: u32,
    /// Blocks not sent: already stored on the server / already in `PATH.part`.
    pub blocks_skipped: u32,
    /// Blocks whose bytes went over the wire again: retried after a failure in this run, or
    /// begun by an earlier run that was interrupted.
    pub blocks_resent: u32,
    /// Proxy switches.
    pub failovers: u64,
    /// Requests retried (any reason).
    pub retries: u64,
    pub elapsed_ms: u64,
    /// File size / elapsed time, in MB/s (10^6 bytes).
    pub mb_per_s: f64,
    /// The server already held the content and the upload was a proof of possession.
    pub instant: bool,
    /// The transfer continued an earlier, interrupted one.
    pub resumed: bool,
}

impl TransferReport {
    pub fn finish(&mut self, elapsed: Duration) {
        self.elapsed_ms = elapsed.as_millis() as u64;
        let secs = elapsed.as_secs_f64();
        self.mb_per_s = if secs > 0.0 {
            (self.bytes as f64 / 1e6 / secs * 100.0).round() / 100.0
        } else {
            0.0
        };
    }
}

/// Progress callbacks. All methods may be called from several threads at once.
pub trait Progress: Sync {
    /// The transfer starts: `total` bytes, of which `done` are already there (resume).
    fn start(&self, _total: u64, _done: u64) {}
    /// `bytes` more are done.
    fn advance(&self, _bytes: u64) {}
    /// Counters changed.
    fn counters(&self, _resent: u32, _failovers: u64) {}
}

/// No progress display.
pub struct Quiet;
impl Progress for Quiet {}
