//! One client connection on the reactor: decode requests from a bounded read buffer, stream
//! upload payloads straight to disk, answer with replies and (for downloads) file bytes sent by
//! sendfile(2), all non-blocking.
//!
//! Memory per connection is the read buffer (config `read_buffer_kib`) plus small replies: an
//! UPLOAD or UPLOAD_BLOCK payload goes to the file piece by piece as it is read, and a download
//! payload goes from the page cache to the socket without passing through user space.
//!
//! Replies leave in request order through a queue. A verified block goes to the group-commit
//! syncer ([`crate::syncer`]) and its ack waits in the queue until the block is durable, while
//! the connection reads the next block (at most [`INFLIGHT_MAX`] blocks waiting per connection).
//! The syncer wakes the connection through a pipe registered as the connection's second source.

use crate::access::{Access, Session};
use crate::cluster::Roles;
use crate::outbox::{Outbox, Written};
use crate::storage::{BlockStart, BlockWriter, OpError, SmallStart, SmallWriter, Storage, Who};
use crate::syncer::{AckSlot, SyncJob};
use crate::tenants::Slot;
use crossbeam_channel::Sender;
use ferry_common::proto::{
    self, BlockAck, BlockMeta, Command, ConnCmd, Decoded, Decoder, DownloadReq, ErrorBody,
    ErrorCode, FileCmd, Header, Hello, Identity, NodeHello, Prove, Role, SaddrsReq, StatReply,
    TrackerCmd, UploadInit, UploadMeta, UsersReq, cmd, status,
};
use ferry_common::reactor::{Arm, CloseReason, Conn, Events, Service, Step};
use ferry_common::token::Scope;
use log::{debug, info, warn};
use mio::Interest;
use mio::net::TcpStream;
use mio::unix::pipe;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
/// Blocks of one connection waiting for the syncer; past this the connection stops reading.
pub const INFLIGHT_MAX: usize = 4;
/// Replies queued behind a waiting ack or a download; past this the connection stops reading.
const QUEUE_MAX: usize = 32;

/// A reply waiting for its turn.
enum OutItem {
    Bytes(Vec<u8>),
    /// A download: opened (file and CRC) only when it is the next reply to go out, then
    /// header + CRC meta and the range by sendfile. So a peer that stops reading holds one
    /// open file at most and costs no work for the requests queued behind.
    Download(Who, DownloadReq),
    /// A block's ack, filled in by the syncer.
    Ack(Arc<AckSlot>),
}

pub struct ServerConn {
    sock: TcpStream,
    peer: SocketAddr,
    st: Arc<Storage>,
    roles: Arc<Roles>,
    access: Arc<Access>,
    dec: Decoder,
    rbuf: Vec<u8>,
    rpos: usize,
    rend: usize,
    out: Outbox,
    /// Replies after `out`, in request order.
    queue: VecDeque<OutItem>,
    /// Acks in `queue` not yet filled in by the syncer.
    inflight: usize,
    syncer: Sender<SyncJob>,
    wake_tx: Arc<pipe::Sender>,
    wake_rx: pipe::Receiver,
    /// What the peer has proved (LINK, HELLO token).
    session: Session,
    /// The session's place in its app's and user's connection counts, from HELLO on.
    slot: Option<Slot>,
    sink: Sink,
    /// A malformed frame was answered: close once the error frame is out.
    close_after_flush: bool,
    eof: bool,
    /// The deadline that guards against a slow peer right now, if any.
    guard: Option<(Instant, Guard)>,
    /// Whole frames received other than LINK (the first one ends the HELLO guard, unless it
    /// and every one after it is a PROBE from an unlinked peer: see [`ServerConn::stranger`]).
    frames: u32,
    /// Of those, PROBEs.
    probes: u32,
    /// Payload bytes received since the progress guard was last renewed.
    progress: u64,
}

