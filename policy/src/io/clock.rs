//! Time as a trait, so the simulator decides it. The engine itself takes `now` as an argument of
//! every call (`poll(now)`), which keeps it a pure function of its inputs; drivers read a
//! [`Clock`] once per loop turn.

/// Monotonic time in nanoseconds since an arbitrary origin.
pub trait Clock {
    fn now_ns(&self) -> u64;
}

/// The production clock: `std::time::Instant` from a fixed origin.
pub struct MonotonicClock {
    origin: std::time::Instant,
}

impl MonotonicClock {
    pub fn new() -> Self {
        MonotonicClock { origin: std::time::Instant::now() }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }
}
