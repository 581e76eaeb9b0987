//! A host's view of one controller: admin queue setup (Connect, CC.EN, identify), I/O queues,
//! keep-alive in the background, clean shutdown (CC.SHN), and the discovery log.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::queue::{QueuePair, Response};
use super::{HostError, HostOptions, Result};
use crate::command::{admin, Command, DataDirection};
use crate::fabrics::{self, cc, csts, prop, Connect};
use crate::identify::{self, cns, ControllerInfo, NamespaceIdentity};
use crate::log_page::{self, AnaLog, DiscoveryEntry};
use crate::DISCOVERY_NQN;

/// Admin queue depth the host asks for.
const ADMIN_DEPTH: usize = 32;
/// The tag of an outstanding Asynchronous Event Request on the admin queue.
const AER_TAG: u64 = u64::MAX - 1;
/// Bytes read for the ANA log: its header, 128 group descriptors and 1024 NSIDs.
const ANA_LOG_BYTES: usize = 16 + 128 * 32 + 1024 * 4;

pub struct Controller {
    admin: Arc<Mutex<QueuePair>>,
    pub cntlid: u16,
    pub info: ControllerInfo,
    pub addr: SocketAddr,
    pub subnqn: String,
    io_queues: Vec<QueuePair>,
    keepalive_stop: Arc<AtomicBool>,
    keepalive: Option<JoinHandle<()>>,
}

pub fn resolve(addr: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()?.next().ok_or_else(|| HostError::Io(std::io::Error::other(format!("cannot resolve {addr}"))))
}

