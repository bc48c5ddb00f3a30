//! The signed control-plane envelope: every `unibus.ctl.*` request is one.
//!
//! On the wire it is one JSON object:
//!
//! ```json
//! {"op":"rooms.create","body":{"id":"r1"},"ts":1767225600000,
//!  "nonce":"q0uD3h0w2YbC5mFQ3i8Yxg","key":"UD…","sig":"3Jk…"}
//! ```
//!
//! `ts` is unix time in milliseconds, `nonce` 16 random bytes in base64url, `key` the
//! caller's user nkey and `sig` its ed25519 signature (base64url, no padding) over the
//! **signing input**, a byte string no JSON parser is involved in:
//!
//! ```text
//! "unibus-envelope-v1" 0x00         (or "unibus-envelope-v1-own-subject" 0x00: see below)
//! u32be(len(op))    op              (UTF-8)
//! sha256(body)                      (32 bytes: the body's bytes exactly as sent)
//! u64be(ts)
//! u32be(len(nonce)) nonce           (ASCII)
//! u32be(len(key))   key             (ASCII, the signer's `U…` key)
//! ```
//!
//! Why this shape: every variable-length field carries its length, so no choice of `op`,
//! `nonce` or `key` can shift bytes from one field into the next (`op="a|b"` cannot pose as
//! `op="a"` plus something); the tag keeps a signature made for anything else (a NATS nonce,
//! a future v2) from ever verifying here; and the body is signed as the exact bytes of its
//! JSON value in the envelope (kept raw with `serde_json`'s `RawValue`), so there is no
//! canonical-JSON step for two implementations to disagree on. A relay that re-formats the
//! body breaks the signature, which is the point.
//!
//! **Reads may go unsigned.** A read (`Op::is_read`) may instead come as a
//! *connection-bound* envelope ([`Envelope::bound`]: key, no signature), checked by
//! [`verify_read`]: it is answered only when its reply subject is the claimed key's own
//! inbox, `_INBOX.<key>.…`, which the authenticator lets no other connection subscribe to.
//! The connection proved the key when it was admitted (the auth callout verifies a nonce
//! signature), so the reply reaches that key's holder and nobody else; a read changes
//! nothing, so a replay or a forged claim gains nothing. That takes the two ed25519
//! operations off every read, most of its cost. Writes stay signed, but for one case below.
//! A *minimal* read ([`Envelope::minimal`]) carries only `op` and `body`: the key is the
//! one the reply inbox names, so nothing else is needed. Nodes before
//! `membership::version::MINIMAL_READS` refuse it as malformed, so clients send it only
//! once a node says the cluster is finalized there.
//!
//! **Writes may go on the signer's own subject.** A write is signed either way. Sent to
//! the public `unibus.ctl.<op>`, its nonce is claimed in the cluster-wide replay ledger (a
//! replicated write). Sent to `unibus.ctl.<op>.<key>` instead, the caller's *own subject*,
//! which the authenticator lets only connections of `<key>` publish to, the server vouches
//! for the publisher as it does for room messages: nobody else can send those bytes there,
//! and the key's holder can sign any request it likes, so a replay gains it nothing and
//! the ledger's write is saved ([`verify_on_own_subject`]). Such an envelope is signed
//! under its own tag ([`OWN_SUBJECT_SIGNING_TAG`]), so it never verifies on the public
//! subject, where a copy (seen by a `bus-auth=soft` connection, say) would find its nonce
//! unclaimed. Once the cluster is finalized (no node left that grants anyone else an own
//! subject, `membership::version`), an `enforce` node takes such a write without its
//! signature ([`accept_on_own_subject`]), and clients stop signing it.
//!
//! [`verify`] checks, in order: size (before parsing anything), JSON shape (unknown or
//! duplicate fields are refused, so two parsers cannot read two different envelopes),
//! presence of a signature, the signature, the operation, the clock skew, and last the
//! replay cache, so only envelopes that passed everything else use up a nonce.

use std::collections::{BTreeSet, HashSet};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use nkeys::KeyPair;
use ring::digest::{SHA256, digest};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Domain-separation tag at the start of the signing input.
pub const SIGNING_TAG: &[u8] = b"unibus-envelope-v1\0";
/// The tag instead, for a request sent on the signer's own subject (see the module doc).
pub const OWN_SUBJECT_SIGNING_TAG: &[u8] = b"unibus-envelope-v1-own-subject\0";
/// Default maximum body size.
pub const DEFAULT_MAX_BODY: usize = 64 * 1024;
/// Default clock-skew window (and so how long nonces are remembered).
pub const DEFAULT_SKEW: Duration = Duration::from_secs(30);
/// Default bound on remembered nonces.
pub const DEFAULT_REPLAY_ENTRIES: usize = 100_000;
/// Room for the fields around the body when the raw size is checked before parsing.
const ENVELOPE_OVERHEAD: usize = 1024;
const NONCE_BYTES: usize = 16;

/// Why an envelope was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("request of {size} bytes is over the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error("malformed envelope: {0}")]
    Malformed(String),
    #[error("request is not signed (no key or sig); sign it with your nkey")]
    Unsigned,
    #[error(
        "unsigned read answered to {reply:?}, not to the claimed key's own inbox (_INBOX.<key>.…); sign it, or connect with that key's inbox prefix"
    )]
    Unbound { reply: String },
    #[error("signature does not verify for the given key")]
    BadSignature,
    #[error(
        "request signed by {key} was sent on {subject_key}'s own subject; send it on the signer's"
    )]
    NotOwnSubject { key: String, subject_key: String },
    #[error("envelope is for operation {got:?}, sent to {expected:?}")]
    OpMismatch { expected: String, got: String },
    #[error(
        "timestamp is {by_ms} ms off the server's clock (positive: ahead); check the client's clock"
    )]
    Skewed { by_ms: i64 },
    #[error("nonce already seen within the replay window; send a fresh request")]
    Replayed,
    #[error("cannot sign: {0}")]
    Sign(String),
}

