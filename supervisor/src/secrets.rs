//! Fresh secrets for a local cluster (`ferry demo`, `ferry cluster up`).
//!
//! The configs in conf/ carry placeholder secrets, which every ferry process refuses to run
//! with. A local cluster writes its members' configs with these placeholders replaced by random
//! secrets, one per key name, so the same key gets the same secret in every member: the app
//! key `[auth.keys.APP] ID` of servers and routing proxies, the signed-URL secret
//! `[http.secrets] APP`, and a link key `ID` wherever it appears (`[link.send] id = ID` in the
//! sender, `[link.accept] ID` in the receiver). The client config it writes next to them holds
//! the app key, so `ferry --config` works against the cluster. A config that already holds a
//! real secret (not a placeholder) keeps it, and the other members get the same.

use ferry_client::error::{ClientError, Result};
use ferry_common::auth::{AuthConfig, LinkConfig, SigningKey, new_secret};
use ferry_proxy::config::Config as ProxyConfig;
use ferry_server::config::Config as ServerConfig;
use std::collections::BTreeMap;
use std::path::Path;

/// The secrets of one local cluster, by key name.
#[derive(Debug, Default)]
pub struct Secrets {
    by_name: BTreeMap<String, String>,
}

impl Secrets {
    fn get(&mut self, name: String) -> String {
        self.by_name.entry(name).or_insert_with(new_secret).clone()
    }

    /// The cluster's secret for `name`, given the value a config has: a real secret (one that
    /// passes `check_secret`) is kept and becomes the name's secret if it has none yet; a
    /// placeholder is replaced.
    fn settle(&mut self, name: String, current: Option<&str>) -> String {
        if let Some(v) = current.filter(|v| ferry_common::auth::check_secret("", v).is_ok()) {
            return self
                .by_name
                .entry(name)
                .or_insert_with(|| v.to_owned())
                .clone();
        }
        self.get(name)
    }

    /// The secret of app key `id` of `app`, made now if no member config named it yet.
    pub fn app_key(&mut self, app: &str, id: &str) -> SigningKey {
        SigningKey {
            id: id.to_owned(),
            secret: self.get(format!("auth/{app}/{id}")),
        }
    }

    /// The signed-URL secret of `app`.
    pub fn http(&mut self, app: &str) -> String {
        self.get(format!("http/{app}"))
    }

    /// The link key `id`.
    pub fn link(&mut self, id: &str) -> SigningKey {
        SigningKey {
            id: id.to_owned(),
            secret: self.get(format!("link/{id}")),
        }
    }

    /// Replaces every secret of a server's config with this cluster's.
    pub fn fill_server(&mut self, c: &mut ServerConfig) {
        self.fill_auth(&mut c.auth);
        for (app, v) in c.http.secrets.iter_mut() {
            *v = self.settle(format!("http/{app}"), Some(v.as_str()));
        }
        self.fill_link(&mut c.link);
    }

    /// Replaces every secret of a proxy's config with this cluster's.
    pub fn fill_proxy(&mut self, c: &mut ProxyConfig) {
        if let Some(auth) = &mut c.auth {
            self.fill_auth(auth);
        }
        self.fill_link(&mut c.link);
    }

    fn fill_auth(&mut self, auth: &mut AuthConfig) {
        for (app, ids) in auth.keys.iter_mut() {
            for (id, v) in ids.iter_mut() {
                *v = self.settle(format!("auth/{app}/{id}"), Some(v.as_str()));
            }
        }
    }

    fn fill_link(&mut self, link: &mut LinkConfig) {
        if let Some(send) = &mut link.send {
            send.secret = self.settle(format!("link/{}", send.id), Some(send.secret.as_str()));
        }
        for (id, v) in link.accept.iter_mut() {
            *v = self.settle(format!("link/{id}"), Some(v.as_str()));
        }
    }

    /// The signed-URL secret of `app`, if some member config named one.
    pub fn http_of(&self, app: &str) -> Option<String> {
        self.by_name.get(&format!("http/{app}")).cloned()
    }

    /// The link key `id`, if some member config named it.
    pub fn link_of(&self, id: &str) -> Option<SigningKey> {
        self.by_name
            .get(&format!("link/{id}"))
            .map(|secret| SigningKey {
                id: id.to_owned(),
                secret: secret.clone(),
            })
    }

    /// The app key of `app` some member config named (the first key id), if any.
    pub fn key_of(&self, app: &str) -> Option<SigningKey> {
        let prefix = format!("auth/{app}/");
        self.by_name.iter().find_map(|(name, secret)| {
            name.strip_prefix(&prefix).map(|id| SigningKey {
                id: id.to_owned(),
                secret: secret.clone(),
            })
        })
    }
}

/// Writes a file only its owner can read (it holds secrets).
pub fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |e| ClientError::io(format!("writing {}", path.display()), e);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_one_fresh_secret_per_key_name() {
        let mut s = Secrets::default();
        let mut proxy: ProxyConfig = toml::from_str(
            "listen = \"127.0.0.1:1\"\nupstreams = [\"127.0.0.1:2\"]\n[link.send]\nid = \"cp\"\n\
             secret = \"example-CHANGE-ME\"\n",
        )
        .unwrap();
        let mut server: ServerConfig = toml::from_str(
            "[auth.keys.demo]\nk1 = \"x\"\n[http.secrets]\ndemo = \"y\"\n[link.accept]\ncp = \"z\"\n",
        )
        .unwrap();
        s.fill_proxy(&mut proxy);
        s.fill_server(&mut server);
        let sent = proxy.link.send.as_ref().unwrap().secret.clone();
        assert_eq!(server.link.accept["cp"], sent);
        let app = server.auth.keys["demo"]["k1"].clone();
        assert_eq!(s.app_key("demo", "k1").secret, app);
        assert_eq!(s.key_of("demo").unwrap().secret, app);
        assert!(s.key_of("other").is_none());
        let http = server.http.secrets["demo"].clone();
        for v in [&sent, &app, &http] {
            ferry_common::auth::check_secret("generated", v).unwrap();
        }
        assert!(sent != app && app != http);
        assert_eq!(proxy.listen.to_string(), "127.0.0.1:1");
        // A real secret is kept and shared.
        let real = new_secret();
        let mut t: ServerConfig =
            toml::from_str(&format!("[auth.keys.chaos]\nk9 = \"{real}\"\n")).unwrap();
        s.fill_server(&mut t);
        assert_eq!(t.auth.keys["chaos"]["k9"], real);
        assert_eq!(s.key_of("chaos").unwrap().secret, real);
    }
}
