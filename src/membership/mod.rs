//! The membership store: users, rooms, members and room keys — the control plane that the
//! authenticator consults before it admits a NATS connection.
//!
//! # Shape
//!
//! [`Store`] is a plain enum over two backends, and every operation is an inherent `async
//! fn` that matches on it. Two backends do not need a trait object: an enum keeps the call
//! sites monomorphic, the set of backends visible in one place, and lets a backend expose
//! extra tools (the KV backend's [`jetstream::KvStore::reconcile`] and replica management)
//! without widening a shared interface.
//!
//! - [`sqlite::SqliteStore`]: the single-node default. One SQLite file (WAL, foreign keys on,
//!   schema migrated in code); cascades and uniqueness are SQL constraints, every operation
//!   is one transaction.
//! - [`jetstream::KvStore`]: five replicated JetStream KV buckets (`rooms`, `members`,
//!   `rooms_by_member`, `room_keys`, `users`) for a cluster. Replication and consensus are
//!   NATS's job; this module only decides key layout, write order and read path.
//!
//! Both backends run the same conformance suite (`tests/store_conformance.rs`) and return
//! the same [`StoreError`]s for the same inputs.
//!
//! # Validation
//!
//! Every identifier is checked in [`ids`] before it reaches SQL or NATS: a room id is a
//! subject token and a KV key token, so `.`, `*`, `>`, spaces, non-ASCII or over-long ids
//! are refused as [`StoreError::Invalid`] naming the field. User keys are nkey user public
//! keys, checksum-verified and normalised to upper case.
//!
//! # Two-bucket writes (KV backend)
//!
//! `members` is authoritative; `rooms_by_member` is a derived reverse index. The rule is
//! that the index never grants what `members` does not: every reader re-reads the member
//! record (and the room) an index entry points to, so the index only ever narrows a
//! lookup. Writes are ordered so that damage is rare and repairable:
//!
//! - adding a member writes `members` and the index concurrently (one round trip): the
//!   index entry may briefly exist before its member, which grants nothing (see below),
//!   and the reconciler leaves index entries younger than a grace period alone;
//! - removing a member deletes the index entry first, then `members`;
//! - deleting a room removes index entries, then members, then room keys, and the room
//!   record last, so an interrupted delete leaves a room that still exists and can be
//!   deleted again.
//!
//! A crash during an add or remove leaves a member without an index entry (the member
//! is missing from `list_rooms_for_endpoint`: under-granting), or an index entry without
//! a member (granting nothing).
//! Every write is idempotent on retry and [`jetstream::KvStore::reconcile`] repairs what is
//! left. On top of that, `list_rooms_for_endpoint` re-reads each `members` record the index
//! points to, so a stale index entry grants nothing.
//!
//! # Migration
//!
//! [`migrate`] copies a SQLite file into the KV buckets (`unibus migrate`): read-only on
//! the source, idempotent and resumable on the target, verified by counts and a digest.
//!
//! # Failing closed
//!
//! [`Store::is_authorized`] and [`Store::has_admin`] return `bool`, not `Result`: any error
//! — backend down, quorum lost, timeout, corrupt record — is logged and answered `false`.
//! The KV backend bounds every call by `op_timeout` and turns an expiry into
//! [`StoreError::Unavailable`].

pub mod api;
pub mod cas;
pub mod history;
pub mod ids;
pub mod jetstream;
pub mod migrate;
pub mod migrate_history;
pub mod nonces;
pub mod quorum;
mod read_cache;
pub mod recent;
pub mod service;
pub mod sqlite;
pub mod version;

use serde::{Deserialize, Serialize};
use std::time::{SystemTime, UNIX_EPOCH};

/// A user: an endpoint's identity, keyed by its nkey user public key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// nkey user public key (`U…`, 56 chars, upper case).
    pub key: String,
    /// Human-readable name.
    pub name: String,
    /// Admins manage users.
    pub admin: bool,
    /// Unix milliseconds.
    pub created_at: u64,
    /// Unix milliseconds; a revoked user is never authorized again.
    pub revoked_at: Option<u64>,
    /// The user's curve public key (`X…`) for end-to-end encrypted rooms, registered by the
    /// user itself (`users.xkey`); room keys are wrapped for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xkey: Option<String>,
}

/// A room: a subject namespace `unibus.room.<id>.>` shared by its members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Room {
    /// `^[a-z0-9][a-z0-9_-]{0,62}$`
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// User key of the owner.
    pub owner: String,
    /// Whether messages in the room are end-to-end encrypted with room keys.
    pub encrypted: bool,
    /// Unix milliseconds.
    pub created_at: u64,
}

/// A member's role in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Manages the room.
    Owner,
    /// Reads and writes the room.
    Member,
}

