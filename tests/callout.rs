//! The auth building blocks against a real nats-server 2.15: the rendered callout and TLS
//! config, a responder made of `unibus::auth::callout` (a HashMap stands in for the store),
//! and raw async-nats clients trying to get in.
//!
//! Every wait has a deadline; nothing sleeps to synchronise.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::{ConnectErrorKind, ConnectOptions, Event, ServerError};
use futures_util::StreamExt;
use nkeys::KeyPair;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use common::nats::{NatsServer, check_config, server_ports};
use common::poll;
use unibus::auth::callout::{self, AUTH_SUBJECT, AuthRequest, CalloutError};
use unibus::auth::{ClusterSecrets, certs, server_config};

const WAIT: Duration = Duration::from_secs(10);

/// What the responder decided for each request: (the request, Ok or the reason).
type Decisions = Arc<Mutex<Vec<(AuthRequest, Result<(), String>)>>>;

/// The authenticator in miniature: decode, prove the key, look it up, answer.
struct Responder {
    decisions: Decisions,
    task: tokio::task::JoinHandle<()>,
    _client: async_nats::Client,
}

impl Responder {
    async fn start(
        url: &str,
        ca: Option<&Path>,
        secrets: &ClusterSecrets,
        allow: HashMap<String, Vec<String>>,
    ) -> Responder {
        Self::start_slow(url, ca, secrets, allow, Duration::ZERO).await
    }

    /// A responder that takes `delay` over each answer (a store between leaders).
    async fn start_slow(
        url: &str,
        ca: Option<&Path>,
        secrets: &ClusterSecrets,
        allow: HashMap<String, Vec<String>>,
        delay: Duration,
    ) -> Responder {
        let seed = std::fs::read_to_string(&secrets.service_seed).unwrap();
        let mut options = ConnectOptions::with_nkey(seed.trim().to_string());
        if let Some(ca) = ca {
            options = options
                .add_root_certificates(ca.to_path_buf())
                .require_tls(true);
        }
        let client = options
            .connect(url)
            .await
            .expect("service user connects past the callout");
        let mut requests = client.subscribe(AUTH_SUBJECT).await.unwrap();
        client.flush().await.unwrap();
        let issuer = secrets.issuer_key().unwrap();
        let decisions: Decisions = Arc::default();
        let seen = decisions.clone();
        let answer_with = client.clone();
        let task = tokio::spawn(async move {
            while let Some(msg) = requests.next().await {
                let Some(reply) = msg.reply else { continue };
                tokio::time::sleep(delay).await;
                // A request we cannot read gets no answer: the server times out and denies.
                let Ok(request) = callout::decode_request(&msg.payload) else {
                    continue;
                };
                let verdict = callout::verify_client_nonce(&request)
                    .map_err(|e| e.to_string())
                    .and_then(|key| {
                        allow
                            .get(&key)
                            .map(|rooms| (key.clone(), rooms))
                            .ok_or_else(|| format!("unknown key {key}"))
                    });
                let answer = match &verdict {
                    Ok((key, rooms)) => callout::allow_response(
                        &request,
                        &callout::permissions_for(key, rooms, false),
                        &issuer,
                        Some(Duration::from_secs(300)),
                    ),
                    Err(reason) => callout::deny_response(&request, reason, &issuer),
                }
                .unwrap();
                seen.lock()
                    .unwrap()
                    .push((request.clone(), verdict.map(|_| ())));
                answer_with.publish(reply, answer.into()).await.unwrap();
            }
        });
        Responder {
            decisions,
            task,
            _client: client,
        }
    }

    fn decision_for(&self, key: &str) -> Option<Result<(), String>> {
        self.request_for(key).map(|(_, d)| d)
    }

    fn request_for(&self, key: &str) -> Option<(AuthRequest, Result<(), String>)> {
        self.decisions
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(r, _)| r.client_nkey.as_deref() == Some(key))
            .cloned()
    }
}

