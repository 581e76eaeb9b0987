//! The source end of a link: the replica's record ring as the source sees it.
//!
//! Ring space: the source writes records at `head` and may run ahead of what the replica has
//! `consumed` by at most the ring's size. A record that does not fit before the ring's end goes
//! to the next lap (the replica checks the same rule). When the ring or the fabric's send queue
//! is full, the record is copied into `backlog` and sent, in order, once there is room: the one
//! case where replication copies a host's data.

use std::collections::VecDeque;

use super::wire::{encode_record_head, record_len, Ack, Publish, RecordHeader, RECORD_ALIGN, RING_OFFSET};
use crate::io::{Fabric, FabricError};
use crate::log::EntryHeader;
use crate::types::{Epoch, LinkId, LogSeq, VolumeId};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncState {
    /// The replica holds every entry the source holds: writes may be acknowledged with it.
    InSync,
    /// The replica lacks entries up to `until`; it counts once they are destaged and the
    /// replica has persisted that watermark (its copy then holds nothing the SAN lacks).
    Syncing { until: LogSeq },
}

/// A record waiting for ring space or the fabric, with its own copy of the data.
struct Backlogged {
    entries: Vec<EntryHeader>,
    data: Vec<u8>,
}

pub(crate) struct Outbound {
    pub link: LinkId,
    pub peer: String,
    pub volume: VolumeId,
    pub epoch: Epoch,
    pub ring_bytes: u64,
    /// Next free absolute ring position.
    head: u64,
    /// The replica took everything before this position out of the ring.
    consumed: u64,
    next_record: u64,
    /// Highest sequence number sent (or backlogged).
    pub sent: LogSeq,
    /// Every entry up to here is durable on the replica.
    pub durable: LogSeq,
    /// The source watermark the replica has persisted.
    pub watermark: LogSeq,
    ack_counter: u64,
    pub sync: SyncState,
    backlog: VecDeque<Backlogged>,
    /// Last watermark published, and whether that publication asked to persist at once.
    pub published: LogSeq,
    pub published_urgent: bool,
    publish_counter: u64,
    scratch: Vec<u8>,
    pub records_sent: u64,
    pub bytes_sent: u64,
    pub backlogged_records: u64,
}

impl Outbound {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        link: LinkId,
        peer: &str,
        volume: VolumeId,
        epoch: Epoch,
        ring_bytes: u64,
        durable: LogSeq,
        watermark: LogSeq,
        sync: SyncState,
    ) -> Outbound {
        Outbound {
            link,
            peer: peer.to_string(),
            volume,
            epoch,
            ring_bytes,
            head: 0,
            consumed: 0,
            next_record: 1,
            sent: durable,
            durable,
            watermark,
            ack_counter: 0,
            sync,
            backlog: VecDeque::new(),
            published: watermark,
            published_urgent: false,
            publish_counter: 0,
            scratch: Vec::new(),
            records_sent: 0,
            bytes_sent: 0,
            backlogged_records: 0,
        }
    }

    /// Where a record of `len` bytes goes, if the replica has consumed enough of the ring.
    fn place(&self, len: u64) -> Option<u64> {
        let mut pos = self.head;
        let off = pos % self.ring_bytes;
        if off + len > self.ring_bytes {
            pos += self.ring_bytes - off;
        }
        (pos + len - self.consumed <= self.ring_bytes).then_some(pos)
    }

    /// Sends the record of `entries` (whose data are `data`, in order) now if the ring and the
    /// fabric have room and nothing waits before it, else keeps a copy. Err: the link is down.
    pub fn send(&mut self, fabric: &mut dyn Fabric, entries: &[EntryHeader], data: &[&[u8]]) -> Result<(), String> {
        if let Some(last) = entries.last() {
            self.sent = self.sent.max(last.seq);
        }
        if self.backlog.is_empty() && self.try_write(fabric, entries, data)? {
            return Ok(());
        }
        let mut copy = Vec::with_capacity(data.iter().map(|d| d.len()).sum());
        for d in data {
            copy.extend_from_slice(d);
        }
        self.backlogged_records += 1;
        self.backlog.push_back(Backlogged { entries: entries.to_vec(), data: copy });
        Ok(())
    }

    /// Sends what waits in the backlog, in order, while there is room. Returns how many went.
    pub fn pump(&mut self, fabric: &mut dyn Fabric) -> Result<usize, String> {
        let mut n = 0;
        while let Some(b) = self.backlog.pop_front() {
            if !self.try_write(fabric, &b.entries, &[&b.data])? {
                self.backlog.push_front(b);
                break;
            }
            n += 1;
        }
        Ok(n)
    }

    fn try_write(&mut self, fabric: &mut dyn Fabric, entries: &[EntryHeader], data: &[&[u8]]) -> Result<bool, String> {
        let len = record_len(entries);
        let Some(pos) = self.place(len) else { return Ok(false) };
        let h = RecordHeader {
            count: entries.len() as u16,
            volume: self.volume,
            len: len as u32,
            epoch: self.epoch,
            pos,
            record: self.next_record,
            first_seq: entries[0].seq,
        };
        let mut head = std::mem::take(&mut self.scratch);
        encode_record_head(&h, entries, &mut head);
        let off = pos % self.ring_bytes;
        let imm = (off / RECORD_ALIGN) as u32;
        let r = {
            let mut src: Vec<&[u8]> = Vec::with_capacity(1 + data.len());
            src.push(&head);
            src.extend_from_slice(data);
            fabric.write(self.link, &src, RING_OFFSET + off, Some(imm))
        };
        self.scratch = head;
        match r {
            Ok(()) => {
                self.head = pos + len;
                self.next_record += 1;
                self.records_sent += 1;
                self.bytes_sent += len;
                Ok(true)
            }
            Err(FabricError::Busy) => Ok(false),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The replica's acknowledgement block changed; returns whether anything moved.
    pub fn on_ack(&mut self, ack: &Ack) -> Result<bool, String> {
        if ack.volume != self.volume || ack.epoch != self.epoch {
            return Err(format!(
                "acknowledgement for {} {}, the link carries {} {}",
                ack.volume, ack.epoch, self.volume, self.epoch
            ));
        }
        if ack.counter <= self.ack_counter {
            return Ok(false);
        }
        if ack.durable > self.sent || ack.consumed > self.head {
            return Err(format!(
                "acknowledgement of {} / ring position {} beyond what was sent ({} / {})",
                ack.durable, ack.consumed, self.sent, self.head
            ));
        }
        self.ack_counter = ack.counter;
        let moved = ack.durable > self.durable || ack.consumed > self.consumed || ack.watermark > self.watermark;
        self.durable = self.durable.max(ack.durable);
        self.consumed = self.consumed.max(ack.consumed);
        self.watermark = self.watermark.max(ack.watermark);
        Ok(moved)
    }

    /// Publishes the source's persisted watermark (one 64-byte write). `urgent`: the source
    /// waits for the replica to persist it.
    pub fn publish(&mut self, fabric: &mut dyn Fabric, watermark: LogSeq, urgent: bool) -> Result<bool, String> {
        self.publish_counter += 1;
        let p = Publish { volume: self.volume, epoch: self.epoch, watermark, urgent, counter: self.publish_counter };
        match fabric.write(self.link, &[&p.encode()], 0, Some(super::wire::PUBLISH_IMM)) {
            Ok(()) => {
                self.published = watermark;
                self.published_urgent = urgent;
                Ok(true)
            }
            Err(FabricError::Busy) => Ok(false),
            Err(e) => Err(e.to_string()),
        }
    }
}
