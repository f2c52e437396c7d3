//! End to end over HTTPS: a real `ops-meta` behind a TLS front with a self-signed
//! certificate made at test time. With `tlsInsecure` the updater talks to it (the fork that
//! moved the heartbeat to HTTPS ran exactly such a certificate); without it, the updater
//! refuses the certificate, says why, and does nothing the server did not say.
//!
//! And ops-meta's own `tls` listener, with a CA and certificates made at test time: the
//! updater in every protocol mode trusting that CA (`tlsCaFile`) talks to it and downloads
//! from it; given another CA, or none (the system's roots), it refuses the server.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use serde_json::json;
use test_support::agent::Behaviour;
use test_support::certs::Ca;
use test_support::{free_port, wait_for, wait_listening};
use tokio_rustls::rustls;

/// A TLS front: every connection's TLS is terminated here and its bytes are relayed to
/// `backend` over plain TCP. Counts completed handshakes.
struct TlsFront {
    addr: SocketAddr,
    handshakes: Arc<AtomicUsize>,
    // Dropping the runtime stops the front.
    _rt: tokio::runtime::Runtime,
}

impl TlsFront {
    fn start(backend: SocketAddr) -> TlsFront {
        let rcgen::CertifiedKey { cert, key_pair } =
            rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key_pair.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let handshakes = Arc::new(AtomicUsize::new(0));
        let count = handshakes.clone();
        rt.spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, count) = (acceptor.clone(), count.clone());
                tokio::spawn(async move {
                    // A client that refuses our certificate fails the handshake: not counted.
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    count.fetch_add(1, Ordering::SeqCst);
                    let Ok(mut plain) = tokio::net::TcpStream::connect(backend).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        TlsFront {
            addr,
            handshakes,
            _rt: rt,
        }
    }

    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }
}

fn meta_with_falcon() -> Meta {
    let mut meta = Meta::start(json!([]));
    publish(&meta, "falcon", "1.0.0", Behaviour::Good);
    meta.desire(&[("falcon", "1.0.0", "start")]);
    meta
}

#[test]
fn heartbeat_and_download_over_https_with_tls_insecure_install_and_report() {
    let mut meta = meta_with_falcon();
    let front = TlsFront::start(meta.addr);
    // The tarball comes through the same front, with the same self-signed certificate.
    meta.set_agents(json!([agent_entry(
        "falcon",
        "1.0.0",
        &front.url(),
        "start"
    )]));
    let u = Updater::start(&front.url(), "tls-host-01", |c| {
        c["tlsInsecure"] = json!(true)
    });

    u.wait_running("falcon", "1.0.0");
    wait_for("meta to hear falcon 1.0.0 over https", CONVERGE, || {
        meta.reported("falcon", "tls-host-01")
            .is_some_and(|r| r["version"] == "1.0.0" && r["status"] == "started")
    });
    // At least the heartbeat's connection and the download's (tarball and its .md5).
    assert!(front.handshakes.load(Ordering::SeqCst) >= 2);
    assert!(u.work().join("falcon/1.0.0/falcon-1.0.0.tar.gz").is_file());
    let d = u.daemon_status();
    assert_eq!(d["server"], format!("{}/heartbeat", front.url()));
    assert_eq!(d["lastHeartbeatError"], serde_json::Value::Null);
}

