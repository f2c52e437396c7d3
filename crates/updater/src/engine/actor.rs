//! One agent's actor: takes the legacy desired state and jobs as orders, supervises the
//! agent between them, and is the one place that installs, switches, rolls back, starts,
//! stops and removes it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use proto::legacy::Cmd;
use proto::names::{AgentName, Version};
use tokio::sync::{mpsc, watch, Mutex};
use tokio::time::Instant;

use super::settings::{self, Settings};
use super::supervise::{self, Phase, Verdict};
use super::{
    backoff_delay, clean_startup_leftovers, plan, read_current, remove_version, versions_to_prune,
    Backoff, BackoffKey, Cell, Ctx, Desired, Done, Job, Order, Plan, START_POLL,
};
use crate::artifact::{self, Want};
use crate::cgroup::AgentCgroup;
use crate::control::{self, AgentStatus};
use crate::fsx;
use crate::metrics::{Failure, Install};
use crate::process;
use crate::state::{now_unix, BackoffView, Outcome};

/// Infix of an agent folder being removed by `uninstall`.
pub const UNINSTALL_INFIX: &str = ".uninstall-";
/// Most lines of a control script's output kept for an event.
const OUTPUT_LINES: usize = 10;

pub(super) struct Actor {
    ctx: Arc<Ctx>,
    name: AgentName,
    desire: watch::Receiver<Option<Desired>>,
    orders: mpsc::Receiver<Order>,
    lock: Arc<Mutex<()>>,
    cell: Arc<StdMutex<Cell>>,
    settings: Settings,
    backoff: Option<Backoff>,
    /// The back-off deadline last said in the log, so a wait is logged once, not per round.
    wait_logged: Option<i64>,
    /// When the supervisor next reads `control status`.
    next_check: Instant,
    /// The last check could not read the status (an event is written once per such spell).
    status_failing: bool,
    /// The last lines the agent's last `control start` printed.
    last_output: Vec<String>,
    /// The agent's cgroup (a handle that tracks nothing when cgroups cannot be used).
    cg: Arc<AgentCgroup>,
    /// The cgroup held the agent's processes since its last start: its emptying is an exit.
    populated_seen: bool,
    /// The agent's processes when last looked at, for their exit codes.
    pids: Vec<i32>,
    /// The cgroup's OOM kill count at the last start.
    oom_base: u64,
    /// `limits not enforced: ...` was already written as an event for these limits.
    noted_unenforced: Option<BTreeMap<String, String>>,
    /// The last failure of a new version written as an event (`install_failed` or
    /// `rolled_back`): while the updater retries that version with back-off, or the server
    /// sends the same job again, the same failure is not written again. Forgotten when an
    /// install succeeds; another version or another kind of failure is written.
    noted_failure: Option<NotedFailure>,
}

/// What [`Actor::noted_failure`] remembers: the version, the event kind and its state.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NotedFailure {
    version: Version,
    kind: &'static str,
    state: &'static str,
}

/// Why a switch failed, for the record.
enum SwitchFailure {
    /// Nothing changed on the running side (download, checksum, unpack); `state` is the
    /// `install_failed` event's (`proto::events::INSTALL_FAILED_*`).
    Install { state: &'static str, msg: String },
    /// The new version did not start; the previous one was put back.
    Start(String),
    /// The previous version could not be stopped (its `control stop` failed and something
    /// of it still ran after SIGKILL): it stays current, the new one was not started.
    Stop(String),
}

fn tail_lines(out: &process::Output) -> Vec<String> {
    let text = format!("{}\n{}", out.stdout, out.stderr);
    let lines: Vec<String> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .map(|l| proto::clean_text(l, 256))
        .collect();
    let skip = lines.len().saturating_sub(OUTPUT_LINES);
    lines.into_iter().skip(skip).collect()
}

impl Actor {
    pub(super) fn new(
        ctx: Arc<Ctx>,
        name: &AgentName,
        desire: watch::Receiver<Option<Desired>>,
        orders: mpsc::Receiver<Order>,
        lock: Arc<Mutex<()>>,
        cell: Arc<StdMutex<Cell>>,
    ) -> Actor {
        let next_check = Instant::now() + ctx.policy.check;
        let cg = Arc::new(ctx.cgroups.agent(name, &proto::limits::Limits::default()));
        Actor {
            ctx,
            name: name.clone(),
            desire,
            orders,
            lock,
            cell,
            settings: Settings::default(),
            backoff: None,
            wait_logged: None,
            next_check,
            status_failing: false,
            last_output: Vec::new(),
            cg,
            populated_seen: false,
            pids: Vec::new(),
            oom_base: 0,
            noted_unenforced: None,
            noted_failure: None,
        }
    }

    /// (Re)makes the agent's cgroup with its limits; what cannot be enforced is said once
    /// per set of limits, as an event and in `/status`.
    fn apply_cgroup(&mut self) {
        let limits = match proto::limits::parse_limits(&self.settings.limits) {
            Ok(l) => l,
            Err(e) => {
                // Checked before it was stored; a hand-edited file can still be wrong.
                tracing::warn!(agent = %self.name, error = %e, "ignoring unusable limits");
                proto::limits::Limits::default()
            }
        };
        self.cg = Arc::new(self.ctx.cgroups.agent(&self.name, &limits));
        self.cell().cg = Some(self.cg.clone());
        if !limits.is_empty() {
            if let Some(why) = self.cg.not_enforced() {
                if self.noted_unenforced.as_ref() != Some(&self.settings.limits) {
                    self.noted_unenforced = Some(self.settings.limits.clone());
                    let why = why.to_string();
                    tracing::warn!(agent = %self.name, limits = %limits.describe(), "{why}");
                    self.event("limits_not_enforced", None, &why);
                }
            }
        }
    }

    /// True when the cgroup's emptying tells that the agent exited.
    fn watch_cgroup(&self) -> bool {
        self.populated_seen
            && self.settings.run == Some(true)
            && self.cg.is_tracked()
            && matches!(self.cell().sup.phase, Phase::Running { .. })
    }

