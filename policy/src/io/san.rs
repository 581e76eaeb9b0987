//! A volume's SAN LUN (its datastore): an iSCSI LUN through libiscsi, a block device or a file.
//! Same asynchronous shape as [`super::Flash`]; it can fail or be unreachable for a while.

use super::{AlignedBuf, IoDone};
use crate::types::IoToken;

pub trait San {
    /// Size of the LUN in bytes.
    fn size_bytes(&self) -> u64;
    /// Whether the LUN can unmap ranges and reads zeroes from them afterwards (thin
    /// provisioning with LBPRZ, a file's punched holes). Host Deallocate is then logged and
    /// destaged as an unmap; without it, Deallocate stays advisory.
    fn unmap_reads_zeroes(&self) -> bool {
        false
    }
    /// Why the SAN is unreachable, while its client knows it is (a session that missed a
    /// deadline, lost its connection or cannot log in): the destager marks the SAN unreachable
    /// on it without waiting for a command of its own to fail, and status shows the reason.
    fn outage(&self) -> Option<String> {
        None
    }
    fn submit_read(&mut self, token: IoToken, offset: u64, buf: AlignedBuf);
    /// `fua`: force unit access (the write is in the SAN's stable storage when it completes).
    fn submit_write(&mut self, token: IoToken, offset: u64, buf: AlignedBuf, fua: bool);
    /// Zeroes `len` bytes from `offset` without sending them.
    fn submit_write_zeroes(&mut self, token: IoToken, offset: u64, len: u64);
    /// Unmaps `len` bytes (only called when [`San::unmap_reads_zeroes`] says so).
    fn submit_unmap(&mut self, token: IoToken, offset: u64, len: u64);
    /// SYNCHRONIZE CACHE: every write completed before this was submitted is stable when it
    /// completes.
    fn submit_flush(&mut self, token: IoToken);
    fn poll_completions(&mut self, out: &mut Vec<IoDone>) -> usize;
    /// Fails every command this SAN holds back and has not sent (a fenced SAN, see the
    /// target's `san_gate`): they complete as unreachable and never reach the LUN. A SAN that
    /// holds nothing back does nothing.
    fn fail_held(&mut self) {}
}

/// A SAN that accepts nothing and never completes: for reading a device's log without touching
/// any volume's datastore (`stagerctl flash inspect`).
pub struct DetachedSan {
    pub size_bytes: u64,
}

impl San for DetachedSan {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }
    fn submit_read(&mut self, _token: IoToken, _offset: u64, _buf: AlignedBuf) {}
    fn submit_write(&mut self, _token: IoToken, _offset: u64, _buf: AlignedBuf, _fua: bool) {}
    fn submit_write_zeroes(&mut self, _token: IoToken, _offset: u64, _len: u64) {}
    fn submit_unmap(&mut self, _token: IoToken, _offset: u64, _len: u64) {}
    fn submit_flush(&mut self, _token: IoToken) {}
    fn poll_completions(&mut self, _out: &mut Vec<IoDone>) -> usize {
        0
    }
}
