//! Sending room messages, and the client's half of end-to-end encryption (which epoch to
//! seal with, unwrapping and caching room keys). The cryptography itself is in [`super::e2e`].

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;

use crate::membership::api::{self, ErrorKind, MemberKey, Op, RoomRef, SetXkey};
use crate::membership::{RoomKey, User};

use super::e2e::{self, CryptoError, RoomSecret};
use super::{Client, ClientError};

/// How long the epoch chosen for sending is reused before the client checks again that it
/// is the latest and covers the room's members.
const SEND_EPOCH_TTL: Duration = Duration::from_secs(2);

impl Client {
    /// Sends `body` to `room` and returns its stream sequence once the cluster has stored it
    /// (a JetStream ack). In an encrypted room the body is sealed first. Retries (with the
    /// same message id, so the message is stored once) until `publish_timeout`.
    pub async fn send(&self, room: &str, body: &[u8]) -> Result<u64, ClientError> {
        let payload = self
            .payload_for(room, bytes::Bytes::copy_from_slice(body))
            .await?;
        self.publish_durable(room, payload).await
    }

    /// What goes on the wire for `body` in `room`, durable or live alike: the body itself,
    /// or in an encrypted room the body sealed under the current send epoch. Asks the
    /// control plane (member-checked) the first time a room is used.
    ///
    /// Fails with [`ClientError::Local`] when the result is larger than the server takes
    /// (the `max_payload` it announced): a durable send would otherwise retry it until
    /// its timeout.
    pub(crate) async fn payload_for(
        &self,
        room: &str,
        body: bytes::Bytes,
    ) -> Result<bytes::Bytes, ClientError> {
        let size = body.len();
        let payload: bytes::Bytes = if self.is_encrypted(room).await? {
            let (epoch, secret) = self.send_epoch(room).await?;
            e2e::seal(&secret, room, epoch, self.key(), &body)?.into()
        } else {
            body
        };
        let limit = self.inner.nats.max_payload();
        if payload.len() > limit {
            return Err(ClientError::Local(format!(
                "a message of {size} bytes ({} on the wire) is larger than the {limit} bytes the server accepts",
                payload.len()
            )));
        }
        Ok(payload)
    }

