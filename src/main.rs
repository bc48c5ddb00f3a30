//! The `unibus` command line: parse, call the library, print. Nothing else lives here.
//!
//! Exit codes: 0 ok, 1 refused or failed at run time (`node status`: not ready),
//! 2 bad usage or local error.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use unibus::config::{Config, ConfigError, parse_flag};
use unibus::membership::StoreError;
use unibus::membership::jetstream::{BucketStatus, KvOptions, KvStore};
use unibus::node::{self, http, readiness::Readyz};

#[derive(Parser)]
#[command(
    name = "unibus",
    version,
    about = "A secure message bus for endpoints that talk in rooms"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run or inspect a node.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Inspect or change the cluster's store.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Measure unibus side by side with raw NATS (starts its own local nodes).
    Bench {
        /// A shorter run (under 3 minutes on 2 cores).
        #[arg(long)]
        quick: bool,
        /// Print JSON: {"machine": …, "workloads": [{"name", "unibus", "raw", "ratio", …}]}.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Start a node: supervise nats-server, serve the control plane, until SIGTERM.
    Up(Box<UpArgs>),
    /// Print a node's readiness (exit 0 when ready, 1 when not): a container healthcheck.
    Status {
        /// The node's admin HTTP address.
        #[arg(long, default_value = "127.0.0.1:8080", env = "UNIBUS_HTTP")]
        http: String,
        /// Print the /readyz JSON as it is.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Buckets (replicas wanted/current, leader), peers and the meta leader, from a node.
    Status {
        /// A node's admin HTTP address.
        #[arg(long, default_value = "127.0.0.1:8080", env = "UNIBUS_HTTP")]
        http: String,
        #[arg(long)]
        json: bool,
    },
    /// Change every store bucket's replicas live and wait until all are current.
    /// Safe to re-run or interrupt.
    Replicas {
        /// Replicas, 1..=5 and at most the number of nodes.
        n: usize,
        #[command(flatten)]
        conn: ConnArgs,
        /// How long to wait for the new replicas to become current.
        #[arg(long, default_value_t = 120)]
        timeout_secs: u64,
    },
}

/// How a command reaches the cluster's NATS.
#[derive(Args)]
struct ConnArgs {
    /// NATS server URL (repeatable; env UNIBUS_SERVER takes a comma list).
    #[arg(
        long = "server",
        env = "UNIBUS_SERVER",
        value_delimiter = ',',
        default_value = "nats://127.0.0.1:4222"
    )]
    servers: Vec<String>,
}

#[derive(Args)]
struct UpArgs {
    /// A unibus.toml file (layered over the defaults, under UNIBUS_* and these flags).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Node name (default: host name).
    #[arg(long)]
    name: Option<String>,
    /// Data directory (default: ./data/NAME).
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// NATS client listener (default 127.0.0.1:4222).
    #[arg(long, value_name = "HOST:PORT")]
    listen: Option<String>,
    /// Route listener (default 127.0.0.1:6222).
    #[arg(long, value_name = "HOST:PORT")]
    cluster_listen: Option<String>,
    /// Route addresses of the other nodes (comma list or repeated).
    #[arg(long, value_name = "HOST:PORT", value_delimiter = ',')]
    peers: Vec<String>,
    /// The node's admin HTTP (default 127.0.0.1:8080).
    #[arg(long, value_name = "HOST:PORT")]
    http: Option<String>,
    /// nats-server's monitoring listener (default 127.0.0.1:8222).
    #[arg(long, value_name = "HOST:PORT")]
    nats_http: Option<String>,
    /// The nats-server binary (else UNIBUS_NATS_SERVER, else beside unibus, else the one
    /// scripts/setup installed, else PATH).
    #[arg(long, value_name = "PATH")]
    nats_server: Option<PathBuf>,
    /// A feature flag, NAME=VALUE (repeatable): bus-auth=off|soft|enforce,
    /// bus-tls=true|false, decentralized=true|false.
    #[arg(long = "flag", value_name = "NAME=VALUE")]
    flags: Vec<String>,
    /// Replicas for the store buckets this node creates (decentralized only; 1..=5).
    #[arg(long)]
    replicas: Option<usize>,
}

