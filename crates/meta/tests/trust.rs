//! Operator access with the real ops-meta binary over real sockets: with `apiTokens`
//! every mutation needs an admin token (401 without or with an unknown one, 403 with a
//! read token), reads at least a read token, and every mutation, refused or done, is in
//! `GET /api/audit` with its actor, hosts and outcome, after a restart too; tokens are
//! rotated by reload; without tokens the requests a web page could make are refused; a
//! bad `apiTokens` lists every problem at once; and (in process, with a store whose audit
//! log fails) an action that cannot be recorded is answered 503 and not done.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use test_support::KillOnDrop;

const BIN: &str = env!("CARGO_BIN_EXE_ops-meta");
const WAIT: Duration = Duration::from_secs(30);

const ADMIN: &str = "adm1n-t0ken-for-tests";
const READER: &str = "r3ad-t0ken-for-tests";

fn sha(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn token(name: &str, role: &str, token: &str) -> Value {
    json!({"name": name, "role": role, "sha256": sha(token)})
}

/// One ops-meta in its own folder; the port and folder survive a restart.
struct Meta {
    child: Option<KillOnDrop>,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Meta {
    fn start(dir: &Path, store: &str, tokens: Value) -> Meta {
        let port = test_support::free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut m = Meta {
            child: None,
            dir: dir.to_path_buf(),
            addr,
        };
        m.write_cfg(store, tokens);
        m.spawn();
        m
    }

    fn write_cfg(&self, store: &str, tokens: Value) {
        let cfg = json!({
            "tarballDir": "",
            "http": {"enabled": true, "listen": self.addr.to_string()},
            "store": store,
            "agents": [],
            "apiTokens": tokens,
        });
        test_support::write_file(&self.dir, "cfg.json", cfg.to_string());
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("meta.log"))
            .unwrap();
        let child = test_support::command(Path::new(BIN))
            .args(["-c", "cfg.json", "--threads", "2"])
            .current_dir(&self.dir)
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(KillOnDrop(child));
        test_support::wait_for("ops-meta to listen", WAIT, || {
            if let Some(st) = self.child.as_mut().unwrap().0.try_wait().unwrap() {
                panic!("ops-meta exited with {st}: {}", self.log());
            }
            TcpStream::connect(self.addr).is_ok()
        });
    }

    fn stop(&mut self) {
        drop(self.child.take());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("meta.log")).unwrap_or_default()
    }

    /// One request over a fresh connection, every header as given (a `Host` of the
    /// listen address unless one is given).
    fn call(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Answer {
        let mut head = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            head.push_str(&format!("Host: {}\r\n", self.addr));
        }
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
        let mut s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(head.as_bytes()).unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        Answer {
            status,
            head: head.to_ascii_lowercase(),
            body: body.to_string(),
        }
    }

    /// A JSON call with a bearer token (`None`: without one).
    fn json(&self, method: &str, path: &str, bearer: Option<&str>, body: &Value) -> Answer {
        let auth = bearer.map(|t| format!("Bearer {t}"));
        let mut h = vec![("Content-Type", "application/json")];
        if let Some(a) = &auth {
            h.push(("Authorization", a.as_str()));
        }
        let body = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        self.call(method, path, &h, &body)
    }

    fn audit(&self, bearer: Option<&str>) -> Vec<Value> {
        let a = self.json("GET", "/api/audit?limit=1000", bearer, &Value::Null);
        assert_eq!(a.status, 200, "audit: {}", a.body);
        let v: Value = serde_json::from_str(&a.body).unwrap();
        v["entries"].as_array().unwrap().clone()
    }

    /// Registers a BootAgent host (a host endpoint: no token, from anywhere).
    fn register(&self, host: &str) {
        let a = self.json(
            "POST",
            "/agent/register",
            None,
            &json!({"hostname": host, "agentsn": ""}),
        );
        assert_eq!(a.status, 200, "register: {}", a.body);
    }
}

struct Answer {
    status: u16,
    head: String,
    body: String,
}

/// The three mutations of the issue, as (action, method, path, body).
fn mutations() -> Vec<(&'static str, &'static str, &'static str, Value)> {
    vec![
        (
            "jobs.create",
            "POST",
            "/api/jobs",
            json!({"action": "restart", "name": "basic", "hosts": ["web-1"]}),
        ),
        (
            "retry",
            "POST",
            "/api/retry",
            json!({"hosts": ["web-1"], "name": "basic"}),
        ),
        ("config.reload", "GET", "/config/reload", Value::Null),
    ]
}

