//! The deployment matrix: one list of scenarios, run with the real `ops-meta` and
//! `ops-updater` binaries for every protocol (`legacy`, `bootagent`, the default `auto`)
//! and every tarball layout operators use — the root of `tarballDir`, a subfolder of it
//! as in seed 001's guide, and a separate static file server (Python's `http.server`, a
//! real program that is not ours) with and without a `.sha256` beside each tarball.
//!
//! It exists because every earlier test put tarballs at the root of `tarballDir`, and our
//! updater on our server installed nothing with the guide's layout. A feature that
//! touches hosts adds its scenario to [`run`], so it is tried in every cell.
//!
//! Each cell runs one ops-meta, two updaters (`web-01` and `canary-01`) at a 1 s interval
//! and, for the file-server layouts, one `python3 -m http.server`, through these steps:
//! install, canary by prefix, upgrade, a version that fails to start (rolled back), a
//! wrong `.md5` (refused), a hostile archive (refused), `kill -9` of the updater in the
//! middle of an upgrade (converges after restart), `cmd: stop`.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{control_actions, get_json, http_get, status_of, Meta, Updater, CONVERGE};
use serde_json::{json, Value};
use test_support::agent::{agent_tarball, control_script, Behaviour};
use test_support::fileserver::FileServer;
use test_support::tarball::{targz, Entry};
use test_support::{free_port, wait_for};

const AGENT: &str = "falcon-agent";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// `tarballDir/falcon-agent-1.0.0.tar.gz`, URL base `http://meta`.
    Root,
    /// `tarballDir/falcon/falcon-agent-1.0.0.tar.gz`, URL base `http://meta/falcon`: seed
    /// 001's guide.
    Subfolder,
    /// Another web server on another port, URL base `http://files/falcon`; with or without
    /// a `.sha256` file beside each tarball.
    FileServer { sha256: bool },
}

struct Cell {
    protocol: &'static str,
    layout: Layout,
    meta: Meta,
    files: Option<FileServer>,
    web: Updater,
    canary: Updater,
}

impl Cell {
    fn start(protocol: &'static str, layout: Layout) -> Cell {
        let files = matches!(layout, Layout::FileServer { .. }).then(FileServer::start);
        let mut meta = Meta::prepare(free_port(), json!([]));
        write_meta_config(&meta);
        meta.spawn();
        let server = meta.addr.to_string();
        let tweak = |c: &mut Value| {
            if protocol == "auto" {
                // The default: leave the key out, as an operator would.
                c.as_object_mut().unwrap().remove("protocol");
            } else {
                c["protocol"] = json!(protocol);
            }
        };
        let web = Updater::start(&server, "web-01", tweak);
        let canary = Updater::start(&server, "canary-01", tweak);
        Cell {
            protocol,
            layout,
            meta,
            files,
            web,
            canary,
        }
    }

    /// The folder tarballs go in, and the URL base of the `tarball` field.
    fn place(&self) -> (PathBuf, String) {
        match (self.layout, &self.files) {
            (Layout::Root, _) => (self.meta.tarball_dir(), self.meta.base()),
            (Layout::Subfolder, _) => (
                self.meta.tarball_dir().join("falcon"),
                format!("{}/falcon", self.meta.base()),
            ),
            (Layout::FileServer { .. }, Some(f)) => (f.dir.path().join("falcon"), f.url("falcon")),
            (Layout::FileServer { .. }, None) => unreachable!("file server started"),
        }
    }

    /// Publishes `tarball` as `version`, with its `.md5` (wrong when `bad_md5`) and, for
    /// the file-server layout that has them, its `.sha256`.
    fn publish(&self, version: &str, tarball: &[u8], bad_md5: bool) {
        let (dir, _) = self.place();
        let (_, sha) = test_support::tarball::publish(&dir, AGENT, version, tarball);
        let file = proto::legacy::tarball_file(AGENT, version);
        if bad_md5 {
            let wrong = test_support::digests(b"not this tarball").0;
            std::fs::write(
                dir.join(format!("{file}.md5")),
                proto::legacy::format_md5_file(&wrong, &file),
            )
            .unwrap();
        }
        if self.layout == (Layout::FileServer { sha256: true }) {
            std::fs::write(
                dir.join(format!("{file}.sha256")),
                format!("{sha}  {file}\n"),
            )
            .unwrap();
        }
    }

