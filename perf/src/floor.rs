//! `stager-perf floor`: the cost of the network alone. A raw loopback TCP request/response
//! exchange with the same sizes, queue depth and connections as a run, so a run's latency and
//! IOPS can be read as a multiple of what the kernel's TCP stack costs on this machine
//! (shared/PERF.md: ~10 µs per 4 KiB round trip here, busy-polled).
//!
//! It starts its own echo server (one thread per connection) on 127.0.0.1, with TCP_NODELAY
//! and non-blocking sockets on both sides. Both sides busy-poll by default, like a polled
//! target and a polled host; `--poll sleep` sleeps in poll(2) instead, to show what a wake-up
//! costs. Messages are plain byte counts — the client keeps `depth` requests in flight, the
//! server answers each complete request with a response of fixed size — so no parsing or
//! copying is measured, only the stack:
//! * `read`: small request (default 72 bytes, an NVMe/TCP command capsule), `SIZE` response;
//! * `write`: `SIZE` request, small response;
//! * `echo`: `SIZE` both ways.
//!
//! The report has the same shape as a run's (kind `floor`), so `compare` and the scenario
//! summary put them side by side.

use std::collections::VecDeque;
use std::fmt;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::constants::{CONNECTIONS_MAX, FLOOR_CHUNK_BYTES, FLOOR_SMALL_BYTES_DEFAULT, IO_BYTES_MAX, QUEUE_DEPTH_MAX};
use crate::cpu;
use crate::progress::Progress;
use crate::report::{self, Measurement, Report, ReportKind, Settings};
use crate::run::{size_label, PollMode};
use crate::stats::{Direction, Interval, IntervalCounter, Stats};
use crate::{PerfError, Result};

/// Which side carries the payload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FloorMode {
    /// Small request, payload response (like a read).
    #[default]
    Read,
    /// Payload request, small response (like a write).
    Write,
    /// Payload both ways.
    Echo,
}

impl fmt::Display for FloorMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FloorMode::Read => "read",
            FloorMode::Write => "write",
            FloorMode::Echo => "echo",
        })
    }
}

impl FromStr for FloorMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "read" => Ok(FloorMode::Read),
            "write" => Ok(FloorMode::Write),
            "echo" => Ok(FloorMode::Echo),
            other => Err(format!("unknown floor mode {other:?} (read, write, echo)")),
        }
    }
}

#[derive(Clone, Debug)]
pub struct FloorConfig {
    pub name: Option<String>,
    pub mode: FloorMode,
    /// Payload bytes (the `-s SIZE` of the run it pairs with).
    pub io_bytes: usize,
    /// Bytes of the small message.
    pub small_bytes: usize,
    pub queue_depth: usize,
    pub connections: usize,
    pub time: Duration,
    pub ramp: Duration,
    pub poll: PollMode,
    /// Pin client i to `client_cpus[i % len]`.
    pub client_cpus: Vec<usize>,
    /// Pin server i to `server_cpus[i % len]`.
    pub server_cpus: Vec<usize>,
    pub progress: bool,
}

impl Default for FloorConfig {
    fn default() -> Self {
        FloorConfig {
            name: None,
            mode: FloorMode::Read,
            io_bytes: 4096,
            small_bytes: FLOOR_SMALL_BYTES_DEFAULT,
            queue_depth: 1,
            connections: 1,
            time: Duration::from_secs(10),
            ramp: Duration::ZERO,
            poll: PollMode::Busy,
            client_cpus: Vec::new(),
            server_cpus: Vec::new(),
            progress: false,
        }
    }
}

impl FloorConfig {
    pub fn validate(&self) -> Result<()> {
        let usage = |m: String| Err(PerfError::Usage(m));
        if !(1..=QUEUE_DEPTH_MAX).contains(&self.queue_depth) {
            return usage(format!("queue depth {} is not between 1 and {QUEUE_DEPTH_MAX}", self.queue_depth));
        }
        if !(1..=CONNECTIONS_MAX).contains(&self.connections) {
            return usage(format!("{} connections is not between 1 and {CONNECTIONS_MAX}", self.connections));
        }
        if !(1..=IO_BYTES_MAX).contains(&self.io_bytes) || !(1..=IO_BYTES_MAX).contains(&self.small_bytes) {
            return usage(format!("message sizes must be between 1 and {IO_BYTES_MAX} bytes"));
        }
        if self.time.is_zero() {
            return usage("the run time must be more than 0".into());
        }
        if self.time.as_secs_f64() > crate::constants::RUN_SECONDS_MAX
            || self.ramp.as_secs_f64() > crate::constants::RUN_SECONDS_MAX
        {
            return usage(format!("time and ramp may be at most {} s each", crate::constants::RUN_SECONDS_MAX));
        }
        Ok(())
    }

