//! The operator API: `POST /api/jobs`, `GET /api/jobs/{id}`, `GET /api/hosts`,
//! `GET /api/hosts/{hostname}`, `POST /api/hosts/{hostname}/readmit`, `POST /api/retry`,
//! `GET /api/audit`.
//!
//! Who may call it is decided in front of the router, by `auth` (API tokens, or loopback
//! callers only when none is configured), which also records every mutation in the audit
//! log; handlers add the hosts they touched through [`AuditNote`].

use std::collections::HashMap;
use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{Extensions, HeaderMap};
use axum::routing::{get, post};
use axum::{Json, Router};
use proto::bootagent::{Action, AgentStatus};
use proto::ops::{AuditEntry, AuditResponse, RetryRequest, RetryResponse};
use proto::ops::{
    BatchStatus, HostView, HostsResponse, JobsRequest, JobsResponse, PROTOCOL_LEGACY,
};
use proto::{rules, AgentName, Hostname};

use super::agent::{parse_object, read_body};
use super::auth::AuditNote;
use super::{unix_now, AppError, AppState};
use crate::boot::{self, OperatorJob, Selector};

/// Most hostnames one `hosts` selector may list.
pub const MAX_SELECTED_HOSTS: usize = 10_000;

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/api/jobs", post(post_jobs))
        .route("/api/jobs/{id}", get(get_batch))
        .route("/api/hosts", get(get_hosts))
        .route("/api/hosts/{hostname}", get(get_host))
        .route("/api/hosts/{hostname}/readmit", post(post_readmit))
        .route("/api/retry", post(post_retry))
        .route("/api/audit", get(get_audit))
}

/// True when the request came over a socket from a loopback address. The accept loop puts
/// the peer address on every request; a request without one is not trusted.
pub(crate) fn peer_is_loopback(ext: &Extensions) -> bool {
    ext.get::<ConnectInfo<SocketAddr>>()
        .is_some_and(|c| c.0.ip().to_canonical().is_loopback())
}

fn bad(field: &str, message: impl std::fmt::Display) -> AppError {
    AppError::BadRequest(format!("{field}: {message}"))
}

/// Exactly one of the three selectors, checked.
fn selector(
    hosts: Option<Vec<String>>,
    prefix: Option<String>,
    tag: Option<String>,
) -> Result<Selector, AppError> {
    let given =
        usize::from(hosts.is_some()) + usize::from(prefix.is_some()) + usize::from(tag.is_some());
    if given != 1 {
        return Err(bad(
            "hosts, prefix, tag",
            format!("give exactly one selector, got {given}"),
        ));
    }
    if let Some(hosts) = hosts {
        if hosts.is_empty() {
            return Err(bad("hosts", "is empty"));
        }
        if hosts.len() > MAX_SELECTED_HOSTS {
            return Err(bad(
                "hosts",
                format!(
                    "lists {} hosts, the limit is {MAX_SELECTED_HOSTS}",
                    hosts.len()
                ),
            ));
        }
        let hosts = hosts
            .into_iter()
            .map(Hostname::try_from)
            .collect::<Result<_, _>>()
            .map_err(|e| bad("hosts", e))?;
        return Ok(Selector::Hosts(hosts));
    }
    if let Some(p) = prefix {
        if p.is_empty() {
            return Err(bad("prefix", "is empty"));
        }
        proto::validate_hostname(&p).map_err(|e| bad("prefix", e))?;
        return Ok(Selector::Prefix(p));
    }
    let t = tag.unwrap_or_default();
    boot::check_tags(&t).map_err(|e| bad("tag", e))?;
    Ok(Selector::Tag(t))
}

fn describe(sel: &Selector) -> String {
    match sel {
        Selector::Hosts(h) => format!("no host of hosts ({}) is registered", h.len()),
        Selector::Prefix(p) => format!("no registered host matches prefix {p:?}"),
        Selector::Tag(t) => format!("no registered host carries tag {t:?}"),
    }
}

