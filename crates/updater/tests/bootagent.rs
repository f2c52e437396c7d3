//! End-to-end tests of BootAgent mode: the real `ops-updater` against the real `ops-meta`
//! (registration, status reports, jobs, operator API), plus in-test servers for what the
//! real meta cannot do (a stalled download, a legacy-only server).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use common::{
    control_actions, get_json, http_post, publish, status_of, Meta, Reply, Scripted, Updater,
    CONVERGE,
};
use serde_json::{json, Value};
use test_support::agent::Behaviour;
use test_support::{command, free_port, wait_for, wait_listening, KillOnDrop};

/// Starts ops-meta with `agents` and extra top-level config keys (e.g. `tagRules`).
fn start_meta(agents: Value, extra: Value) -> Meta {
    let mut m = Meta::prepare(free_port(), agents);
    write_meta_config(&m, &extra);
    m.spawn();
    m
}

fn write_meta_config(m: &Meta, extra: &Value) {
    let mut cfg = json!({
        "debug": true,
        "tarballDir": m.tarball_dir(),
        "http": {"enabled": true, "listen": m.addr.to_string()},
        "agents": m.agents,
    });
    for (k, v) in extra.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    test_support::write_file(
        m.dir.path(),
        "cfg.json",
        serde_json::to_vec_pretty(&cfg).unwrap(),
    );
}

/// Replaces meta's agents (keeping `extra`) and reloads it.
fn set_agents(m: &mut Meta, agents: Value, extra: &Value) {
    m.agents = agents;
    write_meta_config(m, extra);
    let (code, body) = common::http_get(m.addr, "/config/reload").unwrap();
    assert_eq!(code, 200, "{body}");
}

/// An agent entry with its SHA-256, envs and limits, served by meta itself.
fn entry(meta: &Meta, name: &str, version: &str, sha: &str, cmd: &str) -> Value {
    json!({"default": {"name": name, "version": version, "tarball": meta.base(), "md5": "",
        "cmd": cmd, "sha256": sha, "envs": {"GREETING": "hello"},
        "limits": {"CPU": "10%", "memory": "20M"}}})
}

/// Starts an updater in BootAgent mode.
fn boot_updater(server: &str, host: &str, tweak: impl FnOnce(&mut Value)) -> Updater {
    Updater::start(server, host, |c| {
        c["protocol"] = json!("bootagent");
        tweak(c)
    })
}

fn metafile(u: &Updater) -> PathBuf {
    u.work().join(".ops-updater/meta.json")
}

fn read_meta(u: &Updater) -> Option<Value> {
    let text = std::fs::read_to_string(metafile(u)).ok()?;
    serde_json::from_str(&text).ok()
}

fn wait_confirmed(u: &Updater) -> Value {
    wait_for("a confirmed serial in the metafile", CONVERGE, || {
        read_meta(u).is_some_and(|m| m["confirmed"] == true)
    });
    read_meta(u).unwrap()
}

/// The operator's view of `host` on `meta`.
fn host_view(meta: &Meta, host: &str) -> Option<Value> {
    get_json(meta.addr, &format!("/api/hosts/{host}"))
}

/// Queues an operator job for one host; returns the batch id.
fn queue(meta: &Meta, host: &str, job: Value) -> String {
    let mut body = job;
    body["hosts"] = json!([host]);
    let (code, text) = http_post(meta.addr, "/api/jobs", &body);
    assert_eq!(code, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["jobs"].as_array().unwrap().len(), 1, "{v}");
    v["id"].as_str().unwrap().to_string()
}

/// Waits until every job of a batch has a result; returns the batch.
fn wait_batch(meta: &Meta, id: &str) -> Value {
    let mut last = Value::Null;
    wait_for(&format!("batch {id} finished"), CONVERGE, || {
        last = get_json(meta.addr, &format!("/api/jobs/{id}")).unwrap_or(Value::Null);
        last["jobs"].as_array().is_some_and(|j| {
            j.iter()
                .all(|j| j["state"] == "done" || j["state"] == "failed")
        })
    });
    last
}

