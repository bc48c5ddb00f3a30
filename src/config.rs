//! Node configuration: one `Config` built from four layers, then checked once.
//!
//! The layers are merged with figment, later ones winning:
//! compiled defaults ← `--config unibus.toml` ← `UNIBUS_*` environment ← CLI flags.
//! Feature flags (`bus-auth`, `bus-tls`, `decentralized`) live in the `[flags]` table of the
//! file, in `UNIBUS_FLAG_<NAME>` variables (`UNIBUS_FLAG_BUS_AUTH=soft`), or in repeated
//! `--flag NAME=VALUE` arguments. Their compiled defaults must equal `dev/feature_flags.json`;
//! a test keeps the two equal.
//!
//! Everything an operator can get wrong is caught by [`Config::validate`] before the node
//! spawns anything, and reported as a [`ConfigError`] naming the field and what to do: a node
//! that starts half-configured and fails later is harder to run than one that refuses at once.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// A configuration problem, reported before anything is spawned (the CLI exits 2).
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConfigError {
    /// The option at fault, as the operator writes it (`--listen`, `flags.bus-auth`, …).
    pub field: String,
    /// What is wrong and what to do about it.
    pub message: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// `bus-auth`: how strictly connections and control-plane requests are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BusAuth {
    /// No callout; unsigned control-plane requests are accepted.
    Off,
    /// Verify and log would-be denials, but admit.
    Soft,
    /// Deny what fails verification.
    Enforce,
}

impl BusAuth {
    pub fn as_str(self) -> &'static str {
        match self {
            BusAuth::Off => "off",
            BusAuth::Soft => "soft",
            BusAuth::Enforce => "enforce",
        }
    }
}

/// The feature flags, named as in `dev/feature_flags.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Flags {
    #[serde(rename = "bus-auth")]
    pub bus_auth: BusAuth,
    #[serde(rename = "bus-tls")]
    pub bus_tls: bool,
    pub decentralized: bool,
}

impl Default for Flags {
    /// Must equal `dev/feature_flags.json` (checked by a test).
    fn default() -> Self {
        Flags {
            bus_auth: BusAuth::Enforce,
            bus_tls: true,
            decentralized: false,
        }
    }
}

/// The flag names `--flag` accepts, with the values each takes.
pub const FLAG_NAMES: [(&str, &str); 3] = [
    ("bus-auth", "off|soft|enforce"),
    ("bus-tls", "true|false"),
    ("decentralized", "true|false"),
];

/// Parses one `--flag NAME=VALUE` argument into a figment key (`flags.NAME`) and value.
pub fn parse_flag(arg: &str) -> Result<(String, serde_json::Value), ConfigError> {
    let field = "--flag";
    let (name, value) = arg.split_once('=').ok_or_else(|| {
        ConfigError::new(
            field,
            format!("`{arg}` is not NAME=VALUE (e.g. bus-auth=soft)"),
        )
    })?;
    let (name, value) = (name.trim(), value.trim());
    let Some((_, allowed)) = FLAG_NAMES.iter().find(|(n, _)| *n == name) else {
        let known: Vec<&str> = FLAG_NAMES.iter().map(|(n, _)| *n).collect();
        return Err(ConfigError::new(
            field,
            format!("unknown flag `{name}`; known flags: {}", known.join(", ")),
        ));
    };
    let parsed = match name {
        "bus-auth" => match value {
            "off" | "soft" | "enforce" => serde_json::Value::from(value),
            _ => serde_json::Value::Null,
        },
        _ => match value {
            "true" => serde_json::Value::Bool(true),
            "false" => serde_json::Value::Bool(false),
            _ => serde_json::Value::Null,
        },
    };
    if parsed.is_null() {
        return Err(ConfigError::new(
            field,
            format!("`{name}={value}`: {name} takes {allowed}"),
        ));
    }
    Ok((format!("flags.{name}"), parsed))
}

