//! Opening the buckets, their replicas and status, and the cluster-size check that runs
//! before a bucket is created or scaled.

use super::*;
use crate::membership::version;

/// A `users` bucket younger than this without a version record belongs to a cluster being
/// created now (see [`KvStore::finalize_if_new`]).
const NEW_CLUSTER_WINDOW: Duration = Duration::from_secs(60);

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
        let mut created_users = false;
        let mut stores = Vec::with_capacity(BUCKETS.len());
        for bucket in BUCKETS {
            let stream_name = format!("KV_{bucket}");
            // Lookups and binds are idempotent reads, hedged like any other: right after a
            // cluster forms, a JetStream API request can go unanswered (one node waited out
            // its whole `op_timeout` for one, and became ready 2 s after its peers).
            let what = format!("look up bucket {bucket}");
            let existing = bounded_retry(opts.op_timeout, &what, || async {
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
                created_users |= bucket == "users";
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
                        let e = format!("{what} with {replicas} replicas: {e}");
                        // The size check above placed as many replicas a moment ago, so
                        // this is a peer the meta leader briefly counts as offline (a
                        // cluster still forming): worth another try, unlike a refusal.
                        if e.contains("no suitable peers") {
                            StoreError::Unavailable(e)
                        } else {
                            StoreError::Backend(format!("{e}; check `unibus cluster status`"))
                        }
                    })
                })
                .await?;
            }
            let what = format!("bind bucket {bucket}");
            let store = bounded_retry(opts.op_timeout, &what, || async {
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
            finalized: Default::default(),
        };
        store.wait_for_leaders(opts.leader_timeout).await?;
        if opts.create {
            store.finalize_if_new(created_users).await?;
        }
        let finalized = store.refresh_cluster_version().await?;
        version::check_supported(finalized)?;
        Ok(store)
    }

    /// The cluster's finalized version as this store last read it (see
    /// [`super::super::version`]).
    pub fn cluster_version(&self) -> u32 {
        self.finalized.get()
    }

    /// True once the cluster is finalized at `version` or later.
    pub(crate) fn finalized_at(&self, version: u32) -> bool {
        self.finalized.reached(version)
    }

    /// Reads the finalized version from the store (0: never finalized) and remembers it.
    pub async fn refresh_cluster_version(&self) -> Result<u32> {
        let recorded = self
            .get_json::<version::Record>(&self.users, version::KEY)
            .await?
            .map_or(0, |(record, _)| record.version);
        self.finalized.observe(recorded);
        Ok(recorded)
    }

    /// Records this code's [`version::PROTOCOL`] as the cluster's finalized version,
    /// unless the store already holds as much or more (a version is never lowered).
    /// Returns the version now recorded. The caller checks every node runs this code
    /// (`unibus cluster finalize`).
    pub async fn finalize(&self) -> Result<u32> {
        for _ in 0..3 {
            // Delete markers included: a record deleted by another KV client is replaced
            // at the marker's revision.
            let (recorded, revision) = match self.last_message(&self.users, version::KEY).await? {
                Some(msg) if is_delete_marker(&msg.headers) => (0, msg.sequence),
                Some(msg) => (
                    decode::<version::Record>("cluster version", &msg.payload)?.version,
                    msg.sequence,
                ),
                None => (0, 0),
            };
            version::check_supported(recorded)?;
            if recorded >= version::PROTOCOL {
                self.finalized.observe(recorded);
                return Ok(recorded);
            }
            let record = encode(&version::Record::now())?;
            if let Cas::Written(_) = self
                .cas(&self.users, version::KEY, record, revision)
                .await?
            {
                self.finalized.observe(version::PROTOCOL);
                return Ok(version::PROTOCOL);
            }
        }
        Err(StoreError::conflict(
            "the cluster version kept changing while finalizing; run it again",
        ))
    }

    /// Whether the cluster is being created now, by this code, and so starts finalized:
    /// this open created the `users` bucket, or it was created less than
    /// [`NEW_CLUSTER_WINDOW`] ago and holds no version record yet (an open that created
    /// it and then failed on a later bucket, retried). Whether the bucket is still empty
    /// says nothing: a node that found it already there may have written its bootstrap
    /// admin meanwhile. Nodes creating a cluster together write the same record
    /// create-only, and the losers find it. A cluster must be created by nodes of one
    /// version: an older node joining in that first minute would not know the record.
    async fn finalize_if_new(&self, created_users: bool) -> Result<()> {
        let what = "read when the users bucket was created";
        let created = bounded_retry(self.op_timeout, what, || async {
            self.js
                .get_stream("KV_users")
                .await
                .map(|s| s.cached_info().created.unix_timestamp_nanos())
                .map_err(|e| unavailable(what, e))
        })
        .await?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        let young = now.saturating_sub(created) < NEW_CLUSTER_WINDOW.as_nanos() as i128;
        if created_users || young {
            let record = encode(&version::Record::now())?;
            self.cas(&self.users, version::KEY, record, 0).await?;
        }
        Ok(())
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

    pub(super) async fn wait_for_leaders(&self, limit: Duration) -> Result<()> {
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
    /// ([`crate::membership::nonces`]) if it exists: every signed request claims a nonce there, so a
    /// ledger left at R1 would stop the control plane whenever its one node restarts.
    /// Safe to re-run. Does not wait: follow with [`KvStore::wait_replicas_current`].
    pub async fn set_replicas(&self, n: usize) -> Result<Vec<BucketStatus>> {
        let n = replicas_in_range(n)?;
        check_cluster_size(&self.client, &self.js, n, self.op_timeout).await?;
        for bucket in BUCKETS {
            self.set_stream_replicas(&format!("KV_{bucket}"), n, false)
                .await?;
        }
        self.set_stream_replicas(crate::membership::nonces::STREAM, n, true)
            .await?;
        self.bucket_status().await
    }

    /// Sets one stream's replicas; a missing stream is an error unless `optional`.
    pub(super) async fn set_stream_replicas(
        &self,
        stream_name: &str,
        n: usize,
        optional: bool,
    ) -> Result<()> {
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
}

/// Refuses `n` replicas when the servers cannot place them (see the [`jetstream`](super) module docs).
pub(super) async fn check_cluster_size(
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
