//! The local endpoint: `GET /health`, `GET /version`, a JSON `GET /status` describing the
//! daemon and each agent, and `GET /events[?n=N]`, the newest events of the journal
//! (newest last), and `GET /metrics`, the counters of [`crate::metrics`] in the Prometheus
//! text format. Read-only; nothing here changes what the daemon does.
//!
//! Plain hyper rather than a router framework: four fixed paths do not need one, and every
//! page of code the daemon links is resident on every host of the fleet.
//!
//! What a client may cost: one request per connection (no keep-alive, so no idle
//! connection stays open), and a connection lives at most [`HEADER_TIMEOUT`] from its
//! accept, whatever it sends. At most [`MAX_CONNECTIONS`] are served at once; past that,
//! the oldest connection that has not sent a whole request yet is closed to make room, and
//! when every one is being answered the newcomer gets an immediate 503. Nothing waits in
//! the kernel's queue. Requests whose `Host` is not a loopback name, an IP address or this
//! host's name are refused with 421 ([`host_allowed`]): a web page that rebinds its own
//! domain name to 127.0.0.1 cannot read `/status`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};

use crate::state::Shared;

/// Most connections served at once; see the module docs for what happens past it.
pub const MAX_CONNECTIONS: usize = 32;
/// Longest a connection lives, counted from its accept: its request's headers must arrive
/// and its answer be sent within it, so an idle or slow client cannot hold a slot.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// What one client may cost the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: MAX_CONNECTIONS,
            header_timeout: HEADER_TIMEOUT,
        }
    }
}

/// Handler state: the shared view, and the names this endpoint answers to.
#[derive(Clone)]
pub struct AppState {
    pub shared: Shared,
    /// `Host` names accepted besides loopback names and IP addresses (this host's name).
    pub names: Arc<[String]>,
}

impl AppState {
    pub fn new(shared: Shared, hostname: &str) -> AppState {
        AppState {
            shared,
            names: Arc::from([hostname.to_string()]),
        }
    }
}

/// True when a request's `Host` (`name[:port]`) names this endpoint: a loopback name
/// (`localhost`, `*.localhost`), an IP address literal (a DNS-rebinding page always sends
/// its own domain name, never an address), or one of `names`. Pure, for unit tests.
pub fn host_allowed(host: &str, names: &[String]) -> bool {
    let port_ok = |p: &str| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit());
    if let Some(rest) = host.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((ip6, tail)) => {
                (tail.is_empty() || tail.strip_prefix(':').is_some_and(port_ok))
                    && ip6.parse::<Ipv6Addr>().is_ok()
            }
            None => false,
        };
    }
    let name = match host.rsplit_once(':') {
        Some((n, p)) if port_ok(p) => n,
        Some(_) => return false,
        None => host,
    };
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    !name.is_empty()
        && (name.parse::<Ipv4Addr>().is_ok()
            || name == "localhost"
            || name.ends_with(".localhost")
            || names.iter().any(|n| n.eq_ignore_ascii_case(&name)))
}

/// Binds `addr` (so that a busy port is reported at start-up, before the daemon runs).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// The listening socket a supervisor passed down as `fd` (the same socket across workers,
/// so connections wait in its queue while one worker hands over to the next).
#[allow(unsafe_code)] // Taking ownership of an inherited fd: see the SAFETY note.
pub fn inherited(fd: std::os::fd::RawFd) -> std::io::Result<tokio::net::TcpListener> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: the supervisor opened this fd for this process (`process::worker_command`);
    // nothing else in the process uses it.
    let l = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    // Not a listening TCP socket: refused here rather than at the first accept.
    l.local_addr()?;
    // Close-on-exec from now on, or every control script and agent would inherit the
    // updater's socket (and keep its port taken after the updater ended).
    nix::fcntl::fcntl(
        std::os::fd::AsRawFd::as_raw_fd(&l),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(std::io::Error::from)?;
    l.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(l)
}

/// Serves with the default [`Limits`] until `shutdown` resolves; connections still open
/// then are dropped (every answer is a small read-only document).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, state, shutdown, Limits::default()).await
}

/// A connection being served.
struct Live {
    abort: tokio::task::AbortHandle,
    /// Set once its request's headers arrived (it is being answered).
    answering: Arc<AtomicBool>,
}

