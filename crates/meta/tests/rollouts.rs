//! Staged rollouts, end to end against the real `ops-meta` binary: hosts simulated over
//! HTTP (legacy heartbeats and BootAgent reports, with the events a real ops-updater
//! sends), the operator API driven as `opsctl` does, the SQLite store in a temporary
//! folder (kept across a restart).

use std::path::Path;
use std::time::Duration;

use proto::rollout::*;
use serde_json::{json, Value};
use test_support::{command, KillOnDrop, TempDir};

const WAIT: Duration = Duration::from_secs(30);

struct Meta {
    child: Option<KillOnDrop>,
    dir: TempDir,
    port: u16,
    /// `store` of the config (empty: the default SQLite file) and the port of the
    /// tarball base URL (its own when 0).
    store: String,
    files_port: u16,
    http: reqwest::Client,
    /// Per host: the next event seq.
    seqs: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

impl Meta {
    fn start(version: &str) -> Meta {
        Meta::start_on(version, "", 0)
    }

    fn start_on(version: &str, store: &str, files_port: u16) -> Meta {
        let dir = test_support::tempdir().unwrap();
        let files = dir.path().join("files");
        std::fs::create_dir_all(&files).unwrap();
        for v in ["1.0", "2.0", "3.0"] {
            std::fs::write(
                files.join(format!("demo-{v}.tar.gz")),
                format!("release {v}"),
            )
            .unwrap();
        }
        let mut m = Meta {
            child: None,
            dir,
            port: test_support::free_port(),
            store: store.to_string(),
            files_port,
            http: reqwest::Client::new(),
            seqs: Default::default(),
        };
        m.write_cfg(version);
        m.spawn();
        m
    }

    fn write_cfg(&self, version: &str) {
        let files_port = if self.files_port == 0 {
            self.port
        } else {
            self.files_port
        };
        let mut cfg = json!({
            "tarballDir": "files",
            "http": {"enabled": true, "listen": format!("127.0.0.1:{}", self.port)},
            "rolloutPassMillis": 100,
            "tagRules": [{"prefix": "db-", "tags": "role=db"}],
            "agents": [{"default": {
                "name": "demo", "version": version,
                "tarball": format!("http://127.0.0.1:{files_port}/"),
                "md5": "", "cmd": "start"}}]
        });
        if !self.store.is_empty() {
            cfg["store"] = json!(self.store);
        }
        let tmp = self.dir.path().join("cfg.json.tmp");
        std::fs::write(&tmp, cfg.to_string()).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("cfg.json")).unwrap();
    }

