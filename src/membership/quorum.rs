//! Quorum barriers: the KV store admits connections only from a side of the cluster that
//! can still commit.
//!
//! Reads go to each bucket stream's Raft leader ([`super::jetstream`]). A leader cut off
//! from its peers keeps believing it leads until nats-server's lost-quorum check fires —
//! about ten seconds on 2.15 — and meanwhile answers `STREAM.MSG.GET` from its own copy.
//! For admission that is a fail-open window: a node cut off in a minority, or the survivor
//! of two killed peers, would keep admitting users the majority may already have revoked
//! (seen in the partition demo and in the security test of a lost quorum).
//!
//! So an admission first passes a *barrier* on every bucket it reads: a publish of an
//! empty message under a reserved key (`_quorum`; no id can start with `_`, see
//! [`super::ids`], and listings skip it). JetStream acknowledges a publish only once the
//! stream's Raft group has committed it, so if every barrier is acknowledged within
//! `op_timeout`, each leader still had its quorum after the admission began; if one is not,
//! the admission fails closed. (Not a purge, which would leave nothing behind: a purge is a
//! JetStream API call, and nats-server refuses those while its meta group has no leader —
//! as it does for seconds after a partition heals, when the rejoining node's higher term
//! forces an election — whereas publishes, like the reads, go straight to the stream
//! leader.)
//!
//! Barriers are shared, so their cost does not grow with the connection rate:
//! - rounds run one at a time; an admission that waited for a round which *started after
//!   it arrived* takes that round's outcome, success or failure, instead of starting its
//!   own (a connection storm during a partition fails in one `op_timeout`, not one each);
//! - a round that succeeded vouches for admissions arriving up to [`LEASE`] after it
//!   started. The lease is far inside nats-server's minimum election timeout (4 s), the
//!   earliest another leader could be elected once a quorum has heard from this one.
//!
//! The SQLite store has no peers and no barrier.

use std::future::Future;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

use super::StoreError;

/// How long after a confirmed round starts it still vouches for a new admission.
pub const LEASE: Duration = Duration::from_millis(250);

/// The reserved key each barrier writes (in every bucket admission reads).
pub const BARRIER_KEY: &str = "_quorum";

/// Keys no record can have (ids never start with `_`): skipped by listings and scans.
pub fn is_reserved(key: &str) -> bool {
    key.starts_with('_')
}

/// The last barrier round: when it started and how it ended.
#[derive(Default)]
pub struct Quorum {
    last: Mutex<Option<(Instant, Result<(), StoreError>)>>,
}

impl Quorum {
    /// Ok once a barrier round that vouches for a caller arriving now has committed;
    /// `round` runs one (the barrier writes), and is called only when no recent round will do.
    pub async fn confirm<F, Fut>(&self, round: F) -> Result<(), StoreError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(), StoreError>>,
    {
        let arrived = Instant::now();
        let mut last = self.last.lock().await;
        if let Some((started, outcome)) = &*last
            && vouches(*started, outcome.is_ok(), arrived)
        {
            return outcome.clone();
        }
        let started = Instant::now();
        let outcome = round().await;
        *last = Some((started, outcome.clone()));
        outcome
    }
}

/// Whether a round that started at `started` (and succeeded or not) answers for a caller
/// that arrived at `arrived`: a success within the lease, a failure only if the round began
/// after the caller arrived (an older failure may be healed by now).
fn vouches(started: Instant, succeeded: bool, arrived: Instant) -> bool {
    if succeeded {
        started + LEASE >= arrived
    } else {
        started >= arrived
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn a_success_vouches_within_the_lease_a_failure_only_for_later_arrivals() {
        let t = Instant::now();
        assert!(vouches(t, true, t + LEASE));
        assert!(!vouches(t, true, t + LEASE + Duration::from_millis(1)));
        assert!(vouches(t + Duration::from_millis(1), false, t));
        assert!(!vouches(t, false, t + Duration::from_millis(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_admissions_share_rounds_and_a_stale_success_is_not_reused() {
        let quorum = Arc::new(Quorum::default());
        let rounds = Arc::new(AtomicUsize::new(0));
        let round = |rounds: Arc<AtomicUsize>| {
            move || async move {
                rounds.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
                Ok(())
            }
        };
        let callers: Vec<_> = (0..20)
            .map(|_| {
                let (q, r) = (quorum.clone(), rounds.clone());
                tokio::spawn(async move { q.confirm(round(r)).await })
            })
            .collect();
        for c in callers {
            assert!(c.await.unwrap().is_ok());
        }
        assert_eq!(rounds.load(Ordering::SeqCst), 1, "one round served all");

        tokio::time::advance(LEASE * 2).await;
        quorum.confirm(round(rounds.clone())).await.unwrap();
        assert_eq!(
            rounds.load(Ordering::SeqCst),
            2,
            "past the lease: a new round"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_round_fails_its_waiters_but_not_later_callers() {
        let quorum = Quorum::default();
        let failing =
            || async { Err::<(), _>(StoreError::Unavailable("barrier: timed out".into())) };
        assert!(matches!(
            quorum.confirm(failing).await,
            Err(StoreError::Unavailable(_))
        ));
        tokio::time::advance(Duration::from_millis(1)).await;
        // The failure above began before this caller arrived: it runs its own round.
        quorum.confirm(|| async { Ok(()) }).await.unwrap();
    }
}
