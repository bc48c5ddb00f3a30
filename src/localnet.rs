//! Local nodes on loopback: real `unibus node up` child processes (and so real
//! nats-servers), started by the integration tests and by `unibus bench`.
//!
//! One piece of code serves both so the benchmark measures exactly what the tests check.
//! Every wait polls with a deadline; nothing sleeps to synchronise. A [`Node`] kills its
//! process (and so its nats-server) when dropped, so a failed run leaves nothing behind.
//! These helpers panic on failure: they are for tests and benchmarks, never the node.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The nats-server scripts/setup installed (or `UNIBUS_NATS_SERVER`).
pub fn nats_server_bin() -> PathBuf {
    std::env::var_os("UNIBUS_NATS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/bin/nats-server"))
}

/// Route addresses for an `n`-node loopback cluster: each node's peers are the others.
pub fn cluster_ports(n: usize) -> (Vec<Ports>, Vec<Vec<String>>) {
    let ports: Vec<Ports> = (0..n).map(|_| Ports::pick()).collect();
    let peers = (0..n)
        .map(|i| {
            ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, p)| p.cluster.clone())
                .collect()
        })
        .collect();
    (ports, peers)
}

/// Cluster secrets for `names` (as `unibus cluster init` writes them) in a temp dir.
pub fn cluster_secrets(names: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    crate::auth::certs::init_cluster(&dir.path().join("s"), &names, &[]).unwrap();
    dir
}

/// `n` distinct free loopback ports (all held until all are chosen, then released).
///
/// Chosen below the kernel's ephemeral range when there is room: a port the OS handed out
/// for `bind(0)` and we released could be taken next as the *source* port of any outgoing
/// connection (every client and route dial draws from that range) before our server binds
/// it, and the server would fail to start. Below the range only another listener can take
/// it, and a process-wide cursor keeps this process from handing one out twice.
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n).map(|_| bind_free_port()).collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// Lowest port this module hands out below the ephemeral range.
const LOW_PORT: u16 = 10_000;

fn bind_free_port() -> TcpListener {
    use std::sync::atomic::{AtomicU32, Ordering};
    // The span of ports below the ephemeral range, and a cursor over it that starts
    // somewhere else in each process (so test binaries run one after another do not reuse
    // each other's ports while those may linger in TIME_WAIT); read once per process.
    static SPAN: std::sync::OnceLock<Option<(u32, AtomicU32)>> = std::sync::OnceLock::new();
    let below_ephemeral = SPAN.get_or_init(|| {
        let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
            .unwrap_or(32_768);
        (ephemeral_low > LOW_PORT + 1_000).then(|| {
            let span = u32::from(ephemeral_low - LOW_PORT);
            (span, AtomicU32::new(std::process::id() % span))
        })
    });
    if let Some((span, cursor)) = below_ephemeral {
        for _ in 0..*span {
            let offset = cursor.fetch_add(1, Ordering::Relaxed) % span;
            let port = LOW_PORT + offset as u16;
            if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
                return listener;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0").unwrap()
}

/// Polls `f` every 50 ms until it returns Some or `timeout` passes.
pub fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A blocking HTTP GET: (status, body).
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

pub fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
        Err(_) => false,
    }
}

