//! An NVMe namespace driven with raw NVMe commands through io_uring passthrough
//! (`IORING_OP_URING_CMD` on the namespace's generic character device `/dev/ngXnY`, Linux
//! 5.19+): the kernel's NVMe driver still owns the queues, but no block layer, file system or
//! page cache sits between a reactor and the device, the FUA bit goes on the write itself, and
//! the device's own NVMe status comes back ([`BdevError::Nvme`]).
//!
//! At open, Identify Controller and Identify Namespace go to the controller's character device
//! (`/dev/nvmeX`) through the admin passthrough ioctl (io_uring admin passthrough on
//! `/dev/ngXnY` is refused on 6.1): they give the LBA format, MDTS, the volatile write cache
//! and whether deallocated blocks read as zeroes.
//!
//! **Each channel owns a ring of its own** (`IORING_SETUP_SQE128 | IORING_SETUP_CQE32`) rather
//! than sharing the reactor's: every reactor ring entry would otherwise double in size for the
//! sockets that dominate it, a kernel without big SQEs would lose the whole reactor instead of
//! this one backend, and the device's ring stays free to be polled alone. The channel submits
//! and reaps it in `poll` (one `io_uring_enter` per reactor turn with new commands, none to
//! reap). So that a reactor asleep in its own ring still wakes for a completion, the channel's
//! ring signals an eventfd (`IORING_REGISTER_EVENTFD`) and, while commands are in flight, a
//! read of that eventfd is armed in the reactor's ring under the channel's `user_data`.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::nvme_io::{geometry_of, plan, spans, Geometry, Part};
use super::{check_range, BdevChannel, BdevDone, BdevError, BdevInfo, BdevIo, BlockDevice};
use crate::command::Command;
use crate::constants::{PASSTHRU_DRAIN_MAX, PASSTHRU_RING_ENTRIES, PASSTHRU_SEGMENTS_MAX};
use crate::identify::{cns, ControllerInfo, NamespaceFormat};
use crate::status::Status;
use crate::uring::{kind, user_data, Ring};

/// `_IOWR('N', 0x80, struct nvme_uring_cmd)`: one NVMe I/O command, data at `addr`.
const NVME_URING_CMD_IO: u32 = 0xC048_4E80;
/// `_IOWR('N', 0x81, struct nvme_uring_cmd)`: the same with `addr` an iovec array of
/// `data_len` entries (a gathered write).
const NVME_URING_CMD_IO_VEC: u32 = 0xC048_4E81;
/// `_IO('N', 0x40)`: the namespace id of a namespace device.
const NVME_IOCTL_ID: libc::c_ulong = 0x4E40;
/// `_IOWR('N', 0x41, struct nvme_passthru_cmd)`: one admin command, synchronously.
const NVME_IOCTL_ADMIN_CMD: libc::c_ulong = 0xC048_4E41;
/// `_IOWR('N', 0x43, struct nvme_passthru_cmd)`: one I/O command, synchronously.
const NVME_IOCTL_IO_CMD: libc::c_ulong = 0xC048_4E43;

/// The `user_data` slot of the eventfd read armed in the reactor's ring.
const WAKE_SLOT: u32 = crate::uring::slot::CHANNEL_WAKE;

/// The kernel's `struct nvme_passthru_cmd` (ioctl) and `struct nvme_uring_cmd` (io_uring): the
/// same 72 bytes, where the ioctl's last word carries the result back and the uring one is
/// reserved.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
struct PassthruCmd {
    opcode: u8,
    flags: u8,
    rsvd1: u16,
    nsid: u32,
    cdw2: u32,
    cdw3: u32,
    metadata: u64,
    addr: u64,
    metadata_len: u32,
    data_len: u32,
    cdw10: u32,
    cdw11: u32,
    cdw12: u32,
    cdw13: u32,
    cdw14: u32,
    cdw15: u32,
    timeout_ms: u32,
    result: u32,
}

const _: () = assert!(std::mem::size_of::<PassthruCmd>() == 72);

