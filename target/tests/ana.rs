//! Asymmetric Namespace Access through the real host library: what a multipathing host reads
//! (Identify fields, the ANA log page per listener), what I/O gets on a path that cannot serve
//! it (path-related statuses without DNR), the ANA change notice after `set_ana_state`, the
//! management request and `stagerctl ana`, and per-node controller id ranges.

mod common;

use std::time::{Duration, Instant};

use common::{config, opts, pattern, TestTarget, NQN};
use stager_nvme::command::{Command, DataDirection};
use stager_nvme::host::{io_cmd, Controller};
use stager_nvme::identify::{cns, ControllerInfo};
use stager_nvme::log_page::{async_event, lid, AnaState};
use stager_nvme::status::Status;
use stager_target::ana::{AnaError, AnaScope};
use stager_target::config::{AnaGroupConfig, Config, ListenerConfig};
use stager_target::management::{call, Request};
use stager_target::Target;

const STAGERCTL: &str = env!("CARGO_BIN_EXE_stagerctl");

/// Two listeners `a` and `b`; group 1 holds nsid 1 (optimized through `a`, inaccessible
/// through `b`), group 2 holds nsid 2 (non-optimized everywhere).
fn two_port_config() -> Config {
    let mut c = config();
    c.listeners.push(ListenerConfig {
        name: "b".into(),
        transport: Default::default(),
        address: "127.0.0.1:0".parse().unwrap(),
    });
    c.listeners[0].name = "a".into();
    c.subsystems[0].ana_groups = vec![
        AnaGroupConfig {
            id: 1,
            state: "optimized".into(),
            namespaces: vec![1],
            listener_states: [("b".to_string(), "inaccessible".to_string())].into(),
        },
        AnaGroupConfig {
            id: 2,
            state: "non-optimized".into(),
            namespaces: vec![2],
            listener_states: Default::default(),
        },
    ];
    c.validate("test").expect("valid config");
    c
}

fn target(t: &TestTarget) -> &Target {
    t.target.as_ref().unwrap()
}

fn io(ctrl: &mut Controller, cmd: Command, data: Vec<u8>, dir: DataDirection) -> (Status, Vec<u8>) {
    let r = ctrl.io_queue(0).execute(cmd, data, dir).expect("command answered");
    (r.status(), r.data)
}

fn read4k(ctrl: &mut Controller, nsid: u32, lba: u64) -> (Status, Vec<u8>) {
    io(ctrl, io_cmd::read(nsid, lba, 1), vec![0; 4096], DataDirection::ControllerToHost)
}

fn write4k(ctrl: &mut Controller, nsid: u32, lba: u64, data: Vec<u8>) -> Status {
    io(ctrl, io_cmd::write(nsid, lba, 1), data, DataDirection::HostToController).0
}

fn state_of(ctrl: &Controller, group: u32) -> AnaState {
    let log = ctrl.ana_log(false).expect("ANA log");
    log.groups.iter().find(|g| g.group == group).map(|g| g.state).expect("group listed")
}

fn enable_ana_notices(ctrl: &Controller) {
    ctrl.set_feature(0x0B, async_event::CONFIG_ANA_CHANGE).expect("Set Features async event config");
}

#[test]
fn identify_reports_ana_reporting_and_shared_namespaces() {
    let t = TestTarget::default();
    let ctrl = t.connect(&opts());
    let i = &ctrl.info;
    assert_eq!(i.cmic, 0b1011, "multi-port, multi-controller, ANA reporting");
    assert_ne!(i.oaes & async_event::CONFIG_ANA_CHANGE, 0, "OAES announces ANA change notices");
    assert_eq!((i.anatt, i.anacap), (10, 0b0101_1111));
    assert_eq!((i.anagrpmax, i.nanagrpid), (128, 128));
    assert!(i.mnan > 0 && i.mnan <= i.namespaces, "MNAN {} must be non-zero and <= NN {}", i.mnan, i.namespaces);
    for nsid in [1, 2] {
        let ns = ctrl.identify_namespace(nsid).unwrap();
        assert_eq!((ns.ana_group, ns.shared), (1, true), "nsid {nsid}: default group 1, NMIC shared");
    }
    // The default: one group, optimized, with every namespace.
    let log = ctrl.ana_log(false).unwrap();
    assert_eq!(log.groups.len(), 1);
    assert_eq!(
        (log.groups[0].group, log.groups[0].state, log.groups[0].nsids.clone()),
        (1, AnaState::Optimized, vec![1, 2])
    );
    // A discovery controller reports no ANA.
    let d = Controller::connect(
        t.addr,
        stager_nvme::DISCOVERY_NQN,
        &stager_nvme::host::HostOptions { io_queues: 0, ..opts() },
    )
    .unwrap();
    let r = d
        .admin(stager_nvme::host::identify_cmd(cns::CONTROLLER, 0), vec![0; 4096], DataDirection::ControllerToHost)
        .unwrap();
    let di = ControllerInfo::decode(&r.data).unwrap();
    assert_eq!((di.cmic & 0b1000, di.anagrpmax, di.mnan), (0, 0, 0));
}

