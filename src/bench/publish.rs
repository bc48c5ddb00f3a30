//! Room message workloads on a three-node cluster, each beside its raw NATS twin:
//!
//! - `room_publish`: messages/s *delivered to a subscriber* of a plain room in **live**
//!   mode (`client::live`): the sender uses the client library (`Client::send_live`: a
//!   core NATS publish on `unibus.live.<room>.<sender>`, checked by the server against the
//!   member's permissions) through node 1 and the listener `Client::subscribe_live`
//!   through node 2. The raw twin publishes with core NATS through node 1 and subscribes
//!   with core NATS through node 2, as the node's APP identity, on subjects of the same
//!   shape outside the room namespaces (`bench.live.<room>.<sender>`), so one side's
//!   messages never reach the other's subscriber. Both sides run the same loop: `IN_FLIGHT`
//!   tasks each publishing a fresh body of the same size, no flush per message, and the
//!   same drain between rounds; so the ratio is what the client library, the server's
//!   permission checks and (below) encryption add to plain pub/sub.
//! - `room_publish_encrypted`: the same with 1 KiB bodies in an end-to-end encrypted room
//!   (sealed by the sender, opened by the listener) vs 1 KiB raw core messages.
//! - `room_durable`: acknowledged sends/s (`Client::send`: stored in `ROOMS` at R3 with
//!   fsync) vs acknowledged JetStream publishes to a bare stream with the same replicas as
//!   `ROOMS`, as the node's APP identity.
//!
//! Raw twins never publish under `unibus.room.>`: the `ROOMS` stream captures those, so raw
//! core publishes there would be stored too (unacknowledged, as fast as the publisher can
//! go), and the stream's backlog would slow the unibus round that follows (5× in a first
//! version of this bench).
//!
//! Deliveries are counted at the subscriber, not at the publisher, because that is what a
//! user of a room sees. Each body carries its send time and the id of the round it belongs
//! to, so a message from an earlier round that arrives late is not counted, and the
//! p50/p99 reported are publish → deliver latencies on the unibus side.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use super::measure;
use super::{Workload, app_seed, client, raw_connection, throughput_workload};
use crate::localnet::LocalCluster;
use crate::membership::api;

/// Publishing tasks per sender (both sides); for `room_durable`, sends awaiting their ack.
const IN_FLIGHT: usize = 32;
/// Live messages published but not yet delivered, at most, per side: the publishing tasks
/// take a slot from the subscriber's [`Tally`] per message and each delivery returns one.
/// Without it a core publisher runs unboundedly ahead of its subscriber, whose client
/// then drops messages (slow consumer) and whose server disconnects it: both sides would
/// measure overload and loss, not throughput. Large enough not to be the limit itself
/// (a few milliseconds of deliveries here).
const WINDOW: usize = 1024;
/// Body size of plain room messages.
const PLAIN_BODY: usize = 128;
/// Body size of encrypted room messages (the 1 KiB).
const ENCRYPTED_BODY: usize = 1024;

/// Counts deliveries of the current round at a subscriber.
struct Tally {
    base: Instant,
    round: AtomicU64,
    delivered: AtomicU64,
    /// Whether anything at all (a warm-up probe too) has arrived.
    heard: std::sync::atomic::AtomicBool,
    latencies: std::sync::Mutex<Vec<Duration>>,
    /// Free slots of the publish window ([`WINDOW`]).
    window: tokio::sync::Semaphore,
}

impl Tally {
    fn new() -> Arc<Tally> {
        Arc::new(Tally {
            base: Instant::now(),
            round: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            heard: std::sync::atomic::AtomicBool::new(false),
            latencies: std::sync::Mutex::new(Vec::new()),
            window: tokio::sync::Semaphore::new(WINDOW),
        })
    }

    /// Waits for a free slot in the publish window: false if the round ends first (a
    /// message lost on the way never returns its slot).
    async fn slot(&self, round_end: tokio::time::Instant) -> bool {
        tokio::select! {
            // A free slot is taken without touching the timer.
            biased;
            permit = self.window.acquire() => permit.map(|p| p.forget()).is_ok(),
            _ = tokio::time::sleep_until(round_end) => false,
        }
    }

    /// A body of `size` bytes (at least 16) stamped with the send time and current round.
    fn body(&self, size: usize) -> Vec<u8> {
        let mut body = vec![b'x'; size.max(16)];
        let sent = self.base.elapsed().as_nanos() as u64;
        body[..8].copy_from_slice(&sent.to_le_bytes());
        body[8..16].copy_from_slice(&self.round.load(Ordering::Relaxed).to_le_bytes());
        body
    }

    /// Counts `body` if it belongs to the round in progress.
    fn record(&self, body: &[u8]) {
        if !self.heard.load(Ordering::Relaxed) {
            self.heard.store(true, Ordering::Relaxed);
        }
        let (Some(sent), Some(round)) = (stamp(body, 0), stamp(body, 8)) else {
            return;
        };
        let current = self.round.load(Ordering::Relaxed);
        if current == 0 || round != current {
            return;
        }
        self.delivered.fetch_add(1, Ordering::Relaxed);
        self.window.add_permits(1);
        let now = self.base.elapsed().as_nanos() as u64;
        if let Ok(mut l) = self.latencies.lock() {
            l.push(Duration::from_nanos(now.saturating_sub(sent)));
        }
    }