impl PassthruCmd {
    /// The passthrough form of one of our commands; the kernel builds the data pointer from
    /// `addr`/`data_len` and assigns the command id itself.
    fn of(c: &Command, addr: u64, data_len: u32) -> PassthruCmd {
        PassthruCmd {
            opcode: c.opcode(),
            nsid: c.nsid(),
            cdw2: c.cdw(2),
            cdw3: c.cdw(3),
            addr,
            data_len,
            cdw10: c.cdw(10),
            cdw11: c.cdw(11),
            cdw12: c.cdw(12),
            cdw13: c.cdw(13),
            cdw14: c.cdw(14),
            cdw15: c.cdw(15),
            ..PassthruCmd::default()
        }
    }

    /// The 80 command bytes of a 128-byte SQE.
    fn to_sqe_bytes(self) -> [u8; 80] {
        let mut b = [0u8; 80];
        b[0] = self.opcode;
        b[1] = self.flags;
        b[4..8].copy_from_slice(&self.nsid.to_ne_bytes());
        b[8..12].copy_from_slice(&self.cdw2.to_ne_bytes());
        b[12..16].copy_from_slice(&self.cdw3.to_ne_bytes());
        b[16..24].copy_from_slice(&self.metadata.to_ne_bytes());
        b[24..32].copy_from_slice(&self.addr.to_ne_bytes());
        b[32..36].copy_from_slice(&self.metadata_len.to_ne_bytes());
        b[36..40].copy_from_slice(&self.data_len.to_ne_bytes());
        for (i, v) in [self.cdw10, self.cdw11, self.cdw12, self.cdw13, self.cdw14, self.cdw15].iter().enumerate() {
            b[40 + i * 4..44 + i * 4].copy_from_slice(&v.to_ne_bytes());
        }
        b[64..68].copy_from_slice(&self.timeout_ms.to_ne_bytes());
        b
    }
}

/// What a passthrough command's result says: the kernel returns a negative errno when it could
/// not issue the command, else the NVMe status field without its phase bit (0 = success).
fn result_of(res: i32) -> Result<(), BdevError> {
    match res {
        0 => Ok(()),
        r if r < 0 => Err(BdevError::Os(-r)),
        // SC in bits 7:0, SCT in 10:8, DNR in 14: the CQE status field shifted right by one.
        r => Err(BdevError::Nvme(Status::from_field(((r as u32) << 1) as u16))),
    }
}

/// Runs one synchronous passthrough ioctl; `data` is the command's data buffer, if any.
fn ioctl_cmd(fd: &File, request: libc::c_ulong, c: &Command, data: Option<&mut [u8]>) -> Result<u32, BdevError> {
    let (addr, len) = match data {
        Some(d) => (d.as_mut_ptr() as u64, d.len() as u32),
        None => (0, 0),
    };
    let mut cmd = PassthruCmd::of(c, addr, len);
    // SAFETY: `cmd` is a live `struct nvme_passthru_cmd` for the duration of the call; its
    // `addr`/`data_len` describe `data`, which we borrow mutably across the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request, &mut cmd as *mut PassthruCmd) };
    if r < 0 {
        return Err(BdevError::Os(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)));
    }
    result_of(r).map(|()| cmd.result)
}

fn identify(ctrl: &File, cns: u8, nsid: u32) -> Result<Vec<u8>, BdevError> {
    let mut buf = vec![0u8; crate::constants::IDENTIFY_BYTES];
    ioctl_cmd(ctrl, NVME_IOCTL_ADMIN_CMD, &Command::identify(cns, nsid), Some(&mut buf))?;
    Ok(buf)
}

/// The controller character device of a namespace's generic device: sysfs knows its parent;
/// failing that, `ngXnY` belongs to controller instance X.
fn controller_of(ng: &Path) -> Option<PathBuf> {
    let name = ng.file_name()?.to_str()?;
    let sys = PathBuf::from("/sys/class/nvme-generic").join(name).join("device");
    if let Ok(dev) = std::fs::canonicalize(&sys) {
        if let Some(c) = dev.file_name().and_then(|n| n.to_str()).filter(|n| n.starts_with("nvme")) {
            return Some(PathBuf::from("/dev").join(c));
        }
    }
    let ctrl = name.strip_prefix("ng")?.split('n').next()?;
    ctrl.parse::<u32>().ok().map(|i| PathBuf::from(format!("/dev/nvme{i}")))
}

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, msg)
}

