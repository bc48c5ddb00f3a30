//! The control-plane wire contract: operations, request bodies, replies and typed errors.
//!
//! The service (`service.rs`) and the client library both use these types, so the two
//! sides cannot disagree about a field name. Every operation is one NATS micro endpoint,
//! `unibus.ctl.<op>`, and every write two more, `unibus.ctl.<op>.<key>` and
//! `unibus.ctl.<op>.<key>.<node>`, where only `<key>`'s connections may publish (so no
//! replay ledger is needed there; see `auth::envelope`); the request is a signed envelope
//! (for a read, a connection-bound one) whose `body` is the operation's
//! request struct; the reply is `{"ok": …}` or `{"error": {"kind", "message"}}`, and an
//! error also sets the micro error headers (`Nats-Service-Error`, `Nats-Service-Error-Code`)
//! so generic NATS tooling sees the failure.

use serde::{Deserialize, Serialize};

use super::StoreError;

/// Subject prefix of the control plane.
pub const CTL_PREFIX: &str = "unibus.ctl";
/// The micro service's name (`$SRV.PING.unibus-membership` etc.).
pub const SERVICE_NAME: &str = "unibus-membership";

/// A reply header an `enforce` node of a finalized cluster sets on its answers to writes
/// on own subjects: it no longer checks their signatures (`membership::version`), so the
/// client may stop making them. Any value means yes.
pub const OWN_UNSIGNED_HEADER: &str = "Unibus-Own-Unsigned";

/// A reply header a node of a cluster finalized at `version::MINIMAL_READS` sets on its
/// answer to a read sent in full: every node now takes a minimal read
/// (`Envelope::minimal`), so the client may send those. Any value means yes.
pub const MINIMAL_READS_HEADER: &str = "Unibus-Minimal-Reads";

/// The reply header carrying a refusal's [`ErrorKind::code`] (the micro service
/// convention), beside `Nats-Service-Error` with its name.
pub const SERVICE_ERROR_CODE_HEADER: &str = "Nats-Service-Error-Code";

/// Every control-plane operation, with its endpoint name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    UsersAdd,
    UsersGet,
    UsersList,
    UsersRevoke,
    RoomsCreate,
    RoomsGet,
    RoomsList,
    RoomsDelete,
    MembersInvite,
    MembersJoin,
    MembersRemove,
    MembersLeave,
    MembersList,
    MembersRooms,
    KeysLatest,
    KeysGet,
    KeysRekey,
    RoomsSubscribe,
    UsersXkey,
    MembersKeys,
}

impl Op {
    pub const ALL: [Op; 20] = [
        Op::UsersAdd,
        Op::UsersGet,
        Op::UsersList,
        Op::UsersRevoke,
        Op::RoomsCreate,
        Op::RoomsGet,
        Op::RoomsList,
        Op::RoomsDelete,
        Op::MembersInvite,
        Op::MembersJoin,
        Op::MembersRemove,
        Op::MembersLeave,
        Op::MembersList,
        Op::MembersRooms,
        Op::KeysLatest,
        Op::KeysGet,
        Op::KeysRekey,
        Op::RoomsSubscribe,
        Op::UsersXkey,
        Op::MembersKeys,
    ];

