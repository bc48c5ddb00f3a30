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
//! `bus-auth=soft` runs the same checks but admits everyone with open permissions,
//! logging each would-be denial with its reason (and counting it in `/metrics`), so an operator can see who
//! would break before turning `enforce` on.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use nkeys::KeyPair;

use super::callout::{self, AuthRequest, Permissions};
use crate::config::BusAuth;
use crate::membership::{MemberState, Store, StoreError};
use crate::node::shutdown::Shutdown;

/// The subject nats-server sends callout requests on.
pub const AUTH_SUBJECT: &str = "$SYS.REQ.USER.AUTH";
const QUEUE_GROUP: &str = "unibus-authenticator";

pub struct Authenticator {
    store: Arc<Store>,
    issuer: KeyPair,
    mode: BusAuth,
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
}

impl Refusal {
    /// A short, stable reason for metrics.
    fn reason(&self) -> &'static str {
        match self {
            Refusal::BadSignature(_) => "bad_signature",
            Refusal::Unknown(_) => "unknown_key",
            Refusal::NoQuorum(_) => "no_quorum",
            Refusal::Store(_) => "store_unavailable",
        }
    }
}

impl Authenticator {
    pub fn new(store: Arc<Store>, issuer: KeyPair, mode: BusAuth) -> Self {
        Authenticator {
            store,
            issuer,
            mode,
        }
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

    /// The response JWT for one raw request, or None when the request cannot be decoded
    /// (the server then times out and denies).
    pub async fn respond(&self, raw: &[u8]) -> Option<String> {
        let request = match callout::decode_request(raw) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(
                    "auth callout: undecodable request, not answering (the server will deny): {e}"
                );
                return None;
            }
        };
        let decision = self.decide(&request).await;
        let signed = match (decision, self.mode) {
            (Ok(perms), _) => {
                crate::metrics::get().auth_decision("admitted", "ok");
                callout::allow_response(&request, &perms, &self.issuer, None)
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

    async fn decide(&self, request: &AuthRequest) -> Result<Permissions, Refusal> {
        let key = callout::verify_client_nonce(request).map_err(Refusal::BadSignature)?;
        // Reads are answered by stream leaders, and a leader cut off from its peers keeps
        // answering for seconds; admit only on reads a quorum still stands behind.
        self.store
            .confirm_quorum()
            .await
            .map_err(Refusal::NoQuorum)?;
        // One read of the user answers both "active?" and "admin?"; any store error is a
        // refusal, so this fails closed exactly like `Store::is_authorized`.
        let admin = match self.store.get_user(&key).await {
            Ok(user) if user.revoked_at.is_none() => user.admin,
            Ok(_) | Err(StoreError::NotFound { .. } | StoreError::Invalid { .. }) => {
                return Err(Refusal::Unknown(key));
            }
            Err(e) => return Err(Refusal::Store(e)),
        };
        let rooms: Vec<String> = self
            .store
            .list_rooms_for_endpoint(&key)
            .await?
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

fn open_permissions() -> Permissions {
    Permissions {
        pub_allow: vec![">".into()],
        sub_allow: vec![">".into()],
    }
}

/// How long a stopping authenticator keeps answering what already reached it.
const DRAIN: Duration = Duration::from_secs(2);

/// Answers callout requests until shutdown, then drains (see the loop); calls `ready`
/// once the subscription is in place at the server.
pub async fn run(
    client: async_nats::Client,
    authenticator: Arc<Authenticator>,
    ready: impl FnOnce(),
    mut shutdown: Shutdown,
) -> Result<(), async_nats::Error> {
    let mut requests = client
        .queue_subscribe(AUTH_SUBJECT, QUEUE_GROUP.to_string())
        .await?;
    client.flush().await?;
    ready();
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
            _ = shutdown.wait(), if draining.is_none() => {
                // Leave the queue group, so the servers ask the other nodes, but answer
                // what already reached this connection: the subscription still yields
                // those, then ends. A connection whose callout goes unanswered waits out
                // the server's callout timeout (2 s) and fails.
                draining = Some(tokio::time::Instant::now() + DRAIN);
                if requests.drain().await.is_err() {
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
            if let Some(jwt) = authenticator.respond(&message.payload).await
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
