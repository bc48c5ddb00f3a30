//! JetStream KV backend: the control plane replicated across a NATS cluster.
//!
//! # Buckets and keys
//!
//! | bucket | key | value |
//! |---|---|---|
//! | `users` | `<KEY>` | [`User`] JSON |
//! | `rooms` | `<room>` | [`Room`] JSON |
//! | `members` | `<room>.<endpoint>` | [`Member`] JSON (authoritative) |
//! | `rooms_by_member` | `<endpoint>.<room>` | the room id (derived index) |
//! | `room_keys` | `<room>.<epoch as 10 digits>` | [`RoomKey`] JSON |
//!
//! Every id is validated by [`ids`] first, so a key can never carry `.`, `*` or `>` beyond
//! the separators placed here. Buckets keep one revision per key (`history: 1`).
//!
//! # Reads see the caller's writes (leader reads)
//!
//! async-nats' `kv::Store::get`/`entry` use the *direct get* API whenever the bucket allows
//! it (`allow_direct`, which `create_key_value` turns on). Direct gets may be answered by
//! any replica, including a follower that has not applied the latest write, so a read right
//! after an acknowledged write could be stale. This backend therefore never reads through
//! `kv::Store::get`: single keys are read with `$JS.API.STREAM.MSG.GET` (the stream's
//! `get_last_raw_message_by_subject`), and listings enumerate subjects with a stream info
//! request filtered by subject. Both APIs are answered only by the stream's Raft leader,
//! which holds every acknowledged (committed) write — so a caller's read after its own
//! write sees it, whichever node the request enters through.
//!
//! Bulk reads ([`KvStore::scan`], used by `unibus migrate`) are the one exception: values
//! come from an ordered consumer, which a follower may host, but the *key set* is always
//! the leader's subject listing, so acknowledged creates and deletes are never missed;
//! `migrate` re-reads any key it would act on from the leader.
//!
//! # Deletes
//!
//! A key is deleted by purging its subject from the stream (no tombstone left), so subject
//! listings contain live keys only — with one exception: a deleted *room* leaves a delete
//! marker (`KV-Operation: DEL`) on its key. A room id taken again then finds the marker,
//! and only then does `create_room` look for members and keys a racing write may have left
//! under the id; a never-used id (nearly every create) needs no such reads. Listings of
//! `rooms` therefore show deleted ids too: every reader of a room ignores markers, and the
//! reconciler re-reads a room from the leader before it acts on the room being there or
//! not. Reads ignore `DEL`/`PURGE` markers everywhere (other KV clients write them too).
//!
//! # Two-bucket writes
//!
//! See the [module docs](super): `members` and index together on add, index first on
//! remove, room record last on room delete; [`KvStore::reconcile`] repairs interrupted
//! writes (leaving fresh index entries alone for a grace period) and
//! `list_rooms_for_endpoint` re-checks `members` and `rooms` for every index entry.
//!
//! # Timeouts and failing closed
//!
//! Every NATS request is bounded by `op_timeout` (an expiry is
//! [`StoreError::Unavailable`]); listings bound each request, so a large listing may take
//! several `op_timeout`s but never hangs. Within that bound, requests a leader handover
//! may swallow are asked again (`bounded_retry`); compare-and-set writes too, through
//! [`super::cas`], which keeps a repeat of a write that landed from being reported as a
//! conflict. `is_authorized` and `has_admin` bound their whole
//! call by one `op_timeout` and answer `false` on any error.
//!
//! # Replicas and cluster size
//!
//! Replicas must be 1..=5. NATS does not expose the meta group's size to ordinary accounts,
//! so for `n > 1` the backend asks the server's own placement logic: it creates a tiny
//! memory stream with `n` replicas and deletes it again. If the servers cannot place `n`
//! replicas ("insufficient resources"), the cluster has fewer than `n` JetStream servers
//! available and the request is refused before any bucket is created or changed.
//! Changing replicas later edits each `KV_<bucket>` stream config (`update_stream`), never
//! `update_key_value`, which would rebuild the config and reset fields.

use super::cas::{self, Cas};
use super::quorum::{self, Quorum};
use super::{Member, MemberState, Result, Role, Room, RoomKey, StoreError, User, ids, now_ms};
use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt, TryStreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// How many rooms' checks one `list_rooms_for_endpoint` keeps in flight (two leader reads
/// each).
const MEMBERSHIP_READS_IN_FLIGHT: usize = 32;

/// The five buckets, in the order they are opened and reported.
pub const BUCKETS: [&str; 5] = ["users", "rooms", "members", "rooms_by_member", "room_keys"];

/// How [`KvStore::open`] binds the buckets.
#[derive(Debug, Clone)]
pub struct KvOptions {
    /// Replicas for buckets this call creates (1..=5, at most the cluster's size).
    pub replicas: usize,
    /// Bound on every NATS request.
    pub op_timeout: Duration,
    /// Create missing buckets (otherwise a missing bucket is `NotFound`).
    pub create: bool,
    /// How long `open` waits for every bucket's stream to have a leader.
    pub leader_timeout: Duration,
}

impl Default for KvOptions {
    fn default() -> Self {
        Self {
            replicas: 1,
            op_timeout: Duration::from_secs(2),
            create: true,
            leader_timeout: Duration::from_secs(30),
        }
    }
}

/// Replication state of one bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct BucketStatus {
    /// Bucket name (`users`, ...); its stream is `KV_<bucket>`.
    pub bucket: String,
    /// Configured replicas.
    pub replicas_wanted: usize,
    /// Replicas that are current (the leader counts as one).
    pub replicas_current: usize,
    /// Server name of the stream's leader, if it has one.
    pub leader: Option<String>,
}

/// What [`KvStore::reconcile`] repaired.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ReconcileReport {
    /// Index entries written for members that had none.
    pub index_added: usize,
    /// Index entries deleted because their member (or room) does not exist.
    pub index_removed: usize,
    /// Members and room keys deleted because their room does not exist.
    pub orphans_removed: usize,
}

/// The JetStream KV store.
#[derive(Clone)]
pub struct KvStore {
    client: async_nats::Client,
    js: jetstream::Context,
    op_timeout: Duration,
    // Boxed behind `Arc`: a `kv::Store` carries the stream's cached info (kilobytes), and
    // `Store` is an enum passed around by value.
    pub(super) users: Arc<kv::Store>,
    pub(super) rooms: Arc<kv::Store>,
    pub(super) members: Arc<kv::Store>,
    pub(super) index: Arc<kv::Store>,
    pub(super) keys: Arc<kv::Store>,
    /// Shared by clones: barrier rounds of [`Self::confirm_quorum`].
    quorum: Arc<Quorum>,
}

impl std::fmt::Debug for KvStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvStore")
            .field("op_timeout", &self.op_timeout)
            .finish_non_exhaustive()
    }
}

