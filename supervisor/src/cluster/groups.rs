//! The multi-node cluster (`ferry cluster up --nodes N --groups G`): two trackers, G groups of
//! N storage nodes (a group's nodes share one data dir and, with the trackers, one PostgreSQL
//! database), a routing server-proxy pair and a client-proxy pair, on generated configs.

use super::{
    CLIENT_PROXY_A, CLIENT_PROXY_B, CLIENT_PROXY_PER_IP, Cluster, Layout, Logs, META_URL_ENV,
    MemberConfig, SERVER, SERVER_PROXY_A, SERVER_PROXY_B, load, local_ca,
};
use crate::localca::LocalCa;
use crate::secrets::Secrets;
use ferry_client::error::{ClientError, Result};
use ferry_common::auth::{AuthConfig, LinkConfig, Member, PeerKind, SigningKey};
use ferry_common::proto::{self, cmd};
use ferry_proxy::config::Config as ProxyConfig;
use ferry_server::config::{
    ClusterConfig, Config as ServerConfig, Role as ServerRole, TrackerConfig,
};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Name of the tracker member of a multi-node cluster.
pub const TRACKER: &str = "tracker";
/// The second tracker of a multi-node cluster, on the same database.
pub const TRACKER_B: &str = "tracker-b";
/// Most nodes per group (a tracker's SADDRS answer lists at most 32).
pub const NODES_MAX: usize = proto::NODES_MAX;
/// Most groups a local cluster may have.
pub const GROUPS_MAX: usize = 64;

/// The shape of a multi-node cluster and its timing knobs.
#[derive(Debug, Clone)]
pub struct Spec {
    pub nodes: usize,
    pub groups: usize,
    /// The shared metadata database (`postgres://...`); required when nodes or groups > 1.
    pub meta_url: Option<String>,
    /// The tracker's `beat_interval_ms` and `offline_after_ms`.
    pub beat_interval_ms: u64,
    pub offline_after_ms: u64,
    /// The routing server-proxies' `route_cache_ms`.
    pub route_cache_ms: u64,
    /// The client-proxies listen with TLS, with a local CA made at start.
    pub tls: bool,
    /// The tracker's port; every other port of [`GroupsLayout::fixed`] is relative to it.
    pub port_base: u16,
}

/// The default `--port-base`: the ports of conf/.
pub const PORT_BASE: u16 = 7300;

impl Spec {
    /// Checks the shape, and that several nodes or groups have PostgreSQL to share.
    pub fn validate(&self) -> Result<()> {
        if !(1..=NODES_MAX).contains(&self.nodes) {
            return Err(ClientError::Input(format!(
                "--nodes must be 1 ..= {NODES_MAX}, not {}",
                self.nodes
            )));
        }
        if !(1..=GROUPS_MAX).contains(&self.groups) {
            return Err(ClientError::Input(format!(
                "--groups must be 1 ..= {GROUPS_MAX}, not {}",
                self.groups
            )));
        }
        let last = usize::from(self.port_base) + 301 + 2 * self.groups * self.nodes;
        if self.port_base < 1024 || last > usize::from(u16::MAX) {
            return Err(ClientError::Input(format!(
                "--port-base must leave room for {} ports above it, within 1024 ..= 65535",
                last - usize::from(self.port_base)
            )));
        }
        let pg = self
            .meta_url
            .as_deref()
            .is_some_and(|u| u.starts_with("postgres://") || u.starts_with("postgresql://"));
        if (self.nodes > 1 || self.groups > 1) && !pg {
            return Err(ClientError::Input(format!(
                "a cluster of {} group(s) x {} node(s) shares its metadata in PostgreSQL: pass \
                 --meta-url postgres://USER@HOST:PORT/DB, set {META_URL_ENV}, or set meta_url \
                 in the conf dir's server.toml{}",
                self.groups,
                self.nodes,
                match &self.meta_url {
                    Some(u) => format!(" (got {u:?}, not a postgres:// URL)"),
                    None => String::new(),
                }
            )));
        }
        Ok(())
    }
}

