//! `unibus migrate`: copy a single node's SQLite store into the replicated KV buckets.
//!
//! The path from one SQLite node to a cluster is a copy, never an in-place conversion
//! (DESIGN §13: a standalone JetStream turned clustered loses its streams). This module
//! makes that copy safe to run, re-run and interrupt:
//!
//! - **The source is never modified.** [`sqlite::read_snapshot`] opens the file
//!   `SQLITE_OPEN_READ_ONLY` and reads all four tables in one read transaction, so the
//!   copy is a consistent snapshot even if a node still writes to the file.
//! - **Nothing invalid reaches NATS.** Every source record's ids are validated (and must
//!   already be in canonical form) before the first write; one bad record aborts the run
//!   with nothing written.
//! - **Idempotent.** Each record is compared with what the target holds and written only
//!   when absent (`create`, which never replaces). A record present with equal content is
//!   left alone, so a re-run after success writes nothing and reports 0 writes. A record
//!   present with *different* content is a conflict: reported, never overwritten unless
//!   [`MigrateOptions::overwrite`].
//! - **Resumable.** There is no journal: every record is compared and written on its own,
//!   kind by kind in dependency order — users, rooms, members (member record first, then
//!   its `rooms_by_member` index entry, the store's own order), room keys — so an
//!   interrupted run leaves a prefix that the next run recognises as unchanged and
//!   continues after. A member whose record landed but whose index entry did not is
//!   finished by writing the index entry. A record whose request timed out is retried a
//!   few times first; a write that landed without its answer is then found equal.
//! - **Fast enough.** The target is read in bulk ([`KvStore::scan`]: one ordered consumer
//!   per bucket plus the leader's key listing), and writes run concurrently with bounded
//!   parallelism ([`MigrateOptions::parallelism`]) within one kind.
//! - **Verified.** After copying, the target is read again and compared with the source:
//!   record counts per kind, every member's index entry, and a SHA-256 digest over a
//!   canonical serialisation of every record (see `digest`), computed by the same
//!   function on both sides. Both digests are reported. Verified means the target *holds*
//!   the source: the target side of the comparison is restricted to the source's keys, and
//!   whatever else the cluster holds is counted as `extra` and left alone. A cluster never
//!   starts empty — its nodes put their bootstrap admin in the store on first boot — and
//!   the growth path migrates into a cluster that is already serving, so requiring the
//!   target to *equal* the source would make a correct copy fail to verify.
//!
//! Differences seen in the bulk read are confirmed with a leader read before they are
//! reported or overwritten, because a bulk read may be served by a lagging follower.

use super::jetstream::{KvStore, encode, epoch_key};
use super::{Member, Room, RoomKey, Snapshot, StoreError, User, ids, sqlite};
use bytes::Bytes;
use futures_util::StreamExt;
use ring::digest::{Context, SHA256};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Writes in flight at once, by default.
pub const DEFAULT_PARALLELISM: usize = 64;

/// Tries per record before a timeout or unavailable cluster stops the run.
const ATTEMPTS: u32 = 3;

/// Pause before retry `n` is `n` times this.
const RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(200);

/// How many conflicting records a report names (the count is always complete).
const CONFLICTS_SHOWN: usize = 20;

/// The kinds of record, in the order they are copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Users (`users` bucket).
    Users,
    /// Rooms (`rooms` bucket).
    Rooms,
    /// Members (`members` bucket, plus the `rooms_by_member` index).
    Members,
    /// Room keys (`room_keys` bucket).
    RoomKeys,
}

impl Kind {
    /// Dependency order: a room's owner, a member's room and a key's room come first.
    pub const ALL: [Kind; 4] = [Kind::Users, Kind::Rooms, Kind::Members, Kind::RoomKeys];

    /// The name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Users => "users",
            Kind::Rooms => "rooms",
            Kind::Members => "members",
            Kind::RoomKeys => "room_keys",
        }
    }
}

/// What [`migrate`] may do.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// Compare and report only; write nothing.
    pub dry_run: bool,
    /// Replace records whose content differs in the target (otherwise: report them).
    pub overwrite: bool,
    /// Writes in flight at once (at least 1).
    pub parallelism: usize,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        Self {
            dry_run: false,
            overwrite: false,
            parallelism: DEFAULT_PARALLELISM,
        }
    }
}

