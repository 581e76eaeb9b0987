//! Simulated flash and SAN devices: one model, two personalities. Each holds an image that
//! reads see and, for a volatile-cache device, the durable image that survives power loss.
//! Operations complete after a seeded random latency, so completions reorder freely; data is
//! applied when the completion is delivered. Faults are time windows set by the simulator.
//!
//! A device has numbered *ports*: the engine and the destager each reach the one flash device
//! through a port of their own (as they do in stagerd, from two cores), and each sees only its
//! own completions.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use rand::rngs::StdRng;
use rand::Rng;

use crate::constants::{BLOCK_SIZE, BLOCK_SIZE_U64};
use crate::io::{AlignedBuf, Flash, FlashInfo, IoDone, IoError, San};
use crate::types::IoToken;

enum Kind {
    Read {
        off: u64,
        buf: AlignedBuf,
    },
    /// `bufs` back to back from `off`; `data` is a copy taken at submission (what lands).
    Write {
        off: u64,
        data: Vec<u8>,
        bufs: Vec<AlignedBuf>,
        fua: bool,
    },
    /// Write Zeroes or an unmap (which reads as zeroes on this model).
    Zero {
        off: u64,
        len: u64,
    },
    Flush,
}

struct Pending {
    port: usize,
    token: IoToken,
    ready_at: u64,
    order: u64,
    kind: Kind,
    error: Option<IoError>,
}

pub struct SimDisk {
    pub image: Vec<u8>,
    /// What survives power loss; None when the device has no volatile cache.
    pub durable: Option<Vec<u8>>,
    /// Blocks in the volatile cache, in completion order (one entry per 4 KiB block).
    unflushed: Vec<(u64, Vec<u8>)>,
    pending: Vec<Pending>,
    order: u64,
    rng: StdRng,
    now: Rc<Cell<u64>>,
    /// SAN personality: errors are "unreachable" during outages.
    is_san: bool,
    pub latency_min_ns: u64,
    pub latency_max_ns: u64,
    pub slow_factor: u64,
    pub slow_until: u64,
    pub fail_writes_until: u64,
    pub fail_reads_until: u64,
    pub down_until: u64,
    pub error_ppm: u32,
    /// Mutation for checker tests: acknowledge writes without storing them.
    pub drop_writes: bool,
    pub writes: u64,
    pub flushes: u64,
}

/// A shared handle on one port of a device: the engine and the destager own theirs; the
/// simulator keeps another to inject faults, crash the device and read its image.
#[derive(Clone)]
pub struct DiskHandle(pub Rc<RefCell<SimDisk>>, pub usize);

impl SimDisk {
    pub fn create(size: u64, volatile: bool, is_san: bool, rng: StdRng, now: Rc<Cell<u64>>) -> DiskHandle {
        // Two zeroed allocations rather than a clone: the pages stay unmapped until written.
        let image = vec![0u8; size as usize];
        DiskHandle(
            Rc::new(RefCell::new(SimDisk {
                durable: if volatile { Some(vec![0u8; size as usize]) } else { None },
                image,
                unflushed: Vec::new(),
                pending: Vec::new(),
                order: 0,
                rng,
                now,
                is_san,
                latency_min_ns: if is_san { 200_000 } else { 10_000 },
                latency_max_ns: if is_san { 2_000_000 } else { 100_000 },
                slow_factor: 1,
                slow_until: 0,
                fail_writes_until: 0,
                fail_reads_until: 0,
                down_until: 0,
                error_ppm: 0,
                drop_writes: false,
                writes: 0,
                flushes: 0,
            })),
            0,
        )
    }

