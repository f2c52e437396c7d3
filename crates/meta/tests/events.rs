//! Agent events end to end: the real `ops-meta` binary on 127.0.0.1 (ephemeral port) fed
//! BootAgent status reports and legacy heartbeats that carry `events`, read back through
//! `GET /api/hosts` and `GET /api/hosts/NAME`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use proto::bootagent::{AgentStatus, RegisterRequest, RegisterResponse, StatusRequest, STATUS_OK};
use proto::events::{
    Event, KIND_EXITED, KIND_FATAL, KIND_RESTARTED, MAX_EVENTS_PER_REPORT, MAX_EVENT_CAUSE_LEN,
    MAX_EVENT_LINE_LEN, MAX_EVENT_OUTPUT_LINES,
};
use proto::legacy::{HeartbeatReport, HeartbeatRequest, RealAgent};
use proto::ops::{HostView, HostsResponse, PROTOCOL_LEGACY};
use test_support::{command, KillOnDrop, TempDir};

const WAIT: Duration = Duration::from_secs(20);

const AGENTS: &str = r#"[{"default": {"name": "falcon-agent", "version": "1.0.0",
    "tarball": "http://127.0.0.1:9/pkgs/", "md5": "", "cmd": "start"}}]"#;

struct Meta {
    _child: KillOnDrop,
    _dir: TempDir,
    base: String,
    http: reqwest::Client,
    /// The credential each registered host was given, sent with its reports.
    creds: std::sync::Mutex<std::collections::HashMap<String, String>>,
}

impl Meta {
    fn start() -> Meta {
        let dir = test_support::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("tarball")).unwrap();
        let port = test_support::free_port();
        let cfg = dir.path().join("cfg.json");
        std::fs::write(
            &cfg,
            format!(
                r#"{{"tarballDir": {tb:?}, "http": {{"enabled": true, "listen": "127.0.0.1:{port}"}},
                    "agents": {AGENTS}}}"#,
                tb = dir.path().join("tarball").display().to_string()
            ),
        )
        .unwrap();
        let mut cmd = command(Path::new(env!("CARGO_BIN_EXE_ops-meta")));
        // The default store (`sqlite:ops-meta.db`) goes to the test's folder.
        cmd.arg("-c")
            .arg(&cfg)
            .current_dir(dir.path())
            .env("RUST_LOG", "warn");
        let child = KillOnDrop(cmd.spawn().expect("start ops-meta"));
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        test_support::wait_listening(addr, WAIT);
        Meta {
            _child: child,
            _dir: dir,
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
            creds: Default::default(),
        }
    }

    /// POSTs `body`, with the credential of the host it names when one was registered.
    async fn post(&self, path: &str, body: &impl serde::Serialize) -> (u16, String) {
        let body = serde_json::to_value(body).unwrap();
        let mut r = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&body).unwrap());
        let host = body["hostname"].as_str().unwrap_or_default();
        if let Some(c) = self.creds.lock().unwrap().get(host) {
            r = r.bearer_auth(c);
        }
        let r = r.send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    async fn host(&self, name: &str) -> HostView {
        let (code, text) = self.get(&format!("/api/hosts/{name}")).await;
        assert_eq!(code, 200, "GET /api/hosts/{name}: {text}");
        serde_json::from_str(&text).unwrap()
    }

    async fn register(&self, host: &str) -> String {
        let (code, text) = self
            .post(
                "/agent/register",
                &RegisterRequest {
                    hostname: host.into(),
                    ..Default::default()
                },
            )
            .await;
        assert_eq!(code, 200, "register: {text}");
        let r = serde_json::from_str::<RegisterResponse>(&text).unwrap();
        self.creds
            .lock()
            .unwrap()
            .insert(host.to_string(), r.credential);
        r.agentsn
    }
}

fn event(seq: u64, kind: &str, cause: &str) -> Event {
    Event {
        seq,
        time: 1_700_000_000 + seq as i64,
        agent: "falcon-agent".into(),
        version: "1.0.0".into(),
        kind: kind.into(),
        cause: cause.into(),
        output: vec!["panic: out of cheese".into()],
        state: "running".into(),
        restarts: 1,
    }
}

