//! What the daemon knows about itself and each agent, shared between the main loop, the
//! per-agent workers and the local `/status` endpoint.
//!
//! This is a view for operators, not a source of truth: the real state of an agent is read
//! from `control status` and `.version` every round. The JSON shape of `/status` is local to
//! this host (no other program parses it), so it lives here rather than in `proto`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use proto::names::AgentName;
use serde::Serialize;

use crate::events::Journal;

/// Unix seconds now.
pub fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The result of the last action on an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    Failed,
    /// Rolled back to the previous version after the new one failed to start.
    RolledBack,
}

/// One agent as shown on `/status`.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentView {
    pub name: String,
    /// Content of `.version`, if any.
    pub current_version: Option<String>,
    /// Last `control status` result (wire form: `started`, `stoped` or an error text).
    pub status: Option<String>,
    /// When `status` was read (Unix seconds).
    pub status_at: Option<i64>,
    /// Desired version from the last heartbeat answer.
    pub desired_version: Option<String>,
    /// Desired cmd from the last heartbeat answer.
    pub desired_cmd: Option<String>,
    /// True while an action (download, switch) is in progress.
    pub busy: bool,
    /// What was done last, e.g. `upgrade 1.0.0 -> 1.1.0`.
    pub last_action: Option<String>,
    pub last_result: Option<Outcome>,
    pub last_error: Option<String>,
    /// When the last action ended (Unix seconds).
    pub last_action_at: Option<i64>,
    /// The version held back by a back-off, with its failure count and next try.
    pub backoff: Option<BackoffView>,
    /// Resource limits, as the server set them (a job or the legacy answer's extension).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, String>,
    /// `fatal` or `killed` while the supervisor holds the agent (it then reports this
    /// instead of what `control status` says).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub supervisor: Option<String>,
    /// Restarts by the supervisor since ops-updater started.
    pub restarts: u32,
    /// The cause of the last abnormal exit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
    /// `limits not enforced: <reason>` when the agent has limits that cannot be applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limits_note: Option<String>,
    /// The agent's cgroup, when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
}

/// A version that failed and is not retried before `next_retry_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackoffView {
    pub version: String,
    pub tarball_url: String,
    /// Download/checksum failures in a row, or 1 for a failed start.
    pub failures: u32,
    /// Unix seconds of the next attempt.
    pub next_retry_at: i64,
    pub reason: String,
}

/// The daemon's own state.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DaemonView {
    pub hostname: String,
    pub server: String,
    pub version: &'static str,
    pub heartbeats_ok: u64,
    pub heartbeats_failed: u64,
    pub last_heartbeat_at: Option<i64>,
    pub last_heartbeat_error: Option<String>,
    /// The server's `errorMessage`, when the last answer carried one.
    pub server_error: Option<String>,
    /// The protocol in use: `legacy`, `bootagent`, or `legacy (fallback)` in `auto` mode.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub protocol: String,
    /// The BootAgent serial, in BootAgent mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agentsn: Option<String>,
    /// Where a self-upgrade stands (a trial's good rounds, a roll-back and why).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub self_upgrade: Option<String>,
}

/// Everything `/status` shows.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StatusView {
    pub daemon: DaemonView,
    pub agents: Vec<AgentView>,
}

#[derive(Debug, Default)]
struct Inner {
    daemon: DaemonView,
    agents: BTreeMap<AgentName, AgentView>,
}

/// Shared, cheap to clone. Locks are held only for field updates, never across an await.
#[derive(Debug, Clone, Default)]
pub struct Shared {
    inner: Arc<Mutex<Inner>>,
    /// The agent events of this host; in memory only unless [`Shared::with_journal`] set
    /// the one on disk.
    journal: Journal,
    /// The counters of `GET /metrics`.
    metrics: Arc<crate::metrics::Metrics>,
}

impl Shared {
    pub fn new(hostname: &str, server: &str) -> Shared {
        let s = Shared::default();
        {
            let mut g = s.lock();
            g.daemon.hostname = hostname.to_string();
            g.daemon.server = server.to_string();
            g.daemon.version = crate::selfup::VERSION;
        }
        s
    }

    /// The same state with `journal` as its event journal. Call it before the state is
    /// cloned: clones made earlier keep the journal they had.
    pub fn with_journal(mut self, journal: Journal) -> Shared {
        self.journal = journal;
        self
    }

    /// The event journal: where agent events are pushed, and read from for the reports
    /// and `GET /events`.
    pub fn events(&self) -> &Journal {
        &self.journal
    }

    /// The counters of `GET /metrics`, bumped where things happen.
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves plain data behind; keep serving it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Updates the daemon's own view.
    pub fn daemon(&self, f: impl FnOnce(&mut DaemonView)) {
        f(&mut self.lock().daemon)
    }

    /// Updates (creating if needed) one agent's view.
    pub fn agent(&self, name: &AgentName, f: impl FnOnce(&mut AgentView)) {
        let mut g = self.lock();
        let v = g.agents.entry(name.clone()).or_insert_with(|| AgentView {
            name: name.to_string(),
            ..Default::default()
        });
        f(v)
    }

    /// A copy of one agent's view.
    pub fn get_agent(&self, name: &str) -> Option<AgentView> {
        self.lock().agents.get(name).cloned()
    }

    pub fn snapshot(&self) -> StatusView {
        let g = self.lock();
        StatusView {
            daemon: g.daemon.clone(),
            agents: g.agents.values().cloned().collect(),
        }
    }
}
