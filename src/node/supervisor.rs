//! Supervises the node's nats-server: spawn, fold its log into `tracing`, restart it with
//! backoff when it dies, stop it through lame duck on shutdown, and never leave it orphaned.
//!
//! Why a child process and not an embedded server: nats-server is Go; running the released
//! static binary keeps us on the exact server NATS ships and tests.
//!
//! Orphans are prevented three ways, one per way the node can end:
//! - a clean shutdown stops the child (lame duck, bounded wait, then SIGKILL);
//! - a SIGKILLed node takes its child with it: the child is spawned with
//!   `PR_SET_PDEATHSIG = SIGKILL` from a runtime worker thread (the signal follows the
//!   *thread* that forked, and worker threads live as long as the runtime);
//! - anything that slips through (a pid file left by a crash) is found on the next start by
//!   [`reap_stale`] and killed if it is still our server.
//!
//! The child gets its own process group so a terminal's Ctrl-C reaches only the node, which
//! then runs the orderly lame-duck shutdown instead of the server dying at once.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tracing::Instrument;

use super::NodeError;
use super::nats_config::{CONF_FILE, PID_FILE};
use super::shutdown::Shutdown;
use crate::config::{Config, ConfigError, Supervision};

/// The oldest nats-server unibus runs on (auth callout arrived in 2.10).
const MIN_NATS_VERSION: (u32, u32) = (2, 10);

/// A nats-server that ran this long without dying resets the backoff.
const STABLE_AFTER: Duration = Duration::from_secs(30);

/// Finds the nats-server binary and checks its version.
///
/// Order: `--nats-server` (or `UNIBUS_NATS_SERVER`, which the config layers fold into the
/// same key), the file beside the unibus executable (as the container image ships it), the
/// one `scripts/setup` installed, then `PATH`.
pub fn locate_nats_server(configured: Option<&Path>) -> Result<PathBuf, ConfigError> {
    let field = "--nats-server";
    let path = match configured {
        Some(p) => {
            if !p.is_file() {
                return Err(ConfigError::new(
                    field,
                    format!("{} does not exist; run scripts/setup or give the path of nats-server", p.display()),
                ));
            }
            p.to_path_buf()
        }
        None => candidates().into_iter().find(|p| p.is_file()).ok_or_else(|| {
            ConfigError::new(
                field,
                "no nats-server found (beside unibus, in .tools/bin, or on PATH); run scripts/setup or pass --nats-server PATH",
            )
        })?,
    };
    let version = nats_version(&path)
        .map_err(|why| ConfigError::new(field, format!("{}: {why}", path.display())))?;
    if version < MIN_NATS_VERSION {
        return Err(ConfigError::new(
            field,
            format!(
                "{} is nats-server {}.{}; unibus needs {}.{} or newer (scripts/setup installs 2.15.1)",
                path.display(),
                version.0,
                version.1,
                MIN_NATS_VERSION.0,
                MIN_NATS_VERSION.1
            ),
        ));
    }
    Ok(path)
}

fn candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        out.push(dir.join("nats-server"));
    }
    out.push(Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/bin/nats-server"));
    if let Some(paths) = std::env::var_os("PATH") {
        out.extend(std::env::split_paths(&paths).map(|d| d.join("nats-server")));
    }
    out
}

/// Runs `nats-server --version` and parses `nats-server: v2.15.1`.
fn nats_version(path: &Path) -> Result<(u32, u32), String> {
    let out = std::process::Command::new(path)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run it: {e}"))?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    parse_version(&text).ok_or_else(|| {
        format!(
            "not a nats-server (its --version printed `{}`)",
            text.trim()
        )
    })
}

