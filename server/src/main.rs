//! `ferry-server`: a thin wrapper over the `ferry_server` library.

fn main() {
    if let Err(e) = ferry_server::main() {
        eprintln!("ferry-server: {e:#}");
        std::process::exit(1);
    }
}
