//! The log appender: group commit of host writes into frames, the ring's space, and the order in
//! which frames may be acknowledged.
//!
//! Writes wait in `queue` in arrival order. Whenever fewer than `FRAMES_IN_FLIGHT_MAX` frames
//! are on their way, [`Appender::cut`] takes the longest prefix of the queue that fits one frame
//! (`FRAME_ENTRIES_MAX` headers, `FRAME_DATA_BLOCKS_MAX` data blocks), gives each entry the
//! next sequence number of its volume, reserves ring space and returns the frame to write: one
//! header block packing every entry header, followed by each entry's data in the host's own
//! buffer. At QD1 a write is cut into a frame of its own at once; under load, writes that
//! arrive while frames are in flight share the next one and one device flush.
//!
//! Frames are acknowledged strictly in log order ([`Appender::ackable`]): replay stops at the
//! first frame that is not whole, so acknowledging past a hole could lose an acknowledged write.
//! A frame whose write failed, and every frame after it that was not acknowledged yet, is
//! abandoned: its entries go to the SAN from memory instead.
//!
//! The appender does no I/O and knows nothing of the engine: it returns [`FrameWrite`]s for the
//! engine to carry out and is told of their completions.

use std::collections::VecDeque;

use crate::constants::{
    BLOCK_SIZE_U64, FRAMES_IN_FLIGHT_MAX, FRAME_DATA_BLOCKS_MAX, FRAME_ENTRIES_MAX, LOG_RECORD_RESERVE_BYTES,
};
use crate::io::AlignedBuf;
use crate::log::{EntryHeader, EntryKind, FrameKind, Ring};
use crate::types::{Epoch, Incarnation, Lba, LogPos, LogSeq, OpId, VolumeId};

/// A write waiting for a frame: a host's (with its op), or an entry a source sent for a
/// replica copy (`preset`: its header, sequence number and epoch are the source's).
pub(crate) struct Queued {
    pub vi: usize,
    pub op: Option<OpId>,
    pub kind: EntryKind,
    pub lba: Lba,
    pub blocks: u64,
    /// The host's data (`Write` entries).
    pub buf: Option<AlignedBuf>,
    /// When it was queued (a full log bounds the wait).
    pub since_ns: u64,
    /// It has waited for log space (counted once).
    pub waited: bool,
    pub preset: Option<EntryHeader>,
}

/// One entry of a frame, from the cut until its space is reclaimed.
pub(crate) struct FrameEntry {
    pub vi: usize,
    /// The host write; `None` once acknowledged (or for entries found by replay).
    pub op: Option<OpId>,
    pub header: EntryHeader,
    pub data_pos: LogPos,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FrameState {
    /// The write is on its way.
    Writing,
    /// Durable; waiting for every earlier frame before it is acknowledged.
    Written,
    /// Acknowledged (or replayed): its entries are dirty until destaged.
    Acked,
    /// Its write failed, or an earlier frame's did before it was acknowledged: its entries go
    /// to the SAN from memory.
    Abandoned,
}

pub(crate) struct Frame {
    pub pos: LogPos,
    /// Where the next frame starts (a pad's end is the next lap).
    pub end: LogPos,
    pub entries: Vec<FrameEntry>,
    pub state: FrameState,
    /// The device still holds the write (and its buffers).
    pub in_flight: bool,
    /// The data buffers, in entry order, once the write has come back (until the host gets
    /// them with its acknowledgement).
    pub bufs: Vec<AlignedBuf>,
    /// Abandoned entries were handed to the destager already.
    pub handed_over: bool,
}

/// What the engine must write for a cut: a header block (encoded by the engine from
/// `entries`) followed by `bufs`.
pub(crate) struct FrameWrite {
    pub kind: FrameKind,
    pub pos: LogPos,
    /// Frames before this were acknowledged (recorded in the header for replay).
    pub acked_upto: LogPos,
    pub entries: Vec<EntryHeader>,
    pub bufs: Vec<AlignedBuf>,
}

pub(crate) struct Appender {
    pub ring: Ring,
    pub incarnation: Incarnation,
    pub queue: VecDeque<Queued>,
    /// Every frame from the oldest whose space is not reclaimed yet, in log order.
    pub frames: VecDeque<Frame>,
    /// Frames before this index are acknowledged (or abandoned and handed over).
    pub acked: usize,
    /// Where the last acknowledged frame ends (or where this incarnation began).
    pub acked_end: LogPos,
    pub in_flight: usize,
    /// The last cut found no room for the head of the queue.
    pub log_full: bool,
    /// Data blocks per frame: `FRAME_DATA_BLOCKS_MAX`, or a quarter of a small log.
    frame_blocks_max: u64,
    /// Bytes a frame with data must leave free (`LOG_RECORD_RESERVE_BYTES`).
    reserve: u64,
}

impl Appender {
    pub fn new(ring: Ring, incarnation: Incarnation) -> Appender {
        let frame_blocks_max = (FRAME_DATA_BLOCKS_MAX as u64).min(ring.capacity() / BLOCK_SIZE_U64 / 4 - 1);
        let reserve = LOG_RECORD_RESERVE_BYTES.min(ring.capacity() / 16) / BLOCK_SIZE_U64 * BLOCK_SIZE_U64;
        Appender {
            frame_blocks_max,
            reserve,
            acked_end: ring.head,
            ring,
            incarnation,
            queue: VecDeque::new(),
            frames: VecDeque::new(),
            acked: 0,
            in_flight: 0,
            log_full: false,
        }
    }

