//! The YAML configuration of `stagerd`: what the daemon listens on, which subsystems and
//! namespaces it exports, and the limits it advertises to hosts.
//!
//! It is shaped as two passes over one set of plain structs. Parsing (serde) checks only the
//! shape of the file — types, unknown keys (`deny_unknown_fields` everywhere, so a typo is an
//! error naming the key rather than a silently ignored setting), sizes written as `64MiB`. Then
//! [`Config::validate`] checks every value and every cross-reference (unique names, listener
//! references, host access, CPU numbers on this machine) and names the offending key by its path,
//! e.g. `subsystems[0].namespaces[1].backend.size`. Both passes return a [`ConfigError`] whose
//! message starts with the file name, so an operator can fix a file from the message alone;
//! nothing in here panics on what a file contains.
//!
//! YAML is read with `serde_yaml_ng`: `serde_yaml` is deprecated and unmaintained upstream, and
//! `serde_yaml_ng` is a maintained fork with the same serde data model and API, so the structs
//! here are plain serde derives and its errors already carry a key path and a line and column.
//!
//! `stagerd --config FILE` runs [`load`]; `stagerd --check-config FILE` runs [`load`], prints
//! the error if any and exits; with no `--config` the daemon runs [`embedded_default`].
//! docs/configuration.md is the reference of every key for operators.

// `x % n != 0` rather than `is_multiple_of`, which needs Rust 1.87; the workspace's
// rust-version is 1.85.
#![allow(clippy::manual_is_multiple_of)]

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use stager_nvme::bdev::vfio::{check_bound, pci_address};
use stager_nvme::bdev::DeviceSpec;
use stager_policy::WritePolicy;

mod ana;
mod cluster;
pub use ana::{AnaConfig, AnaGroupConfig};
pub use cluster::{steered_ana_groups, unsteered_ana_groups, ClusterYaml, CLUSTER_BUILT};

/// Largest configuration file we read. A real one is a few KiB; the cap keeps a mistaken
/// `--config /dev/zero` (or a huge log file) from eating memory before parsing fails.
pub const CONFIG_FILE_BYTES_MAX: u64 = 1 << 20;

/// Highest namespace id a subsystem may use. Bounds the per-subsystem namespace table
/// (one slot per possible nsid) and the Identify active namespace list (1024 ids = 4 KiB).
pub const NSID_MAX: u32 = 1024;

/// Longest NQN the NVMe base specification allows, in bytes (the field is 256 bytes,
/// NUL-terminated, and the spec caps the name itself at 223).
pub const NQN_BYTES_MAX: usize = 223;

/// Identify Controller's serial number field width (SN, bytes 4..24).
pub const SERIAL_CHARS_MAX: usize = 20;

/// Identify Controller's model number field width (MN, bytes 24..64).
pub const MODEL_CHARS_MAX: usize = 40;

/// Longest busy-poll window after the last work before a reactor sleeps. Longer than a second
/// only burns a core on an idle target, which the design rules out.
pub const IDLE_POLL_US_MAX: u64 = 1_000_000;

/// Logical block sizes a namespace may have: what Linux initiators and our flash drivers handle.
pub const BLOCK_SIZES: [u32; 2] = [512, 4096];

/// `in_capsule_data_bytes` upper bound: every queue slot reserves this much buffer at start-up.
const IN_CAPSULE_DATA_BYTES_MAX: u32 = 128 << 10;
/// MDTS and H2C data lengths come in whole 4 KiB memory pages (CAP.MPSMIN = 4 KiB).
const PAGE_BYTES: u32 = 4096;
/// Largest I/O (MDTS) and H2CData PDU: one buffer of this size per in-flight command.
const IO_BYTES_MAX: u32 = stager_nvme::constants::IO_BYTES_MAX as u32;
const QUEUE_DEPTH_MAX: u16 = stager_nvme::constants::QUEUE_DEPTH_MAX as u16;
const IO_QUEUES_MAX: u16 = 64;
/// Range of the transport's handshake and stalled-PDU timeouts: shorter would cut off hosts on
/// a slow network, longer lets dead connections hold their buffers for hours.
const TIMEOUT_MS_MIN: u32 = 100;
const TIMEOUT_MS_MAX: u32 = 3_600_000;
// The casts above must not truncate the NVMe layer's limits.
const _: () = assert!(stager_nvme::constants::IO_BYTES_MAX <= u32::MAX as usize);
const _: () = assert!(stager_nvme::constants::QUEUE_DEPTH_MAX <= u16::MAX as usize);

const LOG_LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];

/// The origin named in messages about [`embedded_default`].
pub const EMBEDDED_ORIGIN: &str = "(built-in default configuration)";

// ---------------------------------------------------------------------------------------------
// The configuration
// ---------------------------------------------------------------------------------------------

/// Everything `stagerd` reads from its configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub reactors: ReactorConfig,
    #[serde(default)]
    pub logging: LoggingConfig,
    #[serde(default)]
    pub transport: TransportConfig,
    /// At least one is required (checked by `validate`, for a clearer message than serde's).
    #[serde(default)]
    pub listeners: Vec<ListenerConfig>,
    /// May be empty: the target then serves only discovery, which tests use.
    #[serde(default)]
    pub subsystems: Vec<SubsystemConfig>,
    /// Local flash devices that hold write-back logs and read caches of `kind: volume`
    /// namespaces. Several volumes may share one device.
    #[serde(default)]
    pub flash: Vec<FlashConfig>,
    #[serde(default)]
    pub destage: DestageConfig,
    #[serde(default)]
    pub management: ManagementConfig,
    /// This node in a cluster: its id, fault domain, replication fabric and peers. Needed for
    /// write-back+1/+2 volumes (on their source) and to keep copies for peers (on replicas).
    #[serde(default)]
    pub node: Option<NodeConfig>,
    /// Asymmetric Namespace Access: this node's controller ids and ANA transition time
    /// (`config/ana.rs`).
    #[serde(default)]
    pub ana: AnaConfig,
    /// Cluster state in etcd (stager-cluster): this node registers itself under a lease. Needs
    /// `node:` and a stagerd built with the `cluster` feature. Without it the node needs no etcd.
    #[serde(default)]
    pub cluster: Option<ClusterYaml>,
}

/// This node and how it reaches its peers for replication.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Unique in the cluster: letters, digits, `.`, `_`, `-`; at most 31 bytes (it is written
    /// into the flash superblock of every replica that keeps a copy for this node).
    pub id: String,
    /// Where this node fails together with others (a rack, a power feed); replicas belong in
    /// other fault domains.
    #[serde(default)]
    pub fault_domain: Option<String>,
    pub fabric: FabricYaml,
    /// The nodes this one replicates to or keeps copies for. Any other node is refused.
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    /// The flash device that keeps copies for peers (the first `flash` device when left out).
    #[serde(default)]
    pub replica_flash: Option<String>,
    /// The iSCSI initiator IQN this node logs in to other nodes' volumes' SANs with: to probe
    /// whether it could destage a copy, and to destage one (a rescue). `DEFAULT_INITIATOR_IQN`
    /// when left out.
    #[serde(default)]
    pub san_initiator: Option<String>,
}

impl NodeConfig {
    /// The IQN this node logs in to other nodes' volumes' SANs with.
    pub fn san_initiator(&self) -> &str {
        self.san_initiator.as_deref().unwrap_or(DEFAULT_INITIATOR_IQN)
    }
}

/// An iSCSI initiator IQN as stagerd accepts one.
fn check_iqn(key: String, iqn: &str) -> Result<(), Problem> {
    if !iqn.starts_with("iqn.") || iqn.len() > 223 {
        return Err(problem(key, format!("`{iqn}` is not an iSCSI IQN")));
    }
    Ok(())
}

/// The replication fabric (`node.fabric`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FabricYaml {
    /// `tcp` (default: one-sided writes in software over TCP) or `verbs` (RDMA RC queue pairs;
    /// needs a stagerd built with the `verbs` feature and an RDMA device).
    #[serde(default)]
    pub kind: FabricKindYaml,
    /// The set-up listener peers connect to (both kinds; verbs exchanges queue-pair addresses
    /// over it).
    pub listen: SocketAddr,
    /// Verbs: the RDMA device (e.g. `rxe0`); the first one when left out.
    #[serde(default)]
    pub device: Option<String>,
    /// The cluster secret nodes authenticate each other with (HMAC challenge in both
    /// directions when a link is set up). At least 16 bytes. Or `secret_file`.
    #[serde(default)]
    pub secret: Option<String>,
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// A peer silent this long is down.
    #[serde(default = "default_peer_timeout_ms")]
    pub peer_timeout_ms: u64,
    /// Each replicated volume's record ring on each replica (replica memory, registered for
    /// RDMA): bounds the data on its way to a replica.
    #[serde(default = "default_ring_size", deserialize_with = "de_size")]
    pub ring_size: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum FabricKindYaml {
    #[default]
    #[serde(rename = "tcp")]
    Tcp,
    #[serde(rename = "verbs")]
    Verbs,
}

/// A peer node (`node.peers[]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub id: String,
    /// Its fabric set-up listener.
    pub address: SocketAddr,
    #[serde(default)]
    pub fault_domain: Option<String>,
}

fn default_peer_timeout_ms() -> u64 {
    5000
}

fn default_ring_size() -> u64 {
    32 << 20
}

/// Shortest cluster secret accepted.
pub const SECRET_BYTES_MIN: usize = 16;

impl FabricYaml {
    /// The secret's bytes (from `secret` or the first line of `secret_file`).
    pub fn secret_bytes(&self) -> Result<Vec<u8>, String> {
        match (&self.secret, &self.secret_file) {
            (Some(s), None) => Ok(s.as_bytes().to_vec()),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read the secret file {}: {e}", path.display()))?;
                Ok(text.lines().next().unwrap_or("").trim().as_bytes().to_vec())
            }
            (Some(_), Some(_)) => Err("give `secret` or `secret_file`, not both".into()),
            (None, None) => Err("needs `secret` or `secret_file` (the cluster secret nodes authenticate with)".into()),
        }
    }
}

/// A local flash device: a file or block device, an NVMe namespace through io_uring
/// passthrough, or an NVMe controller on the VFIO userspace driver.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlashConfig {
    /// What volumes refer to this device by.
    pub name: String,
    /// The driver; `file` when left out.
    #[serde(default)]
    pub kind: DeviceKind,
    /// The file or block device (`file`), or the namespace's generic device `/dev/ngXnY`
    /// (`nvme-passthru`). Not for `vfio`.
    #[serde(default)]
    pub path: PathBuf,
    /// The PCI address of an NVMe controller bound to vfio-pci (`vfio` only).
    #[serde(default)]
    pub pci: Option<String>,
    /// Create or extend a file to this size; without it the current size is used (`file` only).
    #[serde(default, deserialize_with = "de_opt_size")]
    pub size: Option<u64>,
    /// Share of the device kept for clean cached blocks (read acceleration); the rest is log.
    /// Fixed when the device is formatted.
    #[serde(default = "default_cache_percent")]
    pub cache_percent: u32,
    /// O_DIRECT (default).
    #[serde(default = "default_true")]
    pub direct: bool,
}

fn default_cache_percent() -> u32 {
    25
}

/// Which driver a local device is on (`kind:` of a flash device or namespace backend).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum DeviceKind {
    /// A file or block device through io_uring, O_DIRECT.
    #[default]
    #[serde(rename = "file")]
    File,
    /// An NVMe namespace's generic character device through io_uring passthrough.
    #[serde(rename = "nvme-passthru")]
    NvmePassthru,
    /// An NVMe controller bound to vfio-pci, driven by Stager's userspace driver.
    #[serde(rename = "vfio")]
    Vfio,
}

impl FlashConfig {
    /// The device to open (4 KiB blocks: the log's unit). Call after validation, which makes
    /// sure the keys the kind needs are there.
    pub fn device(&self) -> DeviceSpec {
        let block_size = VOLUME_BLOCK_SIZE;
        match self.kind {
            DeviceKind::File => {
                DeviceSpec::File { path: self.path.clone(), size_bytes: self.size, block_size, direct: self.direct }
            }
            DeviceKind::NvmePassthru => DeviceSpec::NvmePassthru { path: self.path.clone(), block_size },
            DeviceKind::Vfio => {
                let pci = self.pci.clone().unwrap_or_default();
                DeviceSpec::Vfio { pci: pci_address(&pci).unwrap_or(pci), block_size }
            }
        }
    }
}

fn default_true() -> bool {
    true
}

/// The node's destage reactor: the thread that owns every flash device's write-back engine,
/// writes their logs and destages them to the SANs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DestageConfig {
    /// CPU to pin it to; unpinned when left out.
    pub core: Option<usize>,
    /// Busy-poll this long after its last work before it sleeps.
    pub idle_poll_us: u64,
    /// How long a write-back write waits for log space when the log is full before it goes
    /// write-through instead.
    pub log_full_wait_ms: u64,
    /// The deadline of every SAN command (and of a login): a SAN that answers none within it
    /// is declared unreachable, its commands fail, and it is logged in to again with back-off.
    /// Host commands that need the SAN are answered within `log_full_wait_ms` +
    /// 3 × `san_timeout_ms` at most (a retryable status if the SAN is still away).
    pub san_timeout_ms: u64,
}

/// `destage.san_timeout_ms` when left out.
pub const SAN_TIMEOUT_MS_DEFAULT: u64 = 5000;
/// Its bounds: shorter mistakes a busy SAN for a dead one; longer leaves hosts (whose own
/// command timeout is 30 s on Linux) without an answer.
pub const SAN_TIMEOUT_MS_MIN: u64 = 100;
pub const SAN_TIMEOUT_MS_MAX: u64 = 60_000;

impl Default for DestageConfig {
    fn default() -> Self {
        DestageConfig { core: None, idle_poll_us: 200, log_full_wait_ms: 5000, san_timeout_ms: SAN_TIMEOUT_MS_DEFAULT }
    }
}

/// The management socket `stagerctl` talks to (status, live policy changes).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ManagementConfig {
    /// A Unix socket path; no management socket when left out.
    pub socket: Option<PathBuf>,
}

/// The polling threads, one pinned per listed CPU.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReactorConfig {
    /// CPU ids (as the kernel numbers them) to run one reactor each on.
    pub cores: Vec<usize>,
    /// How long a reactor keeps busy-polling after its last piece of work before it sleeps in
    /// the kernel until an event arrives: the trade between latency and an idle target's CPU use.
    pub idle_poll_us: u64,
}

