//! The controller: every pass, each running rollout looks at its hosts (what they report,
//! their events), moves them between phases, pauses itself at the error threshold,
//! admits the next hosts within `maxInFlight`, and completes.
//!
//! A pass decides from memory, writes what it decided (the rollout's next revision and the
//! host records that changed), and only then changes memory and the pins. Health comes from
//! the hosts' own reports and events, never from the server's guesses: a host is healthy
//! after it reported the new version running, without an `exited`/`restarted` event, for
//! `minHealthySecs` (a BootAgent host's agent uptime counts from when it started).

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{Datelike, Timelike};

use proto::events::{self, Event};
use proto::rollout::*;

use super::model::{HostRec, Phase, Rollout, OUTSIDE};
use super::Rollouts;
use crate::desired::Desired;

/// What a host last said of one agent.
#[derive(Debug, Clone, Default)]
pub struct Obs {
    /// Server clock of its last report.
    pub last_seen: i64,
    /// `(version, status, uptime)` when it reported the agent; uptime only from BootAgent.
    pub agent: Option<(String, String, Option<u64>)>,
}

/// What the controller reads of the fleet.
pub trait Fleet: Sync {
    /// Every known host (both protocols).
    fn hostnames(&self) -> Vec<String>;
    /// Known hosts, cheaply (to tell when to look for new ones).
    fn host_count(&self) -> usize;
    fn observe(&self, host: &str, agent: &str) -> Option<Obs>;
    /// Calls `f` with every kept event of `host` whose seq is above `seq`.
    fn events_after(&self, host: &str, seq: u64, f: &mut dyn FnMut(&Event));
}

/// The fleet as the server holds it: the legacy store, the BootAgent registry, the events.
pub struct ServerFleet<'a>(pub &'a crate::state::Shared);

impl Fleet for ServerFleet<'_> {
    fn hostnames(&self) -> Vec<String> {
        let mut out = self.0.store.hostnames(&|_| true);
        out.extend(
            self.0
                .boot
                .registry
                .hostnames(|_| true)
                .into_iter()
                .map(|h| h.to_string()),
        );
        out.sort_unstable();
        out.dedup();
        out
    }

    fn host_count(&self) -> usize {
        self.0.store.host_count() + self.0.boot.registry.len()
    }

    fn observe(&self, host: &str, agent: &str) -> Option<Obs> {
        let boot = self.0.boot.registry.read(host, |r| Obs {
            last_seen: r.last_seen,
            agent: r.report.as_ref().and_then(|rep| {
                rep.agents
                    .iter()
                    .find(|a| a.name == agent)
                    .map(|a| (a.version.clone(), a.status.clone(), Some(a.uptime)))
            }),
        });
        let legacy = self.0.store.host(host).map(|agents| Obs {
            last_seen: self.0.store.last_seen(host).unwrap_or(0),
            agent: agents
                .into_iter()
                .find(|a| a.name == agent)
                .map(|a| (a.version, a.status, None)),
        });
        match (boot, legacy) {
            (Some(b), Some(l)) => Some(if b.last_seen >= l.last_seen { b } else { l }),
            (b, l) => b.or(l),
        }
    }

    fn events_after(&self, host: &str, seq: u64, f: &mut dyn FnMut(&Event)) {
        self.0.events.scan(host, seq, f);
    }
}

