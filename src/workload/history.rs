//! The history a workload run writes: one JSON object per line, appended and flushed as each
//! event happens, so a run that is killed still leaves everything it saw up to that point.
//!
//! Times are wall-clock milliseconds since the Unix epoch (not a monotonic clock) because
//! the demos compare them with moments taken by other processes — when a node was cut off
//! the network, when it rejoined — and containers share the host's clock.

use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::WorkloadError;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One line of a history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum Event {
    /// The run began: who writes, who probes, against which servers.
    Start {
        at_ms: u64,
        run: String,
        servers: Vec<String>,
        /// The public key the writes are signed with.
        writer: String,
        /// The user the connection probes log in as (added by this run).
        prober: String,
        interval_ms: u64,
        timeout_ms: u64,
    },
    /// One failed attempt of a write (the write itself may still succeed on a retry).
    Attempt {
        at_ms: u64,
        done_ms: u64,
        id: String,
        attempt: u32,
        error: FailKind,
        message: String,
    },
    /// A write's final outcome.
    Write {
        at_ms: u64,
        done_ms: u64,
        op: String,
        id: String,
        outcome: WriteOutcome,
        attempts: u32,
    },
    /// A new connection to one server, as a valid (admitted, unrevoked) user.
    Connect {
        at_ms: u64,
        done_ms: u64,
        server: String,
        outcome: ConnectOutcome,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
        /// The first attempt's refusal, when nobody decided it in time and the probe tried
        /// again (`outcome` is then the second attempt's).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retried: Option<String>,
    },
    /// The run stopped (duration over, or a signal).
    End { at_ms: u64, reason: String },
}

/// Why one attempt of a write failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailKind {
    /// The server answered `unavailable` (the store could not commit in time): retried.
    Unavailable,
    /// No reply within the client's timeout: retried (the write may have been applied).
    Timeout,
    /// Nobody serves the control plane where the request went: retried.
    NoResponders,
    /// The connection failed or closed under the request: retried.
    Transport,
    /// Any other typed refusal (forbidden, invalid, conflict on a first attempt): final.
    Refused,
}

impl FailKind {
    pub fn retryable(self) -> bool {
        !matches!(self, FailKind::Refused)
    }
}

/// How a write ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteOutcome {
    /// An `ok` reply arrived: the write is acknowledged and must survive.
    Acked,
    /// A retry found the record already there: an earlier attempt was applied but its reply
    /// was lost. Not counted as acknowledged (no `ok` arrived), but checked to be present.
    ExistsOnRetry,
    /// Never acknowledged (refused, out of retries, or the run stopped): may or may not exist.
    GaveUp,
}

/// How a new connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectOutcome {
    /// Admitted (and a round trip to the server succeeded).
    Admitted,
    /// The server refused the user (authorization violation): a valid user denied.
    Denied,
    /// No server answered (refused, timed out, TLS): unavailability, not a denial.
    Unreachable,
}

/// Appends events to a history file, one flushed line each.
pub struct HistoryWriter {
    file: Mutex<std::fs::File>,
}

impl HistoryWriter {
    /// Creates (or truncates) the history file.
    pub fn create(path: &Path) -> Result<Self, WorkloadError> {
        let file = std::fs::File::create(path)
            .map_err(|e| WorkloadError::Usage(format!("--history {}: {e}", path.display())))?;
        Ok(Self {
            file: Mutex::new(file),
        })
    }

    /// Records one event. A write error is logged, not fatal: losing the history file
    /// should not stop the load on a cluster under test; `check` will then say what it
    /// could not read.
    pub fn record(&self, event: &Event) {
        let Ok(mut line) = serde_json::to_vec(event) else {
            return;
        };
        line.push(b'\n');
        let Ok(mut file) = self.file.lock() else {
            return;
        };
        if let Err(e) = file.write_all(&line).and_then(|_| file.flush()) {
            tracing::error!("cannot append to the history: {e}");
        }
    }
}

/// Reads a history back. A truncated last line (the writer was killed mid-write) is
/// ignored; any other line that does not parse is an error naming its line number.
pub fn read(path: &Path) -> Result<Vec<Event>, WorkloadError> {
    let file = std::fs::File::open(path)
        .map_err(|e| WorkloadError::Usage(format!("--history {}: {e}", path.display())))?;
    let lines: Vec<String> = std::io::BufReader::new(file)
        .lines()
        .collect::<Result<_, _>>()
        .map_err(|e| WorkloadError::Usage(format!("--history {}: {e}", path.display())))?;
    let mut events = Vec::with_capacity(lines.len());
    let last = lines.len().saturating_sub(1);
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Event>(line) {
            Ok(e) => events.push(e),
            Err(_) if i == last => {}
            Err(e) => {
                return Err(WorkloadError::Usage(format!(
                    "--history {} line {}: not a workload event: {e}",
                    path.display(),
                    i + 1
                )));
            }
        }
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_a_torn_last_line_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.jsonl");
        let w = HistoryWriter::create(&path).unwrap();
        let write = Event::Write {
            at_ms: 1,
            done_ms: 2,
            op: "rooms.create".into(),
            id: "wl-a-1".into(),
            outcome: WriteOutcome::Acked,
            attempts: 1,
        };
        w.record(&write);
        drop(w);
        let mut text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("{\"ev\":\"write\""), "{text}");
        text.push_str("{\"ev\":\"wri");
        std::fs::write(&path, &text).unwrap();
        assert_eq!(read(&path).unwrap(), vec![write]);

        std::fs::write(
            &path,
            "garbage\n{\"ev\":\"end\",\"at_ms\":1,\"reason\":\"x\"}\n",
        )
        .unwrap();
        let err = read(&path).unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
    }
}
