//! `GET /config/reload`: re-reads the config file; an operator mutation (see `auth`: an
//! admin token, or loopback callers only when no token is configured, as the original).
//! `GET /metrics`: the Prometheus text format, written by [`crate::metrics`] (a read of
//! the API when operator tokens are configured, see `auth`).

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use super::auth::AuditNote;
use super::{AppError, AppState};
use crate::metrics::{self, Scrape};

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/config/reload", get(reload))
        .route("/metrics", get(metrics))
}

async fn metrics(State(st): State<AppState>) -> Result<impl IntoResponse, AppError> {
    // The scrape walks every known host: off the async workers.
    let text = tokio::task::spawn_blocking(move || Scrape::take(&st).render())
        .await
        .map_err(|e| AppError::Internal(format!("metrics scrape: {e}")))?;
    Ok(([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text))
}

async fn reload(State(st): State<AppState>, note: AuditNote) -> Result<String, AppError> {
    match st.reloader.reload().await {
        Ok(r) => {
            note.detail(format!(
                "config reloaded: {} agent(s), {} warning(s)",
                r.agents,
                r.warnings.len()
            ));
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
