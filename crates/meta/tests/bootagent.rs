//! End-to-end tests of the BootAgent protocol and the operator API: the real `ops-meta`
//! binary on 127.0.0.1 (ephemeral port), a real config file and tarball folder, driven over
//! HTTP with reqwest as BootAgent hosts and an operator would.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proto::bootagent::{
    parse_checksum, Action, AgentStatus, Job, JobResult, RegisterRequest, RegisterResponse,
    StatusRequest, StatusResponse, STATUS_OK, STATUS_SERIAL_CONFLICT, STATUS_UNREGISTERED,
};
use proto::ops::{BatchStatus, HostView, HostsResponse, JobsResponse};
use serde_json::{json, Value};
use test_support::{command, KillOnDrop, TempDir};

const WAIT: Duration = Duration::from_secs(20);

struct Meta {
    _child: KillOnDrop,
    dir: TempDir,
    base: String,
    port: u16,
    http: reqwest::Client,
    /// The credential each host was given at registration, sent with its requests.
    creds: std::sync::Mutex<std::collections::HashMap<String, String>>,
}

fn cfg_text(dir: &Path, port: u16, extra: &str, agents: &str) -> String {
    format!(
        r#"{{"tarballDir": {tb:?}, "http": {{"enabled": true, "listen": "127.0.0.1:{port}"}},
            "shaRecheckSecs": 1, "tarballUrls": ["http://127.0.0.1:9/pkgs/"], {extra} "agents": {agents}}}"#,
        tb = dir.join("tarball").display().to_string()
    )
}

impl Meta {
    fn start(extra: &str, agents: &str) -> Meta {
        let dir = test_support::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("tarball")).unwrap();
        let port = test_support::free_port();
        let cfg = dir.path().join("cfg.json");
        std::fs::write(&cfg, cfg_text(dir.path(), port, extra, agents)).unwrap();
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
            dir,
            base: format!("http://{addr}"),
            port,
            http: reqwest::Client::new(),
            creds: Default::default(),
        }
    }

    fn tarballs(&self) -> PathBuf {
        self.dir.path().join("tarball")
    }

    /// Publishes a real agent tarball in tarballDir; returns its SHA-256.
    fn publish(&self, name: &str, version: &str) -> String {
        let t =
            test_support::agent::agent_tarball(name, version, test_support::agent::Behaviour::Good);
        test_support::tarball::publish(&self.tarballs(), name, version, &t).1
    }

    async fn rewrite_cfg(&self, extra: &str, agents: &str) {
        std::fs::write(
            self.dir.path().join("cfg.json"),
            cfg_text(self.dir.path(), self.port, extra, agents),
        )
        .unwrap();
        let (code, text) = self.get("/config/reload").await;
        assert_eq!(code, 200, "reload: {text}");
    }

    async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, String) {
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

    async fn post(&self, path: &str, body: &impl serde::Serialize) -> (u16, String) {
        self.post_raw(path, serde_json::to_vec(body).unwrap()).await
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

    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        let (code, text) = self.get(path).await;
        assert_eq!(code, 200, "GET {path}: {text}");
        serde_json::from_str(&text).unwrap()
    }

    /// POSTs as `host`, with the credential it was given.
    async fn post_as(&self, host: &str, path: &str, body: &impl serde::Serialize) -> (u16, String) {
        let mut r = self
            .http
            .post(format!("{}{path}", self.base))
            .body(serde_json::to_vec(body).unwrap());
        if let Some(c) = self.creds.lock().unwrap().get(host) {
            r = r.bearer_auth(c);
        }
        let r = r.send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    async fn register(&self, host: &str, sn: &str) -> RegisterResponse {
        let req = RegisterRequest {
            hostname: host.into(),
            agentsn: sn.into(),
            ..Default::default()
        };
        let (code, text) = self.post_as(host, "/agent/register", &req).await;
        assert_eq!(code, 200, "register: {text}");
        let r: RegisterResponse = serde_json::from_str(&text).unwrap();
        if !r.credential.is_empty() {
            self.creds
                .lock()
                .unwrap()
                .insert(host.to_string(), r.credential.clone());
        }
        r
    }

    async fn status(&self, req: &StatusRequest) -> StatusResponse {
        let (code, text) = self.post_as(&req.hostname, "/agent/status", req).await;
        assert_eq!(code, 200, "status: {text}");
        serde_json::from_str(&text).unwrap()
    }

    /// Reports until the answer carries a job (the checksum task may still be hashing).
    async fn status_until_jobs(&self, req: &StatusRequest) -> Vec<Job> {
        let deadline = Instant::now() + WAIT;
        loop {
            let r = self.status(req).await;
            assert_eq!(r.status, STATUS_OK, "{}", r.message);
            if !r.jobs.is_empty() {
                return r.jobs;
            }
            assert!(
                Instant::now() < deadline,
                "no job came for {}",
                req.hostname
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn jobs(&self, body: Value) -> (u16, String) {
        self.post("/api/jobs", &body).await
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
        uptime: 1234,
        timestamp: 1_700_000_000,
        step: 600,
        agents: agents
            .iter()
            .map(|(n, v, s)| AgentStatus {
                name: n.to_string(),
                version: v.to_string(),
                status: s.to_string(),
                uptime: 12,
            })
            .collect(),
        jobs,
        supervised: false,
        events: Vec::new(),
    }
}

fn ok(id: &str) -> JobResult {
    JobResult {
        id: id.into(),
        errcode: 0,
        message: "success".into(),
    }
}

fn failed(id: &str, code: i32, msg: &str) -> JobResult {
    JobResult {
        id: id.into(),
        errcode: code,
        message: msg.into(),
    }
}

const RULES: &str = r#""tagRules": [
    {"prefix": "web", "tags": "svc=web,cmpt=FE"},
    {"prefix": "web-bj", "tags": "dc=bj"},
    {"prefix": "db", "tags": "svc=db"}],"#;

fn basic(version: &str, cmd: &str) -> String {
    format!(
        r#"[{{"default": {{"name": "basic", "version": "{version}", "tarball": "http://127.0.0.1:9/pkgs/",
            "md5": "", "cmd": "{cmd}",
            "envs": {{"PATH": "/usr/bin:/usr/local/bin"}}, "limits": {{"CPU": "10%", "memory": "20M"}}}},
           "others": [{{"prefix": "web-canary", "envs": {{"PATH": "/opt/bin"}}}}]}}]"#
    )
}

