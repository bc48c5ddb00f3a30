//! The command line, one file per command family. Each handler parses nothing itself
//! (clap did), calls the library, prints, and returns the exit code:
//! 0 ok, 1 refused by the server or failed at run time, 2 bad usage or local error.
//!
//! Client commands (`user`, `room`, `send`, `listen`) are thin layers over
//! `unibus::client::Client`: connect ([`conn::client`]), one library call, print
//! ([`output`]).

pub mod bench;
pub mod cluster;
pub mod conn;
pub mod keys;
pub mod migrate;
pub mod node;
pub mod output;
pub mod room;
pub mod talk;
pub mod user;
pub mod workload;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use conn::ConnArgs;
use unibus::client::Start;

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
    /// Manage users (admins).
    #[command(subcommand)]
    User(user::UserCommand),
    /// Create, inspect and manage rooms and their members.
    #[command(subcommand)]
    Room(room::RoomCommand),
    /// Send MESSAGE to ROOM (without MESSAGE: one message per line of stdin). Prints each
    /// message's stream sequence once the cluster has stored it (durable, the default).
    Send {
        room: String,
        message: Option<String>,
        /// Live mode: core NATS, at most once, not stored, no sequence; only members
        /// listening with `listen --live` right now receive it.
        #[arg(long)]
        live: bool,
        /// One JSON object per message: room and seq (live: room and "live": true).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Print ROOM's messages, one line each: its history, then new ones as they are
    /// stored (`SEQ TIME SENDER BODY`).
    Listen {
        room: String,
        /// Only messages after stream sequence SEQ (the last one you saw).
        #[arg(long, value_name = "SEQ", conflicts_with_all = ["new", "live"])]
        since: Option<u64>,
        /// Only messages sent from now on.
        #[arg(long, conflicts_with = "live")]
        new: bool,
        /// Live messages (`send --live`) instead of durable ones: from now on only, lost
        /// while disconnected; `-` in the sequence column, receive time.
        #[arg(long)]
        live: bool,
        /// One JSON object per line: room, seq, sender, time, body (and epoch; live:
        /// "live": true instead of seq).
        #[arg(long)]
        json: bool,
        /// Stop after N messages.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// Stop listening after SECS seconds.
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
        #[command(flatten)]
        conn: ConnArgs,
    },
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
        /// Run only these workloads (comma-separated names; for development and tests).
        #[arg(long, hide = true, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// The raw twin's responder for `unibus bench` (started by it; see `bench::responder`).
    #[command(hide = true)]
    BenchResponder {
        #[arg(long)]
        server: String,
        #[arg(long)]
        secrets: PathBuf,
    },
}

impl Cli {
    /// The log filter unless `UNIBUS_LOG` says otherwise: a node logs its life at `info`;
    /// client commands print their result and only warnings besides; the workload opens a
    /// connection every half second, and async-nats' per-connection lines would bury its own.
    pub fn default_log_filter(&self) -> &'static str {
        match self.command {
            Command::Node(_) | Command::Cluster(_) | Command::Bench { .. } => "info",
            Command::Workload(_) => "info,async_nats=warn",
            _ => "warn",
        }
    }
}

pub async fn run(cli: Cli) -> u8 {
    match cli.command {
        Command::Node(c) => node::run(c).await,
        Command::Cluster(c) => cluster::run(c).await,
        Command::Keygen { out } => keys::keygen(&out),
        Command::Bench { quick, json, only } => bench::run(quick, json, only).await,
        Command::BenchResponder { server, secrets } => bench::responder(&server, &secrets).await,
        Command::Migrate(args) => migrate::run(*args).await,
        Command::User(c) => user::run(c).await,
        Command::Room(c) => room::run(c).await,
        Command::Send {
            room,
            message,
            live,
            json,
            conn,
        } => talk::send(&room, message, live, json, &conn).await,
        Command::Listen {
            room,
            since,
            new,
            live,
            json,
            count,
            timeout,
            conn,
        } => {
            let mode = match (since, new, live) {
                (_, _, true) => talk::Mode::Live,
                (Some(seq), _, _) => talk::Mode::Durable(Start::After(seq)),
                (None, true, _) => talk::Mode::Durable(Start::New),
                (None, false, _) => talk::Mode::Durable(Start::All),
            };
            talk::listen(&room, mode, json, count, timeout, &conn).await
        }
        Command::Workload(c) => workload::run(c).await,
    }
}