    /// Starts counting `round`, with the whole window free.
    fn open(&self, round: u64) {
        self.delivered.store(0, Ordering::Relaxed);
        // Between rounds nothing publishes or returns slots, so this is exact.
        let free = self.window.available_permits();
        if free < WINDOW {
            self.window.add_permits(WINDOW - free);
        }
        self.round.store(round, Ordering::Relaxed);
    }

    /// Ends the round; what was delivered in it.
    fn close(&self) -> u64 {
        self.round.store(0, Ordering::Relaxed);
        self.delivered.load(Ordering::Relaxed)
    }
}

/// Publishes probes (of no round, so never counted) until `tally` hears one. Interest in a
/// subject reaches the publisher's node asynchronously, over the route; without this the
/// first round of either side would count messages published to nobody.
async fn warm_up<F, Fut, E>(tally: &Tally, publish: F) -> Result<(), String>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !tally.heard.load(Ordering::Relaxed) {
        if Instant::now() > deadline {
            return Err("the subscriber heard no probe within 30 s".into());
        }
        publish().await.map_err(|e| e.to_string())?;
        // Paces the probes; the loop condition is what waits.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn stamp(body: &[u8], at: usize) -> Option<u64> {
    let bytes: [u8; 8] = body.get(at..at + 8)?.try_into().ok()?;
    Some(u64::from_le_bytes(bytes))
}

/// `room_publish` (plain) or `room_publish_encrypted` on `cluster`.
pub async fn room_publish(
    cluster: &LocalCluster,
    encrypted: bool,
    rounds: usize,
    each: Duration,
) -> Result<Workload, String> {
    let secrets = &cluster.secrets;
    let (n1, n2) = (
        cluster.nodes[0].ports.listen.as_str(),
        cluster.nodes[1].ports.listen.as_str(),
    );
    let seed = secrets.join(crate::auth::certs::ADMIN_SEED);
    let tag = if encrypted { "e" } else { "p" };
    let (room, raw_room) = (format!("pub-{tag}"), format!("pub-{tag}-raw"));
    let size = if encrypted {
        ENCRYPTED_BODY
    } else {
        PLAIN_BODY
    };

    let sender = client(secrets, &[n1, n2], &seed).await?;
    if encrypted {
        sender.register_xkey().await.map_err(|e| e.to_string())?;
    }
    sender
        .create_room(&room, "", encrypted)
        .await
        .map_err(|e| e.to_string())?;
    // The listener connects after the rooms exist: permissions are computed at connect.
    let listener = client(secrets, &[n2, n1], &seed).await?;

    let ours_tally = Tally::new();
    let raw_tally = Tally::new();
    let mut feed = listener
        .subscribe_live(&room)
        .await
        .map_err(|e| e.to_string())?;
    let t = ours_tally.clone();
    let feed_task = tokio::spawn(async move {
        while let Some(m) = feed.next().await {
            if let Ok(m) = m {
                t.record(&m.body);
            }
        }
    });
    let app = app_seed(secrets)?;
    let raw_pub = raw_connection(secrets, &[n1], app.clone()).await?;
    let raw_listener = raw_connection(secrets, &[n2], app).await?;
    let mut raw_sub = raw_listener
        .subscribe(format!("bench.live.{raw_room}.>"))
        .await
        .map_err(|e| e.to_string())?;
    raw_listener.flush().await.map_err(|e| e.to_string())?;
    let t = raw_tally.clone();
    let raw_task = tokio::spawn(async move {
        while let Some(m) = raw_sub.next().await {
            t.record(&m.payload);
        }
    });

    let raw_subject = format!("bench.live.{raw_room}.{}", sender.key());
    warm_up(&ours_tally, || {
        let (sender, room, body) = (&sender, &room, ours_tally.body(size));
        async move { sender.send_live(room, body).await }
    })
    .await?;
    warm_up(&raw_tally, || {
        raw_pub.publish(raw_subject.clone(), raw_tally.body(size).into())
    })
    .await?;
    let (mut ours, mut raw) = (Side::default(), Side::default());
    let mut round_id = 0u64;
    for _ in 0..rounds {
        round_id += 1;
        let (s, t, r) = (sender.clone(), ours_tally.clone(), room.clone());
        let round_end = tokio::time::Instant::now() + each;
        ours.add(
            &ours_tally,
            round_id,
            each,
            measure::run(each, IN_FLIGHT, move |_| {
                let (s, t, r) = (s.clone(), t.clone(), r.clone());
                async move {
                    if !t.slot(round_end).await {
                        return Ok(());
                    }
                    s.send_live(&r, t.body(size)).await
                }
            }),
        )
        .await;
        round_id += 1;
        let (nats, t, subject) = (raw_pub.clone(), raw_tally.clone(), raw_subject.clone());
        let round_end = tokio::time::Instant::now() + each;
        raw.add(
            &raw_tally,
            round_id,
            each,
            measure::run(each, IN_FLIGHT, move |_| {
                let (nats, t, subject) = (nats.clone(), t.clone(), subject.clone());
                async move {
                    if !t.slot(round_end).await {
                        return Ok(());
                    }
                    nats.publish(subject, t.body(size).into()).await
                }
            }),
        )
        .await;
    }
    feed_task.abort();
    raw_task.abort();
    let name = if encrypted {
        "room_publish_encrypted"
    } else {
        "room_publish"
    };
    let mut latencies = ours_tally
        .latencies
        .lock()
        .map(|mut l| std::mem::take(&mut *l))
        .unwrap_or_default();
    latencies.sort();
    let delivered = |side: &Side| measure::Stats {
        ops: side.delivered,
        errors: 0,
        elapsed: side.elapsed,
        latencies: Vec::new(),
        cpu: side.cpu,
    };
    let ours_stats = measure::Stats {
        latencies,
        ..delivered(&ours)
    };
    Ok(throughput_workload(
        name,
        &ours_stats,
        &delivered(&raw),
        1.0,
    ))
}

