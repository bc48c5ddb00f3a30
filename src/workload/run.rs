//! `unibus workload run`: load on a cluster while an operator (or a demo) changes it.
//!
//! Two loops run side by side until stopped:
//!
//! - the **writer** does control-plane writes one after another (`rooms.create` with ids no
//!   one else uses), each signed afresh per attempt (the nonce ledger refuses replays) and
//!   retried with backoff while the cluster answers `unavailable`, does not answer, or the
//!   connection breaks. Only an `ok` reply makes a write acknowledged. When its server says
//!   it is going into lame duck, the writer opens a new connection (the server no longer
//!   accepts new ones, so it lands on a peer) between two writes, as a well-behaved client
//!   does, instead of waiting for the server to drop it.
//! - the **prober** opens a new connection every so often, to each server in turn, as a user
//!   this run added (so a valid one), and records whether it was admitted, denied, or could
//!   not reach the server. After a refusal no authenticator decided ([`refusal_undecided`])
//!   it tries once more, as the client library's reconnect would, and records both.
//!
//! Everything goes to the history ([`super::history`]); `workload check` judges it.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nkeys::KeyPair;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::WorkloadError;
use super::history::{ConnectOutcome, Event, FailKind, HistoryWriter, WriteOutcome, now_ms};
use crate::auth::authenticator::ANSWER_WITHIN;
use crate::auth::envelope::Envelope;
use crate::membership::api::{ErrorKind, Reply};

/// Where the workload connects and as whom.
#[derive(Clone, Debug)]
pub struct Target {
    /// NATS URLs (`tls://host:port`); the writer gets them all, the prober takes turns.
    pub servers: Vec<String>,
    /// An admin's nkey seed: signs the writes and adds the probe user.
    pub seed: String,
    /// The cluster's CA to pin (TLS); none: plain connections.
    pub ca: Option<PathBuf>,
}

/// How hard and how long to push.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Pause between two writes.
    pub interval: Duration,
    /// Pause between two connection probes.
    pub probe_every: Duration,
    /// A request with no reply for this long is a failed attempt (retried).
    pub timeout: Duration,
    /// A write still failing after this long is given up (recorded, not acknowledged).
    pub write_deadline: Duration,
    /// Prefix of the room ids (a random run id follows).
    pub prefix: String,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            interval: Duration::from_millis(100),
            probe_every: Duration::from_millis(500),
            timeout: Duration::from_secs(3),
            write_deadline: Duration::from_secs(60),
            prefix: "wl".into(),
        }
    }
}

/// What a run did, for its closing line.
#[derive(Clone, Debug, Default)]
pub struct RunSummary {
    pub writes_acked: u64,
    pub writes_unacked: u64,
    pub connects_admitted: u64,
    pub connects_denied: u64,
}

/// Why an attempt failed: the kind recorded in the history and its message.
pub(super) struct Fail {
    pub kind: FailKind,
    pub ctl: Option<ErrorKind>,
    pub message: String,
}

