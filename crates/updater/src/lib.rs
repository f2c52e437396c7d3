//! ops-updater as a library: the host daemon that keeps each agent at its desired version.
//! The binary (`main.rs`) only parses flags and calls into these modules.

pub mod artifact;
pub mod control;
pub mod fsx;
pub mod process;
pub mod workdir;

// The daemon: config, main loop, per-agent workers, heartbeat client, local endpoint.
pub mod agent;
pub mod config;
pub mod daemon;
pub mod heartbeat;
pub mod http;
pub mod logcap;
pub mod state;

// BootAgent mode (register, status reports, jobs) and the protocol choice.
pub mod boot;

/// An error with its causes, `a: b: c`, each cause once: reqwest's own Display stops at
/// "error sending request", which hides a refused connection or certificate.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}
