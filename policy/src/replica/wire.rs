//! Replica wire formats: what a source writes into a replica's registered region, and what the
//! replica writes back into the source's.
//!
//! The replica's region for one (volume, source) link:
//! ```text
//! | publication block (64 B, the source's destaged watermark) | pad to 4 KiB | record ring (ring_bytes) |
//! ```
//! Records are appended to the ring at 64-byte aligned positions, each with one RDMA WRITE WITH
//! IMMEDIATE whose immediate is the record's ring offset / 64. A record that does not fit before
//! the ring's end starts at the next lap instead. Positions are absolute byte counts (like the
//! log's), so a record left over from an earlier lap never passes for the current one.
//!
//! Record (little endian):
//! ```text
//!  0 magic u32 "STRR" | 4 version u8 | 5 reserved u8 | 6 count u16 | 8 volume u32 | 12 len u32
//! 16 epoch u64 | 24 pos u64 (absolute ring position) | 32 record u64 (1, 2, ... per link session)
//! 40 first_seq u64 | 48 reserved (12 bytes) | 60 crc u32 (crc32c of bytes 0..60 and the entry headers)
//! 64 count entry headers (64 bytes each, exactly as in the source's log: `log::entry`)
//!    then each entry's data, back to back; the record is padded to a multiple of 64 bytes
//! ```
//! Each entry's data is checked by its own `data_crc`, so the record's checksum covers only the
//! headers and a 4 KiB write costs 4096 + 128 bytes on the fabric.
//!
//! The source's region for the link holds one acknowledgement block, rewritten in place by the
//! replica with WRITE WITH IMMEDIATE ([`ACK_IMM`]); the publication block is rewritten by the
//! source with [`PUBLISH_IMM`]. Both carry a counter, so the newest wins even if the reader copies
//! a block while the next write lands (the checksum then fails and the next immediate follows).
//!
//! Every decoder here is a pure function over bytes a peer controls: it never panics, and the
//! fuzzer (`fuzz_targets/replica_frame.rs`) holds it to that.

use crate::constants::WRITE_BLOCKS_MAX;
use crate::log::entry::ENTRY_HEADER_LEN;
use crate::log::{EntryError, EntryHeader};
use crate::types::{Epoch, LogSeq, VolumeId};

pub const RECORD_MAGIC: u32 = 0x5252_5453; // "STRR"
pub const ACK_MAGIC: u32 = 0x4152_5453; // "STRA"
pub const PUBLISH_MAGIC: u32 = 0x5052_5453; // "STRP"
pub const WIRE_VERSION: u8 = 1;
pub const RECORD_HEADER_LEN: usize = 64;
pub const BLOCK_LEN: usize = 64;
/// Records are aligned to this (and the immediate counts in it).
pub const RECORD_ALIGN: u64 = 64;
/// Where the record ring starts in the replica's region (after the publication block).
pub const RING_OFFSET: u64 = 4096;
/// Entries one record holds at most (a source frame holds at most this many).
pub const RECORD_ENTRIES_MAX: usize = 64;
/// Immediate of an acknowledgement write (replica → source).
pub const ACK_IMM: u32 = u32::MAX - 1;
/// Immediate of a watermark publication (source → replica).
pub const PUBLISH_IMM: u32 = u32::MAX;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("truncated: need {need} bytes, have {got}")]
    Truncated { need: usize, got: usize },
    #[error("bad magic {0:#x}")]
    BadMagic(u32),
    #[error("unsupported wire version {0}")]
    BadVersion(u8),
    #[error("checksum mismatch")]
    BadCrc,
    #[error("record of {count} entries and {len} bytes is malformed: {why}")]
    BadShape { count: u16, len: u32, why: &'static str },
    #[error("entry {index}: {error}")]
    BadEntry { index: usize, error: EntryError },
}

/// The fixed part of a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub count: u16,
    pub volume: VolumeId,
    /// Whole record, header and padding included.
    pub len: u32,
    pub epoch: Epoch,
    pub pos: u64,
    pub record: u64,
    pub first_seq: LogSeq,
}

/// Bytes a record of these entries takes in the ring (padded to [`RECORD_ALIGN`]).
pub fn record_len(entries: &[EntryHeader]) -> u64 {
    let raw = RECORD_HEADER_LEN as u64
        + (entries.len() * ENTRY_HEADER_LEN) as u64
        + entries.iter().map(|e| e.data_bytes()).sum::<u64>();
    raw.div_ceil(RECORD_ALIGN) * RECORD_ALIGN
}

