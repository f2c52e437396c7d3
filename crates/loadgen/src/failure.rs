//! Failure injection for the converge mode: a stable share of the simulated hosts fails
//! one version the way a host running ops-updater reports it, so that a rollout's error
//! threshold can be tried against a real server.
//!
//! - Which hosts fail: [`fail_bucket`] of the hostname, a SHA-256 of
//!   `"loadgen-fail:" + hostname` (first 8 bytes, big-endian, modulo [`FAIL_BUCKETS`]),
//!   below [`fail_bound`] of the share. The prefix makes it independent of
//!   `proto::rollout::percent_bucket` (plain SHA-256 of the hostname), which cuts
//!   ops-meta's percentage waves: a 10 % wave holds about 10 % failing hosts, not all or
//!   none of them. The same hosts fail in every run.
//! - How they fail ([`FailMode`]): `never-start` keeps the old version running and writes
//!   one `rolled_back` event; `crash-after=S` runs the new version for S seconds, then
//!   `exited` + `restarted`, and after [`CRASHES_TO_FATAL`] crashes `fatal` and stays so;
//!   `oom-after=S` the same with `killed`. These are the events (kinds, states, restart
//!   counts) ops-updater's supervisor writes.
//! - Only a host that failed holds a [`HostFailure`] (its agents' phases and the events the
//!   server did not take yet); the rest of the fleet costs nothing more.

use std::str::FromStr;
use std::time::Duration;

use proto::events::{self, Event};
use tokio::time::Instant;

/// Buckets [`fail_bucket`] cuts hosts into: a share is matched to 0.01 %.
pub const FAIL_BUCKETS: u64 = 10_000;
/// What is hashed before the hostname, so the failing hosts are not a percentage wave.
pub const FAIL_HASH_PREFIX: &str = "loadgen-fail:";
/// Crashes after which a crashing agent is `fatal`, as ops-updater's default policy gives
/// up after three quick exits.
pub const CRASHES_TO_FATAL: u32 = 3;

/// A host's failure bucket (module docs).
pub fn fail_bucket(hostname: &str) -> u64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(FAIL_HASH_PREFIX.as_bytes());
    h.update(hostname.as_bytes());
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_be_bytes(b) % FAIL_BUCKETS
}

/// The bucket bound of a share in `0..=1`: hosts with a bucket below it fail.
pub fn fail_bound(share: f64) -> u64 {
    (share.clamp(0.0, 1.0) * FAIL_BUCKETS as f64).round() as u64
}

/// How a failing host fails the version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailMode {
    /// The new version never starts: the old one keeps running, one `rolled_back`.
    NeverStart,
    /// The new version runs this long, then exits; restarted until it is `fatal`.
    CrashAfter(Duration),
    /// As [`FailMode::CrashAfter`], killed by the OOM killer (`killed` events).
    OomAfter(Duration),
}

impl FromStr for FailMode {
    type Err = String;

    fn from_str(s: &str) -> Result<FailMode, String> {
        let secs = |v: &str| -> Result<Duration, String> {
            let n: f64 = v
                .parse()
                .map_err(|_| format!("{s:?}: {v:?} is not a number of seconds"))?;
            match Duration::try_from_secs_f64(n) {
                Ok(d) if !d.is_zero() => Ok(d),
                _ => Err(format!("{s:?}: seconds must be positive, got {v}")),
            }
        };
        if s == "never-start" {
            return Ok(FailMode::NeverStart);
        }
        if let Some(v) = s.strip_prefix("crash-after=") {
            return secs(v).map(FailMode::CrashAfter);
        }
        if let Some(v) = s.strip_prefix("oom-after=") {
            return secs(v).map(FailMode::OomAfter);
        }
        Err(format!(
            "fail mode {s:?}: expected never-start, crash-after=SECS or oom-after=SECS"
        ))
    }
}

/// Which hosts fail which version, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct FailSpec {
    /// Share of the hosts that fail, in `0..=1`.
    pub share: f64,
    /// The only version that fails; every other one installs and runs.
    pub version: String,
    pub mode: FailMode,
}

impl FailSpec {
    /// Whether host `hostname` fails [`FailSpec::version`].
    pub fn picks(&self, hostname: &str) -> bool {
        fail_bucket(hostname) < fail_bound(self.share)
    }
}

/// One agent of a failing host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Never started; the old version runs (`never-start`).
    Refused,
    /// The new version runs since `since`, after `crashes` crashes.
    Running { since: Instant, crashes: u32 },
    /// Gave up after [`CRASHES_TO_FATAL`] crashes.
    Fatal,
}