    /// The oldest position still holding a frame that is not clean (or the head).
    pub fn tail(&self) -> LogPos {
        self.frames.front().map(|f| f.pos).unwrap_or(self.ring.head)
    }

    /// Takes the next frame off the queue if one may be written now and fits above `floor`.
    /// `seq(vi)` gives the volume's epoch and next sequence number and advances it. An empty
    /// result with [`Appender::log_full`] set means the head of the queue found no room.
    /// Only a frame of `SanWritten` entries may use the reserve; when the head of the queue
    /// does not fit, this node's `SanWritten` entries queued behind it go ahead in a frame of
    /// their own (they are independent of every write queued before them).
    pub fn cut(&mut self, floor: LogPos, seq: impl FnMut(usize) -> (VolumeId, Epoch, LogSeq)) -> Vec<FrameWrite> {
        let out = Vec::new();
        self.log_full = false;
        if self.queue.is_empty() || self.in_flight >= FRAMES_IN_FLIGHT_MAX {
            return out;
        }
        let mut n = 0;
        let mut data_blocks = 0u64;
        for q in &self.queue {
            let d = if q.kind.has_data() { q.blocks } else { 0 };
            if n == FRAME_ENTRIES_MAX || data_blocks + d > self.frame_blocks_max {
                break;
            }
            n += 1;
            data_blocks += d;
        }
        let bytes = (1 + data_blocks) * BLOCK_SIZE_U64;
        let only_san_written = self.queue.iter().take(n).all(|q| q.kind == EntryKind::SanWritten);
        let keep = if only_san_written { 0 } else { self.reserve };
        let fits = self.ring.place(bytes + keep, floor).is_some();
        let res = if fits { self.ring.reserve(bytes, floor) } else { None };
        let Some(res) = res else {
            self.log_full = true;
            // This node's entries of writes already on the SAN go ahead (into the reserve); a
            // replica copy's entries keep their source's order.
            let ahead: Vec<usize> = (0..self.queue.len())
                .filter(|&i| self.queue[i].kind == EntryKind::SanWritten && self.queue[i].preset.is_none())
                .take(FRAME_ENTRIES_MAX)
                .collect();
            if ahead.is_empty() {
                return out;
            }
            let Some(res) = self.ring.reserve(BLOCK_SIZE_U64, floor) else { return out };
            let entries: Vec<Queued> = ahead.iter().rev().filter_map(|&i| self.queue.remove(i)).collect();
            return self.frame(res, BLOCK_SIZE_U64, entries.into_iter().rev(), seq, out);
        };
        let entries: Vec<Queued> = self.queue.drain(..n).collect();
        self.frame(res, bytes, entries.into_iter(), seq, out)
    }

