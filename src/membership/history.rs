//! Durable room history: one JetStream stream, `ROOMS`, in the `APP` account.
//!
//! # Where the messages live, and why there
//!
//! Clients publish room messages on `unibus.room.<room>.<sender key>` in `APP`, so the
//! stream capturing them (`unibus.room.>`) lives in `APP` too: no account export or import,
//! and a publisher gets its JetStream ack on its own `_INBOX` like any JetStream publish.
//! The node reaches `APP` as its own *APP user* (a key derived from the service seed, in
//! `auth_users`, so it bypasses the callout like the service user does; see
//! `node::security`). That connection creates the stream at start-up (replicas as the
//! store's), serves the control plane, and opens feeds.
//!
//! # Who may read a room's history
//!
//! Clients get **no JetStream API permissions at all**. A listener asks the control plane
//! (`rooms.subscribe`, signed, member-checked like every other call) to open a *feed*: the
//! node creates an ephemeral push consumer filtered to `unibus.room.<room>.>` and delivering
//! to `unibus.deliver.<room>.<listener key>.<inbox>`. The authenticator lets a user
//! subscribe only to `unibus.deliver.<room>.<own key>.>` for rooms they have joined, so the
//! membership check happens twice: when the feed is opened (the control plane) and when the
//! deliveries are received (the server's subscribe permissions). A non-member can neither
//! open a feed nor receive one opened for someone else, and cannot create consumers of its
//! own, because `$JS.API.>` is not in anybody's allow list.
//!
//! # Exactly once, in order
//!
//! Each delivery carries its stream sequence and the consumer's own sequence in its
//! JetStream reply subject. The client (`client::feed`) remembers the last stream sequence
//! it handed out, drops anything at or below it, and on a consumer-sequence gap, a missed
//! heartbeat or a reconnect asks for a new feed starting right after it. The consumer is
//! ephemeral (in memory, one replica, gone `INACTIVE` after its listener disappears), so an
//! abandoned feed costs nothing for long.
//!
//! # Sender identity
//!
//! The sender is the last token of the stored subject. Under `bus-auth=enforce` a user may
//! publish only on its own key's subject, so that token is vouched for by the server, not by
//! the publisher (with `soft` or `off` it is only a claim).

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;

use super::api::{self, CtlError, ErrorKind, Feed, Start};

/// How often an idle feed sends a heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// How long a feed's consumer outlives its last listener.
pub const INACTIVE: Duration = Duration::from_secs(30);
/// The stream's duplicate window: a publisher retrying with the same `Nats-Msg-Id` within
/// it is stored once.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// Sets the `ROOMS` stream's replicas live, like the store's buckets (the stream config
/// is edited in place), and returns its replication as a bucket-shaped row. `js` must be
/// an `APP` connection: operator tools connect as the node's APP user (derived from the
/// service seed, see `node::security`).
pub async fn set_replicas(js: &jetstream::Context, n: usize) -> Result<(), String> {
    let mut stream = js
        .get_stream(api::ROOMS_STREAM)
        .await
        .map_err(|e| format!("look up stream {}: {e}", api::ROOMS_STREAM))?;
    let info = stream.info().await.map_err(|e| e.to_string())?;
    if info.config.num_replicas == n {
        return Ok(());
    }
    let mut config = info.config.clone();
    config.num_replicas = n;
    js.update_stream(config)
        .await
        .map(|_| ())
        .map_err(|e| format!("set replicas of stream {} to {n}: {e}", api::ROOMS_STREAM))
}

/// The `ROOMS` stream's replication: wanted, current (leader included), leader.
pub async fn replicas_status(
    js: &jetstream::Context,
) -> Result<crate::membership::jetstream::BucketStatus, String> {
    let mut stream = js
        .get_stream(api::ROOMS_STREAM)
        .await
        .map_err(|e| format!("look up stream {}: {e}", api::ROOMS_STREAM))?;
    let info = stream.info().await.map_err(|e| e.to_string())?;
    let (current, leader) = match &info.cluster {
        Some(c) => {
            let leader = c.leader.clone().filter(|l| !l.is_empty());
            let followers = c
                .replicas
                .iter()
                .filter(|p| p.current && !p.offline)
                .count();
            (usize::from(leader.is_some()) + followers, leader)
        }
        None => (1, None),
    };
    Ok(crate::membership::jetstream::BucketStatus {
        bucket: api::ROOMS_STREAM.to_string(),
        replicas_wanted: info.config.num_replicas,
        replicas_current: current,
        leader,
    })
}

/// How long one attempt of [`History::open`] waits for JetStream.
pub const OPEN_ATTEMPT: Duration = Duration::from_secs(1);