    /// Notes the agent's processes after a start or a check that found it running.
    fn note_processes(&mut self) {
        if let Ok(p) = self.cg.procs() {
            if !p.is_empty() {
                self.populated_seen = true;
                self.pids = p;
            }
        }
    }

    /// How the agent ended: an OOM kill (with the limit), an exit code or signal from the
    /// reaper, or `fallback`. The bool says it was killed for a limit.
    fn exit_cause(&self, fallback: &str) -> (String, bool) {
        if self.cg.oom_kills() > self.oom_base {
            let limits = proto::limits::parse_limits(&self.settings.limits).unwrap_or_default();
            let limit = limits
                .memory_bytes
                .map(|b| format!("memory limit {}", proto::limits::format_size(b)))
                .unwrap_or_else(|| "memory limit".to_string());
            return (format!("killed by the OOM killer: {limit}"), true);
        }
        if let Some(r) = &self.ctx.reaper {
            // The first of its processes, the one `control start` left (the agent itself).
            for pid in &self.pids {
                if let Some(e) = r.exit_of(*pid) {
                    return (format!("{fallback}: pid {pid} {e}"), false);
                }
            }
        }
        (fallback.to_string(), false)
    }

    fn dir(&self) -> PathBuf {
        self.ctx.agent_dir(&self.name)
    }

    fn vdir(&self, version: &Version) -> PathBuf {
        self.ctx.version_dir(&self.name, version)
    }

    fn cell(&self) -> std::sync::MutexGuard<'_, Cell> {
        self.cell.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sup<T>(&self, f: impl FnOnce(&mut supervise::State) -> T) -> T {
        f(&mut self.cell().sup)
    }

    pub(super) async fn run(mut self) {
        // Only an agent's folder is cleaned: a desired name may be any folder of the workdir.
        if let Ok(dir) = self.ctx.check_agent(&self.name) {
            let name = self.name.clone();
            let _ = fsx::blocking(move || {
                clean_startup_leftovers(&dir, &name);
                Ok(())
            })
            .await;
        }
        self.settings = settings::load_async(self.dir()).await;
        {
            let fatal = self.settings.fatal.clone();
            let mut c = self.cell();
            c.envs = self.settings.envs.clone();
            if let Some(f) = fatal {
                c.sup.phase = Phase::Fatal(f);
            }
        }
        self.apply_cgroup();
        self.publish();
        let (mut desire_open, mut orders_open) = (true, true);
        while desire_open || orders_open {
            let wake = self.next_wake();
            let watch = self.watch_cgroup();
            let cg = self.cg.clone();
            tokio::select! {
                biased;
                _ = cg.wait_empty(), if watch => self.cgroup_emptied().await,
                o = self.orders.recv(), if orders_open => match o {
                    Some(o) => self.order(o).await,
                    None => orders_open = false,
                },
                r = self.desire.changed(), if desire_open => match r {
                    Ok(()) => {
                        let d = self.desire.borrow_and_update().clone();
                        if let Some(d) = d {
                            self.converge(&d).await;
                        }
                    }
                    Err(_) => desire_open = false,
                },
                _ = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {
                    self.supervise().await;
                }
            }
        }
    }

    /// When the supervisor has something to do next: the restart of an agent that exited,
    /// or the next status check of one that should run.
    fn next_wake(&self) -> Option<Instant> {
        if self.settings.run != Some(true) {
            return None;
        }
        match &self.cell().sup.phase {
            Phase::Fatal(_) => None,
            Phase::Restarting { at, .. } => Some(*at),
            Phase::Idle | Phase::Running { .. } => Some(self.next_check),
        }
    }

    // ---- orders ----

    async fn order(&mut self, o: Order) {
        if let Err(e) = self.apply_settings(o.envs, o.limits).await {
            let _ = o.reply.send(Done::Failed(format!(
                "agent {:?}: cannot save envs/limits: {e}",
                self.name
            )));
            return;
        }
        let what = o.job.as_str();
        let done = match o.job {
            Job::Install(d) => self.install_job(&d).await,
            Job::Stop => self.stop_job().await,
            Job::Restart => self.restart_job().await,
            Job::Uninstall => self.uninstall_job().await,
            Job::Reset => self.reset_job().await,
        };
        tracing::debug!(agent = %self.name, job = what, done = ?done, "order done");
        let _ = o.reply.send(done);
    }

    /// Takes `envs` / `limits` an order carries (`None`: keep the agent's).
    async fn apply_settings(
        &mut self,
        envs: Option<BTreeMap<String, String>>,
        limits: Option<BTreeMap<String, String>>,
    ) -> std::io::Result<()> {
        let mut s = self.settings.clone();
        if let Some(e) = envs {
            s.envs = e;
        }
        if let Some(l) = limits {
            s.limits = l;
        }
        if s != self.settings {
            self.save(s).await?;
        }
        Ok(())
    }

    /// Saves the settings (on the blocking pool) and publishes them.
    async fn save(&mut self, s: Settings) -> std::io::Result<()> {
        settings::save_async(self.dir(), s.clone()).await?;
        let limits_changed = s.limits != self.settings.limits;
        self.settings = s;
        if limits_changed {
            self.apply_cgroup();
        }
        self.cell().envs = self.settings.envs.clone();
        self.publish();
        Ok(())
    }

    /// Saves the settings, logging a failure (the in-memory state stays right).
    async fn save_or_log(&mut self, s: Settings) {
        if let Err(e) = self.save(s.clone()).await {
            tracing::warn!(agent = %self.name, error = %e, "cannot save agent settings");
            self.settings = s;
            self.cell().envs = self.settings.envs.clone();
        }
    }

