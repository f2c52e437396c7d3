//! Agent events: what a host reports when a child process misbehaves (seed 003: "abnormal
//! exits are reported as events"). An extension of both protocols: an optional `events`
//! list on the BootAgent status report and on the legacy heartbeat, which servers that do
//! not know it ignore.
//!
//! Every event carries a `seq`, increasing on its host across restarts; the host sends the
//! events the server has not taken yet (oldest first) and forgets to resend them once an
//! answer came back, and the server drops an event whose `(host, seq)` it already holds.

use serde::{Deserialize, Serialize};

use crate::legacy::null_default;
use crate::validate::{clean_text, MAX_NAME_LEN};

/// An agent exited abnormally (non-zero code or a signal it did not ask for).
pub const KIND_EXITED: &str = "exited";
/// The supervisor started an agent again after it exited.
pub const KIND_RESTARTED: &str = "restarted";
/// The supervisor tried to start an agent again and its `control start` failed.
pub const KIND_RESTART_FAILED: &str = "restart_failed";
/// The supervisor gave up on an agent after repeated failures (state `fatal`).
pub const KIND_FATAL: &str = "fatal";
/// An agent was killed for exceeding a resource limit (the OOM killer, a cgroup limit).
pub const KIND_KILLED: &str = "killed";
/// Limits were asked for an agent that this host cannot enforce.
pub const KIND_LIMITS_NOT_ENFORCED: &str = "limits_not_enforced";
/// An agent's failure count went back to zero: it ran long enough, or a job started a
/// `fatal` agent again.
pub const KIND_RESET: &str = "reset";
/// ops-updater upgraded itself (agent `ops-updater`, the new version).
pub const KIND_SELF_UPGRADED: &str = "self_upgraded";
/// ops-updater put its previous binary back after a failed self-upgrade (the failed
/// version; the cause says why), or refused one before trying it.
pub const KIND_SELF_UPGRADE_FAILED: &str = "self_upgrade_failed";
/// An install of a new version failed before it ran: `state` says what failed, one of
/// the `INSTALL_FAILED_*` below; `version` is the version that was tried. Written once per
/// (version, state): the retries with back-off that fail alike write nothing more.
pub const KIND_INSTALL_FAILED: &str = "install_failed";
/// A switch to a new version failed (it did not start, or did not reach `started`) and
/// the previous version was put back; `version` is the new version that failed. A first
/// install (no previous version) that does not start is a release failure too, and is
/// written with this kind: its `cause` says that nothing was put back. Written once per
/// failing version, not once per retry.
pub const KIND_ROLLED_BACK: &str = "rolled_back";

/// `state` of an `install_failed` event: the download failed (network, server, timeout).
pub const INSTALL_FAILED_DOWNLOAD: &str = "download";
/// The downloaded bytes did not match their MD5 or SHA-256.
pub const INSTALL_FAILED_CHECKSUM: &str = "checksum";
/// The signature was missing, bad or made by an unknown key.
pub const INSTALL_FAILED_SIGNATURE: &str = "signature";
/// The disk was full or the files could not be written.
pub const INSTALL_FAILED_DISK: &str = "disk";
/// The archive was refused (hostile or broken members): the release's own fault.
pub const INSTALL_FAILED_ARCHIVE: &str = "archive";

/// Every kind this version knows. Others are kept as they come (cut to
/// [`MAX_EVENT_KIND_LEN`]), so a newer host's kinds still show on an older server.
pub const KINDS: &[&str] = &[
    KIND_EXITED,
    KIND_RESTARTED,
    KIND_RESTART_FAILED,
    KIND_FATAL,
    KIND_KILLED,
    KIND_LIMITS_NOT_ENFORCED,
    KIND_RESET,
    KIND_SELF_UPGRADED,
    KIND_SELF_UPGRADE_FAILED,
    KIND_INSTALL_FAILED,
    KIND_ROLLED_BACK,
];

/// Most events one report (status report or heartbeat) may carry; a server refuses a
/// report with more (400), so a host never sends more.
pub const MAX_EVENTS_PER_REPORT: usize = 32;
/// Longest `cause`, in bytes.
pub const MAX_EVENT_CAUSE_LEN: usize = 512;
/// Most lines of `output`: the last ones are kept.
pub const MAX_EVENT_OUTPUT_LINES: usize = 10;
/// Longest line of `output`, in bytes.
pub const MAX_EVENT_LINE_LEN: usize = 256;
/// Longest `kind` and `state`, in bytes.
pub const MAX_EVENT_KIND_LEN: usize = 32;

/// One event about one agent on one host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Increasing on its host, across restarts of the host daemon.
    #[serde(default, deserialize_with = "null_default")]
    pub seq: u64,
    /// Unix seconds (host clock) at which it happened.
    #[serde(default, deserialize_with = "null_default")]
    pub time: i64,
    /// The agent it is about; empty for the host daemon itself.
    #[serde(default, deserialize_with = "null_default")]
    pub agent: String,
    /// The agent's version at the time; may be empty.
    #[serde(default, deserialize_with = "null_default")]
    pub version: String,
    /// One of the `KIND_*` values.
    #[serde(default, deserialize_with = "null_default")]
    pub kind: String,
    /// In words: `exit code 3`, `killed by signal 9 (memory limit 20M)`.
    #[serde(default, deserialize_with = "null_default")]
    pub cause: String,
    /// The last lines the control script or the agent printed, oldest first.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub output: Vec<String>,
    /// The agent's state after the event (`running`, `stoped`, `fatal`, `killed`), or empty.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub state: String,
    /// Restarts of the agent in its current run of failures.
    #[serde(default, deserialize_with = "null_default")]
    pub restarts: u32,
}

