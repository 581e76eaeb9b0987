//! The deterministic simulator over many seeds, and proofs that its checkers bite.
//!
//! `cargo test -p stager-policy --release` runs `STAGER_SIM_SEEDS` seeds (default 10 000 in
//! release, 200 in debug). Soak: `STAGER_SIM_SOAK_SECONDS=600` keeps going with new seeds for
//! that long. Reproduce one failure: `STAGER_SIM_SEED=<seed>`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use stager_policy::constants::DESTAGE_EARLY_FLUSH_BYTES;
use stager_policy::sim::{run_seed, Failure, SimConfig};
use stager_policy::Bugs;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn simulator_seeds() {
    if let Some(seed) = env_u64("STAGER_SIM_SEED") {
        if let Err(f) = run_seed(seed, SimConfig::varied(seed)) {
            panic!("{f}");
        }
        return;
    }
    let default_seeds = if cfg!(debug_assertions) { 200 } else { 10_000 };
    let seeds = env_u64("STAGER_SIM_SEEDS").unwrap_or(default_seeds);
    let base = env_u64("STAGER_SIM_SEED_BASE").unwrap_or(0);
    let soak = env_u64("STAGER_SIM_SOAK_SECONDS").map(Duration::from_secs);
    let start = Instant::now();
    // Seeds are independent: run them on every core, each thread pulling the next seed.
    let next = AtomicU64::new(base);
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let results: Vec<Result<[u64; 10], Failure>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut totals = [0u64; 10];
                    loop {
                        let seed = next.fetch_add(1, Ordering::Relaxed);
                        let done_count = seed - base >= seeds;
                        let soaking = soak.is_some_and(|s| start.elapsed() < s);
                        if done_count && !soaking {
                            return Ok(totals);
                        }
                        let stats = run_caught(seed)?;
                        totals[0] += 1;
                        totals[1] += stats.writes_acked;
                        totals[2] += stats.reads_checked;
                        totals[3] += stats.crashes;
                        totals[4] += stats.batches_checked;
                        totals[5] += stats.failovers;
                        totals[6] += stats.live_rescues;
                        totals[7] += stats.served_rescues;
                        totals[8] += stats.replacements;
                        totals[9] += stats.supersedes;
                    }
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("simulator thread panicked")).collect()
    });
    let mut totals = [0u64; 10];
    for r in results {
        match r {
            Ok(t) => (0..10).for_each(|i| totals[i] += t[i]),
            Err(f) => panic!("{f}"),
        }
    }
    eprintln!(
        "simulator: {} seeds from {base} on {threads} threads in {:.1?}: {} writes acked, {} reads checked, {} crashes, {} destage batches checked, {} failovers ({} of them live rescues, {} then served), {} replicas replaced, {} full-log writes superseding dirty blocks",
        totals[0],
        start.elapsed(),
        totals[1],
        totals[2],
        totals[3],
        totals[4],
        totals[5],
        totals[6],
        totals[7],
        totals[8],
        totals[9]
    );
}

/// Runs one seed; a panic inside the engine (a broken assertion) is a failure of that seed too.
fn run_caught(seed: u64) -> Result<stager_policy::sim::SimStats, Failure> {
    match std::panic::catch_unwind(|| run_seed(seed, SimConfig::varied(seed))) {
        Ok(r) => r,
        Err(p) => {
            let what = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(Failure { seed, step: 0, invariant: "an engine assertion", detail: what })
        }
    }
}

/// A seed where the log fills while the SAN stays reachable (long, deep SAN stalls, large
/// writes, no replicas), so full-log writes supersede dirty blocks while batches of them are
/// planned and in flight (`engine/write.rs`, "Full log"; `destage/supersede.rs`).
fn full_log(seed: u64) -> SimConfig {
    SimConfig {
        replicas: 0,
        san_stalls: true,
        max_write_blocks: 48,
        blocks: 128,
        steps: 1000,
        ..SimConfig::varied(seed)
    }
}

