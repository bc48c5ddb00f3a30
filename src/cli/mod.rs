//! The command line, one file per command family. Each handler parses nothing itself
//! (clap did), calls the library, prints, and returns the exit code:
//! 0 ok, 1 refused by the server or failed at run time, 2 bad usage or local error.

pub mod bench;
pub mod cluster;
pub mod conn;
pub mod keys;
pub mod migrate;
pub mod node;
pub mod workload;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "unibus",
    version,
    about = "A secure message bus for endpoints that talk in rooms"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run or inspect a node.
    #[command(subcommand)]
    Node(node::NodeCommand),
    /// Inspect or change the cluster; write its secrets.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Make a user nkey: writes the seed (0600) and prints the public key.
    Keygen {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Copy a single node's SQLite store into the cluster's KV buckets (idempotent,
    /// resumable, verified).
    Migrate(Box<migrate::MigrateArgs>),
    /// Load a cluster while it changes (run) and judge what it saw (check).
    #[command(subcommand)]
    Workload(workload::WorkloadCommand),
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

impl Cli {
    /// The log filter unless `UNIBUS_LOG` says otherwise. The workload opens a connection
    /// every half second; async-nats' per-connection info lines would bury its own.
    pub fn default_log_filter(&self) -> &'static str {
        match self.command {
            Command::Workload(_) => "info,async_nats=warn",
            _ => "info",
        }
    }
}

pub async fn run(cli: Cli) -> u8 {
    match cli.command {
        Command::Node(c) => node::run(c).await,
        Command::Cluster(c) => cluster::run(c).await,
        Command::Keygen { out } => keys::keygen(&out),
        Command::Bench { quick, json } => bench::run(quick, json).await,
        Command::Migrate(args) => migrate::run(*args).await,
        Command::Workload(c) => workload::run(c).await,
    }
}