/// A maintenance window, parsed.
#[derive(Debug, Clone)]
pub struct Window {
    /// Monday is 0; empty: every day.
    days: Vec<u32>,
    start: u32,
    end: u32,
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

impl Window {
    pub fn parse(w: &WindowSpec) -> Result<Window, String> {
        let hm = |s: &str, what: &str| -> Result<u32, String> {
            let (h, m) = s
                .split_once(':')
                .ok_or_else(|| format!("{what}: {s:?} is not HH:MM"))?;
            match (h.parse::<u32>(), m.parse::<u32>()) {
                (Ok(h), Ok(m)) if h < 24 && m < 60 && m.to_string().len() <= 2 => Ok(h * 60 + m),
                _ => Err(format!("{what}: {s:?} is not HH:MM")),
            }
        };
        let start = hm(&w.start, "start")?;
        let end = hm(&w.end, "end")?;
        if start == end {
            return Err("start and end are the same time".into());
        }
        let mut days = Vec::new();
        for d in &w.days {
            let i = DAYS
                .iter()
                .position(|x| x.eq_ignore_ascii_case(d.trim()))
                .ok_or_else(|| format!("days: {d:?} is not one of mon..sun"))?;
            days.push(i as u32);
        }
        Ok(Window { days, start, end })
    }

    /// True when `now` (Unix seconds, UTC) is inside. A window that crosses midnight
    /// belongs to the day it starts on.
    pub fn open(&self, now: i64) -> bool {
        let Some(t) = chrono::DateTime::from_timestamp(now, 0) else {
            return false;
        };
        let minute = t.hour() * 60 + t.minute();
        let today = t.weekday().num_days_from_monday();
        let yesterday = (today + 6) % 7;
        let day_ok = |d: u32| self.days.is_empty() || self.days.contains(&d);
        if self.start < self.end {
            day_ok(today) && minute >= self.start && minute < self.end
        } else {
            (day_ok(today) && minute >= self.start) || (day_ok(yesterday) && minute < self.end)
        }
    }
}

/// The effective numbers of a spec.
#[derive(Debug, Clone, Copy)]
pub struct Numbers {
    pub max_in_flight: u64,
    pub min_healthy: i64,
    pub deadline: i64,
    pub missing_after: i64,
}

pub fn numbers(spec: &RolloutSpec) -> Numbers {
    Numbers {
        max_in_flight: spec.max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT) as u64,
        min_healthy: spec.min_healthy_secs.unwrap_or(DEFAULT_MIN_HEALTHY_SECS) as i64,
        deadline: spec
            .healthy_deadline_secs
            .unwrap_or(DEFAULT_HEALTHY_DEADLINE_SECS) as i64,
        missing_after: spec
            .missing_after_secs
            .unwrap_or(DEFAULT_MISSING_AFTER_SECS) as i64,
    }
}

/// Release failures plus missing hosts of a wave of `size` hosts at which the rollout
/// pauses; 0 when no threshold is set.
pub fn failure_limit(spec: &RolloutSpec, size: u64) -> u64 {
    let by_count = spec.max_failures.map(|n| (n as u64).max(1));
    let by_share = spec
        .max_failure_percent
        .map(|p| ((p / 100.0 * size as f64).ceil() as u64).max(1));
    match (by_count, by_share) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b).unwrap_or(0),
    }
}

/// The wave `host` belongs to (its first match), or [`OUTSIDE`].
pub fn wave_of(spec: &RolloutSpec, desired: &Desired, host: &str) -> u16 {
    let mut tags: Option<String> = None;
    for (i, w) in spec.waves.iter().enumerate() {
        let hit = if let Some(p) = w.percent {
            percent_bucket(host) < percent_bound(p)
        } else if !w.prefixes.is_empty() {
            w.prefixes.iter().any(|p| host.starts_with(p.as_str()))
        } else {
            let have =
                tags.get_or_insert_with(|| crate::boot::tags_for(&desired.config.tag_rules, host));
            w.tags.iter().any(|t| crate::boot::has_tags(have, t))
        };
        if hit {
            return i as u16;
        }
    }
    OUTSIDE
}

/// Seconds between looks for new hosts when the fleet's host count did not move.
const REDISCOVER_SECS: i64 = 10;

