//! Limits and timings of the cluster client in one place, each with what it costs.

use std::time::Duration;

/// Shortest lease TTL accepted. etcd rounds a shorter one up to its own minimum (1.5 election
/// timeouts, 2 s with etcd's defaults) and counts leases in whole seconds; a shorter TTL than
/// the server grants would only make the local deadline lie.
pub const LEASE_TTL_MIN: Duration = Duration::from_secs(2);
/// Longest lease TTL accepted: a dead node holds its volumes (and the manager role) this long
/// before anyone may take over.
pub const LEASE_TTL_MAX: Duration = Duration::from_secs(300);
/// Part of the TTL kept back from the local lease deadline (`ttl / LEASE_MARGIN_DIVISOR`): the
/// time a node has, after `lease_state()` says `Lost`, to stop acting as an owner before etcd may
/// expire the lease on its side. Also covers the (ppm-sized) rate difference of two clocks.
pub const LEASE_MARGIN_DIVISOR: u32 = 4;
/// Keep-alive requests per TTL (`ttl / KEEPALIVE_PER_TTL` apart). With the margin above, three
/// requests can fail in a row before the local deadline passes; each costs one small gRPC
/// message on the node's one keep-alive stream.
pub const KEEPALIVE_PER_TTL: u32 = 4;
/// Shortest and longest `op_timeout`: each blocking call waits at most this long for etcd.
pub const OP_TIMEOUT_MIN: Duration = Duration::from_millis(100);
pub const OP_TIMEOUT_MAX: Duration = Duration::from_secs(60);
/// Largest record (JSON bytes) written or read. A volume record with a full history is a few
/// KiB; etcd's own request limit is 1.5 MiB. Bounds what one malformed value can make us parse.
pub const RECORD_BYTES_MAX: usize = 64 << 10;
/// Transitions a volume record keeps (`VolumeRecord::push_transition` drops the oldest): the
/// visible history of a volume, bounded so the record stays small.
pub const HISTORY_MAX: usize = 64;
/// Replicas a volume may have (write-back+2).
pub const REPLICAS_MAX: usize = 2;
/// Longest SAN name in a volume record (a path or an iSCSI URL).
pub const SAN_BYTES_MAX: usize = 1024;
/// How long the owner waits, with a replica's link down while both nodes are alive, before it
/// names the replica `unreachable` in the volume record (and the manager replaces it): long
/// enough for a link's own reconnect after a blip, short against the lease TTL.
pub const UNREACHABLE_AFTER: Duration = Duration::from_secs(3);
/// Longest node id: the same bound as the node id a replica writes into its flash superblock.
pub const NODE_ID_BYTES_MAX: usize = 31;
/// Longest key prefix (`/stager/NAME`).
pub const PREFIX_BYTES_MAX: usize = 128;
/// Pause before a broken watch or keep-alive stream is opened again (doubling up to the max):
/// bounds the reconnect rate against an etcd that is down.
pub const RETRY_PAUSE_MIN: Duration = Duration::from_millis(100);
pub const RETRY_PAUSE_MAX: Duration = Duration::from_secs(2);

// At least two keep-alives fall inside the window the deadline leaves (TTL less the margin):
// KEEPALIVE_PER_TTL * (1 - 1/LEASE_MARGIN_DIVISOR) >= 2.
const _: () = assert!(LEASE_MARGIN_DIVISOR >= 2);
const _: () = assert!(KEEPALIVE_PER_TTL * (LEASE_MARGIN_DIVISOR - 1) >= 2 * LEASE_MARGIN_DIVISOR);
