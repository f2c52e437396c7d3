//! A new version that fails reaches ops-meta as an event, in every protocol mode, with the
//! real binaries: a wrong `.md5` is `install_failed` / `checksum`, a tarball that is not
//! there (404) is `install_failed` / `download`, a version whose `control start` fails is
//! `rolled_back` while the previous version keeps running, and a first install that does
//! not start is `rolled_back` with a cause saying that nothing was put back. Each failure
//! is written once, however often the updater retries it.

mod common;

use common::*;
use serde_json::{json, Value};
use test_support::agent::Behaviour;
use test_support::fileserver::FileServer;
use test_support::wait_for;

const MODES: [&str; 3] = ["legacy", "bootagent", "auto"];
const AGENT: &str = "falcon-agent";
const NEWBIE: &str = "newbie";

/// The events ops-meta shows for `host` (`GET /api/hosts/{host}`), oldest first.
fn meta_events(meta: &Meta, host: &str) -> Vec<Value> {
    get_json(meta.addr, &format!("/api/hosts/{host}"))
        .and_then(|v| v["events"].as_array().cloned())
        .unwrap_or_default()
}

/// The events of `agent` with `kind` and `version` in `events`.
fn matching<'a>(events: &'a [Value], agent: &str, kind: &str, version: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["agent"] == agent && e["kind"] == kind && e["version"] == version)
        .collect()
}

/// The updater's own journal (`GET /events`).
fn local_events(u: &Updater) -> Vec<Value> {
    get_json(u.http, "/events")
        .and_then(|v| v["events"].as_array().cloned())
        .unwrap_or_default()
}

