//! Every error path returns the status the NVMe base and fabrics specs prescribe, and the
//! connection keeps working after it.

mod common;

use common::*;
use stager_nvme::command::{admin, io, sgl, Command, DataDirection};
use stager_nvme::host::{get_log_page_cmd, identify_cmd, io_cmd, Controller, HostError, HostOptions};
use stager_nvme::status::Status;

fn status_of(r: Result<stager_nvme::host::Response, HostError>) -> Status {
    r.expect("a response, not a transport error").status()
}

fn assert_code(got: Status, want: Status, what: &str) {
    assert!(got.same_code(want), "{what}: got {got}, want {want}");
}

#[test]
fn io_command_errors() {
    let t = TestTarget::default();
    let mut c = t.connect(&opts());
    let q = c.io_queue(0);
    let w = |q: &mut stager_nvme::host::QueuePair, cmd: Command, len: usize| {
        status_of(q.execute(cmd, vec![0x5A; len], DataDirection::HostToController))
    };
    // LBA range past the end (16384 blocks of 4 KiB), also by overflow.
    assert_code(w(q, io_cmd::write(1, 16383, 2), 8192), Status::LBA_OUT_OF_RANGE, "write past end");
    assert_code(w(q, io_cmd::write(1, u64::MAX, 1), 4096), Status::LBA_OUT_OF_RANGE, "slba overflow");
    let r = q.execute(io_cmd::read(1, 16384, 1), vec![0; 4096], DataDirection::ControllerToHost);
    assert_code(status_of(r), Status::LBA_OUT_OF_RANGE, "read past end");
    assert_code(w(q, io_cmd::write_zeroes(1, 16000, 1000), 0), Status::LBA_OUT_OF_RANGE, "write zeroes past end");
    // Namespaces that do not exist.
    for nsid in [0, 3, 0xFFFF_FFFE] {
        assert_code(w(q, io_cmd::write(nsid, 0, 1), 4096), Status::INVALID_NAMESPACE, "bad nsid");
    }
    // Unknown opcode on an I/O queue.
    let mut bad = Command::new(0x7E, 0);
    bad.set_nsid(1);
    assert_code(status_of(q.execute(bad, vec![], DataDirection::None)), Status::INVALID_OPCODE, "opcode 0x7e");
    // Larger than MDTS (1 MiB): invalid field, refused before any data moves.
    let r = q.execute(io_cmd::read(1, 0, 512), vec![0; 2 << 20], DataDirection::ControllerToHost);
    assert_code(status_of(r), Status::INVALID_FIELD, "transfer over MDTS");
    // SGL length that disagrees with NLB.
    assert_code(w(q, io_cmd::write(1, 0, 2), 4096), Status::DATA_SGL_LENGTH_INVALID, "sgl shorter than nlb");
    // An SGL descriptor type NVMe/TCP does not use.
    let mut cmd = io_cmd::read(1, 0, 1);
    cmd.set_cid(7);
    cmd.set_sgl(0x00, 0, 4096);
    let raw_q = q;
    raw_q.submit_with_sgl(cmd, vec![0; 4096], DataDirection::ControllerToHost, 1).unwrap();
    let mut out = Vec::new();
    raw_q.wait(&mut out).unwrap();
    assert_code(out[0].status(), Status::SGL_DESCRIPTOR_TYPE_INVALID, "sgl type 0");
    // Compare mismatch.
    assert_eq!(w(raw_q, io_cmd::write(1, 10, 1), 4096), Status::SUCCESS);
    let mut cmp = vec![0x5A; 4096];
    cmp[4095] = 0;
    assert_code(
        status_of(raw_q.execute(io_cmd::compare(1, 10, 1), cmp, DataDirection::HostToController)),
        Status::COMPARE_FAILURE,
        "compare",
    );
    // After all that, the queue still works.
    assert_eq!(w(raw_q, io_cmd::write(1, 11, 1), 4096), Status::SUCCESS);
    // The failures landed in the error log.
    let log = c.get_log_page(0x01, 64, 0).unwrap();
    assert!(u64::from_le_bytes(log[0..8].try_into().unwrap()) >= 10, "error count in the error log");
}

