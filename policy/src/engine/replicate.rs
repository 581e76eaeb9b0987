//! Replication in the engine: write-back+1 and +2 volumes (source side) and replica copies kept
//! for other nodes (replica side). The two ends of a link are in [`crate::replica`]; this file
//! ties them to volumes, the log and the acknowledgement order.
//!
//! Source side, per volume:
//! - a frame's entries of the volume leave for every attached replica as one record, from the
//!   hosts' buffers, when the frame's local write is submitted ([`Engine::replicate_frame`]);
//! - once the frame is durable and acknowledged in log order here, each write waits in
//!   `Replicating` until every replica reports it durable; a slow replica holds back only its
//!   own volume's writes;
//! - the volume runs write-back only while every wanted replica is attached and in sync; a
//!   missing replica makes it write-through (reason `ReplicaUnavailable`), and writes waiting
//!   for a lost replica are acknowledged once destaged instead (`Abandoned`);
//! - a replica that (re)attaches without every entry the source holds is `Syncing` until those
//!   entries are destaged and it has persisted that watermark;
//! - after each destage batch the persisted watermark is published to the replicas (one small
//!   write); blocks destaged but not yet known to every replica still count as dirty for a
//!   write-through write (invariant 2: a replica's copy destaged later must never put older data
//!   over it), and such a write makes the publication urgent;
//! - sequence numbers are never reused: after a restart the source continues above the highest
//!   one any replica holds.
//!
//! Replica side, per copy: records are checked ([`crate::replica::Inbound`]) and their entries
//! appended to this device's log with the source's sequence numbers and epoch; a copy's
//! durable point is acknowledged back; published watermarks are applied lazily (when the log
//! needs room, when the source waits, or after a second without records), so discarding
//! replica data costs no flash writes beyond the superblock's.

use super::appender::{FrameState, Queued};
use super::volume::{PendingOp, Volume, VolumeSpec, WriteState};
use super::{Engine, EngineEvent};
use crate::index::DirtyLoc;
use crate::io::{AlignedBuf, FabricEvent};
use crate::link::{DirtyRecord, ToDestage};
use crate::log::{EntryHeader, EntryKind};
use crate::policy::{EffectiveReason, WritePolicy};
use crate::replica::wire::{Ack, ACK_IMM, BLOCK_LEN, PUBLISH_IMM, RECORD_ENTRIES_MAX};
use crate::replica::{Inbound, Outbound, SyncState};
use crate::types::{Epoch, LinkId, LogSeq, OpId, VolumeId};

/// Smallest record ring a link may use: one largest frame fits with room to spare.
pub const RING_BYTES_MIN: u64 = 4 << 20;
/// A copy applies a published watermark by itself once the log is this full (per mille)...
const COPY_RECLAIM_PERMILLE: u64 = 500;
/// ...or once its source has been quiet this long.
const COPY_IDLE_NS: u64 = 1_000_000_000;

/// What a replica holds of a volume, as its source needs to know when a link attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyState {
    /// The highest sequence number the copy received.
    pub durable: LogSeq,
    /// The source's watermark the copy has persisted.
    pub watermark: LogSeq,
    pub epoch: Epoch,
}

/// Where a copy's rescue stands ([`Engine::rescue_copy`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RescueState {
    /// Every entry handed to the destager is on the SAN, and the watermark saying so is durable.
    pub done: bool,
    /// Log bytes of the entries still to destage.
    pub bytes_left: u64,
    /// The newest entry of the rescue: once done, the SAN holds every entry of the owner up to
    /// here (what the owner skips to when it comes back, `Engine::absorb_rescue`).
    pub upto: LogSeq,
}

/// One end of a replication link.
pub(crate) enum Link {
    Out { vi: usize, out: Outbound },
    In { vi: usize, inb: Inbound },
}

/// A link's numbers for operators.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkStatus {
    pub link: LinkId,
    pub volume: VolumeId,
    pub peer: String,
    /// "replica" (we send to it) or "source" (it sends to us).
    pub role: &'static str,
    pub state: String,
    pub durable: LogSeq,
    pub watermark: LogSeq,
    pub records: u64,
    pub bytes: u64,
    pub backlogged: u64,
}

impl Engine {
    /// Gives the engine its fabric (before any link attaches).
    pub fn set_fabric(&mut self, fabric: Box<dyn crate::io::Fabric>) {
        self.fabric = Some(fabric);
    }

    /// Whether the volume at `vi` may acknowledge from the log as far as replication goes.
    pub(crate) fn replication_effective(&self, vi: usize) -> Option<EffectiveReason> {
        let v = &self.volumes[vi];
        if v.copies == 0 {
            return None;
        }
        let mut attached = 0;
        let mut syncing = false;
        for l in &v.links {
            if let Some(Link::Out { out, .. }) = self.links.get(l) {
                attached += 1;
                syncing |= out.sync != SyncState::InSync;
            }
        }
        if attached < v.copies {
            Some(EffectiveReason::ReplicaUnavailable)
        } else if syncing {
            Some(EffectiveReason::ReplicaSyncing)
        } else {
            None
        }
    }

    // ---- replica side ----

