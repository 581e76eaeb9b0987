//! Where a volume's replicas go: a pure function of the live nodes, so the resource manager's
//! decision can be tested (and replayed) without a cluster.
//!
//! A replica must be able to do what a replica is for: keep a copy (free flash) and, when the
//! source is lost, destage that copy (a working connection to the volume's SAN). Among the nodes
//! that can, the choice spreads copies over fault domains — first away from the owner's, then
//! away from each other's — and then prefers the most free flash, so copies land where they
//! are least likely to fail together and least likely to run out of room. Replicas the volume
//! already has (`keep`) stay while they are still eligible, so replacing one lost replica never
//! moves the others. Ties break by node id: the same inputs always give the same answer, on
//! whichever node the manager runs.

use crate::record::NodeInfo;

/// Replicas for `volume`: up to `want` node ids, the still-eligible members of `keep` first (in
/// their order), then new ones by preference. Eligible: in `nodes` (the live ones), not the
/// owner, not in `exclude`, reaches the volume's SAN (`sans_reachable`), and has free flash.
/// Fewer than `want` come back when fewer are eligible. A node without a fault domain counts as
/// a domain of its own.
pub fn choose_replicas(
    volume: u32,
    owner: &NodeInfo,
    want: usize,
    nodes: &[NodeInfo],
    keep: &[String],
    exclude: &[String],
) -> Vec<String> {
    let eligible = |n: &NodeInfo| {
        n.id != owner.id && !exclude.contains(&n.id) && n.sans_reachable.contains(&volume) && n.flash_free_bytes > 0
    };
    let mut chosen: Vec<&NodeInfo> = Vec::with_capacity(want);
    for id in keep {
        if chosen.len() == want {
            break;
        }
        if let Some(n) = nodes.iter().find(|n| &n.id == id && eligible(n)) {
            if !chosen.iter().any(|c| c.id == n.id) {
                chosen.push(n);
            }
        }
    }
    let mut candidates: Vec<&NodeInfo> =
        nodes.iter().filter(|n| eligible(n) && !chosen.iter().any(|c| c.id == n.id)).collect();
    // Duplicate ids in `nodes` (a caller's mistake) must not yield the same replica twice.
    candidates.sort_by(|a, b| a.id.cmp(&b.id));
    candidates.dedup_by(|a, b| a.id == b.id);
    while chosen.len() < want {
        let rank = |n: &NodeInfo| {
            let with_owner = same_domain(n, owner);
            let with_chosen = chosen.iter().filter(|c| same_domain(n, c)).count();
            (with_owner, with_chosen, std::cmp::Reverse(n.flash_free_bytes))
        };
        // Candidates are sorted by id, and `min_by_key` keeps the first of equals: ties go to
        // the smallest id.
        let Some((best, _)) = candidates.iter().enumerate().min_by_key(|(_, n)| rank(n)) else { break };
        chosen.push(candidates.remove(best));
    }
    chosen.into_iter().map(|n| n.id.clone()).collect()
}