    /// Builds the frame of `entries` at `res` (`bytes` long, after a pad if `res` says so).
    fn frame(
        &mut self,
        res: crate::log::Reservation,
        bytes: u64,
        queued: impl ExactSizeIterator<Item = Queued>,
        mut seq: impl FnMut(usize) -> (VolumeId, Epoch, LogSeq),
        mut out: Vec<FrameWrite>,
    ) -> Vec<FrameWrite> {
        let n = queued.len();
        if let Some(pad_at) = res.pad_at {
            self.frames.push_back(Frame {
                pos: pad_at,
                end: res.pos,
                entries: Vec::new(),
                state: FrameState::Writing,
                in_flight: true,
                bufs: Vec::new(),
                handed_over: false,
            });
            self.in_flight += 1;
            out.push(FrameWrite {
                kind: FrameKind::Pad,
                pos: pad_at,
                acked_upto: self.acked_end,
                entries: Vec::new(),
                bufs: Vec::new(),
            });
        }
        let mut entries = Vec::with_capacity(n);
        let mut headers = Vec::with_capacity(n);
        let mut bufs = Vec::with_capacity(n);
        let mut data_pos = res.pos.plus(BLOCK_SIZE_U64);
        for q in queued {
            let header = match q.preset {
                Some(h) => h,
                None => {
                    let (volume, epoch, s) = seq(q.vi);
                    let data_crc = q.buf.as_ref().map(|b| crc32c::crc32c(&b[..])).unwrap_or(0);
                    EntryHeader { kind: q.kind, volume, epoch, seq: s, lba: q.lba, blocks: q.blocks as u32, data_crc }
                }
            };
            entries.push(FrameEntry { vi: q.vi, op: q.op, header, data_pos });
            headers.push(header);
            data_pos = data_pos.plus(header.data_bytes());
            bufs.extend(q.buf);
        }
        self.frames.push_back(Frame {
            pos: res.pos,
            end: res.pos.plus(bytes),
            entries,
            state: FrameState::Writing,
            in_flight: true,
            bufs: Vec::new(),
            handed_over: false,
        });
        self.in_flight += 1;
        out.push(FrameWrite {
            kind: FrameKind::Data,
            pos: res.pos,
            acked_upto: self.acked_end,
            entries: headers,
            bufs,
        });
        out
    }

    fn index_of(&self, pos: LogPos) -> usize {
        let i = self.frames.partition_point(|f| f.pos < pos);
        assert!(i < self.frames.len() && self.frames[i].pos == pos, "appender: completion for unknown frame at {pos}");
        i
    }

    /// A frame's write came back with its data buffers. Returns whether it failed *before* it
    /// could be acknowledged (the caller degrades the device and abandons what follows).
    pub fn written(&mut self, pos: LogPos, ok: bool, bufs: Vec<AlignedBuf>) -> bool {
        let i = self.index_of(pos);
        self.in_flight -= 1;
        let f = &mut self.frames[i];
        f.in_flight = false;
        f.bufs = bufs;
        match (f.state, ok) {
            (FrameState::Writing, true) => {
                f.state = FrameState::Written;
                false
            }
            (FrameState::Writing, false) => {
                f.state = FrameState::Abandoned;
                true
            }
            // Already abandoned because an earlier frame failed: stays so.
            _ => false,
        }
    }

    /// Abandons every frame not acknowledged yet: replay would stop at the failed one.
    pub fn abandon_unacked(&mut self) {
        for f in self.frames.iter_mut().skip(self.acked) {
            if matches!(f.state, FrameState::Writing | FrameState::Written) {
                f.state = FrameState::Abandoned;
            }
        }
    }

    /// The next frame in log order that can be acknowledged (written) or handed over
    /// (abandoned, its buffers back); the caller processes it and calls [`Appender::advance`].
    pub fn ackable(&mut self) -> Option<&mut Frame> {
        let f = self.frames.get_mut(self.acked)?;
        match f.state {
            FrameState::Written => Some(f),
            FrameState::Abandoned if !f.in_flight => Some(f),
            _ => None,
        }
    }

    pub fn advance(&mut self) {
        let f = &mut self.frames[self.acked];
        if f.state == FrameState::Written {
            f.state = FrameState::Acked;
            self.acked_end = f.end;
        } else {
            f.handed_over = true;
        }
        self.acked += 1;
    }

    /// Pops frames off the front while `clean(frame)` says every entry in it is destaged.
    pub fn reclaim(&mut self, mut clean: impl FnMut(&Frame) -> bool) -> usize {
        let mut n = 0;
        while self.acked > 0 {
            let Some(f) = self.frames.front() else { break };
            if f.in_flight || !clean(f) {
                break;
            }
            self.frames.pop_front();
            self.acked -= 1;
            n += 1;
        }
        n
    }

