//! End to end against the real `ops-meta`: checksum mismatches (held back, not retried
//! every round), versions that do not start (rolled back), and a hung `control status`.

mod common;

use common::*;
use serde_json::json;
use test_support::agent::Behaviour;
use test_support::{wait_for, wait_for_some};

/// Waits until the local /status shows a back-off for `version` and returns it.
fn wait_backoff(u: &Updater, agent: &str, version: &str) -> serde_json::Value {
    wait_for_some(
        &format!("a back-off for {agent} {version}"),
        CONVERGE,
        || {
            let s = u.agent_status(agent)?;
            (s["backoff"]["version"] == version).then_some(s)
        },
    )
}

#[test]
fn md5_mismatch_installs_nothing_and_is_not_retried_every_round() {
    let mut meta = Meta::start(json!([]));
    publish(&meta, "falcon", "1.0.0", Behaviour::Good);
    // Tamper the .md5: a digest of something else.
    std::fs::write(
        meta.tarball_dir().join("falcon-1.0.0.tar.gz.md5"),
        proto::legacy::format_md5_file(&"0".repeat(32), "falcon-1.0.0.tar.gz"),
    )
    .unwrap();
    meta.desire(&[("falcon", "1.0.0", "start")]);
    let u = Updater::start(&meta.addr.to_string(), "host-01", |_| {});

    let s = wait_backoff(&u, "falcon", "1.0.0");
    assert_eq!(s["lastResult"], "failed", "{s}");
    let err = s["lastError"].as_str().unwrap();
    assert!(err.contains("md5 mismatch"), "{err}");
    assert_eq!(s["backoff"]["failures"], 1);
    assert!(s["backoff"]["nextRetryAt"].as_i64().unwrap() > chrono_now() + 10);
    // Several more rounds: still one failure, so no new download was tried.
    u.wait_heartbeats(3);
    let s = u.agent_status("falcon").unwrap();
    assert_eq!(s["backoff"]["failures"], 1, "{s}");
    assert!(!u.work().join("falcon/1.0.0").exists());
    assert_eq!(u.version_of("falcon"), None);
}

#[test]
fn md5_fixed_on_the_server_is_picked_up_when_the_desired_state_changes() {
    let mut meta = Meta::start(json!([]));
    publish(&meta, "falcon", "1.0.0", Behaviour::Good);
    publish(&meta, "falcon", "1.0.1", Behaviour::Good);
    std::fs::write(
        meta.tarball_dir().join("falcon-1.0.0.tar.gz.md5"),
        proto::legacy::format_md5_file(&"0".repeat(32), "falcon-1.0.0.tar.gz"),
    )
    .unwrap();
    meta.desire(&[("falcon", "1.0.0", "start")]);
    let u = Updater::start(&meta.addr.to_string(), "host-01", |_| {});
    wait_backoff(&u, "falcon", "1.0.0");
    // A new desired version clears the back-off at once.
    meta.desire(&[("falcon", "1.0.1", "start")]);
    u.wait_running("falcon", "1.0.1");
    assert!(u.agent_status("falcon").unwrap()["backoff"].is_null());
}

#[test]
fn sha256_mismatch_from_meta_config_installs_nothing() {
    let mut meta = Meta::start(json!([]));
    publish(&meta, "falcon", "1.0.0", Behaviour::Good);
    let mut entry = agent_entry("falcon", "1.0.0", &meta.base(), "start");
    entry["default"]["sha256"] = json!("ab".repeat(32));
    meta.set_agents(json!([entry]));
    let u = Updater::start(&meta.addr.to_string(), "host-01", |_| {});
    let s = wait_backoff(&u, "falcon", "1.0.0");
    let err = s["lastError"].as_str().unwrap();
    assert!(err.contains("sha256"), "{err}");
    assert!(!u.work().join("falcon/1.0.0").exists());
    assert_eq!(u.version_of("falcon"), None);
}