    fn spawn(&mut self) {
        let mut cmd = command(Path::new(env!("CARGO_BIN_EXE_ops-meta")));
        cmd.arg("-c")
            .arg("cfg.json")
            .current_dir(self.dir.path())
            .env("RUST_LOG", "warn");
        self.child = Some(KillOnDrop(cmd.spawn().expect("start ops-meta")));
        self.http = reqwest::Client::new();
        test_support::wait_listening(format!("127.0.0.1:{}", self.port).parse().unwrap(), WAIT);
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// A legacy heartbeat reporting `demo` at `version` with `status`, and `events`
    /// (kind, version, state); returns the version the answer wants.
    async fn beat(
        &self,
        host: &str,
        version: &str,
        status: &str,
        events: &[(&str, &str, &str)],
    ) -> String {
        let events: Vec<Value> = {
            let mut seqs = self.seqs.lock().unwrap();
            let seq = seqs.entry(host.to_string()).or_insert(0);
            events
                .iter()
                .map(|(kind, v, state)| {
                    *seq += 1;
                    json!({"seq": *seq, "time": 1, "agent": "demo", "version": v,
                           "kind": kind, "cause": format!("test {kind}"), "state": state})
                })
                .collect()
        };
        let mut body = json!({"hostname": host, "realAgents": [
            {"name": "demo", "version": version, "status": status, "timestamp": 1}]});
        if !events.is_empty() {
            body["events"] = Value::Array(events);
        }
        let r = self
            .http
            .post(self.url("/heartbeat"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        v["desiredAgents"][0]["version"]
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn post(&self, path: &str, body: Value) -> (u16, String) {
        let r = self
            .http
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    async fn create(&self, spec: Value) -> RolloutView {
        let (code, text) = self.post("/api/rollouts", spec).await;
        assert_eq!(code, 200, "{text}");
        serde_json::from_str(&text).unwrap()
    }

    async fn act(&self, id: &str, action: &str) -> (u16, String) {
        self.post(&format!("/api/rollouts/{id}/{action}"), json!({}))
            .await
    }

    async fn view(&self, id: &str) -> RolloutView {
        let r = self
            .http
            .get(self.url(&format!("/api/rollouts/{id}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }

    /// Waits until the rollout's view satisfies `cond`.
    async fn wait_view(&self, id: &str, cond: impl Fn(&RolloutView) -> bool) -> RolloutView {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let v = self.view(id).await;
            if cond(&v) {
                return v;
            }
            assert!(std::time::Instant::now() < deadline, "timed out: {v:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every host heartbeats, installing at once whatever it is told (as a real,
    /// healthy updater would), until `done` holds for the rollout; returns its view.
    async fn run_fleet(
        &self,
        hosts: &[String],
        id: &str,
        mut behave: impl FnMut(&str, &str) -> (String, String, Vec<(&'static str, String, String)>),
        mut done: impl FnMut(&RolloutView) -> bool,
    ) -> RolloutView {
        let mut running: std::collections::HashMap<String, String> = hosts
            .iter()
            .map(|h| (h.clone(), "1.0".to_string()))
            .collect();
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            for h in hosts {
                let want = running[h].clone();
                let (version, status, events) = behave(h, &want);
                let ev: Vec<(&str, &str, &str)> = events
                    .iter()
                    .map(|(k, v, s)| (*k, v.as_str(), s.as_str()))
                    .collect();
                let told = self.beat(h, &version, &status, &ev).await;
                running.insert(h.clone(), told);
            }
            let v = self.view(id).await;
            if done(&v) {
                return v;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "rollout never got there: {v:#?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn hosts(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i:02}")).collect()
}

fn two_waves(extra: Value) -> Value {
    let mut spec = json!({
        "agent": "demo", "version": "2.0",
        "waves": [{"name": "canary", "prefixes": ["canary-"]}, {"name": "rest", "percent": 100}],
        "maxInFlight": 3, "minHealthySecs": 1, "healthyDeadlineSecs": 20,
        "maxFailures": 2, "start": true
    });
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    spec
}

/// Honest hosts: they run what they are told, and say so.
fn healthy(_: &str, want: &str) -> (String, String, Vec<(&'static str, String, String)>) {
    (want.to_string(), "started".to_string(), vec![])
}

#[tokio::test]
async fn a_rollout_goes_wave_by_wave_counts_healthy_time_and_completes() {
    let m = Meta::start("1.0");
    let mut fleet = hosts("canary-", 2);
    fleet.extend(hosts("web-", 8));
    for h in &fleet {
        assert_eq!(m.beat(h, "1.0", "started", &[]).await, "1.0");
    }
    // The plan: sizes, samples, nothing stored.
    let (code, text) = m.post("/api/rollouts/plan", two_waves(json!({}))).await;
    assert_eq!(code, 200, "{text}");
    let plan: RolloutPlan = serde_json::from_str(&text).unwrap();
    assert_eq!(plan.from_version, "1.0");
    assert_eq!(
        plan.waves.iter().map(|w| w.hosts).collect::<Vec<_>>(),
        vec![2, 8]
    );
    assert_eq!(plan.waves[0].sample, vec!["canary-00", "canary-01"]);
    let list: RolloutList = m
        .http
        .get(m.url("/api/rollouts"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(list.rollouts.is_empty());

    let r = m.create(two_waves(json!({}))).await;
    assert_eq!(r.state, STATE_RUNNING);
    // Only the canaries are admitted first; the rest still get 1.0.
    let v = m
        .run_fleet(&fleet, &r.id, healthy, |v| {
            v.counts.in_flight + v.counts.healthy >= 2
        })
        .await;
    assert_eq!(
        v.waves[1].counts.in_flight + v.waves[1].counts.healthy,
        0,
        "{v:#?}"
    );
    assert_eq!(m.beat("web-00", "1.0", "started", &[]).await, "1.0");
    assert_eq!(m.beat("canary-00", "2.0", "started", &[]).await, "2.0");
    // A host is not healthy at its first report: it must run 1 s without a restart.
    let v = m.view(&r.id).await;
    assert!(
        v.holds
            .iter()
            .any(|h| h.kind == "healthy_time" || h.kind == "in_flight"),
        "{v:#?}"
    );
    // Then the rest, never more than maxInFlight at once.
    let mut most = 0;
    let v = m
        .run_fleet(&fleet, &r.id, healthy, |v| {
            most = most.max(v.counts.in_flight);
            v.state == STATE_COMPLETED
        })
        .await;
    assert!(most <= 3, "in flight at once: {most}");
    assert_eq!(v.counts.healthy, 10, "{v:#?}");
    assert!(v.permanent.contains("\"2.0\""), "{}", v.permanent);
    for h in &fleet {
        assert_eq!(m.beat(h, "2.0", "started", &[]).await, "2.0", "{h}");
    }
    // /metrics shows the rollout by state and its waves by phase, in the text format.
    let text = m
        .http
        .get(m.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    let value = |name: &str, labels: &[(&str, &str)]| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Gauge(v) => v,
                _ => panic!("{name} is not a gauge"),
            })
    };
    assert_eq!(
        value("ops_meta_rollouts", &[("state", "completed")]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(
            "ops_meta_rollout_hosts",
            &[("rollout", &r.id), ("wave", "canary"), ("phase", "healthy")]
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        value(
            "ops_meta_rollout_hosts",
            &[("wave", "rest"), ("phase", "healthy")]
        ),
        Some(8.0),
        "{text}"
    );
    // Made permanent in cfg.json, the rollout lets go: a later cfg.json change applies.
    m.write_cfg("2.0");
    assert_eq!(
        m.http
            .get(m.url("/config/reload"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    m.wait_view(&r.id, |v| v.permanent.is_empty()).await;
    m.write_cfg("3.0");
    assert_eq!(
        m.http
            .get(m.url("/config/reload"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(m.beat("web-03", "2.0", "started", &[]).await, "3.0");
}

#[tokio::test]
async fn release_failures_pause_at_the_threshold_infra_failures_do_not_and_resume_completes() {
    let m = Meta::start("1.0");
    let fleet = hosts("web-", 8);
    for h in &fleet {
        m.beat(h, "1.0", "started", &[]).await;
    }
    let r = m
        .create(json!({
            "agent": "demo", "version": "2.0",
            "waves": [{"name": "all", "percent": 100}],
            "maxInFlight": 8, "minHealthySecs": 1, "healthyDeadlineSecs": 20,
            "maxFailures": 2, "start": true
        }))
        .await;
    // web-00 and web-01 crash-loop to fatal; web-02 cannot download (infra).
    let mut told: std::collections::HashSet<String> = Default::default();
    let mut behave = |h: &str, want: &str| {
        let first = told.insert(format!("{h}{want}"));
        match (h, want) {
            ("web-00" | "web-01", "2.0") => (
                "2.0".to_string(),
                "fatal".to_string(),
                if first {
                    vec![("fatal", "2.0".to_string(), String::new())]
                } else {
                    vec![]
                },
            ),
            ("web-02", "2.0") => (
                "1.0".to_string(),
                "started".to_string(),
                if first {
                    vec![("install_failed", "2.0".to_string(), "download".to_string())]
                } else {
                    vec![]
                },
            ),
            _ => healthy(h, want),
        }
    };
    let v = m
        .run_fleet(&fleet, &r.id, &mut behave, |v| v.state == STATE_PAUSED)
        .await;
    assert!(v.paused_reason.contains("error threshold"), "{v:#?}");
    assert!(v.paused_reason.contains("2 of 8"), "{}", v.paused_reason);
    assert!(v.holds.iter().any(|h| h.kind == "threshold"), "{v:#?}");
    let failed: Vec<&str> = v
        .failures
        .iter()
        .filter(|f| f.phase == PHASE_FAILED)
        .map(|f| f.host.as_str())
        .collect();
    assert_eq!(failed, vec!["web-00", "web-01"], "{v:#?}");
    assert!(
        v.failures.iter().any(|f| f.host == "web-02"
            && f.phase == PHASE_INFRA_FAILED
            && f.reason.contains("download")),
        "{v:#?}"
    );
    // Resume: the failures seen are accepted; web-02's download now works.
    let (code, text) = m.act(&r.id, "resume").await;
    assert_eq!(code, 200, "{text}");
    let v = m
        .run_fleet(
            &fleet,
            &r.id,
            |h, want| match (h, want) {
                ("web-00" | "web-01", "2.0") => ("2.0".into(), "fatal".into(), vec![]),
                _ => healthy(h, want),
            },
            |v| v.state == STATE_COMPLETED,
        )
        .await;
    assert_eq!((v.counts.healthy, v.counts.failed), (6, 2), "{v:#?}");
    // A completed rollout cannot be resumed, and rollback takes the hosts back.
    assert_eq!(m.act(&r.id, "resume").await.0, 409);
    let (code, text) = m.act(&r.id, "rollback").await;
    assert_eq!(code, 200, "{text}");
    let back: RolloutView = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (back.version.as_str(), back.rollback_of.as_str()),
        ("1.0", r.id.as_str())
    );
    let v = m
        .run_fleet(&fleet, &back.id, healthy, |v| v.state == STATE_COMPLETED)
        .await;
    assert_eq!(v.counts.healthy, 8, "{v:#?}");
    assert_eq!(m.view(&r.id).await.state, STATE_ROLLED_BACK);
    for h in &fleet {
        assert_eq!(m.beat(h, "1.0", "started", &[]).await, "1.0");
    }
}

#[tokio::test]
async fn hosts_that_stop_reporting_go_missing_and_count_and_pins_survive_a_restart() {
    let mut m = Meta::start("1.0");
    let fleet = hosts("web-", 4);
    for h in &fleet {
        m.beat(h, "1.0", "started", &[]).await;
    }
    let r = m
        .create(json!({
            "agent": "demo", "version": "2.0",
            "waves": [{"name": "first", "prefixes": ["web-00", "web-01"]}, {"name": "second", "prefixes": ["web-"]}],
            "maxInFlight": 2, "minHealthySecs": 1, "healthyDeadlineSecs": 30,
            "missingAfterSecs": 2, "maxFailures": 1, "approval": true
        }))
        .await;
    assert_eq!(r.state, STATE_PLANNED);
    assert_eq!(m.view(&r.id).await.holds[0].kind, "not_started");
    assert_eq!(m.act(&r.id, "start").await.0, 200);
    // The first wave completes, then approval holds the second.
    let v = m
        .run_fleet(&fleet, &r.id, healthy, |v| {
            v.holds.iter().any(|h| h.kind == "approval")
        })
        .await;
    assert_eq!(v.waves[0].state, "done", "{v:#?}");
    // The store keeps the pins: after a restart web-00 still gets 2.0, web-02 1.0.
    m.stop();
    m.spawn();
    assert_eq!(m.beat("web-00", "2.0", "started", &[]).await, "2.0");
    assert_eq!(m.beat("web-02", "1.0", "started", &[]).await, "1.0");
    assert_eq!(m.act(&r.id, "approve").await.0, 200);
    // web-03 stops reporting: missing after 2 s, which reaches the threshold (1).
    let alive: Vec<String> = fleet.iter().filter(|h| *h != "web-03").cloned().collect();
    let v = m
        .run_fleet(&alive, &r.id, healthy, |v| v.state == STATE_PAUSED)
        .await;
    assert!(
        v.failures
            .iter()
            .any(|f| f.host == "web-03" && f.phase == PHASE_MISSING),
        "{v:#?}"
    );
    assert!(v.holds.iter().any(|h| h.kind == "missing"), "{v:#?}");
    // Abort stops it where it is: hosts that moved keep 2.0.
    assert_eq!(m.act(&r.id, "abort").await.0, 200);
    assert_eq!(m.beat("web-00", "2.0", "started", &[]).await, "2.0");
    // Another rollout of the agent can start now; a second active one cannot.
    let next = m
        .create(two_waves(json!({"version": "3.0", "start": false})))
        .await;
    let (code, text) = m
        .post("/api/rollouts", two_waves(json!({"version": "3.0"})))
        .await;
    assert_eq!(code, 409, "{text}");
    assert!(text.contains(&next.id), "{text}");
}

#[tokio::test]
async fn bad_specs_are_refused_with_every_problem_named() {
    let m = Meta::start("1.0");
    let (code, text) = m
        .post(
            "/api/rollouts",
            json!({"agent": "nope", "version": "../x", "waves": [{"prefixes": ["a"], "percent": 5}],
                   "maxInFlight": 0, "window": {"start": "25:00", "end": "02:00"}}),
        )
        .await;
    assert_eq!(code, 400);
    for want in ["agent", "version", "waves[0]", "maxInFlight", "window"] {
        assert!(text.contains(want), "{want} not in {text}");
    }
    let (code, text) = m.post("/api/rollouts", json!([1, 2])).await;
    assert_eq!(code, 400, "{text}");
    assert_eq!(m.act("r-nothing", "pause").await.0, 404);
    let r = m.create(two_waves(json!({"start": false}))).await;
    // An action needs no body at all.
    let r2 = m
        .http
        .post(m.url(&format!("/api/rollouts/{}/start", r.id)))
        .send()
        .await
        .unwrap();
    assert_eq!(r2.status(), 200, "{}", r2.text().await.unwrap());
    let (code, text) = m.act(&r.id, "pause").await;
    assert_eq!(code, 200, "{text}");
    let (code, text) = m.act(&r.id, "explode").await;
    assert_eq!(code, 400, "{text}");
    assert_eq!(m.act(&r.id, "start").await.0, 409);
}

#[tokio::test]
async fn bootagent_hosts_get_install_jobs_from_the_rollout() {
    let m = Meta::start("1.0");
    let reg = |host: &str| {
        let body = json!({"hostname": host, "agentsn": ""});
        let r = m.http.post(m.url("/agent/register")).json(&body).send();
        async move {
            let v: Value = r.await.unwrap().json().await.unwrap();
            (
                v["agentsn"].as_str().unwrap().to_string(),
                v["credential"].as_str().unwrap_or("").to_string(),
            )
        }
    };
    let (sn_a, cred_a) = reg("canary-00").await;
    let (sn_b, cred_b) = reg("web-00").await;
    let report = |host: &str, sn: &str, cred: &str, version: &str, uptime: u64| {
        let body = json!({"hostname": host, "agentsn": sn, "version": "t", "step": 60,
            "agents": [{"name": "demo", "version": version, "status": "running", "uptime": uptime}]});
        let r = m
            .http
            .post(m.url("/agent/status"))
            .bearer_auth(cred)
            .json(&body)
            .send();
        async move { r.await.unwrap().json::<Value>().await.unwrap() }
    };
    report("canary-00", &sn_a, &cred_a, "1.0", 100).await;
    report("web-00", &sn_b, &cred_b, "1.0", 100).await;
    let r = m.create(two_waves(json!({"minHealthySecs": 4}))).await;
    let jobs_for = |v: &Value| -> Vec<String> {
        v["jobs"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|j| j["version"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut got = Vec::new();
    for _ in 0..100 {
        got = jobs_for(&report("canary-00", &sn_a, &cred_a, "1.0", 100).await);
        if !got.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(got.iter().any(|v| v == "2.0"), "no install of 2.0: {got:?}");
    assert!(jobs_for(&report("web-00", &sn_b, &cred_b, "1.0", 100).await).is_empty());
    // The agent's uptime counts, from the admission on: 2.0 reported up for an hour is not
    // healthy at once; it is after minHealthySecs (4) more of reports without a restart.
    report("canary-00", &sn_a, &cred_a, "2.0", 3600).await;
    let v = m.view(&r.id).await;
    assert_eq!(v.waves[0].counts.healthy, 0, "{v:#?}");
    let started = std::time::Instant::now();
    let mut uptime = 3600;
    loop {
        uptime += 1;
        report("canary-00", &sn_a, &cred_a, "2.0", uptime).await;
        if m.view(&r.id).await.waves[0].counts.healthy == 1 {
            break;
        }
        assert!(started.elapsed() < WAIT, "canary-00 never healthy");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Two replicas on one PostgreSQL: a rollout created on one is run by both controllers
/// (each decision taken over the revision before it), hosts reporting to either replica
/// get the same answer, and an operator's pause through one holds both.
#[tokio::test]
async fn two_replicas_run_one_rollout() {
    let Some(pg) = test_support::postgres::Cluster::start() else {
        return;
    };
    let url = pg.create_db("rollouts");
    let a = Meta::start_on("1.0", &url, 0);
    let b = Meta::start_on("1.0", &url, a.port);
    let fleet = hosts("web-", 12);
    for (i, h) in fleet.iter().enumerate() {
        let m = if i.is_multiple_of(2) { &a } else { &b };
        m.beat(h, "1.0", "started", &[]).await;
    }
    let r = a
        .create(json!({
            "agent": "demo", "version": "2.0",
            "waves": [{"name": "half", "percent": 50}, {"name": "rest", "percent": 100}],
            "maxInFlight": 4, "minHealthySecs": 1, "healthyDeadlineSecs": 30, "start": true
        }))
        .await;
    // b knows the rollout from the store.
    b.wait_view(&r.id, |v| v.state == STATE_RUNNING).await;
    let mut running: std::collections::HashMap<String, String> =
        fleet.iter().map(|h| (h.clone(), "1.0".into())).collect();
    let mut most = 0;
    let mut round = 0usize;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        round += 1;
        for (i, h) in fleet.iter().enumerate() {
            // Each host alternates between the replicas from round to round.
            let m = if (i + round).is_multiple_of(2) {
                &a
            } else {
                &b
            };
            let want = running[h].clone();
            let told = m.beat(h, &want, "started", &[]).await;
            running.insert(h.clone(), told);
        }
        let (va, vb) = (a.view(&r.id).await, b.view(&r.id).await);
        most = most.max(va.counts.in_flight).max(vb.counts.in_flight);
        if va.state == STATE_COMPLETED && vb.state == STATE_COMPLETED {
            assert_eq!(va.counts.healthy, 12, "{va:#?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{va:#?}\n{vb:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(most <= 4, "in flight at once: {most}");
    for h in &fleet {
        assert_eq!(a.beat(h, "2.0", "started", &[]).await, "2.0");
        assert_eq!(b.beat(h, "2.0", "started", &[]).await, "2.0");
    }
    // A second rollout, paused through b, holds on a too.
    let next = b
        .create(json!({
            "agent": "demo", "version": "3.0", "waves": [{"percent": 100}],
            "minHealthySecs": 1, "start": true
        }))
        .await;
    let (code, text) = b.act(&next.id, "pause").await;
    assert_eq!(code, 200, "{text}");
    let v = a.wait_view(&next.id, |v| v.state == STATE_PAUSED).await;
    assert!(v.paused_reason.contains("operator"), "{v:#?}");
    // Both replicas acting on one old revision: one wins, the other is told to retry.
    let (x, y) = tokio::join!(a.act(&next.id, "resume"), b.act(&next.id, "resume"));
    let codes = [x.0, y.0];
    assert!(codes.contains(&200), "{x:?} {y:?}");
    assert!(codes.iter().all(|c| *c == 200 || *c == 409), "{x:?} {y:?}");
}

/// Outside its maintenance window a running rollout admits nobody and says why; a tag
/// wave takes the hosts `tagRules` give the tag.
#[tokio::test]
async fn outside_the_window_nothing_is_admitted_and_tag_waves_follow_tag_rules() {
    let m = Meta::start("1.0");
    for h in ["db-01", "db-02", "web-01"] {
        m.beat(h, "1.0", "started", &[]).await;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let minute = (now / 60) % 1440;
    let hm = |m: u64| format!("{:02}:{:02}", (m % 1440) / 60, m % 60);
    let (code, text) = m
        .post(
            "/api/rollouts/plan",
            json!({"agent": "demo", "version": "2.0", "waves": [{"name": "dbs", "tags": ["role=db"]}]}),
        )
        .await;
    assert_eq!(code, 200, "{text}");
    let plan: RolloutPlan = serde_json::from_str(&text).unwrap();
    assert_eq!(plan.waves[0].sample, vec!["db-01", "db-02"]);
    assert_eq!(plan.outside, 1);
    let r = m
        .create(json!({
            "agent": "demo", "version": "2.0", "start": true, "minHealthySecs": 1,
            "waves": [{"name": "dbs", "tags": ["role=db"]}],
            "window": {"start": hm(minute + 120), "end": hm(minute + 180)}
        }))
        .await;
    let v = m
        // Once the digest is known, the window alone holds it.
        .wait_view(&r.id, |v| {
            v.holds.iter().any(|h| h.kind == "window")
                && !v.holds.iter().any(|h| h.kind == "digest")
        })
        .await;
    assert!(
        v.holds
            .iter()
            .any(|h| h.text.contains("maintenance window")),
        "{v:#?}"
    );
    // Several passes later still nobody is admitted.
    for _ in 0..5 {
        assert_eq!(m.beat("db-01", "1.0", "started", &[]).await, "1.0");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(m.view(&r.id).await.counts.in_flight, 0);
}

/// A rollout's `tarball` may name a subfolder of `tarballDir` (seed 001's layout) or
/// another file server: ops-meta learns the digest there, legacy hosts get that base in
/// their answer and BootAgent hosts an install job from it, with its checksum.
#[tokio::test]
async fn rollout_tarballs_in_a_subfolder_or_on_another_server_reach_both_protocols() {
    let m = Meta::start("1.0");
    let sub = m.dir.path().join("files/demo/2.0");
    std::fs::create_dir_all(&sub).unwrap();
    std::fs::write(sub.join("demo-2.0.tar.gz"), "release 2.0 in a subfolder").unwrap();
    let other = test_support::fileserver::FileServer::start();
    test_support::tarball::publish(
        &other.dir.path().join("pkgs"),
        "demo",
        "3.0",
        b"release 3.0 elsewhere",
    );
    let (sn, cred) = {
        let body = json!({"hostname": "boot-01", "agentsn": ""});
        let v: Value = m
            .http
            .post(m.url("/agent/register"))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (
            v["agentsn"].as_str().unwrap().to_string(),
            v["credential"].as_str().unwrap().to_string(),
        )
    };
    let report = |version: &str| {
        let body = json!({"hostname": "boot-01", "agentsn": sn, "version": "t", "step": 60,
            "agents": [{"name": "demo", "version": version, "status": "running", "uptime": 100}]});
        let r = m
            .http
            .post(m.url("/agent/status"))
            .bearer_auth(&cred)
            .json(&body)
            .send();
        async move { r.await.unwrap().json::<Value>().await.unwrap() }
    };
    let legacy_tarball = |version: &'static str| {
        let body = json!({"hostname": "web-01", "realAgents": [
            {"name": "demo", "version": version, "status": "started", "timestamp": 1}]});
        let r = m.http.post(m.url("/heartbeat")).json(&body).send();
        async move {
            let v: Value = r.await.unwrap().json().await.unwrap();
            let a = &v["desiredAgents"][0];
            (
                a["version"].as_str().unwrap().to_string(),
                a["tarball"].as_str().unwrap().to_string(),
            )
        }
    };
    legacy_tarball("1.0").await;
    report("1.0").await;
    for (version, base, from) in [
        ("2.0", m.url("/demo/2.0/"), "1.0"),
        ("3.0", other.url("pkgs"), "2.0"),
    ] {
        let r = m
            .create(json!({
                "agent": "demo", "version": version, "tarball": base, "start": true,
                "waves": [{"percent": 100}], "minHealthySecs": 1
            }))
            .await;
        assert_eq!(r.from_version, from);
        // Admitted once the digest is learned: the legacy host is told the base, the
        // BootAgent host gets the job with the file's SHA-256.
        let deadline = std::time::Instant::now() + WAIT;
        let job = loop {
            let answer = report(from).await;
            let job = answer["jobs"]
                .as_array()
                .and_then(|a| a.iter().find(|j| j["version"] == version).cloned());
            if let Some(j) = job {
                break j;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{version}: no job: {answer}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(
            job["url"].as_str().unwrap(),
            format!("{}/demo-{version}.tar.gz", base.trim_end_matches('/')),
            "{job}"
        );
        let v = m.view(&r.id).await;
        assert_eq!(v.sha256.len(), 64, "{v:#?}");
        assert!(
            job["checksum"]
                .as_str()
                .unwrap()
                .to_lowercase()
                .contains(&v.sha256),
            "{job}"
        );
        let (told, tarball) = legacy_tarball(from).await;
        assert_eq!((told.as_str(), tarball.as_str()), (version, base.as_str()));
        // Both run it, healthy: the rollout completes.
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            report(version).await;
            let body = json!({"hostname": "web-01", "realAgents": [
                {"name": "demo", "version": version, "status": "started", "timestamp": 1}]});
            m.http
                .post(m.url("/heartbeat"))
                .json(&body)
                .send()
                .await
                .unwrap();
            if m.view(&r.id).await.state == STATE_COMPLETED {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{version} never completed"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