    /// (request, response) bytes.
    pub fn message_bytes(&self) -> (usize, usize) {
        match self.mode {
            FloorMode::Read => (self.small_bytes, self.io_bytes),
            FloorMode::Write => (self.io_bytes, self.small_bytes),
            FloorMode::Echo => (self.io_bytes, self.io_bytes),
        }
    }

    pub fn default_name(&self) -> String {
        let mut n = format!("floor-{}-{}-qd{}", self.mode, size_label(self.io_bytes), self.queue_depth);
        if self.connections > 1 {
            n.push_str(&format!("-x{}", self.connections));
        }
        n
    }
}

/// Non-blocking socket step results.
enum Io {
    Moved(usize),
    WouldBlock,
    Closed,
}

fn read_some(s: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<Io> {
    match s.read(buf) {
        Ok(0) => Ok(Io::Closed),
        Ok(n) => Ok(Io::Moved(n)),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => Ok(Io::WouldBlock),
        Err(e) => Err(e),
    }
}

fn write_some(s: &mut TcpStream, buf: &[u8]) -> std::io::Result<Io> {
    match s.write(buf) {
        Ok(0) => Ok(Io::Closed),
        Ok(n) => Ok(Io::Moved(n)),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => Ok(Io::WouldBlock),
        Err(e) => Err(e),
    }
}

/// Sleeps in poll(2) until the socket is readable (or writable, if asked), at most 100 ms.
fn wait_socket(s: &TcpStream, writable: bool) {
    let events = libc::POLLIN | if writable { libc::POLLOUT } else { 0 };
    let mut p = libc::pollfd { fd: s.as_raw_fd(), events, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe {
        libc::poll(&mut p, 1, 100);
    }
}

/// The echo server of one connection: answers every complete request with a response.
fn serve(mut s: TcpStream, req_bytes: usize, resp_bytes: usize, poll: PollMode, stop: &AtomicBool) {
    let mut scratch = vec![0u8; FLOOR_CHUNK_BYTES];
    let payload = vec![0x5Au8; FLOOR_CHUNK_BYTES];
    let (mut partial, mut owed) = (0usize, 0usize);
    while !stop.load(Ordering::Relaxed) {
        let mut moved = false;
        match read_some(&mut s, &mut scratch) {
            Ok(Io::Moved(n)) => {
                moved = true;
                partial += n;
                owed += (partial / req_bytes) * resp_bytes;
                partial %= req_bytes;
            }
            Ok(Io::WouldBlock) => {}
            Ok(Io::Closed) | Err(_) => return,
        }
        while owed > 0 {
            match write_some(&mut s, &payload[..owed.min(payload.len())]) {
                Ok(Io::Moved(n)) => {
                    moved = true;
                    owed -= n;
                }
                Ok(Io::WouldBlock) => break,
                Ok(Io::Closed) | Err(_) => return,
            }
        }
        if !moved {
            match poll {
                PollMode::Busy => std::hint::spin_loop(),
                PollMode::Sleep => wait_socket(&s, owed > 0),
            }
        }
    }
}

struct ClientArgs<'a> {
    req_bytes: usize,
    resp_bytes: usize,
    payload_bytes: u64,
    dir: Direction,
    depth: usize,
    ramp_end: Instant,
    end: Instant,
    poll: PollMode,
    stop: &'a AtomicBool,
    tx: mpsc::Sender<Interval>,
    id: usize,
}

/// One client connection: keeps `depth` requests in flight until the end, then drains.
fn client(mut s: TcpStream, a: ClientArgs) -> std::result::Result<Stats, String> {
    let mut stats = Stats::default();
    let mut interval = IntervalCounter::new(a.id);
    let mut scratch = vec![0u8; FLOOR_CHUNK_BYTES];
    let payload = vec![0xA5u8; FLOOR_CHUNK_BYTES];
    let mut in_flight: VecDeque<Instant> = VecDeque::with_capacity(a.depth);
    let start = Instant::now();
    for _ in 0..a.depth {
        in_flight.push_back(start);
    }
    let mut owed = a.depth * a.req_bytes;
    let mut partial = 0usize;
    let mut next_tick = start + Duration::from_secs(1);
    let result = 'run: loop {
        let mut moved = false;
        while owed > 0 {
            match write_some(&mut s, &payload[..owed.min(payload.len())]) {
                Ok(Io::Moved(n)) => {
                    moved = true;
                    owed -= n;
                }
                Ok(Io::WouldBlock) => break,
                Ok(Io::Closed) => break 'run Err("the echo server closed the connection".to_string()),
                Err(e) => break 'run Err(format!("sending: {e}")),
            }
        }
        match read_some(&mut s, &mut scratch) {
            Ok(Io::Moved(n)) => {
                moved = true;
                let now = Instant::now();
                let stopping = now >= a.end || a.stop.load(Ordering::Relaxed);
                partial += n;
                while partial >= a.resp_bytes {
                    partial -= a.resp_bytes;
                    let Some(sent) = in_flight.pop_front() else {
                        break;
                    };
                    let ns = now.saturating_duration_since(sent).as_nanos().min(u64::MAX as u128) as u64;
                    interval.record(a.payload_bytes, ns);
                    if sent >= a.ramp_end && now <= a.end {
                        stats.record(a.dir, a.payload_bytes, ns);
                    }
                    if !stopping {
                        in_flight.push_back(now);
                        owed += a.req_bytes;
                    }
                }
                if now >= next_tick {
                    let _ = a.tx.send(interval.take());
                    next_tick += Duration::from_secs(1);
                }
            }
            Ok(Io::WouldBlock) => {}
            Ok(Io::Closed) => break Err("the echo server closed the connection".to_string()),
            Err(e) => break Err(format!("receiving: {e}")),
        }
        if in_flight.is_empty() {
            break Ok(());
        }
        if !moved {
            if Instant::now() > a.end + Duration::from_secs(10) {
                break Err("responses stopped arriving".to_string());
            }
            match a.poll {
                PollMode::Busy => std::hint::spin_loop(),
                PollMode::Sleep => wait_socket(&s, owed > 0),
            }
        }
    };
    let _ = a.tx.send(interval.take());
    let _ = s.shutdown(Shutdown::Both);
    result.map(|()| stats)
}

