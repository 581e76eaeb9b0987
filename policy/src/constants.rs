//! Every bound of the engine in one place (TigerBeetle's `constants.zig`), each with what it
//! costs. Limits that depend on each other are checked at compile time at the bottom.

/// Volume block size and log alignment unit. 4 KiB so log data is O_DIRECT-aligned on every
/// NVMe device we target; a 512-byte-sector volume would need read-modify-write (not supported).
pub const BLOCK_SIZE: usize = 4096;
pub const BLOCK_SIZE_U64: u64 = BLOCK_SIZE as u64;

/// Two superblock copies at the start of the device, written alternately, so a torn superblock
/// write always leaves the previous one intact. Costs 8 KiB of flash.
pub const SUPERBLOCK_COPIES: u64 = 2;
/// Where the log area starts (after the superblock copies).
pub const LOG_START: u64 = SUPERBLOCK_COPIES * BLOCK_SIZE_U64;

/// Largest host write one log entry holds, in blocks (1 MiB, the transport's default largest
/// transfer). Larger commands are split by the namespace before they reach the engine.
pub const WRITE_BLOCKS_MAX: u32 = 256;

/// Entry headers one frame's header block holds: (2048 - 64-byte frame header) / 64, so the
/// frame header and its entry headers fit in half a block and the other half holds a mirror of
/// them (one damaged sector of a header block loses nothing). At QD32, 32 concurrent 4 KiB
/// writes take two frames: 34 blocks of log for 32 of data.
pub const FRAME_ENTRIES_MAX: usize = 31;

/// Data blocks one frame carries at most (2 MiB): bounds a frame write and the time the writes
/// grouped into it wait for each other. At least one largest entry must fit.
pub const FRAME_DATA_BLOCKS_MAX: u32 = 512;

/// Frame writes in flight on one device (group commit depth). Writes arriving while this many
/// frames are on their way join the next frame instead of paying a device flush each; at QD1
/// a write never waits (a frame is cut at once when fewer are in flight). Each frame holds
/// its entries' host buffers until it is durable.
pub const FRAMES_IN_FLIGHT_MAX: usize = 4;

/// Log space only frames of `SanWritten` entries may use (4 MiB, at most a sixteenth of the
/// log): with the log full, the entry of a write that went to the SAN at once need not wait for
/// destage to free space. At up to 31 entries per 4 KiB header block, it holds the entries of
/// thousands of such writes.
pub const LOG_RECORD_RESERVE_BYTES: u64 = 4 << 20;

/// Volumes one flash device can hold; bounded by the superblock size (40 bytes each).
pub const VOLUMES_PER_DEVICE_MAX: usize = 64;

/// Host operations outstanding per volume (the NVMe queue depth the target offers, over all
/// connections). Each may hold a buffer of up to `WRITE_BLOCKS_MAX` blocks.
pub const HOST_OPS_PER_VOLUME_MAX: usize = 4096;

/// Smallest log the engine accepts: four of the largest entries with their header blocks, so
/// writes always make progress. (A log this small cuts frames of at most a quarter of itself.)
pub const LOG_BYTES_MIN: u64 = 4 * (WRITE_BLOCKS_MAX as u64 + 1) * BLOCK_SIZE_U64;