fn unavailable(what: &str, err: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("{what}: {err}"))
}

/// A `DEL` or `PURGE` marker another KV client left (this store purges instead).
fn is_delete_marker(headers: &async_nats::HeaderMap) -> bool {
    headers
        .get("KV-Operation")
        .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"))
}

fn js_code(err: &jetstream::Error) -> jetstream::ErrorCode {
    err.error_code()
}

/// How a create-if-absent write ended.
enum Created {
    /// Written; the key had never held anything (as far as the stream remembers).
    Fresh,
    /// Written over a delete marker, or after something under the key was purged while
    /// we tried: the key was used before.
    Reused,
    /// Refused: the key holds a value.
    Taken,
}

/// Runs `fut` bounded by `limit`.
async fn bounded<T>(
    limit: Duration,
    what: &str,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(limit, fut).await {
        Ok(res) => res,
        Err(_) => Err(StoreError::Unavailable(format!(
            "{what}: no answer within {limit:?}"
        ))),
    }
}

/// Attempts an idempotent request may make within one `op_timeout`.
const IDEMPOTENT_ATTEMPTS: u32 = 4;

/// Runs an idempotent request (a read, a purge, a plain put) bounded by `limit` as a
/// whole, hedged: if an attempt has not answered after a quarter of `limit`, another one
/// goes out beside it (the first keeps running; whichever answers first wins; at most
/// [`IDEMPOTENT_ATTEMPTS`] this way), and an attempt that fails `unavailable` is repeated
/// after a short pause (growing to 250 ms) until `limit`. A request in flight
/// while a stream leader hands over (lame duck, a rolling restart) is dropped by the old
/// leader and never answered; waiting the whole `op_timeout` for it stalled every write
/// behind it for 2 s, where a second request reaches the new leader at once. A slow but
/// live attempt is never cancelled for a retry. Compare-and-set writes (`create`,
/// `update`, nonce claims) come through here only inside [`super::cas`], which makes a
/// repeat of one that landed count as written rather than as a conflict.
pub(super) async fn bounded_retry<T, F, Fut>(
    limit: Duration,
    what: &str,
    mut attempt: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let hedge_after = limit / IDEMPOTENT_ATTEMPTS;
    let deadline = tokio::time::Instant::now() + limit;
    let run = async {
        let mut inflight = futures_util::stream::FuturesUnordered::new();
        inflight.push(attempt());
        let mut launched = 1u32;
        let mut pause = Duration::from_millis(25);
        let mut last = None;
        loop {
            if inflight.is_empty() {
                // Every attempt failed fast (a stream just created, a leader being
                // elected: "no responders"): try again until `limit`, not a fixed number
                // of times, which such failures used up in a fraction of it.
                if tokio::time::Instant::now() + pause >= deadline {
                    return Err(last.unwrap_or_else(|| {
                        StoreError::Unavailable(format!("{what}: no attempt answered"))
                    }));
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(250));
                inflight.push(attempt());
                launched += 1;
            }
            tokio::select! {
                answer = inflight.next() => match answer {
                    Some(Err(StoreError::Unavailable(e))) => {
                        tracing::debug!("{what}: attempt failed ({e}); retrying");
                        last = Some(StoreError::Unavailable(e));
                    }
                    Some(other) => return other,
                    None => {}
                },
                _ = tokio::time::sleep(hedge_after), if launched < IDEMPOTENT_ATTEMPTS => {
                    tracing::debug!("{what}: no answer after {hedge_after:?}; asking again");
                    inflight.push(attempt());
                    launched += 1;
                }
            }
        }
    };
    bounded(limit, what, run).await
}

pub(super) fn encode<T: Serialize>(value: &T) -> Result<Bytes> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|e| StoreError::Backend(format!("encode record: {e}")))
}

fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| {
        StoreError::Backend(format!(
            "corrupt {what} record ({e}); inspect it with `nats kv get` and repair or delete it"
        ))
    })
}

pub(super) fn epoch_key(room: &str, epoch: u32) -> String {
    format!("{room}.{epoch:010}")
}

/// Validates replicas against the static range.
fn replicas_in_range(n: usize) -> Result<usize> {
    if (1..=5).contains(&n) {
        Ok(n)
    } else {
        Err(StoreError::Invalid {
            field: "replicas",
            reason: format!("{n} is outside 1..=5; use 1 for a single copy, 3 or 5 for quorum"),
        })
    }
}

impl KvStore {
    /// The JetStream context the buckets live in (the nonce ledger shares it).
    pub(crate) fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }
}

// ---- single-bucket primitives, each one NATS request bounded by op_timeout

impl KvStore {
    pub(super) async fn get_raw(&self, kv: &kv::Store, key: &str) -> Result<Option<(Bytes, u64)>> {
        Ok(self
            .last_message(kv, key)
            .await?
            .filter(|msg| !is_delete_marker(&msg.headers))
            .map(|msg| (msg.payload, msg.sequence)))
    }

    /// The last message under `key` (a key, or a `prefix.>` wildcard), delete markers
    /// included, from the stream's leader; None when there is none.
    async fn last_message(
        &self,
        kv: &kv::Store,
        key: &str,
    ) -> Result<Option<jetstream::message::StreamMessage>> {
        let subject = format!("{}{key}", kv.prefix);
        cas::last_message(&kv.stream, &subject, self.op_timeout).await
    }

    async fn get_json<T: DeserializeOwned>(
        &self,
        kv: &kv::Store,
        key: &str,
    ) -> Result<Option<(T, u64)>> {
        match self.get_raw(kv, key).await? {
            Some((bytes, rev)) => Ok(Some((decode(&kv.name, &bytes)?, rev))),
            None => Ok(None),
        }
    }

    /// Creates `key`; `Ok(false)` if it already exists. A compare-and-set publish that
    /// may be retried across a leader handover without reporting its own success as a
    /// conflict ([`super::cas`]).
    pub(super) async fn create(&self, kv: &kv::Store, key: &str, value: Bytes) -> Result<bool> {
        Ok(!matches!(
            self.create_noting_reuse(kv, key, value).await?,
            Created::Taken
        ))
    }

    /// [`Self::create`], telling whether the key had been used (and deleted) before.
    async fn create_noting_reuse(
        &self,
        kv: &kv::Store,
        key: &str,
        value: Bytes,
    ) -> Result<Created> {
        let mut expected = 0;
        let mut reused = false;
        // A few rounds at most: a key whose last message is a delete marker (a deleted
        // room, or another KV client's delete) is taken over at the marker's revision, as
        // async-nats' own `create` does, and a key purged between the refusal and its
        // read-back is free again. A key that keeps changing under us is a conflict.
        for _ in 0..3 {
            match self.cas(kv, key, value.clone(), expected).await? {
                Cas::Written(_) if reused => return Ok(Created::Reused),
                Cas::Written(_) => return Ok(Created::Fresh),
                Cas::Moved(Some(last)) if is_delete_marker(&last.headers) => {
                    expected = last.sequence;
                    reused = true;
                }
                Cas::Moved(None) => {
                    expected = 0;
                    reused = true;
                }
                Cas::Moved(Some(_)) => return Ok(Created::Taken),
            }
        }
        Ok(Created::Taken)
    }

