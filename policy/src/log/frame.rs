//! Log frame wire format: one header block that packs the headers of every entry written
//! together (group commit), followed by the data of those entries, back to back.
//!
//! A frame is what one log write puts on flash: the header block comes from the engine's pool,
//! each entry's data is the host's own I/O buffer, and the device gets them as one gathered
//! write (header + data iovecs). Packing headers is what keeps the log compact: 32 concurrent
//! 4 KiB writes cost 33 blocks of log, not 64.
//!
//! The frame header holds what belongs to this device's ring — the device's id (new at every
//! format), the frame's absolute position and the incarnation it was written in — so the entry
//! headers inside stay byte-identical to what a replica receives (`entry.rs`). The device id
//! keeps a reformatted device from ever replaying its previous format's frames, whose
//! positions, incarnations and sequence numbers can line up with the new ones.
//!
//! Layout of the header block (little endian, 4 KiB):
//! ```text
//!  0 magic u32 | 4 version u16 | 6 kind u8 | 7 reserved u8 | 8 entries u16 | 10 reserved u16
//! 12 data_blocks u32 (sum of the Write entries' blocks) | 16 incarnation u64 | 24 pos u64
//! 32 device_id u64 | 40 acked_upto u64 | 48 reserved (12 bytes)
//! 60 header_crc u32: crc32c of bytes 0..60 and of each entry header's first 60 bytes
//! 64 entry headers, 64 bytes each (`entry.rs`, at most 31); zero up to byte 2048
//! 2048 a mirror of bytes 0..2048
//! ```
//! The mirror makes one damaged half of a header block recoverable: replay reads the first half
//! and, if it fails its checks, the second. A torn write of the block (new first sectors, old
//! rest) cannot pass for the new frame: the old half is a whole older frame, whose position
//! (an earlier lap) replay refuses.
//! A `Pad` frame has no entries and fills the ring to the end of its lap: frames never wrap, so
//! an entry's data is always contiguous on the device.
//!
//! A frame is valid only whole: its header checksum covers every entry header, and each entry's
//! data has its own checksum, so a torn frame (header or data) is never taken for a written one.
//!
//! `acked_upto` is where acknowledged frames ended when this one was cut: every frame before
//! it was durable and its writes acknowledged. Replay uses it to tell a frame damaged after it
//! was acknowledged (a later frame claims past it) from a torn tail (nothing does).

use super::entry::{EntryError, EntryHeader, ENTRY_HEADER_LEN};
use crate::constants::{BLOCK_SIZE, BLOCK_SIZE_U64, FRAME_DATA_BLOCKS_MAX, FRAME_ENTRIES_MAX};
use crate::types::{Incarnation, LogPos};

pub const FRAME_MAGIC: u32 = 0x464c_5453; // "STLF"
pub const FRAME_VERSION: u16 = 2;
const ENTRIES_AT: usize = 64;
/// The frame header and entries take the first half of the header block, their mirror the rest.
const HALF: usize = BLOCK_SIZE / 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// Entries and their data.
    Data,
    /// Filler to the end of the lap; the next frame starts at the next lap.
    Pad,
}

/// What a frame header records about the ring it is written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameStamp {
    pub device_id: u64,
    pub incarnation: Incarnation,
    pub acked_upto: LogPos,
}

impl FrameStamp {
    pub fn new(device_id: u64, incarnation: Incarnation, acked_upto: LogPos) -> FrameStamp {
        FrameStamp { device_id, incarnation, acked_upto }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    /// The format the frame belongs to (the superblock's device id).
    pub device_id: u64,
    /// Frames before this position were acknowledged when this one was cut.
    pub acked_upto: LogPos,
    pub incarnation: Incarnation,
    pub pos: LogPos,
    pub data_blocks: u32,
    pub entries: Vec<EntryHeader>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame header truncated: {0} bytes")]
    Truncated(usize),
    #[error("no frame here (magic {0:#x})")]
    BadMagic(u32),
    #[error("unsupported frame version {0}")]
    BadVersion(u16),
    #[error("frame header checksum mismatch")]
    BadCrc,
    #[error("unknown frame kind {0}")]
    BadKind(u8),
    #[error("frame claims {entries} entries and {blocks} data blocks")]
    BadShape { entries: usize, blocks: u32 },
    #[error("entry {index}: {error}")]
    Entry { index: usize, error: EntryError },
}

impl FrameHeader {
    /// Bytes the frame occupies in the ring (a pad's extent depends on where it is: see
    /// [`super::Ring::next_lap`]).
    pub fn bytes(&self) -> u64 {
        (1 + self.data_blocks as u64) * BLOCK_SIZE_U64
    }

