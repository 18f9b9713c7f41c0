//! Where a routing server-proxy sends a session: the tracker's answer for the session's
//! (app, user), cached for `route_cache_ms`, and the order the group's nodes are tried in.
//!
//! The cache has two levels, because that is how the answer is shaped: a user belongs to a
//! group (stable; the tracker's router table), and a group has nodes (which come and go). A
//! failed connect to a node invalidates the *group's* node list, so the next session of any user
//! of that group asks a tracker again instead of each user's entry rediscovering the dead node.
//! A node whose connect failed lately is also tried last (it may still be listed online by the
//! tracker until it misses its beats), so the sessions in between do not wait on it first.
//!
//! Sizes are bounded: user ids come from clients, so the user map holds at most [`USERS_MAX`]
//! entries (expired ones are purged first, then arbitrary ones), and the group and failed-node
//! maps at most [`GROUPS_MAX`] / [`FAILED_MAX`].

use parking_lot::Mutex;
use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most (app, user) entries kept; beyond it old entries are evicted.
pub const USERS_MAX: usize = 65_536;
/// Most groups kept (a tracker reports at most 256).
pub const GROUPS_MAX: usize = 1024;
/// Most recently failed node addresses remembered.
pub const FAILED_MAX: usize = 4096;

/// A tracker's answer: the user's group and its online nodes, preferred first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub group: String,
    pub nodes: Arc<[SocketAddr]>,
}

struct Timed<T> {
    value: T,
    at: Instant,
}

#[derive(Default)]
struct Maps {
    users: HashMap<(String, String), Timed<String>>,
    groups: HashMap<String, Timed<Arc<[SocketAddr]>>>,
    failed: HashMap<SocketAddr, Instant>,
}

/// A user's order of a group's nodes: sorted, then rotated by a hash of (app, user). The cache
/// keeps one node list per group, in the order of whichever answer filled it; ordering it per
/// user here makes every session of a user prefer the same node (its in-memory upload session,
/// hash progress and page cache stay on one node, the others are standbys), and users spread
/// over a group's nodes.
pub fn preferred(nodes: &[SocketAddr], app: &str, user: &str) -> Vec<SocketAddr> {
    let mut v = nodes.to_vec();
    v.sort();
    if !v.is_empty() {
        let mut h = DefaultHasher::new();
        (app, user).hash(&mut h);
        let by = (h.finish() % v.len() as u64) as usize;
        v.rotate_left(by);
    }
    v
}

/// The route cache shared by every session of one proxy.
pub struct RouteCache {
    ttl: Duration,
    maps: Mutex<Maps>,
}

/// Makes room for one more key in `map`: drops expired entries, then (still full) arbitrary
/// ones, so a flood of distinct users costs a bounded map and some cache misses, never memory.
fn make_room<K: Eq + std::hash::Hash + Clone, V>(
    map: &mut HashMap<K, V>,
    max: usize,
    expired: impl Fn(&V) -> bool,
) {
    if map.len() < max {
        return;
    }
    map.retain(|_, v| !expired(v));
    let excess = (map.len() + 1).saturating_sub(max);
    if excess > 0 {
        let doomed: Vec<K> = map.keys().take(excess).cloned().collect();
        for k in doomed {
            map.remove(&k);
        }
    }
}

impl RouteCache {
    pub fn new(ttl: Duration) -> Self {
        RouteCache {
            ttl,
            maps: Mutex::new(Maps::default()),
        }
    }

    /// The cached route of (app, user) if both the user's group and the group's nodes are fresh.
    pub fn get(&self, app: &str, user: &str, now: Instant) -> Option<Route> {
        let group = {
            let m = self.maps.lock();
            let g = m.users.get(&(app.to_owned(), user.to_owned()))?;
            if now.duration_since(g.at) >= self.ttl {
                return None;
            }
            g.value.clone()
        };
        self.get_group(&group, now)
    }

    /// The cached nodes of `group` if fresh (a session about a file whose id names its group).
    pub fn get_group(&self, group: &str, now: Instant) -> Option<Route> {
        let m = self.maps.lock();
        let nodes = m.groups.get(group)?;
        if now.duration_since(nodes.at) >= self.ttl {
            return None;
        }
        Some(Route {
            group: group.to_owned(),
            nodes: nodes.value.clone(),
        })
    }

