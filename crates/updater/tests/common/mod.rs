//! Shared harness of the end-to-end tests: a real `ops-meta` with an original-format
//! config, a real `ops-updater` with a temp workdir, a tiny blocking HTTP client, and a
//! scriptable HTTP server for the cases the real meta cannot produce (cut downloads,
//! hostile answers).

// Each test binary uses a different part of this harness.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use test_support::{cargo_bin, command, free_port, wait_for, wait_listening, KillOnDrop, TempDir};

/// Generous bound for anything the daemons should do within a few rounds.
pub const CONVERGE: Duration = Duration::from_secs(60);

/// `GET http://{addr}{path}`; `None` when nothing answers.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code: u16 = head.split_whitespace().nth(1)?.parse().ok()?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Some((code, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// `GET` returning parsed JSON when the answer is a 200.
pub fn get_json(addr: SocketAddr, path: &str) -> Option<Value> {
    match http_get(addr, path)? {
        (200, body) => serde_json::from_str(&body).ok(),
        _ => None,
    }
}

/// A running `ops-meta` with its config and tarball folder.
pub struct Meta {
    pub child: Option<KillOnDrop>,
    pub addr: SocketAddr,
    pub dir: TempDir,
    pub agents: Value,
}

impl Meta {
    /// Starts ops-meta with `agents` (the original `agents` array) on a free port.
    pub fn start(agents: Value) -> Meta {
        Meta::start_on(free_port(), agents)
    }

    pub fn start_on(port: u16, agents: Value) -> Meta {
        let dir = test_support::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("tarball")).unwrap();
        let mut m = Meta {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
            agents,
        };
        m.write_config();
        m.spawn();
        m
    }

    /// Builds the meta config for `addr` without starting it (for "meta down" tests).
    pub fn prepare(port: u16, agents: Value) -> Meta {
        let dir = test_support::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("tarball")).unwrap();
        let m = Meta {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
            agents,
        };
        m.write_config();
        m
    }

    pub fn spawn(&mut self) {
        let mut cmd = command(&cargo_bin("ops-meta"));
        cmd.arg("-c")
            .arg(self.dir.path().join("cfg.json"))
            .current_dir(self.dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        self.child = Some(KillOnDrop(cmd.spawn().expect("start ops-meta")));
        wait_listening(self.addr, CONVERGE);
    }

    pub fn tarball_dir(&self) -> PathBuf {
        self.dir.path().join("tarball")
    }

    /// Base URL for `tarball` fields.
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn write_config(&self) {
        let cfg = json!({
            "debug": false,
            "tarballDir": self.tarball_dir(),
            "http": {"enabled": true, "listen": self.addr.to_string()},
            // These tests count the requests their own file servers get: ops-meta must not
            // download a tarball to hash it (tests/matrix.rs covers that).
            "remoteHashMaxBytes": 0,
            "agents": self.agents,
        });
        test_support::write_file(
            self.dir.path(),
            "cfg.json",
            serde_json::to_vec_pretty(&cfg).unwrap(),
        );
    }

    /// Replaces the `agents` array and reloads the running server.
    pub fn set_agents(&mut self, agents: Value) {
        self.agents = agents;
        self.write_config();
        let (code, body) = http_get(self.addr, "/config/reload").expect("reload answered");
        assert_eq!(code, 200, "reload failed: {body}");
    }

    /// Sets one default entry per `(name, version, cmd)`, served from meta itself, and
    /// reloads.
    pub fn desire(&mut self, list: &[(&str, &str, &str)]) {
        let base = self.base();
        let agents: Vec<Value> = list
            .iter()
            .map(|(n, v, c)| agent_entry(n, v, &base, c))
            .collect();
        self.set_agents(Value::Array(agents));
    }

    /// What meta knows of `agent` on `host` (`status/json`), if reported.
    pub fn reported(&self, agent: &str, host: &str) -> Option<Value> {
        let v = get_json(self.addr, &format!("/status/json/{agent}"))?;
        let r = v.get(host)?.clone();
        (!r.is_null()).then_some(r)
    }
}

/// `POST http://{addr}{path}` with a JSON body; status and body.
pub fn http_post(addr: SocketAddr, path: &str, body: &Value) -> (u16, String) {
    let body = body.to_string();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, body.to_string())
}

/// One `agents[]` entry: a default with optional `others`.
pub fn agent_entry(name: &str, version: &str, base: &str, cmd: &str) -> Value {
    json!({"default": {"name": name, "version": version, "tarball": base, "md5": "", "cmd": cmd}})
}

