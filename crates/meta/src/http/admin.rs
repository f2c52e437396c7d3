//! `GET /config/reload`: re-reads the config file; loopback callers only, as the original.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::routing::get;
use axum::Router;

use super::{AppError, AppState};

pub(super) fn router() -> Router<AppState> {
    Router::new().route("/config/reload", get(reload))
}

async fn reload(State(st): State<AppState>, req: Request) -> Result<String, AppError> {
    // The peer address is put on every request by the server's accept loop; a request
    // without one (not from a socket) is not trusted.
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_canonical());
    if !peer.is_some_and(|ip| ip.is_loopback()) {
        tracing::warn!(peer = ?peer, "config reload refused: not from loopback");
        return Err(AppError::Forbidden(
            "config reload is only allowed from loopback",
        ));
    }
    match st.reloader.reload().await {
        Ok(r) => {
            let mut out = format!(
                "config reloaded from {}: {} agent(s)\n",
                st.reloader.path().display(),
                r.agents
            );
            for w in &r.warnings {
                out.push_str(&format!("warning: {w}\n"));
            }
            Ok(out)
        }
        Err(e) => Err(AppError::ReloadRefused(e.errors())),
    }
}
