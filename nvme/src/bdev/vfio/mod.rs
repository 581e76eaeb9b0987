//! A userspace NVMe driver over VFIO, in SPDK's shape: the controller is bound to `vfio-pci`,
//! we map its BAR0 and drive it ourselves — reset and enable, the admin queue, Identify — and
//! each channel (each reactor that uses the device) creates an I/O queue pair of its own and
//! polls its completion queue by phase tag. No interrupts and no system calls on the I/O path:
//! a command is a 64-byte store and a doorbell write, a completion one memory read.
//!
//! **How data reaches the device: bounce buffers.** Our I/O buffers (`AlignedBuf`) are ordinary
//! heap memory, allocated and freed anywhere, so the driver does not hand their pages to the
//! controller. Each channel maps one region of DMA memory at start (`VFIO_BOUNCE_BYTES`, 4 MiB,
//! pinned and mapped in the IOMMU once); a command takes free 4 KiB pages of it, a write copies
//! its data in before the doorbell, a read copies out after the completion, and PRP lists in
//! pages of the same region describe the pages to the controller (they need not be
//! contiguous). The cost is one memcpy per byte: about 0.3–0.5 µs per 4 KiB on a current core,
//! small next to a flash write (10+ µs) but a real share of a core at millions of IOPS. The
//! alternative, mapping each caller's pages with `VFIO_IOMMU_MAP_DMA` per I/O, costs a system
//! call, page pinning and an IOTLB invalidation per I/O (more than the copy), and mapping the
//! buffer pools once would require every buffer the engine writes to come from such a pool and
//! stay mapped for its life — worth doing when buffers are one vocabulary end to end (see
//! STYLE.md, "one buffer from the wire to the device"), not before. Bounce pages also keep the
//! device's DMA out of memory we free: only the driver's own regions are ever mapped.
//!
//! A command the controller does not complete within `VFIO_IO_TIMEOUT`, a controller fatal
//! status (CSTS.CFS) or a controller that reads all ones fails the device (`controller.rs`):
//! every I/O in flight and every later one completes with [`BdevError::DeviceFailed`]; the
//! write-back engine above turns flash errors into write-through.
//!
//! No interrupts means a reactor asleep in `io_uring_enter` is not woken by a completion:
//! while a channel has commands in flight it keeps a short timer (`VFIO_WAKE_NS`) armed in its
//! reactor's ring. A reactor that is spinning (it has work) never notices it.

mod controller;
mod dma;
#[cfg(test)]
mod fake;
mod prp;
mod queue;
mod regs;
mod sys;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use io_uring::{opcode, types};

pub use sys::{check_bound, pci_address};

use self::controller::{Controller, Timeouts};
use self::dma::{DmaMapper, DmaRegion, PagePool};
use self::prp::{ListPage, ENTRIES_PER_LIST, PAGE_BYTES};
use self::queue::{CompletionQueue, SubmissionQueue};
use self::regs::Registers;
use super::nvme_io::{geometry_of, plan, spans, Geometry, Part};
use super::{check_range, AlignedBuf, BdevChannel, BdevDone, BdevError, BdevInfo, BdevIo, BdevOp, BlockDevice};
use crate::constants::{
    CQE_BYTES, SQE_BYTES, VFIO_ADMIN_TIMEOUT, VFIO_BOUNCE_BYTES, VFIO_HEALTH_EVERY_POLLS, VFIO_IO_TIMEOUT,
    VFIO_QUEUE_ENTRIES, VFIO_WAKE_NS,
};
use crate::status::Status;
use crate::uring::{kind, user_data, Ring};

/// The `user_data` slot of the wake-up timer armed in the reactor's ring.
const TIMER_SLOT: u32 = crate::uring::slot::CHANNEL_WAKE;

/// The wake-up timer's period. Static: the kernel reads it when it takes the timer from the
/// submission queue, which may be after the channel that queued it is gone.
static WAKE: types::Timespec = types::Timespec::new().nsec(VFIO_WAKE_NS);

