//! `stager-perf disk`: the cost of the flash device alone. Writes (or reads) straight to a file
//! or block device through the same io_uring driver stagerd's log uses (`FileDevice`, O_DIRECT),
//! with `--sync` making each write durable on completion the way a log frame is (`RWF_DSYNC`,
//! FUA where the device has it). A write-back volume's write latency divided by this one's, at
//! the same size and queue depth on the same file, is what the cache costs over the device.
//!
//! One thread keeps `depth` operations in flight; it busy-polls the completion queue by default
//! (like a reactor) or sleeps in `io_uring_enter` (`--poll sleep`). The report has the shape of
//! a run's (kind `disk`), so `compare` and the scenario summaries take it.

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use stager_nvme::bdev::{AlignedBuf, BdevChannel, BdevDone, BdevIo, BdevOp, BlockDevice, FileDevice};
use stager_nvme::uring::Ring;

use crate::constants::{IO_BYTES_MAX, QUEUE_DEPTH_MAX};
use crate::progress::Progress;
use crate::report::{self, Measurement, Report, ReportKind, Settings};
use crate::run::{size_label, PollMode};
use crate::stats::{Direction, Interval, IntervalCounter, Stats};
use crate::units::ByteRange;
use crate::{PerfError, Result};

#[derive(Clone, Debug)]
pub struct DiskConfig {
    pub name: Option<String>,
    pub path: PathBuf,
    /// `write`, `randwrite`, `read`, `randread`.
    pub workload: String,
    pub io_bytes: usize,
    pub queue_depth: usize,
    /// The part of the file the I/O falls in (default: all of it). A benchmark can measure the
    /// device beside a running stagerd in a part of the flash file stagerd was told not to use.
    pub range: Option<ByteRange>,
    /// Writes durable on completion (RWF_DSYNC), as a log frame is.
    pub sync: bool,
    pub time: Duration,
    pub ramp: Duration,
    pub poll: PollMode,
    pub cpu: Option<usize>,
    pub progress: bool,
}

impl DiskConfig {
    fn write(&self) -> bool {
        self.workload.ends_with("write")
    }
    fn random(&self) -> bool {
        self.workload.starts_with("rand")
    }

    pub fn default_name(&self) -> String {
        format!(
            "disk-{}{}-{}-qd{}",
            self.workload,
            if self.sync { "-dsync" } else { "" },
            size_label(self.io_bytes),
            self.queue_depth
        )
    }

    pub fn validate(&self) -> Result<()> {
        let usage = |m: String| Err(PerfError::Usage(m));
        if !matches!(self.workload.as_str(), "write" | "randwrite" | "read" | "randread") {
            return usage(format!("unknown disk workload {:?} (write, randwrite, read, randread)", self.workload));
        }
        if !(1..=QUEUE_DEPTH_MAX).contains(&self.queue_depth) {
            return usage(format!("queue depth {} is not between 1 and {QUEUE_DEPTH_MAX}", self.queue_depth));
        }
        if self.io_bytes == 0 || self.io_bytes > IO_BYTES_MAX || self.io_bytes % 4096 != 0 {
            return usage(format!("size {} must be a multiple of 4 KiB up to {IO_BYTES_MAX}", self.io_bytes));
        }
        if self.time.is_zero() {
            return usage("the run time must be more than 0".into());
        }
        Ok(())
    }
}

