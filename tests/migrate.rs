//! `unibus migrate`: real SQLite files into a real three-node loopback cluster (R1).
//!
//! One big test (10k users, 1k rooms, 50k members, 2k keys) covers the copy, an
//! interruption half-way and the resume, the idempotent re-run and the dry run; the
//! smaller tests cover conflicts, index repair and the command line.

mod common;

use common::{Cluster, cluster3, connect, free_port, unibus, user_key};
use ring::digest::{SHA256, digest};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use unibus::membership::jetstream::{BUCKETS, KvOptions, KvStore};
use unibus::membership::migrate::{self, Kind, MigrateOptions, MigrateReport, Progress};
use unibus::membership::sqlite::SqliteStore;
use unibus::membership::{MemberState, Role, Store, StoreError};

// ---- seeding

/// Sizes of a seeded source.
struct Sizes {
    users: usize,
    rooms: usize,
    members_per_room: usize,
    keys_per_room: u32,
}

/// Seeds a SQLite store: the schema, one admin and one room through the `Store` API, the
/// bulk through rusqlite in one transaction (one `Store` call per record would be 60k
/// fsyncs). Returns the path and the user keys (index 0 is the admin).
async fn seed(dir: &Path, sizes: &Sizes) -> (PathBuf, Vec<String>) {
    let path = dir.join("store.db");
    let users: Vec<String> = (0..sizes.users).map(|_| user_key()).collect();
    let store = Store::Sqlite(SqliteStore::open(&path).await.unwrap());
    store.add_user(&users[0], "admin", true).await.unwrap();
    store
        .create_room("room-0", "room 0", &users[0], true)
        .await
        .unwrap();
    store.put_room_key("room-0", 1, b"key-0-1").await.unwrap();
    store.close().await.unwrap();

    let mut conn = rusqlite::Connection::open(&path).unwrap();
    let tx = conn.transaction().unwrap();
    {
        let mut add_user = tx
            .prepare("INSERT INTO users (key, name, admin, created_at, revoked_at) VALUES (?1, ?2, ?3, ?4, ?5)")
            .unwrap();
        for (i, key) in users.iter().enumerate().skip(1) {
            let revoked = (i % 97 == 0).then_some(1_700_000_000_000i64 + i as i64);
            add_user
                .execute(rusqlite::params![
                    key,
                    format!("user {i}"),
                    i % 500 == 0,
                    i as i64,
                    revoked
                ])
                .unwrap();
        }
        let mut add_room = tx
            .prepare("INSERT INTO rooms VALUES (?1, ?2, ?3, ?4, ?5)")
            .unwrap();
        let mut add_member = tx
            .prepare("INSERT INTO members VALUES (?1, ?2, ?3, ?4, ?5, ?6)")
            .unwrap();
        let mut add_key = tx
            .prepare("INSERT INTO room_keys VALUES (?1, ?2, ?3, ?4)")
            .unwrap();
        let others = users.len() - sizes.rooms;
        for r in 0..sizes.rooms {
            let room = format!("room-{r}");
            let owner = &users[r];
            if r > 0 {
                add_room
                    .execute(rusqlite::params![
                        room,
                        format!("room {r}"),
                        owner,
                        r % 2 == 0,
                        r as i64
                    ])
                    .unwrap();
                add_member
                    .execute(rusqlite::params![
                        room, owner, "owner", "joined", owner, r as i64
                    ])
                    .unwrap();
            }
            // Endpoints outside the owners' range, distinct within a room.
            for j in 0..sizes.members_per_room - 1 {
                let endpoint = &users[sizes.rooms + (r * 49 + j) % others];
                let state = if j % 3 == 0 { "invited" } else { "joined" };
                add_member
                    .execute(rusqlite::params![
                        room, endpoint, "member", state, owner, j as i64
                    ])
                    .unwrap();
            }
            let first_epoch = if r == 0 { 2 } else { 1 };
            for epoch in first_epoch..=sizes.keys_per_room {
                let material: Vec<u8> = (0..32u8).map(|b| b ^ (r as u8) ^ (epoch as u8)).collect();
                add_key
                    .execute(rusqlite::params![room, epoch, material, epoch as i64])
                    .unwrap();
            }
        }
    }
    tx.commit().unwrap();
    conn.close().unwrap();
    (path, users)
}