fn socket_pair(listener: &TcpListener) -> std::io::Result<(TcpStream, TcpStream)> {
    let c = TcpStream::connect(listener.local_addr()?)?;
    let (s, _) = listener.accept()?;
    for x in [&c, &s] {
        x.set_nodelay(true)?;
        x.set_nonblocking(true)?;
    }
    Ok((c, s))
}

/// Measures the floor and returns its report (kind `floor`).
pub fn floor(cfg: &FloorConfig) -> Result<Report> {
    cfg.validate()?;
    let (req_bytes, resp_bytes) = cfg.message_bytes();
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| PerfError::Connect {
        addr: "127.0.0.1:0".into(),
        reason: format!("cannot listen for the echo server: {e}"),
    })?;
    let mut pairs = Vec::with_capacity(cfg.connections);
    for _ in 0..cfg.connections {
        pairs.push(socket_pair(&listener).map_err(|e| PerfError::Connect {
            addr: listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            reason: e.to_string(),
        })?);
    }
    drop(listener);

    let name = cfg.name.clone().unwrap_or_else(|| cfg.default_name());
    let started_unix_ms = report::unix_ms_now();
    let stop = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel::<Interval>();
    let start = Instant::now();
    let (ramp_end, end) = (start + cfg.ramp, start + cfg.ramp + cfg.time);
    let mut progress = Progress::new(cfg.progress, &name, start, cfg.ramp, cfg.time);
    let dir = if cfg.mode == FloorMode::Write { Direction::Write } else { Direction::Read };

    let (results, watched) = std::thread::scope(|scope| {
        let mut servers = Vec::new();
        let mut clients = Vec::new();
        let mut errors = Vec::new();
        for (i, (c, s)) in pairs.into_iter().enumerate() {
            let stop = &stop;
            let server_cpu = (!cfg.server_cpus.is_empty()).then(|| cfg.server_cpus[i % cfg.server_cpus.len()]);
            let client_cpu = (!cfg.client_cpus.is_empty()).then(|| cfg.client_cpus[i % cfg.client_cpus.len()]);
            let poll = cfg.poll;
            let spawned = std::thread::Builder::new().name(format!("floor-srv{i}")).spawn_scoped(scope, move || {
                pin(server_cpu, "server", i);
                serve(s, req_bytes, resp_bytes, poll, stop)
            });
            match spawned {
                Ok(h) => servers.push(h),
                Err(e) => {
                    errors.push(format!("cannot start echo server thread {i}: {e}"));
                    continue;
                }
            }
            let args = ClientArgs {
                req_bytes,
                resp_bytes,
                payload_bytes: cfg.io_bytes as u64,
                dir,
                depth: cfg.queue_depth,
                ramp_end,
                end,
                poll,
                stop,
                tx: tx.clone(),
                id: i,
            };
            let spawned = std::thread::Builder::new().name(format!("floor-cli{i}")).spawn_scoped(scope, move || {
                pin(client_cpu, "client", i);
                client(c, args)
            });
            match spawned {
                Ok(h) => clients.push(h),
                Err(e) => errors.push(format!("cannot start client thread {i}: {e}")),
            }
        }
        drop(tx);
        if !errors.is_empty() {
            stop.store(true, Ordering::Relaxed);
        }
        let watched = crate::progress::watch(rx, &mut progress);
        let mut results: Vec<std::result::Result<Stats, String>> =
            clients.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("a client thread panicked".into()))).collect();
        stop.store(true, Ordering::Relaxed);
        for h in servers {
            let _ = h.join();
        }
        results.extend(errors.into_iter().map(Err));
        (results, watched)
    });

    let mut stats = Stats::default();
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(s) => stats.add(&s),
            Err(e) => errors.push(e),
        }
    }
    let settings = Settings {
        workload: format!("floor-{}", cfg.mode),
        read_pct: if cfg.mode == FloorMode::Write { 0 } else { 100 },
        io_bytes: cfg.io_bytes as u64,
        queue_depth: cfg.queue_depth as u32,
        connections: cfg.connections as u32,
        time_s: cfg.time.as_secs_f64(),
        ramp_s: cfg.ramp.as_secs_f64(),
        poll: cfg.poll.to_string(),
        digests: false,
        verify: false,
        seed: 0,
        target: None,
        subnqn: None,
        nsid: None,
        block_bytes: None,
        range_offset_bytes: None,
        range_bytes: None,
        floor_small_bytes: Some(cfg.small_bytes as u64),
    };
    let window_s = watched.end_at.min(end).saturating_duration_since(ramp_end).as_secs_f64();
    let m = Measurement { stats: &stats, duration_s: window_s, cpu: watched.cpu, verify: None };
    let mut report = Report::build(ReportKind::Floor, name, started_unix_ms, settings, &m);
    report.errors = errors;
    Ok(report)
}

