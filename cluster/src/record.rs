//! The records kept in etcd and their wire format: JSON, one value per key.
//!
//! Key layout under the configured prefix (e.g. `/stager/demo`):
//! - `{prefix}/nodes/{node}`: a [`NodeInfo`], attached to the node's lease, so it disappears
//!   when the node stops renewing it: the set of these keys *is* the set of live nodes.
//! - `{prefix}/volumes/{id}`: a [`VolumeRecord`] (decimal volume id), not leased: a volume
//!   outlives every node. Changed only by compare-and-put on its mod revision.
//! - `{prefix}/manager/{lease:016x}`: one key per manager candidate, attached to the
//!   candidate's lease, its value the node id. The candidate whose key has the lowest create
//!   revision is the resource manager (etcd's election recipe).
//!
//! JSON because operators read these with `etcdctl get --prefix /stager/demo` and because every
//! field can grow without a format version. Unknown fields are ignored (a newer node may add
//! some); missing required ones, wrong types, ids that do not match their key and broken
//! invariants (a replica named twice, the owner as its own replica, too many replicas, an
//! oversized value) are [`ClusterError::Malformed`] on read and
//! [`ClusterError::InvalidRecord`] on write: the same checks on both sides of the wire.

// Without the `etcd` feature only the types and their checks' tests use these.
#![cfg_attr(not(feature = "etcd"), allow(dead_code))]

use serde::{Deserialize, Serialize};

use crate::constants::{
    HISTORY_MAX, NODE_ID_BYTES_MAX, PREFIX_BYTES_MAX, RECORD_BYTES_MAX, REPLICAS_MAX, SAN_BYTES_MAX,
};
use crate::error::ClusterError;

/// A live node as it describes itself to the resource manager.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: String,
    /// Where the node fails together with others (a rack, a power feed); `None` counts as a
    /// domain of its own.
    #[serde(default)]
    pub fault_domain: Option<String>,
    /// The replication fabric's set-up listener (`host:port`).
    pub fabric_addr: String,
    /// NVMe/TCP listeners hosts can reach this node at (`host:port`).
    #[serde(default)]
    pub nvme_addrs: Vec<String>,
    /// Flash this node can still give to replica copies.
    pub flash_free_bytes: u64,
    /// Volume ids whose SAN this node can reach: only those may be placed here, since a replica
    /// must be able to destage its copy.
    #[serde(default)]
    pub sans_reachable: Vec<u32>,
    /// Volume ids whose SAN this node tried and could not reach (its last probe failed): a
    /// replica listed here for its volume is replaced. A volume in neither list has not been
    /// probed yet (its record is new to this node): no reason to replace anything.
    #[serde(default)]
    pub sans_unreachable: Vec<u32>,
    pub started_unix_ms: u64,
}

