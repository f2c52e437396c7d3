//! One BootAgent host's jobs: the queue of jobs handed out and not yet answered, the last
//! results, and the memory of failed or held agents that keeps derivation from looping.
//!
//! Invariants: a job stays in `pending` (and goes out with every status answer, same id)
//! until its result comes back; once its result is in, the id is never handed out again.
//! A derived job is only made for an agent with no job pending, and an operator job
//! replaces a pending derived one, so derivation and operators never race on one agent;
//! operator jobs for one agent queue in order. Everything is bounded per host.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use proto::bootagent::{Action, AgentStatus, Job, JobResult, Waiting, STATE_FATAL, STATE_KILLED};
use proto::bootagent::{STATE_RUNNING, STATE_STOPED};
use proto::legacy::Cmd;
use proto::AgentName;
use serde::{Deserialize, Serialize};

/// Most jobs one host may have pending; more are refused (operator) or wait (derived).
pub const MAX_PENDING_JOBS: usize = 32;
/// Job results kept per host, the oldest dropped first.
pub const MAX_RESULTS_KEPT: usize = 50;
/// Longest result message kept, in bytes (cut at a character boundary): the wire's rule.
pub use proto::rules::MAX_MESSAGE_LEN;
/// Most failed/held agents remembered per host. A host has one entry per configured
/// agent at most, so this is only reached with a config of that many agents.
pub const MAX_MEMOS: usize = 256;

/// What the desired state asks of one agent on one host, in BootAgent terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    pub name: AgentName,
    pub version: String,
    /// `None` for an empty or unknown `cmd`: nothing is derived.
    pub cmd: Option<Cmd>,
    /// Full artifact URL.
    pub url: String,
    /// `SHA256:<hex>`, or `MD5:<hex>` while no SHA-256 is known (unless `requireSha256`);
    /// `None` when neither can be had.
    pub checksum: Option<String>,
    /// MD5 of the `.md5` file, sent beside a SHA-256 checksum.
    pub md5: Option<String>,
    /// Why `checksum` is `None`, in words.
    pub no_checksum: String,
    pub envs: BTreeMap<String, String>,
    pub limits: BTreeMap<String, String>,
}

impl Want {
    /// A digest of everything a derived job is made from: when it changes, the desired
    /// state for this agent changed and an earlier failure no longer blocks derivation.
    pub fn fingerprint(&self) -> u64 {
        let mut h = DefaultHasher::new();
        (
            &self.version,
            self.cmd.map(|c| c == Cmd::Start),
            &self.url,
            &self.checksum,
            &self.md5,
            &self.envs,
            &self.limits,
        )
            .hash(&mut h);
        h.finish()
    }
}

/// Where a pending job came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Origin {
    /// Derived from the desired state with this [`Want::fingerprint`].
    Derived { fingerprint: u64 },
    /// Queued by an operator in this batch.
    Operator { batch: Arc<str> },
}

/// A job handed out and not yet answered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pending {
    pub job: Job,
    /// The agent the job is about (`job.name`, checked); `None` for `config`.
    pub agent: Option<AgentName>,
    pub origin: Origin,
    /// Unix seconds.
    pub created: i64,
    /// Status answers that carried it (this process's count: not stored, so that an
    /// answer that changed nothing else writes nothing).
    #[serde(skip)]
    pub sent: u32,
}

/// A job result as kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub id: String,
    pub action: Action,
    pub name: String,
    pub version: String,
    pub errcode: i32,
    pub message: String,
    pub finished: i64,
}

/// Why derivation left an agent alone this time (for the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// Install or upgrade wanted but no checksum of the artifact is known yet.
    NoChecksum {
        name: AgentName,
        version: String,
        why: String,
    },
    /// The host's queue is full.
    QueueFull { name: AgentName },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum MemoKind {
    /// A derived job for this desired state failed.
    Failed,
    /// An operator stopped or uninstalled the agent; derivation keeps off it.
    Held,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Memo {
    fingerprint: u64,
    kind: MemoKind,
    /// What happened, for operators (`install 1.2.0 failed (errcode 2): ...`).
    why: String,
}

/// Where one job id stands on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState<'a> {
    Pending,
    Finished(&'a Outcome),
    Unknown,
}

/// One host's jobs.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct HostJobs {
    pending: Vec<Pending>,
    results: VecDeque<Outcome>,
    memos: HashMap<AgentName, Memo>,
    /// Agents the last derivation wanted a job for and could not hand one out, with why.
    waiting: Vec<Waiting>,
    /// The host restarts its agents itself (its last report said `supervised`): no
    /// `restart` is derived from a `stoped`, `fatal` or `killed` report, which would fight
    /// its restart policy and clear its `fatal` verdicts.
    pub supervised: bool,
}