/// Where the members of a multi-node cluster listen.
#[derive(Debug, Clone)]
pub struct GroupsLayout {
    /// The two trackers (one database: either answers alike; nodes and proxies
    /// use both).
    pub trackers: [SocketAddr; 2],
    /// Each group's name (g1, g2, ...) and its nodes' addresses.
    pub groups: Vec<(String, Vec<SocketAddr>)>,
    /// Each group's nodes' HTTP gateways, in the order of `groups`.
    pub http: Vec<Vec<SocketAddr>>,
    pub server_proxies: [SocketAddr; 2],
    pub server_proxy_stats: [SocketAddr; 2],
    pub client_proxies: [SocketAddr; 2],
}

/// The member name of node `n` (from 1) of `group`.
pub fn node_name(group: &str, n: usize) -> String {
    format!("{group}-node{n}")
}

fn group_names(groups: usize) -> Vec<String> {
    (1..=groups).map(|g| format!("g{g}")).collect()
}

impl GroupsLayout {
    /// The ports `ferry cluster up --nodes N --groups G` uses, from `spec.port_base` (B, by
    /// default 7300 as in conf/): trackers B and B+1, nodes from B+301 and their HTTP
    /// gateways right after them (from B+301+G*N), routing server-proxies B+111/B+112 (stats
    /// B+211/B+212), client-proxies B+121/B+122.
    pub fn fixed(spec: &Spec) -> GroupsLayout {
        let b = usize::from(spec.port_base);
        let at = |port: usize| SocketAddr::from(([127, 0, 0, 1], (port - 7300 + b) as u16));
        let total = spec.groups * spec.nodes;
        let node = |g: usize, n: usize| 7601 + g * spec.nodes + n;
        GroupsLayout {
            trackers: [at(7300), at(7301)],
            groups: group_names(spec.groups)
                .into_iter()
                .enumerate()
                .map(|(g, name)| (name, (0..spec.nodes).map(|n| at(node(g, n))).collect()))
                .collect(),
            http: (0..spec.groups)
                .map(|g| (0..spec.nodes).map(|n| at(node(g, n) + total)).collect())
                .collect(),
            server_proxies: [at(7411), at(7412)],
            server_proxy_stats: [at(7511), at(7512)],
            client_proxies: [at(7421), at(7422)],
        }
    }

    /// The same shape on addresses `next` hands out (tests: free ports picked at run time).
    pub fn picked(spec: &Spec, mut next: impl FnMut() -> SocketAddr) -> GroupsLayout {
        let mut nodes = |n: usize| (0..n).map(|_| next()).collect::<Vec<_>>();
        let groups = group_names(spec.groups)
            .into_iter()
            .map(|g| (g, nodes(spec.nodes)))
            .collect();
        let http = (0..spec.groups).map(|_| nodes(spec.nodes)).collect();
        let mut two = || [next(), next()];
        GroupsLayout {
            trackers: two(),
            groups,
            http,
            server_proxies: two(),
            server_proxy_stats: two(),
            client_proxies: two(),
        }
    }

    /// Every storage node: (group, member name, address).
    pub fn nodes(&self) -> Vec<(String, String, SocketAddr)> {
        let mut v = Vec::new();
        for (g, nodes) in &self.groups {
            for (i, a) in nodes.iter().enumerate() {
                v.push((g.clone(), node_name(g, i + 1), *a));
            }
        }
        v
    }

    /// Every node's HTTP gateway, in the order of [`GroupsLayout::nodes`].
    pub fn gateways(&self) -> Vec<SocketAddr> {
        self.http.iter().flatten().copied().collect()
    }
}

/// The app (and its key id) a generated multi-node cluster serves.
pub const CLUSTER_APP: &str = "demo";
pub const CLUSTER_KEY_ID: &str = "k1";
/// The link key id `ferry groups` (and the cluster's own start-up wait) proves to the tracker.
pub const ADMIN_LINK_ID: &str = "admin";

