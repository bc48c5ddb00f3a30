//! The client library and the client CLI against a real three-node loopback cluster
//! (`unibus node up` ×3, enforce + TLS, KV store at R3): rooms end to end, member-only
//! history, end-to-end encryption, live (non-durable) mode, and a listener that survives
//! the death of its node.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use unibus::auth::keys;
use unibus::client::e2e::{self, CryptoError};
use unibus::client::{
    Client, ClientError, ClientOptions, LiveMessage, LiveSubscription, RoomMessage, Start,
    Subscription,
};
use unibus::membership::api::ErrorKind;

const READY: Duration = Duration::from_secs(60);
const WAIT: Duration = Duration::from_secs(60);

/// Clusters are heavy on a small machine: one at a time.
static ONE_CLUSTER: Mutex<()> = Mutex::new(());

fn cluster() -> LocalCluster {
    let cluster = start_cluster(&["--flag", "decentralized=true", "--replicas", "3"]);
    for node in &cluster.nodes {
        node.wait_ready(READY);
    }
    cluster
}

/// A fresh user seed in `dir`: (seed file, public key).
fn user(dir: &Path, name: &str) -> (PathBuf, String) {
    let path = dir.join(format!("{name}.seed"));
    let key = keys::generate_user_seed_file(&path).unwrap();
    (path, key.public_key())
}

fn url(cluster: &LocalCluster, node: usize) -> String {
    format!("tls://{}", cluster.nodes[node].ports.listen)
}

/// `unibus ARGS --server <node> --seed-file SEED --ca ca.crt`.
fn cli(cluster: &LocalCluster, node: usize, seed: &Path, args: &[&str]) -> (i32, String, String) {
    let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    all.extend([
        "--server".into(),
        url(cluster, node),
        "--seed-file".into(),
        seed.to_string_lossy().into(),
        "--ca".into(),
        cluster.secrets.join("ca.crt").to_string_lossy().into(),
    ]);
    let refs: Vec<&str> = all.iter().map(|s| s.as_str()).collect();
    unibus(&refs)
}

fn ok(result: (i32, String, String)) -> String {
    let (code, out, err) = result;
    assert_eq!(code, 0, "expected success; stdout:\n{out}\nstderr:\n{err}");
    out
}

/// Checks a refusal: exit 1 and `error: <kind>: …` on stderr.
fn refused(result: (i32, String, String), kind: &str) {
    let (code, out, err) = result;
    assert_eq!(
        code, 1,
        "expected exit 1 ({kind}); stdout:\n{out}\nstderr:\n{err}"
    );
    assert!(
        err.contains(&format!("error: {kind}: ")),
        "expected `error: {kind}: …`, got:\n{err}"
    );
}

async fn connect(cluster: &LocalCluster, nodes: &[usize], seed: &Path) -> Client {
    let mut options = ClientOptions::new(nodes.iter().map(|n| url(cluster, *n)), seed);
    options.ca = Some(cluster.secrets.join("ca.crt"));
    options.retain_order = true;
    options.publish_timeout = Duration::from_secs(90);
    Client::connect(options).await.unwrap()
}

async fn next(feed: &mut Subscription) -> Result<RoomMessage, ClientError> {
    tokio::time::timeout(WAIT, feed.next())
        .await
        .expect("a feed item in time")
        .expect("the feed goes on")
}

