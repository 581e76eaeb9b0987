//! How one `BdevIo` becomes NVMe commands, shared by the two drivers of real NVMe namespaces
//! (`passthru`: io_uring on `/dev/ngXnY`; `vfio`: our own queues). A device's blocks are
//! Stager's (4 KiB for flash) while the namespace counts in its own LBAs (often 512 B), and one
//! NVMe command moves at most MDTS bytes and 65536 LBAs, so a read or write is cut into parts
//! here, each naming the slice of the I/O's data it moves; the drivers only map those slices to
//! memory. A part fails alone and the I/O reports the first failure, so a split write can be
//! partly on the device when it fails — as a torn write on any block device, which the flash
//! log's checksums are there to catch.

use super::{BdevError, BdevIo, BdevOp};
use crate::command::{Command, DsmRange, NLB_MAX};
use crate::constants::NVME_TRANSFER_MAX;
use crate::identify::{ControllerInfo, NamespaceFormat};

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, msg)
}

/// How a namespace is driven: what every part is built from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub nsid: u32,
    /// log2 of the namespace's LBA data size.
    pub lba_shift: u32,
    /// Bytes one read or write may move: MDTS and the driver's own limits, a multiple of 4 KiB.
    pub max_transfer: u32,
    pub deallocate: Deallocate,
}

/// What `BdevOp::Deallocate` becomes. The target tells hosts that deallocated blocks read back
/// as zeroes, so Dataset Management is used only where the namespace promises the same
/// (DLFEAT); elsewhere Write Zeroes with its deallocate bit gives both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Deallocate {
    Dsm,
    WriteZeroes,
}

/// One NVMe command of an I/O.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Part {
    pub cmd: Command,
    /// The slice of the I/O's data this command moves: (byte offset into the data, length).
    pub data: Option<(u64, u32)>,
    /// A Dataset Management command's one range (its 16 bytes of data).
    pub dsm: Option<DsmRange>,
}

/// The geometry of an NVMe namespace from its identify data, shared by both NVMe drivers.
pub(crate) fn geometry_of(
    name: &dyn std::fmt::Display,
    nsid: u32,
    cinfo: &ControllerInfo,
    format: &NamespaceFormat,
    block_size: u32,
    driver_max: usize,
) -> std::io::Result<Geometry> {
    if format.metadata_bytes != 0 {
        return Err(invalid(format!(
            "{name}: its LBA format carries {} bytes of metadata per block, which Stager does not \
             drive; format the namespace with a format without metadata (nvme format --lbaf=N)",
            format.metadata_bytes
        )));
    }
    if block_size < format.lba_bytes || !block_size.is_multiple_of(format.lba_bytes) {
        return Err(invalid(format!(
            "{name}: block size {block_size} is not a whole number of the namespace's {}-byte LBAs",
            format.lba_bytes
        )));
    }
    let mdts = cinfo.max_transfer_bytes().unwrap_or(usize::MAX).min(driver_max).min(NVME_TRANSFER_MAX) as u32;
    let max_transfer = (mdts / 4096 * 4096).max(4096);
    let deallocate = if cinfo.oncs & (1 << 2) != 0 && format.deallocated_reads_zeroes {
        Deallocate::Dsm
    } else {
        Deallocate::WriteZeroes
    };
    Ok(Geometry { nsid, lba_shift: format.lba_bytes.trailing_zeros(), max_transfer, deallocate })
}

/// Largest range one Dataset Management range names (NLB is 32 bits); kept a multiple of
/// 4 KiB worth of 512-byte LBAs so ranges stay aligned.
const DSM_RANGE_BLOCKS_MAX: u64 = 1 << 31;

