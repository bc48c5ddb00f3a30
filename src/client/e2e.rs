//! End-to-end encrypted rooms: what is sealed, with which key, and who can open it.
//!
//! # Keys
//!
//! - Every endpoint has a curve25519 **xkey** (nkeys `XKey`), derived from its user seed
//!   (`auth::keys::derive_xkey`), and registers the public half (`X…`) on its user record
//!   (`users.xkey`). No file beyond the seed; the same seed gives the same xkey anywhere.
//! - A room has one random 256-bit **room key per epoch**. The owner makes it and *wraps* it
//!   for each member: `XKey::seal` (x25519 + XSalsa20-Poly1305, authenticated by the
//!   owner's xkey) over `"unibus-roomkey-v1\0" room "\0" key`. The epoch's `material` in the
//!   store is [`Material`], JSON: `{"v":1,"by":"X…owner","keys":{"U…member":"<base64>"}}`.
//!   The store and the nodes only ever see wrapped keys.
//! - A new epoch is made when the room is created, when a member is invited or removed, on
//!   `rekey`, and by the owner's client before it sends whenever the latest epoch's
//!   recipients differ from the members' registered xkeys (someone joined, left, or
//!   registered late). So a removed member is never wrapped into a later epoch, and members
//!   keep reading the epochs they were wrapped into.
//!
//! # Messages
//!
//! A body is `"UBE1" || epoch (u32 BE) || nonce (12) || ChaCha20-Poly1305(plaintext)`
//! with a fresh random nonce per message, and associated data
//! `"unibus-room-v1\0" room "\0" epoch (u32 BE) sender`: a ciphertext moved to another room,
//! epoch or sender subject fails to open. An unknown epoch, a key not wrapped for the reader
//! or a tampered byte is a typed [`CryptoError`], never a panic.
//!
//! Nonces are drawn from the kernel's random generator like every other random byte here,
//! but in batches per thread (`auth::random`): one `getrandom(2)` per message cost more
//! than sealing a 1 KiB body, and live sends seal at NATS speed. A nonce is public (it
//! travels in the body); all that matters is that none repeats under a key.
//!
//! Trust: the room key authenticates *membership*, not the individual sender (any member
//! could seal under another member's name); the sender name is vouched for by the server
//! (the subject's last token, see `membership::history`).

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::aead::{self, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 4] = b"UBE1";
const NONCE_LEN: usize = 12;
const HEADER_LEN: usize = 4 + 4 + NONCE_LEN;
const AAD_TAG: &[u8] = b"unibus-room-v1\0";
const WRAP_TAG: &[u8] = b"unibus-roomkey-v1\0";

/// Why an encrypted message or room key could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("room {room}: key epoch {epoch} does not exist")]
    UnknownEpoch { room: String, epoch: u32 },
    #[error(
        "room {room}: key epoch {epoch} is not wrapped for you (you were not a member then, or registered your xkey later)"
    )]
    NotForYou { room: String, epoch: u32 },
    #[error(
        "room {room}: a message of epoch {epoch} failed authentication (tampered, or sealed for another room, epoch or sender)"
    )]
    Tampered { room: String, epoch: u32 },
    #[error("room {room}: {reason}")]
    Malformed { room: String, reason: String },
    #[error("room {room} has no key yet; its owner runs `unibus room rekey {room}`")]
    NoKey { room: String },
    #[error("the system random number generator failed")]
    Random,
}

/// One epoch's room key, unwrapped (lives only in the client's memory).
#[derive(Clone)]
pub struct RoomSecret([u8; 32]);

impl std::fmt::Debug for RoomSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RoomSecret(..)")
    }
}

impl RoomSecret {
    /// A fresh random key.
    pub fn generate() -> Result<RoomSecret, CryptoError> {
        let mut key = [0u8; 32];
        crate::auth::fill_random(&mut key).map_err(|_| CryptoError::Random)?;
        Ok(RoomSecret(key))
    }