#[tokio::test]
async fn registration_issues_serials_tags_and_detects_cloned_disks() {
    let m = Meta::start(RULES, "[]");
    let first = m.register("web-bj-01", "").await;
    assert_eq!(first.status, STATUS_OK);
    assert!(proto::bootagent::validate_agentsn(&first.agentsn).is_ok());
    assert_eq!(first.agentsn.len(), 36, "a uuid: {}", first.agentsn);
    assert_eq!(first.tags, "svc=web,cmpt=FE,dc=bj");

    // Same serial, same hostname: kept.
    let again = m.register("web-bj-01", &first.agentsn).await;
    assert_eq!(again.agentsn, first.agentsn);
    let r = m
        .status(&report("web-bj-01", &first.agentsn, &[], vec![]))
        .await;
    assert_eq!(r.status, STATUS_OK);

    // A disk image of web-bj-01 booted as db-07: a fresh serial for the clone.
    let clone = m.register("db-07", &first.agentsn).await;
    assert_ne!(clone.agentsn, first.agentsn);
    assert_eq!(clone.tags, "svc=db");
    // Until it adopts the fresh serial, its reports are refused with the conflict code.
    let r = m
        .status(&report("db-07", &first.agentsn, &[], vec![]))
        .await;
    assert_eq!(r.status, STATUS_SERIAL_CONFLICT);
    assert!(r.message.contains("register again"), "{}", r.message);
    assert!(r.jobs.is_empty());
    let r = m
        .status(&report("db-07", &clone.agentsn, &[], vec![]))
        .await;
    assert_eq!(r.status, STATUS_OK);
    // The original keeps its serial.
    let r = m
        .status(&report("web-bj-01", &first.agentsn, &[], vec![]))
        .await;
    assert_eq!(r.status, STATUS_OK);

    // Unknown serial (or none): register again.
    let stranger = "00000000-0000-4000-8000-000000000042";
    let r = m.status(&report("app-1", stranger, &[], vec![])).await;
    assert_eq!(r.status, STATUS_UNREGISTERED);
    assert!(r.message.contains("register again"), "{}", r.message);
    let r = m.status(&report("app-1", "", &[], vec![])).await;
    assert_eq!(r.status, STATUS_UNREGISTERED);
    // A serial the server never issued (it restarted, say) is accepted as is.
    let adopted = m.register("app-1", stranger).await;
    assert_eq!(adopted.agentsn, stranger);
    assert_eq!(adopted.tags, "");
    let r = m.status(&report("app-1", stranger, &[], vec![])).await;
    assert_eq!(r.status, STATUS_OK);

    let hosts: HostsResponse = m.get_json("/api/hosts").await;
    let names: Vec<&str> = hosts.hosts.iter().map(|h| h.hostname.as_str()).collect();
    assert_eq!(names, ["app-1", "db-07", "web-bj-01"]);
}

