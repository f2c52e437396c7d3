//! Running the server: the accept loops of the plain and the `tls` listener (hyper over
//! [`crate::wire`], with a header-read timeout, a write timeout and graceful shutdown; the
//! TLS handshake bounded by the header-read timeout too), the background tasks (stale-host sweep, tarball checksums), and the signal
//! loop of the binary (SIGHUP reloads, SIGTERM/SIGINT shut down).

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use axum::http::Method;
use futures_util::future::{Either, FutureExt};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::{self, ConfigError};
use crate::guard::Guard;
use crate::http::{routes, unix_now, AppState, HeartbeatConn, HEARTBEAT_PATH};
use crate::persist::{self, behind::SEEN_STEP_SECS, Cursor, StoreError};
use crate::store::MemStore;
use crate::wire::{self, Wire};

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("config: {0}")]
    Listen(String),
    #[error("listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("install signal handler: {0}")]
    Signal(std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl RunError {
    /// True when the cause is the config file (the binary exits with EX_CONFIG then).
    pub fn is_config(&self) -> bool {
        matches!(self, RunError::Config(_) | RunError::Listen(_))
    }
}

/// A running server: the listener's accept loop and the background tasks. Dropping it
/// does not stop it; call [`Server::stop`].
pub struct Server {
    addr: Option<SocketAddr>,
    tls_addr: Option<SocketAddr>,
    state: AppState,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// The write-behind writers, stopped after the requests in flight finished.
    writer: Option<(watch::Sender<bool>, Vec<JoinHandle<()>>)>,
}

/// What [`load`] found in the store.
#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    pub legacy_hosts: usize,
    pub boot_hosts: usize,
    pub events: usize,
    pub batches: usize,
    pub cursor: Cursor,
    pub took: Duration,
}

/// Puts a stored legacy row into the cache.
fn record_row(store: &dyn crate::store::FleetStore, row: &persist::LegacyRow) {
    let agents: Vec<proto::legacy::RealAgentRef<'_>> = row
        .agents
        .iter()
        .map(|a| proto::legacy::RealAgentRef {
            name: a.name.as_str().into(),
            version: a.version.as_str().into(),
            status: a.status.as_str().into(),
            timestamp: a.timestamp,
        })
        .collect();
    store.record(&row.hostname, &agents, row.last_seen);
}

/// Fills the caches of `state` from its durable store (at start).
pub async fn load(state: &AppState) -> Result<Loaded, StoreError> {
    let started = std::time::Instant::now();
    let store = state.store.clone();
    let snap = state
        .durable
        .load(Box::new(move |row| record_row(&*store, &row)))
        .await?;
    let legacy_hosts = snap.legacy;
    let boot_hosts = state.boot.load(&snap.boot, &snap.batches);
    let rollouts = state.rollouts.load().await?;
    if rollouts > 0 {
        let pins = std::sync::Arc::new(state.rollouts.pins());
        state.reloader.set_pins(pins).await;
    }
    for e in &snap.events {
        state
            .events
            .record(&e.hostname, std::slice::from_ref(&e.event));
    }
    Ok(Loaded {
        legacy_hosts,
        boot_hosts,
        events: snap.events.len(),
        batches: snap.batches.len(),
        cursor: snap.cursor,
        took: started.elapsed(),
    })
}

impl Server {
    /// Starts serving `app(state)` on `listener` (nothing listens when `None`, as with
    /// `http.enabled: false`), and the background tasks. Needs a tokio runtime.
    pub fn start(state: AppState, listener: Option<TcpListener>) -> Server {
        Server::start_at(state, listener, Cursor::default())
    }

    /// [`Server::start`] for a state loaded from a shared store up to `cursor`: other
    /// replicas' changes after it are polled.
    pub fn start_at(state: AppState, listener: Option<TcpListener>, cursor: Cursor) -> Server {
        Server::start_with(
            state,
            Listeners {
                plain: listener,
                tls: None,
            },
            cursor,
        )
    }

