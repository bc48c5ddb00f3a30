//! Live revocation: disconnect the connections of users who just lost rights, on every
//! server of the cluster, so they reconnect and the callout computes their permissions
//! afresh (DESIGN §3: within 2 s, cluster-wide).
//!
//! Why a disconnect: nats-server fixes a connection's permissions when it is admitted (the
//! user JWT the callout returned), and a config-mode server has no way to amend them later.
//! Closing the connection is the one lever that works for callout users; a well-behaved
//! client reconnects at once and gets exactly what the store now says (or is refused). The
//! callout refusing new connections does not depend on any of this, so revocation stays
//! safe when a kick is lost — it is the *live* half that is best-effort.
//!
//! How (system requests, nats-server 2.10+, checked on 2.15.1), over a connection as the
//! system-account user (`system.seed`):
//!
//! 1. **Find.** Publish `$SYS.REQ.SERVER.PING.CONNZ` with `{"auth": true, "acc": "APP",
//!    "limit": N}` and a reply inbox; *every* server in the cluster answers with
//!    `{"server": {"id", "name", …}, "data": {"server_id", "total", "offset", "limit",
//!    "num_connections", "connections": [{"cid", "authorized_user", "name_tag", …}]}}` (or
//!    `"error": {"code", "description"}`). For a callout-admitted client `authorized_user`
//!    is the nkey the client presented, which the callout verified (nonce signature) before
//!    admitting it — the key to match. (Checked on 2.15.1: `name_tag` shows the account,
//!    `"APP"`, not the user JWT's `name`; the connection `name` is chosen by the client and
//!    never trusted.) More connections than one page are fetched with
//!    `$SYS.REQ.SERVER.<id>.CONNZ` and an `offset`.
//! 2. **Kick.** For each match, request `$SYS.REQ.SERVER.<server id>.KICK` with
//!    `{"cid": N}`; the server closes that connection and answers `{"server": …}` (with
//!    `"error"` when it has no such client, e.g. it left meanwhile — counted, not fatal).
//!
//! Nobody says how many servers will answer a PING, so answers are read until a window
//! passes; each server's matches are kicked as soon as its answer arrives, so the window
//! bounds only how long the report takes, never how long a kick waits. Every request is
//! bounded by `timeout`.
//!
//! `bus-auth=soft` admits everyone with open permissions, so a kick would only interrupt
//! them: soft finds the connections and logs what enforce would disconnect.
//!
//! Known gap: a connection whose callout answer was computed just *before* the store
//! change but registered at its server just *after* the CONNZ sweep keeps its old
//! permissions until it reconnects (a window of milliseconds; a second sweep later would
//! close it).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::json;

use super::callout::APP_ACCOUNT;
use crate::config::BusAuth;

/// Connections asked for per CONNZ page.
const PAGE: usize = 1024;

/// Why a revocation sweep could not run at all (per-connection failures are in the report).
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    #[error("system request {subject}: {detail}")]
    Request { subject: String, detail: String },
}

/// What one sweep did, for the log (and tests).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Servers that answered the CONNZ ping.
    pub servers: BTreeSet<String>,
    /// Connections found for the keys, as (server name, cid).
    pub found: Vec<(String, u64)>,
    /// Connections the servers confirmed closing.
    pub kicked: usize,
    /// Kicks refused or unanswered (the connection may already be gone).
    pub failed: Vec<String>,
}

/// Finds and disconnects users' connections through the system account.
pub struct Revoker {
    client: async_nats::Client,
    mode: BusAuth,
    /// Bound on each system request.
    timeout: Duration,
    /// How long CONNZ answers are collected.
    window: Duration,
}

#[derive(Deserialize)]
struct ApiResponse<T> {
    server: Option<ServerInfo>,
    data: Option<T>,
    error: Option<ApiError>,
}

#[derive(Deserialize)]
struct ServerInfo {
    id: String,
    #[serde(default)]
    name: String,
}

#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    code: i64,
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
struct Connz {
    #[serde(default)]
    total: usize,
    #[serde(default)]
    offset: usize,
    #[serde(default)]
    connections: Vec<ConnInfo>,
}

