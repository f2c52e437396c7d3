//! The local endpoint: `GET /health`, `GET /version` and a JSON `GET /status` describing the
//! daemon and each agent. Read-only; nothing here changes what the daemon does.
//!
//! Plain hyper rather than a router framework: three fixed paths do not need one, and every
//! page of code the daemon links is resident on every host of the fleet.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};

use crate::state::Shared;

/// Most connections served at once; further ones wait to be accepted.
pub const MAX_CONNECTIONS: usize = 32;
/// Longest wait for a request's headers, so an idle or slow client cannot hold a slot.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// What one client may cost the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: MAX_CONNECTIONS,
            header_timeout: HEADER_TIMEOUT,
        }
    }
}

/// Handler state: the shared view.
#[derive(Clone)]
pub struct AppState {
    pub shared: Shared,
}

/// Binds `addr` (so that a busy port is reported at start-up, before the daemon runs).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// Serves with the default [`Limits`] until `shutdown` resolves; connections still open
/// then are dropped (every answer is a small read-only document).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, state, shutdown, Limits::default()).await
}

/// [`serve`] with explicit limits.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    limits: Limits,
) -> std::io::Result<()> {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    // Out of descriptors and the like: wait a little instead of spinning.
                    tracing::warn!(error = %e, "local endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        conns.spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(answer(&state, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "local endpoint: connection ended");
            }
        });
        // Reap finished connections so the set does not grow with the daemon's uptime.
        while conns.try_join_next().is_some() {}
    }
    conns.shutdown().await;
    Ok(())
}

/// The answer to one request.
fn answer<B>(state: &AppState, req: &Request<B>) -> Response<Full<Bytes>> {
    let known = matches!(req.uri().path(), "/health" | "/version" | "/status");
    if known && req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/health" => plain(StatusCode::OK, "ok"),
        "/version" => plain(StatusCode::OK, env!("CARGO_PKG_VERSION")),
        "/status" => match serde_json::to_vec(&state.shared.snapshot()) {
            Ok(body) => {
                let mut r = Response::new(Full::new(Bytes::from(body)));
                r.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                r
            }
            Err(e) => plain(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        },
        _ => plain(StatusCode::NOT_FOUND, "not found"),
    }
}

fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::copy_from_slice(text.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn health_version_and_status() {
        let shared = Shared::new("h1", "http://m/heartbeat");
        shared.agent("a", |v| {
            v.current_version = Some("1.0.0".into());
            v.status = Some("started".into());
        });
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, AppState { shared }, async {
            let _ = rx.await;
        }));
        let get = |path: &str| {
            let url = format!("http://{addr}{path}");
            async move {
                let r = reqwest::get(url).await.unwrap();
                (r.status().as_u16(), r.text().await.unwrap())
            }
        };
        assert_eq!(get("/health").await, (200, "ok".into()));
        assert_eq!(
            get("/version").await,
            (200, env!("CARGO_PKG_VERSION").into())
        );
        let (code, body) = get("/status").await;
        assert_eq!(code, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["daemon"]["hostname"], "h1");
        assert_eq!(v["agents"][0]["name"], "a");
        assert_eq!(v["agents"][0]["currentVersion"], "1.0.0");
        assert_eq!(get("/nope").await.0, 404);
        let post = reqwest::Client::new()
            .post(format!("http://{addr}/status"))
            .send()
            .await
            .unwrap();
        assert_eq!(post.status().as_u16(), 405);
        assert_eq!(post.headers()["allow"], "GET, HEAD");
        tx.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    /// Starts the endpoint with `limits`; the server stops when the returned sender drops.
    async fn start(limits: Limits) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let state = AppState {
            shared: Shared::new("h1", "http://m/heartbeat"),
        };
        tokio::spawn(serve_with(
            listener,
            state,
            async {
                let _ = rx.await;
            },
            limits,
        ));
        (addr, tx)
    }

    /// Reads until the peer closes; `None` if it is still open after `within`.
    async fn read_to_close(s: &mut tokio::net::TcpStream, within: Duration) -> Option<Vec<u8>> {
        use tokio::io::AsyncReadExt as _;
        let mut got = Vec::new();
        tokio::time::timeout(within, s.read_to_end(&mut got))
            .await
            .ok()
            .map(|r| r.map(|_| got).unwrap_or_default())
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_its_headers_is_disconnected() {
        let (addr, _stop) = start(Limits {
            header_timeout: Duration::from_millis(200),
            ..Limits::default()
        })
        .await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::AsyncWriteExt as _;
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let got = read_to_close(&mut s, Duration::from_secs(20)).await;
        let got = got.expect("connection still open long after the header timeout");
        assert!(!String::from_utf8_lossy(&got).contains("200 OK"));
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_wait_for_a_free_slot() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (addr, _stop) = start(Limits {
            max_connections: 1,
            ..Limits::default()
        })
        .await;
        let req = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
        // The first client takes the only slot and keeps its connection open.
        let mut first = tokio::net::TcpStream::connect(addr).await.unwrap();
        first.write_all(req).await.unwrap();
        let mut buf = [0u8; 512];
        let n = first.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        // The second is queued by the kernel but not served while the first holds the slot.
        let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
        second.write_all(req).await.unwrap();
        let early = tokio::time::timeout(Duration::from_millis(300), second.read(&mut buf)).await;
        assert!(early.is_err(), "served beyond the connection limit");
        drop(first);
        let n = tokio::time::timeout(Duration::from_secs(20), second.read(&mut buf))
            .await
            .expect("served once the slot is free")
            .unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    }
}
