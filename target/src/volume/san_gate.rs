//! Fencing of a volume's SAN in a cluster (invariant 5): whether this node may write it now.
//!
//! In a cluster another node may take a volume's dirty data to its SAN: a replica that destages
//! its copy after the owner was lost (`Engine::rescue_copy`). Two nodes writing one SAN's blocks
//! from two logs would put old data over new, so each node writes a volume's SAN only while the
//! cluster says it may, and only until its own lease could expire: the cluster thread opens a
//! [`SanGate`] up to the lease's local deadline (which comes before etcd may expire the lease,
//! and so before any other node may be chosen), each tick the record allows it. A node cut off
//! from etcd thus stops writing by itself, however busy or stuck its cluster thread is.
//!
//! [`GatedSan`] wraps the SAN the destage core uses. Reads always pass. Writes, zeroing, unmaps
//! and flushes submitted while the gate is closed are held, in order, and go out once it opens
//! again, unless they were held `destage.san_timeout_ms`: then they fail as unreachable (the
//! destager retries its batch later; a host's write-through write ends with Namespace Not Ready
//! at its own deadline, nothing of it written). While it holds commands behind a closed gate the
//! SAN reports a `fenced: …` outage, which status and the logs show. When another node destaged
//! the volume meanwhile, the owner fails whatever is still held (`San::fail_held`) before the
//! gate opens again (`Destager::skip_to`): nothing older than that node's writes goes out.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use stager_policy::io::{AlignedBuf, IoDone};
use stager_policy::{IoError, IoToken, San};

/// Nanoseconds on the process's monotonic clock.
fn now_ns() -> u64 {
    nanos_at(Instant::now())
}

fn nanos_at(t: Instant) -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    t.saturating_duration_since(base).as_nanos().min(u128::from(u64::MAX - 1)) as u64
}

/// Until when this node may write a volume's SAN.
#[derive(Debug)]
pub(crate) struct SanGate {
    open_until_ns: AtomicU64,
}

impl SanGate {
    /// Closed until the cluster opens it.
    pub fn closed() -> Arc<SanGate> {
        Arc::new(SanGate { open_until_ns: AtomicU64::new(0) })
    }

    /// Open until `deadline` (the lease's local deadline), or for good with `None` (a volume
    /// no other node can take over: it has no copy anywhere).
    pub fn open_until(&self, deadline: Option<Instant>) {
        let ns = deadline.map_or(u64::MAX, nanos_at);
        self.open_until_ns.store(ns, Ordering::Release);
    }

    pub fn close(&self) {
        self.open_until_ns.store(0, Ordering::Release);
    }

    pub fn is_open(&self) -> bool {
        now_ns() < self.open_until_ns.load(Ordering::Acquire)
    }
}

/// A command held while the gate was closed, with when it was.
struct HeldOp {
    since: Instant,
    op: Held,
}

enum Held {
    Write { token: IoToken, offset: u64, buf: AlignedBuf, fua: bool },
    Zeroes { token: IoToken, offset: u64, len: u64 },
    Unmap { token: IoToken, offset: u64, len: u64 },
    Flush { token: IoToken },
}

/// A SAN that holds what changes it while its gate is closed.
pub(crate) struct GatedSan {
    inner: Box<dyn San>,
    gate: Arc<SanGate>,
    /// A command held longer than this fails (as unreachable): the destager retries its batch,
    /// a host's write-through write ends with Namespace Not Ready at its own deadline.
    max_hold: Duration,
    held: VecDeque<HeldOp>,
    /// Held commands failed by `fail_held`, reported at the next poll.
    failed: Vec<IoDone>,
}

impl GatedSan {
    pub fn new(inner: Box<dyn San>, gate: Arc<SanGate>, max_hold: Duration) -> GatedSan {
        GatedSan { inner, gate, max_hold, held: VecDeque::new(), failed: Vec::new() }
    }

    fn submit(&mut self, h: Held) {
        if self.held.is_empty() && self.gate.is_open() {
            self.send(h);
        } else {
            self.held.push_back(HeldOp { since: Instant::now(), op: h });
        }
    }

    fn fail(&mut self, h: Held) {
        let (token, buf) = match h {
            Held::Write { token, buf, .. } => (token, Some(buf)),
            Held::Zeroes { token, .. } | Held::Unmap { token, .. } | Held::Flush { token } => (token, None),
        };
        self.failed.push(IoDone { token, result: Err(IoError::Unreachable), buf, gather: Vec::new() });
    }

    fn send(&mut self, h: Held) {
        match h {
            Held::Write { token, offset, buf, fua } => self.inner.submit_write(token, offset, buf, fua),
            Held::Zeroes { token, offset, len } => self.inner.submit_write_zeroes(token, offset, len),
            Held::Unmap { token, offset, len } => self.inner.submit_unmap(token, offset, len),
            Held::Flush { token } => self.inner.submit_flush(token),
        }
    }
}

