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
pub mod faults;
pub mod load;
pub mod measure;
pub mod publish;
pub mod responder;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::client::{Client, ClientOptions};
use crate::localnet::{LocalCluster, Node, Ports, http_get, poll};

/// A client-library connection to local nodes as the user whose seed is `seed` (a file in
/// the secrets dir, e.g. `admin.seed`), pinning the secrets' CA. Servers are tried in the
/// order given, so the first listen address is the node a workload means to go through.
pub async fn client(secrets: &Path, listens: &[&str], seed: &Path) -> Result<Client, String> {
    let mut options = ClientOptions::new(
        listens.iter().map(|l| format!("tls://{l}")),
        seed.to_path_buf(),
    )
    .ca(secrets.join(crate::auth::certs::CA_CERT));
    options.retain_order = true;
    options.name = Some("unibus-bench".into());
    Client::connect(options).await.map_err(|e| e.to_string())
}

/// A bare NATS connection for raw twins, as `seed` (not through the client library: the
/// raw side must not pay for what unibus adds), pinning the secrets' CA.
pub async fn raw_connection(
    secrets: &Path,
    listens: &[&str],
    seed: String,
) -> Result<async_nats::Client, String> {
    let mut addrs = Vec::new();
    for l in listens {
        addrs.push(
            format!("tls://{l}")
                .parse::<async_nats::ServerAddr>()
                .map_err(|e| e.to_string())?,
        );
    }
    async_nats::ConnectOptions::new()
        .nkey(seed)
        .require_tls(true)
        .add_root_certificates(secrets.join(crate::auth::certs::CA_CERT))
        .request_timeout(Some(Duration::from_secs(10)))
        .retain_servers_order()
        .max_reconnects(None)
        .connect(addrs)
        .await
        .map_err(|e| e.to_string())
}

/// A local cluster and the config file its nodes read (kept while they may restart).
pub struct BenchCluster {
    pub cluster: LocalCluster,
    _conf: tempfile::NamedTempFile,
}

impl std::ops::Deref for BenchCluster {
    type Target = LocalCluster;
    fn deref(&self) -> &LocalCluster {
        &self.cluster
    }
}

impl std::ops::DerefMut for BenchCluster {
    fn deref_mut(&mut self) -> &mut LocalCluster {
        &mut self.cluster
    }
}

/// Starts a decentralized three-node cluster at R3 (buckets and the `ROOMS` stream),
/// JetStream fsync on every write or (`fsync` false) every two minutes, and waits until
/// every node is ready.
pub async fn start_cluster(unibus: &Path, fsync: bool) -> Result<BenchCluster, String> {
    let unibus = unibus.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let conf = tempfile::Builder::new()
            .suffix(".toml")
            .tempfile()
            .map_err(|e| e.to_string())?;
        let sync = if fsync { "always" } else { "2m" };
        std::fs::write(conf.path(), format!("jetstream_sync = \"{sync}\"\n"))
            .map_err(|e| e.to_string())?;
        let conf_arg = conf.path().to_string_lossy().to_string();
        let cluster = LocalCluster::start(
            &unibus,
            &[
                "--flag",
                "decentralized=true",
                "--replicas",
                "3",
                "--config",
                &conf_arg,
            ],
        );
        for node in &cluster.nodes {
            node.wait_ready(Duration::from_secs(60));
        }
        Ok(BenchCluster {
            cluster,
            _conf: conf,
        })
    })
    .await
    .map_err(|e| format!("the cluster did not start: {e}"))?
}

/// Makes a fresh user (as `admin`) whose seed is written to `dir/<name>.seed`; returns the
/// seed file and the public key. Workloads that create many rooms do it as such a user:
/// the auth callout lists a user's rooms when it admits a connection, so the admin's own
/// connections must not inherit thousands of benchmark rooms.
pub async fn new_user(admin: &Client, dir: &Path, name: &str) -> Result<(PathBuf, String), String> {
    let key = nkeys::KeyPair::new_user();
    let file = dir.join(format!("{name}.seed"));
    crate::auth::keys::write_seed(&file, &key).map_err(|e| e.to_string())?;
    admin
        .add_user(&key.public_key(), name, false)
        .await
        .map_err(|e| e.to_string())?;
    Ok((file, key.public_key()))
}