#[test]
fn two_users_on_three_nodes_through_the_cli_and_a_stranger_cannot_read() {
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let cluster = cluster();
    let dir = tempfile::tempdir().unwrap();
    let admin = cluster.secrets.join("admin.seed");
    let (a_seed, a) = user(dir.path(), "a");
    let (b_seed, b) = user(dir.path(), "b");
    let (c_seed, c) = user(dir.path(), "c");

    // Users: admins add them; nobody else may.
    for key in [&a, &b, &c] {
        let out = ok(cli(
            &cluster,
            0,
            &admin,
            &["user", "add", key, "--name", "x"],
        ));
        assert!(out.contains(&format!("added user {key}")), "{out}");
    }
    refused(cli(&cluster, 1, &admin, &["user", "add", &a]), "conflict");
    refused(cli(&cluster, 0, &a_seed, &["user", "list"]), "forbidden");
    let users = ok(cli(&cluster, 1, &admin, &["user", "list", "--json"]));
    let users: serde_json::Value = serde_json::from_str(&users).unwrap();
    assert_eq!(users.as_array().unwrap().len(), 4, "{users}");
    let table = ok(cli(&cluster, 2, &admin, &["user", "list"]));
    assert!(table.starts_with("KEY") && table.contains(&c), "{table}");

    // A creates a room on node 1 and invites B, who joins on node 3.
    ok(cli(
        &cluster,
        0,
        &a_seed,
        &["room", "create", "r1", "--name", "Room one"],
    ));
    refused(
        cli(&cluster, 0, &a_seed, &["room", "create", "r1"]),
        "conflict",
    );
    refused(
        cli(&cluster, 0, &a_seed, &["room", "create", "Bad.Room"]),
        "invalid",
    );
    refused(
        cli(&cluster, 2, &b_seed, &["room", "join", "r1"]),
        "forbidden",
    );
    ok(cli(&cluster, 0, &a_seed, &["room", "invite", "r1", &b]));
    refused(
        cli(&cluster, 2, &b_seed, &["room", "invite", "r1", &c]),
        "forbidden",
    );
    ok(cli(&cluster, 2, &b_seed, &["room", "join", "r1"]));
    let members = ok(cli(&cluster, 2, &b_seed, &["room", "members", "r1"]));
    assert!(members.contains(&a) && members.contains(&b) && members.contains("joined"));
    refused(
        cli(&cluster, 1, &c_seed, &["room", "members", "r1"]),
        "forbidden",
    );
    let rooms = ok(cli(&cluster, 1, &b_seed, &["room", "list", "--json"]));
    assert!(rooms.contains("\"id\":\"r1\""), "{rooms}");
    let all = ok(cli(&cluster, 1, &admin, &["room", "list", "--for", &b]));
    assert!(all.contains("r1") && all.contains("Room one"), "{all}");
    refused(
        cli(&cluster, 1, &c_seed, &["room", "list", "--for", &b]),
        "forbidden",
    );

    // A sends on node 1; B listens on node 3 and gets every message, in order.
    let mut seqs = Vec::new();
    for i in 1..=5 {
        let out = ok(cli(
            &cluster,
            0,
            &a_seed,
            &["send", "r1", &format!("hello {i}")],
        ));
        seqs.push(out.trim().parse::<u64>().expect("send prints the sequence"));
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let out = ok(cli(
        &cluster,
        2,
        &b_seed,
        &["listen", "r1", "--json", "--count", "5", "--timeout", "60"],
    ));
    let got: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(got.len(), 5, "{out}");
    for (i, m) in got.iter().enumerate() {
        assert_eq!(m["body"], format!("hello {}", i + 1));
        assert_eq!(m["seq"], seqs[i]);
        assert_eq!(m["sender"], a.as_str());
        assert!(m["time"].as_str().unwrap().ends_with('Z'), "{m}");
    }
    // Resuming after a sequence gives what came after it, once.
    let out = ok(cli(
        &cluster,
        1,
        &b_seed,
        &[
            "listen",
            "r1",
            "--since",
            &seqs[2].to_string(),
            "--count",
            "2",
            "--timeout",
            "60",
        ],
    ));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].starts_with(&seqs[3].to_string()) && lines[0].ends_with("hello 4"));
    assert!(lines[1].contains(&a) && lines[1].ends_with("hello 5"));
    // Stdin: one message per line; B replies.
    let mut child = std::process::Command::new(UNIBUS)
        .args(["send", "r1", "--server", &url(&cluster, 2), "--ca"])
        .arg(cluster.secrets.join("ca.crt"))
        .arg("--seed-file")
        .arg(&b_seed)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"reply 1\nreply 2\n")
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    assert_eq!(String::from_utf8_lossy(&output.stdout).lines().count(), 2);
    let out = ok(cli(
        &cluster,
        0,
        &a_seed,
        &["listen", "r1", "--new", "--timeout", "1"],
    ));
    assert_eq!(out, "", "--new shows nothing sent before");

    // C, not a member, can neither listen (history or live) nor send.
    refused(
        cli(&cluster, 2, &c_seed, &["listen", "r1", "--timeout", "5"]),
        "forbidden",
    );
    refused(
        cli(&cluster, 0, &c_seed, &["send", "r1", "hi"]),
        "forbidden",
    );
    // Nor can a revoked user even connect.
    ok(cli(&cluster, 0, &admin, &["user", "revoke", &c]));
    refused(
        cli(&cluster, 1, &c_seed, &["room", "list"]),
        "unauthenticated",
    );
    // Local errors are exit 2.
    let (code, _, err) = unibus(&["room", "list", "--server", &url(&cluster, 0)]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--seed-file"), "{err}");
    let (code, _, err) = cli(
        &cluster,
        0,
        Path::new("/nonexistent.seed"),
        &["room", "list"],
    );
    assert_eq!(code, 2, "{err}");

    // B leaves; then B can no longer read; A deletes the room and its history goes with it.
    refused(
        cli(&cluster, 0, &a_seed, &["room", "leave", "r1"]),
        "conflict",
    );
    ok(cli(&cluster, 2, &b_seed, &["room", "leave", "r1"]));
    refused(
        cli(&cluster, 2, &b_seed, &["listen", "r1", "--timeout", "5"]),
        "forbidden",
    );
    refused(
        cli(&cluster, 2, &b_seed, &["room", "delete", "r1"]),
        "forbidden",
    );
    ok(cli(&cluster, 0, &a_seed, &["room", "invite", "r1", &b]));
    ok(cli(&cluster, 0, &a_seed, &["room", "remove", "r1", &b]));
    ok(cli(&cluster, 0, &a_seed, &["room", "delete", "r1"]));
    refused(
        cli(&cluster, 0, &a_seed, &["room", "members", "r1"]),
        "forbidden",
    );
    ok(cli(&cluster, 0, &a_seed, &["room", "create", "r1"]));
    let out = ok(cli(
        &cluster,
        0,
        &a_seed,
        &["listen", "r1", "--timeout", "2"],
    ));
    assert_eq!(out, "", "a new room with an old id inherits no history");

    // The cluster was created by this code, so it started finalized (and the creates
    // above ran in one stage): every node says so. Finalizing again checks every node
    // and changes nothing; a list that leaves a node out is refused.
    for node in &cluster.nodes {
        let (_, readyz) = node.readyz().unwrap();
        assert_eq!(
            readyz["store"]["cluster_version"], readyz["store"]["protocol"],
            "{readyz}"
        );
    }
    let service = cluster.secrets.join("service.seed");
    let https: Vec<&str> = cluster
        .nodes
        .iter()
        .map(|n| n.ports.http.as_str())
        .collect();
    let out = ok(cli(
        &cluster,
        1,
        &service,
        &["cluster", "finalize", "--http", &https.join(",")],
    ));
    assert!(out.contains("cluster finalized at version"), "{out}");
    let (code, _, err) = cli(
        &cluster,
        1,
        &service,
        &["cluster", "finalize", "--http", &https[..2].join(",")],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("has 3 nodes and 2 were given"), "{err}");
}

/// A connection to `node` as the node's own APP user: past the callout, allowed every
/// subject (what only the nodes themselves hold).
async fn app_connection(cluster: &LocalCluster, node: usize) -> async_nats::Client {
    let service = keys::read_user_seed(&cluster.secrets.join("service.seed")).unwrap();
    let app = keys::derive_user(&service, "app").unwrap();
    async_nats::ConnectOptions::with_nkey(app.seed().unwrap())
        .require_tls(true)
        .add_root_certificates(cluster.secrets.join("ca.crt"))
        .connect(url(cluster, node))
        .await
        .unwrap()
}

