//! Security building blocks: keys, cluster secrets, the signed control-plane envelope, the
//! auth callout and the nats-server config that ties them together.
//!
//! # The trust chain
//!
//! ```text
//! cluster secrets (written once, shared by every node)
//!   ├─ issuer.seed   account key A…   signs every admission (callout responses, user JWTs)
//!   ├─ service.seed  user key U…      the nodes' own identity, listed in `auth_users`
//!   ├─ admin.seed    user key U…      bootstrap admin, put into the store on first boot
//!   ├─ system.seed   user key U…      system-account user: finds and kicks live connections
//!   ├─ ca.crt/key, NODE.crt/key       TLS for clients (who pin ca.crt) and routes (mutual)
//!   └─ routes.json                    user/password routes present to each other
//! ```
//!
//! - **The service user bypasses the callout.** It is in `auth_users`, so nats-server
//!   admits it by its nkey alone into the `AUTH` account. That is how a node reaches its
//!   store and answers `$SYS.REQ.USER.AUTH` before the authenticator exists: no
//!   chicken-and-egg. Nothing else lives in `AUTH`, so no client can read or forge callout
//!   traffic, and the store's buckets (JetStream is enabled in `AUTH`) are out of `APP`'s reach.
//! - **Everyone else goes through the callout** ([`callout`]): the node proves the client
//!   holds its nkey (signature over the server's nonce), looks it up in the store, and
//!   answers with a user JWT signed by the issuer key, landing the client in `APP` with
//!   exactly its rooms' subjects (DESIGN §3).
//! - **The issuer key is shared** by all nodes, so any node's authenticator can answer any
//!   server's request (the subscription is a queue group across the cluster).
//! - **Fail closed.** An error, a timeout, a missing answer or an unknown key is a denial:
//!   nats-server itself refuses a client whose callout gets no valid answer within its
//!   timeout, and the authenticator answers a store error with [`callout::deny_response`].
//! - **Live revocation** ([`revoke`]): when a user loses rights, the node finds that user's
//!   connections on every server (`CONNZ` over the system account) and disconnects them
//!   (`KICK`); the client reconnects and the callout computes its permissions afresh.
//! - **Control-plane requests are signed** by the caller's nkey ([`envelope`]), so the
//!   membership service knows who asks independently of the connection's identity.
//!
//! Everything here is plain functions and data; wiring into the node lives in `node`.

pub mod authenticator;
pub mod callout;
pub mod certs;
pub mod envelope;
pub mod jwt;
pub mod keys;
pub mod random;
pub mod revoke;
pub mod server_config;

pub use callout::{
    AuthRequest, CalloutError, Permissions, allow_response, decode_request, deny_response,
    permissions_for, verify_client_nonce,
};
pub use certs::{ClusterSecrets, dev_secrets, init_cluster};
pub use envelope::{Envelope, EnvelopeError, Limits, ReplayCache, Verified};
pub use server_config::{callout_config, route_authorization, route_tls_config, tls_config};

/// The system's random number generator failed (practically never; reported, not unwrapped).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the system random number generator failed")]
pub struct RandomError;

/// Fills `buf` from the operating system's CSPRNG.
pub(crate) fn fill_random(buf: &mut [u8]) -> Result<(), RandomError> {
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), buf).map_err(|_| RandomError)
}
