//! The heartbeat as the accept loop serves it (ahead of the router) and the streamed status
//! pages, over a real listener on 127.0.0.1: every answer must be the one `meta::app`
//! gives in-process, limits and timeouts included.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use meta::{app, AppState, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

const AGENTS: &str = r#"[
  {"default": {"name": "falcon-agent", "version": "1.0.0", "tarball": "http://127.0.0.1:2000/", "md5": "", "cmd": "start"},
   "others": [{"prefix": "lg-", "version": "1.0.1", "tarball": "", "md5": "", "cmd": ""}]},
  {"default": {"name": "logger", "version": "0.1", "tarball": "http://127.0.0.1:2000/", "md5": "", "cmd": "stop"}}
]"#;

struct Fixture {
    _dir: test_support::TempDir,
    server: Server,
    /// A second state on the same config, answered in-process through the router.
    reference: AppState,
}

async fn fixture(extra: &str) -> Fixture {
    let dir = test_support::tempdir().unwrap();
    let tarballs = dir.path().join("tarball");
    std::fs::create_dir_all(&tarballs).unwrap();
    let path = dir.path().join("cfg.json");
    let cfg = format!(
        r#"{{"tarballDir": {t:?}, "http": {{"enabled": true, "listen": "127.0.0.1:0"}}, {extra} "agents": {AGENTS}}}"#,
        t = tarballs.display().to_string()
    );
    std::fs::write(&path, cfg).unwrap();
    let server = Server::start_local(&path).await.unwrap();
    let (reference, _) = AppState::load(&path).unwrap();
    Fixture {
        _dir: dir,
        server,
        reference,
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// Status, content type and body.
type Answer = (u16, String, Vec<u8>);

async fn over_socket(f: &Fixture, method: &str, path: &str, body: &str) -> Answer {
    let addr = f.server.local_addr().unwrap();
    let r = client()
        .request(method.parse().unwrap(), format!("http://{addr}{path}"))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (r.status().as_u16(), ct, r.bytes().await.unwrap().to_vec())
}

async fn in_process(f: &Fixture, method: &str, path: &str, body: &str) -> Answer {
    let req = Request::builder()
        .method(method.parse::<Method>().unwrap())
        .uri(path)
        .body(Body::from(body.to_string()))
        .unwrap();
    let r = app(f.reference.clone()).oneshot(req).await.unwrap();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let status = r.status().as_u16();
    let body = r.into_body().collect().await.unwrap().to_bytes().to_vec();
    (status, ct, body)
}

fn hb(host: &str, status: &str) -> String {
    serde_json::json!({"hostname": host, "realAgents": [
        {"name": "falcon-agent", "version": "0.9", "status": status, "timestamp": 1_431_000_000},
        {"name": "logger", "version": "0.1", "status": "stoped", "timestamp": 1_431_000_000},
    ]})
    .to_string()
}

#[tokio::test]
async fn socket_heartbeats_answer_exactly_as_the_router_does() {
    let f = fixture(r#""maxAgentsPerHeartbeat": 2, "maxBodyBytes": 400,"#).await;
    let too_many = r#"{"hostname":"h","realAgents":[{"name":"a"},{"name":"b"},{"name":"c"}]}"#;
    let bodies = [
        hb("web-1", "started"),
        hb("lg-7", "started"),
        hb("web-1", "error \"quoted\"\tand \\u00e9"),
        hb("web-\u{e9}", "started"),
        String::new(),
        "null".into(),
        "[]".into(),
        "{".into(),
        r#"{"hostname":5}"#.into(),
        r#"{"realAgents":[]}"#.into(),
        r#"{"hostname":"../etc"}"#.into(),
        r#"{"hostname":"h","realAgents":[{"name":"a/b","version":"1"}]}"#.into(),
        too_many.into(),
        hb(&"h".repeat(400), "started"),
    ];
    for body in &bodies {
        let got = over_socket(&f, "POST", "/heartbeat", body).await;
        let want = in_process(&f, "POST", "/heartbeat", body).await;
        assert_eq!(got, want, "body {body:?}");
    }
    // Query strings reach the heartbeat too; other methods and near paths take the router.
    let body = hb("web-2", "started");
    assert_eq!(
        over_socket(&f, "POST", "/heartbeat?x=1", &body).await,
        in_process(&f, "POST", "/heartbeat?x=1", &body).await
    );
    for (method, path) in [
        ("GET", "/heartbeat"),
        ("POST", "/heartbeat/"),
        ("PUT", "/heartbeat"),
    ] {
        let got = over_socket(&f, method, path, &body).await;
        assert_eq!(
            got,
            in_process(&f, method, path, &body).await,
            "{method} {path}"
        );
        assert_ne!(got.0, 200, "{method} {path}");
    }
    // Both stores saw the same reports.
    let st = &f.server.state().store;
    for host in ["web-1", "lg-7", "web-\u{e9}", "web-2"] {
        assert_eq!(st.host(host), f.reference.store.host(host), "{host}");
    }
    assert_eq!(
        st.host("web-1").unwrap()[0].status,
        "error \"quoted\" and \\u00e9"
    );
    f.server.stop().await;
}

/// Sends raw bytes and reads the whole answer (the server closes or we stop at `limit`).
async fn raw(f: &Fixture, request: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(f.server.local_addr().unwrap())
        .await
        .unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut buf))
        .await
        .expect("the server closes the connection")
        .unwrap();
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test]
async fn socket_heartbeat_keeps_body_limits_and_the_request_timeout() {
    let f = fixture(r#""maxBodyBytes": 100, "requestTimeoutSecs": 1,"#).await;
    // Announced too large: refused before reading it.
    let r = raw(
        &f,
        b"POST /heartbeat HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 5000\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 413"), "{r}");
    assert!(
        r.ends_with("request body is larger than 100 bytes (maxBodyBytes)\n"),
        "{r}"
    );
    // Chunked without a length: cut off at the limit.
    let chunk = "x".repeat(60);
    let req = format!(
        "POST /heartbeat HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n3c\r\n{chunk}\r\n3c\r\n{chunk}\r\n0\r\n\r\n"
    );
    let r = raw(&f, req.as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 413"), "{r}");
    // A body that stops coming: 408 after requestTimeoutSecs, and the connection closes.
    let r = raw(
        &f,
        b"POST /heartbeat HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{\"hostname\":",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 408"), "{r}");
    assert!(r.to_ascii_lowercase().contains("connection: close"), "{r}");
    assert!(
        r.ends_with("request took longer than 1 s (requestTimeoutSecs)\n"),
        "{r}"
    );
    // Keep-alive: several heartbeats on one connection.
    let one = r#"{"hostname":"ka-1"}"#;
    let req = format!(
        "POST /heartbeat HTTP/1.1\r\nHost: x\r\nContent-Length: {n}\r\n\r\n{one}POST /heartbeat HTTP/1.1\r\nHost: x\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n{one}",
        n = one.len()
    );
    let r = raw(&f, req.as_bytes()).await;
    assert_eq!(r.matches("HTTP/1.1 200 OK").count(), 2, "{r}");
    // A body in several chunks is put back together.
    let body = r#"{"hostname":"chunked-1","realAgents":[{"name":"a","version":"1"}]}"#;
    let (a, b) = body.split_at(20);
    let (b, c) = b.split_at(25);
    let req = format!(
        "POST /heartbeat HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n{:x}\r\n{c}\r\n0\r\n\r\n",
        a.len(),
        b.len(),
        c.len()
    );
    let r = raw(&f, req.as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let got = f.server.state().store.host("chunked-1").unwrap();
    assert_eq!((got[0].name.as_str(), got[0].version.as_str()), ("a", "1"));
    f.server.stop().await;
}

#[tokio::test]
async fn status_pages_of_many_hosts_stream_the_same_bytes() {
    let f = fixture("").await;
    let st = f.server.state();
    // Enough hosts for many pieces; every tenth host without the agent.
    let statuses = ["started", "stoped", "error: \"x\" \\ é"];
    let mut want_agent = std::collections::HashMap::new();
    let mut hosts: Vec<String> = Vec::new();
    for i in 0..6000 {
        let host = format!("host-{:05}", (i * 4999) % 6000);
        let status = statuses[i % 3];
        let agents = if i % 10 == 0 {
            vec![proto::legacy::RealAgentRef {
                name: "logger".into(),
                version: "0.1".into(),
                status: status.into(),
                timestamp: 5,
            }]
        } else {
            vec![proto::legacy::RealAgentRef {
                name: "falcon-agent".into(),
                version: format!("1.{}", i % 4).into(),
                status: status.into(),
                timestamp: 1_700_000_000 + i as i64,
            }]
        };
        st.store.record(&host, &agents, 1);
        let v = (i % 10 != 0).then(|| agents[0].to_owned_agent());
        want_agent.insert(host.clone(), v);
        hosts.push(host);
    }
    hosts.sort();
    let (code, ct, body) = over_socket(&f, "GET", "/status/json/falcon-agent", "").await;
    assert_eq!((code, ct.as_str()), (200, "application/json"));
    assert!(body.len() > 3 * 64 * 1024, "{} bytes", body.len());
    // The bytes: keys in hostname order, each value as serde writes it.
    let mut want = b"{".to_vec();
    for (i, h) in hosts.iter().enumerate() {
        if i > 0 {
            want.push(b',');
        }
        serde_json::to_writer(&mut want, h).unwrap();
        want.push(b':');
        serde_json::to_writer(&mut want, &want_agent[h]).unwrap();
    }
    want.push(b'}');
    let first_difference = body.iter().zip(&want).position(|(a, b)| a != b);
    assert!(
        body == want,
        "{} bytes, want {}, first difference at {first_difference:?}",
        body.len(),
        want.len()
    );
    let (code, ct, text) = over_socket(&f, "GET", "/status/text/falcon-agent", "").await;
    assert_eq!((code, ct.as_str()), (200, "text/plain; charset=utf-8"));
    let text = String::from_utf8(text).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 6000);
    assert_eq!(text.matches(" not found").count(), 600);
    for (line, h) in lines.iter().zip(&hosts) {
        assert!(line.starts_with(&format!("{h} ")), "{line}");
    }
    // HEAD answers without a body.
    let addr = f.server.local_addr().unwrap();
    let r = client()
        .head(format!("http://{addr}/status/json/falcon-agent"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.bytes().await.unwrap().is_empty());
    f.server.stop().await;
}

#[tokio::test]
async fn a_kept_alive_connection_answers_from_the_reloaded_config() {
    let f = fixture("").await;
    let addr = f.server.local_addr().unwrap();
    // One connection for everything: at most one idle connection, requests one at a time.
    let c = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    let beat = || async {
        let r = c
            .post(format!("http://{addr}/heartbeat"))
            .body(hb("web-1", "started"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let resp: proto::legacy::HeartbeatResponse = r.json().await.unwrap();
        resp.desired_agents[0].version.clone()
    };
    assert_eq!(beat().await, "1.0.0");
    let path = f.server.state().reloader.path().to_path_buf();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replacen("\"1.0.0\"", "\"2.0.0\"", 1)).unwrap();
    let r = c
        .get(format!("http://{addr}/config/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(beat().await, "2.0.0");
    f.server.stop().await;
}

#[tokio::test]
async fn bodies_that_are_not_utf8_get_the_same_answer_on_both_paths() {
    let f = fixture("").await;
    let addr = f.server.local_addr().unwrap();
    let bodies: [&[u8]; 4] = [
        // In a value that is skipped: serde does not look at it, neither does Go.
        b"{\"hostname\":\"u-1\",\"extra\":\"\xff\"}",
        b"{\"hostname\":\"u-\xff\"}",
        b"{\"hostname\":\"u-2\"}\xff",
        b"\xef\xbb\xbf{\"hostname\":\"u-3\"}",
    ];
    for body in bodies {
        let r = client()
            .post(format!("http://{addr}/heartbeat"))
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        let got = (r.status().as_u16(), r.bytes().await.unwrap().to_vec());
        let req = Request::builder()
            .method(Method::POST)
            .uri("/heartbeat")
            .body(Body::from(body.to_vec()))
            .unwrap();
        let w = app(f.reference.clone()).oneshot(req).await.unwrap();
        let status = w.status().as_u16();
        let want = (
            status,
            w.into_body().collect().await.unwrap().to_bytes().to_vec(),
        );
        assert_eq!(got, want, "body {body:?}");
    }
    assert!(f.server.state().store.host("u-1").is_some());
    f.server.stop().await;
}

/// Writes one keep-alive heartbeat on `s` and reads its whole answer.
async fn heartbeat_on(s: &mut tokio::net::TcpStream, host: &str) -> String {
    let body = format!(r#"{{"hostname":"{host}"}}"#);
    let req = format!(
        "POST /heartbeat HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // The answer's body is JSON: read until its length is all here.
    loop {
        let n = s.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "connection closed: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap();
            if body.len() >= len {
                return text;
            }
        }
    }
}

#[tokio::test]
async fn past_max_connections_a_new_connection_waits_for_one_to_close() {
    let f = fixture(r#""maxConnections": 2, "headerReadTimeoutSecs": 600,"#).await;
    let addr = f.server.local_addr().unwrap();
    let cap = f.server.state().connections.clone();
    let mut first = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
    // Both are served (and stay open: keep-alive).
    assert!(heartbeat_on(&mut first, "cap-1")
        .await
        .starts_with("HTTP/1.1 200"));
    assert!(heartbeat_on(&mut second, "cap-2")
        .await
        .starts_with("HTTP/1.1 200"));
    assert_eq!(cap.open(), 2);
    // The third connects (the kernel's backlog takes it) but is not accepted.
    let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = r#"{"hostname":"cap-3"}"#;
    let req = format!(
        "POST /heartbeat HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    third.write_all(req.as_bytes()).await.unwrap();
    // The accept loop found the cap reached (it runs on this test's runtime: poll).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while cap.saturated.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cap was never reached"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut buf = [0u8; 64];
    let early = tokio::time::timeout(Duration::from_millis(300), third.read(&mut buf)).await;
    assert!(early.is_err(), "answered past the cap: {early:?}");
    assert!(f.server.state().store.host("cap-3").is_none());
    // One closes: the third is accepted and answered.
    drop(first);
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), third.read_to_end(&mut rest))
        .await
        .expect("answered once a connection closed")
        .unwrap();
    assert!(String::from_utf8_lossy(&rest).starts_with("HTTP/1.1 200"));
    assert!(f.server.state().store.host("cap-3").is_some());
    drop(second);
    f.server.stop().await;
}
