//! One client connection on the reactor: decode requests from a bounded read buffer, stream
//! upload payloads straight to disk, answer with replies and (for downloads) file bytes sent by
//! sendfile(2), all non-blocking.
//!
//! Memory per connection is the read buffer (config `read_buffer_kib`) plus small replies: an
//! UPLOAD or UPLOAD_BLOCK payload goes to the file piece by piece as it is read, and a download
//! payload goes from the page cache to the socket without passing through user space.

use crate::store::{BlockStart, BlockWriter, Download, OpError, SmallWriter, Storage, Who};
use ferry_common::proto::{
    self, BlockAck, BlockMeta, Decoded, Decoder, DownloadReq, ErrorBody, ErrorCode, Header, Hello,
    Identity, Prove, Role, StatReply, UploadInit, UploadMeta, cmd, status,
};
use ferry_common::reactor::{Arm, CloseReason, Conn, Events, Service, Step};
use log::{debug, info, warn};
use mio::Interest;
use mio::net::TcpStream;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;

/// Where the bytes of the current data frame's payload go.
enum Sink {
    None,
    Small(Box<SmallWriter>),
    Block(BlockWriter),
    /// Read and dropped; `reply` is sent once the payload is over (fencing, refused blocks).
    Discard(Vec<u8>),
}

/// Bytes read per run before the connection yields its worker to others; the reactor's re-arm
/// notices the unread data and runs it again.
const READ_BUDGET: usize = 8 << 20;
/// Replies may pile up to this before the connection stops decoding and flushes them.
const OUT_HIGH: usize = 64 * 1024;
/// Largest single sendfile call.
const SENDFILE_MAX: usize = 4 << 20;

/// A download payload being sent.
struct Sending {
    dl: Download,
    off: i64,
    left: u64,
}

pub struct ServerConn {
    sock: TcpStream,
    peer: SocketAddr,
    st: Arc<Storage>,
    dec: Decoder,
    rbuf: Vec<u8>,
    rpos: usize,
    rend: usize,
    out: Vec<u8>,
    out_pos: usize,
    sending: Option<Sending>,
    who: Option<Who>,
    sink: Sink,
    /// A malformed frame was answered: close once the error frame is out.
    close_after_flush: bool,
    eof: bool,
}

enum Flush {
    Done,
    Blocked,
    Failed,
}

impl ServerConn {
    pub fn new(sock: TcpStream, peer: SocketAddr, st: Arc<Storage>) -> Self {
        let rbuf = vec![0u8; st.cfg.read_buffer_kib * 1024];
        ServerConn {
            sock,
            peer,
            st,
            dec: Decoder::requests(),
            rbuf,
            rpos: 0,
            rend: 0,
            out: Vec::new(),
            out_pos: 0,
            sending: None,
            who: None,
            sink: Sink::None,
            close_after_flush: false,
            eof: false,
        }
    }

    fn output_pending(&self) -> bool {
        self.out_pos < self.out.len() || self.sending.is_some()
    }

    fn reply(&mut self, body: &[u8]) {
        self.out
            .extend_from_slice(&proto::frame(cmd::REPLY_STORAGE, status::OK, body));
    }

    fn error(&mut self, e: &OpError, req: u8) {
        // Codes 1-5 mean the stream can no longer be trusted: answer, then close.
        let fatal = (e.code as u16) <= 5;
        if fatal {
            warn!("{}: {} refused ({e}); closing", self.peer, cmd::name(req));
            self.close_after_flush = true;
        } else {
            debug!("{}: {} failed: {e}", self.peer, cmd::name(req));
        }
        let body = ErrorBody::new(e.code, e.text.clone());
        self.out.extend_from_slice(&body.frame(cmd::REPLY_STORAGE));
    }