fn report(host: &str, sn: &str, events: Vec<Event>) -> StatusRequest {
    StatusRequest {
        hostname: host.into(),
        agentsn: sn.into(),
        version: "bootagent-1.2.4-x86_64".into(),
        uptime: 10,
        timestamp: 1_700_000_000,
        step: 600,
        agents: vec![AgentStatus {
            name: "falcon-agent".into(),
            version: "1.0.0".into(),
            status: "running".into(),
            uptime: 5,
        }],
        jobs: vec![],
        events,
        supervised: false,
    }
}

fn seqs(v: &HostView) -> Vec<u64> {
    v.events.iter().map(|e| e.seq).collect()
}

#[tokio::test]
async fn bootagent_events_show_on_the_host_once_each_newest_last() {
    let m = Meta::start();
    let sn = m.register("web-01").await;
    let sent = vec![
        event(41, KIND_EXITED, "exit code 3"),
        event(42, KIND_RESTARTED, ""),
    ];
    let (code, text) = m
        .post("/agent/status", &report("web-01", &sn, sent.clone()))
        .await;
    assert_eq!(code, 200, "{text}");
    // The answer was lost: the host sends the same events again, with a new one.
    let mut again = sent.clone();
    again.push(event(43, KIND_FATAL, "gave up after 4 failures"));
    let (code, _) = m
        .post("/agent/status", &report("web-01", &sn, again.clone()))
        .await;
    assert_eq!(code, 200);
    let v = m.host("web-01").await;
    assert_eq!(v.protocol, "bootagent");
    assert_eq!(v.agents[0].name, "falcon-agent");
    assert_eq!(v.agents[0].status, "running");
    assert_eq!(seqs(&v), [41, 42, 43], "not doubled, newest last");
    assert_eq!(v.events, again);
    assert_eq!(v.event_count, 3);
    assert_eq!(v.last_event.as_ref().map(|e| e.seq), Some(43));
    // The list shows the count and the last event, not every event.
    let (code, text) = m.get("/api/hosts").await;
    assert_eq!(code, 200);
    let list: HostsResponse = serde_json::from_str(&text).unwrap();
    let h = list.hosts.iter().find(|h| h.hostname == "web-01").unwrap();
    assert_eq!(h.event_count, 3);
    assert_eq!(h.last_event.as_ref().unwrap().kind, KIND_FATAL);
    assert!(h.events.is_empty());
    // A report without events changes nothing.
    let (code, _) = m
        .post("/agent/status", &report("web-01", &sn, vec![]))
        .await;
    assert_eq!(code, 200);
    assert_eq!(m.host("web-01").await.event_count, 3);
}

#[tokio::test]
async fn legacy_heartbeat_events_show_on_the_host_and_the_answer_is_unchanged() {
    let m = Meta::start();
    let req = HeartbeatRequest {
        hostname: "old-01".into(),
        real_agents: vec![RealAgent {
            name: "falcon-agent".into(),
            version: "1.0.0".into(),
            status: "started".into(),
            timestamp: 1_700_000_000,
        }],
    };
    let (code, plain) = m.post("/heartbeat", &req).await;
    assert_eq!(code, 200, "{plain}");
    let want: serde_json::Value = serde_json::json!({"errorMessage": "", "desiredAgents": [
        {"name": "falcon-agent", "version": "1.0.0", "tarball": "http://127.0.0.1:9/pkgs/",
         "md5": "", "cmd": "start"}]});
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&plain).unwrap(),
        want,
        "the original answer"
    );
    let v = m.host("old-01").await;
    assert_eq!(v.protocol, PROTOCOL_LEGACY);
    assert!(v.events.is_empty() && v.event_count == 0);
    assert!(v.last_seen > 0);

    let events = [event(7, KIND_EXITED, "exit code 1")];
    let with = HeartbeatReport {
        request: &req,
        events: &events,
    };
    let (code, answer) = m.post("/heartbeat", &with).await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer, plain, "events change nothing of the answer");
    let (code, _) = m.post("/heartbeat", &with).await;
    assert_eq!(code, 200);
    let v = m.host("old-01").await;
    assert_eq!(v.agents.len(), 1);
    assert_eq!(
        (v.agents[0].version.as_str(), v.agents[0].status.as_str()),
        ("1.0.0", "started")
    );
    assert_eq!(v.events, events, "once, although sent twice");
    // And in the list of every host, with its protocol, agents and events.
    let (code, text) = m.get("/api/hosts").await;
    assert_eq!(code, 200, "{text}");
    let list: serde_json::Value = serde_json::from_str(&text).unwrap();
    let old = list["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["hostname"] == "old-01")
        .unwrap_or_else(|| panic!("old-01 in /api/hosts: {text}"));
    assert_eq!(old["protocol"], PROTOCOL_LEGACY, "{old}");
    assert_eq!(old["agents"][0]["status"], "started", "{old}");
    assert_eq!(old["event_count"], 1, "{old}");
    let (_, none) = m.get("/api/hosts?prefix=web").await;
    assert!(!none.contains("old-01"), "{none}");
    // An original-shape heartbeat after that still gets the same bytes.
    assert_eq!(m.post("/heartbeat", &req).await, (200, plain));
}