#[test]
fn log_page_and_io_statuses_follow_the_listener() {
    let t = TestTarget::start(two_port_config());
    let (addr_a, addr_b) = (target(&t).listen_addr(0), target(&t).listen_addr(1));
    let mut a = Controller::connect(addr_a, NQN, &opts()).unwrap();
    let mut b = Controller::connect(addr_b, NQN, &opts()).unwrap();
    assert_eq!(b.identify_namespace(2).unwrap().ana_group, 2);

    let log_a = a.ana_log(false).unwrap();
    let log_b = b.ana_log(false).unwrap();
    let view = |l: &stager_nvme::log_page::AnaLog| -> Vec<(u32, AnaState, Vec<u32>)> {
        l.groups.iter().map(|g| (g.group, g.state, g.nsids.clone())).collect()
    };
    assert_eq!(view(&log_a), [(1, AnaState::Optimized, vec![1]), (2, AnaState::NonOptimized, vec![2])]);
    assert_eq!(view(&log_b), [(1, AnaState::Inaccessible, vec![1]), (2, AnaState::NonOptimized, vec![2])]);
    // Groups only (RGO): the same groups, no NSIDs.
    let rgo = b.ana_log(true).unwrap();
    assert!(rgo.groups.iter().all(|g| g.nsids.is_empty()) && rgo.groups.len() == 2);

    // Optimized and non-optimized paths serve I/O; the inaccessible one refuses it with a
    // path-related status and no DNR, reads and writes alike.
    let data = pattern(1, 4096);
    assert_eq!(write4k(&mut a, 1, 3, data.clone()), Status::SUCCESS);
    // nsid 2 has 512-byte blocks: 4 KiB is 8 of them.
    let (s, _) = io(&mut b, io_cmd::write(2, 8, 8), data.clone(), DataDirection::HostToController);
    assert_eq!(s, Status::SUCCESS, "non-optimized still serves");
    let (s, _) = read4k(&mut b, 1, 3);
    assert!(s.same_code(Status::ANA_INACCESSIBLE) && !s.dnr, "read through the inaccessible path: {s}");
    let s = write4k(&mut b, 1, 3, pattern(2, 4096));
    assert!(s.same_code(Status::ANA_INACCESSIBLE) && !s.dnr, "write through the inaccessible path: {s}");
    let (s, _) = io(&mut b, io_cmd::flush(0xFFFF_FFFF), vec![], DataDirection::None);
    assert!(s.is_path_error() && !s.dnr, "flush of every namespace through a path missing one: {s}");
    // Admin commands still work there (Identify, the log page above).
    assert_eq!(b.identify_namespace(1).unwrap().ana_group, 1);

    // Change and persistent loss have their own statuses; back to optimized, the path serves
    // the data written through the other one.
    let scope_b = AnaScope { subsystem: None, listener: Some("b".into()) };
    for (state, want) in
        [(AnaState::Change, Status::ANA_TRANSITION), (AnaState::PersistentLoss, Status::ANA_PERSISTENT_LOSS)]
    {
        target(&t).set_ana_state(1, state, &scope_b).unwrap();
        let (s, _) = read4k(&mut b, 1, 3);
        assert!(s.same_code(want) && !s.dnr, "{state}: {s}");
        assert_eq!(state_of(&b, 1), state);
    }
    let change = target(&t).set_ana_state(1, AnaState::Optimized, &scope_b).unwrap();
    assert_eq!(change.changed.len(), 1);
    assert_eq!((change.changed[0].listener.as_str(), change.changed[0].state.as_str()), ("b", "optimized"));
    assert_eq!(read4k(&mut b, 1, 3), (Status::SUCCESS, data));
    // Listener a never changed.
    assert_eq!(state_of(&a, 1), AnaState::Optimized);
    let log = a.ana_log(false).unwrap();
    assert_eq!((log.change_count, log.groups[0].change_count, log.groups[1].change_count), (3, 3, 0));
}

