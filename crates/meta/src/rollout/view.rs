//! What the API shows of a rollout: its waves with counts and sample hosts, its failures,
//! and what holds it ("why is it not moving?"), in words and as data.

use proto::rollout::*;

use super::engine::{self, Window};
use super::model::{Phase, Rollout, OUTSIDE};
use crate::desired::Desired;

/// Rollouts whose waves `/metrics` shows (the newest in effect).
pub const MAX_METRIC_ROLLOUTS: usize = 20;
/// Failures listed in a view.
const MAX_FAILURES: usize = 100;

/// One series of `ops_meta_rollout_hosts`.
#[derive(Debug, Clone)]
pub struct WaveMetric {
    pub rollout: String,
    pub agent: String,
    pub version: String,
    pub wave: String,
    pub phase: &'static str,
    pub hosts: u64,
}

fn sample(r: &Rollout, wave: usize) -> Vec<String> {
    let mut hs: Vec<&str> = r
        .assign
        .iter()
        .filter(|(_, &w)| w as usize == wave)
        .map(|(h, _)| &**h)
        .collect();
    hs.sort_unstable();
    hs.into_iter()
        .take(SAMPLE_HOSTS)
        .map(str::to_string)
        .collect()
}

/// Each wave with its counts, and the first wave not done (the number of waves when all
/// are), from one walk over the hosts.
fn waves(r: &Rollout) -> (Vec<WaveView>, usize) {
    let counts = engine::wave_counts(r);
    let cur = engine::first_not_done(&counts);
    let started = r.body.state != STATE_PLANNED;
    let waves = counts
        .into_iter()
        .enumerate()
        .map(|(i, c)| WaveView {
            index: i,
            name: r.body.spec.waves[i].name.clone(),
            state: if !started || i > cur {
                "waiting"
            } else if i < cur || engine::wave_done(&c) {
                "done"
            } else {
                "active"
            }
            .to_string(),
            hosts: c.total(),
            failure_limit: engine::failure_limit(&r.body.spec, c.total()),
            counts: c,
            sample: sample(r, i),
        })
        .collect();
    (waves, cur)
}

/// The dry run of a rollout that was never stored.
pub fn plan(r: &Rollout, desired: &Desired) -> RolloutPlan {
    let (waves, _) = waves(r);
    let outside = r.assign.values().filter(|&&w| w == OUTSIDE).count() as u64;
    let mut warnings = Vec::new();
    for w in &waves {
        if w.hosts == 0 {
            warnings.push(format!("wave {:?} selects no known host", w.name));
        }
    }
    if !engine::digest_known(r, desired) {
        warnings.push(format!(
            "no digest of {} is known yet: hosts are admitted once ops-meta has learned it (is the tarball in tarballDir or beside a .sha256/.md5?)",
            r.body.tarball_url
        ));
    }
    if r.body.version == r.body.from_version {
        warnings.push(format!(
            "{} is already the version hosts get ({})",
            r.body.version, r.body.agent
        ));
    }
    RolloutPlan {
        agent: r.body.agent.clone(),
        version: r.body.version.clone(),
        from_version: r.body.from_version.clone(),
        tarball_url: r.body.tarball_url.clone(),
        waves,
        outside,
        warnings,
    }
}

fn hosts_in(r: &Rollout, phase: Phase, wave: Option<usize>) -> (u64, Vec<String>) {
    let mut hs: Vec<&str> = r
        .hosts
        .iter()
        .filter(|(_, rec)| rec.phase == phase && wave.is_none_or(|w| rec.wave as usize == w))
        .map(|(h, _)| &**h)
        .collect();
    hs.sort_unstable();
    let n = hs.len() as u64;
    (
        n,
        hs.into_iter()
            .take(SAMPLE_HOSTS)
            .map(str::to_string)
            .collect(),
    )
}