/// Runs until `stop` turns true. Fails only if it cannot start (no connection, no probe
/// user within `write_deadline`); everything after that is recorded, not returned.
pub async fn run(
    target: &Target,
    opts: &RunOptions,
    history: Arc<HistoryWriter>,
    mut stop: watch::Receiver<bool>,
) -> Result<RunSummary, WorkloadError> {
    let key = Arc::new(
        KeyPair::from_seed(target.seed.trim())
            .map_err(|e| WorkloadError::Usage(format!("--seed-file: not an nkey seed: {e}")))?,
    );
    let lame_duck = Arc::new(AtomicBool::new(false));
    let mut client = connect_writer(target, opts, lame_duck.clone()).await?;

    // The probe user: fresh, so nothing else (a revocation by another test) affects it.
    let prober = KeyPair::new_user();
    let run_id = run_id();
    let add = json!({"key": prober.public_key(), "name": format!("workload {run_id} prober")});
    let deadline = tokio::time::Instant::now() + opts.write_deadline;
    loop {
        match ctl_call(&client, &key, "users.add", &add, opts.timeout).await {
            Ok(_) => break,
            Err(f) if f.ctl == Some(ErrorKind::Conflict) => break,
            Err(f) if f.kind.retryable() && tokio::time::Instant::now() < deadline => {
                tracing::warn!("adding the probe user: {}; retrying", f.message);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(f) => {
                return Err(WorkloadError::Remote(format!(
                    "cannot add the probe user: {}",
                    f.message
                )));
            }
        }
    }
    history.record(&Event::Start {
        at_ms: now_ms(),
        run: run_id.clone(),
        servers: target.servers.clone(),
        writer: key.public_key(),
        prober: prober.public_key(),
        interval_ms: opts.interval.as_millis() as u64,
        timeout_ms: opts.timeout.as_millis() as u64,
    });

    let probe = tokio::spawn(probe_loop(
        target.clone(),
        prober
            .seed()
            .map_err(|e| WorkloadError::Io(e.to_string()))?,
        opts.probe_every,
        history.clone(),
        stop.clone(),
    ));

    let mut summary = RunSummary::default();
    let mut n: u64 = 0;
    while !*stop.borrow() {
        if lame_duck.swap(false, Ordering::SeqCst) {
            tracing::info!("the writer's server is in lame duck: reconnecting to a peer");
            match connect_writer(target, opts, lame_duck.clone()).await {
                Ok(c) => client = c,
                Err(e) => tracing::warn!("reconnect failed ({e}); keeping the old connection"),
            }
        }
        n += 1;
        let id = format!("{}-{run_id}-{n}", opts.prefix);
        let outcome = write_room(&client, &key, &id, opts, &history, &mut stop).await;
        match outcome {
            WriteOutcome::Acked => summary.writes_acked += 1,
            _ => summary.writes_unacked += 1,
        }
        tokio::select! {
            _ = tokio::time::sleep(opts.interval) => {}
            _ = stop.changed() => {}
        }
    }
    let probes = probe.await.unwrap_or_default();
    summary.connects_admitted = probes.0;
    summary.connects_denied = probes.1;
    let _ = client.flush().await;
    Ok(summary)
}

/// One `rooms.create`, retried until acknowledged, refused, out of time or stopped.
async fn write_room(
    client: &async_nats::Client,
    key: &KeyPair,
    id: &str,
    opts: &RunOptions,
    history: &HistoryWriter,
    stop: &mut watch::Receiver<bool>,
) -> WriteOutcome {
    let body = json!({ "room": id });
    let started = now_ms();
    let deadline = tokio::time::Instant::now() + opts.write_deadline;
    let mut backoff = Duration::from_millis(50);
    let mut attempt = 0u32;
    let outcome = loop {
        attempt += 1;
        let at = now_ms();
        let fail = match ctl_call(client, key, "rooms.create", &body, opts.timeout).await {
            Ok(_) => break WriteOutcome::Acked,
            // A retry that finds the room: an earlier attempt went through unacknowledged.
            Err(f) if attempt > 1 && f.ctl == Some(ErrorKind::Conflict) => {
                break WriteOutcome::ExistsOnRetry;
            }
            Err(f) => f,
        };
        history.record(&Event::Attempt {
            at_ms: at,
            done_ms: now_ms(),
            id: id.to_string(),
            attempt,
            error: fail.kind,
            message: fail.message,
        });
        if !fail.kind.retryable() || tokio::time::Instant::now() >= deadline || *stop.borrow() {
            break WriteOutcome::GaveUp;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => break WriteOutcome::GaveUp,
        }
        backoff = (backoff * 2).min(Duration::from_secs(1));
    };
    history.record(&Event::Write {
        at_ms: started,
        done_ms: now_ms(),
        op: "rooms.create".into(),
        id: id.to_string(),
        outcome,
        attempts: attempt,
    });
    outcome
}

/// One signed control-plane call with its failure classified.
pub(super) async fn ctl_call(
    client: &async_nats::Client,
    key: &KeyPair,
    op: &str,
    body: &Value,
    timeout: Duration,
) -> Result<Value, Fail> {
    let fail = |kind, message: String| Fail {
        kind,
        ctl: None,
        message,
    };
    let raw = Envelope::sign(op, body, key)
        .map_err(|e| fail(FailKind::Refused, format!("cannot sign: {e}")))?
        .to_vec();
    let request = client.request(format!("unibus.ctl.{op}"), raw.into());
    let reply = match tokio::time::timeout(timeout, request).await {
        Err(_) => {
            return Err(fail(
                FailKind::Timeout,
                format!("no reply within {timeout:?}"),
            ));
        }
        Ok(Err(e)) => {
            use async_nats::RequestErrorKind as K;
            let kind = match e.kind() {
                K::TimedOut => FailKind::Timeout,
                K::NoResponders => FailKind::NoResponders,
                K::Other => FailKind::Transport,
                K::InvalidSubject | K::MaxPayloadExceeded => FailKind::Refused,
            };
            return Err(fail(kind, e.to_string()));
        }
        Ok(Ok(reply)) => reply,
    };
    match serde_json::from_slice::<Reply<Value>>(&reply.payload) {
        Ok(Reply::Ok(v)) => Ok(v),
        Ok(Reply::Error(e)) => Err(Fail {
            kind: if e.kind == ErrorKind::Unavailable {
                FailKind::Unavailable
            } else {
                FailKind::Refused
            },
            ctl: Some(e.kind),
            message: e.to_string(),
        }),
        Err(e) => Err(fail(FailKind::Transport, format!("unreadable reply: {e}"))),
    }
}

/// The writer's connection: every server, reconnecting forever; lame duck notices raise
/// `lame_duck` so the writer moves before its server closes the connection.
async fn connect_writer(
    target: &Target,
    opts: &RunOptions,
    lame_duck: Arc<AtomicBool>,
) -> Result<async_nats::Client, WorkloadError> {
    let addrs = addrs(&target.servers)?;
    let options = base_options(target, &target.seed, opts.timeout)?
        .request_timeout(Some(opts.timeout))
        .event_callback(move |event| {
            let lame_duck = lame_duck.clone();
            async move {
                if matches!(event, async_nats::Event::LameDuckMode) {
                    lame_duck.store(true, Ordering::SeqCst);
                }
            }
        });
    options.connect(addrs).await.map_err(|e| {
        WorkloadError::Remote(format!(
            "cannot connect to {}: {e}",
            target.servers.join(",")
        ))
    })
}

/// A plain client of every server (for `check`).
pub(super) async fn connect(
    target: &Target,
    timeout: Duration,
) -> Result<async_nats::Client, WorkloadError> {
    base_options(target, &target.seed, timeout)?
        .request_timeout(Some(timeout))
        .connect(addrs(&target.servers)?)
        .await
        .map_err(|e| {
            WorkloadError::Remote(format!(
                "cannot connect to {}: {e}",
                target.servers.join(",")
            ))
        })
}

fn base_options(
    target: &Target,
    seed: &str,
    timeout: Duration,
) -> Result<async_nats::ConnectOptions, WorkloadError> {
    let mut options = crate::client::nkey_options(seed)
        .map_err(WorkloadError::Usage)?
        .connection_timeout(timeout);
    if let Some(ca) = &target.ca {
        options = options.require_tls(true).add_root_certificates(ca.clone());
    }
    Ok(options)
}

fn addrs(servers: &[String]) -> Result<Vec<async_nats::ServerAddr>, WorkloadError> {
    servers
        .iter()
        .map(|s| {
            s.parse::<async_nats::ServerAddr>()
                .map_err(|e| WorkloadError::Usage(format!("--server `{s}` is not a NATS URL: {e}")))
        })
        .collect()
}

/// Whether a connection refused after `elapsed` was refused by nobody's decision: the
/// authenticator answers every callout within [`ANSWER_WITHIN`] (3 s) of its arrival,
/// some refusals (no quorum, a node starting) only at the end of that window, and
/// nats-server refuses on its own when its callout timeout (4 s) passes unanswered, as for
/// a client that reached a server listening before its node's authenticator subscribed.
/// Half a second past the window, and with the TLS handshake counted in `elapsed`, tells
/// the two apart. The second attempt's answer is the one counted either way, so the retry
/// hides no denial.
fn refusal_undecided(elapsed: Duration) -> bool {
    elapsed >= ANSWER_WITHIN + Duration::from_millis(500)
}

/// Opens a new connection to each server in turn; returns (admitted, denied).
async fn probe_loop(
    target: Target,
    seed: String,
    every: Duration,
    history: Arc<HistoryWriter>,
    mut stop: watch::Receiver<bool>,
) -> (u64, u64) {
    let (mut admitted, mut denied) = (0, 0);
    let mut turn = 0usize;
    while !*stop.borrow() {
        let server = target.servers[turn % target.servers.len()].clone();
        turn += 1;
        let at = now_ms();
        let started = std::time::Instant::now();
        let (mut outcome, mut message) = probe(&target, &seed, &server).await;
        // As a client of the library would (it reconnects), a refusal nobody decided is
        // tried once more, and the second answer is the one counted.
        let mut retried = None;
        if outcome == ConnectOutcome::Denied && refusal_undecided(started.elapsed()) {
            retried = Some(format!(
                "refused after {:.1} s: {}",
                started.elapsed().as_secs_f64(),
                message.take().unwrap_or_default()
            ));
            (outcome, message) = probe(&target, &seed, &server).await;
        }
        match outcome {
            ConnectOutcome::Admitted => admitted += 1,
            ConnectOutcome::Denied => denied += 1,
            ConnectOutcome::Unreachable => {}
        }
        history.record(&Event::Connect {
            at_ms: at,
            done_ms: now_ms(),
            server,
            outcome,
            message,
            retried,
        });
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => {}
        }
    }
    (admitted, denied)
}

