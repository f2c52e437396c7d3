//! The restart policy (seed 003's), as pure decisions over one agent's supervision state;
//! the engine's actor does the IO around them.
//!
//! Exact semantics (`docs/ops-updater.md` has a timeline):
//! - An agent *should run* after a legacy `cmd: start` or a job that started it, until a
//!   `cmd: stop`, a `stop` or an `uninstall`.
//! - An agent that should run and is found not running (its `control status` says stopped,
//!   or its cgroup emptied) after it was seen running, without ops-updater having stopped
//!   it, has **exited abnormally**.
//! - An exit less than `failWindowSecs` after its start is a *consecutive failure*; an exit
//!   after a longer run resets the count to zero (that exit is not counted). A start that
//!   fails (`control start` fails, or `started` is not reached within `startTimeoutSecs`)
//!   is a consecutive failure too.
//! - After an abnormal exit or a failed restart, the agent is restarted no earlier than
//!   `restartDelaySecs` later.
//! - When the consecutive failures exceed `maxFailures`, the agent is `fatal`: it is not
//!   started again until its desired state changes, a `restart` or `reset` job arrives, or
//!   an install/upgrade job is run for it.
//! - An agent that was never seen running since ops-updater started (a host that just
//!   booted) is simply started: that is the desired state, not a restart.

use std::time::Duration;

use proto::names::Version;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Seconds between two `control status` checks of a supervised agent (seed 003: 60).
pub const fn default_check_secs() -> u64 {
    60
}
/// Seconds after an abnormal exit before the restart (seed 003: 3 minutes).
pub const fn default_restart_delay_secs() -> u64 {
    180
}
/// An exit within this many seconds of the start is a consecutive failure (seed 003: 15 min).
pub const fn default_fail_window_secs() -> u64 {
    900
}
/// More consecutive failures than this and the agent is `fatal` (seed 003: 3).
pub const fn default_max_failures() -> u32 {
    3
}

/// The policy, from the updater config's `supervise` section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub check: Duration,
    pub restart_delay: Duration,
    pub fail_window: Duration,
    pub max_failures: u32,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            check: Duration::from_secs(default_check_secs()),
            restart_delay: Duration::from_secs(default_restart_delay_secs()),
            fail_window: Duration::from_secs(default_fail_window_secs()),
            max_failures: default_max_failures(),
        }
    }
}

/// Why an agent gave up, kept on disk so that `fatal` survives a restart of ops-updater.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fatal {
    /// The version that kept failing.
    pub version: Version,
    /// The last exit's cause.
    pub cause: String,
    /// Unix seconds.
    pub since: i64,
    /// The last exit was an OOM kill (state `killed` before it became `fatal`).
    #[serde(default)]
    pub killed: bool,
}

/// Where an agent is in its life, as the supervisor sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Not seen running since ops-updater started, or stopped by ops-updater.
    Idle,
    /// Seen running (started by us, or found running) since `since`.
    Running { since: Instant, since_unix: i64 },
    /// Exited abnormally; to be restarted at `at`. `killed`: the exit was an OOM kill.
    Restarting { at: Instant, killed: bool },
    /// Gave up.
    Fatal(Fatal),
}

/// One agent's supervision state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub phase: Phase,
    /// Consecutive failures.
    pub failures: u32,
    /// Restarts done by the supervisor since ops-updater started.
    pub restarts: u32,
    /// The cause of the last abnormal exit, for `/status`.
    pub last_exit: Option<String>,
}

impl Default for State {
    fn default() -> State {
        State {
            phase: Phase::Idle,
            failures: 0,
            restarts: 0,
            last_exit: None,
        }
    }
}

/// What the supervisor decided after an exit or a failed start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Restart at this instant.
    RestartAt(Instant),
    /// Too many failures: given up.
    GiveUp,
}

/// The state word reported for an agent the supervisor holds: `fatal` or `killed`, or
/// `None` when the agent's own `control status` answer is what counts.
pub fn held_state(s: &State) -> Option<&'static str> {
    match &s.phase {
        Phase::Fatal(_) => Some(proto::bootagent::STATE_FATAL),
        Phase::Restarting { killed: true, .. } => Some(proto::bootagent::STATE_KILLED),
        _ => None,
    }
}

impl State {
    /// The agent runs from `now` (started by us, or first seen running).
    pub fn running(&mut self, now: Instant, now_unix: i64) {
        self.phase = Phase::Running {
            since: now,
            since_unix: now_unix,
        };
    }

    /// A long enough run clears the count of consecutive failures.
    pub fn note_alive(&mut self, now: Instant, p: &Policy) {
        if let Phase::Running { since, .. } = self.phase {
            if now.saturating_duration_since(since) >= p.fail_window {
                self.failures = 0;
            }
        }
    }

