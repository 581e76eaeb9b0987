//! One NVMe controller driven from userspace: reset and enable, the admin queue (one command
//! at a time, polled, under a mutex: it is used to open and close channels, never on the I/O
//! path), Identify, I/O queue pair creation and deletion, normal shutdown at the end, and the
//! device's health — a controller fatal status, a controller that no longer answers or a
//! command that never completes marks it failed for good: every channel then fails its I/O
//! with [`BdevError::DeviceFailed`] and the controller is disabled.
//!
//! Memory safety when a controller misbehaves rests on the IOMMU: DMA memory is unmapped
//! before it is freed and I/O addresses are never reused (see `sys.rs`), so a late write from
//! a confused controller faults in the IOMMU instead of landing in reused memory.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::dma::{DmaMapper, DmaRegion};
use super::prp::PAGE_BYTES;
use super::queue::{CompletionQueue, SubmissionQueue};
use super::regs::{self, cc, csts, Cap, Registers};
use crate::bdev::BdevError;
use crate::command::Command;
use crate::constants::{CQE_BYTES, SQE_BYTES, VFIO_ADMIN_ENTRIES, VFIO_IO_QUEUES_WANTED};
use crate::identify::{self, cns, ControllerInfo, NamespaceFormat};

/// How long the driver waits for a controller.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub admin: Duration,
    pub io: Duration,
}

/// The admin queue's memory: its SQ, its CQ and one page for command data, a page each.
const ADMIN_SQ_OFF: usize = 0;
const ADMIN_CQ_OFF: usize = PAGE_BYTES;
const ADMIN_DATA_OFF: usize = 2 * PAGE_BYTES;
const ADMIN_REGION_BYTES: usize = 3 * PAGE_BYTES;
const _: () = assert!(VFIO_ADMIN_ENTRIES as usize * SQE_BYTES <= PAGE_BYTES);
const _: () = assert!(VFIO_ADMIN_ENTRIES as usize * CQE_BYTES <= PAGE_BYTES);

struct AdminQueue {
    sq: SubmissionQueue,
    cq: CompletionQueue,
    region: DmaRegion,
    next_cid: u16,
}

// SAFETY: the queues' raw pointers point into `region`, which the AdminQueue owns; the mutex
// around it serialises every access.
unsafe impl Send for AdminQueue {}

pub struct Controller {
    pub name: String,
    pub regs: Arc<dyn Registers>,
    pub dma: Arc<dyn DmaMapper>,
    pub cap: Cap,
    pub timeouts: Timeouts,
    pub ident: ControllerInfo,
    /// I/O queue pairs the controller granted.
    pub io_queues: u16,
    admin: Mutex<AdminQueue>,
    /// Which I/O queue ids (1-based, index qid - 1) are in use.
    qids: Mutex<Vec<bool>>,
    /// Why the device failed, once it has.
    failed: OnceLock<String>,
    /// Set once shut down, so drop does not do it twice.
    shut_down: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks is our bug and already reported; the state
    // under it stays consistent (plain counters and flags), so carry on.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn other(msg: String) -> std::io::Error {
    std::io::Error::other(msg)
}

