//! An iSCSI LUN through libiscsi (FFI to the system library; no maintained crate exists).
//!
//! The shape matches the reactors: commands are submitted with a token and complete later,
//! when `poll` has let libiscsi service its socket — nothing blocks. Read data lands directly
//! in the command's own buffer (`scsi_task_add_data_in_buffer`); write data is borrowed from the
//! command until it completes.
//!
//! **The SAN is watched** (issue 13). libiscsi's own reconnect is switched off: it re-queues
//! commands forever and its reconnect of a hung target never ends, so a dead or SIGSTOPped
//! SAN left commands — and the hosts behind them — without an answer. Instead the session is
//! an explicit state ([`Link`]): `Up`, `Connecting` (an asynchronous login under way) or
//! `Down` (no context; next login at a back-off time). Every command has a deadline
//! (`timeout`, stagerd's `destage.san_timeout_ms`): when the oldest one in flight misses it,
//! when libiscsi reports the connection lost, or when a login takes longer than `timeout`, the
//! session is declared failed: every command in flight completes with [`SanError::Down`], the
//! context is destroyed, and a new login is tried with back-off. While it is not `Up`,
//! submissions fail at once. An idle session sends a TEST UNIT READY every `timeout`, so a SAN
//! that hangs while nothing is asked of it is noticed too. After a target restart the first
//! command may come back as `SanError::Retry` (UNIT ATTENTION), which the caller resubmits.
//!
//! Every pointer handed to C is owned by a `Pending` box whose address libiscsi gets as
//! private data and which is reclaimed exactly once, in the completion callback (destroying a
//! context runs the callbacks of what it still holds, with `SCSI_STATUS_CANCELLED`).

use super::IscsiUrl;
use stager_nvme::bdev::AlignedBuf;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::rc::Rc;
use std::time::{Duration, Instant};

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
    fn iscsi_full_connect_async(
        iscsi: *mut IscsiContext,
        portal: *const c_char,
        lun: c_int,
        cb: CommandCb,
        private_data: *mut c_void,
    ) -> c_int;
    fn iscsi_set_noautoreconnect(iscsi: *mut IscsiContext, state: c_int);
    fn iscsi_scsi_cancel_all_tasks(iscsi: *mut IscsiContext) -> c_int;
    fn iscsi_testunitready_task(
        iscsi: *mut IscsiContext,
        lun: c_int,
        cb: CommandCb,
        private_data: *mut c_void,
    ) -> *mut ScsiTask;
    fn iscsi_readcapacity16_task(
        iscsi: *mut IscsiContext,
        lun: c_int,
        cb: CommandCb,
        private_data: *mut c_void,
    ) -> *mut ScsiTask;
    fn iscsi_get_error(iscsi: *mut IscsiContext) -> *const c_char;
    fn iscsi_get_fd(iscsi: *mut IscsiContext) -> c_int;
    fn iscsi_which_events(iscsi: *mut IscsiContext) -> c_int;
    fn iscsi_service(iscsi: *mut IscsiContext, revents: c_int) -> c_int;
    fn iscsi_is_logged_in(iscsi: *mut IscsiContext) -> c_int;
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
    /// The session is down (or was just declared failed): the command was not done, or its
    /// fate is unknown. Retry once the SAN is back.
    #[error("SAN session down: {0}")]
    Down(String),
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
    /// Which command this is, for its deadline (see `IscsiLun::deadlines`).
    seq: u64,
    /// Read destination or write source; must outlive the task (it is freed with us).
    buf: Option<AlignedBuf>,
    /// WRITE SAME's one zero block or UNMAP's descriptor; kept alive with the task.
    aux: Option<Vec<u8>>,
    unmap: Option<Vec<UnmapList>>,
    done: Rc<RefCell<Vec<(u64, SanDone)>>>,
}

