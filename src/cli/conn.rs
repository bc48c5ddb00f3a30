//! How a command reaches the cluster: servers, the user's nkey seed, the pinned CA.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

/// Connection options shared by every command that talks to the cluster.
#[derive(Args, Clone, Debug)]
pub struct ConnArgs {
    /// NATS server URL (repeatable; env UNIBUS_SERVER takes a comma list).
    #[arg(
        long = "server",
        env = "UNIBUS_SERVER",
        value_delimiter = ',',
        default_value = "nats://127.0.0.1:4222"
    )]
    pub servers: Vec<String>,
    /// The nkey seed file to authenticate (and sign requests) with.
    #[arg(long, env = "UNIBUS_SEED_FILE", value_name = "PATH")]
    pub seed_file: Option<PathBuf>,
    /// The cluster's CA certificate to pin (TLS).
    #[arg(long, env = "UNIBUS_CA", value_name = "PATH")]
    pub ca: Option<PathBuf>,
}

/// Reads `--seed-file`, if given.
pub fn read_seed(conn: &ConnArgs) -> Result<Option<String>, u8> {
    let Some(path) = &conn.seed_file else {
        return Ok(None);
    };
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s.trim().to_string())),
        Err(e) => {
            eprintln!("error: --seed-file {}: {e}", path.display());
            Err(2)
        }
    }
}

/// Connects to the cluster for an operator command as `--seed-file`; an error is printed
/// and mapped to an exit code.
pub async fn connect(conn: &ConnArgs) -> Result<async_nats::Client, u8> {
    let seed = read_seed(conn)?;
    connect_as(conn, seed).await
}

/// Connects with `--server` and `--ca` as the user of `seed` (none: no credentials).
pub async fn connect_as(conn: &ConnArgs, seed: Option<String>) -> Result<async_nats::Client, u8> {
    let mut addrs = Vec::new();
    for s in conn
        .servers
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
    {
        match s.parse::<async_nats::ServerAddr>() {
            Ok(a) => addrs.push(a),
            Err(e) => {
                eprintln!("error: --server `{s}` is not a NATS URL: {e}");
                return Err(2);
            }
        }
    }
    let mut options = match seed {
        Some(seed) => unibus::client::nkey_options(&seed).map_err(|e| {
            eprintln!("error: --seed-file: {e}");
            2
        })?,
        None => async_nats::ConnectOptions::new(),
    }
    .connection_timeout(Duration::from_secs(5));
    if let Some(ca) = &conn.ca {
        if !ca.is_file() {
            eprintln!("error: --ca {} does not exist", ca.display());
            return Err(2);
        }
        options = options.require_tls(true).add_root_certificates(ca.clone());
    }
    options.connect(addrs).await.map_err(|e| {
        eprintln!("error: cannot connect to {}: {e}", conn.servers.join(","));
        1
    })
}

/// Connects as a user for a client command. Errors are printed; the exit code returned.
pub async fn client(conn: &ConnArgs) -> Result<unibus::client::Client, u8> {
    let Some(seed_file) = &conn.seed_file else {
        eprintln!("error: --seed-file (or UNIBUS_SEED_FILE) is required: the user's nkey seed");
        return Err(2);
    };
    let mut options = unibus::client::ClientOptions::new(conn.servers.clone(), seed_file.clone());
    options.ca = conn.ca.clone();
    unibus::client::Client::connect(options)
        .await
        .map_err(|e| super::output::fail(&e))
}

/// A JetStream context in `APP` as the nodes' APP user, derived from the service seed in
/// `--seed-file`. None when the cluster runs with `bus-auth=off` (no accounts: the service
/// connection already sees the stream) or no seed was given.
pub async fn app_jetstream(conn: &ConnArgs) -> Result<Option<async_nats::jetstream::Context>, u8> {
    let Some(seed) = read_seed(conn)? else {
        return Ok(None);
    };
    let app = nkeys::KeyPair::from_seed(&seed)
        .and_then(|service| unibus::auth::keys::derive_user(&service, "app"))
        .and_then(|app| app.seed());
    let app = match app {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: --seed-file is not the service seed: {e}");
            return Err(2);
        }
    };
    let client = connect_as(conn, Some(app)).await?;
    Ok(Some(async_nats::jetstream::new(client)))
}
