//! Test harness: the library's [`unibus::localnet`] with the test binary filled in.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

pub mod nats;

#[allow(unused_imports)]
pub use nats::*;
pub use unibus::localnet::*;

pub const UNIBUS: &str = env!("CARGO_BIN_EXE_unibus");

pub fn unibus_bin() -> &'static Path {
    Path::new(UNIBUS)
}

/// Starts a node from the binary under test in a fresh temp dir.
pub fn start(name: &str, ports: &Ports, peers: &[String], extra: &[&str]) -> Node {
    Node::start(unibus_bin(), name, ports, peers, extra)
}

/// Starts a node from the binary under test on a given data dir.
pub fn start_in(name: &str, ports: &Ports, peers: &[String], extra: &[&str], data: &Path) -> Node {
    Node::start_in(unibus_bin(), name, ports, peers, extra, data)
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

/// A three-node loopback cluster of `unibus node up`, sharing secrets; `extra` goes to
/// every node.
pub struct LocalCluster {
    pub nodes: Vec<Node>,
    pub secrets: std::path::PathBuf,
    _secrets_dir: tempfile::TempDir,
}

impl LocalCluster {
    pub fn start(extra: &[&str]) -> LocalCluster {
        let names = ["n1", "n2", "n3"];
        let secrets_dir = cluster_secrets(&names);
        let secrets = secrets_dir.path().join("s");
        let secrets_arg = secrets.to_string_lossy().to_string();
        let (ports, peers) = cluster_ports(3);
        let mut args = vec!["--secrets", secrets_arg.as_str()];
        args.extend_from_slice(extra);
        let nodes = (0..3)
            .map(|i| start(names[i], &ports[i], &peers[i], &args))
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
