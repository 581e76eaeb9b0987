//! The write-back engine's windows on real devices: [`BdevPort`] drives any `BlockDevice` (a
//! flash file or NVMe block device, a SAN file) through its own io_uring as the engine's
//! `Flash` or `San`; [`IscsiSan`] drives an iSCSI LUN through libiscsi (feature `iscsi`). Plus
//! what both `stagerd` and `stagerctl` do before they touch a flash device: take its ownership
//! lock and read its superblock.

use std::cell::RefCell;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use stager_nvme::bdev::{
    open_device, read_blocking, AlignedBuf, BdevChannel, BdevDone, BdevError, BdevInfo, BdevIo, BdevOp, BlockDevice,
    DeviceSpec,
};
use stager_nvme::uring::{split, Ring};
use stager_policy::constants::BLOCK_SIZE_U64;
use stager_policy::log::{Superblock, SuperblockError};
use stager_policy::{Flash, FlashInfo, IoDone, IoError, IoToken, San};

/// io_uring entries of the destage reactor: the engines keep at most a few hundred log writes
/// and destage reads in flight per device; more wait in the ring's backlog.
const RING_ENTRIES: u32 = 1024;

/// The destage reactor's one io_uring, shared by every device port on it (the thread owns it;
/// `Rc` never leaves). Completions are sorted into per-port inboxes by the `a` field of their
/// `user_data`, so a port finds its own when the engine polls it, and the reactor can sleep in
/// `io_uring_enter` until any device, SAN socket or message wake-up completes.
pub struct SharedRing {
    pub ring: RefCell<Ring>,
    inboxes: RefCell<Vec<Vec<(u32, i32)>>>,
    /// Completions that belong to no port: the reactor's own (its message wake-up read).
    foreign: RefCell<Vec<(u64, i32)>>,
    cqes: RefCell<Vec<(u64, i32)>>,
}

impl SharedRing {
    pub fn new() -> std::io::Result<Rc<SharedRing>> {
        Ok(Rc::new(SharedRing {
            ring: RefCell::new(Ring::new(RING_ENTRIES)?),
            inboxes: RefCell::new(Vec::new()),
            foreign: RefCell::new(Vec::new()),
            cqes: RefCell::new(Vec::new()),
        }))
    }

    /// A new port id (the `a` of its `user_data`).
    fn add_port(&self) -> u32 {
        let mut i = self.inboxes.borrow_mut();
        i.push(Vec::new());
        (i.len() - 1) as u32
    }

    /// Submits what is queued and sorts what completed, without sleeping.
    pub fn pump(&self) -> usize {
        let mut cqes = self.cqes.borrow_mut();
        cqes.clear();
        if let Err(e) = self.ring.borrow_mut().submit_and_reap(&mut cqes) {
            tracing::error!("destage reactor: io_uring_enter failed: {e}");
        }
        self.sort(&cqes)
    }

    /// Submits and sleeps until something completes (or `timeout`), then sorts.
    pub fn wait(&self, timeout: std::time::Duration) -> usize {
        let mut cqes = self.cqes.borrow_mut();
        cqes.clear();
        if let Err(e) = self.ring.borrow_mut().submit_and_wait(timeout, &mut cqes) {
            tracing::error!("destage reactor: io_uring_enter failed: {e}");
        }
        self.sort(&cqes)
    }

    /// Moves out the completions that belong to no port.
    pub fn take_foreign(&self, out: &mut Vec<(u64, i32)>) {
        out.append(&mut self.foreign.borrow_mut());
    }

    /// A user_data id for a poller that is not a block device (an iSCSI socket poll).
    pub fn add_poller(&self) -> u32 {
        self.add_port()
    }

    fn sort(&self, cqes: &[(u64, i32)]) -> usize {
        let mut foreign = self.foreign.borrow_mut();
        let mut inboxes = self.inboxes.borrow_mut();
        for &(ud, res) in cqes {
            let (k, a, b) = split(ud);
            match inboxes.get_mut(a as usize) {
                Some(inbox) if k == stager_nvme::uring::kind::BDEV => inbox.push((b, res)),
                _ => foreign.push((ud, res)),
            }
        }
        cqes.len()
    }

    pub fn take_inbox(&self, port: u32, out: &mut Vec<(u32, i32)>) {
        if let Some(i) = self.inboxes.borrow_mut().get_mut(port as usize) {
            out.append(i);
        }
    }
}

