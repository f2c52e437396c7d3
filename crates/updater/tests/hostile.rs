//! Hostile input: archives that try to escape or exhaust the workdir (each must leave it as
//! it was), and a server that answers heartbeats with garbage, errors, huge bodies, bad
//! names and silence (the daemon must keep going and still converge afterwards).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use serde_json::json;
use test_support::agent::{agent_tarball, Behaviour};
use test_support::{digests, wait_for, wait_for_some};

#[test]
fn hostile_archives_leave_the_workdir_as_it_was() {
    let mut meta = Meta::start(json!([]));
    publish(&meta, "falcon", "1.0.0", Behaviour::Good);
    meta.desire(&[("falcon", "1.0.0", "start")]);
    let u = Updater::start(&meta.addr.to_string(), "host-01", |_| {});
    u.wait_running("falcon", "1.0.0");
    let pwned_before = std::path::Path::new("/tmp/agent-updater-pwned").exists();

    for (i, (what, archive)) in test_support::tarball::hostile_archives()
        .into_iter()
        .enumerate()
    {
        let version = format!("6.6.{i}");
        // Published with a correct .md5: the checksum passes, the unpacker must refuse.
        test_support::tarball::publish(&meta.tarball_dir(), "falcon", &version, &archive);
        // The event journal takes the refusal (`install_failed`, checked below); nothing
        // else may change.
        let journal = ".ops-updater.events.json".to_string();
        let before: Vec<String> = tree_without_scratch(&u.work())
            .into_iter()
            .filter(|p| *p != journal)
            .collect();
        meta.desire(&[("falcon", &version, "start")]);
        let s = wait_for_some(&format!("{what}: refused"), CONVERGE, || {
            let s = u.agent_status("falcon")?;
            (s["backoff"]["version"] == version.as_str()).then_some(s)
        });
        assert_eq!(s["lastResult"], "failed", "{what}: {s}");
        let after: Vec<String> = tree_without_scratch(&u.work())
            .into_iter()
            .filter(|p| *p != journal)
            .collect();
        assert_eq!(before, after, "{what}: workdir changed");
        assert_eq!(u.version_of("falcon").as_deref(), Some("1.0.0"), "{what}");
        assert_eq!(
            status_of(&u.work().join("falcon/1.0.0")),
            "started",
            "{what}"
        );
    }
    // Every refusal was reported as the release's fault: an archive refused.
    let journal = std::fs::read_to_string(u.work().join(".ops-updater.events.json")).unwrap();
    assert!(
        journal.contains("install_failed") && journal.contains("\"archive\""),
        "{journal}"
    );
    if !pwned_before {
        assert!(!std::path::Path::new("/tmp/agent-updater-pwned").exists());
    }
    assert!(!u.dir.path().join("pwned").exists());
}

