//! `cfg.json` of ops-meta: the original keys, read the way the original Go program read
//! them, plus our optional keys; parsed without syscalls and validated with every problem
//! reported at once.
//!
//! The file is read through `serde_json::Value` rather than derived structs so that each
//! problem can name its field (`agents[1].others[0].prefix`) and so that unknown keys,
//! which forks of the original may have added, become warnings instead of errors. Like Go's
//! decoder, key matching falls back to a case-insensitive match and `null` means "absent".

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::persist::StoreSpec;
use proto::{rules, AgentName, Version};
use serde_json::{Map, Value};

/// Default age after which a host that stopped reporting is forgotten: 3 days, as the original.
pub const fn default_stale_host_secs() -> u64 {
    3 * 24 * 3600
}
/// Default time between two sweeps of stale hosts.
pub const fn default_sweep_interval_secs() -> u64 {
    3600
}
/// Default largest heartbeat body: 1 MiB.
pub const fn default_max_body_bytes() -> u64 {
    1024 * 1024
}
/// Default largest number of agents one heartbeat may report.
pub const fn default_max_agents_per_heartbeat() -> u64 {
    64
}
/// Default time a request may take from its headers to its response headers.
pub const fn default_request_timeout_secs() -> u64 {
    30
}
/// Default time a client has to send the request headers.
pub const fn default_header_read_timeout_secs() -> u64 {
    10
}
/// Default time a connection with bytes waiting to be sent may go without the client
/// reading any of them.
pub const fn default_write_timeout_secs() -> u64 {
    30
}
/// Default number of status pages (`/status/json|text/NAME`) sent at the same time.
pub const fn default_max_status_streams() -> u64 {
    64
}
/// Default most connections open at once.
/// Default of `rolloutPassMillis`.
pub const fn default_rollout_pass_millis() -> u64 {
    1000
}

pub const fn default_max_connections() -> u64 {
    10_000
}
/// Default time between two checks of the tarballs ops-meta hashes itself.
pub const fn default_sha_recheck_secs() -> u64 {
    10
}
/// Default largest tarball ops-meta downloads from another server to hash it: 4 GiB.
pub const fn default_remote_hash_max_bytes() -> u64 {
    4 << 30
}
/// Default time one such download may take.
pub const fn default_remote_hash_timeout_secs() -> u64 {
    900
}
/// Default time between two checks of a tarball on another server.
pub const fn default_remote_recheck_secs() -> u64 {
    60
}
/// Default time in-flight requests get to finish after SIGTERM.
pub const fn default_shutdown_grace_secs() -> u64 {
    30
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `debug`: log every heartbeat request and response at info level.
    pub debug: bool,
    /// `tarballDir`: the folder served at `/<path>`. A relative path is relative to the
    /// process working directory, as in the original (not to the config file). Empty means
    /// no files are served.
    pub tarball_dir: PathBuf,
    /// `http`.
    pub http: HttpConfig,
    /// `tls` (ours): an HTTPS listener beside (or instead of) the plain one.
    pub tls: Option<TlsConfig>,
    /// `agents`.
    pub agents: Vec<AgentConfig>,
    /// `staleHostSecs` (ours): hosts not seen for this long are dropped.
    pub stale_host_secs: u64,
    /// `sweepIntervalSecs` (ours): how often stale hosts are looked for.
    pub sweep_interval_secs: u64,
    /// `maxBodyBytes` (ours): largest heartbeat body; larger ones get 413.
    pub max_body_bytes: u64,
    /// `maxAgentsPerHeartbeat` (ours): more agents in one heartbeat get 400.
    pub max_agents_per_heartbeat: u64,
    /// `requestTimeoutSecs` (ours): a request not answered in this time gets 408.
    pub request_timeout_secs: u64,
    /// `headerReadTimeoutSecs` (ours): a connection that does not send its request
    /// headers in this time is closed. Read at start-up only.
    pub header_read_timeout_secs: u64,
    /// `writeTimeoutSecs` (ours): a connection whose answer has waited this long without
    /// the client reading a byte of it is closed. Read for each new connection.
    pub write_timeout_secs: u64,
    /// `maxStatusStreams` (ours): status pages sent at the same time; one more gets 503
    /// with `Retry-After`.
    pub max_status_streams: u64,
    /// `maxConnections` (ours): connections open at once, over all listeners; past it,
    /// new connections wait in the listen backlog until one closes. Read at start only.
    pub max_connections: u64,
    /// `rolloutPassMillis` (ours): how often the rollout controller looks at its hosts.
    pub rollout_pass_millis: u64,
    /// `shaRecheckSecs` (ours): how often local tarballs are checked for change to
    /// recompute their SHA-256; 0 turns computing SHA-256 off.
    pub sha_recheck_secs: u64,
    /// `shutdownGraceSecs` (ours): how long in-flight requests may take after SIGTERM.
    pub shutdown_grace_secs: u64,
    /// `store` (ours): where the fleet state is kept (`memory`, `sqlite:PATH`,
    /// `postgres://...`); default `sqlite:ops-meta.db`, relative to the working directory
    /// like `tarballDir`. Read at start only.
    pub store: StoreSpec,
    /// `tagRules` (ours): BootAgent tags by hostname prefix; every matching rule's tags
    /// are joined in order.
    pub tag_rules: Vec<TagRule>,
    /// `tarballUrls` (ours): base URLs under which hosts reach this server's `tarballDir`
    /// besides its own listen address (a DNS name, a load balancer, a TLS front). A
    /// tarball URL under one of them is read from `tarballDir` by its path; any other URL
    /// is another server's and its digest is fetched from there.
    pub tarball_urls: Vec<String>,
    /// `requireSha256` (ours): hand BootAgent hosts install and upgrade jobs only with a
    /// SHA-256. When false (the default), a job carries the MD5 of the `.md5` file until a
    /// SHA-256 is known, as the legacy heartbeat path does.
    pub require_sha256: bool,
    /// `remoteHashMaxBytes` (ours): largest tarball of another server that ops-meta
    /// downloads to hash when that server has no `.sha256` beside it; 0 never downloads.
    pub remote_hash_max_bytes: u64,
    /// `remoteHashTimeoutSecs` (ours): longest time one such download may take.
    pub remote_hash_timeout_secs: u64,
    /// `remoteRecheckSecs` (ours): how often a tarball on another server is checked for
    /// change (its `.sha256`, or its ETag / Last-Modified / length).
    pub remote_recheck_secs: u64,
    /// `apiTokens` (ours): the operators' bearer tokens, by the SHA-256 of each (the token
    /// itself is never in the file). Empty: the operator API and `/config/reload` answer
    /// loopback callers only, as the original, with the browser checks of
    /// [`crate::http`]'s auth module. Taken at every reload.
    pub api_tokens: Vec<ApiToken>,
    /// `enrollmentSecrets` (ours): secrets of which a BootAgent host must present one
    /// (`enrollmentSecret` in its registration) to be given a credential; several at once
    /// so that they can be rotated. Empty (the default): any host may enroll. Kept as
    /// SHA-256 only, so that neither `Debug` nor a log can show them.
    pub enrollment_secrets: Vec<[u8; 32]>,
    /// `legacyHeartbeat` (ours): `allow` (the default) or `deny` the legacy
    /// `POST /heartbeat`, which carries no credential. Allowed, it can never speak for a
    /// BootAgent host that holds a credential.
    pub legacy_heartbeat: LegacyHeartbeat,
}