    /// Creates (or finds) the copy of `volume` kept for `source`, at `epoch` or newer. The copy
    /// is usable once [`Engine::replica_copy_ready`] says so (its record is durable).
    pub fn open_replica_copy(
        &mut self,
        volume: VolumeId,
        blocks: u64,
        source: &str,
        epoch: Epoch,
    ) -> Result<(), String> {
        if self.state != super::EngineState::Ready || self.read_only {
            return Err("the device is not ready".into());
        }
        if self.degraded.is_some() {
            return Err("this node's flash is degraded: it cannot keep copies now".into());
        }
        if let Some(vi) = self.volume_index(volume) {
            let v = &mut self.volumes[vi];
            match v.source.as_deref() {
                None => return Err(format!("{volume} is one of this node's own volumes")),
                Some(s) if s != source => {
                    return Err(format!("this device keeps the copy of {volume} for node {s:?}, not {source:?}"))
                }
                _ => {}
            }
            if epoch < v.epoch {
                return Err(format!(
                    "stale {epoch}: this copy of {volume} has seen {} (a newer owner wrote it)",
                    v.epoch
                ));
            }
            if blocks != v.blocks {
                return Err(format!("{volume} has {blocks} blocks, its copy here {}", v.blocks));
            }
            if epoch > v.epoch {
                v.epoch = epoch;
                self.sb.want();
            }
            return Ok(());
        }
        if self.volumes.len() >= crate::constants::VOLUMES_PER_DEVICE_MAX {
            return Err("the device holds as many volumes as it can".into());
        }
        let mut sources: Vec<&str> = self.volumes.iter().filter_map(|v| v.source.as_deref()).collect();
        sources.push(source);
        sources.sort_unstable();
        sources.dedup();
        if sources.len() > crate::log::superblock::NODES_MAX || source.len() > crate::log::superblock::NODE_NAME_MAX {
            return Err(format!("the device cannot name node {source:?} (too many source nodes or too long a name)"));
        }
        tracing::info!(volume = volume.0, source, epoch = epoch.0, "new replica copy");
        let mut v = Volume::new(VolumeSpec {
            id: volume,
            epoch,
            blocks,
            policy: WritePolicy::WriteBack,
            read_cache: false,
            unmap: false,
            replicas: Vec::new(),
            source: Some(source.to_string()),
        });
        v.next_seq = LogSeq(1);
        self.volumes.push(v);
        self.dirty_out.push(Vec::new());
        self.sb.want();
        Ok(())
    }

    /// This device cannot log copies any more (its flash is degraded): every source's link is
    /// dropped (each source then runs its volume write-through and resyncs later) and the copy
    /// entries still queued for the log are let go — none of them was acknowledged.
    pub(crate) fn drop_copies_in_flight(&mut self) {
        let inbound: Vec<LinkId> =
            self.links.iter().filter(|(_, l)| matches!(l, Link::In { .. })).map(|(id, _)| *id).collect();
        for link in inbound {
            self.drop_link(link, "this node's flash is degraded: it cannot keep copies now");
        }
        let mut kept = std::collections::VecDeque::with_capacity(self.log.queue.len());
        for q in self.log.queue.drain(..) {
            if q.op.is_none() {
                self.pool.put_opt(q.buf);
            } else {
                kept.push_back(q);
            }
        }
        self.log.queue = kept;
    }

    /// The copy's state once its record (at least at `epoch`) is in a durable superblock.
    pub fn replica_copy_ready(&self, volume: VolumeId, epoch: Epoch) -> Option<CopyState> {
        let v = &self.volumes[self.volume_index(volume)?];
        (v.is_copy() && v.persisted_epoch >= epoch).then(|| CopyState {
            // A copy damaged by its log says it holds nothing: its source resyncs it.
            durable: if v.copy_damaged.is_some() { LogSeq(0) } else { LogSeq(v.next_seq.0 - 1) },
            watermark: v.persisted_watermark,
            epoch: v.epoch,
        })
    }

    /// The source's link for a copy is up: records written into its ring from now on are
    /// taken. A link the copy had before is dropped.
    pub fn attach_inbound(
        &mut self,
        volume: VolumeId,
        link: LinkId,
        peer: &str,
        ring_bytes: u64,
    ) -> Result<(), String> {
        let vi = self.volume_index(volume).ok_or_else(|| format!("no copy of {volume} here"))?;
        if !self.volumes[vi].is_copy() {
            return Err(format!("{volume} is not a replica copy"));
        }
        if self.volumes[vi].rescuing {
            return Err(format!(
                "this node is destaging its copy of {volume} to the SAN (the volume's owner was lost)"
            ));
        }
        if ring_bytes < RING_BYTES_MIN || ring_bytes / crate::replica::wire::RECORD_ALIGN >= (ACK_IMM as u64) {
            return Err(format!("ring of {ring_bytes} bytes out of range"));
        }
        for old in std::mem::take(&mut self.volumes[vi].links) {
            self.drop_link(old, "replaced by a new link from the source");
        }
        let v = &mut self.volumes[vi];
        let floor = LogSeq(v.next_seq.0 - 1);
        let inb = Inbound::new(link, peer, volume, v.epoch, ring_bytes, floor);
        v.links.push(link);
        self.links.insert(link, Link::In { vi, inb });
        Ok(())
    }

    /// Takes the records the fabric says arrived and applies publications.
    fn on_inbound_imm(&mut self, link: LinkId, imm: u32, len: u32, now: u64) {
        let Some(fabric) = self.fabric.as_deref() else { return };
        let Some(Link::In { vi, inb }) = self.links.get_mut(&link) else { return };
        let vi = *vi;
        if imm == PUBLISH_IMM {
            match inb.publication(fabric) {
                Ok(Some(p)) => {
                    let v = &mut self.volumes[vi];
                    v.published = v.published.max(p.watermark);
                    v.publish_urgent |= p.urgent;
                }
                Ok(None) => {}
                Err(why) => self.refuse(link, &why),
            }
            return;
        }
        match inb.take(fabric, imm, len, &mut self.pool) {
            Ok(entries) => {
                let v = &mut self.volumes[vi];
                v.last_record_ns = now;
                for (h, buf) in entries {
                    v.next_seq = v.next_seq.max(h.seq.next());
                    self.log.queue.push_back(Queued {
                        vi,
                        op: None,
                        kind: h.kind,
                        lba: h.lba,
                        blocks: h.blocks as u64,
                        buf,
                        since_ns: now,
                        waited: false,
                        preset: Some(h),
                    });
                }
            }
            Err(why) => self.refuse(link, &why),
        }
    }