impl EnvelopeError {
    /// The control-plane error code this maps to (issue 4's typed errors).
    pub fn code(&self) -> &'static str {
        match self {
            EnvelopeError::TooLarge { .. }
            | EnvelopeError::Malformed(_)
            | EnvelopeError::OpMismatch { .. } => "invalid",
            EnvelopeError::Unsigned
            | EnvelopeError::Unbound { .. }
            | EnvelopeError::BadSignature
            | EnvelopeError::NotOwnSubject { .. }
            | EnvelopeError::Skewed { .. }
            | EnvelopeError::Replayed => "unauthenticated",
            EnvelopeError::Sign(_) => "unavailable",
        }
    }
}

/// Verification limits (both are node config; see DESIGN §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted body, in bytes.
    pub max_body: usize,
    /// Largest accepted difference between `ts` and the server's clock, either way.
    pub skew: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body: DEFAULT_MAX_BODY,
            skew: DEFAULT_SKEW,
        }
    }
}

/// The envelope as it travels. Build one with [`Envelope::sign`]; read one with [`verify`]
/// (or [`parse`] when `bus-auth` is off).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub op: String,
    pub body: Box<RawValue>,
    /// Absent (0) only in a minimal read ([`Envelope::minimal`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub ts: u64,
    /// Absent (empty) only in a minimal read.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub nonce: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sig: Option<String>,
}

/// What a verified envelope vouches for.
#[derive(Debug)]
pub struct Verified {
    /// The signer's user nkey (`U…`): the caller's identity.
    pub key: String,
    /// The body, as the exact JSON that was signed.
    pub body: Box<RawValue>,
    /// The request's nonce, for a replay record shared beyond this process; `None` for a
    /// connection-bound read, which needs no replay protection. (The service also drops it
    /// for a write on its signer's own subject under `bus-auth=enforce`.)
    pub nonce: Option<String>,
    /// A minimal read ([`Envelope::minimal`]), whose key came from its reply inbox.
    pub minimal: bool,
}

impl Verified {
    /// Deserializes the body into the operation's request type.
    pub fn body_as<'a, T: Deserialize<'a>>(&'a self) -> Result<T, EnvelopeError> {
        serde_json::from_str(self.body.get()).map_err(|e| EnvelopeError::Malformed(e.to_string()))
    }
}

/// Unix time now, in milliseconds.
pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Where a signed request is sent: the tag its signature is made under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sent {
    /// `unibus.ctl.<op>`: anyone admitted may publish there, so the nonce is claimed.
    Public,
    /// `unibus.ctl.<op>.<key>`: only the key's own connections may publish there.
    OwnSubject,
}

impl Sent {
    fn tag(self) -> &'static [u8] {
        match self {
            Sent::Public => SIGNING_TAG,
            Sent::OwnSubject => OWN_SUBJECT_SIGNING_TAG,
        }
    }
}

/// The bytes that are signed; see the module doc.
pub fn signing_input(
    sent: Sent,
    op: &str,
    body: &[u8],
    ts: u64,
    nonce: &str,
    key: &str,
) -> Vec<u8> {
    fn field(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        out.extend_from_slice(bytes);
    }
    let tag = sent.tag();
    let mut out = Vec::with_capacity(tag.len() + op.len() + nonce.len() + key.len() + 52);
    out.extend_from_slice(tag);
    field(&mut out, op.as_bytes());
    out.extend_from_slice(digest(&SHA256, body).as_ref());
    out.extend_from_slice(&ts.to_be_bytes());
    field(&mut out, nonce.as_bytes());
    field(&mut out, key.as_bytes());
    out
}

impl Envelope {
    /// Signs `body` for operation `op` with the caller's user key, now, with a fresh nonce,
    /// to be sent on the public subject.
    pub fn sign(op: &str, body: &impl Serialize, key: &KeyPair) -> Result<Envelope, EnvelopeError> {
        Envelope::sign_for(Sent::Public, op, body, key)
    }

    /// [`Envelope::sign`] for where the request will be sent.
    pub fn sign_for(
        sent: Sent,
        op: &str,
        body: &impl Serialize,
        key: &KeyPair,
    ) -> Result<Envelope, EnvelopeError> {
        let mut nonce = [0u8; NONCE_BYTES];
        super::random::fill_nonce(&mut nonce).map_err(|e| EnvelopeError::Sign(e.to_string()))?;
        let nonce = URL_SAFE_NO_PAD.encode(nonce);
        Envelope::sign_with(sent, op, body, key, unix_ms_now(), &nonce)
    }

    /// The smallest connection-bound read: operation and body, nothing else. The key is
    /// the one whose inbox the reply goes to ([`verify_read`]). Nodes before
    /// `membership::version::MINIMAL_READS` refuse it as malformed, so the client sends it
    /// only once a node said the cluster takes it.
    pub fn minimal(op: &str, body: &impl Serialize) -> Result<Envelope, EnvelopeError> {
        let body = serde_json::value::to_raw_value(body)
            .map_err(|e| EnvelopeError::Sign(format!("body does not serialize: {e}")))?;
        Ok(Envelope {
            op: op.to_string(),
            body,
            ts: 0,
            nonce: String::new(),
            key: None,
            sig: None,
        })
    }

