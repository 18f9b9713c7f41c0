//! Members' configs as the very types their binaries load (`ferry_server::config::Config`,
//! `ferry_proxy::config::Config`): read from conf/ or built here, and written back with
//! `toml` so a generated file can only hold what the member understands.

use ferry_client::error::{ClientError, Result};
use ferry_common::proto::Role;
use ferry_proxy::config::Config as ProxyConfig;
use ferry_server::config::Config as ServerConfig;
use serde::de::DeserializeOwned;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// One member's config.
#[derive(Debug, Clone)]
pub enum MemberConfig {
    Server(Box<ServerConfig>),
    Proxy(Box<ProxyConfig>),
}

impl MemberConfig {
    /// Who answers a PROBE at [`MemberConfig::listen`].
    pub fn role(&self) -> Role {
        match self {
            MemberConfig::Server(_) => Role::Server,
            MemberConfig::Proxy(_) => Role::Proxy,
        }
    }

    /// The binary that runs it.
    pub fn exe(&self) -> &'static str {
        match self {
            MemberConfig::Server(_) => "ferry-server",
            MemberConfig::Proxy(_) => "ferry-proxy",
        }
    }

    pub fn listen(&self) -> SocketAddr {
        match self {
            MemberConfig::Server(c) => c.listen,
            MemberConfig::Proxy(c) => c.listen,
        }
    }

    /// Writes `dir/<name>.toml` (readable by its owner only: it holds secrets) under a comment
    /// line `header`, and returns its path.
    pub fn write(&self, dir: &Path, name: &str, header: &str) -> Result<PathBuf> {
        let path = dir.join(format!("{name}.toml"));
        let body = match self {
            MemberConfig::Server(c) => toml::to_string(c),
            MemberConfig::Proxy(c) => toml::to_string(c),
        }
        .map_err(|e| ClientError::Cluster(format!("writing {}: {e}", path.display())))?;
        crate::secrets::write_private(&path, &format!("# {header}\n{body}"))?;
        Ok(path)
    }
}

/// Reads `dir/<name>.toml` as the member's binary would.
pub fn load<T: DeserializeOwned>(dir: &Path, name: &str) -> Result<T> {
    let path = dir.join(format!("{name}.toml"));
    ferry_common::config::load(&path).map_err(|e| ClientError::Cluster(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_common::auth::{LinkConfig, SigningKey};
    use std::time::Duration;

    /// What is written reads back as the same config, for both binaries' types.
    #[test]
    fn written_configs_read_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let mut server = ServerConfig {
            listen: "127.0.0.1:7001".parse().unwrap(),
            meta_url: Some("postgres://x@127.0.0.1:1/db".into()),
            max_open_bytes_per_app: Some(1 << 30),
            ..ServerConfig::default()
        };
        server.http.listen = Some("127.0.0.1:7002".parse().unwrap());
        server.link.accept.insert("sp".into(), "s".repeat(40));
        let proxy = ProxyConfig {
            listen: "127.0.0.1:7003".parse().unwrap(),
            upstreams: vec!["127.0.0.1:7001".parse().unwrap()],
            idle_timeout: Duration::from_millis(1234),
            link: LinkConfig {
                send: Some(SigningKey {
                    id: "cp".into(),
                    secret: "c".repeat(40),
                }),
                ..LinkConfig::default()
            },
            ..ProxyConfig::default()
        };
        let s = MemberConfig::Server(Box::new(server.clone()));
        let p = MemberConfig::Proxy(Box::new(proxy.clone()));
        s.write(dir.path(), "s", "a server").unwrap();
        p.write(dir.path(), "p", "a proxy").unwrap();
        let s2: ServerConfig = load(dir.path(), "s").unwrap();
        let p2: ProxyConfig = load(dir.path(), "p").unwrap();
        assert_eq!(format!("{s2:?}"), format!("{server:?}"));
        assert_eq!(format!("{p2:?}"), format!("{proxy:?}"));
        // Debug hides secrets: compare them as such.
        assert_eq!(s2.link.accept, server.link.accept);
        assert_eq!(p2.link.send, proxy.link.send);
        assert_eq!((s.role(), p.role()), (Role::Server, Role::Proxy));
        let text = std::fs::read_to_string(dir.path().join("p.toml")).unwrap();
        assert!(text.starts_with("# a proxy\n"), "{text}");
        assert!(text.contains("idle_timeout_ms = 1234"), "{text}");
    }
}
