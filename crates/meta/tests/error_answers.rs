//! Answers of the real `ops-meta` binary to requests a careless or hostile client makes:
//! every error status with a plain-text body (those hyper makes itself included), ranges
//! and conditional requests by RFC 9110, and legacy heartbeats with a key given twice.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, SystemTime};

use test_support::{wait_listening, KillOnDrop, TempDir};

const BIN: &str = env!("CARGO_BIN_EXE_ops-meta");
const WAIT: Duration = Duration::from_secs(20);

struct Meta {
    _child: KillOnDrop,
    addr: SocketAddr,
    dir: TempDir,
}

impl Meta {
    fn start() -> Meta {
        let dir = test_support::tempdir().unwrap();
        let tarballs = dir.path().join("tarball");
        std::fs::create_dir_all(&tarballs).unwrap();
        let port = test_support::free_port();
        let cfg = format!(
            r#"{{"tarballDir": {t:?}, "http": {{"enabled": true, "listen": "127.0.0.1:{port}"}},
            "agents": [{{"default": {{"name": "falcon-agent", "version": "1.0.0",
                "tarball": "http://127.0.0.1:{port}/", "md5": "", "cmd": "start"}}}}]}}"#,
            t = tarballs.display().to_string()
        );
        let path = test_support::write_file(dir.path(), "cfg.json", cfg);
        let log = std::fs::File::create(dir.path().join("meta.log")).unwrap();
        let child = test_support::command(Path::new(BIN))
            .arg("-c")
            .arg(&path)
            // The default store (`sqlite:ops-meta.db`) goes to the test's folder.
            .current_dir(dir.path())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        wait_listening(addr, WAIT);
        Meta {
            _child: KillOnDrop(child),
            addr,
            dir,
        }
    }

    /// Sends `request` as it is and reads until the server closes the connection.
    fn raw(&self, request: &[u8]) -> String {
        let mut c = TcpStream::connect(self.addr).unwrap();
        c.set_read_timeout(Some(WAIT)).unwrap();
        // The server may answer and close before it has read all of a huge request.
        let _ = c.write_all(request);
        let mut all = Vec::new();
        let _ = c.read_to_end(&mut all);
        String::from_utf8_lossy(&all).into_owned()
    }
}

/// One answer: status, lowercased head, body.
fn split(answer: &str) -> (u16, String, String) {
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no head in {answer:?}"));
    (
        head[9..12].parse().unwrap(),
        head.to_ascii_lowercase(),
        body.to_string(),
    )
}

fn check_text(answer: &str, status: u16, body: &str) {
    let (got, head, got_body) = split(answer);
    assert_eq!(got, status, "{answer}");
    assert!(
        head.contains("content-type: text/plain; charset=utf-8"),
        "{head}"
    );
    assert!(
        head.contains(&format!("content-length: {}", body.len())),
        "{head}"
    );
    assert_eq!(got_body, body, "{head}");
}

