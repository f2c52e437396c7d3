//! The supervisor: the process systemd or `./control start` started. It holds what must
//! outlive a change of binary — the workdir lock, the local endpoint's listening socket,
//! the PID the service manager knows — and runs the real daemon as its one child, the
//! *worker*. A worker that asks for an upgrade (by writing the marker, see
//! [`super::marker`]) is followed by a trial worker from the staged binary; the supervisor
//! watches it, commits it (renames it over the executable, the old binary kept as
//! `<exe>.prev`) once it reported its good rounds, or puts the old binary back if it exits
//! or does not get there in time.
//!
//! The supervisor does no agent work, so it never needs upgrading for the fleet to get a
//! new daemon; it runs the code it was started with until the service is restarted.

use std::ffi::OsString;
use std::os::fd::{AsRawFd as _, RawFd};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::Instant;

use super::marker::{self, Blocked, Marker, Stage, Upgrade};
use crate::state::now_unix;

/// The worker's exit code when it stopped for an upgrade (the marker says which).
pub const EXIT_UPGRADE: i32 = 88;
/// Set in the worker's environment: it is a worker (lock and socket are the supervisor's).
pub const ENV_WORKER: &str = "OPS_UPDATER_WORKER";
/// The executable being run (symlinks resolved), for a trial worker that runs from `next`.
pub const ENV_EXE: &str = "OPS_UPDATER_EXE";
/// Present when fd 3 is the local endpoint's listening socket.
pub const ENV_LISTEN_FD: &str = "OPS_UPDATER_LISTEN_FD";
/// When the first round is due (unix milliseconds), after an upgrade.
pub const ENV_NEXT_ROUND_MS: &str = "OPS_UPDATER_NEXT_ROUND_MS";

/// How long a worker asked to stop (SIGTERM) gets before SIGKILL, when the supervisor
/// itself ends it (a trial past its deadline). A stop asked by the service manager is
/// forwarded and waited for: the worker's own shutdown is bounded.
const TRIAL_KILL_GRACE: Duration = Duration::from_secs(20);
/// A worker that crashed outside a trial is started again after this (doubling, capped).
const RESTART_BASE: Duration = Duration::from_secs(1);
const RESTART_MAX: Duration = Duration::from_secs(10);
/// A worker that ran this long before it died starts again after [`RESTART_BASE`].
const RESTART_RESET: Duration = Duration::from_secs(10);
/// How often the marker is read during a trial.
const TRIAL_POLL: Duration = Duration::from_millis(200);

pub struct Supervisor {
    /// The executable (symlinks resolved).
    pub exe: PathBuf,
    /// The arguments the supervisor was started with, passed on to every worker.
    pub args: Vec<OsString>,
    pub workdir: PathBuf,
    /// The local endpoint's socket, if it is enabled.
    pub listener: Option<std::net::TcpListener>,
    pub commit_rounds: u32,
    pub watch: Duration,
}

enum Ended {
    /// The service manager asked us to stop; the worker stopped with this status.
    Stopped(ExitStatus),
    Exited(ExitStatus),
    /// A trial passed its deadline and was stopped.
    TimedOut {
        rounds: u32,
    },
}

