//! Who may call the operator endpoints, and the audit log of what they did: one step
//! ([`admit`]) of the protection stack ([`crate::guard`]) every request passes, so that a
//! route added later is covered by its method and path without being listed here.
//!
//! A request is one of three [`Class`]es:
//! - operator mutation: any method but `GET`/`HEAD` under `/api/`, and `/config/reload`
//!   (a `GET`, as the original's, that changes the running config);
//! - operator read: `GET`/`HEAD` under `/api/`; and, once a token is configured,
//!   `/status/*` and `/metrics`;
//! - host endpoints: everything else (`/heartbeat`, `/agent/*`, tarball files, `/health`,
//!   `/version`), passed on untouched.
//!
//! With `apiTokens` configured, the caller sends `Authorization: Bearer TOKEN` from any
//! address: 401 without a token or with an unknown one, 403 when a `read` token asks for a
//! mutation. Without tokens, as the original, only loopback peers are served, and the
//! requests a web page could make a browser send are refused: a foreign `Origin` or a
//! `Host` that is neither a loopback name nor the listen address (DNS rebinding) gets 403,
//! a mutation body that is not `application/json` 415.
//!
//! Every operator mutation, refused or not, is written to the audit log of the durable
//! store ([`crate::persist::Durable::put_audit`]): an accepted one before its handler runs
//! (a store that fails answers 503 and nothing is done), and its outcome after, before the
//! answer goes out. Handlers add the hosts they touched through [`AuditNote`].

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, FromRequestParts, Request};
use axum::http::{header, request::Parts, HeaderMap, Method};
use axum::response::{IntoResponse, Response};
use parking_lot::Mutex;
use proto::ops::{AuditEntry, AUDIT_MAX_HOSTS};
use proto::Hostname;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{unix_now, AppError, AppState, ErrorText};
use crate::boot::Selector;
use crate::config::{self, ApiToken, Role};
use crate::persist::AuditRow;

/// The actor of an audit entry when no token is configured.
pub const LOOPBACK_ACTOR: &str = "loopback";

/// Longest path (and peer) kept in an audit entry; a longer one is cut.
const MAX_AUDIT_PATH: usize = 256;

/// What a request is, for the guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    Host,
    Read,
    Mutation,
}

/// Classifies by method and path only, so that routes added later are covered.
pub(crate) fn classify(method: &Method, path: &str, tokens: bool) -> Class {
    let api = path == "/api" || path.starts_with("/api/");
    if api {
        return if method == Method::GET || method == Method::HEAD {
            Class::Read
        } else {
            Class::Mutation
        };
    }
    if path == "/config/reload" {
        return Class::Mutation;
    }
    if tokens && (path == "/metrics" || path.starts_with("/status/")) {
        return Class::Read;
    }
    Class::Host
}

/// The audit action a mutation is named by.
fn action(method: &Method, path: &str) -> String {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method.as_str(), segs.as_slice()) {
        ("POST", ["api", "jobs"]) => "jobs.create".into(),
        ("POST", ["api", "retry"]) => "retry".into(),
        ("POST", ["api", "hosts", _, "readmit"]) => "hosts.readmit".into(),
        (_, ["config", "reload"]) => "config.reload".into(),
        (m, _) => format!("{m} {}", cut(path)),
    }
}

fn cut(s: &str) -> String {
    s.chars().take(MAX_AUDIT_PATH).collect()
}

/// True when `req` is a host endpoint whatever the config says: it passes [`admit`]
/// untouched, so callers may skip it.
pub(crate) fn is_host_endpoint<B>(req: &axum::http::Request<B>) -> bool {
    classify(req.method(), req.uri().path(), true) == Class::Host
}

