//! The local flash device that holds the superblock, the log and the clean read cache.

use super::{AlignedBuf, IoDone};
use crate::types::IoToken;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlashInfo {
    pub size_bytes: u64,
    /// Writes may sit in a volatile cache until a flush; the engine then writes its log with
    /// FUA (invariant 6) so an entry counts as complete only once it is on media.
    pub volatile_cache: bool,
}

/// A block device, byte-addressed with 4 KiB aligned offsets and lengths. Completions may come
/// back in any order; each carries the token given at submission and the buffers.
pub trait Flash {
    fn info(&self) -> FlashInfo;
    /// Reads `buf.len()` bytes at `offset` into `buf`.
    fn submit_read(&mut self, token: IoToken, offset: u64, buf: AlignedBuf);
    /// Writes `first` and then every buffer of `gather`, back to back from `offset`, as one
    /// operation (a log frame: its header block, then each entry's data). `fua`: the data is
    /// on stable media when it completes, even with a volatile cache.
    fn submit_write(&mut self, token: IoToken, offset: u64, first: AlignedBuf, gather: Vec<AlignedBuf>, fua: bool);
    fn submit_flush(&mut self, token: IoToken);
    /// Moves finished operations to `out`; returns how many.
    fn poll_completions(&mut self, out: &mut Vec<IoDone>) -> usize;
}
