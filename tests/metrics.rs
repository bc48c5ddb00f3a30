//! `/metrics` on the admin port: parses as Prometheus text, and each counter moves when
//! its event happens (against real nodes).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use unibus::auth::envelope::Envelope;

/// A small parser for the Prometheus/OpenMetrics text format: every line is a comment
/// (`# HELP|TYPE|UNIT|EOF`) or `name{labels} value`. Returns samples by series.
fn parse(text: &str) -> BTreeMap<String, f64> {
    let mut samples = BTreeMap::new();
    assert!(text.ends_with("# EOF\n"), "no EOF marker");
    for line in text.lines() {
        if let Some(comment) = line.strip_prefix("# ") {
            let word = comment.split_whitespace().next().unwrap_or("");
            assert!(
                ["HELP", "TYPE", "UNIT", "EOF"].contains(&word),
                "bad comment: {line}"
            );
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name: {line}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "unclosed labels: {line}");
        }
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        samples.insert(series.to_string(), value);
    }
    samples
}

fn metrics(node: &Node) -> BTreeMap<String, f64> {
    let (status, body) = http_get(&node.ports.http, "/metrics").expect("/metrics answers");
    assert_eq!(status, 200);
    parse(&body)
}

fn value(node: &Node, series: &str) -> f64 {
    metrics(node).get(series).copied().unwrap_or(0.0)
}

/// Waits until `series` exceeds `before`.
fn moves(node: &Node, series: &str, before: f64) {
    let moved = poll(Duration::from_secs(20), || {
        (value(node, series) > before).then_some(())
    });
    assert!(
        moved.is_some(),
        "{series} stayed at {before}:\n{:?}",
        metrics(node)
    );
}

fn secrets(node: &Node) -> std::path::PathBuf {
    node.data.join("secrets")
}

async fn connect(
    node: &Node,
    seed: Option<String>,
) -> Result<async_nats::Client, async_nats::ConnectError> {
    let options = match seed {
        Some(seed) => unibus::client::nkey_options(&seed).unwrap(),
        None => async_nats::ConnectOptions::new(),
    };
    options
        .require_tls(true)
        .add_root_certificates(secrets(node).join("ca.crt"))
        .max_reconnects(Some(1))
        .connection_timeout(Duration::from_secs(5))
        .connect(format!("tls://{}", node.ports.listen))
        .await
}

#[test]
fn counters_move_when_their_events_happen() {
    let node = start("metered", &Ports::pick(), &[], &[]);
    node.wait_ready(Duration::from_secs(30));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let admin_seed = std::fs::read_to_string(secrets(&node).join("admin.seed"))
        .unwrap()
        .trim()
        .to_string();

    // Auth decisions: a known key is admitted, an unknown one denied.
    let admitted = "unibus_auth_decisions_total{result=\"admitted\",reason=\"ok\"}";
    let denied = "unibus_auth_decisions_total{result=\"denied\",reason=\"unknown_key\"}";
    let (a0, d0) = (value(&node, admitted), value(&node, denied));
    let client = rt
        .block_on(connect(&node, Some(admin_seed.clone())))
        .expect("admin connects");
    moves(&node, admitted, a0);
    let stranger = nkeys::KeyPair::new_user().seed().unwrap();
    assert!(
        rt.block_on(connect(&node, Some(stranger))).is_err(),
        "unknown key refused"
    );
    moves(&node, denied, d0);

    // Control plane: a signed request by outcome, and the store calls behind it.
    let ok = "unibus_ctl_requests_total{op=\"users.list\",outcome=\"ok\"}";
    let refused = "unibus_ctl_requests_total{op=\"users.list\",outcome=\"unauthenticated\"}";
    let store_calls = "unibus_store_op_seconds_count{op=\"list_users\"}";
    let (ok0, r0, s0) = (
        value(&node, ok),
        value(&node, refused),
        value(&node, store_calls),
    );
    let admin = nkeys::KeyPair::from_seed(&admin_seed).unwrap();
    let signed = Envelope::sign("users.list", &serde_json::json!({}), &admin)
        .unwrap()
        .to_vec();
    rt.block_on(async {
        client
            .request("unibus.ctl.users.list", signed.into())
            .await
            .unwrap();
        client
            .request(
                "unibus.ctl.users.list",
                br#"{"op":"users.list","body":{},"ts":1,"nonce":"aaaaaaaaaaaaaaaa"}"#
                    .to_vec()
                    .into(),
            )
            .await
            .unwrap();
    });
    moves(&node, ok, ok0);
    moves(&node, refused, r0);
    moves(&node, store_calls, s0);

    // Supervision: a killed nats-server is restarted and counted.
    let restarts = "unibus_nats_restarts_total";
    let before = value(&node, restarts);
    kill(node.nats_pid().unwrap(), libc::SIGKILL);
    moves(&node, restarts, before);
}

#[test]
fn bucket_lag_and_reconciler_repairs_are_exported() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("unibus.toml");
    std::fs::write(&conf, "reconcile_every_secs = 1\n").unwrap();
    let cluster = start_cluster(&[
        "--flag",
        "decentralized=true",
        "--config",
        conf.to_str().unwrap(),
    ]);
    for node in &cluster.nodes {
        node.wait_ready(Duration::from_secs(40));
    }
    let n1 = &cluster.nodes[0];
    let lag = poll(Duration::from_secs(20), || {
        metrics(n1)
            .get("unibus_bucket_replica_lag{bucket=\"members\"}")
            .copied()
    });
    assert_eq!(lag, Some(0.0), "R1 buckets are current");

    // A crash between the two writes of add-member: the member record without its index.
    let repairs = "unibus_reconciler_repairs_total{kind=\"index_added\"}";
    // Whichever node's reconciler gets there first counts it: watch them all at once.
    let total = || cluster.nodes.iter().map(|n| value(n, repairs)).sum::<f64>();
    let before = total();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let seed = std::fs::read_to_string(cluster.secrets.join("service.seed"))
        .unwrap()
        .trim()
        .to_string();
    rt.block_on(async {
        let client = async_nats::ConnectOptions::new()
            .nkey(seed)
            .require_tls(true)
            .add_root_certificates(cluster.secrets.join("ca.crt"))
            .connect(format!("tls://{}", n1.ports.listen))
            .await
            .unwrap();
        let js = async_nats::jetstream::new(client);
        let rooms = js.get_key_value("rooms").await.unwrap();
        let members = js.get_key_value("members").await.unwrap();
        let owner = nkeys::KeyPair::new_user().public_key();
        let room = serde_json::json!({"id": "half", "name": "", "owner": owner, "encrypted": false, "created_at": 1});
        rooms.put("half", serde_json::to_vec(&room).unwrap().into()).await.unwrap();
        let member = serde_json::json!({"room": "half", "endpoint": owner, "role": "owner", "state": "joined", "added_by": owner, "added_at": 1});
        members.put(format!("half.{owner}"), serde_json::to_vec(&member).unwrap().into()).await.unwrap();
    });
    let repaired = poll(Duration::from_secs(20), || (total() > before).then_some(()));
    assert!(repaired.is_some(), "no node counted the repair");
}
