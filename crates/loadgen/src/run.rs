//! The three ways to drive a server: closed loop (each connection sends as soon as the
//! previous answer arrived), open loop (a fixed aggregate schedule, latency counted from
//! the intended send time) and converge (every host heartbeats on its own phase and acts on
//! the answers, to time a rollout).

use std::collections::HashMap;
use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::client::{Conn, Failure, Target};
use crate::error::{ConfigError, RunError};
use crate::failure::{FailMode, FailSpec, Held, HostFailure};
use crate::fleet::{self, Fleet, MAX_CONVERGE_HOSTS};
use crate::stats::{Convergence, Live, Recorder, Report};
use crate::wire::{self, Protocol, Template};

/// Most concurrent connections one run opens.
pub const MAX_CONNECTIONS: usize = 10_000;
/// Pause after a failed connect, so that a dead server is probed, not spun on.
const CONNECT_BACKOFF: Duration = Duration::from_millis(10);
/// Tokio's timers fire on millisecond ticks, rounding a deadline up. Open-loop workers wake
/// this much before a request is due so that the timer's rounding is not counted as server
/// latency; a request sent early counts from when it was actually sent.
const TIMER_SLACK: Duration = Duration::from_millis(1);
/// Versions one converge worker tells apart; more would mean the server invents versions.
const MAX_VERSIONS: usize = u16::MAX as usize - 1;

/// What every mode shares.
#[derive(Debug, Clone)]
pub struct Settings {
    pub target: Target,
    pub protocol: Protocol,
    pub fleet: Fleet,
    /// Concurrent workers, one persistent connection each.
    pub connections: usize,
    /// Deadline of one request, connect included.
    pub timeout: Duration,
    /// Print a progress line on stderr once a second.
    pub progress: bool,
    /// BootAgent: the hosts start registered (an earlier run registered them with their
    /// fleet serials). They hold no credential then: an ops-meta that issues credentials
    /// refuses their reports (401), so this fits only a server from before credentials.
    pub registered: bool,
}

/// How to drive the server.
#[derive(Debug, Clone)]
pub enum Mode {
    /// As fast as the server answers, until `duration` passed or `requests` were sent
    /// (whichever comes first). Hosts are visited in order, so `requests = hosts` reports
    /// every host exactly once.
    Closed {
        duration: Option<Duration>,
        requests: Option<u64>,
    },
    /// `rate` requests per second in aggregate, for `duration`.
    Open {
        rate: f64,
        duration: Duration,
    },
    Converge(ConvergeSpec),
}

/// A rollout to time.
#[derive(Debug, Clone)]
pub struct ConvergeSpec {
    /// Each host reports once per interval, the first time after a random delay in
    /// `[0, interval)`.
    pub interval: Duration,
    /// A host counts as converged once every one of its agents runs this version.
    pub expect_version: String,
    /// When set, the load generator makes the change itself this long after the start:
    /// it installs `new_config` over `meta_config` (when both are given) and asks the server
    /// to reload. The clock starts just before the reload request. When not set, the clock
    /// starts at the first answer that names `expect_version`.
    pub reload_after: Option<Duration>,
    pub new_config: Option<PathBuf>,
    pub meta_config: Option<PathBuf>,
    /// Give up after this long, reporting how far the fleet got.
    pub max_duration: Duration,
    /// Keep heartbeating this long after the last host converged, so that every host has
    /// reported its new version (and BootAgent job results) to the server.
    pub settle: Duration,
    /// Seed of the heartbeat phases.
    pub seed: u64,
    /// A share of the hosts fails a version ([`crate::failure`]); such hosts never
    /// converge, and the run counts them apart.
    pub failure: Option<FailSpec>,
    /// Run until `max_duration` even when every host converged or failed: the hosts keep
    /// following what the server hands out (a rollback to the old version, say).
    pub keep_going: bool,
}

/// What every worker can see.
struct Ctx {
    settings: Settings,
    template: Template,
    live: Arc<Live>,
    stop: watch::Receiver<bool>,
    /// BootAgent loops: one bit per host, set once the host registered (a server refuses
    /// status reports from unknown serials). One bit per host keeps a billion hosts at
    /// 125 MB; the legacy protocol needs none.
    registered: Vec<AtomicU64>,
    /// BootAgent loops: the credential the server gave each host at registration, sent
    /// with its reports (about 100 bytes per registered host; a server that gives none
    /// leaves it empty).
    credentials: std::sync::RwLock<HashMap<u64, Box<str>>>,
}

impl Ctx {
    fn is_registered(&self, host: u64) -> bool {
        self.registered[(host / 64) as usize].load(Ordering::Relaxed) & (1 << (host % 64)) != 0
    }

