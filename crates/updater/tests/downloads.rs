//! Downloads that go wrong: a transfer cut half-way (resumed), and `kill -9` of the updater
//! during a download and during an unpack, each followed by a restart that converges with
//! no torn state. Heartbeats go to the real `ops-meta`; tarballs come from a scripted
//! server in the test that can cut or stall a response.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use serde_json::json;
use test_support::agent::{control_script, Behaviour};
use test_support::tarball::{targz, Entry};
use test_support::{digests, wait_for};

/// A fake agent with an incompressible payload of `payload` bytes.
fn big_agent(name: &str, version: &str, payload: usize) -> Vec<u8> {
    targz(&[
        Entry::exec("control", control_script(name, version, Behaviour::Good)),
        Entry::file("payload.bin", test_support::noise(payload, 7)),
    ])
}

/// A fake agent that is slow to unpack on any disk: `files` small files (each one is
/// synced) and 64 MiB of zeros (small once compressed, long to write out).
fn many_files_agent(name: &str, version: &str, files: usize) -> Vec<u8> {
    let mut entries = vec![
        Entry::exec("control", control_script(name, version, Behaviour::Good)),
        Entry::file("zeros.bin", vec![0u8; 64 << 20]),
    ];
    for i in 0..files {
        entries.push(Entry::file(&format!("data/{:03}/f{i}", i % 100), "x"));
    }
    targz(&entries)
}

/// Serves `files` (name → bytes) at `/<name>` and `/<name>.md5`; `tarball` answers go
/// through `shape` first, which may cut or stall them.
fn file_server(
    files: Vec<(String, Vec<u8>)>,
    shape: impl Fn(usize, &Seen, Vec<u8>) -> Reply + Send + Sync + 'static,
) -> (Scripted, Arc<AtomicUsize>) {
    let tarball_gets = Arc::new(AtomicUsize::new(0));
    let count = tarball_gets.clone();
    let server = Scripted::start(move |req| {
        for (name, data) in &files {
            if req.path == format!("/{name}.md5") {
                let (md5, _) = digests(data);
                return Reply::Full(
                    200,
                    "text/plain",
                    proto::legacy::format_md5_file(&md5, name).into_bytes(),
                );
            }
            if req.path == format!("/{name}") {
                let n = count.fetch_add(1, Ordering::SeqCst);
                return shape(n, req, data.clone());
            }
        }
        Reply::Full(404, "text/plain", b"not found".to_vec())
    });
    (server, tarball_gets)
}

