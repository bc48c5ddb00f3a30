//! unibus: a secure message bus for endpoints that talk in rooms.
//!
//! One binary is a cluster node, the operator's CLI and a client library. A node
//! supervises a local `nats-server` (the data plane), keeps the control plane (users,
//! rooms, members, room keys) in a [`membership`] store and admits NATS connections only
//! after checking that store. The shared picture lives in `DESIGN.md`; this crate is laid
//! out a folder per concept:
//!
//! - [`auth`]: keys, cluster secrets, the signed control-plane envelope, the auth callout;
//! - [`config`]: figment layers (defaults, `unibus.toml`, `UNIBUS_*`, CLI) and feature flags;
//! - [`node`]: the node runtime: nats-server supervision, lifecycle, admin HTTP;
//! - [`membership`]: the control-plane store (SQLite or replicated JetStream KV);
//! - [`client`]: the client library (control plane, rooms, durable feeds, E2E encryption).
//! - [`membership`]: the control-plane store (SQLite or replicated JetStream KV).
//! - [`workload`]: load and a history checker for the deploy demos.
pub mod auth;
pub mod bench;
pub mod client;
pub mod config;
pub mod localnet;
pub mod membership;
pub mod metrics;
pub mod node;
pub mod workload;