    /// The raw key (for tools and tests that check it never leaks; never send it anywhere).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn aead(&self, room: &str) -> Result<LessSafeKey, CryptoError> {
        UnboundKey::new(&CHACHA20_POLY1305, &self.0)
            .map(LessSafeKey::new)
            .map_err(|_| CryptoError::Malformed {
                room: room.into(),
                reason: "room key is not a ChaCha20-Poly1305 key".into(),
            })
    }
}

/// An epoch's key material as stored: the room key wrapped for each member.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Material {
    pub v: u32,
    /// The wrapper's xkey (`X…`): recipients open with it.
    pub by: String,
    /// Member user key → base64 of `XKey::seal`.
    pub keys: BTreeMap<String, String>,
}

impl Material {
    pub fn parse(room: &str, bytes: &[u8]) -> Result<Material, CryptoError> {
        serde_json::from_slice(bytes).map_err(|e| CryptoError::Malformed {
            room: room.into(),
            reason: format!("key material is not unibus v1 wrapped keys: {e}"),
        })
    }
}

fn wrap_input(room: &str, secret: &RoomSecret) -> Vec<u8> {
    let mut input = Vec::with_capacity(WRAP_TAG.len() + room.len() + 33);
    input.extend_from_slice(WRAP_TAG);
    input.extend_from_slice(room.as_bytes());
    input.push(0);
    input.extend_from_slice(&secret.0);
    input
}

/// Wraps `secret` for each `(user key, xkey)` recipient, as `by`.
pub fn wrap(
    room: &str,
    secret: &RoomSecret,
    by: &nkeys::XKey,
    recipients: &[(String, String)],
) -> Result<Vec<u8>, CryptoError> {
    let malformed = |reason: String| CryptoError::Malformed {
        room: room.into(),
        reason,
    };
    let input = wrap_input(room, secret);
    let mut keys = BTreeMap::new();
    for (user, xkey) in recipients {
        let recipient = nkeys::XKey::from_public_key(xkey)
            .map_err(|e| malformed(format!("{user} has an invalid xkey {xkey}: {e}")))?;
        let sealed = by
            .seal(&input, &recipient)
            .map_err(|e| malformed(format!("cannot wrap for {user}: {e}")))?;
        keys.insert(user.clone(), STANDARD.encode(sealed));
    }
    let material = Material {
        v: 1,
        by: by.public_key(),
        keys,
    };
    serde_json::to_vec(&material).map_err(|e| malformed(e.to_string()))
}

