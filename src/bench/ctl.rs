//! Control-plane workloads, each beside its raw NATS twin on the same servers:
//!
//! - `ctl_read`: signed `users.get`, `members.rooms`, `rooms.get` on a single default node
//!   (SQLite, enforce, TLS) vs bare request/reply between two clients of the same node;
//! - `ctl_write_r1|r3[_nofsync]`: signed `rooms.create` + `members.invite` on a
//!   decentralized three-node cluster vs raw KV puts at the same replicas, compared per
//!   KV write the operation needs (so the ratio is unibus's overhead per write, not the
//!   store's write amplification).

use std::sync::Arc;
use std::time::Duration;

use nkeys::KeyPair;
use serde_json::{Value, json};

use super::measure::{self, Stats};
use super::{Workload, throughput_workload};
use crate::auth::envelope::Envelope;
use crate::localnet::{LocalCluster, Node, Ports};
use crate::membership::api::Reply;

/// KV writes behind one `rooms.create` + `members.invite` on the KV store: create (rooms),
/// two purges of leftovers, owner member, owner index; invite member, invite index.
pub const WRITES_PER_CREATE_AND_INVITE: f64 = 7.0;

/// A client of a local node, as the given seed, pinning the node's CA.
pub async fn connect(
    listen: &str,
    ca: &std::path::Path,
    seed: &str,
) -> Result<async_nats::Client, String> {
    async_nats::ConnectOptions::new()
        .nkey(seed.to_string())
        .require_tls(true)
        .add_root_certificates(ca.to_path_buf())
        .request_timeout(Some(Duration::from_secs(10)))
        .connect(format!("tls://{listen}"))
        .await
        .map_err(|e| e.to_string())
}

/// One signed control-plane call; the server's typed error becomes `Err`.
pub async fn call(
    client: &async_nats::Client,
    key: &KeyPair,
    op: &str,
    body: Value,
) -> Result<Value, String> {
    let raw = Envelope::sign(op, &body, key)
        .map_err(|e| e.to_string())?
        .to_vec();
    let reply = client
        .request(format!("unibus.ctl.{op}"), raw.into())
        .await
        .map_err(|e| e.to_string())?;
    match serde_json::from_slice::<Reply<Value>>(&reply.payload).map_err(|e| e.to_string())? {
        Reply::Ok(v) => Ok(v),
        Reply::Error(e) => Err(e.to_string()),
    }
}

fn seed_of(path: &std::path::Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .trim()
        .to_string()
}

pub async fn ctl_read(
    unibus: &std::path::Path,
    rounds: usize,
    each: Duration,
) -> Result<Workload, String> {
    let unibus = unibus.to_path_buf();
    let node = tokio::task::spawn_blocking(move || {
        let node = Node::start(&unibus, "bench", &Ports::pick(), &[], &[]);
        node.wait_ready(Duration::from_secs(30));
        node
    })
    .await
    .map_err(|e| e.to_string())?;
    let secrets = node.data.join("secrets");
    let (ca, seed) = (secrets.join("ca.crt"), seed_of(&secrets.join("admin.seed")));
    let key = Arc::new(KeyPair::from_seed(&seed).map_err(|e| e.to_string())?);
    let admin = connect(&node.ports.listen, &ca, &seed).await?;
    call(&admin, &key, "rooms.create", json!({"room": "bench"})).await?;
    // Connect the raw pair after the room exists: permissions are computed at connect.
    let requester = connect(&node.ports.listen, &ca, &seed).await?;
    let responder = connect(&node.ports.listen, &ca, &seed).await?;
    let mut sub = responder
        .subscribe("unibus.room.bench.echo")
        .await
        .map_err(|e| e.to_string())?;
    let echo = responder.clone();
    tokio::spawn(async move {
        use futures_util::StreamExt;
        while let Some(m) = sub.next().await {
            if let Some(reply) = m.reply {
                let _ = echo.publish(reply, "ok".into()).await;
            }
        }
    });
    responder.flush().await.map_err(|e| e.to_string())?;

    let me = key.public_key();
    let ours = move |i: u64| {
        let (admin, key, me) = (admin.clone(), key.clone(), me.clone());
        async move {
            let (op, body) = match i % 3 {
                0 => ("users.get", json!({ "key": me })),
                1 => ("members.rooms", json!({})),
                _ => ("rooms.get", json!({ "room": "bench" })),
            };
            call(&admin, &key, op, body).await.map(|_| ())
        }
    };
    let raw = move |_i: u64| {
        let requester = requester.clone();
        async move {
            requester
                .request("unibus.room.bench.echo", "{}".into())
                .await
                .map(|_| ())
        }
    };
    let (a, b) = measure::alternate(rounds, each, 16, ours, raw).await;
    drop(node);
    Ok(throughput_workload("ctl_read", &a, &b, 1.0))
}