    /// A peer broke the protocol: nothing of it was applied; the link goes.
    fn refuse(&mut self, link: LinkId, why: &str) {
        let peer = match self.links.get(&link) {
            Some(Link::In { inb, .. }) => inb.peer.clone(),
            Some(Link::Out { out, .. }) => out.peer.clone(),
            None => String::new(),
        };
        tracing::error!(link = link.0, peer, "refused from the replication peer: {why}");
        self.drop_link(link, &format!("refused: {why}"));
    }

    /// Entries of a copy are durable here (called in log order).
    pub(crate) fn copy_durable(&mut self, vi: usize, seq: LogSeq) {
        for l in &self.volumes[vi].links {
            if let Some(Link::In { inb, .. }) = self.links.get_mut(l) {
                inb.durable = inb.durable.max(seq);
            }
        }
    }

    /// Applies published watermarks lazily and acknowledges what became durable.
    fn poll_copies(&mut self, now: u64) -> usize {
        let mut work = 0;
        let pressure = self.log.log_full
            || self.log.ring.used(self.reclaim_floor()) * 1000 >= self.log.ring.capacity() * COPY_RECLAIM_PERMILLE;
        let mut changed = false;
        // A copy being rescued moves only with what the destager confirms (`rescue_state`).
        for v in self.volumes.iter_mut().filter(|v| v.is_copy() && !v.rescuing) {
            if v.published > v.watermark && (v.publish_urgent || pressure || now >= v.last_record_ns + COPY_IDLE_NS) {
                v.watermark = v.published;
                v.publish_urgent = false;
                changed = true;
                if v.copy_damaged.is_some_and(|d| v.watermark >= d) {
                    tracing::info!(
                        volume = v.id.0,
                        watermark = v.watermark.0,
                        "the source's watermark covers every entry this copy lost to log damage: it is whole again"
                    );
                    v.copy_damaged = None;
                }
            }
        }
        if changed {
            self.reclaim();
            self.sb.want();
            work += 1;
        }
        let Some(fabric) = self.fabric.as_deref_mut() else { return work };
        let mut failed = Vec::new();
        for (id, l) in self.links.iter_mut() {
            let Link::In { vi, inb } = l else { continue };
            let wm = self.volumes[*vi].persisted_watermark;
            if let Some(ack) = inb.ack_due(wm) {
                match fabric.write(*id, &[&ack.encode()], 0, Some(ACK_IMM)) {
                    Ok(()) => work += 1,
                    Err(crate::io::FabricError::Busy) => inb.ack_failed(),
                    Err(e) => failed.push((*id, e.to_string())),
                }
            }
        }
        for (id, why) in failed {
            self.drop_link(id, &why);
        }
        work
    }

    // ---- source side ----

    /// A link to one of `volume`'s replicas is up; `copy` is what the replica holds. The
    /// replica counts for acknowledgements at once if it holds every entry this node holds,
    /// else once those are destaged and it knows it.
    pub fn attach_replica(
        &mut self,
        volume: VolumeId,
        link: LinkId,
        peer: &str,
        ring_bytes: u64,
        copy: CopyState,
    ) -> Result<Epoch, String> {
        let vi = self.volume_index(volume).ok_or_else(|| format!("no {volume} here"))?;
        if self.state != super::EngineState::Ready {
            return Err("the device is not ready".into());
        }
        if ring_bytes < RING_BYTES_MIN {
            return Err(format!("ring of {ring_bytes} bytes, at least {RING_BYTES_MIN} needed"));
        }
        let epoch = self.volumes[vi].epoch;
        if !self.volumes[vi].replicas.iter().any(|r| r == peer) {
            return Err(format!("node {peer:?} is not a replica of {volume}"));
        }
        if copy.epoch > epoch {
            return Err(format!(
                "node {peer:?} has seen {} of {volume}, newer than this node's {epoch}: this node is stale",
                copy.epoch
            ));
        }
        // A link this peer had before for the volume is replaced.
        let old: Vec<LinkId> = self.volumes[vi]
            .links
            .iter()
            .copied()
            .filter(|l| matches!(self.links.get(l), Some(Link::Out { out, .. }) if out.peer == peer))
            .collect();
        for l in old {
            self.drop_link(l, "replaced by a new link");
        }
        let v = &mut self.volumes[vi];
        let own_last = LogSeq(v.next_seq.0 - 1);
        // What the replica must know is destaged before it counts: the persisted watermark,
        // and any sequence numbers another replica held that this node never logged (their
        // entries may sit in this replica's copy too, of any block).
        let known = v.persisted_watermark.max(v.void_upto);
        let sync = if copy.durable > own_last {
            // The replica holds entries this node never logged (it sent them, then crashed
            // before its own log write). Their numbers are never reused: once this node's
            // own entries are destaged its watermark jumps over them (`poll_void`), and the
            // replica discards them when that watermark is published.
            v.void_upto = v.void_upto.max(copy.durable);
            SyncState::Syncing { until: copy.durable }
        } else if copy.durable == own_last && copy.watermark == known {
            SyncState::InSync
        } else if copy.durable == own_last {
            // It holds every entry, but entries destaged while it was away may since have been
            // overwritten by write-through writes, and entries voided by the watermark's jump
            // over unlogged numbers may be in its copy: it must learn the watermark first. Or it
            // let entries go that this node has not destaged yet (its watermark is ahead: a copy
            // discarded while the record named other replicas, `discard_copy`): it does not hold
            // them any more, so it counts only once this node's watermark has passed them.
            SyncState::Syncing { until: known.max(copy.watermark) }
        } else {
            SyncState::Syncing { until: own_last }
        };
        tracing::info!(volume = volume.0, peer, durable = copy.durable.0, ?sync, "replica attached");
        let out = Outbound::new(link, peer, volume, epoch, ring_bytes, copy.durable, copy.watermark, sync);
        v.links.push(link);
        self.links.insert(link, Link::Out { vi, out });
        Ok(epoch)
    }

