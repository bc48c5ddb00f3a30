//! Timing: run an async operation with bounded concurrency for a while, and summarise.
//!
//! Throughput workloads call [`alternate`] so the unibus path and its raw twin take turns
//! in short rounds: whatever else the machine does hurts both sides alike.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

/// What one side of a workload did.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub ops: u64,
    pub errors: u64,
    pub elapsed: Duration,
    /// Latencies of successful operations, sorted.
    pub latencies: Vec<Duration>,
}

impl Stats {
    pub fn ops_per_sec(&self) -> f64 {
        if self.elapsed.is_zero() {
            return 0.0;
        }
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    pub fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        self.latencies[i].as_secs_f64() * 1000.0
    }

    fn merge(&mut self, other: Stats) {
        self.ops += other.ops;
        self.errors += other.errors;
        self.elapsed += other.elapsed;
        self.latencies.extend(other.latencies);
        self.latencies.sort();
    }
}

/// Runs `op(i)` for `duration` with `concurrency` operations in flight.
pub async fn run<F, Fut, E>(duration: Duration, concurrency: usize, op: F) -> Stats
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send,
    E: std::fmt::Display,
{
    let op = Arc::new(op);
    let counter = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let started = Instant::now();
    let deadline = started + duration;
    let mut workers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let (op, counter, latencies, errors, first_error) = (
            op.clone(),
            counter.clone(),
            latencies.clone(),
            errors.clone(),
            first_error.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            while Instant::now() < deadline {
                let i = counter.fetch_add(1, Ordering::Relaxed);
                let t = Instant::now();
                let failed = op(i).await.err().map(|e| e.to_string());
                match failed {
                    None => mine.push(t.elapsed()),
                    Some(message) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_error.lock().await.get_or_insert(message);
                    }
                }
            }
            latencies.lock().await.extend(mine);
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let elapsed = started.elapsed();
    let mut latencies = std::mem::take(&mut *latencies.lock().await);
    latencies.sort();
    if let Some(e) = first_error.lock().await.take() {
        eprintln!(
            "bench: {} errors, first: {e}",
            errors.load(Ordering::Relaxed)
        );
    }
    Stats {
        ops: latencies.len() as u64,
        errors: errors.load(Ordering::Relaxed),
        elapsed,
        latencies,
    }
}

/// Alternates `ours` and `raw` for `rounds` rounds of `each`, returning both totals.
pub async fn alternate<A, AF, B, BF, E1, E2>(
    rounds: usize,
    each: Duration,
    concurrency: usize,
    ours: A,
    raw: B,
) -> (Stats, Stats)
where
    A: Fn(u64) -> AF + Send + Sync + Clone + 'static,
    AF: Future<Output = Result<(), E1>> + Send,
    E1: std::fmt::Display,
    B: Fn(u64) -> BF + Send + Sync + Clone + 'static,
    BF: Future<Output = Result<(), E2>> + Send,
    E2: std::fmt::Display,
{
    let (mut a, mut b) = (Stats::default(), Stats::default());
    for _ in 0..rounds {
        a.merge(run(each, concurrency, ours.clone()).await);
        b.merge(run(each, concurrency, raw.clone()).await);
    }
    (a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counts_successes_and_errors_apart() {
        let stats = run(Duration::from_millis(50), 2, |i| async move {
            tokio::task::yield_now().await;
            if i % 2 == 0 { Ok(()) } else { Err("odd") }
        })
        .await;
        assert!(stats.ops > 0 && stats.errors > 0);
        assert!(stats.percentile_ms(0.99) >= stats.percentile_ms(0.5));
    }
}