fn rollback_case(bad: Behaviour) {
    let mut meta = Meta::start(json!([]));
    publish(&meta, "falcon", "1.0.0", Behaviour::Good);
    publish(&meta, "falcon", "1.1.0", bad);
    meta.desire(&[("falcon", "1.0.0", "start")]);
    let u = Updater::start(&meta.addr.to_string(), "host-01", |c| {
        c["startTimeoutSecs"] = json!(2);
        // A version that stops by itself comes back after the restart delay.
        c["supervise"] = json!({"checkSecs": 1, "restartDelaySecs": 1});
    });
    u.wait_running("falcon", "1.0.0");

    meta.desire(&[("falcon", "1.1.0", "start")]);
    let s = wait_backoff(&u, "falcon", "1.1.0");
    assert_eq!(s["lastResult"], "rolledback", "{s}");
    assert!(s["lastError"].is_string(), "{s}");
    let old = u.work().join("falcon/1.0.0");
    assert_eq!(u.version_of("falcon").as_deref(), Some("1.0.0"));
    assert_eq!(status_of(&old), "started", "previous version running again");
    assert_eq!(
        control_actions(&old),
        ["start 1.0.0", "stop 1.0.0", "start 1.0.0"]
    );
    let new = u.work().join("falcon/1.1.0");
    assert_eq!(status_of(&new), "stoped");
    // Not retried in a loop: a few more rounds, the new version saw one start only.
    u.wait_heartbeats(3);
    assert_eq!(
        control_actions(&new)
            .iter()
            .filter(|l| l.starts_with("start"))
            .count(),
        1
    );
    assert_eq!(u.version_of("falcon").as_deref(), Some("1.0.0"));
    wait_for("meta to see 1.0.0 started", CONVERGE, || {
        meta.reported("falcon", "host-01")
            .is_some_and(|r| r["version"] == "1.0.0" && r["status"] == "started")
    });
    // While 1.1.0 is held back, 1.0.0 is still looked after: stopped by hand (an exit
    // ops-updater did not cause), it is restarted by the supervisor.
    control(&old, "stop");
    wait_for("1.0.0 started again", CONVERGE, || {
        control_actions(&old).len() == 5 && status_of(&old) == "started"
    });
    assert_eq!(
        control_actions(&new)
            .iter()
            .filter(|l| l.starts_with("start"))
            .count(),
        1
    );
}

#[test]
fn start_fails_rolls_back_to_the_previous_version() {
    rollback_case(Behaviour::StartFails);
}

#[test]
fn dies_at_once_rolls_back_to_the_previous_version() {
    rollback_case(Behaviour::DiesAtOnce);
}

#[test]
fn hung_status_does_not_hold_up_the_heartbeat_or_other_agents() {
    let mut meta = Meta::start(json!([]));
    publish(&meta, "good", "1.0.0", Behaviour::Good);
    let u = Updater::start(&meta.addr.to_string(), "host-01", |c| {
        // Longer than the test: only the round's own wait can keep heartbeats flowing.
        c["statusTimeoutSecs"] = json!(120);
        // "stuck" was installed earlier; its status script now hangs.
        let w = std::path::PathBuf::from(c["workdir"].as_str().unwrap());
        let v = w.join("stuck/1.0.0");
        test_support::write_file(
            &v,
            "control",
            test_support::agent::control_script("stuck", "1.0.0", Behaviour::StatusHangs),
        );
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(v.join("control"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        test_support::write_file(&w.join("stuck"), ".version", "1.0.0\n");
    });
    meta.set_agents(json!([
        agent_entry("stuck", "1.0.0", &meta.base(), "start"),
        agent_entry("good", "1.0.0", &meta.base(), "start"),
    ]));
    u.wait_running("good", "1.0.0");
    wait_for("meta to see stuck with an error status", CONVERGE, || {
        meta.reported("stuck", "host-01").is_some_and(|r| {
            r["version"] == "1.0.0"
                && r["status"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("control status"))
        })
    });
    u.wait_heartbeats(3);
    // Left alone: with its state unknown, the updater never ran start on it.
    let log = std::fs::read_to_string(u.work().join("stuck/1.0.0/control.log")).unwrap();
    assert!(!log.lines().any(|l| l.starts_with("start")), "{log}");
}

fn chrono_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn sigterm_during_a_switch_finishes_the_rollback_before_exiting() {
    let mut meta = Meta::start(json!([]));
    publish(&meta, "falcon", "1.0.0", Behaviour::Good);
    publish(&meta, "falcon", "1.1.0", Behaviour::DiesAtOnce);
    meta.desire(&[("falcon", "1.0.0", "start")]);
    let mut u = Updater::start(&meta.addr.to_string(), "host-01", |c| {
        c["startTimeoutSecs"] = json!(2)
    });
    u.wait_running("falcon", "1.0.0");
    meta.desire(&[("falcon", "1.1.0", "start")]);
    let new = u.work().join("falcon/1.1.0");
    // `start 1.1.0` ran: the updater is now waiting for a status that never comes.
    wait_for("the new version started", CONVERGE, || {
        control_actions(&new).iter().any(|l| l == "start 1.1.0")
    });
    let child = u.child.as_mut().unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = wait_for_some("ops-updater to exit", CONVERGE, || {
        u.child.as_mut().unwrap().try_wait().unwrap()
    });
    assert!(status.success(), "{status:?}");
    // It exited only after putting the previous version back.
    let old = u.work().join("falcon/1.0.0");
    assert_eq!(status_of(&old), "started");
    assert_eq!(u.version_of("falcon").as_deref(), Some("1.0.0"));
    assert_eq!(
        control_actions(&old),
        ["start 1.0.0", "stop 1.0.0", "start 1.0.0"]
    );
}

/// A server that never accepts (a hung ops-meta): the kernel queues the first connection,
/// which then hears nothing, and drops the SYNs of later ones once its queue is full (as a
/// black-holing firewall would). Each heartbeat gives up after `heartbeatTimeoutSecs`, says
/// so, and the daemon keeps going.
#[test]
fn a_server_that_never_answers_times_out_each_round() {
    let hole = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    hole.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    hole.listen(0).unwrap();
    let addr = hole.local_addr().unwrap().as_socket().unwrap();
    let mut u = Updater::start(&addr.to_string(), "host-hole", |c| {
        c["heartbeatTimeoutSecs"] = json!(1)
    });
    wait_for("three timed-out heartbeats", CONVERGE, || {
        u.daemon_status()["heartbeatsFailed"].as_u64().unwrap_or(0) >= 3
    });
    let d = u.daemon_status();
    assert_eq!(d["heartbeatsOk"], 0, "{d}");
    let err = d["lastHeartbeatError"].as_str().unwrap_or_default();
    assert!(err.contains(&addr.to_string()), "{err}");
    assert!(err.contains("timed out"), "{err}");
    u.assert_alive();
}

fn pid_in(vdir: &std::path::Path, file: &str) -> Option<i32> {
    std::fs::read_to_string(vdir.join(file))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        let state = s.rsplit(')').next().unwrap_or("").trim_start();
        !state.starts_with('Z') && !state.starts_with('X')
    })
}

