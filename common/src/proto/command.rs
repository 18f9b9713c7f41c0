//! The one command table: every command of the protocol is a [`Command`], and what follows
//! from a command (its name, its body rules, its part of the protocol) is an exhaustive match
//! here. Whoever
//! acts on commands (the server's access table and dispatch, the proxy's first-frame
//! classification, the fuzz targets) matches on [`Command`] without a catch-all arm, so a new
//! command does not compile until each of them says what to do with it. docs/PROTOCOL.md's
//! command table is checked against [`Command::ALL`] by a test.

use super::*;

/// A command, by the part of the protocol it belongs to; each part's enum has the commands'
/// wire numbers (the header's command byte). Matching on the outer enum first lets a handler of
/// one part (the server's file commands, say) match exhaustively on its own commands only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// Opens or checks a connection.
    Conn(ConnCmd),
    /// Between the cluster's members and operators and a tracker (no HELLO).
    Tracker(TrackerCmd),
    /// A user's session works on files (needs HELLO first).
    File(FileCmd),
    /// A reply (never a request).
    Reply(ReplyCmd),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ConnCmd {
    /// Opens every client session: version, identity, credential.
    Hello = 1,
    /// Health/identity probe answered by whichever ferry process receives it.
    Probe = 2,
    /// Link proof: the first frame on a connection one ferry process opens to another (a token
    /// of the pseudo-app `ferry-link`, see `auth`). No reply when valid; error 6 and close when
    /// not.
    Link = 3,
}

