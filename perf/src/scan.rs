//! Reading back recorded blocks: `stager-perf verify` (every block of a state file), and the
//! start of a `--verify-state` run (every block a crash left with a write in flight, so the
//! run knows which of the two generations landed before it writes the block again).
//!
//! Reads are pipelined up to the queue depth, and contiguous recorded blocks are read
//! together (up to `SCAN_IO_BYTES_MAX`), so checking a state of a million blocks takes
//! seconds, not a million round trips.

use std::time::{Duration, Instant};

use stager_nvme::command::DataDirection;
use stager_nvme::host::{io_cmd, HostError, QueuePair, Response};

use crate::constants::SCAN_IO_BYTES_MAX;
use crate::session::{self, SessionOptions};
use crate::url::TargetUrl;
use crate::verify::{self, check_block, state_file, FailureLog, Verdict, VerifyCounts};
use crate::{PerfError, Result};

/// What a scan's reads did.
#[derive(Clone, Debug, Default)]
pub struct ReadCounts {
    pub blocks_read: u64,
    /// Reads that completed with an error status (their blocks are not checked).
    pub read_errors: u64,
    pub first_read_error: Option<String>,
}

/// Reads every extent (first LBA, blocks) with up to `depth` reads in flight and hands each
/// logical block to `on_block`.
pub fn read_extents(
    qp: &mut QueuePair,
    nsid: u32,
    block_bytes: u32,
    extents: &[(u64, u32)],
    depth: usize,
    mut on_block: impl FnMut(u64, &[u8]),
) -> std::result::Result<ReadCounts, HostError> {
    let bb = block_bytes as usize;
    let depth = depth.clamp(1, qp.depth());
    let mut counts = ReadCounts::default();
    let mut slots: Vec<Option<(u64, u32)>> = vec![None; depth];
    let mut free: Vec<usize> = (0..depth).rev().collect();
    let mut bufs: Vec<Vec<u8>> = Vec::with_capacity(depth);
    let mut out: Vec<Response> = Vec::with_capacity(depth);
    let mut next = extents.iter();
    let mut pending = next.next();
    loop {
        while let (Some(&(lba, n)), Some(&tag)) = (pending, free.last()) {
            let len = n as usize * bb;
            let mut buf = bufs.pop().unwrap_or_default();
            buf.resize(len, 0);
            qp.submit(io_cmd::read(nsid, lba, n), buf, DataDirection::ControllerToHost, tag as u64)?;
            free.pop();
            slots[tag] = Some((lba, n));
            pending = next.next();
        }
        if free.len() == depth {
            return Ok(counts);
        }
        out.clear();
        qp.wait(&mut out)?;
        for r in out.drain(..) {
            let tag = r.tag as usize;
            let Some((lba, n)) = slots.get_mut(tag).and_then(Option::take) else {
                return Err(HostError::Protocol(format!("completion for unknown tag {tag}")));
            };
            free.push(tag);
            if !r.completion.status.is_success() {
                counts.read_errors += 1;
                if counts.first_read_error.is_none() {
                    counts.first_read_error = Some(format!("read of LBA {lba}+{n}: {}", r.completion.status));
                }
            } else if r.data.len() == n as usize * bb {
                for (i, block) in r.data.chunks_exact(bb).enumerate() {
                    on_block(lba + i as u64, block);
                }
                counts.blocks_read += n as u64;
            } else {
                return Err(HostError::Protocol(format!("read of {n} blocks returned {} bytes", r.data.len())));
            }
            bufs.push(r.data);
        }
    }
}

/// Settings of `stager-perf verify`.
#[derive(Clone, Debug)]
pub struct VerifyConfig {
    pub target: TargetUrl,
    pub session: SessionOptions,
    pub state_path: std::path::PathBuf,
}

