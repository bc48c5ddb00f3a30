//! Leadership handover: before a stopping node's nats-server goes into lame duck, the
//! node asks every unibus stream it leads to elect another leader, and waits (bounded)
//! until each has one.
//!
//! # Why
//!
//! Lame duck moves Raft leaders as well, but as the first step of taking the server
//! down: it steps down every group at once, then a second later shuts JetStream off on
//! that server, so the new elections and the loss of a replica overlap. A control-plane
//! write in flight to an old leader in that moment got no answer until the store's
//! `op_timeout` (2 s), the longest gap of a rolling restart. Handing over first, while
//! all three replicas still run, makes each move one quick, ordinary leader transfer;
//! lame duck then finds nothing left to move. (Requests caught in a transfer anyway are
//! retried by the store: `membership::cas`, `membership::jetstream`.)
//!
//! # What
//!
//! The streams are unibus's own, by name: the five KV buckets and the nonce ledger in the
//! service identity's account (`AUTH`), and `ROOMS` in the node's `APP` account (one and
//! the same account with `bus-auth=off`). For each, `STREAM.INFO` names its leader; where
//! that is this server, `$JS.API.STREAM.LEADER.STEPDOWN.<stream>` asks it to hand over,
//! and `STREAM.INFO` is polled until another server leads. All streams at once: each
//! transfer takes tens of milliseconds, so the whole handover is one short moment.
//!
//! The JetStream meta leader is left to lame duck: control-plane reads and writes never
//! go through it (only stream and consumer management do, e.g. opening a room feed), and
//! moving it would take the system account's user.
//!
//! # Bounded and best-effort
//!
//! The whole handover is bounded by one limit. A single node, a stream with no other
//! current replica (R1, or a cluster that lost quorum), a server that does not answer:
//! each is logged and the shutdown goes on to lame duck as before. It never fails the
//! shutdown.

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream;
use futures_util::future::join_all;
use tokio::time::Instant;

use super::security::Security;
use super::store;
use crate::config::Config;
use crate::membership::{api, jetstream::BUCKETS, nonces};

/// How long one `STREAM.INFO` may take while polling; a stream in the middle of an
/// election answers nothing, so a poll must not wait long for it.
const POLL_REQUEST: Duration = Duration::from_millis(250);
const POLL_EVERY: Duration = Duration::from_millis(25);

/// What became of the streams this node led.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// `stream → new leader`, for each stream handed over.
    pub moved: Vec<(String, String)>,
    /// Streams this node still leads (or whose new leader was not seen) at the deadline,
    /// with why.
    pub stuck: Vec<(String, String)>,
}

/// Hands over the streams this node leads (see the module docs), within `limit`.
pub async fn run(config: &Config, security: &Security, limit: Duration) -> Report {
    let deadline = Instant::now() + limit;
    let service =
        tokio::time::timeout_at(deadline, store::connect_local(config, security, "handover"));
    let app = tokio::time::timeout_at(
        deadline,
        store::connect_app(config, security, "handover-app"),
    );
    let (service, app) = tokio::join!(service, app);
    let mut accounts = Vec::new();
    let auth_streams: Vec<String> = BUCKETS
        .iter()
        .map(|b| format!("KV_{b}"))
        .chain([nonces::STREAM.to_string()])
        .collect();
    match service {
        Ok(Ok(client)) => accounts.push((client, auth_streams)),
        Ok(Err(e)) => {
            tracing::warn!("leadership handover: {e}; lame duck will move the store's leaders")
        }
        Err(_) => tracing::warn!(
            "leadership handover: no connection to the local server within {limit:?}"
        ),
    }
    match app {
        Ok(Ok(client)) => accounts.push((client, vec![api::ROOMS_STREAM.to_string()])),
        Ok(Err(e)) => {
            tracing::warn!("leadership handover: {e}; lame duck will move the ROOMS leader")
        }
        Err(_) => tracing::warn!(
            "leadership handover: no APP connection to the local server within {limit:?}"
        ),
    }
    let report = hand_over(&accounts, deadline).await;
    for (client, _) in accounts {
        // Close cleanly, bounded: the server may already be going away.
        let _ = tokio::time::timeout(POLL_REQUEST, client.drain()).await;
    }
    report
}