#[tokio::test]
async fn oversized_fields_are_cut_and_too_many_events_refuse_the_report() {
    let m = Meta::start();
    let sn = m.register("web-02").await;
    let huge = Event {
        agent: "a".repeat(1000),
        cause: format!("{}\nforged line", "c".repeat(10_000)),
        output: (0..50)
            .map(|i| format!("{i} {}", "o".repeat(1000)))
            .collect(),
        kind: "k".repeat(1000),
        ..event(1, KIND_EXITED, "")
    };
    let (code, text) = m
        .post("/agent/status", &report("web-02", &sn, vec![huge]))
        .await;
    assert_eq!(code, 200, "{text}");
    let v = m.host("web-02").await;
    let e = &v.events[0];
    assert_eq!(e.cause.len(), MAX_EVENT_CAUSE_LEN);
    assert!(!e.cause.contains('\n'));
    assert_eq!(e.output.len(), MAX_EVENT_OUTPUT_LINES);
    assert!(
        e.output[0].starts_with("40 "),
        "the last lines: {}",
        &e.output[0][..8]
    );
    assert!(e.output.iter().all(|l| l.len() <= MAX_EVENT_LINE_LEN));
    assert_eq!(e.agent.len(), proto::validate::MAX_NAME_LEN);
    assert!(e.kind.len() <= proto::events::MAX_EVENT_KIND_LEN);

    let many: Vec<Event> = (100..100 + MAX_EVENTS_PER_REPORT as u64 + 1)
        .map(|s| event(s, KIND_EXITED, "x"))
        .collect();
    let (code, text) = m
        .post("/agent/status", &report("web-02", &sn, many.clone()))
        .await;
    assert_eq!(code, 400);
    assert!(
        text.contains("too many events in one report: 33, the limit is 32"),
        "{text}"
    );
    let req = HeartbeatRequest {
        hostname: "old-02".into(),
        real_agents: vec![],
    };
    let (code, text) = m
        .post(
            "/heartbeat",
            &HeartbeatReport {
                request: &req,
                events: &many,
            },
        )
        .await;
    assert_eq!(code, 400);
    assert!(text.contains("too many events"), "{text}");
    assert_eq!(m.host("web-02").await.event_count, 1, "nothing of it kept");
    assert_eq!(
        m.get("/api/hosts/old-02").await.0,
        404,
        "the heartbeat was refused whole"
    );
    // Exactly the limit is taken.
    let (code, _) = m
        .post(
            "/agent/status",
            &report("web-02", &sn, many[..MAX_EVENTS_PER_REPORT].to_vec()),
        )
        .await;
    assert_eq!(code, 200);
    assert_eq!(
        m.host("web-02").await.event_count,
        1 + MAX_EVENTS_PER_REPORT
    );
}

#[tokio::test]
async fn unknown_and_bad_host_names() {
    let m = Meta::start();
    let (code, text) = m.get("/api/hosts/nobody-01").await;
    assert_eq!(code, 404);
    assert!(text.contains("no host named \"nobody-01\""), "{text}");
    let (code, text) = m.get("/api/hosts/.hidden").await;
    assert_eq!(code, 400);
    assert!(text.contains("invalid hostname"), "{text}");
    // A refused status report (no serial) keeps no event.
    let (code, text) = m
        .post(
            "/agent/status",
            &report("web-03", "", vec![event(1, KIND_EXITED, "")]),
        )
        .await;
    assert_eq!(code, 200);
    assert_ne!(
        serde_json::from_str::<proto::bootagent::StatusResponse>(&text)
            .unwrap()
            .status,
        STATUS_OK
    );
    assert_eq!(m.get("/api/hosts/web-03").await.0, 404);
}
