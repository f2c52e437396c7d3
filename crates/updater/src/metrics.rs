//! What the daemon counts for `GET /metrics` of the local endpoint ([`crate::http`]), in
//! the Prometheus text format (0.0.4) written by the Prometheus project's client.
//!
//! Plain atomics, bumped where the event happens (the rounds in [`crate::daemon`] and
//! [`crate::boot`], installs, starts, stops and supervisor restarts in
//! [`crate::engine`], self-upgrades in [`crate::selfup`]), shared through
//! [`crate::state::Shared`]; encoded only when scraped. Counters start at zero with the
//! worker process.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// The `Content-Type` of the answer.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The protocol of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Legacy,
    BootAgent,
}

const PROTOCOLS: [&str; 2] = ["legacy", "bootagent"];
const ROUND_RESULTS: [&str; 2] = ["ok", "failed"];

/// What failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Fetching a tarball or its `.md5` (connection, HTTP status, timeout, size limit).
    Download,
    /// A digest did not match, or there was none to check against.
    Checksum,
    /// The artifact's signature was missing or refused.
    Signature,
    /// The tarball could not be unpacked (a bad or unsafe archive, an I/O error).
    Unpack,
    /// `control start` failed, or the agent did not come up.
    ControlStart,
    /// `control stop` failed, or the agent still ran after it.
    ControlStop,
    /// A write failed for lack of space.
    DiskFull,
    /// No server answered a round.
    ServerUnreachable,
    /// Anything else.
    Other,
}

const FAILURES: [&str; 9] = [
    "download",
    "checksum",
    "signature",
    "unpack",
    "control_start",
    "control_stop",
    "disk_full",
    "server_unreachable",
    "other",
];

/// How an install (or upgrade) of an agent ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Install {
    Ok,
    /// Nothing changed: the download, check or unpack failed, or the old one did not stop.
    Failed,
    /// The new version did not start; the previous one was put back.
    RolledBack,
}

const INSTALLS: [&str; 3] = ["ok", "failed", "rolled_back"];

/// Where a self-upgrade of ops-updater got to, as this worker saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelfUpgrade {
    /// Prepared: this worker stops for the new binary.
    Started,
    /// Failed before anything changed (the download, its checks, the new binary's `-T`,
    /// staging). A roll-back is the supervisor's doing and not counted here: `/status`
    /// (`selfUpgrade`) and the `self_upgrade_failed` event tell it.
    Failed,
    /// The new binary (this worker) had its good rounds and was committed.
    Committed,
}

const SELF_UPGRADES: [&str; 3] = ["started", "failed", "committed"];

/// The counters. Cheap to bump from anywhere; shared behind an `Arc`.
#[derive(Debug, Default)]
pub struct Metrics {
    rounds: [[AtomicU64; ROUND_RESULTS.len()]; PROTOCOLS.len()],
    failures: [AtomicU64; FAILURES.len()],
    installs: [AtomicU64; INSTALLS.len()],
    restarts: AtomicU64,
    oom_kills: AtomicU64,
    self_upgrades: [AtomicU64; SELF_UPGRADES.len()],
}

impl Metrics {
    /// A round (one heartbeat or BootAgent report) ended; a failed one also counts as a
    /// `server_unreachable` failure.
    pub fn round(&self, protocol: Protocol, ok: bool) {
        self.rounds[protocol as usize][usize::from(!ok)].fetch_add(1, Relaxed);
        if !ok {
            self.failure(Failure::ServerUnreachable);
        }
    }

    pub fn failure(&self, kind: Failure) {
        self.failures[kind as usize].fetch_add(1, Relaxed);
    }

    /// An install ended (a failure also counts its kind, through [`Metrics::failure`]).
    pub fn install(&self, result: Install) {
        self.installs[result as usize].fetch_add(1, Relaxed);
    }

    /// The supervisor restarted an agent.
    pub fn restart(&self) {
        self.restarts.fetch_add(1, Relaxed);
    }

    /// An agent was ended by the kernel's OOM killer.
    pub fn oom_kill(&self) {
        self.oom_kills.fetch_add(1, Relaxed);
    }

    pub fn self_upgrade(&self, result: SelfUpgrade) {
        self.self_upgrades[result as usize].fetch_add(1, Relaxed);
    }

