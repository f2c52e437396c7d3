//! End to end against the real `ops-meta`: first install, upgrade, stop/start by cmd,
//! canary prefixes, the `desiredAgent` filter, and meta being down for a while.

mod common;

use common::*;
use serde_json::json;
use test_support::agent::Behaviour;
use test_support::{free_port, wait_for, write_file};

#[test]
fn first_install_then_upgrade_switches_versions() {
    let mut meta = Meta::start(json!([]));
    publish(&meta, "falcon", "1.0.0", Behaviour::Good);
    publish(&meta, "falcon", "1.1.0", Behaviour::Good);
    meta.set_agents(json!([agent_entry(
        "falcon",
        "1.0.0",
        &meta.base(),
        "start"
    )]));
    let u = Updater::start(&meta.addr.to_string(), "host-01", |_| {});

    u.wait_running("falcon", "1.0.0");
    let v1 = u.work().join("falcon/1.0.0");
    // The original layout: tarball and .md5 beside the unpacked files.
    assert!(v1.join("falcon-1.0.0.tar.gz").is_file());
    assert!(v1.join("falcon-1.0.0.tar.gz.md5").is_file());
    wait_for("meta to see falcon 1.0.0 started", CONVERGE, || {
        meta.reported("falcon", "host-01")
            .is_some_and(|r| r["version"] == "1.0.0" && r["status"] == "started")
    });

    meta.set_agents(json!([agent_entry(
        "falcon",
        "1.1.0",
        &meta.base(),
        "start"
    )]));
    u.wait_running("falcon", "1.1.0");
    assert_eq!(status_of(&v1), "stoped", "old version still running");
    assert_eq!(control_actions(&v1), ["start 1.0.0", "stop 1.0.0"]);
    assert_eq!(
        control_actions(&u.work().join("falcon/1.1.0")),
        ["start 1.1.0"]
    );
    wait_for("meta to see falcon 1.1.0", CONVERGE, || {
        meta.reported("falcon", "host-01")
            .is_some_and(|r| r["version"] == "1.1.0" && r["status"] == "started")
    });
    let s = u.agent_status("falcon").unwrap();
    assert_eq!(s["currentVersion"], "1.1.0");
    assert_eq!(s["lastResult"], "ok");
    assert_eq!(s["lastAction"], "upgrade 1.0.0 -> 1.1.0");
    // `"debug": true` logs each exchange.
    let log = u.log_text();
    assert!(log.contains("heartbeat request"), "{log}");
    assert!(log.contains("heartbeat response"), "{log}");
}

#[test]
fn old_versions_are_pruned_beyond_keep_versions() {
    let mut meta = Meta::start(json!([]));
    for v in ["1.0.0", "1.1.0", "1.2.0"] {
        publish(&meta, "falcon", v, Behaviour::Good);
    }
    meta.set_agents(json!([agent_entry(
        "falcon",
        "1.0.0",
        &meta.base(),
        "start"
    )]));
    let mut u = Updater::start(&meta.addr.to_string(), "host-01", |c| {
        c["keepVersions"] = json!(2)
    });
    u.wait_running("falcon", "1.0.0");
    for v in ["1.1.0", "1.2.0"] {
        meta.set_agents(json!([agent_entry("falcon", v, &meta.base(), "start")]));
        u.wait_running("falcon", v);
    }
    wait_for("1.0.0 pruned", CONVERGE, || {
        !u.work().join("falcon/1.0.0").exists()
    });
    assert!(u.work().join("falcon/1.1.0").is_dir(), "previous kept");
    u.assert_alive();
}

