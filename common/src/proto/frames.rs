//! Typed bodies of every frame, with their byte layouts. All integers are big-endian; identity
//! and name fields are fixed width, UTF-8, NUL-padded (see docs/PROTOCOL.md).

use super::*;

/// Largest HELLO body: version, flags, app id, user id, credential length, credential, and
/// with [`HELLO_ROUTE`] a file id.
pub const HELLO_MAX: usize = 2 + 2 + APP_ID_LEN + USER_ID_LEN + 2 + CREDENTIAL_MAX + FILE_ID_LEN;
/// HELLO flag: the session is about one file, whose id follows the credential; a routing proxy
/// sends the session to the group holding it instead of the user's.
pub const HELLO_ROUTE: u16 = 1;
/// Meta part of a small-file UPLOAD (70): upload key + SHA-256 + name; the file bytes follow.
pub const UPLOAD_META: usize = UPLOAD_ID_LEN + SHA256_LEN + NAME_LEN;
/// Body of UPLOAD_INIT (74).
pub const UPLOAD_INIT_LEN: usize = 8 + 4 + SHA256_LEN + NAME_LEN;
/// Meta part of UPLOAD_BLOCK (76); the block bytes follow.
pub const BLOCK_META: usize = UPLOAD_ID_LEN + 4 + 8 + 4 + 4;
/// Meta part of a DOWNLOAD (72) reply: CRC32C of the bytes that follow.
pub const DOWNLOAD_REPLY_META: usize = 4;
/// Body of a STAT (71) reply.
pub const STAT_REPLY_LEN: usize = 8 + SHA256_LEN + 8 + 4 + NAME_LEN;
/// Body of an UPLOAD_INIT reply.
pub const UPLOAD_INIT_REPLY_LEN: usize = UPLOAD_ID_LEN + 4 + 4 + 1 + 8 + 8;

/// Encodes a whole frame: header then body.
pub fn frame(cmd: u8, status: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&Header::new(cmd, status, body.len() as u64).encode());
    out.extend_from_slice(body);
    out
}

/// Encodes the header and meta of a data frame whose `payload_len` payload bytes follow.
pub fn data_frame_head(cmd: u8, status: u8, meta: &[u8], payload_len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + meta.len());
    let len = meta.len() as u64 + payload_len;
    out.extend_from_slice(&Header::new(cmd, status, len).encode());
    out.extend_from_slice(meta);
    out
}

/// A cursor over a body that turns every short read into [`ProtoError::Truncated`].
pub(super) struct Rd<'a> {
    pub(super) b: &'a [u8],
}

impl<'a> Rd<'a> {
    pub(super) fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], ProtoError> {
        if self.b.len() < n {
            return Err(ProtoError::Truncated(field));
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }
    pub(super) fn u8(&mut self, f: &'static str) -> Result<u8, ProtoError> {
        Ok(self.take(1, f)?[0])
    }
    pub(super) fn u16(&mut self, f: &'static str) -> Result<u16, ProtoError> {
        let b = self.take(2, f)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    pub(super) fn u32(&mut self, f: &'static str) -> Result<u32, ProtoError> {
        let b = self.take(4, f)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub(super) fn u64(&mut self, f: &'static str) -> Result<u64, ProtoError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8, f)?);
        Ok(u64::from_be_bytes(a))
    }
    pub(super) fn array<const N: usize>(&mut self, f: &'static str) -> Result<[u8; N], ProtoError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, f)?);
        Ok(a)
    }
    pub(super) fn fixed_str(
        &mut self,
        width: usize,
        f: &'static str,
    ) -> Result<String, ProtoError> {
        decode_fixed_str(self.take(width, f)?, f)
    }
    /// The body must be used up exactly: trailing bytes mean the peer and we disagree.
    pub(super) fn end(&self, f: &'static str) -> Result<(), ProtoError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::Invalid {
                field: f,
                why: "trailing bytes after the body",
            })
        }
    }
}

