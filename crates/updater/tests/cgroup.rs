//! Per-agent cgroups for real, as root: v1 (attach, OOM kill at a memory limit, a CPU
//! limit holding a busy loop, kill_all, removal) and v2 on a cgroup2 mount (tracking,
//! a crash seen by `wait_empty` in well under a second, `cgroup.kill`, and why limits
//! are not enforced when the mount has no controllers).
//!
//! Each test makes its cgroups under a parent of its own (`ops-updater-test-<pid>-<n>`)
//! and a guard removes them, with whatever runs in them, even when the test fails. What
//! the machine cannot give (not root, no such hierarchy) skips a test with the reason on
//! stderr, and fails it when `CI` is set: CI runs where these are expected to work.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use proto::limits::Limits;
use updater::cgroup::{AgentCgroup, CgroupRoot, Cgroups, Mounts, Version};
use updater::process;

fn falcon() -> proto::names::AgentName {
    proto::names::AgentName::parse("falcon").unwrap()
}
use updater::reaper::{Exit, Reaper};

/// True (after saying why) when the test cannot run here; panics instead under CI.
fn cannot_run(why: &str) -> bool {
    if std::env::var_os("CI").is_some() {
        panic!("this test must run in CI but cannot: {why}");
    }
    eprintln!("skipped: {why}");
    true
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn unique_parent() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "ops-updater-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Removes the test's cgroup folders on drop: every process in them is killed, the agent
/// folders and then the parent folders are removed (each given two seconds to empty).
struct Cleanup {
    parents: Vec<PathBuf>,
    unmount: Option<PathBuf>,
    /// The folder of a mount made for the test; removed after the unmount in `drop`.
    _mount_dir: Option<tempfile::TempDir>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for parent in &self.parents {
            test_support::cgroups::remove_tree(parent);
        }
        if let Some(m) = &self.unmount {
            let _ = nix::mount::umount(m);
        }
    }
}

/// The one reaper of this test process (a process has one set of children), on a
/// runtime of its own that outlives the tests'.
fn reaper() -> Reaper {
    static REAPER: OnceLock<Reaper> = OnceLock::new();
    REAPER
        .get_or_init(|| {
            updater::reaper::enable().expect("PR_SET_CHILD_SUBREAPER");
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    tx.send(Reaper::spawn()).unwrap();
                    std::future::pending::<()>().await
                })
            });
            rx.recv().unwrap()
        })
        .clone()
}

fn sh_in(cg: &AgentCgroup, script: &str, dir: &Path) -> tokio::process::Command {
    let mut cmd = process::command(Path::new("/bin/sh"), &["-c", script], dir, &BTreeMap::new());
    cg.attach(&mut cmd).expect("attach");
    cmd
}

/// Runs `script` as a `control start` would, in `cg`, and returns its output.
async fn start_in(cg: &AgentCgroup, script: &str, dir: &Path) -> process::Output {
    process::run(
        sh_in(cg, script, dir),
        Duration::from_secs(30),
        Duration::from_secs(1),
    )
    .await
    .expect("script runs")
}

/// Polls `f` every 10 ms on the test's runtime until it yields, for at most `timeout`.
async fn wait_some<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn read_pid(file: &Path) -> Option<i32> {
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

fn parent_of(pid: i32) -> Option<i32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s[s.rfind(')')? + 1..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The `/proc/PID/cgroup` line of the hierarchy whose controllers include `controller`
/// (`""` for the v2 line `0::/path`): its path.
fn cgroup_of(pid: i32, controller: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, cs, path) = (parts.next()?, parts.next()?, parts.next()?);
        let hit = if controller.is_empty() {
            cs.is_empty()
        } else {
            cs.split(',').any(|c| c == controller)
        };
        hit.then(|| path.to_string())
    })
}

/// The v1 cgroups of this machine under a fresh parent, or `None` (after saying why).
fn v1() -> Option<(Cgroups, Cleanup)> {
    if !is_root() {
        cannot_run("cgroup v1 tests need root");
        return None;
    }
    let parent = unique_parent();
    let cg = Cgroups::detect(&parent);
    let cleanup = Cleanup {
        parents: cg.parent_dirs(),
        unmount: None,
        _mount_dir: None,
    };
    if cg.version() != Some(Version::V1) {
        cannot_run(&format!(
            "no writable cgroup v1 hierarchies: {}",
            cg.describe()
        ));
        return None;
    }
    Some((cg, cleanup))
}

