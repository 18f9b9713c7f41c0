//! The `ferry` command: [`ferry_cli::main`], plus what only the binary may do: watch SIGINT and
//! SIGTERM and end the process on one.

use ferry_cli::{INTERRUPTED_EXIT, OnSignal};
use signal_hook::consts::{SIGINT, SIGTERM};

fn main() -> std::process::ExitCode {
    let on_signal = OnSignal::default();
    exit_on_signal(on_signal.clone());
    ferry_cli::main(&on_signal)
}

/// On SIGINT or SIGTERM: runs what the command set (a transfer reports where to resume, a
/// local cluster stops its members), then exits with the interrupted status at once.
fn exit_on_signal(on_signal: OnSignal) {
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) else {
        return; // the default action still ends the process
    };
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                on_signal.run(sig);
                std::process::exit(INTERRUPTED_EXIT);
            }
        });
}
