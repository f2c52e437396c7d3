//! `GET /metrics` of the real `ops-meta` binary, read with an independent parser of the
//! Prometheus text format (`prometheus-parse`): legacy heartbeats and BootAgent reports
//! show up as hosts by protocol, agent, version and state, every request is counted by
//! endpoint kind and status class, a refused request as an error of its kind, and the
//! BootAgent jobs by action and result.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use prometheus_parse::{Sample, Scrape, Value};
use proto::bootagent::{
    AgentStatus, JobResult, RegisterRequest, RegisterResponse, StatusRequest, StatusResponse,
};
use serde_json::json;
use test_support::{command, KillOnDrop, TempDir};

const WAIT: Duration = Duration::from_secs(20);

struct Meta {
    _child: KillOnDrop,
    _dir: TempDir,
    base: String,
    http: reqwest::Client,
}

impl Meta {
    /// `ops-meta` with agent `a` wanted at 2.0 on every host (a BootAgent host reporting
    /// 1.0 gets an upgrade job).
    fn start() -> Meta {
        let dir = test_support::tempdir().unwrap();
        let tarballs = dir.path().join("tarball");
        std::fs::create_dir_all(&tarballs).unwrap();
        let t =
            test_support::agent::agent_tarball("a", "2.0", test_support::agent::Behaviour::Good);
        test_support::tarball::publish(&tarballs, "a", "2.0", &t);
        let port = test_support::free_port();
        let cfg = json!({
            "tarballDir": tarballs.display().to_string(),
            "http": {"enabled": true, "listen": format!("127.0.0.1:{port}")},
            "shaRecheckSecs": 1,
            "agents": [{"default": {"name": "a", "version": "2.0",
                "tarball": format!("http://127.0.0.1:{port}/"), "md5": "", "cmd": "start"}}],
        });
        std::fs::write(dir.path().join("cfg.json"), cfg.to_string()).unwrap();
        let child = command(Path::new(env!("CARGO_BIN_EXE_ops-meta")))
            .args(["-c", "cfg.json"])
            .current_dir(dir.path())
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("start ops-meta");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        test_support::wait_listening(addr, WAIT);
        Meta {
            _child: KillOnDrop(child),
            _dir: dir,
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
        }
    }

    async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, String) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    async fn heartbeat(&self, host: &str, agents: &[(&str, &str, &str)]) {
        let agents: Vec<_> = agents
            .iter()
            .map(|(n, v, s)| json!({"name": n, "version": v, "status": s, "timestamp": 1}))
            .collect();
        let body = json!({"hostname": host, "realAgents": agents}).to_string();
        let (code, text) = self.post("/heartbeat", body).await;
        assert_eq!(code, 200, "heartbeat: {text}");
    }

    /// A status report with the host's credential.
    async fn boot_status(&self, req: &StatusRequest, credential: &str) -> StatusResponse {
        let r = self
            .http
            .post(format!("{}/agent/status", self.base))
            .header("content-type", "application/json")
            .bearer_auth(credential)
            .body(serde_json::to_vec(req).unwrap())
            .send()
            .await
            .unwrap();
        let (code, text) = (r.status().as_u16(), r.text().await.unwrap());
        assert_eq!(code, 200, "status: {text}");
        serde_json::from_str(&text).unwrap()
    }

    /// `/metrics`, checked to be the text format and parsed.
    async fn scrape(&self) -> Scrape {
        let r = self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let ct = r.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
        let text = r.text().await.unwrap();
        // Every line is a comment or a sample the parser takes: none is silently skipped.
        let samples = text.lines().filter(|l| !l.starts_with('#')).count();
        let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
        assert_eq!(scrape.samples.len(), samples, "{text}");
        scrape
    }
}

fn report(
    host: &str,
    sn: &str,
    agents: &[(&str, &str, &str)],
    jobs: Vec<JobResult>,
) -> StatusRequest {
    StatusRequest {
        hostname: host.into(),
        agentsn: sn.into(),
        version: "bootagent-1.2.4-x86_64".into(),
        uptime: 1,
        timestamp: 1_700_000_000,
        step: 600,
        agents: agents
            .iter()
            .map(|(n, v, s)| AgentStatus {
                name: n.to_string(),
                version: v.to_string(),
                status: s.to_string(),
                uptime: 1,
            })
            .collect(),
        jobs,
        supervised: false,
        events: Vec::new(),
    }
}