/// Decodes a NUL-padded fixed-width string: UTF-8 up to the first NUL, only NULs after it.
/// An empty result is allowed here; callers that need a value check for it.
pub fn decode_fixed_str(raw: &[u8], field: &'static str) -> Result<String, ProtoError> {
    let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
    if raw[end..].iter().any(|&c| c != 0) {
        return Err(ProtoError::NulInside(field));
    }
    let s = std::str::from_utf8(&raw[..end]).map_err(|_| ProtoError::NotUtf8(field))?;
    if s.chars().any(char::is_control) {
        return Err(ProtoError::Invalid {
            field,
            why: "control character",
        });
    }
    Ok(s.to_owned())
}

/// Appends `s` NUL-padded to `width`; refuses values that do not fit or contain NUL.
pub fn put_fixed_str(
    out: &mut Vec<u8>,
    s: &str,
    width: usize,
    field: &'static str,
) -> Result<(), ProtoError> {
    if s.len() > width {
        return Err(ProtoError::Invalid {
            field,
            why: "longer than its field",
        });
    }
    if s.bytes().any(|c| c == 0) {
        return Err(ProtoError::NulInside(field));
    }
    out.extend_from_slice(s.as_bytes());
    out.resize(out.len() + width - s.len(), 0);
    Ok(())
}

pub(super) fn non_empty(s: String, field: &'static str) -> Result<String, ProtoError> {
    if s.is_empty() {
        Err(ProtoError::Empty(field))
    } else {
        Ok(s)
    }
}

/// Which kind of ferry process answered a HELLO or PROBE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    Proxy = 1,
    Server = 2,
}

impl Role {
    fn from_u8(v: u8) -> Result<Self, ProtoError> {
        match v {
            1 => Ok(Role::Proxy),
            2 => Ok(Role::Server),
            _ => Err(ProtoError::Invalid {
                field: "role",
                why: "unknown role",
            }),
        }
    }
}

/// HELLO (1): the first frame of every client session. A routing proxy reads identity from it,
/// and the route: the file the session is about, if any (flag [`HELLO_ROUTE`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub app: String,
    pub user: String,
    pub credential: Vec<u8>,
    pub route: Option<String>,
}

impl Hello {
    pub fn new(app: &str, user: &str, credential: &[u8]) -> Self {
        Hello {
            version: VERSION,
            app: app.to_owned(),
            user: user.to_owned(),
            credential: credential.to_vec(),
            route: None,
        }
    }

    /// The same HELLO for a session about the file `file_id`.
    pub fn for_file(mut self, file_id: &str) -> Self {
        self.route = Some(file_id.to_owned());
        self
    }

    pub fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        if self.credential.len() > CREDENTIAL_MAX {
            return Err(ProtoError::Invalid {
                field: "credential",
                why: "longer than 512 bytes",
            });
        }
        let flags = if self.route.is_some() { HELLO_ROUTE } else { 0 };
        let mut b = Vec::with_capacity(HELLO_MAX);
        b.extend_from_slice(&self.version.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        put_fixed_str(&mut b, &self.app, APP_ID_LEN, "app id")?;
        put_fixed_str(&mut b, &self.user, USER_ID_LEN, "user id")?;
        b.extend_from_slice(&(self.credential.len() as u16).to_be_bytes());
        b.extend_from_slice(&self.credential);
        if let Some(id) = &self.route {
            if id.is_empty() {
                return Err(ProtoError::Empty("route file id"));
            }
            put_fixed_str(&mut b, id, FILE_ID_LEN, "route file id")?;
        }
        Ok(b)
    }

