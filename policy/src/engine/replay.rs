//! Crash recovery as a state machine: read the superblock copies, then stream the log from the
//! persisted tail in large windows (several in flight, like a sequential read of the device)
//! and parse frames out of them, checking each whole, until the first frame that is not
//! provably part of the log.
//!
//! A frame is rejected — and replay ends there — when its header does not decode or its
//! checksum fails (a torn or never-written frame), when its recorded position is not where it
//! sits (a leftover of an earlier lap), when its incarnation goes backwards or does not match
//! the superblock's (a survivor of a tail dropped by an earlier recovery), when an entry is of
//! an unknown volume, newer than the volume's epoch, or not the volume's next sequence number,
//! or when any entry's data fails its checksum. Because frames are acknowledged strictly in log
//! order, nothing acknowledged lies beyond that point.
//!
//! The engine persists a superblock with a new incarnation (and where it starts) before it
//! writes anything, so frames written from then on can be told apart from stale ones at the
//! same positions (a case the simulator found: seed 104684).
//!
//! It does no I/O: [`Replay::poll`] returns the reads to issue, [`Replay::on_read`] takes
//! their data, and [`Replay::outcome`] holds the result once the scan is over.

use std::collections::{BTreeMap, HashMap};

use crate::constants::{BLOCK_SIZE_U64, REPLAY_WINDOWS_IN_FLIGHT, REPLAY_WINDOW_BYTES, REPLAY_WINDOW_BYTES_FIRST};
use crate::io::{AlignedBuf, BufPool, IoError};
use crate::log::{FrameHeader, FrameKind, Layout, Superblock};
use crate::types::{Incarnation, LogPos, LogSeq, VolumeId};

/// A read replay wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReplayRead {
    Superblock(usize),
    /// `len` bytes of log from `start` (never across the end of a lap).
    Window {
        start: LogPos,
        len: u64,
    },
}

/// What replay found.
pub(crate) struct ReplayOutcome {
    pub sb: Superblock,
    /// Where the log continues (the first position not replayed).
    pub head: LogPos,
    /// Every frame recovered, in log order (a damaged frame's lost entries are in `damage`).
    pub frames: Vec<(LogPos, FrameHeader)>,
    pub stop_reason: String,
    /// Acknowledged frames (or regions) found damaged.
    pub damage: Vec<Damage>,
    /// Frame headers read from their mirror half.
    pub repaired: u64,
}

/// A damaged part of the log that later frames prove was acknowledged.
#[derive(Clone, Debug)]
pub(crate) struct Damage {
    pub pos: LogPos,
    pub end: LogPos,
    pub why: String,
    /// The entries whose data failed their checks (the frame's header was readable), or None:
    /// nothing in `pos..end` could be read, so which blocks it held is unknown.
    pub lost: Option<Vec<crate::log::EntryHeader>>,
}

/// A stretch of log that is not (yet) provably part of it.
struct Suspect {
    pos: LogPos,
    end: LogPos,
    why: String,
    /// A later frame's `acked_upto` lies beyond `pos`.
    proven: bool,
    /// The frame's header was readable (its extent and entries are known).
    known: bool,
}

/// How far past a suspect replay looks for a frame that proves it acknowledged: more than the
/// largest frame, so garbage over a whole frame is scanned past.
const SCAN_BYTES_MAX: u64 = 2 * (crate::constants::FRAME_DATA_BLOCKS_MAX as u64 + 1) * BLOCK_SIZE_U64 + (64 << 10);

enum Phase {
    Superblocks { copies: [Option<AlignedBuf>; 2] },
    Scan,
    Done,
}

/// Read errors replay retries before it gives up on the device.
const READ_RETRIES_MAX: u32 = 1_000;