#[tokio::test]
async fn install_job_carries_everything_is_resent_until_answered_then_never() {
    let m = Meta::start(RULES, &basic("1.0", "start"));
    let sha = m.publish("basic", "1.0");
    let sn = m.register("web-canary-1", "").await.agentsn;
    let req = report("web-canary-1", &sn, &[], vec![]);
    let jobs = m.status_until_jobs(&req).await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    let j = &jobs[0];
    assert_eq!(j.action, Action::Install);
    assert_eq!(j.name, "basic");
    assert_eq!(j.version, "1.0");
    assert_eq!(j.url, "http://127.0.0.1:9/pkgs/basic-1.0.tar.gz");
    assert_eq!(parse_checksum(&j.checksum), Some(sha));
    assert!(uuid_like(&j.id), "{}", j.id);
    // The prefix override replaced envs; limits come from the default.
    assert_eq!(
        j.envs,
        [("PATH".to_string(), "/opt/bin".to_string())].into()
    );
    assert_eq!(j.limits["CPU"], "10%");
    assert_eq!(j.limits["memory"], "20M");

    // The host crashed mid-job and reports again without a result: the same job.
    let r = m.status(&req).await;
    assert_eq!(r.jobs, jobs);

    // The result comes back and the agent runs: nothing more, then or later.
    let done = report(
        "web-canary-1",
        &sn,
        &[("basic", "1.0", "running")],
        vec![ok(&j.id)],
    );
    assert!(m.status(&done).await.jobs.is_empty());
    let steady = report("web-canary-1", &sn, &[("basic", "1.0", "running")], vec![]);
    assert!(m.status(&steady).await.jobs.is_empty());
    // Reporting the same result again changes nothing either.
    assert!(m.status(&done).await.jobs.is_empty());

    let h: HostView = m.get_json("/api/hosts/web-canary-1").await;
    assert_eq!(h.results.len(), 1);
    assert_eq!(h.results[0].id, j.id);
    assert_eq!(h.results[0].errcode, 0);
    assert!(h.pending.is_empty());
    assert_eq!(h.version, "bootagent-1.2.4-x86_64");
    assert_eq!(h.step, 600);
    assert_eq!(h.protocol, "bootagent");
    assert_eq!(h.tags, "svc=web,cmpt=FE");

    // The legacy status pages show the BootAgent host, in the legacy spelling.
    let st: Value = m.get_json("/status/json/basic").await;
    assert_eq!(st["web-canary-1"]["version"], "1.0");
    assert_eq!(st["web-canary-1"]["status"], "started");
    let (_, text) = m.get("/status/text/basic").await;
    assert!(
        text.starts_with("web-canary-1 1.0 started 1700000000 "),
        "{text}"
    );
}

fn uuid_like(s: &str) -> bool {
    s.len() == 36 && s.bytes().filter(|b| *b == b'-').count() == 4
}

