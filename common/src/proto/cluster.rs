//! Bodies of the cluster frames: the tracker's JOIN 10, BEAT 11, SADDRS 12, GROUPS 13 and
//! USERS 14, with their replies. Layouts are in docs/PROTOCOL.md ("Cluster").
//!
//! Replies carrying lists (SADDRS, GROUPS) are capped ([`NODES_MAX`], [`GROUPS_MAX`]) and every
//! count is checked against both its cap and the bytes left before anything is allocated.

use super::frames::{Rd, non_empty};
use super::*;

/// Body of TRACKER_JOIN (10) from a node before HTTP gateways were announced: group, host, port,
/// version, started, free. Still accepted (the node has no gateway).
pub const JOIN_V1_LEN: usize = GROUP_LEN + HOST_LEN + 2 + 2 + 8 + 8;
/// Body of TRACKER_JOIN (10): the [`JOIN_V1_LEN`] fields, then the node's HTTP gateway address
/// (host, port; an empty host and port 0 when it serves none).
pub const JOIN_LEN: usize = JOIN_V1_LEN + HOST_LEN + 2;
/// Body of TRACKER_BEAT (11): group, host, port, started, free.
pub const BEAT_LEN: usize = GROUP_LEN + HOST_LEN + 2 + 8 + 8;
/// Body of the JOIN and BEAT reply from a tracker before gateways: the beat interval in ms.
pub const BEAT_REPLY_V1_LEN: usize = 4;
/// Most entries in the gateway list of a JOIN/BEAT reply: every group once with no address,
/// or up to [`GATEWAYS_PER_GROUP`] addresses.
pub const GATEWAYS_MAX: usize = GROUPS_MAX * GATEWAYS_PER_GROUP;
/// Most HTTP gateways a reply lists per group (a redirect needs one; the rest are spares).
pub const GATEWAYS_PER_GROUP: usize = 4;
/// One entry of the gateway list: group, host, port.
const GATEWAY_LEN: usize = GROUP_LEN + HOST_LEN + 2;
/// Largest JOIN/BEAT reply: interval, count, the gateway list (about 100 KiB).
pub const BEAT_REPLY_MAX: usize = 4 + 2 + GATEWAYS_MAX * GATEWAY_LEN;
/// Body of TRACKER_SADDRS (12): app, user, file id.
pub const SADDRS_LEN: usize = APP_ID_LEN + USER_ID_LEN + FILE_ID_LEN;
/// One node address in a SADDRS reply.
const ADDR_LEN: usize = HOST_LEN + 2;
/// Largest SADDRS reply: group, stale, count, then at most [`NODES_MAX`] addresses.
pub const SADDRS_REPLY_MAX: usize = GROUP_LEN + 1 + 2 + NODES_MAX * ADDR_LEN;
/// One node in a GROUPS reply: host, port, online, started, beat age, free.
const NODE_VIEW_LEN: usize = HOST_LEN + 2 + 1 + 8 + 8 + 8;
/// One group's fixed part in a GROUPS reply: name, users, node count.
const GROUP_VIEW_LEN: usize = GROUP_LEN + 8 + 2;
/// Largest GROUPS reply (about 740 KiB).
pub const GROUPS_REPLY_MAX: usize =
    1 + 2 + GROUPS_MAX * (GROUP_VIEW_LEN + NODES_MAX * NODE_VIEW_LEN);
/// Body of TRACKER_USERS (14): group, the (app, user) to list after, page size.
pub const USERS_LEN: usize = GROUP_LEN + APP_ID_LEN + USER_ID_LEN + 2;
/// Most users in one TRACKER_USERS reply.
pub const USERS_PAGE_MAX: u16 = 256;
/// One user in a TRACKER_USERS reply: app, user.
const USER_ROW_LEN: usize = APP_ID_LEN + USER_ID_LEN;
/// Largest TRACKER_USERS reply: more, count, the users (about 68 KiB).
pub const USERS_REPLY_MAX: usize = 1 + 2 + USERS_PAGE_MAX as usize * USER_ROW_LEN;

