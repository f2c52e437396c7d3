//! Supervision end to end, with the real binaries, in every protocol mode: an agent that
//! dies is restarted on the policy's schedule; one that keeps dying ends `fatal` (locally
//! and at ops-meta), survives a restart of ops-updater as `fatal`, is not started again,
//! and comes back with a new desired version or a `reset` job; `envs` reach the control
//! script in both protocols; heartbeats keep their schedule while a large version folder
//! is pruned.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use test_support::agent::Behaviour;
use test_support::wait_for;

const MODES: [&str; 3] = ["legacy", "bootagent", "auto"];

/// A fast policy: check every second, restart a second after an exit, fatal after two
/// consecutive failures (three quick exits).
fn fast_policy(c: &mut Value, mode: &str, restart_delay: u64) {
    if mode == "auto" {
        c.as_object_mut().unwrap().remove("protocol");
    } else {
        c["protocol"] = json!(mode);
    }
    c["supervise"] = json!({"checkSecs": 1, "restartDelaySecs": restart_delay,
        "failWindowSecs": 60, "maxFailures": 2});
}

/// `start` lines the agent's control script logged.
fn starts(vdir: &Path) -> usize {
    control_actions(vdir)
        .iter()
        .filter(|a| a.starts_with("start"))
        .count()
}

/// What ops-meta shows of `agent` on `host`: the legacy status page, or the BootAgent
/// host view.
fn meta_state(meta: &Meta, host: &str, agent: &str) -> Option<String> {
    if let Some(r) = meta.reported(agent, host) {
        if let Some(s) = r["status"].as_str() {
            return Some(s.to_string());
        }
    }
    let v = get_json(meta.addr, &format!("/api/hosts/{host}"))?;
    v["agents"]
        .as_array()?
        .iter()
        .find(|a| a["name"] == agent)
        .and_then(|a| a["status"].as_str().map(str::to_string))
}

