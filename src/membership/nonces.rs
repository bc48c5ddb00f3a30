//! The cluster-wide nonce ledger: a signed control-plane request sent on a public subject
//! (`unibus.ctl.<op>`) is accepted once per cluster, not once per node.
//!
//! Each node's membership service keeps a replay cache in memory (`auth::envelope`), but
//! every node answers the public subjects (one queue group), and a request goes to any of
//! them — so without a shared record the same bytes, replayed through another node, would
//! be accepted again. (A write on its signer's own subject, `unibus.ctl.<op>.<key>`, is
//! not claimed here under `bus-auth=enforce`: only the key's connections can publish
//! there; see `auth::envelope`.) With the KV store, every nonce that passes the
//! local checks is also *claimed* here: a publish to `unibus.nonces.<key>.<nonce>` in the
//! stream `UNIBUS_NONCES` with `Nats-Expected-Last-Subject-Sequence: 0`, which JetStream
//! accepts for exactly one publisher (the stream's leader orders them). A second claim gets
//! "wrong last sequence": a replay. Entries expire after the skew window (plus a margin),
//! when the skew check alone refuses the envelope.
//!
//! The stream lives in the `AUTH` account with the store, out of clients' reach; memory
//! storage (nonces are worthless after the window) with the `users` bucket's replicas at
//! creation; `unibus cluster replicas` ([`super::jetstream::KvStore::set_replicas`]) changes
//! it with the buckets, so raising the store to R3 does not leave the ledger — which every
//! signed request needs — on one node.
//! A claim lost in a leader handover is retried with the same message id, and a refused
//! retry is checked against the stored claim, so a claim that landed is never reported as
//! a replay ([`super::cas`]).
//! Fail closed: a claim that cannot be made is an error (`unavailable`), never a pass.
//! A single node (SQLite) has one service, so its in-memory cache is the whole truth and
//! there is no ledger.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use tokio::sync::OnceCell;

use super::StoreError;
use super::cas::{self, Cas};

/// The ledger's stream.
pub const STREAM: &str = "UNIBUS_NONCES";
const PREFIX: &str = "unibus.nonces";

/// Claims nonces in a replicated stream, created on first use.
pub struct NonceLedger {
    js: jetstream::Context,
    keep: Duration,
    op_timeout: Duration,
    ready: OnceCell<()>,
}

impl NonceLedger {
    /// A ledger remembering nonces for `skew` on both sides (twice the window, plus slack).
    pub fn new(js: jetstream::Context, skew: Duration, op_timeout: Duration) -> Self {
        NonceLedger {
            js,
            keep: skew * 2 + Duration::from_secs(5),
            op_timeout,
            ready: OnceCell::new(),
        }
    }

    /// True if this is the first claim of (`key`, `nonce`) in the cluster, false for a replay.
    /// Both are checked envelope fields: `key` a user public key, `nonce` base64url.
    pub async fn claim(&self, key: &str, nonce: &str) -> Result<bool, StoreError> {
        let token_ok = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if !token_ok(key) || !token_ok(nonce) {
            return Err(StoreError::Invalid {
                field: "nonce",
                reason: "key and nonce must be [A-Za-z0-9_-]".into(),
            });
        }
        let bounded = |what: &'static str| {
            move |_| StoreError::Unavailable(format!("nonce ledger: {what}: timed out"))
        };
        tokio::time::timeout(
            self.op_timeout,
            self.ready.get_or_try_init(|| self.create()),
        )
        .await
        .map_err(bounded("create stream"))??;
        // A compare-and-set publish (expected last subject sequence 0), retried across a
        // leader handover without mistaking our own landed claim for a replay
        // ([`super::cas`]; its message id is random per claim, never the nonce).
        let stream = self
            .js
            .get_stream_no_info(STREAM)
            .await
            .map_err(|e| StoreError::Unavailable(format!("nonce ledger: {e}")))?;
        let subject = format!("{PREFIX}.{key}.{nonce}");
        match cas::publish(
            &self.js,
            &stream,
            &subject,
            bytes::Bytes::new(),
            0,
            self.op_timeout,
        )
        .await
        {
            Ok(Cas::Written(_)) => Ok(true),
            Ok(Cas::Moved(_)) => Ok(false),
            Err(StoreError::Unavailable(e)) => {
                Err(StoreError::Unavailable(format!("nonce ledger: claim: {e}")))
            }
            Err(e) => Err(e),
        }
    }

    /// Creates the stream, trying again until it exists: right after a cluster forms,
    /// placement can fail for a moment ("no suitable peers", a peer not yet seen), and the
    /// first signed request must not fail for it. The caller bounds the wait.
    async fn create(&self) -> Result<(), StoreError> {
        let mut pause = Duration::from_millis(50);
        loop {
            // Each attempt bounded: a JetStream API request made while the cluster still
            // elects its meta leader can go unanswered, and would hold the stream's
            // creation (and every claim waiting on it) for the context's whole timeout.
            match tokio::time::timeout(self.op_timeout, self.create_once()).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => tracing::debug!("{e}; retrying"),
                Err(_) => tracing::debug!("nonce ledger: create {STREAM}: no answer; retrying"),
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    async fn create_once(&self) -> Result<(), StoreError> {
        let replicas = match self.js.get_stream("KV_users").await {
            Ok(mut s) => s.info().await.map(|i| i.config.num_replicas).unwrap_or(1),
            Err(_) => 1,
        };
        self.js
            .get_or_create_stream(stream::Config {
                name: STREAM.into(),
                subjects: vec![format!("{PREFIX}.>")],
                max_age: self.keep,
                max_messages_per_subject: 1,
                storage: stream::StorageType::Memory,
                num_replicas: replicas.max(1),
                ..Default::default()
            })
            .await
            .map_err(|e| StoreError::Unavailable(format!("nonce ledger: create {STREAM}: {e}")))?;
        Ok(())
    }
}
