//! The `ferry` command: a thin wrapper over `ferry_client::cli`.
fn main() -> std::process::ExitCode {
    ferry_client::cli::main()
}
