//! The BootAgent protocol: `POST /agent/register` and `POST /agent/status`, with the field
//! names of seed 003 (including its spelling `stoped`).
//!
//! The host always starts the conversation; jobs travel back in status answers and their
//! results in the next status report.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::legacy::null_default;

/// `status` value of a successful answer.
pub const STATUS_OK: i32 = 0;
/// `status` of a status answer when the server does not know the serial (or the host sent
/// none): the host must register again and report with the serial it gets back.
pub const STATUS_UNREGISTERED: i32 = 1;
/// `status` of a status answer when the serial is registered to another hostname (a cloned
/// disk image, or a renamed host): the host must register again.
pub const STATUS_SERIAL_CONFLICT: i32 = 2;

/// Longest serial (`agentsn`) accepted, in bytes. Serials are UUIDs (36 bytes).
pub const MAX_AGENTSN_LEN: usize = 64;

/// A serial: 1–64 bytes of ASCII letters, digits and `-` (a UUID fits).
pub fn validate_agentsn(s: &str) -> Result<(), crate::NameError> {
    let reason = if s.is_empty() {
        Some("is empty")
    } else if s.len() > MAX_AGENTSN_LEN {
        Some("is longer than 64 bytes")
    } else if !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        Some("may only hold ASCII letters, digits and '-'")
    } else {
        None
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(crate::NameError {
            field: "agentsn",
            value: s.to_string(),
            reason,
        }),
    }
}

/// `POST /agent/register` body.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterRequest {
    #[serde(default, deserialize_with = "null_default")]
    pub hostname: String,
    /// The serial the host holds (or proposes, on first start).
    #[serde(default, deserialize_with = "null_default")]
    pub agentsn: String,
    /// Extension: one of the server's enrollment secrets (the updater's `enrollmentSecret`),
    /// which a host must present to register when the server holds any and the host has no
    /// credential yet. Absent when the host has none. Never logged (see the `Debug` impl).
    #[serde(
        rename = "enrollmentSecret",
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub enrollment_secret: String,
}

impl std::fmt::Debug for RegisterRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterRequest")
            .field("hostname", &self.hostname)
            .field("agentsn", &self.agentsn)
            .field("enrollment_secret", &redacted(&self.enrollment_secret))
            .finish()
    }
}

/// What `Debug` shows of a secret: whether there is one, never its text.
fn redacted(s: &str) -> &'static str {
    if s.is_empty() {
        ""
    } else {
        "<redacted>"
    }
}

/// The HTTP authentication scheme a host's credential travels in:
/// `Authorization: Bearer <credential>` on every BootAgent request after registration.
pub const AUTH_SCHEME: &str = "Bearer";

/// Bytes of randomness in a host credential; it travels as twice as many hex digits.
pub const CREDENTIAL_BYTES: usize = 32;

/// Shortest and longest enrollment secret accepted, in bytes.
pub const MIN_SECRET_LEN: usize = 16;
pub const MAX_SECRET_LEN: usize = 256;

/// A host credential as the server issues it: [`CREDENTIAL_BYTES`] random bytes in
/// lowercase hex. The reason never quotes the value.
pub fn check_credential(s: &str) -> Result<(), &'static str> {
    if s.len() == CREDENTIAL_BYTES * 2 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        Ok(())
    } else {
        Err("is not 64 lowercase hexadecimal digits")
    }
}

/// An enrollment secret (ops-meta's `enrollmentSecrets`, ops-updater's `enrollmentSecret`):
/// [`MIN_SECRET_LEN`] to [`MAX_SECRET_LEN`] bytes of printable ASCII without spaces, so that
/// it survives a JSON file, a shell and a header alike. The reason never quotes the value.
pub fn check_enrollment_secret(s: &str) -> Result<(), String> {
    if s.len() < MIN_SECRET_LEN {
        return Err(format!(
            "is {} bytes, shorter than the {MIN_SECRET_LEN} required (use e.g. 32 random bytes in hex)",
            s.len()
        ));
    }
    if s.len() > MAX_SECRET_LEN {
        return Err(format!("is longer than {MAX_SECRET_LEN} bytes"));
    }
    if !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("may only hold printable ASCII without spaces".into());
    }
    Ok(())
}

/// The credential of an `Authorization` header value (`Bearer <credential>`, the scheme
/// in any case); `None` when it is another scheme or has no credential.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, rest) = header.trim().split_once(' ')?;
    let token = rest.trim();
    (scheme.eq_ignore_ascii_case(AUTH_SCHEME) && !token.is_empty()).then_some(token)
}

