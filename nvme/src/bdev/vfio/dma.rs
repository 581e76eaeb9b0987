//! Memory the controller reads and writes by DMA: regions that a [`DmaMapper`] allocates and
//! maps into the device's I/O address space (the IOMMU, through VFIO; the fake IOMMU of the
//! tests), and a free list of the 4 KiB pages of one region for a queue pair's bounce buffers
//! and PRP lists.
//!
//! A region is released only by dropping it: unmapped from the device first, then freed (see
//! `sys.rs` for why that is safe even against a controller that misbehaves).

use std::ptr::NonNull;

/// Allocates DMA-able memory for one controller.
pub trait DmaMapper: Send + Sync {
    /// `len` bytes (a multiple of 4 KiB) of zeroed memory the device can read and write.
    fn alloc(&self, len: usize) -> std::io::Result<DmaRegion>;
}

/// Zeroed memory at `ptr` that the device sees at `iova`.
pub struct DmaRegion {
    ptr: NonNull<u8>,
    iova: u64,
    len: usize,
    /// Unmaps the region from the device and frees it.
    release: Option<Box<dyn FnOnce() + Send>>,
}

// SAFETY: a region owns its memory exclusively, like a Vec<u8>; its users synchronise their
// own accesses (a queue pair is used by one reactor, the admin queue under a mutex).
unsafe impl Send for DmaRegion {}
// SAFETY: shared references only hand out raw pointers and addresses; see Send.
unsafe impl Sync for DmaRegion {}

impl DmaRegion {
    /// # Safety
    /// `ptr` must be valid for reads and writes of `len` bytes, zeroed, mapped for the device
    /// at `iova`, and stay so until `release` runs (which must undo both).
    pub unsafe fn from_raw(ptr: NonNull<u8>, iova: u64, len: usize, release: Box<dyn FnOnce() + Send>) -> DmaRegion {
        DmaRegion { ptr, iova, len, release: Some(release) }
    }
    /// The device's address of byte `offset`.
    pub fn iova_at(&self, offset: usize) -> u64 {
        assert!(offset < self.len, "DMA offset {offset} beyond a {}-byte region", self.len);
        self.iova + offset as u64
    }
    /// Our address of byte `offset`.
    pub fn ptr_at(&self, offset: usize) -> *mut u8 {
        assert!(offset < self.len, "DMA offset {offset} beyond a {}-byte region", self.len);
        // SAFETY: offset is inside the region (asserted).
        unsafe { self.ptr.as_ptr().add(offset) }
    }
}

impl Drop for DmaRegion {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            release();
        }
    }
}

impl std::fmt::Debug for DmaRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DmaRegion({} bytes at iova {:#x})", self.len, self.iova)
    }
}

/// The free 4 KiB pages of a region's page area, by index.
pub struct PagePool {
    free: Vec<u32>,
    pages: u32,
}

impl PagePool {
    pub fn new(pages: u32) -> PagePool {
        // Reversed so pages are handed out from the first, which keeps tests readable.
        PagePool { free: (0..pages).rev().collect(), pages }
    }
    /// Takes `n` pages into `out`, all or none.
    pub fn take(&mut self, n: usize, out: &mut Vec<u32>) -> bool {
        if self.free.len() < n {
            return false;
        }
        let at = self.free.len() - n;
        out.extend(self.free.drain(at..).rev());
        true
    }
    pub fn give(&mut self, pages: &[u32]) {
        self.free.extend(pages.iter().rev());
        debug_assert!(self.free.len() <= self.pages as usize);
    }
    #[cfg(test)]
    pub fn free(&self) -> usize {
        self.free.len()
    }
    pub fn total(&self) -> usize {
        self.pages as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_all_or_none() {
        let mut p = PagePool::new(4);
        let mut a = Vec::new();
        assert!(p.take(3, &mut a));
        assert_eq!(a, vec![0, 1, 2]);
        let mut b = Vec::new();
        assert!(!p.take(2, &mut b));
        assert!(b.is_empty());
        p.give(&a);
        assert!(p.take(4, &mut b));
        assert_eq!(p.free(), 0);
        p.give(&b);
        assert_eq!(p.free(), p.total());
    }
}