    fn set_registered(&self, host: u64, yes: bool) {
        let word = &self.registered[(host / 64) as usize];
        if yes {
            word.fetch_or(1 << (host % 64), Ordering::Relaxed);
        } else {
            word.fetch_and(!(1 << (host % 64)), Ordering::Relaxed);
        }
    }
}

struct WorkerResult {
    rec: Recorder,
    connects: u64,
    /// Converge only: when each of this worker's hosts converged, in nanoseconds from the
    /// start of the run.
    converged_at: Vec<u64>,
    /// Converge only: hosts that failed the version to the end (never started, `fatal`).
    failed: u64,
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Runs `mode` to its end and reports.
pub async fn run(settings: Settings, mode: Mode) -> Result<Report, RunError> {
    if settings.connections == 0 || settings.connections > MAX_CONNECTIONS {
        return Err(ConfigError::Invalid(format!(
            "connections must be between 1 and {MAX_CONNECTIONS}, got {}",
            settings.connections
        ))
        .into());
    }
    match &mode {
        Mode::Open { rate, .. } if !(*rate > 0.0 && rate.is_finite()) => {
            return Err(ConfigError::Invalid(format!("rate must be positive, got {rate}")).into())
        }
        Mode::Converge(c) if settings.fleet.hosts > MAX_CONVERGE_HOSTS => {
            let _ = c;
            return Err(ConfigError::Invalid(format!(
                "converge mode holds state per host: at most {MAX_CONVERGE_HOSTS} hosts"
            ))
            .into());
        }
        Mode::Converge(c) => {
            proto::validate_version(&c.expect_version)
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
            if c.interval.is_zero() {
                return Err(ConfigError::Invalid("interval must be positive".into()).into());
            }
            if c.new_config.is_some() != c.meta_config.is_some() {
                return Err(ConfigError::Invalid(
                    "--new-config and --meta-config go together".into(),
                )
                .into());
            }
            if c.new_config.is_some() && c.reload_after.is_none() {
                return Err(
                    ConfigError::Invalid("--new-config needs --reload-after".into()).into(),
                );
            }
            if let Some(f) = &c.failure {
                if !(0.0..=1.0).contains(&f.share) {
                    return Err(ConfigError::Invalid(format!(
                        "--fail-share must be between 0 and 1, got {}",
                        f.share
                    ))
                    .into());
                }
                proto::validate_version(&f.version)
                    .map_err(|e| ConfigError::Invalid(format!("--fail-version: {e}")))?;
            }
        }
        _ => {}
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let live = Arc::new(Live::default());
    let loops_register =
        settings.protocol == Protocol::BootAgent && !matches!(mode, Mode::Converge(_));
    let ctx = Arc::new(Ctx {
        template: Template::report(settings.protocol, &settings.fleet),
        registered: if loops_register {
            (0..settings.fleet.hosts.div_ceil(64))
                .map(|_| AtomicU64::new(if settings.registered { u64::MAX } else { 0 }))
                .collect()
        } else {
            Vec::new()
        },
        credentials: Default::default(),
        settings,
        live: live.clone(),
        stop: stop_rx,
    });
    // Every connection is open before the clock starts; one that fails here is retried
    // (and counted) by its worker.
    let mut conns = warm_up(&ctx.settings).await;
    let start = Instant::now();
    let progress = ctx.settings.progress.then(|| {
        tokio::spawn(progress_line(
            live.clone(),
            start,
            ctx.settings.fleet.hosts,
            matches!(mode, Mode::Converge(_)),
        ))
    });

    let c = ctx.settings.connections;
    let mut workers = Vec::with_capacity(c);
    let mut target_rate = None;
    let mut changed_at: Option<Arc<AtomicU64>> = None;
    let mut reload = None;
    let mut limit_timer = None;
    match &mode {
        Mode::Closed { duration, requests } => {
            let claim = Arc::new(AtomicU64::new(0));
            let end = match (duration, requests) {
                (None, None) => Some(start + Duration::from_secs(10)),
                (d, _) => d.map(|d| start + d),
            };
            let limit = requests.unwrap_or(u64::MAX);
            for _ in 0..c {
                workers.push(tokio::spawn(closed_worker(
                    ctx.clone(),
                    conns.pop().expect("one connection per worker"),
                    claim.clone(),
                    limit,
                    end,
                )));
            }
        }
        Mode::Open { rate, duration } => {
            target_rate = Some(*rate);
            for w in 0..c {
                workers.push(tokio::spawn(open_worker(
                    ctx.clone(),
                    conns.pop().expect("one connection per worker"),
                    w,
                    *rate,
                    start,
                    start + *duration,
                )));
            }
        }
        Mode::Converge(spec) => {
            let changed = Arc::new(AtomicU64::new(0));
            changed_at = Some(changed.clone());
            let remaining = Arc::new(AtomicU64::new(ctx.settings.fleet.hosts));
            let plans = converge_plans(&ctx.settings.fleet, spec, c);
            let stop_tx = Arc::new(stop_tx.clone());
            for plan in plans {
                workers.push(tokio::spawn(converge_worker(
                    ctx.clone(),
                    conns.pop().expect("one connection per worker"),
                    plan,
                    spec.clone(),
                    start,
                    changed.clone(),
                    remaining.clone(),
                    stop_tx.clone(),
                )));
            }
            if let Some(after) = spec.reload_after {
                reload = Some(tokio::spawn(reload_config(
                    ctx.settings.target.clone(),
                    ctx.settings.timeout,
                    spec.clone(),
                    start + after,
                    start,
                    changed.clone(),
                )));
            }
            let stop_tx = stop_tx.clone();
            let until = start + spec.max_duration;
            limit_timer = Some(tokio::spawn(async move {
                tokio::time::sleep_until(until).await;
                let _ = stop_tx.send(true);
            }));
        }
    }

    let mut total = Recorder::new();
    let mut connects = 0;
    let mut converged_at = Vec::new();
    let mut failed = 0;
    let mut reload_result = Ok(());
    if let Some(r) = reload {
        // A failed reload ends the run: without the change there is nothing to time.
        reload_result = r.await.expect("reload task does not panic");
        if reload_result.is_err() {
            let _ = stop_tx.send(true);
        }
    }
    for w in workers {
        let r = w.await.expect("workers do not panic");
        total.merge(&r.rec);
        connects += r.connects;
        converged_at.extend(r.converged_at);
        failed += r.failed;
    }
    let elapsed = start.elapsed();
    if let Some(t) = limit_timer {
        t.abort();
    }
    if let Some(p) = progress {
        p.abort();
        if std::io::stderr().is_terminal() {
            eprintln!();
        }
    }
    reload_result?;

    let convergence = match (&mode, changed_at) {
        (Mode::Converge(spec), Some(changed)) => Some(convergence(
            spec,
            ctx.settings.fleet.hosts,
            changed.load(Ordering::SeqCst),
            converged_at,
            failed,
        )),
        _ => None,
    };
    let requests = total.ok + total.errors.total();
    Ok(Report {
        mode: match mode {
            Mode::Closed { .. } => "closed",
            Mode::Open { .. } => "open",
            Mode::Converge(_) => "converge",
        },
        protocol: ctx.settings.protocol.as_str(),
        hosts: ctx.settings.fleet.hosts,
        agents: ctx.settings.fleet.agents.len(),
        connections: c,
        target_rate,
        duration_secs: elapsed.as_secs_f64(),
        requests,
        ok: total.ok,
        errors: total.errors,
        error_total: total.errors.total(),
        status_codes: total.status_codes.clone(),
        error_samples: total.samples.clone(),
        requests_per_sec: requests as f64 / elapsed.as_secs_f64().max(1e-9),
        latency_ms: total.latency(),
        service_ms: total.service(),
        connects,
        convergence,
    })
}

/// One connection per worker, all opened at once.
async fn warm_up(settings: &Settings) -> Vec<Conn> {
    let tasks: Vec<_> = (0..settings.connections)
        .map(|_| {
            let mut conn = Conn::new(settings.target.clone(), settings.timeout);
            tokio::spawn(async move {
                let _ = conn.warm().await;
                conn
            })
        })
        .collect();
    let mut conns = Vec::with_capacity(tasks.len());
    for t in tasks {
        conns.push(t.await.expect("warm-up does not panic"));
    }
    conns
}

/// Sends one report rendered from the template and records the outcome. Latency counts
/// from `intended`, or from the actual send when that was earlier.
async fn send_report(
    ctx: &Ctx,
    conn: &mut Conn,
    rec: &mut Recorder,
    host: u64,
    intended: Instant,
    buf: &mut Vec<u8>,
) {
    let boot = !ctx.registered.is_empty();
    if boot && !ctx.is_registered(host) {
        // A BootAgent host registers before its first report; the registration is a
        // request of its own and is counted as one.
        let hostname = ctx.settings.fleet.hostname(host);
        let held = ctx.credentials.read().unwrap().get(&host).cloned();
        let Ok((_, credential)) = register(
            ctx,
            conn,
            rec,
            &hostname,
            &fleet::agentsn(host),
            held.as_deref(),
            intended,
        )
        .await
        else {
            return;
        };
        if let Some(c) = credential {
            ctx.credentials.write().unwrap().insert(host, c.into());
        }
        ctx.set_registered(host, true);
    }
    buf.clear();
    ctx.template.render(host, unix_now(), buf);
    let body = Bytes::copy_from_slice(buf);
    let credential = if boot {
        ctx.credentials.read().unwrap().get(&host).cloned()
    } else {
        None
    };
    let sent = Instant::now();
    match conn
        .post_as(
            ctx.settings.protocol.report_path(),
            body,
            credential.as_deref(),
        )
        .await
    {
        Ok(answer) => {
            let done = Instant::now();
            match wire::read_answer(ctx.settings.protocol, &answer) {
                Ok(_) => rec.ok(done - intended.min(sent), done - sent, &ctx.live),
                Err(bad) => {
                    if boot && matches!(bad, wire::BadAnswer::Refused(_)) {
                        // The server forgot or refused the serial: register again next time.
                        ctx.set_registered(host, false);
                    }
                    rec.bad_answer(&bad, &ctx.live)
                }
            }
        }
        Err(f) => {
            rec.failure(&f, &ctx.live);
            if matches!(f, Failure::Connect(_)) {
                tokio::time::sleep(CONNECT_BACKOFF).await;
            }
        }
    }
}

/// `POST /agent/register` for one host, with the credential it holds. Returns the serial
/// the server assigned when it differs from `serial`, and the credential it gave the host
/// when it gave one; a failure is recorded and returned as `Err`.
async fn register(
    ctx: &Ctx,
    conn: &mut Conn,
    rec: &mut Recorder,
    hostname: &str,
    serial: &str,
    credential: Option<&str>,
    intended: Instant,
) -> Result<(Option<String>, Option<String>), ()> {
    let body = serde_json::to_vec(&proto::bootagent::RegisterRequest {
        hostname: hostname.to_string(),
        agentsn: serial.to_string(),
        ..Default::default()
    })
    .expect("plain struct");
    let sent = Instant::now();
    match conn
        .post_as("/agent/register", body.into(), credential)
        .await
    {
        Ok(answer) => match serde_json::from_slice::<proto::bootagent::RegisterResponse>(&answer) {
            Ok(r) if r.status == proto::bootagent::STATUS_OK => {
                let now = Instant::now();
                rec.ok(now - intended.min(sent), now - sent, &ctx.live);
                let credential = (!r.credential.is_empty()).then_some(r.credential);
                Ok((
                    (!r.agentsn.is_empty() && r.agentsn != serial).then_some(r.agentsn),
                    credential,
                ))
            }
            Ok(r) => {
                let why = format!("register status {}: {}", r.status, r.message);
                rec.bad_answer(&wire::BadAnswer::Refused(why), &ctx.live);
                Err(())
            }
            Err(e) => {
                rec.bad_answer(&wire::BadAnswer::Body(e.to_string()), &ctx.live);
                Err(())
            }
        },
        Err(f) => {
            rec.failure(&f, &ctx.live);
            Err(())
        }
    }
}

async fn closed_worker(
    ctx: Arc<Ctx>,
    mut conn: Conn,
    claim: Arc<AtomicU64>,
    limit: u64,
    end: Option<Instant>,
) -> WorkerResult {
    let mut rec = Recorder::new();
    let mut buf = Vec::with_capacity(512);
    loop {
        if end.is_some_and(|e| Instant::now() >= e) {
            break;
        }
        let slot = claim.fetch_add(1, Ordering::Relaxed);
        if slot >= limit {
            break;
        }
        let host = slot % ctx.settings.fleet.hosts;
        send_report(&ctx, &mut conn, &mut rec, host, Instant::now(), &mut buf).await;
    }
    WorkerResult {
        rec,
        connects: conn.connects,
        converged_at: Vec::new(),
        failed: 0,
    }
}

/// Worker `w` of `C` sends the global slots `w, w + C, w + 2C, ...`, slot `g` being due
/// at `start + g / rate`. When the server stalls, the worker falls behind and sends the
/// overdue requests at once; their latency still counts from when they were due.
async fn open_worker(
    ctx: Arc<Ctx>,
    mut conn: Conn,
    w: usize,
    rate: f64,
    start: Instant,
    end: Instant,
) -> WorkerResult {
    let mut rec = Recorder::new();
    let mut buf = Vec::with_capacity(512);
    let c = ctx.settings.connections as u64;
    let mut slot = w as u64;
    loop {
        let due = start + Duration::from_secs_f64(slot as f64 / rate);
        if due >= end {
            break;
        }
        tokio::time::sleep_until(due.checked_sub(TIMER_SLACK).unwrap_or(due)).await;
        send_report(
            &ctx,
            &mut conn,
            &mut rec,
            slot % ctx.settings.fleet.hosts,
            due,
            &mut buf,
        )
        .await;
        slot += c;
    }
    WorkerResult {
        rec,
        connects: conn.connects,
        converged_at: Vec::new(),
        failed: 0,
    }
}

/// The hosts one converge worker owns, in the order their heartbeats fall due.
struct Plan {
    hosts: Vec<u64>,
    phases: Vec<Duration>,
}

/// Deals the fleet out to `c` workers round-robin in phase order, so that each worker's
/// schedule is spread over the whole interval.
fn converge_plans(fleet: &Fleet, spec: &ConvergeSpec, c: usize) -> Vec<Plan> {
    let interval_us = u64::try_from(spec.interval.as_micros()).unwrap_or(u64::MAX);
    let phases = fleet::phases(fleet.hosts, interval_us, spec.seed);
    let mut order: Vec<u32> = (0..fleet.hosts as u32).collect();
    order.sort_by_key(|&h| phases[h as usize]);
    let mut plans: Vec<Plan> = (0..c)
        .map(|_| Plan {
            hosts: Vec::new(),
            phases: Vec::new(),
        })
        .collect();
    for (pos, &h) in order.iter().enumerate() {
        let p = &mut plans[pos % c];
        p.hosts.push(u64::from(h));
        p.phases.push(Duration::from_micros(phases[h as usize]));
    }
    plans.retain(|p| !p.hosts.is_empty());
    plans
}

/// Versions seen by one worker, numbered so that host state is two bytes per agent.
struct Versions {
    names: Vec<String>,
    ids: HashMap<String, u16>,
}

impl Versions {
    /// Id of `v`; versions past the cap all share the last id, which never equals the
    /// expected version's (interned first).
    fn id(&mut self, v: &str) -> u16 {
        if let Some(&id) = self.ids.get(v) {
            return id;
        }
        if self.names.len() >= MAX_VERSIONS {
            return u16::MAX;
        }
        let id = self.names.len() as u16;
        self.names.push(v.to_string());
        self.ids.insert(v.to_string(), id);
        id
    }

    fn name(&self, id: u16) -> &str {
        self.names
            .get(usize::from(id))
            .map(String::as_str)
            .unwrap_or("other")
    }
}

#[allow(clippy::too_many_arguments)] // One call site; a struct would only rename these.
async fn converge_worker(
    ctx: Arc<Ctx>,
    mut conn: Conn,
    plan: Plan,
    spec: ConvergeSpec,
    start: Instant,
    changed_at: Arc<AtomicU64>,
    remaining: Arc<AtomicU64>,
    stop_tx: Arc<watch::Sender<bool>>,
) -> WorkerResult {
    let fleet = &ctx.settings.fleet;
    let protocol = ctx.settings.protocol;
    let mut stop = ctx.stop.clone();
    let mut rec = Recorder::new();
    let k = fleet.agents.len();
    let agent_index: HashMap<&str, usize> = fleet
        .agents
        .iter()
        .enumerate()
        .map(|(i, a)| (a.as_str(), i))
        .collect();
    let mut versions = Versions {
        names: Vec::new(),
        ids: HashMap::new(),
    };
    let target = versions.id(&spec.expect_version);
    let initial = versions.id(&fleet.version);
    let n = plan.hosts.len();
    let mut state = vec![initial; n * k];
    let mut done = vec![false; n];
    let mut registered = vec![false; n];
    // Rarely used: a serial the server assigned instead of ours, and job results to report.
    let mut serials: HashMap<usize, String> = HashMap::new();
    let mut credentials: HashMap<usize, String> = HashMap::new();
    let mut pending_jobs: HashMap<usize, Vec<proto::bootagent::JobResult>> = HashMap::new();
    let mut converged_at = Vec::new();
    let mut failed = 0;
    let fail = spec.failure.as_ref().filter(|f| f.share > 0.0);
    // Which of this worker's hosts fail (one bool each, only with --fail-share), and the
    // failure of each host that failed (only those).
    let picked: Vec<bool> = match fail {
        Some(f) => plan
            .hosts
            .iter()
            .map(|&h| f.picks(&fleet.hostname(h)))
            .collect(),
        None => Vec::new(),
    };
    let mut failures: HashMap<usize, HostFailure> = HashMap::new();
    // A fleet already on the expected version (k = 0 or initial == target) converges at once.
    if k == 0 || initial == target {
        for d in done.iter_mut() {
            *d = true;
            converged_at.push(0);
        }
        finish(&ctx, n as u64, &remaining, &stop_tx, &spec, true);
    }

    'rounds: for round in 0u32.. {
        for p in 0..n {
            if *stop.borrow() {
                break 'rounds;
            }
            let due = start + spec.interval * round + plan.phases[p];
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                _ = stop.changed() => break 'rounds,
            }
            let host = plan.hosts[p];
            let hostname = fleet.hostname(host);
            let serial = serials
                .get(&p)
                .cloned()
                .unwrap_or_else(|| fleet::agentsn(host));
            if protocol == Protocol::BootAgent && !registered[p] {
                // A BootAgent host registers once, on its first round, and retries next
                // round when that fails.
                let held = credentials.get(&p).map(String::as_str);
                match register(&ctx, &mut conn, &mut rec, &hostname, &serial, held, due).await {
                    Ok((adopted, credential)) => {
                        registered[p] = true;
                        if let Some(sn) = adopted {
                            serials.insert(p, sn);
                        }
                        if let Some(c) = credential {
                            credentials.insert(p, c);
                        }
                    }
                    Err(()) => continue,
                }
            }
            let serial = serials.get(&p).cloned().unwrap_or(serial);
            let now = Instant::now();
            let unix = unix_now();
            if let (Some(f), Some(spec_f)) = (failures.get_mut(&p), fail) {
                f.advance(spec_f, &fleet.agents, now, unix);
            }
            let held = failures.get(&p);
            let running: Vec<&str> = (0..k).map(|a| versions.name(state[p * k + a])).collect();
            let events = held.map_or(&[][..], HostFailure::to_send);
            let sending = events.len();
            let body = match protocol {
                Protocol::Legacy => {
                    let mut req = wire::legacy_request(fleet, &hostname, &running, unix);
                    if let Some(f) = held {
                        for (a, r) in req.real_agents.iter_mut().enumerate() {
                            if f.held(a) == Some(Held::Fatal) {
                                r.status = proto::bootagent::STATE_FATAL.to_string();
                            }
                        }
                    }
                    serde_json::to_vec(&proto::legacy::HeartbeatReport {
                        request: &req,
                        events,
                    })
                }
                Protocol::BootAgent => {
                    let mut req = wire::status_request(
                        fleet,
                        &hostname,
                        &serial,
                        &running,
                        unix,
                        pending_jobs.remove(&p).unwrap_or_default(),
                    );
                    if let Some(f) = held {
                        // A host that supervises its agents says so, so that the server
                        // does not answer `fatal` with restart jobs.
                        req.supervised = true;
                        for (a, r) in req.agents.iter_mut().enumerate() {
                            if f.held(a) == Some(Held::Fatal) {
                                r.status = proto::bootagent::STATE_FATAL.to_string();
                                r.uptime = 0;
                            }
                        }
                        req.events = events.to_vec();
                    }
                    serde_json::to_vec(&req)
                }
            }
            .expect("plain struct");
            let sent = Instant::now();
            let credential = credentials.get(&p).map(String::as_str);
            let answer = match conn
                .post_as(protocol.report_path(), body.into(), credential)
                .await
            {
                Ok(a) => a,
                Err(f) => {
                    rec.failure(&f, &ctx.live);
                    if matches!(f, Failure::Connect(_)) {
                        tokio::time::sleep(CONNECT_BACKOFF).await;
                    }
                    continue;
                }
            };
            let now = Instant::now();
            let mut orders = match wire::read_answer(protocol, &answer) {
                Ok(o) => o,
                Err(bad) => {
                    rec.bad_answer(&bad, &ctx.live);
                    continue;
                }
            };
            rec.ok(now - due, now - sent, &ctx.live);
            // Answered and not refused: the server took the events, never sent again.
            if let Some(f) = failures.get_mut(&p) {
                f.taken(sending);
            }
            for (i, (name, version)) in orders.installs.iter().enumerate() {
                if *version == spec.expect_version && spec.reload_after.is_none() {
                    // Nobody told us when the change happened: the first answer naming
                    // the new version marks it.
                    let at = (now - start).as_nanos() as u64;
                    let _ = changed_at.compare_exchange(
                        0,
                        at.max(1),
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    );
                }
                let Some(&a) = agent_index.get(name.as_str()) else {
                    continue;
                };
                let told = versions.id(version);
                let job = orders.install_jobs.get(i).copied();
                match fail {
                    Some(fs) if *version == fs.version && picked.get(p) == Some(&true) => {
                        let f = failures
                            .entry(p)
                            .or_insert_with(|| HostFailure::new(unix_millis()));
                        if !f.has(a) {
                            if state[p * k + a] == told {
                                // Already runs it (from before the run): nothing to fail.
                                continue;
                            }
                            let old = versions.name(state[p * k + a]).to_string();
                            if f.install(fs, a, name, &old, now, unix_now()) {
                                state[p * k + a] = told;
                            }
                        }
                        if fs.mode == FailMode::NeverStart {
                            if let Some(r) = job.and_then(|j| orders.job_results.get_mut(j)) {
                                r.errcode = proto::bootagent::ERRCODE_ROLLED_BACK;
                                r.message = format!(
                                    "{version} did not start; the previous version was put back (simulated)"
                                );
                            }
                        }
                    }
                    _ => {
                        // Any other version, the old one included: installed at once (it
                        // is reported next round), and a failure of that agent is over.
                        if let Some(f) = failures.get_mut(&p) {
                            f.forget(a);
                        }
                        state[p * k + a] = told;
                    }
                }
            }
            if failures.get(&p).is_some_and(HostFailure::is_empty) {
                failures.remove(&p);
            }
            if !orders.job_results.is_empty() {
                pending_jobs.insert(p, std::mem::take(&mut orders.job_results));
            }
            if done[p] {
                continue;
            }
            match failures.get(&p) {
                // A failing host never converges; it is done once it failed to the end
                // and the server heard all of it.
                Some(f) => {
                    if f.terminal() {
                        done[p] = true;
                        failed += 1;
                        ctx.live.failed.fetch_add(1, Ordering::Relaxed);
                        finish(&ctx, 1, &remaining, &stop_tx, &spec, false);
                    }
                }
                None => {
                    if state[p * k..(p + 1) * k].iter().all(|&v| v == target) {
                        done[p] = true;
                        converged_at.push((now - start).as_nanos() as u64);
                        finish(&ctx, 1, &remaining, &stop_tx, &spec, true);
                    }
                }
            }
        }
    }
    WorkerResult {
        rec,
        connects: conn.connects,
        converged_at,
        failed,
    }
}