/// Puts every known host that has no wave yet into its wave (or outside). A rollback
/// (`scope`: the hosts its rollout admitted) takes only those.
pub fn discover(
    r: &mut Rollout,
    desired: &Desired,
    fleet: &dyn Fleet,
    scope: Option<&std::collections::HashSet<Box<str>>>,
) {
    for h in fleet.hostnames() {
        if r.assign.contains_key(h.as_str()) {
            continue;
        }
        let in_scope = scope.is_none_or(|s| s.contains(h.as_str()));
        let w = if in_scope {
            wave_of(&r.body.spec, desired, &h)
        } else {
            OUTSIDE
        };
        r.assign.insert(h.into_boxed_str(), w);
    }
}

/// True when it is time to look for new hosts: never looked, the host count moved, or
/// [`REDISCOVER_SECS`] passed (a host that left and another that came keep the count).
fn discovery_due(r: &Rollout, fleet: &dyn Fleet, now: i64) -> bool {
    match r.discovered {
        None => true,
        Some((count, at)) => count != fleet.host_count() || now - at >= REDISCOVER_SECS,
    }
}

/// Per wave: hosts in each phase.
pub fn wave_counts(r: &Rollout) -> Vec<PhaseCounts> {
    counts_by(r, |h| r.phase(h))
}

/// Per wave: hosts in each phase, as `phase_of` says.
fn counts_by(r: &Rollout, phase_of: impl Fn(&str) -> Phase) -> Vec<PhaseCounts> {
    let mut out = vec![PhaseCounts::default(); r.waves()];
    for (h, &w) in &r.assign {
        let Some(c) = out.get_mut(w as usize) else {
            continue;
        };
        match phase_of(h) {
            Phase::Pending => c.pending += 1,
            Phase::InFlight => c.in_flight += 1,
            Phase::Healthy => c.healthy += 1,
            Phase::Failed => c.failed += 1,
            Phase::InfraFailed => c.infra_failed += 1,
            Phase::Missing => c.missing += 1,
        }
    }
    out
}

/// Per wave: release failures plus missing hosts.
pub fn wave_failures(r: &Rollout) -> Vec<u64> {
    wave_counts(r)
        .iter()
        .map(|c| c.failed + c.missing)
        .collect()
}

/// A wave is done when none of its hosts is pending or in flight.
pub fn wave_done(c: &PhaseCounts) -> bool {
    c.pending == 0 && c.in_flight == 0
}

/// The first wave not done; the number of waves when all are.
pub fn current_wave(r: &Rollout) -> usize {
    first_not_done(&wave_counts(r))
}

/// The first of these waves' counts not done; their number when all are.
pub fn first_not_done(counts: &[PhaseCounts]) -> usize {
    counts
        .iter()
        .position(|c| !wave_done(c))
        .unwrap_or(counts.len())
}

/// Whether the rollout's tarball has a digest a host can be given.
pub fn digest_known(r: &Rollout, desired: &Desired) -> bool {
    if !r.body.spec.sha256.is_empty() {
        return true;
    }
    let Some(k) = desired.known(&r.body.tarball_url) else {
        return false;
    };
    k.sha256.is_some() || (k.md5.is_some() && !desired.config.require_sha256)
}

fn running(status: &str) -> bool {
    status.eq_ignore_ascii_case(proto::legacy::STATUS_STARTED)
        || status.eq_ignore_ascii_case(proto::bootagent::STATE_RUNNING)
}

