//! `unibus migrate`: copy a single node's SQLite store into the cluster's KV buckets.
//! Connect as the nodes' service user (`--seed-file SECRETS/service.seed --ca
//! SECRETS/ca.crt`): the buckets live in its account.

use std::path::PathBuf;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use unibus::membership::StoreError;
use unibus::membership::jetstream::{KvOptions, KvStore};
use unibus::membership::migrate;

use super::conn::{ConnArgs, connect};

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
    let client = connect(&args.conn).await.map_err(|code| Failure {
        code,
        message: "cannot connect to the cluster (see above)".into(),
    })?;
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
