//! The block device drivers against a real device named by `STAGER_TEST_DEVICE`: an NVMe
//! generic device (`/dev/ng0n1`, passthrough), `vfio:ADDRESS` (the VFIO driver) or a file or
//! block device. `tests/nvme_drivers.sh` runs this binary inside its QEMU guest against the
//! emulated NVMe controller, once per driver; without the variable it checks nothing and
//! passes. It overwrites the device from 1 MiB to 16 MiB.
//!
//! What stagerd's own runs do not reach: a gathered FUA write larger than a command (several
//! commands, each over several buffers: `NVME_URING_CMD_IO_VEC`, PRPs over bounce pages), many
//! commands in flight on one queue, two channels (two queue pairs) at once, Write Zeroes and
//! Deallocate next to data that must survive, and the device's own limits.

use std::time::{Duration, Instant};

use stager_nvme::bdev::{open_device, AlignedBuf, BdevChannel, BdevDone, BdevError, BdevIo, BdevOp, DeviceSpec};
use stager_nvme::uring::{split, Ring};

const MIB: u64 = 1 << 20;

fn pattern(len: usize, seed: u64) -> AlignedBuf {
    let mut b = AlignedBuf::new(len);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in b.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    b
}

/// Drives `ch` on `ring` until `want` I/Os have completed.
fn wait(ch: &mut dyn BdevChannel, ring: &mut Ring, want: usize) -> Vec<BdevDone> {
    let (mut cqes, mut done) = (Vec::new(), Vec::new());
    let start = Instant::now();
    while done.len() < want {
        ch.poll(&mut done);
        if done.len() >= want {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "{} of {want} I/Os completed in 120 s", done.len());
        cqes.clear();
        ring.submit_and_wait(Duration::from_millis(1), &mut cqes).expect("io_uring_enter");
        for &(ud, res) in &cqes {
            let (_, _, slot) = split(ud);
            ch.on_cqe(slot, res, ring);
        }
    }
    done
}

fn run(ch: &mut dyn BdevChannel, ring: &mut Ring, io: BdevIo) -> BdevDone {
    ch.submit(io, ring);
    wait(ch, ring, 1).pop().expect("one completion")
}

fn read(ch: &mut dyn BdevChannel, ring: &mut Ring, offset: u64, len: usize) -> AlignedBuf {
    let d = run(ch, ring, BdevIo::new(BdevOp::Read, offset, len as u64, Some(AlignedBuf::new(len)), 0));
    assert_eq!(d.result, Ok(()), "read {len} at {offset}");
    d.buf.expect("read buffer back")
}