/// What a connection's deadline guards (config `hello_timeout_ms`, `frame_timeout_ms`,
/// `progress_timeout_ms`). Between frames there is none: the reactor's idle timeout applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Guard {
    Hello,
    Frame,
    Progress,
}

/// Payload a stream must bring per progress window to keep its connection.
const PROGRESS_BYTES: u64 = 64 * 1024;

enum Flush {
    Done,
    Blocked,
    /// Everything writable is written; the next reply waits for the syncer.
    Waiting,
    Failed,
}

impl ServerConn {
    pub fn new(
        sock: TcpStream,
        peer: SocketAddr,
        st: Arc<Storage>,
        roles: Arc<Roles>,
        access: Arc<Access>,
        syncer: Sender<SyncJob>,
        (wake_tx, wake_rx): (pipe::Sender, pipe::Receiver),
    ) -> Self {
        let rbuf = vec![0u8; st.cfg.read_buffer_kib * 1024];
        let st_hello_ms = st.cfg.hello_timeout_ms;
        ServerConn {
            sock,
            peer,
            st,
            roles,
            access,
            dec: Decoder::requests(),
            rbuf,
            rpos: 0,
            rend: 0,
            out: Outbox::default(),
            queue: VecDeque::new(),
            inflight: 0,
            syncer,
            wake_tx: Arc::new(wake_tx),
            wake_rx,
            session: Session::default(),
            slot: None,
            sink: Sink::None,
            close_after_flush: false,
            eof: false,
            guard: Some((
                Instant::now() + Duration::from_millis(st_hello_ms),
                Guard::Hello,
            )),
            frames: 0,
            probes: 0,
            progress: 0,
        }
    }

    /// Bytes or a file range are being written to the socket.
    fn writing(&self) -> bool {
        self.out.busy()
    }

    fn output_pending(&self) -> bool {
        self.writing() || !self.queue.is_empty()
    }

    /// Whether decoding more requests is allowed now (bounds on queued replies and blocks).
    fn can_take_input(&self) -> bool {
        !self.close_after_flush
            && self.out.buffered() < OUT_HIGH
            && self.queue.len() < QUEUE_MAX
            && self.inflight < INFLIGHT_MAX
    }

    /// Queues a reply behind everything before it.
    fn push(&mut self, item: OutItem) {
        match item {
            OutItem::Bytes(b) if self.queue.is_empty() && !self.out.sending_file() => {
                self.out.extend(&b)
            }
            item => self.queue.push_back(item),
        }
    }

    fn push_bytes(&mut self, b: Vec<u8>) {
        self.push(OutItem::Bytes(b));
    }

    fn reply(&mut self, body: &[u8]) {
        self.push_bytes(proto::frame(cmd::REPLY_STORAGE, status::OK, body));
    }

    fn error(&mut self, e: &OpError, req: u8) {
        self.error_as(e, req, cmd::REPLY_STORAGE);
    }

    /// An error reply with the reply command of the role that answers (`REPLY_*`).
    fn error_as(&mut self, e: &OpError, req: u8, reply_cmd: u8) {
        let f = self.error_frame(e, req, reply_cmd);
        self.push_bytes(f);
    }

    /// The frame of an error reply; an error that ends the session closes the connection
    /// once it is out.
    fn error_frame(&mut self, e: &OpError, req: u8, reply_cmd: u8) -> Vec<u8> {
        if e.code.ends_session() {
            warn!("{}: {} refused ({e}); closing", self.peer, cmd::name(req));
            self.close_after_flush = true;
        } else {
            debug!("{}: {} failed: {e}", self.peer, cmd::name(req));
        }
        ErrorBody::new(e.code, e.text.clone()).frame(reply_cmd)
    }