/// A block device as the engine's flash, the destager's log reader, or a volume's SAN: buffers
/// go to the device's channel as they are (no copies) and come back in the completions.
pub struct BdevPort {
    dev: Arc<dyn BlockDevice>,
    ring: Rc<SharedRing>,
    channel: Box<dyn BdevChannel>,
    inbox: Vec<(u32, i32)>,
    id: u32,
    done: Vec<BdevDone>,
    /// An unmap (punched hole) reads as zeroes: true for a regular file.
    unmap_zeroes: bool,
}

impl BdevPort {
    pub fn new(dev: Arc<dyn BlockDevice>, ring: Rc<SharedRing>) -> std::io::Result<BdevPort> {
        let id = ring.add_port();
        let channel = dev.channel(id)?;
        Ok(BdevPort { dev, ring, channel, inbox: Vec::new(), done: Vec::new(), id, unmap_zeroes: false })
    }

    /// Declares that a deallocated range of this device reads as zeroes (a file's holes).
    pub fn with_unmap_zeroes(mut self, yes: bool) -> BdevPort {
        self.unmap_zeroes = yes;
        self
    }

    pub fn size_bytes(&self) -> u64 {
        self.dev.info().size_bytes()
    }

    pub fn in_flight(&self) -> usize {
        self.channel.in_flight()
    }

    fn submit(&mut self, io: BdevIo) {
        self.channel.submit(io, &mut self.ring.ring.borrow_mut());
    }

    fn poll(&mut self, out: &mut Vec<IoDone>) -> usize {
        // Without a reactor around (stagerctl), the port keeps the ring moving itself; the
        // reactor's own completions never reach a port's pump, so `foreign` stays empty there.
        self.ring.pump();
        self.ring.take_inbox(self.id, &mut self.inbox);
        for (slot, res) in self.inbox.drain(..) {
            self.channel.on_cqe(slot, res, &mut self.ring.ring.borrow_mut());
        }
        self.done.clear();
        self.channel.poll(&mut self.done);
        let n = self.done.len();
        for d in self.done.drain(..) {
            let result = d.result.map_err(|e| {
                tracing::warn!(device = %self.dev.info().name, "device I/O failed: {e}");
                IoError::Failed
            });
            out.push(IoDone { token: IoToken(d.token), result, buf: d.buf, gather: d.gather });
        }
        n
    }
}

impl Flash for BdevPort {
    fn info(&self) -> FlashInfo {
        let i = self.dev.info();
        FlashInfo { size_bytes: i.size_bytes(), volatile_cache: i.volatile_cache }
    }
    fn submit_read(&mut self, token: IoToken, offset: u64, buf: AlignedBuf) {
        let len = buf.len() as u64;
        self.submit(BdevIo::new(BdevOp::Read, offset, len, Some(buf), token.0));
    }
    fn submit_write(&mut self, token: IoToken, offset: u64, first: AlignedBuf, gather: Vec<AlignedBuf>, fua: bool) {
        let len = first.len() as u64 + gather.iter().map(|b| b.len() as u64).sum::<u64>();
        let mut io = BdevIo::new(BdevOp::Write { fua }, offset, len, Some(first), token.0);
        io.gather = gather;
        self.submit(io);
    }
    fn submit_flush(&mut self, token: IoToken) {
        self.submit(BdevIo::new(BdevOp::Flush, 0, 0, None, token.0));
    }
    fn poll_completions(&mut self, out: &mut Vec<IoDone>) -> usize {
        self.poll(out)
    }
}

impl San for BdevPort {
    fn size_bytes(&self) -> u64 {
        BdevPort::size_bytes(self)
    }
    fn unmap_reads_zeroes(&self) -> bool {
        self.unmap_zeroes
    }
    fn submit_read(&mut self, token: IoToken, offset: u64, buf: AlignedBuf) {
        Flash::submit_read(self, token, offset, buf);
    }
    fn submit_write(&mut self, token: IoToken, offset: u64, buf: AlignedBuf, fua: bool) {
        Flash::submit_write(self, token, offset, buf, Vec::new(), fua);
    }
    fn submit_write_zeroes(&mut self, token: IoToken, offset: u64, len: u64) {
        self.submit(BdevIo::new(BdevOp::WriteZeroes, offset, len, None, token.0));
    }
    fn submit_unmap(&mut self, token: IoToken, offset: u64, len: u64) {
        self.submit(BdevIo::new(BdevOp::Deallocate, offset, len, None, token.0));
    }
    fn submit_flush(&mut self, token: IoToken) {
        Flash::submit_flush(self, token);
    }
    fn poll_completions(&mut self, out: &mut Vec<IoDone>) -> usize {
        self.poll(out)
    }
}

