//! A connection's outgoing side, shared by the binary-protocol and the HTTP connections: bytes
//! (reply frames, a response head), then at most one file range sent with sendfile(2) from the
//! page cache, written until done or the socket is full.

use log::{debug, warn};
use mio::net::TcpStream;
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

/// Largest sendfile(2) call; a range is sent in pieces of at most this.
const SENDFILE_MAX: usize = 4 << 20;

/// How a write attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Everything is out.
    Done,
    /// The socket is full, or the byte budget is spent: wait for (or re-check) WRITABLE.
    Blocked,
    /// The peer is gone or the file ended early: close.
    Failed,
}

struct Range {
    /// Shared with other answers sending the same file (sendfile reads at an explicit offset).
    file: Arc<File>,
    off: i64,
    left: u64,
}

#[derive(Default)]
pub struct Outbox {
    buf: Vec<u8>,
    pos: usize,
    range: Option<Range>,
}

impl Outbox {
    /// Bytes or a file range are still to be written.
    pub fn busy(&self) -> bool {
        self.pos < self.buf.len() || self.range.is_some()
    }

    /// A file range is being (or will be) sent.
    pub fn sending_file(&self) -> bool {
        self.range.is_some()
    }

    /// Bytes buffered (written or not), for bounding what a connection queues.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Appends bytes behind what is buffered (not behind a file range: callers queue those).
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Starts the next answer: `head`, then `len` bytes of `file` from `off` if given. Only
    /// called when nothing is left to write.
    pub fn start(&mut self, head: Vec<u8>, file: Option<(Arc<File>, u64, u64)>) {
        self.buf = head;
        self.pos = 0;
        self.range = file.map(|(file, off, len)| Range {
            file,
            off: off as i64,
            left: len,
        });
    }

    /// Writes the bytes, then the file range, until done, the socket is full, or `budget` file
    /// bytes went out (so one big body cannot hold a worker; the re-arm runs the connection
    /// again at once). A head followed by a file goes with MSG_MORE, so both leave in one
    /// segment even with TCP_NODELAY on.
    pub fn write(&mut self, sock: &TcpStream, peer: SocketAddr, budget: u64) -> Written {
        let flags = if self.range.is_some() {
            nix::libc::MSG_MORE
        } else {
            0
        };
        let s = socket2::SockRef::from(sock);
        while self.pos < self.buf.len() {
            match s.send_with_flags(&self.buf[self.pos..], flags) {
                Ok(0) => return Written::Failed,
                Ok(n) => self.pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Written::Blocked,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!("{peer}: write failed: {e}");
                    return Written::Failed;
                }
            }
        }
        self.buf.clear();
        self.pos = 0;
        let mut budget = budget;
        while let Some(r) = self.range.as_mut() {
            if r.left == 0 {
                self.range = None;
                break;
            }
            if budget == 0 {
                return Written::Blocked;
            }
            let n = r.left.min(SENDFILE_MAX as u64) as usize;
            match nix::sys::sendfile::sendfile64(sock, &r.file, Some(&mut r.off), n) {
                Ok(0) => {
                    warn!("{peer}: stored file ended early while sending it");
                    return Written::Failed;
                }
                Ok(k) => {
                    r.left -= k as u64;
                    budget = budget.saturating_sub(k as u64);
                }
                Err(nix::errno::Errno::EAGAIN) => return Written::Blocked,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    debug!("{peer}: sendfile failed: {e}");
                    return Written::Failed;
                }
            }
        }
        Written::Done
    }
}