/// The 431/400 answers hyper makes itself for a request it cannot parse, and the
/// router's 405, had empty bodies although every error is documented with a text body.
#[test]
fn error_answers_made_by_hyper_and_the_router_had_empty_bodies() {
    let m = Meta::start();
    let too_large = "request header fields are too large: at most 100 fields and 65536 bytes\n";
    // Too many header fields.
    let mut req = String::from("GET /health HTTP/1.1\r\nHost: x\r\n");
    for i in 0..150 {
        req.push_str(&format!("x-h{i}: v\r\n"));
    }
    req.push_str("\r\n");
    check_text(&m.raw(req.as_bytes()), 431, too_large);
    // A head larger than the buffer: one huge field, then a URI longer than it.
    let req = format!(
        "GET /health HTTP/1.1\r\nHost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(100_000)
    );
    check_text(&m.raw(req.as_bytes()), 431, too_large);
    let req = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70_000));
    check_text(&m.raw(req.as_bytes()), 431, too_large);
    // Not HTTP.
    check_text(
        &m.raw(b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n"),
        400,
        "malformed HTTP request\n",
    );
    check_text(
        &m.raw(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"),
        400,
        "malformed HTTP request\n",
    );
    // After an answer on the same connection: that one intact, then the text.
    let a = m.raw(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nbad\r\n\r\n");
    let (first, rest) = a.split_at(a.find("ok").expect("the first answer") + 2);
    assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{a}");
    check_text(rest, 400, "malformed HTTP request\n");
    // The router's 405 for a known path and another method, with its Allow.
    for req in [
        "PUT /heartbeat HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        "GET /heartbeat HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "POST /status/json/a HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
    ] {
        let a = m.raw(req.as_bytes());
        check_text(&a, 405, "method not allowed\n");
        assert!(split(&a).1.contains("\r\nallow: "), "{a}");
    }
    // HEAD still has no body.
    let a = m.raw(b"HEAD /heartbeat HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let (status, _, body) = split(&a);
    assert_eq!((status, body.as_str()), (405, ""), "{a}");
}

/// `Range: bytes=0-<a number past u64>` got 200 and the whole file instead of 206.
#[test]
fn a_range_end_past_u64_got_the_whole_file() {
    let m = Meta::start();
    let data = test_support::noise(1000, 7);
    test_support::write_file(&m.dir.path().join("tarball"), "a-1.tar.gz", &data);
    let huge = "9".repeat(30);
    let a = m.raw(
        format!("GET /a-1.tar.gz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nRange: bytes=990-{huge}\r\n\r\n")
            .as_bytes(),
    );
    let (status, head, _) = split(&a);
    assert_eq!(status, 206, "{head}");
    assert!(head.contains("content-range: bytes 990-999/1000"), "{head}");
    assert!(head.contains("content-length: 10"), "{head}");
    // A first byte past u64 is past the end: 416, with a text body.
    let a = m.raw(
        format!("GET /a-1.tar.gz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nRange: bytes={huge}-\r\n\r\n")
            .as_bytes(),
    );
    check_text(&a, 416, "range not satisfiable\n");
}

/// An `If-Modified-Since` later than the server's clock got 304, which RFC 9110 says to
/// ignore: a client whose clock runs ahead never got the file.
#[test]
fn if_modified_since_in_the_future_got_304() {
    let m = Meta::start();
    test_support::write_file(&m.dir.path().join("tarball"), "a-1.tar.gz", b"tarball");
    let get = |since: SystemTime| {
        let a = m.raw(
            format!(
                "GET /a-1.tar.gz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nIf-Modified-Since: {}\r\n\r\n",
                httpdate::fmt_http_date(since)
            )
            .as_bytes(),
        );
        split(&a)
    };
    let day = Duration::from_secs(86_400);
    let (status, _, body) = get(SystemTime::now() + day);
    assert_eq!((status, body.as_str()), (200, "tarball"));
    // Now, after the file was written: still 304.
    let (status, _, _) = get(SystemTime::now());
    assert_eq!(status, 304);
}

/// A legacy heartbeat with a key given twice got 400 `body format error`; the Go
/// original took the last value.
#[test]
fn a_heartbeat_with_a_key_given_twice_got_400() {
    let m = Meta::start();
    let body = r#"{"hostname":"first","realAgents":[],"hostname":"web-1","realAgents":[{"name":"falcon-agent","version":"0.9","status":"started","status":"stoped","timestamp":5}]}"#;
    let a = m.raw(
        format!(
            "POST /heartbeat HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    let (status, _, answer) = split(&a);
    assert_eq!(status, 200, "{a}");
    assert!(answer.contains(r#""version":"1.0.0""#), "{answer}");
    let a =
        m.raw(b"GET /status/text/falcon-agent HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let (_, _, page) = split(&a);
    assert!(page.starts_with("web-1 0.9 stoped 5 "), "{page}");
    assert!(!page.contains("first"), "{page}");
}
