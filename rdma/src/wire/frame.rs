//! Frames on an endpoint's TCP connection after the handshake: the tcp backend's one-sided
//! writes and their acknowledgements, and (both backends) control messages and heartbeats.
//!
//! ```text
//! common header (8 bytes, little endian)
//!  0      1       2        4                8
//! +------+-------+--------+----------------+
//! | type | flags | 0 (16) | body_len (u32) |
//! +------+-------+--------+----------------+
//! WRITE     (1)  + key u32 | imm u32 | offset u64       (24-byte header), then body_len data bytes
//!                  flags: 0x01 IMM (imm is valid; imm must be 0 without it); body_len <= WRITE_BYTES_MAX
//! MSG       (2)  body_len (<= MSG_BYTES_MAX) bytes of message
//! HEARTBEAT (3)  body_len 0
//! ACK       (4)  + count u32 | 0 u32                    (16-byte header), body_len 0:
//!                  the receiver placed `count` more writes (cumulative per frame, in order)
//! ```
//!
//! [`decode`] is a pure function of the bytes at hand (fuzzed: `fuzz/fuzz_targets/fabric_frame.rs`):
//! it validates every header field before the caller touches a body, so a hostile length can
//! neither make us allocate nor read past a frame. Whether a write's key and range are allowed is
//! the endpoint's check (`tcp::Exposures::resolve`), made before any byte is placed.

use crate::constants::{MSG_BYTES_MAX, WRITE_BYTES_MAX};

pub const COMMON_HEADER_BYTES: usize = 8;
pub const WRITE_HEADER_BYTES: usize = 24;
pub const ACK_HEADER_BYTES: usize = 16;
/// The longest header of any frame.
pub const HEADER_BYTES_MAX: usize = WRITE_HEADER_BYTES;

pub const TYPE_WRITE: u8 = 1;
pub const TYPE_MSG: u8 = 2;
pub const TYPE_HEARTBEAT: u8 = 3;
pub const TYPE_ACK: u8 = 4;
pub const FLAG_IMM: u8 = 0x01;

/// A decoded frame header. A `Write`'s and a `Msg`'s body (`len` bytes) follows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame {
    Write { key: u32, offset: u64, imm: Option<u32>, len: u32 },
    Msg { len: u32 },
    Heartbeat,
    Ack { count: u32 },
}