impl Responder {
    /// Stops answering, for sure: an aborted task may still be in the middle of a poll
    /// (and answer one more request) until it is awaited.
    async fn stop(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn seed_of(key: &KeyPair) -> String {
    key.seed().unwrap()
}

/// A client whose server events (permission violations among them) arrive on a channel.
async fn connect_with_events(
    options: ConnectOptions,
    url: &str,
) -> Result<(async_nats::Client, UnboundedReceiver<Event>), async_nats::ConnectError> {
    let (tx, rx) = unbounded_channel();
    let client = options
        .connection_timeout(WAIT)
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(event);
            }
        })
        .connect(url)
        .await?;
    Ok((client, rx))
}

/// Waits for the server to report a permission violation mentioning `subject`.
async fn expect_violation(events: &mut UnboundedReceiver<Event>, subject: &str) -> String {
    let found = tokio::time::timeout(WAIT, async {
        while let Some(event) = events.recv().await {
            if let Event::ServerError(ServerError::Other(message)) = event
                && message.to_lowercase().contains("permissions violation")
                && message.contains(subject)
            {
                return Some(message);
            }
        }
        None
    })
    .await;
    match found {
        Ok(Some(message)) => message,
        other => panic!("no permission violation for {subject}: {other:?}"),
    }
}

