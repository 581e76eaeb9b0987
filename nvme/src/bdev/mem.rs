//! A RAM-backed device: the fastest namespace, for benchmarks and tests.
//!
//! **Memory.** The whole device is one anonymous mapping, 2 MiB aligned and advised for
//! transparent huge pages, every page touched at start-up (like SPDK's malloc bdev on
//! hugepages). Random 4 KiB reads over a 1 GiB device in 4 KiB pages missed the TLB on nearly
//! every access: a profile of a reactor at QD32 showed 35% of its time in the read's memcpy,
//! mostly page walks.
//!
//! **Locks.** The bytes are split into 64 KiB chunks, each behind its own `RwLock`, shared by
//! every reactor's channel. This is the one lock under an I/O in Stager, and it is deliberate:
//! it guards bytes, not engine state; it is per chunk, so it is uncontended unless two commands
//! touch the same 64 KiB at the same moment (which a host may not rely on anyway: overlapping
//! concurrent writes have no defined order on real media either); and it lets a 4 KiB copy be
//! one `memcpy`. The lock-free alternative, atomic 8-byte words, cost 42% of a reactor's time at
//! QD32 (measured with `perf record`), for no safety gain worth having.
//!
//! **Reads without a copy.** A chunk is an `Arc<Chunk>`. A read that fits in one chunk and whose
//! caller accepts a loan (`BdevIo::lend`, as the NVMe/TCP transport does) is answered with a
//! [`LentBuf`] holding a clone of that `Arc`: the transport sends straight from the device's
//! memory. A write to a chunk that is lent (its `Arc` is shared) first copies the chunk
//! (`Arc::make_mut`, 64 KiB) so the bytes being sent never change under the reader — a read
//! sees the device as it was when it executed, whole blocks, never torn. The copy goes into a
//! spare piece when there is one (the memory of an older version whose last reader let go), so
//! the device's memory stays its size plus the versions still being sent; only when no spare
//! is free does a copy take a new 64 KiB allocation (kept as a spare afterwards).

use std::ptr::NonNull;
use std::sync::{Arc, RwLock};

use super::{
    check_range, AlignedBuf, BdevChannel, BdevError, BdevInfo, BdevIo, BdevOp, BlockDevice, LentBuf, SyncChannel,
    SyncIo,
};

/// Bytes per lock and per copy-on-write unit; a multiple of every block size.
const CHUNK_BYTES: usize = 64 * 1024;
/// Transparent huge page size on x86-64 (and the alignment that lets the kernel use them).
const HUGE_PAGE_BYTES: usize = 2 << 20;

/// The device's one anonymous mapping.
struct Region {
    /// Start of the whole mapping (for munmap) and its length.
    map: NonNull<u8>,
    map_len: usize,
    /// First 2 MiB-aligned byte inside it: where chunk 0 starts.
    base: NonNull<u8>,
}

// SAFETY: the region is plain memory; each chunk's bytes are reached only through the one
// `Chunk` that owns them, which enforces the aliasing rules (see `Chunk`).
unsafe impl Send for Region {}
// SAFETY: as above; `Region` itself exposes no access to the bytes.
unsafe impl Sync for Region {}

