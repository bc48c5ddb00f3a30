//! Issue 4's acceptance: real `unibus node up` processes (a three-node loopback cluster with
//! the KV store, enforce + TLS; single nodes for soft and off), and a *raw* async-nats
//! client — not unibus's client code — trying each case. Control-plane requests are signed
//! with `Envelope::sign`, which is the wire format, not a client.
//!
//! Every wait polls with a deadline. The deadlines are generous (a loaded 2-core machine)
//! except the one the design sets: live revocation within 2 s.
//!
//! The heavy tests (nodes) take a lock so they do not run at once: the 2 s measurement is
//! of the node, not of how many other clusters share the machine's two cores.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_nats::{ConnectErrorKind, ConnectOptions, Event, ServerError};
use futures_util::StreamExt;
use nkeys::KeyPair;
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use common::*;
use unibus::auth::ClusterSecrets;
use unibus::auth::envelope::{Envelope, Sent, unix_ms_now};

const READY: Duration = Duration::from_secs(120);
const WAIT: Duration = Duration::from_secs(15);
/// DESIGN §3: a membership change reaches live connections within this.
const REVOCATION: Duration = Duration::from_secs(2);

/// Async (each test has its own runtime; a tokio mutex works across them and is not
/// poisoned by a failed test).
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A raw client and its events, each stamped with when it arrived.
struct Conn {
    client: async_nats::Client,
    events: UnboundedReceiver<(Instant, Event)>,
}

async fn connect(url: &str, ca: &Path, options: ConnectOptions) -> Result<Conn, ConnectErrorKind> {
    let (tx, events) = unbounded_channel();
    let client = options
        .add_root_certificates(ca.to_path_buf())
        .require_tls(true)
        .connection_timeout(WAIT)
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                let _ = tx.send((Instant::now(), event));
            }
        })
        .connect(url)
        .await
        .map_err(|e| e.kind())?;
    Ok(Conn { client, events })
}

impl Conn {
    /// Whether the server really took this connection's CONNECT. async-nats returns from
    /// `connect` on the first server op after CONNECT, which may be an INFO update sent
    /// while the callout is still deciding. A request the user may publish (a control-plane
    /// subject no endpoint serves) that is refused with "no responders" proves the server
    /// processed CONNECT; a denial arrives as an authorization error (or the connection
    /// closes) instead.
    async fn admitted(&mut self) -> bool {
        self.admission().await.is_ok()
    }

    /// [`Conn::admitted`], with what showed a refusal.
    async fn admission(&mut self) -> Result<(), String> {
        let answer = tokio::time::timeout(
            WAIT,
            self.client
                .request("unibus.ctl.probe.none", bytes::Bytes::new()),
        )
        .await;
        while let Ok((_, event)) = self.events.try_recv() {
            if let Event::ServerError(e) = event
                && e.to_string().to_lowercase().contains("authorization")
            {
                return Err(e.to_string());
            }
        }
        match answer {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(()),
            Ok(Err(e)) => Err(format!("probe request: {e}")),
            Err(_) => Err("probe request: no answer".into()),
        }
    }
}

/// Connects as `key` with the one inbox prefix the authenticator allows it.
fn with_key(key: &KeyPair) -> ConnectOptions {
    unibus::client::nkey_options(&key.seed().unwrap()).unwrap()
}

