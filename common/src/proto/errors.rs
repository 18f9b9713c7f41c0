//! The one error table: for every error code, its name, whether the connection ends with it,
//! how a client retries it, which side failed and the class a command-line exit code reports.
//! Client, proxy and server read it here (never a list of their own); docs/PROTOCOL.md's error
//! table is checked against it by a test.

/// Error codes carried in an error body (status 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// Malformed frame or field.
    BadFrame = 1,
    /// Protocol version not supported.
    Version = 2,
    /// Command unknown to the receiver.
    UnknownCommand = 3,
    /// Body longer than the command allows.
    TooLarge = 4,
    /// The first frame of a session was not HELLO.
    HelloRequired = 5,
    /// Credential missing or not valid.
    Auth = 6,
    /// No such file (or not visible to this app).
    NotFound = 7,
    /// No such upload session (unknown or expired).
    UnknownUpload = 8,
    /// Block index, offset or length outside the file.
    BadBlock = 9,
    /// Block bytes do not match their CRC32C.
    Crc = 10,
    /// File over while blocks are still missing.
    Incomplete = 11,
    /// Assembled file does not match the announced SHA-256.
    HashMismatch = 12,
    /// Proof of possession was wrong.
    ProofFailed = 13,
    /// Someone else is writing this block right now; retry later.
    Busy = 14,
    /// Not enough disk space.
    NoSpace = 15,
    /// Server-side I/O failure.
    Io = 16,
    /// A limit was reached (connections, sessions, sizes).
    Limit = 17,
    /// Range past the end of the file.
    Range = 18,
    /// No upstream could be reached (raised by a proxy).
    Upstream = 19,
    /// Anything else.
    Internal = 20,
    /// A BEAT from a node the tracker does not know: the node sends JOIN again.
    NotJoined = 21,
    /// JOIN names a group that does not exist (and the tracker may not create groups).
    UnknownGroup = 22,
    /// The user's group has no online node.
    NoNode = 23,
    /// The database is unreachable and the tracker has nothing to answer from.
    Unavailable = 24,
    /// The session may not do this to this file (another user's file, without the admin scope).
    Forbidden = 25,
    /// The upload would take its user past a quota of the app (bytes stored, files).
    Quota = 26,
}

/// What a client does after an error reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Nothing: the same request cannot succeed (the caller may act first, e.g. upload the
    /// missing blocks, and then ask again).
    No,
    /// The same request on the same path after a pause: a passing refusal of the server.
    Again,
    /// The same request through the next proxy: this proxy reached no upstream.
    NextProxy,
    /// The same request through any proxy until the client's outage window ends: the cluster
    /// behind the proxies has no answer now (a group without an online node, its database
    /// down).
    Outage,
}

/// Which side an error says failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The request: wrong bytes, credential, file id, or asking past a limit.
    Client,
    /// The server (or tracker) that answered: its disk, its database, its bug. Another one
    /// may do better.
    Server,
    /// The way to the data: a proxy, the network, or the cluster's routing and database.
    Path,
}

/// What an error means to a script: the class `ferry` reports as its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Something else.
    Other,
    /// A bad flag, argument or config.
    Usage,
    /// The credential was refused, or the session may not do this.
    Auth,
    /// No such file (or upload session).
    NotFound,
    /// Bytes did not verify.
    Integrity,
    /// No proxy or server answered within the retry window.
    Unreachable,
    /// A quota or limit refused the request (disk full counts).
    Limit,
    /// Stopped by a signal (Ctrl-C).
    Interrupted,
}

impl Class {
    /// Every class, in exit-code order.
    pub const ALL: [Class; 8] = [
        Class::Other,
        Class::Usage,
        Class::Auth,
        Class::NotFound,
        Class::Integrity,
        Class::Unreachable,
        Class::Limit,
        Class::Interrupted,
    ];

    /// The exit code: stable across releases (scripts rely on it), the shell's 128 + SIGINT
    /// for an interrupt and 2 for usage as getopt tools (and clap) have it.
    pub const fn exit_code(self) -> u8 {
        match self {
            Class::Other => 1,
            Class::Usage => 2,
            Class::Auth => 3,
            Class::NotFound => 4,
            Class::Integrity => 5,
            Class::Unreachable => 6,
            Class::Limit => 7,
            Class::Interrupted => 130,
        }
    }

    /// The name `--json` errors and the documentation use.
    pub fn name(self) -> &'static str {
        match self {
            Class::Other => "other",
            Class::Usage => "usage",
            Class::Auth => "auth",
            Class::NotFound => "not_found",
            Class::Integrity => "integrity",
            Class::Unreachable => "unreachable",
            Class::Limit => "limit",
            Class::Interrupted => "interrupted",
        }
    }
}

/// One row of the error table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorInfo {
    pub code: ErrorCode,
    pub name: &'static str,
    /// The sender closes the connection after the error: the stream can no longer be trusted
    /// to be in sync, or the peer has no business on it.
    pub ends_session: bool,
    pub retry: Retry,
    pub side: Side,
    pub class: Class,
}

const fn row(
    code: ErrorCode,
    name: &'static str,
    ends_session: bool,
    retry: Retry,
    side: Side,
    class: Class,
) -> ErrorInfo {
    ErrorInfo {
        code,
        name,
        ends_session,
        retry,
        side,
        class,
    }
}

use Class as C;
use ErrorCode as E;
use Retry as R;
use Side as S;