    /// Sets the desired state: `version` and `cmd` by default, `others` overrides.
    fn desire(&mut self, version: &str, cmd: &str, others: Value) {
        let (_, base) = self.place();
        self.meta.agents = json!([{
            "default": {"name": AGENT, "version": version, "tarball": base, "md5": "", "cmd": cmd},
            "others": others,
        }]);
        write_meta_config(&self.meta);
        let (code, body) = http_get(self.meta.addr, "/config/reload").expect("reload answered");
        assert_eq!(code, 200, "reload failed: {body}");
    }

    fn hosts(&self) -> [&Updater; 2] {
        [&self.web, &self.canary]
    }

    fn what(&self) -> String {
        format!("{} × {:?}", self.protocol, self.layout)
    }

    /// Waits until `u` runs `version`, with the cell's logs in the failure message.
    fn wait_running(&self, u: &Updater, version: &str) {
        let dir = u.work().join(AGENT);
        let deadline = Instant::now() + CONVERGE;
        while Instant::now() < deadline {
            if u.version_of(AGENT).as_deref() == Some(version)
                && status_of(&dir.join(version)) == "started"
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "{}: {} does not run {AGENT} {version} (.version {:?}); updater log tail:\n{}\nmeta hosts: {:?}",
            self.what(),
            u.hostname,
            u.version_of(AGENT),
            tail(&u.log_text()),
            get_json(self.meta.addr, "/api/hosts"),
        );
    }