    fn submit(&mut self, port: usize, token: IoToken, kind: Kind) {
        let now = self.now.get();
        let mut lat = self.rng.gen_range(self.latency_min_ns..=self.latency_max_ns);
        if now < self.slow_until {
            lat *= self.slow_factor;
        }
        let is_write = matches!(kind, Kind::Write { .. } | Kind::Zero { .. });
        let error = if self.is_san && now < self.down_until {
            Some(IoError::Unreachable)
        } else if (!self.is_san && is_write && now < self.fail_writes_until)
            || (!self.is_san && matches!(kind, Kind::Read { .. }) && now < self.fail_reads_until)
            || (self.error_ppm > 0 && self.rng.gen_range(0..1_000_000) < self.error_ppm)
        {
            Some(IoError::Failed)
        } else {
            None
        };
        self.order += 1;
        self.pending.push(Pending { port, token, ready_at: now + lat, order: self.order, kind, error });
    }

    fn store(&mut self, off: u64, data: &[u8], fua: bool) {
        let o = off as usize;
        self.image[o..o + data.len()].copy_from_slice(data);
        if let Some(durable) = &mut self.durable {
            if fua {
                // A FUA write supersedes cached older copies of its blocks.
                durable[o..o + data.len()].copy_from_slice(data);
                let end = off + data.len() as u64;
                self.unflushed.retain(|(b, _)| *b < off || *b >= end);
            } else {
                for (i, block) in data.chunks(BLOCK_SIZE).enumerate() {
                    self.unflushed.push((off + (i * BLOCK_SIZE) as u64, block.to_vec()));
                }
            }
        }
    }

    /// Stores a random subset of the blocks of a write (a torn write).
    fn store_torn(&mut self, off: u64, data: &[u8], fua: bool) {
        for b in 0..data.len() / BLOCK_SIZE {
            if self.rng.gen_bool(0.5) {
                let block = &data[b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE];
                self.store(off + b as u64 * BLOCK_SIZE_U64, block, fua);
            }
        }
    }

    fn complete(&mut self, port: usize, out: &mut Vec<IoDone>) -> usize {
        let now = self.now.get();
        let mut ready: Vec<Pending> = Vec::new();
        let mut i = 0;
        while i < self.pending.len() {
            if self.pending[i].port == port && self.pending[i].ready_at <= now {
                ready.push(self.pending.swap_remove(i));
            } else {
                i += 1;
            }
        }
        ready.sort_by_key(|p| (p.ready_at, p.order));
        let n = ready.len();
        for p in ready {
            let done = match (p.kind, p.error) {
                (Kind::Write { off, data, bufs, fua }, Some(e)) => {
                    // A failed write may still have reached the media, in part.
                    if !self.is_san && self.rng.gen_bool(0.5) {
                        self.store_torn(off, &data, fua);
                    }
                    gathered(p.token, Err(e), bufs)
                }
                (Kind::Read { buf, .. }, Some(e)) => IoDone::new(p.token, Err(e), Some(buf)),
                (_, Some(e)) => IoDone::new(p.token, Err(e), None),
                (Kind::Read { off, mut buf }, None) => {
                    let o = off as usize;
                    let n = buf.len();
                    buf.copy_from_slice(&self.image[o..o + n]);
                    IoDone::new(p.token, Ok(()), Some(buf))
                }
                (Kind::Write { off, data, bufs, fua }, None) => {
                    self.writes += 1;
                    if !self.drop_writes {
                        self.store(off, &data, fua);
                    }
                    gathered(p.token, Ok(()), bufs)
                }
                (Kind::Zero { off, len }, None) => {
                    self.writes += 1;
                    if !self.drop_writes {
                        self.store(off, &vec![0u8; len as usize], false);
                    }
                    IoDone::new(p.token, Ok(()), None)
                }
                (Kind::Flush, None) => {
                    self.flushes += 1;
                    if let Some(durable) = &mut self.durable {
                        for (off, data) in self.unflushed.drain(..) {
                            durable[off as usize..off as usize + data.len()].copy_from_slice(&data);
                        }
                    }
                    IoDone::new(p.token, Ok(()), None)
                }
            };
            out.push(done);
        }
        n
    }

    /// The node crashed: in-flight writes land torn or not at all, completions are lost.
    pub fn crash_in_flight(&mut self) {
        for p in std::mem::take(&mut self.pending) {
            if let Kind::Write { off, data, fua, .. } = p.kind {
                if p.error.is_none() && self.rng.gen_bool(0.4) && !self.drop_writes {
                    self.store_torn(off, &data, fua);
                }
            }
        }
    }

