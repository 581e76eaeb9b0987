//! Registered memory: a [`Region`] is what a peer writes into, a [`RemoteKey`] is how the
//! writer names it.
//!
//! A region is memory that something other than the owning thread writes: the NIC (verbs), or the
//! endpoint's `poll()` placing tcp frames, possibly on another reactor than the one reading it. So
//! Rust code never holds a `&[u8]` into it: every access goes through `AtomicU64` words (relaxed;
//! plain moves on x86), partial words by compare-and-swap. That makes concurrent reads and writes
//! defined behaviour — a reader may see a torn mix of old and new bytes, never undefined
//! behaviour — and the reader validates what it copied (the replica protocol's CRCs). Who may see
//! what when is the fabric's job: an `Imm` event (and a `WriteDone` on the writer's side) orders
//! the bytes of every earlier write before it.
//!
//! The memory is an anonymous mapping: page aligned (RDMA registration pins whole pages, and
//! word access needs 8-byte alignment), zeroed by the kernel, and a whole number of pages, so the
//! word loops never step outside it.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::FabricError;

/// Memory a peer may write into once exposed on its endpoint. Owns its mapping; `Send + Sync`
/// (all access is atomic). Exposed regions are held by `Arc`, so the memory outlives every
/// exposure and stays readable after the endpoint is gone (a replica still has its log ring).
pub struct Region {
    ptr: NonNull<u8>,
    /// Bytes the caller asked for: the bound every access is checked against.
    len: usize,
    /// Bytes mapped: `len` rounded up to whole pages.
    map_len: usize,
}

// SAFETY: the region owns its mapping exclusively (no other Rust value points into it) and every
// access from Rust is an atomic operation on an aligned `AtomicU64`, so sharing it between threads
// cannot create a data race in the Rust memory model.
unsafe impl Send for Region {}
// SAFETY: as above: `&Region` only allows atomic accesses.
unsafe impl Sync for Region {}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region").field("addr", &self.ptr).field("len", &self.len).finish()
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

impl Region {
    /// `len` zeroed bytes, page aligned.
    pub(crate) fn alloc(len: usize) -> Result<Region, FabricError> {
        if len == 0 {
            return Err(FabricError::Config("a region needs at least one byte".into()));
        }
        let page = page_size();
        let map_len = len
            .checked_add(page - 1)
            .map(|l| l / page * page)
            .ok_or_else(|| FabricError::Config(format!("region of {len} bytes is too large")))?;
        // SAFETY: an anonymous private mapping at an address of the kernel's choice touches no
        // existing memory; the result is checked against MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(FabricError::io(format!("mapping a region of {len} bytes"), std::io::Error::last_os_error()));
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| FabricError::Io("mmap returned null".into()))?;
        Ok(Region { ptr, len, map_len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `out.len()` bytes at `offset` out of the region. Bounds-checked. Safe while a
    /// remote writes the same bytes: the copy may then mix old and new bytes (validate it).
    pub fn copy_out(&self, offset: u64, out: &mut [u8]) -> Result<(), FabricError> {
        let start = self.check(offset, out.len())?;
        self.load(start, out);
        Ok(())
    }

    /// Writes `data` at `offset` from this side (initialising a ring, say).
    pub fn write_local(&mut self, offset: u64, data: &[u8]) -> Result<(), FabricError> {
        let start = self.check(offset, data.len())?;
        self.store(start, data);
        Ok(())
    }

    /// The start of `len` bytes at `offset` if they lie inside the region.
    pub(crate) fn check(&self, offset: u64, len: usize) -> Result<usize, FabricError> {
        check_bounds(offset, len as u64, self.len as u64)?;
        Ok(offset as usize)
    }

    /// Base address, for RDMA registration.
    #[cfg_attr(not(feature = "verbs"), allow(dead_code))]
    pub(crate) fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn words(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is page aligned (so 8-byte aligned), `map_len` bytes long (a
        // multiple of 8), lives as long as `self`, and is only ever accessed atomically from Rust.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<AtomicU64>(), self.map_len / 8) }
    }

    /// Loads `out.len()` bytes at `start` (already bounds-checked) word by word.
    pub(crate) fn load(&self, start: usize, out: &mut [u8]) {
        assert!(start + out.len() <= self.len, "region load out of bounds: caller must check");
        let words = self.words();
        let mut pos = start;
        let mut done = 0;
        while done < out.len() {
            let in_word = pos % 8;
            let n = (8 - in_word).min(out.len() - done);
            let bytes = words[pos / 8].load(Ordering::Relaxed).to_ne_bytes();
            out[done..done + n].copy_from_slice(&bytes[in_word..in_word + n]);
            pos += n;
            done += n;
        }
    }

    /// Stores `data` at `start` (already bounds-checked): whole words by plain atomic stores, the
    /// partial words at either end by compare-and-swap, so bytes next to the range that another
    /// writer is storing at the same time are never lost.
    pub(crate) fn store(&self, start: usize, data: &[u8]) {
        assert!(start + data.len() <= self.len, "region store out of bounds: caller must check");
        let words = self.words();
        let mut pos = start;
        let mut done = 0;
        while done < data.len() {
            let in_word = pos % 8;
            let n = (8 - in_word).min(data.len() - done);
            let word = &words[pos / 8];
            if n == 8 {
                let mut b = [0u8; 8];
                b.copy_from_slice(&data[done..done + 8]);
                word.store(u64::from_ne_bytes(b), Ordering::Relaxed);
            } else {
                let part = &data[done..done + n];
                let _ = word.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                    let mut b = old.to_ne_bytes();
                    b[in_word..in_word + n].copy_from_slice(part);
                    Some(u64::from_ne_bytes(b))
                });
            }
            pos += n;
            done += n;
        }
    }

    /// Reads from `fd` straight into `len` bytes at `start` (already bounds-checked): the tcp
    /// backend places a large write's data without a bounce through its receive buffer. Returns
    /// what `read(2)` returned.
    pub(crate) fn read_from(&self, fd: std::os::fd::RawFd, start: usize, len: usize) -> std::io::Result<usize> {
        assert!(start + len <= self.len, "region read_from out of bounds: caller must check");
        // SAFETY: [start, start+len) lies inside the mapping (asserted); the kernel writes it like
        // a device would, outside the Rust memory model, and no Rust reference covers those bytes
        // (all Rust access is atomic through `words`).
        let n = unsafe { libc::read(fd, self.ptr.as_ptr().add(start).cast(), len) };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: the mapping was made in `alloc` with this length and is unmapped only here;
        // exposures hold the region by `Arc`, so nothing registered still points into it.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.map_len) };
    }
}

/// `offset + len <= region_len`, without overflow.
pub(crate) fn check_bounds(offset: u64, len: u64, region_len: u64) -> Result<(), FabricError> {
    match offset.checked_add(len) {
        Some(end) if end <= region_len => Ok(()),
        _ => Err(FabricError::OutOfBounds { offset, len, region_len }),
    }
}

/// What a writer needs to name an exposed region: the key (verbs: the rkey of the region's
/// registration in the endpoint's protection domain; tcp: the exposure's id, unique in its
/// fabric), the remote address (verbs: the region's virtual address; tcp: 0) and the length. It
/// is only valid on the endpoint it was exposed on; the writer sends it to itself through the
/// peer's control message (`RemoteKey::encode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RemoteKey {
    pub(crate) key: u32,
    pub(crate) addr: u64,
    pub(crate) len: u64,
}