/// What the device's channels share.
struct Shared {
    info: BdevInfo,
    geometry: Geometry,
    ctrl: Controller,
}

pub struct VfioDevice {
    shared: Arc<Shared>,
}

impl VfioDevice {
    /// Opens the NVMe controller at PCI address `pci` (bound to vfio-pci) and its first active
    /// namespace, with `block_size`-byte blocks (a whole number of the namespace's LBAs).
    pub fn open(pci: &str, block_size: u32) -> std::io::Result<VfioDevice> {
        let (name, regs, dma) = sys::open(pci)?;
        VfioDevice::start(name, regs, dma, block_size, Timeouts { admin: VFIO_ADMIN_TIMEOUT, io: VFIO_IO_TIMEOUT })
    }

    fn start(
        name: String,
        regs: Arc<dyn Registers>,
        dma: Arc<dyn DmaMapper>,
        block_size: u32,
        timeouts: Timeouts,
    ) -> std::io::Result<VfioDevice> {
        let ctrl = Controller::start(name.clone(), regs, dma, timeouts)?;
        let failed = |what: &str, e: BdevError| std::io::Error::other(format!("{name}: {what}: {e}"));
        let nsid = ctrl.first_namespace().map_err(|e| failed("no active namespace", e))?;
        let format = ctrl
            .namespace_format(nsid)
            .map_err(|e| failed("Identify Namespace", e))?
            .ok_or_else(|| std::io::Error::other(format!("{name}: namespace {nsid} reports no usable LBA format")))?;
        let geometry = geometry_of(&name, nsid, &ctrl.ident, &format, block_size, usize::MAX)?;
        let blocks = format.blocks / u64::from(block_size >> geometry.lba_shift);
        if blocks == 0 {
            return Err(std::io::Error::other(format!("{name}: namespace {nsid} holds less than one block")));
        }
        tracing::info!(
            device = %name,
            nsid,
            lba_bytes = format.lba_bytes,
            max_transfer = geometry.max_transfer,
            volatile_cache = ctrl.ident.vwc,
            deallocate = ?geometry.deallocate,
            "NVMe namespace on the VFIO driver"
        );
        let info = BdevInfo { name, block_size, blocks, volatile_cache: ctrl.ident.vwc };
        Ok(VfioDevice { shared: Arc::new(Shared { info, geometry, ctrl }) })
    }

    fn open_channel(&self, id: u32, bounce_bytes: usize) -> std::io::Result<VfioChannel> {
        VfioChannel::new(id, self.shared.clone(), bounce_bytes)
    }
}

