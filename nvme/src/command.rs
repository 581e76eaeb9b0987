//! The 64-byte submission queue entry and the opcodes Stager speaks. `Command` is a thin
//! wrapper over the raw bytes with typed accessors, so a capsule received from the network is
//! used in place and the same bytes go out on the host side.
//!
//! The same type builds what Stager sends to local NVMe flash: the NVM commands (read, write
//! with FUA, flush, write zeroes, dataset management) and the admin commands a userspace
//! driver needs (identify, queue creation and deletion, number of queues). Those use PRPs
//! (PSDT 00b) instead of fabrics SGLs: the VFIO driver fills the PRP fields, the kernel does
//! for io_uring passthrough.

use crate::constants::SQE_BYTES;
use crate::le;

/// Admin command opcodes.
pub mod admin {
    pub const DELETE_IO_SQ: u8 = 0x00;
    pub const CREATE_IO_SQ: u8 = 0x01;
    pub const DELETE_IO_CQ: u8 = 0x04;
    pub const CREATE_IO_CQ: u8 = 0x05;
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

/// Feature identifiers (Set/Get Features CDW10 bits 7:0).
pub mod feature {
    pub const VOLATILE_WRITE_CACHE: u8 = 0x06;
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
}

/// Force Unit Access in CDW12 of reads, writes and write zeroes.
const CDW12_FUA: u32 = 1 << 30;
/// Deallocate in CDW12 of Write Zeroes.
const CDW12_DEAC: u32 = 1 << 25;
/// Attribute - Deallocate in CDW11 of Dataset Management.
const CDW11_AD: u32 = 1 << 2;
/// Largest number of logical blocks one read/write/write zeroes names (NLB is 16 bits, 0-based).
pub const NLB_MAX: u32 = 65536;
/// Largest number of ranges one Dataset Management command carries (NR is 8 bits, 0-based).
pub const DSM_RANGES_MAX: usize = 256;

/// One Dataset Management range: 16 bytes of the command's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DsmRange {
    /// Context attributes (access hints); 0 says nothing.
    pub attributes: u32,
    pub blocks: u32,
    pub slba: u64,
}

impl DsmRange {
    pub const BYTES: usize = 16;
    pub fn encode(&self, out: &mut [u8]) {
        le::put_u32(out, 0, self.attributes);
        le::put_u32(out, 4, self.blocks);
        le::put_u64(out, 8, self.slba);
    }
    /// None when `b` is shorter than one range.
    pub fn decode(b: &[u8]) -> Option<DsmRange> {
        (b.len() >= Self::BYTES).then(|| DsmRange {
            attributes: le::u32_at(b, 0),
            blocks: le::u32_at(b, 4),
            slba: le::u64_at(b, 8),
        })
    }
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