    /// Opens a download that is next to go out and starts it (or its error).
    fn start_download(&mut self, who: &Who, req: &DownloadReq) {
        match self.st.download(who, req) {
            Ok(dl) => {
                debug!(
                    "{}: download {} [{}, +{}) ({} bytes read for its CRC)",
                    self.peer, req.file_id, dl.offset, dl.len, dl.read
                );
                let head = proto::data_frame_head(
                    cmd::REPLY_STORAGE,
                    status::OK,
                    &dl.crc.to_be_bytes(),
                    dl.len,
                );
                self.out
                    .start(head, Some((Arc::new(dl.file), dl.offset, dl.len)));
            }
            Err(e) => {
                let f = self.error_frame(&e, cmd::DOWNLOAD, cmd::REPLY_STORAGE);
                self.out.start(f, None);
            }
        }
    }

    fn flush(&mut self) -> Flush {
        loop {
            match self.out.write(&self.sock, self.peer, u64::MAX) {
                Written::Done => {}
                Written::Blocked => return Flush::Blocked,
                Written::Failed => return Flush::Failed,
            }
            let next = match self.queue.front() {
                None => return Flush::Done,
                Some(OutItem::Ack(slot)) => match slot.take() {
                    Some(r) => {
                        self.inflight -= 1;
                        match r {
                            Ok(ack) => proto::frame(cmd::REPLY_STORAGE, status::OK, &[ack as u8]),
                            Err(e) => {
                                debug!("{}: block failed: {e}", self.peer);
                                ErrorBody::new(e.code, e.text).frame(cmd::REPLY_STORAGE)
                            }
                        }
                    }
                    None => return Flush::Waiting,
                },
                Some(_) => Vec::new(),
            };
            match self.queue.pop_front() {
                Some(OutItem::Bytes(b)) => self.out.start(b, None),
                Some(OutItem::Download(who, req)) => self.start_download(&who, &req),
                Some(OutItem::Ack(_)) => self.out.start(next, None),
                None => {}
            }
        }
    }

