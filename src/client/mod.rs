//! The client library: `unibus::client::Client`. The CLI's client commands are a thin layer
//! over it; applications use it the same way.
//!
//! ```no_run
//! # async fn demo() -> Result<(), unibus::client::ClientError> {
//! use futures_util::StreamExt;
//! use unibus::client::{Client, ClientOptions, Start};
//! let client = Client::connect(ClientOptions::new(
//!     ["tls://n1:4222", "tls://n2:4222"],
//!     "me.seed",
//! ).ca("ca.crt")).await?;
//! client.create_room("ops", "Operations", false).await?;
//! client.send("ops", b"hello").await?;
//! let mut feed = client.subscribe("ops", Start::All).await?;
//! while let Some(message) = feed.next().await {
//!     let message = message?;
//!     println!("{} {}: {:?}", message.seq, message.sender, message.body);
//! }
//! # Ok(()) }
//! ```
//!
//! # What the client does for the caller
//!
//! - **Connects** to several servers with the user's nkey (the auth callout admits it) and a
//!   pinned CA, and reconnects forever: a node in lame duck or killed is a hiccup. That
//!   covers a node's start-up window too: a server listening before its authenticator
//!   subscribed refuses only when its callout timeout passes, by which time async-nats has
//!   taken the server's first PING as "connected", so the refusal is a lost connection and
//!   the next attempt gets in. A key the cluster does not admit is refused at once, before
//!   that PING, and `connect` fails.
//! - **Signs** every control-plane write and sends it on the key's own subject (unsigned
//!   once a node says the cluster is finalized and takes that: [`Client::call_raw`]),
//!   binds every read to its own inbox ([`crate::auth::envelope`]), and decodes the [`Reply`] into
//!   `Result<T, ClientError>`, keeping the server's typed [`ErrorKind`].
//! - **Refreshes its permissions** after a call that changes them (creating or joining a
//!   room): the server computes a connection's permissions when it connects, so the client
//!   reconnects once to pick up the new ones.
//! - **Sends** with JetStream acks and a message id, retrying until acknowledged or the
//!   publish timeout passes: a retried message is stored once (the stream's duplicate
//!   window), and a returned sequence means the message is durable.
//! - **Subscribes** through a member-checked feed ([`feed`]) that delivers history and live
//!   messages exactly once, in stream order, across reconnects.
//! - **Encrypts** end to end in encrypted rooms ([`e2e`]).
//! - **Live mode** ([`live`]): beside durable messages, [`Client::send_live`] and
//!   [`Client::subscribe_live`] carry at-most-once messages over core NATS (no storage,
//!   no ack, no history) under the same membership rules and encryption, for traffic
//!   such as telemetry and presence that wants plain NATS speed.

pub mod e2e;
mod error;
pub mod feed;
pub mod live;
mod messages;
mod rooms;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::auth::envelope::{Envelope, EnvelopeError, Sent};
use crate::auth::keys;
use crate::membership::api::{self, ErrorKind, Op, Reply};

pub use crate::membership::api::{CtlError, Start};
pub use error::ClientError;
pub use feed::{RoomMessage, Subscription};
pub use live::{LiveMessage, LiveSubscription};

/// How to reach the cluster and who to be.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// NATS URLs (`tls://host:4222`); the client picks one and fails over to the others.
    pub servers: Vec<String>,
    /// The user's nkey seed (`SU…`), from `unibus keygen`.
    pub seed_file: PathBuf,
    /// The cluster CA to pin (required when the cluster runs TLS).
    pub ca: Option<PathBuf>,
    /// Shown in the server's connection list.
    pub name: Option<String>,
    /// Bound on one control-plane request.
    pub request_timeout: Duration,
    /// How long `send` keeps retrying until its message is acknowledged.
    pub publish_timeout: Duration,
    /// Try `servers` in the given order (a preferred local node first) instead of a random
    /// order that spreads clients over the cluster.
    pub retain_order: bool,
    /// Once no node serves this key's own subjects (a cluster from before them), how long
    /// writes go straight to the public subject before own subjects are tried again.
    pub own_subjects_retry: Duration,
}