/// A failed `control stop` of the old version started the new one anyway: two copies of one
/// agent ran, and the old one was never managed again.
#[test]
fn a_failed_stop_never_leaves_two_versions_running() {
    let mut meta = Meta::start(json!([]));
    publish(&meta, "falcon", "1.0.0", Behaviour::StopFails);
    publish(&meta, "falcon", "1.1.0", Behaviour::Good);
    meta.desire(&[("falcon", "1.0.0", "start")]);
    let u = Updater::start(&meta.addr.to_string(), "host-01", |_| {});
    u.wait_running("falcon", "1.0.0");
    let old = u.work().join("falcon/1.0.0");
    let old_pid = pid_in(&old, "app.pid").expect("1.0.0 wrote its pid");

    meta.desire(&[("falcon", "1.1.0", "start")]);
    u.wait_running("falcon", "1.1.0");
    assert!(!running(old_pid), "1.0.0 still runs beside 1.1.0");
    assert!(updater::process::processes_in(&old).is_empty());
    assert_eq!(status_of(&old), "stoped");
    let log = u.log_text();
    assert!(log.contains("killing what is left of it"), "{log}");
}

/// Kills the respawning supervisor of the test below when the test ends, pass or fail.
struct KillPid(std::path::PathBuf);

impl Drop for KillPid {
    fn drop(&mut self) {
        if let Some(pid) = pid_in(&self.0, "sup.pid") {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// When something of the old version survives SIGKILL (here a supervisor outside its folder
/// restarts it), the switch is abandoned: the old version stays current, the new one is
/// never started, and the failure is reported.
#[test]
fn an_old_version_that_cannot_be_stopped_stays_current_and_the_new_one_never_starts() {
    let mut meta = Meta::start(json!([]));
    let script = r#"#!/bin/sh
cd "$(dirname "$0")"
here=$(pwd)
echo "$1" >> control.log
case "$1" in
  start)
    if [ -f sup.pid ] && kill -0 "$(cat sup.pid)" 2>/dev/null; then echo started; exit 0; fi
    (cd / && while :; do (cd "$here" && exec sleep 30) & sleep 0.05; done) >/dev/null 2>&1 &
    echo $! > sup.pid
    echo started
    ;;
  stop) echo "cannot stop: busy" >&2; exit 1 ;;
  status)
    if [ -f sup.pid ] && kill -0 "$(cat sup.pid)" 2>/dev/null; then echo started; else echo stoped; fi
    ;;
esac
"#;
    let tb = test_support::tarball::targz(&[test_support::tarball::Entry::exec("control", script)]);
    test_support::tarball::publish(&meta.tarball_dir(), "falcon", "1.0.0", &tb);
    publish(&meta, "falcon", "1.1.0", Behaviour::Good);
    meta.desire(&[("falcon", "1.0.0", "start")]);
    let u = Updater::start(&meta.addr.to_string(), "host-01", |_| {});
    let old = u.work().join("falcon/1.0.0");
    let _sup = KillPid(old.clone());
    u.wait_running("falcon", "1.0.0");

    meta.desire(&[("falcon", "1.1.0", "start")]);
    let s = wait_backoff(&u, "falcon", "1.1.0");
    assert_eq!(s["lastResult"], "failed", "{s}");
    assert!(
        s["lastError"].as_str().unwrap().contains("still run"),
        "{s}"
    );
    assert_eq!(u.version_of("falcon").as_deref(), Some("1.0.0"));
    let new = u.work().join("falcon/1.1.0");
    assert!(control_actions(&new).is_empty(), "1.1.0 was started");
}