    /// Writes a frame header into `out` (one block). `entries` must respect the limits; the
    /// data blocks are the Write entries' blocks.
    pub fn encode(kind: FrameKind, stamp: FrameStamp, pos: LogPos, entries: &[EntryHeader], out: &mut [u8]) {
        assert!(out.len() >= BLOCK_SIZE && entries.len() <= FRAME_ENTRIES_MAX);
        let data_blocks: u64 = entries.iter().map(|e| e.data_bytes() / BLOCK_SIZE_U64).sum();
        assert!(data_blocks <= FRAME_DATA_BLOCKS_MAX as u64, "frame: {data_blocks} data blocks");
        let b = &mut out[..BLOCK_SIZE];
        // The whole block goes to the device: what the pool left in it must read as zero.
        b.fill(0);
        b[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&FRAME_VERSION.to_le_bytes());
        b[6] = match kind {
            FrameKind::Data => 1,
            FrameKind::Pad => 2,
        };
        b[8..10].copy_from_slice(&(entries.len() as u16).to_le_bytes());
        b[12..16].copy_from_slice(&(data_blocks as u32).to_le_bytes());
        b[16..24].copy_from_slice(&stamp.incarnation.0.to_le_bytes());
        b[24..32].copy_from_slice(&pos.0.to_le_bytes());
        b[32..40].copy_from_slice(&stamp.device_id.to_le_bytes());
        b[40..48].copy_from_slice(&stamp.acked_upto.0.to_le_bytes());
        for (i, e) in entries.iter().enumerate() {
            e.encode(&mut b[ENTRIES_AT + i * ENTRY_HEADER_LEN..]);
        }
        let crc = frame_crc(b, entries.len());
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        let (first, second) = b.split_at_mut(HALF);
        second.copy_from_slice(first);
    }

    /// Decodes and checks a frame header block: its first half, or else its mirror. Never
    /// panics on arbitrary input. The error is the first half's.
    pub fn decode(buf: &[u8]) -> Result<FrameHeader, FrameError> {
        if buf.len() < BLOCK_SIZE {
            return Err(FrameError::Truncated(buf.len()));
        }
        match Self::decode_half(&buf[..HALF]) {
            Ok(h) => Ok(h),
            Err(FrameError::BadMagic(m)) if buf[HALF..BLOCK_SIZE].iter().all(|&b| b == 0) => {
                Err(FrameError::BadMagic(m))
            }
            Err(e) => Self::decode_half(&buf[HALF..BLOCK_SIZE]).map_err(|_| e),
        }
    }

    /// Whether only the mirror half of this header block decodes (the first half is damaged).
    pub fn mirror_only(buf: &[u8]) -> bool {
        buf.len() >= BLOCK_SIZE
            && Self::decode_half(&buf[..HALF]).is_err()
            && Self::decode_half(&buf[HALF..BLOCK_SIZE]).is_ok()
    }

