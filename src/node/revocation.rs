//! The node's side of live revocation: a system-account connection and the `OnRevoke`
//! hook the membership service calls after a change that takes rights away.
//!
//! The hook never blocks the control-plane reply: it spawns the sweep
//! (`auth::revoke::Revoker`) and returns. Without a system connection — `bus-auth=off`,
//! secrets made before `system.seed`, or a connect that failed — the node logs a warning
//! and runs without the hook: the callout still refuses anyone revoked at their next
//! connection, only live connections keep their permissions until they reconnect.

use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

use super::security::Security;
use crate::auth::revoke::Revoker;
use crate::config::Config;
use crate::membership::service::OnRevoke;

/// How long a sweep collects CONNZ answers from the cluster's servers. Kicks go out as
/// answers arrive; this only bounds when the sweep's report is logged.
const ANSWER_WINDOW: Duration = Duration::from_millis(1000);

/// Connects as the system user and returns the hook, or None (with a warning) when live
/// revocation is not available on this node.
pub async fn hook(config: &Config, security: &Security) -> Option<OnRevoke> {
    let options = match security.system_connect_options() {
        Ok(Some(options)) => options,
        Ok(None) => {
            if security
                .secrets
                .as_ref()
                .is_some_and(|s| s.system_seed.is_none())
                && security.bus_auth != crate::config::BusAuth::Off
            {
                tracing::warn!(
                    "the cluster secrets have no system.seed (made before live revocation): membership changes reach live connections only when they reconnect; make new secrets with `unibus cluster init` to enable it"
                );
            }
            return None;
        }
        Err(e) => {
            tracing::warn!("live revocation off: {e}");
            return None;
        }
    };
    let url = config.local_nats_url(security.tls.is_some());
    let client = match options
        .name(format!("unibus-{}-revoke", config.name))
        .connection_timeout(config.op_timeout())
        .request_timeout(Some(config.op_timeout()))
        .max_reconnects(None)
        .connect(&url)
        .await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(
                "live revocation off: cannot connect to {url} as the system user: {e}; revoked users keep their live connections until they reconnect"
            );
            return None;
        }
    };
    let revoker = Arc::new(Revoker::new(
        client,
        security.bus_auth,
        config.op_timeout(),
        ANSWER_WINDOW,
    ));
    Some(Arc::new(move |keys: Vec<String>| {
        let revoker = revoker.clone();
        tokio::spawn(async move { revoker.revoke_and_log(keys).await }.in_current_span());
    }))
}
