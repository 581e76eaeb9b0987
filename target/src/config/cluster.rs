//! The `cluster:` section: where this node finds etcd and registers itself (stager-cluster,
//! through stagerd's `cluster` feature; docs/configuration.md, "cluster (etcd)").
//!
//! In its own file beside `config.rs`, like `ana.rs`: the struct, its defaults, its checks and
//! their tests. The ranges are stager-cluster's own (`stager_cluster::constants`), so the file is
//! refused with a key path here for what the client would refuse later. A stagerd built without
//! the feature parses the section and then refuses it, naming the feature, rather than running
//! without the registration the operator asked for.

use std::time::Duration;

use serde::Deserialize;

use super::{problem, BackendConfig, Config, Problem};

/// Where the cluster's state lives in etcd (`cluster:`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterYaml {
    /// etcd client endpoints, `host:port` (plain HTTP/2, no TLS yet).
    pub endpoints: Vec<String>,
    /// Key prefix of this cluster (several clusters can share one etcd), e.g. `/stager/demo`.
    pub prefix: String,
    /// The node's lease: etcd drops its registration this long after its last keep-alive.
    #[serde(default = "default_lease_ttl_ms")]
    pub lease_ttl_ms: u64,
    /// How long each etcd request may take.
    #[serde(default = "default_op_timeout_ms")]
    pub op_timeout_ms: u64,
}

fn default_lease_ttl_ms() -> u64 {
    10_000
}

fn default_op_timeout_ms() -> u64 {
    2_000
}

/// Whether this stagerd was built with the etcd client (the `cluster` feature).
pub const CLUSTER_BUILT: bool = cfg!(feature = "cluster");

impl ClusterYaml {
    /// The client's configuration for node `node` (after `validate`).
    pub fn client_config(&self, node: &str) -> stager_cluster::ClusterConfig {
        stager_cluster::ClusterConfig {
            endpoints: self.endpoints.clone(),
            prefix: self.prefix.clone(),
            node: node.to_string(),
            lease_ttl: Duration::from_millis(self.lease_ttl_ms),
            op_timeout: Duration::from_millis(self.op_timeout_ms),
        }
    }
}

/// The volume whose serving the cluster decides for each ANA group it steers on this node:
/// (subsystem NQN, group id) → volume id. In a cluster, a group the file writes out
/// (`ana_groups`) that holds a `kind: volume` or `kind: standby` namespace is steered: the
/// cluster thread makes it `optimized` while this node serves that volume (its owner, or the
/// node serving a rescued copy of it) and `inaccessible` otherwise, so hosts with ANA multipath
/// use one node at a time. Groups left to their default (no `ana_groups`) are not steered.
pub fn steered_ana_groups(c: &Config) -> Vec<(String, u32, u32)> {
    volume_ana_groups(c, true)
}

/// In a cluster, the groups of `kind: volume` namespaces in subsystems that leave `ana_groups`
/// out: (subsystem NQN, group, volume). Not steered; closed only should another node serve
/// the volume (a standby elsewhere while this file gives its own path no `ana_groups`).
pub fn unsteered_ana_groups(c: &Config) -> Vec<(String, u32, u32)> {
    volume_ana_groups(c, false)
}

fn volume_ana_groups(c: &Config, steered: bool) -> Vec<(String, u32, u32)> {
    if c.cluster.is_none() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for s in c.subsystems.iter().filter(|s| s.ana_groups.is_empty() != steered) {
        for n in &s.namespaces {
            let id = match &n.backend {
                BackendConfig::Volume { id, .. } | BackendConfig::Standby { id, .. } => *id,
                _ => continue,
            };
            let g = s.ana_group_of(n.nsid);
            if !out.iter().any(|(q, h, _)| q == &s.nqn && *h == g) {
                out.push((s.nqn.clone(), g, id));
            }
        }
    }
    out
}