impl ClientOptions {
    pub fn new<S: Into<String>>(
        servers: impl IntoIterator<Item = S>,
        seed_file: impl Into<PathBuf>,
    ) -> Self {
        ClientOptions {
            servers: servers.into_iter().map(Into::into).collect(),
            seed_file: seed_file.into(),
            ca: None,
            name: None,
            request_timeout: Duration::from_secs(5),
            publish_timeout: Duration::from_secs(30),
            retain_order: false,
            own_subjects_retry: Duration::from_secs(10),
        }
    }

    pub fn ca(mut self, ca: impl Into<PathBuf>) -> Self {
        self.ca = Some(ca.into());
        self
    }
}

/// A connection to the bus as one user. Cheap to clone (clones share the connection).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    nats: async_nats::Client,
    js: jetstream::Context,
    key: nkeys::KeyPair,
    public: String,
    xkey: nkeys::XKey,
    options: ClientOptions,
    /// Bumped on every (re)connect: feeds reopen after one.
    connects: watch::Receiver<u64>,
    /// Bumped on every disconnect: a control-plane request in flight then is answered on
    /// a connection that no longer exists, so `call` gives up on it at once.
    disconnects: watch::Receiver<u64>,
    /// Whether each room is encrypted (it never changes for a room id while it exists).
    encrypted: Mutex<HashMap<String, bool>>,
    /// Unwrapped room keys by (room, epoch).
    room_keys: Mutex<HashMap<(String, u32), e2e::RoomSecret>>,
    /// The epoch `send` seals with, per room, and when it was checked.
    send_epochs: Mutex<HashMap<String, (u32, e2e::RoomSecret, std::time::Instant)>>,
    /// Held while the send epoch is re-checked, so concurrent sends that find it stale do
    /// the check (three control-plane calls) once, not once each.
    epoch_check: tokio::sync::Mutex<()>,
    /// Until when writes skip own subjects (see [`ClientOptions::own_subjects_retry`]).
    own_subjects_unserved_until: Mutex<Option<std::time::Instant>>,
    /// Set once a node said it takes own-subject writes unsigned
    /// ([`api::OWN_UNSIGNED_HEADER`]): the cluster is finalized, which is never undone.
    own_unsigned: std::sync::atomic::AtomicBool,
    /// Set once a node said every node takes minimal reads ([`api::MINIMAL_READS_HEADER`]).
    minimal_reads: std::sync::atomic::AtomicBool,
}

/// Connect options that authenticate as the key of `seed` (which signs the server's nonce),
/// with the one inbox prefix the authenticator lets that key subscribe to
/// ([`api::inbox_prefix`]). Every NATS connection made as a user starts from these, or its
/// requests get no replies.
pub fn nkey_options(seed: &str) -> Result<async_nats::ConnectOptions, String> {
    let seed = seed.trim();
    let key = nkeys::KeyPair::from_seed(seed).map_err(|e| format!("not an nkey seed: {e}"))?;
    Ok(async_nats::ConnectOptions::with_nkey(seed.to_string())
        .custom_inbox_prefix(api::inbox_prefix(&key.public_key())))
}

