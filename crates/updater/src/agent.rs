//! Per-agent convergence: one worker task per agent brings it to the state the server
//! wants (install, switch, roll back, start, stop) and prunes old versions.
//!
//! Agents are independent: each has its own task, fed the latest desired state over a
//! `watch` channel, so a slow download or a hung script for one agent never delays the
//! heartbeat or the others. Each agent also has an action lock, held around every control
//! script run (`start`, `stop`, `status`): two scripts never run on one agent at once. The
//! download happens outside the lock, so the round keeps reading the agent's real status
//! while a new version is fetched; during a switch the round reports the last status it
//! read instead of waiting (see [`collect`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use proto::legacy::{Cmd, DesiredAgent, RealAgent};
use tokio::sync::{watch, Mutex};
use tokio::time::Instant;

use crate::artifact::{self, Fetcher, Want};
use crate::control::{self, AgentStatus, ControlConfig};
use crate::daemon::CONTROL_GRACE;
use crate::fsx;
use crate::process;
use crate::state::{now_unix, BackoffView, Outcome, Shared};

/// How often `control status` is polled while waiting for a new version to start.
pub const START_POLL: Duration = Duration::from_millis(200);

/// What the server wants for one agent, checked: every name and URL here is safe to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub name: String,
    pub version: String,
    pub cmd: Cmd,
    pub tarball_url: String,
    pub md5_url: String,
    /// Lowercase hex MD5 the artifact must have, when already known (a BootAgent job
    /// carries it); otherwise it is read from `md5_url`.
    pub md5: Option<String>,
    /// Lowercase hex, when the server sent one.
    pub sha256: Option<String>,
}

/// Why a desired agent from the server was skipped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DesiredError {
    #[error("{0}")]
    Name(#[from] proto::NameError),
    #[error("agent {name:?}: unknown cmd {cmd:?}, ignored")]
    UnknownCmd { name: String, cmd: String },
    #[error("agent {name:?}: tarball base {url:?} is not an http:// or https:// URL")]
    BadUrl { name: String, url: String },
    #[error("agent {name:?}: sha256 {value:?} is not 64 hex digits")]
    BadSha256 { name: String, value: String },
}

fn is_http_url(u: &str) -> bool {
    let rest = u
        .strip_prefix("http://")
        .or_else(|| u.strip_prefix("https://"));
    match rest {
        Some(r) => {
            !r.is_empty()
                && !r.starts_with('/')
                && !r
                    .bytes()
                    .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        }
        None => false,
    }
}

impl Desired {
    /// Validates one entry of `desiredAgents`.
    pub fn from_wire(d: &DesiredAgent) -> Result<Desired, DesiredError> {
        proto::validate_agent_name(&d.name)?;
        proto::validate_version(&d.version)?;
        let cmd = Cmd::parse(&d.cmd).ok_or_else(|| DesiredError::UnknownCmd {
            name: d.name.clone(),
            cmd: d.cmd.chars().take(64).collect(),
        })?;
        // The tarball base is required; the md5 base is optional (empty: the tarball base).
        let bases = std::iter::once(&d.tarball).chain((!d.md5.is_empty()).then_some(&d.md5));
        for base in bases {
            if !is_http_url(base) {
                return Err(DesiredError::BadUrl {
                    name: d.name.clone(),
                    url: base.chars().take(200).collect(),
                });
            }
        }
        let sha256 = match d.sha256.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(s) if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) => {
                Some(s.to_ascii_lowercase())
            }
            Some(s) => {
                return Err(DesiredError::BadSha256 {
                    name: d.name.clone(),
                    value: s.chars().take(80).collect(),
                })
            }
        };
        Ok(Desired {
            name: d.name.clone(),
            version: d.version.clone(),
            cmd,
            tarball_url: d.tarball_url(),
            md5_url: d.md5_url(),
            md5: None,
            sha256,
        })
    }

    fn cmd_str(&self) -> &'static str {
        match self.cmd {
            Cmd::Start => "start",
            Cmd::Stop => "stop",
        }
    }
}

/// Retry timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// First wait after a failed download/verify/unpack; doubled on each failure.
    pub base: Duration,
    /// Longest wait between download attempts.
    pub max: Duration,
    /// Wait after a version failed to start.
    pub failed_start: Duration,
}

/// The delay before attempt `failures + 1`: `base * 2^(failures-1)`, capped at `max`, then
/// scaled by `0.5 + 0.5 * r` for `r` in [0, 1) so that hosts that failed together do not
/// retry together ("equal jitter": never less than half the nominal delay).
pub fn backoff_delay(failures: u32, base: Duration, max: Duration, r: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(32);
    let nominal = base.saturating_mul(1u32 << exp.min(31)).min(max);
    nominal.mul_f64(0.5 + 0.5 * r.clamp(0.0, 1.0))
}

/// A desired state that failed and is held back until `until`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    /// What failed: a change in any of these resets the back-off.
    pub key: BackoffKey,
    pub failures: u32,
    pub until: Instant,
    pub until_unix: i64,
    pub reason: String,
}

/// The identity of a desired version, for back-off purposes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackoffKey {
    pub version: String,
    pub tarball_url: String,
    pub md5_url: String,
    pub sha256: Option<String>,
}

