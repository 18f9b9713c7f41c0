//! The one command table: every command of the protocol is a [`Command`], and what follows
//! from a command (its name, its body rules, its plane) is an exhaustive match here. Whoever
//! acts on commands (the server's access table and dispatch, the proxy's first-frame
//! classification, the fuzz targets) matches on [`Command`] without a catch-all arm, so a new
//! command does not compile until each of them says what to do with it. docs/PROTOCOL.md's
//! command table is checked against [`Command::ALL`] by a test.

use super::*;

/// A command, by its wire number (the header's command byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Command {
    /// Opens every client session: version, identity, credential.
    Hello = 1,
    /// Health/identity probe answered by whichever ferry process receives it.
    Probe = 2,
    /// Link proof: the first frame on a connection one ferry process opens to another (a token
    /// of the pseudo-app `ferry-link`, see `auth`). No reply when valid; error 6 and close when
    /// not.
    Link = 3,
    /// A storage node joins its group at a tracker (seed 004's numbers for 10-13; its id
    /// server's 40 and 101 are not used: storage nodes reserve ids in the metadata database).
    TrackerJoin = 10,
    /// A storage node's heartbeat.
    TrackerBeat = 11,
    /// Which group (and nodes) serves an app's user.
    TrackerSaddrs = 12,
    /// The tracker's view of every group and node.
    TrackerGroups = 13,
    /// One page of the users the router table assigns to a group.
    TrackerUsers = 14,
    /// Small file in one frame.
    Upload = 70,
    /// File info: size, SHA-256, name, created, block size.
    Stat = 71,
    /// Ranged read.
    Download = 72,
    Delete = 73,
    /// Big-file upload, phase I: file info -> upload id.
    UploadInit = 74,
    /// Breakpoint query: which blocks the server already holds.
    UploadQuery = 75,
    /// Big-file upload, phase II: one block.
    UploadBlock = 76,
    /// Big-file upload, phase III: file over.
    UploadOver = 77,
    /// Proof of possession for an instant (deduplicated) upload.
    UploadProve = 78,
    /// Big-file download finished (lets the server count and log the session).
    DownloadOver = 79,
    /// What the session's user stores, and the app's quotas for it.
    Usage = 80,
    /// Reply from a tracker (seed 004).
    ReplyTracker = 100,
    /// Reply from a storage server (seed 004), also to HELLO and PROBE.
    ReplyStorage = 102,
    /// Reply from a proxy (to PROBE, or an error the proxy itself raises).
    ReplyProxy = 103,
}

/// Which part of the protocol a command belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plane {
    /// Opens or checks a connection: HELLO, PROBE, LINK.
    Connection,
    /// A user's session works on files (needs HELLO first).
    Data,
    /// Between the cluster's members and its operators: the tracker's commands.
    Cluster,
    /// A reply (never a request).
    Reply,
}

impl Command {
    /// Every command, in wire-number order.
    pub const ALL: [Command; 22] = [
        Command::Hello,
        Command::Probe,
        Command::Link,
        Command::TrackerJoin,
        Command::TrackerBeat,
        Command::TrackerSaddrs,
        Command::TrackerGroups,
        Command::TrackerUsers,
        Command::Upload,
        Command::Stat,
        Command::Download,
        Command::Delete,
        Command::UploadInit,
        Command::UploadQuery,
        Command::UploadBlock,
        Command::UploadOver,
        Command::UploadProve,
        Command::DownloadOver,
        Command::Usage,
        Command::ReplyTracker,
        Command::ReplyStorage,
        Command::ReplyProxy,
    ];

    /// The command with this wire number, if any.
    pub fn from_u8(c: u8) -> Option<Command> {
        Command::ALL.iter().copied().find(|k| *k as u8 == c)
    }