/// Encodes a record's header and entry headers (the data follows them on the wire, then
/// `record_len - (64 + 64 n + data)` bytes of padding). `out` is cleared first.
pub fn encode_record_head(h: &RecordHeader, entries: &[EntryHeader], out: &mut Vec<u8>) {
    out.clear();
    out.resize(RECORD_HEADER_LEN + entries.len() * ENTRY_HEADER_LEN, 0);
    out[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    out[4] = WIRE_VERSION;
    out[6..8].copy_from_slice(&h.count.to_le_bytes());
    out[8..12].copy_from_slice(&h.volume.0.to_le_bytes());
    out[12..16].copy_from_slice(&h.len.to_le_bytes());
    out[16..24].copy_from_slice(&h.epoch.0.to_le_bytes());
    out[24..32].copy_from_slice(&h.pos.to_le_bytes());
    out[32..40].copy_from_slice(&h.record.to_le_bytes());
    out[40..48].copy_from_slice(&h.first_seq.0.to_le_bytes());
    for (i, e) in entries.iter().enumerate() {
        let o = RECORD_HEADER_LEN + i * ENTRY_HEADER_LEN;
        e.encode(&mut out[o..o + ENTRY_HEADER_LEN]);
    }
    let crc = record_crc(out);
    out[60..64].copy_from_slice(&crc.to_le_bytes());
}

/// crc32c of the header's first 60 bytes and the entry headers.
fn record_crc(head: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&head[..60]);
    crc32c::crc32c_append(crc, &head[RECORD_HEADER_LEN..])
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(x)
}

/// Decodes the first 64 bytes of a record (before its entry headers are read). Checks only the
/// shape; [`decode_record_entries`] checks the checksum once the headers are in.
pub fn decode_record_header(b: &[u8]) -> Result<RecordHeader, WireError> {
    if b.len() < RECORD_HEADER_LEN {
        return Err(WireError::Truncated { need: RECORD_HEADER_LEN, got: b.len() });
    }
    let magic = u32_at(b, 0);
    if magic != RECORD_MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    if b[4] != WIRE_VERSION {
        return Err(WireError::BadVersion(b[4]));
    }
    let h = RecordHeader {
        count: u16::from_le_bytes([b[6], b[7]]),
        volume: VolumeId(u32_at(b, 8)),
        len: u32_at(b, 12),
        epoch: Epoch(u64_at(b, 16)),
        pos: u64_at(b, 24),
        record: u64_at(b, 32),
        first_seq: LogSeq(u64_at(b, 40)),
    };
    let bad = |why| Err(WireError::BadShape { count: h.count, len: h.len, why });
    if h.count == 0 || h.count as usize > RECORD_ENTRIES_MAX {
        return bad("entry count out of range");
    }
    let least = (RECORD_HEADER_LEN + h.count as usize * ENTRY_HEADER_LEN) as u64;
    let most = least + h.count as u64 * WRITE_BLOCKS_MAX as u64 * crate::constants::BLOCK_SIZE_U64 + RECORD_ALIGN;
    if (h.len as u64) < least || h.len as u64 > most || !(h.len as u64).is_multiple_of(RECORD_ALIGN) {
        return bad("length does not fit the entries");
    }
    if !h.pos.is_multiple_of(RECORD_ALIGN) {
        return bad("position not aligned");
    }
    if h.first_seq.0 == 0 || h.first_seq.0.checked_add(h.count as u64).is_none() {
        return bad("sequence numbers out of range");
    }
    Ok(h)
}

/// Bytes of the header and entry headers of a record (what must be read before the data).
pub fn record_head_len(h: &RecordHeader) -> usize {
    RECORD_HEADER_LEN + h.count as usize * ENTRY_HEADER_LEN
}

/// Checks the checksum and decodes the entry headers of a record whose first
/// [`record_head_len`] bytes are `head`: each must belong to the record's volume and epoch,
/// carry consecutive sequence numbers from `first_seq`, and the data must fill the record.
pub fn decode_record_entries(h: &RecordHeader, head: &[u8]) -> Result<Vec<EntryHeader>, WireError> {
    let need = record_head_len(h);
    if head.len() < need {
        return Err(WireError::Truncated { need, got: head.len() });
    }
    let head = &head[..need];
    if record_crc(head) != u32_at(head, 60) {
        return Err(WireError::BadCrc);
    }
    let mut entries = Vec::with_capacity(h.count as usize);
    let mut data = 0u64;
    for i in 0..h.count as usize {
        let o = RECORD_HEADER_LEN + i * ENTRY_HEADER_LEN;
        let e = EntryHeader::decode(&head[o..o + ENTRY_HEADER_LEN])
            .map_err(|error| WireError::BadEntry { index: i, error })?;
        let bad = |why| WireError::BadShape { count: h.count, len: h.len, why };
        if e.volume != h.volume {
            return Err(bad("an entry of another volume"));
        }
        if e.epoch != h.epoch {
            return Err(bad("an entry of another epoch"));
        }
        if e.seq.0 != h.first_seq.0 + i as u64 {
            return Err(bad("entry sequence numbers not consecutive"));
        }
        data += e.data_bytes();
        entries.push(e);
    }
    if record_len(&entries) != h.len as u64 {
        return Err(WireError::BadShape { count: h.count, len: h.len, why: "length differs from the entries'" });
    }
    let _ = data;
    Ok(entries)
}