impl Region {
    fn new(len: usize) -> std::io::Result<Region> {
        let map_len = len + HUGE_PAGE_BYTES;
        // SAFETY: an anonymous private mapping; no file, no address hint. Checked below.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let Some(map) = NonNull::new(raw as *mut u8) else {
            return Err(std::io::Error::other("mmap returned a null mapping"));
        };
        let skip = (map.as_ptr() as usize).next_multiple_of(HUGE_PAGE_BYTES) - map.as_ptr() as usize;
        // SAFETY: skip < HUGE_PAGE_BYTES, inside the mapping of len + HUGE_PAGE_BYTES bytes.
        let base = unsafe { NonNull::new_unchecked(map.as_ptr().add(skip)) };
        // SAFETY: advising a range inside our own mapping. A kernel without THP refuses it:
        // then the device simply runs on small pages.
        unsafe { libc::madvise(base.as_ptr() as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
        // Touch every page now: lazily mapped zero pages made each first write take a page
        // fault, stalling the reactor (p99 8 ms). The volatile write keeps it from being elided.
        for off in (0..len).step_by(4096) {
            // SAFETY: off < len, inside the mapping; nothing else references the region yet.
            unsafe { std::ptr::write_volatile(base.as_ptr().add(off), 0) };
        }
        Ok(Region { map, map_len, base })
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping `new` made; no chunk refers to it any more (the
        // region lives in the `Store` every chunk holds an `Arc` of).
        unsafe { libc::munmap(self.map.as_ptr() as *mut libc::c_void, self.map_len) };
    }
}

/// The memory of one chunk.
enum Piece {
    /// A piece of the device's region.
    Region(NonNull<u8>),
    /// Its own buffer (made when a copy-on-write found no spare piece).
    Own(AlignedBuf),
}

impl Piece {
    fn ptr(&mut self) -> NonNull<u8> {
        match self {
            Piece::Region(p) => *p,
            Piece::Own(b) => NonNull::new(b.as_mut_ptr()).unwrap_or(NonNull::dangling()),
        }
    }
}

/// The device's memory: the region, and the pieces no chunk uses any more (old versions of
/// copied-on-write chunks, once their last reader let go), which later copies reuse — so
/// copy-on-write never grows the device's memory beyond its size plus the versions still lent.
struct Store {
    /// Kept for its mapping (unmapped when the last chunk is gone).
    _region: Region,
    spares: std::sync::Mutex<Vec<Piece>>,
}

// SAFETY: the spare pieces are unused memory, reached only under the mutex.
unsafe impl Send for Store {}
// SAFETY: as above.
unsafe impl Sync for Store {}

/// `CHUNK_BYTES` bytes owned by exactly one `Chunk`. Shared references (`Arc` clones, lent
/// reads) only read; writing needs `&mut Chunk`, which `Arc::make_mut` gives only to a unique
/// owner — copying the chunk first when it is shared.
struct Chunk {
    ptr: NonNull<u8>,
    /// Always `Some` until dropped (then returned to the store's spares).
    piece: Option<Piece>,
    store: Arc<Store>,
}

// SAFETY: a Chunk owns its bytes exclusively (a disjoint piece of the region, or its own buffer)
// and follows `&`/`&mut` discipline for them, like a `Box<[u8]>`.
unsafe impl Send for Chunk {}
// SAFETY: as above: through `&Chunk` the bytes are only read.
unsafe impl Sync for Chunk {}

impl Chunk {
    fn bytes(&self) -> &[u8] {
        // SAFETY: ptr is valid for CHUNK_BYTES bytes while the piece lives (it lives in self);
        // no `&mut` to them exists while `&self` does.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), CHUNK_BYTES) }
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), CHUNK_BYTES) }
    }
}

impl Clone for Chunk {
    /// A deep copy (copy-on-write of a lent chunk), into a spare piece when there is one.
    fn clone(&self) -> Chunk {
        let spare = self.store.spares.lock().ok().and_then(|mut s| s.pop());
        let mut piece = spare.unwrap_or_else(|| Piece::Own(AlignedBuf::new(CHUNK_BYTES)));
        let ptr = piece.ptr();
        // SAFETY: the piece is CHUNK_BYTES of memory nothing else uses (a spare, or new).
        let dst = unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr(), CHUNK_BYTES) };
        dst.copy_from_slice(self.bytes());
        Chunk { ptr, piece: Some(piece), store: self.store.clone() }
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        if let (Some(p), Ok(mut spares)) = (self.piece.take(), self.store.spares.lock()) {
            spares.push(p);
        }
    }
}