#[test]
fn ana_change_notice_is_sent_on_every_change_once_the_log_is_read() {
    let t = TestTarget::start(two_port_config());
    let (addr_a, addr_b) = (target(&t).listen_addr(0), target(&t).listen_addr(1));
    let b = Controller::connect(addr_b, NQN, &opts()).unwrap();
    let a = Controller::connect(addr_a, NQN, &opts()).unwrap();
    // A second controller on b that did not enable the notice never hears of a change.
    let quiet = Controller::connect(addr_b, NQN, &opts()).unwrap();
    enable_ana_notices(&b);
    enable_ana_notices(&a);
    for c in [&a, &b, &quiet] {
        c.request_async_event().unwrap();
    }
    let scope_b = AnaScope { subsystem: Some(NQN.into()), listener: Some("b".into()) };

    let t0 = Instant::now();
    let change = target(&t).set_ana_state(1, AnaState::Optimized, &scope_b).unwrap();
    assert_eq!(change.controllers_notified, 2, "both controllers on b are told (one has the notice disabled)");
    let dw0 = b.wait_async_event(Duration::from_secs(5)).unwrap().expect("ANA change notice on b");
    assert_eq!(async_event::decode(dw0), (async_event::TYPE_NOTICE, async_event::NOTICE_ANA_CHANGE, lid::ANA));
    assert!(t0.elapsed() < Duration::from_secs(2), "notice took {:?}", t0.elapsed());
    assert_eq!(state_of(&b, 1), AnaState::Optimized);
    // a's path did not change; quiet did not enable notices.
    assert_eq!(a.wait_async_event(Duration::from_millis(400)).unwrap(), None);
    assert_eq!(quiet.wait_async_event(Duration::from_millis(100)).unwrap(), None);

    // Every change gets a notice: b read the log (RAE clear) above, so the next one goes out.
    b.request_async_event().unwrap();
    target(&t).set_ana_state(1, AnaState::Inaccessible, &scope_b).unwrap();
    assert!(b.wait_async_event(Duration::from_secs(5)).unwrap().is_some(), "second change, second notice");
    // Until the host reads the log page, a further change waits ...
    b.request_async_event().unwrap();
    target(&t).set_ana_state(1, AnaState::NonOptimized, &scope_b).unwrap();
    assert_eq!(b.wait_async_event(Duration::from_millis(400)).unwrap(), None, "masked until the log is read");
    // ... reading it with RAE set keeps it waiting; with RAE clear it goes out.
    b.get_log_page_with(lid::ANA, 4096, 0, 0, true).unwrap();
    assert_eq!(b.wait_async_event(Duration::from_millis(300)).unwrap(), None, "RAE set keeps the mask");
    assert_eq!(state_of(&b, 1), AnaState::NonOptimized);
    assert!(b.wait_async_event(Duration::from_secs(5)).unwrap().is_some(), "notice after the log was read");

    // Setting the state a path already has changes nothing and notifies no one.
    let same = target(&t).set_ana_state(1, AnaState::NonOptimized, &scope_b).unwrap();
    assert_eq!((same.changed.len(), same.controllers_notified), (0, 0));
    // Across all listeners: a hears of it too.
    let all = target(&t).set_ana_state(2, AnaState::Optimized, &AnaScope::default()).unwrap();
    assert_eq!(all.changed.len(), 2);
    assert!(a.wait_async_event(Duration::from_secs(5)).unwrap().is_some(), "a's group 2 changed");
}