    /// Decodes a HELLO body. The version is checked first so that a peer speaking another
    /// version gets [`ProtoError::Version`], not a confusing field error.
    pub fn decode(body: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Rd { b: body };
        let version = r.u16("version")?;
        if version != VERSION {
            return Err(ProtoError::Version(version));
        }
        let flags = r.u16("flags")?;
        if flags & !HELLO_ROUTE != 0 {
            return Err(ProtoError::Invalid {
                field: "flags",
                why: "unknown HELLO flag",
            });
        }
        let app = non_empty(r.fixed_str(APP_ID_LEN, "app id")?, "app id")?;
        let user = non_empty(r.fixed_str(USER_ID_LEN, "user id")?, "user id")?;
        let n = r.u16("credential length")? as usize;
        if n > CREDENTIAL_MAX {
            return Err(ProtoError::Invalid {
                field: "credential",
                why: "longer than 512 bytes",
            });
        }
        let credential = r.take(n, "credential")?.to_vec();
        let route = if flags & HELLO_ROUTE != 0 {
            Some(non_empty(
                r.fixed_str(FILE_ID_LEN, "route file id")?,
                "route file id",
            )?)
        } else {
            None
        };
        r.end("HELLO")?;
        Ok(Hello {
            version,
            app,
            user,
            credential,
            route,
        })
    }
}

/// Reply to HELLO and PROBE: who answered, and which version it speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub version: u16,
    pub role: Role,
}

impl Identity {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.version.to_be_bytes().to_vec();
        b.push(self.role as u8);
        b
    }
    pub fn decode(body: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Rd { b: body };
        let version = r.u16("version")?;
        let role = Role::from_u8(r.u8("role")?)?;
        r.end("identity")?;
        Ok(Identity { version, role })
    }
}

/// PROBE (2) body: the prober's version.
pub fn probe_body() -> Vec<u8> {
    VERSION.to_be_bytes().to_vec()
}

/// Decodes a PROBE body.
pub fn decode_probe(body: &[u8]) -> Result<u16, ProtoError> {
    let mut r = Rd { b: body };
    let v = r.u16("version")?;
    r.end("PROBE")?;
    Ok(v)
}

/// Error body (status 1): code, then at most 1024 bytes of UTF-8 text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub text: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, text: impl Into<String>) -> Self {
        let mut text = text.into();
        if text.len() > ERROR_TEXT_MAX {
            let mut cut = ERROR_TEXT_MAX;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        ErrorBody { code, text }
    }
    pub fn encode(&self) -> Vec<u8> {
        let mut b = (self.code as u16).to_be_bytes().to_vec();
        b.extend_from_slice(self.text.as_bytes());
        b
    }
    pub fn decode(body: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Rd { b: body };
        let raw = r.u16("error code")?;
        let code = ErrorCode::from_u16(raw).ok_or(ProtoError::Invalid {
            field: "error code",
            why: "unknown code",
        })?;
        if r.b.len() > ERROR_TEXT_MAX {
            return Err(ProtoError::Invalid {
                field: "error text",
                why: "over 1024 bytes",
            });
        }
        let text = std::str::from_utf8(r.b).map_err(|_| ProtoError::NotUtf8("error text"))?;
        Ok(ErrorBody {
            code,
            text: text.to_owned(),
        })
    }
    /// A whole error frame with the given reply command.
    pub fn frame(&self, reply_cmd: u8) -> Vec<u8> {
        frame(reply_cmd, status::ERROR, &self.encode())
    }
}

/// A file id field (STAT 71, DELETE 73, DOWNLOAD_OVER 79 bodies, and replies that name a file).
pub fn encode_file_id(id: &str) -> Result<Vec<u8>, ProtoError> {
    let mut b = Vec::with_capacity(FILE_ID_LEN);
    put_fixed_str(&mut b, id, FILE_ID_LEN, "file id")?;
    Ok(b)
}

/// Decodes a body that is exactly one file id.
pub fn decode_file_id(body: &[u8]) -> Result<String, ProtoError> {
    let mut r = Rd { b: body };
    let id = non_empty(r.fixed_str(FILE_ID_LEN, "file id")?, "file id")?;
    r.end("file id")?;
    Ok(id)
}