    /// Whether this is a minimal read ([`Envelope::minimal`]).
    pub fn is_minimal(&self) -> bool {
        self.ts == 0 && self.nonce.is_empty() && self.key.is_none() && self.sig.is_none()
    }

    /// An unsigned, *connection-bound* envelope for a read by `key` (see [`verify_read`]):
    /// the server answers it only to `key`'s own inbox. It costs no signature, which is most
    /// of what a small read costs.
    pub fn bound(op: &str, body: &impl Serialize, key: &str) -> Result<Envelope, EnvelopeError> {
        let mut nonce = [0u8; NONCE_BYTES];
        super::random::fill_nonce(&mut nonce).map_err(|e| EnvelopeError::Sign(e.to_string()))?;
        let body = serde_json::value::to_raw_value(body)
            .map_err(|e| EnvelopeError::Sign(format!("body does not serialize: {e}")))?;
        Ok(Envelope {
            op: op.to_string(),
            body,
            ts: unix_ms_now(),
            nonce: URL_SAFE_NO_PAD.encode(nonce),
            key: Some(key.to_string()),
            sig: None,
        })
    }

    /// [`Envelope::sign`] with a given time and nonce (tests, benchmarks).
    pub fn sign_at(
        op: &str,
        body: &impl Serialize,
        key: &KeyPair,
        ts: u64,
        nonce: &str,
    ) -> Result<Envelope, EnvelopeError> {
        Envelope::sign_with(Sent::Public, op, body, key, ts, nonce)
    }

    fn sign_with(
        sent: Sent,
        op: &str,
        body: &impl Serialize,
        key: &KeyPair,
        ts: u64,
        nonce: &str,
    ) -> Result<Envelope, EnvelopeError> {
        let body = serde_json::value::to_raw_value(body)
            .map_err(|e| EnvelopeError::Sign(format!("body does not serialize: {e}")))?;
        let public = key.public_key();
        let input = signing_input(sent, op, body.get().as_bytes(), ts, nonce, &public);
        let sig = key
            .sign(&input)
            .map_err(|e| EnvelopeError::Sign(e.to_string()))?;
        Ok(Envelope {
            op: op.to_string(),
            body,
            ts,
            nonce: nonce.to_string(),
            key: Some(public),
            sig: Some(URL_SAFE_NO_PAD.encode(sig)),
        })
    }

