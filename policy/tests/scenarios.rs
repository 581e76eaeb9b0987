//! Targeted scenarios, one test each, driven through the simulator's devices and checkers (so
//! every invariant is checked after every step of each scenario too).

use stager_policy::constants::{BLOCK_SIZE, LOG_BYTES_MIN};
use stager_policy::log::entry::encode_write_entry;
use stager_policy::log::{EntryHeader, EntryKind};
use stager_policy::sim::{encode_block, SimConfig, Simulator};
use stager_policy::{Epoch, Lba, LogFullPolicy, LogSeq, VolumeId, WritePolicy};

const MS: u64 = 1_000_000;

fn quiet(volumes: usize) -> SimConfig {
    SimConfig { volumes, faults: false, crashes: false, ..SimConfig::default() }
}

fn ok<T>(r: Result<T, stager_policy::sim::Failure>) -> T {
    r.unwrap_or_else(|f| panic!("{f}"))
}

#[test]
fn overwrite_during_destage() {
    let mut sim = Simulator::new(1, quiet(1));
    {
        let mut san = sim.sans[0].0.borrow_mut();
        san.slow_factor = 50;
        san.slow_until = u64::MAX;
    }
    let a = sim.write(0, 0, 4);
    ok(sim.settle(10 * MS));
    // Let the destager pick the entry up and start writing it to the (slow) SAN.
    ok(sim.run_for(MS));
    let b = sim.write(0, 0, 4);
    ok(sim.settle(10 * MS));
    assert_eq!(sim.expected(0, 0), vec![b]);
    sim.read(0, 0, 4);
    ok(sim.settle(10 * MS));
    sim.sans[0].0.borrow_mut().slow_until = 0;
    ok(sim.drain());
    assert_eq!(sim.san_value(0, 0), b, "SAN must end with the overwrite, not {a}");
}

#[test]
fn write_back_to_write_through_switch_never_lets_new_data_be_overwritten_by_old() {
    let mut sim = Simulator::new(2, quiet(1));
    // Dirty data the destager cannot move yet: the SAN is down.
    sim.sans[0].0.borrow_mut().down_until = sim.now() + 200 * MS;
    let old = sim.write(0, 8, 2);
    ok(sim.settle(10 * MS));
    assert_eq!(sim.expected(0, 8), vec![old]);
    sim.set_policy(0, WritePolicy::WriteThrough);
    let new = sim.write(0, 8, 2);
    ok(sim.run_for(20 * MS));
    assert_eq!(sim.in_flight(), 1, "the write-through write must wait for the dirty data");
    let m = sim.engine.volume_metrics(VolumeId(10)).unwrap();
    assert_eq!((m.requested, m.effective), (WritePolicy::WriteThrough, WritePolicy::WriteThrough));
    assert!(m.gated_writes >= 1 && !m.san_reachable);
    ok(sim.settle(2_000 * MS));
    assert_eq!(sim.expected(0, 8), vec![new]);
    ok(sim.drain());
    assert_eq!(sim.san_value(0, 8), new);
    assert_eq!(sim.san_value(0, 9), new);
}

#[test]
fn log_wraps_around_and_recovers_after_wrapping() {
    let cfg = SimConfig { max_write_blocks: 64, ..quiet(1) };
    let mut sim = Simulator::new(3, cfg);
    let cap = sim.engine.log_capacity_bytes();
    let mut n = 0;
    while sim.engine.log_head() < 3 * cap {
        assert!(n < 5_000, "log head stuck at {}", sim.engine.log_head());
        let lba = (n * 16) % 32;
        sim.write(0, lba, 16);
        ok(sim.settle(100 * MS));
        n += 1;
    }
    assert!(n > 10);
    ok(sim.crash_and_restart());
    for lba in [0, 16, 31] {
        sim.read(0, lba, 1);
    }
    ok(sim.settle(100 * MS));
    ok(sim.drain());
}

#[test]
fn full_log_waits_then_falls_through_and_never_fails() {
    for (seed, policy) in [(4, LogFullPolicy::Wait { timeout_ns: 20 * MS }), (5, LogFullPolicy::WriteThrough)] {
        let cfg = SimConfig { log_full: Some(policy), blocks: 2048, ..quiet(1) };
        let mut sim = Simulator::new(seed, cfg);
        // The SAN is down, so nothing destages and the log fills up.
        sim.sans[0].0.borrow_mut().down_until = sim.now() + 300 * MS;
        let writes = LOG_BYTES_MIN / (65 * BLOCK_SIZE as u64) + 8;
        for i in 0..writes {
            sim.write(0, i * 64, 64);
            ok(sim.run_for(5 * MS));
        }
        ok(sim.settle(10_000 * MS));
        let m = sim.engine.volume_metrics(VolumeId(10)).unwrap();
        assert!(m.log_full_waits + m.log_full_fallthroughs > 0, "log never filled: {m:?}");
        assert_eq!(sim.busy_returns(), 0, "the SAN came back in time; nothing should be Busy");
        for i in 0..writes {
            assert_eq!(sim.expected(0, i * 64).len(), 1, "write at {} not acknowledged", i * 64);
        }
        ok(sim.drain());
    }
}

#[test]
fn san_down_then_back() {
    let mut sim = Simulator::new(6, quiet(1));
    sim.sans[0].0.borrow_mut().down_until = sim.now() + 300 * MS;
    let w = sim.write(0, 3, 3);
    ok(sim.settle(10 * MS));
    assert_eq!(sim.expected(0, 3), vec![w], "write-back acks while the SAN is down");
    ok(sim.run_for(50 * MS));
    let m = sim.engine.volume_metrics(VolumeId(10)).unwrap();
    assert!(!m.san_reachable && m.dirty_bytes > 0 && m.san_errors > 0, "{m:?}");
    ok(sim.run_for(1_500 * MS));
    let m = sim.engine.volume_metrics(VolumeId(10)).unwrap();
    assert!(m.san_reachable && m.dirty_bytes == 0, "{m:?}");
    ok(sim.drain());
    assert_eq!(sim.san_value(0, 5), w);
}

