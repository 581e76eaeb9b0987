//! The VFIO driver against the fake controller: data written reads back, commands are built
//! and split as the namespace needs, queues wrap, completions may come out of order, and a
//! device that stops answering or reports a fatal status fails every I/O instead of hanging.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::fake::{FakeController, FakeIommu};
use super::*;
use crate::command::io;

fn timeouts() -> Timeouts {
    Timeouts { admin: Duration::from_secs(2), io: Duration::from_secs(5) }
}

/// A device of `blocks` LBAs of `1 << lba_shift` bytes, 4 KiB blocks, queues of at most
/// `max_entries`; `tune` sets the fake's knobs before the driver identifies it.
fn device(
    blocks: u64,
    lba_shift: u32,
    max_entries: u16,
    t: Timeouts,
    tune: impl FnOnce(&mut super::fake::State),
) -> (VfioDevice, Arc<FakeController>, Arc<FakeIommu>) {
    let iommu = FakeIommu::new();
    let fake = FakeController::new(iommu.clone(), blocks, lba_shift, max_entries);
    tune(&mut fake.state());
    let regs: Arc<dyn Registers> = fake.clone();
    let dma: Arc<dyn DmaMapper> = iommu.clone();
    let dev = VfioDevice::start("fake".into(), regs, dma, 4096, t).expect("driver starts on the fake");
    (dev, fake, iommu)
}

fn pattern(len: usize, seed: u8) -> AlignedBuf {
    let mut b = AlignedBuf::new(len);
    b.iter_mut().enumerate().for_each(|(i, x)| *x = (i / 7) as u8 ^ seed.wrapping_mul(31));
    b
}

/// Submits `io` and polls until it completes.
fn run(ch: &mut VfioChannel, ring: &mut Ring, io: BdevIo) -> BdevDone {
    ch.submit(io, ring);
    let mut done = Vec::new();
    let start = Instant::now();
    while ch.poll(&mut done) == 0 {
        assert!(start.elapsed() < Duration::from_secs(10), "I/O never completed");
        std::thread::sleep(Duration::from_micros(10));
    }
    done.pop().expect("one completion")
}

fn read(ch: &mut VfioChannel, ring: &mut Ring, offset: u64, len: usize) -> AlignedBuf {
    let d = run(ch, ring, BdevIo::new(BdevOp::Read, offset, len as u64, Some(AlignedBuf::new(len)), 9));
    assert_eq!(d.result, Ok(()));
    d.buf.expect("read buffer back")
}

#[test]
fn gathered_fua_write_reads_back_in_the_namespace_lbas() {
    let (dev, fake, _) = device(8192, 9, 64, timeouts(), |_| {});
    assert_eq!((dev.info().block_size, dev.info().blocks), (4096, 1024));
    assert!(dev.info().volatile_cache);
    let mut ring = Ring::new(8).unwrap();
    let mut ch = dev.open_channel(1, VFIO_BOUNCE_BYTES).unwrap();
    // A log frame's shape: a header block, then data buffers, sent as one write with FUA.
    let (h, a, b) = (pattern(4096, 1), pattern(8192, 2), pattern(12288, 3));
    let mut expect = h.to_vec();
    expect.extend_from_slice(&a);
    expect.extend_from_slice(&b);
    let mut io = BdevIo::new(BdevOp::Write { fua: true }, 40960, 24576, Some(h), 1);
    io.gather = vec![a, b];
    let d = run(&mut ch, &mut ring, io);
    assert_eq!((d.token, d.result, d.gather.len()), (1, Ok(()), 2), "buffers come back");
    let w = fake.state().log.last().copied().unwrap();
    assert_eq!((w.opcode(), w.slba(), w.nlb(), w.fua()), (io::WRITE, 80, 48, true), "byte 40960 is LBA 80 of 512 B");
    assert_eq!(&fake.state().media[40960..40960 + 24576], &expect[..]);
    assert_eq!(&read(&mut ch, &mut ring, 40960, 24576)[..], &expect[..]);
    // Write Zeroes, then Deallocate (DSM: this namespace reads deallocated blocks as zero).
    assert_eq!(run(&mut ch, &mut ring, BdevIo::new(BdevOp::WriteZeroes, 40960, 4096, None, 2)).result, Ok(()));
    assert_eq!(run(&mut ch, &mut ring, BdevIo::new(BdevOp::Deallocate, 45056, 8192, None, 3)).result, Ok(()));
    let r = read(&mut ch, &mut ring, 40960, 24576);
    assert!(r[..12288].iter().all(|&x| x == 0), "zeroed and deallocated blocks read zero");
    assert_eq!(&r[12288..], &expect[12288..]);
    let ops: Vec<u8> = fake.state().log.iter().map(|c| c.opcode()).collect();
    assert!(ops.contains(&io::WRITE_ZEROES) && ops.contains(&io::DATASET_MANAGEMENT));
    let flushes = fake.state().flushes;
    assert_eq!(run(&mut ch, &mut ring, BdevIo::new(BdevOp::Flush, 0, 0, None, 4)).result, Ok(()));
    assert_eq!(fake.state().flushes, flushes + 1);
    // Beyond the end: refused before it reaches the device.
    let d = run(&mut ch, &mut ring, BdevIo::new(BdevOp::Read, 1024 * 4096, 4096, Some(AlignedBuf::new(4096)), 5));
    assert!(matches!(d.result, Err(BdevError::OutOfRange { .. })));
    assert_eq!(ch.pool.free(), ch.pool.total(), "every bounce page returned");
    assert_eq!(fake.state().interrupts_requested, 0, "polled queues: no interrupts");
}

