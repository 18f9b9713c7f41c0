//! A streaming frame decoder that accepts bytes in any chunking: one byte at a time (slow
//! senders), frames split anywhere, or many frames in one read (seed 001's "sticky packets").
//!
//! Header and meta bytes are gathered in a small internal buffer whose size is bounded by the
//! command's [`BodySpec`], checked as soon as the header is complete, so a hostile length never
//! causes an allocation. Payload bytes are handed out as slices of the caller's input, never
//! copied or buffered here.

use super::*;

/// What the decoder produced from the input it consumed.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole control frame, or the header and meta of a data frame whose `payload_len`
    /// payload bytes follow as [`Decoded::Payload`] pieces.
    Frame {
        header: Header,
        meta: Vec<u8>,
        payload_len: u64,
    },
    /// The next piece of the current payload; `last` marks its final piece.
    Payload { data: &'a [u8], last: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Header,
    Meta {
        header: Header,
        meta_len: usize,
        payload_len: u64,
    },
    Payload {
        remaining: u64,
    },
}

/// Decodes a stream of frames. Direction is set by the spec function: requests (checked
/// against [`request_spec`]) or the replies a client expects.
pub struct Decoder {
    spec: fn(u8) -> Option<BodySpec>,
    accept_errors: bool,
    buf: Vec<u8>,
    state: State,
}

/// Error frames may come back for any request: a code and up to 1024 bytes of text.
const ERROR_SPEC: BodySpec = BodySpec {
    meta: 2 + ERROR_TEXT_MAX,
    exact: false,
    payload_max: 0,
};

impl Decoder {
    /// A decoder for request frames (server and proxy side): status must be 0.
    pub fn requests() -> Self {
        Decoder {
            spec: request_spec,
            accept_errors: false,
            buf: Vec::new(),
            state: State::Header,
        }
    }

    /// A decoder for reply frames whose layout `spec` gives by command; error frames (status 1)
    /// are accepted for any command.
    pub fn replies(spec: fn(u8) -> Option<BodySpec>) -> Self {
        Decoder {
            spec,
            accept_errors: true,
            buf: Vec::new(),
            state: State::Header,
        }
    }

    /// True between frames: no partial header, meta or payload is pending.
    pub fn is_idle(&self) -> bool {
        self.state == State::Header && self.buf.is_empty()
    }

    /// Consumes a prefix of `input` and returns how many bytes it used, plus a decoded item
    /// when one is complete. Call again with the rest until the input is used up.
    pub fn decode<'a>(
        &mut self,
        input: &'a [u8],
    ) -> Result<(usize, Option<Decoded<'a>>), ProtoError> {
        match self.state {
            State::Header => {
                let n = (HEADER_LEN - self.buf.len()).min(input.len());
                self.buf.extend_from_slice(&input[..n]);
                if self.buf.len() < HEADER_LEN {
                    return Ok((n, None));
                }
                let mut raw = [0u8; HEADER_LEN];
                raw.copy_from_slice(&self.buf);
                self.buf.clear();
                let header = Header::decode(&raw);
                let (meta_len, payload_len) = self.check(&header)?;
                if meta_len == 0 {
                    return Ok((n, Some(self.finish_meta(header, payload_len))));
                }
                self.buf.reserve_exact(meta_len);
                self.state = State::Meta {
                    header,
                    meta_len,
                    payload_len,
                };
                Ok((n, None))
            }
            State::Meta {
                header,
                meta_len,
                payload_len,
            } => {
                let n = (meta_len - self.buf.len()).min(input.len());
                self.buf.extend_from_slice(&input[..n]);
                if self.buf.len() < meta_len {
                    return Ok((n, None));
                }
                Ok((n, Some(self.finish_meta(header, payload_len))))
            }
            State::Payload { remaining } => {
                let n = remaining.min(input.len() as u64) as usize;
                let left = remaining - n as u64;
                self.state = if left == 0 {
                    State::Header
                } else {
                    State::Payload { remaining: left }
                };
                if n == 0 {
                    return Ok((0, None));
                }
                Ok((
                    n,
                    Some(Decoded::Payload {
                        data: &input[..n],
                        last: left == 0,
                    }),
                ))
            }
        }
    }

    /// Validates a header against its command's spec; returns (meta length, payload length).
    fn check(&self, h: &Header) -> Result<(usize, u64), ProtoError> {
        let name = cmd::name(h.cmd);
        let spec = match h.status {
            status::OK => (self.spec)(h.cmd).ok_or(ProtoError::UnknownCommand(h.cmd))?,
            status::ERROR if self.accept_errors => ERROR_SPEC,
            s => return Err(ProtoError::BadStatus(s)),
        };
        let meta = spec.meta as u64;
        if spec.payload_max == 0 {
            if h.body_len > meta {
                return Err(ProtoError::TooLarge {
                    cmd: name,
                    len: h.body_len,
                    max: meta,
                });
            }
            if spec.exact && h.body_len != meta {
                return Err(ProtoError::BadLength {
                    cmd: name,
                    len: h.body_len,
                    expected: meta,
                });
            }
            return Ok((h.body_len as usize, 0));
        }
        if h.body_len < meta {
            return Err(ProtoError::BadLength {
                cmd: name,
                len: h.body_len,
                expected: meta,
            });
        }
        let payload = h.body_len - meta;
        if payload > spec.payload_max {
            let max = meta + spec.payload_max;
            return Err(ProtoError::TooLarge {
                cmd: name,
                len: h.body_len,
                max,
            });
        }
        Ok((spec.meta, payload))
    }

    fn finish_meta<'a>(&mut self, header: Header, payload_len: u64) -> Decoded<'a> {
        let meta = std::mem::take(&mut self.buf);
        self.state = if payload_len == 0 {
            State::Header
        } else {
            State::Payload {
                remaining: payload_len,
            }
        };
        Decoded::Frame {
            header,
            meta,
            payload_len,
        }
    }
}