fn holds(r: &Rollout, desired: &Desired, waves: &[WaveView], cur: usize, now: i64) -> Vec<Hold> {
    let mut out = Vec::new();
    let hold = |kind: &str, text: String, count: u64, hosts: Vec<String>| Hold {
        kind: kind.to_string(),
        text,
        hosts,
        count,
    };
    let b = &r.body;
    match b.state.as_str() {
        STATE_PLANNED => out.push(hold(
            "not_started",
            "planned: waiting for `start`".into(),
            0,
            vec![],
        )),
        STATE_PAUSED => {
            let kind = if b.paused_reason.starts_with("error threshold") {
                "threshold"
            } else {
                "paused"
            };
            out.push(hold(
                kind,
                format!("{}; `resume` continues", b.paused_reason),
                0,
                vec![],
            ));
        }
        STATE_RUNNING => {}
        _ => return out,
    }
    if cur < waves.len() && b.state != STATE_PLANNED {
        if b.spec.approval && cur > 0 && b.approved < cur {
            out.push(hold(
                "approval",
                format!(
                    "waiting for approval of wave {:?} (`approve`)",
                    waves[cur].name
                ),
                0,
                vec![],
            ));
        }
        if let Some(w) = b.spec.window.as_ref() {
            if !Window::parse(w).is_ok_and(|w| w.open(now)) {
                out.push(hold(
                    "window",
                    format!(
                        "outside the maintenance window ({} {}-{} UTC)",
                        if w.days.is_empty() {
                            "every day".to_string()
                        } else {
                            w.days.join(",")
                        },
                        w.start,
                        w.end
                    ),
                    0,
                    vec![],
                ));
            }
        }
        if !engine::digest_known(r, desired) {
            out.push(hold(
                "digest",
                format!("waiting for the digest of {}", b.tarball_url),
                0,
                vec![],
            ));
        }
        let n = engine::numbers(&b.spec);
        // In flight: on the version and counting healthy time, or not there yet.
        let mut timing = Vec::new();
        let mut installing = Vec::new();
        for (h, rec) in &r.hosts {
            if rec.phase == Phase::InFlight {
                if rec.healthy_since.is_some() {
                    timing.push(&**h);
                } else {
                    installing.push(&**h);
                }
            }
        }
        timing.sort_unstable();
        installing.sort_unstable();
        if !timing.is_empty() {
            out.push(hold(
                "healthy_time",
                format!(
                    "waiting for {} {} healthy time ({}s without a restart)",
                    timing.len(),
                    if timing.len() == 1 {
                        "host's"
                    } else {
                        "hosts'"
                    },
                    n.min_healthy
                ),
                timing.len() as u64,
                timing
                    .iter()
                    .take(SAMPLE_HOSTS)
                    .map(|s| s.to_string())
                    .collect(),
            ));
        }
        if !installing.is_empty() {
            out.push(hold(
                "in_flight",
                format!(
                    "waiting for {} host{} to run {} (maxInFlight {})",
                    installing.len(),
                    if installing.len() == 1 { "" } else { "s" },
                    b.version,
                    n.max_in_flight
                ),
                installing.len() as u64,
                installing
                    .iter()
                    .take(SAMPLE_HOSTS)
                    .map(|s| s.to_string())
                    .collect(),
            ));
        }
    }
    let (missing, sample) = hosts_in(r, Phase::Missing, None);
    if missing > 0 {
        out.push(hold(
            "missing",
            format!(
                "{missing} host{} missing (no report)",
                if missing == 1 { "" } else { "s" }
            ),
            missing,
            sample,
        ));
    }
    let (infra, sample) = hosts_in(r, Phase::InfraFailed, None);
    if infra > 0 {
        out.push(hold(
            "infra",
            format!(
                "{infra} host{} cannot install for infrastructure reasons (download, disk, checksum, signature); they keep trying and do not count as failures",
                if infra == 1 { "" } else { "s" }
            ),
            infra,
            sample,
        ));
    }
    out
}

