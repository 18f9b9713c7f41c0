//! The end-to-end tests, in one test binary: each module starts the real `ferry`,
//! `ferry-proxy` and `ferry-server` binaries on loopback ports picked at run time (from one
//! process-wide pool in `support`, so no two tests ever share a port) and cleans them up.
//! One binary links the workspace once; `cargo test --test e2e MODULE::` runs one module.

mod support;

mod auth;
mod chaos;
mod client;
mod cluster;
mod demo;
mod exit_status;
mod http;
mod limits;
mod multinode;
mod proxy;
mod route;
mod server;
mod storage_faults;
mod tls;
mod token;
mod tracker;
