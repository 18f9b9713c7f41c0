//! A session's front: the socket of the peer that connected to us, plain TCP or (a client-proxy
//! with `[tls]`) TLS. Everything the session reads from or writes to the front goes through
//! here, so the phases do not care which it is; only the relay's mode does (splice needs the
//! plain socket, see [`crate::relay::End::raw`]).

use crate::relay::End;
use crate::tls::{Sniff, TlsFront};
use mio::net::TcpStream;
use std::io::{self, Read, Write};
use std::net::Shutdown;

pub struct Front {
    pub sock: TcpStream,
    tls: Option<Box<TlsFront>>,
}

impl Front {
    pub fn plain(sock: TcpStream) -> Front {
        Front { sock, tls: None }
    }

    pub fn tls(sock: TcpStream, tls: TlsFront) -> Front {
        Front {
            sock,
            tls: Some(Box::new(tls)),
        }
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Whether the client really opened with TLS (always so for a plain front).
    pub fn sniff(&mut self) -> io::Result<Sniff> {
        match &mut self.tls {
            None => Ok(Sniff::Tls),
            Some(t) => t.sniff(&self.sock),
        }
    }

    /// A TLS front whose client turned out to speak plain TCP becomes a plain one, so a plain
    /// error frame can tell the client to use TLS.
    pub fn downgrade(&mut self) {
        self.tls = None;
    }

    /// Encrypted bytes are waiting for the socket: arm it for WRITABLE, and do not close yet.
    pub fn wants_write(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// Writes what TLS holds back, as far as the socket takes it (WouldBlock is no error).
    pub fn flush(&mut self) -> io::Result<()> {
        match &mut self.tls {
            None => Ok(()),
            Some(t) => match t.flush(&mut self.sock) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
                r => r,
            },
        }
    }

    /// Ends both directions (the upstream died): a TLS client is told with close_notify.
    pub fn shutdown_both(&mut self) {
        if let Some(t) = &mut self.tls {
            t.shutdown_write(&mut self.sock);
        }
        let _ = self.sock.shutdown(Shutdown::Both);
    }
}

impl End for Front {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.tls {
            None => (&self.sock).read(buf),
            Some(t) => t.read(&mut self.sock, buf),
        }
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.tls {
            None => (&self.sock).write(buf),
            Some(t) => t.write(&mut self.sock, buf),
        }
    }

    fn shutdown_write(&mut self) {
        match &mut self.tls {
            None => {
                let _ = self.sock.shutdown(Shutdown::Write);
            }
            Some(t) => t.shutdown_write(&mut self.sock),
        }
    }

    fn raw(&self) -> Option<&TcpStream> {
        match self.tls {
            None => Some(&self.sock),
            Some(_) => None,
        }
    }
}
