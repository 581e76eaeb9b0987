//! The superblock writer: one superblock write at a time, each the next generation, alternating
//! between the two copies, retried after a failure with the same generation so the other copy
//! always keeps the last durable state.
//!
//! It does no I/O: the engine asks it whether a write is due, hands it the snapshot it encodes
//! (tail, and each volume's watermark and intent), and tells it how the write ended; it gives
//! back the snapshot that is now durable, whose effects the engine applies (free log space,
//! clean index entries, release gated writes, tell the destager its intent is safe).

use crate::constants::SUPERBLOCK_RETRY_NS;
use crate::types::{Epoch, LogPos, LogSeq};

#[derive(Clone, Debug)]
pub(crate) struct SbSnapshot {
    pub tail: LogPos,
    /// (watermark, intent, epoch) per volume, in the engine's volume order.
    pub volumes: Vec<(LogSeq, LogSeq, Epoch)>,
}

pub(crate) struct SuperblockWriter {
    /// Generation of the last durable superblock.
    pub durable_generation: u64,
    in_flight: Option<(u64, SbSnapshot)>,
    wanted: bool,
    retry_at: u64,
}

impl SuperblockWriter {
    pub fn new(durable_generation: u64) -> SuperblockWriter {
        SuperblockWriter { durable_generation, in_flight: None, wanted: false, retry_at: 0 }
    }

    /// Something changed that the superblock should record.
    pub fn want(&mut self) {
        self.wanted = true;
    }

    /// Whether a write should start now.
    pub fn due(&self, now: u64) -> bool {
        self.in_flight.is_none() && self.wanted && now >= self.retry_at
    }

    /// Starts the write of `snapshot`; returns its generation.
    pub fn start(&mut self, snapshot: SbSnapshot) -> u64 {
        assert!(self.in_flight.is_none(), "superblock: two writes in flight");
        let generation = self.durable_generation + 1;
        self.wanted = false;
        self.in_flight = Some((generation, snapshot));
        generation
    }

    /// The write ended; returns the snapshot that is now durable.
    pub fn done(&mut self, ok: bool, now: u64) -> Option<SbSnapshot> {
        let (generation, snapshot) = self.in_flight.take().expect("superblock: completion without a write");
        if ok {
            self.durable_generation = generation;
            Some(snapshot)
        } else {
            self.wanted = true;
            self.retry_at = now + SUPERBLOCK_RETRY_NS;
            None
        }
    }

    /// Nothing left to write.
    pub fn is_idle(&self) -> bool {
        self.in_flight.is_none() && !self.wanted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_write_at_a_time_and_a_failure_retries_the_same_generation() {
        let mut w = SuperblockWriter::new(7);
        assert!(!w.due(0));
        w.want();
        assert!(w.due(0));
        let snap = SbSnapshot { tail: LogPos(4096), volumes: vec![(LogSeq(3), LogSeq(5), Epoch(1))] };
        assert_eq!(w.start(snap.clone()), 8);
        w.want();
        assert!(!w.due(0), "a second write waits for the first");
        assert!(w.done(false, 100).is_none());
        assert!(!w.due(100) && w.due(100 + SUPERBLOCK_RETRY_NS));
        assert_eq!(w.start(snap), 8, "the failed generation is retried");
        assert_eq!(w.done(true, 0).unwrap().tail, LogPos(4096));
        assert_eq!(w.durable_generation, 8);
        assert!(w.is_idle());
    }
}