fn pin(cpu: Option<usize>, what: &str, i: usize) {
    if let Some(c) = cpu {
        if let Err(e) = cpu::pin_current_thread(c) {
            eprintln!("stager-perf: warning: cannot pin floor {what} {i} to CPU {c}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick(mode: FloorMode, qd: usize, size: usize) -> Report {
        let cfg =
            FloorConfig { mode, queue_depth: qd, io_bytes: size, time: Duration::from_secs(1), ..Default::default() };
        let r = floor(&cfg).unwrap();
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert!(r.results.iops > 0.0, "no I/O at QD{qd}: {:?}", r.results);
        assert!(r.results.latency_us.p50 > 0.0);
        assert_eq!(r.latency_cdf.len(), report::cdf_quantiles().len());
        r
    }

    #[test]
    fn floor_qd1_and_qd8_move_data() {
        let r1 = quick(FloorMode::Read, 1, 4096);
        let r8 = quick(FloorMode::Read, 8, 4096);
        assert_eq!(r8.settings.queue_depth, 8);
        // Bytes per I/O are the payload.
        assert_eq!(r1.results.bytes, r1.results.ios * 4096);
    }

    #[test]
    fn floor_write_and_echo_modes_and_large_sizes() {
        let cfg = FloorConfig {
            mode: FloorMode::Write,
            queue_depth: 4,
            io_bytes: 1 << 20,
            time: Duration::from_millis(300),
            ..Default::default()
        };
        let r = floor(&cfg).unwrap();
        assert!(r.results.write_ios > 0 && r.results.read_ios == 0);
        let cfg = FloorConfig {
            mode: FloorMode::Echo,
            connections: 2,
            time: Duration::from_millis(300),
            poll: PollMode::Sleep,
            ..Default::default()
        };
        let r = floor(&cfg).unwrap();
        assert!(r.results.ios > 0 && r.errors.is_empty());
    }

    #[test]
    fn bad_floor_settings_are_usage_errors() {
        for cfg in [
            FloorConfig { queue_depth: 0, ..Default::default() },
            FloorConfig { connections: 0, ..Default::default() },
            FloorConfig { io_bytes: 0, ..Default::default() },
            FloorConfig { time: Duration::ZERO, ..Default::default() },
        ] {
            assert_eq!(floor(&cfg).unwrap_err().exit_code(), crate::EXIT_USAGE);
        }
    }
}
