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
//! reconciler takes live rooms from a scan (where markers drop out) and re-reads a room
//! from the leader before it removes anything because the room is missing. Reads ignore
//! `DEL`/`PURGE` markers everywhere (other KV clients write them too).
//!
//! A write that read the room before (an invite: owner check, then member write) can
//! still land after the room's delete and after a new room's creation under the same id,
//! past that cleanup. So a member record carries the creation time of the room it was
//! checked against (`Member::room_created_at`), and every reader of members compares it
//! with the room's: a member of an earlier room under the id grants nothing, an invite to
//! the new room replaces it, and a listing of the new room's members removes it (only it,
//! through its sequence: `KvStore::purge_through`), as does the new room's delete.
//!
//! Once the cluster is finalized at `version::ONE_STAGE_CREATE`, `create_room` writes the
//! room, its owner's member record and index entry at once, before it knows the id is
//! free; a create that loses takes its record and entry back through their own sequences,
//! and until then its owner record grants nothing, since a creator's owner record counts
//! only for the room's owner (`Member::belongs_to`). See `KvStore::create_room_in_one_stage`.
//!
//! # Two-bucket writes
//!
//! See the [module docs](super): `members` and index together on add, index first on
//! remove, the room record last on room delete (replaced by its marker); [`KvStore::reconcile`] repairs interrupted
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

mod cluster;
mod ops;
mod primitives;
mod reconcile;
mod scan;

pub use reconcile::INDEX_GRACE_TIMEOUTS;

/// How many leader reads one listing keeps in flight (`list_users`, `list_rooms`,
/// `list_members`; rooms' checks in `list_rooms_for_endpoint`, two reads each).
const READS_IN_FLIGHT: usize = 32;

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
    /// Shared by clones: the cluster's finalized version as last read (see
    /// [`super::version`]).
    finalized: super::version::Finalized,
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
