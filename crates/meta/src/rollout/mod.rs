//! Staged rollouts: one agent to one version, wave by wave, counting a host as upgraded
//! only once it ran the new version for `minHealthySecs`, pausing by itself when a wave's
//! failures reach the threshold.
//!
//! A rollout *pins* the hosts it admitted: the desired state answers them with its version
//! instead of `cfg.json`'s ([`crate::desired::Pin`]), so legacy hosts get it in their
//! heartbeat answer and BootAgent hosts get an install job, through the one code path both
//! already use. `cfg.json` stays the baseline; a completed rollout keeps its hosts until
//! `cfg.json` says the same version (then it lets go), a rollback takes them back.
//!
//! Everything a rollout decided is durable before anyone acts on it: an admission is
//! written (with the rollout's next revision, taken only over the one before, see
//! [`crate::persist::Durable::put_rollout`]) before the pins that hand out the version.
//! The controller ([`engine`]) runs on every replica; a replica that loses a race on a
//! revision reads the rollout again and decides anew.

pub mod engine;
mod model;
pub mod view;

pub use model::{Phase, Rollout};

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use proto::rollout::{RolloutList, RolloutPlan, RolloutSpec, RolloutView};

use crate::desired::{Desired, Pin, Pins};
use crate::persist::{Durable, StoreError};

/// What an action on a rollout can fail with; the HTTP layer picks the status.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    /// The spec or the request is wrong (400).
    #[error("{0}")]
    Invalid(String),
    /// No such rollout (404).
    #[error("no rollout {0:?}")]
    NotFound(String),
    /// Not in a state that allows it, or another rollout is active (409).
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Every rollout this server knows, and the lock writers take.
#[derive(Debug)]
pub struct Rollouts {
    inner: Mutex<Inner>,
    durable: Arc<dyn Durable>,
    /// One writer at a time in this process: an action or a controller pass.
    write: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Oldest first.
    list: Vec<Rollout>,
    /// Bumped whenever what the pins hold may have changed.
    pins_gen: u64,
}

impl Rollouts {
    pub fn new(durable: Arc<dyn Durable>) -> Rollouts {
        Rollouts {
            inner: Mutex::new(Inner::default()),
            durable,
            write: tokio::sync::Mutex::new(()),
        }
    }

    /// Reads every rollout from the durable store (at start).
    pub async fn load(&self) -> Result<usize, StoreError> {
        let records = self.durable.rollouts(None).await?;
        self.take(records);
        Ok(self.inner.lock().list.len())
    }

    /// Takes what other replicas wrote since this one last looked: every rollout whose
    /// revision in the store is not the one in memory is read again.
    pub async fn follow(&self) -> Result<bool, StoreError> {
        let revs = self.durable.rollout_revs().await?;
        let stale: Vec<String> = {
            let g = self.inner.lock();
            revs.into_iter()
                .filter(|(id, rev)| {
                    g.list
                        .iter()
                        .find(|r| &r.body.id == id)
                        .is_none_or(|r| r.rev != *rev)
                })
                .map(|(id, _)| id)
                .collect()
        };
        if stale.is_empty() {
            return Ok(false);
        }
        let records = self.durable.rollouts(Some(stale)).await?;
        self.take(records);
        Ok(true)
    }

    /// Puts rollouts read from the store in memory, in place of this replica's copies.
    fn take(&self, records: Vec<crate::persist::RolloutRecord>) {
        let mut g = self.inner.lock();
        for rec in records {
            match Rollout::decode(&rec) {
                Ok(r) => upsert(&mut g.list, r),
                Err(e) => {
                    tracing::error!(rollout = %rec.row.id, error = %e, "rollout row unreadable; skipped")
                }
            }
        }
        g.list.sort_by_key(|r| (r.body.created, r.body.id.clone()));
        g.pins_gen += 1;
    }

    /// `f` of rollout `id` as memory holds it (whole: hosts and waves too).
    fn read<R>(&self, id: &str, f: impl FnOnce(&Rollout) -> R) -> Result<R, RolloutError> {
        let g = self.inner.lock();
        g.list
            .iter()
            .find(|r| r.body.id == id)
            .map(f)
            .ok_or_else(|| RolloutError::NotFound(id.to_string()))
    }

    /// A number that changes whenever the pins may have.
    pub fn pins_generation(&self) -> u64 {
        self.inner.lock().pins_gen
    }

    /// The pins of every rollout in effect, newest first.
    pub fn pins(&self) -> Pins {
        let g = self.inner.lock();
        let mut out = Vec::new();
        for r in g.list.iter().rev().filter(|r| r.in_effect()) {
            let hosts = r
                .hosts
                .iter()
                .filter(|(_, h)| h.admitted > 0)
                .map(|(name, _)| name.clone())
                .collect();
            let Ok(agent) = proto::AgentName::parse(&r.body.agent) else {
                continue;
            };
            out.push(Arc::new(Pin {
                rollout: r.body.id.clone(),
                agent,
                version: r.body.version.clone(),
                tarball: r.body.spec.tarball.clone(),
                sha256: (!r.body.spec.sha256.is_empty()).then(|| r.body.spec.sha256.clone()),
                hosts,
            }));
        }
        Pins(out)
    }

