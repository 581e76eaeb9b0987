//! A volume as a namespace's `BlockDevice`. Each front-end reactor opens a [`VolumeChannel`] on
//! it: on the reactor that owns the volume's flash device the channel hands commands to the
//! engine host through a local queue (same thread: no message, no copy, no wake-up); on any
//! other reactor it sends them to the owner over a bounded channel — one message hop — and
//! completes them from its own reply queue, whose eventfd read is armed in its reactor's ring.
//!
//! Buffers travel as they are: the transport's `AlignedBuf` holding a write's data is what the
//! engine writes to the log. Only commands larger than the engine's largest entry (1 MiB, the
//! default largest transfer) are split, and their parts copied.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crossbeam_channel::Receiver;
use io_uring::{opcode, types};
use stager_nvme::bdev::{AlignedBuf, BdevChannel, BdevDone, BdevError, BdevInfo, BdevIo, BdevOp, BlockDevice};
use stager_nvme::uring::{kind, user_data, Ring};
use stager_policy::constants::{BLOCK_SIZE, HOST_OPS_PER_VOLUME_MAX, WRITE_BLOCKS_MAX};
use stager_policy::{HostOp, Lba, Status};

use super::host::{local_queue, Completion, HostMsg, LocalQueue};

/// `user_data` slot of a remote channel's reply eventfd read: a channel's own wake-up.
const WAKE_SLOT: u32 = stager_nvme::uring::slot::CHANNEL_WAKE;
use super::service::{ReplyPort, VolumeInfo, VolumeService};

/// Largest piece one host command is split into: the engine's largest write.
const PART_BYTES: u64 = WRITE_BLOCKS_MAX as u64 * BLOCK_SIZE as u64;
/// Parts per command: the token keeps 8 bits for the part index.
const PARTS_MAX: u64 = 256;

pub struct VolumeDevice {
    info: BdevInfo,
    vol: VolumeInfo,
    service: Arc<VolumeService>,
}

impl VolumeDevice {
    pub fn new(service: Arc<VolumeService>, vol: VolumeInfo) -> VolumeDevice {
        let info = BdevInfo {
            name: format!("volume {} ({})", vol.id.0, vol.export),
            block_size: BLOCK_SIZE as u32,
            blocks: vol.blocks,
            // Write-back data is durable when acknowledged, but write-through data sits in the
            // SAN's cache until a flush: hosts must send flushes, which the engine honours.
            volatile_cache: true,
        };
        VolumeDevice { info, vol, service }
    }
}

impl BlockDevice for VolumeDevice {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn channel(&self, id: u32) -> std::io::Result<Box<dyn BdevChannel>> {
        let route = self.service.next_route.fetch_add(1, Ordering::Relaxed);
        let path = match local_queue(self.vol.dev) {
            Some(queue) => {
                let completions = Rc::new(RefCell::new(VecDeque::new()));
                queue.borrow_mut().completions.insert(route, completions.clone());
                Path::Local { queue, completions }
            }
            None => {
                let efd = crate::reactor::new_eventfd()?;
                // Room for every command this channel can have in flight (the engine accepts
                // at most HOST_OPS_PER_VOLUME_MAX per volume), so the host never finds it full.
                let (tx, rx) = crossbeam_channel::bounded(2 * HOST_OPS_PER_VOLUME_MAX);
                let port = Arc::new(ReplyPort { tx, efd });
                let sent = self
                    .service
                    .device(self.vol.dev)
                    .is_some_and(|d| d.send(HostMsg::Register { route, port: port.clone() }));
                if !sent {
                    return Err(std::io::Error::other("the volume's reactor is not running"));
                }
                Path::Remote { rx, port, wake_buf: Box::new([0; 8]), armed: false }
            }
        };
        Ok(Box::new(VolumeChannel {
            id,
            route,
            vol: self.vol.clone(),
            service: self.service.clone(),
            path,
            slots: Vec::new(),
            free: Vec::new(),
            done: Vec::new(),
            in_flight: 0,
            replies: Vec::new(),
        }))
    }
}

/// How a channel reaches its engine.
enum Path {
    /// This reactor owns the device: the host's queue, and this channel's completions.
    Local { queue: Rc<RefCell<LocalQueue>>, completions: Rc<RefCell<VecDeque<Completion>>> },
    /// Another reactor owns it: messages there, replies back through `port`.
    Remote {
        rx: Receiver<Completion>,
        port: Arc<ReplyPort>,
        /// The eventfd read lands here; boxed so its address is stable while it is armed.
        wake_buf: Box<[u8; 8]>,
        armed: bool,
    },
}

