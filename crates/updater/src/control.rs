//! The agent's `control` script: `start`, `stop` and `status`, each run with a timeout in
//! the version folder, with its output captured into the log and into any error.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::process::{self, Output, ProcessError};

/// File name of the script at the root of every version folder.
pub const CONTROL: &str = "control";

/// What `control status` says about an agent, as reported upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentStatus {
    Started,
    Stopped,
    /// anything else: the error text reported upstream
    Error(String),
}

impl AgentStatus {
    /// The string sent in a heartbeat: `started`, `stoped` (the original's spelling) or the
    /// error text.
    pub fn wire(&self) -> String {
        match self {
            AgentStatus::Started => proto::legacy::STATUS_STARTED.to_string(),
            AgentStatus::Stopped => proto::legacy::STATUS_STOPED.to_string(),
            AgentStatus::Error(text) => text.clone(),
        }
    }

    /// Reads the trimmed output of `control status`.
    pub fn parse(stdout: &str) -> AgentStatus {
        let s = stdout.trim();
        if s == proto::legacy::STATUS_STARTED {
            AgentStatus::Started
        } else if proto::legacy::is_stopped_status(s) {
            AgentStatus::Stopped
        } else if s.is_empty() {
            AgentStatus::Error("control status: no output".to_string())
        } else {
            AgentStatus::Error(s.to_string())
        }
    }
}

/// How control scripts are run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlConfig {
    /// Longest a single control call may take before its process group is stopped.
    pub timeout: Duration,
    /// After SIGTERM at the timeout, how long before SIGKILL.
    pub grace: Duration,
}

/// Default for [`ControlConfig::timeout`].
pub const fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

/// Default for [`ControlConfig::grace`].
pub const fn default_grace() -> Duration {
    Duration::from_secs(5)
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            timeout: default_timeout(),
            grace: default_grace(),
        }
    }
}

/// Why a control call failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{}: missing or not executable", path.display())]
    Missing { path: PathBuf },
    #[error("control {action} in {} exited with {}{}", dir.display(), fmt_code(*code), fmt_summary(output))]
    Failed {
        dir: PathBuf,
        action: String,
        /// Exit code; `None` when the script was ended by a signal.
        code: Option<i32>,
        output: Output,
    },
    #[error("control {action} in {}: {source}", dir.display())]
    Process {
        dir: PathBuf,
        action: String,
        #[source]
        source: ProcessError,
    },
    #[error("control {action} in {}: cannot join the agent's cgroup: {source}", dir.display())]
    Cgroup {
        dir: PathBuf,
        action: String,
        #[source]
        source: std::io::Error,
    },
}

fn fmt_code(code: Option<i32>) -> String {
    match code {
        Some(c) => format!("code {c}"),
        None => "a signal".to_string(),
    }
}

fn fmt_summary(o: &Output) -> String {
    let s = o.summary();
    if s.is_empty() {
        String::new()
    } else {
        format!(": {s}")
    }
}

/// True when `path` is a regular file (after following links) with an execute bit.
pub fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Runs `<version_dir>/control <action>` with cwd = version_dir. Non-zero exit => ControlError::Failed
/// carrying exit code + stderr/stdout. Missing/non-executable control => ControlError::Missing.
///
/// With `cg`, the script joins the agent's cgroup before its first instruction, so that
/// whatever it starts inherits the agent's limits and is tracked.
pub async fn control(
    version_dir: &Path,
    action: &str,
    envs: &BTreeMap<String, String>,
    cg: Option<&crate::cgroup::AgentCgroup>,
    cfg: &ControlConfig,
) -> Result<Output, ControlError> {
    let script = version_dir.join(CONTROL);
    if !is_executable(&script) {
        return Err(ControlError::Missing { path: script });
    }
    let mut cmd = process::command(&script, &[action], version_dir, envs);
    if let Some(cg) = cg {
        cg.attach(&mut cmd).map_err(|source| ControlError::Cgroup {
            dir: version_dir.to_path_buf(),
            action: action.to_string(),
            source,
        })?;
    }
    let dir = version_dir.display();
    match process::run(cmd, cfg.timeout, cfg.grace).await {
        Ok(output) => {
            tracing::debug!(
                dir = %dir, action, code = ?output.code,
                stdout = %output.stdout.trim(), stderr = %output.stderr.trim(),
                "control finished"
            );
            if output.success() {
                Ok(output)
            } else {
                tracing::warn!(
                    dir = %dir, action, code = ?output.code,
                    output = %output.summary(), "control failed"
                );
                Err(ControlError::Failed {
                    dir: version_dir.to_path_buf(),
                    action: action.to_string(),
                    code: output.code,
                    output,
                })
            }
        }
        Err(source) => {
            tracing::warn!(dir = %dir, action, error = %source, "control did not finish");
            Err(ControlError::Process {
                dir: version_dir.to_path_buf(),
                action: action.to_string(),
                source,
            })
        }
    }
}