impl BlockDevice for VfioDevice {
    fn info(&self) -> &BdevInfo {
        &self.shared.info
    }
    fn channel(&self, id: u32) -> std::io::Result<Box<dyn BdevChannel>> {
        Ok(Box::new(self.open_channel(id, VFIO_BOUNCE_BYTES)?))
    }
    /// A Flush on a queue pair of its own (shutdown, not the I/O path).
    fn sync(&self) -> std::io::Result<()> {
        if !self.shared.info.volatile_cache {
            return Ok(());
        }
        let mut ch = self.open_channel(0, PAGE_BYTES)?;
        let mut ring = Ring::new(8)?;
        ch.submit(BdevIo::new(BdevOp::Flush, 0, 0, None, 0), &mut ring);
        let mut done = Vec::new();
        while ch.poll(&mut done) == 0 {
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
        done.pop()
            .map_or(Ok(()), |d| d.result)
            .map_err(|e| std::io::Error::other(format!("{}: flush failed: {e}", self.shared.info.name)))
    }
}

/// One I/O the channel has taken and not yet handed back.
struct Pending {
    io: BdevIo,
    /// Commands of this I/O not yet completed.
    left: u32,
    result: Result<(), BdevError>,
}

/// One command at the controller, by command id.
struct Slot {
    io: u32,
    /// Its data pages, then its PRP list pages (indices into the bounce area).
    pages: Vec<u32>,
    /// The slice of the I/O's data it moves, copied out of its pages on completion if a read.
    data: Option<(u64, u32)>,
    read: bool,
    issued: Instant,
}

struct VfioChannel {
    id: u32,
    shared: Arc<Shared>,
    qid: u16,
    /// The queues and bounce pages; `None` only while being dropped.
    region: Option<DmaRegion>,
    sq: SubmissionQueue,
    cq: CompletionQueue,
    /// Offset of the first bounce page in the region.
    pages_off: usize,
    pool: PagePool,
    /// By command id; entries - 1 of them, so neither queue can overrun.
    slots: Vec<Option<Slot>>,
    free_cids: Vec<u16>,
    ios: Vec<Option<Pending>>,
    free_ios: Vec<u32>,
    /// Commands waiting for a command id or bounce pages, in order.
    waiting: VecDeque<(u32, Part)>,
    done: VecDeque<BdevDone>,
    /// I/Os taken and not yet in `done`.
    in_flight: usize,
    /// Commands at the controller.
    outstanding: usize,
    timer_armed: bool,
    polls: u32,
    /// The device failed and this channel has failed everything it held.
    dead: bool,
    parts: Vec<Part>,
    spans: Vec<(usize, usize, usize)>,
    page_scratch: Vec<u32>,
    iova_scratch: Vec<u64>,
}

impl VfioChannel {
    fn new(id: u32, shared: Arc<Shared>, bounce_bytes: usize) -> std::io::Result<VfioChannel> {
        let ctrl = &shared.ctrl;
        if let Some(why) = ctrl.failed() {
            return Err(std::io::Error::other(format!("{}: device failed: {why}", shared.info.name)));
        }
        let entries = VFIO_QUEUE_ENTRIES.min(ctrl.cap.max_queue_entries().min(u32::from(u16::MAX)) as u16);
        let sq_bytes = (usize::from(entries) * SQE_BYTES).next_multiple_of(PAGE_BYTES);
        let cq_bytes = (usize::from(entries) * CQE_BYTES).next_multiple_of(PAGE_BYTES);
        let pages = bounce_bytes.div_ceil(PAGE_BYTES).max(1);
        let region = ctrl.dma.alloc(sq_bytes + cq_bytes + pages * PAGE_BYTES)?;
        let qid =
            ctrl.create_queue_pair(entries, region.iova_at(sq_bytes), region.iova_at(0)).map_err(|e| match e {
                BdevError::Os(libc::EBUSY) => std::io::Error::other(format!(
                    "{}: all {} I/O queue pairs the controller granted are in use (one per reactor using the device)",
                    shared.info.name, ctrl.io_queues
                )),
                e => std::io::Error::other(format!("{}: creating an I/O queue pair: {e}", shared.info.name)),
            })?;
        let stride = ctrl.cap.doorbell_stride();
        // SAFETY: the SQ is the region's first `sq_bytes`, the CQ the next `cq_bytes` (zeroed
        // by the allocator), exactly what the controller was given; the channel owns the
        // region until the queues are deleted (drop).
        let (sq, cq) = unsafe {
            (
                SubmissionQueue::new(region.ptr_at(0), entries, regs::sq_doorbell(qid, stride)),
                CompletionQueue::new(region.ptr_at(sq_bytes), entries, regs::cq_doorbell(qid, stride)),
            )
        };
        let cids = entries - 1;
        tracing::debug!(device = %shared.info.name, qid, entries, bounce_bytes, "VFIO I/O queue pair created");
        Ok(VfioChannel {
            id,
            shared: shared.clone(),
            qid,
            region: Some(region),
            sq,
            cq,
            pages_off: sq_bytes + cq_bytes,
            pool: PagePool::new(pages as u32),
            slots: (0..cids).map(|_| None).collect(),
            free_cids: (0..cids).rev().collect(),
            ios: Vec::new(),
            free_ios: Vec::new(),
            waiting: VecDeque::new(),
            done: VecDeque::new(),
            in_flight: 0,
            outstanding: 0,
            timer_armed: false,
            polls: 0,
            dead: false,
            parts: Vec::new(),
            spans: Vec::new(),
            page_scratch: Vec::new(),
            iova_scratch: Vec::new(),
        })
    }