/// `POST /agent/register` answer.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterResponse {
    #[serde(default, deserialize_with = "null_default")]
    pub status: i32,
    /// The serial the server accepts; the host adopts it when it differs.
    #[serde(default, deserialize_with = "null_default")]
    pub agentsn: String,
    /// Comma-separated `key=value` tags, e.g. `svc=ecs,cmpt=DB`.
    #[serde(default, deserialize_with = "null_default")]
    pub tags: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Extension: the host's own credential ([`check_credential`]), issued when the host
    /// had none (first registration, a host an operator re-admitted, a host registered
    /// before credentials existed). The server keeps only its SHA-256, so it is sent once:
    /// absent when the host registered with the credential it holds. The host keeps it
    /// and sends it as `Authorization: Bearer <credential>` from then on.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub credential: String,
}

impl std::fmt::Debug for RegisterResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterResponse")
            .field("status", &self.status)
            .field("agentsn", &self.agentsn)
            .field("tags", &self.tags)
            .field("message", &self.message)
            .field("credential", &redacted(&self.credential))
            .finish()
    }
}

/// States of an agent as BootAgent reports them.
pub const STATE_RUNNING: &str = "running";
pub const STATE_STOPED: &str = "stoped";
pub const STATE_FATAL: &str = "fatal";
pub const STATE_KILLED: &str = "killed";

/// One agent in a status report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    #[serde(default, deserialize_with = "null_default")]
    pub name: String,
    #[serde(default, deserialize_with = "null_default")]
    pub version: String,
    /// One of the `STATE_*` values, or an error text.
    #[serde(default, deserialize_with = "null_default")]
    pub status: String,
    /// Seconds the agent has been running.
    #[serde(default, deserialize_with = "null_default")]
    pub uptime: u64,
}

/// The outcome of a job, reported once after it ran.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobResult {
    #[serde(default, deserialize_with = "null_default")]
    pub id: String,
    /// 0 for success; one of the `ERRCODE_*` values.
    #[serde(default, deserialize_with = "null_default")]
    pub errcode: i32,
    #[serde(default, deserialize_with = "null_default")]
    pub message: String,
}

/// `errcode` of a job that succeeded.
pub const ERRCODE_OK: i32 = 0;
/// The job was refused as malformed (bad name, version, checksum, URL, action).
pub const ERRCODE_INVALID: i32 = 1;
/// The action failed; nothing changed on the running side (download, checksum, unpack,
/// a control script failed).
pub const ERRCODE_FAILED: i32 = 2;
/// The new version did not start and the previous one was put back.
pub const ERRCODE_ROLLED_BACK: i32 = 3;

/// `POST /agent/status` body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRequest {
    #[serde(default, deserialize_with = "null_default")]
    pub hostname: String,
    #[serde(default, deserialize_with = "null_default")]
    pub agentsn: String,
    /// The host agent's own version string.
    #[serde(default, deserialize_with = "null_default")]
    pub version: String,
    #[serde(default, deserialize_with = "null_default")]
    pub uptime: u64,
    #[serde(default, deserialize_with = "null_default")]
    pub timestamp: i64,
    /// Report interval in seconds.
    #[serde(default, deserialize_with = "null_default")]
    pub step: u64,
    #[serde(default, deserialize_with = "null_default")]
    pub agents: Vec<AgentStatus>,
    #[serde(default, deserialize_with = "null_default")]
    pub jobs: Vec<JobResult>,
    /// Extension: the host restarts its agents itself by a restart policy (ours does), so
    /// the server must not derive `restart` jobs from `stoped`, `fatal` or `killed`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub supervised: bool,
    /// Extension: agent events not yet taken by a server, oldest first, at most
    /// [`crate::events::MAX_EVENTS_PER_REPORT`]. Absent when there are none.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub events: Vec<crate::events::Event>,
}

/// `POST /agent/status` answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusResponse {
    #[serde(default, deserialize_with = "null_default")]
    pub status: i32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, deserialize_with = "null_default")]
    pub jobs: Vec<Job>,
    /// Extension: the agents the server wants changed on this host but cannot hand a job
    /// for yet, with why (e.g. no checksum known yet). Hosts log it; others ignore it.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub waiting: Vec<Waiting>,
}

/// Longest `waiting` reason, in bytes.
pub const MAX_WAITING_REASON_LEN: usize = 512;
/// Most `waiting` entries in one status answer.
pub const MAX_WAITING: usize = 64;

