//! What one worker thread measured: completed I/Os and bytes per direction, errors, and
//! latency histograms (hdrhistogram, recorded in nanoseconds, reported in microseconds).
//!
//! Each worker owns its `Stats` outright (no sharing on the I/O path); the run merges them
//! once at the end. For the live progress line a worker also keeps a small `Interval` that it
//! hands to the main thread once a second over a channel.

use hdrhistogram::Histogram;

use crate::constants::{LATENCY_NS_MAX, LATENCY_SIGFIGS};

/// Which way data moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Read,
    Write,
}

/// A latency histogram with the harness's fixed bounds.
pub fn new_histogram() -> Histogram<u64> {
    // Constant bounds that hdrhistogram accepts (low >= 1, high >= 2 * low, sigfigs <= 5):
    // a failure here is our bug, not the world's.
    Histogram::new_with_bounds(1, LATENCY_NS_MAX, LATENCY_SIGFIGS).expect("constant histogram bounds are valid")
}

/// Counters and histograms of one direction.
#[derive(Clone, Debug)]
pub struct DirectionStats {
    pub ios: u64,
    pub bytes: u64,
    pub latency_ns: Histogram<u64>,
}

impl DirectionStats {
    pub fn new() -> DirectionStats {
        DirectionStats { ios: 0, bytes: 0, latency_ns: new_histogram() }
    }
    pub fn add(&mut self, other: &DirectionStats) {
        self.ios += other.ios;
        self.bytes += other.bytes;
        // Same bounds on both sides, so adding cannot fail; clamp-record as a fallback.
        if self.latency_ns.add(&other.latency_ns).is_err() {
            for v in other.latency_ns.iter_recorded() {
                self.latency_ns.saturating_record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
    }
}

impl Default for DirectionStats {
    fn default() -> Self {
        DirectionStats::new()
    }
}

/// Everything one worker measured inside the measurement window.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub read: DirectionStats,
    pub write: DirectionStats,
    /// Commands that completed with an NVMe error status.
    pub errors: u64,
    /// The first error's description, for the report.
    pub first_error: Option<String>,
}

impl Stats {
    #[inline]
    pub fn record(&mut self, dir: Direction, bytes: u64, latency_ns: u64) {
        let d = match dir {
            Direction::Read => &mut self.read,
            Direction::Write => &mut self.write,
        };
        d.ios += 1;
        d.bytes += bytes;
        d.latency_ns.saturating_record(latency_ns.max(1));
    }

    pub fn record_error(&mut self, what: impl FnOnce() -> String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(what());
        }
    }

    pub fn add(&mut self, other: &Stats) {
        self.read.add(&other.read);
        self.write.add(&other.write);
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
    }

    pub fn ios(&self) -> u64 {
        self.read.ios + self.write.ios
    }
    pub fn bytes(&self) -> u64 {
        self.read.bytes + self.write.bytes
    }

    /// Both directions' latencies in one histogram.
    pub fn combined_latency(&self) -> Histogram<u64> {
        let mut all = self.read.latency_ns.clone();
        if all.add(&self.write.latency_ns).is_err() {
            for v in self.write.latency_ns.iter_recorded() {
                all.saturating_record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
        all
    }
}

/// What a worker reports to the progress line once a second (whole run, ramp included).
#[derive(Debug)]
pub struct Interval {
    pub worker: usize,
    pub ios: u64,
    pub bytes: u64,
    pub errors: u64,
    pub latency_ns: Histogram<u64>,
}

/// A worker's running interval: counts since it last reported.
pub struct IntervalCounter {
    worker: usize,
    ios: u64,
    bytes: u64,
    errors: u64,
    latency_ns: Histogram<u64>,
}

impl IntervalCounter {
    pub fn new(worker: usize) -> IntervalCounter {
        IntervalCounter { worker, ios: 0, bytes: 0, errors: 0, latency_ns: new_histogram() }
    }
    #[inline]
    pub fn record(&mut self, bytes: u64, latency_ns: u64) {
        self.ios += 1;
        self.bytes += bytes;
        self.latency_ns.saturating_record(latency_ns.max(1));
    }
    pub fn record_error(&mut self) {
        self.errors += 1;
    }
    /// Takes what was counted so far, leaving the counter empty.
    pub fn take(&mut self) -> Interval {
        let hist = std::mem::replace(&mut self.latency_ns, new_histogram());
        let i =
            Interval { worker: self.worker, ios: self.ios, bytes: self.bytes, errors: self.errors, latency_ns: hist };
        self.ios = 0;
        self.bytes = 0;
        self.errors = 0;
        i
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_adds_up() {
        let mut a = Stats::default();
        let mut b = Stats::default();
        a.record(Direction::Read, 4096, 10_000);
        b.record(Direction::Read, 4096, 20_000);
        b.record(Direction::Write, 512, 5_000);
        b.record_error(|| "boom".into());
        a.add(&b);
        assert_eq!(a.ios(), 3);
        assert_eq!(a.bytes(), 4096 * 2 + 512);
        assert_eq!(a.errors, 1);
        assert_eq!(a.first_error.as_deref(), Some("boom"));
        let all = a.combined_latency();
        assert_eq!(all.len(), 3);
        assert!(all.max() >= 20_000 && all.min() <= 5_000);
    }

    #[test]
    fn huge_latency_is_clamped_not_lost() {
        let mut s = Stats::default();
        s.record(Direction::Write, 1, u64::MAX);
        assert_eq!(s.write.latency_ns.len(), 1);
    }
}
