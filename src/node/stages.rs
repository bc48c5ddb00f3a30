//! The stages above nats-server, brought up in order: store → authenticator → membership
//! service (DESIGN §1) — except that the authenticator subscribes first and forwards
//! admissions to peers until the store is open (`auth::authenticator`). Each starts once the one below it is up, is retried with backoff
//! while it cannot start (shown as `down` with the reason in `/readyz`), and turns `up`
//! only when it is really serving. They share one store handle. The membership service
//! gets the live-revocation hook (`revocation`), which needs a system-account connection.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tracing::Instrument;

use super::readiness::{Readiness, Readyz, Stage, StageState};
use super::revocation;
use super::security::Security;
use super::shutdown::Shutdown;
use super::store;
use crate::auth::authenticator::{self, Authenticator};
use crate::config::{BusAuth, Config};
use crate::membership::history::History;
use crate::membership::service::{self, Handler, ServiceConfig};

/// What the stages need from the node.
pub struct Context {
    pub config: Config,
    pub data_dir: PathBuf,
    pub security: Security,
    pub readiness: Arc<Readiness>,
    pub shutdown: Shutdown,
}

/// Runs the stages until shutdown.
pub async fn run(ctx: Context) {
    let Context {
        config,
        data_dir,
        security,
        readiness,
        mut shutdown,
    } = ctx;
    let set = |r: &Readiness, f: fn(&mut Readyz, Stage), stage: Stage| r.update(|z| f(z, stage));
    let mut tasks = JoinSet::new();

    // The authenticator comes first, before JetStream and the store: nats-server takes
    // clients as soon as it listens, and until this node's store opens their callouts
    // are forwarded to peers that have theirs (see `auth::authenticator`).
    let store_slot = match (&security.secrets, security.bus_auth) {
        (Some(secrets), BusAuth::Soft | BusAuth::Enforce) => {
            let issuer = match secrets.issuer_key() {
                Ok(k) => k,
                Err(e) => {
                    set(
                        &readiness,
                        |z, s| z.stages.authenticator = s,
                        Stage::with_detail(StageState::Down, e.to_string()),
                    );
                    tracing::error!(
                        "cannot load the callout issuer key: {e}; no connection can be admitted"
                    );
                    return;
                }
            };
            // Retried every 10 ms, without backing off: from the moment nats-server
            // listens until this connection subscribes, a client that reaches it has its
            // callout published to nobody, waits out the callout timeout (4 s) and is
            // refused. With the usual doubling, a server slow to start (JetStream
            // recovering its streams) was found listening up to a whole pause late, a
            // few hundred ms in which a reconnecting client could be refused.
            let Some(client) = retry_with(
                Backoff::constant(Duration::from_millis(10)),
                &readiness,
                &mut shutdown,
                |z, s| z.stages.authenticator = s,
                || store::connect_authenticator(&config, &security),
            )
            .await
            else {
                return;
            };
            let (authn, slot) = Authenticator::new(issuer, security.bus_auth);
            set(
                &readiness,
                |z, s| z.stages.authenticator = s,
                Stage::with_detail(StageState::Down, authenticator::FORWARDING),
            );
            let r = readiness.clone();
            let mode = security.bus_auth.as_str();
            let ready = move || {
                set(
                    &r,
                    |z, s| z.stages.authenticator = s,
                    Stage::with_detail(StageState::Up, format!("bus-auth={mode}")),
                )
            };
            let stop = shutdown.clone();
            tasks.spawn(
                async move {
                    if let Err(e) = authenticator::run(client, Arc::new(authn), ready, stop).await {
                        tracing::error!("authenticator stopped: {e}");
                    }
                }
                .in_current_span(),
            );
            Some(slot)
        }
        _ => {
            set(
                &readiness,
                |z, s| z.stages.authenticator = s,
                Stage::with_detail(StageState::Disabled, "bus-auth=off: no auth callout"),
            );
            None
        }
    };

    // Whatever stops the start-up below (shutdown, mostly), the tasks already running —
    // the authenticator above all — still get to drain.
    'start: {
        // The store waits for JetStream: opening KV buckets without a meta leader only times out.
        let jetstream_up = || readiness.snapshot().stages.jetstream.state == StageState::Up;
        while !jetstream_up() {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = shutdown.wait() => break 'start,
            }
        }
        let Some(store) = retry(
            &readiness,
            &mut shutdown,
            |z, s| z.stages.store = s,
            || store::open(&config, &data_dir, &security),
        )
        .await
        else {
            break 'start;
        };
        let store = Arc::new(store);
        tracing::info!(backend = store.backend(), "store open");
        tasks.spawn(
            store::watch(
                store.clone(),
                config.clone(),
                data_dir.clone(),
                readiness.clone(),
                shutdown.clone(),
            )
            .in_current_span(),
        );

        if let Some(secrets) = &security.secrets {
            let admin = secrets.admin_public.clone();
            let bootstrapped = retry(
                &readiness,
                &mut shutdown,
                |z, s| z.stages.authenticator = s,
                || Authenticator::bootstrap_admin(&store, &admin),
            )
            .await;
            if bootstrapped.is_none() {
                break 'start;
            }
        }

        if let Some(slot) = &store_slot {
            slot.fill(store.clone());
        }

        // The control plane and room history live in APP, where the clients are (see
        // `membership::history`); the node reaches it as its derived APP user.
        // The service takes requests on a connection of its own (`listen`), so that
        // stopping can drain it (see `membership::service::run`) while replies still leave
        // on `client`.
        let Some((client, listen)) = retry(
            &readiness,
            &mut shutdown,
            |z, s| z.stages.membership = s,
            || async {
                tokio::try_join!(
                    store::connect_app(&config, &security, "ctl"),
                    store::connect_app(&config, &security, "ctl-listen"),
                )
            },
        )
        .await
        else {
            break 'start;
        };
        // Live revocation: best-effort (the callout refuses new connections regardless), so a
        // node without it still serves; `revocation::hook` says why in the log.
        let on_revoke = tokio::select! {
            hook = revocation::hook(&config, &security) => hook,
            _ = shutdown.wait() => break 'start,
        };
        let detail = if on_revoke.is_none() && security.bus_auth != BusAuth::Off {
            "unibus.ctl.*.* (and own subjects); live revocation off (see the log)"
        } else {
            "unibus.ctl.*.* (and own subjects)"
        };
        let replicas = if config.clustered() {
            config.replicas
        } else {
            1
        };
        let Some(history) = retry(
            &readiness,
            &mut shutdown,
            |z, s| z.stages.membership = s,
            || History::open(client.clone(), replicas),
        )
        .await
        else {
            break 'start;
        };
        let handler = Arc::new(
            Handler::new(
                store.clone(),
                ServiceConfig {
                    bus_auth: security.bus_auth,
                    skew: Duration::from_secs(config.ctl_skew_secs),
                    max_body: config.ctl_max_body,
                },
                on_revoke,
            )
            .with_history(history),
        );
        let r = readiness.clone();
        let ready = move || {
            set(
                &r,
                |z, s| z.stages.membership = s,
                Stage::with_detail(StageState::Up, detail),
            )
        };
        let stop = shutdown.clone();
        tasks.spawn(
            async move {
                if let Err(e) = service::run(client, listen, handler, ready, stop).await {
                    tracing::error!("membership service stopped: {e}");
                }
            }
            .in_current_span(),
        );
    }
    while tasks.join_next().await.is_some() {}
}