    /// Decodes what is buffered until it is used up or replies need flushing first.
    fn process(&mut self) {
        let buf = std::mem::take(&mut self.rbuf);
        while self.rpos < self.rend && self.can_take_input() {
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
                        }) => {
                            if header.cmd != cmd::LINK {
                                self.frames = self.frames.saturating_add(1);
                            }
                            if header.cmd == cmd::PROBE {
                                self.probes = self.probes.saturating_add(1);
                            }
                            self.on_frame(header, &meta, payload_len)
                        }
                        Some(Decoded::Payload { data, last }) => self.on_payload(data, last),
                    }
                }
            }
        }
        self.rbuf = buf;
    }

    fn on_frame(&mut self, h: Header, meta: &[u8], payload_len: u64) {
        // The one authorization step: every command passes it before anything else.
        if let Err(e) = self.access.authorize(h.cmd, &self.session) {
            return self.error(&e, h.cmd);
        }
        // `authorize` refused every number that is no command.
        let Some(c) = Command::from_u8(h.cmd) else {
            let e = OpError::new(ErrorCode::Internal, "authorized an unknown command");
            return self.error(&e, h.cmd);
        };
        match c {
            Command::Conn(ConnCmd::Probe) => {
                self.reply(
                    &Identity {
                        version: proto::VERSION,
                        role: Role::Server,
                    }
                    .encode(),
                );
            }
            Command::Conn(ConnCmd::Link) => {
                let e = if self.frames > 0 || self.session.link.is_some() {
                    OpError::new(
                        ErrorCode::BadFrame,
                        "LINK must be a connection's first frame",
                    )
                } else {
                    match self.access.link(self.peer, meta) {
                        Ok(link) => {
                            if let Some(k) = &link {
                                debug!("{}: linked with key {k}", self.peer);
                            }
                            self.session.link = link;
                            return;
                        }
                        Err(e) => e,
                    }
                };
                self.error(&e, h.cmd)
            }
            Command::Conn(ConnCmd::Hello) => {
                if self.session.who.is_some() {
                    let e = OpError::new(ErrorCode::BadFrame, "HELLO already received");
                    return self.error(&e, h.cmd);
                }
                let r = Hello::decode(meta)
                    .map_err(bad)
                    .and_then(|hello| self.access.hello(self.peer, &hello))
                    .and_then(|(who, grant)| {
                        let slot = self.access.admit(&who).inspect_err(|_| {
                            // A full share: this connection has nothing more to do.
                            self.close_after_flush = true;
                        })?;
                        Ok((who, grant, slot))
                    });
                match r {
                    Ok((who, grant, slot)) => {
                        self.slot = Some(slot);
                        debug!(
                            "{}: session for app {} user {} (scope {:#b}, limits {:?})",
                            self.peer, who.app, who.user, grant.scope.0, grant.limits
                        );
                        self.session.who = Some((who, grant));
                        self.reply(
                            &Identity {
                                version: proto::VERSION,
                                role: Role::Server,
                            }
                            .encode(),
                        );
                    }
                    Err(e) => self.error(&e, h.cmd),
                }
            }
            Command::Tracker(t) => self.cluster(t, meta),
            Command::File(f) => self.file_command(f, meta, payload_len),
            // `authorize` refused these (no need: not a request).
            Command::Reply(_) => {
                let e = OpError::new(ErrorCode::Internal, "authorized a reply");
                self.error(&e, h.cmd)
            }
        }
    }

    /// A command of a user's session on files (the data plane).
    fn file_command(&mut self, f: FileCmd, meta: &[u8], payload_len: u64) {
        let req = f as u8;
        // `authorize` let a file command through, so the session has passed HELLO.
        let Some((who, grant)) = self.session.who.clone() else {
            let e = OpError::new(ErrorCode::Internal, "file command without a session");
            return self.error(&e, req);
        };
        // A delegated token's expiry and limits (a malformed body is the command's own error).
        if let Err(e) = grant.live(ferry_common::clock::now_secs()) {
            return self.error(&e, req);
        }
        let named = match f {
            FileCmd::Stat | FileCmd::Delete | FileCmd::DownloadOver => {
                proto::decode_file_id(meta).ok()
            }
            FileCmd::Download => DownloadReq::decode(meta).ok().map(|r| r.file_id),
            FileCmd::Upload
            | FileCmd::UploadInit
            | FileCmd::UploadQuery
            | FileCmd::UploadBlock
            | FileCmd::UploadOver
            | FileCmd::UploadProve
            | FileCmd::Usage => None,
        };
        let limited = match (&named, f) {
            (Some(id), FileCmd::Delete) => grant.may_name(id),
            (Some(id), _) => grant
                .may_name(id)
                .and_then(|()| self.st.may_read(&who, id, &grant)),
            (None, FileCmd::UploadInit) => {
                UploadInit::decode(meta).map_or(Ok(()), |i| grant.may_upload(i.size))
            }
            _ => Ok(()),
        };
        if let Err(e) = limited {
            return self.error(&e, req);
        }
        let r = match f {
            FileCmd::Upload => match grant.may_upload(payload_len) {
                Ok(()) => self.start_small(&who, meta, payload_len),
                // The payload still has to be read to stay in step with the stream.
                Err(e) => {
                    self.discard(
                        payload_len,
                        ErrorBody::new(e.code, e.text).frame(cmd::REPLY_STORAGE),
                    );
                    Ok(())
                }
            },
            FileCmd::UploadBlock => self.start_block(&who, meta, payload_len),
            FileCmd::Stat => self.stat(&who, meta),
            FileCmd::Download => self.download(&who, meta),
            FileCmd::Delete => proto::decode_file_id(meta)
                .map_err(bad)
                .and_then(|id| {
                    self.st
                        .delete(&who, &id, grant.scope.contains(Scope::ADMIN))
                })
                .map(|()| self.reply(&[])),
            FileCmd::DownloadOver => proto::decode_file_id(meta)
                .map_err(bad)
                .and_then(|id| self.st.download_over(&who, &id))
                .map(|()| self.reply(&[])),
            FileCmd::UploadInit => UploadInit::decode(meta)
                .map_err(bad)
                .and_then(|init| self.st.init(&who, &init))
                .map(|r| self.reply(&r.encode())),
            FileCmd::UploadQuery => proto::decode_upload_id(meta)
                .map_err(bad)
                .and_then(|id| self.st.query(&who, &id))
                .map(|b| self.reply(&b.encode())),
            FileCmd::UploadOver => proto::decode_upload_id(meta)
                .map_err(bad)
                .and_then(|id| self.st.over(&who, &id))
                .and_then(|fid| self.reply_file_id(&fid)),
            FileCmd::Usage => self.st.usage_reply(&who).map(|u| self.reply(&u.encode())),
            FileCmd::UploadProve => Prove::decode(meta)
                .map_err(bad)
                .and_then(|p| self.st.prove(&who, &p.upload_id, &p.sha256))
                .and_then(|fid| self.reply_file_id(&fid)),
        };
        if let Err(e) = r {
            self.error(&e, req);
        }
    }

    /// The tracker commands: no HELLO needed; error 3 when the role is not enabled.
    fn cluster(&mut self, c: TrackerCmd, meta: &[u8]) {
        let (req, reply_cmd) = (c as u8, cmd::REPLY_TRACKER);
        let roles = self.roles.clone();
        let Some(t) = &roles.tracker else {
            // Like any command this server does not know: its own reply command.
            let e = OpError::new(
                ErrorCode::UnknownCommand,
                format!("{} is not served here (role not enabled)", cmd::name(req)),
            );
            return self.error(&e, req);
        };
        let r = match c {
            TrackerCmd::Join => NodeHello::decode_join(meta)
                .map_err(bad)
                .and_then(|j| self.node_claim(req, j))
                .and_then(|j| t.join(&j))
                .and_then(|r| r.encode().map_err(internal)),
            TrackerCmd::Beat => NodeHello::decode_beat(meta)
                .map_err(bad)
                .and_then(|b| self.node_claim(req, b))
                .and_then(|b| t.beat(&b))
                .and_then(|r| r.encode().map_err(internal)),
            TrackerCmd::Saddrs => SaddrsReq::decode(meta)
                .map_err(bad)
                .and_then(|q| t.saddrs(&q))
                .and_then(|r| r.encode().map_err(internal)),
            TrackerCmd::Groups => t.groups().and_then(|r| r.encode().map_err(internal)),
            TrackerCmd::Users => UsersReq::decode(meta)
                .map_err(bad)
                .and_then(|q| t.users(&q))
                .and_then(|r| r.encode().map_err(internal)),
        };
        match r {
            Ok(body) => self.push_bytes(proto::frame(reply_cmd, status::OK, &body)),
            Err(e) => self.error_as(&e, req, reply_cmd),
        }
    }

    /// A JOIN or BEAT passes on only for the group and address the peer's key is bound to.
    fn node_claim(&self, c: u8, n: NodeHello) -> Result<NodeHello, OpError> {
        self.access.node_claim(c, &self.session, &n)?;
        Ok(n)
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
            Ok(SmallStart::Done(id)) => {
                let body = proto::encode_file_id(&id)
                    .map_err(|e| OpError::new(ErrorCode::Internal, e.to_string()))?;
                self.discard(len, proto::frame(cmd::REPLY_STORAGE, status::OK, &body));
                Ok(())
            }
            Ok(SmallStart::Write(w)) => {
                self.sink = Sink::Small(w);
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
            self.push_bytes(reply);
        } else {
            self.sink = Sink::Discard(reply);
        }
    }

    fn on_payload(&mut self, data: &[u8], last: bool) {
        self.progress += data.len() as u64;
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
            Sink::Discard(reply) => self.push_bytes(reply),
            Sink::Small(w) => match w.finish(&self.st) {
                Ok(id) => {
                    if let Err(e) = self.reply_file_id(&id) {
                        self.error(&e, cmd::UPLOAD);
                    }
                }
                Err(e) => self.error(&e, cmd::UPLOAD),
            },
            Sink::Block(w) => match w.verify() {
                Ok(block) => {
                    let slot = Arc::new(AckSlot::default());
                    let job = SyncJob {
                        block,
                        slot: slot.clone(),
                        wake: self.wake_tx.clone(),
                    };
                    match self.syncer.send(job) {
                        Ok(()) => {
                            self.inflight += 1;
                            self.push(OutItem::Ack(slot));
                        }
                        Err(_) => self.error(&crate::syncer::refused(), cmd::UPLOAD_BLOCK),
                    }
                }
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
        // Queued like any reply; the flush opens and starts it once everything before it is out.
        self.push(OutItem::Download(who.clone(), req));
        Ok(())
    }
}