    /// The cluster changed a volume's replica set: `replicas` are the nodes to keep copies now
    /// (at most `copies`, the number the policy promises; fewer while the cluster has no
    /// eligible node, and the volume runs write-through until it has them all), under `epoch`
    /// or newer. Links to nodes no longer named are dropped: their waiting writes are
    /// acknowledged once destaged, as when a link fails. The volume's epoch only moves up, and
    /// is persisted before the next link opens with it. Returns the epoch in force.
    pub fn set_replicas(
        &mut self,
        volume: VolumeId,
        replicas: Vec<String>,
        copies: usize,
        epoch: Epoch,
    ) -> Result<Epoch, String> {
        let vi = self.volume_index(volume).ok_or_else(|| format!("no {volume} here"))?;
        if self.volumes[vi].is_copy() {
            return Err(format!("{volume} is a copy kept for another node here"));
        }
        if self.state != super::EngineState::Ready {
            // A new epoch is persisted in the superblock: not before replay has rebuilt what
            // the superblock must say.
            return Err("the device is not ready (it is still recovering its log): try again".into());
        }
        if replicas.len() > copies {
            return Err(format!("{} replicas named for {copies} copies", replicas.len()));
        }
        if replicas.iter().enumerate().any(|(i, r)| replicas[..i].contains(r)) {
            return Err("a replica is named twice".into());
        }
        let v = &self.volumes[vi];
        if v.replicas == replicas && v.copies == copies && v.epoch >= epoch {
            return Ok(v.epoch);
        }
        let gone: Vec<LinkId> = v
            .links
            .iter()
            .copied()
            .filter(|l| matches!(self.links.get(l), Some(Link::Out { out, .. }) if !replicas.contains(&out.peer)))
            .collect();
        let v = &mut self.volumes[vi];
        tracing::info!(volume = volume.0, from = ?v.replicas, to = ?replicas, copies, epoch = epoch.0, "replica set changed");
        v.replicas = replicas;
        v.copies = copies;
        if epoch > v.epoch {
            v.epoch = epoch;
        }
        self.sb.want();
        for l in gone {
            self.drop_link(l, "no longer one of the volume's replicas");
        }
        // Writes logged but not yet sent anywhere now count the new set.
        self.release_waiting(vi);
        Ok(self.volumes[vi].epoch)
    }

    /// This node no longer keeps a copy of `volume` (the cluster gave the role to another
    /// node and the source no longer needs it): its entries are let go as if the source had
    /// published a watermark over all of them, its link (if any) is dropped, and the space is
    /// reclaimed. The copy's record stays, with its epoch, so a stale source is still refused.
    /// Returns the bytes let go.
    pub fn discard_copy(&mut self, volume: VolumeId) -> Result<u64, String> {
        let vi = self.volume_index(volume).ok_or_else(|| format!("no copy of {volume} here"))?;
        if !self.volumes[vi].is_copy() {
            return Err(format!("{volume} is one of this node's own volumes"));
        }
        let links: Vec<LinkId> = self.volumes[vi].links.clone();
        for l in links {
            self.drop_link(l, "this node no longer keeps a copy of the volume");
        }
        let v = &mut self.volumes[vi];
        let bytes = v.dirty_bytes();
        let last = LogSeq(v.next_seq.0 - 1);
        v.published = v.published.max(last);
        v.publish_urgent = true;
        tracing::info!(volume = volume.0, bytes, upto = last.0, "copy discarded");
        Ok(bytes)
    }

