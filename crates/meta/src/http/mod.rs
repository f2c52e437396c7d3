//! The HTTP surface: one router made of sub-routers per area (legacy heartbeat, status,
//! admin, files), one error type, and the request-timeout layer.

mod admin;
mod agent;
pub(crate) mod auth;
mod files;
mod heartbeat;
mod ops;
mod rollouts;
mod status;

use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;

pub use crate::state::AppState;
pub use heartbeat::{HeartbeatConn, PATH as HEARTBEAT_PATH};

impl From<crate::persist::StoreError> for AppError {
    fn from(e: crate::persist::StoreError) -> AppError {
        AppError::Store(e.to_string())
    }
}

/// Entry points for the fuzz targets in `fuzz/` (not an API: it may change at any time).
/// The parsers they reach stay private to their modules otherwise.
#[doc(hidden)]
pub mod fuzzing {
    pub use super::files::{parse_range, RangeReq};
}

/// The whole application as one router, behind the protection stack
/// ([`crate::guard`]) as a middleware: what in-process tests drive. The server runs
/// [`routes`] behind each connection's own guard instead.
pub fn app(state: AppState) -> Router {
    routes(state.clone()).layer(middleware::from_fn_with_state(
        state,
        crate::guard::middleware,
    ))
}

/// Every route, without the protection stack. Later areas merge their own
/// `Router<AppState>` here.
pub fn routes(state: AppState) -> Router {
    Router::new()
        .merge(heartbeat::router())
        .merge(status::router())
        .merge(admin::router())
        .merge(agent::router())
        .merge(ops::router())
        .merge(rollouts::router())
        .fallback(files::serve)
        .layer(middleware::from_fn(text_errors))
        .with_state(state)
}

/// Gives a plain-text body to an error answer that has none: the router's own 405 for a
/// known path asked with another method, and any like it. Every error status carries
/// text, as the docs promise; headers the router set (`Allow`) are kept.
async fn text_errors(req: Request, next: Next) -> Response {
    let r = next.run(req).await;
    let status = r.status();
    if !(status.is_client_error() || status.is_server_error())
        || hyper::body::Body::size_hint(r.body()).exact() != Some(0)
    {
        return r;
    }
    let (mut parts, _) = r.into_parts();
    let text = AppError::Bare(status).into_response();
    parts.headers.remove(header::CONTENT_LENGTH);
    for (name, value) in text.headers() {
        parts.headers.insert(name, value.clone());
    }
    Response::from_parts(parts, text.into_body())
}

