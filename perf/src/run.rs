//! The workload engine behind `stager-perf run`: one thread per connection, each owning one
//! TCP I/O queue of one controller (`Controller::take_io_queues`), keeping `-q` commands in
//! flight for the measured time, and recording every completion's latency.
//!
//! Shape and why:
//! * **One controller, N I/O queues, one thread each.** That is what a Linux or SPDK
//!   initiator does (one admin queue with keep-alive, an I/O queue per core), so the target
//!   sees the connection pattern it will see in production. A thread owns its queue, its
//!   buffers, its statistics and its slice of the LBA range outright; nothing is shared on the
//!   I/O path except a stop flag.
//! * **Polling.** With `--poll busy` (the default) a thread spins on its socket: on this kind
//!   of machine a sleeping thread costs ~45 µs to wake (shared/PERF.md), which would drown a
//!   QD1 measurement. `--poll sleep` sleeps in poll(2) instead, for when CPU matters more.
//! * **Measurement window.** Every I/O runs during the ramp too, but only I/Os submitted after
//!   the ramp and completed before the end are recorded; IOPS divide by the window, not by
//!   the wall time of the process.
//! * **Buffers** are allocated at start (`depth` per thread) and reused: the host library
//!   hands each one back in the `Response`.
//! * **Verify** (see `verify`): writes are stamped per block, reads are checked; a unit with an
//!   I/O in flight is never picked again until it completes, so writes never overlap each other
//!   or a read. The first failure stops every thread; state is saved on every exit path,
//!   including a lost connection, with in-flight writes recorded as pending.

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use stager_nvme::command::DataDirection;
use stager_nvme::host::{io_cmd, HostError, QueuePair, Response};

use crate::constants::{
    CONNECTIONS_MAX, CONNECTION_BUFFER_BYTES_MAX, IO_BYTES_MAX, QUEUE_DEPTH_MAX, SCAN_IO_BYTES_MAX, VERIFY_BLOCKS_MAX,
};
use crate::cpu;
use crate::progress::Progress;
use crate::report::{self, Measurement, Report, ReportKind, Settings};
use crate::session::{self, SessionOptions};
use crate::stats::{Direction, Interval, IntervalCounter, Stats};
use crate::units::{format_size, ByteRange};
use crate::url::TargetUrl;
use crate::verify::block::SplitMix64;
use crate::verify::{state_file, FailureLog, VerifyCounts, VerifyShard, VerifyState};
use crate::workload::{Layout, Picker, Workload};
use crate::{PerfError, Result};

/// How a waiting thread waits for completions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PollMode {
    /// Spin on the socket (lowest latency, one core per connection).
    #[default]
    Busy,
    /// Sleep in poll(2) until data arrives.
    Sleep,
}

impl fmt::Display for PollMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PollMode::Busy => "busy",
            PollMode::Sleep => "sleep",
        })
    }
}

impl FromStr for PollMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "busy" => Ok(PollMode::Busy),
            "sleep" => Ok(PollMode::Sleep),
            other => Err(format!("unknown poll mode {other:?} (busy, sleep)")),
        }
    }
}

/// Everything `stager-perf run` takes.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// Label in tables and legends; default derived from the workload (`randread-4k-qd1`).
    pub name: Option<String>,
    pub target: TargetUrl,
    /// Namespace; default: the verify state's, else the first active one.
    pub nsid: Option<u32>,
    pub hostnqn: Option<String>,
    pub workload: Workload,
    /// Percent reads for `rw`.
    pub mix_read_pct: u8,
    pub io_bytes: usize,
    pub queue_depth: usize,
    pub connections: usize,
    pub time: Duration,
    pub ramp: Duration,
    pub range: Option<ByteRange>,
    pub digests: bool,
    pub verify: bool,
    /// Load this verify state first (if it exists) and save the updated one at the end.
    pub verify_state: Option<PathBuf>,
    pub poll: PollMode,
    /// Seed of the I/O sequence and the run's seed id in verify stamps; random if unset.
    pub seed: Option<u64>,
    /// Pin connection i's thread to `cpus[i % len]`.
    pub cpus: Vec<usize>,
    /// Give up on a response after this long.
    pub timeout: Duration,
    /// Print the live progress line.
    pub progress: bool,
}