/// An agent the server cannot hand a job for yet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waiting {
    #[serde(default, deserialize_with = "null_default")]
    pub name: String,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub version: String,
    /// In words, e.g. `waiting: no checksum for falcon-agent-3.1.3.tar.gz yet`.
    #[serde(default, deserialize_with = "null_default")]
    pub reason: String,
}

/// What a job asks the host to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Install,
    Upgrade,
    Uninstall,
    Restart,
    Stop,
    Config,
    /// Extension: clear a `fatal` verdict of the host's supervisor and start the agent
    /// again if it should run.
    Reset,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Install => "install",
            Action::Upgrade => "upgrade",
            Action::Uninstall => "uninstall",
            Action::Restart => "restart",
            Action::Stop => "stop",
            Action::Config => "config",
            Action::Reset => "reset",
        }
    }
}

/// A job handed to a host. Fields that an action does not use are left empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub action: Action,
    /// Agent the job is about (all actions but `config`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Version to install or upgrade to (extension: seed 003 carries it in the URL only).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
    /// Full artifact URL.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub url: String,
    /// `SHA256:<hex>`, or `MD5:<hex>` when the server knows no SHA-256 of the artifact.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub checksum: String,
    /// Extension: the MD5 of the artifact's `.md5` file (32 hex digits) beside a SHA-256
    /// `checksum`, so a host checks the same `.md5` the legacy heartbeat path checks.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub md5: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub envs: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, String>,
    /// `config`: extra servers, `HOST:PORT,HOST:PORT` (syntax: [`crate::rules::parse_svrlist`]).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub svrlist: String,
    /// `config`: new report step in seconds (bounds: [`crate::rules::check_step`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
}

/// Parses `SHA256:<64 hex>` (prefix case-insensitive) into lowercase hex.
pub fn parse_checksum(s: &str) -> Option<String> {
    let (algo, hex) = s.split_once(':')?;
    if !algo.eq_ignore_ascii_case("sha256") {
        return None;
    }
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Some(hex.to_ascii_lowercase())
    } else {
        None
    }
}

/// A job's `checksum`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checksum {
    /// Lowercase hex of 64 digits.
    Sha256(String),
    /// Lowercase hex of 32 digits.
    Md5(String),
}

/// Parses `SHA256:<64 hex>` or `MD5:<32 hex>` (prefix case-insensitive).
pub fn parse_any_checksum(s: &str) -> Option<Checksum> {
    if let Some(h) = parse_checksum(s) {
        return Some(Checksum::Sha256(h));
    }
    let (algo, hex) = s.split_once(':')?;
    (algo.eq_ignore_ascii_case("md5") && is_hex(hex, 32))
        .then(|| Checksum::Md5(hex.to_ascii_lowercase()))
}

/// True when `s` is `len` hexadecimal digits.
pub fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Formats a lowercase hex MD5 as `MD5:<hex>`.
pub fn format_md5_checksum(hex: &str) -> String {
    format!("MD5:{hex}")
}