/// Meta of a small-file UPLOAD (70). The file bytes follow as payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadMeta {
    /// Chosen by the client at random per file and reused on every retry of it: a repeat of an
    /// upload the server already stored (its reply was lost) gets the same file id back instead
    /// of storing the file twice.
    pub key: [u8; UPLOAD_ID_LEN],
    pub sha256: [u8; SHA256_LEN],
    pub name: String,
}

impl UploadMeta {
    pub fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        let mut b = Vec::with_capacity(UPLOAD_META);
        b.extend_from_slice(&self.key);
        b.extend_from_slice(&self.sha256);
        put_fixed_str(&mut b, &self.name, NAME_LEN, "name")?;
        Ok(b)
    }
    pub fn decode(meta: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Rd { b: meta };
        let key = r.array("upload key")?;
        let sha256 = r.array("sha256")?;
        let name = r.fixed_str(NAME_LEN, "name")?;
        r.end("UPLOAD meta")?;
        Ok(UploadMeta { key, sha256, name })
    }
}

/// Reply to STAT (71).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatReply {
    pub size: u64,
    pub sha256: [u8; SHA256_LEN],
    /// Unix seconds.
    pub created: u64,
    /// Block size the file was stored with; downloads aligned to it are served with zero copy.
    pub block_size: u32,
    pub name: String,
}

impl StatReply {
    pub fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        let mut b = Vec::with_capacity(STAT_REPLY_LEN);
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&self.sha256);
        b.extend_from_slice(&self.created.to_be_bytes());
        b.extend_from_slice(&self.block_size.to_be_bytes());
        put_fixed_str(&mut b, &self.name, NAME_LEN, "name")?;
        Ok(b)
    }
    pub fn decode(body: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Rd { b: body };
        let size = r.u64("size")?;
        let sha256 = r.array("sha256")?;
        let created = r.u64("created")?;
        let block_size = r.u32("block size")?;
        let name = r.fixed_str(NAME_LEN, "name")?;
        r.end("STAT reply")?;
        Ok(StatReply {
            size,
            sha256,
            created,
            block_size,
            name,
        })
    }
}

/// Body of the USAGE (80) reply.
pub const USAGE_REPLY_LEN: usize = 32;

/// Reply to USAGE (80): what the session's user stores (every group of a cluster) and the
/// app's quotas (0: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UsageReply {
    pub bytes: u64,
    pub files: u64,
    pub max_bytes: u64,
    pub max_files: u64,
}

impl UsageReply {
    pub fn encode(&self) -> Vec<u8> {
        [self.bytes, self.files, self.max_bytes, self.max_files]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect()
    }
    pub fn decode(body: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Rd { b: body };
        let reply = UsageReply {
            bytes: r.u64("bytes")?,
            files: r.u64("files")?,
            max_bytes: r.u64("max bytes")?,
            max_files: r.u64("max files")?,
        };
        r.end("USAGE reply")?;
        Ok(reply)
    }
}

/// DOWNLOAD (72): a range of a stored file. The reply is a data frame: CRC32C meta + bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadReq {
    pub file_id: String,
    pub offset: u64,
    pub len: u64,
}

impl DownloadReq {
    pub fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        let mut b = encode_file_id(&self.file_id)?;
        b.extend_from_slice(&self.offset.to_be_bytes());
        b.extend_from_slice(&self.len.to_be_bytes());
        Ok(b)
    }
    pub fn decode(body: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Rd { b: body };
        let file_id = non_empty(r.fixed_str(FILE_ID_LEN, "file id")?, "file id")?;
        let offset = r.u64("offset")?;
        let len = r.u64("length")?;
        r.end("DOWNLOAD")?;
        if len > BLOCK_MAX {
            return Err(ProtoError::Invalid {
                field: "length",
                why: "over the 64 MiB block limit",
            });
        }
        if offset.checked_add(len).is_none() {
            return Err(ProtoError::Invalid {
                field: "offset",
                why: "offset + length overflows",
            });
        }
        Ok(DownloadReq {
            file_id,
            offset,
            len,
        })
    }
}

