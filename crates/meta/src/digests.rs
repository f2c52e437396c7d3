//! What ops-meta knows of the digests of every tarball its desired state hands out, and
//! how it learns them — in the background, never on the heartbeat path.
//!
//! - A tarball URL that this server serves itself (its listen address, or a base URL of
//!   `tarballUrls`) is mapped by its path to a file of `tarballDir`, by the file server's
//!   own rules ([`crate::tarfs`]), and hashed; the SHA-256 is cached by file, size and
//!   modification time.
//! - Any other URL is another server's: ops-meta reads `<tarball URL>.sha256` when that
//!   server has one, and otherwise downloads the tarball once itself (size and time
//!   capped, streamed) to hash it, caching the digest by URL with the ETag, Last-Modified
//!   and length it came with; both are checked again every `remoteRecheckSecs`.
//! - The `.md5` file beside each tarball is read too (locally or over HTTP), so a
//!   BootAgent job can carry the MD5 while no SHA-256 is known, and the same `.md5` the
//!   legacy path checks beside one that is.
//!
//! Whatever is not known yet is said in words ([`Known::problem`]), so that operators and
//! hosts see what a job waits for.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::tarfs::{self, TarfsError};

/// Largest `.md5` or `.sha256` file read.
pub const MAX_SIDECAR_BYTES: u64 = 4096;
/// Longest time fetching a `.md5` or `.sha256` file from another server may take.
pub const SIDECAR_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest time to connect to another server.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A tarball whose server sends neither ETag nor Last-Modified cannot be checked for
/// change without downloading it again; it is downloaded again this often.
pub const REHASH_WITHOUT_VALIDATORS: Duration = Duration::from_secs(3600);
/// Sidecar fetches in flight at once during one pass.
const PASS_CONCURRENCY: usize = 8;
/// Tarballs of other servers downloaded for hashing at once.
const DOWNLOADS_AT_ONCE: usize = 2;

/// One tarball the desired state can hand out.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Artifact {
    /// `{name}-{version}.tar.gz`.
    pub file: String,
    pub tarball_url: String,
    pub md5_url: String,
    /// The config gives its `sha256`: nothing is hashed or downloaded for it.
    pub sha256_configured: bool,
}

/// What is known of one tarball.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Known {
    /// Lowercase hex.
    pub sha256: Option<String>,
    /// Lowercase hex, from the `.md5` file.
    pub md5: Option<String>,
    /// Why no SHA-256 is known, in words (`None` when one is, or before the first look).
    pub problem: Option<String>,
}

/// Digests by tarball URL.
pub type Digests = HashMap<String, Known>;

/// Where the file of a URL is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// Served by this server: the URL path (percent-encoded, starting with `/`) below
    /// `tarballDir`.
    Local(String),
    /// Another server's.
    Remote,
}

/// Which URLs this server serves itself.
#[derive(Debug, Clone)]
pub struct Locator {
    listen: Option<SocketAddr>,
    /// `tls.listen`: `https://` URLs to it are ours too.
    tls_listen: Option<SocketAddr>,
    bases: Vec<url::Url>,
}

impl Locator {
    pub fn new(cfg: &Config) -> Locator {
        let listen = cfg
            .http
            .enabled
            .then(|| crate::config::listen_addr(&cfg.http.listen).ok())
            .flatten();
        let tls_listen = cfg
            .tls
            .as_ref()
            .and_then(|t| crate::config::listen_addr(&t.listen).ok());
        let bases = cfg
            .tarball_urls
            .iter()
            .filter_map(|b| url::Url::parse(b).ok())
            .collect();
        Locator {
            listen,
            tls_listen,
            bases,
        }
    }

