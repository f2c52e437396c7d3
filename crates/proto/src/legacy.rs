//! The original ops-meta / ops-updater heartbeat: `POST /heartbeat`, its JSON shapes, the
//! tarball and checksum URL rule, and the `.md5` file format.
//!
//! Parsing is as tolerant as the original Go decoder was: unknown fields are ignored, a
//! missing or `null` field takes its zero value, so a fork that added fields still talks
//! to us; a key given twice in a request takes its last value.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, DeserializeSeed, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::events::Event;

/// What a host reports every round. Read through [`HeartbeatRequestRef`] (same rules).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HeartbeatRequest {
    pub hostname: String,
    /// The agents found on the host. Absent or `null` means none.
    #[serde(rename = "realAgents")]
    pub real_agents: Vec<RealAgent>,
}

/// One agent as the host found it, read from `control status`. Read through
/// [`RealAgentRef`] (same rules).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RealAgent {
    pub name: String,
    pub version: String,
    /// `started`, `stoped` (sic) or `stopped`, or an error text when the script failed.
    pub status: String,
    /// Unix seconds at which the host looked.
    pub timestamp: i64,
}

/// [`HeartbeatRequest`] read without copying: the strings borrow from the request body
/// unless they hold JSON escapes. Same field names and the same tolerance (absent, `null`,
/// unknown fields, a key given twice) as the owned type; the server's hot path reads this
/// one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeartbeatRequestRef<'a> {
    pub hostname: Cow<'a, str>,
    pub real_agents: Vec<RealAgentRef<'a>>,
    /// Extension (`events`, see [`crate::events`]): empty, and never allocated, for a
    /// heartbeat without it. [`HeartbeatRequest`] does not keep it; a host sends it with
    /// [`HeartbeatReport`].
    pub events: Vec<Event>,
}

/// What a host sends as its heartbeat: the request and, when there are any, the events
/// not yet taken by a server (`events`, at most [`crate::events::MAX_EVENTS_PER_REPORT`]).
/// Without events these are exactly the bytes of the [`HeartbeatRequest`] alone, so an
/// original server sees the original request; one with events it ignores the field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct HeartbeatReport<'a> {
    #[serde(flatten)]
    pub request: &'a HeartbeatRequest,
    #[serde(skip_serializing_if = "<[Event]>::is_empty")]
    pub events: &'a [Event],
}

/// [`RealAgent`] with borrowed strings. Serializes to exactly the bytes [`RealAgent`] does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RealAgentRef<'a> {
    pub name: Cow<'a, str>,
    pub version: Cow<'a, str>,
    pub status: Cow<'a, str>,
    pub timestamp: i64,
}

// The request types are read by hand rather than derived: serde's derive refuses a key
// given twice ("duplicate field"), while Go's decoder, which the original server used,
// assigns every occurrence in turn, so the last one wins. Each occurrence is still read
// and type-checked, as Go does.

impl<'de: 'a, 'a> Deserialize<'de> for HeartbeatRequestRef<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = HeartbeatRequestRef<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a heartbeat object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut m: M) -> Result<Self::Value, M::Error> {
                let mut out = HeartbeatRequestRef::default();
                const KEYS: &[&str] = &["hostname", "realAgents", "events"];
                while let Some(key) = m.next_key_seed(Key(KEYS))? {
                    match key {
                        Some(0) => out.hostname = m.next_value::<NullCow<'a>>()?.0,
                        Some(1) => out.real_agents = m.next_value::<OrZero<_>>()?.0,
                        Some(2) => out.events = m.next_value::<OrZero<_>>()?.0,
                        _ => {
                            m.next_value::<de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_map(V(PhantomData))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for RealAgentRef<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = RealAgentRef<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an agent object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut m: M) -> Result<Self::Value, M::Error> {
                let mut out = RealAgentRef::default();
                const KEYS: &[&str] = &["name", "version", "status", "timestamp"];
                while let Some(key) = m.next_key_seed(Key(KEYS))? {
                    match key {
                        Some(0) => out.name = m.next_value::<NullCow<'a>>()?.0,
                        Some(1) => out.version = m.next_value::<NullCow<'a>>()?.0,
                        Some(2) => out.status = m.next_value::<NullCow<'a>>()?.0,
                        Some(3) => out.timestamp = m.next_value::<OrZero<i64>>()?.0,
                        _ => {
                            m.next_value::<de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_map(V(PhantomData))
    }
}

impl<'de> Deserialize<'de> for HeartbeatRequest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        HeartbeatRequestRef::deserialize(d).map(|r| r.to_owned_request())
    }
}

impl<'de> Deserialize<'de> for RealAgent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        RealAgentRef::deserialize(d).map(|a| a.to_owned_agent())
    }
}

/// Reads an object key as its index in a list of known field names (`None`: unknown),
/// without allocating.
struct Key(&'static [&'static str]);

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Option<usize>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_identifier(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Option<usize>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(self.0.iter().position(|k| *k == v))
    }
    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
        Ok(self.0.iter().position(|k| k.as_bytes() == v))
    }
}

