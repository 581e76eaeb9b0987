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
            slots: Vec::new(),
            free: Vec::new(),
            done: VecDeque::new(),
            in_flight: 0,
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
    /// A FUA write issues a data sync after its write completes.
    syncing: bool,
}

struct FileChannel {
    id: u32,
    info: BdevInfo,
    file: Arc<File>,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    done: VecDeque<BdevDone>,
    in_flight: usize,
}

impl FileChannel {
    fn issue(&mut self, slot: u32, ring: &mut Ring) {
        let fd = types::Fd(self.file.as_raw_fd());
        let ud = user_data(kind::BDEV, self.id, slot);
        let Some(Some(s)) = self.slots.get_mut(slot as usize) else { return };
        let off = s.io.offset + s.done;
        let rest = (s.io.len - s.done) as u32;
        let entry = if s.syncing {
            opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build()
        } else {
            match (s.io.op, s.io.buf.as_mut()) {
                (BdevOp::Read, Some(b)) => {
                    opcode::Read::new(fd, b[s.done as usize..].as_mut_ptr(), rest).offset(off).build()
                }
                (BdevOp::Write { .. }, Some(b)) => {
                    opcode::Write::new(fd, b[s.done as usize..].as_ptr(), rest).offset(off).build()
                }
                (BdevOp::Flush, _) => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
                (BdevOp::WriteZeroes, _) => {
                    opcode::Fallocate::new(fd, s.io.len).offset(s.io.offset).mode(libc::FALLOC_FL_ZERO_RANGE).build()
                }
                (BdevOp::Deallocate, _) => opcode::Fallocate::new(fd, s.io.len)
                    .offset(s.io.offset)
                    .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                    .build(),
                // Read/write without a buffer is the caller's bug; fail it rather than crash.
                _ => opcode::Nop::new().build(),
            }
        };
        ring.push(entry.user_data(ud));
    }

    fn finish(&mut self, slot: u32, result: Result<(), BdevError>) {
        if let Some(s) = self.slots.get_mut(slot as usize).and_then(|s| s.take()) {
            self.free.push(slot);
            self.in_flight -= 1;
            self.done.push_back(BdevDone { token: s.io.token, result, buf: s.io.buf });
        }
    }
}

impl BdevChannel for FileChannel {
    fn submit(&mut self, io: BdevIo, ring: &mut Ring) {
        if let Err(e) = check_range(&self.info, &io) {
            self.done.push_back(BdevDone { token: io.token, result: Err(e), buf: io.buf });
            return;
        }
        if matches!(io.op, BdevOp::Read | BdevOp::Write { .. })
            && io.buf.as_ref().is_none_or(|b| b.len() as u64 != io.len)
        {
            self.done.push_back(BdevDone { token: io.token, result: Err(BdevError::Os(libc::EINVAL)), buf: io.buf });
            return;
        }
        let slot = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            (self.slots.len() - 1) as u32
        });
        self.slots[slot as usize] = Some(Slot { io, done: 0, syncing: false });
        self.in_flight += 1;
        self.issue(slot, ring);
    }

    fn on_cqe(&mut self, slot: u32, res: i32, ring: &mut Ring) {
        let Some(Some(s)) = self.slots.get_mut(slot as usize) else { return };
        if res < 0 {
            self.finish(slot, Err(BdevError::Os(-res)));
            return;
        }
        if s.syncing {
            self.finish(slot, Ok(()));
            return;
        }
        match s.io.op {
            BdevOp::Read | BdevOp::Write { .. } => {
                if res == 0 {
                    self.finish(slot, Err(BdevError::Os(libc::EIO)));
                    return;
                }
                s.done += res as u64;
                if s.done < s.io.len {
                    self.issue(slot, ring);
                } else if matches!(s.io.op, BdevOp::Write { fua: true }) {
                    s.syncing = true;
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
        let io = BdevIo { op: BdevOp::Write { fua: true }, offset: 4096, len: 8192, buf: Some(w), token: 1 };
        let d = run(ch.as_mut(), &mut ring, io);
        assert_eq!((d.token, d.result.clone()), (1, Ok(())));
        let expect = d.buf.unwrap();
        let io = BdevIo { op: BdevOp::Read, offset: 4096, len: 8192, buf: Some(AlignedBuf::new(8192)), token: 2 };
        let d = run(ch.as_mut(), &mut ring, io);
        assert_eq!(&d.buf.unwrap()[..], &expect[..]);
        let io = BdevIo { op: BdevOp::WriteZeroes, offset: 4096, len: 4096, buf: None, token: 3 };
        assert_eq!(run(ch.as_mut(), &mut ring, io).result, Ok(()));
        let io = BdevIo { op: BdevOp::Read, offset: 4096, len: 8192, buf: Some(AlignedBuf::new(8192)), token: 4 };
        let r = run(ch.as_mut(), &mut ring, io).buf.unwrap();
        assert!(r[..4096].iter().all(|&b| b == 0));
        assert_eq!(&r[4096..], &expect[4096..]);
        let io = BdevIo { op: BdevOp::Read, offset: 1 << 20, len: 4096, buf: Some(AlignedBuf::new(4096)), token: 5 };
        assert!(matches!(run(ch.as_mut(), &mut ring, io).result, Err(BdevError::OutOfRange { .. })));
        let _ = std::fs::remove_dir_all(dir);
    }
}