/// Whether a member has accepted the invitation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    /// Added, has not joined yet.
    Invited,
    /// Has joined.
    Joined,
}

impl Role {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Member => "member",
        }
    }
}

impl MemberState {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Invited => "invited",
            MemberState::Joined => "joined",
        }
    }
}

/// Membership of one endpoint in one room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Room id.
    pub room: String,
    /// User key of the member.
    pub endpoint: String,
    /// Owner or member.
    pub role: Role,
    /// Invited or joined.
    pub state: MemberState,
    /// User key of whoever added this member.
    pub added_by: String,
    /// Unix milliseconds.
    pub added_at: u64,
    /// KV store only: the creation time of the room this member was added to. A room
    /// id deleted and taken again is another room, created at another time, so a member
    /// written for the old room (an invite that raced the delete and landed after the new
    /// room's creation) is told apart and grants nothing ([`Member::belongs_to`]).
    /// Absent on SQLite, which compares the room inside the member's transaction instead,
    /// and in records written before the field existed or copied by `unibus migrate`
    /// (taken as current, as they always were). Nodes from before the field neither
    /// write nor check it (and an old node's `join` rewrites a record without it), so in
    /// a cluster the protection holds once every node runs a version that has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room_created_at: Option<u64>,
}

impl Room {
    /// A new room, created now; the ids are validated (they become subjects and KV keys).
    pub fn new(id: &str, name: &str, owner: &str, encrypted: bool) -> Result<Room> {
        Ok(Room {
            id: ids::room_id(id)?.to_string(),
            name: ids::name("name", name)?,
            owner: ids::user_key("owner", owner)?,
            encrypted,
            created_at: now_ms(),
        })
    }
}

impl Member {
    /// A new membership, added now; the ids are validated (they become KV keys).
    pub fn new(
        room: &str,
        endpoint: &str,
        role: Role,
        state: MemberState,
        added_by: &str,
    ) -> Result<Member> {
        Ok(Member {
            room: ids::room_id(room)?.to_string(),
            endpoint: ids::user_key("endpoint", endpoint)?,
            role,
            state,
            added_by: ids::user_key("added_by", added_by)?,
            added_at: now_ms(),
            room_created_at: None,
        })
    }

    /// Whether this member belongs to `room`, rather than to an earlier room under the
    /// same id (see [`Member::room_created_at`]) or to a create of the id that lost.
    /// Two rooms under one id could only be confused by creation time if the second were
    /// created in the very millisecond of the first, which two creators racing for one
    /// id can do: the loser's owner record, written beside its room before the id was
    /// known to be taken (`version::ONE_STAGE_CREATE`), would then match the winner's
    /// room. A creator's record is the only owner record its holder adds for itself, so
    /// such a record counts only if it names the room's owner.
    pub fn belongs_to(&self, room: &Room) -> bool {
        let a_creators = self.role == Role::Owner && self.added_by == self.endpoint;
        self.room_created_at
            .is_none_or(|created_at| created_at == room.created_at)
            && (!a_creators || self.endpoint == room.owner)
    }
}

/// One epoch of a room's key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomKey {
    /// Room id.
    pub room: String,
    /// Starts at 1; `rekey` creates latest + 1.
    pub epoch: u32,
    /// Opaque key material (base64 in JSON).
    #[serde(with = "b64")]
    pub material: Vec<u8>,
    /// Unix milliseconds.
    pub created_at: u64,
}

mod b64 {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

/// Every record of a store at one moment (what `unibus migrate` copies).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Users, by key.
    pub users: Vec<User>,
    /// Rooms, by id.
    pub rooms: Vec<Room>,
    /// Members, by (room, endpoint).
    pub members: Vec<Member>,
    /// Room keys, by (room, epoch).
    pub keys: Vec<RoomKey>,
}

/// The one error type of the store. `NotFound` is the storage-agnostic "no such record".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The record does not exist.
    #[error("{what} not found; check the id or key, or create it first")]
    NotFound {
        /// What was looked for, with its id.
        what: String,
    },
    /// The record already exists or changed underneath the caller.
    #[error("{what}; read the current record and retry if still needed")]
    Conflict {
        /// What collided.
        what: String,
    },
    /// An argument was refused before anything was written.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The argument's name.
        field: &'static str,
        /// What was wrong and what is accepted.
        reason: String,
    },
    /// The backend did not answer in time or is down (no quorum, connection closed).
    #[error("store unavailable: {0}; check that the NATS cluster has a quorum and retry")]
    Unavailable(String),
    /// Any other backend failure (I/O, corrupt record, unexpected server error).
    #[error("store backend error: {0}")]
    Backend(String),
}