impl Controller {
    /// Resets the controller, sets up its admin queue, enables it and identifies it.
    pub fn start(
        name: String,
        regs: Arc<dyn Registers>,
        dma: Arc<dyn DmaMapper>,
        timeouts: Timeouts,
    ) -> std::io::Result<Controller> {
        let cap = Cap(regs.read64(regs::CAP));
        if cap.0 == u64::MAX {
            return Err(other(format!("{name}: the controller does not respond (CAP reads all ones)")));
        }
        if !cap.nvm_command_set() {
            return Err(other(format!("{name}: the controller does not support the NVM command set")));
        }
        if cap.min_page_shift() > 12 {
            return Err(other(format!(
                "{name}: the controller's smallest memory page is {} KiB; this driver uses 4 KiB pages",
                1 << (cap.min_page_shift() - 10)
            )));
        }
        if cap.max_queue_entries() < 2 {
            return Err(other(format!(
                "{name}: CAP.MQES says queues of {} entry; a queue needs two",
                cap.max_queue_entries()
            )));
        }
        // The admin queue's doorbells must exist; I/O queues are capped below to those that do.
        if regs::cq_doorbell(0, cap.doorbell_stride()) + 4 > regs.bar_bytes() {
            return Err(other(format!(
                "{name}: a doorbell stride of {} bytes puts the doorbells beyond BAR0 ({} bytes)",
                cap.doorbell_stride(),
                regs.bar_bytes()
            )));
        }
        let version = regs.read32(regs::VS);
        disable(&*regs, cap).map_err(|why| other(format!("{name}: {why}")))?;
        let region = dma.alloc(ADMIN_REGION_BYTES)?;
        let stride = cap.doorbell_stride();
        let entries = VFIO_ADMIN_ENTRIES.min(cap.max_queue_entries().min(4096) as u16);
        // SAFETY: both queues lie in `region` (a page each, asserted above), which the admin
        // queue owns for as long as it uses them.
        let (sq, cq) = unsafe {
            (
                SubmissionQueue::new(region.ptr_at(ADMIN_SQ_OFF), entries, regs::sq_doorbell(0, stride)),
                CompletionQueue::new(region.ptr_at(ADMIN_CQ_OFF), entries, regs::cq_doorbell(0, stride)),
            )
        };
        let size = u32::from(entries - 1);
        regs.write32(regs::AQA, size << 16 | size);
        regs.write64(regs::ASQ, region.iova_at(ADMIN_SQ_OFF));
        regs.write64(regs::ACQ, region.iova_at(ADMIN_CQ_OFF));
        // 4 KiB pages (MPS 0), NVM command set, round robin, 64/16-byte entries.
        regs.write32(regs::CC, cc::EN | cc::IOSQES_64 | cc::IOCQES_16);
        wait_ready(&*regs, cap, true).map_err(|why| other(format!("{name}: enabling it: {why}")))?;
        let mut c = Controller {
            name,
            regs,
            dma,
            cap,
            timeouts,
            ident: ControllerInfo::decode(&[0u8; crate::constants::IDENTIFY_BYTES])
                .ok_or_else(|| other("identify".into()))?,
            io_queues: 0,
            admin: Mutex::new(AdminQueue { sq, cq, region, next_cid: 0 }),
            qids: Mutex::new(Vec::new()),
            failed: OnceLock::new(),
            shut_down: AtomicBool::new(false),
        };
        let id =
            c.admin(Command::identify(cns::CONTROLLER, 0), true).map_err(|e| c.io_error("Identify Controller", e))?;
        c.ident =
            ControllerInfo::decode(&id.1).ok_or_else(|| other(format!("{}: short Identify Controller", c.name)))?;
        let granted = c
            .admin(Command::set_number_of_queues(VFIO_IO_QUEUES_WANTED), false)
            .map_err(|e| c.io_error("Set Features", e))?
            .0;
        // NSQA and NCQA are 0-based; a queue pair needs one of each.
        c.io_queues = ((granted & 0xFFFF).min(granted >> 16) + 1).min(u32::from(VFIO_IO_QUEUES_WANTED)) as u16;
        let stride = cap.doorbell_stride();
        while c.io_queues > 0 && regs::cq_doorbell(c.io_queues, stride) + 4 > c.regs.bar_bytes() {
            c.io_queues -= 1;
        }
        *lock(&c.qids) = vec![false; usize::from(c.io_queues)];
        tracing::info!(
            controller = %c.name,
            model = %c.ident.model,
            serial = %c.ident.serial,
            version = format!("{}.{}", version >> 16, (version >> 8) & 0xFF),
            io_queues = c.io_queues,
            max_queue_entries = cap.max_queue_entries(),
            "NVMe controller enabled by the VFIO driver"
        );
        Ok(c)
    }