/// One chunk's place in the device: the chunk, and a copy of its data pointer beside the lock
/// word, so a read touches one cache line before the data instead of three (lock, `Arc`,
/// `Chunk`) — at random offsets over a large device each is a miss.
struct Slot {
    ptr: NonNull<u8>,
    chunk: Arc<Chunk>,
}

// SAFETY: `ptr` is `chunk.ptr`, reached under the slot's lock with the same rules as `Chunk`.
unsafe impl Send for Slot {}
// SAFETY: as above.
unsafe impl Sync for Slot {}

impl Slot {
    fn new(chunk: Chunk) -> Slot {
        Slot { ptr: chunk.ptr, chunk: Arc::new(chunk) }
    }
    fn bytes(&self) -> &[u8] {
        // SAFETY: ptr is the chunk's, valid for CHUNK_BYTES while `chunk` lives; `&self` under
        // the read lock means nobody holds `&mut` to it.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), CHUNK_BYTES) }
    }
    /// The chunk's bytes for writing: copied first if a reader holds a loan of them.
    fn bytes_mut(&mut self) -> &mut [u8] {
        let c = Arc::make_mut(&mut self.chunk);
        self.ptr = c.ptr;
        c.bytes_mut()
    }
}

type Chunks = Arc<[RwLock<Slot>]>;

pub struct MemoryDevice {
    info: BdevInfo,
    chunks: Chunks,
}

impl MemoryDevice {
    /// A zeroed device of `size_bytes` (rounded up to whole chunks in memory).
    pub fn new(name: &str, size_bytes: u64, block_size: u32) -> std::io::Result<MemoryDevice> {
        let n = (size_bytes as usize).div_ceil(CHUNK_BYTES);
        let region = Region::new(n * CHUNK_BYTES)?;
        let base = region.base;
        let store = Arc::new(Store { _region: region, spares: std::sync::Mutex::new(Vec::new()) });
        let chunks = (0..n)
            .map(|i| {
                // SAFETY: chunk i lies inside the region's first n * CHUNK_BYTES bytes past base.
                let ptr = unsafe { NonNull::new_unchecked(base.as_ptr().add(i * CHUNK_BYTES)) };
                RwLock::new(Slot::new(Chunk { ptr, piece: Some(Piece::Region(ptr)), store: store.clone() }))
            })
            .collect();
        Ok(MemoryDevice {
            info: BdevInfo {
                name: name.into(),
                block_size,
                blocks: size_bytes / block_size as u64,
                volatile_cache: false,
            },
            chunks,
        })
    }
}

impl BlockDevice for MemoryDevice {
    fn info(&self) -> &BdevInfo {
        &self.info
    }
    fn channel(&self, _id: u32) -> std::io::Result<Box<dyn BdevChannel>> {
        Ok(SyncChannel::boxed(MemoryChannel { info: self.info.clone(), chunks: self.chunks.clone() }))
    }
}

struct MemoryChannel {
    info: BdevInfo,
    chunks: Chunks,
}

impl MemoryChannel {
    /// Calls `f(chunk_index, offset_in_chunk, offset_in_io, len)` for each chunk piece of a range.
    fn pieces(
        offset: u64,
        len: u64,
        mut f: impl FnMut(usize, usize, usize, usize) -> Result<(), BdevError>,
    ) -> Result<(), BdevError> {
        let (mut pos, end) = (offset as usize, (offset + len) as usize);
        while pos < end {
            let (ci, co) = (pos / CHUNK_BYTES, pos % CHUNK_BYTES);
            let n = (CHUNK_BYTES - co).min(end - pos);
            f(ci, co, pos - offset as usize, n)?;
            pos += n;
        }
        Ok(())
    }
}

/// How much of a lent read [`prefetch`] asks for, and how far apart: a few lines at the start of
/// the block start the hardware's own stream prefetchers on the rest; asking for every line
/// stalls the reactor on the core's few outstanding-miss buffers instead (measured).
const PREFETCH_BYTES: usize = 1024;
const PREFETCH_STRIDE: usize = 128;

