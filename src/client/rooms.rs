//! Typed control-plane calls: one method per operation of [`crate::membership::api::Op`],
//! plus the follow-ups a caller would otherwise forget (refreshing permissions after a
//! change to one's own rooms; a new key epoch when an encrypted room's members change).

use crate::membership::api::*;
use crate::membership::{Member, Room, RoomKey, User};

use super::{Client, ClientError};

impl Client {
    // ---- users (admins)

    pub async fn add_user(&self, key: &str, name: &str, admin: bool) -> Result<User, ClientError> {
        let body = AddUser {
            key: key.into(),
            name: name.into(),
            admin,
        };
        self.call(Op::UsersAdd, &body).await
    }

    pub async fn get_user(&self, key: &str) -> Result<User, ClientError> {
        self.call(Op::UsersGet, &UserRef { key: key.into() }).await
    }

    /// Every user, in key order (fetched page by page, see [`Client::all_pages`]).
    pub async fn list_users(&self) -> Result<Vec<User>, ClientError> {
        self.all_pages(
            |u: &User| u.key.clone(),
            |after, limit| async move { self.call(Op::UsersList, &ListUsers { after, limit }).await },
        )
        .await
    }

    pub async fn revoke_user(&self, key: &str) -> Result<User, ClientError> {
        self.call(Op::UsersRevoke, &UserRef { key: key.into() })
            .await
    }

    // ---- rooms

    /// Creates a room owned by the caller (an empty `name` becomes the room id), then
    /// refreshes permissions so this connection may use it. An encrypted room gets its
    /// first key epoch, wrapped for the owner.
    pub async fn create_room(
        &self,
        room: &str,
        name: &str,
        encrypted: bool,
    ) -> Result<Room, ClientError> {
        let body = CreateRoom {
            room: room.into(),
            name: if name.is_empty() { room } else { name }.into(),
            encrypted,
        };
        let created: Room = self.call(Op::RoomsCreate, &body).await?;
        self.remember_room(&created);
        if encrypted {
            self.rekey(room).await?;
        }
        self.refresh_permissions().await?;
        Ok(created)
    }

    pub async fn get_room(&self, room: &str) -> Result<Room, ClientError> {
        let found: Room = self
            .call(Op::RoomsGet, &RoomRef { room: room.into() })
            .await?;
        self.remember_room(&found);
        Ok(found)
    }

    /// The caller's rooms, or (admins) another user's; `None` as an admin lists all rooms.
    pub async fn list_rooms(&self, for_user: Option<&str>) -> Result<Vec<Room>, ClientError> {
        self.pages_for_user(Op::RoomsList, for_user, |r: &Room| r.id.clone())
            .await
    }

    /// Deletes a room, its members, keys and stored history.
    pub async fn delete_room(&self, room: &str) -> Result<(), ClientError> {
        // A room its owner can no longer see is gone.
        self.call_then_kicked(Op::RoomsDelete, room, || async {
            matches!(
                self.get_room(room).await,
                Err(ClientError::Refused(e))
                    if matches!(e.kind, ErrorKind::NotFound | ErrorKind::Forbidden)
            )
        })
        .await
    }