/// How the supervisor treats a nats-server that exits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Supervision {
    /// Restarts allowed within `restart_window_secs`; one more and the node exits non-zero.
    pub max_restarts: u32,
    pub restart_window_secs: u64,
    /// The first restart waits this long; each next one doubles, up to the cap.
    pub backoff_initial_ms: u64,
    pub backoff_cap_ms: u64,
    /// How long a freshly spawned nats-server may take to answer its monitoring port.
    pub start_timeout_secs: u64,
}

impl Default for Supervision {
    fn default() -> Self {
        Supervision {
            max_restarts: 5,
            restart_window_secs: 60,
            backoff_initial_ms: 250,
            backoff_cap_ms: 10_000,
            start_timeout_secs: 20,
        }
    }
}

/// The node's whole configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Node name; also nats-server's `server_name`. Default: the host name.
    pub name: String,
    /// Data directory. Default: `./data/<name>`.
    pub data: Option<PathBuf>,
    /// NATS client listener.
    pub listen: String,
    /// Route (cluster) listener.
    pub cluster_listen: String,
    /// Route addresses of the other nodes (a list, or one comma-separated string as
    /// `UNIBUS_PEERS=n2:6222,n3:6222` gives it).
    #[serde(deserialize_with = "comma_list")]
    pub peers: Vec<String>,
    /// The node's admin HTTP (`/healthz`, `/readyz`).
    pub http: String,
    /// nats-server's own monitoring listener.
    pub nats_http: String,
    /// The nats-server binary; unset means: `UNIBUS_NATS_SERVER`, then beside the unibus
    /// binary, then the one `scripts/setup` installed, then `PATH`.
    pub nats_server: Option<PathBuf>,
    /// The route cluster's name; every node of one cluster must agree.
    pub cluster_name: String,
    /// JetStream fsync policy: `always` (fsync before every ack, the default) or a Go
    /// duration such as `2m` for operators who trade durability for write speed.
    pub jetstream_sync: String,
    /// Lame-duck timing. nats-server refuses a duration under 30 s; with few clients it
    /// finishes far sooner (after the grace period).
    pub lame_duck_duration_secs: u64,
    pub lame_duck_grace_secs: u64,
    /// Upper bound on the whole shutdown; past it nats-server is killed.
    pub shutdown_timeout_secs: u64,
    pub supervision: Supervision,
    /// The KV store (with `decentralized`): replicas for buckets this node creates (1..=5;
    /// existing buckets keep theirs — change them with `unibus cluster replicas`).
    pub replicas: usize,
    /// Bound on every store call; past it the call fails (and auth checks deny).
    pub op_timeout_ms: u64,
    /// How often the KV store's reconciler repairs interrupted two-bucket writes.
    pub reconcile_every_secs: u64,
    /// Cluster secrets from `unibus cluster init` (CA, node certificates, callout issuer,
    /// service and admin seeds, route credentials). Unset: a single node makes its own
    /// under `<data>/secrets` on first boot.
    pub secrets: Option<PathBuf>,
    /// Override the TLS files taken from the secrets.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    /// Control plane: largest clock difference accepted on a signed request.
    pub ctl_skew_secs: u64,
    /// Control plane: largest request accepted, in bytes.
    pub ctl_max_body: usize,
    pub flags: Flags,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            name: host_name(),
            data: None,
            listen: "127.0.0.1:4222".into(),
            cluster_listen: "127.0.0.1:6222".into(),
            peers: Vec::new(),
            http: "127.0.0.1:8080".into(),
            nats_http: "127.0.0.1:8222".into(),
            nats_server: None,
            cluster_name: "unibus".into(),
            jetstream_sync: "always".into(),
            lame_duck_duration_secs: 30,
            lame_duck_grace_secs: 2,
            shutdown_timeout_secs: 45,
            supervision: Supervision::default(),
            replicas: 1,
            op_timeout_ms: 2000,
            reconcile_every_secs: 60,
            secrets: None,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            ctl_skew_secs: 30,
            ctl_max_body: 64 * 1024,
            flags: Flags::default(),
        }
    }
}

