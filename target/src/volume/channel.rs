//! A volume as a namespace's `BlockDevice`. Each front-end reactor opens a [`VolumeChannel`] on
//! it; the channel turns block I/O into engine host operations (split at the engine's 1 MiB
//! limit), sends them to the destage reactor and completes them from its reply queue. An
//! eventfd read armed in the reactor's io_uring wakes a sleeping reactor when replies arrive.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crossbeam_channel::Receiver;
use io_uring::{opcode, types};
use stager_nvme::bdev::{BdevChannel, BdevDone, BdevError, BdevInfo, BdevIo, BdevOp, BlockDevice};
use stager_nvme::uring::{kind, user_data, Ring};
use stager_policy::constants::{BLOCK_SIZE, WRITE_BLOCKS_MAX};
use stager_policy::{HostOp, Lba, Status};

use super::service::{EngineMsg, Reply, ReplyPort, VolumeInfo, VolumeService};

/// The `user_data` slot of a channel's eventfd read (I/O never uses slots; replies are routed
/// by token).
const WAKE_SLOT: u32 = u32::MAX;
/// Largest piece one host command is split into: the engine's largest write.
const PART_BYTES: u64 = WRITE_BLOCKS_MAX as u64 * BLOCK_SIZE as u64;
/// Parts per command: the token keeps 8 bits for the part index (Write Zeroes of 65536 4 KiB
/// blocks is 256 parts).
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
        let efd = crate::reactor::new_eventfd()?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let port_id = self.service.next_port.fetch_add(1, Ordering::Relaxed);
        let port = Arc::new(ReplyPort { tx, efd });
        if !self.service.send(EngineMsg::Register { port: port_id, reply: port.clone() }) {
            return Err(std::io::Error::other("the destage reactor is not running"));
        }
        Ok(Box::new(VolumeChannel {
            id,
            port_id,
            vol: self.vol.clone(),
            service: self.service.clone(),
            rx,
            port,
            wake_buf: Box::new([0; 8]),
            armed: false,
            slots: Vec::new(),
            free: Vec::new(),
            done: Vec::new(),
            in_flight: 0,
        }))
    }
}

struct Pending {
    io: BdevIo,
    parts_left: u32,
    /// The first part that did not end `Ok`.
    failed: Option<Status>,
}

pub struct VolumeChannel {
    id: u32,
    port_id: u32,
    vol: VolumeInfo,
    service: Arc<VolumeService>,
    rx: Receiver<Reply>,
    port: Arc<ReplyPort>,
    /// The eventfd read lands here; boxed so its address is stable while the read is armed.
    wake_buf: Box<[u8; 8]>,
    armed: bool,
    slots: Vec<Option<Pending>>,
    free: Vec<u32>,
    done: Vec<BdevDone>,
    in_flight: usize,
}

/// How a command ends, given the first engine status that was not `Ok`.
fn result_of(failed: Option<Status>, io: &BdevIo, size: u64) -> Result<(), BdevError> {
    match failed {
        None | Some(Status::Ok) => Ok(()),
        // Retryable: the host's driver tries again (the write was not acknowledged).
        Some(Status::Busy | Status::NotReady) => Err(BdevError::Busy),
        Some(Status::InvalidRange) => Err(BdevError::OutOfRange { offset: io.offset, len: io.len, size }),
        Some(Status::MediumError | Status::UnknownVolume) => Err(BdevError::Os(libc::EIO)),
    }
}

impl VolumeChannel {
    fn arm(&mut self, ring: &mut Ring) {
        if self.armed {
            return;
        }
        let e = opcode::Read::new(types::Fd(self.port.efd.as_raw_fd()), self.wake_buf.as_mut_ptr(), 8)
            .build()
            .user_data(user_data(kind::BDEV, self.id, WAKE_SLOT));
        ring.push(e);
        self.armed = true;
    }

    fn send(&mut self, slot: u32, part: u32, op: HostOp) -> bool {
        let msg =
            EngineMsg::Io { dev: self.vol.dev, volume: self.vol.id, port: self.port_id, token: slot << 8 | part, op };
        self.service.send(msg)
    }

    fn finish(&mut self, io: BdevIo, result: Result<(), BdevError>) {
        self.done.push(io.done(result));
    }
}

