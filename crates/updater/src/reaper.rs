//! Exit reaping: ops-updater as a child subreaper, so that the exit of an agent daemon
//! (forked by `control start`, then orphaned) is seen and recorded instead of being lost
//! to init.
//!
//! With `PR_SET_CHILD_SUBREAPER` ([`enable`]), every orphaned descendant of the updater is
//! reparented to it, and turns into a zombie child of ours when it exits. [`Reaper`] reaps
//! those zombies (on every SIGCHLD, and every [`REAP_INTERVAL`] in case a signal was
//! coalesced or missed) and keeps the last [`MAX_EXITS`] exits.
//!
//! The children that `tokio::process` waits for itself (every [`crate::process::run`])
//! must not be reaped here, or their `wait` would fail with `ECHILD`. They are known:
//! `process::run` spawns through [`spawn_registered`], which adds the pid to a registry
//! until the wait is over, and the reaper leaves registered pids alone. It never calls
//! `waitpid(-1)`: it scans `/proc` for zombies whose parent is this process and reaps each
//! with `waitid(P_PID, pid, WEXITED | WNOHANG)`.

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio::time::Instant;

/// How many exits the reaper remembers; older ones are forgotten first.
pub const MAX_EXITS: usize = 1024;
/// How often the reaper looks for zombies without being woken by SIGCHLD. Signals of the
/// same kind coalesce, and one SIGCHLD may stand for many exits or arrive while a scan
/// runs: the periodic pass catches what the signal missed.
pub const REAP_INTERVAL: Duration = Duration::from_secs(2);

/// Makes this process a child subreaper: orphaned descendants (an agent that `control
/// start` left running) become its children instead of init's, so their exit status
/// reaches the [`Reaper`]. Inherited by nothing; lasts for the life of the process.
pub fn enable() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It called `exit` (or returned from `main`) with this code.
    Code(i32),
    /// A signal ended it; `core` when the kernel dumped core.
    Signal { signal: i32, core: bool },
}

impl Exit {
    /// The exit of a child that `std`/`tokio` waited for; `None` for a status that is not
    /// an exit (stopped, continued).
    pub fn of_status(status: &std::process::ExitStatus) -> Option<Exit> {
        use std::os::unix::process::ExitStatusExt;
        if let Some(code) = status.code() {
            return Some(Exit::Code(code));
        }
        status.signal().map(|signal| Exit::Signal {
            signal,
            core: status.core_dumped(),
        })
    }

    /// True when a SIGKILL ended it (how the kernel's OOM killer ends a process).
    pub fn is_sigkill(&self) -> bool {
        matches!(self, Exit::Signal { signal, .. } if *signal == libc::SIGKILL)
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Exit::Code(c) => write!(f, "exited with code {c}"),
            Exit::Signal { signal, core } => {
                write!(f, "killed by signal {signal}")?;
                let name = nix::sys::signal::Signal::try_from(signal).ok();
                match (name, core) {
                    (Some(n), false) => write!(f, " ({})", n.as_str()),
                    (Some(n), true) => write!(f, " ({}, core dumped)", n.as_str()),
                    (None, true) => f.write_str(" (core dumped)"),
                    (None, false) => Ok(()),
                }
            }
        }
    }
}

/// The pids that `tokio::process` waits for itself; the reaper leaves them alone. Also
/// the lock that orders a spawn against a reaping pass (see [`spawn_registered`]).
static SPAWNED: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

fn spawned() -> MutexGuard<'static, BTreeSet<i32>> {
    SPAWNED.lock().unwrap_or_else(|e| e.into_inner())
}

/// A pid in the registry of children waited for elsewhere; removed on drop, which
/// [`crate::process::run`] does after its `wait` (or when it is cancelled: the child is
/// then killed and tokio's orphan queue, which tolerates `ECHILD`, or the reaper collects it).
#[derive(Debug)]
pub(crate) struct Registration(i32);

impl Drop for Registration {
    fn drop(&mut self) {
        spawned().remove(&self.0);
    }
}

