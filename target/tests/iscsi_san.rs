//! The iSCSI SAN client against a real tgtd (Debian package tgt) serving a file-backed LUN on
//! 127.0.0.1: capacity, pipelined writes and reads, SYNCHRONIZE CACHE, the data landing in the
//! LUN's backing file, and the session's watch (issue 13): a SAN killed or SIGSTOPped while a
//! write is in flight fails that write within the command deadline and is reported as an
//! outage, an idle session notices a hung SAN by its heartbeat, a login to a hung SAN gives up
//! in time, and the session logs in again by itself when the SAN comes back.
#![cfg(feature = "iscsi")]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stager_nvme::bdev::AlignedBuf;
use stager_target::san::iscsi::{IscsiLun, Link, SanDone, SanError};

const IQN: &str = "iqn.2026-11.dev.stager:test-san";
const INITIATOR: &str = "iqn.2026-11.dev.stager:test-initiator";
/// The command deadline of these tests (stagerd's `destage.san_timeout_ms`).
const DEADLINE: Duration = Duration::from_millis(1000);

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
        // tgtd listens on its portal before it opens its management socket: wait for that too.
        while !t.tgtadm(&["--op", "show", "--mode", "sys"], true).success() {
            assert!(Instant::now() < deadline, "tgtd's management socket {control} did not answer");
            std::thread::sleep(Duration::from_millis(50));
        }
        let lun = lun_file.to_str().unwrap();
        t.adm(&["--op", "new", "--mode", "target", "--tid", "1", "-T", IQN]);
        t.adm(&["--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "-b", lun]);
        t.adm(&["--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL"]);
        t
    }
    fn tgtadm(&self, args: &[&str], quiet: bool) -> std::process::ExitStatus {
        let err = if quiet { Stdio::null() } else { Stdio::inherit() };
        Command::new("tgtadm")
            .args(["-C", &self.control.to_string(), "--lld", "iscsi"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(err)
            .status()
            .expect("tgtadm runs (apt-get install tgt)")
    }
    fn adm(&self, args: &[&str]) {
        assert!(self.tgtadm(args, false).success(), "tgtadm {args:?}");
    }
    fn url(&self) -> String {
        format!("iscsi://127.0.0.1:{}/{IQN}/1", self.port)
    }
    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.child.id() as libc::pid_t, sig) }, 0);
    }
}

impl Drop for Tgtd {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid (a stopped tgtd must run to die cleanly).
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGCONT) };
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
    let mut lun = IscsiLun::connect(&tgt.url(), INITIATOR, DEADLINE).expect("login");
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

/// Polls until `n` commands completed or `within` passed; returns them and when the last came.
fn collect(lun: &mut IscsiLun, n: usize, within: Duration) -> (Vec<SanDone>, Duration) {
    let start = Instant::now();
    let mut out = Vec::new();
    while out.len() < n && start.elapsed() < within {
        let _ = lun.poll(20, &mut out);
    }
    (out, start.elapsed())
}

/// Writes `data` at `lba` until the SAN takes it (it logs in again by itself), as the destager
/// retries: Down while it is away, Retry (UNIT ATTENTION) once after a restart.
fn write_until_done(lun: &mut IscsiLun, lba: u64, data: &[u8], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        assert!(Instant::now() < deadline, "the write never completed after the SAN came back");
        if lun.submit_write(9, lba, buf_of(data), false).is_ok() {
            let (done, _) = collect(lun, 1, DEADLINE * 3);
            if done.first().is_some_and(|d| d.result.is_ok()) {
                break;
            }
        } else {
            let _ = lun.poll(50, &mut Vec::new());
        }
    }
    lun.submit_flush(10).unwrap();
    let (done, _) = collect(lun, 1, DEADLINE * 3);
    assert!(done.first().is_some_and(|d| d.result.is_ok()), "flush: {done:?}");
}

