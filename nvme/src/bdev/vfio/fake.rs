//! A fake NVMe controller in memory, for the VFIO driver's tests: it speaks the register and
//! queue protocol — CC/CSTS enable, disable and shutdown, admin and I/O queues found through
//! their doorbells, SQ head reporting, completions posted with phase tags — and moves data by
//! walking PRPs through a fake IOMMU that refuses any address nobody mapped. Its PRP walker is
//! written from the specification independently of `prp.rs`, so the driver's lists are checked
//! by a second reading of the rules rather than by themselves.
//!
//! Commands run when their doorbell is written (or are held back on request, to test timeouts,
//! out-of-order completion and fatal status); the namespace is a `Vec<u8>`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use super::dma::{DmaMapper, DmaRegion};
use super::regs::{self, cc, csts, Registers};
use crate::command::{admin, io, Command, DsmRange};
use crate::completion::Completion;
use crate::identify::{self, cns, ControllerIdentity, ControllerType, NamespaceIdentity};
use crate::status::Status;

const PAGE: u64 = 4096;

/// Memory regions "mapped for the device": IOVA → our memory.
pub struct FakeIommu {
    maps: Mutex<Vec<(u64, usize, usize)>>,
    next: AtomicU64,
    me: Weak<FakeIommu>,
}

impl FakeIommu {
    pub fn new() -> Arc<FakeIommu> {
        // IOVAs deliberately unlike any pointer, so mixing the two up cannot pass a test.
        Arc::new_cyclic(|me| FakeIommu {
            maps: Mutex::new(Vec::new()),
            next: AtomicU64::new(0x40_0000_0000),
            me: me.clone(),
        })
    }

    fn translate(&self, iova: u64, len: usize) -> Option<*mut u8> {
        let maps = self.maps.lock().unwrap();
        maps.iter().find_map(|&(base, ptr, size)| {
            (iova >= base && iova + len as u64 <= base + size as u64).then(|| (ptr + (iova - base) as usize) as *mut u8)
        })
    }

    pub fn read(&self, iova: u64, out: &mut [u8]) -> bool {
        let Some(p) = self.translate(iova, out.len()) else { return false };
        // SAFETY: translate found the whole range inside a live mapping.
        unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), out.len()) };
        true
    }

    pub fn write(&self, iova: u64, data: &[u8]) -> bool {
        let Some(p) = self.translate(iova, data.len()) else { return false };
        // SAFETY: translate found the whole range inside a live mapping.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        true
    }

    /// Bytes still mapped (every region must be released when the device is gone).
    pub fn mapped_bytes(&self) -> usize {
        self.maps.lock().unwrap().iter().map(|m| m.2).sum()
    }
}

impl DmaMapper for FakeIommu {
    fn alloc(&self, len: usize) -> std::io::Result<DmaRegion> {
        let len = len.max(1).next_multiple_of(PAGE as usize);
        let layout = std::alloc::Layout::from_size_align(len, PAGE as usize).map_err(std::io::Error::other)?;
        // SAFETY: layout has non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(raw).ok_or_else(|| std::io::Error::other("out of memory"))?;
        let iova = self.next.fetch_add(len as u64 + PAGE, Ordering::SeqCst);
        self.maps.lock().unwrap().push((iova, raw as usize, len));
        let me = self.me.upgrade().ok_or_else(|| std::io::Error::other("iommu gone"))?;
        let addr = raw as usize;
        let release = Box::new(move || {
            me.maps.lock().unwrap().retain(|m| m.0 != iova);
            // SAFETY: allocated above with this layout; unmapped first, so nothing reaches it.
            unsafe { std::alloc::dealloc(addr as *mut u8, layout) };
        });
        // SAFETY: raw is valid for len zeroed bytes, "mapped" at iova until release runs.
        Ok(unsafe { DmaRegion::from_raw(ptr, iova, len, release) })
    }
}

struct Sq {
    iova: u64,
    entries: u16,
    head: u16,
    tail: u16,
    cqid: u16,
}

