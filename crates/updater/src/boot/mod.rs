//! BootAgent mode: register once, then one status report per step; jobs come back in the
//! answers and their results go out in the next report (seed 003, `docs/ops-updater.md`).
//!
//! [`run`] picks the protocol from the config: `legacy` runs the heartbeat daemon
//! ([`crate::daemon`]); `bootagent` runs the loop here; `auto` runs the loop here and falls
//! back to the heartbeat daemon when a server answers 404/405 to the BootAgent endpoints,
//! probing BootAgent again every [`REPROBE`].
//!
//! Jobs run through the agents' actors ([`crate::engine`]), the legacy path's own machinery, in
//! their own tasks: a slow download never holds up the reports.

pub mod client;
pub mod exec;
pub mod jobs;
pub mod metafile;
pub mod servers;

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt as _;
use proto::bootagent::{
    Action, AgentStatus as WireAgent, Job, RegisterRequest, StatusRequest, STATUS_OK,
    STATUS_SERIAL_CONFLICT, STATUS_UNREGISTERED,
};
use proto::events::MAX_EVENTS_PER_REPORT;
use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::{Protocol, Resolved};
use crate::daemon::{self, Daemon, DaemonError, MAX_AGENTS, STATUS_WAIT};
use crate::engine::{Ctx, Engine};
use crate::state::{now_unix, Shared};
use client::{CallError, Client, StatusAnswer};
use jobs::{Book, Seen, ERR_FAILED, ERR_INVALID, ERR_OK};
use metafile::Meta;

/// How long `auto` mode stays on the legacy heartbeat before probing BootAgent again.
pub const REPROBE: Duration = Duration::from_secs(3600);
/// Folder under the workdir for the metafile (by default) and the job record.
pub const STATE_DIR: &str = ".ops-updater";
/// The version string reported upstream.
pub fn version_string() -> String {
    format!("ops-updater-{}", crate::selfup::VERSION)
}

