//! Log entry wire format: a 4 KiB header block followed by the data blocks.
//!
//! The header occupies a whole block so that the data that follows stays 4 KiB aligned for
//! O_DIRECT and can be read back (for destage or a read hit) without copying. That costs one
//! block per entry (a 4 KiB write uses 8 KiB of log); batching small writes into one entry is a
//! later optimisation.
//!
//! Header layout (little endian, 64 bytes, rest of the block zero):
//! ```text
//!  0 magic u32 | 4 version u16 | 6 kind u8 | 7 reserved u8 | 8 volume u32 | 12 blocks u32
//! 16 epoch u64 | 24 seq u64 | 32 lba u64 | 40 incarnation u64 | 48 log_pos u64
//! 56 data_crc u32 (crc32c of the data blocks) | 60 header_crc u32 (crc32c of bytes 0..60)
//! ```
//! Beyond the fields DESIGN.md lists, two guard replay: `log_pos` (the entry's absolute ring
//! position, so stale entries from an earlier lap are rejected) and `incarnation` (bumped in
//! the superblock at every recovery, so entries written after a torn tail was dropped can never
//! be followed by survivors of the dropped tail during a later replay).

use crate::constants::{BLOCK_SIZE, BLOCK_SIZE_U64, WRITE_BLOCKS_MAX};
use crate::types::{Epoch, Lba, LogSeq, VolumeId};

pub const ENTRY_MAGIC: u32 = 0x454c_5453; // "STLE"
pub const ENTRY_VERSION: u16 = 1;
pub const HEADER_LEN: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// Host data for `blocks` blocks at `lba`.
    Write,
    /// Filler: the rest of the ring up to its end is unused; the next entry starts at the
    /// beginning of the next lap. Entries never wrap, so data stays contiguous.
    Pad,
}

impl EntryKind {
    fn to_u8(self) -> u8 {
        match self {
            EntryKind::Write => 1,
            EntryKind::Pad => 2,
        }
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
    pub incarnation: u64,
    pub log_pos: u64,
    pub data_crc: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("entry truncated: need {need} bytes, have {got}")]
    Truncated { need: usize, got: usize },
    #[error("bad entry magic {0:#x}")]
    BadMagic(u32),
    #[error("unsupported entry version {0}")]
    BadVersion(u16),
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
    /// Bytes the entry occupies in the log, header block included.
    pub fn entry_bytes(&self) -> u64 {
        match self.kind {
            EntryKind::Write => (1 + self.blocks as u64) * BLOCK_SIZE_U64,
            EntryKind::Pad => BLOCK_SIZE_U64,
        }
    }