/// One volume's cluster state: who serves it, who keeps copies, under which epoch, and why its
/// effective policy is what it is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: u32,
    /// The node serving the volume (its source); empty while no node does.
    pub owner: String,
    /// Nodes keeping copies of the volume's dirty data (0 to 2, never the owner).
    #[serde(default)]
    pub replicas: Vec<String>,
    /// Bumped on every change of owner or replica set; stale epochs are fenced.
    pub epoch: u64,
    /// The policy the operator asked for (`write-back+1`, ...).
    pub requested: String,
    /// The policy in force; differs from `requested` while the cluster cannot honour it.
    pub effective: String,
    /// Why `effective` differs from `requested` (empty when they agree).
    #[serde(default)]
    pub reason: String,
    /// The newest transitions, oldest first, at most `HISTORY_MAX`.
    #[serde(default)]
    pub history: Vec<Transition>,
    /// Total time the volume spent with fewer copies than requested, not counting the
    /// current stretch (see `unprotected_since_unix_ms`).
    #[serde(default)]
    pub unprotected_ms: u64,
    /// When the current stretch of running below the requested policy began (0: it runs as
    /// requested). Written by the owner.
    #[serde(default)]
    pub unprotected_since_unix_ms: u64,
    /// Replicas the owner has not been able to reach over the fabric for a while (the link is
    /// cut though both nodes are alive): the resource manager replaces them. Written by the owner.
    #[serde(default)]
    pub unreachable: Vec<String>,
    /// The volume's SAN as its owner names it (`file:PATH` or an `iscsi://` URL): what other
    /// nodes probe to say whether they could destage a copy of it (`NodeInfo::sans_reachable`).
    #[serde(default)]
    pub san: String,
    /// The replicas whose copies are in sync: each holds every write the owner acknowledged
    /// that may not be on the SAN yet, so one of them may be destaged if the owner is lost.
    /// Written by the owner, which drops a replica from it *before* acknowledging any write that
    /// replica lacks (`Engine::confirm_copies`) and adds one once it is in sync again.
    #[serde(default)]
    pub in_sync: Vec<String>,
    /// The replica destaging its copy to the SAN because the owner was lost (empty: none).
    /// Chosen by the resource manager among the copies in sync, with an epoch bump. While it
    /// is set and `rescued_unix_ms` is 0, the owner writes nothing to the SAN and acknowledges
    /// no write, even if it comes back.
    #[serde(default)]
    pub rescuer: String,
    /// When the rescuer reported every entry of its copy on the SAN (0: not yet). Written by
    /// the rescuer; the SAN then holds every write the owner acknowledged.
    #[serde(default)]
    pub rescued_unix_ms: u64,
    /// With `rescued_unix_ms`: the owner's newest entry the rescue destaged (its sequence
    /// numbers). The SAN holds every entry of the owner up to there; the owner, back, skips to
    /// it before it writes the SAN again, and then ends the rescue (clears these fields).
    #[serde(default)]
    pub rescued_upto: u64,
    /// The rescuer serving the volume to hosts in its owner's place (empty: none), through a
    /// standby namespace of the same NQN and NSID (ANA multipath): write-through, from the SAN
    /// the rescue completed. Set by the rescuer itself once its rescue is done and the owner is
    /// still gone; cleared by it when it has stopped (`handback`), or by the resource manager
    /// once its node is gone (its SAN gate closed with its lease).
    #[serde(default)]
    pub server: String,
    /// A node other than the owner served the volume since the rescue: the SAN holds writes
    /// newer than anything in the owner's log, so the owner, back, drops its whole log of the
    /// volume rather than destage any of it. Cleared with the rescue.
    #[serde(default)]
    pub served: bool,
    /// The owner is back and asks `server` to stop serving, so that it can serve again.
    #[serde(default)]
    pub handback: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub at_unix_ms: u64,
    pub what: String,
}

impl VolumeRecord {
    /// Appends a transition, dropping the oldest ones beyond `HISTORY_MAX` so the record stays
    /// bounded however long the volume lives.
    pub fn push_transition(&mut self, at_unix_ms: u64, what: impl Into<String>) {
        self.history.push(Transition { at_unix_ms, what: what.into() });
        if self.history.len() > HISTORY_MAX {
            let excess = self.history.len() - HISTORY_MAX;
            self.history.drain(..excess);
        }
    }
}

/// A node id: 1 to 31 letters, digits, `.`, `_` or `-` (what a replica writes into its flash
/// superblock, and what stagerd's `node.id` accepts).
pub fn check_node_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= NODE_ID_BYTES_MAX
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!("{id:?} is not a node id: 1 to {NODE_ID_BYTES_MAX} letters, digits, `.`, `_` or `-`"))
    }
}

/// An etcd endpoint as `ClusterConfig::endpoints` takes it: `host:port`, no scheme (plain
/// HTTP/2), no spaces.
pub fn check_endpoint(e: &str) -> Result<(), String> {
    let port_ok = e.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !port_ok || e.chars().any(char::is_whitespace) || e.contains("://") {
        return Err(format!("{e:?} is not host:port"));
    }
    Ok(())
}

/// A key prefix: `/` then printable ASCII without spaces, no trailing `/`.
pub fn check_prefix(prefix: &str) -> Result<(), String> {
    if !prefix.starts_with('/') || prefix.len() < 2 {
        return Err(format!("{prefix:?} must start with `/` and name something, e.g. /stager/demo"));
    }
    if prefix.ends_with('/') {
        return Err(format!("{prefix:?} must not end with `/`"));
    }
    if prefix.len() > PREFIX_BYTES_MAX {
        return Err(format!("{prefix:?} is longer than {PREFIX_BYTES_MAX} bytes"));
    }
    if !prefix.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("{:?} may hold only printable ASCII without spaces", prefix.escape_debug().to_string()));
    }
    Ok(())
}

impl NodeInfo {
    pub(crate) fn check(&self) -> Result<(), String> {
        check_node_id(&self.id)?;
        if self.fabric_addr.is_empty() {
            return Err("fabric_addr is empty".to_string());
        }
        if let Some(d) = &self.fault_domain {
            if d.is_empty() {
                return Err("fault_domain is empty (leave it out instead)".to_string());
            }
        }
        Ok(())
    }
}

