//! One destage batch: the dirty entries of a volume up to a sequence number, collapsed (last
//! writer wins), cut into SAN runs of adjacent blocks, and the log reads that fill them.
//!
//! Planning works on metadata only: the batch's entries go into an extent map in sequence
//! order (the same [`DirtyIndex`] the engine uses), so whatever a later entry overwrote is
//! never read or written. What survives becomes runs in LBA order — data runs of up to
//! `DESTAGE_RUN_BLOCKS_MAX` contiguous blocks, zero and unmap runs without data — and the data
//! runs are filled from log reads: every entry with a surviving block is read whole (so its
//! checksum can be verified: the pair check of what the engine wrote), adjacent entries
//! together, in log order, up to `DESTAGE_READ_BYTES_MAX` per read. Reads are sequential and
//! large; a run is written to the SAN as soon as its last block has arrived.

use std::collections::VecDeque;
use std::rc::Rc;

use crate::constants::{BLOCK_SIZE, BLOCK_SIZE_U64, DESTAGE_READ_BYTES_MAX, DESTAGE_RUN_BLOCKS_MAX};
use crate::index::{DirtyIndex, DirtyLoc};
use crate::io::{AlignedBuf, BufPool};
use crate::link::DirtyRecord;
use crate::log::EntryKind;
use crate::types::{Lba, LogPos, LogSeq};

use super::supersede::Exclusion;

/// Largest zeroing or unmap command (1 GiB): Write Zeroes of a whole volume is a few commands.
const ZERO_RUN_BLOCKS_MAX: u64 = 1 << 18;
/// Entries this close in the log are read together (the frame headers between them included).
const READ_GAP_MAX: u64 = 64 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RunKind {
    Data,
    Zero,
    Unmap,
}

pub(crate) struct Run {
    pub lba: Lba,
    pub blocks: u64,
    pub kind: RunKind,
    /// The run's data (data runs), filled from log reads and memory.
    pub buf: Option<AlignedBuf>,
    /// Blocks not filled yet.
    pub missing: u64,
    /// Sent to the SAN (until it failed and waits to be sent again), and written.
    pub sent: bool,
    pub done: bool,
}

impl Run {
    /// Whether the run writes any of `lba..lba + blocks`.
    pub fn overlaps(&self, lba: Lba, blocks: u64) -> bool {
        self.lba.overlaps(self.blocks, lba, blocks)
    }
}

/// A piece of a read that goes into a run.
pub(crate) struct Copy {
    /// Byte offset in the read.
    pub from: usize,
    pub run: usize,
    /// Byte offset in the run.
    pub to: usize,
    pub len: usize,
}

pub(crate) struct LogRead {
    pub pos: LogPos,
    pub len: u64,
    /// Entries read whole: (byte offset in the read, bytes, data checksum, seq).
    pub checks: Vec<(usize, usize, u32, LogSeq)>,
    pub copies: Vec<Copy>,
}

pub(crate) struct Batch {
    /// Tells this batch's I/O from another's (a planned batch becomes the current one while its
    /// reads are in flight).
    pub id: u64,
    pub upto: LogSeq,
    pub runs: Vec<Run>,
    pub reads: Vec<LogRead>,
    /// Reads issued so far (in order).
    pub next_read: usize,
    pub reads_in_flight: usize,
    pub reads_done: usize,
    /// Runs whose data is complete, not yet sent to the SAN.
    pub ready: VecDeque<usize>,
    pub runs_done: usize,
    /// SAN writes of this batch in flight.
    pub in_flight: usize,
    pub flush_in_flight: bool,
    /// Bytes the batch writes to the SAN (data runs).
    pub bytes: u64,
    pub started_ns: u64,
    pub writes_started_ns: u64,
    pub flush_sent_ns: u64,
}

