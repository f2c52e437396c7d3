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
