//! In-process tests of the BootAgent and operator routes through `meta::app` with
//! `oneshot`: what needs a faked peer address (the operator API refuses non-loopback
//! callers) or direct access to the shared state.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use meta::{app, AppState};
use proto::bootagent::{RegisterResponse, StatusResponse};
use tower::ServiceExt;

fn state(dir: &std::path::Path) -> AppState {
    let cfg = dir.join("cfg.json");
    std::fs::write(
        &cfg,
        r#"{"tarballDir": "", "http": {"enabled": false},
            "tagRules": [{"prefix": "web", "tags": "svc=web"}], "agents": []}"#,
    )
    .unwrap();
    AppState::load(&cfg).unwrap().0
}

async fn call(
    st: &AppState,
    method: Method,
    uri: &str,
    body: &str,
    peer: Option<&str>,
) -> (StatusCode, String) {
    call_as(st, method, uri, body, peer, None).await
}

/// [`call`] with a host's credential.
async fn call_as(
    st: &AppState,
    method: Method,
    uri: &str,
    body: &str,
    peer: Option<&str>,
    credential: Option<&str>,
) -> (StatusCode, String) {
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json");
    if let Some(c) = credential {
        req = req.header("authorization", format!("Bearer {c}"));
    }
    let mut req = req.body(Body::from(body.to_string())).unwrap();
    if let Some(p) = peer {
        let addr: SocketAddr = p.parse().unwrap();
        req.extensions_mut().insert(ConnectInfo(addr));
    }
    let r = app(st.clone()).oneshot(req).await.unwrap();
    let code = r.status();
    let body = r.into_body().collect().await.unwrap().to_bytes();
    (code, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn operator_api_refuses_non_loopback_peers() {
    let dir = test_support::tempdir().unwrap();
    let st = state(dir.path());
    let (code, text) = call(
        &st,
        Method::POST,
        "/agent/register",
        r#"{"hostname": "web-1", "agentsn": ""}"#,
        Some("10.1.2.3:4000"),
    )
    .await;
    // Hosts may register from anywhere.
    assert_eq!(code, StatusCode::OK, "{text}");
    let reg: RegisterResponse = serde_json::from_str(&text).unwrap();
    assert_eq!(reg.tags, "svc=web");

    let job = r#"{"action": "restart", "name": "basic", "prefix": "web"}"#;
    for peer in [Some("10.1.2.3:4000"), Some("[2001:db8::1]:80"), None] {
        for (method, uri, body) in [
            (Method::POST, "/api/jobs", job),
            (Method::GET, "/api/hosts", ""),
            (Method::GET, "/api/hosts/web-1", ""),
            (Method::GET, "/api/jobs/x", ""),
            (Method::POST, "/api/retry", r#"{"prefix": "web"}"#),
        ] {
            let (code, text) = call(&st, method, uri, body, peer).await;
            assert_eq!(code, StatusCode::FORBIDDEN, "{uri} from {peer:?}: {text}");
            assert!(text.contains("only allowed from loopback"), "{text}");
        }
    }
    // Nothing was queued by the refused calls.
    let (code, text) = call(
        &st,
        Method::GET,
        "/api/hosts/web-1",
        "",
        Some("127.0.0.1:1"),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["pending"], serde_json::json!([]));

    // From loopback the same call works, and the job reaches the host.
    let (code, text) = call(&st, Method::POST, "/api/jobs", job, Some("[::1]:9")).await;
    assert_eq!(code, StatusCode::OK, "{text}");
    let status = format!(
        r#"{{"hostname": "web-1", "agentsn": "{}", "agents": []}}"#,
        reg.agentsn
    );
    let (code, text) = call_as(
        &st,
        Method::POST,
        "/agent/status",
        &status,
        Some("10.1.2.3:4000"),
        Some(&reg.credential),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{text}");
    let r: StatusResponse = serde_json::from_str(&text).unwrap();
    assert_eq!(r.jobs.len(), 1);
    assert_eq!(r.jobs[0].name, "basic");
    // The shared state saw the report.
    assert!(st.store.host("web-1").is_some());
    assert_eq!(st.boot.registry.len(), 1);
}

#[test]
fn new_config_keys_are_read_and_every_problem_is_reported() {
    let good = r#"{"tagRules": [{"prefix": "web", "tags": "svc=web,cmpt=FE"}, {"prefix": "", "tags": "all=1"}],
        "agents": [{"default": {"name": "basic", "version": "1", "tarball": "http://d/", "cmd": "start",
                                "envs": {"PATH": "/usr/bin"}, "limits": {"CPU": "10%", "memory": "20M"}},
                    "others": [{"prefix": "web", "limits": {"CPU": "50%"}}]}]}"#;
    let c = meta::config::parse(good).unwrap().config;
    assert_eq!(c.tag_rules.len(), 2);
    assert_eq!(c.tag_rules[0].tags, "svc=web,cmpt=FE");
    let d = c.agents[0].default.as_ref().unwrap();
    assert_eq!(d.envs["PATH"], "/usr/bin");
    assert_eq!(d.limits["memory"], "20M");
    assert_eq!(c.agents[0].others[0].limits["CPU"], "50%");
    let desired = meta::desired::Desired::compile(std::sync::Arc::new(c), Default::default());
    let (envs, limits) = &desired.extras_for("web-1")[0];
    assert_eq!(envs["PATH"], "/usr/bin");
    assert_eq!(limits.len(), 1, "an override replaces the whole object");
    assert_eq!(limits["CPU"], "50%");
    assert_eq!(desired.extras_for("db-1")[0].1["CPU"], "10%");

    let bad = r#"{"tagRules": [{"prefix": "web", "tags": "svc"}, {"prefix": "x", "tags": "a=b c"}, 3,
                               {"prefix": "y", "tags": "a=b", "tag": "c=d"}],
        "agents": [{"default": {"name": "basic", "version": "1", "tarball": "http://d/", "cmd": "start",
                                "envs": {"1BAD": "x", "OK": 5}, "limits": "10%"},
                    "others": [{"prefix": "web", "envs": {"A": "line\nbreak"}}]}]}"#;
    let (errors, _) = meta::config::parse(bad).unwrap_err();
    let fields: Vec<&str> = errors.iter().map(|p| p.field.as_str()).collect();
    for f in [
        "tagRules[0].tags",
        "tagRules[1].tags",
        "tagRules[2]",
        "tagRules[3].tag",
        "agents[0].default.envs",
        "agents[0].default.envs.OK",
        "agents[0].default.limits",
        "agents[0].others[0].envs",
    ] {
        assert!(fields.contains(&f), "no error for {f}: {errors:#?}");
    }
    let wrong: Vec<String> = errors.iter().map(|p| p.to_string()).collect();
    assert!(wrong.iter().any(|e| e.contains("\"1BAD\"")), "{wrong:#?}");
}