/// The top-level keys `UNIBUS_<KEY>` may set. Other `UNIBUS_*` variables belong to the
/// client commands (`UNIBUS_SERVER`, …) and are ignored here.
const ENV_KEYS: [&str; 22] = [
    "secrets",
    "tls_cert",
    "tls_key",
    "tls_ca",
    "ctl_skew_secs",
    "ctl_max_body",
    "replicas",
    "op_timeout_ms",
    "reconcile_every_secs",
    "name",
    "data",
    "listen",
    "cluster_listen",
    "peers",
    "http",
    "nats_http",
    "nats_server",
    "cluster_name",
    "jetstream_sync",
    "lame_duck_duration_secs",
    "lame_duck_grace_secs",
    "shutdown_timeout_secs",
];

impl Config {
    /// Merges the layers. `file` is `--config`; `cli` holds only the options given on the
    /// command line, as figment keys (`listen`, `flags.bus-auth`, …).
    pub fn load(
        file: Option<&Path>,
        cli: BTreeMap<String, serde_json::Value>,
    ) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::new("--config", format!("cannot read {}: {e}", path.display()))
            })?;
            // Parse once ourselves so a syntax error names its line and column.
            if let Err(e) = text.parse::<toml::Table>() {
                return Err(ConfigError::new(
                    "--config",
                    format!(
                        "{} does not parse: {}",
                        path.display(),
                        toml_error_line(&text, &e)
                    ),
                ));
            }
            figment = figment.merge(Toml::string(&text));
        }
        figment = figment
            .merge(
                Env::prefixed("UNIBUS_")
                    .filter(|k| ENV_KEYS.contains(&k.as_str()))
                    .map(|k| k.as_str().to_ascii_lowercase().into()),
            )
            .merge(
                // UNIBUS_FLAG_BUS_AUTH=soft → flags.bus-auth
                Env::prefixed("UNIBUS_FLAG_").map(|k| {
                    format!(
                        "flags.{}",
                        k.as_str().to_ascii_lowercase().replace('_', "-")
                    )
                    .into()
                }),
            );
        for (key, value) in cli {
            figment = figment.merge(Serialized::default(&key, value));
        }
        let config: Config = figment.extract().map_err(figment_error)?;
        Ok(config)
    }

    /// The data directory, defaulting to `./data/<name>`.
    pub fn data_dir(&self) -> PathBuf {
        self.data
            .clone()
            .unwrap_or_else(|| PathBuf::from("data").join(&self.name))
    }

    /// True when nats-server runs a route cluster (and so clustered JetStream) from its first
    /// boot. A standalone server must never later become clustered (DESIGN §13).
    pub fn clustered(&self) -> bool {
        !self.peers.is_empty() || self.flags.decentralized
    }

    /// Checks everything that can be checked before spawning: addresses, ports, peers, the
    /// data dir and flag combinations. The nats-server binary is checked by the supervisor's
    /// `locate_nats_server`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(ConfigError::new(
                "--name",
                format!(
                    "`{}` is not a node name: use letters, digits, `-` and `_`",
                    self.name
                ),
            ));
        }
        let mut ports: Vec<(&str, u16)> = Vec::new();
        for (field, addr) in self.listeners() {
            let port = parse_listen_addr(field, addr)?.port();
            if let Some((other, _)) = ports.iter().find(|(_, p)| *p == port) {
                return Err(ConfigError::new(
                    field,
                    format!(
                        "port {port} is also given to {other}; each listener needs its own port"
                    ),
                ));
            }
            ports.push((field, port));
        }
        for peer in &self.peers {
            parse_peer(peer)?;
        }
        if !self.peers.is_empty()
            && !self.flags.decentralized
            && self.flags.bus_auth != BusAuth::Off
        {
            return Err(ConfigError::new(
                "flags.decentralized",
                "the nodes of a cluster must share one store: start every node with \
                 --flag decentralized=true (a single node without --peers keeps SQLite)",
            ));
        }
        if self.flags.decentralized && self.peers.len() < 2 {
            return Err(ConfigError::new(
                "flags.decentralized",
                "the KV store needs a clustered JetStream with a quorum of nodes: give at least \
                 two other nodes with --peers (a single node keeps its store in SQLite)",
            ));
        }
        if self.lame_duck_duration_secs < 30 {
            return Err(ConfigError::new(
                "lame_duck_duration_secs",
                "nats-server requires at least 30 seconds",
            ));
        }
        if self.lame_duck_grace_secs >= self.lame_duck_duration_secs {
            return Err(ConfigError::new(
                "lame_duck_grace_secs",
                "must be shorter than lame_duck_duration_secs",
            ));
        }
        if self.jetstream_sync != "always" && parse_go_duration(&self.jetstream_sync).is_none() {
            return Err(ConfigError::new(
                "jetstream_sync",
                format!(
                    "`{}` is neither `always` nor a duration like `2m` or `30s`",
                    self.jetstream_sync
                ),
            ));
        }
        if !(1..=5).contains(&self.replicas) {
            return Err(ConfigError::new(
                "--replicas",
                format!("{} is outside 1..=5", self.replicas),
            ));
        }
        if self.replicas > self.peers.len() + 1 {
            return Err(ConfigError::new(
                "--replicas",
                format!(
                    "{} replicas need {} nodes; this cluster has {} (this node and {} peers)",
                    self.replicas,
                    self.replicas,
                    self.peers.len() + 1,
                    self.peers.len()
                ),
            ));
        }
        if self.op_timeout_ms == 0 || self.reconcile_every_secs == 0 {
            return Err(ConfigError::new(
                "op_timeout_ms",
                "op_timeout_ms and reconcile_every_secs must be positive",
            ));
        }
        let tls_files = [&self.tls_cert, &self.tls_key, &self.tls_ca];
        let given = tls_files.iter().filter(|f| f.is_some()).count();
        if given != 0 && given != 3 {
            return Err(ConfigError::new(
                "--tls-cert",
                "give --tls-cert, --tls-key and --tls-ca together (or none, to use the secrets')",
            ));
        }
        for (field, file) in [
            ("--tls-cert", &self.tls_cert),
            ("--tls-key", &self.tls_key),
            ("--tls-ca", &self.tls_ca),
        ] {
            if let Some(path) = file
                && !path.is_file()
            {
                return Err(ConfigError::new(
                    field,
                    format!("{} does not exist", path.display()),
                ));
            }
        }
        let secured = self.flags.bus_auth != BusAuth::Off || self.flags.bus_tls;
        if self.clustered() && secured && self.secrets.is_none() {
            return Err(ConfigError::new(
                "--secrets",
                "the nodes of a cluster share one set of secrets (CA, route credentials, callout \
                 issuer): create them once with `unibus cluster init --out DIR --nodes n1,n2,n3` \
                 and give every node --secrets DIR",
            ));
        }
        if let Some(dir) = &self.secrets
            && !dir.join("cluster.json").is_file()
        {
            return Err(ConfigError::new(
                "--secrets",
                format!(
                    "{} holds no cluster secrets (no cluster.json); create them with `unibus cluster init --out DIR --nodes ...`",
                    dir.display()
                ),
            ));
        }
        if self.ctl_skew_secs == 0 || self.ctl_max_body < 1024 {
            return Err(ConfigError::new(
                "ctl_skew_secs",
                "ctl_skew_secs must be positive and ctl_max_body at least 1024",
            ));
        }
        if self.supervision.max_restarts == 0 || self.supervision.restart_window_secs == 0 {
            return Err(ConfigError::new(
                "supervision",
                "max_restarts and restart_window_secs must be at least 1",
            ));
        }
        check_data_dir(&self.data_dir())
    }

    fn listeners(&self) -> [(&'static str, &String); 4] {
        [
            ("--listen", &self.listen),
            ("--cluster-listen", &self.cluster_listen),
            ("--http", &self.http),
            ("--nats-http", &self.nats_http),
        ]
    }

    /// Probes each listener address: a port someone else holds fails here, before
    /// nats-server half-starts. Run after a stale server from a crash has been reaped.
    pub fn check_ports_free(&self) -> Result<(), ConfigError> {
        for (field, addr) in self.listeners() {
            if field == "--cluster-listen" && !self.clustered() {
                continue; // a standalone node opens no route listener
            }
            let parsed = parse_listen_addr(field, addr)?;
            if let Err(e) = TcpListener::bind(parsed) {
                return Err(ConfigError::new(
                    field,
                    format!("cannot listen on {addr}: {e}; is another node or program using it?"),
                ));
            }
        }
        Ok(())
    }

    pub fn op_timeout(&self) -> Duration {
        Duration::from_millis(self.op_timeout_ms)
    }

    /// Where a NATS client on this machine reaches the node's own server (a wildcard
    /// listen address is reached through loopback).
    pub fn local_nats_url(&self, tls: bool) -> String {
        let (host, port) = split_host_port(&self.listen).unwrap_or(("127.0.0.1", 4222));
        let host = match host {
            "0.0.0.0" | "::" => "127.0.0.1",
            h => h,
        };
        let scheme = if tls { "tls" } else { "nats" };
        format!("{scheme}://{host}:{port}")
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout_secs)
    }
}

