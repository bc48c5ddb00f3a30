//! Bare nats-server processes on loopback (for store tests below the node), killed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use super::{free_ports, http_get, nats_server_bin, poll};
use std::time::Duration;

/// A free loopback port.
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// Status code of `GET http://127.0.0.1:port/path`, or None if unreachable.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    http_get(&format!("127.0.0.1:{port}"), path).map(|(status, _)| status)
}

/// Polls `cond` every 50 ms until true or `limit` passes.
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    assert!(
        poll(limit, || cond().then_some(())).is_some(),
        "timed out waiting for {what}"
    );
}

/// One nats-server process.
pub struct NatsServer {
    pub name: String,
    pub port: u16,
    pub http_port: u16,
    pub cluster_port: Option<u16>,
    child: Option<Child>,
    config: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl NatsServer {
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn spawn(name: &str, config_text: String, dir: &std::path::Path) -> Child {
        let config = dir.join(format!("{name}.conf"));
        std::fs::write(&config, config_text).unwrap();
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
        Command::new(nats_server_bin())
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", nats_server_bin().display()))
    }

    /// A standalone JetStream server.
    pub fn single() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (port, http_port) = (free_port(), free_port());
        let store = dir.path().join("js");
        let conf = format!(
            "server_name: s1\nlisten: 127.0.0.1:{port}\nhttp: 127.0.0.1:{http_port}\n\
             jetstream {{ store_dir: {:?}, sync_interval: always }}\n",
            store.display().to_string()
        );
        let child = Self::spawn("s1", conf, dir.path());
        let srv = NatsServer {
            name: "s1".into(),
            port,
            http_port,
            cluster_port: None,
            child: Some(child),
            config: dir.path().join("s1.conf"),
            _dir: Some(dir),
        };
        srv.wait_healthy(Duration::from_secs(20));
        srv
    }

    pub fn wait_healthy(&self, limit: Duration) {
        wait_until(limit, &format!("{} /healthz", self.name), || {
            http_status(self.http_port, "/healthz") == Some(200)
        });
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three clustered JetStream servers on loopback (n1, n2, n3).
pub struct Cluster {
    pub nodes: Vec<NatsServer>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Comma-free list of client URLs of the live nodes.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(NatsServer::url)
            .collect()
    }

    pub fn node(&mut self, name: &str) -> &mut NatsServer {
        self.nodes.iter_mut().find(|n| n.name == name).unwrap()
    }
}

pub fn cluster3() -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<(u16, u16, u16)> = (0..3)
        .map(|_| (free_port(), free_port(), free_port()))
        .collect();
    let mut nodes = Vec::new();
    for (i, (port, http_port, cport)) in ports.iter().enumerate() {
        let name = format!("n{}", i + 1);
        let routes: Vec<String> = ports
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, (_, _, c))| format!("\"nats://127.0.0.1:{c}\""))
            .collect();
        let store = dir.path().join(&name);
        let conf = format!(
            "server_name: {name}\nlisten: 127.0.0.1:{port}\nhttp: 127.0.0.1:{http_port}\n\
             jetstream {{ store_dir: {:?}, sync_interval: always }}\n\
             cluster {{ name: unibus-test, listen: 127.0.0.1:{cport}, routes: [{}] }}\n",
            store.display().to_string(),
            routes.join(", ")
        );
        let child = NatsServer::spawn(&name, conf, dir.path());
        nodes.push(NatsServer {
            name: name.clone(),
            port: *port,
            http_port: *http_port,
            cluster_port: Some(*cport),
            child: Some(child),
            config: dir.path().join(format!("{name}.conf")),
            _dir: None,
        });
    }
    for n in &nodes {
        n.wait_healthy(Duration::from_secs(60));
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
