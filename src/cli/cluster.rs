//! `unibus cluster status|replicas|init|finalize`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use unibus::auth::certs;
use unibus::membership::jetstream::{BucketStatus, KvOptions, KvStore};
use unibus::membership::{StoreError, history, version};
use unibus::node::readiness::Readyz;

use super::conn::{ConnArgs, app_jetstream, connect};
use super::node::fetch_readyz;

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Buckets (replicas wanted/current, leader), peers and the meta leader, from a node.
    Status {
        /// A node's admin HTTP address.
        #[arg(long, default_value = "127.0.0.1:8080", env = "UNIBUS_HTTP")]
        http: String,
        #[arg(long)]
        json: bool,
    },
    /// Change every store bucket's replicas live and wait until all are current.
    /// Safe to re-run or interrupt. Connects as the nodes' service user
    /// (--seed-file SECRETS/service.seed).
    Replicas {
        /// Replicas, 1..=5 and at most the number of nodes.
        n: usize,
        #[command(flatten)]
        conn: ConnArgs,
        /// How long to wait for the new replicas to become current.
        #[arg(long, default_value_t = 120)]
        timeout_secs: u64,
    },
    /// Record that every node runs this version, turning on what needs the whole cluster
    /// on it (unsigned own-subject writes, the one-stage `rooms.create`). Checks first
    /// that every node of the cluster answers on its admin HTTP and speaks this version.
    /// Afterwards no node may run an older binary. Connects to the store as the nodes'
    /// service user (--seed-file SECRETS/service.seed).
    Finalize {
        /// Every node's admin HTTP address (comma list).
        #[arg(long, value_delimiter = ',', required = true)]
        http: Vec<String>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Write the cluster's shared secrets once: CA, node certificates, callout issuer,
    /// service and bootstrap admin seeds, route credentials.
    Init {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Node names (comma list).
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<String>,
        /// Extra host names or addresses every node certificate carries (comma list).
        #[arg(long, value_delimiter = ',')]
        hosts: Vec<String>,
    },
}

pub async fn run(command: ClusterCommand) -> u8 {
    match command {
        ClusterCommand::Status { http, json } => cluster_status(&http, json).await,
        ClusterCommand::Replicas {
            n,
            conn,
            timeout_secs,
        } => cluster_replicas(n, &conn, Duration::from_secs(timeout_secs)).await,
        ClusterCommand::Init { out, nodes, hosts } => cluster_init(&out, &nodes, &hosts),
        ClusterCommand::Finalize { http, conn } => cluster_finalize(&http, &conn).await,
    }
}