/// What a replica tells its source (rewritten in place in the source's region).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Ack {
    pub volume: VolumeId,
    pub epoch: Epoch,
    /// Every entry up to here is durable in the replica's log.
    pub durable: LogSeq,
    /// The source may reuse ring space up to this absolute position.
    pub consumed: u64,
    /// The source's watermark the replica has persisted (its copy holds nothing older).
    pub watermark: LogSeq,
    /// Grows with every acknowledgement.
    pub counter: u64,
}

/// The source's destaged watermark for the replica (rewritten in place in the replica's region).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Publish {
    pub volume: VolumeId,
    pub epoch: Epoch,
    pub watermark: LogSeq,
    /// The source waits on it (a write-through write over once-dirty blocks): persist it now.
    pub urgent: bool,
    pub counter: u64,
}

fn seal(b: &mut [u8; BLOCK_LEN], magic: u32) {
    b[0..4].copy_from_slice(&magic.to_le_bytes());
    b[4] = WIRE_VERSION;
    let crc = crc32c::crc32c(&b[..60]);
    b[60..64].copy_from_slice(&crc.to_le_bytes());
}

fn open(b: &[u8], magic: u32) -> Result<&[u8], WireError> {
    if b.len() < BLOCK_LEN {
        return Err(WireError::Truncated { need: BLOCK_LEN, got: b.len() });
    }
    let m = u32_at(b, 0);
    if m != magic {
        return Err(WireError::BadMagic(m));
    }
    if b[4] != WIRE_VERSION {
        return Err(WireError::BadVersion(b[4]));
    }
    if crc32c::crc32c(&b[..60]) != u32_at(b, 60) {
        return Err(WireError::BadCrc);
    }
    Ok(&b[..BLOCK_LEN])
}

