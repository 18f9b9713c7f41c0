//! The tracker role (seed 004's tracker, commands 10-13): storage nodes JOIN and BEAT, proxies
//! ask where a user lives (SADDRS), anyone may ask for the cluster view (GROUPS).
//!
//! The database ([`ClusterStore`]) is the truth shared by every tracker; each tracker keeps a
//! [`View`] of it in memory, refreshed by a background thread, so SADDRS and GROUPS cost no
//! database round trip, and so the tracker keeps answering (marked stale) while the database is
//! unreachable. Beats this tracker receives update its view at once; beats other trackers
//! receive show up at the next refresh. A node is online while its last beat is younger than
//! `offline_after_ms`, computed at answer time, so it goes offline without any event and comes
//! back with its next beat.

use super::store::{ClusterStore, Joined, NodeRow};
use crate::config::TrackerConfig;
use crate::meta::{MetaStore, now_ms};
use crate::storage::OpError;
use crossbeam_channel::{Receiver, Sender, bounded};
use ferry_common::proto::{
    self, BeatReply, ErrorCode, GATEWAYS_PER_GROUP, GROUPS_MAX, GatewayEntry, GroupView,
    GroupsReply, NODES_MAX, NodeAddr, NodeHello, NodeView, SaddrsReply, SaddrsReq, UsersReply,
    UsersReq,
};
use log::{info, warn};
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Routes remembered in memory (a route never changes once recorded, so entries stay valid);
/// past this the cache is emptied rather than grown.
const ROUTES_MAX: usize = 100_000;

/// What the tracker last read from the database, plus the beats it received since.
#[derive(Debug, Default, Clone)]
pub struct View {
    /// At least one refresh has succeeded: there is something to answer from.
    loaded: bool,
    /// The last refresh (or a request) failed to reach the database.
    stale: bool,
    /// Group -> users routed to it.
    groups: BTreeMap<String, u64>,
    nodes: BTreeMap<NodeAddr, NodeRow>,
}

pub struct Tracker {
    store: Arc<dyn ClusterStore>,
    /// The file records, for ids that do not name their group.
    files: Arc<dyn MetaStore>,
    cfg: TrackerConfig,
    view: RwLock<View>,
    routes: Mutex<HashMap<(String, String), String>>,
    /// (app, file id) -> group of files found through `files` (a file never moves).
    file_routes: Mutex<HashMap<(String, String), String>>,
    /// An outage has been logged; the next success logs the recovery.
    down_logged: Mutex<bool>,
    stop: Mutex<Option<(Sender<()>, JoinHandle<()>)>>,
}

/// How often the view is reloaded: well inside the offline window, so a node another tracker
/// hears from never looks offline here.
fn refresh_every(cfg: &TrackerConfig) -> Duration {
    Duration::from_millis((cfg.offline_after_ms / 4).clamp(50, 500))
}

fn unavailable(e: &anyhow::Error) -> OpError {
    OpError::new(
        ErrorCode::Unavailable,
        format!("tracker database unreachable: {e:#}"),
    )
}

impl Tracker {
    /// Starts the tracker: creates the configured groups (retried by the refresh thread while
    /// the database is down) and loads the first view.
    pub fn start(
        store: Arc<dyn ClusterStore>,
        files: Arc<dyn MetaStore>,
        cfg: TrackerConfig,
    ) -> Arc<Tracker> {
        let t = Arc::new(Tracker {
            store,
            files,
            cfg,
            view: RwLock::new(View::default()),
            routes: Mutex::new(HashMap::new()),
            file_routes: Mutex::new(HashMap::new()),
            down_logged: Mutex::new(false),
            stop: Mutex::new(None),
        });
        let mut groups_made = t.create_groups();
        t.refresh();
        let (tx, rx): (Sender<()>, Receiver<()>) = bounded(1);
        let every = refresh_every(&t.cfg);
        let me = Arc::downgrade(&t);
        let h = std::thread::Builder::new()
            .name("tracker-view".into())
            .spawn(move || {
                while let Err(crossbeam_channel::RecvTimeoutError::Timeout) = rx.recv_timeout(every)
                {
                    let Some(t) = me.upgrade() else { return };
                    if !groups_made {
                        groups_made = t.create_groups();
                    }
                    t.refresh();
                }
            });
        match h {
            Ok(h) => *t.stop.lock() = Some((tx, h)),
            Err(e) => warn!("tracker: cannot start the view refresh thread: {e}"),
        }
        t
    }

    /// Stops the refresh thread.
    pub fn stop(&self) {
        if let Some((tx, h)) = self.stop.lock().take() {
            drop(tx);
            let _ = h.join();
        }
    }

