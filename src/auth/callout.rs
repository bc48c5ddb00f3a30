//! The auth callout, as pure functions: read nats-server's question, check the client's
//! proof of key, and write the signed answer.
//!
//! nats-server (config mode, checked on 2.15.1) hands every client that is not in
//! `auth_users` to the callout: it publishes a JWT on `$SYS.REQ.USER.AUTH` in the `AUTH`
//! account and waits (`authorization { timeout }`, 4 s as unibus configures it) for a JWT on the reply subject.
//!
//! **The request** ([`decode_request`]) is signed by the server's own nkey (`iss`, an `N…`
//! key; `aud` = `nats-authorization-request`, `sub` = the configured issuer account). Under
//! `nats` it carries `type: "authorization_request"`, `server_id {name, host, id, …}`,
//! `user_nkey` (a user key the server generated for *this* connection attempt),
//! `client_info {host, id, name, kind, type, nonce, …}`, `connect_opts {nkey, sig, name, …}`
//! and `client_tls`. The server puts its INFO nonce into `client_info.nonce` only when the
//! client sent a signature.
//!
//! **Proof of key** ([`verify_client_nonce`]): the client signed the server's nonce (the
//! nonce string's bytes) with its nkey; `connect_opts.sig` is base64url without padding
//! (async-nats, nats.go), and like nats-server we also accept standard base64. This is the
//! only thing that binds the connection to `connect_opts.nkey`: the callout must check it,
//! since the server does not for callout users.
//!
//! **The answer** ([`allow_response`], [`deny_response`]) is a JWT signed by the issuer
//! account key with `sub` = the request's `user_nkey` (a replayed answer for another attempt
//! fails: the server checks this), `aud` = the server's id, and `nats.type =
//! "authorization_response"`. It holds either `nats.jwt`, a user JWT (issued by the same
//! account key, `sub` = `user_nkey`, `aud` = the account to land in, `APP`, with the
//! connection's pub/sub allow lists), or `nats.error` with the reason for a denial.
//!
//! Trust: the request's signature proves integrity, not who the server is (servers make
//! a fresh key each start). What keeps strangers from asking is the subject itself: only
//! the `AUTH` account can publish `$SYS.REQ.USER.AUTH` there, and only the node service user
//! lives in `AUTH`.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use nkeys::{KeyPair, KeyPairType};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::jwt::{self, JwtError};
use crate::membership::api::inbox_prefix;

/// The account admitted clients land in.
pub const APP_ACCOUNT: &str = "APP";
/// Where nats-server sends authorization requests.
pub const AUTH_SUBJECT: &str = "$SYS.REQ.USER.AUTH";
/// The `aud` of every request nats-server sends.
pub const REQUEST_AUDIENCE: &str = "nats-authorization-request";
/// How far past its `exp` a request is still answered (clocks of other nodes' servers).
pub const EXPIRY_LEEWAY_SECS: u64 = 5;

/// Why a request could not be read or a client's proof did not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CalloutError {
    #[error("authorization request: {0}")]
    Jwt(#[from] JwtError),
    #[error("authorization request is signed by {issuer}, not by a server key (N…)")]
    NotFromServer { issuer: String },
    #[error("authorization request has type {found:?}, expected \"authorization_request\"")]
    WrongType { found: String },
    #[error("authorization request: {0}")]
    Malformed(String),
    #[error("authorization request expired at {exp} (now {now})")]
    Expired { exp: u64, now: u64 },
    #[error("client offered no nkey")]
    NoNkey,
    #[error("client nkey {0:?} is not a user public key (U…)")]
    NotUserKey(String),
    #[error("client sent no nonce signature")]
    NoSignature,
    #[error("server sent no nonce to check the client's signature against")]
    NoNonce,
    #[error("client's nonce signature does not verify for its nkey")]
    BadNonceSignature,
    #[error(
        "request is for issuer {requested}, but this node signs as {ours}; the nodes' issuer keys differ"
    )]
    IssuerMismatch { requested: String, ours: String },
    #[error("cannot sign the response: {0}")]
    Sign(String),
}