fn file_hash(path: &Path) -> Vec<u8> {
    digest(&SHA256, &std::fs::read(path).unwrap())
        .as_ref()
        .to_vec()
}

// ---- the target

async fn open(cluster: &Cluster, create: bool) -> Result<KvStore, StoreError> {
    let client = connect(&cluster.urls()).await;
    let opts = KvOptions {
        replicas: 1,
        create,
        // Each step of a scan is bounded by this. The default (2 s) is a node's budget
        // for one request; on a loaded 2-core CI machine, one step of the 10,000-record
        // scan below once stalled past it, which says nothing about the migration.
        op_timeout: std::time::Duration::from_secs(10),
        ..KvOptions::default()
    };
    KvStore::open(client, opts).await
}

/// Sum of the buckets' last sequences: moves with every write, create or overwrite.
async fn write_mark(kv: &KvStore) -> u64 {
    let mut total = 0;
    for name in BUCKETS {
        let status = kv.bucket(name).unwrap().status().await.unwrap();
        total += status.info.state.last_sequence;
    }
    total
}

fn kind(report: &MigrateReport, kind: Kind) -> &migrate::KindReport {
    report.kinds.iter().find(|k| k.kind == kind).unwrap()
}

fn quiet(_: &Progress) {}

async fn run(source: &Path, kv: &KvStore, opts: MigrateOptions) -> MigrateReport {
    migrate::migrate(source, kv, opts, &quiet).await.unwrap()
}

fn dry() -> MigrateOptions {
    MigrateOptions {
        dry_run: true,
        ..MigrateOptions::default()
    }
}

