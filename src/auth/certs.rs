//! Cluster secrets: everything the nodes of one cluster share, written once.
//!
//! `unibus cluster init` calls [`init_cluster`]; a single node started without secrets
//! calls [`dev_secrets`] on first boot. Both produce the same directory:
//!
//! | file | mode | what |
//! |---|---|---|
//! | `ca.crt`, `ca.key` | 0644, 0600 | the project's own CA (ECDSA P-256, rcgen); clients pin `ca.crt` |
//! | `NODE.crt`, `NODE.key` | 0644, 0600 | per node; SANs: node name, every `--hosts` entry, `localhost`, `127.0.0.1`; extended key usage server *and* client auth, so routes can do mutual TLS with the same pair |
//! | `issuer.seed` | 0600 | the auth-callout issuer, an account nkey (`A…`): signs every admission, shared by all nodes so any node may answer any server's callout |
//! | `service.seed` | 0600 | the nodes' service user (`U…`), listed in `auth_users`: bypasses the callout to reach the store |
//! | `admin.seed` | 0600 | the bootstrap admin user (`U…`), made an admin in the store on first boot |
//! | `system.seed` | 0600 | the system-account user (`U…`, in `SYS`, listed in `auth_users`): the node uses it to find and disconnect the live connections of users who lost rights (`auth::revoke`) |
//! | `routes.json` | 0600 | the user and password routes present to each other (`cluster { authorization {} }`) |
//! | `cluster.json` | 0644 | the manifest: node names, hosts and the public keys; written last |
//!
//! Why "write once": regenerating any of these silently would split a cluster (nodes with
//! different issuers or CAs reject each other's clients). [`init_cluster`] therefore refuses
//! when any of its files already exists, and writes each new file without ever replacing one
//! (see [`keys::create_secret`]). The manifest is written last, so a directory without it is
//! an interrupted init: delete it and run again. [`ClusterSecrets::load`] re-checks that each
//! seed is the kind and the key the manifest names, so a file copied from another cluster is
//! caught at start-up rather than as an unexplained authorization failure.
//!
//! `system.seed` came later than the rest. A directory written before it (its manifest has
//! no `system` key) still loads, with [`ClusterSecrets::system_seed`] `None`: such a cluster
//! runs without live revocation (membership changes reach a connection when it next
//! reconnects; the callout refuses new connections at once) and the node says so at start.
//! Write-once forbids adding the file to an existing directory; make a new one with
//! `unibus cluster init` to get it. When the manifest names a system key, the file must be
//! there and match, like every other seed.

use std::collections::BTreeSet;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use nkeys::KeyPair;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyUsagePurpose,
};
use serde::{Deserialize, Serialize};

use super::keys::{self, KeyError};

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const ISSUER_SEED: &str = "issuer.seed";
pub const SERVICE_SEED: &str = "service.seed";
pub const ADMIN_SEED: &str = "admin.seed";
pub const SYSTEM_SEED: &str = "system.seed";
pub const ROUTES_FILE: &str = "routes.json";
pub const MANIFEST: &str = "cluster.json";
/// Where [`dev_secrets`] keeps a single node's secrets, inside its data dir.
pub const DEV_SECRETS_DIR: &str = "secrets";

/// Certificates are valid for this many years from January 1st of the year they are made.
const VALID_YEARS: i32 = 10;
const PUBLIC_MODE: u32 = 0o644;