struct Cq {
    iova: u64,
    entries: u16,
    tail: u16,
    head: u16,
    phase: bool,
    /// Completions waiting for room (the host has not returned slots yet).
    backlog: VecDeque<Completion>,
}

/// The controller's state and the tests' knobs.
pub struct State {
    pub cap: u64,
    pub cc: u32,
    pub csts: u32,
    aqa: u32,
    asq: u64,
    acq: u64,
    sqs: BTreeMap<u16, Sq>,
    cqs: BTreeMap<u16, Cq>,
    pub media: Vec<u8>,
    pub lba_shift: u32,
    pub mdts: u8,
    pub vwc: bool,
    /// DLFEAT says deallocated blocks read zero (else the driver deallocates by Write Zeroes).
    pub deallocated_reads_zeroes: bool,
    /// I/O queue pairs granted by Set Features.
    pub max_queues: u16,
    /// Hold I/O commands instead of running them, until `release`.
    pub hold: bool,
    held: Vec<(u16, Command)>,
    /// The next I/O command completes with this status instead of running.
    pub fail_next: Option<Status>,
    /// Every I/O command run, in order.
    pub log: Vec<Command>,
    pub flushes: usize,
    pub shutdowns: usize,
    /// Completion queue wraps (phase flips) on I/O queues.
    pub cq_wraps: usize,
    /// Create I/O CQ commands that asked for interrupts.
    pub interrupts_requested: usize,
}

pub struct FakeController {
    s: Mutex<State>,
    iommu: Arc<FakeIommu>,
}

impl FakeController {
    /// A controller with one namespace of `blocks` LBAs of `1 << lba_shift` bytes whose queues
    /// may have up to `max_entries` entries.
    pub fn new(iommu: Arc<FakeIommu>, blocks: u64, lba_shift: u32, max_entries: u16) -> Arc<FakeController> {
        // MQES, CQR, TO = 1 (500 ms), DSTRD 0, CSS NVM, MPSMIN 0.
        let cap = u64::from(max_entries - 1) | 1 << 16 | 1 << 24 | 1 << 37;
        Arc::new(FakeController {
            s: Mutex::new(State {
                cap,
                cc: 0,
                csts: 0,
                aqa: 0,
                asq: 0,
                acq: 0,
                sqs: BTreeMap::new(),
                cqs: BTreeMap::new(),
                media: vec![0; (blocks << lba_shift) as usize],
                lba_shift,
                mdts: 0,
                vwc: true,
                deallocated_reads_zeroes: true,
                max_queues: 8,
                hold: false,
                held: Vec::new(),
                fail_next: None,
                log: Vec::new(),
                flushes: 0,
                shutdowns: 0,
                cq_wraps: 0,
                interrupts_requested: 0,
            }),
            iommu,
        })
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        self.s.lock().unwrap()
    }

    /// Runs the held commands, newest first (completions out of submission order).
    pub fn release(&self) {
        let mut s = self.state();
        s.hold = false;
        let held = std::mem::take(&mut s.held);
        for (sqid, cmd) in held.into_iter().rev() {
            let (status, dw0) = self.io_cmd(&mut s, &cmd);
            self.post(&mut s, sqid, cmd.cid(), status, dw0);
        }
    }

    /// The data segments (IOVA, length) a command's PRPs describe for `len` bytes, read the
    /// way the specification says a controller reads them.
    pub fn prp_segments(&self, prp1: u64, prp2: u64, len: usize) -> Result<Vec<(u64, usize)>, Status> {
        const INVALID_PRP_OFFSET: Status = Status::generic(0x13);
        let mut segs = Vec::new();
        let first = len.min((PAGE - prp1 % PAGE) as usize);
        segs.push((prp1, first));
        let mut left = len - first;
        if left == 0 {
            return Ok(segs);
        }
        if left <= PAGE as usize {
            if !prp2.is_multiple_of(PAGE) {
                return Err(INVALID_PRP_OFFSET);
            }
            segs.push((prp2, left));
            return Ok(segs);
        }
        let mut list = prp2;
        loop {
            if !list.is_multiple_of(8) {
                return Err(INVALID_PRP_OFFSET);
            }
            let in_page = ((PAGE - list % PAGE) / 8) as usize;
            for k in 0..in_page {
                let mut e = [0u8; 8];
                if !self.iommu.read(list + 8 * k as u64, &mut e) {
                    return Err(Status::DATA_TRANSFER_ERROR);
                }
                let entry = u64::from_le_bytes(e);
                if k == in_page - 1 && left > PAGE as usize {
                    list = entry;
                    break;
                }
                if entry % PAGE != 0 {
                    return Err(INVALID_PRP_OFFSET);
                }
                let n = left.min(PAGE as usize);
                segs.push((entry, n));
                left -= n;
                if left == 0 {
                    return Ok(segs);
                }
            }
        }
    }

