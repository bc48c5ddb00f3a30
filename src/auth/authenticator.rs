//! The authenticator: answers nats-server's auth callout (`$SYS.REQ.USER.AUTH`) from the
//! membership store.
//!
//! Every node runs one, in one queue group, so any node can admit a connection to any
//! other; it connects as the node's service user, which `auth_users` lets past the callout
//! (the authenticator cannot authenticate itself). For each request it:
//!
//! 1. decodes and verifies the server's request JWT ([`callout::decode_request`]);
//! 2. verifies the client's nkey signature over the server's nonce — the client proves it
//!    holds the key it claims ([`callout::verify_client_nonce`]);
//! 3. asks the store whether that key is an active user (failing closed, like
//!    [`Store::is_authorized`]: a store error or timeout is a no), after making sure the
//!    store's leaders still hold their quorum ([`Store::confirm_quorum`]: a node cut off
//!    in a minority admits no one);
//! 4. admits it into `APP` with the permissions of DESIGN §3 for the rooms it has joined,
//!    signed by the shared issuer key.
//!
//! Fail closed, in order of bad luck: a bad request, a bad signature, an unknown or revoked
//! key, a store that does not answer — each is a signed denial; a request that cannot even
//! be decoded gets no answer, and the server denies it when its callout times out.
//!
//! **A starting node.** nats-server opens its client port before its routes are up and
//! long before this node's store is open; a callout nobody answers is a denial after the
//! server's timeout, so a valid client that picked a restarting node was refused. So the
//! authenticator subscribes as soon as nats-server is up, *before* the store opens, and
//! until then forwards each request to a peer's authenticator that has its store
//! ([`FORWARD_SUBJECT`], answered only by authenticators with a store), retrying while no
//! peer is reachable yet, and answers itself as soon as its own store opens. Whatever is
//! still unanswered when [`HOLD`] runs out is denied ("node starting"), inside the
//! server's callout timeout. Only `AUTH`-account users (node services) can publish the
//! forward subject, as only they can answer the callout itself.
//!
//! **A store between leaders.** A stream leader that stops (a rolling restart's lame duck,
//! a crash) leaves its bucket without one for a second or two. Admission reads that fail
//! for that reason (no quorum, store unavailable) are retried every [`RETRY`] until
//! [`ANSWER_WITHIN`] of the request's arrival; only then is the refusal sent. An unknown
//! key or a bad signature is refused at once. The server waits
//! [`super::server_config::CALLOUT_TIMEOUT_SECS`] for the answer, a second longer.
//!
//! **A user in too many rooms.** The answer is one JWT, at most 1 MiB; a user whose rooms'
//! subjects do not fit is admitted without them, to the control plane only, rather than
//! refused at every attempt ([`callout::fitted_allow_response`]).
//!
//! `bus-auth=soft` runs the same checks but admits everyone with open permissions,
//! logging each would-be denial with its reason (and counting it in `/metrics`), so an operator can see who
//! would break before turning `enforce` on.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use nkeys::KeyPair;
use tokio::sync::watch;

use super::callout::{self, AuthRequest, Permissions};
use crate::config::BusAuth;
use crate::membership::{MemberState, Store, StoreError};
use crate::node::shutdown::Shutdown;

/// The subject nats-server sends callout requests on.
pub const AUTH_SUBJECT: &str = "$SYS.REQ.USER.AUTH";
/// Where a starting node forwards callout requests to peers that have their store.
pub const FORWARD_SUBJECT: &str = "unibus.auth.forward";
const QUEUE_GROUP: &str = "unibus-authenticator";
/// How long after a callout request arrives the authenticator may keep trying to admit it
/// (store retries, forwarding): a second inside the server's callout timeout
/// ([`super::server_config::CALLOUT_TIMEOUT_SECS`]), so the answer at the end, a denial
/// if need be, still reaches the server in time.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(3);
/// How long a node without its store keeps trying to get a request answered by peers.
pub const HOLD: Duration = ANSWER_WITHIN;
/// Pause between admission attempts while the store cannot answer.
const RETRY: Duration = Duration::from_millis(100);
/// The authenticator stage's detail in `/readyz` while it forwards (no store yet).
pub const FORWARDING: &str = "store not open yet: forwarding admissions to peers";
/// Pause between forwarding attempts while no peer answers the forward subject.
const FORWARD_RETRY: Duration = Duration::from_millis(50);