#[test]
fn cmd_stop_then_start() {
    let mut meta = Meta::start(json!([]));
    publish(&meta, "falcon", "1.0.0", Behaviour::Good);
    meta.set_agents(json!([agent_entry(
        "falcon",
        "1.0.0",
        &meta.base(),
        "start"
    )]));
    let u = Updater::start(&meta.addr.to_string(), "host-01", |_| {});
    u.wait_running("falcon", "1.0.0");
    let vdir = u.work().join("falcon/1.0.0");

    meta.set_agents(json!([agent_entry(
        "falcon",
        "1.0.0",
        &meta.base(),
        "stop"
    )]));
    wait_for("falcon stopped", CONVERGE, || status_of(&vdir) == "stoped");
    wait_for("meta to see it stopped", CONVERGE, || {
        meta.reported("falcon", "host-01")
            .is_some_and(|r| r["status"] == "stoped")
    });
    assert_eq!(u.version_of("falcon").as_deref(), Some("1.0.0"));

    meta.set_agents(json!([agent_entry(
        "falcon",
        "1.0.0",
        &meta.base(),
        "start"
    )]));
    u.wait_running("falcon", "1.0.0");
    assert_eq!(
        control_actions(&vdir),
        ["start 1.0.0", "stop 1.0.0", "start 1.0.0"]
    );
}

#[test]
fn agent_killed_by_hand_is_started_again() {
    let mut meta = Meta::start(json!([]));
    publish(&meta, "falcon", "1.0.0", Behaviour::Good);
    meta.set_agents(json!([agent_entry(
        "falcon",
        "1.0.0",
        &meta.base(),
        "start"
    )]));
    // Stopped behind the updater's back: an abnormal exit, restarted by the supervisor
    // after its delay (1 s here, 180 s by default).
    let u = Updater::start(&meta.addr.to_string(), "host-01", |c| {
        c["supervise"] = json!({"checkSecs": 1, "restartDelaySecs": 1})
    });
    u.wait_running("falcon", "1.0.0");
    wait_for("falcon seen running", CONVERGE, || {
        u.agent_status("falcon")
            .is_some_and(|s| s["status"] == "started")
    });
    let vdir = u.work().join("falcon/1.0.0");
    control(&vdir, "stop");
    wait_for("falcon started again", CONVERGE, || {
        control_actions(&vdir).len() == 3 && status_of(&vdir) == "started"
    });
    wait_for("the restart counted", CONVERGE, || {
        u.agent_status("falcon").is_some_and(|s| s["restarts"] == 1)
    });
}

#[test]
fn canary_prefix_only_reaches_matching_hosts() {
    let mut meta = Meta::start(json!([]));
    publish(&meta, "falcon", "1.0.0", Behaviour::Good);
    publish(&meta, "falcon", "2.0.0", Behaviour::Good);
    meta.set_agents(json!([{
        "default": {"name": "falcon", "version": "1.0.0", "tarball": meta.base(), "md5": "", "cmd": "start"},
        "others": [{"prefix": "lg-", "version": "2.0.0", "tarball": "", "md5": "", "cmd": ""}]
    }]));
    let canary = Updater::start(&meta.addr.to_string(), "lg-web-01", |_| {});
    let plain = Updater::start(&meta.addr.to_string(), "web-02", |_| {});
    canary.wait_running("falcon", "2.0.0");
    plain.wait_running("falcon", "1.0.0");
    wait_for("meta to see both hosts", CONVERGE, || {
        meta.reported("falcon", "lg-web-01")
            .is_some_and(|r| r["version"] == "2.0.0")
            && meta
                .reported("falcon", "web-02")
                .is_some_and(|r| r["version"] == "1.0.0")
    });
    assert!(!plain.work().join("falcon/2.0.0").exists());
}

#[test]
fn desired_agent_filter_acts_on_and_reports_one_agent() {
    let mut meta = Meta::start(json!([]));
    publish(&meta, "alpha", "1.0.0", Behaviour::Good);
    publish(&meta, "beta", "1.0.0", Behaviour::Good);
    meta.set_agents(json!([
        agent_entry("alpha", "1.0.0", &meta.base(), "start"),
        agent_entry("beta", "1.0.0", &meta.base(), "start"),
    ]));
    let u = Updater::start(&meta.addr.to_string(), "host-01", |c| {
        c["desiredAgent"] = json!("alpha");
        // An agent left on disk by someone else, which the filter hides.
        let w = std::path::PathBuf::from(c["workdir"].as_str().unwrap());
        write_file(&w.join("gamma"), ".version", "0.1\n");
    });
    u.wait_running("alpha", "1.0.0");
    wait_for("meta to see alpha", CONVERGE, || {
        meta.reported("alpha", "host-01").is_some()
    });
    u.wait_heartbeats(2);
    assert!(!u.work().join("beta").exists(), "beta must not be touched");
    assert_eq!(meta.reported("gamma", "host-01"), None);
    assert_eq!(meta.reported("beta", "host-01"), None);
}

