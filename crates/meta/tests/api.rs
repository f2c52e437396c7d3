//! In-process API tests: every endpoint, error and limit of `meta::app`, driven with
//! `oneshot`, and the parts that need a socket (timeouts, sweeping) on a real listener on
//! 127.0.0.1:0 started through `meta::Server`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use bytes::Bytes;
use http_body_util::BodyExt;
use meta::{app, AppState, FleetStore, MemStore, Server};
use proto::legacy::{HeartbeatResponse, RealAgent};
use tower::ServiceExt;

/// A temp dir with `cfg.json` (tarballDir = `<dir>/tarball`, absolute) and the state.
struct Fixture {
    dir: test_support::TempDir,
    state: AppState,
}

impl Fixture {
    fn cfg_path(&self) -> PathBuf {
        self.dir.path().join("cfg.json")
    }
    fn tarballs(&self) -> PathBuf {
        self.dir.path().join("tarball")
    }
    fn write_cfg(&self, extra: &str, agents: &str) {
        std::fs::write(self.cfg_path(), cfg_text(&self.tarballs(), extra, agents)).unwrap();
    }
    fn app(&self) -> axum::Router {
        app(self.state.clone())
    }
}

const AGENTS: &str = r#"[
  {"default": {"name": "falcon-agent", "version": "1.0.0", "tarball": "http://127.0.0.1:2000/", "md5": "", "cmd": "start"},
   "others": [
     {"prefix": "lg-", "version": "1.0.1", "tarball": "", "md5": "", "cmd": ""},
     {"prefix": "lg-c", "version": "", "tarball": "http://canary/", "md5": "http://sums/", "cmd": ""},
     {"prefix": "lg-cs", "version": "", "tarball": "", "md5": "", "cmd": "stop"}
   ]},
  {"others": [{"prefix": "x", "version": "9"}]},
  {"default": {"name": "logger", "version": "0.1", "tarball": "http://127.0.0.1:2000/", "md5": "", "cmd": "stop"}}
]"#;

fn cfg_text(tarballs: &Path, extra: &str, agents: &str) -> String {
    format!(
        r#"{{"debug": false, "tarballDir": {dir:?}, "http": {{"enabled": true, "listen": "127.0.0.1:0"}},
            {extra} "agents": {agents}}}"#,
        dir = tarballs.display().to_string()
    )
}

fn fixture(extra: &str, agents: &str) -> Fixture {
    let dir = test_support::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("tarball")).unwrap();
    let path = dir.path().join("cfg.json");
    std::fs::write(&path, cfg_text(&dir.path().join("tarball"), extra, agents)).unwrap();
    let (state, _) = AppState::load(&path).unwrap();
    Fixture { dir, state }
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