/// Calls `attempt` until it succeeds, showing each failure on the stage `field` writes,
/// with exponential backoff (up to 5 s). None when shutdown came first.
async fn retry<T, E, F, Fut>(
    readiness: &Readiness,
    shutdown: &mut Shutdown,
    field: fn(&mut Readyz, Stage),
    attempt: F,
) -> Option<T>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    retry_with(
        Backoff::doubling(Duration::from_millis(200), Duration::from_secs(5)),
        readiness,
        shutdown,
        field,
        attempt,
    )
    .await
}

/// Pauses between the attempts of [`retry_with`].
#[derive(Debug, Clone, Copy)]
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn doubling(first: Duration, max: Duration) -> Self {
        Backoff { next: first, max }
    }

    fn constant(every: Duration) -> Self {
        Backoff {
            next: every,
            max: every,
        }
    }

    /// The pause to take now; the next one doubles, up to `max`.
    fn pause(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(self.max);
        now
    }
}

/// How often a failure that keeps repeating is logged: a constant 10 ms retry would
/// otherwise write a hundred warnings a second while nats-server starts.
const REPEAT_WARNING_EVERY: Duration = Duration::from_secs(1);

/// [`retry`], with the pauses of `backoff`.
async fn retry_with<T, E, F, Fut>(
    mut backoff: Backoff,
    readiness: &Readiness,
    shutdown: &mut Shutdown,
    field: fn(&mut Readyz, Stage),
    mut attempt: F,
) -> Option<T>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut warned: Option<tokio::time::Instant> = None;
    loop {
        let result = tokio::select! {
            r = attempt() => r,
            _ = shutdown.wait() => return None,
        };
        let pause = backoff.pause();
        match result {
            Ok(v) => return Some(v),
            Err(e) => {
                if warned.is_none_or(|at| at.elapsed() >= REPEAT_WARNING_EVERY) {
                    tracing::warn!("{e}; retrying in {pause:?}");
                    warned = Some(tokio::time::Instant::now());
                }
                readiness.update(|z| field(z, Stage::with_detail(StageState::Down, e.to_string())));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.wait() => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_constant_backoff_never_grows_and_a_doubling_one_stops_at_its_cap() {
        let ms = Duration::from_millis;
        let mut constant = Backoff::constant(ms(10));
        let pauses: Vec<Duration> = (0..50).map(|_| constant.pause()).collect();
        assert!(pauses.iter().all(|p| *p == ms(10)), "{pauses:?}");

        let mut doubling = Backoff::doubling(ms(200), Duration::from_secs(5));
        let pauses: Vec<u128> = (0..8).map(|_| doubling.pause().as_millis()).collect();
        assert_eq!(pauses, [200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
    }
}