    /// A command for a PCIe controller or the kernel's passthrough: data pointer by PRP
    /// (PSDT 00b), command id 0 (the queue assigns one).
    pub fn pcie(opcode: u8) -> Command {
        let mut c = Command::default();
        c.0[0] = opcode;
        c
    }
    /// NVM Read of `nlb` blocks (1..=NLB_MAX) at `slba`.
    pub fn read(nsid: u32, slba: u64, nlb: u32) -> Command {
        let mut c = Command::pcie(io::READ);
        c.set_nsid(nsid).set_rw(slba, nlb);
        c
    }
    /// NVM Write; `fua` makes the controller complete it only once the data is durable.
    pub fn write(nsid: u32, slba: u64, nlb: u32, fua: bool) -> Command {
        let mut c = Command::pcie(io::WRITE);
        c.set_nsid(nsid).set_rw(slba, nlb);
        if fua {
            let c12 = c.cdw(12) | CDW12_FUA;
            c.set_cdw(12, c12);
        }
        c
    }
    /// Flush of the namespace's volatile write cache.
    pub fn flush(nsid: u32) -> Command {
        let mut c = Command::pcie(io::FLUSH);
        c.set_nsid(nsid);
        c
    }
    /// Write Zeroes; `deallocate` lets the controller unmap the blocks (they still read zero).
    pub fn write_zeroes(nsid: u32, slba: u64, nlb: u32, deallocate: bool) -> Command {
        let mut c = Command::pcie(io::WRITE_ZEROES);
        c.set_nsid(nsid).set_rw(slba, nlb);
        if deallocate {
            let c12 = c.cdw(12) | CDW12_DEAC;
            c.set_cdw(12, c12);
        }
        c
    }
    /// Dataset Management with `ranges` (1..=DSM_RANGES_MAX) ranges in its data, deallocating them.
    pub fn deallocate(nsid: u32, ranges: usize) -> Command {
        debug_assert!((1..=DSM_RANGES_MAX).contains(&ranges));
        let mut c = Command::pcie(io::DATASET_MANAGEMENT);
        c.set_nsid(nsid).set_cdw(10, (ranges.clamp(1, DSM_RANGES_MAX) - 1) as u32).set_cdw(11, CDW11_AD);
        c
    }
    /// Whether a Write Zeroes asks to deallocate (CDW12 bit 25).
    pub fn deac(&self) -> bool {
        self.cdw(12) & CDW12_DEAC != 0
    }
    /// Identify with `cns` (see `identify::cns`) for `nsid` (0 when the CNS names no namespace).
    pub fn identify(cns: u8, nsid: u32) -> Command {
        let mut c = Command::pcie(admin::IDENTIFY);
        c.set_nsid(nsid).set_cdw(10, cns as u32);
        c
    }
    /// Set Features / Number of Queues: asks for `queues` I/O submission and completion queues.
    pub fn set_number_of_queues(queues: u16) -> Command {
        let n = u32::from(queues.max(1) - 1);
        let mut c = Command::pcie(admin::SET_FEATURES);
        c.set_cdw(10, feature::NUMBER_OF_QUEUES as u32).set_cdw(11, n << 16 | n);
        c
    }
    /// Create I/O Completion Queue `qid` of `entries` slots at `iova` (physically contiguous),
    /// interrupts off: the driver polls.
    pub fn create_io_cq(qid: u16, entries: u16, iova: u64) -> Command {
        let mut c = Command::pcie(admin::CREATE_IO_CQ);
        c.set_prps(iova, 0).set_cdw(10, u32::from(entries - 1) << 16 | u32::from(qid)).set_cdw(11, 1);
        c
    }
    /// Create I/O Submission Queue `qid` of `entries` slots at `iova`, completing into `cqid`.
    pub fn create_io_sq(qid: u16, entries: u16, cqid: u16, iova: u64) -> Command {
        let mut c = Command::pcie(admin::CREATE_IO_SQ);
        c.set_prps(iova, 0)
            .set_cdw(10, u32::from(entries - 1) << 16 | u32::from(qid))
            .set_cdw(11, u32::from(cqid) << 16 | 1);
        c
    }
    pub fn delete_io_sq(qid: u16) -> Command {
        let mut c = Command::pcie(admin::DELETE_IO_SQ);
        c.set_cdw(10, u32::from(qid));
        c
    }
    pub fn delete_io_cq(qid: u16) -> Command {
        let mut c = Command::pcie(admin::DELETE_IO_CQ);
        c.set_cdw(10, u32::from(qid));
        c
    }
    /// PRP entry 1 (data pointer bytes 24..32).
    pub fn prp1(&self) -> u64 {
        le::u64_at(&self.0, 24)
    }
    /// PRP entry 2 (bytes 32..40): the second page, or the address of a PRP list.
    pub fn prp2(&self) -> u64 {
        le::u64_at(&self.0, 32)
    }
    pub fn set_prps(&mut self, prp1: u64, prp2: u64) -> &mut Self {
        le::put_u64(&mut self.0, 24, prp1);
        le::put_u64(&mut self.0, 32, prp2);
        self
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

    #[test]
    fn nvm_commands_for_pcie() {
        let r = Command::read(1, 0x1234, 8);
        assert_eq!((r.opcode(), r.nsid(), r.slba(), r.nlb(), r.fua()), (io::READ, 1, 0x1234, 8, false));
        assert_eq!(r.0[1], 0, "PSDT must say PRP on PCIe and passthrough");
        let w = Command::write(2, 7, NLB_MAX, true);
        assert_eq!((w.opcode(), w.nlb(), w.fua(), w.cdw(12)), (io::WRITE, NLB_MAX, true, (1 << 30) | 0xFFFF));
        assert!(!Command::write(2, 7, 1, false).fua());
        let f = Command::flush(3);
        assert_eq!((f.opcode(), f.nsid(), f.cdw(10), f.cdw(12)), (io::FLUSH, 3, 0, 0));
        let z = Command::write_zeroes(1, 100, 16, true);
        assert_eq!((z.opcode(), z.slba(), z.nlb(), z.deac(), z.fua()), (io::WRITE_ZEROES, 100, 16, true, false));
        assert!(!Command::write_zeroes(1, 100, 16, false).deac());
        let d = Command::deallocate(1, 3);
        assert_eq!((d.opcode(), d.cdw(10), d.cdw(11)), (io::DATASET_MANAGEMENT, 2, 1 << 2));
        let mut b = [0u8; 16];
        let range = DsmRange { attributes: 0, blocks: 4096, slba: 1 << 33 };
        range.encode(&mut b);
        assert_eq!(b, [0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0]);
        assert_eq!(DsmRange::decode(&b), Some(range));
        assert_eq!(DsmRange::decode(&b[..15]), None);
        let mut p = Command::read(1, 0, 2);
        p.set_prps(0x1000_0200, 0x2000_0000);
        assert_eq!((p.prp1(), p.prp2()), (0x1000_0200, 0x2000_0000));
    }

    #[test]
    fn admin_commands_for_a_userspace_driver() {
        let id = Command::identify(crate::identify::cns::CONTROLLER, 0);
        assert_eq!((id.opcode(), id.cdw(10), id.nsid()), (admin::IDENTIFY, 1, 0));
        let q = Command::set_number_of_queues(4);
        assert_eq!((q.opcode(), q.cdw(10), q.cdw(11)), (admin::SET_FEATURES, 7, 0x0003_0003));
        let cq = Command::create_io_cq(3, 256, 0x8000);
        assert_eq!((cq.opcode(), cq.prp1(), cq.cdw(10), cq.cdw(11)), (admin::CREATE_IO_CQ, 0x8000, 255 << 16 | 3, 1));
        let sq = Command::create_io_sq(3, 256, 3, 0x9000);
        assert_eq!(
            (sq.opcode(), sq.prp1(), sq.cdw(10), sq.cdw(11)),
            (admin::CREATE_IO_SQ, 0x9000, 255 << 16 | 3, 3 << 16 | 1)
        );
        assert_eq!((Command::delete_io_sq(3).opcode(), Command::delete_io_sq(3).cdw(10)), (admin::DELETE_IO_SQ, 3));
        assert_eq!((Command::delete_io_cq(3).opcode(), Command::delete_io_cq(3).cdw(10)), (admin::DELETE_IO_CQ, 3));
    }
}