/// `legacyHeartbeat`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LegacyHeartbeat {
    /// Legacy heartbeats are taken, for hostnames that are not credential-holding
    /// BootAgent hosts.
    #[default]
    Allow,
    /// Every legacy heartbeat is refused (403).
    Deny,
}

/// `apiTokens[]` (ours).
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken {
    /// `name`: who holds the token, as the audit log records it; unique.
    pub name: String,
    /// `role`: `admin` (reads and every change) or `read` (reads only).
    pub role: Role,
    /// `sha256`: SHA-256 of the token as sent after `Bearer `.
    pub sha256: [u8; 32],
}

/// Shown without the hash, so that logs and `-T` never print it.
impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiToken")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Operator reads: `GET /api/*`, `/status/*`, `/metrics`.
    Read,
    /// Reads and mutations: every other `/api/*` method and `/config/reload`.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Admin => "admin",
        }
    }
}

/// Longest token name.
pub const MAX_TOKEN_NAME: usize = 64;

/// `tagRules[]` (ours).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRule {
    /// Hostnames starting with this get the tags; empty matches every host.
    pub prefix: String,
    /// Comma-separated `key=value`, e.g. `svc=web,cmpt=FE`.
    pub tags: String,
}

/// `http`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    /// `http.enabled`: when false the original serves nothing; so do we.
    pub enabled: bool,
    /// `http.listen`: `IP:PORT`, `:PORT` (all interfaces) or `localhost:PORT`.
    pub listen: String,
}

/// `tls` (ours): HTTPS on its own address, with the same routes as `http`. The files are
/// read at start and at every reload (SIGHUP, `GET /config/reload`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// `tls.listen`: as `http.listen`. Read at start only.
    pub listen: String,
    /// `tls.certFile`: PEM, the server's certificate first, then any intermediates. A
    /// relative path is relative to the working directory, like `tarballDir`.
    pub cert_file: PathBuf,
    /// `tls.keyFile`: PEM, the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

/// One element of `agents`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// `default`: the state every host gets. An entry without it is skipped.
    pub default: Option<AgentDefault>,
    /// `others`: prefix overrides, applied in order.
    pub others: Vec<AgentOverride>,
}

/// `agents[].default`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentDefault {
    /// Checked when the config is read: a name that fails leaves the entry out (and the
    /// config refused).
    pub name: AgentName,
    pub version: Version,
    /// Base URL of the tarball.
    pub tarball: String,
    /// Base URL of the `.md5` file; empty means the tarball base.
    pub md5: String,
    /// `start`, `stop` or empty.
    pub cmd: String,
    /// `sha256` (ours): lowercase hex SHA-256 of `{name}-{version}.tar.gz`.
    pub sha256: Option<String>,
    /// `envs` (ours): environment of the agent, sent in BootAgent jobs.
    pub envs: BTreeMap<String, String>,
    /// `limits` (ours): resource limits of the agent (e.g. `CPU`, `memory`), sent in
    /// BootAgent jobs.
    pub limits: BTreeMap<String, String>,
}

/// `agents[].others[]`: every non-empty field overrides the default for hosts whose name
/// starts with `prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentOverride {
    pub prefix: String,
    pub version: String,
    pub tarball: String,
    pub md5: String,
    pub cmd: String,
    /// `sha256` (ours): SHA-256 of the tarball of this entry's `version`.
    pub sha256: Option<String>,
    /// `envs` (ours): when non-empty, replaces the whole `envs` of the default.
    pub envs: BTreeMap<String, String>,
    /// `limits` (ours): when non-empty, replaces the whole `limits` of the default.
    pub limits: BTreeMap<String, String>,
}

/// One problem found in a config, naming its field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

/// A config that parsed and validated, with the warnings found on the way.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<Problem>,
    /// The certificate and key of `tls`, read and checked while validating.
    pub tls_pair: Option<Arc<rustls::sign::CertifiedKey>>,
}

/// Why a config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {} error(s):\n{}", errors.len(), list(errors))]
    Invalid {
        path: PathBuf,
        errors: Vec<Problem>,
        warnings: Vec<Problem>,
    },
}

fn list(ps: &[Problem]) -> String {
    ps.iter()
        .map(|p| format!("  {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigError {
    /// Every error, one per line, for an HTTP body or a log.
    pub fn errors(&self) -> Vec<String> {
        match self {
            ConfigError::Read { .. } => vec![self.to_string()],
            ConfigError::Invalid { errors, .. } => errors.iter().map(|p| p.to_string()).collect(),
        }
    }
}

/// Reads and validates the config at `path`.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut loaded = parse(&text).map_err(|(errors, warnings)| ConfigError::Invalid {
        path: path.to_path_buf(),
        errors,
        warnings,
    })?;
    loaded.warnings.extend(resolve(&loaded.config));
    Ok(loaded)
}