    /// The copy of `volume` kept here is destaged to the volume's SAN by this node: its owner
    /// was lost and the cluster chose this copy, one that holds every write the owner
    /// acknowledged (the record's `in_sync`). The source's links are dropped and refused from
    /// now on; every entry above the watermark the source published is indexed and handed to
    /// the destager (which must have the volume's SAN) in sequence order, as the node's own
    /// volumes are after replay. Entries at or below that watermark are not: the source
    /// destaged them, and write-through writes may have overwritten them on the SAN since
    /// (the source let none through before this copy persisted that watermark). Returns false
    /// if the rescue was already under way.
    pub fn rescue_copy(&mut self, volume: VolumeId) -> Result<bool, String> {
        let vi = self.volume_index(volume).ok_or_else(|| format!("no copy of {volume} here"))?;
        let v = &self.volumes[vi];
        if !v.is_copy() {
            return Err(format!("{volume} is one of this node's own volumes"));
        }
        if v.rescuing {
            return Ok(false);
        }
        if self.state != super::EngineState::Ready {
            return Err("the device is not ready (it is still recovering)".into());
        }
        if let Some(d) = v.copy_damaged {
            return Err(format!(
                "this copy lost entries up to {} to log damage: it does not hold every acknowledged write",
                d.0
            ));
        }
        for l in self.volumes[vi].links.clone() {
            self.drop_link(l, "the volume's owner was lost: this copy is destaged to the SAN");
        }
        let v = &mut self.volumes[vi];
        v.rescuing = true;
        v.watermark = v.watermark.max(v.published);
        let from = if self.cfg.bugs.rescue_ignores_watermark { LogSeq(0) } else { v.watermark };
        v.rescue_upto = from;
        v.rescue_destaged = from;
        // Only entries this copy may have acknowledged to its source: those of frames at the
        // front of the log that went through `advance_acks` durable. Entries still queued or in
        // frames under way were acknowledged to nobody, and abandoned ones were never durable:
        // they stay in the copy, undestaged, until the rescue ends (a later destage of one could
        // land after newer writes of the volume's next owner).
        let mut handed = 0u64;
        for f in self.log.frames.iter().take(self.log.acked) {
            if f.state != FrameState::Acked {
                continue;
            }
            for e in f.entries.iter().filter(|e| e.vi == vi && e.header.seq > from) {
                let h = &e.header;
                let loc = match h.kind {
                    EntryKind::Write => DirtyLoc::Log { data_pos: e.data_pos },
                    k => DirtyLoc::Zero { unmap: k == EntryKind::Unmap },
                };
                let v = &mut self.volumes[vi];
                if h.kind == EntryKind::SanWritten {
                    v.index.remove_clean(h.lba, h.blocks as u64, LogSeq(h.seq.0 - 1));
                } else {
                    v.index.insert(h.lba, h.blocks as u64, h.seq, loc);
                }
                v.rescue_upto = v.rescue_upto.max(h.seq);
                self.dirty_out[vi].push(DirtyRecord {
                    seq: h.seq,
                    kind: h.kind,
                    lba: h.lba,
                    blocks: h.blocks as u64,
                    data_pos: e.data_pos,
                    data_crc: h.data_crc,
                    memory: None,
                });
                handed += 1;
            }
        }
        let v = &self.volumes[vi];
        tracing::warn!(
            volume = volume.0,
            source = v.source.as_deref().unwrap_or(""),
            entries = handed,
            from = from.0,
            upto = v.rescue_upto.0,
            "destaging this copy to the volume's SAN: its owner was lost"
        );
        if self.started {
            self.outbox.push(ToDestage::Start { volume, watermark: from, intent: v.persisted_intent });
        }
        self.sb.want();
        Ok(true)
    }

    /// Where the rescue of a copy stands (`None` if it is not being rescued).
    pub fn rescue_state(&self, volume: VolumeId) -> Option<RescueState> {
        let vi = self.volume_index(volume)?;
        let v = &self.volumes[vi];
        if !v.rescuing {
            return None;
        }
        // Done once the destager itself confirmed the last entry handed to it (nothing else may
        // count as destaged here) and the watermark saying so is durable.
        let done = v.rescue_destaged >= v.rescue_upto
            && v.persisted_watermark >= v.rescue_upto
            && self.dirty_out[vi].is_empty();
        let bytes_left =
            v.dirty.iter().filter(|d| d.seq > v.watermark && d.seq <= v.rescue_upto).map(|d| d.bytes).sum();
        Some(RescueState { done, bytes_left, upto: v.rescue_upto })
    }

    /// Serves (`on`) or stops serving a rescued copy to hosts in place of its lost owner. Only
    /// once the rescue is done: the SAN then holds every write the owner acknowledged, so the
    /// copy is served write-through, reads from the SAN (its entries are all destaged: none is
    /// left in its index). Stopping refuses new commands at once; those already taken finish
    /// ([`Engine::served_ops`] says how many are left).
    /// `blocks`: the size hosts see through this node, which must be the volume's.
    pub fn serve_copy(&mut self, volume: VolumeId, on: bool, blocks: Option<u64>) -> Result<(), String> {
        let vi = self.volume_index(volume).ok_or_else(|| format!("no copy of {volume} here"))?;
        if !self.volumes[vi].is_copy() {
            return Err(format!("{volume} is one of this node's own volumes"));
        }
        if on && !self.rescue_state(volume).is_some_and(|r| r.done) {
            return Err(format!("the rescue of {volume}'s copy is not done: the SAN may lack acknowledged writes"));
        }
        let have = self.volumes[vi].blocks;
        if on && blocks.is_some_and(|b| b != have) {
            return Err(format!(
                "the standby namespace has {} blocks but {volume} has {have} on its owner: hosts would see two sizes",
                blocks.unwrap_or(0)
            ));
        }
        let v = &mut self.volumes[vi];
        if v.serving != on {
            v.serving = on;
            tracing::warn!(
                volume = volume.0,
                serving = on,
                "{}",
                if on {
                    "serving this rescued copy to hosts in place of its lost owner (write-through)"
                } else {
                    "no longer serving this rescued copy to hosts"
                }
            );
        }
        Ok(())
    }

    /// Whether the copy of `volume` is served to hosts ([`Engine::serve_copy`]).
    pub fn serving(&self, volume: VolumeId) -> bool {
        self.volume_index(volume).is_some_and(|vi| self.volumes[vi].serving)
    }