/// Blocks one WRITE SAME or UNMAP descriptor covers at most (its length field is 32-bit).
const ZERO_BLOCKS_MAX: u64 = u32::MAX as u64;
/// What the login callback cell holds until libiscsi has answered.
const LOGIN_PENDING: c_int = -1;
/// Back-off between login attempts while the SAN is away: doubles from the first to the last.
const RELOGIN_FIRST: Duration = Duration::from_millis(200);
const RELOGIN_MAX: Duration = Duration::from_secs(5);
/// The token of the idle session's TEST UNIT READY (never a caller's: callers count from 0 up
/// and it stays inside this module).
const HEARTBEAT_TOKEN: u64 = u64::MAX;

/// Where the session stands (see the module comment).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// Logged in; commands go out.
    Up,
    /// A login is under way (since then); commands fail at once until it is done.
    Connecting { since: Instant },
    /// No session; the next login attempt is at `retry_at`.
    Down { retry_at: Instant },
}

pub struct IscsiLun {
    /// The libiscsi context of the session; None while `Down`.
    ctx: Option<NonNull<IscsiContext>>,
    lun: c_int,
    pub url: IscsiUrl,
    pub block_size: u32,
    pub blocks: u64,
    /// The LUN is thin provisioned and reads zeroes from unmapped blocks (READ CAPACITY(16)
    /// LBPME and LBPRZ): host Deallocate can be destaged as UNMAP.
    pub unmap_reads_zeroes: bool,
    done: Rc<RefCell<Vec<(u64, SanDone)>>>,
    in_flight: usize,
    link: Link,
    /// The login callback's answer (`LOGIN_PENDING`, then libiscsi's status; a later error
    /// means the connection failed). Boxed so its address outlives every context.
    login: Box<Cell<c_int>>,
    initiator: CString,
    target: CString,
    portal: CString,
    /// Each command's deadline is its submission time plus this.
    timeout: Duration,
    /// Commands in flight by submission order (`Pending::seq`) with their submission time:
    /// the first is the oldest, the one whose deadline comes first.
    deadlines: BTreeMap<u64, Instant>,
    next_seq: u64,
    /// The heartbeat TEST UNIT READY in flight (its seq).
    heartbeat: Option<u64>,
    /// When the session last heard from the target (or was logged in).
    last_heard: Instant,
    /// Since when the SAN is unreachable, and why (None while it answers).
    outage: Option<(Instant, String)>,
    relogin: Duration,
    /// Bumped at each new context (a new socket): pollers armed on the old one re-arm.
    generation: u64,
}

// SAFETY: a libiscsi context may be used from any thread as long as one thread at a time does;
// IscsiLun is owned by one reactor and `Rc` never leaves it (it is !Sync, and moved whole).
unsafe impl Send for IscsiLun {}

/// What an asynchronous READ CAPACITY(16) answered: last LBA, block size, thin with zeroes.
type Capacity = Option<Result<(u64, u32, bool), String>>;