    /// Nothing is written, queued or in flight beyond what is acknowledged.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.in_flight == 0 && self.acked == self.frames.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::constants::{BLOCK_SIZE, LOG_BYTES_MIN};

    fn queued(op: u64, blocks: u64) -> Queued {
        let mut b = AlignedBuf::new(blocks as usize * BLOCK_SIZE);
        b.fill(op as u8);
        Queued {
            vi: 0,
            op: Some(OpId(op)),
            kind: EntryKind::Write,
            lba: Lba(op * 10),
            blocks,
            buf: Some(b),
            since_ns: 0,
            waited: false,
            preset: None,
        }
    }

    fn seqs() -> impl FnMut(usize) -> (VolumeId, Epoch, LogSeq) {
        let mut next = 0;
        move |_| {
            next += 1;
            (VolumeId(1), Epoch(1), LogSeq(next))
        }
    }

    #[test]
    fn group_commit_packs_queued_writes_into_one_frame() {
        let mut a = Appender::new(Ring::new(LOG_BYTES_MIN, LogPos(0)), Incarnation(1));
        for op in 0..30 {
            a.queue.push_back(queued(op, 1));
        }
        let mut s = seqs();
        let w = a.cut(LogPos(0), &mut s);
        assert_eq!(w.len(), 1);
        assert_eq!((w[0].entries.len(), w[0].bufs.len()), (30, 30));
        assert_eq!(a.ring.head, LogPos(31 * 4096), "30 blocks of data cost 31 blocks of log");
        let f = &a.frames[0];
        assert_eq!(f.entries[3].data_pos, LogPos(4 * 4096));
        assert_eq!(f.entries[3].header.seq, LogSeq(4));
        assert_eq!(f.entries[3].header.data_crc, crc32c::crc32c(&vec![3u8; 4096]));
    }

    #[test]
    fn a_frame_holds_at_most_its_limits_and_the_rest_waits() {
        let mut a = Appender::new(Ring::new(4 * LOG_BYTES_MIN, LogPos(0)), Incarnation(1));
        for op in 0..100 {
            a.queue.push_back(queued(op, 1));
        }
        let mut s = seqs();
        assert_eq!(a.cut(LogPos(0), &mut s)[0].entries.len(), FRAME_ENTRIES_MAX);
        let mut b = Appender::new(Ring::new(4 * LOG_BYTES_MIN, LogPos(0)), Incarnation(1));
        for op in 0..20 {
            b.queue.push_back(queued(op, 1));
        }
        for op in 0..3 {
            b.queue.push_back(queued(100 + op, 256));
        }
        // The frame takes the 20 one-block writes and one 1 MiB write (20 + 256 <= 512 blocks),
        // not a second.
        let w = b.cut(LogPos(0), &mut s);
        assert_eq!(w[0].entries.len(), 20 + 1);
        assert_eq!(b.queue.len(), 2);
        // In the smallest log a frame holds at most a quarter of it: one 1 MiB write.
        let mut small = Appender::new(Ring::new(LOG_BYTES_MIN, LogPos(0)), Incarnation(1));
        small.queue.push_back(queued(1, 1));
        small.queue.push_back(queued(2, 256));
        assert_eq!(small.cut(LogPos(0), &mut s)[0].entries.len(), 1);
    }

    #[test]
    fn frames_are_acknowledged_in_log_order_and_a_failure_abandons_the_rest() {
        let mut a = Appender::new(Ring::new(LOG_BYTES_MIN, LogPos(0)), Incarnation(1));
        let mut s = seqs();
        let mut pos = Vec::new();
        for op in 0..3 {
            a.queue.push_back(queued(op, 1));
            pos.push(a.cut(LogPos(0), &mut s)[0].pos);
        }
        assert!(!a.written(pos[1], true, Vec::new()));
        assert!(a.ackable().is_none(), "frame 1 may not be acknowledged before frame 0");
        assert!(!a.written(pos[0], true, Vec::new()));
        assert!(a.ackable().is_some());
        a.advance();
        assert!(a.ackable().is_some());
        a.advance();
        assert!(a.written(pos[2], false, Vec::new()), "a failed write reports itself");
        a.abandon_unacked();
        let f = a.ackable().expect("an abandoned frame whose buffers are back is handed over");
        assert_eq!(f.state, FrameState::Abandoned);
        a.advance();
        assert_eq!(a.reclaim(|_| true), 3);
        assert!(a.is_idle());
    }
}
