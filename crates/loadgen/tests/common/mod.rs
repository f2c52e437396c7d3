//! Shared by the loadgen tests: running the `ops-loadgen` binary, and a tiny in-test server
//! that speaks both protocols and records what the simulated hosts report.

#![allow(dead_code)] // Each test file uses a different part of this module.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use proto::bootagent::{
    Action, Job, RegisterRequest, RegisterResponse, StatusRequest, StatusResponse,
};
use proto::legacy::{DesiredAgent, HeartbeatRequest, HeartbeatResponse};

/// Runs `ops-loadgen` with `args` and returns (exit code, stdout, stderr).
pub fn loadgen(args: &[&str]) -> (i32, String, String) {
    let out = test_support::command(Path::new(env!("CARGO_BIN_EXE_ops-loadgen")))
        .args(args)
        .output()
        .expect("run ops-loadgen");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `ops-loadgen ... --json`, expects success, and returns the report.
pub fn loadgen_json(args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    let (code, out, err) = loadgen(&all);
    assert_eq!(
        code, 0,
        "ops-loadgen {args:?} failed\nstdout: {out}\nstderr: {err}"
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("report is not JSON ({e}): {out}"))
}

/// How the in-test server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Like ops-meta: record the report, answer the desired version.
    Good,
    /// 503 to even hosts, a body that is not JSON to odd ones.
    Hostile,
}

/// What the in-test server saw and what it wants.
#[derive(Debug, Default)]
pub struct Seen {
    /// hostname → (agent → version) as last reported.
    pub hosts: BTreeMap<String, BTreeMap<String, String>>,
    pub reports: u64,
    pub registers: u64,
    /// BootAgent job results received, by job id.
    pub job_results: Vec<String>,
}

/// A server on 127.0.0.1:0 that desires `version` for every agent; `GET /config/reload`
/// re-reads the version from `config_file`, as ops-meta re-reads its cfg.json.
pub struct TestServer {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Seen>>,
    pub config_file: PathBuf,
    _dir: test_support::TempDir,
}

impl TestServer {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

struct State {
    seen: Arc<Mutex<Seen>>,
    version: Mutex<String>,
    config_file: PathBuf,
    behaviour: Behaviour,
}

pub fn start(behaviour: Behaviour, version: &str) -> TestServer {
    let dir = test_support::tempdir().unwrap();
    let config_file = test_support::write_file(dir.path(), "version.cfg", version);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let state = Arc::new(State {
        seen: seen.clone(),
        version: Mutex::new(version.to_string()),
        config_file: config_file.clone(),
        behaviour,
    });
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let state = state.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(state.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
    });
    TestServer {
        addr,
        seen,
        config_file,
        _dir: dir,
    }
}

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::builder()
        .status(status)
        .body(Full::new(body.into()))
        .unwrap())
}

async fn handle(
    state: Arc<State>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let want = state.version.lock().unwrap().clone();
    match path.as_str() {
        "/config/reload" => {
            let v = std::fs::read_to_string(&state.config_file).unwrap();
            *state.version.lock().unwrap() = v.trim().to_string();
            reply(StatusCode::OK, "{}")
        }
        "/heartbeat" => {
            let r: HeartbeatRequest = serde_json::from_slice(&body).unwrap();
            let index: u64 = r.hostname.trim_start_matches("sim-").parse().unwrap();
            record(
                &state.seen,
                &r.hostname,
                r.real_agents
                    .iter()
                    .map(|a| (a.name.clone(), a.version.clone())),
            );
            if state.behaviour == Behaviour::Hostile {
                return if index.is_multiple_of(2) {
                    reply(StatusCode::SERVICE_UNAVAILABLE, "busy")
                } else {
                    reply(StatusCode::OK, "<html>not json</html>")
                };
            }
            let answer = HeartbeatResponse {
                error_message: String::new(),
                desired_agents: r
                    .real_agents
                    .iter()
                    .map(|a| DesiredAgent {
                        name: a.name.clone(),
                        version: want.clone(),
                        tarball: "http://127.0.0.1:1/t".into(),
                        md5: String::new(),
                        cmd: "start".into(),
                        sha256: None,
                        envs: None,
                        limits: None,
                    })
                    .collect(),
            };
            reply(StatusCode::OK, serde_json::to_vec(&answer).unwrap())
        }
        "/agent/register" => {
            let r: RegisterRequest = serde_json::from_slice(&body).unwrap();
            state.seen.lock().unwrap().registers += 1;
            let answer = RegisterResponse {
                status: 0,
                agentsn: r.agentsn,
                tags: String::new(),
                message: String::new(),
                credential: String::new(),
            };
            reply(StatusCode::OK, serde_json::to_vec(&answer).unwrap())
        }
        "/agent/status" => {
            let r: StatusRequest = serde_json::from_slice(&body).unwrap();
            record(
                &state.seen,
                &r.hostname,
                r.agents.iter().map(|a| (a.name.clone(), a.version.clone())),
            );
            state
                .seen
                .lock()
                .unwrap()
                .job_results
                .extend(r.jobs.iter().map(|j| j.id.clone()));
            let jobs = r
                .agents
                .iter()
                .filter(|a| a.version != want)
                .map(|a| Job {
                    id: format!("{}/{}/{}", r.hostname, a.name, want),
                    action: Action::Upgrade,
                    name: a.name.clone(),
                    version: want.clone(),
                    url: format!("http://127.0.0.1:1/{}-{want}.tar.gz", a.name),
                    checksum: String::new(),
                    md5: String::new(),
                    envs: Default::default(),
                    limits: Default::default(),
                    svrlist: String::new(),
                    step: None,
                })
                .collect();
            let answer = StatusResponse {
                status: 0,
                message: String::new(),
                jobs,
                waiting: Vec::new(),
            };
            reply(StatusCode::OK, serde_json::to_vec(&answer).unwrap())
        }
        _ => reply(StatusCode::NOT_FOUND, "not found"),
    }
}

fn record(seen: &Mutex<Seen>, host: &str, agents: impl Iterator<Item = (String, String)>) {
    let mut s = seen.lock().unwrap();
    s.reports += 1;
    s.hosts.insert(host.to_string(), agents.collect());
}

/// `report[a][b]...` as u64, panicking with the report when absent.
pub fn num(report: &serde_json::Value, path: &[&str]) -> u64 {
    let mut v = report;
    for p in path {
        v = &v[*p];
    }
    v.as_u64()
        .unwrap_or_else(|| panic!("{path:?} missing in {report:#}"))
}