/// The admission step of the protection stack ([`crate::guard`]): lets host endpoints
/// through untouched, checks operator calls and records the mutations; `next` is the rest
/// of the stack (the deadline and the handler), so an action cut short by the deadline is
/// still recorded as such.
pub(crate) async fn admit<F, Fut>(st: &AppState, mut req: Request, next: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    // Host endpoints (BootAgent reports, tarballs) pass without even a config load.
    if is_host_endpoint(&req) {
        return next(req).await;
    }
    let desired = st.current.load();
    let tokens = &desired.config.api_tokens;
    let class = classify(req.method(), req.uri().path(), !tokens.is_empty());
    if class == Class::Host {
        return next(req).await;
    }
    let verdict = if tokens.is_empty() {
        loopback_mode(&req, &desired.config.http.listen, class)
    } else {
        token_mode(req.headers(), tokens, class)
    };
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string())
        .unwrap_or_default();
    if class == Class::Read {
        return match verdict {
            Ok(_) => next(req).await,
            Err(e) => {
                tracing::warn!(peer = %peer, path = %cut(req.uri().path()), status = e.status().as_u16(), refused = %e, "operator read refused");
                e.into_response()
            }
        };
    }
    let mut entry = AuditEntry {
        time: unix_now(),
        peer,
        method: req.method().to_string(),
        path: cut(req.uri().path()),
        action: action(req.method(), req.uri().path()),
        ..AuditEntry::default()
    };
    // Store calls here are bounded like a handler's.
    let limit = Duration::from_secs(desired.config.request_timeout_secs);
    let actor = match verdict {
        Ok(actor) => actor,
        Err(e) => {
            if let AppError::NeedsAdmin { name } = &e {
                entry.actor = name.clone();
            }
            entry.status = e.status().as_u16();
            entry.outcome = first_line(&e.to_string());
            tracing::warn!(peer = %entry.peer, action = %entry.action, status = entry.status, refused = %entry.outcome, "operator mutation refused");
            // The refusal stands whether or not it could be recorded.
            if let Err(se) = put(st, limit, &entry).await {
                tracing::error!(error = %se, "audit: a refused operator call could not be recorded");
            }
            return e.into_response();
        }
    };
    entry.actor = actor;
    let id = match put(st, limit, &entry).await {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    entry.id = id;
    let note = AuditNote::default();
    req.extensions_mut().insert(note.clone());
    let resp = next(req).await;
    let status = resp.status();
    entry.status = status.as_u16();
    {
        let n = note.0.lock();
        entry.target = n.target.clone();
        entry.hosts = n.hosts.clone();
        entry.host_count = n.host_count;
        entry.outcome = if let Some(t) = resp.extensions().get::<ErrorText>() {
            first_line(&t.0)
        } else if !n.detail.is_empty() {
            n.detail.clone()
        } else {
            status
                .canonical_reason()
                .unwrap_or("done")
                .to_ascii_lowercase()
        };
    }
    tracing::info!(actor = %entry.actor, peer = %entry.peer, action = %entry.action, target = %entry.target, hosts = entry.host_count, status = entry.status, outcome = %entry.outcome, "operator action");
    // The action was taken: its answer goes out even if the outcome cannot be written
    // (the entry then stays with status 0, "outcome unknown").
    let row = AuditRow {
        id,
        time: entry.time,
        actor: entry.actor.clone(),
        status: i64::from(entry.status),
        body: encode(&entry),
    };
    match tokio::time::timeout(limit, st.durable.finish_audit(row)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::error!(error = %e, audit_id = id, "audit: the outcome could not be recorded")
        }
        Err(_) => tracing::error!(
            audit_id = id,
            "audit: the outcome could not be recorded in time"
        ),
    }
    resp
}

/// Writes a new entry; a failing or hanging store is a 503.
async fn put(st: &AppState, limit: Duration, entry: &AuditEntry) -> Result<i64, AppError> {
    let row = AuditRow {
        id: 0,
        time: entry.time,
        actor: entry.actor.clone(),
        status: i64::from(entry.status),
        body: encode(entry),
    };
    match tokio::time::timeout(limit, st.durable.put_audit(row)).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(AppError::Store(format!(
            "audit entry not written in {} s",
            limit.as_secs()
        ))),
    }
}

fn encode(e: &AuditEntry) -> String {
    serde_json::to_string(e).expect("audit entries serialize")
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").chars().take(200).collect()
}

/// `apiTokens` configured: the caller's token, by the SHA-256 of what it sent, compared
/// with every configured hash in constant time.
fn token_mode(headers: &HeaderMap, tokens: &[ApiToken], class: Class) -> Result<String, AppError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(AppError::Unauthorized(
            "this needs an API token: send Authorization: Bearer TOKEN".into(),
        ));
    };
    let presented = value
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
        .filter(|t| !t.is_empty());
    let Some(presented) = presented else {
        return Err(AppError::Unauthorized(
            "the Authorization header is not \"Bearer TOKEN\"".into(),
        ));
    };
    let token = find(tokens, presented)
        .ok_or_else(|| AppError::Unauthorized("unknown API token".into()))?;
    if class == Class::Mutation && token.role != Role::Admin {
        return Err(AppError::NeedsAdmin {
            name: token.name.clone(),
        });
    }
    Ok(token.name.clone())
}

