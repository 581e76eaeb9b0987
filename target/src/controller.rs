//! An NVMe controller: the part every queue of it shares (`ControllerShared`: identity, CC/CSTS,
//! liveness, per-queue counters, all lock-free for the I/O path) and the admin state that only
//! the admin queue's connection owns (`AdminState`: features, held async event requests, the
//! error log) together with the admin command set — properties, Identify, Get/Set Features,
//! Get Log Page, Keep Alive, Abort, Asynchronous Event Request.
//!
//! Admin commands complete synchronously here except AERs (held until an event) and a
//! shutdown (CC.SHN), whose volatile-cache flush the connection carries out on the bdevs and
//! then reports through `finish_shutdown`. The one event raised today is the ANA change
//! notice (`ana.rs`): `take_async_event` hands the connection a held AER to answer with it.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use stager_nvme::command::{admin, fctype, Command, FABRICS_OPCODE};
use stager_nvme::fabrics::{self, cc, csts, prop};
use stager_nvme::identify::{self, cns, AnaReporting, ControllerIdentity, ControllerType};
use stager_nvme::log_page::{self, async_event, lid, DiscoveryEntry, ErrorEntry, SmartLog};
use stager_nvme::status::Status;
use stager_nvme::Nsid;

use crate::constants::{AER_LIMIT, ANA_GROUP_ID_MAX, ERROR_LOG_ENTRIES, FIRMWARE_REVISION, NAMESPACES_MAX};
use crate::subsystem::{Limits, Subsystem, SubsystemKind, TargetShared};

/// Counters one queue keeps; written only by the reactor owning the queue.
#[derive(Default)]
pub struct QueueStats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub errors: AtomicU64,
}

pub struct ControllerShared {
    pub cntlid: u16,
    pub subsystem: Arc<Subsystem>,
    /// The listener (index in `TargetShared::listeners`) the admin queue came through: the
    /// port whose ANA states this controller reports.
    pub listener: usize,
    /// An ANA state this controller reports changed and the host has not been told yet
    /// (set by `TargetShared::set_ana_state`, taken by the admin queue).
    pub ana_change_pending: AtomicBool,
    pub hostnqn: String,
    pub host_id: [u8; 16],
    pub cc: AtomicU32,
    pub csts: AtomicU32,
    /// Set when the controller is gone (admin queue closed, keep-alive expired, fatal error):
    /// its I/O queues notice on their next timer tick and close.
    pub failed: AtomicBool,
    /// I/O queues granted by Set Features Number of Queues.
    pub io_queues_granted: AtomicU16,
    /// Bit per connected I/O queue id (qids 1..=64).
    pub connected_qids: AtomicU64,
    pub queue_stats: Mutex<Vec<Arc<QueueStats>>>,
    pub errors: Mutex<ErrorLog>,
    pub created: Instant,
}

#[derive(Default)]
pub struct ErrorLog {
    pub count: u64,
    pub entries: std::collections::VecDeque<ErrorEntry>,
}