impl San for GatedSan {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }

    fn unmap_reads_zeroes(&self) -> bool {
        self.inner.unmap_reads_zeroes()
    }

    fn outage(&self) -> Option<String> {
        self.inner.outage().or_else(|| {
            (!self.held.is_empty() && !self.gate.is_open()).then(|| {
                "fenced: this node may not write the SAN now (its cluster lease is lost, or another node \
                 destages this volume's data)"
                    .to_string()
            })
        })
    }

    fn submit_read(&mut self, token: IoToken, offset: u64, buf: AlignedBuf) {
        self.inner.submit_read(token, offset, buf);
    }

    fn submit_write(&mut self, token: IoToken, offset: u64, buf: AlignedBuf, fua: bool) {
        self.submit(Held::Write { token, offset, buf, fua });
    }

    fn submit_write_zeroes(&mut self, token: IoToken, offset: u64, len: u64) {
        self.submit(Held::Zeroes { token, offset, len });
    }

    fn submit_unmap(&mut self, token: IoToken, offset: u64, len: u64) {
        self.submit(Held::Unmap { token, offset, len });
    }

    fn submit_flush(&mut self, token: IoToken) {
        self.submit(Held::Flush { token });
    }

    fn poll_completions(&mut self, out: &mut Vec<IoDone>) -> usize {
        if !self.held.is_empty() {
            if self.gate.is_open() {
                while let Some(h) = self.held.pop_front() {
                    self.send(h.op);
                }
            } else {
                while self.held.front().is_some_and(|h| h.since.elapsed() >= self.max_hold) {
                    let Some(h) = self.held.pop_front() else { break };
                    self.fail(h.op);
                }
            }
        }
        let failed = self.failed.len();
        out.append(&mut self.failed);
        failed + self.inner.poll_completions(out)
    }

    fn fail_held(&mut self) {
        while let Some(h) = self.held.pop_front() {
            self.fail(h.op);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    /// Records what reaches it, in a log the test keeps too.
    #[derive(Default)]
    struct Seen(Rc<RefCell<Vec<(char, u64)>>>);

    impl San for Seen {
        fn size_bytes(&self) -> u64 {
            1 << 20
        }
        fn submit_read(&mut self, t: IoToken, _: u64, _: AlignedBuf) {
            self.0.borrow_mut().push(('r', t.0));
        }
        fn submit_write(&mut self, t: IoToken, _: u64, _: AlignedBuf, _: bool) {
            self.0.borrow_mut().push(('w', t.0));
        }
        fn submit_write_zeroes(&mut self, t: IoToken, _: u64, _: u64) {
            self.0.borrow_mut().push(('z', t.0));
        }
        fn submit_unmap(&mut self, t: IoToken, _: u64, _: u64) {
            self.0.borrow_mut().push(('u', t.0));
        }
        fn submit_flush(&mut self, t: IoToken) {
            self.0.borrow_mut().push(('f', t.0));
        }
        fn poll_completions(&mut self, _: &mut Vec<IoDone>) -> usize {
            0
        }
    }

    #[test]
    fn writes_wait_while_closed_and_go_out_in_order_once_open_reads_never_wait() {
        let gate = SanGate::closed();
        let log = Rc::new(RefCell::new(Vec::new()));
        let mut s = GatedSan::new(Box::new(Seen(log.clone())), gate.clone(), Duration::from_secs(60));
        let seen = |_: &GatedSan| log.borrow().clone();
        s.submit_write(IoToken(1), 0, AlignedBuf::new(4096), false);
        s.submit_read(IoToken(2), 0, AlignedBuf::new(4096));
        s.submit_write_zeroes(IoToken(3), 0, 4096);
        s.submit_flush(IoToken(4));
        s.poll_completions(&mut Vec::new());
        assert_eq!(seen(&s), vec![('r', 2)], "only the read went out");
        gate.open_until(Some(Instant::now() + Duration::from_secs(60)));
        s.submit_unmap(IoToken(5), 0, 4096);
        assert_eq!(seen(&s), vec![('r', 2)], "a command behind held ones waits its turn");
        s.poll_completions(&mut Vec::new());
        assert_eq!(seen(&s), vec![('r', 2), ('w', 1), ('z', 3), ('f', 4), ('u', 5)]);
        s.submit_write(IoToken(6), 0, AlignedBuf::new(4096), true);
        assert_eq!(seen(&s).last(), Some(&('w', 6)), "open: straight through");
        gate.close();
        s.submit_write(IoToken(7), 0, AlignedBuf::new(4096), false);
        s.submit_flush(IoToken(8));
        s.fail_held();
        gate.open_until(None);
        let mut out = Vec::new();
        s.poll_completions(&mut out);
        let failed: Vec<(u64, bool)> = out.iter().map(|d| (d.token.0, d.result.is_err())).collect();
        assert_eq!(failed, vec![(7, true), (8, true)], "failed held commands complete as errors");
        assert_eq!(seen(&s).last(), Some(&('w', 6)), "and never reach the SAN, even once it opens");
    }

    #[test]
    fn a_command_held_too_long_fails_and_a_fenced_san_says_so() {
        let gate = SanGate::closed();
        let log = Rc::new(RefCell::new(Vec::new()));
        let mut s = GatedSan::new(Box::new(Seen(log.clone())), gate.clone(), Duration::from_millis(20));
        assert_eq!(s.outage(), None, "nothing held: nothing to say");
        s.submit_write(IoToken(1), 0, AlignedBuf::new(4096), false);
        assert!(s.outage().is_some_and(|o| o.starts_with("fenced")), "{:?}", s.outage());
        let mut out = Vec::new();
        s.poll_completions(&mut out);
        assert!(out.is_empty(), "not held long enough yet");
        std::thread::sleep(Duration::from_millis(30));
        s.poll_completions(&mut out);
        assert_eq!(out.iter().map(|d| (d.token.0, d.result.is_err())).collect::<Vec<_>>(), vec![(1, true)]);
        assert!(log.borrow().is_empty(), "it never reached the SAN");
        assert_eq!(s.outage(), None);
    }

    #[test]
    fn the_gate_closes_by_itself_at_its_deadline() {
        let gate = SanGate::closed();
        assert!(!gate.is_open());
        gate.open_until(Some(Instant::now() + Duration::from_millis(30)));
        assert!(gate.is_open());
        std::thread::sleep(Duration::from_millis(40));
        assert!(!gate.is_open(), "a lease deadline that passed closes the gate without anyone's help");
        gate.open_until(None);
        assert!(gate.is_open());
        gate.close();
        assert!(!gate.is_open());
    }
}
