//! `ops-loadgen` end to end against a tiny in-test server that speaks both protocols:
//! every mode, both protocols, and every kind of error counted.

mod common;

use common::{loadgen, loadgen_json, num, start, Behaviour};

#[test]
fn closed_loop_with_requests_equal_to_hosts_reports_every_host_once() {
    let srv = start(Behaviour::Good, "1.0.0");
    let url = srv.url();
    let r = loadgen_json(&[
        "closed",
        "--url",
        &url,
        "--hosts",
        "50",
        "--agents",
        "3",
        "-c",
        "4",
        "--requests",
        "50",
    ]);
    assert_eq!(num(&r, &["requests"]), 50, "{r:#}");
    assert_eq!(num(&r, &["ok"]), 50, "{r:#}");
    assert_eq!(num(&r, &["error_total"]), 0, "{r:#}");
    // Keep-alive: one connection per worker for the whole run.
    assert_eq!(num(&r, &["connects"]), 4, "{r:#}");
    let seen = srv.seen.lock().unwrap();
    assert_eq!(seen.hosts.len(), 50);
    assert_eq!(seen.hosts.keys().next().unwrap(), "sim-000000000");
    assert_eq!(seen.hosts.keys().last().unwrap(), "sim-000000049");
    for agents in seen.hosts.values() {
        let names: Vec<_> = agents.keys().map(String::as_str).collect();
        assert_eq!(names, ["agent-0", "agent-1", "agent-2"]);
    }
}

#[test]
fn closed_loop_for_a_duration_over_bootagent_status() {
    let srv = start(Behaviour::Good, "1.0.0");
    let url = srv.url();
    let r = loadgen_json(&[
        "closed",
        "--url",
        &url,
        "--protocol",
        "bootagent",
        "--hosts",
        "20",
        "--duration",
        "0.5",
        "-c",
        "2",
    ]);
    assert!(num(&r, &["requests"]) > 0, "{r:#}");
    assert_eq!(num(&r, &["error_total"]), 0, "{r:#}");
    assert_eq!(r["protocol"], "bootagent");
    // Every answer carried upgrade jobs, which are valid answers, not errors. Each host
    // registered once, before its first report.
    let seen = srv.seen.lock().unwrap();
    assert!(!seen.hosts.is_empty() && seen.hosts.len() <= 20);
    assert_eq!(
        seen.registers,
        seen.hosts.len() as u64,
        "{:?}",
        seen.hosts.keys()
    );
}

#[test]
fn open_loop_sends_about_the_rate_asked_for() {
    let srv = start(Behaviour::Good, "1.0.0");
    let url = srv.url();
    let r = loadgen_json(&[
        "open",
        "--url",
        &url,
        "--hosts",
        "1000",
        "--rate",
        "200",
        "--duration",
        "1",
        "-c",
        "4",
    ]);
    // The schedule holds exactly rate × duration slots; allow slack anyway, never timing.
    let n = num(&r, &["requests"]);
    assert!((150..=250).contains(&n), "sent {n}: {r:#}");
    assert_eq!(num(&r, &["error_total"]), 0, "{r:#}");
    assert_eq!(r["target_rate"], 200.0);
}

#[test]
fn errors_are_counted_when_the_server_is_down() {
    let port = test_support::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let r = loadgen_json(&[
        "closed",
        "--url",
        &url,
        "--hosts",
        "10",
        "--duration",
        "0.3",
        "-c",
        "2",
    ]);
    assert!(num(&r, &["errors", "connect"]) > 0, "{r:#}");
    assert_eq!(num(&r, &["ok"]), 0, "{r:#}");
    assert!(
        r["error_samples"]["connect"]
            .as_str()
            .unwrap()
            .contains("refused"),
        "{r:#}"
    );
}

#[test]
fn bad_status_and_bad_bodies_are_counted_by_kind() {
    let srv = start(Behaviour::Hostile, "1.0.0");
    let url = srv.url();
    let r = loadgen_json(&[
        "closed",
        "--url",
        &url,
        "--hosts",
        "10",
        "--requests",
        "40",
        "-c",
        "2",
    ]);
    assert_eq!(num(&r, &["errors", "status"]), 20, "{r:#}");
    assert_eq!(num(&r, &["errors", "body"]), 20, "{r:#}");
    assert_eq!(num(&r, &["status_codes", "503"]), 20, "{r:#}");
    assert_eq!(num(&r, &["ok"]), 0, "{r:#}");
}

