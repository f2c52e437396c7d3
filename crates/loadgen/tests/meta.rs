//! `ops-loadgen` against the real `ops-meta` binary: the simulated fleet shows up in
//! meta's status, a rollout triggered by a config reload reaches every host, the open loop
//! keeps to its rate, and a stopped meta is counted as connect errors.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{loadgen_json, num};
use test_support::{KillOnDrop, TempDir};

struct Meta {
    _child: KillOnDrop,
    addr: SocketAddr,
    cfg: PathBuf,
    dir: TempDir,
}

impl Meta {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// GET `path` and parse the JSON answer.
    fn get_json(&self, path: &str) -> serde_json::Value {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let body = rt.block_on(async {
            let target = loadgen::client::Target::resolve(&self.url()).await.unwrap();
            let mut conn = loadgen::client::Conn::new(target, Duration::from_secs(10));
            conn.get(path).await.unwrap()
        });
        serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body:?}"))
    }
}

fn meta_config(port: u16, version: &str, tarballs: &Path) -> String {
    let agents: Vec<_> = (0..3)
        .map(|i| {
            serde_json::json!({"default": {"name": format!("agent-{i}"), "version": version,
                "tarball": format!("http://127.0.0.1:{port}/agents"), "md5": "", "cmd": "start"}})
        })
        .collect();
    serde_json::json!({"debug": false, "tarballDir": tarballs,
        "http": {"enabled": true, "listen": format!("127.0.0.1:{port}")}, "agents": agents})
    .to_string()
}

fn start_meta(version: &str) -> Meta {
    let dir = test_support::tempdir().unwrap();
    let port = test_support::free_port();
    let tarballs = dir.path().join("tarball");
    std::fs::create_dir_all(&tarballs).unwrap();
    let cfg = test_support::write_file(
        dir.path(),
        "cfg.json",
        meta_config(port, version, &tarballs),
    );
    let child = test_support::command(&test_support::cargo_bin("ops-meta"))
        .arg("-c")
        .arg(&cfg)
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start ops-meta");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let child = KillOnDrop(child);
    test_support::wait_listening(addr, Duration::from_secs(30));
    Meta {
        _child: child,
        addr,
        cfg,
        dir,
    }
}

#[test]
fn closed_loop_against_meta_has_no_errors_and_meta_shows_every_simulated_host() {
    let meta = start_meta("1.0.0");
    let url = meta.url();
    let r = loadgen_json(&[
        "closed",
        "--url",
        &url,
        "--hosts",
        "30",
        "--requests",
        "90",
        "-c",
        "4",
    ]);
    assert_eq!(num(&r, &["requests"]), 90, "{r:#}");
    assert_eq!(num(&r, &["ok"]), 90, "{r:#}");
    assert_eq!(num(&r, &["error_total"]), 0, "{r:#}");
    for agent in ["agent-0", "agent-2"] {
        let status = meta.get_json(&format!("/status/json/{agent}"));
        let hosts = status.as_object().unwrap();
        assert_eq!(hosts.len(), 30, "{status:#}");
        for i in 0..30 {
            let h = &hosts[&format!("sim-{i:09}")];
            assert_eq!(h["version"], "1.0.0", "{status:#}");
            assert_eq!(h["status"], "started", "{status:#}");
        }
    }
}

#[test]
fn converge_reaches_every_host_after_meta_reloads_a_new_config() {
    let meta = start_meta("1.0.0");
    let port = meta.addr.port();
    let new = test_support::write_file(
        meta.dir.path(),
        "new.json",
        meta_config(port, "2.0.0", &meta.dir.path().join("tarball")),
    );
    let url = meta.url();
    let r = loadgen_json(&[
        "converge",
        "--url",
        &url,
        "--hosts",
        "30",
        "--interval",
        "0.5",
        "--expect-version",
        "2.0.0",
        "--reload-after",
        "0.3",
        "--new-config",
        new.to_str().unwrap(),
        "--meta-config",
        meta.cfg.to_str().unwrap(),
        "--settle",
        "1.2",
        "--max-duration",
        "60",
        "-c",
        "4",
    ]);
    assert_eq!(num(&r, &["convergence", "converged"]), 30, "{r:#}");
    assert_eq!(
        num(&r, &["convergence", "converged_before_change"]),
        0,
        "{r:#}"
    );
    assert!(r["convergence"]["t100_secs"].is_number(), "{r:#}");
    assert_eq!(num(&r, &["error_total"]), 0, "{r:#}");
    // After the settle time every host has reported the new version to meta.
    let status = meta.get_json("/status/json/agent-1");
    let hosts = status.as_object().unwrap();
    assert_eq!(hosts.len(), 30, "{status:#}");
    assert!(
        hosts.values().all(|h| h["version"] == "2.0.0"),
        "{status:#}"
    );
}

