//! Many orrery nodes in one process, on an in-process network
//! ([`MemNetwork`]): the same node code as `orrery node`, real openraft and
//! redb on disk, with the network simulated (loss, delay, isolation,
//! crashes). Used by `orrery bench startup --inproc` and by tests.
//! [`InProcCluster::over_tls`] runs the same nodes on real TCP on 127.0.0.1
//! inside mutual TLS instead (no simulated faults then; a crash is a stop).
//!
//! It owns the nodes' lifetimes and nothing else; what the cluster decided is
//! read from the replicated state like everywhere else.

use crate::local::{self, Plan};
use anyhow::{Context, Result};
use orrery_core::{ClusterState, NodeId, Stage};
use orrery_node::config::NodeConfig;
use orrery_node::{DemoService, DemoShards, MemNetwork, Node, Service, Services};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// A running in-process cluster.
pub struct InProcCluster {
    pub net: Arc<MemNetwork>,
    pub nodes: BTreeMap<NodeId, Node>,
    pub configs: BTreeMap<NodeId, NodeConfig>,
    /// Real TCP and TLS (as `orrery node`) instead of `net`.
    over_tls: bool,
}

impl InProcCluster {
    /// Lays out `plan` on disk (as `orrery up` would) and prepares the nodes'
    /// configs; nothing runs yet.
    pub fn plan(plan: &Plan, seed: u64) -> Result<InProcCluster> {
        let manifest = local::prepare(plan)?;
        let mut configs = BTreeMap::new();
        for n in &manifest.nodes {
            let path = local::Manifest::node_config_path(&plan.data_dir, n.id);
            configs.insert(
                n.id,
                NodeConfig::load(&path).with_context(|| format!("node {}", n.id))?,
            );
        }
        Ok(InProcCluster {
            net: MemNetwork::new(seed),
            nodes: BTreeMap::new(),
            configs,
            over_tls: false,
        })
    }

    /// As [`Self::plan`], but the nodes talk over real TCP on 127.0.0.1,
    /// every connection inside mutual TLS with the certificates `orrery up`
    /// issues; `net` is unused.
    pub fn over_tls(plan: &Plan) -> Result<InProcCluster> {
        let mut c = Self::plan(plan, 0)?;
        if let Some(cfg) = c.configs.values().find(|c| c.tls.disabled) {
            anyhow::bail!("node {} has TLS disabled", cfg.node_id);
        }
        c.over_tls = true;
        Ok(c)
    }

    /// Starts every node (voters first, so the control plane forms while
    /// the workers come up).
    pub async fn start_all(&mut self) -> Result<()> {
        let mut ids: Vec<(bool, NodeId)> = self
            .configs
            .values()
            .map(|c| (!c.me().role.is_voter(), c.node_id))
            .collect();
        ids.sort();
        for (_, id) in ids {
            self.start(id).await?;
        }
        Ok(())
    }

    pub async fn start(&mut self, id: NodeId) -> Result<()> {
        let cfg = self.configs.get(&id).context("unknown node")?.clone();
        let services = Services {
            stages: vec![Arc::new(DemoService::new(cfg.demo.clone())) as Arc<dyn Service>],
            shards: Some(Arc::new(DemoShards::new(cfg.demo.shards))),
            ..Default::default()
        };
        let node = if self.over_tls {
            Node::start(cfg, services).await?
        } else {
            Node::start_in(cfg, services, self.net.clone()).await?
        };
        self.nodes.insert(id, node);
        Ok(())
    }

    /// The node dies: it vanishes from the network and its tasks stop.
    pub async fn crash(&mut self, id: NodeId) {
        self.net.crash(id);
        if let Some(n) = self.nodes.remove(&id) {
            n.shutdown().await;
        }
    }

    /// The replicated state, read through any live node.
    pub async fn state(&self) -> Option<ClusterState> {
        for n in self.nodes.values() {
            if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(2), n.cluster_state()).await
            {
                return Some(s);
            }
        }
        None
    }

    /// Waits (bounded) until `pred` holds on the replicated state.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&ClusterState) -> bool,
    ) -> std::result::Result<ClusterState, Option<ClusterState>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = None;
        while tokio::time::Instant::now() < deadline {
            if let Some(s) = self.state().await {
                if pred(&s) {
                    return Ok(s);
                }
                last = Some(s);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(last)
    }

    pub async fn shutdown(self) {
        for n in self.nodes.values() {
            n.shutdown().await;
        }
    }
}

/// Ready: cluster at stage 0 and every participant reported 0.
pub fn ready(s: &ClusterState) -> bool {
    s.stage == Stage::READY && s.laggards(Stage::READY).is_empty()
}