/// Checks what parsing cannot: that `tarballDir` exists. Only warnings, since the original
/// started without it too (and answered 404).
pub fn resolve(cfg: &Config) -> Vec<Problem> {
    let mut w = Vec::new();
    if !cfg.tarball_dir.as_os_str().is_empty() && !cfg.tarball_dir.is_dir() {
        w.push(Problem {
            field: "tarballDir".into(),
            message: format!(
                "{} is not a folder (relative to the working directory); no files will be served",
                cfg.tarball_dir.display()
            ),
        });
    }
    w
}

/// Parses `http.listen` into an address to bind.
pub fn listen_addr(listen: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = listen.parse::<SocketAddr>() {
        return Ok(a);
    }
    let bad = || format!("{listen:?} is not IP:PORT, :PORT or localhost:PORT");
    let (host, port) = listen.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let ip = match host {
        "" => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
        _ => return Err(bad()),
    };
    Ok(SocketAddr::new(ip, port))
}

/// Parses and validates a config text. On failure, returns (errors, warnings).
pub fn parse(text: &str) -> Result<Loaded, (Vec<Problem>, Vec<Problem>)> {
    let mut p = Parser::default();
    let root: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            p.error("", format!("not valid JSON: {e}"));
            return Err((p.errors, p.warnings));
        }
    };
    let config = p.config(&root);
    if p.errors.is_empty() {
        Ok(Loaded {
            config,
            warnings: p.warnings,
            tls_pair: p.tls_pair,
        })
    } else {
        Err((p.errors, p.warnings))
    }
}