impl VolumeRecord {
    pub(crate) fn check(&self) -> Result<(), String> {
        if !self.owner.is_empty() {
            check_node_id(&self.owner).map_err(|e| format!("owner: {e}"))?;
        }
        if self.replicas.len() > REPLICAS_MAX {
            return Err(format!("{} replicas; at most {REPLICAS_MAX}", self.replicas.len()));
        }
        for (i, r) in self.replicas.iter().enumerate() {
            check_node_id(r).map_err(|e| format!("replicas[{i}]: {e}"))?;
            if *r == self.owner {
                return Err(format!("replicas[{i}]: {r:?} is the owner"));
            }
            if self.replicas[..i].contains(r) {
                return Err(format!("replicas[{i}]: {r:?} is named twice"));
            }
        }
        if self.history.len() > HISTORY_MAX {
            return Err(format!("{} history entries; at most {HISTORY_MAX}", self.history.len()));
        }
        if self.unreachable.len() > REPLICAS_MAX {
            return Err(format!("{} unreachable replicas; at most {REPLICAS_MAX}", self.unreachable.len()));
        }
        for (i, r) in self.unreachable.iter().enumerate() {
            check_node_id(r).map_err(|e| format!("unreachable[{i}]: {e}"))?;
        }
        for (i, r) in self.in_sync.iter().enumerate() {
            // A copy in sync is a copy of a replica the record names (so at most REPLICAS_MAX).
            if !self.replicas.contains(r) || self.in_sync[..i].contains(r) {
                return Err(format!("in_sync[{i}]: {r:?} is not one of the replicas, or named twice"));
            }
        }
        if !self.rescuer.is_empty() && !self.replicas.contains(&self.rescuer) {
            return Err(format!("rescuer: {:?} is not one of the replicas", self.rescuer));
        }
        if self.rescuer.is_empty() && (self.rescued_unix_ms != 0 || self.rescued_upto != 0) {
            return Err("rescued_unix_ms or rescued_upto is set without a rescuer".to_string());
        }
        if !self.server.is_empty() && (self.server != self.rescuer || self.rescued_unix_ms == 0) {
            return Err(format!("server: {:?} is not a rescuer whose rescue is done", self.server));
        }
        if self.served && self.rescuer.is_empty() {
            return Err("served is set without a rescuer".to_string());
        }
        if self.handback && self.server.is_empty() {
            return Err("handback is set without a server".to_string());
        }
        if self.san.len() > SAN_BYTES_MAX {
            return Err(format!("san: {} bytes; at most {SAN_BYTES_MAX}", self.san.len()));
        }
        Ok(())
    }
}

/// Where each record lives under one prefix.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str) -> Keys {
        Keys { prefix: prefix.to_string() }
    }
    pub(crate) fn nodes(&self) -> String {
        format!("{}/nodes/", self.prefix)
    }
    pub(crate) fn node(&self, id: &str) -> String {
        format!("{}/nodes/{id}", self.prefix)
    }
    pub(crate) fn volumes(&self) -> String {
        format!("{}/volumes/", self.prefix)
    }
    pub(crate) fn volume(&self, id: u32) -> String {
        format!("{}/volumes/{id}", self.prefix)
    }
    pub(crate) fn manager(&self) -> String {
        format!("{}/manager/", self.prefix)
    }
    pub(crate) fn candidate(&self, lease: i64) -> String {
        format!("{}/manager/{lease:016x}", self.prefix)
    }
    /// The volume id a key under `volumes()` names, if it is one.
    pub(crate) fn volume_id(&self, key: &str) -> Option<u32> {
        let id = key.strip_prefix(&self.volumes())?;
        // Only the canonical decimal form: `007` or `+7` would be a second key for volume 7.
        if id.is_empty() || (id.len() > 1 && id.starts_with('0')) || !id.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        id.parse().ok()
    }
}

pub(crate) fn encode_node(keys: &Keys, info: &NodeInfo) -> Result<Vec<u8>, ClusterError> {
    let key = keys.node(&info.id);
    info.check().map_err(|detail| ClusterError::InvalidRecord { key: key.clone(), detail })?;
    encode(&key, info)
}

pub(crate) fn encode_volume(keys: &Keys, rec: &VolumeRecord) -> Result<Vec<u8>, ClusterError> {
    let key = keys.volume(rec.id);
    rec.check().map_err(|detail| ClusterError::InvalidRecord { key: key.clone(), detail })?;
    encode(&key, rec)
}