/// A new ring with 128-byte SQEs and 32-byte CQEs, or an error that says what is missing.
fn big_ring(entries: u32) -> std::io::Result<IoUring<squeue::Entry128, cqueue::Entry32>> {
    IoUring::<squeue::Entry128, cqueue::Entry32>::builder().build(entries).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "cannot set up an io_uring with 128-byte entries ({e}): NVMe passthrough needs \
                 IORING_SETUP_SQE128/CQE32 (Linux 5.19 or later)"
            ),
        )
    })
}

/// Whether this kernel can run NVMe passthrough rings; the error says what is missing.
pub fn passthru_supported() -> Result<(), String> {
    big_ring(2).map(drop).map_err(|e| e.to_string())
}

/// What every channel of a passthrough device shares.
struct Shared {
    info: BdevInfo,
    file: File,
    geometry: Geometry,
}

pub struct PassthruDevice {
    shared: Arc<Shared>,
}

impl PassthruDevice {
    /// Opens the namespace at `path` (`/dev/ngXnY`) with `block_size`-byte blocks, which must
    /// be a whole number of the namespace's LBAs.
    pub fn open(path: &Path, block_size: u32) -> std::io::Result<PassthruDevice> {
        let meta = std::fs::metadata(path).map_err(|e| {
            std::io::Error::new(e.kind(), format!("{}: {e} (is the nvme driver bound?)", path.display()))
        })?;
        if !meta.file_type().is_char_device() {
            return Err(invalid(format!(
                "{} is not a character device: nvme-passthru needs the namespace's generic device /dev/ngXnY \
                 (for a block device such as /dev/nvme0n1 use kind: file)",
                path.display()
            )));
        }
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        // SAFETY: NVME_IOCTL_ID takes no argument and returns the namespace id or -1.
        let nsid = unsafe { libc::ioctl(file.as_raw_fd(), NVME_IOCTL_ID) };
        if nsid <= 0 {
            return Err(std::io::Error::other(format!(
                "{}: not an NVMe namespace (NVME_IOCTL_ID: {})",
                path.display(),
                std::io::Error::last_os_error()
            )));
        }
        let nsid = nsid as u32;
        let ctrl_path = controller_of(path)
            .ok_or_else(|| invalid(format!("{}: cannot tell its controller device", path.display())))?;
        let ctrl = File::open(&ctrl_path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", ctrl_path.display())))?;
        let admin_err = |what: &str, e: BdevError| {
            std::io::Error::other(format!("{}: Identify {what} failed: {e}", ctrl_path.display()))
        };
        let cid = identify(&ctrl, cns::CONTROLLER, 0).map_err(|e| admin_err("Controller", e))?;
        let cinfo = ControllerInfo::decode(&cid)
            .ok_or_else(|| std::io::Error::other(format!("{}: short Identify Controller data", ctrl_path.display())))?;
        let nid = identify(&ctrl, cns::NAMESPACE, nsid).map_err(|e| admin_err("Namespace", e))?;
        let format = NamespaceFormat::decode(&nid).ok_or_else(|| {
            std::io::Error::other(format!("{}: Identify Namespace reports no usable LBA format", path.display()))
        })?;
        let geometry = geometry_of(&path.display(), nsid, &cinfo, &format, block_size, PASSTHRU_SEGMENTS_MAX * 4096)?;
        // A kernel without big SQEs fails here, at open, rather than on the first I/O.
        drop(big_ring(2)?);
        let blocks = format.blocks / u64::from(block_size >> geometry.lba_shift);
        if blocks == 0 {
            return Err(invalid(format!("{}: holds less than one {block_size}-byte block", path.display())));
        }
        tracing::info!(
            device = %path.display(),
            nsid,
            lba_bytes = format.lba_bytes,
            mdts = cinfo.mdts,
            max_transfer = geometry.max_transfer,
            volatile_cache = cinfo.vwc,
            deallocate = ?geometry.deallocate,
            "NVMe passthrough namespace"
        );
        Ok(PassthruDevice {
            shared: Arc::new(Shared {
                info: BdevInfo { name: path.display().to_string(), block_size, blocks, volatile_cache: cinfo.vwc },
                file,
                geometry,
            }),
        })
    }
}

impl BlockDevice for PassthruDevice {
    fn info(&self) -> &BdevInfo {
        &self.shared.info
    }
    fn channel(&self, id: u32) -> std::io::Result<Box<dyn BdevChannel>> {
        Ok(Box::new(PassthruChannel::new(id, self.shared.clone())?))
    }
    /// A Flush through the synchronous I/O ioctl (shutdown, not the I/O path).
    fn sync(&self) -> std::io::Result<()> {
        if !self.shared.info.volatile_cache {
            return Ok(());
        }
        ioctl_cmd(&self.shared.file, NVME_IOCTL_IO_CMD, &Command::flush(self.shared.geometry.nsid), None)
            .map(drop)
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

/// One NVMe command in flight (or waiting for room in the ring).
struct Cmd {
    io: u32,
    sqe: squeue::Entry128,
    /// The iovecs of a command over several buffers; the kernel may read them until the
    /// command completes (io-wq re-issue), so they live here until then.
    iov: Vec<libc::iovec>,
    /// A Dataset Management command's range, the command's data.
    dsm: Box<[u8; 16]>,
}

struct PassthruChannel {
    id: u32,
    shared: Arc<Shared>,
    ring: IoUring<squeue::Entry128, cqueue::Entry32>,
    efd: OwnedFd,
    /// The eventfd read lands here; boxed so its address is stable while the read is armed
    /// (and leaked at drop if it still is: the kernel may yet write it).
    wake_buf: Box<[u8; 8]>,
    wake_armed: bool,
    ios: Vec<Option<Pending>>,
    free_ios: Vec<u32>,
    cmds: Vec<Option<Cmd>>,
    free_cmds: Vec<u32>,
    /// Commands built but not yet in the submission queue (it was full).
    queued: VecDeque<u32>,
    /// Commands in the submission queue or the kernel.
    issued: usize,
    done: VecDeque<BdevDone>,
    in_flight: usize,
    parts: Vec<Part>,
    spans: Vec<(usize, usize, usize)>,
    cqes: Vec<(u64, i32)>,
}

impl PassthruChannel {
    fn new(id: u32, shared: Arc<Shared>) -> std::io::Result<PassthruChannel> {
        let ring = big_ring(PASSTHRU_RING_ENTRIES)?;
        // SAFETY: eventfd returns a new descriptor or -1; we check before taking ownership.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: raw is a valid descriptor nothing else owns.
        let efd = unsafe { OwnedFd::from_raw_fd(raw) };
        ring.submitter().register_eventfd(efd.as_raw_fd())?;
        Ok(PassthruChannel {
            id,
            shared,
            ring,
            efd,
            wake_buf: Box::new([0; 8]),
            wake_armed: false,
            ios: Vec::new(),
            free_ios: Vec::new(),
            cmds: Vec::new(),
            free_cmds: Vec::new(),
            queued: VecDeque::new(),
            issued: 0,
            done: VecDeque::new(),
            in_flight: 0,
            parts: Vec::new(),
            spans: Vec::new(),
            cqes: Vec::new(),
        })
    }

    fn arm_wake(&mut self, ring: &mut Ring) {
        if self.wake_armed || self.in_flight == 0 {
            return;
        }
        let e = opcode::Read::new(types::Fd(self.efd.as_raw_fd()), self.wake_buf.as_mut_ptr(), 8)
            .build()
            .user_data(user_data(kind::BDEV, self.id, WAKE_SLOT));
        ring.push(e);
        self.wake_armed = true;
    }

    /// Builds the SQE of `part` of I/O `io_idx` into a command slot.
    fn build(&mut self, io_idx: u32, part: &Part) -> u32 {
        let slot = self.free_cmds.pop().unwrap_or_else(|| {
            self.cmds.push(None);
            (self.cmds.len() - 1) as u32
        });
        let (mut iov, dsm) = match self.cmds[slot as usize].take() {
            Some(c) => (c.iov, c.dsm),
            None => (Vec::new(), Box::new([0u8; 16])),
        };
        iov.clear();
        let mut dsm = dsm;
        let fd = types::Fd(self.shared.file.as_raw_fd());
        let (op, addr, len) = if let Some(range) = &part.dsm {
            range.encode(&mut dsm[..]);
            (NVME_URING_CMD_IO, dsm.as_ptr() as u64, 16)
        } else if let (Some((start, len)), Some(p)) = (part.data, self.ios[io_idx as usize].as_ref()) {
            spans(&p.io, start, u64::from(len), &mut self.spans);
            let pieces: Vec<&super::AlignedBuf> = p.io.pieces().collect();
            if let [(i, off, _)] = self.spans[..] {
                (NVME_URING_CMD_IO, pieces[i][off..].as_ptr() as u64, len)
            } else {
                for &(i, off, n) in &self.spans {
                    iov.push(libc::iovec { iov_base: pieces[i][off..].as_ptr() as *mut libc::c_void, iov_len: n });
                }
                (NVME_URING_CMD_IO_VEC, iov.as_ptr() as u64, iov.len() as u32)
            }
        } else {
            (NVME_URING_CMD_IO, 0, 0)
        };
        let bytes = PassthruCmd::of(&part.cmd, addr, len).to_sqe_bytes();
        let sqe = opcode::UringCmd80::new(fd, op).cmd(bytes).build().user_data(u64::from(slot));
        self.cmds[slot as usize] = Some(Cmd { io: io_idx, sqe, iov, dsm });
        slot
    }

    /// Moves queued commands into the submission queue while it has room, keeping at most
    /// the ring's size in the kernel so its completion queue cannot overflow.
    fn fill_sq(&mut self) {
        let mut sq = self.ring.submission();
        while self.issued < PASSTHRU_RING_ENTRIES as usize {
            let Some(&slot) = self.queued.front() else { break };
            let Some(Some(c)) = self.cmds.get(slot as usize) else {
                self.queued.pop_front();
                continue;
            };
            // SAFETY: the SQE's buffers (the I/O's pieces, the iovecs, the DSM range) live in
            // `self.ios`/`self.cmds` until its completion is reaped in `reap`.
            if unsafe { sq.push(&c.sqe) }.is_err() {
                break;
            }
            self.queued.pop_front();
            self.issued += 1;
        }
    }

    fn reap(&mut self) -> usize {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for &(ud, res) in &cqes {
            self.issued = self.issued.saturating_sub(1);
            let Some(c) = self.cmds.get_mut(ud as usize).and_then(|c| c.as_mut()) else { continue };
            // The slot keeps its iovec and range allocations for the next command.
            let io_idx = std::mem::replace(&mut c.io, u32::MAX);
            if io_idx == u32::MAX {
                continue;
            }
            self.free_cmds.push(ud as u32);
            self.part_done(io_idx, result_of(res));
        }
        let n = cqes.len();
        self.cqes = cqes;
        n
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

    /// Submits what is queued and reaps what completed, without sleeping.
    fn pump(&mut self) {
        self.fill_sq();
        if !self.ring.submission().is_empty() {
            if let Err(e) = self.ring.submit() {
                // EBUSY/EAGAIN: completions must be reaped first; the next poll retries.
                if !matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EAGAIN) | Some(libc::EINTR)) {
                    tracing::error!(device = %self.shared.info.name, "io_uring_enter failed: {e}");
                }
            }
        }
        self.reap();
        // Reaping made room: queue the rest now rather than on the next turn.
        if !self.queued.is_empty() {
            self.fill_sq();
        }
    }
}

impl BdevChannel for PassthruChannel {
    fn submit(&mut self, io: BdevIo, ring: &mut Ring) {
        if let Err(e) = check_range(&self.shared.info, &io) {
            self.done.push_back(io.done(Err(e)));
            return;
        }
        if !io.buffers_match() {
            self.done.push_back(io.done(Err(BdevError::Os(libc::EINVAL))));
            return;
        }
        let mut parts = std::mem::take(&mut self.parts);
        if let Err(e) = plan(&self.shared.geometry, io.op, io.offset, io.len, &mut parts) {
            self.parts = parts;
            self.done.push_back(io.done(Err(e)));
            return;
        }
        if parts.is_empty() {
            self.parts = parts;
            self.done.push_back(io.done(Ok(())));
            return;
        }
        let idx = self.free_ios.pop().unwrap_or_else(|| {
            self.ios.push(None);
            (self.ios.len() - 1) as u32
        });
        self.ios[idx as usize] = Some(Pending { io, left: parts.len() as u32, result: Ok(()) });
        self.in_flight += 1;
        for part in &parts {
            let slot = self.build(idx, part);
            self.queued.push_back(slot);
        }
        self.parts = parts;
        self.arm_wake(ring);
    }

