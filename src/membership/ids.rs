//! Validation of the identifiers that become SQL parameters, KV keys and subject tokens.
//!
//! Both backends call these functions first, before a value reaches SQLite or NATS. A room
//! id is a subject token (`unibus.room.<room>.>`) and a KV key token (`members:
//! <room>.<endpoint>`): a `.`, `*`, `>` or space in it would be subject injection, so the
//! alphabet is closed (`^[a-z0-9][a-z0-9_-]{0,62}$`). A user key is an nkey user public key
//! (`U…`, 56 characters, CRC16 checksum verified); it is normalised to upper case so the
//! same key typed in lower case names the same user.

use super::StoreError;

/// Longest room id accepted (the regex's `{0,62}` plus the first character).
pub const MAX_ROOM_ID_LEN: usize = 63;

/// Checks a room id against `^[a-z0-9][a-z0-9_-]{0,62}$` and returns it unchanged.
pub fn room_id(id: &str) -> Result<&str, StoreError> {
    let invalid = |reason: String| StoreError::Invalid {
        field: "room",
        reason,
    };
    let Some(first) = id.bytes().next() else {
        return Err(invalid(
            "the room id is empty; use 1 to 63 characters of a-z, 0-9, '_' or '-'".into(),
        ));
    };
    if id.len() > MAX_ROOM_ID_LEN {
        return Err(invalid(format!(
            "the room id is {} bytes long; the limit is {MAX_ROOM_ID_LEN}",
            id.len()
        )));
    }
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return Err(invalid(format!(
            "room id {id:?} must start with a-z or 0-9"
        )));
    }
    if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_' || *c == '-'))
    {
        return Err(invalid(format!(
            "room id {id:?} contains {bad:?}; only a-z, 0-9, '_' and '-' are allowed"
        )));
    }
    Ok(id)
}

/// The prefix byte of a user nkey (nkeys' `PREFIX_BYTE_USER`: the 'U').
const USER_PREFIX: u8 = 20 << 3;

/// Checks that `key` is an nkey *user* public key with a valid checksum and returns it in
/// upper case. `field` names the argument in the error (`user`, `endpoint`, `owner`, ...).
pub fn user_key(field: &'static str, key: &str) -> Result<String, StoreError> {
    let invalid = |reason: String| StoreError::Invalid { field, reason };
    if !key.is_ascii() {
        return Err(invalid(format!(
            "{key:?} is not an nkey: it contains non-ASCII characters"
        )));
    }
    let upper = key.to_ascii_uppercase();
    if !upper.starts_with('U') {
        return Err(invalid(format!(
            "{key:?} is not a user public key: user nkeys start with 'U' (generate one with `unibus keygen`)"
        )));
    }
    // Length, base32, checksum and prefix: everything but decompressing the curve point,
    // which `KeyPair::from_public_key` also does and which costs more than the rest of a
    // store read. A checksummed key that is not a point cannot verify a signature, so it
    // can never authenticate; it is only refused later.
    match nkeys::from_public_key(&upper) {
        Ok((USER_PREFIX, _)) => Ok(upper),
        Ok(_) => Err(invalid(format!("{key:?} is not a user public key"))),
        Err(err) => Err(invalid(format!(
            "{key:?} is not a valid nkey user public key ({err}); expected 56 characters starting with 'U'"
        ))),
    }
}

/// Checks a curve (xkey) public key for end-to-end encryption (`X…`, checksum verified);
/// returns it upper case.
pub fn xkey(field: &'static str, key: &str) -> Result<String, StoreError> {
    let invalid = |reason: String| StoreError::Invalid { field, reason };
    let upper = key.to_ascii_uppercase();
    if !key.is_ascii() || !upper.starts_with('X') {
        return Err(invalid(format!(
            "{key:?} is not a curve public key: xkeys start with 'X'"
        )));
    }
    match nkeys::XKey::from_public_key(&upper) {
        Ok(_) => Ok(upper),
        Err(err) => Err(invalid(format!(
            "{key:?} is not a valid xkey public key ({err})"
        ))),
    }
}

/// Checks a room-key epoch: epochs start at 1.
pub fn epoch(epoch: u32) -> Result<u32, StoreError> {
    if epoch == 0 {
        return Err(StoreError::Invalid {
            field: "epoch",
            reason: "epoch 0 does not exist; room key epochs start at 1".into(),
        });
    }
    Ok(epoch)
}

/// Checks a display name (user or room): non-empty after trimming, at most 256 bytes, no
/// control characters. Names are data, never keys, so any other text is fine.
pub fn name(field: &'static str, name: &str) -> Result<String, StoreError> {
    let trimmed = name.trim();
    let invalid = |reason: String| StoreError::Invalid { field, reason };
    if trimmed.is_empty() {
        return Err(invalid(
            "the name is empty; give a short human-readable name".into(),
        ));
    }
    if trimmed.len() > 256 {
        return Err(invalid(format!(
            "the name is {} bytes long; the limit is 256",
            trimmed.len()
        )));
    }
    if trimmed.chars().any(char::is_control) {
        return Err(invalid(format!(
            "name {trimmed:?} contains control characters"
        )));
    }
    Ok(trimmed.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_ids() {
        for ok in ["a", "0", "room-1", "a_b", &"x".repeat(63)] {
            assert!(room_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "*",
            ">",
            "a b",
            "a.b",
            "-a",
            "_a",
            "Room",
            "é",
            "a*",
            &"x".repeat(64),
        ] {
            assert!(
                matches!(room_id(bad), Err(StoreError::Invalid { field: "room", .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn user_keys() {
        let key = nkeys::KeyPair::new_user().public_key();
        assert_eq!(user_key("user", &key).unwrap(), key);
        assert_eq!(user_key("user", &key.to_lowercase()).unwrap(), key);
        let account = nkeys::KeyPair::new_account().public_key();
        assert!(user_key("user", &account).is_err());
        let mut broken = key.clone().into_bytes();
        broken[10] = if broken[10] == b'A' { b'B' } else { b'A' };
        assert!(user_key("user", std::str::from_utf8(&broken).unwrap()).is_err());
        assert!(user_key("user", "").is_err());
        assert!(user_key("user", "U").is_err());
        assert!(user_key("user", "Ü").is_err());
    }
}
