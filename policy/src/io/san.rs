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