/// The token whose hash is the presented token's; every hash is compared (no early exit).
fn find<'a>(tokens: &'a [ApiToken], presented: &str) -> Option<&'a ApiToken> {
    let digest = Sha256::digest(presented.as_bytes());
    let mut found = None;
    for t in tokens {
        if bool::from(digest.as_slice().ct_eq(&t.sha256)) {
            found = Some(t);
        }
    }
    found
}

/// No token configured: loopback peers only, and nothing a web page could have a browser
/// send.
fn loopback_mode(req: &Request, listen: &str, class: Class) -> Result<String, AppError> {
    if !super::ops::peer_is_loopback(req.extensions()) {
        return Err(AppError::Forbidden(
            if req.uri().path() == "/config/reload" {
                "config reload is only allowed from loopback"
            } else {
                "the operator API is only allowed from loopback"
            },
        ));
    }
    let h = req.headers();
    if let Some(origin) = h.get(header::ORIGIN) {
        let ok = origin
            .to_str()
            .ok()
            .and_then(|o| url::Url::parse(o).ok())
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .and_then(|u| u.host_str().map(|s| own_name(s, listen)))
            .unwrap_or(false);
        if !ok {
            return Err(AppError::Forbidden(
                "a request from a web page (Origin not loopback) is refused while no apiTokens are configured",
            ));
        }
    }
    if let Some(host) = h.get(header::HOST) {
        let ok = host
            .to_str()
            .ok()
            .and_then(host_part)
            .is_some_and(|name| own_name(name, listen));
        if !ok {
            return Err(AppError::Forbidden(
                "Host is not a loopback name or this server's listen address",
            ));
        }
    }
    // A request without a body (`POST /api/hosts/NAME/readmit` from curl) has no type to
    // check; a browser's body-less cross-origin POST carries an `Origin`, refused above.
    let has_body = h.contains_key(header::TRANSFER_ENCODING)
        || h.get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0");
    let with_body = has_body
        && matches!(
            *req.method(),
            Method::POST | Method::PUT | Method::PATCH | Method::DELETE
        );
    if class == Class::Mutation && with_body && !is_json(h) {
        return Err(AppError::UnsupportedMediaType);
    }
    Ok(LOOPBACK_ACTOR.into())
}

/// True for `application/json`, with any parameters.
fn is_json(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

/// The name of a `Host` value without its port: `[::1]:80` → `[::1]`, `a:80` → `a`.
fn host_part(host: &str) -> Option<&str> {
    let port_ok = |p: &str| p.is_empty() || p.bytes().all(|b| b.is_ascii_digit());
    if host.starts_with('[') {
        let end = host.find(']')?;
        let rest = &host[end + 1..];
        return (rest.is_empty() || rest.strip_prefix(':').is_some_and(port_ok))
            .then_some(&host[..=end]);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port_ok(port) => Some(name),
        Some(_) => None,
        None => Some(host),
    }
}

/// A loopback name (`localhost`, `127.x.x.x`, `[::1]`) or the host of `http.listen`.
fn own_name(name: &str, listen: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if name == "localhost" {
        return true;
    }
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        if ip.to_canonical().is_loopback() {
            return true;
        }
        if let Ok(l) = config::listen_addr(listen) {
            if !l.ip().is_unspecified() && l.ip() == ip {
                return true;
            }
        }
    }
    false
}

/// What a mutation's handler tells the audit log: the selector and the hosts it touched,
/// and a short text of what it did. A handler takes it as an argument; outside the guard
/// (no mutation) notes go nowhere.
#[derive(Debug, Clone, Default)]
pub(crate) struct AuditNote(Arc<Mutex<Note>>);

#[derive(Debug, Default)]
struct Note {
    target: String,
    hosts: Vec<String>,
    host_count: usize,
    detail: String,
}

impl AuditNote {
    /// The selector the request named.
    pub(crate) fn selector(&self, sel: &Selector) {
        self.0.lock().target = match sel {
            Selector::Hosts(h) if h.len() == 1 => format!("host {}", h[0].as_str()),
            Selector::Hosts(h) => format!("hosts ({} listed)", h.len()),
            Selector::Prefix(p) => format!("prefix {p}"),
            Selector::Tag(t) => format!("tag {t}"),
        };
    }