/// What the server told us about one connection attempt.
#[derive(Debug, Clone)]
pub struct AuthRequest {
    /// The requesting server's nkey (`N…`); the request verified against it.
    pub server_key: String,
    /// `server_id.id`: the `aud` of our answer.
    pub server_id: String,
    pub server_name: String,
    /// The request's `sub`: the issuer account the server expects the answer from.
    pub issuer: String,
    /// The per-attempt user key the server generated: `sub` of our answer and user JWT.
    pub user_nkey: String,
    /// `connect_opts.nkey`: the key the client claims (unproven until
    /// [`verify_client_nonce`]).
    pub client_nkey: Option<String>,
    /// `connect_opts.sig`: the client's signature over the nonce.
    pub client_sig: Option<String>,
    /// `client_info.nonce`: the nonce the server gave this client.
    pub nonce: Option<String>,
    /// `connect_opts.name`, if the client set one.
    pub client_name: Option<String>,
    /// `client_info.host`.
    pub client_host: Option<String>,
    /// Whether the client connected over TLS (`client_tls` present).
    pub tls: bool,
    /// `exp`, unix seconds.
    pub expires: Option<u64>,
}

#[derive(Deserialize)]
struct RequestClaims {
    sub: String,
    #[serde(default)]
    aud: Option<String>,
    #[serde(default)]
    exp: Option<u64>,
    nats: RequestNats,
}

#[derive(Deserialize)]
struct RequestNats {
    #[serde(rename = "type")]
    kind: String,
    server_id: ServerId,
    user_nkey: String,
    #[serde(default)]
    client_info: ClientInfo,
    #[serde(default)]
    connect_opts: ConnectOpts,
    #[serde(default)]
    client_tls: Option<Value>,
}

#[derive(Deserialize)]
struct ServerId {
    #[serde(default)]
    name: String,
    id: String,
}

#[derive(Deserialize, Default)]
struct ClientInfo {
    host: Option<String>,
    nonce: Option<String>,
}

#[derive(Deserialize, Default)]
struct ConnectOpts {
    nkey: Option<String>,
    sig: Option<String>,
    name: Option<String>,
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.is_empty())
}

fn is_key(key: &str, kind: KeyPairType) -> bool {
    KeyPair::from_public_key(key).is_ok_and(|k| k.key_pair_type() == kind)
}

/// Decodes and verifies the JWT nats-server sent on [`AUTH_SUBJECT`] (the message payload).
pub fn decode_request(raw: &[u8]) -> Result<AuthRequest, CalloutError> {
    let verified = jwt::decode(raw)?;
    if !is_key(&verified.issuer, KeyPairType::Server) {
        return Err(CalloutError::NotFromServer {
            issuer: verified.issuer,
        });
    }
    let claims: RequestClaims = serde_json::from_value(Value::Object(verified.claims))
        .map_err(|e| CalloutError::Malformed(e.to_string()))?;
    if claims.nats.kind != "authorization_request" {
        return Err(CalloutError::WrongType {
            found: claims.nats.kind,
        });
    }
    if claims.aud.as_deref() != Some(REQUEST_AUDIENCE) {
        return Err(CalloutError::Malformed(format!(
            "aud is {:?}, expected {REQUEST_AUDIENCE:?}",
            claims.aud
        )));
    }
    if !is_key(&claims.nats.user_nkey, KeyPairType::User) {
        return Err(CalloutError::Malformed(
            "user_nkey is not a user public key".into(),
        ));
    }
    if !is_key(&claims.nats.server_id.id, KeyPairType::Server) {
        return Err(CalloutError::Malformed(
            "server_id.id is not a server public key".into(),
        ));
    }
    let now = jwt::now_secs();
    if let Some(exp) = claims.exp
        && now > exp + EXPIRY_LEEWAY_SECS
    {
        return Err(CalloutError::Expired { exp, now });
    }
    let nats = claims.nats;
    Ok(AuthRequest {
        server_key: verified.issuer,
        server_id: nats.server_id.id,
        server_name: nats.server_id.name,
        issuer: claims.sub,
        user_nkey: nats.user_nkey,
        client_nkey: non_empty(nats.connect_opts.nkey),
        client_sig: non_empty(nats.connect_opts.sig),
        nonce: non_empty(nats.client_info.nonce),
        client_name: non_empty(nats.connect_opts.name),
        client_host: non_empty(nats.client_info.host),
        tls: nats.client_tls.is_some(),
        expires: claims.exp,
    })
}