#[test]
fn the_driver_moves_real_data() {
    let Ok(arg) = std::env::var("STAGER_TEST_DEVICE") else {
        eprintln!("STAGER_TEST_DEVICE not set: nothing to test (tests/nvme_drivers.sh sets it in its guest)");
        return;
    };
    let spec = DeviceSpec::from_arg(&arg, 4096).expect("a device name");
    let dev = open_device(&spec).unwrap_or_else(|e| panic!("cannot open {arg}: {e}"));
    let info = dev.info().clone();
    eprintln!("{arg}: {info:?}");
    assert!(info.size_bytes() >= 16 * MIB, "the test needs 16 MiB");
    let mut ring = Ring::new(256).expect("io_uring");
    let mut ch = dev.channel(1).expect("a channel");

    // 1. A log frame's shape, larger than any one command: a 4 KiB header, then 1 MiB and
    //    12 KiB of data, as one gathered FUA write.
    let (h, a, b) = (pattern(4096, 1), pattern(MIB as usize, 2), pattern(12288, 3));
    let mut expect = h.to_vec();
    expect.extend_from_slice(&a);
    expect.extend_from_slice(&b);
    let mut io = BdevIo::new(BdevOp::Write { fua: true }, MIB, expect.len() as u64, Some(h), 1);
    io.gather = vec![a, b];
    let d = run(ch.as_mut(), &mut ring, io);
    assert_eq!((d.result, d.gather.len()), (Ok(()), 2), "gathered FUA write");
    assert!(read(ch.as_mut(), &mut ring, MIB, expect.len())[..] == expect[..], "gathered write read back different");

    // 2. 64 writes in flight at once, then 64 reads in flight, each block its own pattern.
    for i in 0..64u64 {
        let io = BdevIo::new(BdevOp::Write { fua: false }, 4 * MIB + i * 8192, 8192, Some(pattern(8192, 100 + i)), i);
        ch.submit(io, &mut ring);
    }
    let done = wait(ch.as_mut(), &mut ring, 64);
    assert!(done.iter().all(|d| d.result.is_ok()), "a write of the batch failed");
    for i in 0..64u64 {
        let io = BdevIo::new(BdevOp::Read, 4 * MIB + i * 8192, 8192, Some(AlignedBuf::new(8192)), i);
        ch.submit(io, &mut ring);
    }
    for d in wait(ch.as_mut(), &mut ring, 64) {
        assert_eq!(d.result, Ok(()));
        let got = d.buf.expect("read buffer");
        assert!(got[..] == pattern(8192, 100 + d.token)[..], "block {} of the batch read back different", d.token);
    }

    // 3. Write Zeroes and Deallocate inside written data: those blocks read zero, their
    //    neighbours keep their bytes. Flush.
    let zero_at = MIB + 4096;
    assert_eq!(run(ch.as_mut(), &mut ring, BdevIo::new(BdevOp::WriteZeroes, zero_at, 8192, None, 2)).result, Ok(()));
    assert_eq!(
        run(ch.as_mut(), &mut ring, BdevIo::new(BdevOp::Deallocate, zero_at + 65536, 65536, None, 3)).result,
        Ok(())
    );
    let r = read(ch.as_mut(), &mut ring, MIB, expect.len());
    assert!(r[..4096] == expect[..4096], "the block before the zeroes changed");
    assert!(r[4096..12288].iter().all(|&x| x == 0), "Write Zeroes left data");
    assert!(r[12288..69632] == expect[12288..69632], "the blocks between changed");
    assert!(r[69632..135168].iter().all(|&x| x == 0), "Deallocate left data");
    assert!(r[135168..] == expect[135168..], "the blocks after changed");
    assert_eq!(run(ch.as_mut(), &mut ring, BdevIo::new(BdevOp::Flush, 0, 0, None, 4)).result, Ok(()));

    // 4. A second channel (its own queue pair on VFIO) writing while the first reads.
    let mut ring2 = Ring::new(64).expect("io_uring");
    let mut ch2 = dev.channel(2).expect("a second channel");
    ch2.submit(BdevIo::new(BdevOp::Write { fua: true }, 8 * MIB, 65536, Some(pattern(65536, 7)), 5), &mut ring2);
    ch.submit(BdevIo::new(BdevOp::Read, 4 * MIB, 8192, Some(AlignedBuf::new(8192)), 6), &mut ring);
    assert_eq!(wait(ch2.as_mut(), &mut ring2, 1)[0].result, Ok(()));
    assert_eq!(wait(ch.as_mut(), &mut ring, 1)[0].result, Ok(()));
    assert!(read(ch.as_mut(), &mut ring, 8 * MIB, 65536)[..] == pattern(65536, 7)[..], "the other channel's write");
    drop(ch2);

    // 5. Beyond the end: refused, nothing sent.
    let end = info.size_bytes();
    let d = run(ch.as_mut(), &mut ring, BdevIo::new(BdevOp::Read, end, 4096, Some(AlignedBuf::new(4096)), 7));
    assert!(matches!(d.result, Err(BdevError::OutOfRange { .. })), "{:?}", d.result);
    assert_eq!(ch.in_flight(), 0);
    drop(ch);
    dev.sync().expect("sync");
    eprintln!("{arg}: gathered FUA write over several commands, 64 in flight, zeroes, deallocate, two channels, flush: all verified");
}