fn same_domain(a: &NodeInfo, b: &NodeInfo) -> bool {
    match (&a.fault_domain, &b.fault_domain) {
        (Some(x), Some(y)) => x == y,
        // Unknown domains: only a node is in its own.
        _ => a.id == b.id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, domain: Option<&str>, free: u64, sans: &[u32]) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            fault_domain: domain.map(Into::into),
            fabric_addr: "127.0.0.1:1".into(),
            nvme_addrs: Vec::new(),
            flash_free_bytes: free,
            sans_reachable: sans.to_vec(),
            sans_unreachable: vec![],
            started_unix_ms: 0,
        }
    }

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn other_fault_domains_first_then_free_flash() {
        let owner = node("a", Some("r1"), 100, &[1]);
        let nodes = vec![
            owner.clone(),
            node("b", Some("r1"), 1000, &[1]), // same rack as the owner, most flash
            node("c", Some("r2"), 10, &[1]),
            node("d", Some("r2"), 20, &[1]),
            node("e", Some("r3"), 5, &[1]),
        ];
        // r2 and r3 are away from the owner; d beats c on flash; then r3 (e) beats r2 (c),
        // since c shares d's domain.
        assert_eq!(choose_replicas(1, &owner, 2, &nodes, &[], &[]), ids(&["d", "e"]));
        assert_eq!(choose_replicas(1, &owner, 1, &nodes, &[], &[]), ids(&["d"]));
        // Only the owner's domain left: still used rather than nothing.
        assert_eq!(choose_replicas(1, &owner, 1, &nodes, &[], &ids(&["c", "d", "e"])), ids(&["b"]));
    }

    #[test]
    fn san_reachability_and_free_flash_are_required() {
        let owner = node("a", None, 100, &[1, 2]);
        let nodes = vec![
            owner.clone(),
            node("b", None, 1000, &[2]), // cannot reach volume 1's SAN
            node("c", None, 0, &[1]),    // no free flash
            node("d", None, 50, &[1, 2]),
        ];
        assert_eq!(choose_replicas(1, &owner, 2, &nodes, &[], &[]), ids(&["d"]));
        assert_eq!(choose_replicas(2, &owner, 2, &nodes, &[], &[]), ids(&["b", "d"]));
        assert!(choose_replicas(3, &owner, 2, &nodes, &[], &[]).is_empty());
    }

    #[test]
    fn keep_stays_while_eligible_and_exclude_wins() {
        let owner = node("a", Some("r1"), 100, &[1]);
        let nodes = vec![
            owner.clone(),
            node("b", Some("r1"), 10, &[1]),
            node("c", Some("r2"), 1000, &[1]),
            node("d", Some("r3"), 500, &[1]),
        ];
        // b is kept although c and d rank higher; only the second slot is chosen.
        assert_eq!(choose_replicas(1, &owner, 2, &nodes, &ids(&["b"]), &[]), ids(&["b", "c"]));
        // A kept node that is gone (not live), excluded, or the owner is replaced.
        assert_eq!(choose_replicas(1, &owner, 2, &nodes, &ids(&["x", "d"]), &[]), ids(&["d", "c"]));
        assert_eq!(choose_replicas(1, &owner, 2, &nodes, &ids(&["b", "c"]), &ids(&["c"])), ids(&["b", "d"]));
        assert_eq!(choose_replicas(1, &owner, 1, &nodes, &ids(&["a"]), &[]), ids(&["c"]));
        // More kept than wanted: the first ones.
        assert_eq!(choose_replicas(1, &owner, 1, &nodes, &ids(&["d", "c"]), &[]), ids(&["d"]));
    }

    #[test]
    fn deterministic_ties_by_id_whatever_the_input_order() {
        let owner = node("a", None, 1, &[1]);
        let mut nodes = vec![node("z", None, 7, &[1]), node("m", None, 7, &[1]), node("c", None, 7, &[1])];
        let first = choose_replicas(1, &owner, 2, &nodes, &[], &[]);
        assert_eq!(first, ids(&["c", "m"]));
        nodes.reverse();
        assert_eq!(choose_replicas(1, &owner, 2, &nodes, &[], &[]), first);
        // A node listed twice is chosen once.
        nodes.push(node("c", None, 7, &[1]));
        assert_eq!(choose_replicas(1, &owner, 3, &nodes, &[], &[]), ids(&["c", "m", "z"]));
        assert!(choose_replicas(1, &owner, 0, &nodes, &[], &[]).is_empty());
    }

    #[test]
    fn nodes_without_domains_spread_like_distinct_domains() {
        let owner = node("a", Some("r1"), 1, &[1]);
        let nodes = vec![node("b", None, 1, &[1]), node("c", Some("r1"), 100, &[1]), node("d", None, 2, &[1])];
        assert_eq!(choose_replicas(1, &owner, 2, &nodes, &[], &[]), ids(&["d", "b"]));
    }
}