impl IscsiLun {
    /// Logs in to the LUN at `url` as `initiator` and reads its capacity. Blocks the calling
    /// thread (the destage core, at start-up) for at most about twice `timeout`: a SAN that
    /// does not answer in time is refused with a message that says so.
    pub fn connect(url: &str, initiator: &str, timeout: Duration) -> Result<IscsiLun, SanError> {
        let parsed = IscsiUrl::parse(url).map_err(|why| SanError::BadUrl { url: url.to_string(), why })?;
        let cerr = |reason: String| SanError::Connect { url: url.to_string(), reason };
        let c = |s: &str| CString::new(s).map_err(|_| cerr(format!("{s:?} contains a NUL byte")));
        let (initiator, target, portal) = (c(initiator)?, c(&parsed.target)?, c(&parsed.portal)?);
        let now = Instant::now();
        let mut lun = IscsiLun {
            ctx: None,
            lun: parsed.lun as c_int,
            url: parsed,
            block_size: 0,
            blocks: 0,
            unmap_reads_zeroes: false,
            done: Rc::new(RefCell::new(Vec::new())),
            in_flight: 0,
            link: Link::Down { retry_at: now },
            login: Box::new(Cell::new(LOGIN_PENDING)),
            initiator,
            target,
            portal,
            timeout,
            deadlines: BTreeMap::new(),
            next_seq: 0,
            heartbeat: None,
            last_heard: now,
            outage: None,
            relogin: RELOGIN_FIRST,
            generation: 0,
        };
        lun.start_login(now).map_err(cerr)?;
        let mut scratch = Vec::new();
        while lun.link != Link::Up {
            if let Link::Down { .. } = lun.link {
                let why = lun.outage.as_ref().map_or_else(|| "login failed".to_string(), |o| o.1.clone());
                return Err(cerr(why));
            }
            let _ = lun.poll(20, &mut scratch);
        }
        // READ CAPACITY(16), asynchronous too, under the same deadline.
        let reply: Box<RefCell<Capacity>> = Box::new(RefCell::new(None));
        let ctx = lun.live().map_err(|e| cerr(e.to_string()))?;
        // SAFETY: ctx is live; `reply` outlives the task: it is only dropped after the context
        // is closed below (on every path), which runs a pending callback first.
        let task = unsafe {
            iscsi_readcapacity16_task(ctx.as_ptr(), lun.lun, on_capacity, &*reply as *const _ as *mut c_void)
        };
        if task.is_null() {
            let e = lun.error();
            lun.close();
            return Err(cerr(format!("READ CAPACITY(16) failed: {e}")));
        }
        let deadline = Instant::now() + timeout;
        while reply.borrow().is_none() && lun.link == Link::Up && Instant::now() < deadline {
            let _ = lun.poll(20, &mut scratch);
        }
        let answer = reply.borrow_mut().take();
        let Some(answer) = answer else {
            lun.close();
            return Err(cerr(format!("no answer to READ CAPACITY(16) within {} ms", timeout.as_millis())));
        };
        let (last_lba, block_size, thin_zeroes) = answer.map_err(|e| {
            lun.close();
            cerr(format!("READ CAPACITY(16) failed: {e}"))
        })?;
        if !(512..=65536).contains(&block_size) || !block_size.is_power_of_two() {
            lun.close();
            return Err(cerr(format!("unusable block size {block_size}")));
        }
        lun.unmap_reads_zeroes = thin_zeroes;
        lun.block_size = block_size;
        lun.blocks = last_lba + 1;
        Ok(lun)
    }

    /// Starts an asynchronous login on a new context.
    fn start_login(&mut self, now: Instant) -> Result<(), String> {
        debug_assert!(self.ctx.is_none());
        // SAFETY: a valid C string; returns a new context or null.
        let ctx = NonNull::new(unsafe { iscsi_create_context(self.initiator.as_ptr()) })
            .ok_or_else(|| "libiscsi could not create a context".to_string())?;
        self.login.set(LOGIN_PENDING);
        // SAFETY: ctx is live; the strings outlive the calls (libiscsi copies them); `login` is
        // boxed in self and outlives the context (closed before self is dropped).
        let rc = unsafe {
            iscsi_set_targetname(ctx.as_ptr(), self.target.as_ptr());
            iscsi_set_session_type(ctx.as_ptr(), SESSION_NORMAL);
            iscsi_set_header_digest(ctx.as_ptr(), HEADER_DIGEST_NONE_CRC32C);
            iscsi_set_noautoreconnect(ctx.as_ptr(), 1);
            iscsi_full_connect_async(
                ctx.as_ptr(),
                self.portal.as_ptr(),
                self.lun,
                on_login,
                &*self.login as *const Cell<c_int> as *mut c_void,
            )
        };
        self.ctx = Some(ctx);
        self.generation += 1;
        if rc != 0 {
            let e = self.error();
            self.fail(now, format!("cannot start a login: {e}"));
            return Err(e);
        }
        self.link = Link::Connecting { since: now };
        Ok(())
    }

