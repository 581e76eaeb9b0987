//! Limits of the target in one place, each with what it costs.

use std::time::Duration;

/// In-capsule data the admin queue accepts (fixed at 8 KiB by the NVMe/TCP spec).
pub const ADMIN_IN_CAPSULE_BYTES: usize = 8192;
/// Asynchronous Event Requests a controller holds at once (AERL + 1); one slot each.
pub const AER_LIMIT: u8 = 4;
/// Error log entries kept per controller (ELPE + 1); 64 bytes each.
pub const ERROR_LOG_ENTRIES: usize = 16;
/// Highest NSID a subsystem may use (Identify Controller NN).
pub const NAMESPACES_MAX: u32 = 1024;
/// How often a reactor runs its timers (keep-alive expiry, dead-controller checks).
pub const TIMER_TICK: Duration = Duration::from_millis(10);
/// Longest a sleeping reactor waits before looking at its timers again.
pub const SLEEP_MAX: Duration = Duration::from_millis(100);
/// Slack on top of KATO before a controller is declared dead (the spec lets the host be late
/// by its own timer granularity).
pub const KEEP_ALIVE_GRACE: Duration = Duration::from_millis(500);
/// io_uring entries per reactor: sockets (2 per connection) plus flash I/O bursts.
pub const RING_ENTRIES: u32 = 4096;
/// Buffers kept per size class in a reactor's pool.
pub const POOL_KEEP_PER_CLASS: usize = 256;
/// Receive buffer beyond the largest PDU, so several PDUs land per receive.
pub const RX_SLACK_BYTES: usize = 128 * 1024;
/// Firmware revision reported in Identify Controller.
pub const FIRMWARE_REVISION: &str = "0.1.0";