/// [`serve`] with explicit limits.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    limits: Limits,
) -> std::io::Result<()> {
    let mut conns = tokio::task::JoinSet::new();
    let mut live: VecDeque<Live> = VecDeque::new();
    tokio::pin!(shutdown);
    loop {
        // Always accepting: a socket left in the kernel's queue is under no timeout.
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    // Out of descriptors and the like: wait a little instead of spinning.
                    tracing::warn!(error = %e, "local endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Reap finished connections so the set does not grow with the daemon's uptime.
        while conns.try_join_next().is_some() {}
        live.retain(|c| !c.abort.is_finished());
        if live.len() >= limits.max_connections {
            match live
                .iter()
                .position(|c| !c.answering.load(Ordering::SeqCst))
            {
                Some(i) => {
                    if let Some(old) = live.remove(i) {
                        old.abort.abort();
                    }
                    tracing::debug!(%peer, "local endpoint: full; closed the oldest idle connection");
                }
                None => {
                    shed(&stream);
                    tracing::debug!(%peer, "local endpoint: full; shed a connection");
                    continue;
                }
            }
        }
        let answering = Arc::new(AtomicBool::new(false));
        let flag = answering.clone();
        let state = state.clone();
        let abort = conns.spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                flag.store(true, Ordering::SeqCst);
                let state = state.clone();
                async move { Ok::<_, Infallible>(answer(&state, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), svc);
            match tokio::time::timeout(limits.header_timeout, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "local endpoint: connection ended"),
                Err(_) => tracing::debug!(%peer, "local endpoint: connection closed at the header timeout"),
            }
        });
        live.push_back(Live { abort, answering });
    }
    conns.shutdown().await;
    Ok(())
}

/// Answers a connection beyond the limit with a 503 in one non-blocking write, then drops
/// it: shedding never waits on the client.
fn shed(stream: &tokio::net::TcpStream) {
    const BODY: &str = "too many connections\n";
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = stream.try_write(head.as_bytes());
}

/// The answer to one request.
fn answer<B>(state: &AppState, req: &Request<B>) -> Response<Full<Bytes>> {
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        });
    match host {
        Some(h) if host_allowed(&h, &state.names) => {}
        Some(_) => {
            return plain(
                StatusCode::MISDIRECTED_REQUEST,
                "misdirected request: this Host is not a loopback name, an IP address or this host's name",
            )
        }
        None => return plain(StatusCode::BAD_REQUEST, "bad request: no Host header"),
    }
    let known = matches!(
        req.uri().path(),
        "/health" | "/version" | "/status" | "/events" | "/metrics"
    );
    if known && req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/health" => plain(StatusCode::OK, "ok"),
        "/version" => plain(StatusCode::OK, crate::selfup::VERSION),
        "/status" => json(&state.shared.snapshot()),
        "/metrics" => {
            let mut r = plain(StatusCode::OK, &state.shared.metrics().render());
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
            );
            r
        }
        "/events" => {
            let journal = state.shared.events();
            match events_wanted(req.uri().query(), journal.cap()) {
                Ok(n) => json(&EventsView {
                    acked: journal.acked_seq(),
                    events: journal.recent(n),
                }),
                Err(e) => plain(StatusCode::BAD_REQUEST, &e),
            }
        }
        _ => plain(StatusCode::NOT_FOUND, "not found"),
    }
}

/// `GET /events`: the newest events, newest last, and the highest seq a server took.
/// Local to this host, like `/status`.
#[derive(Debug, serde::Serialize)]
struct EventsView {
    acked: u64,
    events: Vec<proto::events::Event>,
}

/// How many events `GET /events?n=N` asks for: `N`, at most `cap`; all kept without it.
fn events_wanted(query: Option<&str>, cap: usize) -> Result<usize, String> {
    let mut n = cap;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("n", v)) => {
                n = v
                    .parse::<usize>()
                    .map_err(|_| {
                        format!(
                            "bad request: n must be a count of events, got {:?}",
                            v.chars().take(32).collect::<String>()
                        )
                    })?
                    .min(cap);
            }
            _ => {
                return Err(format!(
                    "bad request: unknown query {:?} (only n=COUNT)",
                    pair.chars().take(32).collect::<String>()
                ))
            }
        }
    }
    Ok(n)
}

