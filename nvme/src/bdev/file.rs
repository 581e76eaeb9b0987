//! A file or block device through the reactor's io_uring, with O_DIRECT and aligned buffers:
//! the local-flash driver on a real node (an NVMe block device) and the embedded default's
//! backing file on a developer machine.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use io_uring::{opcode, types};

use super::{check_range, BdevChannel, BdevDone, BdevError, BdevInfo, BdevIo, BdevOp, BlockDevice};
use crate::uring::{kind, user_data, Ring};

pub struct FileDevice {
    info: BdevInfo,
    file: Arc<File>,
    /// How a FUA write is made durable (see [`FuaBy`]).
    fua_by: FuaBy,
}

/// How a FUA write is made durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FuaBy {
    /// `RWF_DSYNC` on the write: a block device, where the block layer sends the data with FUA
    /// or runs the flush after it itself (high-priority kblockd work), in one operation.
    Dsync,
    /// The write, then an `fdatasync` of its range once it has completed: a regular file. An
    /// `RWF_DSYNC` O_DIRECT write to a file on a device without FUA (a virtual disk, most
    /// SATA drives) completes through the file system's `dio` workqueue — a normal-priority
    /// kworker bound to the CPU that took the disk's interrupt, which runs the flush and only
    /// then the completion. A busy-polling thread on that CPU (a host, a reactor, a compiler)
    /// holds it off for up to a scheduler tick (4 ms at HZ=250; the write itself takes 40 µs).
    /// The `fdatasync` runs in an io-wq worker of the ring instead, which can run on any core,
    /// and the reactor sleeps rather than spins while it waits for one
    /// ([`BdevChannel::waits_on_kernel`]).
    WriteThenSync,
}

impl FileDevice {
    /// Opens (creating or extending to `size_bytes` if given) a file or block device.
    pub fn open(path: &Path, size_bytes: Option<u64>, block_size: u32, direct: bool) -> std::io::Result<FileDevice> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(true);
        if direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let meta = std::fs::metadata(path).ok();
        let is_block = meta.as_ref().is_some_and(|m| m.file_type().is_block_device());
        if !is_block {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            opts.create(size_bytes.is_some());
        }
        let file = opts.open(path)?;
        let size = if is_block {
            block_device_size(&file)?
        } else {
            let cur = file.metadata()?.len();
            match size_bytes {
                Some(want) if cur < want => {
                    file.set_len(want)?;
                    want
                }
                Some(want) => want,
                None => cur,
            }
        };
        if size < block_size as u64 {
            return Err(std::io::Error::other(format!("{} holds {size} bytes, less than one block", path.display())));
        }
        Ok(FileDevice {
            fua_by: if is_block { FuaBy::Dsync } else { FuaBy::WriteThenSync },
            info: BdevInfo {
                name: path.display().to_string(),
                block_size,
                blocks: size / block_size as u64,
                // A file's page cache or a drive's cache: data is durable only after fsync.
                volatile_cache: true,
            },
            file: Arc::new(file),
        })
    }
}

fn block_device_size(f: &File) -> std::io::Result<u64> {
    let mut size: u64 = 0;
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    // SAFETY: the ioctl writes one u64 into `size`, which lives across the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64, &mut size) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(size)
}

impl BlockDevice for FileDevice {
    fn info(&self) -> &BdevInfo {
        &self.info
    }
    fn channel(&self, id: u32) -> std::io::Result<Box<dyn BdevChannel>> {
        Ok(Box::new(FileChannel {
            id,
            info: self.info.clone(),
            file: self.file.clone(),
            fua_by: self.fua_by,
            slots: Vec::new(),
            free: Vec::new(),
            done: VecDeque::new(),
            in_flight: 0,
            worker_ops: 0,
        }))
    }
    fn sync(&self) -> std::io::Result<()> {
        self.file.sync_all()
    }
}

struct Slot {
    io: BdevIo,
    /// Bytes already transferred (short reads/writes are resubmitted for the rest).
    done: u64,
    /// The iovecs of a gathered write, rebuilt for each (re)submission; the kernel reads them
    /// while the operation is in flight, so they live in the slot until it completes.
    iov: Vec<libc::iovec>,
    /// A FUA write's data is written and its `fdatasync` is in flight (`FuaBy::WriteThenSync`).
    syncing: bool,
}

