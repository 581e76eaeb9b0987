//! An iSCSI LUN through libiscsi (FFI to the system library; no maintained crate exists).
//!
//! The shape matches the reactors: commands are submitted with a token and complete later,
//! when `poll` has let libiscsi service its socket — nothing blocks except `connect`, which
//! the control plane calls. Read data lands directly in the command's own buffer
//! (`scsi_task_add_data_in_buffer`); write data is borrowed from the command until it
//! completes. A lost connection is libiscsi's to restore: it reconnects and re-queues the
//! commands in flight, so callers see them complete late rather than fail; after a target
//! restart the first command may come back as `SanError::Retry` (UNIT ATTENTION), which the
//! caller resubmits. `logged_in` tells the volume whether the SAN is reachable right now.
//!
//! Every pointer handed to C is owned by a `Pending` box whose address libiscsi gets as
//! private data and which is reclaimed exactly once, in the completion callback.

use super::IscsiUrl;
use stager_nvme::bdev::AlignedBuf;
use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::rc::Rc;

#[repr(C)]
struct IscsiContext {
    _private: [u8; 0],
}

#[repr(C)]
struct ScsiTask {
    _private: [u8; 0],
}

/// READ CAPACITY(16) as libiscsi unmarshals it (scsi-lowlevel.h, `struct scsi_readcapacity16`).
#[repr(C)]
struct ReadCapacity16 {
    returned_lba: u64,
    block_length: u32,
    p_type: u8,
    prot_en: u8,
    p_i_exp: u8,
    lbppbe: u8,
    lbpme: u8,
    lbprz: u8,
    lalba: u16,
}

/// `struct scsi_sense` (scsi-lowlevel.h), with the trailing bit fields folded into one word.
#[repr(C)]
#[derive(Default)]
struct ScsiSense {
    error_type: u8,
    key: c_int,
    ascq: c_int,
    specific: u32,
    bit_pointer: u8,
    field_pointer: u16,
}

/// One UNMAP descriptor (`struct unmap_list`, iscsi.h).
#[repr(C)]
struct UnmapList {
    lba: u64,
    num: u32,
}

const SENSE_NOT_READY: c_int = 0x02;
const SENSE_UNIT_ATTENTION: c_int = 0x06;

type CommandCb = extern "C" fn(*mut IscsiContext, c_int, *mut c_void, *mut c_void);

const SESSION_NORMAL: c_int = 2;
const HEADER_DIGEST_NONE_CRC32C: c_int = 1;
const STATUS_GOOD: c_int = 0;
const STATUS_CHECK_CONDITION: c_int = 2;
const STATUS_CANCELLED: c_int = 0x0f00_0000;