    /// Everything in the text format.
    pub fn render(&self) -> String {
        let snapshot = Snapshot {
            rounds: self
                .rounds
                .each_ref()
                .map(|r| r.each_ref().map(|n| n.load(Relaxed))),
            failures: self.failures.each_ref().map(|n| n.load(Relaxed)),
            installs: self.installs.each_ref().map(|n| n.load(Relaxed)),
            restarts: self.restarts.load(Relaxed),
            oom_kills: self.oom_kills.load(Relaxed),
            self_upgrades: self.self_upgrades.each_ref().map(|n| n.load(Relaxed)),
        };
        let mut registry = Registry::default();
        registry.register_collector(Box::new(snapshot));
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
            .expect("writing to a String does not fail");
        out
    }
}

/// The counters as read for one scrape.
#[derive(Debug)]
struct Snapshot {
    rounds: [[u64; ROUND_RESULTS.len()]; PROTOCOLS.len()],
    failures: [u64; FAILURES.len()],
    installs: [u64; INSTALLS.len()],
    restarts: u64,
    oom_kills: u64,
    self_upgrades: [u64; SELF_UPGRADES.len()],
}

fn by_label(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: &[&str],
    counts: &[u64],
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (v, n) in values.iter().zip(counts) {
        ConstCounter::new(*n).encode(m.encode_family(&[(label, *v)])?)?;
    }
    Ok(())
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let mut m = e.encode_descriptor(
            "ops_updater_rounds",
            "Rounds (a heartbeat or a BootAgent report) by protocol and result.",
            None,
            MetricType::Counter,
        )?;
        for (p, row) in PROTOCOLS.iter().zip(&self.rounds) {
            for (r, n) in ROUND_RESULTS.iter().zip(row) {
                let labels = [("protocol", *p), ("result", *r)];
                ConstCounter::new(*n).encode(m.encode_family(&labels)?)?;
            }
        }
        by_label(
            &mut e,
            "ops_updater_failures",
            "Failures by kind.",
            "kind",
            &FAILURES,
            &self.failures,
        )?;
        by_label(
            &mut e,
            "ops_updater_installs",
            "Agent installs and upgrades by result.",
            "result",
            &INSTALLS,
            &self.installs,
        )?;
        let m = e.encode_descriptor(
            "ops_updater_restarts",
            "Agents restarted by the supervisor.",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(self.restarts).encode(m)?;
        let m = e.encode_descriptor(
            "ops_updater_oom_kills",
            "Agents ended by the kernel's OOM killer.",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(self.oom_kills).encode(m)?;
        by_label(
            &mut e,
            "ops_updater_self_upgrades",
            "Self-upgrades of ops-updater by result, as this worker saw them.",
            "result",
            &SELF_UPGRADES,
            &self.self_upgrades,
        )
    }
}

impl crate::artifact::ArtifactError {
    /// The failure kind of this error.
    pub fn failure(&self) -> Failure {
        use crate::artifact::ArtifactError as E;
        match self {
            E::Client(_)
            | E::Http { .. }
            | E::Status { .. }
            | E::Timeout { .. }
            | E::TooLarge { .. }
            | E::BadMd5File { .. } => Failure::Download,
            E::Checksum { .. } | E::NoChecksum { .. } => Failure::Checksum,
            E::Signature { .. } => Failure::Signature,
            E::Io { source, .. }
                if matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) =>
            {
                Failure::DiskFull
            }
            E::Io { .. }
            | E::Unsafe { .. }
            | E::Archive { .. }
            | E::Limit { .. }
            | E::NoControl { .. }
            | E::AlreadyExists { .. }
            | E::Task(_) => Failure::Unpack,
            E::Name(_) => Failure::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_show_in_the_text() {
        let m = Metrics::default();
        m.round(Protocol::BootAgent, false);
        m.install(Install::RolledBack);
        let t = m.render();
        assert!(
            t.contains("ops_updater_rounds_total{protocol=\"bootagent\",result=\"failed\"} 1"),
            "{t}"
        );
        assert!(t.contains("ops_updater_failures_total{kind=\"server_unreachable\"} 1"));
        assert!(t.contains("ops_updater_installs_total{result=\"rolled_back\"} 1"));
        assert!(t.contains("ops_updater_oom_kills_total 0"));
    }
}
