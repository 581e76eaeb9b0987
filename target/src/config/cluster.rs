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

use super::{problem, Config, Problem};

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

pub(super) fn check_cluster(c: &Config) -> Result<(), Problem> {
    use stager_cluster::constants::{LEASE_TTL_MAX, LEASE_TTL_MIN, OP_TIMEOUT_MAX, OP_TIMEOUT_MIN};
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
}
