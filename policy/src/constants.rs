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

/// Largest host write, in blocks (1 MiB). A log entry is one header block plus the data, so the
/// largest entry is 1 MiB + 4 KiB; the log must hold several of them.
pub const WRITE_BLOCKS_MAX: u32 = 256;

/// Volumes one flash device can hold; bounded by the superblock size (40 bytes each).
pub const VOLUMES_PER_DEVICE_MAX: usize = 64;

/// Log writes in flight on one device. Each holds its entry buffer (up to 1 MiB + 4 KiB).
pub const LOG_WRITES_IN_FLIGHT_MAX: usize = 256;

/// Host operations outstanding per volume (the NVMe queue depth the target offers). Each may
/// hold a buffer of up to `WRITE_BLOCKS_MAX` blocks.
pub const HOST_OPS_PER_VOLUME_MAX: usize = 1024;

/// Smallest log the engine accepts: a few of the largest entries plus their pads.
pub const LOG_BYTES_MIN: u64 = 4 * (WRITE_BLOCKS_MAX as u64 + 1) * BLOCK_SIZE_U64;

/// A destage batch reads at most this much dirty data into memory (per volume).
pub const DESTAGE_BATCH_BYTES_MAX: u64 = 8 << 20;
/// ...and at most this many log entries, which bounds the per-batch bookkeeping.
pub const DESTAGE_BATCH_ENTRIES_MAX: usize = 1024;
/// Largest single SAN write the destager issues after collapsing a batch (1 MiB).
pub const DESTAGE_RUN_BLOCKS_MAX: u64 = 256;
/// Upper bound of the destager's adaptive in-flight depth (SAN writes per volume).
pub const DESTAGE_DEPTH_MAX: u32 = 32;

/// SAN retry back-off after an error or an unreachable SAN: doubles from min to max.
pub const SAN_BACKOFF_MIN_NS: u64 = 1_000_000;
pub const SAN_BACKOFF_MAX_NS: u64 = 1_000_000_000;

/// Superblock write retry back-off after a flash error.
pub const SUPERBLOCK_RETRY_NS: u64 = 10_000_000;

/// After a flash write error the device serves write-through only; it goes back to write-back
/// once its log is empty and this long has passed without another error.
pub const FLASH_DEGRADED_COOLDOWN_NS: u64 = 1_000_000_000;

const _: () = assert!(BLOCK_SIZE.is_power_of_two());
const _: () = assert!(DESTAGE_RUN_BLOCKS_MAX * BLOCK_SIZE_U64 <= DESTAGE_BATCH_BYTES_MAX);
const _: () = assert!((WRITE_BLOCKS_MAX as u64 + 1) * BLOCK_SIZE_U64 <= DESTAGE_BATCH_BYTES_MAX);
const _: () = assert!(88 + VOLUMES_PER_DEVICE_MAX * 40 + 4 <= BLOCK_SIZE);