pub(crate) struct Replay {
    phase: Phase,
    layout: Layout,
    /// What the engine expects: refuse a superblock of another device or configuration.
    /// `None` when inspecting (take the superblock as it is).
    expect: Option<(u64, Vec<VolumeId>)>,
    sb: Option<Superblock>,
    cursor: LogPos,
    next_window: LogPos,
    /// Size of the next window (doubles up to `REPLAY_WINDOW_BYTES`).
    window_bytes: u64,
    /// Windows parsed to their end so far: as many more may be in flight (up to
    /// `REPLAY_WINDOWS_IN_FLIGHT`), so a log with little in it is read a window at a time.
    windows_done: usize,
    /// Windows by start position: `None` while the read is in flight.
    windows: BTreeMap<u64, Option<AlignedBuf>>,
    frames: Vec<(LogPos, FrameHeader)>,
    expected: HashMap<VolumeId, LogSeq>,
    suspects: Vec<Suspect>,
    /// Indexes of failed entries per damaged frame position.
    lost_entries: HashMap<LogPos, Vec<usize>>,
    /// Sequence numbers may jump (past a region of unknown entries).
    gaps_ok: bool,
    repaired: u64,
    /// Mutation for the damage test (`Bugs::replay_stops_at_damage`).
    pub stops_at_damage: bool,
    last_incarnation: Incarnation,
    read_errors: u32,
    /// Reads to issue at the next poll (initial superblock reads, retries).
    pending: Vec<ReplayRead>,
    outcome: Option<Result<ReplayOutcome, String>>,
}

impl Replay {
    /// A replay of the device laid out as `layout`; `expect` = (device id, configured volumes).
    pub fn new(layout: Layout, expect: Option<(u64, Vec<VolumeId>)>) -> Replay {
        Replay {
            phase: Phase::Superblocks { copies: [None, None] },
            layout,
            expect,
            sb: None,
            cursor: LogPos(0),
            next_window: LogPos(0),
            window_bytes: REPLAY_WINDOW_BYTES_FIRST,
            windows_done: 0,
            windows: BTreeMap::new(),
            frames: Vec::new(),
            expected: HashMap::new(),
            suspects: Vec::new(),
            lost_entries: HashMap::new(),
            gaps_ok: false,
            repaired: 0,
            stops_at_damage: false,
            last_incarnation: Incarnation(0),
            read_errors: 0,
            pending: vec![ReplayRead::Superblock(0), ReplayRead::Superblock(1)],
            outcome: None,
        }
    }