    /// Cancels what is in flight (callbacks run with CANCELLED) and frees the context; no
    /// logout exchange, so a dead or hung SAN cannot make this wait.
    fn close(&mut self) {
        if let Some(ctx) = self.ctx.take() {
            // SAFETY: ctx is live and not used after this.
            unsafe {
                iscsi_scsi_cancel_all_tasks(ctx.as_ptr());
                iscsi_destroy_context(ctx.as_ptr());
            }
        }
        // A heartbeat in flight came back cancelled just now; `poll` drops it by its seq.
    }

    /// Declares the session failed: everything in flight completes with an error, the
    /// context goes, a new login is tried after the back-off.
    fn fail(&mut self, now: Instant, why: String) {
        self.close();
        self.link = Link::Down { retry_at: now + self.relogin };
        self.relogin = (self.relogin * 2).min(RELOGIN_MAX);
        match &mut self.outage {
            Some((_, last)) => *last = why,
            None => self.outage = Some((now, why)),
        }
    }

    /// The live context, if the session is up.
    fn live(&self) -> Result<NonNull<IscsiContext>, SanError> {
        match (self.link, self.ctx) {
            (Link::Up, Some(ctx)) => Ok(ctx),
            _ => Err(SanError::Down(self.outage.as_ref().map_or_else(|| "not logged in".to_string(), |o| o.1.clone()))),
        }
    }