/// Publishes on `subject` and waits for it to come back on a subscription to `filter`.
async fn round_trip(client: &async_nats::Client, filter: &str, subject: &str) {
    let mut sub = client.subscribe(filter.to_string()).await.unwrap();
    client.flush().await.unwrap();
    client
        .publish(subject.to_string(), "hi".into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    let msg = tokio::time::timeout(WAIT, sub.next())
        .await
        .unwrap_or_else(|_| panic!("no message on {subject}"))
        .unwrap();
    assert_eq!(msg.subject.as_str(), subject);
    assert_eq!(&msg.payload[..], b"hi");
}

/// Asserts the connection is refused. A denial that takes the authenticator more than
/// ~2 s (nobody to ask) reaches a client that async-nats already reported connected (its
/// handshake takes the server's first PING for the PONG it waits for), as an
/// authorization error on the open connection: that counts as refused too.
async fn refused(
    result: Result<(async_nats::Client, UnboundedReceiver<Event>), async_nats::ConnectError>,
    what: &str,
) {
    match result {
        Err(e) => assert_eq!(
            e.kind(),
            ConnectErrorKind::AuthorizationViolation,
            "{what}: {e}"
        ),
        Ok((_client, mut events)) => {
            let denied = tokio::time::timeout(WAIT, async {
                while let Some(event) = events.recv().await {
                    if let Event::ServerError(e) = &event
                        && e.to_string().to_lowercase().contains("authorization")
                    {
                        return true;
                    }
                }
                false
            })
            .await;
            assert!(
                matches!(denied, Ok(true)),
                "{what}: connected, expected to be refused"
            );
        }
    }
}

fn callout_server(name: &str, dir: &Path, secrets: &ClusterSecrets, tls: bool) -> NatsServer {
    let mut body = NatsServer::jetstream_block(dir);
    body.push_str(&server_config::callout_config(
        &secrets.issuer_public,
        &secrets.service_public,
        None,
    ));
    if tls {
        let node = secrets.node(name).unwrap();
        body.push_str(&server_config::tls_config(
            &node.cert,
            &node.key,
            &secrets.ca_cert,
        ));
    }
    NatsServer::start(name, dir, server_ports(), &body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callout_admits_known_keys_with_their_rooms_and_refuses_everyone_else() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = certs::init_cluster(&dir.path().join("secrets"), &["n1".into()], &[]).unwrap();
    let server = callout_server("n1", dir.path(), &secrets, false);
    let url = server.url();

    let alice = KeyPair::new_user();
    let stranger = KeyPair::new_user();
    let allow = HashMap::from([(alice.public_key(), vec!["r1".to_string()])]);
    let responder = Responder::start(&url, None, &secrets, allow).await;

    // No credentials, an unknown key, a key with someone else's signature: refused.
    refused(
        connect_with_events(ConnectOptions::new(), &url).await,
        "no credentials",
    )
    .await;
    refused(
        connect_with_events(ConnectOptions::with_nkey(seed_of(&stranger)), &url).await,
        "unknown nkey",
    )
    .await;
    assert!(
        responder
            .decision_for(&stranger.public_key())
            .unwrap()
            .unwrap_err()
            .contains("unknown key")
    );
    let alice_public = alice.public_key();
    let forger = ConnectOptions::with_auth_callback(move |nonce| {
        let alice_public = alice_public.clone();
        async move {
            let mut auth = async_nats::Auth::new();
            auth.nkey = Some(alice_public);
            auth.signature = Some(KeyPair::new_user().sign(&nonce).unwrap());
            Ok(auth)
        }
    });
    refused(
        connect_with_events(forger, &url).await,
        "signature by another key",
    )
    .await;
    assert_eq!(
        responder.decision_for(&alice.public_key()),
        Some(Err(CalloutError::BadNonceSignature.to_string()))
    );

    // Alice gets in, and gets exactly her room.
    let (client, mut events) =
        connect_with_events(ConnectOptions::with_nkey(seed_of(&alice)), &url)
            .await
            .expect("an admitted key connects");
    // What nats-server 2.15 actually sent.
    let (request, verdict) = responder.request_for(&alice.public_key()).unwrap();
    assert_eq!(verdict, Ok(()));
    assert_eq!(request.server_name, "n1");
    assert_eq!(request.issuer, secrets.issuer_public);
    assert!(request.server_key.starts_with('N') && request.server_id.starts_with('N'));
    assert!(request.nonce.is_some() && request.client_sig.is_some());
    assert!(!request.tls);
    let own = format!("unibus.room.r1.{}", alice.public_key());
    round_trip(&client, "unibus.room.r1.>", &own).await;

    // Her room, but another sender's subject: the subject names the sender.
    client
        .publish("unibus.room.r1.chat", "no".into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    expect_violation(&mut events, "unibus.room.r1.chat").await;

    client
        .publish("unibus.room.r2.x", "no".into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    expect_violation(&mut events, "unibus.room.r2.x").await;

    let _denied = client.subscribe("unibus.room.r2.>").await.unwrap();
    expect_violation(&mut events, "unibus.room.r2.>").await;
    let _denied = client.subscribe("unibus.ctl.>").await.unwrap();
    expect_violation(&mut events, "unibus.ctl.>").await;

    // Still connected after the violations; the server lists her under her own key.
    round_trip(&client, "unibus.room.r1.>", &own).await;
    let connz = server.monitor_json("/connz?auth=true").unwrap();
    let users: Vec<&str> = connz["connections"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["authorized_user"].as_str())
        .collect();
    assert!(users.contains(&alice.public_key().as_str()), "{connz}");

    // Fail closed: with nobody answering, even Alice is refused.
    responder.stop().await;
    refused(
        connect_with_events(ConnectOptions::with_nkey(seed_of(&alice)), &url).await,
        "no authenticator",
    )
    .await;
    // The server read our denials as denials (not as bad responses or timeouts).
    let log = server.log();
    assert!(
        log.contains("Auth callout service returned an error: unknown key")
            && log.contains("Auth callout service returned an error: client offered no nkey")
            && !log.contains("validation errors")
            && !log.contains("wrong issuer"),
        "{log}"
    );
}

/// nats-server's own callout timeout is 2 s (3 s with TLS); unibus sets 4 s, so an
/// authenticator that retries through a store's leader election (up to
/// `ANSWER_WITHIN`, 3 s) is still heard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_waits_the_configured_callout_timeout_for_a_slow_answer() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = certs::init_cluster(&dir.path().join("secrets"), &["n1".into()], &[]).unwrap();
    let server = callout_server("n1", dir.path(), &secrets, false);
    let url = server.url();
    let alice = KeyPair::new_user();
    let allow = HashMap::from([(alice.public_key(), vec!["r1".to_string()])]);
    let slow = unibus::auth::authenticator::ANSWER_WITHIN + Duration::from_millis(300);
    assert!(slow < Duration::from_secs(server_config::CALLOUT_TIMEOUT_SECS.into()));
    let _responder = Responder::start_slow(&url, None, &secrets, allow, slow).await;
    let started = std::time::Instant::now();
    let (client, _events) = connect_with_events(ConnectOptions::with_nkey(seed_of(&alice)), &url)
        .await
        .expect("admitted after a slow answer");
    let own = format!("unibus.room.r1.{}", alice.public_key());
    round_trip(&client, "unibus.room.r1.>", &own).await;
    assert!(started.elapsed() >= slow, "the answer was not slow");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tls_clients_pin_the_project_ca_and_plaintext_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = certs::init_cluster(&dir.path().join("secrets"), &["n1".into()], &[]).unwrap();
    let server = callout_server("n1", dir.path(), &secrets, true);
    let url = server.tls_url();

    let alice = KeyPair::new_user();
    let allow = HashMap::from([(alice.public_key(), vec!["r1".to_string()])]);
    let responder = Responder::start(&url, Some(&secrets.ca_cert), &secrets, allow).await;

    let pinned = ConnectOptions::with_nkey(seed_of(&alice))
        .add_root_certificates(secrets.ca_cert.clone())
        .require_tls(true);
    let (client, _events) = connect_with_events(pinned, &url)
        .await
        .expect("a client pinning ca.crt connects over TLS");
    let own = format!("unibus.room.r1.{}", alice.public_key());
    round_trip(&client, "unibus.room.r1.>", &own).await;
    assert!(responder.request_for(&alice.public_key()).unwrap().0.tls);

    // A client that trusts another CA does not accept the server.
    let other = certs::init_cluster(&dir.path().join("other"), &["n1".into()], &[]).unwrap();
    let wrong_ca = ConnectOptions::with_nkey(seed_of(&alice))
        .add_root_certificates(other.ca_cert.clone())
        .require_tls(true);
    match connect_with_events(wrong_ca, &url).await {
        Ok(_) => panic!("a client pinning another CA connected"),
        Err(e) => assert!(
            matches!(e.kind(), ConnectErrorKind::Tls | ConnectErrorKind::Io),
            "{e}"
        ),
    }

    // Plaintext on the wire: the server announces TLS and never answers a plaintext PING.
    let addr = format!("127.0.0.1:{}", server.port);
    let mut stream = TcpStream::connect(&addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut info = [0u8; 4096];
    let n = stream.read(&mut info).unwrap();
    let info = String::from_utf8_lossy(&info[..n]).to_string();
    assert!(info.contains("\"tls_required\":true"), "{info}");
    let connect = format!(
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"nkey\":\"{}\",\"protocol\":1}}\r\nPING\r\n",
        alice.public_key()
    );
    let _ = stream.write_all(connect.as_bytes());
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        !rest.contains("PONG"),
        "plaintext client got an answer: {rest}"
    );
}

#[test]
fn every_rendered_fragment_passes_the_servers_config_check() {
    let dir = tempfile::tempdir().unwrap();
    let s = certs::init_cluster(
        &dir.path().join("secrets"),
        &["n1".into(), "n2".into()],
        &[],
    )
    .unwrap();
    let n1 = s.node("n1").unwrap();
    let config = format!(
        "server_name: n1\nlisten: \"127.0.0.1:4222\"\n{}{}{}cluster {{\n  name: t\n  listen: \"127.0.0.1:6222\"\n  routes: [{:?}]\n{}{}}}\n",
        NatsServer::jetstream_block(dir.path()),
        server_config::callout_config(
            &s.issuer_public,
            &s.service_public,
            Some(&KeyPair::new_user().public_key())
        ),
        server_config::tls_config(&n1.cert, &n1.key, &s.ca_cert),
        s.routes.route_url("n2:6222"),
        server_config::route_tls_config(&n1.cert, &n1.key, &s.ca_cert),
        server_config::route_authorization(&s.routes),
    );
    let (ok, output) = check_config(&config, dir.path());
    assert!(ok, "nats-server -t refused:\n{config}\n{output}");
}

/// Secrets for nodes n1 and n2 under `dir/secrets`.
fn two_node_secrets(dir: &Path) -> ClusterSecrets {
    certs::init_cluster(&dir.join("secrets"), &["n1".into(), "n2".into()], &[]).unwrap()
}

/// Route config with node `cert`'s TLS pair routing to `peers` (cluster ports).
fn route_body(cert: &str, cluster_port: u16, peers: &[u16], secrets: &ClusterSecrets) -> String {
    let node = secrets.node(cert).unwrap();
    let routes: Vec<String> = peers
        .iter()
        .map(|p| format!("{:?}", secrets.routes.route_url(&format!("127.0.0.1:{p}"))))
        .collect();
    format!(
        "cluster {{\n  name: t\n  listen: \"127.0.0.1:{cluster_port}\"\n  routes: [{}]\n{}{}}}\n",
        routes.join(", "),
        server_config::route_tls_config(&node.cert, &node.key, &secrets.ca_cert),
        server_config::route_authorization(&secrets.routes),
    )
}

fn route_names(server: &NatsServer) -> Vec<String> {
    server
        .monitor_json("/routez")
        .and_then(|r| r["routes"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|r| r["remote_name"].as_str().map(String::from))
        .collect()
}

#[test]
fn routes_use_mutual_tls_and_credentials_and_keep_strangers_out() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = two_node_secrets(dir.path());
    let (p1, p2) = (server_ports(), server_ports());
    let n1 = NatsServer::start(
        "n1",
        &dir.path().join("n1"),
        p1,
        &route_body("n1", p1.1, &[p2.1], &secrets),
    );
    let n2 = NatsServer::start(
        "n2",
        &dir.path().join("n2"),
        p2,
        &route_body("n2", p2.1, &[p1.1], &secrets),
    );
    let joined = poll(WAIT, || {
        (route_names(&n1).contains(&"n2".to_string())
            && route_names(&n2).contains(&"n1".to_string()))
        .then_some(())
    });
    assert!(
        joined.is_some(),
        "n1 and n2 did not route:\n{}\n{}",
        n1.log(),
        n2.log()
    );

    // A server from another cluster's secrets (other CA, other route password) is kept out.
    let other = certs::init_cluster(&dir.path().join("other"), &["n3".into()], &[]).unwrap();
    let p3 = server_ports();
    let n3 = NatsServer::start(
        "n3",
        &dir.path().join("n3"),
        p3,
        &route_body("n3", p3.1, &[p1.1], &other),
    );
    let rejected = poll(WAIT, || {
        (n1.log().contains("TLS route handshake error")
            && n3.log().contains("certificate signed by unknown authority"))
        .then_some(())
    });
    assert!(
        rejected.is_some(),
        "no TLS error for the stranger:\n{}\n{}",
        n1.log(),
        n3.log()
    );
    assert!(!route_names(&n1).contains(&"n3".to_string()));
    assert!(route_names(&n3).is_empty());

    // Right CA and certificate, wrong route password: refused too.
    let mut wrong = secrets.clone();
    wrong.routes.password = "not-the-password".into();
    let p4 = server_ports();
    let n4 = NatsServer::start(
        "n4",
        &dir.path().join("n4"),
        p4,
        &route_body("n2", p4.1, &[p1.1], &wrong),
    );
    let rejected = poll(WAIT, || {
        n1.log()
            .contains("Router connection closed: Authentication Failure")
            .then_some(())
    });
    assert!(
        rejected.is_some(),
        "no authentication failure for a wrong route password:\n{}\n{}",
        n1.log(),
        n4.log()
    );
    assert!(!route_names(&n1).contains(&"n4".to_string()));
    assert!(route_names(&n4).is_empty());
}

/// A callout server routed to `peers` (cluster ports), for the two-server test below.
fn routed_callout_server(
    name: &str,
    dir: &Path,
    ports: (u16, u16, u16),
    peers: &[u16],
    secrets: &ClusterSecrets,
) -> NatsServer {
    let mut body = NatsServer::jetstream_block(dir);
    body.push_str(&server_config::callout_config(
        &secrets.issuer_public,
        &secrets.service_public,
        None,
    ));
    body.push_str(&route_body(name, ports.1, peers, secrets));
    NatsServer::spawn(name, dir, ports, &body)
}

/// The node's real authenticator, running on one server.
struct NodeAuthenticator {
    slot: unibus::auth::authenticator::StoreSlot,
    /// Fires once it serves with a store (forwarded requests included).
    ready: tokio::sync::oneshot::Receiver<()>,
    task: tokio::task::JoinHandle<()>,
    _stop: unibus::node::shutdown::ShutdownTrigger,
}

impl NodeAuthenticator {
    async fn start(url: &str, secrets: &ClusterSecrets) -> NodeAuthenticator {
        use unibus::auth::authenticator::{self, Authenticator};
        let seed = std::fs::read_to_string(&secrets.service_seed).unwrap();
        let client = ConnectOptions::with_nkey(seed.trim().to_string())
            .connect(url)
            .await
            .expect("service user connects past the callout");
        let (authn, slot) = Authenticator::new(
            secrets.issuer_key().unwrap(),
            unibus::config::BusAuth::Enforce,
        );
        let (stop, shutdown) = unibus::node::shutdown::channel();
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let ready = move || {
                let _ = ready_tx.send(());
            };
            authenticator::run(client, Arc::new(authn), ready, shutdown)
                .await
                .unwrap();
        });
        NodeAuthenticator {
            slot,
            ready,
            task,
            _stop: stop,
        }
    }

    /// Hands it a SQLite store knowing `users`, and waits until it serves with it.
    async fn fill(&mut self, dir: &Path, users: &[&KeyPair]) {
        use unibus::membership::{Store, sqlite::SqliteStore};
        let store = Store::Sqlite(SqliteStore::open(dir.join("m.db")).await.unwrap());
        for user in users {
            store
                .add_user(&user.public_key(), "u", false)
                .await
                .unwrap();
        }
        self.slot.fill(Arc::new(store));
        tokio::time::timeout(WAIT, &mut self.ready)
            .await
            .expect("the authenticator did not serve with its store")
            .unwrap();
    }
}

impl Drop for NodeAuthenticator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A node whose store is not open yet forwards admissions to a peer that has one; alone,
/// it refuses (after its hold, inside the server's callout timeout); once its own store
/// opens, it decides itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_its_store_forwards_admissions_and_alone_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = two_node_secrets(dir.path());
    let (p1, p2) = (server_ports(), server_ports());
    let mut n1 = routed_callout_server("n1", &dir.path().join("n1"), p1, &[p2.1], &secrets);
    let mut n2 = routed_callout_server("n2", &dir.path().join("n2"), p2, &[p1.1], &secrets);
    n1.wait_healthy();
    n2.wait_healthy();
    let user = KeyPair::new_user();
    let as_user = || ConnectOptions::with_nkey(seed_of(&user)).connection_timeout(WAIT);

    // n1's authenticator has no store and no peer to ask: it refuses, within the
    // server's callout timeout (else the server would deny on its own, unanswered).
    let mut starting = NodeAuthenticator::start(&n1.url(), &secrets).await;
    let t = std::time::Instant::now();
    refused(
        connect_with_events(as_user(), &n1.url()).await,
        "no store anywhere",
    )
    .await;
    assert!(
        t.elapsed() >= unibus::auth::authenticator::HOLD,
        "refused before its hold ran out ({:?}): it did not wait for a peer",
        t.elapsed()
    );

    // n2's has a store that knows the user. nats-server hands a callout to any member of
    // the queue group, local or routed: those that reach n1's authenticator are forwarded
    // to n2's. Every attempt is admitted, and some of them through n1's forwarding.
    let mut peer = NodeAuthenticator::start(&n2.url(), &secrets).await;
    peer.fill(&dir.path().join("n2"), &[&user]).await;
    let first = tokio::time::timeout(WAIT * 2, async {
        loop {
            // Interest in the forward subject crosses the route a moment after n2
            // subscribes; until then n1's own authenticator refuses.
            if let Ok(client) = as_user().connect(n1.url()).await {
                return client;
            }
        }
    })
    .await
    .expect("n1 never admitted the user through n2");
    drop(first);
    let forwarded = || forwarded_count(&unibus::metrics::get().encode());
    let before = forwarded();
    for attempt in 0..20 {
        as_user()
            .connect(n1.url())
            .await
            .unwrap_or_else(|e| panic!("attempt {attempt}: refused with a peer to ask: {e}"));
    }
    assert!(
        forwarded() > before,
        "none of 20 callouts went through n1's forwarding"
    );

    // n2 goes away and n1's own store opens (knowing the user): n1 decides itself.
    drop(peer);
    n2.kill();
    starting.fill(&dir.path().join("n1"), &[&user]).await;
    as_user()
        .connect(n1.url())
        .await
        .expect("n1 admits on its own store");
}