    /// Host commands of `volume` the engine holds (taken and not completed yet).
    pub fn served_ops(&self, volume: VolumeId) -> usize {
        self.volume_index(volume).map_or(0, |vi| self.volumes[vi].ops.len())
    }

    /// Ends the rescue of a copy (the cluster no longer needs it): the copy takes links from
    /// its source again. Once done, it holds nothing older than the SAN and lets its entries
    /// go. With `abort` (the rescue moved to another node before this one was done; the
    /// destager has dropped what it held of it, `Destager::skip_to`) the entries not destaged
    /// stay in the copy.
    pub fn end_rescue(&mut self, volume: VolumeId, abort: bool) -> Result<(), String> {
        let Some(state) = self.rescue_state(volume) else { return Ok(()) };
        if let Some(vi) = self.volume_index(volume) {
            let v = &self.volumes[vi];
            if v.serving || !v.ops.is_empty() {
                return Err(format!("it serves hosts ({} command(s) in flight): stop serving it first", v.ops.len()));
            }
        }
        if !state.done && !abort {
            return Err(format!("its rescue has {} bytes left to destage", state.bytes_left));
        }
        let vi = self.volume_index(volume).ok_or("no copy")?;
        self.dirty_out[vi].clear();
        let v = &mut self.volumes[vi];
        v.rescuing = false;
        v.index = crate::index::DirtyIndex::default();
        if state.done {
            // Entries that were never durable (abandoned) go with the rest.
            let last = LogSeq(v.next_seq.0 - 1);
            v.published = v.published.max(last);
            v.publish_urgent = true;
        }
        tracing::info!(
            volume = volume.0,
            done = state.done,
            "copy rescue ended: the copy takes its source's links again"
        );
        Ok(())
    }