    /// The name docs/PROTOCOL.md and the logs use.
    pub fn name(self) -> &'static str {
        match self {
            Command::Hello => "HELLO",
            Command::Probe => "PROBE",
            Command::Link => "LINK",
            Command::TrackerJoin => "TRACKER_JOIN",
            Command::TrackerBeat => "TRACKER_BEAT",
            Command::TrackerSaddrs => "TRACKER_SADDRS",
            Command::TrackerGroups => "TRACKER_GROUPS",
            Command::TrackerUsers => "TRACKER_USERS",
            Command::Upload => "UPLOAD",
            Command::Stat => "STAT",
            Command::Download => "DOWNLOAD",
            Command::Delete => "DELETE",
            Command::UploadInit => "UPLOAD_INIT",
            Command::UploadQuery => "UPLOAD_QUERY",
            Command::UploadBlock => "UPLOAD_BLOCK",
            Command::UploadOver => "UPLOAD_OVER",
            Command::UploadProve => "UPLOAD_PROVE",
            Command::DownloadOver => "DOWNLOAD_OVER",
            Command::Usage => "USAGE",
            Command::ReplyTracker => "REPLY_TRACKER",
            Command::ReplyStorage => "REPLY_STORAGE",
            Command::ReplyProxy => "REPLY_PROXY",
        }
    }

    pub fn plane(self) -> Plane {
        match self {
            Command::Hello | Command::Probe | Command::Link => Plane::Connection,
            Command::TrackerJoin
            | Command::TrackerBeat
            | Command::TrackerSaddrs
            | Command::TrackerGroups
            | Command::TrackerUsers => Plane::Cluster,
            Command::Upload
            | Command::Stat
            | Command::Download
            | Command::Delete
            | Command::UploadInit
            | Command::UploadQuery
            | Command::UploadBlock
            | Command::UploadOver
            | Command::UploadProve
            | Command::DownloadOver
            | Command::Usage => Plane::Data,
            Command::ReplyTracker | Command::ReplyStorage | Command::ReplyProxy => Plane::Reply,
        }
    }

    /// The body rules of this command as a request (`None` for replies, which are no
    /// request): the decoder refuses a header that breaks them before reading the body.
    pub fn spec(self) -> Option<BodySpec> {
        let control = |meta, exact| {
            Some(BodySpec {
                meta,
                exact,
                payload_max: 0,
            })
        };
        match self {
            Command::Hello => control(HELLO_MAX, false),
            Command::Probe => control(2, true),
            Command::Link => control(crate::token::TOKEN_MAX, false),
            Command::Upload => Some(BodySpec {
                meta: UPLOAD_META,
                exact: true,
                payload_max: BLOCK_MAX,
            }),
            Command::Stat | Command::Delete | Command::DownloadOver => control(FILE_ID_LEN, true),
            Command::Download => control(FILE_ID_LEN + 16, true),
            Command::UploadInit => control(UPLOAD_INIT_LEN, true),
            Command::UploadQuery | Command::UploadOver => control(UPLOAD_ID_LEN, true),
            Command::UploadBlock => Some(BodySpec {
                meta: BLOCK_META,
                exact: true,
                payload_max: BLOCK_MAX,
            }),
            Command::UploadProve => control(UPLOAD_ID_LEN + SHA256_LEN, true),
            Command::Usage => control(0, true),
            // JOIN_V1_LEN or JOIN_LEN: decode_join takes either, nothing in between.
            Command::TrackerJoin => control(JOIN_LEN, false),
            Command::TrackerBeat => control(BEAT_LEN, true),
            Command::TrackerSaddrs => control(SADDRS_LEN, true),
            Command::TrackerGroups => control(0, true),
            Command::TrackerUsers => control(USERS_LEN, true),
            Command::ReplyTracker | Command::ReplyStorage | Command::ReplyProxy => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_round_trips_and_only_replies_have_no_request_spec() {
        for c in Command::ALL {
            assert_eq!(Command::from_u8(c as u8), Some(c));
            assert_eq!(
                c.spec().is_none(),
                c.plane() == Plane::Reply,
                "{}",
                c.name()
            );
        }
        let known = (0..=255u8).filter_map(Command::from_u8).count();
        assert_eq!(known, Command::ALL.len(), "ALL lists every command once");
        assert!(Command::ALL.windows(2).all(|w| (w[0] as u8) < (w[1] as u8)));
    }

    /// docs/PROTOCOL.md's command table lists exactly [`Command::ALL`], number and name.
    #[test]
    fn protocol_md_command_table_matches() {
        let doc = include_str!("../../../docs/PROTOCOL.md");
        let head = "| cmd | name | direction | body | body size |";
        let start = doc.find(head).expect("PROTOCOL.md has the command table");
        let rows: Vec<(u8, String)> = doc[start..]
            .lines()
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .map(|l| {
                let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
                (
                    cells[0].parse().expect("a command number"),
                    cells[1].to_string(),
                )
            })
            .collect();
        let want: Vec<(u8, String)> = Command::ALL
            .iter()
            .map(|c| (*c as u8, c.name().to_string()))
            .collect();
        assert_eq!(rows, want);
    }
}