/// The ROOMS stream's last sequence.
async fn rooms_last_seq(cluster: &LocalCluster) -> u64 {
    let js = async_nats::jetstream::new(app_connection(cluster, 1).await);
    let mut stream = js.get_stream("ROOMS").await.unwrap();
    stream.info().await.unwrap().state.last_sequence
}

/// Every stored message of the ROOMS stream, read as the node's own APP user.
async fn raw_room_messages(cluster: &LocalCluster) -> Vec<Vec<u8>> {
    let js = async_nats::jetstream::new(app_connection(cluster, 1).await);
    let mut stream = js.get_stream("ROOMS").await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        if let Ok(m) = stream.get_raw_message(seq).await {
            out.push(m.payload.to_vec());
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Runs `test` on its own runtime with a cluster, one cluster at a time.
fn with_cluster<F: std::future::Future<Output = ()>>(test: impl FnOnce(LocalCluster) -> F) {
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let cluster = cluster();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(test(cluster));
}

#[test]
fn encrypted_rooms_seal_bodies_wrap_keys_and_shut_out_removed_members() {
    with_cluster(encrypted_rooms);
}

async fn encrypted_rooms(cluster: LocalCluster) {
    let dir = tempfile::tempdir().unwrap();
    let admin = connect(&cluster, &[0], &cluster.secrets.join("admin.seed")).await;
    let (a_seed, a_key) = user(dir.path(), "a");
    let (b_seed, b_key) = user(dir.path(), "b");
    admin.add_user(&a_key, "a", false).await.unwrap();
    admin.add_user(&b_key, "b", false).await.unwrap();
    let a = connect(&cluster, &[0], &a_seed).await;
    let b = connect(&cluster, &[2], &b_seed).await;
    b.register_xkey().await.unwrap();

    // Epoch 1 at creation (A only), epoch 2 at the invite (A and B).
    a.create_room("sec", "", true).await.unwrap();
    a.invite("sec", &b_key).await.unwrap();
    b.join("sec").await.unwrap();
    let mut feed = b.subscribe("sec", Start::All).await.unwrap();
    a.send("sec", b"secret-one").await.unwrap();
    let m = next(&mut feed).await.unwrap();
    assert_eq!(
        (m.body.as_slice(), m.epoch, m.sender.as_str()),
        (&b"secret-one"[..], Some(2), a_key.as_str())
    );

    // A new epoch: B reads both, the history of every epoch it held.
    assert_eq!(a.rekey("sec").await.unwrap().epoch, 3);
    a.send("sec", b"secret-two").await.unwrap();
    let m = next(&mut feed).await.unwrap();
    assert_eq!((m.body.as_slice(), m.epoch), (&b"secret-two"[..], Some(3)));
    let mut history = b.subscribe("sec", Start::All).await.unwrap();
    for want in [&b"secret-one"[..], b"secret-two"] {
        assert_eq!(next(&mut history).await.unwrap().body, want);
    }
    drop(history);

    // Tampered ciphertext and an unknown epoch: typed errors, and the feed goes on.
    let js = async_nats::jetstream::new(a.nats().clone());
    let subject = format!("unibus.room.sec.{a_key}");
    let secret = a.epoch_secret("sec", 3).await.unwrap();
    let mut tampered = e2e::seal(&secret, "sec", 3, &a_key, b"flip me").unwrap();
    *tampered.last_mut().unwrap() ^= 1;
    js.publish(subject.clone(), tampered.into())
        .await
        .unwrap()
        .await
        .unwrap();
    let unknown = e2e::seal(&secret, "sec", 99, &a_key, b"from the future").unwrap();
    js.publish(subject.clone(), unknown.into())
        .await
        .unwrap()
        .await
        .unwrap();
    js.publish(subject.clone(), "plain text in an encrypted room".into())
        .await
        .unwrap()
        .await
        .unwrap();
    match next(&mut feed).await {
        Err(ClientError::Crypto(CryptoError::Tampered { epoch: 3, .. })) => {}
        other => panic!("expected a tampered error, got {other:?}"),
    }
    match next(&mut feed).await {
        Err(ClientError::Crypto(CryptoError::UnknownEpoch { epoch: 99, .. })) => {}
        other => panic!("expected an unknown epoch, got {other:?}"),
    }
    match next(&mut feed).await {
        Err(ClientError::Crypto(CryptoError::Malformed { .. })) => {}
        other => panic!("expected a malformed body, got {other:?}"),
    }
    a.send("sec", b"secret-three").await.unwrap();
    assert_eq!(next(&mut feed).await.unwrap().body, b"secret-three");

    // Removing B makes epoch 4 for A alone; B cannot open it, even holding the material.
    a.remove_member("sec", &b_key).await.unwrap();
    a.send("sec", b"after-b-left").await.unwrap();
    let latest = admin.latest_key("sec").await.unwrap().unwrap();
    assert_eq!(latest.epoch, 4);
    let b_xkey = keys::derive_xkey(&keys::read_user_seed(&b_seed).unwrap()).unwrap();
    assert!(matches!(
        e2e::unwrap("sec", 4, &latest.material, &b_key, &b_xkey),
        Err(CryptoError::NotForYou { epoch: 4, .. })
    ));
    match next(&mut feed).await {
        Err(e) => assert!(
            e.kind() == Some(ErrorKind::Forbidden)
                || matches!(e, ClientError::Crypto(CryptoError::NotForYou { .. })),
            "{e:?}"
        ),
        Ok(m) => panic!(
            "a removed member read {:?}",
            String::from_utf8_lossy(&m.body)
        ),
    }
    let refused = b.subscribe("sec", Start::All).await.err().unwrap();
    assert_eq!(refused.kind(), Some(ErrorKind::Forbidden), "{refused:?}");

    // Neither the stream nor the store holds a plaintext body or room key.
    let stored = raw_room_messages(&cluster).await;
    assert!(stored.len() >= 6, "{}", stored.len());
    let mut secrets = Vec::new();
    for epoch in 1..=4 {
        let key = admin.room_key("sec", epoch).await.unwrap();
        let text = String::from_utf8_lossy(&key.material).to_string();
        assert!(text.contains(&a_key), "wrapped for the owner: {text}");
        assert_eq!(
            text.contains(&b_key),
            (2..=3).contains(&epoch),
            "epoch {epoch}: {text}"
        );
        secrets.push(key.material);
    }
    let a_secrets: Vec<[u8; 32]> = {
        let mut v = Vec::new();
        for epoch in 1..=4 {
            v.push(*a.epoch_secret("sec", epoch).await.unwrap().as_bytes());
        }
        v
    };
    use base64::Engine;
    for body in &stored {
        for plain in [
            "secret-one",
            "secret-two",
            "secret-three",
            "after-b-left",
            "flip me",
        ] {
            assert!(
                !contains(body, plain.as_bytes()),
                "plaintext {plain} stored"
            );
        }
    }
    for material in &secrets {
        for key in &a_secrets {
            assert!(!contains(material, key));
            let b64 = base64::engine::general_purpose::STANDARD.encode(key);
            assert!(!contains(material, b64.as_bytes()));
        }
    }

    // This cluster was created by this code, so it is finalized: a node takes a write on
    // its signer's own subject without a signature, and says so in the reply.
    use unibus::auth::envelope::Envelope;
    use unibus::membership::api::{OWN_UNSIGNED_HEADER, Op};
    let me = admin.key().to_string();
    let body = serde_json::json!({ "room": "unsigned", "name": "u", "encrypted": false });
    let bound = Envelope::bound("rooms.create", &body, &me)
        .unwrap()
        .to_vec();
    let reply = admin
        .nats()
        .request(Op::RoomsCreate.own_subject(&me), bound.into())
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&reply.payload);
    assert!(text.starts_with(r#"{"ok""#), "{text}");
    let headers = reply.headers.expect("reply headers");
    assert!(headers.get(OWN_UNSIGNED_HEADER).is_some());
    assert_eq!(admin.get_room("unsigned").await.unwrap().owner, me);
}

/// A node remembers the rooms created or read through it for a second, for the owner check
/// of `members.invite` (`membership::recent`). An invite into a room deleted meanwhile
/// through another node may so be answered ok, but it must grant nothing: not in the
/// deleted room, and not in a room created since under the same id by someone else, whose
/// owner is not refused on the old room's account either. The node the delete went
/// through forgets the room at once. (This guards what the copy may cost; it would pass
/// without the copy too.)
#[test]
fn an_invite_racing_a_delete_through_another_node_grants_nothing() {
    with_cluster(invite_races_delete);
}

async fn invite_races_delete(cluster: LocalCluster) {
    let dir = tempfile::tempdir().unwrap();
    let admin = connect(&cluster, &[0], &cluster.secrets.join("admin.seed")).await;
    let mut keys = Vec::new();
    let mut seeds = Vec::new();
    for name in ["a1", "a2", "a3", "carol", "bob", "dave"] {
        let (seed, key) = user(dir.path(), name);
        admin.add_user(&key, name, false).await.unwrap();
        keys.push(key);
        seeds.push(seed);
    }
    // A room's delete disconnects its owner's connections on every node (live
    // revocation), so each case has an owner of its own, connected through node 0 (which
    // remembers) and node 1 (where the delete goes); their calls after a delete retry
    // what the disconnect drops (`invite` below).
    let owner = |i: usize| {
        let seed = seeds[i].clone();
        let cluster = &cluster;
        async move {
            (
                connect(cluster, &[0], &seed).await,
                connect(cluster, &[1], &seed).await,
            )
        }
    };
    let (bob_key, dave_key) = (&keys[4], &keys[5]);
    let carol = connect(&cluster, &[0], &seeds[3]).await;
    let carol_there = connect(&cluster, &[1], &seeds[3]).await;
    let bob = connect(&cluster, &[2], &seeds[4]).await;
    let dave = connect(&cluster, &[2], &seeds[5]).await;
    let rooms_of = |client: &Client| {
        let client = client.clone();
        async move {
            let mut rooms: Vec<String> = client
                .memberships(None)
                .await
                .unwrap()
                .into_iter()
                .map(|m| m.room)
                .collect();
            rooms.sort();
            rooms
        }
    };

    // Deleted through the node that remembers it: refused at once.
    let (here, _) = owner(0).await;
    here.create_room("gone", "", false).await.unwrap();
    here.delete_room("gone").await.unwrap();
    forbidden(
        invite(&here, "gone", bob_key).await,
        "invite into a room deleted here",
    );

    // Deleted through another node: whatever the answer, Bob gains nothing, and once the
    // window has passed the invite is refused.
    let (here, there) = owner(1).await;
    here.create_room("raced", "", false).await.unwrap();
    there.delete_room("raced").await.unwrap();
    let _either = invite(&here, "raced", bob_key).await;
    assert!(rooms_of(&bob).await.is_empty(), "Bob is in no room");
    forbidden(bob.get_room("raced").await, "Bob reads the deleted room");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match invite(&here, "raced", bob_key).await {
            Err(e) if e.kind() == Some(ErrorKind::Forbidden) => break,
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "an invite into a room deleted 10 s ago is still answered {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Deleted through another node and taken again there by Carol: the old owner's invite
    // through node 0, checked against the old room, puts nobody in Carol's, and Carol's
    // own invite through node 0, which may still hold the old room, is not refused.
    let (here, there) = owner(2).await;
    here.create_room("again", "", false).await.unwrap();
    there.delete_room("again").await.unwrap();
    carol_there.create_room("again", "", false).await.unwrap();
    let _either = invite(&here, "again", dave_key).await;
    let members: Vec<String> = carol
        .members("again")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.endpoint)
        .collect();
    assert_eq!(
        members,
        vec![keys[3].clone()],
        "Carol's room has Carol alone"
    );
    assert!(rooms_of(&dave).await.is_empty(), "Dave is in no room");
    forbidden(dave.get_room("again").await, "Dave reads Carol's room");
    carol.invite("again", dave_key).await.unwrap();
    assert_eq!(rooms_of(&dave).await, vec!["again".to_string()]);
}

/// `client.invite`, asked again while it ends in `Dropped`: a room's delete disconnects its
/// owner's connections on every node (live revocation), which may drop a call made just
/// after it.
async fn invite(
    client: &Client,
    room: &str,
    key: &str,
) -> Result<unibus::membership::Member, ClientError> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match client.invite(room, key).await {
            Err(ClientError::Dropped { .. }) if tokio::time::Instant::now() < deadline => {}
            other => return other,
        }
    }
}

fn forbidden<T: std::fmt::Debug>(result: Result<T, ClientError>, what: &str) {
    let e = result.expect_err(what);
    assert_eq!(e.kind(), Some(ErrorKind::Forbidden), "{what}: {e:?}");
}

const PROBE: &[u8] = b"probe";

/// Sends probes live from `from` until `feed` hears one, and returns what it heard.
/// Interest in a subject crosses the cluster's routes asynchronously, so the first live
/// sends may reach nobody: the mode promises no more.
async fn hear(from: &Client, room: &str, feed: &mut LiveSubscription) -> LiveMessage {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        from.send_live(room, PROBE).await.unwrap();
        if let Ok(item) = tokio::time::timeout(Duration::from_millis(250), feed.next()).await {
            return item.expect("the live subscription goes on").unwrap();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{room}: nothing heard live within {WAIT:?}"
        );
    }
}