fn json(value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
        Err(e) => plain(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::copy_from_slice(text.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn health_version_and_status() {
        let shared = Shared::new("h1", "http://m/heartbeat");
        shared.agent(&proto::names::AgentName::parse("a").unwrap(), |v| {
            v.current_version = Some("1.0.0".into());
            v.status = Some("started".into());
        });
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, AppState::new(shared, "h1"), async {
            let _ = rx.await;
        }));
        let get = |path: &str| {
            let url = format!("http://{addr}{path}");
            async move {
                let r = reqwest::get(url).await.unwrap();
                (r.status().as_u16(), r.text().await.unwrap())
            }
        };
        assert_eq!(get("/health").await, (200, "ok".into()));
        assert_eq!(get("/version").await, (200, crate::selfup::VERSION.into()));
        let (code, body) = get("/status").await;
        assert_eq!(code, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["daemon"]["hostname"], "h1");
        assert_eq!(v["agents"][0]["name"], "a");
        assert_eq!(v["agents"][0]["currentVersion"], "1.0.0");
        assert_eq!(get("/nope").await.0, 404);
        let post = reqwest::Client::new()
            .post(format!("http://{addr}/status"))
            .send()
            .await
            .unwrap();
        assert_eq!(post.status().as_u16(), 405);
        assert_eq!(post.headers()["allow"], "GET, HEAD");
        tx.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn events_lists_the_newest_newest_last_with_the_same_hardening() {
        use crate::events::{EventInput, Journal};
        let t = tempfile::tempdir().unwrap();
        let journal = Journal::open(&t.path().join("j.json"), 5).await;
        let mut seqs = Vec::new();
        for i in 0..7 {
            let seq = journal
                .push(EventInput {
                    agent: "a".into(),
                    kind: proto::events::KIND_EXITED.into(),
                    cause: format!("exit code {i}"),
                    ..EventInput::default()
                })
                .await;
            seqs.push(seq);
        }
        journal.acked(seqs[4]).await;
        let shared = Shared::new("h1", "http://m/heartbeat").with_journal(journal);
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, AppState::new(shared, "h1"), async {
            let _ = rx.await;
        }));
        let get = |path: String| async move {
            let r = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        };
        let page = |body: &str| -> (u64, Vec<u64>) {
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            let seqs = v["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["seq"].as_u64().unwrap())
                .collect();
            (v["acked"].as_u64().unwrap(), seqs)
        };
        let (code, body) = get("/events".into()).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(
            page(&body),
            (seqs[4], seqs[2..].to_vec()),
            "the cap, newest last"
        );
        let (code, body) = get("/events?n=2".into()).await;
        assert_eq!(code, 200);
        assert_eq!(page(&body).1, seqs[5..].to_vec());
        assert!(body.contains(r#""cause":"exit code 6""#), "{body}");
        let (code, body) = get("/events?n=1000".into()).await;
        assert_eq!((code, page(&body).1.len()), (200, 5), "n is cut to the cap");
        assert_eq!(get("/events?n=-1".into()).await.0, 400);
        assert_eq!(get("/events?x=1".into()).await.0, 400);
        // Same Host check and methods as every path.
        let c = reqwest::Client::new();
        let r = c
            .get(format!("http://{addr}/events"))
            .header("host", "evil.example")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 421);
        let r = c
            .post(format!("http://{addr}/events"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 405);
        tx.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    #[test]
    fn events_query() {
        assert_eq!(events_wanted(None, 200), Ok(200));
        assert_eq!(events_wanted(Some(""), 200), Ok(200));
        assert_eq!(events_wanted(Some("n=3"), 200), Ok(3));
        assert_eq!(events_wanted(Some("n=0"), 200), Ok(0));
        assert_eq!(events_wanted(Some("n=999"), 200), Ok(200));
        assert!(events_wanted(Some("n="), 200).is_err());
        assert!(events_wanted(Some("n=1&m=2"), 200).is_err());
    }

    /// Starts the endpoint with `limits`; the server stops when the returned sender drops.
    async fn start(limits: Limits) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let state = AppState::new(Shared::new("h1", "http://m/heartbeat"), "h1");
        tokio::spawn(serve_with(
            listener,
            state,
            async {
                let _ = rx.await;
            },
            limits,
        ));
        (addr, tx)
    }

    /// Reads until the peer closes; `None` if it is still open after `within`.
    async fn read_to_close(s: &mut tokio::net::TcpStream, within: Duration) -> Option<Vec<u8>> {
        use tokio::io::AsyncReadExt as _;
        let mut got = Vec::new();
        tokio::time::timeout(within, s.read_to_end(&mut got))
            .await
            .ok()
            .map(|r| r.map(|_| got).unwrap_or_default())
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_its_headers_is_disconnected() {
        let (addr, _stop) = start(Limits {
            header_timeout: Duration::from_millis(200),
            ..Limits::default()
        })
        .await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::AsyncWriteExt as _;
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let got = read_to_close(&mut s, Duration::from_secs(20)).await;
        let got = got.expect("connection still open long after the header timeout");
        assert!(!String::from_utf8_lossy(&got).contains("200 OK"));
    }

    #[tokio::test]
    async fn past_the_limit_an_idle_connection_makes_room_and_a_busy_one_is_not_queued() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (addr, _stop) = start(Limits {
            max_connections: 1,
            ..Limits::default()
        })
        .await;
        // An idle client takes the only slot; a real request still gets through at once.
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .unwrap();
        let got = read_to_close(&mut s, Duration::from_secs(5)).await.unwrap();
        assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
        // The idle one was closed to make room.
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf))
            .await
            .expect("idle connection closed")
            .unwrap_or(0);
        assert_eq!(n, 0);
    }

    #[test]
    fn hosts_that_name_this_endpoint() {
        let names = ["web-01".to_string()];
        for ok in [
            "localhost",
            "localhost:2001",
            "LOCALHOST.",
            "a.localhost:1",
            "127.0.0.1:2001",
            "10.1.2.3",
            "[::1]:2001",
            "[::1]",
            "web-01:2001",
        ] {
            assert!(host_allowed(ok, &names), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:2001",
            "localhost.evil.example",
            "127.0.0.1.evil.example",
            "",
            "[::1",
            "[evil]:1",
            "localhost:x",
            "web-02",
        ] {
            assert!(!host_allowed(bad, &names), "{bad}");
        }
    }
}
