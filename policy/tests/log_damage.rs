//! A damaged flash log, over many seeds: bytes of a real log rot (a flipped byte in an entry's
//! data, half a header block, 64 KiB of garbage over several frames), the engine recovers it,
//! and every block must read as its newest acknowledged data or fail with Unrecovered Read
//! Error when that data was damaged — never older data, never garbage (`sim::damage`).
//! `STAGER_DAMAGE_SEEDS=N` runs more.

use rand::{Rng, SeedableRng};
use stager_policy::sim::damage::{check, check_with, Rot};
use stager_policy::Bugs;

#[test]
fn a_damaged_log_never_serves_a_damaged_block_and_recovers_every_intact_one() {
    let seeds: u64 = std::env::var("STAGER_DAMAGE_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let (mut hit, mut repaired, mut unknown, mut refused, mut served) = (0, 0, 0, 0, 0);
    for seed in 0..seeds {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xDA4A6E);
        let n = rng.gen_range(1..4);
        let rots: Vec<Rot> = (0..n)
            .map(|_| Rot {
                at: rng.gen(),
                // Mostly a byte or a sector; now and then 64 KiB of garbage.
                len: match rng.gen_range(0..10) {
                    0 => 65_535,
                    1..=3 => 512,
                    _ => 1,
                },
                xor: rng.gen(),
            })
            .collect();
        let s = check(seed, &rots).unwrap_or_else(|e| panic!("seed {seed} {rots:?}: {e}"));
        hit += s.entries_hit;
        repaired += s.headers_repaired;
        unknown += s.headers_unknown;
        refused += s.refused;
        served += s.served;
    }
    eprintln!(
        "log damage: {seeds} seeds, {hit} entries hit, {repaired} headers repaired from their mirror, \
         {unknown} unreadable, {refused} reads refused, {served} served"
    );
    assert!(hit > 0 && repaired > 0 && unknown > 0, "the seeds must exercise every kind of damage");
}

#[test]
fn the_check_catches_a_replay_that_stops_at_the_first_damage() {
    let bugs = Bugs { replay_stops_at_damage: true, ..Bugs::default() };
    for seed in 0..200 {
        let rots = [Rot { at: u32::MAX / 3, len: 1, xor: 0x10 }];
        if let Err(e) = check_with(seed, &rots, bugs) {
            eprintln!("mutation caught: seed {seed}: {e}");
            return;
        }
    }
    panic!("the damage check missed a replay that drops intact entries after damage");
}