    /// Where `raw` is. Blocking: a host name in the URL is resolved to tell whether it is
    /// this machine.
    pub fn place(&self, raw: &str, names: &mut HashMap<String, bool>) -> Place {
        let Ok(u) = url::Url::parse(raw) else {
            return Place::Remote;
        };
        let (Some(host), Some(port)) = (u.host_str(), u.port_or_known_default()) else {
            return Place::Remote;
        };
        for b in &self.bases {
            let same_origin = b.scheme() == u.scheme()
                && b.host_str().is_some_and(|h| h.eq_ignore_ascii_case(host))
                && b.port_or_known_default() == Some(port);
            if !same_origin {
                continue;
            }
            let base_path = b.path().trim_end_matches('/');
            if let Some(rest) = u.path().strip_prefix(base_path) {
                if rest.starts_with('/') {
                    return Place::Local(rest.to_string());
                }
            }
        }
        let listeners = [("http", self.listen), ("https", self.tls_listen)];
        for (scheme, listen) in listeners {
            let Some(listen) = listen else { continue };
            if u.scheme() == scheme && port == listen.port() {
                let key = host.to_ascii_lowercase();
                let local = *names
                    .entry(key)
                    .or_insert_with(|| host_is_us(&u, port, listen.ip()));
                if local {
                    return Place::Local(u.path().to_string());
                }
            }
        }
        Place::Remote
    }
}

/// True when the URL's host reaches a listener bound to `listen` on this machine.
fn host_is_us(u: &url::Url, port: u16, listen: IpAddr) -> bool {
    let ips: Vec<IpAddr> = match u.host() {
        Some(url::Host::Ipv4(ip)) => vec![IpAddr::V4(ip)],
        Some(url::Host::Ipv6(ip)) => vec![IpAddr::V6(ip)],
        Some(url::Host::Domain(d)) => match (d, port).to_socket_addrs() {
            Ok(addrs) => addrs.map(|a| a.ip()).collect(),
            Err(_) => return false,
        },
        None => return false,
    };
    ips.iter().any(|ip| ip_reaches(*ip, listen))
}

/// True when a connection to `ip` arrives at a socket bound to `listen`.
fn ip_reaches(ip: IpAddr, listen: IpAddr) -> bool {
    if listen.is_unspecified() {
        // Bound to every address: `ip` reaches it when it is one of this machine's. An
        // address can be bound to only if an interface of this machine has it.
        ip.is_loopback() || ip.is_unspecified() || UdpSocket::bind((ip, 0)).is_ok()
    } else {
        ip == listen
    }
}

#[derive(Debug, Clone)]
struct LocalEntry {
    size: u64,
    mtime: SystemTime,
    sha: String,
}

/// What was learned of a tarball on another server.
#[derive(Debug, Clone, Default)]
struct RemoteEntry {
    sha256: Option<String>,
    problem: Option<String>,
    /// Validators of the download that gave `sha256` (none when it came from `.sha256`).
    etag: Option<String>,
    last_modified: Option<String>,
    from_download: bool,
    hashed_at: Option<Instant>,
    checked_at: Option<Instant>,
}

#[derive(Debug, Clone)]
struct Md5Entry {
    md5: Option<String>,
    checked_at: Instant,
}

/// The settings one pass runs with.
#[derive(Debug, Clone)]
pub struct PassConfig {
    pub tarball_dir: PathBuf,
    pub locator: Locator,
    pub hash: bool,
    pub remote_recheck: Duration,
    pub max_bytes: u64,
    pub download_timeout: Duration,
}

impl PassConfig {
    pub fn new(cfg: &Config) -> PassConfig {
        PassConfig {
            tarball_dir: cfg.tarball_dir.clone(),
            locator: Locator::new(cfg),
            hash: cfg.sha_recheck_secs > 0,
            remote_recheck: Duration::from_secs(cfg.remote_recheck_secs),
            max_bytes: cfg.remote_hash_max_bytes,
            download_timeout: Duration::from_secs(cfg.remote_hash_timeout_secs),
        }
    }
}

/// The caches; one per server.
#[derive(Debug)]
pub struct DigestCache {
    local: Arc<Mutex<HashMap<PathBuf, LocalEntry>>>,
    remote: Mutex<HashMap<String, RemoteEntry>>,
    md5s: Mutex<HashMap<String, Md5Entry>>,
    downloading: Mutex<HashSet<String>>,
    downloads: tokio::sync::Semaphore,
    client: reqwest::Client,
    /// Woken when a background download finished, so a pass publishes its digest.
    pub learned: tokio::sync::Notify,
}

impl Default for DigestCache {
    fn default() -> Self {
        DigestCache::new()
    }
}

/// Hashes a file, streaming it.
pub fn hash_reader(mut r: impl Read) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

