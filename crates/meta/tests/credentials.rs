//! Host credentials, enrollment secrets and `legacyHeartbeat`, end to end: the real
//! `ops-meta` binary on 127.0.0.1 with its SQLite store in a temporary folder, driven over
//! HTTP as BootAgent hosts, legacy hosts and an operator would.

use std::path::Path;
use std::time::Duration;

use proto::bootagent::{
    RegisterRequest, RegisterResponse, StatusRequest, StatusResponse, STATUS_OK,
    STATUS_UNREGISTERED,
};
use proto::ops::{HostView, JobsResponse, ReadmitResponse};
use serde_json::json;
use sha2::{Digest, Sha256};
use test_support::{command, KillOnDrop, TempDir};

const WAIT: Duration = Duration::from_secs(20);
const SECRET_A: &str = "enroll-a-0123456789abcdef";
const SECRET_B: &str = "enroll-b-fedcba9876543210";

struct Meta {
    child: Option<KillOnDrop>,
    dir: TempDir,
    port: u16,
    http: reqwest::Client,
}

/// What an answer came back as: the status code and the body.
struct Answer {
    code: u16,
    text: String,
    www_authenticate: Option<String>,
}

impl Meta {
    fn start(extra: &str) -> Meta {
        let dir = test_support::tempdir().unwrap();
        let mut m = Meta {
            child: None,
            dir,
            port: test_support::free_port(),
            http: reqwest::Client::new(),
        };
        m.write_cfg(extra);
        m.spawn();
        m
    }