/// Where a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Reading the SQLite file.
    ReadSource,
    /// Reading the KV buckets.
    ReadTarget,
    /// Comparing and copying one kind.
    Copy(Kind),
    /// Reading the target again and comparing.
    Verify,
}

/// A progress event: sent when a stage starts (`done == 0`) and after every record copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// The current stage.
    pub stage: Stage,
    /// Records of this stage handled so far.
    pub done: usize,
    /// Records of this stage (0 for stages without a known size).
    pub total: usize,
    /// Writes made so far in the whole run.
    pub written: usize,
}

/// The outcome for one kind of record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KindReport {
    /// Which kind.
    pub kind: Kind,
    /// Records in the source.
    pub source: usize,
    /// Records in the target after the run (before it, for a dry run), extra ones included.
    pub target: usize,
    /// Target records with no counterpart in the source (the cluster's own: its bootstrap
    /// admin, writes since it started). Kept; they do not affect verification.
    pub extra: usize,
    /// Source records the target lacked (for members: or lacked their index entry).
    pub new: usize,
    /// Source records the target already held with equal content.
    pub unchanged: usize,
    /// Source records the target holds with different content.
    pub conflicts: usize,
    /// Records written by this run (0 for a dry run).
    pub written: usize,
}

/// What a run did and whether the target now holds the source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrateReport {
    /// Nothing was written.
    pub dry_run: bool,
    /// Per kind, in copy order.
    pub kinds: Vec<KindReport>,
    /// Up to 20 conflicting records, as `kind/key`.
    pub conflict_examples: Vec<String>,
    /// Source members without a `rooms_by_member` entry in the target.
    pub index_missing: usize,
    /// SHA-256 (hex) of the source's canonical serialisation.
    pub source_digest: String,
    /// SHA-256 (hex) of the target's canonical serialisation, restricted to the source's keys.
    pub target_digest: String,
    /// Every source record is in the target with equal content (counts, index, digests).
    pub verified: bool,
}

impl MigrateReport {
    /// Writes made by the run, all kinds.
    pub fn written(&self) -> usize {
        self.kinds.iter().map(|k| k.written).sum()
    }

    /// Conflicting records, all kinds.
    pub fn conflicts(&self) -> usize {
        self.kinds.iter().map(|k| k.conflicts).sum()
    }
}

/// Why a run stopped.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The source could not be read or is not a unibus database.
    #[error("cannot migrate from {path}: {err}")]
    Source {
        /// The source file.
        path: PathBuf,
        /// What was wrong.
        err: StoreError,
    },
    /// A source record would not be a valid KV key; nothing was written.
    #[error(
        "source record {what} is invalid ({err}); fix it in the SQLite file, nothing was written"
    )]
    InvalidRecord {
        /// `kind/key` of the record.
        what: String,
        /// What was wrong.
        err: StoreError,
    },
    /// The target refused or did not answer; re-run to resume.
    #[error("target store: {0}; re-run `unibus migrate` to resume where it stopped")]
    Target(StoreError),
}

impl MigrateError {
    /// Process exit code: 2 for a local problem (the source), 1 for the cluster.
    pub fn exit_code(&self) -> u8 {
        match self {
            MigrateError::Source { .. } | MigrateError::InvalidRecord { .. } => 2,
            MigrateError::Target(_) => 1,
        }
    }
}

/// Copies `source` into `target`; see the module docs. `progress` is called from the
/// running task, often (after every record): keep it cheap.
pub async fn migrate(
    source: &Path,
    target: &KvStore,
    opts: MigrateOptions,
    progress: &(dyn Fn(&Progress) + Sync),
) -> Result<MigrateReport, MigrateError> {
    run(source, Some(target), opts, progress).await
}

/// Checks that `source` is a unibus SQLite database this binary can read, without reading
/// its records or connecting anywhere: lets the CLI fail fast on a local mistake.
pub async fn check_source(source: &Path) -> Result<(), MigrateError> {
    let p = source.to_path_buf();
    let res = tokio::task::spawn_blocking(move || sqlite::check_source(&p))
        .await
        .map_err(|e| StoreError::Backend(format!("sqlite check task failed: {e}")));
    res.and_then(|r| r).map_err(|err| MigrateError::Source {
        path: source.to_path_buf(),
        err,
    })
}

/// A dry run against a cluster that has no unibus buckets yet: every record is new.
pub async fn preview_into_empty(
    source: &Path,
    progress: &(dyn Fn(&Progress) + Sync),
) -> Result<MigrateReport, MigrateError> {
    let opts = MigrateOptions {
        dry_run: true,
        ..MigrateOptions::default()
    };
    run(source, None, opts, progress).await
}

