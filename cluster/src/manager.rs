//! What the cluster does about one volume record: pure functions, so every decision can be
//! tested (and replayed) without etcd or a running node.
//!
//! Two writers share a record, each through compare-and-put on its revision:
//! - the **resource manager** (the elected node, [`review`]) owns the replica set and the
//!   epoch: it replaces a replica whose node is gone (its lease expired), that cannot reach the
//!   volume's SAN any more, or that its owner reports unreachable over the fabric; it fills a
//!   set that is short of what the policy asks for when a node becomes eligible; every change
//!   bumps the epoch;
//! - the **owner** ([`owner_report`]) owns what it alone knows: the requested policy, the
//!   effective one and why, which replicas it cannot reach, how long the volume ran with fewer
//!   copies than requested, and its SAN's name.
//!
//! When the owner is gone (its lease expired) the manager makes a replica whose copy is in sync
//! the volume's **rescuer** (`VolumeRecord::rescuer`, an epoch bump): that node destages its copy
//! to the SAN and says when it is done, so the SAN then holds every acknowledged write; the owner
//! stays fenced from the SAN and from acknowledging until then, even if it comes back, and then
//! ends the rescue itself ([`end_rescue`]) once it has skipped past what it destaged. A rescuer
//! with a standby namespace then serves the volume ([`start_serving`], decided by the rescuer
//! itself) until the owner asks for it back ([`ask_handback`], [`stop_serving`]); the manager
//! only clears a `server` whose node is gone. An owner whose own flash failed starts a rescue
//! itself ([`rescue_for_failed_flash`]).

use crate::placement::choose_replicas;
use crate::record::{NodeInfo, VolumeRecord};

/// The copies a policy promises: `write-back+N` → N, anything else 0.
pub fn copies_of(policy: &str) -> usize {
    policy.strip_prefix("write-back+").and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// The resource manager's verdict on one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Review {
    /// Nothing to change.
    Keep,
    /// The record has an owner that is not alive, and no (other) rescue can be started: its
    /// copy in sync is being or has been destaged, or there is none on a live node.
    OwnerLost,
    /// Write this record (the replica set changed, the epoch is bumped, the transition is in
    /// its history); `why` says it in one line.
    Change { record: Box<VolumeRecord>, why: String },
}

