//! The on-disk format of a block written under `--verify`: a 40-byte self-describing header
//! followed by a seeded pattern, with a CRC32C over the whole block.
//!
//! ```text
//! offset size field
//!      0    8 magic            "STGPERF1"
//!      8    8 lba              the LBA this block was written to (u64 LE)
//!     16    4 generation       per-block write counter, 1 = first write (u32 LE)
//!     20    4 block_bytes      the logical block size it was written with (u32 LE)
//!     24    8 seed             the writing run's seed id (u64 LE)
//!     32    4 crc32c           CRC32C of the whole block with this field taken as zero
//!     36    4 reserved         zero
//!     40    -  pattern         SplitMix64 stream seeded from (seed, lba, generation), u64 LE words
//! ```
//!
//! Each field answers one question a failed read raises: the CRC whether the block is whole
//! (torn / corrupt), the LBA whether it is in the right place (misplaced), generation and seed
//! whether it is the newest acknowledged write (stale, lost). The pattern makes every block's
//! body distinct, so a torn mix of two writes of one block, or a body copied from another
//! block, breaks the CRC. The pattern generator is written out here rather than taken from a
//! crate so that blocks stay byte-identical across versions of the harness.

/// First bytes of every block the harness writes under `--verify`.
pub const MAGIC: [u8; 8] = *b"STGPERF1";
/// Bytes of the header; the smallest logical block (512) leaves room for the pattern.
pub const HEADER_BYTES: usize = 40;
const LBA_AT: usize = 8;
const GEN_AT: usize = 16;
const BLOCK_BYTES_AT: usize = 20;
const SEED_AT: usize = 24;
const CRC_AT: usize = 32;

/// Who wrote a block and which write of it this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Stamp {
    /// Per-block write counter, starting at 1 (0 means "never written" in the state map).
    pub generation: u32,
    /// The run's seed id.
    pub seed: u64,
}

/// What a block read back turned out to hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contents {
    /// All zeroes: never written (or deallocated).
    Zero,
    /// Not written by this harness (no magic).
    NoHeader,
    /// Our magic, but the checksum does not match: torn or corrupted. The header fields are
    /// reported as found, but cannot be trusted.
    Torn { stored_crc: u32, computed_crc: u32, claimed_lba: u64, claimed: Stamp },
    /// A whole block written by this harness.
    Valid { lba: u64, stamp: Stamp },
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// SplitMix64: tiny, fast, and fully specified here (see the module comment).
#[derive(Clone, Copy)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// CRC32C of a block with the CRC field taken as zero.
pub fn block_crc(block: &[u8]) -> u32 {
    let c = crc32c::crc32c(&block[..CRC_AT]);
    let c = crc32c::crc32c_append(c, &[0u8; 4]);
    crc32c::crc32c_append(c, &block[CRC_AT + 4..])
}

/// Fills `block` (one logical block, at least `HEADER_BYTES` long, a multiple of 8) with the
/// header and pattern for `lba` / `stamp`.
pub fn encode(block: &mut [u8], lba: u64, stamp: Stamp) {
    debug_assert!(block.len() >= HEADER_BYTES + 8 && block.len() % 8 == 0);
    block[..8].copy_from_slice(&MAGIC);
    block[LBA_AT..LBA_AT + 8].copy_from_slice(&lba.to_le_bytes());
    block[GEN_AT..GEN_AT + 4].copy_from_slice(&stamp.generation.to_le_bytes());
    let block_bytes = block.len() as u32;
    block[BLOCK_BYTES_AT..BLOCK_BYTES_AT + 4].copy_from_slice(&block_bytes.to_le_bytes());
    block[SEED_AT..SEED_AT + 8].copy_from_slice(&stamp.seed.to_le_bytes());
    block[CRC_AT..HEADER_BYTES].fill(0);
    let mut rng = SplitMix64(stamp.seed ^ lba.rotate_left(17) ^ (stamp.generation as u64).rotate_left(47));
    for w in block[HEADER_BYTES..].chunks_exact_mut(8) {
        w.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    let crc = block_crc(block);
    block[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Classifies one logical block read back.
pub fn decode(block: &[u8]) -> Contents {
    if block.len() < HEADER_BYTES || block[..8] != MAGIC {
        return if block.iter().all(|&b| b == 0) { Contents::Zero } else { Contents::NoHeader };
    }
    let lba = u64_at(block, LBA_AT);
    let stamp = Stamp { generation: u32_at(block, GEN_AT), seed: u64_at(block, SEED_AT) };
    let stored_crc = u32_at(block, CRC_AT);
    let computed_crc = block_crc(block);
    if stored_crc != computed_crc || u32_at(block, BLOCK_BYTES_AT) as usize != block.len() {
        return Contents::Torn { stored_crc, computed_crc, claimed_lba: lba, claimed: stamp };
    }
    Contents::Valid { lba, stamp }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Stamp = Stamp { generation: 7, seed: 0xDEAD_BEEF_0000_0001 };

    #[test]
    fn round_trip_every_block_size() {
        for bs in [512usize, 4096, 65536] {
            let mut b = vec![0u8; bs];
            encode(&mut b, 123_456, S);
            assert_eq!(decode(&b), Contents::Valid { lba: 123_456, stamp: S });
        }
    }

    #[test]
    fn bodies_differ_by_lba_and_generation() {
        let (mut a, mut b, mut c) = (vec![0u8; 512], vec![0u8; 512], vec![0u8; 512]);
        encode(&mut a, 1, S);
        encode(&mut b, 2, S);
        encode(&mut c, 1, Stamp { generation: 8, ..S });
        assert_ne!(a[HEADER_BYTES..], b[HEADER_BYTES..]);
        assert_ne!(a[HEADER_BYTES..], c[HEADER_BYTES..]);
    }

    #[test]
    fn any_flipped_bit_is_torn() {
        let mut b = vec![0u8; 512];
        encode(&mut b, 9, S);
        for i in (8..512).step_by(7) {
            let mut x = b.clone();
            x[i] ^= 0x10;
            assert!(matches!(decode(&x), Contents::Torn { .. }), "flip at {i} not detected");
        }
    }

    #[test]
    fn zero_and_foreign() {
        assert_eq!(decode(&[0u8; 512]), Contents::Zero);
        let mut b = vec![0u8; 512];
        b[100] = 1;
        assert_eq!(decode(&b), Contents::NoHeader);
    }
}
