//! Fault workloads on a three-node cluster at R3 (values, lower is better):
//!
//! - `rolling_restart_gap_s`: a writer does signed control-plane writes (`users.add`, then
//!   `members.invite`: the `users`, `members` and `rooms_by_member` buckets) while each node in
//!   turn gets SIGTERM (lame duck), exits, is started again on its data dir and becomes
//!   ready, and every bucket is back at three current replicas before the next node goes.
//!   The value is the longest gap between two acknowledged writes.
//! - `leader_kill_gap_s`: the same writer while the node holding the `members` bucket's
//!   Raft leader is killed with SIGKILL (its nats-server too): the longest gap between
//!   acknowledged writes. `users.add` does not need `members`, so once a `members.invite`
//!   fails fast (the store retries within `op_timeout`, then reports `unavailable`) the
//!   writer's next `users.add` is acknowledged: the value is how long any write stalls.
//!   The longest gap between acknowledged invites alone, printed beside it, is the
//!   election as a writer of `members` sees it (DESIGN.md §13 saw 4.8–7.9 s for a bare KV
//!   stream); there is no separate raw twin.
//! - `revocation_p99_s`: a member listens through node 3; its owner removes it through
//!   node 1; the time from sending `members.remove` until the member's connection is
//!   kicked (async-nats reports the disconnect), p99 over the repetitions.
//!
//! Destructive workloads run last on their cluster: after `leader_kill_gap_s` one node is
//! gone.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::{Workload, client, ctl::create_room, raw_connection, seed_of, value_workload};
use crate::client::{Client, ClientError, ClientOptions};
use crate::localnet::{LocalCluster, Node, http_get, poll};
use crate::membership::api;
use crate::membership::jetstream::{KvOptions, KvStore};

/// A writer doing control-plane writes in a loop, recording when each was acknowledged:
/// `users.add` of a fresh key (the `users` bucket), then `members.invite` of it into one
/// room (`members` and `rooms_by_member`). Neither grows the writer's own room list, so its
/// reconnects (the auth callout lists the user's rooms) stay as cheap as at the start.
struct Writer {
    acks: Arc<std::sync::Mutex<Vec<Instant>>>,
    /// The `members.invite` acks alone: the `members` bucket as a writer sees it.
    invites: Arc<std::sync::Mutex<Vec<Instant>>>,
    /// Failed calls, with when they failed (to explain the gaps in the write-up).
    errors: Arc<std::sync::Mutex<Vec<(Instant, String)>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
    started: Instant,
}

