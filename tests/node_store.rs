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
