//! `unibus migrate --history`: carry a single node's room history (its `ROOMS` stream)
//! into the cluster's, so that moving to a cluster leaves nothing a user stored behind
//! (DESIGN §4). The membership records go first ([`super::migrate`]); this copies the
//! messages.
//!
//! **Reading a stopped node's history.** The messages live in the old node's JetStream
//! store (`<data>/jetstream`), which only nats-server reads, and the growth path stops the
//! old node first (so its SQLite file is a consistent snapshot). So this copies the store
//! directory to a temporary one — nats-server writes to a store it recovers, and the
//! source is never modified — and starts a private nats-server on the copy: loopback, a
//! random password, no routes, no TLS (nothing leaves the machine). Messages are read by
//! sequence from the stream's leader (`STREAM.MSG.GET`), 64 at a time.
//!
//! **Idempotent and resumable.** Each copy carries `Unibus-Migrated-From: <source> <seq>`,
//! where `<source>` names the old stream (its creation time) and `<seq>` the message's
//! sequence there. Before copying, the target is read for those headers and only the
//! missing sequences are published, in source order; a publish carries a `Nats-Msg-Id`
//! made of the same pair, so a retry after a lost acknowledgement is stored once. An
//! interrupted run is finished by the next; a repeated one copies nothing.
//!
//! **Verified.** Afterwards the target is read again: every source sequence must be there,
//! with the same subject and payload (a SHA-256 per message, and one over all of them in
//! source order, reported for both sides).
//!
//! **What does not carry over.** Stream sequences (the cluster numbers messages anew, so a
//! listener's `Start::After` from the old node means nothing there) and the stored time (the
//! original is kept in `Unibus-Migrated-Time`, Unix nanoseconds). Copies are appended after
//! whatever the cluster's rooms already hold, so migrate before clients post into the
//! migrated rooms, as the growth path does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage, stream};
use futures_util::StreamExt;
use ring::digest::{Context, SHA256};
use serde::Serialize;

use super::api::ROOMS_STREAM;

/// Header naming the source stream and sequence of a copied message.
pub const MIGRATED_FROM: &str = "Unibus-Migrated-From";
/// Header keeping a copied message's original stored time (Unix nanoseconds).
pub const MIGRATED_TIME: &str = "Unibus-Migrated-Time";

/// Messages read or published at once.
const IN_FLIGHT: usize = 64;
/// Tries per message before a publish that is not acknowledged stops the run.
const ATTEMPTS: u32 = 5;
/// How long the private nats-server may take to recover the store and listen.
const SOURCE_START: Duration = Duration::from_secs(30);

/// What a history copy did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HistoryReport {
    /// Messages in the old node's `ROOMS` stream.
    pub source_messages: u64,
    /// Copied by this run (or, in a dry run, that would be).
    pub copied: u64,
    /// Already in the cluster from an earlier run.
    pub already_there: u64,
    /// Every source message is in the cluster with the same subject and payload.
    pub verified: bool,
    /// SHA-256 over every source message (subject and payload), in source order.
    pub source_digest: String,
    /// The same over their copies in the cluster.
    pub target_digest: String,
    pub dry_run: bool,
}

/// Why a history copy failed.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("{path}: {why}")]
    Source { path: PathBuf, why: String },
    #[error("the cluster's history: {0}")]
    Target(String),
}

