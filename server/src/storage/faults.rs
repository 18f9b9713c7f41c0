//! Test hooks: named phases of storing data (always in the debug log), and with the `faults`
//! feature (test builds only; release builds leave it out and refuse a `[faults]` config) a
//! worker held at a phase and a write-failure budget.

use super::*;
use log::debug;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// What the faults have counted so far.
#[cfg(feature = "faults")]
#[derive(Default)]
pub(super) struct Counters {
    /// Bytes of payload written (for `faults.write_fail_after`).
    written: std::sync::atomic::AtomicU64,
    /// Arrivals held at `faults.pause_at` (for `faults.pause_times`).
    paused: std::sync::atomic::AtomicU64,
}

impl Storage {
    /// Marks a named phase of storing data (config::PHASES) in the log; with the `faults`
    /// feature, `faults.pause_at` holds the worker there so a test can act at that point.
    pub(super) fn phase(&self, name: &'static str, what: &dyn std::fmt::Display) {
        debug!("phase {name}: {what}");
        #[cfg(feature = "faults")]
        self.pause_at(name, what);
    }

    #[cfg(feature = "faults")]
    fn pause_at(&self, name: &'static str, what: &dyn std::fmt::Display) {
        use std::sync::atomic::Ordering;
        let f = &self.cfg.faults;
        if f.pause_at.as_deref() == Some(name)
            && f.pause_times
                .is_none_or(|t| self.faults.paused.fetch_add(1, Ordering::Relaxed) < t)
        {
            let ms = f.pause_ms.unwrap_or(30_000);
            log::warn!("phase {name} reached ({what}): pausing {ms} ms (faults.pause_at)");
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
    }

    /// Writes payload bytes at `off`; with the `faults` feature, past `faults.write_fail_after`
    /// bytes of the whole process every write fails with ENOSPC.
    pub(super) fn write_at(&self, f: &File, data: &[u8], off: u64) -> io::Result<()> {
        #[cfg(feature = "faults")]
        if let Some(limit) = self.cfg.faults.write_fail_after {
            use std::sync::atomic::Ordering;
            let n = data.len() as u64;
            if self.faults.written.fetch_add(n, Ordering::Relaxed) + n > limit {
                return Err(io::Error::from_raw_os_error(nix::libc::ENOSPC));
            }
        }
        f.write_all_at(data, off)
    }
}
