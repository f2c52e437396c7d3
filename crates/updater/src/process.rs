//! Child processes: the one place they are built ([`command`]) and the one way they are run
//! ([`run`]): output captured with a cap, a timeout, and on timeout the whole process group
//! is stopped with SIGTERM and then SIGKILL.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Most bytes of stdout (and, separately, of stderr) kept from one run; the rest is read and
/// dropped so that a chatty child never blocks on a full pipe.
pub const MAX_OUTPUT_BYTES: usize = 64 * 1024;

/// How long, after the child exited, we keep reading its pipes. A script that starts a
/// daemon in the background (`nohup agent &`) without redirecting its output hands the pipe
/// to the daemon, so EOF may never come; what the script itself printed is already in the
/// pipe by the time it exits, so a short drain is enough.
pub const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(200);

/// The ONE place child processes are built: explicit cwd, env (inherited PATH etc. plus `envs`),
/// null stdin, piped stdout/stderr, kill_on_drop, own process group (`process_group(0)`).
///
/// The child leads its own process group so that a timeout can stop everything it started
/// (grandchildren included) with one `killpg`, without touching the updater itself.
#[allow(clippy::disallowed_methods)] // The one place the updater creates a child process.
pub fn command(
    program: &Path,
    args: &[&str],
    cwd: &Path,
    envs: &BTreeMap<String, String>,
) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(program);
    c.args(args)
        .current_dir(cwd)
        .envs(envs)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    c
}

/// What a finished child printed, and how it exited.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    /// Exit code; `None` when the child was ended by a signal.
    pub code: Option<i32>,
    /// Captured stdout (lossy UTF-8, at most [`MAX_OUTPUT_BYTES`]).
    pub stdout: String,
    /// Captured stderr (lossy UTF-8, at most [`MAX_OUTPUT_BYTES`]).
    pub stderr: String,
}

impl Output {
    /// True when the child exited with code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// stderr and stdout, trimmed and joined, for error messages: stderr first, since that
    /// is where scripts explain a failure.
    pub fn summary(&self) -> String {
        let parts: Vec<&str> = [self.stderr.trim(), self.stdout.trim()]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect();
        parts.join("; ")
    }
}

/// Why a child could not be run to completion.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot start {}: {source}", program.display())]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for {}: {source}", program.display())]
    Wait {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} timed out after {timeout:?} and was killed{}", program.display(), fmt_output(output))]
    Timeout {
        program: PathBuf,
        timeout: Duration,
        /// What the child printed before it was killed.
        output: Output,
    },
}

fn fmt_output(o: &Output) -> String {
    let s = o.summary();
    if s.is_empty() {
        String::new()
    } else {
        format!(" (output: {s})")
    }
}

type Buf = Arc<Mutex<Vec<u8>>>;

/// Reads `pipe` to EOF into `buf`, keeping at most [`MAX_OUTPUT_BYTES`].
async fn collect(mut pipe: impl AsyncRead + Unpin, buf: Buf) {
    let mut chunk = [0u8; 8192];
    loop {
        match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let mut b = buf.lock().unwrap_or_else(|e| e.into_inner());
                let room = MAX_OUTPUT_BYTES.saturating_sub(b.len());
                b.extend_from_slice(&chunk[..n.min(room)]);
            }
        }
    }
}

fn take(buf: &Buf) -> String {
    let b = buf.lock().unwrap_or_else(|e| e.into_inner());
    String::from_utf8_lossy(&b).into_owned()
}

