//! The verifier must not miss corruption: against a target whose namespace deliberately drops
//! writes, serves a stale block, or tears multi-block writes at one LBA (all while reporting
//! success), `verify` reports exactly the damaged LBAs with the right kind, and a healthy run
//! on the same device with no fault armed reports nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use stager_nvme::bdev::{BlockDevice, Fault, FaultyDevice};
use stager_perf::run::{run, RunConfig};
use stager_perf::scan::{verify_state, VerifyConfig};
use stager_perf::session::SessionOptions;
use stager_perf::units::ByteRange;
use stager_perf::verify::FailureKind;
use stager_perf::workload::Workload;
use stager_perf::{TargetUrl, EXIT_OK, EXIT_VERIFY};
use stager_target::config::{self, BackendConfig, NamespaceConfig};
use stager_target::Target;

const NQN: &str = "nqn.2026-11.dev.stager:faulty";
/// The LBA every fault is armed at (4 KiB blocks).
const LBA: u64 = 100;

/// Writes every block of the first 1 MiB (256 blocks) sequentially, several passes, with
/// `io` bytes per write, then verifies them all; returns (LBA, kind) of every failure.
fn write_then_verify(fault: Option<Fault>, io: usize) -> (i32, Vec<(u64, FailureKind)>) {
    let dev = Arc::new(FaultyDevice::new(4 << 20, 4096));
    if let Some(f) = fault {
        dev.arm(LBA, f);
    }
    let mut c = config::embedded_default();
    // The default's flash device and management socket are per machine: tests run many targets
    // at once, each with its own namespaces (set below) and no socket.
    c.flash.clear();
    c.management.socket = None;
    c.listeners[0].address = "127.0.0.1:0".parse().unwrap();
    c.subsystems[0].nqn = NQN.into();
    c.subsystems[0].namespaces = vec![NamespaceConfig {
        nsid: 1,
        backend: BackendConfig::Memory { size_bytes: 4 << 20, block_size: 4096 },
        uuid: None,
    }];
    let mut devices: HashMap<(String, u32), Arc<dyn BlockDevice>> = HashMap::new();
    devices.insert((NQN.into(), 1), dev);
    let t = Target::start_with_devices(c, devices).expect("target starts");
    let url = TargetUrl::parse(&format!("tcp://{}/{NQN}", t.listen_addr(0))).unwrap();
    let dir = std::env::temp_dir().join(format!("stager-faults-{}-{io}-{:?}", std::process::id(), fault));
    std::fs::create_dir_all(&dir).unwrap();
    let state = dir.join("state.bin");

    let mut rc = RunConfig::new(url.clone());
    rc.workload = Workload::Write;
    rc.io_bytes = io;
    rc.queue_depth = 4;
    rc.range = Some(ByteRange { offset_bytes: 0, len_bytes: Some(1 << 20) });
    rc.time = Duration::from_secs(2);
    rc.verify = true;
    rc.verify_state = Some(state.clone());
    let out = run(&rc).expect("write run");
    assert_eq!(out.exit_code(), EXIT_OK, "the write run itself sees only successes");
    // The stale case needs the faulted block written at least twice.
    assert!(out.report.results.ios >= 2 * (1 << 20) / io as u64, "at least two passes over the range");

    let v = verify_state(&VerifyConfig { target: url, session: SessionOptions::default(), state_path: state })
        .expect("verify runs");
    assert_eq!(v.blocks_recorded, 256);
    let mut found: Vec<(u64, FailureKind)> = v.failures.kept.iter().map(|f| (f.lba, f.kind)).collect();
    found.sort_by_key(|f| f.0);
    t.shutdown();
    let _ = std::fs::remove_dir_all(dir);
    (v.exit_code(), found)
}

#[test]
fn healthy_device_verifies_clean() {
    let (code, found) = write_then_verify(None, 16384);
    assert_eq!((code, found), (EXIT_OK, vec![]));
}

#[test]
fn dropped_writes_are_reported_lost_at_their_lba() {
    let (code, found) = write_then_verify(Some(Fault::DropWrites), 4096);
    assert_eq!(code, EXIT_VERIFY);
    assert_eq!(found, vec![(LBA, FailureKind::Lost)]);
}

#[test]
fn a_stale_block_is_reported_stale_at_its_lba() {
    let (code, found) = write_then_verify(Some(Fault::Stale), 4096);
    assert_eq!(code, EXIT_VERIFY);
    assert_eq!(found, vec![(LBA, FailureKind::Stale)]);
}

#[test]
fn a_torn_multi_block_write_is_reported_at_the_blocks_it_missed() {
    // 16 KiB writes cover LBAs 100..=103; the device keeps only the first half of each, so
    // 102 and 103 were never written.
    let (code, found) = write_then_verify(Some(Fault::TearWrites), 16384);
    assert_eq!(code, EXIT_VERIFY);
    assert_eq!(found, vec![(LBA + 2, FailureKind::Lost), (LBA + 3, FailureKind::Lost)]);
}