    fn dma_out(&self, segs: &[(u64, usize)], data: &[u8]) -> bool {
        let mut at = 0;
        segs.iter().all(|&(iova, n)| {
            let ok = self.iommu.write(iova, &data[at..at + n]);
            at += n;
            ok
        })
    }

    fn dma_in(&self, segs: &[(u64, usize)], data: &mut [u8]) -> bool {
        let mut at = 0;
        segs.iter().all(|&(iova, n)| {
            let ok = self.iommu.read(iova, &mut data[at..at + n]);
            at += n;
            ok
        })
    }

    fn post(&self, s: &mut State, sqid: u16, cid: u16, status: Status, dw0: u32) {
        let Some(sq) = s.sqs.get(&sqid) else { return };
        let (cqid, sqhd) = (sq.cqid, sq.head);
        let Some(cq) = s.cqs.get_mut(&cqid) else { return };
        cq.backlog.push_back(Completion { dw0, dw1: 0, sqhd, sqid, cid, status });
        Self::drain_cq(&self.iommu, cq, &mut s.cq_wraps, cqid);
    }

    fn drain_cq(iommu: &FakeIommu, cq: &mut Cq, wraps: &mut usize, cqid: u16) {
        while (cq.tail + 1) % cq.entries != cq.head {
            let Some(c) = cq.backlog.pop_front() else { return };
            let mut e = [0u8; 16];
            c.encode(&mut e);
            e[14] |= cq.phase as u8;
            assert!(iommu.write(cq.iova + u64::from(cq.tail) * 16, &e), "completion queue not mapped");
            cq.tail += 1;
            if cq.tail == cq.entries {
                cq.tail = 0;
                cq.phase = !cq.phase;
                if cqid != 0 {
                    *wraps += 1;
                }
            }
        }
    }

    fn ring_sq(&self, s: &mut State, qid: u16, tail: u16) {
        let Some(sq) = s.sqs.get_mut(&qid) else { return };
        if tail >= sq.entries {
            return;
        }
        sq.tail = tail;
        while let Some(sq) = s.sqs.get_mut(&qid).filter(|sq| sq.head != sq.tail) {
            let mut raw = [0u8; 64];
            assert!(self.iommu.read(sq.iova + u64::from(sq.head) * 64, &mut raw), "submission queue not mapped");
            sq.head = (sq.head + 1) % sq.entries;
            let cmd = Command(raw);
            if qid == 0 {
                let (status, dw0) = self.admin_cmd(s, &cmd);
                self.post(s, 0, cmd.cid(), status, dw0);
            } else if s.hold {
                s.held.push((qid, cmd));
            } else {
                let (status, dw0) = self.io_cmd(s, &cmd);
                self.post(s, qid, cmd.cid(), status, dw0);
            }
        }
    }