// ---- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_migration_is_verified_resumable_and_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let sizes = Sizes {
        users: 10_000,
        rooms: 1_000,
        members_per_room: 50,
        keys_per_room: 2,
    };
    let t = Instant::now();
    let (source, users) = seed(dir.path(), &sizes).await;
    eprintln!("seeded sqlite in {:?}", t.elapsed());
    let source_hash = file_hash(&source);
    let expected = [
        (Kind::Users, 10_000),
        (Kind::Rooms, 1_000),
        (Kind::Members, 50_000),
        (Kind::RoomKeys, 2_000),
    ];
    let total: usize = expected.iter().map(|(_, n)| n).sum();

    let cluster = cluster3();
    let kv = open(&cluster, true).await.unwrap();

    // Dry run into empty buckets: everything is new, nothing is written.
    let mark = write_mark(&kv).await;
    let report = run(&source, &kv, dry()).await;
    assert!(report.dry_run && !report.verified);
    for (k, n) in expected {
        let r = kind(&report, k);
        assert_eq!(
            (r.source, r.target, r.new, r.written),
            (n, 0, n, 0),
            "{k:?}"
        );
    }
    assert_eq!(write_mark(&kv).await, mark, "a dry run wrote");

    // Interrupt half-way (in the members stage) by dropping the future.
    let stop = AtomicBool::new(false);
    let wake = Arc::new(tokio::sync::Notify::new());
    let progress = |p: &Progress| {
        if p.written >= total / 2 && !stop.swap(true, Ordering::SeqCst) {
            wake.notify_one();
        }
    };
    let t = Instant::now();
    tokio::select! {
        res = migrate::migrate(&source, &kv, MigrateOptions::default(), &progress) => {
            panic!("finished before the interruption: {res:?}")
        }
        () = wake.notified() => {}
    }
    let first_part = t.elapsed();
    let partial = run(&source, &kv, dry()).await;
    let done_before: usize = partial.kinds.iter().map(|k| k.unchanged).sum();
    assert!(
        done_before >= total / 3 && done_before < total,
        "interrupted run left {done_before} of {total} records"
    );
    assert_eq!(kind(&partial, Kind::Users).unchanged, 10_000);
    assert_eq!(kind(&partial, Kind::RoomKeys).unchanged, 0);
    assert!(!partial.verified);

    // Resume: copies the rest and verifies.
    let t = Instant::now();
    let stages = |p: &Progress| {
        if p.done == 0 {
            eprintln!("{:>8.1?} {:?} ({} records)", t.elapsed(), p.stage, p.total);
        }
    };
    let resumed = migrate::migrate(&source, &kv, MigrateOptions::default(), &stages)
        .await
        .unwrap();
    let second_part = t.elapsed();
    eprintln!("interrupted run {first_part:?} + resumed run {second_part:?} (debug build)");
    assert!(resumed.verified, "{}", migrate::table(&resumed));
    assert_eq!(resumed.source_digest, resumed.target_digest);
    assert_eq!(resumed.index_missing, 0);
    assert_eq!(resumed.conflicts(), 0);
    for (k, n) in expected {
        let r = kind(&resumed, k);
        assert_eq!((r.source, r.target), (n, n), "{k:?}");
        assert_eq!(r.new + r.unchanged, n, "{k:?}");
    }
    assert_eq!(kind(&resumed, Kind::Users).written, 0);
    assert_eq!(kind(&resumed, Kind::RoomKeys).written, 2_000);
    assert!(resumed.written() >= total - done_before);

    // Re-run after success: nothing written, same digests.
    let mark = write_mark(&kv).await;
    let again = run(&source, &kv, MigrateOptions::default()).await;
    assert_eq!(again.written(), 0);
    assert!(again.verified);
    assert_eq!(again.target_digest, resumed.target_digest);
    assert_eq!(write_mark(&kv).await, mark, "an idempotent re-run wrote");

    // The copy answers like the source through the Store API.
    let target = Store::JetStream(kv);
    let endpoint = &users[sizes.rooms + 7];
    let rooms = target.list_rooms_for_endpoint(endpoint).await.unwrap();
    assert!(!rooms.is_empty());
    assert!(rooms.iter().all(|m| m.role == Role::Member));
    assert_eq!(
        target
            .latest_room_key("room-0")
            .await
            .unwrap()
            .unwrap()
            .epoch,
        2
    );
    assert!(
        !target.is_authorized(&users[97]).await,
        "revoked user authorized"
    );
    assert!(target.is_authorized(&users[98]).await);
    assert!(target.has_admin().await);

    assert_eq!(file_hash(&source), source_hash, "the source file changed");
}