#[test]
fn set_ana_state_refuses_what_this_node_does_not_have() {
    let t = TestTarget::start(two_port_config());
    let tg = target(&t);
    assert_eq!(
        tg.set_ana_state(9, AnaState::Optimized, &AnaScope::default()).unwrap_err(),
        AnaError::NoGroup { group: 9, where_: "any subsystem of this node".into() }
    );
    let e = tg.set_ana_state(1, AnaState::Optimized, &AnaScope { listener: Some("zz".into()), subsystem: None });
    assert_eq!(e.unwrap_err(), AnaError::NoListener("zz".into()));
    let e =
        tg.set_ana_state(1, AnaState::Optimized, &AnaScope { subsystem: Some("nqn.x:none".into()), listener: None });
    assert_eq!(e.unwrap_err(), AnaError::NoSubsystem("nqn.x:none".into()));
    let paths = tg.ana_status();
    assert_eq!(paths.len(), 4, "2 groups x 2 listeners: {paths:?}");
}

#[test]
fn controller_ids_come_from_the_node_range() {
    let mut c1 = config();
    (c1.ana.cntlid_min, c1.ana.cntlid_max) = (100, 101);
    let mut c2 = config();
    (c2.ana.cntlid_min, c2.ana.cntlid_max) = (200, 299);
    let (t1, t2) = (TestTarget::start(c1), TestTarget::start(c2));
    let x = t1.connect(&opts());
    let y = t1.connect(&opts());
    let z = t2.connect(&opts());
    let mut ids = [x.cntlid, y.cntlid];
    ids.sort();
    assert_eq!(ids, [100, 101]);
    assert!((200..=299).contains(&z.cntlid), "{}", z.cntlid);
    assert_eq!((x.info.cntlid, z.info.cntlid), (x.cntlid, z.cntlid), "Identify reports the same id");
    // The range is full: a third controller is refused (busy, so the host may retry later).
    match Controller::connect(t1.addr, NQN, &opts()) {
        Err(stager_nvme::host::HostError::Nvme(s)) => assert!(s.same_code(Status::CONNECT_CONTROLLER_BUSY), "{s}"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(c) => panic!("a third controller got id {}", c.cntlid),
    }
    // An id freed is handed out again.
    drop(x);
    let deadline = Instant::now() + Duration::from_secs(5);
    let w = loop {
        match Controller::connect(t1.addr, NQN, &opts()) {
            Ok(w) => break w,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("no id freed: {e}"),
        }
    };
    assert!((100..=101).contains(&w.cntlid) && w.cntlid != y.cntlid);
}

#[test]
fn management_socket_and_stagerctl_show_and_set_ana_states() {
    let dir = std::env::temp_dir().join(format!("stager-ana-{}", std::process::id()));
    let sock = dir.join("m.sock");
    let mut c = two_port_config();
    c.management.socket = Some(sock.clone());
    let t = TestTarget::start(c);
    let b = Controller::connect(target(&t).listen_addr(1), NQN, &opts()).unwrap();
    enable_ana_notices(&b);
    b.request_async_event().unwrap();

    let r = call(&sock, &Request::AnaShow).unwrap();
    let paths = r.ana.expect("ANA paths");
    let p = paths.iter().find(|p| p.group == 1 && p.listener == "b").unwrap();
    assert_eq!((p.state.as_str(), p.controllers, p.namespaces.clone()), ("inaccessible", 1, vec![1]));

    let out = std::process::Command::new(STAGERCTL)
        .args(["ana", "set", "1", "optimized", "--listener", "b", "--socket"])
        .arg(&sock)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stagerctl ana set: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("optimized on 1 path(s), 1 controller(s) notified"), "{stdout}");
    assert!(b.wait_async_event(Duration::from_secs(5)).unwrap().is_some(), "the host heard of it");
    assert_eq!(state_of(&b, 1), AnaState::Optimized);

    let out = std::process::Command::new(STAGERCTL).args(["ana", "show", "--socket"]).arg(&sock).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    let line = stdout.lines().find(|l| l.contains(" b ") && l.contains(NQN) && l.trim_end().ends_with(" 1")).unwrap();
    assert!(line.contains("optimized"), "{stdout}");

    // Bad requests say what is wrong, and stagerctl exits 1.
    let out = std::process::Command::new(STAGERCTL)
        .args(["ana", "set", "1", "fast", "--socket"])
        .arg(&sock)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an ANA state"));
    let r =
        call(&sock, &Request::AnaSet { group: 5, state: "optimized".into(), subsystem: None, listener: None }).unwrap();
    assert!(!r.ok && r.error.unwrap().contains("no ANA group 5"));
    drop(b);
    drop(t);
    let _ = std::fs::remove_dir_all(dir);
}
