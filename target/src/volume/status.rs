//! What `stagerctl status` shows and the management socket returns: per flash device and per
//! volume, the requested and effective policies, the flash footprint (dirty, clean cached,
//! replica bytes), each replica link, the copies a device keeps for peers, destage progress and
//! SAN health. Plain serde structs, so the daemon and the CLI share one definition of the JSON.

use serde::{Deserialize, Serialize};
use stager_policy::{Engine, EngineState, LinkStatus, VolumeId, VolumeMetrics};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    pub pid: u32,
    pub uptime_s: f64,
    pub devices: Vec<DeviceStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceStatus {
    pub name: String,
    pub path: String,
    pub device_id: u64,
    pub state: String,
    /// A flash write failed: every volume on it runs write-through until its log drains.
    pub degraded: bool,
    /// Degraded, and its errors go on (one within the last second): the device is failing.
    #[serde(default)]
    pub failing: bool,
    pub log_capacity_bytes: u64,
    pub log_used_bytes: u64,
    pub cache_capacity_bytes: u64,
    pub volumes: Vec<VolumeStatus>,
    /// Copies this device keeps of other nodes' volumes (write-back+N replicas).
    #[serde(default)]
    pub copies: Vec<CopyStatus>,
    /// Bytes this device's links wrote over the fabric, and writes that had to be copied to
    /// leave (links up now).
    #[serde(default)]
    pub fabric_write_bytes: u64,
    #[serde(default)]
    pub fabric_staged_copies: u64,
    /// What replay found when the device was opened (damage, lost entries), if it was replayed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay: Option<ReplaySummary>,
}

/// What log replay found, as `stagerctl status` and `stagerctl flash inspect` show it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ReplaySummary {
    pub frames: u64,
    pub entries: u64,
    /// Why replay stopped where it did (the torn tail, or the end of the written log).
    pub stop_reason: String,
    /// Acknowledged frames found damaged, and the entries they held (their blocks are lost).
    pub damaged_frames: u64,
    pub lost_entries: u64,
    /// Damaged regions whose entries could not be read at all: every block of every volume that
    /// had data above its watermark is marked lost.
    pub unknown_regions: u64,
    /// Blocks newly marked lost by this replay, over all volumes.
    pub lost_blocks: u64,
    /// Frame headers read from their mirror half.
    pub repaired_headers: u64,
    pub damage: Vec<String>,
}

impl ReplaySummary {
    pub fn of(r: &stager_policy::ReplayReport) -> ReplaySummary {
        ReplaySummary {
            frames: r.frames,
            entries: r.entries,
            stop_reason: r.stop_reason.clone(),
            damaged_frames: r.damaged_frames,
            lost_entries: r.lost_entries,
            unknown_regions: r.unknown_regions,
            lost_blocks: r.lost_blocks,
            repaired_headers: r.repaired_headers,
            damage: r.damage.clone(),
        }
    }

    /// Whether replay found acknowledged data it could not recover.
    pub fn lost_data(&self) -> bool {
        self.damaged_frames > 0 || self.lost_entries > 0 || self.unknown_regions > 0 || self.lost_blocks > 0
    }
}

/// A copy of a peer's volume kept on this device.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CopyStatus {
    pub volume: u32,
    /// The node whose volume it is.
    pub source: String,
    /// Log bytes of entries not yet covered by the watermark the source published.
    pub bytes: u64,
    /// `receiving` while the source's link is up, else `idle` (kept for when it comes back,
    /// or for `stagerctl flash destage` if it never does).
    pub link: String,
    pub durable_seq: u64,
    pub watermark: u64,
    /// Replay found damage in this copy: it is incomplete (its source resends it when it
    /// reconnects; `stagerctl flash destage` would not be complete).
    #[serde(default)]
    pub damaged: bool,
    /// Its owner was lost and this node destages the copy to the volume's SAN: `destaging`
    /// (with `rescue_bytes` to go) or `done` (every entry it held is on the SAN); empty when
    /// no rescue is under way.
    #[serde(default)]
    pub rescue: String,
    #[serde(default)]
    pub rescue_bytes: u64,
    /// The owner's newest entry the rescue destages: once `done`, the SAN holds every entry of
    /// the owner up to this sequence number.
    #[serde(default)]
    pub rescue_upto: u64,
    /// The rescued copy is served to hosts in its owner's place (a `kind: standby` namespace).
    #[serde(default)]
    pub serving: bool,
    /// Host commands of the served copy not completed yet.
    #[serde(default)]
    pub host_commands: u64,
}

