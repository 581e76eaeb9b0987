//! Limits of the NVMe layer in one place, each with what it costs.

/// Bytes of one submission queue entry (fixed by the spec).
pub const SQE_BYTES: usize = 64;
/// Bytes of one completion queue entry (fixed by the spec).
pub const CQE_BYTES: usize = 16;
/// Bytes of an identify data structure and of a discovery log entry block.
pub const IDENTIFY_BYTES: usize = 4096;
/// Largest PDU header (ICReq/ICResp are 128 bytes); bounds the header parse buffer.
pub const PDU_HEADER_MAX: usize = 128;
/// Bytes of a header or data digest (CRC32C).
pub const DIGEST_BYTES: usize = 4;
/// Hard upper bound on any PDU's length we accept: the largest data a single PDU may carry
/// (MAXH2CDATA / in-capsule limits are far below) plus headers. A peer claiming more is
/// malformed, and we never allocate on its word beyond this.
pub const PDU_LEN_MAX: usize = 16 << 20;
/// Queue depth cap for any queue (CAP.MQES + 1). Each slot costs one request context.
pub const QUEUE_DEPTH_MAX: usize = 1024;
/// Largest data transfer of one command we ever accept (MDTS cap), 8 MiB: one buffer per
/// in-flight command at most this size.
pub const IO_BYTES_MAX: usize = 8 << 20;

/// Largest data one NVMe command to local flash moves, whatever the device's MDTS: bounds the
/// bounce pages one VFIO command holds and keeps a single command's latency short.
pub const NVME_TRANSFER_MAX: usize = 1 << 20;
/// Submission entries of a passthrough channel's own io_uring (128 bytes each, plus 32-byte
/// completions twice as many): commands beyond it wait in the channel.
pub const PASSTHRU_RING_ENTRIES: u32 = 256;
/// Pages one passthrough command may span: Linux 6.1's NVMe PCIe driver maps at most 127
/// segments per command, and our 4 KiB-aligned buffers are one segment per page at worst, so
/// 127 pages (508 KiB) always fit.
pub const PASSTHRU_SEGMENTS_MAX: usize = 127;
/// How long closing a passthrough channel waits for its commands in flight (the kernel's NVMe
/// I/O timeout is 30 s) before it leaks their buffers rather than free memory a device may write.
pub const PASSTHRU_DRAIN_MAX: std::time::Duration = std::time::Duration::from_secs(35);
/// Admin queue entries of the VFIO driver: one command at a time is all it sends.
pub const VFIO_ADMIN_ENTRIES: u16 = 32;
/// Entries of each VFIO I/O queue pair (one per channel, i.e. per reactor using the device),
/// capped by CAP.MQES: 64 bytes of submission plus 16 of completion queue each, and one more
/// command in flight per entry.
pub const VFIO_QUEUE_ENTRIES: u16 = 256;
/// I/O queue pairs the VFIO driver asks a controller for (Set Features, Number of Queues): the
/// most channels one device serves at once.
pub const VFIO_IO_QUEUES_WANTED: u16 = 64;
/// DMA memory each VFIO channel maps for bounce buffers and PRP lists; I/O beyond it waits in
/// the channel. Four largest commands fit at once.
pub const VFIO_BOUNCE_BYTES: usize = 4 << 20;
/// An NVMe command a VFIO controller has not completed in this long fails the device (the
/// Linux driver's default I/O timeout).
pub const VFIO_IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// The same for admin commands (queue creation, identify).
pub const VFIO_ADMIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// A VFIO channel with commands in flight looks at CSTS (an uncached register read, ~1 µs on
/// PCIe) and its commands' ages once in this many polls.
pub const VFIO_HEALTH_EVERY_POLLS: u32 = 1024;
/// No interrupts: while a VFIO channel has commands in flight it keeps a timer of this period
/// armed in its reactor's io_uring, so a reactor that went to sleep polls the queue again soon.
pub const VFIO_WAKE_NS: u32 = 50_000;

// A VFIO channel can always start its largest command: its pages plus one PRP list page.
const _: () = assert!(NVME_TRANSFER_MAX / 4096 < VFIO_BOUNCE_BYTES / 4096);