#[test]
fn open_loop_against_meta_sends_about_the_rate() {
    let meta = start_meta("1.0.0");
    let url = meta.url();
    let r = loadgen_json(&[
        "open",
        "--url",
        &url,
        "--hosts",
        "500",
        "--rate",
        "100",
        "--duration",
        "1",
        "-c",
        "4",
    ]);
    let n = num(&r, &["requests"]);
    assert!((70..=130).contains(&n), "sent {n}: {r:#}");
    assert_eq!(num(&r, &["error_total"]), 0, "{r:#}");
}

#[test]
fn bootagent_hosts_register_then_report_to_meta_without_errors() {
    let meta = start_meta("1.0.0");
    let url = meta.url();
    let r = loadgen_json(&[
        "closed",
        "--url",
        &url,
        "--protocol",
        "bootagent",
        "--hosts",
        "20",
        "--requests",
        "60",
        "-c",
        "4",
    ]);
    // 60 status reports plus one registration per host, all answered. A host's second
    // slot can come up while another connection still waits for its registration answer
    // (on a loaded machine), and then registers it once more: at most one extra per
    // connection.
    let requests = num(&r, &["requests"]);
    assert!((80..=84).contains(&requests), "{r:#}");
    assert_eq!(num(&r, &["ok"]), requests, "{r:#}");
    assert_eq!(num(&r, &["error_total"]), 0, "{r:#}");
}

#[test]
fn a_stopped_meta_is_counted_as_connect_errors() {
    let meta = start_meta("1.0.0");
    let url = meta.url();
    drop(meta);
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
}

/// Publishes a tarball of every agent at `version` in meta's `tarballDir`, so that meta
/// knows its digests and hands BootAgent hosts install jobs (the hosts never download it).
fn publish_tarballs(meta: &Meta, version: &str) {
    let dir = meta.dir.path().join("tarball").join("agents");
    for i in 0..3 {
        let name = format!("agent-{i}");
        let bytes = format!("{name} {version}: not a real tarball");
        test_support::tarball::publish(&dir, &name, version, bytes.as_bytes());
    }
}

/// The state meta shows of `agent` on `host`: the legacy status page, or the BootAgent
/// host view.
fn meta_state(meta: &Meta, host: &str, agent: &str) -> Option<(String, String)> {
    let page = meta.get_json(&format!("/status/json/{agent}"));
    if let Some(h) = page.get(host).filter(|h| !h.is_null()) {
        return Some((
            h["version"].as_str()?.to_string(),
            h["status"].as_str()?.to_string(),
        ));
    }
    let v = meta.get_json(&format!("/api/hosts/{host}"));
    let a = v["agents"]
        .as_array()?
        .iter()
        .find(|a| a["name"] == agent)?;
    Some((
        a["version"].as_str()?.to_string(),
        a["status"].as_str()?.to_string(),
    ))
}