/// The subject a probe asks: allowed to every admitted user (`unibus.ctl.*.*`) and served by
/// no one, so the server itself answers "no responders" — a round trip that needs no store.
const PROBE_SUBJECT: &str = "unibus.ctl.probe.none";

/// One new connection to one server, proven by a round trip, then closed.
///
/// Returning from `connect` is no proof of admission: async-nats takes any first server op
/// after CONNECT (an INFO update, say) as success, and `flush` only empties the socket
/// buffer, while the server may still be waiting on the auth callout. A request is
/// processed only after CONNECT was accepted, so its answer is the proof; an authorization
/// error reported on the connection instead is a denial.
async fn probe(target: &Target, seed: &str, server: &str) -> (ConnectOutcome, Option<String>) {
    let Ok(addr) = server.parse::<async_nats::ServerAddr>() else {
        return (ConnectOutcome::Unreachable, Some("not a NATS URL".into()));
    };
    let refused = Arc::new(std::sync::Mutex::new(None::<String>));
    let seen = refused.clone();
    // Longer than the auth callout's own timeout, so a slow callout shows as what it ends
    // in (admitted or denied), not as an unreachable server.
    let options = match base_options(target, seed, Duration::from_secs(5)) {
        Ok(options) => options,
        Err(e) => return (ConnectOutcome::Unreachable, Some(e.to_string())),
    };
    let options = options.event_callback(move |event| {
        let seen = seen.clone();
        async move {
            if let async_nats::Event::ServerError(e) = event
                && is_auth_error(&e.to_string())
                && let Ok(mut s) = seen.lock()
            {
                *s = Some(e.to_string());
            }
        }
    });
    let client = match options.connect(addr).await {
        Ok(client) => client,
        Err(e) => {
            let message = e.to_string();
            let denied = matches!(
                e.kind(),
                async_nats::ConnectErrorKind::AuthorizationViolation
                    | async_nats::ConnectErrorKind::Authentication
            ) || is_auth_error(&message);
            let outcome = if denied {
                ConnectOutcome::Denied
            } else {
                ConnectOutcome::Unreachable
            };
            return (outcome, Some(message));
        }
    };
    let answer = tokio::time::timeout(
        Duration::from_secs(6),
        client.request(PROBE_SUBJECT, bytes::Bytes::new()),
    )
    .await;
    drop(client);
    let denial = refused.lock().ok().and_then(|s| s.clone());
    match (answer, denial) {
        (_, Some(why)) => (ConnectOutcome::Denied, Some(why)),
        (Ok(Ok(_)), None) => (ConnectOutcome::Admitted, None),
        (Ok(Err(e)), None) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
            (ConnectOutcome::Admitted, None)
        }
        (Ok(Err(e)), None) => (
            ConnectOutcome::Unreachable,
            Some(format!("round trip: {e}")),
        ),
        (Err(_), None) => (
            ConnectOutcome::Unreachable,
            Some("round trip: no answer within 6s".into()),
        ),
    }
}

fn is_auth_error(message: &str) -> bool {
    let lower = message.to_ascii_lowercase();
    lower.contains("authoriz") || lower.contains("authenticat")
}

/// A short random run id (room ids must stay within 63 characters of `[a-z0-9_-]`).
fn run_id() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 4];
    let random = ring::rand::SystemRandom::new();
    if random.fill(&mut bytes).is_err() {
        // Uniqueness across runs is all that matters; the clock is a fine fallback.
        return format!("{:08x}", now_ms() & 0xffff_ffff);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