impl DigestCache {
    pub fn new() -> DigestCache {
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("ops-meta/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("the HTTP client builds with static settings");
        DigestCache {
            local: Arc::new(Mutex::new(HashMap::new())),
            remote: Mutex::new(HashMap::new()),
            md5s: Mutex::new(HashMap::new()),
            downloading: Mutex::new(HashSet::new()),
            downloads: tokio::sync::Semaphore::new(DOWNLOADS_AT_ONCE),
            client,
            learned: tokio::sync::Notify::new(),
        }
    }

    /// One look at every artifact: local files are (re)hashed when they changed, remote
    /// ones are checked when `remoteRecheckSecs` passed, and a download that is needed is
    /// started in the background (its result comes with a later pass, announced through
    /// [`DigestCache::learned`]). Returns what is known now.
    pub async fn pass(self: &Arc<Self>, cfg: &PassConfig, artifacts: &[Artifact]) -> Digests {
        // Places first, on the blocking pool: telling whether a host name is this machine
        // may take a DNS lookup.
        let (loc, arts) = (cfg.locator.clone(), artifacts.to_vec());
        let places = tokio::task::spawn_blocking(move || {
            let mut names = HashMap::new();
            arts.iter()
                .map(|a| {
                    (
                        loc.place(&a.tarball_url, &mut names),
                        loc.place(&a.md5_url, &mut names),
                    )
                })
                .collect::<Vec<_>>()
        })
        .await
        .expect("locating does not panic");
        // Each look owns what it uses, so the stream of them is `Send` and `'static`.
        let jobs = artifacts.iter().cloned().zip(places).map(|(a, (tp, mp))| {
            let (me, cfg) = (self.clone(), cfg.clone());
            async move { me.known(&cfg, &a, tp, mp).await }
        });
        let found: Vec<(String, Known)> = futures_util::stream::iter(jobs)
            .buffer_unordered(PASS_CONCURRENCY)
            .collect()
            .await;
        found.into_iter().collect()
    }

    async fn known(
        self: &Arc<Self>,
        cfg: &PassConfig,
        a: &Artifact,
        tarball: Place,
        md5: Place,
    ) -> (String, Known) {
        let md5 = self.md5_of(cfg, &a.md5_url, md5).await;
        let (sha256, problem) = if a.sha256_configured {
            (None, None)
        } else if !cfg.hash {
            (
                None,
                Some("ops-meta computes no SHA-256 (shaRecheckSecs is 0)".to_string()),
            )
        } else {
            match tarball {
                Place::Local(path) => self.local_sha(cfg, a, path).await,
                Place::Remote => self.remote_sha(cfg, a).await,
            }
        };
        (
            a.tarball_url.clone(),
            Known {
                sha256,
                md5,
                problem,
            },
        )
    }

    async fn local_sha(
        &self,
        cfg: &PassConfig,
        a: &Artifact,
        path: String,
    ) -> (Option<String>, Option<String>) {
        let dir = cfg.tarball_dir.clone();
        let file = a.file.clone();
        let cache = self.local.clone();
        tokio::task::spawn_blocking(move || hash_local(&cache, &dir, &path, &file))
            .await
            .expect("hashing does not panic")
    }

    async fn md5_of(&self, cfg: &PassConfig, url: &str, place: Place) -> Option<String> {
        match place {
            Place::Local(path) => {
                let dir = cfg.tarball_dir.clone();
                tokio::task::spawn_blocking(move || {
                    tarfs::read_small(&dir, &path, MAX_SIDECAR_BYTES)
                        .ok()
                        .and_then(|t| proto::legacy::parse_md5_file(&t))
                })
                .await
                .expect("reading does not panic")
            }
            Place::Remote => {
                let now = Instant::now();
                if let Some(e) = self.md5s.lock().get(url) {
                    if now.duration_since(e.checked_at) < cfg.remote_recheck {
                        return e.md5.clone();
                    }
                }
                let md5 = match self.get_small(url).await {
                    Ok(Some(t)) => proto::legacy::parse_md5_file(&t),
                    Ok(None) => None,
                    // Unreachable for now: keep what we knew.
                    Err(_) => self.md5s.lock().get(url).and_then(|e| e.md5.clone()),
                };
                self.md5s.lock().insert(
                    url.to_string(),
                    Md5Entry {
                        md5: md5.clone(),
                        checked_at: now,
                    },
                );
                md5
            }
        }
    }

    /// GET of a small file: `Ok(None)` when the server answers that it has none.
    async fn get_small(&self, url: &str) -> Result<Option<String>, String> {
        let resp = self
            .client
            .get(url)
            .timeout(SIDECAR_TIMEOUT)
            .send()
            .await
            .map_err(|e| error_chain(&e))?;
        if !resp.status().is_success() {
            return Ok(None);
        }
        let mut body = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| error_chain(&e))?;
            body.extend_from_slice(&chunk);
            if body.len() as u64 > MAX_SIDECAR_BYTES {
                return Ok(None);
            }
        }
        Ok(Some(String::from_utf8_lossy(&body).into_owned()))
    }

    async fn remote_sha(
        self: &Arc<Self>,
        cfg: &PassConfig,
        a: &Artifact,
    ) -> (Option<String>, Option<String>) {
        let url = &a.tarball_url;
        let now = Instant::now();
        let entry = self.remote.lock().get(url).cloned().unwrap_or_default();
        let fresh = entry
            .checked_at
            .is_some_and(|t| now.duration_since(t) < cfg.remote_recheck);
        if fresh || self.downloading.lock().contains(url) {
            return (entry.sha256, entry.problem);
        }
        // 1. A `.sha256` beside the tarball.
        let sidecar = format!("{url}.sha256");
        let mut note = None;
        match self.get_small(&sidecar).await {
            Ok(Some(text)) => match proto::legacy::parse_sha256_file(&text) {
                Some(h) => {
                    if entry.sha256.as_deref() != Some(h.as_str()) {
                        tracing::info!(url = %url, sha256 = %h, "tarball digest read from its .sha256");
                    }
                    let e = RemoteEntry {
                        sha256: Some(h),
                        checked_at: Some(now),
                        ..RemoteEntry::default()
                    };
                    self.remote.lock().insert(url.clone(), e.clone());
                    return (e.sha256, None);
                }
                None => note = Some(format!("{sidecar} is not a SHA-256 file; ")),
            },
            Ok(None) => {}
            Err(e) => {
                // The server is unreachable: so is its tarball for the hosts. Keep what
                // we knew and look again later.
                let problem = format!("cannot reach {sidecar}: {e}");
                let mut m = self.remote.lock();
                let kept = m.entry(url.clone()).or_default();
                kept.checked_at = Some(now);
                if kept.sha256.is_none() {
                    kept.problem = Some(problem);
                }
                return (kept.sha256.clone(), kept.problem.clone());
            }
        }
        // 2. No `.sha256`: download the tarball to hash it, in the background.
        let note = note.unwrap_or_default();
        if cfg.max_bytes == 0 {
            let problem = format!(
                "{note}no {} beside it and remoteHashMaxBytes is 0 (ops-meta downloads nothing to hash)",
                sidecar_name(a)
            );
            let e = RemoteEntry {
                problem: Some(problem),
                checked_at: Some(now),
                ..RemoteEntry::default()
            };
            self.remote.lock().insert(url.clone(), e.clone());
            return (None, e.problem);
        }
        let unchanged_recently = entry.from_download
            && entry.etag.is_none()
            && entry.last_modified.is_none()
            && entry
                .hashed_at
                .is_some_and(|t| now.duration_since(t) < REHASH_WITHOUT_VALIDATORS);
        if unchanged_recently {
            let mut m = self.remote.lock();
            if let Some(e) = m.get_mut(url) {
                e.checked_at = Some(now);
            }
            return (entry.sha256, entry.problem);
        }
        self.downloading.lock().insert(url.clone());
        let me = self.clone();
        let (u, cfg2) = (url.clone(), cfg.clone());
        tokio::spawn(async move {
            me.download(&cfg2, &u, entry).await;
            me.downloading.lock().remove(&u);
            me.learned.notify_one();
        });
        let problem = Some(format!(
            "{note}no {} beside it; ops-meta is downloading the tarball to hash it",
            sidecar_name(a)
        ));
        let m = self.remote.lock();
        match m.get(url) {
            Some(e) if e.sha256.is_some() => (e.sha256.clone(), None),
            _ => (None, problem),
        }
    }

    /// Downloads `url` (conditionally, when a digest from an earlier download is known)
    /// and records its SHA-256 or the reason it has none.
    async fn download(&self, cfg: &PassConfig, url: &str, old: RemoteEntry) {
        let _permit = self.downloads.acquire().await;
        let started = Instant::now();
        let result = tokio::time::timeout(cfg.download_timeout, self.fetch_hash(cfg, url, &old))
            .await
            .unwrap_or_else(|_| {
                Err(Fetched::Failed(format!(
                    "downloading it to hash it took longer than remoteHashTimeoutSecs ({} s)",
                    cfg.download_timeout.as_secs()
                )))
            });
        let now = Instant::now();
        let mut m = self.remote.lock();
        let e = m.entry(url.to_string()).or_default();
        e.checked_at = Some(now);
        match result {
            Ok(Some(h)) => {
                tracing::info!(url = %url, sha256 = %h.sha, bytes = h.bytes, secs = started.elapsed().as_secs_f64(), "tarball of another server downloaded and hashed");
                *e = RemoteEntry {
                    sha256: Some(h.sha),
                    problem: None,
                    etag: h.etag,
                    last_modified: h.last_modified,
                    from_download: true,
                    hashed_at: Some(now),
                    checked_at: Some(now),
                };
            }
            // 304: unchanged.
            Ok(None) => {}
            Err(Fetched::Gone(why)) => {
                tracing::warn!(url = %url, problem = %why, "cannot hash tarball of another server");
                *e = RemoteEntry {
                    problem: Some(why),
                    checked_at: Some(now),
                    ..RemoteEntry::default()
                };
            }
            Err(Fetched::Failed(why)) => {
                tracing::warn!(url = %url, problem = %why, "cannot hash tarball of another server");
                if e.sha256.is_none() {
                    e.problem = Some(why);
                }
            }
        }
    }

    async fn fetch_hash(
        &self,
        cfg: &PassConfig,
        url: &str,
        old: &RemoteEntry,
    ) -> Result<Option<Hashed>, Fetched> {
        let mut req = self.client.get(url);
        if old.sha256.is_some() && old.from_download {
            if let Some(t) = &old.etag {
                req = req.header(reqwest::header::IF_NONE_MATCH, t);
            }
            if let Some(t) = &old.last_modified {
                req = req.header(reqwest::header::IF_MODIFIED_SINCE, t);
            }
        }
        let resp = req.send().await.map_err(|e| {
            Fetched::Failed(format!(
                "cannot download it to hash it: {}",
                error_chain(&e)
            ))
        })?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_MODIFIED && old.sha256.is_some() {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(Fetched::Gone(format!(
                "downloading it to hash it: the server answered {status}"
            )));
        }
        if let Some(len) = resp.content_length() {
            if len > cfg.max_bytes {
                return Err(Fetched::Gone(format!(
                    "it is {len} bytes, more than remoteHashMaxBytes ({}); put a .sha256 beside it",
                    cfg.max_bytes
                )));
            }
        }
        let header = |n: reqwest::header::HeaderName| {
            resp.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let etag = header(reqwest::header::ETAG);
        let last_modified = header(reqwest::header::LAST_MODIFIED);
        let mut h = Sha256::new();
        let mut bytes = 0u64;
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                Fetched::Failed(format!("downloading it to hash it: {}", error_chain(&e)))
            })?;
            bytes += chunk.len() as u64;
            if bytes > cfg.max_bytes {
                return Err(Fetched::Gone(format!(
                    "it is more than remoteHashMaxBytes ({}); put a .sha256 beside it",
                    cfg.max_bytes
                )));
            }
            h.update(&chunk);
        }
        Ok(Some(Hashed {
            sha: hex::encode(h.finalize()),
            bytes,
            etag,
            last_modified,
        }))
    }
}

