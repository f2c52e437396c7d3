//! The server side of the BootAgent protocol: registration by serial, tags from config
//! rules, jobs derived from the desired state (the same config the legacy heartbeat
//! answers from) and jobs queued by operators, and the views the operator API shows.
//!
//! HTTP handlers see [`Boot`] only; hosts live in [`registry`], one host's jobs in
//! [`jobs`]. Everything is bounded per host; hosts not seen for `staleHostSecs` are
//! forgotten like legacy hosts.
//!
//! Memory is the cache every view reads; the durable store is written before an answer
//! goes out: every change of a host runs inside [`Durable::update_boot`] (the store's
//! transaction on that host, which in a shared store first hands over the database's row),
//! so a serial, a queued job or a taken result is kept before the host or the operator
//! hears of it.

pub mod jobs;
pub mod registry;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use proto::bootagent::{self, Action, Job, StatusRequest, Waiting};
use proto::legacy::Cmd;
use proto::ops::{self as wire, BatchJob, BatchStatus, HostView, JobsResponse, QueuedJob};
use proto::{AgentName, Hostname, Serial};

use crate::config::TagRule;
use crate::desired::Desired;
use crate::persist::behind::{self, Lag, WriteBehind, Writer};
use crate::persist::{BatchRow, BootRow, Durable, StoreError};
use jobs::{JobState, Origin, Skip, Want};
pub use registry::{
    hash_secret, Admitted, CredHash, Denied, Refusal, Registration, Registry, Unsaved,
};
use serde::{Deserialize, Serialize};

/// Longest tag list of one rule, in bytes.
pub const MAX_TAGS_LEN: usize = 256;
/// Operator batches remembered for `GET /api/jobs/<id>`, the oldest forgotten first.
pub const MAX_BATCHES: usize = 1024;
/// Most job results one status report may carry.
pub const MAX_RESULTS_PER_REPORT: usize = 256;
/// (agent, version, reason) keys whose warnings are rate-limited; past this many, new
/// keys log at debug only.
const MAX_WARNED: usize = 4096;
/// The same warning about one agent version is logged at most once in this long; the
/// next line says how many reports it stood for meanwhile.
const WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

/// Checks a tag list: comma-separated `key=value`, both sides of `[A-Za-z0-9._-]`.
pub fn check_tags(s: &str) -> Result<(), String> {
    if s.len() > MAX_TAGS_LEN {
        return Err(format!("is longer than {MAX_TAGS_LEN} bytes"));
    }
    let ok = |p: &str| {
        !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    };
    for item in s.split(',') {
        match item.split_once('=') {
            Some((k, v)) if ok(k) && ok(v) => {}
            _ => {
                return Err(format!(
                    "{:?} is not key=value (letters, digits, '.', '_', '-'), comma-separated",
                    item.chars().take(64).collect::<String>()
                ))
            }
        }
    }
    Ok(())
}

