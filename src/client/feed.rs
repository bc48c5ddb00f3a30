//! Subscribing to a room: a stream of [`RoomMessage`]s, exactly once and in stream order,
//! across reconnects and node failures.
//!
//! The server side is `membership::history`: `rooms.subscribe` (member-checked) opens an
//! ephemeral consumer that pushes the room's messages to
//! `unibus.deliver.<room>.<me>.<inbox>`. This side:
//!
//! 1. subscribes to that subject *before* asking for the feed, so nothing is delivered
//!    to nobody;
//! 2. reads each delivery's stream and consumer sequences from its JetStream reply subject;
//!    a message at or below the last stream sequence handed out is dropped (never shown
//!    twice); a consumer sequence that skips, an idle heartbeat that says more was sent
//!    than arrived, three missed heartbeats, or a reconnect of the connection all mean the
//!    feed may have lost something, so
//! 3. it opens a new feed starting right after the last stream sequence handed out
//!    (`Start::After`), retrying transient errors with backoff. The listener sees a pause,
//!    never a gap.
//!
//! A refusal (`forbidden`, `not_found`: removed from the room, room deleted) ends the stream
//! with that error. Decryption failures of single messages are yielded as errors and the
//! stream goes on.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::membership::api::{self, Feed, Op, Start, SubscribeRoom};

use super::{Client, ClientError};

/// One message of a room.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RoomMessage {
    pub room: String,
    /// The stream sequence: increasing (not contiguous) within a room; resume after it with
    /// `Start::After(seq)`.
    pub seq: u64,
    /// The sender's user key, as vouched for by the server (the subject's last token).
    pub sender: String,
    /// When the cluster stored it, unix milliseconds.
    pub time: u64,
    /// The plaintext (opened, in an encrypted room).
    #[serde(skip)]
    pub body: Vec<u8>,
    /// The key epoch it was sealed with (encrypted rooms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u32>,
}

/// Messages of one room; see the module doc. Dropping it ends the feed.
pub struct Subscription {
    rx: mpsc::Receiver<Result<RoomMessage, ClientError>>,
    task: tokio::task::JoinHandle<()>,
}

impl Stream for Subscription {
    type Item = Result<RoomMessage, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Messages buffered between the feed task and the reader.
const BUFFER: usize = 1024;

/// The metadata of a push-consumer delivery, from its `$JS.ACK.…` reply subject.
#[derive(Debug, PartialEq, Eq)]
struct Delivery {
    stream_seq: u64,
    consumer_seq: u64,
    time_ns: u64,
}

/// Parses `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>` and the
/// newer form with `<domain>.<account hash>` before the stream (and a token after).
fn parse_reply(reply: &str) -> Option<Delivery> {
    let tokens: Vec<&str> = reply.strip_prefix("$JS.ACK.")?.split('.').collect();
    let t = match tokens.len() {
        7 => &tokens[..],
        n if n >= 9 => &tokens[2..],
        _ => return None,
    };
    Some(Delivery {
        stream_seq: t[3].parse().ok()?,
        consumer_seq: t[4].parse().ok()?,
        time_ns: t[5].parse().ok()?,
    })
}

impl Client {
    /// A stream of `room`'s messages from `start` (the whole history, only new ones, or
    /// after a sequence), exactly once and in order; see the module doc. Fails right away
    /// when the caller may not read the room.
    pub async fn subscribe(&self, room: &str, start: Start) -> Result<Subscription, ClientError> {
        let encrypted = self.is_encrypted(room).await?;
        let (sub, feed) = self.open_feed(room, start).await?;
        let (tx, rx) = mpsc::channel(BUFFER);
        let task = FeedTask {
            client: self.clone(),
            room: room.to_string(),
            encrypted,
            last: feed.after,
            tx,
        };
        let task = tokio::spawn(task.run(sub, feed));
        Ok(Subscription { rx, task })
    }

