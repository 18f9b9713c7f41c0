//! Shared ground for the ferry binaries: the wire protocol ([`proto`]), the edge-triggered
//! reactor that the proxy and the server run on ([`reactor`]), config loading and logging.

pub mod auth;
pub mod clock;
pub mod config;
pub mod logging;
pub mod net;
pub mod proto;
pub mod reactor;
pub mod signing;
pub mod tls;
pub mod token;
