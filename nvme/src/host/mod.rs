//! The host side of NVMe/TCP: what `stager-perf` and every integration test use to talk to a
//! target. `QueuePair` is one TCP connection carrying one NVMe queue, fully pipelined up to its
//! depth; `Controller` is an admin queue plus I/O queues of one subsystem, with keep-alive;
//! `discover` reads a discovery controller's log.
//!
//! It is deliberately synchronous (no async runtime): a queue pair is owned by one thread,
//! which either busy-polls its socket (for honest QD1 latency, see shared/PERF.md: a sleeping
//! thread costs ~45 µs to wake) or sleeps in `poll(2)` when latency does not matter.

mod controller;
mod queue;

pub use controller::{connect_queue, discover, get_log_page_cmd, identify_cmd, resolve, Controller};
pub use queue::{QueuePair, Response};

use crate::status::Status;
use crate::tcp::Digests;

/// How a host connects.
#[derive(Clone, Debug)]
pub struct HostOptions {
    pub hostnqn: String,
    pub host_id: [u8; 16],
    pub digests: Digests,
    /// I/O queue depth asked for (entries); capped by the controller's CAP.MQES.
    pub queue_depth: u16,
    pub io_queues: u16,
    /// Keep-alive timeout asked for in Connect; the host sends Keep Alive at a third of it.
    pub kato_ms: u32,
    /// Spin on the socket instead of sleeping in poll(2) while waiting for completions.
    pub busy_poll: bool,
    /// Give up on a response after this long (a dead target must not hang a test).
    pub timeout_ms: u64,
    /// Ask the controller to disable SQ flow control on I/O queues (Connect CATTR bit 2): it
    /// then reports SQHD as FFFFh and may finish a read with a SUCCESS C2HData, no response.
    pub disable_sqflow: bool,
    /// R2Ts the host takes outstanding per command, 0's based (ICReq MAXR2T): the target may
    /// ask for a large write's data in this many + 1 pieces at once.
    pub maxr2t: u32,
}

impl Default for HostOptions {
    fn default() -> Self {
        HostOptions {
            hostnqn: "nqn.2026-11.dev.stager:host".into(),
            host_id: *b"stager-host-id-0",
            digests: Digests::default(),
            queue_depth: 128,
            io_queues: 1,
            kato_ms: 30_000,
            busy_poll: false,
            timeout_ms: 30_000,
            disable_sqflow: false,
            maxr2t: 3,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("I/O error talking to the target: {0}")]
    Io(#[from] std::io::Error),
    #[error("the target broke the NVMe/TCP protocol: {0}")]
    Protocol(String),
    #[error("the target terminated the connection (C2HTermReq FES {fes:#x}, FEI {fei})")]
    Terminated { fes: u16, fei: u32 },
    #[error("the target closed the connection")]
    Closed,
    #[error("no response within {0} ms")]
    Timeout(u64),
    #[error("NVMe status: {0}")]
    Nvme(Status),
    #[error("queue is full ({0} commands outstanding)")]
    QueueFull(usize),
}

pub type Result<T> = std::result::Result<T, HostError>;

/// Builders for the NVM I/O commands (CID is set when submitted).
pub mod io_cmd {
    use crate::command::{io, Command};

    pub fn read(nsid: u32, slba: u64, nlb: u32) -> Command {
        let mut c = Command::new(io::READ, 0);
        c.set_nsid(nsid).set_rw(slba, nlb);
        c
    }
    pub fn write(nsid: u32, slba: u64, nlb: u32) -> Command {
        let mut c = Command::new(io::WRITE, 0);
        c.set_nsid(nsid).set_rw(slba, nlb);
        c
    }
    pub fn compare(nsid: u32, slba: u64, nlb: u32) -> Command {
        let mut c = Command::new(io::COMPARE, 0);
        c.set_nsid(nsid).set_rw(slba, nlb);
        c
    }
    pub fn write_zeroes(nsid: u32, slba: u64, nlb: u32) -> Command {
        let mut c = Command::new(io::WRITE_ZEROES, 0);
        c.set_nsid(nsid).set_rw(slba, nlb);
        c
    }
    pub fn flush(nsid: u32) -> Command {
        let mut c = Command::new(io::FLUSH, 0);
        c.set_nsid(nsid);
        c
    }
    /// Dataset Management with the deallocate attribute; data is the range list
    /// (see `dsm_ranges`).
    pub fn deallocate(nsid: u32, ranges: usize) -> Command {
        let mut c = Command::new(io::DATASET_MANAGEMENT, 0);
        c.set_nsid(nsid).set_cdw(10, (ranges as u32).saturating_sub(1)).set_cdw(11, 1 << 2);
        c
    }
    /// Encodes DSM ranges (slba, nlb) as 16-byte entries.
    pub fn dsm_ranges(ranges: &[(u64, u32)]) -> Vec<u8> {
        let mut b = vec![0u8; ranges.len() * 16];
        for (i, (slba, nlb)) in ranges.iter().enumerate() {
            b[i * 16 + 4..i * 16 + 8].copy_from_slice(&nlb.to_le_bytes());
            b[i * 16 + 8..i * 16 + 16].copy_from_slice(&slba.to_le_bytes());
        }
        b
    }
}
