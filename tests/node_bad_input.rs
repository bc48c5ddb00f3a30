//! Bad input to `unibus node up`: each case exits 2 with one line naming the field, and
//! nothing is spawned (no nats-server pid file, no rendered config).

mod common;

use std::net::TcpListener;

use common::*;

/// Runs `node up` with valid defaults plus `extra` (later flags win), and checks it was
/// refused before anything started. Returns stderr.
fn refused(extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("bad");
    let p = Ports::pick();
    let data_arg = data.to_string_lossy().to_string();
    let defaults = [
        ("--name", "bad"),
        ("--data", data_arg.as_str()),
        ("--listen", p.listen.as_str()),
        ("--cluster-listen", p.cluster.as_str()),
        ("--http", p.http.as_str()),
        ("--nats-http", p.nats_http.as_str()),
    ];
    let mut args = vec!["node", "up"];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    args.extend_from_slice(extra);
    let (code, _, err) = unibus(&args);
    assert_eq!(code, 2, "expected exit 2 for {extra:?}; stderr:\n{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line for {extra:?}, got:\n{err}");
    assert!(!data.join("nats-server.pid").exists() && !data.join("nats-server.conf").exists());
    err
}

#[test]
fn an_address_that_does_not_parse() {
    let err = refused(&["--listen", "not-an-address"]);
    assert!(
        err.contains("--listen") && err.contains("HOST:PORT"),
        "{err}"
    );
    let err = refused(&["--http", "127.0.0.1:99999"]);
    assert!(err.contains("--http"), "{err}");
}

#[test]
fn a_port_already_in_use() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let err = refused(&["--nats-http", &addr]);
    assert!(
        err.contains("--nats-http") && err.contains("in use"),
        "{err}"
    );
}

#[test]
fn a_peer_that_is_not_host_port() {
    let err = refused(&["--peers", "n2:6222,n3"]);
    assert!(err.contains("--peers") && err.contains("`n3`"), "{err}");
}

#[test]
fn one_port_given_to_two_listeners() {
    let p = free_ports(1)[0];
    let a = format!("127.0.0.1:{p}");
    let err = refused(&["--listen", &a, "--http", &a]);
    assert!(
        err.contains("--http") && err.contains("also given to --listen"),
        "{err}"
    );
}

#[test]
fn a_data_dir_that_cannot_be_created() {
    let err = refused(&["--data", "/proc/unibus-cannot-live-here"]);
    assert!(err.contains("--data") && err.contains("writable"), "{err}");
}

#[test]
fn a_nats_server_that_is_missing_or_too_old() {
    let err = refused(&["--nats-server", "/nonexistent/nats-server"]);
    assert!(
        err.contains("--nats-server") && err.contains("scripts/setup"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("nats-server");
    std::fs::write(&old, "#!/bin/sh\necho 'nats-server: v2.9.25'\n").unwrap();
    std::fs::set_permissions(&old, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let err = refused(&["--nats-server", old.to_str().unwrap()]);
    assert!(
        err.contains("2.9") && err.contains("2.10 or newer"),
        "{err}"
    );
}

#[test]
fn an_unknown_flag_name_or_value() {
    let err = refused(&["--flag", "bus-magic=on"]);
    assert!(
        err.contains("--flag") && err.contains("unknown flag `bus-magic`"),
        "{err}"
    );
    let err = refused(&["--flag", "bus-auth=sometimes"]);
    assert!(err.contains("off|soft|enforce"), "{err}");
    let err = refused(&["--flag", "bus-tls=yes"]);
    assert!(err.contains("true|false"), "{err}");
}

#[test]
fn a_config_file_that_does_not_parse_names_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("unibus.toml");
    std::fs::write(&conf, "name = \"x\"\n\n[flags\nbus-auth = \"soft\"\n").unwrap();
    let err = refused(&["--config", conf.to_str().unwrap()]);
    assert!(err.contains("--config") && err.contains("line 3"), "{err}");
}

#[test]
fn decentralized_without_peers() {
    let err = refused(&["--flag", "decentralized=true"]);
    assert!(
        err.contains("flags.decentralized") && err.contains("--peers"),
        "{err}"
    );
}

#[test]
fn a_data_dir_held_by_a_running_node() {
    let node = start("holder", &Ports::pick(), &[], &[]);
    node.wait_ready(std::time::Duration::from_secs(20));
    let p = Ports::pick();
    let data = node.data.to_string_lossy().to_string();
    let (code, _, err) = unibus(&[
        "node",
        "up",
        "--name",
        "holder",
        "--data",
        &data,
        "--listen",
        &p.listen,
        "--http",
        &p.http,
        "--nats-http",
        &p.nats_http,
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--data") && err.contains("in use by another running unibus node"),
        "{err}"
    );
}