impl Writer {
    async fn start(client: Client, room: &str) -> Result<Writer, String> {
        create_room(&client, room).await?;
        let acks = Arc::new(std::sync::Mutex::new(Vec::new()));
        let invites = Arc::new(std::sync::Mutex::new(Vec::new()));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, i, e, s) = (acks.clone(), invites.clone(), errors.clone(), stop.clone());
        let room = room.to_string();
        let task = tokio::spawn(async move {
            let ack = |invite: bool| {
                let now = Instant::now();
                if let Ok(mut a) = a.lock() {
                    a.push(now);
                }
                if invite && let Ok(mut i) = i.lock() {
                    i.push(now);
                }
            };
            let failed = |what: &str, err: ClientError| {
                if let Ok(mut e) = e.lock() {
                    e.push((Instant::now(), format!("{what}: {err}")));
                }
            };
            while !s.load(Ordering::Relaxed) {
                let key = nkeys::KeyPair::new_user().public_key();
                if let Err(err) = client.add_user(&key, "w", false).await {
                    failed("users.add", err);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                ack(false);
                let body = api::MemberRef {
                    room: room.clone(),
                    key,
                };
                match client
                    .call::<_, serde_json::Value>(api::Op::MembersInvite, &body)
                    .await
                {
                    Ok(_) => ack(true),
                    Err(err) => {
                        failed("members.invite", err);
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                }
            }
        });
        Ok(Writer {
            acks,
            invites,
            errors,
            stop,
            task,
            started: Instant::now(),
        })
    }

    fn acked_since(&self, t: Instant) -> usize {
        self.acks
            .lock()
            .map(|a| a.iter().filter(|x| **x > t).count())
            .unwrap_or(0)
    }

    /// Waits until `n` writes were acknowledged after `t`, or `limit` passes.
    async fn wait_acks_after(&self, t: Instant, n: usize, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.acked_since(t) >= n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// Stops the writer and says how it fared (see [`Finished`]).
    async fn finish(self) -> Finished {
        self.stop.store(true, Ordering::Relaxed);
        let end = Instant::now();
        let _ = self.task.await;
        let acks = self.acks.lock().map(|a| a.clone()).unwrap_or_default();
        let invites = self.invites.lock().map(|i| i.clone()).unwrap_or_default();
        let errors = self.errors.lock().map(|e| e.clone()).unwrap_or_default();
        Finished {
            gap: longest_gap(self.started, &acks, end),
            invite_gap: longest_gap(self.started, &invites, end),
            acks,
            errors,
        }
    }
}

/// What a stopped [`Writer`] saw. Gaps count the start and the stop as edges, so a
/// writer that stalls to the end is measured too.
struct Finished {
    /// The longest gap between acknowledged writes of either kind (the workload's value).
    gap: f64,
    /// The longest gap between acknowledged `members.invite`s alone. While one bucket has
    /// no leader, writes to the others still succeed; this is the one bucket's view.
    invite_gap: f64,
    acks: Vec<Instant>,
    errors: Vec<(Instant, String)>,
}

/// The longest interval between consecutive instants of `start`, `acks…`, `end`.
fn longest_gap(start: Instant, acks: &[Instant], end: Instant) -> f64 {
    let mut edges = Vec::with_capacity(acks.len() + 2);
    edges.push(start);
    edges.extend(acks.iter().copied().filter(|a| *a <= end));
    edges.push(end);
    edges.sort();
    edges
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).as_secs_f64())
        .fold(0.0, f64::max)
}

/// A writer's client: every node, `first` first, with a short request timeout so a
/// request lost in a failover is retried soon (the server's own store timeout is 2 s).
async fn writer_client(cluster: &LocalCluster, first: usize) -> Result<Client, String> {
    let mut listens: Vec<String> = vec![cluster.nodes[first].ports.listen.clone()];
    listens.extend(
        cluster
            .nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != first)
            .map(|(_, n)| n.ports.listen.clone()),
    );
    let mut options = ClientOptions::new(
        listens.iter().map(|l| format!("tls://{l}")),
        cluster.secrets.join(crate::auth::certs::ADMIN_SEED),
    )
    .ca(cluster.secrets.join(crate::auth::certs::CA_CERT));
    options.retain_order = true;
    options.request_timeout = Duration::from_millis(2500);
    options.name = Some("unibus-bench-writer".into());
    Client::connect(options).await.map_err(|e| e.to_string())
}

/// The store as the service identity, through every node (for bucket status).
async fn store(cluster: &LocalCluster) -> Result<KvStore, String> {
    let listens: Vec<&str> = cluster
        .nodes
        .iter()
        .map(|n| n.ports.listen.as_str())
        .collect();
    let service = raw_connection(
        &cluster.secrets,
        &listens,
        seed_of(&cluster.secrets.join(crate::auth::certs::SERVICE_SEED))?,
    )
    .await?;
    KvStore::open(
        service,
        KvOptions {
            create: false,
            replicas: 3,
            ..KvOptions::default()
        },
    )
    .await
    .map_err(|e| e.to_string())
}

async fn wait_ready(node: &Node, limit: Duration) -> Result<(), String> {
    let (http, name) = (node.ports.http.clone(), node.name.clone());
    tokio::task::spawn_blocking(move || {
        poll(limit, || {
            http_get(&http, "/readyz").filter(|(s, _)| *s == 200)
        })
    })
    .await
    .map_err(|e| e.to_string())?
    .map(|_| ())
    .ok_or_else(|| format!("node {name} not ready within {limit:?}"))
}

