//! Watches nats-server's monitoring port and turns what it sees into the `nats` and
//! `jetstream` readiness stages.
//!
//! - `nats` is up while the monitoring port answers at all.
//! - `jetstream` is up when nats-server's plain `/healthz` is 200. Never
//!   `?js-enabled-only=true`: that stays 200 through a leader loss (DESIGN §13). In a
//!   cluster the stage also needs a known meta leader, read from `/jsz`; the peers this
//!   node has heard from come from its live routes (`/routez`), which every node knows
//!   equally well (a follower's `/jsz` says little about the other followers).

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::http;
use super::readiness::{ClusterView, Readiness, Stage, StageState};
use super::shutdown::Shutdown;

/// Poll fast while not ready (start-up time is what operators wait on), slowly after.
const POLL_NOT_READY: Duration = Duration::from_millis(50);
const POLL_READY: Duration = Duration::from_millis(500);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Deserialize)]
struct Jsz {
    #[serde(default)]
    meta_cluster: Option<MetaCluster>,
}

#[derive(Deserialize)]
struct MetaCluster {
    #[serde(default)]
    leader: String,
    #[serde(default)]
    cluster_size: usize,
}

#[derive(Deserialize)]
struct Routez {
    #[serde(default)]
    routes: Vec<Route>,
}

#[derive(Deserialize)]
struct Route {
    #[serde(default)]
    remote_name: String,
}

#[derive(Deserialize)]
struct HealthzBody {
    #[serde(default)]
    error: Option<String>,
}

/// Polls until shutdown.
pub async fn run(
    nats_http: String,
    node: String,
    clustered: bool,
    readiness: Arc<Readiness>,
    mut shutdown: Shutdown,
) {
    loop {
        let (nats, jetstream, cluster) = observe(&nats_http, &node, clustered).await;
        let up = nats.state == StageState::Up && jetstream.state == StageState::Up;
        readiness.update(|r| {
            r.stages.nats = nats;
            r.stages.jetstream = jetstream;
            if clustered {
                r.cluster = Some(cluster);
            }
        });
        let pause = if up { POLL_READY } else { POLL_NOT_READY };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.wait() => return,
        }
    }
}

async fn observe(addr: &str, node: &str, clustered: bool) -> (Stage, Stage, ClusterView) {
    let health = match http::get(addr, "/healthz", REQUEST_TIMEOUT).await {
        Ok(r) => r,
        Err(e) => {
            let down = Stage::with_detail(
                StageState::Down,
                format!("nats-server monitoring at {addr}: {e}"),
            );
            return (down.clone(), down, ClusterView::default());
        }
    };
    let nats = Stage::new(StageState::Up);
    let mut jetstream = if health.status == 200 {
        Stage::new(StageState::Up)
    } else {
        let why = serde_json::from_str::<HealthzBody>(&health.body)
            .ok()
            .and_then(|b| b.error)
            .unwrap_or_else(|| format!("nats-server /healthz returned {}", health.status));
        Stage::with_detail(StageState::Down, why)
    };
    let mut cluster = ClusterView::default();
    if clustered {
        let meta = fetch::<Jsz>(addr, "/jsz")
            .await
            .and_then(|j| j.meta_cluster);
        let routes = fetch::<Routez>(addr, "/routez")
            .await
            .map(|r| r.routes)
            .unwrap_or_default();
        cluster = cluster_view(node, meta, routes);
        if jetstream.state == StageState::Up && cluster.meta_leader.is_none() {
            jetstream = Stage::with_detail(StageState::Down, "no JetStream meta leader yet");
        }
    }
    (nats, jetstream, cluster)
}

async fn fetch<T: serde::de::DeserializeOwned>(addr: &str, path: &str) -> Option<T> {
    match http::get(addr, path, REQUEST_TIMEOUT).await {
        Ok(r) if r.status == 200 => serde_json::from_str(&r.body).ok(),
        Ok(r) => {
            tracing::debug!("nats-server {path} returned {}", r.status);
            None
        }
        Err(e) => {
            tracing::debug!("nats-server {path}: {e}");
            None
        }
    }
}

fn cluster_view(node: &str, meta: Option<MetaCluster>, routes: Vec<Route>) -> ClusterView {
    // Several route connections may lead to one peer (route pooling): count names once.
    let mut peers = vec![node.to_string()];
    for r in routes {
        if !r.remote_name.is_empty() && !peers.contains(&r.remote_name) {
            peers.push(r.remote_name);
        }
    }
    peers.sort();
    let (leader, cluster_size) = meta.map(|m| (m.leader, m.cluster_size)).unwrap_or_default();
    ClusterView {
        meta_leader: (!leader.is_empty()).then_some(leader),
        peers,
        cluster_size,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_view_names_each_routed_peer_once() {
        let meta: MetaCluster =
            serde_json::from_str(r#"{"leader":"n1","cluster_size":3}"#).unwrap();
        let routes: Routez = serde_json::from_str(
            r#"{"routes":[{"remote_name":"n1"},{"remote_name":"n1"},{"remote_name":"n3"}]}"#,
        )
        .unwrap();
        let view = cluster_view("n2", Some(meta), routes.routes);
        assert_eq!(view.meta_leader.as_deref(), Some("n1"));
        assert_eq!(view.peers, vec!["n1", "n2", "n3"]);
        assert_eq!(view.cluster_size, 3);
        let alone = cluster_view("n2", None, Vec::new());
        assert_eq!(
            (alone.meta_leader, alone.peers),
            (None, vec!["n2".to_string()])
        );
    }
}