    /// [`Server::start_at`] with a `tls` listener too: its handshakes get the pair in
    /// `state.reloader.certs`.
    pub fn start_with(state: AppState, listeners: Listeners, cursor: Cursor) -> Server {
        let (shutdown, rx) = watch::channel(false);
        let cfg = state.current.load().config.clone();
        let mut tasks = vec![
            tokio::spawn(sweeper(state.clone(), rx.clone())),
            tokio::spawn(checksums(state.clone(), rx.clone())),
            tokio::spawn(rollouts(state.clone(), rx.clone())),
        ];
        if state.durable.shared() {
            tasks.push(tokio::spawn(follow(state.clone(), rx.clone(), cursor)));
        }
        let (stop, stopped) = watch::channel(false);
        let mut writers = Vec::new();
        if let Some(w) = state.writer.lock().take() {
            writers.push(tokio::spawn(w.run(
                state.durable.clone(),
                state.store.clone(),
                stopped.clone(),
            )));
        }
        if let Some(w) = state.boot.take_seen_writer() {
            writers.push(tokio::spawn(w.run(
                state.durable.clone(),
                state.boot.registry.clone(),
                stopped,
            )));
        }
        let writer = (!writers.is_empty()).then_some((stop, writers));
        let addr = listeners.plain.as_ref().and_then(|l| l.local_addr().ok());
        let tls_addr = listeners.tls.as_ref().and_then(|l| l.local_addr().ok());
        let header_timeout = Duration::from_secs(cfg.header_read_timeout_secs);
        if let Some(l) = listeners.plain {
            tasks.push(tokio::spawn(accept_loop(
                l,
                None,
                state.clone(),
                rx.clone(),
                header_timeout,
            )));
        }
        if let Some(l) = listeners.tls {
            let tls = tokio_rustls::TlsAcceptor::from(crate::tls::server_config(
                state.reloader.certs.clone(),
            ));
            tasks.push(tokio::spawn(accept_loop(
                l,
                Some(tls),
                state.clone(),
                rx,
                header_timeout,
            )));
        }
        Server {
            addr,
            tls_addr,
            state,
            shutdown,
            tasks,
            writer,
        }
    }

    /// Loads the config at `path` and serves it on 127.0.0.1 with an ephemeral port,
    /// whatever `http.listen` says: the entry point for in-process tests.
    pub async fn start_local(path: &Path) -> Result<Server, RunError> {
        let (state, _warnings) = AppState::load(path)?;
        let addr: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
        let l = TcpListener::bind(addr)
            .await
            .map_err(|source| RunError::Bind { addr, source })?;
        Ok(Server::start(state, Some(l)))
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    /// The address of its `tls` listener.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// The shared state (store, current config, reloader).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Stops accepting, lets in-flight requests finish (up to `shutdownGraceSecs`), and
    /// stops the background tasks.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        // Requests are done: what they queued is written before we return.
        if let Some((stop, tasks)) = self.writer {
            let _ = stop.send(true);
            for t in tasks {
                let _ = t.await;
            }
        }
    }
}

/// The sockets a [`Server`] serves: the plain one (`http.listen`) and the `tls` one.
#[derive(Debug, Default)]
pub struct Listeners {
    pub plain: Option<TcpListener>,
    pub tls: Option<TcpListener>,
}

/// Accepts connections until shutdown, then waits for open connections to finish their
/// current request (bounded by `shutdownGraceSecs`). With `tls`, each connection first
/// completes a TLS handshake within `header_timeout`, or is closed.
async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: AppState,
    mut shutdown: watch::Receiver<bool>,
    header_timeout: Duration,
) {
    let router = routes(state.clone());
    let cap = state.connections.clone();
    // Every connection task holds a clone of `alive`; `recv` yields `None` once all are gone.
    let (alive, mut all_done) = mpsc::channel::<()>(1);
    loop {
        // At the cap, wait for a connection to close before accepting another.
        let permit = tokio::select! {
            p = cap.acquire() => p,
            _ = stopped(&mut shutdown) => break,
        };
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let router = router.clone();
                    let state = state.clone();
                    let shutdown = shutdown.clone();
                    let alive = alive.clone();
                    match &tls {
                        None => {
                            tokio::spawn(async move {
                                serve_connection(stream, peer, router, state, shutdown, header_timeout).await;
                                drop(permit);
                                drop(alive);
                            });
                        }
                        Some(acceptor) => {
                            let handshake = acceptor.accept(stream);
                            tokio::spawn(async move {
                                if let Some(stream) = handshake_within(handshake, peer, header_timeout, shutdown.clone()).await {
                                    serve_connection(stream, peer, router, state, shutdown, header_timeout).await;
                                }
                                drop(permit);
                                drop(alive);
                            });
                        }
                    }
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stopped(&mut shutdown) => break,
        }
    }
    drop(listener);
    drop(alive);
    let grace = Duration::from_secs(state.current.load().config.shutdown_grace_secs);
    if tokio::time::timeout(grace, all_done.recv()).await.is_err() {
        tracing::warn!(
            grace_secs = grace.as_secs(),
            "connections still open after the grace period; closing them"
        );
    }
}

/// Completes a TLS handshake, or gives up after `timeout` (a client that connects and
/// sends nothing), on a failed handshake, or at shutdown.
async fn handshake_within<S>(
    handshake: tokio_rustls::Accept<S>,
    peer: SocketAddr,
    timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> Option<tokio_rustls::server::TlsStream<S>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::select! {
        r = tokio::time::timeout(timeout, handshake) => match r {
            Ok(Ok(s)) => Some(s),
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "tls handshake failed");
                None
            }
            Err(_) => {
                tracing::debug!(%peer, ?timeout, "no tls handshake within headerReadTimeoutSecs; closed");
                None
            }
        },
        _ = stopped(&mut shutdown) => None,
    }
}

