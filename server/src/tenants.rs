//! Connections per tenant: a connection takes a slot of its app and of its user when its HELLO
//! passes, and gives them back when it closes. One app may hold at most its share of the
//! server's connections (`max_connections_per_app`, default half, or `[apps.APP]
//! max_connections`), one user at most `max_connections_per_user` (or the app's own), so no
//! tenant can take every connection for itself. Downloads are sent one at a time per
//! connection, so these also bound a tenant's concurrent downloads.

use crate::config::Config;
use crate::storage::{OpError, Who};
use ferry_common::proto::ErrorCode;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

/// Open sessions per app, and per (app, user).
#[derive(Default)]
struct Counts {
    apps: HashMap<String, usize>,
    users: HashMap<(String, String), usize>,
}

pub struct Tenants {
    counts: Mutex<Counts>,
    /// The server's connection limit as the reactor applies it (after the descriptor budget).
    max_connections: usize,
    cfg: Config,
}

impl Tenants {
    pub fn new(cfg: &Config, max_connections: usize) -> Arc<Tenants> {
        Arc::new(Tenants {
            counts: Mutex::default(),
            max_connections,
            cfg: cfg.clone(),
        })
    }

    /// Takes a slot for `who`, or error 17 naming the limit that is full (never another
    /// tenant's figures).
    pub fn admit(self: &Arc<Self>, who: &Who) -> Result<Slot, OpError> {
        let app_max = self.cfg.app_connections(&who.app, self.max_connections);
        let user_max = self.cfg.user_connections(&who.app);
        let mut c = self.counts.lock();
        let key = (who.app.clone(), who.user.clone());
        if c.apps.get(&who.app).copied().unwrap_or(0) >= app_max {
            return Err(OpError::new(
                ErrorCode::Limit,
                format!(
                    "app {} has all the connections it may hold here (max_connections_per_app); \
                     try later",
                    who.app
                ),
            ));
        }
        if c.users.get(&key).copied().unwrap_or(0) >= user_max {
            return Err(OpError::new(
                ErrorCode::Limit,
                format!(
                    "user {} has {user_max} connections open, the most allowed \
                     (max_connections_per_user); close one",
                    who.user
                ),
            ));
        }
        *c.apps.entry(who.app.clone()).or_default() += 1;
        *c.users.entry(key.clone()).or_default() += 1;
        Ok(Slot {
            tenants: self.clone(),
            key,
        })
    }

    fn release(&self, key: &(String, String)) {
        let mut c = self.counts.lock();
        let c = &mut *c;
        decrement(&mut c.apps, &key.0);
        decrement(&mut c.users, key);
    }
}

/// One fewer for `key`; a count that reaches 0 leaves the map (the maps hold live tenants only).
fn decrement<K, Q>(m: &mut HashMap<K, usize>, key: &Q)
where
    K: std::hash::Hash + Eq + std::borrow::Borrow<Q>,
    Q: std::hash::Hash + Eq + ?Sized,
{
    if let Some(n) = m.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            m.remove(key);
        }
    }
}

/// A connection's place in its tenant's counts; dropped with the connection.
pub struct Slot {
    tenants: Arc<Tenants>,
    key: (String, String),
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.tenants.release(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(app: &str, user: &str) -> Who {
        Who {
            app: app.into(),
            user: user.into(),
        }
    }

    #[test]
    fn apps_and_users_hold_their_share_and_give_it_back() {
        let cfg = Config {
            max_connections_per_user: 2,
            ..Config::default()
        };
        let t = Tenants::new(&cfg, 6); // an app's share: 3
        let a1 = t.admit(&who("a", "u1")).unwrap();
        let _a2 = t.admit(&who("a", "u1")).unwrap();
        let e = t.admit(&who("a", "u1")).err().unwrap();
        assert!(e.text.contains("max_connections_per_user"), "{}", e.text);
        let _a3 = t.admit(&who("a", "u2")).unwrap();
        let e = t.admit(&who("a", "u3")).err().unwrap();
        assert!(e.text.contains("max_connections_per_app"), "{}", e.text);
        let _b = t.admit(&who("b", "u1")).unwrap(); // another app is not affected
        drop(a1);
        t.admit(&who("a", "u3")).unwrap();
    }
}
