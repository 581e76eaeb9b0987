//! Limits of the fabric in one place, each with what it costs.

use std::time::Duration;

/// Largest control message (`Endpoint::send_msg`): the replica protocol's control traffic is
/// small; a larger message is the caller's bug. Each one is one allocation on receipt.
pub const MSG_BYTES_MAX: usize = 64 << 10;
/// Largest single one-sided write. A log entry (header + up to 1 MiB of data) fits; the tcp
/// backend's send buffer and the verbs backend's staging area each hold several.
pub const WRITE_BYTES_MAX: usize = 2 << 20;
/// Source slices one write may gather without being staged first (tcp backend's direct writev;
/// verbs gathers from the staging area anyway). More slices still work, through a copy.
pub const WRITE_SLICES_DIRECT_MAX: usize = 8;
/// Writes in flight on one endpoint (posted, not yet completed): the RDMA send queue depth. The
/// tcp backend keeps one `u64` per slot; verbs one send WR per slot.
pub const SEND_DEPTH: usize = 256;
/// Bytes of the tcp backend's per-endpoint send buffer (allocated once, at connect): writes the
/// kernel did not take at once wait here; a write that does not fit gets `Busy`.
pub const TCP_SEND_BUF_BYTES: usize = 8 << 20;
/// Bytes of the send buffer kept free of writes for control messages and acknowledgements, so a
/// stream of writes can never starve `send_msg` (or the ack that frees the peer's queue).
pub const TCP_SEND_RESERVE_BYTES: usize = 2 * (MSG_BYTES_MAX + 64);
/// Bytes of each endpoint's receive buffer (allocated once): frames are parsed from it; a write's
/// data beyond what it holds is read straight into the destination region.
pub const RECV_BUF_BYTES: usize = 256 << 10;
/// Bytes one `poll()` reads from one socket at most, so one busy peer cannot hold a reactor.
pub const POLL_READ_BYTES_MAX: usize = 4 << 20;
/// Bytes of the verbs backend's registered staging area per endpoint (allocated and registered
/// once): `write()` copies its source here, the NIC reads it from here.
pub const VERBS_STAGING_BYTES: usize = 8 << 20;
/// Zero-length receive WRs each verbs endpoint keeps posted: one is consumed by every incoming
/// WRITE WITH IMMEDIATE and reposted at once; a peer sending faster than we poll sees RNR retries.
pub const VERBS_RECV_DEPTH: usize = 256;
/// Completion queue entries per verbs endpoint: every send and receive WR can complete at once.
pub const VERBS_CQ_ENTRIES: usize = SEND_DEPTH + VERBS_RECV_DEPTH;
/// Largest set-up (handshake) message; bounds the handshake's read buffer.
pub const SETUP_MSG_BYTES_MAX: usize = 512;
/// How long the accepting side gives a new connection to finish the handshake: a silent or slow
/// client holds one handshake thread at most this long.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes under way at once on the accepting side (a thread each); more connections wait in
/// the listen backlog.
pub const HANDSHAKES_MAX: usize = 16;
/// Authenticated inbound endpoints not yet taken from `Fabric::incoming()`; beyond that a new one
/// is closed with a log line.
pub const INCOMING_MAX: usize = 64;
/// Longest node id, in bytes (ASCII letters, digits, `-`, `_`, `.`, `:`).
pub const NODE_ID_BYTES_MAX: usize = 64;
/// Heartbeats are sent when an endpoint has sent nothing for this fraction of the peer timeout.
pub const HEARTBEATS_PER_TIMEOUT: u32 = 4;
/// Shortest heartbeat interval, whatever the peer timeout: bounds the wake-ups of an idle reactor.
pub const HEARTBEAT_INTERVAL_MIN: Duration = Duration::from_millis(10);

const _: () = assert!(WRITE_BYTES_MAX + 64 <= TCP_SEND_BUF_BYTES - TCP_SEND_RESERVE_BYTES);
const _: () = assert!(MSG_BYTES_MAX + 64 <= RECV_BUF_BYTES, "a whole message must fit the receive buffer");
const _: () = assert!(WRITE_BYTES_MAX <= VERBS_STAGING_BYTES / 2);
const _: () = assert!(WRITE_BYTES_MAX <= u32::MAX as usize);
const _: () = assert!(MSG_BYTES_MAX <= u32::MAX as usize);
