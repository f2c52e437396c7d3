//! Staged rollouts: the operator API's shapes (`/api/rollouts...`) shared by ops-meta and
//! `opsctl`.
//!
//! A rollout moves one agent to one version across waves of hosts. A host is *admitted*
//! when ops-meta starts handing it the target version (legacy answer or BootAgent job),
//! and counts as *healthy* only after it ran that version, without a restart, for
//! `minHealthySecs`. Failures are classified: what the release causes counts toward the
//! error threshold, what the infrastructure causes is reported apart and does not.
//!
//! Requests are parsed leniently (missing fields take their defaults) so the server can
//! name what is wrong in one answer.

use serde::{Deserialize, Serialize};

/// Defaults of a [`RolloutSpec`]'s optional numbers.
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 10;
pub const DEFAULT_MIN_HEALTHY_SECS: u64 = 60;
pub const DEFAULT_HEALTHY_DEADLINE_SECS: u64 = 900;
pub const DEFAULT_MISSING_AFTER_SECS: u64 = 300;
/// Most waves one rollout may have.
pub const MAX_WAVES: usize = 32;
/// Most prefixes or tags one wave may name.
pub const MAX_SELECTORS: usize = 64;
/// Sample hostnames shown per wave in a plan or a status.
pub const SAMPLE_HOSTS: usize = 5;

/// The buckets a percentage wave is cut from: a host's bucket is
/// [`percent_bucket`] of its hostname, in `0..PERCENT_BUCKETS`.
pub const PERCENT_BUCKETS: u64 = 10_000;

/// A host's stable bucket for percentage waves: the first 8 bytes of the SHA-256 of its
/// hostname, big-endian, modulo [`PERCENT_BUCKETS`]. Every replica (and `opsctl`)
/// computes the same bucket, and a host keeps it as the fleet grows. A wave of `percent`
/// P holds the hosts whose bucket is below `P * 100` that no earlier wave took.
pub fn percent_bucket(hostname: &str) -> u64 {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(hostname.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_be_bytes(b) % PERCENT_BUCKETS
}

/// The bucket bound of a percentage: hosts with a bucket below it are in.
pub fn percent_bound(percent: f64) -> u64 {
    ((percent.clamp(0.0, 100.0) * (PERCENT_BUCKETS as f64) / 100.0).round()) as u64
}

/// `POST /api/rollouts` and `POST /api/rollouts/plan` body.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// The agent, as named in `cfg.json`.
    #[serde(default)]
    pub agent: String,
    /// The target version.
    #[serde(default)]
    pub version: String,
    /// Base URL of the tarball (the folder the `<agent>-<version>.tar.gz` is in); the
    /// agent's `cfg.json` default `tarball` when empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tarball: String,
    /// The tarball's SHA-256 (hex), when the operator knows it; else ops-meta learns it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sha256: String,
    /// The waves in order. Hosts in no wave are left alone.
    #[serde(default)]
    pub waves: Vec<WaveSpec>,
    /// Most admitted hosts that are not healthy yet (nor failed), at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
    /// Seconds a host must run the new version without a restart to count as upgraded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_healthy_secs: Option<u64>,
    /// Seconds from admission by which a host must be healthy; past it, it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_deadline_secs: Option<u64>,
    /// Seconds without a report after which a host of a started wave is `missing`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing_after_secs: Option<u64>,
    /// Pause when this many hosts of one wave failed (release failures plus missing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_failures: Option<u32>,
    /// Pause when this share (0–100) of one wave's hosts failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_failure_percent: Option<f64>,
    /// Wait for an operator's `approve` before each wave after the first.
    #[serde(default)]
    pub approval: bool,
    /// Admit hosts only inside this window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<WindowSpec>,
    /// Start at once (`POST /api/rollouts` only); otherwise the rollout waits in
    /// `planned` for `start`.
    #[serde(default)]
    pub start: bool,
}

/// One wave: hosts by hostname prefix, by tag, or a stable share of the fleet. Exactly
/// one of `prefixes`, `tags` and `percent` is given.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WaveSpec {
    /// Shown in status; `wave-N` when empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Hosts whose name starts with any of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefixes: Vec<String>,
    /// Hosts carrying any of these tags (`key=value`, as `tagRules` give them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Hosts whose [`percent_bucket`] is below `percent * 100`, cumulative: `1`, then
    /// `10`, then `100` is one percent, then up to ten, then everything left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
}

/// When hosts may be admitted: every day (or the given days) from `start` to `end`,
/// `HH:MM` in UTC; `end` before `start` crosses midnight.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WindowSpec {
    /// `mon`..`sun`; every day when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub days: Vec<String>,
    #[serde(default)]
    pub start: String,
    #[serde(default)]
    pub end: String,
}

