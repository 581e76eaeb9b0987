//! The NVMe/TCP PDU codec (NVMe/TCP transport specification 1.0): common header, the nine
//! PDU types, header and data digests (CRC32C), and validation of every length and offset
//! before a payload is touched.
//!
//! `decode` works on a byte buffer that may hold a partial PDU: it says how many bytes it
//! needs, or returns one whole PDU with the range of its data. Errors carry the fatal error
//! status (FES) and field offset (FEI) that a C2HTermReq/H2CTermReq reports, so the caller can
//! terminate the connection exactly as the spec says without re-deriving why.

use std::ops::Range;

use crate::command::Command;
use crate::completion::Completion;
use crate::constants::{CQE_BYTES, DIGEST_BYTES, PDU_LEN_MAX, SQE_BYTES};
use crate::le;

/// PDU types.
pub mod pdu_type {
    pub const IC_REQ: u8 = 0x00;
    pub const IC_RESP: u8 = 0x01;
    pub const H2C_TERM_REQ: u8 = 0x02;
    pub const C2H_TERM_REQ: u8 = 0x03;
    pub const CAPSULE_CMD: u8 = 0x04;
    pub const CAPSULE_RESP: u8 = 0x05;
    pub const H2C_DATA: u8 = 0x06;
    pub const C2H_DATA: u8 = 0x07;
    pub const R2T: u8 = 0x09;
}

/// Common-header flags.
pub mod flags {
    pub const HDGSTF: u8 = 0x01;
    pub const DDGSTF: u8 = 0x02;
    pub const LAST_PDU: u8 = 0x04;
    /// C2HData: the command completed successfully, no CapsuleResp follows.
    pub const SUCCESS: u8 = 0x08;
}

/// Fatal error status values of a TermReq.
pub mod fes {
    pub const INVALID_HEADER_FIELD: u16 = 0x01;
    pub const PDU_SEQUENCE_ERROR: u16 = 0x02;
    pub const HEADER_DIGEST_ERROR: u16 = 0x03;
    pub const DATA_OUT_OF_RANGE: u16 = 0x04;
    pub const DATA_LIMIT_EXCEEDED: u16 = 0x05;
    pub const UNSUPPORTED_PARAMETER: u16 = 0x06;
}

/// Byte offsets of common-header fields, for FEI.
pub mod field {
    pub const PDU_TYPE: u32 = 0;
    pub const FLAGS: u32 = 1;
    pub const HLEN: u32 = 2;
    pub const PDO: u32 = 3;
    pub const PLEN: u32 = 4;
}

pub const COMMON_HEADER_BYTES: usize = 8;
const IC_HLEN: usize = 128;
const TERM_HLEN: usize = 24;
const CAPSULE_CMD_HLEN: usize = COMMON_HEADER_BYTES + SQE_BYTES;
const CAPSULE_RESP_HLEN: usize = COMMON_HEADER_BYTES + CQE_BYTES;
const DATA_HLEN: usize = 24;
/// Header bytes of an H2CData/C2HData PDU (without header digest).
pub const DATA_HEADER_BYTES: usize = DATA_HLEN;
const R2T_HLEN: usize = 24;
/// A TermReq carries at most this much of the offending PDU's header.
pub const TERM_DATA_MAX: usize = 152;

/// Which digests a connection negotiated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Digests {
    pub header: bool,
    pub data: bool,
}

