//! The end-to-end tests of one node and its proxies (server, proxy chains, HTTP gateway,
//! authorization, limits, storage faults, TLS), in one test binary: each module starts the real
//! `ferry-proxy` and `ferry-server` binaries on loopback ports picked at run time (from one
//! process-wide pool in `support`, so no two tests ever share a port) and cleans them up.
//! `cargo test --test e2e MODULE::` runs one module. Clusters, the client CLI and the local
//! cluster commands are in `tests/e2e_cluster/`: two binaries, so a clean build compiles them
//! side by side.

mod support;

mod auth;
mod http;
mod limits;
mod proxy;
mod server;
mod storage_faults;
mod tls;
