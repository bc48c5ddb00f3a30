//! The membership service: the control-plane API as a NATS micro service.
//!
//! One endpoint per store operation under `unibus.ctl.` (see [`super::api`]), and for each
//! write two more, the caller's own subject at any node and at this one, all in one micro
//! service named `unibus-membership`, so `$SRV.PING/INFO/STATS` work with any NATS tool.
//! Every node runs it in the same queue group; a request goes to one of them (or, on a
//! node's own subject, to that node).
//!
//! A request passes three gates, in order, each with its own typed error:
//! 1. **authentication** — the signed envelope (`auth::envelope`): size, JSON shape,
//!    signature over op, body digest, timestamp and nonce, clock skew, replay. `bus-auth`
//!    decides what a failure does: `enforce` refuses (`unauthenticated`), `soft` logs and
//!    counts the would-be denial and goes on with the claimed key, `off` skips the checks.
//!    Reads may instead be connection-bound (unsigned, answered only to the caller's own
//!    `_INBOX.<key>`), and writes may come on the caller's own subject
//!    (`unibus.ctl.<op>.<key>`; see `auth::envelope`'s module doc);
//! 2. **identity** — the signer must be an active (not revoked) user in the store (on KV,
//!    as read within the last second: [`super::recent`]);
//! 3. **rules** — admins manage users; any admitted user creates rooms and owns them;
//!    owners invite, remove and rekey; members read their room, its members and keys, open
//!    feeds of its messages (`rooms.subscribe`, see [`super::history`]), and may leave.
//!
//! Gate 1's replay check is cluster-wide with the KV store: besides this node's cache, each
//! nonce is claimed once in the shared ledger ([`super::nonces`]), so the same bytes sent
//! through another node are a replay too. A write on the caller's own subject skips that
//! claim under `bus-auth=enforce`: the server lets nobody but the key's own connections
//! publish there, and the key's holder gains nothing by replaying what it could sign anew.
//! The claim is a replicated write, the dearest part of gate 1. Once the cluster is
//! finalized at [`super::version::OWN_SUBJECT_UNSIGNED`] (no node left that grants anyone
//! else an own subject), such a write skips the signature check too
//! ([`envelope::accept_on_own_subject`]), the other costly part.
//!
//! Only then does the store see the request for writing. `members.invite`'s two reads
//! start beside gate 1's nonce claim and gate 2's lookup, to save a round trip, but their
//! results are judged only after both gates have passed. On KV, the room for its owner
//! check is the one created or read through this node within the last second, if the
//! caller owns it ([`super::recent`]): creating a room and inviting its members then
//! reads nothing. Ids are validated by the store itself before they reach SQL or KV, and
//! come back as `invalid`.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::service::ServiceExt;
use base64::Engine;
use futures_util::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

use super::api::*;
use super::history::History;
use super::nonces::NonceLedger;
use super::recent::{Callers, Rooms};
use super::{MemberState, Role, Store, StoreError, version};
use crate::auth::envelope::{self, ReplayCache};
use crate::config::BusAuth;
use crate::node::shutdown::Shutdown;

/// What the service enforces; from the node's config.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    pub bus_auth: BusAuth,
    /// Largest clock difference accepted between a request's timestamp and this node.
    pub skew: Duration,
    /// Largest request accepted, envelope included.
    pub max_body: usize,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            bus_auth: BusAuth::Enforce,
            skew: Duration::from_secs(30),
            max_body: 64 * 1024,
        }
    }
}

/// Nonces remembered for replay detection (bounded memory; see `ReplayCache`).
const REPLAY_CACHE_ENTRIES: usize = 100_000;

/// Called after a change that takes rights away (member removed, room deleted, user
/// revoked) with the user keys whose live connections must lose them.
pub type OnRevoke = Arc<dyn Fn(Vec<String>) + Send + Sync>;

/// The handler side of the service, independent of NATS (so it is testable on its own).
pub struct Handler {
    store: Arc<Store>,
    config: ServiceConfig,
    replay: ReplayCache,
    /// Cluster-wide replay record (KV store only: a SQLite node is alone).
    ledger: Option<NonceLedger>,
    /// Users read lately (KV store only: SQLite keeps its users exactly).
    callers: Option<Callers>,
    /// Rooms created or read lately, for `members.invite`'s owner check (KV store only).
    rooms: Option<Rooms>,
    on_revoke: Option<OnRevoke>,
    history: Option<History>,
}

/// What gate 1 found: the claimed key, the body, the nonce to claim cluster-wide (if
/// any) and whether the request was a minimal read (`envelope::Envelope::minimal`).
struct Authenticated {
    key: String,
    body: Box<RawValue>,
    nonce: Option<String>,
    minimal: bool,
}

/// Who is asking, after authentication and the identity check.
struct Caller {
    key: String,
    admin: bool,
}

impl Handler {
    pub fn new(store: Arc<Store>, config: ServiceConfig, on_revoke: Option<OnRevoke>) -> Self {
        let replay = ReplayCache::new(REPLAY_CACHE_ENTRIES);
        let ledger = match &*store {
            Store::JetStream(kv) if config.bus_auth != BusAuth::Off => Some(NonceLedger::new(
                kv.jetstream().clone(),
                config.skew,
                kv.op_timeout(),
            )),
            _ => None,
        };
        let kv = matches!(&*store, Store::JetStream(_));
        let (callers, rooms) = (kv.then(Callers::default), kv.then(Rooms::default));
        Handler {
            store,
            config,
            replay,
            ledger,
            callers,
            rooms,
            on_revoke,
            history: None,
        }
    }

    /// Serves room feeds (`rooms.subscribe`) and purges a deleted room's history from the
    /// `ROOMS` stream. Without it, `rooms.subscribe` is `unavailable`.
    pub fn with_history(mut self, history: History) -> Self {
        self.history = Some(history);
        self
    }

    fn history(&self) -> Result<&History, CtlError> {
        self.history.as_ref().ok_or_else(|| {
            CtlError::new(
                ErrorKind::Unavailable,
                "room history is not served by this node",
            )
        })
    }