pub(crate) use proto::clean_text;

/// A fresh job id.
pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

impl HostJobs {
    /// Applies results the host reported. Results for ids not pending (already answered,
    /// or unknown) are ignored; returns how many were applied.
    pub fn apply_results(&mut self, results: &[JobResult], now: i64) -> usize {
        let mut applied = 0;
        for r in results {
            let Some(i) = self.pending.iter().position(|p| p.job.id == r.id) else {
                continue;
            };
            let p = self.pending.remove(i);
            if r.errcode != 0 {
                if let (Origin::Derived { fingerprint }, Some(agent)) = (&p.origin, &p.agent) {
                    let version = if p.job.version.is_empty() {
                        String::new()
                    } else {
                        format!(" {}", p.job.version)
                    };
                    let why = format!(
                        "{}{version} failed (errcode {}): {}",
                        p.job.action.as_str(),
                        r.errcode,
                        clean_text(&r.message, 256)
                    );
                    self.remember(agent, *fingerprint, MemoKind::Failed, why);
                }
            }
            let end = if r.errcode == 0 {
                crate::metrics::JobEnd::Ok
            } else {
                crate::metrics::JobEnd::Failed
            };
            crate::metrics::job_finished(p.job.action, end);
            self.push_outcome(Outcome {
                id: p.job.id,
                action: p.job.action,
                name: p.job.name,
                version: p.job.version,
                errcode: r.errcode,
                message: proto::rules::clean_message(&r.message),
                finished: now,
            });
            applied += 1;
        }
        applied
    }

    fn push_outcome(&mut self, o: Outcome) {
        if self.results.len() >= MAX_RESULTS_KEPT {
            self.results.pop_front();
        }
        self.results.push_back(o);
    }

    fn remember(&mut self, name: &AgentName, fingerprint: u64, kind: MemoKind, why: String) {
        if self.memos.len() >= MAX_MEMOS && !self.memos.contains_key(name) {
            // Keep the bound; losing a memo only means one more attempt.
            if let Some(k) = self.memos.keys().next().cloned() {
                self.memos.remove(&k);
            }
        }
        self.memos.insert(
            name.clone(),
            Memo {
                fingerprint,
                kind,
                why,
            },
        );
    }

    /// Derives jobs from what the desired state wants and what the host reported, and
    /// queues them. Pending derived jobs made from an outdated desired state are dropped
    /// (recorded as superseded), since the host would otherwise act on a stale order.
    pub fn derive(&mut self, wants: &[Want], reported: &[AgentStatus], now: i64) -> Vec<Skip> {
        let mut skips = Vec::new();
        self.waiting.clear();
        self.drop_superseded(wants, now);
        for w in wants {
            if self.pending.iter().any(|p| p.job.name == w.name) {
                continue;
            }
            let fp = w.fingerprint();
            if self.memos.get(&w.name).is_some_and(|m| m.fingerprint != fp) {
                // The desired state changed since the failure or hold: derive again.
                self.memos.remove(&w.name);
            }
            let reported = reported.iter().find(|a| a.name == w.name);
            let Some(action) = wanted_action(w, reported, self.supervised) else {
                continue;
            };
            if let Some(m) = self.memos.get(&w.name) {
                let why = match m.kind {
                    MemoKind::Failed => format!(
                        "not retried: {}; POST /api/retry or change the desired state to try again",
                        m.why
                    ),
                    MemoKind::Held => format!(
                        "held: {}; POST /api/retry or change the desired state to release it",
                        m.why
                    ),
                };
                self.wait(w, why);
                continue;
            }
            let artifact = matches!(action, Action::Install | Action::Upgrade);
            if artifact && w.checksum.is_none() {
                self.wait(w, w.no_checksum.clone());
                skips.push(Skip::NoChecksum {
                    name: w.name.clone(),
                    version: w.version.clone(),
                    why: w.no_checksum.clone(),
                });
                continue;
            }
            if self.pending.len() >= MAX_PENDING_JOBS {
                self.wait(
                    w,
                    format!(
                        "waiting: the host's job queue is full ({MAX_PENDING_JOBS} jobs pending)"
                    ),
                );
                skips.push(Skip::QueueFull {
                    name: w.name.clone(),
                });
                continue;
            }
            let mut job = Job {
                id: new_id(),
                action,
                name: w.name.to_string(),
                version: String::new(),
                url: String::new(),
                checksum: String::new(),
                md5: String::new(),
                envs: BTreeMap::new(),
                limits: BTreeMap::new(),
                svrlist: String::new(),
                step: None,
            };
            if artifact {
                job.version = w.version.clone();
                job.url = w.url.clone();
                job.checksum = w.checksum.clone().unwrap_or_default();
                job.md5 = w.md5.clone().unwrap_or_default();
            }
            if action != Action::Stop {
                // Env vars and limits are set at install and refreshed by later jobs.
                job.envs = w.envs.clone();
                job.limits = w.limits.clone();
            }
            crate::metrics::job_queued(job.action, false);
            self.pending.push(Pending {
                job,
                agent: Some(w.name.clone()),
                origin: Origin::Derived { fingerprint: fp },
                created: now,
                sent: 0,
            });
        }
        skips
    }

