//! One direction of a relayed session: bytes from a source socket to a destination socket
//! through a bounded holding area, either a pipe moved with splice(2) (the bytes never enter
//! userspace) or a userspace buffer. The bound is what gives backpressure: when it is full the
//! session stops reading the source until the destination drains.

use mio::net::TcpStream;
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::OwnedFd;

/// One side of a relayed session as a flow sees it: a plain socket, or the client-proxy's TLS
/// front (plaintext in and out, see [`crate::front`]).
pub trait End {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    fn write(&mut self, buf: &[u8]) -> io::Result<usize>;
    /// Passes a FIN on (for TLS: close_notify, then the FIN).
    fn shutdown_write(&mut self);
    /// The socket itself when bytes may be spliced to or from it; `None` under TLS, whose
    /// flows always use a userspace buffer.
    fn raw(&self) -> Option<&TcpStream>;
}

impl End for TcpStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn shutdown_write(&mut self) {
        // ENOTCONN here means the destination is already gone; its own direction reports it.
        let _ = self.shutdown(Shutdown::Write);
    }

    fn raw(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

/// How sessions move bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Splice,
    Userspace,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Splice => "splice (zero copy)",
            Mode::Userspace => "userspace buffer",
        }
    }
}

/// Why a direction stopped with an error; the session decides what that means.
#[derive(Debug)]
pub enum Failure {
    /// Reading the source failed (reset, error).
    Source(io::Error),
    /// Writing the destination failed (EPIPE, reset).
    Dest(io::Error),
}

enum Hold {
    Pipe {
        r: OwnedFd,
        w: OwnedFd,
        len: usize,
    },
    /// `buf` is only held while bytes are in flight; an idle session returns it to the
    /// worker's pool, so memory follows the sessions that are moving data, not all sessions.
    Buf {
        buf: Option<Box<[u8]>>,
        start: usize,
        end: usize,
    },
}

/// Most bytes one direction moves per run before it yields the worker.
pub const BUDGET: u64 = 8 * 1024 * 1024;

/// Idle userspace buffers kept per thread for reuse.
const POOL_MAX: usize = 8;

thread_local! {
    static POOL: std::cell::RefCell<Vec<Box<[u8]>>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn take_buf(cap: usize) -> Box<[u8]> {
    POOL.with(|p| p.borrow_mut().pop_if(|b| b.len() == cap))
        .unwrap_or_else(|| vec![0u8; cap].into_boxed_slice())
}

fn give_buf(b: Box<[u8]>) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_MAX {
            p.push(b);
        }
    });
}

/// One direction of one session.
pub struct Flow {
    hold: Hold,
    cap: usize,
    /// The source sent FIN.
    pub eof: bool,
    /// The FIN was passed on (shutdown(Write) on the destination).
    pub shut: bool,
    /// Bytes written to the destination so far.
    pub bytes: u64,
}

/// A non-blocking pipe sized to `size` bytes (as far as the kernel allows).
fn pipe(size: usize) -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
    // The kernel rounds up to a power-of-two number of pages; failure keeps the 64 KiB default,
    // which only costs throughput.
    let _ = fcntl(&w, FcntlArg::F_SETPIPE_SZ(size as i32));
    Ok((r, w))
}

