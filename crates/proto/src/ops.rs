//! The operator API of ops-meta (`/api/...`): queueing BootAgent jobs for a set of hosts,
//! following a batch of jobs, and looking at hosts.
//!
//! Requests are parsed leniently (missing fields take their zero value) so that the server
//! can name the field that is missing or wrong in its error.

use serde::{Deserialize, Serialize};

use crate::bootagent::AgentStatus;

/// `POST /api/jobs` body: one job per selected host. Exactly one of `hosts`, `prefix` and
/// `tag` selects the hosts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobsRequest {
    /// `restart`, `stop`, `uninstall` or `config`.
    #[serde(default)]
    pub action: String,
    /// The agent (all actions but `config`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// `config`: extra servers, `IP:PORT,IP:PORT`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub svrlist: String,
    /// `config`: new report step in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    /// Hostnames.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<String>>,
    /// Every registered host whose name starts with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Every registered host carrying all these tags (`key=value[,key=value]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

/// One job queued by `POST /api/jobs`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedJob {
    pub host: String,
    pub agentsn: String,
    /// The job id the host will report its result under.
    pub id: String,
}

/// A selected host that got no job, and why.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedHost {
    pub host: String,
    pub reason: String,
}

/// `POST /api/jobs` answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobsResponse {
    /// Batch id, for `GET /api/jobs/<id>`.
    pub id: String,
    pub jobs: Vec<QueuedJob>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<SkippedHost>,
}

/// Where one job of a batch stands.
pub const JOB_PENDING: &str = "pending";
/// The host reported errcode 0.
pub const JOB_DONE: &str = "done";
/// The host reported a non-zero errcode.
pub const JOB_FAILED: &str = "failed";
/// The server no longer knows the job: the host was forgotten or re-registered under a
/// serial that dropped it, or the result was pushed out of the kept results.
pub const JOB_LOST: &str = "lost";

/// One host's job in `GET /api/jobs/<id>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchJob {
    pub host: String,
    pub agentsn: String,
    pub id: String,
    /// One of `JOB_*`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errcode: Option<i32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Unix seconds at which the result came back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<i64>,
}

/// `GET /api/jobs/<id>` answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchStatus {
    pub id: String,
    pub action: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Unix seconds.
    pub created: i64,
    pub jobs: Vec<BatchJob>,
}

/// A job a host has been given and not yet answered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingJob {
    pub id: String,
    pub action: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
    /// `derived` (from the desired state) or `operator`.
    pub origin: String,
    /// Unix seconds at which it was queued.
    pub created: i64,
    /// How many status answers carried it so far.
    pub sent: u32,
}

/// A job result a host reported.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobOutcome {
    pub id: String,
    pub action: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
    pub errcode: i32,
    pub message: String,
    /// Unix seconds at which the result came back.
    pub finished: i64,
}

/// One host in `GET /api/hosts` and `GET /api/hosts/<hostname>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostView {
    pub hostname: String,
    pub agentsn: String,
    pub tags: String,
    /// [`PROTOCOL_BOOTAGENT`] or [`PROTOCOL_LEGACY`].
    pub protocol: String,
    /// Unix seconds (server clock) of the registration.
    pub registered: i64,
    /// Unix seconds (server clock) of the last status report; 0 when none came yet.
    pub last_seen: i64,
    /// The host agent's own uptime, version and report step, as last reported.
    pub uptime: u64,
    pub step: u64,
    pub version: String,
    pub agents: Vec<AgentStatus>,
    pub pending: Vec<PendingJob>,
    /// Most recent last.
    pub results: Vec<JobOutcome>,
    /// Agents derivation keeps off until the desired state changes or `POST /api/retry`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocked: Vec<BlockedAgent>,
    /// Agents whose desired state asks for a job that the server cannot hand out now, with
    /// why, as of the host's last report (`waiting: no checksum for ... yet`, a full queue,
    /// an earlier failure or an operator hold).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting: Vec<crate::bootagent::Waiting>,
    /// Agent events the server keeps for this host (at most its per-host bound).
    #[serde(default)]
    pub event_count: usize,
    /// The newest of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event: Option<crate::events::Event>,
    /// `GET /api/hosts/<hostname>` only: every event kept, newest last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<crate::events::Event>,
}

/// [`HostView::protocol`] of a host that reports with the legacy heartbeat.
pub const PROTOCOL_LEGACY: &str = "legacy";
/// [`HostView::protocol`] of a BootAgent host.
pub const PROTOCOL_BOOTAGENT: &str = "bootagent";

/// An agent no job is derived for, and why.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockedAgent {
    pub name: String,
    /// `failed` (a derived job failed) or `held` (an operator stopped or uninstalled it).
    pub reason: String,
}

/// `GET /api/hosts` answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostsResponse {
    pub hosts: Vec<HostView>,
}

/// `POST /api/retry` body: forget failed derived jobs and operator holds, so that the
/// desired state is derived again at the next report. One selector, as for jobs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryRequest {
    /// Only this agent; empty means all.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

/// `POST /api/retry` answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryResponse {
    /// Hosts selected.
    pub hosts: usize,
    /// Failures and holds forgotten.
    pub cleared: usize,
}

/// One operator action as `GET /api/audit` shows it (and the store keeps it): who, what,
/// which hosts, when, from where, and how it ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntry {
    /// Rises with every entry of the store; `before` of the next page.
    pub id: i64,
    /// Unix seconds (server clock) when the request arrived.
    pub time: i64,
    /// The token's name; `loopback` when no token is configured; empty when the request
    /// carried no known token (it was refused).
    pub actor: String,
    /// The caller's address, `IP:PORT`.
    pub peer: String,
    pub method: String,
    pub path: String,
    /// What was asked: `jobs.create`, `retry`, `config.reload`, `hosts.readmit`, or
    /// `METHOD PATH` for a request no action is named for.
    pub action: String,
    /// The selector the request named (`hosts web-1,web-2`, `prefix web`, `tag svc=web`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub target: String,
    /// Hosts the action touched (at most [`AUDIT_MAX_HOSTS`]; `hostCount` counts all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub host_count: usize,
    /// The HTTP status answered; 0 while the action runs (or when ops-meta stopped before
    /// it ended: the outcome is then unknown).
    pub status: u16,
    /// A short text: `ok`, what was done, or why it was refused.
    pub outcome: String,
}

/// Most hostnames one audit entry lists.
pub const AUDIT_MAX_HOSTS: usize = 1000;

/// `GET /api/audit` answer: newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditResponse {
    pub entries: Vec<AuditEntry>,
}

/// `POST /api/hosts/{hostname}/readmit` answer: the host's credential is forgotten, and its
/// next registration is admitted and given a new one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadmitResponse {
    pub hostname: String,
    /// The serial the host is registered under (a registration may replace it).
    pub agentsn: String,
    /// False when the host held no credential already.
    #[serde(rename = "hadCredential")]
    pub had_credential: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_request_is_lenient_and_round_trips() {
        let r: JobsRequest = serde_json::from_str(
            r#"{"action":"config","svrlist":"a:1","step":60,"tag":"svc=web"}"#,
        )
        .unwrap();
        assert_eq!(r.action, "config");
        assert_eq!(r.step, Some(60));
        assert_eq!(r.tag.as_deref(), Some("svc=web"));
        assert!(r.hosts.is_none() && r.prefix.is_none() && r.name.is_empty());
        let back: JobsRequest = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        assert_eq!(
            serde_json::from_str::<JobsRequest>("{}").unwrap(),
            JobsRequest::default()
        );
    }
}
