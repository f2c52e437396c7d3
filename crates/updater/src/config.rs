//! The updater's `cfg.json`: the original keys read unchanged, our optional additions with
//! named defaults, and validation that reports every problem at once.
//!
//! Parsing happens in two steps, as ripgrep does with its flags: [`Config::parse`] turns the
//! text into typed values without touching the system, then [`Config::resolve`] fills in what
//! needs a syscall (the OS hostname, the executable's directory).
//!
//! The file is read field by field from a JSON object rather than through a derived
//! deserializer, so that a wrong type in one field does not hide the problems in the others:
//! `-T` lists all of them, each with its field name.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};

/// Largest config file read, in bytes. A config is a few hundred bytes; this only guards
/// against pointing `-c` at the wrong file.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Default heartbeat interval of the original, in seconds.
pub const fn default_interval() -> u64 {
    300
}
/// Default local listen address when `http.listen` is absent: loopback only. The original's
/// sample config says `0.0.0.0:2001`, which we honour when it is written out.
pub const fn default_listen() -> SocketAddr {
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 2001)
}
/// Seconds a `control start|stop|status` may run before it is killed.
pub const fn default_control_timeout_secs() -> u64 {
    30
}
/// Seconds a new version has to report `started` after `control start`.
pub const fn default_start_timeout_secs() -> u64 {
    30
}
/// Seconds the round waits for all `control status` answers before it reports anyway.
pub const fn default_status_timeout_secs() -> u64 {
    10
}
/// Version folders kept on disk per agent, the current one included.
pub const fn default_keep_versions() -> u64 {
    3
}
/// Largest tarball downloaded, in bytes (1 GiB).
pub const fn default_max_download_bytes() -> u64 {
    1 << 30
}
/// Largest unpacked size of one tarball, in bytes (4 GiB).
pub const fn default_max_unpacked_bytes() -> u64 {
    4 << 30
}
/// Spread applied to each interval, in percent of the interval (plus or minus).
pub const fn default_jitter_percent() -> u64 {
    10
}
/// Seconds one heartbeat request may take, connection included.
pub const fn default_heartbeat_timeout_secs() -> u64 {
    30
}
/// Largest heartbeat response read, in bytes (4 MiB).
pub const fn default_max_response_bytes() -> u64 {
    4 << 20
}
/// First wait after a failed download or checksum, in seconds; doubled on each failure.
pub const fn default_retry_base_secs() -> u64 {
    30
}
/// Longest wait between two download attempts of the same version, in seconds.
pub const fn default_retry_max_secs() -> u64 {
    3600
}
/// Seconds before a version that failed to start is tried again (unless the desired
/// version or URL changes first).
/// Good rounds a new version of ops-updater reports before its self-upgrade is committed.
pub const fn default_self_upgrade_commit_rounds() -> u64 {
    3
}
/// Seconds a new version of ops-updater gets to reach its commit.
pub const fn default_self_upgrade_watch_secs() -> u64 {
    300
}
pub const fn default_failed_start_retry_secs() -> u64 {
    3600
}

/// Which protocol the updater speaks (`protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// The original `POST /heartbeat` only.
    Legacy,
    /// BootAgent (`/agent/register`, `/agent/status`) only.
    Bootagent,
    /// BootAgent, falling back to the legacy heartbeat when the server answers 404/405 to
    /// the BootAgent endpoints (see [`crate::boot`]).
    #[default]
    Auto,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Legacy => "legacy",
            Protocol::Bootagent => "bootagent",
            Protocol::Auto => "auto",
        }
    }
}

/// Exit code for a bad config (EX_CONFIG from sysexits.h).
pub const EXIT_BAD_CONFIG: i32 = 78;