    /// Handles one raw request for `op`: the reply body, for an error its kind, and the
    /// users whose live connections must lose rights. The caller revokes (through
    /// [`Handler::revoke`]) only after the reply is out: the caller itself may be among
    /// them (a deleted room's owner, a member who leaves), and a kick that overtook the
    /// reply would leave it without an answer.
    ///
    /// `own_key` is the key whose own subject (`unibus.ctl.<op>.<key>`) the request came
    /// on, `None` for the public subject.
    pub async fn handle(
        &self,
        op: Op,
        raw: &[u8],
        reply: Option<&str>,
        own_key: Option<&str>,
    ) -> (Vec<u8>, Option<ErrorKind>, Vec<String>, bool) {
        let (mut revoke, mut full_read) = (Vec::new(), false);
        let processed = self
            .process(op, raw, reply, own_key, &mut revoke, &mut full_read)
            .await;
        // A read sent in full to a node of a cluster where every node takes minimal ones:
        // the reply says so.
        let hint = full_read && self.store.finalized_at(version::MINIMAL_READS);
        match processed {
            Ok(encoded) => (encoded, None, revoke, hint),
            Err(e) => {
                tracing::debug!(
                    op = op.name(),
                    kind = e.kind.as_str(),
                    "control-plane request refused: {}",
                    e.message
                );
                let kind = e.kind;
                (json(&Reply::<()>::Error(e)), Some(kind), revoke, hint)
            }
        }
    }

    async fn process(
        &self,
        op: Op,
        raw: &[u8],
        reply: Option<&str>,
        own_key: Option<&str>,
        revoke: &mut Vec<String>,
        full_read: &mut bool,
    ) -> Result<Vec<u8>, CtlError> {
        let Authenticated {
            key: claimed_key,
            body,
            nonce,
            minimal,
        } = self.authenticate(op, raw, reply, own_key)?;
        *full_read = op.is_read() && !minimal;
        // A request that commits nothing to the store (a read, or `rooms.subscribe`, which
        // only opens a feed) and claims no nonce either would not notice a store leader that
        // lost its quorum and answers from a stale copy: a barrier does
        // (`membership::quorum`; free on SQLite, shared across requests on KV).
        let commits_nothing = op.is_read() || op == Op::RoomsSubscribe;
        let needs_barrier = commits_nothing && (nonce.is_none() || self.ledger.is_none());
        let quorum = async {
            if needs_barrier {
                self.store.confirm_quorum().await
            } else {
                Ok(())
            }
        };
        // The cluster-wide nonce claim (a replicated write) and the signer's lookup (a
        // leader read) are independent: run them together, then judge them in order, so
        // nothing is dispatched unless both passed and a replay is still reported first.
        let claim = async {
            match (&self.ledger, nonce) {
                (Some(ledger), Some(nonce)) => {
                    Some(Box::pin(ledger.claim(&claimed_key, &nonce)).await)
                }
                _ => None,
            }
        };
        // The reads `members.invite` needs (the room, for the owner check, and the invitee)
        // would otherwise make a stage of their own after these: start them beside the
        // gates instead. Their results are looked at only in `dispatch`, once both gates
        // have passed, and nothing is written before then; what a refused request costs is
        // two reads, next to the claim and lookup it already costs.
        let prefetch = async {
            match op {
                Op::MembersInvite => Box::pin(self.prefetch_invite(&body, &claimed_key)).await,
                _ => Prefetched::Nothing,
            }
        };
        let (claim, caller, quorum, prefetched) =
            tokio::join!(claim, self.identify(&claimed_key), quorum, prefetch);
        if let Some(claim) = claim {
            let soft = self.config.bus_auth == BusAuth::Soft;
            match claim {
                Ok(true) => {}
                Ok(false) if soft => tracing::warn!(
                    op = op.name(),
                    "bus-auth soft: would deny: {}",
                    envelope::EnvelopeError::Replayed
                ),
                Ok(false) => return Err(envelope_error(envelope::EnvelopeError::Replayed)),
                Err(e) if soft => {
                    tracing::warn!(op = op.name(), "bus-auth soft: would deny: {e}")
                }
                Err(e) => return Err(e.into()),
            }
        }
        quorum?;
        self.dispatch(op, &caller?, &body, prefetched, revoke).await
    }

    /// `members.invite`'s reads, for [`Handler::process`] to start beside the gates.
    async fn prefetch_invite(&self, body: &RawValue, inviter: &str) -> Prefetched {
        // A body that does not parse is refused in `dispatch`, with its message.
        let Ok(req) = parse::<MemberRef>(body) else {
            return Prefetched::Nothing;
        };
        let (room, invitee) = tokio::join!(
            self.room_to_invite_into(&req.room, inviter),
            self.active(&req.key)
        );
        Prefetched::Invite { room, invitee }
    }

    /// Whether a write on its signer's own subject is taken without its signature: under
    /// `enforce`, once the cluster is finalized at [`version::OWN_SUBJECT_UNSIGNED`].
    pub fn takes_unsigned_own_writes(&self) -> bool {
        self.config.bus_auth == BusAuth::Enforce
            && self.store.finalized_at(version::OWN_SUBJECT_UNSIGNED)
    }