fn limits(cpu: Option<&str>, memory: Option<&str>) -> Limits {
    let mut m = BTreeMap::new();
    if let Some(c) = cpu {
        m.insert("CPU".to_string(), c.to_string());
    }
    if let Some(v) = memory {
        m.insert("memory".to_string(), v.to_string());
    }
    proto::limits::parse_limits(&m).unwrap()
}

#[tokio::test]
async fn v1_a_shell_and_what_it_forks_are_in_the_agent_cgroup_until_kill_all() {
    let Some((cg, _cleanup)) = v1() else { return };
    let d = tempfile::tempdir().unwrap();
    let agent = cg.agent(&falcon(), &Limits::default());
    assert!(agent.is_tracked(), "{}", agent.describe());
    assert_eq!(agent.not_enforced(), None);
    eprintln!("{}\n{}", cg.describe(), agent.describe());

    // A script that forks a child and stays, so both can be looked at.
    let cmd = sh_in(
        &agent,
        "sleep 300 & echo $! > child.pid; echo $$ > sh.pid; wait",
        d.path(),
    );
    let run = tokio::spawn(process::run(
        cmd,
        Duration::from_secs(60),
        Duration::from_secs(1),
    ));
    let (sh, child) = wait_some("both pids", Duration::from_secs(10), || {
        Some((
            read_pid(&d.path().join("sh.pid"))?,
            read_pid(&d.path().join("child.pid"))?,
        ))
    })
    .await;
    let want = format!(
        "/{}/falcon",
        cg.parent_dirs()[0].file_name().unwrap().to_str().unwrap()
    );
    for pid in [sh, child] {
        for controller in ["cpu", "memory", "pids"] {
            assert_eq!(
                cgroup_of(pid, controller).as_deref(),
                Some(want.as_str()),
                "pid {pid}, {controller}"
            );
        }
    }
    let mut procs = agent.procs().unwrap();
    procs.sort();
    let mut both = vec![sh, child];
    both.sort();
    assert_eq!(procs, both);
    assert!(agent.populated().unwrap());

    let left = agent.kill_all(Duration::from_millis(500)).await;
    assert!(left.is_empty(), "{left:?}");
    assert!(!agent.populated().unwrap());
    let out = run.await.unwrap().unwrap();
    assert_eq!(out.code, None, "the script was killed: {out:?}");
    agent.remove().unwrap();
    for p in agent.paths() {
        assert!(!p.exists(), "{}", p.display());
    }
}

