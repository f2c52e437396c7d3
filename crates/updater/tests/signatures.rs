//! Signed artifacts end to end: keys made and tarballs signed with the real `minisign`
//! tool, served by the real `ops-meta` (or a separate file server), installed or refused
//! by the real `ops-updater` with `trustedKeys` and `requireSignature`, in every protocol
//! mode and tarball layout, as tests/matrix.rs does for the rest.
//!
//! Each cell runs one ops-meta and one updater trusting two keys (key rotation: one given
//! as its whole `.pub` file, the other as its key line), through: a tarball signed by the
//! first key installs, one signed by the second upgrades; then, each refused with its
//! reason while the running version keeps running, a tarball changed after signing (its
//! `.md5` made anew, so only the signature catches it), one signed by an unknown key, one
//! without `.minisig`, and a validly signed tarball served under another version's name.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{get_json, http_get, status_of, Meta, Updater, CONVERGE};
use serde_json::json;
use test_support::agent::{agent_tarball, Behaviour};
use test_support::fileserver::FileServer;
use test_support::minisign::KeyPair;
use test_support::{free_port, wait_for};

const AGENT: &str = "falcon-agent";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// `tarballDir/falcon-agent-1.0.0.tar.gz` and its `.minisig`.
    Root,
    /// `tarballDir/falcon/…`, URL base `http://meta/falcon`.
    Subfolder,
    /// A separate static file server (Python's), URL base `http://files/falcon`.
    FileServer,
}

struct Keys {
    _dir: test_support::TempDir,
    a: KeyPair,
    b: KeyPair,
    stranger: KeyPair,
}

impl Keys {
    fn generate() -> Keys {
        let dir = test_support::tempdir().unwrap();
        Keys {
            a: KeyPair::generate(dir.path(), "a"),
            b: KeyPair::generate(dir.path(), "b"),
            stranger: KeyPair::generate(dir.path(), "stranger"),
            _dir: dir,
        }
    }
}

struct Cell {
    protocol: &'static str,
    layout: Layout,
    meta: Meta,
    files: Option<FileServer>,
    host: Updater,
}

impl Cell {
    fn start(protocol: &'static str, layout: Layout, keys: &Keys) -> Cell {
        let files = (layout == Layout::FileServer).then(FileServer::start);
        let mut meta = Meta::prepare(free_port(), json!([]));
        write_meta_config(&meta);
        meta.spawn();
        let trusted = json!([keys.a.pub_text(), keys.b.key_line()]);
        let host = Updater::start(&meta.addr.to_string(), "web-01", |c| {
            if protocol == "auto" {
                c.as_object_mut().unwrap().remove("protocol");
            } else {
                c["protocol"] = json!(protocol);
            }
            c["trustedKeys"] = trusted;
            c["requireSignature"] = json!(true);
        });
        Cell {
            protocol,
            layout,
            meta,
            files,
            host,
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
            (Layout::FileServer, Some(f)) => (f.dir.path().join("falcon"), f.url("falcon")),
            (Layout::FileServer, None) => unreachable!("file server started"),
        }
    }

    fn tarball_path(&self, version: &str) -> PathBuf {
        self.place()
            .0
            .join(proto::legacy::tarball_file(AGENT, version))
    }

    /// Publishes a good tarball of `version` with its `.md5`, signed by `key` when given.
    fn publish(&self, version: &str, key: Option<&KeyPair>) {
        let (dir, _) = self.place();
        let tarball = agent_tarball(AGENT, version, Behaviour::Good);
        test_support::tarball::publish(&dir, AGENT, version, &tarball);
        if let Some(k) = key {
            k.sign(&self.tarball_path(version));
        }
    }

    fn desire(&mut self, version: &str) {
        let (_, base) = self.place();
        self.meta.agents = json!([{
            "default": {"name": AGENT, "version": version, "tarball": base, "md5": "", "cmd": "start"},
        }]);
        write_meta_config(&self.meta);
        let (code, body) = http_get(self.meta.addr, "/config/reload").expect("reload answered");
        assert_eq!(code, 200, "reload failed: {body}");
    }

    fn what(&self) -> String {
        format!("{} × {:?}", self.protocol, self.layout)
    }