/// The updater's configuration, as read from `cfg.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `debug`: log at debug level, including each heartbeat request and response.
    pub debug: bool,
    /// `hostname`: the name sent to the server; empty means the OS hostname.
    pub hostname: String,
    /// `desiredAgent`: when non-empty, act on (and report) this agent only.
    pub desired_agent: String,
    /// `server`: `host:port` of ops-meta (plain HTTP, as the original), or a full
    /// `http://` / `https://` URL. See [`Config::heartbeat_url`].
    pub server: String,
    /// `interval`: seconds between heartbeats.
    pub interval: u64,
    /// `http.enabled`: serve the local endpoint.
    pub http_enabled: bool,
    /// `http.listen`: where the local endpoint listens.
    pub http_listen: SocketAddr,
    /// `workdir` (ours): where agents live; default the executable's directory, as the
    /// original. Relative paths are relative to the current directory.
    pub workdir: Option<PathBuf>,
    /// `controlTimeoutSecs` (ours).
    pub control_timeout_secs: u64,
    /// `startTimeoutSecs` (ours).
    pub start_timeout_secs: u64,
    /// `statusTimeoutSecs` (ours).
    pub status_timeout_secs: u64,
    /// `keepVersions` (ours), at least 1.
    pub keep_versions: u64,
    /// `maxDownloadBytes` (ours).
    pub max_download_bytes: u64,
    /// `maxUnpackedBytes` (ours).
    pub max_unpacked_bytes: u64,
    /// `jitterPercent` (ours), 0 to 50.
    pub jitter_percent: u64,
    /// `firstDelayMaxMs` (ours): cap on the random delay before the first heartbeat; absent
    /// means the interval, as the original.
    pub first_delay_max_ms: Option<u64>,
    /// `heartbeatTimeoutSecs` (ours).
    pub heartbeat_timeout_secs: u64,
    /// `maxResponseBytes` (ours).
    pub max_response_bytes: u64,
    /// `retryBaseSecs` (ours).
    pub retry_base_secs: u64,
    /// `retryMaxSecs` (ours).
    pub retry_max_secs: u64,
    /// `failedStartRetrySecs` (ours).
    pub failed_start_retry_secs: u64,
    /// `selfUpgradeCommitRounds` (ours).
    pub self_upgrade_commit_rounds: u32,
    /// `selfUpgradeWatchSecs` (ours).
    pub self_upgrade_watch_secs: u64,
    /// `tlsInsecure` (ours): accept any certificate from an `https://` server, as the fork
    /// with a self-signed certificate needs. Off by default.
    pub tls_insecure: bool,
    /// `tlsCaFile` (ours): a PEM file of one or more CA certificates, the only trust roots
    /// of every HTTPS connection (see [`crate::tls`]); absent means the system's roots. A
    /// relative path is relative to the working directory.
    pub tls_ca_file: Option<PathBuf>,
    /// The DER of `tlsCaFile`'s certificates, read and checked with the config.
    pub tls_ca: Vec<Vec<u8>>,
    /// `protocol` (ours): `legacy`, `bootagent` or `auto` (the default).
    pub protocol: Protocol,
    /// `metafile` (ours): the BootAgent metafile; default `<workdir>/.ops-updater/meta.json`.
    /// A relative path is relative to the workdir.
    pub metafile: Option<PathBuf>,
    /// `supervise` (ours): the restart policy for agents that exit by themselves; seed
    /// 003's by default (see [`crate::engine::supervise`]).
    pub supervise: crate::engine::supervise::Policy,
    /// `cgroupParent` (ours): the cgroup under which each agent gets its own, relative to
    /// the hierarchy's root.
    pub cgroup_parent: String,
    /// `trustedKeys` (ours): minisign public keys, each the text of its `.pub` file or its
    /// key line alone. With any, the `.minisig` beside each tarball is fetched and, when
    /// present, must verify with one of them (see [`crate::artifact::sign`]). Empty by
    /// default: no signature is fetched.
    pub trusted_keys: Vec<crate::artifact::TrustedKey>,
    /// `requireSignature` (ours): refuse a tarball that has no `.minisig`. Needs
    /// `trustedKeys`. Off by default.
    pub require_signature: bool,
    /// `enrollmentSecret` (ours): one of ops-meta's `enrollmentSecrets`, sent with every
    /// BootAgent registration; a server that holds any admits a new host only with one.
    /// Empty by default. Never logged.
    pub enrollment_secret: Secret,
}

/// A secret from the config: kept as given, shown by `Debug` only as whether it is set.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Secret {
        Secret(s)
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() {
            "\"\""
        } else {
            "<redacted>"
        })
    }
}

/// Default `cgroupParent`.
pub fn default_cgroup_parent() -> String {
    "ops-updater".to_string()
}

impl Default for Config {
    fn default() -> Self {
        Config {
            debug: false,
            hostname: String::new(),
            desired_agent: String::new(),
            server: String::new(),
            interval: default_interval(),
            http_enabled: false,
            http_listen: default_listen(),
            workdir: None,
            control_timeout_secs: default_control_timeout_secs(),
            start_timeout_secs: default_start_timeout_secs(),
            status_timeout_secs: default_status_timeout_secs(),
            keep_versions: default_keep_versions(),
            max_download_bytes: default_max_download_bytes(),
            max_unpacked_bytes: default_max_unpacked_bytes(),
            jitter_percent: default_jitter_percent(),
            first_delay_max_ms: None,
            heartbeat_timeout_secs: default_heartbeat_timeout_secs(),
            max_response_bytes: default_max_response_bytes(),
            retry_base_secs: default_retry_base_secs(),
            retry_max_secs: default_retry_max_secs(),
            failed_start_retry_secs: default_failed_start_retry_secs(),
            self_upgrade_commit_rounds: default_self_upgrade_commit_rounds() as u32,
            self_upgrade_watch_secs: default_self_upgrade_watch_secs(),
            tls_insecure: false,
            tls_ca_file: None,
            tls_ca: Vec::new(),
            protocol: Protocol::default(),
            metafile: None,
            supervise: crate::engine::supervise::Policy::default(),
            cgroup_parent: default_cgroup_parent(),
            trusted_keys: Vec::new(),
            require_signature: default_require_signature(),
            enrollment_secret: Secret::default(),
        }
    }
}