/// Deliveries counted over the rounds of one side.
#[derive(Default)]
struct Side {
    delivered: u64,
    elapsed: Duration,
    cpu: measure::Cpu,
}

impl Side {
    /// Runs one round of publishing (`publish`, which lasts about `each`) with the tally
    /// open, then lets late deliveries drain before the other side's round.
    async fn add(
        &mut self,
        tally: &Tally,
        round: u64,
        each: Duration,
        publish: impl std::future::Future<Output = measure::Stats>,
    ) {
        tally.open(round);
        let started = Instant::now();
        let stats = publish.await;
        let elapsed = started.elapsed().max(each);
        self.delivered += tally.close();
        self.elapsed += elapsed;
        self.cpu.add(stats.cpu);
        if stats.errors > 0 {
            eprintln!("bench: {} publish errors in a round", stats.errors);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `room_durable` on `cluster`.
pub async fn room_durable(
    cluster: &LocalCluster,
    rounds: usize,
    each: Duration,
) -> Result<Workload, String> {
    let secrets = &cluster.secrets;
    let n1 = cluster.nodes[0].ports.listen.as_str();
    let seed = secrets.join(crate::auth::certs::ADMIN_SEED);
    let sender = client(secrets, &[n1], &seed).await?;
    sender
        .create_room("durable", "", false)
        .await
        .map_err(|e| e.to_string())?;

    let app = raw_connection(secrets, &[n1], app_seed(secrets)?).await?;
    let js = async_nats::jetstream::new(app);
    let mut rooms = js
        .get_stream(api::ROOMS_STREAM)
        .await
        .map_err(|e| e.to_string())?;
    let replicas = rooms
        .info()
        .await
        .map_err(|e| e.to_string())?
        .config
        .num_replicas;
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: "BENCH_DURABLE".into(),
        subjects: vec!["bench.durable.>".into()],
        num_replicas: replicas,
        storage: async_nats::jetstream::stream::StorageType::File,
        duplicate_window: crate::membership::history::DUPLICATE_WINDOW,
        ..Default::default()
    })
    .await
    .map_err(|e| e.to_string())?;

    let body = bytes::Bytes::from(vec![b'x'; PLAIN_BODY]);
    let b = body.clone();
    let ours = move |_i: u64| {
        let (sender, b) = (sender.clone(), b.clone());
        async move { sender.send("durable", &b).await.map(|_| ()) }
    };
    let raw = move |i: u64| {
        let (js, body) = (js.clone(), body.clone());
        async move {
            // With a fresh message id like the client library's, so the stream does the
            // same duplicate-window bookkeeping (and never answers from it).
            let message = async_nats::jetstream::message::PublishMessage::build()
                .payload(body)
                .message_id(nuid::next().to_string());
            let ack = js
                .send_publish(format!("bench.durable.{}", i % 16), message)
                .await
                .map_err(|e| e.to_string())?;
            ack.await.map(|_| ()).map_err(|e| e.to_string())
        }
    };
    let (a, b) = measure::alternate(rounds, each, IN_FLIGHT, ours, raw).await;
    Ok(throughput_workload("room_durable", &a, &b, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_open_round_is_counted() {
        let tally = Tally::new();
        tally.open(1);
        let early = tally.body(32);
        tally.record(&early);
        assert_eq!(tally.close(), 1);
        tally.open(2);
        tally.record(&early); // a late message from round 1
        tally.record(&tally.body(32));
        tally.record(b"short");
        assert_eq!(tally.close(), 1);
        tally.record(&tally.body(32)); // between rounds
        assert_eq!(tally.delivered.load(Ordering::Relaxed), 1);
        assert_eq!(tally.latencies.lock().unwrap().len(), 2);
    }
}