/// Measures the device and returns its report (kind `disk`).
pub fn disk(cfg: &DiskConfig) -> Result<Report> {
    cfg.validate()?;
    let dev = FileDevice::open(&cfg.path, None, 4096, true)
        .map_err(|e| PerfError::Usage(format!("{}: cannot open for O_DIRECT I/O: {e}", cfg.path.display())))?;
    let size = dev.info().size_bytes();
    let (offset, range) = match cfg.range {
        None => (0, size),
        Some(r) => {
            if r.offset_bytes % 4096 != 0 || r.offset_bytes >= size {
                return Err(PerfError::Usage(format!(
                    "{}: range offset {} is not a multiple of 4 KiB inside the file's {size} bytes",
                    cfg.path.display(),
                    r.offset_bytes
                )));
            }
            (r.offset_bytes, r.len_bytes.unwrap_or(u64::MAX).min(size - r.offset_bytes))
        }
    };
    let slots = range / cfg.io_bytes as u64;
    if slots == 0 {
        return Err(PerfError::Usage(format!(
            "{}: the range holds less than one {}-byte I/O",
            cfg.path.display(),
            cfg.io_bytes
        )));
    }
    let name = cfg.name.clone().unwrap_or_else(|| cfg.default_name());
    let started_unix_ms = report::unix_ms_now();
    let (tx, rx) = mpsc::channel::<Interval>();
    let start = Instant::now();
    let (ramp_end, end) = (start + cfg.ramp, start + cfg.ramp + cfg.time);
    let mut progress = Progress::new(cfg.progress, &name, start, cfg.ramp, cfg.time);
    let (result, watched) = std::thread::scope(|scope| {
        let worker = scope.spawn(|| {
            if let Some(c) = cfg.cpu {
                if let Err(e) = crate::cpu::pin_current_thread(c) {
                    eprintln!("stager-perf: warning: cannot pin to CPU {c}: {e}");
                }
            }
            drive(cfg, &dev, offset, slots, ramp_end, end, tx)
        });
        let watched = crate::progress::watch(rx, &mut progress);
        (worker.join().unwrap_or_else(|_| Err("the disk thread panicked".into())), watched)
    });
    let (stats, errors) = match result {
        Ok(s) => (s, Vec::new()),
        Err(e) => (Stats::default(), vec![e]),
    };
    let settings = Settings {
        workload: format!("disk-{}{}", cfg.workload, if cfg.sync { "-dsync" } else { "" }),
        read_pct: if cfg.write() { 0 } else { 100 },
        io_bytes: cfg.io_bytes as u64,
        queue_depth: cfg.queue_depth as u32,
        connections: 1,
        time_s: cfg.time.as_secs_f64(),
        ramp_s: cfg.ramp.as_secs_f64(),
        poll: cfg.poll.to_string(),
        digests: false,
        verify: false,
        seed: 0,
        target: Some(cfg.path.display().to_string()),
        subnqn: None,
        nsid: None,
        block_bytes: Some(4096),
        range_offset_bytes: Some(offset),
        range_bytes: Some(range),
        floor_small_bytes: None,
    };
    let window_s = watched.end_at.min(end).saturating_duration_since(ramp_end).as_secs_f64();
    let m = Measurement { stats: &stats, duration_s: window_s, cpu: watched.cpu, verify: None };
    let mut report = Report::build(ReportKind::Disk, name, started_unix_ms, settings, &m);
    report.errors = errors;
    Ok(report)
}

