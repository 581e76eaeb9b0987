//! Targeted scenarios, one test each, driven through the simulator's devices, delay line and
//! checkers (so every invariant is checked after every step of each scenario too).

use stager_policy::constants::{
    BLOCK_SIZE, BLOCK_SIZE_U64, DESTAGE_EARLY_FLUSH_BYTES, DESTAGE_GATHER_NS, LOG_BYTES_MIN,
};
use stager_policy::log::{EntryHeader, EntryKind, FrameHeader, FrameKind, FrameStamp};
use stager_policy::sim::{encode_block, SimConfig, Simulator};
use stager_policy::{AlignedBuf, Epoch, Lba, LogSeq, VolumeId, WritePolicy};

const MS: u64 = 1_000_000;

/// No faults, no crashes, and the default early flush (which these small volumes never reach:
/// SAN flush counts stay those of the batches).
fn quiet(volumes: usize) -> SimConfig {
    SimConfig {
        volumes,
        faults: false,
        crashes: false,
        destage_early_flush_bytes: Some(DESTAGE_EARLY_FLUSH_BYTES),
        ..SimConfig::default()
    }
}

/// Volume 0's SAN answers 20 times slower from now on, so batches stay in flight long enough
/// to be watched.
fn slow_san(sim: &mut Simulator) {
    let mut san = sim.sans[0].0.borrow_mut();
    san.slow_factor = 20;
    san.slow_until = u64::MAX;
}

fn ok<T>(r: Result<T, stager_policy::sim::Failure>) -> T {
    r.unwrap_or_else(|f| panic!("{f}"))
}

