//! Queue behaviour: full queue depth, several I/O queues on several threads, flush / write
//! zeroes / deallocate, keep-alive expiry, disconnect and reconnect (also across a target
//! restart with a file namespace), discovery, and controller shutdown.

mod common;

use std::time::Duration;

use common::*;
use stager_nvme::command::DataDirection;
use stager_nvme::host::{discover, io_cmd, HostError, HostOptions, Response};
use stager_nvme::status::Status;
use stager_target::config::BackendConfig;

#[test]
fn queue_depth_128_pipelined() {
    let t = TestTarget::default();
    let mut c = t.connect(&HostOptions { queue_depth: 128, ..opts() });
    let q = c.io_queue(0);
    assert_eq!(q.depth(), 128);
    // 128 writes in flight at once, mixed in-capsule (4 KiB) and R2T (16 KiB) sizes.
    let len = |i: u64| if i.is_multiple_of(2) { 4096 } else { 16384 };
    for i in 0..128u64 {
        let l = len(i);
        q.submit(io_cmd::write(1, i * 8, (l / 4096) as u32), pattern(i, l), DataDirection::HostToController, i)
            .unwrap();
    }
    assert_eq!(q.outstanding(), 128);
    let mut out: Vec<Response> = Vec::new();
    while out.len() < 128 {
        q.wait(&mut out).unwrap();
    }
    assert!(out.iter().all(|r| r.status() == Status::SUCCESS));
    out.clear();
    for i in 0..128u64 {
        q.submit(io_cmd::read(1, i * 8, (len(i) / 4096) as u32), vec![0; len(i)], DataDirection::ControllerToHost, i)
            .unwrap();
    }
    while out.len() < 128 {
        q.wait(&mut out).unwrap();
    }
    for r in &out {
        assert_eq!(r.status(), Status::SUCCESS);
        assert!(r.data == pattern(r.tag, len(r.tag)), "read of write {} returned other bytes", r.tag);
    }
}

