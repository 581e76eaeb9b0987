//! One submission queue and one completion queue in DMA memory, the host's side of the queue
//! protocol (base specification, section 3.3): commands go in at the SQ tail and the tail
//! doorbell tells the controller; completions are taken at the CQ head while their phase tag
//! matches the pass we are on (it flips each time the queue wraps), and the head doorbell
//! hands the slots back. Polled, never interrupt driven: [`CompletionQueue::pop`] is one
//! memory read when nothing completed.
//!
//! The memory is written by the controller behind the compiler's back, so completion entries
//! are read with volatile loads, and a fence orders our writes of an entry before the doorbell
//! that publishes it.

use std::sync::atomic::{fence, Ordering};

use super::regs::Registers;
use crate::command::Command;
use crate::completion::Completion;
use crate::constants::{CQE_BYTES, SQE_BYTES};

pub struct SubmissionQueue {
    base: *mut u8,
    entries: u16,
    tail: u16,
    /// How far the controller has consumed, from the SQ head of its completions.
    head: u16,
    doorbell: usize,
    /// Entries written since the last doorbell.
    unrung: bool,
}

impl SubmissionQueue {
    /// # Safety
    /// `base` must be valid for writes of `entries` * 64 bytes for the queue's life, and be
    /// the memory the controller was told this queue lives in.
    pub unsafe fn new(base: *mut u8, entries: u16, doorbell: usize) -> SubmissionQueue {
        assert!(entries >= 2, "a queue needs two entries");
        SubmissionQueue { base, entries, tail: 0, head: 0, doorbell, unrung: false }
    }
    pub fn is_full(&self) -> bool {
        (self.tail + 1) % self.entries == self.head
    }
    #[cfg(test)]
    pub fn tail(&self) -> u16 {
        self.tail
    }
    /// Writes `cmd` at the tail. The caller keeps at most entries - 1 commands outstanding,
    /// so the queue cannot be full (asserted: our bug otherwise).
    pub fn push(&mut self, cmd: &Command) {
        assert!(!self.is_full(), "submission queue overrun");
        // SAFETY: tail < entries, so the 64 bytes are inside the queue's memory (see `new`);
        // the controller reads this slot only after the doorbell below publishes it.
        unsafe {
            std::ptr::copy_nonoverlapping(cmd.0.as_ptr(), self.base.add(usize::from(self.tail) * SQE_BYTES), SQE_BYTES);
        }
        self.tail = (self.tail + 1) % self.entries;
        self.unrung = true;
    }
    /// Tells the controller about new entries, if any.
    pub fn ring(&mut self, regs: &dyn Registers) {
        if self.unrung {
            // The entries must be in memory before the controller can see the new tail.
            fence(Ordering::SeqCst);
            regs.write32(self.doorbell, u32::from(self.tail));
            self.unrung = false;
        }
    }
    /// The controller's SQ head as a completion reported it.
    pub fn consumed_to(&mut self, sqhd: u16) {
        if sqhd < self.entries {
            self.head = sqhd;
        }
    }
}

pub struct CompletionQueue {
    base: *const u8,
    entries: u16,
    head: u16,
    /// The phase tag of entries written on the current pass (starts at 1: the memory is zero).
    phase: bool,
    doorbell: usize,
    unrung: bool,
}

