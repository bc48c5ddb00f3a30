//! The node's admin HTTP (`/healthz`, `/readyz`) and the small HTTP GET it uses to read
//! nats-server's monitoring port.
//!
//! Both sides speak only what they need: GET, one request per connection, `Connection:
//! close`, bodies under a megabyte. A general HTTP stack (hyper, a router) would triple the
//! build for three fixed routes; this file is small enough to read whole. The client sends
//! HTTP/1.0 so servers answer with a plain body (no chunked encoding) and close.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::readiness::Readiness;
use super::shutdown::Shutdown;

const MAX_REQUEST: usize = 8 * 1024;
const MAX_RESPONSE: usize = 1024 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A response: status code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// Serves the admin routes until shutdown. The listener is bound by the caller so a bind
/// failure is reported before the node spawns anything.
pub async fn serve(listener: TcpListener, readiness: Arc<Readiness>, mut shutdown: Shutdown) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!("admin http: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.wait() => return,
        };
        let readiness = readiness.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &readiness).await {
                tracing::debug!("admin http: {e}");
            }
        });
    }
}

async fn handle(mut stream: TcpStream, readiness: &Readiness) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let head = tokio::time::timeout(IO_TIMEOUT, async {
        let mut chunk = [0u8; 1024];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.len() > MAX_REQUEST {
                break;
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if head.is_err() {
        return Ok(()); // a client that never finished its request
    }
    head.unwrap_or(Ok(()))?;
    let request_line = String::from_utf8_lossy(&buf);
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/healthz") => (200, "text/plain", "ok\n".to_string()),
        ("GET", "/readyz") => {
            let snapshot = readiness.snapshot();
            let status = if snapshot.ready { 200 } else { 503 };
            let body = serde_json::to_string_pretty(&snapshot).unwrap_or_default();
            (status, "application/json", body + "\n")
        }
        ("GET", "/metrics") => (
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            crate::metrics::get().encode(),
        ),
        ("GET", _) => (
            404,
            "text/plain",
            "not found: try /healthz, /readyz or /metrics\n".into(),
        ),
        _ => (405, "text/plain", "only GET is served\n".into()),
    };
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// GET `http://{addr}{path}`, bounded by `timeout` as a whole.
pub async fn get(addr: &str, path: &str, timeout: Duration) -> std::io::Result<Response> {
    tokio::time::timeout(timeout, get_inner(addr, path))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("GET http://{addr}{path} timed out"),
            )
        })?
}

async fn get_inner(addr: &str, path: &str) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    (&mut stream)
        .take(MAX_RESPONSE as u64)
        .read_to_end(&mut raw)
        .await?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> std::io::Result<Response> {
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string());
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let status = head
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    Ok(Response {
        status,
        body: body.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::readiness::{Stage, StageState};

    #[test]
    fn responses_parse() {
        let r =
            parse_response(b"HTTP/1.1 503 Service Unavailable\r\nA: b\r\n\r\n{\"x\":1}").unwrap();
        assert_eq!(r.status, 503);
        assert_eq!(r.body, "{\"x\":1}");
        assert!(parse_response(b"garbage").is_err());
    }

    #[tokio::test]
    async fn serves_healthz_and_readyz_with_the_right_codes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let readiness = Arc::new(Readiness::new("n1", false));
        let (trigger, shutdown) = crate::node::shutdown::channel();
        let server = tokio::spawn(serve(listener, readiness.clone(), shutdown));
        let t = Duration::from_secs(2);
        assert_eq!(get(&addr, "/healthz", t).await.unwrap().status, 200);
        let not_ready = get(&addr, "/readyz", t).await.unwrap();
        assert_eq!(not_ready.status, 503);
        assert!(not_ready.body.contains("\"node\": \"n1\""));
        readiness.update(|s| {
            s.stages.nats = Stage::new(StageState::Up);
            s.stages.jetstream = Stage::new(StageState::Up);
            s.stages.store = Stage::new(StageState::Up);
            s.stages.authenticator = Stage::new(StageState::Up);
            s.stages.membership = Stage::new(StageState::Up);
        });
        assert_eq!(get(&addr, "/readyz", t).await.unwrap().status, 200);
        assert_eq!(get(&addr, "/nope", t).await.unwrap().status, 404);
        trigger.trigger();
        server.await.unwrap();
    }
}
