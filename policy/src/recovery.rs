//! Crash recovery: read the superblock, replay the log from its tail, rebuild the index and
//! hand dirty entries back to the destager.
//!
//! Replay walks entries in log order from the persisted tail and stops at the first entry that
//! is not provably part of the log: bad magic or checksum (a torn write), an absolute position
//! that does not match (a leftover of an earlier lap), an incarnation that goes backwards or
//! ahead of the superblock (a survivor of a tail dropped by an earlier recovery), a sequence
//! number that is not the volume's next one, or data whose checksum fails. Everything from
//! there on is dropped and never served. Because the engine acknowledges entries strictly in
//! log order, nothing acknowledged lies beyond that point.
//!
//! Before the engine accepts I/O it persists a superblock with a new incarnation and the
//! position where it starts, so entries written from now on can be told apart from stale ones
//! at the same positions, even after the tail has moved past every newer entry (a case the
//! simulator found: seed 104684).
//!
//! Reads are issued one at a time (header, then the whole entry): simple and obviously
//! ordered. Reading large windows would make recovery faster per GiB; that is a later change.

use std::collections::BTreeMap;

use crate::constants::{BLOCK_SIZE, BLOCK_SIZE_U64, SUPERBLOCK_COPIES};
use crate::engine::{Engine, EngineState, FlashOp};
use crate::io::IoDone;
use crate::log::{EntryHeader, EntryKind, Superblock};
use crate::types::{LogSeq, VolumeId};

#[derive(Clone, Copy, Debug)]
pub(crate) enum RecoveryRead {
    Superblock(usize),
    Header(u64),
    Entry(u64),
}

enum Phase {
    Superblocks,
    Scan,
    Done,
}

pub(crate) struct Recovery {
    phase: Phase,
    copies: [Option<Vec<u8>>; 2],
    sb: Option<Superblock>,
    pos: u64,
    in_flight: bool,
    header: Option<EntryHeader>,
    entries: Vec<(u64, EntryHeader)>,
    expected: BTreeMap<VolumeId, LogSeq>,
    last_incarnation: u64,
    /// Why the scan stopped (for the log line).
    stop_reason: String,
    /// Read errors retried so far; a device that keeps failing fails recovery.
    read_errors: u32,
}

/// Read errors recovery retries before it gives up on the device.
const RECOVERY_READ_RETRIES_MAX: u32 = 1_000;

impl Recovery {
    pub fn new() -> Recovery {
        Recovery {
            phase: Phase::Superblocks,
            copies: [None, None],
            sb: None,
            pos: 0,
            in_flight: false,
            header: None,
            entries: Vec::new(),
            expected: BTreeMap::new(),
            last_incarnation: 0,
            stop_reason: String::new(),
            read_errors: 0,
        }
    }