/// One of a replicated volume's links, as its source sees it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub node: String,
    /// `in-sync`, `syncing until seq N`, or `down`.
    pub state: String,
    /// Every entry up to this one is durable on the replica.
    pub durable_seq: u64,
    /// The destaged watermark the replica has persisted (its copy holds nothing older).
    pub watermark: u64,
    pub records_sent: u64,
    pub bytes_sent: u64,
    /// Records that waited for ring space or the fabric (each cost one copy).
    pub backlogged_records: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub id: u32,
    /// `subsystem-nqn/nsid` the volume is exported as.
    pub export: String,
    pub san: String,
    pub requested_policy: String,
    pub effective_policy: String,
    /// Why effective differs from requested (`as-requested` when it does not).
    pub reason: String,
    pub dirty_bytes: u64,
    pub clean_cached_bytes: u64,
    /// Copies of this volume's dirty data on its replicas (dirty bytes × replicas attached).
    pub replica_bytes: u64,
    /// Its replicas (write-back+N), in the order configured.
    #[serde(default)]
    pub replicas: Vec<ReplicaStatus>,
    pub destaged_bytes_total: u64,
    pub destage_rate_bytes_per_s: f64,
    pub destage_depth: usize,
    pub san_latency_us: f64,
    pub san_reachable: bool,
    pub san_errors: u64,
    /// While the SAN is unreachable: since when (seconds since the Unix epoch), for how long,
    /// and the latest reason its client gives (e.g. "no answer to a command within 5000 ms").
    #[serde(default)]
    pub san_unreachable_since_unix_s: Option<f64>,
    #[serde(default)]
    pub san_unreachable_for_s: Option<f64>,
    #[serde(default)]
    pub san_last_error: Option<String>,
    pub watermark: u64,
    pub persisted_watermark: u64,
    pub watermark_lag_entries: u64,
    pub read_hit_ratio: f64,
    pub read_hits_dirty: u64,
    pub read_hits_clean: u64,
    pub read_misses: u64,
    pub log_full_waits: u64,
    pub log_full_fallthroughs: u64,
    /// Of the writes of a full log, those over dirty blocks that went to the SAN at once and
    /// voided the blocks' older entries (a data-less `SanWritten` entry each).
    #[serde(default)]
    pub log_full_supersedes: u64,
    pub busy_returns: u64,
    /// Blocks whose acknowledged data was in a damaged part of the log: reads of them answer
    /// Unrecovered Read Error until they are written again or the loss is accepted.
    #[serde(default)]
    pub lost_blocks: u64,
    /// Host reads refused because they touched a lost block.
    #[serde(default)]
    pub lost_reads: u64,
    /// In a cluster: the generation of the volume's copies (bumped at start and when an in-sync
    /// replica's link is lost) and the one the cluster's record last confirmed; while they
    /// differ, `held_acks` write acknowledgements wait (`Engine::confirm_copies`).
    #[serde(default)]
    pub copies_generation: u64,
    #[serde(default)]
    pub copies_confirmed: u64,
    #[serde(default)]
    pub held_acks: u64,
}