#[derive(Deserialize)]
struct ConnInfo {
    cid: u64,
    #[serde(default)]
    authorized_user: String,
}

impl ConnInfo {
    fn belongs_to(&self, keys: &BTreeSet<String>) -> bool {
        keys.contains(&self.authorized_user)
    }
}

impl Revoker {
    /// `client` must be connected as a system-account user.
    pub fn new(
        client: async_nats::Client,
        mode: BusAuth,
        timeout: Duration,
        window: Duration,
    ) -> Self {
        Revoker {
            client,
            mode,
            timeout,
            window,
        }
    }

    /// Runs one sweep for `keys` and logs what it did; errors are logged, not returned
    /// (the caller has already answered its request).
    pub async fn revoke_and_log(&self, keys: Vec<String>) {
        let started = Instant::now();
        match self.revoke(&keys).await {
            Ok(r) if self.mode == BusAuth::Soft => tracing::info!(
                ?keys,
                servers = r.servers.len(),
                connections = ?r.found,
                "bus-auth soft: would disconnect these connections (permissions changed)"
            ),
            Ok(r) => {
                let level_warn = !r.failed.is_empty();
                if level_warn {
                    tracing::warn!(?keys, servers = r.servers.len(), found = ?r.found, kicked = r.kicked, failed = ?r.failed, elapsed = ?started.elapsed(), "live revocation: some kicks failed (the connections may have left already)");
                } else {
                    tracing::info!(?keys, servers = r.servers.len(), found = ?r.found, kicked = r.kicked, elapsed = ?started.elapsed(), "live revocation: disconnected the users' connections");
                }
            }
            Err(e) => tracing::warn!(
                ?keys,
                "live revocation failed: {e}; their live connections keep their permissions until they reconnect"
            ),
        }
    }

    /// Finds every connection of `keys` (user public keys, any case) in `APP` on every
    /// server that answers within the window, and (with `enforce`) kicks each.
    pub async fn revoke(&self, keys: &[String]) -> Result<Report, RevokeError> {
        let keys: BTreeSet<String> = keys.iter().map(|k| k.to_ascii_uppercase()).collect();
        let mut report = Report::default();
        if keys.is_empty() {
            return Ok(report);
        }
        let subject = "$SYS.REQ.SERVER.PING.CONNZ";
        let err = |detail: String| RevokeError::Request {
            subject: subject.to_string(),
            detail,
        };
        let inbox = self.client.new_inbox();
        let mut answers = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| err(e.to_string()))?;
        self.client
            .publish_with_reply(subject, inbox, connz_request(0).into())
            .await
            .map_err(|e| err(e.to_string()))?;
        self.client.flush().await.map_err(|e| err(e.to_string()))?;

        let deadline = tokio::time::Instant::now() + self.window;
        let mut kicks = tokio::task::JoinSet::new();
        while let Ok(Some(message)) = tokio::time::timeout_at(deadline, answers.next()).await {
            let Ok(answer) = serde_json::from_slice::<ApiResponse<Connz>>(&message.payload) else {
                tracing::debug!("live revocation: unreadable CONNZ answer ignored");
                continue;
            };
            let Some(server) = answer.server else {
                continue;
            };
            if let Some(e) = answer.error {
                report.failed.push(format!(
                    "{}: connz {}: {}",
                    server.name, e.code, e.description
                ));
                continue;
            }
            report.servers.insert(server.name.clone());
            let mut page = answer.data;
            while let Some(connz) = page.take() {
                let seen = connz.offset + connz.connections.len();
                for conn in connz.connections.iter().filter(|c| c.belongs_to(&keys)) {
                    report.found.push((server.name.clone(), conn.cid));
                    if self.mode == BusAuth::Enforce {
                        let (client, timeout) = (self.client.clone(), self.timeout);
                        let (id, name, cid) = (server.id.clone(), server.name.clone(), conn.cid);
                        kicks.spawn(async move {
                            kick(&client, &id, cid, timeout)
                                .await
                                .map_err(|e| format!("{name} cid {cid}: {e}"))
                        });
                    }
                }
                if seen < connz.total && !connz.connections.is_empty() {
                    match self.connz_page(&server.id, seen).await {
                        Ok(next) => page = next,
                        Err(e) => report.failed.push(format!("{}: {e}", server.name)),
                    }
                }
            }
        }
        while let Some(done) = kicks.join_next().await {
            match done {
                Ok(Ok(())) => report.kicked += 1,
                Ok(Err(e)) => report.failed.push(e),
                Err(e) => report.failed.push(format!("kick task: {e}")),
            }
        }
        Ok(report)
    }

    /// One further CONNZ page from one server.
    async fn connz_page(&self, server_id: &str, offset: usize) -> Result<Option<Connz>, String> {
        let subject = format!("$SYS.REQ.SERVER.{server_id}.CONNZ");
        let answer: ApiResponse<Connz> =
            system_request(&self.client, subject, connz_request(offset), self.timeout).await?;
        match answer.error {
            Some(e) => Err(format!("connz {}: {}", e.code, e.description)),
            None => Ok(answer.data),
        }
    }
}

