//! Limits of the harness in one place, each with what it costs. Every buffer, map and table
//! the harness keeps is bounded by one of these and sized at start-up, so a typo on the
//! command line fails with a message instead of eating the machine.

/// Deepest queue per connection (the NVMe layer's cap). Each slot holds one I/O buffer of
/// `--size` bytes.
pub const QUEUE_DEPTH_MAX: usize = stager_nvme::constants::QUEUE_DEPTH_MAX;

/// Most connections (threads, TCP I/O queues) of one run. One thread each; the target's own
/// limit on I/O queues per controller is 64.
pub const CONNECTIONS_MAX: usize = 64;

/// Largest I/O size: the NVMe layer's transfer cap. With `QUEUE_DEPTH_MAX` this bounds the
/// buffers of one connection (8 MiB x depth).
pub const IO_BYTES_MAX: usize = stager_nvme::constants::IO_BYTES_MAX;

/// Buffers of one connection, in bytes: depth x size may not exceed this (1 GiB), so
/// `-q 1024 -s 8m` is refused rather than allocating 8 GiB.
pub const CONNECTION_BUFFER_BYTES_MAX: usize = 1 << 30;

/// Longest run (measured time, and separately ramp), 24 h: only catches `-t 1e12` typos.
pub const RUN_SECONDS_MAX: f64 = 86_400.0;

/// Highest latency the histograms track, in ns (60 s). Slower completions are clamped to it
/// (and the run's timeout fires long before).
pub const LATENCY_NS_MAX: u64 = 60_000_000_000;

/// Significant decimal digits of the latency histograms (0.1 % resolution; ~100 KiB each).
pub const LATENCY_SIGFIGS: u8 = 3;

/// Blocks `--verify` tracks in one run: one 12-byte state per block of the range, so 4 Mi
/// blocks cost 48 MiB (16 GiB of 4 KiB blocks). Bigger namespaces: narrow with `--range`.
pub const VERIFY_BLOCKS_MAX: u64 = 4 << 20;

/// Distinct run seeds a verify state file may name (one per run that wrote to it); stored as
/// a u16 index per block.
pub const VERIFY_SEEDS_MAX: usize = u16::MAX as usize;

/// Largest verify state file read (header + 20 bytes per block of `VERIFY_BLOCKS_MAX`).
pub const VERIFY_STATE_BYTES_MAX: u64 = 128 << 20;

/// Verify failures kept with full detail per run; further ones are only counted.
pub const VERIFY_FAILURES_KEPT_MAX: usize = 64;

/// Largest read `stager-perf verify` issues when it scans recorded blocks (contiguous blocks
/// are read together up to this size).
pub const SCAN_IO_BYTES_MAX: usize = 128 << 10;

/// Largest report, comparison input or scenario file read.
pub const INPUT_FILE_BYTES_MAX: u64 = 16 << 20;

/// Runs in one scenario file.
pub const SCENARIO_RUNS_MAX: usize = 256;

/// Runs one `compare` or `plot` takes (one column or line each).
pub const COMPARE_RUNS_MAX: usize = 16;

/// Bytes the floor's sockets move per read/write call; also its scratch buffer size.
pub const FLOOR_CHUNK_BYTES: usize = 256 << 10;

/// Default size of the floor's small message: an NVMe/TCP CapsuleCmd PDU without data
/// (8-byte common header + 64-byte SQE), which is what a read request costs on the wire.
pub const FLOOR_SMALL_BYTES_DEFAULT: usize = 72;
