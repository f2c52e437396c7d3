//! The local endpoint: `GET /health`, `GET /version` and a JSON `GET /status` describing the
//! daemon and each agent. Read-only; nothing here changes what the daemon does.

use std::net::SocketAddr;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};

use crate::state::{Shared, StatusView};

/// Handler state: the shared view.
#[derive(Clone)]
pub struct AppState {
    pub shared: Shared,
}

/// The router; tests call it with `oneshot`.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/version", get(|| async { env!("CARGO_PKG_VERSION") }))
        .route("/status", get(status))
        .with_state(state)
}

async fn status(State(s): State<AppState>) -> Json<StatusView> {
    Json(s.shared.snapshot())
}

/// Binds `addr` (so that a busy port is reported at start-up, before the daemon runs).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown)
        .await
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
        tx.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