/// The seed in `path`, trimmed.
pub fn seed_of(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The node's APP identity (derived from the service seed; see `node::security`): it
/// lands in `APP` with no permission limits, like the node's own control-plane connection,
/// so raw twins use it for bare request/reply and bare JetStream streams.
pub fn app_seed(secrets: &Path) -> Result<String, String> {
    let service =
        crate::auth::keys::read_user_seed(&secrets.join(crate::auth::certs::SERVICE_SEED))
            .map_err(|e| e.to_string())?;
    crate::auth::keys::derive_user(&service, "app")
        .and_then(|k| k.seed())
        .map_err(|e| e.to_string())
}

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
    /// Throughput workloads: the machine's busy CPU time per operation (ms, all cores,
    /// every process), for unibus and its twin, and the busy share of the cores while
    /// each ran (see `measure::Cpu`). When both sides keep the machine busy, the ratio
    /// is about `per_op × raw_cpu_ms_per_op / cpu_ms_per_op`, `per_op` being what one
    /// unibus operation counts for (5 KV writes for `ctl_write_*`, else 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_ms_per_op: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_cpu_ms_per_op: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub busy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_busy: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: Machine,
    /// How much this run did (what `--quick` shortens).
    pub settings: Settings,
    /// Wall time of the whole run.
    pub wall_s: f64,
    pub workloads: Vec<Workload>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub memory_gib: f64,
    pub nats_server: String,
    pub unibus: String,
}

/// The sizes of one run; `--quick` uses fewer and shorter rounds and a smaller store.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub quick: bool,
    /// Alternating rounds per throughput workload, and the length of each side's turn.
    pub rounds: usize,
    pub round_s: f64,
    /// Start-ups timed for `ready_single_s` and `ready_three_s`.
    pub ready_single_runs: usize,
    pub ready_three_runs: usize,
    /// Memberships loaded for `rooms_for_endpoint_p99_ms_1m` / `node_rss_mib`, and lookups.
    pub memberships: usize,
    pub lookups: usize,
    /// Removals timed for `revocation_p99_s`.
    pub revocations: usize,
}

