//! Local block devices behind one trait, in SPDK's bdev style: a `BlockDevice` is shared by all
//! reactors, and each reactor opens its own `BdevChannel` on it (like an SPDK io_channel), so the
//! I/O path needs no locks. Channels that do real I/O submit to the reactor's io_uring and get
//! their completions routed back by `user_data`; synchronous ones (memory) complete on the next
//! poll. The write-back engine plugs in here as another `BlockDevice`.
//!
//! Local flash has three drivers: `file` (a file or block device under O_DIRECT), `passthru`
//! (raw NVMe commands through io_uring on the namespace's `/dev/ngXnY`) and `vfio` (our own
//! NVMe queues on a controller bound to vfio-pci). [`open_device`] is the one place a
//! configuration's [`DeviceSpec`] becomes a device.

mod buf;
mod fault;
mod file;
mod mem;
mod nvme_io;
mod open;
mod passthru;
pub mod vfio;

pub use buf::{AlignedBuf, BufPool, LentBuf, BUF_ALIGN};
pub use fault::{Fault, FaultyDevice};
pub use file::FileDevice;
pub use mem::MemoryDevice;
pub use open::{open_device, read_blocking, write_blocking, DeviceSpec};
pub use passthru::{passthru_supported, PassthruDevice};
pub use vfio::VfioDevice;

use crate::status::Status;
use crate::uring::Ring;

/// What a device is.
#[derive(Clone, Debug)]
pub struct BdevInfo {
    pub name: String,
    pub block_size: u32,
    pub blocks: u64,
    /// Writes may sit in a volatile cache until a flush (the namespace reports VWC).
    pub volatile_cache: bool,
}