    /// A call on `room` after which the node disconnects the caller (its rights in the
    /// room go: live revocation). On another route that kick can overtake the reply, so
    /// a call that ends in [`ClientError::Dropped`] reads back what happened with `done`
    /// (on the reconnected client) and succeeds if it did.
    async fn call_then_kicked<F, Fut>(&self, op: Op, room: &str, done: F) -> Result<(), ClientError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let body = RoomRef { room: room.into() };
        match self.call::<_, serde_json::Value>(op, &body).await {
            Ok(_) => Ok(()),
            Err(dropped @ ClientError::Dropped { .. }) => {
                if done().await {
                    Ok(())
                } else {
                    Err(dropped)
                }
            }
            Err(e) => Err(e),
        }
    }

    // ---- members

    /// Invites `key` (owners). In an encrypted room, a new epoch is wrapped for everyone
    /// invited or joined, so the new member can read what is sent from now on.
    pub async fn invite(&self, room: &str, key: &str) -> Result<Member, ClientError> {
        let body = MemberRef {
            room: room.into(),
            key: key.into(),
        };
        let member: Member = self.call(Op::MembersInvite, &body).await?;
        if self.is_encrypted(room).await? {
            self.rekey(room).await?;
        }
        Ok(member)
    }

    /// Accepts an invitation, then refreshes permissions so this connection may use the room.
    pub async fn join(&self, room: &str) -> Result<Member, ClientError> {
        let member: Member = self
            .call(Op::MembersJoin, &RoomRef { room: room.into() })
            .await?;
        self.refresh_permissions().await?;
        Ok(member)
    }

    /// Removes a member (owners). In an encrypted room this makes a new epoch for those who
    /// remain, so the removed member cannot read what is sent after.
    pub async fn remove_member(&self, room: &str, key: &str) -> Result<(), ClientError> {
        let body = MemberRef {
            room: room.into(),
            key: key.into(),
        };
        let _: serde_json::Value = self.call(Op::MembersRemove, &body).await?;
        if self.is_encrypted(room).await? {
            self.rekey(room).await?;
        }
        Ok(())
    }

    /// Leaves a room (members; the owner deletes it instead). In an encrypted room the owner
    /// should `rekey` afterwards so the leaver cannot read later messages.
    pub async fn leave(&self, room: &str) -> Result<(), ClientError> {
        // Gone from its own memberships means it left.
        self.call_then_kicked(Op::MembersLeave, room, || async {
            matches!(self.memberships(None).await, Ok(rooms) if rooms.iter().all(|m| m.room != room))
        })
        .await
    }

    pub async fn members(&self, room: &str) -> Result<Vec<Member>, ClientError> {
        self.all_pages(
            |m: &Member| m.endpoint.clone(),
            |after, limit| {
                let body = ListMembers {
                    room: room.into(),
                    after,
                    limit,
                };
                async move { self.call(Op::MembersList, &body).await }
            },
        )
        .await
    }

    /// The memberships of the caller (or, admins, of `for_user`).
    pub async fn memberships(&self, for_user: Option<&str>) -> Result<Vec<Member>, ClientError> {
        self.pages_for_user(Op::MembersRooms, for_user, |m: &Member| m.room.clone())
            .await
    }

    /// A [`ForUser`] listing (`rooms.list`, `members.rooms`), every page of it.
    async fn pages_for_user<T: serde::de::DeserializeOwned>(
        &self,
        op: Op,
        for_user: Option<&str>,
        key: impl Fn(&T) -> String,
    ) -> Result<Vec<T>, ClientError> {
        self.all_pages(key, |after, limit| {
            let body = ForUser {
                key: for_user.map(Into::into),
                after,
                limit,
            };
            async move { self.call(op, &body).await }
        })
        .await
    }

    /// Every item of a listing, a page ([`Page`]) at a time: `ask(after, limit)` asks for
    /// one, and a page shorter than [`MAX_PAGE`] is the last. A node from before pages
    /// refuses their fields as unknown (`invalid`), and in a cluster being upgraded any
    /// page may reach one: then the whole listing is asked for in one reply, as before.
    async fn all_pages<T, F, Fut>(
        &self,
        key: impl Fn(&T) -> String,
        ask: F,
    ) -> Result<Vec<T>, ClientError>
    where
        F: Fn(Option<String>, Option<usize>) -> Fut,
        Fut: std::future::Future<Output = Result<Vec<T>, ClientError>>,
    {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = match ask(after.clone(), Some(MAX_PAGE)).await {
                Err(ClientError::Refused(e))
                    if e.kind == ErrorKind::Invalid && e.message.contains("unknown field") =>
                {
                    return ask(None, None).await;
                }
                page => page?,
            };
            let last_page = page.len() < MAX_PAGE;
            let next = page.last().map(&key);
            // A node that ignored the cursor would have this loop run forever.
            if let (Some(next), Some(after)) = (&next, &after)
                && next <= after
            {
                return Err(ClientError::Protocol(format!(
                    "a listing's page after {after:?} ended at {next:?}, not after it"
                )));
            }
            all.extend(page);
            match next {
                Some(next) if !last_page => after = Some(next),
                _ => return Ok(all),
            }
        }
    }

    // ---- keys

    pub async fn latest_key(&self, room: &str) -> Result<Option<RoomKey>, ClientError> {
        self.call(Op::KeysLatest, &RoomRef { room: room.into() })
            .await
    }

    pub async fn room_key(&self, room: &str, epoch: u32) -> Result<RoomKey, ClientError> {
        let body = KeyRef {
            room: room.into(),
            epoch,
        };
        self.call(Op::KeysGet, &body).await
    }

    /// Stores `material` as the room's next epoch (owners). [`Client::rekey`] builds the
    /// material for an encrypted room; this is the raw operation.
    pub async fn rekey_with(&self, room: &str, material: &[u8]) -> Result<RoomKey, ClientError> {
        use base64::Engine;
        let body = Rekey {
            room: room.into(),
            material: base64::engine::general_purpose::STANDARD.encode(material),
        };
        self.call(Op::KeysRekey, &body).await
    }

    // ---- helpers

    pub(crate) fn remember_room(&self, room: &Room) {
        if let Ok(mut known) = self.inner.encrypted.lock() {
            known.insert(room.id.clone(), room.encrypted);
        }
    }

    /// Whether `room` is encrypted (asks once per room; doubles as a membership check).
    pub(crate) async fn is_encrypted(&self, room: &str) -> Result<bool, ClientError> {
        let known = self
            .inner
            .encrypted
            .lock()
            .ok()
            .and_then(|k| k.get(room).copied());
        match known {
            Some(encrypted) => Ok(encrypted),
            None => Ok(self.get_room(room).await?.encrypted),
        }
    }
}