/// Spawns `cmd` and registers its pid, both under the registry's lock.
///
/// Invariant: a child is in the registry before the reaper can see it as a zombie. The
/// reaper holds the same lock for its whole pass (scan and reap), so a child that exits
/// at once is either registered before the pass or spawned after it. On the daemon's
/// single-threaded runtime this also holds because nothing `.await`s between the spawn and
/// the registration; the lock makes it true on any runtime, and in tests. The price: a
/// spawn may wait for a pass in progress (a read of `/proc/*/stat`, milliseconds).
pub(crate) fn spawn_registered(
    cmd: &mut tokio::process::Command,
) -> io::Result<(tokio::process::Child, Option<Registration>)> {
    let mut set = spawned();
    let child = cmd.spawn()?;
    let reg = child.id().map(|pid| {
        set.insert(pid as i32);
        Registration(pid as i32)
    });
    Ok((child, reg))
}

struct Record {
    pid: i32,
    exit: Exit,
    at: Instant,
}

struct Inner {
    exits: Mutex<VecDeque<Record>>,
    /// Counts exits recorded so far; bumped after each pass that recorded one.
    count: watch::Sender<u64>,
}

/// The reaper: a task that reaps our orphaned zombies, and the record of their exits.
/// Cheap to clone; the task ends when the last clone is dropped. Spawn one per process.
#[derive(Clone)]
pub struct Reaper {
    inner: Arc<Inner>,
}

impl fmt::Debug for Reaper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reaper")
            .field("recorded", &*self.inner.count.borrow())
            .finish()
    }
}

impl Reaper {
    /// Starts the reaping task on the current tokio runtime. Call [`enable`] first, or only
    /// our own unregistered children are ever found.
    pub fn spawn() -> Reaper {
        let (count, _) = watch::channel(0);
        let inner = Arc::new(Inner {
            exits: Mutex::new(VecDeque::new()),
            count,
        });
        tokio::spawn(run(Arc::downgrade(&inner)));
        Reaper { inner }
    }

    /// The last recorded exit of `pid`, if the reaper reaped it (and still remembers).
    pub fn exit_of(&self, pid: i32) -> Option<Exit> {
        let exits = self.exits();
        exits.iter().rev().find(|r| r.pid == pid).map(|r| r.exit)
    }

    /// Every remembered exit reaped at or after `t`, oldest first.
    pub fn exits_since(&self, t: Instant) -> Vec<(i32, Exit)> {
        let exits = self.exits();
        exits
            .iter()
            .filter(|r| r.at >= t)
            .map(|r| (r.pid, r.exit))
            .collect()
    }

    /// A receiver whose value (the number of exits recorded so far) changes after every
    /// pass that recorded an exit: `changed().await` to wait for the next one.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.count.subscribe()
    }

    fn exits(&self) -> MutexGuard<'_, VecDeque<Record>> {
        self.inner.exits.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn run(inner: Weak<Inner>) {
    let mut sigchld = match signal(SignalKind::child()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGCHLD; reaping every {REAP_INTERVAL:?} only");
            None
        }
    };
    let mut tick = tokio::time::interval(REAP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        match sigchld.as_mut() {
            Some(s) => {
                tokio::select! {
                    _ = s.recv() => {}
                    _ = tick.tick() => {}
                }
            }
            None => {
                tick.tick().await;
            }
        }
        if inner.strong_count() == 0 {
            return;
        }
        // A pass reads /proc: a few milliseconds with many processes, kept off the runtime.
        let found = tokio::task::spawn_blocking(reap_zombies)
            .await
            .unwrap_or_default();
        let Some(inner) = inner.upgrade() else { return };
        if found.is_empty() {
            continue;
        }
        let now = Instant::now();
        {
            let mut exits = inner.exits.lock().unwrap_or_else(|e| e.into_inner());
            for (pid, exit) in &found {
                tracing::debug!(pid, %exit, "reaped an orphaned process");
                if exits.len() == MAX_EXITS {
                    exits.pop_front();
                }
                exits.push_back(Record {
                    pid: *pid,
                    exit: *exit,
                    at: now,
                });
            }
        }
        inner.count.send_modify(|c| *c += found.len() as u64);
    }
}

