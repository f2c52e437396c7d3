//! Running BootAgent jobs on agents: checks every job before acting, then hands it to the
//! agent's actor in [`crate::engine`] as an order — the same actor, with the same install,
//! switch, rollback, start and stop, that serves the legacy answer.

use proto::bootagent::{Action, Checksum, Job};
use proto::legacy::Cmd;
use proto::names::{AgentName, Version};
use proto::rules;

use super::jobs::{ERR_FAILED, ERR_INVALID, ERR_OK, ERR_ROLLED_BACK, MAX_ID_LEN};
use crate::engine::{self, Desired, Done, Engine};

/// What a job ended with: `errcode` and `message` for the next report.
pub type Outcome = (i32, String);

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

/// The digests an install or upgrade job carries, checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobDigests {
    /// Lowercase hex SHA-256, from `checksum: SHA256:...`.
    pub sha256: Option<String>,
    /// Lowercase hex MD5, from `checksum: MD5:...` or the `md5` extension.
    pub md5: Option<String>,
}

/// A job that passed [`check`]: its names as checked types, which is all [`run`] builds
/// folders and URLs from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// The agent (every action but `config`).
    pub agent: Option<AgentName>,
    /// The version to install (install and upgrade).
    pub version: Option<Version>,
    /// The digests the artifact must have (install and upgrade).
    pub digests: Option<JobDigests>,
}

/// Checks a job before anything is done for it; `only` is the config's `desiredAgent`.
/// For install and upgrade, the digests are at least one of a SHA-256 or an MD5
/// (`checksum: MD5:...` is what ops-meta sends while it knows no SHA-256 of the artifact,
/// the same check the legacy path makes with the `.md5` file).
pub fn check(job: &Job, only: &str) -> Result<Checked, String> {
    let mut checked = Checked {
        agent: None,
        version: None,
        digests: None,
    };
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
        return Ok(checked);
    }
    checked.agent = Some(AgentName::parse(&job.name).map_err(|e| e.to_string())?);
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
        checked.version = Some(Version::parse(&job.version).map_err(|e| e.to_string())?);
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
        checked.digests = Some(digests);
    }
    Ok(checked)
}

fn cut64(s: &str) -> String {
    s.chars().take(64).collect()
}

/// What an install or upgrade job asks for, as a desired state. The job carries the
/// digests (the MD5 of the `.md5` file among them, when the server read one): nothing more
/// is fetched to check the artifact.
fn job_desired(job: &Job, name: AgentName, version: Version, d: JobDigests) -> Desired {
    Desired {
        name,
        version,
        cmd: Cmd::Start,
        tarball_url: job.url.clone(),
        md5_url: String::new(),
        md5: d.md5,
        sha256: d.sha256,
        envs: None,
        limits: None,
    }
}

/// Runs a checked job for ops-updater itself ([`proto::names::SELF_AGENT`]): install and
/// upgrade are its self-upgrade; nothing else applies to it. `None` while this worker
/// stops for the upgrade (the next worker answers the job).
pub async fn run_self(engine: &Engine, job: &Job, checked: Checked) -> Option<Outcome> {
    use crate::selfup::Outcome as S;
    let Some(selfup) = engine.ctx().selfup.clone() else {
        return Some((ERR_FAILED, "self-upgrade is not available here".into()));
    };
    if !matches!(job.action, Action::Install | Action::Upgrade) {
        return Some((
            ERR_INVALID,
            format!(
                "ops-updater manages itself: only install and upgrade apply to it, not {}",
                job.action.as_str()
            ),
        ));
    }
    let (Some(name), Some(version), Some(d)) = (checked.agent, checked.version, checked.digests)
    else {
        return Some((
            ERR_INVALID,
            "an install job needs a version and digests".into(),
        ));
    };
    let desired = job_desired(job, name, version.clone(), d);
    match selfup.job(desired, &job.id).await {
        S::Running { .. } => Some((ERR_OK, format!("ops-updater {version} is running"))),
        S::InProgress => None,
        S::Refused(why) | S::Failed(why) => Some((ERR_FAILED, rules::clean_message(&why))),
    }
}