#[test]
fn converge_legacy_reaches_everyone_after_a_reload_it_triggers() {
    let srv = start(Behaviour::Good, "1.0.0");
    let dir = test_support::tempdir().unwrap();
    let new = test_support::write_file(dir.path(), "new.cfg", "2.0.0\n");
    let url = srv.url();
    let r = loadgen_json(&[
        "converge",
        "--url",
        &url,
        "--hosts",
        "40",
        "--interval",
        "0.5",
        "--expect-version",
        "2.0.0",
        "--reload-after",
        "0.3",
        "--new-config",
        new.to_str().unwrap(),
        "--meta-config",
        srv.config_file.to_str().unwrap(),
        "--max-duration",
        "30",
        "-c",
        "4",
    ]);
    let c = &r["convergence"];
    assert_eq!(num(&r, &["convergence", "converged"]), 40, "{r:#}");
    assert_eq!(
        num(&r, &["convergence", "converged_before_change"]),
        0,
        "{r:#}"
    );
    assert!(
        c["t100_secs"].is_number() && c["t50_secs"].is_number(),
        "{r:#}"
    );
    assert_eq!(num(&r, &["error_total"]), 0, "{r:#}");
    assert_eq!(
        std::fs::read_to_string(&srv.config_file).unwrap(),
        "2.0.0\n"
    );
    // Each host installed the new version and said so on a later round.
    let seen = srv.seen.lock().unwrap();
    assert_eq!(seen.hosts.len(), 40);
}

#[test]
fn converge_bootagent_registers_runs_jobs_and_reports_their_results() {
    let srv = start(Behaviour::Good, "1.0.0");
    std::fs::write(&srv.config_file, "3.1\n").unwrap();
    let url = srv.url();
    let r = loadgen_json(&[
        "converge",
        "--url",
        &url,
        "--protocol",
        "bootagent",
        "--hosts",
        "10",
        "--agents",
        "2",
        "--interval",
        "0.3",
        "--expect-version",
        "3.1",
        "--reload-after",
        "0.2",
        "--max-duration",
        "30",
        "--settle",
        "0.7",
        "-c",
        "2",
    ]);
    assert_eq!(num(&r, &["convergence", "converged"]), 10, "{r:#}");
    assert_eq!(num(&r, &["error_total"]), 0, "{r:#}");
    let seen = srv.seen.lock().unwrap();
    assert_eq!(seen.registers, 10, "each host registers once");
    // Job results travel in the next report, which the settle time leaves room for.
    assert_eq!(seen.job_results.len(), 20, "{:?}", seen.job_results);
    assert!(seen
        .job_results
        .contains(&"sim-000000009/agent-1/3.1".to_string()));
    for agents in seen.hosts.values() {
        assert!(agents.values().all(|v| v == "3.1"), "{agents:?}");
    }
}

#[test]
fn converge_without_reload_flag_times_from_the_first_answer_naming_the_version() {
    let srv = start(Behaviour::Good, "1.0.0");
    let url = srv.url();
    let reload = srv.addr;
    let seen = srv.seen.clone();
    let cfg = srv.config_file.clone();
    // Someone else changes the config once the fleet is up and reporting.
    let changer = std::thread::spawn(move || {
        test_support::wait_for(
            "the fleet to report",
            std::time::Duration::from_secs(30),
            || seen.lock().unwrap().reports >= 20,
        );
        std::fs::write(&cfg, "2.0.0").unwrap();
        let mut s = std::net::TcpStream::connect(reload).unwrap();
        use std::io::{Read, Write};
        s.write_all(b"GET /config/reload HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    });
    let r = loadgen_json(&[
        "converge",
        "--url",
        &url,
        "--hosts",
        "10",
        "--interval",
        "0.3",
        "--expect-version",
        "2.0.0",
        "--max-duration",
        "30",
        "-c",
        "2",
    ]);
    changer.join().unwrap();
    assert_eq!(num(&r, &["convergence", "converged"]), 10, "{r:#}");
    assert!(
        r["convergence"]["change_at_secs"].as_f64().unwrap() > 0.0,
        "{r:#}"
    );
    assert!(r["convergence"]["t100_secs"].is_number(), "{r:#}");
}

#[test]
fn bad_settings_exit_with_usage_and_say_why() {
    for (args, why) in [
        (vec!["closed", "--hosts", "0"], "hosts"),
        (vec!["closed", "--url", "https://127.0.0.1:1"], "http://"),
        (
            vec![
                "closed",
                "--agent-prefix",
                "../x",
                "--url",
                "http://127.0.0.1:1",
            ],
            "agent name",
        ),
        (
            vec!["open", "--rate", "0", "--url", "http://127.0.0.1:1"],
            "rate",
        ),
        (
            vec!["closed", "-c", "0", "--url", "http://127.0.0.1:1"],
            "connections",
        ),
    ] {
        let (code, _, err) = loadgen(&args);
        assert_eq!(code, 64, "{args:?}: {err}");
        assert!(err.contains(why), "{args:?}: {err}");
    }
}

#[test]
fn human_report_names_every_figure() {
    let srv = start(Behaviour::Good, "1.0.0");
    let url = srv.url();
    let (code, out, err) = loadgen(&[
        "closed",
        "--url",
        &url,
        "--hosts",
        "5",
        "--requests",
        "10",
        "-c",
        "1",
        "--progress",
    ]);
    assert_eq!(code, 0, "{err}");
    for word in ["requests 10", "p99", "p99.9", "errors 0", "connects 1"] {
        assert!(out.contains(word), "{word:?} not in {out}");
    }
}