/// Reviews `rec` against the live `nodes` at `now_unix_ms`.
pub fn review(rec: &VolumeRecord, nodes: &[NodeInfo], now_unix_ms: u64) -> Review {
    if rec.owner.is_empty() {
        return Review::Keep;
    }
    let owner = nodes.iter().find(|n| n.id == rec.owner);
    if let Some(r) = rescue(rec, owner.is_some(), nodes, now_unix_ms) {
        return r;
    }
    let Some(owner) = owner else { return Review::OwnerLost };
    let want = copies_of(&rec.requested);
    let mut lost: Vec<(String, &'static str)> = Vec::new();
    for r in &rec.replicas {
        let why = match nodes.iter().find(|n| &n.id == r) {
            None => Some("its node is gone (lease expired)"),
            Some(n) if n.sans_unreachable.contains(&rec.id) => Some("it cannot reach the volume's SAN"),
            Some(_) if rec.unreachable.contains(r) => Some("its owner cannot reach it over the fabric"),
            Some(_) => None,
        };
        if let Some(why) = why {
            lost.push((r.clone(), why));
        }
    }
    let keep: Vec<String> =
        rec.replicas.iter().filter(|r| !lost.iter().any(|(l, _)| l == *r)).take(want).cloned().collect();
    if lost.is_empty() && rec.replicas.len() == want {
        return Review::Keep;
    }
    // Never place a copy on a node just given up on, nor on one the owner cannot reach.
    let mut exclude: Vec<String> = lost.iter().map(|(l, _)| l.clone()).collect();
    exclude.extend(rec.unreachable.iter().cloned());
    // A kept replica stays even while its flash is full for the moment (its copies wait for
    // room; that is no reason to move it): only new candidates need free flash.
    let adjusted: Vec<NodeInfo> = nodes
        .iter()
        .map(|n| {
            let mut n = n.clone();
            if keep.contains(&n.id) {
                n.flash_free_bytes = n.flash_free_bytes.max(1);
            }
            n
        })
        .collect();
    let next = choose_replicas(rec.id, owner, want, &adjusted, &keep, &exclude);
    if next == rec.replicas {
        return Review::Keep;
    }
    let mut why = format!("replicas [{}] → [{}]", rec.replicas.join(", "), next.join(", "));
    for (l, w) in &lost {
        why.push_str(&format!("; {l}: {w}"));
    }
    if next.len() < want {
        why.push_str(&format!("; {} of {want} cop(ies) placeable now", next.len()));
    }
    let mut record = rec.clone();
    record.replicas = next;
    record.epoch += 1;
    record.unreachable.retain(|u| record.replicas.contains(u));
    record.in_sync.retain(|u| record.replicas.contains(u));
    why = format!("epoch {}: {why}", record.epoch);
    record.push_transition(now_unix_ms, why.clone());
    Review::Change { record: Box::new(record), why }
}

/// The rescue of a volume whose owner is gone: start one on a live node whose copy is in sync
/// and which reaches the SAN, move it to another such node if the rescuer is gone too before it
/// is done, end it once done and the owner is back. None: no rescue matters (the owner is
/// alive and none is recorded).
fn rescue(rec: &VolumeRecord, owner_alive: bool, nodes: &[NodeInfo], now_unix_ms: u64) -> Option<Review> {
    let able = |id: &String| nodes.iter().any(|n| &n.id == id && n.sans_reachable.contains(&rec.id));
    let mut record = rec.clone();
    let why = if rec.rescuer.is_empty() {
        if owner_alive {
            return None;
        }
        let r = rec.in_sync.iter().find(|r| able(r))?;
        record.rescuer = r.clone();
        format!("owner {} is gone: {r} destages its copy (in sync) to the SAN", rec.owner)
    } else if rec.rescued_unix_ms == 0 {
        if nodes.iter().any(|n| n.id == rec.rescuer) {
            return Some(if owner_alive { Review::Keep } else { Review::OwnerLost });
        }
        let Some(r) = rec.in_sync.iter().find(|r| **r != rec.rescuer && able(r)) else {
            return Some(Review::OwnerLost);
        };
        record.rescuer = r.clone();
        format!("the rescuer {} is gone too: {r} destages its copy (in sync) to the SAN", rec.rescuer)
    } else if !rec.server.is_empty() && !nodes.iter().any(|n| n.id == rec.server) {
        // Its SAN gate closed with its lease before etcd let the lease go: nothing more of it
        // reaches the SAN. Nobody serves until the owner is back (or this node is).
        record.server.clear();
        record.handback = false;
        format!("{} served the volume and is gone: nobody serves it now", rec.server)
    } else if owner_alive {
        // The owner ends it itself, once it has skipped past what the rescue destaged
        // (`end_rescue`): it must not write the SAN before, and must not miss the rescue.
        return Some(Review::Keep);
    } else {
        return Some(Review::OwnerLost);
    };
    record.epoch += 1;
    let why = format!("epoch {}: {why}", record.epoch);
    record.push_transition(now_unix_ms, why.clone());
    Some(Review::Change { record: Box::new(record), why })
}

/// The record the owner writes once back after a rescue it has absorbed (it skipped past
/// `rescued_upto`): the rescue fields cleared, the epoch bumped, the transition recorded.
pub fn end_rescue(rec: &VolumeRecord, failed_acks: usize, now_unix_ms: u64) -> VolumeRecord {
    let mut record = rec.clone();
    record.epoch += 1;
    let what = format!(
        "epoch {}: owner {} is back and skipped past the rescue by {} (up to seq {}); {failed_acks} write \
         acknowledgement(s) it held were failed",
        record.epoch, rec.owner, rec.rescuer, rec.rescued_upto
    );
    record.rescuer.clear();
    record.rescued_unix_ms = 0;
    record.rescued_upto = 0;
    record.server.clear();
    record.served = false;
    record.handback = false;
    record.push_transition(now_unix_ms, what);
    record
}

/// The record the owner writes when its own flash failed while it runs: a replica whose copy
/// the record names in sync, alive and reaching the SAN, destages its copy (a rescue, epoch
/// bump), since the owner cannot read its log back; the owner stays fenced from the SAN until
/// it is done, then skips past it and serves write-through. None when no such replica exists or
/// a rescue is under way already.
pub fn rescue_for_failed_flash(rec: &VolumeRecord, nodes: &[NodeInfo], now_unix_ms: u64) -> Option<VolumeRecord> {
    if !rec.rescuer.is_empty() {
        return None;
    }
    let able = |id: &String| nodes.iter().any(|n| &n.id == id && n.sans_reachable.contains(&rec.id));
    let r = rec.in_sync.iter().find(|r| able(r))?;
    let mut record = rec.clone();
    record.rescuer = r.clone();
    record.epoch += 1;
    let what = format!(
        "epoch {}: owner {}'s flash failed: {r} destages its copy (in sync) to the SAN",
        record.epoch, rec.owner
    );
    record.push_transition(now_unix_ms, what);
    Some(record)
}

/// The record the rescuer `me` writes to serve the volume in its owner's place, or None when it
/// may not: only once its rescue is done (the SAN holds every write the owner acknowledged),
/// while nobody serves it and the owner is gone (not in `nodes`).
pub fn start_serving(rec: &VolumeRecord, me: &str, nodes: &[NodeInfo], now_unix_ms: u64) -> Option<VolumeRecord> {
    let done = rec.rescuer == me && rec.rescued_unix_ms != 0;
    if !done || !rec.server.is_empty() || rec.handback || nodes.iter().any(|n| n.id == rec.owner) {
        return None;
    }
    let mut record = rec.clone();
    record.server = me.to_string();
    record.served = true;
    record.push_transition(
        now_unix_ms,
        format!("{me} serves the volume in place of its owner {} (write-through, from the SAN)", rec.owner),
    );
    Some(record)
}

/// The record the owner, back after a rescue whose rescuer serves the volume, writes to ask for
/// it back (None when it already has).
pub fn ask_handback(rec: &VolumeRecord, now_unix_ms: u64) -> Option<VolumeRecord> {
    if rec.server.is_empty() || rec.handback {
        return None;
    }
    let mut record = rec.clone();
    record.handback = true;
    record.push_transition(now_unix_ms, format!("owner {} is back and asks {} to stop serving", rec.owner, rec.server));
    Some(record)
}

/// The record the server writes once it has stopped serving: no host command of the volume is
/// left on it, and its path is inaccessible. `why` goes into the history.
pub fn stop_serving(rec: &VolumeRecord, why: &str, now_unix_ms: u64) -> VolumeRecord {
    let mut record = rec.clone();
    record.push_transition(now_unix_ms, format!("{} stopped serving the volume: {why}", rec.server));
    record.server.clear();
    record.handback = false;
    record
}

/// What the owner knows of its volume now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerView {
    pub requested: String,
    pub effective: String,
    /// Why effective differs from requested (empty when it does not).
    pub reason: String,
    /// Replicas whose link has been down long enough to count as unreachable.
    pub unreachable: Vec<String>,
    pub san: String,
    /// Replicas whose links are in sync now (the engine's copies generation it read them at is
    /// what the owner confirms once the record says no more than this).
    pub in_sync: Vec<String>,
}

