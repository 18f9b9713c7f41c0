//! The end-to-end tests, in one test binary: each module starts the real `ferry`,
//! `ferry-proxy` and `ferry-server` binaries on loopback ports picked at run time (from one
//! process-wide pool in `support`, so no two tests ever share a port) and cleans them up.
//! One binary links the workspace once; `cargo test --test e2e MODULE::` runs one module.
//! (Two binaries, one node vs clusters, measured no faster to build from clean on two cores,
//! 544 s vs 542 s, and slower after a change in common, 195 s vs 187 s.)

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
