//! A rollout as held in memory and in the store: its head (spec, state, decisions) and
//! the hosts it admitted; checking a spec.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use proto::rollout::*;

use crate::desired::Desired;
use crate::persist::{RolloutHostRow, RolloutRecord, RolloutRow};

/// A wave index that means "in no wave".
pub const OUTSIDE: u16 = u16::MAX;

/// Where a host is in a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Pending,
    InFlight,
    Healthy,
    Failed,
    InfraFailed,
    Missing,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => PHASE_PENDING,
            Phase::InFlight => PHASE_IN_FLIGHT,
            Phase::Healthy => PHASE_HEALTHY,
            Phase::Failed => PHASE_FAILED,
            Phase::InfraFailed => PHASE_INFRA_FAILED,
            Phase::Missing => PHASE_MISSING,
        }
    }
}

/// A host's record, kept once the rollout admitted it (or found it missing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostRec {
    pub wave: u16,
    pub phase: Phase,
    /// When it was admitted (Unix seconds); 0 when it never was (missing before).
    pub admitted: i64,
    /// Since when it runs the new version without a restart, as far as ops-meta saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_since: Option<i64>,
    /// The host's events up to this seq were looked at.
    #[serde(default)]
    pub seq: u64,
    /// When ops-meta last saw the agent restart (an `exited`/`restarted` event): healthy
    /// time never counts from before it, whatever uptime the host reports.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub restarted_at: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// The head: everything but the hosts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Body {
    pub id: String,
    pub agent: String,
    pub version: String,
    pub from_version: String,
    /// The tarball base the previous version came from (the config's default).
    pub from_tarball: String,
    pub tarball_url: String,
    pub spec: RolloutSpec,
    pub state: String,
    #[serde(default)]
    pub paused_reason: String,
    /// The highest wave index an operator approved (approval rollouts).
    #[serde(default)]
    pub approved: usize,
    /// Per wave, the failures an operator's `resume` accepted.
    #[serde(default)]
    pub accepted: Vec<u64>,
    #[serde(default)]
    pub rollback_of: String,
    #[serde(default)]
    pub rolled_back_by: String,
    /// A rollback's scope: only the hosts this rollout admitted.
    #[serde(default)]
    pub scope: Option<String>,
    /// Its pins were let go (`cfg.json` caught up, or another rollout took its hosts).
    #[serde(default)]
    pub retired: bool,
    pub created: i64,
    pub updated: i64,
}

/// A rollout: its head, its revision in the store, the hosts it admitted (durable) and
/// which wave every known host is in (computed here, kept in memory only).
#[derive(Debug, Clone)]
pub struct Rollout {
    pub body: Body,
    pub rev: i64,
    pub hosts: HashMap<Box<str>, HostRec>,
    pub assign: HashMap<Box<str>, u16>,
    /// The fleet's host count and the time at the last look for new hosts.
    pub discovered: Option<(usize, i64)>,
    /// The config a completed rollout last compared its hosts with (kept, so that a
    /// new config can never be taken for it).
    pub baseline_checked: Option<std::sync::Arc<crate::config::Config>>,
}

