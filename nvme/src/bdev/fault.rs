//! A deliberately broken device, for proving that tests catch data loss. It stores data in
//! memory like `MemoryDevice` but, once a fault is armed for an LBA, misbehaves there while
//! still reporting success:
//! - `DropWrites`: writes covering the LBA are acknowledged and discarded;
//! - `Stale`: the first write covering the LBA after arming is applied, and that version is
//!   what reads of the LBA return from then on, whatever is written later;
//! - `TearWrites`: multi-block writes covering the LBA store only their first half.
//!
//! Test-only by intent: nothing in a configuration can select it; tests hand it to
//! `Target::start_with_devices`. A mutex guards the data because correctness, not speed,
//! is the point here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{check_range, BdevChannel, BdevError, BdevInfo, BdevIo, BdevOp, BlockDevice, SyncChannel, SyncIo};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    DropWrites,
    Stale,
    TearWrites,
}

#[derive(Default)]
struct State {
    data: Vec<u8>,
    faults: HashMap<u64, Fault>,
    /// Stale fault: the version of the block reads keep returning, once captured.
    frozen: HashMap<u64, Vec<u8>>,
}

pub struct FaultyDevice {
    info: BdevInfo,
    state: Arc<Mutex<State>>,
}

impl FaultyDevice {
    pub fn new(size_bytes: u64, block_size: u32) -> FaultyDevice {
        FaultyDevice {
            info: BdevInfo {
                name: "faulty".into(),
                block_size,
                blocks: size_bytes / block_size as u64,
                volatile_cache: false,
            },
            state: Arc::new(Mutex::new(State { data: vec![0; size_bytes as usize], ..State::default() })),
        }
    }

    pub fn arm(&self, lba: u64, fault: Fault) {
        if let Ok(mut s) = self.state.lock() {
            s.faults.insert(lba, fault);
        }
    }
}

impl BlockDevice for FaultyDevice {
    fn info(&self) -> &BdevInfo {
        &self.info
    }
    fn channel(&self, _id: u32) -> std::io::Result<Box<dyn BdevChannel>> {
        Ok(SyncChannel::boxed(FaultyChannel { info: self.info.clone(), state: self.state.clone() }))
    }
}

struct FaultyChannel {
    info: BdevInfo,
    state: Arc<Mutex<State>>,
}

impl SyncIo for FaultyChannel {
    fn run(&self, io: &mut BdevIo) -> Result<(), BdevError> {
        check_range(&self.info, io)?;
        let mut s = self.state.lock().map_err(|_| BdevError::Os(libc::EIO))?;
        let bs = self.info.block_size as u64;
        let (first, n) = (io.offset / bs, io.len / bs);
        let (off, len) = (io.offset as usize, io.len as usize);
        let covered: Vec<(u64, Fault)> =
            (first..first + n).filter_map(|lba| s.faults.get(&lba).map(|f| (lba, *f))).collect();
        match io.op {
            BdevOp::Read => {
                let buf = io.buf.as_mut().ok_or(BdevError::Os(libc::EINVAL))?;
                buf[..len].copy_from_slice(&s.data[off..off + len]);
                for (lba, fault) in covered {
                    if let (Fault::Stale, Some(old)) = (fault, s.frozen.get(&lba)) {
                        let at = ((lba - first) * bs) as usize;
                        buf[at..at + bs as usize].copy_from_slice(old);
                    }
                }
            }
            BdevOp::Write { .. } => {
                // A test device under a namespace: hosts never send gathered writes.
                if !io.gather.is_empty() {
                    return Err(BdevError::Os(libc::EINVAL));
                }
                let buf = io.buf.as_ref().ok_or(BdevError::Os(libc::EINVAL))?;
                if covered.iter().any(|(_, f)| *f == Fault::DropWrites) {
                    return Ok(());
                }
                let keep = if n > 1 && covered.iter().any(|(_, f)| *f == Fault::TearWrites) { len / 2 } else { len };
                let keep = keep - keep % bs as usize;
                s.data[off..off + keep].copy_from_slice(&buf[..keep]);
                for (lba, fault) in covered {
                    if fault == Fault::Stale && !s.frozen.contains_key(&lba) {
                        let at = (lba * bs) as usize;
                        let block = s.data[at..at + bs as usize].to_vec();
                        s.frozen.insert(lba, block);
                    }
                }
            }
            BdevOp::WriteZeroes | BdevOp::Deallocate => s.data[off..off + len].fill(0),
            BdevOp::Flush => {}
        }
        Ok(())
    }
}
