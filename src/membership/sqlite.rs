//! SQLite backend: the single-node store, one file inside the node's data dir.
//!
//! - **Durability and concurrency**: WAL journal, `synchronous = FULL`, foreign keys on, a
//!   busy timeout. Members and room keys reference their room with `ON DELETE CASCADE`, so
//!   deleting a room is one statement and can never leave orphans.
//! - **Schema versions** live in `PRAGMA user_version`; [`MIGRATIONS`] is the ordered list
//!   of steps, each applied in its own transaction that also bumps the version. A file with
//!   a newer version than this binary knows is refused rather than guessed at.
//! - **Writes off the runtime, reads inline**: rusqlite is synchronous. Each write runs as
//!   one closure on `tokio::task::spawn_blocking`, holding an `Arc<Mutex<Connection>>` for
//!   the duration: one connection serialises writers (SQLite does anyway), and a write's
//!   fsync never stalls a tokio worker. Reads run inline on the calling task, on a second,
//!   read-only connection: with WAL they never wait for the writer, they see every
//!   committed write, and a cached-statement index lookup takes a few microseconds —
//!   less than the hop to the blocking pool and back, which used to be most of a read's
//!   cost (measured in BENCHMARKS.md, `ctl_read`). Both use cached prepared statements.
//! - **Hot reads from memory**: users, rooms, a room's members and an endpoint's
//!   memberships are answered from [`super::read_cache`], which every write (all go
//!   through [`SqliteStore::tx`]) keeps exact.
//! - Every operation is a single transaction: checks ("does the room exist?") and writes
//!   see the same snapshot.

use super::{
    Member, MemberState, Result, Role, Room, RoomKey, Snapshot, StoreError, User, ids, now_ms,
};
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, Transaction, params};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::read_cache::ReadCache;

/// Ordered schema migrations; entry `i` moves the file from version `i` to `i + 1`.
pub const MIGRATIONS: &[&str] = &[
    // v1: initial schema.
    "CREATE TABLE users (
        key        TEXT PRIMARY KEY NOT NULL,
        name       TEXT NOT NULL,
        admin      INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        revoked_at INTEGER
    );
    CREATE TABLE rooms (
        id         TEXT PRIMARY KEY NOT NULL,
        name       TEXT NOT NULL,
        owner      TEXT NOT NULL,
        encrypted  INTEGER NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE members (
        room     TEXT NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
        endpoint TEXT NOT NULL,
        role     TEXT NOT NULL CHECK (role IN ('owner', 'member')),
        state    TEXT NOT NULL CHECK (state IN ('invited', 'joined')),
        added_by TEXT NOT NULL,
        added_at INTEGER NOT NULL,
        PRIMARY KEY (room, endpoint)
    );
    CREATE INDEX members_by_endpoint ON members(endpoint, room);
    CREATE TABLE room_keys (
        room       TEXT NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
        epoch      INTEGER NOT NULL CHECK (epoch >= 1),
        material   BLOB NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (room, epoch)
    );",
    // v2: users register a curve key for end-to-end encrypted rooms.
    "ALTER TABLE users ADD COLUMN xkey TEXT;",
];

/// The schema version this binary writes.
pub fn schema_version() -> u32 {
    u32::try_from(MIGRATIONS.len()).unwrap_or(u32::MAX)
}