    /// The JSON bytes to send.
    pub fn to_vec(&self) -> Vec<u8> {
        // Strings, an integer and already-valid raw JSON: serializing cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Size and shape checks only, no signature: for `bus-auth=off`, and the first half of
/// [`verify`].
pub fn parse(raw: &[u8], limits: &Limits) -> Result<Envelope, EnvelopeError> {
    let limit = limits.max_body;
    if raw.len() > limit.saturating_add(ENVELOPE_OVERHEAD) {
        return Err(EnvelopeError::TooLarge {
            size: raw.len(),
            limit,
        });
    }
    let envelope: Envelope =
        serde_json::from_slice(raw).map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
    let body_len = envelope.body.get().len();
    if body_len > limit {
        return Err(EnvelopeError::TooLarge {
            size: body_len,
            limit,
        });
    }
    let op_ok = (1..=64).contains(&envelope.op.len())
        && envelope
            .op
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if !op_ok {
        return Err(EnvelopeError::Malformed(
            "op must be 1-64 characters of [a-z0-9._-]".into(),
        ));
    }
    let nonce_ok = envelope.is_minimal()
        || (16..=64).contains(&envelope.nonce.len())
            && envelope
                .nonce
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !nonce_ok {
        return Err(EnvelopeError::Malformed(
            "nonce must be 16-64 characters of base64url".into(),
        ));
    }
    if let Some(key) = &envelope.key {
        // Checksum and prefix only; the signature check (if any) decodes the point.
        let is_user = crate::membership::ids::user_key("key", key).is_ok_and(|k| &k == key);
        if !is_user {
            return Err(EnvelopeError::Malformed(
                "key is not a user public key (U…)".into(),
            ));
        }
    }
    Ok(envelope)
}

/// Verifies a raw request for operation `expected_op` at time `now_ms` (unix ms). On
/// success the nonce is remembered in `replay`, so the same bytes never verify twice.
pub fn verify(
    raw: &[u8],
    expected_op: &str,
    now_ms: u64,
    replay: &ReplayCache,
    limits: &Limits,
) -> Result<Verified, EnvelopeError> {
    verify_signed(
        Sent::Public,
        parse(raw, limits)?,
        expected_op,
        now_ms,
        replay,
        limits,
    )
}

/// Verifies a request that arrived on `subject_key`'s own subject,
/// `unibus.ctl.<op>.<subject_key>` (see the module doc): as [`verify`], under the
/// own-subject tag, and only if the signer is `subject_key`. The nonce is remembered in
/// `replay` as usual; it needs no claim beyond this process only where the server enforces
/// the subject's permission (`bus-auth=enforce`), which is the caller's to know.
pub fn verify_on_own_subject(
    raw: &[u8],
    expected_op: &str,
    subject_key: &str,
    now_ms: u64,
    replay: &ReplayCache,
    limits: &Limits,
) -> Result<Verified, EnvelopeError> {
    let envelope = parse(raw, limits)?;
    if let Some(key) = envelope.key.as_deref().filter(|k| *k != subject_key) {
        return Err(EnvelopeError::NotOwnSubject {
            key: key.to_string(),
            subject_key: subject_key.to_string(),
        });
    }
    verify_signed(
        Sent::OwnSubject,
        envelope,
        expected_op,
        now_ms,
        replay,
        limits,
    )
}

/// Accepts a write that arrived on `subject_key`'s own subject *without checking its
/// signature*: the server lets only `subject_key`'s connections publish there, so it
/// vouches for the publisher, as it does for connection-bound reads and room messages.
/// The claimed key must be `subject_key`; operation, clock skew and the replay cache are
/// checked as by [`verify_on_own_subject`]. Safe only under `bus-auth=enforce` and once
/// no node of the cluster runs code that grants anyone else that subject (nodes from
/// before own subjects granted `unibus.ctl.>`): the caller checks both
/// (`membership::version`).
pub fn accept_on_own_subject(
    raw: &[u8],
    expected_op: &str,
    subject_key: &str,
    now_ms: u64,
    replay: &ReplayCache,
    limits: &Limits,
) -> Result<Verified, EnvelopeError> {
    let mut envelope = parse(raw, limits)?;
    let key = match envelope.key.take() {
        Some(key) if key == subject_key => key,
        Some(key) => {
            return Err(EnvelopeError::NotOwnSubject {
                key,
                subject_key: subject_key.to_string(),
            });
        }
        None => return Err(EnvelopeError::Unsigned),
    };
    admit(key, envelope, expected_op, now_ms, replay, limits)
}

/// Verifies a request for a read operation (`Op::is_read`) that came with reply subject
/// `reply`. A signed envelope is verified as by [`verify`]. An unsigned one
/// ([`Envelope::bound`]) is accepted for its claimed key only when `reply` is that key's
/// own inbox (`_INBOX.<key>.…`): the authenticator lets only connections of that key
/// subscribe there, so whoever sent it, the answer reaches nobody but the key's holder,
/// and a read changes nothing, so neither a signature nor a nonce adds anything. This
/// holds only where the server enforces the inbox permission (`bus-auth=enforce`).
pub fn verify_read(
    raw: &[u8],
    expected_op: &str,
    reply: Option<&str>,
    now_ms: u64,
    replay: &ReplayCache,
    limits: &Limits,
) -> Result<Verified, EnvelopeError> {
    let envelope = parse(raw, limits)?;
    if envelope.sig.is_some() {
        return verify_signed(Sent::Public, envelope, expected_op, now_ms, replay, limits);
    }
    let minimal = envelope.is_minimal();
    let key = match envelope.key {
        Some(key) => key,
        // A minimal read names no key: the reply inbox does, and only that key's
        // connections can subscribe there (checked below like any other claim).
        None if envelope.is_minimal() => {
            match reply.and_then(crate::membership::api::inbox_owner) {
                Some(owner) => crate::membership::ids::user_key("key", owner).map_err(|_| {
                    EnvelopeError::Malformed("the reply inbox names no user key".into())
                })?,
                None => {
                    return Err(EnvelopeError::Unbound {
                        reply: reply.unwrap_or_default().to_string(),
                    });
                }
            }
        }
        None => return Err(EnvelopeError::Unsigned),
    };
    if envelope.op != expected_op {
        return Err(EnvelopeError::OpMismatch {
            expected: expected_op.to_string(),
            got: envelope.op,
        });
    }
    match reply {
        Some(reply) if crate::membership::api::is_inbox_of(reply, &key) => Ok(Verified {
            key,
            body: envelope.body,
            nonce: None,
            minimal,
        }),
        _ => Err(EnvelopeError::Unbound {
            reply: reply.unwrap_or_default().to_string(),
        }),
    }
}

fn verify_signed(
    sent: Sent,
    mut envelope: Envelope,
    expected_op: &str,
    now_ms: u64,
    replay: &ReplayCache,
    limits: &Limits,
) -> Result<Verified, EnvelopeError> {
    let (Some(key), Some(sig)) = (envelope.key.take(), envelope.sig.take()) else {
        return Err(EnvelopeError::Unsigned);
    };
    let sig = URL_SAFE_NO_PAD
        .decode(sig.as_bytes())
        .map_err(|_| EnvelopeError::BadSignature)?;
    let public = KeyPair::from_public_key(&key).map_err(|_| EnvelopeError::BadSignature)?;
    let input = signing_input(
        sent,
        &envelope.op,
        envelope.body.get().as_bytes(),
        envelope.ts,
        &envelope.nonce,
        &key,
    );
    public
        .verify(&input, &sig)
        .map_err(|_| EnvelopeError::BadSignature)?;
    admit(key, envelope, expected_op, now_ms, replay, limits)
}

/// The checks after the signature (or in its place, see [`accept_on_own_subject`]): the
/// operation, the clock skew, and last the replay cache, so only an envelope that passed
/// everything else uses up a nonce.
fn admit(
    key: String,
    envelope: Envelope,
    expected_op: &str,
    now_ms: u64,
    replay: &ReplayCache,
    limits: &Limits,
) -> Result<Verified, EnvelopeError> {
    if envelope.op != expected_op {
        return Err(EnvelopeError::OpMismatch {
            expected: expected_op.to_string(),
            got: envelope.op,
        });
    }
    let by_ms = envelope.ts as i128 - now_ms as i128;
    if by_ms.unsigned_abs() > limits.skew.as_millis() {
        return Err(EnvelopeError::Skewed {
            by_ms: by_ms.clamp(i64::MIN as i128, i64::MAX as i128) as i64,
        });
    }
    replay.check_and_remember(&key, &envelope.nonce, envelope.ts, now_ms, limits.skew)?;
    Ok(Verified {
        key,
        body: envelope.body,
        nonce: Some(envelope.nonce),
        minimal: false,
    })
}

/// Nonces seen within the skew window, shared by every request handler (thread-safe).
///
/// Memory is bounded twice: entries leave once their envelope's timestamp falls out of the
/// window (they could not pass the skew check again anyway), and the cache never holds more
/// than `max_entries`. When a flood fills it before anything expires, the oldest entry is
/// dropped and its timestamp becomes a *floor*: anything stamped at or before the floor is
/// refused as a possible replay. So a full cache costs slow or old requests a retry, but it
/// never lets a replay through.
pub struct ReplayCache {
    max_entries: usize,
    inner: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    by_ts: BTreeSet<(u64, [u8; 32])>,
    ids: HashSet<[u8; 32]>,
    floor: Option<u64>,
}

impl Default for ReplayCache {
    fn default() -> Self {
        ReplayCache::new(DEFAULT_REPLAY_ENTRIES)
    }
}

impl ReplayCache {
    pub fn new(max_entries: usize) -> Self {
        ReplayCache {
            max_entries: max_entries.max(1),
            inner: Mutex::new(Seen::default()),
        }
    }

    /// How many nonces are remembered now.
    pub fn len(&self) -> usize {
        self.lock().ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        // A panic elsewhere while holding the lock leaves consistent sets behind.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refuses (key, nonce) if seen (or if `ts` is at or below the floor), else remembers it.
    pub fn check_and_remember(
        &self,
        key: &str,
        nonce: &str,
        ts: u64,
        now_ms: u64,
        window: Duration,
    ) -> Result<(), EnvelopeError> {
        let id = {
            let mut bytes = Vec::with_capacity(8 + key.len() + nonce.len());
            bytes.extend_from_slice(&(key.len() as u32).to_be_bytes());
            bytes.extend_from_slice(key.as_bytes());
            bytes.extend_from_slice(&(nonce.len() as u32).to_be_bytes());
            bytes.extend_from_slice(nonce.as_bytes());
            let mut id = [0u8; 32];
            id.copy_from_slice(digest(&SHA256, &bytes).as_ref());
            id
        };
        let oldest_allowed = now_ms.saturating_sub(window.as_millis() as u64);
        let mut seen = self.lock();
        while let Some(&(first_ts, first_id)) = seen.by_ts.first() {
            if first_ts >= oldest_allowed {
                break;
            }
            seen.by_ts.pop_first();
            seen.ids.remove(&first_id);
        }
        if seen.floor.is_some_and(|floor| ts <= floor) || seen.ids.contains(&id) {
            return Err(EnvelopeError::Replayed);
        }
        seen.ids.insert(id);
        seen.by_ts.insert((ts, id));
        while seen.ids.len() > self.max_entries {
            let Some((dropped_ts, dropped_id)) = seen.by_ts.pop_first() else {
                break;
            };
            seen.ids.remove(&dropped_id);
            seen.floor = Some(seen.floor.map_or(dropped_ts, |f| f.max(dropped_ts)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: u64 = 1_767_225_600_000;
    const NONCE: &str = "AAAAAAAAAAAAAAAAAAAAAA";

    fn signed(key: &KeyPair, op: &str, ts: u64, nonce: &str) -> Vec<u8> {
        Envelope::sign_at(op, &json!({"id": "r1"}), key, ts, nonce)
            .unwrap()
            .to_vec()
    }

    fn check(raw: &[u8], op: &str) -> Result<Verified, EnvelopeError> {
        verify(raw, op, NOW, &ReplayCache::default(), &Limits::default())
    }

    /// Re-serializes `raw` after `edit` on its JSON (keeps the body's raw bytes otherwise).
    fn edited(raw: &[u8], edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
        let mut v: serde_json::Value = serde_json::from_slice(raw).unwrap();
        edit(&mut v);
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn an_unsigned_read_is_accepted_only_when_answered_to_the_claimed_keys_inbox() {
        let (me, other) = (KeyPair::new_user(), KeyPair::new_user());
        let raw = Envelope::bound("rooms.get", &json!({"id": "r1"}), &me.public_key())
            .unwrap()
            .to_vec();
        let (cache, limits) = (ReplayCache::default(), Limits::default());
        let read =
            |reply: Option<&str>| verify_read(&raw, "rooms.get", reply, NOW, &cache, &limits);
        let mine = format!("_INBOX.{}.x1.2", me.public_key());
        // Twice: a bound read uses up nothing.
        for _ in 0..2 {
            let ok = read(Some(&mine)).unwrap();
            assert_eq!(ok.key, me.public_key());
            assert_eq!(ok.nonce, None);
        }
        assert!(cache.is_empty());
        let theirs = format!("_INBOX.{}.x1.2", other.public_key());
        for reply in [
            Some(theirs.as_str()),
            Some("_INBOX.abc.1"),
            Some("unibus.x"),
            None,
        ] {
            let e = read(reply).unwrap_err();
            assert!(matches!(e, EnvelopeError::Unbound { .. }), "{reply:?}: {e}");
            assert_eq!(e.code(), "unauthenticated");
        }
        // Bound to another operation than the endpoint's: refused like a signed one.
        assert!(matches!(
            verify_read(&raw, "users.get", Some(&mine), NOW, &cache, &limits),
            Err(EnvelopeError::OpMismatch { .. })
        ));
        // Without a key there is nobody to bind to.
        let keyless = edited(&raw, |v| {
            v.as_object_mut().unwrap().remove("key");
        });
        assert_eq!(
            verify_read(&keyless, "rooms.get", Some(&mine), NOW, &cache, &limits).unwrap_err(),
            EnvelopeError::Unsigned
        );
        // A signed read is checked as a signed request, whatever its reply subject.
        let signed = signed(&me, "rooms.get", NOW, NONCE);
        let ok = verify_read(&signed, "rooms.get", None, NOW, &cache, &limits).unwrap();
        assert_eq!(ok.nonce.as_deref(), Some(NONCE));
        assert_eq!(
            verify_read(&signed, "rooms.get", Some(&mine), NOW, &cache, &limits).unwrap_err(),
            EnvelopeError::Replayed
        );
        let forged = edited(&signed, |v| v["key"] = json!(other.public_key()));
        assert_eq!(
            verify_read(&forged, "rooms.get", Some(&theirs), NOW, &cache, &limits).unwrap_err(),
            EnvelopeError::BadSignature
        );
    }

    #[test]
    fn a_signed_envelope_verifies_once_and_yields_key_and_body() {
        let key = KeyPair::new_user();
        let raw = Envelope::sign("rooms.create", &json!({"id": "r1"}), &key)
            .unwrap()
            .to_vec();
        let cache = ReplayCache::default();
        let now = unix_ms_now();
        let ok = verify(&raw, "rooms.create", now, &cache, &Limits::default()).unwrap();
        assert_eq!(ok.key, key.public_key());
        let body: serde_json::Value = ok.body_as().unwrap();
        assert_eq!(body, json!({"id": "r1"}));
        assert_eq!(cache.len(), 1);
        assert_eq!(
            verify(&raw, "rooms.create", now, &cache, &Limits::default()).unwrap_err(),
            EnvelopeError::Replayed
        );
    }

    /// A minimal read names nothing but its operation: the key is the one whose inbox the
    /// reply goes to. It is a read only, and only bound to a user's inbox; anything else
    /// without a nonce is malformed.
    #[test]
    fn a_minimal_read_takes_its_key_from_the_reply_inbox_and_is_nothing_else() {
        let me = KeyPair::new_user().public_key();
        let (cache, limits, now) = (ReplayCache::default(), Limits::default(), unix_ms_now());
        let raw = Envelope::minimal("rooms.get", &json!({"room": "r1"}))
            .unwrap()
            .to_vec();
        assert_eq!(
            String::from_utf8_lossy(&raw),
            r#"{"op":"rooms.get","body":{"room":"r1"}}"#
        );
        let inbox = format!("_INBOX.{me}.abc.1");
        let ok = verify_read(&raw, "rooms.get", Some(&inbox), now, &cache, &limits).unwrap();
        assert_eq!(
            (ok.key.as_str(), ok.minimal, ok.nonce),
            (me.as_str(), true, None)
        );
        // Not to an inbox, or to one that names no user: refused.
        for reply in [None, Some("reply.somewhere"), Some("_INBOX.notakey.abc")] {
            assert!(
                verify_read(&raw, "rooms.get", reply, now, &cache, &limits).is_err(),
                "{reply:?}"
            );
        }
        // Another operation than the one it was sent to.
        assert!(matches!(
            verify_read(&raw, "users.get", Some(&inbox), now, &cache, &limits),
            Err(EnvelopeError::OpMismatch { .. })
        ));
        // Never a write, on any subject.
        assert_eq!(
            verify(&raw, "rooms.get", now, &cache, &limits).unwrap_err(),
            EnvelopeError::Unsigned
        );
        assert_eq!(
            accept_on_own_subject(&raw, "rooms.get", &me, now, &cache, &limits).unwrap_err(),
            EnvelopeError::Unsigned
        );
        // A key, a timestamp or a signature without a nonce is no minimal read.
        for partial in [
            json!({"op": "rooms.get", "body": {}, "key": me}),
            json!({"op": "rooms.get", "body": {}, "ts": now}),
            json!({"op": "rooms.get", "body": {}, "sig": "AAAA"}),
        ] {
            let raw = serde_json::to_vec(&partial).unwrap();
            assert!(
                matches!(parse(&raw, &limits), Err(EnvelopeError::Malformed(_))),
                "{partial}"
            );
        }
    }

    #[test]
    fn an_own_subject_envelope_verifies_only_there_and_only_for_its_signer() {
        let (me, other) = (KeyPair::new_user(), KeyPair::new_user());
        let (cache, limits, now) = (ReplayCache::default(), Limits::default(), unix_ms_now());
        let body = json!({"room": "r1"});
        let raw = Envelope::sign_for(Sent::OwnSubject, "rooms.create", &body, &me)
            .unwrap()
            .to_vec();
        let mine = me.public_key();
        let theirs = other.public_key();
        let on = |raw: &[u8], subject_key: &str| {
            verify_on_own_subject(raw, "rooms.create", subject_key, now, &cache, &limits)
        };
        // On someone else's subject: refused before the signature is even looked at.
        assert_eq!(
            on(&raw, &theirs).unwrap_err(),
            EnvelopeError::NotOwnSubject {
                key: mine.clone(),
                subject_key: theirs.clone()
            }
        );
        // On the public subject its signature does not verify: a copy cannot get there
        // and find its nonce unclaimed.
        assert_eq!(
            verify(&raw, "rooms.create", now, &cache, &limits).unwrap_err(),
            EnvelopeError::BadSignature
        );
        // Nor does a public envelope on the own subject.
        let public = Envelope::sign("rooms.create", &body, &me).unwrap().to_vec();
        assert_eq!(on(&public, &mine).unwrap_err(), EnvelopeError::BadSignature);
        // On its own subject it verifies, once.
        assert_eq!(on(&raw, &mine).unwrap().key, mine);
        assert_eq!(on(&raw, &mine).unwrap_err(), EnvelopeError::Replayed);
        // A key swapped in to match another subject breaks the signature.
        let swapped = edited(&raw, |v| v["key"] = json!(theirs));
        assert_eq!(
            on(&swapped, &theirs).unwrap_err(),
            EnvelopeError::BadSignature
        );
    }

    #[test]
    fn tampering_with_any_signed_field_breaks_the_signature() {
        let key = KeyPair::new_user();
        let raw = signed(&key, "rooms.create", NOW, NONCE);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("body", edited(&raw, |v| v["body"] = json!({"id": "r2"}))),
            ("ts", edited(&raw, |v| v["ts"] = json!(NOW + 1))),
            (
                "nonce",
                edited(&raw, |v| v["nonce"] = json!("BAAAAAAAAAAAAAAAAAAAAA")),
            ),
            (
                "key",
                edited(&raw, |v| v["key"] = json!(KeyPair::new_user().public_key())),
            ),
            ("sig", edited(&raw, |v| v["sig"] = json!("AAAA"))),
        ];
        for (what, raw) in cases {
            assert_eq!(
                check(&raw, "rooms.create").unwrap_err(),
                EnvelopeError::BadSignature,
                "{what}"
            );
        }
        // The op is signed too: re-labelled for another endpoint it no longer verifies.
        let moved = edited(&raw, |v| v["op"] = json!("users.add"));
        assert_eq!(
            check(&moved, "users.add").unwrap_err(),
            EnvelopeError::BadSignature
        );
        // Whitespace inside the body changes the signed bytes.
        let text = String::from_utf8(raw.clone()).unwrap();
        let spaced = text.replace(r#"{"id":"r1"}"#, r#"{"id": "r1"}"#);
        assert_ne!(spaced, text);
        assert_eq!(
            check(spaced.as_bytes(), "rooms.create").unwrap_err(),
            EnvelopeError::BadSignature
        );
    }

    #[test]
    fn a_valid_envelope_sent_to_another_operation_is_an_op_mismatch() {
        let raw = signed(&KeyPair::new_user(), "rooms.create", NOW, NONCE);
        assert!(matches!(
            check(&raw, "rooms.delete").unwrap_err(),
            EnvelopeError::OpMismatch { .. }
        ));
    }

    #[test]
    fn the_signing_input_is_unambiguous() {
        // Moving bytes between fields changes the input.
        let a = signing_input(Sent::Public, "ab", b"{}", 1, "c", "d");
        let b = signing_input(Sent::Public, "a", b"{}", 1, "bc", "d");
        let c = signing_input(Sent::Public, "a", b"{}", 1, "b", "cd");
        assert_ne!(a, b);
        assert_ne!(b, c);
        assert!(a.starts_with(SIGNING_TAG));
    }

    #[test]
    fn unsigned_skewed_oversized_and_malformed_are_told_apart() {
        let key = KeyPair::new_user();
        let raw = signed(&key, "rooms.create", NOW, NONCE);
        let unsigned = edited(&raw, |v| {
            v.as_object_mut().unwrap().remove("sig");
        });
        assert_eq!(
            check(&unsigned, "rooms.create").unwrap_err(),
            EnvelopeError::Unsigned
        );
        let keyless = edited(&raw, |v| {
            v.as_object_mut().unwrap().remove("key");
        });
        assert_eq!(
            check(&keyless, "rooms.create").unwrap_err(),
            EnvelopeError::Unsigned
        );

        let skew = DEFAULT_SKEW.as_millis() as u64;
        let ahead = signed(&key, "rooms.create", NOW + skew + 1, NONCE);
        assert_eq!(
            check(&ahead, "rooms.create").unwrap_err(),
            EnvelopeError::Skewed {
                by_ms: skew as i64 + 1
            }
        );
        let behind = signed(&key, "rooms.create", NOW - skew - 1, NONCE);
        assert_eq!(
            check(&behind, "rooms.create").unwrap_err(),
            EnvelopeError::Skewed {
                by_ms: -(skew as i64) - 1
            }
        );
        let edge = signed(&key, "rooms.create", NOW - skew, NONCE);
        assert!(check(&edge, "rooms.create").is_ok());

        let big = "x".repeat(DEFAULT_MAX_BODY);
        let raw = Envelope::sign_at("rooms.create", &json!({ "pad": big }), &key, NOW, NONCE)
            .unwrap()
            .to_vec();
        assert!(matches!(
            check(&raw, "rooms.create").unwrap_err(),
            EnvelopeError::TooLarge {
                limit: DEFAULT_MAX_BODY,
                ..
            }
        ));
        let huge = vec![b' '; 10 * DEFAULT_MAX_BODY];
        assert!(matches!(
            check(&huge, "x").unwrap_err(),
            EnvelopeError::TooLarge { .. }
        ));

        let raw = signed(&key, "rooms.create", NOW, NONCE);
        for bad in [
            b"".to_vec(),
            b"[]".to_vec(),
            b"{\"op\":\"rooms.create\"}".to_vec(),
            edited(&raw, |v| v["extra"] = json!(1)),
            edited(&raw, |v| v["ts"] = json!(-1)),
            edited(&raw, |v| v["ts"] = json!("1")),
            edited(&raw, |v| v["op"] = json!("rooms.*")),
            edited(&raw, |v| v["op"] = json!("")),
            edited(&raw, |v| v["nonce"] = json!("short")),
            edited(&raw, |v| v["nonce"] = json!("AAAAAAAAAAAAAAAAAAAA/+==")),
            edited(&raw, |v| {
                v["key"] = json!(KeyPair::new_account().public_key())
            }),
            edited(&raw, |v| v["key"] = json!("UNOTAKEY")),
        ] {
            let err = check(&bad, "rooms.create").unwrap_err();
            assert!(
                matches!(err, EnvelopeError::Malformed(_)),
                "{}: {err}",
                String::from_utf8_lossy(&bad)
            );
        }
        // A duplicate field is refused rather than resolved one way or the other.
        let text = String::from_utf8(raw).unwrap();
        let dup = text.replacen(
            "{\"op\":\"rooms.create\"",
            "{\"op\":\"users.add\",\"op\":\"rooms.create\"",
            1,
        );
        assert!(matches!(
            check(dup.as_bytes(), "rooms.create").unwrap_err(),
            EnvelopeError::Malformed(_)
        ));
    }

    #[test]
    fn error_codes_follow_the_control_plane_vocabulary() {
        assert_eq!(EnvelopeError::Replayed.code(), "unauthenticated");
        assert_eq!(EnvelopeError::Malformed(String::new()).code(), "invalid");
    }

    #[test]
    fn the_replay_cache_forgets_by_time_and_never_admits_a_replay_when_full() {
        let window = Duration::from_secs(30);
        let cache = ReplayCache::new(3);
        cache
            .check_and_remember("k", "n1", NOW, NOW, window)
            .unwrap();
        assert_eq!(
            cache.check_and_remember("k", "n1", NOW, NOW, window),
            Err(EnvelopeError::Replayed)
        );
        // Same nonce, other key: a different request.
        cache
            .check_and_remember("k2", "n1", NOW, NOW, window)
            .unwrap();
        // After the window the entries go (the skew check would stop such a request anyway).
        let later = NOW + 31_000;
        cache
            .check_and_remember("k", "n2", later, later, window)
            .unwrap();
        assert_eq!(cache.len(), 1);

        // Fill past the cap: the oldest is dropped and becomes the floor.
        for (i, ts) in [later + 1, later + 2, later + 3].iter().enumerate() {
            cache
                .check_and_remember("k", &format!("m{i}"), *ts, later, window)
                .unwrap();
        }
        assert_eq!(cache.len(), 3);
        // n2 (ts = later) was dropped; a replay of it is still refused thanks to the floor.
        assert_eq!(
            cache.check_and_remember("k", "n2", later, later, window),
            Err(EnvelopeError::Replayed)
        );
        // Newer requests still get in.
        cache
            .check_and_remember("k", "fresh", later + 10, later, window)
            .unwrap();
    }

    #[test]
    fn the_replay_cache_is_shared_across_threads() {
        let cache = std::sync::Arc::new(ReplayCache::default());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let cache = cache.clone();
                std::thread::spawn(move || {
                    (0..200)
                        .filter(|i| {
                            cache
                                .check_and_remember(
                                    "k",
                                    &format!("n{}", i % 100),
                                    NOW,
                                    NOW,
                                    DEFAULT_SKEW,
                                )
                                .is_ok()
                        })
                        .count()
                })
            })
            .collect();
        let admitted: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(admitted, 100, "each nonce is admitted exactly once");
    }

    /// xorshift64*: a deterministic stream for the fuzz-style tests.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
    }

    #[test]
    fn random_bytes_truncations_and_bit_flips_never_panic_and_never_verify() {
        let key = KeyPair::new_user();
        let raw = signed(&key, "rooms.create", NOW, NONCE);
        assert!(check(&raw, "rooms.create").is_ok());
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);

        for len in 0..raw.len() {
            assert!(
                check(&raw[..len], "rooms.create").is_err(),
                "truncated to {len}"
            );
        }
        for bit in 0..raw.len() * 8 {
            let mut flipped = raw.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(
                check(&flipped, "rooms.create").is_err(),
                "bit {bit} flipped"
            );
        }
        for _ in 0..2000 {
            let len = (rng.next() % 512) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            assert!(check(&bytes, "rooms.create").is_err());
        }
        // Random splices of the valid envelope's own bytes (likelier to be near-valid JSON).
        for _ in 0..2000 {
            let mut bytes = raw.clone();
            for _ in 0..1 + rng.next() % 4 {
                let at = (rng.next() as usize) % bytes.len();
                match rng.next() % 3 {
                    0 => {
                        bytes.remove(at);
                    }
                    1 => bytes.insert(at, raw[(rng.next() as usize) % raw.len()]),
                    _ => bytes[at] = rng.next() as u8,
                }
            }
            // Only whitespace between the fields may change and still verify: the signed
            // content must then be exactly the original's.
            if check(&bytes, "rooms.create").is_ok() {
                let (a, b) = (
                    parse(&bytes, &Limits::default()).unwrap(),
                    parse(&raw, &Limits::default()).unwrap(),
                );
                assert_eq!(
                    (a.op, a.body.get(), a.ts, a.nonce, a.key, a.sig),
                    (b.op, b.body.get(), b.ts, b.nonce, b.key, b.sig),
                    "{}",
                    String::from_utf8_lossy(&bytes)
                );
            }
        }
    }
}