pub struct Authenticator {
    /// None until the node's store is open (see the module docs).
    store: watch::Receiver<Option<Arc<Store>>>,
    issuer: KeyPair,
    mode: BusAuth,
}

/// Hands the opened store to a running [`Authenticator`].
pub struct StoreSlot(watch::Sender<Option<Arc<Store>>>);

impl StoreSlot {
    pub fn fill(&self, store: Arc<Store>) {
        self.0.send_replace(Some(store));
    }
}

/// Why a connection is (or would be) refused; logged and sent to the server.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("{0}")]
    BadSignature(callout::CalloutError),

    #[error("{0} is not an active user")]
    Unknown(String),
    #[error("the store cannot vouch for anyone from this node: {0}")]
    NoQuorum(StoreError),
    #[error("store unavailable while computing permissions: {0}")]
    Store(#[from] StoreError),
    #[error("this node is starting (store not open) and no peer answered in time")]
    Starting,
}

impl Refusal {
    /// A short, stable reason for metrics.
    fn reason(&self) -> &'static str {
        match self {
            Refusal::BadSignature(_) => "bad_signature",
            Refusal::Unknown(_) => "unknown_key",
            Refusal::NoQuorum(_) => "no_quorum",
            Refusal::Store(_) => "store_unavailable",
            Refusal::Starting => "node_starting",
        }
    }
}

impl Authenticator {
    /// An authenticator without a store yet; fill the slot once the store is open.
    pub fn new(issuer: KeyPair, mode: BusAuth) -> (Self, StoreSlot) {
        let (tx, rx) = watch::channel(None);
        let authenticator = Authenticator {
            store: rx,
            issuer,
            mode,
        };
        (authenticator, StoreSlot(tx))
    }