/// A flash port that reads and never writes: writes and flushes are dropped and never
/// complete, so an engine opened on it for inspection cannot change the device.
pub struct ReadOnlyFlash(pub BdevPort);

impl Flash for ReadOnlyFlash {
    fn info(&self) -> FlashInfo {
        self.0.info()
    }
    fn submit_read(&mut self, token: IoToken, offset: u64, buf: AlignedBuf) {
        Flash::submit_read(&mut self.0, token, offset, buf);
    }
    fn submit_write(
        &mut self,
        _token: IoToken,
        _offset: u64,
        _first: AlignedBuf,
        _gather: Vec<AlignedBuf>,
        _fua: bool,
    ) {
    }
    fn submit_flush(&mut self, _token: IoToken) {}
    fn poll_completions(&mut self, out: &mut Vec<IoDone>) -> usize {
        self.0.poll(out)
    }
}

/// An iSCSI LUN as a volume's SAN. Every failure except a bad range reads as "unreachable":
/// the engine keeps the data in flash and retries with back-off, which is what a SAN outage,
/// a target restart (UNIT ATTENTION) or a lost session all need. The session's own watch
/// (deadlines, login, heartbeat: `san::iscsi`) decides when the SAN is unreachable; this port
/// logs each change once and reports it through [`San::outage`].
#[cfg(feature = "iscsi")]
pub struct IscsiSan {
    lun: crate::san::iscsi::IscsiLun,
    ring: Rc<SharedRing>,
    id: u32,
    /// The session generation a poll of its socket is armed for in the ring (it wakes a
    /// sleeping reactor); a new session's socket needs a poll of its own.
    armed: Option<u64>,
    inbox: Vec<(u32, i32)>,
    done: Vec<crate::san::iscsi::SanDone>,
    early: Vec<IoDone>,
    last_service: std::time::Instant,
    last_error_log: Option<std::time::Instant>,
    /// The outage this port last logged (its start), so each is logged once, and its end.
    logged_outage: Option<std::time::Instant>,
}

#[cfg(feature = "iscsi")]
impl IscsiSan {
    pub fn connect(
        url: &str,
        initiator: &str,
        timeout: std::time::Duration,
        ring: Rc<SharedRing>,
    ) -> Result<IscsiSan, String> {
        let lun = crate::san::iscsi::IscsiLun::connect(url, initiator, timeout).map_err(|e| e.to_string())?;
        if !BLOCK_SIZE_U64.is_multiple_of(lun.block_size as u64) {
            return Err(format!("{url}: block size {} does not divide 4 KiB", lun.block_size));
        }
        let id = ring.add_poller();
        Ok(IscsiSan {
            lun,
            ring,
            id,
            armed: None,
            inbox: Vec::new(),
            done: Vec::new(),
            early: Vec::new(),
            last_service: std::time::Instant::now(),
            last_error_log: None,
            logged_outage: None,
        })
    }

    fn map_err(e: &crate::san::iscsi::SanError) -> IoError {
        match e {
            crate::san::iscsi::SanError::OutOfRange { .. } => IoError::Failed,
            _ => IoError::Unreachable,
        }
    }

    fn log_error(&mut self, what: &str, e: &crate::san::iscsi::SanError) {
        let now = std::time::Instant::now();
        if self.last_error_log.is_none_or(|t| now.duration_since(t) > std::time::Duration::from_secs(5)) {
            tracing::warn!(url = ?self.lun.url, "iSCSI {what}: {e}");
            self.last_error_log = Some(now);
        }
    }

    fn after_submit(&mut self, token: IoToken, r: Result<(), (crate::san::iscsi::SanError, Option<AlignedBuf>)>) {
        if let Err((e, buf)) = r {
            if !matches!(e, crate::san::iscsi::SanError::Down(_)) {
                self.log_error("submission failed", &e);
            }
            self.early.push(IoDone::new(token, Err(Self::map_err(&e)), buf));
        }
    }

    /// Logs the start of an outage (ERROR, with why) and its end (INFO, with how long).
    fn log_outage(&mut self) {
        let u = &self.lun.url;
        let url = format!("iscsi://{}/{}/{}", u.portal, u.target, u.lun);
        match (self.lun.outage(), self.logged_outage) {
            (Some((since, why)), None) => {
                tracing::error!(
                    "SAN {url} unreachable: {why}; its commands fail (hosts get a retryable status), \
                     dirty data stays in flash, logging in again with back-off"
                );
                self.logged_outage = Some(since);
            }
            (None, Some(since)) => {
                tracing::info!("SAN {url} answers again after {:.1} s", since.elapsed().as_secs_f64());
                self.logged_outage = None;
            }
            _ => {}
        }
    }
}