    /// The agent exited abnormally at `now`.
    pub fn exited(
        &mut self,
        now: Instant,
        now_unix: i64,
        version: &Version,
        cause: &str,
        killed: bool,
        p: &Policy,
    ) -> Verdict {
        let short = match self.phase {
            Phase::Running { since, .. } => now.saturating_duration_since(since) < p.fail_window,
            // Not seen running since its (re)start: as short as a run can be.
            _ => true,
        };
        if short {
            self.failures = self.failures.saturating_add(1);
        } else {
            self.failures = 0;
        }
        self.last_exit = Some(cause.to_string());
        self.decide(now, now_unix, version, cause, killed, p)
    }

    /// A (re)start failed at `now`: a consecutive failure.
    pub fn start_failed(
        &mut self,
        now: Instant,
        now_unix: i64,
        version: &Version,
        cause: &str,
        p: &Policy,
    ) -> Verdict {
        self.failures = self.failures.saturating_add(1);
        self.last_exit = Some(cause.to_string());
        self.decide(now, now_unix, version, cause, false, p)
    }

    fn decide(
        &mut self,
        now: Instant,
        now_unix: i64,
        version: &Version,
        cause: &str,
        killed: bool,
        p: &Policy,
    ) -> Verdict {
        if self.failures > p.max_failures {
            self.phase = Phase::Fatal(Fatal {
                version: version.clone(),
                cause: cause.to_string(),
                since: now_unix,
                killed,
            });
            return Verdict::GiveUp;
        }
        let at = now + p.restart_delay;
        self.phase = Phase::Restarting { at, killed };
        Verdict::RestartAt(at)
    }

    /// An order (a changed desired state, `restart`, `reset`, install) or a stop by us: the
    /// past failures no longer count.
    pub fn clear(&mut self) {
        self.phase = Phase::Idle;
        self.failures = 0;
    }

    pub fn is_fatal(&self) -> bool {
        matches!(self.phase, Phase::Fatal(_))
    }

    /// Seconds the agent has been running (0 when it is not known to run).
    pub fn uptime(&self, now_unix: i64) -> u64 {
        match self.phase {
            Phase::Running { since_unix, .. } => (now_unix - since_unix).max(0) as u64,
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    fn policy() -> Policy {
        Policy::default()
    }

    /// Seed 003's example: a crash loop of quick exits is restarted three times, three
    /// minutes after each exit, and the fourth quick exit makes it fatal.
    #[test]
    fn a_crash_loop_is_restarted_three_times_then_fatal() {
        let p = policy();
        let t0 = Instant::now();
        let mut s = State::default();
        s.running(t0, 1000);
        let mut now = t0;
        for n in 1..=3u32 {
            now += Duration::from_secs(10);
            let v = s.exited(now, 0, &v("1.0"), "exited with code 1", false, &p);
            assert_eq!(v, Verdict::RestartAt(now + p.restart_delay), "exit {n}");
            assert_eq!(s.failures, n);
            assert_eq!(held_state(&s), None);
            now += p.restart_delay;
            s.running(now, 0);
        }
        now += Duration::from_secs(10);
        assert_eq!(
            s.exited(now, 77, &v("1.0"), "exited with code 1", false, &p),
            Verdict::GiveUp
        );
        assert!(s.is_fatal());
        assert_eq!(held_state(&s), Some("fatal"));
        match &s.phase {
            Phase::Fatal(f) => assert_eq!((f.version.as_str(), f.since), ("1.0", 77)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_long_run_resets_the_count() {
        let p = policy();
        let t0 = Instant::now();
        let mut s = State {
            failures: 3,
            ..State::default()
        };
        s.running(t0, 0);
        // Exactly the window is long enough.
        let now = t0 + p.fail_window;
        assert!(matches!(
            s.exited(now, 0, &v("1"), "x", false, &p),
            Verdict::RestartAt(_)
        ));
        assert_eq!(s.failures, 0);
        // note_alive clears it while running, too.
        let mut s = State {
            failures: 2,
            ..State::default()
        };
        s.running(t0, 0);
        s.note_alive(t0 + Duration::from_secs(899), &p);
        assert_eq!(s.failures, 2);
        s.note_alive(t0 + Duration::from_secs(900), &p);
        assert_eq!(s.failures, 0);
    }

    #[test]
    fn failed_starts_count_and_an_oom_kill_is_reported_killed() {
        let p = Policy {
            max_failures: 1,
            ..policy()
        };
        let t0 = Instant::now();
        let mut s = State::default();
        s.running(t0, 0);
        let verdict = s.exited(t0, 0, &v("1"), "killed by the OOM killer", true, &p);
        assert!(matches!(verdict, Verdict::RestartAt(_)));
        assert_eq!(held_state(&s), Some("killed"));
        assert_eq!(
            s.start_failed(t0, 0, &v("1"), "did not start", &p),
            Verdict::GiveUp
        );
        s.clear();
        assert_eq!((s.phase.clone(), s.failures), (Phase::Idle, 0));
        assert_eq!(s.uptime(5), 0);
        s.running(t0, 100);
        assert_eq!(s.uptime(130), 30);
    }
}