    /// The hosts the action touched (the first [`AUDIT_MAX_HOSTS`] are listed).
    pub(crate) fn hosts(&self, hosts: &[Hostname]) {
        let mut n = self.0.lock();
        n.host_count = hosts.len();
        n.hosts = hosts
            .iter()
            .take(AUDIT_MAX_HOSTS)
            .map(|h| h.as_str().to_string())
            .collect();
    }

    /// What the action was on, in words (a rollout, an agent).
    pub(crate) fn target(&self, text: impl Into<String>) {
        self.0.lock().target = text.into();
    }

    /// What was done, shown as the outcome of a success.
    pub(crate) fn detail(&self, text: impl Into<String>) {
        self.0.lock().detail = text.into();
    }
}

impl<S: Send + Sync> FromRequestParts<S> for AuditNote {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<AuditNote>()
            .cloned()
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_classified_by_method_and_path() {
        use Class::*;
        let c = |m: Method, p: &str, t: bool| classify(&m, p, t);
        assert_eq!(c(Method::GET, "/api/hosts", false), Read);
        assert_eq!(c(Method::HEAD, "/api/jobs/x", true), Read);
        assert_eq!(c(Method::POST, "/api/jobs", false), Mutation);
        assert_eq!(c(Method::POST, "/api/hosts/web-1/readmit", true), Mutation);
        assert_eq!(c(Method::DELETE, "/api/anything/new", true), Mutation);
        assert_eq!(c(Method::GET, "/config/reload", false), Mutation);
        assert_eq!(c(Method::GET, "/status/json/a", true), Read);
        assert_eq!(c(Method::GET, "/status/json/a", false), Host);
        assert_eq!(c(Method::GET, "/metrics", true), Read);
        assert_eq!(c(Method::GET, "/metrics", false), Host);
        for p in [
            "/heartbeat",
            "/agent/register",
            "/agent/status",
            "/a-1.0.tar.gz",
            "/health",
            "/apix",
        ] {
            assert_eq!(c(Method::POST, p, true), Host, "{p}");
            assert_eq!(c(Method::GET, p, true), Host, "{p}");
        }
        assert_eq!(action(&Method::POST, "/api/jobs"), "jobs.create");
        assert_eq!(action(&Method::POST, "/api/retry"), "retry");
        assert_eq!(
            action(&Method::POST, "/api/hosts/h/readmit"),
            "hosts.readmit"
        );
        assert_eq!(action(&Method::GET, "/config/reload"), "config.reload");
        assert_eq!(action(&Method::PUT, "/api/x"), "PUT /api/x");
    }

    #[test]
    fn hosts_and_origins_of_our_own() {
        let l = "10.0.0.5:8080";
        for (host, ok) in [
            ("localhost", true),
            ("localhost:8080", true),
            ("LOCALHOST.", true),
            ("127.0.0.1:1", true),
            ("127.9.9.9", true),
            ("[::1]:8080", true),
            ("[::1]", true),
            ("10.0.0.5:8080", true),
            ("10.0.0.6:8080", false),
            ("evil.example:8080", false),
            ("localhost.evil.example", false),
            ("[::1]x", false),
            ("a:b", false),
        ] {
            let got = host_part(host).is_some_and(|n| own_name(n, l));
            assert_eq!(got, ok, "{host}");
        }
        assert!(
            !own_name("0.0.0.0", ":8080"),
            "an unspecified listen address names nothing"
        );
    }

    #[test]
    fn tokens_are_found_by_hash_only() {
        let t = |name: &str, token: &str, role| ApiToken {
            name: name.into(),
            role,
            sha256: Sha256::digest(token.as_bytes()).into(),
        };
        let tokens = [t("ci", "one", Role::Admin), t("graf", "two", Role::Read)];
        assert_eq!(find(&tokens, "one").map(|t| t.name.as_str()), Some("ci"));
        assert_eq!(find(&tokens, "two").map(|t| t.name.as_str()), Some("graf"));
        assert!(find(&tokens, "three").is_none());
        assert!(find(&tokens, "").is_none());
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "bearer two".parse().unwrap());
        assert_eq!(token_mode(&h, &tokens, Class::Read).unwrap(), "graf");
        assert!(matches!(
            token_mode(&h, &tokens, Class::Mutation),
            Err(AppError::NeedsAdmin { .. })
        ));
        h.insert(header::AUTHORIZATION, "Basic b25lOg==".parse().unwrap());
        assert!(matches!(
            token_mode(&h, &tokens, Class::Read),
            Err(AppError::Unauthorized(_))
        ));
    }
}