#[cfg(feature = "iscsi")]
impl San for IscsiSan {
    fn size_bytes(&self) -> u64 {
        self.lun.blocks * self.lun.block_size as u64
    }
    fn unmap_reads_zeroes(&self) -> bool {
        self.lun.unmap_reads_zeroes
    }
    fn outage(&self) -> Option<String> {
        self.lun.outage().map(|(_, why)| why.to_string())
    }
    fn submit_read(&mut self, token: IoToken, offset: u64, buf: AlignedBuf) {
        let bs = self.lun.block_size as u64;
        let r = self.lun.submit_read(token.0, offset / bs, buf);
        self.after_submit(token, r);
    }
    fn submit_write(&mut self, token: IoToken, offset: u64, buf: AlignedBuf, fua: bool) {
        let bs = self.lun.block_size as u64;
        let r = self.lun.submit_write(token.0, offset / bs, buf, fua);
        self.after_submit(token, r);
    }
    fn submit_write_zeroes(&mut self, token: IoToken, offset: u64, len: u64) {
        let bs = self.lun.block_size as u64;
        let r = self.lun.submit_write_zeroes(token.0, offset / bs, len / bs).map_err(|e| (e, None));
        self.after_submit(token, r);
    }
    fn submit_unmap(&mut self, token: IoToken, offset: u64, len: u64) {
        let bs = self.lun.block_size as u64;
        let r = self.lun.submit_unmap(token.0, offset / bs, len / bs).map_err(|e| (e, None));
        self.after_submit(token, r);
    }
    fn submit_flush(&mut self, token: IoToken) {
        let r = self.lun.submit_flush(token.0).map_err(|e| (e, None));
        self.after_submit(token, r);
    }
    fn poll_completions(&mut self, out: &mut Vec<IoDone>) -> usize {
        let mut n = self.early.len();
        out.append(&mut self.early);
        self.ring.pump();
        self.ring.take_inbox(self.id, &mut self.inbox);
        let generation = self.lun.generation();
        let armed = self.armed;
        let socket_ready = self.inbox.drain(..).any(|(g, _)| armed.is_some_and(|a| a as u32 == g));
        if socket_ready {
            self.armed = None;
        }
        // An idle session still needs servicing now and then (heartbeats, logins, deadlines),
        // but not a poll(2) per loop turn of the destage reactor.
        let now = std::time::Instant::now();
        if self.lun.in_flight() == 0
            && !socket_ready
            && now.duration_since(self.last_service) < std::time::Duration::from_millis(10)
        {
            return n;
        }
        self.last_service = now;
        // A session failure is logged by log_outage; its commands come back failed in `done`.
        let _ = self.lun.poll(0, &mut self.done);
        self.log_outage();
        for d in self.done.drain(..) {
            let result = d.result.map_err(|e| Self::map_err(&e));
            out.push(IoDone::new(IoToken(d.token), result, d.buf));
            n += 1;
        }
        if let Some(old) = self.armed.filter(|&g| g != generation) {
            // The socket that poll waited on is gone: cancel it so the ring lets the file go.
            let ud = stager_nvme::uring::user_data(stager_nvme::uring::kind::BDEV, self.id, old as u32);
            self.ring.ring.borrow_mut().push(
                io_uring::opcode::AsyncCancel::new(ud).build().user_data(stager_nvme::uring::user_data(
                    stager_nvme::uring::kind::BDEV,
                    self.id,
                    u32::MAX,
                )),
            );
            self.armed = None;
        }
        let events = self.lun.which_events();
        if self.lun.in_flight() > 0 && self.armed.is_none() && self.lun.fd() >= 0 && events != 0 {
            let fd = io_uring::types::Fd(self.lun.fd());
            let e = io_uring::opcode::PollAdd::new(fd, events as u32).build().user_data(stager_nvme::uring::user_data(
                stager_nvme::uring::kind::BDEV,
                self.id,
                generation as u32,
            ));
            self.ring.ring.borrow_mut().push(e);
            self.armed = Some(generation);
        }
        n
    }
}

