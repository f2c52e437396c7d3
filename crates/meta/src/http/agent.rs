//! `POST /agent/register` and `POST /agent/status`: the BootAgent protocol (seed 003).
//!
//! Same limits and errors as the legacy heartbeat: `maxBodyBytes` (413), a blank body,
//! malformed JSON, hostile names and too many agents (400). A status report is also
//! recorded in the fleet store, so `/status/json|text` show BootAgent hosts.

use std::borrow::Cow;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::routing::post;
use axum::{Json, Router};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use proto::bootagent::{
    self, RegisterRequest, RegisterResponse, StatusRequest, StatusResponse, STATUS_OK,
};
use proto::events::{Event, MAX_EVENTS_PER_REPORT};
use proto::legacy::RealAgentRef;
use proto::{Hostname, Serial};

use super::{unix_now, AppError, AppState};
use crate::boot::{hash_secret, CredHash, Denied, Refusal, MAX_RESULTS_PER_REPORT};

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/agent/register", post(register))
        .route("/agent/status", post(status))
}

/// Reads a request body of at most `max` bytes: an announced larger one is refused before
/// any of it is read, a longer stream is cut off at the limit.
pub(super) async fn read_body<B>(headers: &HeaderMap, body: B, max: u64) -> Result<Bytes, AppError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > max) {
        return Err(AppError::BodyTooLarge { max });
    }
    let too_large_or_unreadable = |e: Box<dyn std::error::Error + Send + Sync>| {
        if e.downcast_ref::<LengthLimitError>().is_some() {
            AppError::BodyTooLarge { max }
        } else {
            AppError::BodyRead
        }
    };
    let mut body = std::pin::pin!(Limited::new(
        body,
        usize::try_from(max).unwrap_or(usize::MAX)
    ));
    // A heartbeat body nearly always arrives as one frame: kept as it is, not copied.
    let mut first: Option<Bytes> = None;
    let mut more: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(too_large_or_unreadable)?.into_data() else {
            continue; // trailers
        };
        match &first {
            None => first = Some(data),
            Some(f) => {
                if more.is_empty() {
                    more.extend_from_slice(f);
                }
                more.extend_from_slice(&data);
            }
        }
    }
    let bytes = if more.is_empty() {
        first.unwrap_or_default()
    } else {
        Bytes::from(more)
    };
    if bytes.is_empty() {
        return Err(AppError::BodyBlank);
    }
    Ok(bytes)
}

/// Parses a body that must be a JSON object. serde would also read a JSON list
/// positionally into a struct (`["web-1", ""]` as a registration); only objects are taken.
pub(super) fn parse_object<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    if bytes.trim_ascii().first() != Some(&b'{') {
        return Err("want a JSON object".into());
    }
    serde_json::from_slice(bytes).map_err(|e| e.to_string())
}

/// Checks the `events` of a report (legacy heartbeat or BootAgent status) before anything
/// of it is used. More than [`MAX_EVENTS_PER_REPORT`] refuse the whole report (400): a
/// host never sends more, and cutting would lose events that the host, answered 200,
/// would take as kept. Oversized fields are cut when kept ([`record_events`]).
pub(super) fn check_events(events: &[Event]) -> Result<(), AppError> {
    if events.len() > MAX_EVENTS_PER_REPORT {
        return Err(AppError::BadRequest(format!(
            "too many events in one report: {}, the limit is {MAX_EVENTS_PER_REPORT}",
            events.len()
        )));
    }
    Ok(())
}

/// Keeps the checked `events` of `host`, a validated hostname: in memory, and in the
/// durable store before the report is answered (the host takes a 200 as "kept").
pub(super) async fn record_events(
    st: &AppState,
    host: &str,
    events: &[Event],
) -> Result<(), AppError> {
    if events.is_empty() {
        return Ok(());
    }
    st.durable.put_events(host, events).await?;
    let r = st.events.record(host, events);
    tracing::debug!(host = %host, added = r.added, duplicates = r.duplicates, "agent events");
    Ok(())
}