#[test]
fn hostile_heartbeat_answers_never_stop_the_daemon() {
    let tarball = agent_tarball("falcon", "1.0.0", Behaviour::Good);
    let (md5, _) = digests(&tarball);
    let round = Arc::new(AtomicUsize::new(0));
    let r = round.clone();
    // The handler names its own address in `tarball`; it is known once bound.
    let base = Arc::new(std::sync::OnceLock::<String>::new());
    let b = base.clone();
    let release = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hang = release.clone();
    let server = Scripted::start(move |req| {
        if req.path == "/falcon-1.0.0.tar.gz" {
            return Reply::Full(200, "application/gzip", tarball.clone());
        }
        if req.path == "/falcon-1.0.0.tar.gz.md5" {
            return Reply::Full(
                200,
                "text/plain",
                proto::legacy::format_md5_file(&md5, "falcon-1.0.0.tar.gz").into_bytes(),
            );
        }
        if req.path != "/heartbeat" || req.method != "POST" {
            return Reply::Full(404, "text/plain", b"not found".to_vec());
        }
        // The request must be the legacy shape.
        let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
        assert_eq!(body["hostname"], "host-01");
        let n = r.fetch_add(1, Ordering::SeqCst);
        let json =
            |v: serde_json::Value| Reply::Full(200, "application/json", v.to_string().into_bytes());
        let good = json!({"errorMessage": "", "desiredAgents": [{
            "name": "falcon", "version": "1.0.0", "tarball": b.get().unwrap(),
            "md5": "", "cmd": "start"}]});
        match n {
            0 => Reply::Full(200, "application/json", b"{\"desiredAgents\": [".to_vec()),
            1 => Reply::Full(500, "text/plain", b"internal error".to_vec()),
            // 8 MiB: past the 4 MiB response cap.
            2 => Reply::Full(200, "application/json", {
                let mut b = b"{\"errorMessage\":\"".to_vec();
                b.extend(std::iter::repeat_n(b'x', 8 << 20));
                b.extend_from_slice(b"\"}");
                b
            }),
            3 => json(json!({"errorMessage": "", "desiredAgents": null})),
            4 => json(json!({"errorMessage": "", "desiredAgents": [
                {"name": "../../escape", "version": "1.0.0", "tarball": "http://127.0.0.1:1", "cmd": "start"},
                {"name": "evil", "version": "../../1", "tarball": "http://127.0.0.1:1", "cmd": "start"},
                {"name": "local", "version": "1", "tarball": "file:///etc", "cmd": "start"},
                {"name": "odd", "version": "1", "tarball": "http://127.0.0.1:1", "cmd": "explode"},
                {"name": 5, "version": [], "cmd": {}}
            ]})),
            5 => json(json!([1, 2, 3])),
            6 => Reply::Full(200, "application/json", Vec::new()),
            // A server-side error: do nothing this round, even with a desired list.
            7 => {
                let mut g = good.clone();
                g["errorMessage"] = json!("maintenance");
                json(g)
            }
            // Silence: headers and a few bytes, then nothing until the test ends.
            8 => Reply::Stall(b"{\"errorMessage\": \"\"}".to_vec(), 5, hang.clone()),
            _ => json(good),
        }
    });
    base.set(server.base()).unwrap();
    let mut u = Updater::start(&server.addr.to_string(), "host-01", |c| {
        c["heartbeatTimeoutSecs"] = json!(1)
    });
    u.wait_running("falcon", "1.0.0");
    u.assert_alive();
    assert!(round.load(Ordering::SeqCst) >= 10);
    let d = u.daemon_status();
    assert!(d["heartbeatsFailed"].as_u64().unwrap() >= 6, "{d}");
    let names: Vec<String> = std::fs::read_dir(u.work())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != updater::workdir::LOCK_FILE)
        .collect();
    assert_eq!(names, ["falcon"]);
    assert!(!u.dir.path().join("escape").exists());
    let log = u.log_text();
    assert!(log.contains("larger than"), "no size-cap error logged");
    assert!(log.contains("unknown cmd"), "unknown cmd not logged");
    wait_for("a clean heartbeat", CONVERGE, || {
        u.daemon_status()["lastHeartbeatError"].is_null()
    });
    release.store(true, Ordering::SeqCst);
}

#[test]
fn error_message_means_nothing_is_done() {
    let server = Scripted::start(move |req| {
        if req.path != "/heartbeat" {
            return Reply::Full(404, "text/plain", b"not found".to_vec());
        }
        let v = json!({"errorMessage": "host is blocked", "desiredAgents": [{
            "name": "falcon", "version": "1.0.0", "tarball": "http://127.0.0.1:9",
            "md5": "", "cmd": "start"}]});
        Reply::Full(200, "application/json", v.to_string().into_bytes())
    });
    let u = Updater::start(&server.addr.to_string(), "host-01", |_| {});
    u.wait_heartbeats(3);
    assert_eq!(u.daemon_status()["serverError"], "host is blocked");
    assert!(u.agent_status("falcon").is_none());
    assert_eq!(test_support::tree(&u.work()), [updater::workdir::LOCK_FILE]);
    assert!(server.seen().iter().all(|s| s.path == "/heartbeat"));
}