fn encode<T: Serialize>(key: &str, value: &T) -> Result<Vec<u8>, ClusterError> {
    let bytes = serde_json::to_vec(value)
        .map_err(|e| ClusterError::InvalidRecord { key: key.to_string(), detail: e.to_string() })?;
    if bytes.len() > RECORD_BYTES_MAX {
        return Err(ClusterError::InvalidRecord {
            key: key.to_string(),
            detail: format!("{} bytes of JSON; at most {RECORD_BYTES_MAX}", bytes.len()),
        });
    }
    Ok(bytes)
}

/// Decodes the node record stored at `key` (a key under `keys.nodes()`).
pub(crate) fn decode_node(keys: &Keys, key: &[u8], value: &[u8]) -> Result<NodeInfo, ClusterError> {
    let key_text = String::from_utf8_lossy(key).into_owned();
    let malformed = |detail: String| ClusterError::Malformed { key: key_text.clone(), detail };
    let info: NodeInfo = decode(value).map_err(malformed)?;
    info.check().map_err(malformed)?;
    if key_text != keys.node(&info.id) {
        return Err(malformed(format!("names node {:?}, not the one its key names", info.id)));
    }
    Ok(info)
}

/// Decodes the volume record stored at `key` (a key under `keys.volumes()`).
pub(crate) fn decode_volume(keys: &Keys, key: &[u8], value: &[u8]) -> Result<VolumeRecord, ClusterError> {
    let key_text = String::from_utf8_lossy(key).into_owned();
    let malformed = |detail: String| ClusterError::Malformed { key: key_text.clone(), detail };
    let id = keys.volume_id(&key_text).ok_or_else(|| malformed("the key is not a volume id".to_string()))?;
    let rec: VolumeRecord = decode(value).map_err(malformed)?;
    rec.check().map_err(malformed)?;
    if rec.id != id {
        return Err(malformed(format!("holds volume {}, not volume {id}", rec.id)));
    }
    Ok(rec)
}

