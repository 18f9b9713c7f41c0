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

pub mod cli;
pub mod cluster;
mod conn;
pub mod demo;
mod download;
pub mod error;
mod files;
pub mod groups;
mod link;
mod pool;
pub mod report;
pub mod rotation;
pub mod secrets;
pub mod settings;
pub mod size;
pub mod state;
mod upload;

#[cfg(test)]
mod tests;

pub use error::ClientError;
pub use report::{Progress, Quiet, TransferReport};
pub use settings::Settings;

use conn::Fault;
use error::Result;
use ferry_common::auth::SigningKey;
use ferry_common::proto::{ErrorCode, Hello, cmd, encode_file_id};
use ferry_common::token::Scope;
use link::{Link, Shared};
use serde::Serialize;
use std::path::Path;
use std::sync::atomic::AtomicU64;

/// How long a session token is valid: it is used once, at HELLO, right after it is made.
const TOKEN_LIFETIME_SECS: u64 = 300;

/// Who the client speaks for, and the app key its session tokens are made with.
#[derive(Clone)]
pub(crate) struct Credentials {
    app: String,
    user: String,
    key: SigningKey,
}

impl Credentials {
    /// A HELLO body with a fresh token allowing `scope`, for a session about the file `route`
    /// if set (a routing proxy sends it to the file's group). One per connection: the server
    /// refuses a token it has seen before.
    pub(crate) fn hello(&self, scope: Scope, route: Option<&str>) -> Result<Vec<u8>> {
        let token = self
            .key
            .mint(&self.app, &self.user, scope, TOKEN_LIFETIME_SECS)
            .map_err(|e| ClientError::Input(format!("cannot make a session token: {e}")))?;
        let mut hello = Hello::new(&self.app, &self.user, &token);
        if let Some(id) = route {
            hello = hello.for_file(id);
        }
        hello
            .encode()
            .map_err(|e| ClientError::Input(format!("HELLO: {e}")))
    }
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
}

impl Client {
    pub fn new(settings: Settings) -> Result<Self> {
        if settings.proxies.is_empty() {
            return Err(ClientError::Input("the proxy list is empty".into()));
        }
        settings::check_threads(settings.threads)?;
        size::check_block_size(u64::from(settings.block_size))
            .map_err(|e| ClientError::Input(format!("block size: {e}")))?;
        let Some(key) = settings.key.clone() else {
            return Err(ClientError::Input(
                "no app key: set FERRY_KEY=KEY_ID:SECRET, or `[key]` (id, secret) in the config"
                    .into(),
            ));
        };
        let creds = Credentials {
            app: settings.app.clone(),
            user: settings.user.clone(),
            key,
        };
        // Fails now, not on the first connection, if a token cannot be made.
        creds.hello(Scope::READ, None)?;
        Ok(Client { settings, creds })
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
        let shared = self.shared(Scope(Scope::READ.0 | Scope::WRITE.0), None);
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

    pub fn delete(&self, file_id: &str) -> Result<()> {
        let body = encode_file_id(file_id).map_err(|e| download::bad_id(file_id, e))?;
        let shared = self.shared(Scope::DELETE, Some(file_id));
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