/// Starts loading a lent read's bytes into the caches. A random 4 KiB block of a large device
/// is in no cache, and the kernel's copy into the socket, later in the turn, fetched its lines
/// and its page walk one after another: in a profile of a reactor at 4 KiB QD32 randread, 35%
/// of its time was that copy. Asked for as each read of a batch is lent, the blocks load side
/// by side while the reactor does the rest of the batch.
fn prefetch(ptr: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    for off in (0..len.min(PREFETCH_BYTES)).step_by(PREFETCH_STRIDE) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        // SAFETY: a prefetch is only a hint: it never faults and changes no memory, whatever
        // the address (and off < len keeps it inside the lent range anyway).
        unsafe { _mm_prefetch::<_MM_HINT_T1>(ptr.wrapping_add(off) as *const i8) };
    }
}

/// Copies a write's data into the device's memory. Whole cache lines go with non-temporal
/// stores: a random block of a large device is in no cache, and an ordinary copy first reads
/// every line it overwrites from memory (a read for ownership), then the unlock after it waits
/// for all 64 of them — in a profile of a reactor at 4 KiB QD32 randwrite, 38% of its time.
/// Streaming stores write whole lines without reading them. The price: the block is not left in
/// the caches, so a read of it right after the write misses (as it did before the write anyway).
fn copy_to_device(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len());
    #[cfg(target_arch = "x86_64")]
    if (dst.as_ptr() as usize).is_multiple_of(64)
        && (src.as_ptr() as usize).is_multiple_of(16)
        && dst.len().is_multiple_of(64)
    {
        use std::arch::x86_64::{__m128i, _mm_load_si128, _mm_sfence, _mm_stream_si128};
        let d = dst.as_mut_ptr() as *mut __m128i;
        let s = src.as_ptr() as *const __m128i;
        for i in 0..dst.len() / 16 {
            // SAFETY: i * 16 + 16 <= len for both slices, both 16-byte aligned (checked above);
            // SSE2 is part of x86-64.
            unsafe { _mm_stream_si128(d.add(i), _mm_load_si128(s.add(i))) };
        }
        // SAFETY: a store fence; SSE is part of x86-64. Orders the streaming stores before
        // whatever follows (the chunk's unlock), as ordinary stores would be.
        unsafe { _mm_sfence() };
        return;
    }
    dst.copy_from_slice(src);
}

/// A poisoned chunk means a reactor panicked mid-copy: report a media error for it.
const POISONED: BdevError = BdevError::Os(libc::EIO);

impl SyncIo for MemoryChannel {
    fn lend(&self, io: &BdevIo) -> Option<LentBuf> {
        check_range(&self.info, io).ok()?;
        let (ci, co, len) = (io.offset as usize / CHUNK_BYTES, io.offset as usize % CHUNK_BYTES, io.len as usize);
        if len == 0 || co + len > CHUNK_BYTES {
            return None;
        }
        let chunk = self.chunks.get(ci)?.read().ok()?.chunk.clone();
        // SAFETY: co + len <= CHUNK_BYTES, inside the chunk.
        let ptr = unsafe { NonNull::new_unchecked(chunk.ptr.as_ptr().add(co)) };
        prefetch(ptr.as_ptr(), len);
        // SAFETY: the Arc keeps the chunk (and its backing) alive; while this clone exists the
        // chunk is shared, so writers copy it instead of writing it (`Arc::make_mut`).
        Some(unsafe { LentBuf::new(chunk, ptr, len) })
    }