/// Cuts `op` over bytes `offset..offset + len` into commands; `out` is cleared first.
/// Offsets and lengths must be whole LBAs (the caller checked them against the device's
/// blocks, which are whole LBAs).
pub(crate) fn plan(g: &Geometry, op: BdevOp, offset: u64, len: u64, out: &mut Vec<Part>) -> Result<(), BdevError> {
    out.clear();
    let lba_mask = (1u64 << g.lba_shift) - 1;
    if offset & lba_mask != 0 || len & lba_mask != 0 {
        return Err(BdevError::Os(libc::EINVAL));
    }
    let slba = offset >> g.lba_shift;
    let blocks = len >> g.lba_shift;
    match op {
        BdevOp::Flush => out.push(Part { cmd: Command::flush(g.nsid), data: None, dsm: None }),
        BdevOp::Read | BdevOp::Write { .. } => {
            let chunk = (u64::from(g.max_transfer) >> g.lba_shift).clamp(1, u64::from(NLB_MAX));
            let mut done = 0;
            while done < blocks {
                let n = chunk.min(blocks - done) as u32;
                let cmd = match op {
                    BdevOp::Write { fua } => Command::write(g.nsid, slba + done, n, fua),
                    _ => Command::read(g.nsid, slba + done, n),
                };
                let data = Some((done << g.lba_shift, n << g.lba_shift));
                out.push(Part { cmd, data, dsm: None });
                done += u64::from(n);
            }
        }
        BdevOp::WriteZeroes => zeroes(g, slba, blocks, false, out),
        BdevOp::Deallocate if g.deallocate == Deallocate::WriteZeroes => zeroes(g, slba, blocks, true, out),
        BdevOp::Deallocate => {
            let mut done = 0;
            while done < blocks {
                let n = DSM_RANGE_BLOCKS_MAX.min(blocks - done);
                let range = DsmRange { attributes: 0, blocks: n as u32, slba: slba + done };
                out.push(Part { cmd: Command::deallocate(g.nsid, 1), data: None, dsm: Some(range) });
                done += n;
            }
        }
    }
    Ok(())
}

fn zeroes(g: &Geometry, slba: u64, blocks: u64, deallocate: bool, out: &mut Vec<Part>) {
    let mut done = 0;
    while done < blocks {
        let n = u64::from(NLB_MAX).min(blocks - done) as u32;
        out.push(Part { cmd: Command::write_zeroes(g.nsid, slba + done, n, deallocate), data: None, dsm: None });
        done += u64::from(n);
    }
}