impl RemoteKey {
    /// `key` u32, `addr` u64, `len` u64, little endian.
    pub const ENCODED_LEN: usize = 20;

    pub fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut b = [0u8; Self::ENCODED_LEN];
        b[0..4].copy_from_slice(&self.key.to_le_bytes());
        b[4..12].copy_from_slice(&self.addr.to_le_bytes());
        b[12..20].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Decodes the first `ENCODED_LEN` bytes of `b` (trailing bytes are the caller's).
    pub fn decode(b: &[u8]) -> Result<RemoteKey, FabricError> {
        let b: &[u8; Self::ENCODED_LEN] =
            b.get(..Self::ENCODED_LEN).and_then(|s| s.try_into().ok()).ok_or_else(|| {
                FabricError::Decode(format!("remote key needs {} bytes, got {}", Self::ENCODED_LEN, b.len()))
            })?;
        let key = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[4..12]);
        let addr = u64::from_le_bytes(a);
        a.copy_from_slice(&b[12..20]);
        let len = u64::from_le_bytes(a);
        if addr.checked_add(len).is_none() {
            return Err(FabricError::Decode(format!("remote key address {addr:#x} + length {len} overflows")));
        }
        Ok(RemoteKey { key, addr, len })
    }

    /// Bytes of the exposed region.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_page_aligned_and_bounds_checked() {
        let mut r = Region::alloc(10_000).unwrap();
        assert_eq!(r.len(), 10_000);
        assert_eq!(r.as_mut_ptr() as usize % page_size(), 0);
        let mut out = vec![1u8; 10_000];
        r.copy_out(0, &mut out).unwrap();
        assert!(out.iter().all(|&b| b == 0));
        assert!(matches!(r.copy_out(9_999, &mut [0u8; 2]), Err(FabricError::OutOfBounds { .. })));
        assert!(matches!(r.write_local(u64::MAX, &[1]), Err(FabricError::OutOfBounds { .. })));
        r.copy_out(10_000, &mut []).unwrap();
        assert!(Region::alloc(0).is_err());
    }

    #[test]
    fn unaligned_stores_and_loads_round_trip_and_keep_neighbours() {
        let mut r = Region::alloc(64).unwrap();
        r.write_local(0, &[0xAA; 64]).unwrap();
        for start in 0..20u64 {
            for len in 0..20usize {
                let data: Vec<u8> = (0..len).map(|i| (start as usize * 31 + i) as u8).collect();
                r.write_local(start, &data).unwrap();
                let mut back = vec![0; len];
                r.copy_out(start, &mut back).unwrap();
                assert_eq!(back, data, "start {start} len {len}");
                if start > 0 {
                    let mut before = [0u8; 1];
                    r.copy_out(start - 1, &mut before).unwrap();
                    assert_ne!(before[0], 0, "byte before was clobbered");
                }
                r.write_local(0, &[0xAA; 64]).unwrap();
            }
        }
    }

    #[test]
    fn remote_key_round_trip_and_truncation() {
        let k = RemoteKey { key: 0xDEAD_BEEF, addr: 0x7f00_0000_1000, len: 1 << 20 };
        let b = k.encode();
        assert_eq!(RemoteKey::decode(&b).unwrap(), k);
        let mut longer = b.to_vec();
        longer.push(9);
        assert_eq!(RemoteKey::decode(&longer).unwrap(), k);
        for n in 0..RemoteKey::ENCODED_LEN {
            assert!(RemoteKey::decode(&b[..n]).is_err());
        }
        let bad = RemoteKey { key: 1, addr: u64::MAX, len: 2 }.encode();
        assert!(RemoteKey::decode(&bad).is_err());
    }
}