/// The record the owner should write so it says what `view` says, or None when it already
/// does. The transitions of the effective policy go into the history with their time, and the
/// time spent below the requested policy is accounted.
pub fn owner_report(rec: &VolumeRecord, view: &OwnerView, now_unix_ms: u64) -> Option<VolumeRecord> {
    let mut r = rec.clone();
    let unreachable: Vec<String> = view.unreachable.iter().filter(|u| rec.replicas.contains(u)).cloned().collect();
    r.requested = view.requested.clone();
    r.unreachable = unreachable;
    r.san = view.san.clone();
    // Only replicas the record names: the owner may not have followed a new set yet.
    r.in_sync = view.in_sync.iter().filter(|u| rec.replicas.contains(u)).cloned().collect();
    if r.effective != view.effective || r.reason != view.reason {
        let what = if view.reason.is_empty() {
            format!("effective {} as requested", view.effective)
        } else {
            format!("effective {} (requested {}): {}", view.effective, view.requested, view.reason)
        };
        r.effective = view.effective.clone();
        r.reason = view.reason.clone();
        r.push_transition(now_unix_ms, what);
    }
    let below = r.effective != r.requested;
    if below && r.unprotected_since_unix_ms == 0 {
        r.unprotected_since_unix_ms = now_unix_ms.max(1);
    } else if !below && r.unprotected_since_unix_ms != 0 {
        r.unprotected_ms += now_unix_ms.saturating_sub(r.unprotected_since_unix_ms);
        r.unprotected_since_unix_ms = 0;
    }
    (r != *rec).then_some(r)
}

