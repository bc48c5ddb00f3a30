//! `unibus cluster status|replicas|init`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use unibus::auth::certs;
use unibus::membership::jetstream::{BucketStatus, KvOptions, KvStore};
use unibus::membership::{StoreError, history};
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
    }
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

async fn cluster_replicas(n: usize, conn: &ConnArgs, timeout: Duration) -> u8 {
    let client = match connect(conn).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let opts = KvOptions {
        create: false,
        ..KvOptions::default()
    };
    let kv = match KvStore::open(client, opts).await {
        Ok(kv) => kv,
        Err(e) => {
            eprintln!("error: {e}");
            return 1;
        }
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