/// Checks a jobs request into an operator job and a selector.
fn operator_job(mut req: JobsRequest) -> Result<(OperatorJob, Selector), AppError> {
    let action = match req.action.as_str() {
        "restart" => Action::Restart,
        "stop" => Action::Stop,
        "uninstall" => Action::Uninstall,
        "reset" => Action::Reset,
        "config" => Action::Config,
        "install" | "upgrade" => {
            return Err(bad(
                "action",
                "install and upgrade follow the desired state (cfg.json); change it and reload",
            ))
        }
        "" => return Err(bad("action", "is missing")),
        other => {
            return Err(bad(
                "action",
                format!(
                    "{:?} is not restart, stop, uninstall, reset or config",
                    other.chars().take(32).collect::<String>()
                ),
            ))
        }
    };
    let name = if action == Action::Config {
        if !req.name.is_empty() {
            return Err(bad("name", "does not go with action config"));
        }
        if req.svrlist.is_empty() && req.step.is_none() {
            return Err(bad("svrlist, step", "action config needs at least one"));
        }
        if !req.svrlist.is_empty() {
            // Sent as parsed: trimmed, without blanks or duplicates.
            req.svrlist = rules::parse_svrlist(&req.svrlist)
                .map_err(|e| bad("svrlist", e))?
                .join(",");
        }
        if let Some(s) = req.step {
            rules::check_step(s).map_err(|e| bad("step", e))?;
        }
        None
    } else {
        if req.name.is_empty() {
            return Err(bad(
                "name",
                format!("is missing (action {})", action.as_str()),
            ));
        }
        let name = AgentName::parse(&req.name).map_err(|e| bad("name", e))?;
        if !req.svrlist.is_empty() || req.step.is_some() {
            return Err(bad("svrlist, step", "only go with action config"));
        }
        Some(name)
    };
    let sel = selector(req.hosts, req.prefix, req.tag)?;
    Ok((
        OperatorJob {
            action,
            name,
            svrlist: req.svrlist,
            step: req.step,
        },
        sel,
    ))
}