/// Runs the write workloads on one cluster (fsync on, or off) at R1 then R3.
pub async fn ctl_write(
    unibus: &std::path::Path,
    fsync: bool,
    rounds: usize,
    each: Duration,
) -> Result<Vec<Workload>, String> {
    let unibus = unibus.to_path_buf();
    let cluster = tokio::task::spawn_blocking(move || {
        let conf =
            std::env::temp_dir().join(format!("unibus-bench-{}-{fsync}.toml", std::process::id()));
        let sync = if fsync { "always" } else { "2m" };
        let _ = std::fs::write(&conf, format!("jetstream_sync = \"{sync}\"\n"));
        let conf_arg = conf.to_string_lossy().to_string();
        let cluster = LocalCluster::start(
            &unibus,
            &["--flag", "decentralized=true", "--config", &conf_arg],
        );
        for node in &cluster.nodes {
            node.wait_ready(Duration::from_secs(60));
        }
        let _ = std::fs::remove_file(conf);
        cluster
    })
    .await
    .map_err(|e| e.to_string())?;
    let ca = cluster.secrets.join("ca.crt");
    let listen = cluster.nodes[0].ports.listen.clone();
    let admin_seed = seed_of(&cluster.secrets.join("admin.seed"));
    let service_seed = seed_of(&cluster.secrets.join("service.seed"));
    let key = Arc::new(KeyPair::from_seed(&admin_seed).map_err(|e| e.to_string())?);
    let admin = connect(&listen, &ca, &admin_seed).await?;
    let service = connect(&listen, &ca, &service_seed).await?;
    let invitee = KeyPair::new_user().public_key();
    call(
        &admin,
        &key,
        "users.add",
        json!({"key": invitee, "name": "invitee"}),
    )
    .await?;
    let kv_store = crate::membership::jetstream::KvStore::open(service.clone(), Default::default())
        .await
        .map_err(|e| e.to_string())?;
    let js = async_nats::jetstream::new(service);

    let suffix = if fsync { "" } else { "_nofsync" };
    let mut out = Vec::new();
    for replicas in [1usize, 3] {
        kv_store
            .set_replicas(replicas)
            .await
            .map_err(|e| e.to_string())?;
        kv_store
            .wait_replicas_current(Duration::from_secs(60))
            .await
            .map_err(|e| e.to_string())?;
        let raw_bucket = js
            .create_key_value(async_nats::jetstream::kv::Config {
                bucket: format!("bench_raw_r{replicas}"),
                num_replicas: replicas,
                history: 1,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        let run = format!("r{replicas}{}", if fsync { "f" } else { "n" });
        let (admin, key, invitee) = (admin.clone(), key.clone(), invitee.clone());
        let ours = move |i: u64| {
            let (admin, key, invitee, room) = (
                admin.clone(),
                key.clone(),
                invitee.clone(),
                format!("w{run}-{i}"),
            );
            async move {
                call(&admin, &key, "rooms.create", json!({ "room": room })).await?;
                call(
                    &admin,
                    &key,
                    "members.invite",
                    json!({ "room": room, "key": invitee }),
                )
                .await
                .map(|_| ())
            }
        };
        let raw = move |i: u64| {
            let bucket = raw_bucket.clone();
            async move {
                bucket
                    .put(format!("k{i}"), "x".repeat(200).into())
                    .await
                    .map(|_| ())
            }
        };
        let (a, b): (Stats, Stats) = measure::alternate(rounds, each, 16, ours, raw).await;
        out.push(throughput_workload(
            &format!("ctl_write_r{replicas}{suffix}"),
            &a,
            &b,
            WRITES_PER_CREATE_AND_INVITE,
        ));
    }
    drop(cluster);
    Ok(out)
}