    fn on_cqe(&mut self, slot: u32, _res: i32, ring: &mut Ring) {
        if slot == WAKE_SLOT {
            self.wake_armed = false;
            self.pump();
            self.arm_wake(ring);
        }
    }

    fn poll(&mut self, done: &mut Vec<BdevDone>) -> usize {
        if self.in_flight > 0 {
            self.pump();
        }
        let n = self.done.len();
        done.extend(self.done.drain(..));
        n
    }

    fn in_flight(&self) -> usize {
        self.in_flight + self.done.len()
    }
}

impl Drop for PassthruChannel {
    /// The kernel may still DMA into the buffers of commands in flight: wait for them (a
    /// command the kernel cannot finish is timed out and aborted by its NVMe driver), and
    /// leak what still is in flight after that rather than free memory a device may write.
    fn drop(&mut self) {
        let start = Instant::now();
        while self.issued + self.queued.len() > 0 && start.elapsed() < PASSTHRU_DRAIN_MAX {
            self.queued.clear();
            let ts = types::Timespec::from(Duration::from_millis(100));
            let args = types::SubmitArgs::new().timespec(&ts);
            let _ = self.ring.submitter().submit_with_args(1, &args);
            self.reap();
        }
        if self.issued > 0 {
            tracing::error!(
                device = %self.shared.info.name,
                "{} NVMe commands still in flight at close; leaking their buffers",
                self.issued
            );
            std::mem::forget(std::mem::take(&mut self.ios));
            std::mem::forget(std::mem::take(&mut self.cmds));
        }
        if self.wake_armed {
            std::mem::forget(std::mem::replace(&mut self.wake_buf, Box::new([0; 8])));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passthrough_command_layout() {
        let mut c = Command::write(3, 0x1_0000_0002, 8, true);
        c.set_cdw(13, 0xAA);
        let b = PassthruCmd::of(&c, 0xDEAD_B000, 4096).to_sqe_bytes();
        assert_eq!(b[0], crate::command::io::WRITE);
        assert_eq!(b[1], 0, "the kernel refuses flags");
        assert_eq!(u32::from_ne_bytes(b[4..8].try_into().unwrap()), 3);
        assert_eq!(u64::from_ne_bytes(b[24..32].try_into().unwrap()), 0xDEAD_B000);
        assert_eq!(u32::from_ne_bytes(b[36..40].try_into().unwrap()), 4096);
        assert_eq!(u32::from_ne_bytes(b[40..44].try_into().unwrap()), 2); // SLBA low
        assert_eq!(u32::from_ne_bytes(b[44..48].try_into().unwrap()), 1); // SLBA high
        assert_eq!(u32::from_ne_bytes(b[48..52].try_into().unwrap()), 1 << 30 | 7); // FUA, NLB 0-based
        assert_eq!(u32::from_ne_bytes(b[52..56].try_into().unwrap()), 0xAA);
    }

    #[test]
    fn results_become_errors_as_the_device_said() {
        assert_eq!(result_of(0), Ok(()));
        assert_eq!(result_of(-libc::EINVAL), Err(BdevError::Os(libc::EINVAL)));
        // LBA Out of Range (generic 0x80) with DNR, as the kernel hands it back.
        assert_eq!(result_of(0x4080), Err(BdevError::Nvme(Status::LBA_OUT_OF_RANGE)));
        // Write Fault: media error type 2, code 0x80.
        assert_eq!(result_of(0x280), Err(BdevError::Nvme(Status::WRITE_FAULT)));
    }

    #[test]
    fn controller_device_of_a_namespace() {
        assert_eq!(controller_of(Path::new("/dev/ng3n1")), Some(PathBuf::from("/dev/nvme3")));
        assert_eq!(controller_of(Path::new("/dev/sda")), None);
    }
}