    /// A compare-and-set publish of `key` at revision `expected` (0: no message).
    async fn cas(&self, kv: &kv::Store, key: &str, value: Bytes, expected: u64) -> Result<Cas> {
        // The buckets are this store's own, in its own account (no mirror, no domain
        // prefix), so a key's write subject is its stream subject.
        let subject = format!("{}{key}", kv.prefix);
        cas::publish(
            &self.js,
            &kv.stream,
            &subject,
            value,
            expected,
            self.op_timeout,
        )
        .await
    }

    pub(super) async fn put(&self, kv: &kv::Store, key: &str, value: Bytes) -> Result<u64> {
        let what = format!("write {}/{key}", kv.name);
        bounded_retry(self.op_timeout, &what, || async {
            kv.put(key, value.clone())
                .await
                .map_err(|e| unavailable(&what, e))
        })
        .await
    }

    /// Compare-and-set; `Ok(false)` if the revision moved. Retried like [`Self::create`].
    async fn update(&self, kv: &kv::Store, key: &str, value: Bytes, rev: u64) -> Result<bool> {
        Ok(matches!(
            self.cas(kv, key, value, rev).await?,
            Cas::Written(_)
        ))
    }

    /// Removes every message of `key` (a key or a `prefix.>` wildcard). Idempotent.
    async fn purge(&self, kv: &kv::Store, key: &str) -> Result<()> {
        let what = format!("delete {}/{key}", kv.name);
        let subject = format!("{}{key}", kv.prefix);
        bounded_retry(self.op_timeout, &what, || async {
            kv.stream
                .purge()
                .filter(subject.clone())
                .await
                .map(|_| ())
                .map_err(|e| unavailable(&what, e))
        })
        .await
    }

    /// Replaces `key`'s value by a delete marker (see the module doc on deletes).
    /// Idempotent.
    async fn mark_deleted(&self, kv: &kv::Store, key: &str) -> Result<()> {
        let what = format!("delete {}/{key}", kv.name);
        bounded_retry(self.op_timeout, &what, || async {
            kv.delete(key).await.map_err(|e| unavailable(&what, e))
        })
        .await
    }

    /// Live keys matching `filter` (`>` or `prefix.>`), sorted, read from the leader.
    pub(super) async fn keys(&self, kv: &kv::Store, filter: &str) -> Result<Vec<String>> {
        let what = format!("list {}/{filter}", kv.name);
        let subject = format!("{}{filter}", kv.prefix);
        let mut info = bounded(self.op_timeout, &what, async {
            kv.stream
                .info_with_subjects(subject)
                .await
                .map_err(|e| unavailable(&what, e))
        })
        .await?;
        let mut keys = Vec::new();
        loop {
            let next = bounded(self.op_timeout, &what, async { Ok(info.next().await) }).await?;
            match next {
                None => break,
                Some(Err(e)) => return Err(unavailable(&what, e)),
                Some(Ok((subject, count))) => {
                    if count == 0 {
                        continue;
                    }
                    if let Some(key) = subject.strip_prefix(kv.prefix.as_str())
                        && !quorum::is_reserved(key)
                    {
                        keys.push(key.to_string());
                    }
                }
            }
        }
        keys.sort();
        Ok(keys)
    }

    /// Whether `room` exists (a leader read; a deleted room's marker is no room).
    async fn room_exists(&self, room: &str) -> Result<bool> {
        Ok(self.get_raw(&self.rooms, room).await?.is_some())
    }

    async fn require_room(&self, id: &str) -> Result<Room> {
        match self.get_json::<Room>(&self.rooms, id).await? {
            Some((room, _)) => Ok(room),
            None => Err(StoreError::not_found(format!("room {id:?}"))),
        }
    }

    pub(super) async fn write_index(&self, room: &str, endpoint: &str) -> Result<()> {
        self.put(
            &self.index,
            &format!("{endpoint}.{room}"),
            Bytes::from(room.to_string()),
        )
        .await
        .map(|_| ())
    }

    /// Whether `kv` holds any message under `filter` (`prefix.>`), delete markers
    /// included: one leader read (`STREAM.MSG.GET` with a wildcard `last_by_subj`, which
    /// the server answers from its subject index), much cheaper than a subject listing
    /// (a stream info request). "No message" from the leader means a listing taken at
    /// that moment would have been empty.
    async fn any_under(&self, kv: &kv::Store, filter: &str) -> Result<bool> {
        Ok(self.last_message(kv, filter).await?.is_some())
    }

    /// Lists `filter` only if [`Self::any_under`] finds something there.
    async fn keys_if_any(&self, kv: &kv::Store, filter: &str) -> Result<Vec<String>> {
        if self.any_under(kv, filter).await? {
            self.keys(kv, filter).await
        } else {
            Ok(Vec::new())
        }
    }

    /// [`Self::purge_room_children`] for a room id just taken again, but only what is
    /// there, and never `owner`'s member record or index entry (being written beside
    /// this). Usually there is nothing: one cheap leader read per bucket (in parallel)
    /// decides. The probes and listings are leader reads (see the module doc), so
    /// whatever they do not show was not acknowledged when they were taken — the same
    /// guarantee an unconditional purge at that moment gives (a write landing after either
    /// is not caught by either).
    async fn purge_room_leftovers(&self, room: &str, owner: &str) -> Result<()> {
        let filter = format!("{room}.>");
        let (members, keys) = futures_util::future::try_join(
            self.keys_if_any(&self.members, &filter),
            self.keys_if_any(&self.keys, &filter),
        )
        .await?;
        for key in &members {
            if let Some((_, endpoint)) = key.split_once('.')
                && endpoint != owner
            {
                self.purge(&self.index, &format!("{endpoint}.{room}"))
                    .await?;
                self.purge(&self.members, key).await?;
            }
        }
        if !keys.is_empty() {
            self.purge(&self.keys, &filter).await?;
        }
        Ok(())
    }

    /// Removes every member (index entry first), then every room key, of `room`.
    async fn purge_room_children(&self, room: &str) -> Result<()> {
        for key in self.keys(&self.members, &format!("{room}.>")).await? {
            if let Some((_, endpoint)) = key.split_once('.') {
                self.purge(&self.index, &format!("{endpoint}.{room}"))
                    .await?;
            }
        }
        self.purge(&self.members, &format!("{room}.>")).await?;
        self.purge(&self.keys, &format!("{room}.>")).await?;
        Ok(())
    }
}