fn is_would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl Flow {
    /// A direction holding at most `cap` bytes in flight. Splice mode falls back to a buffer
    /// (with a warning) if no pipe can be made, e.g. when the process is out of descriptors.
    pub fn new(mode: Mode, cap: usize) -> Flow {
        let hold = match mode {
            Mode::Splice => match pipe(cap) {
                Ok((r, w)) => Some(Hold::Pipe { r, w, len: 0 }),
                Err(e) => {
                    log::warn!("cannot create a pipe ({e}); relaying this session in userspace");
                    None
                }
            },
            Mode::Userspace => None,
        };
        let hold = hold.unwrap_or(Hold::Buf {
            buf: None,
            start: 0,
            end: 0,
        });
        Flow {
            hold,
            cap,
            eof: false,
            shut: false,
            bytes: 0,
        }
    }

    pub fn mode(&self) -> Mode {
        match self.hold {
            Hold::Pipe { .. } => Mode::Splice,
            Hold::Buf { .. } => Mode::Userspace,
        }
    }

    /// Bytes read from the source and not yet written to the destination.
    pub fn pending(&self) -> usize {
        match &self.hold {
            Hold::Pipe { len, .. } => *len,
            Hold::Buf { start, end, .. } => end - start,
        }
    }

    /// Queues bytes that were already read (the HELLO) ahead of everything else. `data` must
    /// fit in an empty holding area (it is at most a few hundred bytes).
    pub fn preload(&mut self, data: &[u8]) -> io::Result<()> {
        if data.len() > self.cap || self.pending() != 0 {
            return Err(io::Error::other("preload does not fit"));
        }
        match &mut self.hold {
            Hold::Pipe { w, len, .. } => {
                // An empty pipe holds at least one page, and the data is smaller than that, so
                // a single write takes it all (pipe writes up to PIPE_BUF are atomic).
                let n = nix::unistd::write(&*w, data)?;
                if n != data.len() {
                    return Err(io::Error::other("short write into an empty pipe"));
                }
                *len = n;
            }
            Hold::Buf { buf, start, end } => {
                let buf = buf.get_or_insert_with(|| take_buf(self.cap));
                buf[..data.len()].copy_from_slice(data);
                *start = 0;
                *end = data.len();
            }
        }
        Ok(())
    }

    /// The source should be armed for READABLE: nothing held, no EOF yet. While bytes are held,
    /// the destination is blocked, and reading on would only fill the bound (and, for splice, an
    /// EAGAIN could not tell "source empty" from "pipe full").
    pub fn wants_read(&self) -> bool {
        !self.eof && self.pending() == 0
    }

    /// The destination should be armed for WRITABLE: bytes are held that it did not take.
    pub fn wants_write(&self) -> bool {
        self.pending() > 0
    }

    /// The source's FIN has been passed on and nothing is left to send.
    pub fn done(&self) -> bool {
        self.eof && self.pending() == 0 && self.shut
    }

    /// Moves bytes until neither side can make progress: drain what is held into `dst`, then
    /// refill from `src`, again and again. Passes the FIN on once everything before it is out.
    ///
    /// At most [`BUDGET`] bytes move per call, so one fast session cannot hold a worker while
    /// others wait; stopping early is safe because the reactor re-arms with EPOLL_CTL_MOD, which
    /// queues a new event at once for a socket that is still ready.
    pub fn pump(&mut self, src: &mut impl End, dst: &mut impl End) -> Result<(), Failure> {
        let start = self.bytes;
        while self.bytes - start < BUDGET {
            let mut progress = false;
            if self.pending() > 0 {
                match self.drain(dst) {
                    Ok(0) => {}
                    Ok(n) => {
                        self.bytes += n as u64;
                        progress = true;
                    }
                    Err(e) if is_would_block(&e) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => progress = true,
                    Err(e) => return Err(Failure::Dest(e)),
                }
            }
            if !self.eof && self.pending() < self.cap {
                match self.fill(src) {
                    Ok(0) => {
                        self.eof = true;
                        progress = true;
                    }
                    Ok(_) => progress = true,
                    // With bytes held this may mean "pipe full"; the drain above decides.
                    Err(e) if is_would_block(&e) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => progress = true,
                    Err(e) => return Err(Failure::Source(e)),
                }
            }
            if !progress {
                break;
            }
        }
        if let Hold::Buf { buf, start, end } = &mut self.hold
            && start == end
            && let Some(b) = buf.take()
        {
            give_buf(b);
        }
        if self.eof && self.pending() == 0 && !self.shut {
            self.shut = true;
            dst.shutdown_write();
        }
        Ok(())
    }

    /// One read from the source into the holding area; Ok(0) is EOF.
    fn fill(&mut self, src: &mut impl End) -> io::Result<usize> {
        let room = self.cap - self.pending();
        match &mut self.hold {
            Hold::Pipe { w, len, .. } => {
                let src = src.raw().ok_or_else(not_spliceable)?;
                let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
                let n = splice(src, None, &*w, None, room, flags).map_err(io::Error::from)?;
                *len += n;
                Ok(n)
            }
            Hold::Buf { buf, start, end } => {
                let buf = buf.get_or_insert_with(|| take_buf(room));
                if *start == *end {
                    *start = 0;
                    *end = 0;
                } else if *end == buf.len() {
                    buf.copy_within(*start..*end, 0);
                    *end -= *start;
                    *start = 0;
                }
                let n = src.read(&mut buf[*end..])?;
                *end += n;
                Ok(n)
            }
        }
    }

    /// One write of held bytes to the destination.
    fn drain(&mut self, dst: &mut impl End) -> io::Result<usize> {
        match &mut self.hold {
            Hold::Pipe { r, len, .. } => {
                let dst = dst.raw().ok_or_else(not_spliceable)?;
                let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
                let n = splice(&*r, None, dst, None, *len, flags).map_err(io::Error::from)?;
                *len -= n;
                Ok(n)
            }
            Hold::Buf { buf, start, end } => {
                let Some(buf) = buf else { return Ok(0) };
                let n = dst.write(&buf[*start..*end])?;
                *start += n;
                Ok(n)
            }
        }
    }
}