/// Waits until ops-meta holds one `kind` event of `agent` `version` from `host`, and
/// returns it.
fn wait_meta_event(meta: &Meta, u: &Updater, agent: &str, kind: &str, version: &str) -> Value {
    let what = format!("{}: meta shows {kind} of {agent} {version}", u.hostname);
    let mut found = None;
    let deadline = std::time::Instant::now() + CONVERGE;
    while std::time::Instant::now() < deadline {
        let ev = meta_events(meta, &u.hostname);
        if let Some(e) = matching(&ev, agent, kind, version).first() {
            found = Some((*e).clone());
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    found.unwrap_or_else(|| {
        panic!(
            "{what}: not seen; meta has {:?}; local journal {:?}; log tail:\n{}",
            meta_events(meta, &u.hostname),
            local_events(u),
            tail(&u.log_text())
        )
    })
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// `agents[]` of the meta config: `falcon-agent` at `version` from `base`, and `newbie`
/// 1.0 (which never starts) from meta itself.
fn agents(meta: &Meta, version: &str, base: &str) -> Value {
    json!([
        agent_entry(AGENT, version, base, "start"),
        agent_entry(NEWBIE, "1.0", &meta.base(), "start"),
    ])
}

fn failures_reach_meta_as_events(mode: &str) {
    let host = format!("inst-{mode}");
    let mut meta = Meta::start(json!([]));
    let files = FileServer::start();
    publish(&meta, AGENT, "1.0", Behaviour::Good);
    publish(&meta, AGENT, "1.1", Behaviour::StartFails);
    publish(&meta, NEWBIE, "1.0", Behaviour::StartFails);
    // 1.2 with a `.md5` that belongs to other bytes.
    publish(&meta, AGENT, "1.2", Behaviour::Good);
    let file = proto::legacy::tarball_file(AGENT, "1.2");
    let wrong = test_support::digests(b"not this tarball").0;
    std::fs::write(
        meta.tarball_dir().join(format!("{file}.md5")),
        proto::legacy::format_md5_file(&wrong, &file),
    )
    .unwrap();
    // 1.3 on the file server: its `.md5` and `.sha256` are there (so ops-meta can hand
    // out a BootAgent job for it), the tarball is not.
    let t = test_support::agent::agent_tarball(AGENT, "1.3", Behaviour::Good);
    let (md5, sha) = test_support::digests(&t);
    let file13 = proto::legacy::tarball_file(AGENT, "1.3");
    let fdir = files.dir.path().join("falcon");
    std::fs::create_dir_all(&fdir).unwrap();
    std::fs::write(
        fdir.join(format!("{file13}.md5")),
        proto::legacy::format_md5_file(&md5, &file13),
    )
    .unwrap();
    std::fs::write(
        fdir.join(format!("{file13}.sha256")),
        format!("{sha}  {file13}\n"),
    )
    .unwrap();

    meta.set_agents(agents(&meta, "1.0", &meta.base()));
    let u = Updater::start(&meta.addr.to_string(), &host, |c| {
        if mode == "auto" {
            c.as_object_mut().unwrap().remove("protocol");
        } else {
            c["protocol"] = json!(mode);
        }
        // Retries come quickly, so that a flood of repeated events would show.
        c["retryBaseSecs"] = json!(1);
        c["retryMaxSecs"] = json!(1);
        c["failedStartRetrySecs"] = json!(1);
    });
    u.wait_running(AGENT, "1.0");

    // A first install that does not start: a release failure, with nothing put back.
    let e = wait_meta_event(&meta, &u, NEWBIE, "rolled_back", "1.0");
    assert!(
        e["cause"]
            .as_str()
            .is_some_and(|c| c.contains("nothing was put back")),
        "{mode}: {e}"
    );
    assert!(
        e["output"].to_string().contains("port in use"),
        "{mode}: what start printed: {e}"
    );
    if mode == "legacy" {
        // The legacy round retries it every second; each retry fails alike.
        let v = u.work().join(NEWBIE).join("1.0");
        wait_for(&format!("{mode}: newbie retried"), CONVERGE, || {
            control_actions(&v)
                .iter()
                .filter(|a| a.starts_with("start"))
                .count()
                >= 3
        });
    }

    // A version that does not start: rolled back, 1.0 keeps running.
    meta.set_agents(agents(&meta, "1.1", &meta.base()));
    let e = wait_meta_event(&meta, &u, AGENT, "rolled_back", "1.1");
    assert!(
        e["cause"]
            .as_str()
            .is_some_and(|c| c.contains("rolled back to 1.0")),
        "{mode}: {e}"
    );
    u.wait_running(AGENT, "1.0");

    // A wrong `.md5`: install_failed / checksum.
    meta.set_agents(agents(&meta, "1.2", &meta.base()));
    let e = wait_meta_event(&meta, &u, AGENT, "install_failed", "1.2");
    assert_eq!(e["state"], "checksum", "{mode}: {e}");
    assert!(
        e["cause"]
            .as_str()
            .is_some_and(|c| c.contains("md5 mismatch")),
        "{mode}: {e}"
    );
    assert!(
        e["output"].as_array().is_none_or(|o| o.is_empty()),
        "{mode}: nothing of 1.2 ran, no output: {e}"
    );
    if mode == "legacy" {
        // Retried with back-off (1 s): three more tries log the mismatch again.
        let needle = format!("md5 mismatch for {file}");
        wait_for(&format!("{mode}: 1.2 retried"), CONVERGE, || {
            u.log_text().matches(&needle).count() >= 4
        });
    }
    u.wait_running(AGENT, "1.0");

    // A tarball that is not there: install_failed / download.
    meta.set_agents(agents(&meta, "1.3", &files.url("falcon")));
    let e = wait_meta_event(&meta, &u, AGENT, "install_failed", "1.3");
    assert_eq!(e["state"], "download", "{mode}: {e}");
    assert!(
        e["cause"].as_str().is_some_and(|c| c.contains("404")),
        "{mode}: {e}"
    );
    u.wait_running(AGENT, "1.0");

    // One event per failure, however many retries: locally and at meta.
    u.wait_heartbeats(2);
    let local = local_events(&u);
    let at_meta = meta_events(&meta, &host);
    for (agent, kind, version) in [
        (NEWBIE, "rolled_back", "1.0"),
        (AGENT, "rolled_back", "1.1"),
        (AGENT, "install_failed", "1.2"),
        (AGENT, "install_failed", "1.3"),
    ] {
        assert_eq!(
            matching(&local, agent, kind, version).len(),
            1,
            "{mode}: {agent} {kind} {version} in {local:?}"
        );
        assert_eq!(
            matching(&at_meta, agent, kind, version).len(),
            1,
            "{mode}: {agent} {kind} {version} at meta: {at_meta:?}"
        );
    }
}

#[test]
fn install_failures_and_rollbacks_reach_meta_once_legacy() {
    failures_reach_meta_as_events(MODES[0]);
}

#[test]
fn install_failures_and_rollbacks_reach_meta_once_bootagent() {
    failures_reach_meta_as_events(MODES[1]);
}

#[test]
fn install_failures_and_rollbacks_reach_meta_once_auto() {
    failures_reach_meta_as_events(MODES[2]);
}
