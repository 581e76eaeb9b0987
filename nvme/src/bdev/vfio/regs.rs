//! The NVMe controller registers of a PCIe controller's BAR0 (base specification, section 3.1),
//! behind a small trait so the driver runs the same against the real BAR (a `mmap` of the VFIO
//! region) and against the in-memory fake controller of the tests.

use std::time::Duration;

/// 32-bit accesses to a controller's register space. 64-bit registers go as two 32-bit
/// accesses, low half first, which the specification allows for every register we touch.
pub trait Registers: Send + Sync {
    /// Bytes of register space (BAR0's size): doorbells beyond it do not exist.
    fn bar_bytes(&self) -> usize;
    fn read32(&self, offset: usize) -> u32;
    fn write32(&self, offset: usize, value: u32);
    fn read64(&self, offset: usize) -> u64 {
        u64::from(self.read32(offset)) | u64::from(self.read32(offset + 4)) << 32
    }
    fn write64(&self, offset: usize, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }
}

pub const CAP: usize = 0x00;
pub const VS: usize = 0x08;
pub const CC: usize = 0x14;
pub const CSTS: usize = 0x1C;
pub const AQA: usize = 0x24;
pub const ASQ: usize = 0x28;
pub const ACQ: usize = 0x30;
/// The first doorbell (admin SQ tail); the rest follow at the doorbell stride.
pub const DOORBELLS: usize = 0x1000;

/// Controller Capabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap(pub u64);

impl Cap {
    /// Entries an I/O queue may have (MQES is 0-based).
    pub fn max_queue_entries(&self) -> u32 {
        (self.0 & 0xFFFF) as u32 + 1
    }
    /// How long the controller may take to become ready or not ready (TO, 500 ms units).
    pub fn ready_timeout(&self) -> Duration {
        Duration::from_millis(((self.0 >> 24) & 0xFF).max(1) * 500)
    }
    /// Bytes between doorbells (4 << DSTRD).
    pub fn doorbell_stride(&self) -> usize {
        4 << ((self.0 >> 32) & 0xF)
    }
    /// CSS bit 0: the NVM command set.
    pub fn nvm_command_set(&self) -> bool {
        self.0 & (1 << 37) != 0
    }
    /// log2 of the smallest memory page size the controller supports (MPSMIN).
    pub fn min_page_shift(&self) -> u32 {
        12 + ((self.0 >> 48) & 0xF) as u32
    }
}

/// Controller Configuration fields.
pub mod cc {
    pub const EN: u32 = 1;
    /// I/O submission queue entry size: 2^6 = 64 bytes.
    pub const IOSQES_64: u32 = 6 << 16;
    /// I/O completion queue entry size: 2^4 = 16 bytes.
    pub const IOCQES_16: u32 = 4 << 20;
    /// Shutdown notification: normal.
    pub const SHN_NORMAL: u32 = 1 << 14;
    pub const SHN_MASK: u32 = 3 << 14;
}

/// Controller Status fields.
pub mod csts {
    pub const RDY: u32 = 1;
    pub const CFS: u32 = 1 << 1;
    pub const SHST_MASK: u32 = 3 << 2;
    pub const SHST_COMPLETE: u32 = 2 << 2;
    /// What a read of a device that went away returns.
    pub const GONE: u32 = u32::MAX;
}

/// Offset of queue `qid`'s submission tail doorbell.
pub fn sq_doorbell(qid: u16, stride: usize) -> usize {
    DOORBELLS + 2 * usize::from(qid) * stride
}

/// Offset of queue `qid`'s completion head doorbell.
pub fn cq_doorbell(qid: u16, stride: usize) -> usize {
    DOORBELLS + (2 * usize::from(qid) + 1) * stride
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_and_doorbells() {
        // QEMU's emulated controller: MQES 2047, CQR, TO 15 (7.5 s), DSTRD 0, CSS NVM, MPSMIN 0.
        let cap = Cap(0x0000_0020_0F01_07FF);
        assert_eq!(cap.max_queue_entries(), 2048);
        assert_eq!(cap.ready_timeout(), Duration::from_millis(7500));
        assert_eq!(cap.doorbell_stride(), 4);
        assert!(cap.nvm_command_set());
        assert_eq!(cap.min_page_shift(), 12);
        assert_eq!((sq_doorbell(0, 4), cq_doorbell(0, 4)), (0x1000, 0x1004));
        assert_eq!((sq_doorbell(3, 4), cq_doorbell(3, 4)), (0x1018, 0x101C));
        // A stride of 16 bytes (DSTRD 2).
        assert_eq!((sq_doorbell(1, 16), cq_doorbell(1, 16)), (0x1020, 0x1030));
    }
}