struct Pending {
    io: BdevIo,
    parts_left: u32,
    /// Split into several parts (each with its own buffer).
    split: bool,
    /// The first part that did not end `Ok`.
    failed: Option<Status>,
}

pub struct VolumeChannel {
    id: u32,
    route: u32,
    vol: VolumeInfo,
    service: Arc<VolumeService>,
    path: Path,
    slots: Vec<Option<Pending>>,
    free: Vec<u32>,
    done: Vec<BdevDone>,
    in_flight: usize,
    replies: Vec<Completion>,
}

/// How a command ends, given the first engine status that was not `Ok`. `standby`: the
/// namespace serves another node's volume only while the cluster says so; a command that
/// reached it while it does not (a path closing as the command came in) gets the status of an
/// inaccessible ANA path, so that the host retries it through another path.
fn result_of(failed: Option<Status>, io: &BdevIo, size: u64, standby: bool) -> Result<(), BdevError> {
    match failed {
        None | Some(Status::Ok) => Ok(()),
        Some(Status::UnknownVolume) if standby => Err(BdevError::Nvme(stager_nvme::status::Status::ANA_INACCESSIBLE)),
        // Retryable: the host's driver tries again (the write was not acknowledged).
        Some(Status::Busy | Status::NotReady) => Err(BdevError::Busy),
        Some(Status::InvalidRange) => Err(BdevError::OutOfRange { offset: io.offset, len: io.len, size }),
        Some(Status::MediumError | Status::UnknownVolume) => Err(BdevError::Os(libc::EIO)),
    }
}

impl VolumeChannel {
    fn arm(&mut self, ring: &mut Ring) {
        let Path::Remote { port, wake_buf, armed, .. } = &mut self.path else { return };
        if *armed {
            return;
        }
        let e = opcode::Read::new(types::Fd(port.efd.as_raw_fd()), wake_buf.as_mut_ptr(), 8)
            .build()
            .user_data(user_data(kind::BDEV, self.id, WAKE_SLOT));
        ring.push(e);
        *armed = true;
    }

    /// Hands one part to the engine; false if it cannot be sent (the owner's inbox is full or
    /// its reactor is gone).
    fn send(&mut self, token: u32, op: HostOp) -> bool {
        match &self.path {
            Path::Local { queue, .. } => {
                queue.borrow_mut().commands.push_back((self.route, token, self.vol.id, op));
                true
            }
            Path::Remote { .. } => {
                let msg = HostMsg::Io { route: self.route, token, volume: self.vol.id, op };
                self.service.device(self.vol.dev).is_some_and(|d| d.send(msg))
            }
        }
    }

    fn finish(&mut self, io: BdevIo, result: Result<(), BdevError>) {
        self.done.push(io.done(result));
    }

    /// The parts of a command, each with the buffer it carries.
    fn parts(io: &BdevIo) -> Vec<HostOp> {
        let bs = BLOCK_SIZE as u64;
        let lba = |off: u64| Lba((io.offset + off) / bs);
        let n = io.len.div_ceil(PART_BYTES);
        (0..n)
            .map(|p| {
                let off = p * PART_BYTES;
                let len = PART_BYTES.min(io.len - off);
                let blocks = (len / bs) as u32;
                match io.op {
                    BdevOp::Read => HostOp::Read { lba: lba(off), blocks, buf: AlignedBuf::new(len as usize) },
                    BdevOp::Write { fua } => {
                        let mut buf = AlignedBuf::new(len as usize);
                        if let Some(src) = io.buf.as_ref() {
                            buf.copy_from_slice(&src[off as usize..(off + len) as usize]);
                        }
                        HostOp::Write { lba: lba(off), buf, fua }
                    }
                    _ => unreachable!("only reads and writes are split"),
                }
            })
            .collect()
    }
}