/// UPLOAD_INIT (74): file info that opens (or finds) a big-file upload session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadInit {
    pub size: u64,
    pub block_size: u32,
    pub sha256: [u8; SHA256_LEN],
    pub name: String,
}

impl UploadInit {
    pub fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        let mut b = Vec::with_capacity(UPLOAD_INIT_LEN);
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&self.block_size.to_be_bytes());
        b.extend_from_slice(&self.sha256);
        put_fixed_str(&mut b, &self.name, NAME_LEN, "name")?;
        Ok(b)
    }
    pub fn decode(body: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Rd { b: body };
        let size = r.u64("size")?;
        let block_size = r.u32("block size")?;
        let sha256 = r.array("sha256")?;
        let name = r.fixed_str(NAME_LEN, "name")?;
        r.end("UPLOAD_INIT")?;
        let init = UploadInit {
            size,
            block_size,
            sha256,
            name,
        };
        init.blocks()?;
        Ok(init)
    }
    /// Number of blocks, checking the block size and count limits.
    pub fn blocks(&self) -> Result<u32, ProtoError> {
        if self.block_size < BLOCK_MIN || u64::from(self.block_size) > BLOCK_MAX {
            return Err(ProtoError::Invalid {
                field: "block size",
                why: "outside 64 KiB ..= 64 MiB",
            });
        }
        let n = self.size.div_ceil(u64::from(self.block_size));
        if n == 0 || n > u64::from(BLOCKS_MAX) {
            return Err(ProtoError::Invalid {
                field: "size",
                why: "needs 1 ..= 2^20 blocks",
            });
        }
        Ok(n as u32)
    }
}

/// Reply to UPLOAD_INIT. When the server already stores a file with this SHA-256 and size for
/// the app, it asks for proof of possession: the SHA-256 of `challenge` (offset, length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadInitReply {
    pub upload_id: [u8; UPLOAD_ID_LEN],
    pub block_size: u32,
    pub blocks: u32,
    pub challenge: Option<(u64, u64)>,
}

impl UploadInitReply {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(UPLOAD_INIT_REPLY_LEN);
        b.extend_from_slice(&self.upload_id);
        b.extend_from_slice(&self.block_size.to_be_bytes());
        b.extend_from_slice(&self.blocks.to_be_bytes());
        let (flag, (off, len)) = match self.challenge {
            Some(c) => (1u8, c),
            None => (0u8, (0, 0)),
        };
        b.push(flag);
        b.extend_from_slice(&off.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b
    }
    pub fn decode(body: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Rd { b: body };
        let upload_id = r.array("upload id")?;
        let block_size = r.u32("block size")?;
        let blocks = r.u32("blocks")?;
        let flag = r.u8("challenge flag")?;
        let off = r.u64("challenge offset")?;
        let len = r.u64("challenge length")?;
        r.end("UPLOAD_INIT reply")?;
        let challenge = match flag {
            0 => None,
            1 => Some((off, len)),
            _ => {
                return Err(ProtoError::Invalid {
                    field: "challenge flag",
                    why: "not 0 or 1",
                });
            }
        };
        Ok(UploadInitReply {
            upload_id,
            block_size,
            blocks,
            challenge,
        })
    }
}

/// Decodes a body that is exactly one upload id (UPLOAD_QUERY 75, UPLOAD_OVER 77).
pub fn decode_upload_id(body: &[u8]) -> Result<[u8; UPLOAD_ID_LEN], ProtoError> {
    let mut r = Rd { b: body };
    let id = r.array("upload id")?;
    r.end("upload id")?;
    Ok(id)
}

/// Reply to UPLOAD_QUERY: the block count and a bitmap, bit `i % 8` of byte `i / 8` set when
/// block `i` is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breakpoint {
    pub blocks: u32,
    pub bitmap: Vec<u8>,
}