#[tokio::test]
async fn no_checksum_means_no_install_job() {
    // No tarball published and no sha256 configured: the host gets nothing.
    let m = Meta::start("", &basic("1.0", "start"));
    let sn = m.register("web-1", "").await.agentsn;
    let req = report("web-1", &sn, &[], vec![]);
    for _ in 0..3 {
        let r = m.status(&req).await;
        assert!(r.jobs.is_empty());
        // The host is told why, and so are operators.
        assert_eq!(r.waiting.len(), 1, "{:?}", r.waiting);
        assert!(
            r.waiting[0]
                .reason
                .contains("no checksum for basic-1.0.tar.gz yet"),
            "{:?}",
            r.waiting
        );
    }
    // Once the digest task has looked (its first pass may come after the first reports),
    // the reason says what it found.
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(m.status(&req).await.jobs.is_empty());
        let hosts: HostsResponse = m.get_json("/api/hosts").await;
        let why = hosts.hosts[0].waiting[0].reason.clone();
        if why.contains("basic-1.0.tar.gz is not in tarballDir") {
            break;
        }
        assert!(Instant::now() < deadline, "{why}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Once the tarball is there, the job comes with its checksum.
    let sha = m.publish("basic", "1.0");
    let jobs = m.status_until_jobs(&req).await;
    assert_eq!(parse_checksum(&jobs[0].checksum), Some(sha));
}

#[tokio::test]
async fn failed_job_is_not_derived_again_until_the_config_changes() {
    let m = Meta::start("", &basic("1.0", "start"));
    m.publish("basic", "1.0");
    m.publish("basic", "2.0");
    let sn = m.register("web-1", "").await.agentsn;
    let jobs = m
        .status_until_jobs(&report("web-1", &sn, &[], vec![]))
        .await;
    let first = jobs[0].id.clone();
    let r = m
        .status(&report(
            "web-1",
            &sn,
            &[],
            vec![failed(&first, 5, "download failed: connection refused")],
        ))
        .await;
    assert!(
        r.jobs.is_empty(),
        "failed job derived again at once: {:?}",
        r.jobs
    );
    for _ in 0..3 {
        assert!(m
            .status(&report("web-1", &sn, &[], vec![]))
            .await
            .jobs
            .is_empty());
    }
    let h: HostView = m.get_json("/api/hosts/web-1").await;
    assert_eq!(h.results[0].errcode, 5);
    assert_eq!(h.results[0].message, "download failed: connection refused");
    assert_eq!(h.blocked.len(), 1);
    assert_eq!(
        (h.blocked[0].name.as_str(), h.blocked[0].reason.as_str()),
        ("basic", "failed")
    );

    // A reload with another version is a new desired state: derived again.
    m.rewrite_cfg("", &basic("2.0", "start")).await;
    let jobs = m
        .status_until_jobs(&report("web-1", &sn, &[], vec![]))
        .await;
    assert_eq!(jobs[0].action, Action::Install);
    assert_eq!(jobs[0].version, "2.0");
    assert_ne!(jobs[0].id, first);

    // It fails too; the operator asks for another try without changing the config.
    m.status(&report(
        "web-1",
        &sn,
        &[],
        vec![failed(&jobs[0].id, 1, "no space")],
    ))
    .await;
    assert!(m
        .status(&report("web-1", &sn, &[], vec![]))
        .await
        .jobs
        .is_empty());
    let (code, text) = m
        .post("/api/retry", &json!({"hosts": ["web-1"], "name": "basic"}))
        .await;
    assert_eq!(code, 200, "{text}");
    let r: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(r["cleared"], 1);
    let again = m.status(&report("web-1", &sn, &[], vec![])).await.jobs;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].version, "2.0");
}

#[tokio::test]
async fn upgrade_restart_and_stop_are_derived_from_the_report() {
    let m = Meta::start("", &basic("2.0", "start"));
    m.publish("basic", "2.0");
    let sn = m.register("web-1", "").await.agentsn;
    // Another version runs: upgrade.
    let jobs = m
        .status_until_jobs(&report(
            "web-1",
            &sn,
            &[("basic", "1.0", "running")],
            vec![],
        ))
        .await;
    assert_eq!(jobs[0].action, Action::Upgrade);
    assert_eq!(jobs[0].version, "2.0");
    assert!(parse_checksum(&jobs[0].checksum).is_some());
    // Done, but the agent is stopped: restart it.
    let r = m
        .status(&report(
            "web-1",
            &sn,
            &[("basic", "2.0", "stoped")],
            vec![ok(&jobs[0].id)],
        ))
        .await;
    assert_eq!(r.jobs.len(), 1);
    assert_eq!(r.jobs[0].action, Action::Restart);
    assert_eq!(r.jobs[0].name, "basic");
    let restart = r.jobs[0].id.clone();
    let r = m
        .status(&report(
            "web-1",
            &sn,
            &[("basic", "2.0", "running")],
            vec![ok(&restart)],
        ))
        .await;
    assert!(r.jobs.is_empty());
    // The config now says stop: stop it, once.
    m.rewrite_cfg("", &basic("2.0", "stop")).await;
    let r = m
        .status(&report(
            "web-1",
            &sn,
            &[("basic", "2.0", "running")],
            vec![],
        ))
        .await;
    assert_eq!(r.jobs.len(), 1);
    assert_eq!(r.jobs[0].action, Action::Stop);
    assert!(r.jobs[0].url.is_empty() && r.jobs[0].checksum.is_empty());
    let r = m
        .status(&report(
            "web-1",
            &sn,
            &[("basic", "2.0", "stoped")],
            vec![ok(&r.jobs[0].id)],
        ))
        .await;
    assert!(r.jobs.is_empty());
}