    /// Mirrors what `/status` shows of the settings and the supervisor.
    fn publish(&self) {
        let limits = self.settings.limits.clone();
        let note = (!limits.is_empty())
            .then(|| self.cg.not_enforced().map(str::to_string))
            .flatten();
        let cgroup = self.cg.is_tracked().then(|| self.cg.describe());
        let (state, restarts, last_exit) = {
            let c = self.cell();
            (
                supervise::held_state(&c.sup).map(str::to_string),
                c.sup.restarts,
                c.sup.last_exit.clone(),
            )
        };
        self.ctx.shared.agent(&self.name, |v| {
            v.limits = limits;
            v.supervisor = state;
            v.restarts = restarts;
            v.last_exit = last_exit;
            v.limits_note = note;
            v.cgroup = cgroup;
        });
    }

    async fn set_run(&mut self, run: bool) {
        if self.settings.run != Some(run) {
            let mut s = self.settings.clone();
            s.run = Some(run);
            self.save_or_log(s).await;
        }
        if run {
            self.next_check = Instant::now() + self.ctx.policy.check;
        }
    }

    /// Clears the supervisor's verdict and count: an order, or a changed desired state.
    async fn clear_supervision(&mut self, why: &str) {
        let was_fatal = self.sup(|s| {
            let f = s.is_fatal();
            s.clear();
            f
        });
        if was_fatal {
            tracing::info!(agent = %self.name, "fatal cleared: {why}");
            self.event("reset", None, why);
        }
        if self.settings.fatal.is_some() {
            let mut s = self.settings.clone();
            s.fatal = None;
            self.save_or_log(s).await;
        }
        self.publish();
    }

    /// An event of this agent: logged, and kept in the journal (`<workdir>/.ops-updater.events.json`),
    /// from which the next report (BootAgent or legacy) carries it to the server and the
    /// local `GET /events` shows it. No `version` means the current one.
    fn event(&self, kind: &str, version: Option<&Version>, cause: &str) {
        self.event_as(kind, version, cause, None, &self.last_output);
    }

    /// [`Self::event`] with the event's `state` given (`None`: the agent's state) and the
    /// output lines it carries.
    fn event_as(
        &self,
        kind: &str,
        version: Option<&Version>,
        cause: &str,
        state: Option<&str>,
        output: &[String],
    ) {
        let (restarts, held) = {
            let c = self.cell();
            let state = match supervise::held_state(&c.sup) {
                Some(w) => w.to_string(),
                None => match c.sup.phase {
                    Phase::Running { .. } => proto::bootagent::STATE_RUNNING.to_string(),
                    _ => proto::bootagent::STATE_STOPED.to_string(),
                },
            };
            (c.sup.restarts, state)
        };
        let state = state.map_or(held, str::to_string);
        let version = match version {
            Some(v) => v.to_string(),
            None => self
                .ctx
                .shared
                .get_agent(self.name.as_str())
                .and_then(|v| v.current_version)
                .unwrap_or_default(),
        };
        tracing::info!(agent = %self.name, version = %version, kind, restarts, output = ?output, "event: {cause}");
        let input = crate::events::EventInput {
            agent: self.name.to_string(),
            version,
            kind: kind.to_string(),
            cause: cause.to_string(),
            output: output.to_vec(),
            state,
            restarts,
        };
        let journal = self.ctx.shared.events().clone();
        tokio::spawn(async move {
            journal.push(input).await;
        });
    }

    /// Writes the event of a failed new version, unless it is the one written last
    /// ([`Self::noted_failure`]): one event per failure, not one per retry.
    fn failure_event(
        &mut self,
        version: &Version,
        kind: &'static str,
        state: &'static str,
        cause: &str,
    ) {
        let noted = NotedFailure {
            version: version.clone(),
            kind,
            state,
        };
        if self.noted_failure.as_ref() == Some(&noted) {
            tracing::debug!(agent = %self.name, version = %version, kind, state, "the same failure again; its event was written already");
            return;
        }
        self.noted_failure = Some(noted);
        if kind == proto::events::KIND_INSTALL_FAILED {
            // Nothing of the new version ran: the lines of an earlier start say nothing.
            self.event_as(kind, Some(version), cause, Some(state), &[]);
        } else {
            self.event(kind, Some(version), cause);
        }
    }

    // ---- legacy desired state ----

    async fn converge(&mut self, d: &Desired) {
        if let Err(e) = self.apply_settings(d.envs.clone(), d.limits.clone()).await {
            tracing::warn!(agent = %self.name, error = %e, "cannot save envs/limits");
        }
        // A change of desired version, URL or checksum clears the back-off: the operator
        // fixed something.
        if self
            .backoff
            .as_ref()
            .is_some_and(|b| b.key != BackoffKey::of(d))
        {
            self.backoff = None;
            self.ctx.shared.agent(&self.name, |v| v.backoff = None);
        }
        // A fatal verdict holds until the desired state of the agent changes.
        let fatal_version = match &self.cell().sup.phase {
            Phase::Fatal(f) => Some(f.version.clone()),
            _ => None,
        };
        if let Some(fv) = fatal_version {
            if fv != d.version || d.cmd == Cmd::Stop {
                self.clear_supervision("the desired state changed").await;
            }
        }
        self.ctx.shared.agent(&self.name, |v| {
            v.desired_version = Some(d.version.to_string());
            v.desired_cmd = Some(d.cmd_str().to_string());
        });
        let current = self.current_version().await;
        let present = current.as_ref().is_some_and(|v| self.vdir(v).is_dir());
        match plan(
            d,
            current.as_ref(),
            present,
            self.backoff.as_ref(),
            Instant::now(),
        ) {
            Plan::Nothing => {}
            Plan::Wait {
                until_unix,
                current,
            } => {
                if self.wait_logged != Some(until_unix) {
                    self.wait_logged = Some(until_unix);
                    let why = self.backoff.as_ref().map_or("", |b| b.reason.as_str());
                    let secs = (until_unix - now_unix()).max(0);
                    tracing::info!(agent = %self.name, version = %d.version, until_unix,
                        "waiting {secs} s before trying this version again: {}", crate::redact(why));
                } else {
                    tracing::debug!(agent = %self.name, version = %d.version, until_unix, "held back by a previous failure");
                }
                // The version we rolled back to must not stay down if it crashes meanwhile.
                if let Some(v) = current {
                    self.set_run(true).await;
                    self.observe(&v).await;
                }
            }
            Plan::EnsureStarted { version } => {
                self.set_run(true).await;
                self.observe(&version).await;
                // Also in the steady state, so that a host taken over from the original
                // updater (which kept every version) is trimmed to `keepVersions`.
                self.prune(&version, d).await;
            }
            Plan::EnsureStopped { version } => {
                self.set_run(false).await;
                self.sup(|s| s.clear());
                let _ = self.stop(&version).await;
            }
            Plan::Switch { from, to } => {
                let res = self.switch_recorded(d, from.as_ref()).await;
                match res {
                    Ok(()) => {}
                    Err(SwitchFailure::Install { msg: e, .. }) => {
                        let failures = self.backoff.as_ref().map_or(0, |b| b.failures) + 1;
                        let r = self.ctx.retry;
                        let delay = backoff_delay(failures, r.base, r.max, rand::random());
                        tracing::warn!(agent = %self.name, version = %to, failures, retry_in = ?delay, error = %e, "install failed");
                        self.set_backoff(d, failures, delay, &e);
                    }
                    Err(SwitchFailure::Stop(e)) => {
                        let delay = self.ctx.retry.failed_start;
                        self.set_backoff(d, 1, delay, &e);
                    }
                    Err(SwitchFailure::Start(e)) => {
                        let delay = self.ctx.retry.failed_start;
                        tracing::error!(agent = %self.name, version = %to, retry_in = ?delay, error = %e, "new version did not start; rolled back");
                        self.set_backoff(d, 1, delay, &e);
                    }
                }
            }
        }
    }