/// The tags of `hostname`: the tags of every rule whose prefix starts it, in rule order,
/// joined with `,`. An empty prefix matches every host.
pub fn tags_for(rules: &[TagRule], hostname: &str) -> String {
    rules
        .iter()
        .filter(|r| hostname.starts_with(&r.prefix))
        .map(|r| r.tags.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// True when every `key=value` of `wanted` is one of `tags`.
pub fn has_tags(tags: &str, wanted: &str) -> bool {
    let have: Vec<&str> = tags.split(',').map(str::trim).collect();
    wanted
        .split(',')
        .map(str::trim)
        .filter(|w| !w.is_empty())
        .all(|w| have.contains(&w))
}

/// What the desired state wants on `hostname`, per agent, computed by the same code that
/// answers legacy heartbeats (defaults, prefix overrides, `sha256`), with the digests
/// ops-meta learned: the SHA-256 when known (and the `.md5` beside it), else the MD5 of
/// the `.md5` file unless the config sets `requireSha256`.
pub fn wants_for(desired: &Desired, hostname: &str) -> Vec<Want> {
    let require = desired.config.require_sha256;
    desired
        .for_host(hostname)
        .into_iter()
        .zip(desired.agent_names())
        .zip(desired.extras_for(hostname))
        .map(|((d, name), (envs, limits))| {
            let url = d.tarball_url();
            let known = desired.known(&url);
            let md5 = known.and_then(|k| k.md5.as_deref());
            let checksum = match (&d.sha256, md5) {
                (Some(sha), _) => Some(bootagent::format_checksum(sha)),
                (None, Some(md5)) if !require => Some(bootagent::format_md5_checksum(md5)),
                _ => None,
            };
            // The reason is written only when it is needed: most reports carry a checksum.
            let no_checksum = if checksum.is_some() {
                String::new()
            } else {
                let file = d.tarball_file();
                let detail = known
                    .and_then(|k| k.problem.as_deref())
                    .map(|p| format!(": {p}"))
                    .unwrap_or_default();
                match (md5, require) {
                    (Some(_), true) => format!(
                        "waiting: no SHA-256 for {file} yet, and requireSha256 refuses the MD5{detail}"
                    ),
                    (None, _) if !require => format!(
                        "waiting: no checksum for {file} yet (neither a SHA-256 nor its .md5){detail}"
                    ),
                    _ => format!("waiting: no checksum for {file} yet{detail}"),
                }
            };
            let md5 = d.sha256.as_ref().and(md5).map(str::to_string);
            Want {
                url,
                md5,
                checksum,
                no_checksum,
                cmd: Cmd::parse(&d.cmd),
                name: name.clone(),
                version: d.version,
                envs,
                limits,
            }
        })
        .collect()
}

/// An operator job before it is given an id and a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorJob {
    pub action: Action,
    /// The agent (all actions but `config`, which has none).
    pub name: Option<AgentName>,
    pub svrlist: String,
    pub step: Option<u64>,
}

/// How an operator selects hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Hosts(Vec<Hostname>),
    Prefix(String),
    Tag(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Batch {
    action: Action,
    name: String,
    created: i64,
    jobs: Vec<QueuedJob>,
}

#[derive(Debug, Default)]
struct Batches {
    order: VecDeque<Arc<str>>,
    by_id: HashMap<Arc<str>, Batch>,
}

/// The BootAgent side of the server.
pub struct Boot {
    pub registry: Arc<Registry>,
    durable: Arc<dyn Durable>,
    /// Last-seen times of hosts whose reports changed nothing else, written behind.
    seen: WriteBehind,
    /// Its writer, taken by the server that runs it ([`Boot::take_seen_writer`]).
    seen_writer: Mutex<Option<Writer>>,
    /// Status reports answered from memory alone, and through the store's transaction.
    pub reports_in_memory: AtomicU64,
    pub reports_in_store: AtomicU64,
    batches: Mutex<Batches>,
    warned: Mutex<HashMap<String, Warned>>,
}

/// What one status report did to its host: the jobs to send, what waits, why derivation
/// left agents alone, and how many results it applied; or why it was refused.
type Taken = Result<(Vec<Job>, Vec<Waiting>, Vec<Skip>, usize), Refusal>;

impl std::fmt::Debug for Boot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Boot")
            .field("hosts", &self.registry.len())
            .field("store", &self.durable.kind())
            .finish()
    }
}

impl Default for Boot {
    fn default() -> Self {
        Boot::new()
    }
}

/// What a status report answers: the jobs to run and what waits, or why it was refused.
pub type StatusAnswer = Result<(Vec<Job>, Vec<Waiting>), Refusal>;

/// When a rate-limited warning was last logged, and how many were held back since.
#[derive(Debug, Clone, Copy)]
struct Warned {
    at: std::time::Instant,
    held: u64,
}

impl Boot {
    /// BootAgent state kept in memory only.
    pub fn new() -> Boot {
        Boot::with_store(Arc::new(crate::persist::memory::Memory::default()))
    }