    fn wait_running(&self, version: &str) {
        let u = &self.host;
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
            "{}: {AGENT} {version} does not run (.version {:?}); log tail:\n{}",
            self.what(),
            u.version_of(AGENT),
            tail(&u.log_text()),
        );
    }

    /// Desires `version`, waits for its refusal with `reason` in the log and on the local
    /// `/status` (and, over BootAgent, in the job result ops-meta shows), and checks that
    /// nothing of it was installed and `running` still runs.
    fn refused(&mut self, version: &str, reason: &str, running: &str) {
        self.desire(version);
        let file = proto::legacy::tarball_file(AGENT, version);
        let needle = format!("refusing {file}: {reason}");
        let u = &self.host;
        let deadline = Instant::now() + CONVERGE;
        while !u.log_text().contains(&needle) {
            if Instant::now() > deadline {
                panic!(
                    "{}: never logged {needle:?}; lastError {:?}; log tail:\n{}",
                    self.what(),
                    u.agent_status(AGENT).map(|s| s["lastError"].clone()),
                    tail(&u.log_text())
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        wait_for(
            &format!("{}: the refusal on /status", self.what()),
            CONVERGE,
            || {
                u.agent_status(AGENT)
                    .is_some_and(|s| s["lastError"].as_str().is_some_and(|e| e.contains(&needle)))
            },
        );
        if self.protocol != "legacy" {
            // The result's message is capped in length: its start is enough.
            let head = format!("refusing {file}");
            wait_for(
                &format!("{}: the refusal in the job result", self.what()),
                CONVERGE,
                || {
                    get_json(self.meta.addr, "/api/hosts/web-01").is_some_and(|v| {
                        v["results"].as_array().is_some_and(|r| {
                            r.iter().any(|r| {
                                r["version"] == version
                                    && r["message"].as_str().is_some_and(|m| m.contains(&head))
                            })
                        })
                    })
                },
            );
        }
        let vdir = u.work().join(AGENT).join(version);
        assert!(!vdir.exists(), "{}: {version} was installed", self.what());
        let leftovers: Vec<String> = test_support::tree(&u.work().join(AGENT))
            .into_iter()
            .filter(|p| p.contains(&file))
            .filter(|p| !p.starts_with(running))
            .collect();
        assert!(leftovers.is_empty(), "{}: {leftovers:?} left", self.what());
        self.wait_running(running);
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

/// The key ID minisign printed into the `.pub` file's comment.
fn key_id(k: &KeyPair) -> String {
    let text = k.pub_text();
    let first = text.lines().next().unwrap();
    first.rsplit(' ').next().unwrap().to_string()
}

/// Every scenario, in order, in one cell.
fn run(protocol: &'static str, layout: Layout) {
    if !test_support::minisign::available() {
        return;
    }
    let keys = Keys::generate();
    let mut c = Cell::start(protocol, layout, &keys);

    // Signed by the first key: installs.
    c.publish("1.0.0", Some(&keys.a));
    c.desire("1.0.0");
    c.wait_running("1.0.0");
    // Signed by the second (rotation: both trusted at once): upgrades.
    c.publish("1.1.0", Some(&keys.b));
    c.desire("1.1.0");
    c.wait_running("1.1.0");

    // Changed after signing, its .md5 made anew: only the signature catches it.
    c.publish("1.2.0", Some(&keys.a));
    let other = agent_tarball(AGENT, "1.2.0", Behaviour::StartFails);
    test_support::tarball::publish(&c.place().0, AGENT, "1.2.0", &other);
    c.refused(
        "1.2.0",
        &format!("the signature by key {} does not verify", key_id(&keys.a)),
        "1.1.0",
    );

    // Signed by a key that is not trusted.
    c.publish("1.3.0", Some(&keys.stranger));
    c.refused(
        "1.3.0",
        &format!(
            "signed by key {}, which is not in trustedKeys",
            key_id(&keys.stranger)
        ),
        "1.1.0",
    );

    // No .minisig at all.
    c.publish("1.4.0", None);
    c.refused("1.4.0", "no signature at http://", "1.1.0");

    // 1.1.0, validly signed, replayed as 1.5.0 (the tarball, its .md5 and .minisig copied).
    let (dir, _) = c.place();
    let (from, to) = (
        proto::legacy::tarball_file(AGENT, "1.1.0"),
        proto::legacy::tarball_file(AGENT, "1.5.0"),
    );
    let replayed = std::fs::read(dir.join(&from)).unwrap();
    test_support::tarball::publish(&dir, AGENT, "1.5.0", &replayed);
    std::fs::copy(
        dir.join(format!("{from}.minisig")),
        dir.join(format!("{to}.minisig")),
    )
    .unwrap();
    c.refused(
        "1.5.0",
        &format!("the signature is for {from:?}, not this file"),
        "1.1.0",
    );

    c.host.assert_alive();
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
    legacy_file_server: "legacy", Layout::FileServer;
    bootagent_root: "bootagent", Layout::Root;
    bootagent_subfolder: "bootagent", Layout::Subfolder;
    bootagent_file_server: "bootagent", Layout::FileServer;
    auto_root: "auto", Layout::Root;
    auto_subfolder: "auto", Layout::Subfolder;
    auto_file_server: "auto", Layout::FileServer;
}

/// With keys but `requireSignature` off, an unsigned tarball installs as before, and a
/// signature that is present must still verify.
#[test]
fn signature_optional_but_checked_when_present() {
    if !test_support::minisign::available() {
        return;
    }
    let keys = Keys::generate();
    let mut meta = Meta::prepare(free_port(), json!([]));
    write_meta_config(&meta);
    meta.spawn();
    let trusted = json!([keys.a.key_line()]);
    let u = Updater::start(&meta.addr.to_string(), "web-01", |c| {
        c["trustedKeys"] = trusted;
    });
    let dir = meta.tarball_dir();
    let publish = |version: &str, key: Option<&KeyPair>| {
        let tb = agent_tarball(AGENT, version, Behaviour::Good);
        test_support::tarball::publish(&dir, AGENT, version, &tb);
        if let Some(k) = key {
            k.sign(&dir.join(proto::legacy::tarball_file(AGENT, version)));
        }
    };
    let desire = |meta: &mut Meta, version: &str| {
        meta.agents = json!([{"default": {"name": AGENT, "version": version,
            "tarball": meta.base(), "md5": "", "cmd": "start"}}]);
        write_meta_config(meta);
        assert_eq!(http_get(meta.addr, "/config/reload").unwrap().0, 200);
    };
    publish("1.0.0", None);
    desire(&mut meta, "1.0.0");
    u.wait_running(AGENT, "1.0.0");
    assert!(u
        .log_text()
        .contains("no signature published; installing unverified"));
    publish("1.1.0", Some(&keys.stranger));
    desire(&mut meta, "1.1.0");
    wait_for("the unknown key refused", CONVERGE, || {
        u.log_text()
            .contains("refusing falcon-agent-1.1.0.tar.gz: signed by key")
    });
    assert!(!u.work().join(AGENT).join("1.1.0").exists());
    u.wait_running(AGENT, "1.0.0");
}

/// Without `trustedKeys` nothing changes: no `.minisig` is even asked for.
#[test]
fn no_keys_fetch_no_signature() {
    let mut meta = Meta::prepare(free_port(), json!([]));
    write_meta_config(&meta);
    meta.spawn();
    let files = FileServer::start();
    let dir = files.dir.path().join("falcon");
    let tb = agent_tarball(AGENT, "1.0.0", Behaviour::Good);
    test_support::tarball::publish(&dir, AGENT, "1.0.0", &tb);
    meta.agents = json!([{"default": {"name": AGENT, "version": "1.0.0",
        "tarball": files.url("falcon"), "md5": "", "cmd": "start"}}]);
    write_meta_config(&meta);
    assert_eq!(http_get(meta.addr, "/config/reload").unwrap().0, 200);
    let u = Updater::start(&meta.addr.to_string(), "web-01", |_| {});
    u.wait_running(AGENT, "1.0.0");
    let log = u.log_text();
    assert!(
        !log.contains(".minisig"),
        "a signature was fetched:\n{}",
        tail(&log)
    );
}

/// ops-updater's own tarball goes through the same check: unsigned, it is refused and the
/// running version stays.
#[test]
fn unsigned_self_upgrade_is_refused() {
    if !test_support::minisign::available() {
        return;
    }
    let keys = Keys::generate();
    let mut meta = Meta::prepare(free_port(), json!([]));
    write_meta_config(&meta);
    meta.spawn();
    // Never downloaded: the missing signature is found first.
    let tb = agent_tarball("ops-updater", "9.0.0", Behaviour::Good);
    test_support::tarball::publish(&meta.tarball_dir(), "ops-updater", "9.0.0", &tb);
    let trusted = json!([keys.a.pub_text()]);
    let u = Updater::start(&meta.addr.to_string(), "web-01", |c| {
        c["trustedKeys"] = trusted;
        c["requireSignature"] = json!(true);
    });
    meta.agents = json!([{"default": {"name": "ops-updater", "version": "9.0.0",
        "tarball": meta.base(), "md5": "", "cmd": "start"}}]);
    write_meta_config(&meta);
    assert_eq!(http_get(meta.addr, "/config/reload").unwrap().0, 200);
    wait_for("the self-upgrade refused", CONVERGE, || {
        u.log_text()
            .contains("refusing ops-updater-9.0.0.tar.gz: no signature at")
    });
    let (code, v) = http_get(u.http, "/version").unwrap();
    assert_eq!((code, v.trim()), (200, env!("CARGO_PKG_VERSION")));
}

/// `-T` names a malformed key by its index, and `requireSignature` without keys.
#[test]
fn config_check_names_bad_keys() {
    let u = Updater::prepare("127.0.0.1:1", "web-01", |c| {
        c["trustedKeys"] = json!([
            "RWRVR0B9j4MniJ4jY+REpdsANRryXRuxSwNgD9KWLeBJYwfMcWlS3JaZ",
            "nope"
        ]);
        c["requireSignature"] = json!(true);
    });
    let out = test_support::command(std::path::Path::new(env!("CARGO_BIN_EXE_ops-updater")))
        .arg("-T")
        .arg("-c")
        .arg(u.dir.path().join("cfg.json"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(78), "{text}");
    assert!(
        text.contains("trustedKeys[1]: is not a minisign public key"),
        "{text}"
    );
    let u = Updater::prepare("127.0.0.1:1", "web-01", |c| {
        c["requireSignature"] = json!(true);
    });
    let out = test_support::command(std::path::Path::new(env!("CARGO_BIN_EXE_ops-updater")))
        .arg("-T")
        .arg("-c")
        .arg(u.dir.path().join("cfg.json"))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(78), "{text}");
    assert!(
        text.contains("requireSignature: is true but trustedKeys is empty"),
        "{text}"
    );
}
