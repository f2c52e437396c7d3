//! The artifact pipeline through the public API against an axum file server on
//! 127.0.0.1:0: install a real agent tarball (md5 fetched from its `.md5` file), drive its
//! control script, and check that a hostile tarball with a valid checksum changes nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use test_support::agent::{agent_tarball, Behaviour};
use updater::artifact::{self, Fetcher, Limits, Want};

fn name() -> proto::names::AgentName {
    proto::names::AgentName::parse(NAME).unwrap()
}

fn version(v: &str) -> proto::names::Version {
    proto::names::Version::parse(v).unwrap()
}
use updater::control::{self, AgentStatus, ControlConfig};

const NAME: &str = "falcon-agent";

#[derive(Clone)]
struct Files {
    dir: PathBuf,
    /// Every request path, to count what the updater fetched.
    seen: Arc<Mutex<Vec<String>>>,
}

/// Serves files from `dir`, honouring `Range: bytes=N-` as a real static server does.
async fn file(
    State(f): State<Files>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    f.seen.lock().unwrap().push(name.clone());
    if name.contains('/') || name.starts_with('.') {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let Ok(body) = std::fs::read(f.dir.join(&name)) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let from = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.trim_end_matches('-').parse::<usize>().ok());
    match from {
        Some(n) if n >= body.len() => StatusCode::RANGE_NOT_SATISFIABLE.into_response(),
        Some(n) => (
            StatusCode::PARTIAL_CONTENT,
            [(
                header::CONTENT_RANGE,
                format!("bytes {n}-{}/{}", body.len() - 1, body.len()),
            )],
            body[n..].to_vec(),
        )
            .into_response(),
        None => body.into_response(),
    }
}

struct Server {
    base: String,
    seen: Arc<Mutex<Vec<String>>>,
}

async fn serve(dir: &Path) -> Server {
    let files = Files {
        dir: dir.to_path_buf(),
        seen: Arc::default(),
    };
    let seen = files.seen.clone();
    let app = Router::new()
        .route("/files/{name}", get(file))
        .with_state(files);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Server {
        base: format!("http://{addr}/files"),
        seen,
    }
}

fn fetcher() -> Fetcher {
    Fetcher::new(Limits {
        max_unpacked_bytes: 16 << 20,
        ..Limits::default()
    })
    .unwrap()
}

/// The URLs the legacy rule gives for `version` (the md5 base defaults to the tarball's).
fn urls(srv: &Server, version: &str) -> (String, String) {
    let file = proto::legacy::tarball_file(NAME, version);
    (
        proto::legacy::join_url(&srv.base, &file),
        proto::legacy::join_url(&srv.base, &format!("{file}.md5")),
    )
}

#[tokio::test]
async fn installed_agent_starts_and_is_never_fetched_again() {
    let files = tempfile::tempdir().unwrap();
    test_support::tarball::publish(
        files.path(),
        NAME,
        "1.0.1",
        &agent_tarball(NAME, "1.0.1", Behaviour::Good),
    );
    let srv = serve(files.path()).await;
    let work = tempfile::tempdir().unwrap();
    let agent = work.path().join(NAME);
    std::fs::create_dir(&agent).unwrap();
    let (tarball_url, md5_url) = urls(&srv, "1.0.1");

    let f = fetcher();
    let dir = artifact::install(
        &f,
        &agent,
        &name(),
        &version("1.0.1"),
        &tarball_url,
        Some(&md5_url),
        Want::default(),
    )
    .await
    .unwrap();
    assert!(artifact::is_installed(&agent, "1.0.1"));
    let fetched = srv.seen.lock().unwrap().len();
    assert_eq!(fetched, 2, "tarball and md5");

    let cfg = ControlConfig::default();
    let envs = BTreeMap::new();
    control::control(&dir, "start", &envs, None, &cfg)
        .await
        .unwrap();
    assert_eq!(
        control::status(&dir, &envs, None, &cfg).await,
        AgentStatus::Started
    );
    control::control(&dir, "stop", &envs, None, &cfg)
        .await
        .unwrap();
    assert_eq!(
        control::status(&dir, &envs, None, &cfg).await,
        AgentStatus::Stopped
    );

    artifact::install(
        &f,
        &agent,
        &name(),
        &version("1.0.1"),
        &tarball_url,
        Some(&md5_url),
        Want::default(),
    )
    .await
    .unwrap();
    assert_eq!(srv.seen.lock().unwrap().len(), fetched, "no new request");
}

#[tokio::test]
async fn hostile_tarball_with_a_valid_md5_changes_nothing() {
    for (case, bytes) in test_support::tarball::hostile_archives() {
        let files = tempfile::tempdir().unwrap();
        test_support::tarball::publish(files.path(), NAME, "6.6.6", &bytes);
        let srv = serve(files.path()).await;
        let work = tempfile::tempdir().unwrap();
        let agent = work.path().join("deep").join(NAME);
        std::fs::create_dir_all(agent.join("1.0.0")).unwrap();
        std::fs::write(agent.join(".version"), "1.0.0\n").unwrap();
        let before = test_support::tree(work.path());
        let (tarball_url, md5_url) = urls(&srv, "6.6.6");
        let e = artifact::install(
            &fetcher(),
            &agent,
            &name(),
            &version("6.6.6"),
            &tarball_url,
            Some(&md5_url),
            Want::default(),
        )
        .await
        .unwrap_err();
        // The verified download may stay for the next attempt; nothing else may change.
        let after: Vec<String> = test_support::tree(work.path())
            .into_iter()
            .filter(|p| !p.contains(artifact::DOWNLOAD_DIR))
            .collect();
        assert_eq!(after, before, "{case}: {e}");
        assert!(!artifact::is_installed(&agent, "6.6.6"), "{case}");
        assert!(!Path::new("/tmp/agent-updater-pwned").exists(), "{case}");
    }
}
