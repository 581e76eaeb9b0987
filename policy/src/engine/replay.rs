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
    pub frames: Vec<(LogPos, FrameHeader)>,
    pub stop_reason: String,
}

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
    fn parse(&mut self, pool: &mut BufPool) {
        while matches!(self.phase, Phase::Scan) {
            let Some(sb) = &self.sb else { return };
            let cap = self.layout.log_bytes;
            if self.cursor.since(sb.log_tail) >= cap {
                return self.finish("scanned the whole log".into(), pool);
            }
            let Some(head_block) = self.bytes_at(self.cursor, BLOCK_SIZE_U64) else { return };
            let header = match FrameHeader::decode(&head_block) {
                Ok(h) => h,
                Err(e) => return self.finish(format!("at {}: {e}", self.cursor.0), pool),
            };
            let pos = self.cursor;
            if header.device_id != sb.device_id {
                return self.finish(
                    format!(
                        "at {}: frame of device {:#x}, not {:#x} (an earlier format)",
                        pos.0, header.device_id, sb.device_id
                    ),
                    pool,
                );
            }
            if header.pos != pos {
                return self.finish(format!("at {}: frame from position {} (earlier lap)", pos.0, header.pos.0), pool);
            }
            let current = pos >= sb.incarnation_start;
            if (current && header.incarnation != sb.incarnation)
                || (!current && header.incarnation >= sb.incarnation)
                || header.incarnation < self.last_incarnation
            {
                return self.finish(format!("at {}: {} out of order", pos.0, header.incarnation), pool);
            }
            if header.kind == FrameKind::Pad {
                self.last_incarnation = header.incarnation;
                self.cursor = LogPos((pos.0 / cap + 1) * cap);
                self.frames.push((pos, header));
                self.drop_windows_before(pool);
                continue;
            }
            let bytes = header.bytes();
            if pos.0 % cap + bytes > cap || pos.plus(bytes).since(sb.log_tail) > cap {
                return self.finish(format!("at {}: frame overruns the log", pos.0), pool);
            }
            if let Err(why) = self.check_entries(&header) {
                return self.finish(format!("at {}: {why}", pos.0), pool);
            }
            let Some(frame) = self.bytes_at(pos, bytes) else { return };
            for (i, e) in header.entries.iter().enumerate() {
                let at = header.data_offset(i) as usize;
                if let Err(err) = e.verify_data(&frame[at..at + e.data_bytes() as usize]) {
                    return self.finish(format!("at {}: entry {i} ({} {}): {err}", pos.0, e.volume, e.seq), pool);
                }
            }
            for e in &header.entries {
                self.expected.insert(e.volume, e.seq.next());
            }
            self.last_incarnation = header.incarnation;
            self.cursor = pos.plus(bytes);
            self.frames.push((pos, header));
            self.drop_windows_before(pool);
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
            let gap_is_clean = e.seq.0.saturating_sub(1) <= vol.watermark.0 || vol.source.is_some();
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
        tracing::info!(frames = self.frames.len(), head = self.cursor.0, stop = %stop_reason, "log replay done");
        for (_, w) in std::mem::take(&mut self.windows) {
            if let Some(b) = w {
                pool.put(b);
            }
        }
        self.phase = Phase::Done;
        self.outcome =
            Some(Ok(ReplayOutcome { sb, head: self.cursor, frames: std::mem::take(&mut self.frames), stop_reason }));
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

    /// The same, written by device `device`.
    fn log_image_of(device: u64, frames: usize, per: usize) -> Vec<u8> {
        let mut img = vec![0u8; LOG_BYTES_MIN as usize];
        let mut pos = 0usize;
        let mut seq = 1;
        for _ in 0..frames {
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
            let stamp = FrameStamp::new(device, Incarnation(2), LogPos(pos as u64));
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
    fn a_torn_data_block_ends_replay_at_its_frame() {
        let mut img = log_image(10, 3);
        // Frame 6 starts at 6 * 4 blocks; tear its second data block.
        img[(6 * 4 + 2) * BLOCK_SIZE + 100] ^= 0xff;
        let out = run(&img);
        assert_eq!(out.frames.len(), 6);
        assert_eq!(out.head, LogPos(6 * 4 * 4096));
        assert!(out.stop_reason.contains("checksum"), "{}", out.stop_reason);
    }

    #[test]
    fn a_torn_packed_header_block_ends_replay_at_its_frame() {
        let mut img = log_image(10, 30);
        // The header block of frame 4 lost its last sectors (a torn 4 KiB write).
        let at = 4 * 31 * BLOCK_SIZE;
        img[at + 1024..at + BLOCK_SIZE].fill(0);
        let out = run(&img);
        assert_eq!(out.frames.len(), 4);
        assert!(out.stop_reason.contains("checksum"), "{}", out.stop_reason);
    }
}
