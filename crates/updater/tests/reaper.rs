//! The reaper for real: this test process becomes a child subreaper, agents daemonised by
//! a script (double fork) are reparented to it, and their exits are recorded; children
//! that `process::run` waits for keep their own exit status.
//!
//! Every test of this binary shares one reaper (a process has one set of children), and
//! every child is spawned through `process::run`, as in the daemon.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use updater::process;
use updater::reaper::{Exit, Reaper};

/// The one reaper of this test process, on a runtime of its own that outlives the tests'.
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

async fn sh(script: &str, dir: &Path) -> process::Output {
    let cmd = process::command(Path::new("/bin/sh"), &["-c", script], dir, &BTreeMap::new());
    process::run(cmd, Duration::from_secs(30), Duration::from_secs(1))
        .await
        .unwrap()
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

fn read_pids(file: &Path) -> Vec<i32> {
    std::fs::read_to_string(file)
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect()
}

/// State and parent of `pid` from `/proc`, `None` once it is gone.
fn stat(pid: i32) -> Option<(char, i32)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut f = s[s.rfind(')')? + 1..].split_whitespace();
    Some((f.next()?.chars().next()?, f.next()?.parse().ok()?))
}

fn me() -> i32 {
    std::process::id() as i32
}

#[tokio::test]
async fn a_daemonised_agent_killed_by_a_signal_is_reported_with_it() {
    let reaper = reaper();
    let d = tempfile::tempdir().unwrap();
    let t0 = tokio::time::Instant::now();
    // The subshell starts the agent and exits: a double fork, as `control start` does.
    let out = sh(
        "(sleep 300 >/dev/null 2>&1 & echo $! > agent.pid); exit 0",
        d.path(),
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let pid = read_pids(&d.path().join("agent.pid"))[0];
    // The orphan is ours now, not init's.
    wait_some(
        "the agent to be reparented to us",
        Duration::from_secs(10),
        || (stat(pid)?.1 == me()).then_some(()),
    )
    .await;
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    let exit = wait_some(
        "the reaper to record the exit",
        Duration::from_secs(10),
        || reaper.exit_of(pid),
    )
    .await;
    assert_eq!(
        exit,
        Exit::Signal {
            signal: 9,
            core: false
        }
    );
    assert_eq!(exit.to_string(), "killed by signal 9 (SIGKILL)");
    assert!(reaper.exits_since(t0).contains(&(pid, exit)));
    assert!(stat(pid).is_none(), "reaped, so gone from /proc");
}

#[tokio::test]
async fn orphans_that_exit_on_their_own_are_reaped_and_do_not_pile_up_as_zombies() {
    let reaper = reaper();
    let exits = reaper.subscribe();
    let d = tempfile::tempdir().unwrap();
    // Twenty agents that wait for a go, then exit with code 7.
    let out = sh(
        "for i in $(seq 20); do \
           (while [ ! -e go ]; do sleep 0.02; done; exit 7) >/dev/null 2>&1 & echo $! >> agents.pid; \
         done",
        d.path(),
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let pids = read_pids(&d.path().join("agents.pid"));
    assert_eq!(pids.len(), 20);
    wait_some(
        "all agents to be reparented to us",
        Duration::from_secs(10),
        || {
            pids.iter()
                .all(|p| stat(*p).is_some_and(|s| s.1 == me()))
                .then_some(())
        },
    )
    .await;
    std::fs::write(d.path().join("go"), "").unwrap();
    wait_some("every exit to be recorded", Duration::from_secs(10), || {
        pids.iter()
            .all(|p| reaper.exit_of(*p) == Some(Exit::Code(7)))
            .then_some(())
    })
    .await;
    // Nothing of them is left, zombie or not.
    for p in &pids {
        assert_eq!(stat(*p), None, "pid {p}");
    }
    // Subscribers were told.
    assert!(exits.has_changed().unwrap());
}

/// The reaper must never take the children `process::run` waits for: each would fail
/// with ECHILD or lose its exit code. Many short runs next to orphans exiting at once.
#[tokio::test]
async fn process_run_keeps_its_exit_status_while_the_reaper_runs() {
    let reaper = reaper();
    let d = tempfile::tempdir().unwrap();
    for i in 0..40 {
        let out = sh(
            // An orphan that exits at once, so the reaper has work at the same moment.
            &format!("(exit 1) & (true &); echo run {i}; exit 3"),
            d.path(),
        )
        .await;
        assert_eq!(out.code, Some(3), "run {i}: {out:?}");
        assert_eq!(out.stdout, format!("run {i}\n"));
    }
    // A script that starts an agent and exits 0, as `control start`.
    let out = sh("sleep 300 >/dev/null 2>&1 & echo $! > a.pid", d.path()).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let pid = read_pids(&d.path().join("a.pid"))[0];
    kill(Pid::from_raw(pid), Signal::SIGTERM).unwrap();
    let exit = wait_some("the agent's exit", Duration::from_secs(10), || {
        reaper.exit_of(pid)
    })
    .await;
    assert_eq!(exit.to_string(), "killed by signal 15 (SIGTERM)");
}
