//! A write-back volume in stagerd, through the real NVMe/TCP stack: two reactors (so commands
//! reach the volume's engine both from the reactor that owns its flash device and, one message
//! hop away, from the other), writes of every path (in-capsule, R2T, larger than an entry and
//! split), Write Zeroes as a data-less entry, Deallocate on a SAN file that unmaps, flush,
//! reads served from the log; then a restart that replays the log, a drain, and the SAN file
//! checked byte for byte.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use stager_nvme::command::DataDirection;
use stager_nvme::host::{io_cmd, QueuePair};
use stager_nvme::status::Status;
use stager_policy::WritePolicy;
use stager_target::config::{BackendConfig, Config, DeviceKind, FlashConfig, NamespaceConfig, SanConfig};
use stager_target::Target;

const BS: usize = 4096;
const VOLUME_BYTES: u64 = 64 << 20;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("stager-volume-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Two reactors, a 32 MiB flash file and one write-back volume (nsid 1) over a SAN file; the
/// largest transfer is 2 MiB, so some writes are split by the namespace.
fn volume_config(d: &Path, policy: WritePolicy) -> Config {
    let mut c = config();
    c.reactors.cores = vec![0, 1];
    c.transport.max_io_bytes = 2 << 20;
    c.flash = vec![FlashConfig {
        name: "f0".into(),
        kind: DeviceKind::File,
        path: d.join("flash.img"),
        pci: None,
        size: Some(32 << 20),
        cache_percent: 10,
        direct: true,
    }];
    let san = SanConfig::File { path: d.join("san.img"), size_bytes: Some(VOLUME_BYTES), direct: true };
    c.subsystems[0].namespaces = vec![NamespaceConfig {
        nsid: 1,
        backend: BackendConfig::Volume {
            id: 3,
            flash: "f0".into(),
            policy,
            read_cache: true,
            san,
            size_bytes: None,
            replicas: Vec::new(),
        },
        uuid: None,
    }];
    c
}

fn write(q: &mut QueuePair, slba: u64, data: &[u8]) -> Status {
    let nlb = (data.len() / BS) as u32;
    q.execute(io_cmd::write(1, slba, nlb), data.to_vec(), DataDirection::HostToController).unwrap().status()
}

fn read(q: &mut QueuePair, slba: u64, len: usize) -> Vec<u8> {
    let nlb = (len / BS) as u32;
    let r = q.execute(io_cmd::read(1, slba, nlb), vec![0; len], DataDirection::ControllerToHost).unwrap();
    assert!(r.status().is_success(), "read {slba}+{nlb}: {}", r.status());
    r.data
}

fn ok(s: Status, what: &str) {
    assert!(s.is_success(), "{what}: {s}");
}

/// What the volume should hold, block by block (None = never written: zeroes).
struct Expect(Vec<Option<Vec<u8>>>);

impl Expect {
    fn new() -> Expect {
        Expect(vec![None; (VOLUME_BYTES / BS as u64) as usize])
    }
    fn write(&mut self, slba: u64, data: &[u8]) {
        for (i, b) in data.chunks(BS).enumerate() {
            self.0[slba as usize + i] = Some(b.to_vec());
        }
    }
    fn zero(&mut self, slba: u64, blocks: u64) {
        for b in slba..slba + blocks {
            self.0[b as usize] = None;
        }
    }
    fn check(&self, what: &str, got: &[u8], slba: u64) {
        for (i, b) in got.chunks(BS).enumerate() {
            let want = self.0[slba as usize + i].as_deref();
            let ok = match want {
                Some(w) => w == b,
                None => b.iter().all(|&x| x == 0),
            };
            assert!(ok, "{what}: block {} differs from the newest acknowledged write", slba as usize + i);
        }
    }
}

/// The volume's engine status, through the target's volume service.
fn dirty_bytes(t: &Target) -> u64 {
    let s = t.volumes().expect("volumes").status().expect("status");
    s.devices.iter().flat_map(|d| &d.volumes).map(|v| v.dirty_bytes).sum()
}

fn wait_clean(t: &Target) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while dirty_bytes(t) > 0 {
        assert!(Instant::now() < deadline, "the volume did not drain: {} dirty", dirty_bytes(t));
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn write_back_volume_from_both_reactors_survives_a_restart_and_drains_to_the_san() {
    let d = dir("wb");
    let mut expect = Expect::new();
    {
        let t = TestTarget::start(volume_config(&d, WritePolicy::WriteBack));
        let mut c = t.connect(&stager_nvme::host::HostOptions { io_queues: 2, ..opts() });
        // Connections alternate over the two reactors: the admin queue and the I/O queues do
        // not all land on the one that owns the flash device.
        for qi in 0..2 {
            let q = c.io_queue(qi);
            let base = qi as u64 * 4096;
            for (i, len) in [BS, 2 * BS, 8192 + BS, 128 << 10, 1 << 20, 2 << 20].into_iter().enumerate() {
                let slba = base + i as u64 * 600;
                let data = pattern(qi as u64 * 100 + i as u64, len);
                ok(write(q, slba, &data), "write");
                expect.write(slba, &data);
            }
            // Overwrite part of a large write: the newest data must win, in reads and on the SAN.
            let over = pattern(qi as u64 * 100 + 50, 3 * BS);
            ok(write(q, base + 4 * 600 + 10, &over), "overwrite");
            expect.write(base + 4 * 600 + 10, &over);
        }
        // Write Zeroes of 16 MiB costs one header block of log; Deallocate on a SAN file unmaps.
        let q = c.io_queue(0);
        ok(q.execute(io_cmd::write_zeroes(1, 8192, 4096), Vec::new(), DataDirection::None).unwrap().status(), "zeroes");
        expect.zero(8192, 4096);
        ok(write(q, 8200, &pattern(7, BS)), "write into zeroes");
        expect.write(8200, &pattern(7, BS));
        let ranges = io_cmd::dsm_ranges(&[(4096 + 600, 2)]);
        ok(q.execute(io_cmd::deallocate(1, 1), ranges, DataDirection::HostToController).unwrap().status(), "dealloc");
        expect.zero(4096 + 600, 2);
        ok(q.execute(io_cmd::flush(1), Vec::new(), DataDirection::None).unwrap().status(), "flush");
        // Everything reads back, from either queue.
        for qi in 0..2 {
            let q = c.io_queue(qi);
            for slba in [0u64, 600, 1200, 1800, 2400, 3000, 4096, 4696, 7096, 8192, 8200] {
                expect.check("read", &read(q, slba, 64 << 10), slba);
            }
        }
        c.shutdown().unwrap();
    }
    // Restart over the same files: the log replays; then everything drains to the SAN.
    let t = TestTarget::start(volume_config(&d, WritePolicy::WriteBack));
    let target = t.target.as_ref().unwrap();
    let mut c = t.connect(&opts());
    let q = c.io_queue(0);
    for slba in [0u64, 1200, 3000, 4696, 7096, 8192, 8200] {
        expect.check("read after restart", &read(q, slba, 64 << 10), slba);
    }
    wait_clean(target);
    c.shutdown().unwrap();
    drop(t);
    let san = std::fs::read(d.join("san.img")).unwrap();
    expect.check("SAN file after the drain", &san, 0);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn write_through_volume_is_on_the_san_when_acknowledged() {
    let d = dir("wt");
    let t = TestTarget::start(volume_config(&d, WritePolicy::WriteThrough));
    let mut c = t.connect(&opts());
    let q = c.io_queue(0);
    let data = pattern(9, 256 << 10);
    ok(write(q, 100, &data), "write");
    ok(q.execute(io_cmd::flush(1), Vec::new(), DataDirection::None).unwrap().status(), "flush");
    assert_eq!(dirty_bytes(t.target.as_ref().unwrap()), 0, "write-through leaves nothing dirty");
    let san = std::fs::read(d.join("san.img")).unwrap();
    assert!(san[100 * BS..100 * BS + data.len()] == data[..], "the write is not on the SAN");
    assert!(read(q, 100, data.len()) == data);
    c.shutdown().unwrap();
    drop(t);
    let _ = std::fs::remove_dir_all(&d);
}