async fn wait_exit(node: &mut Node, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        match node.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(Some(_))) | None => return Ok(()),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    Err(format!("node {} did not exit within {limit:?}", node.name))
}

/// `rolling_restart_gap_s` on `cluster` (every node is restarted, the cluster stays whole).
pub async fn rolling_restart(cluster: &mut LocalCluster) -> Result<Workload, String> {
    let kv = store(cluster).await?;
    let writer = Writer::start(writer_client(cluster, 0).await?, "roll").await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut stopped = Vec::new();
    for i in 0..cluster.nodes.len() {
        let node = &mut cluster.nodes[i];
        stopped.push(Instant::now());
        node.signal(libc::SIGTERM);
        wait_exit(node, Duration::from_secs(60)).await?;
        node.respawn();
        wait_ready(node, Duration::from_secs(60)).await?;
        kv.wait_replicas_current(Duration::from_secs(60))
            .await
            .map_err(|e| e.to_string())?;
    }
    writer
        .wait_acks_after(Instant::now(), 10, Duration::from_secs(10))
        .await;
    let Finished {
        gap,
        invite_gap,
        acks: times,
        errors,
    } = writer.finish().await;
    eprintln!(
        "bench: rolling restart: {} writes acknowledged, longest gap {gap:.2}s (between invites: {invite_gap:.2}s)",
        times.len()
    );
    if let (Some(first), Some(t0)) = (times.first(), stopped.first()) {
        eprintln!(
            "bench:   first write acknowledged {:.2}s before the first SIGTERM",
            t0.duration_since(*first).as_secs_f64()
        );
    }
    // Where the long gaps were, relative to the SIGTERM before them (for the write-up).
    for w in times.windows(2) {
        let len = w[1].duration_since(w[0]).as_secs_f64();
        if len < 0.5 {
            continue;
        }
        match stopped.iter().rposition(|t| *t <= w[0]) {
            Some(i) => eprintln!(
                "bench:   gap {len:.2}s from {:.2}s after node {}'s SIGTERM",
                w[0].duration_since(stopped[i]).as_secs_f64(),
                i + 1
            ),
            None => eprintln!("bench:   gap {len:.2}s before the first SIGTERM"),
        }
        // What the writer was told during the gap: which call stalled, and why.
        for (at, err) in errors.iter().filter(|(at, _)| *at > w[0] && *at <= w[1]) {
            eprintln!(
                "bench:     failed {:.2}s into the gap: {err}",
                at.duration_since(w[0]).as_secs_f64()
            );
        }
    }
    keep_logs(cluster);
    Ok(value_workload("rolling_restart_gap_s", gap, None, "s"))
}

/// Copies every node's log into the directory `UNIBUS_BENCH_LOGS` names, if set (the
/// nodes' own dirs are temporary), to see from the nodes' side where a gap came from.
fn keep_logs(cluster: &LocalCluster) {
    let Some(dir) = std::env::var_os("UNIBUS_BENCH_LOGS") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    for node in &cluster.nodes {
        let path = dir.join(format!("{}.log", node.name));
        if let Err(e) =
            std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&path, node.log()))
        {
            eprintln!("bench: cannot keep {}: {e}", path.display());
        }
    }
}

/// `leader_kill_gap_s` on `cluster` (leaves one node dead).
pub async fn leader_kill(cluster: &mut LocalCluster) -> Result<Workload, String> {
    let kv = store(cluster).await?;
    let leader = kv
        .bucket_status()
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|b| b.bucket == "members")
        .and_then(|b| b.leader)
        .ok_or("the members bucket has no leader")?;
    let victim = cluster
        .nodes
        .iter()
        .position(|n| n.name == leader)
        .ok_or_else(|| format!("no node named {leader}"))?;
    // The writer goes through a survivor: this measures the election, not a reconnect.
    let writer = Writer::start(
        writer_client(cluster, (victim + 1) % cluster.nodes.len()).await?,
        "kill",
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let node = &mut cluster.nodes[victim];
    let killed = Instant::now();
    if let Some(nats) = node.nats_pid() {
        crate::localnet::kill(nats, libc::SIGKILL);
    }
    node.signal(libc::SIGKILL);
    let recovered = writer
        .wait_acks_after(killed, 10, Duration::from_secs(30))
        .await;
    let Finished {
        gap,
        invite_gap,
        acks,
        ..
    } = writer.finish().await;
    eprintln!(
        "bench: leader kill ({leader}): {} writes acknowledged, longest gap {gap:.2}s (between invites: {invite_gap:.2}s){}",
        acks.len(),
        if recovered {
            ""
        } else {
            " (writes had not resumed after 30 s)"
        }
    );
    Ok(value_workload("leader_kill_gap_s", gap, None, "s"))
}

