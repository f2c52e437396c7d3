//! End-to-end tests of the real `ops-meta` binary: an original-format `cfg.json`, real
//! sockets on 127.0.0.1, signals, and the exit codes of `-T`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use proto::legacy::HeartbeatResponse;
use test_support::{wait_for, wait_listening, KillOnDrop, TempDir};

const BIN: &str = env!("CARGO_BIN_EXE_ops-meta");
const WAIT: Duration = Duration::from_secs(20);

/// An original-format config: relative `tarballDir`, resolved against the working
/// directory the binary runs in (not the config's own folder).
fn original_cfg(port: u16, version: &str, extra: &str) -> String {
    format!(
        r#"{{
    "debug": true,
    "tarballDir": "./tarball",
    "http": {{"enabled": true, "listen": "127.0.0.1:{port}"}},
    {extra}
    "agents": [
        {{
            "default": {{"name": "falcon-agent", "version": "{version}",
                        "tarball": "http://127.0.0.1:{port}/", "md5": "", "cmd": "start"}},
            "others": [
                {{"prefix": "lg-", "version": "9.9.9", "tarball": "", "md5": "", "cmd": ""}}
            ]
        }}
    ]
}}"#
    )
}

const BAD_CFG: &str = r#"{
    "tarballDir": "./tarball",
    "http": {"enabled": true, "listen": "127.0.0.1:nope"},
    "agents": [
        {"default": {"name": "../evil", "version": "1", "tarball": "http://x/", "cmd": "start"}},
        {"default": {"name": "ok", "version": "", "tarball": "http://x/", "cmd": "reboot"},
         "others": [{"prefix": "", "version": "2"}]}
    ]
}"#;

/// A running `ops-meta` in its own temp dir: `<dir>/conf/cfg.json`, `<dir>/tarball/`,
/// working directory `<dir>`, output in `<dir>/meta.log`.
struct Meta {
    child: KillOnDrop,
    addr: SocketAddr,
    dir: TempDir,
}

impl Meta {
    fn start(cfg_for_port: impl Fn(u16) -> String) -> Meta {
        Meta::start_with(cfg_for_port, &[])
    }

    /// As [`Meta::start`], with extra flags.
    fn start_with(cfg_for_port: impl Fn(u16) -> String, flags: &[&str]) -> Meta {
        let dir = test_support::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("tarball")).unwrap();
        // A decoy: were tarballDir resolved against the config's folder, this is what
        // would be served.
        test_support::write_file(&dir.path().join("conf/tarball"), "where.txt", "conf");
        test_support::write_file(&dir.path().join("tarball"), "where.txt", "cwd");
        let port = test_support::free_port();
        test_support::write_file(dir.path(), "conf/cfg.json", cfg_for_port(port));
        let log = std::fs::File::create(dir.path().join("meta.log")).unwrap();
        let child = test_support::command(Path::new(BIN))
            .args(["-c", "conf/cfg.json"])
            .args(flags)
            .current_dir(dir.path())
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut m = Meta {
            child: KillOnDrop(child),
            addr,
            dir,
        };
        let deadline = std::time::Instant::now() + WAIT;
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Some(st) = m.child.try_wait().unwrap() {
                panic!("ops-meta exited with {st}: {}", m.log());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "ops-meta not listening"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        wait_listening(addr, WAIT);
        m
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn cfg_path(&self) -> PathBuf {
        self.dir.path().join("conf/cfg.json")
    }

    fn tarballs(&self) -> PathBuf {
        self.dir.path().join("tarball")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("meta.log")).unwrap_or_default()
    }