/// Every skipped entry of an answer was logged again every round: 40,000 bad entries at
/// interval 1 wrote megabytes of log per round, enough to fill a host's disk.
#[test]
fn a_flood_of_bad_entries_is_logged_a_few_lines_a_round() {
    let entries: Vec<serde_json::Value> = (0..40_000)
        .map(|i| {
            let (name, cmd) = if i % 2 == 0 {
                (format!("../bad-{i}"), "start")
            } else {
                (format!("agent-{i}"), "reboot")
            };
            json!({"name": name, "version": "1", "tarball": "http://127.0.0.1:9", "md5": "", "cmd": cmd})
        })
        .collect();
    let body = json!({"errorMessage": "", "desiredAgents": entries})
        .to_string()
        .into_bytes();
    let server = Scripted::start(move |req| {
        if req.path != "/heartbeat" {
            return Reply::Full(404, "text/plain", b"not found".to_vec());
        }
        Reply::Full(200, "application/json", body.clone())
    });
    let u = Updater::start(&server.addr.to_string(), "host-01", |_| {});
    u.wait_heartbeats(5);
    let log = u.log_text();
    assert!(
        log.contains("more like it"),
        "{}",
        &log[..log.len().min(4000)]
    );
    // Five rounds of 40,000 bad entries each (RUST_LOG=debug, debug: true).
    assert!(log.len() < 200_000, "{} bytes of log", log.len());
    assert!(log.contains("unknown cmd"), "no unknown cmd line");
}

/// A password in a tarball URL (`http://user:pass@...`) was written to the log and to
/// `/status` in clear.
#[test]
fn credentials_in_a_tarball_url_never_reach_the_log_or_status() {
    let port = std::sync::Arc::new(std::sync::Mutex::new(0u16));
    let p = port.clone();
    let server = Scripted::start(move |req| {
        if req.path != "/heartbeat" {
            return Reply::Full(404, "text/plain", b"not found".to_vec());
        }
        let base = format!("http://deploy:s3cret@127.0.0.1:{}", p.lock().unwrap());
        let v = json!({"errorMessage": "", "desiredAgents": [{
            "name": "falcon", "version": "1.0.0", "tarball": base, "md5": "", "cmd": "start"}]});
        Reply::Full(200, "application/json", v.to_string().into_bytes())
    });
    *port.lock().unwrap() = server.addr.port();
    let u = Updater::start(&server.addr.to_string(), "host-01", |_| {});
    let s = wait_for_some("a back-off for falcon", CONVERGE, || {
        let s = u.agent_status("falcon")?;
        s["backoff"].is_object().then_some(s)
    });
    // The download was tried with the credentials (the server saw the request)...
    assert!(server
        .seen()
        .iter()
        .any(|r| r.path.ends_with(".tar.gz") || r.path.ends_with(".md5")));
    // ...but no line or page shows them.
    let status = s.to_string();
    assert!(!status.contains("s3cret"), "{status}");
    assert!(status.contains("***@127.0.0.1"), "{status}");
    let log = u.log_text();
    assert!(!log.contains("s3cret"), "{log}");
    assert!(log.contains("***@127.0.0.1"), "{log}");
}

/// Group- and world-writable modes from a tarball were kept, although agents run as root:
/// any local user could rewrite `control` and run code as root.
#[test]
fn group_and_world_write_bits_from_a_tarball_are_dropped() {
    use std::os::unix::fs::PermissionsExt as _;
    use test_support::tarball::{publish, targz, Entry};
    let mut meta = Meta::start(json!([]));
    let script = test_support::agent::control_script("falcon", "1.0.0", Behaviour::Good);
    let tb = targz(&[
        Entry::File {
            path: "control".into(),
            mode: 0o777,
            data: script.into_bytes(),
        },
        Entry::File {
            path: "data.txt".into(),
            mode: 0o666,
            data: b"x".to_vec(),
        },
    ]);
    publish(&meta.tarball_dir(), "falcon", "1.0.0", &tb);
    meta.desire(&[("falcon", "1.0.0", "start")]);
    let u = Updater::start(&meta.addr.to_string(), "host-01", |_| {});
    u.wait_running("falcon", "1.0.0");
    let mode = |p: &str| {
        std::fs::metadata(u.work().join("falcon/1.0.0").join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("control"), 0o755);
    assert_eq!(mode("data.txt"), 0o644);
}
