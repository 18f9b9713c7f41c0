//! TLS on the client leg: the client-proxy's certificate, reloaded on SIGHUP, and the front end
//! of a session that speaks TLS to the client.
//!
//! The certificate sits behind a lock that only new handshakes read, so a reload never touches a
//! session in flight: sessions that already shook hands keep their keys, the next handshake gets
//! the new certificate. A reload that fails (missing file, key that does not match) keeps the old
//! certificate and says why in the log.
//!
//! [`TlsFront`] drives a rustls server connection over the non-blocking front socket: `read`
//! hands out plaintext (reading and decrypting records as needed, answering the handshake as it
//! goes), `write` encrypts into rustls's bounded send buffer and flushes what the socket takes.
//! Records that the socket did not take wait in that buffer; [`TlsFront::wants_write`] tells the
//! session to arm the socket for WRITABLE until they are out, and a session never closes a TLS
//! front while they are pending.

use ferry_common::tls;
use log::{info, warn};
use mio::net::TcpStream;
use parking_lot::RwLock;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, ServerConnection};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::path::PathBuf;
use std::sync::Arc;

/// The served certificate chain and key, and the files they come from.
#[derive(Debug)]
pub struct CertStore {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertStore {
    /// Loads the chain and key; a key that does not match the certificate is an error.
    pub fn load(cert_path: PathBuf, key_path: PathBuf) -> Result<Arc<CertStore>, String> {
        let (key, pin) = read_pair(&cert_path, &key_path)?;
        info!("TLS: serving {} (pin {pin})", cert_path.display());
        Ok(Arc::new(CertStore {
            cert_path,
            key_path,
            current: RwLock::new(key),
        }))
    }

    /// Reads the files again; on success new handshakes use them, on failure nothing changes.
    /// Returns the new certificate's pin.
    pub fn reload(&self) -> Result<String, String> {
        let (key, pin) = read_pair(&self.cert_path, &self.key_path)?;
        *self.current.write() = key;
        Ok(pin)
    }

    /// The rustls config of the listener: TLS 1.2 and 1.3, no client certificates, this
    /// store's certificate for every handshake.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, String> {
        let cfg = ServerConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS config: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        Ok(Arc::new(cfg))
    }

    /// SIGHUP: reload, logging the outcome.
    pub fn reload_logged(&self) {
        match self.reload() {
            Ok(pin) => info!(
                "TLS: reloaded {} (pin {pin}); sessions in flight keep theirs",
                self.cert_path.display()
            ),
            Err(e) => warn!("TLS: reload failed, still serving the previous certificate: {e}"),
        }
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().clone())
    }
}

fn read_pair(
    cert_path: &std::path::Path,
    key_path: &std::path::Path,
) -> Result<(Arc<CertifiedKey>, String), String> {
    let certs = tls::load_certs(cert_path)?;
    let key = tls::load_key(key_path)?;
    let pin = tls::pin_of(&certs[0])?;
    let ck = CertifiedKey::from_der(certs, key, &tls::provider()).map_err(|e| {
        format!(
            "{} and {} do not make a usable pair: {e}",
            cert_path.display(),
            key_path.display()
        )
    })?;
    Ok((Arc::new(ck), pin))
}

/// What the first bytes of a connection at a TLS listener say.
#[derive(Debug, PartialEq, Eq)]
pub enum Sniff {
    /// Nothing to read yet.
    Pending,
    /// A TLS handshake record: go on with TLS.
    Tls,
    /// Anything else: a plain-TCP client (it gets a plain error frame telling it to use TLS).
    Plain,
}

/// The TLS state of a session's front socket (the socket itself is the [`crate::front::Front`]'s).
pub struct TlsFront {
    conn: ServerConnection,
    /// The first byte was a TLS handshake record; no more sniffing.
    seen_tls: bool,
    /// The write side was shut: close_notify queued; the TCP FIN follows once it is out.
    closing: bool,
    fin_sent: bool,
}

/// TLS record type of a handshake message: every TLS client opens with one.
const HANDSHAKE_RECORD: u8 = 0x16;

impl TlsFront {
    pub fn new(cfg: Arc<ServerConfig>) -> io::Result<TlsFront> {
        let conn = ServerConnection::new(cfg).map_err(io::Error::other)?;
        Ok(TlsFront {
            conn,
            seen_tls: false,
            closing: false,
            fin_sent: false,
        })
    }