    /// Sends each replicated volume's entries of a frame being written: `entries` are the
    /// frame's entry headers and `bufs` the data of those that carry data, in order.
    pub(crate) fn replicate_frame(&mut self, entries: &[EntryHeader], bufs: &[AlignedBuf]) {
        if self.links.is_empty() {
            return;
        }
        let Some(fabric) = self.fabric.as_deref_mut() else { return };
        let mut data = bufs.iter();
        // Per replicated volume in the frame: its entries and their data.
        type PerVolume<'a> = (usize, Vec<EntryHeader>, Vec<&'a [u8]>);
        let mut per: Vec<PerVolume> = Vec::new();
        for h in entries {
            let d = if h.kind.has_data() { data.next().map(|b| &b[..]) } else { None };
            let Some(vi) = self.volumes.iter().position(|v| v.id == h.volume) else { continue };
            if self.volumes[vi].is_copy() || self.volumes[vi].links.is_empty() {
                continue;
            }
            let i = match per.iter().position(|(x, _, _)| *x == vi) {
                Some(i) => i,
                None => {
                    per.push((vi, Vec::with_capacity(RECORD_ENTRIES_MAX), Vec::new()));
                    per.len() - 1
                }
            };
            per[i].1.push(*h);
            per[i].2.extend(d);
        }
        let mut failed = Vec::new();
        for (vi, hs, ds) in &per {
            for l in &self.volumes[*vi].links {
                if let Some(Link::Out { out, .. }) = self.links.get_mut(l) {
                    if let Err(why) = out.send(fabric, hs, ds) {
                        failed.push((*l, why));
                    }
                }
            }
        }
        for (l, why) in failed {
            self.drop_link(l, &why);
        }
    }

    /// Where a write durable in the local log goes: acknowledged now (every replica has it
    /// durable), or into `waiting` until [`Engine::release_waiting`] says it may be. Returns the
    /// buffer if the caller should acknowledge now.
    pub(crate) fn replicated_ack(
        &mut self,
        vi: usize,
        op: OpId,
        seq: LogSeq,
        buf: Option<AlignedBuf>,
    ) -> Option<Option<AlignedBuf>> {
        if self.volumes[vi].copies == 0 {
            return Some(buf);
        }
        let needs_san = !self.all_replicas_carry(vi, seq);
        let state = if needs_san {
            // A replica is missing or never got it: acknowledged once it is on the SAN.
            WriteState::Abandoned { seq }
        } else {
            if self.volumes[vi].waiting.is_empty()
                && (self.all_replicas_durable(vi, seq) || self.cfg.bugs.ack_before_replicas)
            {
                return Some(buf);
            }
            WriteState::Replicating { seq }
        };
        self.set_write_state(vi, op, state);
        self.volumes[vi].waiting.push_back(super::volume::Waiting { seq, op, buf, needs_san });
        self.release_waiting(vi);
        None
    }

    /// Every wanted replica is attached, in sync, and was sent entry `seq`.
    fn all_replicas_carry(&self, vi: usize, seq: LogSeq) -> bool {
        let v = &self.volumes[vi];
        v.links.len() >= v.copies
            && v.links.iter().all(|l| {
                matches!(self.links.get(l), Some(Link::Out { out, .. }) if out.sync == SyncState::InSync && out.sent >= seq)
            })
    }

    fn all_replicas_durable(&self, vi: usize, seq: LogSeq) -> bool {
        self.volumes[vi]
            .links
            .iter()
            .all(|l| matches!(self.links.get(l), Some(Link::Out { out, .. }) if out.durable >= seq))
    }

    /// Acknowledges the waiting writes of `vi` that may be, in order. A write may be once
    /// - every wanted replica is in sync, was sent it and has it durable (the normal case), or
    /// - it is on the SAN (persisted watermark) and no attached replica could replay an older
    ///   entry of its blocks over it: each has it durable or knows it is destaged. (A replica
    ///   lost meanwhile, or an entry a replica never got: the SAN holds the promise instead.)
    pub(crate) fn release_waiting(&mut self, vi: usize) {
        loop {
            let Some(w) = self.volumes[vi].waiting.front() else { return };
            let (seq, needs_san) = (w.seq, w.needs_san);
            let normal = !needs_san && self.all_replicas_carry(vi, seq) && self.all_replicas_durable(vi, seq);
            let on_san = seq <= self.volumes[vi].persisted_watermark
                && self.volumes[vi].links.iter().all(|l| match self.links.get(l) {
                    Some(Link::Out { out, .. }) => out.durable >= seq || out.watermark >= seq,
                    _ => true,
                });
            if !normal && !on_san {
                return;
            }
            let Some(super::volume::Waiting { seq, op, buf, .. }) = self.volumes[vi].waiting.pop_front() else {
                return;
            };
            let Some(PendingOp::Write(w)) = self.volumes[vi].ops.remove(&op) else {
                panic!("engine: waiting write without its op")
            };
            self.volumes[vi].enter(op, w.state, WriteState::Acked);
            self.ack_write(vi, w.token, buf.or(w.buf), Some(seq));
        }
    }

    fn on_outbound_ack(&mut self, link: LinkId) {
        let Some(fabric) = self.fabric.as_deref() else { return };
        let Some(Link::Out { vi, out }) = self.links.get_mut(&link) else { return };
        let vi = *vi;
        let mut b = [0u8; BLOCK_LEN];
        if let Err(e) = fabric.read(link, 0, &mut b) {
            return self.drop_link(link, &e.to_string());
        }
        let ack = match Ack::decode(&b) {
            Ok(a) => a,
            Err(crate::replica::wire::WireError::BadCrc) => return,
            Err(e) => return self.refuse(link, &format!("acknowledgement: {e}")),
        };
        match out.on_ack(&ack) {
            Ok(true) => {}
            Ok(false) => return,
            Err(why) => return self.refuse(link, &why),
        }
        self.release_waiting(vi);
        self.prune_for_replicas(vi);
    }

    /// The lowest watermark the attached replicas of `vi` persisted.
    pub(crate) fn replicas_watermark(&self, vi: usize) -> LogSeq {
        let mut wm = LogSeq(u64::MAX);
        for l in &self.volumes[vi].links {
            if let Some(Link::Out { out, .. }) = self.links.get(l) {
                wm = wm.min(out.watermark);
            }
        }
        wm
    }

    fn prune_for_replicas(&mut self, vi: usize) {
        let wm = self.replicas_watermark(vi);
        self.volumes[vi].prune_unpublished(wm);
    }

    /// Jumps a volume's watermark over sequence numbers only a replica holds, once every entry
    /// of this node's own is destaged (the watermark then says nothing false: none of those
    /// numbers has an entry here). Replay accepts the gap because the watermark covers it.
    fn poll_void(&mut self) -> usize {
        let mut work = 0;
        for v in &mut self.volumes {
            if v.void_upto > v.watermark && v.watermark.next() >= v.next_seq {
                tracing::info!(
                    volume = v.id.0,
                    from = v.watermark.0,
                    to = v.void_upto.0,
                    "watermark skips a replica's unlogged entries"
                );
                v.watermark = v.void_upto;
                v.next_seq = v.next_seq.max(v.void_upto.next());
                work += 1;
            }
        }
        if work > 0 {
            self.reclaim();
            self.sb.want();
        }
        work
    }

    /// Publications after a destage batch, urgent ones for waiting writes and syncing links,
    /// backlogged records, and links that became in sync.
    fn poll_outbound(&mut self) -> usize {
        let mut work = 0;
        let Some(fabric) = self.fabric.as_deref_mut() else { return 0 };
        let mut failed = Vec::new();
        let mut synced = Vec::new();
        for (id, l) in self.links.iter_mut() {
            let Link::Out { vi, out } = l else { continue };
            let v = &self.volumes[*vi];
            let pw = v.persisted_watermark;
            let syncing = match out.sync {
                SyncState::Syncing { until } => {
                    if pw >= until && out.watermark >= until {
                        out.sync = SyncState::InSync;
                        synced.push((*vi, out.peer.clone()));
                        false
                    } else {
                        pw >= until
                    }
                }
                SyncState::InSync => false,
            };
            let urgent = syncing || !v.gated.is_empty();
            let publish = pw > out.published || (urgent && pw > out.watermark && !out.published_urgent);
            if publish {
                match out.publish(fabric, pw, urgent) {
                    Ok(true) => work += 1,
                    Ok(false) => {}
                    Err(why) => failed.push((*id, why)),
                }
            }
            match out.pump(fabric) {
                Ok(n) => work += n,
                Err(why) => failed.push((*id, why)),
            }
        }
        for (vi, peer) in synced {
            tracing::info!(volume = self.volumes[vi].id.0, peer, "replica in sync");
            work += 1;
        }
        for (id, why) in failed {
            self.drop_link(id, &why);
        }
        work
    }

    // ---- both ----

    /// Reads the fabric's events and acts on them.
    pub(crate) fn poll_fabric(&mut self, now: u64) -> usize {
        let Some(fabric) = self.fabric.as_deref_mut() else { return 0 };
        let mut events = std::mem::take(&mut self.fabric_events);
        fabric.poll(&mut events);
        let n = events.len();
        for e in events.drain(..) {
            match e {
                FabricEvent::Imm { link, imm, len } => match self.links.get(&link) {
                    Some(Link::Out { .. }) if imm == ACK_IMM => self.on_outbound_ack(link),
                    Some(Link::Out { .. }) => self.refuse(link, &format!("unexpected immediate {imm:#x}")),
                    Some(Link::In { .. }) => self.on_inbound_imm(link, imm, len, now),
                    None => {}
                },
                FabricEvent::Down { link, why } => self.drop_link(link, &why),
            }
        }
        self.fabric_events = events;
        n
    }

    /// The replication turn of `poll`.
    pub(crate) fn poll_replication(&mut self, now: u64) -> usize {
        if self.links.is_empty() && !self.volumes.iter().any(|v| v.is_copy()) {
            return 0;
        }
        let mut work = self.poll_void();
        work += self.poll_outbound();
        work += self.poll_copies(now);
        work
    }

    /// A link is gone (the fabric says so, the peer broke the protocol, or it was replaced).
    /// Writes waiting for it are acknowledged once destaged instead.
    pub fn link_down(&mut self, link: LinkId, why: &str) {
        self.drop_link(link, why);
    }

    pub(crate) fn drop_link(&mut self, link: LinkId, why: &str) {
        let Some(l) = self.links.remove(&link) else { return };
        let (vi, peer, role) = match &l {
            Link::Out { vi, out } => (*vi, out.peer.clone(), "replica"),
            Link::In { vi, inb } => (*vi, inb.peer.clone(), "source"),
        };
        let v = &mut self.volumes[vi];
        v.links.retain(|x| *x != link);
        tracing::warn!(volume = v.id.0, link = link.0, peer, role, "replication link down: {why}");
        self.events.push(EngineEvent::LinkDown { link, volume: v.id, why: why.to_string() });
        if matches!(&l, Link::Out { out, .. } if out.sync == SyncState::InSync) {
            // The cluster's record may name this copy as in sync: it must not any more before
            // a write it will not have is acknowledged. (A link only ever goes from syncing to
            // in sync, so a syncing one was never recorded since its last loss.)
            self.copies_changed(vi);
        }
        if matches!(l, Link::Out { .. }) {
            // Writes waiting for it now wait for the SAN (and the other replicas' word).
            let ops: Vec<(OpId, LogSeq)> = self.volumes[vi].waiting.iter().map(|w| (w.op, w.seq)).collect();
            for w in self.volumes[vi].waiting.iter_mut() {
                w.needs_san = true;
            }
            for (op, seq) in ops {
                self.set_write_state(vi, op, WriteState::Abandoned { seq });
            }
            self.release_waiting(vi);
            self.prune_for_replicas(vi);
        }
    }

    /// Every link's numbers.
    pub fn link_status(&self) -> Vec<LinkStatus> {
        self.links
            .iter()
            .map(|(id, l)| match l {
                Link::Out { vi, out } => LinkStatus {
                    link: *id,
                    volume: self.volumes[*vi].id,
                    peer: out.peer.clone(),
                    role: "replica",
                    state: match out.sync {
                        SyncState::InSync => "in-sync".into(),
                        SyncState::Syncing { until } => format!("syncing until seq {}", until.0),
                    },
                    durable: out.durable,
                    watermark: out.watermark,
                    records: out.records_sent,
                    bytes: out.bytes_sent,
                    backlogged: out.backlogged_records,
                },
                Link::In { vi, inb } => LinkStatus {
                    link: *id,
                    volume: self.volumes[*vi].id,
                    peer: inb.peer.clone(),
                    role: "source",
                    state: "receiving".into(),
                    durable: inb.durable,
                    watermark: self.volumes[*vi].persisted_watermark,
                    records: inb.records,
                    bytes: inb.bytes,
                    backlogged: 0,
                },
            })
            .collect()
    }

    /// Bytes of replica copies this device holds for other nodes, per (volume, source).
    pub fn replica_copies(&self) -> Vec<(VolumeId, String, u64)> {
        self.volumes.iter().filter_map(|v| Some((v.id, v.source.clone()?, v.dirty_bytes()))).collect()
    }

    /// The replica nodes a volume wants (empty unless write-back+N).
    pub fn volume_replicas(&self, id: VolumeId) -> Vec<String> {
        self.volume_index(id).map(|vi| self.volumes[vi].replicas.clone()).unwrap_or_default()
    }

    /// How many copies a volume's policy promises (write-back+N: N; the named replicas may be
    /// fewer while the cluster has no eligible node).
    pub fn volume_copies(&self, id: VolumeId) -> usize {
        self.volume_index(id).map_or(0, |vi| self.volumes[vi].copies)
    }

    /// For a replica copy: the newest sequence number it received.
    pub fn copy_received(&self, id: VolumeId) -> Option<LogSeq> {
        let v = &self.volumes[self.volume_index(id)?];
        v.is_copy().then(|| LogSeq(v.next_seq.0 - 1))
    }

    /// Whether replay found damage in this copy's part of the log: it is incomplete, and says
    /// so to its source (durable 0) until the source sends everything again.
    pub fn copy_damaged(&self, id: VolumeId) -> bool {
        self.volume_index(id).is_some_and(|vi| self.volumes[vi].copy_damaged.is_some())
    }

    /// For a replicated volume: the lowest sequence number every replica has durable.
    pub fn replicas_durable(&self, id: VolumeId) -> Option<LogSeq> {
        let vi = self.volume_index(id)?;
        self.volumes[vi]
            .links
            .iter()
            .filter_map(|l| match self.links.get(l) {
                Some(Link::Out { out, .. }) => Some(out.durable),
                _ => None,
            })
            .min()
    }
}