/// A value read by [`null_default`]: `null` is the zero value.
struct OrZero<T>(T);

impl<'de, T: Default + Deserialize<'de>> Deserialize<'de> for OrZero<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        null_default(d).map(OrZero)
    }
}

/// A string read by [`null_default_cow`]: borrowed when it can be, `null` is empty.
struct NullCow<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for NullCow<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        null_default_cow(d).map(NullCow)
    }
}

impl<'a> From<&'a RealAgent> for RealAgentRef<'a> {
    fn from(a: &'a RealAgent) -> Self {
        RealAgentRef {
            name: Cow::Borrowed(&a.name),
            version: Cow::Borrowed(&a.version),
            status: Cow::Borrowed(&a.status),
            timestamp: a.timestamp,
        }
    }
}

impl RealAgentRef<'_> {
    /// The owned wire type with the same content.
    pub fn to_owned_agent(&self) -> RealAgent {
        RealAgent {
            name: self.name.clone().into_owned(),
            version: self.version.clone().into_owned(),
            status: self.status.clone().into_owned(),
            timestamp: self.timestamp,
        }
    }
}

impl HeartbeatRequestRef<'_> {
    /// The owned wire type with the same content.
    pub fn to_owned_request(&self) -> HeartbeatRequest {
        HeartbeatRequest {
            hostname: self.hostname.clone().into_owned(),
            real_agents: self
                .real_agents
                .iter()
                .map(RealAgentRef::to_owned_agent)
                .collect(),
        }
    }
}

/// What the server answers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    /// Non-empty means the host must do nothing this round.
    #[serde(rename = "errorMessage", default, deserialize_with = "null_default")]
    pub error_message: String,
    #[serde(rename = "desiredAgents", default, deserialize_with = "null_default")]
    pub desired_agents: Vec<DesiredAgent>,
}

/// The state the server wants for one agent on this host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredAgent {
    #[serde(default, deserialize_with = "null_default")]
    pub name: String,
    #[serde(default, deserialize_with = "null_default")]
    pub version: String,
    /// Base URL; the tarball is at `{tarball}/{name}-{version}.tar.gz`.
    #[serde(default, deserialize_with = "null_default")]
    pub tarball: String,
    /// Base URL of the `.md5` file; empty means the tarball base.
    #[serde(default, deserialize_with = "null_default")]
    pub md5: String,
    /// `start` or `stop`; anything else is ignored by the host.
    #[serde(default, deserialize_with = "null_default")]
    pub cmd: String,
    /// Extension: lowercase hex SHA-256 of the tarball. Original updaters ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Extension: environment for the agent's control scripts (as a BootAgent job's
    /// `envs`). Original updaters ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envs: Option<std::collections::BTreeMap<String, String>>,
    /// Extension: resource limits (as a BootAgent job's `limits`). Original updaters ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<std::collections::BTreeMap<String, String>>,
}

/// The commands a desired agent may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmd {
    Start,
    Stop,
}

impl Cmd {
    /// Parses a `cmd` field; `None` for anything the protocol does not know.
    pub fn parse(s: &str) -> Option<Cmd> {
        match s {
            "start" => Some(Cmd::Start),
            "stop" => Some(Cmd::Stop),
            _ => None,
        }
    }
}

impl DesiredAgent {
    /// File name of the tarball: `{name}-{version}.tar.gz`.
    pub fn tarball_file(&self) -> String {
        tarball_file(&self.name, &self.version)
    }

    /// Full tarball URL by the original rule.
    pub fn tarball_url(&self) -> String {
        join_url(&self.tarball, &self.tarball_file())
    }

    /// Full `.md5` URL: the `md5` base, or the tarball base when `md5` is empty.
    pub fn md5_url(&self) -> String {
        let base = if self.md5.is_empty() {
            &self.tarball
        } else {
            &self.md5
        };
        join_url(base, &format!("{}.md5", self.tarball_file()))
    }
}

