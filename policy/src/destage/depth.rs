//! How hard the destager pushes the SAN: an AIMD window of SAN writes in flight, driven by SAN
//! latency, and bent by what the front end reports (DESIGN.md: as fast as the SAN allows
//! without overwhelming it; faster when the cache fills or the front end is idle; slower when
//! front-end latency suffers).
//!
//! The window grows by one per window's worth of fast completions and halves (at most once per
//! observed latency) when a completion is slower than twice the best latency seen — the sign
//! of a SAN queueing our writes — while destaging is not urgent: then the destager shares the
//! SAN gently. When it is urgent (the log three quarters full, or an idle front end) latency does
//! not cut the window: it grows by one per completion (doubling per window's worth, like TCP's
//! slow start) to `DESTAGE_DEPTH_MAX` and only SAN errors cut it, so the destager goes as fast
//! as the SAN takes writes. (One per window's worth took ~8 000 completions to reach 128, half
//! a GiB of 64 KiB runs. With the cap at 32 and that growth a 1 GiB log of random 64 KiB writes
//! was clean 6.1–6.8 s after tgtd was resumed, with the cap at 128 and slow start 4.1–4.5 s
//! after, about 1 s of which passes before destage resumes; random 4 KiB writes: 22.1 s against
//! 12.8 s. That is `bench-writeback` part 3's pile and drain, by hand, in alternating runs, as
//! docs/benchmarks.md describes.)
//! (A latency baseline cannot tell a saturated SAN from writes of another size: runs go from
//! 4 KiB to 1 MiB, and with the best latency seen on a small one every large run looked slow,
//! which pinned the window at 1: in
//! `scripts/bench-writeback` part 3 a log of random 64 KiB writes drained at 0.10x of what the
//! SAN takes through a write-through volume, 0.42–0.48x with this rule.) When the front end's
//! flash latency is well above its best and nothing is urgent, the destager backs off to a
//! quarter of its window and one log read at a time, leaving the device to the hosts.

use crate::constants::{DESTAGE_DEPTH_MAX, DESTAGE_READS_IN_FLIGHT_MAX};
use crate::link::Pressure;

#[derive(Clone, Debug)]
pub struct DepthController {
    window: f64,
    /// Baseline latency; drifts up slowly so a permanently slower SAN resets it.
    min_latency_ns: f64,
    last_cut_ns: u64,
    pub latency_ewma_ns: f64,
}

impl Default for DepthController {
    fn default() -> Self {
        DepthController { window: 1.0, min_latency_ns: f64::MAX, last_cut_ns: 0, latency_ewma_ns: 0.0 }
    }
}

/// Log fill (per mille) from which destaging is urgent.
const URGENT_LOG_PERMILLE: u32 = 750;
/// Front-end slowdown (latency over its best) from which the destager backs off.
const BACKOFF_SLOWDOWN: f32 = 2.0;

impl DepthController {
    pub fn limit(&self) -> usize {
        (self.window as usize).clamp(1, DESTAGE_DEPTH_MAX as usize)
    }

    pub fn observe(&mut self, latency_ns: u64) {
        let l = latency_ns as f64;
        self.latency_ewma_ns = if self.latency_ewma_ns == 0.0 { l } else { self.latency_ewma_ns * 0.9 + l * 0.1 };
        if l < self.min_latency_ns {
            self.min_latency_ns = l;
        } else {
            self.min_latency_ns += (l - self.min_latency_ns) / 1024.0;
        }
    }

    pub fn on_success(&mut self, latency_ns: u64, now: u64, urgent: bool) {
        self.observe(latency_ns);
        let target = self.min_latency_ns * 2.0 + 20_000.0;
        if urgent {
            // Slow start: the window doubles per window's worth of completions.
            self.window += 1.0;
        } else if (latency_ns as f64) <= target {
            self.window += 1.0 / self.window;
        } else if now.saturating_sub(self.last_cut_ns) >= latency_ns {
            self.window = (self.window / 2.0).max(1.0);
            self.last_cut_ns = now;
        }
        self.window = self.window.min(DESTAGE_DEPTH_MAX as f64);
    }

    pub fn on_error(&mut self, now: u64) {
        self.window = 1.0;
        self.last_cut_ns = now;
    }
}

/// What the front end's pressure means for the destager right now.
pub fn urgent(p: &Pressure) -> bool {
    p.log_used_permille >= URGENT_LOG_PERMILLE || p.frontend_idle
}

pub fn backing_off(p: &Pressure) -> bool {
    !urgent(p) && p.frontend_slowdown > BACKOFF_SLOWDOWN
}