fn decode<T: for<'de> Deserialize<'de>>(value: &[u8]) -> Result<T, String> {
    if value.len() > RECORD_BYTES_MAX {
        return Err(format!("{} bytes; at most {RECORD_BYTES_MAX}", value.len()));
    }
    serde_json::from_slice(value).map_err(|e| format!("not a record: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn volume(id: u32) -> VolumeRecord {
        VolumeRecord {
            id,
            owner: "node-a".into(),
            replicas: vec!["node-b".into()],
            epoch: 3,
            requested: "write-back+1".into(),
            effective: "write-back+1".into(),
            reason: String::new(),
            history: vec![Transition { at_unix_ms: 1, what: "created".into() }],
            unprotected_ms: 0,
            unprotected_since_unix_ms: 0,
            unreachable: Vec::new(),
            san: String::new(),
            in_sync: vec!["node-b".into()],
            rescuer: String::new(),
            rescued_unix_ms: 0,
            rescued_upto: 0,
            server: String::new(),
            served: false,
            handback: false,
        }
    }

    #[test]
    fn volume_round_trips() {
        let keys = Keys::new("/stager/t");
        let rec = volume(7);
        let bytes = encode_volume(&keys, &rec).unwrap();
        assert_eq!(decode_volume(&keys, b"/stager/t/volumes/7", &bytes).unwrap(), rec);
    }

    #[test]
    fn node_round_trips() {
        let keys = Keys::new("/stager/t");
        let info = NodeInfo {
            id: "node-a".into(),
            fault_domain: Some("rack1".into()),
            fabric_addr: "127.0.0.1:4520".into(),
            nvme_addrs: vec!["127.0.0.1:4420".into()],
            flash_free_bytes: 1 << 30,
            sans_reachable: vec![1, 2],
            sans_unreachable: vec![],
            started_unix_ms: 5,
        };
        let bytes = encode_node(&keys, &info).unwrap();
        assert_eq!(decode_node(&keys, b"/stager/t/nodes/node-a", &bytes).unwrap(), info);
        assert!(matches!(decode_node(&keys, b"/stager/t/nodes/node-b", &bytes), Err(ClusterError::Malformed { .. })));
    }

    #[test]
    fn malformed_volumes_are_errors_naming_the_key() {
        let keys = Keys::new("/stager/t");
        let good = serde_json::to_string(&volume(7)).unwrap();
        let cases: Vec<(&[u8], String, &str)> = vec![
            (b"/stager/t/volumes/7", "{".into(), "not a record"),
            (b"/stager/t/volumes/7", "[]".into(), "not a record"),
            (b"/stager/t/volumes/7", "\u{0}\u{1}".into(), "not a record"),
            (b"/stager/t/volumes/7", good.replace("\"epoch\":3", "\"epoch\":-3"), "not a record"),
            (b"/stager/t/volumes/7", good.replace("\"epoch\":3,", ""), "missing field `epoch`"),
            (b"/stager/t/volumes/8", good.clone(), "not volume 8"),
            (b"/stager/t/volumes/007", good.clone(), "not a volume id"),
            (b"/stager/t/volumes/x", good.clone(), "not a volume id"),
            (b"/stager/t/volumes/7", good.replace("[\"node-b\"]", "[\"node-b\",\"node-b\"]"), "named twice"),
            (b"/stager/t/volumes/7", good.replace("[\"node-b\"]", "[\"node-a\"]"), "is the owner"),
            (b"/stager/t/volumes/7", good.replace("[\"node-b\"]", "[\"b\",\"c\",\"d\"]"), "at most 2"),
            (b"/stager/t/volumes/7", good.replace("\"node-a\"", "\"bad id!\""), "owner"),
            (b"/stager/t/volumes/7", " ".repeat(RECORD_BYTES_MAX + 1), "bytes; at most"),
        ];
        for (key, value, needle) in cases {
            match decode_volume(&keys, key, value.as_bytes()) {
                Err(e @ ClusterError::Malformed { .. }) => {
                    let msg = e.to_string();
                    assert!(msg.contains(std::str::from_utf8(key).unwrap()), "{msg}");
                    assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
                }
                other => panic!("{value:.80}: {other:?}"),
            }
        }
    }

    #[test]
    fn invalid_records_are_refused_before_writing() {
        let keys = Keys::new("/stager/t");
        let mut rec = volume(1);
        rec.replicas = vec!["node-a".into()];
        assert!(matches!(encode_volume(&keys, &rec), Err(ClusterError::InvalidRecord { .. })));
        let mut rec = volume(1);
        rec.reason = "x".repeat(RECORD_BYTES_MAX);
        assert!(matches!(encode_volume(&keys, &rec), Err(ClusterError::InvalidRecord { .. })));
        let mut rec = volume(1);
        rec.in_sync = vec!["node-c".into()];
        assert!(matches!(encode_volume(&keys, &rec), Err(ClusterError::InvalidRecord { .. })), "not a replica");
        rec.in_sync = vec!["node-b".into(), "node-b".into()];
        assert!(matches!(encode_volume(&keys, &rec), Err(ClusterError::InvalidRecord { .. })), "twice");
        let mut rec = volume(1);
        rec.rescuer = "node-c".into();
        assert!(matches!(encode_volume(&keys, &rec), Err(ClusterError::InvalidRecord { .. })), "rescuer");
        rec.rescuer = String::new();
        rec.rescued_unix_ms = 5;
        assert!(matches!(encode_volume(&keys, &rec), Err(ClusterError::InvalidRecord { .. })), "rescued");
    }

    #[test]
    fn history_stays_bounded() {
        let mut rec = volume(1);
        for i in 0..HISTORY_MAX as u64 * 2 {
            rec.push_transition(i, format!("t{i}"));
        }
        assert_eq!(rec.history.len(), HISTORY_MAX);
        assert_eq!(rec.history.last().unwrap().at_unix_ms, HISTORY_MAX as u64 * 2 - 1);
        rec.check().unwrap();
    }

    #[test]
    fn endpoints() {
        for good in ["127.0.0.1:2379", "etcd-1.example:2379", "[::1]:2379"] {
            assert!(check_endpoint(good).is_ok(), "{good:?}");
        }
        for bad in ["", "127.0.0.1", ":2379", "h:99999", "http://h:2379", "h :1"] {
            assert!(check_endpoint(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn prefixes_and_ids() {
        assert!(check_prefix("/stager/demo").is_ok());
        for bad in ["stager", "/", "/stager/", "/sta ger", ""] {
            assert!(check_prefix(bad).is_err(), "{bad:?}");
        }
        assert!(check_node_id("node-a.1_x").is_ok());
        for bad in ["", "a b", "x".repeat(32).as_str(), "é"] {
            assert!(check_node_id(bad).is_err(), "{bad:?}");
        }
        let keys = Keys::new("/p");
        assert_eq!(keys.volume_id("/p/volumes/0"), Some(0));
        assert_eq!(keys.volume_id("/p/volumes/4294967295"), Some(u32::MAX));
        assert_eq!(keys.volume_id("/p/volumes/4294967296"), None);
        assert_eq!(keys.volume_id("/p/volumes/+1"), None);
    }
}