#[test]
fn first_registration_writes_the_metafile_and_a_restart_keeps_the_identity() {
    let meta = start_meta(
        json!([]),
        json!({"tagRules": [{"prefix": "web", "tags": "svc=web,cmpt=FE"}]}),
    );
    let mut u = boot_updater(&meta.addr.to_string(), "web-01", |_| {});
    let m = wait_confirmed(&u);
    let sn = m["agentsn"].as_str().unwrap().to_string();
    assert_eq!(sn.len(), 36, "a uuid: {m}");
    assert_eq!(m["tags"], "svc=web,cmpt=FE");
    assert_eq!(m["hostname"], "web-01");
    let view = host_view(&meta, "web-01").expect("host registered");
    assert_eq!(view["agentsn"], sn.as_str());
    wait_for("a status report", CONVERGE, || {
        host_view(&meta, "web-01").is_some_and(|v| v["last_seen"].as_i64() > Some(0))
    });
    let view = host_view(&meta, "web-01").unwrap();
    assert!(
        view["version"]
            .as_str()
            .unwrap()
            .starts_with("ops-updater-"),
        "{view}"
    );
    assert_eq!(view["step"], 1);
    u.wait_heartbeats(2);
    let d = u.daemon_status();
    assert_eq!(d["protocol"], "bootagent", "{d}");
    assert_eq!(d["agentsn"], sn.as_str(), "{d}");

    u.kill9();
    u.spawn();
    u.wait_heartbeats(2);
    assert_eq!(read_meta(&u).unwrap()["agentsn"], sn.as_str());
    assert_eq!(host_view(&meta, "web-01").unwrap()["agentsn"], sn.as_str());
    assert_eq!(
        u.log_text().matches("first start: new serial").count(),
        1,
        "{}",
        u.log_text()
    );
}

#[test]
fn two_hosts_from_one_cloned_metafile_end_with_different_serials() {
    let meta = start_meta(json!([]), json!({}));
    let a = boot_updater(&meta.addr.to_string(), "host-a", |_| {});
    let sn_a = wait_confirmed(&a)["agentsn"].as_str().unwrap().to_string();
    // Host b boots from a disk image of host a: same metafile.
    let b = boot_updater(&meta.addr.to_string(), "host-b", |c| {
        // Not started yet: the clone is put in place by the tweak, before the process runs.
        let work = PathBuf::from(c["workdir"].as_str().unwrap());
        std::fs::create_dir_all(work.join(".ops-updater")).unwrap();
        std::fs::copy(metafile(&a), work.join(".ops-updater/meta.json")).unwrap();
    });
    wait_for("host b adopts a serial of its own", CONVERGE, || {
        read_meta(&b).is_some_and(|m| m["confirmed"] == true && m["agentsn"] != sn_a.as_str())
    });
    let sn_b = read_meta(&b).unwrap()["agentsn"]
        .as_str()
        .unwrap()
        .to_string();
    a.wait_heartbeats(2);
    b.wait_heartbeats(2);
    assert_eq!(
        host_view(&meta, "host-a").unwrap()["agentsn"],
        sn_a.as_str()
    );
    assert_eq!(
        host_view(&meta, "host-b").unwrap()["agentsn"],
        sn_b.as_str()
    );
    assert_eq!(read_meta(&a).unwrap()["agentsn"], sn_a.as_str());
}

