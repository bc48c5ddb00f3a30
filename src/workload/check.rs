//! `unibus workload check`: judge a history against the cluster as it is now.
//!
//! Every write the history says was acknowledged (and every one a retry found already
//! applied) is read back with `rooms.get` — a leader read, so it sees every committed
//! write whichever node answers. A write that is not there is *lost*; one that cannot be
//! read (the cluster stays unavailable) is *unverified*, which fails the check too: a
//! check that could not look has not shown that nothing was lost.
//!
//! With a partition window the check also judges the partition, from one side of it:
//!
//! - [`Side::Isolated`] (the history's client sat on the node that was cut off): between the
//!   cut and the rejoin nothing may be acknowledged and no new connection admitted (the
//!   node fails closed); denials until the node is ready again are expected, not counted.
//! - [`Side::Majority`] (the client used the other nodes): they must keep serving — writes
//!   acknowledged during the cut — and lose nothing. Valid users denied are reported but do
//!   not fail the check: when the cut-off node held stream leaders, the majority elects new
//!   ones (several seconds, NATS Raft) and the rejoin can trigger another election; reads
//!   of the user record fail closed meanwhile, by design.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use nkeys::KeyPair;
use serde::Serialize;
use serde_json::json;

use super::WorkloadError;
use super::history::{ConnectOutcome, Event, FailKind, WriteOutcome};
use super::run::{Target, ctl_call};
use crate::membership::api::ErrorKind;

/// A cut-off node's timeline, wall-clock ms: cut off, reconnected, ready again.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Isolation {
    pub cut_ms: u64,
    pub rejoin_ms: u64,
    pub ready_ms: u64,
}

impl std::str::FromStr for Isolation {
    type Err = String;

    /// `CUT,REJOIN[,READY]` in ms since the epoch.
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<u64> = s
            .split(',')
            .map(|p| p.trim().parse::<u64>())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("expected CUT_MS,REJOIN_MS[,READY_MS]: {e}"))?;
        let (cut_ms, rejoin_ms, ready_ms) = match parts[..] {
            [c, r] => (c, r, r),
            [c, r, y] => (c, r, y),
            _ => return Err("expected CUT_MS,REJOIN_MS[,READY_MS]".into()),
        };
        if !(cut_ms < rejoin_ms && rejoin_ms <= ready_ms) {
            return Err("expected CUT < REJOIN <= READY".into());
        }
        Ok(Isolation {
            cut_ms,
            rejoin_ms,
            ready_ms,
        })
    }
}

/// Events this close after the cut are not judged: a request already committed when the
/// link went may still be answered.
const CUT_SLACK_MS: u64 = 1000;

/// Which side of a partition a history was written from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// A client of the node that was cut off.
    #[default]
    Isolated,
    /// A client of the nodes that kept a quorum.
    Majority,
}

/// What happened while a node was cut off (only with [`Isolation`]).
#[derive(Clone, Debug, Default, Serialize)]
pub struct IsolationReport {
    pub window: Option<Isolation>,
    pub side: Side,
    /// Acknowledged while cut off: must be 0 on the isolated side (a minority cannot
    /// commit), and above 0 on the majority's (it keeps serving).
    pub writes_acked: u64,
    /// The longest gap between acknowledged writes that overlaps the cut, in seconds.
    pub longest_write_gap_s: f64,
    pub attempts_unavailable: u64,
    pub attempts_timed_out: u64,
    pub attempts_other: u64,
    /// The slowest failed attempt while cut off, in ms (fail closed within op_timeout).
    pub slowest_failure_ms: u64,
    /// New connections admitted while cut off: must be 0.
    pub connects_admitted: u64,
    pub connects_denied: u64,
    pub connects_unreachable: u64,
    /// The first acknowledged write after the rejoin, seconds after it (caught up).
    pub first_ack_after_rejoin_s: Option<f64>,
}