impl Digests {
    pub fn from_bits(b: u8) -> Digests {
        Digests { header: b & 1 != 0, data: b & 2 != 0 }
    }
    pub fn bits(&self) -> u8 {
        self.header as u8 | (self.data as u8) << 1
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TermReq {
    pub fes: u16,
    pub fei: u32,
}

/// Header of H2CData / C2HData.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataHeader {
    pub cccid: u16,
    /// Transfer tag from the R2T (H2CData only).
    pub ttag: u16,
    pub offset: u32,
    pub length: u32,
    pub last: bool,
    /// C2HData only: the command succeeded and no response capsule follows.
    pub success: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct R2t {
    pub cccid: u16,
    pub ttag: u16,
    pub offset: u32,
    pub length: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pdu {
    IcReq { pfv: u16, hpda: u8, digests: Digests, maxr2t: u32 },
    IcResp { pfv: u16, cpda: u8, digests: Digests, maxh2cdata: u32 },
    H2CTermReq(TermReq),
    C2HTermReq(TermReq),
    CapsuleCmd(Command),
    CapsuleResp(Completion),
    H2CData(DataHeader),
    C2HData(DataHeader),
    R2T(R2t),
}

impl Pdu {
    pub fn type_code(&self) -> u8 {
        match self {
            Pdu::IcReq { .. } => pdu_type::IC_REQ,
            Pdu::IcResp { .. } => pdu_type::IC_RESP,
            Pdu::H2CTermReq(_) => pdu_type::H2C_TERM_REQ,
            Pdu::C2HTermReq(_) => pdu_type::C2H_TERM_REQ,
            Pdu::CapsuleCmd(_) => pdu_type::CAPSULE_CMD,
            Pdu::CapsuleResp(_) => pdu_type::CAPSULE_RESP,
            Pdu::H2CData(_) => pdu_type::H2C_DATA,
            Pdu::C2HData(_) => pdu_type::C2H_DATA,
            Pdu::R2T(_) => pdu_type::R2T,
        }
    }
    pub fn name(&self) -> &'static str {
        type_name(self.type_code())
    }
}

pub fn type_name(t: u8) -> &'static str {
    match t {
        pdu_type::IC_REQ => "ICReq",
        pdu_type::IC_RESP => "ICResp",
        pdu_type::H2C_TERM_REQ => "H2CTermReq",
        pdu_type::C2H_TERM_REQ => "C2HTermReq",
        pdu_type::CAPSULE_CMD => "CapsuleCmd",
        pdu_type::CAPSULE_RESP => "CapsuleResp",
        pdu_type::H2C_DATA => "H2CData",
        pdu_type::C2H_DATA => "C2HData",
        pdu_type::R2T => "R2T",
        _ => "unknown",
    }
}

/// Fixed header length of each type, and whether digests apply to it.
fn layout(t: u8) -> Option<(usize, bool)> {
    Some(match t {
        pdu_type::IC_REQ | pdu_type::IC_RESP => (IC_HLEN, false),
        pdu_type::H2C_TERM_REQ | pdu_type::C2H_TERM_REQ => (TERM_HLEN, false),
        pdu_type::CAPSULE_CMD => (CAPSULE_CMD_HLEN, true),
        pdu_type::CAPSULE_RESP => (CAPSULE_RESP_HLEN, true),
        pdu_type::H2C_DATA | pdu_type::C2H_DATA => (DATA_HLEN, true),
        pdu_type::R2T => (R2T_HLEN, true),
        _ => return None,
    })
}

/// Whether a PDU type may carry data after its header.
fn carries_data(t: u8) -> bool {
    matches!(
        t,
        pdu_type::CAPSULE_CMD
            | pdu_type::H2C_DATA
            | pdu_type::C2H_DATA
            | pdu_type::H2C_TERM_REQ
            | pdu_type::C2H_TERM_REQ
    )
}

/// A malformed PDU: what the TermReq reports, and a reason for the log.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason} (fes {fes:#x}, fei {fei})")]
pub struct PduError {
    pub fes: u16,
    pub fei: u32,
    pub reason: String,
}

impl PduError {
    pub fn new(fes: u16, fei: u32, reason: impl Into<String>) -> PduError {
        PduError { fes, fei, reason: reason.into() }
    }
    fn header(fei: u32, reason: impl Into<String>) -> PduError {
        PduError::new(fes::INVALID_HEADER_FIELD, fei, reason)
    }
}

/// One whole PDU found at the start of a buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub pdu: Pdu,
    /// Where its data (without digest) sits in the buffer; empty when it has none.
    pub data: Range<usize>,
    /// Total bytes of the PDU (PLEN).
    pub len: usize,
    /// False when a data digest was present and did not match: the command fails with a
    /// transient transport error but the connection survives.
    pub data_digest_ok: bool,
}