/// Counts `n` more hosts done (converged, or failed to the end); the last one ends the
/// run after the settle time, unless the run keeps going to its maximum duration.
fn finish(
    ctx: &Ctx,
    n: u64,
    remaining: &AtomicU64,
    stop_tx: &Arc<watch::Sender<bool>>,
    spec: &ConvergeSpec,
    converged: bool,
) {
    if converged {
        ctx.live.converged.fetch_add(n, Ordering::Relaxed);
    }
    let settle = spec.settle;
    if remaining.fetch_sub(n, Ordering::SeqCst) == n && !spec.keep_going {
        let stop_tx = stop_tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(settle).await;
            let _ = stop_tx.send(true);
        });
    }
}

/// Installs the new config (temp file + rename, so the server never reads half a file)
/// and asks the server to reload it, at `when`.
async fn reload_config(
    target: Target,
    timeout: Duration,
    spec: ConvergeSpec,
    when: Instant,
    start: Instant,
    changed_at: Arc<AtomicU64>,
) -> Result<(), RunError> {
    tokio::time::sleep_until(when).await;
    if let (Some(new), Some(live)) = (&spec.new_config, &spec.meta_config) {
        let data = tokio::fs::read(new)
            .await
            .map_err(|source| RunError::NewConfig {
                path: new.clone(),
                source,
            })?;
        let tmp = live.with_extension("loadgen-tmp");
        let io = |source| RunError::NewConfig {
            path: live.clone(),
            source,
        };
        tokio::fs::write(&tmp, &data).await.map_err(io)?;
        tokio::fs::rename(&tmp, live).await.map_err(io)?;
    }
    let url = target.url("/config/reload");
    let mut conn = Conn::new(target, timeout);
    let before = Instant::now();
    let answer = conn.get("/config/reload").await;
    let reason = match answer {
        Ok(_) => {
            changed_at.store(
                ((before - start).as_nanos() as u64).max(1),
                Ordering::SeqCst,
            );
            return Ok(());
        }
        Err(Failure::Status(code)) => format!("http status {code}"),
        Err(Failure::Connect(e) | Failure::Io(e)) => e,
        Err(Failure::Timeout) => "timed out".into(),
    };
    Err(RunError::Reload { url, reason })
}

