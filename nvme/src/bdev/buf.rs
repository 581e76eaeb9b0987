//! Page-aligned I/O buffers (O_DIRECT needs them) and a per-reactor pool of them by power-of-two
//! size class, so the I/O path stops allocating once warm.

use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

pub const BUF_ALIGN: usize = 4096;

pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `cap` bytes rounded up to the alignment, with length `cap`.
    pub fn new(cap: usize) -> AlignedBuf {
        let cap = cap.max(1).next_multiple_of(BUF_ALIGN);
        let layout = Layout::from_size_align(cap, BUF_ALIGN).expect("buffer size fits a Layout");
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else { alloc::handle_alloc_error(layout) };
        AlignedBuf { ptr, len: cap, cap }
    }
    pub fn capacity(&self) -> usize {
        self.cap
    }
    /// Sets the visible length (must not exceed capacity: our bug otherwise).
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap, "AlignedBuf::set_len {len} > capacity {}", self.cap);
        self.len = len;
    }
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len initialized (zeroed at allocation) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with exactly this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Layout::from_size_align_unchecked(self.cap, BUF_ALIGN)) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({}/{})", self.len, self.cap)
    }
}

/// Free lists per power-of-two class from 4 KiB up; each list keeps at most `keep` buffers.
pub struct BufPool {
    classes: Vec<Vec<AlignedBuf>>,
    keep: usize,
}

impl BufPool {
    pub fn new(keep: usize) -> BufPool {
        BufPool { classes: (0..16).map(|_| Vec::new()).collect(), keep }
    }
    fn class(len: usize) -> usize {
        len.max(BUF_ALIGN).next_power_of_two().trailing_zeros() as usize - BUF_ALIGN.trailing_zeros() as usize
    }
    /// A buffer of exactly `len` visible bytes (contents unspecified).
    pub fn get(&mut self, len: usize) -> AlignedBuf {
        let c = Self::class(len);
        let mut b = self
            .classes
            .get_mut(c)
            .and_then(|l| l.pop())
            .unwrap_or_else(|| AlignedBuf::new(len.max(BUF_ALIGN).next_power_of_two()));
        b.set_len(len);
        b
    }
    pub fn put(&mut self, buf: AlignedBuf) {
        let c = Self::class(buf.capacity());
        if buf.capacity().is_power_of_two() {
            if let Some(l) = self.classes.get_mut(c) {
                if l.len() < self.keep {
                    l.push(buf);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_pooled() {
        let mut p = BufPool::new(4);
        let b = p.get(5000);
        assert_eq!(b.len(), 5000);
        assert_eq!(b.capacity(), 8192);
        assert_eq!(b.as_ptr() as usize % BUF_ALIGN, 0);
        let addr = b.as_ptr() as usize;
        p.put(b);
        let b2 = p.get(8192);
        assert_eq!(b2.as_ptr() as usize, addr);
    }
}