    /// BootAgent state written to `durable`.
    pub fn with_store(durable: Arc<dyn Durable>) -> Boot {
        let (seen, seen_writer) = if durable.kind() == "memory" {
            (WriteBehind::disabled(), None)
        } else {
            let (q, w) = behind::queue();
            (q, Some(w))
        };
        Boot {
            registry: Arc::new(Registry::new()),
            durable,
            seen,
            seen_writer: Mutex::new(seen_writer),
            reports_in_memory: AtomicU64::new(0),
            reports_in_store: AtomicU64::new(0),
            batches: Mutex::new(Batches::default()),
            warned: Mutex::new(HashMap::new()),
        }
    }

    /// The writer of the last-seen queue, for the server to run (once).
    pub fn take_seen_writer(&self) -> Option<Writer> {
        self.seen_writer.lock().take()
    }

    /// How far the last-seen queue lags.
    pub fn seen_lag(&self) -> &Lag {
        &self.seen.lag
    }

    /// Fills memory from the store's rows at start; returns how many hosts were taken.
    pub fn load(&self, hosts: &[BootRow], batches: &[BatchRow]) -> usize {
        let mut n = 0;
        for row in hosts {
            match self.registry.install(row) {
                Ok(()) => n += 1,
                Err(e) => {
                    tracing::error!(host = %row.hostname, error = %e, "a stored BootAgent host cannot be read; skipped")
                }
            }
        }
        for row in batches {
            match serde_json::from_str::<Batch>(&row.body) {
                Ok(b) => self.remember_batch(row.id.as_str().into(), b),
                Err(e) => {
                    tracing::error!(batch = %row.id, error = %e, "a stored batch cannot be read; skipped")
                }
            }
        }
        n
    }

    /// Installs rows another replica wrote, where memory holds another (older) revision.
    pub fn refresh(&self, rows: &[BootRow]) {
        for row in rows {
            let current = self.registry.read(&row.hostname, |rec| rec.rev);
            if current.is_none_or(|rev| rev < row.rev) {
                if let Err(e) = self.registry.install(row) {
                    tracing::error!(host = %row.hostname, error = %e, "a stored BootAgent host cannot be read; skipped");
                }
            }
        }
    }

    /// In a shared store, reads these hosts' rows again (views that must show what
    /// another replica took a moment ago).
    async fn refresh_hosts(&self, hosts: Vec<String>) -> Result<(), StoreError> {
        if self.durable.shared() && !hosts.is_empty() {
            let rows = self.durable.boot_hosts(&hosts).await?;
            self.refresh(&rows);
        }
        Ok(())
    }