/// `(agent, kind, version)` of every event meta holds for `host`.
fn meta_events(meta: &Meta, host: &str) -> Vec<(String, String, String)> {
    let v = meta.get_json(&format!("/api/hosts/{host}"));
    v["events"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    let s = |k: &str| e[k].as_str().unwrap_or_default().to_string();
                    (s("agent"), s("kind"), s("version"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A converge run against a meta that wants 2.0.0, with `--fail-share 0.2` and `mode`.
/// Returns the report and which hosts the share picked.
fn failing_run(
    meta: &Meta,
    protocol: &str,
    hosts: u64,
    mode: &str,
) -> (serde_json::Value, Vec<bool>) {
    let url = meta.url();
    let n = hosts.to_string();
    let r = loadgen_json(&[
        "converge",
        "--url",
        &url,
        "--protocol",
        protocol,
        "--hosts",
        &n,
        "--interval",
        "0.5",
        "--expect-version",
        "2.0.0",
        "--fail-share",
        "0.2",
        "--fail-mode",
        mode,
        "--settle",
        "1",
        "--max-duration",
        "60",
        "-c",
        "4",
    ]);
    let spec = loadgen::failure::FailSpec {
        share: 0.2,
        version: "2.0.0".into(),
        mode: mode.parse().unwrap(),
    };
    let picked = (0..hosts)
        .map(|i| spec.picks(&format!("sim-{i:09}")))
        .collect();
    (r, picked)
}

#[test]
fn never_start_hosts_report_rolled_back_and_the_others_converge() {
    for protocol in ["legacy", "bootagent"] {
        let meta = start_meta("2.0.0");
        publish_tarballs(&meta, "2.0.0");
        let (r, picked) = failing_run(&meta, protocol, 200, "never-start");
        let failing = picked.iter().filter(|&&p| p).count() as u64;
        assert!(
            (25..=55).contains(&failing),
            "{protocol}: about 20 %: {failing}"
        );
        let c = &r["convergence"];
        assert_eq!(num(&r, &["convergence", "failed"]), failing, "{r:#}");
        assert_eq!(
            num(&r, &["convergence", "converged"]),
            200 - failing,
            "{r:#}"
        );
        assert_eq!(num(&r, &["convergence", "not_converged"]), 0, "{r:#}");
        assert!(c["t100_secs"].is_number(), "{protocol}: {r:#}");
        assert_eq!(num(&r, &["error_total"]), 0, "{r:#}");
        for (i, &fails) in picked.iter().enumerate() {
            let host = format!("sim-{i:09}");
            let events = meta_events(&meta, &host);
            let rolled: Vec<_> = events
                .iter()
                .filter(|(_, k, v)| k == "rolled_back" && v == "2.0.0")
                .collect();
            let (version, status) = meta_state(&meta, &host, "agent-1").expect("reported");
            if fails {
                assert_eq!(
                    rolled.len(),
                    3,
                    "{protocol} {host}: one per agent: {events:?}"
                );
                assert_eq!(version, "1.0.0", "{protocol} {host}: the old version runs");
            } else {
                assert!(events.is_empty(), "{protocol} {host}: {events:?}");
                assert_eq!(version, "2.0.0", "{protocol} {host}");
            }
            assert!(
                status == "started" || status == "running",
                "{protocol} {host}: {status}"
            );
        }
    }
}

#[test]
fn crashing_hosts_end_fatal_at_meta_with_the_supervisors_events() {
    for protocol in ["legacy", "bootagent"] {
        let meta = start_meta("2.0.0");
        publish_tarballs(&meta, "2.0.0");
        let (r, picked) = failing_run(&meta, protocol, 40, "crash-after=1");
        let failing = picked.iter().filter(|&&p| p).count() as u64;
        assert!(failing > 0, "40 hosts at 20 % pick some");
        assert_eq!(num(&r, &["convergence", "failed"]), failing, "{r:#}");
        assert_eq!(
            num(&r, &["convergence", "converged"]),
            40 - failing,
            "{r:#}"
        );
        for (i, &fails) in picked.iter().enumerate() {
            let host = format!("sim-{i:09}");
            let (version, status) = meta_state(&meta, &host, "agent-0").expect("reported");
            assert_eq!(version, "2.0.0", "{protocol} {host}");
            let events = meta_events(&meta, &host);
            if !fails {
                assert!(events.is_empty(), "{protocol} {host}: {events:?}");
                continue;
            }
            assert_eq!(status, "fatal", "{protocol} {host}");
            let kinds: Vec<&str> = events
                .iter()
                .filter(|(a, _, _)| a == "agent-0")
                .map(|(_, k, _)| k.as_str())
                .collect();
            assert_eq!(
                kinds,
                [
                    "exited",
                    "restarted",
                    "exited",
                    "restarted",
                    "exited",
                    "fatal"
                ],
                "{protocol} {host}: each event once, in order"
            );
        }
    }
}
