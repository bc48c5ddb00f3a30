//! The store stage of a node: SQLite on a single node, KV buckets with `decentralized`,
//! `unibus cluster status` and `unibus cluster replicas` against a live cluster.

mod common;

use std::time::Duration;

use common::*;

const READY: Duration = Duration::from_secs(40);

#[test]
fn a_single_node_keeps_its_store_in_sqlite_in_its_data_dir() {
    let node = start("solo", &Ports::pick(), &[], &[]);
    let ready = node.wait_ready(READY);
    assert_eq!(ready["stages"]["store"]["state"], "up", "{ready}");
    assert_eq!(ready["store"]["backend"], "sqlite", "{ready}");
    assert!(node.data.join("membership.db").is_file());
    let (code, out, _) = unibus(&["cluster", "status", "--http", &node.ports.http]);
    assert_eq!(code, 0);
    assert!(
        out.contains("single node") && out.contains("sqlite"),
        "{out}"
    );
}

fn bucket_replicas(node: &Node) -> Option<Vec<(u64, u64)>> {
    let (_, r) = node.readyz()?;
    let buckets = r["store"]["buckets"].as_array()?;
    Some(
        buckets
            .iter()
            .map(|b| {
                (
                    b["replicas_wanted"].as_u64().unwrap_or(0),
                    b["replicas_current"].as_u64().unwrap_or(0),
                )
            })
            .collect(),
    )
}

#[test]
fn a_decentralized_cluster_starts_at_r1_and_grows_to_r3_live() {
    let cluster = start_cluster(&["--flag", "decentralized=true"]);
    let nodes = &cluster.nodes;
    for node in nodes {
        let ready = node.wait_ready(READY);
        assert_eq!(ready["store"]["backend"], "jetstream", "{ready}");
        assert_eq!(ready["store"]["replicas_wanted"], 1);
    }
    let five_at_r1 = poll(READY, || {
        bucket_replicas(&nodes[0]).filter(|b| b.len() == 5 && b.iter().all(|x| *x == (1, 1)))
    });
    assert!(five_at_r1.is_some(), "{:?}", nodes[0].readyz());

    let (code, out, err) = unibus(&["cluster", "status", "--http", &nodes[1].ports.http]);
    assert_eq!(code, 0, "{err}");
    for bucket in ["users", "rooms", "members", "rooms_by_member", "room_keys"] {
        assert!(out.contains(bucket), "{out}");
    }
    assert!(out.contains("meta leader: n"), "{out}");
    // A cluster created by this code starts finalized.
    let protocol = unibus::membership::version::PROTOCOL;
    let finalized = format!("cluster version: {protocol} finalized, this node speaks {protocol}\n");
    assert!(out.contains(&finalized), "{out}");

    // Operator tools connect as the nodes' service user: the store lives in its account.
    let conn = cluster.client_args(2, "service.seed");
    let replicas = |n: &str| {
        let mut args = vec!["cluster", "replicas", n];
        args.extend(conn.iter().map(String::as_str));
        unibus(&args)
    };
    let (code, out, err) = replicas("3");
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("all buckets at R3"), "{out}");
    // Room history follows the store's replicas.
    let rooms_row = out
        .lines()
        .find(|l| l.starts_with("ROOMS"))
        .unwrap_or_default();
    assert!(
        rooms_row.split_whitespace().take(3).eq(["ROOMS", "3", "3"]),
        "{out}"
    );
    let r3 = poll(READY, || {
        bucket_replicas(&nodes[0]).filter(|b| b.len() == 5 && b.iter().all(|x| *x == (3, 3)))
    });
    assert!(r3.is_some(), "{:?}", nodes[0].readyz());

    // Re-running is safe and changes nothing.
    let (code, out, _) = replicas("3");
    assert_eq!(code, 0, "{out}");
    // More replicas than nodes is refused as bad input.
    let (code, _, err) = replicas("4");
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = replicas("6");
    assert_eq!(code, 2, "{err}");
    // An admitted client is not the service user: the store is out of its reach.
    let admin = cluster.client_args(2, "admin.seed");
    let mut args = vec!["cluster", "replicas", "1"];
    args.extend(admin.iter().map(String::as_str));
    let (code, _, err) = unibus(&args);
    assert_eq!(code, 1, "{err}");
}