/// Checks the client's signature over the server's nonce; returns the proven user key.
pub fn verify_client_nonce(request: &AuthRequest) -> Result<String, CalloutError> {
    let nkey = request.client_nkey.as_deref().ok_or(CalloutError::NoNkey)?;
    let key = KeyPair::from_public_key(nkey)
        .ok()
        .filter(|k| k.key_pair_type() == KeyPairType::User)
        .ok_or_else(|| CalloutError::NotUserKey(nkey.to_string()))?;
    let sig = request
        .client_sig
        .as_deref()
        .ok_or(CalloutError::NoSignature)?;
    let nonce = request.nonce.as_deref().ok_or(CalloutError::NoNonce)?;
    let sig = URL_SAFE_NO_PAD
        .decode(sig)
        .or_else(|_| STANDARD.decode(sig))
        .map_err(|_| CalloutError::BadNonceSignature)?;
    key.verify(nonce.as_bytes(), &sig)
        .map_err(|_| CalloutError::BadNonceSignature)?;
    Ok(key.public_key())
}

/// A connection's allow lists (everything else is denied), and subjects denied to it
/// although allowed (a deny wins).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Permissions {
    pub pub_allow: Vec<String>,
    pub sub_allow: Vec<String>,
    pub sub_deny: Vec<String>,
}