async fn cluster_finalize(http: &[String], conn: &ConnArgs) -> u8 {
    let mut answers = Vec::with_capacity(http.len());
    for addr in http {
        answers.push((addr.clone(), fetch_readyz(addr).await.map(|(r, _)| r)));
    }
    if let Err(e) = every_node_speaks(&answers, version::PROTOCOL) {
        eprintln!("error: not finalized: {e}");
        return 1;
    }
    let kv = match bind_store(conn).await {
        Ok(kv) => kv,
        Err(code) => return code,
    };
    let recorded = kv.finalize().await;
    match recorded {
        Ok(v) => {
            println!(
                "cluster finalized at version {v}; nodes turn on what needs it within a few \
                 seconds. From now on, run no unibus binary older than this one"
            );
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

/// `finalize`'s check on the nodes' `/readyz` answers: every address answered, each
/// node once, each speaking `protocol` or later and seeing the JetStream meta group,
/// every peer any of them has heard from among them, and as many nodes as the meta
/// group's configured size (a node that is down counts there, so it is noticed rather
/// than left to come back on old code).
fn every_node_speaks(
    answers: &[(String, Result<Readyz, String>)],
    protocol: u32,
) -> Result<(), String> {
    use std::collections::BTreeSet;
    let (mut names, mut peers) = (BTreeSet::new(), BTreeSet::new());
    let mut cluster_size = 1;
    for (addr, answer) in answers {
        let readyz = answer.as_ref().map_err(|e| e.clone())?;
        let node = &readyz.node;
        let spoken = readyz.store.as_ref().and_then(|s| s.protocol).unwrap_or(0);
        if spoken < protocol {
            return Err(format!(
                "node {node} ({addr}) speaks version {spoken}, not {protocol}; upgrade it first"
            ));
        }
        if !names.insert(node.clone()) {
            return Err(format!("node {node} is listed twice"));
        }
        match &readyz.cluster {
            Some(c) if c.cluster_size == 0 => {
                return Err(format!(
                    "node {node} ({addr}) does not see the JetStream meta group yet; retry \
                     once `unibus cluster status` shows a meta leader"
                ));
            }
            Some(c) => {
                cluster_size = cluster_size.max(c.cluster_size);
                peers.extend(c.peers.iter().cloned());
            }
            None => {}
        }
    }
    let missing: Vec<String> = peers.difference(&names).cloned().collect();
    if !missing.is_empty() || names.len() < cluster_size {
        let given = names.into_iter().collect::<Vec<_>>();
        let missing = if missing.is_empty() {
            String::new()
        } else {
            format!(", not {}", missing.join(", "))
        };
        return Err(format!(
            "the cluster has {cluster_size} nodes and {} were given ({}){missing}; list \
             every node's admin address",
            given.len(),
            given.join(", ")
        ));
    }
    Ok(())
}

fn cluster_init(out: &std::path::Path, nodes: &[String], hosts: &[String]) -> u8 {
    match certs::init_cluster(out, nodes, hosts) {
        Ok(s) => {
            println!("cluster secrets written to {}", s.dir.display());
            println!("  CA certificate (clients pin it): {}", s.ca_cert.display());
            println!(
                "  bootstrap admin seed:            {} ({})",
                s.admin_seed.display(),
                s.admin_public
            );
            println!("  nodes: {}", nodes.join(", "));
            println!(
                "start each node with: unibus node up --name NODE --secrets {}",
                s.dir.display()
            );
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            2
        }
    }
}

async fn cluster_status(addr: &str, json: bool) -> u8 {
    let (readyz, _) = match fetch_readyz(addr).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return 1;
        }
    };
    if json {
        let out = serde_json::json!({
            "node": readyz.node,
            "cluster": readyz.cluster,
            "store": readyz.store,
        });
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    } else {
        print!("{}", cluster_table(&readyz));
    }
    0
}

fn cluster_table(r: &Readyz) -> String {
    let mut out = String::new();
    match &r.cluster {
        Some(c) => out.push_str(&format!(
            "meta leader: {}\npeers ({} of {}): {}\n",
            c.meta_leader.as_deref().unwrap_or("(none)"),
            c.peers.len(),
            c.cluster_size,
            c.peers.join(", ")
        )),
        None => out.push_str(&format!(
            "node {} is a single node (not clustered)\n",
            r.node
        )),
    }
    if let Some(s) = &r.store
        && let (Some(finalized), Some(protocol)) = (s.cluster_version, s.protocol)
    {
        let note = if finalized < protocol {
            " (run `unibus cluster finalize` once every node runs this version)"
        } else if finalized > protocol {
            " (this node is too old for the cluster: upgrade it)"
        } else {
            ""
        };
        out.push_str(&format!(
            "cluster version: {finalized} finalized, this node speaks {protocol}{note}\n"
        ));
    }
    match &r.store {
        Some(s) if !s.buckets.is_empty() => out.push_str(&buckets_table(&s.buckets)),
        Some(s) => out.push_str(&format!(
            "store: {} {}\n",
            s.backend,
            s.path.as_deref().unwrap_or("")
        )),
        None => out.push_str("store: not open yet\n"),
    }
    out
}

fn buckets_table(buckets: &[BucketStatus]) -> String {
    let mut out = format!(
        "{:<17} {:>7} {:>8}  {}\n",
        "BUCKET", "WANTED", "CURRENT", "LEADER"
    );
    for b in buckets {
        out.push_str(&format!(
            "{:<17} {:>7} {:>8}  {}\n",
            b.bucket,
            b.replicas_wanted,
            b.replicas_current,
            b.leader.as_deref().unwrap_or("(none)")
        ));
    }
    out
}

/// The store's existing buckets, reached as the nodes' service user (operator tools);
/// on failure, the exit code, the error already printed.
async fn bind_store(conn: &ConnArgs) -> Result<KvStore, u8> {
    let client = connect(conn).await?;
    let opts = KvOptions {
        create: false,
        ..KvOptions::default()
    };
    KvStore::open(client, opts).await.map_err(|e| {
        eprintln!("error: {e}");
        1
    })
}

async fn cluster_replicas(n: usize, conn: &ConnArgs, timeout: Duration) -> u8 {
    let kv = match bind_store(conn).await {
        Ok(kv) => kv,
        Err(code) => return code,
    };
    if let Err(e) = kv.set_replicas(n).await {
        eprintln!("error: {e}");
        return if matches!(e, StoreError::Invalid { .. }) {
            2
        } else {
            1
        };
    }
    // Room history (stream ROOMS, in APP) follows the store's replicas; the tool reaches
    // APP as the nodes' APP user, derived from the service seed it was given.
    let rooms = match app_jetstream(conn).await {
        Ok(js) => js,
        Err(code) => return code,
    };
    if let Some(js) = &rooms
        && let Err(e) = history::set_replicas(js, n).await
    {
        eprintln!("error: {e}");
        return 1;
    }
    eprintln!(
        "replicas set to {n}; waiting until every replica is current \
         (interrupting is safe: re-run to keep waiting)"
    );
    let started = std::time::Instant::now();
    loop {
        let mut status = kv.bucket_status().await;
        if let (Ok(rows), Some(js)) = (&mut status, &rooms) {
            match history::replicas_status(js).await {
                Ok(row) => rows.push(row),
                Err(e) => status = Err(StoreError::Unavailable(e)),
            }
        }
        match status {
            Ok(status) => {
                let current: usize = status.iter().map(|b| b.replicas_current.min(n)).sum();
                let done = status
                    .iter()
                    .all(|b| b.leader.is_some() && b.replicas_current >= b.replicas_wanted);
                eprintln!(
                    "  {:>5.1}s  {current}/{} replicas current",
                    started.elapsed().as_secs_f64(),
                    n * status.len()
                );
                if done {
                    print!("{}", buckets_table(&status));
                    println!(
                        "all buckets at R{n}, current after {:.1}s",
                        started.elapsed().as_secs_f64()
                    );
                    return 0;
                }
            }
            Err(e) => eprintln!("  status unavailable: {e}"),
        }
        if started.elapsed() > timeout {
            eprintln!("error: replicas not all current after {timeout:?}; re-run to keep waiting");
            return 1;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use unibus::node::readiness::{ClusterView, Readiness, StoreView};

    fn node(name: &str, protocol: Option<u32>, cluster_size: usize) -> Result<Readyz, String> {
        let mut r = Readiness::new(name, true).snapshot();
        r.cluster = Some(ClusterView {
            meta_leader: Some("n1".into()),
            peers: vec![name.into()],
            cluster_size,
        });
        r.store = Some(StoreView {
            protocol,
            ..StoreView::default()
        });
        Ok(r)
    }

    fn at(addr: &str, r: Result<Readyz, String>) -> (String, Result<Readyz, String>) {
        (addr.to_string(), r)
    }

    #[test]
    fn finalize_needs_every_node_of_the_cluster_on_this_version() {
        let p = version::PROTOCOL;
        let all = [
            at("a:1", node("n1", Some(p), 3)),
            at("b:1", node("n2", Some(p), 3)),
            at("c:1", node("n3", Some(p + 1), 3)),
        ];
        assert_eq!(every_node_speaks(&all, p), Ok(()));

        let old = [
            at("a:1", node("n1", Some(p), 3)),
            at("b:1", node("n2", None, 3)),
        ];
        let err = every_node_speaks(&old, p).unwrap_err();
        assert!(err.contains("n2") && err.contains("version 0"), "{err}");

        let missing = [
            at("a:1", node("n1", Some(p), 3)),
            at("b:1", node("n2", Some(p), 3)),
        ];
        let err = every_node_speaks(&missing, p).unwrap_err();
        assert!(err.contains("has 3 nodes and 2 were given"), "{err}");

        // A node another has heard from must be among those given, whatever the size says.
        let mut heard = node("n1", Some(p), 1).unwrap();
        heard.cluster.as_mut().unwrap().peers = vec!["n1".into(), "n9".into()];
        let err = every_node_speaks(&[at("a:1", Ok(heard))], p).unwrap_err();
        assert!(err.contains("not n9"), "{err}");

        // A node without a view of the meta group cannot vouch for the cluster's size.
        let err = every_node_speaks(&[at("a:1", node("n1", Some(p), 0))], p).unwrap_err();
        assert!(err.contains("meta group"), "{err}");

        let twice = [
            at("a:1", node("n1", Some(p), 2)),
            at("a:2", node("n1", Some(p), 2)),
        ];
        assert!(every_node_speaks(&twice, p).unwrap_err().contains("twice"));

        let down = [
            at("a:1", node("n1", Some(p), 1)),
            at("b:1", Err("cannot reach b:1".into())),
        ];
        assert!(
            every_node_speaks(&down, p)
                .unwrap_err()
                .contains("cannot reach")
        );
    }
}
