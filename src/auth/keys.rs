//! Nkeys on disk: making them, writing them safely, reading them back.
//!
//! Every identity in unibus is an nkey (ed25519): endpoints and admins are user keys
//! (`U…`), the callout issuer is an account key (`A…`). A seed is the private half, so it
//! is written the way every private key in this crate is written, by [`write_secret`] or
//! [`create_secret`]:
//!
//! - the file is *created* with mode 0600, never chmod-ed afterwards, so there is no moment
//!   when another user could open it;
//! - the bytes go to a temp file in the same directory, are fsync-ed, then moved into place
//!   by one rename (or one hard link for [`create_secret`]), so a crash leaves either the
//!   old file or the new one, never half a key.
//!
//! Reading checks the seed's kind: a user seed where an account seed is expected (or the
//! other way round) is refused with [`KeyError::WrongKind`] instead of failing later with a
//! puzzling signature error. A seed readable by group or others is still used, with a
//! warning: refusing would lock an operator out over a fixable permission.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nkeys::{KeyPair, KeyPairType};

/// Mode of every private file this crate writes.
pub const SECRET_MODE: u32 = 0o600;

/// What went wrong with a key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "{path}: no such file (user seeds come from `unibus keygen`, cluster seeds from `unibus cluster init`)"
    )]
    Missing { path: PathBuf },
    #[error("{path}: already exists; refusing to overwrite a private key (move it away first)")]
    Exists { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not an nkey seed ({detail}); a seed is one line starting with `S`")]
    NotSeed { path: PathBuf, detail: String },
    #[error("{path}: holds {found} seed, expected {expected} seed")]
    WrongKind {
        path: PathBuf,
        expected: &'static str,
        found: &'static str,
    },
}

impl KeyError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        KeyError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The kind of nkey a seed must be, in the words an operator reads.
pub fn kind_name(kind: &KeyPairType) -> &'static str {
    match kind {
        KeyPairType::User => "a user (U…)",
        KeyPairType::Account => "an account (A…)",
        KeyPairType::Operator => "an operator (O…)",
        KeyPairType::Server => "a server (N…)",
        KeyPairType::Cluster => "a cluster (C…)",
        KeyPairType::Module => "a module",
        KeyPairType::Service => "a service",
        KeyPairType::Curve => "a curve (X…)",
    }
}

/// A fresh user nkey (an endpoint's or an admin's identity).
pub fn generate_user() -> KeyPair {
    KeyPair::new_user()
}

/// Generates a user nkey and writes its seed to `path` (0600, refusing to overwrite).
/// Returns the key pair; its public key (`U…`) is what goes into the store.
pub fn generate_user_seed_file(path: &Path) -> Result<KeyPair, KeyError> {
    let key = generate_user();
    write_seed(path, &key)?;
    Ok(key)
}

/// Writes `key`'s seed to `path` (0600, refusing to overwrite an existing file).
pub fn write_seed(path: &Path, key: &KeyPair) -> Result<(), KeyError> {
    let seed = key.seed().map_err(|e| KeyError::NotSeed {
        path: path.to_path_buf(),
        detail: format!("the key pair has no seed: {e}"),
    })?;
    create_secret(path, format!("{seed}\n").as_bytes())
}

/// Reads a user seed (`SU…`).
pub fn read_user_seed(path: &Path) -> Result<KeyPair, KeyError> {
    read_seed(path, KeyPairType::User)
}

/// Reads an account seed (`SA…`), such as the callout issuer's.
pub fn read_account_seed(path: &Path) -> Result<KeyPair, KeyError> {
    read_seed(path, KeyPairType::Account)
}

/// Reads a seed file and checks it is of the `expected` kind. Surrounding whitespace is
/// ignored. Logs a warning when the file is readable by group or others.
pub fn read_seed(path: &Path, expected: KeyPairType) -> Result<KeyPair, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => KeyError::Missing {
            path: path.to_path_buf(),
        },
        std::io::ErrorKind::InvalidData => KeyError::NotSeed {
            path: path.to_path_buf(),
            detail: "not UTF-8 text".into(),
        },
        _ => KeyError::io(path, e),
    })?;
    if let Some(mode) = loose_mode(path) {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{mode:o}"),
            "private key is readable by other users; run chmod 600 on it"
        );
    }
    let key = KeyPair::from_seed(text.trim()).map_err(|e| KeyError::NotSeed {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    let found = key.key_pair_type();
    if found != expected {
        return Err(KeyError::WrongKind {
            path: path.to_path_buf(),
            expected: kind_name(&expected),
            found: kind_name(&found),
        });
    }
    Ok(key)
}

/// The file's permission bits if group or others may read or write it.
pub fn loose_mode(path: &Path) -> Option<u32> {
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then_some(mode)
}

/// Writes private bytes to `path` atomically with mode 0600, replacing any existing file.
pub fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
    let tmp = write_temp(path, bytes, SECRET_MODE)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        KeyError::io(path, e)
    })?;
    sync_parent(path);
    Ok(())
}

/// Like [`write_secret`] but fails with [`KeyError::Exists`] if `path` exists: the new file
/// appears by a hard link, which (unlike rename) never replaces, so two racing writers
/// cannot silently clobber each other's key.
pub fn create_secret(path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
    create_with_mode(path, bytes, SECRET_MODE)
}

