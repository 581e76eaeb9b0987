//! The iSCSI SAN client against a real tgtd (Debian package tgt) serving a file-backed LUN on
//! 127.0.0.1: capacity, pipelined writes and reads, SYNCHRONIZE CACHE, the data landing in the
//! LUN's backing file, and a SAN that goes away and comes back while a write is in flight.
#![cfg(feature = "iscsi")]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stager_nvme::bdev::AlignedBuf;
use stager_target::san::iscsi::{IscsiLun, SanDone, SanError};

const IQN: &str = "iqn.2026-11.dev.stager:test-san";
const INITIATOR: &str = "iqn.2026-11.dev.stager:test-initiator";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A tgtd of our own on 127.0.0.1 serving `lun_file` as LUN 1 of target IQN.
struct Tgtd {
    child: Child,
    port: u16,
    control: u16,
}

impl Tgtd {
    fn start(lun_file: &std::path::Path, port: u16) -> Tgtd {
        // tgtd's "control port" names its management socket and only takes small numbers.
        static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
        let control =
            2000 + (std::process::id() % 1000) as u16 * 8 + NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 8;
        let child = Command::new("tgtd")
            .args(["-f", "--iscsi", &format!("portal=127.0.0.1:{port}"), "--control-port", &control.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tgtd runs (apt-get install tgt)");
        let t = Tgtd { child, port, control };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "tgtd did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        let lun = lun_file.to_str().unwrap();
        t.adm(&["--op", "new", "--mode", "target", "--tid", "1", "-T", IQN]);
        t.adm(&["--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "-b", lun]);
        t.adm(&["--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL"]);
        t
    }
    fn adm(&self, args: &[&str]) {
        let st = Command::new("tgtadm")
            .args(["-C", &self.control.to_string(), "--lld", "iscsi"])
            .args(args)
            .status()
            .unwrap();
        assert!(st.success(), "tgtadm {args:?}");
    }
    fn url(&self) -> String {
        format!("iscsi://127.0.0.1:{}/{IQN}/1", self.port)
    }
}

impl Drop for Tgtd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i as u64).wrapping_mul(31).wrapping_add(seed.wrapping_mul(0x9E37)) >> 3) as u8).collect()
}

fn buf_of(data: &[u8]) -> AlignedBuf {
    let mut b = AlignedBuf::new(data.len());
    b.set_len(data.len());
    b.copy_from_slice(data);
    b
}

fn wait_all(lun: &mut IscsiLun, n: usize, within: Duration) -> Vec<SanDone> {
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    while out.len() < n {
        assert!(Instant::now() < deadline, "only {} of {n} iSCSI commands completed", out.len());
        lun.poll(50, &mut out).unwrap();
    }
    out
}