impl BackoffKey {
    fn of(d: &Desired) -> BackoffKey {
        BackoffKey {
            version: d.version.clone(),
            tarball_url: d.tarball_url.clone(),
            md5_url: d.md5_url.clone(),
            sha256: d.sha256.clone(),
        }
    }
}

/// What to do for one desired state, decided from what is on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// The desired version is current: start it if its status says stopped.
    EnsureStarted { version: String },
    /// Stop the current version if its status does not say stopped.
    EnsureStopped { version: String },
    /// Install `to` and switch to it from `from` (the installed current version, if any).
    Switch { from: Option<String>, to: String },
    /// The desired version failed before; wait, keeping the installed current version
    /// (if any) running meanwhile.
    Wait {
        until_unix: i64,
        current: Option<String>,
    },
    /// Nothing to do (e.g. `stop` for an agent that is not installed).
    Nothing,
}

/// Decides what to do. `current` is `.version`; `current_present` says whether its folder
/// exists. Pure, so the whole decision table is unit-tested.
pub fn plan(
    desired: &Desired,
    current: Option<&str>,
    current_present: bool,
    backoff: Option<&Backoff>,
    now: Instant,
) -> Plan {
    let installed_current = current.filter(|_| current_present);
    match desired.cmd {
        Cmd::Stop => match installed_current {
            Some(v) => Plan::EnsureStopped {
                version: v.to_string(),
            },
            None => Plan::Nothing,
        },
        Cmd::Start => {
            if installed_current == Some(desired.version.as_str()) {
                return Plan::EnsureStarted {
                    version: desired.version.clone(),
                };
            }
            if let Some(b) = backoff {
                if b.key == BackoffKey::of(desired) && now < b.until {
                    return Plan::Wait {
                        until_unix: b.until_unix,
                        current: installed_current.map(str::to_string),
                    };
                }
            }
            Plan::Switch {
                from: installed_current.map(str::to_string),
                to: desired.version.clone(),
            }
        }
    }
}

/// Everything a worker needs, shared by all workers.
#[derive(Debug)]
pub struct Ctx {
    pub workdir: PathBuf,
    pub fetcher: Fetcher,
    /// For `start` and `stop`.
    pub control: ControlConfig,
    /// For `status` (shorter: the round waits for it).
    pub status: ControlConfig,
    pub start_timeout: Duration,
    pub keep_versions: usize,
    pub retry: RetryPolicy,
    pub shared: Shared,
    /// Extra environment for control scripts (none by default).
    pub envs: BTreeMap<String, String>,
    /// The updater's own files: no action removes or renames them or a folder holding one.
    pub own: Arc<crate::workdir::Own>,
}

impl Ctx {
    /// The workers' context from the updater's config, shared by the legacy daemon and
    /// BootAgent mode so both act on agents with the same limits and timeouts.
    pub fn from_config(
        cfg: &crate::config::Resolved,
        shared: Shared,
    ) -> Result<Ctx, artifact::ArtifactError> {
        let c = &cfg.config;
        let fetcher = Fetcher::with_tls(
            artifact::Limits {
                max_download_bytes: c.max_download_bytes,
                max_unpacked_bytes: c.max_unpacked_bytes,
                ..artifact::Limits::default()
            },
            c.tls_insecure,
        )?;
        let control_timeout = Duration::from_secs(c.control_timeout_secs);
        let status_timeout = Duration::from_secs(c.status_timeout_secs);
        Ok(Ctx {
            workdir: cfg.workdir.clone(),
            fetcher,
            control: ControlConfig {
                timeout: control_timeout,
                grace: CONTROL_GRACE.min(control_timeout),
            },
            status: ControlConfig {
                timeout: status_timeout,
                grace: CONTROL_GRACE.min(status_timeout),
            },
            start_timeout: Duration::from_secs(c.start_timeout_secs),
            keep_versions: c.keep_versions.max(1) as usize,
            retry: RetryPolicy {
                base: Duration::from_secs(c.retry_base_secs),
                max: Duration::from_secs(c.retry_max_secs),
                failed_start: Duration::from_secs(c.failed_start_retry_secs),
            },
            shared,
            envs: BTreeMap::new(),
            own: Arc::new(crate::workdir::Own::new(cfg.own_files.iter().cloned())),
        })
    }

    /// `name`'s folder when it is an agent ([`crate::workdir::check_agent`]): the check
    /// before anything under it is removed or renamed.
    pub fn check_agent(&self, name: &str) -> Result<PathBuf, crate::workdir::NotAgent> {
        crate::workdir::check_agent(&self.workdir, &self.own, name)
    }

    pub fn agent_dir(&self, name: &str) -> PathBuf {
        self.workdir.join(name)
    }
}