    fn decode_half(buf: &[u8]) -> Result<FrameHeader, FrameError> {
        let u16_at = |o: usize| u16::from_le_bytes([buf[o], buf[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let magic = u32_at(0);
        if magic != FRAME_MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        let entries = u16_at(8) as usize;
        let data_blocks = u32_at(12);
        if entries > FRAME_ENTRIES_MAX || data_blocks > FRAME_DATA_BLOCKS_MAX {
            return Err(FrameError::BadShape { entries, blocks: data_blocks });
        }
        if frame_crc(buf, entries) != u32_at(60) {
            return Err(FrameError::BadCrc);
        }
        let version = u16_at(4);
        if version != FRAME_VERSION {
            return Err(FrameError::BadVersion(version));
        }
        let kind = match buf[6] {
            1 => FrameKind::Data,
            2 => FrameKind::Pad,
            k => return Err(FrameError::BadKind(k)),
        };
        let mut list = Vec::with_capacity(entries);
        for index in 0..entries {
            let at = ENTRIES_AT + index * ENTRY_HEADER_LEN;
            let e = EntryHeader::decode(&buf[at..at + ENTRY_HEADER_LEN])
                .map_err(|error| FrameError::Entry { index, error })?;
            list.push(e);
        }
        let sum: u64 = list.iter().map(|e| e.data_bytes() / BLOCK_SIZE_U64).sum();
        let shape_ok = match kind {
            FrameKind::Data => !list.is_empty() && sum == data_blocks as u64,
            FrameKind::Pad => list.is_empty() && data_blocks == 0,
        };
        if !shape_ok {
            return Err(FrameError::BadShape { entries, blocks: data_blocks });
        }
        Ok(FrameHeader {
            kind,
            device_id: u64_at(32),
            acked_upto: LogPos(u64_at(40)),
            incarnation: Incarnation(u64_at(16)),
            pos: LogPos(u64_at(24)),
            data_blocks,
            entries: list,
        })
    }

    /// Byte offset of entry `index`'s data from the start of the frame.
    pub fn data_offset(&self, index: usize) -> u64 {
        BLOCK_SIZE_U64 + self.entries[..index].iter().map(|e| e.data_bytes()).sum::<u64>()
    }
}

/// The frame checksum: the frame header's first 60 bytes and each entry header without its own
/// checksum. (Chaining whole entries would be blind to them: a CRC run over a message followed
/// by that message's own CRC ends in the same state whatever the message was, so any entry
/// rewritten with a valid checksum — a stale one from an earlier lap — would pass.)
fn frame_crc(b: &[u8], entries: usize) -> u32 {
    let mut c = crc32c::crc32c(&b[..60]);
    for i in 0..entries {
        let at = ENTRIES_AT + i * ENTRY_HEADER_LEN;
        c = crc32c::crc32c_append(c, &b[at..at + ENTRY_HEADER_LEN - 4]);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::entry::EntryKind;
    use crate::types::{Epoch, Lba, LogSeq, VolumeId};
    use rand::{Rng, SeedableRng};

    fn entries(n: usize) -> Vec<EntryHeader> {
        (0..n)
            .map(|i| EntryHeader {
                kind: if i % 3 == 2 { EntryKind::Zeroes } else { EntryKind::Write },
                volume: VolumeId(1 + i as u32 % 2),
                epoch: Epoch(1),
                seq: LogSeq(10 + i as u64),
                lba: Lba(i as u64 * 8),
                blocks: 1 + i as u32 % 4,
                data_crc: i as u32,
            })
            .collect()
    }

    #[test]
    fn round_trip_and_data_offsets() {
        let list = entries(FRAME_ENTRIES_MAX);
        let mut b = vec![0xAAu8; BLOCK_SIZE];
        FrameHeader::encode(
            FrameKind::Data,
            FrameStamp::new(0xd1, Incarnation(4), LogPos(4096)),
            LogPos(8192 * 3),
            &list,
            &mut b,
        );
        let f = FrameHeader::decode(&b).unwrap();
        assert_eq!(
            (f.kind, f.device_id, f.incarnation, f.pos, f.acked_upto, f.entries.len()),
            (FrameKind::Data, 0xd1, Incarnation(4), LogPos(24576), LogPos(4096), FRAME_ENTRIES_MAX)
        );
        assert_eq!(f.entries, list);
        let blocks: u64 = list.iter().map(|e| e.data_bytes() / 4096).sum();
        assert_eq!(f.bytes(), (1 + blocks) * 4096);
        assert_eq!(f.data_offset(0), 4096);
        assert_eq!(f.data_offset(1), 4096 + list[0].data_bytes());
        assert_eq!(f.data_offset(3), 4096 + list[0].data_bytes() + list[1].data_bytes());
        let mut p = vec![0u8; BLOCK_SIZE];
        FrameHeader::encode(
            FrameKind::Pad,
            FrameStamp::new(0xd1, Incarnation(4), LogPos(0)),
            LogPos(4096),
            &[],
            &mut p,
        );
        assert_eq!(FrameHeader::decode(&p).unwrap().kind, FrameKind::Pad);
    }

    #[test]
    fn damage_in_one_half_is_recovered_from_the_other_and_in_both_is_detected() {
        let list = entries(10);
        let mut b = vec![0u8; BLOCK_SIZE];
        FrameHeader::encode(FrameKind::Data, FrameStamp::new(7, Incarnation(1), LogPos(0)), LogPos(0), &list, &mut b);
        let good = FrameHeader::decode(&b).unwrap();
        let used = 64 + 10 * 64;
        for i in 0..used {
            let mut c = b.clone();
            c[i] ^= 0x04;
            assert_eq!(FrameHeader::decode(&c).as_ref(), Ok(&good), "flip at byte {i} not repaired by the mirror");
            assert!(FrameHeader::mirror_only(&c));
            let mut d = b.clone();
            d[HALF + i] ^= 0x04;
            assert_eq!(FrameHeader::decode(&d).as_ref(), Ok(&good), "flip in the mirror at byte {i}");
            c[HALF + i] ^= 0x04;
            assert!(FrameHeader::decode(&c).is_err(), "flip in both halves at byte {i} undetected");
        }
        // A torn write that kept the first sectors of the new header and the old rest: the old
        // rest is an earlier lap's whole frame (another position), never the new one.
        let mut old = vec![0u8; BLOCK_SIZE];
        let older: Vec<EntryHeader> =
            entries(20).into_iter().map(|e| EntryHeader { seq: LogSeq(e.seq.0 + 1000), ..e }).collect();
        FrameHeader::encode(
            FrameKind::Data,
            FrameStamp::new(7, Incarnation(1), LogPos(0)),
            LogPos(1 << 30),
            &older,
            &mut old,
        );
        let mut torn = b.clone();
        torn[512..].copy_from_slice(&old[512..]);
        if let Ok(h) = FrameHeader::decode(&torn) {
            assert_eq!(h.pos, LogPos(1 << 30), "a torn header decoded as the new frame");
        }
        assert!(matches!(FrameHeader::decode(&b[..100]), Err(FrameError::Truncated(100))));
        assert!(matches!(FrameHeader::decode(&[0u8; BLOCK_SIZE]), Err(FrameError::BadMagic(0))));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for _ in 0..5_000 {
            let mut b: Vec<u8> = (0..BLOCK_SIZE).map(|_| rng.gen()).collect();
            b[..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
            let n = rng.gen_range(0..70usize);
            b[8..10].copy_from_slice(&(n as u16).to_le_bytes());
            if n <= FRAME_ENTRIES_MAX {
                let crc = frame_crc(&b, n);
                b[60..64].copy_from_slice(&crc.to_le_bytes());
            }
            let _ = FrameHeader::decode(&b);
        }
    }
}