fn drive(
    cfg: &DiskConfig,
    dev: &FileDevice,
    base: u64,
    slots: u64,
    ramp_end: Instant,
    end: Instant,
    tx: mpsc::Sender<Interval>,
) -> std::result::Result<Stats, String> {
    let mut ring = Ring::new(256).map_err(|e| format!("io_uring: {e}"))?;
    let mut ch: Box<dyn BdevChannel> = dev.channel(0).map_err(|e| format!("channel: {e}"))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut stats = Stats::default();
    let mut interval = IntervalCounter::new(0);
    let dir = if cfg.write() { Direction::Write } else { Direction::Read };
    let op = if cfg.write() { BdevOp::Write { fua: cfg.sync } } else { BdevOp::Read };
    let mut next_seq = 0u64;
    let mut sent: Vec<Instant> = vec![Instant::now(); cfg.queue_depth];
    let mut offset = |rng: &mut rand::rngs::StdRng| {
        let slot = if cfg.random() {
            rng.gen_range(0..slots)
        } else {
            next_seq = (next_seq + 1) % slots;
            next_seq
        };
        base + slot * cfg.io_bytes as u64
    };
    for (i, s) in sent.iter_mut().enumerate() {
        let mut buf = AlignedBuf::new(cfg.io_bytes);
        buf.fill(0x5A);
        *s = Instant::now();
        ch.submit(BdevIo::new(op, offset(&mut rng), cfg.io_bytes as u64, Some(buf), i as u64), &mut ring);
    }
    let mut cqes = Vec::new();
    let mut done: Vec<BdevDone> = Vec::new();
    let mut in_flight = cfg.queue_depth;
    let mut next_tick = Instant::now() + Duration::from_secs(1);
    while in_flight > 0 {
        cqes.clear();
        let r = match cfg.poll {
            PollMode::Busy => ring.submit_and_reap(&mut cqes),
            PollMode::Sleep => ring.submit_and_wait(Duration::from_millis(100), &mut cqes),
        };
        r.map_err(|e| format!("io_uring_enter: {e}"))?;
        for &(ud, res) in &cqes {
            let (_, _, slot) = stager_nvme::uring::split(ud);
            ch.on_cqe(slot, res, &mut ring);
        }
        done.clear();
        ch.poll(&mut done);
        let now = Instant::now();
        for d in done.drain(..) {
            in_flight -= 1;
            let i = d.token as usize;
            if let Err(e) = d.result {
                return Err(format!("{}: I/O failed: {e}", cfg.path.display()));
            }
            let ns = now.saturating_duration_since(sent[i]).as_nanos().min(u64::MAX as u128) as u64;
            interval.record(cfg.io_bytes as u64, ns);
            if sent[i] >= ramp_end && now <= end {
                stats.record(dir, cfg.io_bytes as u64, ns);
            }
            if now < end {
                sent[i] = now;
                in_flight += 1;
                ch.submit(BdevIo::new(op, offset(&mut rng), cfg.io_bytes as u64, d.buf, i as u64), &mut ring);
            }
        }
        if now >= next_tick {
            let _ = tx.send(interval.take());
            next_tick += Duration::from_secs(1);
        }
        if cfg.poll == PollMode::Busy && cqes.is_empty() {
            std::hint::spin_loop();
        }
    }
    let _ = tx.send(interval.take());
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_writes_and_reads_on_a_file() {
        let dir = std::env::temp_dir().join(format!("stager-perf-disk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f.img");
        std::fs::File::create(&path).unwrap().set_len(8 << 20).unwrap();
        for (workload, sync, qd) in [("randwrite", true, 1), ("write", false, 8), ("randread", false, 4)] {
            let cfg = DiskConfig {
                name: None,
                path: path.clone(),
                workload: workload.into(),
                io_bytes: 4096,
                queue_depth: qd,
                range: None,
                sync,
                time: Duration::from_millis(300),
                ramp: Duration::ZERO,
                poll: PollMode::Busy,
                cpu: None,
                progress: false,
            };
            let r = disk(&cfg).unwrap();
            assert!(r.errors.is_empty() && r.results.ios > 0, "{workload}: {:?}", r.errors);
            assert_eq!(r.settings.workload, format!("disk-{workload}{}", if sync { "-dsync" } else { "" }));
        }
        let bad = DiskConfig {
            name: None,
            path: path.clone(),
            workload: "trim".into(),
            io_bytes: 4096,
            queue_depth: 1,
            range: None,
            sync: false,
            time: Duration::from_millis(100),
            ramp: Duration::ZERO,
            poll: PollMode::Busy,
            cpu: None,
            progress: false,
        };
        assert_eq!(disk(&bad).unwrap_err().exit_code(), crate::EXIT_USAGE);

        // OFFSET:LEN keeps every write inside that part of the file.
        std::fs::write(&path, vec![0u8; 8 << 20]).unwrap();
        let tail = DiskConfig {
            workload: "randwrite".into(),
            range: Some(ByteRange { offset_bytes: 6 << 20, len_bytes: Some(1 << 20) }),
            ..bad.clone()
        };
        let r = disk(&tail).unwrap();
        assert!(r.errors.is_empty() && r.results.ios > 0, "{:?}", r.errors);
        assert_eq!((r.settings.range_offset_bytes, r.settings.range_bytes), (Some(6 << 20), Some(1 << 20)));
        let img = std::fs::read(&path).unwrap();
        let written = |a: usize, b: usize| img[a..b].iter().any(|&x| x != 0);
        assert!(!written(0, 6 << 20) && written(6 << 20, 7 << 20) && !written(7 << 20, 8 << 20));
        let outside = DiskConfig { range: Some(ByteRange { offset_bytes: 8 << 20, len_bytes: None }), ..tail };
        assert_eq!(disk(&outside).unwrap_err().exit_code(), crate::EXIT_USAGE);
        let _ = std::fs::remove_dir_all(dir);
    }
}