/// Result of looking at the start of a receive buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// At least this many bytes (in total, from the start) are needed to go on.
    Need(usize),
    Frame(Frame),
}

/// Parses only the common header; validates type, HLEN, PLEN bounds and `max_data`
/// (data bytes this receiver accepts in one PDU). Returns PLEN.
pub fn peek(buf: &[u8], digests: Digests, max_data: usize) -> Result<Option<usize>, PduError> {
    if buf.len() < COMMON_HEADER_BYTES {
        return Ok(None);
    }
    let (t, f, hlen, pdo) = (buf[0], buf[1], buf[2] as usize, buf[3] as usize);
    let plen = le::u32_at(buf, 4) as usize;
    let Some((want_hlen, digestible)) = layout(t) else {
        return Err(PduError::header(field::PDU_TYPE, format!("unknown PDU type {t:#04x}")));
    };
    if hlen != want_hlen {
        return Err(PduError::header(field::HLEN, format!("{} with HLEN {hlen}, expected {want_hlen}", type_name(t))));
    }
    let hdgst = if digestible && digests.header { DIGEST_BYTES } else { 0 };
    if digestible && (f & flags::HDGSTF != 0) != digests.header {
        return Err(PduError::header(
            field::FLAGS,
            format!("{} HDGSTF flag does not match the negotiated header digest", type_name(t)),
        ));
    }
    if plen < hlen + hdgst || plen > PDU_LEN_MAX {
        return Err(PduError::header(field::PLEN, format!("{} with impossible PLEN {plen}", type_name(t))));
    }
    let has_data = plen > hlen + hdgst;
    if has_data && !carries_data(t) {
        return Err(PduError::header(
            field::PLEN,
            format!("{} with PLEN {plen} carries data it may not", type_name(t)),
        ));
    }
    if has_data && !matches!(t, pdu_type::H2C_TERM_REQ | pdu_type::C2H_TERM_REQ) {
        let ddgst = if digests.data { DIGEST_BYTES } else { 0 };
        if (f & flags::DDGSTF != 0) != digests.data {
            return Err(PduError::header(
                field::FLAGS,
                format!("{} DDGSTF flag does not match the negotiated data digest", type_name(t)),
            ));
        }
        if pdo < hlen + hdgst || pdo + ddgst > plen {
            return Err(PduError::header(
                field::PDO,
                format!("{} with PDO {pdo} outside the PDU (HLEN {hlen}, PLEN {plen})", type_name(t)),
            ));
        }
        let data_len = plen - pdo - ddgst;
        if data_len == 0 && ddgst > 0 {
            // A data digest covers data; hosts (Linux, SPDK) send none with no data. Accepting
            // one would leave its four bytes unchecked, or a digest error on nothing.
            return Err(PduError::header(
                field::PLEN,
                format!("{} with a data digest but no data (PDO {pdo}, PLEN {plen})", type_name(t)),
            ));
        }
        if data_len > max_data {
            return Err(PduError::new(
                fes::DATA_LIMIT_EXCEEDED,
                field::PLEN,
                format!("{} carries {data_len} data bytes, more than the {max_data} allowed", type_name(t)),
            ));
        }
    }
    if matches!(t, pdu_type::H2C_TERM_REQ | pdu_type::C2H_TERM_REQ) && plen > hlen + TERM_DATA_MAX {
        return Err(PduError::header(
            field::PLEN,
            format!("{} with PLEN {plen} over the {} allowed", type_name(t), hlen + TERM_DATA_MAX),
        ));
    }
    Ok(Some(plen))
}

