//! Control-plane workloads, each beside its raw NATS twin on the same servers:
//!
//! - `ctl_read`: connection-bound `users.get`, `members.rooms`, `rooms.get` on a single
//!   default node (SQLite, enforce, TLS) vs bare request/reply through the same node,
//!   answered by a process of its own ([`super::responder`]) with the same bytes: each
//!   request carries the read's body (no envelope) and each reply is the node's answer,
//!   captured once through the unibus path, so the ratio is unibus's work per read, not
//!   the cost of moving the data;
//! - `ctl_write_r1|r3[_nofsync]`: signed `rooms.create` + `members.invite` on a
//!   decentralized three-node cluster vs raw KV puts at the same replicas into as many
//!   buckets as the pair writes (rooms, members, index; 1:2:2), at R1 each on the server
//!   holding the bucket it stands for, compared per KV write the operation needs (so the
//!   ratio is unibus's overhead per write, not the store's write amplification or where
//!   its buckets happened to land).

use std::time::Duration;

use async_nats::jetstream::stream::Placement;
use nkeys::KeyPair;

use super::measure::{self, Stats};
use super::{Workload, app_seed, client, new_user, raw_connection, seed_of, throughput_workload};
use crate::client::Client;
use crate::localnet::LocalCluster;
use crate::membership::Room;
use crate::membership::api::{CreateRoom, MemberRef, Op};

/// KV writes one `rooms.create` + `members.invite` needs on the KV store: the room record,
/// the owner's member record and index entry, the invitee's member record and index
/// entry. (Before the item-4 optimisation `rooms.create` also purged leftovers under the
/// room id unconditionally, two more writes; now it purges only what a leader read finds.)
pub const WRITES_PER_CREATE_AND_INVITE: f64 = 5.0;

/// Which of the twin's buckets (rooms, members, index) each of the pair's five writes
/// goes to.
const WRITE_BUCKETS: [usize; 5] = [0, 1, 1, 2, 2];

/// One `rooms.create` without the client library's follow-up (a reconnect to refresh
/// permissions), which is not the store's cost and would dominate the measurement.
pub async fn create_room(client: &Client, room: &str) -> Result<Room, String> {
    let body = CreateRoom {
        room: room.into(),
        name: room.into(),
        encrypted: false,
    };
    client
        .call(Op::RoomsCreate, &body)
        .await
        .map_err(|e| e.to_string())
}

pub async fn ctl_read(
    unibus: &std::path::Path,
    rounds: usize,
    each: Duration,
) -> Result<Workload, String> {
    let node = super::single_node(unibus).await?;
    let secrets = node.data.join("secrets");
    let admin = client(&secrets, &[&node.ports.listen], &secrets.join("admin.seed")).await?;
    create_room(&admin, "bench").await?;
    // What the unibus side carries, read once through its own path: each read's request
    // body (without the envelope) and the node's reply bytes. The twin carries the same
    // bytes, so the ratio is unibus's work, not the cost of moving the data.
    let me = admin.key().to_string();
    let reads = [
        (Op::UsersGet, serde_json::json!({ "key": me })),
        (Op::MembersRooms, serde_json::json!({})),
        (Op::RoomsGet, serde_json::json!({ "room": "bench" })),
    ];
    let mut bodies = Vec::new();
    let mut replies = Vec::new();
    for (op, body) in &reads {
        replies.push(admin.call_raw(*op, body).await.map_err(|e| e.to_string())?);
        bodies.push(bytes::Bytes::from(
            serde_json::to_vec(body).map_err(|e| e.to_string())?,
        ));
    }
    // The raw pair: bare request/reply as the node's APP identity (no callout, no
    // limits), answered by a process of its own as the node is (see `responder`).
    let app = app_seed(&secrets)?;
    let requester = raw_connection(&secrets, &[&node.ports.listen], app.clone()).await?;
    let _responder = super::responder::spawn(
        unibus,
        &node.ports.listen,
        &secrets,
        app,
        &replies,
        &requester,
    )
    .await?;

    let ours = move |i: u64| {
        let (admin, me) = (admin.clone(), me.clone());
        async move {
            match i % 3 {
                0 => admin.get_user(&me).await.map(|_| ()),
                1 => admin.memberships(None).await.map(|_| ()),
                _ => admin.get_room("bench").await.map(|_| ()),
            }
        }
    };
    let raw = move |i: u64| {
        let requester = requester.clone();
        let which = (i % 3) as usize;
        let body = bodies[which].clone();
        async move {
            requester
                .request(format!("unibus.bench.echo.{which}"), body)
                .await
                .map(|_| ())
        }
    };
    let (a, b) = measure::alternate(rounds, each, 16, ours, raw).await;
    drop(node);
    Ok(throughput_workload("ctl_read", &a, &b, 1.0))
}