/// Standby namespaces and steered groups: a standby needs the cluster (which alone decides when
/// it serves) and a flash device (its copy lives there); a steered group starts `inaccessible`
/// (the cluster makes it optimized once it knows this node serves), holds the namespace of one
/// volume only, and has one state on every listener.
fn check_steered(c: &Config) -> Result<(), Problem> {
    for (si, s) in c.subsystems.iter().enumerate() {
        for (ni, n) in s.namespaces.iter().enumerate() {
            let BackendConfig::Standby { .. } = n.backend else { continue };
            let at = format!("subsystems[{si}].namespaces[{ni}].backend");
            if c.cluster.is_none() {
                return Err(problem(
                    at,
                    "`kind: standby` needs a `cluster:` section: the cluster decides when it serves",
                ));
            }
            if c.flash.is_empty() {
                return Err(problem(at, "`kind: standby` needs a `flash` device: the copy it serves is kept there"));
            }
            if s.ana_groups.is_empty() {
                return Err(problem(
                    format!("subsystems[{si}]"),
                    "a standby namespace needs `ana_groups` (its group starts `inaccessible`; hosts must see the \
                     other node's path as the one to use)",
                ));
            }
        }
    }
    for (nqn, group, id) in steered_ana_groups(c) {
        let Some((si, s)) = c.subsystems.iter().enumerate().find(|(_, s)| s.nqn == nqn) else { continue };
        let Some((gi, g)) = s.ana_groups.iter().enumerate().find(|(_, g)| g.id == group) else {
            // The namespace falls into the first group by default: it is the one named.
            continue;
        };
        let at = format!("subsystems[{si}].ana_groups[{gi}]");
        if g.state != "inaccessible" || !g.listener_states.is_empty() {
            return Err(problem(
                at,
                format!(
                    "holds volume {id} in a cluster: the cluster steers its state, so it must start `state: \
                     inaccessible` with no `listener_states`"
                ),
            ));
        }
        for n in s.namespaces.iter().filter(|n| s.ana_group_of(n.nsid) == group) {
            let other = match &n.backend {
                BackendConfig::Volume { id: o, .. } | BackendConfig::Standby { id: o, .. } => *o != id,
                _ => true,
            };
            if other {
                return Err(problem(
                    at,
                    format!("holds volume {id} and namespace {}: a steered group holds one volume only", n.nsid),
                ));
            }
        }
    }
    Ok(())
}