    /// The scan is over (the log is replayed, or recovery failed).
    pub(crate) fn finished(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    pub fn start(&mut self, e: &mut Engine) {
        for copy in 0..SUPERBLOCK_COPIES as usize {
            let token = e.token(FlashOp::Recovery(RecoveryRead::Superblock(copy)));
            e.flash.submit_read(token, copy as u64 * BLOCK_SIZE_U64, BLOCK_SIZE_U64);
        }
        self.in_flight = true;
    }

    fn fail(&mut self, e: &mut Engine, why: String) {
        tracing::error!(device = e.cfg.device_id, "recovery failed: {why}");
        e.state = EngineState::Failed(why);
        self.phase = Phase::Done;
    }

    pub fn on_read(&mut self, e: &mut Engine, done: IoDone, what: RecoveryRead) {
        let data = match done.result {
            Ok(d) => d,
            Err(err) if self.read_errors >= RECOVERY_READ_RETRIES_MAX => {
                return self.fail(e, format!("flash read failed during recovery: {err}"))
            }
            Err(err) => {
                self.read_errors += 1;
                tracing::warn!(error = %err, ?what, "flash read failed during recovery; retrying");
                let (offset, len) = match what {
                    RecoveryRead::Superblock(copy) => (copy as u64 * BLOCK_SIZE_U64, BLOCK_SIZE_U64),
                    RecoveryRead::Header(pos) => (e.layout.log_offset(pos), BLOCK_SIZE_U64),
                    RecoveryRead::Entry(pos) => {
                        (e.layout.log_offset(pos), self.header.as_ref().expect("recovery: entry read").entry_bytes())
                    }
                };
                let token = e.token(FlashOp::Recovery(what));
                e.flash.submit_read(token, offset, len);
                return;
            }
        };
        match what {
            RecoveryRead::Superblock(copy) => {
                self.copies[copy] = Some(data);
                if self.copies.iter().all(|c| c.is_some()) {
                    self.in_flight = false;
                    let chosen = Superblock::choose(self.copies[0].as_ref().unwrap(), self.copies[1].as_ref().unwrap());
                    match chosen {
                        Ok(sb) => self.begin_scan(e, sb),
                        Err(err) => self.fail(e, format!("no valid superblock: {err}")),
                    }
                }
            }
            RecoveryRead::Header(pos) => {
                self.in_flight = false;
                self.on_header(e, pos, &data);
            }
            RecoveryRead::Entry(pos) => {
                self.in_flight = false;
                let h = self.header.take().expect("recovery: entry read without header");
                if let Err(err) = h.verify_data(&data[BLOCK_SIZE..]) {
                    return self.finish(e, format!("entry at {pos}: {err}"));
                }
                self.accept(e, pos, h);
            }
        }
    }

    fn begin_scan(&mut self, e: &mut Engine, sb: Superblock) {
        let l = e.layout;
        if (sb.log_start, sb.log_bytes, sb.cache_start, sb.cache_slots)
            != (l.log_start, l.log_bytes, l.cache_start, l.cache_slots)
        {
            return self.fail(e, "superblock layout does not match this device and configuration".into());
        }
        if sb.device_id != e.cfg.device_id {
            return self.fail(e, format!("device id {} in superblock, {} configured", sb.device_id, e.cfg.device_id));
        }
        for v in &sb.volumes {
            if !e.volumes.iter().any(|c| c.id == v.id) {
                return self.fail(e, format!("{} has data on this device but is not configured", v.id));
            }
        }
        tracing::info!(generation = sb.generation, tail = sb.log_tail, "superblock loaded; replaying log");
        self.pos = sb.log_tail;
        self.last_incarnation = 0;
        self.sb = Some(sb);
        self.phase = Phase::Scan;
    }

    fn on_header(&mut self, e: &mut Engine, pos: u64, data: &[u8]) {
        let sb = self.sb.as_ref().unwrap();
        let cap = e.layout.log_bytes;
        let h = match EntryHeader::decode(data) {
            Ok(h) => h,
            Err(err) => return self.finish(e, format!("at {pos}: {err}")),
        };
        if h.log_pos != pos {
            return self.finish(e, format!("at {pos}: entry from position {} (earlier lap)", h.log_pos));
        }
        let current = pos >= sb.incarnation_start;
        if (current && h.incarnation != sb.incarnation)
            || (!current && h.incarnation >= sb.incarnation)
            || h.incarnation < self.last_incarnation
        {
            return self.finish(e, format!("at {pos}: incarnation {} out of order", h.incarnation));
        }
        if h.kind == EntryKind::Pad {
            self.last_incarnation = h.incarnation;
            self.entries.push((pos, h));
            self.pos = (pos / cap + 1) * cap;
            return;
        }
        let bytes = h.entry_bytes();
        if pos % cap + bytes > cap || pos + bytes - sb.log_tail > cap {
            return self.finish(e, format!("at {pos}: entry overruns the log"));
        }
        let Some(vol) = sb.volume(h.volume) else {
            return self.finish(e, format!("at {pos}: entry of unknown {}", h.volume));
        };
        if h.epoch > vol.epoch {
            return self.finish(e, format!("at {pos}: {} newer than the volume's {}", h.epoch, vol.epoch));
        }
        // Sequence numbers rise by one per entry, except across numbers the watermark already
        // covers: entries whose log write failed were destaged from memory and left no entry.
        let next = self.expected.get(&h.volume).copied().unwrap_or(LogSeq(0));
        let gap_is_clean = h.seq.0.saturating_sub(1) <= vol.watermark.0;
        if h.seq < next || (h.seq > next && next != LogSeq(0) && !gap_is_clean) {
            return self.finish(e, format!("at {pos}: {} where {} was expected", h.seq, next));
        }
        if next == LogSeq(0) && !gap_is_clean {
            tracing::error!(volume = h.volume.0, seq = h.seq.0, watermark = vol.watermark.0, "log gap after watermark");
            return self.finish(e, format!("at {pos}: gap after the watermark of {}", h.volume));
        }
        self.header = Some(h);
        let token = e.token(FlashOp::Recovery(RecoveryRead::Entry(pos)));
        e.flash.submit_read(token, e.layout.log_offset(pos), bytes);
        self.in_flight = true;
    }

    fn accept(&mut self, e: &mut Engine, pos: u64, h: EntryHeader) {
        let _ = e;
        self.last_incarnation = h.incarnation;
        self.expected.insert(h.volume, h.seq.next());
        self.entries.push((pos, h));
        self.pos = pos + h.entry_bytes();
    }

    fn finish(&mut self, e: &mut Engine, reason: String) {
        self.stop_reason = reason;
        let sb = self.sb.take().unwrap();
        tracing::info!(
            entries = self.entries.len(),
            head = self.pos,
            stop = %self.stop_reason,
            "log replay done"
        );
        tracing::debug!(
            tail = sb.log_tail,
            entries = ?self.entries.iter().map(|(p, h)| (*p, h.volume.0, h.seq.0, h.incarnation)).collect::<Vec<_>>(),
            "replayed entries"
        );
        let entries = std::mem::take(&mut self.entries);
        e.install_recovered(&sb, self.pos, entries);
        self.phase = Phase::Done;
    }

    /// Issues the next read of the scan; returns the work done.
    pub fn poll(&mut self, e: &mut Engine, now: u64) -> usize {
        let _ = now;
        match self.phase {
            Phase::Scan if !self.in_flight => {
                let sb = self.sb.as_ref().unwrap();
                if self.pos - sb.log_tail >= e.layout.log_bytes {
                    self.finish(e, "scanned the whole log".into());
                    return 1;
                }
                let token = e.token(FlashOp::Recovery(RecoveryRead::Header(self.pos)));
                e.flash.submit_read(token, e.layout.log_offset(self.pos), BLOCK_SIZE_U64);
                self.in_flight = true;
                1
            }
            _ => 0,
        }
    }
}