/// `revocation_p99_s` on `cluster`, over `reps` removals.
pub async fn revocation(cluster: &LocalCluster, reps: usize) -> Result<Workload, String> {
    let secrets = &cluster.secrets;
    let (n1, n3) = (
        cluster.nodes[0].ports.listen.as_str(),
        cluster.nodes[2].ports.listen.as_str(),
    );
    let owner = client(
        secrets,
        &[n1],
        &secrets.join(crate::auth::certs::ADMIN_SEED),
    )
    .await?;
    owner
        .create_room("revoke", "", false)
        .await
        .map_err(|e| e.to_string())?;
    let scratch = tempfile::tempdir().map_err(|e| e.to_string())?;
    let member_key = nkeys::KeyPair::new_user();
    let seed_file = scratch.path().join("member.seed");
    crate::auth::keys::write_seed(&seed_file, &member_key).map_err(|e| e.to_string())?;
    let public = member_key.public_key();
    owner
        .add_user(&public, "member", false)
        .await
        .map_err(|e| e.to_string())?;
    let member = client(secrets, &[n3], &seed_file).await?;

    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        owner
            .invite("revoke", &public)
            .await
            .map_err(|e| e.to_string())?;
        join_retrying(&member, "revoke").await?;
        // The listening connection, after the join so its permissions include the room.
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let listener = crate::client::nkey_options(&member_key.seed().map_err(|e| e.to_string())?)?
            .require_tls(true)
            .add_root_certificates(secrets.join(crate::auth::certs::CA_CERT))
            .max_reconnects(Some(0))
            .event_callback(move |event| {
                let tx = events_tx.clone();
                async move {
                    if matches!(event, async_nats::Event::Disconnected) {
                        let _ = tx.send(Instant::now());
                    }
                }
            })
            .connect(format!("tls://{n3}"))
            .await
            .map_err(|e| e.to_string())?;
        let mut sub = listener
            .subscribe(format!("{}.revoke.>", api::ROOM_PREFIX))
            .await
            .map_err(|e| e.to_string())?;
        listener.flush().await.map_err(|e| e.to_string())?;
        let drain = tokio::spawn(async move { while sub.next().await.is_some() {} });
        let sent = Instant::now();
        owner
            .remove_member("revoke", &public)
            .await
            .map_err(|e| e.to_string())?;
        let kicked = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .ok()
            .flatten();
        drain.abort();
        match kicked {
            Some(at) => times.push(at.duration_since(sent).as_secs_f64()),
            None => return Err("the removed member's connection was not kicked in 10 s".into()),
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let p99 = times[((times.len() - 1) as f64 * 0.99).round() as usize];
    let mut w = value_workload("revocation_p99_s", p99, None, "s");
    w.p50_ms = Some(times[times.len() / 2] * 1000.0);
    w.p99_ms = Some(p99 * 1000.0);
    Ok(w)
}

/// `members.join`, retried while the member's own connection is being kicked (it was
/// removed a moment ago) and reconnects.
async fn join_retrying(member: &Client, room: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match member.join(room).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("join retried: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_gap_counts_the_edges() {
        let t = Instant::now();
        let s = |x: u64| t + Duration::from_millis(x);
        assert_eq!(longest_gap(t, &[s(100), s(200), s(1200)], s(1300)), 1.0);
        assert_eq!(longest_gap(t, &[], s(500)), 0.5);
        assert_eq!(longest_gap(t, &[s(100)], s(2100)), 2.0);
    }
}