/// The next live item that is not a late probe.
async fn next_live(feed: &mut LiveSubscription) -> Result<LiveMessage, ClientError> {
    loop {
        let item = tokio::time::timeout(WAIT, feed.next())
            .await
            .expect("a live item in time")
            .expect("the live subscription goes on");
        if !matches!(&item, Ok(m) if m.body == PROBE) {
            return item;
        }
    }
}

#[test]
fn live_messages_reach_members_only_are_sealed_and_never_stored() {
    with_cluster(live_mode);
}

async fn live_mode(cluster: LocalCluster) {
    let dir = tempfile::tempdir().unwrap();
    let admin = connect(&cluster, &[0], &cluster.secrets.join("admin.seed")).await;
    let (a_seed, a_key) = user(dir.path(), "a");
    let (b_seed, b_key) = user(dir.path(), "b");
    let (c_seed, c_key) = user(dir.path(), "c");
    for (key, name) in [(&a_key, "a"), (&b_key, "b"), (&c_key, "c")] {
        admin.add_user(key, name, false).await.unwrap();
    }
    let a = connect(&cluster, &[0], &a_seed).await;
    let b = connect(&cluster, &[2], &b_seed).await;
    let c = connect(&cluster, &[1], &c_seed).await;
    b.register_xkey().await.unwrap();
    a.create_room("lv", "", false).await.unwrap();
    a.create_room("lvs", "", true).await.unwrap();
    for room in ["lv", "lvs"] {
        a.invite(room, &b_key).await.unwrap();
        b.join(room).await.unwrap();
    }
    let stored_before = rooms_last_seq(&cluster).await;

    // A plain room: B on node 3 hears A on node 1, in order, the sender vouched for by
    // the subject.
    let mut plain = b.subscribe_live("lv").await.unwrap();
    let heard = hear(&a, "lv", &mut plain).await;
    assert_eq!((heard.sender(), heard.epoch), (a_key.as_str(), None));
    assert_eq!(heard.room(), "lv");
    for i in 0..20 {
        a.send_live("lv", format!("m{i}")).await.unwrap();
    }
    for i in 0..20 {
        let m = next_live(&mut plain).await.unwrap();
        assert_eq!(m.body, format!("m{i}").as_bytes());
    }

    // An encrypted room: sealed under the current epoch like a durable send, opened by B.
    let mut sealed = b.subscribe_live("lvs").await.unwrap();
    hear(&a, "lvs", &mut sealed).await;
    a.send_live("lvs", "secret-live").await.unwrap();
    let m = next_live(&mut sealed).await.unwrap();
    assert_eq!(
        (&m.body[..], m.epoch, m.sender()),
        (&b"secret-live"[..], Some(2), a_key.as_str())
    );

    // Bad bodies from a member: typed errors, and the subscription goes on.
    let subject = format!("unibus.live.lvs.{a_key}");
    let secret = a.epoch_secret("lvs", 2).await.unwrap();
    let mut tampered = e2e::seal(&secret, "lvs", 2, &a_key, b"flip me").unwrap();
    *tampered.last_mut().unwrap() ^= 1;
    let unknown = e2e::seal(&secret, "lvs", 99, &a_key, b"from the future").unwrap();
    let as_b = e2e::seal(&secret, "lvs", 2, &b_key, b"claims to be b").unwrap();
    for body in [
        tampered,
        unknown,
        as_b,
        b"plain text in an encrypted room".to_vec(),
    ] {
        a.nats()
            .publish(subject.clone(), body.into())
            .await
            .unwrap();
    }
    a.send_live("lvs", "after the junk").await.unwrap();
    let crypto = |item: Result<LiveMessage, ClientError>| match item {
        Err(ClientError::Crypto(e)) => e,
        other => panic!("expected a crypto error, got {other:?}"),
    };
    assert!(matches!(
        crypto(next_live(&mut sealed).await),
        CryptoError::Tampered { epoch: 2, .. }
    ));
    assert!(matches!(
        crypto(next_live(&mut sealed).await),
        CryptoError::UnknownEpoch { epoch: 99, .. }
    ));
    // Sealed for another sender than the subject names: the sender is the subject's.
    assert!(matches!(
        crypto(next_live(&mut sealed).await),
        CryptoError::Tampered { .. }
    ));
    assert!(matches!(
        crypto(next_live(&mut sealed).await),
        CryptoError::Malformed { .. }
    ));
    assert_eq!(
        next_live(&mut sealed).await.unwrap().body,
        &b"after the junk"[..]
    );

    // A subject that names no single sender (only the nodes' own identity can publish
    // one under enforce) is skipped and counted, never handed out.
    let app = app_connection(&cluster, 2).await;
    let good = e2e::seal(&secret, "lvs", 2, &a_key, b"from a good subject").unwrap();
    app.publish(
        format!("unibus.live.lvs.{a_key}.extra"),
        good.clone().into(),
    )
    .await
    .unwrap();
    app.publish(subject.clone(), good.into()).await.unwrap();
    app.flush().await.unwrap();
    assert_eq!(
        next_live(&mut sealed).await.unwrap().body,
        &b"from a good subject"[..]
    );
    assert_eq!(sealed.skipped(), 1);
    assert_eq!(plain.skipped(), 0);

    // Non-members get a typed refusal from both calls (the server's own refusal of the
    // subjects is in tests/security.rs).
    let denied = c.subscribe_live("lv").await.err().unwrap();
    assert_eq!(denied.kind(), Some(ErrorKind::Forbidden), "{denied:?}");
    let denied = c.send_live("lv", "let me in").await.unwrap_err();
    assert_eq!(denied.kind(), Some(ErrorKind::Forbidden), "{denied:?}");

    // The CLI: `listen --live` on node 2 hears `send --live` from node 1.
    let listener = std::process::Command::new(UNIBUS)
        .args(["listen", "lv", "--live", "--json", "--count", "1"])
        .args(["--timeout", "60", "--server", &url(&cluster, 1), "--ca"])
        .arg(cluster.secrets.join("ca.crt"))
        .arg("--seed-file")
        .arg(&b_seed)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut listener = Some(listener);
    let deadline = std::time::Instant::now() + WAIT;
    let output = loop {
        let child = listener.as_mut().unwrap();
        if child.try_wait().unwrap().is_some() {
            break listener.take().unwrap().wait_with_output().unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the CLI listener heard nothing"
        );
        let out = ok(cli(
            &cluster,
            0,
            &a_seed,
            &["send", "lv", "--live", "--json", "via the cli"],
        ));
        let sent: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(sent, serde_json::json!({"room": "lv", "live": true}));
    };
    let (out, err) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(output.status.success(), "{out}\n{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{out}");
    let line = &lines[0];
    assert_eq!(line["room"], "lv");
    assert_eq!(line["sender"], a_key.as_str());
    assert_eq!(line["body"], "via the cli");
    assert_eq!(line["live"], true);
    assert!(
        line.get("seq").is_none(),
        "live messages have no sequence: {line}"
    );
    assert!(line["time"].as_str().unwrap().ends_with('Z'), "{line}");
    refused(
        cli(
            &cluster,
            1,
            &c_seed,
            &["listen", "lv", "--live", "--timeout", "5"],
        ),
        "forbidden",
    );
    refused(
        cli(&cluster, 0, &c_seed, &["send", "lv", "--live", "hi"]),
        "forbidden",
    );
    let (code, _, err) = cli(
        &cluster,
        0,
        &b_seed,
        &["listen", "lv", "--live", "--since", "3"],
    );
    assert_eq!(code, 2, "live has no history to resume: {err}");

    // Nothing live was stored.
    assert_eq!(rooms_last_seq(&cluster).await, stored_before);

    // A removed member's live subscription ends with the refusal (and the server refuses
    // it the subject: tests/security.rs). A fresh one: `plain` holds what the CLI sent.
    drop(plain);
    let mut removed = b.subscribe_live("lv").await.unwrap();
    a.remove_member("lv", &b_key).await.unwrap();
    match next_live(&mut removed).await {
        Err(e) => assert_eq!(e.kind(), Some(ErrorKind::Forbidden), "{e:?}"),
        Ok(m) => panic!("a removed member heard {:?}", m.body),
    }
    let end = tokio::time::timeout(WAIT, removed.next()).await;
    assert!(matches!(end, Ok(None)), "the subscription ends: {end:?}");
}