impl VolumeStatus {
    pub fn from_metrics(m: &VolumeMetrics, export: String, san: String, clean_cached_bytes: u64) -> VolumeStatus {
        VolumeStatus {
            id: m.id.0,
            export,
            san,
            requested_policy: m.requested.to_string(),
            effective_policy: m.effective.to_string(),
            reason: match m.reason {
                stager_policy::EffectiveReason::AsRequested => "as-requested".into(),
                stager_policy::EffectiveReason::FlashDegraded => "flash-degraded".into(),
                stager_policy::EffectiveReason::ReplicaUnavailable => "replica-unavailable".into(),
                stager_policy::EffectiveReason::ReplicaSyncing => "replica-syncing".into(),
                stager_policy::EffectiveReason::ServingRescuedCopy => "serving-rescued-copy".into(),
            },
            dirty_bytes: m.dirty_bytes,
            clean_cached_bytes,
            replica_bytes: 0,
            replicas: Vec::new(),
            destaged_bytes_total: m.destaged_bytes_total,
            destage_rate_bytes_per_s: m.destage_rate_bytes_per_s,
            destage_depth: m.destage_depth,
            san_latency_us: m.san_latency_ns_ewma / 1000.0,
            san_reachable: m.san_reachable,
            san_errors: m.san_errors,
            san_unreachable_since_unix_s: None,
            san_unreachable_for_s: None,
            san_last_error: None,
            watermark: m.watermark.0,
            persisted_watermark: m.persisted_watermark.0,
            watermark_lag_entries: m.watermark_lag_entries,
            read_hit_ratio: m.hit_ratio(),
            read_hits_dirty: m.read_hits_dirty,
            read_hits_clean: m.read_hits_clean,
            read_misses: m.read_misses,
            log_full_waits: m.log_full_waits,
            log_full_fallthroughs: m.log_full_fallthroughs,
            log_full_supersedes: m.log_full_supersedes,
            busy_returns: m.busy_returns,
            lost_blocks: m.lost_blocks,
            lost_reads: m.lost_reads,
            copies_generation: 0,
            copies_confirmed: 0,
            held_acks: 0,
        }
    }
}

impl DeviceStatus {
    /// A device's status from its engine; `describe` gives each volume's export and SAN names.
    pub fn of_engine(
        name: &str,
        path: &str,
        e: &Engine,
        describe: impl Fn(VolumeId) -> (String, String),
    ) -> DeviceStatus {
        let state = match e.state() {
            EngineState::Formatting => "formatting".to_string(),
            EngineState::Recovering => "recovering".to_string(),
            EngineState::Ready => "ready".to_string(),
            EngineState::Failed(why) => format!("failed: {why}"),
        };
        let links = e.link_status();
        let copies_held = e.replica_copies();
        let volumes = e
            .volume_ids()
            .into_iter()
            .filter(|id| !copies_held.iter().any(|(c, _, _)| c == id))
            .filter_map(|id| {
                let m = e.volume_metrics(id)?;
                let (export, san) = describe(id);
                let mut v = VolumeStatus::from_metrics(&m, export, san, e.clean_cached_bytes(id));
                let wanted = e.volume_replicas(id);
                let copies = e.volume_copies(id);
                if copies > 0 && m.requested == stager_policy::WritePolicy::WriteBack {
                    v.requested_policy = format!("write-back+{copies}");
                }
                v.replicas = wanted.iter().map(|node| replica_status(node, id, &links)).collect();
                if let Some((generation, confirmed)) = e.copies_generation(id) {
                    v.copies_generation = generation;
                    v.copies_confirmed = confirmed;
                }
                v.held_acks = e.held_acks(id) as u64;
                let attached = v.replicas.iter().filter(|r| r.state != "down").count() as u64;
                v.replica_bytes = m.dirty_bytes * attached;
                Some(v)
            })
            .collect();
        let copies = copies_held
            .into_iter()
            .map(|(id, source, bytes)| {
                let l = links.iter().find(|l| l.volume == id && l.role == "source");
                CopyStatus {
                    volume: id.0,
                    source,
                    bytes,
                    link: if l.is_some() { "receiving".into() } else { "idle".into() },
                    durable_seq: e.copy_received(id).map_or(0, |s| s.0),
                    watermark: e.volume_metrics(id).map_or(0, |m| m.persisted_watermark.0),
                    damaged: e.copy_damaged(id),
                    rescue: match e.rescue_state(id) {
                        None => String::new(),
                        Some(r) if r.done => "done".into(),
                        Some(_) => "destaging".into(),
                    },
                    rescue_bytes: e.rescue_state(id).map_or(0, |r| r.bytes_left),
                    rescue_upto: e.rescue_state(id).map_or(0, |r| r.upto.0),
                    serving: e.serving(id),
                    host_commands: e.served_ops(id) as u64,
                }
            })
            .collect();
        DeviceStatus {
            name: name.to_string(),
            path: path.to_string(),
            device_id: e.device_id(),
            state,
            degraded: e.flash_degraded(),
            failing: e.flash_failing(),
            log_capacity_bytes: e.log_capacity_bytes(),
            log_used_bytes: e.log_used_bytes(),
            cache_capacity_bytes: e.cache_capacity_bytes(),
            volumes,
            copies,
            fabric_write_bytes: 0,
            fabric_staged_copies: 0,
            replay: e.replay_report().map(ReplaySummary::of),
        }
    }
}

