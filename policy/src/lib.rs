//! The write-back engine (issue 4): volumes, write policies, the flash log, destage, read cache,
//! recovery.
//!
//! The engine is a single-owner, poll-driven state machine. It never blocks, spawns nothing and
//! owns no clock: flash, SAN and time sit behind the small traits in [`io`], so a reactor can
//! drive it in production and the seeded simulator in [`sim`] can drive it in tests, choosing
//! every latency, reordering, torn write, crash and restart from one seed.
//!
//! Map of the crate (one file per actor or object, as STYLE.md asks):
//! - [`types`]: the newtypes (`Lba`, `LogSeq`, `Epoch`, `VolumeId`); [`constants`]: every bound.
//! - [`io`]: the `Flash`, `San` and `Clock` traits.
//! - [`log`]: the on-flash wire formats (`entry`, `superblock`) and the circular space
//!   accounting (`ring`).
//! - [`policy`]: requested vs effective write policy; [`volume`]: per-volume state and metrics.
//! - [`engine`]: the device-level owner (one per flash device, several volumes) and the host
//!   API; [`index`]: dirty extent index; [`cache`]: the clean read cache (S3-FIFO);
//!   [`destage`]: the destager and its AIMD depth controller; [`recovery`]: log replay.
//! - [`sim`]: the deterministic simulator, its device models, the model of acknowledged writes
//!   and the invariant checkers.
//!
//! Tests: `cargo test -p stager-policy --release` runs the unit tests, one test per failure
//! scenario (`tests/scenarios.rs`), and the simulator over 3000 seeds plus mutation tests that
//! prove its checkers catch deliberate bugs (`tests/sim.rs`). `STAGER_SIM_SEEDS=N`,
//! `STAGER_SIM_SEED_BASE=B` and `STAGER_SIM_SOAK_SECONDS=S` run more; `STAGER_SIM_SEED=X`
//! reruns one seed, and `STAGER_SIM_TRACE=<volume index>:<block>` prints its history.

pub mod cache;
pub mod constants;
pub mod destage;
pub mod engine;
pub mod index;
pub mod io;
pub mod log;
pub mod policy;
pub mod recovery;
pub mod sim;
pub mod types;
pub mod volume;

pub use engine::{Bugs, Engine, EngineConfig, EngineEvent, EngineState, HostDone, HostOp, LogFullPolicy, Status};
pub use io::{Clock, Flash, FlashInfo, IoDone, IoError, San};
pub use policy::{EffectiveReason, WritePolicy};
pub use types::{Epoch, Lba, LogSeq, VolumeId};
pub use volume::{VolumeMetrics, VolumeSpec};