    /// Gate 1: the envelope. Returns the signer's key, the operation's body and, when the
    /// signature verified, the nonce (for the cluster-wide replay check). A read may come
    /// connection-bound instead of signed (`envelope::verify_read`), and under `enforce` a
    /// write on its signer's own subject (`envelope::verify_on_own_subject`): then there is
    /// no nonce to claim.
    fn authenticate(
        &self,
        op: Op,
        raw: &[u8],
        reply: Option<&str>,
        own_key: Option<&str>,
    ) -> Result<Authenticated, CtlError> {
        let limits = envelope::Limits {
            max_body: self.config.max_body,
            skew: self.config.skew,
        };
        let (key, body, nonce, minimal) = if self.config.bus_auth == BusAuth::Off {
            let (key, body, minimal) = claimed(raw, op, reply, &limits)?;
            (key, body, None, minimal)
        } else {
            let now = envelope::unix_ms_now();
            let verified = match own_key {
                // The server vouches for who published on an own subject, and once the
                // cluster is finalized no node grants anyone else's (`version`).
                Some(subject_key) if self.takes_unsigned_own_writes() => {
                    envelope::accept_on_own_subject(
                        raw,
                        op.name(),
                        subject_key,
                        now,
                        &self.replay,
                        &limits,
                    )
                    .map(|v| envelope::Verified { nonce: None, ..v })
                }
                Some(subject_key) => envelope::verify_on_own_subject(
                    raw,
                    op.name(),
                    subject_key,
                    now,
                    &self.replay,
                    &limits,
                )
                .map(|v| envelope::Verified {
                    // Only where the server enforces who publishes there does the subject
                    // stand in for the ledger; `soft` grants everyone everything.
                    nonce: v.nonce.filter(|_| self.config.bus_auth != BusAuth::Enforce),
                    ..v
                }),
                None if op.is_read() => {
                    envelope::verify_read(raw, op.name(), reply, now, &self.replay, &limits)
                }
                None => envelope::verify(raw, op.name(), now, &self.replay, &limits),
            };
            match verified {
                Ok(v) => (v.key, v.body, v.nonce, v.minimal),
                Err(e)
                    if self.config.bus_auth == BusAuth::Soft && e.code() == "unauthenticated" =>
                {
                    // An unsigned write on its own subject is what clients of a finalized
                    // cluster send, and what an enforce node would take: no alarm.
                    let enforce_takes_it = own_key.is_some()
                        && matches!(e, envelope::EnvelopeError::Unsigned)
                        && self.store.finalized_at(version::OWN_SUBJECT_UNSIGNED);
                    if !enforce_takes_it {
                        tracing::warn!(op = op.name(), "bus-auth soft: would deny: {e}");
                    }
                    let (key, body, minimal) = claimed(raw, op, reply, &limits)?;
                    (key, body, None, minimal)
                }
                Err(e) => return Err(envelope_error(e)),
            }
        };
        Ok(Authenticated {
            key,
            body,
            nonce,
            minimal,
        })
    }

