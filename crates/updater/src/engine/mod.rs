//! The agent engine: one actor per agent serves both protocols. The legacy answer (a
//! desired state, sent every round) and BootAgent jobs (orders, each answered once) are
//! both orders to the same actor, which has the one implementation of install, switch,
//! rollback, start, stop, restart, uninstall, settings (`envs`, `limits`) and supervision
//! (the restart policy of [`supervise`]).
//!
//! Agents are independent: each has its own task, so a slow download or a hung script for
//! one agent never delays the heartbeat or the others. Each agent also has an action lock,
//! held around every control script run (`start`, `stop`, `status`): two scripts never run
//! on one agent at once. The download happens outside the lock, so the round keeps reading
//! the agent's real status while a new version is fetched; during a switch the round
//! reports the last status it read instead of waiting (see [`collect`]).
//!
//! Blocking filesystem work (removing folders, fsync, settings and `.version` writes) goes
//! to tokio's blocking pool ([`crate::fsx::blocking`]); `crates/updater/clippy.toml` fences
//! the blocking calls.

mod actor;
pub use actor::clean_uninstall_leftovers;
pub mod settings;
pub mod supervise;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use proto::legacy::{Cmd, DesiredAgent, RealAgent};
use proto::names::{AgentName, Version};
use tokio::sync::{mpsc, oneshot, watch, Mutex};
use tokio::time::Instant;

use crate::artifact::{self, Fetcher};
use crate::control::{self, AgentStatus, ControlConfig};
use crate::daemon::CONTROL_GRACE;
use crate::fsx;
use crate::state::{now_unix, Shared};

/// How often `control status` is polled while waiting for a new version to start.
pub const START_POLL: Duration = Duration::from_millis(200);
/// Orders (jobs) queued for one agent at most; one more is refused as busy.
pub const MAX_QUEUED_ORDERS: usize = 8;

/// `envs` check, shared by both protocols ([`proto::rules`]).
pub fn check_envs(m: &BTreeMap<String, String>) -> Result<(), String> {
    proto::rules::check_envs(m)
}

/// `limits` check (shape and syntax), shared by both protocols.
pub fn check_limits(m: &BTreeMap<String, String>) -> Result<(), String> {
    proto::rules::check_limits_map(m)
}