impl RunConfig {
    pub fn new(target: TargetUrl) -> RunConfig {
        RunConfig {
            name: None,
            target,
            nsid: None,
            hostnqn: None,
            workload: Workload::RandRead,
            mix_read_pct: 50,
            io_bytes: 4096,
            queue_depth: 1,
            connections: 1,
            time: Duration::from_secs(10),
            ramp: Duration::ZERO,
            range: None,
            digests: false,
            verify: false,
            verify_state: None,
            poll: PollMode::Busy,
            seed: None,
            cpus: Vec::new(),
            timeout: Duration::from_secs(30),
            progress: false,
        }
    }

    /// Checks the values that need no target (exit code 2 on failure).
    pub fn validate(&self) -> Result<()> {
        let usage = |m: String| Err(PerfError::Usage(m));
        if !(1..=QUEUE_DEPTH_MAX).contains(&self.queue_depth) {
            return usage(format!("queue depth {} is not between 1 and {QUEUE_DEPTH_MAX}", self.queue_depth));
        }
        if !(1..=CONNECTIONS_MAX).contains(&self.connections) {
            return usage(format!("{} connections is not between 1 and {CONNECTIONS_MAX}", self.connections));
        }
        if self.io_bytes == 0 || self.io_bytes > IO_BYTES_MAX {
            return usage(format!(
                "I/O size {} is not between 1 byte and {}",
                format_size(self.io_bytes as u64),
                format_size(IO_BYTES_MAX as u64)
            ));
        }
        if self.io_bytes.saturating_mul(self.queue_depth) > CONNECTION_BUFFER_BYTES_MAX {
            return usage(format!(
                "queue depth {} x {} bytes needs more than {CONNECTION_BUFFER_BYTES_MAX} bytes of buffers per connection",
                self.queue_depth, self.io_bytes
            ));
        }
        if self.time.is_zero() {
            return usage("the run time must be more than 0".into());
        }
        if self.time.as_secs_f64() > crate::constants::RUN_SECONDS_MAX
            || self.ramp.as_secs_f64() > crate::constants::RUN_SECONDS_MAX
        {
            return usage(format!("time and ramp may be at most {} s each", crate::constants::RUN_SECONDS_MAX));
        }
        if self.mix_read_pct > 100 {
            return usage(format!("--mix {} is not a percentage", self.mix_read_pct));
        }
        if self.verify_state.is_some() && !self.verify {
            return usage("--verify-state needs --verify".into());
        }
        Ok(())
    }

    /// `randread-4k-qd1`, `rw70-128k-qd32-x2`.
    pub fn default_name(&self) -> String {
        default_name(self.workload, self.mix_read_pct, self.io_bytes, self.queue_depth, self.connections)
    }

    fn session_options(&self) -> SessionOptions {
        SessionOptions {
            hostnqn: self.hostnqn.clone(),
            digests: self.digests,
            busy_poll: self.poll == PollMode::Busy,
            queue_depth: self.queue_depth,
            io_queues: self.connections,
            timeout: self.timeout,
            nsid: self.nsid,
        }
    }
}

/// A short size for names: 4096 → `4k`, 1 MiB → `1m`.
pub fn size_label(n: usize) -> String {
    if n >= 1 << 20 && n % (1 << 20) == 0 {
        format!("{}m", n >> 20)
    } else if n >= 1 << 10 && n % (1 << 10) == 0 {
        format!("{}k", n >> 10)
    } else {
        n.to_string()
    }
}

pub(crate) fn default_name(w: Workload, mix: u8, io_bytes: usize, qd: usize, connections: usize) -> String {
    let w = if w == Workload::Rw { format!("rw{mix}") } else { w.name().to_string() };
    let mut n = format!("{w}-{}-qd{qd}", size_label(io_bytes));
    if connections > 1 {
        n.push_str(&format!("-x{connections}"));
    }
    n
}

/// A random seed from the clock and pid (no need for cryptographic quality).
pub fn random_seed() -> u64 {
    let t =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let mut r = SplitMix64(t ^ ((std::process::id() as u64) << 32));
    r.next_u64().max(1)
}