#[test]
fn every_mutation_needs_an_admin_token_and_is_audited() {
    let dir = test_support::tempdir().unwrap();
    let tokens = json!([
        token("ops-admin", "admin", ADMIN),
        token("grafana", "read", READER)
    ]);
    let mut m = Meta::start(dir.path(), "sqlite:fleet.db", tokens);
    m.register("web-1");

    for (action, method, path, body) in mutations() {
        let a = m.json(method, path, None, &body);
        assert_eq!(a.status, 401, "{action} without a token: {}", a.body);
        assert!(a.head.contains("www-authenticate: bearer"), "{}", a.head);
        assert!(a.body.contains("needs an API token"), "{}", a.body);
        let a = m.json(method, path, Some("not-a-token"), &body);
        assert_eq!(a.status, 401, "{action} with an unknown token: {}", a.body);
        assert_eq!(a.body, "unknown API token\n");
        let a = m.json(method, path, Some(READER), &body);
        assert_eq!(a.status, 403, "{action} with a read token: {}", a.body);
        assert!(a.body.contains("\"grafana\" has role read"), "{}", a.body);
        let a = m.json(method, path, Some(ADMIN), &body);
        assert_eq!(a.status, 200, "{action} with the admin token: {}", a.body);
    }
    // A scheme other than Bearer is no token.
    let a = m.call(
        "POST",
        "/api/retry",
        &[("Authorization", "Basic b3BzOmFkbWlu")],
        "{}",
    );
    assert_eq!(a.status, 401, "{}", a.body);

    // Reads need at least a read token; host endpoints and probes none.
    for path in [
        "/api/hosts",
        "/api/hosts/web-1",
        "/metrics",
        "/status/json/basic",
    ] {
        assert_eq!(
            m.json("GET", path, None, &Value::Null).status,
            401,
            "{path}"
        );
        let r = m.json("GET", path, Some(READER), &Value::Null);
        assert_ne!(r.status, 401, "{path}: {}", r.body);
        assert_ne!(r.status, 403, "{path}: {}", r.body);
        assert_eq!(
            r.status,
            m.json("GET", path, Some(ADMIN), &Value::Null).status
        );
    }
    assert_eq!(
        m.json("GET", "/api/hosts", Some(READER), &Value::Null)
            .status,
        200
    );
    assert_eq!(m.json("GET", "/api/audit", None, &Value::Null).status, 401);
    assert_eq!(m.json("GET", "/health", None, &Value::Null).status, 200);
    let hb = m.json(
        "POST",
        "/heartbeat",
        None,
        &json!({"hostname": "legacy-1", "realAgents": []}),
    );
    assert_eq!(hb.status, 200, "{}", hb.body);

    let check = |entries: &[Value]| {
        // Newest first: 4 calls per mutation and the Basic one.
        let ids: Vec<i64> = entries.iter().map(|e| e["id"].as_i64().unwrap()).collect();
        assert!(ids.windows(2).all(|w| w[0] > w[1]), "{ids:?}");
        assert_eq!(entries.len(), 13, "{entries:#?}");
        let mut oldest_first: Vec<&Value> = entries.iter().rev().collect();
        oldest_first.pop();
        for (i, (action, method, path, _)) in mutations().into_iter().enumerate() {
            let four = &oldest_first[i * 4..i * 4 + 4];
            let seen: Vec<(&str, u64)> = four
                .iter()
                .map(|e| (e["actor"].as_str().unwrap(), e["status"].as_u64().unwrap()))
                .collect();
            assert_eq!(
                seen,
                [("", 401), ("", 401), ("grafana", 403), ("ops-admin", 200)],
                "{action}"
            );
            for e in four {
                assert_eq!(e["action"], action);
                assert_eq!(e["method"], method);
                assert_eq!(e["path"], path);
                assert!(e["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{e}");
                assert!(e["time"].as_i64().unwrap() > 1_700_000_000, "{e}");
            }
            let done = four[3];
            if action != "config.reload" {
                assert_eq!(done["hosts"], json!(["web-1"]), "{done}");
                assert_eq!(done["hostCount"], 1, "{done}");
                assert_eq!(done["target"], "host web-1", "{done}");
            }
            let outcome = done["outcome"].as_str().unwrap();
            let want = match action {
                "jobs.create" => "restart 1 job(s) queued as batch",
                "retry" => "failure(s) and hold(s) cleared",
                _ => "config reloaded: 0 agent(s)",
            };
            assert!(outcome.contains(want), "{action}: {outcome}");
            assert_eq!(
                four[2]["outcome"],
                "API token \"grafana\" has role read; this needs an admin token"
            );
        }
    };
    check(&m.audit(Some(READER)));
    let page: Value = serde_json::from_str(
        &m.json("GET", "/api/audit?limit=2", Some(ADMIN), &Value::Null)
            .body,
    )
    .unwrap();
    assert_eq!(page["entries"].as_array().unwrap().len(), 2);
    let last = page["entries"][1]["id"].as_i64().unwrap();
    let rest: Value = serde_json::from_str(
        &m.json(
            "GET",
            &format!("/api/audit?before={last}&limit=1000"),
            Some(ADMIN),
            &Value::Null,
        )
        .body,
    )
    .unwrap();
    assert_eq!(rest["entries"].as_array().unwrap().len(), 11);
    assert_eq!(
        m.json("GET", "/api/audit?limit=0", Some(ADMIN), &Value::Null)
            .status,
        400
    );
    assert_eq!(
        m.json("GET", "/api/audit?page=2", Some(ADMIN), &Value::Null)
            .status,
        400
    );

    // Durable: the same log after a restart on the same SQLite file.
    m.stop();
    m.spawn();
    check(&m.audit(Some(READER)));
    let log = m.log();
    assert!(
        !log.contains(ADMIN) && !log.contains(READER),
        "a token was logged"
    );
    assert!(!log.contains("no apiTokens configured"), "{log}");
}

#[test]
fn tokens_are_rotated_by_reload() {
    let dir = test_support::tempdir().unwrap();
    let old = "old-admin-token";
    let new = "new-admin-token";
    let m = Meta::start(dir.path(), "memory", json!([token("deploy", "admin", old)]));
    let reload = |t: &str| m.json("GET", "/config/reload", Some(t), &Value::Null);
    assert_eq!(reload(new).status, 401);
    // Add the new token beside the old one, reload, switch clients, remove the old one.
    m.write_cfg(
        "memory",
        json!([
            token("deploy", "admin", old),
            token("deploy-2", "admin", new)
        ]),
    );
    assert_eq!(reload(old).status, 200);
    assert_eq!(reload(new).status, 200);
    m.write_cfg("memory", json!([token("deploy-2", "admin", new)]));
    assert_eq!(reload(new).status, 200);
    assert_eq!(reload(old).status, 401);
    let actors: Vec<String> = m
        .audit(Some(new))
        .iter()
        .map(|e| format!("{} {}", e["actor"].as_str().unwrap(), e["status"]))
        .collect();
    assert_eq!(
        actors,
        [" 401", "deploy-2 200", "deploy-2 200", "deploy 200", " 401"]
    );
    // A reload that would drop every token warns that loopback callers are let in.
    m.write_cfg("memory", json!([]));
    assert_eq!(reload(new).status, 200);
    assert_eq!(
        m.json("GET", "/api/hosts", None, &Value::Null).status,
        200,
        "no tokens: loopback callers again"
    );
    test_support::wait_for("the warning", WAIT, || {
        m.log().contains("no apiTokens configured")
    });
}

#[test]
fn without_tokens_only_loopback_json_calls_pass() {
    let dir = test_support::tempdir().unwrap();
    let m = Meta::start(dir.path(), "memory", json!([]));
    test_support::wait_for("the warning", WAIT, || {
        m.log().contains("no apiTokens configured")
    });
    m.register("web-1");
    let job = json!({"action": "restart", "name": "basic", "hosts": ["web-1"]}).to_string();
    let json_ct = ("Content-Type", "application/json");

    let refused = [
        (
            vec![json_ct, ("Origin", "http://evil.example")],
            403,
            "Origin not loopback",
        ),
        (
            vec![json_ct, ("Origin", "null")],
            403,
            "Origin not loopback",
        ),
        (
            vec![json_ct, ("Host", "evil.example")],
            403,
            "Host is not a loopback name",
        ),
        (
            vec![json_ct, ("Host", "rebind.example:80")],
            403,
            "Host is not a loopback name",
        ),
        (
            vec![("Content-Type", "text/plain")],
            415,
            "application/json",
        ),
        (
            vec![("Content-Type", "application/x-www-form-urlencoded")],
            415,
            "application/json",
        ),
        (vec![], 415, "application/json"),
    ];
    for (headers, status, text) in &refused {
        let a = m.call("POST", "/api/jobs", headers, &job);
        assert_eq!(a.status, *status, "{headers:?}: {}", a.body);
        assert!(a.body.contains(text), "{headers:?}: {}", a.body);
    }
    // A page cannot read either (DNS rebinding, a foreign page).
    let a = m.call("GET", "/api/hosts", &[("Host", "evil.example")], "");
    assert_eq!(a.status, 403, "{}", a.body);
    let a = m.call(
        "GET",
        "/config/reload",
        &[("Origin", "https://evil.example")],
        "",
    );
    assert_eq!(a.status, 403, "{}", a.body);

    // Plain loopback calls work: curl's Host, a loopback Origin, JSON.
    let port = m.addr.port();
    let own = format!("localhost:{port}");
    let origin = format!("http://127.0.0.1:{port}");
    for headers in [
        vec![json_ct],
        vec![
            ("Content-Type", "application/json; charset=utf-8"),
            ("Host", own.as_str()),
        ],
        vec![json_ct, ("Origin", origin.as_str()), ("Host", "[::1]")],
    ] {
        let a = m.call("POST", "/api/jobs", &headers, &job);
        assert_eq!(a.status, 200, "{headers:?}: {}", a.body);
    }
    assert_eq!(m.call("GET", "/config/reload", &[], "").status, 200);
    assert_eq!(m.call("GET", "/api/hosts", &[], "").status, 200);

    let entries = m.audit(None);
    let got: Vec<(String, u64)> = entries
        .iter()
        .rev()
        .map(|e| {
            (
                e["actor"].as_str().unwrap().to_string(),
                e["status"].as_u64().unwrap(),
            )
        })
        .collect();
    let mut want: Vec<(String, u64)> = refused
        .iter()
        .map(|(_, s, _)| (String::new(), *s as u64))
        .collect();
    want.push((String::new(), 403));
    for _ in 0..4 {
        want.push(("loopback".into(), 200));
    }
    assert_eq!(got, want, "{entries:#?}");
    assert_eq!(entries[0]["action"], "config.reload");
    assert_eq!(entries[1]["hosts"], json!(["web-1"]));
}

#[test]
fn a_bad_api_tokens_section_lists_every_problem() {
    let dir = test_support::tempdir().unwrap();
    let cfg = json!({
        "tarballDir": "",
        "http": {"enabled": true, "listen": "127.0.0.1:0"},
        "agents": [],
        "apiTokens": [
            {"name": "ci", "role": "owner", "sha256": sha("a")},
            {"name": "ci", "role": "read", "sha256": "abc"},
            {"name": "x", "role": "admin", "token": "pasted-secret"},
        ],
    });
    test_support::write_file(dir.path(), "cfg.json", cfg.to_string());
    let out = test_support::command(Path::new(BIN))
        .args(["-T", "-c", "cfg.json"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "apiTokens[0].role: \"owner\" is not admin or read",
        "apiTokens[1].name: \"ci\" is also the name of another token",
        "apiTokens[1].sha256: is 3 characters, not 64 hexadecimal digits",
        "apiTokens[2].token: unknown key",
        "apiTokens[2].sha256: is missing",
    ] {
        assert!(text.contains(want), "no {want:?} in {text}");
    }
    assert!(!text.contains("pasted-secret"), "{text}");
}

/// The memory store, but its audit log fails while `broken` is set.
#[derive(Debug, Default)]
struct AuditFails {
    inner: meta::persist::memory::Memory,
    broken: std::sync::atomic::AtomicBool,
}

mod audit_fails {
    use super::AuditFails;
    use meta::persist::{
        AuditRow, BatchRow, BootRow, BootUpdate, Changes, Cursor, Durable, LegacyRow, LegacySink,
        Snapshot, StoreError, StoreFuture,
    };
    use proto::events::Event;
    use std::sync::atomic::Ordering;

    fn failed<T: Send + 'static>() -> StoreFuture<'static, T> {
        Box::pin(async {
            Err(StoreError::Other {
                store: "test".into(),
                what: "write an audit entry",
                message: "disk full".into(),
            })
        })
    }

    impl Durable for AuditFails {
        fn kind(&self) -> &'static str {
            "memory"
        }
        fn shared(&self) -> bool {
            false
        }
        fn load(&self, legacy: LegacySink) -> StoreFuture<'_, Snapshot> {
            self.inner.load(legacy)
        }
        fn put_legacy(&self, rows: Vec<LegacyRow>) -> StoreFuture<'_, ()> {
            self.inner.put_legacy(rows)
        }
        fn update_boot(&self, hostname: &str, update: BootUpdate) -> StoreFuture<'_, ()> {
            self.inner.update_boot(hostname, update)
        }
        fn touch_boot(&self, seen: Vec<(String, i64)>) -> StoreFuture<'_, ()> {
            self.inner.touch_boot(seen)
        }
        fn boot_hosts(&self, hostnames: &[String]) -> StoreFuture<'_, Vec<BootRow>> {
            self.inner.boot_hosts(hostnames)
        }
        fn put_events(&self, hostname: &str, events: &[Event]) -> StoreFuture<'_, ()> {
            self.inner.put_events(hostname, events)
        }
        fn put_batch(&self, row: BatchRow) -> StoreFuture<'_, ()> {
            self.inner.put_batch(row)
        }
        fn batch(&self, id: &str) -> StoreFuture<'_, Option<BatchRow>> {
            self.inner.batch(id)
        }
        fn put_audit(&self, row: AuditRow) -> StoreFuture<'_, i64> {
            if self.broken.load(Ordering::SeqCst) {
                return failed();
            }
            self.inner.put_audit(row)
        }
        fn finish_audit(&self, row: AuditRow) -> StoreFuture<'_, ()> {
            self.inner.finish_audit(row)
        }
        fn audit(&self, before: Option<i64>, limit: usize) -> StoreFuture<'_, Vec<AuditRow>> {
            self.inner.audit(before, limit)
        }
        fn changes(&self, since: Cursor) -> StoreFuture<'_, Changes> {
            self.inner.changes(since)
        }
        fn sweep(&self, older_than: i64) -> StoreFuture<'_, u64> {
            self.inner.sweep(older_than)
        }
        fn put_rollout(
            &self,
            row: meta::persist::RolloutRow,
            hosts: Vec<meta::persist::RolloutHostRow>,
        ) -> StoreFuture<'_, bool> {
            self.inner.put_rollout(row, hosts)
        }
        fn rollout_revs(&self) -> StoreFuture<'_, Vec<(String, i64)>> {
            self.inner.rollout_revs()
        }
        fn rollouts(
            &self,
            ids: Option<Vec<String>>,
        ) -> StoreFuture<'_, Vec<meta::persist::RolloutRecord>> {
            self.inner.rollouts(ids)
        }
    }
}

