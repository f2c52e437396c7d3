//! Agent events end to end: a journal found in the workdir at start-up reaches the real
//! `ops-meta` in BootAgent status reports, each event once, is acknowledged on disk, and
//! is listed on the local `GET /events`, also after a restart.

mod common;

use std::path::{Path, PathBuf};

use common::{get_json, http_get, Meta, Updater, CONVERGE};
use serde_json::{json, Value};
use test_support::wait_for;

const HOST: &str = "host-ev-01";

fn journal_file(work: &Path) -> PathBuf {
    work.join(updater::workdir::EVENTS_FILE)
}

/// The journal an earlier run left: events 9 (taken by a server), 10 and 11 (not yet).
fn seed(work: &Path) {
    let ev = |seq: u64, kind: &str| {
        json!({"seq": seq, "time": 1_700_000_000 + seq, "agent": "falcon-agent",
            "version": "1.0.0", "kind": kind, "cause": format!("exit code {seq}"),
            "output": ["boom"], "state": "running", "restarts": 1})
    };
    let body = json!({"nextSeq": 12, "acked": 9,
        "events": [ev(9, "exited"), ev(10, "exited"), ev(11, "fatal")]});
    std::fs::write(journal_file(work), body.to_string()).unwrap();
}

fn acked_on_disk(work: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(journal_file(work)).ok()?;
    serde_json::from_str::<Value>(&text).ok()?["acked"].as_u64()
}

/// The seqs of the events ops-meta shows for `HOST`.
fn on_meta(meta: &Meta) -> Option<Vec<u64>> {
    let (code, body) = http_get(meta.addr, &format!("/api/hosts/{HOST}"))?;
    if code != 200 {
        return None;
    }
    let v: Value = serde_json::from_str(&body).ok()?;
    v["events"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["seq"].as_u64()).collect())
        .or(Some(vec![]))
}

fn local_events(u: &Updater) -> (u64, Vec<u64>) {
    let v = get_json(u.http, "/events").expect("local /events");
    let seqs = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    (v["acked"].as_u64().unwrap(), seqs)
}

#[test]
fn journal_events_reach_ops_meta_once_and_stay_acked_across_a_restart() {
    let meta = Meta::start(json!([]));
    let mut u = Updater::start(&meta.addr.to_string(), HOST, |c| {
        c["protocol"] = json!("bootagent");
        seed(Path::new(c["workdir"].as_str().unwrap()));
    });
    wait_for("the unsent events on ops-meta", CONVERGE, || {
        on_meta(&meta) == Some(vec![10, 11])
    });
    wait_for("the ack on disk", CONVERGE, || {
        acked_on_disk(&u.work()) == Some(11)
    });
    assert_eq!(local_events(&u), (11, vec![9, 10, 11]));
    assert_eq!(
        http_get(u.http, "/events?n=1").map(|(c, b)| (c, b.contains("\"seq\":11"))),
        Some((200, true))
    );

    u.kill9();
    u.spawn();
    u.wait_heartbeats(2);
    assert_eq!(
        local_events(&u),
        (11, vec![9, 10, 11]),
        "the journal survived"
    );
    assert_eq!(on_meta(&meta), Some(vec![10, 11]));
    assert!(
        !u.log_text().contains("bad event journal"),
        "{}",
        u.log_text()
    );
}
