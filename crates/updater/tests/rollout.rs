//! A staged rollout end to end, driven only through `opsctl`: three real ops-updaters (one
//! per protocol mode: legacy, bootagent, auto) and one ops-meta. The new release
//! crash-loops on one host, whose supervisor gives up (`fatal`); the rollout pauses itself
//! at its threshold and says why, completes after `resume`, and a rollback takes every
//! host back, the crash-looping one included.

mod common;

use std::process::Output;

use common::*;
use serde_json::{json, Value};
use test_support::agent::Behaviour;
use test_support::wait_for;

/// The release 2.0 of `svc`: a good agent, except on a host whose workdir holds
/// `CRASH_HERE`, where the process dies a second after it started.
fn crashing_on_marked_hosts() -> Vec<u8> {
    let good = test_support::agent::control_script("svc", "2.0", Behaviour::Good);
    let run = "nohup sh -c 'while :; do sleep 1; done' >/dev/null 2>&1 &";
    assert!(good.contains(run));
    let script = good.replace(
        run,
        "if [ -e ../../CRASH_HERE ]; then nohup sh -c 'sleep 1; exit 3' >/dev/null 2>&1 &\n    else nohup sh -c 'while :; do sleep 1; done' >/dev/null 2>&1 &\n    fi",
    );
    use test_support::tarball::{targz, Entry};
    targz(&[
        Entry::exec("control", script),
        Entry::file("VERSION", "2.0\n"),
    ])
}

struct Opsctl {
    bin: std::path::PathBuf,
    server: String,
    /// An empty home: no config file of the machine's user is read.
    home: test_support::TempDir,
}

impl Opsctl {
    fn run(&self, args: &[&str]) -> Output {
        test_support::command(&self.bin)
            .env("OPSCTL_SERVER", &self.server)
            .env_remove("OPSCTL_TOKEN")
            .env_remove("OPSCTL_CONFIG")
            .env("HOME", self.home.path())
            .args(args)
            .output()
            .expect("run opsctl")
    }

    /// Runs and expects exit code `code`; returns stdout.
    fn expect(&self, code: i32, args: &[&str]) -> String {
        let out = self.run(args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(
            out.status.code(),
            Some(code),
            "opsctl {}:\nstdout:\n{stdout}\nstderr:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.expect(0, &all)).unwrap()
    }
}

fn policy(c: &mut Value, mode: &str) {
    if mode == "auto" {
        c.as_object_mut().unwrap().remove("protocol");
    } else {
        c["protocol"] = json!(mode);
    }
    c["supervise"] = json!({"checkSecs": 1, "restartDelaySecs": 1,
        "failWindowSecs": 60, "maxFailures": 2});
}

#[test]
fn a_rollout_driven_by_opsctl_pauses_on_a_crash_loop_resumes_and_rolls_back() {
    let mut meta = Meta::start(json!([]));
    publish(&meta, "svc", "1.0", Behaviour::Good);
    meta.desire(&[("svc", "1.0", "start")]);
    let opsctl = Opsctl {
        bin: test_support::cargo_bin("opsctl"),
        server: meta.base(),
        home: test_support::tempdir().unwrap(),
    };
    let hosts = [
        ("web-01", "legacy"),
        ("web-02", "bootagent"),
        ("web-03", "auto"),
    ];
    let updaters: Vec<Updater> = hosts
        .iter()
        .map(|(h, mode)| {
            let mut u = Updater::prepare(&meta.base(), h, |c| policy(c, mode));
            if *h == "web-03" {
                std::fs::write(u.work().join("CRASH_HERE"), "").unwrap();
            }
            u.spawn();
            u
        })
        .collect();
    for u in &updaters {
        u.wait_running("svc", "1.0");
    }

    // The operator publishes 2.0 with opsctl, into ops-meta's tarballDir.
    let staged = test_support::tempdir().unwrap();
    let file = staged.path().join("svc-2.0.tar.gz");
    std::fs::write(&file, crashing_on_marked_hosts()).unwrap();
    let dir = meta.tarball_dir();
    opsctl.expect(
        0,
        &[
            "publish",
            file.to_str().unwrap(),
            "--dir",
            dir.to_str().unwrap(),
        ],
    );
    assert!(dir.join("svc-2.0.tar.gz.md5").is_file());
    assert!(dir.join("svc-2.0.tar.gz.sha256").is_file());

    let spec = [
        "--agent",
        "svc",
        "--version",
        "2.0",
        "--wave",
        "first:prefix=web-01",
        "--wave",
        "rest:percent=100",
        "--max-in-flight",
        "2",
        "--min-healthy",
        "3",
        "--healthy-deadline",
        "60",
        "--max-failures",
        "1",
    ];
    let plan = opsctl.expect(0, &[&["rollout", "plan"][..], &spec[..]].concat());
    assert!(plan.contains("first") && plan.contains("web-01"), "{plan}");
    let created = opsctl.json(&[&["rollout", "create"][..], &spec[..], &["--start"][..]].concat());
    let id = created["id"].as_str().unwrap().to_string();

    // web-03 crash-loops to fatal: the rollout pauses itself (watch exits 10) and says why.
    opsctl.expect(
        10,
        &[
            "rollout",
            "watch",
            &id,
            "--until-paused",
            "--interval",
            "0.2",
        ],
    );
    let status = opsctl.expect(0, &["rollout", "status", &id]);
    assert!(status.contains("error threshold"), "{status}");
    assert!(status.contains("web-03"), "{status}");
    assert!(status.contains("fatal"), "{status}");
    assert_eq!(
        opsctl
            .run(&["rollout", "status", &id, "--exit-status"])
            .status
            .code(),
        Some(10)
    );
    let v = opsctl.json(&["rollout", "status", &id]);
    assert_eq!(v["state"], "paused", "{v}");
    let failed: Vec<&str> = v["failures"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["phase"] == "failed")
        .map(|f| f["host"].as_str().unwrap())
        .collect();
    assert_eq!(failed, vec!["web-03"], "{v}");
    assert_eq!(
        updaters[2].agent_status("svc").unwrap()["supervisor"],
        "fatal",
        "{:?}",
        updaters[2].agent_status("svc")
    );

    // The operator accepts the failure and resumes: the rollout completes.
    opsctl.expect(0, &["rollout", "resume", &id]);
    opsctl.expect(0, &["rollout", "watch", &id, "--interval", "0.2"]);
    let v = opsctl.json(&["rollout", "status", &id]);
    assert_eq!(v["state"], "completed", "{v}");
    assert_eq!(v["counts"]["healthy"], 2, "{v}");
    assert!(v["permanent"].as_str().unwrap().contains("2.0"), "{v}");
    for u in &updaters[..2] {
        u.wait_running("svc", "2.0");
    }

    // The release is bad after all: roll back, every host goes back to 1.0, web-03 too
    // (a new desired version clears fatal).
    let back = opsctl.json(&["rollout", "rollback", &id]);
    let back_id = back["id"].as_str().unwrap().to_string();
    assert_eq!(back["version"], "1.0", "{back}");
    opsctl.expect(0, &["rollout", "watch", &back_id, "--interval", "0.2"]);
    for u in &updaters {
        u.wait_running("svc", "1.0");
    }
    wait_for("the first rollout to be rolled back", CONVERGE, || {
        opsctl.json(&["rollout", "status", &id])["state"] == "rolled_back"
    });
    let list = opsctl.expect(0, &["rollout", "list"]);
    assert!(list.contains(&id) && list.contains(&back_id), "{list}");
    drop(updaters);
    meta.child.take();
}
