//! Socket helpers shared by the proxy and the server.

use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::{SocketAddr, TcpListener};

/// A listening socket with SO_REUSEADDR (so a restarted process can rebind at once) and a deep
/// backlog, ready for the reactor (non-blocking).
pub fn listen(addr: SocketAddr, backlog: i32) -> io::Result<TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
    sock.listen(backlog)?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

/// Fewest connections a process takes, whatever its open-file limit: below this the limit is
/// misconfigured, and the process says so rather than refusing every client.
pub const MIN_CONNECTIONS: usize = 16;

/// How many connections fit in `limit` descriptors once `reserved` are kept for the process
/// itself, at `per_connection` each; and how many to take: `configured`, lowered to that (never
/// below [`MIN_CONNECTIONS`]). Server and proxy size their reactor with it, so connections
/// cannot run them into EMFILE.
pub fn connections_within(
    limit: u64,
    reserved: u64,
    per_connection: u64,
    configured: usize,
) -> (usize, usize) {
    let fit = limit.saturating_sub(reserved) / per_connection.max(1);
    let fit = usize::try_from(fit).unwrap_or(usize::MAX);
    (fit, configured.min(fit.max(MIN_CONNECTIONS)))
}

/// Raises the soft open-file limit to the hard limit: a relayed session costs two sockets and
/// two pipes, so the default soft limit caps the number of sessions far below what memory allows.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Ok((soft, _)) => soft,
        Err(_) => 0,
    }
}
