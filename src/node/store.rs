//! The store stage: opens the node's membership store and keeps its readiness current.
//!
//! With `decentralized` off the store is a SQLite file in the data dir, in-process. With it
//! on, the node connects to its own nats-server and binds (or creates) the five KV buckets
//! at `replicas`, waiting until each has a leader. Either way the store is opened only once
//! the `jetstream` stage is up, so a cluster without quorum shows `jetstream` down rather
//! than a store that timed out for no visible reason.
//!
//! After that, [`watch`] refreshes the per-bucket replication shown by `/readyz` and runs
//! the KV reconciler at boot and every `reconcile_every_secs` — the repair half of the
//! two-bucket write rule (see `membership`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::readiness::{Readiness, Stage, StageState, StoreView};
use super::security::Security;
use super::shutdown::Shutdown;
use crate::config::Config;
use crate::membership::jetstream::{KvOptions, KvStore};
use crate::membership::sqlite::SqliteStore;
use crate::membership::{Store, StoreError, version};

/// The SQLite file inside a node's data dir.
pub const SQLITE_FILE: &str = "membership.db";

const STATUS_EVERY: Duration = Duration::from_secs(2);

/// Opens the store this node's flags ask for.
pub async fn open(
    config: &Config,
    data_dir: &Path,
    security: &Security,
) -> Result<Store, StoreError> {
    if !config.flags.decentralized {
        let path = data_dir.join(SQLITE_FILE);
        return Ok(Store::Sqlite(SqliteStore::open(path).await?));
    }
    let client = connect_local(config, security, "store").await?;
    let kv = KvStore::open(
        client,
        KvOptions {
            replicas: config.replicas,
            op_timeout: config.op_timeout(),
            create: true,
            ..KvOptions::default()
        },
    )
    .await?;
    Ok(Store::JetStream(kv))
}

/// One of the node's own connections to its nats-server, as its service identity (in
/// `AUTH`, where the store lives).
pub async fn connect_local(
    config: &Config,
    security: &Security,
    role: &str,
) -> Result<async_nats::Client, StoreError> {
    let options = security
        .service_connect_options()
        .map_err(StoreError::Backend)?;
    connect_with(config, security, options, role).await
}

/// The authenticator's connection: [`connect_local`], reconnecting every 10 ms instead of
/// async-nats' doubling up to 4 s. While it is away (nats-server restarted under
/// supervision), every client's callout is published to nobody and refused after the
/// callout timeout, so it must be back the moment its server is. (A refused connect to a
/// local port costs microseconds; each failed attempt is logged at debug, not info.)
pub async fn connect_authenticator(
    config: &Config,
    security: &Security,
) -> Result<async_nats::Client, StoreError> {
    let options = security
        .service_connect_options()
        .map_err(StoreError::Backend)?
        .reconnect_delay_callback(|_| std::time::Duration::from_millis(10))
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected | async_nats::Event::Disconnected => {
                    tracing::info!("authenticator connection: {event}")
                }
                other => tracing::debug!("authenticator connection: {other}"),
            }
        });
    connect_with(config, security, options, "auth").await
}

/// One of the node's connections into the `APP` account (control plane, room history), as
/// the node's APP identity.
pub async fn connect_app(
    config: &Config,
    security: &Security,
    role: &str,
) -> Result<async_nats::Client, StoreError> {
    let options = security
        .app_connect_options()
        .map_err(StoreError::Backend)?;
    connect_with(config, security, options, role).await
}

/// What every node connection shares: named after its role, bounded by `op_timeout`, and
/// reconnecting forever (the node's server may restart under supervision).
async fn connect_with(
    config: &Config,
    security: &Security,
    options: async_nats::ConnectOptions,
    role: &str,
) -> Result<async_nats::Client, StoreError> {
    let url = config.local_nats_url(security.tls.is_some());
    options
        .name(format!("unibus-{}-{role}", config.name))
        .connection_timeout(config.op_timeout())
        .request_timeout(Some(config.op_timeout()))
        .max_reconnects(None)
        .connect(&url)
        .await
        .map_err(|e| {
            StoreError::Unavailable(format!("connect to the node's nats-server at {url}: {e}"))
        })
}