async fn serve_connection<S>(
    stream: S,
    peer: SocketAddr,
    router: axum::Router,
    state: AppState,
    mut shutdown: watch::Receiver<bool>,
    header_timeout: Duration,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let write_timeout = Duration::from_secs(state.current.load().config.write_timeout_secs);
    let heartbeats = HeartbeatConn::new(state.clone());
    // One protection stack for both: the heartbeat (nearly all of the traffic) is answered
    // without the router (see http::heartbeat), everything else by it.
    let guard = Guard::new(state, Some(peer));
    let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        if req.method() == Method::POST && req.uri().path() == HEARTBEAT_PATH {
            Either::Left(guard.heartbeat(req, &heartbeats).map(Ok::<_, Infallible>))
        } else {
            // Boxed: the service's future is as large as its largest branch, and the
            // heartbeat's, the common one, is the small one.
            Either::Right(Box::pin(guard.route(req, router.clone())).map(Ok::<_, Infallible>))
        }
    });
    let (mut wire, io) = Wire::new(stream, write_timeout);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(wire::MAX_HEAD_BYTES)
        .max_header_size(wire::MAX_HEAD_BYTES)
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let stop = stopped(&mut shutdown);
    tokio::pin!(stop);
    let mut stopping = false;
    let r = poll_fn(|cx| {
        if !stopping && stop.as_mut().poll(cx).is_ready() {
            // Finish the request in flight, then close; idle connections close at once.
            stopping = true;
            conn.as_mut().graceful_shutdown();
        }
        wire.poll_drive(cx, conn.as_mut())
    })
    .await;
    if let Err(e) = r {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// Drops hosts not seen for `staleHostSecs`, every `sweepIntervalSecs` (both read from
/// the current config each round, so a reload changes them).
/// The rollout controller ([`crate::rollout::engine::run`]) until shutdown.
async fn rollouts(state: AppState, mut shutdown: watch::Receiver<bool>) {
    let every = Duration::from_millis(state.current.load().config.rollout_pass_millis);
    tokio::select! {
        _ = crate::rollout::engine::run(state.clone(), every) => {}
        _ = stopped(&mut shutdown) => {}
    }
}

async fn sweeper(state: AppState, mut shutdown: watch::Receiver<bool>) {
    loop {
        let cfg = state.current.load().config.clone();
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(cfg.sweep_interval_secs)) => {}
            _ = stopped(&mut shutdown) => return,
        }
        let cutoff = unix_now() - cfg.stale_host_secs as i64;
        let dropped = state.store.sweep(cutoff);
        if dropped > 0 {
            tracing::info!(
                dropped,
                hosts = state.store.host_count(),
                "dropped stale hosts"
            );
        }
        let dropped = state.boot.sweep(cutoff);
        if dropped > 0 {
            tracing::info!(dropped, "dropped stale BootAgent hosts");
        }
        // Rows hold last-seen times up to a step old: the store forgets a host a little
        // after memory did, never before.
        match state.durable.sweep(cutoff - 2 * SEEN_STEP_SECS).await {
            Ok(n) if n > 0 => tracing::info!(dropped = n, "dropped stale hosts from the store"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "store sweep failed; next round tries again"),
        }
        // Both kinds of host are in the fleet store: events go with their host.
        let dropped = state.events.retain(|h| state.store.host(h).is_some());
        if dropped > 0 {
            tracing::info!(dropped, "dropped the events of stale hosts");
        }
    }
}

/// How often a replica on a shared store reads what the others changed.
pub const FOLLOW_EVERY: Duration = Duration::from_millis(500);

/// On a shared store: brings other replicas' legacy hosts, BootAgent hosts and events into
/// the caches, for the status pages and the operator's views (what a BootAgent host is
/// handed is read under its lock anyway).
async fn follow(state: AppState, mut shutdown: watch::Receiver<bool>, mut cursor: Cursor) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(FOLLOW_EVERY) => {}
            _ = stopped(&mut shutdown) => return,
        }
        match state.durable.changes(cursor).await {
            Ok(ch) => {
                // A legacy host another replica heard from more recently than this one
                // (or in the same second: the database's row is what both agree on).
                for row in &ch.legacy {
                    if state
                        .store
                        .last_seen(&row.hostname)
                        .is_some_and(|seen| seen > row.last_seen)
                    {
                        continue;
                    }
                    // Not queued for writing: the row is the database's already.
                    record_row(&*state.store, row);
                }
                state.boot.refresh(&ch.boot);
                for e in &ch.events {
                    state
                        .events
                        .record(&e.hostname, std::slice::from_ref(&e.event));
                }
                cursor = ch.cursor;
            }
            Err(e) => tracing::warn!(error = %e, "reading other replicas' changes failed"),
        }
    }
}

