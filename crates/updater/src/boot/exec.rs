//! Running BootAgent jobs on agents: checks every job before acting, then acts through the
//! same machinery as the legacy path ([`crate::agent::Oneshot`]: fetch, verify, unpack,
//! switch, roll back, prune; control scripts under the agent's action lock).
//!
//! Each agent keeps its job settings (`envs`, `limits`) in `<workdir>/<agent>/.bootagent.json`,
//! written atomically: `envs` are given to every control script of that agent, across
//! restarts of the updater; `limits` are stored and shown on `/status` (enforcing them comes
//! with supervision, a later issue).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};

use proto::bootagent::{Action, Checksum, Job, STATE_RUNNING, STATE_STOPED};
use proto::legacy::Cmd;
use proto::rules;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::jobs::{ERR_FAILED, ERR_INVALID, ERR_OK, ERR_ROLLED_BACK, MAX_ID_LEN};
use crate::agent::{Ctx, Desired, Oneshot, OneshotFailure};
use crate::control::{self, AgentStatus};
use crate::fsx;
use crate::state::now_unix;

/// File of an agent's job settings, inside its folder.
pub const SETTINGS_FILE: &str = ".bootagent.json";
/// Infix of an agent folder being removed by `uninstall`.
pub const UNINSTALL_INFIX: &str = ".uninstall-";

/// What a job ended with: `errcode` and `message` for the next report.
pub type Outcome = (i32, String);

/// An agent's job settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    #[serde(default)]
    pub envs: BTreeMap<String, String>,
    #[serde(default)]
    pub limits: BTreeMap<String, String>,
}

/// Reads an agent's settings; absent or unreadable means none (logged).
pub fn load_settings(agent_dir: &Path) -> Settings {
    let path = agent_dir.join(SETTINGS_FILE);
    match std::fs::read(&path) {
        Ok(b) if b.len() as u64 <= 1 << 20 => serde_json::from_slice(&b).unwrap_or_else(|e| {
            tracing::warn!(file = %path.display(), error = %e, "ignoring corrupt agent settings");
            Settings::default()
        }),
        Ok(_) => {
            tracing::warn!(file = %path.display(), "ignoring oversized agent settings");
            Settings::default()
        }
        Err(_) => Settings::default(),
    }
}

pub fn save_settings(agent_dir: &Path, s: &Settings) -> std::io::Result<()> {
    std::fs::create_dir_all(agent_dir)?;
    let text = serde_json::to_vec_pretty(s).expect("settings serialize");
    fsx::write_atomic(&agent_dir.join(SETTINGS_FILE), &text)
}

fn is_http_url(u: &str) -> bool {
    let rest = u
        .strip_prefix("http://")
        .or_else(|| u.strip_prefix("https://"));
    rest.is_some_and(|r| {
        !r.is_empty()
            && !r.starts_with('/')
            && !r
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    })
}

/// Checks a job before anything is done for it. `only` is the config's `desiredAgent`.
/// Returns the SHA-256 (lowercase hex) for install and upgrade.
/// The digests an install or upgrade job carries, checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobDigests {
    /// Lowercase hex SHA-256, from `checksum: SHA256:...`.
    pub sha256: Option<String>,
    /// Lowercase hex MD5, from `checksum: MD5:...` or the `md5` extension.
    pub md5: Option<String>,
}