/// Decodes the PDU at the start of `buf`. `digests` is what the connection negotiated (both
/// off before ICReq/ICResp); `max_data` bounds the data of one PDU.
pub fn decode(buf: &[u8], digests: Digests, max_data: usize) -> Result<Decoded, PduError> {
    let Some(plen) = peek(buf, digests, max_data)? else {
        return Ok(Decoded::Need(COMMON_HEADER_BYTES));
    };
    if buf.len() < plen {
        return Ok(Decoded::Need(plen));
    }
    let buf = &buf[..plen];
    let head = parse_head(buf, digests, plen)?;
    let data_digest_ok = match head.ddgst {
        true => crc32c::crc32c(&buf[head.data.clone()]) == le::u32_at(buf, head.data.end),
        false => true,
    };
    Ok(Decoded::Frame(Frame { pdu: head.pdu, data: head.data, len: plen, data_digest_ok }))
}

/// The header of a PDU, decoded before its data has arrived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    pub pdu: Pdu,
    /// Where its data (without digest) sits, counted from the PDU's first byte; empty when it
    /// has none. For a TermReq: the echoed header it carries.
    pub data: Range<usize>,
    /// Total bytes of the PDU (PLEN).
    pub len: usize,
    /// A data digest (4 bytes) follows the data.
    pub ddgst: bool,
}

impl Head {
    /// Whether the data is big enough to be worth placing in a caller's buffer as it arrives:
    /// capsule and H2C/C2H data. TermReqs carry at most a header echo, decoded whole.
    pub fn has_payload(&self) -> bool {
        !self.data.is_empty() && !matches!(self.pdu, Pdu::H2CTermReq(_) | Pdu::C2HTermReq(_))
    }
}

/// Result of looking for a header at the start of a receive buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeadDecoded {
    /// At least this many bytes (in total, from the start) are needed to go on.
    Need(usize),
    /// For a PDU with a payload (`Head::has_payload`): its header, header digest and padding
    /// are in the buffer, its data may not be yet. For any other PDU: the whole PDU is.
    Head(Head),
}

/// Decodes the header of the PDU at the start of `buf` without waiting for its data, so a
/// receiver can place the data straight where it belongs (an I/O buffer) as it arrives. Checks
/// everything `decode` checks except the data digest, which the receiver verifies once the data
/// is in place. PDUs without a payload are returned only once whole, as `decode` would.
pub fn decode_head(buf: &[u8], digests: Digests, max_data: usize) -> Result<HeadDecoded, PduError> {
    let Some(plen) = peek(buf, digests, max_data)? else {
        return Ok(HeadDecoded::Need(COMMON_HEADER_BYTES));
    };
    let (t, hlen, pdo) = (buf[0], buf[2] as usize, buf[3] as usize);
    let (_, digestible) = layout(t).unwrap_or((0, false));
    let header_end = hlen + if digestible && digests.header { DIGEST_BYTES } else { 0 };
    let is_term = matches!(t, pdu_type::H2C_TERM_REQ | pdu_type::C2H_TERM_REQ);
    // peek checked header_end <= pdo and pdo + data digest <= plen for PDUs with data, and
    // refused a data digest without data. Only a PDU with at least one data byte is returned
    // before it is whole (padding alone is not a payload).
    let ddgst = if digests.data { DIGEST_BYTES } else { 0 };
    let payload = plen > header_end && !is_term && plen.saturating_sub(pdo + ddgst) > 0;
    let need = if payload { pdo } else { plen };
    if buf.len() < need {
        return Ok(HeadDecoded::Need(need));
    }
    parse_head(&buf[..need], digests, plen).map(HeadDecoded::Head)
}