/// A group name: 1 to [`GROUP_LEN`] ASCII letters, digits, `-` and `_`. No `.`: that is what
/// lets a file id name its group in front of a dot (see [`file_group`]).
pub fn check_group(name: &str) -> Result<(), ProtoError> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_');
    if name.is_empty() || name.len() > GROUP_LEN || !name.chars().all(ok) {
        return Err(ProtoError::Invalid {
            field: "group",
            why: "not 1-32 ASCII letters, digits, '-' or '_'",
        });
    }
    Ok(())
}

/// The group a file id names: a cluster node issues `<group>.<id>` (FastDFS's file ids carry
/// their group the same way), so any proxy can route a download by the id alone. `None` for a
/// standalone server's ids and for ids issued before groups were named in them.
pub fn file_group(file_id: &str) -> Option<&str> {
    let (group, rest) = file_id.split_once('.')?;
    (check_group(group).is_ok() && !rest.is_empty()).then_some(group)
}

fn group_field(r: &mut Rd<'_>) -> Result<String, ProtoError> {
    let g = non_empty(r.fixed_str(GROUP_LEN, "group")?, "group")?;
    check_group(&g)?;
    Ok(g)
}

/// A host: an IP literal or DNS name, so only the characters those use; proxies connect to it.
fn host_field(r: &mut Rd<'_>) -> Result<String, ProtoError> {
    let h = non_empty(r.fixed_str(HOST_LEN, "host")?, "host")?;
    check_host(&h)?;
    Ok(h)
}

/// Whether `h` may be sent as a host: what [`host_field`] accepts.
pub fn check_host(h: &str) -> Result<(), ProtoError> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_');
    if h.is_empty() || h.len() > HOST_LEN || !h.chars().all(ok) {
        return Err(ProtoError::Invalid {
            field: "host",
            why: "not an IP address or DNS name",
        });
    }
    Ok(())
}

fn port_field(r: &mut Rd<'_>) -> Result<u16, ProtoError> {
    match r.u16("port")? {
        0 => Err(ProtoError::Invalid {
            field: "port",
            why: "port 0",
        }),
        p => Ok(p),
    }
}

fn flag_field(r: &mut Rd<'_>, field: &'static str) -> Result<bool, ProtoError> {
    match r.u8(field)? {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(ProtoError::Invalid {
            field,
            why: "not 0 or 1",
        }),
    }
}

/// Reads a list count and checks it against its cap and against the bytes left, so a lying
/// count never sizes an allocation.
fn count_field(
    r: &mut Rd<'_>,
    field: &'static str,
    max: usize,
    min_item: usize,
) -> Result<usize, ProtoError> {
    let n = r.u16(field)? as usize;
    if n > max {
        return Err(ProtoError::Invalid {
            field,
            why: "over its limit",
        });
    }
    if n * min_item > r.b.len() {
        return Err(ProtoError::Truncated(field));
    }
    Ok(n)
}

fn check_host_port(host: &str, port: u16) -> Result<(), ProtoError> {
    check_host(host)?;
    if port == 0 {
        return Err(ProtoError::Invalid {
            field: "port",
            why: "port 0",
        });
    }
    Ok(())
}

/// TRACKER_JOIN (10) and TRACKER_BEAT (11): a storage node announcing itself. BEAT has no
/// version field; its decode leaves `version` at 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeHello {
    pub group: String,
    pub host: String,
    pub port: u16,
    pub version: u16,
    /// Unix ms when the node started (a restart shows as a new value).
    pub started: u64,
    /// Bytes free on the node's data volume.
    pub free: u64,
    /// Where the node's HTTP gateway takes requests (JOIN only; `None`: it serves none).
    pub http: Option<NodeAddr>,
}