/// Checks a job. For install and upgrade, returns its digests: at least one of a SHA-256
/// or an MD5 (`checksum: MD5:...` is what ops-meta sends while it knows no SHA-256 of the
/// artifact, the same check the legacy path makes with the `.md5` file).
pub fn check(job: &Job, only: &str) -> Result<Option<JobDigests>, String> {
    if job.id.is_empty() || job.id.len() > MAX_ID_LEN || job.id.chars().any(char::is_control) {
        return Err(format!(
            "job id {:?} is empty, too long or holds control characters",
            cut64(&job.id)
        ));
    }
    if job.action == Action::Config {
        if job.svrlist.trim().is_empty() && job.step.is_none() {
            return Err("config job sets neither svrlist nor step".into());
        }
        if !job.svrlist.trim().is_empty() {
            rules::parse_svrlist(&job.svrlist).map_err(|e| format!("svrlist: {e}"))?;
        }
        if let Some(step) = job.step {
            rules::check_step(step).map_err(|e| format!("step: {e}"))?;
        }
        return Ok(None);
    }
    proto::validate_agent_name(&job.name).map_err(|e| e.to_string())?;
    if !only.is_empty() && job.name != only {
        return Err(format!(
            "agent {:?}: this host only manages {only:?} (desiredAgent)",
            job.name
        ));
    }
    rules::check_envs(&job.envs).map_err(|e| format!("envs: {e}"))?;
    rules::check_limits_map(&job.limits).map_err(|e| format!("limits: {e}"))?;
    if matches!(job.action, Action::Install | Action::Upgrade) {
        if job.version.is_empty() {
            return Err(format!(
                "agent {:?}: {} job has no version",
                job.name,
                job.action.as_str()
            ));
        }
        proto::validate_version(&job.version).map_err(|e| e.to_string())?;
        if !is_http_url(&job.url) {
            return Err(format!(
                "agent {:?}: url {:?} is not an http:// or https:// URL",
                job.name,
                cut64(&job.url)
            ));
        }
        let mut digests = match proto::bootagent::parse_any_checksum(&job.checksum) {
            Some(Checksum::Sha256(h)) => JobDigests {
                sha256: Some(h),
                md5: None,
            },
            Some(Checksum::Md5(h)) => JobDigests {
                sha256: None,
                md5: Some(h),
            },
            None => {
                return Err(format!(
                    "agent {:?}: checksum {:?} is neither SHA256:<64 hex digits> nor MD5:<32 hex digits>; refusing to install without one",
                    job.name,
                    cut64(&job.checksum)
                ))
            }
        };
        if !job.md5.is_empty() {
            if !proto::bootagent::is_hex(&job.md5, 32) {
                return Err(format!(
                    "agent {:?}: md5 {:?} is not 32 hex digits",
                    job.name,
                    cut64(&job.md5)
                ));
            }
            let md5 = job.md5.to_ascii_lowercase();
            if digests.md5.as_ref().is_some_and(|m| *m != md5) {
                return Err(format!(
                    "agent {:?}: checksum {:?} and md5 {:?} disagree",
                    job.name,
                    cut64(&job.checksum),
                    cut64(&job.md5)
                ));
            }
            digests.md5 = Some(md5);
        }
        return Ok(Some(digests));
    }
    Ok(None)
}

