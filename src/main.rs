//! The `unibus` command line: parse, call the library, print. Nothing else lives here.
//!
//! Exit codes: 0 ok, 1 refused or failed at run time (`node status`: not ready),
//! 2 bad usage or local error.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use unibus::config::{Config, ConfigError, parse_flag};
use unibus::membership::StoreError;
use unibus::membership::jetstream::{KvOptions, KvStore};
use unibus::membership::migrate;
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
    /// Copy a single node's SQLite store into a cluster's KV buckets: idempotent,
    /// resumable, verified by counts and a content digest. The source is only read.
    ///
    /// Exit codes: 0 copied and verified (or a dry run that could compare), 1 not verified
    /// or the cluster refused or was unavailable, 2 bad usage or a bad source file.
    Migrate(MigrateArgs),
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
}

#[derive(Args)]
struct MigrateArgs {
    /// The node's SQLite store file (opened read-only).
    #[arg(long, value_name = "PATH.db")]
    from: PathBuf,
    #[command(flatten)]
    connect: ConnectArgs,
    /// Replicas for the buckets this run creates, 1..=5 (existing buckets keep theirs).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    replicas: u8,
    /// Compare and report what would be copied; write nothing (not even the buckets).
    #[arg(long)]
    dry_run: bool,
    /// Replace records whose content differs in the cluster (otherwise they are reported).
    #[arg(long)]
    overwrite: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// How a client command reaches the cluster.
#[derive(Args)]
struct ConnectArgs {
    /// A NATS server URL (repeatable or a comma list).
    #[arg(
        long = "server",
        value_name = "URL",
        env = "UNIBUS_SERVER",
        value_delimiter = ',',
        default_value = "nats://127.0.0.1:4222"
    )]
    servers: Vec<String>,
    /// A file holding the nkey seed to authenticate with.
    #[arg(long, value_name = "PATH", env = "UNIBUS_SEED_FILE")]
    seed_file: Option<PathBuf>,
    /// A NATS credentials file (JWT and seed).
    #[arg(long, value_name = "PATH", env = "UNIBUS_CREDS")]
    creds: Option<PathBuf>,
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
            Command::Migrate(args) => migrate(args).await,
            Command::Bench { quick, json } => bench(quick, json).await,
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

/// A failure of a client command: its message and exit code.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn usage(message: String) -> Self {
        Self { code: 2, message }
    }

    fn remote(message: String) -> Self {
        Self { code: 1, message }
    }
}

/// Connects to the cluster. The one place that turns connection flags into options (TLS
/// and other authentication go here too).
async fn connect(args: &ConnectArgs) -> Result<async_nats::Client, Failure> {
    let addrs = args
        .servers
        .iter()
        .map(|url| {
            url.parse::<async_nats::ServerAddr>()
                .map_err(|e| Failure::usage(format!("bad --server {url:?}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut opts = async_nats::ConnectOptions::new();
    if let Some(path) = &args.creds {
        opts = opts
            .credentials_file(path)
            .await
            .map_err(|e| Failure::usage(format!("cannot read --creds {}: {e}", path.display())))?;
    }
    if let Some(path) = &args.seed_file {
        let seed = std::fs::read_to_string(path).map_err(|e| {
            Failure::usage(format!("cannot read --seed-file {}: {e}", path.display()))
        })?;
        opts = opts.nkey(seed.trim().to_string());
    }
    opts.connect(addrs).await.map_err(|e| {
        Failure::remote(format!(
            "cannot connect to {}: {e}; check --server (or UNIBUS_SERVER)",
            args.servers.join(",")
        ))
    })
}

async fn migrate(args: MigrateArgs) -> u8 {
    match run_migrate(&args).await {
        Ok(report) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                print!("{}", migrate::table(&report));
            }
            if report.verified || report.dry_run {
                0
            } else {
                1
            }
        }
        Err(f) => {
            eprintln!("error: {}", f.message);
            f.code
        }
    }
}

async fn run_migrate(args: &MigrateArgs) -> Result<migrate::MigrateReport, Failure> {
    let failed = |e: migrate::MigrateError| Failure {
        code: e.exit_code(),
        message: e.to_string(),
    };
    migrate::check_source(&args.from).await.map_err(failed)?;
    let client = connect(&args.connect).await?;
    let kv_opts = KvOptions {
        replicas: usize::from(args.replicas),
        create: !args.dry_run,
        ..KvOptions::default()
    };
    let view = ProgressView::new();
    let progress = |p: &migrate::Progress| view.show(p);
    let opts = migrate::MigrateOptions {
        dry_run: args.dry_run,
        overwrite: args.overwrite,
        ..migrate::MigrateOptions::default()
    };
    let report = match KvStore::open(client, kv_opts).await {
        Ok(store) => migrate::migrate(&args.from, &store, opts, &progress).await,
        Err(StoreError::NotFound { what }) if args.dry_run => {
            eprintln!("migrate: the cluster has no {what} yet; a run would create the buckets");
            migrate::preview_into_empty(&args.from, &progress).await
        }
        Err(e) => return Err(Failure::remote(format!("cannot open the KV buckets: {e}"))),
    };
    view.finish();
    report.map_err(failed)
}

/// Migration progress on stderr: a bar per kind on a terminal, plain lines otherwise
/// (each stage, then every [`PLAIN_EVERY`] records).
struct ProgressView {
    terminal: bool,
    bar: std::sync::Mutex<Option<ProgressBar>>,
}

const PLAIN_EVERY: usize = 10_000;

impl ProgressView {
    fn new() -> Self {
        Self {
            terminal: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            bar: std::sync::Mutex::new(None),
        }
    }

    fn show(&self, p: &migrate::Progress) {
        let migrate::Stage::Copy(kind) = p.stage else {
            self.finish();
            let what = match p.stage {
                migrate::Stage::ReadSource => "reading the source",
                migrate::Stage::ReadTarget => "reading the cluster",
                _ => "verifying",
            };
            eprintln!("migrate: {what}");
            return;
        };
        if !self.terminal {
            if p.done == 0 || p.done == p.total || p.done.is_multiple_of(PLAIN_EVERY) {
                eprintln!(
                    "migrate: {} {}/{} ({} written)",
                    kind.as_str(),
                    p.done,
                    p.total,
                    p.written
                );
            }
            return;
        }
        let Ok(mut bar) = self.bar.lock() else {
            return;
        };
        if p.done == 0 {
            if let Some(old) = bar.take() {
                old.finish();
            }
            let style = ProgressStyle::with_template(
                "{prefix:>10} [{bar:40}] {pos}/{len} {per_sec} eta {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            let new = ProgressBar::new(p.total as u64)
                .with_style(style)
                .with_prefix(kind.as_str());
            *bar = Some(new);
        }
        if let Some(b) = bar.as_ref() {
            b.set_position(p.done as u64);
            b.set_message(format!("{} written", p.written));
        }
    }

    fn finish(&self) {
        if let Ok(mut bar) = self.bar.lock()
            && let Some(b) = bar.take()
        {
            b.finish();
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

async fn node_status(addr: &str, json: bool) -> u8 {
    let response = match http::get(addr, "/readyz", Duration::from_secs(3)).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("not ready: cannot reach the node's admin HTTP at {addr}: {e}");
            return 1;
        }
    };
    let readyz: Readyz = match serde_json::from_str(&response.body) {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "not ready: {addr}/readyz returned {} with a body that is not readiness JSON: {e}",
                response.status
            );
            return 1;
        }
    };
    if json {
        println!("{}", response.body.trim_end());
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