impl Batch {
    /// Plans the batch of `records` (sequence order, all ≤ `upto`) of a log whose laps are
    /// `lap_bytes` long. Blocks of an `exclusions` range are not written from entries below its
    /// `before`: a superseding write put newer data on the SAN (`supersede.rs`).
    pub fn plan(
        id: u64,
        upto: LogSeq,
        mut records: Vec<DirtyRecord>,
        exclusions: &[Exclusion],
        lap_bytes: u64,
        pool: &mut BufPool,
        now: u64,
    ) -> Batch {
        let mut ix = DirtyIndex::default();
        let mut memories = Vec::new();
        let mut in_memory = vec![false; records.len()];
        for (i, r) in records.iter_mut().enumerate() {
            if r.kind == EntryKind::SanWritten {
                // Everything before it in the batch is older: the SAN holds its blocks.
                ix.remove_range(r.lba, r.blocks);
                continue;
            }
            let loc = match (r.kind, r.memory.take()) {
                (EntryKind::Write, Some(m)) => {
                    let m = Rc::new(m);
                    memories.push(m.clone());
                    in_memory[i] = true;
                    DirtyLoc::Memory { buf: m, first_block: 0 }
                }
                (EntryKind::Write, None) => DirtyLoc::Log { data_pos: r.data_pos },
                (k, _) => DirtyLoc::Zero { unmap: k == EntryKind::Unmap },
            };
            ix.insert(r.lba, r.blocks, r.seq, loc);
        }
        for e in exclusions {
            ix.remove_clean(e.lba, e.blocks, LogSeq(e.before.0.saturating_sub(1)));
        }
        // Runs in LBA order, and where each data piece comes from.
        let mut runs: Vec<Run> = Vec::new();
        let mut pieces: Vec<(usize, u64, u64, DirtyLoc)> = Vec::new();
        for (lba, e) in ix.iter() {
            let (kind, max) = match e.loc {
                DirtyLoc::Zero { unmap: false } => (RunKind::Zero, ZERO_RUN_BLOCKS_MAX),
                DirtyLoc::Zero { unmap: true } => (RunKind::Unmap, ZERO_RUN_BLOCKS_MAX),
                _ => (RunKind::Data, DESTAGE_RUN_BLOCKS_MAX),
            };
            let mut at = 0;
            while at < e.blocks {
                let start = lba.0 + at;
                let joins =
                    runs.last().is_some_and(|r| r.kind == kind && r.lba.0 + r.blocks == start && r.blocks < max);
                if !joins {
                    runs.push(Run {
                        lba: Lba(start),
                        blocks: 0,
                        kind,
                        buf: None,
                        missing: 0,
                        sent: false,
                        done: false,
                    });
                }
                let ri = runs.len() - 1;
                let run = &mut runs[ri];
                let n = (e.blocks - at).min(max - run.blocks);
                if kind == RunKind::Data {
                    pieces.push((ri, run.blocks, n, e.loc.advanced(at)));
                }
                run.blocks += n;
                at += n;
            }
        }
        let mut bytes = 0;
        for r in &mut runs {
            if r.kind == RunKind::Data {
                r.buf = Some(pool.get((r.blocks * BLOCK_SIZE_U64) as usize));
                r.missing = r.blocks;
                bytes += r.blocks * BLOCK_SIZE_U64;
            }
        }
        // Log records with data, by position (a volume's entries are in log order).
        let logged: Vec<&DirtyRecord> = records
            .iter()
            .zip(&in_memory)
            .filter(|(r, mem)| r.kind == EntryKind::Write && !**mem)
            .map(|(r, _)| r)
            .collect();
        let mut needed = vec![false; logged.len()];
        let mut log_pieces = Vec::new();
        for (ri, run_off, n, loc) in pieces {
            match loc {
                DirtyLoc::Memory { buf, first_block } => {
                    let from = first_block as usize * BLOCK_SIZE;
                    let to = run_off as usize * BLOCK_SIZE;
                    let len = n as usize * BLOCK_SIZE;
                    let run = &mut runs[ri];
                    if let Some(b) = run.buf.as_mut() {
                        b[to..to + len].copy_from_slice(&buf[from..from + len]);
                    }
                    run.missing -= n;
                }
                DirtyLoc::Log { data_pos } => {
                    let i = logged.partition_point(|r| r.data_pos <= data_pos) - 1;
                    needed[i] = true;
                    log_pieces.push((i, data_pos.since(logged[i].data_pos), ri, run_off, n));
                }
                DirtyLoc::Zero { .. } => unreachable!("batch: zero extent in a data run"),
            }
        }
        drop(ix);
        for m in memories {
            if let Ok(b) = Rc::try_unwrap(m) {
                pool.put(b);
            }
        }
        // Reads: needed entries, adjacent ones together, never across the end of a lap.
        let mut reads: Vec<LogRead> = Vec::new();
        let mut read_of = vec![(usize::MAX, 0usize); logged.len()];
        for (i, r) in logged.iter().enumerate() {
            if !needed[i] {
                continue;
            }
            let len = r.blocks * BLOCK_SIZE_U64;
            let end = r.data_pos.plus(len);
            let joins = reads.last().is_some_and(|cur| {
                let cur_end = cur.pos.plus(cur.len);
                r.data_pos >= cur_end
                    && r.data_pos.since(cur_end) <= READ_GAP_MAX
                    && end.since(cur.pos) <= DESTAGE_READ_BYTES_MAX
                    && cur.pos.0 / lap_bytes == (end.0 - 1) / lap_bytes
            });
            if !joins {
                reads.push(LogRead { pos: r.data_pos, len: 0, checks: Vec::new(), copies: Vec::new() });
            }
            let ri = reads.len() - 1;
            let read = &mut reads[ri];
            let off = r.data_pos.since(read.pos) as usize;
            read.len = end.since(read.pos);
            read.checks.push((off, len as usize, r.data_crc, r.seq));
            read_of[i] = (ri, off);
        }
        for (i, in_record, run, run_off, n) in log_pieces {
            let (ri, off) = read_of[i];
            reads[ri].copies.push(Copy {
                from: off + in_record as usize,
                run,
                to: run_off as usize * BLOCK_SIZE,
                len: n as usize * BLOCK_SIZE,
            });
        }
        let ready = runs.iter().enumerate().filter(|(_, r)| r.missing == 0).map(|(i, _)| i).collect();
        Batch {
            id,
            upto,
            runs,
            reads,
            next_read: 0,
            reads_in_flight: 0,
            reads_done: 0,
            ready,
            runs_done: 0,
            in_flight: 0,
            flush_in_flight: false,
            bytes,
            started_ns: now,
            writes_started_ns: 0,
            flush_sent_ns: 0,
        }
    }

    /// A read's data arrived: checks each entry in it, then fills the runs. An entry whose
    /// checksum fails makes the read fail (the caller retries it: dirty data is never skipped).
    pub fn read_done(&mut self, read: usize, data: &[u8]) -> Result<(), String> {
        let r = &self.reads[read];
        for &(off, len, crc, seq) in &r.checks {
            if crc32c::crc32c(&data[off..off + len]) != crc {
                return Err(format!("{seq} at log pos {}: data checksum mismatch", r.pos.0 + off as u64));
            }
        }
        for c in &r.copies {
            let run = &mut self.runs[c.run];
            if let Some(b) = run.buf.as_mut() {
                b[c.to..c.to + c.len].copy_from_slice(&data[c.from..c.from + c.len]);
            }
            run.missing -= (c.len / BLOCK_SIZE) as u64;
            if run.missing == 0 {
                self.ready.push_back(c.run);
            }
        }
        self.reads_done += 1;
        Ok(())
    }

    /// Every run is on the SAN.
    pub fn all_written(&self) -> bool {
        self.runs_done == self.runs.len()
    }
}