fn cut64(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Runs jobs on agents; shared by the job tasks.
#[derive(Debug)]
pub struct Runner {
    base: Arc<Ctx>,
    locks: StdMutex<HashMap<String, Arc<Mutex<()>>>>,
    /// When each agent was last seen to start (Unix seconds), for its reported uptime.
    since: StdMutex<HashMap<String, i64>>,
}

impl Runner {
    pub fn new(base: Arc<Ctx>) -> Runner {
        Runner {
            base,
            locks: StdMutex::new(HashMap::new()),
            since: StdMutex::new(HashMap::new()),
        }
    }

    pub fn workdir(&self) -> &Path {
        &self.base.workdir
    }

    pub fn agent_dir(&self, name: &str) -> PathBuf {
        self.base.agent_dir(name)
    }

    /// The updater's own files.
    pub fn own(&self) -> Arc<crate::workdir::Own> {
        self.base.own.clone()
    }

    /// The agent's action lock (the one its control scripts run under).
    pub fn lock(&self, name: &str) -> Arc<Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// A context whose control scripts get the agent's `envs`.
    pub fn ctx_for(&self, name: &str) -> Arc<Ctx> {
        let s = load_settings(&self.agent_dir(name));
        self.ctx_with(s.envs)
    }

    fn ctx_with(&self, envs: BTreeMap<String, String>) -> Arc<Ctx> {
        let b = &self.base;
        Arc::new(Ctx {
            workdir: b.workdir.clone(),
            fetcher: b.fetcher.clone(),
            control: b.control.clone(),
            status: b.status.clone(),
            start_timeout: b.start_timeout,
            keep_versions: b.keep_versions,
            retry: b.retry,
            shared: b.shared.clone(),
            envs,
            own: b.own.clone(),
        })
    }

    /// Notes a status read: returns the agent's uptime in seconds (0 when not running).
    /// An agent first seen running counts from that moment: the updater cannot know when
    /// a process it did not start began.
    pub fn uptime(&self, name: &str, running: bool) -> u64 {
        let mut m = self.since.lock().unwrap_or_else(|e| e.into_inner());
        if !running {
            m.remove(name);
            return 0;
        }
        let now = now_unix();
        let t = *m.entry(name.to_string()).or_insert(now);
        (now - t).max(0) as u64
    }

    fn started_now(&self, name: &str) {
        self.since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), now_unix());
    }

    /// The state reported upstream for a `control status` wire string.
    pub fn wire_state(status: &str) -> String {
        match status {
            proto::legacy::STATUS_STARTED => STATE_RUNNING.to_string(),
            s if proto::legacy::is_stopped_status(s) => STATE_STOPED.to_string(),
            other => other.to_string(),
        }
    }

    /// The installed current version, if `.version` names a folder that exists.
    fn current(&self, name: &str) -> Option<String> {
        let dir = self.agent_dir(name);
        fsx::read_version_file(&dir)
            .ok()
            .flatten()
            .filter(|v| proto::validate_version(v).is_ok() && dir.join(v).is_dir())
    }

    /// Runs one checked job (not `config`); `digests` from [`check`].
    pub async fn run(&self, job: &Job, digests: Option<JobDigests>) -> Outcome {
        let name = job.name.as_str();
        // Env vars and limits are set by install and may be updated by any later job.
        if !job.envs.is_empty() || !job.limits.is_empty() {
            if job.action == Action::Uninstall {
                // Nothing to keep them for.
            } else if let Err(e) = self.update_settings(name, job) {
                return (
                    ERR_FAILED,
                    format!("agent {name:?}: cannot save envs/limits: {e}"),
                );
            }
        }
        let out = match job.action {
            Action::Install | Action::Upgrade => {
                self.install(job, digests.unwrap_or_default()).await
            }
            Action::Stop => self.stop(name).await,
            Action::Restart => self.restart(name).await,
            Action::Uninstall => self.uninstall(name).await,
            Action::Config => (ERR_INVALID, "config jobs are not agent jobs".into()),
        };
        tracing::info!(job = %job.id, action = job.action.as_str(), agent = %name, errcode = out.0, message = %out.1, "job finished");
        out
    }

    fn update_settings(&self, name: &str, job: &Job) -> std::io::Result<()> {
        let dir = self.agent_dir(name);
        let mut s = load_settings(&dir);
        if !job.envs.is_empty() {
            s.envs = job.envs.clone();
        }
        if !job.limits.is_empty() {
            s.limits = job.limits.clone();
        }
        save_settings(&dir, &s)?;
        let limits = s.limits.clone();
        self.base.shared.agent(name, |v| v.limits = limits);
        Ok(())
    }

    async fn install(&self, job: &Job, digests: JobDigests) -> Outcome {
        let name = job.name.as_str();
        let version = job.version.as_str();
        let once = Oneshot::new(self.ctx_for(name), name, self.lock(name));
        let current = self.current(name);
        if current.as_deref() == Some(version) {
            // Installed already (a job run again after a restart, or a repeated order):
            // make sure it runs.
            let _g = once.lock().lock().await;
            return match once.status(version).await {
                AgentStatus::Started => {
                    (ERR_OK, format!("{name} {version} is installed and running"))
                }
                AgentStatus::Stopped => match once.start_and_check(version).await {
                    Ok(()) => {
                        self.started_now(name);
                        (
                            ERR_OK,
                            format!("{name} {version} was installed; started it"),
                        )
                    }
                    Err(e) => (ERR_FAILED, e),
                },
                AgentStatus::Error(e) => (
                    ERR_FAILED,
                    format!("{name} {version} is installed but its status is unreadable: {e}"),
                ),
            };
        }
        let d = Desired {
            name: name.to_string(),
            version: version.to_string(),
            cmd: Cmd::Start,
            tarball_url: job.url.clone(),
            // The job carries the digests (the MD5 of the `.md5` file among them, when the
            // server read one): nothing more is fetched to check the artifact.
            md5_url: String::new(),
            md5: digests.md5,
            sha256: digests.sha256,
        };
        match once.switch(&d, current.as_deref()).await {
            Ok(()) => {
                self.started_now(name);
                let from = current.map_or(String::new(), |c| format!(" (from {c})"));
                (
                    ERR_OK,
                    format!("{name} {version} installed and running{from}"),
                )
            }
            Err(OneshotFailure::Install(e)) => (ERR_FAILED, e),
            Err(OneshotFailure::Start(e)) => (ERR_ROLLED_BACK, e),
        }
    }

    async fn stop(&self, name: &str) -> Outcome {
        let Some(version) = self.current(name) else {
            return (ERR_OK, format!("{name} is not installed; nothing to stop"));
        };
        let ctx = self.ctx_for(name);
        let once = Oneshot::new(ctx.clone(), name, self.lock(name));
        let _g = once.lock().lock().await;
        if once.status(&version).await == AgentStatus::Stopped {
            return (ERR_OK, format!("{name} {version} was already stopped"));
        }
        let vdir = self.agent_dir(name).join(&version);
        if let Err(e) = control::control(&vdir, "stop", &ctx.envs, &ctx.control).await {
            return (ERR_FAILED, e.to_string());
        }
        match once.status(&version).await {
            AgentStatus::Stopped => {
                self.uptime(name, false);
                (ERR_OK, format!("{name} {version} stopped"))
            }
            st => (
                ERR_FAILED,
                format!("control stop succeeded but status is {:?}", st.wire()),
            ),
        }
    }

    async fn restart(&self, name: &str) -> Outcome {
        let Some(version) = self.current(name) else {
            return (
                ERR_FAILED,
                format!("{name} is not installed; nothing to restart"),
            );
        };
        let ctx = self.ctx_for(name);
        let once = Oneshot::new(ctx.clone(), name, self.lock(name));
        let _g = once.lock().lock().await;
        let vdir = self.agent_dir(name).join(&version);
        if let Err(e) = control::control(&vdir, "stop", &ctx.envs, &ctx.control).await {
            return (ERR_FAILED, format!("restart: {e}"));
        }
        match once.start_and_check(&version).await {
            Ok(()) => {
                self.started_now(name);
                (ERR_OK, format!("{name} {version} restarted"))
            }
            Err(e) => (ERR_FAILED, format!("restart: {e}")),
        }
    }

    /// Stops the agent, then removes its folder whole (every version, `.version`, settings):
    /// renamed to a hidden name first, so that a crash half-way leaves a folder that is no
    /// agent and is cleaned at the next start.
    async fn uninstall(&self, name: &str) -> Outcome {
        let lock = self.lock(name);
        let _g = lock.lock().await;
        // Checked under the lock, right before acting: only an agent's folder is removed,
        // never a file or folder that merely has a valid name (the updater's own config,
        // an operator's data).
        let dir = match self.base.check_agent(name) {
            Ok(dir) => dir,
            Err(crate::workdir::NotAgent::Missing { .. }) => {
                return (
                    ERR_OK,
                    format!("{name} is not installed; nothing to remove"),
                )
            }
            Err(e) => return (ERR_INVALID, format!("uninstall refused: {e}")),
        };
        if let Some(version) = self.current(name) {
            let ctx = self.ctx_for(name);
            let once = Oneshot::new(ctx.clone(), name, lock.clone());
            if once.status(&version).await != AgentStatus::Stopped {
                let vdir = dir.join(&version);
                if let Err(e) = control::control(&vdir, "stop", &ctx.envs, &ctx.control).await {
                    return (ERR_FAILED, format!("uninstall: {e}; nothing removed"));
                }
                let st = once.status(&version).await;
                if st != AgentStatus::Stopped {
                    return (
                        ERR_FAILED,
                        format!(
                            "uninstall: control stop succeeded but status is {:?}; nothing removed",
                            st.wire()
                        ),
                    );
                }
            }
        }
        self.uptime(name, false);
        let aside = self.workdir().join(format!(
            ".{name}{UNINSTALL_INFIX}{}",
            uuid::Uuid::new_v4().simple()
        ));
        let moved = std::fs::rename(&dir, &aside).and_then(|()| fsx::fsync_dir(self.workdir()));
        if let Err(e) = moved {
            return (
                ERR_FAILED,
                format!("uninstall: cannot move {}: {e}", dir.display()),
            );
        }
        if let Err(e) = std::fs::remove_dir_all(&aside) {
            tracing::warn!(agent = %name, dir = %aside.display(), error = %e, "cannot remove an uninstalled agent's folder; it is retried at the next start");
        }
        (ERR_OK, format!("{name} uninstalled"))
    }
}