/// A small source through the `Store` API: 3 users, 2 rooms, 4 members, 3 keys.
async fn small_source(dir: &Path) -> (PathBuf, Vec<String>) {
    let path = dir.join("small.db");
    let users: Vec<String> = (0..3).map(|_| user_key()).collect();
    let store = Store::Sqlite(SqliteStore::open(&path).await.unwrap());
    store.add_user(&users[0], "alice", true).await.unwrap();
    store.add_user(&users[1], "bob", false).await.unwrap();
    store.add_user(&users[2], "carol", false).await.unwrap();
    store.revoke_user(&users[2]).await.unwrap();
    store
        .create_room("ops", "Ops", &users[0], true)
        .await
        .unwrap();
    store
        .create_room("dev", "Dev", &users[1], false)
        .await
        .unwrap();
    store
        .add_member(
            "ops",
            &users[1],
            Role::Member,
            MemberState::Invited,
            &users[0],
        )
        .await
        .unwrap();
    store
        .add_member(
            "dev",
            &users[0],
            Role::Member,
            MemberState::Joined,
            &users[1],
        )
        .await
        .unwrap();
    store.put_room_key("ops", 1, b"one").await.unwrap();
    store.put_room_key("ops", 3, b"three").await.unwrap();
    store.rekey("dev", b"dev-one").await.unwrap();
    store.close().await.unwrap();
    (path, users)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicts_are_reported_and_kept_unless_overwrite_and_a_lost_index_is_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let (source, users) = small_source(dir.path()).await;
    let cluster = cluster3();
    let kv = open(&cluster, true).await.unwrap();
    let target = Store::JetStream(kv.clone());

    // The same user key with another name: a conflict.
    target
        .add_user(&users[1], "someone else", false)
        .await
        .unwrap();
    let report = run(&source, &kv, MigrateOptions::default()).await;
    assert!(!report.verified);
    assert_eq!(kind(&report, Kind::Users).conflicts, 1);
    assert_eq!(
        report.conflict_examples,
        vec![format!("users/{}", users[1])]
    );
    assert_ne!(report.source_digest, report.target_digest);
    assert_eq!(
        target.get_user(&users[1]).await.unwrap().name,
        "someone else"
    );
    assert!(migrate::table(&report).contains("NOT verified"));

    // Lose one index entry, as if the second write of a member never happened.
    let index = kv.bucket("rooms_by_member").unwrap();
    index.purge(format!("{}.ops", users[1])).await.unwrap();
    let gap = run(&source, &kv, dry()).await;
    assert_eq!(gap.index_missing, 1);
    assert_eq!(kind(&gap, Kind::Members).new, 1);

    let fixed = run(
        &source,
        &kv,
        MigrateOptions {
            overwrite: true,
            ..MigrateOptions::default()
        },
    )
    .await;
    assert!(fixed.verified, "{}", migrate::table(&fixed));
    assert_eq!(kind(&fixed, Kind::Users).written, 1);
    assert_eq!(kind(&fixed, Kind::Members).written, 1);
    assert_eq!(fixed.written(), 2);
    assert_eq!(target.get_user(&users[1]).await.unwrap().name, "bob");
    let rooms = target.list_rooms_for_endpoint(&users[1]).await.unwrap();
    assert_eq!(
        rooms.iter().map(|m| m.room.as_str()).collect::<Vec<_>>(),
        ["dev", "ops"]
    );
}