#[test]
fn replicas_above_the_cluster_size_are_refused_before_start() {
    let p = Ports::pick();
    let (code, _, err) = unibus(&[
        "node",
        "up",
        "--name",
        "x",
        "--listen",
        &p.listen,
        "--http",
        &p.http,
        "--nats-http",
        &p.nats_http,
        "--cluster-listen",
        &p.cluster,
        "--peers",
        "127.0.0.1:1,127.0.0.1:2",
        "--flag",
        "decentralized=true",
        "--replicas",
        "5",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--replicas") && err.contains("5 replicas need 5 nodes"),
        "{err}"
    );
}

// ---- leadership handover on SIGTERM (`node::handover`)

/// A three-node R3 cluster, every node ready and every bucket at three current replicas.
fn r3_cluster() -> LocalCluster {
    let cluster = start_cluster(&["--flag", "decentralized=true", "--replicas", "3"]);
    for node in &cluster.nodes {
        node.wait_ready(READY);
    }
    let r3 = poll(READY, || {
        bucket_replicas(&cluster.nodes[0])
            .filter(|b| b.len() == 5 && b.iter().all(|x| *x == (3, 3)))
    });
    assert!(r3.is_some(), "{:?}", cluster.nodes[0].readyz());
    cluster
}

/// The store as the nodes' service user, through the nodes `through` (indexes).
async fn service_store(
    cluster: &LocalCluster,
    through: &[usize],
) -> unibus::membership::jetstream::KvStore {
    let listens: Vec<&str> = through
        .iter()
        .map(|i| cluster.nodes[*i].ports.listen.as_str())
        .collect();
    let seed = unibus::bench::seed_of(&cluster.secrets.join("service.seed")).unwrap();
    let client = unibus::bench::raw_connection(&cluster.secrets, &listens, seed)
        .await
        .unwrap();
    unibus::membership::jetstream::KvStore::open(
        client,
        unibus::membership::jetstream::KvOptions {
            replicas: 3,
            create: false,
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

/// Which node leads the `users` bucket.
async fn users_leader(
    cluster: &LocalCluster,
    kv: &unibus::membership::jetstream::KvStore,
) -> usize {
    let leader = kv
        .bucket_status()
        .await
        .unwrap()
        .into_iter()
        .find(|b| b.bucket == "users")
        .and_then(|b| b.leader)
        .expect("the users bucket has a leader");
    cluster
        .nodes
        .iter()
        .position(|n| n.name == leader)
        .expect("the leader is one of the nodes")
}

#[tokio::test]
async fn handover_moves_every_leadership_the_server_holds_and_leaves_it_running() {
    let cluster = r3_cluster();
    let all = service_store(&cluster, &[0, 1, 2]).await;
    let x = users_leader(&cluster, &all).await;
    let name = cluster.nodes[x].name.clone();
    // A connection to the leader's own server, as a stopping node has.
    let own = service_store(&cluster, &[x]).await;
    let streams: Vec<String> = unibus::membership::jetstream::BUCKETS
        .iter()
        .map(|b| format!("KV_{b}"))
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let accounts = [(own.client().clone(), streams.clone())];
    let report = unibus::node::handover::hand_over(&accounts, deadline).await;
    assert!(report.stuck.is_empty(), "{report:?}");
    assert!(
        report.moved.iter().any(|(s, _)| s == "KV_users"),
        "{report:?}"
    );
    assert!(report.moved.iter().all(|(_, to)| *to != name), "{report:?}");
    // The streams are led elsewhere now, by the leaders' own account, and the server that
    // handed over still runs (the handover is not a shutdown).
    let status = all.bucket_status().await.unwrap();
    assert!(
        status
            .iter()
            .all(|b| b.leader.is_some() && b.leader.as_deref() != Some(name.as_str())),
        "{status:?}"
    );
    assert!(process_alive(
        cluster.nodes[x].nats_pid().expect("nats-server runs")
    ));
    // Nothing is left to move: a second handover is a no-op.
    let again = unibus::node::handover::hand_over(&accounts, deadline).await;
    assert_eq!(again, Default::default());
}

#[tokio::test]
async fn sigterm_hands_leadership_over_before_lame_duck_and_writes_go_on() {
    let mut cluster = r3_cluster();
    let all = service_store(&cluster, &[0, 1, 2]).await;
    let x = users_leader(&cluster, &all).await;
    let others: Vec<usize> = (0..3).filter(|i| *i != x).collect();
    let through_others =
        unibus::membership::Store::JetStream(service_store(&cluster, &others).await);
    cluster.nodes[x].signal(libc::SIGTERM);
    // Writes through the other nodes while the leader's node stops: each is one call,
    // no retry by the caller, and every one is acknowledged.
    let mut written = 0;
    while cluster.nodes[x]
        .child
        .as_mut()
        .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    {
        let key = nkeys::KeyPair::new_user().public_key();
        through_others
            .add_user(&key, "during-stop", false)
            .await
            .unwrap_or_else(|e| panic!("write {written} during the stop failed: {e}"));
        written += 1;
    }
    let node = &mut cluster.nodes[x];
    let status = node
        .wait_exit(Duration::from_secs(60))
        .expect("the node exits");
    let log = node.log();
    assert_eq!(status.code(), Some(0), "log:\n{log}");
    assert!(written > 0);
    // The users bucket was handed over before nats-server went into lame duck.
    let handed = log
        .lines()
        .position(|l| l.contains("handed stream leadership over") && l.contains("KV_users"));
    let lame_duck = log
        .lines()
        .position(|l| l.contains("putting nats-server into lame duck mode"));
    match (handed, lame_duck) {
        (Some(h), Some(l)) => assert!(h < l, "handover after lame duck:\n{log}"),
        _ => panic!("no handover of KV_users, or no lame duck, in the log:\n{log}"),
    }
}

#[test]
fn a_node_whose_cluster_lost_quorum_still_stops_on_sigterm() {
    let mut cluster = r3_cluster();
    cluster.nodes[1].kill_now();
    cluster.nodes[2].kill_now();
    let node = &mut cluster.nodes[0];
    node.signal(libc::SIGTERM);
    let status = node.wait_exit(Duration::from_secs(60));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "log:\n{}",
        node.log()
    );
}
