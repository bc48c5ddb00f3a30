//! `unibus send` and `unibus listen`, durable (the default) or `--live`.
//!
//! Both modes print the same shapes so tools can read either: one line per message,
//! `--json` one object per line. What live lacks it leaves out rather than inventing: a
//! live message has no stream sequence (`-` in the text column, no `seq` in JSON, and
//! `"live": true` instead) and no stored time (`time` is when this listener received it).

use std::io::BufRead;
use std::time::Duration;

use base64::Engine;
use futures_util::StreamExt;
use serde_json::json;
use unibus::client::{ClientError, LiveMessage, RoomMessage, Start};

use super::conn::{self, ConnArgs};
use super::output::{self, fail};

/// Sends MESSAGE, or each line of stdin. Durable: prints each message's stream sequence
/// once the cluster has stored it. Live: prints nothing (with `--json`, one
/// `{"room", "live": true}` per message), and flushes before exiting so what was sent has
/// left.
pub async fn send(
    room: &str,
    message: Option<String>,
    live: bool,
    json: bool,
    conn: &ConnArgs,
) -> u8 {
    let client = match conn::client(conn).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let send_one = async |body: &[u8]| -> Result<(), ClientError> {
        if live {
            client
                .send_live(room, bytes::Bytes::copy_from_slice(body))
                .await?;
            if json {
                output::json(&json!({"room": room, "live": true}));
            }
        } else {
            let seq = client.send(room, body).await?;
            if json {
                output::json(&json!({"room": room, "seq": seq}));
            } else {
                println!("{seq}");
            }
        }
        Ok(())
    };
    let code = send_all(message, send_one).await;
    // Live publishes are only queued on the connection until flushed.
    if let Err(e) = client.close().await
        && code == 0
    {
        return fail(&e);
    }
    code
}

/// Calls `send_one` for MESSAGE, or for each line of stdin: exit code.
async fn send_all(
    message: Option<String>,
    send_one: impl AsyncFn(&[u8]) -> Result<(), ClientError>,
) -> u8 {
    match message {
        Some(text) => match send_one(text.as_bytes()).await {
            Ok(()) => 0,
            Err(e) => fail(&e),
        },
        None => {
            // Read stdin on a blocking thread, one line at a time.
            let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<String>>(64);
            std::thread::spawn(move || {
                for line in std::io::stdin().lock().lines() {
                    if tx.blocking_send(line).is_err() {
                        break;
                    }
                }
            });
            while let Some(line) = rx.recv().await {
                let line = match line {
                    Ok(l) => l,
                    Err(e) => {
                        eprintln!("error: reading stdin: {e}");
                        return 2;
                    }
                };
                if let Err(e) = send_one(line.as_bytes()).await {
                    return fail(&e);
                }
            }
            0
        }
    }
}

/// How `listen` reads a room.
pub enum Mode {
    /// The durable feed from a start position.
    Durable(Start),
    /// Live messages from now on.
    Live,
}

/// Prints a room's messages, one line each, until interrupted (or `count` messages, or
/// `timeout` of listening).
pub async fn listen(
    room: &str,
    mode: Mode,
    json: bool,
    count: Option<u64>,
    timeout: Option<u64>,
    conn: &ConnArgs,
) -> u8 {
    let client = match conn::client(conn).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    match mode {
        Mode::Durable(start) => match client.subscribe(room, start).await {
            Ok(feed) => print_all(feed, |m| print_message(&m, json), count, timeout).await,
            Err(e) => fail(&e),
        },
        Mode::Live => match client.subscribe_live(room).await {
            Ok(feed) => print_all(feed, |m| print_live(&m, json), count, timeout).await,
            Err(e) => fail(&e),
        },
    }
}

/// Prints what `feed` yields with `print` until it ends, `count` messages, `timeout`
/// seconds or Ctrl-C; exit code.
async fn print_all<M>(
    mut feed: impl futures_util::Stream<Item = Result<M, ClientError>> + Unpin,
    print: impl Fn(M),
    count: Option<u64>,
    timeout: Option<u64>,
) -> u8 {
    let deadline = timeout.map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    let mut seen = 0u64;
    while count.is_none_or(|n| seen < n) {
        let next = match deadline {
            Some(d) => match tokio::time::timeout_at(d, feed.next()).await {
                Ok(n) => n,
                Err(_) => break,
            },
            None => tokio::select! {
                n = feed.next() => n,
                _ = tokio::signal::ctrl_c() => break,
            },
        };
        match next {
            Some(Ok(message)) => {
                seen += 1;
                print(message);
            }
            // A message that cannot be opened: say so, keep listening.
            Some(Err(ClientError::Crypto(e))) => {
                eprintln!("error: {e}");
            }
            Some(Err(e)) => return fail(&e),
            None => break,
        }
    }
    0
}

fn print_message(m: &RoomMessage, json: bool) {
    print_line(
        &m.room,
        Some(m.seq),
        &m.sender,
        m.time,
        &m.body,
        m.epoch,
        json,
    );
}

fn print_live(m: &LiveMessage, json: bool) {
    let received = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    print_line(m.room(), None, m.sender(), received, &m.body, m.epoch, json);
}

/// One message as a line: `SEQ TIME SENDER BODY` (`-` for a live message's missing
/// sequence), or JSON.
fn print_line(
    room: &str,
    seq: Option<u64>,
    sender: &str,
    time_ms: u64,
    body: &[u8],
    epoch: Option<u32>,
    json: bool,
) {
    if json {
        let mut value = json!({
            "room": room,
            "sender": sender,
            "time": output::time(time_ms),
            "time_ms": time_ms,
            "body": String::from_utf8_lossy(body),
        });
        match seq {
            Some(seq) => value["seq"] = seq.into(),
            None => value["live"] = true.into(),
        }
        if std::str::from_utf8(body).is_err() {
            value["body_base64"] = base64::engine::general_purpose::STANDARD
                .encode(body)
                .into();
        }
        if let Some(epoch) = epoch {
            value["epoch"] = epoch.into();
        }
        output::json(&value);
    } else {
        let seq = seq.map_or_else(|| "-".to_string(), |s| s.to_string());
        println!(
            "{seq} {} {sender} {}",
            output::time(time_ms),
            String::from_utf8_lossy(body)
        );
    }
}