fn connz_request(offset: usize) -> String {
    json!({ "auth": true, "acc": APP_ACCOUNT, "limit": PAGE, "offset": offset }).to_string()
}

/// Asks server `server_id` to close connection `cid`.
async fn kick(
    client: &async_nats::Client,
    server_id: &str,
    cid: u64,
    timeout: Duration,
) -> Result<(), String> {
    let subject = format!("$SYS.REQ.SERVER.{server_id}.KICK");
    let answer: ApiResponse<serde_json::Value> =
        system_request(client, subject, json!({ "cid": cid }).to_string(), timeout).await?;
    match answer.error {
        Some(e) => Err(format!("kick {}: {}", e.code, e.description)),
        None => Ok(()),
    }
}

async fn system_request<T: for<'de> Deserialize<'de>>(
    client: &async_nats::Client,
    subject: String,
    body: String,
    timeout: Duration,
) -> Result<ApiResponse<T>, String> {
    let reply = tokio::time::timeout(timeout, client.request(subject, body.into()))
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&reply.payload).map_err(|e| format!("unreadable answer: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connz_answers_parse_and_match_on_the_verified_key_only() {
        let raw = br#"{"server":{"name":"n1","host":"0.0.0.0","id":"NABC","ver":"2.15.1"},
            "data":{"server_id":"NABC","now":"2025-01-01T00:00:00Z","num_connections":3,
            "total":3,"offset":0,"limit":1024,"connections":[
              {"cid":5,"name":"UAAA","authorized_user":"UBBB","name_tag":"APP","account":"APP"},
              {"cid":6,"authorized_user":"UCCC","account":"APP"},
              {"cid":7,"name":"UBBB","account":"APP"}]}}"#;
        let answer: ApiResponse<Connz> = serde_json::from_slice(raw).unwrap();
        assert_eq!(answer.server.as_ref().unwrap().id, "NABC");
        let keys: BTreeSet<String> = ["UBBB".to_string(), "UCCC".to_string()].into();
        let hits: Vec<u64> = answer
            .data
            .unwrap()
            .connections
            .iter()
            .filter(|c| c.belongs_to(&keys))
            .map(|c| c.cid)
            .collect();
        // cid 7 only *names* itself UBBB (client-chosen): not a match.
        assert_eq!(hits, vec![5, 6]);

        let error: ApiResponse<serde_json::Value> = serde_json::from_slice(
            br#"{"server":{"name":"n1","id":"NABC"},"error":{"code":500,"description":"client not found"}}"#,
        )
        .unwrap();
        assert_eq!(error.error.unwrap().description, "client not found");
    }

    #[test]
    fn the_connz_request_asks_for_app_with_auth_details() {
        let v: serde_json::Value = serde_json::from_str(&connz_request(1024)).unwrap();
        assert_eq!(v["auth"], true);
        assert_eq!(v["acc"], "APP");
        assert_eq!(v["offset"], 1024);
    }
}