/// What went wrong making or loading cluster secrets.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("{dir}: already holds cluster secrets ({}); refusing to overwrite them. Use that directory as it is, or pick another --out", .existing.join(", "))]
    AlreadyInitialised { dir: PathBuf, existing: Vec<String> },
    #[error("node name {name:?}: {why}")]
    BadName { name: String, why: String },
    #[error(
        "{path}: missing; the directory is not a complete set of cluster secrets (run `unibus cluster init`)"
    )]
    Missing { path: PathBuf },
    #[error("{path}: {detail}")]
    Manifest { path: PathBuf, detail: String },
    #[error(
        "{path}: holds key {found}, but {MANIFEST} says {expected}; the secrets come from different clusters"
    )]
    Mismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("{dir}: has no certificate for node {node:?} (it has {}); start the node with one of those names or make new secrets", .known.join(", "))]
    UnknownNode {
        dir: PathBuf,
        node: String,
        known: Vec<String>,
    },
    #[error("certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
    move |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One node's TLS pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeTls {
    pub name: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The user and password routes authenticate with. `Debug` hides the password.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteCredentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for RouteCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteCredentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl RouteCredentials {
    /// Fresh random credentials. Both are URL-safe (`[A-Za-z0-9_-]`), so they go into a
    /// `nats-route://user:password@host:port` URL without escaping.
    pub fn generate() -> Result<Self, CertError> {
        let mut user = [0u8; 6];
        let mut password = [0u8; 24];
        super::fill_random(&mut user).map_err(|e| CertError::Io {
            path: PathBuf::from(ROUTES_FILE),
            source: std::io::Error::other(e),
        })?;
        super::fill_random(&mut password).map_err(|e| CertError::Io {
            path: PathBuf::from(ROUTES_FILE),
            source: std::io::Error::other(e),
        })?;
        Ok(Self {
            user: format!("route-{}", URL_SAFE_NO_PAD.encode(user)),
            password: URL_SAFE_NO_PAD.encode(password),
        })
    }

    /// The URL a node dials a peer's cluster port with (`peer` is `host:port`).
    pub fn route_url(&self, peer: &str) -> String {
        format!("nats-route://{}:{}@{peer}", self.user, self.password)
    }
}

/// The manifest: public facts about the secrets, written last.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    format: u32,
    nodes: Vec<String>,
    hosts: Vec<String>,
    issuer: String,
    service: String,
    admin: String,
    /// Absent in directories written before live revocation (see the module doc).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    system: Option<String>,
}

/// A complete set of cluster secrets: paths of the private files and the public keys.
/// Seeds stay on disk; load them when needed with [`ClusterSecrets::issuer_key`] and friends.
#[derive(Clone, Debug)]
pub struct ClusterSecrets {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub nodes: Vec<NodeTls>,
    /// The extra SANs every node certificate carries.
    pub hosts: Vec<String>,
    pub issuer_seed: PathBuf,
    /// The callout `issuer` (`A…`).
    pub issuer_public: String,
    pub service_seed: PathBuf,
    /// The service user (`U…`) for `auth_users`.
    pub service_public: String,
    pub admin_seed: PathBuf,
    /// The bootstrap admin (`U…`).
    pub admin_public: String,
    /// The system-account user and its key (`U…`); None for secrets made before it existed.
    pub system_seed: Option<PathBuf>,
    pub system_public: Option<String>,
    pub routes_file: PathBuf,
    pub routes: RouteCredentials,
}