/// Runs one checked job (not `config`) on its agent's actor; `checked` from [`check`].
pub async fn run(engine: &Engine, job: &Job, checked: Checked) -> Outcome {
    let Some(name) = checked.agent else {
        return (ERR_INVALID, "config jobs are not agent jobs".into());
    };
    let order = match job.action {
        Action::Install | Action::Upgrade => {
            let (Some(version), Some(d)) = (checked.version, checked.digests) else {
                return (
                    ERR_INVALID,
                    "an install job needs a version and digests".into(),
                );
            };
            engine::Job::Install(job_desired(job, name.clone(), version, d))
        }
        Action::Stop => engine::Job::Stop,
        Action::Restart => engine::Job::Restart,
        Action::Uninstall => engine::Job::Uninstall,
        Action::Reset => engine::Job::Reset,
        Action::Config => return (ERR_INVALID, "config jobs are not agent jobs".into()),
    };
    // Env vars and limits are set by install and may be updated by any later job (empty:
    // not given); an uninstall has nothing to keep them for.
    let keep = job.action != Action::Uninstall;
    let envs = (keep && !job.envs.is_empty()).then(|| job.envs.clone());
    let limits = (keep && !job.limits.is_empty()).then(|| job.limits.clone());
    let done = engine.agent(&name).job(order, envs, limits).await;
    let out = match done {
        Done::Ok(m) => (ERR_OK, m),
        Done::Failed(m) => (ERR_FAILED, m),
        Done::RolledBack(m) => (ERR_ROLLED_BACK, m),
        Done::Invalid(m) => (ERR_INVALID, m),
    };
    tracing::info!(job = %job.id, action = job.action.as_str(), agent = %name, errcode = out.0, message = %out.1, "job finished");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What [`check`] found of the digests (the part most cases are about).
    fn digests(job: &Job, only: &str) -> Result<Option<JobDigests>, String> {
        check(job, only).map(|c| c.digests)
    }
    use std::collections::BTreeMap;

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
        assert_eq!(digests(&job(Action::Install), ""), Ok(Some(sha_only)));
        // While ops-meta knows no SHA-256 it sends the MD5 of the `.md5` file, and the MD5
        // beside a SHA-256 when it knows both: every digest sent is checked.
        let mut j = job(Action::Install);
        j.checksum = format!("md5:{}", "B".repeat(32));
        let md5_only = JobDigests {
            sha256: None,
            md5: Some("b".repeat(32)),
        };
        assert_eq!(digests(&j, ""), Ok(Some(md5_only)));
        let mut j = job(Action::Install);
        j.md5 = "c".repeat(32);
        let both = JobDigests {
            sha256: Some("a".repeat(64)),
            md5: Some("c".repeat(32)),
        };
        assert_eq!(digests(&j, ""), Ok(Some(both)));
        assert_eq!(digests(&job(Action::Stop), ""), Ok(None));
        let bad = |f: &dyn Fn(&mut Job)| {
            let mut j = job(Action::Upgrade);
            f(&mut j);
            digests(&j, "").unwrap_err()
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
        assert!(digests(&job(Action::Stop), "other")
            .unwrap_err()
            .contains("desiredAgent"));

        let mut c = job(Action::Config);
        c.name.clear();
        assert!(digests(&c, "").unwrap_err().contains("neither"));
        c.svrlist = "127.0.0.1:1,127.0.0.1:2,".into();
        assert_eq!(digests(&c, ""), Ok(None));
        c.svrlist = "nohost".into();
        assert!(digests(&c, "").unwrap_err().contains("svrlist"));
        c.svrlist.clear();
        c.step = Some(0);
        assert!(digests(&c, "").unwrap_err().contains("step"));
        c.step = Some(30);
        assert_eq!(digests(&c, ""), Ok(None));
        // The bounds are proto's, the ones ops-meta sends within (the updater took 1 s
        // to a week before the rule was shared).
        for (step, ok) in [(9, false), (10, true), (86_400, true), (86_401, false)] {
            c.step = Some(step);
            assert_eq!(digests(&c, "").is_ok(), ok, "step {step}");
        }
        c.step = None;
        c.svrlist = "https://m.example:443, [::1]:2000".into();
        assert_eq!(digests(&c, ""), Ok(None));
        c.svrlist = vec!["10.0.0.1:1"; 17].join(",");
        assert_eq!(digests(&c, ""), Ok(None), "duplicates count once");
        c.svrlist = (1..=17)
            .map(|i| format!("10.0.0.{i}:1"))
            .collect::<Vec<_>>()
            .join(",");
        assert!(digests(&c, "").unwrap_err().contains("the limit is 16"));
    }
}
