//! The node runtime: `unibus node up`.
//!
//! A node's life is a short pipeline (DESIGN §1):
//!
//! ```text
//! config ──► nats-server supervisor ──► store ──► authenticator ──► membership ──► ready
//! ```
//!
//! [`run`] checks everything first (config, the nats-server binary, the data-dir lock, a
//! stale server left by a crash, free ports) so bad input fails before any process is
//! spawned. Then it starts the admin HTTP, the [`supervisor`] and the readiness
//! [`monitor`], and waits for SIGTERM/SIGINT or for the supervisor to give up. Shutdown is
//! one [`shutdown::ShutdownTrigger`]; every task holds a [`shutdown::Shutdown`] and stops on
//! it. On the way out the control plane drains first, then (in a cluster) the node hands
//! the leadership of the streams it leads to peers ([`handover`]), and last the
//! supervisor takes nats-server through lame duck.

pub mod handover;
pub mod http;
pub mod monitor;
pub mod nats_config;
pub mod readiness;
pub mod revocation;
pub mod security;
pub mod shutdown;
pub mod stages;
pub mod store;
pub mod supervisor;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

use crate::config::{Config, ConfigError};
use readiness::Readiness;

/// Why a node stopped other than by a clean shutdown.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Bad input: the CLI exits 2.
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "nats-server died {count} times within {window:?} (last: {last}); see the log above, fix the cause and start the node again"
    )]
    TooManyRestarts {
        count: usize,
        window: Duration,
        last: String,
    },
    #[error("{0}")]
    Io(String),
}

impl NodeError {
    /// The process exit code: 2 for bad input, 1 for a failure at run time.
    pub fn exit_code(&self) -> i32 {
        match self {
            NodeError::Config(_) => 2,
            _ => 1,
        }
    }
}

/// How long a stopping node waits for its stages (the control plane's requests in flight)
/// before it takes nats-server down regardless.
const STAGES_STOP: Duration = Duration::from_secs(5);

/// How long a stopping node spends handing its stream leaderships to peers before lame
/// duck (see [`handover`]); a transfer takes well under a second when the peers are up.
const HANDOVER: Duration = Duration::from_secs(3);

/// Runs a node until SIGTERM/SIGINT (Ok) or until it cannot go on (Err).
pub async fn run(config: Config) -> Result<(), NodeError> {
    let span = tracing::info_span!("node", name = %config.name);
    run_inner(config).instrument(span).await
}

async fn run_inner(config: Config) -> Result<(), NodeError> {
    config.validate()?;
    let binary = supervisor::locate_nats_server(config.nats_server.as_deref())?;
    let data_dir = absolute(&config.data_dir())?;
    // Held for the node's life: a second node on the same data dir would corrupt it.
    let _lock = lock_data_dir(&data_dir)?;
    supervisor::reap_stale(&data_dir);
    let admin = bind_listeners(&config)?;

    let security = security::Security::resolve(&config, &data_dir)?;
    tracing::info!("{}", security.summary());
    let conf_path = data_dir.join(nats_config::CONF_FILE);
    std::fs::write(
        &conf_path,
        nats_config::render(&config, &data_dir, &security),
    )
    .map_err(|e| NodeError::Io(format!("cannot write {}: {e}", conf_path.display())))?;

    let readiness = Arc::new(Readiness::new(&config.name, config.clustered()));
    let (trigger, shutdown) = shutdown::channel();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(http::serve(admin, readiness.clone(), shutdown.clone()).in_current_span());
    tasks.spawn(
        monitor::run(
            config.nats_http.clone(),
            config.name.clone(),
            config.clustered(),
            readiness.clone(),
            shutdown.clone(),
        )
        .in_current_span(),
    );
    // The stages (the control plane among them) stop first and nats-server after them,
    // so requests a stopping node already took are answered before its server goes into
    // lame duck (see `membership::service::run`).
    let mut stages = tokio::spawn(
        stages::run(stages::Context {
            config: config.clone(),
            data_dir: data_dir.clone(),
            security: security.clone(),
            readiness: readiness.clone(),
            shutdown: shutdown.clone(),
        })
        .in_current_span(),
    );
    let mut stages_done = false;
    let (server_trigger, server_shutdown) = shutdown::channel();
    let supervisor = supervisor::Supervisor::new(&config, binary, data_dir);
    let mut supervised = tokio::spawn(supervisor.run(server_shutdown).in_current_span());
    tracing::info!(
        listen = %config.listen,
        http = %config.http,
        peers = ?config.peers,
        bus_auth = config.flags.bus_auth.as_str(),
        bus_tls = config.flags.bus_tls,
        decentralized = config.flags.decentralized,
        "node starting"
    );

    let outcome = tokio::select! {
        signal = shutdown_signal() => {
            tracing::info!("{signal}: shutting down (lame duck, then stop)");
            readiness.update(|r| r.shutting_down = true);
            trigger.trigger();
            match tokio::time::timeout(STAGES_STOP, &mut stages).await {
                Ok(_) => stages_done = true,
                Err(_) => tracing::warn!(
                    "the stages did not stop within {STAGES_STOP:?}; stopping nats-server anyway"
                ),
            }
            // With the control plane drained, move this node's stream leaders to peers
            // while every replica still runs, so lame duck has nothing left to move.
            if config.clustered() {
                handover::run(&config, &security, HANDOVER).await;
            }
            server_trigger.trigger();
            join_supervisor(&mut supervised).await
        }
        result = &mut supervised => flatten(result),
    };
    trigger.trigger();
    server_trigger.trigger();
    if !stages_done {
        let _ = stages.await;
    }
    while tasks.join_next().await.is_some() {}
    if outcome.is_ok() {
        tracing::info!("node stopped");
    }
    outcome
}

async fn join_supervisor(
    handle: &mut tokio::task::JoinHandle<Result<(), NodeError>>,
) -> Result<(), NodeError> {
    flatten(handle.await)
}

fn flatten(result: Result<Result<(), NodeError>, tokio::task::JoinError>) -> Result<(), NodeError> {
    result.map_err(|e| NodeError::Io(format!("supervisor task failed: {e}")))?
}

/// Waits for SIGTERM or SIGINT and names which one came.
async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; the node can only be killed");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

fn absolute(path: &Path) -> Result<PathBuf, NodeError> {
    std::path::absolute(path)
        .map_err(|e| ConfigError::new("--data", format!("{}: {e}", path.display())).into())
}

/// Takes an exclusive `flock` on `DIR/node.lock`; the kernel drops it when the process
/// dies, so a crash never leaves the data dir locked.
fn lock_data_dir(dir: &Path) -> Result<File, NodeError> {
    let path = dir.join("node.lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| ConfigError::new("--data", format!("cannot open {}: {e}", path.display())))?;
    // SAFETY: flock on a file descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(ConfigError::new(
            "--data",
            format!(
                "{} is in use by another running unibus node; stop it or pick another --data",
                dir.display()
            ),
        )
        .into());
    }
    Ok(file)
}

/// Binds the admin listener for keeps and probes the other three (which nats-server
/// binds), so a port in use is reported before anything is spawned.
fn bind_listeners(config: &Config) -> Result<tokio::net::TcpListener, NodeError> {
    config.check_ports_free()?;
    let std_listener = std::net::TcpListener::bind(&config.http).map_err(|e| {
        ConfigError::new("--http", format!("cannot listen on {}: {e}", config.http))
    })?;
    std_listener
        .set_nonblocking(true)
        .map_err(|e| NodeError::Io(e.to_string()))?;
    tokio::net::TcpListener::from_std(std_listener).map_err(|e| NodeError::Io(e.to_string()))
}
