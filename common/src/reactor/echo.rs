//! A reference [`Conn`]: echoes every byte back through a bounded buffer. The reactor's tests
//! and its throughput benchmark run on it, and it shows the contract a handler must keep:
//! do I/O until WouldBlock, bound what you hold, and ask only for the readiness you can use.

use super::*;
use std::io::{Read, Write};
use std::sync::atomic::AtomicUsize;

/// Echoes bytes back with a bounded buffer: when the peer does not read, it stops reading too.
pub struct Echo {
    sock: TcpStream,
    buf: Box<[u8]>,
    /// Bytes `start..end` of `buf` are read but not yet written back.
    start: usize,
    end: usize,
    eof: bool,
    closed: Arc<AtomicUsize>,
}

const ECHO_BUF: usize = 64 * 1024;

impl Echo {
    fn pending(&self) -> bool {
        self.start < self.end
    }
}

impl Conn for Echo {
    fn run(&mut self, ev: &Events) -> Step {
        if ev.draining && !self.pending() {
            return Step::Close;
        }
        loop {
            // Flush first so the buffer bound holds.
            while self.pending() {
                match self.sock.write(&self.buf[self.start..self.end]) {
                    Ok(n) => self.start += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Keep,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Step::Close,
                }
            }
            (self.start, self.end) = (0, 0);
            if self.eof {
                return Step::Close;
            }
            match self.sock.read(&mut self.buf) {
                Ok(0) => self.eof = true,
                Ok(n) => self.end = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Keep,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Step::Close,
            }
        }
    }

    fn sources(&mut self, arm: &mut Arm<'_>) {
        let want = if self.pending() {
            Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        arm(0, &mut self.sock, Some(want));
    }

    /// Every run that keeps the connection ended at WouldBlock.
    fn settled(&self) -> bool {
        true
    }

    fn closed(&mut self, _why: CloseReason) {
        self.closed.fetch_add(1, Ordering::SeqCst);
    }
}

pub struct EchoService {
    closed: Arc<AtomicUsize>,
}

impl EchoService {
    /// `closed` counts connections the reactor has dropped.
    pub fn new(closed: Arc<AtomicUsize>) -> Self {
        EchoService { closed }
    }
}

impl Service for EchoService {
    fn accept(&self, sock: TcpStream, _: SocketAddr, _: usize) -> Option<Box<dyn Conn>> {
        Some(Box::new(Echo {
            sock,
            buf: vec![0; ECHO_BUF].into_boxed_slice(),
            start: 0,
            end: 0,
            eof: false,
            closed: self.closed.clone(),
        }))
    }
}