    /// Every rollout (newest first), optionally of one agent.
    pub fn list(&self, desired: &Desired, agent: Option<&str>, now: i64) -> RolloutList {
        let g = self.inner.lock();
        RolloutList {
            rollouts: g
                .list
                .iter()
                .rev()
                .filter(|r| agent.is_none_or(|a| r.body.agent == a))
                .map(|r| view::view(r, desired, now))
                .collect(),
        }
    }

    /// One rollout; one another replica just created is read from the store.
    pub async fn get(
        &self,
        id: &str,
        desired: &Desired,
        now: i64,
    ) -> Result<RolloutView, RolloutError> {
        if self.read(id, |_| ()).is_err() && self.durable.shared() {
            self.follow().await?;
        }
        self.read(id, |r| view::view(r, desired, now))
    }

    /// What `spec` would do, stored nowhere.
    pub fn plan(
        &self,
        spec: &RolloutSpec,
        desired: &Desired,
        fleet: &dyn engine::Fleet,
    ) -> Result<RolloutPlan, RolloutError> {
        let from = self.previous_version(spec, desired);
        let mut r = Rollout::create(spec, desired, from, 0).map_err(RolloutError::Invalid)?;
        engine::discover(&mut r, desired, fleet, None);
        Ok(view::plan(&r, desired))
    }

    /// The version hosts of the agent run before a rollout: the newest rollout in effect,
    /// else `cfg.json`'s default.
    fn previous_version(&self, spec: &RolloutSpec, desired: &Desired) -> String {
        let g = self.inner.lock();
        g.list
            .iter()
            .rev()
            .find(|r| r.body.agent == spec.agent && r.in_effect())
            .map(|r| r.body.version.clone())
            .or_else(|| desired.baseline(&spec.agent, "").map(|(v, _)| v))
            .unwrap_or_default()
    }

    /// Stores a new rollout (`planned`, or `running` when `spec.start`).
    pub async fn create(
        &self,
        spec: &RolloutSpec,
        desired: &Desired,
        now: i64,
    ) -> Result<RolloutView, RolloutError> {
        let _w = self.write.lock().await;
        let from = self.previous_version(spec, desired);
        let mut r = Rollout::create(spec, desired, from, now).map_err(RolloutError::Invalid)?;
        {
            let g = self.inner.lock();
            if let Some(a) = g
                .list
                .iter()
                .find(|o| o.body.agent == r.body.agent && o.active())
            {
                return Err(RolloutError::Conflict(format!(
                    "rollout {} of {} is {}: pause is not enough, abort it (or let it complete) before creating another",
                    a.body.id, a.body.agent, a.body.state
                )));
            }
        }
        if spec.start {
            r.body.state = proto::rollout::STATE_RUNNING.to_string();
        }
        r.rev = 1;
        self.write_new(&r, Vec::new()).await?;
        let view = view::view(&r, desired, now);
        let mut g = self.inner.lock();
        g.list.push(r);
        g.pins_gen += 1;
        Ok(view)
    }

    /// An operator's action on rollout `id`: `start`, `pause`, `resume`, `approve`,
    /// `abort` or `rollback` (which answers the new rollback rollout).
    pub async fn act(
        &self,
        id: &str,
        action: &str,
        reason: &str,
        desired: &Desired,
        now: i64,
    ) -> Result<RolloutView, RolloutError> {
        use proto::rollout::*;
        let _w = self.write.lock().await;
        // Act on what the store holds: another replica's controller may have moved it.
        if self.durable.shared() {
            self.follow().await?;
        }
        let mut r = self.read(id, Rollout::clone_head)?;
        let state = r.body.state.clone();
        let wrong = |what: &str| {
            RolloutError::Conflict(format!("rollout {id} is {state}: it cannot be {what}"))
        };
        match action {
            "start" => {
                if state != STATE_PLANNED {
                    return Err(wrong("started"));
                }
                r.body.state = STATE_RUNNING.into();
            }
            "pause" => {
                if state != STATE_RUNNING {
                    return Err(wrong("paused"));
                }
                r.body.state = STATE_PAUSED.into();
                r.body.paused_reason = if reason.is_empty() {
                    "paused by an operator".into()
                } else {
                    format!("paused by an operator: {}", proto::clean_text(reason, 200))
                };
            }
            "resume" => {
                if state != STATE_PAUSED {
                    return Err(wrong("resumed"));
                }
                r.body.state = STATE_RUNNING.into();
                r.body.paused_reason.clear();
                // The failures seen so far are accepted: only new ones pause it again.
                r.body.accepted = self.read(id, engine::wave_failures)?;
            }
            "approve" => {
                if state != STATE_RUNNING && state != STATE_PAUSED {
                    return Err(wrong("approved"));
                }
                let waiting = self.read(id, engine::current_wave)?;
                if !r.body.spec.approval || waiting <= r.body.approved {
                    return Err(RolloutError::Conflict(format!(
                        "rollout {id} waits for no approval"
                    )));
                }
                r.body.approved = waiting;
            }
            "abort" => {
                if !(state == STATE_PLANNED || state == STATE_RUNNING || state == STATE_PAUSED) {
                    return Err(wrong("aborted"));
                }
                r.body.state = STATE_ABORTED.into();
            }
            "rollback" => return self.rollback(r, desired, now).await,
            other => {
                return Err(RolloutError::Invalid(format!(
                    "unknown action {other:?}: start, pause, resume, approve, abort or rollback"
                )))
            }
        }
        r.body.updated = now;
        r.rev += 1;
        self.write_head(&r, Vec::new()).await?;
        let mut g = self.inner.lock();
        let full = g
            .list
            .iter_mut()
            .find(|x| x.body.id == id)
            .expect("found above");
        full.body = r.body;
        full.rev = r.rev;
        g.pins_gen += 1;
        let full = g
            .list
            .iter()
            .find(|x| x.body.id == id)
            .expect("found above");
        Ok(view::view(full, desired, now))
    }