#[tokio::test]
async fn an_action_the_audit_log_cannot_take_is_not_done() {
    use axum::body::Body;
    use axum::extract::ConnectInfo;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use tower::ServiceExt;

    let dir = test_support::tempdir().unwrap();
    let cfg = json!({"tarballDir": "", "http": {"enabled": true, "listen": "127.0.0.1:0"},
                     "agents": [], "apiTokens": [token("ops-admin", "admin", ADMIN)]});
    let path = test_support::write_file(dir.path(), "cfg.json", cfg.to_string());
    let config = meta::config::load(&path).unwrap().config;
    let durable = Arc::new(AuditFails::default());
    let st = meta::AppState::with_durable(
        &path,
        config,
        Arc::new(meta::MemStore::new()),
        durable.clone(),
    );
    let call = |method: &str, uri: &str, body: &str| {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {ADMIN}"))
            .body(Body::from(body.to_string()))
            .unwrap();
        req.extensions_mut()
            .insert(ConnectInfo("10.1.2.3:4000".parse::<SocketAddr>().unwrap()));
        let app = meta::app(st.clone());
        async move {
            let r = app.oneshot(req).await.unwrap();
            let code = r.status().as_u16();
            let body = r.into_body().collect().await.unwrap().to_bytes();
            (code, String::from_utf8_lossy(&body).into_owned())
        }
    };
    let (code, text) = call(
        "POST",
        "/agent/register",
        r#"{"hostname": "web-1", "agentsn": ""}"#,
    )
    .await;
    assert_eq!(code, 200, "{text}");
    let job = r#"{"action": "restart", "name": "basic", "hosts": ["web-1"]}"#;

    durable.broken.store(true, Ordering::SeqCst);
    let (code, text) = call("POST", "/api/jobs", job).await;
    assert_eq!(code, 503, "{text}");
    assert_eq!(text, "the fleet store is unavailable; retry later\n");
    let (_, view) = call("GET", "/api/hosts/web-1", "").await;
    let view: Value = serde_json::from_str(&view).unwrap();
    assert_eq!(view["pending"], json!([]), "nothing was queued: {view}");

    durable.broken.store(false, Ordering::SeqCst);
    let (code, text) = call("POST", "/api/jobs", job).await;
    assert_eq!(code, 200, "{text}");
    let (_, view) = call("GET", "/api/hosts/web-1", "").await;
    let view: Value = serde_json::from_str(&view).unwrap();
    assert_eq!(view["pending"].as_array().unwrap().len(), 1, "{view}");
    let (_, audit) = call("GET", "/api/audit", "").await;
    let audit: Value = serde_json::from_str(&audit).unwrap();
    let entries = audit["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{audit}");
    assert_eq!(
        entries[0]["peer"], "10.1.2.3:4000",
        "tokens work from any address"
    );
    assert_eq!(entries[0]["status"], 200);
}