    fn wait(&mut self, w: &Want, reason: String) {
        if self.waiting.len() < proto::bootagent::MAX_WAITING {
            self.waiting.push(Waiting {
                name: w.name.to_string(),
                version: w.version.clone(),
                reason: clean_text(&reason, proto::bootagent::MAX_WAITING_REASON_LEN),
            });
        }
    }

    /// What the last derivation could not hand out, and why.
    pub fn waiting(&self) -> &[Waiting] {
        &self.waiting
    }

    fn drop_superseded(&mut self, wants: &[Want], now: i64) {
        let mut i = 0;
        while i < self.pending.len() {
            let stale = match self.pending[i].origin {
                Origin::Derived { fingerprint } => !wants
                    .iter()
                    .any(|w| w.name == self.pending[i].job.name && w.fingerprint() == fingerprint),
                Origin::Operator { .. } => false,
            };
            if stale {
                let p = self.pending.remove(i);
                crate::metrics::job_finished(p.job.action, crate::metrics::JobEnd::Superseded);
                self.push_outcome(Outcome {
                    id: p.job.id,
                    action: p.job.action,
                    name: p.job.name,
                    version: p.job.version,
                    errcode: -1,
                    message: "superseded: the desired state changed before a result came back"
                        .into(),
                    finished: now,
                });
            } else {
                i += 1;
            }
        }
    }

    /// Queues an operator job. A job about an agent replaces a pending derived job for the
    /// same agent (the operator's word wins) and queues behind earlier operator jobs for
    /// it; it is refused when the queue is full. `hold` (the agent's current desired
    /// fingerprint) keeps derivation off the agent until the desired state changes.
    /// `agent` is the agent of `job.name`, checked (`None` for `config`).
    pub fn push_operator(
        &mut self,
        job: Job,
        agent: Option<AgentName>,
        batch: Arc<str>,
        now: i64,
        hold: Option<u64>,
    ) -> Result<(), &'static str> {
        if !job.name.is_empty() {
            self.pending
                .retain(|p| p.job.name != job.name || matches!(p.origin, Origin::Operator { .. }));
        }
        if self.pending.len() >= MAX_PENDING_JOBS {
            return Err("the host's job queue is full");
        }
        if let (Some(fp), Some(agent)) = (hold, &agent) {
            let why = format!(
                "an operator job ({} in batch {batch}) stopped or removed it",
                job.action.as_str()
            );
            self.remember(agent, fp, MemoKind::Held, why);
        }
        crate::metrics::job_queued(job.action, true);
        self.pending.push(Pending {
            job,
            agent,
            origin: Origin::Operator { batch },
            created: now,
            sent: 0,
        });
        Ok(())
    }

    /// The jobs to put in this status answer: every pending job, each counted as sent.
    pub fn to_send(&mut self) -> Vec<Job> {
        self.pending
            .iter_mut()
            .map(|p| {
                p.sent = p.sent.saturating_add(1);
                p.job.clone()
            })
            .collect()
    }

    /// Forgets failures and holds (of agent `name`, or all); returns how many.
    pub fn clear_memos(&mut self, name: Option<&str>) -> usize {
        match name {
            Some(n) => usize::from(self.memos.remove(n).is_some()),
            None => {
                let n = self.memos.len();
                self.memos.clear();
                n
            }
        }
    }

    pub fn state_of(&self, id: &str) -> JobState<'_> {
        if self.pending.iter().any(|p| p.job.id == id) {
            return JobState::Pending;
        }
        match self.results.iter().rev().find(|o| o.id == id) {
            Some(o) => JobState::Finished(o),
            None => JobState::Unknown,
        }
    }

    /// Agents derivation keeps off, sorted, with `failed` or `held`.
    pub fn blocked(&self) -> Vec<(String, &'static str)> {
        let mut out: Vec<_> = self
            .memos
            .iter()
            .map(|(n, m)| {
                let why = match m.kind {
                    MemoKind::Failed => "failed",
                    MemoKind::Held => "held",
                };
                (n.to_string(), why)
            })
            .collect();
        out.sort();
        out
    }

    pub fn pending(&self) -> &[Pending] {
        &self.pending
    }

    pub fn results(&self) -> impl Iterator<Item = &Outcome> {
        self.results.iter()
    }
}