/// A destage batch collapses at most this much surviving data in memory (per volume). Larger
/// batches amortise the SAN flush and the intent; smaller ones free log space sooner.
pub const DESTAGE_BATCH_BYTES_MAX: u64 = 32 << 20;
/// ...and spans at most this many log entries, which bounds its bookkeeping.
pub const DESTAGE_BATCH_ENTRIES_MAX: usize = 64 * 1024;
/// When destaging is urgent, batches written back to back share one SAN flush, up to this
/// much data between flushes, without holding more than two batches in memory. On tgtd over a
/// file, without early flushes, the flush took ~30 ms after a 32 MiB batch and ~70 ms after
/// 128 MiB (`flush_ms` in the destager's "destage batch durable" debug line).
pub const DESTAGE_CHAIN_BYTES_MAX: u64 = 128 << 20;
/// When destaging is urgent, the destager sends the SAN a flush that moves nothing after this
/// much completed writing, so the SAN writes back while more writes go out (see
/// `Destager::early_flush`): the flush ending a 128 MiB chain then took 5-18 ms instead of ~70.
pub const DESTAGE_EARLY_FLUSH_BYTES: u64 = 16 << 20;
/// A batch starts once this much data is dirty, once the oldest dirty entry waited
/// `DESTAGE_GATHER_NS`, or at once when the front end is idle or the log a quarter full: every
/// batch costs two superblock writes on the flash and a SAN flush, which a batch per
/// acknowledged write (QD1) paid for every write, beside the host's own log writes; on a
/// two-core machine its SAN I/O took the host's core too (a QD1 write 40% slower with 1 ms
/// than with 10 ms).
pub const DESTAGE_GATHER_BYTES: u64 = 1 << 20;
pub const DESTAGE_GATHER_NS: u64 = 10_000_000;
pub const DESTAGE_GATHER_UNTIL_PERMILLE: u32 = 250;
/// Largest single SAN write the destager issues after collapsing a batch (1 MiB).
pub const DESTAGE_RUN_BLOCKS_MAX: u64 = 256;
/// Largest log read of the destager: adjacent entries are read together (sequentially).
pub const DESTAGE_READ_BYTES_MAX: u64 = 2 << 20;
/// Log reads of one volume's destager in flight (each holds up to `DESTAGE_READ_BYTES_MAX`).
pub const DESTAGE_READS_IN_FLIGHT_MAX: usize = 8;
/// Upper bound of the destager's adaptive in-flight depth (SAN writes per volume). The run
/// buffers are a batch's whatever the depth. tgtd on a file drained a log of random writes
/// 1.5–1.7x faster with 128 in flight than with 32 (see `depth.rs`).
pub const DESTAGE_DEPTH_MAX: u32 = 128;

/// Replay reads the log in windows of up to this size (sequentially, several in flight). The
/// first window is `REPLAY_WINDOW_BYTES_FIRST` and each next one twice the last, so a log
/// with little in it is not read whole and a full one streams in large reads.
pub const REPLAY_WINDOW_BYTES: u64 = 4 << 20;
pub const REPLAY_WINDOW_BYTES_FIRST: u64 = 128 << 10;
/// Replay windows in flight: enough to keep a device streaming while frames are checked.
pub const REPLAY_WINDOWS_IN_FLIGHT: usize = 4;

/// SAN retry back-off after an error or an unreachable SAN: doubles from min to max.
pub const SAN_BACKOFF_MIN_NS: u64 = 1_000_000;
pub const SAN_BACKOFF_MAX_NS: u64 = 1_000_000_000;

/// Superblock write retry back-off after a flash error.
pub const SUPERBLOCK_RETRY_NS: u64 = 10_000_000;
/// A flash read of dirty data that failed is tried again this long after (the host's read, or
/// the destager's, until it succeeds or its deadline passes): a dead device is asked at this
/// pace, not in a loop.
pub const FLASH_READ_RETRY_NS: u64 = 20_000_000;
/// A degraded flash device whose last error is younger than this is failing still
/// (`Engine::flash_failing`).
pub const FLASH_FAILING_WINDOW_NS: u64 = 1_000_000_000;
/// The destager's log reads back off up to this between tries while they keep failing.
pub const LOG_READ_RETRY_MAX_NS: u64 = 1_000_000_000;
/// A lasting flash read failure is logged again at most this often.
pub const FLASH_READ_FAIL_LOG_NS: u64 = 5_000_000_000;

/// After a flash write error the device serves write-through only; it goes back to write-back
/// once its log is empty and this long has passed without another error.
pub const FLASH_DEGRADED_COOLDOWN_NS: u64 = 1_000_000_000;

/// How often the engine tells the destager how the front end is doing (log fill, latency).
pub const PRESSURE_EVERY_NS: u64 = 2_000_000;

const _: () = assert!(BLOCK_SIZE.is_power_of_two());
const _: () = assert!(WRITE_BLOCKS_MAX <= FRAME_DATA_BLOCKS_MAX);
const _: () = assert!(64 + FRAME_ENTRIES_MAX * 64 <= BLOCK_SIZE / 2);
const _: () = assert!(DESTAGE_RUN_BLOCKS_MAX * BLOCK_SIZE_U64 <= DESTAGE_BATCH_BYTES_MAX);
const _: () = assert!((WRITE_BLOCKS_MAX as u64 + 1) * BLOCK_SIZE_U64 <= DESTAGE_READ_BYTES_MAX);
const _: () = assert!((FRAME_DATA_BLOCKS_MAX as u64 + 1) * BLOCK_SIZE_U64 <= REPLAY_WINDOW_BYTES);
const _: () = assert!(88 + VOLUMES_PER_DEVICE_MAX * 40 + 4 <= BLOCK_SIZE);
