//! ops-meta remembers: the real binary over real sockets with each durable store.
//! `kill -9` under load and a restart keep every serial, queued job, job result, event and
//! host (SQLite and PostgreSQL); two replicas on one PostgreSQL serve hosts that alternate
//! between them, every operator job run exactly once and its result visible on both; two
//! replicas registering one hostname at once give one serial; the original `cfg.json`
//! starts with an embedded store; bad stores are refused with clear errors; a BootAgent
//! host in its steady state is answered from memory, and a job queued through another
//! replica still reaches it once.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use test_support::{wait_for, KillOnDrop, TempDir};

const BIN: &str = env!("CARGO_BIN_EXE_ops-meta");
const WAIT: Duration = Duration::from_secs(30);

/// One ops-meta process: its folder (working directory, config, log) and port survive
/// a restart.
struct Meta {
    child: Option<KillOnDrop>,
    dir: PathBuf,
    port: u16,
    log: String,
}

fn cfg(port: u16, store: &str) -> String {
    let store = if store.is_empty() {
        String::new()
    } else {
        format!("\"store\": {store:?},")
    };
    format!(
        r#"{{"tarballDir": "", "http": {{"enabled": true, "listen": "127.0.0.1:{port}"}}, {store}
            "agents": []}}"#
    )
}

impl Meta {
    /// Writes the config for `store` in `dir` and starts ops-meta there.
    fn start(dir: &Path, name: &str, store: &str) -> Meta {
        let port = test_support::free_port();
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        test_support::write_file(&dir, "cfg.json", cfg(port, store));
        let mut m = Meta {
            child: None,
            dir,
            port,
            log: format!("{name}.log"),
        };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(&self.log))
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
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        test_support::wait_for("ops-meta to listen", WAIT, || {
            if let Some(st) = self.child.as_mut().unwrap().0.try_wait().unwrap() {
                panic!("ops-meta exited with {st}: {}", self.log());
            }
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        });
    }

    fn kill_9(&mut self) {
        let mut c = self.child.take().unwrap();
        c.0.kill().unwrap();
        c.0.wait().unwrap();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join(&self.log)).unwrap_or_default()
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

async fn post(c: &reqwest::Client, url: String, body: &Value) -> Value {
    let r = c.post(&url).json(body).send().await.unwrap();
    let code = r.status();
    let text = r.text().await.unwrap();
    assert!(code.is_success(), "{url}: {code}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{url}: {e}: {text}"))
}

/// [`post`] with a host's credential.
async fn post_as(c: &reqwest::Client, url: String, credential: &str, body: &Value) -> Value {
    let r = c
        .post(&url)
        .bearer_auth(credential)
        .json(body)
        .send()
        .await
        .unwrap();
    let code = r.status();
    let text = r.text().await.unwrap();
    assert!(code.is_success(), "{url}: {code}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{url}: {e}: {text}"))
}

