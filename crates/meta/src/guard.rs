//! The protection stack every request goes through, the heartbeat answered from the
//! connection and the router alike: a cap on open connections (at the accept loop), then
//! per request admission ([`crate::http::auth::admit`]: operator tokens and roles, or
//! the loopback rules without tokens, and the audit log of every mutation), then the
//! `requestTimeoutSecs` deadline, then the handler ([`Guard::route`],
//! [`Guard::heartbeat`]); its answer is counted by endpoint kind and status
//! ([`crate::metrics::count_request`], one relaxed atomic add). The router's in-process form ([`crate::app`]) runs the same steps
//! as a middleware, so tests that drive the router see the same checks and limits.
//!
//! Why not a `tower::ServiceBuilder` of boxed layers: the heartbeat is nearly all of the
//! traffic and its answer is usually ready at the first poll; a deadline that only starts
//! a timer when the handler is not done at once, and a guard owned by its connection (its
//! config snapshot refreshed by the reload generation, no shared reference count touched
//! per request), with the handler's future made inside the guard's own, cost a heartbeat
//! 3 % of its instructions (docs/benchmarks.md, "The protection stack beside the old fast
//! path").

use std::cell::Cell;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures_util::FutureExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt;

use crate::http::{auth, AppError, AppState, HeartbeatConn};
use crate::metrics::{self, Endpoint};

/// One connection's guard: the state, the peer, and the limits of the config snapshot it
/// last read (re-read when a reload bumps the generation).
pub struct Guard {
    state: AppState,
    peer: Option<SocketAddr>,
    /// (generation, requestTimeoutSecs) of the snapshot last read.
    limits: Cell<(u64, u64)>,
}

impl Guard {
    /// The guard of a connection from `peer` (`None`: not from a socket, trusted as
    /// little as possible).
    pub fn new(state: AppState, peer: Option<SocketAddr>) -> Guard {
        let limits = Cell::new(Self::read(&state));
        Guard {
            state,
            peer,
            limits,
        }
    }

    fn read(state: &AppState) -> (u64, u64) {
        let generation = state.current.generation();
        (generation, state.current.load().config.request_timeout_secs)
    }

    /// `requestTimeoutSecs` of the current config.
    fn timeout_secs(&self) -> u64 {
        let (generation, secs) = self.limits.get();
        if generation == self.state.current.generation() {
            return secs;
        }
        let now = Self::read(&self.state);
        self.limits.set(now);
        now.1
    }

    /// The peer address the connection came from.
    pub fn peer(&self) -> Option<SocketAddr> {
        self.peer
    }

    /// The heartbeat answered from the connection (`hb`), bounded by `requestTimeoutSecs`
    /// (reading the body included): 408 past it. It is a host endpoint, which admission
    /// lets through untouched ([`crate::http::auth::is_host_endpoint`]), so it is not
    /// asked. The handler's future is made inside the guard's own (every layer of `async`
    /// around a finished future is one more copy of it per request).
    pub fn heartbeat<B>(
        &self,
        req: hyper::Request<B>,
        hb: &HeartbeatConn,
    ) -> impl Future<Output = Response> + Send
    where
        B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let ctx = hb.prepare();
        bounded(Some(Endpoint::Heartbeat), self.timeout_secs(), move || {
            ctx.serve(req)
        })
    }

    /// `req` through the whole stack into `router`: admission (operator tokens or the
    /// loopback rules, the audit log of mutations), then the deadline, then the router.
    pub fn route<B>(&self, req: hyper::Request<B>, router: Router) -> impl Future<Output = Response>
    where
        B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<axum::BoxError>,
    {
        let secs = self.timeout_secs();
        let state = self.state.clone();
        let endpoint = Endpoint::of(req.uri().path());
        let mut req = req.map(Body::new);
        if let Some(peer) = self.peer {
            req.extensions_mut().insert(ConnectInfo(peer));
        }
        let answer = move |r| {
            deadline(
                secs,
                router.oneshot(r).map(|r| r.unwrap_or_else(|e| match e {})),
            )
        };
        counted(
            endpoint,
            async move { auth::admit(&state, req, answer).await },
        )
    }
}

/// `fut`'s answer, counted in [`crate::metrics`] by endpoint kind and status: one relaxed
/// add once it is ready.
async fn counted(endpoint: Endpoint, fut: impl Future<Output = Response>) -> Response {
    let r = fut.await;
    metrics::count_request(endpoint, r.status());
    r
}

/// Waits for `fut`, at most `secs` seconds. Almost always the answer is ready at the
/// first poll (the body came with the head): then no timer is set up at all; otherwise
/// the limit counts from then, a few microseconds after the request arrived.
async fn deadline<Fut: Future<Output = Response>>(secs: u64, fut: Fut) -> Response {
    bounded(None, secs, || fut).await
}

/// [`deadline`] of the future `make` makes, and its answer counted under `endpoint` when
/// given.
async fn bounded<F, Fut>(endpoint: Option<Endpoint>, secs: u64, make: F) -> Response
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Response>,
{
    let mut fut = pin!(make());
    let r = match poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await {
        Poll::Ready(r) => r,
        Poll::Pending => match tokio::time::timeout(Duration::from_secs(secs), fut).await {
            Ok(r) => r,
            Err(_) => AppError::Timeout { secs }.into_response(),
        },
    };
    if let Some(e) = endpoint {
        metrics::count_request(e, r.status());
    }
    r
}

/// The guard as the router's middleware (for [`crate::app`] driven in-process): the same
/// checks and deadline, with the peer the request carries.
pub(crate) async fn middleware(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let secs = Guard::new(st.clone(), peer).timeout_secs();
    let endpoint = Endpoint::of(req.uri().path());
    counted(
        endpoint,
        auth::admit(&st, req, |r| deadline(secs, next.run(r))),
    )
    .await
}

/// The cap on open connections (`maxConnections`): the accept loop takes a permit before
/// it accepts, so at the cap new connections wait in the kernel's listen backlog (and
/// time out there on the client's side) instead of costing a task, buffers and a file
/// descriptor each.
#[derive(Clone)]
pub struct ConnectionCap {
    permits: Arc<Semaphore>,
    max: usize,
    /// Times the accept loop found every permit taken.
    pub saturated: Arc<AtomicU64>,
}

impl ConnectionCap {
    pub fn new(max: usize) -> ConnectionCap {
        ConnectionCap {
            permits: Arc::new(Semaphore::new(max)),
            max,
            saturated: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.max - self.permits.available_permits()
    }

    /// The most connections open at once.
    pub fn max(&self) -> usize {
        self.max
    }

    /// A permit for one more connection, waiting (and saying so once per spell) while
    /// the cap is reached.
    pub async fn acquire(&self) -> OwnedSemaphorePermit {
        if let Ok(p) = self.permits.clone().try_acquire_owned() {
            return p;
        }
        self.saturated.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            max = self.max,
            "maxConnections connections are open: new connections wait until one closes"
        );
        self.permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }
}