    // ---- jobs ----

    async fn install_job(&mut self, d: &Desired) -> Done {
        let name = self.name.clone();
        let version = &d.version;
        // An explicit order: whatever the supervisor concluded before no longer holds.
        self.clear_supervision("an install job arrived").await;
        let current = self.current_version().await;
        if current.as_ref() == Some(version) {
            // Installed already (a job run again after a restart, or a repeated order):
            // make sure it runs.
            self.set_run(true).await;
            let _g = self.lock.clone().lock_owned().await;
            let vdir = self.vdir(version);
            return match self.status(&vdir, version).await {
                AgentStatus::Started => {
                    self.mark_running();
                    Done::Ok(format!("{name} {version} is installed and running"))
                }
                AgentStatus::Stopped => match self.start_and_check(&vdir, version).await {
                    Ok(()) => {
                        self.mark_running();
                        Done::Ok(format!("{name} {version} was installed; started it"))
                    }
                    Err(e) => Done::Failed(e),
                },
                AgentStatus::Error(e) => Done::Failed(format!(
                    "{name} {version} is installed but its status is unreadable: {e}"
                )),
            };
        }
        match self.switch_recorded(d, current.as_ref()).await {
            Ok(()) => {
                let from = current.map_or(String::new(), |c| format!(" (from {c})"));
                Done::Ok(format!("{name} {version} installed and running{from}"))
            }
            Err(SwitchFailure::Install { msg: e, .. }) | Err(SwitchFailure::Stop(e)) => {
                Done::Failed(e)
            }
            Err(SwitchFailure::Start(e)) => Done::RolledBack(e),
        }
    }

    async fn stop_job(&mut self) -> Done {
        let name = self.name.clone();
        self.set_run(false).await;
        self.sup(|s| s.clear());
        self.publish();
        let Some(version) = self.installed().await else {
            return Done::Ok(format!("{name} is not installed; nothing to stop"));
        };
        self.stop(&version).await
    }

    async fn restart_job(&mut self) -> Done {
        let name = self.name.clone();
        let Some(version) = self.installed().await else {
            return Done::Failed(format!("{name} is not installed; nothing to restart"));
        };
        self.clear_supervision("a restart job arrived").await;
        self.set_run(true).await;
        let _g = self.lock.clone().lock_owned().await;
        let vdir = self.vdir(&version);
        if let Err(e) = self.control(&vdir, "stop").await {
            return Done::Failed(format!("restart: {e}"));
        }
        self.kill_leftovers().await;
        match self.start_and_check(&vdir, &version).await {
            Ok(()) => {
                self.mark_running();
                self.record(format!("restart {version}"), Outcome::Ok, None);
                Done::Ok(format!("{name} {version} restarted"))
            }
            Err(e) => {
                self.record(
                    format!("restart {version}"),
                    Outcome::Failed,
                    Some(e.clone()),
                );
                Done::Failed(format!("restart: {e}"))
            }
        }
    }

    async fn reset_job(&mut self) -> Done {
        let name = self.name.clone();
        let was = self.sup(|s| s.is_fatal());
        self.clear_supervision("a reset job arrived").await;
        let Some(version) = self.installed().await else {
            return Done::Ok(format!("{name} is not installed; nothing to reset"));
        };
        if self.settings.run == Some(true) {
            self.observe(&version).await;
        }
        let state = if was {
            "fatal cleared"
        } else {
            "was not fatal"
        };
        Done::Ok(format!("{name} {version}: {state}"))
    }