impl Cluster {
    /// Starts a multi-node cluster: the tracker, then every storage node (waiting
    /// until the tracker lists them all online), then the routing server-proxies and the
    /// client-proxies. Configs go to `<data_dir>/conf/`, the tracker's data to
    /// `<data_dir>/tracker`, group G's shared data dir is `<data_dir>/G`.
    pub fn start_groups(
        bin_dir: &Path,
        spec: &Spec,
        layout: GroupsLayout,
        data_dir: &Path,
        logs: Logs,
    ) -> Result<Cluster> {
        spec.validate()?;
        let conf_dir = data_dir.join("conf");
        for d in [
            &conf_dir,
            &data_dir.join(TRACKER),
            &data_dir.join(TRACKER_B),
        ] {
            std::fs::create_dir_all(d)
                .map_err(|e| ClientError::io(format!("creating {}", d.display()), e))?;
        }
        if let Logs::Dir(d) = &logs {
            std::fs::create_dir_all(d)
                .map_err(|e| ClientError::io(format!("creating {}", d.display()), e))?;
        }
        let l = &layout;
        let mut cluster = Cluster {
            bin_dir: bin_dir.to_path_buf(),
            logs,
            members: Vec::new(),
            layout: Layout {
                server: l.trackers[0],
                server_proxies: l.server_proxies,
                client_proxies: l.client_proxies,
                client_proxy_stats: [None, None],
                tls: spec.tls,
            },
            groups: Some(layout.clone()),
            data_dir: data_dir.to_path_buf(),
            secrets: Secrets::default(),
            tls: match spec.tls {
                true => Some(local_ca(&conf_dir, &l.client_proxies)?),
                false => None,
            },
        };
        // Every member proves a link key to the next hop and requires one from the previous:
        // client-proxies "cp" -> routing server-proxies "sp" -> nodes; each node its own
        // "node-NAME" -> tracker. The tracker names what each key is ([link.members]): each
        // node's key is bound to its group and address, "sp" is a router, "admin" reads.
        let sec = &mut cluster.secrets;
        let app_key = sec.app_key(CLUSTER_APP, CLUSTER_KEY_ID);
        let app_keys = AuthConfig {
            keys: [(
                CLUSTER_APP.to_owned(),
                [(app_key.id, app_key.secret)].into(),
            )]
            .into(),
            ..AuthConfig::default()
        };
        let link = |sec: &mut Secrets, send: Option<&str>, accept: &[&str]| LinkConfig {
            send: send.map(|id| sec.link(id)),
            accept: accept
                .iter()
                .map(|id| (id.to_string(), sec.link(id).secret))
                .collect(),
            members: BTreeMap::new(),
        };
        let member = |kind, group: Option<&str>, addr| Member {
            kind,
            group: group.map(str::to_owned),
            addr,
        };
        let node_key = |name: &str| format!("node-{name}");
        let nodes = l.nodes();
        let mut tracker_keys: Vec<String> = nodes.iter().map(|(_, n, _)| node_key(n)).collect();
        tracker_keys.extend(["sp".to_owned(), ADMIN_LINK_ID.to_owned()]);
        let tracker_keys: Vec<&str> = tracker_keys.iter().map(String::as_str).collect();
        let mut tracker_link = link(sec, None, &tracker_keys);
        tracker_link.members = nodes
            .iter()
            .map(|(g, name, addr)| (node_key(name), member(PeerKind::Node, Some(g), Some(*addr))))
            .chain([
                ("sp".to_owned(), member(PeerKind::Router, None, None)),
                (
                    ADMIN_LINK_ID.to_owned(),
                    member(PeerKind::Admin, None, None),
                ),
            ])
            .collect();
        // Every node serves the HTTP gateway with the app's signed-URL secret; a gateway
        // redirects requests for another group's files to one of that group's gateways.
        let http_secrets: BTreeMap<String, String> =
            [(CLUSTER_APP.to_owned(), sec.http(CLUSTER_APP))].into();
        let node_links: Vec<LinkConfig> = nodes
            .iter()
            .map(|(_, name, _)| link(sec, Some(&node_key(name)), &["sp"]))
            .collect();
        let sp_link = link(sec, Some("sp"), &["cp"]);
        let cp_link = link(sec, Some("cp"), &[]);
        // Every server gets the database in its config and in FERRY_META_URL (which a server
        // prefers), so a different URL in our own environment cannot leak into a member.
        let meta = spec.meta_url.clone();
        let group_names: Vec<String> = l.groups.iter().map(|(g, _)| g.clone()).collect();
        // Two trackers on the one database: nodes beat and proxies ask either, so losing one
        // changes nothing a user sees.
        for (name, addr) in [(TRACKER, l.trackers[0]), (TRACKER_B, l.trackers[1])] {
            let conf = ServerConfig {
                listen: addr,
                data: data_dir.join(name),
                meta_url: meta.clone(),
                roles: vec![ServerRole::Tracker],
                tracker: TrackerConfig {
                    groups: group_names.clone(),
                    beat_interval_ms: spec.beat_interval_ms,
                    offline_after_ms: spec.offline_after_ms,
                    ..TrackerConfig::default()
                },
                link: tracker_link.clone(),
                ..ServerConfig::default()
            };
            let header = "Generated by ferry cluster up: a tracker (one of two).";
            let conf = MemberConfig::Server(Box::new(conf));
            cluster.add(name, conf, header, Some(meta.clone()))?;
        }
        for (((group, name, addr), node_link), http) in
            nodes.into_iter().zip(node_links).zip(l.gateways())
        {
            let data = data_dir.join(&group);
            std::fs::create_dir_all(&data)
                .map_err(|e| ClientError::io(format!("creating {}", data.display()), e))?;
            let mut conf = ServerConfig {
                listen: addr,
                data,
                meta_url: meta.clone(),
                roles: vec![ServerRole::Storage],
                cluster: Some(ClusterConfig {
                    group: group.clone(),
                    trackers: l.trackers.to_vec(),
                    advertise: None,
                    node_name: Some(name.clone()),
                }),
                auth: app_keys.clone(),
                link: node_link,
                ..ServerConfig::default()
            };
            conf.http.listen = Some(http);
            conf.http.secrets = http_secrets.clone();
            let header =
                format!("Generated by ferry cluster up: storage node {name} of group {group}.");
            let conf = MemberConfig::Server(Box::new(conf));
            cluster.add(&name, conf, &header, Some(meta.clone()))?;
        }
        let admin = cluster.secrets.link(ADMIN_LINK_ID);
        wait_joined(
            l.trackers[0],
            Some(&admin),
            l.nodes().len(),
            Duration::from_secs(15),
        )
        .map_err(|e| {
            ClientError::Cluster(format!(
                "the storage nodes did not all join the tracker: {e}"
            ))
        })?;
        for (i, name) in [SERVER_PROXY_A, SERVER_PROXY_B].into_iter().enumerate() {
            let conf = ProxyConfig {
                listen: l.server_proxies[i],
                trackers: l.trackers.to_vec(),
                route_cache: Duration::from_millis(spec.route_cache_ms),
                stats_listen: Some(l.server_proxy_stats[i]),
                auth: Some(app_keys.clone()),
                link: sp_link.clone(),
                ..ProxyConfig::default()
            };
            let header = "Generated by ferry cluster up: routing server-proxy.";
            cluster.add(name, MemberConfig::Proxy(Box::new(conf)), header, None)?;
        }
        for (i, name) in [CLIENT_PROXY_A, CLIENT_PROXY_B].into_iter().enumerate() {
            let conf = ProxyConfig {
                listen: l.client_proxies[i],
                upstreams: l.server_proxies.to_vec(),
                // Clients reach this listener: none may hold more than this many connections.
                max_connections_per_ip: CLIENT_PROXY_PER_IP,
                link: cp_link.clone(),
                tls: cluster.tls.as_ref().map(LocalCa::proxy_tls),
                ..ProxyConfig::default()
            };
            let header = "Generated by ferry cluster up: client-proxy.";
            cluster.add(name, MemberConfig::Proxy(Box::new(conf)), header, None)?;
        }
        Ok(cluster)
    }