#[derive(Default)]
struct Parser {
    errors: Vec<Problem>,
    warnings: Vec<Problem>,
    tls_pair: Option<Arc<rustls::sign::CertifiedKey>>,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Go's decoder: an exact key wins, else the first case-insensitive match.
fn lookup<'a>(m: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    let v = m.get(key).or_else(|| {
        m.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })?;
    if v.is_null() {
        None
    } else {
        Some(v)
    }
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Parser {
    fn error(&mut self, field: &str, message: impl Into<String>) {
        self.errors.push(Problem {
            field: field.into(),
            message: message.into(),
        });
    }

    fn warn(&mut self, field: &str, message: impl Into<String>) {
        self.warnings.push(Problem {
            field: field.into(),
            message: message.into(),
        });
    }

    /// The object at `v`, or an error. Unknown keys become warnings.
    fn object<'a>(
        &mut self,
        v: &'a Value,
        path: &str,
        known: &[&str],
    ) -> Option<&'a Map<String, Value>> {
        let Some(m) = v.as_object() else {
            self.error(path, format!("want an object, got {}", kind(v)));
            return None;
        };
        for k in m.keys() {
            if !known.iter().any(|n| n.eq_ignore_ascii_case(k)) {
                self.warn(&join(path, k), "unknown key, ignored");
            }
        }
        Some(m)
    }

    fn bool(&mut self, m: &Map<String, Value>, path: &str, key: &str, default: bool) -> bool {
        match lookup(m, key) {
            None => default,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                self.error(
                    &join(path, key),
                    format!("want true or false, got {}", kind(v)),
                );
                default
            }
        }
    }

    fn string(&mut self, m: &Map<String, Value>, path: &str, key: &str) -> String {
        match lookup(m, key) {
            None => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(v) => {
                self.error(&join(path, key), format!("want a string, got {}", kind(v)));
                String::new()
            }
        }
    }

    fn number(
        &mut self,
        m: &Map<String, Value>,
        key: &str,
        default: u64,
        min: u64,
        max: u64,
    ) -> u64 {
        match lookup(m, key) {
            None => default,
            Some(v) => match v.as_u64() {
                Some(n) if (min..=max).contains(&n) => n,
                _ => {
                    self.error(
                        key,
                        format!("want a whole number from {min} to {max}, got {v}"),
                    );
                    default
                }
            },
        }
    }

    fn url(&mut self, field: &str, s: &str) {
        if !(s.is_empty() || s.starts_with("http://") || s.starts_with("https://")) {
            self.error(field, format!("{s:?} is not an http:// or https:// URL"));
        }
    }

    fn cmd(&mut self, field: &str, s: &str) {
        if !matches!(s, "" | "start" | "stop") {
            self.error(field, format!("{s:?} is not \"start\", \"stop\" or empty"));
        }
    }

    fn sha256(&mut self, m: &Map<String, Value>, path: &str) -> Option<String> {
        let s = self.string(m, path, "sha256");
        if s.is_empty() {
            return None;
        }
        if !is_hex64(&s) {
            self.error(
                &join(path, "sha256"),
                format!("{s:?} is not 64 hexadecimal digits"),
            );
            return None;
        }
        Some(s.to_ascii_lowercase())
    }

    fn config(&mut self, root: &Value) -> Config {
        const KNOWN: &[&str] = &[
            "debug",
            "tarballDir",
            "http",
            "agents",
            "staleHostSecs",
            "sweepIntervalSecs",
            "maxBodyBytes",
            "maxAgentsPerHeartbeat",
            "requestTimeoutSecs",
            "headerReadTimeoutSecs",
            "writeTimeoutSecs",
            "maxStatusStreams",
            "maxConnections",
            "rolloutPassMillis",
            "shaRecheckSecs",
            "shutdownGraceSecs",
            "tagRules",
            "tarballUrls",
            "requireSha256",
            "remoteHashMaxBytes",
            "remoteHashTimeoutSecs",
            "remoteRecheckSecs",
            "store",
            "apiTokens",
            "enrollmentSecrets",
            "legacyHeartbeat",
            "tls",
        ];
        let empty = Map::new();
        let m = self.object(root, "", KNOWN).unwrap_or(&empty);
        let debug = self.bool(m, "", "debug", false);
        let tarball_dir = self.string(m, "", "tarballDir");
        if tarball_dir.is_empty() {
            self.warn("tarballDir", "is empty; no files will be served");
        }
        if tarball_dir.contains('\0') {
            self.error("tarballDir", "holds a NUL byte");
        }
        let tls = self.tls(m);
        let http = self.http(m, tls.is_some());
        if let (true, Some(t)) = (http.enabled, &tls) {
            let (a, b) = (listen_addr(&http.listen), listen_addr(&t.listen));
            if let (Ok(a), Ok(b)) = (a, b) {
                if a.port() == b.port()
                    && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
                {
                    self.error(
                        "tls.listen",
                        format!("{} is also http.listen's address", t.listen),
                    );
                }
            }
        }
        let agents = self.agents(m);
        const DAY: u64 = 24 * 3600;
        Config {
            debug,
            tarball_dir: PathBuf::from(tarball_dir),
            http,
            tls,
            agents,
            stale_host_secs: self.number(
                m,
                "staleHostSecs",
                default_stale_host_secs(),
                1,
                365 * DAY,
            ),
            sweep_interval_secs: self.number(
                m,
                "sweepIntervalSecs",
                default_sweep_interval_secs(),
                1,
                7 * DAY,
            ),
            max_body_bytes: self.number(m, "maxBodyBytes", default_max_body_bytes(), 64, 1 << 30),
            max_agents_per_heartbeat: self.number(
                m,
                "maxAgentsPerHeartbeat",
                default_max_agents_per_heartbeat(),
                1,
                100_000,
            ),
            request_timeout_secs: self.number(
                m,
                "requestTimeoutSecs",
                default_request_timeout_secs(),
                1,
                3600,
            ),
            header_read_timeout_secs: self.number(
                m,
                "headerReadTimeoutSecs",
                default_header_read_timeout_secs(),
                1,
                3600,
            ),
            write_timeout_secs: self.number(
                m,
                "writeTimeoutSecs",
                default_write_timeout_secs(),
                1,
                3600,
            ),
            max_status_streams: self.number(
                m,
                "maxStatusStreams",
                default_max_status_streams(),
                1,
                100_000,
            ),
            max_connections: self.number(
                m,
                "maxConnections",
                default_max_connections(),
                1,
                1_000_000,
            ),
            rollout_pass_millis: self.number(
                m,
                "rolloutPassMillis",
                default_rollout_pass_millis(),
                50,
                60_000,
            ),
            sha_recheck_secs: self.number(m, "shaRecheckSecs", default_sha_recheck_secs(), 0, DAY),
            shutdown_grace_secs: self.number(
                m,
                "shutdownGraceSecs",
                default_shutdown_grace_secs(),
                0,
                3600,
            ),
            store: self.store(m),
            tag_rules: self.tag_rules(m),
            tarball_urls: self.tarball_urls(m),
            require_sha256: self.bool(m, "", "requireSha256", false),
            remote_hash_max_bytes: self.number(
                m,
                "remoteHashMaxBytes",
                default_remote_hash_max_bytes(),
                0,
                1 << 40,
            ),
            remote_hash_timeout_secs: self.number(
                m,
                "remoteHashTimeoutSecs",
                default_remote_hash_timeout_secs(),
                1,
                DAY,
            ),
            remote_recheck_secs: self.number(
                m,
                "remoteRecheckSecs",
                default_remote_recheck_secs(),
                1,
                DAY,
            ),
            api_tokens: self.api_tokens(m),
            enrollment_secrets: self.enrollment_secrets(m),
            legacy_heartbeat: self.legacy_heartbeat(m),
        }
    }

    /// `enrollmentSecrets`: a list of secrets ([`proto::bootagent::check_enrollment_secret`]),
    /// kept hashed. A problem never quotes a secret.
    fn enrollment_secrets(&mut self, m: &Map<String, Value>) -> Vec<[u8; 32]> {
        let Some(v) = lookup(m, "enrollmentSecrets") else {
            return Vec::new();
        };
        let Some(items) = v.as_array() else {
            self.error(
                "enrollmentSecrets",
                format!("want a list of strings, got {}", kind(v)),
            );
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let field = format!("enrollmentSecrets[{i}]");
            let Some(secret) = item.as_str() else {
                self.error(&field, format!("want a string, got {}", kind(item)));
                continue;
            };
            if let Err(e) = proto::bootagent::check_enrollment_secret(secret) {
                self.error(&field, e);
                continue;
            }
            let h = crate::boot::hash_secret(secret);
            if out.contains(&h) {
                self.warn(&field, "the same secret as an earlier entry");
            } else {
                out.push(h);
            }
        }
        out
    }

    /// `legacyHeartbeat`: `allow` or `deny`.
    fn legacy_heartbeat(&mut self, m: &Map<String, Value>) -> LegacyHeartbeat {
        match lookup(m, "legacyHeartbeat") {
            None => LegacyHeartbeat::Allow,
            Some(Value::String(s)) if s == "allow" => LegacyHeartbeat::Allow,
            Some(Value::String(s)) if s == "deny" => LegacyHeartbeat::Deny,
            Some(v) => {
                self.error(
                    "legacyHeartbeat",
                    format!("want \"allow\" or \"deny\", got {v}"),
                );
                LegacyHeartbeat::Allow
            }
        }
    }

    /// `apiTokens`: a list of `{"name", "role", "sha256"}`, every problem reported; a
    /// section of ours alone, so an unknown key (a `token` pasted in, say) is an error.
    fn api_tokens(&mut self, m: &Map<String, Value>) -> Vec<ApiToken> {
        let Some(v) = lookup(m, "apiTokens") else {
            return Vec::new();
        };
        let Some(items) = v.as_array() else {
            self.error("apiTokens", format!("want a list, got {}", kind(v)));
            return Vec::new();
        };
        let mut out: Vec<ApiToken> = Vec::new();
        // Every name and hash given, valid entries or not, for the duplicate checks.
        let mut names: Vec<String> = Vec::new();
        let mut hashes: Vec<[u8; 32]> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let p = format!("apiTokens[{i}]");
            let Some(o) = item.as_object() else {
                self.error(&p, format!("want an object, got {}", kind(item)));
                continue;
            };
            for k in o.keys() {
                if !["name", "role", "sha256"]
                    .iter()
                    .any(|n| n.eq_ignore_ascii_case(k))
                {
                    self.error(
                        &join(&p, k),
                        "unknown key (name, role, sha256; the file holds the token's SHA-256, never the token)",
                    );
                }
            }
            let mut ok = true;
            let name = self.string(o, &p, "name");
            if name.is_empty() {
                self.error(&join(&p, "name"), "is missing or empty");
                ok = false;
            } else if name.len() > MAX_TOKEN_NAME
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._@-".contains(&b))
            {
                self.error(
                    &join(&p, "name"),
                    format!(
                        "{:?} is not 1 to {MAX_TOKEN_NAME} letters, digits, '.', '_', '@' or '-'",
                        name.chars().take(MAX_TOKEN_NAME + 1).collect::<String>()
                    ),
                );
                ok = false;
            } else if names.contains(&name) {
                self.error(
                    &join(&p, "name"),
                    format!("{name:?} is also the name of another token; names are unique"),
                );
                ok = false;
            }
            let role = match self.string(o, &p, "role").as_str() {
                "admin" => Role::Admin,
                "read" => Role::Read,
                "" => {
                    self.error(&join(&p, "role"), "is missing (admin or read)");
                    ok = false;
                    Role::Read
                }
                other => {
                    self.error(
                        &join(&p, "role"),
                        format!(
                            "{:?} is not admin or read",
                            other.chars().take(32).collect::<String>()
                        ),
                    );
                    ok = false;
                    Role::Read
                }
            };
            let hex = self.string(o, &p, "sha256");
            let mut sha256 = [0u8; 32];
            if hex.is_empty() {
                self.error(
                    &join(&p, "sha256"),
                    "is missing: the SHA-256 of the token, e.g. `printf %s TOKEN | sha256sum`",
                );
                ok = false;
            } else if !is_hex64(&hex) || hex::decode_to_slice(&hex, &mut sha256).is_err() {
                self.error(
                    &join(&p, "sha256"),
                    format!(
                        "is {} characters, not 64 hexadecimal digits",
                        hex.chars().count()
                    ),
                );
                ok = false;
            } else if hashes.contains(&sha256) {
                self.error(
                    &join(&p, "sha256"),
                    "is also the hash of another token; each token is its own",
                );
                ok = false;
            } else {
                hashes.push(sha256);
            }
            names.push(name.clone());
            if ok {
                out.push(ApiToken { name, role, sha256 });
            }
        }
        out
    }

    /// `store`: parsed only (no file is opened, no server asked), so `-T` has no effects.
    fn store(&mut self, m: &Map<String, Value>) -> StoreSpec {
        match lookup(m, "store") {
            None => StoreSpec::default(),
            Some(Value::String(s)) => StoreSpec::parse(s).unwrap_or_else(|e| {
                self.error("store", e);
                StoreSpec::default()
            }),
            Some(v) => {
                self.error("store", format!("want a string, got {}", kind(v)));
                StoreSpec::default()
            }
        }
    }

    /// `tarballUrls`: a list of `http://` or `https://` base URLs without query or fragment.
    fn tarball_urls(&mut self, m: &Map<String, Value>) -> Vec<String> {
        let Some(v) = lookup(m, "tarballUrls") else {
            return Vec::new();
        };
        let Some(items) = v.as_array() else {
            self.error("tarballUrls", format!("want a list, got {}", kind(v)));
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let field = format!("tarballUrls[{i}]");
            let Some(s) = item.as_str() else {
                self.error(&field, format!("want a string, got {}", kind(item)));
                continue;
            };
            match url::Url::parse(s) {
                Ok(u)
                    if matches!(u.scheme(), "http" | "https")
                        && u.host().is_some()
                        && u.query().is_none()
                        && u.fragment().is_none() =>
                {
                    out.push(s.to_string())
                }
                _ => self.error(
                    &field,
                    format!("{s:?} is not an http:// or https:// base URL (no query, no fragment)"),
                ),
            }
        }
        out
    }

    /// `tagRules`: a list of `{"prefix", "tags"}`.
    fn tag_rules(&mut self, m: &Map<String, Value>) -> Vec<TagRule> {
        let Some(v) = lookup(m, "tagRules") else {
            return Vec::new();
        };
        let Some(items) = v.as_array() else {
            self.error("tagRules", format!("want a list, got {}", kind(v)));
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let p = format!("tagRules[{i}]");
            // A section of ours alone: an unknown key is an error, not a warning.
            let Some(o) = item.as_object() else {
                self.error(&p, format!("want an object, got {}", kind(item)));
                continue;
            };
            for k in o.keys() {
                if !["prefix", "tags"].iter().any(|n| n.eq_ignore_ascii_case(k)) {
                    self.error(&join(&p, k), "unknown key (prefix, tags)");
                }
            }
            let prefix = self.string(o, &p, "prefix");
            let tags = self.string(o, &p, "tags");
            if let Err(e) = crate::boot::check_tags(&tags) {
                self.error(&join(&p, "tags"), e);
            }
            out.push(TagRule { prefix, tags });
        }
        out
    }

    /// `envs` or `limits` (ours): an object of strings, each entry checked by `check`
    /// (`proto::rules`), every problem reported.
    fn string_map(
        &mut self,
        m: &Map<String, Value>,
        path: &str,
        key: &str,
        check: fn(&str, &str) -> Result<(), String>,
    ) -> BTreeMap<String, String> {
        let field = join(path, key);
        let Some(v) = lookup(m, key) else {
            return BTreeMap::new();
        };
        let Some(o) = v.as_object() else {
            self.error(&field, format!("want an object, got {}", kind(v)));
            return BTreeMap::new();
        };
        if o.len() > rules::MAX_MAP_ENTRIES {
            self.error(
                &field,
                format!(
                    "has {} entries, the limit is {}",
                    o.len(),
                    rules::MAX_MAP_ENTRIES
                ),
            );
        }

        let mut out = BTreeMap::new();
        for (k, v) in o {
            let Some(s) = v.as_str() else {
                self.error(&join(&field, k), format!("want a string, got {}", kind(v)));
                continue;
            };
            if let Err(e) = check(k, s) {
                self.error(&field, e);
            }
            out.insert(k.clone(), s.to_string());
        }
        out
    }

    /// `tls` (ours): every key required, unknown keys are errors; the files are read and
    /// the pair checked here, so that `-T` and a reload see a bad certificate.
    fn tls(&mut self, m: &Map<String, Value>) -> Option<TlsConfig> {
        let v = lookup(m, "tls")?;
        let Some(t) = v.as_object() else {
            self.error("tls", format!("want an object, got {}", kind(v)));
            return None;
        };
        const KNOWN: [&str; 3] = ["listen", "certFile", "keyFile"];
        for k in t.keys() {
            if !KNOWN.iter().any(|n| n.eq_ignore_ascii_case(k)) {
                self.error(&join("tls", k), "unknown key (listen, certFile, keyFile)");
            }
        }
        let required = |p: &mut Parser, key: &str| {
            let s = p.string(t, "tls", key);
            if s.is_empty() && !matches!(lookup(t, key), Some(v) if !v.is_string()) {
                p.error(&join("tls", key), "is required");
            }
            s
        };
        let listen = required(self, "listen");
        let cert = required(self, "certFile");
        let key = required(self, "keyFile");
        if !listen.is_empty() {
            if let Err(e) = listen_addr(&listen) {
                self.error("tls.listen", e);
            }
        }
        let (cert_file, key_file) = (PathBuf::from(cert), PathBuf::from(key));
        if !cert_file.as_os_str().is_empty() && !key_file.as_os_str().is_empty() {
            match crate::tls::load_pair(&cert_file, &key_file) {
                Ok(pair) => self.tls_pair = Some(pair),
                Err(e) => {
                    let field = if e.path() == key_file && e.path() != cert_file {
                        "tls.keyFile"
                    } else {
                        "tls.certFile"
                    };
                    self.error(field, e.to_string());
                }
            }
        }
        Some(TlsConfig {
            listen,
            cert_file,
            key_file,
        })
    }

    fn http(&mut self, m: &Map<String, Value>, tls: bool) -> HttpConfig {
        let Some(v) = lookup(m, "http") else {
            if !tls {
                self.warn(
                    "http",
                    "absent; nothing will listen (http.enabled is false)",
                );
            }
            return HttpConfig {
                enabled: false,
                listen: String::new(),
            };
        };
        let empty = Map::new();
        let h = self
            .object(v, "http", &["enabled", "listen"])
            .unwrap_or(&empty);
        let enabled = self.bool(h, "http", "enabled", false);
        let listen = self.string(h, "http", "listen");
        if enabled {
            if let Err(e) = listen_addr(&listen) {
                self.error("http.listen", e);
            }
        } else if !tls {
            self.warn("http.enabled", "is false; nothing will listen");
        }
        HttpConfig { enabled, listen }
    }

    fn agents(&mut self, m: &Map<String, Value>) -> Vec<AgentConfig> {
        let Some(v) = lookup(m, "agents") else {
            return Vec::new();
        };
        let Some(items) = v.as_array() else {
            self.error("agents", format!("want a list, got {}", kind(v)));
            return Vec::new();
        };
        let mut out = Vec::with_capacity(items.len());
        let mut seen: Vec<(AgentName, String)> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let path = format!("agents[{i}]");
            let Some(a) = self.object(item, &path, &["default", "others"]) else {
                continue;
            };
            let default = match lookup(a, "default") {
                None => {
                    self.warn(&path, "has no default; skipped, as the original does");
                    None
                }
                Some(d) => self.agent_default(d, &path, &mut seen),
            };
            let others = self.others(a, &path);
            out.push(AgentConfig { default, others });
        }
        out
    }

    /// The `default` of agent entry `entry`; `seen` holds the names of the entries
    /// before it (each agent is configured once), this one's is added.
    fn agent_default(
        &mut self,
        v: &Value,
        entry: &str,
        seen: &mut Vec<(AgentName, String)>,
    ) -> Option<AgentDefault> {
        let path = &join(entry, "default");
        let d = self.object(
            v,
            path,
            &[
                "name", "version", "tarball", "md5", "cmd", "sha256", "envs", "limits",
            ],
        )?;
        let name = AgentName::try_from(self.string(d, path, "name"))
            .map_err(|e| self.error(&join(path, "name"), e.to_string()));
        if let Ok(name) = &name {
            if let Some((_, first)) = seen.iter().find(|(n, _)| n == name) {
                self.error(
                    &join(path, "name"),
                    format!("agent {name:?} is already configured at {first}"),
                );
            } else {
                seen.push((name.clone(), entry.to_string()));
            }
        }
        let version = Version::try_from(self.string(d, path, "version"))
            .map_err(|e| self.error(&join(path, "version"), e.to_string()));
        let tarball = self.string(d, path, "tarball");
        self.url(&join(path, "tarball"), &tarball);
        let md5 = self.string(d, path, "md5");
        self.url(&join(path, "md5"), &md5);
        let cmd = self.string(d, path, "cmd");
        self.cmd(&join(path, "cmd"), &cmd);
        if tarball.is_empty() && cmd == "start" {
            self.error(
                &join(path, "tarball"),
                "is empty but cmd is \"start\": hosts could not download the agent",
            );
        }
        let sha256 = self.sha256(d, path);
        let envs = self.string_map(d, path, "envs", rules::check_env_entry);
        let limits = self.string_map(d, path, "limits", rules::check_limit_entry);
        // Every other key was checked (and its problems recorded) first.
        let (Ok(name), Ok(version)) = (name, version) else {
            return None;
        };
        Some(AgentDefault {
            name,
            version,
            tarball,
            md5,
            cmd,
            sha256,
            envs,
            limits,
        })
    }

    fn others(&mut self, a: &Map<String, Value>, path: &str) -> Vec<AgentOverride> {
        let Some(v) = lookup(a, "others") else {
            return Vec::new();
        };
        let Some(items) = v.as_array() else {
            self.error(
                &join(path, "others"),
                format!("want a list, got {}", kind(v)),
            );
            return Vec::new();
        };
        let mut out = Vec::new();
        for (j, item) in items.iter().enumerate() {
            let p = format!("{path}.others[{j}]");
            let Some(o) = self.object(
                item,
                &p,
                &[
                    "prefix", "version", "tarball", "md5", "cmd", "sha256", "envs", "limits",
                ],
            ) else {
                continue;
            };
            let prefix = self.string(o, &p, "prefix");
            if prefix.is_empty() {
                self.error(&join(&p, "prefix"), "is empty: it would match every host");
            }
            let version = self.string(o, &p, "version");
            if !version.is_empty() {
                if let Err(e) = proto::validate_version(&version) {
                    self.error(&join(&p, "version"), e.to_string());
                }
            }
            let tarball = self.string(o, &p, "tarball");
            self.url(&join(&p, "tarball"), &tarball);
            let md5 = self.string(o, &p, "md5");
            self.url(&join(&p, "md5"), &md5);
            let cmd = self.string(o, &p, "cmd");
            self.cmd(&join(&p, "cmd"), &cmd);
            let sha256 = self.sha256(o, &p);
            if sha256.is_some() && version.is_empty() {
                self.error(
                    &join(&p, "sha256"),
                    "is set but version is not: a sha256 belongs to the version in the same entry",
                );
            }
            let envs = self.string_map(o, &p, "envs", rules::check_env_entry);
            let limits = self.string_map(o, &p, "limits", rules::check_limit_entry);
            out.push(AgentOverride {
                prefix,
                version,
                tarball,
                md5,
                cmd,
                sha256,
                envs,
                limits,
            });
        }
        out
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGINAL: &str = r#"{
        "debug": true,
        "tarballDir": "./tarball",
        "http": {"enabled": true, "listen": "0.0.0.0:2000"},
        "agents": [
            {
                "default": {"name": "falcon-agent", "version": "0.0.1",
                            "tarball": "http://11.11.11.11:8888/falcon", "md5": "", "cmd": "start"},
                "others": [
                    {"prefix": "lg-falcon", "version": "1.0.0", "tarball": "", "md5": "", "cmd": ""}
                ]
            }
        ]
    }"#;

    #[test]
    fn reads_the_original_format_unchanged() {
        let l = parse(ORIGINAL).unwrap();
        let c = &l.config;
        assert!(c.debug);
        assert_eq!(c.tarball_dir, PathBuf::from("./tarball"));
        assert!(c.http.enabled);
        assert_eq!(c.http.listen, "0.0.0.0:2000");
        assert_eq!(c.agents.len(), 1);
        let d = c.agents[0].default.as_ref().unwrap();
        assert_eq!(d.name, "falcon-agent");
        assert_eq!(d.cmd, "start");
        assert_eq!(c.agents[0].others[0].prefix, "lg-falcon");
        assert_eq!(c.stale_host_secs, default_stale_host_secs());
        assert_eq!(c.max_body_bytes, default_max_body_bytes());
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
    }

    #[test]
    fn unknown_keys_are_warnings_and_keys_match_case_insensitively() {
        let text = r#"{"TarballDir": "/t", "http": {"enabled": true, "listen": ":2000", "tls": 1},
            "agents": [], "fork": {"x": 1}}"#;
        let l = parse(text).unwrap();
        assert_eq!(l.config.tarball_dir, PathBuf::from("/t"));
        let w: Vec<String> = l.warnings.iter().map(|p| p.to_string()).collect();
        assert!(
            w.contains(&"http.tls: unknown key, ignored".to_string()),
            "{w:?}"
        );
        assert!(
            w.contains(&"fork: unknown key, ignored".to_string()),
            "{w:?}"
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"{
            "debug": "yes",
            "tarballDir": "./t",
            "http": {"enabled": true, "listen": "nowhere"},
            "maxBodyBytes": 0,
            "agents": [
                {"default": {"name": "../evil", "version": "1.0", "tarball": "ftp://x", "cmd": "restart"}},
                {"default": {"name": "a", "version": "", "tarball": "http://x/", "cmd": "start",
                             "sha256": "abc"},
                 "others": [{"prefix": "", "version": "../2", "cmd": "go", "sha256": "00"}]},
                {"default": {"name": "a", "version": "2", "tarball": "http://x/", "cmd": "start"}},
                {"others": []},
                7
            ]
        }"#;
        let (errors, warnings) = parse(text).unwrap_err();
        let e: Vec<String> = errors.iter().map(|p| p.to_string()).collect();
        let want_fields = [
            "debug",
            "http.listen",
            "maxBodyBytes",
            "agents[0].default.name",
            "agents[0].default.tarball",
            "agents[0].default.cmd",
            "agents[1].default.version",
            "agents[1].default.sha256",
            "agents[1].others[0].prefix",
            "agents[1].others[0].version",
            "agents[1].others[0].cmd",
            "agents[1].others[0].sha256",
            "agents[2].default.name",
            "agents[4]",
        ];
        for f in want_fields {
            assert!(
                errors.iter().any(|p| p.field == f),
                "no error for {f}; got {e:#?}"
            );
        }
        assert!(
            e.iter()
                .any(|s| s.contains("already configured at agents[1]")),
            "{e:#?}"
        );
        assert!(
            e.iter()
                .any(|s| s.starts_with("agents[0].default.name: invalid agent name")),
            "{e:#?}"
        );
        assert!(
            warnings.iter().any(|p| p.field == "agents[3]"),
            "{warnings:?}"
        );
    }

    #[test]
    fn not_json_is_one_clear_error() {
        let (errors, _) = parse("{ nope").unwrap_err();
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].message.starts_with("not valid JSON"),
            "{errors:?}"
        );
    }

    #[test]
    fn our_keys_are_read_and_sha256_lowercased() {
        let sha = "AB".repeat(32);
        let text = format!(
            r#"{{"tarballDir": "t", "http": {{"enabled": false}}, "staleHostSecs": 5,
            "sweepIntervalSecs": 1, "maxBodyBytes": 100, "maxAgentsPerHeartbeat": 2,
            "requestTimeoutSecs": 3, "headerReadTimeoutSecs": 4, "shaRecheckSecs": 0,
            "shutdownGraceSecs": 6, "writeTimeoutSecs": 7, "maxStatusStreams": 8,
            "agents": [{{"default": {{"name": "a", "version": "1", "tarball": "http://x",
                "cmd": "start", "sha256": "{sha}"}}}}]}}"#
        );
        let c = parse(&text).unwrap().config;
        assert_eq!(
            (
                c.stale_host_secs,
                c.sweep_interval_secs,
                c.max_body_bytes,
                c.max_agents_per_heartbeat,
                c.request_timeout_secs,
                c.header_read_timeout_secs,
                c.sha_recheck_secs,
                c.shutdown_grace_secs
            ),
            (5, 1, 100, 2, 3, 4, 0, 6)
        );
        assert_eq!((c.write_timeout_secs, c.max_status_streams), (7, 8));
        assert_eq!(
            c.agents[0].default.as_ref().unwrap().sha256.as_deref(),
            Some(sha.to_lowercase().as_str())
        );
    }

    #[test]
    fn listen_forms() {
        assert_eq!(
            listen_addr("0.0.0.0:2000").unwrap(),
            "0.0.0.0:2000".parse().unwrap()
        );
        assert_eq!(
            listen_addr(":2000").unwrap(),
            "0.0.0.0:2000".parse().unwrap()
        );
        assert_eq!(
            listen_addr("localhost:9").unwrap(),
            "127.0.0.1:9".parse().unwrap()
        );
        assert_eq!(listen_addr("[::1]:9").unwrap(), "[::1]:9".parse().unwrap());
        assert!(listen_addr("2000").is_err());
        assert!(listen_addr("example:2000").is_err());
        assert!(listen_addr(":99999").is_err());
    }

    #[test]
    fn digest_keys_have_defaults_and_are_checked() {
        let l = parse(r#"{"agents": []}"#).unwrap();
        assert!(l.config.tarball_urls.is_empty());
        assert!(!l.config.require_sha256);
        assert_eq!(
            l.config.remote_hash_max_bytes,
            default_remote_hash_max_bytes()
        );
        assert_eq!(l.config.remote_recheck_secs, default_remote_recheck_secs());
        let l = parse(
            r#"{"tarballUrls": ["http://meta.example:2000/", "https://lb.example/files"],
                "requireSha256": true, "remoteHashMaxBytes": 0, "remoteRecheckSecs": 5}"#,
        )
        .unwrap();
        assert_eq!(l.config.tarball_urls.len(), 2);
        assert!(l.config.require_sha256);
        assert_eq!(l.config.remote_hash_max_bytes, 0);
        assert_eq!(l.config.remote_recheck_secs, 5);
        let (errors, _) = parse(
            r#"{"tarballUrls": ["ftp://x/", "http://x/?a=1", 3, "not a url"], "requireSha256": "yes",
                "remoteRecheckSecs": 0}"#,
        )
        .unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|p| p.field.as_str()).collect();
        for f in [
            "tarballUrls[0]",
            "tarballUrls[1]",
            "tarballUrls[2]",
            "tarballUrls[3]",
            "requireSha256",
            "remoteRecheckSecs",
        ] {
            assert!(fields.contains(&f), "no error for {f}: {errors:?}");
        }
    }

    #[test]
    fn api_tokens_are_read_and_every_problem_named() {
        let h = "ab".repeat(32);
        let ok = parse(&format!(
            r#"{{"apiTokens": [{{"name": "ci", "role": "admin", "sha256": "{}"}},
                              {{"name": "grafana", "role": "read", "sha256": "{}"}}]}}"#,
            h.to_uppercase(),
            "cd".repeat(32)
        ))
        .unwrap();
        let t = &ok.config.api_tokens;
        assert_eq!(t.len(), 2);
        assert_eq!((t[0].name.as_str(), t[0].role), ("ci", Role::Admin));
        assert_eq!(t[0].sha256, [0xab; 32]);
        assert_eq!(t[1].role, Role::Read);
        assert!(!format!("{t:?}").contains("ab"), "{t:?}");
        assert!(parse("{}").unwrap().config.api_tokens.is_empty());

        let secret = "s3cr3t-token-pasted-by-mistake";
        let (errors, _) = parse(&format!(
            r#"{{"apiTokens": [
                {{"name": "", "role": "admin", "sha256": "{h}"}},
                {{"name": "ci", "role": "root", "sha256": "{h}"}},
                {{"name": "ci", "role": "read", "sha256": "{secret}"}},
                {{"name": "has space", "sha256": "{h}", "token": "{secret}"}},
                "ci",
                {{"name": "other", "role": "read", "sha256": "{h}"}}
            ]}}"#
        ))
        .unwrap_err();
        let e: Vec<String> = errors.iter().map(|p| p.to_string()).collect();
        for want in [
            "apiTokens[0].name: is missing or empty",
            "apiTokens[1].role: \"root\" is not admin or read",
            "apiTokens[2].name: \"ci\" is also the name of another token",
            "apiTokens[2].sha256: is 30 characters, not 64 hexadecimal digits",
            "apiTokens[3].token: unknown key",
            "apiTokens[3].name: \"has space\" is not",
            "apiTokens[3].role: is missing",
            "apiTokens[4]: want an object",
            "apiTokens[5].sha256: is also the hash of another token",
        ] {
            assert!(
                e.iter().any(|s| s.starts_with(want)),
                "no {want:?} in {e:#?}"
            );
        }
        assert!(!e.iter().any(|s| s.contains(secret)), "{e:#?}");
        let (errors, _) = parse(r#"{"apiTokens": {"name": "x"}}"#).unwrap_err();
        assert_eq!(
            errors[0].to_string(),
            "apiTokens: want a list, got an object"
        );
    }
}