impl BdevInfo {
    pub fn size_bytes(&self) -> u64 {
        self.blocks * self.block_size as u64
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BdevOp {
    Read,
    Write { fua: bool },
    Flush,
    WriteZeroes,
    Deallocate,
}

/// One I/O: byte offset and length (block aligned, checked by the caller against the device).
#[derive(Debug)]
pub struct BdevIo {
    pub op: BdevOp,
    pub offset: u64,
    pub len: u64,
    /// Data for reads/writes; none for the others. A read fills it (`len` bytes); a write sends
    /// it followed by `gather`, `len` bytes in all.
    pub buf: Option<AlignedBuf>,
    /// Further buffers a write sends after `buf`, in order, in the same operation (a log frame:
    /// its header block, then each entry's data straight from the host's I/O buffer, so nothing
    /// is copied to make it contiguous). Empty for everything else; an empty `Vec` allocates
    /// nothing.
    pub gather: Vec<AlignedBuf>,
    /// Caller's identification, returned in the completion.
    pub token: u64,
    /// Reads only: the caller accepts the data as a [`LentBuf`] in `BdevDone::lent` instead of
    /// in `buf`, if the device can lend its own bytes (the memory device can, for a read inside
    /// one of its chunks). Off unless the caller sets it: a caller that ignores `lent` would
    /// read a buffer nobody filled.
    pub lend: bool,
}

impl BdevIo {
    /// An I/O on one buffer (or none).
    pub fn new(op: BdevOp, offset: u64, len: u64, buf: Option<AlignedBuf>, token: u64) -> BdevIo {
        BdevIo { op, offset, len, buf, gather: Vec::new(), token, lend: false }
    }

    /// The buffers a write sends, in order.
    pub fn pieces(&self) -> impl Iterator<Item = &AlignedBuf> {
        self.buf.iter().chain(self.gather.iter())
    }

    /// Whether the buffers add up to `len` (a read: its one buffer holds `len` bytes).
    pub fn buffers_match(&self) -> bool {
        match self.op {
            BdevOp::Read => self.gather.is_empty() && self.buf.as_ref().is_some_and(|b| b.len() as u64 == self.len),
            BdevOp::Write { .. } => {
                self.buf.is_some() && self.pieces().map(|b| b.len() as u64).sum::<u64>() == self.len
            }
            _ => true,
        }
    }

    /// The completion of this I/O, handing its buffers back.
    pub fn done(self, result: Result<(), BdevError>) -> BdevDone {
        BdevDone { token: self.token, result, buf: self.buf, gather: self.gather, lent: None }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BdevError {
    #[error("I/O error from the device: errno {0}")]
    Os(i32),
    #[error("range {offset}+{len} beyond the device's {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// Could not be done now (a full log with the SAN down, a volume still starting); nothing
    /// was written or acknowledged and the host may retry.
    #[error("device busy; retry")]
    Busy,
    /// An NVMe device completed the command with this status (passed up as it is).
    #[error("NVMe status {0}")]
    Nvme(Status),
    /// The device stopped working: a controller fatal status, a command that never completed,
    /// a controller that went away. Every later I/O fails the same way.
    #[error("device failed: {0}")]
    DeviceFailed(String),
}

impl BdevError {
    /// The status a host sees for a failed device operation: the one place a device error
    /// becomes an NVMe status. A local NVMe device's own status goes up as it is; a read
    /// (or compare) that failed otherwise is an unrecovered read error, anything else a
    /// write fault.
    pub fn status(&self, read: bool) -> Status {
        match self {
            BdevError::OutOfRange { .. } => Status::LBA_OUT_OF_RANGE,
            // Retryable (DNR clear): hosts back off and resubmit.
            BdevError::Busy => Status::NAMESPACE_NOT_READY,
            BdevError::Nvme(s) => *s,
            BdevError::Os(_) | BdevError::DeviceFailed(_) if read => Status::UNRECOVERED_READ_ERROR,
            BdevError::Os(_) | BdevError::DeviceFailed(_) => Status::WRITE_FAULT,
        }
    }
}

#[derive(Debug)]
pub struct BdevDone {
    pub token: u64,
    pub result: Result<(), BdevError>,
    pub buf: Option<AlignedBuf>,
    /// A gathered write's further buffers, handed back.
    pub gather: Vec<AlignedBuf>,
    /// A read the device answered with its own bytes (only when `BdevIo::lend` was set): the
    /// data is here, and `buf` comes back untouched.
    pub lent: Option<LentBuf>,
}

pub trait BlockDevice: Send + Sync {
    fn info(&self) -> &BdevInfo;
    /// Opens this reactor's channel; `id` goes into `user_data` so completions find it.
    fn channel(&self, id: u32) -> std::io::Result<Box<dyn BdevChannel>>;
    /// Makes everything written so far durable (called at shutdown).
    fn sync(&self) -> std::io::Result<()> {
        Ok(())
    }
}

pub trait BdevChannel {
    fn submit(&mut self, io: BdevIo, ring: &mut Ring);
    /// A ring completion addressed to this channel (`slot` from its `user_data`).
    fn on_cqe(&mut self, slot: u32, res: i32, ring: &mut Ring);
    /// Moves finished I/O to `done`; returns how many.
    fn poll(&mut self, done: &mut Vec<BdevDone>) -> usize;
    fn in_flight(&self) -> usize;
    /// Whether I/O in flight may be waiting for CPU time of the kernel's own threads rather
    /// than for the device (a file's `fdatasync` in an io-wq worker, a write into a hole). A
    /// reactor with nothing else to do then sleeps instead of spinning, so those threads get a
    /// core (`reactor.rs`, "Waiting on the kernel"). Devices whose completions arrive by
    /// interrupt or by polling say false.
    fn waits_on_kernel(&self) -> bool {
        false
    }
}

/// What a device that finishes I/O inside `submit` (memory, test devices) implements; a
/// `SyncChannel` around it queues the completions for the next `poll`, as a reactor expects.
pub(crate) trait SyncIo {
    fn run(&self, io: &mut BdevIo) -> Result<(), BdevError>;
    /// A read's data as a loan of the device's own bytes, when it can give one (checked, in
    /// range, `io.lend` set); `None` means: run it as usual.
    fn lend(&self, _io: &BdevIo) -> Option<LentBuf> {
        None
    }
}

pub(crate) struct SyncChannel<D> {
    dev: D,
    done: std::collections::VecDeque<BdevDone>,
}

impl<D: SyncIo> SyncChannel<D> {
    pub(crate) fn boxed(dev: D) -> Box<dyn BdevChannel>
    where
        D: 'static,
    {
        Box::new(SyncChannel { dev, done: std::collections::VecDeque::new() })
    }
}

impl<D: SyncIo> BdevChannel for SyncChannel<D> {
    fn submit(&mut self, mut io: BdevIo, _ring: &mut Ring) {
        if io.lend && io.op == BdevOp::Read {
            if let Some(lent) = self.dev.lend(&io) {
                let mut d = io.done(Ok(()));
                d.lent = Some(lent);
                self.done.push_back(d);
                return;
            }
        }
        let result = if io.buffers_match() { self.dev.run(&mut io) } else { Err(BdevError::Os(libc::EINVAL)) };
        self.done.push_back(io.done(result));
    }
    fn on_cqe(&mut self, _slot: u32, _res: i32, _ring: &mut Ring) {}
    fn poll(&mut self, done: &mut Vec<BdevDone>) -> usize {
        let n = self.done.len();
        done.extend(self.done.drain(..));
        n
    }
    fn in_flight(&self) -> usize {
        self.done.len()
    }
}

fn check_range(info: &BdevInfo, io: &BdevIo) -> Result<(), BdevError> {
    let size = info.size_bytes();
    if io.offset.checked_add(io.len).is_none_or(|end| end > size) {
        return Err(BdevError::OutOfRange { offset: io.offset, len: io.len, size });
    }
    Ok(())
}