impl BdevChannel for VolumeChannel {
    fn submit(&mut self, io: BdevIo, ring: &mut Ring) {
        let size = self.vol.blocks * BLOCK_SIZE as u64;
        let bs = BLOCK_SIZE as u64;
        let in_range = io.offset.checked_add(io.len).is_some_and(|e| e <= size);
        if !in_range || !io.offset.is_multiple_of(bs) || !io.len.is_multiple_of(bs) {
            let e = BdevError::OutOfRange { offset: io.offset, len: io.len, size };
            return self.finish(io, Err(e));
        }
        let parts = match io.op {
            // Deallocation is advisory (the namespace does not promise zeroes after it).
            BdevOp::Deallocate => return self.finish(io, Ok(())),
            BdevOp::Flush => 1,
            _ if io.len == 0 => return self.finish(io, Ok(())),
            _ => io.len.div_ceil(PART_BYTES),
        };
        if parts > PARTS_MAX {
            let e = BdevError::OutOfRange { offset: io.offset, len: io.len, size };
            return self.finish(io, Err(e));
        }
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
        };
        let mut ops = Vec::with_capacity(parts as usize);
        for p in 0..parts {
            let off = p * PART_BYTES;
            let len = PART_BYTES.min(io.len.saturating_sub(off));
            let lba = Lba((io.offset + off) / bs);
            let op = match io.op {
                BdevOp::Flush => HostOp::Flush,
                BdevOp::Read => HostOp::Read { lba, blocks: (len / bs) as u32 },
                BdevOp::Write { fua } => {
                    let data = io.buf.as_ref().map(|b| b[off as usize..(off + len) as usize].to_vec());
                    HostOp::Write { lba, data: data.unwrap_or_else(|| vec![0; len as usize]), fua }
                }
                BdevOp::WriteZeroes => HostOp::Write { lba, data: vec![0; len as usize], fua: false },
                BdevOp::Deallocate => unreachable!("completed above"),
            };
            ops.push(op);
        }
        self.slots[slot as usize] = Some(Pending { io, parts_left: parts as u32, failed: None });
        self.in_flight += 1;
        let mut lost = 0;
        for (p, op) in ops.into_iter().enumerate() {
            if !self.send(slot, p as u32, op) {
                lost += 1;
            }
        }
        if lost > 0 {
            // The destage reactor is gone (shutdown): nothing was acknowledged.
            if let Some(mut pend) = self.slots[slot as usize].take() {
                pend.parts_left -= lost;
                pend.failed = Some(Status::Busy);
                if pend.parts_left == 0 {
                    self.in_flight -= 1;
                    self.free.push(slot);
                    self.finish(pend.io, Err(BdevError::Busy));
                } else {
                    self.slots[slot as usize] = Some(pend);
                }
            }
        }
        self.arm(ring);
    }

    fn on_cqe(&mut self, slot: u32, _res: i32, ring: &mut Ring) {
        if slot == WAKE_SLOT {
            self.armed = false;
            if self.in_flight > 0 {
                self.arm(ring);
            }
        }
    }

    fn poll(&mut self, done: &mut Vec<BdevDone>) -> usize {
        while let Ok(r) = self.rx.try_recv() {
            let (slot, part) = ((r.token >> 8) as usize, (r.token & 0xff) as u64);
            let Some(Some(p)) = self.slots.get_mut(slot) else {
                tracing::error!(slot, "volume reply for a command that is not in flight");
                continue;
            };
            if r.status != Status::Ok {
                p.failed.get_or_insert(r.status);
            } else if p.io.op == BdevOp::Read {
                if let Some(buf) = p.io.buf.as_mut() {
                    let off = (part * PART_BYTES) as usize;
                    let n = r.data.len().min(buf.len().saturating_sub(off));
                    buf[off..off + n].copy_from_slice(&r.data[..n]);
                }
            }
            p.parts_left -= 1;
            if p.parts_left == 0 {
                if let Some(p) = self.slots[slot].take() {
                    self.in_flight -= 1;
                    self.free.push(slot as u32);
                    let result = result_of(p.failed, &p.io, self.vol.blocks * BLOCK_SIZE as u64);
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
        self.service.send(EngineMsg::Unregister { port: self.port_id });
    }
}
