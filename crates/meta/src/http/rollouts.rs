//! Staged rollouts in the operator API: `POST /api/rollouts/plan` (a dry run),
//! `POST /api/rollouts`, `GET /api/rollouts[?agent=]`, `GET /api/rollouts/{id}` and
//! `POST /api/rollouts/{id}/{start|pause|resume|approve|abort|rollback}`.
//!
//! Being under `/api/`, `auth` already made every `POST` here an admin mutation with its
//! audit entry; handlers name the rollout they acted on through [`AuditNote`].

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use proto::rollout::{PauseRequest, RolloutList, RolloutPlan, RolloutSpec, RolloutView};

use super::agent::{parse_object, read_body};
use super::auth::AuditNote;
use super::{unix_now, AppError, AppState};
use crate::rollout::engine::ServerFleet;
use crate::rollout::RolloutError;

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/api/rollouts", post(create).get(list))
        .route("/api/rollouts/plan", post(plan))
        .route("/api/rollouts/{id}", get(one))
        .route("/api/rollouts/{id}/{action}", post(act))
}

impl From<RolloutError> for AppError {
    fn from(e: RolloutError) -> AppError {
        match e {
            RolloutError::Invalid(t) => AppError::BadRequest(t),
            RolloutError::NotFound(_) => AppError::NothingFound(e.to_string()),
            RolloutError::Conflict(t) => AppError::Conflict(t),
            RolloutError::Store(s) => AppError::Store(s.to_string()),
        }
    }
}

async fn spec(st: &AppState, headers: &HeaderMap, body: Body) -> Result<RolloutSpec, AppError> {
    let max = st.current.load().config.max_body_bytes;
    let bytes = read_body(headers, body, max).await?;
    parse_object(&bytes).map_err(|e| AppError::BadRequest(format!("body format error: {e}")))
}

async fn plan(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<RolloutPlan>, AppError> {
    let spec = spec(&st, &headers, body).await?;
    let desired = st.current.load();
    let fleet = ServerFleet(&st);
    Ok(Json(st.rollouts.plan(&spec, &desired, &fleet)?))
}

async fn create(
    State(st): State<AppState>,
    note: AuditNote,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<RolloutView>, AppError> {
    let spec = spec(&st, &headers, body).await?;
    note.target(format!("agent {} version {}", spec.agent, spec.version));
    let desired = st.current.load();
    let v = st.rollouts.create(&spec, &desired, unix_now()).await?;
    note.detail(format!("rollout {} created ({})", v.id, v.state));
    Ok(Json(v))
}

async fn list(
    State(st): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Json<RolloutList> {
    let desired = st.current.load();
    Json(
        st.rollouts
            .list(&desired, q.get("agent").map(String::as_str), unix_now()),
    )
}

async fn one(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<RolloutView>, AppError> {
    let desired = st.current.load();
    Ok(Json(st.rollouts.get(&id, &desired, unix_now()).await?))
}

async fn act(
    State(st): State<AppState>,
    note: AuditNote,
    Path((id, action)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<RolloutView>, AppError> {
    note.target(format!("rollout {}", proto::clean_text(&id, 64)));
    let max = st.current.load().config.max_body_bytes;
    // The body is optional: `curl -X POST .../resume` sends none.
    let bytes = match read_body(&headers, body, max).await {
        Err(AppError::BodyBlank) => Default::default(),
        other => other?,
    };
    let reason = if bytes.iter().all(u8::is_ascii_whitespace) {
        String::new()
    } else {
        parse_object::<PauseRequest>(&bytes)
            .map_err(|e| AppError::BadRequest(format!("body format error: {e}")))?
            .reason
    };
    let desired = st.current.load();
    let v = st
        .rollouts
        .act(&id, &action, &reason, &desired, unix_now())
        .await?;
    note.detail(format!("{action}: rollout {} is {}", v.id, v.state));
    Ok(Json(v))
}