    fn region(&self) -> &DmaRegion {
        // Only `drop` takes it.
        self.region.as_ref().expect("VFIO channel region present until drop")
    }

    fn page_ptr(&self, page: u32) -> *mut u8 {
        self.region().ptr_at(self.pages_off + page as usize * PAGE_BYTES)
    }

    fn page_iova(&self, page: u32) -> u64 {
        self.region().iova_at(self.pages_off + page as usize * PAGE_BYTES)
    }

    fn arm_timer(&mut self, ring: &mut Ring) {
        if self.timer_armed || self.in_flight == 0 || self.dead {
            return;
        }
        let e = opcode::Timeout::new(&WAKE as *const types::Timespec).build().user_data(user_data(
            kind::BDEV,
            self.id,
            TIMER_SLOT,
        ));
        ring.push(e);
        self.timer_armed = true;
    }

    /// Starts waiting commands, in order, while command ids and pages last.
    fn start_waiting(&mut self) {
        while let Some((io_idx, part)) = self.waiting.pop_front() {
            if let Err(part) = self.issue(io_idx, part) {
                self.waiting.push_front((io_idx, part));
                break;
            }
        }
        self.sq.ring(&*self.shared.ctrl.regs);
    }

    /// Puts one command in the submission queue, or hands it back if it cannot start yet.
    fn issue(&mut self, io_idx: u32, part: Part) -> Result<(), Part> {
        let data_pages = match (part.data, part.dsm) {
            (Some((_, len)), _) => (len as usize).div_ceil(PAGE_BYTES),
            (None, Some(_)) => 1,
            (None, None) => 0,
        };
        let lists = prp::list_pages(data_pages);
        if data_pages + lists > self.pool.total() {
            // Larger than this channel's whole bounce area (only a channel opened with a small
            // one, like sync's): it could never start, so it fails instead of waiting forever.
            self.part_done(io_idx, Err(BdevError::Os(libc::E2BIG)));
            return Ok(());
        }
        let Some(cid) = self.free_cids.pop() else { return Err(part) };
        let mut pages = std::mem::take(&mut self.page_scratch);
        pages.clear();
        if !self.pool.take(data_pages + lists, &mut pages) {
            self.free_cids.push(cid);
            self.page_scratch = pages;
            return Err(part);
        }
        let mut cmd = part.cmd;
        let read = cmd.opcode() == crate::command::io::READ;
        if let (Some((start, len)), false) = (part.data, read) {
            self.copy_in(io_idx, start, u64::from(len), &pages[..data_pages]);
        }
        if let Some(range) = part.dsm {
            // SAFETY: a page of our region that no command in flight uses (just taken).
            let page = unsafe { std::slice::from_raw_parts_mut(self.page_ptr(pages[0]), PAGE_BYTES) };
            page.fill(0);
            range.encode(page);
        }
        if data_pages > 0 {
            let mut iovas = std::mem::take(&mut self.iova_scratch);
            iovas.clear();
            iovas.extend(pages[..data_pages].iter().map(|&p| self.page_iova(p)));
            let mut list_pages: Vec<ListPage> = pages[data_pages..]
                .iter()
                .map(|&p| ListPage {
                    iova: self.page_iova(p),
                    // SAFETY: a page of our region no command in flight uses (just taken); the
                    // controller reads it only after the doorbell.
                    entries: unsafe { std::slice::from_raw_parts_mut(self.page_ptr(p) as *mut u64, ENTRIES_PER_LIST) },
                })
                .collect();
            let (prp1, prp2) = prp::build(&iovas, &mut list_pages);
            cmd.set_prps(prp1, prp2);
            self.iova_scratch = iovas;
        }
        cmd.set_cid(cid);
        self.sq.push(&cmd);
        self.slots[usize::from(cid)] = Some(Slot { io: io_idx, pages, data: part.data, read, issued: Instant::now() });
        self.outstanding += 1;
        Ok(())
    }