/// What a failing agent reports instead of its plain `started`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// The new version runs (between crashes) or the old one does (never started).
    Running,
    /// The supervisor gave up on it.
    Fatal,
}

/// A host that failed the version: its failing agents and the events not taken yet.
#[derive(Debug)]
pub struct HostFailure {
    /// (agent index in the fleet, its phase).
    agents: Vec<(u8, Phase)>,
    next_seq: u64,
    /// Oldest first; the first [`events::MAX_EVENTS_PER_REPORT`] go with each report.
    pending: Vec<Event>,
}

impl HostFailure {
    /// A host's first failure at Unix time `unix_ms` (milliseconds). Its seqs start there,
    /// as ops-updater's journal starts at the clock, so a later run on the same server does
    /// not reuse the seqs of an earlier one (the server drops an event whose (host, seq)
    /// it holds).
    pub fn new(unix_ms: u64) -> HostFailure {
        HostFailure {
            agents: Vec::new(),
            next_seq: unix_ms.min(events_seq_cap()),
            pending: Vec::new(),
        }
    }

    fn phase(&self, agent: usize) -> Option<Phase> {
        self.agents
            .iter()
            .find(|(a, _)| usize::from(*a) == agent)
            .map(|(_, p)| *p)
    }

    /// Whether agent `agent` is failing already (told the version before).
    pub fn has(&self, agent: usize) -> bool {
        self.phase(agent).is_some()
    }

    /// What agent `agent` reports over its version's plain state, if it is failing.
    pub fn held(&self, agent: usize) -> Option<Held> {
        self.phase(agent).map(|p| match p {
            Phase::Fatal => Held::Fatal,
            Phase::Refused | Phase::Running { .. } => Held::Running,
        })
    }

    fn push(&mut self, unix: i64, agent: &str, version: &str, kind: &str, cause: String) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.pending.push(Event {
            seq,
            time: unix,
            agent: agent.to_string(),
            version: version.to_string(),
            kind: kind.to_string(),
            cause,
            output: Vec::new(),
            state: String::new(),
            restarts: 0,
        });
        seq
    }

    fn last_event(&mut self) -> &mut Event {
        self.pending.last_mut().expect("just pushed")
    }

    /// Agent `agent` (index `index`, running `old`) is told to install `spec.version` at
    /// `now`. Returns whether it runs the new version now (`false`: the old one stays).
    pub fn install(
        &mut self,
        spec: &FailSpec,
        index: usize,
        agent: &str,
        old: &str,
        now: Instant,
        unix: i64,
    ) -> bool {
        let index8 = u8::try_from(index).expect("at most 64 agents");
        match spec.mode {
            FailMode::NeverStart => {
                self.agents.push((index8, Phase::Refused));
                let cause = format!(
                    "{} did not start; rolled back to {old}: control start failed (simulated by ops-loadgen)",
                    spec.version
                );
                self.push(unix, agent, &spec.version, events::KIND_ROLLED_BACK, cause);
                self.last_event().state = proto::bootagent::STATE_RUNNING.to_string();
                false
            }
            FailMode::CrashAfter(_) | FailMode::OomAfter(_) => {
                self.agents.push((
                    index8,
                    Phase::Running {
                        since: now,
                        crashes: 0,
                    },
                ));
                true
            }
        }
    }

    /// Agent `agent` is told another version: its failure is over.
    pub fn forget(&mut self, agent: usize) {
        self.agents.retain(|(a, _)| usize::from(*a) != agent);
    }

    /// Runs the crash clocks up to `now` (`unix` its Unix time): every `S` seconds of
    /// running is one crash, with the events ops-updater writes for it.
    pub fn advance(&mut self, spec: &FailSpec, names: &[String], now: Instant, unix: i64) {
        let (after, oom) = match spec.mode {
            FailMode::NeverStart => return,
            FailMode::CrashAfter(s) => (s, false),
            FailMode::OomAfter(s) => (s, true),
        };
        for i in 0..self.agents.len() {
            while let (a, Phase::Running { since, crashes }) = self.agents[i] {
                if now.saturating_duration_since(since) < after {
                    break;
                }
                let crashes = crashes + 1;
                let name = names[usize::from(a)].as_str();
                let (kind, cause, between) = if oom {
                    (
                        events::KIND_KILLED,
                        "killed by the OOM killer: memory limit (simulated by ops-loadgen)",
                        proto::bootagent::STATE_KILLED,
                    )
                } else {
                    (
                        events::KIND_EXITED,
                        "exited: exit code 3 (simulated by ops-loadgen)",
                        proto::bootagent::STATE_STOPED,
                    )
                };
                let fatal = crashes >= CRASHES_TO_FATAL;
                self.push(unix, name, &spec.version, kind, cause.to_string());
                let e = self.last_event();
                e.state = if fatal {
                    proto::bootagent::STATE_FATAL
                } else {
                    between
                }
                .to_string();
                e.restarts = crashes - 1;
                if fatal {
                    self.push(
                        unix,
                        name,
                        &spec.version,
                        events::KIND_FATAL,
                        format!("{crashes} consecutive failures; last: {cause}"),
                    );
                    let e = self.last_event();
                    e.state = proto::bootagent::STATE_FATAL.to_string();
                    e.restarts = crashes - 1;
                    self.agents[i].1 = Phase::Fatal;
                } else {
                    self.push(
                        unix,
                        name,
                        &spec.version,
                        events::KIND_RESTARTED,
                        "restarted by the supervisor".to_string(),
                    );
                    let e = self.last_event();
                    e.state = proto::bootagent::STATE_RUNNING.to_string();
                    e.restarts = crashes;
                    self.agents[i].1 = Phase::Running {
                        since: since + after,
                        crashes,
                    };
                }
            }
        }
    }

    /// The events the next report carries.
    pub fn to_send(&self) -> &[Event] {
        &self.pending[..self.pending.len().min(events::MAX_EVENTS_PER_REPORT)]
    }

    /// The server took the first `n` events: they are never sent again.
    pub fn taken(&mut self, n: usize) {
        self.pending.drain(..n.min(self.pending.len()));
    }

    /// Every failing agent reached its end (never started, or `fatal`) and the server
    /// took every event.
    pub fn terminal(&self) -> bool {
        self.pending.is_empty()
            && !self.agents.is_empty()
            && self
                .agents
                .iter()
                .all(|(_, p)| matches!(p, Phase::Refused | Phase::Fatal))
    }

    /// Nothing fails any more and nothing is left to send: the host needs no record.
    pub fn is_empty(&self) -> bool {
        self.agents.is_empty() && self.pending.is_empty()
    }
}