#[test]
fn deallocate_falls_back_to_write_zeroes_when_the_namespace_does_not_promise_zeroes() {
    let (dev, fake, _) = device(1024, 12, 64, timeouts(), |s| s.deallocated_reads_zeroes = false);
    let mut ring = Ring::new(8).unwrap();
    let mut ch = dev.open_channel(1, VFIO_BOUNCE_BYTES).unwrap();
    let d = run(&mut ch, &mut ring, BdevIo::new(BdevOp::Write { fua: false }, 0, 8192, Some(pattern(8192, 4)), 1));
    assert_eq!(d.result, Ok(()));
    assert_eq!(run(&mut ch, &mut ring, BdevIo::new(BdevOp::Deallocate, 0, 8192, None, 2)).result, Ok(()));
    let c = fake.state().log.last().copied().unwrap();
    assert_eq!((c.opcode(), c.deac(), c.nlb()), (io::WRITE_ZEROES, true, 2));
    assert!(read(&mut ch, &mut ring, 0, 8192).iter().all(|&x| x == 0));
}

#[test]
fn transfers_split_at_mdts_and_wait_for_bounce_pages() {
    // MDTS 1: 8 KiB per command; a bounce area of 4 pages holds two commands at a time.
    let (dev, fake, _) = device(4096, 12, 64, timeouts(), |s| s.mdts = 1);
    let mut ring = Ring::new(8).unwrap();
    let mut ch = dev.open_channel(1, 4 * 4096).unwrap();
    let data = pattern(64 << 10, 5);
    let expect = data.to_vec();
    let d = run(&mut ch, &mut ring, BdevIo::new(BdevOp::Write { fua: false }, 1 << 20, 64 << 10, Some(data), 1));
    assert_eq!(d.result, Ok(()));
    let writes: Vec<(u64, u32)> = fake.state().log.iter().map(|c| (c.slba(), c.nlb())).collect();
    assert_eq!(writes, (0..8).map(|i| (256 + 2 * i, 2)).collect::<Vec<_>>());
    assert_eq!(&read(&mut ch, &mut ring, 1 << 20, 64 << 10)[..], &expect[..]);
}

#[test]
fn a_large_transfer_goes_through_a_prp_list() {
    let (dev, fake, _) = device(1024, 12, 64, timeouts(), |_| {});
    let mut ring = Ring::new(8).unwrap();
    let mut ch = dev.open_channel(1, VFIO_BOUNCE_BYTES).unwrap();
    let data = pattern(1 << 20, 6);
    let expect = data.to_vec();
    let d = run(&mut ch, &mut ring, BdevIo::new(BdevOp::Write { fua: false }, 0, 1 << 20, Some(data), 1));
    assert_eq!(d.result, Ok(()));
    assert_eq!(fake.state().log.len(), 1, "1 MiB in one command: 256 pages, PRP2 a list");
    assert_eq!(&fake.state().media[..1 << 20], &expect[..]);
    assert_eq!(&read(&mut ch, &mut ring, 0, 1 << 20)[..], &expect[..]);
}