fn parse_version(text: &str) -> Option<(u32, u32)> {
    let v = text.split_whitespace().find_map(|w| w.strip_prefix('v'))?;
    let mut parts = v.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Kills a nats-server left running by a node that crashed, found through its pid file.
/// Only a process whose command line names this data dir's config is touched: a recycled
/// pid belonging to something else is left alone.
pub fn reap_stale(data_dir: &Path) {
    let pid_path = data_dir.join(PID_FILE);
    let Ok(text) = std::fs::read_to_string(&pid_path) else {
        return;
    };
    let conf = data_dir.join(CONF_FILE);
    if let Ok(pid) = text.trim().parse::<i32>()
        && pid > 0
        && process_runs_config(pid, &conf)
    {
        tracing::warn!(
            pid,
            "a nats-server from an earlier run of this node is still running; stopping it"
        );
        signal(pid, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if alive(pid) {
            signal(pid, libc::SIGKILL);
        }
    } else {
        tracing::info!("removing a stale nats-server pid file from an earlier run");
    }
    let _ = std::fs::remove_file(pid_path);
}

fn process_runs_config(pid: i32, conf: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let cmdline = String::from_utf8_lossy(&cmdline);
    cmdline.contains("nats-server") && cmdline.contains(&*conf.to_string_lossy())
}

fn alive(pid: i32) -> bool {
    // A zombie still answers kill(0); /proc's state tells them apart.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
        Err(_) => false,
    }
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) with a positive pid has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// The supervised nats-server of one node.
pub struct Supervisor {
    pub node: String,
    pub binary: PathBuf,
    pub data_dir: PathBuf,
    pub policy: Supervision,
    pub shutdown_timeout: Duration,
    /// The running server's pid (0 when none), for callers that signal it.
    pub pid: Arc<AtomicU32>,
}

impl Supervisor {
    pub fn new(config: &Config, binary: PathBuf, data_dir: PathBuf) -> Self {
        Supervisor {
            node: config.name.clone(),
            binary,
            data_dir,
            policy: config.supervision.clone(),
            shutdown_timeout: config.shutdown_timeout(),
            pid: Arc::new(AtomicU32::new(0)),
        }
    }

    /// Runs nats-server until shutdown, restarting it when it dies. Returns an error when
    /// it died more than `max_restarts` times within `restart_window_secs`: a server that
    /// keeps dying needs an operator, and the node's exit tells its orchestrator.
    pub async fn run(self, mut shutdown: Shutdown) -> Result<(), NodeError> {
        let window = Duration::from_secs(self.policy.restart_window_secs);
        let mut exits: VecDeque<Instant> = VecDeque::new();
        let mut backoff = Duration::from_millis(self.policy.backoff_initial_ms);
        loop {
            let started = Instant::now();
            let why = match self.spawn() {
                Ok(mut child) => {
                    let pid = child.id().unwrap_or(0);
                    self.pid.store(pid, Ordering::SeqCst);
                    let _ = std::fs::write(self.data_dir.join(PID_FILE), format!("{pid}\n"));
                    tracing::info!(pid, "nats-server started");
                    let status = tokio::select! {
                        status = child.wait() => status,
                        _ = shutdown.wait() => {
                            self.stop(&mut child).await;
                            self.forget_pid();
                            return Ok(());
                        }
                    };
                    self.forget_pid();
                    match status {
                        Ok(status) => describe_exit(status),
                        Err(e) => format!("could not wait for it: {e}"),
                    }
                }
                Err(e) => format!("could not start {}: {e}", self.binary.display()),
            };
            if shutdown.is_triggered() {
                return Ok(());
            }
            if started.elapsed() >= STABLE_AFTER {
                backoff = Duration::from_millis(self.policy.backoff_initial_ms);
            }
            let now = Instant::now();
            exits.push_back(now);
            while exits
                .front()
                .is_some_and(|t| now.duration_since(*t) > window)
            {
                exits.pop_front();
            }
            if exits.len() > self.policy.max_restarts as usize {
                tracing::error!(
                    "nats-server {why}; it died {} times within {window:?}, giving up",
                    exits.len()
                );
                return Err(NodeError::TooManyRestarts {
                    count: exits.len(),
                    window,
                    last: why,
                });
            }
            crate::metrics::get().nats_restarts.inc();
            tracing::warn!(
                "nats-server {why}; restarting in {backoff:?} ({} of {} restarts allowed per {window:?})",
                exits.len(),
                self.policy.max_restarts
            );
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.wait() => return Ok(()),
            }
            backoff = (backoff * 2).min(Duration::from_millis(self.policy.backoff_cap_ms));
        }
    }

    fn forget_pid(&self) {
        self.pid.store(0, Ordering::SeqCst);
        let _ = std::fs::remove_file(self.data_dir.join(PID_FILE));
    }

    fn spawn(&self) -> std::io::Result<Child> {
        let mut command = Command::new(&self.binary);
        command
            .arg("-c")
            .arg(self.data_dir.join(CONF_FILE))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: only async-signal-safe calls (getpid/prctl/setpgid/getppid) run between
        // fork and exec.
        let parent = std::process::id() as libc::pid_t;
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died between fork and prctl: then nobody will
                // signal us, so do not start at all.
                if libc::getppid() != parent {
                    return Err(std::io::Error::other("parent exited during spawn"));
                }
                libc::setpgid(0, 0);
                Ok(())
            });
        }
        let mut child = command.spawn()?;
        if let Some(out) = child.stdout.take() {
            tokio::spawn(fold_log(BufReader::new(out)).in_current_span());
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(fold_log(BufReader::new(err)).in_current_span());
        }
        Ok(child)
    }

    /// Lame duck (SIGUSR2: leaders and clients move to peers), a bounded wait, then kill.
    async fn stop(&self, child: &mut Child) {
        let Some(pid) = child.id() else { return };
        tracing::info!(pid, "putting nats-server into lame duck mode");
        signal(pid as i32, libc::SIGUSR2);
        match tokio::time::timeout(self.shutdown_timeout, child.wait()).await {
            Ok(Ok(status)) => tracing::info!("nats-server stopped: {}", describe_exit(status)),
            Ok(Err(e)) => tracing::warn!("waiting for nats-server failed: {e}; killing it"),
            Err(_) => {
                tracing::warn!(
                    "nats-server still running after {:?}; killing it",
                    self.shutdown_timeout
                );
                let _ = child.kill().await;
            }
        }
    }
}

fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => format!("exited ({status})"),
    }
}

/// Re-emits each nats-server log line as a `tracing` event at its own level, inside the
/// node's span, so one log stream shows both and every line names its node.
async fn fold_log<R: tokio::io::AsyncRead + Unpin>(reader: BufReader<R>) {
    let mut lines = reader.lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let (level, message) = split_nats_log_line(&line);
        match level {
            "ERR" | "FTL" => tracing::error!(target: "nats", "{message}"),
            "WRN" => tracing::warn!(target: "nats", "{message}"),
            "DBG" | "TRC" => tracing::debug!(target: "nats", "{message}"),
            _ => tracing::info!(target: "nats", "{message}"),
        }
    }
}

/// `[123] 2026/11/26 17:07:01.203200 [INF] Starting nats-server` → (`INF`, `Starting…`).
fn split_nats_log_line(line: &str) -> (&str, &str) {
    if let Some(open) = line.find(" [")
        && let Some(rest) = line.get(open + 2..)
        && let Some((level, message)) = rest.split_once("] ")
        && level.len() == 3
    {
        return (level, message);
    }
    ("INF", line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_log_lines_split_into_level_and_message() {
        assert_eq!(
            split_nats_log_line("[3516] 2026/11/26 17:07:01.203200 [WRN] JetStream is slow"),
            ("WRN", "JetStream is slow")
        );
        assert_eq!(split_nats_log_line("plain text"), ("INF", "plain text"));
    }

    #[test]
    fn versions_parse() {
        assert_eq!(parse_version("nats-server: v2.15.1\n"), Some((2, 15)));
        assert_eq!(parse_version("nats-server: v2.9.25"), Some((2, 9)));
        assert!(parse_version("hello").is_none());
        assert!((2, 9) < MIN_NATS_VERSION && (2, 15) >= MIN_NATS_VERSION);
    }
}
