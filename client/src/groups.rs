//! `ferry groups`: the cluster view from a tracker (TRACKER_GROUPS), as text or JSON.

use crate::error::ClientError;
use ferry_common::auth::SigningKey;
use ferry_common::proto::{CallError, GROUPS_REPLY_MAX, GroupsReply, call_once, cmd};
use serde_json::json;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

/// Asks each tracker in turn until one answers.
pub fn fetch(
    trackers: &[String],
    timeout: Duration,
    link: Option<&SigningKey>,
) -> Result<GroupsReply, ClientError> {
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
            match call_once(
                a,
                timeout,
                link,
                cmd::TRACKER_GROUPS,
                &[],
                cmd::REPLY_TRACKER,
                GROUPS_REPLY_MAX,
            ) {
                Ok(body) => {
                    return GroupsReply::decode(&body).map_err(|e| ClientError::Server {
                        op: format!("groups from tracker {a}"),
                        code: e.code(),
                        text: e.to_string(),
                    });
                }
                Err(CallError::Refused { body, .. }) if !body.code.retryable() => {
                    return Err(ClientError::Server {
                        op: format!("groups from tracker {a}"),
                        code: body.code,
                        text: body.text,
                    });
                }
                Err(e) => last = e.to_string(),
            }
        }
    }
    Err(ClientError::Unreachable {
        op: "groups".into(),
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

/// One line per group, then one indented line per node.
pub fn render(v: &GroupsReply) -> String {
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
    }
    out.join("\n")
}

/// The view as one JSON object.
pub fn to_json(v: &GroupsReply) -> serde_json::Value {
    json!({
        "command": "groups",
        "stale": v.stale,
        "groups": v.groups.iter().map(|g| json!({
            "group": g.name,
            "users": g.users,
            "nodes": g.nodes.iter().map(|n| json!({
                "addr": n.addr.to_string(),
                "online": n.online,
                "started_ms": n.started,
                "beat_age_ms": n.beat_age_ms,
                "free": n.free,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_common::proto::{GroupView, NodeAddr, NodeView};

    #[test]
    fn renders_groups_and_nodes() {
        let v = GroupsReply {
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
        let t = render(&v);
        assert!(t.starts_with("(stale"), "{t}");
        assert!(t.contains("g1  users 2  nodes 0/1 online"), "{t}");
        assert!(
            t.contains("127.0.0.1:7401") && t.contains("offline") && t.contains("7.2s"),
            "{t}"
        );
        assert!(t.contains("3.0 GiB"), "{t}");
        let j = to_json(&v);
        assert_eq!(j["groups"][0]["nodes"][0]["beat_age_ms"], 7200);
        assert_eq!(j["stale"], true);
    }

    #[test]
    fn no_tracker_is_an_input_error() {
        assert!(matches!(
            fetch(&[], Duration::from_secs(1), None),
            Err(ClientError::Input(_))
        ));
    }
}