    fn io_error(&self, what: &str, e: BdevError) -> std::io::Error {
        other(format!("{}: {what} failed: {e}", self.name))
    }

    /// Runs one admin command to completion; with `read_page` the controller returns a page of
    /// data (Identify). Returns the completion's DW0 and the data.
    pub fn admin(&self, mut cmd: Command, read_page: bool) -> Result<(u32, Vec<u8>), BdevError> {
        if let Some(why) = self.failed() {
            return Err(BdevError::DeviceFailed(why));
        }
        let mut a = lock(&self.admin);
        let cid = a.next_cid;
        a.next_cid = a.next_cid.wrapping_add(1);
        cmd.set_cid(cid);
        if read_page {
            // SAFETY: the data page is inside the admin region, and no admin command that could
            // write it is outstanding (one at a time, under this lock).
            unsafe { std::ptr::write_bytes(a.region.ptr_at(ADMIN_DATA_OFF), 0, PAGE_BYTES) };
            let iova = a.region.iova_at(ADMIN_DATA_OFF);
            cmd.set_prps(iova, 0);
        }
        a.sq.push(&cmd);
        a.sq.ring(&*self.regs);
        let start = Instant::now();
        loop {
            if let Some(c) = a.cq.pop() {
                a.sq.consumed_to(c.sqhd);
                a.cq.ring(&*self.regs);
                if c.cid != cid {
                    tracing::warn!(controller = %self.name, "admin completion for unknown command id {}", c.cid);
                    continue;
                }
                if !c.status.is_success() {
                    return Err(BdevError::Nvme(c.status));
                }
                let mut data = Vec::new();
                if read_page {
                    data = vec![0u8; PAGE_BYTES];
                    // SAFETY: the command completed, so the controller no longer writes the page.
                    unsafe {
                        std::ptr::copy_nonoverlapping(a.region.ptr_at(ADMIN_DATA_OFF), data.as_mut_ptr(), PAGE_BYTES)
                    };
                }
                return Ok((c.dw0, data));
            }
            if start.elapsed() > self.timeouts.admin {
                drop(a);
                let why = format!(
                    "admin command {:#04x} did not complete within {} s",
                    cmd.opcode(),
                    self.timeouts.admin.as_secs_f64()
                );
                self.fail(why.clone());
                return Err(BdevError::DeviceFailed(why));
            }
            if !self.healthy() {
                return Err(BdevError::DeviceFailed(self.failed().unwrap_or_default()));
            }
            std::thread::sleep(Duration::from_micros(20));
        }
    }

    /// The namespace this device drives: the first active one.
    pub fn first_namespace(&self) -> Result<u32, BdevError> {
        let (_, list) = self.admin(Command::identify(cns::ACTIVE_NAMESPACES, 0), true)?;
        identify::decode_active_namespaces(&list).first().copied().ok_or(BdevError::Os(libc::ENODEV))
    }

    pub fn namespace_format(&self, nsid: u32) -> Result<Option<NamespaceFormat>, BdevError> {
        let (_, data) = self.admin(Command::identify(cns::NAMESPACE, nsid), true)?;
        Ok(NamespaceFormat::decode(&data))
    }

    /// Creates I/O queue pair: a completion queue of `entries` at `cq_iova`, then its
    /// submission queue at `sq_iova`. Returns the queue id.
    pub fn create_queue_pair(&self, entries: u16, cq_iova: u64, sq_iova: u64) -> Result<u16, BdevError> {
        let qid = {
            let mut q = lock(&self.qids);
            let Some(i) = q.iter().position(|used| !used) else {
                return Err(BdevError::Os(libc::EBUSY));
            };
            q[i] = true;
            i as u16 + 1
        };
        let release = || lock(&self.qids)[usize::from(qid) - 1] = false;
        if let Err(e) = self.admin(Command::create_io_cq(qid, entries, cq_iova), false) {
            release();
            return Err(e);
        }
        if let Err(e) = self.admin(Command::create_io_sq(qid, entries, qid, sq_iova), false) {
            if self.admin(Command::delete_io_cq(qid), false).is_ok() {
                release();
            }
            return Err(e);
        }
        Ok(qid)
    }