#[tokio::test]
async fn operator_jobs_reach_the_selected_hosts_and_their_results_come_back() {
    let m = Meta::start(RULES, "[]");
    let mut sn = std::collections::HashMap::new();
    for h in ["web-01", "web-02", "db-01", "db-02"] {
        sn.insert(h, m.register(h, "").await.agentsn);
    }
    // web-02 runs basic: only a reported agent can be uninstalled.
    m.status(&report(
        "web-02",
        &sn["web-02"],
        &[("basic", "1.0", "running")],
        vec![],
    ))
    .await;

    // restart for a prefix.
    let (code, text) = m
        .jobs(json!({"action": "restart", "name": "basic", "prefix": "web"}))
        .await;
    assert_eq!(code, 200, "{text}");
    let restart: JobsResponse = serde_json::from_str(&text).unwrap();
    let hosts: Vec<&str> = restart.jobs.iter().map(|j| j.host.as_str()).collect();
    assert_eq!(hosts, ["web-01", "web-02"]);
    assert_eq!(restart.jobs[0].agentsn, sn["web-01"]);

    // config (svrlist + step) for a tag.
    let (code, text) = m
        .jobs(json!({"action": "config", "svrlist": "127.0.0.1:2000,127.0.0.1:2001", "step": 60, "tag": "svc=db"}))
        .await;
    assert_eq!(code, 200, "{text}");
    let config: JobsResponse = serde_json::from_str(&text).unwrap();
    assert_eq!(config.jobs.len(), 2);

    // uninstall for a host list; an unknown host is reported, not fatal.
    let (code, text) = m
        .jobs(json!({"action": "uninstall", "name": "basic", "hosts": ["web-02", "ghost-1"]}))
        .await;
    assert_eq!(code, 200, "{text}");
    let uninstall: JobsResponse = serde_json::from_str(&text).unwrap();
    assert_eq!(uninstall.jobs.len(), 1);
    assert_eq!(uninstall.skipped[0].host, "ghost-1");

    let b: BatchStatus = m.get_json(&format!("/api/jobs/{}", restart.id)).await;
    assert!(b.jobs.iter().all(|j| j.state == "pending"), "{b:?}");

    // Hosts get their jobs on their next report.
    let r = m
        .status(&report("web-02", &sn["web-02"], &[], vec![]))
        .await;
    let actions: Vec<Action> = r.jobs.iter().map(|j| j.action).collect();
    assert_eq!(
        actions,
        [Action::Restart, Action::Uninstall],
        "{:?}",
        r.jobs
    );
    let r1 = m.status(&report("db-01", &sn["db-01"], &[], vec![])).await;
    assert_eq!(r1.jobs.len(), 1);
    assert_eq!(r1.jobs[0].action, Action::Config);
    assert_eq!(r1.jobs[0].svrlist, "127.0.0.1:2000,127.0.0.1:2001");
    assert_eq!(r1.jobs[0].step, Some(60));
    assert!(r1.jobs[0].name.is_empty());

    // Results come back: one success, one failure.
    m.status(&report(
        "web-02",
        &sn["web-02"],
        &[],
        vec![ok(&r.jobs[0].id), failed(&r.jobs[1].id, 7, "not installed")],
    ))
    .await;
    m.status(&report(
        "db-01",
        &sn["db-01"],
        &[],
        vec![ok(&r1.jobs[0].id)],
    ))
    .await;

    let b: BatchStatus = m.get_json(&format!("/api/jobs/{}", restart.id)).await;
    assert_eq!(b.action, "restart");
    assert_eq!(b.name, "basic");
    let states: Vec<(&str, &str)> = b
        .jobs
        .iter()
        .map(|j| (j.host.as_str(), j.state.as_str()))
        .collect();
    assert_eq!(states, [("web-01", "pending"), ("web-02", "done")]);
    let b: BatchStatus = m.get_json(&format!("/api/jobs/{}", uninstall.id)).await;
    assert_eq!(b.jobs[0].state, "failed");
    assert_eq!(b.jobs[0].errcode, Some(7));
    assert_eq!(b.jobs[0].message, "not installed");
    let b: BatchStatus = m.get_json(&format!("/api/jobs/{}", config.id)).await;
    let states: Vec<&str> = b.jobs.iter().map(|j| j.state.as_str()).collect();
    assert_eq!(states, ["done", "pending"]);

    let web: HostsResponse = m.get_json("/api/hosts?prefix=web-0").await;
    assert_eq!(web.hosts.len(), 2);
    let w2 = web.hosts.iter().find(|h| h.hostname == "web-02").unwrap();
    assert_eq!(w2.results.len(), 2);
    assert!(w2.pending.is_empty());
    let w1 = web.hosts.iter().find(|h| h.hostname == "web-01").unwrap();
    assert_eq!(w1.pending.len(), 1);
    assert_eq!(w1.pending[0].origin, "operator");
    let db: HostsResponse = m.get_json("/api/hosts?tag=svc=db").await;
    let names: Vec<&str> = db.hosts.iter().map(|h| h.hostname.as_str()).collect();
    assert_eq!(names, ["db-01", "db-02"]);

    // Clear errors.
    let (code, text) = m
        .jobs(json!({"action": "restart", "name": "basic", "prefix": "nomatch"}))
        .await;
    assert_eq!(code, 404, "{text}");
    assert!(text.contains("no registered host matches prefix"), "{text}");
    let (code, text) = m
        .jobs(json!({"action": "reboot", "name": "basic", "prefix": "web"}))
        .await;
    assert_eq!(code, 400);
    assert!(text.starts_with("action:"), "{text}");
    let (code, text) = m.jobs(json!({"action": "stop", "prefix": "web"})).await;
    assert_eq!(code, 400);
    assert!(text.starts_with("name:"), "{text}");
    let (code, _) = m.get("/api/jobs/no-such-batch").await;
    assert_eq!(code, 404);
    let (code, _) = m.get("/api/hosts/ghost-1").await;
    assert_eq!(code, 404);
}