// ---- bulk reads (migration and verification)

impl KvStore {
    /// Every live key of `kv` with its value, for bulk comparison (`unibus migrate`).
    ///
    /// One request per key would be tens of thousands of round trips, so values come from
    /// one ordered consumer (`LastPerSubject`) instead. A consumer may be hosted by a
    /// follower, which can lag behind the leader; to keep read-your-writes for the key set
    /// this reads in two steps (see the module docs):
    ///
    /// 1. the consumer's values, then
    /// 2. the key set from the leader (a subject listing, after step 1).
    ///
    /// The leader's key set wins: a key the consumer delivered but the leader no longer
    /// lists was deleted and is dropped; a key the leader lists but the consumer missed is
    /// read from the leader. So every acknowledged create or delete is reflected. A value
    /// may still be stale when *another* writer changed the key while the scan ran on a
    /// lagging follower; callers that act on a difference re-read that key with a leader
    /// read ([`KvStore::get_raw`]) first, as `migrate` does.
    pub(super) async fn scan(&self, kv: &kv::Store) -> Result<BTreeMap<String, Bytes>> {
        let mut values = self.consume_latest(kv).await?;
        let listed = self.keys(kv, ">").await?;
        let listed_set: BTreeSet<&str> = listed.iter().map(String::as_str).collect();
        values.retain(|key, _| listed_set.contains(key.as_str()));
        for key in &listed {
            if values.contains_key(key) {
                continue;
            }
            if let Some((bytes, _)) = self.get_raw(kv, key).await? {
                values.insert(key.clone(), bytes);
            }
        }
        Ok(values)
    }

    /// The latest value of every key through one ordered consumer (may lag; see `scan`).
    async fn consume_latest(&self, kv: &kv::Store) -> Result<BTreeMap<String, Bytes>> {
        use jetstream::consumer::{DeliverPolicy, pull};
        let what = format!("scan bucket {}", kv.name);
        let consumer = bounded(self.op_timeout, &what, async {
            kv.stream
                .create_consumer(pull::OrderedConfig {
                    filter_subject: format!("{}>", kv.prefix),
                    deliver_policy: DeliverPolicy::LastPerSubject,
                    ..Default::default()
                })
                .await
                .map_err(|e| unavailable(&what, e))
        })
        .await?;
        let mut out = BTreeMap::new();
        if consumer.cached_info().num_pending == 0 {
            return Ok(out);
        }
        let mut messages = bounded(self.op_timeout, &what, async {
            consumer.messages().await.map_err(|e| unavailable(&what, e))
        })
        .await?;
        loop {
            let next = bounded(self.op_timeout, &what, async { Ok(messages.next().await) }).await?;
            let msg = match next {
                None => break,
                Some(Err(e)) => return Err(unavailable(&what, e)),
                Some(Ok(msg)) => msg,
            };
            let pending = msg.info().map(|i| i.pending).map_err(|e| {
                StoreError::Backend(format!("{what}: message without JetStream metadata: {e}"))
            })?;
            let deleted = msg
                .headers
                .as_ref()
                .and_then(|h| h.get("KV-Operation"))
                .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"));
            if let Some(key) = msg.subject.as_str().strip_prefix(kv.prefix.as_str())
                && !quorum::is_reserved(key)
            {
                if deleted {
                    out.remove(key);
                } else {
                    out.insert(key.to_string(), msg.payload.clone());
                }
            }
            if pending == 0 {
                break;
            }
        }
        // The ordered consumer is ephemeral (memory, R1) and the server drops it after 30 s
        // of inactivity; nothing to clean up here.
        Ok(out)
    }
}

// ---- opening, replicas, status