fn replica_status(node: &str, id: VolumeId, links: &[LinkStatus]) -> ReplicaStatus {
    match links.iter().find(|l| l.volume == id && l.role == "replica" && l.peer == node) {
        Some(l) => ReplicaStatus {
            node: node.to_string(),
            state: l.state.clone(),
            durable_seq: l.durable.0,
            watermark: l.watermark.0,
            records_sent: l.records,
            bytes_sent: l.bytes,
            backlogged_records: l.backlogged,
        },
        None => ReplicaStatus {
            node: node.to_string(),
            state: "down".into(),
            durable_seq: 0,
            watermark: 0,
            records_sent: 0,
            bytes_sent: 0,
            backlogged_records: 0,
        },
    }
}

/// Bytes as people read them: `1.5 GiB`.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A volume's SAN state in words: `reachable`, or since when it is not and why.
fn san_state(v: &VolumeStatus) -> String {
    if v.san_reachable {
        return "reachable".into();
    }
    let mut s = String::from("UNREACHABLE");
    if let Some(for_s) = v.san_unreachable_for_s {
        s += &format!(" for {for_s:.0} s");
    }
    if let Some(why) = &v.san_last_error {
        s += &format!(" ({why})");
    }
    s + "; dirty data kept in flash, host I/O that needs the SAN gets a retryable error, retrying"
}

