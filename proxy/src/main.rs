//! `ferry-proxy --config conf/client-proxy-a.toml`: a thin wrapper over the ferry_proxy library.

fn main() -> std::process::ExitCode {
    ferry_proxy::main()
}
