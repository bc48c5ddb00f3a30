//! `unibus node up` against real nats-server processes: lifecycle, supervision, clusters.

mod common;

use std::time::Duration;

use common::*;

const READY: Duration = Duration::from_secs(20);

#[test]
fn one_node_comes_up_ready_and_sigterm_stops_it_cleanly() {
    let mut node = start("solo", &Ports::pick(), &[], &[]);
    let ready = node.wait_ready(READY);
    assert_eq!(ready["node"], "solo");
    assert_eq!(ready["stages"]["nats"]["state"], "up");
    assert_eq!(ready["stages"]["jetstream"]["state"], "up");
    assert!(
        ready.get("cluster").is_none(),
        "a single node is not clustered: {ready}"
    );
    let (status, _) = http_get(&node.ports.http, "/healthz").unwrap();
    assert_eq!(status, 200);

    // The healthcheck command agrees with /readyz.
    let (code, out, _) = unibus(&["node", "status", "--http", &node.ports.http]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("node solo: ready") && out.contains("jetstream"),
        "{out}"
    );

    let nats = node.nats_pid().expect("a pid file while running");
    assert!(process_alive(nats));
    node.signal(libc::SIGTERM);
    let status = node
        .wait_exit(Duration::from_secs(30))
        .expect("node exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "log:\n{}", node.log());
    assert!(!process_alive(nats), "nats-server {nats} left running");
    assert!(
        node.log().contains("lame duck"),
        "shutdown goes through lame duck"
    );
    assert!(
        node.nats_pid().is_none(),
        "pid file removed on a clean stop"
    );

    // Not running: status says so with exit 1.
    let (code, _, err) = unibus(&["node", "status", "--http", &node.ports.http]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot reach"), "{err}");
}

#[test]
fn three_nodes_form_a_cluster_with_a_meta_leader_and_three_peers() {
    let cluster = start_cluster(&["--flag", "decentralized=true"]);
    let nodes = &cluster.nodes;
    for node in nodes {
        let ready = node.wait_ready(READY);
        // Readiness may come before every route is up; wait for the full view.
        let view = poll(READY, || {
            let (_, r) = node.readyz()?;
            let peers = r["cluster"]["peers"].as_array()?.len();
            // The meta group's size grows as servers learn of each other.
            let size = r["cluster"]["cluster_size"].as_u64()?;
            (peers == 3 && size == 3 && r["cluster"]["meta_leader"].is_string()).then_some(r)
        })
        .unwrap_or_else(|| {
            panic!(
                "{} never saw 3 peers and a leader; last: {ready}",
                node.name
            )
        });
        let leader = view["cluster"]["meta_leader"].as_str().unwrap();
        assert!(["n1", "n2", "n3"].contains(&leader), "{view}");
    }
    let conf = std::fs::read_to_string(nodes[0].data.join("nats-server.conf")).unwrap();
    assert!(
        conf.contains("cluster {") && conf.contains("sync_interval: always"),
        "{conf}"
    );
}

#[test]
fn a_killed_nats_server_is_restarted_and_the_node_becomes_ready_again() {
    let node = start("phoenix", &Ports::pick(), &[], &[]);
    node.wait_ready(READY);
    let first = node.nats_pid().unwrap();
    kill(first, libc::SIGKILL);
    let second = poll(READY, || node.nats_pid().filter(|p| *p != first))
        .unwrap_or_else(|| panic!("nats-server was not restarted; log:\n{}", node.log()));
    assert!(process_alive(second));
    node.wait_ready(READY);
    assert!(
        node.log().contains("was killed by signal 9"),
        "the log says why it restarted"
    );
}

#[test]
fn a_nats_server_that_keeps_dying_makes_the_node_exit_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("unibus.toml");
    std::fs::write(
        &conf,
        "[supervision]\nmax_restarts = 1\nrestart_window_secs = 600\nbackoff_initial_ms = 10\n",
    )
    .unwrap();
    let mut node = start(
        "flaky",
        &Ports::pick(),
        &[],
        &["--config", conf.to_str().unwrap()],
    );
    node.wait_ready(READY);
    let first = node.nats_pid().unwrap();
    kill(first, libc::SIGKILL);
    let second =
        poll(READY, || node.nats_pid().filter(|p| *p != first)).expect("one restart is allowed");
    kill(second, libc::SIGKILL);
    let status = node.wait_exit(READY).expect("the node gives up");
    assert_eq!(status.code(), Some(1), "log:\n{}", node.log());
    assert!(node.log().contains("died 2 times"), "{}", node.log());
    assert!(!process_alive(second));
}

#[test]
fn a_sigkilled_node_takes_its_nats_server_with_it() {
    let mut node = start("doomed", &Ports::pick(), &[], &[]);
    node.wait_ready(READY);
    let nats = node.nats_pid().unwrap();
    node.signal(libc::SIGKILL);
    node.wait_exit(READY).expect("node dies");
    assert!(
        poll(Duration::from_secs(5), || (!process_alive(nats))
            .then_some(()))
        .is_some(),
        "nats-server {nats} outlived its node"
    );
}

#[test]
fn a_stale_nats_server_left_by_a_crash_is_reaped_on_the_next_start() {
    let ports = Ports::pick();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("crashy");
    // A first run renders the config; stop it cleanly.
    {
        let mut node = start_in("crashy", &ports, &[], &[], &data);
        node.wait_ready(READY);
        node.signal(libc::SIGTERM);
        node.wait_exit(Duration::from_secs(30)).unwrap();
    }
    // Simulate what a crash without the parent-death signal leaves: a nats-server on the
    // node's config, unparented, and its pid file.
    let conf = data.join("nats-server.conf");
    let mut stale = std::process::Command::new(nats_server_bin())
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stale_pid = stale.id() as i32;
    std::fs::write(data.join("nats-server.pid"), format!("{stale_pid}\n")).unwrap();
    poll(READY, || http_get(&ports.nats_http, "/healthz")).expect("stale server up");

    let node = start_in("crashy", &ports, &[], &[], &data);
    node.wait_ready(READY);
    let reaped = poll(Duration::from_secs(10), || stale.try_wait().ok().flatten());
    assert!(
        reaped.is_some(),
        "stale nats-server {stale_pid} still running"
    );
    assert_ne!(node.nats_pid(), Some(stale_pid));
    assert!(node.log().contains("earlier run"), "{}", node.log());
}

#[test]
fn a_node_whose_peers_are_down_stays_up_not_ready_until_they_start() {
    let names = ["n1", "n2", "n3"];
    let secrets = cluster_secrets(&names);
    let secrets = secrets.path().join("s");
    let s = [
        "--secrets",
        secrets.to_str().unwrap(),
        "--flag",
        "decentralized=true",
    ];
    let (ports, peers) = cluster_ports(3);
    let first = start("n1", &ports[0], &peers[0], &s);
    // Up (alive) but not ready: the meta layer needs a quorum.
    let (status, body) = poll(READY, || {
        first
            .readyz()
            .filter(|(_, b)| b["stages"]["nats"]["state"] == "up")
    })
    .expect("nats stage comes up alone");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["ready"], false);
    assert_ne!(body["stages"]["jetstream"]["state"], "up", "{body}");
    assert_eq!(http_get(&first.ports.http, "/healthz").unwrap().0, 200);
    let (code, out, _) = unibus(&["node", "status", "--http", &first.ports.http]);
    assert_eq!(code, 1, "{out}");

    let _n2 = start("n2", &ports[1], &peers[1], &s);
    let _n3 = start("n3", &ports[2], &peers[2], &s);
    first.wait_ready(Duration::from_secs(40));
}
