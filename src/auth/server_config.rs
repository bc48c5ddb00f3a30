//! nats-server config fragments for the callout and TLS, rendered as pure functions.
//!
//! The node's renderer (`node::nats_config`) pastes these into the file it writes; they
//! are separate so each can be checked on its own (`nats-server -t` in `tests/callout.rs`).
//! Values are quoted with JSON string escaping, which nats-server's parser accepts, so no
//! key or path can break out of its field.
//!
//! - [`callout_config`]: accounts `AUTH` (the service user; JetStream for the store),
//!   `APP` (admitted clients; JetStream for room history), `SYS` (the system account), and
//!   the `authorization { auth_callout {} }` block naming the issuer, the `auth_users` that
//!   bypass the callout, and `AUTH` as the account the callout runs in. The store stays in
//!   `AUTH`, out of clients' reach; the control plane and room history are served in `APP`
//!   by the node's own `APP` user (see [`callout_config_with_app`]), so nothing crosses
//!   between the two accounts.
//! - [`tls_config`]: the client listener's `tls {}`. `verify: false`: clients prove who
//!   they are with nkeys, not certificates; they pin `ca.crt` to know the server is ours.
//!   With a `tls {}` block nats-server refuses plaintext clients.
//! - [`route_tls_config`] and [`route_authorization`]: go *inside* `cluster {}`. Routes
//!   verify each other's certificates (`verify: true`, mutual TLS from the same CA) and
//!   present the shared route user, so a stray server cannot join the cluster.

use std::path::Path;

use super::certs::RouteCredentials;

fn quote(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

fn quote_path(p: &Path) -> String {
    quote(&p.to_string_lossy())
}

/// How long a TLS handshake may take, in seconds.
const TLS_TIMEOUT_SECS: u32 = 2;

/// How long nats-server waits for the authenticator's answer to a callout (its
/// `authorization { timeout }`, which bounds the callout as well as the CONNECT), in
/// seconds. Left to the server it is 2 s, or 3 s with TLS; a leader election in the store
/// takes about that long, so an admission that arrives during one would be refused for
/// want of time. The authenticator answers within
/// [`super::authenticator::ANSWER_WITHIN`], a second less.
pub const CALLOUT_TIMEOUT_SECS: u32 = 4;

/// Accounts, system account and the auth-callout block. `service_user` (and
/// `system_user`, if given: a `SYS` user for server-side disconnects) bypass the callout.
pub fn callout_config(issuer: &str, service_user: &str, system_user: Option<&str>) -> String {
    callout_config_with_app(issuer, service_user, None, system_user)
}

/// [`callout_config`] with the node's own `APP` user (`app_user`): it bypasses the callout
/// too and lands in `APP`, where it serves the control plane and keeps the `ROOMS` stream
/// (room history lives in the account the clients publish in, so no import is needed).
pub fn callout_config_with_app(
    issuer: &str,
    service_user: &str,
    app_user: Option<&str>,
    system_user: Option<&str>,
) -> String {
    let mut auth_users = vec![quote(service_user)];
    let app_users = match app_user {
        Some(user) => {
            auth_users.push(quote(user));
            format!("\n    users: [ {{ nkey: {} }} ]", quote(user))
        }
        None => String::new(),
    };
    let sys_users = match system_user {
        Some(user) => {
            auth_users.push(quote(user));
            format!("\n    users: [ {{ nkey: {} }} ]\n  ", quote(user))
        }
        None => String::new(),
    };
    format!(
        "accounts {{
  AUTH {{
    jetstream: enabled
    users: [ {{ nkey: {service} }} ]
  }}
  APP {{
    jetstream: enabled{app_users}
  }}
  SYS {{{sys_users}}}
}}
system_account: SYS
authorization {{
  timeout: {CALLOUT_TIMEOUT_SECS}
  auth_callout {{
    issuer: {issuer}
    auth_users: [ {auth_users} ]
    account: AUTH
  }}
}}
",
        service = quote(service_user),
        issuer = quote(issuer),
        auth_users = auth_users.join(", "),
    )
}

/// The client listener's `tls {}` block.
pub fn tls_config(cert: &Path, key: &Path, ca: &Path) -> String {
    tls_block(cert, key, ca, false)
}

/// The `tls {}` block for inside `cluster {}`: mutual TLS between routes.
pub fn route_tls_config(cert: &Path, key: &Path, ca: &Path) -> String {
    tls_block(cert, key, ca, true)
}

fn tls_block(cert: &Path, key: &Path, ca: &Path, verify: bool) -> String {
    format!(
        "tls {{
  cert_file: {}
  key_file: {}
  ca_file: {}
  verify: {verify}
  timeout: {TLS_TIMEOUT_SECS}
}}
",
        quote_path(cert),
        quote_path(key),
        quote_path(ca),
    )
}

/// The `authorization {}` block for inside `cluster {}`. Peers dial with
/// [`RouteCredentials::route_url`].
pub fn route_authorization(credentials: &RouteCredentials) -> String {
    format!(
        "authorization {{
  user: {}
  password: {}
  timeout: {TLS_TIMEOUT_SECS}
}}
",
        quote(&credentials.user),
        quote(&credentials.password),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_callout_block_names_issuer_users_and_account() {
        let text = callout_config("AISSUER", "USERVICE", None);
        assert!(text.contains("issuer: \"AISSUER\""));
        assert!(text.contains("auth_users: [ \"USERVICE\" ]"));
        assert!(text.contains("users: [ { nkey: \"USERVICE\" } ]"));
        assert!(text.contains("account: AUTH"));
        assert!(text.contains("system_account: SYS"));
        assert!(text.contains(&format!("timeout: {CALLOUT_TIMEOUT_SECS}\n  auth_callout")));
        let with_app = callout_config_with_app("AISSUER", "USERVICE", Some("UAPP"), None);
        assert!(with_app.contains("auth_users: [ \"USERVICE\", \"UAPP\" ]"));
        assert!(
            with_app.contains("APP {\n    jetstream: enabled\n    users: [ { nkey: \"UAPP\" } ]")
        );
        let with_sys = callout_config("AISSUER", "USERVICE", Some("USYS"));
        assert!(with_sys.contains("auth_users: [ \"USERVICE\", \"USYS\" ]"));
        assert!(with_sys.contains("SYS {\n    users: [ { nkey: \"USYS\" } ]"));
    }

    #[test]
    fn values_cannot_break_out_of_their_field() {
        let text = callout_config("A\"\n}\nauthorization {", "U", None);
        assert!(text.contains(r#"issuer: "A\"\n}\nauthorization {""#));
        let tls = tls_config(Path::new("/a b/c\".crt"), Path::new("/k"), Path::new("/ca"));
        assert!(tls.contains(r#"cert_file: "/a b/c\".crt""#));
        assert!(tls.contains("verify: false"));
        assert!(
            route_tls_config(Path::new("/c"), Path::new("/k"), Path::new("/ca"))
                .contains("verify: true")
        );
        let auth = route_authorization(&RouteCredentials {
            user: "route-x".into(),
            password: "p".into(),
        });
        assert!(auth.contains("user: \"route-x\"") && auth.contains("password: \"p\""));
    }
}
