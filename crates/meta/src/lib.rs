//! ops-meta: the server every host talks to. It holds the desired state (`cfg.json`),
//! answers the original heartbeat protocol, records what every host reports, and serves
//! the agent tarballs.
//!
//! Entry points: [`run`] for the binary; [`Server::start_local`] (or [`Server::start`]
//! with an [`AppState`]) to serve in-process; [`app`] for `oneshot` tests.

pub mod boot;
pub mod config;
pub mod desired;
pub mod digests;
pub mod events;
pub mod guard;
pub mod http;
pub mod metrics;
pub mod persist;
pub mod rollout;
pub mod server;
pub mod state;
pub mod store;
pub mod tarfs;
pub mod tls;
pub mod wire;

pub use http::{app, AppError};
pub use server::{run, RunError, Server};
pub use state::AppState;
pub use store::{FleetStore, MemStore};

/// The version string `-v` and `GET /version` print.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
