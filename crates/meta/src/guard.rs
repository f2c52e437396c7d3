//! The protection stack every request goes through, the heartbeat answered from the
//! connection and the router alike: a cap on open connections (at the accept loop), then
//! per request the admission checks and the `requestTimeoutSecs` deadline, then the
//! handler ([`Guard::serve`]). The router's in-process form ([`crate::app`]) runs the same
//! [`Guard::serve`] as a middleware, so tests that drive the router see the same limits.
//!
//! Why not a `tower::ServiceBuilder` of boxed layers: the heartbeat is nearly all of the
//! traffic and its answer is usually ready at the first poll; a deadline that only starts
//! a timer when the handler is not done at once, and a guard owned by its connection (its
//! config snapshot refreshed by the reload generation, no shared reference count touched
//! per request), cost a heartbeat nothing measurable (docs/benchmarks.md, S7).

use std::cell::Cell;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::http::{AppError, AppState};

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

    /// `fut`, the handler's answer, bounded by `requestTimeoutSecs` (reading the body
    /// included; streaming a body after the answer's head is not counted): 408 past it.
    pub fn deadline<Fut>(&self, fut: Fut) -> impl Future<Output = Response>
    where
        Fut: Future<Output = Response>,
    {
        deadline(self.timeout_secs(), fut)
    }
}

/// Waits for `fut`, at most `secs` seconds. Almost always the answer is ready at the
/// first poll (the body came with the head): then no timer is set up at all; otherwise
/// the limit counts from then, a few microseconds after the request arrived.
async fn deadline<Fut: Future<Output = Response>>(secs: u64, fut: Fut) -> Response {
    let mut fut = pin!(fut);
    match poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await {
        Poll::Ready(r) => r,
        Poll::Pending => match tokio::time::timeout(Duration::from_secs(secs), fut).await {
            Ok(r) => r,
            Err(_) => AppError::Timeout { secs }.into_response(),
        },
    }
}

/// The guard as the router's middleware (for [`crate::app`] driven in-process): the same
/// checks and deadline, with the peer the request carries.
pub(crate) async fn middleware(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    Guard::new(st, peer).deadline(next.run(req)).await
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
