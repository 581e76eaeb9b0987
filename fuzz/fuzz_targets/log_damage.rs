//! Rot in a real flash log (policy/src/sim/damage.rs): the input picks the writes (a seed) and
//! the damage (where, how long, what XOR); the engine recovers the log and every block is read.
//! The check fails — and so does this target — if a block reads as anything but its newest
//! acknowledged data, unless that data was damaged, in which case the read must fail with
//! Unrecovered Read Error: replay never serves a damaged block and recovers every intact one.
//! Input: seed u16, then up to 8 × (at u32, len u16, xor u8).

#![no_main]

use libfuzzer_sys::fuzz_target;
use stager_policy::sim::damage::{check, Rot};

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let seed = u16::from_le_bytes([data[0], data[1]]) as u64;
    let rots: Vec<Rot> = data[2..]
        .chunks_exact(7)
        .take(8)
        .map(|c| Rot {
            at: u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
            len: u16::from_le_bytes([c[4], c[5]]),
            xor: c[6],
        })
        .collect();
    if let Err(e) = check(seed, &rots) {
        panic!("seed {seed} {rots:?}: {e}");
    }
});
