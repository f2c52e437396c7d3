//! ops-updater upgrading itself. The worker side is here: the desired agent (or BootAgent
//! job) named `ops-updater` is the updater's own version. A different one is downloaded
//! and verified like any agent's artifact (into `<workdir>/.ops-updater/releases/<version>/`), its
//! binary must print exactly that version (`-v`) and accept the live config (`-T`), then it
//! is staged beside the executable, the marker says `trial`, and this worker stops (its
//! agents' actions finished first) for the supervisor ([`supervisor`]) to run the new one.
//! The new worker counts its good rounds into the marker until it is committed.

pub mod marker;
pub mod supervisor;
pub mod takeover;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::legacy::RealAgent;
use proto::names::{AgentName, Version, SELF_AGENT};
use tokio::sync::watch;

use crate::artifact::{self, Fetcher, Want};
use crate::engine::Desired;
use crate::state::{now_unix, Shared};
use marker::{Marker, Stage, Upgrade};

/// The version this binary was built as: `OPS_VERSION` at build time, else the crate's.
pub const VERSION: &str = match option_env!("OPS_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

/// The binary's name inside a self-upgrade tarball (beside its `control`).
pub const BINARY: &str = "ops-updater";
/// The new binary's name while staged beside the executable.
pub const STAGED: &str = ".ops-updater.next";
/// Time the new binary gets for `-v` and for `-T`.
const CHECK_TIMEOUT: Duration = Duration::from_secs(15);

/// What became of a desired version of the updater.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It is the running version (and committed, or being tried: `trial` says).
    Running { trial: bool },
    /// Being prepared, or the worker is stopping for it.
    InProgress,
    /// Not tried: why.
    Refused(String),
    /// Tried and failed before anything changed: why.
    Failed(String),
}

/// The worker's self-upgrade state.
pub struct SelfUpgrade {
    workdir: PathBuf,
    /// The config file, as given (`-c`), for the new binary's `-T`.
    config: PathBuf,
    /// The executable to replace (symlinks resolved); `None` when not supervised.
    exe: Option<PathBuf>,
    commit_rounds: u32,
    fetcher: Fetcher,
    shared: Shared,
    marker: Mutex<Marker>,
    busy: Mutex<bool>,
    /// Set when this worker must stop for an upgrade.
    stop: watch::Sender<bool>,
    /// When the next round is due (unix ms), for the new worker's first round.
    next_round_ms: AtomicI64,
    /// The refusal last logged, so a repeated one is logged once.
    last_refusal: Mutex<Option<String>>,
}

impl std::fmt::Debug for SelfUpgrade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SelfUpgrade")
            .field("exe", &self.exe)
            .finish_non_exhaustive()
    }
}

/// The executable a worker replaces: what its supervisor said, or none (not supervised).
pub fn supervised_exe() -> Option<PathBuf> {
    std::env::var_os(supervisor::ENV_WORKER)?;
    std::env::var_os(supervisor::ENV_EXE).map(PathBuf::from)
}

impl SelfUpgrade {
    pub fn new(
        cfg: &crate::config::Resolved,
        config: PathBuf,
        fetcher: Fetcher,
        shared: Shared,
    ) -> Arc<SelfUpgrade> {
        let m = marker::load(&cfg.workdir);
        let (stop, _) = watch::channel(false);
        let s = Arc::new(SelfUpgrade {
            workdir: cfg.workdir.clone(),
            config,
            exe: supervised_exe(),
            commit_rounds: cfg.config.self_upgrade_commit_rounds,
            fetcher,
            shared,
            marker: Mutex::new(m),
            busy: Mutex::new(false),
            stop,
            next_round_ms: AtomicI64::new(0),
            last_refusal: Mutex::new(None),
        });
        s.on_start();
        s
    }