    fn wait_log(&self, u: &Updater, needle: &str) {
        let deadline = Instant::now() + CONVERGE;
        while Instant::now() < deadline {
            if u.log_text().contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "{}: {} never logged {needle:?}; log tail:\n{}",
            self.what(),
            u.hostname,
            tail(&u.log_text())
        );
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn write_meta_config(m: &Meta) {
    let cfg = json!({
        "debug": false,
        "tarballDir": m.tarball_dir(),
        "http": {"enabled": true, "listen": m.addr.to_string()},
        "shaRecheckSecs": 1,
        "remoteRecheckSecs": 1,
        "agents": m.agents,
    });
    test_support::write_file(
        m.dir.path(),
        "cfg.json",
        serde_json::to_vec_pretty(&cfg).unwrap(),
    );
}

/// A fake agent whose `control start` takes a second, so the updater can be killed in
/// the middle of switching to it.
fn slow_start_tarball(version: &str) -> Vec<u8> {
    let script = control_script(AGENT, version, Behaviour::Good).replacen(
        "  start)\n",
        "  start)\n    sleep 1\n",
        1,
    );
    targz(&[
        Entry::exec("control", script),
        Entry::file("VERSION", format!("{version}\n")),
    ])
}

/// Every scenario, in order, in one cell.
fn run(protocol: &'static str, layout: Layout) {
    let mut c = Cell::start(protocol, layout);

    // Install: every host gets 1.0.0 and runs it.
    c.publish(
        "1.0.0",
        &agent_tarball(AGENT, "1.0.0", Behaviour::Good),
        false,
    );
    c.publish(
        "1.1.0",
        &agent_tarball(AGENT, "1.1.0", Behaviour::Good),
        false,
    );
    c.desire("1.0.0", "start", json!([]));
    for u in c.hosts() {
        c.wait_running(u, "1.0.0");
    }
    // `auto` talks BootAgent to our own server (the case that used to install nothing).
    // (`/api/hosts/NAME` shows legacy hosts too, with `protocol: "legacy"`.)
    let boot_view = get_json(c.meta.addr, "/api/hosts/web-01");
    assert_eq!(
        boot_view.is_some_and(|v| v["protocol"] == "bootagent"),
        protocol != "legacy",
        "{}: BootAgent registration",
        c.what()
    );

    // Canary by prefix: only canary-01 moves to 1.1.0.
    c.desire(
        "1.0.0",
        "start",
        json!([{"prefix": "canary", "version": "1.1.0"}]),
    );
    c.wait_running(&c.canary, "1.1.0");
    c.web.wait_heartbeats(2);
    assert_eq!(
        c.web.version_of(AGENT).as_deref(),
        Some("1.0.0"),
        "{}",
        c.what()
    );

    // Upgrade: everyone to 1.1.0.
    c.desire("1.1.0", "start", json!([]));
    for u in c.hosts() {
        c.wait_running(u, "1.1.0");
    }

    // A version that does not start: tried, then rolled back to 1.1.0, which runs again.
    c.publish(
        "1.2.0",
        &agent_tarball(AGENT, "1.2.0", Behaviour::StartFails),
        false,
    );
    c.desire("1.2.0", "start", json!([]));
    for u in c.hosts() {
        let tried = u.work().join(AGENT).join("1.2.0");
        wait_for(
            &format!("{}: {} tried 1.2.0", c.what(), u.hostname),
            CONVERGE,
            || control_actions(&tried).iter().any(|a| a == "start 1.2.0"),
        );
        c.wait_log(u, "new version failed; rolling back");
        c.wait_running(u, "1.1.0");
        // Nothing waits in silence: the host says what it waits for, once.
        let waits = if protocol == "legacy" {
            "before trying this version again"
        } else {
            "the server has no job for this agent yet: not retried: upgrade 1.2.0 failed"
        };
        c.wait_log(u, waits);
    }

    // A wrong `.md5`: refused before anything is unpacked; 1.1.0 keeps running.
    c.publish(
        "1.3.0",
        &agent_tarball(AGENT, "1.3.0", Behaviour::Good),
        true,
    );
    c.desire("1.3.0", "start", json!([]));
    for u in c.hosts() {
        c.wait_log(u, "md5 mismatch for falcon-agent-1.3.0.tar.gz");
        assert!(!u.work().join(AGENT).join("1.3.0").exists(), "{}", c.what());
        c.wait_running(u, "1.1.0");
    }

    // A hostile archive: refused, nothing written outside, 1.1.0 keeps running.
    let hostile = targz(&[
        Entry::exec("control", "#!/bin/sh\necho started\n"),
        Entry::file("../../pwned", "x"),
    ]);
    c.publish("1.4.0", &hostile, false);
    c.desire("1.4.0", "start", json!([]));
    for u in c.hosts() {
        c.wait_log(u, "../../pwned");
        assert!(!u.work().join(AGENT).join("1.4.0").exists(), "{}", c.what());
        let leaked = test_support::tree(u.dir.path())
            .into_iter()
            .filter(|p| p.contains("pwned"))
            .collect::<Vec<_>>();
        assert!(leaked.is_empty(), "{}: {leaked:?}", c.what());
        c.wait_running(u, "1.1.0");
    }

    // kill -9 of the updater in the middle of an upgrade (inside the new version's
    // `control start`): after a restart the host converges on 1.5.0, one copy running.
    c.publish("1.5.0", &slow_start_tarball("1.5.0"), false);
    c.desire("1.5.0", "start", json!([]));
    let new = c.web.work().join(AGENT).join("1.5.0");
    wait_for(
        &format!("{}: web-01 starting 1.5.0", c.what()),
        CONVERGE,
        || control_actions(&new).iter().any(|a| a == "start 1.5.0"),
    );
    c.web.kill9();
    c.web.spawn();
    for u in c.hosts() {
        c.wait_running(u, "1.5.0");
        assert_eq!(
            status_of(&u.work().join(AGENT).join("1.1.0")),
            "stoped",
            "{}: the old version still runs on {}",
            c.what(),
            u.hostname
        );
    }

    // `cmd: stop`: every host stops the agent and keeps it installed.
    c.desire("1.5.0", "stop", json!([]));
    for u in c.hosts() {
        let vdir = u.work().join(AGENT).join("1.5.0");
        wait_for(
            &format!("{}: {} stopped", c.what(), u.hostname),
            CONVERGE,
            || status_of(&vdir) == "stoped",
        );
        assert_eq!(u.version_of(AGENT).as_deref(), Some("1.5.0"));
    }
    for u in [&mut c.web, &mut c.canary] {
        u.assert_alive();
    }
}

macro_rules! cells {
    ($($name:ident: $proto:expr, $layout:expr;)*) => {
        $(
            #[test]
            fn $name() {
                run($proto, $layout);
            }
        )*
    };
}

cells! {
    legacy_root: "legacy", Layout::Root;
    legacy_subfolder: "legacy", Layout::Subfolder;
    legacy_file_server_with_sha256: "legacy", Layout::FileServer { sha256: true };
    legacy_file_server_without_sha256: "legacy", Layout::FileServer { sha256: false };
    bootagent_root: "bootagent", Layout::Root;
    bootagent_subfolder: "bootagent", Layout::Subfolder;
    bootagent_file_server_with_sha256: "bootagent", Layout::FileServer { sha256: true };
    bootagent_file_server_without_sha256: "bootagent", Layout::FileServer { sha256: false };
    auto_root: "auto", Layout::Root;
    auto_subfolder: "auto", Layout::Subfolder;
    auto_file_server_with_sha256: "auto", Layout::FileServer { sha256: true };
    auto_file_server_without_sha256: "auto", Layout::FileServer { sha256: false };
}

/// Seed 001's guide followed step by step with our two programs: `tarballDir` relative,
/// the agent's tarball in `tarball/falcon/` with the `.md5` that `md5sum` writes, `tarball`
/// pointing at ops-meta itself, the updater on its defaults (`protocol: auto`, a random
/// first delay). The agent must be installed and started within two intervals.
#[test]
fn seed_001_guide_installs_and_starts_within_two_intervals() {
    const INTERVAL: u64 = 3;
    let mut meta = Meta::prepare(free_port(), json!([]));
    let cfg = json!({
        "debug": true,
        "tarballDir": "./tarball",
        "http": {"enabled": true, "listen": meta.addr.to_string()},
        "agents": [{"default": {"name": AGENT, "version": "3.1.3",
            "tarball": format!("{}/falcon", meta.base()), "md5": "", "cmd": "start"}}],
    });
    test_support::write_file(meta.dir.path(), "cfg.json", cfg.to_string());
    let falcon = meta.tarball_dir().join("falcon");
    test_support::tarball::publish(
        &falcon,
        AGENT,
        "3.1.3",
        &agent_tarball(AGENT, "3.1.3", Behaviour::Good),
    );
    meta.spawn();
    let started = Instant::now();
    let u = Updater::start(&meta.addr.to_string(), "guide-01", |c| {
        let c = c.as_object_mut().unwrap();
        c.remove("protocol");
        c.remove("firstDelayMaxMs");
        c.insert("interval".into(), json!(INTERVAL));
    });
    let dir = u.work().join(AGENT);
    wait_for("falcon-agent 3.1.3 running", CONVERGE, || {
        u.version_of(AGENT).as_deref() == Some("3.1.3")
            && status_of(&dir.join("3.1.3")) == "started"
    });
    let took = started.elapsed();
    // Two intervals, plus a little for the processes to start on a loaded machine.
    assert!(
        took <= Duration::from_secs(2 * INTERVAL + 2),
        "installed after {took:?}; log:\n{}",
        tail(&u.log_text())
    );
    // It went over BootAgent (auto against our own server), and ops-meta reports it.
    assert!(get_json(meta.addr, "/api/hosts/guide-01").is_some());
    wait_for("meta reports the agent", CONVERGE, || {
        meta.reported(AGENT, "guide-01")
            .is_some_and(|r| r["version"] == "3.1.3" && r["status"] == "started")
    });
}
