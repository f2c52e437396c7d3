//! `GET /metrics` of the real ops-updater's local endpoint, read with an independent
//! parser of the Prometheus text format (`prometheus-parse`), in each protocol mode: the
//! rounds by protocol, the agent's install, and a download that fails (404) counted as a
//! failed install and a `download` failure.

mod common;

use common::*;
use serde_json::json;
use test_support::agent::Behaviour;
use test_support::wait_for;

fn install_then_count(mode: &str) {
    let mut meta = Meta::start(json!([]));
    publish(&meta, "falcon", "1.0.0", Behaviour::Good);
    meta.set_agents(json!([agent_entry(
        "falcon",
        "1.0.0",
        &meta.base(),
        "start"
    )]));
    let u = Updater::start(&meta.addr.to_string(), &format!("metrics-{mode}"), |c| {
        c["protocol"] = json!(mode);
    });
    // Before anything happened: every family is there, at zero.
    let s = scrape(&u);
    for (name, labels) in [
        ("ops_updater_installs_total", [("result", "failed")]),
        ("ops_updater_failures_total", [("kind", "checksum")]),
        ("ops_updater_self_upgrades_total", [("result", "started")]),
    ] {
        assert_eq!(counter(&s, name, &labels), 0.0, "{name}");
    }
    assert_eq!(counter(&s, "ops_updater_restarts_total", &[]), 0.0);
    assert_eq!(counter(&s, "ops_updater_oom_kills_total", &[]), 0.0);

    u.wait_running("falcon", "1.0.0");
    // `auto` speaks BootAgent to an ops-meta that knows it.
    let protocol = if mode == "legacy" {
        "legacy"
    } else {
        "bootagent"
    };
    wait_for("an ok round counted", CONVERGE, || {
        metric(
            &u,
            "ops_updater_rounds_total",
            &[("protocol", protocol), ("result", "ok")],
        ) >= 1.0
    });
    wait_for("the install counted", CONVERGE, || {
        metric(&u, "ops_updater_installs_total", &[("result", "ok")]) == 1.0
    });
    let s = scrape(&u);
    assert_eq!(
        counter(
            &s,
            "ops_updater_rounds_total",
            &[("protocol", protocol), ("result", "failed")]
        ),
        0.0
    );
    assert_eq!(
        counter(&s, "ops_updater_failures_total", &[("kind", "download")]),
        0.0
    );

    // A version that is not published, with its SHA-256 in the config (so a BootAgent
    // job is handed out without ops-meta having the file): its download answers 404.
    let mut entry = agent_entry("falcon", "2.0.0", &meta.base(), "start");
    entry["default"]["sha256"] = json!("ab".repeat(32));
    meta.set_agents(json!([entry]));
    wait_for("the failed download counted", CONVERGE, || {
        metric(&u, "ops_updater_failures_total", &[("kind", "download")]) >= 1.0
    });
    let s = scrape(&u);
    assert!(counter(&s, "ops_updater_installs_total", &[("result", "failed")]) >= 1.0);
    assert_eq!(
        counter(&s, "ops_updater_installs_total", &[("result", "ok")]),
        1.0
    );
    assert_eq!(
        counter(&s, "ops_updater_failures_total", &[("kind", "checksum")]),
        0.0
    );
    assert_eq!(
        counter(&s, "ops_updater_failures_total", &[("kind", "unpack")]),
        0.0
    );
    // The old version kept running.
    u.wait_running("falcon", "1.0.0");
}

#[test]
fn metrics_count_rounds_installs_and_a_failed_download_legacy() {
    install_then_count("legacy");
}

#[test]
fn metrics_count_rounds_installs_and_a_failed_download_bootagent() {
    install_then_count("bootagent");
}

#[test]
fn metrics_count_rounds_installs_and_a_failed_download_auto() {
    install_then_count("auto");
}