#[test]
fn full_log_seeds() {
    if let Some(seed) = env_u64("STAGER_SIM_FULL_LOG_SEED") {
        if let Err(f) = run_seed(seed, full_log(seed)) {
            panic!("{f} (a full-log seed: rerun with STAGER_SIM_FULL_LOG_SEED={seed})");
        }
        return;
    }
    let seeds = env_u64("STAGER_SIM_FULL_LOG_SEEDS").unwrap_or(if cfg!(debug_assertions) { 20 } else { 600 });
    let (mut supersedes, mut superseding_seeds) = (0, 0);
    for seed in 0..seeds {
        match run_seed(seed, full_log(seed)) {
            Ok(stats) => {
                supersedes += stats.supersedes;
                superseding_seeds += u64::from(stats.supersedes > 0);
            }
            Err(f) => panic!("{f} (a full-log seed: rerun with STAGER_SIM_FULL_LOG_SEED={})", f.seed),
        }
    }
    eprintln!(
        "full-log seeds: {seeds} seeds, {superseding_seeds} with writes superseding dirty blocks ({supersedes} in all)"
    );
    assert!(
        superseding_seeds * 4 >= seeds,
        "only {superseding_seeds} of {seeds} seeds superseded: the log no longer fills"
    );
}

/// Runs full-log seeds with a mutation until one fails: older data over a newer write, found on
/// the SAN (2) or where the engine serves it (1).
fn catch_in_full_log_seeds(bugs: Bugs) {
    let f = first_failure_of(|seed| SimConfig { bugs, ..full_log(seed) }, 600);
    assert!(f.invariant == "invariant 2" || f.invariant == "invariant 1", "{f}");
}

#[test]
fn checker_catches_older_data_destaged_over_a_superseding_write() {
    catch_in_full_log_seeds(Bugs { supersede_unfenced: true, ..Bugs::default() });
}

#[test]
fn checker_catches_destage_writes_racing_a_superseding_write() {
    catch_in_full_log_seeds(Bugs { supersede_no_fence: true, ..Bugs::default() });
}

#[test]
fn checker_catches_planned_runs_not_laid_over_by_a_superseding_write() {
    catch_in_full_log_seeds(Bugs { supersede_no_overlay: true, ..Bugs::default() });
}

#[test]
fn checker_catches_write_through_over_superseded_blocks_still_being_destaged() {
    catch_in_full_log_seeds(Bugs { superseded_not_gated: true, ..Bugs::default() });
}

/// Runs seeds with a mutation until one fails; returns that failure.
fn first_failure(cfg: SimConfig, seeds: u64) -> Failure {
    first_failure_of(|_| cfg.clone(), seeds)
}

/// Runs seeds, each with its own configuration, until one fails; returns that failure.
fn first_failure_of(cfg: impl Fn(u64) -> SimConfig, seeds: u64) -> Failure {
    for seed in 0..seeds {
        if let Err(f) = run_seed(seed, cfg(seed)) {
            eprintln!("mutation caught: {f}");
            return f;
        }
    }
    panic!("the simulator missed the mutation in {seeds} seeds");
}

#[test]
fn checker_catches_write_through_overtaking_dirty_data() {
    let cfg = SimConfig { bugs: Bugs { skip_write_through_gate: true, ..Bugs::default() }, ..SimConfig::default() };
    let f = first_failure(cfg, 2000);
    // Older data over a newer write: found on the SAN (2) or where the engine serves it (1).
    assert!(f.invariant == "invariant 2" || f.invariant == "invariant 1", "{f}");
}

#[test]
fn checker_catches_log_writes_without_fua() {
    let cfg = SimConfig { bugs: Bugs { no_fua_on_volatile_flash: true, ..Bugs::default() }, ..SimConfig::default() };
    let f = first_failure(cfg, 2000);
    assert_eq!(f.invariant, "invariant 1", "{f}");
}

#[test]
fn checker_catches_host_flush_that_skips_the_san() {
    let cfg = SimConfig { bugs: Bugs { host_flush_skips_san: true, ..Bugs::default() }, ..SimConfig::default() };
    let f = first_failure(cfg, 3000);
    assert_eq!(f.invariant, "invariant 6", "{f}");
}