/// SAN writes in flight allowed now.
pub fn write_limit(d: &DepthController, p: &Pressure) -> usize {
    if backing_off(p) {
        (d.limit() / 4).max(1)
    } else {
        d.limit()
    }
}

/// Hosts are working and their flash latency is well above its best.
fn hosts_suffer(p: &Pressure) -> bool {
    !p.frontend_idle && p.frontend_slowdown > BACKOFF_SLOWDOWN
}

/// Log reads in flight allowed now. The log's reads share the flash with the hosts' reads:
/// while hosts suffer, even urgent destaging reads at most `READS_WHEN_HOSTS_SUFFER` at a time
/// (2 MiB each, enough for a few hundred MiB/s; 8 of them in front of every 4 KiB host read
/// put its p99 at 4x the idle one in `scripts/bench-writeback` part 4).
pub fn read_limit(p: &Pressure) -> usize {
    if backing_off(p) {
        1
    } else if hosts_suffer(p) {
        READS_WHEN_HOSTS_SUFFER
    } else {
        DESTAGE_READS_IN_FLIGHT_MAX
    }
}

/// Log reads in flight while hosts suffer but destaging is urgent.
const READS_WHEN_HOSTS_SUFFER: usize = 2;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aimd_grows_on_fast_completions_and_halves_on_slow_ones() {
        let mut d = DepthController::default();
        let mut now = 0;
        for _ in 0..200 {
            now += 100_000;
            d.on_success(100_000, now, false);
        }
        let grown = d.limit();
        assert!(grown >= 10, "window only {grown}");
        now += 10_000_000;
        d.on_success(5_000_000, now, false);
        assert!(d.limit() <= grown / 2 + 1);
        d.on_error(now);
        assert_eq!(d.limit(), 1);
    }

    #[test]
    fn urgent_destaging_is_not_cut_by_latency_only_by_errors() {
        let mut d = DepthController::default();
        let mut now = 0;
        // A small run sets a low baseline; large runs then take far longer.
        d.on_success(100_000, now, true);
        for _ in 0..2000 {
            now += 1_000_000;
            d.on_success(3_000_000, now, true);
        }
        assert_eq!(d.limit(), DESTAGE_DEPTH_MAX as usize);
        d.on_error(now);
        assert_eq!(d.limit(), 1);
    }

    #[test]
    fn urgent_destaging_reaches_full_depth_within_one_window_of_completions() {
        let mut d = DepthController::default();
        for i in 0..DESTAGE_DEPTH_MAX as u64 {
            d.on_success(1_000_000, i * 1_000, true);
        }
        assert_eq!(d.limit(), DESTAGE_DEPTH_MAX as usize);
        // Not urgent, the same completions grow it by one per window's worth.
        let mut calm = DepthController::default();
        for i in 0..DESTAGE_DEPTH_MAX as u64 {
            calm.on_success(1_000_000, i * 1_000, false);
        }
        assert!(calm.limit() < 20, "calm window {}", calm.limit());
    }

    #[test]
    fn urgency_tolerates_more_latency() {
        let mut calm = DepthController::default();
        let mut urgent = DepthController::default();
        let mut now = 0;
        for i in 0..400 {
            now += 1_000_000;
            let lat = if i < 10 { 100_000 } else { 300_000 };
            calm.on_success(lat, now, false);
            urgent.on_success(lat, now, true);
        }
        assert!(urgent.limit() > calm.limit(), "urgent {} calm {}", urgent.limit(), calm.limit());
    }

    #[test]
    fn a_suffering_front_end_slows_the_destager_unless_the_log_is_filling() {
        let mut d = DepthController::default();
        for i in 0..200 {
            d.on_success(100_000, i * 100_000, false);
        }
        let calm = Pressure { log_used_permille: 100, frontend_idle: false, frontend_slowdown: 1.1 };
        let hurt = Pressure { frontend_slowdown: 5.0, ..calm };
        let hurt_but_full = Pressure { log_used_permille: 800, ..hurt };
        assert_eq!(write_limit(&d, &calm), d.limit());
        assert!(write_limit(&d, &hurt) <= d.limit() / 4 + 1 && read_limit(&hurt) == 1);
        assert_eq!(write_limit(&d, &hurt_but_full), d.limit());
        assert_eq!(read_limit(&hurt_but_full), READS_WHEN_HOSTS_SUFFER);
        assert_eq!(read_limit(&Pressure { frontend_idle: true, ..hurt_but_full }), DESTAGE_READS_IN_FLIGHT_MAX);
        assert!(urgent(&Pressure { frontend_idle: true, ..hurt }));
    }
}