/// Keeps the tarballs' digests current: at start, after every reload, when a background
/// download finished, and every `shaRecheckSecs`.
async fn checksums(state: AppState, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = state.reloader.refresh_shas() => {}
            _ = stopped(&mut shutdown) => return,
        }
        let secs = state.current.load().config.sha_recheck_secs;
        // 0 turns rechecking off; a reload still wakes us.
        let wait = Duration::from_secs(if secs == 0 { 24 * 3600 } else { secs });
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = state.reloader.sha_wanted.notified() => {}
            _ = state.reloader.digests.learned.notified() => {}
            _ = stopped(&mut shutdown) => return,
        }
    }
}

/// Resolves once shutdown was asked for (at once if it already was). The guard
/// `wait_for` returns is dropped here, so callers' futures stay `Send`.
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Raises the soft open-file limit toward the hard one, as far as `maxConnections` plus
/// a margin for the store, the tarballs and the log needs, and warns when even the hard
/// limit is below that (connections past it would fail to be accepted instead of waiting).
fn open_file_limit(max_connections: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    const MARGIN: u64 = 128;
    let want = max_connections.saturating_add(MARGIN);
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft >= want {
        return;
    }
    let raised = want.min(hard);
    let now = if setrlimit(Resource::RLIMIT_NOFILE, raised, hard).is_ok() {
        raised
    } else {
        soft
    };
    if now < want {
        tracing::warn!(
            open_files = now,
            max_connections,
            "the open-file limit is below maxConnections plus {MARGIN}: lower maxConnections or raise the limit (LimitNOFILE= in the systemd unit)"
        );
    }
}

/// The binary: loads `path`, listens on `http.listen`, reloads on SIGHUP and shuts down
/// gracefully on SIGTERM or SIGINT.
pub async fn run(path: &Path) -> Result<(), RunError> {
    let loaded = config::load(path)?;
    for w in &loaded.warnings {
        tracing::warn!(config = %path.display(), problem = %w, "config warning");
    }
    let spec = loaded.config.store.clone();
    let loaded_pair = loaded.tls_pair.clone();
    let durable = persist::open(&spec).await?;
    let state = AppState::with_durable(
        path,
        loaded.config,
        std::sync::Arc::new(MemStore::new()),
        durable,
    );
    let l = load(&state).await?;
    tracing::info!(
        store = %spec,
        legacy_hosts = l.legacy_hosts,
        bootagent_hosts = l.boot_hosts,
        events = l.events,
        batches = l.batches,
        took_ms = l.took.as_millis() as u64,
        "fleet state loaded"
    );
    let cfg = state.current.load().config.clone();
    open_file_limit(cfg.max_connections);
    // Handlers before the socket: once a client can connect, SIGTERM means a clean stop.
    let mut hup = signal(SignalKind::hangup()).map_err(RunError::Signal)?;
    let mut term = signal(SignalKind::terminate()).map_err(RunError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(RunError::Signal)?;
    let plain = if cfg.http.enabled {
        let addr = config::listen_addr(&cfg.http.listen)
            .map_err(|e| RunError::Listen(format!("http.listen: {e}")))?;
        Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| RunError::Bind { addr, source })?,
        )
    } else {
        if cfg.tls.is_none() {
            tracing::warn!("http.enabled is false and there is no tls: not listening");
        }
        None
    };
    let tls = match (&cfg.tls, loaded_pair) {
        (Some(t), Some(pair)) => {
            let addr = config::listen_addr(&t.listen)
                .map_err(|e| RunError::Listen(format!("tls.listen: {e}")))?;
            tracing::info!(
                cert = %t.cert_file.display(),
                sha256 = %crate::tls::fingerprint(&pair),
                "tls certificate loaded"
            );
            state.reloader.certs.set(pair);
            Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| RunError::Bind { addr, source })?,
            )
        }
        _ => None,
    };
    let server = Server::start_with(state.clone(), Listeners { plain, tls }, l.cursor);
    tracing::info!(
        addr = ?server.local_addr(),
        tls_addr = ?server.tls_addr(),
        version = crate::VERSION,
        config = %path.display(),
        agents = cfg.agents.len(),
        "ops-meta started"
    );
    loop {
        tokio::select! {
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading config");
                // Errors are logged by the reloader; the running config stays.
                let _ = state.reloader.reload().await;
            }
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break; }
        }
    }
    server.stop().await;
    tracing::info!("stopped");
    Ok(())
}