/// Publishes a fake agent into meta's tarball folder.
pub fn publish(
    meta: &Meta,
    name: &str,
    version: &str,
    b: test_support::agent::Behaviour,
) -> (String, String) {
    let t = test_support::agent::agent_tarball(name, version, b);
    test_support::tarball::publish(&meta.tarball_dir(), name, version, &t)
}

/// A running `ops-updater` with its own workdir and local endpoint.
pub struct Updater {
    pub child: Option<KillOnDrop>,
    pub dir: TempDir,
    pub http: SocketAddr,
    pub hostname: String,
    pub log: PathBuf,
    /// The executable to run, when not the test build itself (a copy that a self-upgrade
    /// may replace).
    pub exe: Option<PathBuf>,
}

impl Updater {
    /// Test defaults: 1 s interval, first round within 100 ms, short timeouts.
    pub fn config(server: &str, hostname: &str, http: SocketAddr, workdir: &Path) -> Value {
        json!({
            "debug": true,
            // These tests drive the legacy heartbeat; BootAgent mode has tests/bootagent.rs.
            "protocol": "legacy",
            "hostname": hostname,
            "desiredAgent": "",
            "server": server,
            "interval": 1,
            "http": {"enabled": true, "listen": http.to_string()},
            "workdir": workdir,
            "firstDelayMaxMs": 100,
            "controlTimeoutSecs": 5,
            "startTimeoutSecs": 5,
            "statusTimeoutSecs": 2,
            "heartbeatTimeoutSecs": 5,
            "retryBaseSecs": 60,
            "maxUnpackedBytes": 16u64 << 20,
            // Several updaters run on this machine at once: each gets cgroups of its own
            // (removed on drop), or one's stop would kill another's agents.
            "cgroupParent": unique_cgroup_parent(),
        })
    }

    /// Starts an updater; `tweak` edits the default test config.
    pub fn start(server: &str, hostname: &str, tweak: impl FnOnce(&mut Value)) -> Updater {
        let mut u = Updater::prepare(server, hostname, tweak);
        u.spawn();
        u
    }