async fn run(
    source: &Path,
    target: Option<&KvStore>,
    opts: MigrateOptions,
    progress: &(dyn Fn(&Progress) + Sync),
) -> Result<MigrateReport, MigrateError> {
    let stage = |stage| {
        progress(&Progress {
            stage,
            done: 0,
            total: 0,
            written: 0,
        })
    };
    stage(Stage::ReadSource);
    let snapshot = read_source(source).await?;
    let records = records(&snapshot);
    validate(&records)?;

    stage(Stage::ReadTarget);
    let before = read_target(target).await?;

    let dry_run = opts.dry_run || target.is_none();
    let copy = Copier {
        target,
        before: &before,
        dry_run,
        overwrite: opts.overwrite,
        parallelism: opts.parallelism.max(1),
    };
    let mut tallies = Vec::with_capacity(Kind::ALL.len());
    let mut written = 0;
    for kind in Kind::ALL {
        let of_kind: Vec<&Record<'_>> = records.iter().filter(|r| r.kind() == kind).collect();
        let tally = copy.kind(kind, &of_kind, written, progress).await?;
        written += tally.written;
        tallies.push(tally);
    }

    let after = if dry_run {
        before
    } else {
        progress(&Progress {
            stage: Stage::Verify,
            done: 0,
            total: 0,
            written,
        });
        read_target(target).await?
    };
    Ok(report(dry_run, &records, &after, tallies))
}

async fn read_source(path: &Path) -> Result<Snapshot, MigrateError> {
    let p = path.to_path_buf();
    let res = tokio::task::spawn_blocking(move || sqlite::read_snapshot(&p))
        .await
        .map_err(|e| StoreError::Backend(format!("sqlite read task failed: {e}")));
    res.and_then(|r| r).map_err(|err| MigrateError::Source {
        path: path.to_path_buf(),
        err,
    })
}

// ---- records