impl CompletionQueue {
    /// # Safety
    /// `base` must be valid for reads of `entries` * 16 bytes for the queue's life, zeroed
    /// before the controller was told this queue lives there.
    pub unsafe fn new(base: *const u8, entries: u16, doorbell: usize) -> CompletionQueue {
        assert!(entries >= 2, "a queue needs two entries");
        CompletionQueue { base, entries, head: 0, phase: true, doorbell, unrung: false }
    }
    /// The next completion, if the controller has posted one.
    pub fn pop(&mut self) -> Option<Completion> {
        // SAFETY: head < entries, so the entry is inside the queue's memory (see `new`);
        // volatile because the controller writes it.
        let entry = unsafe { self.base.add(usize::from(self.head) * CQE_BYTES) };
        // SAFETY: as above; the status field is the entry's last two bytes, 2-aligned.
        let status = u16::from_le(unsafe { std::ptr::read_volatile(entry.add(14) as *const u16) });
        if (status & 1 == 1) != self.phase {
            return None;
        }
        // The rest of the entry was written before its phase tag.
        fence(Ordering::Acquire);
        let mut raw = [0u8; CQE_BYTES];
        for (i, b) in raw.iter_mut().enumerate() {
            // SAFETY: i < 16, inside this entry.
            *b = unsafe { std::ptr::read_volatile(entry.add(i)) };
        }
        self.head += 1;
        if self.head == self.entries {
            self.head = 0;
            self.phase = !self.phase;
        }
        self.unrung = true;
        Some(Completion::decode(&raw))
    }
    /// Hands consumed entries back to the controller, if any.
    pub fn ring(&mut self, regs: &dyn Registers) {
        if self.unrung {
            regs.write32(self.doorbell, u32::from(self.head));
            self.unrung = false;
        }
    }
    #[cfg(test)]
    pub fn head(&self) -> u16 {
        self.head
    }
    #[cfg(test)]
    pub fn phase(&self) -> bool {
        self.phase
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::Status;
    use std::sync::Mutex;

    /// Doorbell writes, recorded.
    #[derive(Default)]
    struct Bells(Mutex<Vec<(usize, u32)>>);
    impl Registers for Bells {
        fn bar_bytes(&self) -> usize {
            0x2000
        }
        fn read32(&self, _: usize) -> u32 {
            0
        }
        fn write32(&self, offset: usize, value: u32) {
            self.0.lock().unwrap().push((offset, value));
        }
    }

    /// What a controller does to post completion `cid` at `slot` on pass `phase`.
    fn post(mem: &mut [u8], slot: usize, cid: u16, phase: bool) {
        let c = crate::completion::Completion {
            dw0: u32::from(cid),
            dw1: 0,
            sqhd: cid % 4,
            sqid: 1,
            cid,
            status: Status::SUCCESS,
        };
        let e = &mut mem[slot * 16..slot * 16 + 16];
        c.encode(e);
        let field = u16::from_le_bytes([e[14], e[15]]) | phase as u16;
        e[14..16].copy_from_slice(&field.to_le_bytes());
    }

    #[test]
    fn completion_phase_flips_each_wrap() {
        let mut mem = vec![0u8; 4 * 16];
        let bells = Bells::default();
        // SAFETY: mem outlives the queue and holds 4 entries.
        let mut cq = unsafe { CompletionQueue::new(mem.as_ptr(), 4, 0x1004) };
        assert!(cq.pop().is_none(), "zeroed memory holds no completion on the first pass");
        let mut cid = 0u16;
        for pass in 0..3 {
            let phase = pass % 2 == 0;
            for slot in 0..4 {
                // Not posted yet: the entry still carries the previous pass's tag.
                assert!(cq.pop().is_none(), "pass {pass} slot {slot}: stale entry taken");
                post(&mut mem, slot, cid, phase);
                let c = cq.pop().expect("posted completion");
                assert_eq!((c.cid, c.dw0), (cid, u32::from(cid)));
                cid += 1;
            }
            assert_eq!((cq.head(), cq.phase()), (0, pass % 2 == 1), "wrapped and flipped after pass {pass}");
            cq.ring(&bells);
        }
        assert_eq!(*bells.0.lock().unwrap(), vec![(0x1004, 0), (0x1004, 0), (0x1004, 0)]);
        cq.ring(&bells);
        assert_eq!(bells.0.lock().unwrap().len(), 3, "no doorbell without new entries");
    }

    #[test]
    fn submission_tail_wraps_within_the_queue() {
        let mut mem = vec![0u8; 4 * 64];
        let bells = Bells::default();
        // SAFETY: mem outlives the queue and holds 4 entries.
        let mut sq = unsafe { SubmissionQueue::new(mem.as_mut_ptr(), 4, 0x1008) };
        for cid in 0..3u16 {
            let mut c = Command::flush(1);
            c.set_cid(cid);
            sq.push(&c);
        }
        assert!(sq.is_full(), "three commands fill a four-entry queue");
        sq.ring(&bells);
        sq.consumed_to(2);
        for cid in 3..5u16 {
            let mut c = Command::flush(1);
            c.set_cid(cid);
            sq.push(&c);
        }
        sq.ring(&bells);
        assert_eq!(sq.tail(), 1);
        let cid_at = |slot: usize| u16::from_le_bytes([mem[slot * 64 + 2], mem[slot * 64 + 3]]);
        assert_eq!([cid_at(0), cid_at(1), cid_at(2), cid_at(3)], [4, 1, 2, 3]);
        assert_eq!(*bells.0.lock().unwrap(), vec![(0x1008, 3), (0x1008, 1)]);
        assert!(sq.is_full());
        sq.consumed_to(9); // out of range from a confused device: ignored
        assert!(sq.is_full());
        sq.consumed_to(1);
        assert!(!sq.is_full());
    }
}