impl KvStore {
    /// Binds (or with `create`, creates) the five buckets and waits until each has a leader.
    pub async fn open(client: async_nats::Client, opts: KvOptions) -> Result<Self> {
        let replicas = replicas_in_range(opts.replicas)?;
        if opts.op_timeout.is_zero() {
            return Err(StoreError::Invalid {
                field: "op_timeout",
                reason: "0 would fail every call; use a positive duration such as 2s".into(),
            });
        }
        let js = jetstream::ContextBuilder::new()
            .timeout(opts.op_timeout)
            .build(client.clone());
        let mut checked_size = false;
        let mut stores = Vec::with_capacity(BUCKETS.len());
        for bucket in BUCKETS {
            let stream_name = format!("KV_{bucket}");
            let what = format!("look up bucket {bucket}");
            let existing = bounded(opts.op_timeout, &what, async {
                match js.get_stream(&stream_name).await {
                    Ok(s) => Ok(Some(s)),
                    Err(err) => match err.kind() {
                        jetstream::context::GetStreamErrorKind::JetStream(e)
                            if js_code(&e) == jetstream::ErrorCode::STREAM_NOT_FOUND =>
                        {
                            Ok(None)
                        }
                        _ => Err(unavailable(&what, err)),
                    },
                }
            })
            .await?;
            if let Some(s) = &existing {
                let have = s.cached_info().config.num_replicas;
                if have != replicas {
                    tracing::warn!(
                        bucket,
                        have,
                        wanted = replicas,
                        "bucket exists with other replicas; bound as is (change with `unibus cluster replicas`)"
                    );
                }
            } else {
                if !opts.create {
                    return Err(StoreError::not_found(format!(
                        "bucket {bucket} (stream {stream_name}); open with create or run `unibus migrate`"
                    )));
                }
                if !checked_size {
                    check_cluster_size(&client, &js, replicas, opts.op_timeout).await?;
                    checked_size = true;
                }
                let what = format!("create bucket {bucket}");
                bounded(opts.op_timeout, &what, async {
                    js.create_key_value(kv::Config {
                        bucket: bucket.to_string(),
                        description: format!("unibus membership: {bucket}"),
                        history: 1,
                        num_replicas: replicas,
                        storage: stream::StorageType::File,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| {
                        StoreError::Backend(format!(
                            "{what} with {replicas} replicas: {e}; check `unibus cluster status`"
                        ))
                    })
                })
                .await?;
            }
            let what = format!("bind bucket {bucket}");
            let store = bounded(opts.op_timeout, &what, async {
                js.get_key_value(bucket)
                    .await
                    .map_err(|e| unavailable(&what, e))
            })
            .await?;
            stores.push(store);
        }
        let mut it = stores.into_iter();
        let (Some(users), Some(rooms), Some(members), Some(index), Some(keys)) =
            (it.next(), it.next(), it.next(), it.next(), it.next())
        else {
            return Err(StoreError::Backend("bucket list incomplete".into()));
        };
        let store = Self {
            client,
            js,
            op_timeout: opts.op_timeout,
            users: Arc::new(users),
            rooms: Arc::new(rooms),
            members: Arc::new(members),
            index: Arc::new(index),
            keys: Arc::new(keys),
            quorum: Arc::default(),
        };
        store.wait_for_leaders(opts.leader_timeout).await?;
        Ok(store)
    }

    /// The NATS connection this store uses.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The per-request bound.
    pub fn op_timeout(&self) -> Duration {
        self.op_timeout
    }

    /// The underlying KV handle of one of [`BUCKETS`] (for tooling and tests).
    pub fn bucket(&self, name: &str) -> Option<&kv::Store> {
        match name {
            "users" => Some(&self.users),
            "rooms" => Some(&self.rooms),
            "members" => Some(&self.members),
            "rooms_by_member" => Some(&self.index),
            "room_keys" => Some(&self.keys),
            _ => None,
        }
    }

    async fn wait_for_leaders(&self, limit: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let last = match self.bucket_status().await {
                Ok(status) if status.iter().all(|b| b.leader.is_some()) => return Ok(()),
                Ok(status) => format!("{status:?}"),
                Err(err) => err.to_string(),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(StoreError::Unavailable(format!(
                    "buckets have no leader after {limit:?} (last: {last}); check that a quorum of nodes is up"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Per bucket: replicas wanted, replicas current, leader.
    pub async fn bucket_status(&self) -> Result<Vec<BucketStatus>> {
        let mut out = Vec::with_capacity(BUCKETS.len());
        for bucket in BUCKETS {
            let stream_name = format!("KV_{bucket}");
            let what = format!("status of bucket {bucket}");
            let info = bounded(self.op_timeout, &what, async {
                self.js
                    .get_stream(&stream_name)
                    .await
                    .map(|s| s.cached_info().clone())
                    .map_err(|e| unavailable(&what, e))
            })
            .await?;
            let (current, leader) = match &info.cluster {
                Some(c) => {
                    let followers = c
                        .replicas
                        .iter()
                        .filter(|p| p.current && !p.offline)
                        .count();
                    let leader = c.leader.clone().filter(|l| !l.is_empty());
                    (usize::from(leader.is_some()) + followers, leader)
                }
                None => (1, Some(self.client.server_info().server_name)),
            };
            out.push(BucketStatus {
                bucket: bucket.to_string(),
                replicas_wanted: info.config.num_replicas,
                replicas_current: current,
                leader,
            });
        }
        Ok(out)
    }

    /// Changes every bucket's replicas live by editing its stream config
    /// (`update_stream`; never `update_key_value`), and the nonce ledger's
    /// ([`super::nonces`]) if it exists: every signed request claims a nonce there, so a
    /// ledger left at R1 would stop the control plane whenever its one node restarts.
    /// Safe to re-run. Does not wait: follow with [`KvStore::wait_replicas_current`].
    pub async fn set_replicas(&self, n: usize) -> Result<Vec<BucketStatus>> {
        let n = replicas_in_range(n)?;
        check_cluster_size(&self.client, &self.js, n, self.op_timeout).await?;
        for bucket in BUCKETS {
            self.set_stream_replicas(&format!("KV_{bucket}"), n, false)
                .await?;
        }
        self.set_stream_replicas(super::nonces::STREAM, n, true)
            .await?;
        self.bucket_status().await
    }

    /// Sets one stream's replicas; a missing stream is an error unless `optional`.
    async fn set_stream_replicas(&self, stream_name: &str, n: usize, optional: bool) -> Result<()> {
        let what = format!("set replicas of {stream_name} to {n}");
        bounded(self.op_timeout, &what, async {
            let s = match self.js.get_stream(stream_name).await {
                Ok(s) => s,
                Err(e)
                    if optional
                        && matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref j)
                            if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
                {
                    return Ok(());
                }
                Err(e) => return Err(unavailable(&what, e)),
            };
            let mut config = s.cached_info().config.clone();
            if config.num_replicas == n {
                return Ok(());
            }
            config.num_replicas = n;
            self.js
                .update_stream(config)
                .await
                .map(|_| ())
                .map_err(|e| StoreError::Backend(format!("{what}: {e}")))
        })
        .await
    }

    /// Polls until every bucket has a leader and all wanted replicas are current.
    pub async fn wait_replicas_current(&self, limit: Duration) -> Result<Vec<BucketStatus>> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let last = match self.bucket_status().await {
                Ok(status)
                    if status
                        .iter()
                        .all(|b| b.leader.is_some() && b.replicas_current >= b.replicas_wanted) =>
                {
                    return Ok(status);
                }
                Ok(status) => format!("{status:?}"),
                Err(err) => err.to_string(),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(StoreError::Unavailable(format!(
                    "replicas not current after {limit:?} (last: {last}); re-run to keep waiting"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Repairs what an interrupted two-bucket write leaves; see the module docs.
    ///
    /// Lists the index first, then members, then rooms, so a concurrent remove (index
    /// before members) is never mistaken for damage that would over-grant. An add writes
    /// member and index concurrently, so its index entry may be seen before its member:
    /// index entries younger than [`INDEX_GRACE_TIMEOUTS`] × `op_timeout` are left alone
    /// (they grant nothing meanwhile). Every repair re-reads the record it acts on from
    /// the leader.
    pub async fn reconcile(&self) -> Result<ReconcileReport> {
        self.reconcile_with_grace(self.op_timeout * INDEX_GRACE_TIMEOUTS)
            .await
    }

    /// [`Self::reconcile`] with another grace period for fresh index entries (tests use
    /// zero to repair an entry they have just planted).
    pub async fn reconcile_with_grace(&self, grace: Duration) -> Result<ReconcileReport> {
        let mut report = ReconcileReport::default();
        let index: BTreeSet<String> = self.keys(&self.index, ">").await?.into_iter().collect();
        let members = self.keys(&self.members, ">").await?;
        // Rooms as one scan sees them (a listing would show deleted rooms' markers too).
        // The scan may lag the leader: a room it shows is taken as there (a repair that
        // depends on its absence waits for the next pass), and a room it misses is read
        // from the leader before anything is removed for it.
        let rooms: BTreeSet<String> = self
            .consume_latest(&self.rooms)
            .await?
            .into_keys()
            .collect();
        let member_set: BTreeSet<(String, String)> = members
            .iter()
            .filter_map(|k| k.split_once('.'))
            .map(|(r, e)| (r.to_string(), e.to_string()))
            .collect();

        for key in &index {
            let Some((endpoint, room)) = key.split_once('.') else {
                continue;
            };
            let listed = member_set.contains(&(room.to_string(), endpoint.to_string()));
            if listed && rooms.contains(room) {
                continue;
            }
            let room_there = rooms.contains(room) || self.room_exists(room).await?;
            let still_member = self
                .get_raw(&self.members, &format!("{room}.{endpoint}"))
                .await?
                .is_some();
            if still_member && room_there {
                continue;
            }
            // Without its room the entry is stale whatever its age; without only its
            // member it may be an add whose member write is still in flight.
            if room_there && self.younger_than(&self.index, key, grace).await? {
                tracing::debug!(room, endpoint, "reconcile: fresh index entry left");
                continue;
            }
            self.purge(&self.index, key).await?;
            report.index_removed += 1;
            tracing::info!(
                room,
                endpoint,
                "reconcile: removed index entry without member"
            );
        }
        for (room, endpoint) in &member_set {
            let member_key = format!("{room}.{endpoint}");
            let index_key = format!("{endpoint}.{room}");
            if !rooms.contains(room) && !self.room_exists(room).await? {
                self.purge(&self.index, &index_key).await?;
                self.purge(&self.members, &member_key).await?;
                report.orphans_removed += 1;
                tracing::info!(
                    room,
                    endpoint,
                    "reconcile: removed member of a missing room"
                );
            } else if !index.contains(&index_key)
                && self.get_raw(&self.members, &member_key).await?.is_some()
            {
                self.write_index(room, endpoint).await?;
                report.index_added += 1;
                tracing::info!(room, endpoint, "reconcile: added missing index entry");
            }
        }
        for key in self.keys(&self.keys, ">").await? {
            let Some((room, _)) = key.split_once('.') else {
                continue;
            };
            if !rooms.contains(room) && !self.room_exists(room).await? {
                self.purge(&self.keys, &key).await?;
                report.orphans_removed += 1;
                tracing::info!(room, key, "reconcile: removed key of a missing room");
            }
        }
        Ok(report)
    }
}

/// How many `op_timeout`s an index entry without a member is left alone by the
/// reconciler: an add's member write (a compare-and-set, bounded by twice `op_timeout`
/// with its read-back) runs beside the index write and may land after it.
pub const INDEX_GRACE_TIMEOUTS: u32 = 4;

impl KvStore {
    /// Whether `key`'s current message was stored less than `grace` ago (by the stream
    /// leader's clock against ours: a skew only moves the repair earlier or later; the
    /// entry grants nothing either way). A key that is gone is not young.
    async fn younger_than(&self, kv: &kv::Store, key: &str, grace: Duration) -> Result<bool> {
        if grace.is_zero() {
            return Ok(false);
        }
        let subject = format!("{}{key}", kv.prefix);
        let Some(msg) = cas::last_message(&kv.stream, &subject, self.op_timeout).await? else {
            return Ok(false);
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        let age = now - msg.time.unix_timestamp_nanos();
        Ok(age < grace.as_nanos() as i128)
    }
}

/// Refuses `n` replicas when the servers cannot place them (see the module docs).
async fn check_cluster_size(
    client: &async_nats::Client,
    js: &jetstream::Context,
    n: usize,
    limit: Duration,
) -> Result<()> {
    if n == 1 {
        return Ok(());
    }
    let info = client.server_info();
    if info.cluster.is_none() {
        return Err(StoreError::Invalid {
            field: "replicas",
            reason: format!(
                "{n} replicas need a clustered JetStream, but server {} is standalone; use 1",
                info.server_name
            ),
        });
    }
    let inbox = client.new_inbox();
    let token = inbox.rsplit('.').next().unwrap_or("probe").to_string();
    let name = format!("UNIBUS_REPLICA_PROBE_{token}");
    let what = format!("check that the cluster can hold {n} replicas");
    let created = bounded(limit, &what, async {
        match js
            .create_stream(stream::Config {
                name: name.clone(),
                subjects: vec![format!("unibus.probe.{token}")],
                storage: stream::StorageType::Memory,
                num_replicas: n,
                max_messages: 1,
                ..Default::default()
            })
            .await
        {
            Ok(_) => Ok(true),
            Err(err) => match err.kind() {
                jetstream::context::CreateStreamErrorKind::JetStream(e) => {
                    tracing::info!(replicas = n, error = %e, "replica probe refused");
                    Ok(false)
                }
                _ => Err(unavailable(&what, err)),
            },
        }
    })
    .await?;
    if !created {
        return Err(StoreError::Invalid {
            field: "replicas",
            reason: format!(
                "{n} replicas exceed the cluster: fewer than {n} JetStream servers are available to hold a copy; lower replicas or add nodes"
            ),
        });
    }
    if let Err(err) = bounded(limit, "delete replica probe", async {
        js.delete_stream(&name)
            .await
            .map(|_| ())
            .map_err(|e| unavailable("delete replica probe", e))
    })
    .await
    {
        tracing::warn!(%err, stream = name, "could not delete the replica probe stream");
    }
    Ok(())
}

// ---- the store operations

impl KvStore {
    pub(crate) async fn add_user(&self, key: &str, name: &str, admin: bool) -> Result<User> {
        let user = User {
            key: ids::user_key("user", key)?,
            name: ids::name("name", name)?,
            admin,
            created_at: now_ms(),
            revoked_at: None,
            xkey: None,
        };
        if self.create(&self.users, &user.key, encode(&user)?).await? {
            Ok(user)
        } else {
            Err(StoreError::conflict(format!(
                "user {} already exists",
                user.key
            )))
        }
    }

    pub(crate) async fn get_user(&self, key: &str) -> Result<User> {
        let key = ids::user_key("user", key)?;
        match self.get_json::<User>(&self.users, &key).await? {
            Some((user, _)) => Ok(user),
            None => Err(StoreError::not_found(format!("user {key}"))),
        }
    }

    pub(crate) async fn list_users(&self) -> Result<Vec<User>> {
        let mut out = Vec::new();
        for key in self.keys(&self.users, ">").await? {
            if let Some((user, _)) = self.get_json::<User>(&self.users, &key).await? {
                out.push(user);
            }
        }
        Ok(out)
    }

    pub(crate) async fn set_user_xkey(&self, key: &str, xkey: &str) -> Result<User> {
        let key = ids::user_key("user", key)?;
        let xkey = ids::xkey("xkey", xkey)?;
        for _ in 0..5 {
            let Some((mut user, rev)) = self.get_json::<User>(&self.users, &key).await? else {
                return Err(StoreError::not_found(format!("user {key}")));
            };
            if user.xkey.as_deref() == Some(xkey.as_str()) {
                return Ok(user);
            }
            user.xkey = Some(xkey.clone());
            if self.update(&self.users, &key, encode(&user)?, rev).await? {
                return Ok(user);
            }
        }
        Err(StoreError::conflict(format!(
            "user {key} kept changing while setting its xkey"
        )))
    }

    pub(crate) async fn revoke_user(&self, key: &str) -> Result<User> {
        let key = ids::user_key("user", key)?;
        for _ in 0..5 {
            let Some((mut user, rev)) = self.get_json::<User>(&self.users, &key).await? else {
                return Err(StoreError::not_found(format!("user {key}")));
            };
            if user.revoked_at.is_some() {
                return Ok(user);
            }
            user.revoked_at = Some(now_ms());
            if self.update(&self.users, &key, encode(&user)?, rev).await? {
                return Ok(user);
            }
        }
        Err(StoreError::conflict(format!(
            "user {key} kept changing during revoke"
        )))
    }

    pub(crate) async fn is_authorized(&self, key: &str) -> bool {
        match bounded(self.op_timeout, "is_authorized", self.get_user(key)).await {
            Ok(user) => user.revoked_at.is_none(),
            Err(StoreError::NotFound { .. } | StoreError::Invalid { .. }) => false,
            Err(err) => {
                tracing::warn!(%err, "is_authorized: store error, denying (fail closed)");
                false
            }
        }
    }

    /// Ok once every bucket admission reads has committed a barrier since the caller
    /// arrived (or within the lease): its leaders still hold their quorum. See
    /// [`super::quorum`].
    pub(crate) async fn confirm_quorum(&self) -> Result<()> {
        self.quorum
            .confirm(|| async {
                let barrier =
                    |kv: Arc<kv::Store>| async move {
                        let nothing = Bytes::new();
                        self.put(&kv, quorum::BARRIER_KEY, nothing).await.map_err(|e| {
                        StoreError::Unavailable(format!(
                            "bucket {} cannot commit (no quorum reachable from this node): {e}",
                            kv.name
                        ))
                    })
                    };
                futures_util::future::try_join_all([
                    barrier(self.users.clone()),
                    barrier(self.index.clone()),
                    barrier(self.members.clone()),
                    barrier(self.rooms.clone()),
                ])
                .await
                .map(|_| ())
            })
            .await
    }

    pub(crate) async fn has_admin(&self) -> bool {
        let scan = async {
            for key in self.keys(&self.users, ">").await? {
                if let Some((user, _)) = self.get_json::<User>(&self.users, &key).await?
                    && user.admin
                    && user.revoked_at.is_none()
                {
                    return Ok(true);
                }
            }
            Ok(false)
        };
        match bounded(self.op_timeout, "has_admin", scan).await {
            Ok(found) => found,
            Err(err) => {
                tracing::warn!(%err, "has_admin: store error, answering false (fail closed)");
                false
            }
        }
    }

    pub(crate) async fn create_room(
        &self,
        id: &str,
        name: &str,
        owner: &str,
        encrypted: bool,
    ) -> Result<Room> {
        let room = Room::new(id, name, owner, encrypted)?;
        let reused = match self
            .create_noting_reuse(&self.rooms, &room.id, encode(&room)?)
            .await?
        {
            Created::Taken => {
                return Err(StoreError::conflict(format!(
                    "room {:?} already exists",
                    room.id
                )));
            }
            Created::Fresh => false,
            Created::Reused => true,
        };
        let owner = Member {
            room: room.id.clone(),
            endpoint: room.owner.clone(),
            role: Role::Owner,
            state: MemberState::Joined,
            added_by: room.owner.clone(),
            added_at: room.created_at,
        };
        let record = encode(&owner)?;
        // The id is ours now: write the owner's member record and index entry (together,
        // see `add_member` for why the index may go first). If the id was used before,
        // in the same round trip drop whatever a racing write may have left under it
        // (a member added while the old room was being deleted), so a new room never
        // inherits old members or keys; the cleanup spares the owner's own keys, which
        // the writes beside it replace anyway. A fresh id has nothing under it: members
        // and keys are written only after their room was read, and a deleted room leaves
        // its marker (see the module doc).
        let leftovers = async {
            if reused {
                self.purge_room_leftovers(&room.id, &owner.endpoint).await
            } else {
                Ok(())
            }
        };
        futures_util::future::try_join3(
            self.put(
                &self.members,
                &format!("{}.{}", owner.room, owner.endpoint),
                record,
            ),
            self.write_index(&owner.room, &owner.endpoint),
            leftovers,
        )
        .await?;
        Ok(room)
    }

    pub(crate) async fn get_room(&self, id: &str) -> Result<Room> {
        let id = ids::room_id(id)?;
        self.require_room(id).await
    }

    pub(crate) async fn list_rooms(&self) -> Result<Vec<Room>> {
        let mut out = Vec::new();
        for key in self.keys(&self.rooms, ">").await? {
            if let Some((room, _)) = self.get_json::<Room>(&self.rooms, &key).await? {
                out.push(room);
            }
        }
        Ok(out)
    }

    pub(crate) async fn delete_room(&self, id: &str) -> Result<()> {
        let id = ids::room_id(id)?;
        self.require_room(id).await?;
        self.purge_room_children(id).await?;
        // A marker, not a purge: whoever takes the id again must know it was used.
        self.mark_deleted(&self.rooms, id).await
    }

    /// Writes `member`, reading the room first unless the caller has just read it
    /// (`check_room` false: the service's owner check). That re-read never closed the race
    /// with a room delete anyway (the delete may land between it and the member write); a
    /// member of a deleted room is an orphan that grants nothing
    /// (`list_rooms_for_endpoint` requires the room), is removed by [`Self::reconcile`],
    /// and is purged by `create_room` if the id is taken again first.
    pub(crate) async fn add_member(&self, member: Member, check_room: bool) -> Result<Member> {
        if check_room {
            self.require_room(&member.room).await?;
        }
        let key = format!("{}.{}", member.room, member.endpoint);
        let record = encode(&member)?;
        // Authoritative record and index together, one round trip instead of two. The
        // index may so land first, briefly (or, if the member write fails, until the
        // reconciler's grace period passes) pointing at no member: it grants nothing,
        // since every reader (`list_rooms_for_endpoint`, hence admission) re-reads the
        // member record, and the reconciler leaves entries younger than its grace period
        // alone so it never removes one whose member write is still in flight. On a retry
        // after a crash the member exists: the index is (re)written anyway.
        let (created, _) = futures_util::future::try_join(
            self.create(&self.members, &key, record),
            self.write_index(&member.room, &member.endpoint),
        )
        .await?;
        if created {
            Ok(member)
        } else {
            Err(StoreError::conflict(format!(
                "{} is already a member of room {:?}",
                member.endpoint, member.room
            )))
        }
    }

    pub(crate) async fn join(&self, room: &str, endpoint: &str) -> Result<Member> {
        let room = ids::room_id(room)?;
        let endpoint = ids::user_key("endpoint", endpoint)?;
        self.require_room(room).await?;
        let key = format!("{room}.{endpoint}");
        for _ in 0..5 {
            let Some((mut member, rev)) = self.get_json::<Member>(&self.members, &key).await?
            else {
                return Err(StoreError::not_found(format!(
                    "membership of {endpoint} in room {room:?}"
                )));
            };
            if member.state == MemberState::Joined {
                return Ok(member);
            }
            member.state = MemberState::Joined;
            if self
                .update(&self.members, &key, encode(&member)?, rev)
                .await?
            {
                return Ok(member);
            }
        }
        Err(StoreError::conflict(format!(
            "membership of {endpoint} in room {room:?} kept changing during join"
        )))
    }

    pub(crate) async fn remove_member(&self, room: &str, endpoint: &str) -> Result<()> {
        let room = ids::room_id(room)?;
        let endpoint = ids::user_key("endpoint", endpoint)?;
        self.require_room(room).await?;
        let key = format!("{room}.{endpoint}");
        if self.get_raw(&self.members, &key).await?.is_none() {
            return Err(StoreError::not_found(format!(
                "membership of {endpoint} in room {room:?}"
            )));
        }
        // Index first, then the authoritative record: an interruption leaves a member
        // without an index entry (under-granting), which a retry or reconcile finishes.
        self.purge(&self.index, &format!("{endpoint}.{room}"))
            .await?;
        self.purge(&self.members, &key).await
    }

    pub(crate) async fn list_members(&self, room: &str) -> Result<Vec<Member>> {
        let room = ids::room_id(room)?;
        self.require_room(room).await?;
        let mut out = Vec::new();
        for key in self.keys(&self.members, &format!("{room}.>")).await? {
            if let Some((m, _)) = self.get_json::<Member>(&self.members, &key).await? {
                out.push(m);
            }
        }
        out.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
        Ok(out)
    }

    pub(crate) async fn list_rooms_for_endpoint(&self, endpoint: &str) -> Result<Vec<Member>> {
        let endpoint = ids::user_key("endpoint", endpoint)?;
        let keys = self.keys(&self.index, &format!("{endpoint}.>")).await?;
        // The index only points; the member record and the room decide. Two leader reads
        // per room, so rooms are checked side by side (bounded): one after the other, a
        // user in a thousand rooms took longer to admit than nats-server waits for the
        // callout.
        let rooms: Vec<String> = keys
            .iter()
            .filter_map(|key| key.split_once('.').map(|(_, room)| room.to_string()))
            .collect();
        let mut out: Vec<Member> = futures_util::stream::iter(rooms)
            .map(|room| self.live_member(room, &endpoint).boxed())
            .buffer_unordered(MEMBERSHIP_READS_IN_FLIGHT)
            .try_filter_map(|member| std::future::ready(Ok(member)))
            .try_collect()
            .await?;
        out.sort_by(|a, b| a.room.cmp(&b.room));
        Ok(out)
    }

    /// `endpoint`'s member record in `room`, if both it and the room exist (an index
    /// entry without them is stale and grants nothing).
    async fn live_member(&self, room: String, endpoint: &str) -> Result<Option<Member>> {
        let (member, exists) = futures_util::future::try_join(
            self.get_json::<Member>(&self.members, &format!("{room}.{endpoint}")),
            self.get_raw(&self.rooms, &room),
        )
        .await?;
        match (member, exists) {
            (Some((m, _)), Some(_)) => Ok(Some(m)),
            _ => {
                tracing::debug!(room, endpoint, "stale index entry ignored");
                Ok(None)
            }
        }
    }

    async fn epochs(&self, room: &str) -> Result<BTreeMap<u32, String>> {
        let mut out = BTreeMap::new();
        for key in self.keys(&self.keys, &format!("{room}.>")).await? {
            if let Some(epoch) = key
                .rsplit_once('.')
                .and_then(|(_, e)| e.parse::<u32>().ok())
            {
                out.insert(epoch, key);
            }
        }
        Ok(out)
    }

    async fn create_key(&self, key: RoomKey) -> Result<RoomKey> {
        let k = epoch_key(&key.room, key.epoch);
        if self.create(&self.keys, &k, encode(&key)?).await? {
            Ok(key)
        } else {
            Err(StoreError::conflict(format!(
                "room {:?} already has a key for epoch {}",
                key.room, key.epoch
            )))
        }
    }

    pub(crate) async fn put_room_key(
        &self,
        room: &str,
        epoch: u32,
        material: &[u8],
    ) -> Result<RoomKey> {
        let room = ids::room_id(room)?;
        let epoch = ids::epoch(epoch)?;
        self.require_room(room).await?;
        self.create_key(RoomKey {
            room: room.to_string(),
            epoch,
            material: material.to_vec(),
            created_at: now_ms(),
        })
        .await
    }

    pub(crate) async fn get_room_key(&self, room: &str, epoch: u32) -> Result<RoomKey> {
        let room = ids::room_id(room)?;
        let epoch = ids::epoch(epoch)?;
        self.require_room(room).await?;
        match self
            .get_json::<RoomKey>(&self.keys, &epoch_key(room, epoch))
            .await?
        {
            Some((k, _)) => Ok(k),
            None => Err(StoreError::not_found(format!(
                "epoch {epoch} of room {room:?}'s key"
            ))),
        }
    }

    pub(crate) async fn latest_room_key(&self, room: &str) -> Result<Option<RoomKey>> {
        let room = ids::room_id(room)?;
        self.require_room(room).await?;
        for key in self.epochs(room).await?.values().rev() {
            if let Some((k, _)) = self.get_json::<RoomKey>(&self.keys, key).await? {
                return Ok(Some(k));
            }
        }
        Ok(None)
    }

    pub(crate) async fn rekey(&self, room: &str, material: &[u8]) -> Result<RoomKey> {
        let room = ids::room_id(room)?;
        self.require_room(room).await?;
        for _ in 0..5 {
            let latest = self.epochs(room).await?.keys().next_back().copied();
            let epoch = latest
                .unwrap_or(0)
                .checked_add(1)
                .ok_or_else(|| StoreError::Invalid {
                    field: "epoch",
                    reason: format!("room {room:?} has reached the last epoch"),
                })?;
            match self
                .create_key(RoomKey {
                    room: room.to_string(),
                    epoch,
                    material: material.to_vec(),
                    created_at: now_ms(),
                })
                .await
            {
                Err(StoreError::Conflict { .. }) => continue,
                other => return other,
            }
        }
        Err(StoreError::conflict(format!(
            "room {room:?} was rekeyed concurrently"
        )))
    }

    pub(crate) async fn close(&self) -> Result<()> {
        bounded(self.op_timeout, "flush", async {
            self.client
                .flush()
                .await
                .map_err(|e| unavailable("flush", e))
        })
        .await
    }
}