/// A reply we built does not encode: our bug, not the peer's.
fn internal(e: proto::ProtoError) -> OpError {
    OpError::new(ErrorCode::Internal, e.to_string())
}

/// A field error in a request the decoder accepted: malformed, so the connection closes.
fn bad(e: proto::ProtoError) -> OpError {
    OpError::new(e.code(), e.to_string())
}

impl ServerConn {
    /// The peer has sent only PROBEs and proved nothing (no LINK, no HELLO): it keeps the
    /// first-frame deadline, so probing answers a health check but cannot hold a connection.
    fn stranger(&self) -> bool {
        self.frames == self.probes && self.session.link.is_none()
    }

    /// Sets the deadline for what the connection is waiting for now (see [`Guard`]).
    fn update_guard(&mut self) {
        let cfg = &self.st.cfg;
        let in_payload = !matches!(self.sink, Sink::None);
        let want = if self.frames == 0 || self.stranger() {
            Guard::Hello
        } else if in_payload {
            Guard::Progress
        } else if !self.dec.is_idle() {
            Guard::Frame
        } else {
            self.guard = None;
            return;
        };
        let now = Instant::now();
        // While the server itself holds reading back (waiting for the syncer), the peer cannot
        // make progress: the window starts again when reading resumes.
        let renew = match self.guard {
            Some((_, g)) if g == want => {
                (want == Guard::Progress && self.progress >= PROGRESS_BYTES)
                    || (want != Guard::Hello && !self.can_take_input())
            }
            _ => true,
        };
        if renew {
            let ms = match want {
                Guard::Hello => cfg.hello_timeout_ms,
                Guard::Frame => cfg.frame_timeout_ms,
                Guard::Progress => cfg.progress_timeout_ms,
            };
            self.guard = Some((now + Duration::from_millis(ms), want));
            self.progress = 0;
        }
    }