impl ClusterSecrets {
    /// Loads and cross-checks a directory written by [`init_cluster`] or [`dev_secrets`].
    pub fn load(dir: &Path) -> Result<Self, CertError> {
        let manifest_path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&manifest_path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                CertError::Missing {
                    path: manifest_path.clone(),
                }
            } else {
                io_err(&manifest_path)(e)
            }
        })?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| CertError::Manifest {
            path: manifest_path.clone(),
            detail: e.to_string(),
        })?;
        if manifest.format != 1 {
            return Err(CertError::Manifest {
                path: manifest_path,
                detail: format!(
                    "format {} is not known to this unibus (it reads format 1)",
                    manifest.format
                ),
            });
        }
        for name in &manifest.nodes {
            check_node_name(name)?;
        }

        let must_exist = |name: &str| -> Result<PathBuf, CertError> {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(CertError::Missing { path })
            }
        };
        let ca_cert = must_exist(CA_CERT)?;
        let ca_key = must_exist(CA_KEY)?;
        let nodes = manifest
            .nodes
            .iter()
            .map(|name| {
                Ok(NodeTls {
                    name: name.clone(),
                    cert: must_exist(&format!("{name}.crt"))?,
                    key: must_exist(&format!("{name}.key"))?,
                })
            })
            .collect::<Result<Vec<_>, CertError>>()?;

        let check = |file: &str, key: Result<KeyPair, KeyError>, expected: &str| {
            let found = key?.public_key();
            if found != expected {
                return Err(CertError::Mismatch {
                    path: dir.join(file),
                    expected: expected.to_string(),
                    found,
                });
            }
            Ok(dir.join(file))
        };
        let issuer_seed = check(
            ISSUER_SEED,
            keys::read_account_seed(&dir.join(ISSUER_SEED)),
            &manifest.issuer,
        )?;
        let service_seed = check(
            SERVICE_SEED,
            keys::read_user_seed(&dir.join(SERVICE_SEED)),
            &manifest.service,
        )?;
        let admin_seed = check(
            ADMIN_SEED,
            keys::read_user_seed(&dir.join(ADMIN_SEED)),
            &manifest.admin,
        )?;
        let system_seed = match &manifest.system {
            Some(expected) => Some(check(
                SYSTEM_SEED,
                keys::read_user_seed(&dir.join(SYSTEM_SEED)),
                expected,
            )?),
            None => None,
        };

        let routes_file = must_exist(ROUTES_FILE)?;
        let routes_text = std::fs::read_to_string(&routes_file).map_err(io_err(&routes_file))?;
        let routes: RouteCredentials =
            serde_json::from_str(&routes_text).map_err(|e| CertError::Manifest {
                path: routes_file.clone(),
                detail: e.to_string(),
            })?;
        let url_safe = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if !url_safe(&routes.user) || !url_safe(&routes.password) {
            return Err(CertError::Manifest {
                path: routes_file,
                detail: "user and password must be non-empty and only [A-Za-z0-9_-]".into(),
            });
        }

        Ok(ClusterSecrets {
            dir: dir.to_path_buf(),
            ca_cert,
            ca_key,
            nodes,
            hosts: manifest.hosts,
            issuer_seed,
            issuer_public: manifest.issuer,
            service_seed,
            service_public: manifest.service,
            admin_seed,
            admin_public: manifest.admin,
            system_seed,
            system_public: manifest.system,
            routes_file,
            routes,
        })
    }

    /// The TLS pair of node `name`.
    pub fn node(&self, name: &str) -> Option<&NodeTls> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The callout issuer's key pair (signs admissions).
    pub fn issuer_key(&self) -> Result<KeyPair, KeyError> {
        keys::read_account_seed(&self.issuer_seed)
    }

    /// The node service user's key pair (connects to nats-server past the callout).
    pub fn service_key(&self) -> Result<KeyPair, KeyError> {
        keys::read_user_seed(&self.service_seed)
    }

    /// The system-account user's key pair, if these secrets have one.
    pub fn system_key(&self) -> Option<Result<KeyPair, KeyError>> {
        self.system_seed.as_deref().map(keys::read_user_seed)
    }
}

/// Node names become file names and DNS SANs: `[A-Za-z0-9]` then up to 62 of
/// `[A-Za-z0-9._-]`, and not `ca`.
pub fn check_node_name(name: &str) -> Result<(), CertError> {
    let bad = |why: &str| {
        Err(CertError::BadName {
            name: name.to_string(),
            why: why.to_string(),
        })
    };
    let mut bytes = name.bytes();
    match bytes.next() {
        None => return bad("is empty"),
        Some(b) if !b.is_ascii_alphanumeric() => {
            return bad("must start with a letter or digit");
        }
        _ => {}
    }
    if name.len() > 63 {
        return bad("is longer than 63 characters");
    }
    if !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_') {
        return bad("may only hold letters, digits, '.', '-' and '_'");
    }
    if name == "ca" {
        return bad("is reserved for the CA's files");
    }
    Ok(())
}