    fn create_groups(&self) -> bool {
        for g in &self.cfg.groups {
            match self.store.create_group(g) {
                Ok(true) => {}
                Ok(false) => warn!("tracker: cannot create group {g}: {GROUPS_MAX} groups exist"),
                Err(e) => {
                    self.db_failed(&e);
                    return false;
                }
            }
        }
        true
    }

    fn db_failed(&self, e: &anyhow::Error) {
        self.view.write().stale = true;
        let mut logged = self.down_logged.lock();
        if !*logged {
            warn!("tracker: database unreachable, answering from the last view (stale): {e:#}");
            *logged = true;
        }
    }

    fn db_ok(&self) {
        let mut logged = self.down_logged.lock();
        if *logged {
            info!("tracker: database reachable again");
            *logged = false;
        }
    }

    /// Reloads the view from the database; on failure keeps the old one, marked stale.
    pub fn refresh(&self) {
        let load = || -> anyhow::Result<View> {
            let names = self.store.groups()?;
            let users: HashMap<String, u64> = self.store.users_per_group()?.into_iter().collect();
            let nodes = self.store.nodes()?;
            let groups = names
                .into_iter()
                .map(|g| {
                    let u = users.get(&g).copied().unwrap_or(0);
                    (g, u)
                })
                .collect();
            let nodes = nodes.into_iter().map(|n| (n.addr.clone(), n)).collect();
            Ok(View {
                loaded: true,
                stale: false,
                groups,
                nodes,
            })
        };
        match load() {
            Ok(mut v) => {
                let now = now_ms();
                let mut cur = self.view.write();
                for (addr, n) in &mut v.nodes {
                    // A beat received here after the query started is newer than the row.
                    if let Some(old) = cur.nodes.get(addr)
                        && old.group == n.group
                        && old.last_beat_ms > n.last_beat_ms
                    {
                        n.last_beat_ms = old.last_beat_ms;
                    }
                    let was = cur.nodes.get(addr).is_some_and(|o| self.online(o, now));
                    let is = self.online(n, now);
                    if cur.loaded && was != is {
                        let state = if is { "online" } else { "offline" };
                        info!("tracker: node {addr} of group {} is {state}", n.group);
                    }
                }
                *cur = v;
                drop(cur);
                self.db_ok();
            }
            Err(e) => self.db_failed(&e),
        }
    }

    fn online(&self, n: &NodeRow, now: u64) -> bool {
        now.saturating_sub(n.last_beat_ms) <= self.cfg.offline_after_ms
    }

    fn interval(&self) -> u32 {
        u32::try_from(self.cfg.beat_interval_ms).unwrap_or(u32::MAX)
    }

    /// A JOIN/BEAT reply. A node with an HTTP gateway also gets every group with up to
    /// [`GATEWAYS_PER_GROUP`] of its online gateways (none: the group has no gateway up), so
    /// its gateway can redirect requests for files of other groups; other nodes need no list.
    fn beat_reply(&self, v: &View, serves_http: bool, now: u64) -> BeatReply {
        let mut gateways = Vec::new();
        if serves_http {
            for g in v.groups.keys() {
                let before = gateways.len();
                let up = v
                    .nodes
                    .values()
                    .filter(|n| &n.group == g && self.online(n, now))
                    .filter_map(|n| n.http.clone())
                    .take(GATEWAYS_PER_GROUP)
                    .map(|a| GatewayEntry {
                        group: g.clone(),
                        addr: Some(a),
                    });
                gateways.extend(up);
                if gateways.len() == before {
                    gateways.push(GatewayEntry {
                        group: g.clone(),
                        addr: None,
                    });
                }
            }
        }
        BeatReply {
            interval_ms: self.interval(),
            gateways,
        }
    }

    /// TRACKER_JOIN: records the node (its group must exist unless groups may be created).
    pub fn join(&self, j: &NodeHello) -> Result<BeatReply, OpError> {
        let now = now_ms();
        let row = NodeRow {
            group: j.group.clone(),
            addr: NodeAddr {
                host: j.host.clone(),
                port: j.port,
            },
            version: j.version,
            started: j.started,
            free: j.free,
            last_beat_ms: now,
            http: j.http.clone(),
        };
        match self.store.join(&row, self.cfg.allow_create_groups) {
            Ok(Joined::Ok) => {
                self.db_ok();
                info!(
                    "tracker: node {} joined group {} (version {}, {} bytes free)",
                    row.addr, row.group, row.version, row.free
                );
                let mut v = self.view.write();
                v.groups.entry(row.group.clone()).or_insert(0);
                v.nodes.insert(row.addr.clone(), row);
                Ok(self.beat_reply(&v, j.http.is_some(), now))
            }
            Ok(Joined::UnknownGroup) => Err(OpError::new(
                ErrorCode::UnknownGroup,
                format!(
                    "group {} does not exist (this tracker does not create groups)",
                    j.group
                ),
            )),
            Ok(Joined::Full) => Err(OpError::new(
                ErrorCode::Limit,
                format!(
                    "group {} has {NODES_MAX} nodes already (or there are {GROUPS_MAX} groups)",
                    j.group
                ),
            )),
            Err(e) => {
                self.db_failed(&e);
                Err(unavailable(&e))
            }
        }
    }