    fn run(&self, io: &mut BdevIo) -> Result<(), BdevError> {
        check_range(&self.info, io)?;
        match io.op {
            BdevOp::Read => {
                let Some(buf) = io.buf.as_mut() else { return Err(BdevError::Os(libc::EINVAL)) };
                Self::pieces(io.offset, io.len, |ci, co, bo, n| {
                    let c = self.chunks[ci].read().map_err(|_| POISONED)?;
                    buf[bo..bo + n].copy_from_slice(&c.bytes()[co..co + n]);
                    Ok(())
                })
            }
            BdevOp::Write { .. } => {
                let mut at = io.offset;
                for buf in io.pieces() {
                    Self::pieces(at, buf.len() as u64, |ci, co, bo, n| {
                        let mut c = self.chunks[ci].write().map_err(|_| POISONED)?;
                        copy_to_device(&mut c.bytes_mut()[co..co + n], &buf[bo..bo + n]);
                        Ok(())
                    })?;
                    at += buf.len() as u64;
                }
                Ok(())
            }
            BdevOp::WriteZeroes | BdevOp::Deallocate => Self::pieces(io.offset, io.len, |ci, co, _, n| {
                let mut c = self.chunks[ci].write().map_err(|_| POISONED)?;
                c.bytes_mut()[co..co + n].fill(0);
                Ok(())
            }),
            BdevOp::Flush => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::AlignedBuf;
    use crate::uring::Ring;

    #[test]
    fn io_across_chunk_boundaries() {
        let dev = MemoryDevice::new("m", 1 << 20, 512).unwrap();
        let mut ring = Ring::new(8).unwrap();
        let mut ch = dev.channel(0).unwrap();
        let mut w = AlignedBuf::new(3 * CHUNK_BYTES);
        w.iter_mut().enumerate().for_each(|(i, b)| *b = (i % 253) as u8);
        let off = CHUNK_BYTES as u64 - 512;
        let expect = w.to_vec();
        // A gathered write: the first chunk and a half from one buffer, the rest from another.
        let (head, tail) = w.split_at(CHUNK_BYTES + CHUNK_BYTES / 2);
        let mut a = AlignedBuf::new(head.len());
        a.copy_from_slice(head);
        let mut b = AlignedBuf::new(tail.len());
        b.copy_from_slice(tail);
        let mut io = BdevIo::new(BdevOp::Write { fua: false }, off, w.len() as u64, Some(a), 1);
        io.gather.push(b);
        ch.submit(io, &mut ring);
        ch.submit(BdevIo::new(BdevOp::WriteZeroes, off + 1024, 512, None, 2), &mut ring);
        let r = AlignedBuf::new(3 * CHUNK_BYTES);
        ch.submit(BdevIo::new(BdevOp::Read, off, r.len() as u64, Some(r), 3), &mut ring);
        let mut small = AlignedBuf::new(512);
        small.set_len(512);
        ch.submit(BdevIo::new(BdevOp::Read, 1 << 20, 512, Some(small), 4), &mut ring);
        let mut done = Vec::new();
        assert_eq!(ch.poll(&mut done), 4);
        let got = done[2].buf.as_ref().unwrap();
        assert_eq!(&got[..1024], &expect[..1024]);
        assert!(got[1024..1536].iter().all(|&b| b == 0));
        assert_eq!(&got[1536..], &expect[1536..]);
        assert!(matches!(done[3].result, Err(BdevError::OutOfRange { .. })));
    }

    #[test]
    fn copies_to_the_device_whole_lines_or_not() {
        let mut src = AlignedBuf::new(8192);
        src.iter_mut().enumerate().for_each(|(i, b)| *b = (i % 251) as u8);
        let mut dst = AlignedBuf::new(8192);
        // (destination offset, source offset, length): aligned whole lines go with streaming
        // stores; a misaligned destination, source or length with an ordinary copy.
        for (d, s, n) in [(0, 0, 4096), (64, 16, 1024), (8, 0, 4096), (0, 3, 640), (0, 0, 100)] {
            dst.fill(0);
            copy_to_device(&mut dst[d..d + n], &src[s..s + n]);
            assert_eq!(&dst[d..d + n], &src[s..s + n], "copy at {d}/{s}+{n}");
            assert!(dst[..d].iter().chain(&dst[d + n..]).all(|&b| b == 0), "bytes outside {d}+{n} changed");
        }
    }

    fn write(ch: &mut Box<dyn BdevChannel>, ring: &mut Ring, off: u64, byte: u8) {
        let mut b = AlignedBuf::new(4096);
        b.fill(byte);
        ch.submit(BdevIo::new(BdevOp::Write { fua: false }, off, 4096, Some(b), 0), ring);
    }

    #[test]
    fn lent_reads_never_change_under_the_reader() {
        let dev = MemoryDevice::new("m", 1 << 20, 4096).unwrap();
        let mut ring = Ring::new(8).unwrap();
        let mut ch = dev.channel(0).unwrap();
        let mut done = Vec::new();
        write(&mut ch, &mut ring, 8192, 0xAA);
        // A lent read inside one chunk: no copy, buf comes back untouched.
        let mut io = BdevIo::new(BdevOp::Read, 8192, 4096, Some(AlignedBuf::new(4096)), 1);
        io.lend = true;
        ch.submit(io, &mut ring);
        // A write to the same block while the loan is held, then a plain read.
        write(&mut ch, &mut ring, 8192, 0xBB);
        ch.submit(BdevIo::new(BdevOp::Read, 8192, 4096, Some(AlignedBuf::new(4096)), 3), &mut ring);
        ch.poll(&mut done);
        // done: the first write, the lent read, the second write, the plain read.
        let lent = done[1].lent.as_ref().expect("a read inside a chunk is lent");
        assert!(lent.iter().all(|&b| b == 0xAA), "the loan changed under the reader");
        assert!(done[1].buf.as_ref().unwrap().iter().all(|&b| b == 0), "buf must come back untouched");
        assert!(done[3].buf.as_ref().unwrap().iter().all(|&b| b == 0xBB), "the write after the loan was lost");
        let store = dev.chunks[0].read().unwrap().chunk.store.clone();
        assert_eq!(store.spares.lock().unwrap().len(), 0, "the old version is still lent");
        // A read across chunks, or out of range, is not lent: copied, or refused.
        let mut io = BdevIo::new(BdevOp::Read, CHUNK_BYTES as u64 - 4096, 8192, Some(AlignedBuf::new(8192)), 4);
        io.lend = true;
        ch.submit(io, &mut ring);
        let mut io = BdevIo::new(BdevOp::Read, 1 << 20, 4096, Some(AlignedBuf::new(4096)), 5);
        io.lend = true;
        ch.submit(io, &mut ring);
        done.clear();
        ch.poll(&mut done);
        assert!(done[0].lent.is_none() && done[0].result.is_ok());
        assert!(done[1].lent.is_none() && matches!(done[1].result, Err(BdevError::OutOfRange { .. })));
        // The copy-on-write kept the old version alive for the loan; now that the loan ended
        // (done.clear() above) its memory is a spare, and the next copy-on-write reuses it.
        done.clear();
        assert_eq!(store.spares.lock().unwrap().len(), 1, "the old version's piece is a spare");
        let mut io = BdevIo::new(BdevOp::Read, 0, 4096, Some(AlignedBuf::new(4096)), 7);
        io.lend = true;
        ch.submit(io, &mut ring);
        write(&mut ch, &mut ring, 0, 0xDD);
        assert_eq!(store.spares.lock().unwrap().len(), 0, "the copy took the spare");
        ch.poll(&mut done);
        done.clear();
        // The loan ends; the chunk stays correct for later writes and reads.
        done.clear();
        write(&mut ch, &mut ring, 8192, 0xCC);
        ch.submit(BdevIo::new(BdevOp::Read, 8192, 4096, Some(AlignedBuf::new(4096)), 6), &mut ring);
        ch.poll(&mut done);
        assert!(done[1].buf.as_ref().unwrap().iter().all(|&b| b == 0xCC));
    }
}