/// What a run produced.
#[derive(Debug)]
pub struct RunOutcome {
    pub report: Report,
    /// Verify failures (detail for the first few, and the total).
    pub failures: FailureLog,
    /// Where the verify state was saved, if it was.
    pub state_saved: Option<PathBuf>,
}

impl RunOutcome {
    /// 3 on verify failures; 1 on a lost connection, command errors or a failed save; else 0.
    pub fn exit_code(&self) -> i32 {
        if self.failures.total > 0 {
            crate::EXIT_VERIFY
        } else if !self.report.errors.is_empty() || self.report.results.errors > 0 {
            crate::EXIT_FAILURE
        } else {
            crate::EXIT_OK
        }
    }
}

/// When the measurement window is.
#[derive(Clone, Copy)]
struct Window {
    ramp_end: Instant,
    end: Instant,
}

/// One command in flight.
#[derive(Clone, Copy)]
struct InFlight {
    submitted: Instant,
    dir: Direction,
    unit: u64,
}

/// What a worker hands back.
struct WorkerResult {
    stats: Stats,
    verify: Option<VerifyShard>,
    /// Why it stopped early (lost connection), if it did.
    error: Option<String>,
}

struct Worker<'a> {
    id: usize,
    qp: QueuePair,
    nsid: u32,
    layout: &'a Layout,
    picker: Picker,
    depth: usize,
    slots: Vec<Option<InFlight>>,
    free_tags: Vec<usize>,
    free_bufs: Vec<Vec<u8>>,
    /// Units with an I/O in flight; kept only when verifying (see the module comment).
    busy_units: HashSet<u64>,
    verify: Option<VerifyShard>,
    stats: Stats,
    interval: IntervalCounter,
    window: Window,
    stop: &'a AtomicBool,
    tx: mpsc::Sender<Interval>,
}

