//! Page-aligned I/O buffers (O_DIRECT needs them) and a per-reactor pool of them by power-of-two
//! size class, so the I/O path stops allocating once warm; and `LentBuf`, bytes a device lends
//! to a reader instead of copying them into an I/O buffer (the memory namespace's reads).

use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::Arc;

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

/// Read-only bytes a device lends for as long as this value lives: a read answered without a
/// copy. The owner (`Arc`) keeps them allocated; the lender guarantees they do not change while
/// any `LentBuf` refers to them (the memory device copies a chunk before writing it while it is
/// lent). Dropping it, on any thread, ends the loan.
pub struct LentBuf {
    _owner: Arc<dyn Send + Sync>,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the bytes are immutable while lent (the constructor's contract) and the owner is
// `Send + Sync`, so sharing or moving the view across threads is as safe as an `Arc<[u8]>`.
unsafe impl Send for LentBuf {}
// SAFETY: as above; `LentBuf` only ever hands out shared references.
unsafe impl Sync for LentBuf {}

impl LentBuf {
    /// A view of `len` bytes at `ptr`, kept alive by `owner`.
    ///
    /// # Safety
    /// `ptr..ptr + len` must stay allocated while `owner` lives, and nothing may write to it
    /// while any `LentBuf` made from it lives.
    pub unsafe fn new(owner: Arc<dyn Send + Sync>, ptr: NonNull<u8>, len: usize) -> LentBuf {
        LentBuf { _owner: owner, ptr, len }
    }
}

impl Deref for LentBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: valid and unchanging for our lifetime by the constructor's contract.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for LentBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LentBuf({})", self.len)
    }
}

/// Free lists per power-of-two class from 4 KiB up; each list keeps at most `keep` buffers,
/// and all of them together at most `keep_bytes` (unbounded unless `with_byte_limit`).
pub struct BufPool {
    classes: Vec<Vec<AlignedBuf>>,
    keep: usize,
    keep_bytes: usize,
    held_bytes: usize,
}

impl BufPool {
    pub fn new(keep: usize) -> BufPool {
        BufPool { classes: (0..16).map(|_| Vec::new()).collect(), keep, keep_bytes: usize::MAX, held_bytes: 0 }
    }

    /// Frees returned buffers instead of keeping them once the pool holds `bytes`.
    pub fn with_byte_limit(mut self, bytes: usize) -> BufPool {
        self.keep_bytes = bytes;
        self
    }

    /// Bytes of free buffers the pool holds.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }
    fn class(len: usize) -> usize {
        len.max(BUF_ALIGN).next_power_of_two().trailing_zeros() as usize - BUF_ALIGN.trailing_zeros() as usize
    }
    /// A buffer of exactly `len` visible bytes (contents unspecified).
    pub fn get(&mut self, len: usize) -> AlignedBuf {
        let c = Self::class(len);
        let mut b = match self.classes.get_mut(c).and_then(|l| l.pop()) {
            Some(b) => {
                self.held_bytes -= b.capacity();
                b
            }
            None => AlignedBuf::new(len.max(BUF_ALIGN).next_power_of_two()),
        };
        b.set_len(len);
        b
    }
    pub fn put(&mut self, buf: AlignedBuf) {
        let c = Self::class(buf.capacity());
        if buf.capacity().is_power_of_two() && self.held_bytes + buf.capacity() <= self.keep_bytes {
            if let Some(l) = self.classes.get_mut(c) {
                if l.len() < self.keep {
                    self.held_bytes += buf.capacity();
                    l.push(buf);
                }
            }
        }
    }
    /// `put` for a buffer that may not be there.
    pub fn put_opt(&mut self, buf: Option<AlignedBuf>) {
        if let Some(b) = buf {
            self.put(b);
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