/// A rollout as the API shows it.
pub fn view(r: &Rollout, desired: &Desired, now: i64) -> RolloutView {
    let (waves, cur) = waves(r);
    let mut counts = PhaseCounts::default();
    for w in &waves {
        let c = &w.counts;
        counts.pending += c.pending;
        counts.in_flight += c.in_flight;
        counts.healthy += c.healthy;
        counts.failed += c.failed;
        counts.infra_failed += c.infra_failed;
        counts.missing += c.missing;
    }
    let mut failures: Vec<HostFailure> = r
        .hosts
        .iter()
        .filter(|(_, rec)| {
            matches!(
                rec.phase,
                Phase::Failed | Phase::InfraFailed | Phase::Missing
            )
        })
        .map(|(h, rec)| HostFailure {
            host: h.to_string(),
            phase: rec.phase.as_str().to_string(),
            reason: rec.reason.clone(),
            wave: rec.wave as usize,
        })
        .collect();
    failures.sort_by(|a, b| (a.wave, &a.host).cmp(&(b.wave, &b.host)));
    failures.truncate(MAX_FAILURES);
    let b = &r.body;
    let permanent = if b.state == STATE_COMPLETED && !b.retired && b.rollback_of.is_empty() {
        format!(
            "{} {} is held by this rollout; to make it permanent set the default \"version\" of {} in cfg.json to {:?}{} and reload; the rollout then lets go",
            b.agent,
            b.version,
            b.agent,
            b.version,
            if b.spec.tarball.is_empty() {
                String::new()
            } else {
                format!(" and its \"tarball\" to {:?}", b.spec.tarball)
            }
        )
    } else {
        String::new()
    };
    let sha256 = if b.spec.sha256.is_empty() {
        desired
            .known(&b.tarball_url)
            .and_then(|k| k.sha256.clone())
            .unwrap_or_default()
    } else {
        b.spec.sha256.clone()
    };
    let signature_url = desired
        .known(&b.tarball_url)
        .filter(|_| signature_beside(desired, &b.tarball_url))
        .map(|_| format!("{}.minisig", b.tarball_url))
        .unwrap_or_default();
    RolloutView {
        id: b.id.clone(),
        agent: b.agent.clone(),
        version: b.version.clone(),
        from_version: b.from_version.clone(),
        tarball_url: b.tarball_url.clone(),
        sha256,
        signature_url,
        state: b.state.clone(),
        paused_reason: b.paused_reason.clone(),
        current_wave: cur.min(waves.len().saturating_sub(1)),
        holds: holds(r, desired, &waves, cur, now),
        waves,
        counts,
        failures,
        spec: b.spec.clone(),
        rollback_of: b.rollback_of.clone(),
        rolled_back_by: b.rolled_back_by.clone(),
        created: b.created,
        updated: b.updated,
        permanent,
    }
}

/// True when ops-meta's own `tarballDir` holds `<tarball>.minisig` for a tarball it
/// serves itself.
fn signature_beside(desired: &Desired, tarball_url: &str) -> bool {
    let Ok(u) = url::Url::parse(tarball_url) else {
        return false;
    };
    let dir = &desired.config.tarball_dir;
    if dir.as_os_str().is_empty() {
        return false;
    }
    crate::tarfs::resolve(dir, &format!("{}.minisig", u.path())).is_ok_and(|f| f.is_file())
}

pub fn wave_metrics(r: &Rollout) -> Vec<WaveMetric> {
    let counts = engine::wave_counts(r);
    let mut out = Vec::new();
    for (i, c) in counts.iter().enumerate() {
        for (phase, n) in [
            (PHASE_PENDING, c.pending),
            (PHASE_IN_FLIGHT, c.in_flight),
            (PHASE_HEALTHY, c.healthy),
            (PHASE_FAILED, c.failed),
            (PHASE_INFRA_FAILED, c.infra_failed),
            (PHASE_MISSING, c.missing),
        ] {
            out.push(WaveMetric {
                rollout: r.body.id.clone(),
                agent: r.body.agent.clone(),
                version: r.body.version.clone(),
                wave: r.body.spec.waves[i].name.clone(),
                phase,
                hosts: n,
            });
        }
    }
    out
}
