//! `unibus node up|status`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use unibus::config::{Config, ConfigError, parse_flag};
use unibus::node::{self, http, readiness::Readyz};

#[derive(Subcommand)]
pub enum NodeCommand {
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

pub async fn run(command: NodeCommand) -> u8 {
    match command {
        NodeCommand::Up(args) => node_up(*args).await,
        NodeCommand::Status { http, json } => node_status(&http, json).await,
    }
}

#[derive(Args)]
pub struct UpArgs {
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
    /// Cluster secrets from `unibus cluster init` (default: a single node makes its own).
    #[arg(long, value_name = "DIR")]
    secrets: Option<PathBuf>,
    /// TLS certificate, key and CA, overriding the secrets' (all three together).
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
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
        put("secrets", path(&self.secrets));
        put("tls_cert", path(&self.tls_cert));
        put("tls_key", path(&self.tls_key));
        put("tls_ca", path(&self.tls_ca));
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

/// Reads a node's /readyz; the error is printed as is.
pub async fn fetch_readyz(addr: &str) -> Result<(Readyz, String), String> {
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