    fn flush(&mut self) -> Flush {
        while self.out_pos < self.out.len() {
            match self.sock.write(&self.out[self.out_pos..]) {
                Ok(0) => return Flush::Failed,
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Flush::Blocked,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!("{}: write failed: {e}", self.peer);
                    return Flush::Failed;
                }
            }
        }
        self.out.clear();
        self.out_pos = 0;
        while let Some(s) = self.sending.as_mut() {
            if s.left == 0 {
                self.sending = None;
                break;
            }
            let n = s.left.min(SENDFILE_MAX as u64) as usize;
            match nix::sys::sendfile::sendfile64(&self.sock, &s.dl.file, Some(&mut s.off), n) {
                Ok(0) => {
                    warn!("{}: stored file ended early during a download", self.peer);
                    return Flush::Failed;
                }
                Ok(k) => s.left -= k as u64,
                Err(nix::errno::Errno::EAGAIN) => return Flush::Blocked,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    debug!("{}: sendfile failed: {e}", self.peer);
                    return Flush::Failed;
                }
            }
        }
        Flush::Done
    }

    /// Decodes what is buffered until it is used up or replies need flushing first.
    fn process(&mut self) {
        let buf = std::mem::take(&mut self.rbuf);
        while self.rpos < self.rend
            && !self.close_after_flush
            && self.sending.is_none()
            && self.out.len() < OUT_HIGH
        {
            match self.dec.decode(&buf[self.rpos..self.rend]) {
                Err(e) => {
                    let err = OpError::new(e.code(), e.to_string());
                    self.error(&err, 0);
                    self.sink = Sink::None;
                }
                Ok((n, item)) => {
                    self.rpos += n;
                    match item {
                        None => {}
                        Some(Decoded::Frame {
                            header,
                            meta,
                            payload_len,
                        }) => self.on_frame(header, &meta, payload_len),
                        Some(Decoded::Payload { data, last }) => self.on_payload(data, last),
                    }
                }
            }
        }
        self.rbuf = buf;
    }

    fn on_frame(&mut self, h: Header, meta: &[u8], payload_len: u64) {
        match h.cmd {
            cmd::PROBE => {
                self.reply(
                    &Identity {
                        version: proto::VERSION,
                        role: Role::Server,
                    }
                    .encode(),
                );
                return;
            }
            cmd::HELLO => {
                if self.who.is_some() {
                    let e = OpError::new(ErrorCode::BadFrame, "HELLO already received");
                    return self.error(&e, h.cmd);
                }
                match Hello::decode(meta) {
                    Ok(hello) => {
                        debug!(
                            "{}: session for app {} user {}",
                            self.peer, hello.app, hello.user
                        );
                        self.who = Some(Who {
                            app: hello.app,
                            user: hello.user,
                        });
                        self.reply(
                            &Identity {
                                version: proto::VERSION,
                                role: Role::Server,
                            }
                            .encode(),
                        );
                    }
                    Err(e) => self.error(&OpError::new(e.code(), e.to_string()), h.cmd),
                }
                return;
            }
            _ => {}
        }
        let Some(who) = self.who.clone() else {
            let e = OpError::new(
                ErrorCode::HelloRequired,
                format!("{} before HELLO", cmd::name(h.cmd)),
            );
            return self.error(&e, h.cmd);
        };
        let r = match h.cmd {
            cmd::UPLOAD => self.start_small(&who, meta, payload_len),
            cmd::UPLOAD_BLOCK => self.start_block(&who, meta, payload_len),
            cmd::STAT => self.stat(&who, meta),
            cmd::DOWNLOAD => self.download(&who, meta),
            cmd::DELETE => proto::decode_file_id(meta)
                .map_err(bad)
                .and_then(|id| self.st.delete(&who, &id))
                .map(|()| self.reply(&[])),
            cmd::DOWNLOAD_OVER => proto::decode_file_id(meta)
                .map_err(bad)
                .and_then(|id| self.st.download_over(&who, &id))
                .map(|()| self.reply(&[])),
            cmd::UPLOAD_INIT => UploadInit::decode(meta)
                .map_err(bad)
                .and_then(|init| self.st.init(&who, &init))
                .map(|r| self.reply(&r.encode())),
            cmd::UPLOAD_QUERY => proto::decode_upload_id(meta)
                .map_err(bad)
                .and_then(|id| self.st.query(&who, &id))
                .map(|b| self.reply(&b.encode())),
            cmd::UPLOAD_OVER => proto::decode_upload_id(meta)
                .map_err(bad)
                .and_then(|id| self.st.over(&who, &id))
                .and_then(|fid| self.reply_file_id(&fid)),
            cmd::UPLOAD_PROVE => Prove::decode(meta)
                .map_err(bad)
                .and_then(|p| self.st.prove(&who, &p.upload_id, &p.sha256))
                .and_then(|fid| self.reply_file_id(&fid)),
            other => Err(OpError::new(
                ErrorCode::UnknownCommand,
                format!("command {other} is not served here"),
            )),
        };
        if let Err(e) = r {
            self.error(&e, h.cmd);
        }
    }

    fn reply_file_id(&mut self, id: &str) -> Result<(), OpError> {
        let body = proto::encode_file_id(id)
            .map_err(|e| OpError::new(ErrorCode::Internal, e.to_string()))?;
        self.reply(&body);
        Ok(())
    }

    fn start_small(&mut self, who: &Who, meta: &[u8], len: u64) -> Result<(), OpError> {
        let m = UploadMeta::decode(meta).map_err(bad)?;
        match self.st.small_begin(who, m, len) {
            Ok(w) => {
                self.sink = Sink::Small(Box::new(w));
                if len == 0 {
                    self.end_payload();
                }
                Ok(())
            }
            Err(e) => {
                // The payload still has to be read to stay in step with the stream.
                self.discard(
                    len,
                    ErrorBody::new(e.code, e.text).frame(cmd::REPLY_STORAGE),
                );
                Ok(())
            }
        }
    }

    fn start_block(&mut self, who: &Who, meta: &[u8], len: u64) -> Result<(), OpError> {
        let m = BlockMeta::decode(meta, len).map_err(bad)?;
        let reply = match self.st.block_begin(who, &m) {
            Ok(BlockStart::Write(w)) => {
                self.sink = Sink::Block(w);
                if len == 0 {
                    self.end_payload();
                }
                return Ok(());
            }
            Ok(BlockStart::Stored) => {
                debug!(
                    "{}: block {} of {} already stored; dropping this copy",
                    self.peer,
                    m.index,
                    hex::encode(m.upload_id)
                );
                proto::frame(
                    cmd::REPLY_STORAGE,
                    status::OK,
                    &[BlockAck::AlreadyStored as u8],
                )
            }
            Err(e) => {
                debug!("{}: block {} refused: {e}", self.peer, m.index);
                ErrorBody::new(e.code, e.text).frame(cmd::REPLY_STORAGE)
            }
        };
        self.discard(len, reply);
        Ok(())
    }

    fn discard(&mut self, len: u64, reply: Vec<u8>) {
        if len == 0 {
            self.out.extend_from_slice(&reply);
        } else {
            self.sink = Sink::Discard(reply);
        }
    }

    fn on_payload(&mut self, data: &[u8], last: bool) {
        match &mut self.sink {
            Sink::Small(w) => w.write(&self.st, data),
            Sink::Block(w) => w.write(&self.st, data),
            Sink::Discard(_) | Sink::None => {}
        }
        if last {
            self.end_payload();
        }
    }

    fn end_payload(&mut self) {
        match std::mem::replace(&mut self.sink, Sink::None) {
            Sink::None => {}
            Sink::Discard(reply) => self.out.extend_from_slice(&reply),
            Sink::Small(w) => match w.finish(&self.st) {
                Ok(id) => {
                    if let Err(e) = self.reply_file_id(&id) {
                        self.error(&e, cmd::UPLOAD);
                    }
                }
                Err(e) => self.error(&e, cmd::UPLOAD),
            },
            Sink::Block(w) => match w.finish(&self.st) {
                Ok(ack) => self.reply(&[ack as u8]),
                Err(e) => self.error(&e, cmd::UPLOAD_BLOCK),
            },
        }
    }

    fn stat(&mut self, who: &Who, meta: &[u8]) -> Result<(), OpError> {
        let id = proto::decode_file_id(meta).map_err(bad)?;
        let f = self.st.stat(who, &id)?;
        let body = StatReply {
            size: f.size,
            sha256: f.sha256,
            created: f.created,
            block_size: f.block_size,
            name: f.name,
        }
        .encode()
        .map_err(|e| OpError::new(ErrorCode::Internal, e.to_string()))?;
        self.reply(&body);
        Ok(())
    }

    fn download(&mut self, who: &Who, meta: &[u8]) -> Result<(), OpError> {
        let req = DownloadReq::decode(meta).map_err(bad)?;
        let dl = self.st.download(who, &req)?;
        debug!(
            "{}: download {} [{}, +{}) zero copy: {}",
            self.peer, req.file_id, dl.offset, dl.len, dl.zero_copy
        );
        self.out.extend_from_slice(&proto::data_frame_head(
            cmd::REPLY_STORAGE,
            status::OK,
            &dl.crc.to_be_bytes(),
            dl.len,
        ));
        self.sending = Some(Sending {
            off: dl.offset as i64,
            left: dl.len,
            dl,
        });
        Ok(())
    }

    fn idle(&self) -> bool {
        self.dec.is_idle() && matches!(self.sink, Sink::None) && !self.output_pending()
    }
}