pub(super) fn check_cluster(c: &Config) -> Result<(), Problem> {
    use stager_cluster::constants::{LEASE_TTL_MAX, LEASE_TTL_MIN, OP_TIMEOUT_MAX, OP_TIMEOUT_MIN};
    check_steered(c)?;
    let Some(cl) = &c.cluster else { return Ok(()) };
    if c.node.is_none() {
        return Err(problem("cluster", "needs a `node:` section (the id this node registers under)"));
    }
    if cl.endpoints.is_empty() {
        return Err(problem("cluster.endpoints", "must list at least one etcd endpoint (host:port)"));
    }
    for (i, e) in cl.endpoints.iter().enumerate() {
        stager_cluster::check_endpoint(e).map_err(|m| problem(format!("cluster.endpoints[{i}]"), m))?;
    }
    stager_cluster::check_prefix(&cl.prefix).map_err(|e| problem("cluster.prefix", e))?;
    let range = |key: &str, v: u64, min: Duration, max: Duration| {
        if v < min.as_millis() as u64 || v > max.as_millis() as u64 {
            return Err(problem(key, format!("{v} is out of range {}..={}", min.as_millis(), max.as_millis())));
        }
        Ok(())
    };
    range("cluster.lease_ttl_ms", cl.lease_ttl_ms, LEASE_TTL_MIN, LEASE_TTL_MAX)?;
    range("cluster.op_timeout_ms", cl.op_timeout_ms, OP_TIMEOUT_MIN, OP_TIMEOUT_MAX)?;
    if !CLUSTER_BUILT {
        return Err(problem(
            "cluster",
            "this stagerd was built without the `cluster` feature (the etcd client); rebuild with \
             --features stager-target/cluster, or leave `cluster:` out",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{err, parse_test};

    #[test]
    fn cluster_section() {
        let base = "listeners: [{ name: a, address: 127.0.0.1:0 }]\n\
                    node: { id: node-a, fabric: { listen: \"127.0.0.1:4520\" } }\n";
        let with = |cluster: &str| format!("{base}cluster: {cluster}\n");
        let good = with("{ endpoints: [\"127.0.0.1:2379\"], prefix: /stager/demo }");
        if CLUSTER_BUILT {
            let c = parse_test(&good).unwrap_or_else(|e| panic!("{e}"));
            let cl = c.cluster.as_ref().unwrap();
            assert_eq!((cl.lease_ttl_ms, cl.op_timeout_ms), (10_000, 2_000));
            let cc = cl.client_config("node-a");
            assert_eq!((cc.node.as_str(), cc.lease_ttl), ("node-a", Duration::from_secs(10)));
        } else {
            let msg = err(&good);
            assert!(msg.contains("without the `cluster` feature"), "{msg}");
        }
        assert!(parse_test(base).unwrap().cluster.is_none(), "no section, no etcd");
        let cases: Vec<(String, &[&str])> = vec![
            (good.replace(base, "listeners: [{ name: a, address: 127.0.0.1:0 }]\n"), &["cluster", "`node:`"]),
            (with("{ endpoints: [], prefix: /stager/demo }"), &["cluster.endpoints", "at least one"]),
            (with("{ endpoints: [\"http://127.0.0.1:2379\"], prefix: /s }"), &["cluster.endpoints[0]", "host:port"]),
            (with("{ endpoints: [\"127.0.0.1\"], prefix: /s }"), &["cluster.endpoints[0]"]),
            (with("{ endpoints: [\"e:1\"], prefix: stager }"), &["cluster.prefix", "start with `/`"]),
            (
                with("{ endpoints: [\"e:1\"], prefix: /s, lease_ttl_ms: 500 }"),
                &["cluster.lease_ttl_ms", "out of range"],
            ),
            (with("{ endpoints: [\"e:1\"], prefix: /s, op_timeout_ms: 0 }"), &["cluster.op_timeout_ms"]),
            (with("{ endpoints: [\"e:1\"], prefix: /s, ttl: 5 }"), &["ttl"]),
        ];
        for (text, needles) in cases {
            let msg = err(&text);
            for n in needles {
                assert!(msg.contains(n), "{text}: message {msg:?} lacks {n:?}");
            }
        }
    }
    #[test]
    fn standby_namespaces_and_steered_groups() {
        let base = "listeners: [{ name: a, address: 127.0.0.1:0 }]\n\
                    node: { id: node-b, fabric: { listen: \"127.0.0.1:4520\" } }\n";
        let cluster = "cluster: { endpoints: [\"127.0.0.1:2379\"], prefix: /s }\n";
        let flash = "flash: [{ name: f0, path: /tmp/stager-standby-test-flash.img, size: 64MiB }]\n";
        let sub = |groups: &str, backend: &str| {
            format!(
                "subsystems:\n  - nqn: nqn.2026-11.dev.stager:x\n    allow_any_host: true\n{groups}    namespaces:\n      \
                 - {{ nsid: 1, backend: {backend} }}\n"
            )
        };
        let groups = "    ana_groups: [{ id: 1, state: inaccessible }]\n";
        let standby = "{ kind: standby, id: 1, size: 64MiB }";
        let good = format!("{base}{cluster}{flash}{}", sub(groups, standby));
        if CLUSTER_BUILT {
            let c = parse_test(&good).unwrap_or_else(|e| panic!("{e}"));
            let ns = &c.subsystems[0].namespaces[0];
            assert_eq!(ns.backend, BackendConfig::Standby { id: 1, size_bytes: 64 << 20 });
            assert_eq!(steered_ana_groups(&c), vec![("nqn.2026-11.dev.stager:x".to_string(), 1, 1)]);
        }
        let cases: Vec<(String, &[&str])> = vec![
            (format!("{base}{flash}{}", sub(groups, standby)), &["backend", "needs a `cluster:` section"]),
            (format!("{base}{cluster}{}", sub(groups, standby)), &["backend", "needs a `flash` device"]),
            (format!("{base}{cluster}{flash}{}", sub("", standby)), &["subsystems[0]", "needs `ana_groups`"]),
            (
                format!("{base}{cluster}{flash}{}", sub("    ana_groups: [{ id: 1 }]\n", standby)),
                &["ana_groups[0]", "must start `state: inaccessible`"],
            ),
            (
                format!("{base}{cluster}{flash}{}", sub(groups, "{ kind: standby, size: 64MiB }")),
                &["backend", "needs `id`"],
            ),
            (
                format!("{base}{cluster}{flash}{}", sub(groups, "{ kind: standby, id: 1 }")),
                &["backend", "needs `size`"],
            ),
            (
                format!("{base}{cluster}{flash}{}", sub(groups, "{ kind: standby, id: 1, size: 64MiB, path: /x }")),
                &["backend", "only `id` and `size`"],
            ),
        ];
        for (text, needles) in cases {
            let msg = err(&text);
            for n in needles {
                assert!(msg.contains(n), "{text}: message {msg:?} lacks {n:?}");
            }
        }
    }
}
