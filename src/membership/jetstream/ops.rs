//! The store operations `membership::Store` dispatches to: users, rooms, members, room
//! keys.

use super::primitives::Created;
use super::*;
use crate::membership::version;

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
        self.read_page(&self.users, None, usize::MAX).await
    }

    pub(crate) async fn list_users_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<User>> {
        self.read_page(&self.users, after, limit).await
    }

    /// Up to `limit` records of `kv` whose keys come after `after`, in key order. The key
    /// listing is one request; only the records wanted are read (one leader read each),
    /// [`READS_IN_FLIGHT`] at a time: read one after the other, ten thousand users took
    /// longer than a request may. A key removed since the listing is skipped, and the
    /// page filled from the keys after it.
    async fn read_page<T: serde::de::DeserializeOwned>(
        &self,
        kv: &kv::Store,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<T>> {
        let mut keys = self.keys(kv, ">").await?;
        if let Some(after) = after {
            keys.retain(|key| key.as_str() > after);
        }
        let records: Vec<Result<T>> = futures_util::stream::iter(keys)
            .map(|key| async move { self.get_json::<T>(kv, &key).await })
            .buffered(READS_IN_FLIGHT)
            .filter_map(|found| {
                std::future::ready(found.map(|f| f.map(|(value, _)| value)).transpose())
            })
            .take(limit)
            .collect()
            .await;
        records.into_iter().collect()
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
    /// [`crate::membership::quorum`].
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
        let owner = Member {
            room: room.id.clone(),
            endpoint: room.owner.clone(),
            role: Role::Owner,
            state: MemberState::Joined,
            added_by: room.owner.clone(),
            added_at: room.created_at,
            room_created_at: Some(room.created_at),
        };
        if self.finalized_at(version::ONE_STAGE_CREATE) {
            return self.create_room_in_one_stage(room, owner).await;
        }
        let reused = match self
            .create_noting_reuse(&self.rooms, &room.id, encode(&room)?)
            .await?
        {
            Created::Taken => return Err(room_exists(&room.id)),
            Created::Fresh => false,
            Created::Reused => true,
        };
        let record = encode(&owner)?;
        // The id is ours now: write the owner's member record and index entry (together,
        // see `add_member` for why the index may go first). If the id was used before,
        // in the same round trip drop whatever a racing write may have left under it
        // (a member added while the old room was being deleted), so a new room never
        // inherits old members or keys; the cleanup spares the owner's own keys, which
        // the writes beside it replace anyway. A fresh id has nothing under it: members
        // and keys are written only after their room was read, and a deleted room leaves
        // its marker (see "Deletes" in the `jetstream` module doc).
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

    /// [`Self::create_room`] once the cluster is finalized at
    /// [`version::ONE_STAGE_CREATE`]: the room, its owner's member record and index entry
    /// (both create-only) go out together, one fsynced stage instead of two, before the
    /// id is known to be free. A create that loses the id leaves its owner record in the
    /// winner's room until the undo below lands (or, if the undo fails, until a listing
    /// of the room's members removes it): it grants nothing, because every node of this
    /// version counts a creator's owner record only for the room's owner
    /// ([`crate::membership::Member::belongs_to`]), and finalizing means no older node is
    /// left to count it.
    ///
    /// Create-only, so that a record or entry already there (the caller's membership in
    /// the winner's room, a leftover of an earlier room under the id) is never replaced
    /// by a write this call may have to take back; and the undo removes only what this
    /// call wrote, up to its own sequence ([`Self::purge_through`]), so a later write
    /// under the same key survives.
    async fn create_room_in_one_stage(&self, room: Room, owner: Member) -> Result<Room> {
        let member_key = format!("{}.{}", owner.room, owner.endpoint);
        let index_key = format!("{}.{}", owner.endpoint, owner.room);
        let record = encode(&owner)?;
        let pointer = Bytes::from(room.id.clone());
        let (created, member, index) = futures_util::future::join3(
            self.create_noting_reuse(&self.rooms, &room.id, encode(&room)?),
            self.cas(&self.members, &member_key, record.clone(), 0),
            self.cas(&self.index, &index_key, pointer.clone(), 0),
        )
        .await;
        let ours = |written: &Result<Cas>| match written {
            Ok(Cas::Written(seq)) => Some(*seq),
            _ => None,
        };
        let (member_seq, index_seq) = (ours(&member), ours(&index));
        let reused = match created {
            Ok(Created::Fresh) => false,
            Ok(Created::Reused) => true,
            Ok(Created::Taken) => {
                self.undo_lost_create(&member_key, member_seq, &index_key, index_seq)
                    .await;
                return Err(room_exists(&room.id));
            }
            // Unknown whether the room landed: if it did, go on (not knowing whether the
            // id was used before, look for leftovers); if not, take back the rest.
            Err(e) => {
                let landed = matches!(
                    self.get_json::<Room>(&self.rooms, &room.id).await,
                    Ok(Some((found, _))) if found == room
                );
                if !landed {
                    self.undo_lost_create(&member_key, member_seq, &index_key, index_seq)
                        .await;
                    return Err(e);
                }
                true
            }
        };
        // Only once the room is ours may what an earlier room left under the id go.
        if reused {
            self.purge_room_leftovers(&room.id, &owner.endpoint).await?;
        }
        // The id is ours. Whatever was under the owner's keys (a leftover of an earlier
        // room, or what a create of the same id by the same owner that lost wrote), or a
        // write that failed, is replaced by a put, which lands after it, so that loser's
        // undo cannot take it.
        if member_seq.is_none() {
            self.put(&self.members, &member_key, record).await?;
        }
        if index_seq.is_none() {
            self.put(&self.index, &index_key, pointer).await?;
        }
        Ok(room)
    }

    /// Takes back what a create that lost its room's id wrote, each only through its own
    /// sequence (None: this call wrote nothing there). The index entry goes only with the
    /// member record: if a record of the caller was there already (its membership in the
    /// winner's room), the entry points at it. Failures are logged, not returned: the
    /// caller is told the id is taken either way, a leftover owner record grants nothing
    /// and is removed by the room's next member listing, and the reconciler removes an
    /// index entry without its member.
    async fn undo_lost_create(
        &self,
        member_key: &str,
        member_seq: Option<u64>,
        index_key: &str,
        index_seq: Option<u64>,
    ) {
        let Some(seq) = member_seq else { return };
        if let Err(e) = self.purge_through(&self.members, member_key, seq).await {
            tracing::warn!(member_key, "undoing a lost create's owner record: {e}");
        }
        if let Some(seq) = index_seq
            && let Err(e) = self.purge_through(&self.index, index_key, seq).await
        {
            tracing::debug!(index_key, "undoing a lost create's index entry: {e}");
        }
    }

    pub(crate) async fn get_room(&self, id: &str) -> Result<Room> {
        let id = ids::room_id(id)?;
        self.require_room(id).await
    }

    pub(crate) async fn list_rooms(&self) -> Result<Vec<Room>> {
        self.read_page(&self.rooms, None, usize::MAX).await
    }

    pub(crate) async fn list_rooms_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Room>> {
        self.read_page(&self.rooms, after, limit).await
    }

    pub(crate) async fn delete_room(&self, id: &str) -> Result<()> {
        let id = ids::room_id(id)?;
        self.require_room(id).await?;
        self.purge_room_children(id).await?;
        // A marker, not a purge: whoever takes the id again must know it was used.
        self.mark_deleted(&self.rooms, id).await
    }

    /// Writes `member`, reading the room first unless the caller has just read it
    /// (`checked`: the service's owner check). Neither read closes the race with a room
    /// delete: the delete may land between the read and the member write. So the member
    /// carries the creation time of the room it was checked against:
    /// - if the room is deleted meanwhile, the member is an orphan that grants nothing
    ///   (readers require the room), and [`Self::reconcile`] removes it;
    /// - if the id is also taken again before the write lands (after `create_room`'s
    ///   cleanup of leftovers), the new room was created at another time, and every
    ///   reader ([`Self::live_member`], [`Self::list_members`], [`Self::join`]) ignores a
    ///   member of another room; inviting the endpoint to the new room replaces it
    ///   ([`Self::replace_leftover_member`]), and deleting the new room removes it.
    pub(crate) async fn add_member(
        &self,
        mut member: Member,
        checked: Option<&Room>,
    ) -> Result<Member> {
        let created_at = match checked {
            Some(room) => room.created_at,
            None => self.require_room(&member.room).await?.created_at,
        };
        member.room_created_at = Some(created_at);
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
            self.replace_leftover_member(member).await
        }
    }

    /// `member` could not be created because a record is there: a conflict, unless that
    /// record belongs to an earlier room under the same id, which `member` (checked
    /// against the room there now) replaces. Only this rare path pays its two reads.
    async fn replace_leftover_member(&self, member: Member) -> Result<Member> {
        let key = format!("{}.{}", member.room, member.endpoint);
        let (room, existing) = futures_util::future::try_join(
            self.require_room(&member.room),
            self.get_json::<Member>(&self.members, &key),
        )
        .await?;
        if !member.belongs_to(&room) {
            return Err(StoreError::room_taken_again(&member.room));
        }
        let changed = || {
            StoreError::conflict(format!(
                "membership of {} in room {:?} changed meanwhile; try again",
                member.endpoint, member.room
            ))
        };
        match existing {
            Some((old, rev)) if !old.belongs_to(&room) => {
                let replaced = self
                    .update(&self.members, &key, encode(&member)?, rev)
                    .await?;
                if replaced { Ok(member) } else { Err(changed()) }
            }
            Some(_) => Err(StoreError::conflict(format!(
                "{} is already a member of room {:?}",
                member.endpoint, member.room
            ))),
            None => Err(changed()),
        }
    }

    pub(crate) async fn join(&self, room: &str, endpoint: &str) -> Result<Member> {
        let room = ids::room_id(room)?;
        let endpoint = ids::user_key("endpoint", endpoint)?;
        let found = self.require_room(room).await?;
        let key = format!("{room}.{endpoint}");
        for _ in 0..5 {
            let Some((mut member, rev)) = self
                .get_json::<Member>(&self.members, &key)
                .await?
                .filter(|(m, _)| m.belongs_to(&found))
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
        let found = &self.require_room(room).await?;
        let keys = self.keys(&self.members, &format!("{room}.>")).await?;
        let member = |key: String| async move {
            Ok(match self.get_json::<Member>(&self.members, &key).await? {
                Some((m, _)) if m.belongs_to(found) => Some(m),
                // A member of an earlier room under this id (an invite that raced that
                // room's delete): it grants nothing, and nothing else would remove it
                // while this room lives. Remove it here, and only it: a write after it (an
                // invite into this room replacing it) survives. Its index entry is then
                // one without a member, which the reconciler removes.
                Some((_, seq)) => {
                    if let Err(e) = self.purge_through(&self.members, &key, seq).await {
                        tracing::debug!(key, "leftover member of an earlier room left: {e}");
                    }
                    None
                }
                None => None,
            })
        };
        let mut out: Vec<Member> = futures_util::stream::iter(keys)
            .map(member)
            .buffer_unordered(READS_IN_FLIGHT)
            .try_filter_map(|member| std::future::ready(Ok(member)))
            .try_collect()
            .await?;
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
            .buffer_unordered(READS_IN_FLIGHT)
            .try_filter_map(|member| std::future::ready(Ok(member)))
            .try_collect()
            .await?;
        out.sort_by(|a, b| a.room.cmp(&b.room));
        Ok(out)
    }

    /// `endpoint`'s member record in `room`, if both it and the room exist and the
    /// member belongs to that room rather than an earlier one under the id (an index
    /// entry without them is stale and grants nothing).
    pub(super) async fn live_member(&self, room: String, endpoint: &str) -> Result<Option<Member>> {
        let (member, room_record) = futures_util::future::try_join(
            self.get_json::<Member>(&self.members, &format!("{room}.{endpoint}")),
            self.get_json::<Room>(&self.rooms, &room),
        )
        .await?;
        match (member, room_record) {
            (Some((m, _)), Some((r, _))) if m.belongs_to(&r) => Ok(Some(m)),
            _ => {
                tracing::debug!(room, endpoint, "stale index entry ignored");
                Ok(None)
            }
        }
    }

    pub(super) async fn epochs(&self, room: &str) -> Result<BTreeMap<u32, String>> {
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

    pub(super) async fn create_key(&self, key: RoomKey) -> Result<RoomKey> {
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

fn room_exists(id: &str) -> StoreError {
    StoreError::conflict(format!("room {id:?} already exists"))
}