async fn get(c: &reqwest::Client, url: String) -> (u16, String) {
    let r = c.get(&url).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// The credential each (hostname, serial) was given last: serials are random, so tests
/// that run at once never share an entry.
static CREDENTIALS: std::sync::Mutex<Option<HashMap<(String, String), String>>> =
    std::sync::Mutex::new(None);

fn credential_of(host: &str, serial: &str) -> String {
    CREDENTIALS
        .lock()
        .unwrap()
        .as_ref()
        .and_then(|m| m.get(&(host.to_string(), serial.to_string())).cloned())
        .unwrap_or_default()
}

async fn register(c: &reqwest::Client, m: &Meta, host: &str) -> String {
    register_as(c, m, host, "").await
}

/// [`register`] proposing `serial`, as ops-updater does (it makes its serial first).
async fn register_as(c: &reqwest::Client, m: &Meta, host: &str, serial: &str) -> String {
    let r = post(
        c,
        m.url("/agent/register"),
        &json!({"hostname": host, "agentsn": serial}),
    )
    .await;
    assert_eq!(r["status"], 0, "{r}");
    let serial = r["agentsn"].as_str().unwrap().to_string();
    let credential = r["credential"].as_str().unwrap_or_default().to_string();
    CREDENTIALS
        .lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .insert((host.to_string(), serial.clone()), credential);
    serial
}

/// One status report with these job results and events; the answer.
async fn status(
    c: &reqwest::Client,
    m: &Meta,
    host: &str,
    serial: &str,
    results: &[String],
    events: &[Value],
) -> Value {
    let jobs: Vec<Value> = results
        .iter()
        .map(|id| json!({"id": id, "errcode": 0, "message": "success"}))
        .collect();
    post_as(
        c,
        m.url("/agent/status"),
        &credential_of(host, serial),
        &json!({
            "hostname": host, "agentsn": serial, "version": "test", "uptime": 1,
            "timestamp": 1_700_000_000, "step": 60,
            "agents": [{"name": "basic", "version": "1.0", "status": "running", "uptime": 1}],
            "jobs": jobs, "events": events,
        }),
    )
    .await
}

fn job_ids(answer: &Value) -> Vec<String> {
    answer["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect()
}

async fn queue(c: &reqwest::Client, m: &Meta, action: &str, hosts: &[String]) -> Value {
    post(
        c,
        m.url("/api/jobs"),
        &json!({"action": action, "name": "basic", "hosts": hosts}),
    )
    .await
}

async fn batch(c: &reqwest::Client, m: &Meta, id: &str) -> Value {
    let (code, text) = get(c, m.url(&format!("/api/jobs/{id}"))).await;
    assert_eq!(code, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

fn states(b: &Value) -> HashMap<String, String> {
    b["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| {
            (
                j["host"].as_str().unwrap().to_string(),
                j["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(-1.0)
}

/// Legacy heartbeats for `lg-0..lg-N` in a loop until told to stop, tolerating a server
/// that is down; counts full passes over the fleet.
fn loader(port: Arc<AtomicU64>, hosts: usize, stop: Arc<AtomicBool>, passes: Arc<AtomicU64>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let c = http();
        while !stop.load(Ordering::Relaxed) {
            for i in 0..hosts {
                let body = json!({"hostname": format!("lg-{i}"), "realAgents": [
                    {"name": "falcon-agent", "version": "1.0.0", "status": "started", "timestamp": 1_431_000_000}]});
                let url = format!(
                    "http://127.0.0.1:{}/heartbeat",
                    port.load(Ordering::Relaxed)
                );
                let _ = c.post(url).json(&body).send().await;
            }
            passes.fetch_add(1, Ordering::Relaxed);
        }
    });
}

/// `kill -9` while legacy hosts heartbeat, then a restart: every host, serial, queued job,
/// job result and event acknowledged before the kill is there.
async fn kill_9_under_load(store: String) {
    const LEGACY: usize = 2000;
    const BOOT: usize = 20;
    let dir = test_support::tempdir().unwrap();
    let mut m = Meta::start(dir.path(), "meta", &store);
    let c = http();

    let port = Arc::new(AtomicU64::new(m.port as u64));
    let stop = Arc::new(AtomicBool::new(false));
    let passes = Arc::new(AtomicU64::new(0));
    let load = {
        let (port, stop, passes) = (port.clone(), stop.clone(), passes.clone());
        std::thread::spawn(move || loader(port, LEGACY, stop, passes))
    };

    let hosts: Vec<String> = (0..BOOT).map(|i| format!("boot-{i}")).collect();
    let mut serials = Vec::new();
    for h in &hosts {
        let s = register(&c, &m, h).await;
        status(&c, &m, h, &s, &[], &[]).await;
        serials.push(s);
    }
    let b = queue(&c, &m, "restart", &hosts).await;
    let batch_id = b["id"].as_str().unwrap().to_string();
    assert_eq!(b["jobs"].as_array().unwrap().len(), BOOT, "{b}");
    // The first half run the job and report it; the rest have it pending.
    let mut handed = HashMap::new();
    for (i, h) in hosts.iter().enumerate() {
        let a = status(&c, &m, h, &serials[i], &[], &[]).await;
        let ids = job_ids(&a);
        assert_eq!(ids.len(), 1, "{a}");
        handed.insert(h.clone(), ids[0].clone());
        if i < BOOT / 2 {
            let events: Vec<Value> = (1..=3)
                .map(|seq| json!({"seq": seq, "time": 1_700_000_000, "agent": "basic", "kind": "exited", "cause": format!("exit code {seq}")}))
                .collect();
            let a = status(&c, &m, h, &serials[i], &ids, &events).await;
            assert!(job_ids(&a).is_empty(), "{a}");
        }
    }
    // Every legacy host was sent at least once and its row written.
    wait_for("a full pass of the legacy fleet", WAIT, || {
        passes.load(Ordering::Relaxed) >= 1
    });
    let written = || async {
        let (_, text) = get(&c, m.url("/metrics")).await;
        metric(&text, "ops_meta_store_rows_written_total")
    };
    let deadline = std::time::Instant::now() + WAIT;
    while written().await < LEGACY as f64 {
        assert!(std::time::Instant::now() < deadline, "rows not written");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    m.kill_9();
    m.spawn();
    // A new client: the old one's pooled connection went with the old process.
    let c = http();

    let (code, page) = get(&c, m.url("/status/json/falcon-agent")).await;
    assert_eq!(code, 200);
    let page: HashMap<String, Value> = serde_json::from_str(&page).unwrap();
    for i in 0..LEGACY {
        assert!(
            page.get(&format!("lg-{i}")).is_some_and(|v| !v.is_null()),
            "lg-{i} lost: {}",
            m.log()
        );
    }
    let b = batch(&c, &m, &batch_id).await;
    let st = states(&b);
    for (i, h) in hosts.iter().enumerate() {
        let want = if i < BOOT / 2 { "done" } else { "pending" };
        assert_eq!(st[h], want, "{h}: {b}");
        // The serial is still this host's; a pending job comes again, with its id.
        let a = status(&c, &m, h, &serials[i], &[], &[]).await;
        assert_eq!(a["status"], 0, "{h}: {a}");
        let ids = job_ids(&a);
        if i < BOOT / 2 {
            assert!(ids.is_empty(), "{h} got a job again: {a}");
        } else {
            assert_eq!(ids, [handed[h].clone()], "{h}: {a}");
        }
    }
    let (code, view) = get(&c, m.url("/api/hosts/boot-0")).await;
    assert_eq!(code, 200, "{view}");
    let view: Value = serde_json::from_str(&view).unwrap();
    assert_eq!(view["events"].as_array().unwrap().len(), 3, "{view}");
    assert_eq!(view["results"].as_array().unwrap().len(), 1, "{view}");

    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_then_restart_keeps_everything_sqlite() {
    kill_9_under_load("sqlite:fleet.db".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_then_restart_keeps_everything_postgres() {
    let Some(pg) = test_support::postgres::Cluster::start() else {
        return;
    };
    kill_9_under_load(pg.create_db("killed")).await;
}

/// Two replicas on one PostgreSQL; hosts switch replica every round (as behind a load
/// balancer). Every operator job, queued through either replica, is run exactly once,
/// never handed out after its result was taken, and shows as done on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_run_every_operator_job_exactly_once() {
    let Some(pg) = test_support::postgres::Cluster::start() else {
        return;
    };
    let url = pg.create_db("replicas");
    let dir = test_support::tempdir().unwrap();
    let ms = [
        Meta::start(dir.path(), "a", &url),
        Meta::start(dir.path(), "b", &url),
    ];
    let c = http();
    let hosts: Vec<String> = (0..12).map(|i| format!("web-{i}")).collect();
    let mut serials = HashMap::new();
    for (i, h) in hosts.iter().enumerate() {
        serials.insert(h.clone(), register(&c, &ms[i % 2], h).await);
    }
    // Batches through both replicas, before and while the hosts report.
    let mut batches = vec![
        queue(&c, &ms[0], "restart", &hosts).await,
        queue(&c, &ms[1], "stop", &hosts[..6]).await,
    ];
    let mut runs: HashMap<String, u32> = HashMap::new();
    let mut acked: HashSet<String> = HashSet::new();
    let mut to_report: HashMap<String, Vec<String>> = HashMap::new();
    for round in 0..10 {
        if round == 3 {
            batches.push(queue(&c, &ms[1], "restart", &hosts[6..]).await);
        }
        for (i, h) in hosts.iter().enumerate() {
            let m = &ms[(round + i) % 2];
            let results = to_report.remove(h).unwrap_or_default();
            let events = if round == 1 && i == 0 {
                vec![
                    json!({"seq": 1, "time": 1, "agent": "basic", "kind": "fatal", "cause": "crash loop"}),
                ]
            } else {
                vec![]
            };
            let a = status(&c, m, h, &serials[h], &results, &events).await;
            assert_eq!(a["status"], 0, "{h}: {a}");
            acked.extend(results);
            for id in job_ids(&a) {
                assert!(
                    !acked.contains(&id),
                    "{h}: job {id} handed out again after its result was taken (round {round})"
                );
                let n = runs.entry(id.clone()).or_default();
                if *n == 0 {
                    // The host runs a job once and reports its result next round.
                    to_report.entry(h.clone()).or_default().push(id);
                }
                *n += 1;
            }
        }
    }
    let mut expected = 0;
    for b in &batches {
        for j in b["jobs"].as_array().unwrap() {
            expected += 1;
            let id = j["id"].as_str().unwrap();
            assert_eq!(
                runs.get(id),
                Some(&1),
                "job {id} ran {:?} times",
                runs.get(id)
            );
        }
    }
    assert_eq!(runs.len(), expected, "jobs nobody queued: {runs:?}");
    for b in &batches {
        let id = b["id"].as_str().unwrap();
        for m in &ms {
            let st = states(&batch(&c, m, id).await);
            assert!(
                st.values().all(|s| s == "done"),
                "batch {id} on :{}: {st:?}",
                m.port
            );
        }
    }
    // The event reported to one replica shows on the other.
    let other = &ms[0];
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, v) = get(&c, other.url("/api/hosts/web-0")).await;
        let v: Value = serde_json::from_str(&v).unwrap();
        if v["events"].as_array().is_some_and(|e| e.len() == 1) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "event not seen: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Two replicas take the registration of one hostname at the same instant (the host's
/// retry of a lost answer, with the serial it proposed): one serial, which both accept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_registering_one_hostname_at_once_give_one_serial() {
    let Some(pg) = test_support::postgres::Cluster::start() else {
        return;
    };
    let url = pg.create_db("register");
    let dir = test_support::tempdir().unwrap();
    let (a, b) = (
        Meta::start(dir.path(), "a", &url),
        Meta::start(dir.path(), "b", &url),
    );
    let c = http();
    for i in 0..20 {
        let h = format!("db-{i}");
        let proposed = format!("sn-{i}");
        let (sa, sb) = tokio::join!(
            register_as(&c, &a, &h, &proposed),
            register_as(&c, &b, &h, &proposed)
        );
        assert_eq!(sa, sb, "{h}: two serials");
        for m in [&a, &b] {
            let r = status(&c, m, &h, &sa, &[], &[]).await;
            assert_eq!(r["status"], 0, "{h} on :{}: {r}", m.port);
        }
    }
}

/// The original `cfg.json`, without the new key: an SQLite file appears in the working
/// directory at first start, and a restart knows the hosts.
#[tokio::test]
async fn the_original_cfg_json_keeps_its_hosts_in_an_embedded_store() {
    let dir = test_support::tempdir().unwrap();
    let port = test_support::free_port();
    let original = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/meta/cfg.json"),
    )
    .unwrap()
    .replace("2000", &port.to_string());
    assert!(!original.contains("store"));
    let d = dir.path().join("meta");
    std::fs::create_dir_all(&d).unwrap();
    test_support::write_file(&d, "cfg.json", original);
    let mut m = Meta {
        child: None,
        dir: d.clone(),
        port,
        log: "meta.log".into(),
    };
    m.spawn();
    assert!(d.join("ops-meta.db").is_file());
    let c = http();
    let r = c
        .post(m.url("/heartbeat"))
        .body(r#"{"hostname":"web-01","realAgents":[{"name":"falcon-agent","version":"1.0.0","status":"started","timestamp":1431000000}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A clean stop writes what is queued.
    let pid = m.child.as_ref().unwrap().id();
    let st = test_support::command(Path::new("kill"))
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let code = m.child.as_mut().unwrap().0.wait().unwrap();
    assert!(code.success(), "{}", m.log());
    m.spawn();
    // A new client: the old one's pooled connection went with the old process.
    let c = http();
    let (_, page) = get(&c, m.url("/status/json/falcon-agent")).await;
    assert!(page.contains("\"web-01\":{"), "{page}");
}

/// Runs ops-meta in a fresh folder with `cfg`; returns its exit code and output.
fn run_once(dir: &TempDir, args: &[&str], cfg: &str) -> (i32, String) {
    test_support::write_file(dir.path(), "cfg.json", cfg);
    let out = test_support::command(Path::new(BIN))
        .args(["-c", "cfg.json"])
        .args(args)
        .current_dir(dir.path())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn a_malformed_store_key_is_refused_by_t() {
    let dir = test_support::tempdir().unwrap();
    for (store, want) in [
        (
            "mysql://db/fleet",
            r#"error: store: "mysql://db/fleet" is not "memory", "sqlite:PATH" or "postgres://USER@HOST/DB""#,
        ),
        ("sqlite:", r#"error: store: "sqlite:" needs a file"#),
        ("postgres://", "error: store: postgres:// names no host"),
    ] {
        let (code, out) = run_once(&dir, &["-T"], &cfg(1, store));
        assert_eq!(code, 78, "{store}: {out}");
        assert!(out.contains(want), "{store}: {out}");
    }
    let (code, out) = run_once(
        &dir,
        &["-T"],
        r#"{"http": {"enabled": false}, "store": 5, "agents": []}"#,
    );
    assert_eq!(code, 78, "{out}");
    assert!(
        out.contains("error: store: want a string, got a number"),
        "{out}"
    );
    let (code, out) = run_once(&dir, &["-T"], &cfg(1, "sqlite:x.db"));
    assert_eq!(code, 0, "{out}");
    assert!(!dir.path().join("x.db").exists(), "-T opened the store");
}

#[test]
fn an_unusable_sqlite_path_is_a_clear_error() {
    let dir = test_support::tempdir().unwrap();
    test_support::write_file(dir.path(), "afile", "");
    let (code, out) = run_once(
        &dir,
        &[],
        &cfg(test_support::free_port(), "sqlite:afile/fleet.db"),
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("store sqlite:afile/fleet.db: open: afile is not a folder"),
        "{out}"
    );
}

#[test]
fn a_store_newer_than_the_binary_is_refused_at_start() {
    let dir = test_support::tempdir().unwrap();
    meta::persist::sqlite::set_schema_version(&dir.path().join("fleet.db"), 99).unwrap();
    let (code, out) = run_once(
        &dir,
        &[],
        &cfg(test_support::free_port(), "sqlite:fleet.db"),
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "the database's schema is version 99, newer than this ops-meta knows ({})",
            meta::persist::SCHEMA_VERSION
        )),
        "{out}"
    );
}

/// A host's row is written when its report changes, not at every heartbeat: the same
/// report again (new timestamps only) writes nothing; a new version writes the row.
#[tokio::test]
async fn only_a_changed_report_is_written() {
    let dir = test_support::tempdir().unwrap();
    let m = Meta::start(dir.path(), "meta", "sqlite:fleet.db");
    let c = http();
    let beat = |version: &'static str, ts: i64| {
        let c = c.clone();
        let url = m.url("/heartbeat");
        async move {
            let body = json!({"hostname": "web-1", "realAgents": [
                {"name": "falcon-agent", "version": version, "status": "started", "timestamp": ts}]});
            let r = c.post(url).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200);
        }
    };
    let written = || async {
        let (_, text) = get(&c, m.url("/metrics")).await;
        (
            metric(&text, "ops_meta_store_rows_written_total"),
            metric(&text, "ops_meta_store_queue_hosts"),
        )
    };
    let settled = |want: f64| async move {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let (rows, queued) = written().await;
            if rows == want && queued == 0.0 {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "rows written {rows}, queued {queued}; want {want}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    beat("1.0.0", 1).await;
    settled(1.0).await;
    // The same report, many times (unless a minute boundary passes meanwhile, which
    // writes the last-seen time once: allowed).
    for ts in 2..50 {
        beat("1.0.0", ts).await;
    }
    // Whatever was queued is written (a queued host counts until its row is).
    let deadline = std::time::Instant::now() + WAIT;
    let rows = loop {
        let (rows, queued) = written().await;
        if queued == 0.0 {
            break rows;
        }
        assert!(std::time::Instant::now() < deadline, "queue never empties");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(rows <= 2.0, "unchanged reports wrote {rows} rows");
    beat("1.0.1", 60).await;
    settled(rows + 1.0).await;
}

/// Legacy hosts behind a round-robin balancer: what a host reported to one replica shows
/// on the other's status page, and the newer report wins whichever replica took it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_reports_to_one_replica_show_on_the_other() {
    let Some(pg) = test_support::postgres::Cluster::start() else {
        return;
    };
    let url = pg.create_db("legacy");
    let dir = test_support::tempdir().unwrap();
    let (a, b) = (
        Meta::start(dir.path(), "a", &url),
        Meta::start(dir.path(), "b", &url),
    );
    let c = http();
    let beat = |m: &Meta, host: String, version: &'static str| {
        let (c, url) = (c.clone(), m.url("/heartbeat"));
        async move {
            let body = json!({"hostname": host, "realAgents": [
                {"name": "falcon-agent", "version": version, "status": "started", "timestamp": 1}]});
            assert_eq!(c.post(url).json(&body).send().await.unwrap().status(), 200);
        }
    };
    let versions = |m: &Meta| {
        let (c, url) = (c.clone(), m.url("/status/json/falcon-agent"));
        async move {
            let (_, page) = get(&c, url).await;
            let page: HashMap<String, Value> = serde_json::from_str(&page).unwrap();
            page.into_iter()
                .map(|(h, v)| (h, v["version"].as_str().unwrap_or("").to_string()))
                .collect::<HashMap<_, _>>()
        }
    };
    for i in 0..50 {
        beat(&a, format!("web-{i}"), "1.0.0").await;
    }
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let v = versions(&b).await;
        if (0..50).all(|i| v.get(&format!("web-{i}")).is_some_and(|s| s == "1.0.0")) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "b sees {} of 50",
            v.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The host's next round goes to b, with a new version: a follows.
    beat(&b, "web-0".into(), "1.0.1").await;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let v = versions(&a).await;
        if v.get("web-0").is_some_and(|s| s == "1.0.1") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a still shows {:?}",
            v.get("web-0")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A BootAgent host in its steady state is answered from memory alone; a job to hand out
/// and a job result go through the store. With `two` replicas on one PostgreSQL the job is
/// queued through the other replica: it reaches the host, still reporting to the first,
/// within a few reports, and once.
async fn steady_reports_are_answered_from_memory(store: &str, two: bool) {
    let dir = test_support::tempdir().unwrap();
    let mut ms = vec![Meta::start(dir.path(), "a", store)];
    if two {
        ms.push(Meta::start(dir.path(), "b", store));
    }
    let (m, other) = (&ms[0], ms.last().unwrap());
    let c = http();
    let paths = || async {
        let (_, text) = get(&c, m.url("/metrics")).await;
        (
            metric(&text, "ops_meta_bootagent_reports_total{path=\"memory\"}"),
            metric(&text, "ops_meta_bootagent_reports_total{path=\"store\"}"),
        )
    };
    let serial = register(&c, m, "web-1").await;
    for _ in 0..20 {
        let a = status(&c, m, "web-1", &serial, &[], &[]).await;
        assert_eq!(
            (a["status"].clone(), job_ids(&a).len()),
            (json!(0), 0),
            "{a}"
        );
    }
    let (memory, through) = paths().await;
    // The first report is new to the row; a minute boundary may add one more.
    assert!(
        memory >= 18.0 && through <= 2.0,
        "memory {memory}, store {through}"
    );
    let b = queue(&c, other, "restart", &["web-1".to_string()]).await;
    let deadline = std::time::Instant::now() + WAIT;
    let ids = loop {
        let a = status(&c, m, "web-1", &serial, &[], &[]).await;
        let ids = job_ids(&a);
        if !ids.is_empty() {
            break ids;
        }
        assert!(std::time::Instant::now() < deadline, "the job never came");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(ids.len(), 1);
    let a = status(&c, m, "web-1", &serial, &ids, &[]).await;
    assert!(job_ids(&a).is_empty(), "{a}");
    let a = status(&c, m, "web-1", &serial, &[], &[]).await;
    assert!(job_ids(&a).is_empty(), "handed out again: {a}");
    let st = states(&batch(&c, other, b["id"].as_str().unwrap()).await);
    assert_eq!(st.get("web-1").map(String::as_str), Some("done"), "{st:?}");
    let (_, after) = paths().await;
    assert!(after >= through + 2.0, "store {through} -> {after}");
}

#[tokio::test]
async fn steady_bootagent_reports_are_answered_from_memory_sqlite() {
    steady_reports_are_answered_from_memory("sqlite:fleet.db", false).await;
}

#[tokio::test]
async fn steady_bootagent_reports_are_answered_from_memory_postgres() {
    let Some(pg) = test_support::postgres::Cluster::start() else {
        return;
    };
    steady_reports_are_answered_from_memory(&pg.create_db("steady"), true).await;
}