impl Supervisor {
    /// Runs workers until the service is stopped; the exit code to end with.
    pub async fn run(self) -> i32 {
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot handle SIGTERM");
                return 1;
            }
        };
        let mut int = signal(SignalKind::interrupt()).ok();
        let mut restart_delay = RESTART_BASE;
        clean_staging_leftovers(&self.exe);
        recover(&self.workdir);
        loop {
            let m = marker::load(&self.workdir);
            let trial = m.upgrade.clone().filter(|u| u.stage == Stage::Trial);
            let program = trial.as_ref().map_or(self.exe.clone(), |u| u.next.clone());
            let mut envs = vec![
                (ENV_WORKER, "1".to_string()),
                (ENV_EXE, self.exe.display().to_string()),
            ];
            let fd: Option<RawFd> = self.listener.as_ref().map(|l| l.as_raw_fd());
            if fd.is_some() {
                envs.push((ENV_LISTEN_FD, crate::process::WORKER_LISTEN_FD.to_string()));
            }
            if let Some(ms) = trial.as_ref().and_then(|u| u.next_round_ms) {
                envs.push((ENV_NEXT_ROUND_MS, ms.to_string()));
            }
            let cmd = crate::process::worker_command(&program, &self.args, &envs, fd);
            let mut cmd = cmd;
            let mut child = match cmd.spawn() {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(program = %program.display(), error = %e, "cannot start the worker");
                    if let Some(u) = trial {
                        rollback(&self.workdir, &u, &format!("cannot start it: {e}"));
                        continue;
                    }
                    return 1;
                }
            };
            let pid = child.id().map(|p| Pid::from_raw(p as i32));
            let started = Instant::now();
            if let Some(u) = &trial {
                tracing::info!(from = %u.from, to = %u.to, pid = ?pid, rounds = self.commit_rounds,
                    watch = ?self.watch, "self-upgrade: trial of the new version started");
            }
            let deadline = trial.as_ref().map(|_| started + self.watch);
            let mut stopping = false;
            let mut committed = trial.is_none();
            let ended = loop {
                let poll = !committed;
                tokio::select! {
                    st = child.wait() => {
                        let st = match st {
                            Ok(s) => s,
                            Err(e) => {
                                tracing::error!(error = %e, "waiting for the worker");
                                return 1;
                            }
                        };
                        break if stopping { Ended::Stopped(st) } else { Ended::Exited(st) };
                    }
                    _ = term.recv() => {
                        tracing::info!("SIGTERM: stopping the worker");
                        stopping = true;
                        forward(pid, Signal::SIGTERM);
                    }
                    _ = async { match int.as_mut() { Some(i) => { i.recv().await; } None => std::future::pending().await } } => {
                        stopping = true;
                        forward(pid, Signal::SIGINT);
                    }
                    _ = tokio::time::sleep(TRIAL_POLL), if poll => {
                        let m = marker::load(&self.workdir);
                        match m.upgrade {
                            Some(u) if u.stage == Stage::Committed => {
                                commit(&self.workdir, &u);
                                committed = true;
                            }
                            Some(u) => {
                                if deadline.is_some_and(|d| Instant::now() >= d) && !stopping {
                                    tracing::warn!(to = %u.to, rounds = u.rounds, "self-upgrade: no commit in time; stopping the trial");
                                    stop_within(&mut child, pid, TRIAL_KILL_GRACE).await;
                                    break Ended::TimedOut { rounds: u.rounds };
                                }
                            }
                            // Cleared by someone else (an operator): nothing to watch.
                            None => committed = true,
                        }
                    }
                }
            };
            match ended {
                Ended::Stopped(st) => {
                    let code = st.code().unwrap_or(0);
                    tracing::info!(status = %st, "worker stopped; exiting");
                    return if code == EXIT_UPGRADE { 0 } else { code };
                }
                Ended::TimedOut { rounds } => {
                    if let Some(u) = trial {
                        let why = format!(
                            "it did not report {} good rounds within selfUpgradeWatchSecs ({} s); it reported {rounds}",
                            self.commit_rounds,
                            self.watch.as_secs()
                        );
                        rollback(&self.workdir, &u, &why);
                    }
                }
                Ended::Exited(st) => {
                    let m = marker::load(&self.workdir);
                    if let (Some(u), false) = (&trial, committed) {
                        // The trial ended before its commit: whatever the reason, the old
                        // binary comes back.
                        if m.upgrade
                            .as_ref()
                            .is_some_and(|x| x.stage == Stage::Committed)
                        {
                            commit(&self.workdir, u);
                        } else {
                            rollback(
                                &self.workdir,
                                u,
                                &format!("it exited ({st}) before it was committed"),
                            );
                            continue;
                        }
                    }
                    if m.upgrade.as_ref().is_some_and(|u| u.stage == Stage::Trial) {
                        tracing::info!("worker stopped for a self-upgrade");
                        restart_delay = RESTART_BASE;
                        continue;
                    }
                    match st.code() {
                        Some(c)
                            if c == crate::config::EXIT_BAD_CONFIG
                                || c == i32::from(crate::workdir::EXIT_LOCKED) =>
                        {
                            tracing::error!(status = %st, "worker cannot run; exiting");
                            return c;
                        }
                        Some(0) => {
                            tracing::info!("worker exited; exiting");
                            return 0;
                        }
                        _ => {}
                    }
                    if started.elapsed() > RESTART_RESET {
                        restart_delay = RESTART_BASE;
                    }
                    tracing::error!(status = %st, restart_in = ?restart_delay, "worker died; starting it again");
                    tokio::select! {
                        _ = tokio::time::sleep(restart_delay) => {}
                        _ = term.recv() => return 0,
                    }
                    restart_delay = (restart_delay * 2).min(RESTART_MAX);
                }
            }
        }
    }
}