/// `control status`: trimmed stdout "started" => Started, "stoped"/"stopped" => Stopped,
/// else Error(text); a failed/hung script => Error("control status: <reason>") (never panics,
/// never hangs past timeout).
///
/// Many init-style scripts exit non-zero from `status` when the service is down (LSB uses
/// 3) while still printing the word; such an answer is taken at its word.
pub async fn status(
    version_dir: &Path,
    envs: &BTreeMap<String, String>,
    cg: Option<&crate::cgroup::AgentCgroup>,
    cfg: &ControlConfig,
) -> AgentStatus {
    match control(version_dir, "status", envs, cg, cfg).await {
        Ok(out) => AgentStatus::parse(&out.stdout),
        Err(ControlError::Failed { output, code, .. }) => {
            match AgentStatus::parse(&output.stdout) {
                s @ (AgentStatus::Started | AgentStatus::Stopped) => s,
                AgentStatus::Error(_) => AgentStatus::Error(format!(
                    "control status: exited with {}{}",
                    fmt_code(code),
                    fmt_summary(&output)
                )),
            }
        }
        Err(e @ ControlError::Missing { .. }) => AgentStatus::Error(format!("control status: {e}")),
        Err(ControlError::Process { source, .. }) => {
            AgentStatus::Error(format!("control status: {source}"))
        }
        Err(e @ ControlError::Cgroup { .. }) => AgentStatus::Error(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_support::agent::{control_script, Behaviour};

    fn fast() -> ControlConfig {
        ControlConfig {
            // Generous: only a broken test waits this long.
            timeout: Duration::from_secs(10),
            grace: Duration::from_millis(300),
        }
    }

    fn install_script(dir: &Path, body: &str) {
        let p = dir.join(CONTROL);
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn pid_in(dir: &Path, file: &str) -> i32 {
        std::fs::read_to_string(dir.join(file))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    fn alive(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(s) => {
                let state = s.rsplit(')').next().unwrap_or("").trim_start();
                !state.starts_with('Z') && !state.starts_with('X')
            }
            Err(_) => false,
        }
    }

    fn kill(pid: i32) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }

    #[test]
    fn status_words() {
        let check = |input: &str, want: AgentStatus| {
            assert_eq!(AgentStatus::parse(input), want, "input {input:?}");
        };
        check("started\n", AgentStatus::Started);
        check("  stoped ", AgentStatus::Stopped);
        check("stopped", AgentStatus::Stopped);
        check(
            "crashed: no pid",
            AgentStatus::Error("crashed: no pid".into()),
        );
        check("", AgentStatus::Error("control status: no output".into()));
        assert_eq!(AgentStatus::Stopped.wire(), "stoped");
        assert_eq!(AgentStatus::Started.wire(), "started");
        assert_eq!(AgentStatus::Error("x".into()).wire(), "x");
    }

    #[tokio::test]
    async fn fake_agent_start_status_stop() {
        let d = tempfile::tempdir().unwrap();
        install_script(d.path(), &control_script("a", "1.0.0", Behaviour::Good));
        let envs = BTreeMap::from([("AGENT_ENV".to_string(), "prod".to_string())]);
        assert_eq!(
            status(d.path(), &envs, None, &fast()).await,
            AgentStatus::Stopped
        );
        let out = control(d.path(), "start", &envs, None, &fast())
            .await
            .unwrap();
        assert_eq!(out.stdout.trim(), "started");
        let pid = pid_in(d.path(), "app.pid");
        assert_eq!(
            status(d.path(), &envs, None, &fast()).await,
            AgentStatus::Started
        );
        control(d.path(), "stop", &envs, None, &fast())
            .await
            .unwrap();
        assert_eq!(
            status(d.path(), &envs, None, &fast()).await,
            AgentStatus::Stopped
        );
        test_support::wait_for("agent to stop", Duration::from_secs(10), || !alive(pid));
        let log = std::fs::read_to_string(d.path().join("control.log")).unwrap();
        assert!(log.contains("start 1.0.0 AGENT_ENV=prod"), "{log}");
    }

    /// `control start` that leaves a daemon holding stdout/stderr (no redirection) must
    /// return as soon as the script exits, not when the daemon closes the pipe.
    #[tokio::test]
    async fn start_returns_while_a_background_daemon_holds_the_pipe() {
        let d = tempfile::tempdir().unwrap();
        install_script(
            d.path(),
            "#!/bin/sh\nsleep 60 &\necho $! > daemon.pid\necho started\n",
        );
        let out = control(d.path(), "start", &BTreeMap::new(), None, &fast())
            .await
            .unwrap();
        let pid = pid_in(d.path(), "daemon.pid");
        assert_eq!(out.stdout, "started\n");
        // Waiting for EOF would have run into the timeout and failed the call above.
        assert!(alive(pid), "the daemon must survive a successful start");
        kill(pid);
    }

    #[tokio::test]
    async fn failure_carries_code_and_output() {
        let d = tempfile::tempdir().unwrap();
        install_script(
            d.path(),
            &control_script("a", "1.0.0", Behaviour::StartFails),
        );
        let e = control(d.path(), "start", &BTreeMap::new(), None, &fast())
            .await
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, ControlError::Failed { code: Some(1), .. }),
            "{e:?}"
        );
        assert!(msg.contains("cannot start: port in use"), "{msg}");
        assert!(msg.contains("control start in"), "{msg}");
    }

    #[tokio::test]
    async fn hung_status_is_killed_with_its_process_group() {
        let d = tempfile::tempdir().unwrap();
        install_script(
            d.path(),
            "#!/bin/sh\necho checking\n(trap '' TERM; sleep 60) &\necho $! > child.pid\nwait\n",
        );
        let cfg = ControlConfig {
            timeout: Duration::from_secs(1),
            grace: Duration::from_millis(200),
        };
        let st = status(d.path(), &BTreeMap::new(), None, &cfg).await;
        match &st {
            AgentStatus::Error(text) => {
                assert!(text.starts_with("control status: "), "{text}");
                assert!(text.contains("timed out"), "{text}");
                assert!(text.contains("checking"), "{text}");
            }
            other => panic!("want an error status, got {other:?}"),
        }
        let child = pid_in(d.path(), "child.pid");
        test_support::wait_for("the script's child to die", Duration::from_secs(10), || {
            !alive(child)
        });
    }

    #[tokio::test]
    async fn status_hangs_behaviour_of_the_fake_agent_times_out() {
        let d = tempfile::tempdir().unwrap();
        install_script(
            d.path(),
            &control_script("a", "1.0.0", Behaviour::StatusHangs),
        );
        let cfg = ControlConfig {
            timeout: Duration::from_millis(300),
            grace: Duration::from_millis(100),
        };
        let st = status(d.path(), &BTreeMap::new(), None, &cfg).await;
        assert!(
            matches!(&st, AgentStatus::Error(t) if t.contains("timed out")),
            "{st:?}"
        );
    }

    #[tokio::test]
    async fn missing_or_non_executable_control() {
        let d = tempfile::tempdir().unwrap();
        let e = control(d.path(), "start", &BTreeMap::new(), None, &fast())
            .await
            .unwrap_err();
        assert!(matches!(e, ControlError::Missing { .. }), "{e:?}");
        std::fs::write(d.path().join(CONTROL), "#!/bin/sh\necho started\n").unwrap();
        let st = status(d.path(), &BTreeMap::new(), None, &fast()).await;
        assert!(
            matches!(&st, AgentStatus::Error(t) if t.contains("not executable")),
            "{st:?}"
        );
    }

    #[tokio::test]
    async fn status_failing_with_garbage_is_an_error_but_a_word_is_believed() {
        let d = tempfile::tempdir().unwrap();
        install_script(d.path(), "#!/bin/sh\necho 'boom' >&2\nexit 4\n");
        let st = status(d.path(), &BTreeMap::new(), None, &fast()).await;
        assert_eq!(
            st,
            AgentStatus::Error("control status: exited with code 4: boom".into())
        );
        install_script(d.path(), "#!/bin/sh\necho stopped\nexit 3\n");
        assert_eq!(
            status(d.path(), &BTreeMap::new(), None, &fast()).await,
            AgentStatus::Stopped
        );
    }
}
