//! The deterministic simulator (TigerBeetle's VOPR, scaled to this engine).
//!
//! One seed decides everything: the host workload (writes, Write Zeroes, Deallocate, reads,
//! flushes, policy changes), the device latencies and therefore every reordering, the delays of
//! the messages between the engine and the destager, SAN slow-downs, outages and errors, flash
//! write errors (some of which land anyway) and transient flash read errors, crashes that tear
//! in-flight writes and drop what a volatile cache had not flushed (and every message in
//! flight), optional SAN power loss with a node crash, and restarts. After every step the
//! checkers compare both halves against a model of acknowledged writes:
//! - invariant 1: every block's newest data, wherever the engine says it is (log, memory,
//!   zeroes, clean cache, SAN), is the newest acknowledged version (or a newer uncertain one);
//! - invariant 2: at quiescence the SAN alone holds the newest data; at every destage batch no
//!   block on the SAN is older than its newest acknowledged write-through or destaged version;
//! - invariant 3: every host read returns the newest acknowledged data;
//! - invariant 4: at every completed destage batch the SAN holds the volume as of the batch's
//!   watermark;
//! - invariant 6: a host flush makes earlier write-through writes survive a SAN power loss, and
//!   log writes survive a crash of a volatile-cache flash device (checked through 1).
//!
//! A failure reports the seed and the step; rerun one seed with `STAGER_SIM_SEED`.
//!
//! Simplifications, on purpose: the host never has overlapping commands in flight (so the
//! model needs no NVMe ordering rules), a SAN loses its cache only together with a node crash,
//! blocks are 4 KiB and written atomically by the SAN, and epochs never change (no replicas yet).

pub mod damage;
mod devices;
pub mod fabric;
mod model;
mod run;

pub use devices::{DiskHandle, SimDisk};
pub use model::{decode_block, encode_block, Model};
pub use run::{run_seed, Failure, ReplicaNode, SimConfig, SimStats, Simulator};