/// The SQLite store; cheap to clone.
#[derive(Clone)]
pub struct SqliteStore {
    path: PathBuf,
    conn: Arc<Mutex<Option<Connection>>>,
    /// A second, read-only connection for reads, which run inline (see the module doc).
    reader: Arc<Mutex<Option<Connection>>>,
    /// Hot reads, exact because every write goes through [`SqliteStore::tx`].
    cache: Arc<ReadCache>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

fn backend(context: &str, err: rusqlite::Error) -> StoreError {
    if let rusqlite::Error::SqliteFailure(e, _) = &err
        && matches!(
            e.code,
            rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
        )
    {
        return StoreError::Unavailable(format!("{context}: sqlite is busy ({err})"));
    }
    StoreError::Backend(format!("{context}: {err}"))
}

fn is_constraint(err: &rusqlite::Error) -> bool {
    matches!(err, rusqlite::Error::SqliteFailure(e, _) if e.code == rusqlite::ErrorCode::ConstraintViolation)
}

/// A failed insert: `Conflict` (with `taken` saying what already exists) when a key
/// constraint refused it, a backend error for `what` otherwise.
fn insert_error(err: rusqlite::Error, what: &str, taken: impl FnOnce() -> String) -> StoreError {
    if is_constraint(&err) {
        StoreError::conflict(taken())
    } else {
        backend(what, err)
    }
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn user_from_row(row: &Row<'_>) -> rusqlite::Result<User> {
    Ok(User {
        key: row.get(0)?,
        name: row.get(1)?,
        admin: row.get(2)?,
        created_at: to_u64(row.get(3)?),
        revoked_at: row.get::<_, Option<i64>>(4)?.map(to_u64),
        xkey: row.get(5)?,
    })
}

fn room_from_row(row: &Row<'_>) -> rusqlite::Result<Room> {
    Ok(Room {
        id: row.get(0)?,
        name: row.get(1)?,
        owner: row.get(2)?,
        encrypted: row.get(3)?,
        created_at: to_u64(row.get(4)?),
    })
}

fn member_from_row(row: &Row<'_>) -> rusqlite::Result<Member> {
    let role: String = row.get(2)?;
    let state: String = row.get(3)?;
    Ok(Member {
        room: row.get(0)?,
        endpoint: row.get(1)?,
        role: if role == "owner" {
            Role::Owner
        } else {
            Role::Member
        },
        state: if state == "joined" {
            MemberState::Joined
        } else {
            MemberState::Invited
        },
        added_by: row.get(4)?,
        added_at: to_u64(row.get(5)?),
        room_created_at: None,
    })
}

fn key_from_row(row: &Row<'_>) -> rusqlite::Result<RoomKey> {
    Ok(RoomKey {
        room: row.get(0)?,
        epoch: row.get(1)?,
        material: row.get(2)?,
        created_at: to_u64(row.get(3)?),
    })
}

const USER_COLS: &str = "key, name, admin, created_at, revoked_at, xkey";
const ROOM_COLS: &str = "id, name, owner, encrypted, created_at";
const MEMBER_COLS: &str = "room, endpoint, role, state, added_by, added_at";
const KEY_COLS: &str = "room, epoch, material, created_at";

fn room_exists(tx: &Connection, id: &str) -> Result<()> {
    let found = tx
        .prepare_cached("SELECT 1 FROM rooms WHERE id = ?1")
        .and_then(|mut stmt| stmt.query_row([id], |_| Ok(())))
        .optional()
        .map_err(|e| backend("read room", e))?;
    found.ok_or_else(|| StoreError::not_found(format!("room {id:?}")))
}

/// [`room_exists`], and if the caller read the room before (`checked`: its owner and
/// creation time), the same room: not one deleted and created again since.
fn room_as_read(tx: &Connection, id: &str, checked: Option<&(String, u64)>) -> Result<()> {
    let Some(checked) = checked else {
        return room_exists(tx, id);
    };
    let found: Option<(String, i64)> = tx
        .prepare_cached("SELECT owner, created_at FROM rooms WHERE id = ?1")
        .and_then(|mut stmt| stmt.query_row([id], |row| Ok((row.get(0)?, row.get(1)?))))
        .optional()
        .map_err(|e| backend("read room", e))?;
    match found {
        None => Err(StoreError::not_found(format!("room {id:?}"))),
        Some((owner, created_at)) if owner == checked.0 && to_u64(created_at) == checked.1 => {
            Ok(())
        }
        Some(_) => Err(StoreError::room_taken_again(id)),
    }
}

fn get_member(tx: &Connection, room: &str, endpoint: &str) -> Result<Option<Member>> {
    let sql = format!("SELECT {MEMBER_COLS} FROM members WHERE room = ?1 AND endpoint = ?2");
    read_one(tx, "read member", &sql, [room, endpoint], member_from_row)
}

fn insert_key(tx: &Transaction<'_>, key: &RoomKey) -> Result<()> {
    tx.execute(
        &format!("INSERT INTO room_keys ({KEY_COLS}) VALUES (?1, ?2, ?3, ?4)"),
        params![key.room, key.epoch, key.material, to_i64(key.created_at)],
    )
    .map_err(|e| {
        insert_error(e, "insert room key", || {
            format!(
                "room {:?} already has a key for epoch {}",
                key.room, key.epoch
            )
        })
    })?;
    Ok(())
}

fn migrate(conn: &mut Connection) -> Result<()> {
    let current: u32 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(|e| backend("read schema version", e))?;
    let known = schema_version();
    if current > known {
        return Err(StoreError::Invalid {
            field: "database",
            reason: format!(
                "schema version {current} is newer than this binary understands ({known}); upgrade unibus"
            ),
        });
    }
    for (from, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let tx = conn
            .transaction()
            .map_err(|e| backend("begin migration", e))?;
        tx.execute_batch(sql)
            .map_err(|e| backend(&format!("migrate schema to version {}", from + 1), e))?;
        tx.pragma_update(
            None,
            "user_version",
            i64::try_from(from + 1).unwrap_or(i64::MAX),
        )
        .map_err(|e| backend("write schema version", e))?;
        tx.commit().map_err(|e| backend("commit migration", e))?;
    }
    Ok(())
}

/// Reads every record of the database at `path` without ever writing to it: the source of
/// `unibus migrate`. Blocking; call it on the blocking pool.
///
/// The connection is opened `SQLITE_OPEN_READ_ONLY` (never created, never migrated, no
/// checkpoint on close), so the file stays byte-identical. SQLite may still create the
/// empty `-wal` and the `-shm` (shared-memory index) side files of a WAL database when
/// they are missing; they hold no data and are left in place, because removing them under
/// a node that opens the file at the same time would be unsafe. All four tables are read in
/// one read transaction, so the snapshot is consistent even if a node still writes to the
/// file. A file that is not SQLite, has no unibus schema or a schema version other than
/// this binary's is refused as [`StoreError::Invalid`] (`database`); a missing file is
/// [`StoreError::NotFound`].
pub fn read_snapshot(path: &Path) -> Result<Snapshot> {
    let mut conn = open_read_only(path)?;
    let ctx = format!("read {}", path.display());
    let tx = conn.transaction().map_err(|e| source_error(path, e))?;
    let snapshot = Snapshot {
        users: read_all(
            &tx,
            &ctx,
            &format!("SELECT {USER_COLS} FROM users ORDER BY key"),
            [],
            user_from_row,
        )?,
        rooms: read_all(
            &tx,
            &ctx,
            &format!("SELECT {ROOM_COLS} FROM rooms ORDER BY id"),
            [],
            room_from_row,
        )?,
        members: read_all(
            &tx,
            &ctx,
            &format!("SELECT {MEMBER_COLS} FROM members ORDER BY room, endpoint"),
            [],
            member_from_row,
        )?,
        keys: read_all(
            &tx,
            &ctx,
            &format!("SELECT {KEY_COLS} FROM room_keys ORDER BY room, epoch"),
            [],
            key_from_row,
        )?,
    };
    // Read-only: nothing to commit; ending the transaction releases the snapshot.
    tx.rollback().map_err(|e| backend(&ctx, e))?;
    Ok(snapshot)
}

/// Writes every record of `snapshot` into the database at `path` (created and migrated
/// if needed) in one transaction, with prepared statements: the fast way to give a
/// benchmark node a large store before it starts (`unibus bench` loads a million
/// memberships this way in seconds, where a million signed `members.invite` calls would
/// take hours). Ids are validated like the store's own writes, so the file is one the node
/// could have written. Not for a live node's file: it takes no part in the node's
/// connection discipline. Blocking; call it on the blocking pool.
pub fn bulk_load(path: &Path, snapshot: &Snapshot) -> Result<()> {
    let ctx = format!("bulk load {}", path.display());
    let mut conn = Connection::open(path).map_err(|e| backend(&ctx, e))?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(|e| backend(&ctx, e))?;
    conn.pragma_update(None, "foreign_keys", true)
        .map_err(|e| backend(&ctx, e))?;
    migrate(&mut conn)?;
    let tx = conn.transaction().map_err(|e| backend(&ctx, e))?;
    {
        let mut users = tx
            .prepare(&format!(
                "INSERT INTO users ({USER_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
            ))
            .map_err(|e| backend(&ctx, e))?;
        for u in &snapshot.users {
            users
                .execute(params![
                    ids::user_key("user", &u.key)?,
                    ids::name("name", &u.name)?,
                    u.admin,
                    to_i64(u.created_at),
                    u.revoked_at.map(to_i64),
                    u.xkey
                ])
                .map_err(|e| backend("insert user", e))?;
        }
        let mut rooms = tx
            .prepare(&format!(
                "INSERT INTO rooms ({ROOM_COLS}) VALUES (?1, ?2, ?3, ?4, ?5)"
            ))
            .map_err(|e| backend(&ctx, e))?;
        for r in &snapshot.rooms {
            rooms
                .execute(params![
                    ids::room_id(&r.id)?,
                    ids::name("name", &r.name)?,
                    ids::user_key("owner", &r.owner)?,
                    r.encrypted,
                    to_i64(r.created_at)
                ])
                .map_err(|e| backend("insert room", e))?;
        }
        let mut members = tx
            .prepare(&format!(
                "INSERT INTO members ({MEMBER_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
            ))
            .map_err(|e| backend(&ctx, e))?;
        for m in &snapshot.members {
            members
                .execute(params![
                    ids::room_id(&m.room)?,
                    ids::user_key("endpoint", &m.endpoint)?,
                    m.role.as_str(),
                    m.state.as_str(),
                    ids::user_key("added_by", &m.added_by)?,
                    to_i64(m.added_at)
                ])
                .map_err(|e| backend("insert member", e))?;
        }
        for k in &snapshot.keys {
            insert_key(&tx, k)?;
        }
    }
    tx.commit().map_err(|e| backend(&ctx, e))?;
    Ok(())
}

/// Checks that `path` is a unibus SQLite database this binary can read, read-only and
/// without reading the records (a cheap check before connecting anywhere).
pub fn check_source(path: &Path) -> Result<()> {
    open_read_only(path).map(|_| ())
}

/// Opens an existing database read-only and checks its schema version.
fn open_read_only(path: &Path) -> Result<Connection> {
    if !path.is_file() {
        return Err(StoreError::not_found(format!(
            "sqlite database {} (no such file)",
            path.display()
        )));
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| source_error(path, e))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(|e| source_error(path, e))?;
    check_schema(&conn, path)?;
    Ok(conn)
}

/// "Not SQLite" and "not a unibus database" are the caller's mistake, not a backend fault.
fn source_error(path: &Path, err: rusqlite::Error) -> StoreError {
    if let rusqlite::Error::SqliteFailure(e, _) = &err
        && matches!(
            e.code,
            rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::CannotOpen
        )
    {
        return StoreError::Invalid {
            field: "database",
            reason: format!("{} is not a SQLite database ({err})", path.display()),
        };
    }
    backend(&format!("read {}", path.display()), err)
}

fn check_schema(conn: &Connection, path: &Path) -> Result<()> {
    let version: u32 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(|e| source_error(path, e))?;
    let known = schema_version();
    let reason = if version == 0 {
        format!(
            "{} is not a unibus database (no unibus schema); pass the store file from the node's data dir",
            path.display()
        )
    } else if version > known {
        format!(
            "{} has schema version {version}, newer than this binary reads ({known}); migrate with the unibus release that wrote it",
            path.display()
        )
    } else if version < known {
        format!(
            "{} has schema version {version}, older than this binary reads ({known}); start a node of this release on it once to upgrade it, then migrate",
            path.display()
        )
    } else {
        return Ok(());
    };
    Err(StoreError::Invalid {
        field: "database",
        reason,
    })
}

/// Every row `sql` selects with `params`, mapped; `what` names the read in errors.
fn read_all<T>(
    tx: &Connection,
    what: &str,
    sql: &str,
    params: impl rusqlite::Params,
    map: fn(&Row<'_>) -> rusqlite::Result<T>,
) -> Result<Vec<T>> {
    let mut stmt = tx.prepare_cached(sql).map_err(|e| backend(what, e))?;
    let rows = stmt.query_map(params, map).map_err(|e| backend(what, e))?;
    rows.collect::<rusqlite::Result<Vec<_>>>()
        .map_err(|e| backend(what, e))
}

/// The one row `sql` selects with `params`, if any.
fn read_one<T>(
    tx: &Connection,
    what: &str,
    sql: &str,
    params: impl rusqlite::Params,
    map: fn(&Row<'_>) -> rusqlite::Result<T>,
) -> Result<Option<T>> {
    tx.prepare_cached(sql)
        .and_then(|mut stmt| stmt.query_row(params, map))
        .optional()
        .map_err(|e| backend(what, e))
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and migrates its schema.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let p = path.clone();
        let conn = tokio::task::spawn_blocking(move || -> Result<(Connection, Connection)> {
            let ctx = format!("open sqlite database {}", p.display());
            let mut conn = Connection::open(&p).map_err(|e| backend(&ctx, e))?;
            conn.busy_timeout(std::time::Duration::from_secs(5))
                .map_err(|e| backend(&ctx, e))?;
            let mode: String = conn
                .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
                .map_err(|e| backend(&ctx, e))?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(StoreError::Backend(format!(
                    "{ctx}: could not enable WAL (journal_mode is {mode})"
                )));
            }
            conn.pragma_update(None, "synchronous", "FULL")
                .map_err(|e| backend(&ctx, e))?;
            conn.pragma_update(None, "foreign_keys", true)
                .map_err(|e| backend(&ctx, e))?;
            migrate(&mut conn)?;
            // Opened after the migrations, so it never sees an old schema.
            let reader = Connection::open_with_flags(
                &p,
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(|e| backend(&ctx, e))?;
            reader
                .busy_timeout(std::time::Duration::from_secs(5))
                .map_err(|e| backend(&ctx, e))?;
            Ok((conn, reader))
        })
        .await
        .map_err(|e| StoreError::Backend(format!("sqlite open task failed: {e}")))??;
        let (conn, reader) = conn;
        Ok(Self {
            path,
            conn: Arc::new(Mutex::new(Some(conn))),
            reader: Arc::new(Mutex::new(Some(reader))),
            cache: Arc::default(),
        })
    }

    /// Runs the read `f` in one (read) transaction on the reader connection, inline.
    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let mut guard = lock(&self.reader, "reader")?;
        let conn = open_in(&mut guard)?;
        // BEGIN and ROLLBACK as cached statements: `Connection::transaction` parses them
        // afresh each time, which cost more than the read itself.
        let run = |sql: &str| {
            conn.prepare_cached(sql)
                .and_then(|mut stmt| stmt.execute([]))
                .map_err(|e| backend(sql, e))
        };
        run("BEGIN")?;
        let out = f(conn);
        run("ROLLBACK")?;
        out
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` in one transaction on the blocking pool.
    async fn tx<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        let cache = Arc::clone(&self.cache);
        tokio::task::spawn_blocking(move || {
            // Here, not around the await: once started, this closure runs to the end even
            // if the caller stops waiting, and the cache must stay bypassed until then.
            let _writing = cache.begin_write();
            let mut guard = lock(&conn, "connection")?;
            let conn = open_in(&mut guard)?;
            let tx = conn.transaction().map_err(|e| backend("begin", e))?;
            let out = f(&tx)?;
            tx.commit().map_err(|e| backend("commit", e))?;
            Ok(out)
        })
        .await
        .map_err(|e| StoreError::Backend(format!("sqlite task failed: {e}")))?
    }

    pub(crate) async fn add_user(&self, key: &str, name: &str, admin: bool) -> Result<User> {
        let user = User {
            key: ids::user_key("user", key)?,
            name: ids::name("name", name)?,
            admin,
            created_at: now_ms(),
            revoked_at: None,
            xkey: None,
        };
        self.tx(move |tx| {
            tx.execute(
                &format!("INSERT INTO users ({USER_COLS}) VALUES (?1, ?2, ?3, ?4, NULL, NULL)"),
                params![user.key, user.name, user.admin, to_i64(user.created_at)],
            )
            .map_err(|e| {
                insert_error(e, "insert user", || {
                    format!("user {} already exists", user.key)
                })
            })?;
            Ok(user)
        })
        .await
    }

    pub(crate) async fn get_user(&self, key: &str) -> Result<User> {
        let key = ids::user_key("user", key)?;
        self.cache.through(
            |t| &mut t.users,
            &key,
            || {
                self.read(|tx| {
                    let sql = format!("SELECT {USER_COLS} FROM users WHERE key = ?1");
                    read_one(tx, "read user", &sql, [&key], user_from_row)?
                        .ok_or_else(|| StoreError::not_found(format!("user {key}")))
                })
            },
        )
    }

    pub(crate) async fn list_users(&self) -> Result<Vec<User>> {
        self.list_users_after(None, usize::MAX).await
    }

    pub(crate) async fn list_users_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<User>> {
        let (after, limit) = (after.unwrap_or("").to_string(), to_i64(limit as u64));
        self.read(move |tx| {
            let sql = format!("SELECT {USER_COLS} FROM users WHERE key > ?1 ORDER BY key LIMIT ?2");
            let params = rusqlite::params![after, limit];
            read_all(tx, "list users", &sql, params, user_from_row)
        })
    }

    pub(crate) async fn set_user_xkey(&self, key: &str, xkey: &str) -> Result<User> {
        let key = ids::user_key("user", key)?;
        let xkey = ids::xkey("xkey", xkey)?;
        self.update_user(
            key,
            "set user xkey",
            "UPDATE users SET xkey = ?2 WHERE key = ?1",
            xkey.into(),
        )
        .await
    }

    pub(crate) async fn revoke_user(&self, key: &str) -> Result<User> {
        let key = ids::user_key("user", key)?;
        self.update_user(
            key,
            "revoke user",
            "UPDATE users SET revoked_at = COALESCE(revoked_at, ?2) WHERE key = ?1",
            to_i64(now_ms()).into(),
        )
        .await
    }

    /// Runs `sql` (an UPDATE of user `key`, with `value` as `?2`) and reads the user back;
    /// `NotFound` if there is no such user.
    async fn update_user(
        &self,
        key: String,
        what: &'static str,
        sql: &'static str,
        value: rusqlite::types::Value,
    ) -> Result<User> {
        self.tx(move |tx| {
            let changed = tx
                .execute(sql, params![key, value])
                .map_err(|e| backend(what, e))?;
            if changed == 0 {
                return Err(StoreError::not_found(format!("user {key}")));
            }
            tx.query_row(
                &format!("SELECT {USER_COLS} FROM users WHERE key = ?1"),
                [&key],
                user_from_row,
            )
            .map_err(|e| backend("read user", e))
        })
        .await
    }

    /// One process, one copy: nothing can have moved on without it.
    pub(crate) async fn confirm_quorum(&self) -> Result<()> {
        Ok(())
    }

    pub(crate) async fn is_authorized(&self, key: &str) -> bool {
        match self.get_user(key).await {
            Ok(user) => user.revoked_at.is_none(),
            Err(err) => {
                tracing::debug!(%err, "is_authorized: denied");
                false
            }
        }
    }

    pub(crate) async fn has_admin(&self) -> bool {
        let res = self.read(|tx| {
            tx.query_row(
                "SELECT EXISTS(SELECT 1 FROM users WHERE admin = 1 AND revoked_at IS NULL)",
                [],
                |row| row.get::<_, bool>(0),
            )
            .map_err(|e| backend("has_admin", e))
        });
        match res {
            Ok(found) => found,
            Err(err) => {
                tracing::warn!(%err, "has_admin: store error, answering false (fail closed)");
                false
            }
        }
    }

    pub(crate) async fn create_room(
        &self,
        id: &str,
        name: &str,
        owner: &str,
        encrypted: bool,
    ) -> Result<Room> {
        let room = Room::new(id, name, owner, encrypted)?;
        self.tx(move |tx| {
            tx.execute(
                &format!("INSERT INTO rooms ({ROOM_COLS}) VALUES (?1, ?2, ?3, ?4, ?5)"),
                params![
                    room.id,
                    room.name,
                    room.owner,
                    room.encrypted,
                    to_i64(room.created_at)
                ],
            )
            .map_err(|e| {
                insert_error(e, "insert room", || {
                    format!("room {:?} already exists", room.id)
                })
            })?;
            tx.execute(
                &format!(
                    "INSERT INTO members ({MEMBER_COLS}) VALUES (?1, ?2, 'owner', 'joined', ?2, ?3)"
                ),
                params![room.id, room.owner, to_i64(room.created_at)],
            )
            .map_err(|e| backend("insert owner member", e))?;
            Ok(room)
        })
        .await
    }

    pub(crate) async fn get_room(&self, id: &str) -> Result<Room> {
        let id = ids::room_id(id)?;
        self.cache.through(
            |t| &mut t.rooms,
            id,
            || {
                self.read(|tx| {
                    let sql = format!("SELECT {ROOM_COLS} FROM rooms WHERE id = ?1");
                    read_one(tx, "read room", &sql, [id], room_from_row)?
                        .ok_or_else(|| StoreError::not_found(format!("room {id:?}")))
                })
            },
        )
    }

    pub(crate) async fn list_rooms(&self) -> Result<Vec<Room>> {
        self.list_rooms_after(None, usize::MAX).await
    }

    pub(crate) async fn list_rooms_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Room>> {
        let (after, limit) = (after.unwrap_or("").to_string(), to_i64(limit as u64));
        self.read(move |tx| {
            let sql = format!("SELECT {ROOM_COLS} FROM rooms WHERE id > ?1 ORDER BY id LIMIT ?2");
            let params = rusqlite::params![after, limit];
            read_all(tx, "list rooms", &sql, params, room_from_row)
        })
    }

    pub(crate) async fn delete_room(&self, id: &str) -> Result<()> {
        let id = ids::room_id(id)?.to_string();
        self.tx(move |tx| {
            let n = tx
                .execute("DELETE FROM rooms WHERE id = ?1", [&id])
                .map_err(|e| backend("delete room", e))?;
            if n == 0 {
                return Err(StoreError::not_found(format!("room {id:?}")));
            }
            Ok(())
        })
        .await
    }

    /// Inserts `member`. The room is checked inside the transaction whatever the caller
    /// read before; if the caller read it (`checked`), it must still be that room, not
    /// one created under the same id after a delete that raced the caller (same owner
    /// and creation time). So a member never outlives its room here, and needs no
    /// `room_created_at`.
    pub(crate) async fn add_member(
        &self,
        member: Member,
        checked: Option<&Room>,
    ) -> Result<Member> {
        let member = Member {
            room_created_at: None,
            ..member
        };
        let checked = checked.map(|r| (r.owner.clone(), r.created_at));
        self.tx(move |tx| {
            room_as_read(tx, &member.room, checked.as_ref())?;
            tx.execute(
                &format!("INSERT INTO members ({MEMBER_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"),
                params![
                    member.room,
                    member.endpoint,
                    member.role.as_str(),
                    member.state.as_str(),
                    member.added_by,
                    to_i64(member.added_at)
                ],
            )
            .map_err(|e| {
                insert_error(e, "insert member", || {
                    format!(
                        "{} is already a member of room {:?}",
                        member.endpoint, member.room
                    )
                })
            })?;
            Ok(member)
        })
        .await
    }

    pub(crate) async fn join(&self, room: &str, endpoint: &str) -> Result<Member> {
        let room = ids::room_id(room)?.to_string();
        let endpoint = ids::user_key("endpoint", endpoint)?;
        self.tx(move |tx| {
            room_exists(tx, &room)?;
            let Some(mut member) = get_member(tx, &room, &endpoint)? else {
                return Err(StoreError::not_found(format!(
                    "membership of {endpoint} in room {room:?}"
                )));
            };
            if member.state != MemberState::Joined {
                tx.execute(
                    "UPDATE members SET state = 'joined' WHERE room = ?1 AND endpoint = ?2",
                    [&room, &endpoint],
                )
                .map_err(|e| backend("join", e))?;
                member.state = MemberState::Joined;
            }
            Ok(member)
        })
        .await
    }

    pub(crate) async fn remove_member(&self, room: &str, endpoint: &str) -> Result<()> {
        let room = ids::room_id(room)?.to_string();
        let endpoint = ids::user_key("endpoint", endpoint)?;
        self.tx(move |tx| {
            room_exists(tx, &room)?;
            let n = tx
                .execute(
                    "DELETE FROM members WHERE room = ?1 AND endpoint = ?2",
                    [&room, &endpoint],
                )
                .map_err(|e| backend("remove member", e))?;
            if n == 0 {
                return Err(StoreError::not_found(format!(
                    "membership of {endpoint} in room {room:?}"
                )));
            }
            Ok(())
        })
        .await
    }

    pub(crate) async fn list_members(&self, room: &str) -> Result<Vec<Member>> {
        let room = ids::room_id(room)?;
        self.cache.through(
            |t| &mut t.members,
            room,
            || {
                self.read(|tx| {
                    room_exists(tx, room)?;
                    // Sorted here, not by ORDER BY: see `list_rooms_for_endpoint`.
                    let sql = format!("SELECT {MEMBER_COLS} FROM members WHERE room = ?1");
                    let mut members = read_all(tx, "list members", &sql, [room], member_from_row)?;
                    members.sort_unstable_by(|a, b| a.endpoint.cmp(&b.endpoint));
                    Ok(members)
                })
            },
        )
    }

    pub(crate) async fn list_rooms_for_endpoint(&self, endpoint: &str) -> Result<Vec<Member>> {
        let endpoint = ids::user_key("endpoint", endpoint)?;
        self.cache.through(
            |t| &mut t.rooms_of,
            &endpoint,
            || {
                self.read(|tx| {
                    // No ORDER BY: with it, SQLite re-prepares the statement on every new binding
                    // (seen in `sqlite3_stmt_status(REPREPARE)`), which parsing made the most
                    // expensive part of the call. Sorting a user's rooms here is cheaper.
                    let sql = format!("SELECT {MEMBER_COLS} FROM members WHERE endpoint = ?1");
                    let mut rooms = read_all(
                        tx,
                        "list rooms for endpoint",
                        &sql,
                        [&endpoint],
                        member_from_row,
                    )?;
                    rooms.sort_unstable_by(|a, b| a.room.cmp(&b.room));
                    Ok(rooms)
                })
            },
        )
    }

    pub(crate) async fn put_room_key(
        &self,
        room: &str,
        epoch: u32,
        material: &[u8],
    ) -> Result<RoomKey> {
        let key = RoomKey {
            room: ids::room_id(room)?.to_string(),
            epoch: ids::epoch(epoch)?,
            material: material.to_vec(),
            created_at: now_ms(),
        };
        self.tx(move |tx| {
            room_exists(tx, &key.room)?;
            insert_key(tx, &key)?;
            Ok(key)
        })
        .await
    }

    pub(crate) async fn get_room_key(&self, room: &str, epoch: u32) -> Result<RoomKey> {
        let room = ids::room_id(room)?.to_string();
        let epoch = ids::epoch(epoch)?;
        self.read(move |tx| {
            room_exists(tx, &room)?;
            let sql = format!("SELECT {KEY_COLS} FROM room_keys WHERE room = ?1 AND epoch = ?2");
            read_one(
                tx,
                "read room key",
                &sql,
                params![room, epoch],
                key_from_row,
            )?
            .ok_or_else(|| StoreError::not_found(format!("epoch {epoch} of room {room:?}'s key")))
        })
    }

    pub(crate) async fn latest_room_key(&self, room: &str) -> Result<Option<RoomKey>> {
        let room = ids::room_id(room)?.to_string();
        self.read(move |tx| {
            room_exists(tx, &room)?;
            let sql = format!(
                "SELECT {KEY_COLS} FROM room_keys WHERE room = ?1 ORDER BY epoch DESC LIMIT 1"
            );
            read_one(tx, "read latest room key", &sql, [&room], key_from_row)
        })
    }

    pub(crate) async fn rekey(&self, room: &str, material: &[u8]) -> Result<RoomKey> {
        let room = ids::room_id(room)?.to_string();
        let material = material.to_vec();
        self.tx(move |tx| {
            room_exists(tx, &room)?;
            let latest: u32 = tx
                .query_row(
                    "SELECT COALESCE(MAX(epoch), 0) FROM room_keys WHERE room = ?1",
                    [&room],
                    |row| row.get(0),
                )
                .map_err(|e| backend("read latest epoch", e))?;
            let epoch = latest.checked_add(1).ok_or_else(|| StoreError::Invalid {
                field: "epoch",
                reason: format!("room {room:?} has reached the last epoch ({latest})"),
            })?;
            let key = RoomKey {
                room,
                epoch,
                material,
                created_at: now_ms(),
            };
            insert_key(tx, &key)?;
            Ok(key)
        })
        .await
    }

    pub(crate) async fn close(&self) -> Result<()> {
        self.cache.close();
        let conn = Arc::clone(&self.conn);
        let reader = Arc::clone(&self.reader);
        tokio::task::spawn_blocking(move || {
            let mut guard = conn
                .lock()
                .map_err(|_| StoreError::Backend("sqlite connection lock poisoned".into()))?;
            if let Some(conn) = guard.take() {
                conn.close()
                    .map_err(|(_, e)| backend("close sqlite database", e))?;
            }
            if let Ok(mut reader) = reader.lock()
                && let Some(conn) = reader.take()
            {
                conn.close()
                    .map_err(|(_, e)| backend("close sqlite reader", e))?;
            }
            Ok(())
        })
        .await
        .map_err(|e| StoreError::Backend(format!("sqlite close task failed: {e}")))?
    }
}

/// Locks one of the store's connection slots (`which` names it in the error).
fn lock<'a>(
    slot: &'a std::sync::Mutex<Option<Connection>>,
    which: &str,
) -> Result<std::sync::MutexGuard<'a, Option<Connection>>> {
    slot.lock().map_err(|_| {
        StoreError::Backend(format!(
            "sqlite {which} lock poisoned by an earlier panic; restart the node"
        ))
    })
}

/// The connection in a locked slot, unless the store was closed.
fn open_in(slot: &mut Option<Connection>) -> Result<&mut Connection> {
    slot.as_mut()
        .ok_or_else(|| StoreError::Unavailable("the sqlite store was closed".into()))
}