/// Accepts `["a", "b"]` or `"a,b"`.
fn comma_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let items = match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => s.split(',').map(str::to_string).collect(),
        OneOrMany::Many(v) => v,
    };
    Ok(items
        .into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect())
}

/// A listener address: `HOST:PORT` where HOST resolves locally (an IP or `localhost`).
fn parse_listen_addr(field: &str, addr: &str) -> Result<SocketAddr, ConfigError> {
    let bad = |why: String| {
        ConfigError::new(
            field,
            format!("`{addr}` {why}; use HOST:PORT, e.g. 127.0.0.1:4222"),
        )
    };
    let (host, port) = split_host_port(addr).ok_or_else(|| bad("is not HOST:PORT".into()))?;
    if port == 0 {
        return Err(bad("has port 0".into()));
    }
    let resolved = (host, port)
        .to_socket_addrs()
        .map_err(|e| bad(format!("does not resolve ({e})")))?
        .next()
        .ok_or_else(|| bad("does not resolve".into()))?;
    Ok(resolved)
}

/// A peer route address: `HOST:PORT`. The host need not resolve yet (a peer container may
/// not exist when this node starts); nats-server keeps retrying routes.
pub fn parse_peer(peer: &str) -> Result<(String, u16), ConfigError> {
    match split_host_port(peer) {
        Some((host, port)) if port != 0 && valid_host(host) => Ok((host.to_string(), port)),
        _ => Err(ConfigError::new(
            "--peers",
            format!("`{peer}` is not HOST:PORT (e.g. n2:6222 or 10.0.0.2:6222)"),
        )),
    }
}