/// What the server wants for one agent, checked: every name and URL here is safe to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub name: AgentName,
    pub version: Version,
    pub cmd: Cmd,
    pub tarball_url: String,
    pub md5_url: String,
    /// Lowercase hex MD5 the artifact must have, when already known (a BootAgent job
    /// carries it); otherwise it is read from `md5_url`.
    pub md5: Option<String>,
    /// Lowercase hex, when the server sent one.
    pub sha256: Option<String>,
    /// Environment for the agent's control scripts, when the server sent it (our ops-meta
    /// does, in both protocols); `None` keeps what the agent has.
    pub envs: Option<BTreeMap<String, String>>,
    /// Resource limits, when the server sent them; `None` keeps what the agent has.
    pub limits: Option<BTreeMap<String, String>>,
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
    #[error("agent {name:?}: {error}")]
    BadMap { name: String, error: String },
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
        let name = AgentName::parse(&d.name)?;
        let version = Version::parse(&d.version)?;
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
        let bad_map = |error: String| DesiredError::BadMap {
            name: d.name.clone(),
            error,
        };
        if let Some(m) = &d.envs {
            check_envs(m).map_err(bad_map)?;
        }
        if let Some(m) = &d.limits {
            check_limits(m).map_err(bad_map)?;
        }
        // The URLs are built from the checked names only (the original rule, `proto::names`).
        let md5_base = if d.md5.is_empty() { &d.tarball } else { &d.md5 };
        Ok(Desired {
            tarball_url: proto::names::tarball_url(&d.tarball, &name, &version),
            md5_url: proto::names::md5_url(md5_base, &name, &version),
            name,
            version,
            cmd,
            md5: None,
            sha256,
            envs: d.envs.clone(),
            limits: d.limits.clone(),
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
    pub version: Version,
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
    EnsureStarted { version: Version },
    /// Stop the current version if its status does not say stopped.
    EnsureStopped { version: Version },
    /// Install `to` and switch to it from `from` (the installed current version, if any).
    Switch { from: Option<Version>, to: Version },
    /// The desired version failed before; wait, keeping the installed current version
    /// (if any) running meanwhile.
    Wait {
        until_unix: i64,
        current: Option<Version>,
    },
    /// Nothing to do (e.g. `stop` for an agent that is not installed).
    Nothing,
}

/// Decides what to do. `current` is `.version`; `current_present` says whether its folder
/// exists. Pure, so the whole decision table is unit-tested.
pub fn plan(
    desired: &Desired,
    current: Option<&Version>,
    current_present: bool,
    backoff: Option<&Backoff>,
    now: Instant,
) -> Plan {
    let installed_current = current.filter(|_| current_present);
    match desired.cmd {
        Cmd::Stop => match installed_current {
            Some(v) => Plan::EnsureStopped { version: v.clone() },
            None => Plan::Nothing,
        },
        Cmd::Start => {
            if installed_current == Some(&desired.version) {
                return Plan::EnsureStarted {
                    version: desired.version.clone(),
                };
            }
            if let Some(b) = backoff {
                if b.key == BackoffKey::of(desired) && now < b.until {
                    return Plan::Wait {
                        until_unix: b.until_unix,
                        current: installed_current.cloned(),
                    };
                }
            }
            Plan::Switch {
                from: installed_current.cloned(),
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
    /// The restart policy.
    pub policy: supervise::Policy,
    /// The cgroup hierarchies agents get their own cgroup in (or why none can be used).
    pub cgroups: Arc<crate::cgroup::Cgroups>,
    /// Exits of orphaned agent processes, when ops-updater is their subreaper.
    pub reaper: Option<crate::reaper::Reaper>,
    /// The updater's own files: no action removes or renames them or a folder holding one.
    pub own: Arc<crate::workdir::Own>,
    /// The updater's own version (the reserved agent `ops-updater`), once the daemon set it.
    pub selfup: Option<Arc<crate::selfup::SelfUpgrade>>,
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
            crate::heartbeat::Tls::of(c),
        )?
        .with_trust(artifact::Trust::new(
            c.trusted_keys.clone(),
            c.require_signature,
        ));
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
            policy: c.supervise,
            cgroups: Arc::new(crate::cgroup::Cgroups::detect(&c.cgroup_parent)),
            reaper: None,
            own: Arc::new(crate::workdir::Own::new(cfg.own_files.iter().cloned())),
            selfup: None,
        })
    }

    /// `name`'s folder when it is an agent ([`crate::workdir::check_agent`]): the check
    /// before anything under it is removed or renamed.
    pub fn check_agent(&self, name: &AgentName) -> Result<PathBuf, crate::workdir::NotAgent> {
        crate::workdir::check_agent(&self.workdir, &self.own, name.as_str())
    }

    /// `<workdir>/<name>`: an agent's folder is built from its checked name only.
    pub fn agent_dir(&self, name: &AgentName) -> PathBuf {
        proto::names::agent_dir(&self.workdir, name)
    }

    /// `<workdir>/<name>/<version>`.
    pub fn version_dir(&self, name: &AgentName, version: &Version) -> PathBuf {
        proto::names::version_dir(&self.workdir, name, version)
    }
}

/// An order for an agent's actor, other than the legacy desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // A few orders a day; boxing buys nothing.
pub enum Job {
    /// Install (or upgrade to) `desired.version` and run it; run it if it is installed.
    Install(Desired),
    Stop,
    Restart,
    /// Stop and remove the agent's folder.
    Uninstall,
    /// Clear a `fatal` verdict and the failure count; start the agent if it should run.
    Reset,
}