/// What `stager-perf verify` found.
#[derive(Clone, Debug, Default)]
pub struct VerifyOutcome {
    pub blocks_recorded: u64,
    pub pending_recorded: u64,
    pub counts: VerifyCounts,
    pub failures: FailureLog,
    pub reads: ReadCounts,
    pub elapsed: Duration,
}

impl VerifyOutcome {
    /// 3 on any bad block, 1 if some block could not be read, else 0.
    pub fn exit_code(&self) -> i32 {
        if self.failures.total > 0 {
            crate::EXIT_VERIFY
        } else if self.reads.read_errors > 0 || self.counts.blocks_checked < self.blocks_recorded {
            crate::EXIT_FAILURE
        } else {
            crate::EXIT_OK
        }
    }
}

/// Reads every block recorded in a state file and checks it. Read-only: the state file is
/// not changed (a later `--verify-state` run resolves in-flight writes itself).
pub fn verify_state(cfg: &VerifyConfig) -> Result<VerifyOutcome> {
    let state = state_file::load(&cfg.state_path)?;
    if let Some(n) = cfg.session.nsid.filter(|&n| n != state.nsid) {
        return Err(PerfError::Usage(format!(
            "--nsid {n} but {} was recorded on namespace {}",
            cfg.state_path.display(),
            state.nsid
        )));
    }
    let mut opts = cfg.session.clone();
    opts.nsid = Some(state.nsid);
    opts.io_queues = 1;
    let mut s = session::open(&cfg.target, &opts)?;
    if s.namespace.block_size != state.block_bytes {
        return Err(PerfError::Target(format!(
            "{} counts {}-byte blocks, namespace {} has {}-byte blocks",
            cfg.state_path.display(),
            state.block_bytes,
            s.nsid,
            s.namespace.block_size
        )));
    }
    if !state.subnqn.is_empty() && state.subnqn != s.subnqn {
        eprintln!(
            "stager-perf: warning: {} was recorded through {}, verifying through {}",
            cfg.state_path.display(),
            state.subnqn,
            s.subnqn
        );
    }
    if let Some(&(last, _)) = state.entries.last() {
        if last >= s.namespace.blocks {
            return Err(PerfError::Target(format!(
                "{} records LBA {last}, beyond namespace {}'s {} blocks",
                cfg.state_path.display(),
                s.nsid,
                s.namespace.blocks
            )));
        }
    }
    let mut qp = s
        .controller
        .take_io_queues()
        .pop()
        .ok_or_else(|| PerfError::Target("the controller granted no I/O queue".into()))?;
    let max_blocks = (SCAN_IO_BYTES_MAX.min(s.max_io_bytes()) / state.block_bytes as usize).max(1) as u32;
    let exts = verify::extents(state.entries.iter().map(|(lba, _)| *lba), max_blocks);
    let mut out = VerifyOutcome {
        blocks_recorded: state.entries.len() as u64,
        pending_recorded: state.pending_blocks() as u64,
        ..Default::default()
    };
    let started = Instant::now();
    let (counts, failures) = (&mut out.counts, &mut out.failures);
    let reads = read_extents(&mut qp, s.nsid, state.block_bytes, &exts, opts.queue_depth, |lba, block| {
        let Ok(i) = state.entries.binary_search_by_key(&lba, |(l, _)| *l) else { return };
        let st = &state.entries[i].1;
        counts.blocks_checked += 1;
        match check_block(lba, block, &state.expectation(st)) {
            Ok(Verdict::Pending) | Ok(Verdict::Acked) | Ok(Verdict::Unwritten) if st.pending_generation != 0 => {
                counts.pending_resolved += 1;
            }
            Ok(_) => {}
            Err(f) => {
                counts.failures += 1;
                failures.push(f);
            }
        }
    })
    .map_err(|e| PerfError::host(format!("verifying through {}", s.addr), e))?;
    out.reads = reads;
    out.elapsed = started.elapsed();
    drop(qp);
    s.close();
    Ok(out)
}