impl Default for ReactorConfig {
    fn default() -> Self {
        ReactorConfig { cores: vec![0], idle_poll_us: 1000 }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingConfig {
    /// One of `error`, `warn`, `info`, `debug`, `trace`. A `RUST_LOG` filter, when set,
    /// overrides it (the daemon decides that; this is just the configured level).
    pub level: String,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig { level: "info".to_string() }
    }
}

/// Limits the target advertises to hosts and sizes its buffers by. Every queue slot reserves
/// buffers at start-up, so these numbers are also the memory budget.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransportConfig {
    /// Entries per queue (admin and I/O) a host may ask for (CAP.MQES + 1).
    pub max_queue_depth: u16,
    /// I/O queues per controller a host may create (Set Features / Number of Queues).
    pub max_io_queues: u16,
    /// Data a host may put inside a command capsule (IOCCSZ); larger writes go through R2T.
    #[serde(deserialize_with = "de_size_u32")]
    pub in_capsule_data_bytes: u32,
    /// Largest H2CData PDU the host may send (MAXH2CDATA in the ICResp).
    #[serde(deserialize_with = "de_size_u32")]
    pub max_h2c_data_bytes: u32,
    /// Largest data transfer of one command (MDTS).
    #[serde(deserialize_with = "de_size_u32")]
    pub max_io_bytes: u32,
    /// Keep-alive timeout applied when the host's Connect asks for none; 0 disables it.
    pub keep_alive_timeout_ms: u32,
    /// A connection that has not finished its handshake (ICReq, then Fabrics Connect) this
    /// long after it was accepted is closed.
    pub handshake_timeout_ms: u32,
    /// A connection that stops in the middle of a PDU (part of it received, or R2T data
    /// requested and not sent) for this long is closed.
    pub pdu_timeout_ms: u32,
    /// Zero-copy sends of read data (`IORING_OP_SENDMSG_ZC`): `auto` uses them on connections
    /// that do not come over loopback (where the kernel copies anyway), `on` everywhere,
    /// `off` never.
    pub zero_copy_send: ZeroCopySend,
    /// When a successful read ends with a C2HData carrying SUCCESS instead of a response
    /// capsule: `when_sq_flow_off` only on queues whose host disabled SQ flow control, as the
    /// NVMe/TCP specification has it (the Linux target does the same); `always` on every queue,
    /// as SPDK's target does by default (its `c2h_success`). Such a read reports no SQHD.
    pub c2h_success: C2hSuccess,
}

/// When a read is answered by its data alone; see `TransportConfig::c2h_success`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum C2hSuccess {
    #[default]
    WhenSqFlowOff,
    Always,
}

/// When read data is sent without a copy; see `TransportConfig::zero_copy_send`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ZeroCopySend {
    #[default]
    Auto,
    On,
    Off,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            max_queue_depth: 128,
            max_io_queues: 8,
            in_capsule_data_bytes: 8192,
            max_h2c_data_bytes: 128 << 10,
            max_io_bytes: 1 << 20,
            keep_alive_timeout_ms: 120_000,
            handshake_timeout_ms: 10_000,
            pdu_timeout_ms: 30_000,
            zero_copy_send: ZeroCopySend::Auto,
            c2h_success: C2hSuccess::WhenSqFlowOff,
        }
    }
}

/// One socket the target accepts host connections on.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// What subsystems refer to this listener by.
    pub name: String,
    #[serde(default)]
    pub transport: TransportKind,
    /// IP address and port, e.g. `0.0.0.0:4420` or `[::1]:4420`. Host names are not resolved:
    /// a listener must not depend on DNS at start-up. Port 0 lets the kernel pick one (tests).
    #[serde(deserialize_with = "de_socket_addr")]
    pub address: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// NVMe/TCP (NVMe-oF TCP transport binding). RDMA comes later.
    #[default]
    Tcp,
}

impl TransportKind {
    /// The spelling used in the file and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Tcp => "tcp",
        }
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One NVM subsystem: an NQN hosts connect to, who may connect, and its namespaces.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "SubsystemSpec")]
pub struct SubsystemConfig {
    pub nqn: String,
    /// Identify Controller SN. When the file gives none it is derived from the NQN (see
    /// [`derived_serial`]), so it stays the same across restarts: hosts and multipath use
    /// it to recognise the same subsystem.
    pub serial: String,
    /// Identify Controller MN.
    pub model: String,
    /// Lets any host NQN connect. Defaults to false and must be written out to be true,
    /// so an export is never open to everyone by omission.
    pub allow_any_host: bool,
    /// Host NQNs allowed to connect when `allow_any_host` is false.
    pub hosts: Vec<String>,
    /// Names of the listeners this subsystem is reachable through; empty means all of them.
    pub listeners: Vec<String>,
    /// May be empty: a subsystem without namespaces still accepts connections.
    pub namespaces: Vec<NamespaceConfig>,
    /// ANA groups and their states on this node; none = one optimized group with every
    /// namespace (`config/ana.rs`).
    pub ana_groups: Vec<AnaGroupConfig>,
}

/// The shape of a subsystem in the file; only `serial` differs (optional there, derived here).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubsystemSpec {
    nqn: String,
    #[serde(default)]
    serial: Option<String>,
    #[serde(default = "default_model")]
    model: String,
    #[serde(default)]
    allow_any_host: bool,
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    listeners: Vec<String>,
    #[serde(default)]
    namespaces: Vec<NamespaceConfig>,
    #[serde(default)]
    ana_groups: Vec<AnaGroupConfig>,
}

fn default_model() -> String {
    "Stager".to_string()
}

impl From<SubsystemSpec> for SubsystemConfig {
    fn from(s: SubsystemSpec) -> Self {
        let serial = s.serial.unwrap_or_else(|| derived_serial(&s.nqn));
        SubsystemConfig {
            nqn: s.nqn,
            serial,
            model: s.model,
            allow_any_host: s.allow_any_host,
            hosts: s.hosts,
            listeners: s.listeners,
            namespaces: s.namespaces,
            ana_groups: s.ana_groups,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceConfig {
    /// 1..=NSID_MAX, unique within the subsystem.
    pub nsid: u32,
    pub backend: BackendConfig,
    /// Fixed namespace UUID (`xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`). Without it the UUID is
    /// derived from the subsystem NQN and nsid ([`NamespaceConfig::effective_uuid`]), stable
    /// across restarts. Set it when moving a namespace to another NQN without hosts noticing.
    #[serde(default)]
    pub uuid: Option<String>,
}

impl NamespaceConfig {
    /// The UUID the namespace reports in Identify: the configured one, else the derived one.
    /// Call after [`Config::validate`], which rejects a malformed `uuid`; should one slip
    /// through anyway, the derived UUID is used rather than failing here.
    pub fn effective_uuid(&self, subsystem_nqn: &str) -> [u8; 16] {
        self.uuid.as_deref().and_then(parse_uuid).unwrap_or_else(|| derived_namespace_uuid(subsystem_nqn, self.nsid))
    }
}

/// Where a namespace keeps its blocks. In YAML a mapping with a `kind` key:
/// `backend: { kind: memory, size: 64MiB, block_size: 4096 }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendConfig {
    /// RAM, zero-filled at start, lost at exit: tests and benchmarks of the front end.
    Memory { size_bytes: u64, block_size: u32 },
    /// A regular file or block device, driven through io_uring.
    File {
        path: PathBuf,
        /// Create or extend the file to this size at start-up. Required when the file does
        /// not exist yet; without it the file's (or device's) current size is used.
        size_bytes: Option<u64>,
        block_size: u32,
        /// Open with O_DIRECT, bypassing the page cache (default): the page cache would both
        /// double-buffer and hide whether a write is really on the device.
        direct: bool,
    },
    /// An NVMe namespace's generic device (`/dev/ngXnY`), raw NVMe commands through io_uring.
    NvmePassthru { path: PathBuf, block_size: u32 },
    /// An NVMe controller bound to vfio-pci (its first active namespace), on Stager's driver.
    Vfio { pci: String, block_size: u32 },
    /// A write-back volume: writes are acknowledged from a log on local `flash` and destaged
    /// to the volume's SAN LUN; reads are served from flash when it holds the block.
    Volume {
        /// Stable identity of the volume, written into the flash log; unique in the file.
        id: u32,
        /// Name of a `flash` device.
        flash: String,
        policy: WritePolicy,
        /// Keep clean copies of SAN reads on flash.
        read_cache: bool,
        san: SanConfig,
        /// Exported size; the SAN LUN's size when left out.
        size_bytes: Option<u64>,
        /// write-back+N: the peer nodes that keep a copy of every dirty entry (N of them).
        replicas: Vec<String>,
    },
    /// In a cluster: another node's volume `id`, served from here only while the cluster makes
    /// this node serve it — its owner was lost and this node's copy of it was destaged to the
    /// SAN (the rescue). Until then the namespace's path is `inaccessible`; while served it is
    /// write-through to the volume's SAN. Same subsystem NQN, NSID and size as on the owner, so
    /// hosts see one namespace through two paths (ANA multipath).
    Standby { id: u32, size_bytes: u64 },
}

/// Where a volume's data finally lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SanConfig {
    /// A file or block device (O_DIRECT unless `direct: false`).
    File { path: PathBuf, size_bytes: Option<u64>, direct: bool },
    /// An iSCSI LUN through libiscsi: `iscsi://HOST[:PORT]/TARGET-IQN/LUN`.
    Iscsi { url: String, initiator: String },
}

/// The initiator IQN stagerd logs in to SANs with unless a volume names another.
pub const DEFAULT_INITIATOR_IQN: &str = "iqn.2026-11.dev.stager:stagerd";

/// The shape of `backend.san` in the file (flat, for the same reason as [`BackendSpec`]).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SanSpec {
    kind: SanKind,
    #[serde(default)]
    path: Option<PathBuf>,
    #[serde(default)]
    size: Option<ByteSize>,
    #[serde(default)]
    direct: Option<bool>,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    initiator: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum SanKind {
    File,
    Iscsi,
}

impl TryFrom<SanSpec> for SanConfig {
    type Error = String;
    fn try_from(s: SanSpec) -> Result<Self, String> {
        match s.kind {
            SanKind::File => {
                if s.url.is_some() || s.initiator.is_some() {
                    return Err("`san.url` and `san.initiator` apply only to `kind: iscsi`".into());
                }
                let path = s.path.ok_or("`san: { kind: file }` needs `path`")?;
                Ok(SanConfig::File { path, size_bytes: s.size.map(|b| b.0), direct: s.direct.unwrap_or(true) })
            }
            SanKind::Iscsi => {
                if s.path.is_some() || s.size.is_some() || s.direct.is_some() {
                    return Err("`san.path`, `san.size` and `san.direct` apply only to `kind: file`".into());
                }
                let url = s.url.ok_or("`san: { kind: iscsi }` needs `url: iscsi://HOST[:PORT]/TARGET-IQN/LUN`")?;
                Ok(SanConfig::Iscsi { url, initiator: s.initiator.unwrap_or_else(|| DEFAULT_INITIATOR_IQN.into()) })
            }
        }
    }
}

impl<'de> Deserialize<'de> for SanConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SanVisitor;
        impl<'de> Visitor<'de> for SanVisitor {
            type Value = SanConfig;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a SAN mapping such as { kind: file, path: san.img, size: 1GiB }")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<SanConfig, A::Error> {
                let spec = SanSpec::deserialize(de::value::MapAccessDeserializer::new(map))?;
                SanConfig::try_from(spec).map_err(de::Error::custom)
            }
        }
        d.deserialize_map(SanVisitor)
    }
}

impl BackendConfig {
    pub fn block_size(&self) -> u32 {
        match self {
            BackendConfig::Memory { block_size, .. }
            | BackendConfig::File { block_size, .. }
            | BackendConfig::NvmePassthru { block_size, .. }
            | BackendConfig::Vfio { block_size, .. } => *block_size,
            BackendConfig::Volume { .. } | BackendConfig::Standby { .. } => VOLUME_BLOCK_SIZE,
        }
    }

    /// The spelling of the `kind` key.
    pub fn kind(&self) -> &'static str {
        match self {
            BackendConfig::Memory { .. } => "memory",
            BackendConfig::File { .. } => "file",
            BackendConfig::NvmePassthru { .. } => "nvme-passthru",
            BackendConfig::Vfio { .. } => "vfio",
            BackendConfig::Volume { .. } => "volume",
            BackendConfig::Standby { .. } => "standby",
        }
    }

    /// The local device a `file`, `nvme-passthru` or `vfio` backend opens.
    pub fn device(&self) -> Option<DeviceSpec> {
        Some(match self {
            BackendConfig::File { path, size_bytes, block_size, direct } => DeviceSpec::File {
                path: path.clone(),
                size_bytes: *size_bytes,
                block_size: *block_size,
                direct: *direct,
            },
            BackendConfig::NvmePassthru { path, block_size } => {
                DeviceSpec::NvmePassthru { path: path.clone(), block_size: *block_size }
            }
            BackendConfig::Vfio { pci, block_size } => {
                DeviceSpec::Vfio { pci: pci_address(pci).unwrap_or_else(|_| pci.clone()), block_size: *block_size }
            }
            BackendConfig::Memory { .. } | BackendConfig::Volume { .. } | BackendConfig::Standby { .. } => return None,
        })
    }
}

/// The shape of a backend in the file. It is flat rather than a serde-tagged enum because
/// serde buffers tagged enums before deserializing the variant, which loses the key path and
/// line of errors inside it; flat, `backend.size: ...` errors point at the right line.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendSpec {
    kind: BackendKind,
    #[serde(default)]
    size: Option<ByteSize>,
    #[serde(default)]
    block_size: Option<ByteSize32>,
    #[serde(default)]
    path: Option<PathBuf>,
    #[serde(default)]
    pci: Option<String>,
    #[serde(default)]
    direct: Option<bool>,
    #[serde(default)]
    id: Option<u32>,
    #[serde(default)]
    flash: Option<String>,
    /// Parsed where it is read; a bad one is reported naming the key.
    #[serde(default, deserialize_with = "de_opt_policy")]
    policy: Option<(WritePolicy, usize)>,
    #[serde(default)]
    replicas: Option<Vec<String>>,
    #[serde(default)]
    read_cache: Option<bool>,
    #[serde(default)]
    san: Option<SanConfig>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum BackendKind {
    Memory,
    File,
    #[serde(rename = "nvme-passthru")]
    NvmePassthru,
    Vfio,
    Volume,
    Standby,
}

