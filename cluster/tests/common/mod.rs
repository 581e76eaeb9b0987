//! Helpers the etcd tests share: configs, records, polling, and raw etcd access for writing what
//! no well-behaved node would (malformed records, deleted keys).

#![allow(dead_code)] // each test file uses a different part

use std::time::Duration;

use stager_cluster::{ClusterConfig, NodeInfo, Transition, VolumeRecord};

/// TTL of the tests' leases: etcd's minimum with its default election timeout.
pub const TTL: Duration = Duration::from_secs(2);

pub fn config(endpoint: &str, prefix: &str, node: &str) -> ClusterConfig {
    ClusterConfig {
        endpoints: vec![endpoint.to_string()],
        prefix: prefix.to_string(),
        node: node.to_string(),
        lease_ttl: TTL,
        op_timeout: Duration::from_millis(1000),
    }
}

pub fn info(node: &str) -> NodeInfo {
    NodeInfo {
        id: node.to_string(),
        fault_domain: Some(format!("rack-{node}")),
        fabric_addr: "127.0.0.1:4520".into(),
        nvme_addrs: vec!["127.0.0.1:4420".into()],
        flash_free_bytes: 1 << 30,
        sans_reachable: vec![1, 2, 3],
        sans_unreachable: vec![],
        started_unix_ms: stager_cluster::unix_ms_now(),
    }
}

pub fn record(id: u32, owner: &str, epoch: u64) -> VolumeRecord {
    VolumeRecord {
        id,
        owner: owner.to_string(),
        replicas: Vec::new(),
        epoch,
        requested: "write-back+1".into(),
        effective: "write-through".into(),
        reason: "no replica yet".into(),
        history: vec![Transition { at_unix_ms: 1, what: "created".into() }],
        unprotected_ms: 0,
        unprotected_since_unix_ms: 0,
        unreachable: Vec::new(),
        san: String::new(),
        in_sync: Vec::new(),
        rescuer: String::new(),
        rescued_unix_ms: 0,
        rescued_upto: 0,
        server: String::new(),
        served: false,
        handback: false,
    }
}

/// Raw etcd operations, as an operator with etcdctl (or a buggy node) could do them.
pub fn raw<T>(endpoint: &str, f: impl AsyncFnOnce(etcd_client::Client) -> T) -> T {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let client = etcd_client::Client::connect([endpoint], None).await.expect("raw etcd client");
        f(client).await
    })
}

pub fn raw_put(endpoint: &str, key: &str, value: &[u8]) {
    let (key, value) = (key.to_string(), value.to_vec());
    raw(endpoint, async move |mut c| c.put(key, value, None).await.expect("raw put"));
}

pub fn raw_delete(endpoint: &str, key: &str) {
    let key = key.to_string();
    raw(endpoint, async move |mut c| c.delete(key, None).await.expect("raw delete"));
}

/// Keys under `prefix`, for tests that look at the layout.
pub fn raw_keys(endpoint: &str, prefix: &str) -> Vec<String> {
    let prefix = prefix.to_string();
    raw(endpoint, async move |mut c| {
        let resp = c.get(prefix, Some(etcd_client::GetOptions::new().with_prefix())).await.expect("raw get");
        resp.kvs().iter().map(|kv| String::from_utf8_lossy(kv.key()).into_owned()).collect()
    })
}