/// Percentiles of the time to converge, over the fleet less the hosts that failed the
/// version (hosts that never converged count as never, so `t100` stays `None` until the
/// last one does).
fn convergence(
    spec: &ConvergeSpec,
    hosts: u64,
    changed_ns: u64,
    mut at: Vec<u64>,
    failed: u64,
) -> Convergence {
    let counted = hosts.saturating_sub(failed);
    at.sort_unstable();
    let change = (changed_ns > 0).then_some(changed_ns);
    let before = change
        .map(|c| at.iter().filter(|&&t| t < c).count() as u64)
        .unwrap_or(0);
    let t = |q: f64| -> Option<f64> {
        let c = change?;
        let need = ((q * counted as f64).ceil() as usize).max(1);
        at.get(need - 1)
            .map(|&ns| ns.saturating_sub(c) as f64 / 1e9)
    };
    Convergence {
        interval_secs: spec.interval.as_secs_f64(),
        expect_version: spec.expect_version.clone(),
        change_at_secs: change.map(|c| c as f64 / 1e9),
        converged: at.len() as u64,
        failed,
        not_converged: counted.saturating_sub(at.len() as u64),
        fail_share: spec.failure.as_ref().map(|f| f.share),
        converged_before_change: before,
        t50_secs: t(0.50),
        t99_secs: t(0.99),
        t100_secs: t(1.0),
    }
}

