//! Test hooks: named phases a test can pause at, and the write-failure budget.

use super::*;
use log::{debug, warn};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;

impl Storage {
    /// Marks a named phase of storing data (config::PHASES) in the log; test-only
    /// `faults.pause_at` holds the worker there so a test can kill the process at that point.
    pub(super) fn phase(&self, name: &'static str, what: &dyn std::fmt::Display) {
        debug!("phase {name}: {what}");
        if self.cfg.faults.pause_at.as_deref() == Some(name)
            && self
                .cfg
                .faults
                .pause_times
                .is_none_or(|t| self.paused.fetch_add(1, Ordering::Relaxed) < t)
        {
            let ms = self.cfg.faults.pause_ms.unwrap_or(30_000);
            warn!("phase {name} reached ({what}): pausing {ms} ms (faults.pause_at)");
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
    }

    /// Test-only fault (config `faults.write_fail_after`): fail payload writes past a budget.
    pub(super) fn fault(&self, n: usize) -> io::Result<()> {
        if let Some(limit) = self.cfg.faults.write_fail_after {
            let before = self.written.fetch_add(n as u64, Ordering::Relaxed);
            if before + n as u64 > limit {
                return Err(io::Error::from_raw_os_error(nix::libc::ENOSPC));
            }
        }
        Ok(())
    }

    pub(super) fn write_at(&self, f: &File, data: &[u8], off: u64) -> io::Result<()> {
        self.fault(data.len())?;
        f.write_all_at(data, off)
    }
}