    /// A guard ran out: the peer is told why (best effort: it may not be reading) and the
    /// connection closes.
    fn guard_expired(&mut self, g: Guard) -> Step {
        let cfg = &self.st.cfg;
        let why = match g {
            Guard::Hello => format!("no first frame within {} ms", cfg.hello_timeout_ms),
            Guard::Frame => format!("frame incomplete after {} ms", cfg.frame_timeout_ms),
            Guard::Progress => format!(
                "upload stalled: under {PROGRESS_BYTES} bytes in {} ms",
                cfg.progress_timeout_ms
            ),
        };
        info!("{}: {why}; closing", self.peer);
        if !self.writing() {
            let body = ErrorBody::new(ErrorCode::Limit, why);
            let _ = self.sock.write(&body.frame(cmd::REPLY_STORAGE));
        }
        Step::Close
    }
}

impl Conn for ServerConn {
    fn run(&mut self, ev: &Events) -> Step {
        if let Some((until, g)) = self.guard
            && ev.timer
            && Instant::now() >= until
        {
            return self.guard_expired(g);
        }
        let step = self.serve(ev);
        self.update_guard();
        step
    }

    fn deadline(&self) -> Option<Instant> {
        self.guard.map(|(until, _)| until)
    }

    fn sources(&mut self, arm: &mut Arm<'_>) {
        let sock = if self.writing() {
            Some(Interest::WRITABLE)
        } else if self.eof || !self.can_take_input() {
            // Nothing to read for now: waiting for the syncer (its pipe wakes us) or closing.
            None
        } else {
            Some(Interest::READABLE)
        };
        arm(0, &mut self.sock, sock);
        arm(1, &mut self.wake_rx, Some(Interest::READABLE));
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

impl ServerConn {
    /// Reads, decodes and answers until the socket would block or replies must wait.
    fn serve(&mut self, ev: &Events) -> Step {
        // Wake-ups from the syncer only say "look at the queue", which flush does below.
        let mut drain = [0u8; 64];
        while matches!((&self.wake_rx).read(&mut drain), Ok(n) if n > 0) {}
        let mut budget = READ_BUDGET;
        loop {
            let waiting = match self.flush() {
                Flush::Done => false,
                Flush::Waiting => true,
                Flush::Blocked => return Step::Keep,
                Flush::Failed => return Step::Close,
            };
            if self.close_after_flush {
                // Close once every reply before the error (acks included) is out.
                return if waiting { Step::Keep } else { Step::Close };
            }
            if self.rpos < self.rend {
                if !self.can_take_input() {
                    return Step::Keep; // the syncer's wake-up resumes us
                }
                self.process();
                continue;
            }
            if self.eof || ev.draining {
                let between_frames = self.dec.is_idle() && matches!(self.sink, Sink::None);
                if between_frames {
                    // Closing (peer gone or shutting down): only the acks still owed remain.
                    return if self.output_pending() {
                        Step::Keep
                    } else {
                        Step::Close
                    };
                }
                if self.eof {
                    // The peer closed mid-frame: whatever was in flight is dropped (a block
                    // being written is released and stays missing).
                    debug!("{}: connection closed in the middle of a frame", self.peer);
                    return Step::Close;
                }
            }
            if !self.can_take_input() || budget == 0 {
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
}

/// The server's reactor service: one [`ServerConn`] per accepted connection.
pub struct ServerService {
    pub st: Arc<Storage>,
    /// Which roles answer (storage, tracker, id).
    pub roles: Arc<Roles>,
    /// Who may do what (LINK proofs, HELLO tokens).
    pub access: Arc<Access>,
    pub syncer: Sender<SyncJob>,
    /// The HTTP gateway, serving listener 1 when `[http] listen` is set.
    pub http: Option<Arc<crate::http::Gateway>>,
}

impl Service for ServerService {
    fn accept(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        listener: usize,
    ) -> Option<Box<dyn Conn>> {
        if listener == 1
            && let Some(gw) = &self.http
        {
            return gw.accept(stream, peer);
        }
        debug!("{peer}: connected");
        // The connection's wake-up pipe is its only other descriptor; without it (EMFILE) the
        // peer is told why instead of finding its connection silently closed.
        let wake = match pipe::new() {
            Ok(w) => w,
            Err(e) => {
                warn!("{peer}: cannot set up the connection: {e}");
                let mut stream = stream;
                let body = ErrorBody::new(ErrorCode::Limit, "server out of file descriptors");
                let _ = stream.write(&body.frame(cmd::REPLY_STORAGE));
                return None;
            }
        };
        Some(Box::new(ServerConn::new(
            stream,
            peer,
            self.st.clone(),
            self.roles.clone(),
            self.access.clone(),
            self.syncer.clone(),
            wake,
        )))
    }

    fn refuse(&self, mut stream: TcpStream, peer: SocketAddr) {
        if let Some(gw) = self.http.as_ref().filter(|g| g.owns(&stream)) {
            return gw.refuse(stream, peer);
        }
        warn!("{peer}: connection limit reached; refusing");
        let body = ErrorBody::new(ErrorCode::Limit, "too many connections; try later");
        let _ = stream.write(&body.frame(cmd::REPLY_STORAGE));
    }
}
