//! The send path against the real target: reads sent zero-copy (`transport.zero_copy_send: on`,
//! forced over loopback, where the kernel would otherwise skip it) come back intact while
//! writes keep changing the blocks around them, with many zero-copy sends in flight.

mod common;

use std::sync::atomic::Ordering;

use common::*;
use stager_nvme::command::DataDirection;
use stager_nvme::host::{io_cmd, HostOptions};
use stager_nvme::status::Status;
use stager_target::config::ZeroCopySend;

#[test]
fn zero_copy_sends_deliver_intact_data() {
    let mut cfg = config();
    cfg.transport.zero_copy_send = ZeroCopySend::On;
    let t = TestTarget::start(cfg);
    let mut c = t.connect(&HostOptions { queue_depth: 32, ..opts() });
    let q = c.io_queue(0);
    for seed in 0..20u64 {
        round(q, seed * 1000, 32);
    }
    // 1 MiB reads: several zero-copy sends in flight, buffers held until their notification.
    let data = pattern(77, 1 << 20);
    q.execute(io_cmd::write(1, 8192, 256), data.clone(), DataDirection::HostToController).unwrap().ok().unwrap();
    let mut out = Vec::new();
    for i in 0..16u64 {
        q.submit(io_cmd::read(1, 8192, 256), vec![0; 1 << 20], DataDirection::ControllerToHost, i).unwrap();
    }
    while out.len() < 16 {
        q.wait(&mut out).unwrap();
    }
    assert!(out.iter().all(|r| r.status() == Status::SUCCESS && r.data == data));
    let sent = t.target.as_ref().unwrap().transport_stats();
    // Counters arrive on the connection's timer tick.
    std::thread::sleep(std::time::Duration::from_millis(600));
    assert!(sent.tx_zero_copy_bytes.load(Ordering::Relaxed) >= 16 << 20, "no zero-copy sends happened");
    c.shutdown().unwrap();
}