/// Formats a lowercase hex SHA-256 as `SHA256:<hex>`.
pub fn format_checksum(hex: &str) -> String {
    format!("SHA256:{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_travel_only_when_present_and_never_show_in_debug() {
        let r = RegisterRequest {
            hostname: "web-01".into(),
            agentsn: "a".into(),
            enrollment_secret: "s3cret-s3cret-s3cret".into(),
        };
        let text = serde_json::to_string(&r).unwrap();
        assert!(
            text.contains(r#""enrollmentSecret":"s3cret-s3cret-s3cret""#),
            "{text}"
        );
        assert!(!format!("{r:?}").contains("s3cret"));
        let plain = RegisterRequest::default();
        assert!(!serde_json::to_string(&plain)
            .unwrap()
            .contains("enrollmentSecret"));
        let a: RegisterResponse =
            serde_json::from_str(r#"{"status":0,"agentsn":"a","credential":"c0ffee"}"#).unwrap();
        assert_eq!(a.credential, "c0ffee");
        assert!(!format!("{a:?}").contains("c0ffee"));
        assert!(!serde_json::to_string(&RegisterResponse::default())
            .unwrap()
            .contains("credential"));
    }

    #[test]
    fn credential_secret_and_bearer_rules() {
        assert!(check_credential(&"ab".repeat(32)).is_ok());
        for bad in [
            "",
            "ab",
            &"AB".repeat(32),
            &"zz".repeat(32),
            &"ab".repeat(33),
        ] {
            assert!(check_credential(bad).is_err(), "{bad}");
        }
        assert!(check_enrollment_secret("0123456789abcdef").is_ok());
        assert!(check_enrollment_secret("short")
            .unwrap_err()
            .contains("shorter"));
        assert!(check_enrollment_secret("0123456789 abcdef").is_err());
        assert!(check_enrollment_secret(&"x".repeat(257)).is_err());
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("Bearer"), None);
    }

    #[test]
    fn status_request_round_trips_seed_shape() {
        let text = r#"{"hostname":"web-01","agentsn":"sn","version":"bootagent-1.2.4-x86_64",
            "uptime":1234,"timestamp":1232,"step":600,
            "agents":[{"name":"BasicAgent","version":"1.2.3","status":"stoped","uptime":123}],
            "jobs":[{"id":"j1","errcode":0,"message":"success"}]}"#;
        let r: StatusRequest = serde_json::from_str(text).unwrap();
        assert_eq!(r.agents[0].status, STATE_STOPED);
        assert_eq!(r.jobs[0].message, "success");
        let back: StatusRequest =
            serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        // Without events the report has exactly the seed's fields.
        let v = serde_json::to_value(&r).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "agents",
                "agentsn",
                "hostname",
                "jobs",
                "step",
                "timestamp",
                "uptime",
                "version"
            ]
        );
    }

    #[test]
    fn status_request_carries_events_when_there_are_some() {
        let mut r = StatusRequest {
            hostname: "web-01".into(),
            ..StatusRequest::default()
        };
        r.events.push(crate::events::Event {
            seq: 9,
            kind: crate::events::KIND_FATAL.into(),
            ..Default::default()
        });
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.contains(r#""events":[{"seq":9,"#), "{text}");
        let back: StatusRequest = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
        let r: StatusRequest = serde_json::from_str(r#"{"hostname":"h","events":null}"#).unwrap();
        assert!(r.events.is_empty());
    }

    #[test]
    fn jobs_parse_with_actions_and_optional_fields() {
        let text = r#"{"status":0,"jobs":[
            {"id":"1","action":"install","name":"BasicAgent","url":"http://s/a.tar.gz",
             "checksum":"SHA256:4a34","envs":{"PATH":"/usr/bin"},"limits":{"CPU":"10%"}},
            {"id":"2","action":"config","svrlist":"127.0.0.1:1,127.0.0.1:2","step":1200}]}"#;
        let r: StatusResponse = serde_json::from_str(text).unwrap();
        assert_eq!(r.jobs[0].action, Action::Install);
        assert_eq!(r.jobs[0].envs["PATH"], "/usr/bin");
        assert_eq!(r.jobs[1].action, Action::Config);
        assert_eq!(r.jobs[1].step, Some(1200));
        assert!(serde_json::from_str::<Job>(r#"{"id":"1","action":"reboot"}"#).is_err());
    }

    #[test]
    fn checksums() {
        let h = "a".repeat(64);
        assert_eq!(parse_checksum(&format!("SHA256:{h}")), Some(h.clone()));
        assert_eq!(
            parse_checksum(&format!("sha256:{}", h.to_uppercase())),
            Some(h.clone())
        );
        assert_eq!(parse_checksum(&format!("MD5:{h}")), None);
        assert_eq!(parse_checksum("SHA256:4a34"), None);
        assert_eq!(parse_checksum(&h), None);
        assert_eq!(format_checksum(&h), format!("SHA256:{h}"));
        let m = "0f".repeat(16);
        assert_eq!(
            parse_any_checksum(&format!("md5:{}", m.to_uppercase())),
            Some(Checksum::Md5(m.clone()))
        );
        assert_eq!(
            parse_any_checksum(&format_md5_checksum(&m)),
            Some(Checksum::Md5(m.clone()))
        );
        assert_eq!(
            parse_any_checksum(&format!("SHA256:{h}")),
            Some(Checksum::Sha256(h.clone()))
        );
        assert_eq!(parse_any_checksum(&format!("MD5:{}", &m[..31])), None);
        assert_eq!(parse_any_checksum(&format!("SHA1:{m}")), None);
    }

    #[test]
    fn agentsn_validation() {
        assert!(validate_agentsn("bfdcc18c-b6b9-4725-9c47-37fd93dba5b6").is_ok());
        for bad in ["", "a b", "../x", "sn\n", &"a".repeat(65)] {
            let e = validate_agentsn(bad).unwrap_err();
            assert!(e.to_string().starts_with("invalid agentsn"), "{e}");
        }
    }
}