    /// The endpoint name, also the `op` field of a signed envelope.
    pub fn name(self) -> &'static str {
        match self {
            Op::UsersAdd => "users.add",
            Op::UsersGet => "users.get",
            Op::UsersList => "users.list",
            Op::UsersRevoke => "users.revoke",
            Op::RoomsCreate => "rooms.create",
            Op::RoomsGet => "rooms.get",
            Op::RoomsList => "rooms.list",
            Op::RoomsDelete => "rooms.delete",
            Op::MembersInvite => "members.invite",
            Op::MembersJoin => "members.join",
            Op::MembersRemove => "members.remove",
            Op::MembersLeave => "members.leave",
            Op::MembersList => "members.list",
            Op::MembersRooms => "members.rooms",
            Op::KeysLatest => "keys.latest",
            Op::KeysGet => "keys.get",
            Op::KeysRekey => "keys.rekey",
            Op::RoomsSubscribe => "rooms.subscribe",
            Op::UsersXkey => "users.xkey",
            Op::MembersKeys => "members.keys",
        }
    }

    pub fn from_name(name: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.name() == name)
    }

    /// Operations that only read, and whose reply is all they do. These may be sent
    /// *connection-bound* instead of signed (see [`inbox_prefix`] and
    /// `auth::envelope::verify_bound`): answered only to the caller's own inbox, which the
    /// server lets nobody else subscribe to, a read needs neither a signature nor replay
    /// protection. `rooms.subscribe` reads too, but opens consumers (a side effect), so
    /// it stays signed.
    pub fn is_read(self) -> bool {
        matches!(
            self,
            Op::UsersGet
                | Op::UsersList
                | Op::RoomsGet
                | Op::RoomsList
                | Op::MembersList
                | Op::MembersRooms
                | Op::KeysLatest
                | Op::KeysGet
                | Op::MembersKeys
        )
    }

    /// `unibus.ctl.<op>`
    pub fn subject(self) -> String {
        format!("{CTL_PREFIX}.{}", self.name())
    }

    /// `unibus.ctl.<op>.<key>`: the write's subject that only `key`'s connections may
    /// publish to (writes only; reads are bound to the caller by their reply subject).
    pub fn own_subject(self, key: &str) -> String {
        format!("{CTL_PREFIX}.{}.{key}", self.name())
    }

    /// `unibus.ctl.<op>.<key>.<node>`: `key`'s own subject as served by node `node` alone.
    /// A client sends there first, naming the node its connection is on, so the request
    /// and its reply do not cross a route (nats-server spreads a queue group's messages
    /// over the whole cluster, and two in three would).
    pub fn own_subject_at(self, key: &str, node: &str) -> String {
        format!("{CTL_PREFIX}.{}.{key}.{node}", self.name())
    }

    /// The key whose own subject `subject` is (at any node, or at a named one), if it is
    /// one of this operation's.
    pub fn own_subject_key(self, subject: &str) -> Option<&str> {
        let rest = subject
            .strip_prefix(CTL_PREFIX)?
            .strip_prefix('.')?
            .strip_prefix(self.name())?
            .strip_prefix('.')?;
        let key = match rest.split_once('.') {
            Some((key, node)) if is_token(node) => key,
            Some(_) => return None,
            None => rest,
        };
        is_token(key).then_some(key)
    }
}

/// Whether `s` is one plain subject token: not empty, no `.`, no wildcard, no whitespace.
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| !matches!(b, b'.' | b'*' | b'>') && !b.is_ascii_whitespace())
}

/// `users.add`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddUser {
    pub key: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub admin: bool,
}

/// `users.get`, `users.revoke`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserRef {
    pub key: String,
}

/// A body without arguments (`users.list` took one before pages, and still accepts it).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// The most items a listing's page holds. A reply must fit in one NATS message (1 MiB by
/// default), and the largest item (a user with a long name) is about a kilobyte.
pub const MAX_PAGE: usize = 500;

/// Where a page of a listing starts and how long it is. Listings are in key order (users
/// by key, rooms by id, members by endpoint, memberships by room); `after` is the last key
/// of the previous page. A node answers `limit` items, or all that are left, so a shorter
/// page is the last; a `limit` outside 1..=[`MAX_PAGE`] is refused. Without `limit` the
/// reply holds everything, as before pages, and is refused (`invalid`) when it does not
/// fit in one message.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Page {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// At most [`MAX_PAGE`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

/// `users.list`: a [`Page`] of users.
pub type ListUsers = Page;

/// `members.list`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListMembers {
    pub room: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

/// `rooms.create`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRoom {
    pub room: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub encrypted: bool,
}

/// `rooms.get`, `rooms.delete`, `members.join`, `members.leave`, `keys.latest`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoomRef {
    pub room: String,
}

/// `rooms.list`, `members.rooms`: the caller's own rooms, or (admins) another user's; a
/// page of them as [`Page`] says.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForUser {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

/// `members.invite`, `members.remove`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberRef {
    pub room: String,
    pub key: String,
}

/// `keys.get`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRef {
    pub room: String,
    pub epoch: u32,
}

/// `keys.rekey`: the new epoch's key material (base64; wrapped per member once E2E
/// encryption lands, so the store never holds a plaintext room key).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rekey {
    pub room: String,
    pub material: String,
}

/// `users.xkey`: the caller registers its own curve public key (`X…`) for end-to-end
/// encrypted rooms.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetXkey {
    pub xkey: String,
}

/// One entry of `members.keys`: a member of the room and its registered xkey, if any
/// (what an owner wraps a new epoch's room key for).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberKey {
    pub key: String,
    #[serde(default)]
    pub xkey: Option<String>,
}

