//! ops-updater upgrading itself, end to end: real ops-meta, real updaters (supervisor and
//! worker), real second builds of ops-updater (built here with `OPS_VERSION`), in every
//! protocol mode; a client polling each local endpoint all along is never refused.

mod common;

use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use test_support::wait_for;

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

const NEW: &str = "9.0.0";
const NEWER: &str = "9.0.1";
/// The version the test build of ops-updater says it is.
const OLD: &str = env!("CARGO_PKG_VERSION");

/// ops-updater built as `version` (`OPS_VERSION`), in a target folder of its own (no
/// debug info: a smaller tarball); the binary is copied out, so each version is built once
/// per test process.
fn build(version: &str) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = root.join("target/selfupgrade-test");
    let out = target.join(format!("ops-updater-{version}"));
    static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());
    if BUILT.lock().unwrap().iter().any(|v| v == version) {
        return out;
    }
    let cargo = option_env!("CARGO").unwrap_or("cargo");
    let st = test_support::command(Path::new(cargo))
        .args(["build", "--locked", "-p", "updater", "--bin", "ops-updater"])
        .current_dir(&root)
        .env("OPS_VERSION", version)
        .env("CARGO_TARGET_DIR", &target)
        .env("CARGO_PROFILE_DEV_DEBUG", "0")
        .env("CARGO_PROFILE_DEV_STRIP", "debuginfo")
        .status()
        .expect("run cargo");
    assert!(st.success(), "building ops-updater {version}: {st}");
    std::fs::copy(target.join("debug/ops-updater"), &out).unwrap();
    BUILT.lock().unwrap().push(version.to_string());
    out
}

/// The self-upgrade tarball: `ops-updater` (the given binary) and `control` at its root.
fn updater_tarball(bin: &Path) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    {
        let mut t = tar::Builder::new(&mut gz);
        let add = |t: &mut tar::Builder<_>, name: &str, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o755);
            h.set_cksum();
            t.append_data(&mut h, name, data).unwrap();
        };
        add(&mut t, "ops-updater", &std::fs::read(bin).unwrap());
        let control = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dist/control");
        add(&mut t, "control", &std::fs::read(control).unwrap());
        t.finish().unwrap();
    }
    gz.finish().unwrap()
}

/// ops-meta with release `version` of ops-updater (built here) in its `tarballDir`.
fn meta_with_release(version: &str) -> Meta {
    let bin = build(version);
    let meta = Meta::start(json!([]));
    test_support::tarball::publish(
        &meta.tarball_dir(),
        "ops-updater",
        version,
        &updater_tarball(&bin),
    );
    meta
}

