//! NVMe definitions shared by every part of Stager: the spec's commands, completions and
//! status codes, the identify and log-page structures, the NVMe/TCP PDU codec, the host-side
//! NVMe/TCP initiator, and the local block devices a namespace can sit on.
//!
//! The target (`stager-target`) and the host (`host`, used by `stager-perf` and every
//! integration test) encode and decode the wire formats with the same code, so a bug in the
//! codec shows up as a failed round trip rather than two implementations agreeing by accident.

pub mod bdev;
pub mod command;
pub mod completion;
pub mod constants;
pub mod fabrics;
pub mod host;
pub mod identify;
pub mod log_page;
pub mod status;
pub mod tcp;
pub mod uring;

pub use command::Command;
pub use completion::Completion;
pub use status::Status;

/// The NQN every discovery subsystem answers to.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";

/// A namespace identifier. 0 is invalid; 0xFFFF_FFFF means "all namespaces".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Nsid(pub u32);

impl Nsid {
    pub const BROADCAST: Nsid = Nsid(0xFFFF_FFFF);
}

/// A command identifier, chosen by the host, unique among the commands outstanding on one queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cid(pub u16);

/// Little-endian field helpers for fixed-layout structures. Callers pass offsets that are
/// compile-time constants inside buffers of known size, so an out-of-range offset is our bug.
pub(crate) mod le {
    pub fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes([b[off], b[off + 1]])
    }
    pub fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
    }
    pub fn u64_at(b: &[u8], off: usize) -> u64 {
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[off..off + 8]);
        u64::from_le_bytes(x)
    }
    pub fn put_u16(b: &mut [u8], off: usize, v: u16) {
        b[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }
    pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
        b[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
        b[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }
    /// Writes `s` as a fixed-width ASCII field padded with spaces (identify strings).
    pub fn put_str_padded(b: &mut [u8], off: usize, len: usize, s: &str) {
        let dst = &mut b[off..off + len];
        dst.fill(b' ');
        let n = s.len().min(len);
        dst[..n].copy_from_slice(&s.as_bytes()[..n]);
    }
    /// Writes `s` NUL-padded (NQN fields).
    pub fn put_str_nul(b: &mut [u8], off: usize, len: usize, s: &str) {
        let dst = &mut b[off..off + len];
        dst.fill(0);
        let n = s.len().min(len);
        dst[..n].copy_from_slice(&s.as_bytes()[..n]);
    }
    /// Reads a NUL- or space-padded string field, lossily.
    pub fn str_at(b: &[u8], off: usize, len: usize) -> String {
        let f = &b[off..off + len];
        let end = f.iter().position(|&c| c == 0).unwrap_or(len);
        String::from_utf8_lossy(&f[..end]).trim_end().to_string()
    }
}