#[test]
fn install_upgrade_stop_restart_uninstall_through_jobs() {
    let mut meta = start_meta(json!([]), json!({}));
    let (_, sha1) = publish(&meta, "basic", "1.0", Behaviour::Good);
    let (_, sha2) = publish(&meta, "basic", "2.0", Behaviour::Good);
    let agents = json!([entry(&meta, "basic", "1.0", &sha1, "start")]);
    set_agents(&mut meta, agents, &json!({}));
    let u = boot_updater(&meta.addr.to_string(), "host-01", |_| {});
    u.wait_running("basic", "1.0");
    // envs and limits are kept with the agent and shown locally.
    let settings: Value = serde_json::from_str(
        &std::fs::read_to_string(u.work().join("basic/.bootagent.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(settings["envs"]["GREETING"], "hello");
    wait_for("limits on /status", CONVERGE, || {
        u.agent_status("basic")
            .is_some_and(|a| a["limits"]["CPU"] == "10%")
    });
    // The install job's result reaches the operator API.
    wait_for("install result reported", CONVERGE, || {
        host_view(&meta, "host-01").is_some_and(|v| {
            v["results"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["action"] == "install" && r["errcode"] == 0)
        })
    });
    wait_for("reported running", CONVERGE, || {
        host_view(&meta, "host-01").is_some_and(|v| {
            v["agents"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["name"] == "basic" && a["status"] == "running")
        })
    });

    // Upgrade: the desired version changes.
    let agents = json!([entry(&meta, "basic", "2.0", &sha2, "start")]);
    set_agents(&mut meta, agents, &json!({}));
    u.wait_running("basic", "2.0");
    assert_eq!(status_of(&u.work().join("basic/1.0")), "stoped");

    // Stop, restart, uninstall: operator jobs, results through GET /api/jobs/<id>.
    let id = queue(&meta, "host-01", json!({"action": "stop", "name": "basic"}));
    let b = wait_batch(&meta, &id);
    assert_eq!(b["jobs"][0]["state"], "done", "{b}");
    assert_eq!(status_of(&u.work().join("basic/2.0")), "stoped");

    let id = queue(
        &meta,
        "host-01",
        json!({"action": "restart", "name": "basic"}),
    );
    let b = wait_batch(&meta, &id);
    assert_eq!(b["jobs"][0]["state"], "done", "{b}");
    assert_eq!(status_of(&u.work().join("basic/2.0")), "started");
    let actions = control_actions(&u.work().join("basic/2.0"));
    assert_eq!(
        actions.iter().filter(|a| a.starts_with("start")).count(),
        2,
        "{actions:?}"
    );

    let vdir = u.work().join("basic/2.0");
    let id = queue(
        &meta,
        "host-01",
        json!({"action": "uninstall", "name": "basic"}),
    );
    let b = wait_batch(&meta, &id);
    assert_eq!(b["jobs"][0]["state"], "done", "{b}");
    assert!(!u.work().join("basic").exists(), "agent folder removed");
    assert_eq!(status_of(&vdir), "missing");
    let mut leftovers: Vec<_> = std::fs::read_dir(u.work())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    leftovers.sort();
    assert_eq!(
        leftovers,
        [".ops-updater", ".ops-updater.lock"],
        "{leftovers:?}"
    );
    wait_for("uninstalled agent no longer reported", CONVERGE, || {
        // Only the updater's own entry is left.
        host_view(&meta, "host-01").is_some_and(|v| {
            v["agents"]
                .as_array()
                .unwrap()
                .iter()
                .all(|a| a["name"] == "ops-updater")
        })
    });
}

/// A BootAgent server that registers any host, hands out `jobs` in every status answer,
/// and records the job results reports bring back.
fn job_server(jobs: Value) -> (Scripted, Arc<std::sync::Mutex<Vec<Value>>>) {
    let results = Arc::new(std::sync::Mutex::new(Vec::<Value>::new()));
    let r = results.clone();
    let server = Scripted::start(move |req| {
        let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
        match req.path.as_str() {
            "/agent/register" => Reply::Full(
                200,
                "application/json",
                json!({"status": 0, "agentsn": body["agentsn"], "tags": ""})
                    .to_string()
                    .into_bytes(),
            ),
            "/agent/status" => {
                r.lock()
                    .unwrap()
                    .extend(body["jobs"].as_array().cloned().unwrap_or_default());
                Reply::Full(
                    200,
                    "application/json",
                    json!({"status": 0, "jobs": jobs}).to_string().into_bytes(),
                )
            }
            _ => Reply::Full(404, "text/plain", b"not found".to_vec()),
        }
    });
    (server, results)
}

#[test]
fn a_job_without_a_checksum_or_version_is_refused_with_a_reason() {
    // A legacy-only server is not needed: the scripted server speaks BootAgent and hands
    // out hostile jobs, then records the results it gets back.
    let (server, results) = job_server(json!([
        {"id": "no-sum", "action": "install", "name": "a", "version": "1",
         "url": "http://127.0.0.1:1/a-1.tar.gz"},
        {"id": "no-version", "action": "upgrade", "name": "a",
         "url": "http://127.0.0.1:1/a-1.tar.gz",
         "checksum": format!("SHA256:{}", "a".repeat(64))},
        {"id": "escape", "action": "stop", "name": "../etc"},
        {"id": "odd", "action": "reboot", "name": "a"},
    ]));
    let u = boot_updater(&server.addr.to_string(), "host-01", |_| {});
    wait_for("four refusals reported", CONVERGE, || {
        let got = results.lock().unwrap();
        ["no-sum", "no-version", "escape", "odd"]
            .iter()
            .all(|id| got.iter().any(|r| r["id"] == *id))
    });
    let got = results.lock().unwrap().clone();
    let msg = |id: &str| {
        let r = got.iter().find(|r| r["id"] == id).unwrap();
        assert_eq!(r["errcode"], 1, "{r}");
        r["message"].as_str().unwrap().to_string()
    };
    assert!(msg("no-sum").contains("checksum"), "{got:?}");
    assert!(msg("no-version").contains("no version"), "{got:?}");
    assert!(msg("escape").contains("name"), "{got:?}");
    assert!(
        msg("odd").contains("reboot") || msg("odd").contains("variant"),
        "{got:?}"
    );
    // Nothing was created for them.
    assert!(!u.work().join("a").exists());
    // A refused job is not run again when it is sent again: its result is re-sent instead.
    let record: Value = serde_json::from_str(
        &std::fs::read_to_string(u.work().join(".ops-updater/jobs.json")).unwrap(),
    )
    .unwrap();
    assert!(
        record["started"].as_object().unwrap().is_empty(),
        "{record}"
    );
}

#[test]
fn config_job_moves_servers_and_step_and_both_survive_a_restart() {
    let meta_a = start_meta(json!([]), json!({}));
    let meta_b = start_meta(json!([]), json!({}));
    let mut u = boot_updater(&meta_a.addr.to_string(), "host-01", |_| {});
    wait_confirmed(&u);
    let id = queue(
        &meta_a,
        "host-01",
        json!({"action": "config", "svrlist": meta_b.addr.to_string(), "step": 20}),
    );
    let b = wait_batch(&meta_a, &id);
    assert_eq!(b["jobs"][0]["state"], "done", "{b}");
    let m = read_meta(&u).unwrap();
    assert_eq!(m["pushed"], json!([meta_b.addr.to_string()]));
    assert_eq!(m["step"], 20);

    // Server a goes away for good; after a restart the pushed server is used, with the
    // pushed step.
    drop(meta_a);
    u.kill9();
    u.spawn();
    wait_for("the host reports to server b", CONVERGE, || {
        host_view(&meta_b, "host-01").is_some_and(|v| v["last_seen"].as_i64() > Some(0))
    });
    assert_eq!(host_view(&meta_b, "host-01").unwrap()["step"], 20);
}

#[test]
fn failover_to_the_next_server_within_one_round_and_dash_s_only_counts_once() {
    let meta_a = start_meta(json!([]), json!({}));
    let meta_b = start_meta(json!([]), json!({}));
    let dir = test_support::tempdir().unwrap();
    let work = dir.path().join("work");
    let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut cfg = Updater::config(&meta_a.addr.to_string(), "host-01", http, &work);
    cfg["protocol"] = json!("bootagent");
    test_support::write_file(dir.path(), "cfg.json", cfg.to_string());
    let log = dir.path().join("updater.log");
    let spawn = |servers: &str| {
        let mut cmd = command(Path::new(env!("CARGO_BIN_EXE_ops-updater")));
        cmd.arg("-c")
            .arg(dir.path().join("cfg.json"))
            .arg("-S")
            .arg(servers)
            .arg("-L")
            .arg(&log)
            .current_dir(dir.path());
        let child = KillOnDrop(cmd.spawn().unwrap());
        wait_listening(http, CONVERGE);
        child
    };
    let daemon = || get_json(http, "/status").unwrap()["daemon"].clone();
    let mut child = spawn(&meta_b.addr.to_string());
    wait_for("registered with server a", CONVERGE, || {
        host_view(&meta_a, "host-01").is_some_and(|v| v["last_seen"].as_i64() > Some(0))
    });
    let m: Value = serde_json::from_str(
        &std::fs::read_to_string(work.join(".ops-updater/meta.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(m["servers"], json!([meta_b.addr.to_string()]));

    drop(meta_a);
    let failed_before = daemon()["heartbeatsFailed"].as_u64().unwrap();
    wait_for("the host reports to server b", CONVERGE, || {
        host_view(&meta_b, "host-01").is_some_and(|v| v["last_seen"].as_i64() > Some(0))
    });
    let ok = daemon()["heartbeatsOk"].as_u64().unwrap();
    wait_for("more reports through b", CONVERGE, || {
        daemon()["heartbeatsOk"].as_u64().unwrap() >= ok + 3
    });
    // Server a refuses every connection, yet no round was lost.
    assert_eq!(
        daemon()["heartbeatsFailed"].as_u64().unwrap(),
        failed_before
    );

    // A later -S is ignored (and says so): the metafile keeps the first one.
    drop(child.0.kill());
    let _ = child.0.wait();
    child = spawn("127.0.0.1:9");
    wait_for("the ignored -S is logged", CONVERGE, || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("-S is ignored"))
    });
    let m: Value = serde_json::from_str(
        &std::fs::read_to_string(work.join(".ops-updater/meta.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(m["servers"], json!([meta_b.addr.to_string()]));
    drop(child);
}

#[test]
fn a_job_interrupted_by_kill_9_is_finished_exactly_once() {
    let tarball = test_support::agent::agent_tarball("slow", "1.0", Behaviour::Good);
    let (_, sha) = test_support::digests(&tarball);
    let release = Arc::new(AtomicBool::new(false));
    let gets = Arc::new(AtomicUsize::new(0));
    let files = {
        let (release, gets) = (release.clone(), gets.clone());
        Scripted::start(move |req| {
            if req.path != "/slow-1.0.tar.gz" {
                return Reply::Full(404, "text/plain", b"no".to_vec());
            }
            if gets.fetch_add(1, Ordering::SeqCst) == 0 {
                Reply::Stall(tarball.clone(), tarball.len() / 2, release.clone())
            } else {
                Reply::Full(200, "application/gzip", tarball.clone())
            }
        })
    };
    let meta = start_meta(
        json!([{"default": {"name": "slow", "version": "1.0", "tarball": files.base(),
            "md5": "", "cmd": "start", "sha256": sha}}]),
        json!({}),
    );
    let mut u = boot_updater(&meta.addr.to_string(), "host-01", |_| {});
    let part = u.work().join("slow/.download/slow-1.0.tar.gz.part");
    wait_for("a partial download", CONVERGE, || part.is_file());
    let record = u.work().join(".ops-updater/jobs.json");
    let started: Value = serde_json::from_str(&std::fs::read_to_string(&record).unwrap()).unwrap();
    let ids: Vec<String> = started["started"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(ids.len(), 1, "{started}");
    let job = ids[0].clone();

    u.kill9();
    release.store(true, Ordering::SeqCst);
    u.spawn();
    u.wait_running("slow", "1.0");
    wait_for("the result acknowledged", CONVERGE, || {
        std::fs::read_to_string(&record).is_ok_and(|t| {
            let v: Value = serde_json::from_str(&t).unwrap();
            v["acked"]
                .as_array()
                .unwrap()
                .iter()
                .any(|d| d["id"] == job.as_str())
        })
    });
    u.wait_heartbeats(2);
    let view = host_view(&meta, "host-01").unwrap();
    let results: Vec<&Value> = view["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["name"] == "slow")
        .collect();
    assert_eq!(results.len(), 1, "{view}");
    assert_eq!(results[0]["id"], job.as_str());
    assert_eq!(results[0]["errcode"], 0, "{view}");
    let starts: Vec<_> = control_actions(&u.work().join("slow/1.0"))
        .into_iter()
        .filter(|a| a.starts_with("start"))
        .collect();
    assert_eq!(starts.len(), 1, "{starts:?}");
    assert!(gets.load(Ordering::SeqCst) >= 2);
}

#[test]
fn auto_falls_back_to_the_legacy_heartbeat_on_a_legacy_only_server() {
    let tarball = test_support::agent::agent_tarball("old", "1.0", Behaviour::Good);
    let (md5, _) = test_support::digests(&tarball);
    let base = Arc::new(std::sync::Mutex::new(String::new()));
    let b = base.clone();
    let server = Scripted::start(move |req| match req.path.as_str() {
        "/heartbeat" => {
            let desired = json!({"errorMessage": "", "desiredAgents": [
                {"name": "old", "version": "1.0", "tarball": *b.lock().unwrap(),
                 "md5": "", "cmd": "start"}]});
            Reply::Full(200, "application/json", desired.to_string().into_bytes())
        }
        "/old-1.0.tar.gz" => Reply::Full(200, "application/gzip", tarball.clone()),
        "/old-1.0.tar.gz.md5" => Reply::Full(
            200,
            "text/plain",
            format!("{md5}  old-1.0.tar.gz\n").into_bytes(),
        ),
        _ => Reply::Full(404, "text/plain", b"404 page not found\n".to_vec()),
    });
    *base.lock().unwrap() = server.base();
    // No `protocol` key: the default, auto.
    let u = Updater::start(&server.addr.to_string(), "host-01", |c| {
        c.as_object_mut().unwrap().remove("protocol");
    });
    u.wait_running("old", "1.0");
    let seen = server.seen();
    assert!(
        seen.iter().any(|s| s.path == "/agent/register"),
        "probed BootAgent first"
    );
    let probes = seen
        .iter()
        .filter(|s| s.path.starts_with("/agent/"))
        .count();
    u.wait_heartbeats(3);
    // The fallback is remembered: no new probe every round.
    let later = server
        .seen()
        .iter()
        .filter(|s| s.path.starts_with("/agent/"))
        .count();
    assert_eq!(later, probes);
    assert!(u.log_text().contains("using the legacy heartbeat"));
    assert_eq!(u.daemon_status()["protocol"], "legacy (fallback)");
}

#[test]
fn dash_t_checks_the_metafile() {
    let dir = test_support::tempdir().unwrap();
    let work = dir.path().join("work");
    let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut cfg = Updater::config("127.0.0.1:9", "host-01", http, &work);
    cfg.as_object_mut().unwrap().remove("protocol");
    test_support::write_file(dir.path(), "cfg.json", cfg.to_string());
    let check = || {
        command(Path::new(env!("CARGO_BIN_EXE_ops-updater")))
            .arg("-c")
            .arg(dir.path().join("cfg.json"))
            .arg("-T")
            .output()
            .unwrap()
    };
    let out = check();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("first start"),
        "{out:?}"
    );
    std::fs::create_dir_all(work.join(".ops-updater")).unwrap();
    std::fs::write(work.join(".ops-updater/meta.json"), "{\"agentsn\": ").unwrap();
    let out = check();
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("meta.json is corrupt"), "{err}");
    // -T never touches the files it checks.
    assert_eq!(
        std::fs::read_to_string(work.join(".ops-updater/meta.json")).unwrap(),
        "{\"agentsn\": "
    );
}

#[test]
fn auto_speaks_bootagent_to_a_server_that_does() {
    let meta = start_meta(json!([]), json!({}));
    let u = Updater::start(&meta.addr.to_string(), "host-01", |c| {
        c.as_object_mut().unwrap().remove("protocol");
    });
    wait_confirmed(&u);
    u.wait_heartbeats(2);
    assert!(host_view(&meta, "host-01").is_some());
    assert!(!u.log_text().contains("using the legacy heartbeat"));
}

/// An agent whose control script logs the `GREETING` it was given.
fn env_agent() -> Vec<u8> {
    use test_support::tarball::{targz, Entry};
    let script = r#"#!/bin/sh
echo "$1 ${GREETING:-none}" >> env.log
case "$1" in
  start) touch running; echo started ;;
  stop) rm -f running ;;
  status) if [ -f running ]; then echo started; else echo stoped; fi ;;
esac
"#;
    targz(&[Entry::exec("control", script)])
}

#[test]
fn envs_reach_control_scripts_and_survive_a_restart_of_the_updater() {
    let mut meta = start_meta(json!([]), json!({}));
    let t = env_agent();
    let (_, sha) = test_support::tarball::publish(&meta.tarball_dir(), "envy", "1.0", &t);
    let agents = json!([entry(&meta, "envy", "1.0", &sha, "start")]);
    set_agents(&mut meta, agents, &json!({}));
    let mut u = boot_updater(&meta.addr.to_string(), "host-01", |_| {});
    u.wait_running("envy", "1.0");
    let log = u.work().join("envy/1.0/env.log");
    let starts = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("start"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(starts(), ["start hello"]);
    // After a restart of the updater, an operator restart (whose job carries no envs)
    // still runs the scripts with the agent's envs.
    u.kill9();
    u.spawn();
    wait_confirmed(&u);
    let id = queue(
        &meta,
        "host-01",
        json!({"action": "restart", "name": "envy"}),
    );
    let b = wait_batch(&meta, &id);
    assert_eq!(b["jobs"][0]["state"], "done", "{b}");
    assert_eq!(starts(), ["start hello", "start hello"]);
    // (The test's own `status` checks run without envs; only the updater's runs count.)
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines()
            .filter(|l| !l.starts_with("status"))
            .all(|l| l.ends_with("hello")),
        "a script ran without the envs:\n{text}"
    );
}

#[test]
fn a_failed_upgrade_job_rolls_back_and_reports_errcode_3() {
    let mut meta = start_meta(json!([]), json!({}));
    let (_, sha1) = publish(&meta, "basic", "1.0", Behaviour::Good);
    let (_, sha2) = publish(&meta, "basic", "2.0", Behaviour::StartFails);
    let agents = json!([entry(&meta, "basic", "1.0", &sha1, "start")]);
    set_agents(&mut meta, agents, &json!({}));
    let u = boot_updater(&meta.addr.to_string(), "host-01", |_| {});
    u.wait_running("basic", "1.0");
    let agents = json!([entry(&meta, "basic", "2.0", &sha2, "start")]);
    set_agents(&mut meta, agents, &json!({}));
    wait_for("the failed upgrade reported", CONVERGE, || {
        host_view(&meta, "host-01").is_some_and(|v| {
            v["results"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["action"] == "upgrade" && r["errcode"] == 3)
        })
    });
    assert_eq!(u.version_of("basic").as_deref(), Some("1.0"));
    assert_eq!(status_of(&u.work().join("basic/1.0")), "started");
    let view = host_view(&meta, "host-01").unwrap();
    let r = view["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["action"] == "upgrade")
        .unwrap();
    assert!(
        r["message"].as_str().unwrap().contains("cannot start"),
        "{r}"
    );
}

#[test]
fn a_server_answering_garbage_or_errors_is_skipped_within_the_round() {
    let meta = start_meta(json!([]), json!({}));
    let n = Arc::new(AtomicUsize::new(0));
    let count = n.clone();
    // Alternates between a 200 that is not JSON, a 500, and a body far beyond the cap.
    let bad = Scripted::start(move |_| match count.fetch_add(1, Ordering::SeqCst) % 3 {
        0 => Reply::Full(200, "application/json", b"<html>not json".to_vec()),
        1 => Reply::Full(500, "text/plain", b"internal error".to_vec()),
        _ => Reply::Full(200, "application/json", vec![b' '; 8 << 20]),
    });
    let u = boot_updater(&bad.addr.to_string(), "host-01", |c| {
        c["maxResponseBytes"] = json!(1 << 20);
        // The good server comes from the metafile's pushed list (as after a config job).
        let work = PathBuf::from(c["workdir"].as_str().unwrap());
        std::fs::create_dir_all(work.join(".ops-updater")).unwrap();
        let m = json!({"agentsn": "0b6f4f39-5d4c-4c63-9a53-5a7e0c7f2a10", "pushed": [meta.addr.to_string()]});
        std::fs::write(work.join(".ops-updater/meta.json"), m.to_string()).unwrap();
    });
    wait_confirmed(&u);
    u.wait_heartbeats(4);
    assert!(n.load(Ordering::SeqCst) >= 3, "the bad server was tried");
    assert_eq!(u.daemon_status()["heartbeatsFailed"], 0);
    let log = u.log_text();
    assert!(log.contains("not BootAgent JSON"), "{log}");
    assert!(log.contains("server answered 500"), "{log}");
    assert!(log.contains("larger than"), "{log}");
    assert_eq!(
        host_view(&meta, "host-01").unwrap()["agentsn"],
        "0b6f4f39-5d4c-4c63-9a53-5a7e0c7f2a10"
    );
}

/// `uninstall` renamed the updater's own `cfg.json` (the host could not restart) and
/// removed a folder that was no agent: anything in the workdir with a valid name was taken
/// for an agent.
#[test]
fn uninstall_touches_only_agents_never_the_updaters_own_files_or_other_folders() {
    let (server, results) = job_server(Value::Array(
        ["cfg.json", "data", "state", "work"]
            .iter()
            .map(|n| json!({"id": n, "action": "uninstall", "name": n}))
            .collect::<Vec<Value>>(),
    ));
    let mut root = PathBuf::new();
    let mut u = boot_updater(&server.addr.to_string(), "host-01", |c| {
        // The workdir is the folder of the config, as with the default (the executable's
        // folder), and the metafile lives in a folder that also looks like an agent.
        let work = PathBuf::from(c["workdir"].as_str().unwrap());
        root = work.parent().unwrap().to_path_buf();
        c["workdir"] = json!(root);
        c["metafile"] = json!("state/meta.json");
        std::fs::create_dir_all(root.join("state")).unwrap();
        std::fs::write(root.join("state/.version"), "1.0\n").unwrap();
        std::fs::create_dir_all(root.join("data/2019")).unwrap();
        std::fs::write(root.join("data/keep.txt"), "operator data").unwrap();
    });
    let ids = ["cfg.json", "data", "state", "work"];
    wait_for("four results reported", CONVERGE, || {
        let got = results.lock().unwrap();
        ids.iter().all(|id| got.iter().any(|r| r["id"] == *id))
    });
    let got = results.lock().unwrap().clone();
    for id in ids {
        let r = got.iter().find(|r| r["id"] == id).unwrap();
        assert_eq!(r["errcode"], 1, "{id}: {r}");
        assert!(
            r["message"].as_str().unwrap().contains("is not an agent"),
            "{id}: {r}"
        );
    }
    assert!(root.join("cfg.json").is_file());
    assert_eq!(
        std::fs::read_to_string(root.join("data/keep.txt")).unwrap(),
        "operator data"
    );
    assert!(root.join("data/2019").is_dir());
    assert!(root.join("state/meta.json").is_file());
    assert!(root.join("work").is_dir());
    let hidden: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".uninstall-"))
        .collect();
    assert!(hidden.is_empty(), "{hidden:?}");
    // The host can still restart on its config.
    u.kill9();
    u.spawn();
    u.wait_heartbeats(1);
}