impl Controller {
    /// Connects the admin queue and `opts.io_queues` I/O queues to subsystem `subnqn`.
    pub fn connect(addr: SocketAddr, subnqn: &str, opts: &HostOptions) -> Result<Controller> {
        let mut admin_q = QueuePair::open(addr, 0, ADMIN_DEPTH, opts)?;
        let cntlid = connect_queue(&mut admin_q, subnqn, opts, 0, ADMIN_DEPTH as u16, 0xFFFF, opts.kato_ms)?;
        // Enable the controller: read CAP, set CC.EN with 64/16-byte entries, wait CSTS.RDY.
        let cap = property(&mut admin_q, prop::CAP, None)?;
        // Entries a queue may have; it can hold one command fewer (SQ flow control).
        let max_entries = (cap & 0xFFFF) as u32 + 1;
        let cc_val = cc::EN | (6 << 16) | (4 << 20);
        property(&mut admin_q, prop::CC, Some(cc_val as u64))?;
        let deadline = Instant::now() + Duration::from_millis(opts.timeout_ms);
        while property(&mut admin_q, prop::CSTS, None)? as u32 & csts::RDY == 0 {
            if Instant::now() > deadline {
                return Err(HostError::Timeout(opts.timeout_ms));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let id = admin_q.execute(identify_cmd(cns::CONTROLLER, 0), vec![0; 4096], DataDirection::ControllerToHost)?;
        id.ok()?;
        let info = ControllerInfo::decode(&id.data).ok_or_else(|| HostError::Protocol("short identify".into()))?;
        let mut io_queues = Vec::new();
        if opts.io_queues > 0 {
            // Number of Queues (FID 7), 0-based counts.
            let n = (opts.io_queues - 1) as u32;
            let mut c = Command::new(admin::SET_FEATURES, 0);
            c.set_cdw(10, 0x07).set_cdw(11, n | n << 16);
            let r = admin_q.execute(c, vec![], DataDirection::None)?;
            r.ok()?;
            let granted = (r.completion.dw0 & 0xFFFF).min(r.completion.dw0 >> 16) as u16 + 1;
            if granted < opts.io_queues {
                return Err(HostError::Protocol(format!(
                    "asked for {} I/O queues, target grants {granted}",
                    opts.io_queues
                )));
            }
            let depth = (opts.queue_depth as u32).min(max_entries - 1).max(1) as u16;
            for qid in 1..=opts.io_queues {
                let mut q = QueuePair::open(addr, qid, depth as usize, opts)?;
                q.in_capsule_max = info.in_capsule_bytes();
                connect_queue(&mut q, subnqn, opts, qid, depth, cntlid, 0)?;
                io_queues.push(q);
            }
        }
        let admin = Arc::new(Mutex::new(admin_q));
        let keepalive_stop = Arc::new(AtomicBool::new(false));
        let keepalive = (opts.kato_ms > 0).then(|| {
            let (admin, stop) = (admin.clone(), keepalive_stop.clone());
            let period = Duration::from_millis((opts.kato_ms / 3).max(100) as u64);
            std::thread::Builder::new()
                .name("nvme-keepalive".into())
                .spawn(move || keepalive_loop(admin, stop, period))
                .ok()
        });
        Ok(Controller {
            admin,
            cntlid,
            info,
            addr,
            subnqn: subnqn.to_string(),
            io_queues,
            keepalive_stop,
            keepalive: keepalive.flatten(),
        })
    }

    /// Runs an admin command and returns its response (status not checked).
    pub fn admin(&self, cmd: Command, data: Vec<u8>, dir: DataDirection) -> Result<Response> {
        let mut q = self.admin.lock().map_err(|_| HostError::Protocol("admin queue poisoned".into()))?;
        q.execute(cmd, data, dir)
    }

    pub fn identify_namespace(&self, nsid: u32) -> Result<NamespaceIdentity> {
        let r = self.admin(identify_cmd(cns::NAMESPACE, nsid), vec![0; 4096], DataDirection::ControllerToHost)?;
        r.ok()?;
        NamespaceIdentity::decode(&r.data)
            .ok_or_else(|| HostError::Protocol(format!("namespace {nsid} has no valid format")))
    }

    pub fn active_namespaces(&self) -> Result<Vec<u32>> {
        let r = self.admin(identify_cmd(cns::ACTIVE_NAMESPACES, 0), vec![0; 4096], DataDirection::ControllerToHost)?;
        r.ok()?;
        Ok(identify::decode_active_namespaces(&r.data))
    }

    pub fn get_log_page(&self, lid: u8, len: usize, offset: u64) -> Result<Vec<u8>> {
        let r = self.admin(get_log_page_cmd(lid, len, offset), vec![0; len], DataDirection::ControllerToHost)?;
        r.ok()?;
        Ok(r.data)
    }

    /// Get Log Page with a log specific parameter (`lsp`, CDW10 bits 11:8) and Retain
    /// Asynchronous Event (`rae`, bit 15): reading a log with RAE clear re-arms the events
    /// that it reports.
    pub fn get_log_page_with(&self, lid: u8, len: usize, offset: u64, lsp: u8, rae: bool) -> Result<Vec<u8>> {
        let mut c = get_log_page_cmd(lid, len, offset);
        c.set_cdw(10, c.cdw(10) | ((lsp & 0xF) as u32) << 8 | (rae as u32) << 15);
        let r = self.admin(c, vec![0; len], DataDirection::ControllerToHost)?;
        r.ok()?;
        Ok(r.data)
    }

    /// Reads and decodes the Asymmetric Namespace Access log (RAE clear, as Linux reads it).
    pub fn ana_log(&self, groups_only: bool) -> Result<AnaLog> {
        let b = self.get_log_page_with(log_page::lid::ANA, ANA_LOG_BYTES, 0, groups_only as u8, false)?;
        AnaLog::decode(&b).map_err(HostError::Protocol)
    }

    /// Set Features `fid` to `value` (CDW11); returns DW0 of the completion.
    pub fn set_feature(&self, fid: u8, value: u32) -> Result<u32> {
        let mut c = Command::new(admin::SET_FEATURES, 0);
        c.set_cdw(10, fid as u32).set_cdw(11, value);
        let r = self.admin(c, vec![], DataDirection::None)?;
        r.ok()?;
        Ok(r.completion.dw0)
    }

    /// Sends an Asynchronous Event Request and returns at once; the controller answers it when
    /// an event occurs (see `wait_async_event`). One is outstanding at a time.
    pub fn request_async_event(&self) -> Result<()> {
        let mut q = self.admin.lock().map_err(|_| HostError::Protocol("admin queue poisoned".into()))?;
        q.submit(Command::new(admin::ASYNC_EVENT_REQUEST, 0), vec![], DataDirection::None, AER_TAG)?;
        let mut out = Vec::new();
        q.poll(&mut out)?;
        if let Some(r) = out.into_iter().find(|r| r.tag == AER_TAG) {
            // Answered at once (an event was already pending, or the request was refused).
            r.ok()?;
            return Err(HostError::Protocol(format!("AER answered at once: DW0 {:#x}", r.completion.dw0)));
        }
        Ok(())
    }

    /// Waits up to `timeout` for the outstanding Asynchronous Event Request to complete;
    /// returns its DW0 (type, information, log page: `log_page::async_event::decode`), or
    /// `None` when no event came.
    pub fn wait_async_event(&self, timeout: Duration) -> Result<Option<u32>> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let mut q = self.admin.lock().map_err(|_| HostError::Protocol("admin queue poisoned".into()))?;
                let mut out = Vec::new();
                q.poll(&mut out)?;
                let found = out.into_iter().find(|r| r.tag == AER_TAG).or_else(|| q.take_finished(AER_TAG));
                if let Some(r) = found {
                    r.ok()?;
                    return Ok(Some(r.completion.dw0));
                }
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn io_queue(&mut self, i: usize) -> &mut QueuePair {
        &mut self.io_queues[i]
    }

    /// Hands the I/O queues to the caller (e.g. one per worker thread).
    pub fn take_io_queues(&mut self) -> Vec<QueuePair> {
        std::mem::take(&mut self.io_queues)
    }

    /// Stops keep-alive (so a test can watch the target's keep-alive timer expire).
    pub fn stop_keepalive(&mut self) {
        self.keepalive_stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.keepalive.take() {
            let _ = h.join();
        }
    }

    /// Normal shutdown: CC.SHN = 01b, wait for CSTS.SHST = complete, close the connections.
    pub fn shutdown(mut self) -> Result<()> {
        self.stop_keepalive();
        self.io_queues.clear();
        let mut q = self.admin.lock().map_err(|_| HostError::Protocol("admin queue poisoned".into()))?;
        let cc_val = property(&mut q, prop::CC, None)? as u32;
        property(&mut q, prop::CC, Some(((cc_val & !cc::SHN_MASK) | (1 << cc::SHN_SHIFT)) as u64))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = property(&mut q, prop::CSTS, None)? as u32;
            if s & (0x3 << 2) == csts::SHST_COMPLETE {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(HostError::Timeout(10_000));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.stop_keepalive();
    }
}

fn keepalive_loop(admin: Arc<Mutex<QueuePair>>, stop: Arc<AtomicBool>, period: Duration) {
    let mut last = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
        if last.elapsed() < period {
            continue;
        }
        last = Instant::now();
        let Ok(mut q) = admin.lock() else { return };
        if q.execute(Command::new(admin::KEEP_ALIVE, 0), vec![], DataDirection::None).is_err() {
            return;
        }
    }
}

/// Fabrics Connect on an open queue pair; returns the controller id.
pub fn connect_queue(
    q: &mut QueuePair,
    subnqn: &str,
    opts: &HostOptions,
    qid: u16,
    depth: u16,
    cntlid: u16,
    kato_ms: u32,
) -> Result<u16> {
    let c = Connect {
        qid,
        // `depth` commands outstanding need depth + 1 entries; SQSIZE is 0-based.
        sqsize: depth,
        cattr: if qid > 0 && opts.disable_sqflow { 1 << 2 } else { 0 },
        kato_ms,
        host_id: opts.host_id,
        cntlid,
        subnqn: subnqn.to_string(),
        hostnqn: opts.hostnqn.clone(),
    };
    let (cmd, data) = c.encode(0);
    let r = q.execute_in_capsule(cmd, data)?;
    r.ok()?;
    Ok(r.completion.dw0 as u16)
}

fn property(q: &mut QueuePair, offset: u32, set: Option<u64>) -> Result<u64> {
    let wide = offset == prop::CAP;
    let cmd = match set {
        Some(v) => fabrics::property_set(0, offset, v, wide),
        None => fabrics::property_get(0, offset, wide),
    };
    let r = q.execute(cmd, vec![], DataDirection::None)?;
    r.ok()?;
    Ok(r.completion.result64())
}

pub fn identify_cmd(cns: u8, nsid: u32) -> Command {
    let mut c = Command::new(admin::IDENTIFY, 0);
    c.set_nsid(nsid).set_cdw(10, cns as u32);
    c
}

pub fn get_log_page_cmd(lid: u8, len: usize, offset: u64) -> Command {
    let numd = (len / 4).saturating_sub(1) as u32;
    let mut c = Command::new(admin::GET_LOG_PAGE, 0);
    c.set_nsid(0xFFFF_FFFF)
        .set_cdw(10, lid as u32 | (numd & 0xFFFF) << 16)
        .set_cdw(11, numd >> 16)
        .set_cdw(12, offset as u32)
        .set_cdw(13, (offset >> 32) as u32);
    c
}

/// Reads the whole discovery log of the discovery controller at `addr`.
pub fn discover(addr: SocketAddr, opts: &HostOptions) -> Result<Vec<DiscoveryEntry>> {
    let o = HostOptions { io_queues: 0, kato_ms: 0, ..opts.clone() };
    let ctrl = Controller::connect(addr, DISCOVERY_NQN, &o)?;
    let head = ctrl.get_log_page(log_page::lid::DISCOVERY, log_page::DISCOVERY_HEADER_BYTES, 0)?;
    let (_, _) =
        log_page::decode_discovery_log(&head).ok_or_else(|| HostError::Protocol("short discovery log".into()))?;
    let numrec = u64::from_le_bytes(head[8..16].try_into().unwrap_or([0; 8])) as usize;
    let total = log_page::DISCOVERY_HEADER_BYTES + numrec.min(1024) * log_page::DISCOVERY_ENTRY_BYTES;
    let full = ctrl.get_log_page(log_page::lid::DISCOVERY, total, 0)?;
    let (_, entries) =
        log_page::decode_discovery_log(&full).ok_or_else(|| HostError::Protocol("short discovery log".into()))?;
    let _ = ctrl.shutdown();
    Ok(entries)
}