impl Conn {
    /// Waits for an event `pick` accepts; returns what it made of it and when it came.
    async fn wait_for<T>(
        &mut self,
        what: &str,
        mut pick: impl FnMut(&Event) -> Option<T>,
    ) -> (T, Instant) {
        let found = tokio::time::timeout(WAIT, async {
            while let Some((at, event)) = self.events.recv().await {
                if let Some(v) = pick(&event) {
                    return Some((v, at));
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(v)) => v,
            other => panic!("no {what} within {WAIT:?}: {}", other.is_ok()),
        }
    }

    /// The server's permission violation naming `subject`.
    async fn violation(&mut self, subject: &str) -> Instant {
        self.wait_for(
            &format!("permission violation for {subject}"),
            |e| match e {
                Event::ServerError(ServerError::Other(m))
                    if m.to_lowercase().contains("permissions violation")
                        && m.contains(subject) =>
                {
                    Some(())
                }
                _ => None,
            },
        )
        .await
        .1
    }

    /// Reconnects (permissions are fixed at connect time) and waits until connected again.
    async fn reconnect(&mut self) {
        while self.events.try_recv().is_ok() {}
        self.client.force_reconnect().await.unwrap();
        self.wait_for("reconnect", |e| matches!(e, Event::Connected).then_some(()))
            .await;
    }

    /// A signed control-plane call: the reply body and its `Nats-Service-Error-Code`.
    async fn ctl(&self, key: &KeyPair, op: &str, body: Value) -> (Value, Option<u16>) {
        let envelope = Envelope::sign(op, &body, key).unwrap();
        self.ctl_raw(op, envelope.to_vec()).await
    }

    /// The member endpoints of `room`, listed as `key` (which must be allowed to).
    async fn endpoints_of(&self, key: &KeyPair, room: &str) -> Vec<String> {
        let members = ok(
            self.ctl(key, "members.list", json!({ "room": room })).await,
            &format!("members.list {room}"),
        );
        members
            .as_array()
            .unwrap_or_else(|| panic!("members.list {room}: not a list: {members}"))
            .iter()
            .filter_map(|m| m["endpoint"].as_str().map(String::from))
            .collect()
    }

    async fn ctl_raw(&self, op: &str, payload: Vec<u8>) -> (Value, Option<u16>) {
        self.ctl_on(&format!("unibus.ctl.{op}"), payload).await
    }

    /// A raw request to any control-plane subject (a public one, or a key's own).
    async fn ctl_on(&self, subject: &str, payload: Vec<u8>) -> (Value, Option<u16>) {
        let reply = tokio::time::timeout(
            WAIT,
            self.client.request(subject.to_string(), payload.into()),
        )
        .await
        .unwrap_or_else(|_| panic!("no reply on {subject}"))
        .unwrap_or_else(|e| panic!("{subject}: {e}"));
        let code = reply
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Service-Error-Code"))
            .map(|v| v.as_str().parse().unwrap());
        let body: Value = serde_json::from_slice(&reply.payload).unwrap();
        (body, code)
    }

    /// Publishes on `subject` and waits for it on a fresh subscription to `filter`.
    async fn round_trip(&self, filter: &str, subject: &str) {
        let mut sub = self.client.subscribe(filter.to_string()).await.unwrap();
        self.client.flush().await.unwrap();
        self.client
            .publish(subject.to_string(), "hi".into())
            .await
            .unwrap();
        let msg = tokio::time::timeout(WAIT, sub.next())
            .await
            .unwrap_or_else(|_| panic!("no message on {subject}"))
            .unwrap();
        assert_eq!(msg.subject.as_str(), subject);
    }
}

fn ok(reply: (Value, Option<u16>), what: &str) -> Value {
    assert_eq!(reply.1, None, "{what}: {}", reply.0);
    reply.0["ok"].clone()
}

/// The reply is the typed error `kind` with the micro error code `code`.
fn refused_with(reply: (Value, Option<u16>), kind: &str, code: u16, what: &str) {
    assert_eq!(reply.0["error"]["kind"], kind, "{what}: {}", reply.0);
    assert_eq!(reply.1, Some(code), "{what}: {}", reply.0);
}

fn assert_refused(result: Result<Conn, ConnectErrorKind>, what: &str) {
    match result {
        Ok(_) => panic!("{what}: admitted, expected to be refused"),
        Err(kind) => assert_eq!(kind, ConnectErrorKind::AuthorizationViolation, "{what}"),
    }
}

/// An unsigned envelope claiming `key`.
fn unsigned(op: &str, body: Value, key: Option<&str>) -> Vec<u8> {
    let nonce = &KeyPair::new_user().public_key()[1..25];
    let mut env = json!({ "op": op, "body": body, "ts": unix_ms_now(), "nonce": nonce });
    if let Some(key) = key {
        env["key"] = key.into();
    }
    serde_json::to_vec(&env).unwrap()
}

struct Bus {
    cluster: LocalCluster,
    ca: PathBuf,
    admin: KeyPair,
}

impl Bus {
    fn url(&self, node: usize) -> String {
        format!("tls://{}", self.cluster.nodes[node].ports.listen)
    }

    /// Connects to `node` only: reconnects (after a kick, say) go back to the same node,
    /// never to servers the cluster advertises.
    async fn connect(&self, node: usize, key: &KeyPair) -> Result<Conn, ConnectErrorKind> {
        let options = with_key(key).ignore_discovered_servers();
        connect(&self.url(node), &self.ca, options).await
    }

    /// The node's client connections as nats-server's monitoring shows them (`auth=true`).
    fn connz(&self, node: usize) -> Value {
        let (_, body) = http_get(
            &self.cluster.nodes[node].ports.nats_http,
            "/connz?auth=true&acc=APP",
        )
        .unwrap();
        serde_json::from_str(&body).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_node_cluster_enforce_tls_acceptance() {
    let _heavy = HEAVY.lock().await;
    let cluster = start_cluster(&["--flag", "decentralized=true"]);
    for node in &cluster.nodes {
        node.wait_ready(READY);
    }
    let secrets = ClusterSecrets::load(&cluster.secrets).unwrap();
    let bus = Bus {
        ca: secrets.ca_cert.clone(),
        admin: unibus::auth::keys::read_user_seed(&secrets.admin_seed).unwrap(),
        cluster,
    };
    let [a, b, c] = [
        KeyPair::new_user(),
        KeyPair::new_user(),
        KeyPair::new_user(),
    ];
    let admin = bus
        .connect(0, &bus.admin)
        .await
        .expect("the bootstrap admin connects");
    for (key, name) in [(&a, "alice"), (&b, "bob"), (&c, "carol")] {
        let body = json!({ "key": key.public_key(), "name": name });
        ok(admin.ctl(&bus.admin, "users.add", body).await, "users.add");
    }

    connections_without_a_valid_active_key_are_refused(&bus).await;
    let mut alice = bus.connect(0, &a).await.expect("alice connects");
    users_are_confined_to_their_rooms(&mut alice, &a).await;
    control_plane_refuses_bad_requests_with_typed_errors(&bus, &alice, &a).await;
    let mut bob = bus.connect(2, &b).await.expect("bob connects through n3");
    control_plane_enforces_its_authorization_rules(&bus, &alice, &a, &mut bob, &b, &c).await;
    own_subjects_carry_only_their_keys_writes(&bus, &alice, &a, &mut bob, &b).await;
    // What revocation looks for (nats-server 2.15.1): a callout-admitted connection shows
    // the key it presented (and the callout verified) as `authorized_user`; `name_tag` is the
    // account's name, not the user JWT's.
    let bob_key = b.public_key();
    let listed = bus.connz(2)["connections"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["authorized_user"] == bob_key.as_str() && c["account"] == "APP");
    assert!(listed, "bob on n3: {}", bus.connz(2));
    a_removed_member_loses_the_room_on_another_node_within_2s(&mut alice, &a, &mut bob, &b).await;
    // The node that served the remove says what it kicked, and where.
    let line = poll(WAIT, || {
        bus.cluster.nodes.iter().find_map(|n| {
            n.log()
                .lines()
                .find(|l| l.contains("live revocation: disconnected") && l.contains(&bob_key))
                .map(str::to_string)
        })
    })
    .expect("a node logs the revocation");
    eprintln!("{line}");
    assert!(
        line.contains("servers=3") && line.contains("(\"n3\"") && line.contains("kicked=1"),
        "{line}"
    );
    a_revoked_user_is_disconnected_everywhere_and_refused(&bus, &admin, &c).await;
}

/// No credentials, an unknown key, a signature by another key: refused.
async fn connections_without_a_valid_active_key_are_refused(bus: &Bus) {
    for node in 0..3 {
        assert_refused(
            connect(&bus.url(node), &bus.ca, ConnectOptions::new()).await,
            "no credentials",
        );
    }
    assert_refused(bus.connect(1, &KeyPair::new_user()).await, "unknown nkey");
    let admin_public = bus.admin.public_key();
    let forger = ConnectOptions::with_auth_callback(move |nonce| {
        let admin_public = admin_public.clone();
        async move {
            let mut auth = async_nats::Auth::new();
            auth.nkey = Some(admin_public);
            auth.signature = Some(KeyPair::new_user().sign(&nonce).unwrap());
            Ok(auth)
        }
    });
    assert_refused(
        connect(&bus.url(2), &bus.ca, forger).await,
        "the admin's key with another key's signature",
    );
}

/// Outside its rooms a user gets permission violations; in its own room (after the
/// reconnect that recomputes its permissions) publish and subscribe work.
async fn users_are_confined_to_their_rooms(alice: &mut Conn, a: &KeyPair) {
    let created = ok(
        alice
            .ctl(a, "rooms.create", json!({ "room": "ra", "name": "Room A" }))
            .await,
        "rooms.create",
    );
    assert_eq!(created["owner"], a.public_key());
    alice.reconnect().await;
    // A member publishes under its own key only (the server vouches for the sender).
    let own = format!("unibus.room.ra.{}", a.public_key());
    alice.round_trip("unibus.room.ra.>", &own).await;
    alice
        .client
        .publish("unibus.room.ra.someone-else", "forged".into())
        .await
        .unwrap();
    alice.client.flush().await.unwrap();
    alice.violation("unibus.room.ra.someone-else").await;

    alice
        .client
        .publish("unibus.room.rb.x", "no".into())
        .await
        .unwrap();
    alice.client.flush().await.unwrap();
    alice.violation("unibus.room.rb.x").await;
    let _denied = alice.client.subscribe("unibus.room.rb.>").await.unwrap();
    alice.violation("unibus.room.rb.>").await;
    // Still connected, still in her room.
    alice.round_trip("unibus.room.ra.>", &own).await;
    users_are_confined_to_their_rooms_in_live_mode(alice, a).await;
}

/// The live namespace (core NATS, never stored) has the same rules: a member publishes on
/// its own key's subject of its own rooms only, and subscribes to its own rooms only.
async fn users_are_confined_to_their_rooms_in_live_mode(alice: &mut Conn, a: &KeyPair) {
    let own = format!("unibus.live.ra.{}", a.public_key());
    alice.round_trip("unibus.live.ra.>", &own).await;
    for forged in ["unibus.live.ra.someone-else", "unibus.live.ra.x.y"] {
        alice.client.publish(forged, "forged".into()).await.unwrap();
        alice.client.flush().await.unwrap();
        alice.violation(forged).await;
    }
    // Not a member of rb: neither publish nor subscribe, not even under her own key; and
    // nobody subscribes to the whole namespace.
    let not_hers = format!("unibus.live.rb.{}", a.public_key());
    alice
        .client
        .publish(not_hers.clone(), "no".into())
        .await
        .unwrap();
    alice.client.flush().await.unwrap();
    alice.violation(&not_hers).await;
    for filter in ["unibus.live.rb.>", "unibus.live.>", "unibus.live.*.*"] {
        let _denied = alice.client.subscribe(filter).await.unwrap();
        alice.violation(filter).await;
    }
    alice.round_trip("unibus.live.ra.>", &own).await;
}

async fn control_plane_refuses_bad_requests_with_typed_errors(
    bus: &Bus,
    alice: &Conn,
    a: &KeyPair,
) {
    let list = json!({});
    refused_with(
        alice
            .ctl_raw(
                "rooms.create",
                unsigned(
                    "rooms.create",
                    json!({ "room": "ru", "name": "u" }),
                    Some(&a.public_key()),
                ),
            )
            .await,
        "unauthenticated",
        401,
        "unsigned write",
    );
    // A read may go unsigned: it is answered only to the claimed key's own inbox, which
    // only that key's connections may subscribe to. Claiming her own key, Alice is served;
    // claiming the admin's, the reply would go to her inbox, so she is refused.
    ok(
        alice
            .ctl_raw(
                "rooms.list",
                unsigned("rooms.list", list.clone(), Some(&a.public_key())),
            )
            .await,
        "unsigned read bound to her own inbox",
    );
    let admin = bus.admin.public_key();
    refused_with(
        alice
            .ctl_raw(
                "users.list",
                unsigned("users.list", list.clone(), Some(&admin)),
            )
            .await,
        "unauthenticated",
        401,
        "unsigned read claiming another key",
    );
    let mut alice_events = bus.connect(0, a).await.unwrap();
    let _theirs = alice_events
        .client
        .subscribe(format!("_INBOX.{admin}.>"))
        .await
        .unwrap();
    alice_events.violation(&format!("_INBOX.{admin}.>")).await;
    let mut forged = Envelope::sign("rooms.list", &list, &KeyPair::new_user()).unwrap();
    forged.key = Some(a.public_key());
    refused_with(
        alice.ctl_raw("rooms.list", forged.to_vec()).await,
        "unauthenticated",
        401,
        "bad signature",
    );

    let once = Envelope::sign("rooms.list", &list, a).unwrap().to_vec();
    ok(alice.ctl_raw("rooms.list", once.clone()).await, "first use");
    refused_with(
        alice.ctl_raw("rooms.list", once.clone()).await,
        "unauthenticated",
        401,
        "replayed",
    );
    // The replay cache is cluster-wide: the same bytes through another node fail too.
    let elsewhere = bus.connect(1, a).await.unwrap();
    refused_with(
        elsewhere.ctl_raw("rooms.list", once).await,
        "unauthenticated",
        401,
        "replayed through another node",
    );
    // A replayed write changes nothing, even when it would succeed again: the owner check
    // runs beside the nonce claim, but the write waits for its verdict. (Removing the
    // guest a second time would succeed; the replay must not.)
    ok(
        alice.ctl(a, "rooms.create", json!({ "room": "rp" })).await,
        "rooms.create rp",
    );
    let guest = KeyPair::new_user().public_key();
    ok(
        bus.connect(0, &bus.admin)
            .await
            .unwrap()
            .ctl(
                &bus.admin,
                "users.add",
                json!({ "key": guest, "name": "guest" }),
            )
            .await,
        "users.add guest",
    );
    let member = json!({ "room": "rp", "key": guest });
    ok(
        alice.ctl(a, "members.invite", member.clone()).await,
        "invite",
    );
    let remove = Envelope::sign("members.remove", &member, a)
        .unwrap()
        .to_vec();
    ok(
        alice.ctl_raw("members.remove", remove.clone()).await,
        "remove",
    );
    ok(
        alice.ctl(a, "members.invite", member.clone()).await,
        "invite again",
    );
    refused_with(
        elsewhere.ctl_raw("members.remove", remove).await,
        "unauthenticated",
        401,
        "a replayed remove",
    );
    let members = alice.endpoints_of(a, "rp").await;
    assert!(
        members.contains(&guest),
        "the replayed remove took the guest out: {members:?}"
    );
    // Likewise a replayed invite: its reads (room, invitee) start beside the nonce claim,
    // its write waits for the verdict.
    let invite = Envelope::sign("members.invite", &member, a)
        .unwrap()
        .to_vec();
    ok(
        alice.ctl(a, "members.remove", member.clone()).await,
        "remove before the signed invite",
    );
    ok(
        alice.ctl_raw("members.invite", invite.clone()).await,
        "signed invite",
    );
    ok(
        alice.ctl(a, "members.remove", member.clone()).await,
        "remove after it",
    );
    refused_with(
        elsewhere.ctl_raw("members.invite", invite).await,
        "unauthenticated",
        401,
        "a replayed invite",
    );
    let members = alice.endpoints_of(a, "rp").await;
    assert!(
        !members.contains(&guest),
        "the replayed invite brought the guest back: {members:?}"
    );

    let skewed = Envelope::sign_at(
        "rooms.list",
        &list,
        a,
        unix_ms_now() - 300_000,
        "skewedskewedskewed01",
    )
    .unwrap();
    refused_with(
        alice.ctl_raw("rooms.list", skewed.to_vec()).await,
        "unauthenticated",
        401,
        "5 minutes skewed",
    );
    let big = json!({ "room": "big", "name": "x".repeat(70 * 1024) });
    refused_with(
        alice.ctl(a, "rooms.create", big).await,
        "invalid",
        400,
        "oversized",
    );
    refused_with(
        alice
            .ctl_raw("rooms.create", b"{\"op\": \"rooms.create\", ".to_vec())
            .await,
        "invalid",
        400,
        "malformed JSON",
    );
    for id in ["a.b", "*", ">", "A", ""] {
        refused_with(
            alice
                .ctl(a, "rooms.create", json!({ "room": id, "name": "injected" }))
                .await,
            "invalid",
            400,
            &format!("room id {id:?}"),
        );
    }
    refused_with(
        alice
            .ctl(a, "rooms.create", json!({ "room": "ra", "name": "Room A" }))
            .await,
        "conflict",
        409,
        "an existing room",
    );
    refused_with(
        alice
            .ctl(a, "rooms.delete", json!({ "room": "nope" }))
            .await,
        "forbidden",
        403,
        "deleting a room nobody owns (a stranger learns nothing)",
    );
    let admin = bus.connect(0, &bus.admin).await.unwrap();
    refused_with(
        admin
            .ctl(&bus.admin, "rooms.get", json!({ "room": "nope" }))
            .await,
        "not_found",
        404,
        "an unknown room, as admin",
    );
}

/// Admins manage users; owners invite, remove and rekey; members read.
async fn control_plane_enforces_its_authorization_rules(
    bus: &Bus,
    alice: &Conn,
    a: &KeyPair,
    bob: &mut Conn,
    b: &KeyPair,
    c: &KeyPair,
) {
    let stranger = json!({ "key": KeyPair::new_user().public_key() });
    refused_with(
        alice.ctl(a, "users.add", stranger).await,
        "forbidden",
        403,
        "non-admin users.add",
    );

    ok(
        alice
            .ctl(a, "rooms.create", json!({ "room": "rv", "name": "Room V" }))
            .await,
        "rooms.create rv",
    );
    let invite = json!({ "room": "rv", "key": b.public_key() });
    ok(alice.ctl(a, "members.invite", invite).await, "invite bob");
    ok(
        bob.ctl(b, "members.join", json!({ "room": "rv" })).await,
        "bob joins",
    );

    // Bob is a member, not the owner.
    let carol_in = json!({ "room": "rv", "key": c.public_key() });
    refused_with(
        bob.ctl(b, "members.invite", carol_in).await,
        "forbidden",
        403,
        "member invites",
    );
    let alice_out = json!({ "room": "rv", "key": a.public_key() });
    refused_with(
        bob.ctl(b, "members.remove", alice_out).await,
        "forbidden",
        403,
        "member removes",
    );
    let rekey = json!({ "room": "rv", "material": "AAAA" });
    refused_with(
        bob.ctl(b, "keys.rekey", rekey).await,
        "forbidden",
        403,
        "member rekeys",
    );
    ok(
        bob.ctl(b, "members.list", json!({ "room": "rv" })).await,
        "a member lists members",
    );

    // Carol is not a member at all.
    let carol = bus.connect(1, c).await.unwrap();
    for op in ["members.list", "keys.latest"] {
        refused_with(
            carol.ctl(c, op, json!({ "room": "rv" })).await,
            "forbidden",
            403,
            &format!("non-member {op}"),
        );
    }
}

/// A write on a key's own subject (`unibus.ctl.<op>.<key>`) skips the replay ledger, so
/// the server must let nobody else publish there, and its signature must not serve
/// anywhere else.
async fn own_subjects_carry_only_their_keys_writes(
    bus: &Bus,
    alice: &Conn,
    a: &KeyPair,
    bob: &mut Conn,
    b: &KeyPair,
) {
    let create = |room: &str| json!({ "room": room });
    let on_own = |key: &KeyPair, room: &str| {
        Envelope::sign_for(Sent::OwnSubject, "rooms.create", &create(room), key)
            .unwrap()
            .to_vec()
    };
    let alices = format!("unibus.ctl.rooms.create.{}", a.public_key());
    ok(
        alice.ctl_on(&alices, on_own(a, "own-a")).await,
        "rooms.create on alice's own subject",
    );
    // ... and as served by the node her connection is on (no route hops).
    let node = alice.client.server_info().server_name;
    let alices_here = format!("{alices}.{node}");
    ok(
        alice.ctl_on(&alices_here, on_own(a, "own-a-here")).await,
        "rooms.create on alice's own subject at her node",
    );

    // Bob holds an envelope Alice signed for her own subject and sends it there: the
    // server refuses the publish, and the room is never made.
    let admin = bus.connect(0, &bus.admin).await.unwrap();
    for (subject, room) in [(&alices, "stolen"), (&alices_here, "stolen-here")] {
        bob.client
            .publish(subject.clone(), on_own(a, room).into())
            .await
            .unwrap();
        bob.violation(subject).await;
        refused_with(
            admin.ctl(&bus.admin, "rooms.get", create(room)).await,
            "not_found",
            404,
            &format!("the room bob tried to create as alice on {subject}"),
        );
    }
    // On his own subject, an envelope signed by someone else is refused.
    let bobs = format!("unibus.ctl.rooms.create.{}", b.public_key());
    refused_with(
        bob.ctl_on(&bobs, on_own(a, "swapped")).await,
        "unauthenticated",
        401,
        "alice's envelope on bob's own subject",
    );
    // An own-subject envelope does not verify on the public subject (where its nonce,
    // never claimed, would be news to the ledger), through this node or another.
    let copied = on_own(a, "copied");
    let elsewhere = bus.connect(1, a).await.unwrap();
    for (conn, what) in [(alice, "this node"), (&elsewhere, "another node")] {
        refused_with(
            conn.ctl_raw("rooms.create", copied.clone()).await,
            "unauthenticated",
            401,
            &format!("an own-subject envelope on the public subject through {what}"),
        );
    }
    refused_with(
        admin.ctl(&bus.admin, "rooms.get", create("copied")).await,
        "not_found",
        404,
        "the room of the copied envelope",
    );
}

/// Bob, subscribed to rv through n3, is removed by Alice through n1: his connection is
/// closed within 2 s of the reply, and after reconnecting he has lost the room.
async fn a_removed_member_loses_the_room_on_another_node_within_2s(
    alice: &mut Conn,
    a: &KeyPair,
    bob: &mut Conn,
    b: &KeyPair,
) {
    // Both reconnect to pick up rv (permissions are computed at connect time).
    alice.reconnect().await;
    bob.reconnect().await;
    let mut room = bob.client.subscribe("unibus.room.rv.>").await.unwrap();
    bob.client.flush().await.unwrap();
    // Alice's messages reach Bob across nodes (poll: route interest propagates).
    let deadline = Instant::now() + WAIT;
    let mut delivered = None;
    while delivered.is_none() && Instant::now() < deadline {
        alice
            .client
            .publish(format!("unibus.room.rv.{}", a.public_key()), "hi".into())
            .await
            .unwrap();
        delivered = tokio::time::timeout(Duration::from_millis(300), room.next())
            .await
            .ok()
            .flatten();
    }
    assert!(delivered.is_some(), "bob never heard alice in rv");
    while bob.events.try_recv().is_ok() {}

    let sent = Instant::now();
    let remove = json!({ "room": "rv", "key": b.public_key() });
    ok(
        alice.ctl(a, "members.remove", remove).await,
        "alice removes bob",
    );
    let replied = Instant::now();
    let (_, disconnected) = bob
        .wait_for("bob's disconnect", |e| {
            matches!(e, Event::Disconnected).then_some(())
        })
        .await;
    let after_reply = disconnected.saturating_duration_since(replied);
    eprintln!(
        "revocation: bob disconnected {:?} after the remove request, {:?} after its reply",
        disconnected.saturating_duration_since(sent),
        after_reply
    );
    assert!(
        after_reply <= REVOCATION,
        "bob was disconnected {after_reply:?} after the remove reply (limit {REVOCATION:?})"
    );
    // Reconnected with fresh permissions: his subscription to rv is refused, and so is a
    // publish.
    bob.violation("unibus.room.rv.>").await;
    let bobs = format!("unibus.room.rv.{}", b.public_key());
    bob.client.publish(bobs.clone(), "?".into()).await.unwrap();
    bob.client.flush().await.unwrap();
    bob.violation(&bobs).await;
    // The live namespace went with the room.
    let _denied = bob.client.subscribe("unibus.live.rv.>").await.unwrap();
    bob.violation("unibus.live.rv.>").await;
    let bobs_live = format!("unibus.live.rv.{}", b.public_key());
    bob.client
        .publish(bobs_live.clone(), "?".into())
        .await
        .unwrap();
    bob.client.flush().await.unwrap();
    bob.violation(&bobs_live).await;
}

/// A user revoked by the admin through n1 loses its live connection on n2 within 2 s and
/// cannot connect again anywhere.
async fn a_revoked_user_is_disconnected_everywhere_and_refused(
    bus: &Bus,
    admin: &Conn,
    c: &KeyPair,
) {
    let mut carol = bus.connect(1, c).await.expect("carol connects through n2");
    // Every node has just read carol as an active user (a write on her own subject at
    // each node), so each may trust that read for a moment (`membership::recent`).
    for node in 0..3 {
        let at = bus.connect(node, c).await.unwrap();
        let here = at.client.server_info().server_name;
        let room = format!("carol-{here}");
        let subject = format!("unibus.ctl.rooms.create.{}.{here}", c.public_key());
        let create = Envelope::sign_for(
            Sent::OwnSubject,
            "rooms.create",
            &json!({ "room": room }),
            c,
        )
        .unwrap()
        .to_vec();
        ok(
            at.ctl_on(&subject, create).await,
            &format!("carol's write at {here}"),
        );
    }
    let revoke = json!({ "key": c.public_key() });
    let revoked = ok(
        admin.ctl(&bus.admin, "users.revoke", revoke).await,
        "users.revoke",
    );
    let replied = Instant::now();
    assert!(revoked["revoked_at"].is_number(), "{revoked}");
    let (_, at) = carol
        .wait_for("carol's disconnect", |e| {
            matches!(e, Event::Disconnected).then_some(())
        })
        .await;
    let elapsed = at.saturating_duration_since(replied);
    assert!(
        elapsed <= REVOCATION,
        "carol disconnected after {elapsed:?}"
    );
    for node in 0..3 {
        assert_refused(bus.connect(node, c).await, "a revoked key");
    }
    // Requests signed with the revoked key, sent over a live connection (the admin's):
    // a node may still trust its recent read of carol's record, but from 2 s after the
    // reply on, every node refuses her. Requests go round the nodes (a queue group): ask
    // until a dozen have gone out past that point.
    let whoami = json!({ "key": c.public_key() });
    let mut after_bound = 0;
    while after_bound < 12 {
        let sent = replied.elapsed();
        let (body, code) = admin.ctl(c, "users.get", whoami.clone()).await;
        if sent >= REVOCATION {
            after_bound += 1;
            assert_eq!(
                (code, body["error"]["kind"].as_str()),
                (Some(401), Some("unauthenticated")),
                "a request signed by the revoked key, {sent:?} after the revocation: {body}"
            );
        }
    }
}

/// The bootstrap admin through the client library.
async fn admin_client(url: &str, secrets: &ClusterSecrets) -> unibus::client::Client {
    let options = unibus::client::ClientOptions::new([url], &secrets.admin_seed);
    unibus::client::Client::connect(options.ca(&secrets.ca_cert))
        .await
        .unwrap()
}

/// A single node started with `flags`, ready, with its dev secrets.
fn single_node(name: &str, flags: &[&str]) -> (Node, ClusterSecrets) {
    let node = start(name, &Ports::pick(), &[], flags);
    node.wait_ready(READY);
    let secrets = ClusterSecrets::load(&node.data.join("secrets")).unwrap();
    (node, secrets)
}

/// A user's permissions grow by about a kilobyte per joined room (five subjects, signed and
/// base64-encoded twice), and the authenticator answers the callout with one JWT, which
/// nats-server takes up to 1 MiB long. A user in about a thousand rooms with long ids used
/// to be refused at every attempt (the answer was dropped, the callout timed out), with no
/// way to leave a room. Now such a user is admitted to the control plane without room
/// subjects (logged, counted), and gets them back once their rooms fit again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_in_too_many_rooms_is_admitted_to_the_control_plane_only() {
    use unibus::client::ClientError;
    use unibus::membership::api::{CreateRoom, ErrorKind, Op, RoomRef};

    let _heavy = HEAVY.lock().await;
    let (node, secrets) = single_node("crowded", &[]);
    let url = format!("tls://{}", node.ports.listen);
    let admin = admin_client(&url, &secrets).await;
    // The longest room ids (63 characters): about 1030 rooms fill a 1 MiB answer.
    let room = |i: usize| format!("{:r>55}{i:08}", "");
    let rooms = 1100;
    let creates = futures_util::stream::iter(0..rooms)
        .map(|i| {
            let admin = admin.clone();
            async move {
                let body = CreateRoom {
                    room: room(i),
                    name: String::new(),
                    encrypted: false,
                };
                admin.call::<_, Value>(Op::RoomsCreate, &body).await
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    assert!(
        creates.iter().all(Result::is_ok),
        "{:?}",
        creates.iter().find(|r| r.is_err())
    );

    let key = unibus::auth::keys::read_user_seed(&secrets.admin_seed).unwrap();
    let (last, first) = (room(rooms - 1), room(0));
    let live = |room: &str| format!("unibus.live.{room}.{}", key.public_key());
    let mut conn = connect(&url, &secrets.ca_cert, with_key(&key))
        .await
        .unwrap_or_else(|e| panic!("refused: {e:?}\n{}", node.log()));
    conn.admission()
        .await
        .unwrap_or_else(|e| panic!("a user in {rooms} rooms is refused: {e}\n{}", node.log()));
    // No room's subjects came with the admission…
    conn.client.publish(live(&last), "hi".into()).await.unwrap();
    conn.violation(&live(&last)).await;
    let logged = poll(WAIT, || {
        node.log()
            .contains("admitted without room subjects")
            .then_some(())
    });
    assert!(logged.is_some(), "no warning logged:\n{}", node.log());
    let counted = poll(WAIT, || {
        let (_, body) = http_get(&node.ports.http, "/metrics")?;
        body.contains(
            "unibus_auth_decisions_total{result=\"admitted\",reason=\"rooms_over_limit\"} ",
        )
        .then_some(())
    });
    assert!(
        counted.is_some(),
        "the degraded admission is not in /metrics"
    );
    // …but the control plane answers it. (Deleting a room disconnects its members, this
    // connection too, which then reconnects.)
    ok(
        conn.ctl(&key, "rooms.delete", json!({ "room": first }))
            .await,
        "rooms.delete by a user in too many rooms",
    );

    // Fewer rooms, and the next connection has all of theirs again. (A delete disconnects
    // the room's members, this client among them: a dropped reply is retried, and a retry
    // that finds the room gone means the first attempt went through.)
    let deletes = futures_util::stream::iter(1..200)
        .map(|i| {
            let admin = admin.clone();
            async move {
                let body = RoomRef { room: room(i) };
                let mut attempts = 0;
                loop {
                    attempts += 1;
                    match admin.call::<_, Value>(Op::RoomsDelete, &body).await {
                        Err(e) if e.is_transient() && attempts < 20 => {
                            tokio::time::sleep(Duration::from_millis(50 * attempts)).await;
                        }
                        Err(e) if attempts > 1 && e.kind() == Some(ErrorKind::NotFound) => {
                            return Ok(Value::Null);
                        }
                        done => return done,
                    }
                }
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    assert!(
        deletes.iter().all(Result::is_ok),
        "{:?}",
        deletes.iter().find(|r| r.is_err())
    );
    conn.reconnect().await;
    conn.round_trip(&format!("unibus.live.{last}.>"), &live(&last))
        .await;

    // Unrelated but found on the way: a message larger than the server takes is refused by
    // the client library at once, for durable sends too (they used to retry it until their
    // timeout).
    let too_big = vec![b'x'; (1 << 20) + 1];
    match admin.send(&last, &too_big).await {
        Err(ClientError::Local(message)) => assert!(message.contains("larger than"), "{message}"),
        other => panic!("a message over the server's limit was not refused: {other:?}"),
    }
}

/// A reply is one NATS message (1 MiB here), so listings come in pages ([`Page`]): with
/// 3,000 users of long names an unpaged `users.list` (a client from before pages) would
/// be over 1 MiB. It is refused at once with a clear `invalid`; it used to be dropped,
/// and its caller waited out its timeout, told the cluster "may be failing over". The
/// client library pages through all of them, in key order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_come_in_pages_and_one_too_large_for_a_reply_is_refused_not_dropped() {
    let _heavy = HEAVY.lock().await;
    let (node, secrets) = single_node("listed", &[]);
    let url = format!("tls://{}", node.ports.listen);
    let admin = admin_client(&url, &secrets).await;
    let added = futures_util::stream::iter(0..3000)
        .map(|i| {
            let admin = admin.clone();
            async move {
                let name = format!("device {i:04} {}", "n".repeat(240));
                admin
                    .add_user(&KeyPair::new_user().public_key(), &name, false)
                    .await
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    assert!(
        added.iter().all(Result::is_ok),
        "{:?}",
        added.iter().find(|r| r.is_err())
    );

    let users = admin.list_users().await.unwrap();
    assert_eq!(users.len(), 3001, "3000 added and the bootstrap admin");
    assert!(
        users.windows(2).all(|w| w[0].key < w[1].key),
        "in key order, each once"
    );

    let key = unibus::auth::keys::read_user_seed(&secrets.admin_seed).unwrap();
    let conn = connect(&url, &secrets.ca_cert, with_key(&key))
        .await
        .unwrap();
    let page = ok(
        conn.ctl(
            &key,
            "users.list",
            json!({ "after": users[0].key, "limit": 2 }),
        )
        .await,
        "a page of two",
    );
    let page: Vec<&str> = page
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["key"].as_str().unwrap())
        .collect();
    assert_eq!(page, [users[1].key.as_str(), users[2].key.as_str()]);
    let everything = conn.ctl(&key, "users.list", json!({})).await;
    refused_with(
        everything.clone(),
        "invalid",
        400,
        "an unpaged listing over 1 MiB",
    );
    let message = everything.0["error"]["message"].as_str().unwrap();
    assert!(message.contains("pages"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_auth_soft_admits_an_unknown_key_and_logs_the_would_be_denial() {
    let _heavy = HEAVY.lock().await;
    let (node, secrets) = single_node("soft", &["--flag", "bus-auth=soft"]);
    let url = format!("tls://{}", node.ports.listen);
    let stranger = KeyPair::new_user();
    let mut conn = connect(&url, &secrets.ca_cert, with_key(&stranger))
        .await
        .expect("soft admits an unknown key");
    conn.client.flush().await.unwrap();
    // Open permissions, except listening to the control plane's requests: writes on their
    // signer's own subject skip the replay ledger on enforce nodes, so nobody may copy them.
    conn.round_trip("anything.>", "anything.at.all").await;
    let _listening = conn.client.subscribe("unibus.ctl.>").await.unwrap();
    conn.violation("unibus.ctl.>").await;
    let key = stranger.public_key();
    let logged = poll(WAIT, || {
        let log = node.log();
        log.lines()
            .find(|l| l.contains("would deny") && l.contains(&key))
            .map(str::to_string)
    });
    let line = logged.unwrap_or_else(|| panic!("no would-deny line for {key}:\n{}", node.log()));
    assert!(line.contains("not an active user"), "{line}");
    // …and counted.
    let counted = poll(WAIT, || {
        let (_, body) = http_get(&node.ports.http, "/metrics")?;
        body.lines()
            .any(|l| {
                l.starts_with(
                    "unibus_auth_decisions_total{result=\"would_deny\",reason=\"unknown_key\"} ",
                )
            })
            .then_some(())
    });
    assert!(counted.is_some(), "the would-be denial is not in /metrics");
}

/// A ready three-node KV cluster at R3, its bootstrap admin and its CA.
fn kv_cluster_r3() -> (LocalCluster, KeyPair, PathBuf) {
    let cluster = start_cluster(&["--flag", "decentralized=true", "--replicas", "3"]);
    for node in &cluster.nodes {
        node.wait_ready(READY);
    }
    let seed = std::fs::read_to_string(cluster.secrets.join("admin.seed")).unwrap();
    let admin = KeyPair::from_seed(seed.trim()).unwrap();
    let ca = cluster.secrets.join("ca.crt");
    (cluster, admin, ca)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_of_three_nodes_gone_the_survivor_denies_new_connections() {
    let _heavy = HEAVY.lock().await;
    let (mut cluster, admin, ca) = kv_cluster_r3();
    let url = format!("tls://{}", cluster.nodes[0].ports.listen);
    connect(&url, &ca, with_key(&admin))
        .await
        .expect("a valid user is admitted while the cluster is whole");

    for node in &mut cluster.nodes[1..] {
        node.signal(libc::SIGKILL);
        node.wait_exit(WAIT).expect("node killed");
    }
    // Once the survivor knows it has lost its quorum (it says so in /readyz), the store
    // cannot vouch for anyone: every new connection is refused, none admitted.
    let survivor = &cluster.nodes[0];
    let noticed = poll(READY, || {
        survivor.readyz().filter(|(status, _)| *status == 503)
    });
    assert!(noticed.is_some(), "the survivor still reports ready");
    for attempt in 0..3 {
        let outcome = match connect(&url, &ca, with_key(&admin)).await {
            Ok(mut conn) => Ok(conn.admitted().await),
            Err(kind) => Err(kind),
        };
        match outcome {
            Ok(true) => panic!(
                "attempt {attempt}: admitted without a quorum; the survivor's log:\n{}",
                survivor.log()
            ),
            // `connect` returned early (see `Conn::admitted`), then the refusal came.
            Ok(false) => {}
            Err(kind) => assert!(
                matches!(
                    kind,
                    ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::TimedOut
                ),
                "attempt {attempt}: refused for an unexpected reason: {kind:?}"
            ),
        }
    }
}

/// nats-server takes clients as soon as it listens, before its routes are up and long
/// before the node's store is open. A valid user who picks a restarting node in that
/// window is admitted through the peers (the callout is forwarded), never refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarting_node_admits_valid_users_before_its_store_is_open() {
    let _heavy = HEAVY.lock().await;
    let (mut cluster, admin, ca) = kv_cluster_r3();
    let url = format!("tls://{}", cluster.nodes[2].ports.listen);

    let (peers, restarting) = cluster.nodes.split_at_mut(2);
    let restarting = &mut restarting[0];
    restarting.signal(libc::SIGTERM);
    restarting.wait_exit(WAIT).expect("node stopped");
    restarting.respawn();
    // From when its authenticator listens (before that, for the few milliseconds between
    // nats-server opening its port and the node's first connection, a callout has nobody
    // to go to) until the node is ready, its store still opening.
    let listening = poll(READY, || {
        let (status, readyz) = restarting.readyz()?;
        let detail = readyz["stages"]["authenticator"]["detail"].as_str();
        (status == 200 || detail == Some(unibus::auth::authenticator::FORWARDING)).then_some(())
    });
    assert!(
        listening.is_some(),
        "the restarted node's authenticator never came up"
    );
    let deadline = Instant::now() + READY;
    let (mut before_ready, mut not_listening) = (0, 0);
    loop {
        assert!(Instant::now() < deadline, "the node never became ready");
        // Read before connecting: an attempt counts as "before ready" only if the node
        // was not ready when it began.
        let ready = restarting.readyz().is_some_and(|(status, _)| status == 200);
        let outcome = match connect(&url, &ca, with_key(&admin)).await {
            Ok(mut conn) => Ok(conn.admission().await),
            Err(kind) => Err(kind),
        };
        match outcome {
            Ok(Err(why)) => panic!(
                "a valid user was refused by the restarting node after connecting \
                 ({before_ready} admitted before it was ready): {why}\n{}\n{}\n{}",
                restarting.log(),
                peers[0].log(),
                peers[1].log()
            ),
            Ok(Ok(())) if ready => break,
            Ok(Ok(())) => before_ready += 1,
            Err(ConnectErrorKind::Io) => not_listening += 1,
            Err(kind) => panic!(
                "a valid user was refused by the restarting node ({before_ready} admitted \
                 before it was ready): {kind:?}\n{}",
                restarting.log()
            ),
        }
    }
    // The forwarding itself is pinned down in tests/callout.rs; here, none was refused and
    // the window (hundreds of milliseconds: the store opens after JetStream's meta
    // contact) was really exercised.
    eprintln!(
        "admitted before ready: {before_ready}; attempts before it listened: {not_listening}"
    );
    assert!(
        before_ready > 0,
        "no attempt landed before the node was ready"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_and_a_foreign_ca_are_refused() {
    use std::io::{BufRead, BufReader, Write};
    let _heavy = HEAVY.lock().await;
    let (node, secrets) = single_node("tlsonly", &[]);
    let admin =
        KeyPair::from_seed(std::fs::read_to_string(&secrets.admin_seed).unwrap().trim()).unwrap();

    // A plaintext client: the server announces TLS as required and refuses to go on.
    let stream = std::net::TcpStream::connect(&node.ports.listen).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut info = String::new();
    reader.read_line(&mut info).unwrap();
    assert!(info.contains("\"tls_required\":true"), "{info}");
    let mut writer = stream;
    writer
        .write_all(b"CONNECT {\"verbose\":false}\r\nPING\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = reader.read_line(&mut answer);
    assert!(
        !answer.starts_with("PONG"),
        "a plaintext client was served: {answer}"
    );

    // A client pinning another cluster's CA does not trust this server.
    let other = cluster_secrets(&["elsewhere"]);
    let url = format!("tls://{}", node.ports.listen);
    let foreign = connect(&url, &other.path().join("s/ca.crt"), with_key(&admin)).await;
    assert!(foreign.is_err(), "a client pinning a foreign CA connected");
    // The right CA works (so the refusal above was about the CA).
    connect(&url, &secrets.ca_cert, with_key(&admin))
        .await
        .expect("the right CA connects");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_auth_off_accepts_unsigned_control_requests_for_a_known_key() {
    let _heavy = HEAVY.lock().await;
    let (node, secrets) = single_node("open", &["--flag", "bus-auth=off"]);
    let url = format!("tls://{}", node.ports.listen);
    let conn = connect(&url, &secrets.ca_cert, ConnectOptions::new())
        .await
        .expect("off: no credentials needed");
    let users = ok(
        conn.ctl_raw(
            "users.list",
            unsigned("users.list", json!({}), Some(&secrets.admin_public)),
        )
        .await,
        "unsigned users.list as the admin",
    );
    assert!(
        users
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u["key"] == secrets.admin_public.as_str())
    );
    // Off skips signatures, not identity: the claimed key must still be a user.
    let stranger = KeyPair::new_user().public_key();
    refused_with(
        conn.ctl_raw(
            "rooms.list",
            unsigned("rooms.list", json!({}), Some(&stranger)),
        )
        .await,
        "unauthenticated",
        401,
        "unsigned request claiming an unknown key",
    );
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn keygen_and_cluster_init_write_private_files_0600() {
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("me.seed");
    let (code, out, err) = unibus(&["keygen", "--out", seed.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let public = out.trim();
    assert!(public.starts_with('U') && public.len() == 56, "{out}");
    assert_eq!(mode(&seed), 0o600);
    let pair = KeyPair::from_seed(std::fs::read_to_string(&seed).unwrap().trim()).unwrap();
    assert_eq!(pair.public_key(), public);
    // Never over an existing file.
    let (code, _, _) = unibus(&["keygen", "--out", seed.to_str().unwrap()]);
    assert_ne!(code, 0);

    let out_dir = dir.path().join("secrets");
    let (code, out, err) = unibus(&[
        "cluster",
        "init",
        "--out",
        out_dir.to_str().unwrap(),
        "--nodes",
        "n1,n2,n3",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out_dir.join("ca.crt").is_file());
    for private in [
        "admin.seed",
        "system.seed",
        "service.seed",
        "issuer.seed",
        "ca.key",
    ] {
        assert_eq!(mode(&out_dir.join(private)), 0o600, "{private}");
    }
    for node in ["n1", "n2", "n3"] {
        assert!(out_dir.join(format!("{node}.crt")).is_file());
        assert_eq!(mode(&out_dir.join(format!("{node}.key"))), 0o600);
    }
    let secrets = ClusterSecrets::load(&out_dir).unwrap();
    assert!(out.contains(&secrets.admin_public), "{out}");
}