    fn error(&self) -> String {
        let Some(ctx) = self.ctx else { return "no session".into() };
        // SAFETY: ctx is live; libiscsi returns a NUL-terminated string it owns (or null).
        let p = unsafe { iscsi_get_error(ctx.as_ptr()) };
        if p.is_null() {
            return "unknown libiscsi error".into();
        }
        // SAFETY: non-null, NUL-terminated, valid until the next libiscsi call on ctx.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    /// libiscsi's error after a socket failure, without its note about the automatic
    /// reconnect we switched off (which would mislead an operator).
    fn socket_error(&self) -> String {
        let e = self.error();
        if e.contains("Can not reconnect") {
            "the target closed or reset the connection (or refused it)".into()
        } else {
            e
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether the session is logged in right now.
    pub fn logged_in(&self) -> bool {
        // SAFETY: ctx is live while Some.
        self.link == Link::Up && self.ctx.is_some_and(|c| unsafe { iscsi_is_logged_in(c.as_ptr()) != 0 })
    }

    pub fn link(&self) -> Link {
        self.link
    }

    /// Since when the SAN does not answer and the last reason, or None while it does.
    pub fn outage(&self) -> Option<(Instant, &str)> {
        self.outage.as_ref().map(|(t, w)| (*t, w.as_str()))
    }

    /// Bumped whenever the session gets a new socket.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The poll(2) events libiscsi waits for on [`IscsiLun::fd`] right now (0 without a session).
    pub fn which_events(&self) -> i16 {
        // SAFETY: ctx is live while Some.
        self.ctx.map_or(0, |c| unsafe { iscsi_which_events(c.as_ptr()) as i16 })
    }

    /// The session's socket (-1 without a session).
    pub fn fd(&self) -> RawFd {
        // SAFETY: ctx is live while Some.
        self.ctx.map_or(-1, |c| unsafe { iscsi_get_fd(c.as_ptr()) })
    }

    fn check(&self, lba: u64, blocks: u64) -> Result<(), SanError> {
        if lba.checked_add(blocks).is_none_or(|e| e > self.blocks) {
            return Err(SanError::OutOfRange { lba, blocks, size: self.blocks });
        }
        Ok(())
    }

    fn pending(&mut self, token: u64, buf: Option<AlignedBuf>) -> (*mut Pending, u64) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let p = Box::new(Pending { token, seq, buf, aux: None, unmap: None, done: self.done.clone() });
        (Box::into_raw(p), seq)
    }

    /// A command went out: its deadline starts now.
    fn launched(&mut self, seq: u64) {
        self.deadlines.insert(seq, Instant::now());
        self.in_flight += 1;
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
        let ctx = match self.live() {
            Ok(c) => c,
            Err(e) => return Err((e, Some(buf))),
        };
        let len = buf.len();
        let dst = buf.as_mut_ptr();
        let (p, seq) = self.pending(token, Some(buf));
        // SAFETY: ctx live; p stays valid until on_complete reclaims it; the data-in buffer is
        // p's own AlignedBuf (its heap block does not move with the Box), not touched again
        // until then.
        unsafe {
            let task = iscsi_read16_task(
                ctx.as_ptr(),
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
        self.launched(seq);
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
        let ctx = match self.live() {
            Ok(c) => c,
            Err(e) => return Err((e, Some(buf))),
        };
        let len = buf.len();
        let src = buf.as_mut_ptr();
        let (p, seq) = self.pending(token, Some(buf));
        // SAFETY: as in submit_read; the write source is p's AlignedBuf, alive until completion.
        let task = unsafe {
            iscsi_write16_task(
                ctx.as_ptr(),
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
        self.launched(seq);
        Ok(())
    }

    /// Zeroes `blocks` blocks from `lba` with WRITE SAME(16) of one zero block (no data sent
    /// per block).
    pub fn submit_write_zeroes(&mut self, token: u64, lba: u64, blocks: u64) -> Result<(), SanError> {
        self.check(lba, blocks)?;
        if blocks == 0 || blocks > ZERO_BLOCKS_MAX {
            return Err(SanError::Command(format!("WRITE SAME of {blocks} blocks")));
        }
        let ctx = self.live()?;
        let bs = self.block_size as usize;
        let (p, seq) = self.pending(token, None);
        // SAFETY: p is ours until the callback; its zero block lives as long as p.
        let data = unsafe {
            (*p).aux = Some(vec![0u8; bs]);
            (*p).aux.as_mut().map(|v| v.as_mut_ptr()).unwrap_or(std::ptr::null_mut())
        };
        // SAFETY: as in submit_read; the one-block source lives in p until completion.
        let task = unsafe {
            iscsi_writesame16_task(
                ctx.as_ptr(),
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
        self.launched(seq);
        Ok(())
    }

    /// Unmaps `blocks` blocks from `lba` (only when [`IscsiLun::unmap_reads_zeroes`]).
    pub fn submit_unmap(&mut self, token: u64, lba: u64, blocks: u64) -> Result<(), SanError> {
        self.check(lba, blocks)?;
        if blocks == 0 || blocks > ZERO_BLOCKS_MAX {
            return Err(SanError::Command(format!("UNMAP of {blocks} blocks")));
        }
        let ctx = self.live()?;
        let (p, seq) = self.pending(token, None);
        // SAFETY: p is ours until the callback; the descriptor lives as long as p.
        let list = unsafe {
            (*p).unmap = Some(vec![UnmapList { lba, num: blocks as u32 }]);
            (*p).unmap.as_mut().map(|v| v.as_mut_ptr()).unwrap_or(std::ptr::null_mut())
        };
        // SAFETY: as in submit_read; libiscsi reads the one descriptor while building the task.
        let task = unsafe { iscsi_unmap_task(ctx.as_ptr(), self.lun, 0, 0, list, 1, on_complete, p as *mut c_void) };
        if task.is_null() {
            return Err(self.abandon(p).0);
        }
        self.launched(seq);
        Ok(())
    }

    /// SYNCHRONIZE CACHE(16) over the whole LUN: every completed write is durable on the SAN.
    pub fn submit_flush(&mut self, token: u64) -> Result<(), SanError> {
        let ctx = self.live()?;
        let (p, seq) = self.pending(token, None);
        // SAFETY: as in submit_read.
        let task =
            unsafe { iscsi_synchronizecache16_task(ctx.as_ptr(), self.lun, 0, 0, 0, 0, on_complete, p as *mut c_void) };
        if task.is_null() {
            return Err(self.abandon(p).0);
        }
        self.launched(seq);
        Ok(())
    }

    /// Lets libiscsi send and receive (waiting up to `timeout_ms` for the socket), watches
    /// the deadlines and the login, then moves finished commands to `out`. Returns how many.
    /// An `Err` says the session failed in this call (its commands are in `out`, failed).
    pub fn poll(&mut self, timeout_ms: i32, out: &mut Vec<SanDone>) -> Result<usize, SanError> {
        let mut failed = None;
        let now = Instant::now();
        if let Link::Down { retry_at } = self.link {
            if now >= retry_at && self.start_login(now).is_err() {
                failed = self.outage.as_ref().map(|o| o.1.clone());
            }
        }
        if let Some(ctx) = self.ctx {
            // SAFETY: ctx is live; pollfd is valid for the call.
            let rc = unsafe {
                let events = iscsi_which_events(ctx.as_ptr());
                let mut p = libc::pollfd { fd: iscsi_get_fd(ctx.as_ptr()), events: events as i16, revents: 0 };
                let n = if events != 0 { libc::poll(&mut p, 1, timeout_ms) } else { 0 };
                let revents = if n > 0 { p.revents as c_int } else { 0 };
                iscsi_service(ctx.as_ptr(), revents)
            };
            let now = Instant::now();
            let login = self.login.get();
            let why = if rc < 0 {
                Some(match self.link {
                    Link::Connecting { .. } => format!("cannot connect or log in: {}", self.socket_error()),
                    _ => format!("connection lost: {}", self.socket_error()),
                })
            } else {
                match self.link {
                    Link::Connecting { since } => {
                        if login == STATUS_GOOD {
                            self.link = Link::Up;
                            self.last_heard = now;
                            self.relogin = RELOGIN_FIRST;
                            None
                        } else if login != LOGIN_PENDING {
                            Some(format!("login failed: {}", self.error()))
                        } else if now.duration_since(since) > self.timeout {
                            Some(format!("no answer to the login within {} ms", self.timeout.as_millis()))
                        } else {
                            None
                        }
                    }
                    Link::Up if login != STATUS_GOOD => Some(format!("connection lost: {}", self.socket_error())),
                    Link::Up => self.overdue(now),
                    Link::Down { .. } => None,
                }
            };
            if let Some(why) = why {
                self.fail(now, why.clone());
                failed = Some(why);
            } else if self.link == Link::Up && self.in_flight == 0 && self.heartbeat.is_none() {
                self.maybe_heartbeat(now);
            }
        }
        let (mut n, cancelled) = self.drain(out);
        if cancelled && self.link == Link::Up {
            // libiscsi gave up on commands by itself (a write to a dead socket): the session
            // is gone even if it did not say so.
            let why = format!("connection lost: {}", self.socket_error());
            self.fail(Instant::now(), why.clone());
            failed = Some(why);
            n += self.drain(out).0;
        }
        match failed {
            Some(why) => Err(SanError::Down(why)),
            None => Ok(n),
        }
    }

    /// Moves finished commands to `out` (the heartbeat's stays here). Returns how many, and
    /// whether any came back cancelled.
    fn drain(&mut self, out: &mut Vec<SanDone>) -> (usize, bool) {
        let mut done = self.done.borrow_mut();
        let mut n = 0;
        // A target that answers a command (even with "retry": UNIT ATTENTION after a restart)
        // is reachable; a login alone does not prove it serves.
        let mut answered = false;
        let mut cancelled = false;
        for (seq, d) in done.drain(..) {
            self.deadlines.remove(&seq);
            answered |= d.result.is_ok() || matches!(d.result, Err(SanError::Retry { .. }));
            cancelled |= matches!(d.result, Err(SanError::Down(_)));
            if Some(seq) == self.heartbeat {
                self.heartbeat = None;
                continue;
            }
            n += 1;
            out.push(d);
        }
        drop(done);
        self.in_flight -= n;
        if answered {
            self.last_heard = Instant::now();
            if self.link == Link::Up {
                self.outage = None;
            }
        }
        (n, cancelled)
    }

    /// Whether the oldest command in flight (or the heartbeat) missed its deadline.
    fn overdue(&self, now: Instant) -> Option<String> {
        let (_, &sent) = self.deadlines.first_key_value()?;
        (now.duration_since(sent) > self.timeout).then(|| {
            format!(
                "no answer to a command within {} ms ({} in flight)",
                self.timeout.as_millis(),
                self.deadlines.len()
            )
        })
    }

    /// An idle session asks the target for a TEST UNIT READY every `timeout`, so a SAN that
    /// hangs while nothing else is asked of it misses a deadline too.
    fn maybe_heartbeat(&mut self, now: Instant) {
        if now.duration_since(self.last_heard) < self.timeout {
            return;
        }
        let Ok(ctx) = self.live() else { return };
        let (p, seq) = self.pending(HEARTBEAT_TOKEN, None);
        // SAFETY: ctx live; p is reclaimed by on_complete (or here, if no task was made).
        let task = unsafe { iscsi_testunitready_task(ctx.as_ptr(), self.lun, on_complete, p as *mut c_void) };
        if task.is_null() {
            let _ = self.abandon(p);
            return;
        }
        self.deadlines.insert(seq, now);
        self.heartbeat = Some(seq);
        self.last_heard = now;
    }
}

impl Drop for IscsiLun {
    fn drop(&mut self) {
        self.close();
    }
}

extern "C" fn on_login(_ctx: *mut IscsiContext, status: c_int, _command_data: *mut c_void, private: *mut c_void) {
    if private.is_null() {
        return;
    }
    // SAFETY: private is the `login` cell of the IscsiLun that owns this context, boxed and
    // alive until after the context is destroyed.
    let cell = unsafe { &*(private as *const Cell<c_int>) };
    cell.set(status);
}

extern "C" fn on_capacity(_ctx: *mut IscsiContext, status: c_int, command_data: *mut c_void, private: *mut c_void) {
    if private.is_null() {
        return;
    }
    // SAFETY: private is `connect`'s reply cell, alive until after the context is closed.
    let reply = unsafe { &*(private as *const RefCell<Capacity>) };
    let answer = if status != STATUS_GOOD || command_data.is_null() {
        Err(format!("SCSI status {status:#x}"))
    } else {
        // SAFETY: command_data is this callback's live task; the unmarshalled data belongs to it.
        let rc = unsafe { scsi_datain_unmarshall(command_data as *mut ScsiTask) as *const ReadCapacity16 };
        // SAFETY: null or a valid unmarshalled structure owned by the task, read before it is freed.
        unsafe { rc.as_ref() }
            .map(|r| (r.returned_lba, r.block_length, r.lbpme != 0 && r.lbprz != 0))
            .ok_or_else(|| "READ CAPACITY(16) returned no data".to_string())
    };
    if let Ok(mut r) = reply.try_borrow_mut() {
        *r = Some(answer);
    }
    if !command_data.is_null() {
        // SAFETY: command_data is the task this callback completes; we own freeing it.
        unsafe { scsi_free_scsi_task(command_data as *mut ScsiTask) };
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
        STATUS_CANCELLED => Err(SanError::Down("the session was closed with the command in flight".into())),
        s => Err(SanError::Command(format!("SCSI status {s:#x}"))),
    };
    if let Ok(mut d) = p.done.try_borrow_mut() {
        d.push((p.seq, SanDone { token: p.token, result, buf: p.buf.take() }));
    }
    if !command_data.is_null() {
        // SAFETY: command_data is the task this callback completes; we own freeing it.
        unsafe { scsi_free_scsi_task(command_data as *mut ScsiTask) };
    }
}