impl Breakpoint {
    pub fn new(blocks: u32) -> Self {
        Breakpoint {
            blocks,
            bitmap: vec![0; (blocks as usize).div_ceil(8)],
        }
    }
    pub fn has(&self, i: u32) -> bool {
        i < self.blocks && self.bitmap[(i / 8) as usize] & (1 << (i % 8)) != 0
    }
    pub fn set(&mut self, i: u32) {
        if i < self.blocks {
            self.bitmap[(i / 8) as usize] |= 1 << (i % 8);
        }
    }
    pub fn count(&self) -> u32 {
        self.bitmap.iter().map(|b| b.count_ones()).sum()
    }
    pub fn missing(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.blocks).filter(|&i| !self.has(i))
    }
    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.blocks.to_be_bytes().to_vec();
        b.extend_from_slice(&self.bitmap);
        b
    }
    pub fn decode(body: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Rd { b: body };
        let blocks = r.u32("blocks")?;
        if blocks > BLOCKS_MAX {
            return Err(ProtoError::Invalid {
                field: "blocks",
                why: "over 2^20",
            });
        }
        let bitmap = r.take((blocks as usize).div_ceil(8), "bitmap")?.to_vec();
        r.end("breakpoint")?;
        Ok(Breakpoint { blocks, bitmap })
    }
}

/// Meta of UPLOAD_BLOCK (76); `len` block bytes follow, so the body is `BLOCK_META + len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockMeta {
    pub upload_id: [u8; UPLOAD_ID_LEN],
    pub index: u32,
    pub offset: u64,
    pub len: u32,
    pub crc32c: u32,
}

impl BlockMeta {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(BLOCK_META);
        b.extend_from_slice(&self.upload_id);
        b.extend_from_slice(&self.index.to_be_bytes());
        b.extend_from_slice(&self.offset.to_be_bytes());
        b.extend_from_slice(&self.len.to_be_bytes());
        b.extend_from_slice(&self.crc32c.to_be_bytes());
        b
    }
    /// Decodes the meta and checks it against the payload length the header announced.
    pub fn decode(meta: &[u8], payload_len: u64) -> Result<Self, ProtoError> {
        let mut r = Rd { b: meta };
        let m = BlockMeta {
            upload_id: r.array("upload id")?,
            index: r.u32("block index")?,
            offset: r.u64("block offset")?,
            len: r.u32("block length")?,
            crc32c: r.u32("crc32c")?,
        };
        r.end("UPLOAD_BLOCK meta")?;
        if u64::from(m.len) != payload_len {
            return Err(ProtoError::BadLength {
                cmd: "UPLOAD_BLOCK",
                len: payload_len,
                expected: u64::from(m.len),
            });
        }
        Ok(m)
    }
}

/// Reply to UPLOAD_BLOCK: whether this copy was written or the block was already stored (fencing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BlockAck {
    Written = 0,
    AlreadyStored = 1,
}

impl BlockAck {
    pub fn decode(body: &[u8]) -> Result<Self, ProtoError> {
        match body {
            [0] => Ok(BlockAck::Written),
            [1] => Ok(BlockAck::AlreadyStored),
            _ => Err(ProtoError::Invalid {
                field: "block ack",
                why: "not one byte of 0 or 1",
            }),
        }
    }
}

/// UPLOAD_PROVE (78): the SHA-256 of the challenged range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prove {
    pub upload_id: [u8; UPLOAD_ID_LEN],
    pub sha256: [u8; SHA256_LEN],
}

impl Prove {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.upload_id.to_vec();
        b.extend_from_slice(&self.sha256);
        b
    }
    pub fn decode(body: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Rd { b: body };
        let p = Prove {
            upload_id: r.array("upload id")?,
            sha256: r.array("sha256")?,
        };
        r.end("UPLOAD_PROVE")?;
        Ok(p)
    }
}

/// Decodes a DOWNLOAD reply meta (the CRC32C of the payload).
pub fn decode_download_meta(meta: &[u8]) -> Result<u32, ProtoError> {
    let mut r = Rd { b: meta };
    let crc = r.u32("crc32c")?;
    r.end("DOWNLOAD reply meta")?;
    Ok(crc)
}