#[tokio::test]
async fn v1_an_agent_over_its_memory_limit_is_oom_killed_and_that_is_seen() {
    let Some((cg, _cleanup)) = v1() else { return };
    let reaper = reaper();
    let d = tempfile::tempdir().unwrap();
    let agent = cg.agent(&falcon(), &limits(None, Some("20M")));
    assert_eq!(agent.not_enforced(), None);
    let mem_dir = agent
        .paths()
        .into_iter()
        .find(|p| p.join("memory.limit_in_bytes").exists())
        .expect("a memory cgroup")
        .to_path_buf();
    assert_eq!(
        std::fs::read_to_string(mem_dir.join("memory.limit_in_bytes"))
            .unwrap()
            .trim(),
        "20971520"
    );
    let oom_before = agent.oom_kills();

    // The agent is daemonised (the script exits at once) and allocates 200 MiB once the
    // test has seen it reparented here: `dd` fills a 200 MiB buffer from /dev/zero.
    let out = start_in(
        &agent,
        "(while [ ! -e go ]; do sleep 0.02; done; exec dd if=/dev/zero of=/dev/null bs=200M count=1) \
         >/dev/null 2>&1 & echo $! > agent.pid",
        d.path(),
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let pid = read_pid(&d.path().join("agent.pid")).unwrap();
    let me = std::process::id() as i32;
    wait_some(
        "the agent to be reparented to us",
        Duration::from_secs(10),
        || (parent_of(pid)? == me).then_some(()),
    )
    .await;
    assert!(agent.procs().unwrap().contains(&pid));
    std::fs::write(d.path().join("go"), "").unwrap();

    let exit = wait_some("the agent's exit", Duration::from_secs(30), || {
        reaper.exit_of(pid)
    })
    .await;
    assert_eq!(
        exit,
        Exit::Signal {
            signal: 9,
            core: false
        },
        "{exit}"
    );
    assert!(
        agent.oom_kills() > oom_before,
        "oom_kills {} -> {}",
        oom_before,
        agent.oom_kills()
    );
    tokio::time::timeout(Duration::from_secs(5), agent.wait_empty())
        .await
        .expect("empty after the kill");
    assert!(agent.kill_all(Duration::from_millis(100)).await.is_empty());
    agent.remove().unwrap();
}

#[tokio::test]
async fn v1_a_busy_loop_under_a_10_percent_cpu_limit_stays_well_below_30_percent() {
    let Some((cg, _cleanup)) = v1() else { return };
    let d = tempfile::tempdir().unwrap();
    let agent = cg.agent(&falcon(), &limits(Some("10%"), None));
    assert_eq!(agent.not_enforced(), None);
    let cpu_dir = agent
        .paths()
        .into_iter()
        .find(|p| p.join("cpu.cfs_quota_us").exists())
        .expect("a cpu cgroup")
        .to_path_buf();
    let read = |f: &str| std::fs::read_to_string(cpu_dir.join(f)).unwrap();
    assert_eq!(read("cpu.cfs_quota_us").trim(), "10000");
    assert_eq!(read("cpu.cfs_period_us").trim(), "100000");
    let Some(before) = agent.cpu_usage() else {
        cannot_run(&format!("no cpuacct accounting in {}", agent.describe()));
        return;
    };
    let t0 = Instant::now();
    // Two seconds of spinning, then the run's timeout kills it.
    let e = process::run(
        sh_in(&agent, "while :; do :; done", d.path()),
        Duration::from_secs(2),
        Duration::from_millis(200),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("timed out"), "{e}");
    let wall = t0.elapsed();
    let used = agent.cpu_usage().unwrap() - before;
    let share = used.as_secs_f64() / wall.as_secs_f64();
    eprintln!(
        "busy loop at CPU 10%: {used:?} of CPU in {wall:?} ({:.1}%)",
        share * 100.0
    );
    assert!(share < 0.30, "{used:?} of CPU in {wall:?}");
    // It did run, in this cgroup (accounting follows the attach).
    assert!(share > 0.01, "{used:?} of CPU in {wall:?}");
    assert!(agent.kill_all(Duration::from_millis(100)).await.is_empty());
    agent.remove().unwrap();
}

/// A cgroup2 mount: the machine's, or one made for the test.
fn v2() -> Option<(Cgroups, Cleanup)> {
    if !is_root() {
        cannot_run("cgroup v2 tests need root");
        return None;
    }
    let mount_dir = tempfile::tempdir().unwrap();
    let mut unmount = None;
    let root = match Mounts::read().ok().and_then(|m| m.v2) {
        Some((path, false)) => path,
        _ => {
            // No (writable) cgroup2 mount: the hierarchy can be mounted once more anywhere.
            let target = mount_dir.path().to_path_buf();
            if let Err(e) = nix::mount::mount(
                Some("none"),
                &target,
                Some("cgroup2"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            ) {
                cannot_run(&format!("no cgroup2 mount, and mounting one failed: {e}"));
                return None;
            }
            unmount = Some(target.clone());
            target
        }
    };
    let parent = unique_parent();
    let cg = Cgroups::at(CgroupRoot::V2(root), &parent);
    let cleanup = Cleanup {
        parents: cg.parent_dirs(),
        unmount,
        _mount_dir: Some(mount_dir),
    };
    if cg.version() != Some(Version::V2) {
        cannot_run(&format!("cgroup v2 unusable: {}", cg.describe()));
        return None;
    }
    Some((cg, cleanup))
}

#[tokio::test]
async fn v2_tracks_an_agent_sees_its_crash_at_once_and_kills_with_cgroup_kill() {
    let Some((cg, _cleanup)) = v2() else { return };
    let d = tempfile::tempdir().unwrap();
    let agent = cg.agent(&falcon(), &limits(Some("10%"), Some("20M")));
    eprintln!("{}\n{}", cg.describe(), agent.describe());
    assert!(agent.is_tracked());
    let dir = agent.paths()[0].to_path_buf();
    let has = |c: &str| {
        std::fs::read_to_string(dir.join("cgroup.controllers"))
            .unwrap()
            .split_whitespace()
            .any(|w| w == c)
    };
    match (has("cpu"), has("memory"), agent.not_enforced()) {
        // This machine's cgroup2 mount (beside v1) has neither controller.
        (false, false, Some(why)) => {
            assert!(
                why.starts_with("limits not enforced: ")
                    && why.contains("no cpu controller")
                    && why.contains("no memory controller"),
                "{why}"
            );
            eprintln!("{why}");
        }
        // A v2-only machine has both, and then the limits are written.
        (true, true, None) => {
            let max = std::fs::read_to_string(dir.join("cpu.max")).unwrap();
            assert_eq!(max.trim(), "10000 100000");
            let mem = std::fs::read_to_string(dir.join("memory.max")).unwrap();
            assert_eq!(mem.trim(), "20971520");
        }
        other => panic!("controllers and not_enforced disagree: {other:?}"),
    }

    // Tracking: a daemonised agent is in the cgroup.
    let out = start_in(
        &agent,
        "sleep 300 >/dev/null 2>&1 & echo $! > agent.pid",
        d.path(),
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let pid = read_pid(&d.path().join("agent.pid")).unwrap();
    let want = format!(
        "/{}/falcon",
        cg.parent_dirs()[0].file_name().unwrap().to_str().unwrap()
    );
    assert_eq!(cgroup_of(pid, "").as_deref(), Some(want.as_str()));
    assert_eq!(agent.procs().unwrap(), vec![pid]);
    assert!(agent.populated().unwrap());

    // A crash is seen in well under a second.
    let wait = agent.wait_empty();
    tokio::pin!(wait);
    assert!(
        tokio::time::timeout(Duration::from_millis(50), &mut wait)
            .await
            .is_err(),
        "empty while the agent runs"
    );
    let t0 = Instant::now();
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    tokio::time::timeout(Duration::from_secs(1), &mut wait)
        .await
        .expect("crash seen within a second");
    let seen = t0.elapsed();
    eprintln!("crash seen after {seen:?}");
    assert!(seen < Duration::from_millis(500), "{seen:?}");
    assert!(!agent.populated().unwrap());

    // kill_all: an agent that ignores SIGTERM, and a child of it, go with cgroup.kill.
    assert!(
        dir.join("cgroup.kill").exists(),
        "kernel without cgroup.kill"
    );
    let out = start_in(
        &agent,
        "(trap '' TERM; sleep 300 & while :; do sleep 1; done) >/dev/null 2>&1 & echo started",
        d.path(),
    )
    .await;
    assert_eq!(out.stdout, "started\n");
    wait_some("the agent and its child", Duration::from_secs(10), || {
        (agent.procs().ok()?.len() >= 2).then_some(())
    })
    .await;
    let t0 = Instant::now();
    let left = agent.kill_all(Duration::from_millis(200)).await;
    assert!(left.is_empty(), "{left:?}");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert!(!agent.populated().unwrap());
    agent.remove().unwrap();
    assert!(!dir.exists());
}

/// Without root nothing can be made: `detect` says `not root`, handles track nothing and
/// say why limits are not enforced, and `attach` leaves the command alone. Run as root, the
/// test runs itself again as `nobody` (through `setpriv`) and checks that run.
#[tokio::test]
async fn without_root_cgroups_say_not_root_and_attach_is_a_no_op() {
    const NAME: &str = "without_root_cgroups_say_not_root_and_attach_is_a_no_op";
    let d = tempfile::tempdir().unwrap();
    if !is_root() {
        let cg = Cgroups::detect(&unique_parent());
        let why = cg.unusable().expect("no cgroup without root");
        assert!(why.contains("not root"), "{why}");
        eprintln!("as nobody: {why}");
        let agent = cg.agent(&falcon(), &limits(Some("10%"), Some("20M")));
        assert!(!agent.is_tracked());
        let not = agent.not_enforced().unwrap();
        assert!(
            not.starts_with("limits not enforced: no cgroup: ") && not.contains("not root"),
            "{not}"
        );
        let out = start_in(&agent, "echo ran", d.path()).await;
        assert_eq!(out.stdout, "ran\n");
        return;
    }
    let Some(setpriv) = ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
    else {
        cannot_run("no setpriv to run the test as nobody");
        return;
    };
    let exe = std::env::current_exe().unwrap();
    let exe = exe.to_str().unwrap();
    let args = [
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        exe,
        "--exact",
        NAME,
        "--nocapture",
    ];
    let cmd = process::command(setpriv, &args, Path::new("/"), &BTreeMap::new());
    let out = process::run(cmd, Duration::from_secs(60), Duration::from_secs(1))
        .await
        .unwrap();
    assert!(
        out.success() && out.stdout.contains("1 passed"),
        "the run as nobody failed: {out:?}"
    );
}
