//! Log entry header wire format: the 64 bytes that describe one host write, Write Zeroes or
//! Deallocate of one volume.
//!
//! These are exactly the bytes a replica receives for the entry (replication, next issue):
//! nothing in them belongs to one device's ring. Where the entry sits in a log (position,
//! incarnation) is recorded once per frame, in the frame header around it (`frame.rs`), so the
//! same header travels unchanged from the source's log to every replica's log.
//!
//! Layout (little endian, 64 bytes):
//! ```text
//!  0 magic u32 | 4 version u8 | 5 kind u8 | 6 reserved u16 | 8 volume u32 | 12 blocks u32
//! 16 epoch u64 | 24 seq u64 | 32 lba u64
//! 40 data_crc u32 (crc32c of the data blocks; 0 for data-less kinds) | 44 reserved (16 bytes)
//! 60 header_crc u32 (crc32c of bytes 0..60)
//! ```
//! `Zeroes`, `Unmap` and `SanWritten` entries carry no data, whatever their length: zeroing or
//! unmapping a large range costs 64 bytes of log, not the range in zeros.

use crate::constants::{BLOCK_SIZE, WRITE_BLOCKS_MAX};
use crate::types::{Epoch, Lba, LogSeq, VolumeId};

pub const ENTRY_MAGIC: u32 = 0x454c_5453; // "STLE"
pub const ENTRY_VERSION: u8 = 2;
pub const ENTRY_HEADER_LEN: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// Host data for `blocks` blocks at `lba`, in the frame after the header block.
    Write,
    /// `blocks` blocks at `lba` read as zeroes (Write Zeroes); no data in the log.
    Zeroes,
    /// `blocks` blocks at `lba` are deallocated and read as zeroes; destaged as an unmap.
    Unmap,
    /// `blocks` blocks at `lba` were written to the SAN directly, with FUA, while the log was
    /// full (`engine/write.rs`, "Full log"): every older entry of them is void, and there is
    /// nothing to destage. No data in the log.
    SanWritten,
}

impl EntryKind {
    fn to_u8(self) -> u8 {
        match self {
            EntryKind::Write => 1,
            EntryKind::Zeroes => 2,
            EntryKind::Unmap => 3,
            EntryKind::SanWritten => 4,
        }
    }

    fn from_u8(k: u8) -> Option<EntryKind> {
        match k {
            1 => Some(EntryKind::Write),
            2 => Some(EntryKind::Zeroes),
            3 => Some(EntryKind::Unmap),
            4 => Some(EntryKind::SanWritten),
            _ => None,
        }
    }

    /// Whether the entry's blocks are in the log (the others read as zeroes).
    pub fn has_data(self) -> bool {
        self == EntryKind::Write
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryHeader {
    pub kind: EntryKind,
    pub volume: VolumeId,
    pub epoch: Epoch,
    pub seq: LogSeq,
    pub lba: Lba,
    pub blocks: u32,
    pub data_crc: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("entry truncated: need {need} bytes, have {got}")]
    Truncated { need: usize, got: usize },
    #[error("bad entry magic {0:#x}")]
    BadMagic(u32),
    #[error("unsupported entry version {0}")]
    BadVersion(u8),
    #[error("entry header checksum mismatch")]
    BadHeaderCrc,
    #[error("unknown entry kind {0}")]
    BadKind(u8),
    #[error("entry length {0} blocks out of range")]
    BadLength(u32),
    #[error("entry data checksum mismatch")]
    BadDataCrc,
}

impl EntryHeader {
    /// Log bytes of the entry's data (zero for data-less kinds).
    pub fn data_bytes(&self) -> u64 {
        if self.kind.has_data() {
            self.blocks as u64 * BLOCK_SIZE as u64
        } else {
            0
        }
    }