    /// Stops the agent, then removes its folder whole (every version, `.version`, settings):
    /// renamed to a hidden name first, so that a crash half-way leaves a folder that is no
    /// agent and is cleaned at the next start.
    async fn uninstall_job(&mut self) -> Done {
        let name = self.name.clone();
        let lock = self.lock.clone();
        let _g = lock.lock().await;
        // Checked under the lock, right before acting: only an agent's folder is removed,
        // never a file or folder that merely has a valid name (the updater's own config,
        // an operator's data).
        let dir = match self.ctx.check_agent(&name) {
            Ok(dir) => dir,
            Err(crate::workdir::NotAgent::Missing { .. }) => {
                return Done::Ok(format!("{name} is not installed; nothing to remove"))
            }
            Err(e) => return Done::Invalid(format!("uninstall refused: {e}")),
        };
        if let Some(version) = self.installed().await {
            let vdir = self.vdir(&version);
            if self.status(&vdir, &version).await != AgentStatus::Stopped {
                if let Err(e) = self.control(&vdir, "stop").await {
                    return Done::Failed(format!("uninstall: {e}; nothing removed"));
                }
                self.kill_leftovers().await;
                let st = self.status(&vdir, &version).await;
                if st != AgentStatus::Stopped {
                    return Done::Failed(format!(
                        "uninstall: control stop succeeded but status is {:?}; nothing removed",
                        st.wire()
                    ));
                }
            }
        }
        self.settings.run = Some(false);
        self.sup(|s| s.clear());
        let workdir = self.ctx.workdir.clone();
        let aside = workdir.join(format!(
            ".{name}{UNINSTALL_INFIX}{}",
            uuid::Uuid::new_v4().simple()
        ));
        let (from, to) = (dir.clone(), aside.clone());
        let moved = fsx::blocking(move || rename_durably(&from, &to, &workdir)).await;
        if let Err(e) = moved {
            return Done::Failed(format!("uninstall: cannot move {}: {e}", dir.display()));
        }
        let gone = fsx::blocking(move || remove_dir_all(&aside)).await;
        if let Err(e) = gone {
            tracing::warn!(agent = %name, error = %e, "cannot remove an uninstalled agent's folder; it is retried at the next start");
        }
        if let Err(e) = self.cg.remove() {
            tracing::debug!(agent = %name, error = %e, "cannot remove the agent's cgroup");
        }
        self.settings = Settings::default();
        self.cell().envs.clear();
        self.publish();
        Done::Ok(format!("{name} uninstalled"))
    }

    // ---- supervision ----

    async fn supervise(&mut self) {
        let now = Instant::now();
        let due_restart =
            matches!(self.cell().sup.phase, Phase::Restarting { at, .. } if at <= now);
        self.next_check = now + self.ctx.policy.check;
        let Some(version) = self.installed().await else {
            return;
        };
        if due_restart {
            self.restart(&version).await;
        } else {
            self.observe(&version).await;
        }
    }

    /// Reads the agent's status and acts on it by the policy: an agent that should run and
    /// is found stopped after it was seen running has exited abnormally; one never seen
    /// running is started. Does nothing while the supervisor holds it (`fatal`, or waiting
    /// to restart) or while its status cannot be read (starting blind could run two).
    async fn observe(&mut self, version: &Version) {
        if matches!(
            self.cell().sup.phase,
            Phase::Fatal(_) | Phase::Restarting { .. }
        ) {
            return;
        }
        let vdir = self.vdir(version);
        let lock = self.lock.clone();
        let _g = lock.lock().await;
        match self.status(&vdir, version).await {
            AgentStatus::Started => {
                self.status_failing = false;
                self.note_processes();
                let now = Instant::now();
                self.sup(|s| {
                    if matches!(s.phase, Phase::Idle) {
                        s.running(now, now_unix());
                    }
                    s.note_alive(now, &self.ctx.policy);
                });
            }
            AgentStatus::Stopped => {
                self.status_failing = false;
                if self.settings.run != Some(true) {
                    return;
                }
                let was_running = matches!(self.cell().sup.phase, Phase::Running { .. });
                if was_running {
                    let (cause, killed) =
                        self.exit_cause("exited: control status says it is stopped");
                    self.exited(version, &cause, killed);
                } else {
                    tracing::info!(agent = %self.name, version = %version, "agent is stopped; starting it");
                    self.start_supervised(&vdir, version, false).await;
                }
            }
            // The state is unknown (the script failed or hung): starting blind could run a
            // second copy, so leave it alone and report the error upstream.
            AgentStatus::Error(e) => {
                tracing::debug!(agent = %self.name, version = %version, error = %e, "status unreadable; not acting");
                if !self.status_failing {
                    self.status_failing = true;
                    self.event("status_failed", Some(version), &e);
                }
            }
        }
    }

    /// The agent exited abnormally: the policy decides when it comes back.
    fn exited(&mut self, version: &Version, cause: &str, killed: bool) {
        if killed {
            self.ctx.shared.metrics().oom_kill();
        }
        self.populated_seen = false;
        let p = self.ctx.policy;
        let verdict =
            self.sup(|s| s.exited(Instant::now(), now_unix(), version, cause, killed, &p));
        tracing::warn!(agent = %self.name, version = %version, cause, "agent exited abnormally");
        self.event(
            if killed { "killed" } else { "exited" },
            Some(version),
            cause,
        );
        self.verdict(version, verdict, cause);
    }

    fn verdict(&mut self, version: &Version, v: Verdict, cause: &str) {
        match v {
            Verdict::RestartAt(at) => {
                let secs = at.saturating_duration_since(Instant::now()).as_secs();
                tracing::info!(agent = %self.name, version = %version, "restarting in {secs} s");
            }
            Verdict::GiveUp => {
                let failures = self.cell().sup.failures;
                tracing::error!(agent = %self.name, version = %version, failures, cause, "agent keeps failing; not restarting it (fatal)");
                self.event(
                    "fatal",
                    Some(version),
                    &format!("{failures} consecutive failures; last: {cause}"),
                );
                let fatal = match &self.cell().sup.phase {
                    Phase::Fatal(f) => Some(f.clone()),
                    _ => None,
                };
                self.settings.fatal = fatal;
                let (dir, s) = (self.dir(), self.settings.clone());
                // Saved in the background: the verdict is already in force in memory.
                tokio::spawn(async move {
                    if let Err(e) = settings::save_async(dir, s).await {
                        tracing::warn!(error = %e, "cannot save a fatal verdict");
                    }
                });
            }
        }
        self.publish();
    }

    /// The agent's cgroup emptied: its last process ended, whatever its `control status`
    /// says.
    async fn cgroup_emptied(&mut self) {
        let Some(version) = self.installed().await else {
            self.populated_seen = false;
            return;
        };
        if !matches!(self.cell().sup.phase, Phase::Running { .. }) {
            return;
        }
        let (cause, killed) = self.exit_cause("exited: its last process ended");
        self.exited(&version, &cause, killed);
    }

