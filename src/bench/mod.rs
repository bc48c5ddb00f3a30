//! `unibus bench`: measures unibus side by side with its raw NATS twin in one run.
//!
//! Each workload runs the unibus path and the raw path alternately on the same machine, so
//! the ratio compares like with like even when the machine is busy. Speed is only ever
//! measured here (and recorded in BENCHMARKS.md), never asserted by tests.
//!
//! Workloads so far (names are a public interface; tools read them): `ctl_read`,
//! `ctl_write_r1`, `ctl_write_r3` and their `_nofsync` twins (see [`ctl`]),
//! `connect_callout` (see [`connect`]), and:
//! - `ready_single_s`: `node up` → `/readyz` 200 for one node; raw twin: a bare nats-server
//!   with the same rendered config → its `/healthz` 200.
//! - `ready_three_s`: the same for three nodes on loopback started together (all ready).
//! - `node_rss_mib`: resident memory of an idle ready node, nats-server excluded.

pub mod connect;
pub mod ctl;
pub mod measure;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::localnet::{LocalCluster, Node, Ports, http_get, poll};

/// One measured workload, in the shape `--json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    pub name: String,
    /// unibus's measurement (ops/s for throughput workloads; the value for value workloads).
    pub unibus: f64,
    /// The raw NATS twin's measurement, same unit.
    pub raw: Option<f64>,
    /// unibus / raw for throughput (higher is better); raw / unibus for times, so 1.0 means
    /// unibus adds nothing either way.
    pub ratio: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// For value workloads (lower is better).
    pub value: Option<f64>,
    pub unit: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub workloads: Vec<Workload>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub memory_gib: f64,
    pub nats_server: String,
    pub unibus: String,
}

#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub quick: bool,
}

/// Runs every workload. A workload that fails is reported on stderr and left out, so
/// one broken path does not hide the others' numbers.
pub async fn run(unibus: &Path, nats_server: &Path, opts: Options) -> Report {
    let rounds = if opts.quick { 3 } else { 10 };
    let (tp_rounds, each) = if opts.quick {
        (2, Duration::from_secs(2))
    } else {
        (5, Duration::from_secs(3))
    };
    let mut workloads = Vec::new();
    let (u, n) = (unibus.to_path_buf(), nats_server.to_path_buf());
    if let Ok(mut startup) = tokio::task::spawn_blocking(move || {
        let (ready_single, rss) = ready_single(&u, &n, rounds);
        vec![ready_single, ready_three(&u, &n, rounds.min(5)), rss]
    })
    .await
    {
        workloads.append(&mut startup);
    }
    let mut push = |name: &str, result: Result<Vec<Workload>, String>| match result {
        Ok(mut w) => workloads.append(&mut w),
        Err(e) => eprintln!("bench: {name} failed: {e}"),
    };
    push(
        "ctl_read",
        ctl::ctl_read(unibus, tp_rounds, each)
            .await
            .map(|w| vec![w]),
    );
    push(
        "ctl_write",
        ctl::ctl_write(unibus, true, tp_rounds, each).await,
    );
    push(
        "ctl_write_nofsync",
        ctl::ctl_write(unibus, false, tp_rounds, each).await,
    );
    push(
        "connect_callout",
        connect::connect_callout(unibus, nats_server, tp_rounds, each)
            .await
            .map(|w| vec![w]),
    );
    Report {
        machine: machine(nats_server),
        workloads,
    }
}

/// A throughput workload: ops/s of both sides; the ratio compares unibus's rate times
/// `per_op` (raw operations one unibus operation stands for) with the raw rate.
pub fn throughput_workload(
    name: &str,
    ours: &measure::Stats,
    raw: &measure::Stats,
    per_op: f64,
) -> Workload {
    let (u, r) = (ours.ops_per_sec(), raw.ops_per_sec());
    Workload {
        name: name.into(),
        unibus: u,
        raw: Some(r),
        ratio: (r > 0.0).then(|| u * per_op / r),
        p50_ms: Some(ours.percentile_ms(0.5)),
        p99_ms: Some(ours.percentile_ms(0.99)),
        value: None,
        unit: "ops/s".into(),
    }
}

fn ready_single(unibus: &Path, nats_server: &Path, rounds: usize) -> (Workload, Workload) {
    let (mut ours, mut raw, mut rss) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let start = Instant::now();
        let node = Node::start(unibus, "bench", &Ports::pick(), &[], &[]);
        node.wait_ready(Duration::from_secs(30));
        ours.push(start.elapsed().as_secs_f64());
        // Let start-up allocations settle before reading idle memory.
        poll(Duration::from_secs(2), || None::<()>);
        rss.extend(node.rss_mib());
        raw.push(raw_ready(nats_server, vec![node]));
    }
    let value = median(&ours);
    let raw = median(&raw);
    (
        value_workload("ready_single_s", value, Some(raw), "s"),
        value_workload("node_rss_mib", median(&rss), None, "MiB"),
    )
}