impl Settings {
    pub fn new(quick: bool) -> Settings {
        if quick {
            Settings {
                quick,
                rounds: 2,
                round_s: 1.5,
                ready_single_runs: 2,
                ready_three_runs: 1,
                memberships: 100_000,
                lookups: 300,
                revocations: 5,
            }
        } else {
            Settings {
                quick,
                rounds: 5,
                round_s: 3.0,
                ready_single_runs: 10,
                ready_three_runs: 5,
                memberships: 1_000_000,
                lookups: 2000,
                revocations: 20,
            }
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Options {
    pub quick: bool,
    /// Run only these workloads (by name; a group runs when any of its names is asked for).
    pub only: Vec<String>,
}

/// Every workload name, in report order (a public interface: tools read them).
pub const NAMES: [&str; 17] = [
    "ready_single_s",
    "ready_three_s",
    "ctl_read",
    "connect_callout",
    "rooms_for_endpoint_p99_ms_1m",
    "node_rss_mib",
    "ctl_write_r1",
    "ctl_write_r3",
    "room_publish",
    "room_publish_encrypted",
    "room_durable",
    "revocation_p99_s",
    "rolling_restart_gap_s",
    "leader_kill_gap_s",
    "ctl_write_r1_nofsync",
    "ctl_write_r3_nofsync",
    "connect_callout_r3",
];

/// Runs every workload (or those in `opts.only`). A workload that fails is reported on
/// stderr and left out, so one broken path does not hide the others' numbers.
pub async fn run(unibus: &Path, nats_server: &Path, opts: Options) -> Report {
    let started = Instant::now();
    let settings = Settings::new(opts.quick);
    let wants = |names: &[&str]| {
        opts.only.is_empty() || names.iter().any(|n| opts.only.iter().any(|o| o == n))
    };
    let (rounds, each) = (settings.rounds, Duration::from_secs_f64(settings.round_s));
    let mut workloads = Vec::new();
    let mut push = |name: &str, result: Result<Vec<Workload>, String>| match result {
        Ok(mut w) => workloads.append(&mut w),
        Err(e) => eprintln!("bench: {name} failed: {e}"),
    };
    let (u, n) = (unibus.to_path_buf(), nats_server.to_path_buf());
    if wants(&["ready_single_s", "ready_three_s"]) {
        let (single, three) = (settings.ready_single_runs, settings.ready_three_runs);
        let startup = tokio::task::spawn_blocking(move || {
            vec![ready_single(&u, &n, single), ready_three(&u, &n, three)]
        })
        .await
        .map_err(|e| e.to_string());
        push("ready", startup);
    }
    if wants(&["ctl_read"]) {
        push(
            "ctl_read",
            ctl::ctl_read(unibus, rounds, each).await.map(|w| vec![w]),
        );
    }
    if wants(&["connect_callout"]) {
        push(
            "connect_callout",
            connect::connect_callout(unibus, nats_server, rounds, each)
                .await
                .map(|w| vec![w]),
        );
    }
    if wants(&["rooms_for_endpoint_p99_ms_1m", "node_rss_mib"]) {
        push(
            "rooms_for_endpoint_p99_ms_1m",
            load::rooms_for_endpoint(unibus, settings.memberships, settings.lookups).await,
        );
    }
    let on_cluster = [
        "ctl_write_r1",
        "ctl_write_r3",
        "room_publish",
        "room_publish_encrypted",
        "room_durable",
        "revocation_p99_s",
        "rolling_restart_gap_s",
        "leader_kill_gap_s",
        "connect_callout_r3",
    ];
    if wants(&on_cluster) {
        match start_cluster(unibus, true).await {
            Err(e) => eprintln!("bench: the fsync cluster did not start: {e}"),
            Ok(mut cluster) => {
                if wants(&["ctl_write_r1", "ctl_write_r3"]) {
                    push(
                        "ctl_write",
                        ctl::ctl_write(&cluster, true, rounds, each).await,
                    );
                }
                if wants(&["room_publish"]) {
                    push(
                        "room_publish",
                        publish::room_publish(&cluster, false, rounds, each)
                            .await
                            .map(|w| vec![w]),
                    );
                }
                if wants(&["room_publish_encrypted"]) {
                    push(
                        "room_publish_encrypted",
                        publish::room_publish(&cluster, true, rounds, each)
                            .await
                            .map(|w| vec![w]),
                    );
                }
                if wants(&["room_durable"]) {
                    push(
                        "room_durable",
                        publish::room_durable(&cluster, rounds, each)
                            .await
                            .map(|w| vec![w]),
                    );
                }
                if wants(&["revocation_p99_s"]) {
                    push(
                        "revocation_p99_s",
                        faults::revocation(&cluster, settings.revocations)
                            .await
                            .map(|w| vec![w]),
                    );
                }
                if wants(&["connect_callout_r3"]) {
                    push(
                        "connect_callout_r3",
                        connect::connect_callout_r3(&cluster, nats_server, rounds, each)
                            .await
                            .map(|w| vec![w]),
                    );
                }
                if wants(&["rolling_restart_gap_s"]) {
                    push(
                        "rolling_restart_gap_s",
                        faults::rolling_restart(&mut cluster).await.map(|w| vec![w]),
                    );
                }
                if wants(&["leader_kill_gap_s"]) {
                    push(
                        "leader_kill_gap_s",
                        faults::leader_kill(&mut cluster).await.map(|w| vec![w]),
                    );
                }
                tokio::task::spawn_blocking(move || drop(cluster))
                    .await
                    .ok();
            }
        }
    }
    if wants(&["ctl_write_r1_nofsync", "ctl_write_r3_nofsync"]) {
        match start_cluster(unibus, false).await {
            Err(e) => eprintln!("bench: the no-fsync cluster did not start: {e}"),
            Ok(cluster) => {
                push(
                    "ctl_write_nofsync",
                    ctl::ctl_write(&cluster, false, rounds, each).await,
                );
                tokio::task::spawn_blocking(move || drop(cluster))
                    .await
                    .ok();
            }
        }
    }
    if !opts.only.is_empty() {
        workloads.retain(|w| opts.only.contains(&w.name));
    }
    workloads.sort_by_key(|w| {
        NAMES
            .iter()
            .position(|n| *n == w.name)
            .unwrap_or(NAMES.len())
    });
    Report {
        machine: machine(nats_server),
        settings,
        wall_s: started.elapsed().as_secs_f64(),
        workloads,
    }
}

/// A ready single node with the defaults (SQLite, enforce, TLS), started off the runtime.
pub async fn single_node(unibus: &Path) -> Result<Node, String> {
    let unibus = unibus.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let node = Node::start(&unibus, "bench", &Ports::pick(), &[], &[]);
        node.wait_ready(Duration::from_secs(30));
        node
    })
    .await
    .map_err(|e| e.to_string())
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
        cpu_ms_per_op: ours.cpu_ms_per_op(),
        raw_cpu_ms_per_op: raw.cpu_ms_per_op(),
        busy: ours.cpu.busy(),
        raw_busy: raw.cpu.busy(),
    }
}