#[test]
fn admin_command_errors() {
    let t = TestTarget::default();
    let c = t.connect(&opts());
    let a = |cmd: Command, len: usize| status_of(c.admin(cmd, vec![0; len], DataDirection::ControllerToHost));
    assert_code(a(identify_cmd(0x55, 0), 4096), Status::INVALID_FIELD, "identify cns 0x55");
    assert_code(a(identify_cmd(0x00, 0xFFFF_FFF0), 4096), Status::INVALID_NAMESPACE, "identify bad nsid");
    assert_code(a(identify_cmd(0x03, 7), 4096), Status::INVALID_NAMESPACE, "descriptors of inactive nsid");
    // An inactive but valid NSID identifies as zeroes.
    let r = c.admin(identify_cmd(0x00, 7), vec![1; 4096], DataDirection::ControllerToHost).unwrap();
    assert_eq!(r.status(), Status::SUCCESS);
    assert!(r.data.iter().all(|&b| b == 0));
    assert_code(a(get_log_page_cmd(0x42, 512, 0), 512), Status::INVALID_LOG_PAGE, "log page 0x42");
    assert_code(a(get_log_page_cmd(0x02, 512, 2), 512), Status::INVALID_FIELD, "unaligned log offset");
    assert_code(a(get_log_page_cmd(0x02, 512, 1 << 20), 512), Status::INVALID_FIELD, "log offset past end");
    assert_code(a(Command::new(0xC5, 0), 0), Status::INVALID_OPCODE, "admin opcode 0xc5");
    assert_code(a(Command::new(io::READ | 0x80, 0), 0), Status::INVALID_OPCODE, "admin opcode 0x82");
    let mut sf = Command::new(admin::SET_FEATURES, 0);
    sf.set_cdw(10, 0x0B | 1 << 31);
    assert_code(a(sf, 0), Status::FEATURE_NOT_SAVEABLE, "save a feature");
    let mut gf = Command::new(admin::GET_FEATURES, 0);
    gf.set_cdw(10, 0x77);
    assert_code(a(gf, 0), Status::INVALID_FIELD, "unknown feature");
    // Number of queues FFFFh is invalid.
    let mut nq = Command::new(admin::SET_FEATURES, 0);
    nq.set_cdw(10, 0x07).set_cdw(11, 0xFFFF_FFFF);
    assert_code(a(nq, 0), Status::INVALID_FIELD, "number of queues FFFFh");
    // More AERs than AERL allows.
    let mut q = c;
    let mut statuses = Vec::new();
    {
        // Use a raw admin connection so held AERs do not block the helper.
        let mut raw = stager_nvme::host::QueuePair::open(t.addr, 0, 16, &opts()).unwrap();
        stager_nvme_connect(&mut raw, q.cntlid);
        for i in 0..5 {
            raw.submit(Command::new(admin::ASYNC_EVENT_REQUEST, 0), vec![], DataDirection::None, i).unwrap();
        }
        let mut out = Vec::new();
        raw.wait(&mut out).unwrap();
        statuses.extend(out.iter().map(|r| r.status()));
    }
    assert_eq!(statuses.len(), 1, "four AERs held, the fifth refused");
    assert_code(statuses[0], Status::AER_LIMIT_EXCEEDED, "fifth AER");
    // SMART log counts host commands.
    let smart = q.get_log_page(0x02, 512, 0).unwrap();
    assert_eq!(smart[3], 100, "available spare");
    q.io_queue(0)
        .execute(io_cmd::write(1, 0, 1), vec![1; 4096], DataDirection::HostToController)
        .unwrap()
        .ok()
        .unwrap();
    let smart = q.get_log_page(0x02, 512, 0).unwrap();
    assert!(stager_nvme::log_page::SmartLog::host_writes(&smart) >= 1);
    let _ = sgl::TRANSPORT;
}