/// A stand-in for a broken release: a script that passes `-v` and `-T`, then `behaviour`.
fn broken_binary(dir: &Path, version: &str, behaviour: &str) -> PathBuf {
    let p = dir.join(format!("broken-{version}"));
    let script = format!(
        "#!/bin/sh\ncase \"$1\" in -v) echo {version}; exit 0;; -T) exit 0;; esac\n{behaviour}\n"
    );
    std::fs::write(&p, script).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// Counts refused connections to an endpoint, polled every few milliseconds.
struct Poller {
    stop: Arc<AtomicBool>,
    refused: Arc<AtomicU64>,
    ok: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Poller {
    fn start(addr: SocketAddr) -> Poller {
        let stop = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicU64::new(0));
        let ok = Arc::new(AtomicU64::new(0));
        let (s, r, o) = (stop.clone(), refused.clone(), ok.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                    Ok(mut c) => {
                        let _ = write!(
                            c,
                            "GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
                        );
                        o.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        r.fetch_add(1, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Poller {
            stop,
            refused,
            ok,
            thread: Some(thread),
        }
    }

    /// (refused, accepted) so far; stops polling.
    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (
            self.refused.load(Ordering::Relaxed),
            self.ok.load(Ordering::Relaxed),
        )
    }
}

fn mode_tweak(protocol: &'static str) -> impl Fn(&mut Value) {
    move |c: &mut Value| {
        if protocol == "auto" {
            c.as_object_mut().unwrap().remove("protocol");
        } else {
            c["protocol"] = json!(protocol);
        }
        c["selfUpgradeCommitRounds"] = json!(2);
        c["selfUpgradeWatchSecs"] = json!(60);
        // A real updater binary is a few tens of MB.
        c["maxUnpackedBytes"] = json!(1u64 << 30);
    }
}

/// ops-meta's `agents` with ops-updater at `default` and `canary` for `canary-*` hosts.
fn updater_entry(meta: &Meta, default: &str, canary: &str) -> Value {
    json!([{
        "default": {"name": "ops-updater", "version": default, "tarball": meta.base(), "md5": "", "cmd": "start"},
        "others": [{"prefix": "canary", "version": canary, "tarball": "", "md5": "", "cmd": ""}]
    }])
}

/// Seconds between consecutive rounds in an updater's log (its debug lines of each
/// heartbeat or status report), after the first two (start-up).
fn round_gaps(log: &str) -> Vec<f64> {
    let times: Vec<f64> = log
        .lines()
        .filter(|l| l.contains(" heartbeat request ") || l.contains(" status report "))
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.timestamp_micros() as f64 / 1e6)
        .collect();
    times.windows(2).skip(2).map(|w| w[1] - w[0]).collect()
}

fn local_version(u: &Updater) -> Option<String> {
    match http_get(u.http, "/version") {
        Some((200, v)) => Some(v.trim().to_string()),
        _ => None,
    }
}

/// The updater's own binary (what the test started: a copy, since it is replaced).
fn install_copy(u: &Updater) -> PathBuf {
    let bin = u.dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let exe = bin.join("ops-updater");
    std::fs::copy(env!("CARGO_BIN_EXE_ops-updater"), &exe).unwrap();
    exe
}

/// Starts an updater from a copy of the test binary (a self-upgrade replaces it).
fn start_copy(server: &str, host: &str, tweak: impl Fn(&mut Value)) -> Updater {
    let mut u = Updater::prepare(server, host, tweak);
    let exe = install_copy(&u);
    u.exe = Some(exe);
    u.spawn();
    u
}

fn upgrades_canary_first_then_the_rest(protocol: &'static str) {
    let mut meta = meta_with_release(NEW);
    let server = meta.addr.to_string();
    let canary = start_copy(&server, "canary-1", mode_tweak(protocol));
    let web = start_copy(&server, "web-1", mode_tweak(protocol));
    let web2 = start_copy(&server, "web-2", mode_tweak(protocol));
    let pollers = [
        Poller::start(canary.http),
        Poller::start(web.http),
        Poller::start(web2.http),
    ];
    let pids = [canary.pid(), web.pid(), web2.pid()];
    meta.set_agents(updater_entry(&meta, OLD, NEW));
    wait_for(&format!("{protocol}: canary on {NEW}"), CONVERGE, || {
        local_version(&canary).as_deref() == Some(NEW)
    });
    // Committed: the new binary is the executable, the old one kept beside it.
    wait_for("canary committed", CONVERGE, || {
        !canary.work().join(".ops-updater.upgrade.json").exists()
            || std::fs::read_to_string(canary.work().join(".ops-updater.upgrade.json"))
                .is_ok_and(|m| !m.contains("\"upgrade\""))
    });
    // The new worker counted its commit before it wrote it (it serves the endpoint).
    assert_eq!(
        metric(
            &canary,
            "ops_updater_self_upgrades_total",
            &[("result", "committed")]
        ),
        1.0,
        "{protocol}"
    );
    let exe = canary.exe.clone().unwrap();
    wait_for("the executable replaced", CONVERGE, || {
        test_support::command(&exe)
            .arg("-v")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == NEW)
    });
    assert!(exe.with_file_name("ops-updater.prev").is_file());
    // The other host is not touched while only the canary is asked.
    web.wait_heartbeats(3);
    assert_eq!(local_version(&web).as_deref(), Some(OLD), "{protocol}");
    assert_eq!(local_version(&web2).as_deref(), Some(OLD), "{protocol}");
    // ops-meta sees the canary's new version.
    wait_for("ops-meta sees the canary's version", CONVERGE, || {
        meta.reported("ops-updater", "canary-1")
            .is_some_and(|r| r["version"] == NEW)
    });
    meta.set_agents(updater_entry(&meta, NEW, NEW));
    for u in [&web, &web2] {
        wait_for(
            &format!("{protocol}: {} on {NEW}", u.hostname),
            CONVERGE,
            || local_version(u).as_deref() == Some(NEW),
        );
    }
    for u in [&canary, &web, &web2] {
        u.wait_heartbeats(2);
    }
    for (p, u) in pollers.into_iter().zip([&canary, &web, &web2]) {
        let (refused, ok) = p.finish();
        assert_eq!(refused, 0, "{protocol} {}: {ok} accepted", u.hostname);
        assert!(ok > 0);
    }
    // The same supervisor process all along (the PID a service manager knows).
    assert_eq!([canary.pid(), web.pid(), web2.pid()], pids);
    // The heartbeat kept its schedule across the switch: no burst, no extra delay.
    for u in [&canary, &web, &web2] {
        let gaps = round_gaps(&u.log_text());
        assert!(gaps.len() >= 6, "{protocol} {}: {gaps:?}", u.hostname);
        assert!(
            gaps.iter().all(|g| (0.5..=2.5).contains(g)),
            "{protocol} {}: seconds between rounds {gaps:?}",
            u.hostname
        );
    }
    let mut c = canary;
    c.assert_alive();
}

#[test]
fn legacy_upgrades_canary_first_then_the_rest() {
    upgrades_canary_first_then_the_rest("legacy");
}

#[test]
fn bootagent_upgrades_canary_first_then_the_rest() {
    upgrades_canary_first_then_the_rest("bootagent");
}

#[test]
fn auto_upgrades_canary_first_then_the_rest() {
    upgrades_canary_first_then_the_rest("auto");
}

/// A release that is broken in `behaviour` is rolled back by the host itself, reported,
/// and not tried again.
fn broken_release_is_rolled_back(
    protocol: &'static str,
    version: &str,
    behaviour: &str,
    watch: u64,
) {
    let mut meta = Meta::start(json!([]));
    let broken = broken_binary(meta.dir.path(), version, behaviour);
    test_support::tarball::publish(
        &meta.tarball_dir(),
        "ops-updater",
        version,
        &updater_tarball(&broken),
    );
    let server = meta.addr.to_string();
    let tweak = mode_tweak(protocol);
    let u = start_copy(&server, "web-1", |c| {
        tweak(c);
        c["selfUpgradeWatchSecs"] = json!(watch);
    });
    let poller = Poller::start(u.http);
    let pid = u.pid();
    meta.set_agents(updater_entry(&meta, version, version));
    wait_for(
        &format!("{protocol}: rolled back from {version}"),
        CONVERGE,
        || {
            // (During a trial that hangs, the endpoint does not answer: connections wait.)
            get_json(u.http, "/status").is_some_and(|v| {
                v["daemon"]["selfUpgrade"]
                    .as_str()
                    .is_some_and(|s| s.contains("rolled back"))
            })
        },
    );
    let why = u.daemon_status()["selfUpgrade"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(why.contains(version), "{why}");
    assert_eq!(local_version(&u).as_deref(), Some(OLD));
    // Told: an event on the host, and at ops-meta with the host.
    wait_for("the roll-back event", CONVERGE, || {
        get_json(u.http, "/events").is_some_and(|v| {
            v.to_string().contains("self_upgrade_failed") && v.to_string().contains(version)
        })
    });
    wait_for("ops-meta has the roll-back event", CONVERGE, || {
        get_json(meta.addr, "/api/hosts/web-1")
            .is_some_and(|v| v.to_string().contains("self_upgrade_failed"))
    });
    // Over BootAgent, the job ends failed with the reason.
    if protocol != "legacy" {
        wait_for("the job's failed result at ops-meta", CONVERGE, || {
            get_json(meta.addr, "/api/hosts/web-1").is_some_and(|v| {
                v["results"].as_array().is_some_and(|rs| {
                    rs.iter().any(|r| {
                        r["name"] == "ops-updater"
                            && r["errcode"] != 0
                            && r["message"]
                                .as_str()
                                .is_some_and(|m| m.contains("rolled back"))
                    })
                })
            })
        });
    }
    // Not tried again while it stays the desired version.
    u.wait_heartbeats(4);
    let tries = u.log_text().matches("self-upgrade: downloading").count();
    assert_eq!(tries, 1, "{protocol}: tried {tries} times");
    assert_eq!(local_version(&u).as_deref(), Some(OLD));
    let exe = u.exe.clone().unwrap();
    let out = test_support::command(&exe).arg("-v").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), OLD);
    let (refused, _) = poller.finish();
    assert_eq!(refused, 0, "{protocol}");
    assert_eq!(u.pid(), pid);
}