fn unpack_leftovers(agent_dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(agent_dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.') && n.contains(".unpack-"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn download_cut_half_way_is_resumed() {
    let tarball = big_agent("falcon", "1.0.0", 512 << 10);
    let len = tarball.len();
    let (files, gets) = file_server(
        vec![("falcon-1.0.0.tar.gz".into(), tarball)],
        move |n, _req, data| {
            if n == 0 {
                Reply::Cut(data, len / 2)
            } else {
                Reply::Full(200, "application/gzip", data)
            }
        },
    );
    let meta = Meta::start(json!([agent_entry(
        "falcon",
        "1.0.0",
        &files.base(),
        "start"
    )]));
    let u = Updater::start(&meta.addr.to_string(), "host-01", |c| {
        c["retryBaseSecs"] = json!(1)
    });
    u.wait_running("falcon", "1.0.0");
    assert!(gets.load(Ordering::SeqCst) >= 2);
    let resumed = files.seen().iter().any(|s| {
        s.path == "/falcon-1.0.0.tar.gz"
            && s.range
                .as_deref()
                .is_some_and(|r| r.starts_with("bytes=") && r != "bytes=0-")
    });
    assert!(resumed, "second request did not resume: {:?}", files.seen());
    let payload = std::fs::read(u.work().join("falcon/1.0.0/payload.bin")).unwrap();
    assert_eq!(payload, test_support::noise(512 << 10, 7));
}

#[test]
fn kill_during_download_then_restart_converges() {
    let release = Arc::new(AtomicBool::new(false));
    let r = release.clone();
    let tarball = big_agent("falcon", "1.0.0", 512 << 10);
    let (files, _gets) = file_server(
        vec![("falcon-1.0.0.tar.gz".into(), tarball)],
        move |n, _req, data| {
            if n == 0 {
                let half = data.len() / 2;
                Reply::Stall(data, half, r.clone())
            } else {
                Reply::Full(200, "application/gzip", data)
            }
        },
    );
    let meta = Meta::start(json!([agent_entry(
        "falcon",
        "1.0.0",
        &files.base(),
        "start"
    )]));
    let mut u = Updater::start(&meta.addr.to_string(), "host-01", |_| {});
    let part = u.work().join("falcon/.download/falcon-1.0.0.tar.gz.part");
    wait_for("a partial download", CONVERGE, || part.is_file());
    u.kill9();
    release.store(true, Ordering::SeqCst);
    assert_eq!(u.version_of("falcon"), None);
    assert!(!u.work().join("falcon/1.0.0").exists());

    u.spawn();
    u.wait_running("falcon", "1.0.0");
    assert_eq!(
        unpack_leftovers(&u.work().join("falcon")),
        Vec::<String>::new()
    );
}

#[test]
fn kill_during_unpack_then_restart_converges() {
    let mut meta = Meta::start(json!([]));
    publish(&meta, "falcon", "1.0.0", Behaviour::Good);
    let big = many_files_agent("falcon", "1.1.0", 1_000);
    test_support::tarball::publish(&meta.tarball_dir(), "falcon", "1.1.0", &big);
    meta.desire(&[("falcon", "1.0.0", "start")]);
    let mut u = Updater::start(&meta.addr.to_string(), "host-01", |c| {
        c["maxUnpackedBytes"] = json!(128u64 << 20)
    });
    u.wait_running("falcon", "1.0.0");

    meta.desire(&[("falcon", "1.1.0", "start")]);
    let agent = u.work().join("falcon");
    wait_for("an unpack in progress", CONVERGE, || {
        !unpack_leftovers(&agent).is_empty()
    });
    u.kill9();
    // Never partial: the old version is still the current one, and the new folder does
    // not exist under its final name.
    assert_eq!(u.version_of("falcon").as_deref(), Some("1.0.0"));
    assert!(!agent.join("1.1.0").exists());

    u.spawn();
    u.wait_running("falcon", "1.1.0");
    assert_eq!(unpack_leftovers(&agent), Vec::<String>::new());
    assert_eq!(status_of(&agent.join("1.0.0")), "stoped");
    assert!(agent.join("1.1.0/data/099/f999").is_file());
}

#[test]
fn slow_download_does_not_delay_heartbeats_or_other_agents() {
    let release = Arc::new(AtomicBool::new(false));
    let r = release.clone();
    let tarball = big_agent("slow", "1.0.0", 256 << 10);
    let (files, _gets) = file_server(
        vec![("slow-1.0.0.tar.gz".into(), tarball)],
        move |_n, _req, data| Reply::Stall(data, 1000, r.clone()),
    );
    let mut meta = Meta::start(json!([]));
    publish(&meta, "quick", "1.0.0", Behaviour::Good);
    meta.set_agents(json!([
        agent_entry("slow", "1.0.0", &files.base(), "start"),
        agent_entry("quick", "1.0.0", &meta.base(), "start"),
    ]));
    let u = Updater::start(&meta.addr.to_string(), "host-01", |_| {});
    u.wait_running("quick", "1.0.0");
    // The slow agent is still downloading while rounds go on.
    let part = u.work().join("slow/.download/slow-1.0.0.tar.gz.part");
    wait_for("a partial download", CONVERGE, || part.is_file());
    u.wait_heartbeats(3);
    let s = u.agent_status("slow").unwrap();
    assert_eq!(s["busy"], true, "{s}");
    assert_eq!(u.version_of("slow"), None);
    release.store(true, Ordering::SeqCst);
    u.wait_running("slow", "1.0.0");
}
