//! The end-to-end tests of clusters (tracker, routing proxies, storage groups, chaos) and of
//! the `ferry` command (transfers, tokens, exit statuses, `demo` and `cluster up`), in one test
//! binary on the same `support` as `tests/e2e/`. `cargo test --test e2e_cluster MODULE::` runs
//! one module.

#[path = "../e2e/support/mod.rs"]
mod support;

mod chaos;
mod client;
mod cluster;
mod demo;
mod exit_status;
mod multinode;
mod route;
mod token;
mod tracker;