/// Every error a handler can return. The status and the text sent are chosen here; the
/// legacy texts are exactly the original's.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("body is blank")]
    BodyBlank,
    #[error("body format error")]
    BodyFormat,
    #[error("hostname is blank")]
    HostnameBlank,
    #[error("{0}")]
    InvalidName(#[from] proto::NameError),
    #[error("too many agents in one heartbeat: {got}, the limit is {max} (maxAgentsPerHeartbeat)")]
    TooManyAgents { got: usize, max: u64 },
    #[error("request body is larger than {max} bytes (maxBodyBytes)")]
    BodyTooLarge { max: u64 },
    #[error("cannot read request body")]
    BodyRead,
    #[error("request took longer than {secs} s (requestTimeoutSecs)")]
    Timeout { secs: u64 },
    #[error("{0}")]
    Forbidden(&'static str),
    /// A `read` token asked for a mutation.
    #[error("API token {name:?} has role read; this needs an admin token")]
    NeedsAdmin { name: String },
    /// A mutation body that is not JSON while no token is configured (what a web page
    /// can make a browser send).
    #[error("operator request bodies must be sent with Content-Type: application/json")]
    UnsupportedMediaType,
    /// 401 with `WWW-Authenticate: Bearer`: an operator call without an API token or with
    /// one not in `apiTokens`, or a BootAgent request without the credential its host
    /// holds; the text names what is missing (and the hostname), never a secret.
    #[error("{0}")]
    Unauthorized(String),
    /// A BootAgent request refused for who it is (a wrong credential, an enrolled
    /// hostname, a missing or unknown enrollment secret, a legacy heartbeat refused); the
    /// text names the hostname and the rule, never a secret.
    #[error("{0}")]
    Refused(String),
    #[error("not found")]
    NotFound,
    /// A request the operator API or BootAgent endpoints refuse; the text names the field.
    #[error("{0}")]
    BadRequest(String),
    /// The action does not fit the state of what it is on (a rollout's state, another
    /// rollout of the agent); 409.
    #[error("{0}")]
    Conflict(String),
    /// Nothing matched what was asked for; the text says what.
    #[error("{0}")]
    NothingFound(String),
    #[error("bad path: {0}")]
    BadPath(&'static str),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("range not satisfiable")]
    RangeNotSatisfiable { len: u64 },
    #[error("config reload refused, the running config stays:\n{}", .0.join("\n"))]
    ReloadRefused(Vec<String>),
    /// Detail is logged, never sent.
    #[error("internal error")]
    Internal(String),
    /// The durable store failed: nothing was acknowledged; the client retries.
    #[error("the fleet store is unavailable; retry later")]
    Store(String),
    /// Too many status pages are being sent (`maxStatusStreams`); 503 with `Retry-After`.
    #[error("{max} status pages are being sent, the limit (maxStatusStreams); retry later")]
    Busy { max: u64, retry_after_secs: u64 },
    /// hyper could not parse the request head (the connection answers it, see `wire`).
    #[error("malformed HTTP request")]
    MalformedRequest,
    #[error("request URI is longer than {max} bytes")]
    UriTooLong { max: usize },
    #[error("request header fields are too large: at most {fields} fields and {bytes} bytes")]
    HeadersTooLarge { fields: usize, bytes: usize },
    /// An error answer made without a handler (the router's 405): the status's reason.
    #[error("{}", .0.canonical_reason().unwrap_or("error").to_ascii_lowercase())]
    Bare(StatusCode),
}

impl AppError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            AppError::BodyBlank
            | AppError::BodyFormat
            | AppError::HostnameBlank
            | AppError::InvalidName(_)
            | AppError::TooManyAgents { .. }
            | AppError::BodyRead
            | AppError::BadPath(_) => StatusCode::BAD_REQUEST,
            AppError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::Timeout { .. } => StatusCode::REQUEST_TIMEOUT,
            AppError::Forbidden(_) | AppError::NeedsAdmin { .. } | AppError::Refused(_) => {
                StatusCode::FORBIDDEN
            }
            AppError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            AppError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            AppError::NotFound => StatusCode::NOT_FOUND,
            AppError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AppError::NothingFound(_) => StatusCode::NOT_FOUND,
            AppError::Conflict(_) => StatusCode::CONFLICT,
            AppError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            AppError::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            AppError::ReloadRefused(_) => StatusCode::BAD_REQUEST,
            AppError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            AppError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            AppError::Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            AppError::MalformedRequest => StatusCode::BAD_REQUEST,
            AppError::UriTooLong { .. } => StatusCode::URI_TOO_LONG,
            AppError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            AppError::Bare(s) => *s,
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        if let AppError::Internal(detail) = &self {
            tracing::error!(error = %detail, "internal error");
        }
        if let AppError::Store(detail) = &self {
            tracing::error!(error = %detail, "store error; answered 503");
        }
        // Like Go's http.Error, which the original used: the text, a newline, plain text.
        let text = self.to_string();
        let mut r = (self.status(), format!("{text}\n")).into_response();
        r.extensions_mut().insert(ErrorText(text));
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        h.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        match &self {
            AppError::RangeNotSatisfiable { len } => {
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                    h.insert(header::CONTENT_RANGE, v);
                }
            }
            AppError::Unauthorized(_) => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"ops-meta\""),
                );
            }
            AppError::MethodNotAllowed => {
                h.insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            }
            AppError::Timeout { .. } => {
                h.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            AppError::Busy {
                retry_after_secs, ..
            } => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            _ => {}
        }
        r
    }
}

/// The text of an error answer, kept on the response for the audit log.
#[derive(Debug, Clone)]
pub(crate) struct ErrorText(pub String);

/// Current Unix time in seconds.
pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