/// Default `requireSignature`: off, so that a setup without signatures keeps working.
pub const fn default_require_signature() -> bool {
    false
}

/// How bad a [`Problem`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The config cannot be used.
    Error,
    /// Noted and ignored (an unknown key: forks of the original added some).
    Warning,
}

/// One thing wrong with the config, naming its field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub severity: Severity,
    /// JSON path of the field, e.g. `http.listen`; empty for the file as a whole.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        if self.field.is_empty() {
            write!(f, "{sev}: {}", self.message)
        } else {
            write!(f, "{sev}: {}: {}", self.field, self.message)
        }
    }
}

/// A config that could not be used: every problem found, errors and warnings.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    /// The file, when read from one.
    pub path: Option<PathBuf>,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.path {
            Some(p) => write!(f, "bad config {}", p.display())?,
            None => write!(f, "bad config")?,
        }
        for p in self
            .problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
        {
            write!(f, "; {}: {}", p.field, p.message)?;
        }
        Ok(())
    }
}

/// A parsed config and the warnings found on the way.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub config: Config,
    pub warnings: Vec<Problem>,
}

/// Reads fields out of one JSON object, noting which keys were used and what was wrong.
struct Fields<'a, 'p> {
    prefix: &'static str,
    obj: &'a Map<String, Value>,
    used: BTreeSet<&'static str>,
    problems: &'p mut Vec<Problem>,
}

impl<'a, 'p> Fields<'a, 'p> {
    fn new(
        prefix: &'static str,
        obj: &'a Map<String, Value>,
        problems: &'p mut Vec<Problem>,
    ) -> Self {
        Fields {
            prefix,
            obj,
            used: BTreeSet::new(),
            problems,
        }
    }