/// `{name}-{version}.tar.gz`.
pub fn tarball_file(name: &str, version: &str) -> String {
    format!("{name}-{version}.tar.gz")
}

/// Joins a base URL and a file name with exactly one `/`.
pub fn join_url(base: &str, file: &str) -> String {
    format!("{}/{}", base.trim_end_matches('/'), file)
}

/// Status strings of the `control status` contract.
pub const STATUS_STARTED: &str = "started";
/// The original spelling, which we send.
pub const STATUS_STOPED: &str = "stoped";
/// The correct spelling, which we accept.
pub const STATUS_STOPPED: &str = "stopped";

/// True when a `control status` output means "not running".
pub fn is_stopped_status(s: &str) -> bool {
    s == STATUS_STOPED || s == STATUS_STOPPED
}

/// Reads the checksum out of a `.md5` file as written by `md5sum FILE`
/// (`<32 hex>  <file>`), or a bare hex digest. Returns it lowercase.
pub fn parse_md5_file(text: &str) -> Option<String> {
    let first = text.split_whitespace().next()?;
    if first.len() == 32 && first.bytes().all(|b| b.is_ascii_hexdigit()) {
        Some(first.to_ascii_lowercase())
    } else {
        None
    }
}

/// Reads the checksum out of a `.sha256` file as written by `sha256sum FILE`
/// (`<64 hex>  <file>`), or a bare hex digest. Returns it lowercase.
pub fn parse_sha256_file(text: &str) -> Option<String> {
    let first = text.split_whitespace().next()?;
    if first.len() == 64 && first.bytes().all(|b| b.is_ascii_hexdigit()) {
        Some(first.to_ascii_lowercase())
    } else {
        None
    }
}

/// Writes a `.md5` file body the way `md5sum` does.
pub fn format_md5_file(hex: &str, file: &str) -> String {
    format!("{hex}  {file}\n")
}