/// One pass: every zombie child of this process that nobody else waits for, reaped.
fn reap_zombies() -> Vec<(i32, Exit)> {
    let me = std::process::id() as i32;
    // Held for the whole pass: see `spawn_registered`.
    let registered = spawned();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if registered.contains(&pid) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if parse_stat(&stat) != Some(('Z', me)) {
            continue;
        }
        if let Some(exit) = reap(pid) {
            out.push((pid, exit));
        }
    }
    out
}

/// State and parent pid from a `/proc/PID/stat` line. The command name (in parentheses)
/// may hold spaces and parentheses itself, so the fields are read after the last `)`.
fn parse_stat(stat: &str) -> Option<(char, i32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Reaps `pid` if it is our child and has exited; its exit, or `None` (not ours, not
/// exited, or reaped by someone else in between).
///
/// `libc::waitid` rather than nix's: nix cannot express a death by a real-time signal
/// (`SIGRTMIN+n`) and would fail after the child was already reaped, losing the status.
#[allow(unsafe_code)] // One FFI call with a zeroed, owned `siginfo_t`.
fn reap(pid: i32) -> Option<Exit> {
    // SAFETY: `siginfo_t` is plain old data for which all zeros is a valid value, and
    // waitid only writes into the struct we own for the duration of the call.
    let (rc, info) = unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let rc = libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        );
        (rc, info)
    };
    // SAFETY: reading the fields of a `siginfo_t` that waitid filled in for SIGCHLD.
    let (si_pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if rc != 0 || si_pid == 0 {
        return None;
    }
    match info.si_code {
        libc::CLD_EXITED => Some(Exit::Code(status)),
        libc::CLD_KILLED => Some(Exit::Signal {
            signal: status,
            core: false,
        }),
        libc::CLD_DUMPED => Some(Exit::Signal {
            signal: status,
            core: true,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_in_words() {
        let cases = [
            (Exit::Code(3), "exited with code 3"),
            (Exit::Code(0), "exited with code 0"),
            (
                Exit::Signal {
                    signal: 9,
                    core: false,
                },
                "killed by signal 9 (SIGKILL)",
            ),
            (
                Exit::Signal {
                    signal: 11,
                    core: true,
                },
                "killed by signal 11 (SIGSEGV, core dumped)",
            ),
            (
                Exit::Signal {
                    signal: 40,
                    core: false,
                },
                "killed by signal 40",
            ),
        ];
        for (exit, want) in cases {
            assert_eq!(exit.to_string(), want);
        }
        assert!(Exit::Signal {
            signal: 9,
            core: false
        }
        .is_sigkill());
        assert!(!Exit::Code(9).is_sigkill());
    }

    #[test]
    fn stat_lines() {
        let cases = [
            ("12 (sleep) Z 34 12 12 0 -1", Some(('Z', 34))),
            ("12 (a) b) (c) S 1 12 12 0", Some(('S', 1))),
            ("12 (x y) R 7", Some(('R', 7))),
            ("12 (x", None),
            ("12 (x) Z", None),
            ("", None),
        ];
        for (line, want) in cases {
            assert_eq!(parse_stat(line), want, "{line:?}");
        }
    }

    #[test]
    fn exit_statuses_of_waited_children() {
        use std::os::unix::process::ExitStatusExt;
        let cases = [
            (
                std::process::ExitStatus::from_raw(3 << 8),
                Some(Exit::Code(3)),
            ),
            (
                std::process::ExitStatus::from_raw(9),
                Some(Exit::Signal {
                    signal: 9,
                    core: false,
                }),
            ),
            (
                std::process::ExitStatus::from_raw(11 | 0x80),
                Some(Exit::Signal {
                    signal: 11,
                    core: true,
                }),
            ),
        ];
        for (status, want) in cases {
            assert_eq!(Exit::of_status(&status), want, "{status:?}");
        }
    }
}
