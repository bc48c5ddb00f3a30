//! Timing: run an async operation with bounded concurrency for a while, and summarise.
//!
//! Throughput workloads call [`alternate`] so the unibus path and its raw twin take turns
//! in short rounds: whatever else the machine does hurts both sides alike.
//!
//! Each turn also records the machine's CPU use ([`Cpu`]). On a small machine both sides
//! of most workloads keep every core busy (the clients, three nats-servers and, for
//! unibus, three nodes share two cores), and then throughput is simply the inverse of the
//! CPU time an operation costs, summed over every process that takes part: the number
//! that says where a ratio comes from, which latency alone does not.

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
    /// The machine's CPU use while this side ran.
    pub cpu: Cpu,
}

/// Machine-wide CPU time, busy and in all, over some interval, from `/proc/stat`'s first
/// line (every process, in clock ticks summed over the cores). Zero where there is no
/// `/proc/stat`: the derived numbers are then absent, not wrong.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Cpu {
    pub busy_ticks: u64,
    pub total_ticks: u64,
    /// The cores the ticks are summed over (the `cpuN` lines).
    pub cores: usize,
}

impl Cpu {
    /// The counters since boot.
    pub fn now() -> Cpu {
        std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|stat| Cpu::parse(&stat))
            .unwrap_or_default()
    }

    /// `cpu  user nice system idle iowait irq softirq steal …` (in `USER_HZ` ticks): user,
    /// nice, system, irq and softirq are this machine's work (guest time is already
    /// inside user); idle and iowait are time nothing ran; steal is time a hypervisor
    /// gave to someone else, not our work, so it counts in the total only.
    fn parse(stat: &str) -> Option<Cpu> {
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let ticks: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|t| t.parse().ok())
            .collect::<Option<_>>()?;
        let [user, nice, system, idle, iowait, irq, softirq, steal] = ticks[..] else {
            return None;
        };
        let busy = user + nice + system + irq + softirq;
        let cores = stat
            .lines()
            .filter(|l| {
                l.strip_prefix("cpu")
                    .is_some_and(|n| n.starts_with(|c: char| c.is_ascii_digit()))
            })
            .count();
        Some(Cpu {
            busy_ticks: busy,
            total_ticks: busy + idle + iowait + steal,
            cores,
        })
    }

    /// What was used between `self` (earlier) and `later`.
    pub fn until(self, later: Cpu) -> Cpu {
        Cpu {
            busy_ticks: later.busy_ticks.saturating_sub(self.busy_ticks),
            total_ticks: later.total_ticks.saturating_sub(self.total_ticks),
            cores: later.cores,
        }
    }

    pub fn add(&mut self, other: Cpu) {
        self.busy_ticks += other.busy_ticks;
        self.total_ticks += other.total_ticks;
        self.cores = self.cores.max(other.cores);
    }

    /// The share of the machine's cores that were busy (1.0: all of them, all the time);
    /// None when nothing was read.
    pub fn busy(&self) -> Option<f64> {
        (self.total_ticks > 0 && self.cores > 0)
            .then(|| self.busy_ticks as f64 / self.total_ticks as f64)
    }
}

impl Stats {
    pub fn ops_per_sec(&self) -> f64 {
        if self.elapsed.is_zero() {
            return 0.0;
        }
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    /// Busy CPU time, in milliseconds over all cores, per successful operation: the
    /// machine's busy share × its cores × the wall time, divided out. (This way the tick
    /// length, `USER_HZ`, is never needed.) The turns of `alternate` follow each other
    /// without a pause, so work one side leaves behind (a replication, an fsync) is
    /// charged to the next turn: alternation spreads that over both sides alike.
    pub fn cpu_ms_per_op(&self) -> Option<f64> {
        let busy = self.cpu.busy()?;
        let cpu_ms = busy * self.cpu.cores as f64 * self.elapsed.as_secs_f64() * 1000.0;
        (self.ops > 0).then(|| cpu_ms / self.ops as f64)
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
        self.cpu.add(other.cpu);
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
    let cpu_before = Cpu::now();
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
    let cpu = cpu_before.until(Cpu::now());
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
        cpu,
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

    #[test]
    fn reads_cpu_ticks_from_proc_stat() {
        let stat = "cpu  10 1 5 80 4 2 3 6 7 0\ncpu0 5 0 2 40 2 1 1 3 0 0\n\
                    cpu1 5 1 3 40 2 1 2 3 7 0\nintr 1\n";
        let cpu = Cpu::parse(stat).unwrap();
        assert_eq!(
            cpu,
            Cpu {
                busy_ticks: 21,
                total_ticks: 111,
                cores: 2,
            },
            "steal is in the total, not in busy"
        );
        assert_eq!(Cpu::parse("cpu  1 2 3\n"), None, "too few fields");
        assert_eq!(Cpu::parse("cpu  1 2 x 4 5 6 7 8\n"), None);
        let later = Cpu {
            busy_ticks: 121,
            total_ticks: 311,
            cores: 2,
        };
        assert_eq!(cpu.until(later).busy(), Some(0.5));
        let stats = Stats {
            ops: 100,
            elapsed: Duration::from_secs(2),
            cpu: cpu.until(later),
            ..Stats::default()
        };
        // Half of 2 cores for 2 s is 2000 ms of CPU, over 100 operations.
        assert_eq!(stats.cpu_ms_per_op(), Some(20.0));
        assert_eq!(Stats::default().cpu_ms_per_op(), None);
        assert_eq!(
            Cpu::parse("cpu  1 2 3 4 5 6 7 8\n").and_then(|c| c.busy()),
            None,
            "no cores"
        );
    }

    #[tokio::test]
    async fn a_run_records_the_machines_cpu() {
        let stats = run(Duration::from_millis(100), 1, |_| async {
            tokio::task::yield_now().await;
            Ok::<_, String>(())
        })
        .await;
        assert!(stats.cpu.total_ticks > 0, "{:?}", stats.cpu);
        assert!(stats.cpu_ms_per_op().is_some());
    }
}