impl NodeHello {
    fn put_addr(&self, b: &mut Vec<u8>) -> Result<(), ProtoError> {
        if self.group.is_empty() {
            return Err(ProtoError::Empty("group"));
        }
        check_host_port(&self.host, self.port)?;
        put_fixed_str(b, &self.group, GROUP_LEN, "group")?;
        put_fixed_str(b, &self.host, HOST_LEN, "host")?;
        b.extend_from_slice(&self.port.to_be_bytes());
        Ok(())
    }

    /// The JOIN body.
    pub fn encode_join(&self) -> Result<Vec<u8>, ProtoError> {
        let mut b = Vec::with_capacity(JOIN_LEN);
        self.put_addr(&mut b)?;
        b.extend_from_slice(&self.version.to_be_bytes());
        b.extend_from_slice(&self.started.to_be_bytes());
        b.extend_from_slice(&self.free.to_be_bytes());
        NodeAddr::put_optional(self.http.as_ref(), &mut b)?;
        Ok(b)
    }

    /// The BEAT body.
    pub fn encode_beat(&self) -> Result<Vec<u8>, ProtoError> {
        let mut b = Vec::with_capacity(BEAT_LEN);
        self.put_addr(&mut b)?;
        b.extend_from_slice(&self.started.to_be_bytes());
        b.extend_from_slice(&self.free.to_be_bytes());
        Ok(b)
    }

    pub fn decode_join(body: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Rd { b: body };
        let group = group_field(&mut r)?;
        let host = host_field(&mut r)?;
        let port = port_field(&mut r)?;
        let version = r.u16("version")?;
        let started = r.u64("started")?;
        let free = r.u64("free")?;
        // A node from before gateways sends the shorter body.
        let http = match r.b.is_empty() {
            true => None,
            false => NodeAddr::read_optional(&mut r, "http")?,
        };
        r.end("TRACKER_JOIN")?;
        Ok(NodeHello {
            group,
            host,
            port,
            version,
            started,
            free,
            http,
        })
    }

    pub fn decode_beat(body: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Rd { b: body };
        let group = group_field(&mut r)?;
        let host = host_field(&mut r)?;
        let port = port_field(&mut r)?;
        let started = r.u64("started")?;
        let free = r.u64("free")?;
        r.end("TRACKER_BEAT")?;
        Ok(NodeHello {
            group,
            host,
            port,
            version: 0,
            started,
            free,
            http: None,
        })
    }
}

/// One entry of a JOIN/BEAT reply's gateway list: an online HTTP gateway of `group`, or (no
/// `addr`) a group that exists but has no gateway online right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayEntry {
    pub group: String,
    pub addr: Option<NodeAddr>,
}

/// Reply to JOIN and BEAT: how often the tracker wants beats and, for a node that serves HTTP,
/// the cluster's gateways (where its own gateway redirects requests for other groups' files).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BeatReply {
    pub interval_ms: u32,
    pub gateways: Vec<GatewayEntry>,
}

impl BeatReply {
    pub fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        if self.gateways.len() > GATEWAYS_MAX {
            return Err(ProtoError::Invalid {
                field: "gateways",
                why: "over its limit",
            });
        }
        let mut b = Vec::with_capacity(6 + self.gateways.len() * GATEWAY_LEN);
        b.extend_from_slice(&self.interval_ms.to_be_bytes());
        // No list: the interval alone, the whole reply a node from before gateways expects.
        if self.gateways.is_empty() {
            return Ok(b);
        }
        b.extend_from_slice(&(self.gateways.len() as u16).to_be_bytes());
        for g in &self.gateways {
            check_group(&g.group)?;
            put_fixed_str(&mut b, &g.group, GROUP_LEN, "group")?;
            NodeAddr::put_optional(g.addr.as_ref(), &mut b)?;
        }
        Ok(b)
    }

    /// The interval alone (a tracker from before gateways, or no list for this node): an
    /// empty list.
    pub fn decode(body: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Rd { b: body };
        let interval_ms = r.u32("beat interval")?;
        let mut gateways = Vec::new();
        if !r.b.is_empty() {
            let n = count_field(&mut r, "gateways", GATEWAYS_MAX, GATEWAY_LEN)?;
            gateways.reserve_exact(n);
            for _ in 0..n {
                let group = group_field(&mut r)?;
                let addr = NodeAddr::read_optional(&mut r, "gateway")?;
                gateways.push(GatewayEntry { group, addr });
            }
        }
        r.end("TRACKER_BEAT reply")?;
        Ok(BeatReply {
            interval_ms,
            gateways,
        })
    }
}