    fn signal(&self, sig: &str) {
        let st = test_support::command(Path::new("kill"))
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

async fn heartbeat(m: &Meta, host: &str, agents: &str) -> (u16, String) {
    let r = client()
        .post(m.url("/heartbeat"))
        .body(format!(r#"{{"hostname":"{host}","realAgents":{agents}}}"#))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn desired_version(m: &Meta, host: &str) -> String {
    let (status, body) = heartbeat(m, host, "[]").await;
    assert_eq!(status, 200, "{body}");
    let r: HeartbeatResponse = serde_json::from_str(&body).unwrap();
    r.desired_agents[0].version.clone()
}

async fn get(m: &Meta, path: &str) -> (u16, String) {
    let r = client().get(m.url(path)).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Polls an async condition (the server is another process, so waiting on it here does
/// not block it).
async fn wait_until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn heartbeat_status_and_reload_via_http_and_sighup() {
    let m = Meta::start(|p| original_cfg(p, "1.0.0", ""));
    let agents =
        r#"[{"name":"falcon-agent","version":"0.9","status":"started","timestamp":1431000000}]"#;
    let (status, body) = heartbeat(&m, "web-01", agents).await;
    assert_eq!(status, 200);
    let port = m.addr.port();
    assert_eq!(
        body,
        format!(
            r#"{{"errorMessage":"","desiredAgents":[{{"name":"falcon-agent","version":"1.0.0","tarball":"http://127.0.0.1:{port}/","md5":"","cmd":"start"}}]}}"#
        )
    );
    assert_eq!(desired_version(&m, "lg-01").await, "9.9.9");
    let (status, body) = heartbeat(&m, "", "[]").await;
    assert_eq!((status, body.as_str()), (400, "hostname is blank\n"));

    let (status, text) = get(&m, "/status/text/falcon-agent").await;
    assert_eq!(status, 200);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(lines[0], "lg-01 not found");
    assert!(
        lines[1].starts_with("web-01 0.9 started 1431000000 2015-05-0"),
        "{text}"
    );
    let (_, json) = get(&m, "/status/json/falcon-agent").await;
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["lg-01"], serde_json::Value::Null);
    assert_eq!(v["web-01"]["version"], "0.9");
    // debug: true logs each heartbeat.
    wait_for("heartbeat logged", WAIT, || m.log().contains("host=web-01"));

    // Reload through HTTP: good, then bad (refused, with every error; old config stays).
    std::fs::write(m.cfg_path(), original_cfg(port, "2.0.0", "")).unwrap();
    let (status, text) = get(&m, "/config/reload").await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(desired_version(&m, "web-01").await, "2.0.0");
    std::fs::write(m.cfg_path(), BAD_CFG).unwrap();
    let (status, text) = get(&m, "/config/reload").await;
    assert_eq!(status, 400);
    for field in [
        "http.listen",
        "agents[0].default.name",
        "agents[1].default.version",
        "agents[1].default.cmd",
        "agents[1].others[0].prefix",
    ] {
        assert!(text.contains(field), "{field} missing: {text}");
    }
    assert_eq!(desired_version(&m, "web-01").await, "2.0.0");

    // Reload through SIGHUP: good, then bad.
    std::fs::write(m.cfg_path(), original_cfg(port, "3.0.0", "")).unwrap();
    m.signal("-HUP");
    wait_until("SIGHUP reload", || async {
        desired_version(&m, "web-01").await == "3.0.0"
    })
    .await;
    std::fs::write(m.cfg_path(), BAD_CFG).unwrap();
    m.signal("-HUP");
    wait_for("refused reload logged", WAIT, || {
        m.log().contains("agents[1].others[0].prefix")
    });
    assert!(m.log().contains("config reload refused"));
    assert_eq!(desired_version(&m, "web-01").await, "3.0.0");
    // Still alive and well after all that.
    assert_eq!(get(&m, "/health").await, (200, "ok".to_string()));
}

#[tokio::test]
async fn tarballs_are_served_with_ranges_validators_and_sha256() {
    let m = Meta::start(|p| original_cfg(p, "1.0.0", r#""shaRecheckSecs": 1,"#));
    let data = test_support::agent::agent_tarball(
        "falcon-agent",
        "1.0.0",
        test_support::agent::Behaviour::Good,
    );
    let (md5, sha) = test_support::tarball::publish(&m.tarballs(), "falcon-agent", "1.0.0", &data);
    let c = client();

    // tarballDir is relative to the working directory, as in the original.
    assert_eq!(get(&m, "/where.txt").await, (200, "cwd".to_string()));

    let r = c
        .get(m.url("/falcon-agent-1.0.0.tar.gz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.content_length(), Some(data.len() as u64));
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    assert_eq!(r.bytes().await.unwrap().as_ref(), data.as_slice());
    let (status, text) = get(&m, "/falcon-agent-1.0.0.tar.gz.md5").await;
    assert_eq!(status, 200);
    assert_eq!(proto::legacy::parse_md5_file(&text), Some(md5));

    let r = c
        .head(m.url("/falcon-agent-1.0.0.tar.gz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-length"].to_str().unwrap(),
        data.len().to_string()
    );

    let r = c
        .get(m.url("/falcon-agent-1.0.0.tar.gz"))
        .header("range", "bytes=10-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.headers()["content-range"].to_str().unwrap(),
        format!("bytes 10-{}/{}", data.len() - 1, data.len())
    );
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[10..]);

    let r = c
        .get(m.url("/falcon-agent-1.0.0.tar.gz"))
        .header("range", format!("bytes={}-", data.len()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(
        r.headers()["content-range"].to_str().unwrap(),
        format!("bytes */{}", data.len())
    );

    let r = c
        .get(m.url("/falcon-agent-1.0.0.tar.gz"))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    let r = c
        .get(m.url("/falcon-agent-1.0.0.tar.gz"))
        .header("range", "bytes=0-3")
        .header("if-range", "\"stale\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // ops-meta hashes the local tarball and adds sha256 to the answer.
    wait_until("sha256 in the heartbeat answer", || async {
        let (_, body) = heartbeat(&m, "web-01", "[]").await;
        let r: HeartbeatResponse = serde_json::from_str(&body).unwrap();
        r.desired_agents[0].sha256.as_deref() == Some(sha.as_str())
    })
    .await;
}

/// Sends one raw request line (HTTP clients would normalise the path) and returns the
/// whole response.
fn raw_get(addr: SocketAddr, target: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn escaping_tarball_dir_is_refused() {
    let m = Meta::start(|p| original_cfg(p, "1.0.0", ""));
    test_support::write_file(m.dir.path(), "secret.txt", "SECRET-OUTSIDE");
    test_support::write_file(&m.tarballs(), ".hidden", "SECRET-HIDDEN");
    test_support::write_file(&m.tarballs(), "ok.tar.gz", "fine");
    std::os::unix::fs::symlink(
        m.dir.path().join("secret.txt"),
        m.tarballs().join("link.tar.gz"),
    )
    .unwrap();
    std::os::unix::fs::symlink("/etc", m.tarballs().join("etc")).unwrap();
    let targets = [
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/%2E%2E/secret.txt",
        "/.%2e/secret.txt",
        "/ok.tar.gz/../../secret.txt",
        "/..%2fsecret.txt",
        "/..%2Fsecret.txt",
        "/..%5csecret.txt",
        "/..\\secret.txt",
        "/ok.tar.gz%00",
        "//etc/passwd",
        "/etc/passwd",
        "/link.tar.gz",
        "/.hidden",
        "/%2ehidden",
        "/",
        "/etc/",
    ];
    for t in targets {
        let resp = raw_get(m.addr, t);
        let status_line = resp.lines().next().unwrap_or_default().to_string();
        assert!(
            status_line.starts_with("HTTP/1.1 400") || status_line.starts_with("HTTP/1.1 404"),
            "{t}: {status_line}"
        );
        assert!(!resp.contains("SECRET"), "{t} leaked: {resp}");
        assert!(!resp.contains("root:"), "{t} leaked /etc/passwd");
    }
    let ok = raw_get(m.addr, "/ok.tar.gz");
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.ends_with("fine"));
}

fn ops_meta(args: &[&str], cwd: &Path) -> (i32, String) {
    let out = test_support::command(Path::new(BIN))
        .args(args)
        .current_dir(cwd)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn check_flag_version_flag_and_bad_config_exit_codes() {
    let dir = test_support::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("tarball")).unwrap();
    test_support::write_file(dir.path(), "cfg.json", original_cfg(2000, "1.0.0", ""));
    test_support::write_file(dir.path(), "bad.json", BAD_CFG);
    test_support::write_file(
        dir.path(),
        "warn.json",
        original_cfg(2000, "1.0.0", r#""forkOption": 1,"#),
    );

    let (code, text) = ops_meta(&["-T"], dir.path());
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("config cfg.json: ok"), "{text}");

    let (code, text) = ops_meta(&["-T", "-c", "warn.json"], dir.path());
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("warning: forkOption: unknown key, ignored"),
        "{text}"
    );

    let (code, text) = ops_meta(&["-T", "-c", "bad.json"], dir.path());
    assert_eq!(code, 78, "{text}");
    for line in [
        "error: http.listen:",
        "error: agents[0].default.name: invalid agent name \"../evil\"",
        "error: agents[1].default.version: invalid version",
        "error: agents[1].default.cmd:",
        "error: agents[1].others[0].prefix: is empty",
        "config bad.json: 5 error(s)",
    ] {
        assert!(text.contains(line), "{line:?} missing in:\n{text}");
    }

    let (code, text) = ops_meta(&["-T", "-c", "missing.json"], dir.path());
    assert_eq!(code, 78, "{text}");
    assert!(text.contains("read config missing.json"), "{text}");

    // Started with a bad config: refuses to run, same exit code.
    let (code, text) = ops_meta(&["-c", "bad.json"], dir.path());
    assert_eq!(code, 78, "{text}");
    assert!(text.contains("agents[0].default.name"), "{text}");

    let (code, text) = ops_meta(&["-v"], dir.path());
    assert_eq!((code, text.trim()), (0, meta::VERSION));

    for bad in ["0", "many", "99999"] {
        let (code, text) = ops_meta(&["--threads", bad], dir.path());
        assert_eq!(code, 2, "--threads {bad}: {text}");
        assert!(text.contains("--threads"), "{text}");
    }
}

#[tokio::test]
async fn one_runtime_thread_serves_heartbeats_and_status() {
    let m = Meta::start_with(|p| original_cfg(p, "1.0.0", ""), &["--threads", "1"]);
    // Several connections at once on the one thread.
    let mut calls = Vec::new();
    for i in 0..8 {
        let url = m.url("/heartbeat");
        calls.push(tokio::spawn(async move {
            let body = format!(r#"{{"hostname":"web-{i:02}","realAgents":[]}}"#);
            client()
                .post(url)
                .body(body)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }));
    }
    for c in calls {
        let answer: HeartbeatResponse = serde_json::from_str(&c.await.unwrap()).unwrap();
        assert_eq!(answer.desired_agents[0].version, "1.0.0");
    }
    let text = client()
        .get(m.url("/status/text/falcon-agent"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(text.lines().count(), 8, "{text}");
}

#[tokio::test]
async fn sigterm_finishes_the_request_in_flight() {
    let mut m = Meta::start(|p| original_cfg(p, "1.0.0", ""));
    let body = r#"{"hostname":"slow-01","realAgents":[]}"#;
    let mut s = TcpStream::connect(m.addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "POST /heartbeat HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{}",
        body.len(),
        &body[..10]
    )
    .unwrap();
    s.flush().unwrap();
    // The listener accepts in arrival order, so once a later connection has been
    // answered, ours has been accepted and its headers read: it is a request in flight.
    assert_eq!(get(&m, "/health").await.0, 200);
    m.signal("-TERM");
    // The listener closes first; the request in flight is still answered.
    wait_for("listener closed", WAIT, || {
        TcpStream::connect_timeout(&m.addr, Duration::from_millis(200)).is_err()
    });
    s.write_all(&body.as_bytes()[10..]).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let resp = String::from_utf8_lossy(&out);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        resp.contains(r#""desiredAgents":[{"name":"falcon-agent""#),
        "{resp}"
    );
    let st = test_support::wait_for_some("ops-meta to exit", WAIT, || m.child.try_wait().unwrap());
    assert!(st.success(), "{st}: {}", m.log());
    assert!(m.log().contains("SIGTERM"), "{}", m.log());
}

#[tokio::test]
async fn stale_hosts_are_dropped() {
    let m =
        Meta::start(|p| original_cfg(p, "1.0.0", r#""staleHostSecs": 1, "sweepIntervalSecs": 1,"#));
    assert_eq!(heartbeat(&m, "gone-01", "[]").await.0, 200);
    assert_eq!(
        get(&m, "/status/text/falcon-agent").await.1,
        "gone-01 not found\n"
    );
    wait_until("stale host dropped", || async {
        get(&m, "/status/text/falcon-agent").await.1.is_empty()
    })
    .await;
}

/// Regression: a FIFO in tarballDir blocked a blocking-pool thread per request forever
/// (about 512 requests hung every download and `/config/reload`), and the hasher followed
/// a symlink out of tarballDir that the file server refused, so the digest of an outside
/// file was sent to hosts.
#[tokio::test]
async fn a_fifo_or_an_escaping_symlink_in_tarball_dir_is_neither_served_nor_hashed() {
    let m = Meta::start(|p| original_cfg(p, "1.0.0", r#""shaRecheckSecs": 1,"#));
    nix::unistd::mkfifo(
        &m.tarballs().join("falcon-agent-1.0.0.tar.gz"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    test_support::write_file(m.dir.path(), "secret.txt", "SECRET-OUTSIDE");
    std::os::unix::fs::symlink(
        m.dir.path().join("secret.txt"),
        m.tarballs().join("falcon-agent-9.9.9.tar.gz"),
    )
    .unwrap();
    test_support::write_file(&m.tarballs(), "ok.tar.gz", "fine");
    let c = client();
    // More requests for the FIFO than the blocking pool has threads, 64 at a time.
    for _ in 0..10 {
        let batch = (0..64).map(|_| {
            let c = c.clone();
            let url = m.url("/falcon-agent-1.0.0.tar.gz");
            async move { c.get(url).send().await.unwrap().status().as_u16() }
        });
        for status in futures_util::future::join_all(batch).await {
            assert_eq!(status, 404);
        }
    }
    assert_eq!(get(&m, "/ok.tar.gz").await, (200, "fine".to_string()));
    assert_eq!(get(&m, "/config/reload").await.0, 200);

    // The digest task looked at both and refused them, with the reason, to BootAgent hosts.
    let post = |path: &'static str, credential: String, body: serde_json::Value| {
        let (c, url) = (c.clone(), m.url(path));
        async move {
            let mut r = c.post(url).json(&body);
            if !credential.is_empty() {
                r = r.bearer_auth(credential);
            }
            let r = r.send().await.unwrap();
            r.json::<serde_json::Value>().await.unwrap()
        }
    };
    let register = |host: &'static str| {
        let body = serde_json::json!({"hostname": host, "agentsn": ""});
        async move {
            let reg = post("/agent/register", String::new(), body).await;
            let field = |k: &str| reg[k].as_str().unwrap().to_string();
            (field("agentsn"), field("credential"))
        }
    };
    let lg_1 = register("lg-1").await;
    let web_1 = register("web-1").await;
    let status = |host: &'static str, (sn, credential): (String, String)| {
        let body = serde_json::json!({"hostname": host, "agentsn": sn, "agents": []});
        post("/agent/status", credential, body)
    };
    let deadline = std::time::Instant::now() + WAIT;
    let lg = loop {
        let lg = status("lg-1", lg_1.clone()).await;
        let web = status("web-1", web_1.clone()).await;
        let says = |v: &serde_json::Value, what: &str| {
            v["waiting"][0]["reason"]
                .as_str()
                .is_some_and(|r| r.contains(what))
        };
        if says(&lg, "resolves outside tarballDir") && says(&web, "not a regular file") {
            break lg;
        }
        assert!(std::time::Instant::now() < deadline, "{lg} {web}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(lg["jobs"], serde_json::json!([]), "{lg}");
    // Legacy hosts of the same prefixes (the BootAgent hosts' names are theirs alone).
    for host in ["lg-2", "web-2"] {
        let (_, body) = heartbeat(&m, host, "[]").await;
        let r: HeartbeatResponse = serde_json::from_str(&body).unwrap();
        assert_eq!(r.desired_agents[0].sha256, None, "{host}: {body}");
    }
}