/// A field error in a request the decoder accepted: malformed, so the connection closes.
fn bad(e: proto::ProtoError) -> OpError {
    OpError::new(e.code(), e.to_string())
}

impl Conn for ServerConn {
    fn run(&mut self, ev: &Events) -> Step {
        let mut budget = READ_BUDGET;
        loop {
            match self.flush() {
                Flush::Done => {}
                Flush::Blocked => return Step::Keep,
                Flush::Failed => return Step::Close,
            }
            if self.close_after_flush {
                return Step::Close;
            }
            if self.rpos < self.rend {
                self.process();
                continue;
            }
            // Shutting down: finish the frame in flight, then close between frames.
            if (ev.draining || self.eof) && self.idle() {
                return Step::Close;
            }
            if self.eof {
                // The peer closed mid-frame: whatever was in flight is dropped (a block being
                // written is released and stays missing).
                debug!("{}: connection closed in the middle of a frame", self.peer);
                return Step::Close;
            }
            if budget == 0 {
                return Step::Keep;
            }
            self.rpos = 0;
            self.rend = 0;
            match self.sock.read(&mut self.rbuf) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    self.rend = n;
                    budget = budget.saturating_sub(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Keep,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!("{}: read failed: {e}", self.peer);
                    return Step::Close;
                }
            }
        }
    }

    fn sources(&mut self, arm: &mut Arm<'_>) {
        let want = if self.output_pending() {
            Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        arm(0, &mut self.sock, Some(want));
    }

    fn closed(&mut self, why: CloseReason) {
        if !matches!(self.sink, Sink::None) {
            info!(
                "{}: connection closed ({why:?}) during an upload payload; the block stays missing",
                self.peer
            );
        } else {
            debug!("{}: connection closed ({why:?})", self.peer);
        }
        self.sink = Sink::None;
    }
}

/// The server's reactor service: one [`ServerConn`] per accepted connection.
pub struct ServerService {
    pub st: Arc<Storage>,
}

impl Service for ServerService {
    fn accept(&self, stream: TcpStream, peer: SocketAddr, _: usize) -> Option<Box<dyn Conn>> {
        debug!("{peer}: connected");
        Some(Box::new(ServerConn::new(stream, peer, self.st.clone())))
    }

    fn refuse(&self, mut stream: TcpStream, peer: SocketAddr) {
        warn!("{peer}: connection limit reached; refusing");
        let body = ErrorBody::new(ErrorCode::Limit, "too many connections; try later");
        let _ = stream.write(&body.frame(cmd::REPLY_STORAGE));
    }
}