impl Frame {
    /// Bytes of body after the header.
    pub fn body_len(&self) -> usize {
        match *self {
            Frame::Write { len, .. } | Frame::Msg { len } => len as usize,
            Frame::Heartbeat | Frame::Ack { .. } => 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// The header is not complete: at least this many bytes in all are needed.
    Need(usize),
    /// A valid header of `header_len` bytes; the body follows.
    Header { frame: Frame, header_len: usize },
}

/// What was wrong with a header; the endpoint is failed with it (and a log line naming the peer).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("frame type {ty} with flags {flags:#04x}")]
    BadFlags { ty: u8, flags: u8 },
    #[error("frame type {0} with non-zero reserved bytes")]
    Reserved(u8),
    #[error("frame type {ty} with body of {len} bytes (at most {max})")]
    BadLength { ty: u8, len: u32, max: usize },
    #[error("write without IMM flag carries immediate {0:#x}")]
    StrayImmediate(u32),
    #[error("acknowledgement of 0 writes")]
    EmptyAck,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Decodes the frame header at the start of `buf`.
pub fn decode(buf: &[u8]) -> Result<Decoded, FrameError> {
    if buf.len() < COMMON_HEADER_BYTES {
        return Ok(Decoded::Need(COMMON_HEADER_BYTES));
    }
    let (ty, flags) = (buf[0], buf[1]);
    if buf[2] != 0 || buf[3] != 0 {
        return Err(FrameError::Reserved(ty));
    }
    let body_len = u32_at(buf, 4);
    let header_len = match ty {
        TYPE_WRITE => WRITE_HEADER_BYTES,
        TYPE_ACK => ACK_HEADER_BYTES,
        TYPE_MSG | TYPE_HEARTBEAT => COMMON_HEADER_BYTES,
        _ => return Err(FrameError::UnknownType(ty)),
    };
    let flags_allowed = if ty == TYPE_WRITE { FLAG_IMM } else { 0 };
    if flags & !flags_allowed != 0 {
        return Err(FrameError::BadFlags { ty, flags });
    }
    let max = match ty {
        TYPE_WRITE => WRITE_BYTES_MAX,
        TYPE_MSG => MSG_BYTES_MAX,
        _ => 0,
    };
    if body_len as usize > max {
        return Err(FrameError::BadLength { ty, len: body_len, max });
    }
    if buf.len() < header_len {
        return Ok(Decoded::Need(header_len));
    }
    let frame = match ty {
        TYPE_WRITE => {
            let key = u32_at(buf, 8);
            let imm = u32_at(buf, 12);
            let offset = u64_at(buf, 16);
            let imm = if flags & FLAG_IMM != 0 {
                Some(imm)
            } else if imm != 0 {
                return Err(FrameError::StrayImmediate(imm));
            } else {
                None
            };
            Frame::Write { key, offset, imm, len: body_len }
        }
        TYPE_MSG => Frame::Msg { len: body_len },
        TYPE_HEARTBEAT => Frame::Heartbeat,
        _ => {
            if u32_at(buf, 12) != 0 {
                return Err(FrameError::Reserved(ty));
            }
            let count = u32_at(buf, 8);
            if count == 0 {
                return Err(FrameError::EmptyAck);
            }
            Frame::Ack { count }
        }
    };
    Ok(Decoded::Header { frame, header_len })
}

/// Writes `frame`'s header into `out` and returns its length. The caller appends the body.
pub fn encode(frame: &Frame, out: &mut [u8; HEADER_BYTES_MAX]) -> usize {
    out.fill(0);
    let (ty, flags, body_len, header_len) = match *frame {
        Frame::Write { imm, len, .. } => {
            (TYPE_WRITE, if imm.is_some() { FLAG_IMM } else { 0 }, len, WRITE_HEADER_BYTES)
        }
        Frame::Msg { len } => (TYPE_MSG, 0, len, COMMON_HEADER_BYTES),
        Frame::Heartbeat => (TYPE_HEARTBEAT, 0, 0, COMMON_HEADER_BYTES),
        Frame::Ack { .. } => (TYPE_ACK, 0, 0, ACK_HEADER_BYTES),
    };
    out[0] = ty;
    out[1] = flags;
    out[4..8].copy_from_slice(&body_len.to_le_bytes());
    match *frame {
        Frame::Write { key, offset, imm, .. } => {
            out[8..12].copy_from_slice(&key.to_le_bytes());
            out[12..16].copy_from_slice(&imm.unwrap_or(0).to_le_bytes());
            out[16..24].copy_from_slice(&offset.to_le_bytes());
        }
        Frame::Ack { count } => out[8..12].copy_from_slice(&count.to_le_bytes()),
        Frame::Msg { .. } | Frame::Heartbeat => {}
    }
    header_len
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(f: Frame) -> Vec<u8> {
        let mut h = [0u8; HEADER_BYTES_MAX];
        let n = encode(&f, &mut h);
        h[..n].to_vec()
    }

    #[test]
    fn round_trip_every_frame() {
        for f in [
            Frame::Write { key: 7, offset: 1 << 40, imm: None, len: 4096 },
            Frame::Write { key: u32::MAX, offset: 0, imm: Some(0), len: 0 },
            Frame::Write { key: 1, offset: 3, imm: Some(0xFFFF_FFFF), len: WRITE_BYTES_MAX as u32 },
            Frame::Msg { len: 0 },
            Frame::Msg { len: MSG_BYTES_MAX as u32 },
            Frame::Heartbeat,
            Frame::Ack { count: 1 },
            Frame::Ack { count: u32::MAX },
        ] {
            let b = enc(f);
            assert_eq!(decode(&b), Ok(Decoded::Header { frame: f, header_len: b.len() }), "{f:?}");
            for cut in 0..b.len() {
                match decode(&b[..cut]) {
                    Ok(Decoded::Need(n)) => assert!(n > cut && n <= b.len(), "{f:?} cut {cut} need {n}"),
                    other => panic!("{f:?} cut at {cut}: {other:?}"),
                }
            }
            let mut longer = b.clone();
            longer.extend_from_slice(&[0xEE; 40]);
            assert_eq!(decode(&longer), Ok(Decoded::Header { frame: f, header_len: b.len() }));
        }
    }

    #[test]
    fn hostile_headers_are_errors() {
        let mut b = enc(Frame::Write { key: 1, offset: 0, imm: None, len: 8 });
        b[4..8].copy_from_slice(&(WRITE_BYTES_MAX as u32 + 1).to_le_bytes());
        assert!(matches!(decode(&b), Err(FrameError::BadLength { .. })));
        let mut b = enc(Frame::Msg { len: 1 });
        b[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&b[..8]), Err(FrameError::BadLength { .. })));
        let mut b = enc(Frame::Heartbeat);
        b[4] = 1;
        assert!(matches!(decode(&b), Err(FrameError::BadLength { .. })));
        let mut b = enc(Frame::Heartbeat);
        b[0] = 9;
        assert_eq!(decode(&b), Err(FrameError::UnknownType(9)));
        let mut b = enc(Frame::Msg { len: 0 });
        b[1] = FLAG_IMM;
        assert!(matches!(decode(&b), Err(FrameError::BadFlags { .. })));
        let mut b = enc(Frame::Msg { len: 0 });
        b[3] = 1;
        assert!(matches!(decode(&b), Err(FrameError::Reserved(_))));
        let mut b = enc(Frame::Write { key: 1, offset: 0, imm: None, len: 0 });
        b[12] = 5;
        assert_eq!(decode(&b), Err(FrameError::StrayImmediate(5)));
        let mut b = enc(Frame::Ack { count: 1 });
        b[8] = 0;
        assert_eq!(decode(&b), Err(FrameError::EmptyAck));
    }
}
