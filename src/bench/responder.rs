//! The raw twin's responder for `ctl_read`, in a process of its own.
//!
//! unibus's reads are answered by the node, a process apart from its callers. An echo task
//! inside the bench process would share the requester's event loop: one wake-up there
//! takes in requests and replies together and sends both ends' writes, which no deployed
//! NATS service and its clients do. So the twin's responder runs apart too, as the hidden
//! `unibus bench-responder`, a child of the bench that dies with it.
//!
//! It answers with the bytes the bench gives it, so the twin can carry exactly what the
//! unibus side carries: a request on `unibus.bench.echo.set.<i>` stores its body as reply
//! `i` (and is answered `ok`); a request on `unibus.bench.echo.<i>` gets reply `i`.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;

/// The environment variable the responder's seed comes in (not the command line: other
/// users of the machine can read that).
pub const SEED_ENV: &str = "UNIBUS_BENCH_SEED";
const SUBJECTS: &str = "unibus.bench.echo.>";
const PREFIX: &str = "unibus.bench.echo.";

/// Serves until stdin closes (the bench ended, or died) or the connection does.
pub async fn serve(server: &str, secrets: &Path) -> Result<(), String> {
    let seed = std::env::var(SEED_ENV).map_err(|_| format!("{SEED_ENV} is not set"))?;
    let nats = super::raw_connection(secrets, &[server], seed).await?;
    let mut requests = nats.subscribe(SUBJECTS).await.map_err(|e| e.to_string())?;
    nats.flush().await.map_err(|e| e.to_string())?;
    let (closed_tx, mut closed) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        let _ = closed_tx.send(());
    });
    let mut replies: Vec<Bytes> = Vec::new();
    loop {
        let message = tokio::select! {
            m = requests.next() => match m {
                Some(m) => m,
                None => return Ok(()),
            },
            _ = &mut closed => return Ok(()),
        };
        let Some(reply_to) = message.reply else {
            continue;
        };
        let which = message.subject.as_str().strip_prefix(PREFIX).unwrap_or("");
        let answer = if let Some(i) = which.strip_prefix("set.") {
            match i.parse::<usize>() {
                Ok(i) if i < 64 => {
                    if replies.len() <= i {
                        replies.resize(i + 1, Bytes::new());
                    }
                    replies[i] = message.payload;
                    Bytes::from_static(b"ok")
                }
                _ => continue,
            }
        } else {
            match which.parse::<usize>().ok().and_then(|i| replies.get(i)) {
                Some(reply) => reply.clone(),
                None => continue,
            }
        };
        if nats.publish(reply_to, answer).await.is_err() {
            return Ok(());
        }
    }
}

/// A running responder; killed when dropped.
pub struct Responder {
    _child: tokio::process::Child,
}

/// Starts `unibus bench-responder` against `server` as `seed` and hands it `replies`
/// (reply `i` for subject `unibus.bench.echo.<i>`), through `via`, once it listens.
pub async fn spawn(
    unibus: &Path,
    server: &str,
    secrets: &Path,
    seed: String,
    replies: &[Bytes],
    via: &async_nats::Client,
) -> Result<Responder, String> {
    let child = tokio::process::Command::new(unibus)
        .arg("bench-responder")
        .arg("--server")
        .arg(server)
        .arg("--secrets")
        .arg(secrets)
        .env(SEED_ENV, seed)
        .stdin(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start the bench responder: {e}"))?;
    let responder = Responder { _child: child };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for (i, reply) in replies.iter().enumerate() {
        loop {
            let set = via.request(format!("{PREFIX}set.{i}"), reply.clone());
            match tokio::time::timeout(Duration::from_secs(1), set).await {
                Ok(Ok(_)) => break,
                // No responders yet (the child is still connecting): try again shortly.
                _ if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Ok(Err(e)) => return Err(format!("bench responder: {e}")),
                Err(_) => return Err("bench responder: no answer within 10 s".into()),
            }
        }
    }
    Ok(responder)
}