    /// Writes the header (with its checksum) into the first `HEADER_LEN` bytes of `out`.
    pub fn encode(&self, out: &mut [u8]) {
        assert!(out.len() >= HEADER_LEN);
        let b = &mut out[..HEADER_LEN];
        b[0..4].copy_from_slice(&ENTRY_MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&ENTRY_VERSION.to_le_bytes());
        b[6] = self.kind.to_u8();
        b[7] = 0;
        b[8..12].copy_from_slice(&self.volume.0.to_le_bytes());
        b[12..16].copy_from_slice(&self.blocks.to_le_bytes());
        b[16..24].copy_from_slice(&self.epoch.0.to_le_bytes());
        b[24..32].copy_from_slice(&self.seq.0.to_le_bytes());
        b[32..40].copy_from_slice(&self.lba.0.to_le_bytes());
        b[40..48].copy_from_slice(&self.incarnation.to_le_bytes());
        b[48..56].copy_from_slice(&self.log_pos.to_le_bytes());
        b[56..60].copy_from_slice(&self.data_crc.to_le_bytes());
        let crc = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes and checks a header. Never panics on arbitrary input.
    pub fn decode(buf: &[u8]) -> Result<EntryHeader, EntryError> {
        if buf.len() < HEADER_LEN {
            return Err(EntryError::Truncated { need: HEADER_LEN, got: buf.len() });
        }
        let u32_at = |o: usize| u32::from_le_bytes(buf[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(buf[o..o + 8].try_into().unwrap());
        let magic = u32_at(0);
        if magic != ENTRY_MAGIC {
            return Err(EntryError::BadMagic(magic));
        }
        if crc32c::crc32c(&buf[..60]) != u32_at(60) {
            return Err(EntryError::BadHeaderCrc);
        }
        let version = u16::from_le_bytes([buf[4], buf[5]]);
        if version != ENTRY_VERSION {
            return Err(EntryError::BadVersion(version));
        }
        let kind = match buf[6] {
            1 => EntryKind::Write,
            2 => EntryKind::Pad,
            k => return Err(EntryError::BadKind(k)),
        };
        let blocks = u32_at(12);
        match kind {
            EntryKind::Write if blocks == 0 || blocks > WRITE_BLOCKS_MAX => return Err(EntryError::BadLength(blocks)),
            EntryKind::Pad if blocks != 0 => return Err(EntryError::BadLength(blocks)),
            _ => {}
        }
        Ok(EntryHeader {
            kind,
            volume: VolumeId(u32_at(8)),
            blocks,
            epoch: Epoch(u64_at(16)),
            seq: LogSeq(u64_at(24)),
            lba: Lba(u64_at(32)),
            incarnation: u64_at(40),
            log_pos: u64_at(48),
            data_crc: u32_at(56),
        })
    }

    /// Checks `data` (the blocks after the header) against the header's data checksum.
    pub fn verify_data(&self, data: &[u8]) -> Result<(), EntryError> {
        let need = self.blocks as usize * BLOCK_SIZE;
        if data.len() < need {
            return Err(EntryError::Truncated { need, got: data.len() });
        }
        if crc32c::crc32c(&data[..need]) != self.data_crc {
            return Err(EntryError::BadDataCrc);
        }
        Ok(())
    }
}

/// Builds the bytes of a whole write entry (header block + data); fills in `data_crc`.
pub fn encode_write_entry(mut header: EntryHeader, data: &[u8]) -> Vec<u8> {
    assert_eq!(header.kind, EntryKind::Write);
    assert_eq!(data.len(), header.blocks as usize * BLOCK_SIZE);
    header.data_crc = crc32c::crc32c(data);
    let mut out = vec![0u8; BLOCK_SIZE + data.len()];
    header.encode(&mut out[..BLOCK_SIZE]);
    out[BLOCK_SIZE..].copy_from_slice(data);
    out
}

/// Builds a pad entry (one header block).
pub fn encode_pad_entry(volume: VolumeId, incarnation: u64, log_pos: u64) -> Vec<u8> {
    let header = EntryHeader {
        kind: EntryKind::Pad,
        volume,
        epoch: Epoch(0),
        seq: LogSeq(0),
        lba: Lba(0),
        blocks: 0,
        incarnation,
        log_pos,
        data_crc: 0,
    };
    let mut out = vec![0u8; BLOCK_SIZE];
    header.encode(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn sample(blocks: u32) -> (EntryHeader, Vec<u8>) {
        let data: Vec<u8> = (0..blocks as usize * BLOCK_SIZE).map(|i| (i * 7 + 3) as u8).collect();
        let header = EntryHeader {
            kind: EntryKind::Write,
            volume: VolumeId(7),
            epoch: Epoch(3),
            seq: LogSeq(42),
            lba: Lba(1000),
            blocks,
            incarnation: 5,
            log_pos: 123 * 4096,
            data_crc: 0,
        };
        (header, data)
    }

    #[test]
    fn round_trip() {
        let (header, data) = sample(3);
        let bytes = encode_write_entry(header, &data);
        assert_eq!(bytes.len() as u64, header.entry_bytes());
        let decoded = EntryHeader::decode(&bytes).unwrap();
        assert_eq!(decoded, EntryHeader { data_crc: crc32c::crc32c(&data), ..header });
        decoded.verify_data(&bytes[BLOCK_SIZE..]).unwrap();
        let pad = encode_pad_entry(VolumeId(1), 9, 4096);
        let p = EntryHeader::decode(&pad).unwrap();
        assert_eq!((p.kind, p.incarnation, p.log_pos, p.entry_bytes()), (EntryKind::Pad, 9, 4096, 4096));
    }

    #[test]
    fn truncation_is_detected() {
        let (header, data) = sample(2);
        let bytes = encode_write_entry(header, &data);
        for len in 0..HEADER_LEN {
            assert!(matches!(EntryHeader::decode(&bytes[..len]), Err(EntryError::Truncated { .. })));
        }
        let h = EntryHeader::decode(&bytes).unwrap();
        assert!(matches!(h.verify_data(&bytes[BLOCK_SIZE..bytes.len() - 1]), Err(EntryError::Truncated { .. })));
    }

    #[test]
    fn corruption_is_detected() {
        let (header, data) = sample(1);
        let bytes = encode_write_entry(header, &data);
        for i in 0..HEADER_LEN {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(EntryHeader::decode(&b).is_err(), "flip in header byte {i} undetected");
        }
        let mut b = bytes.clone();
        b[BLOCK_SIZE + 100] ^= 1;
        assert_eq!(EntryHeader::decode(&b).unwrap().verify_data(&b[BLOCK_SIZE..]), Err(EntryError::BadDataCrc));
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
