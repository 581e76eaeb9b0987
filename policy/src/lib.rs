//! The write-back engine: volumes, write policies, the flash log, destage, read cache,
//! recovery.
//!
//! A flash device has two halves that share no memory and talk in messages ([`link`]):
//! - the [`Engine`] (front half) lives on the front-end reactor that owns the device: it
//!   appends host writes to the log (group commit, one buffer from the host to the flash),
//!   acknowledges them in log order, serves reads (index, log, clean cache), gates
//!   write-through writes (invariant 2), persists the superblock and replays the log at start;
//! - the [`Destager`] (back half) lives on the node's destage core: it owns the SANs, reads
//!   dirty entries back from the log in large sequential reads, collapses and writes them in
//!   batches, flushes the SAN, and reports watermarks; host SAN traffic goes through it too.
//!
//! Both are single-owner, poll-driven state machines. They never block, spawn nothing and own
//! no clock: flash, SAN and time sit behind the small traits in [`io`], so reactors drive them
//! in production and the seeded simulator in [`sim`] drives them in tests, choosing every
//! latency, message delay, reordering, torn write, crash and restart from one seed.
//!
//! Map of the crate (one file per actor or object, as STYLE.md asks):
//! - [`types`]: the newtypes (`Lba`, `LogSeq`, `LogPos`, `Incarnation`, `OpId`, ...);
//!   [`constants`]: every bound.
//! - [`io`]: the `Flash`, `San` and `Clock` traits; [`link`]: the messages between the halves.
//! - [`log`]: the on-flash wire formats (`entry`, `frame`, `superblock`) and the circular
//!   space accounting (`ring`).
//! - [`policy`]: requested vs effective write policy.
//! - [`engine`]: the front half — `appender` (group commit), `superblock` (its writer),
//!   `replay` (recovery), `volume` (per-volume state) and, by concern, writes, reads, flushes;
//!   [`index`]: the dirty extent map; [`cache`]: the clean read cache (S3-FIFO).
//! - [`replica`]: replication (write-back+1/+2) — the record, acknowledgement and publication
//!   wire formats and the two ends of a link; the engine side is `engine/replicate.rs`.
//! - [`destage`]: the back half — batches (`batch`) and the depth/rate controller (`depth`).
//! - [`node`]: both halves on one thread, linked by a plain queue (offline tools, tests).
//! - [`sim`]: the deterministic simulator, its device models, the model of acknowledged writes
//!   and the invariant checkers.
//!
//! Tests: `cargo test -p stager-policy --release` runs the unit tests, one test per scenario
//! (`tests/scenarios.rs`), and the simulator over 10 000 seeds plus mutation tests that prove
//! its checkers catch deliberate bugs (`tests/sim.rs`). `STAGER_SIM_SEEDS=N`,
//! `STAGER_SIM_SEED_BASE=B` and `STAGER_SIM_SOAK_SECONDS=S` run more; `STAGER_SIM_SEED=X`
//! reruns one seed, and `STAGER_SIM_TRACE=<volume index>:<block>` prints its history.

pub mod cache;
pub mod constants;
pub mod destage;
pub mod engine;
pub mod index;
pub mod io;
pub mod link;
pub mod log;
pub mod node;
pub mod policy;
pub mod replica;
pub mod sim;
pub mod types;

pub use destage::{DestageEvent, Destager};
pub use engine::{
    Bugs, CopyState, Engine, EngineConfig, EngineEvent, EngineState, HostDone, HostOp, LinkStatus, ReplayReport,
    RescueState, Status, VolumeMetrics, VolumeSpec, WriteState, RING_BYTES_MIN,
};
pub use io::{AlignedBuf, BufPool, Clock, Fabric, FabricError, FabricEvent, Flash, FlashInfo, IoDone, IoError, San};
pub use link::{FromDestage, ToDestage};
pub use policy::{EffectiveReason, WritePolicy};
pub use types::{Epoch, Incarnation, IoToken, Lba, LinkId, LogPos, LogSeq, OpId, VolumeId};