/// Once a second: elapsed time, requests, the last second's rate, errors (and converged
/// hosts in converge mode), on one line of stderr.
async fn progress_line(live: Arc<Live>, start: Instant, hosts: u64, converge: bool) {
    let tty = std::io::stderr().is_terminal();
    let mut tick = tokio::time::interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
    let mut last = 0;
    loop {
        tick.tick().await;
        let n = live.requests.load(Ordering::Relaxed);
        let mut line = format!(
            "{:>5.0}s requests {n} ({}/s) errors {}",
            start.elapsed().as_secs_f64(),
            n - last,
            live.errors.load(Ordering::Relaxed)
        );
        if converge {
            let c = live.converged.load(Ordering::Relaxed);
            line.push_str(&format!(
                " converged {c}/{hosts} ({:.1}%)",
                100.0 * c as f64 / hosts as f64
            ));
            let f = live.failed.load(Ordering::Relaxed);
            if f > 0 {
                line.push_str(&format!(" failed {f}"));
            }
        }
        last = n;
        if tty {
            eprint!("\r{line}\x1b[K");
        } else {
            eprintln!("{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ConvergeSpec {
        ConvergeSpec {
            interval: Duration::from_secs(60),
            expect_version: "2".into(),
            reload_after: None,
            new_config: None,
            meta_config: None,
            max_duration: Duration::from_secs(120),
            settle: Duration::ZERO,
            seed: 1,
            failure: None,
            keep_going: false,
        }
    }

    #[test]
    fn plans_cover_every_host_once_in_phase_order() {
        let fleet = Fleet::new(1001, 1, "a-", "sim-", "1").unwrap();
        let plans = converge_plans(&fleet, &spec(), 8);
        let mut all: Vec<u64> = plans.iter().flat_map(|p| p.hosts.clone()).collect();
        all.sort_unstable();
        assert_eq!(all, (0..1001).collect::<Vec<_>>());
        for p in &plans {
            assert!(p.phases.windows(2).all(|w| w[0] <= w[1]));
        }
    }

    #[test]
    fn convergence_percentiles_count_the_whole_fleet() {
        let s = 1_000_000_000u64;
        // 4 hosts, change at 10 s; three converged at 11, 12, 20 s; one never.
        let c = convergence(&spec(), 4, 10 * s, vec![20 * s, 11 * s, 12 * s], 0);
        assert_eq!(c.change_at_secs, Some(10.0));
        assert_eq!(c.t50_secs, Some(2.0));
        assert_eq!(c.t99_secs, None);
        assert_eq!(c.t100_secs, None);
        let c = convergence(&spec(), 3, 10 * s, vec![20 * s, 11 * s, 12 * s], 0);
        assert_eq!(c.t100_secs, Some(10.0));
        assert_eq!(c.converged_before_change, 0);
        let c = convergence(&spec(), 3, 0, vec![1], 0);
        assert_eq!(c.t50_secs, None);
        // 5 hosts, 2 failed: the three others make 100 %.
        let c = convergence(&spec(), 5, 10 * s, vec![20 * s, 11 * s, 12 * s], 2);
        assert_eq!((c.t100_secs, c.failed, c.not_converged), (Some(10.0), 2, 0));
        let c = convergence(&spec(), 5, 10 * s, vec![11 * s], 2);
        assert_eq!((c.t100_secs, c.not_converged), (None, 2));
    }
}