impl Rollout {
    /// A new rollout from `spec`, checked against the config: every problem in one text.
    pub fn create(
        spec: &RolloutSpec,
        desired: &Desired,
        from_version: String,
        now: i64,
    ) -> Result<Rollout, String> {
        let mut problems = Vec::new();
        let agent = spec.agent.trim();
        let baseline = desired.baseline(agent, "");
        if agent.is_empty() {
            problems.push("agent: missing".to_string());
        } else if baseline.is_none() {
            problems.push(format!(
                "agent: {agent:?} is not an agent of cfg.json (with a default)"
            ));
        }
        if let Err(e) = proto::Version::parse(&spec.version) {
            problems.push(format!("version: {e}"));
        }
        if !spec.tarball.is_empty() {
            match url::Url::parse(&spec.tarball) {
                Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
                _ => problems.push(format!(
                    "tarball: {:?} is not an http(s) URL",
                    proto::clean_text(&spec.tarball, 100)
                )),
            }
        }
        let hex64 = spec.sha256.len() == 64 && spec.sha256.bytes().all(|b| b.is_ascii_hexdigit());
        if !spec.sha256.is_empty() && !hex64 {
            problems.push("sha256: not 64 hex digits".to_string());
        }
        if spec.waves.is_empty() {
            problems.push("waves: at least one wave is needed".to_string());
        }
        if spec.waves.len() > MAX_WAVES {
            problems.push(format!("waves: at most {MAX_WAVES}"));
        }
        for (i, w) in spec.waves.iter().enumerate() {
            let given = [
                !w.prefixes.is_empty(),
                !w.tags.is_empty(),
                w.percent.is_some(),
            ]
            .iter()
            .filter(|b| **b)
            .count();
            if given != 1 {
                problems.push(format!(
                    "waves[{i}]: exactly one of prefixes, tags and percent is needed"
                ));
            }
            if w.prefixes.len() > MAX_SELECTORS || w.tags.len() > MAX_SELECTORS {
                problems.push(format!(
                    "waves[{i}]: at most {MAX_SELECTORS} prefixes or tags"
                ));
            }
            for p in &w.prefixes {
                if p.is_empty()
                    || p.len() > 255
                    || !p
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
                {
                    problems.push(format!(
                        "waves[{i}].prefixes: {:?} is not the start of a hostname",
                        proto::clean_text(p, 64)
                    ));
                }
            }
            for t in &w.tags {
                if let Err(e) = crate::boot::check_tags(t) {
                    problems.push(format!("waves[{i}].tags: {e}"));
                }
            }
            if let Some(p) = w.percent {
                if !(p > 0.0 && p <= 100.0) {
                    problems.push(format!(
                        "waves[{i}].percent: must be above 0 and at most 100"
                    ));
                }
            }
            if w.name.len() > 64 {
                problems.push(format!("waves[{i}].name: at most 64 bytes"));
            }
        }
        if spec.max_in_flight == Some(0) {
            problems.push("maxInFlight: must be at least 1".to_string());
        }
        let min_healthy = spec.min_healthy_secs.unwrap_or(DEFAULT_MIN_HEALTHY_SECS);
        let deadline = spec
            .healthy_deadline_secs
            .unwrap_or(DEFAULT_HEALTHY_DEADLINE_SECS);
        if deadline <= min_healthy {
            problems.push(format!(
                "healthyDeadlineSecs ({deadline}) must be longer than minHealthySecs ({min_healthy})"
            ));
        }
        if spec.missing_after_secs == Some(0) {
            problems.push("missingAfterSecs: must be at least 1".to_string());
        }
        if let Some(p) = spec.max_failure_percent {
            if !(0.0..=100.0).contains(&p) {
                problems.push("maxFailurePercent: must be from 0 to 100".to_string());
            }
        }
        if let Some(w) = &spec.window {
            if let Err(e) = super::engine::Window::parse(w) {
                problems.push(format!("window: {e}"));
            }
        }
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        let (from_default, from_tarball) = baseline.expect("checked above");
        let from_version = if from_version.is_empty() {
            from_default
        } else {
            from_version
        };
        let tarball_base = if spec.tarball.is_empty() {
            from_tarball.clone()
        } else {
            spec.tarball.clone()
        };
        let tarball_url = proto::legacy::join_url(
            &tarball_base,
            &proto::legacy::tarball_file(agent, &spec.version),
        );
        let mut spec = spec.clone();
        spec.agent = agent.to_string();
        for (i, w) in spec.waves.iter_mut().enumerate() {
            if w.name.is_empty() {
                w.name = format!("wave-{}", i + 1);
            }
        }
        let id = format!("r-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        Ok(Rollout {
            body: Body {
                id,
                agent: agent.to_string(),
                version: spec.version.clone(),
                from_version,
                from_tarball,
                tarball_url,
                accepted: vec![0; spec.waves.len()],
                spec,
                state: STATE_PLANNED.to_string(),
                paused_reason: String::new(),
                approved: 0,
                rollback_of: String::new(),
                rolled_back_by: String::new(),
                scope: None,
                retired: false,
                created: now,
                updated: now,
            },
            rev: 0,
            hosts: HashMap::new(),
            assign: HashMap::new(),
            discovered: None,
            baseline_checked: None,
        })
    }

    /// The head alone (no hosts), for an action that changes only the head.
    pub fn clone_head(&self) -> Rollout {
        Rollout {
            body: self.body.clone(),
            rev: self.rev,
            hosts: HashMap::new(),
            assign: HashMap::new(),
            discovered: None,
            baseline_checked: None,
        }
    }

    /// Planned, running or paused: it may still admit hosts.
    pub fn active(&self) -> bool {
        matches!(
            self.body.state.as_str(),
            STATE_PLANNED | STATE_RUNNING | STATE_PAUSED
        )
    }

    /// Its pins count: it admitted hosts and did not let go of them.
    pub fn in_effect(&self) -> bool {
        !self.body.retired
            && matches!(
                self.body.state.as_str(),
                STATE_RUNNING | STATE_PAUSED | STATE_COMPLETED | STATE_ABORTED
            )
    }

    pub fn phase(&self, host: &str) -> Phase {
        self.hosts
            .get(host)
            .map(|h| h.phase)
            .unwrap_or(Phase::Pending)
    }

    /// The row to write for this revision, with the records of `hosts`.
    pub fn encode(&self, hosts: &[String]) -> (RolloutRow, Vec<RolloutHostRow>) {
        let row = RolloutRow {
            id: self.body.id.clone(),
            agent: self.body.agent.clone(),
            rev: self.rev,
            updated: self.body.updated,
            body: serde_json::to_string(&self.body).expect("serializing a rollout cannot fail"),
        };
        let rows = hosts
            .iter()
            .filter_map(|h| {
                self.hosts.get(h.as_str()).map(|rec| RolloutHostRow {
                    hostname: h.clone(),
                    body: serde_json::to_string(rec).expect("serializing cannot fail"),
                })
            })
            .collect();
        (row, rows)
    }

    pub fn decode(rec: &RolloutRecord) -> Result<Rollout, String> {
        let body: Body = serde_json::from_str(&rec.row.body).map_err(|e| e.to_string())?;
        let mut hosts = HashMap::with_capacity(rec.hosts.len());
        for h in &rec.hosts {
            let r: HostRec =
                serde_json::from_str(&h.body).map_err(|e| format!("host {}: {e}", h.hostname))?;
            hosts.insert(h.hostname.clone().into_boxed_str(), r);
        }
        let mut r = Rollout {
            body,
            rev: rec.row.rev,
            hosts,
            assign: HashMap::new(),
            discovered: None,
            baseline_checked: None,
        };
        r.refresh_assign();
        Ok(r)
    }

    /// Every host with a record is in the wave its record says.
    pub fn refresh_assign(&mut self) {
        for (h, rec) in &self.hosts {
            self.assign.insert(h.clone(), rec.wave);
        }
    }

    pub fn waves(&self) -> usize {
        self.body.spec.waves.len()
    }
}