/// Volumes have 4 KiB blocks: the write-back log's unit (see stager_policy::constants).
pub const VOLUME_BLOCK_SIZE: u32 = stager_policy::constants::BLOCK_SIZE as u32;

const DEFAULT_BLOCK_SIZE: u32 = 4096;

impl<'de> Deserialize<'de> for BackendConfig {
    /// Not `#[serde(try_from)]`: a conversion error raised after the mapping is read would be
    /// reported at the namespace. Converting inside the map visitor puts `backend` in the path.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct BackendVisitor;
        impl<'de> Visitor<'de> for BackendVisitor {
            type Value = BackendConfig;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a backend mapping such as { kind: memory, size: 64MiB }")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<BackendConfig, A::Error> {
                let spec = BackendSpec::deserialize(de::value::MapAccessDeserializer::new(map))?;
                BackendConfig::try_from(spec).map_err(de::Error::custom)
            }
        }
        d.deserialize_map(BackendVisitor)
    }
}

impl TryFrom<BackendSpec> for BackendConfig {
    type Error = String;

    fn try_from(s: BackendSpec) -> Result<Self, String> {
        let block_size = s.block_size.as_ref().map_or(DEFAULT_BLOCK_SIZE, |b| b.0);
        if !matches!(s.kind, BackendKind::Volume) {
            let volume_keys = [
                ("id", s.id.is_some() && !matches!(s.kind, BackendKind::Standby)),
                ("flash", s.flash.is_some()),
                ("policy", s.policy.is_some()),
                ("replicas", s.replicas.is_some()),
                ("read_cache", s.read_cache.is_some()),
                ("san", s.san.is_some()),
            ];
            if let Some((key, _)) = volume_keys.iter().find(|(_, set)| *set) {
                return Err(format!("`{key}` applies only to `kind: volume`"));
            }
        }
        if s.pci.is_some() && !matches!(s.kind, BackendKind::Vfio) {
            return Err("`pci` applies only to `kind: vfio`".into());
        }
        match s.kind {
            BackendKind::Volume => {
                if s.path.is_some() || s.direct.is_some() {
                    return Err("a volume keeps its data on `flash` and `san`; `path` and `direct` do not apply".into());
                }
                if let Some(b) = s.block_size.as_ref().filter(|b| b.0 != VOLUME_BLOCK_SIZE) {
                    return Err(format!(
                        "`block_size` {} does not fit a volume: volumes have {VOLUME_BLOCK_SIZE}-byte blocks \
                         (the flash log's unit); leave it out",
                        b.0
                    ));
                }
                let (policy, copies) = s.policy.unwrap_or((WritePolicy::WriteBack, 0));
                let replicas = s.replicas.unwrap_or_default();
                if replicas.len() != copies {
                    return Err(if copies == 0 {
                        format!(
                            "`replicas` names {} node(s) but the policy keeps no copies; use `policy: write-back+{}`",
                            replicas.len(),
                            replicas.len()
                        )
                    } else {
                        format!(
                            "`policy: write-back+{copies}` needs `replicas` naming {copies} peer node(s), it names {}",
                            replicas.len()
                        )
                    });
                }
                Ok(BackendConfig::Volume {
                    id: s.id.ok_or("`kind: volume` needs `id` (a number, unique in the file)")?,
                    flash: s.flash.ok_or("`kind: volume` needs `flash` (the name of a `flash` device)")?,
                    policy,
                    read_cache: s.read_cache.unwrap_or(true),
                    san: s.san.ok_or("`kind: volume` needs `san` (e.g. `san: { kind: file, path: san.img }`)")?,
                    size_bytes: s.size.map(|b| b.0),
                    replicas,
                })
            }
            BackendKind::Standby => {
                if s.path.is_some() || s.direct.is_some() || s.block_size.is_some() {
                    return Err("a standby namespace serves another node's volume: only `id` and `size` apply".into());
                }
                Ok(BackendConfig::Standby {
                    id: s.id.ok_or("`kind: standby` needs `id`, the volume it stands by for")?,
                    size_bytes: s.size.ok_or("`kind: standby` needs `size`, the volume's size on its owner")?.0,
                })
            }
            BackendKind::Memory => {
                if s.path.is_some() || s.direct.is_some() {
                    let key = if s.path.is_some() { "path" } else { "direct" };
                    return Err(format!("`{key}` applies only to `kind: file`"));
                }
                let size = s.size.ok_or("`kind: memory` needs `size` (e.g. `size: 64MiB`)")?;
                Ok(BackendConfig::Memory { size_bytes: size.0, block_size })
            }
            BackendKind::NvmePassthru => {
                if s.size.is_some() || s.direct.is_some() {
                    let key = if s.size.is_some() { "size" } else { "direct" };
                    return Err(format!(
                        "`{key}` applies only to `kind: file` (an NVMe namespace has the size it was formatted with)"
                    ));
                }
                let path = s
                    .path
                    .ok_or("`kind: nvme-passthru` needs `path`, the namespace's generic device (e.g. /dev/ng0n1)")?;
                Ok(BackendConfig::NvmePassthru { path, block_size })
            }
            BackendKind::Vfio => {
                if s.path.is_some() || s.size.is_some() || s.direct.is_some() {
                    let key = if s.path.is_some() {
                        "path"
                    } else if s.size.is_some() {
                        "size"
                    } else {
                        "direct"
                    };
                    return Err(format!("`{key}` does not apply to `kind: vfio` (it names its controller by `pci`)"));
                }
                let pci = s.pci.ok_or("`kind: vfio` needs `pci`, the controller's PCI address (e.g. 0000:00:04.0)")?;
                Ok(BackendConfig::Vfio { pci, block_size })
            }
            BackendKind::File => {
                let path = s.path.ok_or("`kind: file` needs `path`")?;
                Ok(BackendConfig::File {
                    path,
                    size_bytes: s.size.map(|b| b.0),
                    block_size,
                    direct: s.direct.unwrap_or(true),
                })
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// A configuration that cannot be used. Every message starts with the file it came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{origin}: cannot read: {source}")]
    Read {
        origin: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}: larger than {CONFIG_FILE_BYTES_MAX} bytes, not a stagerd configuration")]
    TooLarge { origin: String },
    #[error("{origin}: holds no configuration (the file is empty or only comments)")]
    Empty { origin: String },
    /// The text is not YAML, or not the shape of a configuration (wrong type, unknown key,
    /// missing key). `message` starts with the key path when the YAML reader knows it.
    #[error("{origin}{}: {message}", location_suffix(*.line, *.column))]
    Parse {
        origin: String,
        /// 1-based, when known.
        line: Option<usize>,
        /// 1-based, when known.
        column: Option<usize>,
        message: String,
    },
    /// A well-formed file with a value that is not allowed, or keys that contradict each other.
    #[error("{origin}: {key}: {message}")]
    Invalid {
        origin: String,
        /// Path of the offending key, e.g. `subsystems[0].namespaces[1].backend.size`.
        key: String,
        message: String,
    },
}

fn location_suffix(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(":{l}:{c}"),
        (Some(l), None) => format!(":{l}"),
        _ => String::new(),
    }
}

impl ConfigError {
    /// The key path an `Invalid` error is about.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// What `validate` finds wrong, before the origin is attached.
struct Problem {
    key: String,
    message: String,
}

fn problem(key: impl Into<String>, message: impl Into<String>) -> Problem {
    Problem { key: key.into(), message: message.into() }
}

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

/// Reads, parses and validates the configuration file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let origin = path.display().to_string();
    let read_err = |source| ConfigError::Read { origin: origin.clone(), source };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut bytes = Vec::new();
    // One byte past the cap tells "exactly the cap" from "larger".
    file.take(CONFIG_FILE_BYTES_MAX + 1).read_to_end(&mut bytes).map_err(read_err)?;
    if bytes.len() as u64 > CONFIG_FILE_BYTES_MAX {
        return Err(ConfigError::TooLarge { origin });
    }
    let text = String::from_utf8(bytes).map_err(|e| ConfigError::Parse {
        origin: origin.clone(),
        line: None,
        column: None,
        message: format!("not UTF-8 text (invalid byte at offset {})", e.utf8_error().valid_up_to()),
    })?;
    parse(&text, &origin)
}

/// Parses and validates configuration text. `origin` names it in messages (the file name).
/// Validation includes the checks that depend on this machine (CPU ids, existing files).
pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
    let config = parse_shape(text, origin)?;
    config.validate(origin)?;
    Ok(config)
}

/// Parsing without validation: types, unknown keys, sizes.
fn parse_shape(text: &str, origin: &str) -> Result<Config, ConfigError> {
    let config: Config = serde_yaml_ng::from_str(text).map_err(|e| yaml_error(e, origin))?;
    // Every section has a default, so an empty document parses as an all-default config;
    // say what really happened instead of complaining that no listener is configured.
    if config == Config::empty() {
        if let Ok(serde_yaml_ng::Value::Null) = serde_yaml_ng::from_str(text) {
            return Err(ConfigError::Empty { origin: origin.to_string() });
        }
    }
    Ok(config)
}

fn yaml_error(e: serde_yaml_ng::Error, origin: &str) -> ConfigError {
    let location = e.location();
    // serde says "unit value" for a key written with nothing after it (`size:`).
    let mut message = e.to_string().replace("invalid type: unit value", "invalid type: empty value");
    // serde_yaml_ng appends " at line L column C"; we put the position up front instead,
    // in the `file:line:column:` form editors and terminals jump to.
    if let Some(loc) = &location {
        let suffix = format!(" at line {} column {}", loc.line(), loc.column());
        message = message.replacen(&suffix, "", 1);
    }
    ConfigError::Parse {
        origin: origin.to_string(),
        line: location.as_ref().map(|l| l.line()),
        column: location.as_ref().map(|l| l.column()),
        message,
    }
}

/// The configuration used when `stagerd` is started without `--config`: a single-node target
/// on loopback exporting one 1 GiB file-backed namespace to any host, so a first run needs
/// no file at all.
pub fn embedded_default() -> Config {
    Config {
        reactors: ReactorConfig::default(),
        logging: LoggingConfig::default(),
        transport: TransportConfig::default(),
        listeners: vec![ListenerConfig {
            name: "tcp0".to_string(),
            transport: TransportKind::Tcp,
            address: SocketAddr::from(([127, 0, 0, 1], 4420)),
        }],
        subsystems: vec![SubsystemSpec {
            nqn: "nqn.2026-11.dev.stager:default".to_string(),
            serial: None,
            model: default_model(),
            allow_any_host: true,
            hosts: Vec::new(),
            listeners: Vec::new(),
            namespaces: vec![NamespaceConfig {
                nsid: 1,
                backend: BackendConfig::Volume {
                    id: 1,
                    flash: "flash0".to_string(),
                    policy: WritePolicy::WriteBack,
                    read_cache: true,
                    san: SanConfig::File {
                        path: PathBuf::from("./stager-data/san1.img"),
                        size_bytes: Some(1 << 30),
                        direct: true,
                    },
                    size_bytes: None,
                    replicas: Vec::new(),
                },
                uuid: None,
            }],
            ana_groups: Vec::new(),
        }
        .into()],
        flash: vec![FlashConfig {
            name: "flash0".to_string(),
            kind: DeviceKind::File,
            path: PathBuf::from("./stager-data/flash0.img"),
            pci: None,
            size: Some(256 << 20),
            cache_percent: default_cache_percent(),
            direct: true,
        }],
        destage: DestageConfig::default(),
        management: ManagementConfig { socket: Some(PathBuf::from(DEFAULT_MANAGEMENT_SOCKET)) },
        node: None,
        ana: AnaConfig::default(),
        cluster: None,
    }
}

/// Where the embedded default's management socket is (and where `stagerctl` looks first).
pub const DEFAULT_MANAGEMENT_SOCKET: &str = "./stager-data/stagerd.sock";

impl Config {
    /// What an empty document deserializes to.
    fn empty() -> Config {
        Config {
            reactors: ReactorConfig::default(),
            logging: LoggingConfig::default(),
            transport: TransportConfig::default(),
            listeners: Vec::new(),
            subsystems: Vec::new(),
            flash: Vec::new(),
            destage: DestageConfig::default(),
            management: ManagementConfig::default(),
            node: None,
            ana: AnaConfig::default(),
            cluster: None,
        }
    }

    /// Checks every value and cross-reference; the error names `origin` and the key path.
    /// Reads this machine's usable CPUs (the calling thread's affinity mask, so call it before
    /// pinning) and the metadata of file backends given without a size.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        self.validate_for_cpus(origin, &usable_cpus())
    }

    fn validate_for_cpus(&self, origin: &str, cpus: &[usize]) -> Result<(), ConfigError> {
        self.check(cpus).map_err(|p| ConfigError::Invalid {
            origin: origin.to_string(),
            key: p.key,
            message: p.message,
        })
    }

    fn check(&self, cpus: &[usize]) -> Result<(), Problem> {
        check_reactors(&self.reactors, cpus)?;
        check_logging(&self.logging)?;
        check_transport(&self.transport)?;
        check_listeners(&self.listeners)?;
        let mut files: HashMap<PathBuf, String> = HashMap::new();
        check_flash(&self.flash, &mut files)?;
        check_destage(&self.destage, cpus)?;
        check_subsystems(&self.subsystems, &self.listeners, &self.flash, &mut files)?;
        ana::check_ana(self)?;
        check_node(self)?;
        cluster::check_cluster(self)
    }
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

/// A node id: what replicas record in their superblocks.
fn check_node_id(key: &str, id: &str) -> Result<(), Problem> {
    let ok = !id.is_empty()
        && id.len() <= stager_policy::log::superblock::NODE_NAME_MAX
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(problem(
            key,
            format!(
                "{id:?} is not a node id: 1 to {} letters, digits, `.`, `_` or `-`",
                stager_policy::log::superblock::NODE_NAME_MAX
            ),
        ))
    }
}

