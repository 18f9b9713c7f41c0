//! The credentials every test server and client share: one app key (`test-k1`) known for each
//! app the tests use, appended to test server configs by `server_command` and given to the
//! `ferry` CLI as `FERRY_KEY` by `cli::ferry`.

use ferry_common::auth::SigningKey;
use ferry_common::proto::{self, Hello, cmd};
use ferry_common::token::Scope;

pub const KEY_ID: &str = "test-k1";
/// A fixed random secret: tests need the same one in every process they start.
pub const KEY_SECRET: &str = "5d0f3a8c2b7e41f69a0c3d2e8b1f7a64c9e2d5b0a3f8c1e7d4b6a9f2c0e3d5b8";
/// The apps test servers know.
pub const APPS: &[&str] = &["ferry", "demo", "bench", "chaos", "other", "otherapp"];

pub fn key() -> SigningKey {
    SigningKey {
        id: KEY_ID.into(),
        secret: KEY_SECRET.into(),
    }
}

/// `FERRY_KEY` for the `ferry` CLI.
pub fn key_env() -> String {
    format!("{KEY_ID}:{KEY_SECRET}")
}

/// The `[auth.keys.*]` tables of a test server (or routing proxy) config.
pub fn auth_toml() -> String {
    APPS.iter()
        .map(|app| format!("\n[auth.keys.{app}]\n{KEY_ID} = \"{KEY_SECRET}\"\n"))
        .collect()
}

/// A fresh token for `user` of `app` with every scope, valid for five minutes.
pub fn token(app: &str, user: &str) -> Vec<u8> {
    key().mint(app, user, Scope::ALL, 300).unwrap()
}

/// A HELLO body with a fresh token.
pub fn hello_body(app: &str, user: &str) -> Vec<u8> {
    Hello::new(app, user, &token(app, user)).encode().unwrap()
}

/// A whole HELLO frame with a fresh token.
pub fn hello_frame(app: &str, user: &str) -> Vec<u8> {
    proto::frame(cmd::HELLO, 0, &hello_body(app, user))
}

/// Adds the test app keys to a server (or routing proxy) config table, next to its own.
pub fn add_test_keys(t: &mut toml::Table) {
    let auth = t
        .entry("auth")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let Some(auth) = auth.as_table_mut() else {
        panic!("[auth] is not a table");
    };
    let keys = auth
        .entry("keys")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let Some(keys) = keys.as_table_mut() else {
        panic!("[auth.keys] is not a table");
    };
    for app in APPS {
        let ids = keys
            .entry(app.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let Some(ids) = ids.as_table_mut() {
            ids.insert(KEY_ID.into(), KEY_SECRET.into());
        }
    }
}
