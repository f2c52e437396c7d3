//! What the opsctl tests share: the real `ops-meta` on a free port of 127.0.0.1 with a
//! cfg.json in a temporary folder, BootAgent hosts that register and report over HTTP,
//! and the real `opsctl` binary run with a clean environment.

#![allow(dead_code)] // Each test file uses its own part of this.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::bootagent::{
    AgentStatus, JobResult, RegisterRequest, RegisterResponse, StatusRequest, StatusResponse,
    STATUS_OK,
};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use test_support::{command, KillOnDrop, TempDir};

pub const WAIT: Duration = Duration::from_secs(20);

/// A `{"name", "role", "sha256"}` entry of `apiTokens`.
pub fn token(name: &str, role: &str, token: &str) -> Value {
    json!({"name": name, "role": role, "sha256": hex::encode(Sha256::digest(token.as_bytes()))})
}

pub struct Meta {
    _child: KillOnDrop,
    pub dir: TempDir,
    pub addr: SocketAddr,
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
}

impl Meta {
    /// ops-meta with the memory store, `tarballDir` in its folder (`files/`), and these
    /// `apiTokens` (none when `Value::Null`).
    pub fn start(tokens: Value) -> Meta {
        Meta::start_with(tokens, |_| json!([]))
    }

    /// [`Meta::start`] with the `agents` of cfg.json, made from the server's base URL.
    pub fn start_with(tokens: Value, agents: impl FnOnce(&str) -> Value) -> Meta {
        let dir = test_support::tempdir().unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", test_support::free_port())
            .parse()
            .unwrap();
        std::fs::create_dir_all(dir.path().join("files")).unwrap();
        let mut cfg = json!({
            "tarballDir": "files",
            "http": {"enabled": true, "listen": addr.to_string()},
            "store": "memory",
            "agents": agents(&format!("http://{addr}")),
        });
        if !tokens.is_null() {
            cfg["apiTokens"] = tokens;
        }
        test_support::write_file(dir.path(), "cfg.json", cfg.to_string());
        let child = command(&test_support::cargo_bin("ops-meta"))
            .args(["-c", "cfg.json"])
            .current_dir(dir.path())
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("start ops-meta");
        test_support::wait_listening(addr, WAIT);
        Meta {
            _child: KillOnDrop(child),
            dir,
            addr,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            http: reqwest::Client::new(),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn files(&self) -> PathBuf {
        self.dir.path().join("files")
    }

    fn post<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        credential: &str,
        body: &impl serde::Serialize,
    ) -> T {
        self.rt.block_on(async {
            let mut r = self.http.post(format!("{}{path}", self.url())).json(body);
            if !credential.is_empty() {
                r = r.bearer_auth(credential);
            }
            let r = r.send().await.unwrap();
            let code = r.status();
            let text = r.text().await.unwrap();
            assert!(code.is_success(), "{path}: {code}: {text}");
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}"))
        })
    }

    /// `GET path` of the server, status and body.
    pub fn get(&self, path: &str) -> (u16, Vec<u8>) {
        self.rt.block_on(async {
            let r = self
                .http
                .get(format!("{}{path}", self.url()))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
        })
    }

    /// Registers a BootAgent host and sends its first report with `agents`
    /// (name, version, status).
    pub fn host(&self, name: &str, agents: &[(&str, &str, &str)]) -> Host<'_> {
        let r: RegisterResponse = self.post(
            "/agent/register",
            "",
            &RegisterRequest {
                hostname: name.into(),
                ..RegisterRequest::default()
            },
        );
        assert_eq!(r.status, STATUS_OK, "{}", r.message);
        let h = Host {
            meta: self,
            name: name.into(),
            serial: r.agentsn,
            credential: r.credential,
            agents: agents
                .iter()
                .map(|(n, v, s)| AgentStatus {
                    name: n.to_string(),
                    version: v.to_string(),
                    status: s.to_string(),
                    uptime: 30,
                })
                .collect(),
        };
        h.report(vec![]);
        h
    }
}

/// One BootAgent host, as ops-updater would speak for it.
pub struct Host<'a> {
    meta: &'a Meta,
    pub name: String,
    serial: String,
    credential: String,
    agents: Vec<AgentStatus>,
}

impl Host<'_> {
    /// A status report with these job results; the jobs the answer hands out.
    pub fn report(&self, results: Vec<JobResult>) -> StatusResponse {
        let r: StatusResponse = self.meta.post(
            "/agent/status",
            &self.credential,
            &StatusRequest {
                hostname: self.name.clone(),
                agentsn: self.serial.clone(),
                version: "ops-updater-test".into(),
                step: 60,
                agents: self.agents.clone(),
                jobs: results,
                ..StatusRequest::default()
            },
        );
        assert_eq!(r.status, STATUS_OK, "{}", r.message);
        r
    }
}

/// What one run of `opsctl` did.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// `opsctl ARGS` with no OPSCTL_* variables and `HOME` set to `home` (so no config file of
/// the machine is read), plus `env`.
pub fn opsctl(home: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = command(Path::new(env!("CARGO_BIN_EXE_opsctl")));
    cmd.args(args)
        .env_remove("OPSCTL_SERVER")
        .env_remove("OPSCTL_TOKEN")
        .env_remove("OPSCTL_CONFIG")
        .env_remove("XDG_CONFIG_HOME")
        .env("HOME", home);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run opsctl");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `opsctl --server META ARGS`, which must exit `code`.
pub fn expect(meta: &Meta, home: &Path, args: &[&str], env: &[(&str, &str)], code: i32) -> Run {
    let url = meta.url();
    let all: Vec<&str> = ["--server", url.as_str()]
        .iter()
        .chain(args)
        .copied()
        .collect();
    let r = opsctl(home, &all, env);
    assert_eq!(r.code, code, "opsctl {args:?}: {r:#?}");
    r
}