    /// A rollout back to `r`'s previous version over the hosts `r` admitted, started at
    /// once; `r` stops admitting and lets go of its hosts once the rollback completed.
    async fn rollback(
        &self,
        mut r: Rollout,
        desired: &Desired,
        now: i64,
    ) -> Result<RolloutView, RolloutError> {
        use proto::rollout::*;
        if !r.in_effect() && r.body.state != STATE_PLANNED {
            return Err(RolloutError::Conflict(format!(
                "rollout {} is {}: nothing to roll back",
                r.body.id, r.body.state
            )));
        }
        if !r.body.rolled_back_by.is_empty() {
            return Err(RolloutError::Conflict(format!(
                "rollout {} is already rolled back by {}",
                r.body.id, r.body.rolled_back_by
            )));
        }
        if r.body.from_version.is_empty() {
            return Err(RolloutError::Conflict(format!(
                "rollout {} has no previous version to go back to",
                r.body.id
            )));
        }
        let mut spec = r.body.spec.clone();
        spec.version = r.body.from_version.clone();
        spec.tarball = r.body.from_tarball.clone();
        spec.sha256 = String::new();
        spec.approval = false;
        spec.start = true;
        let mut back = Rollout::create(&spec, desired, r.body.version.clone(), now)
            .map_err(RolloutError::Invalid)?;
        back.body.state = STATE_RUNNING.into();
        back.body.rollback_of = r.body.id.clone();
        // Only the hosts the rollout moved go back.
        back.body.scope = Some(r.body.id.clone());
        back.rev = 1;
        if r.active() {
            r.body.state = STATE_ABORTED.into();
        }
        r.body.rolled_back_by = back.body.id.clone();
        r.body.updated = now;
        r.rev += 1;
        self.write_head(&r, Vec::new()).await?;
        self.write_new(&back, Vec::new()).await?;
        let mut g = self.inner.lock();
        if let Some(full) = g.list.iter_mut().find(|x| x.body.id == r.body.id) {
            full.body = r.body;
            full.rev = r.rev;
        }
        let view = view::view(&back, desired, now);
        g.list.push(back);
        g.pins_gen += 1;
        Ok(view)
    }

    async fn write_new(&self, r: &Rollout, hosts: Vec<String>) -> Result<(), RolloutError> {
        self.write_head(r, hosts).await
    }

    /// Writes `r`'s head (its revision `r.rev`) and the named hosts' records; a conflict
    /// (another replica wrote first) is a 409 for an operator, who may try again.
    async fn write_head(&self, r: &Rollout, hosts: Vec<String>) -> Result<(), RolloutError> {
        let (row, host_rows) = r.encode(&hosts);
        if self.durable.put_rollout(row, host_rows).await? {
            Ok(())
        } else {
            // Someone else wrote it: take theirs.
            let _ = self.follow().await;
            Err(RolloutError::Conflict(format!(
                "rollout {} changed meanwhile (another replica); try again",
                r.body.id
            )))
        }
    }

    /// Rollout counts by state and, for rollouts in effect, hosts by wave and phase:
    /// `(state counts, [(id, agent, version, wave name, phase, hosts)])`.
    pub fn metrics(&self) -> (HashMap<String, u64>, Vec<view::WaveMetric>) {
        let g = self.inner.lock();
        let mut states = HashMap::new();
        let mut waves = Vec::new();
        for r in &g.list {
            *states.entry(r.body.state.clone()).or_insert(0) += 1;
        }
        for r in g
            .list
            .iter()
            .rev()
            .filter(|r| r.active() || r.in_effect())
            .take(view::MAX_METRIC_ROLLOUTS)
        {
            waves.extend(view::wave_metrics(r));
        }
        (states, waves)
    }
}

fn upsert(list: &mut Vec<Rollout>, r: Rollout) {
    match list.iter_mut().find(|x| x.body.id == r.body.id) {
        Some(x) => {
            // Keep what this replica computed of the fleet (hosts still pending).
            let assign = std::mem::take(&mut x.assign);
            *x = r;
            x.assign = assign;
            x.refresh_assign();
        }
        None => list.push(r),
    }
}