    /// An updater's folder and config, not started yet.
    pub fn prepare(server: &str, hostname: &str, tweak: impl FnOnce(&mut Value)) -> Updater {
        let dir = test_support::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("work")).unwrap();
        let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut cfg = Updater::config(server, hostname, http, &dir.path().join("work"));
        tweak(&mut cfg);
        test_support::write_file(
            dir.path(),
            "cfg.json",
            serde_json::to_vec_pretty(&cfg).unwrap(),
        );
        Updater {
            child: None,
            log: dir.path().join("updater.log"),
            dir,
            http,
            hostname: hostname.to_string(),
            exe: None,
        }
    }

    /// The supervisor's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("started").0.id()
    }

    /// True while the supervisor runs.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.0.try_wait().ok().flatten().is_none())
    }

    /// Starts it again until it runs (a start may find the last one's lock for a moment).
    pub fn respawn_until_up(&mut self) {
        wait_for("ops-updater to start again", CONVERGE, || {
            self.kill9();
            self.spawn();
            std::thread::sleep(Duration::from_millis(200));
            self.alive()
        });
    }

    /// (Re)starts the process on the same config and workdir.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let exe = self
            .exe
            .clone()
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_ops-updater")));
        let mut cmd = command(&exe);
        cmd.arg("-c")
            .arg(self.dir.path().join("cfg.json"))
            .current_dir(self.dir.path())
            .env("RUST_LOG", "debug")
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.child = Some(KillOnDrop(cmd.spawn().expect("start ops-updater")));
        wait_listening(self.http, CONVERGE);
    }

    /// SIGKILL of the supervisor, as a crash or an OOM kill would; its worker dies with it
    /// (`PR_SET_PDEATHSIG`), which is waited for too, so that nothing of it still holds the
    /// local endpoint's socket when this returns.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let worker = worker_of(c.id());
            c.kill().unwrap();
            c.wait().unwrap();
            if let Some(w) = worker {
                wait_for("the worker to die with its supervisor", CONVERGE, || {
                    std::fs::read_to_string(format!("/proc/{w}/stat")).map_or(true, |st| {
                        st.rsplit(')')
                            .next()
                            .is_some_and(|r| r.trim_start().starts_with('Z'))
                    })
                });
            }
        }
    }

    pub fn work(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    pub fn version_of(&self, agent: &str) -> Option<String> {
        std::fs::read_to_string(self.work().join(agent).join(".version"))
            .ok()
            .map(|s| s.trim().to_string())
    }

    /// The agent's entry on the local `/status`.
    pub fn agent_status(&self, agent: &str) -> Option<Value> {
        let v = get_json(self.http, "/status")?;
        v["agents"]
            .as_array()?
            .iter()
            .find(|a| a["name"] == agent)
            .cloned()
    }

    pub fn daemon_status(&self) -> Value {
        // Right after a (re)start the worker may take a moment to serve the socket.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(v) = get_json(self.http, "/status") {
                return v["daemon"].clone();
            }
            if std::time::Instant::now() > deadline {
                let log = self.log_text();
                let from = log.len().saturating_sub(6000);
                panic!(
                    "local /status did not answer; the log's end:\n{}",
                    &log[from..]
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for `n` more successful heartbeats than now.
    pub fn wait_heartbeats(&self, n: u64) {
        let start = self.daemon_status()["heartbeatsOk"].as_u64().unwrap();
        wait_for(&format!("{n} more heartbeats"), CONVERGE, || {
            self.daemon_status()["heartbeatsOk"].as_u64().unwrap() >= start + n
        });
    }

    /// Asserts the process is still running.
    pub fn assert_alive(&mut self) {
        let c = self.child.as_mut().expect("updater started");
        assert!(
            c.try_wait().unwrap().is_none(),
            "ops-updater exited; log:\n{}",
            self.log_text()
        );
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `.version` of `agent` is `version` and that version says started.
    pub fn wait_running(&self, agent: &str, version: &str) {
        wait_for(&format!("{agent} {version} running"), CONVERGE, || {
            self.version_of(agent).as_deref() == Some(version)
                && status_of(&self.work().join(agent).join(version)) == "started"
        });
    }
}

impl Drop for Updater {
    fn drop(&mut self) {
        if std::thread::panicking() && std::env::var_os("UPDATER_LOG_ON_FAILURE").is_some() {
            let text = self.log_text();
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| !l.contains("hyper") && !l.contains("reqwest"))
                .collect();
            let from = lines.len().saturating_sub(3000);
            eprintln!(
                "--- ops-updater log ({}) ---\n{}",
                self.hostname,
                lines[from..].join("\n")
            );
        }
        self.kill9();
        stop_all_agents(&self.work());
        let cfg = std::fs::read_to_string(self.dir.path().join("cfg.json")).unwrap_or_default();
        let cfg: Value = serde_json::from_str(&cfg).unwrap_or(Value::Null);
        if let Some(p) = cfg["cgroupParent"].as_str() {
            remove_cgroups(p);
        }
    }
}

/// A cgroup parent no other updater of this machine uses.
pub fn unique_cgroup_parent() -> String {
    use std::sync::atomic::AtomicUsize;
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "ops-updater-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Removes the cgroups made under `parent` (killing what still runs in them).
pub fn remove_cgroups(parent: &str) {
    for dir in updater::cgroup::Cgroups::detect(parent).parent_dirs() {
        test_support::cgroups::remove_tree(&dir);
    }
}

/// The worker (the one child) of the supervisor `pid`, from /proc.
pub fn worker_of(pid: u32) -> Option<u32> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    children.split_whitespace().next()?.parse().ok()
}

/// Runs `control status` in a version folder, as an operator would.
pub fn status_of(vdir: &Path) -> String {
    control(vdir, "status")
}

pub fn control(vdir: &Path, action: &str) -> String {
    if !vdir.join("control").is_file() {
        return "missing".into();
    }
    let out = command(&vdir.join("control"))
        .arg(action)
        .current_dir(vdir)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The fake agent's `control.log` lines (`start 1.0.0 ...`), status polls left out.
pub fn control_actions(vdir: &Path) -> Vec<String> {
    std::fs::read_to_string(vdir.join("control.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with("status"))
        .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
        .collect()
}

/// Stops every fake agent under `work`, so no test leaks background processes. Skips
/// agents whose status hangs (their `stop` still works: it does not call status).
pub fn stop_all_agents(work: &Path) {
    let Ok(agents) = std::fs::read_dir(work) else {
        return;
    };
    for a in agents.flatten() {
        let Ok(versions) = std::fs::read_dir(a.path()) else {
            continue;
        };
        for v in versions.flatten() {
            let p = v.path();
            kill_processes_in(&p);
            if p.join("app.pid").exists() {
                let _ = command(&p.join("control"))
                    .arg("stop")
                    .current_dir(&p)
                    .output();
            }
        }
    }
}

/// SIGKILLs every process whose working directory is `dir`: control scripts still
/// running when the updater was killed (a hung `status`), found precisely by their cwd.
pub fn kill_processes_in(dir: &Path) {
    let Ok(dir) = dir.canonicalize() else { return };
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if std::fs::read_link(p.path().join("cwd")).is_ok_and(|cwd| cwd == dir) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// What the scriptable server does with one request.
pub enum Reply {
    /// Status, content type, body.
    Full(u16, &'static str, Vec<u8>),
    /// Send headers for the whole `body`, then only its first `n` bytes, then close.
    Cut(Vec<u8>, usize),
    /// Send headers and the first `n` bytes of `body`, then wait until `release` is set
    /// before sending the rest.
    Stall(Vec<u8>, usize, Arc<AtomicBool>),
}

/// One request as the scriptable server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub body: Vec<u8>,
}

/// A small threaded HTTP/1.1 server on 127.0.0.1 answering each request from `handler`,
/// one connection per request. It honours `Range: bytes=N-` on `Full` 200 answers with a
/// 206, as a static file server would.
pub struct Scripted {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
}

impl Scripted {
    pub fn start(handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let handler = Arc::new(handler);
        {
            let seen = seen.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let seen = seen.clone();
                    let handler = handler.clone();
                    std::thread::spawn(move || {
                        let _ = serve_one(conn, &seen, &*handler);
                    });
                }
            });
        }
        Scripted { addr, seen, stop }
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve_one(
    conn: TcpStream,
    seen: &Mutex<Vec<Seen>>,
    handler: &(dyn Fn(&Seen) -> Reply + Send + Sync),
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut r = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let mut len = 0usize;
    let mut range = None;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
        if let Some(v) = lower.strip_prefix("range:") {
            range = Some(v.trim().to_string());
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    let req = Seen {
        method,
        path,
        range,
        body,
    };
    seen.lock().unwrap().push(req.clone());
    let mut w = conn;
    match handler(&req) {
        Reply::Full(code, ctype, data) => {
            let from = match (&req.range, code) {
                (Some(r), 200) => r
                    .strip_prefix("bytes=")
                    .and_then(|r| r.strip_suffix('-'))
                    .and_then(|n| n.parse::<usize>().ok())
                    .filter(|n| *n < data.len()),
                _ => None,
            };
            match from {
                Some(n) => {
                    write!(
                        w,
                        "HTTP/1.1 206 Partial Content\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nContent-Range: bytes {n}-{}/{}\r\nConnection: close\r\n\r\n",
                        data.len() - n,
                        data.len() - 1,
                        data.len()
                    )?;
                    w.write_all(&data[n..])?;
                }
                None => {
                    write!(
                        w,
                        "HTTP/1.1 {code} X\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        data.len()
                    )?;
                    w.write_all(&data)?;
                }
            }
        }
        Reply::Cut(data, n) => {
            write!(
                w,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                data.len()
            )?;
            w.write_all(&data[..n])?;
            w.flush()?;
            // Closing here cuts the transfer half-way.
        }
        Reply::Stall(data, n, release) => {
            write!(
                w,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                data.len()
            )?;
            w.write_all(&data[..n])?;
            w.flush()?;
            while !release.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
            }
            w.write_all(&data[n..])?;
        }
    }
    w.flush()
}

/// The workdir tree minus download scratch (`<agent>/.download/...`), which a failed
/// attempt may leave for a later resume.
pub fn tree_without_scratch(work: &Path) -> Vec<String> {
    test_support::tree(work)
        .into_iter()
        .filter(|p| !p.contains("/.download/") && !p.ends_with("/.download/"))
        .collect()
}

/// The local `/metrics` of `u`, parsed with an independent parser of the Prometheus text
/// format: every sample line must be one the parser takes.
pub fn scrape(u: &Updater) -> prometheus_parse::Scrape {
    let (code, text) = http_get(u.http, "/metrics").expect("local /metrics answers");
    assert_eq!(code, 200, "{text}");
    let samples = text.lines().filter(|l| !l.starts_with('#')).count();
    let s = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    assert_eq!(s.samples.len(), samples, "{text}");
    assert!(samples > 0);
    s
}

/// The counter `name` whose labels include `labels`, in a scrape.
pub fn counter(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let x = s
        .samples
        .iter()
        .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .unwrap_or_else(|| panic!("no {name} {labels:?}"));
    match x.value {
        prometheus_parse::Value::Counter(v) => v,
        ref v => panic!("{name} is not a counter: {v:?}"),
    }
}

/// The counter `name` with `labels` on `u`'s `/metrics` now.
pub fn metric(u: &Updater, name: &str, labels: &[(&str, &str)]) -> f64 {
    counter(&scrape(u), name, labels)
}
