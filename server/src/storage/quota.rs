//! Per-user quotas of an app (`[apps.APP] max_stored_bytes`, `max_files`), checked when an
//! upload starts (a resumed one was checked when it started). Usage is read from the metadata
//! store, which a cluster's nodes share, so a quota holds across groups. Two uploads starting
//! at the same moment can each pass the check and together go over by at most one file.

use super::*;
use crate::meta::Usage;
use ferry_common::proto::ErrorCode;

impl Storage {
    /// Refuses (error 26) an upload of `size` bytes that would take `who` past a quota of
    /// their app.
    pub(super) fn check_quota(&self, who: &Who, size: u64) -> OpResult<()> {
        let Some(p) = self.cfg.apps.get(&who.app) else {
            return Ok(());
        };
        if p.max_stored_bytes == 0 && p.max_files == 0 {
            return Ok(());
        }
        let u = self.usage(who)?;
        let (app, user) = (&who.app, &who.user);
        if p.max_files > 0 && u.files >= p.max_files {
            return Err(OpError::new(
                ErrorCode::Quota,
                format!(
                    "user {user} of app {app} has {} files, the most the quota allows \
                     ([apps.{app}] max_files = {}); delete some first",
                    u.files, p.max_files
                ),
            ));
        }
        let after = u.bytes.saturating_add(size);
        if p.max_stored_bytes > 0 && after > p.max_stored_bytes {
            return Err(OpError::new(
                ErrorCode::Quota,
                format!(
                    "user {user} of app {app} stores {} bytes; this file's {size} bytes would \
                     pass the quota of {} bytes ([apps.{app}] max_stored_bytes) by {}",
                    u.bytes,
                    p.max_stored_bytes,
                    after - p.max_stored_bytes
                ),
            ));
        }
        Ok(())
    }

    /// USAGE: what `who` stores and the quotas of their app.
    pub fn usage_reply(&self, who: &Who) -> OpResult<ferry_common::proto::UsageReply> {
        let u = self.usage(who)?;
        let p = self.cfg.apps.get(&who.app).cloned().unwrap_or_default();
        Ok(ferry_common::proto::UsageReply {
            bytes: u.bytes,
            files: u.files,
            max_bytes: p.max_stored_bytes,
            max_files: p.max_files,
        })
    }

    /// What `who` stores now.
    pub fn usage(&self, who: &Who) -> OpResult<Usage> {
        self.meta
            .usage(&who.app, &who.user)
            .map_err(|e| db_err(e, "usage lookup"))
    }
}