/// [`create_secret`] with another mode: public material (certificates, manifests) is 0644.
pub(crate) fn create_with_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeyError> {
    if path.exists() {
        return Err(KeyError::Exists {
            path: path.to_path_buf(),
        });
    }
    let tmp = write_temp(path, bytes, mode)?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            sync_parent(path);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(KeyError::Exists {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(KeyError::io(path, e)),
    }
}

/// Creates a uniquely named temp file (with `mode` from the start) beside `path`, writes
/// and fsyncs `bytes`.
fn write_temp(path: &Path, bytes: &[u8], mode: u32) -> Result<PathBuf, KeyError> {
    let name = path
        .file_name()
        .ok_or_else(|| {
            KeyError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
            )
        })?
        .to_string_lossy();
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut suffix = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut suffix)
        .map_err(|_| KeyError::io(path, std::io::Error::other("no system randomness")))?;
    let suffix: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = dir.join(format!(".{name}.{suffix}.tmp"));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()
    })();
    match result {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(KeyError::io(path, e))
        }
    }
}

/// Makes the rename durable (best effort: some file systems refuse to fsync a directory).
fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_generated_seed_is_0600_and_reads_back_as_the_same_user() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("me.seed");
        let key = generate_user_seed_file(&path).unwrap();
        assert!(key.public_key().starts_with('U'));
        assert_eq!(mode(&path), 0o600);
        let back = read_user_seed(&path).unwrap();
        assert_eq!(back.public_key(), key.public_key());
        // No temp files left beside it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn create_secret_never_overwrites_but_write_secret_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        create_secret(&path, b"one").unwrap();
        assert!(matches!(
            create_secret(&path, b"two"),
            Err(KeyError::Exists { .. })
        ));
        assert!(matches!(
            generate_user_seed_file(&path),
            Err(KeyError::Exists { .. })
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        write_secret(&path, b"three").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"three");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn reading_reports_missing_garbage_and_the_wrong_kind() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        assert!(matches!(
            read_user_seed(&missing),
            Err(KeyError::Missing { .. })
        ));

        let garbage = dir.path().join("garbage");
        write_secret(&garbage, b"hello\n").unwrap();
        assert!(matches!(
            read_user_seed(&garbage),
            Err(KeyError::NotSeed { .. })
        ));

        let public = dir.path().join("public");
        write_secret(&public, generate_user().public_key().as_bytes()).unwrap();
        assert!(matches!(
            read_user_seed(&public),
            Err(KeyError::NotSeed { .. })
        ));

        let account = dir.path().join("account");
        write_seed(&account, &KeyPair::new_account()).unwrap();
        let err = read_user_seed(&account).unwrap_err();
        assert!(matches!(err, KeyError::WrongKind { .. }), "{err}");
        assert!(err.to_string().contains("account"));
        assert!(read_account_seed(&account).is_ok());
    }

    #[test]
    fn a_loose_mode_is_noticed_but_the_seed_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loose");
        let key = generate_user_seed_file(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(loose_mode(&path), Some(0o644));
        assert_eq!(
            read_user_seed(&path).unwrap().public_key(),
            key.public_key()
        );
    }
}

/// Domain-separation tag for keys derived from another key's seed.
const DERIVE_TAG: &[u8] = b"unibus-derived-key-v1\0";

/// The 32 bytes a derived key is made from: SHA-256 over a tag, the purpose and the parent
/// seed. One-way, so a derived key reveals nothing about its parent.
fn derived_bytes(parent: &KeyPair, purpose: &str) -> Result<[u8; 32], nkeys::error::Error> {
    let seed = parent.seed()?;
    let mut input = Vec::with_capacity(DERIVE_TAG.len() + purpose.len() + seed.len() + 1);
    input.extend_from_slice(DERIVE_TAG);
    input.extend_from_slice(purpose.as_bytes());
    input.push(0);
    input.extend_from_slice(seed.as_bytes());
    let digest = ring::digest::digest(&ring::digest::SHA256, &input);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    Ok(out)
}

/// A user key derived deterministically from `parent`'s seed for one `purpose`.
///
/// Why derive rather than write another seed file: every node computes the same key from
/// the secrets it already shares (so the rendered nats-server configs agree), and existing
/// secrets directories keep working without a new file. The node's `APP` identity (see
/// `node::security`) is `derive_user(service, "app")`.
pub fn derive_user(parent: &KeyPair, purpose: &str) -> Result<KeyPair, nkeys::error::Error> {
    KeyPair::new_from_raw(KeyPairType::User, derived_bytes(parent, purpose)?)
}

/// The curve (x25519) key an endpoint uses for end-to-end encrypted rooms, derived from
/// its user seed: the same seed file gives the same xkey on every machine, so there is no
/// second private file to create, back up or lose.
pub fn derive_xkey(user: &KeyPair) -> Result<nkeys::XKey, nkeys::error::Error> {
    Ok(nkeys::XKey::new_from_raw(derived_bytes(user, "xkey")?))
}

#[cfg(test)]
mod derive_tests {
    use super::*;

    #[test]
    fn derived_keys_are_stable_distinct_and_of_the_right_kind() {
        let parent = KeyPair::new_user();
        let a = derive_user(&parent, "app").unwrap();
        assert_eq!(
            a.public_key(),
            derive_user(&parent, "app").unwrap().public_key()
        );
        assert_eq!(a.key_pair_type(), KeyPairType::User);
        assert_ne!(
            a.public_key(),
            derive_user(&parent, "other").unwrap().public_key()
        );
        assert_ne!(a.public_key(), parent.public_key());
        let x = derive_xkey(&parent).unwrap();
        assert!(x.public_key().starts_with('X'));
        assert_eq!(x.public_key(), derive_xkey(&parent).unwrap().public_key());
    }
}