/// Parses a header that `peek` accepted, given at least its header, header digest and padding
/// (the whole PDU for TermReqs): checks the header digest and DATAL.
fn parse_head(buf: &[u8], digests: Digests, plen: usize) -> Result<Head, PduError> {
    let (t, f, hlen, pdo) = (buf[0], buf[1], buf[2] as usize, buf[3] as usize);
    let (_, digestible) = layout(t).unwrap_or((0, false));
    let hdgst = digestible && digests.header;
    if hdgst {
        let want = crc32c::crc32c(&buf[..hlen]);
        let got = le::u32_at(buf, hlen);
        if want != got {
            return Err(PduError::new(
                fes::HEADER_DIGEST_ERROR,
                0,
                format!("{} header digest {got:#010x}, computed {want:#010x}", type_name(t)),
            ));
        }
    }
    let header_end = hlen + if hdgst { DIGEST_BYTES } else { 0 };
    let (data, ddgst) = if plen == header_end {
        (header_end..header_end, false)
    } else if matches!(t, pdu_type::H2C_TERM_REQ | pdu_type::C2H_TERM_REQ) {
        (hlen..plen, false)
    } else {
        (pdo..plen - if digests.data { DIGEST_BYTES } else { 0 }, digests.data)
    };
    let h = &buf[..hlen];
    let data_header = || DataHeader {
        cccid: le::u16_at(h, 8),
        ttag: le::u16_at(h, 10),
        offset: le::u32_at(h, 12),
        length: le::u32_at(h, 16),
        last: f & flags::LAST_PDU != 0,
        success: f & flags::SUCCESS != 0,
    };
    let pdu = match t {
        pdu_type::IC_REQ => Pdu::IcReq {
            pfv: le::u16_at(h, 8),
            hpda: h[10],
            digests: Digests::from_bits(h[11]),
            maxr2t: le::u32_at(h, 12),
        },
        pdu_type::IC_RESP => Pdu::IcResp {
            pfv: le::u16_at(h, 8),
            cpda: h[10],
            digests: Digests::from_bits(h[11]),
            maxh2cdata: le::u32_at(h, 12),
        },
        pdu_type::H2C_TERM_REQ => Pdu::H2CTermReq(TermReq { fes: le::u16_at(h, 8), fei: le::u32_at(h, 10) }),
        pdu_type::C2H_TERM_REQ => Pdu::C2HTermReq(TermReq { fes: le::u16_at(h, 8), fei: le::u32_at(h, 10) }),
        pdu_type::CAPSULE_CMD => Pdu::CapsuleCmd(Command::from_bytes(&h[COMMON_HEADER_BYTES..])),
        pdu_type::CAPSULE_RESP => Pdu::CapsuleResp(Completion::decode(&h[COMMON_HEADER_BYTES..])),
        pdu_type::H2C_DATA | pdu_type::C2H_DATA => {
            let d = data_header();
            if d.length as usize != data.len() {
                return Err(PduError::new(
                    fes::DATA_OUT_OF_RANGE,
                    16,
                    format!("{} DATAL {} but the PDU carries {} bytes", type_name(t), d.length, data.len()),
                ));
            }
            if t == pdu_type::H2C_DATA {
                Pdu::H2CData(d)
            } else {
                Pdu::C2HData(d)
            }
        }
        pdu_type::R2T => Pdu::R2T(R2t {
            cccid: le::u16_at(h, 8),
            ttag: le::u16_at(h, 10),
            offset: le::u32_at(h, 12),
            length: le::u32_at(h, 16),
        }),
        _ => return Err(PduError::header(field::PDU_TYPE, format!("unknown PDU type {t:#04x}"))),
    };
    Ok(Head { pdu, data, len: plen, ddgst })
}

/// Appends one PDU carrying `data` to `out`. Digests apply where the type allows them.
pub fn encode(pdu: &Pdu, data: &[u8], digests: Digests, out: &mut Vec<u8>) {
    let ddgst = encode_head(pdu, data.len(), digests, out);
    out.extend_from_slice(data);
    if ddgst {
        out.extend_from_slice(&crc32c::crc32c(data).to_le_bytes());
    }
}