    /// Copies bytes `start..start + len` of I/O `io_idx`'s data into bounce `pages`.
    fn copy_in(&mut self, io_idx: u32, start: u64, len: u64, pages: &[u32]) {
        let Some(Some(p)) = self.ios.get(io_idx as usize) else { return };
        spans(&p.io, start, len, &mut self.spans);
        let pieces: Vec<&AlignedBuf> = p.io.pieces().collect();
        let mut at = 0usize;
        for &(i, off, n) in &self.spans {
            let mut src = &pieces[i][off..off + n];
            while !src.is_empty() {
                let (page, in_page) = (at / PAGE_BYTES, at % PAGE_BYTES);
                let k = src.len().min(PAGE_BYTES - in_page);
                // SAFETY: the page belongs to this command (taken, not yet submitted) and
                // in_page + k <= PAGE_BYTES.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.page_ptr(pages[page]).add(in_page), k) };
                src = &src[k..];
                at += k;
            }
        }
    }

    /// Copies a completed read's bounce pages into its buffer.
    fn copy_out(&mut self, io_idx: u32, start: u64, len: u32, pages: &[u32]) {
        let Some(region) = self.region.as_ref() else { return };
        let Some(Some(p)) = self.ios.get_mut(io_idx as usize) else { return };
        let Some(buf) = p.io.buf.as_mut() else { return };
        let Some(dst) = buf.get_mut(start as usize..start as usize + len as usize) else { return };
        for (chunk, &page) in dst.chunks_mut(PAGE_BYTES).zip(pages) {
            let src = region.ptr_at(self.pages_off + page as usize * PAGE_BYTES);
            // SAFETY: the command completed, so the controller no longer writes its pages;
            // chunk.len() <= PAGE_BYTES.
            unsafe { std::ptr::copy_nonoverlapping(src, chunk.as_mut_ptr(), chunk.len()) };
        }
    }

    fn complete(&mut self, cid: u16, status: Status) {
        let Some(slot) = self.slots.get_mut(usize::from(cid)).and_then(|s| s.take()) else {
            tracing::warn!(device = %self.shared.info.name, qid = self.qid, cid, "completion for a command not in flight; ignored");
            return;
        };
        self.free_cids.push(cid);
        self.outstanding -= 1;
        let result = if status.is_success() { Ok(()) } else { Err(BdevError::Nvme(status)) };
        if let (true, Ok(()), Some((start, len))) = (slot.read, &result, slot.data) {
            let data_pages = (len as usize).div_ceil(PAGE_BYTES);
            self.copy_out(slot.io, start, len, &slot.pages[..data_pages]);
        }
        self.pool.give(&slot.pages);
        let mut pages = slot.pages;
        pages.clear();
        self.page_scratch = pages;
        self.part_done(slot.io, result);
    }

    fn part_done(&mut self, io_idx: u32, result: Result<(), BdevError>) {
        let Some(Some(p)) = self.ios.get_mut(io_idx as usize) else { return };
        if p.result.is_ok() {
            p.result = result;
        }
        p.left -= 1;
        if p.left == 0 {
            if let Some(p) = self.ios[io_idx as usize].take() {
                self.free_ios.push(io_idx);
                self.in_flight -= 1;
                self.done.push_back(p.io.done(p.result));
            }
        }
    }

    /// Every so often while commands are out: the oldest command's age and CSTS.
    fn check_health(&mut self) {
        let ctrl = &self.shared.ctrl;
        let now = Instant::now();
        let late =
            self.slots.iter().enumerate().find_map(|(cid, s)| {
                s.as_ref().filter(|s| now.duration_since(s.issued) > ctrl.timeouts.io).map(|_| cid)
            });
        if let Some(cid) = late {
            ctrl.fail(format!(
                "command {cid} on I/O queue {} did not complete within {} s",
                self.qid,
                ctrl.timeouts.io.as_secs_f64()
            ));
        } else {
            ctrl.healthy();
        }
    }