fn ready_three(unibus: &Path, nats_server: &Path, rounds: usize) -> Workload {
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let start = Instant::now();
        let mut cluster = LocalCluster::start(unibus, &["--flag", "decentralized=true"]);
        for node in &cluster.nodes {
            node.wait_ready(Duration::from_secs(60));
        }
        ours.push(start.elapsed().as_secs_f64());
        raw.push(raw_ready(nats_server, std::mem::take(&mut cluster.nodes)));
    }
    value_workload("ready_three_s", median(&ours), Some(median(&raw)), "s")
}

/// The raw twin of a start-up: stops the nodes, then starts bare nats-servers on their
/// rendered configs (with empty JetStream dirs, as the nodes had) and times them until
/// every `/healthz` is 200.
fn raw_ready(nats_server: &Path, nodes: Vec<Node>) -> f64 {
    let Ok(scratch) = tempfile::tempdir() else {
        return f64::NAN;
    };
    let confs: Vec<PathBuf> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| fresh_conf(&n.data, &scratch.path().join(i.to_string())))
        .collect();
    let addrs: Vec<String> = nodes.iter().map(|n| n.ports.nats_http.clone()).collect();
    drop(nodes);
    for addr in &addrs {
        poll(Duration::from_secs(10), || {
            http_get(addr, "/healthz").is_none().then_some(())
        });
    }
    let start = Instant::now();
    let mut children: Vec<std::process::Child> = confs
        .iter()
        .filter_map(|c| spawn_nats(nats_server, c))
        .collect();
    for addr in &addrs {
        poll(Duration::from_secs(60), || {
            http_get(addr, "/healthz").filter(|(s, _)| *s == 200)
        });
    }
    let took = start.elapsed().as_secs_f64();
    for child in &mut children {
        let _ = child.kill();
        let _ = child.wait();
    }
    took
}

/// A copy of the node's rendered nats-server config, in `dir`, with an empty store dir.
fn fresh_conf(data: &Path, dir: &Path) -> PathBuf {
    let conf = data.join(crate::node::nats_config::CONF_FILE);
    let text = std::fs::read_to_string(&conf).unwrap_or_default();
    let _ = std::fs::create_dir_all(dir);
    let text = text.replace(
        &format!(
            "store_dir: {}",
            serde_json::Value::from(data.to_string_lossy())
        ),
        &format!(
            "store_dir: {}",
            serde_json::Value::from(dir.to_string_lossy())
        ),
    );
    let out = dir.join("raw.conf");
    let _ = std::fs::write(&out, text);
    out
}

fn spawn_nats(nats_server: &Path, conf: &Path) -> Option<std::process::Child> {
    std::process::Command::new(nats_server)
        .arg("-c")
        .arg(conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()
}

fn value_workload(name: &str, value: f64, raw: Option<f64>, unit: &str) -> Workload {
    Workload {
        name: name.into(),
        unibus: value,
        raw,
        ratio: raw.filter(|_| value > 0.0).map(|r| r / value),
        p50_ms: None,
        p99_ms: None,
        value: Some(value),
        unit: unit.into(),
    }
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn machine(nats_server: &Path) -> Machine {
    let memory_kib: f64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0.0);
    let nats_version = std::process::Command::new(nats_server)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    Machine {
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        memory_gib: (memory_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        nats_server: nats_version,
        unibus: env!("CARGO_PKG_VERSION").into(),
    }
}

/// A plain-text table of the report.
pub fn table(report: &Report) -> String {
    let m = &report.machine;
    let mut out = format!(
        "machine: {} cpus, {} GiB, {}, unibus {}\n",
        m.cpus, m.memory_gib, m.nats_server, m.unibus
    );
    out.push_str(&format!(
        "{:<28} {:>12} {:>12} {:>7}  {}\n",
        "WORKLOAD", "UNIBUS", "RAW", "RATIO", "UNIT"
    ));
    let num = |x: Option<f64>| x.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into());
    for w in &report.workloads {
        out.push_str(&format!(
            "{:<28} {:>12} {:>12} {:>7}  {}\n",
            w.name,
            format!("{:.3}", w.unibus),
            num(w.raw),
            w.ratio
                .map(|r| format!("{r:.2}"))
                .unwrap_or_else(|| "-".into()),
            w.unit
        ));
    }
    out
}