/// A running worker for one agent.
#[derive(Debug)]
pub struct Handle {
    name: String,
    tx: watch::Sender<Option<Desired>>,
    lock: Arc<Mutex<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Handle {
    /// Starts the worker for `name` (a validated agent name). It first removes leftovers of
    /// interrupted work in the agent's folder.
    pub fn spawn(ctx: Arc<Ctx>, name: &str) -> Handle {
        let (tx, rx) = watch::channel(None);
        let lock = Arc::new(Mutex::new(()));
        let worker = Worker {
            ctx,
            name: name.to_string(),
            rx,
            lock: lock.clone(),
            backoff: None,
            wait_logged: None,
        };
        let task = tokio::spawn(worker.run());
        Handle {
            name: name.to_string(),
            tx,
            lock,
            task,
        }
    }

    /// Hands the worker the latest desired state. Sent every round, so that an agent that
    /// stopped by itself is started again at the next round.
    pub fn desire(&self, d: Desired) {
        self.tx.send_replace(Some(d));
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The action lock, for the round's status reads.
    pub fn lock(&self) -> Arc<Mutex<()>> {
        self.lock.clone()
    }

    /// Stops the worker without leaving an agent half-switched: a worker in the middle of
    /// control actions (it holds the action lock: stopping the old version, starting the
    /// new one, rolling back) is given up to `grace` to finish them; a worker that is idle
    /// or downloading is stopped at once (a partial download is resumed at the next start).
    pub async fn shutdown(mut self, grace: Duration) {
        // No more desired states: the worker's loop ends after its current action.
        let (dead_tx, _) = watch::channel(None);
        drop(std::mem::replace(&mut self.tx, dead_tx));
        let idle = self.lock.clone().try_lock_owned();
        match idle {
            // Holding the lock keeps the worker from starting a switch while it is aborted.
            Ok(_guard) => self.task.abort(),
            Err(_) => {
                tracing::info!(agent = %self.name, "waiting for an action in progress before exiting");
                let task = &mut self.task;
                if tokio::time::timeout(grace, task).await.is_err() {
                    tracing::warn!(agent = %self.name, ?grace, "action still running; stopping it");
                }
            }
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // Dropping the task drops any running control script, which kills it (kill_on_drop).
        self.task.abort();
    }
}

/// [`collect`] in its own task, waited for at most `wait`. A script that takes longer keeps
/// running in the background (until the status timeout kills it) with its result kept for
/// the next round; meanwhile the agent is reported with the last status known. `None` when
/// `name` is not an agent or the task failed. Shared by the legacy and BootAgent rounds.
pub async fn collect_within(
    ctx: Arc<Ctx>,
    name: String,
    lock: Arc<Mutex<()>>,
    wait: Duration,
) -> Option<RealAgent> {
    let read = {
        let (ctx, name) = (ctx.clone(), name.clone());
        tokio::spawn(async move { collect(&ctx, &name, &lock).await })
    };
    // On timeout the JoinHandle is dropped, which detaches (not cancels) the read.
    match tokio::time::timeout(wait, read).await {
        Ok(Ok(r)) => r,
        Ok(Err(join)) => {
            tracing::error!(agent = %name, error = %join, "status task failed");
            None
        }
        Err(_) => {
            let v = fsx::read_version_file(&ctx.agent_dir(&name))
                .ok()
                .flatten()
                .filter(|v| proto::validate_version(v).is_ok())?;
            let (status, timestamp) = last_known(
                &ctx,
                &name,
                &v,
                &format!("control status: no answer within {wait:?}"),
            );
            tracing::debug!(agent = %name, version = %v, "status still running; reporting the last known");
            Some(RealAgent {
                name,
                version: v,
                status,
                timestamp,
            })
        }
    }
}

/// Reads one agent's real state for the heartbeat. `None` when `name` is not an agent
/// (no `.version`). If an action holds the agent's lock (a switch in progress), the last
/// status read is reported rather than waiting: a heartbeat is never held up by one agent.
/// A status script that hangs is killed after the status timeout and reported as an error.
pub async fn collect(ctx: &Ctx, name: &str, lock: &Mutex<()>) -> Option<RealAgent> {
    let dir = ctx.agent_dir(name);
    let version = match fsx::read_version_file(&dir) {
        Ok(Some(v)) => v,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(agent = %name, error = %e, "cannot read .version");
            return None;
        }
    };
    if let Err(e) = proto::validate_version(&version) {
        tracing::warn!(agent = %name, error = %e, "ignoring agent with a bad .version");
        return None;
    }
    let (status, timestamp) = match lock.try_lock() {
        Ok(_guard) => {
            let vdir = dir.join(&version);
            let st = if vdir.is_dir() {
                control::status(&vdir, &ctx.envs, &ctx.status).await
            } else {
                AgentStatus::Error(format!("version folder {version} is missing"))
            };
            let now = now_unix();
            let wire = st.wire();
            ctx.shared.agent(name, |v| {
                v.current_version = Some(version.clone());
                v.status = Some(wire.clone());
                v.status_at = Some(now);
            });
            (wire, now)
        }
        Err(_) => last_known(ctx, name, &version, "busy: action in progress"),
    };
    Some(RealAgent {
        name: name.to_string(),
        version,
        status,
        timestamp,
    })
}

/// The last status read for `name` at `version` and when, or `fallback` (timestamped now)
/// when none was read for that version.
pub fn last_known(ctx: &Ctx, name: &str, version: &str, fallback: &str) -> (String, i64) {
    let view = ctx.shared.get_agent(name).unwrap_or_default();
    match (view.current_version, view.status, view.status_at) {
        (Some(v), Some(s), Some(t)) if v == version => (s, t),
        _ => (fallback.to_string(), now_unix()),
    }
}

struct Worker {
    ctx: Arc<Ctx>,
    name: String,
    rx: watch::Receiver<Option<Desired>>,
    lock: Arc<Mutex<()>>,
    backoff: Option<Backoff>,
    /// The back-off deadline last said in the log, so a wait is logged once, not per round.
    wait_logged: Option<i64>,
}

/// Why a switch failed, for the record.
enum SwitchFailure {
    /// Nothing changed on the running side (download, checksum, unpack).
    Install(String),
    /// The new version did not start; the previous one was put back.
    Start(String),
    /// The previous version could not be stopped (its `control stop` failed and something
    /// of it still ran after SIGKILL): it stays current, the new one was not started.
    Stop(String),
}

impl Worker {
    fn dir(&self) -> PathBuf {
        self.ctx.agent_dir(&self.name)
    }

    async fn run(mut self) {
        // Only an agent's folder is cleaned: a desired name may be any folder of the workdir.
        if let Ok(dir) = self.ctx.check_agent(&self.name) {
            clean_startup_leftovers(&dir, &self.name);
        }
        while self.rx.changed().await.is_ok() {
            let desired = self.rx.borrow_and_update().clone();
            if let Some(d) = desired {
                self.converge(&d).await;
            }
        }
    }

    async fn converge(&mut self, d: &Desired) {
        let dir = self.dir();
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
        self.ctx.shared.agent(&self.name, |v| {
            v.desired_version = Some(d.version.clone());
            v.desired_cmd = Some(d.cmd_str().to_string());
        });
        let current = match fsx::read_version_file(&dir) {
            Ok(v) => v.filter(|v| proto::validate_version(v).is_ok()),
            Err(e) => {
                tracing::warn!(agent = %self.name, error = %e, "cannot read .version; treating the agent as not installed");
                None
            }
        };
        let present = current.as_ref().is_some_and(|v| dir.join(v).is_dir());
        match plan(
            d,
            current.as_deref(),
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
                    let secs = (until_unix - crate::state::now_unix()).max(0);
                    tracing::info!(agent = %self.name, version = %d.version, until_unix,
                        "waiting {secs} s before trying this version again: {}", crate::redact(why));
                } else {
                    tracing::debug!(agent = %self.name, version = %d.version, until_unix, "held back by a previous failure");
                }
                // The version we rolled back to must not stay down if it crashes meanwhile.
                if let Some(v) = current {
                    self.ensure_started(&v).await;
                }
            }
            Plan::EnsureStarted { version } => {
                self.ensure_started(&version).await;
                // Also in the steady state, so that a host taken over from the original
                // updater (which kept every version) is trimmed to `keepVersions`.
                self.prune(&version, d);
            }
            Plan::EnsureStopped { version } => self.ensure_stopped(&version).await,
            Plan::Switch { from, to } => {
                self.busy(true);
                let res = self.switch(d, from.as_deref(), &to).await;
                self.busy(false);
                match res {
                    Ok(()) => {
                        self.backoff = None;
                        self.record(
                            format!("upgrade {} -> {to}", from.as_deref().unwrap_or("none")),
                            Outcome::Ok,
                            None,
                        );
                        self.ctx.shared.agent(&self.name, |v| {
                            v.backoff = None;
                            v.current_version = Some(to.clone());
                        });
                        self.prune(&to, d);
                    }
                    Err(SwitchFailure::Install(e)) => {
                        let failures = self.backoff.as_ref().map_or(0, |b| b.failures) + 1;
                        let r = self.ctx.retry;
                        let delay = backoff_delay(failures, r.base, r.max, rand::random());
                        tracing::warn!(agent = %self.name, version = %to, failures, retry_in = ?delay, error = %e, "install failed");
                        self.set_backoff(d, failures, delay, &e);
                        self.record(format!("install {to}"), Outcome::Failed, Some(e));
                    }
                    Err(SwitchFailure::Stop(e)) => {
                        let delay = self.ctx.retry.failed_start;
                        self.set_backoff(d, 1, delay, &e);
                        self.record(
                            format!("upgrade {} -> {to}", from.as_deref().unwrap_or("none")),
                            Outcome::Failed,
                            Some(e),
                        );
                    }
                    Err(SwitchFailure::Start(e)) => {
                        let delay = self.ctx.retry.failed_start;
                        tracing::error!(agent = %self.name, version = %to, retry_in = ?delay, error = %e, "new version did not start; rolled back");
                        self.set_backoff(d, 1, delay, &e);
                        self.record(
                            format!("upgrade {} -> {to}", from.as_deref().unwrap_or("none")),
                            Outcome::RolledBack,
                            Some(e),
                        );
                    }
                }
            }
        }
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
            version: d.version.clone(),
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

    /// Reads the status of `vdir` under the lock the caller holds, and notes it.
    async fn status(&self, vdir: &Path, version: &str) -> AgentStatus {
        let st = control::status(vdir, &self.ctx.envs, &self.ctx.status).await;
        let wire = st.wire();
        let now = now_unix();
        let current = fsx::read_version_file(&self.dir()).ok().flatten();
        if current.as_deref() == Some(version) {
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
    async fn wait_started(&self, vdir: &Path, version: &str) -> AgentStatus {
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
    async fn start_and_check(&self, vdir: &Path, version: &str) -> Result<(), String> {
        control::control(vdir, "start", &self.ctx.envs, &self.ctx.control)
            .await
            .map_err(|e| e.to_string())?;
        match self.wait_started(vdir, version).await {
            AgentStatus::Started => Ok(()),
            st => Err(format!(
                "control start in {} succeeded but status is {:?} after {:?}",
                vdir.display(),
                st.wire(),
                self.ctx.start_timeout
            )),
        }
    }

    async fn ensure_started(&self, version: &str) {
        let vdir = self.dir().join(version);
        let _g = self.lock.lock().await;
        match self.status(&vdir, version).await {
            AgentStatus::Started => {}
            AgentStatus::Stopped => {
                tracing::info!(agent = %self.name, version, "agent is stopped; starting it");
                self.busy(true);
                let res = self.start_and_check(&vdir, version).await;
                self.busy(false);
                match res {
                    Ok(()) => {
                        tracing::info!(agent = %self.name, version, "agent started");
                        self.record(format!("start {version}"), Outcome::Ok, None)
                    }
                    Err(e) => {
                        tracing::warn!(agent = %self.name, version, error = %e, "start failed");
                        self.record(format!("start {version}"), Outcome::Failed, Some(e))
                    }
                }
            }
            // The state is unknown (the script failed or hung): starting blind could run a
            // second copy, so leave it alone and report the error upstream.
            AgentStatus::Error(e) => {
                tracing::debug!(agent = %self.name, version, error = %e, "status unreadable; not acting");
            }
        }
    }

    async fn ensure_stopped(&self, version: &str) {
        let vdir = self.dir().join(version);
        let _g = self.lock.lock().await;
        if self.status(&vdir, version).await == AgentStatus::Stopped {
            return;
        }
        tracing::info!(agent = %self.name, version, "stopping agent");
        self.busy(true);
        let res = control::control(&vdir, "stop", &self.ctx.envs, &self.ctx.control).await;
        let after = self.status(&vdir, version).await;
        self.busy(false);
        match (res, after) {
            (Ok(_), AgentStatus::Stopped) => {
                self.record(format!("stop {version}"), Outcome::Ok, None)
            }
            (Err(e), _) => self.record(
                format!("stop {version}"),
                Outcome::Failed,
                Some(e.to_string()),
            ),
            (Ok(_), st) => self.record(
                format!("stop {version}"),
                Outcome::Failed,
                Some(format!(
                    "control stop succeeded but status is {:?}",
                    st.wire()
                )),
            ),
        }
    }

    /// Installs `to` (outside the lock), then under the lock stops `from`, starts `to`,
    /// waits for it, and writes `.version`; rolls back to `from` if `to` does not start.
    async fn switch(&self, d: &Desired, from: Option<&str>, to: &str) -> Result<(), SwitchFailure> {
        let dir = self.dir();
        std::fs::create_dir_all(&dir)
            .map_err(|e| SwitchFailure::Install(format!("{}: {e}", dir.display())))?;
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
            // An empty md5 URL means the artifact has no `.md5` file (BootAgent jobs carry a
            // SHA-256 instead).
            (!d.md5_url.is_empty()).then_some(d.md5_url.as_str()),
            want,
        )
        .await
        .map_err(|e| SwitchFailure::Install(e.to_string()))?;

        let _g = self.lock.lock().await;
        if let Some(old) = from {
            let odir = dir.join(old);
            tracing::info!(agent = %self.name, version = %old, "stopping previous version");
            if let Err(e) = control::control(&odir, "stop", &self.ctx.envs, &self.ctx.control).await
            {
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
        let started = self.start_and_check(&vdir, to).await;
        let started = match started {
            Ok(()) => fsx::write_version_file(&dir, to)
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
                if let Err(se) =
                    control::control(&vdir, "stop", &self.ctx.envs, &self.ctx.control).await
                {
                    tracing::warn!(agent = %self.name, version = %to, error = %se, "stopping the failed version failed");
                }
                if let Some(old) = from {
                    let odir = dir.join(old);
                    match self.start_and_check(&odir, old).await {
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
    /// all, and removes stale downloads that are not the desired tarball.
    fn prune(&self, current: &str, d: &Desired) {
        let dir = match self.ctx.check_agent(&self.name) {
            Ok(dir) => dir,
            Err(e) => {
                tracing::warn!(agent = %self.name, error = %e, "not pruning");
                return;
            }
        };
        let doomed = versions_to_prune(&dir, current, self.ctx.keep_versions);
        for v in doomed {
            tracing::info!(agent = %self.name, version = %v, "removing old version");
            if let Err(e) = remove_version(&dir, &v) {
                tracing::warn!(agent = %self.name, version = %v, error = %e, "cannot remove old version");
            }
        }
        let downloads = dir.join(artifact::DOWNLOAD_DIR);
        let keep_prefix = proto::legacy::tarball_file(&self.name, &d.version);
        if let Ok(rd) = std::fs::read_dir(&downloads) {
            for e in rd.flatten() {
                let n = e.file_name();
                if !n.to_string_lossy().starts_with(&keep_prefix) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

/// Version folders of `agent_dir` beyond the `keep` most recent, never `current`.
pub fn versions_to_prune(agent_dir: &Path, current: &str, keep: usize) -> Vec<String> {
    let mut others: Vec<(std::time::SystemTime, String)> = Vec::new();
    let Ok(rd) = std::fs::read_dir(agent_dir) else {
        return Vec::new();
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        // Only version folders (real folders with a `control`): a symlink or another
        // folder an operator put there is theirs.
        if name == current || !crate::workdir::is_version_dir(agent_dir, &name) {
            continue;
        }
        let mtime = e
            .metadata()
            .and_then(|m| m.modified())
            .unwrap_or(std::time::UNIX_EPOCH);
        others.push((mtime, name));
    }
    // Newest first; ties broken by name so the result does not depend on readdir order.
    others.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.cmp(&a.1)));
    others
        .into_iter()
        .skip(keep.saturating_sub(1))
        .map(|(_, n)| n)
        .collect()
}

/// Prefix of a folder being removed: it is renamed first, so that a crash half-way leaves a
/// hidden folder (cleaned at start-up) rather than a half-deleted version.
const PRUNE_INFIX: &str = ".prune-";

fn remove_version(agent_dir: &Path, version: &str) -> std::io::Result<()> {
    let from = agent_dir.join(version);
    let to = agent_dir.join(format!(
        ".{version}{PRUNE_INFIX}{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::rename(&from, &to)?;
    fsx::fsync_dir(agent_dir)?;
    std::fs::remove_dir_all(&to)
}

/// Start-up cleaning of one agent folder: torn unpacks (core's `clean_leftovers`) and
/// half-removed old versions (ours).
fn clean_startup_leftovers(agent_dir: &Path, name: &str) {
    if let Err(e) = artifact::clean_leftovers(agent_dir) {
        tracing::warn!(agent = %name, error = %e, "cannot clean leftovers");
    }
    if let Ok(rd) = std::fs::read_dir(agent_dir) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with('.') && n.contains(PRUNE_INFIX) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// One-shot actions on an agent with the worker's own machinery (install, switch with
/// rollback, pruning, start-and-check), for callers that act on orders rather than on a
/// desired state: BootAgent jobs ([`crate::boot`]). Control scripts run under the agent's
/// action lock, as the worker runs them.
pub(crate) struct Oneshot {
    w: Worker,
}

/// Why a one-shot switch failed.
pub(crate) enum OneshotFailure {
    /// Nothing changed on the running side (download, checksum, unpack; or the previous
    /// version could not be stopped and stays current).
    Install(String),
    /// The new version did not start; the previous one was put back.
    Start(String),
}

impl Oneshot {
    pub(crate) fn new(ctx: Arc<Ctx>, name: &str, lock: Arc<Mutex<()>>) -> Oneshot {
        // Never fed: a one-shot worker does not run its loop.
        let (_tx, rx) = watch::channel(None);
        Oneshot {
            w: Worker {
                ctx,
                name: name.to_string(),
                rx,
                lock,
                backoff: None,
                wait_logged: None,
            },
        }
    }

    /// Installs `d.version` and switches to it from `from` (stop, start, check, `.version`),
    /// rolling back on failure; prunes old versions on success.
    pub(crate) async fn switch(
        &self,
        d: &Desired,
        from: Option<&str>,
    ) -> Result<(), OneshotFailure> {
        let to = d.version.clone();
        self.w.busy(true);
        let res = self.w.switch(d, from, &to).await;
        self.w.busy(false);
        let action = format!("upgrade {} -> {to}", from.unwrap_or("none"));
        match res {
            Ok(()) => {
                self.w.record(action, Outcome::Ok, None);
                self.w.ctx.shared.agent(&self.w.name, |v| {
                    v.current_version = Some(to.clone());
                });
                self.w.prune(&to, d);
                Ok(())
            }
            Err(SwitchFailure::Install(e)) => {
                self.w
                    .record(format!("install {to}"), Outcome::Failed, Some(e.clone()));
                Err(OneshotFailure::Install(e))
            }
            Err(SwitchFailure::Start(e)) => {
                self.w.record(action, Outcome::RolledBack, Some(e.clone()));
                Err(OneshotFailure::Start(e))
            }
            // The running side is as it was: the old version is current and nothing new runs.
            Err(SwitchFailure::Stop(e)) => {
                self.w.record(action, Outcome::Failed, Some(e.clone()));
                Err(OneshotFailure::Install(e))
            }
        }
    }

    /// `control status` of `version`; the caller holds the action lock.
    pub(crate) async fn status(&self, version: &str) -> AgentStatus {
        self.w.status(&self.w.dir().join(version), version).await
    }

    /// `control start` of `version`, then wait for `started`; the caller holds the lock.
    pub(crate) async fn start_and_check(&self, version: &str) -> Result<(), String> {
        let res = self
            .w
            .start_and_check(&self.w.dir().join(version), version)
            .await;
        let outcome = if res.is_ok() {
            Outcome::Ok
        } else {
            Outcome::Failed
        };
        self.w
            .record(format!("start {version}"), outcome, res.clone().err());
        res
    }

    pub(crate) fn lock(&self) -> &Arc<Mutex<()>> {
        &self.w.lock
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired(version: &str, cmd: Cmd) -> Desired {
        Desired {
            name: "a".into(),
            version: version.into(),
            cmd,
            tarball_url: format!("http://m/a-{version}.tar.gz"),
            md5_url: format!("http://m/a-{version}.tar.gz.md5"),
            md5: None,
            sha256: None,
        }
    }

    #[test]
    fn plan_table() {
        let now = Instant::now();
        let start2 = desired("2", Cmd::Start);
        let stop2 = desired("2", Cmd::Stop);
        let sw = |from: Option<&str>| Plan::Switch {
            from: from.map(String::from),
            to: "2".into(),
        };
        // (desired, current, folder present, expected)
        let cases = [
            (&start2, None, false, sw(None)),
            (&start2, Some("1"), true, sw(Some("1"))),
            // .version names a folder that is gone: nothing to stop.
            (&start2, Some("1"), false, sw(None)),
            (
                &start2,
                Some("2"),
                true,
                Plan::EnsureStarted {
                    version: "2".into(),
                },
            ),
            (&start2, Some("2"), false, sw(None)),
            (
                &stop2,
                Some("1"),
                true,
                Plan::EnsureStopped {
                    version: "1".into(),
                },
            ),
            (&stop2, None, false, Plan::Nothing),
            (&stop2, Some("1"), false, Plan::Nothing),
        ];
        for (d, cur, present, want) in cases {
            let got = plan(d, cur, present, None, now);
            assert_eq!(got, want, "desired {d:?} current {cur:?} present {present}");
        }
    }

    #[test]
    fn plan_respects_backoff_for_the_same_key_only() {
        let now = Instant::now();
        let d = desired("2", Cmd::Start);
        let b = Backoff {
            key: BackoffKey::of(&d),
            failures: 1,
            until: now + Duration::from_secs(60),
            until_unix: 123,
            reason: "md5 mismatch".into(),
        };
        assert_eq!(
            plan(&d, Some("1"), true, Some(&b), now),
            Plan::Wait {
                until_unix: 123,
                current: Some("1".into())
            }
        );
        assert_eq!(
            plan(&d, None, false, Some(&b), now),
            Plan::Wait {
                until_unix: 123,
                current: None
            }
        );
        // Past the deadline: try again.
        assert!(matches!(
            plan(&d, Some("1"), true, Some(&b), now + Duration::from_secs(61)),
            Plan::Switch { .. }
        ));
        // Another version, URL or checksum: not held back.
        let d3 = desired("3", Cmd::Start);
        assert!(matches!(
            plan(&d3, Some("1"), true, Some(&b), now),
            Plan::Switch { .. }
        ));
        let mut moved = d.clone();
        moved.tarball_url = "http://other/a-2.tar.gz".into();
        assert!(matches!(
            plan(&moved, Some("1"), true, Some(&b), now),
            Plan::Switch { .. }
        ));
        let mut sha = d.clone();
        sha.sha256 = Some("0".repeat(64));
        assert!(matches!(
            plan(&sha, Some("1"), true, Some(&b), now),
            Plan::Switch { .. }
        ));
        // The current version is never held back by a back-off of itself.
        assert_eq!(
            plan(&d, Some("2"), true, Some(&b), now),
            Plan::EnsureStarted {
                version: "2".into()
            }
        );
    }

    #[test]
    fn backoff_doubles_caps_and_jitters() {
        let base = Duration::from_secs(10);
        let max = Duration::from_secs(100);
        assert_eq!(backoff_delay(1, base, max, 0.999_999).as_secs(), 9);
        assert_eq!(backoff_delay(1, base, max, 0.0), Duration::from_secs(5));
        assert_eq!(backoff_delay(2, base, max, 0.0), Duration::from_secs(10));
        assert_eq!(backoff_delay(3, base, max, 0.0), Duration::from_secs(20));
        assert_eq!(backoff_delay(5, base, max, 0.0), Duration::from_secs(50));
        assert_eq!(backoff_delay(50, base, max, 0.0), Duration::from_secs(50));
        assert!(backoff_delay(u32::MAX, base, max, 1.0) <= max);
        for f in 1..40 {
            let d = backoff_delay(f, base, max, 0.5);
            assert!(d <= max && d >= base / 2, "failures {f}: {d:?}");
        }
    }

    #[test]
    fn desired_validation() {
        let ok = DesiredAgent {
            name: "falcon-agent".into(),
            version: "1.0.1".into(),
            tarball: "http://10.0.0.1:2000/falcon".into(),
            md5: String::new(),
            cmd: "start".into(),
            sha256: Some("AB".repeat(32)),
        };
        let d = Desired::from_wire(&ok).unwrap();
        assert_eq!(
            d.tarball_url,
            "http://10.0.0.1:2000/falcon/falcon-agent-1.0.1.tar.gz"
        );
        assert_eq!(d.md5_url, format!("{}.md5", d.tarball_url));
        assert_eq!(d.sha256, Some("ab".repeat(32)));
        let bad = |f: &dyn Fn(&mut DesiredAgent)| {
            let mut d = ok.clone();
            f(&mut d);
            Desired::from_wire(&d).unwrap_err()
        };
        assert!(matches!(
            bad(&|d| d.name = "../etc".into()),
            DesiredError::Name(_)
        ));
        assert!(matches!(
            bad(&|d| d.name = String::new()),
            DesiredError::Name(_)
        ));
        assert!(matches!(
            bad(&|d| d.version = "1/../../x".into()),
            DesiredError::Name(_)
        ));
        assert!(matches!(
            bad(&|d| d.cmd = "restart".into()),
            DesiredError::UnknownCmd { .. }
        ));
        assert!(matches!(
            bad(&|d| d.tarball = "file:///etc".into()),
            DesiredError::BadUrl { .. }
        ));
        assert!(matches!(
            bad(&|d| d.tarball = String::new()),
            DesiredError::BadUrl { .. }
        ));
        assert!(matches!(
            bad(&|d| d.md5 = "ftp://x".into()),
            DesiredError::BadUrl { .. }
        ));
        assert!(matches!(
            bad(&|d| d.sha256 = Some("xyz".into())),
            DesiredError::BadSha256 { .. }
        ));
        let mut empty_sha = ok.clone();
        empty_sha.sha256 = Some(String::new());
        assert_eq!(Desired::from_wire(&empty_sha).unwrap().sha256, None);
    }

    fn ctx(workdir: &Path) -> Ctx {
        Ctx {
            workdir: workdir.to_path_buf(),
            fetcher: Fetcher::new(artifact::Limits::default()).unwrap(),
            control: ControlConfig::default(),
            status: ControlConfig {
                timeout: Duration::from_secs(5),
                grace: Duration::from_secs(1),
            },
            start_timeout: Duration::from_secs(5),
            keep_versions: 3,
            retry: RetryPolicy {
                base: Duration::from_secs(1),
                max: Duration::from_secs(2),
                failed_start: Duration::from_secs(3),
            },
            shared: Shared::default(),
            envs: BTreeMap::new(),
            own: Arc::default(),
        }
    }

    fn write_agent(workdir: &Path, name: &str, version: &str, status_says: &str) {
        use std::os::unix::fs::PermissionsExt;
        let v = workdir.join(name).join(version);
        std::fs::create_dir_all(&v).unwrap();
        let script = format!("#!/bin/sh\n[ \"$1\" = status ] && echo {status_says}\nexit 0\n");
        std::fs::write(v.join("control"), script).unwrap();
        std::fs::set_permissions(v.join("control"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        std::fs::write(workdir.join(name).join(".version"), format!("{version}\n")).unwrap();
    }

    #[tokio::test]
    async fn collect_reads_status_or_reports_the_last_known_when_busy() {
        let t = tempfile::tempdir().unwrap();
        write_agent(t.path(), "a", "1.0", "started");
        let c = ctx(t.path());
        let lock = Mutex::new(());
        let r = collect(&c, "a", &lock).await.unwrap();
        assert_eq!((r.version.as_str(), r.status.as_str()), ("1.0", "started"));
        let first = r.timestamp;

        // The script now says stopped, but an action holds the lock: the last known
        // status is reported, with the time it was read, and the script is not run.
        write_agent(t.path(), "a", "1.0", "stoped");
        let _busy = lock.lock().await;
        let r = collect(&c, "a", &lock).await.unwrap();
        assert_eq!(r.status, "started");
        assert_eq!(r.timestamp, first);
        drop(_busy);
        let r = collect(&c, "a", &lock).await.unwrap();
        assert_eq!(r.status, "stoped");
    }

    #[tokio::test]
    async fn collect_skips_non_agents_and_reports_missing_folders() {
        let t = tempfile::tempdir().unwrap();
        let c = ctx(t.path());
        let lock = Mutex::new(());
        std::fs::create_dir_all(t.path().join("plain")).unwrap();
        assert_eq!(collect(&c, "plain", &lock).await, None);
        std::fs::create_dir_all(t.path().join("bad")).unwrap();
        std::fs::write(t.path().join("bad/.version"), "../../x").unwrap();
        assert_eq!(collect(&c, "bad", &lock).await, None);
        std::fs::create_dir_all(t.path().join("gone")).unwrap();
        std::fs::write(t.path().join("gone/.version"), "2.0").unwrap();
        let r = collect(&c, "gone", &lock).await.unwrap();
        assert_eq!(r.status, "version folder 2.0 is missing");
    }

    #[test]
    fn prune_keeps_current_and_newest() {
        let t = tempfile::tempdir().unwrap();
        let base = std::time::SystemTime::now() - Duration::from_secs(1000);
        for (i, v) in ["1.0", "1.1", "1.2", "1.3", "1.4"].iter().enumerate() {
            let p = t.path().join(v);
            std::fs::create_dir(&p).unwrap();
            std::fs::write(p.join("control"), "").unwrap();
            let f = std::fs::File::open(&p).unwrap();
            f.set_modified(base + Duration::from_secs(i as u64 * 10))
                .unwrap();
        }
        std::fs::create_dir(t.path().join(".download")).unwrap();
        std::fs::write(t.path().join("not-a-dir"), "x").unwrap();
        // A folder with a version's name but no `control` is not a version: kept.
        std::fs::create_dir(t.path().join("0.9")).unwrap();
        // Current is the oldest: it stays, plus the two newest others.
        let mut got = versions_to_prune(t.path(), "1.0", 3);
        got.sort();
        assert_eq!(got, ["1.1", "1.2"]);
        assert_eq!(versions_to_prune(t.path(), "1.4", 5), Vec::<String>::new());
        let mut got = versions_to_prune(t.path(), "1.4", 1);
        got.sort();
        assert_eq!(got, ["1.0", "1.1", "1.2", "1.3"]);
        remove_version(t.path(), "1.0").unwrap();
        assert!(!t.path().join("1.0").exists());
    }
}