    /// TRACKER_BEAT: refreshes a joined node; an unknown one is told to JOIN again.
    pub fn beat(&self, b: &NodeHello) -> Result<BeatReply, OpError> {
        let now = now_ms();
        let addr = NodeAddr {
            host: b.host.clone(),
            port: b.port,
        };
        // While the database is known to be down, a known node's beat only refreshes the view:
        // no request waits on a connection timeout (the refresh thread notices the recovery).
        let stale = self.view.read().stale;
        let r = if stale {
            Err(anyhow::anyhow!("database unreachable at the last refresh"))
        } else {
            self.store.beat(&b.group, &addr, b.started, b.free, now)
        };
        let known = match r {
            Ok(k) => {
                self.db_ok();
                k
            }
            Err(e) => {
                self.db_failed(&e);
                // Keep the node alive in the view we answer from while the database is down.
                let mut v = self.view.write();
                match v.nodes.get_mut(&addr) {
                    Some(n) if n.group == b.group => {
                        n.last_beat_ms = now;
                        n.free = b.free;
                        n.started = b.started;
                        let http = n.http.is_some();
                        return Ok(self.beat_reply(&v, http, now));
                    }
                    _ => return Err(unavailable(&e)),
                }
            }
        };
        let mut v = self.view.write();
        if !known {
            if v.nodes.get(&addr).is_some_and(|n| n.group == b.group) {
                v.nodes.remove(&addr);
            }
            return Err(OpError::new(
                ErrorCode::NotJoined,
                format!("node {addr} has not joined group {}; send JOIN", b.group),
            ));
        }
        let n = v.nodes.entry(addr.clone()).or_insert_with(|| NodeRow {
            group: b.group.clone(),
            addr,
            version: 0,
            started: b.started,
            free: b.free,
            last_beat_ms: now,
            http: None,
        });
        n.last_beat_ms = now;
        n.free = b.free;
        n.started = b.started;
        let http = n.http.is_some();
        Ok(self.beat_reply(&v, http, now))
    }

    /// The user's group: from the route cache, the router table, or a new assignment.
    fn group_of(&self, app: &str, user: &str) -> Result<String, OpError> {
        let key = (app.to_owned(), user.to_owned());
        if let Some(g) = self.routes.lock().get(&key) {
            return Ok(g.clone());
        }
        if self.view.read().stale {
            return Err(OpError::new(
                ErrorCode::Unavailable,
                format!(
                    "tracker database unreachable at the last refresh; cannot route new user \
                     {user} of app {app} yet"
                ),
            ));
        }
        let found = match self.store.route(app, user) {
            Ok(g) => g,
            Err(e) => {
                self.db_failed(&e);
                return Err(unavailable(&e));
            }
        };
        let group = match found {
            Some(g) => g,
            None => {
                let pick = self.pick_group().ok_or_else(|| {
                    OpError::new(
                        ErrorCode::NoNode,
                        format!("no group has an online node to take user {user} of app {app}"),
                    )
                })?;
                let g = self.store.assign(app, user, &pick).map_err(|e| {
                    self.db_failed(&e);
                    unavailable(&e)
                })?;
                if let Some(u) = self.view.write().groups.get_mut(&g) {
                    *u += 1;
                }
                info!("tracker: user {user} of app {app} routed to group {g}");
                g
            }
        };
        let mut routes = self.routes.lock();
        if routes.len() >= ROUTES_MAX {
            routes.clear();
        }
        routes.insert(key, group.clone());
        Ok(group)
    }

    /// The group a new user goes to: one with an online node and the fewest users; ties go to
    /// the most free bytes (of its best online node: the nodes share one volume), then the name.
    fn pick_group(&self) -> Option<String> {
        let now = now_ms();
        let v = self.view.read();
        let mut best: Option<(u64, u64, &String)> = None;
        for (g, &users) in &v.groups {
            let free = v
                .nodes
                .values()
                .filter(|n| &n.group == g && self.online(n, now))
                .map(|n| n.free)
                .max();
            let Some(free) = free else { continue };
            let better = match best {
                None => true,
                Some((bu, bf, _)) => users < bu || (users == bu && free > bf),
            };
            if better {
                best = Some((users, free, g));
            }
        }
        best.map(|(_, _, g)| g.clone())
    }

