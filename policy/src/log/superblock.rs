//! Superblock wire format: what a flash device holds and how far each volume is destaged.
//!
//! It names the device, the layout (so a resized or foreign device is refused), the volumes on
//! the device with their epochs, persisted destage watermarks and destage intents, and the log
//! tail (the oldest position replay must start from). Two copies live in the first two blocks;
//! generation `g` is written to copy `g % 2`, so a torn write damages only the copy being
//! replaced and the other still holds the previous generation. Recovery takes the valid copy
//! with the higher generation.
//!
//! Why a destage *intent*: before the destager writes batch (watermark, intent] to the SAN it
//! persists the intent. After a crash in the middle of that batch, the SAN holds a torn mix of
//! it; the first batch after recovery then covers at least up to the intent, so the next
//! completed batch leaves the SAN at a log prefix again (invariant 4). The destager asks for
//! the next batch's intent while the current batch is still on its way to the SAN, so the
//! superblock write it costs overlaps SAN work instead of adding to it.
//!
//! Version 2 goes with the frame log format (`frame.rs`); a device of version 1 (4 KiB header
//! per entry) is refused with a message rather than misread.
//!
//! Layout (little endian, one 4 KiB block):
//! ```text
//!  0 magic u64 | 8 version u32 | 12 volume_count u32 | 16 device_id u64 | 24 generation u64
//! 32 incarnation u64 | 40 log_tail u64 | 48 log_start u64 | 56 log_bytes u64
//! 64 cache_start u64 | 72 cache_slots u64 | 80 incarnation_start u64
//! 88 volumes[volume_count] (40 bytes each:
//!    id u32, flags u8 (bit 0: a replica copy), source u8 (its index in the node table),
//!    reserved u16, epoch u64, blocks u64, watermark u64, intent u64)
//! 2648 nodes[8] (32 bytes each: name length u8, name bytes): the source nodes of replica copies
//! 2904 lost_count u16, 2906 reserved u16, 2908 lost[lost_count] (16 bytes each: volume u32,
//!      blocks u32, lba u64): blocks whose acknowledged data a damaged log lost
//! 4092 crc32c of bytes 0..4092
//! ```
//!
//! A *replica copy* is a volume whose entries another node (its source) sent this node to hold
//! (write-back+1/+2): its watermark is the one the source published, its epoch the newest the
//! source presented. Replay rebuilds it like any volume, so `stagerctl flash destage` can take a
//! replica's copy to the volume's SAN when the source is lost.

use crate::constants::{BLOCK_SIZE, VOLUMES_PER_DEVICE_MAX};
use crate::types::{Epoch, Incarnation, LogPos, LogSeq, VolumeId};

pub const SUPERBLOCK_MAGIC: u64 = 0x4253_5245_4741_5453; // "STAGERSB"
pub const SUPERBLOCK_VERSION: u32 = 2;
const VOLUMES_AT: usize = 88;
const VOLUME_LEN: usize = 40;
const CRC_AT: usize = BLOCK_SIZE - 4;
const NODES_AT: usize = VOLUMES_AT + VOLUMES_PER_DEVICE_MAX * VOLUME_LEN;
/// Source nodes a device can hold replica copies for.
pub const NODES_MAX: usize = 8;
const NODE_LEN: usize = 32;
/// Longest node name (bytes).
pub const NODE_NAME_MAX: usize = NODE_LEN - 1;
const FLAG_REPLICA: u8 = 1;
const LOST_AT: usize = NODES_AT + NODES_MAX * NODE_LEN;
const LOST_LEN: usize = 16;
/// Lost block ranges the superblock can record (over all volumes of the device).
pub const LOST_MAX: usize = (CRC_AT - LOST_AT - 4) / LOST_LEN;
const _: () = assert!(NODES_AT + NODES_MAX * NODE_LEN <= CRC_AT);
const _: () = assert!(LOST_MAX >= 64);

