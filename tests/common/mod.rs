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

/// A three-node loopback cluster from the binary under test, sharing secrets.
pub fn start_cluster(extra: &[&str]) -> LocalCluster {
    LocalCluster::start(unibus_bin(), extra)
}