fn split_host_port(addr: &str) -> Option<(&str, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return None;
    }
    Some((host, port.parse().ok()?))
}

fn valid_host(host: &str) -> bool {
    host.parse::<std::net::IpAddr>().is_ok()
        || (host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    && !label.starts_with('-')
            }))
}

fn check_data_dir(dir: &Path) -> Result<(), ConfigError> {
    let fail = |e: std::io::Error| {
        ConfigError::new(
            "--data",
            format!(
                "cannot create or write {}: {e}; pick a writable directory",
                dir.display()
            ),
        )
    };
    std::fs::create_dir_all(dir).map_err(fail)?;
    let probe = dir.join(".write-probe");
    std::fs::write(&probe, b"ok").map_err(fail)?;
    std::fs::remove_file(&probe).map_err(fail)?;
    Ok(())
}

/// Parses the subset of Go durations nats-server accepts here: `<n>ms|s|m|h`.
pub fn parse_go_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = text.split_at(split);
    let n: u64 = num.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => Some(Duration::from_secs(n * 60)),
        "h" => Some(Duration::from_secs(n * 3600)),
        _ => None,
    }
}

fn toml_error_line(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim().replace('\n', "; ");
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {msg}")
        }
        None => msg,
    }
}

fn figment_error(e: figment::Error) -> ConfigError {
    let field = if e.path.is_empty() {
        "config".to_string()
    } else {
        e.path.join(".")
    };
    let mut message = e.kind.to_string();
    if let Some(source) = &e.metadata {
        message.push_str(&format!(" (from {})", source.name));
    }
    ConfigError::new(field, message)
}

fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let name = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    // Host names may hold dots; a node name is one token.
    let name: String = name
        .split('.')
        .next()
        .unwrap_or("")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect();
    if name.is_empty() { "node".into() } else { name }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_arguments_parse_and_bad_ones_name_the_problem() {
        assert_eq!(
            parse_flag("bus-auth=soft").unwrap(),
            ("flags.bus-auth".into(), serde_json::json!("soft"))
        );
        assert_eq!(
            parse_flag("decentralized=true").unwrap().1,
            serde_json::json!(true)
        );
        let e = parse_flag("bus-auth=maybe").unwrap_err();
        assert!(e.message.contains("off|soft|enforce"), "{e}");
        let e = parse_flag("nope=1").unwrap_err();
        assert!(e.message.contains("unknown flag `nope`"), "{e}");
        assert!(parse_flag("bus-tls").is_err());
    }

    #[test]
    fn compiled_flag_defaults_equal_dev_feature_flags_json() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("dev/feature_flags.json");
        let recorded: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let compiled = serde_json::to_value(Flags::default()).unwrap();
        let compiled = compiled.as_object().unwrap();
        let names: Vec<&str> = FLAG_NAMES.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            recorded.as_object().unwrap().len(),
            names.len(),
            "a flag is missing on one side"
        );
        for name in names {
            assert_eq!(
                recorded[name]["default"], compiled[name],
                "flag {name}: dev/feature_flags.json and Flags::default() disagree"
            );
            assert!(recorded[name]["issue"].is_u64() && recorded[name]["description"].is_string());
        }
    }

    #[test]
    fn peers_must_be_host_port() {
        assert!(parse_peer("n2:6222").is_ok());
        assert!(parse_peer("10.0.0.2:6222").is_ok());
        assert!(parse_peer("[::1]:6222").is_ok());
        for bad in [
            "n2",
            "n2:",
            ":6222",
            "n2:0",
            "n2:99999",
            "bad host:1",
            "a..b:1",
        ] {
            assert!(parse_peer(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_go_duration("10ms"), Some(Duration::from_millis(10)));
        assert_eq!(parse_go_duration("m"), None);
        assert_eq!(parse_go_duration("5x"), None);
    }

    #[test]
    fn later_layers_win() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("unibus.toml");
        std::fs::write(&file, "listen = \"127.0.0.1:5000\"\nhttp = \"127.0.0.1:5001\"\n[flags]\nbus-auth = \"soft\"\n").unwrap();
        let mut cli = BTreeMap::new();
        cli.insert("http".to_string(), serde_json::json!("127.0.0.1:5002"));
        let c = Config::load(Some(&file), cli).unwrap();
        assert_eq!(c.listen, "127.0.0.1:5000");
        assert_eq!(c.http, "127.0.0.1:5002");
        assert_eq!(c.flags.bus_auth, BusAuth::Soft);
    }

    #[test]
    fn a_config_file_that_does_not_parse_names_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("unibus.toml");
        std::fs::write(&file, "name = \"a\"\nlisten = = 3\n").unwrap();
        let e = Config::load(Some(&file), BTreeMap::new()).unwrap_err();
        assert!(e.message.contains("line 2"), "{e}");
        std::fs::write(&file, "nmae = \"a\"\n").unwrap();
        let e = Config::load(Some(&file), BTreeMap::new()).unwrap_err();
        assert!(e.to_string().contains("nmae"), "{e}");
    }
}