    /// Records a tracker's answer for (app, user).
    pub fn put(&self, app: &str, user: &str, route: &Route, now: Instant) {
        let ttl = self.ttl;
        let mut m = self.maps.lock();
        let key = (app.to_owned(), user.to_owned());
        if !m.users.contains_key(&key) {
            make_room(&mut m.users, USERS_MAX, |t| now.duration_since(t.at) >= ttl);
        }
        m.users.insert(
            key,
            Timed {
                value: route.group.clone(),
                at: now,
            },
        );
        drop(m);
        self.put_group(route, now);
    }

    /// Records a group's nodes from a tracker's answer.
    pub fn put_group(&self, route: &Route, now: Instant) {
        let ttl = self.ttl;
        let mut m = self.maps.lock();
        if !m.groups.contains_key(&route.group) {
            make_room(&mut m.groups, GROUPS_MAX, |t| {
                now.duration_since(t.at) >= ttl
            });
        }
        m.groups.insert(
            route.group.clone(),
            Timed {
                value: route.nodes.clone(),
                at: now,
            },
        );
    }

    /// A connect to `node` of `group` failed: forget the group's node list (the next session of
    /// any of its users asks a tracker again) and try this node last for one cache period.
    pub fn node_failed(&self, group: &str, node: SocketAddr, now: Instant) {
        let ttl = self.ttl;
        let mut m = self.maps.lock();
        m.groups.remove(group);
        if !m.failed.contains_key(&node) {
            make_room(&mut m.failed, FAILED_MAX, |at| {
                now.duration_since(*at) >= ttl
            });
        }
        m.failed.insert(node, now);
    }

    /// A connect to `node` succeeded: it no longer counts as failed.
    pub fn node_ok(&self, node: SocketAddr) {
        let mut m = self.maps.lock();
        if !m.failed.is_empty() {
            m.failed.remove(&node);
        }
    }

    /// The order to try a group's nodes in: the tracker's order (its preferred node first, the
    /// rest standbys), except that nodes whose connect failed within the last cache period go
    /// last, in the same relative order. They stay in the list: the failure may have been brief,
    /// and with every node failing the session should still try them all.
    pub fn order(&self, nodes: &[SocketAddr], now: Instant) -> Vec<SocketAddr> {
        let m = self.maps.lock();
        let failed = |a: &SocketAddr| {
            m.failed
                .get(a)
                .is_some_and(|at| now.duration_since(*at) < self.ttl)
        };
        let good = nodes.iter().filter(|a| !failed(a));
        let bad = nodes.iter().filter(|a| failed(a));
        good.chain(bad).copied().collect()
    }

