//! A volume's SAN LUN (its datastore): an iSCSI LUN through libiscsi, a block device or a file.
//! Same asynchronous shape as [`super::Flash`]; it can fail or be unreachable for a while.

use super::IoDone;

pub trait San {
    /// Size of the LUN in bytes.
    fn size_bytes(&self) -> u64;
    fn submit_read(&mut self, token: u64, offset: u64, len: u64);
    /// `fua`: force unit access (the write is in the SAN's stable storage when it completes).
    fn submit_write(&mut self, token: u64, offset: u64, data: Vec<u8>, fua: bool);
    /// SYNCHRONIZE CACHE: every write completed before this was submitted is stable when it
    /// completes.
    fn submit_flush(&mut self, token: u64);
    fn poll_completions(&mut self, out: &mut Vec<IoDone>) -> usize;
}

/// A SAN that accepts nothing and never completes: for reading a device's log without touching
/// any volume's datastore (`Engine::open_for_inspection`).
pub struct DetachedSan {
    pub size_bytes: u64,
}

impl San for DetachedSan {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }
    fn submit_read(&mut self, _token: u64, _offset: u64, _len: u64) {}
    fn submit_write(&mut self, _token: u64, _offset: u64, _data: Vec<u8>, _fua: bool) {}
    fn submit_flush(&mut self, _token: u64) {}
    fn poll_completions(&mut self, _out: &mut Vec<IoDone>) -> usize {
        0
    }
}