    async fn publish_durable(&self, room: &str, payload: bytes::Bytes) -> Result<u64, ClientError> {
        let subject = api::room_subject(room, self.key());
        let id = nuid::next().to_string();
        let deadline = Instant::now() + self.inner.options.publish_timeout;
        let mut backoff = Duration::from_millis(100);
        loop {
            let message = PublishMessage::build()
                .payload(payload.clone())
                .message_id(&id);
            let last_error = match self.inner.js.send_publish(subject.clone(), message).await {
                Ok(ack) => match ack.await {
                    Ok(ack) => return Ok(ack.sequence),
                    Err(e) => e.to_string(),
                },
                // `payload_for` checked the body alone; with the message id header it
                // may still be over, and no retry makes it smaller.
                Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                    return Err(ClientError::Local(format!(
                        "a message of {} bytes is, with its headers, larger than the server accepts",
                        payload.len()
                    )));
                }
                Err(e) => e.to_string(),
            };
            tracing::debug!(room, "publish not acknowledged, retrying: {last_error}");
            if Instant::now() + backoff > deadline {
                return Err(ClientError::Timeout {
                    what: format!("the cluster to store a message to room {room} ({last_error})"),
                });
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// Registers this client's xkey on its user record (idempotent): others can then wrap
    /// room keys for it.
    pub async fn register_xkey(&self) -> Result<User, ClientError> {
        self.call(Op::UsersXkey, &SetXkey { xkey: self.xkey() })
            .await
    }

    /// Members of `room` with their registered xkeys.
    pub async fn member_xkeys(&self, room: &str) -> Result<Vec<MemberKey>, ClientError> {
        self.call(Op::MembersKeys, &RoomRef { room: room.into() })
            .await
    }

    /// Makes a new key epoch for an encrypted room, wrapped for every member (invited or
    /// joined) with a registered xkey, and for the caller (owners).
    pub async fn rekey(&self, room: &str) -> Result<RoomKey, ClientError> {
        let recipients = self.recipients(room).await?;
        let secret = RoomSecret::generate()?;
        let pairs: Vec<(String, String)> = recipients.into_iter().collect();
        let material = e2e::wrap(room, &secret, &self.inner.xkey, &pairs)?;
        let key = self.rekey_with(room, &material).await?;
        self.cache_secret(room, key.epoch, &secret);
        if let Ok(mut send) = self.inner.send_epochs.lock() {
            send.insert(room.to_string(), (key.epoch, secret, Instant::now()));
        }
        Ok(key)
    }

    /// Opens an encrypted body from `sender` in `room`.
    pub async fn open_sealed(
        &self,
        room: &str,
        sender: &str,
        body: &[u8],
    ) -> Result<(u32, Vec<u8>), ClientError> {
        let epoch = e2e::epoch_of(room, body)?;
        let secret = self.epoch_secret(room, epoch).await?;
        Ok((epoch, e2e::open(&secret, room, sender, body)?))
    }

    /// The room key of one epoch, unwrapped for this client (cached).
    pub async fn epoch_secret(&self, room: &str, epoch: u32) -> Result<RoomSecret, ClientError> {
        let cached = self
            .inner
            .room_keys
            .lock()
            .ok()
            .and_then(|k| k.get(&(room.to_string(), epoch)).cloned());
        if let Some(secret) = cached {
            return Ok(secret);
        }
        let key = match self.room_key(room, epoch).await {
            Ok(k) => k,
            Err(ClientError::Refused(e)) if e.kind == ErrorKind::NotFound => {
                return Err(CryptoError::UnknownEpoch {
                    room: room.into(),
                    epoch,
                }
                .into());
            }
            Err(e) => return Err(e),
        };
        let secret = e2e::unwrap(room, epoch, &key.material, self.key(), &self.inner.xkey)?;
        self.cache_secret(room, epoch, &secret);
        Ok(secret)
    }

    fn cache_secret(&self, room: &str, epoch: u32, secret: &RoomSecret) {
        if let Ok(mut keys) = self.inner.room_keys.lock() {
            keys.insert((room.to_string(), epoch), secret.clone());
        }
    }

    /// (user key, xkey) of everyone a new epoch should be wrapped for.
    async fn recipients(&self, room: &str) -> Result<BTreeSet<(String, String)>, ClientError> {
        let mut out: BTreeSet<(String, String)> = self
            .member_xkeys(room)
            .await?
            .into_iter()
            .filter(|m| m.key != self.key())
            .filter_map(|m| m.xkey.map(|x| (m.key, x)))
            .collect();
        out.insert((self.key().to_string(), self.xkey()));
        Ok(out)
    }

    /// The epoch to seal with: the latest, unless this client owns the room and the latest
    /// does not match the members' xkeys (someone joined, left or registered since): then a
    /// new epoch first.
    async fn send_epoch(&self, room: &str) -> Result<(u32, RoomSecret), ClientError> {
        let cached = || {
            self.inner.send_epochs.lock().ok().and_then(|s| {
                s.get(room)
                    .filter(|(_, _, at)| at.elapsed() < SEND_EPOCH_TTL)
                    .map(|(e, k, _)| (*e, k.clone()))
            })
        };
        if let Some(hit) = cached() {
            return Ok(hit);
        }
        // One check at a time; whoever waited finds the fresh entry.
        let _checking = self.inner.epoch_check.lock().await;
        if let Some(hit) = cached() {
            return Ok(hit);
        }
        let owner = self.get_room(room).await?.owner == self.key();
        let latest = self.latest_key(room).await?;
        if owner {
            let wanted: BTreeSet<String> = self
                .recipients(room)
                .await?
                .into_iter()
                .map(|(k, _)| k)
                .collect();
            let current: Option<BTreeSet<String>> = latest
                .as_ref()
                .and_then(|k| e2e::recipients(room, &k.material).ok())
                .map(|r| r.into_iter().collect());
            if current.as_ref() != Some(&wanted) {
                let key = self.rekey(room).await?;
                let secret = self.epoch_secret(room, key.epoch).await?;
                return Ok((key.epoch, secret));
            }
        }
        let latest = latest.ok_or_else(|| CryptoError::NoKey { room: room.into() })?;
        let secret = self.epoch_secret(room, latest.epoch).await?;
        if let Ok(mut send) = self.inner.send_epochs.lock() {
            send.insert(
                room.to_string(),
                (latest.epoch, secret.clone(), Instant::now()),
            );
        }
        Ok((latest.epoch, secret))
    }
}