/// The job one agent needs, if any:
/// - `cmd: start`, not reported → `install`;
/// - `cmd: start`, another version reported → `upgrade`;
/// - `cmd: start`, same version, `stoped`, `fatal` or `killed` → `restart`, unless the
///   host supervises its agents (`supervised`): then its own policy restarts them, and
///   a `fatal` agent waits for a new desired version or an operator's `restart`/`reset`;
/// - `cmd: stop`, reported `running` → `stop`.
///
/// A free-text status (an error) derives nothing: the host reports it, people look.
fn wanted_action(w: &Want, reported: Option<&AgentStatus>, supervised: bool) -> Option<Action> {
    match (w.cmd?, reported) {
        (Cmd::Start, None) => Some(Action::Install),
        (Cmd::Start, Some(a)) if a.version != w.version => Some(Action::Upgrade),
        (Cmd::Start, Some(a))
            if !supervised
                && matches!(a.status.as_str(), STATE_STOPED | STATE_FATAL | STATE_KILLED) =>
        {
            Some(Action::Restart)
        }
        (Cmd::Stop, Some(a)) if a.status == STATE_RUNNING => Some(Action::Stop),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(name: &str) -> AgentName {
        AgentName::parse(name).unwrap()
    }

    fn want(version: &str, cmd: Option<Cmd>, sha: bool) -> Want {
        Want {
            name: agent("basic"),
            version: version.into(),
            cmd,
            url: format!("http://d/basic-{version}.tar.gz"),
            checksum: sha.then(|| format!("SHA256:{}", "a".repeat(64))),
            md5: sha.then(|| "b".repeat(32)),
            no_checksum: format!("waiting: no checksum for basic-{version}.tar.gz yet"),
            envs: [("PATH".to_string(), "/usr/bin".to_string())].into(),
            limits: [("CPU".to_string(), "10%".to_string())].into(),
        }
    }

    fn rep(version: &str, status: &str) -> AgentStatus {
        AgentStatus {
            name: "basic".into(),
            version: version.into(),
            status: status.into(),
            uptime: 1,
        }
    }

    fn result(id: &str, errcode: i32) -> JobResult {
        JobResult {
            id: id.into(),
            errcode,
            message: if errcode == 0 { "success" } else { "boom" }.into(),
        }
    }

    #[test]
    fn derivation_table() {
        let start = Some(Cmd::Start);
        let stop = Some(Cmd::Stop);
        // (want version, cmd, reported, expected action)
        type Case = (
            &'static str,
            Option<Cmd>,
            Option<AgentStatus>,
            Option<Action>,
        );
        let cases: Vec<Case> = vec![
            ("1", start, None, Some(Action::Install)),
            (
                "2",
                start,
                Some(rep("1", STATE_RUNNING)),
                Some(Action::Upgrade),
            ),
            ("1", start, Some(rep("1", STATE_RUNNING)), None),
            (
                "1",
                start,
                Some(rep("1", STATE_STOPED)),
                Some(Action::Restart),
            ),
            (
                "1",
                start,
                Some(rep("1", STATE_FATAL)),
                Some(Action::Restart),
            ),
            (
                "1",
                start,
                Some(rep("1", STATE_KILLED)),
                Some(Action::Restart),
            ),
            ("1", start, Some(rep("1", "control: no such file")), None),
            ("1", stop, Some(rep("1", STATE_RUNNING)), Some(Action::Stop)),
            ("1", stop, Some(rep("0", STATE_RUNNING)), Some(Action::Stop)),
            ("1", stop, Some(rep("1", STATE_STOPED)), None),
            ("1", stop, None, None),
            ("1", None, None, None),
        ];
        for (v, cmd, reported, expected) in cases {
            let got = wanted_action(&want(v, cmd, true), reported.as_ref(), false);
            assert_eq!(got, expected, "want {v} {cmd:?}, reported {reported:?}");
            // A supervising host restarts by itself: nothing but install, upgrade and stop.
            let sup = wanted_action(&want(v, cmd, true), reported.as_ref(), true);
            let expected = expected.filter(|a| *a != Action::Restart);
            assert_eq!(
                sup, expected,
                "supervised: want {v} {cmd:?}, reported {reported:?}"
            );
        }
    }

    #[test]
    fn install_carries_everything_and_is_resent_until_answered_then_never() {
        let mut h = HostJobs::default();
        let w = [want("1", Some(Cmd::Start), true)];
        assert!(h.derive(&w, &[], 10).is_empty());
        let first = h.to_send();
        assert_eq!(first.len(), 1);
        let j = &first[0];
        assert_eq!(j.action, Action::Install);
        assert_eq!(j.version, "1");
        assert_eq!(j.url, "http://d/basic-1.tar.gz");
        assert!(proto::bootagent::parse_checksum(&j.checksum).is_some());
        assert_eq!(j.envs["PATH"], "/usr/bin");
        assert_eq!(j.limits["CPU"], "10%");
        // Not answered: the same job again, not a second one.
        h.derive(&w, &[], 20);
        assert_eq!(h.to_send(), first);
        assert_eq!(h.pending()[0].sent, 2);
        // Answered with success; the host now runs it: nothing more.
        assert_eq!(h.apply_results(&[result(&j.id, 0)], 30), 1);
        h.derive(&w, &[rep("1", STATE_RUNNING)], 30);
        assert!(h.to_send().is_empty());
        assert!(matches!(h.state_of(&j.id), JobState::Finished(o) if o.errcode == 0));
        // A repeated result for the same id changes nothing.
        assert_eq!(h.apply_results(&[result(&j.id, 1)], 40), 0);
        assert_eq!(h.results().count(), 1);
    }

    #[test]
    fn failed_job_is_not_derived_again_until_the_desired_state_changes() {
        let mut h = HostJobs::default();
        let w1 = [want("1", Some(Cmd::Start), true)];
        h.derive(&w1, &[], 0);
        let id = h.to_send()[0].id.clone();
        h.apply_results(&[result(&id, 3)], 1);
        for t in 2..5 {
            h.derive(&w1, &[], t);
            assert!(h.to_send().is_empty(), "round {t}");
        }
        let why = &h.waiting()[0].reason;
        assert!(
            why.starts_with("not retried: install 1 failed (errcode 3): boom;"),
            "{why}"
        );
        let w2 = [want("2", Some(Cmd::Start), true)];
        h.derive(&w2, &[], 6);
        let again = h.to_send();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].version, "2");
        assert_ne!(again[0].id, id);
        // The operator can also clear it.
        h.apply_results(&[result(&again[0].id, 3)], 7);
        h.derive(&w2, &[], 8);
        assert!(h.to_send().is_empty());
        assert_eq!(h.clear_memos(Some("basic")), 1);
        h.derive(&w2, &[], 9);
        assert_eq!(h.to_send().len(), 1);
    }

    #[test]
    fn no_checksum_no_artifact_job() {
        let mut h = HostJobs::default();
        let skips = h.derive(&[want("1", Some(Cmd::Start), false)], &[], 0);
        assert_eq!(
            skips,
            vec![Skip::NoChecksum {
                name: agent("basic"),
                version: "1".into(),
                why: "waiting: no checksum for basic-1.tar.gz yet".into(),
            }]
        );
        assert!(h.to_send().is_empty());
        // Operators see why nothing happens.
        assert_eq!(h.waiting().len(), 1);
        assert_eq!(
            h.waiting()[0].reason,
            "waiting: no checksum for basic-1.tar.gz yet"
        );
        // A restart needs no artifact.
        h.derive(
            &[want("1", Some(Cmd::Start), false)],
            &[rep("1", STATE_STOPED)],
            0,
        );
        assert_eq!(h.to_send()[0].action, Action::Restart);
    }

    #[test]
    fn stale_derived_job_is_superseded_when_the_config_changes() {
        let mut h = HostJobs::default();
        h.derive(&[want("1", Some(Cmd::Start), true)], &[], 0);
        let old = h.to_send()[0].id.clone();
        h.derive(&[want("2", Some(Cmd::Start), true)], &[], 1);
        let now = h.to_send();
        assert_eq!(now.len(), 1);
        assert_eq!(now[0].version, "2");
        assert!(matches!(h.state_of(&old), JobState::Finished(o) if o.errcode == -1));
        // An agent removed from the config: its pending job goes too.
        h.derive(&[], &[], 2);
        assert!(h.to_send().is_empty());
    }

    #[test]
    fn operator_stop_holds_the_agent_and_queues_are_bounded() {
        let mut h = HostJobs::default();
        let w = [want("1", Some(Cmd::Start), true)];
        h.derive(&w, &[rep("1", STATE_STOPED)], 0);
        assert_eq!(h.to_send()[0].action, Action::Restart);
        let stop = Job {
            id: new_id(),
            action: Action::Stop,
            name: "basic".into(),
            version: String::new(),
            url: String::new(),
            checksum: String::new(),
            md5: String::new(),
            envs: BTreeMap::new(),
            limits: BTreeMap::new(),
            svrlist: String::new(),
            step: None,
        };
        h.push_operator(
            stop.clone(),
            Some(agent("basic")),
            "b".into(),
            1,
            Some(w[0].fingerprint()),
        )
        .unwrap();
        // The derived restart was replaced by the operator's stop.
        assert_eq!(h.to_send(), vec![stop.clone()]);
        // A second operator job for the same agent queues behind the first.
        let mut uninstall = stop.clone();
        uninstall.id = new_id();
        uninstall.action = Action::Uninstall;
        h.push_operator(
            uninstall.clone(),
            Some(agent("basic")),
            "b".into(),
            1,
            Some(w[0].fingerprint()),
        )
        .unwrap();
        assert_eq!(h.to_send(), vec![stop.clone(), uninstall.clone()]);
        h.apply_results(&[result(&stop.id, 0), result(&uninstall.id, 0)], 2);
        h.derive(&w, &[rep("1", STATE_STOPED)], 3);
        assert!(h.to_send().is_empty(), "held after an operator stop");
        assert!(h.waiting()[0]
            .reason
            .starts_with("held: an operator job (uninstall in batch b)"));
        assert_eq!(h.blocked(), vec![("basic".to_string(), "held")]);
        for i in 0..MAX_PENDING_JOBS {
            let mut j = stop.clone();
            j.id = new_id();
            j.name = format!("a{i}");
            let a = Some(agent(&j.name));
            h.push_operator(j, a, "b".into(), 4, None).unwrap();
        }
        let mut j = stop.clone();
        j.name = "one-more".into();
        assert_eq!(
            h.push_operator(j, Some(agent("one-more")), "b".into(), 4, None),
            Err("the host's job queue is full")
        );
        for i in 0..MAX_PENDING_JOBS {
            let id = h.pending()[0].job.id.clone();
            h.apply_results(&[result(&id, i as i32)], 5);
        }
        assert_eq!(
            h.results().count(),
            MAX_RESULTS_KEPT.min(MAX_PENDING_JOBS + 2)
        );
    }

    #[test]
    fn result_messages_are_kept_cut_and_cleaned() {
        let mut h = HostJobs::default();
        h.derive(&[want("1", Some(Cmd::Start), true)], &[], 0);
        let id = h.to_send()[0].id.clone();
        let r = JobResult {
            id,
            errcode: 0,
            message: format!("a\nb{}", "x".repeat(5000)),
        };
        h.apply_results(&[r], 1);
        let kept = &h.results().next().unwrap().message;
        assert_eq!(kept.len(), MAX_MESSAGE_LEN);
        assert!(kept.starts_with("a b"), "{kept}");
    }
}