pub fn kill(pid: i32, signal: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// The addresses one node listens on.
#[derive(Clone, Debug)]
pub struct Ports {
    pub listen: String,
    pub cluster: String,
    pub http: String,
    pub nats_http: String,
}

impl Ports {
    pub fn pick() -> Ports {
        let p = free_ports(4);
        let a = |port: u16| format!("127.0.0.1:{port}");
        Ports {
            listen: a(p[0]),
            cluster: a(p[1]),
            http: a(p[2]),
            nats_http: a(p[3]),
        }
    }
}

/// A running `unibus node up`.
pub struct Node {
    pub binary: PathBuf,
    pub name: String,
    pub ports: Ports,
    pub data: PathBuf,
    pub child: Option<Child>,
    log: PathBuf,
    /// The routes and extra arguments it was started with (for [`Node::respawn`]).
    peers: Vec<String>,
    extra: Vec<String>,
    _dir: Option<tempfile::TempDir>,
}

impl Node {
    /// Starts a node in a fresh temp dir.
    pub fn start(
        binary: &Path,
        name: &str,
        ports: &Ports,
        peers: &[String],
        extra: &[&str],
    ) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join(name);
        let mut node = Node::start_in(binary, name, ports, peers, extra, &data);
        node._dir = Some(dir);
        node
    }

    /// Starts a node on a given data dir (to restart one on its old data).
    pub fn start_in(
        binary: &Path,
        name: &str,
        ports: &Ports,
        peers: &[String],
        extra: &[&str],
        data: &Path,
    ) -> Node {
        let mut node = Node {
            binary: binary.to_path_buf(),
            name: name.into(),
            ports: ports.clone(),
            data: data.to_path_buf(),
            child: None,
            log: data.with_extension("log"),
            peers: peers.to_vec(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            _dir: None,
        };
        node.spawn(false);
        node
    }

    /// Starts the node again (after it exited or was killed) on the same data dir, ports,
    /// routes and arguments, keeping its temp dir; its log is appended to.
    pub fn respawn(&mut self) {
        if let Some(mut old) = self.child.take() {
            let _ = old.kill();
            let _ = old.wait();
        }
        self.spawn(true);
    }

    fn spawn(&mut self, append_log: bool) {
        std::fs::create_dir_all(&self.data).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(append_log)
            .write(true)
            .truncate(!append_log)
            .open(&self.log)
            .unwrap();
        let ports = &self.ports;
        let mut cmd = Command::new(&self.binary);
        cmd.args(["node", "up", "--name", &self.name])
            .arg("--data")
            .arg(&self.data)
            .args([
                "--listen",
                &ports.listen,
                "--cluster-listen",
                &ports.cluster,
            ])
            .args(["--http", &ports.http, "--nats-http", &ports.nats_http])
            .arg("--nats-server")
            .arg(nats_server_bin())
            .args(&self.extra)
            // `UNIBUS_NODE_LOG` (a log filter) lets a developer see more of a node.
            .env(
                "UNIBUS_LOG",
                std::env::var("UNIBUS_NODE_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if !self.peers.is_empty() {
            cmd.args(["--peers", &self.peers.join(",")]);
        }
        self.child = Some(cmd.spawn().unwrap());
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `/readyz` as (status, JSON).
    pub fn readyz(&self) -> Option<(u16, serde_json::Value)> {
        let (status, body) = http_get(&self.ports.http, "/readyz")?;
        Some((status, serde_json::from_str(&body).ok()?))
    }

    /// Waits for `/readyz` 200 and returns its body; panics with the log if it never comes.
    pub fn wait_ready(&self, timeout: Duration) -> serde_json::Value {
        match poll(timeout, || {
            self.readyz().filter(|(s, _)| *s == 200).map(|(_, v)| v)
        }) {
            Some(v) => v,
            None => panic!(
                "node {} not ready within {timeout:?}; last /readyz: {:?}\nlog:\n{}",
                self.name,
                self.readyz(),
                self.log()
            ),
        }
    }

    /// The pid of the node's current nats-server, from its pid file.
    pub fn nats_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.data.join("nats-server.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Resident memory of the node process itself (nats-server excluded), in MiB.
    pub fn rss_mib(&self) -> Option<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb / 1024.0)
    }

    /// Kills the node and its nats-server (SIGKILL) but keeps its data dir.
    pub fn kill_now(&mut self) {
        let nats = self.nats_pid();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(pid) = nats {
            kill(pid, libc::SIGKILL);
        }
    }

    pub fn signal(&self, sig: i32) {
        kill(self.pid(), sig);
    }

    /// Waits for the node process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        poll(timeout, || child.try_wait().ok().flatten())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill_now();
    }
}

/// A three-node loopback cluster of `unibus node up`, sharing secrets; `extra` goes to
/// every node.
pub struct LocalCluster {
    pub nodes: Vec<Node>,
    pub secrets: std::path::PathBuf,
    _secrets_dir: tempfile::TempDir,
}

impl LocalCluster {
    pub fn start(binary: &Path, extra: &[&str]) -> LocalCluster {
        let names = ["n1", "n2", "n3"];
        let secrets_dir = cluster_secrets(&names);
        let secrets = secrets_dir.path().join("s");
        let secrets_arg = secrets.to_string_lossy().to_string();
        let (ports, peers) = cluster_ports(3);
        let mut args = vec!["--secrets", secrets_arg.as_str()];
        args.extend_from_slice(extra);
        let nodes = (0..3)
            .map(|i| Node::start(binary, names[i], &ports[i], &peers[i], &args))
            .collect();
        LocalCluster {
            nodes,
            secrets,
            _secrets_dir: secrets_dir,
        }
    }

    /// `--server tls://… --seed-file SEED --ca ca.crt` for CLI commands, as `seed` (a file in
    /// the secrets dir: `service.seed`, `admin.seed`).
    pub fn client_args(&self, node: usize, seed: &str) -> Vec<String> {
        vec![
            "--server".into(),
            format!("tls://{}", self.nodes[node].ports.listen),
            "--seed-file".into(),
            self.secrets.join(seed).to_string_lossy().into(),
            "--ca".into(),
            self.secrets.join("ca.crt").to_string_lossy().into(),
        ]
    }
}