    fn marker(&self) -> std::sync::MutexGuard<'_, Marker> {
        self.marker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The marker as it is now: once this worker committed, the supervisor finishes the
    /// upgrade and clears it, so the copy in memory is read again from disk (a small file,
    /// read only in that state).
    fn current(&self) -> Marker {
        let mut m = self.marker();
        if m.upgrade
            .as_ref()
            .is_some_and(|u| u.stage == Stage::Committed)
        {
            *m = marker::load(&self.workdir);
        }
        m.clone()
    }

    /// Tells what the marker holds for this start: a roll-back not told yet (an event),
    /// a trial of this version (logged), a finished upgrade (an event).
    fn on_start(self: &Arc<Self>) {
        let (blocked, trial) = {
            let m = self.marker();
            (m.blocked.clone(), m.upgrade.clone())
        };
        if let Some(b) = blocked.filter(|b| !b.reported) {
            self.event(
                proto::events::KIND_SELF_UPGRADE_FAILED,
                b.version.as_str(),
                &b.reason,
            );
            let mut m = self.marker().clone();
            if let Some(x) = m.blocked.as_mut() {
                x.reported = true;
            }
            self.save(m);
        }
        if let Some(u) = trial.filter(|u| u.to == VERSION) {
            tracing::info!(from = %u.from, to = %u.to, rounds = self.commit_rounds, "self-upgrade: this is the trial run");
        }
        self.publish();
    }

    fn save(self: &Arc<Self>, m: Marker) {
        *self.marker() = m.clone();
        let dir = self.workdir.clone();
        let me = self.clone();
        tokio::spawn(async move {
            if let Err(e) = marker::save_async(dir, m).await {
                tracing::error!(error = %e, "cannot write the self-upgrade marker");
            }
            me.publish();
        });
    }

    fn publish(&self) {
        let m = self.marker().clone();
        let line = match (&m.upgrade, &m.blocked) {
            (Some(u), _) if u.stage == Stage::Trial => Some(format!(
                "trial of {} (from {}): {} of {} good rounds",
                u.to, u.from, u.rounds, self.commit_rounds
            )),
            (Some(u), _) => Some(format!("{} committed, being put in place", u.to)),
            (None, Some(b)) => Some(b.reason.clone()),
            (None, None) => None,
        };
        self.shared.daemon(|d| d.self_upgrade = line);
    }

    fn event(&self, kind: &str, version: &str, cause: &str) {
        let input = crate::events::EventInput {
            agent: SELF_AGENT.to_string(),
            version: version.to_string(),
            kind: kind.to_string(),
            cause: cause.to_string(),
            output: Vec::new(),
            state: String::new(),
            restarts: 0,
        };
        let journal = self.shared.events().clone();
        tokio::spawn(async move {
            journal.push(input).await;
        });
    }

