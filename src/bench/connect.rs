//! `connect_callout`: a new TLS + nkey connection admitted by the auth callout (the store is
//! consulted for every connection), vs the same client against a bare nats-server on the
//! same certificates with the key listed statically (`authorization { users: [{nkey}] }`).
//! `connect_callout_r3` (not one of the required names) does the same as a fresh user (no
//! rooms) against a node of the three-node KV cluster at R3, where each admission also
//! needs the quorum barrier (`membership::quorum`) and reads from the buckets' Raft
//! leaders.

use std::path::Path;
use std::time::Duration;

use super::measure;
use super::{Workload, throughput_workload};
use crate::localnet::{free_ports, http_get, poll};

/// Against a default single node (SQLite).
pub async fn connect_callout(
    unibus: &Path,
    nats_server: &Path,
    rounds: usize,
    each: Duration,
) -> Result<Workload, String> {
    let node = super::single_node(unibus).await?;
    let secrets = node.data.join("secrets");
    let target = Target {
        listen: node.ports.listen.clone(),
        cert: secrets.join("bench.crt"),
        key: secrets.join("bench.key"),
        ca: secrets.join("ca.crt"),
        seed_file: secrets.join("admin.seed"),
    };
    let workload = measure_connects("connect_callout", &target, nats_server, rounds, each).await;
    drop(node);
    workload
}

/// Against node n1 of a running three-node cluster.
pub async fn connect_callout_r3(
    cluster: &crate::localnet::LocalCluster,
    nats_server: &Path,
    rounds: usize,
    each: Duration,
) -> Result<Workload, String> {
    let s = &cluster.secrets;
    let listen = cluster.nodes[0].ports.listen.clone();
    // A fresh user: by now the bench admin owns every room the write workloads created,
    // and admission on KV reads each of a user's rooms (the single-node twin, on SQLite,
    // does not care).
    let admin = super::client(s, &[&listen], &s.join("admin.seed")).await?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (seed_file, _) = super::new_user(&admin, dir.path(), "connector").await?;
    let target = Target {
        listen,
        cert: s.join("n1.crt"),
        key: s.join("n1.key"),
        ca: s.join("ca.crt"),
        seed_file,
    };
    measure_connects("connect_callout_r3", &target, nats_server, rounds, each).await
}

/// Where the unibus side connects, and the TLS files its raw twin serves.
struct Target {
    listen: String,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    ca: std::path::PathBuf,
    seed_file: std::path::PathBuf,
}

async fn measure_connects(
    name: &str,
    target: &Target,
    nats_server: &Path,
    rounds: usize,
    each: Duration,
) -> Result<Workload, String> {
    let ca = target.ca.clone();
    let seed = std::fs::read_to_string(&target.seed_file).map_err(|e| e.to_string())?;
    let seed = seed.trim().to_string();
    let public = nkeys::KeyPair::from_seed(&seed)
        .map_err(|e| e.to_string())?
        .public_key();

    // The raw twin: same binary, same TLS files, static nkey authorization.
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let p = free_ports(2);
    let (listen, monitor) = (format!("127.0.0.1:{}", p[0]), format!("127.0.0.1:{}", p[1]));
    let q = |p: &Path| serde_json::Value::from(p.to_string_lossy()).to_string();
    let conf = format!(
        "listen: \"{listen}\"\nhttp: \"{monitor}\"\nauthorization {{ users: [ {{ nkey: \"{public}\" }} ] }}\n\
         tls {{ cert_file: {}, key_file: {}, ca_file: {} }}\n",
        q(&target.cert),
        q(&target.key),
        q(&ca)
    );
    let conf_path = dir.path().join("raw.conf");
    std::fs::write(&conf_path, conf).map_err(|e| e.to_string())?;
    let mut raw_server = std::process::Command::new(nats_server)
        .arg("-c")
        .arg(&conf_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let monitor_up = monitor.clone();
    tokio::task::spawn_blocking(move || {
        poll(Duration::from_secs(10), || {
            http_get(&monitor_up, "/healthz")
        })
    })
    .await
    .map_err(|e| e.to_string())?
    .ok_or("the raw nats-server did not start")?;

    let connect_once = |addr: String, ca: std::path::PathBuf, seed: String| async move {
        let client = crate::client::nkey_options(&seed)?
            .require_tls(true)
            .add_root_certificates(ca)
            .max_reconnects(Some(0))
            .connect(format!("tls://{addr}"))
            .await?;
        client.flush().await.map_err(std::io::Error::other)?;
        drop(client);
        Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    };
    let (node_listen, ca_a, seed_a) = (target.listen.clone(), ca.clone(), seed.clone());
    let ours = move |_i: u64| connect_once(node_listen.clone(), ca_a.clone(), seed_a.clone());
    let raw = move |_i: u64| connect_once(listen.clone(), ca.clone(), seed.clone());
    let (a, b) = measure::alternate(rounds, each, 4, ours, raw).await;
    let _ = raw_server.kill();
    let _ = raw_server.wait();
    Ok(throughput_workload(name, &a, &b, 1.0))
}
