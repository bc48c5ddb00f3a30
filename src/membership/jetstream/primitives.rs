//! Single-bucket primitives: each one NATS request (or a compare-and-set with its
//! read-back), bounded by `op_timeout`, retried where that is safe.

use super::*;

/// How a create-if-absent write ended.
pub(super) enum Created {
    /// Written; the key had never held anything (as far as the stream remembers).
    Fresh,
    /// Written over a delete marker, or after something under the key was purged while
    /// we tried: the key was used before.
    Reused,
    /// Refused: the key holds a value.
    Taken,
}

impl KvStore {
    pub(in crate::membership) async fn get_raw(
        &self,
        kv: &kv::Store,
        key: &str,
    ) -> Result<Option<(Bytes, u64)>> {
        Ok(self
            .last_message(kv, key)
            .await?
            .filter(|msg| !is_delete_marker(&msg.headers))
            .map(|msg| (msg.payload, msg.sequence)))
    }

    /// The last message under `key` (a key, or a `prefix.>` wildcard), delete markers
    /// included, from the stream's leader; None when there is none.
    pub(super) async fn last_message(
        &self,
        kv: &kv::Store,
        key: &str,
    ) -> Result<Option<jetstream::message::StreamMessage>> {
        let subject = format!("{}{key}", kv.prefix);
        cas::last_message(&kv.stream, &subject, self.op_timeout).await
    }

    pub(super) async fn get_json<T: DeserializeOwned>(
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
    /// conflict ([`crate::membership::cas`]).
    pub(in crate::membership) async fn create(
        &self,
        kv: &kv::Store,
        key: &str,
        value: Bytes,
    ) -> Result<bool> {
        Ok(!matches!(
            self.create_noting_reuse(kv, key, value).await?,
            Created::Taken
        ))
    }

    /// [`Self::create`], telling whether the key had been used (and deleted) before.
    pub(super) async fn create_noting_reuse(
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
    pub(super) async fn cas(
        &self,
        kv: &kv::Store,
        key: &str,
        value: Bytes,
        expected: u64,
    ) -> Result<Cas> {
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

    pub(in crate::membership) async fn put(
        &self,
        kv: &kv::Store,
        key: &str,
        value: Bytes,
    ) -> Result<u64> {
        let what = format!("write {}/{key}", kv.name);
        bounded_retry(self.op_timeout, &what, || async {
            kv.put(key, value.clone())
                .await
                .map_err(|e| unavailable(&what, e))
        })
        .await
    }

    /// Compare-and-set; `Ok(false)` if the revision moved. Retried like [`Self::create`].
    pub(super) async fn update(
        &self,
        kv: &kv::Store,
        key: &str,
        value: Bytes,
        rev: u64,
    ) -> Result<bool> {
        Ok(matches!(
            self.cas(kv, key, value, rev).await?,
            Cas::Written(_)
        ))
    }

    /// Removes every message of `key` (a key or a `prefix.>` wildcard). Idempotent.
    pub(super) async fn purge(&self, kv: &kv::Store, key: &str) -> Result<()> {
        self.purge_up_to(kv, key, None).await
    }

    /// Removes `key`'s messages up to and including sequence `seq`, keeping any written
    /// after it: a delete that cannot take a later write with it. Idempotent.
    pub(super) async fn purge_through(&self, kv: &kv::Store, key: &str, seq: u64) -> Result<()> {
        self.purge_up_to(kv, key, Some(seq)).await
    }

    /// [`Self::purge`], or [`Self::purge_through`] `seq`.
    async fn purge_up_to(&self, kv: &kv::Store, key: &str, through: Option<u64>) -> Result<()> {
        let what = match through {
            None => format!("delete {}/{key}", kv.name),
            Some(seq) => format!("delete {}/{key} through {seq}", kv.name),
        };
        let subject = format!("{}{key}", kv.prefix);
        bounded_retry(self.op_timeout, &what, || async {
            let purge = kv.stream.purge().filter(subject.clone());
            match through {
                None => purge.await,
                Some(seq) => purge.sequence(seq.saturating_add(1)).await,
            }
            .map(|_| ())
            .map_err(|e| unavailable(&what, e))
        })
        .await
    }

    /// Replaces `key`'s value by a delete marker (see "Deletes" in the [`jetstream`](super) module doc).
    /// Idempotent.
    pub(super) async fn mark_deleted(&self, kv: &kv::Store, key: &str) -> Result<()> {
        let what = format!("delete {}/{key}", kv.name);
        bounded_retry(self.op_timeout, &what, || async {
            kv.delete(key).await.map_err(|e| unavailable(&what, e))
        })
        .await
    }

    /// Live keys matching `filter` (`>` or `prefix.>`), sorted, read from the leader.
    pub(in crate::membership) async fn keys(
        &self,
        kv: &kv::Store,
        filter: &str,
    ) -> Result<Vec<String>> {
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
    pub(super) async fn room_exists(&self, room: &str) -> Result<bool> {
        Ok(self.get_raw(&self.rooms, room).await?.is_some())
    }

    pub(super) async fn require_room(&self, id: &str) -> Result<Room> {
        match self.get_json::<Room>(&self.rooms, id).await? {
            Some((room, _)) => Ok(room),
            None => Err(StoreError::not_found(format!("room {id:?}"))),
        }
    }

    pub(in crate::membership) async fn write_index(
        &self,
        room: &str,
        endpoint: &str,
    ) -> Result<u64> {
        self.put(
            &self.index,
            &format!("{endpoint}.{room}"),
            Bytes::from(room.to_string()),
        )
        .await
    }

    /// Whether `kv` holds any message under `filter` (`prefix.>`), delete markers
    /// included: one leader read (`STREAM.MSG.GET` with a wildcard `last_by_subj`, which
    /// the server answers from its subject index), much cheaper than a subject listing
    /// (a stream info request). "No message" from the leader means a listing taken at
    /// that moment would have been empty.
    pub(super) async fn any_under(&self, kv: &kv::Store, filter: &str) -> Result<bool> {
        Ok(self.last_message(kv, filter).await?.is_some())
    }

    /// Lists `filter` only if [`Self::any_under`] finds something there.
    pub(super) async fn keys_if_any(&self, kv: &kv::Store, filter: &str) -> Result<Vec<String>> {
        if self.any_under(kv, filter).await? {
            self.keys(kv, filter).await
        } else {
            Ok(Vec::new())
        }
    }

    /// [`Self::purge_room_children`] for a room id just taken again, but only what is
    /// there, and never `owner`'s member record or index entry (being written beside
    /// this). Usually there is nothing: one cheap leader read per bucket (in parallel)
    /// decides. The probes and listings are leader reads (see the [`jetstream`](super) module doc), so
    /// whatever they do not show was not acknowledged when they were taken — the same
    /// guarantee an unconditional purge at that moment gives (a write landing after either
    /// is not caught by either).
    pub(super) async fn purge_room_leftovers(&self, room: &str, owner: &str) -> Result<()> {
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
    pub(super) async fn purge_room_children(&self, room: &str) -> Result<()> {
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