    fn admin_cmd(&self, s: &mut State, c: &Command) -> (Status, u32) {
        let invalid_qid = Status::specific(0x01).no_retry();
        let cq_invalid = Status::specific(0x00).no_retry();
        let invalid_deletion = Status::specific(0x0C).no_retry();
        match c.opcode() {
            admin::IDENTIFY => {
                let blocks = s.media.len() as u64 >> s.lba_shift;
                let data = match (c.cdw(10) & 0xFF) as u8 {
                    cns::CONTROLLER => ControllerIdentity {
                        serial: "FAKE0001".into(),
                        model: "Fake NVMe".into(),
                        firmware: "1.0".into(),
                        cntlid: 1,
                        controller_type: ControllerType::Io,
                        mdts: s.mdts,
                        max_cmd: 0,
                        namespaces: 1,
                        subnqn: String::new(),
                        vwc: s.vwc,
                        in_capsule_bytes: 0,
                        aer_limit: 1,
                        error_log_entries: 1,
                        ana: None,
                    }
                    .encode(),
                    cns::NAMESPACE if c.nsid() == 1 => {
                        let mut b = NamespaceIdentity {
                            blocks,
                            block_size: 1 << s.lba_shift,
                            nguid: [0; 16],
                            uuid: [0; 16],
                            ana_group: 0,
                            shared: false,
                        }
                        .encode();
                        if !s.deallocated_reads_zeroes {
                            b[33] = 0;
                        }
                        b
                    }
                    cns::NAMESPACE => return (Status::INVALID_NAMESPACE, 0),
                    cns::ACTIVE_NAMESPACES => identify::encode_active_namespaces(&[1], c.nsid()),
                    _ => return (Status::INVALID_FIELD, 0),
                };
                match self.prp_segments(c.prp1(), c.prp2(), data.len()) {
                    Ok(segs) if self.dma_out(&segs, &data) => (Status::SUCCESS, 0),
                    Ok(_) => (Status::DATA_TRANSFER_ERROR, 0),
                    Err(st) => (st, 0),
                }
            }
            admin::SET_FEATURES if c.cdw(10) & 0xFF == 7 => {
                let asked = (c.cdw(11) & 0xFFFF) + 1;
                let n = asked.min(u32::from(s.max_queues)) - 1;
                (Status::SUCCESS, n << 16 | n)
            }
            admin::CREATE_IO_CQ => {
                let (qid, entries) = ((c.cdw(10) & 0xFFFF) as u16, (c.cdw(10) >> 16) as u16 + 1);
                if qid == 0 || qid > s.max_queues || s.cqs.contains_key(&qid) {
                    return (invalid_qid, 0);
                }
                if u64::from(entries) > (s.cap & 0xFFFF) + 1 || c.cdw(11) & 1 == 0 {
                    return (Status::INVALID_QUEUE_SIZE, 0);
                }
                if c.cdw(11) & 2 != 0 {
                    s.interrupts_requested += 1;
                }
                s.cqs.insert(
                    qid,
                    Cq { iova: c.prp1(), entries, tail: 0, head: 0, phase: true, backlog: VecDeque::new() },
                );
                (Status::SUCCESS, 0)
            }
            admin::CREATE_IO_SQ => {
                let (qid, entries, cqid) =
                    ((c.cdw(10) & 0xFFFF) as u16, (c.cdw(10) >> 16) as u16 + 1, (c.cdw(11) >> 16) as u16);
                if qid == 0 || qid > s.max_queues || s.sqs.contains_key(&qid) {
                    return (invalid_qid, 0);
                }
                if !s.cqs.contains_key(&cqid) || cqid == 0 {
                    return (cq_invalid, 0);
                }
                s.sqs.insert(qid, Sq { iova: c.prp1(), entries, head: 0, tail: 0, cqid });
                (Status::SUCCESS, 0)
            }
            admin::DELETE_IO_SQ => {
                let qid = (c.cdw(10) & 0xFFFF) as u16;
                if qid == 0 || !s.sqs.contains_key(&qid) {
                    return (invalid_qid, 0);
                }
                // Commands it still holds are aborted, then the queue goes.
                let (aborted, kept): (Vec<_>, Vec<_>) =
                    std::mem::take(&mut s.held).into_iter().partition(|h| h.0 == qid);
                s.held = kept;
                for (sqid, cmd) in aborted {
                    self.post(s, sqid, cmd.cid(), Status::SQ_DELETION, 0);
                }
                s.sqs.remove(&qid);
                (Status::SUCCESS, 0)
            }
            admin::DELETE_IO_CQ => {
                let qid = (c.cdw(10) & 0xFFFF) as u16;
                if qid == 0 || !s.cqs.contains_key(&qid) {
                    return (invalid_qid, 0);
                }
                if s.sqs.values().any(|sq| sq.cqid == qid) {
                    return (invalid_deletion, 0);
                }
                s.cqs.remove(&qid);
                (Status::SUCCESS, 0)
            }
            _ => (Status::INVALID_OPCODE, 0),
        }
    }

