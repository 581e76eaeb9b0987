//! Data paths through the real NVMe/TCP stack: identify, write/read/compare at many sizes and
//! offsets over in-capsule and R2T writes, with and without digests, full queue depth, several
//! queues, flush, write zeroes, deallocate, disconnect/reconnect.

mod common;

use common::*;
use stager_nvme::command::DataDirection;
use stager_nvme::host::{io_cmd, QueuePair, Response};
use stager_nvme::status::Status;
use stager_nvme::tcp::Digests;

fn write(q: &mut QueuePair, nsid: u32, slba: u64, bs: usize, data: &[u8]) -> Status {
    let nlb = (data.len() / bs) as u32;
    q.execute(io_cmd::write(nsid, slba, nlb), data.to_vec(), DataDirection::HostToController).unwrap().status()
}

fn read(q: &mut QueuePair, nsid: u32, slba: u64, bs: usize, len: usize) -> Response {
    let nlb = (len / bs) as u32;
    q.execute(io_cmd::read(nsid, slba, nlb), vec![0; len], DataDirection::ControllerToHost).unwrap()
}

#[test]
fn identify_controller_and_namespaces() {
    let t = TestTarget::default();
    let c = t.connect(&opts());
    assert_eq!(c.info.subnqn, NQN);
    assert_eq!(c.info.controller_type, 1);
    assert_eq!(c.info.in_capsule_bytes(), 8192);
    assert_eq!(c.info.max_transfer_bytes(), Some(1 << 20));
    assert_eq!(c.active_namespaces().unwrap(), vec![1, 2]);
    let ns1 = c.identify_namespace(1).unwrap();
    assert_eq!((ns1.blocks, ns1.block_size), (16384, 4096));
    let ns2 = c.identify_namespace(2).unwrap();
    assert_eq!((ns2.blocks, ns2.block_size), (32768, 512));
    assert_ne!(ns1.nguid, ns2.nguid);
    c.shutdown().unwrap();
}

#[test]
fn write_read_compare_sizes_offsets_digests() {
    let t = TestTarget::default();
    let digest_modes = [
        Digests::default(),
        Digests { header: true, data: false },
        Digests { header: false, data: true },
        Digests { header: true, data: true },
    ];
    for (mi, dg) in digest_modes.into_iter().enumerate() {
        let mut c = t.connect(&stager_nvme::host::HostOptions { digests: dg, ..opts() });
        let q = c.io_queue(0);
        assert_eq!(q.digests(), dg);
        // nsid 1: 4 KiB blocks; nsid 2: 512-byte blocks. Sizes cross the 8 KiB in-capsule
        // limit and the 128 KiB MAXH2CDATA (several H2CData PDUs per R2T).
        for (nsid, bs) in [(1u32, 4096usize), (2, 512)] {
            for (i, &len) in [bs, 2 * bs, 8192, 8192 + bs, 65536, 131072, 131072 + bs, 1 << 20].iter().enumerate() {
                let blocks = if nsid == 1 { 16384u64 } else { 32768 };
                let slba = ((i as u64 * 7919 + mi as u64 * 131) * 3) % (blocks - (len / bs) as u64);
                let data = pattern((nsid as u64) << 32 | (mi * 100 + i) as u64, len);
                assert_eq!(write(q, nsid, slba, bs, &data), Status::SUCCESS, "write {len} B at {slba}");
                let r = read(q, nsid, slba, bs, len);
                assert_eq!(r.status(), Status::SUCCESS);
                assert!(r.data == data, "nsid {nsid} {len} B at LBA {slba} read back different bytes ({dg:?})");
                let cmp = q.execute(
                    io_cmd::compare(nsid, slba, (len / bs) as u32),
                    data.clone(),
                    DataDirection::HostToController,
                );
                assert_eq!(cmp.unwrap().status(), Status::SUCCESS);
                let mut other = data;
                other[len / 2] ^= 0xFF;
                let cmp =
                    q.execute(io_cmd::compare(nsid, slba, (len / bs) as u32), other, DataDirection::HostToController);
                assert!(cmp.unwrap().status().same_code(Status::COMPARE_FAILURE));
            }
        }
        c.shutdown().unwrap();
    }
}

#[test]
fn reads_end_with_a_success_c2hdata_when_sq_flow_control_is_off() {
    // With SQ flow control disabled the target finishes a successful read with one C2HData
    // carrying LAST_PDU|SUCCESS and no response capsule; the host completes the command from it.
    let t = TestTarget::default();
    let mut c = t.connect(&stager_nvme::host::HostOptions { disable_sqflow: true, ..opts() });
    let q = c.io_queue(0);
    for (i, len) in [4096usize, 65536, 1 << 20].into_iter().enumerate() {
        let data = pattern(500 + i as u64, len);
        assert_eq!(write(q, 1, 64 * i as u64, 4096, &data), Status::SUCCESS);
        let r = read(q, 1, 64 * i as u64, 4096, len);
        assert_eq!(r.status(), Status::SUCCESS);
        // Completed from the C2HData: the host synthesizes the completion with SQHD 0.
        assert_eq!(r.completion.sqhd, 0, "a response capsule (SQHD FFFFh) arrived instead");
        assert!(r.data == data, "{len} B read back different bytes");
    }
    // Errors still come as a response capsule, with SQHD FFFFh.
    let r = q.execute(io_cmd::read(1, 1 << 40, 1), vec![0; 4096], DataDirection::ControllerToHost).unwrap();
    assert!(r.status().same_code(Status::LBA_OUT_OF_RANGE));
    assert_eq!(r.completion.sqhd, 0xFFFF);
    c.shutdown().unwrap();
}

#[test]
fn c2h_success_always_answers_reads_with_their_data_on_queues_with_sq_flow_control() {
    // `transport.c2h_success: always` (SPDK's target's default): a successful read ends with a
    // SUCCESS C2HData even though the host kept SQ flow control; errors still get a response
    // capsule, which carries the queue's real SQHD. The default keeps to the specification.
    for (always, what) in [(true, "always"), (false, "when_sq_flow_off")] {
        let mut cfg = config();
        if always {
            cfg.transport.c2h_success = stager_target::config::C2hSuccess::Always;
        }
        let t = TestTarget::start(cfg);
        let mut c = t.connect(&opts());
        let q = c.io_queue(0);
        for (i, len) in [4096usize, 1 << 20].into_iter().enumerate() {
            let data = pattern(700 + i as u64, len);
            assert_eq!(write(q, 1, 256 * i as u64, 4096, &data), Status::SUCCESS);
            let r = read(q, 1, 256 * i as u64, 4096, len);
            assert_eq!(r.status(), Status::SUCCESS);
            assert!(r.data == data, "{what}: {len} B read back different bytes");
            // A completion the host made from a SUCCESS C2HData has SQHD 0; a response capsule
            // on this queue reports how far the target has read it, past 0 by now.
            if always {
                assert_eq!(r.completion.sqhd, 0, "{what}: a response capsule arrived instead");
            } else {
                assert_ne!(r.completion.sqhd, 0, "{what}: no response capsule arrived");
            }
        }
        let r = q.execute(io_cmd::read(1, 1 << 40, 1), vec![0; 4096], DataDirection::ControllerToHost).unwrap();
        assert!(r.status().same_code(Status::LBA_OUT_OF_RANGE));
        assert_ne!(r.completion.sqhd, 0, "{what}: an error came without its response capsule");
        c.shutdown().unwrap();
    }
}