/// A snapshot of the store for `/readyz`; an error means the store cannot answer now.
pub async fn view(
    store: &Store,
    config: &Config,
    data_dir: &Path,
) -> Result<StoreView, StoreError> {
    let versions = StoreView {
        cluster_version: Some(store.cluster_version()),
        protocol: Some(version::PROTOCOL),
        ..StoreView::default()
    };
    Ok(match store {
        Store::Sqlite(_) => StoreView {
            backend: "sqlite".into(),
            path: Some(data_dir.join(SQLITE_FILE).to_string_lossy().into_owned()),
            ..versions
        },
        Store::JetStream(kv) => StoreView {
            backend: "jetstream".into(),
            path: None,
            replicas_wanted: Some(config.replicas),
            buckets: kv.bucket_status().await?,
            ..versions
        },
    })
}

/// Keeps the store stage's readiness current and runs the reconciler, until shutdown.
pub async fn watch(
    store: Arc<Store>,
    config: Config,
    data_dir: std::path::PathBuf,
    readiness: Arc<Readiness>,
    mut shutdown: Shutdown,
) {
    let reconcile_every = Duration::from_secs(config.reconcile_every_secs);
    let mut next_reconcile = tokio::time::Instant::now();
    loop {
        // Features that need every node on this code turn on here, within one round of
        // `unibus cluster finalize` (see `membership::version`).
        // A node of older code than the cluster's finalized version stops being ready: it
        // may not turn on what the newer version relies on.
        let too_old = match store.refresh_cluster_version().await {
            Ok(recorded) => version::check_supported(recorded).err(),
            Err(e) => {
                tracing::debug!("reading the cluster version: {e}");
                None
            }
        };
        let (stage, view) = match view(&store, &config, &data_dir).await {
            Ok(view) => (store_stage(&view), Some(view)),
            Err(e) => (Stage::with_detail(StageState::Down, e.to_string()), None),
        };
        let stage = match too_old {
            Some(e) => {
                tracing::error!("{e}");
                Stage::with_detail(StageState::Down, e.to_string())
            }
            None => stage,
        };
        if let Some(view) = &view {
            for b in &view.buckets {
                let lag = b.replicas_wanted.saturating_sub(b.replicas_current);
                crate::metrics::get()
                    .bucket_lag
                    .get_or_create(&crate::metrics::Bucket {
                        bucket: b.bucket.clone(),
                    })
                    .set(lag as i64);
            }
        }
        readiness.update(|r| {
            r.stages.store = stage;
            if view.is_some() {
                r.store = view;
            }
        });
        if let Store::JetStream(kv) = &*store
            && tokio::time::Instant::now() >= next_reconcile
        {
            next_reconcile = tokio::time::Instant::now() + reconcile_every;
            match kv.reconcile().await {
                Ok(report) if report != Default::default() => {
                    let repairs = &crate::metrics::get().reconciler_repairs;
                    for (kind, n) in [
                        ("index_added", report.index_added),
                        ("index_removed", report.index_removed),
                        ("orphans_removed", report.orphans_removed),
                    ] {
                        repairs
                            .get_or_create(&crate::metrics::Kind { kind: kind.into() })
                            .inc_by(n as u64);
                    }
                    tracing::warn!(?report, "reconciler repaired interrupted two-bucket writes")
                }
                Ok(_) => tracing::debug!("reconciler: nothing to repair"),
                Err(e) => tracing::warn!("reconciler could not run: {e}"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(STATUS_EVERY) => {}
            _ = shutdown.wait() => break,
        }
    }
    if let Err(e) = store.close().await {
        tracing::warn!("closing the store: {e}");
    }
}

/// Up when every bucket has a leader; the detail says how replication stands.
fn store_stage(view: &StoreView) -> Stage {
    if view.buckets.is_empty() {
        return Stage::with_detail(StageState::Up, view.backend.clone());
    }
    let leaderless: Vec<&str> = view
        .buckets
        .iter()
        .filter(|b| b.leader.is_none())
        .map(|b| b.bucket.as_str())
        .collect();
    if !leaderless.is_empty() {
        return Stage::with_detail(
            StageState::Down,
            format!("buckets without a leader: {}", leaderless.join(", ")),
        );
    }
    let lagging = view
        .buckets
        .iter()
        .filter(|b| b.replicas_current < b.replicas_wanted)
        .count();
    let wanted = view
        .buckets
        .iter()
        .map(|b| b.replicas_wanted)
        .max()
        .unwrap_or(0);
    let detail = if lagging == 0 {
        format!("jetstream, R{wanted}, all replicas current")
    } else {
        format!("jetstream, R{wanted}, {lagging} buckets catching up")
    };
    Stage::with_detail(StageState::Up, detail)
}