/// The node's handle on the `ROOMS` stream.
#[derive(Clone)]
pub struct History {
    js: jetstream::Context,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> CtlError {
    CtlError::new(ErrorKind::Unavailable, format!("{what}: {e}; retry"))
}

impl History {
    /// Binds the `ROOMS` stream on `client` (an `APP` connection), creating it with
    /// `replicas` if it does not exist. An existing stream keeps its replicas.
    ///
    /// One attempt waits at most [`OPEN_ATTEMPT`]: right after a cluster forms, a
    /// JetStream API request can go unanswered, and the node's start-up retries sooner
    /// than the context's timeout would (creating is idempotent: a retry binds what an
    /// unanswered attempt created).
    pub async fn open(client: async_nats::Client, replicas: usize) -> Result<History, String> {
        let js = jetstream::new(client);
        let create = js.get_or_create_stream(stream::Config {
            name: api::ROOMS_STREAM.into(),
            description: Some("unibus room messages: unibus.room.<room>.<sender>".into()),
            subjects: vec![format!("{}.>", api::ROOM_PREFIX)],
            num_replicas: replicas.max(1),
            storage: stream::StorageType::File,
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        });
        let failed = |e: &dyn std::fmt::Display| {
            format!(
                "cannot create or bind the {} stream: {e}",
                api::ROOMS_STREAM
            )
        };
        match tokio::time::timeout(OPEN_ATTEMPT, create).await {
            Ok(Ok(_)) => Ok(History { js }),
            Ok(Err(e)) => Err(failed(&e)),
            Err(_) => Err(failed(&format!("no answer within {OPEN_ATTEMPT:?}"))),
        }
    }

    /// Opens a feed of `room` for `listener` onto its `inbox` (see the module doc).
    pub async fn open_feed(
        &self,
        room: &str,
        listener: &str,
        inbox: &str,
        start: Start,
    ) -> Result<Feed, CtlError> {
        if !api::is_inbox_token(inbox) {
            return Err(CtlError::invalid(
                "inbox must be 1 to 64 characters of [A-Za-z0-9_-]",
            ));
        }
        let deliver_policy = match start {
            Start::All => consumer::DeliverPolicy::All,
            Start::New => consumer::DeliverPolicy::New,
            Start::After(seq) => consumer::DeliverPolicy::ByStartSequence {
                start_sequence: seq.saturating_add(1),
            },
        };
        let name = format!("feed-{}", nuid::next());
        let config = consumer::push::Config {
            name: Some(name.clone()),
            deliver_subject: api::deliver_subject(room, listener, inbox),
            filter_subject: api::room_filter(room),
            deliver_policy,
            ack_policy: consumer::AckPolicy::None,
            replay_policy: consumer::ReplayPolicy::Instant,
            idle_heartbeat: HEARTBEAT,
            inactive_threshold: INACTIVE,
            num_replicas: 1,
            memory_storage: true,
            ..Default::default()
        };
        let consumer = self
            .js
            .create_consumer_on_stream(config, api::ROOMS_STREAM)
            .await
            .map_err(|e| unavailable("cannot open the room feed", e))?;
        let info = consumer.cached_info();
        Ok(Feed {
            consumer: name,
            subject: api::deliver_subject(room, listener, inbox),
            after: info.delivered.stream_sequence,
            heartbeat_ms: HEARTBEAT.as_millis() as u64,
        })
    }

    /// Closes the open feeds of `room` (of one `listener`, or everyone's), when rights to
    /// the room are taken away: the listener's client notices, asks for a new feed and is
    /// refused, so a removed member stops receiving at once, without waiting for its
    /// connection to be re-admitted with fewer permissions. Best effort per consumer.
    pub async fn close_feeds(&self, room: &str, listener: Option<&str>) -> Result<usize, CtlError> {
        let prefix = match listener {
            Some(key) => format!("{}.{room}.{key}.", api::DELIVER_PREFIX),
            None => format!("{}.{room}.", api::DELIVER_PREFIX),
        };
        self.close_matching(|subject| subject.starts_with(&prefix))
            .await
    }

    /// Closes every feed of `listener` in any room (the user was revoked).
    pub async fn close_feeds_of(&self, listener: &str) -> Result<usize, CtlError> {
        // `unibus.deliver.<room>.<listener>.<inbox>`
        let prefix = format!("{}.", api::DELIVER_PREFIX);
        let owned = format!("{listener}.");
        self.close_matching(|subject| {
            subject
                .strip_prefix(&prefix)
                .and_then(|rest| rest.split_once('.'))
                .is_some_and(|(_room, rest)| rest.starts_with(&owned))
        })
        .await
    }

    async fn close_matching(&self, matches: impl Fn(&str) -> bool) -> Result<usize, CtlError> {
        let stream = self
            .js
            .get_stream_no_info(api::ROOMS_STREAM)
            .await
            .map_err(|e| unavailable("cannot reach the room history", e))?;
        let mut consumers = stream.consumers();
        let mut doomed = Vec::new();
        while let Some(info) = consumers.next().await {
            let info = info.map_err(|e| unavailable("cannot list the room feeds", e))?;
            if info.config.deliver_subject.as_deref().is_some_and(&matches) {
                doomed.push(info.name);
            }
        }
        let mut closed = 0;
        for name in doomed {
            match stream.delete_consumer(&name).await {
                Ok(_) => closed += 1,
                Err(e) => tracing::warn!(consumer = name, "cannot close a room feed: {e}"),
            }
        }
        Ok(closed)
    }

    /// Removes every stored message of `room` (when it is deleted: a later room with the same
    /// id must not inherit its history).
    pub async fn purge_room(&self, room: &str) -> Result<(), CtlError> {
        let stream = self
            .js
            .get_stream_no_info(api::ROOMS_STREAM)
            .await
            .map_err(|e| unavailable("cannot reach the room history", e))?;
        stream
            .purge()
            .filter(api::room_filter(room))
            .await
            .map_err(|e| unavailable("cannot purge the room's history", e))?;
        Ok(())
    }
}