/// TRACKER_SADDRS (12): where does this app's user live, or (file id set) where does this file
/// live: the group the id names, else the group its metadata records, else the user's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaddrsReq {
    pub app: String,
    pub user: String,
    pub file_id: String,
}

impl SaddrsReq {
    pub fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        if self.app.is_empty() {
            return Err(ProtoError::Empty("app id"));
        }
        if self.user.is_empty() {
            return Err(ProtoError::Empty("user id"));
        }
        let mut b = Vec::with_capacity(SADDRS_LEN);
        put_fixed_str(&mut b, &self.app, APP_ID_LEN, "app id")?;
        put_fixed_str(&mut b, &self.user, USER_ID_LEN, "user id")?;
        put_fixed_str(&mut b, &self.file_id, FILE_ID_LEN, "file id")?;
        Ok(b)
    }

    pub fn decode(body: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Rd { b: body };
        let app = non_empty(r.fixed_str(APP_ID_LEN, "app id")?, "app id")?;
        let user = non_empty(r.fixed_str(USER_ID_LEN, "user id")?, "user id")?;
        let file_id = r.fixed_str(FILE_ID_LEN, "file id")?;
        r.end("TRACKER_SADDRS")?;
        Ok(SaddrsReq { app, user, file_id })
    }
}

/// A storage node's address as the tracker hands it out.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeAddr {
    pub host: String,
    pub port: u16,
}

impl NodeAddr {
    fn put(&self, b: &mut Vec<u8>) -> Result<(), ProtoError> {
        check_host_port(&self.host, self.port)?;
        put_fixed_str(b, &self.host, HOST_LEN, "host")?;
        b.extend_from_slice(&self.port.to_be_bytes());
        Ok(())
    }

    fn read(r: &mut Rd<'_>) -> Result<Self, ProtoError> {
        let host = host_field(r)?;
        let port = port_field(r)?;
        Ok(NodeAddr { host, port })
    }

    /// An address that may be absent: all zeros (empty host, port 0) when it is.
    fn put_optional(a: Option<&NodeAddr>, b: &mut Vec<u8>) -> Result<(), ProtoError> {
        match a {
            Some(a) => a.put(b),
            None => {
                b.extend_from_slice(&[0; HOST_LEN + 2]);
                Ok(())
            }
        }
    }

    /// What [`NodeAddr::put_optional`] wrote; a host without a port or a port without a host
    /// is refused.
    fn read_optional(r: &mut Rd<'_>, field: &'static str) -> Result<Option<Self>, ProtoError> {
        let host = r.fixed_str(HOST_LEN, field)?;
        let port = r.u16(field)?;
        match (host.is_empty(), port) {
            (true, 0) => Ok(None),
            (false, p) if p != 0 => {
                check_host(&host)?;
                Ok(Some(NodeAddr { host, port }))
            }
            _ => Err(ProtoError::Invalid {
                field,
                why: "a host without a port or a port without a host",
            }),
        }
    }
}

impl std::fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Reply to SADDRS: the user's group and its online nodes, preferred first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaddrsReply {
    pub group: String,
    /// Answered from the tracker's last view because the database is unreachable.
    pub stale: bool,
    pub nodes: Vec<NodeAddr>,
}

