//! `POST /heartbeat`: the original protocol. Records what the host reports, answers what
//! it should run.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use proto::legacy::HeartbeatRequest;

use super::{unix_now, AppError, AppState};

pub(super) fn router() -> Router<AppState> {
    Router::new().route("/heartbeat", post(heartbeat))
}

async fn heartbeat(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, AppError> {
    let desired = st.current.load();
    let cfg = &desired.config;
    let max = cfg.max_body_bytes;
    let bytes = super::agent::read_body(&headers, body, max).await?;
    // serde would read a JSON list positionally into the struct; Go's decoder refuses a
    // list, and reads `null` as the zero value (so: hostname is blank).
    let trimmed = bytes.trim_ascii();
    if trimmed == b"null" {
        return Err(AppError::HostnameBlank);
    }
    if trimmed.first() != Some(&b'{') {
        return Err(AppError::BodyFormat);
    }
    let req: HeartbeatRequest = serde_json::from_slice(&bytes).map_err(|_| AppError::BodyFormat)?;
    if req.hostname.is_empty() {
        return Err(AppError::HostnameBlank);
    }
    proto::validate_hostname(&req.hostname)?;
    if req.real_agents.len() as u64 > cfg.max_agents_per_heartbeat {
        return Err(AppError::TooManyAgents {
            got: req.real_agents.len(),
            max: cfg.max_agents_per_heartbeat,
        });
    }
    for a in &req.real_agents {
        proto::validate_agent_name(&a.name)?;
        proto::validate_version(&a.version)?;
    }
    st.store.record(&req.hostname, &req.real_agents, unix_now());
    let mut out = Vec::with_capacity(64 + 192 * desired.config.agents.len());
    desired.write_response(&req.hostname, &mut out);
    if cfg.debug {
        tracing::info!(
            host = %req.hostname,
            // Debug formatting escapes newlines, so a body cannot forge log lines.
            request = ?String::from_utf8_lossy(&bytes),
            response = ?String::from_utf8_lossy(&out),
            "heartbeat"
        );
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        out,
    )
        .into_response())
}
