//! `POST /heartbeat`: the original protocol. Records what the host reports, answers what
//! it should run.
//!
//! The accept loop serves this route itself ([`serve`]), ahead of the router and its
//! middleware: it is nearly all of the traffic. The router keeps the same route (for
//! in-process tests and anything that drives [`crate::app`]); both run [`respond`] with
//! the same body limit, timeout and error texts.

use std::future::{poll_fn, Future};
use std::pin::pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use proto::legacy::HeartbeatRequestRef;

use super::{unix_now, AppError, AppState};
use crate::desired::Desired;

/// The path of the legacy heartbeat.
pub const PATH: &str = "/heartbeat";

pub(super) fn router() -> Router<AppState> {
    Router::new().route(PATH, post(heartbeat))
}

async fn heartbeat(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, AppError> {
    let desired = st.current.load();
    respond(&st, &desired, &headers, body).await
}

/// Serves `POST /heartbeat` straight from the connection, without the router: the same
/// answer as through [`crate::app`], `requestTimeoutSecs` included (408 when reading the
/// body and answering takes longer).
pub async fn serve<B>(st: AppState, req: hyper::Request<B>) -> Response
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let desired = st.current.load();
    let secs = desired.config.request_timeout_secs;
    let mut fut = pin!(respond(&st, &desired, &parts.headers, body));
    // Almost always the body came with the headers and the answer is ready at the first
    // poll: then no timer is set up at all.
    let first = poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await;
    let result = match first {
        Poll::Ready(r) => r,
        Poll::Pending => {
            let left = Duration::from_secs(secs).saturating_sub(started.elapsed());
            match tokio::time::timeout(left, fut).await {
                Ok(r) => r,
                Err(_) => Err(AppError::Timeout { secs }),
            }
        }
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

/// Reads, checks and records one heartbeat and writes the answer.
async fn respond<B>(
    st: &AppState,
    desired: &Desired,
    headers: &HeaderMap,
    body: B,
) -> Result<Response, AppError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let cfg = &desired.config;
    let bytes = super::agent::read_body(headers, body, cfg.max_body_bytes).await?;
    // serde would read a JSON list positionally into the struct; Go's decoder refuses a
    // list, and reads `null` as the zero value (so: hostname is blank).
    let trimmed = bytes.trim_ascii();
    if trimmed == b"null" {
        return Err(AppError::HostnameBlank);
    }
    if trimmed.first() != Some(&b'{') {
        return Err(AppError::BodyFormat);
    }
    let req: HeartbeatRequestRef<'_> =
        serde_json::from_slice(&bytes).map_err(|_| AppError::BodyFormat)?;
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
    let out = desired.response_bytes(&req.hostname);
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