    /// (users, groups) cached now, for tests and stats.
    pub fn len(&self) -> (usize, usize) {
        let m = self.maps.lock();
        (m.users.len(), m.groups.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(p: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], p))
    }

    fn route(group: &str, ports: &[u16]) -> Route {
        Route {
            group: group.into(),
            nodes: ports.iter().map(|&p| addr(p)).collect(),
        }
    }

    #[test]
    fn entries_live_for_the_ttl_per_app_and_user() {
        let c = RouteCache::new(Duration::from_millis(100));
        let t0 = Instant::now();
        assert_eq!(c.get("a", "alice", t0), None);
        c.put("a", "alice", &route("g1", &[1, 2]), t0);
        let hit = c.get("a", "alice", t0 + Duration::from_millis(99)).unwrap();
        assert_eq!(hit, route("g1", &[1, 2]));
        // Another app's user of the same name is another key.
        assert_eq!(c.get("b", "alice", t0), None);
        assert_eq!(c.get("a", "alice", t0 + Duration::from_millis(100)), None);
    }

    #[test]
    fn a_failed_node_drops_its_group_for_every_user_and_goes_last() {
        let c = RouteCache::new(Duration::from_millis(100));
        let t0 = Instant::now();
        c.put("a", "alice", &route("g1", &[1, 2, 3]), t0);
        c.put("a", "bob", &route("g1", &[1, 2, 3]), t0);
        c.put("a", "carol", &route("g2", &[4, 5]), t0);
        c.node_failed("g1", addr(1), t0);
        assert_eq!(c.get("a", "alice", t0), None);
        assert_eq!(c.get("a", "bob", t0), None);
        assert!(
            c.get("a", "carol", t0).is_some(),
            "other groups stay cached"
        );
        let nodes = [addr(1), addr(2), addr(3)];
        assert_eq!(c.order(&nodes, t0), vec![addr(2), addr(3), addr(1)]);
        // A fresh answer for the group serves every user of it again.
        c.put("a", "alice", &route("g1", &[1, 2, 3]), t0);
        assert!(c.get("a", "bob", t0).is_some());
        // The demotion lasts one cache period, or until the node accepts a connect.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(c.order(&nodes, t1), nodes);
        c.node_failed("g1", addr(2), t1);
        assert_eq!(c.order(&nodes, t1), vec![addr(1), addr(3), addr(2)]);
        c.node_ok(addr(2));
        assert_eq!(c.order(&nodes, t1), nodes);
    }

    #[test]
    fn a_group_is_cached_on_its_own_for_files_that_name_it() {
        let c = RouteCache::new(Duration::from_millis(100));
        let t0 = Instant::now();
        assert_eq!(c.get_group("g2", t0), None);
        c.put_group(&route("g2", &[4, 5]), t0);
        assert_eq!(c.get_group("g2", t0), Some(route("g2", &[4, 5])));
        // No user learnt anything from it.
        assert_eq!(c.len(), (0, 1));
        // A user's answer serves the group's files too, and both expire with the group.
        c.put("a", "alice", &route("g1", &[1]), t0);
        assert_eq!(c.get_group("g1", t0), Some(route("g1", &[1])));
        assert_eq!(c.get_group("g2", t0 + Duration::from_millis(100)), None);
        c.node_failed("g2", addr(4), t0);
        assert_eq!(c.get_group("g2", t0), None);
    }

    #[test]
    fn a_user_prefers_one_node_whatever_order_the_cache_holds() {
        let nodes = [addr(3), addr(1), addr(2)];
        let reversed = [addr(2), addr(1), addr(3)];
        let mut firsts = std::collections::BTreeSet::new();
        for i in 0..30 {
            let user = format!("user{i}");
            let a = preferred(&nodes, "demo", &user);
            assert_eq!(a, preferred(&reversed, "demo", &user), "{user}");
            let mut sorted = a.clone();
            sorted.sort();
            assert_eq!(
                sorted,
                vec![addr(1), addr(2), addr(3)],
                "a rotation of all nodes"
            );
            firsts.insert(a[0]);
        }
        assert_eq!(firsts.len(), 3, "users spread over the nodes");
        assert!(preferred(&[], "demo", "u").is_empty());
    }

    #[test]
    fn every_node_failed_keeps_the_trackers_order() {
        let c = RouteCache::new(Duration::from_secs(5));
        let t0 = Instant::now();
        let nodes = [addr(7), addr(8)];
        c.node_failed("g", addr(8), t0);
        c.node_failed("g", addr(7), t0);
        assert_eq!(c.order(&nodes, t0), nodes);
        assert_eq!(c.order(&[], t0), Vec::<SocketAddr>::new());
    }

    #[test]
    fn a_flood_of_users_stays_bounded() {
        let c = RouteCache::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let r = route("g1", &[1]);
        for i in 0..USERS_MAX + 500 {
            c.put("a", &format!("user{i}"), &r, t0);
        }
        assert_eq!(c.len(), (USERS_MAX, 1));
        // The newest entry is always kept.
        assert!(
            c.get("a", &format!("user{}", USERS_MAX + 499), t0)
                .is_some()
        );
        // Expired entries are the first to go.
        let c = RouteCache::new(Duration::from_millis(10));
        for i in 0..USERS_MAX {
            c.put("a", &format!("old{i}"), &r, t0);
        }
        let later = t0 + Duration::from_millis(20);
        c.put("a", "new", &r, later);
        assert_eq!(c.len().0, 1);
    }
}