/// The table, in code order (row `n - 1` is code `n`; a test checks it).
pub const ERRORS: [ErrorInfo; 26] = [
    row(E::BadFrame, "BadFrame", true, R::No, S::Client, C::Other),
    row(E::Version, "Version", true, R::No, S::Client, C::Other),
    row(
        E::UnknownCommand,
        "UnknownCommand",
        true,
        R::No,
        S::Client,
        C::Other,
    ),
    row(E::TooLarge, "TooLarge", true, R::No, S::Client, C::Other),
    row(
        E::HelloRequired,
        "HelloRequired",
        true,
        R::No,
        S::Client,
        C::Auth,
    ),
    row(E::Auth, "Auth", true, R::No, S::Client, C::Auth),
    row(
        E::NotFound,
        "NotFound",
        false,
        R::No,
        S::Client,
        C::NotFound,
    ),
    row(
        E::UnknownUpload,
        "UnknownUpload",
        false,
        R::No,
        S::Client,
        C::NotFound,
    ),
    row(E::BadBlock, "BadBlock", false, R::No, S::Client, C::Other),
    // The block was damaged on its way: sending it again mends it.
    row(E::Crc, "Crc", false, R::Again, S::Path, C::Integrity),
    row(
        E::Incomplete,
        "Incomplete",
        false,
        R::No,
        S::Client,
        C::Other,
    ),
    row(
        E::HashMismatch,
        "HashMismatch",
        false,
        R::No,
        S::Client,
        C::Integrity,
    ),
    row(
        E::ProofFailed,
        "ProofFailed",
        false,
        R::No,
        S::Client,
        C::Integrity,
    ),
    row(E::Busy, "Busy", false, R::Again, S::Server, C::Limit),
    row(E::NoSpace, "NoSpace", false, R::No, S::Server, C::Limit),
    row(E::Io, "Io", false, R::Again, S::Server, C::Other),
    row(E::Limit, "Limit", false, R::Again, S::Server, C::Limit),
    row(E::Range, "Range", false, R::No, S::Client, C::Usage),
    row(
        E::Upstream,
        "Upstream",
        false,
        R::NextProxy,
        S::Path,
        C::Unreachable,
    ),
    row(E::Internal, "Internal", false, R::No, S::Server, C::Other),
    row(E::NotJoined, "NotJoined", false, R::No, S::Client, C::Other),
    row(
        E::UnknownGroup,
        "UnknownGroup",
        false,
        R::No,
        S::Client,
        C::Other,
    ),
    row(
        E::NoNode,
        "NoNode",
        false,
        R::Outage,
        S::Path,
        C::Unreachable,
    ),
    // The tracker that answered lost its database; another one may still have a view.
    row(
        E::Unavailable,
        "Unavailable",
        false,
        R::Outage,
        S::Server,
        C::Unreachable,
    ),
    row(E::Forbidden, "Forbidden", false, R::No, S::Client, C::Auth),
    row(E::Quota, "Quota", false, R::No, S::Client, C::Limit),
];

impl ErrorCode {
    pub fn from_u16(v: u16) -> Option<Self> {
        let i = usize::from(v).checked_sub(1)?;
        ERRORS.get(i).map(|e| e.code)
    }

    /// This code's row of [`ERRORS`].
    pub fn info(self) -> &'static ErrorInfo {
        &ERRORS[self as usize - 1]
    }

    pub fn name(self) -> &'static str {
        self.info().name
    }

    /// Whoever sends this error closes the connection after it (codes 1-6).
    pub fn ends_session(self) -> bool {
        self.info().ends_session
    }

    /// Whether a client should send the same request again (on the same path, through the
    /// next proxy, or within its outage window: [`Retry`]).
    pub fn retryable(self) -> bool {
        self.info().retry != Retry::No
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_in_code_order_and_round_trips() {
        for (i, e) in ERRORS.iter().enumerate() {
            assert_eq!(e.code as usize, i + 1, "{}", e.name);
            assert_eq!(format!("{:?}", e.code), e.name);
            assert_eq!(ErrorCode::from_u16(e.code as u16), Some(e.code));
        }
        assert_eq!(ErrorCode::from_u16(0), None);
        assert_eq!(ErrorCode::from_u16(ERRORS.len() as u16 + 1), None);
        let exits: std::collections::HashSet<u8> =
            Class::ALL.iter().map(|c| c.exit_code()).collect();
        assert_eq!(
            exits.len(),
            Class::ALL.len(),
            "each class its own exit code"
        );
    }

    /// docs/PROTOCOL.md's error table says what [`ERRORS`] says, row for row.
    #[test]
    fn protocol_md_error_table_matches() {
        let doc = include_str!("../../../docs/PROTOCOL.md");
        let head = "| code | name | meaning | ends session | retry | failed | class (exit) |";
        let start = doc.find(head).expect("PROTOCOL.md has the error table");
        let rows: Vec<Vec<&str>> = doc[start..]
            .lines()
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .map(|l| l.trim_matches('|').split('|').map(str::trim).collect())
            .collect();
        assert_eq!(rows.len(), ERRORS.len(), "one row per code");
        for (r, e) in rows.iter().zip(&ERRORS) {
            let retry = match e.retry {
                Retry::No => "no",
                Retry::Again => "again",
                Retry::NextProxy => "next proxy",
                Retry::Outage => "outage window",
            };
            let side = match e.side {
                Side::Client => "client",
                Side::Server => "server",
                Side::Path => "path",
            };
            let class = format!("{} ({})", e.class.name(), e.class.exit_code());
            let ends = if e.ends_session { "yes" } else { "no" };
            let want = [
                (e.code as u16).to_string(),
                e.name.to_string(),
                ends.to_string(),
                retry.to_string(),
                side.to_string(),
                class,
            ];
            let got = [r[0], r[1], r[3], r[4], r[5], r[6]];
            assert_eq!(got.map(str::to_string), want, "PROTOCOL.md row {}", r[0]);
        }
    }
}