    /// Writes the header (with its checksum) into `out[..ENTRY_HEADER_LEN]`.
    pub fn encode(&self, out: &mut [u8]) {
        let b = &mut out[..ENTRY_HEADER_LEN];
        b.fill(0);
        b[0..4].copy_from_slice(&ENTRY_MAGIC.to_le_bytes());
        b[4] = ENTRY_VERSION;
        b[5] = self.kind.to_u8();
        b[8..12].copy_from_slice(&self.volume.0.to_le_bytes());
        b[12..16].copy_from_slice(&self.blocks.to_le_bytes());
        b[16..24].copy_from_slice(&self.epoch.0.to_le_bytes());
        b[24..32].copy_from_slice(&self.seq.0.to_le_bytes());
        b[32..40].copy_from_slice(&self.lba.0.to_le_bytes());
        b[40..44].copy_from_slice(&self.data_crc.to_le_bytes());
        let crc = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes and checks a header. Never panics on arbitrary input.
    pub fn decode(buf: &[u8]) -> Result<EntryHeader, EntryError> {
        if buf.len() < ENTRY_HEADER_LEN {
            return Err(EntryError::Truncated { need: ENTRY_HEADER_LEN, got: buf.len() });
        }
        let u32_at = |o: usize| u32::from_le_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let magic = u32_at(0);
        if magic != ENTRY_MAGIC {
            return Err(EntryError::BadMagic(magic));
        }
        if crc32c::crc32c(&buf[..60]) != u32_at(60) {
            return Err(EntryError::BadHeaderCrc);
        }
        if buf[4] != ENTRY_VERSION {
            return Err(EntryError::BadVersion(buf[4]));
        }
        let kind = EntryKind::from_u8(buf[5]).ok_or(EntryError::BadKind(buf[5]))?;
        let blocks = u32_at(12);
        if blocks == 0 || (kind.has_data() && blocks > WRITE_BLOCKS_MAX) {
            return Err(EntryError::BadLength(blocks));
        }
        Ok(EntryHeader {
            kind,
            volume: VolumeId(u32_at(8)),
            blocks,
            epoch: Epoch(u64_at(16)),
            seq: LogSeq(u64_at(24)),
            lba: Lba(u64_at(32)),
            data_crc: u32_at(40),
        })
    }

    /// Checks `data` (the entry's blocks) against the header's data checksum.
    pub fn verify_data(&self, data: &[u8]) -> Result<(), EntryError> {
        let need = self.data_bytes() as usize;
        if data.len() < need {
            return Err(EntryError::Truncated { need, got: data.len() });
        }
        if crc32c::crc32c(&data[..need]) != self.data_crc {
            return Err(EntryError::BadDataCrc);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn sample(kind: EntryKind, blocks: u32) -> EntryHeader {
        EntryHeader {
            kind,
            volume: VolumeId(7),
            epoch: Epoch(3),
            seq: LogSeq(42),
            lba: Lba(1000),
            blocks,
            data_crc: if kind.has_data() { 0xdead_beef } else { 0 },
        }
    }

    #[test]
    fn round_trip_every_kind() {
        for (kind, blocks) in [
            (EntryKind::Write, 3),
            (EntryKind::Zeroes, 65536),
            (EntryKind::Unmap, u32::MAX),
            (EntryKind::SanWritten, 16),
        ] {
            let h = sample(kind, blocks);
            let mut b = [0u8; ENTRY_HEADER_LEN];
            h.encode(&mut b);
            assert_eq!(EntryHeader::decode(&b).unwrap(), h);
        }
        assert_eq!(sample(EntryKind::Zeroes, 65536).data_bytes(), 0, "zeroes cost no log data");
        assert_eq!(sample(EntryKind::Write, 2).data_bytes(), 8192);
    }

    #[test]
    fn truncation_corruption_and_bad_lengths_are_detected() {
        let mut b = [0u8; ENTRY_HEADER_LEN];
        sample(EntryKind::Write, 2).encode(&mut b);
        for len in 0..ENTRY_HEADER_LEN {
            assert!(matches!(EntryHeader::decode(&b[..len]), Err(EntryError::Truncated { .. })));
        }
        for i in 0..ENTRY_HEADER_LEN {
            let mut c = b;
            c[i] ^= 0x10;
            assert!(EntryHeader::decode(&c).is_err(), "flip in header byte {i} undetected");
        }
        for (kind, blocks) in [(EntryKind::Write, 0), (EntryKind::Write, WRITE_BLOCKS_MAX + 1), (EntryKind::Zeroes, 0)]
        {
            let mut c = [0u8; ENTRY_HEADER_LEN];
            sample(kind, blocks).encode(&mut c);
            assert_eq!(EntryHeader::decode(&c), Err(EntryError::BadLength(blocks)));
        }
        let data = vec![5u8; 8192];
        let h = EntryHeader { data_crc: crc32c::crc32c(&data), ..sample(EntryKind::Write, 2) };
        h.verify_data(&data).unwrap();
        let mut bad = data.clone();
        bad[4000] ^= 1;
        assert_eq!(h.verify_data(&bad), Err(EntryError::BadDataCrc));
        assert!(matches!(h.verify_data(&data[..4096]), Err(EntryError::Truncated { .. })));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..20_000 {
            let len = rng.gen_range(0..130);
            let mut b: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            if len >= 4 && rng.gen_bool(0.5) {
                b[..4].copy_from_slice(&ENTRY_MAGIC.to_le_bytes());
            }
            if let Ok(h) = EntryHeader::decode(&b) {
                let _ = h.verify_data(&b);
            }
        }
    }
}