/// The table `stagerctl status` prints.
pub fn render(s: &NodeStatus) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "stagerd pid {}, up {:.0} s", s.pid, s.uptime_s);
    for d in &s.devices {
        let _ = writeln!(
            out,
            "\nflash {} ({}), device id {:#x}: {}{}\n  log {} of {} used, clean cache capacity {}",
            d.name,
            d.path,
            d.device_id,
            d.state,
            if d.degraded { ", DEGRADED (write errors: volumes run write-through)" } else { "" },
            human_bytes(d.log_used_bytes),
            human_bytes(d.log_capacity_bytes),
            human_bytes(d.cache_capacity_bytes),
        );
        if let Some(r) = d.replay.as_ref().filter(|r| r.lost_data()) {
            let _ = writeln!(
                out,
                "  LOG DAMAGE found at start: {} damaged frame(s), {} entries lost, {} unreadable region(s); \
                 {} block(s) marked lost",
                r.damaged_frames, r.lost_entries, r.unknown_regions, r.lost_blocks
            );
            for line in &r.damage {
                let _ = writeln!(out, "    {line}");
            }
        }
        for v in &d.volumes {
            let policy = if v.requested_policy == v.effective_policy {
                v.effective_policy.clone()
            } else {
                format!("{} (requested {}, {})", v.effective_policy, v.requested_policy, v.reason)
            };
            let _ = writeln!(
                out,
                "  volume {} = {}  policy {}\n    footprint: dirty {}, clean cached {}, replica {}\n    \
                 destage: {}/s, depth {}, {} destaged, watermark lag {} entries\n    \
                 SAN {}: {}, latency {:.0} µs, {} errors\n    reads: hit ratio {:.1}% ({} dirty hits, {} clean hits, {} misses)",
                v.id,
                v.export,
                policy,
                human_bytes(v.dirty_bytes),
                human_bytes(v.clean_cached_bytes),
                human_bytes(v.replica_bytes),
                human_bytes(v.destage_rate_bytes_per_s as u64),
                v.destage_depth,
                human_bytes(v.destaged_bytes_total),
                v.watermark_lag_entries,
                v.san,
                san_state(v),
                v.san_latency_us,
                v.san_errors,
                v.read_hit_ratio * 100.0,
                v.read_hits_dirty,
                v.read_hits_clean,
                v.read_misses,
            );
            for r in &v.replicas {
                let _ = writeln!(
                    out,
                    "    replica {}: {}, durable to seq {}, knows watermark {}, {} sent in {} records{}",
                    r.node,
                    r.state,
                    r.durable_seq,
                    r.watermark,
                    human_bytes(r.bytes_sent),
                    r.records_sent,
                    if r.backlogged_records > 0 {
                        format!(" ({} waited for room)", r.backlogged_records)
                    } else {
                        String::new()
                    },
                );
            }
            if v.copies_confirmed < v.copies_generation {
                let _ = writeln!(
                    out,
                    "    HELD: {} write acknowledgement(s) wait until the cluster records which replicas are in sync \
                     (copies generation {}, confirmed {})",
                    v.held_acks, v.copies_generation, v.copies_confirmed
                );
            }
            if v.lost_blocks > 0 {
                let _ = writeln!(
                    out,
                    "    LOST: {} block(s) ({}) of acknowledged data were in a damaged part of the log; reads of them \
                     answer Unrecovered Read Error ({} so far) until they are written again or the loss is accepted \
                     (stagerctl volume accept-loss {})",
                    v.lost_blocks,
                    human_bytes(v.lost_blocks * stager_policy::constants::BLOCK_SIZE_U64),
                    v.lost_reads,
                    v.id
                );
            }
        }
        for c in &d.copies {
            let _ = writeln!(
                out,
                "  copy of volume {} for node {}: replica {} ({}), durable to seq {}, source watermark {}{}",
                c.volume,
                c.source,
                human_bytes(c.bytes),
                c.link,
                c.durable_seq,
                c.watermark,
                if c.damaged { ", DAMAGED (incomplete until its source resends it)" } else { "" },
            );
            match c.rescue.as_str() {
                "destaging" => {
                    let _ = writeln!(
                        out,
                        "    RESCUE: its owner was lost; destaging this copy to the volume's SAN, {} to go",
                        human_bytes(c.rescue_bytes)
                    );
                }
                "done" => {
                    let _ = writeln!(out, "    RESCUE done: every entry of this copy is on the volume's SAN");
                }
                _ => {}
            }
            if c.serving {
                let _ = writeln!(
                    out,
                    "    SERVING to hosts in its owner's place (write-through to the SAN), {} command(s) in flight",
                    c.host_commands
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A volume's status as a daemon from before the outage fields sent it.
    fn volume(reachable: bool) -> VolumeStatus {
        let json = serde_json::json!({
            "id": 3, "export": "nqn.2026-11.dev.stager:x/1", "san": "iscsi://127.0.0.1:3260/iqn.x/1",
            "requested_policy": "write-back", "effective_policy": "write-back", "reason": "as-requested",
            "dirty_bytes": 0, "clean_cached_bytes": 0, "replica_bytes": 0, "destaged_bytes_total": 0,
            "destage_rate_bytes_per_s": 0.0, "destage_depth": 1, "san_latency_us": 0.0,
            "san_reachable": reachable, "san_errors": 0, "watermark": 0, "persisted_watermark": 0,
            "watermark_lag_entries": 0, "read_hit_ratio": 0.0, "read_hits_dirty": 0, "read_hits_clean": 0,
            "read_misses": 0, "log_full_waits": 0, "log_full_fallthroughs": 0, "busy_returns": 0
        });
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_lost_san_shows_since_when_and_why() {
        assert_eq!(san_state(&volume(true)), "reachable");
        let mut v = volume(false);
        assert!(san_state(&v).starts_with("UNREACHABLE; "), "{}", san_state(&v));
        v.san_unreachable_for_s = Some(12.4);
        v.san_last_error = Some("no answer to a command within 5000 ms (3 in flight)".into());
        let s = san_state(&v);
        assert!(s.starts_with("UNREACHABLE for 12 s (no answer to a command within 5000 ms (3 in flight)); "), "{s}");
        assert!(v.san_unreachable_since_unix_s.is_none(), "optional in the JSON of older daemons");
    }
}

/// The cluster as this node's cluster thread last read it from etcd (`stagerctl cluster`):
/// the live nodes, the resource manager, every volume record with its history.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterView {
    /// This node's id and the key prefix of its cluster.
    pub node: String,
    pub prefix: String,
    /// `alive`, or why this node's lease is not.
    pub lease: String,
    /// The elected resource manager, if any node holds the role.
    pub manager: Option<String>,
    pub nodes: Vec<stager_cluster::NodeInfo>,
    pub volumes: Vec<stager_cluster::VolumeRecord>,
    /// When it was read.
    pub at_unix_ms: u64,
}

/// `HH:MM:SS.mmm` (UTC) of a Unix time in milliseconds.
fn clock_ms(ms: u64) -> String {
    let day = ms % 86_400_000;
    format!("{:02}:{:02}:{:02}.{:03}", day / 3_600_000, day / 60_000 % 60, day / 1000 % 60, day % 1000)
}

/// The `stagerctl cluster` text.
pub fn render_cluster(c: &ClusterView) -> String {
    let mut out = format!(
        "cluster {} as node {} saw it at {} UTC: lease {}, resource manager {}\n",
        c.prefix,
        c.node,
        clock_ms(c.at_unix_ms),
        c.lease,
        c.manager.as_deref().unwrap_or("none")
    );
    out.push_str(&format!(
        "{:<12} {:<12} {:>12}  {:<14} {:<22} nvme\n",
        "node", "fault domain", "free flash", "SANs reachable", "fabric"
    ));
    for n in &c.nodes {
        let sans: Vec<String> = n.sans_reachable.iter().map(u32::to_string).collect();
        out.push_str(&format!(
            "{:<12} {:<12} {:>12}  {:<14} {:<22} {}\n",
            n.id,
            n.fault_domain.as_deref().unwrap_or("-"),
            human_bytes(n.flash_free_bytes),
            if sans.is_empty() { "-".to_string() } else { sans.join(",") },
            n.fabric_addr,
            n.nvme_addrs.join(",")
        ));
    }
    for v in &c.volumes {
        let live = |id: &str| c.nodes.iter().any(|n| n.id == id);
        let mark = |id: &str| if live(id) { id.to_string() } else { format!("{id} (GONE)") };
        let replicas: Vec<String> = v.replicas.iter().map(|r| mark(r)).collect();
        let unprotected_now =
            if v.unprotected_since_unix_ms > 0 { c.at_unix_ms.saturating_sub(v.unprotected_since_unix_ms) } else { 0 };
        out.push_str(&format!(
            "volume {}: owner {}, replicas [{}], epoch {}, SAN {}\n  requested {}, effective {}{}; unprotected {:.1} s in all{}\n",
            v.id,
            if v.owner.is_empty() { "none".to_string() } else { mark(&v.owner) },
            replicas.join(", "),
            v.epoch,
            if v.san.is_empty() { "-" } else { v.san.as_str() },
            v.requested,
            v.effective,
            if v.reason.is_empty() { String::new() } else { format!(" ({})", v.reason) },
            (v.unprotected_ms + unprotected_now) as f64 / 1000.0,
            if unprotected_now > 0 { format!(", now for {:.1} s", unprotected_now as f64 / 1000.0) } else { String::new() },
        ));
        if !v.replicas.is_empty() {
            let in_sync = if v.in_sync.is_empty() { "none".to_string() } else { v.in_sync.join(", ") };
            out.push_str(&format!("  copies in sync (may be destaged if the owner is lost): {in_sync}\n"));
        }
        if !v.unreachable.is_empty() {
            out.push_str(&format!("  unreachable from its owner: {}\n", v.unreachable.join(", ")));
        }
        if !v.rescuer.is_empty() {
            let state = match v.rescued_unix_ms {
                0 => "destaging its copy to the SAN; the owner may not write the SAN nor acknowledge".to_string(),
                t => format!("its copy is on the SAN since {}: the SAN holds every acknowledged write", clock_ms(t)),
            };
            out.push_str(&format!("  RESCUE by {}: {state}\n", v.rescuer));
        }
        if !v.server.is_empty() {
            let handback = if v.handback { "; the owner is back and asked for it" } else { "" };
            out.push_str(&format!("  SERVED by {} in its owner's place{handback}\n", v.server));
        }
        for t in &v.history {
            out.push_str(&format!("  {}  {}\n", clock_ms(t.at_unix_ms), t.what));
        }
    }
    out
}