    pub fn finished(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// The result, once [`Replay::finished`]; taken once.
    pub fn take_outcome(&mut self) -> Option<Result<ReplayOutcome, String>> {
        self.outcome.take()
    }

    /// Device offset and length of a read.
    pub fn extent(&self, r: ReplayRead) -> (u64, u64) {
        match r {
            ReplayRead::Superblock(copy) => (copy as u64 * BLOCK_SIZE_U64, BLOCK_SIZE_U64),
            ReplayRead::Window { start, len } => (self.layout.log_offset(start), len),
        }
    }

    /// Reads to issue now.
    pub fn poll(&mut self) -> Vec<ReplayRead> {
        let mut out = std::mem::take(&mut self.pending);
        if let (Phase::Scan, Some(sb)) = (&self.phase, &self.sb) {
            let end = sb.log_tail.plus(self.layout.log_bytes);
            let in_flight = self.windows.values().filter(|w| w.is_none()).count() + out.len();
            let allowed = REPLAY_WINDOWS_IN_FLIGHT.min(self.windows_done + 1);
            let mut room = allowed.saturating_sub(in_flight);
            while room > 0 && self.next_window < end {
                let lap_end = (self.next_window.0 / self.layout.log_bytes + 1) * self.layout.log_bytes;
                let len = self.window_bytes.min(lap_end - self.next_window.0).min(end.since(self.next_window));
                self.window_bytes = (self.window_bytes * 2).min(REPLAY_WINDOW_BYTES);
                let start = self.next_window;
                self.windows.insert(start.0, None);
                out.push(ReplayRead::Window { start, len });
                self.next_window = start.plus(len);
                room -= 1;
            }
        }
        out
    }

    fn fail(&mut self, why: String) {
        self.phase = Phase::Done;
        self.outcome = Some(Err(why));
        self.windows.clear();
    }

    /// A read came back (with its buffer, which replay keeps or returns to `pool`).
    pub fn on_read(&mut self, r: ReplayRead, result: Result<(), IoError>, buf: AlignedBuf, pool: &mut BufPool) {
        if matches!(self.phase, Phase::Done) {
            pool.put(buf);
            return;
        }
        if let Err(e) = result {
            pool.put(buf);
            if self.read_errors >= READ_RETRIES_MAX {
                return self.fail(format!("flash read failed during recovery: {e}"));
            }
            self.read_errors += 1;
            tracing::warn!(error = %e, ?r, "flash read failed during recovery; retrying");
            self.pending.push(r);
            return;
        }
        match r {
            ReplayRead::Superblock(copy) => {
                let Phase::Superblocks { copies } = &mut self.phase else { return pool.put(buf) };
                copies[copy] = Some(buf);
                if let [Some(a), Some(b)] = copies {
                    let chosen = Superblock::choose(a, b);
                    let [a, b] = std::mem::take(copies);
                    pool.put(a.expect("both copies"));
                    pool.put(b.expect("both copies"));
                    match chosen {
                        Ok(sb) => self.begin_scan(sb),
                        Err(e) => self.fail(format!("no valid superblock: {e}")),
                    }
                }
            }
            ReplayRead::Window { start, .. } => {
                if let Some(slot) = self.windows.get_mut(&start.0) {
                    *slot = Some(buf);
                } else {
                    pool.put(buf);
                }
                self.parse(pool);
            }
        }
    }

    fn begin_scan(&mut self, sb: Superblock) {
        let l = self.layout;
        if (sb.log_start, sb.log_bytes, sb.cache_start, sb.cache_slots)
            != (l.log_start, l.log_bytes, l.cache_start, l.cache_slots)
        {
            return self.fail("superblock layout does not match this device and configuration".into());
        }
        if let Some((device_id, volumes)) = &self.expect {
            if sb.device_id != *device_id {
                return self.fail(format!("device id {:#x} in superblock, {device_id:#x} configured", sb.device_id));
            }
            for v in &sb.volumes {
                // Replica copies kept for other nodes are not configured here.
                if v.source.is_none() && !volumes.contains(&v.id) {
                    return self.fail(format!("{} has data on this device but is not configured", v.id));
                }
            }
        }
        tracing::info!(generation = sb.generation, tail = sb.log_tail.0, "superblock loaded; replaying log");
        self.cursor = sb.log_tail;
        self.next_window = sb.log_tail;
        self.sb = Some(sb);
        self.phase = Phase::Scan;
    }

    /// Parses every frame whose bytes are all read.
    ///
    /// A frame that is not provably part of the log starts a *suspect*: replay goes on past it
    /// (past its known extent, or block by block looking for the next valid frame, at most
    /// `SCAN_BYTES_MAX` ahead) and keeps what it finds provisionally. A later valid frame whose
    /// `acked_upto` lies beyond a suspect proves the suspect was acknowledged: it is *damage*,
    /// and every intact entry around it is recovered. The first suspect nothing proves is the
    /// torn tail: replay ends there and drops everything after it.
    fn parse(&mut self, pool: &mut BufPool) {
        while matches!(self.phase, Phase::Scan) {
            let Some(sb) = &self.sb else { return };
            let cap = self.layout.log_bytes;
            if self.cursor.since(sb.log_tail) >= cap {
                return self.finish("scanned the whole log".into(), pool);
            }
            if let Some(s) = self.suspects.iter().rfind(|s| !s.proven) {
                if self.cursor.since(s.pos) > SCAN_BYTES_MAX {
                    return self.finish(s.why.clone(), pool);
                }
            }
            let Some(head_block) = self.bytes_at(self.cursor, BLOCK_SIZE_U64) else { return };
            let pos = self.cursor;
            let header = match FrameHeader::decode(&head_block) {
                Ok(h) => h,
                Err(e) => {
                    self.suspect_unknown(pos, format!("at {}: {e}", pos.0));
                    continue;
                }
            };
            if header.device_id != sb.device_id {
                let why = format!(
                    "at {}: frame of device {:#x}, not {:#x} (an earlier format)",
                    pos.0, header.device_id, sb.device_id
                );
                self.suspect_unknown(pos, why);
                continue;
            }
            if header.pos != pos {
                self.suspect_unknown(pos, format!("at {}: frame from position {} (earlier lap)", pos.0, header.pos.0));
                continue;
            }
            let current = pos >= sb.incarnation_start;
            if (current && header.incarnation != sb.incarnation)
                || (!current && header.incarnation >= sb.incarnation)
                || header.incarnation < self.last_incarnation
            {
                self.suspect_unknown(pos, format!("at {}: {} out of order", pos.0, header.incarnation));
                continue;
            }
            if header.kind == FrameKind::Pad {
                self.last_incarnation = header.incarnation;
                self.prove(header.acked_upto);
                self.cursor = LogPos((pos.0 / cap + 1) * cap);
                self.frames.push((pos, header));
                self.drop_windows_before(pool);
                continue;
            }
            let bytes = header.bytes();
            if pos.0 % cap + bytes > cap || pos.plus(bytes).since(sb.log_tail) > cap {
                self.suspect_unknown(pos, format!("at {}: frame overruns the log", pos.0));
                continue;
            }
            let Some(frame) = self.bytes_at(pos, bytes) else { return };
            let mut bad = Vec::new();
            let mut why = None;
            for (i, e) in header.entries.iter().enumerate() {
                let at = header.data_offset(i) as usize;
                if let Err(err) = e.verify_data(&frame[at..at + e.data_bytes() as usize]) {
                    why.get_or_insert_with(|| format!("at {}: entry {i} ({} {}): {err}", pos.0, e.volume, e.seq));
                    bad.push(i);
                }
            }
            let seq_ok = match self.check_entries(&header) {
                Ok(()) => true,
                Err(w) => {
                    // A frame whose header checks out but whose entries break the sequence
                    // rules: none of its entries can be trusted.
                    why = Some(format!("at {}: {w}", pos.0));
                    bad = (0..header.entries.len()).collect();
                    false
                }
            };
            if FrameHeader::mirror_only(&head_block) {
                tracing::warn!(pos = pos.0, "frame header repaired from its mirror");
                self.repaired += 1;
            }
            if seq_ok {
                // Entries whose data failed still take their sequence numbers.
                for e in &header.entries {
                    self.expected.insert(e.volume, e.seq.next());
                }
            }
            self.last_incarnation = header.incarnation;
            self.prove(header.acked_upto);
            if let Some(why) = why {
                self.suspects.push(Suspect { pos, end: pos.plus(bytes), why, proven: false, known: true });
                self.lost_entries.insert(pos, bad);
            }
            self.cursor = pos.plus(bytes);
            self.frames.push((pos, header));
            self.drop_windows_before(pool);
        }
    }

    /// A block that starts no valid frame: a suspect of unknown extent (or the one being
    /// scanned grows); replay looks at the next block.
    fn suspect_unknown(&mut self, pos: LogPos, why: String) {
        match self.suspects.last_mut() {
            Some(s) if !s.known && s.end == pos => s.end = pos.plus(BLOCK_SIZE_U64),
            _ => self.suspects.push(Suspect { pos, end: pos.plus(BLOCK_SIZE_U64), why, proven: false, known: false }),
        }
        // Past a region whose entries are unknown, sequence numbers may jump.
        self.gaps_ok = true;
        self.cursor = pos.plus(BLOCK_SIZE_U64);
    }

    /// A valid frame says everything before `acked_upto` was acknowledged when it was cut.
    fn prove(&mut self, acked_upto: LogPos) {
        if self.stops_at_damage {
            return;
        }
        for s in self.suspects.iter_mut().filter(|s| s.pos < acked_upto) {
            s.proven = true;
        }
    }

    /// Sequence and epoch rules for a frame's entries, in order.
    fn check_entries(&self, header: &FrameHeader) -> Result<(), String> {
        let Some(sb) = &self.sb else { return Err("no superblock".into()) };
        let mut expected = self.expected.clone();
        for e in &header.entries {
            let Some(vol) = sb.volume(e.volume) else { return Err(format!("entry of unknown {}", e.volume)) };
            if e.epoch > vol.epoch {
                return Err(format!("{} newer than the volume's {}", e.epoch, vol.epoch));
            }
            // Sequence numbers rise by one per entry, except across numbers the watermark
            // already covers: entries whose log write failed were destaged from memory.
            let next = expected.get(&e.volume).copied().unwrap_or(LogSeq(0));
            // A replica copy continues wherever its source's link resumed: numbers only rise.
            let gap_is_clean = e.seq.0.saturating_sub(1) <= vol.watermark.0 || vol.source.is_some() || self.gaps_ok;
            if e.seq < next || (e.seq > next && !gap_is_clean) {
                if next == LogSeq(0) {
                    tracing::error!(
                        volume = e.volume.0,
                        seq = e.seq.0,
                        watermark = vol.watermark.0,
                        "log gap after watermark"
                    );
                    return Err(format!("gap after the watermark of {}", e.volume));
                }
                return Err(format!("{} {} where {} was expected", e.volume, e.seq, next));
            }
            expected.insert(e.volume, e.seq.next());
        }
        Ok(())
    }

    /// `len` bytes of log from `pos` if every window they span is read; copies only when the
    /// span crosses windows.
    fn bytes_at(&self, pos: LogPos, len: u64) -> Option<std::borrow::Cow<'_, [u8]>> {
        let (&start, w) = self.windows.range(..=pos.0).next_back()?;
        let w = w.as_ref()?;
        let off = (pos.0 - start) as usize;
        if off as u64 + len <= w.len() as u64 {
            return Some(std::borrow::Cow::Borrowed(&w[off..off + len as usize]));
        }
        let mut out = Vec::with_capacity(len as usize);
        let mut at = pos.0;
        while (out.len() as u64) < len {
            let (&s, w) = self.windows.range(..=at).next_back()?;
            let w = w.as_ref()?;
            let o = (at - s) as usize;
            if o >= w.len() {
                return None;
            }
            let n = (w.len() - o).min(len as usize - out.len());
            out.extend_from_slice(&w[o..o + n]);
            at += n as u64;
        }
        Some(std::borrow::Cow::Owned(out))
    }