#[test]
fn queues_wrap_and_phases_flip() {
    // Four-entry queues: three commands in flight at most; 48 writes then 48 reads wrap the
    // completion queue 20+ times.
    let (dev, fake, _) = device(1024, 12, 4, timeouts(), |_| {});
    let mut ring = Ring::new(8).unwrap();
    let mut ch = dev.open_channel(1, VFIO_BOUNCE_BYTES).unwrap();
    for i in 0..48u64 {
        ch.submit(
            BdevIo::new(BdevOp::Write { fua: false }, i * 4096, 4096, Some(pattern(4096, i as u8)), i),
            &mut ring,
        );
    }
    let mut done = Vec::new();
    let start = Instant::now();
    while done.len() < 48 {
        ch.poll(&mut done);
        assert!(start.elapsed() < Duration::from_secs(10), "writes stuck: {} done", done.len());
    }
    assert!(done.iter().all(|d| d.result.is_ok()));
    for i in 0..48u64 {
        let r = read(&mut ch, &mut ring, i * 4096, 4096);
        assert_eq!(&r[..], &pattern(4096, i as u8)[..], "block {i}");
    }
    assert!(fake.state().cq_wraps >= 20, "completion queue wrapped {} times", fake.state().cq_wraps);
}

#[test]
fn completions_out_of_order_finish_the_right_ios() {
    let (dev, fake, _) = device(1024, 12, 64, timeouts(), |s| s.hold = true);
    let mut ring = Ring::new(8).unwrap();
    let mut ch = dev.open_channel(1, VFIO_BOUNCE_BYTES).unwrap();
    for i in 0..3u64 {
        ch.submit(
            BdevIo::new(BdevOp::Write { fua: false }, i * 8192, 8192, Some(pattern(8192, 10 + i as u8)), i),
            &mut ring,
        );
    }
    let mut done = Vec::new();
    assert_eq!(ch.poll(&mut done), 0, "held by the controller");
    fake.release();
    let start = Instant::now();
    while done.len() < 3 {
        ch.poll(&mut done);
        assert!(start.elapsed() < Duration::from_secs(10));
    }
    let tokens: Vec<u64> = done.iter().map(|d| d.token).collect();
    assert_eq!(tokens, vec![2, 1, 0], "newest first, as the controller completed them");
    for i in 0..3u64 {
        assert_eq!(&read(&mut ch, &mut ring, i * 8192, 8192)[..], &pattern(8192, 10 + i as u8)[..]);
    }
}

#[test]
fn the_device_status_goes_up_as_it_is() {
    let (dev, fake, _) = device(1024, 12, 64, timeouts(), |_| {});
    let mut ring = Ring::new(8).unwrap();
    let mut ch = dev.open_channel(1, VFIO_BOUNCE_BYTES).unwrap();
    fake.state().fail_next = Some(Status::WRITE_FAULT);
    let d = run(&mut ch, &mut ring, BdevIo::new(BdevOp::Write { fua: true }, 0, 4096, Some(pattern(4096, 1)), 1));
    assert_eq!(d.result, Err(BdevError::Nvme(Status::WRITE_FAULT)));
    assert_eq!(d.result.unwrap_err().status(false), Status::WRITE_FAULT);
    let d = run(&mut ch, &mut ring, BdevIo::new(BdevOp::Write { fua: true }, 0, 4096, Some(pattern(4096, 1)), 2));
    assert_eq!(d.result, Ok(()), "one failed command does not fail the device");
}

#[test]
fn a_command_that_never_completes_fails_the_device() {
    let t = Timeouts { admin: Duration::from_secs(2), io: Duration::from_millis(30) };
    let (dev, fake, _) = device(1024, 12, 64, t, |_| {});
    let mut ring = Ring::new(8).unwrap();
    let mut ch = dev.open_channel(1, VFIO_BOUNCE_BYTES).unwrap();
    fake.state().hold = true;
    let d = run(&mut ch, &mut ring, BdevIo::new(BdevOp::Write { fua: true }, 0, 4096, Some(pattern(4096, 1)), 1));
    match d.result {
        Err(BdevError::DeviceFailed(why)) => assert!(why.contains("did not complete"), "{why}"),
        other => panic!("expected a device failure, got {other:?}"),
    }
    assert_eq!(fake.state().cc & regs::cc::EN, 0, "a failed controller is disabled");
    let d = run(&mut ch, &mut ring, BdevIo::new(BdevOp::Read, 0, 4096, Some(AlignedBuf::new(4096)), 2));
    assert!(matches!(d.result, Err(BdevError::DeviceFailed(_))), "later I/O fails at once");
    assert!(dev.open_channel(2, 4096).is_err(), "no new queue pairs on a failed device");
}