/// An `uninstall` of a name the host never reported was queued and sent: a typo in an
/// operator's job (`cfg.json`) reached the host, which removed whatever had that name.
#[tokio::test]
async fn uninstall_of_an_agent_the_host_has_not_reported_is_skipped_with_the_reason() {
    let m = Meta::start(RULES, "[]");
    let sn = m.register("web-01", "").await.agentsn;
    m.status(&report(
        "web-01",
        &sn,
        &[("basic", "1.0", "running")],
        vec![],
    ))
    .await;
    let (code, text) = m
        .jobs(json!({"action": "uninstall", "name": "cfg.json", "hosts": ["web-01"]}))
        .await;
    assert_eq!(code, 200, "{text}");
    let r: JobsResponse = serde_json::from_str(&text).unwrap();
    assert!(r.jobs.is_empty(), "{text}");
    assert_eq!(r.skipped.len(), 1, "{text}");
    assert_eq!(r.skipped[0].host, "web-01");
    assert!(r.skipped[0].reason.contains("not reported"), "{text}");
    let (code, text) = m
        .jobs(json!({"action": "uninstall", "name": "basic", "hosts": ["web-01"]}))
        .await;
    assert_eq!(code, 200, "{text}");
    let r: JobsResponse = serde_json::from_str(&text).unwrap();
    assert_eq!(r.jobs.len(), 1, "{text}");
    // Only the reported agent's uninstall reaches the host.
    let got = m
        .status(&report(
            "web-01",
            &sn,
            &[("basic", "1.0", "running")],
            vec![],
        ))
        .await;
    let names: Vec<&str> = got.jobs.iter().map(|j| j.name.as_str()).collect();
    assert_eq!(names, ["basic"], "{:?}", got.jobs);
}