/// A host's record after looking at what it reports; `None` when nothing changed.
fn evaluate(
    r: &Rollout,
    host: &str,
    rec: &HostRec,
    fleet: &dyn Fleet,
    n: Numbers,
    now: i64,
) -> Option<HostRec> {
    let mut next = rec.clone();
    let target = r.body.version.as_str();
    let agent = r.body.agent.as_str();
    let obs = fleet.observe(host, agent);
    let last_seen = obs.as_ref().map(|o| o.last_seen).unwrap_or(0);
    // Missing: no report for missingAfterSecs (an admitted host, or one still waiting).
    if matches!(
        rec.phase,
        Phase::Pending | Phase::InFlight | Phase::InfraFailed
    ) && now - last_seen > n.missing_after
    {
        next.phase = Phase::Missing;
        next.reason = format!("no report for {}s", now - last_seen);
        return (next != *rec).then_some(next);
    }
    if rec.phase == Phase::Missing {
        if now - last_seen > n.missing_after {
            return None;
        }
        // It came back.
        next.phase = if rec.admitted > 0 {
            Phase::InFlight
        } else {
            Phase::Pending
        };
        next.reason.clear();
        if rec.admitted > 0 {
            // Its deadline starts again from its return.
            next.admitted = now;
        }
    }
    if next.phase == Phase::Pending {
        return (next != *rec).then_some(next);
    }
    // Events since the last look, in order.
    let mut failed: Option<String> = None;
    let mut infra: Option<String> = None;
    let mut restarted = false;
    let mut max_seq = rec.seq;
    fleet.events_after(host, rec.seq, &mut |e| {
        max_seq = max_seq.max(e.seq);
        if e.agent != agent || (!e.version.is_empty() && e.version != target) {
            return;
        }
        let cause = proto::clean_text(&e.cause, 200);
        match e.kind.as_str() {
            events::KIND_FATAL => failed = Some(format!("crash-looped to fatal: {cause}")),
            events::KIND_KILLED => failed = Some(format!("killed (resource limit): {cause}")),
            events::KIND_ROLLED_BACK => {
                failed = Some(format!("did not start; rolled back on the host: {cause}"))
            }
            events::KIND_INSTALL_FAILED if e.state == events::INSTALL_FAILED_ARCHIVE => {
                failed = Some(format!("the archive was refused: {cause}"))
            }
            events::KIND_INSTALL_FAILED => {
                infra = Some(format!("install failed ({}): {cause}", e.state))
            }
            events::KIND_EXITED | events::KIND_RESTARTED | events::KIND_RESTART_FAILED => {
                restarted = true
            }
            _ => {}
        }
    });
    next.seq = max_seq;
    if rec.phase == Phase::Healthy || rec.phase == Phase::Failed {
        // Final for this rollout; only a crash-loop of a healthy host still counts.
        if rec.phase == Phase::Healthy {
            if let Some(why) = failed {
                next.phase = Phase::Failed;
                next.reason = why;
            }
        }
        return (next != *rec).then_some(next);
    }
    if let Some(why) = failed {
        next.phase = Phase::Failed;
        next.reason = why;
        next.healthy_since = None;
        return Some(next);
    }
    let on_target = obs
        .as_ref()
        .and_then(|o| o.agent.as_ref())
        .filter(|(v, _, _)| v == target);
    match on_target {
        Some((_, status, _))
            if status.eq_ignore_ascii_case(proto::bootagent::STATE_FATAL)
                || status.eq_ignore_ascii_case(proto::bootagent::STATE_KILLED) =>
        {
            next.phase = Phase::Failed;
            next.reason = format!("reports {target} {status}");
            next.healthy_since = None;
            return Some(next);
        }
        Some((_, status, uptime)) if running(status) && !restarted => {
            // A BootAgent host says how long the agent has run; a legacy host's run is
            // timed from the first report that showed it running.
            // Never from before the admission: a host that ran the version already waits
            // its healthy time like any other, and a simulated uptime cannot skip it.
            let since = match uptime {
                Some(u) if *u > 0 => now - *u as i64,
                _ => next.healthy_since.unwrap_or(now),
            }
            .max(rec.admitted)
            .max(rec.restarted_at);
            next.healthy_since = Some(since);
            next.phase = Phase::InFlight;
            next.reason.clear();
            if now - since >= n.min_healthy {
                next.phase = Phase::Healthy;
            }
        }
        _ => {
            next.healthy_since = None;
            if restarted {
                next.restarted_at = now;
            }
            if let Some(why) = infra {
                next.phase = Phase::InfraFailed;
                next.reason = why;
            }
        }
    }
    if next.phase == Phase::InFlight && now - rec.admitted > n.deadline {
        let says = match obs.as_ref().and_then(|o| o.agent.as_ref()) {
            Some((v, s, _)) => format!("it reports {v} {s}"),
            None => "it does not report the agent".to_string(),
        };
        next.phase = Phase::Failed;
        next.reason = format!("not healthy within {}s of admission: {says}", n.deadline);
    }
    (next != *rec).then_some(next)
}