fn crash_loop_ends_fatal_and_a_new_version_clears_it(mode: &str) {
    let host = format!("sup-{mode}");
    let mut meta = Meta::start(json!([]));
    publish(&meta, "crashy", "1.0", Behaviour::Crashes);
    publish(&meta, "crashy", "1.1", Behaviour::Good);
    meta.set_agents(json!([agent_entry("crashy", "1.0", &meta.base(), "start")]));
    let mut u = Updater::start(&meta.addr.to_string(), &host, |c| fast_policy(c, mode, 1));
    let v1 = u.work().join("crashy/1.0");

    wait_for(&format!("{mode}: crashy fatal"), CONVERGE, || {
        u.agent_status("crashy")
            .is_some_and(|s| s["supervisor"] == "fatal")
    });
    let s = u.agent_status("crashy").unwrap();
    assert_eq!(s["restarts"], 2, "{s}");
    assert_eq!(metric(&u, "ops_updater_restarts_total", &[]), 2.0, "{mode}");
    assert!(
        s["lastExit"].as_str().unwrap_or("").contains("exited"),
        "{s}"
    );
    // The first start, then one per restart: maxFailures 2 means three quick exits.
    assert_eq!(starts(&v1), 3, "{:?}", control_actions(&v1));
    wait_for(&format!("{mode}: meta sees fatal"), CONVERGE, || {
        meta_state(&meta, &host, "crashy").as_deref() == Some("fatal")
    });
    // The events say why: on the local endpoint, and at ops-meta with the host.
    let kinds = |events: &Value| -> Vec<String> {
        events
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|e| e["agent"] == "crashy")
                    .filter_map(|e| e["kind"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let local = get_json(u.http, "/events").expect("GET /events");
    let k = kinds(&local["events"]);
    for want in ["exited", "restarted", "fatal"] {
        assert!(
            k.iter().any(|x| x == want),
            "{mode}: no {want} event in {k:?}"
        );
    }
    let fatal = local["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "fatal")
        .unwrap()
        .clone();
    assert!(
        fatal["cause"]
            .as_str()
            .is_some_and(|c| c.contains("consecutive failures")),
        "{fatal}"
    );
    assert!(
        fatal["output"].as_array().is_some_and(|o| !o.is_empty()),
        "the last lines the control script printed: {fatal}"
    );
    wait_for(&format!("{mode}: meta shows the events"), CONVERGE, || {
        get_json(meta.addr, &format!("/api/hosts/{host}"))
            .is_some_and(|v| kinds(&v["events"]).iter().any(|k| k == "fatal"))
    });

    // Not started again while fatal, by the supervisor or by the rounds...
    u.wait_heartbeats(3);
    assert_eq!(starts(&v1), 3, "{:?}", control_actions(&v1));
    // ...nor after a restart of ops-updater: the verdict is kept on disk.
    u.kill9();
    u.spawn();
    u.wait_heartbeats(3);
    assert_eq!(u.agent_status("crashy").unwrap()["supervisor"], "fatal");
    assert_eq!(starts(&v1), 3, "{:?}", control_actions(&v1));

    // A new desired version clears it.
    meta.set_agents(json!([agent_entry("crashy", "1.1", &meta.base(), "start")]));
    u.wait_running("crashy", "1.1");
    wait_for(&format!("{mode}: fatal cleared"), CONVERGE, || {
        u.agent_status("crashy")
            .is_some_and(|s| s["supervisor"].is_null() && s["status"] == "started")
    });
}

#[test]
fn crash_loop_ends_fatal_and_a_new_version_clears_it_legacy() {
    crash_loop_ends_fatal_and_a_new_version_clears_it("legacy");
}

#[test]
fn crash_loop_ends_fatal_and_a_new_version_clears_it_bootagent() {
    crash_loop_ends_fatal_and_a_new_version_clears_it("bootagent");
}

#[test]
fn crash_loop_ends_fatal_and_a_new_version_clears_it_auto() {
    crash_loop_ends_fatal_and_a_new_version_clears_it("auto");
}

/// Kills the agent's process as a crash would.
fn kill_agent(vdir: &Path) {
    let pid = std::fs::read_to_string(vdir.join("app.pid")).unwrap();
    let pid: i32 = pid.trim().parse().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

#[test]
fn a_dead_agent_is_restarted_after_the_delay_in_every_mode() {
    for mode in MODES {
        let host = format!("restart-{mode}");
        let mut meta = Meta::start(json!([]));
        publish(&meta, "falcon", "1.0", Behaviour::Good);
        meta.set_agents(json!([agent_entry("falcon", "1.0", &meta.base(), "start")]));
        // Rounds every second, a restart delay of three: a round that started the agent
        // at once would break the schedule.
        let u = Updater::start(&meta.addr.to_string(), &host, |c| fast_policy(c, mode, 3));
        u.wait_running("falcon", "1.0");
        let vdir = u.work().join("falcon/1.0");
        wait_for(&format!("{mode}: seen running"), CONVERGE, || {
            u.agent_status("falcon")
                .is_some_and(|s| s["status"] == "started")
        });
        let before = starts(&vdir);
        let killed = Instant::now();
        kill_agent(&vdir);
        wait_for(&format!("{mode}: restarted"), CONVERGE, || {
            u.agent_status("falcon")
                .is_some_and(|s| s["restarts"] == 1 && s["status"] == "started")
        });
        let took = killed.elapsed();
        assert!(
            took >= Duration::from_secs(3),
            "{mode}: restarted after {took:?}, before restartDelaySecs"
        );
        assert_eq!(starts(&vdir), before + 1, "{:?}", control_actions(&vdir));
        assert_eq!(status_of(&vdir), "started");
    }
}

#[test]
fn envs_reach_the_control_script_in_both_protocols() {
    for mode in MODES {
        let host = format!("envs-{mode}");
        let mut meta = Meta::start(json!([]));
        publish(&meta, "falcon", "1.0", Behaviour::Good);
        let mut e = agent_entry("falcon", "1.0", &meta.base(), "start");
        e["default"]["envs"] = json!({"AGENT_ENV": format!("from-meta-{mode}")});
        meta.set_agents(json!([e]));
        let u = Updater::start(&meta.addr.to_string(), &host, |c| fast_policy(c, mode, 1));
        u.wait_running("falcon", "1.0");
        let actions = control_actions(&u.work().join("falcon/1.0"));
        let want = format!("start 1.0 AGENT_ENV=from-meta-{mode}");
        assert!(
            std::fs::read_to_string(u.work().join("falcon/1.0/control.log"))
                .unwrap()
                .lines()
                .any(|l| l == want),
            "{mode}: {actions:?}"
        );
    }
}

/// Regression: removing an old version folder ran on the daemon's only runtime thread, so
/// pruning a large one froze the local endpoint, the heartbeats and every other agent.
#[test]
fn heartbeats_keep_their_schedule_while_a_large_version_folder_is_pruned() {
    let mut meta = Meta::start(json!([]));
    publish(&meta, "falcon", "1.0", Behaviour::Good);
    publish(&meta, "falcon", "1.1", Behaviour::Good);
    meta.set_agents(json!([agent_entry("falcon", "1.0", &meta.base(), "start")]));
    let u = Updater::start(&meta.addr.to_string(), "prune-01", |c| {
        c["keepVersions"] = json!(1)
    });
    u.wait_running("falcon", "1.0");
    // 1 GiB in 4096 files of 256 KiB inside the version that is about to be pruned.
    let data = u.work().join("falcon/1.0/data");
    std::fs::create_dir_all(&data).unwrap();
    let chunk = vec![7u8; 256 << 10];
    for i in 0..4096 {
        std::fs::write(data.join(format!("f{i:04}")), &chunk).unwrap();
    }
    let old_gone = || {
        let dir = u.work().join("falcon");
        !dir.join("1.0").exists()
            && std::fs::read_dir(&dir)
                .unwrap()
                .flatten()
                .all(|e| !e.file_name().to_string_lossy().contains(".prune-"))
    };
    let beats = |u: &Updater| u.daemon_status()["heartbeatsOk"].as_u64().unwrap();
    let start_beats = beats(&u);
    let started = Instant::now();
    meta.set_agents(json!([agent_entry("falcon", "1.1", &meta.base(), "start")]));
    // The endpoint is served by the same thread as the rounds: it must answer throughout.
    let mut slowest = Duration::ZERO;
    while !old_gone() {
        assert!(started.elapsed() < CONVERGE, "1.0 never pruned");
        let t = Instant::now();
        let s = get_json(u.http, "/status");
        slowest = slowest.max(t.elapsed());
        assert!(
            s.is_some(),
            "the local endpoint did not answer during the prune"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let window = started.elapsed();
    assert!(
        slowest < Duration::from_millis(1500),
        "the endpoint took {slowest:?} to answer during the prune"
    );
    u.wait_running("falcon", "1.1");
    // One heartbeat a second went on meanwhile (give or take the switch's own rounds).
    let done = beats(&u) - start_beats;
    let expected = window.as_secs().saturating_sub(2);
    assert!(
        done >= expected,
        "{done} heartbeats in {window:?} of pruning, expected at least {expected}"
    );
}

/// With cgroups (root, as on the development machines and CI): the agent's processes sit
/// in its own cgroup, and one that allocates 200 MB under `memory: "20M"` is killed,
/// reported `killed` with its limit locally and at ops-meta.
#[test]
fn memory_limit_kills_the_agent_and_it_is_reported_killed_in_every_mode() {
    if !nix::unistd::geteuid().is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root: this test must run there"
        );
        eprintln!("skipped: cgroups need root");
        return;
    }
    for mode in MODES {
        let parent = unique_cgroup_parent();
        let host = format!("oom-{mode}");
        let mut meta = Meta::start(json!([]));
        publish(&meta, "hog", "1.0", Behaviour::EatsMemory);
        publish(&meta, "falcon", "1.0", Behaviour::Good);
        let mut hog = agent_entry("hog", "1.0", &meta.base(), "start");
        hog["default"]["limits"] = json!({"memory": "20M"});
        let mut falcon = agent_entry("falcon", "1.0", &meta.base(), "start");
        falcon["default"]["limits"] = json!({"CPU": "50%"});
        meta.set_agents(json!([hog, falcon]));
        let u = Updater::start(&meta.addr.to_string(), &host, |c| {
            fast_policy(c, mode, 60);
            c["cgroupParent"] = json!(parent);
        });
        u.wait_running("falcon", "1.0");
        let pid = std::fs::read_to_string(u.work().join("falcon/1.0/app.pid")).unwrap();
        let cg = std::fs::read_to_string(format!("/proc/{}/cgroup", pid.trim())).unwrap();
        assert!(
            cg.contains(&format!("/{parent}/falcon")),
            "{mode}: falcon's process is not in its cgroup: {cg}"
        );
        wait_for(&format!("{mode}: hog killed"), CONVERGE, || {
            u.agent_status("hog")
                .is_some_and(|s| s["supervisor"] == "killed")
        });
        let s = u.agent_status("hog").unwrap();
        let exit = s["lastExit"].as_str().unwrap_or_default();
        assert!(
            exit.contains("OOM") && exit.contains("20 MiB"),
            "{mode}: {s}"
        );
        assert!(
            metric(&u, "ops_updater_oom_kills_total", &[]) >= 1.0,
            "{mode}"
        );
        assert!(
            s["cgroup"].as_str().is_some_and(|c| c.contains("hog")),
            "{s}"
        );
        wait_for(&format!("{mode}: meta sees killed"), CONVERGE, || {
            meta_state(&meta, &host, "hog").as_deref() == Some("killed")
        });
        drop(u);
    }
}
