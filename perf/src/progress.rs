//! The live progress line on stderr, once a second: elapsed time, IOPS and MiB/s over the
//! last second, p99 latency so far, errors.
//!
//! Workers never touch it: they send an [`Interval`] over a channel once a second and the main
//! thread (which has nothing else to do during a run) merges and prints. On a terminal the
//! line rewrites itself (`\r`); into a pipe or log each update is its own line, so CI logs show
//! how a run went. A plain line instead of indicatif keeps a redraw to one `write` and needs
//! no terminal probing.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::stats::{new_histogram, Interval};
use crate::units::{format_count, format_us};

pub struct Progress {
    enabled: bool,
    tty: bool,
    label: String,
    start: Instant,
    ramp_end: Instant,
    end: Instant,
    /// Latency of everything after the ramp (everything during it, while ramping).
    latency_ns: Histogram<u64>,
    ramp_cleared: bool,
    ios: u64,
    bytes: u64,
    errors: u64,
    last_print: Instant,
    line_open: bool,
}

impl Progress {
    pub fn new(enabled: bool, label: &str, start: Instant, ramp: Duration, time: Duration) -> Progress {
        Progress {
            enabled,
            tty: std::io::stderr().is_terminal(),
            label: label.to_string(),
            start,
            ramp_end: start + ramp,
            end: start + ramp + time,
            latency_ns: new_histogram(),
            ramp_cleared: ramp.is_zero(),
            ios: 0,
            bytes: 0,
            errors: 0,
            // Workers report at whole seconds after the start; printing a little later lets
            // every worker's report for that second arrive first.
            last_print: start + Duration::from_millis(150),
            line_open: false,
        }
    }

    pub fn add(&mut self, i: Interval) {
        if !self.ramp_cleared && Instant::now() >= self.ramp_end {
            self.latency_ns.reset();
            self.ramp_cleared = true;
        }
        self.ios += i.ios;
        self.bytes += i.bytes;
        self.errors += i.errors;
        let _ = self.latency_ns.add(&i.latency_ns);
    }

    /// When the main thread should next wake up to print.
    pub fn next_deadline(&self) -> Instant {
        self.last_print + Duration::from_secs(1)
    }

    /// Prints the line if a second has passed since the last one.
    pub fn tick(&mut self, now: Instant) {
        if now < self.next_deadline() {
            return;
        }
        let dt = now.duration_since(self.last_print).as_secs_f64().max(1e-6);
        self.last_print = now;
        let (ios, bytes) = (std::mem::take(&mut self.ios), std::mem::take(&mut self.bytes));
        if !self.enabled {
            return;
        }
        let phase = if now < self.ramp_end {
            format!(
                "ramp {:>3.0}/{:.0} s",
                now.duration_since(self.start).as_secs_f64(),
                (self.ramp_end - self.start).as_secs_f64()
            )
        } else {
            format!(
                "{:>4.0}/{:.0} s",
                now.saturating_duration_since(self.ramp_end)
                    .as_secs_f64()
                    .min((self.end - self.ramp_end).as_secs_f64()),
                (self.end - self.ramp_end).as_secs_f64()
            )
        };
        let p99 = if self.latency_ns.is_empty() {
            "-".to_string()
        } else {
            format_us(self.latency_ns.value_at_quantile(0.99) as f64 / 1000.0)
        };
        let line = format!(
            "{} [{phase}] {:>8} IOPS {:>9.1} MiB/s  p99 {:>7} us  errors {}",
            self.label,
            format_count(ios as f64 / dt),
            bytes as f64 / dt / (1u64 << 20) as f64,
            p99,
            self.errors
        );
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r{line}\x1b[K");
            self.line_open = true;
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }

    /// Ends the live line so the table starts on a fresh one.
    pub fn finish(&mut self) {
        if self.enabled && self.line_open {
            eprintln!();
            self.line_open = false;
        }
    }
}

/// What the main thread saw while the workers ran.
pub struct Watched {
    /// When the last worker finished.
    pub end_at: Instant,
    /// The process's CPU time from the end of the ramp (or the start, if the run ended
    /// before it) until `end_at`.
    pub cpu: crate::cpu::CpuTimes,
}

/// Runs the main thread's side of a measurement: feeds worker intervals to the progress line
/// until every worker has hung up its sender, and snapshots CPU time at the end of the ramp.
pub fn watch(rx: std::sync::mpsc::Receiver<Interval>, progress: &mut Progress) -> Watched {
    use crate::cpu::CpuTimes;
    use std::sync::mpsc::RecvTimeoutError;
    let process_start = CpuTimes::default();
    let mut cpu_start: Option<CpuTimes> = (progress.ramp_end <= progress.start).then(CpuTimes::now);
    loop {
        let now = Instant::now();
        if cpu_start.is_none() && now >= progress.ramp_end {
            cpu_start = Some(CpuTimes::now());
        }
        let mut wake = progress.next_deadline();
        if cpu_start.is_none() {
            wake = wake.min(progress.ramp_end);
        }
        match rx.recv_timeout(wake.saturating_duration_since(now)) {
            Ok(i) => progress.add(i),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        progress.tick(Instant::now());
    }
    let end_at = Instant::now();
    let cpu = CpuTimes::now().since(&cpu_start.unwrap_or(process_start));
    progress.finish();
    Watched { end_at, cpu }
}