/// DESIGN §2's room id: `^[a-z0-9][a-z0-9_-]{0,62}$`, so it is one subject token.
pub fn is_room_id(id: &str) -> bool {
    let mut bytes = id.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_lowercase() || b.is_ascii_digit())
        && id.len() <= 63
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// The subjects of DESIGN §3 for user `key`, a joined member of `rooms`.
///
/// Everyone admitted: publish the control plane's public subjects `unibus.ctl.*.*` (every
/// operation is two tokens) and micro discovery (`$SRV.PING|INFO|STATS` and their `.>`);
/// subscribe `_INBOX.<key>.>` (replies, JetStream publish acks) and no other inbox: a reply
/// sent there reaches only this key's connections, which is what lets reads go unsigned
/// (`membership::api::inbox_prefix`). A user key also publishes its own control subjects,
/// `unibus.ctl.*.*.<key>` and, naming a node, `unibus.ctl.*.*.<key>.*`, and nobody else's:
/// a write sent there needs no replay ledger (`auth::envelope`). For each room:
///
/// - publish only `unibus.room.<room>.<key>`: a message's subject names its sender, and
///   the server, not the publisher, vouches for it (see `membership::history`);
/// - subscribe `unibus.room.<room>.>` (live, core NATS) and
///   `unibus.deliver.<room>.<key>.>` (the feeds the control plane opens for this user:
///   history and live, with stream sequences);
/// - live mode (core NATS, never stored; see `client::live`): publish only
///   `unibus.live.<room>.<key>` (the server vouches for the sender here too) and subscribe
///   `unibus.live.<room>.>`.
///
/// No `$JS.API.>`: clients never touch the JetStream API, so nobody can create a consumer
/// that reads a room they are not in. An id that is not a valid room id (or a key that is
/// not a user key) is skipped, never turned into a wildcard. `is_admin` adds no subjects:
/// admin rights are enforced by the control plane, which sees the caller's verified key.
/// Lists are sorted and free of duplicates.
pub fn permissions_for(key: &str, rooms: &[String], is_admin: bool) -> Permissions {
    let _ = is_admin;
    let mut pub_allow: Vec<String> = [
        "unibus.ctl.*.*",
        "$SRV.PING",
        "$SRV.PING.>",
        "$SRV.INFO",
        "$SRV.INFO.>",
        "$SRV.STATS",
        "$SRV.STATS.>",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut sub_allow = Vec::new();
    if is_key(key, KeyPairType::User) {
        sub_allow.push(format!("{}.>", inbox_prefix(key)));
        pub_allow.push(format!("unibus.ctl.*.*.{key}"));
        pub_allow.push(format!("unibus.ctl.*.*.{key}.*"));
        for room in rooms.iter().filter(|r| is_room_id(r)) {
            pub_allow.push(format!("unibus.room.{room}.{key}"));
            sub_allow.push(format!("unibus.room.{room}.>"));
            sub_allow.push(format!("unibus.deliver.{room}.{key}.>"));
            pub_allow.push(format!("unibus.live.{room}.{key}"));
            sub_allow.push(format!("unibus.live.{room}.>"));
        }
    }
    for list in [&mut pub_allow, &mut sub_allow] {
        list.sort();
        list.dedup();
    }
    Permissions {
        pub_allow,
        sub_allow,
        sub_deny: Vec::new(),
    }
}

fn check_issuer(request: &AuthRequest, issuer: &KeyPair) -> Result<(), CalloutError> {
    let ours = issuer.public_key();
    if request.issuer != ours {
        return Err(CalloutError::IssuerMismatch {
            requested: request.issuer.clone(),
            ours,
        });
    }
    Ok(())
}

fn response(request: &AuthRequest, nats: Value, issuer: &KeyPair) -> Result<String, CalloutError> {
    let mut claims = Map::new();
    claims.insert("sub".into(), request.user_nkey.clone().into());
    claims.insert("aud".into(), request.server_id.clone().into());
    claims.insert("nats".into(), nats);
    jwt::encode(claims, issuer).map_err(|e| CalloutError::Sign(e.to_string()))
}

/// The longest JWT nats-server decodes (its JWT library's token limit, 1 MiB; a longer
/// callout answer is rejected as "token too large").
pub const MAX_JWT_BYTES: usize = 1 << 20;

/// [`allow_response`], made to fit: in [`MAX_JWT_BYTES`], and in `max_payload`, the
/// largest message the answering connection may publish. A user's permissions grow by
/// about a kilobyte per joined room (five subjects, signed and base64-encoded twice), so a
/// user in about a thousand rooms with long ids has more than fits; such an answer used to
/// be dropped (never sent, or rejected), and the server refused the client when its
/// callout timed out, again at every attempt. Now such a user is admitted with the subjects
/// of a user in no room: the control plane and their own inbox, a subset of what they may
/// do, so they can still connect and leave rooms. Returns the JWT and whether the rooms
/// were left out.
pub fn fitted_allow_response(
    request: &AuthRequest,
    permissions: &Permissions,
    issuer: &KeyPair,
    max_payload: usize,
) -> Result<(String, bool), CalloutError> {
    let jwt = allow_response(request, permissions, issuer, None)?;
    match &request.client_nkey {
        Some(key) if jwt.len() > max_payload.min(MAX_JWT_BYTES) => {
            let without_rooms = permissions_for(key, &[], false);
            Ok((allow_response(request, &without_rooms, issuer, None)?, true))
        }
        _ => Ok((jwt, false)),
    }
}

/// Admits the connection into [`APP_ACCOUNT`] with `permissions`, signed by the callout
/// `issuer` (account key). With `expiry`, the server disconnects the client when it runs
/// out, so it reconnects and is checked again.
pub fn allow_response(
    request: &AuthRequest,
    permissions: &Permissions,
    issuer: &KeyPair,
    expiry: Option<Duration>,
) -> Result<String, CalloutError> {
    check_issuer(request, issuer)?;
    let mut user = Map::new();
    user.insert("sub".into(), request.user_nkey.clone().into());
    user.insert("aud".into(), APP_ACCOUNT.into());
    if let Some(key) = &request.client_nkey {
        // Shown as the connection's user in the server's monitoring (connz).
        user.insert("name".into(), key.clone().into());
    }
    if let Some(expiry) = expiry {
        user.insert(
            "exp".into(),
            (jwt::now_secs() + expiry.as_secs().max(1)).into(),
        );
    }
    user.insert(
        "nats".into(),
        json!({
            "pub": { "allow": permissions.pub_allow },
            "sub": if permissions.sub_deny.is_empty() {
                json!({ "allow": permissions.sub_allow })
            } else {
                json!({ "allow": permissions.sub_allow, "deny": permissions.sub_deny })
            },
            "subs": -1,
            "data": -1,
            "payload": -1,
            "type": "user",
            "version": 2,
        }),
    );
    let user_jwt = jwt::encode(user, issuer).map_err(|e| CalloutError::Sign(e.to_string()))?;
    response(
        request,
        json!({ "jwt": user_jwt, "type": "authorization_response", "version": 2 }),
        issuer,
    )
}

/// Refuses the connection; `reason` lands in the server's log (the client only sees
/// "Authorization Violation").
pub fn deny_response(
    request: &AuthRequest,
    reason: &str,
    issuer: &KeyPair,
) -> Result<String, CalloutError> {
    check_issuer(request, issuer)?;
    let reason = if reason.trim().is_empty() {
        "not authorized"
    } else {
        reason
    };
    response(
        request,
        json!({ "error": reason, "type": "authorization_response", "version": 2 }),
        issuer,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a request the way nats-server 2.15 does (field names from nats-io/jwt v2).
    fn request_jwt(
        server: &KeyPair,
        issuer: &str,
        client: Option<&KeyPair>,
        nonce: &str,
    ) -> String {
        let (nkey, sig) = match client {
            Some(c) => (
                c.public_key(),
                URL_SAFE_NO_PAD.encode(c.sign(nonce.as_bytes()).unwrap()),
            ),
            None => (String::new(), String::new()),
        };
        let mut claims = Map::new();
        claims.insert("sub".into(), issuer.into());
        claims.insert("aud".into(), REQUEST_AUDIENCE.into());
        claims.insert("exp".into(), (jwt::now_secs() + 2).into());
        claims.insert(
            "nats".into(),
            json!({
                "server_id": {"name": "n1", "host": "127.0.0.1", "id": server.public_key(), "version": "2.15.1"},
                "user_nkey": KeyPair::new_user().public_key(),
                "client_info": {"host": "127.0.0.1", "id": 7, "kind": "Client", "type": "nats",
                                 "nonce": if sig.is_empty() { "" } else { nonce }},
                "connect_opts": {"nkey": nkey, "sig": sig, "lang": "rust", "version": "0.51", "protocol": 1},
                "type": "authorization_request",
                "version": 2,
            }),
        );
        jwt::encode(claims, server).unwrap()
    }

    #[test]
    fn a_request_decodes_and_the_client_proves_its_key() {
        let server = KeyPair::new_server();
        let issuer = KeyPair::new_account();
        let client = KeyPair::new_user();
        let raw = request_jwt(&server, &issuer.public_key(), Some(&client), "n0nce");
        let req = decode_request(raw.as_bytes()).unwrap();
        assert_eq!(req.server_id, server.public_key());
        assert_eq!(req.server_name, "n1");
        assert_eq!(req.issuer, issuer.public_key());
        assert_eq!(verify_client_nonce(&req).unwrap(), client.public_key());

        // Standard base64 (with padding) is accepted too, as nats-server does.
        let mut std_sig = req.clone();
        std_sig.client_sig = Some(STANDARD.encode(client.sign(b"n0nce").unwrap()));
        assert!(verify_client_nonce(&std_sig).is_ok());
    }

    #[test]
    fn a_wrong_signature_missing_proof_or_foreign_key_is_refused() {
        let server = KeyPair::new_server();
        let issuer = KeyPair::new_account().public_key();
        let client = KeyPair::new_user();
        let req = decode_request(request_jwt(&server, &issuer, Some(&client), "n0nce").as_bytes())
            .unwrap();

        let mut other_key = req.clone();
        other_key.client_nkey = Some(KeyPair::new_user().public_key());
        assert_eq!(
            verify_client_nonce(&other_key),
            Err(CalloutError::BadNonceSignature)
        );
        let mut other_nonce = req.clone();
        other_nonce.nonce = Some("another".into());
        assert_eq!(
            verify_client_nonce(&other_nonce),
            Err(CalloutError::BadNonceSignature)
        );
        let mut garbage = req.clone();
        garbage.client_sig = Some("%%%".into());
        assert_eq!(
            verify_client_nonce(&garbage),
            Err(CalloutError::BadNonceSignature)
        );
        let mut account = req.clone();
        account.client_nkey = Some(issuer.clone());
        assert!(matches!(
            verify_client_nonce(&account),
            Err(CalloutError::NotUserKey(_))
        ));

        let anonymous =
            decode_request(request_jwt(&server, &issuer, None, "n0nce").as_bytes()).unwrap();
        assert_eq!(verify_client_nonce(&anonymous), Err(CalloutError::NoNkey));
        let mut unsigned = req.clone();
        unsigned.client_sig = None;
        assert_eq!(
            verify_client_nonce(&unsigned),
            Err(CalloutError::NoSignature)
        );
    }

    #[test]
    fn requests_not_signed_by_a_server_or_tampered_are_refused() {
        let issuer = KeyPair::new_account();
        // Signed by an account key instead of a server key.
        let raw = request_jwt(&issuer, &issuer.public_key(), None, "n");
        assert!(matches!(
            decode_request(raw.as_bytes()),
            Err(CalloutError::NotFromServer { .. })
        ));
        // Payload swapped under the signature.
        let server = KeyPair::new_server();
        let a = request_jwt(&server, &issuer.public_key(), None, "n");
        let b = request_jwt(&server, &KeyPair::new_account().public_key(), None, "n");
        let (pa, pb): (Vec<&str>, Vec<&str>) = (a.split('.').collect(), b.split('.').collect());
        let spliced = format!("{}.{}.{}", pa[0], pb[1], pa[2]);
        assert_eq!(
            decode_request(spliced.as_bytes()).unwrap_err(),
            CalloutError::Jwt(JwtError::BadSignature)
        );
        assert!(decode_request(b"not a jwt").is_err());
    }

    #[test]
    fn responses_carry_what_the_server_checks() {
        let server = KeyPair::new_server();
        let issuer = KeyPair::new_account();
        let client = KeyPair::new_user();
        let req = decode_request(
            request_jwt(&server, &issuer.public_key(), Some(&client), "x").as_bytes(),
        )
        .unwrap();
        let perms = permissions_for(&client.public_key(), &["r1".into()], false);
        let raw = allow_response(&req, &perms, &issuer, Some(Duration::from_secs(60))).unwrap();
        let resp = jwt::decode(raw.as_bytes()).unwrap();
        assert_eq!(resp.issuer, issuer.public_key());
        assert_eq!(resp.claims["sub"], req.user_nkey.as_str());
        assert_eq!(resp.claims["aud"], server.public_key().as_str());
        assert_eq!(resp.claims["nats"]["type"], "authorization_response");
        let user = jwt::decode(resp.claims["nats"]["jwt"].as_str().unwrap().as_bytes()).unwrap();
        assert_eq!(user.issuer, issuer.public_key());
        assert_eq!(user.claims["sub"], req.user_nkey.as_str());
        assert_eq!(user.claims["aud"], APP_ACCOUNT);
        assert_eq!(user.claims["name"], client.public_key().as_str());
        assert_eq!(user.claims["nats"]["type"], "user");
        assert_eq!(user.claims["nats"]["version"], 2);
        assert_eq!(user.claims["nats"]["pub"]["allow"], json!(perms.pub_allow));
        assert!(user.claims["nats"]["sub"].get("deny").is_none());
        assert!(user.claims["exp"].as_u64().unwrap() > jwt::now_secs());
        // A deny list, when there is one, travels beside the allow list.
        let open = Permissions {
            pub_allow: vec![">".into()],
            sub_allow: vec![">".into()],
            sub_deny: vec!["unibus.ctl.>".into()],
        };
        let raw = allow_response(&req, &open, &issuer, None).unwrap();
        let resp = jwt::decode(raw.as_bytes()).unwrap();
        let user = jwt::decode(resp.claims["nats"]["jwt"].as_str().unwrap().as_bytes()).unwrap();
        assert_eq!(
            user.claims["nats"]["sub"],
            json!({ "allow": [">"], "deny": ["unibus.ctl.>"] })
        );

        let deny = jwt::decode(deny_response(&req, "", &issuer).unwrap().as_bytes()).unwrap();
        assert_eq!(deny.claims["nats"]["error"], "not authorized");
        assert!(deny.claims["nats"].get("jwt").is_none());

        let stranger = KeyPair::new_account();
        assert!(matches!(
            allow_response(&req, &perms, &stranger, None),
            Err(CalloutError::IssuerMismatch { .. })
        ));
    }

    #[test]
    fn an_answer_too_large_to_send_admits_without_the_rooms() {
        let server = KeyPair::new_server();
        let issuer = KeyPair::new_account();
        let client = KeyPair::new_user();
        let key = client.public_key();
        let req = decode_request(
            request_jwt(&server, &issuer.public_key(), Some(&client), "x").as_bytes(),
        )
        .unwrap();
        let rooms: Vec<String> = (0..200).map(|i| format!("{:a>55}{i:08}", "")).collect();
        let perms = permissions_for(&key, &rooms, false);
        let user_perms = |raw: &str| {
            let resp = jwt::decode(raw.as_bytes()).unwrap();
            let user =
                jwt::decode(resp.claims["nats"]["jwt"].as_str().unwrap().as_bytes()).unwrap();
            user.claims["nats"]["pub"]["allow"].clone()
        };

        // It fits: every room's subjects, and about a kilobyte per room.
        let (jwt, left_out) = fitted_allow_response(&req, &perms, &issuer, 1 << 20).unwrap();
        assert!(!left_out);
        assert_eq!(user_perms(&jwt), json!(perms.pub_allow));
        assert!(jwt.len() > 200 * 900, "{} bytes for 200 rooms", jwt.len());

        // It does not: the control plane only, which does fit.
        let (small, left_out) =
            fitted_allow_response(&req, &perms, &issuer, jwt.len() - 1).unwrap();
        assert!(left_out);
        assert!(small.len() < jwt.len() - 1);
        assert_eq!(
            user_perms(&small),
            json!(permissions_for(&key, &[], false).pub_allow)
        );
    }

    #[test]
    fn permissions_follow_design_section_3() {
        let key = KeyPair::new_user().public_key();
        let p = permissions_for(&key, &["r1".into(), "r1".into(), "team-a_2".into()], false);
        assert_eq!(
            p.sub_allow,
            vec![
                format!("_INBOX.{key}.>"),
                format!("unibus.deliver.r1.{key}.>"),
                format!("unibus.deliver.team-a_2.{key}.>"),
                "unibus.live.r1.>".to_string(),
                "unibus.live.team-a_2.>".to_string(),
                "unibus.room.r1.>".to_string(),
                "unibus.room.team-a_2.>".to_string(),
            ]
        );
        for s in [
            "unibus.ctl.*.*",
            &format!("unibus.ctl.*.*.{key}"),
            "$SRV.PING",
            "$SRV.INFO.>",
            "$SRV.STATS",
            &format!("unibus.room.r1.{key}"),
        ] {
            assert!(p.pub_allow.iter().any(|x| x == s), "{s}");
        }
        // Nobody else's own control subjects: no `unibus.ctl.>`, no other key's.
        assert!(!p.pub_allow.iter().any(|s| s == "unibus.ctl.>"));
        let own: Vec<&String> = p
            .pub_allow
            .iter()
            .filter(|s| s.starts_with("unibus.ctl.") && s.split('.').count() > 4)
            .collect();
        assert_eq!(
            own,
            vec![
                &format!("unibus.ctl.*.*.{key}"),
                &format!("unibus.ctl.*.*.{key}.*")
            ]
        );
        // A member publishes only as itself (the subject names the sender), and nobody
        // reaches the JetStream API.
        assert!(!p.pub_allow.iter().any(|s| s == "unibus.room.r1.>"));
        assert!(!p.sub_allow.iter().any(|s| s.starts_with("unibus.live.>")));
        assert!(
            !p.pub_allow
                .iter()
                .chain(&p.sub_allow)
                .any(|s| s.starts_with("$JS"))
        );
        assert!(!p.sub_allow.iter().any(|s| s.starts_with("unibus.ctl")));
        let live: Vec<&String> = p
            .pub_allow
            .iter()
            .filter(|s| s.starts_with("unibus.live."))
            .collect();
        assert_eq!(
            live,
            vec![
                &format!("unibus.live.r1.{key}"),
                &format!("unibus.live.team-a_2.{key}")
            ],
            "live: one subject per room, the member's own"
        );
        // Nothing that is not a room id (or a user key) becomes a subject.
        for bad in ["*", ">", "a.b", "", "R1", "a b", "é", "-x", &"x".repeat(64)] {
            let p = permissions_for(&key, &[bad.to_string()], true);
            assert_eq!(p.sub_allow, vec![format!("_INBOX.{key}.>")], "{bad:?}");
        }
        for bad_key in ["*", ">", "U.X", "", &KeyPair::new_account().public_key()] {
            let p = permissions_for(bad_key, &["r1".into()], false);
            assert!(p.sub_allow.is_empty(), "{bad_key:?}");
            assert!(
                !p.pub_allow.iter().any(|s| s.starts_with("unibus.ctl.*.*.")),
                "{bad_key:?}"
            );
        }
        assert!(is_room_id(&"x".repeat(63)));
    }
}