impl Job {
    fn as_str(&self) -> &'static str {
        match self {
            Job::Install(_) => "install",
            Job::Stop => "stop",
            Job::Restart => "restart",
            Job::Uninstall => "uninstall",
            Job::Reset => "reset",
        }
    }
}

/// How an order ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Done {
    Ok(String),
    /// Nothing changed on the running side, or the action failed.
    Failed(String),
    /// The new version did not start; the previous one was put back.
    RolledBack(String),
    /// The order was refused before anything was done.
    Invalid(String),
}

struct Order {
    job: Job,
    /// Settings the job carries (`None`: keep the agent's).
    envs: Option<BTreeMap<String, String>>,
    limits: Option<BTreeMap<String, String>>,
    reply: oneshot::Sender<Done>,
}

/// What the actor and the status readers share for one agent.
#[derive(Debug, Default)]
pub struct Cell {
    pub sup: supervise::State,
    /// The agent's control-script environment (its settings' `envs`).
    pub envs: BTreeMap<String, String>,
    /// The agent's cgroup, once the actor made it.
    pub cg: Option<Arc<crate::cgroup::AgentCgroup>>,
}

/// A running actor for one agent.
#[derive(Debug)]
pub struct Handle {
    name: AgentName,
    desire: watch::Sender<Option<Desired>>,
    orders: mpsc::Sender<Order>,
    lock: Arc<Mutex<()>>,
    cell: Arc<StdMutex<Cell>>,
    task: tokio::task::JoinHandle<()>,
}

impl Handle {
    /// Starts the actor for `name` (a validated agent name). It first removes leftovers of
    /// interrupted work in the agent's folder and loads its settings.
    pub fn spawn(ctx: Arc<Ctx>, name: &AgentName) -> Handle {
        let (desire, desire_rx) = watch::channel(None);
        let (orders, orders_rx) = mpsc::channel(MAX_QUEUED_ORDERS);
        let lock = Arc::new(Mutex::new(()));
        let cell = Arc::new(StdMutex::new(Cell::default()));
        let a = actor::Actor::new(ctx, name, desire_rx, orders_rx, lock.clone(), cell.clone());
        let task = tokio::spawn(a.run());
        Handle {
            name: name.clone(),
            desire,
            orders,
            lock,
            cell,
            task,
        }
    }

    /// Hands the actor the latest desired state (legacy). Sent every round.
    pub fn desire(&self, d: Desired) {
        self.desire.send_replace(Some(d));
    }

    /// Runs one job on the agent and waits for its outcome.
    pub async fn job(
        &self,
        job: Job,
        envs: Option<BTreeMap<String, String>>,
        limits: Option<BTreeMap<String, String>>,
    ) -> Done {
        let what = job.as_str();
        let (reply, rx) = oneshot::channel();
        let order = Order {
            job,
            envs,
            limits,
            reply,
        };
        if self.orders.try_send(order).is_err() {
            return Done::Failed(format!(
                "agent {:?}: {MAX_QUEUED_ORDERS} orders are queued already; {what} not taken",
                self.name
            ));
        }
        rx.await.unwrap_or_else(|_| {
            Done::Failed(format!(
                "agent {:?}: stopped before the {what} finished",
                self.name
            ))
        })
    }

    pub fn name(&self) -> &AgentName {
        &self.name
    }

    /// The action lock, for the round's status reads.
    pub fn lock(&self) -> Arc<Mutex<()>> {
        self.lock.clone()
    }

    /// The state shared with the actor.
    pub fn cell(&self) -> Arc<StdMutex<Cell>> {
        self.cell.clone()
    }

    /// True while the actor holds the action lock (a control action in progress).
    pub fn acting(&self) -> bool {
        self.lock.try_lock().is_err()
    }