impl ControllerShared {
    pub fn new(
        cntlid: u16,
        subsystem: Arc<Subsystem>,
        listener: usize,
        hostnqn: String,
        host_id: [u8; 16],
    ) -> ControllerShared {
        ControllerShared {
            cntlid,
            subsystem,
            listener,
            ana_change_pending: AtomicBool::new(false),
            hostnqn,
            host_id,
            cc: AtomicU32::new(0),
            csts: AtomicU32::new(0),
            failed: AtomicBool::new(false),
            io_queues_granted: AtomicU16::new(0),
            connected_qids: AtomicU64::new(0),
            queue_stats: Mutex::new(Vec::new()),
            errors: Mutex::new(ErrorLog::default()),
            created: Instant::now(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.csts.load(Ordering::Acquire) & csts::RDY != 0 && !self.failed.load(Ordering::Acquire)
    }

    /// Claims an I/O queue id; false if out of range or already connected.
    pub fn claim_qid(&self, qid: u16) -> bool {
        if qid == 0 || qid > 64 || qid > self.io_queues_granted.load(Ordering::Acquire) {
            return false;
        }
        let bit = 1u64 << (qid - 1);
        self.connected_qids.fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    /// The path-related status an I/O command on namespace `ns` gets through this controller
    /// (its group is inaccessible, lost or changing here); `None` when the path serves I/O.
    /// One atomic load: it runs for every command.
    #[inline]
    pub fn ana_io_status(&self, ns: &crate::subsystem::Namespace) -> Option<Status> {
        self.subsystem.ana.state(ns.ana_index, self.listener).io_status()
    }

    pub fn release_qid(&self, qid: u16) {
        if (1..=64).contains(&qid) {
            self.connected_qids.fetch_and(!(1u64 << (qid - 1)), Ordering::AcqRel);
        }
    }

    /// Records a failed command in the error log (error path only; the lock is never taken on
    /// a successful I/O).
    pub fn record_error(&self, sqid: u16, cid: u16, status: Status, nsid: u32, lba: u64) {
        if let Ok(mut log) = self.errors.lock() {
            log.count += 1;
            let e = ErrorEntry { error_count: log.count, sqid, cid, status_field: status.to_field(false), lba, nsid };
            log.entries.push_front(e);
            log.entries.truncate(ERROR_LOG_ENTRIES);
        }
    }
}

/// What an admin command came to.
pub enum AdminOutcome {
    /// Complete now with this status, result dwords and data (sent C2H).
    Done { status: Status, dw0: u32, dw1: u32, data: Vec<u8> },
    /// An AER: hold the command until an event occurs.
    Held,
    /// CC.SHN was written: flush every namespace, then call `finish_shutdown` and complete.
    Shutdown,
}

impl AdminOutcome {
    fn ok() -> AdminOutcome {
        AdminOutcome::Done { status: Status::SUCCESS, dw0: 0, dw1: 0, data: Vec::new() }
    }
    fn status(s: Status) -> AdminOutcome {
        AdminOutcome::Done { status: s, dw0: 0, dw1: 0, data: Vec::new() }
    }
    fn dw0(v: u32) -> AdminOutcome {
        AdminOutcome::Done { status: Status::SUCCESS, dw0: v, dw1: 0, data: Vec::new() }
    }
    fn data(d: Vec<u8>) -> AdminOutcome {
        AdminOutcome::Done { status: Status::SUCCESS, dw0: 0, dw1: 0, data: d }
    }
}

/// Admin-queue state of one controller.
pub struct AdminState {
    pub shared: Arc<ControllerShared>,
    pub limits: Limits,
    /// Keep-alive timeout in ms (0 = disabled), from Connect or Set Features.
    pub kato_ms: u32,
    pub last_keep_alive: Instant,
    pub held_aers: Vec<u16>,
    async_event_config: u32,
    /// An ANA change notice was sent and the host has not read the ANA log page (with RAE
    /// clear) since: further notices wait until it does.
    ana_notice_masked: bool,
    vwc_enabled: bool,
    /// Discovery log entries (discovery controllers only), filtered for this host.
    discovery_entries: Vec<DiscoveryEntry>,
    discovery_generation: u64,
}

impl AdminState {
    pub fn new(shared: Arc<ControllerShared>, target: &TargetShared, kato_ms: u32) -> AdminState {
        let discovery_entries = if shared.subsystem.kind == SubsystemKind::Discovery {
            discovery_log_for(target, &shared.hostnqn)
        } else {
            Vec::new()
        };
        AdminState {
            limits: target.limits.clone(),
            shared,
            kato_ms,
            last_keep_alive: Instant::now(),
            held_aers: Vec::new(),
            async_event_config: 0,
            ana_notice_masked: false,
            vwc_enabled: true,
            discovery_entries,
            discovery_generation: 1,
        }
    }

    fn is_discovery(&self) -> bool {
        self.shared.subsystem.kind == SubsystemKind::Discovery
    }

    fn volatile_cache(&self) -> bool {
        self.shared.subsystem.namespaces.iter().any(|n| n.bdev.info().volatile_cache)
    }

    /// Executes one admin or fabrics command (Connect is handled by the transport).
    pub fn execute(&mut self, cmd: &Command) -> AdminOutcome {
        // Any admin command shows the host is alive; Keep Alive exists for idle hosts.
        self.last_keep_alive = Instant::now();
        if cmd.opcode() == FABRICS_OPCODE {
            return match cmd.fctype() {
                fctype::PROPERTY_GET => self.property_get(cmd),
                fctype::PROPERTY_SET => self.property_set(cmd),
                _ => AdminOutcome::status(Status::INVALID_OPCODE),
            };
        }
        if !self.shared.enabled() {
            return AdminOutcome::status(Status::COMMAND_SEQUENCE_ERROR);
        }
        match cmd.opcode() {
            admin::IDENTIFY => self.identify(cmd),
            admin::GET_LOG_PAGE => self.get_log_page(cmd),
            admin::KEEP_ALIVE => AdminOutcome::ok(),
            admin::ASYNC_EVENT_REQUEST => {
                if self.held_aers.len() >= AER_LIMIT as usize {
                    AdminOutcome::status(Status::AER_LIMIT_EXCEEDED)
                } else {
                    self.held_aers.push(cmd.cid());
                    AdminOutcome::Held
                }
            }
            admin::GET_FEATURES if !self.is_discovery() || matches!(cmd.cdw(10) & 0xFF, 0x0B | 0x0F) => {
                self.get_features(cmd)
            }
            admin::SET_FEATURES if !self.is_discovery() || matches!(cmd.cdw(10) & 0xFF, 0x0B | 0x0F) => {
                self.set_features(cmd)
            }
            // Abort: we complete commands promptly and never abort one; DW0 bit 0 = not aborted.
            admin::ABORT if !self.is_discovery() => AdminOutcome::dw0(1),
            _ => AdminOutcome::status(Status::INVALID_OPCODE),
        }
    }

    fn property_get(&self, cmd: &Command) -> AdminOutcome {
        let (wide, offset, _) = fabrics::property_fields(cmd);
        let v: u64 = match (offset, wide) {
            (prop::CAP, true) => fabrics::cap(self.limits.max_queue_depth),
            (prop::VS, false) => fabrics::VERSION_1_4 as u64,
            (prop::CC, false) => self.shared.cc.load(Ordering::Acquire) as u64,
            (prop::CSTS, false) => self.shared.csts.load(Ordering::Acquire) as u64,
            _ => return AdminOutcome::status(Status::INVALID_FIELD),
        };
        AdminOutcome::Done { status: Status::SUCCESS, dw0: v as u32, dw1: (v >> 32) as u32, data: Vec::new() }
    }

    fn property_set(&mut self, cmd: &Command) -> AdminOutcome {
        let (wide, offset, value) = fabrics::property_fields(cmd);
        if offset != prop::CC || wide {
            return AdminOutcome::status(Status::INVALID_FIELD);
        }
        let new = value as u32;
        let old = self.shared.cc.swap(new, Ordering::AcqRel);
        if cc::shn(new) != 0 && cc::shn(old) == 0 {
            // Normal or abrupt shutdown: processing until the caches are flushed.
            let s = self.shared.csts.load(Ordering::Acquire) & !(0x3 << 2);
            self.shared.csts.store(s | (0x1 << 2), Ordering::Release);
            return AdminOutcome::Shutdown;
        }
        if new & cc::EN != 0 && old & cc::EN == 0 {
            // 64-byte SQEs and 16-byte CQEs are the only sizes (IOSQES 6, IOCQES 4).
            let (iosqes, iocqes) = ((new >> 16) & 0xF, (new >> 20) & 0xF);
            if (iosqes != 0 && iosqes != 6) || (iocqes != 0 && iocqes != 4) {
                self.shared.csts.fetch_or(csts::CFS, Ordering::AcqRel);
                return AdminOutcome::ok();
            }
            self.shared.csts.store(csts::RDY, Ordering::Release);
        } else if new & cc::EN == 0 && old & cc::EN != 0 {
            // Controller reset: every I/O queue goes away, the admin queue stays.
            self.shared.csts.store(0, Ordering::Release);
            self.held_aers.clear();
        }
        AdminOutcome::ok()
    }

    /// A held AER to answer now, with its DW0, if an event is due: an ANA change notice is
    /// pending, the host enabled it (Set Features 0Bh bit 11), and no earlier notice waits for
    /// the host to read the log page. A notice the host did not enable is dropped.
    pub fn take_async_event(&mut self) -> Option<(u16, u32)> {
        if !self.shared.ana_change_pending.load(Ordering::Acquire) {
            return None;
        }
        if self.async_event_config & async_event::CONFIG_ANA_CHANGE == 0 {
            self.shared.ana_change_pending.store(false, Ordering::Release);
            return None;
        }
        if self.ana_notice_masked || self.held_aers.is_empty() || !self.shared.enabled() {
            return None;
        }
        self.shared.ana_change_pending.store(false, Ordering::Release);
        self.ana_notice_masked = true;
        let cid = self.held_aers.remove(0);
        Some((cid, async_event::encode(async_event::TYPE_NOTICE, async_event::NOTICE_ANA_CHANGE, lid::ANA)))
    }

    /// Called once the shutdown flush finished.
    pub fn finish_shutdown(&mut self) {
        let s = self.shared.csts.load(Ordering::Acquire) & !(0x3 << 2) & !csts::RDY;
        self.shared.csts.store(s | csts::SHST_COMPLETE, Ordering::Release);
    }

    fn identity(&self) -> ControllerIdentity {
        let sub = &self.shared.subsystem;
        let discovery = self.is_discovery();
        ControllerIdentity {
            serial: sub.serial.clone(),
            model: sub.model.clone(),
            firmware: FIRMWARE_REVISION.into(),
            cntlid: self.shared.cntlid,
            controller_type: if discovery { ControllerType::Discovery } else { ControllerType::Io },
            mdts: self.limits.mdts(),
            max_cmd: self.limits.max_queue_depth,
            namespaces: if discovery { 0 } else { NAMESPACES_MAX },
            subnqn: sub.nqn.clone(),
            vwc: !discovery && self.volatile_cache(),
            in_capsule_bytes: self.limits.in_capsule_bytes as u32,
            aer_limit: AER_LIMIT,
            error_log_entries: ERROR_LOG_ENTRIES as u8,
            ana: (!discovery).then_some(AnaReporting {
                transition_time_s: sub.ana.transition_time_s,
                group_id_max: ANA_GROUP_ID_MAX,
                namespaces_max: NAMESPACES_MAX,
            }),
        }
    }

    fn identify(&self, cmd: &Command) -> AdminOutcome {
        let c = (cmd.cdw(10) & 0xFF) as u8;
        let nsid = cmd.nsid();
        let sub = &self.shared.subsystem;
        if self.is_discovery() && c != cns::CONTROLLER {
            return AdminOutcome::status(Status::INVALID_FIELD);
        }
        match c {
            cns::CONTROLLER => AdminOutcome::data(self.identity().encode()),
            cns::NAMESPACE => match sub.namespace(nsid) {
                Some(ns) => AdminOutcome::data(ns.identity().encode()),
                // An allocated-but-inactive NSID reads as zeroes; anything else is invalid.
                None if (1..=NAMESPACES_MAX).contains(&nsid) => AdminOutcome::data(vec![0; 4096]),
                None => AdminOutcome::status(Status::INVALID_NAMESPACE),
            },
            cns::ACTIVE_NAMESPACES => {
                if nsid >= 0xFFFF_FFFE {
                    return AdminOutcome::status(Status::INVALID_NAMESPACE);
                }
                let nsids: Vec<u32> = sub.namespaces.iter().map(|n| n.nsid).collect();
                AdminOutcome::data(identify::encode_active_namespaces(&nsids, nsid))
            }
            cns::NS_ID_DESCRIPTORS => match sub.namespace(nsid) {
                Some(ns) => AdminOutcome::data(ns.identity().encode_descriptors()),
                None => AdminOutcome::status(Status::INVALID_NAMESPACE),
            },
            _ => AdminOutcome::status(Status::INVALID_FIELD),
        }
    }

    fn get_features(&self, cmd: &Command) -> AdminOutcome {
        let fid = cmd.cdw(10) & 0xFF;
        let sel = (cmd.cdw(10) >> 8) & 0x7;
        if sel == 3 {
            // Supported capabilities: nothing saveable, all changeable.
            return AdminOutcome::dw0(0b100);
        }
        match fid {
            0x01 | 0x02 | 0x04 | 0x08 => AdminOutcome::dw0(0),
            0x06 if self.volatile_cache() => AdminOutcome::dw0(self.vwc_enabled as u32),
            0x07 => {
                let n = self.shared.io_queues_granted.load(Ordering::Acquire).max(1) as u32 - 1;
                AdminOutcome::dw0(n | n << 16)
            }
            0x0B => AdminOutcome::dw0(self.async_event_config),
            0x0F => AdminOutcome::dw0(self.kato_ms),
            _ => AdminOutcome::status(Status::INVALID_FIELD),
        }
    }

    fn set_features(&mut self, cmd: &Command) -> AdminOutcome {
        let fid = cmd.cdw(10) & 0xFF;
        if cmd.cdw(10) & (1 << 31) != 0 {
            return AdminOutcome::status(Status::FEATURE_NOT_SAVEABLE);
        }
        let v = cmd.cdw(11);
        match fid {
            0x01 | 0x02 | 0x04 | 0x08 => AdminOutcome::ok(),
            0x06 if self.volatile_cache() => {
                self.vwc_enabled = v & 1 != 0;
                AdminOutcome::ok()
            }
            0x07 => {
                let (nsqr, ncqr) = (v & 0xFFFF, v >> 16);
                if nsqr == 0xFFFF || ncqr == 0xFFFF {
                    return AdminOutcome::status(Status::INVALID_FIELD);
                }
                let want = nsqr.min(ncqr) + 1;
                let granted = want.min(self.limits.max_io_queues as u32).min(64) as u16;
                self.shared.io_queues_granted.store(granted, Ordering::Release);
                let n = granted as u32 - 1;
                AdminOutcome::dw0(n | n << 16)
            }
            0x0B => {
                self.async_event_config = v;
                AdminOutcome::ok()
            }
            0x0F => {
                self.kato_ms = v;
                AdminOutcome::ok()
            }
            _ => AdminOutcome::status(Status::INVALID_FIELD),
        }
    }

    fn get_log_page(&mut self, cmd: &Command) -> AdminOutcome {
        let id = (cmd.cdw(10) & 0xFF) as u8;
        let numd = ((cmd.cdw(10) >> 16) | ((cmd.cdw(11) & 0xFFFF) << 16)) as usize + 1;
        let offset = cmd.cdw(12) as u64 | ((cmd.cdw(13) as u64) << 32);
        let len = numd * 4;
        if !offset.is_multiple_of(4) {
            return AdminOutcome::status(Status::INVALID_FIELD);
        }
        let page = match (id, self.is_discovery()) {
            (lid::DISCOVERY, true) => {
                log_page::encode_discovery_log(self.discovery_generation, &self.discovery_entries)
            }
            (lid::ERROR_INFO, false) => {
                let mut b = vec![0u8; ERROR_LOG_ENTRIES * 64];
                if let Ok(log) = self.shared.errors.lock() {
                    for (i, e) in log.entries.iter().enumerate() {
                        e.encode(&mut b[i * 64..(i + 1) * 64]);
                    }
                }
                b
            }
            (lid::SMART, false) => {
                let nsid = cmd.nsid();
                if nsid != Nsid::BROADCAST.0 && nsid != 0 && self.shared.subsystem.namespace(nsid).is_none() {
                    return AdminOutcome::status(Status::INVALID_NAMESPACE);
                }
                self.smart_log().encode()
            }
            (lid::FIRMWARE_SLOT, false) => {
                let mut b = vec![0u8; 512];
                b[0] = 1; // active slot 1
                b[8..8 + FIRMWARE_REVISION.len()].copy_from_slice(FIRMWARE_REVISION.as_bytes());
                b
            }
            (lid::CHANGED_NAMESPACES, false) => vec![0u8; 4096],
            (lid::ANA, false) => {
                // LSP bit 0 (CDW10 bit 8): groups only. RAE (bit 15) clear: the host has seen
                // the change, so the next one may be announced.
                let groups_only = cmd.cdw(10) & (1 << 8) != 0;
                if cmd.cdw(10) & (1 << 15) == 0 {
                    self.ana_notice_masked = false;
                }
                self.shared.subsystem.ana.log_page(self.shared.listener).encode(groups_only)
            }
            _ => return AdminOutcome::status(Status::INVALID_LOG_PAGE),
        };
        if offset > page.len() as u64 {
            return AdminOutcome::status(Status::INVALID_FIELD);
        }
        let start = offset as usize;
        let mut out = page[start..(start + len).min(page.len())].to_vec();
        out.resize(len, 0);
        AdminOutcome::data(out)
    }

    fn smart_log(&self) -> SmartLog {
        let mut s = SmartLog { temperature_kelvin: 313, ..SmartLog::default() };
        if let Ok(stats) = self.shared.queue_stats.lock() {
            for q in stats.iter() {
                s.host_reads += q.reads.load(Ordering::Relaxed) as u128;
                s.host_writes += q.writes.load(Ordering::Relaxed) as u128;
                // Data units are thousands of 512-byte units, rounded up.
                s.data_units_read += (q.bytes_read.load(Ordering::Relaxed) as u128).div_ceil(512_000);
                s.data_units_written += (q.bytes_written.load(Ordering::Relaxed) as u128).div_ceil(512_000);
                s.media_errors += q.errors.load(Ordering::Relaxed) as u128;
            }
        }
        s.power_on_hours = (self.shared.created.elapsed().as_secs() / 3600) as u128;
        s.error_log_entries = self.shared.errors.lock().map(|l| l.count as u128).unwrap_or(0);
        s
    }
}

/// One discovery log entry per (subsystem the host may use, listener of that subsystem).
pub fn discovery_log_for(target: &TargetShared, hostnqn: &str) -> Vec<DiscoveryEntry> {
    let mut subs: Vec<&Arc<Subsystem>> =
        target.subsystems.values().filter(|s| s.kind == SubsystemKind::Nvm && s.host_allowed(hostnqn)).collect();
    subs.sort_by(|a, b| a.nqn.cmp(&b.nqn));
    let mut out = Vec::new();
    for s in subs {
        for (i, addr) in s.listeners.iter().enumerate() {
            out.push(DiscoveryEntry {
                trtype: 3,
                adrfam: if addr.is_ipv4() { 1 } else { 2 },
                subtype: log_page::subtype::NVM,
                portid: i as u16 + 1,
                trsvcid: addr.port().to_string(),
                subnqn: s.nqn.clone(),
                traddr: addr.ip().to_string(),
            });
        }
    }
    out
}