/// Exclusive ownership of a flash device by one process: an advisory `flock` on the device
/// (file, block or character device node), released when the process exits, even by `kill -9`.
/// A VFIO device has no node to lock: its IOMMU group opens in one process at a time.
pub struct OwnerLock {
    _file: Option<File>,
    pub path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{0}: in use by another process (a running stagerd, or stagerctl); refusing to touch it")]
    Busy(PathBuf),
    #[error("{0}: cannot open: {1}")]
    Open(PathBuf, std::io::Error),
}

impl OwnerLock {
    /// Takes the lock without waiting; `exclusive: false` only checks nobody owns it.
    pub fn take(path: &Path, exclusive: bool) -> Result<OwnerLock, LockError> {
        let file = File::open(path).map_err(|e| LockError::Open(path.to_path_buf(), e))?;
        let how = if exclusive { libc::LOCK_EX } else { libc::LOCK_SH };
        // SAFETY: flock on a descriptor we own for the duration of the call.
        let r = unsafe { libc::flock(file.as_raw_fd(), how | libc::LOCK_NB) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(LockError::Busy(path.to_path_buf()));
            }
            return Err(LockError::Open(path.to_path_buf(), e));
        }
        Ok(OwnerLock { _file: Some(file), path: path.to_path_buf() })
    }

    /// [`OwnerLock::take`] on the device's node, if it has one.
    pub fn take_device(spec: &DeviceSpec, exclusive: bool) -> Result<OwnerLock, LockError> {
        match spec.lock_path() {
            Some(path) => OwnerLock::take(path, exclusive),
            None => Ok(OwnerLock { _file: None, path: PathBuf::from(spec.label()) }),
        }
    }
}

/// What the first two blocks of a flash device say.
#[derive(Debug)]
pub enum Probe {
    /// No superblock at all (both copies lack the magic): a new device, safe to format.
    Blank,
    Formatted(Superblock),
    /// Something that looks like ours but cannot be read: never formatted over.
    Damaged(String),
}

/// Reads the two superblock copies through the device's own driver, before the engine opens it.
pub fn probe_superblock(dev: &dyn BlockDevice) -> std::io::Result<Probe> {
    let len = 2 * BLOCK_SIZE_U64;
    if dev.info().size_bytes() < len {
        return Ok(Probe::Blank);
    }
    let buf = read_blocking(dev, 0, len as usize, std::time::Duration::from_secs(30))?;
    let (a, b) = buf.split_at(BLOCK_SIZE_U64 as usize);
    let magic = |c: &[u8]| matches!(Superblock::decode(c), Err(SuperblockError::BadMagic));
    if magic(a) && magic(b) {
        return Ok(Probe::Blank);
    }
    Ok(match Superblock::choose(a, b) {
        Ok(sb) => Probe::Formatted(sb),
        Err(e) => Probe::Damaged(e.to_string()),
    })
}

/// How much of a blank device's log area [`scan_for_frames`] reads: a log that was ever used
/// begins with frames, so a superblock zeroed over a used log shows here.
pub const FRAME_SCAN_BYTES: u64 = 64 << 20;

/// Log frames found on a device whose superblock is blank.
#[derive(Debug, PartialEq, Eq)]
pub struct FoundFrames {
    /// The format they belong to (the lost superblock's device id), of the first one found.
    pub device_id: u64,
    pub frames: u64,
}

/// Looks for valid log frame headers in the first [`FRAME_SCAN_BYTES`] of the log area: on a
/// device with a blank superblock they mean the superblock was lost over a used log, which
/// must not be formatted over without an operator's word.
pub fn scan_for_frames(dev: &dyn BlockDevice) -> std::io::Result<Option<FoundFrames>> {
    use stager_policy::constants::LOG_START;
    use stager_policy::log::FrameHeader;
    const CHUNK: u64 = 1 << 20;
    let size = dev.info().size_bytes();
    let end = size.min(LOG_START + FRAME_SCAN_BYTES);
    let mut found: Option<FoundFrames> = None;
    let mut at = LOG_START;
    while at + BLOCK_SIZE_U64 <= end {
        let len = CHUNK.min(end - at) / BLOCK_SIZE_U64 * BLOCK_SIZE_U64;
        let buf = read_blocking(dev, at, len as usize, std::time::Duration::from_secs(30))?;
        for block in buf.chunks_exact(BLOCK_SIZE_U64 as usize) {
            if let Ok(h) = FrameHeader::decode(block) {
                match &mut found {
                    Some(f) => f.frames += 1,
                    None => found = Some(FoundFrames { device_id: h.device_id, frames: 1 }),
                }
            }
        }
        at += len;
    }
    Ok(found)
}