    /// Deletes queue pair `qid` (deleting the SQ aborts whatever it still holds). Returns
    /// whether the controller confirmed both deletions: only then is its memory unused.
    pub fn delete_queue_pair(&self, qid: u16) -> bool {
        let ok = self.admin(Command::delete_io_sq(qid), false).is_ok()
            && self.admin(Command::delete_io_cq(qid), false).is_ok();
        if ok {
            if let Some(used) = lock(&self.qids).get_mut(usize::from(qid) - 1) {
                *used = false;
            }
        }
        ok
    }

    pub fn failed(&self) -> Option<String> {
        self.failed.get().cloned()
    }

    pub fn is_failed(&self) -> bool {
        self.failed.get().is_some()
    }

    /// Marks the device failed (the first reason wins) and disables the controller.
    pub fn fail(&self, why: String) {
        if self.failed.set(why.clone()).is_ok() {
            tracing::error!(controller = %self.name, "{why}: the device is failed, every I/O on it fails from now on");
            if let Err(e) = disable(&*self.regs, self.cap) {
                tracing::error!(controller = %self.name, "disabling it: {e}");
            }
        }
    }

    /// Reads CSTS: a controller fatal status or a controller that reads all ones fails the
    /// device. Returns whether it is still healthy.
    pub fn healthy(&self) -> bool {
        if self.is_failed() {
            return false;
        }
        let s = self.regs.read32(regs::CSTS);
        if s == csts::GONE {
            self.fail(
                "the controller no longer responds (CSTS reads all ones: removed, or reset behind our back)".into(),
            );
        } else if s & csts::CFS != 0 {
            self.fail("controller fatal status (CSTS.CFS)".into());
        } else if s & csts::RDY == 0 {
            self.fail("the controller is no longer ready (CSTS.RDY clear)".into());
        }
        !self.is_failed()
    }

    /// Normal shutdown: the controller writes its volatile cache out; then disabled.
    pub fn shutdown(&self) {
        if self.shut_down.swap(true, Ordering::SeqCst) || self.is_failed() {
            return;
        }
        let c = self.regs.read32(regs::CC);
        self.regs.write32(regs::CC, (c & !cc::SHN_MASK) | cc::SHN_NORMAL);
        let start = Instant::now();
        loop {
            let s = self.regs.read32(regs::CSTS);
            if s == csts::GONE || s & csts::SHST_MASK == csts::SHST_COMPLETE {
                break;
            }
            if start.elapsed() > self.cap.ready_timeout().max(Duration::from_secs(5)) {
                tracing::warn!(controller = %self.name, "shutdown did not complete; disabling anyway");
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if let Err(e) = disable(&*self.regs, self.cap) {
            tracing::warn!(controller = %self.name, "disabling after shutdown: {e}");
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Clears CC.EN and waits for CSTS.RDY to follow.
fn disable(regs: &dyn Registers, cap: Cap) -> Result<(), String> {
    let c = regs.read32(regs::CC);
    if c & cc::EN != 0 {
        regs.write32(regs::CC, c & !cc::EN);
    }
    wait_ready(regs, cap, false)
}

/// Waits until CSTS.RDY equals `ready`, up to CAP.TO.
fn wait_ready(regs: &dyn Registers, cap: Cap, ready: bool) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let s = regs.read32(regs::CSTS);
        if s == csts::GONE {
            return Err("the controller does not respond (CSTS reads all ones)".into());
        }
        if ready && s & csts::CFS != 0 {
            return Err("controller fatal status (CSTS.CFS)".into());
        }
        if (s & csts::RDY != 0) == ready {
            return Ok(());
        }
        if start.elapsed() > cap.ready_timeout() {
            return Err(format!(
                "CSTS.RDY did not become {} within {} s (CAP.TO)",
                ready as u8,
                cap.ready_timeout().as_secs_f64()
            ));
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}