/// Connects `raw` as a second admin queue (a second controller) of the test subsystem.
fn stager_nvme_connect(raw: &mut stager_nvme::host::QueuePair, _other: u16) {
    let c = stager_nvme::fabrics::Connect {
        qid: 0,
        sqsize: 15,
        cattr: 0,
        kato_ms: 0,
        host_id: *b"stager-host-id-1",
        cntlid: 0xFFFF,
        subnqn: NQN.into(),
        hostnqn: HOSTNQN.into(),
    };
    let (cmd, data) = c.encode(0);
    let r = raw.execute_in_capsule(cmd, data).unwrap();
    assert_eq!(r.status(), Status::SUCCESS);
    let en = stager_nvme::fabrics::property_set(0, stager_nvme::fabrics::prop::CC, 1 | 6 << 16 | 4 << 20, false);
    assert_eq!(raw.execute(en, vec![], DataDirection::None).unwrap().status(), Status::SUCCESS);
}

#[test]
fn connect_errors_and_access_control() {
    let t = TestTarget::default();
    // A host not on the list: Connect Invalid Host.
    let o = HostOptions { hostnqn: "nqn.2026-11.dev.stager:intruder".into(), ..opts() };
    match Controller::connect(t.addr, NQN, &o) {
        Err(HostError::Nvme(s)) => assert_code(s, Status::CONNECT_INVALID_HOST, "refused host"),
        Err(e) => panic!("refused host got {e}"),
        Ok(_) => panic!("refused host connected"),
    }
    // A subsystem that does not exist: Connect Invalid Parameters pointing at SUBNQN.
    match Controller::connect(t.addr, "nqn.2026-11.dev.stager:nope", &opts()) {
        Err(HostError::Nvme(s)) => assert_code(s, Status::CONNECT_INVALID_PARAMETERS, "unknown subsystem"),
        other => panic!("unknown subsystem: {:?}", other.err()),
    }
    // More I/O queues than the controller granted (max_io_queues 8 by default → asking 9 is
    // capped by Set Features, and the host library reports it).
    let o = HostOptions { io_queues: 9, ..opts() };
    assert!(matches!(Controller::connect(t.addr, NQN, &o), Err(HostError::Protocol(_))));
    // An I/O queue for a controller that does not exist.
    let mut q = stager_nvme::host::QueuePair::open(t.addr, 1, 8, &opts()).unwrap();
    let c = stager_nvme::fabrics::Connect {
        qid: 1,
        sqsize: 7,
        cattr: 0,
        kato_ms: 0,
        host_id: opts().host_id,
        cntlid: 0x1234,
        subnqn: NQN.into(),
        hostnqn: HOSTNQN.into(),
    };
    let (cmd, data) = c.encode(0);
    let r = q.execute_in_capsule(cmd, data).unwrap();
    assert_code(r.status(), Status::CONNECT_INVALID_PARAMETERS, "unknown cntlid");
    assert_eq!(r.completion.dw0, 1 << 16 | 16, "IATTR=data, IPO=CNTLID");
    // An I/O queue larger than max_queue_depth (128 commands = 129 entries, SQSIZE 128).
    let ctrl = t.connect(&opts());
    let mut big = stager_nvme::host::QueuePair::open(t.addr, 1, 8, &opts()).unwrap();
    let c = stager_nvme::fabrics::Connect { qid: 1, sqsize: 129, cntlid: ctrl.cntlid, ..c.clone() };
    let (cmd, data) = c.encode(0);
    let r = big.execute_in_capsule(cmd, data).unwrap();
    assert_code(r.status(), Status::CONNECT_INVALID_PARAMETERS, "SQSIZE 129");
    assert_eq!(r.completion.dw0, 44, "IATTR=command, IPO=SQSIZE");
    drop(ctrl);
    // A command before Connect: command sequence error.
    let r = q.execute(identify_cmd(1, 0), vec![0; 4096], DataDirection::ControllerToHost).unwrap();
    assert_code(r.status(), Status::COMMAND_SEQUENCE_ERROR, "identify before connect");
    // The allowed host still gets in.
    let ok = t.connect(&opts());
    ok.shutdown().unwrap();
}