/// Checks that a formatted device is as large as its superblock's layout says: a device that
/// shrank (a truncated file, a smaller namespace) lost the end of its log or cache.
pub fn check_fits_superblock(sb: &Superblock, size: u64) -> Result<(), String> {
    let end = sb.cache_start.saturating_add(sb.cache_slots.saturating_mul(BLOCK_SIZE_U64));
    let log_end = sb.log_start.saturating_add(sb.log_bytes);
    let need = end.max(log_end);
    if size < need {
        return Err(format!(
            "the device is {size} bytes but its superblock (device {:#x}) lays out {need} bytes: it was truncated \
             or replaced by a smaller one, and the end of its log may be gone. Nothing was changed. Restore the \
             original device or file (its full size) and start again",
            sb.device_id
        ));
    }
    Ok(())
}

/// Opens a flash device (any driver) or a SAN file.
pub fn open_flash_device(spec: &DeviceSpec) -> std::io::Result<Arc<dyn BlockDevice>> {
    open_device(spec)
}

/// Makes sure every block of a flash *file* up to `size` has been written once: a log write
/// into a hole or an unwritten extent makes the file system allocate or convert it, and with
/// RWF_DSYNC that metadata change costs a journal commit on every such write. A newly created
/// or extended file is filled with zeroes once, here (about a second per GiB); a block device
/// or a file already that large is left alone.
pub fn prepare_flash_file(path: &Path, size: Option<u64>) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let Some(size) = size else { return Ok(()) };
    let old = match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => return Ok(()),
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    if old >= size {
        return Ok(());
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    tracing::info!("{}: writing zeroes to {} MiB of new flash file once", path.display(), (size - old) >> 20);
    let mut f = std::fs::OpenOptions::new().create(true).write(true).truncate(false).open(path)?;
    let start = old - old % BLOCK_SIZE_U64;
    f.seek(SeekFrom::Start(start))?;
    let zeros = vec![0u8; 1 << 20];
    let mut at = start;
    while at < size {
        let n = ((size - at) as usize).min(zeros.len());
        f.write_all(&zeros[..n])?;
        at += n as u64;
    }
    f.sync_all()
}

/// Fault injection for failure drills and tests (`stagerctl flash fail`): a flash device that,
/// once failed, fails every command submitted to it — reads, writes, flushes, from the engine
/// and from the destage core alike — with an I/O error, as a dead device would. Commands
/// already in flight finish as the device answers them. Only a restart of stagerd undoes it.
pub struct FailableDevice {
    inner: Arc<dyn BlockDevice>,
    failed: Arc<std::sync::atomic::AtomicBool>,
}

impl FailableDevice {
    pub fn new(inner: Arc<dyn BlockDevice>, failed: Arc<std::sync::atomic::AtomicBool>) -> FailableDevice {
        FailableDevice { inner, failed }
    }
}

impl BlockDevice for FailableDevice {
    fn info(&self) -> &BdevInfo {
        self.inner.info()
    }
    fn channel(&self, id: u32) -> std::io::Result<Box<dyn BdevChannel>> {
        Ok(Box::new(FailableChannel { inner: self.inner.channel(id)?, failed: self.failed.clone(), done: Vec::new() }))
    }
    fn sync(&self) -> std::io::Result<()> {
        if self.failed.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.sync()
    }
}

struct FailableChannel {
    inner: Box<dyn BdevChannel>,
    failed: Arc<std::sync::atomic::AtomicBool>,
    /// Commands failed at submission, for the next poll.
    done: Vec<BdevDone>,
}

impl BdevChannel for FailableChannel {
    fn submit(&mut self, io: BdevIo, ring: &mut Ring) {
        if !self.failed.load(std::sync::atomic::Ordering::Relaxed) {
            return self.inner.submit(io, ring);
        }
        self.done.push(BdevDone {
            token: io.token,
            result: Err(BdevError::Os(libc::EIO)),
            buf: io.buf,
            gather: io.gather,
            lent: None,
        });
    }
    fn on_cqe(&mut self, slot: u32, res: i32, ring: &mut Ring) {
        self.inner.on_cqe(slot, res, ring);
    }
    fn poll(&mut self, done: &mut Vec<BdevDone>) -> usize {
        let n = self.done.len();
        done.append(&mut self.done);
        n + self.inner.poll(done)
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.done.len()
    }
    fn waits_on_kernel(&self) -> bool {
        self.inner.waits_on_kernel()
    }
}