impl SaddrsReply {
    pub fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        if self.nodes.len() > NODES_MAX {
            return Err(ProtoError::Invalid {
                field: "nodes",
                why: "over 32 nodes",
            });
        }
        if self.group.is_empty() {
            return Err(ProtoError::Empty("group"));
        }
        let mut b = Vec::with_capacity(GROUP_LEN + 3 + self.nodes.len() * ADDR_LEN);
        put_fixed_str(&mut b, &self.group, GROUP_LEN, "group")?;
        b.push(self.stale as u8);
        b.extend_from_slice(&(self.nodes.len() as u16).to_be_bytes());
        for n in &self.nodes {
            n.put(&mut b)?;
        }
        Ok(b)
    }

    pub fn decode(body: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Rd { b: body };
        let group = group_field(&mut r)?;
        let stale = flag_field(&mut r, "stale")?;
        let n = count_field(&mut r, "node count", NODES_MAX, ADDR_LEN)?;
        let mut nodes = Vec::with_capacity(n);
        for _ in 0..n {
            nodes.push(NodeAddr::read(&mut r)?);
        }
        r.end("TRACKER_SADDRS reply")?;
        Ok(SaddrsReply {
            group,
            stale,
            nodes,
        })
    }
}

/// One node in a GROUPS reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub addr: NodeAddr,
    pub online: bool,
    /// Unix ms the node reported as its start time.
    pub started: u64,
    /// Ms since the tracker last heard a JOIN or BEAT from it.
    pub beat_age_ms: u64,
    pub free: u64,
}

/// One group in a GROUPS reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupView {
    pub name: String,
    /// Users the router table assigns to this group.
    pub users: u64,
    pub nodes: Vec<NodeView>,
}

/// Reply to TRACKER_GROUPS (13): the tracker's view of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupsReply {
    pub stale: bool,
    pub groups: Vec<GroupView>,
}

impl GroupsReply {
    pub fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        if self.groups.len() > GROUPS_MAX {
            return Err(ProtoError::Invalid {
                field: "groups",
                why: "over 256 groups",
            });
        }
        let mut b = Vec::with_capacity(3 + self.groups.len() * GROUP_VIEW_LEN);
        b.push(self.stale as u8);
        b.extend_from_slice(&(self.groups.len() as u16).to_be_bytes());
        for g in &self.groups {
            if g.nodes.len() > NODES_MAX {
                return Err(ProtoError::Invalid {
                    field: "nodes",
                    why: "over 32 nodes",
                });
            }
            if g.name.is_empty() {
                return Err(ProtoError::Empty("group"));
            }
            put_fixed_str(&mut b, &g.name, GROUP_LEN, "group")?;
            b.extend_from_slice(&g.users.to_be_bytes());
            b.extend_from_slice(&(g.nodes.len() as u16).to_be_bytes());
            for n in &g.nodes {
                n.addr.put(&mut b)?;
                b.push(n.online as u8);
                b.extend_from_slice(&n.started.to_be_bytes());
                b.extend_from_slice(&n.beat_age_ms.to_be_bytes());
                b.extend_from_slice(&n.free.to_be_bytes());
            }
        }
        Ok(b)
    }

    pub fn decode(body: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Rd { b: body };
        let stale = flag_field(&mut r, "stale")?;
        let ng = count_field(&mut r, "group count", GROUPS_MAX, GROUP_VIEW_LEN)?;
        let mut groups = Vec::with_capacity(ng);
        for _ in 0..ng {
            let name = group_field(&mut r)?;
            let users = r.u64("users")?;
            let nn = count_field(&mut r, "node count", NODES_MAX, NODE_VIEW_LEN)?;
            let mut nodes = Vec::with_capacity(nn);
            for _ in 0..nn {
                let addr = NodeAddr::read(&mut r)?;
                let online = flag_field(&mut r, "online")?;
                let started = r.u64("started")?;
                let beat_age_ms = r.u64("beat age")?;
                let free = r.u64("free")?;
                nodes.push(NodeView {
                    addr,
                    online,
                    started,
                    beat_age_ms,
                    free,
                });
            }
            groups.push(GroupView { name, users, nodes });
        }
        r.end("TRACKER_GROUPS reply")?;
        Ok(GroupsReply { stale, groups })
    }
}