/// The reported hostname, checked: the edge where it becomes a [`Hostname`].
fn check_hostname(h: &str) -> Result<Hostname, AppError> {
    if h.is_empty() {
        return Err(AppError::HostnameBlank);
    }
    Ok(Hostname::parse(h)?)
}

/// The SHA-256 of the credential an `Authorization: Bearer` header carries; `None`
/// without one. Another scheme, or a header that is not text, is refused (401).
fn credential(headers: &HeaderMap, hostname: &str) -> Result<Option<CredHash>, AppError> {
    let Some(v) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    match v.to_str().ok().and_then(bootagent::bearer) {
        Some(token) => Ok(Some(hash_secret(token))),
        None => Err(AppError::Unauthorized(format!(
            "host {hostname:?}: the Authorization header must be \"Bearer <credential>\""
        ))),
    }
}

/// True when the registration may enroll a host that has no credential: no enrollment
/// secret is configured, or it carried one of them (compared as SHA-256, in constant
/// time); otherwise why not, naming the hostname and never a secret.
fn may_enroll(cfg: &crate::config::Config, req: &RegisterRequest) -> Result<(), &'static str> {
    if cfg.enrollment_secrets.is_empty() {
        return Ok(());
    }
    if req.enrollment_secret.is_empty() {
        return Err("this server requires an enrollment secret to register a new host (enrollmentSecret in ops-updater's config)");
    }
    if crate::boot::registry::matches_any(
        &cfg.enrollment_secrets,
        &hash_secret(&req.enrollment_secret),
    ) {
        Ok(())
    } else {
        Err("the enrollment secret is not one this server accepts (enrollmentSecrets)")
    }
}