#[test]
fn a_folder_without_version_is_not_an_agent_but_one_with_it_is_taken_over() {
    let mut meta = Meta::start(json!([]));
    publish(&meta, "falcon", "1.0.0", Behaviour::Good);
    let u = Updater::start(&meta.addr.to_string(), "host-01", |c| {
        let w = std::path::PathBuf::from(c["workdir"].as_str().unwrap());
        // Left by the original updater: an agent at 0.9 whose status script works.
        let v = w.join("falcon/0.9");
        write_file(
            &v,
            "control",
            "#!/bin/sh\necho \"$1\" >> control.log\necho stoped\n",
        );
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(v.join("control"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        write_file(&w.join("falcon"), ".version", "0.9\n");
        std::fs::create_dir_all(w.join("logs")).unwrap();
    });
    wait_for("meta to see falcon 0.9 stoped", CONVERGE, || {
        meta.reported("falcon", "host-01")
            .is_some_and(|r| r["version"] == "0.9" && r["status"] == "stoped")
    });
    assert_eq!(meta.reported("logs", "host-01"), None);
    meta.set_agents(json!([agent_entry(
        "falcon",
        "1.0.0",
        &meta.base(),
        "start"
    )]));
    u.wait_running("falcon", "1.0.0");
    let old = std::fs::read_to_string(u.work().join("falcon/0.9/control.log")).unwrap();
    assert!(
        old.lines().any(|l| l == "stop"),
        "old version stopped: {old}"
    );
}

#[test]
fn meta_down_then_back() {
    let port = free_port();
    let mut meta = Meta::prepare(port, json!([]));
    publish(&meta, "falcon", "1.0.0", Behaviour::Good);
    meta.agents = json!([agent_entry("falcon", "1.0.0", &meta.base(), "start")]);
    meta.write_config();
    let mut u = Updater::start(&meta.addr.to_string(), "host-01", |_| {});
    wait_for("failed heartbeats", CONVERGE, || {
        u.daemon_status()["heartbeatsFailed"].as_u64().unwrap() >= 2
    });
    assert!(u.daemon_status()["lastHeartbeatError"].is_string());
    u.assert_alive();
    meta.spawn();
    u.wait_running("falcon", "1.0.0");
    assert!(u.daemon_status()["lastHeartbeatError"].is_null());
}

#[test]
fn versions_left_by_the_original_are_trimmed_to_keep_versions() {
    let mut meta = Meta::start(json!([]));
    let u = Updater::start(&meta.addr.to_string(), "host-01", |c| {
        c["keepVersions"] = json!(2);
        let w = std::path::PathBuf::from(c["workdir"].as_str().unwrap());
        use std::os::unix::fs::PermissionsExt;
        let base = std::time::SystemTime::now() - std::time::Duration::from_secs(1000);
        for (i, v) in ["0.1", "0.2", "0.3", "0.4"].iter().enumerate() {
            let dir = w.join("falcon").join(v);
            write_file(&dir, "control", "#!/bin/sh\necho started\n");
            std::fs::set_permissions(dir.join("control"), std::fs::Permissions::from_mode(0o755))
                .unwrap();
            let f = std::fs::File::open(&dir).unwrap();
            f.set_modified(base + std::time::Duration::from_secs(i as u64 * 10))
                .unwrap();
        }
        write_file(&w.join("falcon"), ".version", "0.2\n");
    });
    meta.desire(&[("falcon", "0.2", "start")]);
    let agent = u.work().join("falcon");
    wait_for("old versions pruned", CONVERGE, || {
        !agent.join("0.1").exists() && !agent.join("0.3").exists()
    });
    // The current one and the newest other stay.
    assert!(agent.join("0.2").is_dir());
    assert!(agent.join("0.4").is_dir());
    assert_eq!(u.version_of("falcon").as_deref(), Some("0.2"));
}