    async fn restart(&mut self, version: &Version) {
        let vdir = self.vdir(version);
        let lock = self.lock.clone();
        let _g = lock.lock().await;
        // Up again by itself (or by someone else) meanwhile: nothing to restart.
        if self.status(&vdir, version).await == AgentStatus::Started {
            self.mark_running();
            return;
        }
        self.start_supervised(&vdir, version, true).await;
    }

    /// Starts `version` (the caller holds the lock) and accounts for the outcome.
    async fn start_supervised(&mut self, vdir: &Path, version: &Version, restart: bool) {
        match self.start_and_check(vdir, version).await {
            Ok(()) => {
                if restart {
                    self.ctx.shared.metrics().restart();
                    self.sup(|s| s.restarts = s.restarts.saturating_add(1));
                    self.event("restarted", Some(version), "restarted by the supervisor");
                }
                self.mark_running();
                self.record(format!("start {version}"), Outcome::Ok, None);
                tracing::info!(agent = %self.name, version = %version, "agent started");
            }
            Err(e) => {
                tracing::warn!(agent = %self.name, version = %version, error = %e, "start failed");
                self.ctx.shared.metrics().failure(Failure::ControlStart);
                self.record(format!("start {version}"), Outcome::Failed, Some(e.clone()));
                let p = self.ctx.policy;
                let v = self.sup(|s| s.start_failed(Instant::now(), now_unix(), version, &e, &p));
                self.event("restart_failed", Some(version), &e);
                self.verdict(version, v, &e);
            }
        }
    }

    fn mark_running(&mut self) {
        self.oom_base = self.cg.oom_kills();
        self.populated_seen = false;
        self.pids.clear();
        self.note_processes();
        let now = Instant::now();
        self.sup(|s| s.running(now, now_unix()));
        self.publish();
    }

    // ---- the actions ----

