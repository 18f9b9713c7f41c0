//! The ferry client: upload, download, stat and delete through a list of proxies (or straight to
//! a server; the protocol is the same), with parallel blocks, failover, resume and a report.
//!
//! ```no_run
//! use ferry_client::{Client, Settings, Quiet};
//! use ferry_common::auth::SigningKey;
//! // The app key: from your own config or secret store, never a command-line flag.
//! let key = SigningKey::from_pair(&std::env::var("FERRY_KEY").unwrap()).unwrap();
//! let settings = Settings::direct(vec!["127.0.0.1:7400".parse().unwrap()], "/tmp/ferry-state".into(), key);
//! let client = Client::new(settings).unwrap();
//! let up = client.upload(std::path::Path::new("movie.mp4"), None, None, &Quiet).unwrap();
//! client.download(&up.file_id, std::path::Path::new("copy.mp4"), None, &Quiet).unwrap();
//! ```
//!
//! The library never prints; progress goes through [`Progress`], results through
//! [`TransferReport`].

mod conn;
mod download;
pub mod error;
mod files;
pub mod groups;
mod link;
mod pool;
pub mod report;
pub mod rotation;
pub mod settings;
pub mod size;
pub mod state;
pub mod tls;
mod upload;

#[cfg(test)]
mod tests;

pub use error::ClientError;
pub use report::{Progress, Quiet, TransferReport};
pub use settings::Settings;

use conn::Fault;
use error::Result;
use ferry_common::auth::SigningKey;
use ferry_common::proto::{self, ErrorCode, Hello, cmd, encode_file_id};
use ferry_common::token::{Claims, Scope};
use link::{Link, Shared};
use parking_lot::RwLock;
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

/// How long a session token is valid: it is used once, at HELLO, right after it is made.
const TOKEN_LIFETIME_SECS: u64 = 300;

/// Who the client speaks for, and how it proves it.
#[derive(Clone)]
pub(crate) struct Credentials {
    app: String,
    user: String,
    proof: Proof,
}

#[derive(Clone)]
enum Proof {
    /// The app key: a fresh single-use token per connection.
    Key(SigningKey),
    /// A delegated token from the app's backend, for every connection until it expires;
    /// shared with every operation in flight, so [`Client::renew_token`] reaches them.
    Token(Arc<RwLock<Delegated>>),
}

/// A delegated token and what it says.
struct Delegated {
    raw: Vec<u8>,
    claims: Claims,
}

impl Delegated {
    /// `raw` if it is a delegated token for `app`/`user`.
    fn new(raw: Vec<u8>, app: &str, user: &str) -> Result<Delegated> {
        let (claims, _, _) =
            Claims::parse(&raw).map_err(|e| ClientError::Input(format!("delegated token: {e}")))?;
        if claims.delegation.is_none() {
            return Err(ClientError::Input(
                "a single-use connection token, not a delegated one".into(),
            ));
        }
        if claims.app != app || claims.user != user {
            return Err(ClientError::Input(format!(
                "the delegated token is for {}/{}, not {app}/{user}",
                claims.app, claims.user
            )));
        }
        Ok(Delegated { raw, claims })
    }

    /// The token, if it may open a session needing `scope` about `route` now.
    fn usable(&self, scope: Scope, route: Option<&str>) -> Result<&[u8]> {
        let c = &self.claims;
        let now = ferry_common::clock::now_secs();
        if now >= c.expires {
            return Err(ClientError::Input(format!(
                "the delegated token of {}/{} expired at {}: get a fresh one from the app \
                 (FERRY_TOKEN or --token-file) and run the command again; an interrupted upload \
                 resumes where it stopped",
                c.app,
                c.user,
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(c.expires)
                )
            )));
        }
        if !c.scope.contains(scope) {
            return Err(ClientError::Input(format!(
                "the delegated token allows {} only; this needs {}",
                scope_names(c.scope),
                scope_names(scope)
            )));
        }
        if let Some(only) = c.delegation.as_ref().and_then(|d| d.file.as_deref())
            && route != Some(only)
        {
            return Err(ClientError::Input(format!(
                "the delegated token is for file {only} only"
            )));
        }
        Ok(&self.raw)
    }
}

/// "read,write": the scopes a token allows, by name.
pub fn scope_names(s: Scope) -> String {
    let names: Vec<&str> = [
        (Scope::READ, "read"),
        (Scope::WRITE, "write"),
        (Scope::DELETE, "delete"),
        (Scope::ADMIN, "admin"),
    ]
    .into_iter()
    .filter(|(bit, _)| s.contains(*bit))
    .map(|(_, n)| n)
    .collect();
    names.join(",")
}