#[link(name = "iscsi")]
extern "C" {
    fn iscsi_create_context(initiator_name: *const c_char) -> *mut IscsiContext;
    fn iscsi_destroy_context(iscsi: *mut IscsiContext) -> c_int;
    fn iscsi_set_targetname(iscsi: *mut IscsiContext, targetname: *const c_char) -> c_int;
    fn iscsi_set_session_type(iscsi: *mut IscsiContext, session_type: c_int) -> c_int;
    fn iscsi_set_header_digest(iscsi: *mut IscsiContext, header_digest: c_int) -> c_int;
    fn iscsi_full_connect_sync(iscsi: *mut IscsiContext, portal: *const c_char, lun: c_int) -> c_int;
    fn iscsi_get_error(iscsi: *mut IscsiContext) -> *const c_char;
    fn iscsi_get_fd(iscsi: *mut IscsiContext) -> c_int;
    fn iscsi_which_events(iscsi: *mut IscsiContext) -> c_int;
    fn iscsi_service(iscsi: *mut IscsiContext, revents: c_int) -> c_int;
    fn iscsi_is_logged_in(iscsi: *mut IscsiContext) -> c_int;
    fn iscsi_readcapacity16_sync(iscsi: *mut IscsiContext, lun: c_int) -> *mut ScsiTask;
    fn scsi_datain_unmarshall(task: *mut ScsiTask) -> *mut c_void;
    fn scsi_free_scsi_task(task: *mut ScsiTask);
    fn scsi_task_add_data_in_buffer(task: *mut ScsiTask, len: c_int, buf: *mut u8) -> c_int;
    fn scsi_task_get_status(task: *mut ScsiTask, sense: *mut ScsiSense) -> c_int;
    #[allow(clippy::too_many_arguments)]
    fn iscsi_read16_task(
        iscsi: *mut IscsiContext,
        lun: c_int,
        lba: u64,
        datalen: u32,
        blocksize: c_int,
        rdprotect: c_int,
        dpo: c_int,
        fua: c_int,
        fua_nv: c_int,
        group_number: c_int,
        cb: CommandCb,
        private_data: *mut c_void,
    ) -> *mut ScsiTask;
    #[allow(clippy::too_many_arguments)]
    fn iscsi_write16_task(
        iscsi: *mut IscsiContext,
        lun: c_int,
        lba: u64,
        data: *mut u8,
        datalen: u32,
        blocksize: c_int,
        wrprotect: c_int,
        dpo: c_int,
        fua: c_int,
        fua_nv: c_int,
        group_number: c_int,
        cb: CommandCb,
        private_data: *mut c_void,
    ) -> *mut ScsiTask;
    #[allow(clippy::too_many_arguments)]
    fn iscsi_writesame16_task(
        iscsi: *mut IscsiContext,
        lun: c_int,
        lba: u64,
        data: *mut u8,
        datalen: u32,
        num_blocks: u32,
        anchor: c_int,
        unmap: c_int,
        wrprotect: c_int,
        group: c_int,
        cb: CommandCb,
        private_data: *mut c_void,
    ) -> *mut ScsiTask;
    fn iscsi_unmap_task(
        iscsi: *mut IscsiContext,
        lun: c_int,
        anchor: c_int,
        group: c_int,
        list: *mut UnmapList,
        list_len: c_int,
        cb: CommandCb,
        private_data: *mut c_void,
    ) -> *mut ScsiTask;
    #[allow(clippy::too_many_arguments)]
    fn iscsi_synchronizecache16_task(
        iscsi: *mut IscsiContext,
        lun: c_int,
        lba: u64,
        num_blocks: u32,
        syncnv: c_int,
        immed: c_int,
        cb: CommandCb,
        private_data: *mut c_void,
    ) -> *mut ScsiTask;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SanError {
    #[error("bad iSCSI URL {url:?}: {why} (expected iscsi://HOST[:PORT]/TARGET-IQN/LUN)")]
    BadUrl { url: String, why: &'static str },
    #[error("cannot log in to {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("iSCSI command failed: {0}")]
    Command(String),
    /// The target asks for the command again: UNIT ATTENTION (it was reset or restarted, as
    /// after a SAN outage) or NOT READY. Callers resubmit it.
    #[error("iSCSI target asks for a retry: sense key {key:#x}, ASC/ASCQ {ascq:#06x}")]
    Retry { key: i32, ascq: i32 },
    #[error("range {lba}+{blocks} beyond the LUN's {size} blocks")]
    OutOfRange { lba: u64, blocks: u64, size: u64 },
}

/// A finished command, with the buffer it was given (a read's holds the data).
#[derive(Debug)]
pub struct SanDone {
    pub token: u64,
    pub result: Result<(), SanError>,
    pub buf: Option<AlignedBuf>,
}

struct Pending {
    token: u64,
    /// Read destination or write source; must outlive the task (it is freed with us).
    buf: Option<AlignedBuf>,
    /// WRITE SAME's one zero block or UNMAP's descriptor; kept alive with the task.
    aux: Option<Vec<u8>>,
    unmap: Option<Vec<UnmapList>>,
    done: Rc<RefCell<Vec<SanDone>>>,
}

/// Blocks one WRITE SAME or UNMAP descriptor covers at most (its length field is 32-bit).
const ZERO_BLOCKS_MAX: u64 = u32::MAX as u64;

pub struct IscsiLun {
    ctx: NonNull<IscsiContext>,
    lun: c_int,
    pub url: IscsiUrl,
    pub block_size: u32,
    pub blocks: u64,
    /// The LUN is thin provisioned and reads zeroes from unmapped blocks (READ CAPACITY(16)
    /// LBPME and LBPRZ): host Deallocate can be destaged as UNMAP.
    pub unmap_reads_zeroes: bool,
    done: Rc<RefCell<Vec<SanDone>>>,
    in_flight: usize,
}

// SAFETY: a libiscsi context may be used from any thread as long as one thread at a time does;
// IscsiLun is owned by one reactor and `Rc` never leaves it (it is !Sync, and moved whole).
unsafe impl Send for IscsiLun {}

impl IscsiLun {
    /// Logs in to the LUN at `url` as `initiator` and reads its capacity (blocking: control plane).
    pub fn connect(url: &str, initiator: &str) -> Result<IscsiLun, SanError> {
        let parsed = IscsiUrl::parse(url).map_err(|why| SanError::BadUrl { url: url.to_string(), why })?;
        let cerr = |reason: String| SanError::Connect { url: url.to_string(), reason };
        let c = |s: &str| CString::new(s).map_err(|_| cerr(format!("{s:?} contains a NUL byte")));
        let (initiator, target, portal) = (c(initiator)?, c(&parsed.target)?, c(&parsed.portal)?);
        // SAFETY: a valid C string; returns a new context or null.
        let ctx = NonNull::new(unsafe { iscsi_create_context(initiator.as_ptr()) })
            .ok_or_else(|| cerr("libiscsi could not create a context".into()))?;
        let mut lun = IscsiLun {
            ctx,
            lun: parsed.lun as c_int,
            url: parsed,
            block_size: 0,
            blocks: 0,
            unmap_reads_zeroes: false,
            done: Rc::new(RefCell::new(Vec::new())),
            in_flight: 0,
        };
        // SAFETY: ctx is live; the strings outlive the calls (libiscsi copies them).
        unsafe {
            iscsi_set_targetname(ctx.as_ptr(), target.as_ptr());
            iscsi_set_session_type(ctx.as_ptr(), SESSION_NORMAL);
            iscsi_set_header_digest(ctx.as_ptr(), HEADER_DIGEST_NONE_CRC32C);
            if iscsi_full_connect_sync(ctx.as_ptr(), portal.as_ptr(), lun.lun) != 0 {
                return Err(cerr(lun.error()));
            }
            let task = iscsi_readcapacity16_sync(ctx.as_ptr(), lun.lun);
            if task.is_null() {
                return Err(cerr(format!("READ CAPACITY(16) failed: {}", lun.error())));
            }
            let rc = scsi_datain_unmarshall(task) as *const ReadCapacity16;
            let cap = rc.as_ref().map(|r| (r.returned_lba, r.block_length, r.lbpme != 0 && r.lbprz != 0));
            scsi_free_scsi_task(task);
            let (last_lba, block_size, thin_zeroes) =
                cap.ok_or_else(|| cerr("READ CAPACITY(16) returned no data".into()))?;
            lun.unmap_reads_zeroes = thin_zeroes;
            if !(512..=65536).contains(&block_size) || !block_size.is_power_of_two() {
                return Err(cerr(format!("unusable block size {block_size}")));
            }
            lun.block_size = block_size;
            lun.blocks = last_lba + 1;
        }
        Ok(lun)
    }

    fn error(&self) -> String {
        // SAFETY: ctx is live; libiscsi returns a NUL-terminated string it owns (or null).
        let p = unsafe { iscsi_get_error(self.ctx.as_ptr()) };
        if p.is_null() {
            return "unknown libiscsi error".into();
        }
        // SAFETY: non-null, NUL-terminated, valid until the next libiscsi call on ctx.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether the session is logged in right now (false while libiscsi reconnects).
    pub fn logged_in(&self) -> bool {
        // SAFETY: ctx is live.
        unsafe { iscsi_is_logged_in(self.ctx.as_ptr()) != 0 }
    }

    /// The poll(2) events libiscsi waits for on [`IscsiLun::fd`] right now.
    pub fn which_events(&self) -> i16 {
        // SAFETY: ctx is live.
        unsafe { iscsi_which_events(self.ctx.as_ptr()) as i16 }
    }

    pub fn fd(&self) -> RawFd {
        // SAFETY: ctx is live.
        unsafe { iscsi_get_fd(self.ctx.as_ptr()) }
    }

    fn check(&self, lba: u64, blocks: u64) -> Result<(), SanError> {
        if lba.checked_add(blocks).is_none_or(|e| e > self.blocks) {
            return Err(SanError::OutOfRange { lba, blocks, size: self.blocks });
        }
        Ok(())
    }

    fn pending(&self, token: u64, buf: Option<AlignedBuf>) -> *mut Pending {
        Box::into_raw(Box::new(Pending { token, buf, aux: None, unmap: None, done: self.done.clone() }))
    }

    /// Reclaims a `Pending` whose task could not be created, handing its buffer back.
    fn abandon(&mut self, p: *mut Pending) -> (SanError, Option<AlignedBuf>) {
        // SAFETY: p came from Box::into_raw in `pending` and libiscsi never saw it.
        let p = unsafe { Box::from_raw(p) };
        (SanError::Command(self.error()), p.buf)
    }

    /// Reads `buf.len()` bytes from `lba` into `buf` (the buffer comes back in the completion).
    pub fn submit_read(
        &mut self,
        token: u64,
        lba: u64,
        mut buf: AlignedBuf,
    ) -> Result<(), (SanError, Option<AlignedBuf>)> {
        let bs = self.block_size as usize;
        if buf.is_empty() || !buf.len().is_multiple_of(bs) {
            return Err((
                SanError::Command(format!("read of {} bytes is not whole {bs}-byte blocks", buf.len())),
                Some(buf),
            ));
        }
        if let Err(e) = self.check(lba, (buf.len() / bs) as u64) {
            return Err((e, Some(buf)));
        }
        let len = buf.len();
        let dst = buf.as_mut_ptr();
        let p = self.pending(token, Some(buf));
        // SAFETY: ctx live; p stays valid until on_complete reclaims it; the data-in buffer is
        // p's own AlignedBuf (its heap block does not move with the Box), not touched again
        // until then.
        unsafe {
            let task = iscsi_read16_task(
                self.ctx.as_ptr(),
                self.lun,
                lba,
                len as u32,
                self.block_size as c_int,
                0,
                0,
                0,
                0,
                0,
                on_complete,
                p as *mut c_void,
            );
            if task.is_null() {
                return Err(self.abandon(p));
            }
            scsi_task_add_data_in_buffer(task, len as c_int, dst);
        }
        self.in_flight += 1;
        Ok(())
    }

    /// Writes `buf` (whole blocks) at `lba`; `fua` asks the SAN to make it durable first.
    pub fn submit_write(
        &mut self,
        token: u64,
        lba: u64,
        mut buf: AlignedBuf,
        fua: bool,
    ) -> Result<(), (SanError, Option<AlignedBuf>)> {
        let bs = self.block_size as usize;
        if buf.is_empty() || !buf.len().is_multiple_of(bs) {
            return Err((
                SanError::Command(format!("write of {} bytes is not whole {bs}-byte blocks", buf.len())),
                Some(buf),
            ));
        }
        if let Err(e) = self.check(lba, (buf.len() / bs) as u64) {
            return Err((e, Some(buf)));
        }
        let len = buf.len();
        let src = buf.as_mut_ptr();
        let p = self.pending(token, Some(buf));
        // SAFETY: as in submit_read; the write source is p's AlignedBuf, alive until completion.
        let task = unsafe {
            iscsi_write16_task(
                self.ctx.as_ptr(),
                self.lun,
                lba,
                src,
                len as u32,
                bs as c_int,
                0,
                0,
                fua as c_int,
                0,
                0,
                on_complete,
                p as *mut c_void,
            )
        };
        if task.is_null() {
            return Err(self.abandon(p));
        }
        self.in_flight += 1;
        Ok(())
    }

    /// Zeroes `blocks` blocks from `lba` with WRITE SAME(16) of one zero block (no data sent
    /// per block).
    pub fn submit_write_zeroes(&mut self, token: u64, lba: u64, blocks: u64) -> Result<(), SanError> {
        self.check(lba, blocks)?;
        if blocks == 0 || blocks > ZERO_BLOCKS_MAX {
            return Err(SanError::Command(format!("WRITE SAME of {blocks} blocks")));
        }
        let bs = self.block_size as usize;
        let p = self.pending(token, None);
        // SAFETY: p is ours until the callback; its zero block lives as long as p.
        let data = unsafe {
            (*p).aux = Some(vec![0u8; bs]);
            (*p).aux.as_mut().map(|v| v.as_mut_ptr()).unwrap_or(std::ptr::null_mut())
        };
        // SAFETY: as in submit_read; the one-block source lives in p until completion.
        let task = unsafe {
            iscsi_writesame16_task(
                self.ctx.as_ptr(),
                self.lun,
                lba,
                data,
                bs as u32,
                blocks as u32,
                0,
                0,
                0,
                0,
                on_complete,
                p as *mut c_void,
            )
        };
        if task.is_null() {
            return Err(self.abandon(p).0);
        }
        self.in_flight += 1;
        Ok(())
    }

    /// Unmaps `blocks` blocks from `lba` (only when [`IscsiLun::unmap_reads_zeroes`]).
    pub fn submit_unmap(&mut self, token: u64, lba: u64, blocks: u64) -> Result<(), SanError> {
        self.check(lba, blocks)?;
        if blocks == 0 || blocks > ZERO_BLOCKS_MAX {
            return Err(SanError::Command(format!("UNMAP of {blocks} blocks")));
        }
        let p = self.pending(token, None);
        // SAFETY: p is ours until the callback; the descriptor lives as long as p.
        let list = unsafe {
            (*p).unmap = Some(vec![UnmapList { lba, num: blocks as u32 }]);
            (*p).unmap.as_mut().map(|v| v.as_mut_ptr()).unwrap_or(std::ptr::null_mut())
        };
        // SAFETY: as in submit_read; libiscsi reads the one descriptor while building the task.
        let task =
            unsafe { iscsi_unmap_task(self.ctx.as_ptr(), self.lun, 0, 0, list, 1, on_complete, p as *mut c_void) };
        if task.is_null() {
            return Err(self.abandon(p).0);
        }
        self.in_flight += 1;
        Ok(())
    }

    /// SYNCHRONIZE CACHE(16) over the whole LUN: every completed write is durable on the SAN.
    pub fn submit_flush(&mut self, token: u64) -> Result<(), SanError> {
        let p = self.pending(token, None);
        // SAFETY: as in submit_read.
        let task = unsafe {
            iscsi_synchronizecache16_task(self.ctx.as_ptr(), self.lun, 0, 0, 0, 0, on_complete, p as *mut c_void)
        };
        if task.is_null() {
            return Err(self.abandon(p).0);
        }
        self.in_flight += 1;
        Ok(())
    }

    /// Lets libiscsi send and receive (waiting up to `timeout_ms` for the socket), then moves
    /// finished commands to `out`.
    pub fn poll(&mut self, timeout_ms: i32, out: &mut Vec<SanDone>) -> Result<usize, SanError> {
        // SAFETY: ctx is live; pollfd is valid for the call.
        unsafe {
            let events = iscsi_which_events(self.ctx.as_ptr());
            let mut p = libc::pollfd { fd: self.fd(), events: events as i16, revents: 0 };
            let n = libc::poll(&mut p, 1, timeout_ms);
            let revents = if n > 0 { p.revents as c_int } else { 0 };
            if iscsi_service(self.ctx.as_ptr(), revents) < 0 {
                return Err(SanError::Command(self.error()));
            }
        }
        let mut done = self.done.borrow_mut();
        let n = done.len();
        self.in_flight -= n;
        out.append(&mut done);
        Ok(n)
    }
}

impl Drop for IscsiLun {
    fn drop(&mut self) {
        // Cancels what is in flight (their callbacks run and free their Pending), then frees
        // the context; no logout exchange, so a dead SAN cannot make this hang.
        // SAFETY: ctx is live and not used after this.
        unsafe {
            iscsi_destroy_context(self.ctx.as_ptr());
        }
    }
}

extern "C" fn on_complete(_ctx: *mut IscsiContext, status: c_int, command_data: *mut c_void, private: *mut c_void) {
    if private.is_null() {
        return;
    }
    // SAFETY: private is the Box::into_raw'd Pending of exactly this task; libiscsi calls the
    // callback once per task, so it is reclaimed exactly once.
    let mut p = unsafe { Box::from_raw(private as *mut Pending) };
    let result = match status {
        STATUS_GOOD => Ok(()),
        STATUS_CHECK_CONDITION => {
            let mut sense = ScsiSense::default();
            if !command_data.is_null() {
                // SAFETY: the task is live until we free it below; sense is a valid out-param.
                unsafe { scsi_task_get_status(command_data as *mut ScsiTask, &mut sense) };
            }
            match sense.key {
                SENSE_UNIT_ATTENTION | SENSE_NOT_READY => Err(SanError::Retry { key: sense.key, ascq: sense.ascq }),
                k => Err(SanError::Command(format!("CHECK CONDITION, sense key {k:#x}, ASC/ASCQ {:#06x}", sense.ascq))),
            }
        }
        STATUS_CANCELLED => Err(SanError::Command("cancelled (context destroyed)".into())),
        s => Err(SanError::Command(format!("SCSI status {s:#x}"))),
    };
    if let Ok(mut d) = p.done.try_borrow_mut() {
        d.push(SanDone { token: p.token, result, buf: p.buf.take() });
    }
    if !command_data.is_null() {
        // SAFETY: command_data is the task this callback completes; we own freeing it.
        unsafe { scsi_free_scsi_task(command_data as *mut ScsiTask) };
    }
}