/// What one pass decided for one rollout.
#[derive(Debug, Default)]
struct Step {
    body: Option<super::model::Body>,
    hosts: Vec<(Box<str>, HostRec)>,
    /// Other rollouts whose hosts this one took back or over: retire them.
    retire: Vec<(String, &'static str)>,
}

fn step(r: &Rollout, desired: &Desired, fleet: &dyn Fleet, now: i64) -> Step {
    let mut out = Step::default();
    let n = numbers(&r.body.spec);
    let mut body = r.body.clone();
    if body.state == STATE_COMPLETED && !body.retired {
        // Let go once cfg.json gives every pinned host this version.
        let caught_up = r
            .hosts
            .iter()
            .filter(|(_, h)| h.admitted > 0)
            .all(|(h, _)| {
                desired
                    .baseline(&body.agent, h)
                    .is_some_and(|(v, _)| v == body.version)
            });
        if caught_up {
            body.retired = true;
            body.updated = now;
            out.body = Some(body);
        }
        return out;
    }
    if body.state != STATE_RUNNING && body.state != STATE_PAUSED {
        return out;
    }
    // Look at every host of the waves started so far (and any admitted one).
    let cur = current_wave(r);
    let mut changed: HashMap<Box<str>, HostRec> = HashMap::new();
    for (h, &w) in &r.assign {
        // Hosts of the waves started so far, and every admitted one (a new host of an
        // earlier wave can make an earlier wave current again).
        if w == OUTSIDE || ((w as usize) > cur && !r.hosts.contains_key(h)) {
            continue;
        }
        let rec = r.hosts.get(h).cloned().unwrap_or(HostRec {
            wave: w,
            phase: Phase::Pending,
            admitted: 0,
            healthy_since: None,
            seq: 0,
            restarted_at: 0,
            reason: String::new(),
        });
        if let Some(next) = evaluate(r, h, &rec, fleet, n, now) {
            changed.insert(h.clone(), next);
        }
    }
    let phase_of = |h: &str| {
        changed
            .get(h)
            .map(|c| c.phase)
            .unwrap_or_else(|| r.phase(h))
    };
    // Counts after this pass.
    let counts = counts_by(r, phase_of);
    let cur = first_not_done(&counts);
    // The threshold, over every wave started.
    if body.state == STATE_RUNNING {
        for (i, c) in counts.iter().enumerate().take(cur + 1) {
            let limit = failure_limit(&body.spec, c.total());
            let accepted = body.accepted.get(i).copied().unwrap_or(0);
            let fails = c.failed + c.missing;
            if limit > 0 && fails.saturating_sub(accepted) >= limit {
                body.state = STATE_PAUSED.into();
                body.paused_reason = format!(
                    "error threshold reached: {fails} of {} hosts of wave {:?} failed or went missing (limit {limit})",
                    c.total(),
                    body.spec.waves[i].name
                );
                tracing::warn!(rollout = %body.id, agent = %body.agent, version = %body.version, reason = %body.paused_reason, "rollout paused itself");
                break;
            }
        }
    }
    // Admission.
    let in_flight: u64 = counts.iter().map(|c| c.in_flight).sum();
    let approval_ok = !body.spec.approval || cur == 0 || body.approved >= cur;
    let window_ok = body
        .spec
        .window
        .as_ref()
        .is_none_or(|w| Window::parse(w).is_ok_and(|w| w.open(now)));
    if body.state == STATE_RUNNING
        && cur < r.waves()
        && approval_ok
        && window_ok
        && in_flight < n.max_in_flight
        && digest_known(r, desired)
    {
        let mut slots = n.max_in_flight - in_flight;
        let mut picks: Vec<&Box<str>> = Vec::new();
        for w in 0..=cur {
            if slots == 0 {
                break;
            }
            let mut wave: Vec<&Box<str>> = r
                .assign
                .iter()
                .filter(|(h, &hw)| hw as usize == w && phase_of(h) == Phase::Pending)
                .map(|(h, _)| h)
                .collect();
            wave.sort_unstable();
            for h in wave.into_iter().take(slots as usize) {
                picks.push(h);
                slots -= 1;
            }
        }
        for h in picks {
            let w = r.assign[h];
            // What the host reported so far is history: only later events count.
            let mut seq = 0;
            fleet.events_after(h, 0, &mut |e| seq = seq.max(e.seq));
            changed.insert(
                h.clone(),
                HostRec {
                    wave: w,
                    phase: Phase::InFlight,
                    admitted: now,
                    healthy_since: None,
                    seq,
                    restarted_at: 0,
                    reason: String::new(),
                },
            );
        }
    }
    // Completion: every wave done and nobody still retrying an install.
    let infra: u64 = counts.iter().map(|c| c.infra_failed).sum();
    let admitted_now = changed
        .values()
        .any(|c| c.phase == Phase::InFlight && c.admitted == now);
    if body.state == STATE_RUNNING && cur >= r.waves() && infra == 0 && !admitted_now {
        body.state = STATE_COMPLETED.into();
        tracing::info!(rollout = %body.id, agent = %body.agent, version = %body.version, "rollout completed");
        if !body.rollback_of.is_empty() {
            out.retire
                .push((body.rollback_of.clone(), STATE_ROLLED_BACK));
        }
    }
    if body != r.body || !changed.is_empty() {
        body.updated = now;
        out.body = Some(body);
    }
    out.hosts = changed.into_iter().collect();
    out
}

impl Rollouts {
    /// One controller pass over every rollout; true when the pins may have changed.
    pub async fn pass(&self, desired: &Desired, fleet: &dyn Fleet, now: i64) -> bool {
        let _w = self.write.lock().await;
        let mut moved = match self.follow().await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "rollouts: cannot read the store; this pass waits");
                return false;
            }
        };
        let ids: Vec<String> = {
            let g = self.inner.lock();
            g.list
                .iter()
                .filter(|r| r.active() || r.in_effect())
                .map(|r| r.body.id.clone())
                .collect()
        };
        for id in ids {
            let decided = {
                let mut g = self.inner.lock();
                let Some(i) = g.list.iter().position(|r| r.body.id == id) else {
                    continue;
                };
                let r = &g.list[i];
                let looking = (r.body.state == STATE_RUNNING || r.body.state == STATE_PAUSED)
                    && discovery_due(r, fleet, now);
                if looking {
                    let scope = r.body.scope.clone().map(|s| {
                        g.list
                            .iter()
                            .find(|o| o.body.id == s)
                            .map(|o| {
                                o.hosts
                                    .iter()
                                    .filter(|(_, h)| h.admitted > 0)
                                    .map(|(name, _)| name.clone())
                                    .collect()
                            })
                            .unwrap_or_default()
                    });
                    let r = &mut g.list[i];
                    discover(r, desired, fleet, scope.as_ref());
                    r.discovered = Some((fleet.host_count(), now));
                }
                // A completed rollout only waits for cfg.json to catch up: look again
                // only when the config changed, not every pass over every host.
                if g.list[i].body.state == STATE_COMPLETED {
                    let checked = &mut g.list[i].baseline_checked;
                    if checked
                        .as_ref()
                        .is_some_and(|c| Arc::ptr_eq(c, &desired.config))
                    {
                        continue;
                    }
                    *checked = Some(desired.config.clone());
                }
                let r = &g.list[i];
                let mut s = step(r, desired, fleet, now);
                if s.body.as_ref().is_some_and(|b| {
                    b.state == STATE_COMPLETED
                        && r.body.state != STATE_COMPLETED
                        && b.rollback_of.is_empty()
                }) {
                    // A rollout that completed over every host of an older one of the
                    // agent takes over from it.
                    let mine: std::collections::HashSet<&str> = r
                        .hosts
                        .iter()
                        .filter(|(_, h)| h.admitted > 0)
                        .map(|(n, _)| &**n)
                        .chain(
                            s.hosts
                                .iter()
                                .filter(|(_, h)| h.admitted > 0)
                                .map(|(n, _)| &**n),
                        )
                        .collect();
                    for o in g.list.iter().filter(|o| {
                        o.body.id != id && o.body.agent == r.body.agent && o.in_effect()
                    }) {
                        let covered = o
                            .hosts
                            .iter()
                            .filter(|(_, h)| h.admitted > 0)
                            .all(|(n, _)| mine.contains(&**n));
                        if covered && !o.active() {
                            s.retire.push((o.body.id.clone(), STATE_SUPERSEDED));
                        }
                    }
                }
                s.body.map(|b| (b, s.hosts, s.retire, r.rev))
            };
            let Some((body, hosts, retire, rev)) = decided else {
                continue;
            };
            let names: Vec<String> = hosts.iter().map(|(h, _)| h.to_string()).collect();
            let mut head = Rollout {
                body,
                rev: rev + 1,
                hosts: hosts.iter().cloned().collect(),
                assign: HashMap::new(),
                discovered: None,
                baseline_checked: None,
            };
            head.body.accepted.resize(head.body.spec.waves.len(), 0);
            let (row, rows) = head.encode(&names);
            match self.durable.put_rollout(row, rows).await {
                Ok(true) => {
                    let mut g = self.inner.lock();
                    let mut pins_moved = false;
                    if let Some(r) = g.list.iter_mut().find(|r| r.body.id == id) {
                        let was = r.in_effect();
                        r.body = head.body;
                        r.rev = head.rev;
                        pins_moved = was != r.in_effect();
                        for (h, rec) in hosts {
                            let before = r.hosts.get(&h).map_or(0, |o| o.admitted);
                            pins_moved |= (before > 0) != (rec.admitted > 0);
                            r.assign.insert(h.clone(), rec.wave);
                            r.hosts.insert(h, rec);
                        }
                    }
                    // Health moves every pass; only admissions and states move the pins.
                    if pins_moved {
                        g.pins_gen += 1;
                        moved = true;
                    }
                }
                Ok(false) => {
                    // Another replica decided first; the next pass starts from its rows.
                    let _ = self.follow().await;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(rollout = %id, error = %e, "rollouts: cannot write; nothing was handed out");
                    continue;
                }
            }
            for (other, state) in retire {
                let head = {
                    let g = self.inner.lock();
                    g.list.iter().find(|r| r.body.id == other).map(|r| {
                        let mut h = r.clone_head();
                        h.body.state = state.to_string();
                        h.body.retired = true;
                        h.body.updated = now;
                        h.rev += 1;
                        h
                    })
                };
                let Some(h) = head else { continue };
                let (row, _) = h.encode(&[]);
                if let Ok(true) = self.durable.put_rollout(row, Vec::new()).await {
                    let mut g = self.inner.lock();
                    if let Some(r) = g.list.iter_mut().find(|r| r.body.id == other) {
                        r.body = h.body;
                        r.rev = h.rev;
                    }
                    g.pins_gen += 1;
                }
            }
        }
        moved
    }
}