/// One source record, borrowed from the snapshot.
#[derive(Debug, Clone, Copy)]
enum Record<'a> {
    User(&'a User),
    Room(&'a Room),
    Member(&'a Member),
    Key(&'a RoomKey),
}

fn records(s: &Snapshot) -> Vec<Record<'_>> {
    let users = s.users.iter().map(Record::User);
    let rooms = s.rooms.iter().map(Record::Room);
    let members = s.members.iter().map(Record::Member);
    let keys = s.keys.iter().map(Record::Key);
    users.chain(rooms).chain(members).chain(keys).collect()
}

impl Record<'_> {
    fn kind(&self) -> Kind {
        match self {
            Record::User(_) => Kind::Users,
            Record::Room(_) => Kind::Rooms,
            Record::Member(_) => Kind::Members,
            Record::Key(_) => Kind::RoomKeys,
        }
    }

    /// The record's key in its bucket (the KV backend's layout).
    fn kv_key(&self) -> String {
        match self {
            Record::User(u) => u.key.clone(),
            Record::Room(r) => r.id.clone(),
            Record::Member(m) => format!("{}.{}", m.room, m.endpoint),
            Record::Key(k) => epoch_key(&k.room, k.epoch),
        }
    }

    /// `kind/key`, for messages.
    fn name(&self) -> String {
        format!("{}/{}", self.kind().as_str(), self.kv_key())
    }

    /// The stored value: the same JSON the KV backend writes.
    fn encode(&self) -> Result<Bytes, StoreError> {
        match self {
            Record::User(u) => encode(u),
            Record::Room(r) => encode(r),
            Record::Member(m) => encode(m),
            Record::Key(k) => encode(k),
        }
    }

    /// Whether `stored` holds this record's content (an undecodable value does not).
    fn same_as(&self, stored: &[u8]) -> bool {
        fn eq<T: DeserializeOwned + PartialEq>(stored: &[u8], want: &T) -> bool {
            serde_json::from_slice::<T>(stored).is_ok_and(|have| &have == want)
        }
        match self {
            Record::User(u) => eq(stored, *u),
            Record::Room(r) => eq(stored, *r),
            Record::Member(m) => eq(stored, *m),
            Record::Key(k) => eq(stored, *k),
        }
    }

    /// The `rooms_by_member` key of a member.
    fn index_key(&self) -> Option<String> {
        match self {
            Record::Member(m) => Some(format!("{}.{}", m.endpoint, m.room)),
            _ => None,
        }
    }

    /// Ids must be valid *and* already canonical: the key written is the key read back.
    fn validate(&self) -> Result<(), StoreError> {
        fn user(field: &'static str, key: &str) -> Result<(), StoreError> {
            let canonical = ids::user_key(field, key)?;
            if canonical != key {
                return Err(StoreError::Invalid {
                    field,
                    reason: format!("{key:?} is not upper case"),
                });
            }
            Ok(())
        }
        match self {
            Record::User(u) => user("user", &u.key),
            Record::Room(r) => ids::room_id(&r.id).map(|_| ()).and(user("owner", &r.owner)),
            Record::Member(m) => ids::room_id(&m.room)
                .map(|_| ())
                .and(user("endpoint", &m.endpoint))
                .and(user("added_by", &m.added_by)),
            Record::Key(k) => ids::room_id(&k.room).and(ids::epoch(k.epoch)).map(|_| ()),
        }
    }
}

fn validate(records: &[Record<'_>]) -> Result<(), MigrateError> {
    for record in records {
        record
            .validate()
            .map_err(|err| MigrateError::InvalidRecord {
                what: record.name(),
                err,
            })?;
    }
    Ok(())
}

// ---- the target

/// Raw contents of the five buckets, key → value.
#[derive(Debug, Default)]
struct Target {
    users: BTreeMap<String, Bytes>,
    rooms: BTreeMap<String, Bytes>,
    members: BTreeMap<String, Bytes>,
    index: BTreeMap<String, Bytes>,
    keys: BTreeMap<String, Bytes>,
}

impl Target {
    fn of(&self, kind: Kind) -> &BTreeMap<String, Bytes> {
        match kind {
            Kind::Users => &self.users,
            Kind::Rooms => &self.rooms,
            Kind::Members => &self.members,
            Kind::RoomKeys => &self.keys,
        }
    }

    /// For a member: whether its index entry exists (other kinds have none).
    fn has_index(&self, record: &Record<'_>) -> bool {
        record
            .index_key()
            .is_none_or(|k| self.index.contains_key(&k))
    }
}

async fn read_target(target: Option<&KvStore>) -> Result<Target, MigrateError> {
    let Some(kv) = target else {
        return Ok(Target::default());
    };
    let read = async {
        Ok::<_, StoreError>(Target {
            users: kv.scan(&kv.users).await?,
            rooms: kv.scan(&kv.rooms).await?,
            members: kv.scan(&kv.members).await?,
            index: kv.scan(&kv.index).await?,
            keys: kv.scan(&kv.keys).await?,
        })
    };
    read.await.map_err(MigrateError::Target)
}

// ---- copying

/// How one record fared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    New { wrote: bool },
    Unchanged { wrote: bool },
    Conflict { wrote: bool },
}

/// Per-kind counts as copying goes (target count and names are added at the end).
#[derive(Debug, Default)]
struct Tally {
    new: usize,
    unchanged: usize,
    conflicts: usize,
    written: usize,
    examples: Vec<String>,
}

/// One run's copy settings, shared by every record.
struct Copier<'a> {
    target: Option<&'a KvStore>,
    before: &'a Target,
    dry_run: bool,
    overwrite: bool,
    parallelism: usize,
}