/// Opens the room key wrapped for `me` in an epoch's `material`.
pub fn unwrap(
    room: &str,
    epoch: u32,
    material: &[u8],
    me: &str,
    mine: &nkeys::XKey,
) -> Result<RoomSecret, CryptoError> {
    let material = Material::parse(room, material)?;
    let not_for_you = || CryptoError::NotForYou {
        room: room.into(),
        epoch,
    };
    let sealed = material.keys.get(me).ok_or_else(not_for_you)?;
    let sealed = STANDARD.decode(sealed).map_err(|_| not_for_you())?;
    let sender = nkeys::XKey::from_public_key(&material.by).map_err(|_| not_for_you())?;
    let opened = mine.open(&sealed, &sender).map_err(|_| not_for_you())?;
    let prefix_len = WRAP_TAG.len() + room.len() + 1;
    if opened.len() != prefix_len + 32
        || opened[..prefix_len] != wrap_input(room, &RoomSecret([0; 32]))[..prefix_len]
    {
        return Err(not_for_you());
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(&opened[prefix_len..]);
    Ok(RoomSecret(key))
}

/// The user keys an epoch's material is wrapped for.
pub fn recipients(room: &str, material: &[u8]) -> Result<Vec<String>, CryptoError> {
    Ok(Material::parse(room, material)?.keys.into_keys().collect())
}

/// The associated data of a message: `AAD_TAG room \0 epoch sender`. Built per message on
/// the send and receive paths, so it lives on the stack when it fits (any valid room id and
/// user key do: 15 + 63 + 1 + 4 + 56 bytes), on the heap otherwise.
enum MessageAad {
    Inline([u8; AAD_INLINE], usize),
    Heap(Vec<u8>),
}

const AAD_INLINE: usize = 160;

impl AsRef<[u8]> for MessageAad {
    fn as_ref(&self) -> &[u8] {
        match self {
            MessageAad::Inline(buf, len) => &buf[..*len],
            MessageAad::Heap(v) => v,
        }
    }
}

fn aad(room: &str, epoch: u32, sender: &str) -> MessageAad {
    let parts: [&[u8]; 5] = [
        AAD_TAG,
        room.as_bytes(),
        &[0],
        &epoch.to_be_bytes(),
        sender.as_bytes(),
    ];
    let len: usize = parts.iter().map(|p| p.len()).sum();
    if len <= AAD_INLINE {
        let mut buf = [0u8; AAD_INLINE];
        let mut at = 0;
        for part in parts {
            buf[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        MessageAad::Inline(buf, len)
    } else {
        MessageAad::Heap(parts.concat())
    }
}

/// A fresh random nonce (drawn in batches: see `auth::random`).
fn fresh_nonce() -> Result<[u8; NONCE_LEN], CryptoError> {
    let mut nonce = [0u8; NONCE_LEN];
    crate::auth::random::fill_nonce(&mut nonce).map_err(|_| CryptoError::Random)?;
    Ok(nonce)
}

/// Seals `plaintext` for `room` at `epoch` as `sender`.
pub fn seal(
    secret: &RoomSecret,
    room: &str,
    epoch: u32,
    sender: &str,
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let nonce = fresh_nonce()?;
    // One buffer, sealed in place: the header, then the plaintext encrypted where it lies,
    // then the tag (a send path runs this per message; no intermediate copies).
    let mut out = Vec::with_capacity(HEADER_LEN + plaintext.len() + aead::MAX_TAG_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&epoch.to_be_bytes());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let tag = secret
        .aead(room)?
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(room, epoch, sender)),
            &mut out[HEADER_LEN..],
        )
        .map_err(|_| CryptoError::Malformed {
            room: room.into(),
            reason: "message too large to seal".into(),
        })?;
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

/// The epoch a sealed body names.
pub fn epoch_of(room: &str, body: &[u8]) -> Result<u32, CryptoError> {
    if body.len() < HEADER_LEN + aead::MAX_TAG_LEN || &body[..4] != MAGIC {
        return Err(CryptoError::Malformed {
            room: room.into(),
            reason: "message is not an encrypted unibus body (UBE1)".into(),
        });
    }
    let mut epoch = [0u8; 4];
    epoch.copy_from_slice(&body[4..8]);
    Ok(u32::from_be_bytes(epoch))
}

/// Opens a sealed body from `sender` in `room` with its epoch's `secret`.
pub fn open(
    secret: &RoomSecret,
    room: &str,
    sender: &str,
    body: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let epoch = epoch_of(room, body)?;
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&body[8..HEADER_LEN]);
    // Opened in place in the one copy a caller gets back; the tag is cut off after.
    let mut buf = body[HEADER_LEN..].to_vec();
    let plain_len = secret
        .aead(room)?
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(room, epoch, sender)),
            &mut buf,
        )
        .map_err(|_| CryptoError::Tampered {
            room: room.into(),
            epoch,
        })?
        .len();
    buf.truncate(plain_len);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_body_opens_only_unchanged_in_its_room_epoch_and_sender() {
        let secret = RoomSecret::generate().unwrap();
        let body = seal(&secret, "r1", 3, "UA", b"attack at dawn").unwrap();
        assert!(!body.windows(6).any(|w| w == b"attack"));
        assert_eq!(epoch_of("r1", &body).unwrap(), 3);
        assert_eq!(open(&secret, "r1", "UA", &body).unwrap(), b"attack at dawn");
        let tampered = |e: CryptoError| matches!(e, CryptoError::Tampered { .. });
        assert!(tampered(open(&secret, "r2", "UA", &body).unwrap_err()));
        assert!(tampered(open(&secret, "r1", "UB", &body).unwrap_err()));
        let mut flipped = body.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(tampered(open(&secret, "r1", "UA", &flipped).unwrap_err()));
        let mut other_epoch = body.clone();
        other_epoch[7] = 4;
        assert!(tampered(
            open(&secret, "r1", "UA", &other_epoch).unwrap_err()
        ));
        let other = RoomSecret::generate().unwrap();
        assert!(tampered(open(&other, "r1", "UA", &body).unwrap_err()));
        for junk in [&b""[..], b"UBE1", b"plain text that is long enough to pass"] {
            assert!(matches!(
                open(&secret, "r1", "UA", junk),
                Err(CryptoError::Malformed { .. })
            ));
        }
        // Fresh nonce per message.
        assert_ne!(
            body,
            seal(&secret, "r1", 3, "UA", b"attack at dawn").unwrap()
        );
    }

    #[test]
    fn associated_data_is_the_same_on_the_stack_and_on_the_heap() {
        let expected = |room: &str, sender: &str| {
            let mut v = AAD_TAG.to_vec();
            v.extend_from_slice(room.as_bytes());
            v.push(0);
            v.extend_from_slice(&7u32.to_be_bytes());
            v.extend_from_slice(sender.as_bytes());
            v
        };
        let short = aad("r1", 7, "UA");
        assert!(matches!(short, MessageAad::Inline(..)));
        assert_eq!(short.as_ref(), expected("r1", "UA"));
        let long_sender = "U".repeat(200);
        let long = aad("r1", 7, &long_sender);
        assert!(matches!(long, MessageAad::Heap(_)));
        assert_eq!(long.as_ref(), expected("r1", &long_sender));
        // Either way a body sealed with one opens with the other.
        let secret = RoomSecret::generate().unwrap();
        let body = seal(&secret, "r1", 7, &long_sender, b"x").unwrap();
        assert_eq!(open(&secret, "r1", &long_sender, &body).unwrap(), b"x");
    }

    #[test]
    fn a_room_key_unwraps_only_for_its_recipients_and_room() {
        let owner = nkeys::XKey::new();
        let bob = nkeys::XKey::new();
        let eve = nkeys::XKey::new();
        let secret = RoomSecret::generate().unwrap();
        let material = wrap(
            "r1",
            &secret,
            &owner,
            &[
                ("UOWNER".into(), owner.public_key()),
                ("UBOB".into(), bob.public_key()),
            ],
        )
        .unwrap();
        let text = String::from_utf8(material.clone()).unwrap();
        assert!(!text.contains(&STANDARD.encode(secret.0)));
        let got = unwrap("r1", 1, &material, "UBOB", &bob).unwrap();
        assert_eq!(got.0, secret.0);
        assert_eq!(
            unwrap("r1", 1, &material, "UOWNER", &owner).unwrap().0,
            secret.0
        );
        let not_for =
            |r: Result<RoomSecret, CryptoError>| matches!(r, Err(CryptoError::NotForYou { .. }));
        assert!(not_for(unwrap("r1", 1, &material, "UEVE", &eve)));
        assert!(not_for(unwrap("r1", 1, &material, "UBOB", &eve)));
        assert!(not_for(unwrap("r2", 1, &material, "UBOB", &bob)));
        assert!(matches!(
            unwrap("r1", 1, b"{}", "UBOB", &bob),
            Err(CryptoError::Malformed { .. })
        ));
        assert_eq!(recipients("r1", &material).unwrap(), vec!["UBOB", "UOWNER"]);
    }
}