/// Blocks of a volume whose newest acknowledged data was in a damaged part of the log: reads of
/// them fail (Unrecovered Read Error) until they are written again or an operator accepts the
/// loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LostRange {
    pub volume: VolumeId,
    pub lba: crate::types::Lba,
    pub blocks: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SuperblockVolume {
    pub id: VolumeId,
    pub epoch: Epoch,
    pub blocks: u64,
    /// Every entry of this volume with a sequence number up to here is on the SAN (flushed).
    pub watermark: LogSeq,
    /// The destager may have started writing entries up to here to the SAN.
    pub intent: LogSeq,
    /// For a replica copy: the node it is a copy for.
    pub source: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub device_id: u64,
    pub generation: u64,
    /// Bumped at every recovery; frames carry the incarnation they were written in.
    pub incarnation: Incarnation,
    /// Absolute log position replay starts from; everything before it is reclaimed.
    pub log_tail: LogPos,
    /// Where this incarnation's entries begin (the head its recovery found). Entries at or
    /// after it must carry this incarnation, entries before it an older one: an entry of an
    /// older incarnation beyond this point was dropped by that recovery, even if the tail has
    /// since moved past every entry written after it.
    pub incarnation_start: LogPos,
    pub log_start: u64,
    pub log_bytes: u64,
    pub cache_start: u64,
    pub cache_slots: u64,
    pub volumes: Vec<SuperblockVolume>,
    /// At most [`LOST_MAX`] ranges.
    pub lost: Vec<LostRange>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SuperblockError {
    #[error("superblock truncated: need {need} bytes, have {got}")]
    Truncated { need: usize, got: usize },
    #[error("no superblock (bad magic)")]
    BadMagic,
    #[error("superblock version {0}, this Stager reads version 2 (version 1 is the log format of the first Stager builds: destage the device with that build's stagerctl, then wipe it)")]
    BadVersion(u32),
    #[error("superblock checksum mismatch")]
    BadCrc,
    #[error("superblock names {0} volumes, more than a device can hold")]
    TooManyVolumes(u32),
    #[error("superblock's replica copy names node #{0}, which its node table does not hold")]
    BadNode(u8),
    #[error("superblock lists {0} lost ranges, more than it can hold")]
    TooManyLost(usize),
}

impl Superblock {
    /// Which of the two copies this generation is written to (byte offset on the device).
    pub fn copy_offset(generation: u64) -> u64 {
        (generation % crate::constants::SUPERBLOCK_COPIES) * BLOCK_SIZE as u64
    }

    pub fn volume(&self, id: VolumeId) -> Option<&SuperblockVolume> {
        self.volumes.iter().find(|v| v.id == id)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK_SIZE];
        self.encode_into(&mut b);
        b
    }

    /// Encodes into the first block of `out` (an I/O buffer from the engine's pool).
    pub fn encode_into(&self, out: &mut [u8]) {
        assert!(self.volumes.len() <= VOLUMES_PER_DEVICE_MAX);
        let mut nodes: Vec<&str> = Vec::new();
        for v in &self.volumes {
            if let Some(s) = v.source.as_deref() {
                assert!(s.len() <= NODE_NAME_MAX, "superblock: node name {s:?} too long");
                if !nodes.contains(&s) {
                    nodes.push(s);
                }
            }
        }
        assert!(nodes.len() <= NODES_MAX, "superblock: replica copies of more than {NODES_MAX} nodes");
        let b = &mut out[..BLOCK_SIZE];
        b.fill(0);
        b[0..8].copy_from_slice(&SUPERBLOCK_MAGIC.to_le_bytes());
        b[8..12].copy_from_slice(&SUPERBLOCK_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(self.volumes.len() as u32).to_le_bytes());
        let fields = [
            self.device_id,
            self.generation,
            self.incarnation.0,
            self.log_tail.0,
            self.log_start,
            self.log_bytes,
            self.cache_start,
            self.cache_slots,
            self.incarnation_start.0,
        ];
        for (i, f) in fields.iter().enumerate() {
            b[16 + i * 8..24 + i * 8].copy_from_slice(&f.to_le_bytes());
        }
        for (i, v) in self.volumes.iter().enumerate() {
            let o = VOLUMES_AT + i * VOLUME_LEN;
            b[o..o + 4].copy_from_slice(&v.id.0.to_le_bytes());
            if let Some(s) = v.source.as_deref() {
                b[o + 4] = FLAG_REPLICA;
                b[o + 5] = nodes.iter().position(|n| *n == s).unwrap_or(0) as u8;
            }
            b[o + 8..o + 16].copy_from_slice(&v.epoch.0.to_le_bytes());
            b[o + 16..o + 24].copy_from_slice(&v.blocks.to_le_bytes());
            b[o + 24..o + 32].copy_from_slice(&v.watermark.0.to_le_bytes());
            b[o + 32..o + 40].copy_from_slice(&v.intent.0.to_le_bytes());
        }
        for (i, n) in nodes.iter().enumerate() {
            let o = NODES_AT + i * NODE_LEN;
            b[o] = n.len() as u8;
            b[o + 1..o + 1 + n.len()].copy_from_slice(n.as_bytes());
        }
        assert!(self.lost.len() <= LOST_MAX, "superblock: {} lost ranges", self.lost.len());
        b[LOST_AT..LOST_AT + 2].copy_from_slice(&(self.lost.len() as u16).to_le_bytes());
        for (i, l) in self.lost.iter().enumerate() {
            let o = LOST_AT + 4 + i * LOST_LEN;
            b[o..o + 4].copy_from_slice(&l.volume.0.to_le_bytes());
            b[o + 4..o + 8].copy_from_slice(&l.blocks.to_le_bytes());
            b[o + 8..o + 16].copy_from_slice(&l.lba.0.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes and checks one copy. Never panics on arbitrary input.
    pub fn decode(buf: &[u8]) -> Result<Superblock, SuperblockError> {
        if buf.len() < BLOCK_SIZE {
            return Err(SuperblockError::Truncated { need: BLOCK_SIZE, got: buf.len() });
        }
        let u32_at = |o: usize| u32::from_le_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[o..o + 8]);
            u64::from_le_bytes(b)
        };
        if u64_at(0) != SUPERBLOCK_MAGIC {
            return Err(SuperblockError::BadMagic);
        }
        if crc32c::crc32c(&buf[..CRC_AT]) != u32_at(CRC_AT) {
            return Err(SuperblockError::BadCrc);
        }
        if u32_at(8) != SUPERBLOCK_VERSION {
            return Err(SuperblockError::BadVersion(u32_at(8)));
        }
        let count = u32_at(12);
        if count as usize > VOLUMES_PER_DEVICE_MAX {
            return Err(SuperblockError::TooManyVolumes(count));
        }
        let node = |i: u8| -> Result<String, SuperblockError> {
            let o = NODES_AT + i as usize * NODE_LEN;
            let len = buf[o] as usize;
            if i as usize >= NODES_MAX || len == 0 || len > NODE_NAME_MAX {
                return Err(SuperblockError::BadNode(i));
            }
            String::from_utf8(buf[o + 1..o + 1 + len].to_vec()).map_err(|_| SuperblockError::BadNode(i))
        };
        let volumes = (0..count as usize)
            .map(|i| {
                let o = VOLUMES_AT + i * VOLUME_LEN;
                let source = if buf[o + 4] & FLAG_REPLICA != 0 { Some(node(buf[o + 5])?) } else { None };
                Ok(SuperblockVolume {
                    id: VolumeId(u32_at(o)),
                    epoch: Epoch(u64_at(o + 8)),
                    blocks: u64_at(o + 16),
                    watermark: LogSeq(u64_at(o + 24)),
                    intent: LogSeq(u64_at(o + 32)),
                    source,
                })
            })
            .collect::<Result<Vec<_>, SuperblockError>>()?;
        let lost_count = u16::from_le_bytes([buf[LOST_AT], buf[LOST_AT + 1]]) as usize;
        if lost_count > LOST_MAX {
            return Err(SuperblockError::TooManyLost(lost_count));
        }
        let lost = (0..lost_count)
            .map(|i| {
                let o = LOST_AT + 4 + i * LOST_LEN;
                LostRange { volume: VolumeId(u32_at(o)), blocks: u32_at(o + 4), lba: crate::types::Lba(u64_at(o + 8)) }
            })
            .collect();
        Ok(Superblock {
            device_id: u64_at(16),
            generation: u64_at(24),
            incarnation: Incarnation(u64_at(32)),
            log_tail: LogPos(u64_at(40)),
            log_start: u64_at(48),
            log_bytes: u64_at(56),
            cache_start: u64_at(64),
            cache_slots: u64_at(72),
            incarnation_start: LogPos(u64_at(80)),
            volumes,
            lost,
        })
    }

    /// Picks the newest valid of the two copies.
    pub fn choose(copy0: &[u8], copy1: &[u8]) -> Result<Superblock, SuperblockError> {
        match (Superblock::decode(copy0), Superblock::decode(copy1)) {
            (Ok(a), Ok(b)) => Ok(if b.generation > a.generation { b } else { a }),
            (Ok(a), Err(_)) => Ok(a),
            (Err(_), Ok(b)) => Ok(b),
            (Err(e), Err(_)) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn sample(generation: u64) -> Superblock {
        Superblock {
            device_id: 0xfeed,
            generation,
            incarnation: Incarnation(3),
            log_tail: LogPos(77 * 4096),
            log_start: 8192,
            log_bytes: 1 << 20,
            cache_start: 8192 + (1 << 20),
            cache_slots: 100,
            incarnation_start: LogPos(40 * 4096),
            volumes: vec![
                SuperblockVolume {
                    id: VolumeId(1),
                    epoch: Epoch(2),
                    blocks: 64,
                    watermark: LogSeq(9),
                    intent: LogSeq(12),
                    source: None,
                },
                SuperblockVolume {
                    id: VolumeId(5),
                    epoch: Epoch(1),
                    blocks: 128,
                    watermark: LogSeq(0),
                    intent: LogSeq(0),
                    source: Some("node-a".into()),
                },
            ],
            lost: vec![LostRange { volume: VolumeId(1), lba: crate::types::Lba(40), blocks: 3 }],
        }
    }

    #[test]
    fn round_trip() {
        let sb = sample(4);
        assert_eq!(Superblock::decode(&sb.encode()).unwrap(), sb);
        let full = Superblock {
            volumes: (0..VOLUMES_PER_DEVICE_MAX as u32)
                .map(|i| SuperblockVolume {
                    id: VolumeId(i),
                    epoch: Epoch(i as u64),
                    blocks: 1,
                    watermark: LogSeq(2),
                    intent: LogSeq(3),
                    source: (i % 3 == 0).then(|| format!("node-{}-{}", i % 8, "x".repeat(20))),
                })
                .collect(),
            ..sample(1)
        };
        assert_eq!(Superblock::decode(&full.encode()).unwrap(), full);
    }

    #[test]
    fn truncation_and_corruption_are_detected() {
        let bytes = sample(1).encode();
        for len in [0, 8, 100, BLOCK_SIZE - 1] {
            assert!(matches!(Superblock::decode(&bytes[..len]), Err(SuperblockError::Truncated { .. })));
        }
        for i in [0, 9, 20, 85, 200, 4000, 4093] {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(Superblock::decode(&b).is_err(), "flip at {i} undetected");
        }
    }

    #[test]
    fn torn_copy_falls_back_to_the_other() {
        let old = sample(6);
        let new = sample(7);
        let mut torn = new.encode();
        torn[2048..].fill(0);
        assert_eq!(Superblock::choose(&old.encode(), &torn).unwrap(), old);
        assert_eq!(Superblock::choose(&old.encode(), &new.encode()).unwrap(), new);
        assert_eq!(Superblock::choose(&new.encode(), &old.encode()).unwrap(), new);
        assert!(Superblock::choose(&torn, &[0u8; BLOCK_SIZE]).is_err());
        assert_ne!(Superblock::copy_offset(6), Superblock::copy_offset(7));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        for _ in 0..2_000 {
            let mut b: Vec<u8> = (0..BLOCK_SIZE).map(|_| rng.gen()).collect();
            b[..8].copy_from_slice(&SUPERBLOCK_MAGIC.to_le_bytes());
            b[12..16].copy_from_slice(&rng.gen_range(0u32..200).to_le_bytes());
            let crc = crc32c::crc32c(&b[..CRC_AT]);
            b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
            let _ = Superblock::decode(&b);
        }
    }
}