    /// The data dir the nodes of `group` share.
    pub fn group_data(&self, group: &str) -> PathBuf {
        self.data_dir.join(group)
    }
}

/// The metadata database for `cluster up`: the flag, else FERRY_META_URL, else `meta_url` in
/// the conf dir's server.toml.
pub fn resolve_meta_url(
    flag: Option<&str>,
    env: Option<String>,
    conf_dir: &Path,
) -> Result<Option<String>> {
    if let Some(u) = flag {
        return Ok(Some(u.to_owned()));
    }
    if let Some(u) = env.filter(|u| !u.is_empty()) {
        return Ok(Some(u));
    }
    if !conf_dir.join(format!("{SERVER}.toml")).exists() {
        return Ok(None);
    }
    Ok(load::<ServerConfig>(conf_dir, SERVER)?.meta_url)
}

/// The tracker's view (TRACKER_GROUPS).
pub fn tracker_groups(
    tracker: SocketAddr,
    link: Option<&SigningKey>,
) -> std::result::Result<proto::GroupsReply, String> {
    let mut c =
        proto::Caller::connect(tracker, Duration::from_secs(2), link).map_err(|e| e.to_string())?;
    let body = c
        .call(
            cmd::TRACKER_GROUPS,
            &[],
            cmd::REPLY_TRACKER,
            proto::GROUPS_REPLY_MAX,
        )
        .map_err(|e| e.to_string())?;
    proto::GroupsReply::decode(&body).map_err(|e| e.to_string())
}