/// Go's decoder leaves a field at its zero value when the JSON holds `null`; so do we
/// (the BootAgent types share this rule).
pub(crate) fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// [`null_default`] for a string that borrows from the input when it can: `null` is the
/// empty string, any other non-string is refused as for `String`.
fn null_default_cow<'de: 'a, 'a, D>(d: D) -> Result<Cow<'a, str>, D::Error>
where
    D: Deserializer<'de>,
{
    struct CowStr;
    impl<'de> Visitor<'de> for CowStr {
        type Value = Cow<'de, str>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string or null")
        }
        fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
            Ok(Cow::Borrowed(v))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Cow::Owned(v.to_owned()))
        }
        fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
            Ok(Cow::Owned(v))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Cow::Borrowed(""))
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Cow::Borrowed(""))
        }
        fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
            d.deserialize_str(CowStr)
        }
    }
    d.deserialize_option(CowStr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_tolerates_absent_null_and_unknown_fields() {
        let r: HeartbeatRequest = serde_json::from_str(r#"{"hostname":"h1"}"#).unwrap();
        assert!(r.real_agents.is_empty());
        let r: HeartbeatRequest =
            serde_json::from_str(r#"{"hostname":"h1","realAgents":null,"extra":[1]}"#).unwrap();
        assert!(r.real_agents.is_empty());
        let r: HeartbeatRequest = serde_json::from_str(
            r#"{"hostname":"h1","realAgents":[{"name":"a","version":null,"status":"started","timestamp":5,"x":1}]}"#,
        )
        .unwrap();
        assert_eq!(r.real_agents[0].version, "");
        assert_eq!(r.real_agents[0].timestamp, 5);
    }

    #[test]
    fn borrowed_request_reads_like_the_owned_one() {
        let bodies = [
            r#"{"hostname":"h1"}"#,
            r#"{"hostname":null,"realAgents":null}"#,
            r#"{}"#,
            r#"{"hostname":"h1","realAgents":null,"extra":[1,{"a":"b"}]}"#,
            r#"{"hostname":"h\u0031","realAgents":[{"name":"a","version":null,"status":"err \"x\"\n","timestamp":5,"x":1},{}]}"#,
            r#"{"realAgents":[{"name":"falcon-agent","version":"1.0.0","status":"started","timestamp":null}],"hostname":"web-1"}"#,
        ];
        for b in bodies {
            let owned: HeartbeatRequest = serde_json::from_str(b).unwrap();
            let borrowed: HeartbeatRequestRef = serde_json::from_str(b).unwrap();
            assert_eq!(borrowed.to_owned_request(), owned, "{b}");
        }
        // Plain strings borrow; escaped ones are decoded into owned strings.
        let b = r#"{"hostname":"web-1","realAgents":[{"name":"a","version":"1","status":"e\tx","timestamp":1}]}"#;
        let r: HeartbeatRequestRef = serde_json::from_str(b).unwrap();
        assert!(matches!(r.hostname, Cow::Borrowed("web-1")));
        assert!(matches!(r.real_agents[0].name, Cow::Borrowed("a")));
        assert_eq!(r.real_agents[0].status, "e\tx");
        assert!(matches!(r.real_agents[0].status, Cow::Owned(_)));
    }

    #[test]
    fn borrowed_request_refuses_what_the_owned_one_refuses() {
        let bodies = [
            r#"{"hostname":5}"#,
            r#"{"hostname":["h"]}"#,
            r#"{"hostname":"h","realAgents":{}}"#,
            r#"{"hostname":"h","realAgents":[{"name":1}]}"#,
            r#"{"hostname":"h","realAgents":[{"timestamp":"5"}]}"#,
            r#"{"hostname":"h","realAgents":[{"status":true}]}"#,
            r#"{"hostname":"h""#,
        ];
        for b in bodies {
            assert!(serde_json::from_str::<HeartbeatRequest>(b).is_err(), "{b}");
            assert!(
                serde_json::from_str::<HeartbeatRequestRef>(b).is_err(),
                "{b}"
            );
        }
        // Bytes that are not UTF-8: refused in a string that is read, ignored in one that
        // is skipped, by both.
        let raw: [&[u8]; 3] = [
            b"{\"hostname\":\"h\xff\"}",
            b"{\"hostname\":\"h\",\"realAgents\":[{\"status\":\"\xc3\"}]}",
            b"{\"hostname\":\"h\",\"x\":\"\xff\"}",
        ];
        for b in raw {
            let owned = serde_json::from_slice::<HeartbeatRequest>(b).ok();
            let borrowed = serde_json::from_slice::<HeartbeatRequestRef>(b).ok();
            assert_eq!(borrowed.map(|r| r.to_owned_request()), owned, "{b:?}");
        }
    }

    /// A heartbeat with a key given twice got 400 (serde's derive refuses duplicate
    /// fields), where the Go original's decoder took the last value.
    #[test]
    fn duplicate_keys_in_a_heartbeat_take_the_last_value() {
        let b = r#"{"hostname":"h","realAgents":[{"name":"x"}],"hostname":"g",
            "realAgents":[{"name":"a","version":"1","name":"b","status":"s","timestamp":1,"timestamp":null}],
            "hostname":"web-1"}"#;
        let want = HeartbeatRequest {
            hostname: "web-1".into(),
            real_agents: vec![RealAgent {
                name: "b".into(),
                version: "1".into(),
                status: "s".into(),
                timestamp: 0,
            }],
        };
        let owned: HeartbeatRequest = serde_json::from_str(b).unwrap();
        assert_eq!(owned, want);
        let borrowed: HeartbeatRequestRef = serde_json::from_str(b).unwrap();
        assert_eq!(borrowed.to_owned_request(), want);
        assert!(matches!(borrowed.hostname, Cow::Borrowed("web-1")));
        // The value given first is still checked: a wrong type is refused, as in Go.
        let bad = r#"{"hostname":5,"hostname":"h"}"#;
        assert!(serde_json::from_str::<HeartbeatRequestRef>(bad).is_err());
    }

    #[test]
    fn borrowed_agent_serializes_like_the_owned_one() {
        let a = RealAgent {
            name: "a".into(),
            version: "1.0".into(),
            status: "error: \"quoted\" \u{1}".into(),
            timestamp: -3,
        };
        assert_eq!(
            serde_json::to_string(&RealAgentRef::from(&a)).unwrap(),
            serde_json::to_string(&a).unwrap()
        );
        assert_eq!(RealAgentRef::from(&a).to_owned_agent(), a);
    }

    #[test]
    fn events_ride_along_and_leave_the_original_request_unchanged() {
        let req = HeartbeatRequest {
            hostname: "web-1".into(),
            real_agents: vec![RealAgent {
                name: "a".into(),
                version: "1".into(),
                status: "started".into(),
                timestamp: 7,
            }],
        };
        let plain = serde_json::to_string(&req).unwrap();
        let report = HeartbeatReport {
            request: &req,
            events: &[],
        };
        assert_eq!(serde_json::to_string(&report).unwrap(), plain);
        let events = [Event {
            seq: 4,
            agent: "a".into(),
            kind: crate::events::KIND_EXITED.into(),
            ..Event::default()
        }];
        let with = serde_json::to_string(&HeartbeatReport {
            request: &req,
            events: &events,
        })
        .unwrap();
        let r: HeartbeatRequestRef = serde_json::from_str(&with).unwrap();
        assert_eq!(r.events, events);
        assert_eq!(r.to_owned_request(), req);
        // The owned request (an original server's view) reads the same without them.
        let owned: HeartbeatRequest = serde_json::from_str(&with).unwrap();
        assert_eq!(owned, req);
        let r: HeartbeatRequestRef = serde_json::from_str(&plain).unwrap();
        assert!(r.events.is_empty() && r.events.capacity() == 0);
        let r: HeartbeatRequestRef =
            serde_json::from_str(r#"{"hostname":"h","events":null}"#).unwrap();
        assert!(r.events.is_empty());
        assert!(
            serde_json::from_str::<HeartbeatRequestRef>(r#"{"hostname":"h","events":{}}"#).is_err()
        );
    }

    #[test]
    fn request_uses_original_field_names() {
        let r = HeartbeatRequest {
            hostname: "h".into(),
            real_agents: vec![RealAgent {
                name: "a".into(),
                version: "1".into(),
                status: "started".into(),
                timestamp: 7,
            }],
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"hostname":"h","realAgents":[{"name":"a","version":"1","status":"started","timestamp":7}]})
        );
    }

    #[test]
    fn response_omits_sha256_when_unknown_and_accepts_null_list() {
        let d = DesiredAgent {
            name: "a".into(),
            version: "1".into(),
            tarball: "http://x/t".into(),
            md5: "".into(),
            cmd: "start".into(),
            sha256: None,
            envs: None,
            limits: None,
        };
        let s = serde_json::to_string(&d).unwrap();
        assert!(!s.contains("sha256"), "{s}");
        let r: HeartbeatResponse =
            serde_json::from_str(r#"{"errorMessage":"","desiredAgents":null}"#).unwrap();
        assert!(r.desired_agents.is_empty());
    }

    #[test]
    fn url_rule_matches_original() {
        let mut d = DesiredAgent {
            name: "falcon-agent".into(),
            version: "1.0.1".into(),
            tarball: "http://10.0.0.1:2000/falcon".into(),
            ..Default::default()
        };
        assert_eq!(
            d.tarball_url(),
            "http://10.0.0.1:2000/falcon/falcon-agent-1.0.1.tar.gz"
        );
        assert_eq!(
            d.md5_url(),
            "http://10.0.0.1:2000/falcon/falcon-agent-1.0.1.tar.gz.md5"
        );
        d.md5 = "http://m/sums/".into();
        assert_eq!(d.md5_url(), "http://m/sums/falcon-agent-1.0.1.tar.gz.md5");
    }

    #[test]
    fn md5_file_parsing() {
        let h = "9e107d9d372bb6826bd81d3542a419d6";
        assert_eq!(
            parse_md5_file(&format_md5_file(h, "a-1.tar.gz")),
            Some(h.into())
        );
        assert_eq!(parse_md5_file(&h.to_uppercase()), Some(h.into()));
        assert_eq!(parse_md5_file(""), None);
        assert_eq!(parse_md5_file("<html>not found</html>"), None);
        assert_eq!(parse_md5_file("9e107d9d372bb6826bd81d3542a419d"), None);
        let sha = "ab".repeat(32);
        assert_eq!(
            parse_sha256_file(&format!("{}  a-1.tar.gz\n", sha.to_uppercase())),
            Some(sha.clone())
        );
        assert_eq!(parse_sha256_file(&sha), Some(sha.clone()));
        assert_eq!(parse_sha256_file(&sha[..63]), None);
        assert_eq!(parse_sha256_file("<html>404</html>"), None);
    }

    #[test]
    fn cmd_parse() {
        assert_eq!(Cmd::parse("start"), Some(Cmd::Start));
        assert_eq!(Cmd::parse("stop"), Some(Cmd::Stop));
        assert_eq!(Cmd::parse("restart"), None);
        assert_eq!(Cmd::parse(""), None);
    }
}