fn check_node(c: &Config) -> Result<(), Problem> {
    let mut replicated: Vec<(String, &Vec<String>)> = Vec::new();
    for (si, s) in c.subsystems.iter().enumerate() {
        for (ni, n) in s.namespaces.iter().enumerate() {
            if let BackendConfig::Volume { replicas, .. } = &n.backend {
                if !replicas.is_empty() {
                    replicated.push((format!("subsystems[{si}].namespaces[{ni}].backend.replicas"), replicas));
                }
            }
        }
    }
    let Some(node) = &c.node else {
        if let Some((key, _)) = replicated.first() {
            return Err(problem(
                key.clone(),
                "a replicated volume needs a `node:` section (this node's id, its fabric and its peers)",
            ));
        }
        return Ok(());
    };
    check_node_id("node.id", &node.id)?;
    if let Some(iqn) = &node.san_initiator {
        check_iqn("node.san_initiator".into(), iqn)?;
    }
    let mut seen = HashSet::new();
    for (i, p) in node.peers.iter().enumerate() {
        let key = format!("node.peers[{i}].id");
        check_node_id(&key, &p.id)?;
        if p.id == node.id {
            return Err(problem(key, format!("{:?} is this node's own id", p.id)));
        }
        if !seen.insert(p.id.as_str()) {
            return Err(problem(key, format!("peer {:?} is listed twice", p.id)));
        }
        if p.address == node.fabric.listen {
            return Err(problem(format!("node.peers[{i}].address"), "is this node's own fabric listener"));
        }
    }
    if !node.peers.is_empty() {
        match node.fabric.secret_bytes() {
            Err(e) => return Err(problem("node.fabric", e)),
            Ok(s) if s.len() < SECRET_BYTES_MIN => {
                return Err(problem(
                    "node.fabric.secret",
                    format!("is {} bytes; at least {SECRET_BYTES_MIN} are needed", s.len()),
                ))
            }
            Ok(_) => {}
        }
    }
    if node.fabric.kind == FabricKindYaml::Verbs && !stager_rdma::VERBS_BUILT {
        return Err(problem(
            "node.fabric.kind",
            "verbs: this stagerd was built without the `verbs` feature (rdma-core); rebuild with \
             --features stager-target/verbs, or use `kind: tcp`",
        ));
    }
    if !(100..=600_000).contains(&node.fabric.peer_timeout_ms) {
        return Err(problem("node.fabric.peer_timeout_ms", "must be from 100 to 600000"));
    }
    let ring_min = stager_policy::RING_BYTES_MIN;
    if node.fabric.ring_size < ring_min || node.fabric.ring_size > (1 << 30) {
        return Err(problem(
            "node.fabric.ring_size",
            format!("{} is out of range {ring_min}..=1GiB", node.fabric.ring_size),
        ));
    }
    if let Some(f) = &node.replica_flash {
        if !c.flash.iter().any(|d| &d.name == f) {
            return Err(problem("node.replica_flash", format!("no `flash` device is named {f:?}")));
        }
    }
    for (key, replicas) in replicated {
        let mut mine = HashSet::new();
        for r in replicas {
            if r == &node.id {
                return Err(problem(key, format!("{r:?} is this node: a replica must be another node")));
            }
            if !node.peers.iter().any(|p| &p.id == r) {
                return Err(problem(key, format!("{r:?} is not in `node.peers`")));
            }
            if !mine.insert(r) {
                return Err(problem(key, format!("{r:?} is named twice: each copy must be on another node")));
            }
        }
    }
    Ok(())
}

fn check_reactors(r: &ReactorConfig, cpus: &[usize]) -> Result<(), Problem> {
    if r.cores.is_empty() {
        return Err(problem("reactors.cores", "must list at least one CPU to run a reactor on"));
    }
    let mut seen = HashSet::new();
    for (i, &core) in r.cores.iter().enumerate() {
        let key = format!("reactors.cores[{i}]");
        if !seen.insert(core) {
            return Err(problem(key, format!("CPU {core} is listed twice; one reactor per CPU")));
        }
        if !cpus.contains(&core) {
            return Err(problem(
                key,
                format!(
                    "CPU {core} is not available to stagerd on this machine (usable CPUs: {})",
                    cpu_list_text(cpus)
                ),
            ));
        }
    }
    if r.idle_poll_us > IDLE_POLL_US_MAX {
        return Err(problem(
            "reactors.idle_poll_us",
            format!(
                "{} is more than {IDLE_POLL_US_MAX} (1 s): an idle target would keep its cores busy",
                r.idle_poll_us
            ),
        ));
    }
    Ok(())
}

fn check_logging(l: &LoggingConfig) -> Result<(), Problem> {
    if !LOG_LEVELS.contains(&l.level.as_str()) {
        return Err(problem(
            "logging.level",
            format!("`{}` is not a level; use one of {}", l.level, LOG_LEVELS.join(", ")),
        ));
    }
    Ok(())
}

fn check_transport(t: &TransportConfig) -> Result<(), Problem> {
    let qd = t.max_queue_depth;
    if !(2..=QUEUE_DEPTH_MAX).contains(&qd) {
        return Err(problem(
            "transport.max_queue_depth",
            format!("{qd} is out of range 2..={QUEUE_DEPTH_MAX} (a queue needs 2 entries to hold 1 command)"),
        ));
    }
    if !(1..=IO_QUEUES_MAX).contains(&t.max_io_queues) {
        return Err(problem(
            "transport.max_io_queues",
            format!("{} is out of range 1..={IO_QUEUES_MAX}", t.max_io_queues),
        ));
    }
    let icd = t.in_capsule_data_bytes;
    if icd > IN_CAPSULE_DATA_BYTES_MAX || icd % 16 != 0 {
        return Err(problem(
            "transport.in_capsule_data_bytes",
            format!(
                "{icd} must be a multiple of 16 from 0 to {IN_CAPSULE_DATA_BYTES_MAX} \
                 (IOCCSZ counts 16-byte units)"
            ),
        ));
    }
    let h2c = t.max_h2c_data_bytes;
    if h2c < PAGE_BYTES || h2c % PAGE_BYTES != 0 || h2c > IO_BYTES_MAX {
        return Err(problem(
            "transport.max_h2c_data_bytes",
            format!("{h2c} must be a multiple of {PAGE_BYTES} from {PAGE_BYTES} to {IO_BYTES_MAX}"),
        ));
    }
    for (key, ms) in [("handshake_timeout_ms", t.handshake_timeout_ms), ("pdu_timeout_ms", t.pdu_timeout_ms)] {
        if !(TIMEOUT_MS_MIN..=TIMEOUT_MS_MAX).contains(&ms) {
            return Err(problem(
                format!("transport.{key}"),
                format!("{ms} is out of range {TIMEOUT_MS_MIN}..={TIMEOUT_MS_MAX} (100 ms to 1 hour)"),
            ));
        }
    }
    let io = t.max_io_bytes;
    if io < PAGE_BYTES || !io.is_power_of_two() || io > IO_BYTES_MAX {
        return Err(problem(
            "transport.max_io_bytes",
            format!(
                "{io} must be a power of two from {PAGE_BYTES} to {IO_BYTES_MAX} \
                 (MDTS is a power-of-two number of 4 KiB pages)"
            ),
        ));
    }
    Ok(())
}

