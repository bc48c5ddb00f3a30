//! Renders nats-server's configuration from the node's [`Config`].
//!
//! The node owns nats-server's config: it is written into the data dir on every start, so
//! the file always matches the flags the node was started with, and an operator reads one
//! file to see what the server runs. Rendering is a pure function (tested on its own);
//! strings are quoted with JSON escaping, which nats-server's config parser accepts.

use std::path::Path;

use super::security::Security;
use crate::auth::server_config;
use crate::config::{BusAuth, Config};

/// Routes ping their peer this often and drop it after this many unanswered pings.
pub const ROUTE_PING_INTERVAL_SECS: u64 = 1;
pub const ROUTE_PING_MAX: u32 = 3;

/// File names inside the data dir.
pub const CONF_FILE: &str = "nats-server.conf";
pub const PID_FILE: &str = "nats-server.pid";

fn quote(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// The placement tag of the server named `name` (in its config's `server_tags`). Lower
/// case, as nats-server compares tags.
pub fn server_tag(name: &str) -> String {
    format!("node:{}", name.to_lowercase())
}

/// The nats-server config for this node. `data_dir` should be absolute so the server does
/// not depend on its working directory.
pub fn render(config: &Config, data_dir: &Path, security: &Security) -> String {
    let mut out = String::new();
    let line = |out: &mut String, text: String| {
        out.push_str(&text);
        out.push('\n');
    };
    line(
        &mut out,
        "# Written by unibus on every start; edits are overwritten.".into(),
    );
    line(&mut out, format!("server_name: {}", quote(&config.name)));
    // A tag naming the server, so a stream can be placed on it (`placement.tags`): an
    // operator pinning a stream, or `unibus bench` putting its raw twin's buckets on the
    // servers that hold unibus's own.
    line(
        &mut out,
        format!("server_tags: [{}]", quote(&server_tag(&config.name))),
    );
    line(&mut out, format!("listen: {}", quote(&config.listen)));
    line(&mut out, format!("http: {}", quote(&config.nats_http)));
    line(
        &mut out,
        format!(
            "lame_duck_duration: \"{}s\"\nlame_duck_grace_period: \"{}s\"",
            config.lame_duck_duration_secs, config.lame_duck_grace_secs
        ),
    );
    // nats-server keeps its streams in `<store_dir>/jetstream`.
    let store_dir = data_dir;
    line(
        &mut out,
        format!(
            "jetstream {{\n  store_dir: {}\n  sync_interval: {}\n}}",
            quote(&store_dir.to_string_lossy()),
            // `always` is a bare keyword; durations are strings.
            if config.jetstream_sync == "always" {
                "always".to_string()
            } else {
                quote(&config.jetstream_sync)
            }
        ),
    );
    if let Some(secrets) = &security.secrets
        && security.bus_auth != BusAuth::Off
    {
        // Accounts AUTH (the node's service user and the store), APP (admitted clients and
        // the node's APP user: control plane, room history), SYS (with the system user live revocation kicks through); every client but the
        // node's own users goes through the callout.
        let app = security.app_user().ok().flatten().map(|k| k.public_key());
        out.push_str(&server_config::callout_config_with_app(
            &secrets.issuer_public,
            &secrets.service_public,
            app.as_deref(),
            secrets.system_public.as_deref(),
        ));
    }
    if let Some(tls) = &security.tls {
        // With a tls block nats-server refuses plaintext clients.
        out.push_str(&server_config::tls_config(&tls.cert, &tls.key, &tls.ca));
    }
    // Only a clustered node gets a cluster block, and it gets one from its first boot:
    // nats-server deletes a standalone server's streams when it later turns clustered.
    if config.clustered() {
        let routes: Vec<String> = config
            .peers
            .iter()
            .map(|p| match &security.secrets {
                Some(s) => quote(&s.routes.route_url(p)),
                None => quote(&format!("nats-route://{p}")),
            })
            .collect();
        let mut inner = String::new();
        if let Some(tls) = &security.tls {
            inner.push_str(&server_config::route_tls_config(
                &tls.cert, &tls.key, &tls.ca,
            ));
        }
        if let Some(secrets) = &security.secrets {
            inner.push_str(&server_config::route_authorization(&secrets.routes));
        }
        // Dead routes must be noticed in seconds, not minutes (nats-server's default is a
        // ping every 2 min): while a route to a cut-off peer still counts as up, the peer's
        // queue subscribers — its authenticator, its control-plane service — keep getting a
        // share of this node's auth callouts and `unibus.ctl` requests, which vanish. A
        // partition then looks like random denials and timeouts on the healthy majority.
        inner.push_str(&format!(
            "ping_interval: \"{ROUTE_PING_INTERVAL_SECS}s\"\nping_max: {ROUTE_PING_MAX}\n"
        ));
        let inner: String = inner.lines().map(|l| format!("  {l}\n")).collect();
        line(
            &mut out,
            format!(
                "cluster {{\n  name: {}\n  listen: {}\n  routes: [{}]\n{inner}}}",
                quote(&config.cluster_name),
                quote(&config.cluster_listen),
                routes.join(", ")
            ),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> Security {
        Security {
            bus_auth: BusAuth::Off,
            secrets: None,
            tls: None,
        }
    }

    #[test]
    fn a_single_node_has_no_cluster_block_and_fsyncs_always() {
        let config = Config {
            name: "n1".into(),
            ..Config::default()
        };
        let text = render(&config, Path::new("/d"), &open());
        assert!(text.contains("server_name: \"n1\""));
        assert!(text.contains("server_tags: [\"node:n1\"]"));
        assert!(text.contains("sync_interval: always"));
        assert!(text.contains("store_dir: \"/d\""));
        assert!(!text.contains("cluster {"));
    }

    #[test]
    fn peers_become_routes_and_sync_can_be_relaxed() {
        let config = Config {
            name: "n1".into(),
            peers: vec!["n2:6222".into(), "n3:6222".into()],
            jetstream_sync: "2m".into(),
            ..Config::default()
        };
        let text = render(&config, Path::new("/d"), &open());
        assert!(text.contains("routes: [\"nats-route://n2:6222\", \"nats-route://n3:6222\"]"));
        assert!(text.contains("sync_interval: \"2m\""));
        assert!(
            text.contains("  ping_interval: \"1s\"\n  ping_max: 3\n"),
            "{text}"
        );
        assert!(text.contains("name: \"unibus\""));
    }
}