    fn io_cmd(&self, s: &mut State, c: &Command) -> (Status, u32) {
        if c.nsid() != 1 {
            return (Status::INVALID_NAMESPACE, 0);
        }
        if let Some(st) = s.fail_next.take() {
            return (st, 0);
        }
        s.log.push(*c);
        let blocks = s.media.len() as u64 >> s.lba_shift;
        let range = |s: &State, slba: u64, nlb: u64| -> Option<std::ops::Range<usize>> {
            (slba + nlb <= blocks).then(|| (slba << s.lba_shift) as usize..((slba + nlb) << s.lba_shift) as usize)
        };
        match c.opcode() {
            io::READ | io::WRITE => {
                let Some(r) = range(s, c.slba(), u64::from(c.nlb())) else { return (Status::LBA_OUT_OF_RANGE, 0) };
                let segs = match self.prp_segments(c.prp1(), c.prp2(), r.len()) {
                    Ok(segs) => segs,
                    Err(st) => return (st, 0),
                };
                let ok = if c.opcode() == io::READ {
                    self.dma_out(&segs, &s.media[r])
                } else {
                    self.dma_in(&segs, &mut s.media[r])
                };
                (if ok { Status::SUCCESS } else { Status::DATA_TRANSFER_ERROR }, 0)
            }
            io::FLUSH => {
                s.flushes += 1;
                (Status::SUCCESS, 0)
            }
            io::WRITE_ZEROES => {
                let Some(r) = range(s, c.slba(), u64::from(c.nlb())) else { return (Status::LBA_OUT_OF_RANGE, 0) };
                s.media[r].fill(0);
                (Status::SUCCESS, 0)
            }
            io::DATASET_MANAGEMENT => {
                let n = (c.cdw(10) & 0xFF) as usize + 1;
                let mut data = vec![0u8; n * DsmRange::BYTES];
                match self.prp_segments(c.prp1(), c.prp2(), data.len()) {
                    Ok(segs) if self.dma_in(&segs, &mut data) => {}
                    Ok(_) => return (Status::DATA_TRANSFER_ERROR, 0),
                    Err(st) => return (st, 0),
                }
                for chunk in data.chunks_exact(DsmRange::BYTES) {
                    let Some(d) = DsmRange::decode(chunk) else { continue };
                    let Some(r) = range(s, d.slba, u64::from(d.blocks)) else { return (Status::LBA_OUT_OF_RANGE, 0) };
                    if c.cdw(11) & (1 << 2) != 0 {
                        s.media[r].fill(0);
                    }
                }
                (Status::SUCCESS, 0)
            }
            _ => (Status::INVALID_OPCODE, 0),
        }
    }
}

impl Registers for FakeController {
    fn bar_bytes(&self) -> usize {
        0x4000
    }
    fn read32(&self, offset: usize) -> u32 {
        let s = self.state();
        match offset {
            regs::CAP => s.cap as u32,
            o if o == regs::CAP + 4 => (s.cap >> 32) as u32,
            regs::VS => 0x0001_0400,
            regs::CC => s.cc,
            regs::CSTS => s.csts,
            regs::AQA => s.aqa,
            _ => 0,
        }
    }