/// A splice flow was given a TLS end: a session builds its flows in userspace mode for TLS.
fn not_spliceable() -> io::Error {
    io::Error::other("internal: a TLS end cannot be spliced")
}

/// Checks at start-up that splice works on this kernel for TCP sockets (it can be missing or
/// blocked by a seccomp filter); the proxy falls back to userspace buffers if not.
pub fn splice_works() -> Result<(), String> {
    let check = || -> io::Result<()> {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        let mut a = std::net::TcpStream::connect(l.local_addr()?)?;
        let (b, _) = l.accept()?;
        a.write_all(b"x")?;
        b.set_read_timeout(Some(std::time::Duration::from_secs(1)))?;
        let (r, w) = pipe(PROBE_PIPE)?;
        let flags = SpliceFFlags::SPLICE_F_MOVE;
        let n = splice(&b, None, &w, None, 1, flags).map_err(io::Error::from)?;
        let mut got = [0u8; 1];
        let m = nix::unistd::read(&r, &mut got).map_err(io::Error::from)?;
        if n == 1 && m == 1 && got == *b"x" {
            Ok(())
        } else {
            Err(io::Error::other("splice moved the wrong bytes"))
        }
    };
    check().map_err(|e| match Errno::from_raw(e.raw_os_error().unwrap_or(0)) {
        Errno::ENOSYS | Errno::EINVAL | Errno::EPERM => format!("splice unavailable: {e}"),
        _ => format!("splice check failed: {e}"),
    })
}

const PROBE_PIPE: usize = 4096;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A connected pair of mio streams over loopback, plus the std ends of each.
    fn pair() -> (TcpStream, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        b.set_nonblocking(true).unwrap();
        a.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (TcpStream::from_std(b), a)
    }

    fn relay_through(mode: Mode, cap: usize) {
        // client -> (src) flow (dst) -> sink
        let (mut src, mut client) = pair();
        let (mut dst, mut sink) = pair();
        let mut flow = Flow::new(mode, cap);
        assert_eq!(flow.mode(), mode);
        flow.preload(b"HELLO").unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let writer = {
            let data = data.clone();
            std::thread::spawn(move || {
                client.write_all(&data).unwrap();
                client.shutdown(Shutdown::Write).unwrap();
                client
            })
        };
        let mut got = Vec::new();
        let mut buf = vec![0u8; 7000];
        sink.set_nonblocking(true).unwrap();
        let t = std::time::Instant::now();
        while !flow.done() {
            assert!(t.elapsed() < Duration::from_secs(20), "relay stalled");
            flow.pump(&mut src, &mut dst).unwrap();
            assert!(flow.pending() <= cap);
            // A slow reader: take a little at a time.
            match sink.read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if is_would_block(&e) => std::thread::sleep(Duration::from_micros(200)),
                Err(e) => panic!("{e}"),
            }
        }
        sink.set_nonblocking(false).unwrap();
        sink.read_to_end(&mut got).unwrap();
        writer.join().unwrap();
        assert_eq!(&got[..5], b"HELLO");
        assert!(got[5..] == data[..], "relayed bytes differ");
        assert_eq!(flow.bytes, data.len() as u64 + 5);
        // An idle userspace flow holds no buffer.
        if let Hold::Buf { buf, .. } = &flow.hold {
            assert!(buf.is_none());
        }
    }

    #[test]
    fn splice_relays_exactly_with_a_small_bound() {
        splice_works().unwrap();
        relay_through(Mode::Splice, 16 * 1024);
    }

    #[test]
    fn userspace_relays_exactly_with_a_small_bound() {
        relay_through(Mode::Userspace, 5000);
    }

    #[test]
    fn writing_to_a_closed_peer_is_an_error_not_a_signal() {
        for mode in [Mode::Splice, Mode::Userspace] {
            let (mut src, mut client) = pair();
            let (mut dst, sink) = pair();
            drop(sink);
            client.set_nonblocking(true).unwrap();
            let mut flow = Flow::new(mode, 64 * 1024);
            let chunk = vec![1u8; 64 * 1024];
            let t = std::time::Instant::now();
            let err = loop {
                assert!(t.elapsed() < Duration::from_secs(10));
                let _ = client.write(&chunk);
                match flow.pump(&mut src, &mut dst) {
                    Ok(()) => std::thread::sleep(Duration::from_millis(5)),
                    Err(e) => break e,
                }
            };
            assert!(matches!(err, Failure::Dest(_)), "{mode:?}: {err:?}");
        }
    }
}
