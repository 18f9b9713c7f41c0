//! `ferry groups`: the cluster view from a tracker (TRACKER_GROUPS) and each group's users
//! (TRACKER_USERS, paged), as text or JSON.

use crate::error::ClientError;
use ferry_common::auth::SigningKey;
use ferry_common::proto::{
    CallError, GROUPS_REPLY_MAX, GroupsReply, USERS_PAGE_MAX, USERS_REPLY_MAX, UsersReply,
    UsersReq, call_once, cmd,
};
use serde_json::json;
use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

/// Where and how to ask: the trackers (tried in turn), the timeout, the admin link key.
pub struct Trackers<'a> {
    pub addrs: &'a [String],
    pub timeout: Duration,
    pub link: Option<&'a SigningKey>,
}

/// The cluster view and, per group, its first users in (app, user) order.
pub struct Listing {
    pub view: GroupsReply,
    /// Group -> (app, user) pairs listed, and whether the group has more than those.
    pub users: BTreeMap<String, (Vec<(String, String)>, bool)>,
}

/// The view plus up to `max_users` users of each group.
pub fn fetch(t: &Trackers, max_users: usize) -> Result<Listing, ClientError> {
    let body = ask(t, "groups", cmd::TRACKER_GROUPS, &[], GROUPS_REPLY_MAX)?;
    let view = GroupsReply::decode(&body).map_err(|e| garbled("groups", e))?;
    let mut users = BTreeMap::new();
    for g in &view.groups {
        users.insert(g.name.clone(), users_of(t, &g.name, g.users, max_users)?);
    }
    Ok(Listing { view, users })
}

/// Up to `max` of the `count` users of `group`, a page (at most 256) per request; true when
/// more remain.
fn users_of(
    t: &Trackers,
    group: &str,
    count: u64,
    max: usize,
) -> Result<(Vec<(String, String)>, bool), ClientError> {
    let mut out: Vec<(String, String)> = Vec::new();
    let op = format!("users of group {group}");
    let mut more = count > 0;
    while more && out.len() < max {
        let q = UsersReq {
            group: group.to_owned(),
            after: out.last().cloned().unwrap_or_default(),
            limit: (max - out.len()).min(usize::from(USERS_PAGE_MAX)) as u16,
        };
        let body = q
            .encode()
            .map_err(|e| ClientError::Input(format!("{op}: {e}")))?;
        let reply = ask(t, &op, cmd::TRACKER_USERS, &body, USERS_REPLY_MAX)?;
        let page = UsersReply::decode(&reply).map_err(|e| garbled(&op, e))?;
        // Every page must move forward, or a broken tracker would keep this loop going.
        if page.users.first().is_some_and(|u| Some(u) <= out.last()) {
            return Err(garbled(&op, "users out of order"));
        }
        more = page.more && !page.users.is_empty();
        out.extend(page.users);
    }
    Ok((out, more))
}

fn garbled(op: &str, e: impl std::fmt::Display) -> ClientError {
    ClientError::Server {
        op: op.to_owned(),
        code: ferry_common::proto::ErrorCode::BadFrame,
        text: e.to_string(),
        peer: None,
    }
}

/// Sends one request to each tracker in turn until one answers; returns the reply body.
fn ask(
    t: &Trackers,
    op: &str,
    command: u8,
    body: &[u8],
    max: usize,
) -> Result<Vec<u8>, ClientError> {
    let (trackers, timeout, link) = (t.addrs, t.timeout, t.link);
    if trackers.is_empty() {
        return Err(ClientError::Input(
            "ferry groups needs --tracker ADDR".into(),
        ));
    }
    let mut last = String::new();
    for t in trackers {
        let addrs: Vec<SocketAddr> = t
            .to_socket_addrs()
            .map_err(|e| ClientError::Input(format!("tracker address {t}: {e}")))?
            .collect();
        for a in addrs {
            match call_once(a, timeout, link, command, body, cmd::REPLY_TRACKER, max) {
                Ok(body) => return Ok(body),
                Err(CallError::Refused { body, .. }) if !body.code.retryable() => {
                    return Err(ClientError::Server {
                        op: format!("{op} from tracker {a}"),
                        code: body.code,
                        text: body.text,
                        peer: Some(a.to_string()),
                    });
                }
                Err(e) => last = e.to_string(),
            }
        }
    }
    Err(ClientError::Unreachable {
        op: op.to_owned(),
        attempts: trackers.len() as u32,
        proxies: trackers.join(", "),
        last,
    })
}

