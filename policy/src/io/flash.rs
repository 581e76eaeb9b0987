//! The local flash device that holds the superblock, the log and the clean read cache.

use super::IoDone;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlashInfo {
    pub size_bytes: u64,
    /// Writes may sit in a volatile cache until a flush; the engine then writes its log with
    /// FUA (invariant 6) so an entry counts as complete only once it is on media.
    pub volatile_cache: bool,
}

/// A block device, byte-addressed with 4 KiB aligned offsets and lengths. Completions may come
/// back in any order; each carries the token given at submission.
pub trait Flash {
    fn info(&self) -> FlashInfo;
    fn submit_read(&mut self, token: u64, offset: u64, len: u64);
    /// `fua`: the write is on stable media when it completes, even with a volatile cache.
    fn submit_write(&mut self, token: u64, offset: u64, data: Vec<u8>, fua: bool);
    fn submit_flush(&mut self, token: u64);
    /// Moves finished operations to `out`; returns how many.
    fn poll_completions(&mut self, out: &mut Vec<IoDone>) -> usize;
}