#[test]
fn a_self_signed_certificate_is_refused_without_tls_insecure() {
    let meta = meta_with_falcon();
    let front = TlsFront::start(meta.addr);
    let mut u = Updater::start(&front.url(), "tls-host-02", |_| {});

    wait_for("a failed heartbeat", CONVERGE, || {
        u.daemon_status()["heartbeatsFailed"].as_u64().unwrap_or(0) >= 2
    });
    let d = u.daemon_status();
    assert_eq!(d["heartbeatsOk"], 0, "{d}");
    let err = d["lastHeartbeatError"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(err.contains("https://"), "error names the server: {err}");
    // The certificate, not the network, is the reason: the handshake never completed, and
    // the whole error chain (in the log) says so.
    assert_eq!(front.handshakes.load(Ordering::SeqCst), 0);
    let log = u.log_text().to_ascii_lowercase();
    assert!(err.to_ascii_lowercase().contains("certificate"), "{err}");
    assert!(log.contains("certificate"), "{log}");
    assert!(
        !log.contains("\u{1b}["),
        "no terminal colours in a log file"
    );
    // Nothing was installed and the server heard nothing from this host.
    assert!(!u.work().join("falcon").join("1.0.0").exists());
    assert!(meta.reported("falcon", "tls-host-02").is_none());
    u.assert_alive();
}

/// ops-meta with its `tls` listener (a certificate of `ca` for 127.0.0.1 and localhost)
/// beside the plain one; `agents` served from its own `https://` address.
struct TlsMeta {
    meta: Meta,
    tls: SocketAddr,
}

impl TlsMeta {
    fn start(ca: &Ca) -> TlsMeta {
        let meta = Meta::prepare(free_port(), json!([]));
        ca.localhost().write(meta.dir.path(), "server");
        let mut m = TlsMeta {
            meta,
            tls: SocketAddr::from(([127, 0, 0, 1], free_port())),
        };
        m.write_config();
        m.meta.spawn();
        wait_listening(m.tls, CONVERGE);
        publish(&m.meta, "falcon", "1.0.0", Behaviour::Good);
        m.set_agents(json!([agent_entry("falcon", "1.0.0", &m.base(), "start")]));
        m
    }

    /// `https://127.0.0.1:PORT`.
    fn base(&self) -> String {
        format!("https://{}", self.tls)
    }

    fn write_config(&self) {
        let dir = self.meta.dir.path();
        let cfg = json!({
            "tarballDir": self.meta.tarball_dir(),
            "store": "memory",
            "http": {"enabled": true, "listen": self.meta.addr.to_string()},
            "tls": {"listen": self.tls.to_string(), "certFile": dir.join("server.crt"),
                "keyFile": dir.join("server.key")},
            "remoteHashMaxBytes": 0,
            "agents": self.meta.agents,
        });
        test_support::write_file(dir, "cfg.json", serde_json::to_vec_pretty(&cfg).unwrap());
    }

    fn set_agents(&mut self, agents: serde_json::Value) {
        self.meta.agents = agents;
        self.write_config();
        let (code, body) = http_get(self.meta.addr, "/config/reload").expect("reload answered");
        assert_eq!(code, 200, "reload failed: {body}");
    }

    /// True once `host` reported falcon 1.0.0 running, by either protocol.
    fn heard_falcon_from(&self, host: &str) -> bool {
        let legacy = self
            .meta
            .reported("falcon", host)
            .is_some_and(|r| r["version"] == "1.0.0" && r["status"] == "started");
        let boot = get_json(self.meta.addr, &format!("/api/hosts/{host}")).is_some_and(|v| {
            v["agents"].as_array().is_some_and(|a| {
                a.iter()
                    .any(|a| a["name"] == "falcon" && a["status"] == "running")
            })
        });
        legacy || boot
    }
}

/// The test config's protocol set to `mode` (`auto` by leaving the key out) and
/// `tlsCaFile` to `ca_file`, when given.
fn tls_tweak(
    mode: &'static str,
    ca_file: Option<std::path::PathBuf>,
) -> impl FnOnce(&mut serde_json::Value) {
    move |c| {
        if mode == "auto" {
            c.as_object_mut().unwrap().remove("protocol");
        } else {
            c["protocol"] = json!(mode);
        }
        if let Some(f) = ca_file {
            c["tlsCaFile"] = json!(f);
        }
    }
}

#[test]
fn the_fleet_talks_to_ops_meta_over_tls_in_every_protocol_mode() {
    let ca = Ca::new("fleet CA");
    let meta = TlsMeta::start(&ca);
    let ca_dir = test_support::tempdir().unwrap();
    let ca_file = ca.write(ca_dir.path(), "ca.pem");
    // By IP address and by name: the certificate names both.
    let servers = [
        ("legacy", meta.base()),
        (
            "bootagent",
            format!("https://localhost:{}", meta.tls.port()),
        ),
        ("auto", meta.base()),
    ];
    let hosts: Vec<Updater> = servers
        .iter()
        .map(|(mode, server)| {
            Updater::start(
                server,
                &format!("tls-{mode}-01"),
                tls_tweak(mode, Some(ca_file.clone())),
            )
        })
        .collect();
    for (u, (mode, _)) in hosts.iter().zip(&servers) {
        u.wait_running("falcon", "1.0.0");
        wait_for(
            &format!("meta to hear falcon from the {mode} host"),
            CONVERGE,
            || meta.heard_falcon_from(&u.hostname),
        );
        assert!(u.work().join("falcon/1.0.0/falcon-1.0.0.tar.gz").is_file());
        let log = u.log_text();
        assert!(!log.contains("tlsInsecure is true"), "{mode}: {log}");
        assert!(!log.contains("UnknownIssuer"), "{mode}: {log}");
    }
    // The legacy host's heartbeat went to the https:// URL.
    let d = hosts[0].daemon_status();
    assert_eq!(d["server"], format!("{}/heartbeat", meta.base()));
    assert_eq!(d["lastHeartbeatError"], serde_json::Value::Null);
}

/// Seed 001's layout over TLS: the tarball in a subfolder of `tarballDir`, named by an
/// `https://` URL of ops-meta's own tls listener, which ops-meta maps to `tarballDir` to
/// know its digest (BootAgent jobs need it), in every protocol mode.
#[test]
fn a_subfolder_of_tarball_dir_over_https_installs_in_every_protocol_mode() {
    let ca = Ca::new("fleet CA");
    let mut meta = TlsMeta::start(&ca);
    let ca_dir = test_support::tempdir().unwrap();
    let ca_file = ca.write(ca_dir.path(), "ca.pem");
    let tb = test_support::agent::agent_tarball("falcon", "1.1.0", Behaviour::Good);
    test_support::tarball::publish(
        &meta.meta.tarball_dir().join("falcon"),
        "falcon",
        "1.1.0",
        &tb,
    );
    let base = format!("{}/falcon", meta.base());
    meta.set_agents(json!([agent_entry("falcon", "1.1.0", &base, "start")]));
    let hosts: Vec<Updater> = ["legacy", "bootagent", "auto"]
        .iter()
        .map(|mode| {
            Updater::start(
                &meta.base(),
                &format!("sub-{mode}-01"),
                tls_tweak(mode, Some(ca_file.clone())),
            )
        })
        .collect();
    for u in &hosts {
        u.wait_running("falcon", "1.1.0");
        assert!(u.work().join("falcon/1.1.0/falcon-1.1.0.tar.gz").is_file());
    }
}

/// An updater in `mode` that must refuse the server: the round fails naming the
/// certificate, nothing is installed, the server hears nothing.
fn refuses(mode: &'static str, ca_file: Option<std::path::PathBuf>, host: &str) {
    let ca = Ca::new("fleet CA");
    let meta = TlsMeta::start(&ca);
    let mut u = Updater::start(&meta.base(), host, tls_tweak(mode, ca_file));
    wait_for("two failed rounds", CONVERGE, || {
        let log = u.log_text();
        log.matches("invalid peer certificate").count() >= 2
    });
    let log = u.log_text();
    assert!(
        log.contains("UnknownIssuer"),
        "{mode}: the reason is in the log:\n{log}"
    );
    assert!(
        !u.work().join("falcon").exists(),
        "{mode}: nothing installed"
    );
    assert!(!meta.heard_falcon_from(host), "{mode}");
    assert!(meta.meta.reported("falcon", host).is_none(), "{mode}");
    assert!(
        get_json(meta.meta.addr, &format!("/api/hosts/{host}")).is_none(),
        "{mode}"
    );
    u.assert_alive();
}

#[test]
fn an_updater_given_another_ca_refuses_the_server_in_every_protocol_mode() {
    let other = Ca::new("another CA");
    let dir = test_support::tempdir().unwrap();
    let file = other.write(dir.path(), "other.pem");
    for mode in ["legacy", "bootagent", "auto"] {
        refuses(mode, Some(file.clone()), &format!("wrong-ca-{mode}"));
    }
}

#[test]
fn without_tls_ca_file_a_private_ca_is_refused_by_the_system_roots() {
    refuses("auto", None, "no-ca-file");
}

#[test]
fn tls_insecure_warns_in_every_round() {
    let ca = Ca::new("fleet CA");
    let meta = TlsMeta::start(&ca);
    let u = Updater::start(&meta.base(), "insecure-01", |c| {
        c["tlsInsecure"] = json!(true);
    });
    u.wait_running("falcon", "1.0.0");
    wait_for("three rounds' warnings", CONVERGE, || {
        u.log_text().matches("tlsInsecure is true").count() >= 3
    });
}

#[test]
fn a_missing_or_garbage_tls_ca_file_is_a_config_error_naming_the_file() {
    let dir = test_support::tempdir().unwrap();
    let garbage = test_support::write_file(dir.path(), "garbage.pem", "hello\n");
    let bad_der = test_support::write_file(
        dir.path(),
        "bad.pem",
        "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n",
    );
    let missing = dir.path().join("missing.pem");
    for (file, want) in [
        (
            &missing,
            format!("tlsCaFile: cannot read {}: No such file", missing.display()),
        ),
        (
            &garbage,
            format!("tlsCaFile: {}: no PEM certificate", garbage.display()),
        ),
        (
            &bad_der,
            format!(
                "tlsCaFile: {}: certificate 1 of 1 is unusable",
                bad_der.display()
            ),
        ),
    ] {
        let cfg = test_support::write_file(
            dir.path(),
            "cfg.json",
            json!({"server": "https://127.0.0.1:1", "tlsCaFile": file}).to_string(),
        );
        let out = test_support::command(std::path::Path::new(env!("CARGO_BIN_EXE_ops-updater")))
            .arg("-T")
            .arg("-c")
            .arg(&cfg)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(78), "{text}");
        assert!(text.contains(&want), "{want:?} in {text}");
        // The daemon refuses to start on it too.
        let out = test_support::command(std::path::Path::new(env!("CARGO_BIN_EXE_ops-updater")))
            .arg("-c")
            .arg(&cfg)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(78));
    }
}