#[test]
fn a_release_that_exits_at_start_is_rolled_back_in_every_mode() {
    for protocol in ["legacy", "bootagent", "auto"] {
        broken_release_is_rolled_back(protocol, "9.1.0", "exit 3", 60);
    }
}

#[test]
fn a_release_that_never_heartbeats_is_rolled_back_in_every_mode() {
    for protocol in ["legacy", "bootagent", "auto"] {
        broken_release_is_rolled_back(protocol, "9.2.0", "exec sleep 1000", 4);
    }
}

#[test]
fn kill_9_at_random_moments_leaves_a_working_updater() {
    let (new, newer) = (build(NEW), build(NEWER));
    let mut meta = Meta::start(json!([]));
    for (v, b) in [(NEW, &new), (NEWER, &newer)] {
        test_support::tarball::publish(&meta.tarball_dir(), "ops-updater", v, &updater_tarball(b));
    }
    let server = meta.addr.to_string();
    let mut u = start_copy(&server, "web-1", mode_tweak("legacy"));
    let mut seed: u64 = 0x5eed_1234;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for i in 0..20 {
        let target = if i % 2 == 0 { NEW } else { NEWER };
        meta.set_agents(updater_entry(&meta, target, target));
        std::thread::sleep(Duration::from_millis(rnd(4000)));
        let killed_at = now_unix();
        // The supervisor, its worker, or both.
        let worker = worker_of(u.pid()).map(|p| nix::unistd::Pid::from_raw(p as i32));
        match rnd(3) {
            0 => u.kill9(),
            1 => {
                if let Some(w) = worker {
                    let _ = nix::sys::signal::kill(w, nix::sys::signal::Signal::SIGKILL);
                }
            }
            _ => {
                if let Some(w) = worker {
                    let _ = nix::sys::signal::kill(w, nix::sys::signal::Signal::SIGKILL);
                }
                u.kill9();
            }
        }
        // The next start (what systemd's Restart= or an operator does) when it is gone.
        if !u.alive() {
            u.respawn_until_up();
        }
        wait_for(
            &format!("kill {i}: an updater reaches ops-meta again"),
            CONVERGE,
            || {
                meta.reported("ops-updater", "web-1")
                    .and_then(|r| r["timestamp"].as_i64())
                    .is_some_and(|t| t > killed_at)
            },
        );
    }
    // Afterwards it still upgrades (a kill of a trial may have rolled one version back and
    // blocked it: a change of the desired version lifts that), and ops-meta hears from it.
    for last in [NEW, NEWER] {
        meta.set_agents(updater_entry(&meta, last, last));
        wait_for(
            &format!("{last} after the kills"),
            Duration::from_secs(120),
            || local_version(&u).as_deref() == Some(last),
        );
        wait_for("ops-meta sees it", CONVERGE, || {
            meta.reported("ops-updater", "web-1")
                .is_some_and(|r| r["version"] == last)
        });
    }
}