/// Runs the controller until the process ends: a pass every `every`, new pins handed to
/// the desired state when they moved.
pub async fn run(state: crate::state::AppState, every: std::time::Duration) {
    let mut last_pins = u64::MAX;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let desired = state.current.load();
        let now = crate::http::unix_now();
        let rollouts: Arc<Rollouts> = state.rollouts.clone();
        {
            let fleet = ServerFleet(&state);
            rollouts.pass(&desired, &fleet, now).await;
        }
        let g = rollouts.pins_generation();
        if g != last_pins {
            last_pins = g;
            let pins = Arc::new(rollouts.pins());
            state.reloader.set_pins(pins).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired() -> Desired {
        let cfg = crate::config::parse(
            r#"{"tagRules": [{"prefix": "db-", "tags": "role=db"}],
                "agents": [{"default": {"name": "a", "version": "1", "tarball": "http://x/", "cmd": "start"}}]}"#,
        )
        .unwrap()
        .config;
        Desired::compile(std::sync::Arc::new(cfg), Default::default())
    }

    #[test]
    fn hosts_take_their_first_wave_and_percentages_are_cumulative() {
        let d = desired();
        let spec = RolloutSpec {
            waves: vec![
                WaveSpec {
                    prefixes: vec!["canary-".into()],
                    ..WaveSpec::default()
                },
                WaveSpec {
                    tags: vec!["role=db".into()],
                    ..WaveSpec::default()
                },
                WaveSpec {
                    percent: Some(10.0),
                    ..WaveSpec::default()
                },
                WaveSpec {
                    percent: Some(100.0),
                    ..WaveSpec::default()
                },
            ],
            ..RolloutSpec::default()
        };
        assert_eq!(wave_of(&spec, &d, "canary-1"), 0);
        assert_eq!(wave_of(&spec, &d, "db-7"), 1);
        let mut per = [0u32; 4];
        for i in 0..10_000 {
            let w = wave_of(&spec, &d, &format!("web-{i}"));
            per[w as usize] += 1;
        }
        assert_eq!(per[0] + per[1], 0);
        assert!((850..1150).contains(&per[2]), "{per:?}");
        assert_eq!(per[2] + per[3], 10_000);
        // Stable: the same host, the same wave, whatever else is in the fleet.
        assert_eq!(wave_of(&spec, &d, "web-42"), wave_of(&spec, &d, "web-42"));
        let only = RolloutSpec {
            waves: vec![WaveSpec {
                prefixes: vec!["x".into()],
                ..WaveSpec::default()
            }],
            ..RolloutSpec::default()
        };
        assert_eq!(wave_of(&only, &d, "web-1"), OUTSIDE);
    }

    #[test]
    fn thresholds_by_count_share_or_both() {
        let mut spec = RolloutSpec::default();
        assert_eq!(failure_limit(&spec, 100), 0);
        spec.max_failures = Some(3);
        assert_eq!(failure_limit(&spec, 100), 3);
        spec.max_failure_percent = Some(1.0);
        assert_eq!(failure_limit(&spec, 100), 1);
        spec.max_failures = None;
        spec.max_failure_percent = Some(25.0);
        assert_eq!(failure_limit(&spec, 10), 3);
        assert_eq!(failure_limit(&spec, 1), 1);
    }

    #[test]
    fn windows_by_day_and_across_midnight() {
        let w = |days: &[&str], start: &str, end: &str| {
            Window::parse(&WindowSpec {
                days: days.iter().map(|d| d.to_string()).collect(),
                start: start.into(),
                end: end.into(),
            })
        };
        // 2026-12-04 is a Friday.
        let at = |h: i64, m: i64| 1_796_342_400 + h * 3600 + m * 60;
        let night = w(&["fri"], "22:00", "02:00").unwrap();
        assert!(night.open(at(23, 0)));
        assert!(!night.open(at(21, 59)));
        assert!(
            night.open(at(24 + 1, 59)),
            "saturday 01:59 belongs to friday's window"
        );
        assert!(
            !night.open(at(24 + 23, 0)),
            "saturday night is not a window"
        );
        let day = w(&[], "09:00", "17:00").unwrap();
        assert!(day.open(at(9, 0)) && !day.open(at(17, 0)));
        assert!(w(&["someday"], "01:00", "02:00").is_err());
        assert!(w(&[], "24:00", "02:00").is_err());
        assert!(w(&[], "1:00", "1:00").is_err());
        assert!(w(&[], "0100", "02:00").is_err());
    }
}