fn source_error(path: &Path, why: impl std::fmt::Display) -> HistoryError {
    HistoryError::Source {
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

fn target_error(what: &str, e: impl std::fmt::Display) -> HistoryError {
    HistoryError::Target(format!("{what}: {e}"))
}

/// Copies the room history kept under `data_dir` (the old node's data directory, holding
/// `jetstream/`) into the `ROOMS` stream that `target` (a JetStream context in the
/// cluster's `APP` account) reaches. `nats_server` is the binary to read the old store
/// with.
pub async fn copy_history(
    data_dir: &Path,
    nats_server: &Path,
    target: &jetstream::Context,
    dry_run: bool,
) -> Result<HistoryReport, HistoryError> {
    let mut report = HistoryReport {
        dry_run,
        ..HistoryReport::default()
    };
    let Some(source) = SourceServer::start(data_dir, nats_server).await? else {
        report.verified = true;
        return Ok(report);
    };
    let Some(source_stream) = source.rooms_stream().await? else {
        // The old node never stored a message: nothing to carry.
        report.verified = true;
        return Ok(report);
    };
    let info = source_stream.cached_info();
    let origin = info.created.unix_timestamp_nanos().to_string();
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    let target_stream = target.get_stream(ROOMS_STREAM).await.map_err(|e| {
        target_error(
            "no ROOMS stream (start the cluster's nodes first, they create it)",
            e,
        )
    })?;

    // One pass in source order: hash every message, and publish those the cluster lacks
    // in that order, 64 acknowledgements pending (the stream stores one connection's
    // publishes in the order they arrive, so the copies keep the old order; a publish
    // that has to be retried, after a leader change, lands after those sent behind it).
    let before = copies_in(&target_stream, &origin).await?;
    let mut source_hashes = BTreeMap::new();
    let mut pending = futures_util::stream::FuturesOrdered::new();
    let mut reads = messages(&source_stream, first, last);
    while let Some(read) = reads.next().await {
        let Some(message) = read.map_err(|e| source_error(data_dir, e))? else {
            continue;
        };
        let hash = message_hash(message.subject.as_str(), &message.payload);
        source_hashes.insert(message.sequence, hash);
        if before.get(&message.sequence) == Some(&hash) {
            continue;
        }
        report.copied += 1;
        if dry_run {
            continue;
        }
        let copy = Copy::of(message, &origin);
        let first_try = target
            .send_publish(copy.subject.clone(), copy.publish())
            .await
            .map_err(|e| e.to_string());
        pending.push_back(async move {
            let acked = match first_try {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            match acked {
                Ok(()) => Ok(()),
                Err(_) => copy.retry(target).await,
            }
        });
        if pending.len() >= IN_FLIGHT
            && let Some(done) = pending.next().await
        {
            done?;
        }
    }
    while let Some(done) = pending.next().await {
        done?;
    }
    report.source_messages = source_hashes.len() as u64;
    report.already_there = report.source_messages - report.copied;
    report.source_digest = digest_of(source_hashes.values());
    if dry_run {
        return Ok(report);
    }

    let after = copies_in(&target_stream, &origin).await?;
    let copied: Vec<&[u8; 32]> = source_hashes
        .keys()
        .filter_map(|seq| after.get(seq))
        .collect();
    report.target_digest = digest_of(copied);
    report.verified = source_hashes
        .iter()
        .all(|(seq, hash)| after.get(seq) == Some(hash));
    Ok(report)
}

/// One source message as it is published into the cluster.
struct Copy {
    seq: u64,
    subject: async_nats::Subject,
    payload: bytes::Bytes,
    headers: HeaderMap,
    id: String,
}

impl Copy {
    fn of(message: jetstream::message::StreamMessage, origin: &str) -> Copy {
        let mut headers = HeaderMap::new();
        for (name, values) in message.headers.iter() {
            // Server directives (message id, expectations, TTL) were for the first publish.
            if name.to_string().starts_with("Nats-") {
                continue;
            }
            for value in values {
                headers.append(name.clone(), value.clone());
            }
        }
        let seq = message.sequence;
        headers.insert(MIGRATED_FROM, format!("{origin} {seq}").as_str());
        headers.insert(
            MIGRATED_TIME,
            message.time.unix_timestamp_nanos().to_string().as_str(),
        );
        Copy {
            seq,
            subject: message.subject,
            payload: message.payload,
            headers,
            id: format!("migrate-{origin}-{seq}"),
        }
    }

    /// The publish; its message id makes a repeat after a lost acknowledgement a no-op.
    fn publish(&self) -> PublishMessage {
        PublishMessage::build()
            .payload(self.payload.clone())
            .headers(self.headers.clone())
            .message_id(&self.id)
    }

    /// Publishes again until acknowledged, [`ATTEMPTS`] times at most.
    async fn retry(&self, target: &jetstream::Context) -> Result<(), HistoryError> {
        let mut last_error = String::new();
        for attempt in 1..=ATTEMPTS {
            tokio::time::sleep(Duration::from_millis(200) * attempt).await;
            match target
                .send_publish(self.subject.clone(), self.publish())
                .await
            {
                Ok(ack) => match ack.await {
                    Ok(_) => return Ok(()),
                    Err(e) => last_error = e.to_string(),
                },
                Err(e) => last_error = e.to_string(),
            }
        }
        Err(target_error(
            &format!("store message {} ({ATTEMPTS} more tries)", self.seq),
            last_error,
        ))
    }
}

/// The messages `first..=last` of `stream`, in order, 64 reads in flight; `None` for a
/// sequence that was deleted (a purged room).
fn messages(
    stream: &stream::Stream,
    first: u64,
    last: u64,
) -> impl futures_util::Stream<Item = Result<Option<jetstream::message::StreamMessage>, String>> + '_
{
    // An empty stream reports 0..=0 (or first = last + 1): nothing to read.
    futures_util::stream::iter(first.max(1)..=last)
        .map(move |seq| async move {
            match stream.get_raw_message(seq).await {
                Ok(m) => Ok(Some(m)),
                Err(e) if super::cas::is_no_message(&e) => Ok(None),
                Err(e) => Err(format!("read message {seq}: {e}")),
            }
        })
        .buffered(IN_FLIGHT)
}

/// Copies from `origin` already in `target`: source sequence → hash of subject and payload.
async fn copies_in(
    target: &stream::Stream,
    origin: &str,
) -> Result<BTreeMap<u64, [u8; 32]>, HistoryError> {
    let state = target
        .get_info()
        .await
        .map_err(|e| target_error("read the ROOMS stream's state", e))?
        .state;
    let mut out = BTreeMap::new();
    let mut reads = messages(target, state.first_sequence, state.last_sequence);
    while let Some(read) = reads.next().await {
        let Some(message) = read.map_err(HistoryError::Target)? else {
            continue;
        };
        let from = message.headers.get(MIGRATED_FROM).map(|v| v.as_str());
        if let Some(seq) = from
            .and_then(|v| v.split_once(' '))
            .filter(|(o, _)| *o == origin)
            .and_then(|(_, seq)| seq.parse().ok())
        {
            out.insert(
                seq,
                message_hash(message.subject.as_str(), &message.payload),
            );
        }
    }
    Ok(out)
}

/// The report as `migrate` prints it under the records' table.
pub fn table(r: &HistoryReport) -> String {
    let verdict = match (r.dry_run, r.verified) {
        (true, _) => format!("dry run: a run would copy {} messages", r.copied),
        (false, true) => format!(
            "verified: {} copied, {} already there; the cluster holds every message",
            r.copied, r.already_there
        ),
        (false, false) => "NOT verified: some messages are missing or differ; re-run".into(),
    };
    format!(
        "history    {:>8} messages\nhistory source digest sha256:{}\nhistory target digest sha256:{}\n{verdict}\n",
        r.source_messages, r.source_digest, r.target_digest
    )
}

fn message_hash(subject: &str, payload: &[u8]) -> [u8; 32] {
    let mut ctx = Context::new(&SHA256);
    ctx.update(&(subject.len() as u64).to_be_bytes());
    ctx.update(subject.as_bytes());
    ctx.update(payload);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

fn digest_of<'a>(hashes: impl IntoIterator<Item = &'a [u8; 32]>) -> String {
    let mut ctx = Context::new(&SHA256);
    for h in hashes {
        ctx.update(h);
    }
    ctx.finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A private nats-server on a copy of the old node's JetStream store; stopped on drop.
struct SourceServer {
    child: Child,
    js: jetstream::Context,
    _dir: tempfile::TempDir,
}

impl Drop for SourceServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl SourceServer {
    /// Starts one on a copy of `data_dir/jetstream`; `None` if the old node never had
    /// one (it stored no message).
    async fn start(
        data_dir: &Path,
        nats_server: &Path,
    ) -> Result<Option<SourceServer>, HistoryError> {
        if !data_dir.join("membership.db").is_file() {
            return Err(source_error(
                data_dir,
                "not a unibus node's data directory (no membership.db in it)",
            ));
        }
        let jetstream_dir = data_dir.join("jetstream");
        // With accounts (bus-auth soft/enforce) the stream is in APP; without, in the
        // global account.
        let Some(account) = ["APP", "$G"]
            .into_iter()
            .find(|a| jetstream_dir.join(a).join("streams").is_dir())
        else {
            return Ok(None);
        };
        let dir = tempfile::tempdir().map_err(|e| source_error(data_dir, e))?;
        let store = dir.path().join("store");
        copy_dir(&jetstream_dir, &store.join("jetstream"))
            .map_err(|e| source_error(&jetstream_dir, format!("cannot copy it: {e}")))?;
        let password = nuid::next().to_string();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| source_error(data_dir, format!("no free loopback port: {e}")))?
            .port();
        let quoted = |s: &str| serde_json::Value::from(s).to_string();
        let user = format!("{{ user: migrate, password: {} }}", quoted(&password));
        let auth = if account == "APP" {
            format!("accounts {{ APP {{ jetstream: enabled, users: [ {user} ] }} }}")
        } else {
            format!("authorization {{ users: [ {user} ] }}")
        };
        let config = format!(
            "listen: \"127.0.0.1:{port}\"\nserver_name: unibus_migrate\njetstream {{ store_dir: {} }}\n{auth}\n",
            quoted(&store.to_string_lossy())
        );
        let config_path = dir.path().join("nats-server.conf");
        let log_path = dir.path().join("nats-server.log");
        // It holds the password: 0600 like every secret.
        crate::auth::keys::write_secret(&config_path, config.as_bytes())
            .map_err(|e| source_error(dir.path(), e))?;
        let log = std::fs::File::create(&log_path).map_err(|e| source_error(dir.path(), e))?;
        let mut child = Command::new(nats_server)
            .arg("-c")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| source_error(nats_server, format!("cannot start it: {e}")))?;
        let url = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + SOURCE_START;
        let client = loop {
            let options = async_nats::ConnectOptions::with_user_and_password(
                "migrate".into(),
                password.clone(),
            )
            .connection_timeout(Duration::from_secs(1));
            match options.connect(&url).await {
                Ok(client) => break Ok(client),
                Err(e) => {
                    let exited = child.try_wait().ok().flatten();
                    if exited.is_some() || Instant::now() >= deadline {
                        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                        let why = match exited {
                            Some(status) => format!("nats-server exited ({status})"),
                            None => format!("nats-server did not listen in time ({e})"),
                        };
                        break Err(source_error(
                            &jetstream_dir,
                            format!("cannot read it: {why}; its log:\n{log}"),
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        match client {
            Ok(client) => Ok(Some(SourceServer {
                child,
                js: jetstream::new(client),
                _dir: dir,
            })),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    /// The old `ROOMS` stream, if the old node had one.
    async fn rooms_stream(&self) -> Result<Option<stream::Stream>, HistoryError> {
        match self.js.get_stream(ROOMS_STREAM).await {
            Ok(s) => Ok(Some(s)),
            Err(e) => match e.kind() {
                jetstream::context::GetStreamErrorKind::JetStream(js)
                    if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    Ok(None)
                }
                _ => Err(HistoryError::Target(format!(
                    "the old node's store: look up {ROOMS_STREAM}: {e}"
                ))),
            },
        }
    }
}

/// Copies directory `from` into `to` (created), recursively.
fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}
