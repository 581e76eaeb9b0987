//! `stager-perf`: the latency and throughput harness of Stager, and its data-integrity checker.
//!
//! It drives an NVMe/TCP target through the project's own host library
//! (`stager_nvme::host`), one thread and one TCP I/O queue per connection, and measures what a
//! host sees: IOPS, bandwidth, and the latency distribution (hdrhistogram, recorded in ns).
//! Beside the workload engine ([`run`]) it has the pieces a benchmark needs to be honest:
//! a raw loopback TCP request/response *floor* with the same sizes and depths ([`floor`]), so a
//! result can be read as "x times the cost of the network alone"; a stable JSON report
//! ([`report`], schema `stager-perf/1`) with enough of the histogram to plot; side-by-side
//! comparison ([`compare`]) and latency CDF plots ([`plot`]); and scenario matrices
//! ([`scenario`]) that the bench script runs.
//!
//! `--verify` turns every workload into a correctness check ([`verify`]): each block written
//! carries a self-describing header (LBA, generation, run seed, CRC32C), the harness remembers
//! the newest acknowledged generation of every block, and every read is checked against it.
//! The map can be saved and loaded, so a later run (or `stager-perf verify`) checks what an
//! earlier one wrote — across a target crash, which is what the crash tests rely on.
//!
//! Everything is a library so integration tests and other crates can call it; `main.rs` is a
//! thin clap front end that maps [`PerfError`] to exit codes ([`PerfError::exit_code`]).

// `x % n != 0` rather than `is_multiple_of`, which needs Rust 1.87; the workspace's
// rust-version is 1.85 (same choice as target/src/config.rs).
#![allow(clippy::manual_is_multiple_of)]

pub mod compare;
pub mod constants;
pub mod cpu;
pub mod disk;
pub mod floor;
pub mod hostile;
pub mod plot;
pub mod progress;
pub mod report;
pub mod run;
pub mod scan;
pub mod scenario;
pub mod session;
pub mod stats;
pub mod units;
pub mod url;
pub mod verify;
pub mod workload;

use std::path::PathBuf;

pub use report::Report;
pub use url::TargetUrl;

/// Process exit code for a clean run.
pub const EXIT_OK: i32 = 0;
/// Exit code for a run that could not be done or finished with I/O errors.
pub const EXIT_FAILURE: i32 = 1;
/// Exit code for bad usage (the same code clap uses for argument errors).
pub const EXIT_USAGE: i32 = 2;
/// Exit code for a data-integrity failure found by `--verify` or `stager-perf verify`:
/// distinct from every other failure so crash tests can tell "the target lost data" apart
/// from "the harness could not run".
pub const EXIT_VERIFY: i32 = 3;

/// Everything that can go wrong in the harness.
#[derive(Debug, thiserror::Error)]
pub enum PerfError {
    /// Arguments or a scenario value that make no sense (exit code 2).
    #[error("{0}")]
    Usage(String),
    #[error("bad target URL {url:?}: {reason} (expected tcp://HOST:PORT[/NQN])")]
    Url { url: String, reason: String },
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    /// The target answered, but not with what the harness needs (no subsystem, no namespace).
    #[error("{0}")]
    Target(String),
    #[error("{what}: {source}")]
    Host {
        what: String,
        #[source]
        source: stager_nvme::host::HostError,
    },
    #[error("{}: {source}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file that exists but whose content is wrong (state file, report, scenario).
    #[error("{}: {reason}", path.display())]
    BadFile { path: PathBuf, reason: String },
    /// Data-integrity failures were found (exit code 3); the details were printed already.
    #[error("verify failed: {0} bad block(s)")]
    Verify(u64),
}

impl PerfError {
    /// The process exit code this error maps to.
    pub fn exit_code(&self) -> i32 {
        match self {
            PerfError::Usage(_) | PerfError::Url { .. } => EXIT_USAGE,
            PerfError::Verify(_) => EXIT_VERIFY,
            _ => EXIT_FAILURE,
        }
    }

    pub fn file(path: impl Into<PathBuf>, source: std::io::Error) -> PerfError {
        PerfError::File { path: path.into(), source }
    }

    pub fn bad_file(path: impl Into<PathBuf>, reason: impl Into<String>) -> PerfError {
        PerfError::BadFile { path: path.into(), reason: reason.into() }
    }

    pub fn host(what: impl Into<String>, source: stager_nvme::host::HostError) -> PerfError {
        PerfError::Host { what: what.into(), source }
    }
}

pub type Result<T> = std::result::Result<T, PerfError>;