impl UpArgs {
    /// Only the options given on the command line, as config keys.
    fn overrides(&self) -> Result<BTreeMap<String, serde_json::Value>, ConfigError> {
        let mut out = BTreeMap::new();
        let mut put = |key: &str, value: Option<serde_json::Value>| {
            if let Some(v) = value {
                out.insert(key.to_string(), v);
            }
        };
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.to_string_lossy().into());
        put("name", self.name.clone().map(Into::into));
        put("data", path(&self.data));
        put("listen", self.listen.clone().map(Into::into));
        put(
            "cluster_listen",
            self.cluster_listen.clone().map(Into::into),
        );
        put("http", self.http.clone().map(Into::into));
        put("nats_http", self.nats_http.clone().map(Into::into));
        put("nats_server", path(&self.nats_server));
        put("replicas", self.replicas.map(Into::into));
        if !self.peers.is_empty() {
            put("peers", Some(self.peers.clone().into()));
        }
        for flag in &self.flags {
            let (key, value) = parse_flag(flag)?;
            out.insert(key, value);
        }
        Ok(out)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("UNIBUS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let code = runtime.block_on(async {
        match cli.command {
            Command::Node(NodeCommand::Up(args)) => node_up(*args).await,
            Command::Node(NodeCommand::Status { http, json }) => node_status(&http, json).await,
            Command::Bench { quick, json } => bench(quick, json).await,
            Command::Cluster(ClusterCommand::Status { http, json }) => {
                cluster_status(&http, json).await
            }
            Command::Cluster(ClusterCommand::Replicas {
                n,
                conn,
                timeout_secs,
            }) => cluster_replicas(n, &conn, Duration::from_secs(timeout_secs)).await,
        }
    });
    ExitCode::from(code)
}

async fn node_up(args: UpArgs) -> u8 {
    let config = args
        .overrides()
        .and_then(|cli| Config::load(args.config.as_deref(), cli));
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    match node::run(config).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code() as u8
        }
    }
}

async fn bench(quick: bool, json: bool) -> u8 {
    let nats_server = match unibus::node::supervisor::locate_nats_server(None) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let unibus = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: cannot find the unibus binary: {e}");
            return 2;
        }
    };
    let opts = unibus::bench::Options { quick };
    let report =
        tokio::task::spawn_blocking(move || unibus::bench::run(&unibus, &nats_server, opts)).await;
    match report {
        Ok(report) if json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&report).unwrap_or_default()
            );
            0
        }
        Ok(report) => {
            print!("{}", unibus::bench::table(&report));
            0
        }
        Err(e) => {
            eprintln!("error: the benchmark failed: {e}");
            1
        }
    }
}

/// Reads a node's /readyz; the error is printed as is.
async fn fetch_readyz(addr: &str) -> Result<(Readyz, String), String> {
    let response = http::get(addr, "/readyz", Duration::from_secs(3))
        .await
        .map_err(|e| format!("cannot reach the node's admin HTTP at {addr}: {e}"))?;
    let readyz = serde_json::from_str(&response.body).map_err(|e| {
        format!(
            "{addr}/readyz returned {} with a body that is not readiness JSON: {e}",
            response.status
        )
    })?;
    Ok((readyz, response.body))
}

async fn node_status(addr: &str, json: bool) -> u8 {
    let (readyz, body) = match fetch_readyz(addr).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("not ready: {e}");
            return 1;
        }
    };
    if json {
        println!("{}", body.trim_end());
    } else {
        print!("{}", status_table(&readyz));
    }
    if readyz.ready { 0 } else { 1 }
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
    eprintln!(
        "replicas set to {n}; waiting until every replica is current \
         (interrupting is safe: re-run to keep waiting)"
    );
    let started = std::time::Instant::now();
    loop {
        match kv.bucket_status().await {
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

/// Connects to the cluster for an operator command; an error is printed and mapped to an
/// exit code.
async fn connect(conn: &ConnArgs) -> Result<async_nats::Client, u8> {
    let mut addrs = Vec::new();
    for s in conn
        .servers
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
    {
        match s.parse::<async_nats::ServerAddr>() {
            Ok(a) => addrs.push(a),
            Err(e) => {
                eprintln!("error: --server `{s}` is not a NATS URL: {e}");
                return Err(2);
            }
        }
    }
    async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .connect(addrs)
        .await
        .map_err(|e| {
            eprintln!("error: cannot connect to {}: {e}", conn.servers.join(","));
            1
        })
}

fn status_table(r: &Readyz) -> String {
    let mut out = format!(
        "node {}: {}\n",
        r.node,
        if r.ready {
            "ready"
        } else if r.shutting_down {
            "shutting down"
        } else {
            "not ready"
        }
    );
    out.push_str(&format!("{:<14} {:<9} {}\n", "STAGE", "STATE", "DETAIL"));
    for (name, stage) in r.stages.named() {
        let state = serde_json::to_value(stage.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        out.push_str(&format!(
            "{name:<14} {state:<9} {}\n",
            stage.detail.as_deref().unwrap_or("")
        ));
    }
    if let Some(c) = &r.cluster {
        out.push_str(&format!(
            "cluster: meta leader {}, peers seen {} of {}: {}\n",
            c.meta_leader.as_deref().unwrap_or("(none)"),
            c.peers.len(),
            c.cluster_size,
            c.peers.join(", ")
        ));
    }
    out
}