    /// Resolves when this worker must stop for an upgrade.
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.stop.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }

    /// True once this worker stopped for an upgrade (it exits with
    /// [`supervisor::EXIT_UPGRADE`]).
    pub fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// The round scheduled its next heartbeat at `at`.
    pub fn next_round_at(&self, at: tokio::time::Instant) {
        let ms = now_ms()
            + at.saturating_duration_since(tokio::time::Instant::now())
                .as_millis() as i64;
        self.next_round_ms.store(ms, Ordering::Relaxed);
    }

    /// The updater's own entry of a report.
    pub fn real_agent(&self) -> RealAgent {
        RealAgent {
            name: SELF_AGENT.to_string(),
            version: VERSION.to_string(),
            status: proto::legacy::STATUS_STARTED.to_string(),
            timestamp: now_unix(),
        }
    }

    /// A round reached the server with this version in its report: in a trial, one more
    /// good round, and the commit once there are enough.
    pub fn round_ok(self: &Arc<Self>) {
        let mut m = self.marker().clone();
        let Some(u) = m.upgrade.as_mut() else {
            return;
        };
        if u.stage != Stage::Trial || u.to != VERSION {
            return;
        }
        u.rounds += 1;
        let done = u.rounds >= self.commit_rounds;
        if done {
            u.stage = Stage::Committed;
            self.shared
                .metrics()
                .self_upgrade(crate::metrics::SelfUpgrade::Committed);
            tracing::info!(to = %u.to, rounds = u.rounds, "self-upgrade: enough good rounds; committing");
            self.event(
                proto::events::KIND_SELF_UPGRADED,
                VERSION,
                &format!("upgraded from {} after {} good rounds", u.from, u.rounds),
            );
        } else {
            tracing::info!(to = %u.to, rounds = u.rounds, of = self.commit_rounds, "self-upgrade: good round");
        }
        self.save(m);
    }

    /// The server wants version `d.version` of the updater. Starts preparing it in the
    /// background when it is new (the legacy round does not wait for it).
    pub fn desire(self: &Arc<Self>, d: Desired) -> Outcome {
        match self.decide(&d) {
            Some(o) => o,
            None => {
                let me = self.clone();
                tokio::spawn(async move {
                    if let Err(e) = me.upgrade(&d, None).await {
                        me.refused(&d.version, &e);
                    }
                });
                Outcome::InProgress
            }
        }
    }

    /// A BootAgent install/upgrade job for the updater: prepares the upgrade and stops
    /// this worker for it; the job's result is given by the worker that runs after it (the
    /// job is delivered again): `Running` by the new one, `Refused` by the old one with
    /// the reason of the roll-back.
    pub async fn job(self: &Arc<Self>, d: Desired, id: &str) -> Outcome {
        loop {
            match self.decide(&d) {
                None => break,
                Some(Outcome::Running { trial: true }) => return self.wait_commit().await,
                // Prepared by the legacy round meanwhile (`auto`): wait for its end.
                Some(Outcome::InProgress) if !self.stopping() => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Some(o) => return o,
            }
        }
        match self.upgrade(&d, Some(id.to_string())).await {
            Ok(()) => Outcome::InProgress,
            Err(e) => {
                self.refused(&d.version, &e);
                Outcome::Failed(e)
            }
        }
    }

    /// In a trial: waits until the commit (or forever: a roll-back ends this worker).
    async fn wait_commit(self: &Arc<Self>) -> Outcome {
        loop {
            let trial = self
                .marker()
                .upgrade
                .as_ref()
                .is_some_and(|u| u.stage == Stage::Trial);
            if !trial {
                return Outcome::Running { trial: false };
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn refused(&self, version: &Version, why: &str) {
        self.shared
            .metrics()
            .self_upgrade(crate::metrics::SelfUpgrade::Failed);
        let mut last = self.last_refusal.lock().unwrap_or_else(|e| e.into_inner());
        let key = format!("{version}: {why}");
        if last.as_deref() != Some(key.as_str()) {
            tracing::warn!(version = %version, "self-upgrade not done: {why}");
            self.event(
                proto::events::KIND_SELF_UPGRADE_FAILED,
                version.as_str(),
                why,
            );
            *last = Some(key);
        }
        self.shared.daemon(|d| {
            d.self_upgrade = Some(format!("{version} not installed: {why}"));
        });
    }

    /// `None` when the upgrade should be tried now.
    fn decide(self: &Arc<Self>, d: &Desired) -> Option<Outcome> {
        let m = self.current();
        // A new desired version lifts the block of a rolled-back one.
        if let Some(b) = &m.blocked {
            if b.version != d.version {
                let mut m2 = m.clone();
                m2.blocked = None;
                self.save(m2);
            } else if b.version == d.version {
                return Some(Outcome::Refused(format!(
                    "{}; not tried again until the desired version changes",
                    b.reason
                )));
            }
        }
        if d.version == VERSION {
            let trial = m
                .upgrade
                .as_ref()
                .is_some_and(|u| u.to == VERSION && u.stage == Stage::Trial);
            return Some(Outcome::Running { trial });
        }
        if let Some(u) = &m.upgrade {
            return Some(if u.stage == Stage::Committed {
                // Being put in place by the supervisor: asked again next round.
                Outcome::InProgress
            } else {
                Outcome::Refused(format!("the upgrade to {} is not committed yet", u.to))
            });
        }
        if self.exe.is_none() {
            return Some(Outcome::Refused(
                "this ops-updater runs without its supervisor process, which a self-upgrade needs"
                    .into(),
            ));
        }
        if d.cmd != proto::legacy::Cmd::Start {
            return Some(Outcome::Refused(
                "ops-updater is not stopped by a desired state (cmd stop ignored)".into(),
            ));
        }
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        if *busy || self.stopping() {
            return Some(Outcome::InProgress);
        }
        *busy = true;
        None
    }

    /// Download, verify, check the new binary, stage it, write the marker and stop.
    async fn upgrade(self: &Arc<Self>, d: &Desired, job: Option<String>) -> Result<(), String> {
        let res = self.prepare(d).await;
        let staged = match res {
            Ok(p) => p,
            Err(e) => {
                *self.busy.lock().unwrap_or_else(|e| e.into_inner()) = false;
                return Err(e);
            }
        };
        let exe = self.exe.clone().unwrap_or_default();
        let next_round_ms = Some(self.next_round_ms.load(Ordering::Relaxed)).filter(|&ms| ms > 0);
        let mut m = self.marker().clone();
        m.upgrade = Some(Upgrade {
            stage: Stage::Trial,
            from: VERSION.to_string(),
            to: d.version.clone(),
            exe,
            next: staged,
            rounds: 0,
            started: now_unix(),
            next_round_ms,
            job,
        });
        *self.marker() = m.clone();
        marker::save_async(self.workdir.clone(), m)
            .await
            .map_err(|e| format!("cannot write the self-upgrade marker: {e}"))?;
        tracing::info!(from = VERSION, to = %d.version, "self-upgrade: new binary checked and staged; stopping for the switch");
        self.shared
            .metrics()
            .self_upgrade(crate::metrics::SelfUpgrade::Started);
        self.stop.send_replace(true);
        Ok(())
    }

    async fn prepare(&self, d: &Desired) -> Result<PathBuf, String> {
        let name = AgentName::parse(SELF_AGENT).map_err(|e| e.to_string())?;
        // Not `<workdir>/ops-updater/`: by default the workdir is the executable's folder,
        // where `ops-updater` is the executable itself.
        let dir = releases_dir(&self.workdir);
        crate::fsx::blocking({
            let dir = dir.clone();
            move || std::fs::create_dir_all(dir)
        })
        .await
        .map_err(|e| format!("{}: {e}", dir.display()))?;
        tracing::info!(version = %d.version, url = %crate::redact(&d.tarball_url), "self-upgrade: downloading");
        let vdir = artifact::install(
            &self.fetcher,
            &dir,
            &name,
            &d.version,
            &d.tarball_url,
            (!d.md5_url.is_empty()).then_some(d.md5_url.as_str()),
            Want {
                md5: d.md5.clone(),
                sha256: d.sha256.clone(),
            },
        )
        .await
        .map_err(|e| {
            self.shared.metrics().failure(e.failure());
            e.to_string()
        })?;
        let bin = vdir.join(BINARY);
        if !crate::control::is_executable(&bin) {
            return Err(format!(
                "the tarball has no executable {BINARY} at its root ({} is missing or not executable)",
                bin.display()
            ));
        }
        self.check_binary(&bin, &d.version).await?;
        let exe = self.exe.clone().unwrap_or_default();
        let next = stage(&bin, &exe).await?;
        Ok(next)
    }

    /// The new binary must say it is `version` and accept the live config.
    async fn check_binary(&self, bin: &Path, version: &Version) -> Result<(), String> {
        let envs = Default::default();
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
        let run = |args: Vec<String>| {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let cmd = crate::process::command(bin, &refs, &cwd, &envs);
            crate::process::run(cmd, CHECK_TIMEOUT, Duration::from_secs(2))
        };
        let out = run(vec!["-v".into()])
            .await
            .map_err(|e| format!("the new binary's -v: {e}"))?;
        let said = out.stdout.trim();
        if !out.success() || said != version.as_str() {
            return Err(format!(
                "the new binary says it is version {:?} (exit {:?}), not {version}",
                proto::clean_text(said, 64),
                out.code
            ));
        }
        let config = self.config.display().to_string();
        let out = run(vec!["-T".into(), "-c".into(), config])
            .await
            .map_err(|e| format!("the new binary's -T: {e}"))?;
        if !out.success() {
            return Err(format!(
                "the new binary refuses the config (-T, exit {:?}): {}",
                out.code,
                proto::clean_text(&out.summary(), 400)
            ));
        }
        Ok(())
    }
}

/// Where releases of ops-updater are downloaded and unpacked: `<workdir>/.ops-updater/releases/<version>/`.
pub fn releases_dir(workdir: &Path) -> PathBuf {
    workdir.join(crate::boot::STATE_DIR).join("releases")
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Copies `bin` beside `exe` as [`STAGED`] (same folder, so the commit is one rename),
/// with `exe`'s mode; refuses a folder that is read-only or an executable that is not on
/// its folder's filesystem (a bind-mounted file cannot be replaced by a rename).
async fn stage(bin: &Path, exe: &Path) -> Result<PathBuf, String> {
    let (bin, exe) = (bin.to_path_buf(), exe.to_path_buf());
    crate::fsx::blocking(move || Ok(stage_blocking(&bin, &exe)))
        .await
        .map_err(|e| e.to_string())?
}

#[allow(clippy::disallowed_methods)] // Runs on the blocking pool.
fn stage_blocking(bin: &Path, exe: &Path) -> Result<PathBuf, String> {
    use std::io::Write as _;
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let dir = exe
        .parent()
        .ok_or_else(|| format!("{} has no folder", exe.display()))?;
    let exe_meta = std::fs::metadata(exe).map_err(|e| format!("{}: {e}", exe.display()))?;
    let dir_meta = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if exe_meta.dev() != dir_meta.dev() {
        return Err(format!(
            "{} is on another filesystem than its folder {} (a bind-mounted file?): it cannot be replaced atomically",
            exe.display(),
            dir.display()
        ));
    }
    let tmp = dir.join(format!("{STAGED}.tmp-{}", uuid::Uuid::new_v4().simple()));
    let write = || -> std::io::Result<()> {
        let data = std::fs::read(bin)?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(&data)?;
        f.set_permissions(std::fs::Permissions::from_mode(
            exe_meta.permissions().mode() & 0o7777 | 0o500,
        ))?;
        f.sync_all()?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(match e.raw_os_error() {
            Some(libc::EROFS) => format!(
                "cannot replace {}: its folder {} is read-only",
                exe.display(),
                dir.display()
            ),
            Some(libc::EACCES) | Some(libc::EPERM) => format!(
                "cannot replace {}: no permission to write in {}",
                exe.display(),
                dir.display()
            ),
            _ => format!("cannot stage the new binary in {}: {e}", dir.display()),
        });
    }
    let next = dir.join(STAGED);
    std::fs::rename(&tmp, &next).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot stage the new binary as {}: {e}", next.display())
    })?;
    crate::fsx::fsync_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(next)
}

/// The first round's delay after a self-upgrade: when the previous worker's next round was
/// due (handed over by the supervisor), capped at `interval`; `None` otherwise. Read once.
pub fn handed_over_round(interval: Duration) -> Option<Duration> {
    static TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let ms: i64 = std::env::var(supervisor::ENV_NEXT_ROUND_MS)
        .ok()?
        .parse()
        .ok()?;
    if TAKEN.swap(true, Ordering::Relaxed) {
        return None;
    }
    let wait = Duration::from_millis(ms.saturating_sub(now_ms()).max(0) as u64);
    Some(wait.min(interval))
}