struct FileChannel {
    id: u32,
    info: BdevInfo,
    file: Arc<File>,
    fua_by: FuaBy,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    done: VecDeque<BdevDone>,
    in_flight: usize,
    /// Operations in flight that io_uring always hands to one of its io-wq worker threads: an
    /// `fsync` (a flush, or the second half of a FUA write) and a `fallocate`. Reads and writes
    /// are issued inline and complete by interrupt (writes into a sparse file's holes aside).
    worker_ops: usize,
}

/// Whether `s` is, in its present phase, an operation io_uring runs in an io-wq worker.
fn in_worker(s: &Slot) -> bool {
    s.syncing || matches!(s.io.op, BdevOp::Flush | BdevOp::WriteZeroes | BdevOp::Deallocate)
}

/// Durability on the write itself where that is cheap (`FuaBy::Dsync`): with `RWF_DSYNC` the
/// kernel sends the data with FUA (or flushes right after it) before the operation completes,
/// so a FUA write costs one operation instead of a write plus an `fdatasync`.
fn write_flags(op: BdevOp, fua_by: FuaBy) -> i32 {
    match (op, fua_by) {
        (BdevOp::Write { fua: true }, FuaBy::Dsync) => libc::RWF_DSYNC,
        _ => 0,
    }
}

impl FileChannel {
    fn issue(&mut self, slot: u32, ring: &mut Ring) {
        let fd = types::Fd(self.file.as_raw_fd());
        let ud = user_data(kind::BDEV, self.id, slot);
        let flags = |op| write_flags(op, self.fua_by);
        let Some(Some(s)) = self.slots.get_mut(slot as usize) else { return };
        let off = s.io.offset + s.done;
        let rest = (s.io.len - s.done) as u32;
        let entry = match (s.io.op, s.io.buf.as_mut()) {
            // The data of a FUA write is down: make it durable (its range only, so a buffered
            // file's other dirty pages are not written with it).
            (BdevOp::Write { .. }, _) if s.syncing => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .offset(s.io.offset)
                .len(u32::try_from(s.io.len).unwrap_or(0))
                .build(),
            (BdevOp::Read, Some(b)) => {
                opcode::Read::new(fd, b[s.done as usize..].as_mut_ptr(), rest).offset(off).build()
            }
            (BdevOp::Write { .. }, Some(b)) if s.io.gather.is_empty() => {
                opcode::Write::new(fd, b[s.done as usize..].as_ptr(), rest).offset(off).rw_flags(flags(s.io.op)).build()
            }
            (BdevOp::Write { .. }, Some(_)) => {
                s.iov.clear();
                let mut skip = s.done as usize;
                for piece in s.io.pieces() {
                    if skip >= piece.len() {
                        skip -= piece.len();
                        continue;
                    }
                    let p = &piece[skip..];
                    skip = 0;
                    s.iov.push(libc::iovec { iov_base: p.as_ptr() as *mut libc::c_void, iov_len: p.len() });
                }
                opcode::Writev::new(fd, s.iov.as_ptr(), s.iov.len() as u32).offset(off).rw_flags(flags(s.io.op)).build()
            }
            (BdevOp::Flush, _) => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
            (BdevOp::WriteZeroes, _) => {
                opcode::Fallocate::new(fd, s.io.len).offset(s.io.offset).mode(libc::FALLOC_FL_ZERO_RANGE).build()
            }
            (BdevOp::Deallocate, _) => opcode::Fallocate::new(fd, s.io.len)
                .offset(s.io.offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            // Read/write without a buffer is refused in `submit`; never reached.
            _ => opcode::Nop::new().build(),
        };
        ring.push(entry.user_data(ud));
    }

    fn finish(&mut self, slot: u32, result: Result<(), BdevError>) {
        if let Some(s) = self.slots.get_mut(slot as usize).and_then(|s| s.take()) {
            self.free.push(slot);
            self.in_flight -= 1;
            self.worker_ops -= usize::from(in_worker(&s));
            self.done.push_back(s.io.done(result));
        }
    }
}

impl Drop for FileChannel {
    /// The kernel may still read into or write from the buffers of operations in flight (the
    /// ring is its owner's, not ours, so we cannot wait for them here): leak those buffers
    /// rather than free memory the kernel may still write. Owners drain before they drop.
    fn drop(&mut self) {
        if self.in_flight > 0 {
            tracing::error!(
                device = %self.info.name,
                in_flight = self.in_flight,
                "channel dropped with operations in flight; leaking their buffers"
            );
            for s in self.slots.drain(..).flatten() {
                std::mem::forget(s);
            }
        }
    }
}

impl BdevChannel for FileChannel {
    fn submit(&mut self, io: BdevIo, ring: &mut Ring) {
        if let Err(e) = check_range(&self.info, &io) {
            self.done.push_back(io.done(Err(e)));
            return;
        }
        if !io.buffers_match() {
            self.done.push_back(io.done(Err(BdevError::Os(libc::EINVAL))));
            return;
        }
        let slot = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            (self.slots.len() - 1) as u32
        });
        let iov = self.slots[slot as usize].take().map(|s| s.iov).unwrap_or_default();
        let s = Slot { io, done: 0, iov, syncing: false };
        self.worker_ops += usize::from(in_worker(&s));
        self.slots[slot as usize] = Some(s);
        self.in_flight += 1;
        self.issue(slot, ring);
    }

    fn on_cqe(&mut self, slot: u32, res: i32, ring: &mut Ring) {
        let Some(Some(s)) = self.slots.get_mut(slot as usize) else { return };
        if res < 0 {
            self.finish(slot, Err(BdevError::Os(-res)));
            return;
        }
        match s.io.op {
            BdevOp::Write { .. } if s.syncing => self.finish(slot, Ok(())),
            BdevOp::Read | BdevOp::Write { .. } => {
                if res == 0 {
                    self.finish(slot, Err(BdevError::Os(libc::EIO)));
                    return;
                }
                s.done += res as u64;
                if s.done < s.io.len {
                    self.issue(slot, ring);
                } else if s.io.op == (BdevOp::Write { fua: true }) && self.fua_by == FuaBy::WriteThenSync {
                    s.syncing = true;
                    self.worker_ops += 1;
                    self.issue(slot, ring);
                } else {
                    self.finish(slot, Ok(()));
                }
            }
            _ => self.finish(slot, Ok(())),
        }
    }

    fn poll(&mut self, done: &mut Vec<BdevDone>) -> usize {
        let n = self.done.len();
        done.extend(self.done.drain(..));
        n
    }

    fn in_flight(&self) -> usize {
        self.in_flight + self.done.len()
    }

    fn waits_on_kernel(&self) -> bool {
        self.worker_ops > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::AlignedBuf;
    use crate::uring::split;

    fn run(ch: &mut dyn BdevChannel, ring: &mut Ring, io: BdevIo) -> BdevDone {
        ch.submit(io, ring);
        let mut cqes = Vec::new();
        let mut done = Vec::new();
        while ch.poll(&mut done) == 0 {
            cqes.clear();
            ring.submit_and_wait(std::time::Duration::from_secs(5), &mut cqes).unwrap();
            for &(ud, res) in &cqes {
                let (k, _, slot) = split(ud);
                assert_eq!(k, kind::BDEV);
                ch.on_cqe(slot, res, ring);
            }
        }
        done.pop().unwrap()
    }

    #[test]
    fn write_read_zero_through_io_uring_o_direct() {
        let dir = std::env::temp_dir().join(format!("stager-bdev-test-{}", std::process::id()));
        let path = dir.join("dev.img");
        let dev = FileDevice::open(&path, Some(1 << 20), 4096, true).unwrap();
        assert_eq!(dev.info().blocks, 256);
        let mut ring = Ring::new(64).unwrap();
        let mut ch = dev.channel(7).unwrap();
        let mut w = AlignedBuf::new(8192);
        w.iter_mut().enumerate().for_each(|(i, b)| *b = (i % 251) as u8);
        let io = BdevIo::new(BdevOp::Write { fua: true }, 4096, 8192, Some(w), 1);
        let d = run(ch.as_mut(), &mut ring, io);
        assert_eq!((d.token, d.result.clone()), (1, Ok(())));
        let expect = d.buf.unwrap();
        let io = BdevIo::new(BdevOp::Read, 4096, 8192, Some(AlignedBuf::new(8192)), 2);
        let d = run(ch.as_mut(), &mut ring, io);
        assert_eq!(&d.buf.unwrap()[..], &expect[..]);
        let io = BdevIo::new(BdevOp::WriteZeroes, 4096, 4096, None, 3);
        assert_eq!(run(ch.as_mut(), &mut ring, io).result, Ok(()));
        let io = BdevIo::new(BdevOp::Read, 4096, 8192, Some(AlignedBuf::new(8192)), 4);
        let r = run(ch.as_mut(), &mut ring, io).buf.unwrap();
        assert!(r[..4096].iter().all(|&b| b == 0));
        assert_eq!(&r[4096..], &expect[4096..]);
        let io = BdevIo::new(BdevOp::Read, 1 << 20, 4096, Some(AlignedBuf::new(4096)), 5);
        assert!(matches!(run(ch.as_mut(), &mut ring, io).result, Err(BdevError::OutOfRange { .. })));
        // A gathered FUA write (a log frame's shape: one header block, then two data buffers)
        // lands contiguously and hands every buffer back.
        let mut parts: Vec<AlignedBuf> = (0..3u8)
            .map(|i| {
                let mut b = AlignedBuf::new(4096 * (i as usize + 1));
                b.fill(0x10 + i);
                b
            })
            .collect();
        let first = parts.remove(0);
        let mut io = BdevIo::new(BdevOp::Write { fua: true }, 8192, 6 * 4096, Some(first), 6);
        io.gather = parts;
        let d = run(ch.as_mut(), &mut ring, io);
        assert_eq!((d.result, d.gather.len()), (Ok(()), 2));
        let io = BdevIo::new(BdevOp::Read, 8192, 6 * 4096, Some(AlignedBuf::new(6 * 4096)), 7);
        let r = run(ch.as_mut(), &mut ring, io).buf.unwrap();
        assert!(r[..4096].iter().all(|&b| b == 0x10));
        assert!(r[4096..3 * 4096].iter().all(|&b| b == 0x11));
        assert!(r[3 * 4096..].iter().all(|&b| b == 0x12));
        // Buffers that do not add up to the length are refused, not half-written.
        let mut io = BdevIo::new(BdevOp::Write { fua: false }, 0, 3 * 4096, Some(AlignedBuf::new(4096)), 8);
        io.gather.push(AlignedBuf::new(4096));
        assert_eq!(run(ch.as_mut(), &mut ring, io).result, Err(BdevError::Os(libc::EINVAL)));
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Issue 8: on a regular file a FUA write is the write, then an `fdatasync` of its range
    /// (an `RWF_DSYNC` write completed in a kworker a busy-polling host held off for ~1 ms);
    /// only the `fdatasync` half waits on a kernel worker.
    #[test]
    fn fua_write_on_a_regular_file_is_a_write_then_an_fdatasync() {
        let dir = std::env::temp_dir().join(format!("stager-bdev-fua-{}", std::process::id()));
        let dev = FileDevice::open(&dir.join("dev.img"), Some(1 << 20), 4096, true).unwrap();
        let mut ring = Ring::new(64).unwrap();
        let mut ch = dev.channel(3).unwrap();
        let mut cqes = Vec::new();
        let mut done = Vec::new();
        let mut step = |ch: &mut Box<dyn BdevChannel>, ring: &mut Ring| {
            cqes.clear();
            ring.submit_and_wait(std::time::Duration::from_secs(5), &mut cqes).unwrap();
            assert_eq!(cqes.len(), 1, "one operation at a time");
            let (_, _, slot) = split(cqes[0].0);
            ch.on_cqe(slot, cqes[0].1, ring);
        };
        ch.submit(BdevIo::new(BdevOp::Write { fua: true }, 8192, 4096, Some(AlignedBuf::new(4096)), 1), &mut ring);
        assert!(!ch.waits_on_kernel(), "the write itself is issued inline");
        step(&mut ch, &mut ring);
        assert_eq!(ch.poll(&mut done), 0, "not durable before the fdatasync");
        assert!(ch.waits_on_kernel());
        step(&mut ch, &mut ring);
        assert_eq!(ch.poll(&mut done), 1);
        assert_eq!((done[0].token, done[0].result.clone()), (1, Ok(())));
        assert!(!ch.waits_on_kernel());
        // A write without FUA is one operation; a flush waits on a worker from the start.
        ch.submit(BdevIo::new(BdevOp::Write { fua: false }, 0, 4096, Some(AlignedBuf::new(4096)), 2), &mut ring);
        step(&mut ch, &mut ring);
        assert_eq!(ch.poll(&mut done), 1);
        ch.submit(BdevIo::new(BdevOp::Flush, 0, 0, None, 3), &mut ring);
        assert!(ch.waits_on_kernel());
        step(&mut ch, &mut ring);
        assert_eq!(ch.poll(&mut done), 1);
        assert!(!ch.waits_on_kernel() && ch.in_flight() == 0);
        let _ = std::fs::remove_dir_all(dir);
    }
}
