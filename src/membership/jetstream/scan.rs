//! Bulk reads for migration and verification: one ordered consumer per bucket, checked
//! against the leader's key listing.

use super::*;

impl KvStore {
    /// Every live key of `kv` with its value, for bulk comparison (`unibus migrate`).
    ///
    /// One request per key would be tens of thousands of round trips, so values come from
    /// one ordered consumer (`LastPerSubject`) instead. A consumer may be hosted by a
    /// follower, which can lag behind the leader; to keep read-your-writes for the key set
    /// this reads in two steps (see the [`jetstream`](super) module docs):
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
    pub(in crate::membership) async fn scan(
        &self,
        kv: &kv::Store,
    ) -> Result<BTreeMap<String, Bytes>> {
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
    pub(super) async fn consume_latest(&self, kv: &kv::Store) -> Result<BTreeMap<String, Bytes>> {
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