/// Why BootAgent mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error(transparent)]
    Meta(#[from] metafile::MetaError),
    #[error(transparent)]
    Book(#[from] jobs::BookError),
    #[error("bootagent client: {0}")]
    Client(#[from] CallError),
    #[error("download client: {0}")]
    Artifact(#[from] crate::artifact::ArtifactError),
    #[error("no server to talk to: set `server` in the config, pass -S on first start, or build with OPS_UPDATER_SERVERS")]
    NoServer,
}

/// Command-line settings for BootAgent mode.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `-S host:port,host:port`: servers for the first start (persisted in the metafile;
    /// ignored when a metafile exists).
    pub servers: Option<Vec<String>>,
    /// The config file (`-c`), which a new binary of ops-updater must accept before a
    /// self-upgrade.
    pub config: PathBuf,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Asked to stop (SIGTERM, SIGINT).
    Stopped,
    /// Stopped for a self-upgrade: the supervisor runs the new binary next.
    Upgrade,
}

/// Parses the `-S` value: a server list by [`proto::rules::parse_svrlist`]
/// (`host:port,host:port`, each optionally after `http://` or `https://`).
pub fn parse_servers_flag(s: &str) -> Result<Vec<String>, String> {
    proto::rules::parse_svrlist(s).map_err(|e| format!("-S: {e}"))
}

/// Where the metafile is: the `metafile` key (relative to the workdir) or
/// `<workdir>/.ops-updater/meta.json`.
pub fn metafile_path(cfg: &Resolved) -> PathBuf {
    match &cfg.config.metafile {
        Some(p) => cfg.workdir.join(p),
        None => cfg.workdir.join(STATE_DIR).join("meta.json"),
    }
}

/// Where the job record is: `<workdir>/.ops-updater/jobs.json`.
pub fn record_path(cfg: &Resolved) -> PathBuf {
    cfg.workdir.join(STATE_DIR).join("jobs.json")
}

/// What `-T` says about the metafile: a description, or why it is unusable.
pub fn check_metafile(cfg: &Resolved) -> Result<String, String> {
    let path = metafile_path(cfg);
    match metafile::load(&path) {
        Ok(None) => Ok(format!(
            "metafile {} is absent: first start, will register",
            path.display()
        )),
        Ok(Some(m)) => Ok(format!(
            "metafile {} is ok: agentsn {} ({}), {} server(s) from -S, {} pushed, step {}",
            path.display(),
            m.agentsn,
            if m.confirmed {
                "confirmed"
            } else {
                "not confirmed yet"
            },
            m.servers.len(),
            m.pushed.len(),
            if m.step == 0 {
                "from the config".to_string()
            } else {
                format!("{} s", m.step)
            }
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// Runs the updater with the protocol the config names until `shutdown` resolves. One
/// [`Engine`] serves every protocol the run goes through; its actors are stopped on the
/// way out (a control action in progress is given time to finish; agents keep running).
pub async fn run(
    cfg: Resolved,
    shared: Shared,
    opts: Options,
    shutdown: impl Future<Output = ()>,
) -> Result<Ended, BootError> {
    std::fs::create_dir_all(&cfg.workdir).map_err(|source| DaemonError::Workdir {
        path: cfg.workdir.display().to_string(),
        source,
    })?;
    let mut ctx = Ctx::from_config(&cfg, shared.clone())?;
    let selfup = crate::selfup::SelfUpgrade::new(
        &cfg,
        opts.config.clone(),
        ctx.fetcher.clone(),
        shared.clone(),
    );
    ctx.selfup = Some(selfup.clone());
    let stop_for_upgrade = selfup.stopped();
    let shutdown = async move {
        tokio::select! {
            _ = shutdown => {}
            _ = stop_for_upgrade => {}
        }
    };
    // Agents are daemons forked by `control start`: as their subreaper, ops-updater learns
    // how each one ended (exit code, signal).
    match crate::reaper::enable() {
        Ok(()) => ctx.reaper = Some(crate::reaper::Reaper::spawn()),
        Err(e) => {
            tracing::warn!(error = %e, "cannot become the agents' subreaper; exit codes of agents stay unknown")
        }
    }
    match ctx.cgroups.unusable() {
        None => {
            tracing::info!(cgroups = %ctx.cgroups.describe(), "agents run in their own cgroups")
        }
        Some(why) => tracing::warn!("agents run without cgroups: limits not enforced: {why}"),
    }
    let engine = Arc::new(Engine::new(ctx));
    let c = &cfg.config;
    // Enough for one switch and its rollback: stop, start, wait, stop, start, wait.
    let grace = Duration::from_secs(
        (c.control_timeout_secs * 4 + c.start_timeout_secs * 2)
            .min(daemon::SHUTDOWN_GRACE_MAX_SECS),
    );
    let res = run_with(cfg, shared, opts, engine.clone(), shutdown).await;
    tracing::info!("ops-updater stopping");
    engine.shutdown(grace).await;
    res.map(|()| {
        if selfup.stopping() {
            Ended::Upgrade
        } else {
            Ended::Stopped
        }
    })
}

async fn run_with(
    cfg: Resolved,
    shared: Shared,
    opts: Options,
    engine: Arc<Engine>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), BootError> {
    if cfg.config.protocol == Protocol::Legacy {
        if opts.servers.is_some() {
            tracing::warn!(
                "-S is ignored: it only applies to BootAgent mode (protocol bootagent or auto)"
            );
        }
        shared.daemon(|d| d.protocol = "legacy".into());
        Daemon::new(cfg, shared, engine)?.run(shutdown).await;
        return Ok(());
    }
    let shutdown = shutdown.boxed_local().shared();
    let started = Instant::now();
    let mut boot = Boot::new(cfg.clone(), shared.clone(), opts, started, engine.clone())?;
    loop {
        match boot.run(shutdown.clone()).await {
            Exit::Shutdown => return Ok(()),
            Exit::Fallback(server) => {
                let mut legacy = cfg.clone();
                legacy.heartbeat_url = crate::config::heartbeat_url(&server).unwrap_or_default();
                tracing::warn!(server = %server, heartbeat = %legacy.heartbeat_url, reprobe_in = ?REPROBE,
                    "server does not speak BootAgent; using the legacy heartbeat");
                shared.daemon(|d| {
                    d.server = legacy.heartbeat_url.clone();
                    d.protocol = "legacy (fallback)".into();
                });
                let d = Daemon::new(legacy, shared.clone(), engine.clone())?;
                let reprobe = Arc::new(AtomicBool::new(false));
                let flag = reprobe.clone();
                let sd = shutdown.clone();
                d.run(async move {
                    tokio::select! {
                        _ = sd => {}
                        _ = tokio::time::sleep(REPROBE) => flag.store(true, Ordering::SeqCst),
                    }
                })
                .await;
                if !reprobe.load(Ordering::SeqCst) {
                    return Ok(());
                }
                tracing::info!("probing BootAgent again");
            }
        }
    }
}

enum Exit {
    Shutdown,
    /// `auto` mode: this server does not speak BootAgent.
    Fallback(String),
}

/// Why a round did not complete.
enum RoundError {
    /// No server answered; retry with back-off.
    Failed,
    /// `auto`: fall back to the legacy heartbeat with this server.
    Fallback(String),
}

enum Call<'a> {
    Register(&'a RegisterRequest),
    Status(&'a StatusRequest),
}

enum Reply {
    Register(proto::bootagent::RegisterResponse),
    Status(StatusAnswer),
}

/// A job task's end: id and outcome.
type Finished = (String, exec::Outcome);

struct Boot {
    cfg: Resolved,
    shared: Shared,
    meta_path: PathBuf,
    record_path: PathBuf,
    meta: Meta,
    book: Book,
    client: Client,
    backoff: servers::Backoff,
    builtin: Vec<String>,
    engine: Arc<Engine>,
    /// Jobs running now: id → (agent, task).
    running: HashMap<String, (String, tokio::task::JoinHandle<()>)>,
    done_tx: mpsc::UnboundedSender<Finished>,
    done_rx: mpsc::UnboundedReceiver<Finished>,
    /// Registered (or re-registered) during this process's life.
    registered: bool,
    /// The server asked for a new registration.
    needs_register: bool,
    started: Instant,
    /// What the server last said it cannot hand a job for yet; logged when it changes.
    waiting: Vec<proto::bootagent::Waiting>,
    /// Rate limit of the lines about what the server sent.
    log: crate::logcap::Limiter,
}

impl Boot {
    fn new(
        cfg: Resolved,
        shared: Shared,
        opts: Options,
        started: Instant,
        engine: Arc<Engine>,
    ) -> Result<Boot, BootError> {
        let c = &cfg.config;
        std::fs::create_dir_all(&cfg.workdir).map_err(|source| DaemonError::Workdir {
            path: cfg.workdir.display().to_string(),
            source,
        })?;
        let meta_path = metafile_path(&cfg);
        let record_path = record_path(&cfg);
        let meta = match metafile::load(&meta_path) {
            Ok(Some(m)) => {
                if let Some(s) = &opts.servers {
                    tracing::warn!(servers = %s.join(","), metafile = %meta_path.display(),
                        "-S is ignored: the metafile exists (it only counts on first start)");
                }
                m
            }
            Ok(None) => first_start(&cfg, &meta_path, opts.servers.clone().unwrap_or_default())?,
            Err(
                e @ (metafile::MetaError::Corrupt { .. } | metafile::MetaError::TooLarge { .. }),
            ) => {
                tracing::error!(error = %e, "starting afresh: a new serial will be registered");
                match metafile::move_aside(&meta_path) {
                    Ok(to) => {
                        tracing::warn!(moved_to = %to.display(), "corrupt metafile kept for inspection")
                    }
                    Err(me) => {
                        tracing::warn!(error = %me, "cannot move the corrupt metafile aside")
                    }
                }
                first_start(&cfg, &meta_path, opts.servers.clone().unwrap_or_default())?
            }
            Err(e) => return Err(e.into()),
        };
        let book = match jobs::load(&record_path) {
            Ok(b) => b,
            Err(e @ jobs::BookError::Read { .. }) => {
                // Losing the record costs at most one re-run of a job (they are idempotent).
                tracing::error!(error = %e, "starting with an empty job record");
                Book::default()
            }
            Err(e) => return Err(e.into()),
        };
        let builtin = servers::builtin();
        if servers::merge(&c.server, &meta, &builtin).is_empty() {
            return Err(BootError::NoServer);
        }
        let client = Client::new(
            Duration::from_secs(c.heartbeat_timeout_secs),
            c.max_response_bytes,
            crate::heartbeat::Tls::of(c),
        )?;
        crate::engine::clean_uninstall_leftovers(&cfg.workdir);
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Ok(Boot {
            cfg,
            shared,
            meta_path,
            record_path,
            meta,
            book,
            client,
            backoff: servers::Backoff::default(),
            builtin,
            engine,
            running: HashMap::new(),
            done_tx,
            done_rx,
            registered: false,
            needs_register: false,
            started,
            waiting: Vec::new(),
            log: crate::logcap::Limiter::new(),
        })
    }

    fn step(&self) -> Duration {
        Duration::from_secs(if self.meta.step > 0 {
            self.meta.step
        } else {
            self.cfg.config.interval
        })
    }

    fn servers(&self) -> Vec<String> {
        servers::merge(&self.cfg.config.server, &self.meta, &self.builtin)
    }

    /// Saves the metafile on the blocking pool.
    async fn save_meta(&self) -> bool {
        let (path, meta) = (self.meta_path.clone(), self.meta.clone());
        let res = crate::fsx::blocking(move || Ok(metafile::save(&path, &meta)))
            .await
            .unwrap_or_else(|e| {
                Err(metafile::MetaError::Write {
                    path: self.meta_path.clone(),
                    source: e,
                })
            });
        match res {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "cannot save the metafile");
                false
            }
        }
    }

    /// Saves the job record on the blocking pool.
    async fn save_book(&self) {
        let (path, book) = (self.record_path.clone(), self.book.clone());
        match crate::fsx::blocking(move || Ok(jobs::save(&path, &book))).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "cannot save the job record"),
            Err(e) => tracing::error!(error = %e, "cannot save the job record"),
        }
    }

    async fn run(&mut self, shutdown: impl Future<Output = ()>) -> Exit {
        let c = &self.cfg.config;
        let step = self.step();
        let first_cap = match c.first_delay_max_ms {
            Some(ms) => Duration::from_millis(ms).min(step),
            None => step,
        };
        let mut first = first_cap.mul_f64(rand::thread_rng().gen_range(0.0..1.0));
        // Right after a self-upgrade: the round the previous process had scheduled.
        if let Some(due) = crate::selfup::handed_over_round(step) {
            first = due;
        }
        tracing::info!(host = %self.cfg.hostname, agentsn = %self.meta.agentsn,
            servers = %self.servers().join(","), workdir = %self.cfg.workdir.display(),
            metafile = %self.meta_path.display(), first_in = ?first, "ops-updater running (BootAgent)");
        self.shared.daemon(|d| d.protocol = "bootagent".into());
        let mut next = Instant::now() + first;
        let mut failures: u32 = 0;
        tokio::pin!(shutdown);
        let exit = loop {
            tokio::select! {
                _ = &mut shutdown => break Exit::Shutdown,
                Some((id, (code, message))) = self.done_rx.recv() => {
                    self.running.remove(&id);
                    self.book.finish(&id, code, &message, now_unix());
                    self.save_book().await;
                }
                _ = tokio::time::sleep_until(next) => {
                    let r: f64 = rand::thread_rng().gen_range(0.0..1.0);
                    let step = self.step();
                    let wait = match self.round().await {
                        Ok(()) if self.needs_register => Duration::ZERO,
                        Ok(()) => {
                            failures = 0;
                            daemon::next_interval(step, self.cfg.config.jitter_percent, r)
                        }
                        Err(RoundError::Failed) => {
                            failures = failures.saturating_add(1);
                            daemon::heartbeat_backoff(failures, step, r)
                        }
                        Err(RoundError::Fallback(s)) => break Exit::Fallback(s),
                    };
                    next = Instant::now() + wait;
                    if let Some(s) = &self.engine.ctx().selfup {
                        s.next_round_at(next);
                    }
                }
            }
        };
        self.stop_jobs().await;
        exit
    }

    /// Stops job tasks on the way out: one in the middle of control actions (it holds the
    /// agent's action lock) gets time to finish them; one downloading is stopped at once
    /// (it runs again when the server delivers the job again).
    async fn stop_jobs(&mut self) {
        let c = &self.cfg.config;
        let grace = Duration::from_secs(
            (c.control_timeout_secs * 4 + c.start_timeout_secs * 2)
                .min(daemon::SHUTDOWN_GRACE_MAX_SECS),
        );
        for (id, (name, task)) in std::mem::take(&mut self.running) {
            match self.engine.acting(&name) {
                false => task.abort(),
                true => {
                    tracing::info!(job = %id, agent = %name, "waiting for a job's control action before exiting");
                    let mut task = task;
                    if tokio::time::timeout(grace, &mut task).await.is_err() {
                        task.abort();
                    }
                }
            }
        }
        // Results that came in meanwhile are kept for the next report.
        while let Ok((id, (code, message))) = self.done_rx.try_recv() {
            self.book.finish(&id, code, &message, now_unix());
        }
        self.save_book().await;
    }

    /// Sends `call` to the servers in order until one answers.
    async fn call(&mut self, call: Call<'_>) -> Result<Reply, RoundError> {
        let order = self.backoff.order(&self.servers(), Instant::now());
        let auto = self.cfg.config.protocol == Protocol::Auto;
        for server in order {
            let base = match servers::base_url(&server) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(server = %server, error = %e, "skipping a bad server entry");
                    continue;
                }
            };
            let cred = self.meta.credential.as_str();
            let res = match &call {
                Call::Register(r) => self
                    .client
                    .register(&base, r, cred)
                    .await
                    .map(Reply::Register),
                Call::Status(r) => self.client.status(&base, r, cred).await.map(Reply::Status),
            };
            match res {
                Ok(reply) => {
                    self.backoff.succeeded(&server);
                    self.shared.daemon(|d| d.server = base.clone());
                    return Ok(reply);
                }
                Err(CallError::NotSupported { .. }) if auto => {
                    return Err(RoundError::Fallback(server));
                }
                Err(e @ CallError::Refused { .. }) => {
                    // Not a reason to fall back, nor to forget anything: the metafile (serial,
                    // credential) stays as it is, and the round is tried again with back-off.
                    tracing::error!(server = %server, error = %e, metafile = %self.meta_path.display(),
                        "the server refuses this host; keeping the metafile as it is (a host that lost its credential is re-admitted by an operator: POST /api/hosts/<hostname>/readmit)");
                    self.backoff.failed(&server, self.step(), Instant::now());
                    self.shared
                        .daemon(|d| d.last_heartbeat_error = Some(e.to_string()));
                }
                Err(e) => {
                    tracing::warn!(server = %server, error = %e, "server failed; trying the next");
                    self.backoff.failed(&server, self.step(), Instant::now());
                    self.shared
                        .daemon(|d| d.last_heartbeat_error = Some(e.to_string()));
                }
            }
        }
        self.shared.daemon(|d| d.heartbeats_failed += 1);
        self.shared
            .metrics()
            .round(crate::metrics::Protocol::BootAgent, false);
        Err(RoundError::Failed)
    }

    async fn register(&mut self) -> Result<(), RoundError> {
        let req = RegisterRequest {
            hostname: self.cfg.hostname.clone(),
            agentsn: self.meta.agentsn.clone(),
            enrollment_secret: self.cfg.config.enrollment_secret.expose().to_string(),
        };
        let Reply::Register(resp) = self.call(Call::Register(&req)).await? else {
            return Err(RoundError::Failed);
        };
        if resp.status != STATUS_OK {
            tracing::warn!(status = resp.status, message = %resp.message, "registration refused");
            return Err(RoundError::Failed);
        }
        self.shared
            .daemon(|d| d.agentsn = Some(self.meta.agentsn.clone()));
        if !resp.agentsn.is_empty() && resp.agentsn != self.meta.agentsn {
            if let Err(e) = proto::bootagent::validate_agentsn(&resp.agentsn) {
                tracing::warn!(error = %e, "server answered the registration with an unusable serial");
                return Err(RoundError::Failed);
            }
            tracing::info!(old = %self.meta.agentsn, new = %resp.agentsn, "server gave this host another serial; adopting it");
            self.meta.agentsn = resp.agentsn.clone();
            self.meta.confirmed = false;
        }
        if !resp.credential.is_empty() {
            if let Err(e) = proto::bootagent::check_credential(&resp.credential) {
                tracing::warn!(error = %e, "server answered the registration with an unusable credential");
                return Err(RoundError::Failed);
            }
            if !self.meta.credential.is_empty() {
                tracing::info!("server gave this host a new credential; replacing the old one");
            }
            self.meta.credential = resp.credential.clone();
        } else if self.meta.credential.is_empty() {
            // A server from before credentials: requests go out without one.
            tracing::debug!("server gave no credential");
        }
        self.meta.tags = resp.tags.chars().take(1024).collect();
        self.meta.hostname = self.cfg.hostname.clone();
        if !self.save_meta().await {
            // The credential stays in memory: the next registration carries it, and is
            // admitted, and the metafile is tried again.
            return Err(RoundError::Failed);
        }
        tracing::info!(agentsn = %self.meta.agentsn, tags = %self.meta.tags, "registered");
        self.registered = true;
        self.needs_register = false;
        Ok(())
    }

    /// One round: register when needed, report, take the answer's jobs.
    async fn round(&mut self) -> Result<(), RoundError> {
        crate::tls::warn_insecure(self.cfg.config.tls_insecure);
        let registering = self.needs_register || (!self.meta.confirmed && !self.registered);
        if registering {
            self.register().await?;
        }
        let agents = self.collect().await;
        let results = self.book.report();
        let events = self.shared.events().unsent(MAX_EVENTS_PER_REPORT);
        let events_upto = events.last().map(|e| e.seq);
        let req = StatusRequest {
            hostname: self.cfg.hostname.clone(),
            agentsn: self.meta.agentsn.clone(),
            version: version_string(),
            uptime: self.started.elapsed().as_secs(),
            timestamp: now_unix(),
            step: self.step().as_secs(),
            agents,
            jobs: results.clone(),
            // Our engine restarts agents by its policy ([`crate::engine::supervise`]).
            supervised: true,
            events,
        };
        if self.cfg.config.debug {
            tracing::debug!(request = %serde_json::to_string(&req).unwrap_or_default(), "status report");
        }
        let Reply::Status(answer) = self.call(Call::Status(&req)).await? else {
            return Err(RoundError::Failed);
        };
        let resp = &answer.response;
        match resp.status {
            STATUS_UNREGISTERED | STATUS_SERIAL_CONFLICT => {
                tracing::info!(status = resp.status, message = %resp.message, agentsn = %self.meta.agentsn,
                    "server does not accept this serial; registering again");
                self.needs_register = true;
                // Refused right after registering: wait (with back-off) rather than loop.
                return if registering {
                    Err(RoundError::Failed)
                } else {
                    Ok(())
                };
            }
            STATUS_OK => {}
            other => {
                // Seed 003: other values are ignored for now; the answer is used as is.
                tracing::warn!(status = other, message = %resp.message, "status answer with an unknown status");
            }
        }
        let sn = self.meta.agentsn.clone();
        self.shared.daemon(|d| d.agentsn = Some(sn));
        if !self.meta.confirmed {
            self.meta.confirmed = true;
            tracing::info!(agentsn = %self.meta.agentsn, "serial confirmed by a status answer");
            self.save_meta().await;
        }
        if self.book.acknowledge(&results) {
            self.save_book().await;
        }
        // The server took the report: its events are not sent again.
        if let Some(seq) = events_upto {
            self.shared.events().acked(seq).await;
        }
        self.shared
            .metrics()
            .round(crate::metrics::Protocol::BootAgent, true);
        self.shared.daemon(|d| {
            d.heartbeats_ok += 1;
            d.last_heartbeat_at = Some(now_unix());
            d.last_heartbeat_error = None;
            d.server_error = None;
        });
        if let Some(s) = &self.engine.ctx().selfup {
            s.round_ok();
        }
        self.take_jobs(answer).await;
        Ok(())
    }

    /// Agents under the workdir ([`crate::workdir::agent_names`]), each with its status read
    /// under its action lock; an agent busy with a job, or whose script is slow, is
    /// reported with the last status known.
    async fn collect(&mut self) -> Vec<WireAgent> {
        let mut names = crate::workdir::agent_names(
            &self.cfg.workdir,
            &self.engine.ctx().own,
            &self.cfg.config.desired_agent,
        );
        names.truncate(MAX_AGENTS);
        let wait = STATUS_WAIT.min(self.runner_status_timeout());
        let mut agents: Vec<WireAgent> = self
            .engine
            .collect(&names, wait)
            .await
            .into_iter()
            .map(|c| WireAgent {
                name: c.real.name,
                version: c.real.version,
                status: c.state,
                uptime: c.uptime,
            })
            .collect();
        if self.engine.ctx().selfup.is_some() {
            agents.push(WireAgent {
                name: proto::names::SELF_AGENT.to_string(),
                version: crate::selfup::VERSION.to_string(),
                status: proto::bootagent::STATE_RUNNING.to_string(),
                uptime: self.started.elapsed().as_secs(),
            });
        }
        agents
    }

    /// Logs what the server says it cannot hand this host a job for yet, once per change
    /// (a server says it every report), and when it stops waiting.
    fn note_waiting(&mut self, now: &[proto::bootagent::Waiting]) {
        if self.waiting == now {
            return;
        }
        for w in now.iter().filter(|w| !self.waiting.contains(w)) {
            tracing::info!(agent = %w.name, version = %w.version, "the server has no job for this agent yet: {}", w.reason);
        }
        for w in self
            .waiting
            .iter()
            .filter(|w| !now.iter().any(|n| n.name == w.name))
        {
            tracing::info!(agent = %w.name, "the server no longer waits on this agent");
        }
        self.waiting = now.to_vec();
    }

    fn runner_status_timeout(&self) -> Duration {
        Duration::from_secs(self.cfg.config.status_timeout_secs)
    }

    /// Takes the jobs of a status answer: results of finished ones are re-queued, running
    /// ones are left alone, new or interrupted ones are checked and started.
    async fn take_jobs(&mut self, answer: StatusAnswer) {
        self.note_waiting(&answer.response.waiting);
        let mut changed = false;
        for bad in answer.bad_jobs {
            let id = bad.id.as_deref().unwrap_or_default();
            self.log.warn(
                "unusable job",
                id,
                &format!("unusable job {id:?}: {}", bad.error),
            );
            if let Some(id) = bad.id.filter(|i| !i.is_empty()) {
                if self.book.seen(&id) != Seen::Finished && !self.running.contains_key(&id) {
                    self.book.finish(&id, ERR_INVALID, &bad.error, now_unix());
                    changed = true;
                }
            }
        }
        for job in answer.response.jobs {
            if self.running.contains_key(&job.id) {
                continue;
            }
            match self.book.seen(&job.id) {
                Seen::Finished => {
                    changed = true;
                    continue;
                }
                Seen::Started => {
                    tracing::info!(job = %job.id, action = job.action.as_str(), agent = %job.name, "running a job again: it was interrupted");
                }
                Seen::New => {}
            }
            let checked = match exec::check(&job, &self.cfg.config.desired_agent) {
                Ok(c) => c,
                Err(e) => {
                    self.log.warn(
                        "refused job",
                        &job.name,
                        &format!("refusing job {:?} ({}): {e}", job.id, job.action.as_str()),
                    );
                    self.book.finish(&job.id, ERR_INVALID, &e, now_unix());
                    changed = true;
                    continue;
                }
            };
            if job.action == Action::Config {
                let (code, message) = self.apply_config(&job).await;
                self.book.finish(&job.id, code, &message, now_unix());
                changed = true;
                continue;
            }
            // One job per agent at a time; the server sends this one again.
            if self.running.values().any(|(n, _)| *n == job.name) {
                continue;
            }
            tracing::info!(job = %job.id, action = job.action.as_str(), agent = %job.name, version = %job.version, "job started");
            self.book
                .start(&job.id, job.action.as_str(), &job.name, now_unix());
            // Recorded before it runs: a crash from here on runs it again on redelivery.
            self.save_book().await;
            let engine = self.engine.clone();
            let tx = self.done_tx.clone();
            let id = job.id.clone();
            let name = job.name.clone();
            let task = tokio::spawn(async move {
                let out = if checked
                    .agent
                    .as_ref()
                    .is_some_and(|a| a == proto::names::SELF_AGENT)
                {
                    match exec::run_self(&engine, &job, checked).await {
                        Some(out) => out,
                        // Stopping for the upgrade: the job's result comes from the worker
                        // that runs next (the server delivers the job again).
                        None => return,
                    }
                } else {
                    exec::run(&engine, &job, checked).await
                };
                let _ = tx.send((job.id.clone(), out));
            });
            self.running.insert(id, (name, task));
        }
        if changed {
            self.save_book().await;
        }
        self.log.finish_round();
    }

    async fn apply_config(&mut self, job: &Job) -> exec::Outcome {
        let before = self.meta.clone();
        // `exec::check` parsed the list already; only a blank one (a job that sets the
        // step alone) leaves the pushed servers as they are.
        if let Ok(list) = proto::rules::parse_svrlist(&job.svrlist) {
            self.meta.pushed = list;
        }
        if let Some(step) = job.step {
            self.meta.step = step;
        }
        if !self.save_meta().await {
            self.meta = before;
            return (
                ERR_FAILED,
                format!("cannot save the metafile {}", self.meta_path.display()),
            );
        }
        tracing::info!(pushed = %self.meta.pushed.join(","), step = self.meta.step, "settings changed by the server");
        (
            ERR_OK,
            format!(
                "servers {}; step {} s",
                self.servers().join(","),
                self.step().as_secs()
            ),
        )
    }
}

/// Blocking: runs once at start, before the first round.
#[allow(clippy::disallowed_methods)]
fn first_start(cfg: &Resolved, path: &Path, servers: Vec<String>) -> Result<Meta, BootError> {
    let m = Meta::first_start(&cfg.hostname, servers);
    metafile::save(path, &m)?;
    tracing::info!(agentsn = %m.agentsn, metafile = %path.display(), "first start: new serial");
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn protocol_and_metafile_keys() {
        let c = Config::parse(r#"{"server":"h:1"}"#).unwrap().config;
        assert_eq!(c.protocol, Protocol::Auto);
        for (text, want) in [
            ("legacy", Protocol::Legacy),
            ("bootagent", Protocol::Bootagent),
            ("auto", Protocol::Auto),
        ] {
            let c = Config::parse(&format!(r#"{{"server":"h:1","protocol":"{text}"}}"#)).unwrap();
            assert_eq!(c.config.protocol, want);
            assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        }
        let e = Config::parse(r#"{"server":"h:1","protocol":"grpc"}"#).unwrap_err();
        assert!(
            e.to_string()
                .contains("protocol: must be legacy, bootagent or auto"),
            "{e}"
        );
        // Only BootAgent mode may do without `server` (-S, metafile or built-in list).
        assert!(Config::parse(r#"{"protocol":"bootagent"}"#).is_ok());
        assert!(Config::parse(r#"{"protocol":"auto"}"#).is_err());
        let c = Config::parse(r#"{"server":"h:1","metafile":"m.json","workdir":"/w"}"#).unwrap();
        let r = c.config.resolve().unwrap();
        assert_eq!(metafile_path(&r), Path::new("/w/m.json"));
        assert_eq!(record_path(&r), Path::new("/w/.ops-updater/jobs.json"));
    }

    #[test]
    fn dash_s_values() {
        assert_eq!(parse_servers_flag("a:1, b:2,").unwrap(), ["a:1", "b:2"]);
        assert!(parse_servers_flag("").is_err());
        assert!(parse_servers_flag("a").unwrap_err().contains("-S"));
        assert_eq!(parse_servers_flag("a:1,a:1").unwrap(), ["a:1"]);
        assert_eq!(
            parse_servers_flag("https://m:443").unwrap(),
            ["https://m:443"]
        );
        let seventeen: Vec<String> = (1..=17).map(|i| format!("h{i}:1")).collect();
        assert!(parse_servers_flag(&seventeen.join(","))
            .unwrap_err()
            .contains("the limit is 16"));
    }
}
