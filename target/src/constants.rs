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
/// Highest ANA group id (ANAGRPMAX, and NANAGRPID): hosts size their ANA log buffer by it,
/// 32 bytes a group (Linux: header + NANAGRPID * 32 + MNAN * 4 must fit in MDTS). Fixed, not
/// configured, so every node describes a subsystem's paths alike.
pub const ANA_GROUP_ID_MAX: u32 = 128;
/// The largest ANA log page a host may have to read: its header, ANA_GROUP_ID_MAX group
/// descriptors and NAMESPACES_MAX NSIDs (8 208 bytes). Linux reads it in one command and turns
/// ANA off for a controller whose MDTS is smaller (every path then looks optimized), so a
/// multipath configuration needs `transport.max_io_bytes` at least this big (config/ana.rs).
pub const ANA_LOG_BYTES_MAX: u32 = (stager_nvme::log_page::ANA_HEADER_BYTES
    + stager_nvme::log_page::ANA_GROUP_BYTES * ANA_GROUP_ID_MAX as usize
    + 4 * NAMESPACES_MAX as usize) as u32;
const _: () = assert!(ANA_LOG_BYTES_MAX <= 16 << 10, "config/ana.rs tells operators 16KiB is enough");
/// Highest controller id (0xFFF0.. are reserved by the spec).
pub const CNTLID_MAX: u16 = 0xFFEF;
/// How often a reactor looks at its timers; an idle reactor wakes this often (20 times a
/// second: well under 1% of a core).
pub const TIMER_TICK: Duration = Duration::from_millis(50);
/// How often each connection's timers run (keep-alive expiry, dead controller, handshake and
/// stalled-PDU timeouts): a visit costs ~0.3 µs per connection (its state is cold by then), so
/// a thousand idle connections cost ~0.1% of a core; timeouts fire up to this much late.
pub const CONNECTION_TIMER: Duration = Duration::from_millis(250);
/// How long a reactor whose only work in flight is finished by kernel threads (a flash file's
/// `fdatasync`) keeps its core awake, yielding it on every turn, before it sleeps: a core that
/// sleeps and is woken by the completion cost a QD1 write ~40 µs more on a virtual machine;
/// yielding gives a worker queued on this core the core at once. Past the window (the worker
/// queued behind a busy-polling thread on the other core) it sleeps, so that worker moves here.
pub const KERNEL_YIELD_FOR: Duration = Duration::from_micros(200);
/// Longest a sleeping reactor waits before looking at its timers again.
pub const SLEEP_MAX: Duration = Duration::from_millis(100);
/// A spinning reactor reads the clock every this many loop iterations (and after every sleep):
/// timers, timeouts and the end of the spin window come up to that many iterations late (µs),
/// and the loop saves the ~5% of its time it spent in clock_gettime.
pub const CLOCK_READ_EVERY: u32 = 32;
/// A reactor looks at its message channel when its wake eventfd fired, and at least every this
/// many iterations (a message always comes with a wake-up; this is only a safety net).
pub const MSG_CHECK_EVERY: u32 = 4096;
/// Least time between two returns of free heap memory to the system after connections closed
/// (`malloc_trim`: walks the allocator's free lists, about a millisecond for tens of MiB).
pub const TRIM_INTERVAL: Duration = Duration::from_secs(1);
/// Slack on top of KATO before a controller is declared dead (the spec lets the host be late
/// by its own timer granularity).
pub const KEEP_ALIVE_GRACE: Duration = Duration::from_millis(500);
/// io_uring entries per reactor: sockets (2 per connection) plus flash I/O bursts.
pub const RING_ENTRIES: u32 = 4096;
/// Buffers kept per size class in a reactor's pool.
pub const POOL_KEEP_PER_CLASS: usize = 256;
/// Bytes of free buffers a reactor's pool keeps in all; buffers returned beyond it are freed,
/// so a burst of large I/O (or a thousand connections closing) does not pin memory for ever.
pub const POOL_KEEP_BYTES: usize = 64 << 20;

// ---- NVMe/TCP connections ----------------------------------------------------------------
// Per connection, in the worst case: RX_BUFFER_BYTES + slots × (one I/O buffer of up to
// transport.max_io_bytes + ~250 bytes of request state), where slots = the queue's size
// (SQSIZE + 1, at most transport.max_queue_depth + 1); responses and read data wait for the
// socket inside those slots, never beyond them.