/// Removes folders left by an `uninstall` that was interrupted: real folders named
/// `.<agent>.uninstall-<32 hex digits>`, the name [`Runner::uninstall`] gives an agent's
/// folder after checking it; nothing else of the workdir.
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

    fn job(action: Action) -> Job {
        Job {
            id: "j1".into(),
            action,
            name: "basic".into(),
            version: "1.0".into(),
            url: "http://127.0.0.1:1/basic-1.0.tar.gz".into(),
            checksum: format!("SHA256:{}", "A".repeat(64)),
            md5: String::new(),
            envs: BTreeMap::new(),
            limits: BTreeMap::new(),
            svrlist: String::new(),
            step: None,
        }
    }

    #[test]
    fn jobs_are_checked_before_anything_runs() {
        let sha_only = JobDigests {
            sha256: Some("a".repeat(64)),
            md5: None,
        };
        assert_eq!(check(&job(Action::Install), ""), Ok(Some(sha_only)));
        // While ops-meta knows no SHA-256 it sends the MD5 of the `.md5` file, and the MD5
        // beside a SHA-256 when it knows both: every digest sent is checked.
        let mut j = job(Action::Install);
        j.checksum = format!("md5:{}", "B".repeat(32));
        let md5_only = JobDigests {
            sha256: None,
            md5: Some("b".repeat(32)),
        };
        assert_eq!(check(&j, ""), Ok(Some(md5_only)));
        let mut j = job(Action::Install);
        j.md5 = "c".repeat(32);
        let both = JobDigests {
            sha256: Some("a".repeat(64)),
            md5: Some("c".repeat(32)),
        };
        assert_eq!(check(&j, ""), Ok(Some(both)));
        assert_eq!(check(&job(Action::Stop), ""), Ok(None));
        let bad = |f: &dyn Fn(&mut Job)| {
            let mut j = job(Action::Upgrade);
            f(&mut j);
            check(&j, "").unwrap_err()
        };
        assert!(bad(&|j| j.version.clear()).contains("has no version"));
        assert!(bad(&|j| j.version = "../1".into()).contains("version"));
        assert!(bad(&|j| j.name = "../etc".into()).contains("name"));
        assert!(bad(&|j| j.checksum.clear()).contains("refusing to install"));
        assert!(bad(&|j| j.checksum = "MD5:abc".into()).contains("checksum"));
        assert!(bad(&|j| j.checksum = format!("SHA1:{}", "a".repeat(40))).contains("checksum"));
        assert!(bad(&|j| j.md5 = "xyz".into()).contains("md5"));
        assert!(bad(&|j| {
            j.checksum = format!("MD5:{}", "a".repeat(32));
            j.md5 = "b".repeat(32);
        })
        .contains("disagree"));
        assert!(bad(&|j| j.url = "ftp://x/a.rpm".into()).contains("url"));
        assert!(bad(&|j| j.id.clear()).contains("job id"));
        assert!(bad(&|j| {
            j.envs.insert("A=B".into(), "x".into());
        })
        .contains("envs"));
        assert!(bad(&|j| {
            j.envs.insert("PATH".into(), "a\0b".into());
        })
        .contains("envs"));
        assert!(bad(&|j| {
            j.limits.insert("a\nb".into(), "1".into());
        })
        .contains("limits"));
        assert!(check(&job(Action::Stop), "other")
            .unwrap_err()
            .contains("desiredAgent"));

        let mut c = job(Action::Config);
        c.name.clear();
        assert!(check(&c, "").unwrap_err().contains("neither"));
        c.svrlist = "127.0.0.1:1,127.0.0.1:2,".into();
        assert_eq!(check(&c, ""), Ok(None));
        c.svrlist = "nohost".into();
        assert!(check(&c, "").unwrap_err().contains("svrlist"));
        c.svrlist.clear();
        c.step = Some(0);
        assert!(check(&c, "").unwrap_err().contains("step"));
        c.step = Some(30);
        assert_eq!(check(&c, ""), Ok(None));
        // The bounds are proto's, the ones ops-meta sends within (the updater took 1 s
        // to a week before the rule was shared).
        for (step, ok) in [(9, false), (10, true), (86_400, true), (86_401, false)] {
            c.step = Some(step);
            assert_eq!(check(&c, "").is_ok(), ok, "step {step}");
        }
        c.step = None;
        c.svrlist = "https://m.example:443, [::1]:2000".into();
        assert_eq!(check(&c, ""), Ok(None));
        c.svrlist = vec!["10.0.0.1:1"; 17].join(",");
        assert_eq!(check(&c, ""), Ok(None), "duplicates count once");
        c.svrlist = (1..=17)
            .map(|i| format!("10.0.0.{i}:1"))
            .collect::<Vec<_>>()
            .join(",");
        assert!(check(&c, "").unwrap_err().contains("the limit is 16"));
    }

    #[test]
    fn states_are_reported_in_bootagent_words() {
        assert_eq!(Runner::wire_state("started"), "running");
        assert_eq!(Runner::wire_state("stoped"), "stoped");
        assert_eq!(Runner::wire_state("stopped"), "stoped");
        assert_eq!(
            Runner::wire_state("control status: boom"),
            "control status: boom"
        );
    }

    #[test]
    fn settings_round_trip() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a");
        assert_eq!(load_settings(&d), Settings::default());
        let s = Settings {
            envs: [("PATH".to_string(), "/usr/bin".to_string())].into(),
            limits: [("CPU".to_string(), "10%".to_string())].into(),
        };
        save_settings(&d, &s).unwrap();
        assert_eq!(load_settings(&d), s);
        std::fs::write(d.join(SETTINGS_FILE), "garbage").unwrap();
        assert_eq!(load_settings(&d), Settings::default());
    }
}
