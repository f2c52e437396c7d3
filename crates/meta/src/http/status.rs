//! `GET /status/json/NAME`, `GET /status/text/NAME`, `GET /health`, `GET /version`.

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use chrono::TimeZone;

use super::{AppError, AppState};

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/status/json/{name}", get(status_json))
        .route("/status/text/{name}", get(status_text))
        .route("/health", get(|| async { "ok" }))
        .route("/version", get(|| async { crate::VERSION }))
}

/// `{"host": {"name","version","status","timestamp"} | null, ...}`, sorted by hostname;
/// each value serialized through the proto type.
async fn status_json(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, AppError> {
    proto::validate_agent_name(&name)?;
    let hosts = st.store.agent_status(&name);
    let mut out = Vec::with_capacity(16 + hosts.len() * 96);
    out.push(b'{');
    for (i, h) in hosts.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut out, &h.hostname)
            .map_err(|e| AppError::Internal(e.to_string()))?;
        out.push(b':');
        serde_json::to_writer(&mut out, &h.agent).map_err(|e| AppError::Internal(e.to_string()))?;
    }
    out.push(b'}');
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        out,
    )
        .into_response())
}

/// One line per host: `hostname version status timestamp YYYY-MM-DD HH:MM:SS` (local
/// time), or `hostname not found`.
async fn status_text(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, AppError> {
    proto::validate_agent_name(&name)?;
    let hosts = st.store.agent_status(&name);
    let mut out = String::with_capacity(hosts.len() * 80);
    for h in &hosts {
        match &h.agent {
            Some(a) => {
                let when = chrono::Local
                    .timestamp_opt(a.timestamp, 0)
                    .single()
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                    .unwrap_or_else(|| "-".into());
                out.push_str(&format!(
                    "{} {} {} {} {}\n",
                    h.hostname, a.version, a.status, a.timestamp, when
                ));
            }
            None => out.push_str(&format!("{} not found\n", h.hostname)),
        }
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        )],
        out,
    )
        .into_response())
}