    fn drop_windows_before(&mut self, pool: &mut BufPool) {
        loop {
            let Some((&s, w)) = self.windows.iter().next() else { return };
            let done = w.as_ref().is_some_and(|w| s + w.len() as u64 <= self.cursor.0);
            if !done {
                return;
            }
            if let Some(Some(b)) = self.windows.remove(&s) {
                pool.put(b);
            }
            self.windows_done += 1;
        }
    }

    fn finish(&mut self, stop_reason: String, pool: &mut BufPool) {
        let Some(sb) = self.sb.take() else { return self.fail("no superblock".into()) };
        for (_, w) in std::mem::take(&mut self.windows) {
            if let Some(b) = w {
                pool.put(b);
            }
        }
        // The first suspect nothing proved is the torn tail: the log ends there.
        let mut head = self.cursor;
        let mut stop_reason = stop_reason;
        if let Some(t) = self.suspects.iter().position(|s| !s.proven) {
            head = self.suspects[t].pos;
            stop_reason = self.suspects[t].why.clone();
            self.suspects.truncate(t);
            self.frames.retain(|(pos, _)| *pos < head);
        }
        let frames = std::mem::take(&mut self.frames);
        let mut damage = Vec::new();
        for s in &self.suspects {
            if s.known {
                let lost = self.lost_entries.remove(&s.pos).unwrap_or_default();
                if let Some((_, h)) = frames.iter().find(|(p, _)| *p == s.pos) {
                    let entries = lost.iter().map(|&i| h.entries[i]).collect();
                    damage.push(Damage { pos: s.pos, end: s.end, why: s.why.clone(), lost: Some(entries) });
                }
            } else {
                damage.push(Damage { pos: s.pos, end: s.end, why: s.why.clone(), lost: None });
            }
        }
        for d in &damage {
            tracing::error!(
                pos = d.pos.0,
                end = d.end.0,
                "damaged log: {} (later frames prove it was acknowledged)",
                d.why
            );
        }
        tracing::info!(frames = frames.len(), head = head.0, damaged = damage.len(), stop = %stop_reason, "log replay done");
        self.phase = Phase::Done;
        self.outcome = Some(Ok(ReplayOutcome { sb, head, frames, stop_reason, damage, repaired: self.repaired }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::constants::{BLOCK_SIZE, LOG_BYTES_MIN};
    use crate::log::{EntryHeader, EntryKind, FrameStamp, SuperblockVolume};
    use crate::types::{Epoch, Lba};

    fn layout() -> Layout {
        Layout { log_start: 8192, log_bytes: LOG_BYTES_MIN, cache_start: 8192 + LOG_BYTES_MIN, cache_slots: 0 }
    }

    fn superblock() -> Superblock {
        Superblock {
            lost: Vec::new(),
            device_id: 9,
            generation: 3,
            incarnation: Incarnation(2),
            log_tail: LogPos(0),
            incarnation_start: LogPos(0),
            log_start: 8192,
            log_bytes: LOG_BYTES_MIN,
            cache_start: 8192 + LOG_BYTES_MIN,
            cache_slots: 0,
            volumes: vec![SuperblockVolume {
                id: VolumeId(1),
                epoch: Epoch(1),
                blocks: 100,
                watermark: LogSeq(0),
                intent: LogSeq(0),
                source: None,
            }],
        }
    }

    /// A log image of `frames` frames of `per` one-block writes each, from position 0.
    fn log_image(frames: usize, per: usize) -> Vec<u8> {
        log_image_of(9, frames, per)
    }

    /// The same, written by device `device`; each frame claims every frame before it was
    /// acknowledged when it was cut.
    fn log_image_of(device: u64, frames: usize, per: usize) -> Vec<u8> {
        log_image_acked(device, frames, per, |k| k)
    }

    /// Frame `k` claims the frames before frame `acked(k)` were acknowledged when it was cut.
    fn log_image_acked(device: u64, frames: usize, per: usize, acked: impl Fn(usize) -> usize) -> Vec<u8> {
        let mut img = vec![0u8; LOG_BYTES_MIN as usize];
        let mut pos = 0usize;
        let mut seq = 1;
        let frame_bytes = (1 + per) * BLOCK_SIZE;
        for k in 0..frames {
            let mut entries = Vec::new();
            let mut data = Vec::new();
            for _ in 0..per {
                let block = vec![seq as u8; BLOCK_SIZE];
                entries.push(EntryHeader {
                    kind: EntryKind::Write,
                    volume: VolumeId(1),
                    epoch: Epoch(1),
                    seq: LogSeq(seq),
                    lba: Lba(seq % 100),
                    blocks: 1,
                    data_crc: crc32c::crc32c(&block),
                });
                data.extend_from_slice(&block);
                seq += 1;
            }
            let stamp = FrameStamp::new(device, Incarnation(2), LogPos((acked(k) * frame_bytes) as u64));
            FrameHeader::encode(FrameKind::Data, stamp, LogPos(pos as u64), &entries, &mut img[pos..]);
            img[pos + BLOCK_SIZE..pos + BLOCK_SIZE + data.len()].copy_from_slice(&data);
            pos += BLOCK_SIZE + data.len();
        }
        img
    }

    /// Runs a replay against an in-memory image, serving reads in the order given.
    fn run(img: &[u8]) -> ReplayOutcome {
        let mut pool = BufPool::new(8);
        let mut r = Replay::new(layout(), Some((9, vec![VolumeId(1)])));
        let sb = superblock().encode();
        let mut rounds = 0;
        while !r.finished() {
            rounds += 1;
            assert!(rounds < 10_000, "replay does not finish");
            let reads = r.poll();
            // Serve the later windows first: completions come back in any order.
            for read in reads.into_iter().rev() {
                let (off, len) = r.extent(read);
                let mut buf = AlignedBuf::new(len as usize);
                match read {
                    ReplayRead::Superblock(_) => buf.copy_from_slice(&sb),
                    ReplayRead::Window { .. } => {
                        let o = (off - 8192) as usize;
                        buf.copy_from_slice(&img[o..o + len as usize]);
                    }
                }
                r.on_read(read, Ok(()), buf, &mut pool);
            }
        }
        r.take_outcome().unwrap().unwrap()
    }

    #[test]
    fn streams_the_log_in_windows_and_finds_every_frame() {
        // Frames of 31 blocks straddle the window boundaries (128 KiB, then doubling).
        let img = log_image(30, 30);
        let out = run(&img);
        assert_eq!(out.frames.len(), 30, "stop: {}", out.stop_reason);
        assert_eq!(out.head, LogPos(30 * 31 * 4096));
        assert!(out.stop_reason.contains("no frame here"), "{}", out.stop_reason);
    }

    #[test]
    fn frames_of_an_earlier_format_are_never_replayed() {
        // The device was reformatted (new device id 9) over a log of device 5 whose frames line
        // up exactly: same positions, incarnation and sequence numbers.
        let mut img = log_image_of(5, 10, 3);
        let new = log_image(2, 3);
        img[..2 * 4 * BLOCK_SIZE].copy_from_slice(&new[..2 * 4 * BLOCK_SIZE]);
        let out = run(&img);
        assert_eq!(out.frames.len(), 2);
        assert!(out.stop_reason.contains("earlier format"), "{}", out.stop_reason);
    }

    #[test]
    fn a_torn_data_block_in_the_tail_ends_replay_at_its_frame() {
        // Frames 7.. were cut while frame 6 was still in flight: nothing claims it acknowledged.
        let mut img = log_image_acked(9, 10, 3, |k| k.min(6));
        img[(6 * 4 + 2) * BLOCK_SIZE + 100] ^= 0xff;
        let out = run(&img);
        assert_eq!(out.frames.len(), 6);
        assert_eq!(out.head, LogPos(6 * 4 * 4096));
        assert!(out.damage.is_empty());
        assert!(out.stop_reason.contains("checksum"), "{}", out.stop_reason);
    }

    #[test]
    fn damage_in_an_acknowledged_frame_loses_only_its_entry() {
        // Frame 7 claims frame 6 was acknowledged: a flipped byte in frame 6's second entry is
        // damage, and every other entry, before and after, is recovered.
        let mut img = log_image(10, 3);
        img[(6 * 4 + 2) * BLOCK_SIZE + 100] ^= 0xff;
        let out = run(&img);
        assert_eq!(out.frames.len(), 10, "{}", out.stop_reason);
        assert_eq!(out.head, LogPos(10 * 4 * 4096));
        assert_eq!(out.damage.len(), 1);
        let lost = out.damage[0].lost.as_ref().expect("the frame header was readable");
        assert_eq!(lost.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![LogSeq(6 * 3 + 2)]);
    }

    #[test]
    fn a_torn_packed_header_block_in_the_tail_ends_replay_at_its_frame() {
        let mut img = log_image_acked(9, 10, 30, |k| k.min(4));
        // The header block of frame 4 lost its last sectors (a torn 4 KiB write): the first
        // half's entries and the whole mirror.
        let at = 4 * 31 * BLOCK_SIZE;
        img[at + 1024..at + BLOCK_SIZE].fill(0);
        let out = run(&img);
        assert_eq!(out.frames.len(), 4);
        assert!(out.stop_reason.contains("checksum"), "{}", out.stop_reason);
    }

    #[test]
    fn garbage_over_acknowledged_frames_is_damage_of_unknown_blocks_and_the_rest_is_recovered() {
        let mut img = log_image(20, 3);
        // 64 KiB of garbage from frame 2 on (frames are 16 KiB): frames 2-5 are unreadable.
        let at = 2 * 4 * BLOCK_SIZE;
        for (i, b) in img[at..at + (64 << 10)].iter_mut().enumerate() {
            *b = (i * 7 + 13) as u8;
        }
        let out = run(&img);
        assert_eq!(out.frames.len(), 16, "{}", out.stop_reason);
        assert_eq!(out.head, LogPos(20 * 4 * 4096));
        assert_eq!(out.damage.len(), 1);
        assert!(out.damage[0].lost.is_none(), "which blocks the garbage held is unknown");
        assert_eq!((out.damage[0].pos, out.damage[0].end), (LogPos(at as u64), LogPos((at + (64 << 10)) as u64)));
    }

    #[test]
    fn a_header_half_is_repaired_from_its_mirror() {
        let mut img = log_image(5, 3);
        img[4 * BLOCK_SIZE + 70] ^= 1; // frame 1's first entry header
        let out = run(&img);
        assert_eq!((out.frames.len(), out.damage.len(), out.repaired), (5, 0, 1));
    }
}