/// "read,write" as a scope; every name must be one of read, write, delete, admin.
pub fn parse_scope(text: &str) -> std::result::Result<Scope, String> {
    let mut bits = 0u8;
    for name in text.split(',').map(str::trim) {
        bits |= match name {
            "read" => Scope::READ.0,
            "write" => Scope::WRITE.0,
            "delete" => Scope::DELETE.0,
            "admin" => Scope::ADMIN.0,
            other => {
                return Err(format!(
                    "{other:?} is not a scope (read, write, delete, admin)"
                ));
            }
        };
    }
    if bits & Scope::ALL.0 == 0 {
        return Err("give read, write or delete (admin only goes with delete)".into());
    }
    Ok(Scope(bits))
}

impl Credentials {
    /// A HELLO body allowing `scope`, for a session about the file `route` if set (a routing
    /// proxy sends it to the file's group): with an app key a fresh token (one per
    /// connection: the server refuses a token it has seen before), else the delegated token,
    /// while it is valid for this.
    pub(crate) fn hello(&self, scope: Scope, route: Option<&str>) -> Result<Vec<u8>> {
        let token = match &self.proof {
            Proof::Key(key) => key
                .mint(&self.app, &self.user, scope, TOKEN_LIFETIME_SECS)
                .map_err(|e| ClientError::Input(format!("cannot make a session token: {e}")))?,
            Proof::Token(t) => t.read().usable(scope, route)?.to_vec(),
        };
        let mut hello = Hello::new(&self.app, &self.user, &token);
        if let Some(id) = route {
            hello = hello.for_file(id);
        }
        hello
            .encode()
            .map_err(|e| ClientError::Input(format!("HELLO: {e}")))
    }
}

/// What USAGE tells: a user's stored bytes and files, and the app's quotas (`None`: none).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Usage {
    pub app: String,
    pub user: String,
    pub bytes: u64,
    pub files: u64,
    pub max_bytes: Option<u64>,
    pub max_files: Option<u64>,
}

/// What STAT tells about a stored file.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FileInfo {
    pub file_id: String,
    pub size: u64,
    pub sha256: String,
    pub name: String,
    /// Unix seconds.
    pub created: u64,
    pub block_size: u32,
}