/// Seed 004's numbers for 10-13; its id server's 40 and 101 are not used: storage nodes
/// reserve ids in the metadata database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TrackerCmd {
    /// A storage node joins its group.
    Join = 10,
    /// A storage node's heartbeat.
    Beat = 11,
    /// Which group (and nodes) serves an app's user.
    Saddrs = 12,
    /// The tracker's view of every group and node.
    Groups = 13,
    /// One page of the users the router table assigns to a group.
    Users = 14,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FileCmd {
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ReplyCmd {
    /// Reply from a tracker (seed 004).
    Tracker = 100,
    /// Reply from a storage server (seed 004), also to HELLO and PROBE.
    Storage = 102,
    /// Reply from a proxy (to PROBE, or an error the proxy itself raises).
    Proxy = 103,
}

impl Command {
    /// Every command, in wire-number order.
    pub const ALL: [Command; 22] = [
        Command::Conn(ConnCmd::Hello),
        Command::Conn(ConnCmd::Probe),
        Command::Conn(ConnCmd::Link),
        Command::Tracker(TrackerCmd::Join),
        Command::Tracker(TrackerCmd::Beat),
        Command::Tracker(TrackerCmd::Saddrs),
        Command::Tracker(TrackerCmd::Groups),
        Command::Tracker(TrackerCmd::Users),
        Command::File(FileCmd::Upload),
        Command::File(FileCmd::Stat),
        Command::File(FileCmd::Download),
        Command::File(FileCmd::Delete),
        Command::File(FileCmd::UploadInit),
        Command::File(FileCmd::UploadQuery),
        Command::File(FileCmd::UploadBlock),
        Command::File(FileCmd::UploadOver),
        Command::File(FileCmd::UploadProve),
        Command::File(FileCmd::DownloadOver),
        Command::File(FileCmd::Usage),
        Command::Reply(ReplyCmd::Tracker),
        Command::Reply(ReplyCmd::Storage),
        Command::Reply(ReplyCmd::Proxy),
    ];

    /// The command with this wire number, if any.
    pub fn from_u8(c: u8) -> Option<Command> {
        Command::ALL.iter().copied().find(|k| k.wire() == c)
    }

    /// The wire number.
    pub fn wire(self) -> u8 {
        match self {
            Command::Conn(c) => c as u8,
            Command::Tracker(c) => c as u8,
            Command::File(c) => c as u8,
            Command::Reply(c) => c as u8,
        }
    }

    /// The name docs/PROTOCOL.md and the logs use.
    pub fn name(self) -> &'static str {
        match self {
            Command::Conn(ConnCmd::Hello) => "HELLO",
            Command::Conn(ConnCmd::Probe) => "PROBE",
            Command::Conn(ConnCmd::Link) => "LINK",
            Command::Tracker(TrackerCmd::Join) => "TRACKER_JOIN",
            Command::Tracker(TrackerCmd::Beat) => "TRACKER_BEAT",
            Command::Tracker(TrackerCmd::Saddrs) => "TRACKER_SADDRS",
            Command::Tracker(TrackerCmd::Groups) => "TRACKER_GROUPS",
            Command::Tracker(TrackerCmd::Users) => "TRACKER_USERS",
            Command::File(FileCmd::Upload) => "UPLOAD",
            Command::File(FileCmd::Stat) => "STAT",
            Command::File(FileCmd::Download) => "DOWNLOAD",
            Command::File(FileCmd::Delete) => "DELETE",
            Command::File(FileCmd::UploadInit) => "UPLOAD_INIT",
            Command::File(FileCmd::UploadQuery) => "UPLOAD_QUERY",
            Command::File(FileCmd::UploadBlock) => "UPLOAD_BLOCK",
            Command::File(FileCmd::UploadOver) => "UPLOAD_OVER",
            Command::File(FileCmd::UploadProve) => "UPLOAD_PROVE",
            Command::File(FileCmd::DownloadOver) => "DOWNLOAD_OVER",
            Command::File(FileCmd::Usage) => "USAGE",
            Command::Reply(ReplyCmd::Tracker) => "REPLY_TRACKER",
            Command::Reply(ReplyCmd::Storage) => "REPLY_STORAGE",
            Command::Reply(ReplyCmd::Proxy) => "REPLY_PROXY",
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
        let data = |meta| {
            Some(BodySpec {
                meta,
                exact: true,
                payload_max: BLOCK_MAX,
            })
        };
        match self {
            Command::Conn(ConnCmd::Hello) => control(HELLO_MAX, false),
            Command::Conn(ConnCmd::Probe) => control(2, true),
            Command::Conn(ConnCmd::Link) => control(crate::token::TOKEN_MAX, false),
            // JOIN_V1_LEN or JOIN_LEN: decode_join takes either, nothing in between.
            Command::Tracker(TrackerCmd::Join) => control(JOIN_LEN, false),
            Command::Tracker(TrackerCmd::Beat) => control(BEAT_LEN, true),
            Command::Tracker(TrackerCmd::Saddrs) => control(SADDRS_LEN, true),
            Command::Tracker(TrackerCmd::Groups) => control(0, true),
            Command::Tracker(TrackerCmd::Users) => control(USERS_LEN, true),
            Command::File(f) => match f {
                FileCmd::Upload => data(UPLOAD_META),
                FileCmd::UploadBlock => data(BLOCK_META),
                FileCmd::Stat | FileCmd::Delete | FileCmd::DownloadOver => {
                    control(FILE_ID_LEN, true)
                }
                FileCmd::Download => control(FILE_ID_LEN + 16, true),
                FileCmd::UploadInit => control(UPLOAD_INIT_LEN, true),
                FileCmd::UploadQuery | FileCmd::UploadOver => control(UPLOAD_ID_LEN, true),
                FileCmd::UploadProve => control(UPLOAD_ID_LEN + SHA256_LEN, true),
                FileCmd::Usage => control(0, true),
            },
            Command::Reply(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_round_trips_and_only_replies_have_no_request_spec() {
        for c in Command::ALL {
            assert_eq!(Command::from_u8(c.wire()), Some(c));
            let reply = matches!(c, Command::Reply(_));
            assert_eq!(c.spec().is_none(), reply, "{}", c.name());
        }
        let known = (0..=255u8).filter_map(Command::from_u8).count();
        assert_eq!(known, Command::ALL.len(), "ALL lists every command once");
        assert!(Command::ALL.windows(2).all(|w| w[0].wire() < w[1].wire()));
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
            .map(|c| (c.wire(), c.name().to_string()))
            .collect();
        assert_eq!(rows, want);
    }
}