/// Spawn, capture output (capped at [`MAX_OUTPUT_BYTES`] each), wait up to `timeout`; on
/// timeout SIGTERM the whole process group, then SIGKILL after `grace`, and return
/// [`ProcessError::Timeout`] with the output so far.
///
/// A child that exits normally keeps whatever it left running in the background (that is
/// what `control start` is for); only a timeout stops the group.
pub async fn run(
    mut cmd: tokio::process::Command,
    timeout: Duration,
    grace: Duration,
) -> Result<Output, ProcessError> {
    let program = PathBuf::from(cmd.as_std().get_program());
    // Registered until this function returns (or is dropped), so the reaper of orphaned
    // agents (`reaper::Reaper`) never reaps the child that `wait` below is for.
    let (mut child, _registered) =
        crate::reaper::spawn_registered(&mut cmd).map_err(|source| ProcessError::Spawn {
            program: program.clone(),
            source,
        })?;
    // The command may hold open files for the child alone (the `cgroup.procs` files of
    // `cgroup::AgentCgroup::attach`): closed here, now that the child has them.
    drop(cmd);
    // The child leads its own group (see `command`), so its pid is the group id.
    let pgid = child.id().map(|id| Pid::from_raw(id as i32));
    // If this future is dropped before the child exits (the caller gave up, the daemon is
    // shutting down), the whole group goes, not only the leader that kill_on_drop reaches.
    let mut guard = GroupGuard(pgid);

    let out: Buf = Arc::default();
    let err: Buf = Arc::default();
    let mut readers = Vec::new();
    if let Some(p) = child.stdout.take() {
        readers.push(tokio::spawn(collect(p, out.clone())));
    }
    if let Some(p) = child.stderr.take() {
        readers.push(tokio::spawn(collect(p, err.clone())));
    }

    let waited = tokio::time::timeout(timeout, child.wait()).await;
    let code = match waited {
        Ok(Ok(status)) => {
            // What a script leaves running after a normal exit is the agent itself.
            guard.0 = None;
            status.code()
        }
        Ok(Err(source)) => return Err(ProcessError::Wait { program, source }),
        Err(_elapsed) => {
            stop_group(&mut child, pgid, grace).await;
            guard.0 = None;
            drain(&mut readers).await;
            let output = Output {
                code: None,
                stdout: take(&out),
                stderr: take(&err),
            };
            return Err(ProcessError::Timeout {
                program,
                timeout,
                output,
            });
        }
    };
    drain(&mut readers).await;
    Ok(Output {
        code,
        stdout: take(&out),
        stderr: take(&err),
    })
}

/// SIGTERM to the group; after `grace` (or as soon as the whole group is gone), SIGKILL.
async fn stop_group(child: &mut tokio::process::Child, pgid: Option<Pid>, grace: Duration) {
    let Some(pg) = pgid else {
        let _ = child.kill().await;
        return;
    };
    let deadline = tokio::time::Instant::now() + grace;
    let _ = killpg(pg, Signal::SIGTERM);
    let _ = tokio::time::timeout_at(deadline, child.wait()).await;
    // Members other than the leader are not our children, so poll the group with signal 0
    // (no signal, only the existence check) until it is empty or the grace period is over.
    while tokio::time::Instant::now() < deadline && killpg(pg, None).is_ok() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Whatever ignored SIGTERM goes now: nothing a timed-out call started may outlive it.
    let _ = killpg(pg, Signal::SIGKILL);
    let _ = child.wait().await;
}

/// Kills the process group when dropped while armed (`Some`).
struct GroupGuard(Option<Pid>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pg) = self.0 {
            let _ = killpg(pg, Signal::SIGKILL);
        }
    }
}

/// The processes of a version folder: every process (but this one) whose working
/// directory or executable lies inside `dir`, found through `/proc`.
///
/// This is what "the old version's processes" means when its `control stop` failed. A
/// control script that daemonises (`nohup agent &`, a double fork, `setsid`) leaves its
/// agent in a process group and session of its own that the updater never learns; but
/// `control` runs with the version folder as its working directory, and whatever it starts
/// inherits that directory (or runs an executable from the folder) unless it moves away
/// on purpose. Zombies are left out: they no longer run.
pub fn processes_in(dir: &Path) -> Vec<Pid> {
    let Ok(dir) = dir.canonicalize() else {
        return Vec::new();
    };
    let me = std::process::id() as i32;
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let inside =
            |link: &str| std::fs::read_link(p.path().join(link)).is_ok_and(|t| t.starts_with(&dir));
        if (inside("cwd") || inside("exe")) && !is_zombie(pid) {
            out.push(Pid::from_raw(pid));
        }
    }
    out
}