/// The highest seq a host starts at: well inside what a JSON reader reading numbers as
/// doubles keeps exact (2^53), with room to count on.
const fn events_seq_cap() -> u64 {
    (1 << 53) - (1 << 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(mode: FailMode) -> FailSpec {
        FailSpec {
            share: 0.2,
            version: "2.0.0".into(),
            mode,
        }
    }

    #[test]
    fn modes_parse_and_bad_ones_are_named() {
        assert_eq!("never-start".parse(), Ok(FailMode::NeverStart));
        assert_eq!(
            "crash-after=1.5".parse(),
            Ok(FailMode::CrashAfter(Duration::from_millis(1500)))
        );
        assert_eq!(
            "oom-after=2".parse(),
            Ok(FailMode::OomAfter(Duration::from_secs(2)))
        );
        for bad in [
            "crash",
            "crash-after=",
            "crash-after=0",
            "oom-after=-1",
            "x",
        ] {
            let e = bad.parse::<FailMode>().unwrap_err();
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn the_share_picks_about_that_many_hosts_and_not_the_percent_waves() {
        let s = spec(FailMode::NeverStart);
        let names: Vec<String> = (0..10_000).map(|i| format!("sim-{i:09}")).collect();
        let picked: Vec<&String> = names.iter().filter(|h| s.picks(h)).collect();
        assert!((1800..=2200).contains(&picked.len()), "{}", picked.len());
        // Of the hosts in a 20 % percentage wave, about 20 % fail: the hashes differ.
        let wave: Vec<&String> = names
            .iter()
            .filter(|h| proto::rollout::percent_bucket(h) < proto::rollout::percent_bound(20.0))
            .collect();
        let both = wave.iter().filter(|h| s.picks(h)).count();
        let share = both as f64 / wave.len() as f64;
        assert!((0.15..0.25).contains(&share), "{share}");
        assert_eq!(fail_bound(0.0), 0);
        assert!(names.iter().all(|h| !FailSpec {
            share: 0.0,
            ..s.clone()
        }
        .picks(h)));
        assert!(names.iter().all(|h| FailSpec {
            share: 1.0,
            ..s.clone()
        }
        .picks(h)));
    }

    #[test]
    fn never_start_writes_one_rolled_back_and_keeps_the_old_version() {
        let s = spec(FailMode::NeverStart);
        let mut f = HostFailure::new(1_000);
        let now = Instant::now();
        assert!(!f.install(&s, 1, "agent-1", "1.0.0", now, 7));
        assert!(f.has(1) && !f.has(0));
        assert_eq!(f.held(1), Some(Held::Running));
        let names = vec!["agent-0".to_string(), "agent-1".to_string()];
        f.advance(&s, &names, now + Duration::from_secs(100), 8);
        let sent: Vec<_> = f.to_send().to_vec();
        assert_eq!(sent.len(), 1);
        let e = &sent[0];
        assert_eq!(
            (e.seq, e.agent.as_str(), e.version.as_str(), e.kind.as_str()),
            (1_000, "agent-1", "2.0.0", "rolled_back")
        );
        assert!(e.cause.contains("rolled back to 1.0.0"), "{}", e.cause);
        assert!(!f.terminal(), "not before the server took it");
        f.taken(1);
        assert!(f.terminal());
        assert!(f.to_send().is_empty());
        f.forget(1);
        assert!(f.is_empty());
    }

    #[test]
    fn crashes_restart_then_end_fatal_with_increasing_seqs() {
        for (mode, kind, between) in [
            (
                FailMode::CrashAfter(Duration::from_secs(1)),
                "exited",
                "stoped",
            ),
            (
                FailMode::OomAfter(Duration::from_secs(1)),
                "killed",
                "killed",
            ),
        ] {
            let s = spec(mode);
            let names = vec!["agent-0".to_string()];
            let mut f = HostFailure::new(50);
            let t0 = Instant::now();
            assert!(f.install(&s, 0, "agent-0", "1.0.0", t0, 1));
            f.advance(&s, &names, t0 + Duration::from_millis(900), 1);
            assert!(f.to_send().is_empty(), "{mode:?}: runs for a second first");
            f.advance(&s, &names, t0 + Duration::from_millis(1100), 2);
            let got: Vec<(String, String, u32)> = f
                .to_send()
                .iter()
                .map(|e| (e.kind.clone(), e.state.clone(), e.restarts))
                .collect();
            assert_eq!(
                got,
                [
                    (kind.into(), between.into(), 0),
                    ("restarted".into(), "running".into(), 1)
                ],
                "{mode:?}"
            );
            f.taken(2);
            assert_eq!(f.held(0), Some(Held::Running));
            // Long after: the clock catches up, two more crashes, the last one fatal.
            f.advance(&s, &names, t0 + Duration::from_secs(60), 3);
            let kinds: Vec<&str> = f.to_send().iter().map(|e| e.kind.as_str()).collect();
            assert_eq!(kinds, [kind, "restarted", kind, "fatal"], "{mode:?}");
            let last = f.to_send().last().unwrap().clone();
            assert_eq!((last.state.as_str(), last.restarts), ("fatal", 2));
            assert!(
                last.cause.starts_with("3 consecutive failures"),
                "{}",
                last.cause
            );
            let seqs: Vec<u64> = f.to_send().iter().map(|e| e.seq).collect();
            assert_eq!(
                seqs,
                [52, 53, 54, 55],
                "{mode:?}: one more each, none resent"
            );
            assert_eq!(f.held(0), Some(Held::Fatal));
            f.taken(4);
            assert!(f.terminal());
            f.advance(&s, &names, t0 + Duration::from_secs(600), 4);
            assert!(
                f.to_send().is_empty(),
                "{mode:?}: fatal stays fatal, quietly"
            );
        }
    }

    #[test]
    fn a_report_carries_at_most_the_protocol_limit() {
        let s = spec(FailMode::CrashAfter(Duration::from_secs(1)));
        let names: Vec<String> = (0..20).map(|i| format!("agent-{i}")).collect();
        let mut f = HostFailure::new(1);
        let t0 = Instant::now();
        for (i, n) in names.iter().enumerate() {
            f.install(&s, i, n, "1.0.0", t0, 1);
        }
        f.advance(&s, &names, t0 + Duration::from_secs(10), 2);
        assert_eq!(f.to_send().len(), events::MAX_EVENTS_PER_REPORT);
        let first = f.to_send()[0].seq;
        f.taken(events::MAX_EVENTS_PER_REPORT);
        assert_eq!(
            f.to_send()[0].seq,
            first + events::MAX_EVENTS_PER_REPORT as u64
        );
    }
}
