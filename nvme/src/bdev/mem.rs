//! A RAM-backed device: the fastest namespace, for benchmarks and tests. Storage is a shared
//! array of atomic words so reactors on several cores can use it without locks or `unsafe`;
//! overlapping concurrent writes may interleave per 8-byte word, as they may on real media.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{check_range, BdevChannel, BdevDone, BdevInfo, BdevIo, BdevOp, BlockDevice};
use crate::uring::Ring;

pub struct MemoryDevice {
    info: BdevInfo,
    words: Arc<[AtomicU64]>,
}

impl MemoryDevice {
    pub fn new(name: &str, size_bytes: u64, block_size: u32) -> MemoryDevice {
        let words = (0..size_bytes / 8).map(|_| AtomicU64::new(0)).collect();
        MemoryDevice {
            info: BdevInfo {
                name: name.into(),
                block_size,
                blocks: size_bytes / block_size as u64,
                volatile_cache: false,
            },
            words,
        }
    }
}

impl BlockDevice for MemoryDevice {
    fn info(&self) -> &BdevInfo {
        &self.info
    }
    fn channel(&self, _id: u32) -> std::io::Result<Box<dyn BdevChannel>> {
        Ok(Box::new(MemoryChannel { info: self.info.clone(), words: self.words.clone(), done: VecDeque::new() }))
    }
}

struct MemoryChannel {
    info: BdevInfo,
    words: Arc<[AtomicU64]>,
    done: VecDeque<BdevDone>,
}

impl BdevChannel for MemoryChannel {
    fn submit(&mut self, mut io: BdevIo, _ring: &mut Ring) {
        let result = check_range(&self.info, &io).map(|()| {
            let first = (io.offset / 8) as usize;
            let n = (io.len / 8) as usize;
            let words = &self.words[first..first + n];
            match io.op {
                BdevOp::Read => {
                    if let Some(buf) = io.buf.as_mut() {
                        for (w, dst) in words.iter().zip(buf.chunks_exact_mut(8)) {
                            dst.copy_from_slice(&w.load(Ordering::Relaxed).to_ne_bytes());
                        }
                    }
                }
                BdevOp::Write { .. } => {
                    if let Some(buf) = io.buf.as_ref() {
                        for (w, src) in words.iter().zip(buf.chunks_exact(8)) {
                            w.store(u64::from_ne_bytes(src.try_into().unwrap_or([0; 8])), Ordering::Relaxed);
                        }
                    }
                }
                BdevOp::WriteZeroes | BdevOp::Deallocate => words.iter().for_each(|w| w.store(0, Ordering::Relaxed)),
                BdevOp::Flush => {}
            }
        });
        self.done.push_back(BdevDone { token: io.token, result, buf: io.buf });
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