/// How the listener's node goes away.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Failure {
    /// SIGKILL of the unibus node (its nats-server dies with it).
    Kill,
    /// SIGTERM: lame duck (clients are moved to peers), then a clean stop.
    LameDuck,
}

#[test]
fn a_listener_misses_nothing_when_its_node_is_killed_mid_stream() {
    with_cluster(|c| listener_survives(c, Failure::Kill));
}

#[test]
fn a_listener_misses_nothing_when_its_node_goes_into_lame_duck() {
    with_cluster(|c| listener_survives(c, Failure::LameDuck));
}

async fn listener_survives(mut cluster: LocalCluster, failure: Failure) {
    let dir = tempfile::tempdir().unwrap();
    let admin = connect(&cluster, &[1], &cluster.secrets.join("admin.seed")).await;
    let (a_seed, a_key) = user(dir.path(), "a");
    let (b_seed, b_key) = user(dir.path(), "b");
    admin.add_user(&a_key, "a", false).await.unwrap();
    admin.add_user(&b_key, "b", false).await.unwrap();
    let a = connect(&cluster, &[1, 2], &a_seed).await;
    a.create_room("dur", "", false).await.unwrap();
    a.invite("dur", &b_key).await.unwrap();
    // The listener is on node 1, with the others to fail over to.
    let b = connect(&cluster, &[0, 1, 2], &b_seed).await;
    b.join("dur").await.unwrap();
    assert_eq!(b.nats().server_info().server_name, "n1");
    let mut feed = b.subscribe("dur", Start::All).await.unwrap();

    // The sender keeps sending (each send retries until acknowledged).
    let total = 60u32;
    let (acked_tx, mut acked_rx) = tokio::sync::mpsc::unbounded_channel();
    let sender = tokio::spawn(async move {
        for i in 0..total {
            let body = format!("m{i}");
            match a.send("dur", body.as_bytes()).await {
                Ok(seq) => acked_tx.send((seq, body)).unwrap(),
                Err(e) => panic!("send {i} was never acknowledged: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });

    let mut got: Vec<(u64, String)> = Vec::new();
    while got.len() < 15 {
        let m = next(&mut feed).await.unwrap();
        got.push((m.seq, String::from_utf8(m.body).unwrap()));
    }
    // Node 1 goes away mid-stream.
    let node = &mut cluster.nodes[0];
    match failure {
        Failure::Kill => {
            let nats_pid = node.nats_pid();
            node.signal(libc::SIGKILL);
            if let Some(pid) = nats_pid {
                kill(pid, libc::SIGKILL);
            }
            node.wait_exit(Duration::from_secs(10))
                .expect("node 1 is dead");
        }
        Failure::LameDuck => node.signal(libc::SIGTERM),
    }

    sender.await.unwrap();
    let mut acked = Vec::new();
    while let Ok(x) = acked_rx.try_recv() {
        acked.push(x);
    }
    assert_eq!(acked.len(), total as usize);
    while got.len() < acked.len() {
        let m = next(&mut feed).await.unwrap();
        got.push((m.seq, String::from_utf8(m.body).unwrap()));
    }
    assert_eq!(
        got, acked,
        "every acknowledged message exactly once, in order"
    );
    // The listener leaves node 1: at once when it was killed; within the lame-duck
    // duration (nats-server closes clients spread over it) when it went into lame duck.
    let deadline = std::time::Instant::now() + Duration::from_secs(45);
    while b.nats().server_info().server_name == "n1" {
        assert!(
            std::time::Instant::now() < deadline,
            "the listener never left node 1"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And nothing more trickles in (no duplicates later).
    let extra = tokio::time::timeout(Duration::from_secs(3), feed.next()).await;
    assert!(extra.is_err(), "unexpected extra item: {extra:?}");
}

/// Where a write goes when nodes do not serve every subject (a stopping node, nodes from
/// before own subjects): the node the connection is on, else any node, else the public
/// subject, each signed for where it is sent. A plain nats-server (no auth: the subjects'
/// permissions are not what is tested here) and raw responders standing in for the nodes
/// of each kind; each signature is checked by `auth::envelope`, as a node checks it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_go_to_the_nearest_subject_served_and_are_signed_for_it() {
    use unibus::auth::envelope::{self, Limits, ReplayCache};
    use unibus::membership::api::Op;

    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start("s1", dir.path(), server_ports(), "");
    let key = nkeys::KeyPair::new_user();
    let seed = dir.path().join("user.seed");
    keys::write_seed(&seed, &key).unwrap();
    let mut options = ClientOptions::new([server.url()], &seed);
    // Long enough for a stand-in's answer on a machine busy with a cluster test beside
    // this one (1 s was not, once); the silent stand-in below waits it out once.
    options.request_timeout = Duration::from_secs(5);
    options.own_subjects_retry = Duration::from_secs(3);
    let client = Client::connect(options).await.unwrap();
    let me = key.public_key();
    let raw = async_nats::connect(server.url()).await.unwrap();
    // What the responders were sent: (subject, envelope).
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    // Answers `answer` on `subject` (none if `None`) until aborted, reporting what came.
    let serve_with = |subject: String, answer: Option<&'static str>| {
        let (raw, seen_tx) = (raw.clone(), seen_tx.clone());
        async move {
            let mut sub = raw.subscribe(subject).await.unwrap();
            raw.flush().await.unwrap();
            let task = tokio::spawn(async move {
                while let Some(msg) = sub.next().await {
                    let _ = seen_tx.send((msg.subject.to_string(), msg.payload.clone()));
                    if let (Some(reply), Some(answer)) = (msg.reply, answer) {
                        let _ = raw.publish(reply, answer.into()).await;
                        let _ = raw.flush().await;
                    }
                }
            });
            task.abort_handle()
        }
    };
    let serve = |subject: String| serve_with(subject, Some("{\"ok\":{}}"));
    let body = serde_json::json!({ "room": "r1" });
    let (replay, limits) = (ReplayCache::default(), Limits::default());
    let now = envelope::unix_ms_now;

    // Only the public subject is served (nodes from before own subjects): the write ends
    // there, signed for it.
    let public = serve(Op::RoomsCreate.subject()).await;
    client.call_raw(Op::RoomsCreate, &body).await.unwrap();
    let (subject, payload) = seen.recv().await.unwrap();
    assert_eq!(subject, "unibus.ctl.rooms.create");
    envelope::verify(&payload, "rooms.create", now(), &replay, &limits).unwrap();

    // The client remembers that nobody serves own subjects: while it does, writes go
    // straight to the public subject, even once a node serves them (an upgrade)...
    let any = serve(Op::RoomsCreate.own_subject(&me)).await;
    client.call_raw(Op::RoomsCreate, &body).await.unwrap();
    let (subject, _) = seen.recv().await.unwrap();
    assert_eq!(subject, "unibus.ctl.rooms.create");

    // ...and after `own_subjects_retry` tries them again. Own subjects at any node, but not
    // at this one (it is stopping, say): there.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let (subject, payload) = loop {
        client.call_raw(Op::RoomsCreate, &body).await.unwrap();
        let (subject, payload) = seen.recv().await.unwrap();
        if subject != "unibus.ctl.rooms.create" || tokio::time::Instant::now() > deadline {
            break (subject, payload);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(subject, format!("unibus.ctl.rooms.create.{me}"));
    envelope::verify_on_own_subject(&payload, "rooms.create", &me, now(), &replay, &limits)
        .unwrap();

    // The connection's own node serves it: there, and nowhere else.
    let node = client.nats().server_info().server_name;
    assert_eq!(node, "s1");
    let here = serve(Op::RoomsCreate.own_subject_at(&me, &node)).await;
    client.call_raw(Op::RoomsCreate, &body).await.unwrap();
    let (subject, payload) = seen.recv().await.unwrap();
    assert_eq!(subject, format!("unibus.ctl.rooms.create.{me}.s1"));
    envelope::verify_on_own_subject(&payload, "rooms.create", &me, now(), &replay, &limits)
        .unwrap();
    assert!(seen.try_recv().is_err(), "one write, one request");

    // A refusal or a timeout where the write went is the answer: the write is never sent
    // on to another subject, where it could take effect a second time.
    here.abort();
    let refusing = serve_with(
        Op::RoomsCreate.own_subject_at(&me, &node),
        Some(r#"{"error":{"kind":"conflict","message":"no"}}"#),
    )
    .await;
    let refused = client.call_raw(Op::RoomsCreate, &body).await.unwrap();
    assert!(String::from_utf8_lossy(&refused).contains("conflict"));
    refusing.abort();
    let silent = serve_with(Op::RoomsCreate.own_subject_at(&me, &node), None).await;
    assert!(matches!(
        client.call_raw(Op::RoomsCreate, &body).await,
        Err(ClientError::Timeout { .. })
    ));
    let mut subjects = Vec::new();
    while let Ok((subject, _)) = seen.try_recv() {
        subjects.push(subject);
    }
    let at_node = format!("unibus.ctl.rooms.create.{me}.s1");
    assert_eq!(subjects, vec![at_node.clone(), at_node.clone()]);
    silent.abort();

    // A node of a finalized cluster says it takes own-subject writes unsigned: from then
    // on the client stops signing them. One refused as unauthenticated anyway (a node
    // that has not read the finalized version yet) is signed and sent again.
    let refuse_unsigned = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut sub = raw.subscribe(at_node.clone()).await.unwrap();
    raw.flush().await.unwrap();
    let finalized = {
        let (raw, seen_tx, refuse) = (raw.clone(), seen_tx.clone(), refuse_unsigned.clone());
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let envelope: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
                let signed = envelope["sig"].is_string();
                let _ = seen_tx.send((signed.to_string(), msg.payload.clone()));
                let mut headers = async_nats::HeaderMap::new();
                let answer = if !signed && refuse.load(std::sync::atomic::Ordering::SeqCst) {
                    headers.insert("Nats-Service-Error-Code", "401");
                    r#"{"error":{"kind":"unauthenticated","message":"unsigned"}}"#
                } else {
                    headers.insert(unibus::membership::api::OWN_UNSIGNED_HEADER, "1");
                    r#"{"ok":{}}"#
                };
                if let Some(reply) = msg.reply {
                    let _ = raw
                        .publish_with_headers(reply, headers, answer.into())
                        .await;
                    let _ = raw.flush().await;
                }
            }
        })
    };
    let signed_or_not =
        |seen: &mut tokio::sync::mpsc::UnboundedReceiver<(String, bytes::Bytes)>| {
            // Each checked the way a node checks it.
            let mut out = Vec::new();
            while let Ok((signed, payload)) = seen.try_recv() {
                let (op, now) = ("rooms.create", now());
                let verified =
                    envelope::verify_on_own_subject(&payload, op, &me, now, &replay, &limits);
                if signed == "true" {
                    verified.unwrap();
                } else {
                    assert!(matches!(verified, Err(envelope::EnvelopeError::Unsigned)));
                    envelope::accept_on_own_subject(&payload, op, &me, now, &replay, &limits)
                        .unwrap();
                }
                out.push(signed);
            }
            out
        };
    for _ in 0..2 {
        client.call_raw(Op::RoomsCreate, &body).await.unwrap();
    }
    assert_eq!(signed_or_not(&mut seen), ["true", "false"]);
    refuse_unsigned.store(true, std::sync::atomic::Ordering::SeqCst);
    let answer = client.call_raw(Op::RoomsCreate, &body).await.unwrap();
    assert_eq!(answer.as_ref(), br#"{"ok":{}}"#);
    assert_eq!(signed_or_not(&mut seen), ["false", "true"]);
    finalized.abort();

    // Reads: in full (key and nonce) until a node says every node takes minimal ones,
    // then only op and body (the key is in the reply inbox).
    let mut reads = raw.subscribe(Op::UsersGet.subject()).await.unwrap();
    raw.flush().await.unwrap();
    let reader = {
        let (raw, seen_tx) = (raw.clone(), seen_tx.clone());
        tokio::spawn(async move {
            while let Some(msg) = reads.next().await {
                let envelope: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
                let form = if envelope.get("key").is_some() {
                    "full"
                } else {
                    "minimal"
                };
                let _ = seen_tx.send((form.to_string(), msg.payload.clone()));
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(unibus::membership::api::MINIMAL_READS_HEADER, "1");
                if let Some(reply) = msg.reply {
                    let _ = raw
                        .publish_with_headers(reply, headers, "{\"ok\":{}}".into())
                        .await;
                    let _ = raw.flush().await;
                }
            }
        })
    };
    let me_body = serde_json::json!({ "key": me });
    for _ in 0..2 {
        client.call_raw(Op::UsersGet, &me_body).await.unwrap();
    }
    let mut forms = Vec::new();
    while let Ok((form, payload)) = seen.try_recv() {
        if form == "minimal" {
            let inbox = format!("_INBOX.{me}.x");
            let read =
                envelope::verify_read(&payload, "users.get", Some(&inbox), now(), &replay, &limits)
                    .unwrap();
            assert!(read.minimal && read.key == me);
        }
        forms.push(form);
    }
    assert_eq!(forms, ["full", "minimal"]);
    reader.abort();
    for task in [public, any] {
        task.abort();
    }
}