    /// Makes sure the bootstrap admin exists (idempotent, like an ACL bootstrap): a fresh
    /// cluster must have someone who can add users.
    pub async fn bootstrap_admin(store: &Store, admin_key: &str) -> Result<(), StoreError> {
        match store.add_user(admin_key, "bootstrap admin", true).await {
            Ok(_) => {
                tracing::info!(admin = admin_key, "bootstrap admin added to the store");
                Ok(())
            }
            Err(StoreError::Conflict { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn store(&self) -> Option<Arc<Store>> {
        self.store.borrow().clone()
    }

    /// The response JWT for one raw request, or None when the request cannot be decoded
    /// (the server then times out and denies). Without a store yet, the request is
    /// forwarded to a peer through `client` (see the module docs).
    pub async fn respond(&self, client: &async_nats::Client, raw: &[u8]) -> Option<String> {
        let request = match callout::decode_request(raw) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(
                    "auth callout: undecodable request, not answering (the server will deny): {e}"
                );
                return None;
            }
        };
        let deadline = tokio::time::Instant::now() + ANSWER_WITHIN;
        let decision = match self.store() {
            Some(store) => self.decide_retrying(&store, &request, deadline).await,
            None => match self.forward(client, raw, deadline).await {
                Forwarded::Answer(jwt) => {
                    crate::metrics::get().auth_decision("forwarded", "store_not_open");
                    return Some(jwt);
                }
                Forwarded::OwnStore(store) => {
                    self.decide_retrying(&store, &request, deadline).await
                }
                Forwarded::Nobody => Err(Refusal::Starting),
            },
        };
        let signed = match (decision, self.mode) {
            (Ok(perms), _) => {
                let limit = client.max_payload();
                callout::fitted_allow_response(&request, &perms, &self.issuer, limit).map(
                    |(jwt, rooms_left_out)| {
                        let reason = if rooms_left_out {
                            tracing::warn!(
                                client = ?request.client_nkey,
                                "admitted without room subjects: the permissions for all its rooms do not fit in one callout answer ({} bytes at most); it can still use the control plane, and leave rooms",
                                limit.min(callout::MAX_JWT_BYTES)
                            );
                            "rooms_over_limit"
                        } else {
                            "ok"
                        };
                        crate::metrics::get().auth_decision("admitted", reason);
                        jwt
                    },
                )
            }
            (Err(why), BusAuth::Soft) => {
                tracing::warn!(client = ?request.client_nkey, host = ?request.client_host, "bus-auth soft: would deny: {why}");
                crate::metrics::get().auth_decision("would_deny", why.reason());
                callout::allow_response(&request, &open_permissions(), &self.issuer, None)
            }
            (Err(why), _) => {
                tracing::info!(client = ?request.client_nkey, host = ?request.client_host, "connection denied: {why}");
                crate::metrics::get().auth_decision("denied", why.reason());
                callout::deny_response(&request, &why.to_string(), &self.issuer)
            }
        };
        match signed {
            Ok(jwt) => Some(jwt),
            Err(e) => {
                tracing::error!("auth callout: cannot sign the response: {e}");
                None
            }
        }
    }

    /// Asks the peers' authenticators, until one answers, this node's own store opens,
    /// or `deadline` (the request's arrival plus [`HOLD`]) passes.
    async fn forward(
        &self,
        client: &async_nats::Client,
        raw: &[u8],
        deadline: tokio::time::Instant,
    ) -> Forwarded {
        let mut store = self.store.clone();
        loop {
            if let Some(own) = self.store() {
                return Forwarded::OwnStore(own);
            }
            let asked = tokio::time::timeout_at(
                deadline,
                client.request(FORWARD_SUBJECT, bytes::Bytes::copy_from_slice(raw)),
            )
            .await;
            match asked {
                Ok(Ok(answer)) => match String::from_utf8(answer.payload.to_vec()) {
                    Ok(jwt) => return Forwarded::Answer(jwt),
                    Err(_) => tracing::warn!("auth callout: a peer's answer is not UTF-8"),
                },
                // No peer with a store is reachable yet (routes still coming up): wait a
                // little, or for our own store.
                Ok(Err(e)) => tracing::debug!("auth callout: forwarding: {e}"),
                Err(_) => return Forwarded::Nobody,
            }
            let pause = tokio::time::Instant::now() + FORWARD_RETRY;
            tokio::select! {
                _ = store.changed() => {}
                _ = tokio::time::sleep_until(pause.min(deadline)) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Forwarded::Nobody;
            }
        }
    }

    /// [`Self::decide`], again every [`RETRY`] while the store cannot answer (a leader
    /// election), until `deadline`; then the last refusal stands.
    async fn decide_retrying(
        &self,
        store: &Store,
        request: &AuthRequest,
        deadline: tokio::time::Instant,
    ) -> Result<Permissions, Refusal> {
        loop {
            let refusal = match tokio::time::timeout_at(deadline, self.decide(store, request)).await
            {
                Ok(Err(why @ (Refusal::NoQuorum(_) | Refusal::Store(_)))) => why,
                Ok(decided) => return decided,
                Err(_) => {
                    return Err(Refusal::Store(StoreError::Unavailable(format!(
                        "no answer within {ANSWER_WITHIN:?}"
                    ))));
                }
            };
            if tokio::time::Instant::now() + RETRY >= deadline {
                return Err(refusal);
            }
            tracing::debug!("auth callout: {refusal}; retrying");
            tokio::time::sleep(RETRY).await;
        }
    }

    async fn decide(&self, store: &Store, request: &AuthRequest) -> Result<Permissions, Refusal> {
        let key = callout::verify_client_nonce(request).map_err(Refusal::BadSignature)?;
        // Reads are answered by stream leaders, and a leader cut off from its peers keeps
        // answering for seconds; admit only on reads a quorum still stands behind. The
        // barrier and both reads start together (one round trip on the KV store, not
        // three): if the barrier commits, those leaders held their quorum after this
        // request arrived, and the reads were all made after it arrived too.
        let (quorum, user, memberships) = tokio::join!(
            store.confirm_quorum(),
            store.get_user(&key),
            store.list_rooms_for_endpoint(&key)
        );
        quorum.map_err(Refusal::NoQuorum)?;
        // One read of the user answers both "active?" and "admin?"; any store error is a
        // refusal, so this fails closed exactly like `Store::is_authorized`.
        let admin = match user {
            Ok(user) if user.revoked_at.is_none() => user.admin,
            Ok(_) | Err(StoreError::NotFound { .. } | StoreError::Invalid { .. }) => {
                return Err(Refusal::Unknown(key));
            }
            Err(e) => return Err(Refusal::Store(e)),
        };
        let rooms: Vec<String> = memberships?
            .into_iter()
            .filter(|m| m.state == MemberState::Joined)
            .map(|m| m.room)
            .collect();
        let perms = callout::permissions_for(&key, &rooms, admin);
        if self.mode == BusAuth::Soft {
            // Soft admits with open permissions; show what enforce would grant.
            tracing::debug!(client = key, ?perms, "bus-auth soft: enforce would grant");
            return Ok(open_permissions());
        }
        Ok(perms)
    }
}

/// How forwarding a request ended.
enum Forwarded {
    /// A peer's signed answer, to pass on as is.
    Answer(String),
    /// This node's store opened meanwhile: decide here.
    OwnStore(Arc<Store>),
    /// Nobody answered within [`HOLD`].
    Nobody,
}

/// What `bus-auth=soft` grants: everything, except listening to the control plane's
/// requests. Nobody but the nodes needs those, and an envelope sent on its signer's own
/// subject skips the replay ledger on `enforce` nodes (`auth::envelope`), which is sound
/// only while no user can copy one: a cluster rolling from `soft` to `enforce` runs both.
fn open_permissions() -> Permissions {
    Permissions {
        pub_allow: vec![">".into()],
        sub_allow: vec![">".into()],
        sub_deny: vec![format!("{}.>", crate::membership::api::CTL_PREFIX)],
    }
}

/// How long a stopping authenticator keeps answering what already reached it.
const DRAIN: Duration = Duration::from_secs(2);

/// Answers callout requests until shutdown, then drains (see the loop). It subscribes to
/// the callout at once; once the store is in its slot it also answers peers' forwarded
/// requests and calls `ready`.
pub async fn run(
    client: async_nats::Client,
    authenticator: Arc<Authenticator>,
    ready: impl FnOnce(),
    mut shutdown: Shutdown,
) -> Result<(), async_nats::Error> {
    let requests = client
        .queue_subscribe(AUTH_SUBJECT, QUEUE_GROUP.to_string())
        .await?;
    client.flush().await?;
    // The forward subject is served only with a store: a peer that forwards must reach
    // someone who can decide, not another node that would forward again.
    let mut store = authenticator.store.clone();
    let mut ready = Some(ready);
    let mut requests = futures_util::stream::select_all([requests]);
    let mut in_flight = tokio::task::JoinSet::new();
    // Set once shutdown began: the deadline of the drain.
    let mut draining: Option<tokio::time::Instant> = None;
    loop {
        let deadline = draining.unwrap_or_else(tokio::time::Instant::now);
        let message = tokio::select! {
            next = requests.next() => match next {
                Some(m) => m,
                None => break,
            },
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => continue,
            changed = store.changed(), if ready.is_some() && draining.is_none() => {
                let filled = store.borrow().is_some();
                if changed.is_err() {
                    // The slot was dropped unfilled: the node is stopping before its store
                    // opened. Keep forwarding until shutdown says so.
                    ready = None;
                } else if filled && let Some(ready) = ready.take() {
                    let forwarded = client
                        .queue_subscribe(FORWARD_SUBJECT, QUEUE_GROUP.to_string())
                        .await?;
                    client.flush().await?;
                    requests.push(forwarded);
                    ready();
                }
                continue;
            }
            _ = shutdown.wait(), if draining.is_none() => {
                // Leave the queue groups, so the servers ask the other nodes, but answer
                // what already reached this connection: the subscriptions still yield
                // those, then end. A connection whose callout goes unanswered waits out
                // the server's callout timeout and fails.
                draining = Some(tokio::time::Instant::now() + DRAIN);
                let mut drained = true;
                for sub in requests.iter_mut() {
                    drained &= sub.drain().await.is_ok();
                }
                if !drained {
                    break;
                }
                continue;
            }
            _ = tokio::time::sleep_until(deadline), if draining.is_some() => break,
        };
        let Some(reply) = message.reply.clone() else {
            continue;
        };
        let (client, authenticator) = (client.clone(), authenticator.clone());
        in_flight.spawn(async move {
            if let Some(jwt) = authenticator.respond(&client, &message.payload).await
                && let Err(e) = client.publish(reply, jwt.into()).await
            {
                tracing::warn!("auth callout: reply not sent: {e}");
            }
        });
    }
    // The answers in flight, then a flush so they leave before the connection closes;
    // bounded, as a flush without a server would wait for a reconnect.
    let deadline = draining.unwrap_or_else(|| tokio::time::Instant::now() + DRAIN);
    let drained = tokio::time::timeout_at(deadline, async {
        while in_flight.join_next().await.is_some() {}
        let _ = client.flush().await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!("auth callout: answers still in flight after {DRAIN:?}; stopping anyway");
    }
    Ok(())
}