    /// Runs `f` on the registry inside the store's transaction on `hostname`, and writes
    /// the host's row when `f` changed anything worth keeping.
    async fn on_host<R: Send + 'static>(
        &self,
        hostname: &str,
        f: impl FnOnce(&Registry) -> R + Send + 'static,
    ) -> Result<R, StoreError> {
        let reg = self.registry.clone();
        let host = hostname.to_string();
        let slot = Arc::new(Mutex::new(None));
        let out = slot.clone();
        // A store that keeps nothing is spared the encoding.
        let keeps = self.durable.kind() != "memory";
        self.durable
            .update_boot(
                hostname,
                Box::new(move |db| {
                    reg.sync(&host, db);
                    *out.lock() = Some(f(&reg));
                    keeps.then(|| reg.save(&host)).flatten()
                }),
            )
            .await?;
        let r = slot.lock().take();
        Ok(r.expect("update_boot runs its update before it returns Ok"))
    }

    fn remember_batch(&self, id: Arc<str>, batch: Batch) {
        let mut b = self.batches.lock();
        if let Some(known) = b.by_id.get_mut(&id) {
            *known = batch;
            return;
        }
        if b.order.len() >= MAX_BATCHES {
            if let Some(old) = b.order.pop_front() {
                b.by_id.remove(&old);
            }
        }
        b.order.push_back(id.clone());
        b.by_id.insert(id, batch);
    }

    /// Registers a host with the serial it sent (`None`: it has none) and the credential
    /// it carried (SHA-256); `may_enroll` says whether it may be given a credential (no
    /// enrollment secret is configured, or it carried one). Returns the serial it must
    /// use, its tags and, when it was given one, its new credential; or why it was refused.
    pub async fn register(
        &self,
        desired: &Desired,
        hostname: &Hostname,
        serial: Option<&Serial>,
        credential: Option<CredHash>,
        may_enroll: bool,
        now: i64,
    ) -> Result<Result<Registered, Denied>, StoreError> {
        let fresh = new_credential();
        let auth = registry::Presented {
            credential,
            may_enroll,
            fresh: hash_secret(&fresh),
        };
        let (h, s) = (hostname.clone(), serial.cloned());
        let admitted = self
            .on_host(hostname.as_str(), move |reg| {
                reg.register(&h, s.as_ref(), &auth, now)
            })
            .await?;
        let Admitted {
            serial,
            how,
            issued,
        } = match admitted {
            Ok(a) => a,
            Err(d) => {
                tracing::warn!(host = %hostname, refusal = ?d, "bootagent registration refused");
                return Ok(Err(d));
            }
        };
        let tags = tags_for(&desired.config.tag_rules, hostname.as_str());
        tracing::info!(host = %hostname, agentsn = %serial, how = ?how, tags = %tags, credential_issued = issued, "bootagent registered");
        Ok(Ok(Registered {
            serial,
            tags,
            how,
            credential: issued.then_some(fresh),
        }))
    }

    /// Forgets the credentials of `hostname` so that its next registration is admitted
    /// and given a new one (an operator re-admits a host that lost its metafile). Returns
    /// its serial and whether it held a credential; `None` when it is not registered.
    pub async fn readmit(&self, hostname: &str) -> Result<Option<(Serial, bool)>, StoreError> {
        let host = hostname.to_string();
        let r = self
            .on_host(hostname, move |reg| reg.readmit(&host))
            .await?;
        if let Some((serial, had)) = &r {
            tracing::info!(host = %hostname, agentsn = %serial, had_credential = had, "bootagent host re-admitted: its next registration gets a new credential");
        }
        Ok(r)
    }

    /// Takes a status report: records it, applies job results, derives jobs, and returns
    /// every job the host must (still) run.
    pub async fn status(
        &self,
        desired: &Desired,
        req: &StatusRequest,
        credential: Option<CredHash>,
        now: i64,
    ) -> Result<StatusAnswer, StoreError> {
        let wants = wants_for(desired, &req.hostname);
        let owned = StatusRequest {
            events: Vec::new(),
            ..req.clone()
        };
        let run: Arc<dyn Fn(&Registry) -> Taken + Send + Sync> = Arc::new(move |reg| {
            let req = &owned;
            reg.with_host(&req.hostname, &req.agentsn, credential.as_ref(), |rec| {
                rec.last_seen = now;
                rec.report = Some(registry::Report {
                    version: jobs::clean_text(&req.version, 128),
                    uptime: req.uptime,
                    step: req.step,
                    timestamp: req.timestamp,
                    agents: req
                        .agents
                        .iter()
                        .map(|a| bootagent::AgentStatus {
                            status: jobs::clean_text(&a.status, crate::store::MAX_STATUS_LEN),
                            ..a.clone()
                        })
                        .collect(),
                });
                let applied = rec.jobs.apply_results(&req.jobs, now);
                rec.jobs.supervised = req.supervised;
                let skips = rec.jobs.derive(&wants, &req.agents, now);
                (
                    rec.jobs.to_send(),
                    rec.jobs.waiting().to_vec(),
                    skips,
                    applied,
                )
            })
        });
        let taken = match self
            .status_in_memory(&req.hostname, !req.jobs.is_empty(), &run)
            .await?
        {
            Some(t) => t,
            None => {
                self.reports_in_store.fetch_add(1, Ordering::Relaxed);
                self.on_host(&req.hostname, move |reg| run(reg)).await?
            }
        };
        let (jobs, waiting, skips, applied) = match taken {
            Ok(t) => t,
            Err(r) => return Ok(Err(r)),
        };
        if applied > 0 {
            tracing::debug!(host = %req.hostname, applied, "job results applied");
        }
        for s in skips {
            self.log_skip(&req.hostname, s);
        }
        Ok(Ok((jobs, waiting)))
    }

    /// A status report on memory alone, answered from there when that is safe; `None` when
    /// it must run (again) inside the store's transaction on the host.
    ///
    /// The steady state of a host — a report that carries no job results, changes nothing
    /// worth a new revision and gets no job — never reaches the store but for its last-seen
    /// time, written behind in steps. Everything else goes through the store before the
    /// answer: in a shared store `run` is run again on the database's row under its lock
    /// (so a job is handed out once across replicas); otherwise memory is the truth and its
    /// row is written. In a shared store, memory may lag the database by one follow
    /// interval: a job another replica queued a moment ago then goes out at a later
    /// report, never twice.
    async fn status_in_memory(
        &self,
        hostname: &str,
        has_results: bool,
        run: &Arc<dyn Fn(&Registry) -> Taken + Send + Sync>,
    ) -> Result<Option<Taken>, StoreError> {
        if self.durable.kind() == "memory" {
            self.reports_in_memory.fetch_add(1, Ordering::Relaxed);
            return Ok(Some(run(&self.registry)));
        }
        let shared = self.durable.shared();
        if shared && has_results {
            return Ok(None);
        }
        let taken = run(&self.registry);
        let sends = match &taken {
            // The database may know a host this replica does not (yet).
            Err(_) if shared => return Ok(None),
            Err(_) => return Ok(Some(taken)),
            Ok((jobs, ..)) => !jobs.is_empty(),
        };
        let unsaved = self.registry.settle(hostname);
        match unsaved {
            Some(Unsaved::Nothing) if !sends => {
                self.reports_in_memory.fetch_add(1, Ordering::Relaxed);
                return Ok(Some(taken));
            }
            Some(Unsaved::Seen) if !sends => {
                self.reports_in_memory.fetch_add(1, Ordering::Relaxed);
                self.seen.push(hostname).await;
                return Ok(Some(taken));
            }
            _ if shared => return Ok(None),
            _ => {}
        }
        // Memory is the truth: write its row (or wait for the commit of the write that
        // took it) before the answer.
        self.reports_in_store.fetch_add(1, Ordering::Relaxed);
        self.on_host(hostname, |_| ()).await?;
        Ok(Some(taken))
    }

    /// True when the warning `key` is due: the first time, then once per [`WARN_EVERY`];
    /// returns how many were held back since the last one.
    fn warn_due(&self, key: String) -> Option<u64> {
        let now = std::time::Instant::now();
        let mut w = self.warned.lock();
        if let Some(e) = w.get_mut(&key) {
            if now.duration_since(e.at) < WARN_EVERY {
                e.held += 1;
                return None;
            }
            let held = e.held;
            *e = Warned { at: now, held: 0 };
            return Some(held);
        }
        if w.len() >= MAX_WARNED {
            return None;
        }
        w.insert(key, Warned { at: now, held: 0 });
        Some(0)
    }

    fn log_skip(&self, host: &str, s: Skip) {
        match s {
            Skip::NoChecksum { name, version, why } => {
                let key = format!("{name}\0{version}\0{why}");
                match self.warn_due(key) {
                    Some(held) => {
                        tracing::warn!(agent = %name, version = %version, host = %host, held,
                        "no install/upgrade job yet: {why} (the same for {held} more reports since the last such line)")
                    }
                    None => {
                        tracing::debug!(agent = %name, version = %version, host = %host, "no job: {why}")
                    }
                }
            }
            Skip::QueueFull { name } => match self.warn_due(format!("{name}\0queue")) {
                Some(held) => tracing::warn!(agent = %name, host = %host, held,
                    "no job derived: the host's job queue is full (and {held} more like it since the last such line)"),
                None => tracing::debug!(agent = %name, host = %host, "no job: queue full"),
            },
        }
    }

    /// Registered hostnames a selector picks (sorted), and the hostnames of a host list
    /// that are not registered.
    pub async fn select(
        &self,
        desired: &Desired,
        sel: &Selector,
    ) -> Result<(Vec<Hostname>, Vec<Hostname>), StoreError> {
        if let Selector::Hosts(hosts) = sel {
            // Hosts another replica registered a moment ago are known here too.
            self.refresh_hosts(hosts.iter().map(|h| h.to_string()).collect())
                .await?;
        }
        Ok(match sel {
            Selector::Hosts(hosts) => {
                let mut found = Vec::new();
                let mut missing = Vec::new();
                for h in hosts {
                    if self.registry.read(h.as_str(), |_| ()).is_some() {
                        if !found.contains(h) {
                            found.push(h.clone());
                        }
                    } else {
                        missing.push(h.clone());
                    }
                }
                (found, missing)
            }
            Selector::Prefix(p) => (
                self.registry.hostnames(|h| h.starts_with(p.as_str())),
                vec![],
            ),
            Selector::Tag(t) => {
                let rules = &desired.config.tag_rules;
                (
                    self.registry
                        .hostnames(|h| has_tags(&tags_for(rules, h), t)),
                    vec![],
                )
            }
        })
    }

    /// Queues `job` on every host of `hosts` and remembers the batch.
    pub async fn queue(
        &self,
        desired: &Desired,
        job: &OperatorJob,
        hosts: &[Hostname],
        now: i64,
    ) -> Result<JobsResponse, StoreError> {
        let batch: Arc<str> = jobs::new_id().into();
        let name = job.name.as_ref().map_or("", AgentName::as_str);
        let mut out = JobsResponse {
            id: batch.to_string(),
            ..JobsResponse::default()
        };
        for h in hosts {
            // Stopping or removing an agent the config wants started holds derivation off
            // it; otherwise the next report would start it again.
            let hold = matches!(job.action, Action::Stop | Action::Uninstall)
                .then(|| {
                    wants_for(desired, h.as_str())
                        .into_iter()
                        .find(|w| w.name == name)
                        .map(|w| w.fingerprint())
                })
                .flatten();
            let j = Job {
                id: jobs::new_id(),
                action: job.action,
                name: name.to_string(),
                version: String::new(),
                url: String::new(),
                checksum: String::new(),
                md5: String::new(),
                envs: Default::default(),
                limits: Default::default(),
                svrlist: job.svrlist.clone(),
                step: job.step,
            };
            let id = j.id.clone();
            let (host, action, agent, batch_id, name_owned) = (
                h.clone(),
                job.action,
                job.name.clone(),
                batch.clone(),
                name.to_string(),
            );
            let r = self
                .on_host(h.as_str(), move |reg| {
                    reg.with_hostname(host.as_str(), |rec| {
                        // Only an agent the host reported can be uninstalled: a mistyped
                        // name (`cfg.json`) must not reach a host, which would take it for
                        // an agent.
                        if action == Action::Uninstall && !reported(rec, &name_owned) {
                            return Err(
                                "the host has not reported this agent; nothing to uninstall",
                            );
                        }
                        rec.jobs
                            .push_operator(j, agent, batch_id, now, hold)
                            .map(|()| rec.serial.to_string())
                    })
                })
                .await;
            // A store that fails for one host skips that host: the batch stays whole
            // for the others, and the operator sees which hosts to queue again.
            let r = match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(host = %h, batch = %batch, error = %e, "operator job not queued: store error");
                    Some(Err("the fleet store is unavailable; not queued"))
                }
            };
            match r {
                Some(Ok(agentsn)) => out.jobs.push(QueuedJob {
                    host: h.to_string(),
                    agentsn,
                    id,
                }),
                Some(Err(reason)) => out.skipped.push(wire::SkippedHost {
                    host: h.to_string(),
                    reason: reason.into(),
                }),
                None => out.skipped.push(wire::SkippedHost {
                    host: h.to_string(),
                    reason: "not registered".into(),
                }),
            }
        }
        tracing::info!(batch = %batch, action = job.action.as_str(), agent = %name, queued = out.jobs.len(), skipped = out.skipped.len(), "operator jobs queued");
        let b = Batch {
            action: job.action,
            name: name.to_string(),
            created: now,
            jobs: out.jobs.clone(),
        };
        self.durable
            .put_batch(BatchRow {
                id: batch.to_string(),
                created: now,
                body: serde_json::to_string(&b).expect("a batch serializes"),
            })
            .await?;
        self.remember_batch(batch, b);
        Ok(out)
    }

    /// Where every job of a batch stands. A batch queued through another replica is read
    /// from the store, and in a shared store its hosts are read again, so that results
    /// another replica took show at once.
    pub async fn batch(&self, id: &str) -> Result<Option<BatchStatus>, StoreError> {
        let known = self.batches.lock().by_id.get(id).cloned();
        let found = match known {
            Some(b) => Some(b),
            None => match self.durable.batch(id).await? {
                Some(row) => match serde_json::from_str::<Batch>(&row.body) {
                    Ok(b) => {
                        self.remember_batch(row.id.as_str().into(), b.clone());
                        Some(b)
                    }
                    Err(e) => {
                        tracing::error!(batch = %id, error = %e, "a stored batch cannot be read");
                        None
                    }
                },
                None => None,
            },
        };
        let Some(batch) = found else {
            return Ok(None);
        };
        self.refresh_hosts(batch.jobs.iter().map(|q| q.host.clone()).collect())
            .await?;
        let (action, name, created, queued) = (batch.action, batch.name, batch.created, batch.jobs);
        let jobs = queued
            .into_iter()
            .map(|q| {
                let mut bj = BatchJob {
                    host: q.host.clone(),
                    agentsn: q.agentsn.clone(),
                    id: q.id.clone(),
                    state: wire::JOB_LOST.into(),
                    ..BatchJob::default()
                };
                self.registry
                    .read(&q.host, |rec| match rec.jobs.state_of(&q.id) {
                        JobState::Pending => bj.state = wire::JOB_PENDING.into(),
                        JobState::Finished(o) => {
                            bj.state = if o.errcode == 0 {
                                wire::JOB_DONE
                            } else {
                                wire::JOB_FAILED
                            }
                            .into();
                            bj.errcode = Some(o.errcode);
                            bj.message = o.message.clone();
                            bj.finished = Some(o.finished);
                        }
                        JobState::Unknown => {}
                    });
                bj
            })
            .collect();
        Ok(Some(BatchStatus {
            id: id.to_string(),
            action: action.as_str().into(),
            name,
            created,
            jobs,
        }))
    }

    /// [`Boot::host_view`], after reading the host again from a shared store.
    pub async fn host_view_fresh(
        &self,
        desired: &Desired,
        hostname: &str,
    ) -> Result<Option<HostView>, StoreError> {
        self.refresh_hosts(vec![hostname.to_string()]).await?;
        Ok(self.host_view(desired, hostname))
    }

    /// The operator's view of one host.
    pub fn host_view(&self, desired: &Desired, hostname: &str) -> Option<HostView> {
        let tags = tags_for(&desired.config.tag_rules, hostname);
        self.registry.read(hostname, |rec| {
            let report = rec.report.clone().unwrap_or_default();
            HostView {
                hostname: hostname.to_string(),
                agentsn: rec.serial.to_string(),
                tags,
                protocol: "bootagent".into(),
                registered: rec.registered,
                last_seen: if rec.report.is_some() {
                    rec.last_seen
                } else {
                    0
                },
                uptime: report.uptime,
                step: report.step,
                version: report.version,
                agents: report.agents,
                pending: rec
                    .jobs
                    .pending()
                    .iter()
                    .map(|p| wire::PendingJob {
                        id: p.job.id.clone(),
                        action: p.job.action.as_str().into(),
                        name: p.job.name.clone(),
                        version: p.job.version.clone(),
                        origin: match p.origin {
                            Origin::Derived { .. } => "derived",
                            Origin::Operator { .. } => "operator",
                        }
                        .into(),
                        created: p.created,
                        sent: p.sent,
                    })
                    .collect(),
                results: rec
                    .jobs
                    .results()
                    .map(|o| wire::JobOutcome {
                        id: o.id.clone(),
                        action: o.action.as_str().into(),
                        name: o.name.clone(),
                        version: o.version.clone(),
                        errcode: o.errcode,
                        message: o.message.clone(),
                        finished: o.finished,
                    })
                    .collect(),
                blocked: rec
                    .jobs
                    .blocked()
                    .into_iter()
                    .map(|(name, why)| wire::BlockedAgent {
                        name,
                        reason: why.into(),
                    })
                    .collect(),
                waiting: rec.jobs.waiting().to_vec(),
                ..HostView::default()
            }
        })
    }

    /// Forgets failures and holds on `hosts` (of agent `name`, or all); returns how many.
    pub async fn retry(&self, hosts: &[Hostname], name: Option<&str>) -> Result<usize, StoreError> {
        let mut n = 0;
        for h in hosts {
            let (host, name) = (h.clone(), name.map(str::to_string));
            n += self
                .on_host(h.as_str(), move |reg| {
                    reg.with_hostname(host.as_str(), |rec| rec.jobs.clear_memos(name.as_deref()))
                })
                .await?
                .unwrap_or(0);
        }
        Ok(n)
    }

    /// Forgets hosts last seen before `older_than`; returns how many.
    pub fn sweep(&self, older_than: i64) -> usize {
        self.registry.sweep(older_than)
    }
}