/// The pieces of the I/O's buffers that hold bytes `start..start + len` of its data, in order,
/// as (piece index, offset in the piece, length); `out` is cleared first. A read has one
/// piece, a gathered write several (`BdevIo::pieces`).
pub(crate) fn spans(io: &BdevIo, start: u64, len: u64, out: &mut Vec<(usize, usize, usize)>) {
    out.clear();
    let (mut at, end) = (start, start + len);
    let mut piece_start = 0u64;
    for (i, p) in io.pieces().enumerate() {
        let piece_end = piece_start + p.len() as u64;
        if at < piece_end && at < end {
            let from = (at - piece_start) as usize;
            let n = (piece_end.min(end) - at) as usize;
            out.push((i, from, n));
            at += n as u64;
        }
        if at >= end {
            break;
        }
        piece_start = piece_end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::AlignedBuf;
    use crate::command::io;

    fn geometry(lba_shift: u32, max_transfer: u32) -> Geometry {
        Geometry { nsid: 1, lba_shift, max_transfer, deallocate: Deallocate::Dsm }
    }

    #[test]
    fn writes_split_at_the_transfer_limit_in_the_namespace_lbas() {
        let g = geometry(9, 128 << 10);
        let mut out = Vec::new();
        // 300 KiB at byte 1 MiB: 128 + 128 + 44 KiB, LBAs of 512 bytes.
        plan(&g, BdevOp::Write { fua: true }, 1 << 20, 300 << 10, &mut out).unwrap();
        assert_eq!(out.len(), 3);
        let lbas: Vec<(u64, u32, bool)> = out.iter().map(|p| (p.cmd.slba(), p.cmd.nlb(), p.cmd.fua())).collect();
        assert_eq!(lbas, vec![(2048, 256, true), (2304, 256, true), (2560, 88, true)]);
        let data: Vec<(u64, u32)> = out.iter().map(|p| p.data.unwrap()).collect();
        assert_eq!(data, vec![(0, 128 << 10), (128 << 10, 128 << 10), (256 << 10, 44 << 10)]);
        assert!(out.iter().all(|p| p.cmd.opcode() == io::WRITE && p.cmd.nsid() == 1));
    }

    #[test]
    fn zeroes_deallocate_and_flush() {
        let mut g = geometry(12, 1 << 20);
        let mut out = Vec::new();
        // 65536 LBAs per Write Zeroes: 300 000 blocks take 5 commands.
        plan(&g, BdevOp::WriteZeroes, 0, 300_000 << 12, &mut out).unwrap();
        assert_eq!(out.len(), 5);
        assert_eq!(out.iter().map(|p| u64::from(p.cmd.nlb())).sum::<u64>(), 300_000);
        assert!(out.iter().all(|p| p.cmd.opcode() == io::WRITE_ZEROES && !p.cmd.deac() && p.data.is_none()));
        plan(&g, BdevOp::Deallocate, 8192, 16 << 12, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].cmd.opcode(), io::DATASET_MANAGEMENT);
        assert_eq!(out[0].dsm, Some(DsmRange { attributes: 0, blocks: 16, slba: 2 }));
        g.deallocate = Deallocate::WriteZeroes;
        plan(&g, BdevOp::Deallocate, 8192, 16 << 12, &mut out).unwrap();
        assert_eq!(
            (out[0].cmd.opcode(), out[0].cmd.deac(), out[0].cmd.slba(), out[0].cmd.nlb()),
            (io::WRITE_ZEROES, true, 2, 16)
        );
        plan(&g, BdevOp::Flush, 0, 0, &mut out).unwrap();
        assert_eq!((out.len(), out[0].cmd.opcode()), (1, io::FLUSH));
        // Not whole LBAs: refused, nothing planned.
        assert_eq!(plan(&g, BdevOp::Read, 512, 4096, &mut out), Err(BdevError::Os(libc::EINVAL)));
        assert!(out.is_empty());
    }

    #[test]
    fn geometry_from_identify() {
        let info = |mdts: u8, oncs: u16| {
            let mut b = vec![0u8; crate::constants::IDENTIFY_BYTES];
            b[77] = mdts;
            b[520..522].copy_from_slice(&oncs.to_le_bytes());
            ControllerInfo::decode(&b).unwrap()
        };
        let format = |lba_bytes: u32, metadata_bytes: u16, zeroes: bool| NamespaceFormat {
            blocks: 1 << 20,
            lba_bytes,
            metadata_bytes,
            extended_lba: false,
            deallocated_reads_zeroes: zeroes,
        };
        // MDTS 7 (512 KiB) under a driver limit of 508 KiB; DSM supported and reading zeroes.
        let g = geometry_of(&"d", 1, &info(7, 1 << 2), &format(512, 0, true), 4096, 127 * 4096).unwrap();
        assert_eq!((g.lba_shift, g.max_transfer, g.deallocate), (9, 127 * 4096, Deallocate::Dsm));
        // No MDTS: capped at NVME_TRANSFER_MAX; no DSM: deallocate by Write Zeroes.
        let g = geometry_of(&"d", 1, &info(0, 0), &format(4096, 0, true), 4096, usize::MAX).unwrap();
        assert_eq!((g.max_transfer, g.deallocate), (NVME_TRANSFER_MAX as u32, Deallocate::WriteZeroes));
        let g = geometry_of(&"d", 1, &info(0, 1 << 2), &format(4096, 0, false), 4096, usize::MAX).unwrap();
        assert_eq!(g.deallocate, Deallocate::WriteZeroes, "DSM that does not promise zeroes is not used");
        let e = geometry_of(&"d", 1, &info(0, 0), &format(4096, 8, false), 4096, usize::MAX).unwrap_err();
        assert!(e.to_string().contains("metadata"), "{e}");
        let e = geometry_of(&"d", 1, &info(0, 0), &format(4096, 0, false), 512, usize::MAX).unwrap_err();
        assert!(e.to_string().contains("512 is not a whole number"), "{e}");
    }

    #[test]
    fn spans_walk_a_gathered_write() {
        let mut io = BdevIo::new(BdevOp::Write { fua: false }, 0, 7 * 4096, Some(AlignedBuf::new(4096)), 0);
        io.gather = vec![AlignedBuf::new(2 * 4096), AlignedBuf::new(4 * 4096)];
        let mut out = Vec::new();
        spans(&io, 0, 7 * 4096, &mut out);
        assert_eq!(out, vec![(0, 0, 4096), (1, 0, 8192), (2, 0, 16384)]);
        // A part that starts inside the second piece and ends inside the third.
        spans(&io, 6144, 8192, &mut out);
        assert_eq!(out, vec![(1, 2048, 6144), (2, 0, 2048)]);
        spans(&io, 3 * 4096, 4096, &mut out);
        assert_eq!(out, vec![(2, 0, 4096)]);
    }
}