/// An error with its causes, `a: b: c`, so a log says "connection refused", not just
/// "error sending request".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
}

struct Hashed {
    sha: String,
    bytes: u64,
    etag: Option<String>,
    last_modified: Option<String>,
}

enum Fetched {
    /// The server says there is no such tarball (or it is too big): forget the digest.
    Gone(String),
    /// Transport trouble: keep what we knew.
    Failed(String),
}

fn sidecar_name(a: &Artifact) -> String {
    format!("{}.sha256", a.file)
}

/// Hashes the local file of `path` unless its size and mtime are cached.
fn hash_local(
    cache: &Mutex<HashMap<PathBuf, LocalEntry>>,
    dir: &Path,
    path: &str,
    file: &str,
) -> (Option<String>, Option<String>) {
    let (f, full, md) = match tarfs::open(dir, path) {
        Ok(o) => o,
        Err(e) => {
            let why = match e {
                TarfsError::NotFound => format!(
                    "{file} is not in tarballDir (looked for {})",
                    dir.join(path.trim_start_matches('/')).display()
                ),
                TarfsError::Outside => format!(
                    "{path} resolves outside tarballDir or to a hidden file; it is neither served nor hashed"
                ),
                TarfsError::NotRegular => {
                    format!("{path} in tarballDir is not a regular file; it is neither served nor hashed")
                }
                TarfsError::BadPath(why) => format!("{path} is refused: {why}"),
                TarfsError::Io(e) => format!("cannot read {file}: {e}"),
            };
            return (None, Some(why));
        }
    };
    let (size, mtime) = (md.len(), md.modified().unwrap_or(SystemTime::UNIX_EPOCH));
    let cached = cache
        .lock()
        .get(&full)
        .filter(|e| e.size == size && e.mtime == mtime)
        .map(|e| e.sha.clone());
    if let Some(s) = cached {
        return (Some(s), None);
    }
    match hash_reader(f) {
        Ok(s) => {
            tracing::info!(file = %full.display(), size, sha256 = %s, "hashed tarball");
            cache.lock().insert(
                full,
                LocalEntry {
                    size,
                    mtime,
                    sha: s.clone(),
                },
            );
            (Some(s), None)
        }
        Err(e) => {
            tracing::warn!(file = %full.display(), error = %e, "cannot hash tarball");
            (None, Some(format!("cannot hash {file}: {e}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn locator(listen: &str, bases: &[&str]) -> Locator {
        let text = serde_json::json!({
            "http": {"enabled": true, "listen": listen},
            "tarballUrls": bases,
            "agents": [],
        })
        .to_string();
        Locator::new(&crate::config::parse(&text).unwrap().config)
    }

    #[test]
    fn urls_of_this_server_map_to_tarball_dir_by_path() {
        let mut names = HashMap::new();
        let local = |p: &str| Place::Local(p.to_string());
        // (listen, tarballUrls, URL, expected)
        let table: Vec<(&str, Vec<&str>, &str, Place)> = vec![
            // Seed 001's guide: listen on every address, URL on loopback, a subfolder.
            (
                "0.0.0.0:2000",
                vec![],
                "http://127.0.0.1:2000/falcon/falcon-agent-3.1.3.tar.gz",
                local("/falcon/falcon-agent-3.1.3.tar.gz"),
            ),
            (
                ":2000",
                vec![],
                "http://localhost:2000/a-1.tar.gz",
                local("/a-1.tar.gz"),
            ),
            (
                "127.0.0.1:2000",
                vec![],
                "http://127.0.0.1:2000/a-1.tar.gz",
                local("/a-1.tar.gz"),
            ),
            // Another port, another scheme, another address: another server.
            (
                "0.0.0.0:2000",
                vec![],
                "http://127.0.0.1:2001/a-1.tar.gz",
                Place::Remote,
            ),
            (
                "0.0.0.0:2000",
                vec![],
                "https://127.0.0.1:2000/a-1.tar.gz",
                Place::Remote,
            ),
            (
                "127.0.0.1:2000",
                vec![],
                "http://127.0.0.2:2000/a-1.tar.gz",
                Place::Remote,
            ),
            // 192.0.2.0/24 is for documentation: no interface has it.
            (
                "0.0.0.0:2000",
                vec![],
                "http://192.0.2.7:2000/a-1.tar.gz",
                Place::Remote,
            ),
            // A base the operator lists: the path below it.
            (
                "127.0.0.1:2000",
                vec!["https://meta.example/files/"],
                "https://meta.example/files/falcon/a-1.tar.gz",
                local("/falcon/a-1.tar.gz"),
            ),
            (
                "127.0.0.1:2000",
                vec!["https://meta.example/files"],
                "https://META.example:443/files/a-1.tar.gz",
                local("/a-1.tar.gz"),
            ),
            (
                "127.0.0.1:2000",
                vec!["https://meta.example/files"],
                "https://meta.example/filesX/a-1.tar.gz",
                Place::Remote,
            ),
            ("127.0.0.1:2000", vec![], "not a url", Place::Remote),
        ];
        for (listen, bases, url, want) in table {
            let got = locator(listen, &bases).place(url, &mut names);
            names.clear();
            assert_eq!(got, want, "listen {listen}, bases {bases:?}, url {url}");
        }
    }

    #[test]
    fn https_urls_to_the_tls_listener_are_ours_too() {
        let mut names = HashMap::new();
        let l = Locator {
            tls_listen: Some("0.0.0.0:6443".parse().unwrap()),
            ..locator("0.0.0.0:2000", &[])
        };
        let table = [
            (
                "https://127.0.0.1:6443/a/a-1.tar.gz",
                Place::Local("/a/a-1.tar.gz".into()),
            ),
            (
                "https://localhost:6443/a-1.tar.gz",
                Place::Local("/a-1.tar.gz".into()),
            ),
            (
                "http://127.0.0.1:2000/a-1.tar.gz",
                Place::Local("/a-1.tar.gz".into()),
            ),
            // The TLS port over plain HTTP, the plain port over TLS: not what we serve.
            ("http://127.0.0.1:6443/a-1.tar.gz", Place::Remote),
            ("https://127.0.0.1:2000/a-1.tar.gz", Place::Remote),
            ("https://192.0.2.7:6443/a-1.tar.gz", Place::Remote),
        ];
        for (url, want) in table {
            assert_eq!(l.place(url, &mut names), want, "{url}");
        }
    }

    fn cfg(dir: &Path) -> PassConfig {
        PassConfig {
            tarball_dir: dir.to_path_buf(),
            locator: locator("127.0.0.1:2000", &[]),
            hash: true,
            remote_recheck: Duration::from_secs(60),
            max_bytes: 1 << 20,
            download_timeout: Duration::from_secs(10),
        }
    }

    fn art(path: &str) -> Artifact {
        let file = path.rsplit('/').next().unwrap().to_string();
        Artifact {
            file,
            tarball_url: format!("http://127.0.0.1:2000{path}"),
            md5_url: format!("http://127.0.0.1:2000{path}.md5"),
            sha256_configured: false,
        }
    }

    #[tokio::test]
    async fn local_files_in_subfolders_are_hashed_and_changes_noticed() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("tarball");
        std::fs::create_dir_all(dir.join("falcon")).unwrap();
        std::fs::write(dir.join("falcon/f-1.tar.gz"), b"one").unwrap();
        let md5 = "0123456789abcdef0123456789abcdef";
        std::fs::write(
            dir.join("falcon/f-1.tar.gz.md5"),
            format!("{md5}  f-1.tar.gz\n"),
        )
        .unwrap();
        std::fs::write(root.path().join("secret"), b"outside").unwrap();
        std::os::unix::fs::symlink(root.path().join("secret"), dir.join("leak-1.tar.gz")).unwrap();
        let c = Arc::new(DigestCache::new());
        let arts = [
            art("/falcon/f-1.tar.gz"),
            art("/f-2.tar.gz"),
            art("/leak-1.tar.gz"),
        ];
        let got = c.pass(&cfg(&dir), &arts).await;
        let k = &got[&arts[0].tarball_url];
        assert_eq!(
            k.sha256.as_deref(),
            Some(hex::encode(Sha256::digest(b"one")).as_str())
        );
        assert_eq!(k.md5.as_deref(), Some(md5));
        assert_eq!(k.problem, None);
        let missing = &got[&arts[1].tarball_url];
        assert_eq!(missing.sha256, None);
        assert!(missing
            .problem
            .as_deref()
            .unwrap()
            .contains("f-2.tar.gz is not in tarballDir"));
        // Regression: the hasher followed a symlink out of tarballDir that the file server
        // refuses, and the digest of an outside file was sent to hosts.
        let leak = &got[&arts[2].tarball_url];
        assert_eq!(leak.sha256, None);
        assert!(leak
            .problem
            .as_deref()
            .unwrap()
            .contains("outside tarballDir"));
        std::fs::write(dir.join("falcon/f-1.tar.gz"), b"other").unwrap();
        let got = c.pass(&cfg(&dir), &arts).await;
        assert_eq!(
            got[&arts[0].tarball_url].sha256.as_deref(),
            Some(hex::encode(Sha256::digest(b"other")).as_str())
        );
    }
}
