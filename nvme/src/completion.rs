//! The 16-byte completion queue entry.

use crate::constants::CQE_BYTES;
use crate::le;
use crate::status::Status;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Command-specific result (e.g. CNTLID for Connect, a property value's low half).
    pub dw0: u32,
    pub dw1: u32,
    pub sqhd: u16,
    pub sqid: u16,
    pub cid: u16,
    pub status: Status,
}

impl Completion {
    pub fn new(cid: u16, status: Status) -> Completion {
        Completion { dw0: 0, dw1: 0, sqhd: 0, sqid: 0, cid, status }
    }
    pub fn encode(&self, out: &mut [u8]) {
        le::put_u32(out, 0, self.dw0);
        le::put_u32(out, 4, self.dw1);
        le::put_u16(out, 8, self.sqhd);
        le::put_u16(out, 10, self.sqid);
        le::put_u16(out, 12, self.cid);
        le::put_u16(out, 14, self.status.to_field(false));
    }
    pub fn decode(b: &[u8]) -> Completion {
        debug_assert!(b.len() >= CQE_BYTES);
        Completion {
            dw0: le::u32_at(b, 0),
            dw1: le::u32_at(b, 4),
            sqhd: le::u16_at(b, 8),
            sqid: le::u16_at(b, 10),
            cid: le::u16_at(b, 12),
            status: Status::from_field(le::u16_at(b, 14)),
        }
    }
    /// The 64-bit result of a Property Get.
    pub fn result64(&self) -> u64 {
        self.dw0 as u64 | ((self.dw1 as u64) << 32)
    }
}