impl StoreError {
    /// A short, stable name for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::NotFound { .. } => "not_found",
            StoreError::Conflict { .. } => "conflict",
            StoreError::Invalid { .. } => "invalid",
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Backend(_) => "backend",
        }
    }

    pub(crate) fn not_found(what: impl Into<String>) -> Self {
        StoreError::NotFound { what: what.into() }
    }

    pub(crate) fn conflict(what: impl Into<String>) -> Self {
        StoreError::Conflict { what: what.into() }
    }

    /// The room a caller read is gone: deleted, and its id taken by a new room since.
    pub(crate) fn room_taken_again(id: &str) -> Self {
        StoreError::not_found(format!(
            "room {id:?} (deleted and created again since it was read)"
        ))
    }
}

/// Result alias for the store.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Unix milliseconds now (0 if the clock is before 1970).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The membership store; see the module docs.
// A `KvStore` is a few hundred bytes (client and JetStream context handles); a store is
// built once per node and shared by reference, so boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Store {
    /// Single-node SQLite file.
    Sqlite(sqlite::SqliteStore),
    /// Replicated JetStream KV buckets.
    JetStream(jetstream::KvStore),
}

/// Calls the backend's method of the same name, timing it for `/metrics`.
macro_rules! dispatch {
    ($self:ident . $method:ident ( $($arg:expr),* )) => {{
        let started = std::time::Instant::now();
        // The KV futures are large (async-nats request state); boxed, they no longer
        // make every caller's future as large, which callers moved (memcpy) on each
        // spawn and poll: most of a SQLite read's CPU before this.
        let result = match $self {
            Store::Sqlite(s) => s.$method($($arg),*).await,
            Store::JetStream(s) => Box::pin(s.$method($($arg),*)).await,
        };
        crate::metrics::get().store_op(
            stringify!($method),
            started.elapsed(),
            Observe::error_kind(&result),
        );
        result
    }};
}

/// What a store result says for metrics: the error kind, if any. Works for the
/// fail-closed `bool` checks too (they have no error to report).
trait Observe {
    fn error_kind(&self) -> Option<&'static str>;
}

impl<T> Observe for Result<T> {
    fn error_kind(&self) -> Option<&'static str> {
        self.as_ref().err().map(StoreError::kind)
    }
}

impl Observe for bool {
    fn error_kind(&self) -> Option<&'static str> {
        None
    }
}

