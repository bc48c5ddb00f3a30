//! Readiness: the observable state of each stage of a node's life.
//!
//! A node comes up in stages (DESIGN §1): `nats` (the supervised server answers),
//! `jetstream` (nats-server's plain `/healthz` is 200, and in a cluster a meta leader is
//! known), then `store`, `authenticator` and `membership`. Each stage writes its own state
//! here; `/readyz` reads a snapshot. The same [`Readyz`] type is what `/readyz` serialises and
//! what `unibus node status` parses, so the two cannot drift apart.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::membership::jetstream::BucketStatus;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StageState {
    /// Not built into this node (or turned off by a flag); counts as ready.
    Disabled,
    /// Not up yet.
    Starting,
    Up,
    /// Was up, or tried, and is not now.
    Down,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stage {
    pub state: StageState,
    /// Why a stage is not up, or facts about it when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Stage {
    pub fn new(state: StageState) -> Self {
        Stage {
            state,
            detail: None,
        }
    }

    pub fn with_detail(state: StageState, detail: impl Into<String>) -> Self {
        Stage {
            state,
            detail: Some(detail.into()),
        }
    }

    fn ready(&self) -> bool {
        matches!(self.state, StageState::Up | StageState::Disabled)
    }
}

/// The stages, in the order a node brings them up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stages {
    pub nats: Stage,
    pub jetstream: Stage,
    pub store: Stage,
    pub authenticator: Stage,
    pub membership: Stage,
}

impl Stages {
    /// Each stage with its name, in order (for tables and checks).
    pub fn named(&self) -> [(&'static str, &Stage); 5] {
        [
            ("nats", &self.nats),
            ("jetstream", &self.jetstream),
            ("store", &self.store),
            ("authenticator", &self.authenticator),
            ("membership", &self.membership),
        ]
    }
}

/// What a clustered node knows of its JetStream meta group.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterView {
    pub meta_leader: Option<String>,
    /// Server names in the meta group that this node has heard from, itself included.
    pub peers: Vec<String>,
    /// The configured size of the meta group.
    pub cluster_size: usize,
}

/// What the store stage reports: the backend and, for KV, each bucket's replication.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreView {
    pub backend: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Replicas this node asks for when it creates buckets (KV only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas_wanted: Option<usize>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub buckets: Vec<BucketStatus>,
    /// The cluster's finalized version as this node last read it (see
    /// `membership::version`); absent from nodes older than the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_version: Option<u32>,
    /// The version this node's code speaks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<u32>,
}

/// The body of `/readyz`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readyz {
    pub node: String,
    pub ready: bool,
    pub shutting_down: bool,
    pub stages: Stages,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreView>,
}

/// Shared, lock-protected readiness. Writers are few and rare (a poller, stage start-up);
/// a std mutex held for a copy is simpler than channels.
#[derive(Debug)]
pub struct Readiness {
    inner: Mutex<Readyz>,
}

impl Readiness {
    pub fn new(node: &str, clustered: bool) -> Self {
        let starting = Stage::new(StageState::Starting);
        Readiness {
            inner: Mutex::new(Readyz {
                node: node.to_string(),
                ready: false,
                shutting_down: false,
                stages: Stages {
                    nats: Stage::new(StageState::Starting),
                    jetstream: Stage::new(StageState::Starting),
                    store: starting.clone(),
                    authenticator: starting.clone(),
                    membership: starting,
                },
                cluster: clustered.then(ClusterView::default),
                store: None,
            }),
        }
    }

    /// Changes the state under the lock, then recomputes `ready`.
    pub fn update(&self, change: impl FnOnce(&mut Readyz)) {
        // A poisoned lock only means a writer panicked mid-update; the data is plain
        // values, so keep serving it rather than taking the node down.
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        change(&mut guard);
        guard.ready = !guard.shutting_down && guard.stages.named().iter().all(|(_, s)| s.ready());
    }

    pub fn snapshot(&self) -> Readyz {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_stage_is_up_or_disabled_and_not_shutting_down() {
        let r = Readiness::new("n1", false);
        assert!(!r.snapshot().ready);
        r.update(|s| s.stages.nats = Stage::new(StageState::Up));
        assert!(!r.snapshot().ready, "jetstream still starting");
        r.update(|s| s.stages.jetstream = Stage::new(StageState::Up));
        assert!(!r.snapshot().ready, "store still starting");
        r.update(|s| {
            s.stages.store = Stage::new(StageState::Up);
            s.stages.authenticator = Stage::new(StageState::Disabled);
        });
        assert!(!r.snapshot().ready, "membership still starting");
        r.update(|s| s.stages.membership = Stage::new(StageState::Up));
        assert!(r.snapshot().ready, "disabled counts as ready");
        r.update(|s| s.shutting_down = true);
        assert!(!r.snapshot().ready);
    }

    #[test]
    fn readyz_round_trips_through_json() {
        let r = Readiness::new("n1", true);
        let json = serde_json::to_string(&r.snapshot()).unwrap();
        let back: Readyz = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r.snapshot());
        assert!(json.contains("\"authenticator\":{\"state\":\"starting\""));
    }
}
