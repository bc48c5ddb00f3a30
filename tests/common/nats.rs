//! A bare nats-server (no unibus node around it) for tests of config fragments and the
//! auth callout: write a config, spawn the server, wait for `/healthz`, kill it on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{free_ports, http_get, nats_server_bin, poll};

pub struct NatsServer {
    pub name: String,
    /// The client port; connect to `nats://127.0.0.1:PORT` (or `tls://`).
    pub port: u16,
    pub cluster_port: u16,
    pub monitor: String,
    pub dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// Ports for one server: (client, cluster, monitor).
pub fn server_ports() -> (u16, u16, u16) {
    let p = free_ports(3);
    (p[0], p[1], p[2])
}

/// `nats-server -t -c FILE`: (passed, output).
pub fn check_config(config: &str, dir: &Path) -> (bool, String) {
    let path = dir.join("check.conf");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(nats_server_bin())
        .arg("-t")
        .arg("-c")
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

impl NatsServer {
    /// Starts a server named `name` in `dir` with `body` appended to the basics (name,
    /// listen, monitor port) and waits for it to be healthy (panics with the log if not
    /// within 15 s).
    pub fn start(name: &str, dir: &Path, ports: (u16, u16, u16), body: &str) -> NatsServer {
        let mut server = NatsServer::spawn(name, dir, ports, body);
        server.wait_healthy();
        server
    }

    /// Like [`NatsServer::start`] without waiting.
    pub fn spawn(name: &str, dir: &Path, ports: (u16, u16, u16), body: &str) -> NatsServer {
        let (port, cluster_port, monitor_port) = ports;
        std::fs::create_dir_all(dir).unwrap();
        let monitor = format!("127.0.0.1:{monitor_port}");
        let config = format!(
            "server_name: {name:?}\nlisten: \"127.0.0.1:{port}\"\nhttp: {monitor:?}\n{body}"
        );
        let conf = dir.join(format!("{name}.conf"));
        std::fs::write(&conf, config).unwrap();
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(nats_server_bin())
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        NatsServer {
            name: name.into(),
            port,
            cluster_port,
            monitor,
            dir: dir.to_path_buf(),
            log,
            child: Some(child),
        }
    }

    /// Waits for `/healthz` 200; panics with the log if the server exits or 15 s pass.
    pub fn wait_healthy(&mut self) {
        let name = self.name.clone();
        let server = self;
        let healthy = poll(Duration::from_secs(15), || {
            if let Some(child) = server.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("nats-server {name} exited with {status}:\n{}", server.log());
            }
            http_get(&server.monitor, "/healthz").filter(|(status, _)| *status == 200)
        });
        if healthy.is_none() {
            panic!("nats-server {name} not healthy in 15 s:\n{}", server.log());
        }
    }

    /// A `jetstream {}` block storing under the server's dir.
    pub fn jetstream_block(dir: &Path) -> String {
        format!(
            "jetstream {{ store_dir: {:?} }}\n",
            dir.join("js").to_string_lossy()
        )
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn tls_url(&self) -> String {
        format!("tls://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A monitoring endpoint as JSON.
    pub fn monitor_json(&self, path: &str) -> Option<serde_json::Value> {
        let (status, body) = http_get(&self.monitor, path)?;
        (status == 200).then(|| serde_json::from_str(&body).ok())?
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---- helpers for store tests: a standalone JetStream server, a three-node cluster

impl NatsServer {
    /// A standalone JetStream server (fsync always) in its own temp dir.
    pub fn single() -> NatsServer {
        let dir = tempfile::tempdir().unwrap().keep();
        let body = format!(
            "jetstream {{ store_dir: {:?}, sync_interval: always }}\n",
            dir.join("js").to_string_lossy()
        );
        NatsServer::start("s1", &dir, server_ports(), &body)
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }
}

/// A free loopback port.
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// Polls `cond` until true; panics naming `what` after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    assert!(
        poll(limit, || cond().then_some(())).is_some(),
        "timed out waiting for {what}"
    );
}

/// Three clustered JetStream servers on loopback (n1, n2, n3).
pub struct Cluster {
    pub nodes: Vec<NatsServer>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Client URLs of the live nodes.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| n.running())
            .map(NatsServer::url)
            .collect()
    }

    pub fn node(&mut self, name: &str) -> &mut NatsServer {
        self.nodes.iter_mut().find(|n| n.name == name).unwrap()
    }
}

pub fn cluster3() -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<(u16, u16, u16)> = (0..3).map(|_| server_ports()).collect();
    let mut nodes = Vec::new();
    for (i, ports_i) in ports.iter().enumerate() {
        let name = format!("n{}", i + 1);
        let routes: Vec<String> = ports
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, (_, c, _))| format!("\"nats://127.0.0.1:{c}\""))
            .collect();
        let body = format!(
            "jetstream {{ store_dir: {:?}, sync_interval: always }}\n\
             cluster {{ name: unibus-test, listen: 127.0.0.1:{}, routes: [{}] }}\n",
            dir.path().join(&name).to_string_lossy(),
            ports_i.1,
            routes.join(", ")
        );
        nodes.push(NatsServer::spawn(&name, dir.path(), *ports_i, &body));
    }
    for n in &mut nodes {
        n.wait_healthy();
    }
    Cluster { nodes, _dir: dir }
}

/// Connects to the given servers.
pub async fn connect(urls: &[String]) -> async_nats::Client {
    let addrs: Vec<async_nats::ServerAddr> = urls.iter().map(|u| u.parse().unwrap()).collect();
    async_nats::connect(addrs).await.unwrap()
}

/// A fresh nkey user public key.
pub fn user_key() -> String {
    nkeys::KeyPair::new_user().public_key()
}