async fn send(app: &axum::Router, req: Request<Body>) -> Reply {
    let r = app.clone().oneshot(req).await.unwrap();
    let status = r.status();
    let headers = r.headers().clone();
    let body = r.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

fn request(method: Method, uri: &str, body: impl Into<Body>, peer: Option<&str>) -> Request<Body> {
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .body(body.into())
        .unwrap();
    if let Some(p) = peer {
        let addr: SocketAddr = p.parse().unwrap();
        req.extensions_mut().insert(ConnectInfo(addr));
    }
    req
}

async fn get(app: &axum::Router, uri: &str) -> Reply {
    send(
        app,
        request(Method::GET, uri, Body::empty(), Some("127.0.0.1:5555")),
    )
    .await
}

async fn get_with(app: &axum::Router, uri: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = request(Method::GET, uri, Body::empty(), Some("127.0.0.1:5555"));
    for (k, v) in headers {
        req.headers_mut().insert(
            axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    send(app, req).await
}

async fn heartbeat(app: &axum::Router, body: &str) -> Reply {
    send(
        app,
        request(Method::POST, "/heartbeat", body.to_string(), None),
    )
    .await
}

fn hb(host: &str, agents: &[(&str, &str, &str, i64)]) -> String {
    let real: Vec<RealAgent> = agents
        .iter()
        .map(|(n, v, s, t)| RealAgent {
            name: n.to_string(),
            version: v.to_string(),
            status: s.to_string(),
            timestamp: *t,
        })
        .collect();
    serde_json::to_string(&proto::legacy::HeartbeatRequest {
        hostname: host.into(),
        real_agents: real,
    })
    .unwrap()
}

#[tokio::test]
async fn heartbeat_answers_the_original_json_and_records_the_host() {
    let f = fixture("", AGENTS);
    let r = heartbeat(
        &f.app(),
        &hb(
            "web-1",
            &[("falcon-agent", "0.9", "started", 1_431_000_000)],
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.headers[header::CONTENT_TYPE], "application/json");
    assert_eq!(
        r.text(),
        r#"{"errorMessage":"","desiredAgents":[{"name":"falcon-agent","version":"1.0.0","tarball":"http://127.0.0.1:2000/","md5":"","cmd":"start"},{"name":"logger","version":"0.1","tarball":"http://127.0.0.1:2000/","md5":"","cmd":"stop"}]}"#
    );
    assert_eq!(
        f.state.store.host("web-1").unwrap(),
        vec![RealAgent {
            name: "falcon-agent".into(),
            version: "0.9".into(),
            status: "started".into(),
            timestamp: 1_431_000_000
        }]
    );
}

#[tokio::test]
async fn a_host_with_no_agents_is_recorded_as_seen() {
    let f = fixture("", AGENTS);
    for body in [
        r#"{"hostname":"bare-1"}"#,
        r#"{"hostname":"bare-2","realAgents":null}"#,
    ] {
        let r = heartbeat(&f.app(), body).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    assert_eq!(f.state.store.host_count(), 2);
    let r = get(&f.app(), "/status/text/falcon-agent").await;
    assert_eq!(r.text(), "bare-1 not found\nbare-2 not found\n");
}

#[tokio::test]
async fn prefix_overrides_table() {
    let f = fixture("", AGENTS);
    // host, then falcon-agent's (version, tarball, md5, cmd).
    let table = [
        ("web-1", ("1.0.0", "http://127.0.0.1:2000/", "", "start")),
        ("lg-1", ("1.0.1", "http://127.0.0.1:2000/", "", "start")),
        (
            "lg-c1",
            ("1.0.1", "http://canary/", "http://sums/", "start"),
        ),
        (
            "lg-cs1",
            ("1.0.1", "http://canary/", "http://sums/", "stop"),
        ),
        ("LG-1", ("1.0.0", "http://127.0.0.1:2000/", "", "start")),
        ("x-lg-1", ("1.0.0", "http://127.0.0.1:2000/", "", "start")),
    ];
    for (host, want) in table {
        let r = heartbeat(&f.app(), &hb(host, &[])).await;
        assert_eq!(r.status, StatusCode::OK);
        let resp: HeartbeatResponse = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(resp.error_message, "");
        assert_eq!(
            resp.desired_agents.len(),
            2,
            "entry without default skipped"
        );
        let d = &resp.desired_agents[0];
        assert_eq!(
            (
                d.version.as_str(),
                d.tarball.as_str(),
                d.md5.as_str(),
                d.cmd.as_str()
            ),
            want,
            "host {host}"
        );
    }
}

#[tokio::test]
async fn legacy_errors_are_the_original_plain_texts() {
    let f = fixture("", AGENTS);
    let table = [
        ("", "body is blank\n"),
        ("{", "body format error\n"),
        ("[]", "body format error\n"),
        (r#"["h", []]"#, "body format error\n"),
        ("null", "hostname is blank\n"),
        (r#"{"hostname": 5}"#, "body format error\n"),
        (r#"{"hostname":"h","realAgents":{}}"#, "body format error\n"),
        (r#"{"hostname":""}"#, "hostname is blank\n"),
        (r#"{"realAgents":[]}"#, "hostname is blank\n"),
    ];
    for (body, want) in table {
        let r = heartbeat(&f.app(), body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "body {body:?}");
        assert_eq!(r.text(), want, "body {body:?}");
        assert_eq!(r.headers[header::CONTENT_TYPE], "text/plain; charset=utf-8");
    }
    assert_eq!(f.state.store.host_count(), 0);
}

#[tokio::test]
async fn hostile_names_are_refused_and_say_which() {
    let f = fixture("", AGENTS);
    let long = "h".repeat(256);
    let table: Vec<(String, &str)> = vec![
        (hb("../etc", &[]), "invalid hostname \"../etc\""),
        (hb("h 1", &[]), "invalid hostname"),
        (hb("h\r\nforged 1.0 started", &[]), "invalid hostname"),
        (hb(".hidden", &[]), "invalid hostname"),
        (hb(&long, &[]), "invalid hostname"),
        (
            hb("ok", &[("../../etc", "1", "started", 1)]),
            "invalid agent name \"../../etc\"",
        ),
        (
            hb("ok", &[("a/b", "1", "started", 1)]),
            "invalid agent name",
        ),
        (hb("ok", &[("", "1", "started", 1)]), "invalid agent name"),
        (
            hb("ok", &[("falcon", "1/../../x", "started", 1)]),
            "invalid version \"1/../../x\"",
        ),
        (hb("ok", &[("falcon", "", "started", 1)]), "invalid version"),
    ];
    for (body, want) in table {
        let r = heartbeat(&f.app(), &body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        assert!(r.text().starts_with(want), "{body}: got {:?}", r.text());
        assert!(!r.text()[1..r.text().len() - 1].contains('\n'), "one line");
    }
    assert_eq!(f.state.store.host_count(), 0, "nothing recorded");
}

#[tokio::test]
async fn body_limit_gives_413_with_a_clear_text() {
    let f = fixture(r#""maxBodyBytes": 200,"#, AGENTS);
    let big = hb("h", &[("falcon-agent", "1", &"x".repeat(300), 1)]);
    // Announced with Content-Length.
    let mut req = request(Method::POST, "/heartbeat", big.clone(), None);
    req.headers_mut().insert(
        header::CONTENT_LENGTH,
        big.len().to_string().parse().unwrap(),
    );
    let r = send(&f.app(), req).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        r.text(),
        "request body is larger than 200 bytes (maxBodyBytes)\n"
    );
    // Streamed without a length.
    let chunks: Vec<Result<Bytes, std::io::Error>> = big
        .as_bytes()
        .chunks(50)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let body = Body::from_stream(futures_util::stream::iter(chunks));
    let r = send(&f.app(), request(Method::POST, "/heartbeat", body, None)).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    // Just under the limit is fine.
    let r = heartbeat(&f.app(), &hb("h", &[("falcon-agent", "1", "started", 1)])).await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn too_many_agents_is_a_400_that_says_so() {
    let f = fixture(r#""maxAgentsPerHeartbeat": 2,"#, AGENTS);
    let three = hb(
        "h",
        &[
            ("a", "1", "started", 1),
            ("b", "1", "started", 1),
            ("c", "1", "started", 1),
        ],
    );
    let r = heartbeat(&f.app(), &three).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        r.text(),
        "too many agents in one heartbeat: 3, the limit is 2 (maxAgentsPerHeartbeat)\n"
    );
    let two = hb("h", &[("a", "1", "started", 1), ("b", "1", "started", 1)]);
    assert_eq!(heartbeat(&f.app(), &two).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_body_that_never_ends_times_out_with_408() {
    let f = fixture(r#""requestTimeoutSecs": 1,"#, AGENTS);
    let body = Body::from_stream(futures_util::stream::pending::<Result<Bytes, std::io::Error>>());
    let r = send(&f.app(), request(Method::POST, "/heartbeat", body, None)).await;
    assert_eq!(r.status, StatusCode::REQUEST_TIMEOUT);
    assert_eq!(
        r.text(),
        "request took longer than 1 s (requestTimeoutSecs)\n"
    );
}

#[tokio::test]
async fn status_json_and_text() {
    let f = fixture("", AGENTS);
    let ts = 1_431_000_000;
    for body in [
        hb("h2", &[("falcon-agent", "1.0.0", "started", ts)]),
        hb("h1", &[("logger", "0.1", "stoped", ts + 1)]),
        hb(
            "h3",
            &[("falcon-agent", "1.0.1", "control status: exit 1", ts + 2)],
        ),
    ] {
        assert_eq!(heartbeat(&f.app(), &body).await.status, StatusCode::OK);
    }
    let r = get(&f.app(), "/status/json/falcon-agent").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers[header::CONTENT_TYPE], "application/json");
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        v,
        serde_json::json!({
            "h1": null,
            "h2": {"name": "falcon-agent", "version": "1.0.0", "status": "started", "timestamp": ts},
            "h3": {"name": "falcon-agent", "version": "1.0.1", "status": "control status: exit 1", "timestamp": ts + 2},
        })
    );
    let r = get(&f.app(), "/status/text/falcon-agent").await;
    let local = |t: i64| {
        use chrono::TimeZone;
        chrono::Local
            .timestamp_opt(t, 0)
            .unwrap()
            .format("%Y-%m-%d %H:%M:%S")
            .to_string()
    };
    assert_eq!(
        r.text(),
        format!(
            "h1 not found\nh2 1.0.0 started {ts} {}\nh3 1.0.1 control status: exit 1 {} {}\n",
            local(ts),
            ts + 2,
            local(ts + 2)
        )
    );
    // An unknown agent: every host, none has it.
    let r = get(&f.app(), "/status/json/nobody").await;
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&r.body).unwrap(),
        serde_json::json!({"h1": null, "h2": null, "h3": null})
    );
    let r = get(&f.app(), "/status/text/..%2fx").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.text().starts_with("invalid agent name"), "{}", r.text());
}

#[tokio::test]
async fn health_and_version() {
    let f = fixture("", AGENTS);
    let r = get(&f.app(), "/health").await;
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "ok"));
    let r = get(&f.app(), "/version").await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (StatusCode::OK, meta::VERSION)
    );
    // A known path with the wrong method.
    let r = get(&f.app(), "/heartbeat").await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn reload_only_from_loopback() {
    let f = fixture("", AGENTS);
    for peer in [Some("10.0.0.1:4000"), Some("192.168.1.5:1"), None] {
        let r = send(
            &f.app(),
            request(Method::GET, "/config/reload", Body::empty(), peer),
        )
        .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{peer:?}");
        assert_eq!(r.text(), "config reload is only allowed from loopback\n");
    }
    for peer in ["127.0.0.1:1", "[::1]:1", "[::ffff:127.0.0.1]:1"] {
        let r = send(
            &f.app(),
            request(Method::GET, "/config/reload", Body::empty(), Some(peer)),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{peer}: {}", r.text());
    }
}

#[tokio::test]
async fn reload_swaps_a_good_config_and_refuses_a_bad_one_with_every_error() {
    let f = fixture("", AGENTS);
    let version_for = |app: axum::Router| async move {
        let r = heartbeat(&app, &hb("web-1", &[])).await;
        let resp: HeartbeatResponse = serde_json::from_slice(&r.body).unwrap();
        resp.desired_agents[0].version.clone()
    };
    assert_eq!(version_for(f.app()).await, "1.0.0");
    f.write_cfg("", &AGENTS.replace("\"1.0.0\"", "\"2.0.0\""));
    let r = get(&f.app(), "/config/reload").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(r.text().starts_with("config reloaded from"), "{}", r.text());
    assert_eq!(version_for(f.app()).await, "2.0.0");

    let bad = r#"[{"default": {"name": "../x", "version": "1", "tarball": "http://x/", "cmd": "boot"}},
                  {"default": {"name": "y", "version": "..", "tarball": "http://x/", "cmd": "start"},
                   "others": [{"prefix": ""}]}]"#;
    f.write_cfg(r#""maxBodyBytes": 1,"#, bad);
    let r = get(&f.app(), "/config/reload").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let text = r.text();
    assert!(
        text.starts_with("config reload refused, the running config stays:"),
        "{text}"
    );
    for field in [
        "maxBodyBytes",
        "agents[0].default.name",
        "agents[0].default.cmd",
        "agents[1].default.version",
        "agents[1].others[0].prefix",
    ] {
        assert!(
            text.contains(&format!("{field}: ")),
            "{field} missing in {text}"
        );
    }
    assert_eq!(version_for(f.app()).await, "2.0.0", "running config stays");

    std::fs::remove_file(f.cfg_path()).unwrap();
    let r = get(&f.app(), "/config/reload").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.text().contains("read config"), "{}", r.text());
}

#[tokio::test]
async fn sha256_is_computed_for_local_tarballs_and_configured_ones_win() {
    // The in-process server listens on an ephemeral port: name the URL the config uses.
    const SELF: &str = r#""tarballUrls": ["http://127.0.0.1:2000/"],"#;
    let f = fixture(SELF, AGENTS);
    let (_, sha_100) =
        test_support::tarball::publish(&f.tarballs(), "falcon-agent", "1.0.0", b"v100");
    let (_, sha_101) =
        test_support::tarball::publish(&f.tarballs(), "falcon-agent", "1.0.1", b"v101");
    let sha_of = |app: axum::Router, host: &'static str| async move {
        let r = heartbeat(&app, &hb(host, &[])).await;
        let resp: HeartbeatResponse = serde_json::from_slice(&r.body).unwrap();
        (
            resp.desired_agents[0].sha256.clone(),
            resp.desired_agents[1].sha256.clone(),
        )
    };
    // Not hashed yet: left out rather than waited for.
    assert_eq!(sha_of(f.app(), "web-1").await, (None, None));
    f.state.reloader.refresh_shas().await;
    assert_eq!(
        sha_of(f.app(), "web-1").await,
        (Some(sha_100.clone()), None)
    );
    assert_eq!(sha_of(f.app(), "lg-1").await, (Some(sha_101), None));
    // A replaced tarball is noticed (size changed).
    std::fs::write(
        f.tarballs().join("falcon-agent-1.0.0.tar.gz"),
        b"v100 rebuilt",
    )
    .unwrap();
    f.state.reloader.refresh_shas().await;
    let (_, rebuilt) = test_support::digests(b"v100 rebuilt");
    assert_eq!(sha_of(f.app(), "web-1").await.0, Some(rebuilt));
    // A configured value wins.
    let configured = "ab".repeat(32);
    f.write_cfg(
        SELF,
        &AGENTS.replace(
            r#""cmd": "start"}"#,
            &format!(r#""cmd": "start", "sha256": "{configured}"}}"#),
        ),
    );
    assert_eq!(get(&f.app(), "/config/reload").await.status, StatusCode::OK);
    assert_eq!(sha_of(f.app(), "web-1").await.0, Some(configured));
}

// ---- files ----

fn publish_file(f: &Fixture, name: &str, data: &[u8]) -> PathBuf {
    test_support::write_file(&f.tarballs(), name, data)
}

#[tokio::test]
async fn files_full_head_and_ranges() {
    let f = fixture("", AGENTS);
    let data: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    publish_file(&f, "falcon/a-1.tar.gz", &data);
    let app = f.app();

    let r = get(&app, "/falcon/a-1.tar.gz").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body.as_ref(), data.as_slice());
    assert_eq!(r.headers[header::CONTENT_LENGTH], "300000");
    assert_eq!(r.headers[header::CONTENT_TYPE], "application/gzip");
    assert_eq!(r.headers[header::ACCEPT_RANGES], "bytes");
    assert!(r.headers.contains_key(header::ETAG));
    assert!(r.headers.contains_key(header::LAST_MODIFIED));

    let r = send(
        &app,
        request(Method::HEAD, "/falcon/a-1.tar.gz", Body::empty(), None),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers[header::CONTENT_LENGTH], "300000");
    assert!(r.body.is_empty());

    // (Range header, status, content-range, first, last inclusive)
    let table = [
        ("bytes=0-9", 206, Some("bytes 0-9/300000"), 0, 9),
        (
            "bytes=299990-",
            206,
            Some("bytes 299990-299999/300000"),
            299_990,
            299_999,
        ),
        (
            "bytes=-5",
            206,
            Some("bytes 299995-299999/300000"),
            299_995,
            299_999,
        ),
        (
            "bytes=100-1000000",
            206,
            Some("bytes 100-299999/300000"),
            100,
            299_999,
        ),
        ("bytes=0-1,5-6", 200, None, 0, 299_999),
        ("bytes=junk", 200, None, 0, 299_999),
    ];
    for (range, status, cr, first, last) in table {
        let r = get_with(&app, "/falcon/a-1.tar.gz", &[("range", range)]).await;
        assert_eq!(r.status.as_u16(), status, "{range}");
        assert_eq!(
            r.headers
                .get(header::CONTENT_RANGE)
                .map(|v| v.to_str().unwrap()),
            cr,
            "{range}"
        );
        assert_eq!(r.body.as_ref(), &data[first..=last], "{range}");
        assert_eq!(
            r.headers[header::CONTENT_LENGTH],
            (last - first + 1).to_string().as_str()
        );
    }
    for range in ["bytes=300000-", "bytes=400000-500000", "bytes=-0"] {
        let r = get_with(&app, "/falcon/a-1.tar.gz", &[("range", range)]).await;
        assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE, "{range}");
        assert_eq!(r.headers[header::CONTENT_RANGE], "bytes */300000");
    }
}

#[tokio::test]
async fn files_conditional_requests() {
    let f = fixture("", AGENTS);
    publish_file(&f, "a-1.tar.gz", b"0123456789");
    let app = f.app();
    let r = get(&app, "/a-1.tar.gz").await;
    let etag = r.headers[header::ETAG].to_str().unwrap().to_string();
    let lm = r.headers[header::LAST_MODIFIED]
        .to_str()
        .unwrap()
        .to_string();

    let listed = format!("\"other\", W/{etag}");
    for h in [
        vec![("if-none-match", etag.as_str())],
        vec![("if-none-match", listed.as_str())],
        vec![("if-none-match", "*")],
        vec![("if-modified-since", lm.as_str())],
    ] {
        let r = get_with(&app, "/a-1.tar.gz", &h).await;
        assert_eq!(r.status, StatusCode::NOT_MODIFIED, "{h:?}");
        assert!(r.body.is_empty());
        assert_eq!(r.headers[header::ETAG], etag.as_str());
    }
    let r = get_with(&app, "/a-1.tar.gz", &[("if-none-match", "\"stale\"")]).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = get_with(
        &app,
        "/a-1.tar.gz",
        &[("if-modified-since", "Thu, 01 Jan 1998 00:00:00 GMT")],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    // If-None-Match decides alone when present.
    let r = get_with(
        &app,
        "/a-1.tar.gz",
        &[("if-none-match", "\"stale\""), ("if-modified-since", &lm)],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);

    // If-Range: a matching validator keeps the range, a stale one gets the whole file.
    for (if_range, status, body) in [
        (etag.as_str(), 206, &b"234"[..]),
        (lm.as_str(), 206, &b"234"[..]),
        ("\"stale\"", 200, &b"0123456789"[..]),
        ("Thu, 01 Jan 1998 00:00:00 GMT", 200, &b"0123456789"[..]),
    ] {
        let r = get_with(
            &app,
            "/a-1.tar.gz",
            &[("range", "bytes=2-4"), ("if-range", if_range)],
        )
        .await;
        assert_eq!(r.status.as_u16(), status, "{if_range}");
        assert_eq!(r.body.as_ref(), body, "{if_range}");
    }
}

#[tokio::test]
async fn files_never_leave_tarball_dir() {
    let f = fixture("", AGENTS);
    publish_file(&f, "ok.tar.gz", b"fine");
    publish_file(&f, ".hidden", b"SECRET-HIDDEN");
    publish_file(&f, "sub/.git/config", b"SECRET-GIT");
    std::fs::create_dir_all(f.tarballs().join("emptydir")).unwrap();
    let outside = test_support::write_file(f.dir.path(), "outside.txt", "SECRET-OUTSIDE");
    std::os::unix::fs::symlink(&outside, f.tarballs().join("escape.tar.gz")).unwrap();
    std::os::unix::fs::symlink("/etc", f.tarballs().join("etc")).unwrap();
    std::os::unix::fs::symlink("ok.tar.gz", f.tarballs().join("inside.tar.gz")).unwrap();
    let app = f.app();

    let refused = [
        "/",
        "/emptydir",
        "/emptydir/",
        "/sub",
        "/.hidden",
        "/%2ehidden",
        "/sub/.git/config",
        "/../outside.txt",
        "/%2e%2e/outside.txt",
        "/%2E%2E/%2e%2e/etc/passwd",
        "/sub/..%2f..%2foutside.txt",
        "/..%5coutside.txt",
        "/ok.tar.gz%00.md5",
        "//etc/passwd",
        "/escape.tar.gz",
        "/etc/passwd",
        "/%zz",
        "/missing.tar.gz",
    ];
    for path in refused {
        let r = get(&app, path).await;
        assert!(
            matches!(r.status.as_u16(), 400 | 403 | 404),
            "{path}: {}",
            r.status
        );
        assert!(!r.text().contains("SECRET"), "{path} leaked");
        assert!(!r.text().contains("root:"), "{path} leaked /etc/passwd");
    }
    let r = get(&app, "/inside.tar.gz").await;
    assert_eq!((r.status, r.body.as_ref()), (StatusCode::OK, &b"fine"[..]));
    let r = send(&app, request(Method::POST, "/ok.tar.gz", "x", None)).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.headers[header::ALLOW], "GET, HEAD");
}

// ---- with a real listener ----

#[tokio::test]
async fn stale_hosts_are_swept() {
    let f = fixture(r#""staleHostSecs": 1, "sweepIntervalSecs": 1,"#, AGENTS);
    let store = Arc::new(MemStore::new());
    let cfg = meta::config::load(&f.cfg_path()).unwrap().config;
    let state = AppState::new(&f.cfg_path(), cfg, store.clone());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    store.record("old", &[], now - 100);
    store.record("fresh", &[], now + 3600);
    let server = Server::start(state, None);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while store.host("old").is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "old host never swept"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(store.host("fresh").is_some());
    server.stop().await;
}

#[tokio::test]
async fn real_listener_serves_and_stops() {
    let f = fixture("", AGENTS);
    let server = Server::start_local(&f.cfg_path()).await.unwrap();
    let addr = server.local_addr().unwrap();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let r = client
        .post(format!("http://{addr}/heartbeat"))
        .body(hb("web-9", &[]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The reload check sees the real peer address (127.0.0.1).
    let r = client
        .get(format!("http://{addr}/config/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(server.state().store.host_count(), 1);
    server.stop().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn slow_headers_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = fixture(r#""headerReadTimeoutSecs": 1,"#, AGENTS);
    let server = Server::start_local(&f.cfg_path()).await.unwrap();
    let mut s = tokio::net::TcpStream::connect(server.local_addr().unwrap())
        .await
        .unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    // The server closes the connection (maybe after a 408) instead of waiting forever.
    let n = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("connection not closed by the header read timeout");
    let _ = n;
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
    server.stop().await;
}
