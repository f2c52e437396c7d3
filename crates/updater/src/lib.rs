//! ops-updater as a library: the host daemon that keeps each agent at its desired version.
//! The binary (`main.rs`) only parses flags and calls into these modules.

pub mod artifact;
pub mod control;
pub mod fsx;
pub mod process;

// The daemon: config, main loop, per-agent workers, heartbeat client, local endpoint.
pub mod agent;
pub mod config;
pub mod daemon;
pub mod heartbeat;
pub mod http;
pub mod state;

// BootAgent mode (register, status reports, jobs) and the protocol choice.
pub mod boot;