impl Client {
    /// Connects and authenticates. Fails with [`ClientError::Local`] for a bad seed file,
    /// URL or CA, [`ClientError::Refused`] (`unauthenticated`) when the cluster does not
    /// admit the key, and [`ClientError::Connect`] when no server can be reached.
    pub async fn connect(options: ClientOptions) -> Result<Client, ClientError> {
        let key = keys::read_user_seed(&options.seed_file)
            .map_err(|e| ClientError::Local(format!("--seed-file: {e}")))?;
        let seed = key
            .seed()
            .map_err(|e| ClientError::Local(format!("--seed-file: {e}")))?;
        let xkey = keys::derive_xkey(&key)
            .map_err(|e| ClientError::Local(format!("cannot derive the xkey: {e}")))?;
        let mut addrs = Vec::new();
        for s in options
            .servers
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
        {
            let addr = s.parse::<async_nats::ServerAddr>().map_err(|e| {
                ClientError::Local(format!("--server `{s}` is not a NATS URL: {e}"))
            })?;
            addrs.push(addr);
        }
        if addrs.is_empty() {
            return Err(ClientError::Local("no --server given".into()));
        }
        let (connects_tx, connects) = watch::channel(0u64);
        let (disconnects_tx, disconnects) = watch::channel(0u64);
        let mut nats_options = nkey_options(&seed)
            .map_err(|e| ClientError::Local(format!("--seed-file: {e}")))?
            .name(
                options
                    .name
                    .clone()
                    .unwrap_or_else(|| "unibus-client".into()),
            )
            .connection_timeout(Duration::from_secs(5))
            .request_timeout(Some(options.request_timeout))
            .max_reconnects(None)
            .reconnect_delay_callback(|attempt| {
                Duration::from_millis((100 * attempt as u64).min(2000))
            })
            .event_callback(move |event| {
                let (connects_tx, disconnects_tx) = (connects_tx.clone(), disconnects_tx.clone());
                async move {
                    match event {
                        async_nats::Event::Connected => connects_tx.send_modify(|n| *n += 1),
                        async_nats::Event::Disconnected => disconnects_tx.send_modify(|n| *n += 1),
                        other => tracing::debug!("nats: {other}"),
                    }
                }
            });
        if options.retain_order {
            nats_options = nats_options.retain_servers_order();
        }
        if let Some(ca) = &options.ca {
            if !ca.is_file() {
                return Err(ClientError::Local(format!(
                    "--ca {} does not exist",
                    ca.display()
                )));
            }
            nats_options = nats_options
                .require_tls(true)
                .add_root_certificates(ca.clone());
        }
        let servers = options.servers.join(",");
        let nats = nats_options.connect(addrs).await.map_err(|e| {
            use async_nats::ConnectErrorKind as K;
            match e.kind() {
                K::AuthorizationViolation | K::Authentication => ClientError::refused(
                    ErrorKind::Unauthenticated,
                    format!(
                        "the cluster did not admit {} (not a user, or revoked)",
                        key.public_key()
                    ),
                ),
                _ => ClientError::Connect {
                    servers: servers.clone(),
                    reason: e.to_string(),
                },
            }
        })?;
        let mut js = jetstream::new(nats.clone());
        js.set_timeout(options.request_timeout);
        let public = key.public_key();
        Ok(Client {
            inner: Arc::new(Inner {
                nats,
                js,
                key,
                public,
                xkey,
                options,
                connects,
                disconnects,
                encrypted: Mutex::new(HashMap::new()),
                room_keys: Mutex::new(HashMap::new()),
                send_epochs: Mutex::new(HashMap::new()),
                epoch_check: tokio::sync::Mutex::new(()),
                own_subjects_unserved_until: Mutex::new(None),
                own_unsigned: std::sync::atomic::AtomicBool::new(false),
                minimal_reads: std::sync::atomic::AtomicBool::new(false),
            }),
        })
    }

    /// This client's user key (`U…`).
    pub fn key(&self) -> &str {
        &self.inner.public
    }

    /// This client's curve key for encrypted rooms (`X…`), derived from its seed.
    pub fn xkey(&self) -> String {
        self.inner.xkey.public_key()
    }

    /// The underlying NATS connection (for tools and tests).
    pub fn nats(&self) -> &async_nats::Client {
        &self.inner.nats
    }

