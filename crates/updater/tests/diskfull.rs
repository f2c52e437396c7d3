//! End to end on a full disk: the updater runs in its own mount namespace with its workdir
//! on a 1.5 MiB tmpfs (`unshare -rm`, no privileges needed where user namespaces are
//! allowed). An upgrade that does not fit — while unpacking, or already while
//! downloading — fails with the system's own words, installs nothing, leaves no half
//! folder behind, and the running version keeps running and being reported.
//!
//! The test reads the namespace's files through `/proc/PID/root`, and kills every process
//! of the namespace when it ends. Where `unshare` cannot make the namespace, it says so on
//! stderr and checks nothing.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::json;
use test_support::agent::{control_script, Behaviour};
use test_support::tarball::{targz, Entry};
use test_support::{command, wait_for, KillOnDrop};

/// Size of the workdir's file system.
const DISK: &str = "1536k";

/// An agent tarball carrying `blob` as an extra file.
fn agent_with_blob(version: &str, blob: Vec<u8>) -> Vec<u8> {
    targz(&[
        Entry::exec(
            "control",
            control_script("falcon", version, Behaviour::Good),
        ),
        Entry::file("VERSION", format!("{version}\n")),
        Entry::file("data/blob", blob),
    ])
}

/// The updater process in its private mount namespace.
struct Boxed {
    child: KillOnDrop,
    mnt_ns: PathBuf,
}

impl Boxed {
    /// `path` as the updater sees it.
    fn inside(&self, path: &Path) -> PathBuf {
        let rel = path.strip_prefix("/").unwrap();
        PathBuf::from(format!("/proc/{}/root", self.child.id())).join(rel)
    }
}

impl Drop for Boxed {
    /// SIGKILLs every process of the namespace: the updater and the agents it started.
    fn drop(&mut self) {
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return;
        };
        for p in procs.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if std::fs::read_link(p.path().join("ns/mnt")).is_ok_and(|ns| ns == self.mnt_ns) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// Whether this machine lets an unprivileged process mount a tmpfs in its own namespace.
fn namespaces_work() -> bool {
    command(Path::new("unshare"))
        .args(["-rm", "sh", "-c", "mount -t tmpfs -o size=64k none /mnt"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn an_upgrade_that_does_not_fit_installs_nothing_and_keeps_the_old_version() {
    if !namespaces_work() {
        eprintln!("SKIPPED: `unshare -rm` with a tmpfs mount is not allowed on this machine");
        return;
    }
    let mut meta = Meta::start(json!([]));
    publish(&meta, "falcon", "1.0.0", Behaviour::Good);
    // 1.1.0 downloads fine (a few KiB) but unpacks to 3 MiB; 1.2.0 is 2 MiB on the wire.
    test_support::tarball::publish(
        &meta.tarball_dir(),
        "falcon",
        "1.1.0",
        &agent_with_blob("1.1.0", vec![0u8; 3 << 20]),
    );
    test_support::tarball::publish(
        &meta.tarball_dir(),
        "falcon",
        "1.2.0",
        &agent_with_blob("1.2.0", test_support::noise(2 << 20, 3)),
    );
    meta.desire(&[("falcon", "1.0.0", "start")]);

    let dir = test_support::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let http = std::net::SocketAddr::from(([127, 0, 0, 1], test_support::free_port()));
    let cfg = Updater::config(&meta.addr.to_string(), "host-full", http, &work);
    test_support::write_file(dir.path(), "cfg.json", serde_json::to_vec(&cfg).unwrap());
    let log = std::fs::File::create(dir.path().join("updater.log")).unwrap();
    let child = command(Path::new("unshare"))
        .args(["-rm", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs -o size={DISK} none \"$0\" && exec \"$@\""
        ))
        .arg(&work)
        .arg(env!("CARGO_BIN_EXE_ops-updater"))
        .arg("-c")
        .arg(dir.path().join("cfg.json"))
        .current_dir(dir.path())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    test_support::wait_listening(http, CONVERGE);
    assert!(child.try_wait().unwrap().is_none(), "updater exited");
    let mnt_ns = std::fs::read_link(format!("/proc/{}/ns/mnt", child.id())).unwrap();
    assert_ne!(
        mnt_ns,
        std::fs::read_link("/proc/self/ns/mnt").unwrap(),
        "the updater must run in its own mount namespace"
    );
    let boxed = Boxed { child, mnt_ns };
    let agent_dir = boxed.inside(&work.join("falcon"));
    let status = || -> Option<serde_json::Value> {
        let v = get_json(http, "/status")?;
        v["agents"].as_array()?.first().cloned()
    };
    let log_text = || std::fs::read_to_string(dir.path().join("updater.log")).unwrap_or_default();

    wait_for("falcon 1.0.0 running on the small disk", CONVERGE, || {
        meta.reported("falcon", "host-full")
            .is_some_and(|r| r["version"] == "1.0.0" && r["status"] == "started")
    });

    for (version, what) in [("1.1.0", "unpacking"), ("1.2.0", "downloading")] {
        meta.desire(&[("falcon", version, "start")]);
        let s = test_support::wait_for_some(
            &format!("{version} to fail for lack of space while {what}"),
            CONVERGE,
            || {
                let s = status()?;
                (s["backoff"]["version"] == version).then_some(s)
            },
        );
        let err = s["lastError"].as_str().unwrap_or_default();
        assert!(
            err.contains("No space left on device"),
            "{version}: {err}\n{}",
            log_text()
        );
        eprintln!("{version} ({what}): {err}");
        assert_eq!(s["currentVersion"], "1.0.0", "{s}");
        // Nothing half-made: no version folder, no temporary unpack folder.
        assert!(!agent_dir.join(version).exists(), "{version} folder exists");
        let leftovers: Vec<String> = std::fs::read_dir(&agent_dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.') && n.contains(".unpack-"))
            .collect();
        assert!(leftovers.is_empty(), "{version}: {leftovers:?}");
        assert_eq!(
            std::fs::read_to_string(agent_dir.join(".version"))
                .unwrap()
                .trim(),
            "1.0.0"
        );
        // The old version keeps running and the server keeps hearing so.
        assert_eq!(status_of(&agent_dir.join("1.0.0")), "started");
        let before = get_json(http, "/status").unwrap()["daemon"]["heartbeatsOk"]
            .as_u64()
            .unwrap();
        wait_for("two more heartbeats", CONVERGE, || {
            get_json(http, "/status").unwrap()["daemon"]["heartbeatsOk"]
                .as_u64()
                .unwrap()
                >= before + 2
        });
        let r = meta.reported("falcon", "host-full").unwrap();
        assert_eq!(
            (r["version"].as_str(), r["status"].as_str()),
            (Some("1.0.0"), Some("started"))
        );
        // ops-meta hears why: the host's disk, not the release.
        wait_for(
            &format!("{version}: install_failed/disk at meta"),
            CONVERGE,
            || {
                get_json(meta.addr, "/api/hosts/host-full")
                    .and_then(|v| v["events"].as_array().cloned())
                    .is_some_and(|ev| {
                        ev.iter().any(|e| {
                            e["kind"] == "install_failed"
                                && e["version"] == version
                                && e["state"] == "disk"
                        })
                    })
            },
        );
    }
    drop(boxed);
}