    fn path(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn error(&mut self, key: &str, message: impl Into<String>) {
        let field = self.path(key);
        self.problems.push(Problem {
            severity: Severity::Error,
            field,
            message: message.into(),
        });
    }

    /// The value of `key`, treating `null` as absent (Go's decoder does the same).
    fn get(&mut self, key: &'static str) -> Option<&'a Value> {
        self.used.insert(key);
        match self.obj.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }

    fn bool(&mut self, key: &'static str, default: bool) -> bool {
        match self.get(key) {
            None => default,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                let m = format!("must be true or false, got {}", kind(v));
                self.error(key, m);
                default
            }
        }
    }

    fn string(&mut self, key: &'static str) -> String {
        match self.get(key) {
            None => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(v) => {
                let m = format!("must be a string, got {}", kind(v));
                self.error(key, m);
                String::new()
            }
        }
    }

    fn u64_opt(&mut self, key: &'static str) -> Option<u64> {
        match self.get(key) {
            None => None,
            Some(Value::Number(n)) => match n.as_u64() {
                Some(v) => Some(v),
                None => {
                    self.error(
                        key,
                        format!("must be a whole number of at least 0, got {n}"),
                    );
                    None
                }
            },
            Some(v) => {
                let m = format!("must be a number, got {}", kind(v));
                self.error(key, m);
                None
            }
        }
    }

    fn u64(&mut self, key: &'static str, default: u64) -> u64 {
        self.u64_opt(key).unwrap_or(default)
    }

    /// Refuses every key that no getter asked for (sections that are ours alone).
    fn error_unknown(self) {
        for k in self.obj.keys() {
            if !self.used.contains(k.as_str()) {
                self.problems.push(Problem {
                    severity: Severity::Error,
                    field: format!("{}{k}", self.prefix),
                    message: "unknown key".into(),
                });
            }
        }
    }

    /// Warns about every key that no getter asked for.
    fn warn_unknown(self) {
        for k in self.obj.keys() {
            if !self.used.contains(k.as_str()) {
                self.problems.push(Problem {
                    severity: Severity::Warning,
                    field: format!("{}{k}", self.prefix),
                    message: "unknown key, ignored".into(),
                });
            }
        }
    }
}

/// `trustedKeys`: a list of minisign public keys, each problem naming its entry's index.
fn trusted_keys_of(
    v: Option<&Value>,
    problems: &mut Vec<Problem>,
) -> Vec<crate::artifact::TrustedKey> {
    let mut err = |field: String, message: String| {
        problems.push(Problem {
            severity: Severity::Error,
            field,
            message,
        })
    };
    let items = match v {
        None => return Vec::new(),
        Some(Value::Array(items)) => items,
        Some(v) => {
            err(
                "trustedKeys".into(),
                format!("must be a list of minisign public keys, got {}", kind(v)),
            );
            return Vec::new();
        }
    };
    let mut keys = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let field = format!("trustedKeys[{i}]");
        match item {
            Value::String(text) => match crate::artifact::TrustedKey::parse(text) {
                Ok(k) => keys.push(k),
                Err(m) => err(field, m),
            },
            v => err(field, format!("must be a string, got {}", kind(v))),
        }
    }
    keys
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl Config {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Parsed, ConfigError> {
        let fail = |message: String| ConfigError {
            path: Some(path.to_path_buf()),
            problems: vec![Problem {
                severity: Severity::Error,
                field: String::new(),
                message,
            }],
        };
        let meta = std::fs::metadata(path).map_err(|e| fail(format!("cannot read: {e}")))?;
        if meta.len() > MAX_CONFIG_BYTES {
            return Err(fail(format!(
                "file is {} bytes, more than the {MAX_CONFIG_BYTES} allowed",
                meta.len()
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read: {e}")))?;
        Config::parse(&text).map_err(|mut e| {
            e.path = Some(path.to_path_buf());
            e
        })
    }

    /// Parses the text of a config file and validates every field. No syscalls.
    pub fn parse(text: &str) -> Result<Parsed, ConfigError> {
        let mut problems = Vec::new();
        let root: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                problems.push(Problem {
                    severity: Severity::Error,
                    field: String::new(),
                    message: format!("not valid JSON: {e}"),
                });
                return Err(ConfigError {
                    path: None,
                    problems,
                });
            }
        };
        let Value::Object(obj) = root else {
            problems.push(Problem {
                severity: Severity::Error,
                field: String::new(),
                message: format!("must be a JSON object, got {}", kind(&root)),
            });
            return Err(ConfigError {
                path: None,
                problems,
            });
        };

        let mut c = Config::default();
        let mut f = Fields::new("", &obj, &mut problems);
        c.debug = f.bool("debug", false);
        c.hostname = f.string("hostname");
        c.desired_agent = f.string("desiredAgent");
        c.server = f.string("server");
        c.interval = f.u64("interval", default_interval());
        let workdir = f.string("workdir");
        c.workdir = (!workdir.is_empty()).then(|| PathBuf::from(workdir));
        c.control_timeout_secs = f.u64("controlTimeoutSecs", default_control_timeout_secs());
        c.start_timeout_secs = f.u64("startTimeoutSecs", default_start_timeout_secs());
        c.status_timeout_secs = f.u64("statusTimeoutSecs", default_status_timeout_secs());
        c.keep_versions = f.u64("keepVersions", default_keep_versions());
        c.max_download_bytes = f.u64("maxDownloadBytes", default_max_download_bytes());
        c.max_unpacked_bytes = f.u64("maxUnpackedBytes", default_max_unpacked_bytes());
        c.jitter_percent = f.u64("jitterPercent", default_jitter_percent());
        c.first_delay_max_ms = f.u64_opt("firstDelayMaxMs");
        c.heartbeat_timeout_secs = f.u64("heartbeatTimeoutSecs", default_heartbeat_timeout_secs());
        c.max_response_bytes = f.u64("maxResponseBytes", default_max_response_bytes());
        c.retry_base_secs = f.u64("retryBaseSecs", default_retry_base_secs());
        c.retry_max_secs = f.u64("retryMaxSecs", default_retry_max_secs());
        let rounds = f.u64(
            "selfUpgradeCommitRounds",
            default_self_upgrade_commit_rounds(),
        );
        c.self_upgrade_commit_rounds = rounds.min(1000) as u32;
        c.self_upgrade_watch_secs =
            f.u64("selfUpgradeWatchSecs", default_self_upgrade_watch_secs());
        c.failed_start_retry_secs =
            f.u64("failedStartRetrySecs", default_failed_start_retry_secs());
        c.tls_insecure = f.bool("tlsInsecure", false);
        let ca_file = f.string("tlsCaFile");
        if !ca_file.is_empty() {
            let path = PathBuf::from(&ca_file);
            match crate::tls::read_ca_file(&path) {
                Ok(certs) => c.tls_ca = certs,
                Err(m) => f.error("tlsCaFile", m),
            }
            c.tls_ca_file = Some(path);
        }
        match f.string("protocol").as_str() {
            "" | "auto" => c.protocol = Protocol::Auto,
            "legacy" => c.protocol = Protocol::Legacy,
            "bootagent" => c.protocol = Protocol::Bootagent,
            other => f.error(
                "protocol",
                format!("must be legacy, bootagent or auto, got {other:?}"),
            ),
        }
        let metafile = f.string("metafile");
        c.metafile = (!metafile.is_empty()).then(|| PathBuf::from(metafile));
        let cgroup_parent = f.string("cgroupParent");
        if !cgroup_parent.is_empty() {
            c.cgroup_parent = cgroup_parent;
        }
        c.require_signature = f.bool("requireSignature", default_require_signature());
        c.enrollment_secret = Secret::new(f.string("enrollmentSecret"));
        let trusted_keys = f.get("trustedKeys");
        let http = f.get("http");
        let supervise = f.get("supervise");
        f.warn_unknown();

        c.trusted_keys = trusted_keys_of(trusted_keys, &mut problems);

        match supervise {
            None => {}
            Some(Value::Object(o)) => {
                use crate::engine::supervise as sv;
                let mut f = Fields::new("supervise.", o, &mut problems);
                let check = f.u64("checkSecs", sv::default_check_secs());
                if check == 0 {
                    f.error("checkSecs", "must be at least 1");
                }
                c.supervise.check = Duration::from_secs(check.max(1));
                c.supervise.restart_delay = Duration::from_secs(
                    f.u64("restartDelaySecs", sv::default_restart_delay_secs()),
                );
                c.supervise.fail_window =
                    Duration::from_secs(f.u64("failWindowSecs", sv::default_fail_window_secs()));
                let max = f.u64("maxFailures", sv::default_max_failures() as u64);
                c.supervise.max_failures = u32::try_from(max).unwrap_or_else(|_| {
                    f.error(
                        "maxFailures",
                        format!("must be at most {}, got {max}", u32::MAX),
                    );
                    sv::default_max_failures()
                });
                // Ours alone: an unknown key is a mistake, not a fork's extension.
                f.error_unknown();
            }
            Some(v) => problems.push(Problem {
                severity: Severity::Error,
                field: "supervise".into(),
                message: format!("must be an object, got {}", kind(v)),
            }),
        }

        match http {
            None => {}
            Some(Value::Object(h)) => {
                let mut f = Fields::new("http.", h, &mut problems);
                c.http_enabled = f.bool("enabled", false);
                let listen = f.string("listen");
                if !listen.is_empty() {
                    match listen.parse::<SocketAddr>() {
                        Ok(a) => c.http_listen = a,
                        Err(_) => f.error(
                            "listen",
                            format!("must be IP:PORT such as 127.0.0.1:2001, got {listen:?}"),
                        ),
                    }
                }
                f.warn_unknown();
            }
            Some(v) => problems.push(Problem {
                severity: Severity::Error,
                field: "http".into(),
                message: format!("must be an object, got {}", kind(v)),
            }),
        }

        if c.tls_insecure && c.tls_ca_file.is_some() {
            problems.push(Problem {
                severity: Severity::Warning,
                field: "tlsInsecure".into(),
                message: "is true: tlsCaFile is ignored and no certificate is checked".into(),
            });
        }
        c.validate(&mut problems);
        if problems.iter().any(|p| p.severity == Severity::Error) {
            return Err(ConfigError {
                path: None,
                problems,
            });
        }
        Ok(Parsed {
            config: c,
            warnings: problems,
        })
    }

    /// Checks values that parsed but make no sense, adding one problem per field.
    fn validate(&self, problems: &mut Vec<Problem>) {
        let mut err = |field: &str, message: String| {
            problems.push(Problem {
                severity: Severity::Error,
                field: field.into(),
                message,
            })
        };
        if self.server.is_empty() {
            // BootAgent mode can take its servers from -S, the metafile or the binary.
            if self.protocol != Protocol::Bootagent {
                err("server", "is required (host:port of ops-meta)".into());
            }
        } else if let Err(m) = heartbeat_url(&self.server) {
            err("server", m);
        }
        if self.interval == 0 {
            err("interval", "must be at least 1 second".into());
        }
        if !self.hostname.is_empty() {
            if let Err(e) = proto::validate_hostname(&self.hostname) {
                err("hostname", e.to_string());
            }
        }
        if !self.desired_agent.is_empty() {
            if let Err(e) = proto::validate_agent_name(&self.desired_agent) {
                err("desiredAgent", e.to_string());
            }
        }
        for (field, v) in [
            ("controlTimeoutSecs", self.control_timeout_secs),
            ("startTimeoutSecs", self.start_timeout_secs),
            ("statusTimeoutSecs", self.status_timeout_secs),
            ("keepVersions", self.keep_versions),
            ("maxDownloadBytes", self.max_download_bytes),
            ("maxUnpackedBytes", self.max_unpacked_bytes),
            ("heartbeatTimeoutSecs", self.heartbeat_timeout_secs),
            ("maxResponseBytes", self.max_response_bytes),
            ("retryBaseSecs", self.retry_base_secs),
            ("retryMaxSecs", self.retry_max_secs),
            ("failedStartRetrySecs", self.failed_start_retry_secs),
            (
                "selfUpgradeCommitRounds",
                u64::from(self.self_upgrade_commit_rounds),
            ),
            ("selfUpgradeWatchSecs", self.self_upgrade_watch_secs),
        ] {
            if v == 0 {
                err(field, "must be at least 1".into());
            }
        }
        // A day is far beyond any sane script or request; larger values are typos.
        for (field, v) in [
            ("controlTimeoutSecs", self.control_timeout_secs),
            ("startTimeoutSecs", self.start_timeout_secs),
            ("statusTimeoutSecs", self.status_timeout_secs),
            ("heartbeatTimeoutSecs", self.heartbeat_timeout_secs),
        ] {
            if v > 86_400 {
                err(field, format!("must be at most 86400 seconds, got {v}"));
            }
        }
        if self.interval > 86_400 * 7 {
            err(
                "interval",
                format!("must be at most 604800 seconds, got {}", self.interval),
            );
        }
        if self.jitter_percent > 50 {
            err(
                "jitterPercent",
                format!("must be between 0 and 50, got {}", self.jitter_percent),
            );
        }
        if self.require_signature && self.trusted_keys.is_empty() {
            err(
                "requireSignature",
                "is true but trustedKeys is empty: no signature could verify".into(),
            );
        }
        if !self.enrollment_secret.is_empty() {
            if let Err(e) =
                proto::bootagent::check_enrollment_secret(self.enrollment_secret.expose())
            {
                err("enrollmentSecret", e);
            }
            if self.protocol == Protocol::Legacy {
                err(
                    "enrollmentSecret",
                    "is only sent by BootAgent registrations (protocol bootagent or auto)".into(),
                );
            }
        }
        if self.retry_base_secs > self.retry_max_secs && self.retry_max_secs > 0 {
            err(
                "retryBaseSecs",
                format!("must not exceed retryMaxSecs ({})", self.retry_max_secs),
            );
        }
    }

    /// Full URL of the heartbeat endpoint.
    pub fn heartbeat_url(&self) -> String {
        heartbeat_url(&self.server).unwrap_or_default()
    }

    /// Fills in what needs the system: the OS hostname when `hostname` is empty, and the
    /// workdir (the executable's directory when absent).
    pub fn resolve(&self) -> Result<Resolved, ConfigError> {
        let mut problems = Vec::new();
        let hostname = if self.hostname.is_empty() {
            match os_hostname() {
                Some(h) => match proto::validate_hostname(&h) {
                    Ok(()) => h,
                    Err(e) => {
                        problems.push(Problem {
                            severity: Severity::Error,
                            field: "hostname".into(),
                            message: format!("is empty and the OS hostname is unusable: {e}"),
                        });
                        String::new()
                    }
                },
                None => {
                    problems.push(Problem {
                        severity: Severity::Error,
                        field: "hostname".into(),
                        message: "is empty and the OS hostname cannot be read".into(),
                    });
                    String::new()
                }
            }
        } else {
            self.hostname.clone()
        };
        let workdir = match &self.workdir {
            Some(w) => std::path::absolute(w).unwrap_or_else(|_| w.clone()),
            None => match std::env::current_exe() {
                Ok(exe) => exe.parent().map(Path::to_path_buf).unwrap_or_default(),
                Err(e) => {
                    problems.push(Problem {
                        severity: Severity::Error,
                        field: "workdir".into(),
                        message: format!(
                            "is absent and the executable's directory is unknown: {e}"
                        ),
                    });
                    PathBuf::new()
                }
            },
        };
        if !problems.is_empty() {
            return Err(ConfigError {
                path: None,
                problems,
            });
        }
        let mut own_files = vec![
            workdir.join(crate::workdir::LOCK_FILE),
            workdir.join(crate::workdir::EVENTS_FILE),
            workdir.join(crate::boot::STATE_DIR),
        ];
        if let Some(m) = &self.metafile {
            let m = workdir.join(m);
            own_files.extend(m.parent().map(Path::to_path_buf));
            own_files.push(m);
        }
        own_files.extend(std::env::current_exe().ok());
        Ok(Resolved {
            config: self.clone(),
            hostname,
            workdir,
            heartbeat_url: self.heartbeat_url(),
            own_files,
        })
    }

    pub fn interval(&self) -> Duration {
        Duration::from_secs(self.interval)
    }
}

/// A config with everything resolved; what the daemon runs on.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub config: Config,
    /// The hostname sent to the server (never empty).
    pub hostname: String,
    /// Absolute workdir.
    pub workdir: PathBuf,
    /// Full heartbeat URL.
    pub heartbeat_url: String,
    /// The updater's own files and folders, never removed or renamed by any action: the
    /// executable, the lock file, the event journal and the metafile with its folder from
    /// [`Config::resolve`];
    /// `main` adds the config file and the log file.
    pub own_files: Vec<PathBuf>,
}

/// The heartbeat URL for a `server` value: `host:port` becomes `http://host:port/heartbeat`
/// as in the original; a full `http://` or `https://` URL is used as is, with
/// `/heartbeat` appended when it has no path.
pub fn heartbeat_url(server: &str) -> Result<String, String> {
    let server = server.trim();
    let (scheme, rest) = if let Some(r) = server.strip_prefix("http://") {
        ("http", r)
    } else if let Some(r) = server.strip_prefix("https://") {
        ("https", r)
    } else if server.contains("://") {
        return Err(format!(
            "must be host:port or an http:// or https:// URL, got {server:?}"
        ));
    } else {
        ("http", server)
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.is_empty()
        || authority
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b == b'@' || b.is_ascii_control())
    {
        return Err(format!("has no usable host in {server:?}"));
    }
    if scheme == "http" && !server.starts_with("http://") {
        // The original form: host:port, port required.
        let port = authority.rsplit_once(':').map(|(_, p)| p);
        match port.map(str::parse::<u16>) {
            Some(Ok(p)) if p > 0 => {}
            _ => return Err(format!("must be host:port (port 1-65535), got {server:?}")),
        }
        if !path.is_empty() {
            return Err(format!(
                "must be host:port, or a full URL starting with http:// or https://, got {server:?}"
            ));
        }
    }
    let path = if path.is_empty() || path == "/" {
        "/heartbeat"
    } else {
        path
    };
    Ok(format!("{scheme}://{authority}{path}"))
}

/// The kernel's hostname, without a syscall wrapper crate: Linux exposes it in procfs.
fn os_hostname() -> Option<String> {
    for p in ["/proc/sys/kernel/hostname", "/etc/hostname"] {
        if let Ok(s) = std::fs::read_to_string(p) {
            let s = s.trim();
            if !s.is_empty() {
                return Some(s.to_string());
            }
        }
    }
    std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGINAL: &str = r#"{
        "debug": true,
        "hostname": "",
        "desiredAgent": "",
        "server": "127.0.0.1:2000",
        "interval": 300,
        "http": {
            "enabled": true,
            "listen": "0.0.0.0:2001"
        }
    }"#;

    #[test]
    fn original_cfg_json_loads_unchanged() {
        let p = Config::parse(ORIGINAL).unwrap();
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        let c = p.config;
        assert!(c.debug);
        assert_eq!(c.server, "127.0.0.1:2000");
        assert_eq!(c.interval, 300);
        assert!(c.http_enabled);
        assert_eq!(c.http_listen, "0.0.0.0:2001".parse().unwrap());
        assert_eq!(c.heartbeat_url(), "http://127.0.0.1:2000/heartbeat");
        assert_eq!(c.keep_versions, default_keep_versions());
        assert_eq!(c.control_timeout_secs, 30);
        assert_eq!(c.workdir, None);
    }

    #[test]
    fn absent_http_means_disabled_on_loopback() {
        let c = Config::parse(r#"{"server":"h:1"}"#).unwrap().config;
        assert!(!c.http_enabled);
        assert_eq!(c.http_listen, default_listen());
        assert_eq!(c.interval, 300);
    }

    #[test]
    fn unknown_keys_are_warnings_with_their_path() {
        let p = Config::parse(
            r#"{"server":"h:1","sslVerify":false,"http":{"enabled":false,"backlog":9}}"#,
        )
        .unwrap();
        let fields: Vec<_> = p.warnings.iter().map(|w| w.field.as_str()).collect();
        assert_eq!(fields, ["sslVerify", "http.backlog"]);
        assert!(p.warnings.iter().all(|w| w.severity == Severity::Warning));
    }

    #[test]
    fn bad_values_are_all_listed_at_once() {
        let e = Config::parse(
            r#"{"debug":"yes","server":"","interval":0,"hostname":"a b",
                "desiredAgent":"../x","keepVersions":-1,"jitterPercent":90,
                "http":{"enabled":1,"listen":"everywhere"},"extra":1}"#,
        )
        .unwrap_err();
        let errors: Vec<_> = e
            .problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
            .map(|p| p.field.as_str())
            .collect();
        for f in [
            "debug",
            "server",
            "interval",
            "hostname",
            "desiredAgent",
            "keepVersions",
            "jitterPercent",
            "http.enabled",
            "http.listen",
        ] {
            assert!(errors.contains(&f), "missing {f} in {errors:?}");
        }
        assert!(e
            .problems
            .iter()
            .any(|p| p.severity == Severity::Warning && p.field == "extra"));
        let shown = e.to_string();
        assert!(
            shown.contains("interval: must be at least 1 second"),
            "{shown}"
        );
    }

    #[test]
    fn enrollment_secret_is_checked_and_never_shown() {
        let c = Config::parse(r#"{"server":"h:1","enrollmentSecret":"0123456789abcdef-xyz"}"#)
            .unwrap()
            .config;
        assert_eq!(c.enrollment_secret.expose(), "0123456789abcdef-xyz");
        assert!(!format!("{c:?}").contains("0123456789abcdef"));
        for (text, want) in [
            (
                r#"{"server":"h:1","enrollmentSecret":"short"}"#,
                "shorter than the 16",
            ),
            (
                r#"{"server":"h:1","protocol":"legacy","enrollmentSecret":"0123456789abcdef"}"#,
                "only sent by BootAgent",
            ),
        ] {
            let e = Config::parse(text).unwrap_err().to_string();
            assert!(e.contains("enrollmentSecret") && e.contains(want), "{e}");
            assert!(!e.contains("0123456789abcdef"), "{e}");
        }
    }

    const KEY_A: &str = "RWRVR0B9j4MniJ4jY+REpdsANRryXRuxSwNgD9KWLeBJYwfMcWlS3JaZ";
    const KEY_B: &str = "RWQf6LRCGA9i53mlYecO4IzT51TGPpvWucNSCh1CBM0QTaLn73Y7GFO3";

    #[test]
    fn trusted_keys_take_pub_files_and_key_lines() {
        let cfg = json_cfg(serde_json::json!({
            "server": "h:1",
            "requireSignature": true,
            "trustedKeys": [
                format!("untrusted comment: minisign public key 8827838F7D404755\n{KEY_A}\n"),
                KEY_B,
            ],
        }));
        let p = Config::parse(&cfg).unwrap();
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        let ids: Vec<String> = p
            .config
            .trusted_keys
            .iter()
            .map(|k| k.id().to_string())
            .collect();
        assert_eq!(ids, ["8827838F7D404755", "E7620F1842B4E81F"]);
        assert!(p.config.require_signature);
        let c = Config::parse(r#"{"server":"h:1"}"#).unwrap().config;
        assert!(c.trusted_keys.is_empty() && !c.require_signature);
    }

    fn json_cfg(v: serde_json::Value) -> String {
        v.to_string()
    }

    fn errors_of(v: serde_json::Value) -> Vec<String> {
        Config::parse(&json_cfg(v))
            .unwrap_err()
            .problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
            .map(|p| format!("{}: {}", p.field, p.message))
            .collect()
    }

    #[test]
    fn a_bad_trusted_key_is_named_by_its_index() {
        let errors = errors_of(serde_json::json!({
            "server": "h:1",
            "trustedKeys": [KEY_A, "RWRVR0B9j4Mni", 7, ""],
        }));
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(
            errors[0].starts_with("trustedKeys[1]: is not a minisign public key"),
            "{errors:?}"
        );
        assert_eq!(errors[1], "trustedKeys[2]: must be a string, got a number");
        assert!(
            errors[2].starts_with("trustedKeys[3]: is empty"),
            "{errors:?}"
        );
        let errors = errors_of(serde_json::json!({"server": "h:1", "trustedKeys": KEY_A}));
        assert_eq!(
            errors,
            ["trustedKeys: must be a list of minisign public keys, got a string"]
        );
    }

    #[test]
    fn require_signature_needs_trusted_keys() {
        let errors = errors_of(serde_json::json!({"server": "h:1", "requireSignature": true}));
        assert_eq!(
            errors,
            ["requireSignature: is true but trustedKeys is empty: no signature could verify"]
        );
        let errors = errors_of(serde_json::json!({"server": "h:1", "requireSignature": "yes"}));
        assert_eq!(
            errors,
            ["requireSignature: must be true or false, got a string"]
        );
    }

    #[test]
    fn not_json_or_not_an_object() {
        let e = Config::parse("{").unwrap_err();
        assert!(e.problems[0].message.starts_with("not valid JSON"), "{e}");
        let e = Config::parse("[1]").unwrap_err();
        assert!(e.problems[0].message.contains("an array"), "{e}");
    }

    #[test]
    fn server_forms() {
        let check = |input: &str, want: Result<&str, ()>| {
            let got = heartbeat_url(input);
            match want {
                Ok(w) => assert_eq!(got.as_deref(), Ok(w), "input {input:?}"),
                Err(()) => assert!(got.is_err(), "input {input:?}: got {got:?}"),
            }
        };
        check("127.0.0.1:2000", Ok("http://127.0.0.1:2000/heartbeat"));
        check("meta.local:80", Ok("http://meta.local:80/heartbeat"));
        check("http://m:2000", Ok("http://m:2000/heartbeat"));
        check("https://m:2000/", Ok("https://m:2000/heartbeat"));
        check("https://m/api/hb", Ok("https://m/api/hb"));
        check("m", Err(()));
        check("m:0", Err(()));
        check("m:x", Err(()));
        check("m:1/path", Err(()));
        check("ftp://m:1", Err(()));
        check("http://", Err(()));
        check("http://u@m:1", Err(()));
    }

    #[test]
    fn null_fields_take_defaults() {
        let c = Config::parse(r#"{"server":"h:1","interval":null,"http":null,"hostname":null}"#)
            .unwrap()
            .config;
        assert_eq!(c.interval, 300);
        assert!(!c.http_enabled);
    }

    #[test]
    fn our_keys_parse() {
        let c = Config::parse(
            r#"{"server":"h:1","workdir":"/srv/agents","controlTimeoutSecs":5,"startTimeoutSecs":7,
                "keepVersions":2,"firstDelayMaxMs":10,"jitterPercent":0,"tlsInsecure":true}"#,
        )
        .unwrap()
        .config;
        assert_eq!(c.workdir.as_deref(), Some(Path::new("/srv/agents")));
        assert_eq!(c.control_timeout_secs, 5);
        assert_eq!(c.start_timeout_secs, 7);
        assert_eq!(c.keep_versions, 2);
        assert_eq!(c.first_delay_max_ms, Some(10));
        assert_eq!(c.jitter_percent, 0);
        assert!(c.tls_insecure);
    }

    #[test]
    fn resolve_fills_hostname_and_workdir() {
        let c = Config::parse(r#"{"server":"h:1"}"#).unwrap().config;
        let r = c.resolve().unwrap();
        assert!(!r.hostname.is_empty());
        assert!(r.workdir.is_absolute());
        let c = Config::parse(r#"{"server":"h:1","hostname":"web-1","workdir":"/x"}"#)
            .unwrap()
            .config;
        let r = c.resolve().unwrap();
        assert_eq!(r.hostname, "web-1");
        assert_eq!(r.workdir, Path::new("/x"));
    }
}