    /// `.version` when it is a valid version, or `None`.
    async fn current_version(&self) -> Option<Version> {
        match read_current(&self.dir()) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(agent = %self.name, error = %e, "treating the agent as not installed");
                None
            }
        }
    }

    /// The installed current version: `.version` naming a folder that exists.
    async fn installed(&self) -> Option<Version> {
        self.current_version()
            .await
            .filter(|v| self.vdir(v).is_dir())
    }

    fn busy(&self, b: bool) {
        self.ctx.shared.agent(&self.name, |v| v.busy = b);
    }

    fn set_backoff(&mut self, d: &Desired, failures: u32, delay: Duration, reason: &str) {
        let until_unix = now_unix() + delay.as_secs() as i64;
        let b = Backoff {
            key: BackoffKey::of(d),
            failures,
            until: Instant::now() + delay,
            until_unix,
            reason: reason.to_string(),
        };
        let view = BackoffView {
            version: d.version.to_string(),
            tarball_url: crate::redact(&d.tarball_url).into_owned(),
            failures,
            next_retry_at: until_unix,
            reason: reason.to_string(),
        };
        self.backoff = Some(b);
        self.ctx
            .shared
            .agent(&self.name, |v| v.backoff = Some(view));
    }

    fn record(&self, action: String, outcome: Outcome, error: Option<String>) {
        let now = now_unix();
        self.ctx.shared.agent(&self.name, |v| {
            v.last_action = Some(action);
            v.last_result = Some(outcome);
            if error.is_some() || outcome == Outcome::Ok {
                v.last_error = error;
            }
            v.last_action_at = Some(now);
        });
    }

    /// `control <action>` of the version in `vdir` with the agent's environment.
    async fn control(&self, vdir: &Path, action: &str) -> Result<process::Output, String> {
        control::control(
            vdir,
            action,
            &self.settings.envs,
            Some(&self.cg),
            &self.ctx.control,
        )
        .await
        .map_err(|e| e.to_string())
    }

    /// Reads the status of `vdir` under the lock the caller holds, and notes it.
    async fn status(&self, vdir: &Path, version: &Version) -> AgentStatus {
        let st = control::status(vdir, &self.settings.envs, Some(&self.cg), &self.ctx.status).await;
        let wire = st.wire();
        let now = now_unix();
        let current = read_current(&self.dir()).ok().flatten();
        if current.as_ref() == Some(version) {
            self.ctx.shared.agent(&self.name, |v| {
                v.current_version = Some(version.to_string());
                v.status = Some(wire);
                v.status_at = Some(now);
            });
        }
        st
    }

    /// Polls `control status` every [`START_POLL`] until it says started or the start
    /// timeout passes. Returns the last status seen.
    async fn wait_started(&self, vdir: &Path, version: &Version) -> AgentStatus {
        let deadline = Instant::now() + self.ctx.start_timeout;
        loop {
            let st = self.status(vdir, version).await;
            if st == AgentStatus::Started || Instant::now() + START_POLL > deadline {
                return st;
            }
            tokio::time::sleep(START_POLL).await;
        }
    }

    /// `control start`, then wait for `started`.
    async fn start_and_check(&mut self, vdir: &Path, version: &Version) -> Result<(), String> {
        self.busy(true);
        let res = self.start_and_check_inner(vdir, version).await;
        self.busy(false);
        res
    }

    async fn start_and_check_inner(
        &mut self,
        vdir: &Path,
        version: &Version,
    ) -> Result<(), String> {
        let started = control::control(
            vdir,
            "start",
            &self.settings.envs,
            Some(&self.cg),
            &self.ctx.control,
        )
        .await;
        match started {
            Ok(out) => self.last_output = tail_lines(&out),
            Err(e) => {
                if let control::ControlError::Failed { output, .. } = &e {
                    self.last_output = tail_lines(output);
                }
                return Err(e.to_string());
            }
        }
        match self.wait_started(vdir, version).await {
            AgentStatus::Started => Ok(()),
            st => Err(format!(
                "control start in {} succeeded but status is {:?} after {:?} (startTimeoutSecs)",
                vdir.display(),
                st.wire(),
                self.ctx.start_timeout
            )),
        }
    }

    /// Stops `version` (the caller does not hold the lock) and records it.
    async fn stop(&mut self, version: &Version) -> Done {
        let name = self.name.clone();
        let vdir = self.vdir(version);
        let lock = self.lock.clone();
        let _g = lock.lock().await;
        if self.status(&vdir, version).await == AgentStatus::Stopped {
            return Done::Ok(format!("{name} {version} was already stopped"));
        }
        tracing::info!(agent = %name, version = %version, "stopping agent");
        self.busy(true);
        let res = self.control(&vdir, "stop").await;
        if res.is_ok() {
            self.kill_leftovers().await;
        }
        let after = self.status(&vdir, version).await;
        self.busy(false);
        let action = format!("stop {version}");
        match (res, after) {
            (Ok(_), AgentStatus::Stopped) => {
                self.record(action, Outcome::Ok, None);
                Done::Ok(format!("{name} {version} stopped"))
            }
            (Err(e), _) => {
                self.ctx.shared.metrics().failure(Failure::ControlStop);
                self.record(action, Outcome::Failed, Some(e.clone()));
                Done::Failed(e)
            }
            (Ok(_), st) => {
                self.ctx.shared.metrics().failure(Failure::ControlStop);
                let e = format!("control stop succeeded but status is {:?}", st.wire());
                self.record(action, Outcome::Failed, Some(e.clone()));
                Done::Failed(e)
            }
        }
    }

    /// Ends every process left in the agent's cgroup after its `control stop` (SIGTERM, then
    /// SIGKILL after the grace period), so no orphan outlives a stop or an uninstall.
    async fn kill_leftovers(&mut self) {
        self.populated_seen = false;
        if !self.cg.is_tracked() {
            return;
        }
        let left = self.cg.kill_all(self.ctx.control.grace).await;
        if !left.is_empty() {
            tracing::warn!(agent = %self.name, pids = ?left, "processes of the agent survive SIGKILL");
        }
    }

    /// [`Self::switch`] with the record, the supervisor and pruning around it.
    async fn switch_recorded(
        &mut self,
        d: &Desired,
        from: Option<&Version>,
    ) -> Result<(), SwitchFailure> {
        let to = d.version.clone();
        self.busy(true);
        let res = self.switch(d, from, &to).await;
        self.busy(false);
        let action = format!("upgrade {} -> {to}", from.map_or("none", Version::as_str));
        let metrics = self.ctx.shared.metrics();
        match &res {
            Ok(()) => metrics.install(Install::Ok),
            Err(SwitchFailure::Install { .. }) => metrics.install(Install::Failed),
            Err(SwitchFailure::Start(_)) => {
                metrics.failure(Failure::ControlStart);
                metrics.install(Install::RolledBack);
            }
            Err(SwitchFailure::Stop(_)) => {
                metrics.failure(Failure::ControlStop);
                metrics.install(Install::Failed);
            }
        }
        match &res {
            Ok(()) => {
                self.backoff = None;
                self.noted_failure = None;
                self.record(action, Outcome::Ok, None);
                self.ctx.shared.agent(&self.name, |v| {
                    v.backoff = None;
                    v.current_version = Some(to.to_string());
                });
                self.clear_supervision("a new version was installed").await;
                self.set_run(true).await;
                self.mark_running();
                self.prune(&to, d).await;
            }
            Err(SwitchFailure::Install { state, msg }) => {
                self.record(format!("install {to}"), Outcome::Failed, Some(msg.clone()));
                self.failure_event(&to, proto::events::KIND_INSTALL_FAILED, state, msg);
            }
            Err(SwitchFailure::Start(e)) => {
                self.record(action, Outcome::RolledBack, Some(e.clone()));
                if from.is_some() {
                    self.mark_running();
                }
                // A release failure either way; the cause says what runs now.
                let cause = match from {
                    Some(old) => format!("{to} did not start; rolled back to {old}: {e}"),
                    None => format!(
                        "{to} did not start; nothing was put back (no previous version): {e}"
                    ),
                };
                self.failure_event(&to, proto::events::KIND_ROLLED_BACK, "", &cause);
            }
            Err(SwitchFailure::Stop(e)) => self.record(action, Outcome::Failed, Some(e.clone())),
        }
        res
    }

    /// Installs `to` (outside the lock), then under the lock stops `from`, starts `to`,
    /// waits for it, and writes `.version`; rolls back to `from` if `to` does not start.
    async fn switch(
        &mut self,
        d: &Desired,
        from: Option<&Version>,
        to: &Version,
    ) -> Result<(), SwitchFailure> {
        let dir = self.dir();
        std::fs::create_dir_all(&dir).map_err(|e| SwitchFailure::Install {
            state: proto::events::INSTALL_FAILED_DISK,
            msg: format!("{}: {e}", dir.display()),
        })?;
        tracing::info!(agent = %self.name, version = %to, url = %crate::redact(&d.tarball_url), "installing");
        self.ctx.shared.agent(&self.name, |v| {
            v.last_action = Some(format!("install {to}"));
        });
        let want = Want {
            md5: d.md5.clone(),
            sha256: d.sha256.clone(),
        };
        let vdir = artifact::install(
            &self.ctx.fetcher,
            &dir,
            &self.name,
            to,
            &d.tarball_url,
            // An empty md5 URL means the artifact has no `.md5` file (BootAgent jobs carry
            // their digests instead).
            (!d.md5_url.is_empty()).then_some(d.md5_url.as_str()),
            want,
        )
        .await
        .map_err(|e| {
            self.ctx.shared.metrics().failure(e.failure());
            SwitchFailure::Install {
                state: e.install_failed_state(),
                msg: e.to_string(),
            }
        })?;

        let lock = self.lock.clone();
        let _g = lock.lock().await;
        if let Some(old) = from {
            let odir = self.vdir(old);
            tracing::info!(agent = %self.name, version = %old, "stopping previous version");
            let stopped = self.control(&odir, "stop").await;
            if stopped.is_ok() {
                self.kill_leftovers().await;
            }
            if let Err(e) = stopped {
                // Two copies of one agent must never run. The original started the new one
                // anyway; we stop whatever of the old one is left (its processes: those whose
                // working directory or executable lies in its folder, see
                // `process::processes_in`), and if something of it survives SIGKILL, keep it
                // current and give up on this switch.
                tracing::warn!(agent = %self.name, version = %old, error = %e, "stopping previous version failed; killing what is left of it");
                let left = process::stop_processes_in(&odir, self.ctx.control.grace).await;
                if !left.is_empty() {
                    let msg = format!(
                        "stopping {old} failed ({e}) and {} of its processes still run after SIGKILL (pids {left:?}); {old} stays current, {to} was not started",
                        left.len()
                    );
                    tracing::error!(agent = %self.name, version = %old, error = %msg, "switch abandoned");
                    return Err(SwitchFailure::Stop(msg));
                }
                tracing::info!(agent = %self.name, version = %old, "previous version's processes stopped");
            }
        }
        tracing::info!(agent = %self.name, version = %to, "starting new version");
        let started = self.start_and_check_inner(&vdir, to).await;
        let started = match started {
            Ok(()) => fsx::write_version_file_async(dir.clone(), to.to_string())
                .await
                .map_err(|e| format!("cannot write {}/.version: {e}", dir.display())),
            Err(e) => Err(e),
        };
        match started {
            Ok(()) => {
                tracing::info!(agent = %self.name, version = %to, from = ?from, "agent upgraded");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(agent = %self.name, version = %to, error = %e, "new version failed; rolling back");
                if let Err(se) = self.control(&vdir, "stop").await {
                    tracing::warn!(agent = %self.name, version = %to, error = %se, "stopping the failed version failed");
                }
                if let Some(old) = from {
                    let odir = self.vdir(old);
                    match self.start_and_check_inner(&odir, old).await {
                        Ok(()) => {
                            tracing::info!(agent = %self.name, version = %old, "previous version running again")
                        }
                        Err(re) => {
                            tracing::error!(agent = %self.name, version = %old, error = %re, "previous version did not start again");
                            return Err(SwitchFailure::Start(format!(
                                "{e}; and restarting previous version {old} failed: {re}"
                            )));
                        }
                    }
                }
                Err(SwitchFailure::Start(e))
            }
        }
    }

    /// Keeps the current version and the most recent others (by mtime), `keep_versions` in
    /// all, and removes stale downloads that are not the desired tarball. On the blocking
    /// pool: removing a large version folder takes long.
    async fn prune(&self, current: &Version, d: &Desired) {
        let dir = match self.ctx.check_agent(&self.name) {
            Ok(dir) => dir,
            Err(e) => {
                tracing::warn!(agent = %self.name, error = %e, "not pruning");
                return;
            }
        };
        let (name, current) = (self.name.clone(), current.clone());
        let keep = self.ctx.keep_versions;
        let keep_prefix = proto::names::tarball_file(&self.name, &d.version);
        let _ = fsx::blocking(move || {
            prune_blocking(&dir, &name, &current, keep, &keep_prefix);
            Ok(())
        })
        .await;
    }
}