/// Where a room feed starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Start {
    /// The room's whole stored history.
    #[default]
    All,
    /// Only messages stored after the feed is opened.
    New,
    /// Messages with a stream sequence greater than this one.
    After(u64),
}

/// `rooms.subscribe`: open a feed of a room's messages (history, then live) onto
/// `unibus.deliver.<room>.<caller>.<inbox>`, a subject only the caller may subscribe to.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscribeRoom {
    pub room: String,
    /// The caller's choice of last token (`[A-Za-z0-9_-]{1,64}`), so it can subscribe
    /// before the feed starts and miss nothing.
    pub inbox: String,
    #[serde(default)]
    pub start: Start,
}

/// The reply to `rooms.subscribe`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Feed {
    /// The server-side consumer (ephemeral; it goes away when nobody listens).
    pub consumer: String,
    /// Where messages arrive.
    pub subject: String,
    /// The stream sequence the feed starts after: everything up to it is not delivered.
    pub after: u64,
    /// The server sends an idle heartbeat this often; missing three means the feed is gone.
    pub heartbeat_ms: u64,
}

/// The JetStream stream (in `APP`) holding every room's messages.
pub const ROOMS_STREAM: &str = "ROOMS";
/// Room messages: `unibus.room.<room>.<sender key>`.
pub const ROOM_PREFIX: &str = "unibus.room";
/// The root of every reply inbox.
pub const INBOX_ROOT: &str = "_INBOX";

/// `_INBOX.<user key>`: the inbox prefix of a client connected as `key`. The authenticator
/// lets that connection subscribe to `_INBOX.<key>.>` and to no other inbox, so a reply
/// sent under this prefix reaches only the holder of `key`'s seed. Clients must connect
/// with it (`ConnectOptions::custom_inbox_prefix`), or they get no replies.
pub fn inbox_prefix(key: &str) -> String {
    format!("{INBOX_ROOT}.{key}")
}

/// The key whose connections `reply` is an inbox of (`_INBOX.<key>.<more>`), unchecked:
/// the caller validates it as a user key.
pub fn inbox_owner(reply: &str) -> Option<&str> {
    let rest = reply.strip_prefix(INBOX_ROOT)?.strip_prefix('.')?;
    let (key, more) = rest.split_once('.')?;
    (!key.is_empty() && !more.is_empty()).then_some(key)
}

/// Whether `reply` is an inbox of `key`'s connections (`_INBOX.<key>.<more>`).
pub fn is_inbox_of(reply: &str, key: &str) -> bool {
    reply
        .strip_prefix(INBOX_ROOT)
        .and_then(|r| r.strip_prefix('.'))
        .and_then(|r| r.strip_prefix(key))
        .and_then(|r| r.strip_prefix('.'))
        .is_some_and(|rest| !rest.is_empty())
}

/// Feeds: `unibus.deliver.<room>.<listener key>.<inbox>`.
pub const DELIVER_PREFIX: &str = "unibus.deliver";
/// Live room messages (core NATS, never stored): `unibus.live.<room>.<sender key>`. A
/// namespace of their own because the `ROOMS` stream captures everything under
/// [`ROOM_PREFIX`]: a live message there would be stored (and cost a replicated write)
/// like a durable one.
pub const LIVE_PREFIX: &str = "unibus.live";

/// The subject `sender` publishes `room` messages on. The authenticator allows each user
/// exactly their own key's subject, so the last token is a sender identity the server
/// vouches for.
pub fn room_subject(room: &str, sender: &str) -> String {
    format!("{ROOM_PREFIX}.{room}.{sender}")
}

/// Every message of `room`.
pub fn room_filter(room: &str) -> String {
    format!("{ROOM_PREFIX}.{room}.>")
}

/// Where a feed for `listener` in `room` is delivered.
pub fn deliver_subject(room: &str, listener: &str, inbox: &str) -> String {
    format!("{DELIVER_PREFIX}.{room}.{listener}.{inbox}")
}

/// The sender key of a message on `subject` in `room` (None if it is not a room subject).
pub fn sender_of<'a>(subject: &'a str, room: &str) -> Option<&'a str> {
    last_token_under(subject, ROOM_PREFIX, room)
}