#[test]
fn flash_write_error_goes_write_through_and_loses_nothing() {
    let mut sim = Simulator::new(7, quiet(2));
    let before = sim.write(0, 0, 2);
    ok(sim.settle(10 * MS));
    sim.flash.0.borrow_mut().fail_writes_until = sim.now() + 2 * MS;
    let during: Vec<u64> = (0..4).map(|i| sim.write(i % 2, 10 + i as u64 * 2, 2)).collect();
    ok(sim.run_for(3 * MS));
    assert!(sim.engine.flash_degraded());
    let m = sim.engine.volume_metrics(VolumeId(10)).unwrap();
    assert_eq!((m.requested, m.effective), (WritePolicy::WriteBack, WritePolicy::WriteThrough), "{m:?}");
    ok(sim.settle(500 * MS));
    assert_eq!(sim.expected(0, 0), vec![before]);
    for (i, w) in during.iter().enumerate() {
        assert_eq!(sim.expected(i % 2, 10 + i as u64 * 2), vec![*w], "write {w} not acknowledged");
    }
    // After the log drains and the cool-down passes, write-back resumes.
    ok(sim.run_for(1_500 * MS));
    assert!(!sim.engine.flash_degraded());
    ok(sim.drain());
}

#[test]
fn torn_tail_is_dropped_on_recovery_and_never_served() {
    let mut sim = Simulator::new(8, SimConfig { flash_volatile: Some(false), ..quiet(1) });
    sim.sans[0].0.borrow_mut().down_until = u64::MAX; // keep everything in the log
    let w = sim.write(0, 0, 2);
    ok(sim.settle(10 * MS));
    // A torn entry after the acknowledged one: valid header, half its data missing.
    let head = sim.engine.log_head();
    let mut data = vec![0u8; 2 * BLOCK_SIZE];
    encode_block(&mut data[..BLOCK_SIZE], 999, 0, 0);
    encode_block(&mut data[BLOCK_SIZE..], 999, 0, 1);
    let header = EntryHeader {
        kind: EntryKind::Write,
        volume: VolumeId(10),
        epoch: Epoch(1),
        seq: LogSeq(2),
        lba: Lba(0),
        blocks: 2,
        incarnation: 1,
        log_pos: head,
        data_crc: 0,
    };
    let mut entry = encode_write_entry(header, &data);
    entry[2 * BLOCK_SIZE..].fill(0);
    let off = sim.engine.log_offset(head) as usize;
    sim.flash.0.borrow_mut().image[off..off + entry.len()].copy_from_slice(&entry);
    ok(sim.crash_and_restart());
    assert_eq!(sim.expected(0, 0), vec![w]);
    sim.read(0, 0, 2);
    ok(sim.settle(10 * MS));
    // New writes land on top of the dropped tail; a second crash must not revive it.
    let w2 = sim.write(0, 4, 1);
    ok(sim.settle(10 * MS));
    ok(sim.crash_and_restart());
    assert_eq!(sim.expected(0, 4), vec![w2]);
    sim.sans[0].0.borrow_mut().down_until = 0;
    ok(sim.drain());
    assert_eq!(sim.san_value(0, 0), w);
}

#[test]
fn read_acceleration_serves_repeated_reads_from_flash() {
    let mut sim = Simulator::new(9, quiet(1));
    let w = sim.write(0, 0, 8);
    ok(sim.settle(10 * MS));
    ok(sim.drain());
    sim.read(0, 0, 8); // miss: from the SAN, then a clean copy goes to flash
    ok(sim.settle(50 * MS));
    ok(sim.run_for(5 * MS));
    sim.read(0, 0, 8); // hit: from the clean cache
    ok(sim.settle(50 * MS));
    let m = sim.engine.volume_metrics(VolumeId(10)).unwrap();
    assert_eq!((m.read_misses, m.read_hits_clean), (8, 8), "{m:?}");
    assert!((m.hit_ratio() - 0.5).abs() < 1e-9);
    assert_eq!(sim.expected(0, 7), vec![w]);
}

#[test]
fn bad_requests_get_errors_not_panics() {
    use stager_policy::{HostOp, Status};
    let mut sim = Simulator::new(10, quiet(1));
    let now = sim.now();
    let blocks = SimConfig::default().blocks;
    let cases = [
        (
            VolumeId(10),
            HostOp::Write { lba: Lba(blocks - 1), data: vec![0; 2 * BLOCK_SIZE], fua: false },
            Status::InvalidRange,
        ),
        (VolumeId(10), HostOp::Write { lba: Lba(0), data: vec![0; 100], fua: false }, Status::InvalidRange),
        (VolumeId(10), HostOp::Write { lba: Lba(0), data: Vec::new(), fua: false }, Status::InvalidRange),
        (VolumeId(10), HostOp::Read { lba: Lba(u64::MAX), blocks: 2 }, Status::InvalidRange),
        (VolumeId(10), HostOp::Read { lba: Lba(0), blocks: 0 }, Status::InvalidRange),
        (VolumeId(99), HostOp::Flush, Status::UnknownVolume),
    ];
    let mut done = Vec::new();
    for (i, (vol, op, expect)) in cases.into_iter().enumerate() {
        sim.engine.submit(vol, 1_000_000 + i as u64, op, now);
        sim.engine.drain_completions(&mut done);
        assert_eq!(done.pop().map(|d| d.status), Some(expect), "case {i}");
    }
    ok(sim.drain());
}