impl BdevChannel for VolumeChannel {
    fn submit(&mut self, mut io: BdevIo, ring: &mut Ring) {
        let size = self.vol.blocks * BLOCK_SIZE as u64;
        let bs = BLOCK_SIZE as u64;
        let in_range = io.offset.checked_add(io.len).is_some_and(|e| e <= size);
        if !in_range || !io.offset.is_multiple_of(bs) || !io.len.is_multiple_of(bs) || !io.gather.is_empty() {
            let e = BdevError::OutOfRange { offset: io.offset, len: io.len, size };
            return self.finish(io, Err(e));
        }
        if io.len == 0 && io.op != BdevOp::Flush {
            return self.finish(io, Ok(()));
        }
        let lba = Lba(io.offset / bs);
        let blocks = io.len / bs;
        let split = matches!(io.op, BdevOp::Read | BdevOp::Write { .. }) && io.len > PART_BYTES;
        if split && io.len.div_ceil(PART_BYTES) > PARTS_MAX {
            let e = BdevError::OutOfRange { offset: io.offset, len: io.len, size };
            return self.finish(io, Err(e));
        }
        let ops: Vec<HostOp> = if split {
            Self::parts(&io)
        } else {
            let whole = match io.op {
                BdevOp::Read | BdevOp::Write { .. } if io.buf.as_ref().is_none_or(|b| b.len() as u64 != io.len) => {
                    return self.finish(io, Err(BdevError::Os(libc::EINVAL)))
                }
                BdevOp::Read => HostOp::Read { lba, blocks: blocks as u32, buf: io.buf.take().expect("checked above") },
                BdevOp::Write { fua } => HostOp::Write { lba, buf: io.buf.take().expect("checked above"), fua },
                BdevOp::WriteZeroes if blocks <= u32::MAX as u64 => HostOp::WriteZeroes { lba, blocks: blocks as u32 },
                BdevOp::Deallocate if blocks <= u32::MAX as u64 => HostOp::Deallocate { lba, blocks: blocks as u32 },
                BdevOp::Flush => HostOp::Flush,
                _ => {
                    let e = BdevError::OutOfRange { offset: io.offset, len: io.len, size };
                    return self.finish(io, Err(e));
                }
            };
            vec![whole]
        };
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
        };
        let parts = ops.len() as u32;
        self.slots[slot as usize] = Some(Pending { io, parts_left: parts, split, failed: None });
        self.in_flight += 1;
        let mut lost = Vec::new();
        for (p, op) in ops.into_iter().enumerate() {
            let token = slot << 8 | p as u32;
            if !self.send(token, op) {
                lost.push(token);
            }
        }
        // Parts that could not be sent end Busy (retryable: nothing was acknowledged).
        for token in lost {
            self.replies.push(Completion { token, status: Status::Busy, buf: None });
        }
        self.arm(ring);
    }

    fn on_cqe(&mut self, slot: u32, _res: i32, ring: &mut Ring) {
        if slot == WAKE_SLOT {
            if let Path::Remote { armed, .. } = &mut self.path {
                *armed = false;
            }
            if self.in_flight > 0 {
                self.arm(ring);
            }
        }
    }

    fn poll(&mut self, done: &mut Vec<BdevDone>) -> usize {
        match &self.path {
            Path::Local { completions, .. } => self.replies.extend(completions.borrow_mut().drain(..)),
            Path::Remote { rx, .. } => self.replies.extend(rx.try_iter()),
        }
        let size = self.vol.blocks * BLOCK_SIZE as u64;
        for r in std::mem::take(&mut self.replies) {
            let (slot, part) = ((r.token >> 8) as usize, (r.token & 0xff) as u64);
            let Some(Some(p)) = self.slots.get_mut(slot) else {
                tracing::error!(slot, "volume reply for a command that is not in flight");
                continue;
            };
            if r.status != Status::Ok {
                p.failed.get_or_insert(r.status);
            }
            match (p.split, p.io.op, r.buf) {
                // Whole: the buffer comes back to its command.
                (false, _, Some(buf)) => p.io.buf = Some(buf),
                (true, BdevOp::Read, Some(buf)) if r.status == Status::Ok => {
                    if let Some(dst) = p.io.buf.as_mut() {
                        let off = (part * PART_BYTES) as usize;
                        let n = buf.len().min(dst.len().saturating_sub(off));
                        dst[off..off + n].copy_from_slice(&buf[..n]);
                    }
                }
                _ => {}
            }
            p.parts_left -= 1;
            if p.parts_left == 0 {
                if let Some(p) = self.slots[slot].take() {
                    self.in_flight -= 1;
                    self.free.push(slot as u32);
                    let result = result_of(p.failed, &p.io, size, self.vol.standby);
                    self.finish(p.io, result);
                }
            }
        }
        let n = self.done.len();
        done.append(&mut self.done);
        n
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }
}

impl Drop for VolumeChannel {
    fn drop(&mut self) {
        match &self.path {
            Path::Local { queue, .. } => {
                queue.borrow_mut().completions.remove(&self.route);
            }
            Path::Remote { .. } => {
                if let Some(d) = self.service.device(self.vol.dev) {
                    d.send(HostMsg::Unregister { route: self.route });
                }
            }
        }
    }
}