fn lun_file(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("stager-iscsi-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("lun.img");
    std::fs::File::create(&f).unwrap().set_len(64 << 20).unwrap();
    f
}

#[test]
fn writes_reach_the_lun_and_read_back() {
    let file = lun_file("rw");
    let tgt = Tgtd::start(&file, free_port());
    let mut lun = IscsiLun::connect(&tgt.url(), INITIATOR).expect("login");
    assert_eq!((lun.block_size, lun.blocks), (512, (64 << 20) / 512));
    assert!(lun.logged_in());
    // 32 writes of 64 KiB in flight at once.
    for i in 0..32u64 {
        lun.submit_write(i, i * 256, buf_of(&pattern(i, 65536)), false).unwrap();
    }
    assert_eq!(lun.in_flight(), 32);
    for d in wait_all(&mut lun, 32, Duration::from_secs(20)) {
        assert!(d.result.is_ok(), "write {}: {:?}", d.token, d.result);
    }
    lun.submit_flush(100).unwrap();
    let d = wait_all(&mut lun, 1, Duration::from_secs(20));
    assert_eq!((d[0].token, d[0].result.is_ok()), (100, true));
    // Read back through iSCSI, and straight from the LUN's backing file.
    for i in 0..32u64 {
        lun.submit_read(1000 + i, i * 256, AlignedBuf::new(65536)).unwrap();
    }
    for d in wait_all(&mut lun, 32, Duration::from_secs(20)) {
        let i = d.token - 1000;
        assert!(d.result.is_ok(), "read {i}: {:?}", d.result);
        assert!(d.buf.unwrap()[..] == pattern(i, 65536)[..], "read {i} differs");
    }
    let on_disk = std::fs::read(&file).unwrap();
    for i in 0..32usize {
        assert!(on_disk[i * 131072..i * 131072 + 65536] == pattern(i as u64, 65536)[..], "LUN file block {i}");
    }
    // Out of range is refused locally.
    assert!(lun.submit_read(1, lun.blocks, AlignedBuf::new(512)).is_err());
    let (_, back) = lun.submit_write(1, 0, buf_of(&[0; 100]), false).unwrap_err();
    assert_eq!(back.map(|b| b.len()), Some(100), "a refused write hands its buffer back");
    // WRITE SAME zeroes a range without sending it.
    lun.submit_write_zeroes(200, 256, 512).unwrap();
    let d = wait_all(&mut lun, 1, Duration::from_secs(20));
    assert!(d[0].result.is_ok(), "write zeroes: {:?}", d[0].result);
    lun.submit_flush(201).unwrap();
    wait_all(&mut lun, 1, Duration::from_secs(20));
    let on_disk = std::fs::read(&file).unwrap();
    assert!(on_disk[256 * 512..768 * 512].iter().all(|&b| b == 0), "WRITE SAME left data behind");
    assert!(on_disk[0..65536] == pattern(0, 65536)[..] && on_disk[768 * 512..768 * 512 + 4096] != [0u8; 4096][..]);
    drop(lun);
    let _ = std::fs::remove_dir_all(file.parent().unwrap());
}

#[test]
fn a_write_survives_the_san_going_away_and_coming_back() {
    let file = lun_file("outage");
    let port = free_port();
    let tgt = Tgtd::start(&file, port);
    let mut lun = IscsiLun::connect(&tgt.url(), INITIATOR).expect("login");
    drop(tgt); // the SAN dies
    std::thread::sleep(Duration::from_millis(200));
    lun.submit_write(7, 2048, buf_of(&pattern(7, 4096)), false).unwrap();
    // While it is down the write does not complete (libiscsi keeps reconnecting).
    let mut out = Vec::new();
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        let _ = lun.poll(50, &mut out);
    }
    assert!(out.iter().all(|d| d.result.is_err()) || out.is_empty(), "completed OK with no SAN: {out:?}");
    let failed_early = !out.is_empty();
    // The SAN comes back on the same address with the same LUN.
    let _tgt = Tgtd::start(&file, port);
    if failed_early {
        // libiscsi gave up on that command: the caller retries it, as the destager will.
        lun.submit_write(7, 2048, buf_of(&pattern(7, 4096)), false).unwrap();
    }
    // The caller's retry loop, as the destager runs it: resubmit what the target asks to retry.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut retries = 0;
    loop {
        assert!(Instant::now() < deadline, "write never completed after the SAN came back");
        let mut done = Vec::new();
        let _ = lun.poll(50, &mut done);
        match done.into_iter().find(|d: &SanDone| d.token == 7).map(|d| d.result) {
            Some(Ok(_)) => break,
            Some(Err(SanError::Retry { .. })) if retries < 5 => {
                retries += 1;
                lun.submit_write(7, 2048, buf_of(&pattern(7, 4096)), false).unwrap();
            }
            Some(Err(e)) => panic!("write failed after the SAN came back: {e}"),
            None => {}
        }
    }
    lun.submit_flush(8).unwrap();
    let d = wait_all(&mut lun, 1, Duration::from_secs(20));
    assert!(d[0].result.is_ok());
    let on_disk = std::fs::read(&file).unwrap();
    assert!(on_disk[2048 * 512..2048 * 512 + 4096] == pattern(7, 4096)[..], "the write is not on the LUN");
    drop(lun);
    let _ = std::fs::remove_dir_all(file.parent().unwrap());
}
