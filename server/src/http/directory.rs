//! Where the cluster's HTTP gateways are, as the trackers last listed them: every JOIN/BEAT
//! reply to a node that serves HTTP carries each group's online gateways. A request for a file
//! of another group is redirected to one of them (see [`super::respond::answer`]), so a signed
//! URL works at any gateway of the cluster.

use ferry_common::proto::{GatewayEntry, NodeAddr};
use parking_lot::RwLock;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

/// Where a file's group serves HTTP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Where {
    /// This node's own group: serve it here.
    Here,
    /// Another group's gateway (the same one for the same file id while the list holds).
    There(NodeAddr),
    /// The group exists but none of its gateways is online.
    NoGateway,
    /// The cluster has no such group.
    NoGroup,
    /// No tracker has answered yet.
    Unknown,
}

pub struct Directory {
    /// This node's group.
    own: String,
    /// Group -> its online gateways; `None` until a tracker's first list.
    groups: RwLock<Option<HashMap<String, Vec<NodeAddr>>>>,
}

impl Directory {
    pub fn new(own: &str) -> Directory {
        Directory {
            own: own.to_owned(),
            groups: RwLock::new(None),
        }
    }

    /// A tracker's list replaces the last one. An empty list comes only from a tracker that
    /// predates gateways (a current one lists every group): it tells nothing, so it is ignored.
    pub fn update(&self, list: &[GatewayEntry]) {
        if list.is_empty() {
            return;
        }
        let mut m: HashMap<String, Vec<NodeAddr>> = HashMap::new();
        for e in list {
            let v = m.entry(e.group.clone()).or_default();
            v.extend(e.addr.clone());
        }
        *self.groups.write() = Some(m);
    }

    /// Where `group` serves `file_id`.
    pub fn locate(&self, group: &str, file_id: &str) -> Where {
        if group == self.own {
            return Where::Here;
        }
        let g = self.groups.read();
        let Some(m) = g.as_ref() else {
            return Where::Unknown;
        };
        match m.get(group) {
            None => Where::NoGroup,
            Some(v) if v.is_empty() => Where::NoGateway,
            // One file goes to one gateway, whose cache then holds it.
            Some(v) => {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                file_id.hash(&mut h);
                Where::There(v[(h.finish() % v.len() as u64) as usize].clone())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gw(group: &str, port: Option<u16>) -> GatewayEntry {
        GatewayEntry {
            group: group.into(),
            addr: port.map(|port| NodeAddr {
                host: "127.0.0.1".into(),
                port,
            }),
        }
    }

    #[test]
    fn files_go_to_a_gateway_of_their_group() {
        let d = Directory::new("g1");
        assert_eq!(d.locate("g1", "g1.x"), Where::Here);
        assert_eq!(d.locate("g2", "g2.x"), Where::Unknown);
        d.update(&[
            gw("g1", Some(1)),
            gw("g2", Some(2)),
            gw("g2", Some(3)),
            gw("g3", None),
        ]);
        assert_eq!(d.locate("g1", "g1.x"), Where::Here);
        assert_eq!(d.locate("g3", "g3.x"), Where::NoGateway);
        assert_eq!(d.locate("g4", "g4.x"), Where::NoGroup);
        // Both gateways of g2 get files, and one file always the same one.
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..64 {
            let id = format!("g2.{i}");
            let Where::There(a) = d.locate("g2", &id) else {
                panic!("g2 has gateways");
            };
            assert_eq!(d.locate("g2", &id), Where::There(a.clone()));
            seen.insert(a.port);
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![2, 3]);
        // An empty list (a tracker from before gateways) keeps what was known.
        d.update(&[]);
        assert_eq!(d.locate("g3", "g3.x"), Where::NoGateway);
        // A new list replaces the old one.
        d.update(&[gw("g2", None)]);
        assert_eq!(d.locate("g2", "g2.x"), Where::NoGateway);
        assert_eq!(d.locate("g3", "g3.x"), Where::NoGroup);
    }
}