    /// Stops the actor without leaving an agent half-switched: an actor in the middle of
    /// control actions (it holds the action lock: stopping the old version, starting the
    /// new one, rolling back) is given up to `grace` to finish them; one that is idle or
    /// downloading is stopped at once (a partial download is resumed at the next start).
    pub async fn shutdown(mut self, grace: Duration) {
        // No more orders: the actor's loop ends after its current action.
        let (dead_tx, _) = watch::channel(None);
        drop(std::mem::replace(&mut self.desire, dead_tx));
        let (dead_orders, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.orders, dead_orders));
        let idle = self.lock.clone().try_lock_owned();
        match idle {
            // Holding the lock keeps the actor from starting a switch while it is aborted.
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

/// The agents of one workdir: one actor each, kept across protocol changes (`auto` falling
/// back to the legacy heartbeat and probing BootAgent again), so supervision state and
/// in-flight work carry over.
#[derive(Debug)]
pub struct Engine {
    ctx: Arc<Ctx>,
    agents: StdMutex<BTreeMap<AgentName, Arc<Handle>>>,
}

impl Engine {
    pub fn new(ctx: Ctx) -> Engine {
        Engine {
            ctx: Arc::new(ctx),
            agents: StdMutex::new(BTreeMap::new()),
        }
    }

    pub fn ctx(&self) -> &Arc<Ctx> {
        &self.ctx
    }

    /// The actor of `name` (a validated agent name), started on first use.
    pub fn agent(&self, name: &AgentName) -> Arc<Handle> {
        let mut m = self.agents.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(name.clone())
            .or_insert_with(|| Arc::new(Handle::spawn(self.ctx.clone(), name)))
            .clone()
    }

    /// True when an actor of `name` holds its action lock.
    pub fn acting(&self, name: &str) -> bool {
        let m = self.agents.lock().unwrap_or_else(|e| e.into_inner());
        m.get(name).is_some_and(|h| h.acting())
    }

    /// Reads the agents' states for a report: each read in its own task, waited for at most
    /// `wait` ([`collect_within`]).
    pub async fn collect(&self, names: &[AgentName], wait: Duration) -> Vec<Collected> {
        let futs = names.iter().map(|n| {
            let h = self.agent(n);
            collect_within(self.ctx.clone(), h, wait)
        });
        futures_util::future::join_all(futs)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Stops every actor ([`Handle::shutdown`]).
    pub async fn shutdown(&self, grace: Duration) {
        let all = std::mem::take(&mut *self.agents.lock().unwrap_or_else(|e| e.into_inner()));
        let handles = all.into_values().filter_map(|h| Arc::try_unwrap(h).ok());
        futures_util::future::join_all(handles.map(|h| h.shutdown(grace))).await;
    }
}

/// One agent as a report carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Collected {
    /// For the legacy heartbeat: the version and what `control status` printed — or
    /// `fatal` / `killed` while the supervisor holds the agent.
    pub real: RealAgent,
    /// BootAgent's state word: `running`, `stoped`, `fatal`, `killed`, or an error text.
    pub state: String,
    /// Seconds running, 0 when not known to run.
    pub uptime: u64,
}

/// The BootAgent state word for a `control status` wire string.
pub fn wire_state(status: &str) -> String {
    match status {
        proto::legacy::STATUS_STARTED => proto::bootagent::STATE_RUNNING.to_string(),
        s if proto::legacy::is_stopped_status(s) => proto::bootagent::STATE_STOPED.to_string(),
        other => other.to_string(),
    }
}

/// [`collect`] in its own task, waited for at most `wait`. A script that takes longer keeps
/// running in the background (until the status timeout kills it) with its result kept for
/// the next round; meanwhile the agent is reported with the last status known. `None` when
/// the agent is not an agent or the task failed. Shared by the legacy and BootAgent rounds.
pub async fn collect_within(ctx: Arc<Ctx>, h: Arc<Handle>, wait: Duration) -> Option<Collected> {
    let name = h.name().clone();
    let read = {
        let (ctx, h) = (ctx.clone(), h.clone());
        tokio::spawn(async move { collect(&ctx, &h).await })
    };
    // On timeout the JoinHandle is dropped, which detaches (not cancels) the read.
    let real = match tokio::time::timeout(wait, read).await {
        Ok(Ok(r)) => r?,
        Ok(Err(join)) => {
            tracing::error!(agent = %name, error = %join, "status task failed");
            return None;
        }
        Err(_) => {
            let v = read_current(&ctx.agent_dir(&name)).ok().flatten()?;
            let (status, timestamp) = last_known(
                &ctx,
                &name,
                &v,
                &format!("control status: no answer within {wait:?}"),
            );
            tracing::debug!(agent = %name, version = %v, "status still running; reporting the last known");
            RealAgent {
                name: name.into(),
                version: v.into(),
                status,
                timestamp,
            }
        }
    };
    Some(held(&h, real))
}

/// The report of `real`, with the supervisor's verdict over it.
fn held(h: &Handle, mut real: RealAgent) -> Collected {
    let cell = h.cell.lock().unwrap_or_else(|e| e.into_inner());
    let now = now_unix();
    if let Some(word) = supervise::held_state(&cell.sup) {
        real.status = word.to_string();
        return Collected {
            real,
            state: word.to_string(),
            uptime: 0,
        };
    }
    let state = wire_state(&real.status);
    let uptime = if state == proto::bootagent::STATE_RUNNING {
        cell.sup.uptime(now)
    } else {
        0
    };
    Collected {
        real,
        state,
        uptime,
    }
}

/// Reads one agent's real state for the heartbeat. `None` when it is not an agent (no
/// `.version`). If an action holds the agent's lock (a switch in progress), the last
/// status read is reported rather than waiting: a heartbeat is never held up by one agent.
/// A status script that hangs is killed after the status timeout and reported as an error.
/// An agent the supervisor holds as `fatal` is not asked.
pub async fn collect(ctx: &Ctx, h: &Handle) -> Option<RealAgent> {
    let name = h.name();
    let version = match read_current(&ctx.agent_dir(name)) {
        Ok(Some(v)) => v,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(agent = %name, error = %e, "not reporting the agent");
            return None;
        }
    };
    let (envs, fatal, cg) = {
        let c = h.cell.lock().unwrap_or_else(|e| e.into_inner());
        (c.envs.clone(), c.sup.is_fatal(), c.cg.clone())
    };
    if fatal {
        return Some(RealAgent {
            name: name.to_string(),
            version: version.into(),
            status: proto::bootagent::STATE_FATAL.to_string(),
            timestamp: now_unix(),
        });
    }
    let (status, timestamp) = match h.lock.try_lock() {
        Ok(_guard) => {
            let vdir = ctx.version_dir(name, &version);
            let st = if vdir.is_dir() {
                control::status(&vdir, &envs, cg.as_deref(), &ctx.status).await
            } else {
                AgentStatus::Error(format!("version folder {version} is missing"))
            };
            let now = now_unix();
            let wire = st.wire();
            ctx.shared.agent(name, |v| {
                v.current_version = Some(version.to_string());
                v.status = Some(wire.clone());
                v.status_at = Some(now);
            });
            // An agent found running is running from now, as far as we can know.
            if st == AgentStatus::Started {
                let mut c = h.cell.lock().unwrap_or_else(|e| e.into_inner());
                if matches!(c.sup.phase, supervise::Phase::Idle) {
                    c.sup.running(Instant::now(), now);
                }
            }
            (wire, now)
        }
        Err(_) => last_known(ctx, name, &version, "busy: action in progress"),
    };
    Some(RealAgent {
        name: name.to_string(),
        version: version.into(),
        status,
        timestamp,
    })
}

/// The agent's current version: its `.version`, checked. `Ok(None)` when there is none
/// (not an agent, or not installed yet); an error when it cannot be read or is no valid
/// version (then the agent is treated as not installed, and said so).
pub fn read_current(agent_dir: &Path) -> Result<Option<Version>, String> {
    match fsx::read_version_file(agent_dir) {
        Ok(None) => Ok(None),
        Ok(Some(v)) => Version::parse(&v)
            .map(Some)
            .map_err(|e| format!("{}/.version: {e}", agent_dir.display())),
        Err(e) => Err(format!("cannot read {}/.version: {e}", agent_dir.display())),
    }
}

/// The last status read for `name` at `version` and when, or `fallback` (timestamped now)
/// when none was read for that version.
pub fn last_known(ctx: &Ctx, name: &AgentName, version: &Version, fallback: &str) -> (String, i64) {
    let view = ctx.shared.get_agent(name.as_str()).unwrap_or_default();
    match (view.current_version, view.status, view.status_at) {
        (Some(v), Some(s), Some(t)) if *version == v => (s, t),
        _ => (fallback.to_string(), now_unix()),
    }
}

/// Version folders of `agent_dir` beyond the `keep` most recent, never `current`.
pub fn versions_to_prune(agent_dir: &Path, current: &Version, keep: usize) -> Vec<Version> {
    let mut others: Vec<(std::time::SystemTime, Version)> = Vec::new();
    let Ok(rd) = std::fs::read_dir(agent_dir) else {
        return Vec::new();
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        // Only version folders (real folders with a `control`): a symlink or another
        // folder an operator put there is theirs.
        // Only folders with a valid version name: anything else is not ours to remove.
        let Ok(version) = Version::parse(&name) else {
            continue;
        };
        if version == *current || !crate::workdir::is_version_dir(agent_dir, &name) {
            continue;
        }
        let mtime = e
            .metadata()
            .and_then(|m| m.modified())
            .unwrap_or(std::time::UNIX_EPOCH);
        others.push((mtime, version));
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

#[allow(clippy::disallowed_methods)] // Blocking: called on the blocking pool.
fn remove_version(agent_dir: &Path, version: &Version) -> std::io::Result<()> {
    let from = agent_dir.join(version.as_str());
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
#[allow(clippy::disallowed_methods)] // Blocking: called on the blocking pool.
fn clean_startup_leftovers(agent_dir: &Path, name: &AgentName) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    fn desired(version: &str, cmd: Cmd) -> Desired {
        Desired {
            name: AgentName::parse("a").unwrap(),
            version: v(version),
            cmd,
            tarball_url: format!("http://m/a-{version}.tar.gz"),
            md5_url: format!("http://m/a-{version}.tar.gz.md5"),
            md5: None,
            sha256: None,
            envs: None,
            limits: None,
        }
    }

    #[test]
    fn plan_table() {
        let now = Instant::now();
        let start2 = desired("2", Cmd::Start);
        let stop2 = desired("2", Cmd::Stop);
        let sw = |from: Option<&str>| Plan::Switch {
            from: from.map(v),
            to: v("2"),
        };
        let (one, two) = (v("1"), v("2"));
        // (desired, current, folder present, expected)
        let cases = [
            (&start2, None, false, sw(None)),
            (&start2, Some(&one), true, sw(Some("1"))),
            // .version names a folder that is gone: nothing to stop.
            (&start2, Some(&one), false, sw(None)),
            (
                &start2,
                Some(&two),
                true,
                Plan::EnsureStarted {
                    version: two.clone(),
                },
            ),
            (&start2, Some(&two), false, sw(None)),
            (
                &stop2,
                Some(&one),
                true,
                Plan::EnsureStopped {
                    version: one.clone(),
                },
            ),
            (&stop2, None, false, Plan::Nothing),
            (&stop2, Some(&one), false, Plan::Nothing),
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
        let (one, two) = (v("1"), v("2"));
        let b = Backoff {
            key: BackoffKey::of(&d),
            failures: 1,
            until: now + Duration::from_secs(60),
            until_unix: 123,
            reason: "md5 mismatch".into(),
        };
        assert_eq!(
            plan(&d, Some(&one), true, Some(&b), now),
            Plan::Wait {
                until_unix: 123,
                current: Some(one.clone())
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
            plan(
                &d,
                Some(&one),
                true,
                Some(&b),
                now + Duration::from_secs(61)
            ),
            Plan::Switch { .. }
        ));
        // Another version, URL or checksum: not held back.
        let d3 = desired("3", Cmd::Start);
        assert!(matches!(
            plan(&d3, Some(&one), true, Some(&b), now),
            Plan::Switch { .. }
        ));
        let mut moved = d.clone();
        moved.tarball_url = "http://other/a-2.tar.gz".into();
        assert!(matches!(
            plan(&moved, Some(&one), true, Some(&b), now),
            Plan::Switch { .. }
        ));
        let mut sha = d.clone();
        sha.sha256 = Some("0".repeat(64));
        assert!(matches!(
            plan(&sha, Some(&one), true, Some(&b), now),
            Plan::Switch { .. }
        ));
        // The current version is never held back by a back-off of itself.
        assert_eq!(
            plan(&d, Some(&two), true, Some(&b), now),
            Plan::EnsureStarted {
                version: two.clone()
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
            envs: None,
            limits: None,
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
            policy: supervise::Policy::default(),
            cgroups: Arc::new(crate::cgroup::Cgroups::none("ops-updater", "unit tests")),
            reaper: None,
            own: Arc::default(),
            selfup: None,
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
        let c = Arc::new(ctx(t.path()));
        let h = Handle::spawn(c.clone(), &AgentName::parse("a").unwrap());
        let r = collect(&c, &h).await.unwrap();
        assert_eq!((r.version.as_str(), r.status.as_str()), ("1.0", "started"));
        let first = r.timestamp;

        // The script now says stopped, but an action holds the lock: the last known
        // status is reported, with the time it was read, and the script is not run.
        write_agent(t.path(), "a", "1.0", "stoped");
        let lock = h.lock();
        let busy = lock.lock().await;
        let r = collect(&c, &h).await.unwrap();
        assert_eq!(r.status, "started");
        assert_eq!(r.timestamp, first);
        drop(busy);
        let r = collect(&c, &h).await.unwrap();
        assert_eq!(r.status, "stoped");
    }

    #[tokio::test]
    async fn collect_skips_non_agents_and_reports_missing_folders() {
        let t = tempfile::tempdir().unwrap();
        let c = Arc::new(ctx(t.path()));
        std::fs::create_dir_all(t.path().join("plain")).unwrap();
        assert_eq!(
            collect(
                &c,
                &Handle::spawn(c.clone(), &AgentName::parse("plain").unwrap())
            )
            .await,
            None
        );
        std::fs::create_dir_all(t.path().join("bad")).unwrap();
        std::fs::write(t.path().join("bad/.version"), "../../x").unwrap();
        assert_eq!(
            collect(
                &c,
                &Handle::spawn(c.clone(), &AgentName::parse("bad").unwrap())
            )
            .await,
            None
        );
        std::fs::create_dir_all(t.path().join("gone")).unwrap();
        std::fs::write(t.path().join("gone/.version"), "2.0").unwrap();
        let r = collect(
            &c,
            &Handle::spawn(c.clone(), &AgentName::parse("gone").unwrap()),
        )
        .await
        .unwrap();
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
        let mut got = versions_to_prune(t.path(), &v("1.0"), 3);
        got.sort();
        assert_eq!(got, [v("1.1"), v("1.2")]);
        assert_eq!(
            versions_to_prune(t.path(), &v("1.4"), 5),
            Vec::<Version>::new()
        );
        let mut got = versions_to_prune(t.path(), &v("1.4"), 1);
        got.sort();
        assert_eq!(got, [v("1.0"), v("1.1"), v("1.2"), v("1.3")]);
        remove_version(t.path(), &v("1.0")).unwrap();
        assert!(!t.path().join("1.0").exists());
    }
}
