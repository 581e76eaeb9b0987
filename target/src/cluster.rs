//! This node's membership in the cluster (the `cluster:` section; the `cluster` feature): it
//! registers the node in etcd under a lease through stager-cluster, keeps the registration's
//! facts current, and says when its lease is lost.
//!
//! It is what the resource manager's placement reads (`stager_cluster::placement`): free flash
//! on the device that keeps copies for peers, and which of this node's volumes' SANs answer. It
//! is one thread that owns the etcd client, so the reactors never wait for etcd; a node that
//! cannot reach etcd keeps serving and retries every `CLUSTER_REFRESH`.
//!
//! Not built yet: stagerd does not read or act on the volume records (no resource manager runs
//! here, and losing the lease does not yet stop this node acting as an owner); it only logs it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use stager_cluster::{unix_ms_now, Cluster, LeaseState, NodeInfo};

use crate::config::Config;
use crate::constants::CLUSTER_REFRESH;
use crate::volume::VolumeService;

/// The membership thread; `stop` deregisters the node (a graceful leave).
pub struct Membership {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// What the node says about itself, except what changes (`flash_free_bytes`, `sans_reachable`).
struct Facts {
    base: NodeInfo,
    /// The flash device that keeps copies for peers (`node.replica_flash`, else the first).
    replica_flash: Option<String>,
    volumes: Option<Arc<VolumeService>>,
}

impl Facts {
    fn now(&self) -> NodeInfo {
        let mut info = self.base.clone();
        let status = self.volumes.as_ref().map(|v| v.status());
        if let Some(Ok(status)) = status {
            for d in &status.devices {
                if Some(&d.name) == self.replica_flash.as_ref() && !d.degraded {
                    info.flash_free_bytes = d.log_capacity_bytes.saturating_sub(d.log_used_bytes);
                }
                info.sans_reachable.extend(d.volumes.iter().filter(|v| v.san_reachable).map(|v| v.id));
            }
            info.sans_reachable.sort_unstable();
        }
        info
    }
}

impl Membership {
    /// Starts the thread when the configuration has a `cluster:` section (validated: it then
    /// has a `node:` section too). `nvme_addrs` are the listeners as bound.
    pub fn start(
        cfg: &Config,
        nvme_addrs: Vec<String>,
        fabric_addr: Option<std::net::SocketAddr>,
        volumes: Option<Arc<VolumeService>>,
    ) -> Option<Membership> {
        let (cl, node) = (cfg.cluster.as_ref()?, cfg.node.as_ref()?);
        let client_cfg = cl.client_config(&node.id);
        let facts = Facts {
            base: NodeInfo {
                id: node.id.clone(),
                fault_domain: node.fault_domain.clone(),
                fabric_addr: fabric_addr.unwrap_or(node.fabric.listen).to_string(),
                nvme_addrs,
                flash_free_bytes: 0,
                sans_reachable: Vec::new(),
                started_unix_ms: unix_ms_now(),
            },
            replica_flash: node.replica_flash.clone().or_else(|| cfg.flash.first().map(|f| f.name.clone())),
            volumes,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("cluster".into())
            .spawn(move || run(client_cfg, facts, &flag))
            .map_err(|e| tracing::error!("cluster: cannot start the membership thread: {e}"))
            .ok()?;
        Some(Membership { stop, thread: Some(thread) })
    }

    /// Deregisters the node (its record and any manager candidacy go at once) and ends the
    /// thread.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(cfg: stager_cluster::ClusterConfig, facts: Facts, stop: &AtomicBool) {
    let endpoints = cfg.endpoints.join(",");
    let mut client: Option<Cluster> = None;
    let mut said: Option<String> = None;
    // The registration etcd holds, when the lease is alive.
    let mut registered: Option<NodeInfo> = None;
    let mut next = std::time::Instant::now();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(std::time::Duration::from_millis(50));
        if std::time::Instant::now() < next {
            continue;
        }
        next = std::time::Instant::now() + CLUSTER_REFRESH;
        let c = match &client {
            Some(c) => c,
            None => match Cluster::connect(cfg.clone()) {
                Ok(c) => client.insert(c),
                Err(e) => {
                    say(&mut said, format!("cluster: cannot reach etcd at {endpoints}, retrying: {e}"));
                    continue;
                }
            },
        };
        let alive = matches!(c.lease_state(), LeaseState::Alive { .. });
        if !alive && registered.take().is_some() {
            tracing::error!(
                "cluster: node {}'s lease is lost (etcd unreachable or the lease expired); registering again",
                cfg.node
            );
        }
        let info = facts.now();
        if registered.as_ref() == Some(&info) {
            continue;
        }
        match c.register(&info) {
            Ok(()) => {
                if registered.is_none() {
                    tracing::info!(
                        "cluster: node {} registered in etcd at {endpoints} under {} ({} bytes of free flash, SANs of volumes {:?} reachable)",
                        cfg.node,
                        cfg.prefix,
                        info.flash_free_bytes,
                        info.sans_reachable
                    );
                }
                said = None;
                registered = Some(info);
            }
            Err(e) => say(&mut said, format!("cluster: registering node {} failed, retrying: {e}", cfg.node)),
        }
    }
    if let Some(c) = client {
        if let Err(e) = c.deregister() {
            tracing::warn!("cluster: deregistering node {} failed (its lease will expire): {e}", cfg.node);
        }
        c.stop();
    }
}

/// Logs `msg` unless it is the one said last (a node cut off from etcd says so once, not every
/// `CLUSTER_REFRESH`).
fn say(said: &mut Option<String>, msg: String) {
    if said.as_deref() != Some(msg.as_str()) {
        tracing::warn!("{msg}");
        *said = Some(msg);
    }
}