#[tokio::test]
async fn hostile_malformed_and_oversized_requests_are_refused() {
    let m = Meta::start(r#""maxBodyBytes": 2048,"#, "[]");
    let sn = m.register("web-1", "").await.agentsn;
    for path in ["/agent/register", "/agent/status", "/api/jobs"] {
        for body in [
            "{not json",
            r#"["web-1", ""]"#,
            "null",
            r#"{"hostname": 5, "action": 5}"#,
        ] {
            let (code, text) = m.post_raw(path, body).await;
            assert_eq!(code, 400, "{path} {body}: {text}");
            assert!(text.contains("body format error"), "{path} {body}: {text}");
        }
        let (code, _) = m.post_raw(path, "").await;
        assert_eq!(code, 400, "{path}: blank body");
        let (code, text) = m.post_raw(path, vec![b' '; 4096]).await;
        assert_eq!(code, 413, "{path}: {text}");
        assert!(text.contains("maxBodyBytes"), "{text}");
    }
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "/agent/register",
            json!({"hostname": "../etc", "agentsn": ""}),
            "invalid hostname",
        ),
        (
            "/agent/register",
            json!({"hostname": "", "agentsn": ""}),
            "hostname is blank",
        ),
        (
            "/agent/register",
            json!({"hostname": "h\r\nforged", "agentsn": ""}),
            "invalid hostname",
        ),
        (
            "/agent/register",
            json!({"hostname": "web-1", "agentsn": "../../x"}),
            "invalid agentsn",
        ),
        (
            "/agent/status",
            json!({"hostname": "web-1", "agentsn": sn, "agents": [{"name": "../x", "version": "1", "status": "running"}]}),
            "invalid agent name",
        ),
        (
            "/agent/status",
            json!({"hostname": "web-1", "agentsn": sn, "agents": [{"name": "a", "version": "1/../2", "status": "running"}]}),
            "invalid version",
        ),
        (
            "/agent/status",
            json!({"hostname": "web-1", "agentsn": "a b"}),
            "invalid agentsn",
        ),
        (
            "/agent/status",
            json!({"hostname": "web 1", "agentsn": sn}),
            "invalid hostname",
        ),
    ];
    for (path, body, want) in cases {
        let (code, text) = m.post(path, &body).await;
        assert_eq!(code, 400, "{path} {body}: {text}");
        assert!(
            text.contains(want),
            "{path} {body}: want {want:?}, got {text:?}"
        );
    }
    // Nothing was recorded from the refused requests.
    let hosts: HostsResponse = m.get_json("/api/hosts").await;
    assert_eq!(hosts.hosts.len(), 1);
    assert_eq!(hosts.hosts[0].last_seen, 0);
}

