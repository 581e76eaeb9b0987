//! The replica end of a link: reads and checks each record a source wrote into this node's
//! ring before any of it is used.
//!
//! A record is taken only if it is exactly the next one: at the position that follows the last
//! record (or at the next lap when it would not fit before the ring's end), with the next record
//! number, this link's volume and epoch, sequence numbers that continue the copy, a good
//! checksum over its headers and a good checksum over each entry's data. Anything else is a
//! refusal: the link is dropped with a log line and nothing of the record is applied.

use super::wire::{
    decode_record_entries, decode_record_header, record_head_len, Ack, Publish, RECORD_ALIGN, RECORD_HEADER_LEN,
    RING_OFFSET,
};
use crate::io::{AlignedBuf, BufPool, Fabric};
use crate::log::EntryHeader;
use crate::types::{Epoch, LinkId, LogSeq, VolumeId};

pub(crate) struct Inbound {
    pub link: LinkId,
    pub peer: String,
    pub volume: VolumeId,
    pub epoch: Epoch,
    pub ring_bytes: u64,
    next_pos: u64,
    next_record: u64,
    /// Sequence number the next entry must carry; before the first record, the first entry
    /// must be above `floor` (the copy's newest entry when the link opened).
    next_seq: Option<LogSeq>,
    floor: LogSeq,
    /// Ring bytes taken out (the source may reuse them once told).
    pub consumed: u64,
    /// Every entry up to here is durable in this node's log.
    pub durable: LogSeq,
    publish_counter: u64,
    ack_counter: u64,
    /// What the last acknowledgement said: (durable, consumed, watermark).
    acked: (LogSeq, u64, LogSeq),
    pub records: u64,
    pub bytes: u64,
}

/// A record's entries with their data (in buffers from the pool).
pub(crate) type Taken = Vec<(EntryHeader, Option<AlignedBuf>)>;

impl Inbound {
    pub fn new(link: LinkId, peer: &str, volume: VolumeId, epoch: Epoch, ring_bytes: u64, floor: LogSeq) -> Inbound {
        Inbound {
            link,
            peer: peer.to_string(),
            volume,
            epoch,
            ring_bytes,
            next_pos: 0,
            next_record: 1,
            next_seq: None,
            floor,
            consumed: 0,
            durable: floor,
            publish_counter: 0,
            ack_counter: 0,
            acked: (LogSeq(0), 0, LogSeq(0)),
            records: 0,
            bytes: 0,
        }
    }