impl Event {
    /// The event cut to the bounds (`MAX_EVENT_*`, agent and version to
    /// [`MAX_NAME_LEN`]), control characters replaced by spaces ([`clean_text`]): what
    /// both sides keep of an event, however it was made.
    pub fn clean(self) -> Event {
        let skip = self.output.len().saturating_sub(MAX_EVENT_OUTPUT_LINES);
        Event {
            seq: self.seq,
            time: self.time,
            agent: clean_text(&self.agent, MAX_NAME_LEN),
            version: clean_text(&self.version, MAX_NAME_LEN),
            kind: clean_text(&self.kind, MAX_EVENT_KIND_LEN),
            cause: clean_text(&self.cause, MAX_EVENT_CAUSE_LEN),
            output: self
                .output
                .iter()
                .skip(skip)
                .map(|l| clean_text(l, MAX_EVENT_LINE_LEN))
                .collect(),
            state: clean_text(&self.state, MAX_EVENT_KIND_LEN),
            restarts: self.restarts,
        }
    }

    /// Bytes of text the event holds (a memory estimate for whoever keeps many).
    pub fn text_len(&self) -> usize {
        self.agent.len()
            + self.version.len()
            + self.kind.len()
            + self.cause.len()
            + self.state.len()
            + self.output.iter().map(String::len).sum::<usize>()
    }
}

/// The last `MAX_EVENT_OUTPUT_LINES` lines of `text`, each cut to `MAX_EVENT_LINE_LEN`:
/// a script's captured output as an event carries it.
pub fn output_lines(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let skip = lines.len().saturating_sub(MAX_EVENT_OUTPUT_LINES);
    lines[skip..]
        .iter()
        .map(|l| clean_text(l, MAX_EVENT_LINE_LEN))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_cuts_every_field_to_its_bound() {
        let e = Event {
            seq: 7,
            time: 1_700_000_000,
            agent: "a".repeat(500),
            version: "1".repeat(500),
            kind: "k".repeat(100),
            cause: format!("{}\nforged line", "c".repeat(600)),
            output: (0..25)
                .map(|i| format!("{i}:{}", "x".repeat(400)))
                .collect(),
            state: "s".repeat(100),
            restarts: 3,
        }
        .clean();
        assert_eq!((e.seq, e.time, e.restarts), (7, 1_700_000_000, 3));
        assert_eq!(e.agent.len(), MAX_NAME_LEN);
        assert_eq!(e.version.len(), MAX_NAME_LEN);
        assert_eq!(e.kind.len(), MAX_EVENT_KIND_LEN);
        assert_eq!(e.state.len(), MAX_EVENT_KIND_LEN);
        assert_eq!(e.cause.len(), MAX_EVENT_CAUSE_LEN);
        assert_eq!(e.output.len(), MAX_EVENT_OUTPUT_LINES);
        assert!(e.output[0].starts_with("15:"), "the last lines are kept");
        assert!(e.output.iter().all(|l| l.len() == MAX_EVENT_LINE_LEN));
        let e = Event {
            cause: "a\nb\u{1b}[31m".into(),
            ..Event::default()
        }
        .clean();
        assert_eq!(e.cause, "a b [31m");
    }

    #[test]
    fn wire_shape_and_tolerance() {
        let e = Event {
            seq: 1,
            time: 2,
            agent: "falcon-agent".into(),
            version: "1.0.0".into(),
            kind: KIND_EXITED.into(),
            cause: "exit code 3".into(),
            output: vec!["boom".into()],
            state: "running".into(),
            restarts: 1,
        };
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!({"seq":1,"time":2,"agent":"falcon-agent","version":"1.0.0",
                "kind":"exited","cause":"exit code 3","output":["boom"],"state":"running",
                "restarts":1})
        );
        let back: Event = serde_json::from_value(serde_json::to_value(&e).unwrap()).unwrap();
        assert_eq!(back, e);
        let e: Event =
            serde_json::from_str(r#"{"seq":3,"output":null,"state":null,"x":1}"#).unwrap();
        assert_eq!(e.seq, 3);
        assert!(e.output.is_empty() && e.state.is_empty());
        let s = serde_json::to_string(&e).unwrap();
        assert!(!s.contains("output") && !s.contains("state"), "{s}");
    }

    #[test]
    fn output_lines_keeps_the_last_non_blank_lines() {
        let text: String = (0..15).map(|i| format!("line {i}\n\n")).collect();
        let got = output_lines(&text);
        assert_eq!(got.len(), MAX_EVENT_OUTPUT_LINES);
        assert_eq!(got[0], "line 5");
        assert_eq!(got[9], "line 14");
        assert!(output_lines("").is_empty());
    }
}