#[allow(clippy::disallowed_methods)] // Blocking: called on the blocking pool.
fn rename_durably(from: &Path, to: &Path, dir: &Path) -> std::io::Result<()> {
    std::fs::rename(from, to)?;
    fsx::fsync_dir(dir)
}

#[allow(clippy::disallowed_methods)] // Blocking: called on the blocking pool.
fn remove_dir_all(p: &Path) -> std::io::Result<()> {
    std::fs::remove_dir_all(p)
}

#[allow(clippy::disallowed_methods)] // Blocking: called on the blocking pool.
fn prune_blocking(dir: &Path, name: &AgentName, current: &Version, keep: usize, keep_prefix: &str) {
    for v in versions_to_prune(dir, current, keep) {
        tracing::info!(agent = %name, version = %v, "removing old version");
        if let Err(e) = remove_version(dir, &v) {
            tracing::warn!(agent = %name, version = %v, error = %e, "cannot remove old version");
        }
    }
    let downloads = dir.join(artifact::DOWNLOAD_DIR);
    if let Ok(rd) = std::fs::read_dir(&downloads) {
        for e in rd.flatten() {
            let n = e.file_name();
            if !n.to_string_lossy().starts_with(keep_prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Removes folders left by an `uninstall` that was interrupted: real folders named
/// `.<agent>.uninstall-<32 hex digits>`, the name the uninstall gives an agent's folder
/// after checking it; nothing else of the workdir. Blocking.
#[allow(clippy::disallowed_methods)] // Blocking: called at start, before the runtime's work.
pub fn clean_uninstall_leftovers(workdir: &Path) {
    let Ok(rd) = std::fs::read_dir(workdir) else {
        return;
    };
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if is_uninstall_leftover(&n) && e.file_type().is_ok_and(|t| t.is_dir()) {
            tracing::info!(dir = %e.path().display(), "removing an interrupted uninstall");
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn is_uninstall_leftover(file_name: &str) -> bool {
    let Some(rest) = file_name.strip_prefix('.') else {
        return false;
    };
    let Some((agent, id)) = rest.rsplit_once(UNINSTALL_INFIX) else {
        return false;
    };
    proto::validate_agent_name(agent).is_ok()
        && id.len() == 32
        && id.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_uninstall_names_are_leftovers() {
        let id = "0123456789abcdef0123456789abcdef";
        assert!(is_uninstall_leftover(&format!(".basic.uninstall-{id}")));
        assert!(!is_uninstall_leftover(&format!("basic.uninstall-{id}")));
        assert!(!is_uninstall_leftover(".basic.uninstall-x"));
        assert!(!is_uninstall_leftover(&format!("..uninstall-{id}")));
    }
}