    fn write_cfg(&self, extra: &str) {
        std::fs::write(
            self.dir.path().join("cfg.json"),
            format!(
                r#"{{"tarballDir": "", "http": {{"enabled": true, "listen": "127.0.0.1:{}"}},
                    {extra} "agents": []}}"#,
                self.port
            ),
        )
        .unwrap();
    }

    fn spawn(&mut self) {
        let mut cmd = command(Path::new(env!("CARGO_BIN_EXE_ops-meta")));
        // The default store (`sqlite:ops-meta.db`) goes to the test's folder.
        cmd.arg("-c")
            .arg("cfg.json")
            .current_dir(self.dir.path())
            .env("RUST_LOG", "warn");
        self.child = Some(KillOnDrop(cmd.spawn().expect("start ops-meta")));
        // The pooled connections went with the old process.
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

    async fn post(&self, path: &str, credential: &str, body: &impl serde::Serialize) -> Answer {
        let mut r = self.http.post(self.url(path)).json(body);
        if !credential.is_empty() {
            r = r.bearer_auth(credential);
        }
        let r = r.send().await.unwrap();
        let www_authenticate = r
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_string());
        Answer {
            code: r.status().as_u16(),
            text: r.text().await.unwrap(),
            www_authenticate,
        }
    }

    async fn register_raw(&self, host: &str, sn: &str, credential: &str, secret: &str) -> Answer {
        let req = RegisterRequest {
            hostname: host.into(),
            agentsn: sn.into(),
            enrollment_secret: secret.into(),
        };
        self.post("/agent/register", credential, &req).await
    }

    /// A registration that must be taken.
    async fn register(
        &self,
        host: &str,
        sn: &str,
        credential: &str,
        secret: &str,
    ) -> RegisterResponse {
        let a = self.register_raw(host, sn, credential, secret).await;
        assert_eq!(a.code, 200, "register {host}: {}", a.text);
        let r: RegisterResponse = serde_json::from_str(&a.text).unwrap();
        assert_eq!(r.status, STATUS_OK, "{}", r.message);
        r
    }

    async fn status(&self, host: &str, sn: &str, credential: &str, agent: &str) -> Answer {
        let req = StatusRequest {
            hostname: host.into(),
            agentsn: sn.into(),
            version: "test".into(),
            step: 60,
            agents: vec![proto::bootagent::AgentStatus {
                name: agent.into(),
                version: "1.0".into(),
                status: "running".into(),
                uptime: 1,
            }],
            ..StatusRequest::default()
        };
        self.post("/agent/status", credential, &req).await
    }

    async fn status_ok(&self, host: &str, sn: &str, credential: &str) -> StatusResponse {
        let a = self.status(host, sn, credential, "basic").await;
        assert_eq!(a.code, 200, "status {host}: {}", a.text);
        serde_json::from_str(&a.text).unwrap()
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let r = self.http.get(self.url(path)).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    async fn host(&self, name: &str) -> HostView {
        let (code, text) = self.get(&format!("/api/hosts/{name}")).await;
        assert_eq!(code, 200, "{text}");
        serde_json::from_str(&text).unwrap()
    }

    /// Every byte of the SQLite store (database and write-ahead log).
    fn store_bytes(&self) -> Vec<u8> {
        let mut all = Vec::new();
        for f in ["ops-meta.db", "ops-meta.db-wal"] {
            if let Ok(b) = std::fs::read(self.dir.path().join(f)) {
                all.extend(b);
            }
        }
        all
    }
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

#[tokio::test]
async fn a_host_gets_a_credential_that_the_store_keeps_only_hashed() {
    let m = Meta::start("");
    // No enrollment secret configured: any host may enroll.
    let r = m.register("web-01", "", "", "").await;
    assert!(
        proto::bootagent::check_credential(&r.credential).is_ok(),
        "{r:?}"
    );
    assert!(r.message.contains("keep it"), "{}", r.message);
    assert_eq!(
        m.status_ok("web-01", &r.agentsn, &r.credential)
            .await
            .status,
        STATUS_OK
    );
    let store = m.store_bytes();
    assert!(contains(&store, &r.agentsn), "the row is in the store");
    assert!(!contains(&store, &r.credential), "the credential in clear");
    assert!(
        contains(&store, &sha256_hex(&r.credential)),
        "its hash is kept"
    );
    // A registration with the credential keeps the host, and sends no credential again.
    let again = m.register("web-01", &r.agentsn, &r.credential, "").await;
    assert_eq!(again.agentsn, r.agentsn);
    assert!(again.credential.is_empty());
    assert_eq!(
        m.status_ok("web-01", &r.agentsn, &r.credential)
            .await
            .status,
        STATUS_OK
    );
}

#[tokio::test]
async fn an_enrolled_hostname_cannot_be_registered_without_its_credential() {
    let mut m = Meta::start("");
    let a = m.register("web-01", "", "", "").await;
    m.status_ok("web-01", &a.agentsn, &a.credential).await;
    let b = m.register("web-02", "", "", "").await;
    for (sn, cred) in [
        ("", ""),
        (a.agentsn.as_str(), ""),
        (a.agentsn.as_str(), b.credential.as_str()),
        (
            "",
            "0000000000000000000000000000000000000000000000000000000000000000",
        ),
    ] {
        let r = m.register_raw("web-01", sn, cred, "").await;
        assert_eq!(r.code, 403, "{sn} {cred}: {}", r.text);
        assert!(
            r.text.contains("host \"web-01\" is enrolled")
                && r.text.contains("/api/hosts/web-01/readmit"),
            "{}",
            r.text
        );
    }
    // Before its first report, a host's repeated registration (the answer was lost) under
    // another serial is refused too.
    let r = m
        .register_raw("web-02", "00000000-0000-4000-8000-0000000000aa", "", "")
        .await;
    assert_eq!(r.code, 403, "{}", r.text);
    // Still the same after a restart: the credential's hash is durable.
    m.stop();
    m.spawn();
    assert_eq!(m.register_raw("web-01", "", "", "").await.code, 403);
    assert_eq!(
        m.status_ok("web-01", &a.agentsn, &a.credential)
            .await
            .status,
        STATUS_OK
    );
}

#[tokio::test]
async fn reports_need_the_hosts_own_credential_and_jobs_reach_only_it() {
    let m = Meta::start("");
    let a = m.register("web-a", "", "", "").await;
    let b = m.register("web-b", "", "", "").await;
    m.status_ok("web-a", &a.agentsn, &a.credential).await;
    m.status_ok("web-b", &b.agentsn, &b.credential).await;
    let before = m.host("web-b").await;
    let r = m
        .http
        .post(m.url("/api/jobs"))
        .json(&json!({"action": "restart", "name": "basic", "hosts": ["web-b"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let queued: JobsResponse = r.json().await.unwrap();
    assert_eq!(queued.jobs.len(), 1);

    // Host A reports as B: with its own credential, with none, with a malformed header.
    let as_b = m.status("web-b", &b.agentsn, &a.credential, "evil").await;
    assert_eq!(as_b.code, 403, "{}", as_b.text);
    assert!(
        as_b.text
            .contains("host \"web-b\": the credential is not this host's"),
        "{}",
        as_b.text
    );
    assert!(!as_b.text.contains("jobs"));
    let none = m.status("web-b", &b.agentsn, "", "evil").await;
    assert_eq!(none.code, 401, "{}", none.text);
    assert!(none
        .www_authenticate
        .is_some_and(|h| h.starts_with("Bearer")));
    let r = m
        .http
        .post(m.url("/agent/status"))
        .header("authorization", format!("Basic {}", a.credential))
        .json(&json!({"hostname": "web-b", "agentsn": b.agentsn}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // A's serial under B's name, with A's credential: another host's serial.
    let mixed = m.status("web-b", &a.agentsn, &a.credential, "evil").await;
    assert_eq!(mixed.code, 200);
    let mixed: StatusResponse = serde_json::from_str(&mixed.text).unwrap();
    assert_ne!(mixed.status, STATUS_OK);
    assert!(mixed.jobs.is_empty());
    // Nothing of those reports was recorded for B, and A's own reports get no B job.
    let after = m.host("web-b").await;
    assert_eq!(
        after.agents, before.agents,
        "a refused report changed the host"
    );
    assert!(!after.agents.iter().any(|x| x.name == "evil"));
    assert_eq!(after.pending.len(), 1);
    assert_eq!(
        after.pending[0].sent, 0,
        "the job was handed out to another host"
    );
    let (_, page) = m.get("/status/json/evil").await;
    let page: serde_json::Value = serde_json::from_str(&page).unwrap();
    assert!(page["web-b"].is_null(), "{page}");
    let own = m.status_ok("web-a", &a.agentsn, &a.credential).await;
    assert!(own.jobs.is_empty(), "{:?}", own.jobs);
    // B itself gets its job.
    let mine = m.status_ok("web-b", &b.agentsn, &b.credential).await;
    assert_eq!(mine.jobs.len(), 1);
    assert_eq!(mine.jobs[0].id, queued.jobs[0].id);
}

#[tokio::test]
async fn enrollment_secrets_admit_new_hosts_and_rotate() {
    let mut m = Meta::start(&format!(
        r#""enrollmentSecrets": ["{SECRET_A}", "{SECRET_B}"],"#
    ));
    let r = m.register_raw("web-01", "", "", "").await;
    assert_eq!(r.code, 403, "{}", r.text);
    assert!(
        r.text.contains("requires an enrollment secret"),
        "{}",
        r.text
    );
    let r = m
        .register_raw("web-01", "", "", "wrong-secret-0123456789")
        .await;
    assert_eq!(r.code, 403, "{}", r.text);
    assert!(r.text.contains("not one this server accepts"), "{}", r.text);
    assert!(!r.text.contains("wrong-secret"));
    assert_eq!(
        m.get("/api/hosts/web-01").await.0,
        404,
        "nothing registered"
    );
    // Both secrets are accepted while the rotation runs.
    let a = m.register("web-01", "", "", SECRET_A).await;
    let b = m.register("web-02", "", "", SECRET_B).await;
    m.status_ok("web-01", &a.agentsn, &a.credential).await;
    m.status_ok("web-02", &b.agentsn, &b.credential).await;
    // The rotation ends: A is retired. Enrolled hosts register with their credential alone;
    // a new host with A is refused.
    m.write_cfg(&format!(r#""enrollmentSecrets": ["{SECRET_B}"],"#));
    let (code, text) = m.get("/config/reload").await;
    assert_eq!(code, 200, "{text}");
    assert!(!text.contains(SECRET_B), "{text}");
    let again = m.register("web-01", &a.agentsn, &a.credential, "").await;
    assert!(again.credential.is_empty());
    let r = m.register_raw("web-03", "", "", SECRET_A).await;
    assert_eq!(r.code, 403, "{}", r.text);
    m.register("web-03", "", "", SECRET_B).await;
    // A bad secret in the config is refused with its field, never its text.
    m.write_cfg(r#""enrollmentSecrets": ["tooshort"],"#);
    let (code, text) = m.get("/config/reload").await;
    assert_eq!(code, 400);
    assert!(
        text.contains("enrollmentSecrets[0]") && !text.contains("tooshort"),
        "{text}"
    );
    m.stop();
    let out = command(Path::new(env!("CARGO_BIN_EXE_ops-meta")))
        .args(["-T", "-c", "cfg.json"])
        .current_dir(m.dir.path())
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success() && all.contains("enrollmentSecrets[0]"),
        "{all}"
    );
    assert!(!all.contains("tooshort"), "{all}");
}

async fn heartbeat(m: &Meta, host: &str) -> (u16, String) {
    let r = m
        .http
        .post(m.url("/heartbeat"))
        .body(format!(
            r#"{{"hostname":"{host}","realAgents":[{{"name":"basic","version":"6.6.6","status":"stoped","timestamp":1}}]}}"#
        ))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn a_legacy_heartbeat_never_speaks_for_an_enrolled_host_and_can_be_denied() {
    let mut m = Meta::start("");
    let a = m.register("web-01", "", "", "").await;
    m.status_ok("web-01", &a.agentsn, &a.credential).await;
    let (code, text) = heartbeat(&m, "web-01").await;
    assert_eq!(code, 403, "{text}");
    assert!(
        text.contains("host \"web-01\" is a BootAgent host with a credential"),
        "{text}"
    );
    let (_, page) = m.get("/status/json/basic").await;
    assert!(
        !page.contains("6.6.6"),
        "the refused heartbeat changed the host: {page}"
    );
    assert_eq!(m.host("web-01").await.agents[0].version, "1.0");
    // A legacy host is taken as always.
    let (code, text) = heartbeat(&m, "old-01").await;
    assert_eq!(code, 200, "{text}");
    // Denied: every legacy heartbeat is refused, with the reason.
    m.stop();
    m.write_cfg(r#""legacyHeartbeat": "deny","#);
    m.spawn();
    let (code, text) = heartbeat(&m, "old-02").await;
    assert_eq!(code, 403, "{text}");
    assert!(text.contains("legacyHeartbeat: deny"), "{text}");
    assert_eq!(m.get("/api/hosts/old-02").await.0, 404);
    // BootAgent hosts are not affected.
    m.status_ok("web-01", &a.agentsn, &a.credential).await;
    m.write_cfg(r#""legacyHeartbeat": "sometimes","#);
    let (code, text) = m.get("/config/reload").await;
    assert_eq!(code, 400);
    assert!(text.contains("legacyHeartbeat"), "{text}");
}

#[tokio::test]
async fn readmit_lets_a_host_that_lost_its_metafile_back_in() {
    let m = Meta::start(&format!(r#""enrollmentSecrets": ["{SECRET_A}"],"#));
    let old = m.register("web-01", "", "", SECRET_A).await;
    m.status_ok("web-01", &old.agentsn, &old.credential).await;
    // The metafile is gone: a new serial, no credential.
    let fresh = "00000000-0000-4000-8000-000000000123";
    assert_eq!(
        m.register_raw("web-01", fresh, "", SECRET_A).await.code,
        403
    );
    let readmit = |host: &'static str| {
        let r = m.http.post(m.url(&format!("/api/hosts/{host}/readmit")));
        async move {
            let r = r.send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let (code, text) = readmit("nobody").await;
    assert_eq!(code, 404, "{text}");
    let (code, text) = readmit("web-01").await;
    assert_eq!(code, 200, "{text}");
    let r: ReadmitResponse = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (r.agentsn.as_str(), r.had_credential),
        (old.agentsn.as_str(), true)
    );
    // The old credential counts no more; the enrollment secret still does.
    let a = m
        .status("web-01", &old.agentsn, &old.credential, "basic")
        .await;
    let a: StatusResponse = serde_json::from_str(&a.text).unwrap();
    assert_eq!(a.status, STATUS_UNREGISTERED, "{}", a.message);
    assert_eq!(m.register_raw("web-01", fresh, "", "").await.code, 403);
    let back = m.register("web-01", fresh, "", SECRET_A).await;
    assert_eq!(back.agentsn, fresh);
    assert!(!back.credential.is_empty() && back.credential != old.credential);
    assert_eq!(
        m.status_ok("web-01", fresh, &back.credential).await.status,
        STATUS_OK
    );
    assert_eq!(m.register_raw("web-01", "", "", SECRET_A).await.code, 403);
    // Both readmits are in the audit log, with their host and outcome.
    let audit: serde_json::Value = m
        .http
        .get(m.url("/api/audit"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let readmits: Vec<&serde_json::Value> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "hosts.readmit")
        .collect();
    assert_eq!(readmits.len(), 2, "{audit}");
    assert_eq!(
        readmits[0]["hosts"],
        serde_json::json!(["web-01"]),
        "{audit}"
    );
    assert_eq!(readmits[0]["status"], 200, "{audit}");
    assert_eq!(readmits[1]["status"], 404, "{audit}");
}

/// A host registered by an ops-meta from before credentials (its row holds none) is given
/// one at its next registration: trust on first use.
#[tokio::test]
async fn hosts_registered_before_credentials_get_one_at_their_next_registration() {
    let mut m = Meta::start("");
    let r = m.register("web-01", "", "", "").await;
    m.status_ok("web-01", &r.agentsn, &r.credential).await;
    m.stop();
    // Make the row what an older ops-meta wrote: no credentials.
    {
        let db = rusqlite::Connection::open(m.dir.path().join("ops-meta.db")).unwrap();
        let state: String = db
            .query_row(
                "SELECT state FROM boot_hosts WHERE hostname = 'web-01'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&state).unwrap();
        assert!(
            v.as_object_mut().unwrap().remove("credentials").is_some(),
            "{state}"
        );
        db.execute(
            "UPDATE boot_hosts SET state = ?1 WHERE hostname = 'web-01'",
            [v.to_string()],
        )
        .unwrap();
    }
    m.spawn();
    // Its report, with or without a credential, is told to register again; nothing handed.
    for cred in ["", r.credential.as_str()] {
        let a = m.status_ok("web-01", &r.agentsn, cred).await;
        assert_eq!(a.status, STATUS_UNREGISTERED, "{}", a.message);
        assert!(a.message.contains("no credential yet"), "{}", a.message);
        assert!(a.jobs.is_empty());
    }
    let t = m.register("web-01", &r.agentsn, "", "").await;
    assert_eq!(t.agentsn, r.agentsn, "the same host");
    assert!(!t.credential.is_empty());
    assert_eq!(
        m.status_ok("web-01", &r.agentsn, &t.credential)
            .await
            .status,
        STATUS_OK
    );
    assert_eq!(m.status("web-01", &r.agentsn, "", "basic").await.code, 401);
}