/// TRACKER_USERS (14): up to `limit` users of `group` in (app, user) order, after the pair
/// `after` (empty strings: from the start), so a caller pages through any number of users.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsersReq {
    pub group: String,
    pub after: (String, String),
    pub limit: u16,
}

fn check_page(limit: u16) -> Result<(), ProtoError> {
    if limit == 0 || limit > USERS_PAGE_MAX {
        return Err(ProtoError::Invalid {
            field: "limit",
            why: "outside 1 ..= 256",
        });
    }
    Ok(())
}

impl UsersReq {
    pub fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        check_group(&self.group)?;
        check_page(self.limit)?;
        let mut b = Vec::with_capacity(USERS_LEN);
        put_fixed_str(&mut b, &self.group, GROUP_LEN, "group")?;
        put_fixed_str(&mut b, &self.after.0, APP_ID_LEN, "after app")?;
        put_fixed_str(&mut b, &self.after.1, USER_ID_LEN, "after user")?;
        b.extend_from_slice(&self.limit.to_be_bytes());
        Ok(b)
    }

    pub fn decode(body: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Rd { b: body };
        let group = group_field(&mut r)?;
        let app = r.fixed_str(APP_ID_LEN, "after app")?;
        let user = r.fixed_str(USER_ID_LEN, "after user")?;
        let limit = r.u16("limit")?;
        check_page(limit)?;
        r.end("TRACKER_USERS")?;
        Ok(UsersReq {
            group,
            after: (app, user),
            limit,
        })
    }
}

/// Reply to TRACKER_USERS: the page, and whether more users follow its last one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsersReply {
    pub more: bool,
    pub users: Vec<(String, String)>,
}

impl UsersReply {
    pub fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        if self.users.len() > USERS_PAGE_MAX as usize {
            return Err(ProtoError::Invalid {
                field: "users",
                why: "over 256 users",
            });
        }
        let mut b = Vec::with_capacity(3 + self.users.len() * USER_ROW_LEN);
        b.push(self.more as u8);
        b.extend_from_slice(&(self.users.len() as u16).to_be_bytes());
        for (app, user) in &self.users {
            if app.is_empty() || user.is_empty() {
                return Err(ProtoError::Empty("app or user id"));
            }
            put_fixed_str(&mut b, app, APP_ID_LEN, "app id")?;
            put_fixed_str(&mut b, user, USER_ID_LEN, "user id")?;
        }
        Ok(b)
    }

    pub fn decode(body: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Rd { b: body };
        let more = flag_field(&mut r, "more")?;
        let n = count_field(&mut r, "user count", USERS_PAGE_MAX as usize, USER_ROW_LEN)?;
        let mut users = Vec::with_capacity(n);
        for _ in 0..n {
            let app = non_empty(r.fixed_str(APP_ID_LEN, "app id")?, "app id")?;
            let user = non_empty(r.fixed_str(USER_ID_LEN, "user id")?, "user id")?;
            users.push((app, user));
        }
        r.end("TRACKER_USERS reply")?;
        Ok(UsersReply { more, users })
    }
}

/// The body rules of the replies to the cluster commands, for [`Decoder::replies`]: control
/// bodies up to the largest reply of the command.
pub fn cluster_reply_spec(c: u8) -> Option<BodySpec> {
    let meta = match Command::from_u8(c)? {
        Command::Reply(ReplyCmd::Tracker) => GROUPS_REPLY_MAX,
        Command::Reply(ReplyCmd::Storage | ReplyCmd::Proxy)
        | Command::Conn(_)
        | Command::Tracker(_)
        | Command::File(_) => return None,
    };
    Some(BodySpec {
        meta,
        exact: false,
        payload_max: 0,
    })
}