#[test]
fn a_server_certificate_that_stops_verifying_leaves_the_running_agents_alone() {
    let ca = Ca::new("fleet CA");
    let mut meta = TlsMeta::start(&ca);
    let ca_dir = test_support::tempdir().unwrap();
    let ca_file = ca.write(ca_dir.path(), "ca.pem");
    let mut hosts: Vec<Updater> = ["legacy", "bootagent", "auto"]
        .into_iter()
        .map(|mode| {
            Updater::start(
                &meta.base(),
                &format!("swap-{mode}-01"),
                |c: &mut serde_json::Value| {
                    tls_tweak(mode, Some(ca_file.clone()))(c);
                    // Retry failed rounds at once (the test default waits a minute).
                    c["retryBaseSecs"] = json!(1);
                    c["retryMaxSecs"] = json!(1);
                },
            )
        })
        .collect();
    for u in &hosts {
        u.wait_running("falcon", "1.0.0");
    }
    // ops-meta comes back with a certificate of a CA the hosts do not trust, and wants
    // 1.1.0. (A restart: connections opened before a reload keep the certificate they
    // were made with, and the hosts' clients keep theirs open between rounds.)
    Ca::new("impostor CA")
        .localhost()
        .write(meta.meta.dir.path(), "server");
    publish(&meta.meta, "falcon", "1.1.0", Behaviour::Good);
    meta.meta.agents = json!([agent_entry("falcon", "1.1.0", &meta.base(), "start")]);
    meta.write_config();
    meta.meta.child = None;
    meta.meta.spawn();
    wait_listening(meta.tls, CONVERGE);
    for u in &mut hosts {
        wait_for(
            &format!("{} to refuse the server twice", u.hostname),
            CONVERGE,
            || u.log_text().matches("invalid peer certificate").count() >= 2,
        );
        assert_eq!(u.version_of("falcon").as_deref(), Some("1.0.0"));
        assert_eq!(status_of(&u.work().join("falcon/1.0.0")), "started");
        assert!(!u.work().join("falcon/1.1.0").exists(), "{}", u.hostname);
        u.assert_alive();
    }
}