/// The verdict on a history.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub run: String,
    pub duration_s: f64,
    pub writes_acked: u64,
    pub writes_lost: u64,
    /// Acknowledged (or found applied) but could not be read back: fails the check.
    pub writes_unverified: u64,
    /// Up to 20 lost or unverified ids, with why.
    pub problems: Vec<String>,
    pub writes_exists_on_retry: u64,
    pub writes_unacknowledged: u64,
    pub attempts_failed: u64,
    pub longest_write_gap_s: f64,
    /// When the longest gap began, seconds into the run.
    pub longest_write_gap_at_s: f64,
    pub connects_admitted: u64,
    pub valid_users_denied: u64,
    pub connects_unreachable: u64,
    /// Each denial of a valid user: when (seconds into the run), which server, and what
    /// the client was told — so a failed run says where to look.
    pub denials: Vec<String>,
    /// Connections refused at first with nobody deciding in time (a server listening
    /// before its authenticator subscribed) and tried once more, as clients do; the
    /// retry's outcome is what the counts above hold.
    pub connects_retried: u64,
    /// Each of those first refusals, as `denials` lists denials.
    pub retries: Vec<String>,
    /// Room messages are not part of the workload yet (no `unibus send/listen`).
    pub messages: Option<(u64, u64)>,
    pub isolation: Option<IsolationReport>,
}

impl Report {
    /// Nothing acknowledged lost (or left unverified), no valid user denied, and — with an
    /// isolation window — nothing acknowledged or admitted while cut off.
    pub fn passed(&self) -> bool {
        let intact = self.writes_lost == 0 && self.writes_unverified == 0;
        match &self.isolation {
            None => intact && self.valid_users_denied == 0,
            Some(i) if i.side == Side::Isolated => {
                intact
                    && self.valid_users_denied == 0
                    && i.writes_acked == 0
                    && i.connects_admitted == 0
            }
            Some(i) => intact && i.writes_acked > 0,
        }
    }

    /// The report as `key: value` lines (stable names; the demos grep them).
    pub fn table(&self) -> String {
        let mut out = String::new();
        let mut line = |k: &str, v: String| out.push_str(&format!("{k:<34} {v}\n"));
        line("run", format!("{} ({:.1} s)", self.run, self.duration_s));
        line("writes acknowledged:", self.writes_acked.to_string());
        line("writes lost:", self.writes_lost.to_string());
        line("writes unverified:", self.writes_unverified.to_string());
        line(
            "writes applied, reply lost:",
            self.writes_exists_on_retry.to_string(),
        );
        line(
            "writes never acknowledged:",
            self.writes_unacknowledged.to_string(),
        );
        line(
            "failed attempts (retried):",
            self.attempts_failed.to_string(),
        );
        line(
            "longest write gap (s):",
            format!(
                "{:.2} (at +{:.1} s)",
                self.longest_write_gap_s, self.longest_write_gap_at_s
            ),
        );
        line("connections admitted:", self.connects_admitted.to_string());
        line("valid users denied:", self.valid_users_denied.to_string());
        for denial in &self.denials {
            line("  denied:", denial.clone());
        }
        line(
            "connections unreachable:",
            self.connects_unreachable.to_string(),
        );
        line(
            "connections retried:",
            format!("{} (first refusal undecided)", self.connects_retried),
        );
        for retry in &self.retries {
            line("  retried:", retry.clone());
        }
        line(
            "messages sent/delivered:",
            match self.messages {
                Some((s, d)) => format!("{s}/{d}"),
                None => "n/a (no room messaging in the workload yet)".into(),
            },
        );
        if let Some(i) = &self.isolation {
            let side = match i.side {
                Side::Isolated => "isolated",
                Side::Majority => "during the cut",
            };
            let mut line = |k: &str, v: String| line(&format!("{side}: {k}"), v);
            line("writes acknowledged:", i.writes_acked.to_string());
            line(
                "longest write gap (s):",
                format!("{:.2}", i.longest_write_gap_s),
            );
            line(
                "failed attempts:",
                format!(
                    "{} unavailable, {} timed out, {} other; slowest {} ms",
                    i.attempts_unavailable,
                    i.attempts_timed_out,
                    i.attempts_other,
                    i.slowest_failure_ms
                ),
            );
            line(
                "new connections:",
                format!(
                    "{} admitted, {} denied, {} unreachable",
                    i.connects_admitted, i.connects_denied, i.connects_unreachable
                ),
            );
            line(
                "first ack after rejoin:",
                i.first_ack_after_rejoin_s
                    .map(|s| format!("{s:.1} s"))
                    .unwrap_or_else(|| "none".into()),
            );
        }
        for p in &self.problems {
            line("problem:", p.clone());
        }
        line(
            "verdict:",
            if self.passed() { "PASS" } else { "FAIL" }.into(),
        );
        out
    }
}

