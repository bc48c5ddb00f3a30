//! `unibus workload run|check`: load a cluster while it changes, then judge the history.
//! The library does the work (`unibus::workload`); this file maps flags and exit codes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use unibus::workload::check::Side;
use unibus::workload::{self, Isolation, RunOptions, Target, WorkloadError, history};

use super::conn::ConnArgs;

#[derive(Subcommand)]
pub enum WorkloadCommand {
    /// Control-plane writes (retried; acknowledged only on `ok`) and new connections as a
    /// valid user, recorded as JSON lines, until --duration or SIGTERM/SIGINT.
    /// Connect as an admin (--seed-file SECRETS/admin.seed).
    Run(RunArgs),
    /// Read a history back: is every acknowledged write in the cluster? Prints writes
    /// acknowledged and lost, valid users denied, the longest write gap. Exit 0 only if
    /// nothing was lost or left unverified and no valid user was denied.
    Check(CheckArgs),
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// The history file to write (JSON lines; truncated first).
    #[arg(long, value_name = "FILE")]
    history: PathBuf,
    /// Stop after this many seconds (default: run until SIGTERM/SIGINT).
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Also stop when this file appears (for a run inside a container, where no signal
    /// reaches it: `docker cp` an empty file there).
    #[arg(long, value_name = "PATH")]
    stop_file: Option<PathBuf>,
    /// Pause between writes, ms.
    #[arg(long, default_value_t = 100)]
    interval_ms: u64,
    /// Pause between new-connection probes, ms (each probe goes to the next --server).
    #[arg(long, default_value_t = 500)]
    probe_every_ms: u64,
    /// A request unanswered this long is a failed attempt (retried), ms.
    #[arg(long, default_value_t = 3000)]
    timeout_ms: u64,
    /// Room id prefix (a random run id and a counter follow).
    #[arg(long, default_value = "wl")]
    prefix: String,
}

#[derive(Args)]
pub struct CheckArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// The history `workload run` wrote.
    #[arg(long, value_name = "FILE")]
    history: PathBuf,
    /// The history's client was on a node cut off the network: CUT_MS,REJOIN_MS[,READY_MS]
    /// (ms since the epoch). Nothing may be acknowledged or admitted in between; denials
    /// until READY are expected.
    #[arg(long, value_name = "CUT,REJOIN[,READY]", conflicts_with = "majority")]
    isolated: Option<Isolation>,
    /// The history's client used the nodes that kept a quorum while another was cut off:
    /// CUT_MS,REJOIN_MS. They must acknowledge writes in between; denials during leader
    /// failover are reported, not failed on.
    #[arg(long, value_name = "CUT,REJOIN")]
    majority: Option<Isolation>,
    /// How long to keep retrying a read-back while the cluster is unavailable, seconds.
    #[arg(long, default_value_t = 60)]
    patience_secs: u64,
    #[arg(long)]
    json: bool,
}

pub async fn run(command: WorkloadCommand) -> u8 {
    let result = match command {
        WorkloadCommand::Run(args) => run_workload(args).await,
        WorkloadCommand::Check(args) => check(args).await,
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: {e}");
        e.exit_code()
    })
}

fn target(conn: &ConnArgs) -> Result<Target, WorkloadError> {
    let path = conn.seed_file.as_ref().ok_or_else(|| {
        WorkloadError::Usage(
            "--seed-file is required (an admin's seed, e.g. SECRETS/admin.seed)".into(),
        )
    })?;
    let seed = std::fs::read_to_string(path)
        .map_err(|e| WorkloadError::Usage(format!("--seed-file {}: {e}", path.display())))?;
    if let Some(ca) = &conn.ca
        && !ca.is_file()
    {
        return Err(WorkloadError::Usage(format!(
            "--ca {} does not exist",
            ca.display()
        )));
    }
    let servers: Vec<String> = conn
        .servers
        .iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if servers.is_empty() {
        return Err(WorkloadError::Usage("--server: no server given".into()));
    }
    Ok(Target {
        servers,
        seed: seed.trim().to_string(),
        ca: conn.ca.clone(),
    })
}

async fn run_workload(args: RunArgs) -> Result<u8, WorkloadError> {
    let target = target(&args.conn)?;
    if args.duration.is_some_and(|d| !(d.is_finite() && d > 0.0)) {
        return Err(WorkloadError::Usage(
            "--duration must be a positive number of seconds".into(),
        ));
    }
    let opts = RunOptions {
        interval: Duration::from_millis(args.interval_ms),
        probe_every: Duration::from_millis(args.probe_every_ms.max(1)),
        timeout: Duration::from_millis(args.timeout_ms.max(1)),
        prefix: args.prefix.clone(),
        ..RunOptions::default()
    };
    let history = Arc::new(history::HistoryWriter::create(&args.history)?);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let duration = args.duration.map(Duration::from_secs_f64);
    let reason = Arc::new(std::sync::Mutex::new(String::from("stopped")));
    let why = reason.clone();
    let stop_file = args.stop_file.clone();
    tokio::spawn(async move {
        let said = tokio::select! {
            s = stop_signal() => s,
            _ = async {
                match stop_file {
                    Some(path) => while !path.exists() {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    },
                    None => std::future::pending().await,
                }
            } => "stop file",
            _ = async {
                match duration {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            } => "duration over",
        };
        if let Ok(mut r) = why.lock() {
            *r = said.to_string();
        }
        let _ = stop_tx.send(true);
    });
    let summary = workload::run::run(&target, &opts, history.clone(), stop_rx).await?;
    let reason = reason.lock().map(|r| r.clone()).unwrap_or_default();
    history.record(&history::Event::End {
        at_ms: history::now_ms(),
        reason: reason.clone(),
    });
    eprintln!(
        "workload: {reason}: {} writes acknowledged, {} not; {} connections admitted, {} denied; history in {}",
        summary.writes_acked,
        summary.writes_unacked,
        summary.connects_admitted,
        summary.connects_denied,
        args.history.display()
    );
    Ok(0)
}

async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

async fn check(args: CheckArgs) -> Result<u8, WorkloadError> {
    let events = history::read(&args.history)?;
    let (window, side) = match (args.isolated, args.majority) {
        (Some(w), _) => (Some(w), Side::Isolated),
        (None, Some(w)) => (Some(w), Side::Majority),
        (None, None) => (None, Side::Isolated),
    };
    let (mut report, ids) = workload::check::analyse(&events, window, side);
    if !ids.is_empty() {
        let target = target(&args.conn)?;
        workload::check::verify(
            &mut report,
            &ids,
            &target,
            Duration::from_secs(3),
            Duration::from_secs(args.patience_secs),
        )
        .await?;
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print!("{}", report.table());
    }
    Ok(if report.passed() { 0 } else { 1 })
}
