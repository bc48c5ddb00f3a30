//! `unibus send` and `unibus listen`.

use std::io::BufRead;
use std::time::Duration;

use base64::Engine;
use futures_util::StreamExt;
use serde_json::json;
use unibus::client::{RoomMessage, Start};

use super::conn::{self, ConnArgs};
use super::output::{self, fail};

/// Sends MESSAGE, or each line of stdin; prints each message's stream sequence once the
/// cluster has stored it.
pub async fn send(room: &str, message: Option<String>, json: bool, conn: &ConnArgs) -> u8 {
    let client = match conn::client(conn).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let print = |seq: u64| {
        if json {
            output::json(&json!({"room": room, "seq": seq}));
        } else {
            println!("{seq}");
        }
    };
    match message {
        Some(text) => match client.send(room, text.as_bytes()).await {
            Ok(seq) => {
                print(seq);
                0
            }
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
                match client.send(room, line.as_bytes()).await {
                    Ok(seq) => print(seq),
                    Err(e) => return fail(&e),
                }
            }
            0
        }
    }
}

/// Prints a room's messages, one line each, until interrupted (or `count` messages, or
/// `timeout` of listening).
pub async fn listen(
    room: &str,
    start: Start,
    json: bool,
    count: Option<u64>,
    timeout: Option<u64>,
    conn: &ConnArgs,
) -> u8 {
    let client = match conn::client(conn).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut feed = match client.subscribe(room, start).await {
        Ok(f) => f,
        Err(e) => return fail(&e),
    };
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
                print_message(&message, json);
            }
            // A message that cannot be opened: say so, keep listening.
            Some(Err(unibus::client::ClientError::Crypto(e))) => {
                eprintln!("error: {e}");
            }
            Some(Err(e)) => return fail(&e),
            None => break,
        }
    }
    0
}

fn print_message(m: &RoomMessage, json: bool) {
    if json {
        let mut value = json!({
            "room": m.room,
            "seq": m.seq,
            "sender": m.sender,
            "time": output::time(m.time),
            "time_ms": m.time,
            "body": String::from_utf8_lossy(&m.body),
        });
        if std::str::from_utf8(&m.body).is_err() {
            value["body_base64"] = base64::engine::general_purpose::STANDARD
                .encode(&m.body)
                .into();
        }
        if let Some(epoch) = m.epoch {
            value["epoch"] = epoch.into();
        }
        output::json(&value);
    } else {
        println!(
            "{} {} {} {}",
            m.seq,
            output::time(m.time),
            m.sender,
            String::from_utf8_lossy(&m.body)
        );
    }
}