/// Whether a node that keeps a copy of `rec`'s volume may let it go: the record names other
/// replicas, and the owner is alive and reports the volume as requested (so its replicas in
/// force hold everything acknowledged that is not on the SAN, and this copy is no longer the
/// last one of anything). A copy of a volume without a record is kept.
pub fn may_discard_copy(rec: &VolumeRecord, me: &str, nodes: &[NodeInfo]) -> bool {
    !rec.replicas.iter().any(|r| r == me)
        && rec.owner != me
        && nodes.iter().any(|n| n.id == rec.owner)
        && rec.effective == rec.requested
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, domain: &str, free: u64, sans: &[u32]) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            fault_domain: Some(domain.into()),
            fabric_addr: "127.0.0.1:1".into(),
            nvme_addrs: vec![],
            flash_free_bytes: free,
            sans_reachable: sans.to_vec(),
            sans_unreachable: vec![],
            started_unix_ms: 0,
        }
    }

    fn rec(replicas: &[&str]) -> VolumeRecord {
        VolumeRecord {
            id: 1,
            owner: "a".into(),
            replicas: replicas.iter().map(|s| s.to_string()).collect(),
            epoch: 3,
            requested: "write-back+1".into(),
            effective: "write-back+1".into(),
            reason: String::new(),
            history: vec![],
            unprotected_ms: 0,
            unprotected_since_unix_ms: 0,
            unreachable: vec![],
            san: "file:/san".into(),
            in_sync: replicas.iter().map(|s| s.to_string()).collect(),
            rescuer: String::new(),
            rescued_unix_ms: 0,
            rescued_upto: 0,
            server: String::new(),
            served: false,
            handback: false,
        }
    }

    fn three() -> Vec<NodeInfo> {
        vec![node("a", "ra", 100, &[1]), node("b", "rb", 100, &[1]), node("c", "rc", 50, &[1])]
    }

    #[test]
    fn copies_come_from_the_policy_name() {
        assert_eq!(copies_of("write-back+2"), 2);
        assert_eq!(copies_of("write-back+1"), 1);
        for p in ["write-back", "write-through", "write-back+", "write-back+x", ""] {
            assert_eq!(copies_of(p), 0, "{p}");
        }
    }

    #[test]
    fn a_healthy_volume_is_left_alone() {
        assert_eq!(review(&rec(&["b"]), &three(), 10), Review::Keep);
    }

    #[test]
    fn scenario_a_a_dead_replica_is_replaced_and_the_epoch_bumped() {
        let nodes: Vec<NodeInfo> = three().into_iter().filter(|n| n.id != "b").collect();
        let Review::Change { record, why } = review(&rec(&["b"]), &nodes, 10) else { panic!() };
        assert_eq!(record.replicas, vec!["c".to_string()]);
        assert_eq!(record.epoch, 4);
        assert!(why.contains("lease expired"), "{why}");
        assert_eq!(record.history.last().map(|t| t.at_unix_ms), Some(10));
    }

    #[test]
    fn scenario_b_an_unreachable_replica_is_replaced_and_not_chosen_again() {
        let mut r = rec(&["b"]);
        r.unreachable = vec!["b".into()];
        let Review::Change { record, why } = review(&r, &three(), 10) else { panic!() };
        assert_eq!(record.replicas, vec!["c".to_string()]);
        assert!(record.unreachable.is_empty());
        assert!(why.contains("fabric"), "{why}");
    }

    #[test]
    fn scenario_c_a_replica_without_the_san_is_replaced() {
        let mut nodes = three();
        nodes[1].sans_reachable.clear();
        // Not probed yet (a record new to node b): nothing to replace.
        assert_eq!(review(&rec(&["b"]), &nodes, 10), Review::Keep);
        nodes[1].sans_unreachable = vec![1];
        let Review::Change { record, why } = review(&rec(&["b"]), &nodes, 10) else { panic!() };
        assert_eq!(record.replicas, vec!["c".to_string()]);
        assert!(why.contains("SAN"), "{why}");
    }

    #[test]
    fn with_no_eligible_node_the_lost_replica_is_dropped_and_filled_in_later() {
        let nodes = vec![node("a", "ra", 100, &[1])];
        let Review::Change { record, why } = review(&rec(&["b"]), &nodes, 10) else { panic!() };
        assert!(record.replicas.is_empty());
        assert!(why.contains("0 of 1"), "{why}");
        assert_eq!(review(&record, &nodes, 11), Review::Keep, "nothing better: no churn");
        let Review::Change { record: later, .. } = review(&record, &three(), 12) else { panic!() };
        assert_eq!(later.replicas, vec!["b".to_string()]);
        assert_eq!(later.epoch, record.epoch + 1);
    }

    #[test]
    fn a_full_replica_is_kept_but_a_full_node_is_not_chosen() {
        let mut nodes = three();
        nodes[1].flash_free_bytes = 0;
        assert_eq!(review(&rec(&["b"]), &nodes, 10), Review::Keep);
        let nodes2: Vec<NodeInfo> = nodes.iter().filter(|n| n.id != "c").cloned().collect();
        assert_eq!(review(&rec(&[]), &nodes2, 10), Review::Keep, "b is full: nothing to place");
    }

    #[test]
    fn a_lost_owner_gets_its_copy_in_sync_destaged_and_is_fenced_until_done() {
        let without = |gone: &[&str]| -> Vec<NodeInfo> {
            three().into_iter().filter(|n| !gone.contains(&n.id.as_str())).collect()
        };
        let mut r = rec(&["b", "c"]);
        r.in_sync = vec!["c".into(), "b".into()];
        // The owner is gone: the first in-sync copy on a live node that reaches the SAN.
        let Review::Change { record, why } = review(&r, &without(&["a"]), 10) else { panic!() };
        assert_eq!((record.rescuer.as_str(), record.epoch), ("c", r.epoch + 1), "{why}");
        assert_eq!(record.replicas, r.replicas, "the replica set stays");
        assert_eq!(review(&record, &without(&["a"]), 11), Review::OwnerLost, "under way");
        assert_eq!(review(&record, &three(), 11), Review::Keep, "the owner is back: it waits, nothing moves");
        // The rescuer dies too before it is done: the other copy in sync takes over.
        let Review::Change { record: moved, .. } = review(&record, &without(&["a", "c"]), 12) else { panic!() };
        assert_eq!(moved.rescuer, "b");
        let mut done = moved.clone();
        done.rescued_unix_ms = 13;
        done.rescued_upto = 700;
        assert_eq!(review(&done, &without(&["a", "c"]), 14), Review::OwnerLost, "done, the owner still gone");
        assert_eq!(review(&done, &without(&["c"]), 15), Review::Keep, "the owner is back: it ends the rescue itself");
        let back = end_rescue(&done, 3, 16);
        assert!(back.rescuer.is_empty() && back.rescued_unix_ms == 0 && back.rescued_upto == 0);
        assert_eq!(back.epoch, done.epoch + 1);
        assert!(back.history.last().is_some_and(|t| t.what.contains("up to seq 700") && t.what.contains("3 write")));
    }

    #[test]
    fn a_lost_owner_without_a_usable_copy_is_only_reported() {
        let nodes: Vec<NodeInfo> = three().into_iter().filter(|n| n.id != "a").collect();
        let mut r = rec(&["b"]);
        r.in_sync.clear();
        assert_eq!(review(&r, &nodes, 10), Review::OwnerLost, "no copy in sync");
        let mut cut = nodes.clone();
        cut[0].sans_reachable.clear();
        assert_eq!(review(&rec(&["b"]), &cut, 10), Review::OwnerLost, "the copy's node cannot reach the SAN");
        assert_eq!(review(&rec(&[]), &nodes, 10), Review::OwnerLost, "no replica at all");
    }

    #[test]
    fn the_owner_reports_transitions_and_accounts_unprotected_time() {
        let r = rec(&["b"]);
        let healthy = OwnerView {
            requested: "write-back+1".into(),
            effective: "write-back+1".into(),
            reason: String::new(),
            unreachable: vec![],
            san: "file:/san".into(),
            in_sync: vec!["b".into()],
        };
        assert_eq!(owner_report(&r, &healthy, 5), None);
        let down = OwnerView {
            effective: "write-through".into(),
            reason: "replica-unavailable".into(),
            unreachable: vec!["b".into(), "zz".into()],
            in_sync: vec![],
            ..healthy.clone()
        };
        let r1 = owner_report(&r, &down, 1000).expect("a change");
        assert_eq!(r1.unreachable, vec!["b".to_string()], "only replicas of the record");
        assert!(r1.in_sync.is_empty(), "a lost replica is out of sync at once");
        assert_eq!(r1.unprotected_since_unix_ms, 1000);
        assert!(r1.history.last().is_some_and(|t| t.what.contains("replica-unavailable")));
        assert_eq!(owner_report(&r1, &down, 1500), None);
        let r2 = owner_report(&r1, &healthy, 4000).expect("back");
        assert_eq!((r2.unprotected_ms, r2.unprotected_since_unix_ms), (3000, 0));
        assert!(r2.history.last().is_some_and(|t| t.what.contains("as requested")));
    }

    #[test]
    fn only_replicas_the_record_names_are_in_sync_and_a_replaced_one_drops_out() {
        let r = rec(&["b"]);
        let view = OwnerView {
            requested: "write-back+1".into(),
            effective: "write-back+1".into(),
            reason: String::new(),
            unreachable: vec![],
            san: "file:/san".into(),
            // "c" is in sync with an owner that has not followed the record's set yet.
            in_sync: vec!["b".into(), "c".into()],
        };
        assert_eq!(owner_report(&r, &view, 5), None, "the record says b already; c is not its replica");
        let nodes: Vec<NodeInfo> = three().into_iter().filter(|n| n.id != "b").collect();
        let Review::Change { record, .. } = review(&r, &nodes, 10) else { panic!("b is gone: a change") };
        assert_eq!(record.replicas, vec!["c".to_string()]);
        assert!(record.in_sync.is_empty(), "the new replica is not in sync before its owner says so");
    }

    #[test]
    fn a_copy_goes_only_when_the_owner_is_alive_and_protected_by_others() {
        let nodes = three();
        let r = rec(&["c"]);
        assert!(may_discard_copy(&r, "b", &nodes));
        assert!(!may_discard_copy(&rec(&["b"]), "b", &nodes), "still a replica");
        let mut unprotected = r.clone();
        unprotected.effective = "write-through".into();
        assert!(!may_discard_copy(&unprotected, "b", &nodes), "the new replica may not have it all yet");
        let no_owner: Vec<NodeInfo> = nodes.into_iter().filter(|n| n.id != "a").collect();
        assert!(!may_discard_copy(&r, "b", &no_owner), "possibly the last copy");
    }

    #[test]
    fn a_rescuer_serves_only_once_done_with_the_owner_gone_and_hands_back_to_it() {
        let all = three();
        let gone_a: Vec<NodeInfo> = all.iter().filter(|n| n.id != "a").cloned().collect();
        let mut r = rec(&["b"]);
        r.rescuer = "b".into();
        assert_eq!(start_serving(&r, "b", &gone_a, 5), None, "the rescue is not done");
        r.rescued_unix_ms = 4;
        r.rescued_upto = 77;
        assert_eq!(start_serving(&r, "c", &gone_a, 5), None, "only the rescuer");
        assert_eq!(start_serving(&r, "b", &all, 5), None, "the owner is back: it serves again itself");
        let s = start_serving(&r, "b", &gone_a, 5).expect("serves");
        assert!(s.check().is_ok());
        assert_eq!((s.server.as_str(), s.served, s.epoch), ("b", true, r.epoch));
        assert_eq!(start_serving(&s, "b", &gone_a, 6), None, "already");
        assert_eq!(review(&s, &gone_a, 7), Review::OwnerLost);
        assert_eq!(review(&s, &all, 7), Review::Keep, "the owner is back: it asks for the volume itself");
        // The owner asks; the server stops; the owner ends the rescue, knowing the volume was served.
        let h = ask_handback(&s, 8).expect("asks");
        assert!(h.handback && h.check().is_ok());
        assert_eq!(ask_handback(&h, 9), None);
        let stopped = stop_serving(&h, "handed back", 10);
        assert!(stopped.server.is_empty() && !stopped.handback && stopped.served && stopped.check().is_ok());
        let ended = end_rescue(&stopped, 0, 11);
        assert!(!ended.served && ended.rescuer.is_empty() && ended.check().is_ok());
        // A server that dies is cleared by the manager (its gate closed with its lease).
        let only_c: Vec<NodeInfo> = all.iter().filter(|n| n.id == "c").cloned().collect();
        let Review::Change { record, why } = review(&h, &only_c, 12) else { panic!("the server is gone") };
        assert!(record.server.is_empty() && !record.handback && record.served, "{why}");
        assert!(record.check().is_ok());
        // The owner's flash failed: its in-sync replica rescues, the owner stays and is not served for.
        let mut f = rec(&["b"]);
        assert_eq!(rescue_for_failed_flash(&f, &all, 5).map(|r| r.rescuer), Some("b".into()));
        f.in_sync.clear();
        assert_eq!(rescue_for_failed_flash(&f, &all, 5), None, "no copy in sync: nothing to destage from");
        let mut f = rec(&["b"]);
        f.rescuer = "b".into();
        assert_eq!(rescue_for_failed_flash(&f, &all, 5), None, "under way already");
        // The record's checks: a server is a rescuer whose rescue is done.
        let mut bad = s.clone();
        bad.rescued_unix_ms = 0;
        assert!(bad.check().is_err());
        let mut bad = r.clone();
        bad.handback = true;
        assert!(bad.check().is_err());
    }
}
