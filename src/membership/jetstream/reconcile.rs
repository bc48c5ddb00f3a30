//! The reconciler: repairs what an interrupted two-bucket write (or a write racing a
//! room's delete) leaves behind.

use super::*;

impl KvStore {
    /// Repairs what an interrupted two-bucket write leaves; see the [`jetstream`](super)
    /// module docs.
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
    pub(super) async fn younger_than(
        &self,
        kv: &kv::Store,
        key: &str,
        grace: Duration,
    ) -> Result<bool> {
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