impl Worker<'_> {
    fn run(mut self) -> WorkerResult {
        let error = self.resolve_pending().and_then(|()| self.main_loop()).err();
        if error.is_some() {
            // Stop the others too: a run with a dead connection measures nothing useful.
            self.stop.store(true, Ordering::Relaxed);
        }
        let _ = self.tx.send(self.interval.take());
        WorkerResult {
            stats: self.stats,
            verify: self.verify,
            error: error.map(|e| format!("connection {}: {}", self.id, session::describe(&e))),
        }
    }

    /// Reads every block a loaded state left with a write in flight, so each resolves to the
    /// generation that landed before this run writes it again.
    fn resolve_pending(&mut self) -> std::result::Result<(), HostError> {
        let Some(shard) = &mut self.verify else { return Ok(()) };
        let bb = self.layout.block_bytes;
        let max_blocks = (SCAN_IO_BYTES_MAX / bb as usize).max(1) as u32;
        let extents = shard.pending_extents(max_blocks);
        if extents.is_empty() {
            return Ok(());
        }
        let reads = crate::scan::read_extents(&mut self.qp, self.nsid, bb, &extents, self.depth, |lba, block| {
            shard.check_read(lba, block);
        })?;
        if reads.read_errors > 0 {
            self.stats.errors += reads.read_errors;
            if self.stats.first_error.is_none() {
                self.stats.first_error = reads.first_read_error;
            }
        }
        if shard.failures.total > 0 {
            self.stop.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    fn main_loop(&mut self) -> std::result::Result<(), HostError> {
        let mut responses: Vec<Response> = Vec::with_capacity(self.depth);
        let mut next_tick = Instant::now() + Duration::from_secs(1);
        let verifying = self.verify.is_some();
        loop {
            let now = Instant::now();
            let stopping = now >= self.window.end || self.stop.load(Ordering::Relaxed);
            if !stopping {
                while let Some(&tag) = self.free_tags.last() {
                    let busy = &self.busy_units;
                    let Some((dir, unit)) = self.picker.next(|u| verifying && busy.contains(&u)) else { break };
                    self.free_tags.pop();
                    self.submit(tag, dir, unit)?;
                }
            }
            if self.free_tags.len() == self.depth {
                if stopping {
                    return Ok(());
                }
                continue;
            }
            responses.clear();
            self.qp.wait(&mut responses)?;
            let t = Instant::now();
            for r in responses.drain(..) {
                self.complete(r, t)?;
            }
            if t >= next_tick {
                let _ = self.tx.send(self.interval.take());
                next_tick += Duration::from_secs(1);
            }
        }
    }

    fn submit(&mut self, tag: usize, dir: Direction, unit: u64) -> std::result::Result<(), HostError> {
        let mut buf = self.free_bufs.pop().unwrap_or_default();
        buf.resize(self.layout.io_bytes, 0);
        let lba = self.layout.unit_lba(unit);
        let nlb = self.layout.blocks_per_unit;
        let (cmd, data_dir) = match dir {
            Direction::Write => {
                if let Some(shard) = &mut self.verify {
                    let bb = self.layout.block_bytes as usize;
                    for (i, block) in buf.chunks_exact_mut(bb).enumerate() {
                        shard.prepare_write(lba + i as u64, block);
                    }
                }
                (io_cmd::write(self.nsid, lba, nlb), DataDirection::HostToController)
            }
            Direction::Read => (io_cmd::read(self.nsid, lba, nlb), DataDirection::ControllerToHost),
        };
        if self.verify.is_some() {
            self.busy_units.insert(unit);
        }
        let submitted = Instant::now();
        self.slots[tag] = Some(InFlight { submitted, dir, unit });
        self.qp.submit(cmd, buf, data_dir, tag as u64)
    }

    fn complete(&mut self, r: Response, now: Instant) -> std::result::Result<(), HostError> {
        let tag = r.tag as usize;
        let Some(io) = self.slots.get_mut(tag).and_then(Option::take) else {
            return Err(HostError::Protocol(format!("completion for tag {tag}, which is not in flight")));
        };
        self.free_tags.push(tag);
        let lba = self.layout.unit_lba(io.unit);
        let ok = r.completion.status.is_success();
        let data = r.data;
        if data.len() != self.layout.io_bytes {
            return Err(HostError::Protocol(format!(
                "buffer of {} bytes came back for a {}-byte I/O",
                data.len(),
                self.layout.io_bytes
            )));
        }
        if let Some(shard) = &mut self.verify {
            let bb = self.layout.block_bytes as usize;
            let blocks = self.layout.blocks_per_unit as u64;
            match (io.dir, ok) {
                (Direction::Read, true) => {
                    let mut good = true;
                    for (i, block) in data.chunks_exact(bb).enumerate() {
                        good &= shard.check_read(lba + i as u64, block);
                    }
                    if !good {
                        self.stop.store(true, Ordering::Relaxed);
                    }
                }
                (Direction::Read, false) => {}
                (Direction::Write, true) => (0..blocks).for_each(|i| shard.write_acked(lba + i)),
                (Direction::Write, false) => (0..blocks).for_each(|i| shard.write_failed(lba + i)),
            }
            self.busy_units.remove(&io.unit);
        }
        let bytes = self.layout.io_bytes as u64;
        if ok {
            let latency_ns = now.saturating_duration_since(io.submitted).as_nanos().min(u64::MAX as u128) as u64;
            self.interval.record(bytes, latency_ns);
            if io.submitted >= self.window.ramp_end && now <= self.window.end {
                self.stats.record(io.dir, bytes, latency_ns);
            }
        } else {
            self.interval.record_error();
            let status = r.completion.status;
            let dir = io.dir;
            self.stats.record_error(|| format!("{dir:?} of LBA {lba}: {status}"));
        }
        // Reads leave their data in the buffer; without verify a later write may send it,
        // which is fine: only its length matters then.
        self.free_bufs.push(data);
        Ok(())
    }
}

/// Runs a workload and returns its report. `Err` means the run could not start (bad
/// arguments, no target, no namespace); problems during the run (a lost connection, command
/// errors, verify failures) are in the outcome, whose `exit_code` tells them apart.
pub fn run(cfg: &RunConfig) -> Result<RunOutcome> {
    cfg.validate()?;
    let seed = cfg.seed.unwrap_or_else(random_seed);
    // Load the state before touching the network: a bad file fails fast.
    let loaded = match &cfg.verify_state {
        Some(p) if p.exists() => Some(state_file::load(p)?),
        _ => None,
    };
    let mut opts = cfg.session_options();
    if opts.nsid.is_none() {
        opts.nsid = loaded.as_ref().map(|s| s.nsid);
    }
    let mut session = session::open(&cfg.target, &opts)?;
    let max_io = session.max_io_bytes();
    if cfg.io_bytes > max_io {
        return Err(PerfError::Target(format!(
            "I/O size {} is larger than the target's largest transfer (MDTS) of {}",
            format_size(cfg.io_bytes as u64),
            format_size(max_io as u64)
        )));
    }
    let (bb, blocks) = (session.namespace.block_size, session.namespace.blocks);
    let range = cfg.range.unwrap_or(ByteRange { offset_bytes: 0, len_bytes: None });
    let layout = Layout::new(bb, blocks, cfg.io_bytes, range.offset_bytes, range.len_bytes, cfg.connections)
        .map_err(|e| PerfError::Usage(format!("namespace {} ({blocks} blocks of {bb} bytes): {e}", session.nsid)))?;

    let mut verify_state = None;
    let mut shards: Vec<Option<VerifyShard>> = (0..cfg.connections).map(|_| None).collect();
    if cfg.verify {
        if layout.total_blocks() > VERIFY_BLOCKS_MAX {
            return Err(PerfError::Usage(format!(
                "--verify tracks at most {VERIFY_BLOCKS_MAX} blocks, the range has {}; narrow it with --range",
                layout.total_blocks()
            )));
        }
        let mut st = match loaded {
            Some(mut st) => {
                let path = cfg.verify_state.as_deref().unwrap_or(std::path::Path::new("?")).display().to_string();
                if st.block_bytes != bb || st.nsid != session.nsid {
                    return Err(PerfError::Target(format!(
                        "{path} records namespace {} with {}-byte blocks, this run uses namespace {} with {bb}-byte blocks",
                        st.nsid, st.block_bytes, session.nsid
                    )));
                }
                if let Some(&(last, _)) = st.entries.last() {
                    if last >= blocks {
                        return Err(PerfError::Target(format!(
                            "{path} records LBA {last}, beyond the namespace's {blocks} blocks"
                        )));
                    }
                }
                if st.subnqn != session.subnqn {
                    eprintln!(
                        "stager-perf: warning: {path} was recorded through {}, this run uses {}",
                        st.subnqn, session.subnqn
                    );
                    st.subnqn.clone_from(&session.subnqn);
                }
                st
            }
            None => VerifyState::new(bb, session.nsid, &session.subnqn),
        };
        let slices: Vec<(u64, u64)> = (0..cfg.connections).map(|i| layout.slice_blocks(i)).collect();
        shards = st.split(&slices, seed)?.into_iter().map(Some).collect();
        verify_state = Some(st);
    }

    let queues = session.controller.take_io_queues();
    if queues.len() != cfg.connections {
        return Err(PerfError::Target(format!("asked for {} I/O queues, got {}", cfg.connections, queues.len())));
    }
    let depth = queues.iter().map(|q| q.depth()).min().unwrap_or(0).min(cfg.queue_depth);
    if depth < cfg.queue_depth {
        eprintln!("stager-perf: warning: the target limits queues to {depth} entries; running at QD{depth}");
    }

    let name = cfg.name.clone().unwrap_or_else(|| cfg.default_name());
    let started_unix_ms = report::unix_ms_now();
    let stop = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel::<Interval>();
    let start = Instant::now();
    let window = Window { ramp_end: start + cfg.ramp, end: start + cfg.ramp + cfg.time };
    let mut progress = Progress::new(cfg.progress, &name, start, cfg.ramp, cfg.time);
    let mut spawn_errors = Vec::new();

    let (results, cpu_window, window_s) = std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for (i, (qp, shard)) in queues.into_iter().zip(shards).enumerate() {
            let slice = layout.slices[i];
            let mut pattern = SplitMix64(seed ^ 0xB10C);
            let free_bufs: Vec<Vec<u8>> = (0..depth)
                .map(|_| {
                    let mut b = vec![0u8; cfg.io_bytes];
                    for w in b.chunks_exact_mut(8) {
                        w.copy_from_slice(&pattern.next_u64().to_le_bytes());
                    }
                    b
                })
                .collect();
            let worker = Worker {
                id: i,
                qp,
                nsid: session.nsid,
                layout: &layout,
                picker: Picker::new(
                    cfg.workload,
                    cfg.mix_read_pct,
                    slice,
                    seed.wrapping_add((i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                ),
                depth,
                slots: vec![None; depth],
                free_tags: (0..depth).rev().collect(),
                free_bufs,
                busy_units: HashSet::with_capacity(if cfg.verify { depth * 2 } else { 0 }),
                verify: shard,
                stats: Stats::default(),
                interval: IntervalCounter::new(i),
                window,
                stop: &stop,
                tx: tx.clone(),
            };
            let cpu = (!cfg.cpus.is_empty()).then(|| cfg.cpus[i % cfg.cpus.len()]);
            let spawned = std::thread::Builder::new().name(format!("perf-conn{i}")).spawn_scoped(scope, move || {
                if let Some(c) = cpu {
                    if let Err(e) = cpu::pin_current_thread(c) {
                        eprintln!("stager-perf: warning: cannot pin connection {i} to CPU {c}: {e}");
                    }
                }
                worker.run()
            });
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    spawn_errors.push(format!("cannot start the thread of connection {i}: {e}"));
                }
            }
        }
        drop(tx);
        let watched = crate::progress::watch(rx, &mut progress);
        let cpu_window = watched.cpu;
        let window_s = watched.end_at.min(window.end).saturating_duration_since(window.ramp_end).as_secs_f64();
        let results: Vec<std::result::Result<WorkerResult, String>> = handles
            .into_iter()
            .enumerate()
            .map(|(i, h)| h.join().map_err(|_| format!("the thread of connection {i} panicked")))
            .collect();
        (results, cpu_window, window_s)
    });

    let mut stats = Stats::default();
    let mut errors = spawn_errors;
    let mut done_shards = Vec::new();
    let mut counts = VerifyCounts::default();
    let mut failures = FailureLog::default();
    for r in results {
        match r {
            Ok(w) => {
                stats.add(&w.stats);
                errors.extend(w.error);
                if let Some(mut s) = w.verify {
                    counts.add(&s.counts);
                    failures.extend(std::mem::take(&mut s.failures));
                    done_shards.push(s);
                }
            }
            Err(e) => errors.push(e),
        }
    }

    let settings = Settings {
        workload: cfg.workload.name().to_string(),
        read_pct: cfg.workload.read_pct(cfg.mix_read_pct),
        io_bytes: cfg.io_bytes as u64,
        queue_depth: depth as u32,
        connections: cfg.connections as u32,
        time_s: cfg.time.as_secs_f64(),
        ramp_s: cfg.ramp.as_secs_f64(),
        poll: cfg.poll.to_string(),
        digests: cfg.digests,
        verify: cfg.verify,
        seed,
        target: Some(session.url.to_string()),
        subnqn: Some(session.subnqn.clone()),
        nsid: Some(session.nsid),
        block_bytes: Some(bb),
        range_offset_bytes: Some(range.offset_bytes),
        range_bytes: Some(layout.total_blocks() * bb as u64),
        floor_small_bytes: None,
    };
    let measured =
        Measurement { stats: &stats, duration_s: window_s, cpu: cpu_window, verify: cfg.verify.then_some(&counts) };
    let mut report = Report::build(ReportKind::Run, name, started_unix_ms, settings, &measured);

    let mut state_saved = None;
    let panicked = errors.iter().any(|e| e.ends_with("panicked"));
    if panicked && cfg.verify_state.is_some() {
        // A lost shard would silently drop blocks from the state; keep the previous file.
        errors.push("verify state not saved: a connection's thread panicked".into());
    } else if let (Some(mut st), Some(path)) = (verify_state, &cfg.verify_state) {
        st.merge(&done_shards);
        match state_file::save(path, &st) {
            Ok(()) => state_saved = Some(path.clone()),
            Err(e) => errors.push(format!("saving the verify state: {e}")),
        }
    }
    report.errors = errors;
    if report.errors.is_empty() {
        session.close();
    }
    Ok(RunOutcome { report, failures, state_saved })
}