/// True when `pid` is a zombie or gone: it no longer runs.
pub(crate) fn is_zombie(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s.rsplit(')').next().unwrap_or("").trim_start();
            state.starts_with('Z') || state.starts_with('X')
        }
        Err(_) => true,
    }
}

/// How long a SIGKILLed process may take to disappear from `/proc` (or turn zombie).
pub const KILL_SETTLE: Duration = Duration::from_millis(100);
/// How long, after that, the folder is watched for processes that come back.
pub const KILL_WATCH: Duration = Duration::from_secs(1);

/// Stops every process of `dir` ([`processes_in`]): SIGTERM, up to `grace` for them to
/// exit, SIGKILL to what is left; then, after [`KILL_SETTLE`], the folder is watched for
/// [`KILL_WATCH`], killing whatever is found. Returns the pids found during the watch:
/// processes that survived SIGKILL or came back (a supervisor outside the folder restarting
/// them). Empty means the folder runs nothing any more.
pub async fn stop_processes_in(dir: &Path, grace: Duration) -> Vec<i32> {
    let signal_all = |sig| {
        let found = processes_in(dir);
        for pid in &found {
            let _ = nix::sys::signal::kill(*pid, sig);
        }
        found
    };
    let poll = Duration::from_millis(20);
    signal_all(Signal::SIGTERM);
    let deadline = tokio::time::Instant::now() + grace;
    while tokio::time::Instant::now() < deadline && !processes_in(dir).is_empty() {
        tokio::time::sleep(poll).await;
    }
    signal_all(Signal::SIGKILL);
    tokio::time::sleep(KILL_SETTLE).await;
    let deadline = tokio::time::Instant::now() + KILL_WATCH;
    let mut survivors = Vec::new();
    loop {
        for pid in signal_all(Signal::SIGKILL) {
            if !survivors.contains(&pid.as_raw()) {
                survivors.push(pid.as_raw());
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return survivors;
        }
        tokio::time::sleep(poll).await;
    }
}

/// Gives the pipe readers [`DRAIN_AFTER_EXIT`] to reach EOF. Readers still running after
/// that (a background process holds the pipe) are left to read and discard until EOF:
/// closing our end instead would kill that process with SIGPIPE at its next write.
async fn drain(readers: &mut [tokio::task::JoinHandle<()>]) {
    let _ = tokio::time::timeout(DRAIN_AFTER_EXIT, async {
        for r in readers.iter_mut() {
            let _ = r.await;
        }
    })
    .await;
}

/// The worker process of the self-upgrade supervisor ([`crate::selfup::supervisor`]):
/// `program` with `args`, inheriting stdin/stdout/stderr, with `listen_fd` (the local
/// endpoint's socket, which the supervisor keeps open across workers) as fd 3, and dying
/// with the supervisor (`PR_SET_PDEATHSIG` `SIGKILL`, checked against a supervisor that
/// died before it was set), as a single process would under `kill -9`.
#[allow(clippy::disallowed_methods)] // The supervisor's worker: not a control script.
#[allow(unsafe_code)] // `pre_exec`: see the SAFETY note.
pub fn worker_command(
    program: &Path,
    args: &[std::ffi::OsString],
    envs: &[(&str, String)],
    listen_fd: Option<std::os::fd::RawFd>,
) -> tokio::process::Command {
    use std::os::unix::process::CommandExt as _;
    let mut c = std::process::Command::new(program);
    c.args(args);
    for (k, v) in envs {
        c.env(k, v);
    }
    let parent = nix::unistd::getpid();
    // SAFETY: only async-signal-safe calls (prctl, getppid, dup2, fcntl, _exit) between
    // fork and exec.
    unsafe {
        c.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent.as_raw() {
                libc::_exit(1);
            }
            if let Some(fd) = listen_fd {
                if fd == WORKER_LISTEN_FD {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(fd, WORKER_LISTEN_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    tokio::process::Command::from(c)
}

/// A plain blocking child with stdin from /dev/null, for the take-over's one-shot steps
/// (`selfup::takeover`), which run before any runtime exists.
#[allow(clippy::disallowed_methods)] // One of the places children are built.
pub fn std_command(program: &Path) -> std::process::Command {
    let mut c = std::process::Command::new(program);
    c.stdin(Stdio::null());
    c
}

/// The fd a worker finds the local endpoint's listening socket at.
pub const WORKER_LISTEN_FD: std::os::fd::RawFd = 3;

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str, dir: &Path) -> tokio::process::Command {
        command(
            Path::new("/bin/sh"),
            &["-c", script],
            dir,
            &BTreeMap::from([("GREETING".to_string(), "hello".to_string())]),
        )
    }

    #[tokio::test]
    async fn captures_output_code_cwd_and_env() {
        let d = tempfile::tempdir().unwrap();
        let o = run(
            sh("echo $GREETING; pwd; echo oops >&2; exit 3", d.path()),
            Duration::from_secs(10),
            Duration::from_secs(1),
        )
        .await
        .unwrap();
        assert_eq!(o.code, Some(3));
        let cwd = d.path().canonicalize().unwrap();
        assert_eq!(o.stdout, format!("hello\n{}\n", cwd.display()));
        assert_eq!(o.stderr, "oops\n");
        assert_eq!(o.summary(), format!("oops; hello\n{}", cwd.display()));
    }

    #[tokio::test]
    async fn stdin_is_null() {
        let d = tempfile::tempdir().unwrap();
        let o = run(
            sh("cat; echo done", d.path()),
            Duration::from_secs(10),
            Duration::from_secs(1),
        )
        .await
        .unwrap();
        assert_eq!(o.stdout, "done\n");
    }

    #[tokio::test]
    async fn output_is_capped() {
        let d = tempfile::tempdir().unwrap();
        let o = run(
            sh("head -c 300000 /dev/zero | tr '\\0' a", d.path()),
            Duration::from_secs(10),
            Duration::from_secs(1),
        )
        .await
        .unwrap();
        assert!(o.success());
        assert_eq!(o.stdout.len(), MAX_OUTPUT_BYTES);
    }

    /// A script that backgrounds a process which keeps the stdout pipe open must still
    /// return once the script itself exits, and the background process must survive.
    #[tokio::test]
    async fn background_child_holding_the_pipe_does_not_block() {
        let d = tempfile::tempdir().unwrap();
        let o = run(
            sh("sleep 30 & echo $! > bg.pid; echo started", d.path()),
            Duration::from_secs(10),
            Duration::from_secs(1),
        )
        .await
        .unwrap();
        assert_eq!(o.stdout, "started\n");
        let pid: i32 = std::fs::read_to_string(d.path().join("bg.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Still alive: a normal exit leaves what the script started running.
        assert!(nix::sys::signal::kill(Pid::from_raw(pid), None).is_ok());
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
    }

    /// A hung child is killed at the timeout together with everything it started.
    #[tokio::test]
    async fn timeout_kills_the_whole_process_group() {
        let d = tempfile::tempdir().unwrap();
        let e = run(
            sh(
                // The grandchild ignores SIGTERM, so only the group SIGKILL ends it.
                "echo before; (trap '' TERM; sleep 60) & echo $! > gc.pid; wait",
                d.path(),
            ),
            Duration::from_secs(1),
            Duration::from_millis(300),
        )
        .await
        .unwrap_err();
        match &e {
            ProcessError::Timeout { output, .. } => assert_eq!(output.stdout, "before\n"),
            other => panic!("want timeout, got {other:?}"),
        }
        assert!(e.to_string().contains("timed out"), "{e}");
        let pid: i32 = std::fs::read_to_string(d.path().join("gc.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        test_support::wait_for("grandchild to die", Duration::from_secs(10), || {
            // Zombies are reaped by init; a dead or zombie pid both mean it stopped running.
            !is_running(pid)
        });
    }

    /// Dropping `run` (a caller that gave up) takes the whole group down too.
    #[tokio::test]
    async fn dropping_the_run_kills_the_group() {
        let d = tempfile::tempdir().unwrap();
        let pid_file = d.path().join("gc.pid");
        let run_it = run(
            sh(
                "(trap '' TERM; sleep 60) & echo $! > gc.pid.tmp; mv gc.pid.tmp gc.pid; wait",
                d.path(),
            ),
            Duration::from_secs(60),
            Duration::from_secs(1),
        );
        tokio::select! {
            r = run_it => panic!("finished early: {r:?}"),
            () = async {
                while !pid_file.exists() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            } => {}
        }
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        test_support::wait_for("grandchild to die", Duration::from_secs(10), || {
            !is_running(pid)
        });
    }

    /// A background process that keeps writing to the inherited stdout must not be killed
    /// by SIGPIPE once the script has returned.
    #[tokio::test]
    async fn background_writer_survives_after_the_script_returns() {
        let d = tempfile::tempdir().unwrap();
        let o = run(
            sh(
                "(while :; do echo tick; date +%s%N > alive; sleep 0.05; done) & echo $! > bg.pid; echo started",
                d.path(),
            ),
            Duration::from_secs(10),
            Duration::from_secs(1),
        )
        .await
        .unwrap();
        assert!(o.stdout.contains("started"), "{o:?}");
        let pid: i32 = std::fs::read_to_string(d.path().join("bg.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let alive = d.path().join("alive");
        let mut seen = Vec::new();
        test_support::wait_for(
            "the writer to keep writing",
            Duration::from_secs(10),
            || {
                if let Ok(s) = std::fs::read_to_string(&alive) {
                    if seen.last() != Some(&s) {
                        seen.push(s);
                    }
                }
                // Several fresh writes after our drain window closed.
                seen.len() >= 8
            },
        );
        assert!(is_running(pid));
        let pg = nix::unistd::getpgid(Some(Pid::from_raw(pid))).unwrap();
        let _ = killpg(pg, Signal::SIGKILL);
    }

    fn is_running(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(s) => {
                let state = s.rsplit(')').next().unwrap_or("").trim_start();
                !state.starts_with('Z') && !state.starts_with('X')
            }
            Err(_) => false,
        }
    }

    #[tokio::test]
    async fn the_processes_of_a_folder_are_found_and_stopped_however_they_detached() {
        let d = tempfile::tempdir().unwrap();
        let o = run(
            sh(
                // One ignores SIGTERM, one left its process group and session.
                "(trap '' TERM; while :; do sleep 1; done) >/dev/null 2>&1 & echo $! > a.pid; \
                 setsid sh -c 'while :; do sleep 1; done' >/dev/null 2>&1 & echo started",
                d.path(),
            ),
            Duration::from_secs(10),
            Duration::from_secs(1),
        )
        .await
        .unwrap();
        assert_eq!(o.stdout, "started\n");
        test_support::wait_for("both to run", Duration::from_secs(10), || {
            processes_in(d.path()).len() >= 2
        });
        let left = stop_processes_in(d.path(), Duration::from_millis(200)).await;
        assert!(left.is_empty(), "{left:?}");
        assert!(processes_in(d.path()).is_empty());
    }

    #[tokio::test]
    async fn missing_program_is_a_spawn_error() {
        let d = tempfile::tempdir().unwrap();
        let e = run(
            command(&d.path().join("nope"), &[], d.path(), &BTreeMap::new()),
            Duration::from_secs(1),
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, ProcessError::Spawn { .. }), "{e:?}");
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