/// A rollout's state.
pub const STATE_PLANNED: &str = "planned";
pub const STATE_RUNNING: &str = "running";
pub const STATE_PAUSED: &str = "paused";
pub const STATE_COMPLETED: &str = "completed";
pub const STATE_ABORTED: &str = "aborted";
/// A rollback rollout finished taking this one's hosts back.
pub const STATE_ROLLED_BACK: &str = "rolled_back";
/// A later rollout of the same agent took over its hosts.
pub const STATE_SUPERSEDED: &str = "superseded";

/// A host's phase in a rollout.
pub const PHASE_PENDING: &str = "pending";
pub const PHASE_IN_FLIGHT: &str = "in_flight";
pub const PHASE_HEALTHY: &str = "healthy";
/// The release failed on it (did not start, crash-looped to `fatal`, OOM-killed, rolled
/// back on the host, never healthy by the deadline): counts toward the threshold.
pub const PHASE_FAILED: &str = "failed";
/// The infrastructure failed it (download, disk, checksum, signature): shown apart, does
/// not count, and the host keeps trying.
pub const PHASE_INFRA_FAILED: &str = "infra_failed";
/// Stopped reporting during its wave: counts toward the threshold.
pub const PHASE_MISSING: &str = "missing";

/// What holds a rollout, as data; `text` says it in words.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hold {
    /// `not_started`, `paused`, `threshold`, `approval`, `window`, `healthy_time`,
    /// `in_flight`, `missing`, `digest`, `infra`.
    pub kind: String,
    pub text: String,
    /// Hosts it is about (a sample, at most [`SAMPLE_HOSTS`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// How many hosts it is about.
    #[serde(default)]
    pub count: u64,
}

/// Hosts per phase.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PhaseCounts {
    pub pending: u64,
    pub in_flight: u64,
    pub healthy: u64,
    pub failed: u64,
    pub infra_failed: u64,
    pub missing: u64,
}

impl PhaseCounts {
    pub fn total(&self) -> u64 {
        self.pending
            + self.in_flight
            + self.healthy
            + self.failed
            + self.infra_failed
            + self.missing
    }
}

/// One wave as a plan or a status shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WaveView {
    pub index: usize,
    pub name: String,
    /// `waiting`, `active`, `done`.
    pub state: String,
    pub hosts: u64,
    pub counts: PhaseCounts,
    /// Some of its hosts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sample: Vec<String>,
    /// Release failures plus missing hosts at which the rollout pauses (0: no threshold).
    pub failure_limit: u64,
}

/// A failed host and why.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostFailure {
    pub host: String,
    /// `failed`, `infra_failed` or `missing`.
    pub phase: String,
    pub reason: String,
    pub wave: usize,
}

/// `POST /api/rollouts/plan` answer: what a rollout would do, stored nowhere.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutPlan {
    pub agent: String,
    pub version: String,
    /// The version `cfg.json` gives most hosts today (what a rollback goes back to).
    pub from_version: String,
    pub tarball_url: String,
    pub waves: Vec<WaveView>,
    /// Known hosts in no wave: the rollout leaves them alone.
    pub outside: u64,
    /// Problems that would hold the rollout (no digest known yet, an empty wave...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// A rollout as `GET /api/rollouts/{id}` (and every action) answers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutView {
    pub id: String,
    pub agent: String,
    pub version: String,
    pub from_version: String,
    pub tarball_url: String,
    /// SHA-256 handed to hosts, once known.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sha256: String,
    /// `<tarball>.minisig` when ops-meta serves one beside the tarball.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub signature_url: String,
    pub state: String,
    /// Why it is paused (operator, or the threshold in words).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub paused_reason: String,
    /// The wave being worked on.
    pub current_wave: usize,
    pub waves: Vec<WaveView>,
    pub counts: PhaseCounts,
    /// What keeps it from moving, most important first; empty when it moves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holds: Vec<Hold>,
    /// Failed, infra-failed and missing hosts (at most 100), with reasons.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<HostFailure>,
    pub spec: RolloutSpec,
    /// The rollout this one rolls back, or that rolled this one back.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub rollback_of: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub rolled_back_by: String,
    /// Seconds since the epoch.
    pub created: i64,
    pub updated: i64,
    /// Once completed: the `cfg.json` change that makes it permanent, in words.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub permanent: String,
}

/// `GET /api/rollouts` answer, newest first.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutList {
    pub rollouts: Vec<RolloutView>,
}

/// `POST /api/rollouts/{id}/pause` body (optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PauseRequest {
    #[serde(default)]
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_stable_and_spread() {
        // Fixed forever: replicas and opsctl of any version must agree.
        assert_eq!(percent_bucket("web-01"), 87);
        let n = 20_000;
        let under_10 = (0..n)
            .filter(|i| percent_bucket(&format!("host-{i}")) < percent_bound(10.0))
            .count();
        assert!((1_700..2_300).contains(&under_10), "{under_10}");
        assert_eq!(percent_bound(100.0), PERCENT_BUCKETS);
        assert_eq!(percent_bound(0.5), 50);
    }
}
