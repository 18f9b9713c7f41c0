//! Open-file budget: every descriptor the server may hold at once, counted up front, so that
//! `max_connections` can never run the process into EMFILE (which would fail every tenant's
//! next accept, open or temp file alike). At start the server derives the connections it can
//! take from its open-file limit and lowers `max_connections` to that, saying so in the log.

use crate::config::Config;
use ferry_common::net::{MIN_CONNECTIONS, connections_within};

/// Descriptors one connection may hold: its socket, its wake-up pipe (two ends), the stored
/// file its current download reply is sent from (downloads are opened one at a time, when
/// they are next to go out) and a small upload's temp file while its payload streams in.
pub const PER_CONNECTION: u64 = 5;

/// Descriptors of the process itself: listeners, epoll, the metadata database (SQLite and its
/// WAL, or a pool of PostgreSQL connections), logs, the tracker's and syncer's sockets (an idle
/// server holds about 20), with room to spare.
pub const FIXED: u64 = 64;

/// How the open-file limit is shared out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    /// The process's open-file limit (after raising the soft limit to the hard one).
    pub limit: u64,
    /// Kept for upload sessions' temp files (each open session holds its own).
    pub sessions: u64,
    /// Kept for the HTTP gateway's cache of open stored files.
    pub cache: u64,
    /// Connections that fit in the rest.
    pub fit: usize,
    /// The connections the server takes: `max_connections`, lowered to `fit` (but never
    /// below [`MIN_CONNECTIONS`]).
    pub connections: usize,
    /// What those connections' read buffers take at most (`read_buffer_kib` each), in MiB:
    /// memory is bounded per connection like descriptors are.
    pub buffers_mib: u64,
}

/// Shares `limit` descriptors out between the server's fixed needs, `max_sessions` temp files,
/// the gateway's cache (`cache`, 0 without the gateway) and connections.
pub fn plan(limit: u64, cfg: &Config, cache: u64) -> Budget {
    let sessions = cfg.max_sessions as u64;
    let (fit, connections) = connections_within(
        limit,
        FIXED + sessions + cache,
        PER_CONNECTION,
        cfg.max_connections,
    );
    Budget {
        limit,
        sessions,
        cache,
        fit,
        connections,
        buffers_mib: connections as u64 * cfg.read_buffer_kib as u64 / 1024,
    }
}

impl Budget {
    /// Says in the log how the limit was shared and what became of `max_connections`.
    pub fn log(&self, max_connections: usize) {
        let (limit, sessions, cache, n) = (self.limit, self.sessions, self.cache, self.connections);
        let shares = format!(
            "open-file limit {limit}: {FIXED} kept for the server, {sessions} for upload \
             sessions' temp files (max_sessions), {cache} for the HTTP gateway's cache, \
             {PER_CONNECTION} per connection (and a read buffer: {} MiB at most for all)",
            self.buffers_mib
        );
        if self.fit < MIN_CONNECTIONS {
            log::error!(
                "{shares}: room for {} connections only; taking {n}, which may run out of \
                 descriptors. Raise the limit (ulimit -n, LimitNOFILE=) or lower max_sessions",
                self.fit
            );
        } else if n < max_connections {
            log::warn!(
                "{shares}: max_connections lowered from {max_connections} to {n}. Raise the \
                 limit (ulimit -n, LimitNOFILE=) or lower max_sessions for more"
            );
        } else {
            log::info!("{shares}: max_connections {n} fits");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_derived_from_the_open_file_limit() {
        let cfg = Config::default(); // 4096 connections, 10,000 sessions
        let big = plan(1 << 20, &cfg, 0);
        assert_eq!(
            big.connections, 4096,
            "a generous limit keeps max_connections"
        );
        assert_eq!(big.buffers_mib, 4096 * 256 / 1024, "256 KiB read buffers");
        // 20,000 descriptors: 64 fixed, 10,000 sessions, 5,000 cached files, 5 per connection.
        let tight = plan(20_000, &cfg, 5_000);
        assert_eq!(tight.connections, (20_000 - 64 - 10_000 - 5_000) / 5);
        assert!(
            tight.connections as u64 * PER_CONNECTION + FIXED + tight.sessions + tight.cache
                <= 20_000
        );
        // A limit with no room at all still takes a few connections (and says so).
        let starved = plan(10_010, &cfg, 0);
        assert_eq!((starved.fit, starved.connections), (0, MIN_CONNECTIONS));
    }
}