fn ready_single(unibus: &Path, nats_server: &Path, rounds: usize) -> Workload {
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let start = Instant::now();
        let node = Node::start(unibus, "bench", &Ports::pick(), &[], &[]);
        node.wait_ready(Duration::from_secs(30));
        ours.push(start.elapsed().as_secs_f64());
        raw.push(raw_ready(nats_server, vec![node]));
    }
    value_workload("ready_single_s", median(&ours), Some(median(&raw)), "s")
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

/// The raw twin of a start-up: stops the nodes (keeping their data dirs: the configs
/// point at the TLS files in them), then starts bare nats-servers on their rendered configs
/// (with empty JetStream dirs, as the nodes had) and times them until every `/healthz` is
/// 200.
fn raw_ready(nats_server: &Path, mut nodes: Vec<Node>) -> f64 {
    let Ok(scratch) = tempfile::tempdir() else {
        return f64::NAN;
    };
    let confs: Vec<PathBuf> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| fresh_conf(&n.data, &scratch.path().join(i.to_string())))
        .collect();
    let addrs: Vec<String> = nodes.iter().map(|n| n.ports.nats_http.clone()).collect();
    for node in &mut nodes {
        node.kill_now();
    }
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
    let all_up = addrs.iter().all(|addr| {
        poll(Duration::from_secs(60), || {
            http_get(addr, "/healthz").filter(|(s, _)| *s == 200)
        })
        .is_some()
    });
    let took = if all_up {
        start.elapsed().as_secs_f64()
    } else {
        eprintln!("bench: a bare nats-server on a node's config did not become healthy");
        f64::NAN
    };
    for child in &mut children {
        let _ = child.kill();
        let _ = child.wait();
    }
    drop(nodes);
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

pub fn value_workload(name: &str, value: f64, raw: Option<f64>, unit: &str) -> Workload {
    Workload {
        name: name.into(),
        unibus: value,
        raw,
        ratio: raw.filter(|_| value > 0.0).map(|r| r / value),
        p50_ms: None,
        p99_ms: None,
        value: Some(value),
        unit: unit.into(),
        cpu_ms_per_op: None,
        raw_cpu_ms_per_op: None,
        busy: None,
        raw_busy: None,
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
    let st = &report.settings;
    let mut out = format!(
        "machine: {} cpus, {} GiB, {}, unibus {}\n\
         run: {}{} rounds of {}s per side, {} memberships ({} lookups), {} revocations; {:.0}s wall\n",
        m.cpus,
        m.memory_gib,
        m.nats_server,
        m.unibus,
        if st.quick { "--quick: " } else { "" },
        st.rounds,
        st.round_s,
        st.memberships,
        st.lookups,
        st.revocations,
        report.wall_s
    );
    out.push_str(&format!(
        "{:<28} {:>12} {:>12} {:>7} {:>9} {:>9} {:>15} {:>9}  {}\n",
        "WORKLOAD",
        "UNIBUS",
        "RAW",
        "RATIO",
        "P50_MS",
        "P99_MS",
        "CPU_MS/OP U|RAW",
        "BUSY U|R",
        "UNIT"
    ));
    let num = |x: Option<f64>| x.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into());
    for w in &report.workloads {
        let ms = |x: Option<f64>| x.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into());
        let pair = |a: Option<f64>, b: Option<f64>, f: fn(f64) -> String| match (a, b) {
            (Some(a), Some(b)) => format!("{}|{}", f(a), f(b)),
            _ => "-".into(),
        };
        out.push_str(&format!(
            "{:<28} {:>12} {:>12} {:>7} {:>9} {:>9} {:>15} {:>9}  {}\n",
            w.name,
            format!("{:.3}", w.unibus),
            num(w.raw),
            w.ratio
                .map(|r| format!("{r:.2}"))
                .unwrap_or_else(|| "-".into()),
            ms(w.p50_ms),
            ms(w.p99_ms),
            pair(w.cpu_ms_per_op, w.raw_cpu_ms_per_op, |v| format!("{v:.3}")),
            pair(w.busy, w.raw_busy, |v| format!("{:.0}", v * 100.0)),
            w.unit
        ));
    }
    out
}