    async fn open_feed(
        &self,
        room: &str,
        start: Start,
    ) -> Result<(async_nats::Subscriber, Feed), ClientError> {
        let inbox = nuid::next().to_string();
        let subject = api::deliver_subject(room, self.key(), &inbox);
        // The subscription reaches the server before the request that starts the feed.
        let sub = self.subscribe_at_server(subject).await?;
        let body = SubscribeRoom {
            room: room.into(),
            inbox,
            start,
        };
        let feed = self.call(Op::RoomsSubscribe, &body).await?;
        Ok((sub, feed))
    }
}

struct FeedTask {
    client: Client,
    room: String,
    encrypted: bool,
    /// The last stream sequence handed out (or skipped by the start position).
    last: u64,
    tx: mpsc::Sender<Result<RoomMessage, ClientError>>,
}

/// Why a feed stopped being trustworthy.
enum Reopen {
    /// Reopen after the last sequence.
    Resume,
    /// The reader went away.
    Done,
}

impl FeedTask {
    async fn run(mut self, mut sub: async_nats::Subscriber, mut feed: Feed) {
        let mut silent_feeds = 0u32;
        loop {
            let (outcome, heard) = self.follow(&mut sub, &feed).await;
            if matches!(outcome, Reopen::Done) {
                return;
            }
            let _ = sub.unsubscribe().await;
            // A feed that never even heartbeats may be one this connection is not allowed
            // to receive (permissions from before a join): reconnect to refresh them.
            silent_feeds = if heard { 0 } else { silent_feeds + 1 };
            if silent_feeds >= 2 {
                let _ = self.client.refresh_permissions().await;
                silent_feeds = 0;
            }
            let mut backoff = Duration::from_millis(100);
            loop {
                match self
                    .client
                    .open_feed(&self.room, Start::After(self.last))
                    .await
                {
                    Ok((s, f)) => {
                        sub = s;
                        feed = f;
                        break;
                    }
                    Err(e) if e.is_transient() || matches!(e, ClientError::Closed(_)) => {
                        tracing::debug!(room = self.room, "reopening the feed: {e}");
                    }
                    Err(e) => {
                        let _ = self.tx.send(Err(e)).await;
                        return;
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = self.tx.closed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }

    /// Follows one feed until it must be reopened. Also says whether anything (a message or
    /// a heartbeat) arrived on it.
    async fn follow(&mut self, sub: &mut async_nats::Subscriber, feed: &Feed) -> (Reopen, bool) {
        let silence = Duration::from_millis(feed.heartbeat_ms.max(250) * 3);
        let mut connects = self.client.inner.connects.clone();
        connects.mark_unchanged();
        let mut expected = 1u64;
        let mut heard = false;
        loop {
            let next = tokio::select! {
                next = tokio::time::timeout(silence, sub.next()) => next,
                _ = connects.changed() => return (Reopen::Resume, heard),
                _ = self.tx.closed() => return (Reopen::Done, heard),
            };
            let message = match next {
                Ok(Some(m)) => m,
                Ok(None) | Err(_) => return (Reopen::Resume, heard),
            };
            heard = true;
            if let Some(status) = message.status {
                if status != async_nats::StatusCode::IDLE_HEARTBEAT {
                    // The consumer is gone or in trouble (e.g. deleted after a removal).
                    return (Reopen::Resume, heard);
                }
                // Idle heartbeat: it names the last consumer sequence sent.
                let sent = message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Nats-Last-Consumer"))
                    .and_then(|v| v.as_str().parse::<u64>().ok());
                if sent.is_some_and(|sent| sent >= expected) {
                    return (Reopen::Resume, heard);
                }
                continue;
            }
            let Some(delivery) = message.reply.as_deref().and_then(parse_reply) else {
                tracing::warn!(
                    room = self.room,
                    "a feed delivery without JetStream metadata"
                );
                continue;
            };
            if delivery.consumer_seq != expected {
                return (Reopen::Resume, heard);
            }
            expected += 1;
            if delivery.stream_seq <= self.last {
                continue;
            }
            let item = self.decode(&message, &delivery).await;
            self.last = delivery.stream_seq;
            if self.tx.send(item).await.is_err() {
                return (Reopen::Done, heard);
            }
        }
    }

    async fn decode(
        &self,
        message: &async_nats::Message,
        delivery: &Delivery,
    ) -> Result<RoomMessage, ClientError> {
        let sender = api::sender_of(message.subject.as_str(), &self.room)
            .ok_or_else(|| {
                ClientError::Protocol(format!(
                    "message {} is on {}, not a room subject",
                    delivery.stream_seq, message.subject
                ))
            })?
            .to_string();
        let (epoch, body) = if self.encrypted {
            let (epoch, body) = self
                .client
                .open_sealed(&self.room, &sender, &message.payload)
                .await?;
            (Some(epoch), body)
        } else {
            (None, message.payload.to_vec())
        };
        Ok(RoomMessage {
            room: self.room.clone(),
            seq: delivery.stream_seq,
            sender,
            time: delivery.time_ns / 1_000_000,
            body,
            epoch,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_subjects_of_both_forms_parse() {
        let old = parse_reply("$JS.ACK.ROOMS.feed-x.1.42.7.1700000000000000000.0").unwrap();
        assert_eq!(
            old,
            Delivery {
                stream_seq: 42,
                consumer_seq: 7,
                time_ns: 1_700_000_000_000_000_000
            }
        );
        let new = parse_reply("$JS.ACK.hub.ACCHASH.ROOMS.feed-x.1.42.7.1700000000000000000.0.rnd")
            .unwrap();
        assert_eq!(new, old);
        assert!(parse_reply("_INBOX.x").is_none());
        assert!(parse_reply("$JS.ACK.a.b.c").is_none());
        assert!(parse_reply("$JS.ACK.ROOMS.f.1.x.7.1.0").is_none());
    }
}