/// The value of the sample `name` whose labels include every one of `labels`.
fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let found: Vec<&Sample> = s
        .samples
        .iter()
        .filter(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .collect();
    assert!(
        found.len() <= 1 || labels.is_empty(),
        "{name} {labels:?}: {found:?}"
    );
    found.first().map(|x| match x.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
        _ => panic!("{name}: not a single value"),
    })
}

fn counter(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let x = s
        .samples
        .iter()
        .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .unwrap_or_else(|| panic!("no {name} {labels:?}"));
    match x.value {
        Value::Counter(v) => v,
        ref v => panic!("{name} is not a counter: {v:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_hosts_requests_errors_and_jobs() {
    let m = Meta::start();
    let first = m.scrape().await;
    // The names the hand-written page had are all still there.
    for name in [
        "ops_meta_store_info",
        "ops_meta_store_queue_hosts",
        "ops_meta_store_write_lag_seconds",
        "ops_meta_store_rows_written_total",
        "ops_meta_store_write_failures_total",
        "ops_meta_store_seen_queue_hosts",
        "ops_meta_store_seen_written_total",
        "ops_meta_bootagent_reports_total",
        "ops_meta_hosts",
        "ops_meta_bootagent_hosts",
        "ops_meta_connections_open",
        "ops_meta_connections_max",
        "ops_meta_connections_saturated_total",
    ] {
        assert!(value(&first, name, &[]).is_some(), "{name} missing");
    }
    assert_eq!(
        value(&first, "ops_meta_store_info", &[("backend", "sqlite")]),
        Some(1.0)
    );
    assert_eq!(value(&first, "ops_meta_hosts", &[]), Some(0.0));
    assert_eq!(
        counter(&first, "ops_meta_store_rows_written_total", &[]),
        0.0
    );

    // Legacy hosts: two started at 1.0, a stopped one in each spelling, one with an error
    // text for a status (versions are checked by the heartbeat; statuses are free text).
    m.heartbeat("web-1", &[("a", "1.0", "started")]).await;
    m.heartbeat("web-2", &[("a", "1.0", "started"), ("b", "3", "stoped")])
        .await;
    m.heartbeat("web-3", &[("a", "0.9", "exec format error")])
        .await;
    m.heartbeat("web-4", &[("a", "1.0", "stopped")]).await;
    // Two refused heartbeats: not JSON, and no hostname.
    assert_eq!(m.post("/heartbeat", "{nope").await.0, 400);
    assert_eq!(m.post("/heartbeat", r#"{"realAgents": []}"#).await.0, 400);

    // A BootAgent host on a's 1.0 (running) gets an upgrade job to 2.0 and fails it.
    let (code, text) = m
        .post(
            "/agent/register",
            serde_json::to_vec(&RegisterRequest {
                hostname: "boot-1".into(),
                agentsn: String::new(),
                enrollment_secret: String::new(),
            })
            .unwrap(),
        )
        .await;
    assert_eq!(code, 200, "{text}");
    let registered = serde_json::from_str::<RegisterResponse>(&text).unwrap();
    let (sn, credential) = (registered.agentsn, registered.credential);
    let agents = [("a", "1.0", "running")];
    let deadline = Instant::now() + WAIT;
    let job = loop {
        let r = m
            .boot_status(&report("boot-1", &sn, &agents, vec![]), &credential)
            .await;
        if let Some(j) = r.jobs.into_iter().next() {
            break j;
        }
        assert!(Instant::now() < deadline, "no job came");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let pending = m.scrape().await;
    assert_eq!(
        value(
            &pending,
            "ops_meta_bootagent_jobs_pending",
            &[("action", "upgrade")]
        ),
        Some(1.0)
    );
    let failed = JobResult {
        id: job.id.clone(),
        errcode: 2,
        message: "download failed".into(),
    };
    m.boot_status(&report("boot-1", &sn, &agents, vec![failed]), &credential)
        .await;

    let s = m.scrape().await;
    let hosts = |labels: &[(&str, &str)]| value(&s, "ops_meta_agent_hosts", labels);
    let legacy_a = |version: &str, state: &str| {
        hosts(&[
            ("protocol", "legacy"),
            ("agent", "a"),
            ("version", version),
            ("state", state),
        ])
    };
    assert_eq!(legacy_a("1.0", "started"), Some(2.0));
    assert_eq!(legacy_a("0.9", "other"), Some(1.0));
    assert_eq!(legacy_a("1.0", "stoped"), Some(1.0));
    assert_eq!(
        hosts(&[
            ("protocol", "legacy"),
            ("agent", "b"),
            ("version", "3"),
            ("state", "stoped")
        ]),
        Some(1.0)
    );
    assert_eq!(
        hosts(&[
            ("protocol", "bootagent"),
            ("agent", "a"),
            ("version", "1.0"),
            ("state", "running")
        ]),
        Some(1.0)
    );
    // Every host in the fleet store: BootAgent hosts are there too.
    assert_eq!(value(&s, "ops_meta_hosts", &[]), Some(5.0));
    assert_eq!(value(&s, "ops_meta_bootagent_hosts", &[]), Some(1.0));
    // Counts are written as integers (scripts such as bench/store read them with awk).
    let text = m
        .http
        .get(format!("{}/metrics", m.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.lines().any(|l| l == "ops_meta_hosts 5"), "{text}");
    assert!(
        text.lines().any(|l| l == "ops_meta_bootagent_hosts 1"),
        "{text}"
    );

    let req = |endpoint: &str, code: &str| {
        counter(
            &s,
            "ops_meta_requests_total",
            &[("endpoint", endpoint), ("code", code)],
        )
    };
    assert_eq!(req("heartbeat", "2xx"), 4.0);
    assert_eq!(req("heartbeat", "4xx"), 2.0);
    assert_eq!(
        counter(
            &s,
            "ops_meta_request_errors_total",
            &[("endpoint", "heartbeat"), ("kind", "bad_request")]
        ),
        2.0
    );
    assert_eq!(req("bootagent_register", "2xx"), 1.0);
    assert!(req("bootagent_status", "2xx") >= 2.0);
    // The scrapes before this one (the one being answered is counted after its answer).
    assert_eq!(req("other", "2xx"), 2.0);
    assert_eq!(
        counter(
            &s,
            "ops_meta_bootagent_jobs_queued_total",
            &[("action", "upgrade"), ("origin", "derived")]
        ),
        1.0
    );
    assert_eq!(
        counter(
            &s,
            "ops_meta_bootagent_jobs_finished_total",
            &[("action", "upgrade"), ("result", "failed")]
        ),
        1.0
    );
    assert_eq!(
        counter(
            &s,
            "ops_meta_bootagent_jobs_finished_total",
            &[("action", "upgrade"), ("result", "ok")]
        ),
        0.0
    );
    assert_eq!(
        value(
            &s,
            "ops_meta_bootagent_jobs_pending",
            &[("action", "upgrade")]
        ),
        Some(0.0)
    );
    // A path that serves nothing: counted as a files request answered 404.
    assert_eq!(
        counter(
            &s,
            "ops_meta_request_errors_total",
            &[("endpoint", "files"), ("kind", "not_found")]
        ),
        0.0
    );
    assert_eq!(
        m.http
            .get(format!("{}/nothing/here.tar.gz", m.base))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    let s = m.scrape().await;
    assert_eq!(
        counter(
            &s,
            "ops_meta_request_errors_total",
            &[("endpoint", "files"), ("kind", "not_found")]
        ),
        1.0
    );
    // The write-behind queue wrote the legacy hosts' rows.
    let deadline = Instant::now() + WAIT;
    loop {
        let s = m.scrape().await;
        if counter(&s, "ops_meta_store_rows_written_total", &[]) >= 4.0 {
            assert_eq!(value(&s, "ops_meta_store_queue_hosts", &[]), Some(0.0));
            break;
        }
        assert!(Instant::now() < deadline, "rows never written");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
