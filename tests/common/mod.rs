//! Test harness: real `unibus node up` processes (and so real nats-servers) on loopback.
//!
//! Every wait polls with a deadline; nothing sleeps to synchronise. A [`Node`] kills its
//! process (and so its nats-server) when dropped, so a failing test leaves nothing behind.
#![allow(dead_code)]

pub mod nats;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const UNIBUS: &str = env!("CARGO_BIN_EXE_unibus");

/// The nats-server scripts/setup installed (or `UNIBUS_NATS_SERVER`).
pub fn nats_server_bin() -> PathBuf {
    std::env::var_os("UNIBUS_NATS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/bin/nats-server"))
}

/// `n` distinct free loopback ports (all held until all are chosen, then released).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
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
    pub name: String,
    pub ports: Ports,
    pub data: PathBuf,
    pub child: Option<Child>,
    log: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl Node {
    /// Starts a node in a fresh temp dir.
    pub fn start(name: &str, ports: &Ports, peers: &[String], extra: &[&str]) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join(name);
        let mut node = Node::start_in(name, ports, peers, extra, &data);
        node._dir = Some(dir);
        node
    }

    /// Starts a node on a given data dir (to restart one on its old data).
    pub fn start_in(
        name: &str,
        ports: &Ports,
        peers: &[String],
        extra: &[&str],
        data: &Path,
    ) -> Node {
        std::fs::create_dir_all(data).unwrap();
        let log = data.with_extension("log");
        let mut cmd = Command::new(UNIBUS);
        cmd.args(["node", "up", "--name", name])
            .arg("--data")
            .arg(data)
            .args([
                "--listen",
                &ports.listen,
                "--cluster-listen",
                &ports.cluster,
            ])
            .args(["--http", &ports.http, "--nats-http", &ports.nats_http])
            .arg("--nats-server")
            .arg(nats_server_bin())
            .args(extra)
            .env("UNIBUS_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if !peers.is_empty() {
            cmd.args(["--peers", &peers.join(",")]);
        }
        let child = cmd.spawn().unwrap();
        Node {
            name: name.into(),
            ports: ports.clone(),
            data: data.to_path_buf(),
            child: Some(child),
            log,
            _dir: None,
        }
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
        let nats = self.nats_pid();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(pid) = nats {
            kill(pid, libc::SIGKILL);
        }
    }
}

/// Runs `unibus ARGS` to completion: (exit code, stdout, stderr).
pub fn unibus(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(UNIBUS)
        .args(args)
        .env("UNIBUS_NATS_SERVER", nats_server_bin())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}