#[test]
fn controller_fatal_status_fails_io_in_flight() {
    let (dev, fake, _) = device(1024, 12, 64, timeouts(), |_| {});
    let mut ring = Ring::new(8).unwrap();
    let mut ch = dev.open_channel(1, VFIO_BOUNCE_BYTES).unwrap();
    fake.state().hold = true;
    ch.submit(BdevIo::new(BdevOp::Write { fua: true }, 0, 4096, Some(pattern(4096, 1)), 1), &mut ring);
    fake.state().csts |= regs::csts::CFS;
    let mut done = Vec::new();
    let start = Instant::now();
    while ch.poll(&mut done) == 0 {
        assert!(start.elapsed() < Duration::from_secs(4), "fatal status not noticed");
    }
    match &done[0].result {
        Err(BdevError::DeviceFailed(why)) => assert!(why.contains("CSTS.CFS"), "{why}"),
        other => panic!("expected a device failure, got {other:?}"),
    }
    assert!(done[0].buf.is_some(), "the caller's buffer comes back");
}

#[test]
fn impossible_capabilities_are_errors_not_panics() {
    let iommu = FakeIommu::new();
    for (cap, what) in [
        (1u64 << 16 | 1 << 24 | 1 << 37, "a queue needs two"), // MQES 0: one-entry queues
        (0x3F | 0xFu64 << 32 | 1 << 37, "beyond BAR0"),        // DSTRD 15: 128 KiB stride
        (0x3F | 1 << 24, "NVM command set"),                   // no NVM command set
        (0x3F | 1 << 37 | 2u64 << 48, "4 KiB pages"),          // MPSMIN 16 KiB
        (u64::MAX, "does not respond"),                        // a device that is gone
    ] {
        let fake = FakeController::new(iommu.clone(), 64, 12, 64);
        fake.state().cap = cap;
        let regs: Arc<dyn Registers> = fake.clone();
        let dma: Arc<dyn DmaMapper> = iommu.clone();
        let e = VfioDevice::start("fake".into(), regs, dma, 4096, timeouts()).err().expect("refused").to_string();
        assert!(e.contains(what), "CAP {cap:#x}: {e}");
    }
    assert_eq!(iommu.mapped_bytes(), 0);
}

#[test]
fn each_channel_has_its_queue_pair_and_everything_is_released() {
    let (dev, fake, iommu) = device(1024, 12, 64, timeouts(), |s| s.max_queues = 2);
    let mut ring = Ring::new(8).unwrap();
    let mut a = dev.open_channel(1, VFIO_BOUNCE_BYTES).unwrap();
    let mut b = dev.open_channel(2, VFIO_BOUNCE_BYTES).unwrap();
    assert_eq!((a.qid, b.qid), (1, 2));
    let e = dev.open_channel(3, VFIO_BOUNCE_BYTES).err().expect("only two queue pairs granted").to_string();
    assert!(e.contains("queue pairs"), "{e}");
    assert_eq!(
        run(&mut a, &mut ring, BdevIo::new(BdevOp::Write { fua: false }, 0, 4096, Some(pattern(4096, 7)), 1)).result,
        Ok(())
    );
    assert_eq!(&read(&mut b, &mut ring, 0, 4096)[..], &pattern(4096, 7)[..], "one namespace behind both queues");
    drop(a);
    let c = dev.open_channel(3, VFIO_BOUNCE_BYTES).unwrap();
    assert_eq!(c.qid, 1, "a closed channel's queue id is reused");
    drop((b, c));
    dev.sync().unwrap();
    assert!(fake.state().flushes >= 1);
    drop(dev);
    assert_eq!(fake.state().shutdowns, 1, "normal shutdown when the device closes");
    assert_eq!(iommu.mapped_bytes(), 0, "every DMA region unmapped and freed");
}
