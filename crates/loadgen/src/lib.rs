//! `ops-loadgen`: a simulated fleet of hosts that drives an ops-meta over the legacy
//! heartbeat or the BootAgent status protocol, for benchmarks.
//!
//! Hosts are named from an index (`sim-000000123`), so a run can simulate millions of
//! them without storing their names. Each worker owns one keep-alive connection. Three
//! modes: [`run::Mode::Closed`] (as fast as the server answers), [`run::Mode::Open`] (a
//! fixed rate, latency from the intended send time) and [`run::Mode::Converge`] (hosts
//! heartbeat on their own phase and act on the answers, to time a rollout).

pub mod client;
pub mod error;
pub mod failure;
pub mod fleet;
pub mod run;
pub mod stats;
pub mod wire;

pub use error::{ConfigError, RunError};
pub use run::{run, ConvergeSpec, Mode, Settings};
pub use stats::Report;