fn ms_text(ms: u64) -> String {
    if ms < 10_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        humantime::format_duration(Duration::from_secs(ms / 1000)).to_string()
    }
}

/// One line per group, one indented line per node, then the group's users listed.
pub fn render(l: &Listing) -> String {
    let v = &l.view;
    let mut out = Vec::new();
    if v.stale {
        out.push("(stale: the tracker cannot reach its database; this is its last view)".into());
    }
    if v.groups.is_empty() {
        out.push("no groups".into());
    }
    for g in &v.groups {
        let online = g.nodes.iter().filter(|n| n.online).count();
        out.push(format!(
            "{}  users {}  nodes {}/{} online",
            g.name,
            g.users,
            online,
            g.nodes.len()
        ));
        for n in &g.nodes {
            out.push(format!(
                "  {:<22} {:<7}  beat {} ago  free {}",
                n.addr.to_string(),
                if n.online { "online" } else { "offline" },
                ms_text(n.beat_age_ms),
                bytesize::ByteSize(n.free).display().iec(),
            ));
        }
        let Some((users, more)) = l.users.get(&g.name) else {
            continue;
        };
        if !users.is_empty() {
            let names: Vec<String> = users.iter().map(|(a, u)| format!("{a}/{u}")).collect();
            out.push(format!("  users: {}", names.join(", ")));
        }
        if *more {
            let rest = g.users.saturating_sub(users.len() as u64);
            out.push(format!(
                "  ... and {rest} more (--users all lists every one)"
            ));
        }
    }
    out.join("\n")
}

/// The listing as one JSON object.
pub fn to_json(l: &Listing) -> serde_json::Value {
    let v = &l.view;
    json!({
        "command": "groups",
        "stale": v.stale,
        "groups": v.groups.iter().map(|g| {
            let (users, more) = l.users.get(&g.name).cloned().unwrap_or_default();
            json!({
                "group": g.name,
                "users": g.users,
                "user_list": users.iter().map(|(a, u)| json!({"app": a, "user": u}))
                    .collect::<Vec<_>>(),
                "user_list_complete": !more,
                "nodes": g.nodes.iter().map(|n| json!({
                    "addr": n.addr.to_string(),
                    "online": n.online,
                    "started_ms": n.started,
                    "beat_age_ms": n.beat_age_ms,
                    "free": n.free,
                })).collect::<Vec<_>>(),
            })
        }).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_common::proto::{GroupView, NodeAddr, NodeView};

    #[test]
    fn renders_groups_and_nodes() {
        let view = GroupsReply {
            stale: true,
            groups: vec![GroupView {
                name: "g1".into(),
                users: 2,
                nodes: vec![NodeView {
                    addr: NodeAddr {
                        host: "127.0.0.1".into(),
                        port: 7401,
                    },
                    online: false,
                    started: 1,
                    beat_age_ms: 7200,
                    free: 3 << 30,
                }],
            }],
        };
        let users = [(
            "g1".to_string(),
            (vec![("demo".into(), "ann".into())], true),
        )];
        let v = Listing {
            view,
            users: users.into_iter().collect(),
        };
        let t = render(&v);
        assert!(t.starts_with("(stale"), "{t}");
        assert!(t.contains("  users: demo/ann\n  ... and 1 more"), "{t}");
        assert!(t.contains("g1  users 2  nodes 0/1 online"), "{t}");
        assert!(
            t.contains("127.0.0.1:7401") && t.contains("offline") && t.contains("7.2s"),
            "{t}"
        );
        assert!(t.contains("3.0 GiB"), "{t}");
        let j = to_json(&v);
        assert_eq!(j["groups"][0]["nodes"][0]["beat_age_ms"], 7200);
        assert_eq!(j["stale"], true);
        assert_eq!(j["groups"][0]["user_list"][0]["user"], "ann");
        assert_eq!(j["groups"][0]["user_list_complete"], false);
    }

    #[test]
    fn no_tracker_is_an_input_error() {
        let t = Trackers {
            addrs: &[],
            timeout: Duration::from_secs(1),
            link: None,
        };
        assert!(matches!(fetch(&t, 10), Err(ClientError::Input(_))));
    }
}