    /// Power loss: of the blocks in the volatile cache, a random subset (applied in order, so a
    /// block ends with its durable value or any cached version) reaches the media.
    pub fn power_loss(&mut self) {
        let Some(mut durable) = self.durable.take() else { return };
        let unflushed = std::mem::take(&mut self.unflushed);
        for (off, data) in &unflushed {
            if self.rng.gen_bool(0.5) {
                durable[*off as usize..*off as usize + BLOCK_SIZE].copy_from_slice(data);
            }
        }
        // Only blocks that were in the cache can differ from the durable image.
        for (off, _) in &unflushed {
            let o = *off as usize;
            self.image[o..o + BLOCK_SIZE].copy_from_slice(&durable[o..o + BLOCK_SIZE]);
        }
        self.durable = Some(durable);
    }

    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    pub fn volatile(&self) -> bool {
        self.durable.is_some()
    }
}

fn gathered(token: IoToken, result: Result<(), IoError>, mut bufs: Vec<AlignedBuf>) -> IoDone {
    let first = if bufs.is_empty() { None } else { Some(bufs.remove(0)) };
    IoDone { token, result, buf: first, gather: bufs }
}

impl DiskHandle {
    /// Another port on the same device.
    pub fn port(&self, port: usize) -> DiskHandle {
        DiskHandle(self.0.clone(), port)
    }
}

impl Flash for DiskHandle {
    fn info(&self) -> FlashInfo {
        let d = self.0.borrow();
        FlashInfo { size_bytes: d.image.len() as u64, volatile_cache: d.durable.is_some() }
    }
    fn submit_read(&mut self, token: IoToken, offset: u64, buf: AlignedBuf) {
        self.0.borrow_mut().submit(self.1, token, Kind::Read { off: offset, buf });
    }
    fn submit_write(&mut self, token: IoToken, offset: u64, first: AlignedBuf, gather: Vec<AlignedBuf>, fua: bool) {
        let mut bufs = Vec::with_capacity(1 + gather.len());
        bufs.push(first);
        bufs.extend(gather);
        let mut data = Vec::with_capacity(bufs.iter().map(|b| b.len()).sum());
        for b in &bufs {
            data.extend_from_slice(b);
        }
        self.0.borrow_mut().submit(self.1, token, Kind::Write { off: offset, data, bufs, fua });
    }
    fn submit_flush(&mut self, token: IoToken) {
        self.0.borrow_mut().submit(self.1, token, Kind::Flush);
    }
    fn poll_completions(&mut self, out: &mut Vec<IoDone>) -> usize {
        self.0.borrow_mut().complete(self.1, out)
    }
}

impl San for DiskHandle {
    fn size_bytes(&self) -> u64 {
        self.0.borrow().image.len() as u64
    }
    fn unmap_reads_zeroes(&self) -> bool {
        true
    }
    fn submit_read(&mut self, token: IoToken, offset: u64, buf: AlignedBuf) {
        self.0.borrow_mut().submit(self.1, token, Kind::Read { off: offset, buf });
    }
    fn submit_write(&mut self, token: IoToken, offset: u64, buf: AlignedBuf, fua: bool) {
        let data = buf.to_vec();
        self.0.borrow_mut().submit(self.1, token, Kind::Write { off: offset, data, bufs: vec![buf], fua });
    }
    fn submit_write_zeroes(&mut self, token: IoToken, offset: u64, len: u64) {
        self.0.borrow_mut().submit(self.1, token, Kind::Zero { off: offset, len });
    }
    fn submit_unmap(&mut self, token: IoToken, offset: u64, len: u64) {
        self.0.borrow_mut().submit(self.1, token, Kind::Zero { off: offset, len });
    }
    fn submit_flush(&mut self, token: IoToken) {
        self.0.borrow_mut().submit(self.1, token, Kind::Flush);
    }
    fn poll_completions(&mut self, out: &mut Vec<IoDone>) -> usize {
        self.0.borrow_mut().complete(self.1, out)
    }
}
