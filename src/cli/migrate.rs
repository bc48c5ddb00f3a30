//! `unibus migrate`: copy a single node's SQLite store into the cluster's KV buckets and,
//! with `--history`, its room history into the cluster's `ROOMS` stream. Connect as the
//! nodes' service user (`--seed-file SECRETS/service.seed --ca SECRETS/ca.crt`): the
//! buckets live in its account, and the history's account (`APP`) is reached as the APP
//! user derived from it.

use std::path::PathBuf;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use unibus::membership::StoreError;
use unibus::membership::jetstream::{KvOptions, KvStore};
use unibus::membership::{migrate, migrate_history};

use super::conn::{ConnArgs, app_jetstream, connect};

/// A failure of the command: its message and exit code.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn remote(message: String) -> Self {
        Self { code: 1, message }
    }
}

#[derive(Args)]
pub struct MigrateArgs {
    /// The node's SQLite store file (opened read-only).
    #[arg(long, value_name = "PATH.db")]
    from: PathBuf,
    #[command(flatten)]
    conn: ConnArgs,
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
    /// The old node's data directory (`membership.db` and `jetstream/`, taken from a
    /// stopped node): also copy its room history into the cluster, after the records.
    #[arg(long, value_name = "DIR")]
    history: Option<PathBuf>,
    /// Bound on each store request, in seconds (a node's own default is 2). A copy makes
    /// thousands of requests back to back; on a busy cluster one of them can stall past
    /// 2 s, and a migration should wait for it rather than stop half way.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
    op_timeout_secs: u64,
}

/// What `migrate` prints: the records' report and, with `--history`, the history's.
#[derive(serde::Serialize)]
struct Report {
    #[serde(flatten)]
    records: migrate::MigrateReport,
    history: Option<migrate_history::HistoryReport>,
}

impl Report {
    fn ok(&self) -> bool {
        let history_ok = self
            .history
            .as_ref()
            .is_none_or(|h| h.verified || h.dry_run);
        (self.records.verified || self.records.dry_run) && history_ok
    }
}

pub async fn run(args: MigrateArgs) -> u8 {
    match run_migrate(&args).await {
        Ok(report) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                print!("{}", migrate::table(&report.records));
                if let Some(history) = &report.history {
                    print!("{}", migrate_history::table(history));
                }
            }
            if report.ok() { 0 } else { 1 }
        }
        Err(f) => {
            eprintln!("error: {}", f.message);
            f.code
        }
    }
}

async fn run_migrate(args: &MigrateArgs) -> Result<Report, Failure> {
    let failed = |e: migrate::MigrateError| Failure {
        code: e.exit_code(),
        message: e.to_string(),
    };
    migrate::check_source(&args.from).await.map_err(failed)?;
    // Find nats-server before writing anything: the history is read with it.
    let nats_server = match &args.history {
        Some(dir) => {
            if !dir.join("membership.db").is_file() {
                return Err(Failure {
                    code: 2,
                    message: format!(
                        "--history {}: not a unibus node's data directory (no membership.db in it)",
                        dir.display()
                    ),
                });
            }
            let configured = std::env::var_os("UNIBUS_NATS_SERVER").map(PathBuf::from);
            let found = unibus::node::supervisor::locate_nats_server(configured.as_deref())
                .map_err(|e| Failure {
                    code: 2,
                    message: format!("--history needs nats-server to read the old store: {e}"),
                })?;
            Some(found)
        }
        None => None,
    };
    let client = connect(&args.conn).await.map_err(|code| Failure {
        code,
        message: "cannot connect to the cluster (see above)".into(),
    })?;
    let kv_opts = KvOptions {
        replicas: usize::from(args.replicas),
        create: !args.dry_run,
        op_timeout: std::time::Duration::from_secs(args.op_timeout_secs),
        ..KvOptions::default()
    };
    let view = ProgressView::new();
    let progress = |p: &migrate::Progress| view.show(p);
    let opts = migrate::MigrateOptions {
        dry_run: args.dry_run,
        overwrite: args.overwrite,
        ..migrate::MigrateOptions::default()
    };
    let report = match KvStore::open(client.clone(), kv_opts).await {
        Ok(store) => migrate::migrate(&args.from, &store, opts, &progress).await,
        Err(StoreError::NotFound { what }) if args.dry_run => {
            eprintln!("migrate: the cluster has no {what} yet; a run would create the buckets");
            migrate::preview_into_empty(&args.from, &progress).await
        }
        Err(e) => return Err(Failure::remote(format!("cannot open the KV buckets: {e}"))),
    };
    view.finish();
    let records = report.map_err(failed)?;
    let (Some(dir), Some(nats_server)) = (&args.history, &nats_server) else {
        return Ok(Report {
            records,
            history: None,
        });
    };
    // Service seed → APP user; `bus-auth=off` clusters have no accounts (None): the
    // service connection already reaches the stream.
    let js = match app_jetstream(&args.conn).await {
        Ok(Some(js)) => js,
        Ok(None) => async_nats::jetstream::new(client),
        Err(code) => {
            return Err(Failure {
                code,
                message: "cannot reach the cluster's APP account (see above)".into(),
            });
        }
    };
    eprintln!("migrate: copying room history from {}", dir.display());
    let history = migrate_history::copy_history(dir, nats_server, &js, args.dry_run)
        .await
        .map_err(|e| Failure {
            code: match e {
                migrate_history::HistoryError::Source { .. } => 2,
                migrate_history::HistoryError::Target(_) => 1,
            },
            message: e.to_string(),
        })?;
    Ok(Report {
        records,
        history: Some(history),
    })
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