    /// Gate 2: the signer is an active user.
    async fn identify(&self, key: &str) -> Result<Caller, CtlError> {
        match self.active(key).await {
            Ok(Active::Yes { admin }) => Ok(Caller {
                key: key.to_string(),
                admin,
            }),
            Ok(Active::Revoked) => Err(CtlError::new(
                ErrorKind::Unauthenticated,
                format!("{key} is revoked"),
            )),
            Err(StoreError::NotFound { .. }) | Err(StoreError::Invalid { .. }) => {
                Err(CtlError::new(
                    ErrorKind::Unauthenticated,
                    format!("{key} is not a known user"),
                ))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The room `members.invite` checks `inviter` owns: from [`Rooms`] when created or
    /// read through this node within its window *and* owned by `inviter`, otherwise from
    /// the store (and then remembered). A copy only ever lets the owner check pass: one
    /// naming another owner may be of a room deleted since, and the id's new owner must
    /// not be refused on its account.
    async fn room_to_invite_into(
        &self,
        id: &str,
        inviter: &str,
    ) -> Result<super::Room, StoreError> {
        let cached = self.rooms.as_ref().and_then(|r| r.get(id));
        if let Some(room) = cached.filter(|room| room.owner == inviter) {
            return Ok(room);
        }
        let read_at = std::time::Instant::now();
        let room = self.store.get_room(id).await?;
        // Keyed by the id asked for, which the store has just validated; a record whose
        // id differs from its key (hand-edited, corrupt) is not remembered.
        if let Some(rooms) = self.rooms.as_ref().filter(|_| room.id == id) {
            rooms.remember(id, room.clone(), read_at);
        }
        Ok(room)
    }

    /// Whether `key` is an active user: from [`Callers`] when read within its window,
    /// otherwise from the store (and then remembered).
    async fn active(&self, key: &str) -> Result<Active, StoreError> {
        if let Some(admin) = self.callers.as_ref().and_then(|c| c.get(key)) {
            return Ok(Active::Yes { admin });
        }
        let read_at = std::time::Instant::now();
        let user = self.store.get_user(key).await?;
        if user.revoked_at.is_some() {
            return Ok(Active::Revoked);
        }
        if let Some(callers) = &self.callers {
            callers.remember(&user.key, user.admin, read_at);
        }
        Ok(Active::Yes { admin: user.admin })
    }

    /// Gate 3 and the store call.
    async fn dispatch(
        &self,
        op: Op,
        caller: &Caller,
        body: &RawValue,
        prefetched: Prefetched,
        revoke: &mut Vec<String>,
    ) -> Result<Vec<u8>, CtlError> {
        let store = &self.store;
        match op {
            Op::UsersAdd => {
                let req: AddUser = parse(body)?;
                require_admin(caller)?;
                // A name is optional on the wire; the store keeps one, so default it.
                let name = if req.name.is_empty() {
                    "user"
                } else {
                    &req.name
                };
                ok(store.add_user(&req.key, name, req.admin).await?)
            }
            Op::UsersGet => {
                let req: UserRef = parse(body)?;
                if !caller.admin && !req.key.eq_ignore_ascii_case(&caller.key) {
                    return Err(CtlError::forbidden("only admins read other users"));
                }
                ok(store.get_user(&req.key).await?)
            }
            Op::UsersList => {
                let req: ListUsers = parse(body)?;
                require_admin(caller)?;
                let users = match page_limit(req.limit)? {
                    Some(limit) => store.list_users_after(req.after.as_deref(), limit).await?,
                    None => store.list_users().await?,
                };
                ok(page(users, |u| &u.key, req.after, req.limit)?)
            }
            Op::UsersRevoke => {
                let req: UserRef = parse(body)?;
                require_admin(caller)?;
                let user = store.revoke_user(&req.key).await?;
                if let Some(callers) = &self.callers {
                    callers.forget(&user.key);
                }
                if let Some(history) = &self.history {
                    self.closed(Box::pin(history.close_feeds_of(&user.key)).await);
                }
                revoke.push(user.key.clone());
                ok(user)
            }
            Op::RoomsCreate => {
                let req: CreateRoom = parse(body)?;
                let name = if req.name.is_empty() {
                    &req.room
                } else {
                    &req.name
                };
                let started = std::time::Instant::now();
                let room = store
                    .create_room(&req.room, name, &caller.key, req.encrypted)
                    .await?;
                if let Some(rooms) = &self.rooms {
                    rooms.remember(&room.id, room.clone(), started);
                }
                ok(room)
            }
            Op::RoomsGet => {
                let req: RoomRef = parse(body)?;
                self.require_member(caller, &req.room, false).await?;
                ok(store.get_room(&req.room).await?)
            }
            Op::RoomsList => {
                let req: ForUser = parse(body)?;
                let rooms = match req.key {
                    None if caller.admin => match page_limit(req.limit)? {
                        Some(limit) => store.list_rooms_after(req.after.as_deref(), limit).await?,
                        None => store.list_rooms().await?,
                    },
                    key => {
                        let key = self.self_or_admin(caller, key)?;
                        let mut rooms = Vec::new();
                        for m in store.list_rooms_for_endpoint(&key).await? {
                            match store.get_room(&m.room).await {
                                Ok(r) => rooms.push(r),
                                Err(StoreError::NotFound { .. }) => {} // deleted meanwhile
                                Err(e) => return Err(e.into()),
                            }
                        }
                        rooms
                    }
                };
                ok(page(rooms, |r| &r.id, req.after, req.limit)?)
            }
            Op::RoomsDelete => {
                let req: RoomRef = parse(body)?;
                self.require_owner(caller, &req.room).await?;
                let members = store.list_members(&req.room).await?;
                // Purge first: if that fails the room still exists and the delete can be
                // retried; once more after, for what members sent in between.
                if let Some(history) = &self.history {
                    Box::pin(history.purge_room(&req.room)).await?;
                }
                let deleted = store.delete_room(&req.room).await;
                // Whatever the outcome: an invite through this node reads the room again.
                if let Some(rooms) = &self.rooms {
                    rooms.forget(&req.room);
                }
                deleted?;
                if let Some(history) = &self.history {
                    if let Err(e) = Box::pin(history.purge_room(&req.room)).await {
                        tracing::warn!(room = req.room, "second purge of a deleted room: {e}");
                    }
                    self.closed(Box::pin(history.close_feeds(&req.room, None)).await);
                }
                revoke.extend(members.into_iter().map(|m| m.endpoint));
                ok(serde_json::json!({}))
            }
            Op::MembersInvite => {
                let req: MemberRef = parse(body)?;
                // Two independent reads, made beside the gates (see `process`); the owner
                // check is judged first.
                let (room, invitee) = match prefetched {
                    Prefetched::Invite { room, invitee } => (room, invitee),
                    Prefetched::Nothing => {
                        tokio::join!(
                            self.room_to_invite_into(&req.room, &caller.key),
                            self.active(&req.key)
                        )
                    }
                };
                let room = judge_owner(caller, &req.room, room)?;
                // Only an active user can be invited: a typo'd key fails here, not later.
                if let Active::Revoked = invitee? {
                    return Err(CtlError::new(
                        ErrorKind::Conflict,
                        format!("{} is revoked", req.key),
                    ));
                }
                // The owner check has the room (read, or remembered: `Rooms`): the store
                // need not read it again, and adds the member to that room only, never to
                // one created under the id since (`Store::add_member_to_checked_room`).
                ok(store
                    .add_member_to_checked_room(
                        &room,
                        &req.key,
                        Role::Member,
                        MemberState::Invited,
                        &caller.key,
                    )
                    .await?)
            }
            Op::MembersJoin => {
                let req: RoomRef = parse(body)?;
                match store
                    .list_members(&req.room)
                    .await?
                    .iter()
                    .find(|m| m.endpoint == caller.key)
                {
                    Some(_) => ok(store.join(&req.room, &caller.key).await?),
                    None => Err(CtlError::forbidden(format!(
                        "you are not invited to room {}",
                        req.room
                    ))),
                }
            }
            Op::MembersRemove => {
                let req: MemberRef = parse(body)?;
                self.require_owner(caller, &req.room).await?;
                let room = store.get_room(&req.room).await?;
                if room.owner.eq_ignore_ascii_case(&req.key) {
                    return Err(CtlError::new(
                        ErrorKind::Conflict,
                        "the owner cannot be removed; delete the room instead",
                    ));
                }
                store.remove_member(&req.room, &req.key).await?;
                let key = req.key.to_ascii_uppercase();
                if let Some(history) = &self.history {
                    self.closed(Box::pin(history.close_feeds(&req.room, Some(&key))).await);
                }
                revoke.push(key);
                ok(serde_json::json!({}))
            }
            Op::MembersLeave => {
                let req: RoomRef = parse(body)?;
                let room = store.get_room(&req.room).await?;
                if room.owner == caller.key {
                    return Err(CtlError::new(
                        ErrorKind::Conflict,
                        "the owner cannot leave; delete the room instead",
                    ));
                }
                store.remove_member(&req.room, &caller.key).await?;
                if let Some(history) = &self.history {
                    self.closed(Box::pin(history.close_feeds(&req.room, Some(&caller.key))).await);
                }
                revoke.push(caller.key.clone());
                ok(serde_json::json!({}))
            }
            Op::MembersList => {
                let req: ListMembers = parse(body)?;
                self.require_member(caller, &req.room, true).await?;
                let members = store.list_members(&req.room).await?;
                ok(page(members, |m| &m.endpoint, req.after, req.limit)?)
            }
            Op::MembersRooms => {
                let req: ForUser = parse(body)?;
                let key = self.self_or_admin(caller, req.key)?;
                let memberships = store.list_rooms_for_endpoint(&key).await?;
                ok(page(memberships, |m| &m.room, req.after, req.limit)?)
            }
            Op::KeysLatest => {
                let req: RoomRef = parse(body)?;
                self.require_member(caller, &req.room, true).await?;
                ok(store.latest_room_key(&req.room).await?)
            }
            Op::KeysGet => {
                let req: KeyRef = parse(body)?;
                self.require_member(caller, &req.room, true).await?;
                ok(store.get_room_key(&req.room, req.epoch).await?)
            }
            Op::UsersXkey => {
                let req: SetXkey = parse(body)?;
                ok(store.set_user_xkey(&caller.key, &req.xkey).await?)
            }
            Op::MembersKeys => {
                let req: RoomRef = parse(body)?;
                self.require_member(caller, &req.room, false).await?;
                let mut out = Vec::new();
                for m in store.list_members(&req.room).await? {
                    let xkey = match store.get_user(&m.endpoint).await {
                        Ok(u) if u.revoked_at.is_none() => u.xkey,
                        Ok(_) | Err(StoreError::NotFound { .. }) => None,
                        Err(e) => return Err(e.into()),
                    };
                    out.push(MemberKey {
                        key: m.endpoint,
                        xkey,
                    });
                }
                ok(out)
            }
            Op::RoomsSubscribe => {
                let req: SubscribeRoom = parse(body)?;
                self.require_member(caller, &req.room, true).await?;
                let history = self.history()?;
                ok(
                    Box::pin(history.open_feed(&req.room, &caller.key, &req.inbox, req.start))
                        .await?,
                )
            }
            Op::KeysRekey => {
                let req: Rekey = parse(body)?;
                self.require_owner(caller, &req.room).await?;
                let material = base64::engine::general_purpose::STANDARD
                    .decode(&req.material)
                    .map_err(|e| CtlError::invalid(format!("material is not base64: {e}")))?;
                ok(store.rekey(&req.room, &material).await?)
            }
        }
    }

    /// Logs the outcome of closing feeds after rights were taken away. A failure is not the
    /// caller's: the store change stands, and the feeds' consumers expire on their own once
    /// the connection is re-admitted without the room.
    fn closed(&self, result: Result<usize, CtlError>) {
        match result {
            Ok(n) if n > 0 => tracing::info!(feeds = n, "closed room feeds after a removal"),
            Ok(_) => {}
            Err(e) => tracing::warn!("could not close room feeds after a removal: {e}"),
        }
    }

    /// Takes rights away from live connections (see [`Handler::handle`]).
    pub fn revoke(&self, keys: Vec<String>) {
        if let Some(hook) = &self.on_revoke
            && !keys.is_empty()
        {
            hook(keys);
        }
    }

    fn self_or_admin(&self, caller: &Caller, key: Option<String>) -> Result<String, CtlError> {
        match key {
            Some(k) if !k.eq_ignore_ascii_case(&caller.key) => {
                require_admin(caller)?;
                Ok(k)
            }
            _ => Ok(caller.key.clone()),
        }
    }

    /// The caller is a member of `room` (joined, if `joined`), or an admin. An unknown room
    /// is `not_found` for admins and members alike; for others, `forbidden` (so a stranger
    /// learns nothing about which rooms exist).
    async fn require_member(
        &self,
        caller: &Caller,
        room: &str,
        joined: bool,
    ) -> Result<(), CtlError> {
        if caller.admin {
            self.store.get_room(room).await?;
            return Ok(());
        }
        let members = match self.store.list_members(room).await {
            Ok(m) => m,
            Err(StoreError::NotFound { .. }) => {
                return Err(CtlError::forbidden(format!(
                    "you are not a member of room {room}"
                )));
            }
            Err(e) => return Err(e.into()),
        };
        match members.iter().find(|m| m.endpoint == caller.key) {
            Some(m) if !joined || m.state == MemberState::Joined => Ok(()),
            Some(_) => Err(CtlError::forbidden(format!("join room {room} first"))),
            None => Err(CtlError::forbidden(format!(
                "you are not a member of room {room}"
            ))),
        }
    }

    async fn require_owner(&self, caller: &Caller, room: &str) -> Result<(), CtlError> {
        judge_owner(caller, room, self.store.get_room(room).await).map(|_| ())
    }
}

/// Reads an operation needs, made beside the gates (see [`Handler::process`]).
enum Prefetched {
    Nothing,
    Invite {
        room: Result<super::Room, StoreError>,
        invitee: Result<Active, StoreError>,
    },
}

/// What gate 2 (and the invitee check) need of a user record.
enum Active {
    Yes { admin: bool },
    Revoked,
}

/// The owner check on `found`, the room as read: only its owner (or an admin) passes. A
/// missing room is `forbidden` to non-admins, as a room they cannot see.
fn judge_owner(
    caller: &Caller,
    room: &str,
    found: Result<super::Room, StoreError>,
) -> Result<super::Room, CtlError> {
    let found = match found {
        Ok(r) => r,
        Err(StoreError::NotFound { .. }) if !caller.admin => {
            return Err(CtlError::forbidden(format!("you do not own room {room}")));
        }
        Err(e) => return Err(e.into()),
    };
    if found.owner == caller.key || caller.admin {
        Ok(found)
    } else {
        Err(CtlError::forbidden(format!(
            "only the owner of room {room} may do this"
        )))
    }
}

fn require_admin(caller: &Caller) -> Result<(), CtlError> {
    if caller.admin {
        Ok(())
    } else {
        Err(CtlError::forbidden("only admins may do this"))
    }
}

/// The key and body a request claims, without verifying its signature (`bus-auth` off, or
/// soft after a would-be denial). Shape, size and operation are still checked.
fn claimed(
    raw: &[u8],
    op: Op,
    reply: Option<&str>,
    limits: &envelope::Limits,
) -> Result<(String, Box<RawValue>, bool), CtlError> {
    let env = envelope::parse(raw, limits).map_err(envelope_error)?;
    if env.op != op.name() {
        return Err(CtlError::invalid(format!(
            "envelope is for operation {}, sent to {}",
            env.op,
            op.name()
        )));
    }
    // A minimal read names its key only through its reply inbox.
    let from_inbox = || {
        reply
            .filter(|_| env.is_minimal() && op.is_read())
            .and_then(inbox_owner)
            .map(str::to_string)
    };
    let key = env
        .key
        .clone()
        .or_else(from_inbox)
        .ok_or_else(|| CtlError::new(ErrorKind::Unauthenticated, "the request names no key"))?;
    let minimal = env.is_minimal();
    Ok((key, env.body, minimal))
}

fn envelope_error(e: envelope::EnvelopeError) -> CtlError {
    let kind = match e.code() {
        "unauthenticated" => ErrorKind::Unauthenticated,
        "invalid" => ErrorKind::Invalid,
        _ => ErrorKind::Unavailable,
    };
    CtlError::new(kind, e.to_string())
}

/// The operation's arguments, straight from the body's JSON text (no `Value` in between:
/// that was an allocation per field on every request).
fn parse<T: DeserializeOwned>(body: &RawValue) -> Result<T, CtlError> {
    // A missing body is an empty object, so operations without arguments need none.
    let text = match body.get() {
        "null" => "{}",
        text => text,
    };
    serde_json::from_str(text).map_err(|e| CtlError::invalid(format!("body: {e}")))
}

/// A reply larger than the server takes in a message would never be sent, and its caller
/// would wait out its timeout; it is refused instead, saying why: an unpaged listing, or
/// a room's keys for thousands of members. A kilobyte is left for headers (an error
/// reply's are under a hundred bytes; the subject does not count).
fn fit_reply(
    op: Op,
    body: Vec<u8>,
    kind: Option<ErrorKind>,
    max_payload: usize,
) -> (Vec<u8>, Option<ErrorKind>) {
    let room = max_payload.saturating_sub(1024);
    if body.len() <= room {
        return (body, kind);
    }
    let pages = if matches!(
        op,
        Op::UsersList | Op::RoomsList | Op::MembersList | Op::MembersRooms
    ) {
        ": ask for pages (`after`, `limit`), as the client library does"
    } else {
        ""
    };
    let error = CtlError::invalid(format!(
        "the reply to {} would be {} bytes, more than the {room} a reply may have{pages}",
        op.name(),
        body.len()
    ));
    (json(&Reply::<()>::Error(error)), Some(ErrorKind::Invalid))
}

/// One page of a listing (see [`Page`]): `items` in the order of `key`, those after
/// `after`, `limit` of them or as many as are left; without `limit`, all of them. A
/// client takes a page shorter than its `limit` as the last, so a `limit` this node would
/// not fill is refused rather than cut short. The stores list in key order already;
/// sorting here keeps the cursor's order independent of the backend.
fn page<T>(
    mut items: Vec<T>,
    key: impl Fn(&T) -> &String,
    after: Option<String>,
    limit: Option<usize>,
) -> Result<Vec<T>, CtlError> {
    page_limit(limit)?;
    items.sort_by(|a, b| key(a).cmp(key(b)));
    if let Some(after) = after {
        items.retain(|item| key(item).as_str() > after.as_str());
    }
    if let Some(limit) = limit {
        items.truncate(limit);
    }
    Ok(items)
}

/// A page's `limit`, if it is one a page can have (see [`page`]).
fn page_limit(limit: Option<usize>) -> Result<Option<usize>, CtlError> {
    match limit {
        Some(limit) if !(1..=MAX_PAGE).contains(&limit) => Err(CtlError::invalid(format!(
            "limit: {limit}; a page holds 1 to {MAX_PAGE} items"
        ))),
        limit => Ok(limit),
    }
}

/// The encoded success reply, `{"ok": value}`.
fn ok<T: Serialize>(value: T) -> Result<Vec<u8>, CtlError> {
    serde_json::to_vec(&Reply::Ok(value))
        .map_err(|e| CtlError::new(ErrorKind::Unavailable, format!("encoding the reply: {e}")))
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_else(|_| {
        b"{\"error\":{\"kind\":\"unavailable\",\"message\":\"encoding failed\"}}".to_vec()
    })
}

/// How long a stopping service waits for the requests it already took.
const DRAIN: Duration = Duration::from_secs(3);

/// Runs the micro service until shutdown: it takes requests on `listen` and answers on
/// `listen` too, except once stopping, when `reply` carries the answers. Calls `ready` once
/// every endpoint is subscribed at the server.
///
/// Why two connections: stopping must hand new requests to the other nodes *without losing
/// any already on their way here*. Unsubscribing an endpoint drops, in the client, every
/// message the server sent before it saw the unsubscribe (async-nats forgets the
/// subscription at once), and each such caller waited out its timeout: the rare 2.4 s gap of
/// a rolling restart. Draining the connection instead tells the server to stop, then takes
/// what was already sent until the server confirms, then closes it; answers still being
/// worked on at that point go out on `reply`.
pub async fn run(
    reply: async_nats::Client,
    listen: async_nats::Client,
    handler: Arc<Handler>,
    ready: impl FnOnce(),
    mut shutdown: Shutdown,
) -> Result<(), async_nats::Error> {
    let service = listen
        .service_builder()
        .description("unibus control plane: users, rooms, members, room keys")
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await?;
    let group = service.group(CTL_PREFIX);
    // The server this node's connection is on is the node's own (its `server_name` is the
    // node's name): clients connected there address it to be served here.
    let here = Some(listen.server_info().server_name).filter(|name| is_token(name));
    let mut endpoints = Vec::with_capacity(3 * Op::ALL.len());
    for op in Op::ALL {
        let endpoint = group.endpoint(op.name()).await?;
        endpoints.push(endpoint.map(move |request| (op, request)).boxed());
        if op.is_read() {
            continue;
        }
        // Every caller's own subject for this write (see `auth::envelope`), at any node
        // and at this one (`Op::own_subject_at`).
        let name = op.name().replace('.', "-");
        let mut subjects = vec![(format!("{name}-own"), format!("{}.*", op.name()))];
        if let Some(here) = &here {
            subjects.push((
                format!("{name}-own-here"),
                format!("{}.*.{here}", op.name()),
            ));
        }
        for (name, subject) in subjects {
            let endpoint = group.endpoint_builder().name(name).add(subject).await?;
            endpoints.push(endpoint.map(move |request| (op, request)).boxed());
        }
    }
    let mut requests = futures_util::stream::select_all(endpoints);
    listen.flush().await?;
    ready();
    // Requests are polled here, on this task, rather than spawned: a SQLite read
    // completes on its first poll, and a spawn per request (a task hop and a wake-up of
    // another worker thread) cost more than the read itself. Requests that wait (KV
    // round trips, writes on the blocking pool) still overlap.
    let mut in_flight = futures_util::stream::FuturesUnordered::new();
    // Set once shutdown began: from then on the loop only takes what was already
    // delivered, and ends when the endpoints do (or at the deadline).
    let mut draining: Option<tokio::time::Instant> = None;
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    loop {
        let deadline = draining.unwrap_or_else(|| tokio::time::Instant::now() + DRAIN);
        let (op, request) = tokio::select! {
            next = requests.next() => match next {
                Some(r) => r,
                None => break,
            },
            Some(()) = in_flight.next(), if !in_flight.is_empty() => continue,
            _ = shutdown.wait(), if draining.is_none() => {
                // Stop taking requests, so the queue group hands new ones to the other
                // nodes at once; the endpoints still yield what reached this connection
                // before the server saw that, then end (see above).
                stopping.store(true, std::sync::atomic::Ordering::SeqCst);
                if listen.drain().await.is_err() {
                    break;
                }
                draining = Some(tokio::time::Instant::now() + DRAIN);
                continue;
            }
            _ = tokio::time::sleep_until(deadline), if draining.is_some() => break,
        };
        let (handler, stopping) = (handler.clone(), stopping.clone());
        let (reply, listen) = (reply.clone(), listen.clone());
        in_flight.push(async move {
            let started = std::time::Instant::now();
            let to = request.message.reply.clone();
            let own_key = op.own_subject_key(&request.message.subject);
            let (body, kind, revoke, minimal_reads) = handler
                .handle(op, &request.message.payload, to.as_deref(), own_key)
                .await;
            let (body, kind) = fit_reply(op, body, kind, listen.max_payload());
            let outcome = kind.map(ErrorKind::as_str).unwrap_or("ok");
            crate::metrics::get().ctl_request(op.name(), outcome, started.elapsed());
            let mut headers = HeaderMap::new();
            if let Some(kind) = kind {
                headers.insert("Nats-Service-Error", kind.as_str());
                headers.insert(SERVICE_ERROR_CODE_HEADER, kind.code().to_string().as_str());
            }
            if own_key.is_some() && handler.takes_unsigned_own_writes() {
                headers.insert(OWN_UNSIGNED_HEADER, "1");
            }
            if minimal_reads {
                headers.insert(MINIMAL_READS_HEADER, "1");
            }
            // Through the service (which counts it in `$SRV.STATS`) while it listens; once
            // stopping, its connection is closing: answer on the other one.
            let (sent, answered_on) = if stopping.load(std::sync::atomic::Ordering::SeqCst) {
                let sent = match to {
                    Some(to) => reply
                        .publish_with_headers(to, headers, body.into())
                        .await
                        .map_err(|e| e.to_string()),
                    None => Ok(()),
                };
                (sent, &reply)
            } else {
                let sent = request
                    .respond_with_headers(Ok(body.into()), headers)
                    .await
                    .map_err(|e| e.to_string());
                (sent, &listen)
            };
            if let Err(e) = sent {
                tracing::debug!("control-plane reply not sent: {e}");
            }
            if !revoke.is_empty() {
                // The reply must reach the server before any kick does.
                let _ = answered_on.flush().await;
                handler.revoke(revoke);
            }
        });
    }
    // Finish what is in flight before the node's nats-server goes into lame duck
    // (`node::run` waits for this), while this node's server still serves JetStream, then
    // flush, so those replies have left before the connections close (a reply still
    // queued in the client when it is dropped is lost, and its caller waits out its
    // timeout). Bounded: with nats-server gone (a node giving up on it) a flush waits for
    // a reconnect that never comes.
    drop(requests);
    let deadline = draining.unwrap_or_else(|| tokio::time::Instant::now() + DRAIN);
    let drained = tokio::time::timeout_at(deadline, async {
        while in_flight.next().await.is_some() {}
        let _ = reply.flush().await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!("control-plane requests still in flight after {DRAIN:?}; stopping anyway");
    }
    service.stop().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_string()).unwrap()
    }

    #[test]
    fn arguments_parse_from_the_body_text_and_a_missing_body_is_empty() {
        let req: MemberRef = parse(&raw(r#"{"room":"r1","key":"UA"}"#)).unwrap();
        assert_eq!((req.room.as_str(), req.key.as_str()), ("r1", "UA"));
        let _: Empty = parse(&raw("null")).unwrap();
        let _: Empty = parse(&raw("{}")).unwrap();
    }

    /// Which signed writes skip the cluster-wide nonce claim: only those on their signer's
    /// own subject, and only where the server enforces who may publish there.
    #[tokio::test]
    async fn only_enforce_lets_an_own_subject_stand_in_for_the_ledger() {
        use crate::auth::envelope::{Envelope, Sent};
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::Sqlite(
            crate::membership::sqlite::SqliteStore::open(dir.path().join("s.db"))
                .await
                .unwrap(),
        ));
        let key = nkeys::KeyPair::new_user();
        let me = key.public_key();
        let body = serde_json::json!({ "room": "r1" });
        for (mode, sent, claims) in [
            (BusAuth::Enforce, Sent::OwnSubject, false),
            (BusAuth::Enforce, Sent::Public, true),
            (BusAuth::Soft, Sent::OwnSubject, true),
            (BusAuth::Soft, Sent::Public, true),
        ] {
            let config = ServiceConfig {
                bus_auth: mode,
                ..ServiceConfig::default()
            };
            let handler = Handler::new(store.clone(), config, None);
            let raw = Envelope::sign_for(sent, "rooms.create", &body, &key)
                .unwrap()
                .to_vec();
            let own_key = (sent == Sent::OwnSubject).then_some(me.as_str());
            let Authenticated {
                key: signer, nonce, ..
            } = handler
                .authenticate(Op::RoomsCreate, &raw, None, own_key)
                .unwrap_or_else(|e| panic!("{mode:?} {sent:?}: {}", e.message));
            assert_eq!(signer, me);
            assert_eq!(nonce.is_some(), claims, "{mode:?} {sent:?}");
        }
    }

    /// On a finalized cluster (a SQLite node always is) an enforce node takes a write on
    /// its signer's own subject without checking the signature: the server vouches for
    /// the publisher. Everywhere else a forged signature is still refused, and an own
    /// subject still takes only its own key's requests.
    #[tokio::test]
    async fn a_finalized_enforce_node_trusts_the_own_subject_instead_of_the_signature() {
        use crate::auth::envelope::{Envelope, Sent};
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::Sqlite(
            crate::membership::sqlite::SqliteStore::open(dir.path().join("s.db"))
                .await
                .unwrap(),
        ));
        assert!(store.finalized_at(version::OWN_SUBJECT_UNSIGNED));
        let (me, forger) = (nkeys::KeyPair::new_user(), nkeys::KeyPair::new_user());
        let body = serde_json::json!({ "room": "r1" });
        // Signed by `forger`, claiming to be `me`.
        let forged = |sent| {
            let mut envelope = Envelope::sign_for(sent, "rooms.create", &body, &forger).unwrap();
            envelope.key = Some(me.public_key());
            envelope.to_vec()
        };
        let handler = |mode| {
            let config = ServiceConfig {
                bus_auth: mode,
                ..ServiceConfig::default()
            };
            Handler::new(store.clone(), config, None)
        };
        let enforce = handler(BusAuth::Enforce);
        let own = me.public_key();
        let Authenticated {
            key: signer, nonce, ..
        } = enforce
            .authenticate(Op::RoomsCreate, &forged(Sent::OwnSubject), None, Some(&own))
            .unwrap_or_else(|e| panic!("{}", e.message));
        assert_eq!((signer, nonce), (own.clone(), None));
        let refused = enforce
            .authenticate(Op::RoomsCreate, &forged(Sent::Public), None, None)
            .err()
            .unwrap();
        assert_eq!(refused.kind, ErrorKind::Unauthenticated);
        // Someone else's own subject: refused before anything else.
        let elsewhere = forger.public_key();
        let refused = enforce
            .authenticate(
                Op::RoomsCreate,
                &forged(Sent::OwnSubject),
                None,
                Some(&elsewhere),
            )
            .err()
            .unwrap();
        assert_eq!(refused.kind, ErrorKind::Unauthenticated);
        // Where the server does not enforce the subject, the signature is checked.
        let Authenticated { key: signer, .. } = handler(BusAuth::Soft)
            .authenticate(Op::RoomsCreate, &forged(Sent::OwnSubject), None, Some(&own))
            .unwrap();
        assert_eq!(
            signer, own,
            "soft goes on with the claimed key, logging a would-deny"
        );
        // The operation is still checked: a write signed for another op is refused.
        let other_op = Envelope::sign_for(Sent::OwnSubject, "rooms.delete", &body, &me)
            .unwrap()
            .to_vec();
        assert!(
            enforce
                .authenticate(Op::RoomsCreate, &other_op, None, Some(&own))
                .is_err()
        );
    }

    #[test]
    fn a_body_naming_a_field_twice_is_refused_not_read_either_way() {
        let err = parse::<MemberRef>(&raw(r#"{"room":"r1","room":"r2","key":"UA"}"#))
            .err()
            .unwrap();
        assert_eq!(err.kind, ErrorKind::Invalid);
        assert!(err.message.contains("duplicate field"), "{}", err.message);
    }

    #[test]
    fn a_page_is_in_key_order_after_its_cursor_and_never_over_the_cap() {
        let items: Vec<String> = (0..1200).rev().map(|i| format!("k{i:04}")).collect();
        fn key(s: &String) -> &String {
            s
        }
        let all = page(items.clone(), key, None, None).unwrap();
        assert_eq!(
            all.len(),
            1200,
            "no limit: everything (clients from before pages)"
        );
        assert!(all.windows(2).all(|w| w[0] < w[1]));
        let first = page(items.clone(), key, None, Some(MAX_PAGE)).unwrap();
        assert_eq!(first.len(), MAX_PAGE);
        assert_eq!(first[0], "k0000");
        let next = page(items.clone(), key, first.last().cloned(), Some(3)).unwrap();
        assert_eq!(next, ["k0500", "k0501", "k0502"]);
        let last = page(items.clone(), key, Some("k1199".into()), Some(5)).unwrap();
        assert!(last.is_empty());
        // A page this node would cut short is refused, not cut: the client takes a short
        // page as the last.
        for limit in [0, MAX_PAGE + 1] {
            let refused = page(items.clone(), key, None, Some(limit)).err().unwrap();
            assert_eq!(refused.kind, ErrorKind::Invalid, "limit {limit}");
        }

        // A reply too large to send is refused, saying so; one that fits goes as it is.
        let (body, kind) = fit_reply(Op::UsersList, vec![b'x'; 2000], None, 2048);
        assert_eq!(kind, Some(ErrorKind::Invalid));
        let reply: Reply<()> = serde_json::from_slice(&body).unwrap();
        assert!(matches!(reply, Reply::Error(e) if e.message.contains("pages")));
        assert_eq!(
            fit_reply(Op::UsersList, vec![b'x'; 1000], None, 2048)
                .0
                .len(),
            1000
        );
    }
}