/// Everything the history says, before looking at the cluster.
pub fn analyse(
    events: &[Event],
    isolation: Option<Isolation>,
    side: Side,
) -> (Report, Vec<String>) {
    let mut r = Report::default();
    let mut to_verify = Vec::new();
    let mut acked_at = Vec::new();
    let mut denied_at = Vec::new();
    let mut retried_at = Vec::new();
    let (mut first, mut last) = (u64::MAX, 0u64);
    let mut iso = isolation.map(|w| IsolationReport {
        window: Some(w),
        side,
        ..IsolationReport::default()
    });
    // Judged as "while cut off": finished after the cut (plus slack) and before the rejoin.
    let cut_off =
        |w: &Isolation, _at: u64, done: u64| done > w.cut_ms + CUT_SLACK_MS && done < w.rejoin_ms;
    for e in events {
        match e {
            Event::Start { at_ms, run, .. } => {
                r.run = run.clone();
                first = first.min(*at_ms);
            }
            Event::End { at_ms, .. } => last = last.max(*at_ms),
            Event::Attempt {
                at_ms,
                done_ms,
                error,
                ..
            } => {
                r.attempts_failed += 1;
                last = last.max(*done_ms);
                if let (Some(i), Some(w)) = (iso.as_mut(), isolation.as_ref())
                    && cut_off(w, *at_ms, *done_ms)
                {
                    match error {
                        FailKind::Unavailable => i.attempts_unavailable += 1,
                        FailKind::Timeout => i.attempts_timed_out += 1,
                        _ => i.attempts_other += 1,
                    }
                    i.slowest_failure_ms = i.slowest_failure_ms.max(done_ms - at_ms);
                }
            }
            Event::Write {
                at_ms,
                done_ms,
                id,
                outcome,
                ..
            } => {
                first = first.min(*at_ms);
                last = last.max(*done_ms);
                match outcome {
                    WriteOutcome::Acked => {
                        r.writes_acked += 1;
                        acked_at.push(*done_ms);
                        to_verify.push(id.clone());
                        if let (Some(i), Some(w)) = (iso.as_mut(), isolation.as_ref()) {
                            if cut_off(w, *at_ms, *done_ms) {
                                i.writes_acked += 1;
                            }
                            if *done_ms >= w.rejoin_ms && i.first_ack_after_rejoin_s.is_none() {
                                i.first_ack_after_rejoin_s =
                                    Some((done_ms - w.rejoin_ms) as f64 / 1000.0);
                            }
                        }
                    }
                    WriteOutcome::ExistsOnRetry => {
                        r.writes_exists_on_retry += 1;
                        to_verify.push(id.clone());
                    }
                    WriteOutcome::GaveUp => r.writes_unacknowledged += 1,
                }
            }
            Event::Connect {
                at_ms,
                done_ms,
                outcome,
                server,
                message,
                retried,
            } => {
                last = last.max(*done_ms);
                if let Some(refusal) = retried {
                    r.connects_retried += 1;
                    retried_at.push((*at_ms, server.clone(), Some(refusal.clone())));
                }
                let in_window = isolation.as_ref().map(|w| {
                    (
                        cut_off(w, *at_ms, *done_ms),
                        *done_ms > w.cut_ms && *at_ms < w.ready_ms,
                    )
                });
                if let (Some(i), Some((true, _))) = (iso.as_mut(), in_window) {
                    match outcome {
                        ConnectOutcome::Admitted => i.connects_admitted += 1,
                        ConnectOutcome::Denied => i.connects_denied += 1,
                        ConnectOutcome::Unreachable => i.connects_unreachable += 1,
                    }
                }
                match outcome {
                    ConnectOutcome::Admitted => r.connects_admitted += 1,
                    // Expected while the node is cut off and until it is ready again.
                    ConnectOutcome::Denied
                        if side == Side::Isolated && matches!(in_window, Some((_, true))) => {}
                    ConnectOutcome::Denied => {
                        r.valid_users_denied += 1;
                        denied_at.push((*at_ms, server.clone(), message.clone()));
                    }
                    ConnectOutcome::Unreachable => r.connects_unreachable += 1,
                }
            }
        }
    }
    let when_where = |(at, server, message): (u64, String, Option<String>)| {
        format!(
            "+{:.1} s {server}: {}",
            at.saturating_sub(first.min(at)) as f64 / 1000.0,
            message.as_deref().unwrap_or("(no message)")
        )
    };
    r.denials = denied_at.into_iter().map(when_where).collect();
    r.retries = retried_at.into_iter().map(when_where).collect();
    acked_at.sort_unstable();
    if let Some((gap, at)) = acked_at
        .windows(2)
        .map(|w| (w[1] - w[0], w[0]))
        .max_by_key(|(gap, _)| *gap)
    {
        r.longest_write_gap_s = gap as f64 / 1000.0;
        r.longest_write_gap_at_s = at.saturating_sub(first) as f64 / 1000.0;
    }
    if let (Some(i), Some(w)) = (iso.as_mut(), isolation.as_ref()) {
        i.longest_write_gap_s = acked_at
            .windows(2)
            .filter(|p| p[1] > w.cut_ms && p[0] < w.rejoin_ms)
            .map(|p| p[1] - p[0])
            .max()
            .unwrap_or(w.rejoin_ms - w.cut_ms) as f64
            / 1000.0;
    }
    if first != u64::MAX {
        r.duration_s = last.saturating_sub(first) as f64 / 1000.0;
    }
    r.isolation = iso;
    (r, to_verify)
}