/// `unibus_auth_decisions_total{result="forwarded",…}` summed, from the Prometheus text.
fn forwarded_count(text: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.starts_with("unibus_auth_decisions_total{") && l.contains("result=\"forwarded\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A valid client that reaches a server in the moment between its listening and its
/// node's authenticator subscribing has its callout published to nobody, and is refused
/// when the server's callout timeout passes. The client library gets in anyway (async-nats
/// took the server's first PING as connected, and reconnects after the refusal). A key
/// the authenticator refuses is refused at once, by `connect`, and asked about once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_gets_in_after_a_refusal_nobody_decided_but_not_after_a_real_one() {
    use unibus::auth::authenticator::ANSWER_WITHIN;
    use unibus::client::{Client, ClientError, ClientOptions};

    let dir = tempfile::tempdir().unwrap();
    let secrets = certs::init_cluster(&dir.path().join("secrets"), &["n1".into()], &[]).unwrap();
    let server = callout_server("n1", dir.path(), &secrets, false);
    let url = server.url();
    let alice = KeyPair::new_user();
    let alice_seed = dir.path().join("alice.seed");
    unibus::auth::keys::write_seed(&alice_seed, &alice).unwrap();

    // Stands in for "no authenticator yet": it takes the first callout and answers nothing.
    let service_seed = std::fs::read_to_string(&secrets.service_seed).unwrap();
    let hole = ConnectOptions::with_nkey(service_seed.trim().to_string())
        .connect(&url)
        .await
        .unwrap();
    let mut swallowed = hole.subscribe(AUTH_SUBJECT).await.unwrap();
    hole.flush().await.unwrap();

    let started = std::time::Instant::now();
    let connecting = tokio::spawn(Client::connect(ClientOptions::new(
        [url.clone()],
        &alice_seed,
    )));
    let first = tokio::time::timeout(WAIT, swallowed.next())
        .await
        .expect("the client's first callout reaches the server")
        .unwrap();
    assert!(first.reply.is_some());
    drop(swallowed);
    hole.flush().await.unwrap();
    let allow = HashMap::from([(alice.public_key(), vec!["r1".to_string()])]);
    let responder = Responder::start(&url, None, &secrets, allow).await;

    let client = tokio::time::timeout(WAIT * 2, connecting)
        .await
        .expect("Client::connect returns")
        .unwrap()
        .expect("admitted on the next attempt");
    // Admission proven by a round trip: the server answers "no responders" only to a
    // connection whose CONNECT it accepted.
    let deadline = tokio::time::Instant::now() + WAIT * 2;
    loop {
        let answer = client
            .nats()
            .request("unibus.ctl.probe.none", "".into())
            .await;
        if matches!(&answer, Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "alice's connection was never admitted: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        started.elapsed() >= ANSWER_WITHIN,
        "the first attempt was not left undecided"
    );
    assert_eq!(responder.decision_for(&alice.public_key()), Some(Ok(())));

    // A stranger is refused by the authenticator, fast, and only once.
    let stranger = KeyPair::new_user();
    let stranger_seed = dir.path().join("stranger.seed");
    unibus::auth::keys::write_seed(&stranger_seed, &stranger).unwrap();
    let started = std::time::Instant::now();
    let refused = Client::connect(ClientOptions::new([url.clone()], &stranger_seed)).await;
    assert!(
        matches!(&refused, Err(ClientError::Refused(e)) if e.kind == unibus::membership::api::ErrorKind::Unauthenticated),
        "{:?}",
        refused.err()
    );
    assert!(started.elapsed() < ANSWER_WITHIN);
    let asked = responder
        .decisions
        .lock()
        .unwrap()
        .iter()
        .filter(|(r, _)| r.client_nkey.as_deref() == Some(stranger.public_key().as_str()))
        .count();
    assert_eq!(asked, 1, "a real refusal is final");
}
