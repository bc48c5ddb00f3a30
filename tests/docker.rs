//! The docker compose cluster (cluster/): build FROM scratch, up, R1→R3 from the host,
//! down/up keeps data. Runs only where a Docker engine answers; says so when skipped.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const PROJECT: &str = "unibus-test";

fn docker_available() -> bool {
    Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
        && Command::new("docker-compose")
            .arg("version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
}

fn secrets_dir() -> std::path::PathBuf {
    std::env::temp_dir().join("unibus-test-compose-secrets")
}

/// Runs a repo script with the test's binary as the image's unibus.
fn cluster_script(args: &[&str]) -> (i32, String) {
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster"))
        .args(args)
        .env("UNIBUS_SECRETS", secrets_dir())
        .env("UNIBUS_COMPOSE_PROJECT", PROJECT)
        .env("UNIBUS_TAG", "test")
        .env("UNIBUS_BIN", UNIBUS)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

fn healthy(node: &str) -> bool {
    Command::new("docker")
        .args([
            "inspect",
            "--format",
            "{{.State.Health.Status}}",
            &format!("{PROJECT}_{node}_1"),
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "healthy")
        .unwrap_or(false)
}

fn all_healthy() -> bool {
    ["n1", "n2", "n3"].iter().all(|n| healthy(n))
}

/// Tears the cluster down (volumes too) even when the test fails.
struct Teardown;
impl Drop for Teardown {
    fn drop(&mut self) {
        let _ = cluster_script(&["down", "-v"]);
        let _ = std::fs::remove_dir_all(secrets_dir());
    }
}

#[test]
fn the_compose_cluster_comes_up_grows_to_r3_and_keeps_its_data_across_down_up() {
    if !docker_available() {
        eprintln!(
            "SKIPPED: no Docker engine with docker-compose here; the compose tests did not run"
        );
        return;
    }
    let _ = std::fs::remove_dir_all(secrets_dir());
    let _teardown = Teardown;
    let (code, out) = cluster_script(&["build"]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = cluster_script(&["up"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        poll(Duration::from_secs(90), || all_healthy().then_some(())).is_some(),
        "nodes never healthy"
    );

    // Driven from the host through the published client port.
    // TLS with the cluster's CA; the store lives in the service user's account.
    let secrets = secrets_dir();
    let (seed, ca) = (secrets.join("service.seed"), secrets.join("ca.crt"));
    let (code, out, err) = unibus(&[
        "cluster",
        "replicas",
        "3",
        "--server",
        "tls://127.0.0.1:4222",
        "--seed-file",
        seed.to_str().unwrap(),
        "--ca",
        ca.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("all buckets at R3"), "{out}");

    // down / up: volumes keep the streams (and so their R3 config) and the cluster.
    let (code, out) = cluster_script(&["down"]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = cluster_script(&["up"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        poll(Duration::from_secs(90), || all_healthy().then_some(())).is_some(),
        "nodes never healthy after up"
    );
    let r3 = poll(Duration::from_secs(60), || {
        let (code, out, _) = unibus(&["cluster", "status", "--http", "127.0.0.1:8080", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        let buckets = v["store"]["buckets"].as_array()?;
        (code == 0
            && buckets.len() == 5
            && buckets
                .iter()
                .all(|b| b["replicas_wanted"] == 3 && b["replicas_current"] == 3))
        .then_some(())
    });
    assert!(
        r3.is_some(),
        "buckets did not come back at R3 after down/up"
    );
}