#[test]
fn checker_catches_a_san_that_drops_writes() {
    let cfg = SimConfig { san_drops_writes: true, ..SimConfig::default() };
    let f = first_failure(cfg, 200);
    assert!(f.invariant.starts_with("invariant"), "{f}");
}

/// A replicated run that ends by losing its source and destaging a replica's copy.
fn replicated(bugs: Bugs) -> SimConfig {
    SimConfig { replicas: 1, failover: Some(true), bugs, ..SimConfig::default() }
}

#[test]
fn checker_catches_acks_that_do_not_wait_for_the_replicas() {
    let f = first_failure(replicated(Bugs { ack_before_replicas: true, ..Bugs::default() }), 2000);
    assert!(f.invariant.starts_with("replica failover"), "{f}");
}

#[test]
fn checker_catches_write_through_over_blocks_a_replica_still_holds() {
    let f = first_failure(replicated(Bugs { skip_replica_gate: true, ..Bugs::default() }), 3000);
    // The copy's older entry lands on the SAN over an acknowledged write-through write: the
    // model classifies that stale overwrite as invariant 2.
    assert!(f.invariant.starts_with("replica failover") || f.invariant == "invariant 2", "{f}");
}

#[test]
fn checker_catches_acks_not_held_for_the_clusters_record() {
    // A rare trajectory (first caught at seed 2 318 of these 3 000): the early flush stays at
    // its default, which these volumes never reach, so the seeds run as they did before early
    // flushes existed (with the per-seed draw, 3 000 seeds missed it).
    let cfg = SimConfig {
        confirm_copies: Some(true),
        destage_early_flush_bytes: Some(DESTAGE_EARLY_FLUSH_BYTES),
        ..replicated(Bugs { skip_ack_hold: true, ..Bugs::default() })
    };
    let f = first_failure(cfg, 3000);
    // A copy the record still names in sync lacks a write acknowledged after its link was lost.
    assert!(f.invariant.starts_with("replica failover") || f.invariant == "invariant 2", "{f}");
}

/// Seeds that once found a bug, kept as regression tests (named after what broke).
#[test]
fn checker_catches_a_rescue_that_destages_what_its_source_destaged() {
    let f = first_failure(replicated(Bugs { rescue_ignores_watermark: true, ..Bugs::default() }), 500);
    assert!(f.invariant.starts_with("replica failover") || f.invariant == "invariant 2", "{f}");
}

#[test]
fn regression_seeds() {
    let cases = [
        // An entry of a dropped torn tail (older incarnation) was replayed after the log tail
        // had moved past every entry of the newer incarnation: fixed by `incarnation_start`.
        (104_684, "stale entry beyond a dropped tail replayed once the tail passed it"),
        // Replication: a write whose local log write failed was acknowledged on its replica's
        // word alone, then lost at the next crash: such writes now wait for the SAN.
        (47, "acknowledged on a replica's word after the local log write failed"),
        // A copy discarded when its node was replaced, placed on it again with no new write
        // since: it counted in sync at once, though it had let go of entries not destaged.
        (846, "a discarded copy re-attached counted in sync"),
        // The owner's record write read before a replacement landed after it, naming the
        // replaced node in sync again (the sim's record now fails it, as etcd's compare does).
        (1553, "a record write older than a replacement"),
        // A new epoch persisted while the log was still being replayed lost acknowledged writes:
        // `Engine::set_replicas` now waits for the device to be ready.
        (11, "set_replicas during replay"),
        // Serving a rescued copy while the SAN was down: a write ended Busy, which the check
        // took for a failure; a host writes it again, and so does the check now.
        (30_614, "a Busy write while serving a rescued copy over a failing SAN"),
    ];
    for (seed, what) in cases {
        if let Err(f) = run_seed(seed, SimConfig::varied(seed)) {
            panic!("regression ({what}): {f}");
        }
    }
}