/// A registration taken ([`Boot::register`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub serial: Serial,
    pub tags: String,
    pub how: Registration,
    /// The host's new credential, when it was given one (sent once, kept only hashed).
    pub credential: Option<String>,
}

/// A fresh host credential: [`bootagent::CREDENTIAL_BYTES`] bytes from the operating
/// system's generator, in lowercase hex.
pub fn new_credential() -> String {
    use rand::RngCore;
    let mut b = [0u8; bootagent::CREDENTIAL_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

/// True when the host's last report lists agent `name`.
fn reported(rec: &registry::HostRec, name: &str) -> bool {
    rec.report
        .as_ref()
        .is_some_and(|r| r.agents.iter().any(|a| a.name == name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Vec<TagRule> {
        vec![
            TagRule {
                prefix: "web".into(),
                tags: "svc=web,cmpt=FE".into(),
            },
            TagRule {
                prefix: "web-bj".into(),
                tags: "dc=bj".into(),
            },
            TagRule {
                prefix: "".into(),
                tags: "fleet=all".into(),
            },
        ]
    }

    #[test]
    fn tags_join_every_matching_rule_in_order() {
        let r = rules();
        assert_eq!(tags_for(&r, "web-bj-1"), "svc=web,cmpt=FE,dc=bj,fleet=all");
        assert_eq!(tags_for(&r, "db-1"), "fleet=all");
        assert_eq!(tags_for(&r[..2], "db-1"), "");
        assert!(has_tags("svc=web,cmpt=FE,dc=bj", "svc=web"));
        assert!(has_tags("svc=web,cmpt=FE,dc=bj", "dc=bj,svc=web"));
        assert!(!has_tags("svc=web,cmpt=FE", "svc=we"));
        assert!(!has_tags("", "svc=web"));
    }

    #[test]
    fn checks() {
        for (s, ok) in [
            ("svc=web", true),
            ("svc=web,cmpt=FE", true),
            ("svc", false),
            ("svc=", false),
            ("svc=web,", false),
            ("a=b c", false),
            ("a=b\n", false),
        ] {
            assert_eq!(check_tags(s).is_ok(), ok, "{s:?}");
        }
        assert!(check_tags(&format!("a={}", "b".repeat(300))).is_err());
    }
}