async fn register(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<RegisterResponse>, AppError> {
    let desired = st.current.load();
    let bytes = read_body(&headers, body, desired.config.max_body_bytes).await?;
    let req: RegisterRequest = parse_object(&bytes).map_err(|_| AppError::BodyFormat)?;
    let hostname = check_hostname(&req.hostname)?;
    let serial = if req.agentsn.is_empty() {
        None
    } else {
        Some(Serial::parse(&req.agentsn)?)
    };
    let presented = credential(&headers, hostname.as_str())?;
    let enroll = may_enroll(&desired.config, &req);
    let reg = st
        .boot
        .register(
            &desired,
            &hostname,
            serial.as_ref(),
            presented,
            enroll.is_ok(),
            unix_now(),
        )
        .await?;
    let reg = match reg {
        Ok(r) => r,
        Err(Denied::Enrolled) => {
            return Err(AppError::Refused(format!(
                "host {:?} is enrolled: a registration for it must carry its credential; an operator re-admits a host that lost it (POST /api/hosts/{}/readmit)",
                hostname.as_str(),
                hostname.as_str()
            )))
        }
        Err(Denied::Enrollment) => {
            return Err(AppError::Refused(format!(
                "host {:?}: {}",
                hostname.as_str(),
                enroll.err().unwrap_or("enrollment refused")
            )))
        }
    };
    let message = if reg.credential.is_some() {
        "a new credential: keep it, this server keeps only its hash and cannot send it again"
    } else {
        ""
    };
    Ok(Json(RegisterResponse {
        status: STATUS_OK,
        agentsn: reg.serial.into(),
        tags: reg.tags,
        message: message.into(),
        credential: reg.credential.unwrap_or_default(),
    }))
}

/// The legacy spelling of a BootAgent state, for the fleet store and the status pages.
fn legacy_status(s: &str) -> &str {
    match s {
        bootagent::STATE_RUNNING => proto::legacy::STATUS_STARTED,
        other => other,
    }
}

async fn status(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<StatusResponse>, AppError> {
    let desired = st.current.load();
    let cfg = &desired.config;
    let bytes = read_body(&headers, body, cfg.max_body_bytes).await?;
    let req: StatusRequest = parse_object(&bytes).map_err(|_| AppError::BodyFormat)?;
    check_hostname(&req.hostname)?;
    let presented = credential(&headers, &req.hostname)?;
    if req.agents.len() as u64 > cfg.max_agents_per_heartbeat {
        return Err(AppError::TooManyAgents {
            got: req.agents.len(),
            max: cfg.max_agents_per_heartbeat,
        });
    }
    for a in &req.agents {
        proto::validate_agent_name(&a.name)?;
        proto::validate_version(&a.version)?;
    }
    if req.jobs.len() > MAX_RESULTS_PER_REPORT {
        return Err(AppError::BadRequest(format!(
            "too many job results in one report: {}, the limit is {MAX_RESULTS_PER_REPORT}",
            req.jobs.len()
        )));
    }
    check_events(&req.events)?;
    if req.agentsn.is_empty() {
        return Ok(Json(refused(Refusal::Unregistered)));
    }
    bootagent::validate_agentsn(&req.agentsn)?;
    let now = unix_now();
    let (jobs, waiting) = match st.boot.status(&desired, &req, presented, now).await? {
        Ok(jobs) => jobs,
        Err(Refusal::Unauthenticated) => {
            tracing::warn!(host = %req.hostname, agentsn = %req.agentsn, "bootagent status refused: no credential");
            return Err(AppError::Unauthorized(format!(
                "host {:?} holds a credential: a status report must carry it (Authorization: Bearer)",
                req.hostname
            )));
        }
        Err(Refusal::WrongCredential) => {
            tracing::warn!(host = %req.hostname, agentsn = %req.agentsn, "bootagent status refused: wrong credential");
            return Err(AppError::Refused(format!(
                "host {:?}: the credential is not this host's",
                req.hostname
            )));
        }
        Err(r) => {
            tracing::info!(host = %req.hostname, agentsn = %req.agentsn, refusal = ?r, "bootagent status refused: register again");
            return Ok(Json(refused(r)));
        }
    };
    let ts = if req.timestamp > 0 {
        req.timestamp
    } else {
        now
    };
    let agents: Vec<RealAgentRef> = req
        .agents
        .iter()
        .map(|a| RealAgentRef {
            name: Cow::Borrowed(&a.name),
            version: Cow::Borrowed(&a.version),
            status: Cow::Borrowed(legacy_status(&a.status)),
            timestamp: ts,
        })
        .collect();
    if st.store.record(&req.hostname, &agents, now) {
        st.behind.push(&req.hostname).await;
    }
    record_events(&st, &req.hostname, &req.events).await?;
    let resp = StatusResponse {
        status: STATUS_OK,
        message: String::new(),
        jobs,
        waiting,
    };
    if cfg.debug {
        tracing::info!(
            host = %req.hostname,
            request = %String::from_utf8_lossy(&bytes),
            jobs = resp.jobs.len(),
            "bootagent status"
        );
    }
    Ok(Json(resp))
}

fn refused(r: Refusal) -> StatusResponse {
    let (status, message) = match r {
        Refusal::Unregistered => (
            bootagent::STATUS_UNREGISTERED,
            "unknown agentsn: register again (POST /agent/register)",
        ),
        Refusal::Conflict => (
            bootagent::STATUS_SERIAL_CONFLICT,
            "agentsn is registered to another hostname: register again (POST /agent/register)",
        ),
        // A host from before credentials (or re-admitted): its registration gives it one.
        Refusal::NoCredential | Refusal::Unauthenticated | Refusal::WrongCredential => (
            bootagent::STATUS_UNREGISTERED,
            "this host has no credential yet: register again (POST /agent/register)",
        ),
    };
    StatusResponse {
        status,
        message: message.into(),
        jobs: Vec::new(),
        waiting: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_map_to_the_legacy_spelling() {
        assert_eq!(legacy_status("running"), "started");
        assert_eq!(legacy_status("stoped"), "stoped");
        assert_eq!(legacy_status("fatal"), "fatal");
        assert_eq!(legacy_status("killed"), "killed");
    }
}