fn check_listeners(listeners: &[ListenerConfig]) -> Result<(), Problem> {
    if listeners.is_empty() {
        return Err(problem(
            "listeners",
            "at least one listener is needed, e.g. `- { name: tcp0, address: 127.0.0.1:4420 }`",
        ));
    }
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (i, l) in listeners.iter().enumerate() {
        if let Err(why) = check_name(&l.name) {
            return Err(problem(format!("listeners[{i}].name"), why));
        }
        if let Some(first) = names.insert(&l.name, i) {
            return Err(problem(
                format!("listeners[{i}].name"),
                format!("`{}` is already the name of listeners[{first}]", l.name),
            ));
        }
        for (j, earlier) in listeners[..i].iter().enumerate() {
            if addresses_clash(earlier.address, l.address) {
                return Err(problem(
                    format!("listeners[{i}].address"),
                    format!(
                        "{} overlaps listeners[{j}] ({}): both cannot listen on one port",
                        l.address, earlier.address
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Two listeners that would fail to bind together: same port and family, and the same IP or
/// either a wildcard. Port 0 asks the kernel for a free port, so it never clashes.
fn addresses_clash(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Listener names appear in logs, metrics labels and the management API.
fn check_name(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || name.len() > 64 || !name.chars().all(ok_char) {
        return Err(format!("`{name}` must be 1 to 64 characters of letters, digits, `-`, `_` or `.`"));
    }
    Ok(())
}

fn check_flash(flash: &[FlashConfig], files: &mut HashMap<PathBuf, String>) -> Result<(), Problem> {
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (i, f) in flash.iter().enumerate() {
        let at = format!("flash[{i}]");
        check_name(&f.name).map_err(|why| problem(format!("{at}.name"), why))?;
        if let Some(first) = names.insert(&f.name, i) {
            return Err(problem(format!("{at}.name"), format!("`{}` is already the name of flash[{first}]", f.name)));
        }
        if f.cache_percent > FLASH_CACHE_PERCENT_MAX {
            return Err(problem(
                format!("{at}.cache_percent"),
                format!("{} is more than {FLASH_CACHE_PERCENT_MAX}: the log needs the rest", f.cache_percent),
            ));
        }
        match f.kind {
            DeviceKind::File => {
                if f.pci.is_some() {
                    return Err(problem(format!("{at}.pci"), "applies only to `kind: vfio`"));
                }
                check_path(&f.path, f.size, VOLUME_BLOCK_SIZE, &format!("{at}.path"), &at, files)?;
            }
            DeviceKind::NvmePassthru | DeviceKind::Vfio => {
                let key = if f.size.is_some() {
                    Some("size")
                } else if !f.direct {
                    Some("direct")
                } else {
                    None
                };
                if let Some(key) = key {
                    return Err(problem(format!("{at}.{key}"), "applies only to `kind: file`"));
                }
                if f.kind == DeviceKind::NvmePassthru {
                    if f.pci.is_some() {
                        return Err(problem(format!("{at}.pci"), "applies only to `kind: vfio`"));
                    }
                    check_passthru(&f.path, &at, files)?;
                } else {
                    if !f.path.as_os_str().is_empty() {
                        return Err(problem(
                            format!("{at}.path"),
                            "does not apply to `kind: vfio` (it names its controller by `pci`)",
                        ));
                    }
                    check_vfio(f.pci.as_deref(), &at, files)?;
                }
            }
        }
        if let Some(size) = f.size {
            if size % u64::from(VOLUME_BLOCK_SIZE) != 0 || size < FLASH_BYTES_MIN {
                return Err(problem(
                    format!("{at}.size"),
                    format!("{size} bytes: a flash device needs a multiple of 4 KiB and at least {FLASH_BYTES_MIN}"),
                ));
            }
        }
    }
    Ok(())
}

/// Largest clean-cache share of a flash device.
pub const FLASH_CACHE_PERCENT_MAX: u32 = 90;
/// Smallest flash device: the log must hold a few of the largest entries (stager_policy).
pub const FLASH_BYTES_MIN: u64 = 16 << 20;

fn check_destage(d: &DestageConfig, cpus: &[usize]) -> Result<(), Problem> {
    if let Some(core) = d.core {
        if !cpus.contains(&core) {
            return Err(problem(
                "destage.core",
                format!(
                    "CPU {core} is not available to stagerd on this machine (usable CPUs: {})",
                    cpu_list_text(cpus)
                ),
            ));
        }
    }
    if d.idle_poll_us > IDLE_POLL_US_MAX {
        return Err(problem(
            "destage.idle_poll_us",
            format!("{} is more than {IDLE_POLL_US_MAX} (1 s)", d.idle_poll_us),
        ));
    }
    if !(SAN_TIMEOUT_MS_MIN..=SAN_TIMEOUT_MS_MAX).contains(&d.san_timeout_ms) {
        return Err(problem(
            "destage.san_timeout_ms",
            format!(
                "{} is outside {SAN_TIMEOUT_MS_MIN}..={SAN_TIMEOUT_MS_MAX} (milliseconds each SAN command may take \
                 before the SAN counts as unreachable)",
                d.san_timeout_ms
            ),
        ));
    }
    Ok(())
}

/// The generic device of `kind: nvme-passthru`: a character device, on a kernel whose io_uring
/// takes the 128-byte entries NVMe passthrough needs; not used twice.
fn check_passthru(path: &Path, at: &str, files: &mut HashMap<PathBuf, String>) -> Result<(), Problem> {
    let key = format!("{at}.path");
    if path.as_os_str().is_empty() {
        return Err(problem(
            key,
            "`kind: nvme-passthru` needs `path`, the namespace's generic device (e.g. /dev/ng0n1)",
        ));
    }
    let meta = std::fs::metadata(path).map_err(|e| {
        problem(
            &key,
            format!("{}: {e} (the nvme driver makes /dev/ngXnY for each namespace; ls /dev/ng*)", path.display()),
        )
    })?;
    if !std::os::unix::fs::FileTypeExt::is_char_device(&meta.file_type()) {
        return Err(problem(
            key,
            format!(
                "{} is not a character device: nvme-passthru needs the namespace's generic device /dev/ngXnY \
                 (for a block device such as /dev/nvme0n1 use `kind: file`)",
                path.display()
            ),
        ));
    }
    stager_nvme::bdev::passthru_supported()
        .map_err(|why| problem(format!("{at}.kind"), format!("nvme-passthru: {why}")))?;
    let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    if let Some(first) = files.insert(canon, at.to_string()) {
        return Err(problem(key, format!("{} is also used by {first}", path.display())));
    }
    Ok(())
}

/// The controller of `kind: vfio`: a PCI address, an NVMe controller there bound to vfio-pci
/// (the message says how to bind it otherwise), not used twice.
fn check_vfio(pci: Option<&str>, at: &str, files: &mut HashMap<PathBuf, String>) -> Result<(), Problem> {
    let key = format!("{at}.pci");
    let pci =
        pci.ok_or_else(|| problem(&key, "`kind: vfio` needs `pci`, the controller's PCI address (e.g. 0000:00:04.0)"))?;
    let pci = pci_address(pci).map_err(|why| problem(&key, why))?;
    check_bound(&pci).map_err(|why| problem(&key, why))?;
    if let Some(first) = files.insert(PathBuf::from(format!("/sys/bus/pci/devices/{pci}")), at.to_string()) {
        return Err(problem(key, format!("{pci} is also used by {first}")));
    }
    Ok(())
}

/// A path used by a backend, flash device or SAN file: not empty, existing when no size is
/// given, and not used twice.
fn check_path(
    path: &Path,
    size: Option<u64>,
    block_size: u32,
    key: &str,
    at: &str,
    files: &mut HashMap<PathBuf, String>,
) -> Result<(), Problem> {
    if path.as_os_str().is_empty() {
        return Err(problem(key, "is empty"));
    }
    if size.is_none() {
        check_existing_file(path, block_size, at)?;
    }
    // Lexically different paths may still be the same file; canonicalize what exists.
    let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    if let Some(first) = files.insert(canon, at.to_string()) {
        return Err(problem(key, format!("{} is also used by {first}", path.display())));
    }
    Ok(())
}

fn check_subsystems(
    subsystems: &[SubsystemConfig],
    listeners: &[ListenerConfig],
    flash: &[FlashConfig],
    files: &mut HashMap<PathBuf, String>,
) -> Result<(), Problem> {
    let mut nqns: HashMap<&str, usize> = HashMap::new();
    // Namespace UUIDs and backing files are global: a UUID seen twice makes multipath merge
    // two different namespaces, a file used twice has two namespaces overwrite each other.
    let mut uuids: HashMap<[u8; 16], String> = HashMap::new();
    let mut volume_ids: HashMap<u32, String> = HashMap::new();
    let mut per_flash: HashMap<String, usize> = HashMap::new();
    for (i, s) in subsystems.iter().enumerate() {
        let at = format!("subsystems[{i}]");
        check_nqn(&s.nqn).map_err(|why| problem(format!("{at}.nqn"), why))?;
        if s.nqn == stager_nvme::DISCOVERY_NQN {
            return Err(problem(
                format!("{at}.nqn"),
                "is the discovery subsystem's NQN, which stagerd serves by itself",
            ));
        }
        if let Some(first) = nqns.insert(&s.nqn, i) {
            return Err(problem(format!("{at}.nqn"), format!("`{}` is already the NQN of subsystems[{first}]", s.nqn)));
        }
        check_identify_text(&s.serial, SERIAL_CHARS_MAX).map_err(|why| problem(format!("{at}.serial"), why))?;
        check_identify_text(&s.model, MODEL_CHARS_MAX).map_err(|why| problem(format!("{at}.model"), why))?;
        check_hosts(s, &at)?;
        let mut named = HashSet::new();
        for (j, name) in s.listeners.iter().enumerate() {
            let key = format!("{at}.listeners[{j}]");
            if !listeners.iter().any(|l| &l.name == name) {
                let known: Vec<&str> = listeners.iter().map(|l| l.name.as_str()).collect();
                return Err(problem(key, format!("no listener is named `{name}` (listeners: {})", known.join(", "))));
            }
            if !named.insert(name) {
                return Err(problem(key, format!("`{name}` is listed twice")));
            }
        }
        let mut nsids: HashMap<u32, usize> = HashMap::new();
        for (j, ns) in s.namespaces.iter().enumerate() {
            let at_ns = format!("{at}.namespaces[{j}]");
            if !(1..=NSID_MAX).contains(&ns.nsid) {
                return Err(problem(format!("{at_ns}.nsid"), format!("{} is out of range 1..={NSID_MAX}", ns.nsid)));
            }
            if let Some(first) = nsids.insert(ns.nsid, j) {
                return Err(problem(
                    format!("{at_ns}.nsid"),
                    format!("{} is already used by {at}.namespaces[{first}]", ns.nsid),
                ));
            }
            if let Some(text) = &ns.uuid {
                match parse_uuid(text) {
                    None => {
                        return Err(problem(
                            format!("{at_ns}.uuid"),
                            format!("`{text}` is not a UUID like 6f1c2d3e-0000-4000-8000-00000000abcd"),
                        ))
                    }
                    Some(u) if u == [0; 16] => {
                        return Err(problem(format!("{at_ns}.uuid"), "the nil UUID means \"no UUID\" to hosts"))
                    }
                    Some(_) => {}
                }
            }
            let uuid = ns.effective_uuid(&s.nqn);
            if let Some(first) = uuids.insert(uuid, at_ns.clone()) {
                return Err(problem(
                    format!("{at_ns}.uuid"),
                    format!("{} is also the UUID of {first}", format_uuid(&uuid)),
                ));
            }
            let at_b = format!("{at_ns}.backend");
            check_backend(&ns.backend, &at_b, files)?;
            if let BackendConfig::Standby { id, .. } = &ns.backend {
                if let Some(first) = volume_ids.insert(*id, at_b.clone()) {
                    return Err(problem(format!("{at_b}.id"), format!("volume {id} is also {first}")));
                }
            }
            if let BackendConfig::Volume { id, flash: dev, .. } = &ns.backend {
                if let Some(first) = volume_ids.insert(*id, at_b.clone()) {
                    return Err(problem(format!("{at_b}.id"), format!("volume {id} is also {first}")));
                }
                let on_device = per_flash.entry(dev.clone()).or_insert(0usize);
                *on_device += 1;
                if *on_device > stager_policy::constants::VOLUMES_PER_DEVICE_MAX {
                    return Err(problem(
                        format!("{at_b}.flash"),
                        format!(
                            "more than {} volumes on flash device `{dev}` (its superblock has room for {0})",
                            stager_policy::constants::VOLUMES_PER_DEVICE_MAX
                        ),
                    ));
                }
                if !flash.iter().any(|f| &f.name == dev) {
                    let known: Vec<&str> = flash.iter().map(|f| f.name.as_str()).collect();
                    return Err(problem(
                        format!("{at_b}.flash"),
                        format!(
                            "no flash device is named `{dev}` (flash: {})",
                            if known.is_empty() { "none configured".to_string() } else { known.join(", ") }
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

fn check_hosts(s: &SubsystemConfig, at: &str) -> Result<(), Problem> {
    if s.allow_any_host && !s.hosts.is_empty() {
        return Err(problem(
            format!("{at}.hosts"),
            "is ignored when allow_any_host is true: remove the list, or set allow_any_host: false",
        ));
    }
    if !s.allow_any_host && s.hosts.is_empty() {
        return Err(problem(
            format!("{at}.allow_any_host"),
            "no host could connect: list hosts, or set allow_any_host: true",
        ));
    }
    let mut seen = HashSet::new();
    for (j, host) in s.hosts.iter().enumerate() {
        let key = format!("{at}.hosts[{j}]");
        check_nqn(host).map_err(|why| problem(key.clone(), why))?;
        if !seen.insert(host) {
            return Err(problem(key, format!("`{host}` is listed twice")));
        }
    }
    Ok(())
}

fn check_backend(b: &BackendConfig, at: &str, files: &mut HashMap<PathBuf, String>) -> Result<(), Problem> {
    let block_size = b.block_size();
    if !BLOCK_SIZES.contains(&block_size) {
        return Err(problem(format!("{at}.block_size"), format!("{block_size} is not 512 or 4096")));
    }
    let check_size = |size: u64| {
        if size == 0 || size % u64::from(block_size) != 0 {
            return Err(problem(
                format!("{at}.size"),
                format!("{size} bytes is not a positive multiple of block_size {block_size}"),
            ));
        }
        Ok(())
    };
    match b {
        BackendConfig::Memory { size_bytes, .. } => check_size(*size_bytes),
        BackendConfig::File { path, size_bytes, .. } => {
            if let Some(size) = size_bytes {
                check_size(*size)?;
            }
            check_path(path, *size_bytes, block_size, &format!("{at}.path"), at, files)
        }
        BackendConfig::NvmePassthru { path, .. } => check_passthru(path, at, files),
        BackendConfig::Vfio { pci, .. } => check_vfio(Some(pci), at, files),
        BackendConfig::Standby { id, size_bytes } => {
            if *id == 0 {
                return Err(problem(format!("{at}.id"), "0 is reserved; volume ids start at 1"));
            }
            check_size(*size_bytes)
        }
        BackendConfig::Volume { id, size_bytes, san, .. } => {
            if *id == 0 {
                return Err(problem(format!("{at}.id"), "0 is reserved; volume ids start at 1"));
            }
            if let Some(size) = size_bytes {
                check_size(*size)?;
            }
            match san {
                SanConfig::File { path, size_bytes, .. } => {
                    if let Some(size) = size_bytes {
                        if size % u64::from(VOLUME_BLOCK_SIZE) != 0 || *size == 0 {
                            return Err(problem(
                                format!("{at}.san.size"),
                                format!("{size} bytes is not a positive multiple of {VOLUME_BLOCK_SIZE}"),
                            ));
                        }
                    }
                    check_path(
                        path,
                        *size_bytes,
                        VOLUME_BLOCK_SIZE,
                        &format!("{at}.san.path"),
                        &format!("{at}.san"),
                        files,
                    )
                }
                SanConfig::Iscsi { url, initiator } => {
                    if !cfg!(feature = "iscsi") {
                        return Err(problem(
                            format!("{at}.san.kind"),
                            "iscsi: this stagerd was built without the `iscsi` feature (libiscsi); \
                             rebuild with `--features stager-target/iscsi` (scripts/test does)",
                        ));
                    }
                    crate::san::IscsiUrl::parse(url).map_err(|why| {
                        problem(
                            format!("{at}.san.url"),
                            format!("`{url}`: {why} (expected iscsi://HOST[:PORT]/TARGET-IQN/LUN)"),
                        )
                    })?;
                    check_iqn(format!("{at}.san.initiator"), initiator)
                }
            }
        }
    }
}

/// A file backend without `size` is used at its current size, so it must already exist.
/// Block devices report length 0 in metadata; their size is checked when they are opened.
fn check_existing_file(path: &Path, block_size: u32, at: &str) -> Result<(), Problem> {
    let meta = std::fs::metadata(path).map_err(|e| {
        let why = if e.kind() == std::io::ErrorKind::NotFound {
            "does not exist; give `size` to have stagerd create it".to_string()
        } else {
            format!("cannot be inspected: {e}")
        };
        problem(format!("{at}.path"), format!("{}: {why}", path.display()))
    })?;
    if meta.is_dir() {
        return Err(problem(format!("{at}.path"), format!("{} is a directory", path.display())));
    }
    if meta.is_file() && (meta.len() == 0 || meta.len() % u64::from(block_size) != 0) {
        return Err(problem(
            format!("{at}.path"),
            format!(
                "{} is {} bytes, not a positive multiple of block_size {block_size}; give `size` to extend it",
                path.display(),
                meta.len()
            ),
        ));
    }
    Ok(())
}

fn check_nqn(nqn: &str) -> Result<(), String> {
    let b = nqn.as_bytes();
    let dated = b.len() > 12
        && b.starts_with(b"nqn.")
        && b[4..8].iter().all(u8::is_ascii_digit)
        && b[8] == b'-'
        && b[9..11].iter().all(u8::is_ascii_digit)
        && b[11] == b'.';
    if !dated {
        return Err(format!("`{nqn}` is not an NVMe Qualified Name: expected nqn.yyyy-mm.reverse.domain:name"));
    }
    if nqn.len() > NQN_BYTES_MAX {
        return Err(format!("is {} bytes long; an NQN has at most {NQN_BYTES_MAX}", nqn.len()));
    }
    if nqn.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("`{}` contains white space or control characters", nqn.escape_debug()));
    }
    Ok(())
}

/// Serial and model numbers go into space-padded ASCII identify fields, so leading or trailing
/// spaces would not survive the trip and other characters cannot be encoded.
fn check_identify_text(text: &str, max: usize) -> Result<(), String> {
    if text.is_empty()
        || text.len() > max
        || !text.bytes().all(|c| (0x20..=0x7e).contains(&c))
        || text.starts_with(' ')
        || text.ends_with(' ')
    {
        return Err(format!(
            "`{}` must be 1 to {max} printable ASCII characters without leading or trailing spaces",
            text.escape_debug()
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// This machine
// ---------------------------------------------------------------------------------------------

/// CPUs this process may run on: the ones reactor pinning (core_affinity) will accept. This is
/// the affinity mask rather than `0..available_parallelism()`, because under a cpuset
/// (containers, `taskset`) the usable CPU ids need not start at 0 or be contiguous.
fn usable_cpus() -> Vec<usize> {
    match core_affinity::get_core_ids() {
        Some(ids) if !ids.is_empty() => ids.into_iter().map(|c| c.id).collect(),
        _ => (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect(),
    }
}

/// `0-3,6,8-9`, like the kernel's cpulist format.
fn cpu_list_text(cpus: &[usize]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        parts.push(if start == end { start.to_string() } else { format!("{start}-{end}") });
        i += 1;
    }
    if parts.is_empty() {
        "none".to_string()
    } else {
        parts.join(",")
    }
}

// ---------------------------------------------------------------------------------------------
// Sizes
// ---------------------------------------------------------------------------------------------

/// A byte count written as an integer (`4096`) or a string with a binary unit (`64MiB`).
struct ByteSize(u64);
/// The same, for fields that hold a `u32`; the range is checked while parsing so the error
/// carries the field's own key path and line.
struct ByteSize32(u32);

const SIZE_UNITS: [(&str, u32); 4] = [("KiB", 10), ("MiB", 20), ("GiB", 30), ("TiB", 40)];

/// Parses `512`, `64KiB`, `1 GiB`. Decimal (`MB`) and bare (`M`) units are rejected on purpose:
/// whether `1GB` means 10^9 or 2^30 bytes is a guess we will not make for a disk size.
fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = (&t[..split], t[split..].trim_start());
    if digits.is_empty() {
        return Err(format!(
            "`{text}` is not a size: write bytes (`4096`) or a number with KiB, MiB, GiB or TiB (`64MiB`)"
        ));
    }
    let too_large = || format!("`{text}` is more than 2^64 bytes");
    let n: u64 = digits.parse().map_err(|_| too_large())?;
    if unit.is_empty() {
        return Ok(n);
    }
    match SIZE_UNITS.iter().find(|(u, _)| *u == unit) {
        Some(&(_, shift)) => n.checked_mul(1u64 << shift).ok_or_else(too_large),
        None => Err(format!(
            "`{text}`: unit `{unit}` is not accepted; use KiB, MiB, GiB or TiB (powers of 1024) or plain bytes"
        )),
    }
}

struct SizeVisitor {
    max: u64,
}

impl SizeVisitor {
    fn bounded<E: de::Error>(&self, n: u64) -> Result<u64, E> {
        if n > self.max {
            return Err(E::custom(format!("{n} bytes is more than this key allows ({} bytes)", self.max)));
        }
        Ok(n)
    }
}

impl<'de> Visitor<'de> for SizeVisitor {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a size: bytes as an integer, or a string such as 64MiB")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        self.bounded(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        let n = u64::try_from(v).map_err(|_| E::custom(format!("{v}: a size cannot be negative")))?;
        self.bounded(n)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
        self.bounded(parse_size(v).map_err(E::custom)?)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SizeVisitor { max: u64::MAX }).map(ByteSize)
    }
}

impl<'de> Deserialize<'de> for ByteSize32 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = d.deserialize_any(SizeVisitor { max: u64::from(u32::MAX) })?;
        // The visitor bounded it; a failure here would be our bug, reported as an error anyway.
        u32::try_from(n).map(ByteSize32).map_err(de::Error::custom)
    }
}

fn de_size_u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    ByteSize32::deserialize(d).map(|b| b.0)
}

fn de_opt_policy<'de, D: Deserializer<'de>>(d: D) -> Result<Option<(WritePolicy, usize)>, D::Error> {
    let s = Option::<String>::deserialize(d)?;
    s.map(|s| parse_policy(&s).map_err(|e| de::Error::custom(format!("`policy`: {e}")))).transpose()
}

fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    ByteSize::deserialize(d).map(|b| b.0)
}

/// `write-through`, `write-back`, `write-back+1` or `write-back+2`: the policy and how many
/// peers keep a copy of every dirty entry.
pub fn parse_policy(s: &str) -> Result<(WritePolicy, usize), String> {
    match s {
        "write-back+1" => Ok((WritePolicy::WriteBack, 1)),
        "write-back+2" => Ok((WritePolicy::WriteBack, 2)),
        _ => s.parse::<WritePolicy>().map(|p| (p, 0)).map_err(|e| {
            if s.starts_with("write-back+") {
                format!(
                    "unknown write policy {s:?} (write-back keeps at most 2 replicas: write-back+1 or write-back+2)"
                )
            } else {
                format!("{e}; or write-back+1, write-back+2")
            }
        }),
    }
}

fn de_opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    ByteSize::deserialize(d).map(|b| Some(b.0))
}

/// serde's own `SocketAddr` error says only "invalid socket address syntax"; say what is wanted.
fn de_socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    struct AddrVisitor;
    impl Visitor<'_> for AddrVisitor {
        type Value = SocketAddr;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an IP address and port such as 127.0.0.1:4420 or [::1]:4420")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<SocketAddr, E> {
            v.trim().parse().map_err(|_| {
                E::custom(format!(
                    "`{v}` is not IP:port such as 0.0.0.0:4420 or [::1]:4420 (host names are not resolved)"
                ))
            })
        }
    }
    d.deserialize_str(AddrVisitor)
}

// ---------------------------------------------------------------------------------------------
// Derived identities
// ---------------------------------------------------------------------------------------------

/// 64-bit FNV-1a. Chosen over std's `DefaultHasher` because derived serials and UUIDs are
/// identities hosts remember across restarts and upgrades, and std does not promise that its
/// hash stays the same between Rust releases. Never change this function or its inputs.
fn fnv1a64(seed: u64, parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The serial number a subsystem gets when the file gives none: `STG` and 16 hex digits of a
/// hash of the NQN (19 characters, within SN's 20).
pub fn derived_serial(nqn: &str) -> String {
    format!("STG{:016X}", fnv1a64(0, &[nqn.as_bytes()]))
}

/// The UUID a namespace gets when the file gives none: 128 bits hashed from the subsystem NQN
/// and nsid, marked as an RFC 9562 version 8 (vendor-specific) UUID.
pub fn derived_namespace_uuid(subsystem_nqn: &str, nsid: u32) -> [u8; 16] {
    let nsid = nsid.to_le_bytes();
    let parts: [&[u8]; 3] = [subsystem_nqn.as_bytes(), b"\0", &nsid];
    let hi = fnv1a64(0x5354_4147_4552_0001, &parts);
    let lo = fnv1a64(0x5354_4147_4552_0002, &parts);
    let mut u = [0u8; 16];
    u[..8].copy_from_slice(&hi.to_be_bytes());
    u[8..].copy_from_slice(&lo.to_be_bytes());
    u[6] = (u[6] & 0x0f) | 0x80; // version 8
    u[8] = (u[8] & 0x3f) | 0x80; // RFC 9562 variant
    u
}

/// Parses the hyphenated form `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (either case).
pub fn parse_uuid(text: &str) -> Option<[u8; 16]> {
    let b = text.as_bytes();
    if b.len() != 36 || [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
        return None;
    }
    let hex: Vec<u8> = b.iter().copied().filter(|&c| c != b'-').collect();
    // from_str_radix would accept a sign ("+f"); only hex digits are a UUID.
    if hex.len() != 32 || !hex.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let mut u = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        u[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(u)
}

pub fn format_uuid(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const EXAMPLE_FULL: &str = include_str!("../../examples/stagerd.yaml");
    const EXAMPLE_MINIMAL: &str = include_str!("../../examples/minimal.yaml");

    /// Enough CPUs that tests do not depend on the machine they run on.
    fn many_cpus() -> Vec<usize> {
        (0..256).collect()
    }

    /// Parse and validate as `parse` does, but against a fixed CPU set.
    pub(super) fn parse_test(text: &str) -> Result<Config, ConfigError> {
        let c = parse_shape(text, "t.yaml")?;
        c.validate_for_cpus("t.yaml", &many_cpus())?;
        Ok(c)
    }

    pub(super) fn err(text: &str) -> String {
        match parse_test(text) {
            Ok(c) => panic!("expected an error for:\n{text}\ngot {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn assert_err(text: &str, needles: &[&str]) {
        let msg = err(text);
        for n in needles {
            assert!(msg.contains(n), "message {msg:?} lacks {n:?}");
        }
    }

    const BASE: &str = "\
listeners:
  - name: tcp0
    address: 127.0.0.1:4420
subsystems:
  - nqn: nqn.2026-11.dev.stager:a
    allow_any_host: true
    namespaces:
      - nsid: 1
        backend: { kind: memory, size: 64MiB }
";

    #[test]
    fn embedded_default_validates() {
        let c = embedded_default();
        c.validate_for_cpus(EMBEDDED_ORIGIN, &many_cpus()).unwrap();
        assert_eq!(c.listeners[0].address.to_string(), "127.0.0.1:4420");
        assert_eq!(c.subsystems[0].nqn, "nqn.2026-11.dev.stager:default");
        assert!(c.subsystems[0].allow_any_host);
        // A write-back volume: a flash log file and a SAN file under ./stager-data/.
        match &c.subsystems[0].namespaces[0].backend {
            BackendConfig::Volume {
                id: 1,
                flash,
                policy: WritePolicy::WriteBack,
                san: SanConfig::File { path, .. },
                ..
            } => {
                assert_eq!(flash, "flash0");
                assert_eq!(path, &PathBuf::from("./stager-data/san1.img"));
            }
            other => panic!("embedded default backend is {other:?}"),
        }
        assert_eq!(c.flash[0].path, PathBuf::from("./stager-data/flash0.img"));
        assert!(c.management.socket.is_some());
    }

    /// A build without libiscsi says so at validation, naming the key and the fix.
    #[cfg(not(feature = "iscsi"))]
    #[test]
    fn iscsi_san_without_the_feature_is_a_clear_error() {
        let text = "listeners: [{ name: a, address: 127.0.0.1:0 }]\nflash: [{ name: f0, path: /tmp/stager-config-test-flash.img, size: 64MiB }]\nsubsystems:\n  - nqn: nqn.2026-11.dev.stager:v\n    allow_any_host: true\n    namespaces:\n      - nsid: 1\n        backend: { kind: volume, id: 1, flash: f0, san: { kind: iscsi, url: \"iscsi://127.0.0.1/iqn.2026-11.x:y/1\" } }\n";
        let msg = err(text);
        assert!(msg.contains("backend.san.kind") && msg.contains("without the `iscsi` feature"), "{msg}");
    }

    #[test]
    fn volumes_parse_and_validate() {
        let text = |backend: &str, flash: &str| {
            format!(
                "listeners: [{{ name: a, address: 127.0.0.1:0 }}]\n{flash}\nsubsystems:\n  - nqn: nqn.2026-11.dev.stager:v\n    allow_any_host: true\n    namespaces:\n      - nsid: 1\n        backend: {backend}\n"
            )
        };
        let flash = "flash: [{ name: f0, path: /tmp/stager-config-test-flash.img, size: 64MiB }]";
        let good = text("{ kind: volume, id: 3, flash: f0, policy: write-through, san: { kind: file, path: /tmp/stager-config-test-san.img, size: 1GiB } }", flash);
        let c = parse_test(&good).unwrap();
        match &c.subsystems[0].namespaces[0].backend {
            BackendConfig::Volume { id: 3, policy: WritePolicy::WriteThrough, read_cache: true, .. } => {}
            other => panic!("parsed {other:?}"),
        }
        assert_eq!(c.flash[0].cache_percent, 25);
        let cases: &[(&str, &str, &[&str])] = &[
            ("{ kind: volume, id: 3, flash: nope, san: { kind: file, path: /tmp/x-san.img, size: 1GiB } }", flash, &["backend.flash", "no flash device is named `nope`"]),
            ("{ kind: volume, id: 3, flash: f0, policy: write-around, san: { kind: file, path: /tmp/x-san.img, size: 1GiB } }", flash, &["unknown write policy", "write-around"]),
            ("{ kind: volume, id: 0, flash: f0, san: { kind: file, path: /tmp/x-san.img, size: 1GiB } }", flash, &["backend.id", "reserved"]),
            ("{ kind: volume, flash: f0, san: { kind: file, path: /tmp/x-san.img, size: 1GiB } }", flash, &["needs `id`"]),
            ("{ kind: volume, id: 3, flash: f0 }", flash, &["needs `san`"]),
            // A bad URL is named as such in a build with iSCSI; without it, the missing feature is.
            (
                "{ kind: volume, id: 3, flash: f0, san: { kind: iscsi, url: \"http://x/y/1\" } }",
                flash,
                if cfg!(feature = "iscsi") { &["backend.san.url", "iscsi://"] } else { &["backend.san.kind", "without the `iscsi` feature"] },
            ),
            ("{ kind: volume, id: 3, flash: f0, san: { kind: file } }", flash, &["needs `path`"]),
            ("{ kind: memory, size: 1MiB, policy: write-back }", flash, &["`policy` applies only to `kind: volume`"]),
            ("{ kind: volume, id: 3, flash: f0, san: { kind: file, path: /tmp/stager-config-test-flash.img, size: 1GiB } }", flash, &["backend.san.path", "also used by flash[0]"]),
            ("{ kind: memory, size: 1MiB }", "flash: [{ name: f0, path: /tmp/f.img, size: 1MiB }]", &["flash[0].size", "at least"]),
            ("{ kind: memory, size: 1MiB }", "flash: [{ name: f0, path: /tmp/f.img, size: 64MiB, cache_percent: 95 }]", &["flash[0].cache_percent"]),
            ("{ kind: memory, size: 1MiB }", "destage: { core: 4096 }", &["destage.core", "not available"]),
        ];
        for (backend, flash, needles) in cases {
            let msg = err(&text(backend, flash));
            for n in *needles {
                assert!(msg.contains(n), "{backend} / {flash}: message {msg:?} lacks {n:?}");
            }
        }
    }

    #[test]
    fn nvme_device_kinds_and_their_errors() {
        let text = |backend: &str, flash: &str| {
            format!(
                "listeners: [{{ name: a, address: 127.0.0.1:0 }}]\n{flash}\nsubsystems:\n  - nqn: nqn.2026-11.dev.stager:n\n    allow_any_host: true\n    namespaces:\n      - nsid: 1\n        backend: {backend}\n"
            )
        };
        // The shape parses into the right specs (validation needs the devices, checked below).
        let shape = parse_shape(
            &text(
                "{ kind: nvme-passthru, path: /dev/ng1n1, block_size: 512 }",
                "flash: [{ name: f0, kind: vfio, pci: \"00:04.0\" }]",
            ),
            "t.yaml",
        )
        .unwrap();
        assert_eq!(
            shape.flash[0].device(),
            DeviceSpec::Vfio { pci: "0000:00:04.0".into(), block_size: VOLUME_BLOCK_SIZE }
        );
        assert_eq!(
            shape.subsystems[0].namespaces[0].backend.device(),
            Some(DeviceSpec::NvmePassthru { path: "/dev/ng1n1".into(), block_size: 512 })
        );
        let shape = parse_shape(
            &text("{ kind: vfio, pci: 0000:00:05.0 }", "flash: [{ name: f0, kind: nvme-passthru, path: /dev/ng0n1 }]"),
            "t.yaml",
        )
        .unwrap();
        assert_eq!(shape.flash[0].device(), DeviceSpec::NvmePassthru { path: "/dev/ng0n1".into(), block_size: 4096 });
        assert_eq!(shape.subsystems[0].namespaces[0].backend.kind(), "vfio");
        let mem = "{ kind: memory, size: 1MiB }";
        let cases: &[(&str, &str, &[&str])] = &[
            ("{ kind: nvme-passthru }", "", &["needs `path`", "/dev/ng0n1"]),
            ("{ kind: nvme-passthru, path: /dev/ng0n1, size: 1GiB }", "", &["`size` applies only to `kind: file`"]),
            ("{ kind: vfio }", "", &["needs `pci`"]),
            ("{ kind: vfio, pci: 0000:00:04.0, path: /dev/x }", "", &["`path` does not apply to `kind: vfio`"]),
            (
                "{ kind: file, path: /tmp/x.img, size: 1MiB, pci: 0000:00:04.0 }",
                "",
                &["`pci` applies only to `kind: vfio`"],
            ),
            ("{ kind: nvme-passthru, path: /nonexistent/ng9n9 }", "", &["backend.path", "/dev/ng"]),
            ("{ kind: nvme-passthru, path: /tmp }", "", &["backend.path", "not a character device"]),
            ("{ kind: vfio, pci: \"00:04\" }", "", &["backend.pci", "not a PCI address"]),
            ("{ kind: vfio, pci: 0000:ff:1f.7 }", "", &["backend.pci", "no PCI device 0000:ff:1f.7"]),
            (mem, "flash: [{ name: f0, kind: vfio }]", &["flash[0].pci", "needs `pci`"]),
            (
                mem,
                "flash: [{ name: f0, kind: vfio, pci: 0000:ff:1f.7, path: /dev/ng0n1 }]",
                &["flash[0].path", "does not apply"],
            ),
            (
                mem,
                "flash: [{ name: f0, kind: nvme-passthru, path: /dev/ng0n1, size: 64MiB }]",
                &["flash[0].size", "only to `kind: file`"],
            ),
            (mem, "flash: [{ name: f0, kind: nvme-passthru, path: /dev/null, pci: 0000:00:04.0 }]", &["flash[0].pci"]),
            (mem, "flash: [{ name: f0, kind: vfio, pci: 0000:ff:1f.7 }]", &["flash[0].pci", "lspci"]),
            (mem, "flash: [{ name: f0, kind: nvme, path: /dev/ng0n1 }]", &["flash[0].kind", "nvme-passthru"]),
        ];
        for (backend, flash, needles) in cases {
            let msg = err(&text(backend, flash));
            for n in *needles {
                assert!(msg.contains(n), "{backend} / {flash}: message {msg:?} lacks {n:?}");
            }
        }
    }

    #[test]
    fn embedded_default_validates_on_this_machine() {
        // CPU 0 is usable on any ordinary machine; this is what `stagerd` with no flags does.
        if usable_cpus().contains(&0) {
            embedded_default().validate(EMBEDDED_ORIGIN).unwrap();
        }
    }

    #[test]
    fn examples_parse() {
        let full = parse_test(EXAMPLE_FULL).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(full.listeners.len(), 2);
        assert_eq!(full.subsystems.len(), 2);
        assert!(full.subsystems.iter().any(|s| !s.allow_any_host && !s.hosts.is_empty()));
        assert!(full.subsystems.iter().any(|s| s.allow_any_host));
        let kinds: HashSet<_> = full.subsystems.iter().flat_map(|s| &s.namespaces).map(|n| n.backend.kind()).collect();
        assert_eq!(kinds, HashSet::from(["memory", "file"]));
        let minimal = parse_test(EXAMPLE_MINIMAL).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(minimal.transport, TransportConfig::default());
    }

    #[test]
    fn replication_examples_parse_and_node_mistakes_name_their_key() {
        for (text, n) in [
            (include_str!("../../examples/replication/node-a.yaml"), 2),
            (include_str!("../../examples/replication/node-b.yaml"), 1),
            (include_str!("../../examples/replication/node-c.yaml"), 1),
        ] {
            let c = parse_test(text).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(c.node.as_ref().map(|n| n.peers.len()), Some(n));
        }
        let a = parse_test(include_str!("../../examples/replication/node-a.yaml")).unwrap();
        match &a.subsystems[0].namespaces[1].backend {
            BackendConfig::Volume { policy: WritePolicy::WriteBack, replicas, .. } => {
                assert_eq!(replicas, &["node-b".to_string(), "node-c".to_string()])
            }
            other => panic!("{other:?}"),
        }
        let node = |extra: &str| {
            format!(
                "listeners: [{{ name: a, address: 127.0.0.1:0 }}]\n\
                 flash: [{{ name: f0, path: /tmp/stager-config-test-rflash.img, size: 64MiB }}]\n\
                 node: {{ id: node-a, fabric: {{ listen: \"127.0.0.1:4520\", secret: \"sixteen bytes ok!\" }},\n\
                 \x20 peers: [{{ id: node-b, address: \"127.0.0.1:4521\" }}] }}\n{extra}"
            )
        };
        let volume = |policy: &str, replicas: &str| {
            node(&format!(
                "subsystems:\n  - nqn: nqn.2026-11.dev.stager:r\n    allow_any_host: true\n    namespaces:\n      - nsid: 1\n        \
                 backend: {{ kind: volume, id: 3, flash: f0, policy: {policy}, replicas: {replicas}, \
                 san: {{ kind: file, path: /tmp/stager-config-test-rsan.img, size: 1GiB }} }}\n"
            ))
        };
        parse_test(&volume("write-back+1", "[node-b]")).unwrap_or_else(|e| panic!("{e}"));
        let cases: Vec<(String, &[&str])> = vec![
            (volume("write-back+1", "[]"), &["write-back+1", "needs `replicas`"]),
            (volume("write-back", "[node-b]"), &["keeps no copies", "write-back+1"]),
            (volume("write-back+3", "[node-b]"), &["at most 2 replicas"]),
            (volume("write-back+1", "[node-z]"), &["backend.replicas", "not in `node.peers`"]),
            (volume("write-back+1", "[node-a]"), &["backend.replicas", "this node"]),
            (volume("write-back+2", "[node-b, node-b]"), &["backend.replicas", "named twice"]),
            (
                node("").replace("secret: \"sixteen bytes ok!\"", "secret: short"),
                &["node.fabric.secret", "at least 16"],
            ),
            (node("").replace("secret: \"sixteen bytes ok!\"", "ring_size: 4MiB"), &["node.fabric", "secret"]),
            (node("").replace("id: node-a,", "id: \"bad id!\","), &["node.id", "not a node id"]),
            (node("").replace("id: node-b", "id: node-a"), &["node.peers[0].id", "own id"]),
            (node("").replace("secret:", "ring_size: 1MiB, secret:"), &["node.fabric.ring_size"]),
            (
                node("").replace("listen:", "kind: verbs, listen:"),
                if stager_rdma::VERBS_BUILT { &[] } else { &["node.fabric.kind", "without the `verbs` feature"] },
            ),
        ];
        for (text, needles) in cases {
            if needles.is_empty() {
                parse_test(&text).unwrap_or_else(|e| panic!("{e}"));
                continue;
            }
            let msg = err(&text);
            for n in needles {
                assert!(msg.contains(n), "{text}: message {msg:?} lacks {n:?}");
            }
        }
        let orphan = volume("write-back+1", "[node-b]").replace("node: {", "nodex: {");
        assert!(err(&orphan).contains("nodex"), "an unknown top-level key is named");
    }

    #[test]
    fn full_example_sets_every_key() {
        // The full example is meant to show every key: fail if a new field is left out of it.
        for key in [
            "cores:",
            "idle_poll_us:",
            "level:",
            "max_queue_depth:",
            "max_io_queues:",
            "in_capsule_data_bytes:",
            "max_h2c_data_bytes:",
            "max_io_bytes:",
            "keep_alive_timeout_ms:",
            "handshake_timeout_ms:",
            "pdu_timeout_ms:",
            "zero_copy_send:",
            "c2h_success:",
            "name:",
            "transport:",
            "address:",
            "nqn:",
            "serial:",
            "model:",
            "allow_any_host:",
            "hosts:",
            "listeners:",
            "nsid:",
            "uuid:",
            "kind:",
            "size:",
            "block_size:",
            "path:",
            "direct:",
        ] {
            assert!(EXAMPLE_FULL.lines().any(|l| l.trim_start().trim_start_matches("- ").starts_with(key)), "{key}");
        }
    }

    #[test]
    fn defaults_fill_missing_keys() {
        let c = parse_test(BASE).unwrap();
        assert_eq!(c.reactors, ReactorConfig { cores: vec![0], idle_poll_us: 1000 });
        assert_eq!(c.logging.level, "info");
        assert_eq!(c.transport.max_queue_depth, 128);
        assert_eq!(c.transport.max_io_queues, 8);
        assert_eq!(c.transport.in_capsule_data_bytes, 8192);
        assert_eq!(c.transport.max_h2c_data_bytes, 131072);
        assert_eq!(c.transport.max_io_bytes, 1 << 20);
        assert_eq!(c.transport.keep_alive_timeout_ms, 120_000);
        assert_eq!(c.transport.handshake_timeout_ms, 10_000);
        assert_eq!(c.transport.pdu_timeout_ms, 30_000);
        assert_eq!(c.transport.zero_copy_send, ZeroCopySend::Auto);
        assert_eq!(c.transport.c2h_success, C2hSuccess::WhenSqFlowOff);
        assert_eq!(c.listeners[0].transport, TransportKind::Tcp);
        let s = &c.subsystems[0];
        assert_eq!(s.model, "Stager");
        assert_eq!(s.serial, derived_serial(&s.nqn));
        assert!(s.serial.len() <= SERIAL_CHARS_MAX);
        assert_eq!(s.namespaces[0].backend, BackendConfig::Memory { size_bytes: 64 << 20, block_size: 4096 });
    }

    #[test]
    fn file_backend_defaults_to_direct() {
        let c =
            parse_test(&BASE.replace(
                "{ kind: memory, size: 64MiB }",
                "{ kind: file, path: /tmp/x.img, size: 1GiB, block_size: 512 }",
            ))
            .unwrap();
        assert_eq!(
            c.subsystems[0].namespaces[0].backend,
            BackendConfig::File { path: "/tmp/x.img".into(), size_bytes: Some(1 << 30), block_size: 512, direct: true }
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("1 GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2TiB"), Ok(2 << 40));
        assert_eq!(parse_size("16777215TiB"), Ok(16777215 << 40));
        assert!(parse_size("16777216TiB").unwrap_err().contains("2^64"));
        assert!(parse_size("99999999999999999999").unwrap_err().contains("2^64"));
        for bad in ["64MB", "1G", "1K", "4kib", "1.5GiB", "GiB", "", "-1", "0x10"] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.contains(&format!("`{bad}`")), "{bad}: {e}");
        }
        assert!(parse_size("64MB").unwrap_err().contains("unit `MB` is not accepted"));
        // In YAML, as integers and strings, on u64 and u32 keys.
        let c =
            parse_test(&format!("{BASE}transport: {{ max_io_bytes: 2MiB, in_capsule_data_bytes: 4096 }}\n")).unwrap();
        assert_eq!(c.transport.max_io_bytes, 2 << 20);
        assert_eq!(c.transport.in_capsule_data_bytes, 4096);
        assert_err(
            &BASE.replace("size: 64MiB", "size: 64MB"),
            &["t.yaml:9:40: subsystems[0].namespaces[0].backend.size: `64MB`: unit `MB`"],
        );
        assert_err(
            &format!("{BASE}transport:\n  max_io_bytes: 8GiB\n"),
            &["t.yaml:11:17: transport.max_io_bytes:", "more than this key allows"],
        );
        assert_err(&BASE.replace("size: 64MiB", "size: -4096"), &["backend.size", "negative"]);
        assert_err(&BASE.replace("size: 64MiB", "size: 1.5"), &["backend.size", "a size"]);
    }

    #[test]
    fn unknown_field_names_the_key_and_line() {
        let msg = err(&BASE.replace("nsid: 1", "nsid: 1\n        sise: 3"));
        assert!(msg.starts_with("t.yaml:9:9: subsystems[0].namespaces[0]: unknown field `sise`"), "{msg}");
        assert!(msg.contains("expected"), "{msg}");
        assert_err(
            &BASE.replace("size: 64MiB", "sise: 64MiB"),
            &["t.yaml:9:34: subsystems[0].namespaces[0].backend: unknown field `sise`"],
        );
        assert_err(
            &format!("{BASE}reactor:\n  cores: [0]\n"),
            &["t.yaml:10:1: unknown field `reactor`, expected one of `reactors`"],
        );
        assert_err(&format!("{BASE}transport:\n  max_queue_dept: 4\n"), &["transport", "`max_queue_dept`"]);
    }

    #[test]
    fn shape_errors() {
        assert_err(&BASE.replace("kind: memory", "kind: memroy"), &["backend.kind", "unknown variant `memroy`"]);
        assert_err(&BASE.replace("kind: memory, ", ""), &["backend", "missing field `kind`"]);
        assert_err(&BASE.replace(", size: 64MiB", ""), &["namespaces[0].backend", "needs `size`"]);
        assert_err(&BASE.replace("64MiB", "64MiB, path: /x"), &["backend", "`path` applies only to `kind: file`"]);
        assert_err(&BASE.replace("kind: memory, size: 64MiB", "kind: file"), &["backend", "needs `path`"]);
        assert_err(&BASE.replace("nsid: 1", "nsid: one"), &["t.yaml:8:", "namespaces[0].nsid", "invalid type"]);
        assert_err(&BASE.replace("127.0.0.1:4420", "localhost:4420"), &["listeners[0].address", "host names"]);
        assert_err(
            &BASE.replace("    address", "    transport: rdma\n    address"),
            &["listeners[0].transport", "`rdma`"],
        );
        assert_err("listeners: [\n", &["t.yaml:"]);
        assert_err("- 1\n", &["t.yaml:", "invalid type"]);
        assert_err("---\nlisteners: []\n---\nlisteners: []\n", &["t.yaml", "more than one document"]);
        assert!(matches!(parse_test(""), Err(ConfigError::Empty { .. })));
        assert!(matches!(parse_test("# only a comment\n"), Err(ConfigError::Empty { .. })));
    }

    #[test]
    fn more_volumes_than_a_superblock_holds_is_a_config_error() {
        let mut text = String::from(
            "listeners: [{ name: t, address: \"127.0.0.1:4999\" }]\nflash: [{ name: f0, path: /tmp/stager-config-test-65.img, size: 64MiB }]\nsubsystems:\n  - nqn: nqn.2026-11.dev.stager:x\n    allow_any_host: true\n    namespaces:\n",
        );
        for i in 1..=65 {
            text.push_str(&format!(
                "      - {{ nsid: {i}, backend: {{ kind: volume, id: {i}, flash: f0, san: {{ kind: file, path: /tmp/stager-config-test-san{i}.img, size: 1GiB }} }} }}\n"
            ));
        }
        let e = parse_test(&text).unwrap_err().to_string();
        assert!(e.contains("namespaces[64].backend.flash: more than 64 volumes on flash device `f0`"), "{e}");
    }

    #[test]
    fn value_errors_name_the_key() {
        let cases: &[(&str, &str, &str)] = &[
            ("cores: [0]", "cores: []", "reactors.cores:"),
            ("cores: [0]", "cores: [0, 0]", "reactors.cores[1]:"),
            ("cores: [0]", "cores: [0, 100000]", "reactors.cores[1]: CPU 100000 is not available"),
            ("idle_poll_us: 1000", "idle_poll_us: 5000000", "reactors.idle_poll_us:"),
            ("san_timeout_ms: 5000", "san_timeout_ms: 10", "destage.san_timeout_ms: 10 is outside"),
            ("san_timeout_ms: 5000", "san_timeout_ms: 600000", "destage.san_timeout_ms: 600000 is outside"),
            ("level: info", "level: verbose", "logging.level: `verbose`"),
            ("max_queue_depth: 128", "max_queue_depth: 1", "transport.max_queue_depth:"),
            ("max_queue_depth: 128", "max_queue_depth: 1025", "transport.max_queue_depth:"),
            ("max_io_queues: 8", "max_io_queues: 0", "transport.max_io_queues:"),
            ("max_io_queues: 8", "max_io_queues: 65", "transport.max_io_queues:"),
            ("in_capsule_data_bytes: 8192", "in_capsule_data_bytes: 8", "transport.in_capsule_data_bytes:"),
            ("in_capsule_data_bytes: 8192", "in_capsule_data_bytes: 256KiB", "transport.in_capsule_data_bytes:"),
            ("max_h2c_data_bytes: 128KiB", "max_h2c_data_bytes: 1000", "transport.max_h2c_data_bytes:"),
            ("max_h2c_data_bytes: 128KiB", "max_h2c_data_bytes: 6000", "transport.max_h2c_data_bytes:"),
            ("max_io_bytes: 1MiB", "max_io_bytes: 12KiB", "transport.max_io_bytes:"),
            ("max_io_bytes: 1MiB", "max_io_bytes: 16MiB", "transport.max_io_bytes:"),
            ("name: tcp1", "name: tcp0", "listeners[1].name: `tcp0` is already"),
            ("name: tcp1", "name: \"\"", "listeners[1].name:"),
            ("name: tcp1", "name: a b", "listeners[1].name:"),
            ("127.0.0.1:4421", "127.0.0.1:4420", "listeners[1].address:"),
            ("127.0.0.1:4421", "0.0.0.0:4420", "listeners[1].address:"),
            (
                "nqn.2026-11.dev.stager:b",
                "nqn.2026-11.dev.stager:a",
                "subsystems[1].nqn: `nqn.2026-11.dev.stager:a` is already",
            ),
            ("nqn.2026-11.dev.stager:b", "stager:b", "subsystems[1].nqn: `stager:b` is not an NVMe Qualified Name"),
            ("nqn.2026-11.dev.stager:b", "nqn.2014-08.org.nvmexpress.discovery", "subsystems[1].nqn: is the discovery"),
            ("nqn.2026-11.dev.stager:b", "\"nqn.2026-11.dev.stager: b\"", "subsystems[1].nqn:"),
            ("serial: SN1", "serial: SN1234567890123456789012", "subsystems[0].serial:"),
            ("serial: SN1", "serial: \"SN\u{e9}\"", "subsystems[0].serial:"),
            ("model: Stager test", "model: \"\"", "subsystems[0].model:"),
            ("allow_any_host: false", "allow_any_host: true", "subsystems[0].hosts: is ignored"),
            (
                "    hosts: [nqn.2014-08.org.nvmexpress:uuid:1]\n",
                "",
                "subsystems[0].allow_any_host: no host could connect",
            ),
            ("hosts: [nqn.2014-08.org.nvmexpress:uuid:1]", "hosts: [host1]", "subsystems[0].hosts[0]:"),
            ("listeners: [tcp0]", "listeners: [tcp9]", "subsystems[0].listeners[0]: no listener is named `tcp9`"),
            ("listeners: [tcp0]", "listeners: [tcp0, tcp0]", "subsystems[0].listeners[1]:"),
            ("nsid: 2", "nsid: 1", "subsystems[0].namespaces[1].nsid: 1 is already used"),
            ("nsid: 2", "nsid: 0", "subsystems[0].namespaces[1].nsid:"),
            ("nsid: 2", "nsid: 1025", "subsystems[0].namespaces[1].nsid:"),
            ("uuid: 6f1c2d3e-0000-4000-8000-00000000abcd", "uuid: 6f1c2d3e", "subsystems[0].namespaces[0].uuid:"),
            (
                "uuid: 6f1c2d3e-0000-4000-8000-00000000abcd",
                "uuid: 00000000-0000-0000-0000-000000000000",
                "subsystems[0].namespaces[0].uuid: the nil",
            ),
            ("size: 64MiB", "size: 1000", "subsystems[0].namespaces[1].backend.size: 1000 bytes"),
            ("size: 64MiB", "size: 0", "subsystems[0].namespaces[1].backend.size:"),
            ("block_size: 512", "block_size: 1024", "subsystems[0].namespaces[1].backend.block_size: 1024"),
            (
                "path: /tmp/stager-config-test-a.img",
                "path: /tmp/stager-config-test-b.img",
                "subsystems[1].namespaces[0].backend.path: /tmp/stager-config-test-b.img is also",
            ),
            (
                "size: 4GiB",
                "size: ~",
                "subsystems[0].namespaces[0].backend.path: /tmp/stager-config-test-a.img: does not exist",
            ),
        ];
        let good = "\
reactors: { cores: [0], idle_poll_us: 1000 }
destage: { san_timeout_ms: 5000 }
logging: { level: info }
transport:
  max_queue_depth: 128
  max_io_queues: 8
  in_capsule_data_bytes: 8192
  max_h2c_data_bytes: 128KiB
  max_io_bytes: 1MiB
listeners:
  - name: tcp0
    address: 127.0.0.1:4420
  - name: tcp1
    address: 127.0.0.1:4421
subsystems:
  - nqn: nqn.2026-11.dev.stager:a
    serial: SN1
    model: Stager test
    allow_any_host: false
    hosts: [nqn.2014-08.org.nvmexpress:uuid:1]
    listeners: [tcp0]
    namespaces:
      - nsid: 1
        uuid: 6f1c2d3e-0000-4000-8000-00000000abcd
        backend: { kind: file, path: /tmp/stager-config-test-a.img, size: 4GiB }
      - nsid: 2
        backend: { kind: memory, size: 64MiB, block_size: 512 }
  - nqn: nqn.2026-11.dev.stager:b
    allow_any_host: true
    namespaces:
      - nsid: 1
        backend: { kind: file, path: /tmp/stager-config-test-b.img, size: 4GiB }
";
        parse_test(good).unwrap_or_else(|e| panic!("{e}"));
        for (from, to, needle) in cases {
            assert!(good.contains(from), "{from}");
            let text = good.replacen(from, to, 1);
            let msg = err(&text);
            assert!(msg.starts_with("t.yaml: "), "{msg}");
            assert!(msg.contains(needle), "{from} -> {to}: message {msg:?} lacks {needle:?}");
        }
    }

    #[test]
    fn no_listeners_is_an_error() {
        assert_err("subsystems: []\n", &["t.yaml: listeners: at least one listener"]);
        // A discovery-only target (no subsystems) is fine.
        parse_test("listeners: [{ name: tcp0, address: \"[::1]:4420\" }]\n").unwrap();
    }

    #[test]
    fn duplicate_uuid_across_subsystems() {
        let u = "6f1c2d3e-0000-4000-8000-00000000abcd";
        let two = format!(
            "{}  - nqn: nqn.2026-11.dev.stager:b\n    allow_any_host: true\n    namespaces:\n      - {{ nsid: 1, uuid: {u}, backend: {{ kind: memory, size: 4KiB }} }}\n",
            BASE.replace("- nsid: 1", &format!("- uuid: {u}\n        nsid: 1"))
        );
        assert_err(&two, &["subsystems[1].namespaces[0].uuid:", "is also the UUID of subsystems[0].namespaces[0]"]);
    }

    #[test]
    fn file_without_size_must_exist() {
        let dir = std::env::temp_dir().join(format!("stager-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("ns.img");
        std::fs::write(&img, vec![0u8; 8192]).unwrap();
        let text = BASE.replace("kind: memory, size: 64MiB", &format!("kind: file, path: {}", img.display()));
        parse_test(&text).unwrap();
        std::fs::write(&img, vec![0u8; 1000]).unwrap();
        assert_err(&text, &["backend.path", "1000 bytes"]);
        let text = BASE.replace("kind: memory, size: 64MiB", &format!("kind: file, path: {}", dir.display()));
        assert_err(&text, &["backend.path", "is a directory"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn load_reports_the_file() {
        let missing = Path::new("/nonexistent/stagerd.yaml");
        let e = load(missing).unwrap_err().to_string();
        assert!(e.starts_with("/nonexistent/stagerd.yaml: cannot read"), "{e}");
        let dir = std::env::temp_dir().join(format!("stager-config-load-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("bad.yaml");
        std::fs::write(&f, b"listeners: \xff\n").unwrap();
        let e = load(&f).unwrap_err().to_string();
        assert!(e.contains("bad.yaml: not UTF-8"), "{e}");
        std::fs::write(&f, vec![b'#'; CONFIG_FILE_BYTES_MAX as usize + 1]).unwrap();
        assert!(matches!(load(&f), Err(ConfigError::TooLarge { .. })));
        std::fs::write(&f, BASE.replace("nsid: 1", "nsid: 1\n        sise: 3")).unwrap();
        let e = load(&f).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}:9:9: subsystems[0].namespaces[0]: unknown field", f.display())), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn derived_identities_are_stable() {
        // Hosts remember these across restarts: a change here renames every namespace.
        assert_eq!(derived_serial("nqn.2026-11.dev.stager:default"), derived_serial("nqn.2026-11.dev.stager:default"));
        assert_ne!(derived_serial("nqn.2026-11.dev.stager:a"), derived_serial("nqn.2026-11.dev.stager:b"));
        assert_eq!(fnv1a64(0, &[b"a"]), 0xaf63dc4c8601ec8c); // the published FNV-1a test vector
        let u = derived_namespace_uuid("nqn.2026-11.dev.stager:default", 1);
        assert_eq!(u[6] >> 4, 8);
        assert_eq!(u[8] >> 6, 0b10);
        assert_ne!(u, derived_namespace_uuid("nqn.2026-11.dev.stager:default", 2));
        assert_eq!(parse_uuid(&format_uuid(&u)), Some(u));
        assert_eq!(derived_serial("nqn.2026-11.dev.stager:default"), GOLDEN_SERIAL);
        assert_eq!(format_uuid(&u), GOLDEN_UUID);
        let ns = NamespaceConfig {
            nsid: 1,
            backend: BackendConfig::Memory { size_bytes: 4096, block_size: 4096 },
            uuid: None,
        };
        assert_eq!(ns.effective_uuid("nqn.2026-11.dev.stager:default"), u);
        let fixed = NamespaceConfig { uuid: Some("6F1C2D3E-0000-4000-8000-00000000ABCD".into()), ..ns };
        assert_eq!(format_uuid(&fixed.effective_uuid("x")), "6f1c2d3e-0000-4000-8000-00000000abcd");
    }

    const GOLDEN_SERIAL: &str = "STG375B54B5F09E07FF";
    const GOLDEN_UUID: &str = "a81e20fd-4f3e-8433-b793-a2eefb538262";

    #[test]
    fn cpu_list_text_is_compact() {
        assert_eq!(cpu_list_text(&[0, 1, 2, 3, 6, 8, 9]), "0-3,6,8-9");
        assert_eq!(cpu_list_text(&[5]), "5");
        assert_eq!(cpu_list_text(&[]), "none");
    }

    /// Mutated and random text must give Ok or Err, never a panic.
    #[test]
    fn random_input_never_panics() {
        const TOKENS: &[&str] = &[
            "\n",
            " ",
            "  ",
            ":",
            ": ",
            "- ",
            "-",
            "[",
            "]",
            "{",
            "}",
            ",",
            "'",
            "\"",
            "#",
            "&a ",
            "*a",
            "<<: *a",
            "!!str ",
            "!!binary ",
            "~",
            "null",
            "0",
            "-1",
            "4096",
            "99999999999999999999999",
            "18446744073709551615",
            "4294967296",
            "1.5",
            "KiB",
            "TiB",
            "MB",
            "\t",
            "\u{e9}",
            "\u{0}",
            "nqn.",
            "size: ",
            "kind: file",
            "kind: memory",
            "path: ",
            "nsid: ",
            "---\n",
            "...\n",
            "? ",
            "|\n",
            ">\n",
            "%YAML 1.2\n",
            "0x10",
            ".inf",
            "true",
            "[::1]:0",
            "0.0.0.0:4420",
        ];
        let seed: u64 = std::env::var("STAGER_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed);
        let mut rng = StdRng::seed_from_u64(seed);
        let bases = [EXAMPLE_FULL, EXAMPLE_MINIMAL, BASE];
        for round in 0..3000 {
            let mut text: Vec<char> = bases[round % bases.len()].chars().collect();
            for _ in 0..rng.gen_range(1..6) {
                let at = rng.gen_range(0..=text.len());
                match rng.gen_range(0..6) {
                    0 => {
                        let end = (at + rng.gen_range(1..20)).min(text.len());
                        text.drain(at..end);
                    }
                    1 | 2 => {
                        let tok = TOKENS[rng.gen_range(0..TOKENS.len())];
                        text.splice(at..at, tok.chars());
                    }
                    3 => {
                        let c = char::from_u32(rng.gen_range(0..0x300)).unwrap_or('?');
                        text.insert(at, c);
                    }
                    4 => {
                        // Duplicate a span (repeats keys and list entries).
                        let end = (at + rng.gen_range(1..200)).min(text.len());
                        let span: Vec<char> = text[at..end].to_vec();
                        text.splice(at..at, span);
                    }
                    _ => text.truncate(at),
                }
            }
            let text: String = text.into_iter().collect();
            let result = std::panic::catch_unwind(|| {
                let _ = parse(&text, "fuzz.yaml");
            });
            assert!(result.is_ok(), "parse panicked (seed {seed}, round {round}) on:\n{text}");
        }
        for _ in 0..500 {
            let len = rng.gen_range(0..300);
            let bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let result = std::panic::catch_unwind(|| {
                let _ = parse(&text, "fuzz.yaml");
            });
            assert!(result.is_ok(), "parse panicked (seed {seed}) on random bytes {bytes:?}");
        }
    }
}
