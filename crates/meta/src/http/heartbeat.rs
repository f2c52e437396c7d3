//! `POST /heartbeat`: the original protocol. Records what the host reports, answers what
//! it should run.
//!
//! The accept loop serves this route itself ([`HeartbeatConn`]), without the router: it is
//! nearly all of the traffic. Both go through the same protection stack
//! ([`crate::guard`]); the router keeps the same route (for in-process tests and anything
//! that drives [`crate::app`]); both run [`respond`] with the same body limit and error
//! texts.
//!
//! `legacyHeartbeat: deny` refuses every one (403); allowed, a heartbeat under the
//! hostname of a BootAgent host that holds a credential is refused (403) and changes
//! nothing: one lookup in the boot registry.

use std::cell::RefCell;
use std::future::Future;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use proto::legacy::HeartbeatRequestRef;

use super::{unix_now, AppError, AppState};
use crate::config::LegacyHeartbeat;
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

/// One connection's heartbeat context: the state and the config snapshot in one `Arc`
/// that only this connection's requests clone, replaced when the config changes. Cloning
/// the shared state and loading the snapshot per request would bounce their reference
/// counts and lock word between the cores.
pub struct HeartbeatConn {
    state: AppState,
    ctx: RefCell<Arc<ConnCtx>>,
}

struct ConnCtx {
    state: AppState,
    desired: Arc<Desired>,
    /// [`crate::state::Current::generation`] when `desired` was loaded.
    generation: u64,
}

impl ConnCtx {
    fn load(state: &AppState) -> ConnCtx {
        let generation = state.current.generation();
        ConnCtx {
            state: state.clone(),
            desired: state.current.load(),
            generation,
        }
    }
}

impl HeartbeatConn {
    pub fn new(state: AppState) -> HeartbeatConn {
        let ctx = RefCell::new(Arc::new(ConnCtx::load(&state)));
        HeartbeatConn { state, ctx }
    }

    /// Serves `POST /heartbeat` straight from the connection, without the router: the
    /// same answer as through [`crate::app`]. The connection's [`crate::guard::Guard`]
    /// runs it, as it runs the router, with the same deadline.
    pub fn serve<B>(&self, req: hyper::Request<B>) -> impl Future<Output = Response> + Send
    where
        B: hyper::body::Body<Data = Bytes> + Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.prepare().serve(req)
    }

    /// What one heartbeat of this connection needs, taken before its future is made (so
    /// that the guard can make the future inside its own, without copying it).
    pub fn prepare(&self) -> Prepared {
        let mut c = self.ctx.borrow_mut();
        if self.state.current.generation() != c.generation {
            *c = Arc::new(ConnCtx::load(&self.state));
        }
        Prepared(c.clone())
    }
}

/// One heartbeat's context ([`HeartbeatConn::prepare`]).
pub struct Prepared(Arc<ConnCtx>);

impl Prepared {
    /// The answer to `req`.
    pub fn serve<B>(self, req: hyper::Request<B>) -> impl Future<Output = Response> + Send
    where
        B: hyper::body::Body<Data = Bytes> + Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        serve(self.0, req)
    }
}

async fn serve<B>(ctx: Arc<ConnCtx>, req: hyper::Request<B>) -> Response
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (parts, body) = req.into_parts();
    respond(&ctx.state, &ctx.desired, &parts.headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
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
    if cfg.legacy_heartbeat == LegacyHeartbeat::Deny {
        return Err(AppError::Refused(
            "the legacy heartbeat is turned off on this server (legacyHeartbeat: deny): use the BootAgent protocol".into(),
        ));
    }
    let bytes = super::agent::read_body(headers, body, cfg.max_body_bytes).await?;
    // Go's decoder refuses anything but an object (a list included), and reads `null` as
    // the zero value (so: hostname is blank). A key given twice takes its last value, as
    // in Go (`proto::legacy` reads the request by hand for that).
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
    // A legacy heartbeat carries no credential: it never speaks for a host that holds one.
    if st.boot.registry.holds_credential(&req.hostname) {
        return Err(AppError::Refused(format!(
            "host {:?} is a BootAgent host with a credential: a legacy heartbeat cannot report for it",
            &*req.hostname
        )));
    }
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
    super::agent::check_events(&req.events)?;
    if st.store.record(&req.hostname, &req.real_agents, unix_now()) {
        // Written behind: the host sends this whole report again at its next heartbeat.
        st.behind.push(&req.hostname).await;
    }
    // The `events` extension; a heartbeat without it does not reach this branch.
    if !req.events.is_empty() {
        super::agent::record_events(st, &req.hostname, &req.events).await?;
    }
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