/// The classic way: `./control start` from the install folder, whose `ops-updater` is a
/// symlink into a releases folder. The upgrade replaces the symlink's target (the old
/// binary kept beside it), the pid file keeps naming the running updater, and
/// `./control status|stop` keep working.
#[test]
fn control_script_and_a_symlinked_install_upgrade_in_place() {
    let mut meta = meta_with_release(NEW);
    let u = Updater::prepare(&meta.addr.to_string(), "web-1", mode_tweak("auto"));
    let home = u.dir.path().join("home");
    let release = u.dir.path().join("releases/1");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::create_dir_all(&release).unwrap();
    std::fs::copy(
        env!("CARGO_BIN_EXE_ops-updater"),
        release.join("ops-updater"),
    )
    .unwrap();
    std::os::unix::fs::symlink(release.join("ops-updater"), home.join("ops-updater")).unwrap();
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dist/control");
    std::fs::copy(&dist, home.join("control")).unwrap();
    std::fs::copy(u.dir.path().join("cfg.json"), home.join("cfg.json")).unwrap();
    let control = |action: &str| -> String {
        let out = test_support::command(&home.join("control"))
            .arg(action)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert!(
        control("start").contains("started"),
        "{}",
        control("status")
    );
    test_support::wait_listening(u.http, CONVERGE);
    let pid = std::fs::read_to_string(home.join("ops-updater.pid")).unwrap();
    assert_eq!(control("status"), "started");
    meta.set_agents(updater_entry(&meta, NEW, NEW));
    wait_for("upgraded", CONVERGE, || {
        local_version(&u).as_deref() == Some(NEW)
    });
    wait_for("the symlink's target replaced", CONVERGE, || {
        test_support::command(&home.join("ops-updater"))
            .arg("-v")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == NEW)
    });
    assert!(std::fs::symlink_metadata(home.join("ops-updater"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(release.join("ops-updater.prev").is_file());
    assert_eq!(
        std::fs::read_to_string(home.join("ops-updater.pid")).unwrap(),
        pid,
        "the pid file names the same process"
    );
    assert_eq!(control("status"), "started");
    assert!(control("stop").contains("stopped"));
    assert_eq!(control("status"), "stoped");
    // Gone (or a zombie, when nothing reaps the orphan here).
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap_or_default();
    assert!(
        stat.is_empty()
            || stat
                .rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z')),
        "the updater is gone after ./control stop: {stat}"
    );
}

/// An executable in a read-only folder cannot be replaced: refused before anything
/// changes, with the reason, on the host and at ops-meta.
#[test]
fn a_read_only_executable_folder_is_refused_with_the_reason() {
    let mut meta = meta_with_release(NEW);
    let mut u = Updater::prepare(&meta.addr.to_string(), "web-1", mode_tweak("bootagent"));
    let bin = u.dir.path().join("ro");
    std::fs::create_dir_all(&bin).unwrap();
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    mount(
        Some("tmpfs"),
        &bin,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("size=512m"),
    )
    .unwrap();
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = umount2(&self.0, MntFlags::MNT_DETACH);
        }
    }
    let _unmount = Unmount(bin.clone());
    std::fs::copy(env!("CARGO_BIN_EXE_ops-updater"), bin.join("ops-updater")).unwrap();
    mount(
        None::<&str>,
        &bin,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .unwrap();
    u.exe = Some(bin.join("ops-updater"));
    u.spawn();
    meta.set_agents(updater_entry(&meta, NEW, NEW));
    wait_for("the refusal on /status", CONVERGE, || {
        u.daemon_status()["selfUpgrade"]
            .as_str()
            .is_some_and(|s| s.contains("read-only"))
    });
    wait_for("the refusal at ops-meta", CONVERGE, || {
        get_json(meta.addr, "/api/hosts/web-1").is_some_and(|v| v.to_string().contains("read-only"))
    });
    assert_eq!(local_version(&u).as_deref(), Some(OLD));
    let s = scrape(&u);
    assert!(
        counter(
            &s,
            "ops_updater_self_upgrades_total",
            &[("result", "failed")]
        ) >= 1.0
    );
    assert_eq!(
        counter(
            &s,
            "ops_updater_self_upgrades_total",
            &[("result", "started")]
        ),
        0.0
    );
    let names: Vec<String> = std::fs::read_dir(&bin)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["ops-updater"]);
    drop(u);
}

/// A host that runs the original updater (the stand-in, tests' `original-updater.py`) is
/// moved to ours by a change of ops-meta's config alone: the original installs our
/// release as agent `ops-updater-migrate` and runs its `control start`, which takes the original's
/// place. Its agent keeps running throughout, and ours reports to ops-meta.
#[test]
fn a_host_on_the_original_updater_migrates_by_config_alone() {
    let new = build(NEW);
    let mut meta = Meta::start(json!([]));
    publish(
        &meta,
        "falcon",
        "1.0.0",
        test_support::agent::Behaviour::Good,
    );
    // The same release, under the name the original installs it as.
    test_support::tarball::publish(
        &meta.tarball_dir(),
        "ops-updater-migrate",
        NEW,
        &updater_tarball(&new),
    );
    meta.desire(&[("falcon", "1.0.0", "start")]);
    let host = test_support::tempdir().unwrap();
    let w = host.path();
    let orig = w.join("ops-updater");
    std::fs::write(
        &orig,
        include_str!("../../test-support/original-updater.py"),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&orig, std::fs::Permissions::from_mode(0o755)).unwrap();
    let http = SocketAddr::from(([127, 0, 0, 1], test_support::free_port()));
    // The original's config, in its format: ours must run on it as it is.
    let cfg = json!({"debug": false, "hostname": "old-1", "desiredAgent": "",
        "server": meta.addr.to_string(), "interval": 1,
        "http": {"enabled": true, "listen": http.to_string()}});
    test_support::write_file(w, "cfg.json", serde_json::to_vec(&cfg).unwrap());
    let log = std::fs::File::create(w.join("original.log")).unwrap();
    let original = test_support::command(&orig)
        .args(["-c", "cfg.json"])
        .current_dir(w)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let original = test_support::KillOnDrop(original);
    struct Tell(PathBuf);
    impl Drop for Tell {
        fn drop(&mut self) {
            if std::thread::panicking() {
                for f in [
                    "original.log",
                    "ops-updater.takeover.log",
                    "ops-updater.log",
                ] {
                    let text = std::fs::read_to_string(self.0.join(f)).unwrap_or_default();
                    eprintln!("--- {f} ---\n{text}");
                }
                eprintln!("--- files ---\n{:?}", test_support::tree(&self.0));
            }
        }
    }
    let _tell = Tell(w.to_path_buf());
    let falcon = w.join("falcon/1.0.0");
    wait_for("the original runs falcon", CONVERGE, || {
        status_of(&falcon) == "started"
    });
    let app_pid = std::fs::read_to_string(falcon.join("app.pid")).unwrap();

    // Ours, once it runs, is found by the lock it holds; stopped at the end.
    struct Ours(PathBuf);
    impl Drop for Ours {
        fn drop(&mut self) {
            if let Some(pid) = std::fs::read_to_string(&self.0)
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    let _ours = Ours(w.join(".ops-updater.lock"));
    let base = meta.base();
    meta.set_agents(json!([
        agent_entry("falcon", "1.0.0", &base, "start"),
        agent_entry("ops-updater-migrate", NEW, &base, "start"),
    ]));
    wait_for(
        "ours serves the local endpoint",
        Duration::from_secs(120),
        || http_get(http, "/version").is_some_and(|(c, v)| c == 200 && v.trim() == NEW),
    );
    let mut original = original;
    wait_for("the original ended", CONVERGE, || {
        original.0.try_wait().ok().flatten().is_some()
    });
    // Ours is the executable now, the original kept beside it.
    let out = test_support::command(&orig).arg("-v").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), NEW);
    assert!(w.join("ops-updater.orig").is_file());
    wait_for("ops-meta hears from ours", CONVERGE, || {
        meta.reported("ops-updater", "old-1")
            .is_some_and(|r| r["version"] == NEW)
            && meta
                .reported("falcon", "old-1")
                .is_some_and(|r| r["status"] == "started")
    });
    // The agent ran throughout: the same process, never stopped or started again.
    assert_eq!(
        std::fs::read_to_string(falcon.join("app.pid")).unwrap(),
        app_pid
    );
    assert_eq!(control_actions(&falcon), ["start 1.0.0"]);
    stop_all_agents(w);
}

/// Under systemd `Type=notify`: the worker says `READY=1` on `$NOTIFY_SOCKET` once it runs.
#[test]
fn the_worker_tells_systemd_it_is_ready() {
    let meta = Meta::start(json!([]));
    let u = Updater::prepare(&meta.addr.to_string(), "web-1", mode_tweak("legacy"));
    let sock_path = u.dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(CONVERGE)).unwrap();
    let child = test_support::command(Path::new(env!("CARGO_BIN_EXE_ops-updater")))
        .arg("-c")
        .arg(u.dir.path().join("cfg.json"))
        .current_dir(u.dir.path())
        .env("NOTIFY_SOCKET", &sock_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _child = test_support::KillOnDrop(child);
    let mut buf = [0u8; 64];
    let n = sock.recv(&mut buf).expect("READY=1 within the bound");
    assert_eq!(&buf[..n], b"READY=1");
}

/// Releases of ops-updater where operators keep them — a subfolder of `tarballDir` (seed
/// 001's guide) and a separate file server, with a `.sha256` beside the tarball and without
/// (ops-meta then hashes it) — one protocol mode each: the host upgrades and commits.
#[test]
fn a_release_in_a_subfolder_or_on_a_file_server_upgrades() {
    let tarball = updater_tarball(&build(NEW));
    for (protocol, layout) in [
        ("legacy", "subfolder"),
        ("bootagent", "file server with .sha256"),
        ("auto", "file server"),
    ] {
        let what = format!("{protocol} × {layout}");
        let files = layout
            .starts_with("file server")
            .then(test_support::fileserver::FileServer::start);
        let mut meta = Meta::start(json!([]));
        let (dir, base) = match &files {
            None => (
                meta.tarball_dir().join("updater"),
                format!("{}/updater", meta.base()),
            ),
            Some(f) => (f.dir.path().join("updater"), f.url("updater")),
        };
        let (_, sha) = test_support::tarball::publish(&dir, "ops-updater", NEW, &tarball);
        if layout.ends_with(".sha256") {
            let file = proto::legacy::tarball_file("ops-updater", NEW);
            std::fs::write(
                dir.join(format!("{file}.sha256")),
                format!("{sha}  {file}\n"),
            )
            .unwrap();
        }
        let u = start_copy(&meta.addr.to_string(), "web-1", mode_tweak(protocol));
        let pid = u.pid();
        meta.set_agents(json!([{
            "default": {"name": "ops-updater", "version": NEW, "tarball": base, "md5": "", "cmd": "start"},
        }]));
        wait_for(&format!("{what}: on {NEW}"), CONVERGE, || {
            local_version(&u).as_deref() == Some(NEW)
        });
        let marker = u.work().join(".ops-updater.upgrade.json");
        wait_for(&format!("{what}: committed"), CONVERGE, || {
            std::fs::read_to_string(&marker).map_or(true, |m| !m.contains("\"upgrade\""))
        });
        let exe = u.exe.clone().unwrap();
        let v = test_support::command(&exe).arg("-v").output().unwrap();
        assert_eq!(String::from_utf8_lossy(&v.stdout).trim(), NEW, "{what}");
        assert_eq!(u.pid(), pid, "{what}: the supervisor stays");
        wait_for(&format!("{what}: ops-meta sees {NEW}"), CONVERGE, || {
            meta.reported("ops-updater", "web-1")
                .is_some_and(|r| r["version"] == NEW)
        });
    }
}

/// With `trustedKeys` and `requireSignature`, a release signed by the operator's key (the
/// real `minisign` tool) upgrades ops-updater in every protocol mode; the same binary
/// signed by a key the host does not trust is refused and the running version stays.
#[test]
fn a_signed_release_upgrades_when_signatures_are_required() {
    if !test_support::minisign::available() {
        assert!(
            std::env::var_os("CI").is_none(),
            "minisign is not installed"
        );
        return;
    }
    let keys = test_support::tempdir().unwrap();
    let operator = test_support::minisign::KeyPair::generate(keys.path(), "operator");
    let stranger = test_support::minisign::KeyPair::generate(keys.path(), "stranger");
    let tarball = updater_tarball(&build(NEW));
    for protocol in ["legacy", "bootagent", "auto"] {
        let mut meta = Meta::start(json!([]));
        let dir = meta.tarball_dir();
        let file = dir.join(proto::legacy::tarball_file("ops-updater", NEW));
        let other = dir.join(proto::legacy::tarball_file("ops-updater", NEWER));
        test_support::tarball::publish(&dir, "ops-updater", NEW, &tarball);
        test_support::tarball::publish(&dir, "ops-updater", NEWER, &tarball);
        operator.sign(&file);
        stranger.sign(&other);
        let trusted = json!([operator.pub_text()]);
        let tweak = mode_tweak(protocol);
        let u = start_copy(&meta.addr.to_string(), "web-1", |c| {
            tweak(c);
            c["trustedKeys"] = trusted.clone();
            c["requireSignature"] = json!(true);
        });
        let pid = u.pid();
        // Signed by a key the host does not know: refused, nothing switched.
        meta.set_agents(json!([{"default": {"name": "ops-updater", "version": NEWER,
            "tarball": meta.base(), "md5": "", "cmd": "start"}}]));
        wait_for(
            &format!("{protocol}: the stranger's release refused"),
            CONVERGE,
            || {
                u.log_text()
                    .contains("refusing ops-updater-9.0.1.tar.gz: signed by key")
                    && u.log_text().contains("which is not in trustedKeys")
            },
        );
        assert_eq!(local_version(&u).as_deref(), Some(OLD), "{protocol}");
        // Signed by the operator: upgraded and committed, the supervisor stays.
        meta.set_agents(json!([{"default": {"name": "ops-updater", "version": NEW,
            "tarball": meta.base(), "md5": "", "cmd": "start"}}]));
        wait_for(&format!("{protocol}: on {NEW}"), CONVERGE, || {
            local_version(&u).as_deref() == Some(NEW)
        });
        let marker = u.work().join(".ops-updater.upgrade.json");
        wait_for(&format!("{protocol}: committed"), CONVERGE, || {
            std::fs::read_to_string(&marker).map_or(true, |m| !m.contains("\"upgrade\""))
        });
        let v = test_support::command(u.exe.as_ref().unwrap())
            .arg("-v")
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&v.stdout).trim(), NEW, "{protocol}");
        assert_eq!(u.pid(), pid, "{protocol}: the supervisor stays");
    }
}
