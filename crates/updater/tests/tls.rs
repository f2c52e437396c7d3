//! End to end over HTTPS: a real `ops-meta` behind a TLS front with a self-signed
//! certificate made at test time. With `tlsInsecure` the updater talks to it (the fork that
//! moved the heartbeat to HTTPS ran exactly such a certificate); without it, the updater
//! refuses the certificate, says why, and does nothing the server did not say.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use serde_json::json;
use test_support::agent::Behaviour;
use test_support::wait_for;
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
