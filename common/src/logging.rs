//! Logging setup for the binaries: `RUST_LOG` is respected, `info` otherwise.

/// Initialises env_logger once; later calls are no-ops (tests call it many times).
pub fn init() {
    let env = env_logger::Env::default().default_filter_or("info");
    let _ = env_logger::Builder::from_env(env)
        .format_timestamp_millis()
        .try_init();
}
