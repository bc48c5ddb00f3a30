//! Live room messages: core NATS, at most once, no history, no acknowledgement.
//!
//! # Two delivery modes
//!
//! A room carries two kinds of traffic side by side, and the sender picks one per message:
//!
//! - **durable** ([`Client::send`], [`Client::subscribe`]): stored in the `ROOMS` stream at
//!   the cluster's replicas (with fsync), acknowledged, delivered exactly once and in order,
//!   resumable after a sequence. Each send waits for a replicated write.
//! - **live** (this module: [`Client::send_live`], [`Client::subscribe_live`]): a core NATS
//!   publish on `unibus.live.<room>.<sender key>`; whoever is subscribed at that moment gets
//!   it. Nothing is stored and nothing is acknowledged, so a message is lost when no member
//!   listens, while a listener's connection is down or reconnecting (a node restart, lame
//!   duck, a permission refresh), or when a listener falls too far behind (a slow
//!   consumer). For telemetry, presence, typing indicators: traffic whose next message
//!   supersedes the last, at the speed of plain NATS.
//!
//! Live messages have a namespace of their own because the `ROOMS` stream captures all of
//! `unibus.room.>`: published there, a "live" message would be stored like a durable one.
//!
//! # Same access rules, same end-to-end encryption
//!
//! The auth callout gives each member publish on `unibus.live.<room>.<own key>` and
//! subscribe on `unibus.live.<room>.>` for the rooms it has joined, and nothing for other
//! rooms (`auth::callout::permissions_for`). So the server checks membership on every
//! publish and subscription and vouches for the sender (the subject's last token), exactly
//! as for durable messages, and a removed member is disconnected and loses both. A
//! subscription, and the first send to a room, also ask the control plane (member-checked)
//! about the room, so a non-member gets a typed `forbidden` rather than silence. As with
//! any core subscription, the server applies the permissions this connection was admitted
//! with: a client that joins through its own [`Client::join`] is refreshed; one that joined
//! through another connection calls [`Client::refresh_permissions`] before listening.
//!
//! In an encrypted room a live body is sealed like a durable one ([`super::e2e`]: a fresh
//! nonce per message, ChaCha20-Poly1305 under the room's current epoch key, chosen through
//! the same send-epoch cache), so both modes share keys, epochs and format.
//!
//! # Bad input
//!
//! A message on a subject that is not `unibus.live.<room>.<one token>` (possible only when
//! the cluster runs `bus-auth` off or soft, or a server status message) is skipped and
//! counted ([`LiveSubscription::skipped`]). A body that does not open (tampered, of an
//! unknown epoch, not wrapped for this reader, not a sealed body at all) is yielded as a
//! typed [`ClientError::Crypto`] and the stream goes on. Nothing from the network panics.
//!
//! # Reconnects
//!
//! async-nats re-subscribes after a reconnect by itself; what was published meanwhile is
//! gone. After a reconnect the subscription asks the control plane again whether this user
//! still belongs to the room: a removed member's subscription then ends with `forbidden`
//! (the server already refuses it the subject), as a durable feed does.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::sync::watch;

use crate::membership::api;

use super::e2e::{self, RoomSecret};
use super::{Client, ClientError};

/// One live message of a room. Room and sender are read from the message's subject (the
/// sender is the token the server vouches for) without copying it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveMessage {
    /// `unibus.live.<room>.<sender>`, checked when the message arrived.
    subject: async_nats::Subject,
    /// Where the sender key starts in `subject`.
    sender_at: usize,
    /// The plaintext (opened, in an encrypted room).
    pub body: Bytes,
    /// The key epoch it was sealed with (encrypted rooms).
    pub epoch: Option<u32>,
}

impl LiveMessage {
    /// The room it was sent to.
    pub fn room(&self) -> &str {
        let start = api::LIVE_PREFIX.len() + 1;
        self.subject
            .get(start..self.sender_at.saturating_sub(1))
            .unwrap_or_default()
    }

    /// The sender's user key, as vouched for by the server (the subject's last token).
    pub fn sender(&self) -> &str {
        self.subject.get(self.sender_at..).unwrap_or_default()
    }
}

type Item = Result<LiveMessage, ClientError>;

/// Live messages of one room, from when it was opened; see the module doc. Dropping it
/// unsubscribes.
pub struct LiveSubscription {
    stream: Pin<Box<dyn Stream<Item = Item> + Send>>,
    skipped: Arc<AtomicU64>,
}

impl LiveSubscription {
    /// Messages dropped because they were not room messages (a subject that does not name
    /// a single sender, a server status): never handed out.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }
}

impl Stream for LiveSubscription {
    type Item = Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        self.stream.as_mut().poll_next(cx)
    }
}