    fn write32(&self, offset: usize, value: u32) {
        let mut s = self.state();
        match offset {
            regs::CC => {
                let was = s.cc;
                s.cc = value;
                if value & cc::EN != 0 && was & cc::EN == 0 {
                    assert_eq!(value & (0xF << 7), 0, "the driver uses 4 KiB pages (CC.MPS 0)");
                    assert_eq!(value & (0xFF << 16), cc::IOSQES_64 | cc::IOCQES_16, "entry sizes");
                    let (sqs, cqs) = ((s.aqa & 0xFFF) as u16 + 1, ((s.aqa >> 16) & 0xFFF) as u16 + 1);
                    let (asq, acq) = (s.asq, s.acq);
                    s.sqs.insert(0, Sq { iova: asq, entries: sqs, head: 0, tail: 0, cqid: 0 });
                    s.cqs.insert(
                        0,
                        Cq { iova: acq, entries: cqs, tail: 0, head: 0, phase: true, backlog: VecDeque::new() },
                    );
                    s.csts |= csts::RDY;
                }
                if value & cc::EN == 0 && was & cc::EN != 0 {
                    s.sqs.clear();
                    s.cqs.clear();
                    s.held.clear();
                    s.csts &= !(csts::RDY | csts::SHST_MASK);
                }
                if value & cc::SHN_MASK != 0 && was & cc::SHN_MASK == 0 {
                    s.shutdowns += 1;
                    s.flushes += 1;
                    s.csts = (s.csts & !csts::SHST_MASK) | csts::SHST_COMPLETE;
                }
            }
            regs::AQA => s.aqa = value,
            regs::ASQ => s.asq = (s.asq & !0xFFFF_FFFF) | u64::from(value),
            o if o == regs::ASQ + 4 => s.asq = (s.asq & 0xFFFF_FFFF) | u64::from(value) << 32,
            regs::ACQ => s.acq = (s.acq & !0xFFFF_FFFF) | u64::from(value),
            o if o == regs::ACQ + 4 => s.acq = (s.acq & 0xFFFF_FFFF) | u64::from(value) << 32,
            o if o >= regs::DOORBELLS => {
                let idx = (o - regs::DOORBELLS) / 4;
                let qid = (idx / 2) as u16;
                if idx.is_multiple_of(2) {
                    self.ring_sq(&mut s, qid, value as u16);
                } else {
                    let State { cqs, cq_wraps, .. } = &mut *s;
                    if let Some(cq) = cqs.get_mut(&qid).filter(|cq| value < u32::from(cq.entries)) {
                        cq.head = value as u16;
                        Self::drain_cq(&self.iommu, cq, cq_wraps, qid);
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::prp::{self, ListPage, ENTRIES_PER_LIST};
    use super::*;

    /// The driver's PRP builder and the fake's walker agree, across chained list pages and
    /// with a first page that starts mid-page.
    #[test]
    fn the_walker_reads_what_the_builder_writes() {
        let iommu = FakeIommu::new();
        let ctrl = FakeController::new(iommu.clone(), 8, 12, 64);
        for (offset, len) in [(0usize, 4096usize), (0x200, 4096), (0x200, 8192), (0, 1 << 20), (0x800, 1100 * 4096)] {
            let pages = prp::pages_touched(offset, len);
            let data = iommu.alloc(pages * 4096).unwrap();
            let lists = iommu.alloc(prp::list_pages(pages).max(1) * 4096).unwrap();
            // Data pages in reverse order, so contiguity cannot hide a mistake.
            let iovas: Vec<u64> = (0..pages)
                .map(|i| data.iova_at((pages - 1 - i) * 4096) + if i == 0 { offset as u64 } else { 0 })
                .collect();
            let mut list_pages: Vec<ListPage> = (0..prp::list_pages(pages))
                .map(|i| ListPage {
                    iova: lists.iova_at(i * 4096),
                    // SAFETY: page i of a region this test owns, not otherwise referenced.
                    entries: unsafe {
                        std::slice::from_raw_parts_mut(lists.ptr_at(i * 4096) as *mut u64, ENTRIES_PER_LIST)
                    },
                })
                .collect();
            let (prp1, prp2) = prp::build(&iovas, &mut list_pages);
            let segs = ctrl.prp_segments(prp1, prp2, len).unwrap();
            assert_eq!(segs.len(), pages, "offset {offset} len {len}");
            assert_eq!(segs.iter().map(|s| s.1).sum::<usize>(), len);
            for (i, (iova, _)) in segs.iter().enumerate() {
                assert_eq!(*iova, iovas[i], "segment {i} of offset {offset} len {len}");
            }
        }
    }
}