/// The subject `sender` publishes live `room` messages on; like [`room_subject`], the
/// authenticator allows each member exactly its own key's subject.
pub fn live_subject(room: &str, sender: &str) -> String {
    // Concatenated rather than `format!`ed: a live send builds one per message.
    let mut subject = String::with_capacity(LIVE_PREFIX.len() + room.len() + sender.len() + 2);
    for part in [LIVE_PREFIX, ".", room, ".", sender] {
        subject.push_str(part);
    }
    subject
}

/// Every live message of `room` (what members may subscribe to).
pub fn live_filter(room: &str) -> String {
    format!("{LIVE_PREFIX}.{room}.>")
}

/// The sender key of a live message on `subject` in `room` (None if it is not exactly
/// `unibus.live.<room>.<one token>`).
pub fn live_sender_of<'a>(subject: &'a str, room: &str) -> Option<&'a str> {
    last_token_under(subject, LIVE_PREFIX, room)
}

/// `<prefix>.<room>.<token>` → `token`, for a single non-empty token.
fn last_token_under<'a>(subject: &'a str, prefix: &str, room: &str) -> Option<&'a str> {
    let rest = subject.strip_prefix(prefix)?.strip_prefix('.')?;
    let rest = rest.strip_prefix(room)?.strip_prefix('.')?;
    // A byte scan: this runs per live message, and the token is short.
    (!rest.is_empty() && !rest.bytes().any(|b| b == b'.')).then_some(rest)
}

/// A feed inbox token: `[A-Za-z0-9_-]{1,64}`.
pub fn is_inbox_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= 64
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The kind of a control-plane error: stable strings clients branch on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// No valid signature (or the signer is not an admitted user). Only ever given
    /// before anything was written (gates 1 and 2): the client resends an unsigned
    /// write refused with it, signed, relying on that.
    Unauthenticated,
    /// Signed by someone the rules do not allow.
    Forbidden,
    NotFound,
    /// Malformed, oversized, or an id that is not allowed.
    Invalid,
    /// Already exists, or the state does not allow it.
    Conflict,
    /// The store could not answer; retry.
    Unavailable,
}

impl ErrorKind {
    /// The micro `Nats-Service-Error-Code`.
    pub fn code(self) -> u16 {
        match self {
            ErrorKind::Unauthenticated => 401,
            ErrorKind::Forbidden => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::Invalid => 400,
            ErrorKind::Conflict => 409,
            ErrorKind::Unavailable => 503,
        }
    }

    pub fn from_code(code: u16) -> Option<ErrorKind> {
        [
            ErrorKind::Unauthenticated,
            ErrorKind::Forbidden,
            ErrorKind::NotFound,
            ErrorKind::Invalid,
            ErrorKind::Conflict,
            ErrorKind::Unavailable,
        ]
        .into_iter()
        .find(|k| k.code() == code)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Invalid => "invalid",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Unavailable => "unavailable",
        }
    }
}

/// A typed control-plane error, as carried in a reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{}: {message}", kind.as_str())]
pub struct CtlError {
    pub kind: ErrorKind,
    pub message: String,
}

impl CtlError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        CtlError {
            kind,
            message: message.into(),
        }
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        CtlError::new(ErrorKind::Forbidden, message)
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        CtlError::new(ErrorKind::Invalid, message)
    }
}

impl From<StoreError> for CtlError {
    fn from(e: StoreError) -> Self {
        let kind = match &e {
            StoreError::NotFound { .. } => ErrorKind::NotFound,
            StoreError::Conflict { .. } => ErrorKind::Conflict,
            StoreError::Invalid { .. } => ErrorKind::Invalid,
            StoreError::Unavailable(_) | StoreError::Backend(_) => ErrorKind::Unavailable,
        };
        CtlError::new(kind, e.to_string())
    }
}