    /// The device failed: everything this channel holds fails with it. The bounce pages of
    /// commands the controller never completed are not reused (the channel takes no more).
    fn fail_all(&mut self) {
        self.dead = true;
        let why = BdevError::DeviceFailed(self.shared.ctrl.failed().unwrap_or_default());
        let held: Vec<u32> = self.slots.iter_mut().filter_map(|s| s.take()).map(|s| s.io).collect();
        self.outstanding = 0;
        for io in held {
            self.part_done(io, Err(why.clone()));
        }
        while let Some((io, _)) = self.waiting.pop_front() {
            self.part_done(io, Err(why.clone()));
        }
    }
}

impl BdevChannel for VfioChannel {
    fn submit(&mut self, io: BdevIo, ring: &mut Ring) {
        if self.dead || self.shared.ctrl.is_failed() {
            let why = self.shared.ctrl.failed().unwrap_or_default();
            self.done.push_back(io.done(Err(BdevError::DeviceFailed(why))));
            return;
        }
        if let Err(e) = check_range(&self.shared.info, &io) {
            self.done.push_back(io.done(Err(e)));
            return;
        }
        if !io.buffers_match() {
            self.done.push_back(io.done(Err(BdevError::Os(libc::EINVAL))));
            return;
        }
        let mut parts = std::mem::take(&mut self.parts);
        let planned = plan(&self.shared.geometry, io.op, io.offset, io.len, &mut parts);
        match planned {
            Err(e) => self.done.push_back(io.done(Err(e))),
            Ok(()) if parts.is_empty() => self.done.push_back(io.done(Ok(()))),
            Ok(()) => {
                let idx = self.free_ios.pop().unwrap_or_else(|| {
                    self.ios.push(None);
                    (self.ios.len() - 1) as u32
                });
                self.ios[idx as usize] = Some(Pending { io, left: parts.len() as u32, result: Ok(()) });
                self.in_flight += 1;
                self.waiting.extend(parts.drain(..).map(|p| (idx, p)));
                self.start_waiting();
                self.arm_timer(ring);
            }
        }
        self.parts = parts;
    }

    fn on_cqe(&mut self, slot: u32, _res: i32, ring: &mut Ring) {
        if slot == TIMER_SLOT {
            self.timer_armed = false;
            self.arm_timer(ring);
        }
    }

    fn poll(&mut self, done: &mut Vec<BdevDone>) -> usize {
        if self.outstanding > 0 && !self.dead {
            let mut reaped = 0;
            while let Some(c) = self.cq.pop() {
                self.sq.consumed_to(c.sqhd);
                self.complete(c.cid, c.status);
                reaped += 1;
            }
            if reaped > 0 {
                self.cq.ring(&*self.shared.ctrl.regs);
                self.start_waiting();
            }
            self.polls = self.polls.wrapping_add(1);
            if self.outstanding > 0 && self.polls.is_multiple_of(VFIO_HEALTH_EVERY_POLLS) {
                self.check_health();
            }
        }
        if !self.dead && self.in_flight > 0 && self.shared.ctrl.is_failed() {
            self.fail_all();
        }
        let n = self.done.len();
        done.extend(self.done.drain(..));
        n
    }

    fn in_flight(&self) -> usize {
        self.in_flight + self.done.len()
    }
}

impl Drop for VfioChannel {
    /// Deletes the queue pair (which aborts what it still holds), then frees its memory. A
    /// controller that cannot confirm the deletion is failed, and the memory is unmapped from
    /// the IOMMU before it is freed either way, so it can no longer reach it.
    fn drop(&mut self) {
        let ctrl = &self.shared.ctrl;
        if !ctrl.is_failed() && !ctrl.delete_queue_pair(self.qid) {
            ctrl.fail(format!("I/O queue pair {} could not be deleted", self.qid));
        }
        drop(self.region.take());
    }
}

#[cfg(test)]
mod tests;
