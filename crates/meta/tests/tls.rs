//! The `tls` listener of the real `ops-meta` binary, with certificates made at test time:
//! both listeners at once, the certificate swapped by SIGHUP and `GET /config/reload`
//! without dropping open connections, a bad new pair refused, a client that never
//! handshakes dropped, and config errors that name the file.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use test_support::certs::{Ca, Pair};
use test_support::{wait_for, wait_listening, KillOnDrop, TempDir};

const BIN: &str = env!("CARGO_BIN_EXE_ops-meta");
const WAIT: Duration = Duration::from_secs(60);

struct Meta {
    child: KillOnDrop,
    plain: SocketAddr,
    tls: SocketAddr,
    dir: TempDir,
}

fn config(plain: u16, tls: u16, extra: &str) -> String {
    format!(
        r#"{{"tarballDir": "", "store": "memory", {extra}
        "http": {{"enabled": true, "listen": "127.0.0.1:{plain}"}},
        "tls": {{"listen": "127.0.0.1:{tls}", "certFile": "server.crt", "keyFile": "server.key"}},
        "agents": []}}"#
    )
}

impl Meta {
    /// ops-meta serving plain HTTP and TLS with `pair` (in `server.crt`, `server.key`).
    fn start(pair: &Pair, extra: &str) -> Meta {
        let dir = test_support::tempdir().unwrap();
        pair.write(dir.path(), "server");
        let (p, t) = (test_support::free_port(), test_support::free_port());
        let path = test_support::write_file(dir.path(), "cfg.json", config(p, t, extra));
        let log = std::fs::File::create(dir.path().join("meta.log")).unwrap();
        let child = test_support::command(Path::new(BIN))
            .arg("-c")
            .arg(&path)
            .current_dir(dir.path())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let plain: SocketAddr = format!("127.0.0.1:{p}").parse().unwrap();
        let tls: SocketAddr = format!("127.0.0.1:{t}").parse().unwrap();
        wait_listening(plain, WAIT);
        wait_listening(tls, WAIT);
        Meta {
            child: KillOnDrop(child),
            plain,
            tls,
            dir,
        }
    }

    fn sighup(&self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("meta.log")).unwrap_or_default()
    }
}

fn trusting(ca: &Ca) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.pem().as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS connection to `addr` as `localhost`, handshake done.
fn connect(addr: SocketAddr, cfg: &Arc<rustls::ClientConfig>) -> Result<Tls, std::io::Error> {
    let mut tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let name = ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(cfg.clone(), name).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)?;
    }
    Ok(rustls::StreamOwned::new(conn, tcp))
}

/// The certificate the server showed.
fn server_cert(s: &Tls) -> Vec<u8> {
    s.conn.peer_certificates().unwrap()[0].as_ref().to_vec()
}

fn der(pair: &Pair) -> Vec<u8> {
    CertificateDer::from_pem_slice(pair.cert.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec()
}

/// One keep-alive `GET` on `s`: status and body.
fn get<S: Read + Write>(s: &mut S, path: &str) -> (u16, String) {
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    s.flush().unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .expect("a content-length");
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    (status, String::from_utf8(body).unwrap())
}

fn plain_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    get(&mut s, path)
}

#[test]
fn both_listeners_serve_and_a_reload_swaps_the_certificate_without_dropping_connections() {
    let ca = Ca::new("test CA");
    let (first, second) = (ca.localhost(), ca.localhost());
    let meta = Meta::start(&first, "");
    let trust = trusting(&ca);

    assert_eq!(plain_get(meta.plain, "/version").0, 200);
    let mut open = connect(meta.tls, &trust).unwrap();
    assert_eq!(server_cert(&open), der(&first));
    let (code, version) = get(&mut open, "/version");
    assert_eq!(code, 200);
    assert_eq!(version, plain_get(meta.plain, "/version").1);

    // SIGHUP with a new pair in the same files: new connections get it...
    second.write(meta.dir.path(), "server");
    meta.sighup();
    wait_for("a new connection to get the new certificate", WAIT, || {
        server_cert(&connect(meta.tls, &trust).unwrap()) == der(&second)
    });
    // ...and the connection opened before is still served, on its own certificate.
    assert_eq!(get(&mut open, "/version"), (200, version.clone()));
    assert_eq!(server_cert(&open), der(&first));
    let mut fresh = connect(meta.tls, &trust).unwrap();
    assert_eq!(get(&mut fresh, "/health").0, 200);

    // A certificate with another certificate's key: refused, the pair in use stays.
    let third = ca.localhost();
    Pair {
        cert: third.cert.clone(),
        key: second.key.clone(),
    }
    .write(meta.dir.path(), "server");
    let (code, body) = plain_get(meta.plain, "/config/reload");
    assert_ne!(code, 200, "{body}");
    assert!(body.contains("tls.keyFile"), "{body}");
    assert!(
        body.contains("server.key is not the private key of the certificate in server.crt"),
        "{body}"
    );
    meta.sighup();
    wait_for("the refused SIGHUP reload in the log", WAIT, || {
        meta.log().matches("config reload refused").count() >= 2
    });
    assert_eq!(
        server_cert(&connect(meta.tls, &trust).unwrap()),
        der(&second)
    );
    // Garbage in the certificate file: refused the same way.
    std::fs::write(meta.dir.path().join("server.crt"), "not a certificate\n").unwrap();
    let (code, body) = plain_get(meta.plain, "/config/reload");
    assert_ne!(code, 200, "{body}");
    assert!(body.contains("tls.certFile"), "{body}");
    assert_eq!(
        server_cert(&connect(meta.tls, &trust).unwrap()),
        der(&second)
    );
    assert_eq!(get(&mut fresh, "/version"), (200, version.clone()));
    assert_eq!(get(&mut open, "/version"), (200, version));

    // Fixed files, reloaded by `GET /config/reload` this time: the third pair serves.
    third.write(meta.dir.path(), "server");
    let (code, body) = plain_get(meta.plain, "/config/reload");
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        server_cert(&connect(meta.tls, &trust).unwrap()),
        der(&third)
    );
    // The reload is answered over TLS too (a loopback peer, like the plain listener's).
    let (code, body) = get(&mut connect(meta.tls, &trust).unwrap(), "/config/reload");
    assert_eq!(code, 200, "{body}");
}