/// One write in flight when the SAN is killed or stopped: it must come back failed within the
/// deadline (plus polling slack), the outage must be known, and once the SAN is back the
/// session logs in again by itself and the write lands on the LUN.
fn outage_then_recovery(name: &str, stop: bool) {
    let file = lun_file(name);
    let port = free_port();
    let mut tgt = Some(Tgtd::start(&file, port));
    let mut lun = IscsiLun::connect(&tgt.as_ref().unwrap().url(), INITIATOR, DEADLINE).expect("login");
    if stop {
        tgt.as_ref().unwrap().signal(libc::SIGSTOP);
    } else {
        drop(tgt.take()); // the SAN dies
    }
    let sent = Instant::now();
    match lun.submit_write(7, 2048, buf_of(&pattern(7, 4096)), false) {
        Ok(()) => {
            let (done, _) = collect(&mut lun, 1, DEADLINE * 3);
            assert_eq!(done.len(), 1, "the write got no answer within 3 deadlines");
            assert!(matches!(done[0].result, Err(SanError::Down(_))), "{:?}", done[0].result);
            assert!(done[0].buf.is_some(), "a failed write hands its buffer back");
        }
        Err((e, buf)) => assert!(matches!(e, SanError::Down(_)) && buf.is_some(), "{e}"),
    }
    let took = sent.elapsed();
    assert!(took < DEADLINE + Duration::from_millis(500), "the failure took {took:?}");
    let (_, why) = lun.outage().expect("the outage is known");
    if stop {
        assert!(why.contains("no answer"), "{why}");
    }
    assert_ne!(lun.link(), Link::Up);
    // Commands fail at once while it is away.
    let t = Instant::now();
    let _ = collect(&mut lun, 0, Duration::from_millis(100));
    if lun.link() != Link::Up {
        let r = lun.submit_read(1, 0, AlignedBuf::new(4096));
        assert!(r.is_err() || collect(&mut lun, 1, DEADLINE * 3).0.len() == 1);
        assert!(t.elapsed() < DEADLINE * 4);
    }
    // The SAN comes back (SIGCONT, or a restart with the same LUN on the same address).
    if stop {
        tgt.as_ref().unwrap().signal(libc::SIGCONT);
    } else {
        tgt = Some(Tgtd::start(&file, port));
    }
    write_until_done(&mut lun, 2048, &pattern(7, 4096), Duration::from_secs(30));
    assert!(lun.outage().is_none(), "the outage is over once a command succeeded");
    let on_disk = std::fs::read(&file).unwrap();
    assert!(on_disk[2048 * 512..2048 * 512 + 4096] == pattern(7, 4096)[..], "the write is not on the LUN");
    drop(lun);
    drop(tgt);
    let _ = std::fs::remove_dir_all(file.parent().unwrap());
}

#[test]
fn a_killed_san_fails_commands_within_the_deadline_and_comes_back() {
    outage_then_recovery("killed", false);
}

#[test]
fn a_hung_san_fails_commands_within_the_deadline_and_comes_back() {
    outage_then_recovery("hung", true);
}

#[test]
fn an_idle_session_notices_a_hung_san() {
    let file = lun_file("idle");
    let tgt = Tgtd::start(&file, free_port());
    let mut lun = IscsiLun::connect(&tgt.url(), INITIATOR, DEADLINE).expect("login");
    tgt.signal(libc::SIGSTOP);
    // Heartbeat after one deadline of silence, missed after another.
    let (done, _) = collect(&mut lun, 1, DEADLINE * 3);
    assert!(done.is_empty(), "the heartbeat is not a caller's command: {done:?}");
    let (_, why) = lun.outage().expect("a hung SAN is noticed while idle");
    assert!(why.contains("no answer"), "{why}");
    tgt.signal(libc::SIGCONT);
    drop(lun);
    drop(tgt);
    let _ = std::fs::remove_dir_all(file.parent().unwrap());
}

#[test]
fn a_login_to_a_hung_san_gives_up_in_time() {
    let file = lun_file("hunglogin");
    let tgt = Tgtd::start(&file, free_port());
    tgt.signal(libc::SIGSTOP);
    let t = Instant::now();
    let e = IscsiLun::connect(&tgt.url(), INITIATOR, DEADLINE).err().expect("no login to a stopped SAN");
    assert!(t.elapsed() < DEADLINE * 3, "the login took {:?}", t.elapsed());
    assert!(e.to_string().contains("no answer to the login within 1000 ms"), "{e}");
    tgt.signal(libc::SIGCONT);
    // And to nothing at all: refused at once.
    let port = free_port();
    let t = Instant::now();
    let e = IscsiLun::connect(&format!("iscsi://127.0.0.1:{port}/{IQN}/1"), INITIATOR, DEADLINE)
        .err()
        .expect("no login without a SAN");
    assert!(t.elapsed() < DEADLINE * 3, "{e}");
    drop(tgt);
    let _ = std::fs::remove_dir_all(file.parent().unwrap());
}