fn forward(pid: Option<Pid>, sig: Signal) {
    if let Some(p) = pid {
        let _ = kill(p, sig);
    }
}

async fn stop_within(child: &mut tokio::process::Child, pid: Option<Pid>, grace: Duration) {
    forward(pid, Signal::SIGTERM);
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        forward(pid, Signal::SIGKILL);
        let _ = child.wait().await;
    }
}

/// Finishes what a crash interrupted, before the first worker starts: a committed upgrade
/// is swapped in; a trial whose staged binary is gone is forgotten.
pub fn recover(workdir: &Path) {
    let m = marker::load(workdir);
    match &m.upgrade {
        Some(u) if u.stage == Stage::Committed => commit(workdir, u),
        Some(u) if !u.next.is_file() => {
            tracing::warn!(to = %u.to, next = %u.next.display(), "self-upgrade: staged binary missing; upgrade abandoned");
            save(
                workdir,
                &Marker {
                    upgrade: None,
                    ..m.clone()
                },
            );
        }
        Some(u) => {
            tracing::info!(to = %u.to, "self-upgrade: an interrupted trial runs again");
        }
        None => {}
    }
}

/// Removes what a worker or supervisor killed while copying left beside the executable:
/// `.ops-updater.next.tmp-*` and `.ops-updater.prev-*`, and only those.
#[allow(clippy::disallowed_methods)] // The supervisor has no runtime work to protect.
fn clean_staging_leftovers(exe: &Path) {
    let Some(dir) = exe.parent() else {
        return;
    };
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let next_tmp = format!("{}.tmp-", super::STAGED);
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if (n.starts_with(&next_tmp) || n.starts_with(".ops-updater.prev-"))
            && e.file_type().is_ok_and(|t| t.is_file())
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn save(workdir: &Path, m: &Marker) {
    if let Err(e) = marker::save(workdir, m) {
        tracing::error!(error = %e, "cannot write the self-upgrade marker");
    }
}

/// Puts the staged binary in place of the executable, keeping the old one as
/// `<exe>.prev`; idempotent (a crash half-way is finished at the next start).
pub fn commit(workdir: &Path, u: &Upgrade) {
    if u.next.is_file() {
        if let Err(e) = swap_in(&u.exe, &u.next) {
            // The worker keeps running from the staged file; the next start retries.
            tracing::error!(exe = %u.exe.display(), error = %e, "self-upgrade: cannot put the new binary in place; retried at the next start");
            return;
        }
    }
    tracing::info!(from = %u.from, to = %u.to, exe = %u.exe.display(), "self-upgrade committed");
    let mut m = marker::load(workdir);
    m.upgrade = None;
    if m.blocked.as_ref().is_some_and(|b| b.version == u.to) {
        m.blocked = None;
    }
    save(workdir, &m);
}

#[allow(clippy::disallowed_methods)] // The supervisor has no runtime work to protect.
fn swap_in(exe: &Path, next: &Path) -> std::io::Result<()> {
    let dir = exe.parent().unwrap_or(Path::new("."));
    let prev = prev_path(exe);
    let tmp = dir.join(format!(
        ".ops-updater.prev-{}",
        uuid::Uuid::new_v4().simple()
    ));
    // The old binary stays reachable at every instant: linked as `.prev` first, then the
    // new one renamed over the executable.
    if std::fs::hard_link(exe, &tmp).is_err() {
        std::fs::copy(exe, &tmp)?;
    }
    std::fs::rename(&tmp, &prev)?;
    std::fs::rename(next, exe)?;
    crate::fsx::fsync_dir(dir)
}

/// `<exe>.prev`: where the previous binary is kept.
pub fn prev_path(exe: &Path) -> PathBuf {
    let mut s = exe.as_os_str().to_owned();
    s.push(".prev");
    PathBuf::from(s)
}

/// The trial failed: the staged binary goes, the version is blocked until the desired
/// version changes, and the next worker is the old executable.
#[allow(clippy::disallowed_methods)] // The supervisor has no runtime work to protect.
pub fn rollback(workdir: &Path, u: &Upgrade, why: &str) {
    tracing::error!(from = %u.from, to = %u.to, "self-upgrade rolled back: {why}");
    let _ = std::fs::remove_file(&u.next);
    let m = Marker {
        upgrade: None,
        blocked: Some(Blocked {
            version: u.to.clone(),
            reason: format!("ops-updater {} was rolled back to {}: {why}", u.to, u.from),
            at: now_unix(),
            reported: false,
        }),
    };
    save(workdir, &m);
}