/// Runs the write workloads on `cluster` (started with fsync on, or off) at R1 then R3,
/// leaving its buckets at R3.
pub async fn ctl_write(
    cluster: &LocalCluster,
    fsync: bool,
    rounds: usize,
    each: Duration,
) -> Result<Vec<Workload>, String> {
    let secrets = cluster.secrets.clone();
    let listen = cluster.nodes[0].ports.listen.clone();
    let admin = client(&secrets, &[&listen], &secrets.join("admin.seed")).await?;
    let service = raw_connection(
        &secrets,
        &[&listen],
        seed_of(&secrets.join("service.seed"))?,
    )
    .await?;
    let invitee = KeyPair::new_user().public_key();
    admin
        .add_user(&invitee, "invitee", false)
        .await
        .map_err(|e| e.to_string())?;
    // Rooms are created by a user of their own (see `new_user`).
    let scratch = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (owner_seed, _) = new_user(&admin, scratch.path(), "writer").await?;
    let owner = client(&secrets, &[&listen], &owner_seed).await?;
    let kv_options = crate::membership::jetstream::KvOptions {
        create: false,
        replicas: 3,
        ..Default::default()
    };
    let kv_store = crate::membership::jetstream::KvStore::open(service.clone(), kv_options)
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
        // The twin writes what the pair writes, where it writes it: of every five puts,
        // one goes to a bucket standing for `rooms`, two to one for `members` and two to
        // one for the member index. Into a single bucket, 16 puts in flight are
        // group-committed (one Raft append and one fsync for many) at 2.4× the rate of
        // the same puts spread over five buckets (BENCHMARKS.md, sixth session): that is
        // where writes go, not unibus's overhead per write.
        //
        // At R1 each twin bucket is also placed on the server holding the bucket it stands
        // for: a put into a bucket on another server than the writer's costs a routed
        // message each way on both servers, and where a bucket lands is chance (a run with
        // unibus's buckets remote and the twin's local measured that, not unibus).
        let leaders = kv_store
            .bucket_status()
            .await
            .map_err(|e| format!("reading where unibus's buckets are: {e}"))?;
        let mut raw_buckets = Vec::new();
        for (bucket, ours) in [
            ("rooms", "rooms"),
            ("members", "members"),
            ("index", "rooms_by_member"),
        ] {
            let beside = if replicas == 1 {
                let leader = leaders
                    .iter()
                    .find(|b| b.bucket == ours)
                    .and_then(|b| b.leader.clone());
                Some(leader.ok_or_else(|| {
                    format!("bucket {ours} has no leader at R1 to place the raw twin beside")
                })?)
            } else {
                None
            };
            raw_buckets.push(
                js.create_key_value(async_nats::jetstream::kv::Config {
                    bucket: format!("bench_raw_r{replicas}_{bucket}"),
                    num_replicas: replicas,
                    history: 1,
                    placement: beside.map(|server| Placement {
                        cluster: None,
                        tags: vec![crate::node::nats_config::server_tag(&server)],
                    }),
                    ..Default::default()
                })
                .await
                .map_err(|e| {
                    format!("creating the raw twin's bucket bench_raw_r{replicas}_{bucket}: {e}")
                })?,
            );
        }
        let raw_buckets = std::sync::Arc::new(raw_buckets);
        let run = format!("r{replicas}{}", if fsync { "f" } else { "n" });
        let (owner, invitee) = (owner.clone(), invitee.clone());
        // Room ids unique over all rounds (`i` restarts with each round).
        let seq = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let ours = move |_i: u64| {
            let n = seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (owner, invitee, room) = (owner.clone(), invitee.clone(), format!("w{run}-{n}"));
            async move {
                create_room(&owner, &room).await?;
                let body = MemberRef {
                    room: room.clone(),
                    key: invitee.clone(),
                };
                owner
                    .call::<_, serde_json::Value>(Op::MembersInvite, &body)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        };
        let raw = move |i: u64| {
            let bucket = raw_buckets[WRITE_BUCKETS[(i % 5) as usize]].clone();
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
    Ok(out)
}