/// Receive buffer per connection: headers, small PDUs and the data that arrives with them.
/// Large data goes straight into I/O buffers, so this only sets how many PDUs one receive can
/// bring (64 KiB: ~15 4 KiB in-capsule writes). Its pages are touched as traffic arrives.
pub const RX_BUFFER_BYTES: usize = 64 << 10;
/// Request slots a connection has before Fabrics Connect tells it the queue size.
pub const INITIAL_SLOTS: usize = 32;
/// Segments one sendmsg gathers (iovecs); more wait for the next send. 16 bytes each.
pub const TX_IOV_MAX: usize = 64;
/// Emptied byte segments a connection keeps for reuse: a send of reads has one per read (the
/// PDU headers between two data segments), so as many as one send gathers, or a busy
/// connection allocates. Each starts at TX_SEGMENT_BYTES and keeps what it grew to.
pub const TX_SPARE_MAX: usize = TX_IOV_MAX;
/// Initial capacity of a byte segment: a few PDU headers and responses (24-72 bytes each).
pub const TX_SEGMENT_BYTES: usize = 512;
/// R2Ts one command may have outstanding at once (also bounded by the host's MAXR2T + 1): a
/// write larger than MAXH2CDATA is asked for in this many pieces at once.
pub const R2T_PER_CMD_MAX: usize = 8;
/// Bits of an R2T's transfer tag that name the request slot; the bits above name the R2T.
pub const TTAG_SLOT_BITS: u32 = 11;
/// Data an outstanding R2T still has to bring above which a connection receives only up to
/// the end of each header, so that an H2CData PDU's data lands straight in the I/O buffer
/// (one more receive per PDU, instead of copying what came in with the header).
pub const RX_DIRECT_MIN_BYTES: usize = 16 << 10;
/// A connection whose commands have waited this long for slots (its host not reading its
/// responses) is reported once in the log.
pub const BACKPRESSURE_WARN_AFTER: Duration = Duration::from_secs(1);
/// A send carrying at least this much read data goes out zero-copy (when enabled): below it
/// the page pinning and the notification cost more than the copy.
pub const ZC_SEND_MIN_BYTES: usize = 32 << 10;
/// Zero-copy sends per connection awaiting their notification; past it sends copy.
pub const ZC_NOTIFS_MAX: usize = 32;
/// Sent bytes per connection held for unfinished zero-copy sends; past it sends copy.
pub const ZC_HOLD_BYTES_MAX: usize = 16 << 20;

// Every slot of the largest queue must have a transfer tag, with room for its R2Ts above.
// (slots = QUEUE_DEPTH_MAX + 1 at most: indices up to QUEUE_DEPTH_MAX)
const _: () = assert!(stager_nvme::constants::QUEUE_DEPTH_MAX < 1 << TTAG_SLOT_BITS);
const _: () = assert!(R2T_PER_CMD_MAX << TTAG_SLOT_BITS <= 1 << 16);
const _: () = assert!(R2T_PER_CMD_MAX <= u8::MAX as usize);
/// Firmware revision reported in Identify Controller.
pub const FIRMWARE_REVISION: &str = "0.1.0";
/// How often a node in a cluster (`cluster:`, feature `cluster`) re-reads its free flash and SAN
/// reachability and re-puts its registration when they changed, and retries etcd when it could
/// not register: one status round trip to each flash reactor and at most one small etcd write.
pub const CLUSTER_REFRESH: Duration = Duration::from_secs(2);
/// How often the cluster thread reads the volume records and live nodes and acts on them (owner,
/// resource manager, replica): a detected failure waits at most this long on top of its
/// detection (a lease's expiry, `UNREACHABLE_AFTER`). Costs two small etcd reads and one status
/// round trip to each flash reactor per tick.
pub const CLUSTER_TICK: Duration = Duration::from_millis(250);
/// How often, between ticks, the cluster thread of a node that owns replicated volumes looks
/// (one status round trip to each flash reactor) whether one holds write acknowledgements
/// because an in-sync replica was lost: the record must say so before they go out, so this
/// bounds how long such writes wait on top of one etcd write.
pub const CLUSTER_HOLD_POLL: Duration = Duration::from_millis(20);
/// How often a node probes the SAN of another node's volume (a file opened, an iSCSI login) to
/// say whether it could keep a copy of it.
pub const CLUSTER_SAN_PROBE: Duration = Duration::from_secs(10);
/// How long a flash device must keep failing (degraded, with errors coming all along:
/// `DeviceStatus::failing`) before the owner of a volume on it with an in-sync replica hands the
/// volume's dirty data to that replica (a rescue while the owner stays up, serving
/// write-through). One error that does not recur costs no rescue, however long the log takes to
/// drain.
pub const FLASH_HANDOVER_AFTER: Duration = Duration::from_secs(2);