/// Appends the header (and header digest) of a PDU whose `data_len` bytes of data the caller
/// sends separately, e.g. straight from an I/O buffer. Returns whether the caller must follow
/// the data with its data digest (`crc32c(data)`, little endian).
pub fn encode_head(pdu: &Pdu, data_len: usize, digests: Digests, out: &mut Vec<u8>) -> bool {
    let t = pdu.type_code();
    let (hlen, digestible) = layout(t).unwrap_or((COMMON_HEADER_BYTES, false));
    let is_term = matches!(t, pdu_type::H2C_TERM_REQ | pdu_type::C2H_TERM_REQ);
    let hdgst = digestible && digests.header;
    let ddgst = digestible && digests.data && data_len > 0;
    let header_end = hlen + if hdgst { DIGEST_BYTES } else { 0 };
    let pdo = if data_len == 0 || is_term { 0 } else { header_end };
    let plen = header_end + data_len + if ddgst { DIGEST_BYTES } else { 0 };
    let mut f = 0u8;
    if hdgst {
        f |= flags::HDGSTF;
    }
    if ddgst {
        f |= flags::DDGSTF;
    }
    let start = out.len();
    out.resize(start + hlen, 0);
    let h = &mut out[start..start + hlen];
    h[0] = t;
    h[2] = hlen as u8;
    h[3] = pdo as u8;
    le::put_u32(h, 4, plen as u32);
    match pdu {
        Pdu::IcReq { pfv, hpda, digests, maxr2t } => {
            le::put_u16(h, 8, *pfv);
            h[10] = *hpda;
            h[11] = digests.bits();
            le::put_u32(h, 12, *maxr2t);
        }
        Pdu::IcResp { pfv, cpda, digests, maxh2cdata } => {
            le::put_u16(h, 8, *pfv);
            h[10] = *cpda;
            h[11] = digests.bits();
            le::put_u32(h, 12, *maxh2cdata);
        }
        Pdu::H2CTermReq(tr) | Pdu::C2HTermReq(tr) => {
            le::put_u16(h, 8, tr.fes);
            le::put_u32(h, 10, tr.fei);
        }
        Pdu::CapsuleCmd(c) => h[COMMON_HEADER_BYTES..].copy_from_slice(&c.0),
        Pdu::CapsuleResp(c) => c.encode(&mut h[COMMON_HEADER_BYTES..]),
        Pdu::H2CData(d) | Pdu::C2HData(d) => {
            if d.last {
                f |= flags::LAST_PDU;
            }
            if d.success {
                f |= flags::SUCCESS;
            }
            le::put_u16(h, 8, d.cccid);
            le::put_u16(h, 10, d.ttag);
            le::put_u32(h, 12, d.offset);
            le::put_u32(h, 16, d.length);
        }
        Pdu::R2T(r) => {
            le::put_u16(h, 8, r.cccid);
            le::put_u16(h, 10, r.ttag);
            le::put_u32(h, 12, r.offset);
            le::put_u32(h, 16, r.length);
        }
    }
    h[1] = f;
    if hdgst {
        let crc = crc32c::crc32c(&out[start..start + hlen]);
        out.extend_from_slice(&crc.to_le_bytes());
    }
    ddgst
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::Status;

    fn all_pdus() -> Vec<(Pdu, Vec<u8>)> {
        let d = DataHeader { cccid: 7, ttag: 3, offset: 4096, length: 10, last: true, success: false };
        vec![
            (Pdu::IcReq { pfv: 0, hpda: 0, digests: Digests { header: true, data: false }, maxr2t: 0 }, vec![]),
            (
                Pdu::IcResp { pfv: 0, cpda: 0, digests: Digests { header: true, data: true }, maxh2cdata: 131072 },
                vec![],
            ),
            (Pdu::H2CTermReq(TermReq { fes: 1, fei: 2 }), vec![9; 24]),
            (Pdu::C2HTermReq(TermReq { fes: 3, fei: 0 }), vec![]),
            (Pdu::CapsuleCmd(Command::new(1, 5)), vec![]),
            (Pdu::CapsuleCmd(Command::new(1, 6)), vec![0xAB; 8192]),
            (Pdu::CapsuleResp(Completion::new(9, Status::LBA_OUT_OF_RANGE)), vec![]),
            (Pdu::H2CData(d), vec![1; 10]),
            (Pdu::C2HData(DataHeader { ttag: 0, success: true, ..d }), vec![2; 10]),
            (Pdu::R2T(R2t { cccid: 1, ttag: 2, offset: 0, length: 65536 }), vec![]),
        ]
    }

    #[test]
    fn round_trip_every_type_with_and_without_digests() {
        for dg in [
            Digests::default(),
            Digests { header: true, data: false },
            Digests { header: true, data: true },
            Digests { header: false, data: true },
        ] {
            for (pdu, data) in all_pdus() {
                let mut out = Vec::new();
                encode(&pdu, &data, dg, &mut out);
                // Every prefix asks for more; never errors, never panics.
                for cut in 0..out.len() {
                    match decode(&out[..cut], dg, 1 << 20).unwrap() {
                        Decoded::Need(n) => assert!(n > cut),
                        Decoded::Frame(f) => panic!("decoded a truncated {:?}", f.pdu),
                    }
                }
                let Decoded::Frame(f) = decode(&out, dg, 1 << 20).unwrap() else { panic!("need more") };
                assert_eq!(f.pdu, pdu);
                assert_eq!(f.len, out.len());
                assert_eq!(&out[f.data.clone()], &data[..]);
                assert!(f.data_digest_ok);
            }
        }
    }

    #[test]
    fn headers_decode_before_their_data() {
        for dg in [Digests::default(), Digests { header: true, data: true }] {
            for (pdu, data) in all_pdus() {
                let mut out = Vec::new();
                encode(&pdu, &data, dg, &mut out);
                let Decoded::Frame(f) = decode(&out, dg, 1 << 20).unwrap() else { panic!("need more") };
                // The shortest prefix that yields the head: the header for data PDUs, else all.
                let mut first = None;
                for cut in 0..=out.len() {
                    match decode_head(&out[..cut], dg, 1 << 20).unwrap() {
                        HeadDecoded::Need(n) => assert!(n > cut, "Need({n}) at {cut}"),
                        HeadDecoded::Head(h) => {
                            first.get_or_insert((cut, h));
                        }
                    }
                }
                let (cut, h) = first.expect("a head");
                assert_eq!((&h.pdu, &h.data, h.len), (&f.pdu, &f.data, f.len));
                assert_eq!(h.ddgst, dg.data && h.has_payload());
                if h.has_payload() {
                    assert_eq!(cut, f.data.start, "{} head needs its data", pdu.name());
                } else {
                    assert_eq!(cut, out.len(), "{} without payload decodes whole", pdu.name());
                }
            }
        }
    }

    #[test]
    fn a_pdu_whose_data_is_only_a_digest_is_rejected() {
        // Found by fuzzing: PLEN leaves room for a data digest and no data. decode_head once
        // returned it whole without checking the digest while decode checked it over nothing;
        // hosts never send one, so both now refuse it as a malformed header.
        let dg = Digests { header: false, data: true };
        let mut out = Vec::new();
        encode(&Pdu::CapsuleCmd(Command::new(1, 5)), &[], dg, &mut out);
        out[1] |= flags::DDGSTF;
        out[3] = 72; // PDO
        out[4..8].copy_from_slice(&76u32.to_le_bytes());
        out.extend_from_slice(&0x1234_5678u32.to_le_bytes());
        for e in [decode(&out, dg, 4096).unwrap_err(), decode_head(&out[..8], dg, 4096).unwrap_err()] {
            assert_eq!((e.fes, e.fei), (fes::INVALID_HEADER_FIELD, field::PLEN), "{e:?}");
        }
    }

    #[test]
    fn bad_header_digest_is_fatal() {
        let dg = Digests { header: true, data: false };
        let mut out = Vec::new();
        encode(&Pdu::CapsuleCmd(Command::new(1, 5)), &[], dg, &mut out);
        out[20] ^= 1;
        assert_eq!(decode(&out, dg, 4096).unwrap_err().fes, fes::HEADER_DIGEST_ERROR);
        assert_eq!(decode_head(&out, dg, 4096).unwrap_err().fes, fes::HEADER_DIGEST_ERROR);
    }

    #[test]
    fn bad_data_digest_is_reported_not_fatal() {
        let dg = Digests { header: false, data: true };
        let mut out = Vec::new();
        encode(&Pdu::CapsuleCmd(Command::new(1, 5)), &[5; 512], dg, &mut out);
        out[100] ^= 1;
        let Decoded::Frame(f) = decode(&out, dg, 4096).unwrap() else { panic!() };
        assert!(!f.data_digest_ok);
    }

    #[test]
    fn malformed_headers_name_the_field() {
        let dg = Digests::default();
        let mut cmd = Vec::new();
        encode(&Pdu::CapsuleCmd(Command::new(1, 5)), &[], dg, &mut cmd);
        type Mutation = Box<dyn Fn(&mut Vec<u8>)>;
        let cases: Vec<(Mutation, u16, u32)> = vec![
            (Box::new(|b| b[0] = 0x42), fes::INVALID_HEADER_FIELD, field::PDU_TYPE),
            (Box::new(|b| b[2] = 71), fes::INVALID_HEADER_FIELD, field::HLEN),
            (Box::new(|b| b[4] = 10), fes::INVALID_HEADER_FIELD, field::PLEN),
            (Box::new(|b| b[1] = flags::HDGSTF), fes::INVALID_HEADER_FIELD, field::FLAGS),
            (Box::new(|b| b[4..8].copy_from_slice(&(u32::MAX).to_le_bytes())), fes::INVALID_HEADER_FIELD, field::PLEN),
        ];
        for (mutate, want_fes, want_fei) in cases {
            let mut b = cmd.clone();
            mutate(&mut b);
            let e = decode(&b, dg, 8192).unwrap_err();
            assert_eq!((e.fes, e.fei), (want_fes, want_fei), "{e}");
        }
        // Data beyond the receiver's limit.
        let mut big = Vec::new();
        encode(
            &Pdu::H2CData(DataHeader { cccid: 1, ttag: 1, offset: 0, length: 8192, last: true, success: false }),
            &[0; 8192],
            dg,
            &mut big,
        );
        assert_eq!(decode(&big, dg, 4096).unwrap_err().fes, fes::DATA_LIMIT_EXCEEDED);
        // DATAL disagreeing with the payload.
        big[16..20].copy_from_slice(&100u32.to_le_bytes());
        assert_eq!(decode(&big, dg, 1 << 20).unwrap_err().fes, fes::DATA_OUT_OF_RANGE);
    }

    #[test]
    fn random_bytes_never_panic() {
        // A cheap deterministic fuzz pass; the real one is fuzz/fuzz_targets/pdu_decode.rs.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut base = Vec::new();
        encode(&Pdu::CapsuleCmd(Command::new(1, 5)), &[7; 64], Digests { header: true, data: true }, &mut base);
        for _ in 0..20000 {
            let mut b = base.clone();
            for _ in 0..(next() % 4 + 1) {
                let i = (next() as usize) % b.len();
                b[i] = next() as u8;
            }
            b.truncate((next() as usize) % (b.len() + 1));
            for dg in [Digests::default(), Digests { header: true, data: true }] {
                let _ = decode(&b, dg, 8192);
            }
        }
    }
}
