//! ferry's local-cluster supervisor: the members of a cluster as child processes on loopback
//! ([`cluster`]), the foreground `ferry cluster up` ([`up`]) and `ferry demo` ([`demo`]), with
//! the configs, secrets and local CA they generate for their members.
//!
//! Imports go one way: `demo` -> `up` -> `cluster` -> `secrets`, `localca`; all of them use
//! the client library (`ferry_client`), never the other way round, and nothing here ends the
//! process: the `ferry` binary owns signals and exit codes.

pub mod cluster;
pub mod demo;
pub mod localca;
pub mod secrets;
pub mod up;