    /// The group holding the file a SADDRS names: the group its id names, else (an id issued
    /// before ids named their group) the group its record names. `None` when the request names
    /// no file or nothing is known of it: the user's group answers, as it did for every request
    /// before files were routed by their group.
    fn group_of_file(&self, app: &str, file_id: &str) -> Result<Option<String>, OpError> {
        if file_id.is_empty() {
            return Ok(None);
        }
        if let Some(g) = proto::file_group(file_id) {
            let v = self.view.read();
            if v.loaded && !v.groups.contains_key(g) {
                return Err(OpError::new(
                    ErrorCode::NotFound,
                    format!("file {file_id}: no group {g} in this cluster"),
                ));
            }
            return Ok(Some(g.to_owned()));
        }
        let key = (app.to_owned(), file_id.to_owned());
        if let Some(g) = self.file_routes.lock().get(&key) {
            return Ok(Some(g.clone()));
        }
        match self.files.file_group(file_id, app) {
            Ok(Some(g)) if !g.is_empty() => {
                let mut routes = self.file_routes.lock();
                if routes.len() >= ROUTES_MAX {
                    routes.clear();
                }
                routes.insert(key, g.clone());
                Ok(Some(g))
            }
            Ok(_) => Ok(None),
            Err(e) => {
                self.db_failed(&e);
                Err(unavailable(&e))
            }
        }
    }

    /// TRACKER_SADDRS: the group of the file named (see [`Tracker::group_of_file`]) or of the
    /// user, and its online nodes. Each user prefers one node of a group (by a hash of app and
    /// user) so a group's users spread over its nodes.
    pub fn saddrs(&self, q: &SaddrsReq) -> Result<SaddrsReply, OpError> {
        if !self.view.read().loaded {
            self.refresh();
        }
        let group = match self.group_of_file(&q.app, &q.file_id)? {
            Some(g) => g,
            None => self.group_of(&q.app, &q.user)?,
        };
        let now = now_ms();
        let v = self.view.read();
        let mut nodes: Vec<NodeAddr> = v
            .nodes
            .values()
            .filter(|n| n.group == group && self.online(n, now))
            .map(|n| n.addr.clone())
            .take(NODES_MAX)
            .collect();
        if nodes.is_empty() {
            return Err(OpError::new(
                ErrorCode::NoNode,
                format!("group {group} has no online node"),
            ));
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (&q.app, &q.user).hash(&mut h);
        let len = nodes.len();
        nodes.rotate_left((h.finish() % len as u64) as usize);
        Ok(SaddrsReply {
            group,
            stale: v.stale,
            nodes,
        })
    }

    /// TRACKER_USERS: one page of a group's users, read from the database (the view keeps
    /// only counts); error 22 for a group the cluster does not have, 24 when the database is
    /// unreachable.
    pub fn users(&self, q: &UsersReq) -> Result<UsersReply, OpError> {
        if !self.view.read().loaded {
            self.refresh();
        }
        {
            let v = self.view.read();
            if v.loaded && !v.groups.contains_key(&q.group) {
                return Err(OpError::new(
                    ErrorCode::UnknownGroup,
                    format!("no group {} in this cluster", q.group),
                ));
            }
        }
        let after = (q.after.0.as_str(), q.after.1.as_str());
        let limit = u32::from(q.limit);
        let mut users = self
            .store
            .users_of(&q.group, after, limit + 1)
            .map_err(|e| {
                self.db_failed(&e);
                unavailable(&e)
            })?;
        let more = users.len() > q.limit as usize;
        users.truncate(q.limit as usize);
        Ok(UsersReply { more, users })
    }

    /// TRACKER_GROUPS: the view, or error 24 if the database never answered.
    pub fn groups(&self) -> Result<GroupsReply, OpError> {
        if !self.view.read().loaded {
            self.refresh();
        }
        let v = self.view.read();
        if !v.loaded {
            return Err(OpError::new(
                ErrorCode::Unavailable,
                "tracker database unreachable and no cluster view loaded yet",
            ));
        }
        let now = now_ms();
        let groups = v
            .groups
            .iter()
            .take(GROUPS_MAX)
            .map(|(name, &users)| GroupView {
                name: name.clone(),
                users,
                nodes: v
                    .nodes
                    .values()
                    .filter(|n| &n.group == name)
                    .take(NODES_MAX)
                    .map(|n| NodeView {
                        addr: n.addr.clone(),
                        online: self.online(n, now),
                        started: n.started,
                        beat_age_ms: now.saturating_sub(n.last_beat_ms),
                        free: n.free,
                    })
                    .collect(),
            })
            .collect();
        Ok(GroupsReply {
            stale: v.stale,
            groups,
        })
    }
}