/// A reply: exactly one of `ok` and `error`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply<T> {
    Ok(T),
    Error(CtlError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_names_round_trip_and_are_subject_tokens() {
        for op in Op::ALL {
            assert_eq!(Op::from_name(op.name()), Some(op));
            assert!(
                op.name()
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '.')
            );
            // Two tokens each: the authenticator grants `unibus.ctl.*.*` (public) and
            // `unibus.ctl.*.*.<key>` (own subjects) on that count.
            assert_eq!(op.name().split('.').count(), 2, "{}", op.name());
        }
        assert_eq!(Op::RoomsCreate.subject(), "unibus.ctl.rooms.create");
        assert_eq!(
            Op::RoomsCreate.own_subject("UA"),
            "unibus.ctl.rooms.create.UA"
        );
        assert_eq!(
            Op::RoomsCreate.own_subject_key("unibus.ctl.rooms.create.UA"),
            Some("UA")
        );
        assert_eq!(
            Op::RoomsCreate.own_subject_at("UA", "n1"),
            "unibus.ctl.rooms.create.UA.n1"
        );
        assert_eq!(
            Op::RoomsCreate.own_subject_key("unibus.ctl.rooms.create.UA.n1"),
            Some("UA")
        );
        for not_own in [
            "unibus.ctl.rooms.create",
            "unibus.ctl.rooms.create.",
            "unibus.ctl.rooms.create.UA.",
            "unibus.ctl.rooms.create.UA.n1.x",
            "unibus.ctl.rooms.create.*",
            "unibus.ctl.rooms.createUA",
            "unibus.ctl.rooms.delete.UA",
        ] {
            assert_eq!(Op::RoomsCreate.own_subject_key(not_own), None, "{not_own}");
        }
        assert_eq!(Op::from_name("rooms.*"), None);
    }

    #[test]
    fn room_subjects_name_room_and_sender() {
        assert_eq!(room_subject("r1", "UA"), "unibus.room.r1.UA");
        assert_eq!(sender_of("unibus.room.r1.UA", "r1"), Some("UA"));
        assert_eq!(sender_of("unibus.room.r1.UA.x", "r1"), None);
        assert_eq!(sender_of("unibus.room.r10.UA", "r1"), None);
        assert_eq!(deliver_subject("r", "U", "i"), "unibus.deliver.r.U.i");
        assert_eq!(live_subject("r1", "UA"), "unibus.live.r1.UA");
        assert_eq!(live_filter("r1"), "unibus.live.r1.>");
        assert_eq!(live_sender_of("unibus.live.r1.UA", "r1"), Some("UA"));
        for bad in [
            "unibus.live.r1.UA.x",
            "unibus.live.r10.UA",
            "unibus.live.r1.",
            "unibus.live.r1",
            "unibus.room.r1.UA",
            "unibus.liver1.UA",
        ] {
            assert_eq!(live_sender_of(bad, "r1"), None, "{bad}");
        }
        assert_eq!(sender_of("unibus.live.r1.UA", "r1"), None);
        // Live subjects are outside what the ROOMS stream captures.
        assert!(!live_subject("r1", "UA").starts_with(&format!("{ROOM_PREFIX}.")));
        assert!(is_inbox_token("aZ0_-"));
        for bad in ["", "a.b", "*", ">", "a b", &"x".repeat(65)] {
            assert!(!is_inbox_token(bad), "{bad:?}");
        }
        let json = serde_json::to_string(&Start::After(5)).unwrap();
        assert_eq!(json, r#"{"after":5}"#);
        assert_eq!(serde_json::to_string(&Start::New).unwrap(), r#""new""#);
    }

    #[test]
    fn an_inbox_belongs_to_the_key_it_names_and_to_no_other() {
        let key = "UA".repeat(28);
        let other = "UB".repeat(28);
        let prefix = inbox_prefix(&key);
        assert!(is_inbox_of(&format!("{prefix}.abc.1"), &key));
        assert!(!is_inbox_of(&format!("{prefix}.abc.1"), &other));
        for bad in [
            prefix.clone(),
            format!("{prefix}."),
            format!("{prefix}x.abc"),
            format!("_INBOX.{}.abc", &key[..55]),
            format!("_INBOXX.{key}.abc"),
            format!("x._INBOX.{key}.abc"),
        ] {
            assert!(!is_inbox_of(&bad, &key), "{bad:?}");
        }
        assert!(Op::UsersGet.is_read() && Op::MembersRooms.is_read());
        assert!(!Op::RoomsCreate.is_read() && !Op::RoomsSubscribe.is_read());
    }

    #[test]
    fn errors_carry_their_kind_and_code() {
        let e: CtlError = StoreError::NotFound {
            what: "room x".into(),
        }
        .into();
        assert_eq!(e.kind.code(), 404);
        assert_eq!(ErrorKind::from_code(503), Some(ErrorKind::Unavailable));
        let json = serde_json::to_string(&Reply::<()>::Error(e)).unwrap();
        assert!(
            json.starts_with("{\"error\":{\"kind\":\"not_found\""),
            "{json}"
        );
    }
}