#[test]
fn cli_refuses_bad_sources_with_exit_2_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let dead = format!("nats://127.0.0.1:{}", free_port());
    // `unibus migrate --from FROM ARGS…` must exit 2; its stderr, for the reason.
    let refused = |from: &std::path::Path, args: &[&str]| {
        let mut all = vec!["migrate", "--from", from.to_str().unwrap()];
        all.extend_from_slice(args);
        let (code, _, err) = unibus(&all);
        assert_eq!(code, 2, "{err}");
        err
    };
    let err = refused(&dir.path().join("missing.db"), &["--server", &dead]);
    assert!(err.contains("no such file"), "{err}");

    let garbage = dir.path().join("garbage.db");
    std::fs::write(&garbage, vec![0x42u8; 8192]).unwrap();
    let err = refused(&garbage, &["--server", &dead]);
    assert!(err.contains("not a SQLite database"), "{err}");

    let other = dir.path().join("other.db");
    rusqlite::Connection::open(&other)
        .unwrap()
        .execute_batch("CREATE TABLE t (x INTEGER);")
        .unwrap();
    let err = refused(&other, &["--server", &dead]);
    assert!(err.contains("not a unibus database"), "{err}");

    refused(&other, &["--replicas", "6"]);

    // A store request bound of zero would fail every request: refused as usage.
    let err = refused(&other, &["--op-timeout-secs", "0"]);
    assert!(err.contains("--op-timeout-secs"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_dry_run_writes_nothing_then_migrates_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let (source, _) = small_source(dir.path()).await;
    let hash = file_hash(&source);
    let files_before = files(dir.path());
    let cluster = cluster3();
    let servers = cluster.urls().join(",");
    let from = source.to_str().unwrap().to_string();

    // A valid source and no server: the cluster is unavailable, exit 1.
    let dead = format!("nats://127.0.0.1:{}", free_port());
    let (code, _, err) = unibus(&["migrate", "--from", &from, "--server", &dead]);
    assert_eq!(code, 1, "{err}");

    // Dry run on a cluster without buckets: reports, creates nothing.
    let (code, out, err) = unibus(&[
        "migrate",
        "--from",
        &from,
        "--server",
        &servers,
        "--dry-run",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("dry run: nothing written; a run would write 12 records"),
        "{out}"
    );
    assert!(err.contains("migrate: reading the source"), "{err}");
    assert!(
        matches!(
            open(&cluster, false).await,
            Err(StoreError::NotFound { .. })
        ),
        "a dry run created buckets"
    );

    // The real run, as JSON, with a store request bound of its own.
    let (code, out, err) = unibus(&[
        "migrate",
        "--from",
        &from,
        "--server",
        &servers,
        "--json",
        "--op-timeout-secs",
        "30",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["verified"], true);
    assert_eq!(report["source_digest"], report["target_digest"]);
    let written: u64 = report["kinds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["written"].as_u64().unwrap())
        .sum();
    assert_eq!(written, 12);
    assert!(err.contains("migrate: members 4/4"), "{err}");

    // A dry run now: already equal, nothing written.
    let kv = open(&cluster, false).await.unwrap();
    let mark = write_mark(&kv).await;
    let (code, out, err) = unibus(&[
        "migrate",
        "--from",
        &from,
        "--server",
        &servers,
        "--dry-run",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("the target already holds the source"), "{out}");
    assert_eq!(write_mark(&kv).await, mark);
    assert_eq!(file_hash(&source), hash, "the source file changed");
    // A read-only connection to a WAL database may create the `-wal`/`-shm` side files
    // (SQLite's shared-memory index); they must hold no data.
    for name in files(dir.path()) {
        if files_before.contains(&name) {
            continue;
        }
        assert!(
            ["small.db-shm", "small.db-wal"].contains(&name.as_str()),
            "{name}"
        );
        if name.ends_with("-wal") {
            let len = std::fs::metadata(dir.path().join(&name)).unwrap().len();
            assert_eq!(len, 0, "migrate wrote to the source's WAL");
        }
    }
}

fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

// ---- room history (`--history`)

/// A client of `listen` as the seed in `seed`, pinning `ca`.
async fn history_client(listen: &str, seed: &Path, ca: &Path) -> unibus::client::Client {
    let mut options = unibus::client::ClientOptions::new([format!("tls://{listen}")], seed);
    options.ca = Some(ca.to_path_buf());
    unibus::client::Client::connect(options).await.unwrap()
}

/// A room's whole history as (sender, body), read through a feed until `n` arrived.
async fn read_history(
    client: &unibus::client::Client,
    room: &str,
    n: usize,
) -> Vec<(String, Vec<u8>)> {
    use futures_util::StreamExt;
    let mut feed = client
        .subscribe(room, unibus::membership::api::Start::All)
        .await
        .unwrap();
    let mut out = Vec::new();
    while out.len() < n {
        let message = tokio::time::timeout(std::time::Duration::from_secs(20), feed.next())
            .await
            .unwrap_or_else(|_| panic!("{room}: only {} of {n} messages", out.len()))
            .unwrap()
            .unwrap();
        out.push((message.sender, message.body));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_moves_with_the_records_verified_and_only_once() {
    use std::time::Duration;
    // A default single node (SQLite, enforce, TLS), with a plain and an encrypted room.
    let single = common::start("single", &common::Ports::pick(), &[], &[]);
    single.wait_ready(Duration::from_secs(30));
    let old_secrets = single.data.join("secrets");
    let admin_seed = old_secrets.join("admin.seed");
    let admin = history_client(
        &single.ports.listen,
        &admin_seed,
        &old_secrets.join("ca.crt"),
    )
    .await;
    admin.register_xkey().await.unwrap();
    admin.create_room("lab", "Lab", false).await.unwrap();
    admin.create_room("vault", "Vault", true).await.unwrap();
    let plain: Vec<Vec<u8>> = (0..5).map(|i| format!("lab {i}").into_bytes()).collect();
    for body in &plain {
        admin.send("lab", body).await.unwrap();
    }
    admin.send("vault", b"sealed one").await.unwrap();
    admin.send("vault", b"sealed two").await.unwrap();
    drop(admin);
    // Stopped, as the growth path does, so its files are a snapshot.
    let mut single = single;
    single.signal(libc::SIGTERM);
    single
        .wait_exit(Duration::from_secs(30))
        .expect("the single node stops");

    let cluster = tokio::task::spawn_blocking(|| {
        let cluster =
            common::LocalCluster::start(common::unibus_bin(), &["--flag", "decentralized=true"]);
        for node in &cluster.nodes {
            node.wait_ready(Duration::from_secs(60));
        }
        cluster
    })
    .await
    .unwrap();
    let from = single.data.join("membership.db");
    let data = single.data.to_string_lossy().to_string();
    let mut args = vec![
        "migrate".to_string(),
        "--from".into(),
        from.to_string_lossy().into(),
        "--history".into(),
        data,
        "--json".into(),
    ];
    args.extend(cluster.client_args(0, "service.seed"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = || {
        let (code, out, err) = unibus(&args);
        assert_eq!(code, 0, "{out}{err}");
        let report: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(report["verified"], true, "{out}");
        report["history"].clone()
    };
    // A dry run counts what a run would copy, and copies nothing (the run below copies 7).
    let mut dry = args.clone();
    dry.push("--dry-run");
    let (code, out, err) = unibus(&dry);
    assert_eq!(code, 0, "{out}{err}");
    let preview: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(preview["history"]["copied"], 7, "{out}");
    assert_eq!(preview["history"]["dry_run"], true, "{out}");

    let history = run();
    assert_eq!(history["source_messages"], 7, "{history}");
    assert_eq!(history["copied"], 7, "{history}");
    assert_eq!(history["verified"], true, "{history}");
    assert_eq!(history["source_digest"], history["target_digest"]);

    // The old admin (migrated with the records) reads both rooms in the cluster, in the
    // old order, the encrypted one opened with the migrated room keys.
    let admin = history_client(
        &cluster.nodes[1].ports.listen,
        &admin_seed,
        &cluster.secrets.join("ca.crt"),
    )
    .await;
    let lab = read_history(&admin, "lab", 5).await;
    assert_eq!(
        lab.iter().map(|(_, b)| b.clone()).collect::<Vec<_>>(),
        plain
    );
    assert!(lab.iter().all(|(sender, _)| sender == admin.key()));
    let vault = read_history(&admin, "vault", 2).await;
    assert_eq!(
        vault.iter().map(|(_, b)| b.clone()).collect::<Vec<_>>(),
        [b"sealed one".to_vec(), b"sealed two".to_vec()]
    );

    // Again: nothing copied twice.
    let again = run();
    assert_eq!(again["copied"], 0, "{again}");
    assert_eq!(again["already_there"], 7, "{again}");
    assert_eq!(again["target_digest"], history["target_digest"]);

    // A directory that is not a node's data: refused before anything is written.
    let mut bad = args.clone();
    let position = bad.iter().position(|a| *a == "--history").unwrap() + 1;
    let elsewhere = tempfile::tempdir().unwrap();
    let elsewhere = elsewhere.path().to_string_lossy().to_string();
    bad[position] = &elsewhere;
    let (code, _, err) = unibus(&bad);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("membership.db"), "{err}");
}