impl Store {
    /// `"sqlite"` or `"jetstream"`, for status pages and logs.
    pub fn backend(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "sqlite",
            Store::JetStream(_) => "jetstream",
        }
    }

    /// The cluster's finalized version as last read (see [`version`]). A single SQLite
    /// node is the whole cluster, always at its own version.
    pub fn cluster_version(&self) -> u32 {
        match self {
            Store::Sqlite(_) => version::PROTOCOL,
            Store::JetStream(kv) => kv.cluster_version(),
        }
    }

    /// True once every node is known to run code of `version` or later.
    pub fn finalized_at(&self, version: u32) -> bool {
        self.cluster_version() >= version
    }

    /// Reads the finalized version again (KV; a no-op on SQLite).
    pub async fn refresh_cluster_version(&self) -> Result<u32> {
        match self {
            Store::Sqlite(_) => Ok(version::PROTOCOL),
            Store::JetStream(kv) => kv.refresh_cluster_version().await,
        }
    }

    // ---- users

    /// Adds a user; `Conflict` if the key exists (revoked or not).
    pub async fn add_user(&self, key: &str, name: &str, admin: bool) -> Result<User> {
        dispatch!(self.add_user(key, name, admin))
    }

    /// Reads a user by key (any case).
    pub async fn get_user(&self, key: &str) -> Result<User> {
        dispatch!(self.get_user(key))
    }

    /// All users, ordered by key.
    pub async fn list_users(&self) -> Result<Vec<User>> {
        dispatch!(self.list_users())
    }

    /// A page of users, ordered by key: up to `limit` after `after` (all of them from the
    /// start without it). The KV store reads only the page's records, not the listing's.
    pub async fn list_users_after(&self, after: Option<&str>, limit: usize) -> Result<Vec<User>> {
        dispatch!(self.list_users_after(after, limit))
    }

    /// Marks a user revoked (idempotent: the first revocation time is kept).
    pub async fn revoke_user(&self, key: &str) -> Result<User> {
        dispatch!(self.revoke_user(key))
    }

    /// Sets (or replaces) a user's xkey; `NotFound` if the user does not exist.
    pub async fn set_user_xkey(&self, key: &str, xkey: &str) -> Result<User> {
        dispatch!(self.set_user_xkey(key, xkey))
    }

    /// True only if the user exists and is not revoked. Fails closed: any error is `false`.
    /// Ok when this node can vouch that the store's leaders still hold their quorum
    /// (always, for SQLite): admission calls it before reading. See [`quorum`].
    pub async fn confirm_quorum(&self) -> Result<()> {
        dispatch!(self.confirm_quorum())
    }

    pub async fn is_authorized(&self, key: &str) -> bool {
        dispatch!(self.is_authorized(key))
    }

    /// True only if a non-revoked admin exists. Fails closed: any error is `false`.
    pub async fn has_admin(&self) -> bool {
        dispatch!(self.has_admin())
    }

    // ---- rooms

    /// Creates a room and adds `owner` as a joined owner.
    pub async fn create_room(
        &self,
        id: &str,
        name: &str,
        owner: &str,
        encrypted: bool,
    ) -> Result<Room> {
        dispatch!(self.create_room(id, name, owner, encrypted))
    }

    /// Reads a room.
    pub async fn get_room(&self, id: &str) -> Result<Room> {
        dispatch!(self.get_room(id))
    }

    /// All rooms, ordered by id.
    pub async fn list_rooms(&self) -> Result<Vec<Room>> {
        dispatch!(self.list_rooms())
    }

    /// A page of rooms, ordered by id, as [`Store::list_users_after`] pages users.
    pub async fn list_rooms_after(&self, after: Option<&str>, limit: usize) -> Result<Vec<Room>> {
        dispatch!(self.list_rooms_after(after, limit))
    }

    /// Deletes a room with its members, index entries and keys.
    pub async fn delete_room(&self, id: &str) -> Result<()> {
        dispatch!(self.delete_room(id))
    }

    // ---- members

    /// Adds a member to an existing room; `Conflict` if already a member.
    pub async fn add_member(
        &self,
        room: &str,
        endpoint: &str,
        role: Role,
        state: MemberState,
        added_by: &str,
    ) -> Result<Member> {
        let member = Member::new(room, endpoint, role, state, added_by)?;
        dispatch!(self.add_member(member, None))
    }

    /// [`Store::add_member`] for a caller that has just read the room itself, as
    /// `checked` (the service's owner check). The member lands in that room only, never in
    /// a room created under the same id after a delete that raced the caller:
    /// - the KV backend skips its own re-read of the room (a round trip) and ties the
    ///   member to the room's creation time; readers ignore a member of another room (see
    ///   `KvStore::add_member`);
    /// - SQLite compares the room with `checked` inside its transaction.
    pub async fn add_member_to_checked_room(
        &self,
        checked: &Room,
        endpoint: &str,
        role: Role,
        state: MemberState,
        added_by: &str,
    ) -> Result<Member> {
        let member = Member::new(&checked.id, endpoint, role, state, added_by)?;
        dispatch!(self.add_member(member, Some(checked)))
    }

    /// Marks an invited member joined (idempotent for a joined member).
    pub async fn join(&self, room: &str, endpoint: &str) -> Result<Member> {
        dispatch!(self.join(room, endpoint))
    }

    /// Removes a member.
    pub async fn remove_member(&self, room: &str, endpoint: &str) -> Result<()> {
        dispatch!(self.remove_member(room, endpoint))
    }

    /// Members of a room ordered by endpoint; `NotFound` if the room does not exist.
    pub async fn list_members(&self, room: &str) -> Result<Vec<Member>> {
        dispatch!(self.list_members(room))
    }

    /// The memberships of one endpoint, ordered by room id (empty if none).
    pub async fn list_rooms_for_endpoint(&self, endpoint: &str) -> Result<Vec<Member>> {
        dispatch!(self.list_rooms_for_endpoint(endpoint))
    }

    // ---- room keys

    /// Stores a key for an explicit epoch (≥ 1); `Conflict` if that epoch exists.
    pub async fn put_room_key(&self, room: &str, epoch: u32, material: &[u8]) -> Result<RoomKey> {
        dispatch!(self.put_room_key(room, epoch, material))
    }

    /// Reads one epoch of a room's key.
    pub async fn get_room_key(&self, room: &str, epoch: u32) -> Result<RoomKey> {
        dispatch!(self.get_room_key(room, epoch))
    }

    /// The highest epoch of a room's key; `None` if the room has no key yet, `NotFound` if
    /// the room does not exist.
    pub async fn latest_room_key(&self, room: &str) -> Result<Option<RoomKey>> {
        dispatch!(self.latest_room_key(room))
    }

    /// Stores `material` as epoch latest + 1 (1 for the first key) and returns it.
    pub async fn rekey(&self, room: &str, material: &[u8]) -> Result<RoomKey> {
        dispatch!(self.rekey(room, material))
    }

    /// Flushes and releases the backend.
    pub async fn close(&self) -> Result<()> {
        dispatch!(self.close())
    }
}