impl Copier<'_> {
    /// Copies the records of one kind, `parallelism` at a time.
    async fn kind(
        &self,
        kind: Kind,
        records: &[&Record<'_>],
        written_before: usize,
        progress: &(dyn Fn(&Progress) + Sync),
    ) -> Result<Tally, MigrateError> {
        let total = records.len();
        let mut at = Progress {
            stage: Stage::Copy(kind),
            done: 0,
            total,
            written: written_before,
        };
        progress(&at);
        let mut tally = Tally::default();
        let mut results = futures_util::stream::iter(records.iter().map(|r| self.retried(r)))
            .buffer_unordered(self.parallelism);
        while let Some(res) = results.next().await {
            let (name, outcome) = res.map_err(MigrateError::Target)?;
            let wrote = tally.add(name, outcome);
            at.done += 1;
            at.written += usize::from(wrote);
            progress(&at);
        }
        Ok(tally)
    }

    /// [`Copier::one`], retried when the cluster did not answer in time. A retry is safe:
    /// a write that landed although its answer was lost is found equal and left alone.
    async fn retried(&self, record: &Record<'_>) -> Result<(String, Outcome), StoreError> {
        let mut attempt = 1;
        loop {
            match self.one(record).await {
                Err(StoreError::Unavailable(e)) if attempt < ATTEMPTS => {
                    tracing::debug!(record = record.name(), attempt, error = %e, "retrying");
                    tokio::time::sleep(RETRY_PAUSE * attempt).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Compares one record with the target and writes what is missing.
    async fn one(&self, record: &Record<'_>) -> Result<(String, Outcome), StoreError> {
        let key = record.kv_key();
        let outcome = match self.before.of(record.kind()).get(&key) {
            None => self.create(record, &key).await?,
            Some(stored) if record.same_as(stored) => {
                let wrote = self.finish_member(record).await?;
                // A member whose index entry is missing still needed work: count it new.
                if self.before.has_index(record) {
                    Outcome::Unchanged { wrote }
                } else {
                    Outcome::New { wrote }
                }
            }
            Some(_) => self.differs(record, &key).await?,
        };
        Ok((record.name(), outcome))
    }

    /// Writes an absent record (never replacing one that appeared meanwhile).
    async fn create(&self, record: &Record<'_>, key: &str) -> Result<Outcome, StoreError> {
        let Some(kv) = self.writer() else {
            return Ok(Outcome::New { wrote: false });
        };
        if kv.create(bucket(kv, record), key, record.encode()?).await? {
            self.finish_member(record).await?;
            return Ok(Outcome::New { wrote: true });
        }
        // Someone wrote it since the bulk read: decide on what is there now.
        self.differs(record, key).await
    }

    /// The bulk read saw different content: confirm with a leader read, then report (or,
    /// with `overwrite`, replace).
    async fn differs(&self, record: &Record<'_>, key: &str) -> Result<Outcome, StoreError> {
        let Some(kv) = self.target else {
            return Ok(Outcome::New { wrote: false });
        };
        let stored = kv.get_raw(bucket(kv, record), key).await?;
        match stored {
            None if self.dry_run => Ok(Outcome::New { wrote: false }),
            None => {
                kv.put(bucket(kv, record), key, record.encode()?).await?;
                self.finish_member(record).await?;
                Ok(Outcome::New { wrote: true })
            }
            Some((bytes, _)) if record.same_as(&bytes) => {
                let wrote = self.finish_member(record).await?;
                Ok(Outcome::Unchanged { wrote })
            }
            Some(_) if self.overwrite && !self.dry_run => {
                kv.put(bucket(kv, record), key, record.encode()?).await?;
                self.finish_member(record).await?;
                Ok(Outcome::Conflict { wrote: true })
            }
            Some(_) => Ok(Outcome::Conflict { wrote: false }),
        }
    }

    /// Second write of a member: its index entry, if the bulk read did not see it.
    /// Returns whether it wrote.
    async fn finish_member(&self, record: &Record<'_>) -> Result<bool, StoreError> {
        let (Record::Member(m), Some(kv)) = (record, self.writer()) else {
            return Ok(false);
        };
        if self.before.has_index(record) {
            return Ok(false);
        }
        kv.write_index(&m.room, &m.endpoint).await?;
        Ok(true)
    }

    /// The target, unless this is a dry run.
    fn writer(&self) -> Option<&KvStore> {
        self.target.filter(|_| !self.dry_run)
    }
}

fn bucket<'k>(kv: &'k KvStore, record: &Record<'_>) -> &'k async_nats::jetstream::kv::Store {
    match record.kind() {
        Kind::Users => &kv.users,
        Kind::Rooms => &kv.rooms,
        Kind::Members => &kv.members,
        Kind::RoomKeys => &kv.keys,
    }
}

impl Tally {
    /// Counts one outcome; returns whether it wrote.
    fn add(&mut self, name: String, outcome: Outcome) -> bool {
        let wrote = match outcome {
            Outcome::New { wrote } => {
                self.new += 1;
                wrote
            }
            Outcome::Unchanged { wrote } => {
                self.unchanged += 1;
                wrote
            }
            Outcome::Conflict { wrote } => {
                self.conflicts += 1;
                if self.examples.len() < CONFLICTS_SHOWN {
                    self.examples.push(name);
                }
                wrote
            }
        };
        self.written += usize::from(wrote);
        wrote
    }
}

// ---- verification

fn report(
    dry_run: bool,
    records: &[Record<'_>],
    target: &Target,
    tallies: Vec<Tally>,
) -> MigrateReport {
    let source = source_lines(records);
    let target_all = target_lines(target);
    let mut target_of_source: Lines = Default::default();
    for ((slot, theirs), ours) in target_of_source.iter_mut().zip(&target_all).zip(&source) {
        let keys: BTreeSet<&str> = ours.iter().map(|(k, _)| k.as_str()).collect();
        *slot = theirs
            .iter()
            .filter(|(k, _)| keys.contains(k.as_str()))
            .cloned()
            .collect();
    }
    let mut kinds = Vec::with_capacity(Kind::ALL.len());
    let mut conflict_examples = Vec::new();
    for (i, (kind, tally)) in Kind::ALL.into_iter().zip(tallies).enumerate() {
        kinds.push(KindReport {
            kind,
            source: records.iter().filter(|r| r.kind() == kind).count(),
            target: target.of(kind).len(),
            extra: target_all[i].len() - target_of_source[i].len(),
            new: tally.new,
            unchanged: tally.unchanged,
            conflicts: tally.conflicts,
            written: tally.written,
        });
        conflict_examples.extend(tally.examples);
    }
    conflict_examples.truncate(CONFLICTS_SHOWN);
    let index_missing = records.iter().filter(|r| !target.has_index(r)).count();
    let source_digest = digest(&source);
    let target_digest = digest(&target_of_source);
    let verified = kinds.iter().all(|k| k.source == k.target - k.extra)
        && index_missing == 0
        && source_digest == target_digest;
    MigrateReport {
        dry_run,
        kinds,
        conflict_examples,
        index_missing,
        source_digest,
        target_digest,
        verified,
    }
}

/// Canonical lines per kind: `(kv key, canonical JSON)`.
type Lines = [Vec<(String, String)>; 4];

fn source_lines(records: &[Record<'_>]) -> Lines {
    let mut lines: Lines = Default::default();
    for (slot, kind) in lines.iter_mut().zip(Kind::ALL) {
        *slot = records
            .iter()
            .filter(|r| r.kind() == kind)
            .map(|r| (r.kv_key(), canonical_record(r)))
            .collect();
    }
    lines
}

fn canonical_record(record: &Record<'_>) -> String {
    match record {
        Record::User(u) => canonical(*u),
        Record::Room(r) => canonical(*r),
        Record::Member(m) => canonical(*m),
        Record::Key(k) => canonical(*k),
    }
}

fn target_lines(target: &Target) -> Lines {
    [
        decoded::<User>(&target.users),
        decoded::<Room>(&target.rooms),
        decoded::<Member>(&target.members),
        decoded::<RoomKey>(&target.keys),
    ]
}

/// Re-serialises every stored value through its record type, so formatting differences
/// in the stored JSON do not count; an undecodable value gets a line that cannot match.
fn decoded<T: DeserializeOwned + Serialize>(
    map: &BTreeMap<String, Bytes>,
) -> Vec<(String, String)> {
    map.iter()
        .map(|(key, bytes)| {
            let line = serde_json::from_slice::<T>(bytes)
                .map(|v| canonical(&v))
                .unwrap_or_else(|e| format!("undecodable: {e}"));
            (key.clone(), line)
        })
        .collect()
}

/// serde_json of a record struct: fields in declaration order, no maps, no floats — the
/// same record always gives the same bytes.
fn canonical<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| format!("unserialisable: {e}"))
}

/// SHA-256 (hex) over every record: per kind in copy order a header line `kind count`,
/// then `key\tjson` lines sorted by KV key. One function for both sides.
fn digest(lines: &Lines) -> String {
    let mut ctx = Context::new(&SHA256);
    for (kind, kind_lines) in Kind::ALL.into_iter().zip(lines) {
        let mut sorted: Vec<&(String, String)> = kind_lines.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        ctx.update(format!("{} {}\n", kind.as_str(), sorted.len()).as_bytes());
        for (key, json) in sorted {
            ctx.update(key.as_bytes());
            ctx.update(b"\t");
            ctx.update(json.as_bytes());
            ctx.update(b"\n");
        }
    }
    ctx.finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A plain-text rendering of a report for the CLI.
pub fn table(r: &MigrateReport) -> String {
    let mut out = format!(
        "{:<10} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>8}\n",
        "KIND", "SOURCE", "TARGET", "EXTRA", "NEW", "UNCHANGED", "CONFLICTS", "WRITTEN"
    );
    for k in &r.kinds {
        out.push_str(&format!(
            "{:<10} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>8}\n",
            k.kind.as_str(),
            k.source,
            k.target,
            k.extra,
            k.new,
            k.unchanged,
            k.conflicts,
            k.written
        ));
    }
    out.push_str(&format!("source digest sha256:{}\n", r.source_digest));
    out.push_str(&format!(
        "target digest sha256:{} (the source's keys)\n",
        r.target_digest
    ));
    for name in &r.conflict_examples {
        out.push_str(&format!("conflict: {name} differs in the target (kept)\n"));
    }
    if r.index_missing > 0 {
        out.push_str(&format!(
            "{} members have no rooms_by_member entry in the target\n",
            r.index_missing
        ));
    }
    let verdict = match (r.dry_run, r.verified) {
        (true, true) => "dry run: the target already holds the source; nothing to copy".into(),
        (true, false) => format!(
            "dry run: nothing written; a run would write {} records",
            r.kinds.iter().map(|k| k.new).sum::<usize>()
        ),
        (false, true) => format!(
            "verified: {} writes; the target holds every source record ({} of its own kept)",
            r.written(),
            r.kinds.iter().map(|k| k.extra).sum::<usize>()
        ),
        (false, false) => format!(
            "NOT verified: {} writes; target differs from source ({} conflicts; re-run, or --overwrite to replace conflicts)",
            r.written(),
            r.conflicts()
        ),
    };
    out.push_str(&verdict);
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> User {
        User {
            key: nkeys::KeyPair::new_user().public_key(),
            name: name.into(),
            admin: false,
            created_at: 1,
            revoked_at: None,
            xkey: None,
        }
    }

    #[test]
    fn digest_ignores_order_and_formatting_but_not_content() {
        let (a, b) = (user("a"), user("b"));
        let snapshot = Snapshot {
            users: vec![a.clone(), b.clone()],
            ..Snapshot::default()
        };
        let source = source_lines(&records(&snapshot));
        let mut target = Target::default();
        // Stored in another field order and with spaces: same content.
        for u in [&b, &a] {
            let json = format!(
                "{{ \"revoked_at\": null, \"created_at\": 1, \"admin\": false, \"name\": {:?}, \"key\": {:?} }}",
                u.name, u.key
            );
            target.users.insert(u.key.clone(), Bytes::from(json));
        }
        assert_eq!(digest(&source), digest(&target_lines(&target)));
        target.users.insert(
            a.key.clone(),
            encode(&User {
                admin: true,
                ..a.clone()
            })
            .unwrap(),
        );
        assert_ne!(digest(&source), digest(&target_lines(&target)));
        target
            .users
            .insert(a.key.clone(), Bytes::from_static(b"not json"));
        assert_ne!(digest(&source), digest(&target_lines(&target)));
    }

    #[test]
    fn a_target_holding_the_source_and_more_verifies_and_counts_the_rest_as_extra() {
        let (a, cluster_admin) = (user("a"), user("the cluster's bootstrap admin"));
        let snapshot = Snapshot {
            users: vec![a.clone()],
            ..Snapshot::default()
        };
        let records = records(&snapshot);
        let mut target = Target::default();
        for u in [&a, &cluster_admin] {
            target.users.insert(u.key.clone(), encode(u).unwrap());
        }
        let tallies = || Kind::ALL.iter().map(|_| Tally::default()).collect();
        let r = report(false, &records, &target, tallies());
        assert!(r.verified, "{}", table(&r));
        assert_eq!(r.source_digest, r.target_digest);
        let users = &r.kinds[0];
        assert_eq!((users.source, users.target, users.extra), (1, 2, 1));
        assert!(table(&r).contains("1 of its own kept"), "{}", table(&r));

        // Missing a source record still fails, extra records or not.
        target.users.remove(&a.key);
        assert!(!report(false, &records, &target, tallies()).verified);
    }

    #[test]
    fn non_canonical_ids_are_refused() {
        let mut u = user("a");
        u.key = u.key.to_lowercase();
        assert!(Record::User(&u).validate().is_err());
        let room = Room {
            id: "a.b".into(),
            name: "r".into(),
            owner: user("o").key,
            encrypted: false,
            created_at: 1,
        };
        assert!(Record::Room(&room).validate().is_err());
    }
}