impl Client {
    /// Sends `body` to `room`'s live listeners (sealed first in an encrypted room). Returns
    /// once the message is handed to the connection: no acknowledgement, no sequence, and
    /// nobody receives it who is not listening right now (see the module doc). Waits only
    /// when the connection's outgoing buffer is full (e.g. while it reconnects).
    ///
    /// Takes the body by value (a `Vec<u8>`, `String`, `Bytes`, …), as async-nats's
    /// `publish` does, so a plain room's body goes out without being copied.
    pub async fn send_live(&self, room: &str, body: impl Into<Bytes>) -> Result<(), ClientError> {
        let body = body.into();
        let size = body.len();
        let payload = self.payload_for(room, body).await?;
        self.inner
            .nats
            .publish(api::live_subject(room, self.key()), payload)
            .await
            .map_err(|e| {
                use async_nats::client::PublishErrorKind as K;
                match e.kind() {
                    K::MaxPayloadExceeded => ClientError::Local(format!(
                        "a message of {size} bytes is larger than the server accepts"
                    )),
                    K::InvalidSubject => ClientError::Local(format!("{room:?} is not a room id")),
                    _ => ClientError::Closed(e.to_string()),
                }
            })
    }

    /// Live messages of `room` from now on (none from before: live messages are not
    /// stored). Fails right away, with the control plane's typed error, when the caller may
    /// not read the room. The subscription is in place on this client's node when this
    /// returns; a sender on another node reaches it once the cluster has propagated the
    /// interest (a route round trip).
    pub async fn subscribe_live(&self, room: &str) -> Result<LiveSubscription, ClientError> {
        // Member-checked every time (not the cached flag): a subscription is no hot path.
        let encrypted = self.get_room(room).await?.encrypted;
        let mut connects = self.inner.connects.clone();
        connects.mark_unchanged();
        // The server has the subscription before we say it is open.
        let sub = self.subscribe_at_server(api::live_filter(room)).await?;
        let skipped = Arc::new(AtomicU64::new(0));
        let listener = Listener {
            client: self.clone(),
            room: room.to_string(),
            encrypted,
            sub,
            connects,
            key: None,
            skipped: skipped.clone(),
            watching: true,
            ended: false,
        };
        let stream = futures_util::stream::unfold(listener, |mut l| async move {
            let item = l.next().await?;
            Some((item, l))
        });
        Ok(LiveSubscription {
            stream: Box::pin(stream),
            skipped,
        })
    }
}

/// The state behind a [`LiveSubscription`].
struct Listener {
    client: Client,
    room: String,
    encrypted: bool,
    sub: async_nats::Subscriber,
    /// Bumped on every (re)connect: then membership is checked again.
    connects: watch::Receiver<u64>,
    /// The last epoch's key used to open a message: consecutive messages almost always
    /// share it, so this skips the client-wide cache (a lock and a key allocation).
    key: Option<(u32, RoomSecret)>,
    skipped: Arc<AtomicU64>,
    /// False once the reconnect watch is closed (the client is going away).
    watching: bool,
    ended: bool,
}

impl Listener {
    async fn next(&mut self) -> Option<Item> {
        loop {
            if self.ended {
                return None;
            }
            // A reconnect seen between messages is a version compare; only an idle
            // listener waits on the watch. The subscription comes first in the `select!`:
            // while messages are waiting the watch is not even polled (no waker to
            // register and drop per message).
            let reconnected = self.connects.has_changed().unwrap_or(false);
            let message = if reconnected {
                None
            } else if self.watching {
                tokio::select! {
                    biased;
                    message = self.sub.next() => Some(message?),
                    changed = self.connects.changed() => {
                        // The client is going away: no reconnects to watch for any more.
                        self.watching = changed.is_ok();
                        None
                    }
                }
            } else {
                Some(self.sub.next().await?)
            };
            let Some(message) = message else {
                if self.watching {
                    self.connects.mark_unchanged();
                    if let Some(refused) = self.still_a_member().await {
                        self.ended = true;
                        return Some(Err(refused));
                    }
                }
                continue;
            };
            if message.status.is_some() {
                self.skipped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let Some(sender) = api::live_sender_of(message.subject.as_str(), &self.room) else {
                self.skipped.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    room = self.room,
                    subject = message.subject.as_str(),
                    "skipped a live message on a subject that names no single sender"
                );
                continue;
            };
            let sender_at = message.subject.len() - sender.len();
            return Some(
                self.decode(message.subject, sender_at, message.payload)
                    .await,
            );
        }
    }

    async fn decode(
        &mut self,
        subject: async_nats::Subject,
        sender_at: usize,
        payload: Bytes,
    ) -> Item {
        let mut message = LiveMessage {
            subject,
            sender_at,
            body: payload,
            epoch: None,
        };
        if !self.encrypted {
            return Ok(message);
        }
        let epoch = e2e::epoch_of(&self.room, &message.body)?;
        let secret = match &self.key {
            Some((known, secret)) if *known == epoch => secret,
            _ => {
                let secret = self.client.epoch_secret(&self.room, epoch).await?;
                &self.key.insert((epoch, secret)).1
            }
        };
        let body = e2e::open(secret, &self.room, message.sender(), &message.body)?;
        message.body = Bytes::from(body);
        message.epoch = Some(epoch);
        Ok(message)
    }

    /// After a reconnect: the error that ends the subscription if the control plane no
    /// longer lets this user read the room. A transient failure keeps it open (the server
    /// enforces membership on the subscription either way).
    async fn still_a_member(&self) -> Option<ClientError> {
        match self.client.get_room(&self.room).await {
            Ok(_) => None,
            Err(e) if e.is_transient() || matches!(e, ClientError::Closed(_)) => {
                tracing::debug!(room = self.room, "re-checking membership: {e}");
                None
            }
            Err(e) => Some(e),
        }
    }
}