#[test]
fn a_client_of_another_ca_fails_the_handshake_and_the_server_goes_on() {
    let ca = Ca::new("test CA");
    let meta = Meta::start(&ca.localhost(), "");
    let Err(err) = connect(meta.tls, &trusting(&Ca::new("another CA"))) else {
        panic!("a certificate of another CA was accepted");
    };
    assert!(
        err.to_string().to_ascii_lowercase().contains("certificate"),
        "{err}"
    );
    let mut ok = connect(meta.tls, &trusting(&ca)).unwrap();
    assert_eq!(get(&mut ok, "/health").0, 200);
}

#[test]
fn a_client_that_never_handshakes_is_dropped_after_the_header_timeout() {
    let ca = Ca::new("test CA");
    let meta = Meta::start(&ca.localhost(), r#""headerReadTimeoutSecs": 1,"#);
    let started = Instant::now();
    let mut idle = TcpStream::connect(meta.tls).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buf = [0u8; 64];
    // The server closes: end of file (or a reset), never our own read timeout.
    match idle.read(&mut buf) {
        Ok(n) => assert_eq!(n, 0, "the server sent {n} bytes to a silent client"),
        Err(e) => assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "still open after {:?}",
            started.elapsed()
        ),
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900), "closed after {took:?}");
    assert!(took < Duration::from_secs(10), "closed after {took:?}");
    // Others are served meanwhile and after.
    assert_eq!(
        get(&mut connect(meta.tls, &trusting(&ca)).unwrap(), "/health").0,
        200
    );
}

/// `ops-meta -T` on a config with a `tls` section made by `edit`: its output and success.
fn check(pair: Option<&Pair>, tls: &str) -> (bool, String) {
    let dir = test_support::tempdir().unwrap();
    if let Some(p) = pair {
        p.write(dir.path(), "server");
    }
    let text = format!(
        r#"{{"tarballDir": "", "store": "memory", "http": {{"enabled": true, "listen": "127.0.0.1:1"}},
        "tls": {tls}, "agents": []}}"#
    );
    let path: PathBuf = test_support::write_file(dir.path(), "cfg.json", text);
    let out = test_support::command(Path::new(BIN))
        .arg("-T")
        .arg("-c")
        .arg(&path)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn config_errors_name_the_field_and_the_file() {
    let ca = Ca::new("test CA");
    let pair = ca.localhost();
    let files = r#""certFile": "server.crt", "keyFile": "server.key""#;
    let (ok, out) = check(
        Some(&pair),
        &format!(r#"{{"listen": "127.0.0.1:2", {files}}}"#),
    );
    assert!(ok, "{out}");

    let (ok, out) = check(None, &format!(r#"{{"listen": "127.0.0.1:2", {files}}}"#));
    assert!(!ok);
    assert!(
        out.contains("error: tls.certFile: read server.crt: No such file"),
        "{out}"
    );

    let dir = test_support::tempdir().unwrap();
    let garbage = test_support::write_file(dir.path(), "garbage.pem", "hello\n");
    let (ok, out) = check(
        Some(&pair),
        &format!(
            r#"{{"listen": "127.0.0.1:2", "certFile": "server.crt", "keyFile": {:?}}}"#,
            garbage
        ),
    );
    assert!(!ok);
    assert!(
        out.contains(&format!(
            "error: tls.keyFile: {}: no PEM private key",
            garbage.display()
        )),
        "{out}"
    );
    let (ok, out) = check(
        Some(&pair),
        &format!(
            r#"{{"listen": "127.0.0.1:2", "certFile": {:?}, "keyFile": "server.key"}}"#,
            garbage
        ),
    );
    assert!(!ok);
    assert!(
        out.contains(&format!(
            "error: tls.certFile: {}: no PEM certificate",
            garbage.display()
        )),
        "{out}"
    );

    // Everything at once: an unknown key, a missing one, a bad address, the same port.
    let (ok, out) = check(
        Some(&pair),
        r#"{"listen": "nowhere", "certFile": "server.crt", "keyfile2": "x"}"#,
    );
    assert!(!ok);
    for want in [
        "error: tls.keyfile2: unknown key (listen, certFile, keyFile)",
        "error: tls.keyFile: is required",
        "error: tls.listen: \"nowhere\" is not IP:PORT",
    ] {
        assert!(out.contains(want), "{want:?} in {out}");
    }
    let (ok, out) = check(Some(&pair), &format!(r#"{{"listen": ":1", {files}}}"#));
    assert!(!ok);
    assert!(
        out.contains("error: tls.listen: :1 is also http.listen's address"),
        "{out}"
    );
}