pub struct Client {
    settings: Settings,
    creds: Credentials,
    /// The TLS config of the `tls://` proxies (none in the list: `None`).
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Client {
    pub fn new(settings: Settings) -> Result<Self> {
        if settings.proxies.is_empty() {
            return Err(ClientError::Input("the proxy list is empty".into()));
        }
        settings::check_threads(settings.threads)?;
        size::check_block_size(u64::from(settings.block_size))
            .map_err(|e| ClientError::Input(format!("block size: {e}")))?;
        // A delegated token wins: it is what an end user's device holds.
        let proof = match (&settings.token, &settings.key) {
            (Some(raw), _) => Proof::Token(Arc::new(RwLock::new(Delegated::new(
                raw.clone(),
                &settings.app,
                &settings.user,
            )?))),
            (None, Some(key)) => {
                // Fails now, not on the first connection, if a token cannot be made.
                key.mint(
                    &settings.app,
                    &settings.user,
                    Scope::READ,
                    TOKEN_LIFETIME_SECS,
                )
                .map_err(|e| ClientError::Input(format!("cannot make a session token: {e}")))?;
                Proof::Key(key.clone())
            }
            (None, None) => {
                return Err(ClientError::Input(
                    "no credential: set FERRY_TOKEN (or --token-file) to a delegated token from \
                     the app, or FERRY_KEY=KEY_ID:SECRET (or `[key]` in the config) to the app key"
                        .into(),
                ));
            }
        };
        let creds = Credentials {
            app: settings.app.clone(),
            user: settings.user.clone(),
            proof,
        };
        let tls = match settings.proxies.iter().any(|p| p.tls.is_some()) {
            true => Some(tls::client_config(&settings.tls)?),
            false => None,
        };
        Ok(Client {
            settings,
            creds,
            tls,
        })
    }

    /// Replaces the delegated token for every later connection, including those of transfers
    /// in flight (a long transfer outliving its token). It must be a delegated token for the
    /// same app and user; a client made with the app key has none to replace.
    pub fn renew_token(&self, raw: Vec<u8>) -> Result<()> {
        let Proof::Token(t) = &self.creds.proof else {
            return Err(ClientError::Input(
                "this client signs with the app key; it has no delegated token to renew".into(),
            ));
        };
        *t.write() = Delegated::new(raw, &self.creds.app, &self.creds.user)?;
        Ok(())
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Fresh shared state (proxy health, counters) for one operation whose sessions need
    /// `scope` and are about the file `route`, if any.
    fn shared(&self, scope: Scope, route: Option<&str>) -> Shared {
        Shared {
            route: route.map(str::to_owned),
            proxies: rotation::Proxies::new(self.settings.proxies.clone()),
            creds: self.creds.clone(),
            scope,
            timeout: self.settings.timeout,
            tries_per_proxy: self.settings.tries_per_proxy,
            outage_window: self.settings.outage_window,
            tls: self.tls.clone(),
            failovers: AtomicU64::new(0),
            retries: AtomicU64::new(0),
        }
    }

    /// Uploads a file; `threads` and `block_size` default to the settings.
    pub fn upload(
        &self,
        path: &Path,
        threads: Option<usize>,
        block_size: Option<u32>,
        progress: &dyn Progress,
    ) -> Result<TransferReport> {
        let threads = threads.unwrap_or(self.settings.threads);
        settings::check_threads(threads)?;
        let block_size = block_size.unwrap_or(self.settings.block_size);
        size::check_block_size(u64::from(block_size))
            .map_err(|e| ClientError::Input(format!("block size: {e}")))?;
        let shared = self.shared(Scope::WRITE, None);
        upload::upload(&upload::UploadJob {
            shared: &shared,
            path,
            threads,
            block_size,
            state_dir: &self.settings.state_dir,
            app: &self.settings.app,
            user: &self.settings.user,
            progress,
        })
    }

    /// Downloads `file_id` to `out` (via `out.part`, verified, then renamed).
    pub fn download(
        &self,
        file_id: &str,
        out: &Path,
        threads: Option<usize>,
        progress: &dyn Progress,
    ) -> Result<TransferReport> {
        let threads = threads.unwrap_or(self.settings.threads);
        settings::check_threads(threads)?;
        let shared = self.shared(Scope::READ, Some(file_id));
        download::download(&download::DownloadJob {
            shared: &shared,
            file_id,
            out,
            threads,
            progress,
        })
    }

    pub fn stat(&self, file_id: &str) -> Result<FileInfo> {
        let shared = self.shared(Scope::READ, Some(file_id));
        let st = download::stat(&mut Link::new(&shared), file_id)?;
        Ok(FileInfo {
            file_id: file_id.to_owned(),
            size: st.size,
            sha256: hex::encode(st.sha256),
            name: st.name,
            created: st.created,
            block_size: st.block_size,
        })
    }

    /// What the client's user stores (in every group) and the app's quotas for it.
    pub fn usage(&self) -> Result<Usage> {
        let shared = self.shared(Scope::WRITE, None);
        let body = Link::new(&shared)
            .call("usage", |c| c.call(cmd::USAGE, &[], proto::USAGE_REPLY_LEN))?;
        let u = proto::UsageReply::decode(&body)
            .map_err(|e| ClientError::Input(format!("usage: the server's reply: {e}")))?;
        Ok(Usage {
            app: self.creds.app.clone(),
            user: self.creds.user.clone(),
            bytes: u.bytes,
            files: u.files,
            max_bytes: (u.max_bytes > 0).then_some(u.max_bytes),
            max_files: (u.max_files > 0).then_some(u.max_files),
        })
    }

    /// Deletes a file of the session's user, or (`admin`) any user's file of the app.
    pub fn delete(&self, file_id: &str, admin: bool) -> Result<()> {
        let body = encode_file_id(file_id).map_err(|e| download::bad_id(file_id, e))?;
        let scope = if admin {
            Scope(Scope::DELETE.0 | Scope::ADMIN.0)
        } else {
            Scope::DELETE
        };
        let shared = self.shared(scope, Some(file_id));
        let mut tries = 0u32;
        Link::new(&shared).call("delete", |c| {
            tries += 1;
            match c.call(cmd::DELETE, &body, 0) {
                Ok(_) => Ok(()),
                // A retry after a lost reply finds the file already gone: that is our delete.
                Err(Fault::Server(e)) if tries > 1 && e.code == ErrorCode::NotFound => Ok(()),
                Err(f) => Err(f),
            }
        })
    }
}