/// Waits until the tracker lists `want` nodes online.
fn wait_joined(
    tracker: SocketAddr,
    link: Option<&SigningKey>,
    want: usize,
    limit: Duration,
) -> std::result::Result<(), String> {
    let t = Instant::now();
    loop {
        let seen = match tracker_groups(tracker, link) {
            Ok(v) => {
                let online = v
                    .groups
                    .iter()
                    .flat_map(|g| &g.nodes)
                    .filter(|n| n.online)
                    .count();
                if online >= want {
                    return Ok(());
                }
                format!("{online} of {want} nodes online")
            }
            Err(e) => e,
        };
        if t.elapsed() >= limit {
            return Err(format!("after {limit:?}: {seen}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(nodes: usize, groups: usize, meta_url: Option<&str>) -> Spec {
        Spec {
            nodes,
            groups,
            meta_url: meta_url.map(str::to_owned),
            beat_interval_ms: 1000,
            offline_after_ms: 3000,
            route_cache_ms: 2000,
            port_base: PORT_BASE,
            tls: false,
        }
    }

    #[test]
    fn several_nodes_or_groups_need_postgres() {
        spec(1, 1, None).validate().unwrap();
        spec(2, 2, Some("postgres://u@127.0.0.1:5432/db"))
            .validate()
            .unwrap();
        for bad in [spec(2, 1, None), spec(1, 2, None)] {
            let e = bad.validate().unwrap_err().to_string();
            assert!(e.contains("--meta-url") && e.contains(META_URL_ENV), "{e}");
        }
        let e = spec(1, 2, Some("/tmp/meta.db"))
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a postgres:// URL"), "{e}");
        assert!(spec(0, 1, None).validate().is_err());
        assert!(spec(NODES_MAX + 1, 1, None).validate().is_err());
        assert!(spec(1, GROUPS_MAX + 1, None).validate().is_err());
    }

    #[test]
    fn meta_url_comes_from_flag_then_env_then_server_toml() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(resolve_meta_url(None, None, d).unwrap(), None);
        std::fs::write(
            d.join("server.toml"),
            "meta_url = \"postgres://conf@h/db\"\n",
        )
        .unwrap();
        let conf = Some("postgres://conf@h/db".to_owned());
        assert_eq!(resolve_meta_url(None, None, d).unwrap(), conf);
        assert_eq!(
            resolve_meta_url(None, Some(String::new()), d).unwrap(),
            conf
        );
        let env = Some("postgres://env@h/db".to_owned());
        assert_eq!(resolve_meta_url(None, env.clone(), d).unwrap(), env);
        assert_eq!(
            resolve_meta_url(Some("postgres://flag@h/db"), env, d).unwrap(),
            Some("postgres://flag@h/db".to_owned())
        );
    }

    #[test]
    fn fixed_layout_keeps_nodes_clear_of_the_other_ports() {
        let moved = GroupsLayout::fixed(&Spec {
            port_base: 20_000,
            ..spec(2, 1, None)
        });
        assert_eq!(moved.trackers[0].port(), 20_000);
        assert_eq!(moved.client_proxies[0].port(), 20_121);
        assert_eq!(moved.nodes()[1].2.port(), 20_302);
        let pg = Some("postgres://u@h/db");
        for bad in [80, 65_300] {
            let s = Spec {
                port_base: bad,
                ..spec(2, 2, pg)
            };
            assert!(s.validate().is_err(), "port base {bad}");
        }
        let l = GroupsLayout::fixed(&spec(NODES_MAX, 2, None));
        let nodes = l.nodes();
        assert_eq!(nodes.len(), 2 * NODES_MAX);
        assert_eq!(nodes[0].1, "g1-node1");
        assert_eq!(nodes[NODES_MAX].0, "g2");
        let mut all: Vec<SocketAddr> = nodes.iter().map(|n| n.2).collect();
        all.extend(l.trackers);
        all.extend(l.server_proxies);
        all.extend(l.server_proxy_stats);
        all.extend(l.client_proxies);
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "a port is used twice");
    }
}