impl Ack {
    pub fn encode(&self) -> [u8; BLOCK_LEN] {
        let mut b = [0u8; BLOCK_LEN];
        b[8..12].copy_from_slice(&self.volume.0.to_le_bytes());
        b[16..24].copy_from_slice(&self.epoch.0.to_le_bytes());
        b[24..32].copy_from_slice(&self.durable.0.to_le_bytes());
        b[32..40].copy_from_slice(&self.consumed.to_le_bytes());
        b[40..48].copy_from_slice(&self.watermark.0.to_le_bytes());
        b[48..56].copy_from_slice(&self.counter.to_le_bytes());
        seal(&mut b, ACK_MAGIC);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Ack, WireError> {
        let b = open(b, ACK_MAGIC)?;
        Ok(Ack {
            volume: VolumeId(u32_at(b, 8)),
            epoch: Epoch(u64_at(b, 16)),
            durable: LogSeq(u64_at(b, 24)),
            consumed: u64_at(b, 32),
            watermark: LogSeq(u64_at(b, 40)),
            counter: u64_at(b, 48),
        })
    }
}

impl Publish {
    pub fn encode(&self) -> [u8; BLOCK_LEN] {
        let mut b = [0u8; BLOCK_LEN];
        b[5] = self.urgent as u8;
        b[8..12].copy_from_slice(&self.volume.0.to_le_bytes());
        b[16..24].copy_from_slice(&self.epoch.0.to_le_bytes());
        b[24..32].copy_from_slice(&self.watermark.0.to_le_bytes());
        b[32..40].copy_from_slice(&self.counter.to_le_bytes());
        seal(&mut b, PUBLISH_MAGIC);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Publish, WireError> {
        let b = open(b, PUBLISH_MAGIC)?;
        Ok(Publish {
            urgent: b[5] & 1 != 0,
            volume: VolumeId(u32_at(b, 8)),
            epoch: Epoch(u64_at(b, 16)),
            watermark: LogSeq(u64_at(b, 24)),
            counter: u64_at(b, 32),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::EntryKind;
    use crate::types::Lba;

    fn entry(seq: u64, kind: EntryKind, blocks: u32) -> EntryHeader {
        EntryHeader {
            kind,
            volume: VolumeId(7),
            epoch: Epoch(3),
            seq: LogSeq(seq),
            lba: Lba(seq * 8),
            blocks,
            data_crc: 0xabcd,
        }
    }

    fn record(entries: &[EntryHeader]) -> (RecordHeader, Vec<u8>) {
        let h = RecordHeader {
            count: entries.len() as u16,
            volume: VolumeId(7),
            len: record_len(entries) as u32,
            epoch: Epoch(3),
            pos: 4096 * 5,
            record: 9,
            first_seq: entries[0].seq,
        };
        let mut out = Vec::new();
        encode_record_head(&h, entries, &mut out);
        (h, out)
    }

    #[test]
    fn a_record_round_trips_and_costs_128_bytes_over_a_4k_write() {
        let entries =
            [entry(10, EntryKind::Write, 1), entry(11, EntryKind::Zeroes, 64), entry(12, EntryKind::Write, 2)];
        let (h, head) = record(&entries);
        assert_eq!(decode_record_header(&head).unwrap(), h);
        assert_eq!(decode_record_entries(&h, &head).unwrap(), entries.to_vec());
        assert_eq!(record_len(&entries[..1]), 4096 + 128);
        assert_eq!(record_len(&entries), 64 + 3 * 64 + 3 * 4096);
    }

    #[test]
    fn every_flipped_bit_of_the_head_is_caught() {
        let entries = [entry(10, EntryKind::Write, 1), entry(11, EntryKind::Write, 1)];
        let (_, head) = record(&entries);
        for i in 0..head.len() {
            for bit in [0x01u8, 0x80] {
                let mut b = head.clone();
                b[i] ^= bit;
                let r = decode_record_header(&b).and_then(|h| decode_record_entries(&h, &b));
                assert!(r.is_err(), "flip of bit {bit:#x} at byte {i} went unnoticed");
            }
        }
    }

    #[test]
    fn gaps_other_volumes_and_epochs_are_refused() {
        let mut gap = [entry(10, EntryKind::Write, 1), entry(12, EntryKind::Write, 1)];
        let (h, head) = record(&gap);
        assert!(matches!(decode_record_entries(&h, &head), Err(WireError::BadShape { .. })));
        gap[1].seq = LogSeq(11);
        gap[1].volume = VolumeId(8);
        let (h, head) = record(&gap);
        assert!(matches!(decode_record_entries(&h, &head), Err(WireError::BadShape { .. })));
        gap[1].volume = VolumeId(7);
        gap[1].epoch = Epoch(2);
        let (h, head) = record(&gap);
        assert!(matches!(decode_record_entries(&h, &head), Err(WireError::BadShape { .. })));
    }

    #[test]
    fn acks_and_publications_round_trip_and_reject_damage() {
        let a = Ack {
            volume: VolumeId(3),
            epoch: Epoch(4),
            durable: LogSeq(99),
            consumed: 1 << 20,
            watermark: LogSeq(50),
            counter: 7,
        };
        assert_eq!(Ack::decode(&a.encode()).unwrap(), a);
        let p = Publish { volume: VolumeId(3), epoch: Epoch(4), watermark: LogSeq(77), urgent: true, counter: 2 };
        assert_eq!(Publish::decode(&p.encode()).unwrap(), p);
        let mut b = a.encode();
        b[30] ^= 1;
        assert_eq!(Ack::decode(&b), Err(WireError::BadCrc));
        assert!(matches!(Publish::decode(&a.encode()), Err(WireError::BadMagic(_))));
        assert!(matches!(Ack::decode(&[0u8; 10]), Err(WireError::Truncated { .. })));
    }

    /// The fuzzer's seeds are written from the documented layout by fuzz/seeds/generate.py,
    /// independently of this encoder: they must decode, or the layout changed.
    #[test]
    fn the_fuzz_seeds_written_from_the_documented_layout_decode() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/replica_frame");
        let read = |n: &str| std::fs::read(dir.join(n)).unwrap_or_else(|e| panic!("seed {n}: {e}"));
        for name in ["record_one_write", "record_write_zeroes_unmap"] {
            let b = read(name);
            let h = decode_record_header(&b).unwrap_or_else(|e| panic!("{name}: {e}"));
            let entries = decode_record_entries(&h, &b).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(record_len(&entries), h.len as u64, "{name}");
        }
        let b = read("record_gap");
        let h = decode_record_header(&b).unwrap();
        assert!(decode_record_entries(&h, &b).is_err(), "a gap in sequence numbers is refused");
        assert_eq!(Ack::decode(&read("ack")).unwrap().durable, LogSeq(13));
        assert!(Publish::decode(&read("publish")).unwrap().urgent);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for _ in 0..20_000 {
            let n = rng.gen_range(0..600);
            let mut b: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
            if b.len() >= 8 {
                b[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
                b[4] = WIRE_VERSION;
                b[6] = rng.gen_range(0..4);
                b[7] = 0;
            }
            if let Ok(h) = decode_record_header(&b) {
                let _ = decode_record_entries(&h, &b);
            }
            let _ = Ack::decode(&b);
            let _ = Publish::decode(&b);
        }
    }
}