    /// Takes the record the immediate `imm` names (`len` bytes written). Err: refused, why.
    pub fn take(&mut self, fabric: &dyn Fabric, imm: u32, len: u32, pool: &mut BufPool) -> Result<Taken, String> {
        let off = imm as u64 * RECORD_ALIGN;
        if off >= self.ring_bytes {
            return Err(format!("record at ring offset {off}, outside the {}-byte ring", self.ring_bytes));
        }
        let read = |at: u64, out: &mut [u8]| fabric.read(self.link, RING_OFFSET + at, out).map_err(|e| e.to_string());
        let mut head = vec![0u8; RECORD_HEADER_LEN];
        let room = self.ring_bytes - off;
        if room < RECORD_HEADER_LEN as u64 {
            return Err(format!("record at ring offset {off} leaves no room for its header"));
        }
        read(off, &mut head)?;
        let h = decode_record_header(&head).map_err(|e| format!("record at ring offset {off}: {e}"))?;
        // Where this record must be: right after the last one, or at the next lap if it does
        // not fit before the ring's end.
        let at = self.next_pos % self.ring_bytes;
        let expected =
            if at + h.len as u64 > self.ring_bytes { self.next_pos + self.ring_bytes - at } else { self.next_pos };
        if h.pos != expected || expected % self.ring_bytes != off {
            return Err(format!("record at position {} (offset {off}), expected position {expected}", h.pos));
        }
        if len != 0 && len != h.len {
            return Err(format!("record of {} bytes written with {len} bytes", h.len));
        }
        if h.record != self.next_record {
            return Err(format!("record {} where record {} was expected", h.record, self.next_record));
        }
        if h.volume != self.volume {
            return Err(format!("record of {}, the link carries {}", h.volume, self.volume));
        }
        if h.epoch != self.epoch {
            return Err(format!("record of {}, the link is at {}", h.epoch, self.epoch));
        }
        match self.next_seq {
            Some(next) if h.first_seq != next => {
                return Err(format!("record starts at {} where {} was expected (a gap)", h.first_seq, next))
            }
            None if h.first_seq <= self.floor => {
                return Err(format!("first record starts at {}, not after the copy's {}", h.first_seq, self.floor))
            }
            _ => {}
        }
        let head_len = record_head_len(&h);
        let mut head = vec![0u8; head_len];
        read(off, &mut head)?;
        let entries = decode_record_entries(&h, &head).map_err(|e| format!("record {}: {e}", h.record))?;
        let mut out = Vec::with_capacity(entries.len());
        let mut at = off + head_len as u64;
        for e in entries {
            let n = e.data_bytes() as usize;
            let data = if n > 0 {
                let mut buf = pool.get(n);
                if let Err(why) = read(at, &mut buf) {
                    pool.put(buf);
                    return Err(why);
                }
                at += n as u64;
                if let Err(err) = e.verify_data(&buf) {
                    pool.put(buf);
                    for (_, b) in out {
                        if let Some(b) = b {
                            pool.put(b);
                        }
                    }
                    return Err(format!("record {} entry {}: {err}", h.record, e.seq));
                }
                Some(buf)
            } else {
                None
            };
            out.push((e, data));
        }
        self.next_pos = h.pos + h.len as u64;
        self.consumed = self.next_pos;
        self.next_record += 1;
        self.next_seq = Some(LogSeq(h.first_seq.0 + h.count as u64));
        self.records += 1;
        self.bytes += h.len as u64;
        Ok(out)
    }

    /// Reads the publication block after its immediate; None if it is not newer.
    pub fn publication(&mut self, fabric: &dyn Fabric) -> Result<Option<Publish>, String> {
        let mut b = [0u8; super::wire::BLOCK_LEN];
        fabric.read(self.link, 0, &mut b).map_err(|e| e.to_string())?;
        let p = match Publish::decode(&b) {
            Ok(p) => p,
            // Being rewritten while copied: the next immediate brings it whole.
            Err(super::wire::WireError::BadCrc) => return Ok(None),
            Err(e) => return Err(format!("publication: {e}")),
        };
        if p.volume != self.volume || p.epoch != self.epoch {
            return Err(format!(
                "publication for {} {}, the link carries {} {}",
                p.volume, p.epoch, self.volume, self.epoch
            ));
        }
        if p.counter <= self.publish_counter {
            return Ok(None);
        }
        self.publish_counter = p.counter;
        Ok(Some(p))
    }

    /// The acknowledgement to send if the durable point or the persisted watermark moved (or
    /// a quarter of the ring was consumed since the last one: the source may be waiting for room).
    pub fn ack_due(&mut self, watermark: LogSeq) -> Option<Ack> {
        let now = (self.durable, self.consumed, watermark);
        let room = self.consumed - self.acked.1 >= self.ring_bytes / 4;
        if (now.0, now.2) == (self.acked.0, self.acked.2) && !room {
            return None;
        }
        self.acked = now;
        self.ack_counter += 1;
        Some(Ack {
            volume: self.volume,
            epoch: self.epoch,
            durable: self.durable,
            consumed: self.consumed,
            watermark,
            counter: self.ack_counter,
        })
    }

    /// The last acknowledgement could not be sent: send it again next time.
    pub fn ack_failed(&mut self) {
        self.acked = (LogSeq(0), 0, LogSeq(0));
    }
}
