//! A staged rollout over a simulated fleet (`bench/rollout` at a size a test can afford):
//! `ops-loadgen converge` plays 2,000 hosts in each protocol, 5 % of them crash-looping on
//! the new version; the rollout, driven through `opsctl`, passes its first wave, pauses
//! itself in the second when the failures reach the threshold and says why, and completes
//! after an operator's `resume`.

use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use test_support::KillOnDrop;

const HOSTS: u64 = 2000;

struct Run {
    _meta: KillOnDrop,
    loadgen: Option<Child>,
    server: String,
    dir: test_support::TempDir,
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(mut l) = self.loadgen.take() {
            let _ = l.kill();
            let _ = l.wait();
        }
    }
}

impl Run {
    fn opsctl(&self, args: &[&str]) -> Output {
        test_support::command(&test_support::cargo_bin("opsctl"))
            .env("OPSCTL_SERVER", &self.server)
            .env_remove("OPSCTL_TOKEN")
            .env_remove("OPSCTL_CONFIG")
            .env("HOME", self.dir.path())
            .args(args)
            .output()
            .expect("run opsctl")
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.opsctl(&all);
        assert!(
            out.status.success(),
            "opsctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

fn start(protocol: &str) -> Run {
    let dir = test_support::tempdir().unwrap();
    let port = test_support::free_port();
    let server = format!("http://127.0.0.1:{port}");
    let tarballs = dir.path().join("tarballs");
    std::fs::create_dir_all(&tarballs).unwrap();
    // ops-meta admits hosts once it knows the release's digest; the simulated hosts do
    // not download it.
    std::fs::write(tarballs.join("agent-0-2.0.0.tar.gz"), "release 2.0.0").unwrap();
    let cfg = serde_json::json!({
        "tarballDir": tarballs, "rolloutPassMillis": 200,
        "http": {"enabled": true, "listen": format!("127.0.0.1:{port}")},
        "agents": [{"default": {"name": "agent-0", "version": "1.0.0",
            "tarball": format!("{server}/"), "md5": "", "cmd": "start"}}]
    });
    let cfg = test_support::write_file(dir.path(), "cfg.json", cfg.to_string());
    let meta = test_support::command(&test_support::cargo_bin("ops-meta"))
        .arg("-c")
        .arg(&cfg)
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ops-meta");
    let meta = KillOnDrop(meta);
    test_support::wait_listening(
        format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_secs(30),
    );
    let loadgen = test_support::command(&test_support::cargo_bin("ops-loadgen"))
        .args(["converge", "--url", &server, "--protocol", protocol])
        .args([
            "--hosts",
            &HOSTS.to_string(),
            "--agents",
            "1",
            "--interval",
            "1",
        ])
        .args(["--expect-version", "2.0.0", "--fail-share", "0.05"])
        .args([
            "--fail-mode",
            "crash-after=1",
            "--max-duration",
            "300",
            "--keep-going",
        ])
        .args(["--connections", "8", "--threads", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ops-loadgen");
    Run {
        _meta: meta,
        loadgen: Some(loadgen),
        server,
        dir,
    }
}

fn wait_until(what: &str, r: &Run, id: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let v = r.json(&["rollout", "status", id]);
        if cond(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: {v:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn rollout_pauses_at_the_threshold_then_completes(protocol: &str) {
    let r = start(protocol);
    let spec = [
        "--agent",
        "agent-0",
        "--version",
        "2.0.0",
        "--wave",
        "ten:percent=10",
        "--wave",
        "rest:percent=100",
        "--max-in-flight",
        "2000",
        "--min-healthy",
        "3",
        "--healthy-deadline",
        "60",
        "--max-failures",
        "20",
    ];
    // The plan, once every simulated host reported.
    let deadline = Instant::now() + Duration::from_secs(120);
    let sizes: Vec<u64> = loop {
        let plan = r.json(&[&["rollout", "plan"][..], &spec[..]].concat());
        let sizes: Vec<u64> = plan["waves"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["hosts"].as_u64().unwrap())
            .collect();
        if sizes.iter().sum::<u64>() == HOSTS {
            break sizes;
        }
        assert!(Instant::now() < deadline, "{protocol}: {plan:#}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!((150..250).contains(&sizes[0]), "{sizes:?}");
    let created = r.json(&[&["rollout", "create"][..], &spec[..], &["--start"][..]].concat());
    let id = created["id"].as_str().unwrap().to_string();
    // The first wave (about 10 crash-looping hosts of 200) is done before the threshold
    // (20) is reached; the second (about 90 of 1,800) pauses it.
    let v = wait_until("a pause", &r, &id, |v| v["state"] == "paused");
    assert_eq!(v["waves"][0]["state"], "done", "{protocol}: {v:#}");
    let first = &v["waves"][0]["counts"];
    assert!(first["failed"].as_u64().unwrap() < 20, "{protocol}: {v:#}");
    assert!(
        first["healthy"].as_u64().unwrap() + first["failed"].as_u64().unwrap()
            == v["waves"][0]["hosts"].as_u64().unwrap(),
        "{protocol}: {v:#}"
    );
    let reason = v["pausedReason"].as_str().unwrap();
    assert!(
        reason.contains("error threshold") && reason.contains("\"rest\""),
        "{reason}"
    );
    assert!(
        v["failures"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["reason"].as_str().unwrap().contains("fatal")),
        "{protocol}: {v:#}"
    );
    // `opsctl rollout status` says it in words, and exits 10 for scripts.
    let out = r.opsctl(&["rollout", "status", &id, "--exit-status"]);
    assert_eq!(out.status.code(), Some(10));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("why it is not moving"), "{text}");
    // Paused, the hosts admitted go on; once none is in flight every failure of the wave
    // is known, and a resume accepts them all.
    wait_until("the wave to settle", &r, &id, |v| {
        v["counts"]["inFlight"] == 0 && v["state"] == "paused"
    });
    // Resumed, it completes: every host healthy but the crash-looping ones.
    let out = r.opsctl(&["rollout", "resume", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = wait_until("completion", &r, &id, |v| v["state"] == "completed");
    let c = &v["counts"];
    assert_eq!(
        c["healthy"].as_u64().unwrap() + c["failed"].as_u64().unwrap(),
        HOSTS,
        "{protocol}: {v:#}"
    );
    let failed = c["failed"].as_u64().unwrap();
    assert!((50..160).contains(&failed), "{protocol}: {failed} failed");
}

#[test]
fn a_simulated_legacy_fleet_rollout_pauses_at_the_threshold_then_completes() {
    rollout_pauses_at_the_threshold_then_completes("legacy");
}

#[test]
fn a_simulated_bootagent_fleet_rollout_pauses_at_the_threshold_then_completes() {
    rollout_pauses_at_the_threshold_then_completes("bootagent");
}