/// Writes a new set of cluster secrets into `out_dir` (created 0700 if missing) for
/// `nodes`, whose certificates also carry `hosts` as SANs. Refuses if any file it would
/// write already exists. See the module doc for the files.
pub fn init_cluster(
    out_dir: &Path,
    nodes: &[String],
    hosts: &[String],
) -> Result<ClusterSecrets, CertError> {
    if nodes.is_empty() {
        return Err(CertError::BadName {
            name: String::new(),
            why: "at least one node is needed".into(),
        });
    }
    let mut seen = BTreeSet::new();
    for name in nodes {
        check_node_name(name)?;
        if !seen.insert(name.as_str()) {
            return Err(CertError::BadName {
                name: name.clone(),
                why: "is given twice".into(),
            });
        }
    }

    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(out_dir)
        .map_err(io_err(out_dir))?;
    let mut planned: Vec<String> = [
        CA_CERT,
        CA_KEY,
        ISSUER_SEED,
        SERVICE_SEED,
        ADMIN_SEED,
        SYSTEM_SEED,
        ROUTES_FILE,
        MANIFEST,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for name in nodes {
        planned.push(format!("{name}.crt"));
        planned.push(format!("{name}.key"));
    }
    let existing: Vec<String> = planned
        .into_iter()
        .filter(|f| out_dir.join(f).exists())
        .collect();
    if !existing.is_empty() {
        return Err(CertError::AlreadyInitialised {
            dir: out_dir.to_path_buf(),
            existing,
        });
    }

    // The CA.
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::OrganizationName, "unibus");
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "unibus cluster CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut ca_params);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    keys::create_secret(&out_dir.join(CA_KEY), ca_key.serialize_pem().as_bytes())?;
    keys::create_with_mode(
        &out_dir.join(CA_CERT),
        ca_cert.pem().as_bytes(),
        PUBLIC_MODE,
    )?;
    let issuer = Issuer::new(ca_params, ca_key);

    // One pair per node, good for serving clients and for both ends of a route.
    for name in nodes {
        let mut sans: Vec<String> = Vec::new();
        for san in std::iter::once(name)
            .chain(hosts)
            .map(String::as_str)
            .chain(["localhost", "127.0.0.1"])
        {
            if !sans.iter().any(|s| s == san) {
                sans.push(san.to_string());
            }
        }
        let mut params = CertificateParams::new(sans)?;
        params
            .distinguished_name
            .push(DnType::OrganizationName, "unibus");
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params);
        let key = rcgen::KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        keys::create_secret(
            &out_dir.join(format!("{name}.key")),
            key.serialize_pem().as_bytes(),
        )?;
        keys::create_with_mode(
            &out_dir.join(format!("{name}.crt")),
            cert.pem().as_bytes(),
            PUBLIC_MODE,
        )?;
    }

    // Nkeys: the callout issuer (an account key), the service user, the bootstrap admin,
    // the system-account user.
    let issuer_key = KeyPair::new_account();
    let service_key = KeyPair::new_user();
    let admin_key = KeyPair::new_user();
    let system_key = KeyPair::new_user();
    keys::write_seed(&out_dir.join(ISSUER_SEED), &issuer_key)?;
    keys::write_seed(&out_dir.join(SERVICE_SEED), &service_key)?;
    keys::write_seed(&out_dir.join(ADMIN_SEED), &admin_key)?;
    keys::write_seed(&out_dir.join(SYSTEM_SEED), &system_key)?;

    let routes = RouteCredentials::generate()?;
    keys::create_secret(&out_dir.join(ROUTES_FILE), &to_json(&routes)?)?;

    let manifest = Manifest {
        format: 1,
        nodes: nodes.to_vec(),
        hosts: hosts.to_vec(),
        issuer: issuer_key.public_key(),
        service: service_key.public_key(),
        admin: admin_key.public_key(),
        system: Some(system_key.public_key()),
    };
    keys::create_with_mode(&out_dir.join(MANIFEST), &to_json(&manifest)?, PUBLIC_MODE)?;
    ClusterSecrets::load(out_dir)
}

/// A single node's secrets under `data_dir/secrets`, made on first call and reused after.
///
/// The first call writes a complete set into a temp directory and renames it into place,
/// so a crash never leaves half a set behind; later calls just load it. A later call with
/// another node name is refused ([`CertError::UnknownNode`]): its certificate would not
/// match the name.
pub fn dev_secrets(data_dir: &Path, node_name: &str) -> Result<ClusterSecrets, CertError> {
    let dir = data_dir.join(DEV_SECRETS_DIR);
    if !dir.join(MANIFEST).exists() {
        check_node_name(node_name)?;
        let mut suffix = [0u8; 6];
        super::fill_random(&mut suffix).map_err(|e| CertError::Io {
            path: dir.clone(),
            source: std::io::Error::other(e),
        })?;
        let tmp = data_dir.join(format!(
            ".{DEV_SECRETS_DIR}.{}.tmp",
            URL_SAFE_NO_PAD.encode(suffix)
        ));
        let made = init_cluster(&tmp, &[node_name.to_string()], &[]);
        let renamed = made.and_then(|_| std::fs::rename(&tmp, &dir).map_err(io_err(&dir)));
        if let Err(e) = renamed {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    }
    let secrets = ClusterSecrets::load(&dir)?;
    if secrets.node(node_name).is_none() {
        return Err(CertError::UnknownNode {
            dir,
            node: node_name.to_string(),
            known: secrets.nodes.iter().map(|n| n.name.clone()).collect(),
        });
    }
    Ok(secrets)
}

fn to_json(value: &impl Serialize) -> Result<Vec<u8>, CertError> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| CertError::Manifest {
        path: PathBuf::from(MANIFEST),
        detail: e.to_string(),
    })?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Sets `params` valid from January 1st of this year (UTC) for `VALID_YEARS` years.