/// Keeps every write in the log: the SAN is down until further notice.
fn hold_destage(sim: &mut Simulator, vol: usize) {
    sim.sans[vol].0.borrow_mut().down_until = u64::MAX;
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
fn a_front_end_write_racing_a_batch_being_destaged_is_never_lost_or_overwritten() {
    // A batch of writes to blocks 0..16 is read back and sent to a slow SAN; while its SAN
    // writes are in flight, the host overwrites blocks 4..8 and reads everything. The batch's
    // watermark must not clean the newer entry, reads must return it, and the SAN must end
    // with it.
    let mut sim = Simulator::new(11, quiet(1));
    slow_san(&mut sim);
    let first: Vec<u64> = (0..4).map(|i| sim.write(0, i * 4, 4)).collect();
    ok(sim.settle(10 * MS));
    ok(sim.run_for(2 * MS)); // the batch is planned, read and on its way to the SAN
    let m = sim.engine.volume_metrics(VolumeId(10)).unwrap();
    assert_eq!(m.watermark, LogSeq(0), "the batch must still be in flight: {m:?}");
    let racer = sim.write(0, 4, 4);
    ok(sim.settle(10 * MS));
    ok(sim.run_for(200 * MS)); // the first batch completes
    let m = sim.engine.volume_metrics(VolumeId(10)).unwrap();
    assert!(m.watermark >= LogSeq(4), "{m:?}");
    assert_eq!(sim.expected(0, 5), vec![racer]);
    sim.read(0, 0, 16);
    ok(sim.settle(50 * MS));
    sim.sans[0].0.borrow_mut().slow_until = 0;
    ok(sim.drain());
    assert_eq!(sim.san_value(0, 0), first[0]);
    assert_eq!(sim.san_value(0, 5), racer, "the racing write must win on the SAN");
    assert_eq!(sim.san_value(0, 12), first[3]);
}

#[test]
fn group_commit_packs_concurrent_writes_into_one_frame() {
    let mut sim = Simulator::new(12, SimConfig { blocks: 128, ..quiet(1) });
    hold_destage(&mut sim, 0);
    let head = sim.engine.log_head();
    let writes: Vec<u64> = (0..32).map(|i| sim.write(0, i * 2, 1)).collect();
    ok(sim.settle(10 * MS));
    for (i, w) in writes.iter().enumerate() {
        assert_eq!(sim.expected(0, i as u64 * 2), vec![*w]);
    }
    // 32 writes of 4 KiB arrived together: two header blocks for all of them (31 entries fit
    // a header block with its mirror).
    let used = sim.engine.log_head().0 - head.0;
    assert_eq!(used, 34 * BLOCK_SIZE_U64, "32 x 4 KiB cost {} KiB of log", used / 1024);
    // They replay as written, and reads return them from the log.
    ok(sim.crash_and_restart());
    sim.read(0, 0, 64);
    ok(sim.settle(10 * MS));
    sim.sans[0].0.borrow_mut().down_until = 0;
    ok(sim.drain());
    assert_eq!(sim.san_value(0, 62), writes[31]);
}

#[test]
fn write_zeroes_is_a_data_less_entry() {
    let mut sim = Simulator::new(13, SimConfig { blocks: 2048, ..quiet(1) });
    let data = sim.write(0, 100, 8);
    ok(sim.settle(10 * MS));
    ok(sim.drain());
    hold_destage(&mut sim, 0);
    let head = sim.engine.log_head();
    sim.write_zeroes(0, 0, 2048);
    ok(sim.settle(10 * MS));
    assert_eq!(sim.engine.log_head().0 - head.0, BLOCK_SIZE_U64, "zeroing 8 MiB cost more than a header block");
    assert_eq!(sim.expected(0, 104), vec![0]);
    sim.read(0, 96, 16); // zeroes from the index, not the stale SAN data
    ok(sim.settle(10 * MS));
    ok(sim.crash_and_restart());
    sim.read(0, 96, 16);
    ok(sim.settle(10 * MS));
    sim.sans[0].0.borrow_mut().down_until = 0;
    ok(sim.drain());
    assert_eq!((sim.san_value(0, 100), sim.san_value(0, 2047)), (0, 0), "write {data} survived the zeroes");
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
    assert!(m.gated_writes >= 1 && !m.san_reachable, "{m:?}");
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
    while sim.engine.log_head().0 < 3 * cap {
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
fn packed_frames_across_a_wrap_replay_whole() {
    // Groups of writes that do not fit the rest of a lap: a pad frame, then the group's frame
    // at the start of the next lap. Crash right after, replay across the wrap.
    let cfg = SimConfig { blocks: 1024, max_write_blocks: 64, ..quiet(1) };
    let mut sim = Simulator::new(14, cfg);
    let cap = sim.engine.log_capacity_bytes();
    // Advance the head to just short of the end of the first lap with destaged writes.
    let mut lba = 0;
    while sim.engine.log_head().0 + 70 * BLOCK_SIZE_U64 < cap {
        sim.write(0, lba % 960, 64);
        lba += 64;
        ok(sim.settle(100 * MS));
        ok(sim.run_for(20 * MS));
    }
    hold_destage(&mut sim, 0);
    let before = sim.engine.log_head();
    let group: Vec<u64> = (0..20).map(|i| sim.write(0, i * 4, 4)).collect();
    ok(sim.settle(10 * MS));
    assert!(sim.engine.log_head().0 > cap, "the group did not wrap (head {} from {})", sim.engine.log_head(), before);
    ok(sim.crash_and_restart());
    for (i, w) in group.iter().enumerate() {
        assert_eq!(sim.expected(0, i as u64 * 4), vec![*w]);
    }
    sim.read(0, 0, 80);
    ok(sim.settle(10 * MS));
    sim.sans[0].0.borrow_mut().down_until = 0;
    ok(sim.drain());
    assert_eq!(sim.san_value(0, 76), group[19]);
}

#[test]
fn full_log_goes_write_through_for_clean_blocks_and_waits_for_dirty_ones() {
    for (seed, wait) in [(4, 20 * MS), (5, 0)] {
        let cfg = SimConfig { log_full_wait_ns: Some(wait), blocks: 4096, ..quiet(1) };
        let mut sim = Simulator::new(seed, cfg);
        // The SAN is down, so nothing destages and the log fills up.
        sim.sans[0].0.borrow_mut().down_until = sim.now() + 300 * MS;
        let writes = LOG_BYTES_MIN / (65 * BLOCK_SIZE as u64) + 8;
        for i in 0..writes {
            sim.write(0, i * 64, 64);
            ok(sim.run_for(5 * MS));
        }
        // One more over blocks that are dirty in the log: it may not overtake them.
        let over_dirty = sim.write(0, 0, 1);
        ok(sim.settle(10_000 * MS));
        let m = sim.engine.volume_metrics(VolumeId(10)).unwrap();
        assert!(m.log_full_fallthroughs > 0, "log never filled: {m:?}");
        assert_eq!(sim.busy_returns(), 0, "the SAN came back in time; nothing should be Busy");
        for i in 1..writes {
            assert_eq!(sim.expected(0, i * 64).len(), 1, "write at {} not acknowledged", i * 64);
        }
        assert_eq!(sim.expected(0, 0), vec![over_dirty]);
        ok(sim.drain());
        assert_eq!(sim.san_value(0, 0), over_dirty);
    }
}

#[test]
fn a_full_log_write_over_dirty_blocks_supersedes_them_on_the_san_at_once() {
    let cfg = SimConfig { log_full_wait_ns: Some(10_000 * MS), blocks: 4096, ..quiet(1) };
    let mut sim = Simulator::new(21, cfg);
    // The log fills while the SAN is down; then the SAN comes back slow, so destage crawls
    // and the log stays full.
    sim.sans[0].0.borrow_mut().down_until = sim.now() + 100 * MS;
    let writes = LOG_BYTES_MIN / (65 * BLOCK_SIZE as u64) + 8;
    let first: Vec<u64> = (0..writes)
        .map(|i| {
            let w = sim.write(0, i * 64, 64);
            ok(sim.run_for(5 * MS));
            w
        })
        .collect();
    {
        let mut san = sim.sans[0].0.borrow_mut();
        san.slow_factor = 200;
        san.slow_until = u64::MAX;
    }
    for _ in 0..100 {
        if sim.engine.volume_metrics(VolumeId(10)).unwrap().san_reachable {
            break;
        }
        ok(sim.run_for(50 * MS));
    }
    let m = sim.engine.volume_metrics(VolumeId(10)).unwrap();
    assert!(m.san_reachable && m.dirty_bytes > 0, "{m:?}");
    // Blocks 0..128 are dirty in the log, which has no room for their data.
    let head = sim.engine.log_head();
    let over: Vec<u64> = [0, 64].iter().map(|&lba| sim.write(0, lba, 64)).collect();
    ok(sim.settle(1_000 * MS));
    let m = sim.engine.volume_metrics(VolumeId(10)).unwrap();
    assert_eq!(m.log_full_supersedes, 2, "{m:?}");
    assert_eq!(sim.expected(0, 0), vec![over[0]]);
    assert_eq!(sim.expected(0, 64), vec![over[1]]);
    // Acknowledged once on the SAN, with a data-less entry each (one header block), while
    // the older entries of their blocks are still dirty.
    assert_eq!(sim.san_value(0, 0), over[0]);
    assert_eq!(sim.san_value(0, 64), over[1]);
    assert!(sim.engine.log_head().0 - head.0 <= 2 * BLOCK_SIZE_U64, "log used for data");
    let m = sim.engine.volume_metrics(VolumeId(10)).unwrap();
    assert_eq!(m.watermark, LogSeq(0), "the older entries must still be dirty: {m:?}");
    // Replay after a crash keeps the older entries from coming back; reads return the new.
    ok(sim.crash_and_restart());
    sim.read(0, 0, 192);
    ok(sim.settle(1_000 * MS));
    sim.sans[0].0.borrow_mut().slow_until = 0;
    ok(sim.drain());
    assert_eq!(sim.san_value(0, 0), over[0], "an older entry was destaged over it");
    assert_eq!(sim.san_value(0, 64), over[1], "an older entry was destaged over it");
    assert_eq!(sim.san_value(0, 130), first[2]);
}

#[test]
fn san_down_then_back() {
    let mut sim = Simulator::new(6, quiet(1));
    sim.sans[0].0.borrow_mut().down_until = sim.now() + 300 * MS;
    let w = sim.write(0, 3, 3);
    ok(sim.settle(10 * MS));
    assert_eq!(sim.expected(0, 3), vec![w], "write-back acks while the SAN is down");
    ok(sim.run_for(150 * MS));
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

/// Writes a frame at the log head packing a 2-block write (of write id `id`) at block 0 and a
/// Write Zeroes of blocks 8..12, as group commit would; `tear` decides what of it lands.
fn plant_frame(sim: &mut Simulator, seq: u64, id: u64, tear: impl Fn(&mut Vec<u8>)) {
    let head = sim.engine.log_head();
    let mut data = vec![0u8; 2 * BLOCK_SIZE];
    encode_block(&mut data[..BLOCK_SIZE], id, 0, 0);
    encode_block(&mut data[BLOCK_SIZE..], id, 0, 1);
    let entry = EntryHeader {
        kind: EntryKind::Write,
        volume: VolumeId(10),
        epoch: Epoch(1),
        seq: LogSeq(seq),
        lba: Lba(0),
        blocks: 2,
        data_crc: crc32c::crc32c(&data),
    };
    let zeroes =
        EntryHeader { kind: EntryKind::Zeroes, seq: LogSeq(seq + 1), lba: Lba(8), blocks: 4, data_crc: 0, ..entry };
    let mut frame = vec![0u8; 3 * BLOCK_SIZE];
    let stamp = FrameStamp::new(sim.engine.device_id(), sim.engine.incarnation(), head);
    FrameHeader::encode(FrameKind::Data, stamp, head, &[entry, zeroes], &mut frame);
    frame[BLOCK_SIZE..].copy_from_slice(&data);
    tear(&mut frame);
    let off = sim.engine.log_offset(head) as usize;
    sim.flash.0.borrow_mut().image[off..off + frame.len()].copy_from_slice(&frame);
}

#[test]
fn torn_tail_is_dropped_on_recovery_and_never_served() {
    type Tear = fn(&mut Vec<u8>);
    let tears: [(&str, Tear); 3] = [
        ("half the data missing", |f| f[2 * BLOCK_SIZE..].fill(0)),
        ("the packed header block torn inside its second entry", |f| f[64 + 64 + 20..BLOCK_SIZE].fill(0)),
        // (A tear of one half only is repaired from the other: see frame.rs.)
        ("the header block torn in both halves", |f| {
            f[..512].fill(0);
            f[2048..2560].fill(0)
        }),
    ];
    for (i, (what, tear)) in tears.into_iter().enumerate() {
        let mut sim = Simulator::new(8 + 100 * i as u64, SimConfig { flash_volatile: Some(false), ..quiet(1) });
        hold_destage(&mut sim, 0);
        let w = sim.write(0, 0, 2);
        ok(sim.settle(10 * MS));
        // Write 999 exists nowhere but in this frame: finding it anywhere fails the checkers.
        plant_frame(&mut sim, 2, 999, tear);
        ok(sim.crash_and_restart());
        assert_eq!(sim.expected(0, 0), vec![w], "{what}");
        sim.read(0, 0, 2);
        ok(sim.settle(10 * MS));
        // New writes land on top of the dropped tail; a second crash must not revive it.
        let w2 = sim.write(0, 4, 1);
        ok(sim.settle(10 * MS));
        ok(sim.crash_and_restart());
        assert_eq!(sim.expected(0, 4), vec![w2], "{what}");
        sim.sans[0].0.borrow_mut().down_until = 0;
        ok(sim.drain());
        assert_eq!(sim.san_value(0, 0), w, "{what}");
    }
}

#[test]
fn a_whole_planted_frame_replays_both_its_packed_entries() {
    // The control for the test above: the same frame, whole, is part of the log. Its write is
    // one the host submitted just before the crash (uncertain in the model).
    let mut sim = Simulator::new(9, SimConfig { flash_volatile: Some(false), ..quiet(1) });
    hold_destage(&mut sim, 0);
    let w1 = sim.write(0, 0, 2);
    ok(sim.settle(10 * MS));
    let w2 = sim.write(0, 0, 2); // never polled: only the planted frame holds it
    plant_frame(&mut sim, 2, w2, |_| {});
    ok(sim.crash_and_restart());
    let m = sim.engine.volume_metrics(VolumeId(10)).unwrap();
    assert_eq!(m.dirty_entries, 3, "{m:?}");
    assert_eq!(sim.expected(0, 0), vec![w1, w2]);
    assert!(matches!(sim.engine.locate(VolumeId(10), Lba(9)), Some(stager_policy::engine::Located::Zero)));
    sim.read(0, 0, 2); // finds w2, which must stick from now on
    ok(sim.settle(10 * MS));
    assert_eq!(sim.expected(0, 0), vec![w2]);
    sim.sans[0].0.borrow_mut().down_until = 0;
    ok(sim.drain());
    assert_eq!(sim.san_value(0, 1), w2);
}

#[test]
fn a_reformatted_device_never_replays_its_previous_format() {
    // Found by a reviewer on real files: after the superblocks were zeroed and the device
    // reformatted, replay ran on into the previous format's frames (same positions, incarnation
    // and sequence numbers) and destaged their stale data over newer writes.
    let cfg = SimConfig { flash_volatile: Some(false), ..quiet(1) };
    let mut sim = Simulator::new(15, cfg);
    // The first format's log: one frame per write (QD1), seq 1..=40 to blocks 0..=39, destaged.
    let mut old = Vec::new();
    for b in 0..40 {
        old.push(sim.write(0, b, 1));
        ok(sim.settle(100 * MS));
    }
    ok(sim.reformat(0xbeef));
    // The second format: frames at the same positions, incarnation 1 and seq 1..=10 again,
    // over blocks 20..=29, kept in the log. The old frames after them have seq 11..=40.
    hold_destage(&mut sim, 0);
    let mut new = Vec::new();
    for b in 20..30 {
        new.push(sim.write(0, b, 1));
        ok(sim.settle(100 * MS));
    }
    ok(sim.crash_and_restart());
    let m = sim.engine.volume_metrics(VolumeId(10)).unwrap();
    assert_eq!(m.dirty_entries, 10, "replay went past the new format's frames: {m:?}");
    sim.sans[0].0.borrow_mut().down_until = 0;
    ok(sim.drain());
    assert_eq!(sim.san_value(0, 25), new[5], "an old frame was destaged over a newer write");
    assert_eq!(sim.san_value(0, 35), old[35]);
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
    let buf = |n: usize| {
        let mut b = AlignedBuf::new(n.max(1));
        b.set_len(n);
        b
    };
    let cases = [
        (
            VolumeId(10),
            HostOp::Write { lba: Lba(blocks - 1), buf: buf(2 * BLOCK_SIZE), fua: false },
            Status::InvalidRange,
        ),
        (VolumeId(10), HostOp::Write { lba: Lba(0), buf: buf(100), fua: false }, Status::InvalidRange),
        (VolumeId(10), HostOp::Write { lba: Lba(0), buf: buf(0), fua: false }, Status::InvalidRange),
        (VolumeId(10), HostOp::Write { lba: Lba(0), buf: buf(257 * BLOCK_SIZE), fua: false }, Status::InvalidRange),
        (VolumeId(10), HostOp::Read { lba: Lba(u64::MAX), blocks: 2, buf: buf(2 * BLOCK_SIZE) }, Status::InvalidRange),
        (VolumeId(10), HostOp::Read { lba: Lba(0), blocks: 0, buf: buf(0) }, Status::InvalidRange),
        (VolumeId(10), HostOp::Read { lba: Lba(0), blocks: 2, buf: buf(BLOCK_SIZE) }, Status::InvalidRange),
        (VolumeId(10), HostOp::WriteZeroes { lba: Lba(blocks), blocks: 1 }, Status::InvalidRange),
        (VolumeId(10), HostOp::Deallocate { lba: Lba(0), blocks: 0 }, Status::InvalidRange),
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

/// Issue 8: a trickle of writes (QD1, a write every ~250 µs) is destaged in batches of many
/// writes, not a batch — two superblock writes and a SAN flush — per write; and what is
/// gathered still reaches the SAN once the writes stop.
#[test]
fn a_trickle_of_writes_is_gathered_into_few_destage_batches() {
    let cfg = SimConfig { destage_gather_ns: Some(DESTAGE_GATHER_NS), ..quiet(1) };
    let mut sim = Simulator::new(1, cfg);
    {
        // A fast SAN: without gathering, each write would be a batch of its own.
        let mut san = sim.sans[0].0.borrow_mut();
        san.latency_min_ns = 5_000;
        san.latency_max_ns = 10_000;
    }
    let mut last = 0;
    for i in 0..40u64 {
        last = sim.write(0, i % 8, 1);
        ok(sim.settle(10 * MS));
        ok(sim.run_for(100_000));
    }
    let flushes = sim.sans[0].0.borrow().flushes;
    // Gathered: 1–2 batches in these 10 ms; a batch as soon as anything is dirty made 7.
    assert!(flushes <= 3, "40 writes over 10 ms took {flushes} SAN flushes");
    ok(sim.drain());
    assert_eq!(sim.san_value(0, 39 % 8), last, "the gathered writes reach the SAN");
}

/// Issue 8: when destaging is urgent (here the front end is idle), a batch whose writes have
/// completed while the next one is ready is chained to it instead of flushed: one SAN flush
/// ends both, the watermark jumps over both at once, and the SAN ends with every write.
#[test]
fn urgent_batches_written_back_to_back_share_one_san_flush() {
    let cfg = SimConfig { destage_gather_ns: Some(0), ..quiet(1) };
    let mut sim = Simulator::new(21, cfg);
    slow_san(&mut sim);
    let first: Vec<u64> = (0..4).map(|i| sim.write(0, i * 4, 4)).collect();
    ok(sim.settle(10 * MS));
    ok(sim.run_for(2 * MS)); // the first batch is planned, read and on its way to the SAN
    let m = sim.engine.volume_metrics(VolumeId(10)).unwrap();
    assert_eq!(m.watermark, LogSeq(0), "the first batch must still be in flight: {m:?}");
    let second: Vec<u64> = (0..4).map(|i| sim.write(0, 16 + i * 4, 4)).collect();
    ok(sim.settle(10 * MS));
    ok(sim.drain());
    let m = sim.engine.volume_metrics(VolumeId(10)).unwrap();
    assert_eq!(m.watermark, LogSeq(8), "{m:?}");
    let flushes = sim.sans[0].0.borrow().flushes;
    assert_eq!(flushes, 1, "two batches written back to back took {flushes} SAN flushes");
    for (i, (a, b)) in first.iter().zip(&second).enumerate() {
        assert_eq!(sim.san_value(0, i as u64 * 4), *a);
        assert_eq!(sim.san_value(0, 16 + i as u64 * 4), *b);
    }
}

/// Issue 8: when destaging is urgent, the destager flushes the SAN every so much completed
/// writing, so the SAN writes back while the batch's other writes go out. Such a flush moves
/// nothing: the watermark moves once, at the batch's own flush after its last write.
#[test]
fn urgent_destaging_flushes_early_without_moving_the_watermark() {
    let cfg = SimConfig { destage_gather_ns: Some(0), destage_early_flush_bytes: Some(4 * BLOCK_SIZE_U64), ..quiet(1) };
    let mut sim = Simulator::new(22, cfg);
    slow_san(&mut sim);
    // Apart, so the batch is eight SAN writes, not one run.
    let writes: Vec<u64> = (0..8).map(|i| sim.write(0, i * 6, 4)).collect();
    ok(sim.settle(10 * MS));
    ok(sim.drain());
    let m = sim.engine.volume_metrics(VolumeId(10)).unwrap();
    assert_eq!(m.watermark, LogSeq(8), "{m:?}");
    assert_eq!(sim.stats.batches_checked, 1, "one batch, one watermark move");
    // Early flushes go out only while some of the batch's writes are still to complete.
    let flushes = sim.sans[0].0.borrow().flushes;
    assert!(flushes >= 2, "eight writes destaged urgently took {flushes} SAN flush(es): none early");
    for (i, w) in writes.iter().enumerate() {
        assert_eq!(sim.san_value(0, i as u64 * 6), *w);
    }
}

#[test]
fn the_destager_is_hurried_only_while_something_waits_on_its_io() {
    // `Destager::hurried` decides whether stagerd's destage core spins for its completions.
    // A busy front end's batches are not worth a spinning core; a host's SAN command, or
    // urgent destaging (here: an idle front end), is. Volume 0 is write-back, volume 1
    // write-through; both SANs are slow, so I/O stays in flight long enough to be watched.
    let cfg = SimConfig { blocks: 4096, destage_gather_ns: Some(DESTAGE_GATHER_NS), ..quiet(2) };
    let mut sim = Simulator::new(5, cfg);
    sim.set_policy(1, WritePolicy::WriteThrough);
    for san in &sim.sans {
        let mut san = san.0.borrow_mut();
        san.slow_factor = 500;
        san.slow_until = u64::MAX;
    }
    // A busy front end: a write every half millisecond, for 40 ms (gathering ends after 10).
    let mut lba = 0;
    let mut batch_seen = false;
    let mut trickle = |sim: &mut Simulator, steps: u64| {
        for _ in 0..steps {
            sim.write(0, lba, 4);
            lba += 4;
            ok(sim.run_for(MS / 2));
            if sim.destager.io_in_flight() {
                batch_seen = true;
                assert!(!sim.destager.hurried(), "nothing waits on a busy front end's batch");
            }
        }
    };
    trickle(&mut sim, 80);
    assert!(batch_seen, "a batch must have gone out to the SAN meanwhile");

    // A host's SAN command: a write-through write, while the front end stays busy.
    let through = sim.write(1, 8, 4);
    let mut hurried = false;
    for _ in 0..20 {
        sim.write(0, lba, 4);
        lba += 4;
        ok(sim.run_for(MS / 10));
        hurried |= sim.destager.hurried();
    }
    assert!(hurried, "a host waits on its write-through write");

    // The front end goes idle with a batch in flight, once the write-through write is done:
    // destaging is urgent.
    ok(sim.settle(1_000 * MS));
    let mut idle_hurried = false;
    for _ in 0..100 {
        ok(sim.run_for(MS / 10));
        if sim.destager.io_in_flight() && sim.destager.hurried() {
            idle_hurried = true;
            break;
        }
    }
    assert!(idle_hurried, "an idle front end's backlog is urgent");
    for san in &sim.sans {
        san.0.borrow_mut().slow_until = 0;
    }
    ok(sim.drain());
    assert_eq!(sim.san_value(1, 8), through);
    assert_eq!(sim.san_value(0, 0), sim.expected(0, 0)[0]);
}