    /// One control-plane call: signed, or for a read connection-bound (unsigned, answered
    /// only to this connection's own inbox; see `auth::envelope`).
    pub async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        op: Op,
        body: &B,
    ) -> Result<T, ClientError> {
        let payload = self.call_raw(op, body).await?;
        match serde_json::from_slice::<Reply<T>>(&payload) {
            Ok(Reply::Ok(value)) => Ok(value),
            Ok(Reply::Error(e)) => Err(ClientError::Refused(e)),
            Err(e) => Err(ClientError::Protocol(format!("{}: {e}", op.name()))),
        }
    }

    /// [`Client::call`] up to the reply's bytes, undecoded (tools, benchmarks).
    ///
    /// A write goes to this key's own subject, which spares the node a replicated replay
    /// claim (see `auth::envelope`), first as served by the node this connection is on
    /// (no route hops; `Op::own_subject_at`), then by any node. Where nobody serves it (a
    /// node stopping, nodes too old) the server answers "no responders" at once, and the
    /// next subject is tried; last, the write is signed again for the public subject. When
    /// no node serves own subjects at all and the public subject answers, the cluster is
    /// one from before them: writes then go straight to the public subject for
    /// [`ClientOptions::own_subjects_retry`] instead of paying two such round trips each.
    ///
    /// Once a node has said that the cluster takes own-subject writes unsigned (an
    /// `enforce` node of a finalized cluster, see `membership::version`), they go
    /// unsigned, as reads do: the server vouches for the publisher. Should one be refused
    /// as unauthenticated anyway (a node that has not read the finalized version yet, for
    /// up to 2 s after `unibus cluster finalize`), it is signed and sent again.
    pub async fn call_raw<B: Serialize>(
        &self,
        op: Op,
        body: &B,
    ) -> Result<bytes::Bytes, ClientError> {
        if op.is_read() {
            use std::sync::atomic::Ordering::Relaxed;
            let minimal = &self.inner.minimal_reads;
            // Once a node said the cluster takes them, reads carry only op and body (the
            // key is in the reply inbox); until then, the key and a nonce too.
            let envelope = if minimal.load(Relaxed) {
                Envelope::minimal(op.name(), body)
            } else {
                Envelope::bound(op.name(), body, &self.inner.public)
            };
            let reply = self.ctl_request(op, op.subject(), envelope).await?;
            if reply
                .headers
                .as_ref()
                .is_some_and(|h| h.get(api::MINIMAL_READS_HEADER).is_some())
            {
                minimal.store(true, Relaxed);
            }
            return Ok(reply.payload);
        }
        let unserved = &self.inner.own_subjects_unserved_until;
        let skip_own = unserved
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some_and(|until| std::time::Instant::now() < until);
        if !skip_own {
            let key = &self.inner.public;
            let node = self.inner.nats.server_info().server_name;
            let mut subjects = Vec::with_capacity(2);
            if api::is_token(&node) {
                subjects.push(op.own_subject_at(key, &node));
            }
            subjects.push(op.own_subject(key));
            for subject in subjects {
                match self.own_subject_request(op, subject, body).await {
                    Err(ClientError::NoResponders { .. }) => continue,
                    answer => return answer,
                }
            }
        }
        let public = Envelope::sign(op.name(), body, &self.inner.key);
        let answer = self
            .ctl_request(op, op.subject(), public)
            .await
            .map(|reply| reply.payload);
        // Only a reply (a refusal is one too) shows that a node serves the public subject
        // while none serves own subjects; a dropped connection shows nothing.
        if !skip_own && answer.is_ok() {
            let now = std::time::Instant::now();
            // A retry too long to add to a clock reading stands for "a year".
            let until = now
                .checked_add(self.inner.options.own_subjects_retry)
                .or_else(|| now.checked_add(Duration::from_secs(365 * 86_400)));
            if until.is_some() {
                *unserved
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = until;
            }
        }
        answer
    }

    /// A write on an own subject (see [`Client::call_raw`]): unsigned once a node said
    /// the cluster takes that, otherwise signed under the own-subject tag.
    async fn own_subject_request<B: Serialize>(
        &self,
        op: Op,
        subject: String,
        body: &B,
    ) -> Result<bytes::Bytes, ClientError> {
        use std::sync::atomic::Ordering::Relaxed;
        let unsigned = &self.inner.own_unsigned;
        let signed = || Envelope::sign_for(Sent::OwnSubject, op.name(), body, &self.inner.key);
        let reply = if unsigned.load(Relaxed) {
            let bound = Envelope::bound(op.name(), body, &self.inner.public);
            let reply = self.ctl_request(op, subject.clone(), bound).await?;
            let refused = reply
                .headers
                .as_ref()
                .and_then(|h| h.get(api::SERVICE_ERROR_CODE_HEADER))
                .is_some_and(|code| code.as_str() == ErrorKind::Unauthenticated.code().to_string());
            if refused {
                self.ctl_request(op, subject, signed()).await?
            } else {
                reply
            }
        } else {
            self.ctl_request(op, subject, signed()).await?
        };
        if reply
            .headers
            .as_ref()
            .is_some_and(|h| h.get(api::OWN_UNSIGNED_HEADER).is_some())
        {
            unsigned.store(true, Relaxed);
        }
        Ok(reply.payload)
    }

    /// One envelope to one control-plane subject, and its reply.
    async fn ctl_request(
        &self,
        op: Op,
        subject: String,
        envelope: Result<Envelope, EnvelopeError>,
    ) -> Result<async_nats::Message, ClientError> {
        let envelope = envelope.map_err(|e| ClientError::Local(e.to_string()))?;
        let payload = serde_json::to_vec(&envelope)
            .map_err(|e| ClientError::Local(format!("encoding the request: {e}")))?;
        // A request whose connection drops (a node in lame duck closing it, a node killed)
        // would otherwise wait out the whole request timeout for a reply that went to the
        // old connection; fail it at once as transient, so the caller retries through the
        // reconnected one. (Whether the server acted on it is unknown either way, as with
        // a timeout.)
        let mut disconnects = self.inner.disconnects.clone();
        disconnects.mark_unchanged();
        let request = self.inner.nats.request(subject.clone(), payload.into());
        let response = tokio::select! {
            // A reply that arrived before the drop is an answer: look at it first.
            biased;
            response = request => response,
            _ = disconnects.changed() => return Err(ClientError::Dropped { op: op.name() }),
        };
        let response = response.map_err(|e| {
            use async_nats::client::RequestErrorKind as K;
            match e.kind() {
                K::NoResponders => ClientError::NoResponders { subject },
                K::TimedOut => ClientError::Timeout {
                    what: format!("a reply to {}", op.name()),
                },
                _ => ClientError::Closed(e.to_string()),
            }
        })?;
        Ok(response)
    }

    /// Reconnects so the server recomputes this connection's permissions (after a change
    /// to the caller's rooms), and waits until connected again.
    pub async fn refresh_permissions(&self) -> Result<(), ClientError> {
        let mut connects = self.inner.connects.clone();
        connects.mark_unchanged();
        self.inner
            .nats
            .force_reconnect()
            .await
            .map_err(|e| ClientError::Closed(e.to_string()))?;
        match tokio::time::timeout(self.inner.options.request_timeout * 2, connects.changed()).await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(ClientError::Closed("connection dropped".into())),
            Err(_) => Err(ClientError::Timeout {
                what: "the reconnect that refreshes permissions".into(),
            }),
        }
    }

    /// Subscribes to `subject` and returns once the server has the subscription (a flush),
    /// so nothing published after this returns can be missed.
    pub(crate) async fn subscribe_at_server(
        &self,
        subject: String,
    ) -> Result<async_nats::Subscriber, ClientError> {
        let sub = self
            .inner
            .nats
            .subscribe(subject)
            .await
            .map_err(|e| ClientError::Closed(e.to_string()))?;
        self.inner
            .nats
            .flush()
            .await
            .map_err(|e| ClientError::Closed(e.to_string()))?;
        Ok(sub)
    }

    /// Flushes and closes the connection (waits for pending publishes to leave).
    pub async fn close(&self) -> Result<(), ClientError> {
        self.inner
            .nats
            .flush()
            .await
            .map_err(|e| ClientError::Closed(e.to_string()))
    }
}
