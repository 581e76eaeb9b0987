//! The 64-byte submission queue entry and the opcodes Stager speaks. `Command` is a thin
//! wrapper over the raw bytes with typed accessors, so a capsule received from the network is
//! used in place and the same bytes go out on the host side.

use crate::constants::SQE_BYTES;
use crate::le;

/// Admin command opcodes.
pub mod admin {
    pub const GET_LOG_PAGE: u8 = 0x02;
    pub const IDENTIFY: u8 = 0x06;
    pub const ABORT: u8 = 0x08;
    pub const SET_FEATURES: u8 = 0x09;
    pub const GET_FEATURES: u8 = 0x0A;
    pub const ASYNC_EVENT_REQUEST: u8 = 0x0C;
    pub const KEEP_ALIVE: u8 = 0x18;
}

/// NVM command set I/O opcodes.
pub mod io {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const COMPARE: u8 = 0x05;
    pub const WRITE_ZEROES: u8 = 0x08;
    pub const DATASET_MANAGEMENT: u8 = 0x09;
}

/// The fabrics command opcode; the command type is in byte 4 (FCTYPE).
pub const FABRICS_OPCODE: u8 = 0x7F;

/// Fabrics command types.
pub mod fctype {
    pub const PROPERTY_SET: u8 = 0x00;
    pub const CONNECT: u8 = 0x01;
    pub const PROPERTY_GET: u8 = 0x04;
}

/// SGL descriptor identifiers (type << 4 | subtype) used by NVMe/TCP.
pub mod sgl {
    /// Data Block, offset subtype: data is in the capsule.
    pub const IN_CAPSULE: u8 = 0x01;
    /// Transport Data Block: data moves by R2T/H2CData or C2HData.
    pub const TRANSPORT: u8 = 0x5A;
}

/// Whether data flows to the controller, from it, or not at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataDirection {
    None,
    HostToController,
    ControllerToHost,
}

/// One submission queue entry.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Command(pub [u8; SQE_BYTES]);

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Command {{ opc: {:#04x}, cid: {}, nsid: {}, cdw10: {:#x} }}",
            self.opcode(),
            self.cid(),
            self.nsid(),
            self.cdw(10)
        )
    }
}

impl Default for Command {
    fn default() -> Self {
        Command([0; SQE_BYTES])
    }
}

impl Command {
    pub fn new(opcode: u8, cid: u16) -> Command {
        let mut c = Command::default();
        c.0[0] = opcode;
        // PSDT = 01b: SGLs are used for this command (required on fabrics).
        c.0[1] = 0x40;
        le::put_u16(&mut c.0, 2, cid);
        c
    }
    pub fn from_bytes(b: &[u8]) -> Command {
        let mut c = Command::default();
        c.0.copy_from_slice(&b[..SQE_BYTES]);
        c
    }
    pub fn opcode(&self) -> u8 {
        self.0[0]
    }
    pub fn fctype(&self) -> u8 {
        self.0[4]
    }
    pub fn cid(&self) -> u16 {
        le::u16_at(&self.0, 2)
    }
    pub fn set_cid(&mut self, cid: u16) {
        le::put_u16(&mut self.0, 2, cid)
    }
    pub fn nsid(&self) -> u32 {
        le::u32_at(&self.0, 4)
    }
    pub fn set_nsid(&mut self, nsid: u32) -> &mut Self {
        le::put_u32(&mut self.0, 4, nsid);
        self
    }
    /// Command dword N (10..=15 are the command-specific ones; 0..=15 all valid).
    pub fn cdw(&self, n: usize) -> u32 {
        le::u32_at(&self.0, n * 4)
    }
    pub fn set_cdw(&mut self, n: usize, v: u32) -> &mut Self {
        le::put_u32(&mut self.0, n * 4, v);
        self
    }
    /// SGL descriptor 1: address (or in-capsule offset).
    pub fn sgl_address(&self) -> u64 {
        le::u64_at(&self.0, 24)
    }
    pub fn sgl_length(&self) -> u32 {
        le::u32_at(&self.0, 32)
    }
    pub fn sgl_id(&self) -> u8 {
        self.0[39]
    }
    pub fn set_sgl(&mut self, id: u8, address: u64, length: u32) -> &mut Self {
        le::put_u64(&mut self.0, 24, address);
        le::put_u32(&mut self.0, 32, length);
        self.0[36..39].fill(0);
        self.0[39] = id;
        self
    }
    /// Starting LBA of an NVM read/write-type command (CDW10-11).
    pub fn slba(&self) -> u64 {
        le::u64_at(&self.0, 40)
    }
    /// Number of logical blocks of an NVM read/write-type command (CDW12 bits 15:0, 0-based).
    pub fn nlb(&self) -> u32 {
        (self.cdw(12) & 0xFFFF) + 1
    }
    /// Force Unit Access (CDW12 bit 30).
    pub fn fua(&self) -> bool {
        self.cdw(12) & (1 << 30) != 0
    }
    pub fn set_rw(&mut self, slba: u64, nlb: u32) -> &mut Self {
        debug_assert!((1..=65536).contains(&nlb));
        le::put_u64(&mut self.0, 40, slba);
        let c12 = self.cdw(12) & !0xFFFF;
        self.set_cdw(12, c12 | (nlb - 1))
    }

    /// Direction of the data this command moves, by opcode (admin vs I/O queue matters).
    pub fn direction(&self, admin_queue: bool) -> DataDirection {
        let opc = self.opcode();
        if opc == FABRICS_OPCODE {
            return if self.fctype() == fctype::CONNECT {
                DataDirection::HostToController
            } else {
                DataDirection::None
            };
        }
        if admin_queue {
            match opc {
                admin::GET_LOG_PAGE | admin::IDENTIFY | admin::GET_FEATURES => DataDirection::ControllerToHost,
                _ => DataDirection::None,
            }
        } else {
            // The spec encodes direction in the opcode's low two bits for NVM commands.
            match opc & 0x3 {
                0x1 => DataDirection::HostToController,
                0x2 => DataDirection::ControllerToHost,
                _ => DataDirection::None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rw_fields_round_trip() {
        let mut c = Command::new(io::WRITE, 77);
        c.set_nsid(3).set_rw(0x1_0000_0001, 65536).set_sgl(sgl::TRANSPORT, 0, 1 << 20);
        assert_eq!(c.opcode(), io::WRITE);
        assert_eq!(c.cid(), 77);
        assert_eq!(c.nsid(), 3);
        assert_eq!(c.slba(), 0x1_0000_0001);
        assert_eq!(c.nlb(), 65536);
        assert_eq!(c.sgl_length(), 1 << 20);
        assert_eq!(c.sgl_id(), sgl::TRANSPORT);
        assert_eq!(c.direction(false), DataDirection::HostToController);
        assert_eq!(Command::new(io::COMPARE, 1).direction(false), DataDirection::HostToController);
        assert_eq!(Command::new(io::DATASET_MANAGEMENT, 1).direction(false), DataDirection::HostToController);
        assert_eq!(Command::new(io::FLUSH, 1).direction(false), DataDirection::None);
        assert_eq!(Command::new(io::READ, 1).direction(false), DataDirection::ControllerToHost);
    }
}
