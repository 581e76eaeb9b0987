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