#[test]
fn several_io_queues_on_several_threads() {
    let mut cfg = config();
    cfg.reactors.cores = vec![0, 1];
    let t = TestTarget::start(cfg);
    let mut c = t.connect(&HostOptions { io_queues: 4, queue_depth: 32, ..opts() });
    let queues = c.take_io_queues();
    assert_eq!(queues.len(), 4);
    let handles: Vec<_> = queues
        .into_iter()
        .enumerate()
        .map(|(qi, mut q)| {
            std::thread::spawn(move || {
                // Each queue owns its own 1 MiB region of nsid 1.
                let base = qi as u64 * 256;
                for round in 0..20u64 {
                    let mut out = Vec::new();
                    for i in 0..16u64 {
                        let data = pattern(qi as u64 * 1_000_000 + round * 100 + i, 4096);
                        q.submit(io_cmd::write(1, base + i, 1), data, DataDirection::HostToController, i).unwrap();
                    }
                    while out.len() < 16 {
                        q.wait(&mut out).unwrap();
                    }
                    assert!(out.iter().all(|r| r.status() == Status::SUCCESS));
                    for i in 0..16u64 {
                        let r = q
                            .execute(io_cmd::read(1, base + i, 1), vec![0; 4096], DataDirection::ControllerToHost)
                            .unwrap();
                        assert!(
                            r.data == pattern(qi as u64 * 1_000_000 + round * 100 + i, 4096),
                            "queue {qi} lba {}",
                            base + i
                        );
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("queue thread");
    }
}

#[test]
fn flush_write_zeroes_deallocate() {
    let t = TestTarget::default();
    let mut c = t.connect(&opts());
    let q = c.io_queue(0);
    let data = pattern(9, 64 * 1024);
    q.execute(io_cmd::write(1, 100, 16), data.clone(), DataDirection::HostToController).unwrap().ok().unwrap();
    q.execute(io_cmd::flush(1), vec![], DataDirection::None).unwrap().ok().unwrap();
    q.execute(io_cmd::flush(0xFFFF_FFFF), vec![], DataDirection::None).unwrap().ok().unwrap();
    // Write zeroes over blocks 102..104, deallocate 110..112.
    q.execute(io_cmd::write_zeroes(1, 102, 2), vec![], DataDirection::None).unwrap().ok().unwrap();
    let ranges = io_cmd::dsm_ranges(&[(110, 2), (0, 0)]);
    q.execute(io_cmd::deallocate(1, 2), ranges, DataDirection::HostToController).unwrap().ok().unwrap();
    let r = q.execute(io_cmd::read(1, 100, 16), vec![0; 65536], DataDirection::ControllerToHost).unwrap();
    for blk in 0..16usize {
        let got = &r.data[blk * 4096..(blk + 1) * 4096];
        if (2..4).contains(&blk) || (10..12).contains(&blk) {
            assert!(got.iter().all(|&b| b == 0), "block {} should read zeroes", 100 + blk);
        } else {
            assert_eq!(got, &data[blk * 4096..(blk + 1) * 4096], "block {} changed", 100 + blk);
        }
    }
    // A range past the end fails the whole command and deallocates nothing.
    let ranges = io_cmd::dsm_ranges(&[(100, 1), (16383, 2)]);
    let r = q.execute(io_cmd::deallocate(1, 2), ranges, DataDirection::HostToController).unwrap();
    assert!(r.status().same_code(Status::LBA_OUT_OF_RANGE));
    let r = q.execute(io_cmd::read(1, 100, 1), vec![0; 4096], DataDirection::ControllerToHost).unwrap();
    assert_eq!(&r.data[..], &data[..4096]);
}

#[test]
fn keep_alive_expiry_tears_the_controller_down() {
    let t = TestTarget::default();
    let mut c = t.connect(&HostOptions { kato_ms: 1000, ..opts() });
    // Keep-alive running: the controller outlives several KATOs.
    std::thread::sleep(Duration::from_millis(2500));
    c.io_queue(0).execute(io_cmd::flush(1), vec![], DataDirection::None).unwrap().ok().unwrap();
    c.stop_keepalive();
    std::thread::sleep(Duration::from_millis(2500));
    // Admin and I/O queues are gone.
    let r = c.io_queue(0).execute(io_cmd::flush(1), vec![], DataDirection::None);
    assert!(
        matches!(r, Err(HostError::Closed | HostError::Io(_))),
        "I/O queue survived keep-alive expiry: {:?}",
        r.map(|r| r.status())
    );
    assert!(c.active_namespaces().is_err(), "admin queue survived keep-alive expiry");
    // A new association works.
    let c2 = t.connect(&opts());
    c2.shutdown().unwrap();
}

#[test]
fn disconnect_reconnect_and_restart_keep_data() {
    let dir = std::env::temp_dir().join(format!("stager-reconnect-{}", std::process::id()));
    let mut cfg = config();
    cfg.subsystems[0].namespaces[0].backend =
        BackendConfig::File { path: dir.join("ns1.img"), size_bytes: Some(64 << 20), block_size: 4096, direct: true };
    let data = pattern(77, 3 << 20);
    let addr;
    {
        let t = TestTarget::start(cfg.clone());
        addr = t.addr;
        let mut c = t.connect(&opts());
        c.io_queue(0)
            .execute(io_cmd::write(1, 1000, 256), data[..1 << 20].to_vec(), DataDirection::HostToController)
            .unwrap()
            .ok()
            .unwrap();
        c.shutdown().unwrap();
        // Reconnect: a new controller sees the same data, and writes more.
        let mut c = t.connect(&opts());
        let r = c
            .io_queue(0)
            .execute(io_cmd::read(1, 1000, 256), vec![0; 1 << 20], DataDirection::ControllerToHost)
            .unwrap();
        assert!(r.data == data[..1 << 20], "data changed across reconnect");
        for (i, chunk) in data.chunks(1 << 20).enumerate().skip(1) {
            c.io_queue(0)
                .execute(io_cmd::write(1, 1000 + i as u64 * 256, 256), chunk.to_vec(), DataDirection::HostToController)
                .unwrap()
                .ok()
                .unwrap();
        }
        // Dropped without shutdown: the target must clean up on its own.
        drop(c);
    }
    // Target stopped and started again on the same file.
    cfg.listeners[0].address = addr;
    let t = TestTarget::start(cfg);
    let mut c = t.connect(&opts());
    for (i, chunk) in data.chunks(1 << 20).enumerate() {
        let lba = 1000 + i as u64 * 256;
        let r = c
            .io_queue(0)
            .execute(io_cmd::read(1, lba, 256), vec![0; 1 << 20], DataDirection::ControllerToHost)
            .unwrap();
        assert_eq!(r.status(), Status::SUCCESS);
        assert!(r.data == chunk, "MiB {i} changed across a target restart");
    }
    c.shutdown().unwrap();
    drop(t);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn discovery_lists_subsystems_the_host_may_use() {
    let mut cfg = config();
    let mut open = cfg.subsystems[0].clone();
    open.nqn = "nqn.2026-11.dev.stager:open".into();
    open.allow_any_host = true;
    open.hosts.clear();
    open.namespaces.truncate(1);
    cfg.subsystems.push(open);
    let t = TestTarget::start(cfg);
    let entries = discover(t.addr, &opts()).unwrap();
    let mut nqns: Vec<_> = entries.iter().map(|e| e.subnqn.clone()).collect();
    nqns.sort();
    assert_eq!(nqns, vec!["nqn.2026-11.dev.stager:open".to_string(), NQN.to_string()]);
    for e in &entries {
        assert_eq!((e.trtype, e.adrfam, e.subtype), (3, 1, 2));
        assert_eq!(e.traddr, "127.0.0.1");
        assert_eq!(e.trsvcid, t.addr.port().to_string());
    }
    // Another host sees only the open subsystem.
    let other = HostOptions { hostnqn: "nqn.2026-11.dev.stager:someone-else".into(), ..opts() };
    let entries = discover(t.addr, &other).unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].subnqn, "nqn.2026-11.dev.stager:open");
}

#[test]
fn busy_poll_host_and_sleeping_host_both_work() {
    let t = TestTarget::default();
    for busy_poll in [true, false] {
        let mut c = t.connect(&HostOptions { busy_poll, ..opts() });
        for i in 0..200u64 {
            let q = c.io_queue(0);
            q.execute(io_cmd::write(1, i, 1), pattern(i, 4096), DataDirection::HostToController).unwrap().ok().unwrap();
            let r = q.execute(io_cmd::read(1, i, 1), vec![0; 4096], DataDirection::ControllerToHost).unwrap();
            assert!(r.data == pattern(i, 4096));
        }
        c.shutdown().unwrap();
    }
}

#[test]
fn a_host_may_reuse_the_cid_of_an_aer_it_gave_up() {
    // SPDK's host completes its outstanding AERs itself when it shuts a controller down and
    // reuses their CIDs for the shutdown's Property Get: that command must be served, not
    // refused as a CID conflict.
    use stager_nvme::command::{admin, Command};
    use stager_nvme::fabrics::{self, cc, prop};
    use stager_nvme::host::{connect_queue, QueuePair};
    use stager_nvme::tcp::pdu::{self, Decoded, Pdu};
    use std::io::{Read, Write};
    let t = TestTarget::default();
    let o = opts();
    let mut q = QueuePair::open(t.addr, 0, 32, &o).unwrap();
    connect_queue(&mut q, NQN, &o, 0, 31, 0xFFFF, 0).unwrap();
    let r = q.execute(
        fabrics::property_set(0, prop::CC, (cc::EN | (6 << 16) | (4 << 20)) as u64, false),
        vec![],
        DataDirection::None,
    );
    r.unwrap().ok().unwrap();
    let (mut s, dg) = q.into_raw();
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = Vec::new();
    pdu::encode(&Pdu::CapsuleCmd(Command::new(admin::ASYNC_EVENT_REQUEST, 3)), &[], dg, &mut b);
    pdu::encode(&Pdu::CapsuleCmd(fabrics::property_get(3, prop::CC, false)), &[], dg, &mut b);
    s.write_all(&b).unwrap();
    let mut got = Vec::new();
    let resp = loop {
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).expect("a response");
        got.extend_from_slice(&buf[..n]);
        if let Ok(Decoded::Frame(f)) = pdu::decode(&got, dg, 1 << 20) {
            break f.pdu;
        }
    };
    let Pdu::CapsuleResp(c) = resp else { panic!("expected a response, got {resp:?}") };
    assert_eq!((c.cid, c.status), (3, Status::SUCCESS), "the Property Get reusing the AER's CID");
    assert_eq!(c.dw0 & cc::EN, cc::EN);
}