/// Reads every write in `ids` back; fills in lost/unverified.
pub async fn verify(
    report: &mut Report,
    ids: &[String],
    target: &Target,
    timeout: Duration,
    patience: Duration,
) -> Result<(), WorkloadError> {
    let key = Arc::new(
        KeyPair::from_seed(target.seed.trim())
            .map_err(|e| WorkloadError::Usage(format!("--seed-file: not an nkey seed: {e}")))?,
    );
    let client = super::run::connect(target, timeout).await?;
    let outcomes: Vec<(String, Result<(), String>)> = futures_util::stream::iter(ids.iter())
        .map(|id| {
            let (client, key) = (client.clone(), key.clone());
            async move {
                let found = read_back(&client, &key, id, timeout, patience).await;
                (id.clone(), found)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let mut problems = BTreeMap::new();
    for (id, outcome) in outcomes {
        match outcome {
            Ok(()) => {}
            Err(why) if why == "lost" => {
                report.writes_lost += 1;
                problems.insert(
                    id.clone(),
                    format!("{id}: acknowledged but not found (lost)"),
                );
            }
            Err(why) => {
                report.writes_unverified += 1;
                problems.insert(id.clone(), format!("{id}: could not read back: {why}"));
            }
        }
    }
    report.problems = problems.into_values().take(20).collect();
    Ok(())
}

/// `Ok` when the room is there; `Err("lost")` when the cluster says it is not; any other
/// `Err` when it could not tell within `patience`.
async fn read_back(
    client: &async_nats::Client,
    key: &KeyPair,
    id: &str,
    timeout: Duration,
    patience: Duration,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + patience;
    let body = json!({ "room": id });
    loop {
        match ctl_call(client, key, "rooms.get", &body, timeout).await {
            Ok(_) => return Ok(()),
            Err(f) if f.ctl == Some(ErrorKind::NotFound) => return Err("lost".into()),
            Err(f) if f.kind.retryable() && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(f) => return Err(f.message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(id: &str, at: u64, done: u64, outcome: WriteOutcome) -> Event {
        Event::Write {
            at_ms: at,
            done_ms: done,
            op: "rooms.create".into(),
            id: id.into(),
            outcome,
            attempts: 1,
        }
    }

    fn connect(at: u64, outcome: ConnectOutcome) -> Event {
        Event::Connect {
            at_ms: at,
            done_ms: at + 10,
            server: "tls://n3:4222".into(),
            outcome,
            message: None,
            retried: None,
        }
    }

    #[test]
    fn gaps_counts_and_what_to_verify_come_from_the_history() {
        let events = vec![
            write("a", 1000, 1010, WriteOutcome::Acked),
            write("b", 1100, 1110, WriteOutcome::Acked),
            write("c", 1200, 2900, WriteOutcome::ExistsOnRetry),
            write("d", 3000, 3010, WriteOutcome::Acked),
            write("e", 3100, 3200, WriteOutcome::GaveUp),
            connect(1000, ConnectOutcome::Admitted),
            connect(2000, ConnectOutcome::Denied),
            connect(2500, ConnectOutcome::Unreachable),
            Event::Connect {
                at_ms: 2600,
                done_ms: 6700,
                server: "tls://n3:4222".into(),
                outcome: ConnectOutcome::Admitted,
                message: None,
                retried: Some("refused after 4.0 s: authorization violation".into()),
            },
        ];
        let (r, ids) = analyse(&events, None, Side::Isolated);
        assert_eq!(ids, vec!["a", "b", "c", "d"]);
        assert_eq!((r.writes_acked, r.writes_exists_on_retry), (3, 1));
        assert_eq!(r.writes_unacknowledged, 1);
        assert!((r.longest_write_gap_s - 1.9).abs() < 1e-9, "{r:?}");
        assert_eq!(
            (
                r.connects_admitted,
                r.valid_users_denied,
                r.connects_unreachable
            ),
            (2, 1, 1)
        );
        assert!(!r.passed(), "a denied valid user fails the check");
        assert!(r.table().contains("valid users denied:"));
        // A retried probe counts by its second answer, and its first is listed.
        assert_eq!(r.connects_retried, 1);
        assert!(
            r.retries[0].contains("+1.6 s tls://n3:4222: refused after 4.0 s"),
            "{:?}",
            r.retries
        );
        assert!(r.table().contains("connections retried:"), "{}", r.table());
    }

    #[test]
    fn an_isolated_node_must_not_acknowledge_or_admit_and_its_denials_are_expected() {
        let w: Isolation = "10000,30000,35000".parse().unwrap();
        let events = vec![
            write("before", 9000, 9010, WriteOutcome::Acked),
            // In flight at the cut: answered within the slack, not judged.
            write("edge", 9990, 10200, WriteOutcome::Acked),
            connect(15000, ConnectOutcome::Denied),
            connect(32000, ConnectOutcome::Denied),
            write("after", 30000, 31000, WriteOutcome::Acked),
        ];
        let (r, _) = analyse(&events, Some(w), Side::Isolated);
        let i = r.isolation.clone().unwrap();
        assert_eq!((i.writes_acked, i.connects_denied), (0, 1));
        assert_eq!(r.valid_users_denied, 0);
        assert_eq!(i.first_ack_after_rejoin_s, Some(1.0));
        assert!(r.passed(), "{}", r.table());

        let bad = vec![write("split", 15000, 15100, WriteOutcome::Acked)];
        let (r, _) = analyse(&bad, Some(w), Side::Isolated);
        assert!(!r.passed());

        // The same acknowledgement on the majority's side is what it should do; its
        // denials during failover are reported, not failed on.
        let majority = vec![
            write("a", 9000, 9010, WriteOutcome::Acked),
            write("b", 9100, 17000, WriteOutcome::Acked),
            connect(12000, ConnectOutcome::Denied),
        ];
        let (r, _) = analyse(&majority, Some(w), Side::Majority);
        assert_eq!(r.valid_users_denied, 1);
        assert_eq!(r.denials.len(), 1, "{:?}", r.denials);
        assert!(r.denials[0].contains("tls://n3:4222"), "{:?}", r.denials);
        assert!(r.table().contains("denied:"), "{}", r.table());
        assert!((r.isolation.clone().unwrap().longest_write_gap_s - 7.99).abs() < 1e-9);
        assert!(r.passed(), "{}", r.table());
        let (r, _) = analyse(&majority[..1], Some(w), Side::Majority);
        assert!(!r.passed(), "nothing acknowledged during the cut");
        assert!("3,2".parse::<Isolation>().is_err());
    }
}