/// Hands over, within `deadline`, the leadership of each named stream that the server
/// behind its connection leads. Each entry is a connection and the streams of its
/// account; a name given twice is handled once.
pub async fn hand_over(
    accounts: &[(async_nats::Client, Vec<String>)],
    deadline: Instant,
) -> Report {
    let mut seen = BTreeSet::new();
    let mut jobs = Vec::new();
    for (client, streams) in accounts {
        let me = client.server_info().server_name;
        let js = jetstream::ContextBuilder::new()
            .timeout(POLL_REQUEST)
            .build(client.clone());
        for stream in streams {
            if seen.insert(stream.clone()) {
                jobs.push(hand_over_one(
                    client,
                    js.clone(),
                    stream.clone(),
                    me.clone(),
                    deadline,
                ));
            }
        }
    }
    let mut report = Report::default();
    for outcome in join_all(jobs).await {
        match outcome {
            Outcome::NotLeader => {}
            Outcome::Moved(stream, to) => {
                tracing::info!(stream, to, "handed stream leadership over before lame duck");
                report.moved.push((stream, to));
            }
            Outcome::Stuck(stream, why) => {
                tracing::warn!(
                    stream,
                    "could not hand stream leadership over ({why}); lame duck will"
                );
                report.stuck.push((stream, why));
            }
        }
    }
    report
}

enum Outcome {
    NotLeader,
    Moved(String, String),
    Stuck(String, String),
}

async fn hand_over_one(
    client: &async_nats::Client,
    js: jetstream::Context,
    stream: String,
    me: String,
    deadline: Instant,
) -> Outcome {
    // Who leads now? A stream that does not exist, or answers nothing, is not ours to
    // move (a leaderless stream has no leader here either).
    let leader = match tokio::time::timeout_at(deadline, leader_of(&js, &stream)).await {
        Ok(Some(leader)) => leader,
        Ok(None) | Err(_) => return Outcome::NotLeader,
    };
    if leader != me {
        return Outcome::NotLeader;
    }
    let subject = format!("$JS.API.STREAM.LEADER.STEPDOWN.{stream}");
    let answer = tokio::time::timeout_at(deadline, client.request(subject, "".into())).await;
    match answer {
        Ok(Ok(reply)) => {
            if let Some(error) = stepdown_error(&reply.payload) {
                return Outcome::Stuck(stream, error);
            }
        }
        Ok(Err(e)) => return Outcome::Stuck(stream, format!("step-down request: {e}")),
        Err(_) => return Outcome::Stuck(stream, "no answer to the step-down request".into()),
    }
    // Wait until another server leads: until then a write has nowhere to go.
    loop {
        if let Some(leader) = leader_of(&js, &stream).await
            && leader != me
        {
            return Outcome::Moved(stream, leader);
        }
        if Instant::now() + POLL_EVERY >= deadline {
            return Outcome::Stuck(stream, "no new leader before the deadline".into());
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// The stream's current leader, as its leader reports it (None: no answer, no leader, or
/// no such stream).
async fn leader_of(js: &jetstream::Context, stream: &str) -> Option<String> {
    // `get_stream_no_info` only makes a handle; `get_info` is the one request.
    let handle = js.get_stream_no_info(stream).await.ok()?;
    let info = tokio::time::timeout(POLL_REQUEST, handle.get_info())
        .await
        .ok()?
        .ok()?;
    info.cluster
        .and_then(|c| c.leader)
        .filter(|leader| !leader.is_empty())
}

/// The error a step-down answer carries, if any (`{"error": {"description": …}}`).
fn stepdown_error(payload: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Answer {
        #[serde(default)]
        success: bool,
        #[serde(default)]
        error: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<Answer>(payload) {
        Ok(Answer { error: Some(e), .. }) => Some(
            e.get("description")
                .and_then(|d| d.as_str())
                .map(str::to_string)
                .unwrap_or_else(|| e.to_string()),
        ),
        Ok(Answer { success: true, .. }) => None,
        Ok(_) => Some("the server did not confirm the step-down".into()),
        Err(e) => Some(format!("unreadable step-down answer: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stepdown_answers_are_read() {
        assert_eq!(stepdown_error(br#"{"type":"x","success":true}"#), None);
        assert_eq!(
            stepdown_error(
                br#"{"error":{"code":400,"err_code":10074,"description":"no replicas"}}"#
            )
            .as_deref(),
            Some("no replicas")
        );
        assert!(stepdown_error(b"{}").is_some());
        assert!(stepdown_error(b"not json").is_some());
    }
}
