//! Compare-and-set publishes that can be retried: KV creates and updates, nonce claims.
//!
//! # Why
//!
//! A compare-and-set write is a JetStream publish carrying
//! `Nats-Expected-Last-Subject-Sequence`; the stream's Raft leader orders it and answers.
//! When that leader hands over (lame duck, a rolling restart, a step-down), a publish in
//! flight can be dropped without any answer, and waiting for one stalled the caller —
//! and every write behind it — for the whole `op_timeout` (2 s). Repeating the publish
//! reaches the new leader at once, but a plain repeat is not safe: if the first attempt
//! *did* land, the repeat is refused ("wrong last sequence") and the caller would be told
//! of a conflict — "user already exists" for the user it has just created, "replay" for
//! the nonce it has just claimed.
//!
//! # How
//!
//! Every attempt of one write carries the same `Nats-Msg-Id`, fresh for each write.
//!
//! 1. If an earlier attempt landed, the stream's duplicate window recognises the repeat
//!    and acknowledges it as a duplicate with the original sequence: written.
//! 2. If the repeat is refused anyway (it reached a new leader that had not yet applied
//!    the earlier attempt, or the window had passed), the refusal is checked: the
//!    subject's last message is read from the leader, and if it carries this write's id,
//!    the write is ours: written.
//! 3. Otherwise the subject really moved: [`Cas::Moved`], with the last message, so the
//!    caller can decide (a KV create may take over a delete marker).
//!
//! The id is random per write ([`nuid`]), never derived from the content: the nonce
//! ledger must refuse the same nonce claimed by two requests (a replay), which an id made
//! from the nonce would turn into a "duplicate", i.e. a pass.
//!
//! Attempts are hedged like idempotent reads (`jetstream::bounded_retry`): one
//! more goes out beside the first when it has not answered within a quarter of the
//! limit, and one that fails `unavailable` is repeated after a short pause; the whole
//! write, read-back included, is bounded by twice the limit at most.
//!
//! Cost: one message id per write is kept by the stream for its duplicate window (two
//! minutes for the KV buckets; the nonce ledger's is its retention), a few dozen bytes
//! each on the servers.
//!
//! # What is left
//!
//! If this write landed and another writer replaced it in the few milliseconds before
//! the read-back, the read shows the other writer's id and the outcome is `Moved`
//! although the write happened. For that, a second writer must have read the new record
//! and changed it between our lost answer and our retry; the caller then sees a conflict,
//! as it would have before retries existed (and the record exists, so nothing is lost).

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::message::{PublishMessage, StreamMessage};
use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use bytes::Bytes;

use super::StoreError;
use super::jetstream::bounded_retry;

/// How a compare-and-set write ended.
#[derive(Debug)]
pub enum Cas {
    /// Stored (by this call, possibly by an earlier attempt of it), at this sequence.
    Written(u64),
    /// Refused: the subject's last sequence was not the expected one. Carries the
    /// subject's last message as the leader has it now (None: it has none).
    Moved(Option<StreamMessage>),
}

/// One attempt's answer.
enum Attempt {
    Stored(u64),
    Refused,
}

/// Publishes `payload` on `subject` of `stream` if the subject's last sequence is
/// `expected` (0: the subject has no message), with a fresh message id; see the module
/// docs. `limit` bounds the publish attempts, and the read-back after a refusal.
pub async fn publish<I>(
    js: &jetstream::Context,
    stream: &jetstream::stream::Stream<I>,
    subject: &str,
    payload: Bytes,
    expected: u64,
    limit: Duration,
) -> Result<Cas, StoreError> {
    let id = nuid::next().to_string();
    publish_with_id(js, stream, subject, payload, expected, &id, limit).await
}

/// [`publish`] with a given message id: every attempt of one write must use the same id
/// and no two writes may share one. Public for the tests, which replay an attempt that
/// landed; callers use [`publish`].
pub async fn publish_with_id<I>(
    js: &jetstream::Context,
    stream: &jetstream::stream::Stream<I>,
    subject: &str,
    payload: Bytes,
    expected: u64,
    id: &str,
    limit: Duration,
) -> Result<Cas, StoreError> {
    let what = format!("compare-and-set write of {subject}");
    let answer = bounded_retry(limit, &what, || async {
        let message = PublishMessage::build()
            .payload(payload.clone())
            .expected_last_subject_sequence(expected)
            .message_id(id);
        let ack = js
            .send_publish(subject.to_string(), message)
            .await
            .map_err(|e| StoreError::Unavailable(format!("{what}: {e}")))?;
        match ack.await {
            Ok(ack) => Ok(Attempt::Stored(ack.sequence)),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(Attempt::Refused),
            Err(e) => Err(StoreError::Unavailable(format!("{what}: {e}"))),
        }
    })
    .await?;
    match answer {
        Attempt::Stored(seq) => Ok(Cas::Written(seq)),
        Attempt::Refused => {
            let last = last_message(stream, subject, limit).await?;
            match last {
                Some(msg) if carries_id(&msg.headers, id) => {
                    tracing::debug!(
                        subject,
                        "a repeated attempt was refused; the write was ours"
                    );
                    Ok(Cas::Written(msg.sequence))
                }
                other => Ok(Cas::Moved(other)),
            }
        }
    }
}

/// The subject's last message, read from the stream's leader (`STREAM.MSG.GET`, never a
/// direct get, which a lagging follower may answer).
pub async fn last_message<I>(
    stream: &jetstream::stream::Stream<I>,
    subject: &str,
    limit: Duration,
) -> Result<Option<StreamMessage>, StoreError> {
    let what = format!("read {subject}");
    bounded_retry(limit, &what, || async {
        match stream.get_last_raw_message_by_subject(subject).await {
            Ok(msg) => Ok(Some(msg)),
            Err(err) if is_no_message(&err) => Ok(None),
            Err(err) => Err(StoreError::Unavailable(format!("{what}: {err}"))),
        }
    })
    .await
}

/// Whether a `STREAM.MSG.GET` failed only because there is no such message (the client
/// reports it either way, depending on the server's answer).
pub(crate) fn is_no_message(err: &stream::LastRawMessageError) -> bool {
    match err.kind() {
        stream::LastRawMessageErrorKind::NoMessageFound => true,
        stream::LastRawMessageErrorKind::JetStream(e) => {
            e.error_code() == jetstream::ErrorCode::NO_MESSAGE_FOUND
        }
        _ => false,
    }
}

fn carries_id(headers: &HeaderMap, id: &str) -> bool {
    headers
        .get(async_nats::header::NATS_MESSAGE_ID)
        .is_some_and(|v| v.as_str() == id)
}