async fn post_jobs(
    State(st): State<AppState>,
    note: AuditNote,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<JobsResponse>, AppError> {
    let desired = st.current.load();
    let bytes = read_body(&headers, body, desired.config.max_body_bytes).await?;
    let req: JobsRequest = parse_object(&bytes)
        .map_err(|e| AppError::BadRequest(format!("body format error: {e}")))?;
    let (job, sel) = operator_job(req)?;
    note.selector(&sel);
    let (hosts, missing) = st.boot.select(&desired, &sel).await?;
    if hosts.is_empty() {
        return Err(AppError::NothingFound(describe(&sel)));
    }
    note.hosts(&hosts);
    let mut out = st.boot.queue(&desired, &job, &hosts, unix_now()).await?;
    note.detail(format!(
        "{} {} job(s) queued as batch {}, {} host(s) skipped",
        job.action.as_str(),
        out.jobs.len(),
        out.id,
        out.skipped.len() + missing.len()
    ));
    out.skipped
        .extend(missing.into_iter().map(|host| proto::ops::SkippedHost {
            host: host.into(),
            reason: "not registered".into(),
        }));
    Ok(Json(out))
}

async fn get_batch(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<BatchStatus>, AppError> {
    st.boot
        .batch(&id)
        .await?
        .map(Json)
        .ok_or_else(|| AppError::NothingFound("no such job batch".into()))
}

async fn get_hosts(
    State(st): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<HostsResponse>, AppError> {
    if let Some(k) = q.keys().find(|k| !matches!(k.as_str(), "prefix" | "tag")) {
        return Err(bad(
            "query",
            format!(
                "unknown parameter {:?} (prefix, tag)",
                k.chars().take(32).collect::<String>()
            ),
        ));
    }
    if let Some(t) = q.get("tag") {
        boot::check_tags(t).map_err(|e| bad("tag", e))?;
    }
    let desired = st.current.load();
    let rules = &desired.config.tag_rules;
    let prefix = q.get("prefix").map(String::as_str).unwrap_or("");
    let names = st.boot.registry.hostnames(|h| {
        h.starts_with(prefix)
            && match q.get("tag") {
                None => true,
                Some(t) => boot::has_tags(&boot::tags_for(rules, h), t),
            }
    });
    let mut hosts: Vec<HostView> = names
        .iter()
        .filter_map(|h| st.boot.host_view(&desired, h.as_str()))
        .collect();
    // Hosts on the legacy heartbeat too (those not registered over BootAgent), so that
    // every host's agents, states and events are in one list.
    let registered: std::collections::HashSet<&str> = names.iter().map(|h| h.as_str()).collect();
    let tag = q.get("tag");
    let legacy = st.store.hostnames(&|h| {
        h.starts_with(prefix)
            && !registered.contains(h)
            && tag.is_none_or(|t| boot::has_tags(&boot::tags_for(rules, h), t))
    });
    hosts.extend(legacy.iter().filter_map(|h| legacy_host_view(&st, h)));
    hosts.sort_by(|a, b| a.hostname.cmp(&b.hostname));
    for v in &mut hosts {
        (v.event_count, v.last_event) = st.events.summary(&v.hostname);
    }
    Ok(Json(HostsResponse { hosts }))
}

/// One host whole: a registered BootAgent host, else a host the fleet store knows from
/// its legacy heartbeats; with every event kept for it, newest last.
async fn get_host(
    State(st): State<AppState>,
    Path(hostname): Path<String>,
) -> Result<Json<HostView>, AppError> {
    proto::validate_hostname(&hostname)?;
    let desired = st.current.load();
    let mut view = st
        .boot
        .host_view_fresh(&desired, &hostname)
        .await?
        .or_else(|| legacy_host_view(&st, &hostname))
        .ok_or_else(|| {
            AppError::NothingFound(format!(
                "no host named {hostname:?}: no BootAgent host is registered and no heartbeat came under this name"
            ))
        })?;
    view.events = st.events.events(&hostname);
    view.event_count = view.events.len();
    view.last_event = view.events.last().cloned();
    Ok(Json(view))
}

/// A host that reports with the legacy heartbeat, as the fleet store holds it: its agents
/// with version and status as reported (the statuses of the `control status` contract).
fn legacy_host_view(st: &AppState, hostname: &str) -> Option<HostView> {
    let agents = st.store.host(hostname)?;
    Some(HostView {
        hostname: hostname.to_string(),
        protocol: PROTOCOL_LEGACY.into(),
        last_seen: st.store.last_seen(hostname).unwrap_or(0),
        agents: agents
            .into_iter()
            .map(|a| AgentStatus {
                name: a.name,
                version: a.version,
                status: a.status,
                uptime: 0,
            })
            .collect(),
        ..HostView::default()
    })
}

/// Re-admits a BootAgent host that lost its metafile: its credential is forgotten (in the
/// durable store before the answer), so that its next registration is admitted and given a
/// new one. The enrollment secret is still needed when `enrollmentSecrets` is set.
async fn post_readmit(
    State(st): State<AppState>,
    note: AuditNote,
    Path(hostname): Path<String>,
) -> Result<Json<proto::ops::ReadmitResponse>, AppError> {
    let host = Hostname::parse(&hostname)?;
    note.hosts(std::slice::from_ref(&host));
    let (serial, had) = st.boot.readmit(&hostname).await?.ok_or_else(|| {
        AppError::NothingFound(format!(
            "no BootAgent host named {hostname:?} is registered"
        ))
    })?;
    note.detail(if had {
        "credential forgotten: the next registration is admitted"
    } else {
        "the host held no credential"
    });
    Ok(Json(proto::ops::ReadmitResponse {
        hostname,
        agentsn: serial.into(),
        had_credential: had,
    }))
}

async fn post_retry(
    State(st): State<AppState>,
    note: AuditNote,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<RetryResponse>, AppError> {
    let desired = st.current.load();
    let bytes = read_body(&headers, body, desired.config.max_body_bytes).await?;
    let req: RetryRequest = parse_object(&bytes)
        .map_err(|e| AppError::BadRequest(format!("body format error: {e}")))?;
    if !req.name.is_empty() {
        proto::validate_agent_name(&req.name).map_err(|e| bad("name", e))?;
    }
    let sel = selector(req.hosts, req.prefix, req.tag)?;
    note.selector(&sel);
    let (hosts, _) = st.boot.select(&desired, &sel).await?;
    if hosts.is_empty() {
        return Err(AppError::NothingFound(describe(&sel)));
    }
    note.hosts(&hosts);
    let name = (!req.name.is_empty()).then_some(req.name.as_str());
    let cleared = st.boot.retry(&hosts, name).await?;
    note.detail(format!("{cleared} failure(s) and hold(s) cleared"));
    tracing::info!(
        hosts = hosts.len(),
        cleared,
        "operator retry: failures and holds forgotten"
    );
    Ok(Json(RetryResponse {
        hosts: hosts.len(),
        cleared,
    }))
}

/// Entries `GET /api/audit` answers when `limit` is not given, and at most.
pub const AUDIT_PAGE: usize = 100;
pub const AUDIT_PAGE_MAX: usize = 1000;

/// `GET /api/audit?limit=N&before=ID`: the audit log, newest first, read from the store
/// (so every replica's entries on a shared one).
async fn get_audit(
    State(st): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<AuditResponse>, AppError> {
    if let Some(k) = q.keys().find(|k| !matches!(k.as_str(), "limit" | "before")) {
        return Err(bad(
            "query",
            format!(
                "unknown parameter {:?} (limit, before)",
                k.chars().take(32).collect::<String>()
            ),
        ));
    }
    let limit = match q.get("limit") {
        None => AUDIT_PAGE,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=AUDIT_PAGE_MAX).contains(&n) => n,
            _ => {
                return Err(bad(
                    "limit",
                    format!("want a whole number from 1 to {AUDIT_PAGE_MAX}"),
                ))
            }
        },
    };
    let before = match q.get("before") {
        None => None,
        Some(v) => match v.parse::<i64>() {
            Ok(n) if n > 0 => Some(n),
            _ => return Err(bad("before", "want an entry id (a whole number above 0)")),
        },
    };
    let rows = st.durable.audit(before, limit).await?;
    let mut entries = Vec::with_capacity(rows.len());
    for r in rows {
        let mut e: AuditEntry =
            serde_json::from_str(&r.body).map_err(|e| crate::persist::StoreError::Corrupt {
                store: st.durable.kind().to_string(),
                row: format!("audit entry {}", r.id),
                message: e.to_string(),
            })?;
        e.id = r.id;
        e.status = u16::try_from(r.status).unwrap_or(0);
        entries.push(e);
    }
    Ok(Json(AuditResponse { entries }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_peers_pass() {
        let with = |addr: &str| {
            let mut e = Extensions::new();
            e.insert(ConnectInfo(addr.parse::<SocketAddr>().unwrap()));
            peer_is_loopback(&e)
        };
        assert!(with("127.0.0.1:5000"));
        assert!(with("127.8.9.1:5000"));
        assert!(with("[::1]:5000"));
        assert!(with("[::ffff:127.0.0.1]:5000"));
        assert!(!with("10.0.0.1:5000"));
        assert!(!with("192.168.1.2:5000"));
        assert!(!with("[::ffff:10.0.0.1]:5000"));
        assert!(!with("[2001:db8::1]:5000"));
        assert!(!peer_is_loopback(&Extensions::new()), "no peer, no trust");
    }

    fn req(text: &str) -> JobsRequest {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn jobs_requests_name_the_bad_field() {
        let cases = [
            (r#"{"prefix":"web"}"#, "action: is missing"),
            (
                r#"{"action":"reboot","prefix":"web"}"#,
                "action: \"reboot\" is not",
            ),
            (
                r#"{"action":"install","name":"a","prefix":"web"}"#,
                "action: install",
            ),
            (r#"{"action":"restart","prefix":"web"}"#, "name: is missing"),
            (
                r#"{"action":"restart","name":"../x","prefix":"web"}"#,
                "name: invalid",
            ),
            (
                r#"{"action":"stop","name":"a","step":60,"prefix":"w"}"#,
                "svrlist, step: only",
            ),
            (
                r#"{"action":"config","prefix":"web"}"#,
                "svrlist, step: action config",
            ),
            (
                r#"{"action":"config","step":1,"prefix":"web"}"#,
                "step: 1 is not",
            ),
            (
                r#"{"action":"config","svrlist":"nohost","prefix":"web"}"#,
                "svrlist:",
            ),
            (
                r#"{"action":"config","name":"a","step":60,"prefix":"w"}"#,
                "name: does not",
            ),
            (
                r#"{"action":"restart","name":"a"}"#,
                "give exactly one selector, got 0",
            ),
            (
                r#"{"action":"restart","name":"a","prefix":"w","tag":"a=b"}"#,
                "got 2",
            ),
            (
                r#"{"action":"restart","name":"a","hosts":[]}"#,
                "hosts: is empty",
            ),
            (
                r#"{"action":"restart","name":"a","hosts":["a/b"]}"#,
                "hosts: invalid hostname",
            ),
            (
                r#"{"action":"restart","name":"a","prefix":""}"#,
                "prefix: is empty",
            ),
            (r#"{"action":"restart","name":"a","tag":"svc"}"#, "tag:"),
        ];
        for (text, want) in cases {
            let got = operator_job(req(text)).unwrap_err().to_string();
            assert!(got.contains(want), "{text}: want {want:?}, got {got:?}");
        }
        let (j, s) = operator_job(req(
            r#"{"action":"config","svrlist":"10.0.0.1:80","step":60,"tag":"svc=web"}"#,
        ))
        .unwrap();
        assert_eq!(j.action, Action::Config);
        assert_eq!(j.step, Some(60));
        assert_eq!(s, Selector::Tag("svc=web".into()));
    }
}