    /// Looks at the first byte without taking it (once it said TLS, it says so at once).
    pub fn sniff(&mut self, sock: &TcpStream) -> io::Result<Sniff> {
        if self.seen_tls {
            return Ok(Sniff::Tls);
        }
        let mut b = [0u8; 1];
        match sock.peek(&mut b) {
            // EOF: the TLS path reports the close.
            Ok(0) => Ok(Sniff::Tls),
            Ok(_) if b[0] == HANDSHAKE_RECORD => {
                self.seen_tls = true;
                Ok(Sniff::Tls)
            }
            Ok(_) => Ok(Sniff::Plain),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Sniff::Pending),
            Err(e) => Err(e),
        }
    }

    /// Plaintext from the client: Ok(0) at its close_notify or at a TCP FIN (ferry's frames
    /// carry their own lengths, so a cut is seen by whoever reads the frame), WouldBlock when
    /// the socket has nothing more. A TLS protocol error gets its alert sent and is returned.
    pub fn read(&mut self, sock: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            match self.conn.read_tls(sock) {
                // EOF: the reader now reports close_notify (Ok(0)) or the cut (UnexpectedEof).
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            if let Err(e) = self.conn.process_new_packets() {
                // The alert that says why, best effort.
                let _ = self.flush(sock);
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            // Handshake answers (and key updates) go out as soon as they exist.
            match self.flush(sock) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Encrypts as much of `buf` as rustls's send buffer takes and flushes what the socket
    /// takes. WouldBlock when neither took anything.
    pub fn write(&mut self, sock: &mut TcpStream, buf: &[u8]) -> io::Result<usize> {
        match self.flush(sock) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        let n = self.conn.writer().write(buf)?;
        match self.flush(sock) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        if n == 0 && !buf.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    /// Writes pending records until none is left (Ok) or the socket is full (WouldBlock);
    /// after a shutdown, sends the TCP FIN once the close_notify is out.
    pub fn flush(&mut self, sock: &mut TcpStream) -> io::Result<()> {
        while self.conn.wants_write() {
            match self.conn.write_tls(sock) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.closing && !self.fin_sent {
            self.fin_sent = true;
            let _ = sock.shutdown(Shutdown::Write);
        }
        Ok(())
    }

    /// Encrypted bytes wait for the socket.
    pub fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    /// Ends our direction: close_notify, then the FIN (now or once the records are out).
    pub fn shutdown_write(&mut self, sock: &mut TcpStream) {
        if !self.closing {
            self.closing = true;
            self.conn.send_close_notify();
        }
        let _ = self.flush(sock);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for `name` and its key, as PEM files in `dir`.
    fn pair(dir: &std::path::Path, tag: &str, name: &str) -> (PathBuf, PathBuf) {
        let ck = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        let cert = dir.join(format!("{tag}.crt"));
        let key = dir.join(format!("{tag}.key"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        (cert, key)
    }

    #[test]
    fn reload_swaps_the_certificate_and_a_bad_pair_keeps_the_old_one() {
        let dir = std::env::temp_dir().join(format!("ferry-proxy-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = pair(&dir, "live", "localhost");
        let store = CertStore::load(cert.clone(), key.clone()).unwrap();
        let first = tls::pin_of(&store.current.read().cert[0]).unwrap();
        // A renewed pair at the same paths: new handshakes get it.
        let (c2, k2) = pair(&dir, "next", "localhost");
        std::fs::copy(&c2, &cert).unwrap();
        std::fs::copy(&k2, &key).unwrap();
        let second = store.reload().unwrap();
        assert_ne!(first, second);
        assert_eq!(tls::pin_of(&store.current.read().cert[0]).unwrap(), second);
        // A key that belongs to another certificate: refused, the served one stays.
        let (_, k3) = pair(&dir, "other", "localhost");
        std::fs::copy(&k3, &key).unwrap();
        let e = store.reload().unwrap_err();
        assert!(e.contains("do not make a usable pair"), "{e}");
        assert_eq!(tls::pin_of(&store.current.read().cert[0]).unwrap(), second);
        // A missing file: the same.
        std::fs::remove_file(&cert).unwrap();
        assert!(store.reload().unwrap_err().contains("live.crt"));
        assert!(CertStore::load(cert, key).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