#[tokio::test]
async fn silent_hosts_are_forgotten_and_must_register_again() {
    let m = Meta::start(r#""staleHostSecs": 1, "sweepIntervalSecs": 1,"#, "[]");
    let sn = m.register("web-1", "").await.agentsn;
    assert_eq!(
        m.status(&report("web-1", &sn, &[], vec![])).await.status,
        STATUS_OK
    );
    let deadline = Instant::now() + WAIT;
    loop {
        let hosts: HostsResponse = m.get_json("/api/hosts").await;
        if hosts.hosts.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "web-1 was never forgotten");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = m.status(&report("web-1", &sn, &[], vec![])).await;
    assert_eq!(r.status, STATUS_UNREGISTERED);
    // Registering again with its old serial gives it back.
    assert_eq!(m.register("web-1", &sn).await.agentsn, sn);
}

/// Tarballs on another server: a static file server that is not ours, under `/pkgs`.
struct PyFiles {
    server: test_support::fileserver::FileServer,
    base: String,
}

impl PyFiles {
    fn start() -> PyFiles {
        let server = test_support::fileserver::FileServer::start();
        PyFiles {
            base: server.url("pkgs"),
            server,
        }
    }

    fn dir(&self) -> &Path {
        self.server.dir.path()
    }

    fn publish(&self, name: &str, version: &str, data: &[u8]) -> (String, String) {
        test_support::tarball::publish(&self.dir().join("pkgs"), name, version, data)
    }
}

/// The agents of the remote-digest test, all on `base`.
fn remote_agents(base: &str) -> String {
    let one = |n: &str| {
        format!(
            r#"{{"default": {{"name": "{n}", "version": "1", "tarball": "{base}", "md5": "", "cmd": "start"}}}}"#
        )
    };
    format!(
        "[{}]",
        ["sidecar", "download", "missing", "huge"]
            .map(one)
            .join(",")
    )
}

/// What one report gets for each agent: its checksum, or why it waits.
async fn jobs_and_waits(m: &Meta, req: &StatusRequest) -> (Vec<Job>, Vec<(String, String)>) {
    let r = m.status(req).await;
    let waits = r.waiting.into_iter().map(|w| (w.name, w.reason)).collect();
    (r.jobs, waits)
}

#[tokio::test]
async fn tarballs_on_another_server_get_their_digest_from_a_sha256_file_or_a_download() {
    let files = PyFiles::start();
    // A `.sha256` that is not the tarball's: the job carrying it proves it was read
    // rather than computed.
    let (_, _) = files.publish("sidecar", "1", b"sidecar tarball");
    let told = "ab".repeat(32);
    std::fs::write(
        files.dir().join("pkgs/sidecar-1.tar.gz.sha256"),
        format!("{told}  sidecar-1.tar.gz\n"),
    )
    .unwrap();
    let (_, download_sha) = files.publish("download", "1", b"downloaded to be hashed");
    let (huge_md5, _) = files.publish("huge", "1", &[7u8; 4096]);
    let m = Meta::start(
        r#""remoteRecheckSecs": 1, "remoteHashMaxBytes": 1000,"#,
        &remote_agents(&files.base),
    );
    let sn = m.register("web-1", "").await.agentsn;
    let req = report("web-1", &sn, &[], vec![]);
    let deadline = Instant::now() + WAIT;
    let (jobs, waits) = loop {
        let (jobs, waits) = jobs_and_waits(&m, &req).await;
        let sha = |n: &str| {
            jobs.iter()
                .find(|j| j.name == n)
                .and_then(|j| parse_checksum(&j.checksum))
        };
        if sha("sidecar").is_some() && sha("download").is_some() {
            break (jobs, waits);
        }
        assert!(
            Instant::now() < deadline,
            "jobs {jobs:?}, waiting {waits:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let job = |n: &str| jobs.iter().find(|j| j.name == n).unwrap().clone();
    assert_eq!(job("sidecar").checksum, format!("SHA256:{told}"));
    assert_eq!(job("download").checksum, format!("SHA256:{download_sha}"));
    // Beside the SHA-256, the `.md5` the legacy path checks.
    assert_eq!(
        job("download").md5,
        test_support::digests(b"downloaded to be hashed").0
    );
    // Too big to download and no `.sha256`: the `.md5` still lets it be installed.
    assert_eq!(job("huge").checksum, format!("MD5:{huge_md5}"));
    // Not there at all: no job, and the reason says what ops-meta found.
    assert!(!jobs.iter().any(|j| j.name == "missing"), "{jobs:?}");
    let why = &waits.iter().find(|(n, _)| n == "missing").unwrap().1;
    assert!(
        why.contains("no checksum for missing-1.tar.gz yet") && why.contains("404"),
        "{why}"
    );

    // The legacy heartbeat answer carries the learned SHA-256 too, and a tarball replaced
    // on the other server is hashed again (a newer Last-Modified).
    let sha_in_heartbeat = |body: String| {
        let v: Value = serde_json::from_str(&body).unwrap();
        v["desiredAgents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == "download")
            .and_then(|a| a["sha256"].as_str().map(str::to_string))
    };
    let hb = json!({"hostname": "legacy-1", "realAgents": []});
    let (_, body) = m.post("/heartbeat", &hb).await;
    assert_eq!(sha_in_heartbeat(body), Some(download_sha.clone()));
    let newer = std::time::SystemTime::now() + Duration::from_secs(5);
    let path = files.dir().join("pkgs/download-1.tar.gz");
    std::fs::write(&path, b"replaced on the file server").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(newer)
        .unwrap();
    let (_, replaced) = test_support::digests(b"replaced on the file server");
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, body) = m.post("/heartbeat", &hb).await;
        if sha_in_heartbeat(body) == Some(replaced.clone()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replaced tarball was not hashed again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn require_sha256_refuses_the_md5_and_says_so() {
    let files = PyFiles::start();
    files.publish("huge", "1", &[7u8; 4096]);
    let agents = format!(
        r#"[{{"default": {{"name": "huge", "version": "1", "tarball": "{}", "md5": "", "cmd": "start"}}}}]"#,
        files.base
    );
    let m = Meta::start(
        r#""remoteRecheckSecs": 1, "remoteHashMaxBytes": 1000, "requireSha256": true,"#,
        &agents,
    );
    let sn = m.register("web-1", "").await.agentsn;
    let req = report("web-1", &sn, &[], vec![]);
    let deadline = Instant::now() + WAIT;
    loop {
        let (jobs, waits) = jobs_and_waits(&m, &req).await;
        assert!(jobs.is_empty(), "{jobs:?}");
        if let Some((_, why)) = waits.first() {
            if why.contains("more than remoteHashMaxBytes") {
                assert!(why.contains("requireSha256 refuses the MD5"), "{why}");
                break;
            }
        }
        assert!(Instant::now() < deadline, "waiting: {waits:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