/// Starting at the year's beginning tolerates nodes whose clocks run a little behind the
/// machine that made the CA.
fn set_validity(params: &mut CertificateParams) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Days since the epoch → civil year (good enough: off by at most a day at New Year).
    let year = 1970 + (secs / 86_400 * 400 / 146_097) as i32;
    params.not_before = rcgen::date_time_ymd(year, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + VALID_YEARS, 1, 1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    /// Verifies `leaf` chains to `ca` for `usage` and returns it for name checks.
    fn check_chain(ca: &Path, leaf: &Path, usage: webpki::KeyUsage) -> CertificateDer<'static> {
        let ca = CertificateDer::from_pem_file(ca).unwrap();
        let leaf = CertificateDer::from_pem_file(leaf).unwrap();
        let anchor = webpki::anchor_from_trusted_cert(&ca).unwrap();
        let ee = webpki::EndEntityCert::try_from(&leaf).unwrap();
        ee.verify_for_usage(
            &[webpki::ring::ECDSA_P256_SHA256],
            &[anchor],
            &[],
            UnixTime::now(),
            usage,
            None,
            None,
        )
        .unwrap();
        leaf
    }

    fn valid_for(leaf: &CertificateDer<'_>, name: &str) -> bool {
        let ee = webpki::EndEntityCert::try_from(leaf).unwrap();
        ee.verify_is_valid_for_subject_name(&ServerName::try_from(name).unwrap())
            .is_ok()
    }

    #[test]
    fn init_writes_every_file_with_the_right_mode_and_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("secrets");
        let s = init_cluster(&out, &names(&["n1", "n2", "n3"]), &names(&["bus.example"])).unwrap();
        assert_eq!(mode(&out), 0o700);
        for private in [
            &s.ca_key,
            &s.issuer_seed,
            &s.service_seed,
            &s.admin_seed,
            s.system_seed.as_ref().unwrap(),
            &s.routes_file,
        ] {
            assert_eq!(mode(private), 0o600, "{}", private.display());
        }
        for node in &s.nodes {
            assert_eq!(mode(&node.key), 0o600);
        }
        assert!(s.issuer_public.starts_with('A'));
        assert!(s.service_public.starts_with('U') && s.admin_public.starts_with('U'));
        assert_ne!(s.service_public, s.admin_public);
        let system = s.system_public.as_deref().unwrap();
        assert!(system.starts_with('U') && system != s.service_public && system != s.admin_public);
        assert_eq!(s.issuer_key().unwrap().public_key(), s.issuer_public);
        assert_eq!(s.service_key().unwrap().public_key(), s.service_public);
        assert!(
            s.routes
                .route_url("n2:6222")
                .starts_with("nats-route://route-")
        );
        assert!(!format!("{:?}", s.routes).contains(&s.routes.password));

        let again = ClusterSecrets::load(&out).unwrap();
        assert_eq!(again.issuer_public, s.issuer_public);
        assert_eq!(again.routes, s.routes);
        assert_eq!(again.nodes, s.nodes);
        assert_eq!(again.hosts, vec!["bus.example".to_string()]);
    }

    #[test]
    fn node_certificates_chain_to_the_ca_both_ways_and_carry_their_sans() {
        let dir = tempfile::tempdir().unwrap();
        let s = init_cluster(
            dir.path(),
            &names(&["n1", "n2"]),
            &names(&["bus.example", "10.1.2.3"]),
        )
        .unwrap();
        let n1 = s.node("n1").unwrap();
        let leaf = check_chain(&s.ca_cert, &n1.cert, webpki::KeyUsage::server_auth());
        check_chain(&s.ca_cert, &n1.cert, webpki::KeyUsage::client_auth());
        for name in ["n1", "bus.example", "localhost", "127.0.0.1", "10.1.2.3"] {
            assert!(
                valid_for(&leaf, name),
                "n1's cert should be valid for {name}"
            );
        }
        for name in ["n2", "evil.example", "10.1.2.4"] {
            assert!(
                !valid_for(&leaf, name),
                "n1's cert must not be valid for {name}"
            );
        }
        // Keys parse back and are not the CA's.
        let key = std::fs::read_to_string(&n1.key).unwrap();
        assert!(rcgen::KeyPair::from_pem(&key).is_ok());
        assert_ne!(key, std::fs::read_to_string(&s.ca_key).unwrap());
    }

    #[test]
    fn init_refuses_to_overwrite_and_rejects_bad_names() {
        let dir = tempfile::tempdir().unwrap();
        let s = init_cluster(dir.path(), &names(&["n1"]), &[]).unwrap();
        let before = std::fs::read(&s.issuer_seed).unwrap();
        let err = init_cluster(dir.path(), &names(&["n1"]), &[]).unwrap_err();
        assert!(matches!(err, CertError::AlreadyInitialised { .. }), "{err}");
        assert!(err.to_string().contains("issuer.seed"));
        assert_eq!(std::fs::read(&s.issuer_seed).unwrap(), before);

        let other = tempfile::tempdir().unwrap();
        for bad in [&["n1", "n1"][..], &[""], &["../x"], &["ca"], &["a b"], &[]] {
            let err = init_cluster(other.path(), &names(bad), &[]).unwrap_err();
            assert!(matches!(err, CertError::BadName { .. }), "{bad:?}: {err}");
        }
        assert_eq!(std::fs::read_dir(other.path()).unwrap().count(), 0);
    }

    #[test]
    fn load_catches_missing_files_and_seeds_from_another_cluster() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        init_cluster(a.path(), &names(&["n1"]), &[]).unwrap();
        init_cluster(b.path(), &names(&["n1"]), &[]).unwrap();
        std::fs::copy(b.path().join(ISSUER_SEED), a.path().join(ISSUER_SEED)).unwrap();
        let err = ClusterSecrets::load(a.path()).unwrap_err();
        assert!(matches!(err, CertError::Mismatch { .. }), "{err}");

        std::fs::remove_file(b.path().join("n1.key")).unwrap();
        let err = ClusterSecrets::load(b.path()).unwrap_err();
        assert!(matches!(err, CertError::Missing { .. }), "{err}");

        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            ClusterSecrets::load(empty.path()),
            Err(CertError::Missing { .. })
        ));
    }

    #[test]
    fn secrets_from_before_the_system_user_still_load_without_it() {
        let dir = tempfile::tempdir().unwrap();
        init_cluster(dir.path(), &names(&["n1"]), &[]).unwrap();
        let manifest = dir.path().join(MANIFEST);
        let mut m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
        m.as_object_mut().unwrap().remove("system");
        std::fs::write(&manifest, serde_json::to_vec(&m).unwrap()).unwrap();
        std::fs::remove_file(dir.path().join(SYSTEM_SEED)).unwrap();
        let s = ClusterSecrets::load(dir.path()).unwrap();
        assert!(s.system_seed.is_none() && s.system_public.is_none());

        // Named in the manifest but missing: refused, like any other seed.
        let other = tempfile::tempdir().unwrap();
        init_cluster(other.path(), &names(&["n1"]), &[]).unwrap();
        std::fs::remove_file(other.path().join(SYSTEM_SEED)).unwrap();
        assert!(ClusterSecrets::load(other.path()).is_err());
    }

    #[test]
    fn dev_secrets_are_made_once_and_reused() {
        let data = tempfile::tempdir().unwrap();
        let first = dev_secrets(data.path(), "solo").unwrap();
        assert_eq!(first.dir, data.path().join(DEV_SECRETS_DIR));
        let second = dev_secrets(data.path(), "solo").unwrap();
        assert_eq!(first.issuer_public, second.issuer_public);
        assert_eq!(first.admin_public, second.admin_public);
        assert_eq!(
            std::fs::read(&first.ca_cert).unwrap(),
            std::fs::read(&second.ca_cert).unwrap()
        );
        let err = dev_secrets(data.path(), "renamed").unwrap_err();
        assert!(matches!(err, CertError::UnknownNode { .. }), "{err}");
        // Only the secrets dir: no temp dirs left behind.
        assert_eq!(std::fs::read_dir(data.path()).unwrap().count(), 1);
    }
}
