//! `GET /metrics`: what ops-meta counts, in the Prometheus text format (0.0.4), encoded by
//! the Prometheus project's client (`prometheus-client`).
//!
//! Two kinds of numbers. Event counters (requests by endpoint and outcome, BootAgent jobs
//! by action and result) are plain atomics in statics, bumped where the event happens:
//! the protection stack ([`crate::guard`]) counts every request once, after its answer,
//! with one relaxed add and no lock or allocation, since the heartbeat is nearly all of
//! the traffic. They are process-wide (several in-process apps of a test share them).
//! Everything else (hosts by agent, version and state; pending jobs; the store's queues)
//! is read from the live state at scrape time by [`Scrape`], a collector.
//!
//! Label values hosts choose (agent names, versions, states) are bounded: states fold into
//! a small fixed set ([`state_of`]), every label value is cut and cleaned
//! ([`label_value`]), and at most [`MAX_HOST_SERIES`] label sets are written, the rest
//! summed into one `other` series, so a fleet of free-text statuses cannot blow up a
//! scrape. Adding a family (rollouts by state, say) is one more `encode_*` call in
//! [`Scrape::encode`].

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use axum::http::StatusCode;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use proto::bootagent::Action;

use crate::http::AppState;

/// The `Content-Type` of the answer.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Most `ops_meta_agent_hosts` series in one scrape; further label sets are summed into
/// the series whose agent, version and state are all `other`.
pub const MAX_HOST_SERIES: usize = 1_000;
/// Longest label value taken from what hosts report; longer ones are cut.
pub const MAX_LABEL_LEN: usize = 64;

/// What a request was for, by path (so routes added later are counted too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /heartbeat`, the legacy report.
    Heartbeat,
    /// `POST /agent/register`.
    BootRegister,
    /// `POST /agent/status`.
    BootStatus,
    /// `/api/...` and `/config/reload`.
    Operator,
    /// `/status/...`.
    StatusPages,
    /// `/metrics`, `/health`, `/version`.
    Other,
    /// Anything else: the tarball tree's fallback route.
    Files,
}

const ENDPOINTS: [&str; 7] = [
    "heartbeat",
    "bootagent_register",
    "bootagent_status",
    "operator",
    "status_pages",
    "other",
    "files",
];

impl Endpoint {
    /// The endpoint kind of a request to `path`.
    pub fn of(path: &str) -> Endpoint {
        match path {
            crate::http::HEARTBEAT_PATH => Endpoint::Heartbeat,
            "/agent/register" => Endpoint::BootRegister,
            "/agent/status" => Endpoint::BootStatus,
            "/config/reload" => Endpoint::Operator,
            "/metrics" | "/health" | "/version" => Endpoint::Other,
            p if p == "/api" || p.starts_with("/api/") => Endpoint::Operator,
            p if p.starts_with("/status/") => Endpoint::StatusPages,
            _ => Endpoint::Files,
        }
    }
}

/// How a request ended: the success classes, then the error kinds (by status code).
const OUTCOMES: [(&str, &str); 12] = [
    ("2xx", ""),
    ("3xx", ""),
    ("4xx", "bad_request"),
    ("4xx", "unauthorized"),
    ("4xx", "forbidden"),
    ("4xx", "not_found"),
    ("4xx", "timeout"),
    ("4xx", "too_large"),
    ("4xx", "too_many_requests"),
    ("4xx", "other_client"),
    ("5xx", "unavailable"),
    ("5xx", "server_error"),
];

fn outcome(status: StatusCode) -> usize {
    match status.as_u16() {
        0..=299 => 0,
        300..=399 => 1,
        400 => 2,
        401 => 3,
        403 => 4,
        404 => 5,
        408 => 6,
        413 => 7,
        429 => 8,
        503 => 10,
        500.. => 11,
        _ => 9,
    }
}

static REQUESTS: [[AtomicU64; OUTCOMES.len()]; ENDPOINTS.len()] =
    [const { [const { AtomicU64::new(0) }; OUTCOMES.len()] }; ENDPOINTS.len()];

/// Counts one answered request (the protection stack calls it once per request).
#[inline]
pub fn count_request(endpoint: Endpoint, status: StatusCode) {
    REQUESTS[endpoint as usize][outcome(status)].fetch_add(1, Relaxed);
}

/// Requests answered so far to `endpoint` with a status of class `class` (`"2xx"`...).
pub fn requests(endpoint: Endpoint, class: &str) -> u64 {
    OUTCOMES
        .iter()
        .zip(&REQUESTS[endpoint as usize])
        .filter(|((c, _), _)| *c == class)
        .map(|(_, n)| n.load(Relaxed))
        .sum()
}

const ACTIONS: [Action; 7] = [
    Action::Install,
    Action::Upgrade,
    Action::Uninstall,
    Action::Restart,
    Action::Stop,
    Action::Config,
    Action::Reset,
];

fn action_index(a: Action) -> usize {
    ACTIONS.iter().position(|x| *x == a).unwrap_or(0)
}

/// How a BootAgent job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobEnd {
    /// The host reported errcode 0.
    Ok,
    /// The host reported another errcode.
    Failed,
    /// The desired state changed before a result came back.
    Superseded,
}

const JOB_ENDS: [&str; 3] = ["ok", "failed", "superseded"];
/// Where a job came from: derived from the desired state, or an operator's batch.
const JOB_ORIGINS: [&str; 2] = ["derived", "operator"];

static JOBS_QUEUED: [[AtomicU64; JOB_ORIGINS.len()]; ACTIONS.len()] =
    [const { [const { AtomicU64::new(0) }; JOB_ORIGINS.len()] }; ACTIONS.len()];
static JOBS_FINISHED: [[AtomicU64; JOB_ENDS.len()]; ACTIONS.len()] =
    [const { [const { AtomicU64::new(0) }; JOB_ENDS.len()] }; ACTIONS.len()];

/// Counts a job queued for a host (`operator`: from an operator's batch).
pub fn job_queued(action: Action, operator: bool) {
    JOBS_QUEUED[action_index(action)][operator as usize].fetch_add(1, Relaxed);
}

/// Counts a job that ended.
pub fn job_finished(action: Action, end: JobEnd) {
    JOBS_FINISHED[action_index(action)][end as usize].fetch_add(1, Relaxed);
}

/// The state label of an agent's reported status: BootAgent's states and the legacy
/// `started`/`stoped` (`stopped` too) as they are, any other text (an error message,
/// usually) as `other`.
pub fn state_of(status: &str) -> &'static str {
    match status {
        proto::legacy::STATUS_STARTED => "started",
        proto::bootagent::STATE_RUNNING => "running",
        s if proto::legacy::is_stopped_status(s) => "stoped",
        proto::bootagent::STATE_FATAL => "fatal",
        proto::bootagent::STATE_KILLED => "killed",
        _ => "other",
    }
}

/// A host-reported text as a label value: at most [`MAX_LABEL_LEN`] characters, each one
/// outside `[A-Za-z0-9._+~-]` replaced by `_`; empty as `none`.
pub fn label_value(s: &str) -> String {
    if s.is_empty() {
        return "none".into();
    }
    s.chars()
        .take(MAX_LABEL_LEN)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '~' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The states `ops_meta_agent_hosts` shows ([`state_of`]).
const STATES: [&str; 6] = ["started", "running", "stoped", "fatal", "killed", "other"];
/// The protocols of `ops_meta_agent_hosts`.
const PROTOCOLS: [&str; 2] = ["legacy", "bootagent"];
/// Most distinct (agent, version) texts one scrape counts apart; hosts reporting further
/// ones are counted under `other`, so that counting stays bounded in memory too.
pub const MAX_COUNTED_PAIRS: usize = 65_536;

/// A protocol of [`HostCounts::add`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Legacy,
    BootAgent,
}

/// Hosts by (protocol, agent, version, state), counted from the live state: the texts as
/// reported (looked up without allocating; a new pair is copied once), cleaned into label
/// values only when the series are written.
#[derive(Debug, Default)]
pub struct HostCounts {
    raw: [HashMap<String, HashMap<String, [u64; STATES.len()]>>; PROTOCOLS.len()],
    pairs: usize,
}

impl HostCounts {
    /// Counts one host's report of one agent.
    pub fn add(&mut self, protocol: Protocol, agent: &str, version: &str, status: &str) {
        let state = STATES
            .iter()
            .position(|s| *s == state_of(status))
            .unwrap_or(STATES.len() - 1);
        let (agent, version) = if self.pairs < MAX_COUNTED_PAIRS
            || self.raw[protocol as usize]
                .get(agent)
                .is_some_and(|v| v.contains_key(version))
        {
            (agent, version)
        } else {
            ("other", "other")
        };
        let agents = &mut self.raw[protocol as usize];
        if !agents.contains_key(agent) {
            agents.insert(agent.to_string(), HashMap::new());
        }
        let versions = agents.get_mut(agent).expect("inserted above");
        if !versions.contains_key(version) {
            versions.insert(version.to_string(), [0; STATES.len()]);
            self.pairs += 1;
        }
        versions.get_mut(version).expect("inserted above")[state] += 1;
    }

    /// The series to write: the [`MAX_HOST_SERIES`]` - 1` largest, then one series whose
    /// labels are all `other` with the rest (when there is a rest), in a stable order.
    pub fn series(self) -> Vec<([(&'static str, String); 4], u64)> {
        let mut cleaned: HashMap<(usize, String, String, usize), u64> = HashMap::new();
        for (p, agents) in self.raw.into_iter().enumerate() {
            for (agent, versions) in agents {
                for (version, counts) in versions {
                    for (state, n) in counts.into_iter().enumerate().filter(|(_, n)| *n > 0) {
                        let key = (p, label_value(&agent), label_value(&version), state);
                        *cleaned.entry(key).or_default() += n;
                    }
                }
            }
        }
        let mut all: Vec<_> = cleaned.into_iter().collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let rest: u64 = all.iter().skip(MAX_HOST_SERIES - 1).map(|(_, n)| n).sum();
        all.truncate(MAX_HOST_SERIES - 1);
        all.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out: Vec<_> = all
            .into_iter()
            .map(|((p, a, v, s), n)| {
                (
                    [
                        ("protocol", PROTOCOLS[p].to_string()),
                        ("agent", a),
                        ("version", v),
                        ("state", STATES[s].to_string()),
                    ],
                    n,
                )
            })
            .collect();
        if rest > 0 {
            out.push((
                [
                    ("protocol", "other".into()),
                    ("agent", "other".into()),
                    ("version", "other".into()),
                    ("state", "other".into()),
                ],
                rest,
            ));
        }
        out
    }
}

/// What one scrape reads from the live state, taken before encoding.
#[derive(Debug)]
pub struct Scrape {
    backend: &'static str,
    queued_hosts: i64,
    write_lag_secs: f64,
    rows_written: u64,
    write_failures: u64,
    seen_queued_hosts: i64,
    seen_written: u64,
    reports_in_memory: u64,
    reports_in_store: u64,
    hosts: u64,
    boot_hosts: u64,
    connections_open: u64,
    connections_max: u64,
    connections_saturated: u64,
    agent_hosts: Vec<([(&'static str, String); 4], u64)>,
    jobs_pending: [u64; ACTIONS.len()],
    rollout_states: std::collections::HashMap<String, u64>,
    rollout_waves: Vec<crate::rollout::view::WaveMetric>,
}

impl Scrape {
    /// Reads everything from `st`; walks every known host (legacy and BootAgent) once, so
    /// it is run off the async workers.
    pub fn take(st: &AppState) -> Scrape {
        let lag = &st.behind.lag;
        let seen = st.boot.seen_lag();
        let mut counts = HostCounts::default();
        let mut jobs_pending = [0u64; ACTIONS.len()];
        let boot_hosts = st.boot.registry.hostnames(|_| true);
        for h in &boot_hosts {
            st.boot.registry.read(h.as_str(), |rec| {
                for a in rec.report.iter().flat_map(|r| &r.agents) {
                    counts.add(Protocol::BootAgent, &a.name, &a.version, &a.status);
                }
                for p in rec.jobs.pending() {
                    jobs_pending[action_index(p.job.action)] += 1;
                }
            });
        }
        // BootAgent hosts are in the fleet store too (their reports in legacy terms, for
        // the status pages): counted once, above, with their own states.
        let boot: HashSet<&str> = boot_hosts.iter().map(|h| h.as_str()).collect();
        st.store.for_each_agent(&mut |host, name, version, status| {
            if boot.is_empty() || !boot.contains(host) {
                counts.add(Protocol::Legacy, name, version, status);
            }
        });
        let (rollout_states, rollout_waves) = st.rollouts.metrics();
        Scrape {
            rollout_states,
            rollout_waves,
            backend: st.durable.kind(),
            queued_hosts: lag.queued.load(Relaxed).max(0),
            write_lag_secs: lag.last_lag_ms.load(Relaxed) as f64 / 1000.0,
            rows_written: lag.written.load(Relaxed),
            write_failures: lag.failures.load(Relaxed) + seen.failures.load(Relaxed),
            seen_queued_hosts: seen.queued.load(Relaxed).max(0),
            seen_written: seen.written.load(Relaxed),
            reports_in_memory: st.boot.reports_in_memory.load(Relaxed),
            reports_in_store: st.boot.reports_in_store.load(Relaxed),
            hosts: st.store.host_count() as u64,
            boot_hosts: st.boot.registry.len() as u64,
            connections_open: st.connections.open() as u64,
            connections_max: st.connections.max() as u64,
            connections_saturated: st.connections.saturated.load(Relaxed),
            agent_hosts: counts.series(),
            jobs_pending,
        }
    }

    /// The scrape in the text format.
    pub fn render(self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
            .expect("writing to a String does not fail");
        out
    }
}

/// A gauge of a count (written as an integer, as before the move to this crate).
fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(v).encode(m)
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(v).encode(m)
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let mut m = e.encode_descriptor(
            "ops_meta_store_info",
            "The fleet store's durable backend (always 1).",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(1i64).encode(m.encode_family(&[("backend", self.backend)])?)?;
        gauge(
            &mut e,
            "ops_meta_store_queue_hosts",
            "Hosts whose changed legacy report waits in the write-behind queue.",
            self.queued_hosts,
        )?;
        let m = e.encode_descriptor(
            "ops_meta_store_write_lag_seconds",
            "Age of the oldest report in the last write-behind batch when it was written.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(self.write_lag_secs).encode(m)?;
        counter(
            &mut e,
            "ops_meta_store_rows_written",
            "Host rows the write-behind queue wrote to the store.",
            self.rows_written,
        )?;
        counter(
            &mut e,
            "ops_meta_store_write_failures",
            "Write-behind batches the store refused (retried).",
            self.write_failures,
        )?;
        gauge(
            &mut e,
            "ops_meta_store_seen_queue_hosts",
            "BootAgent hosts whose last-seen time waits to be written.",
            self.seen_queued_hosts,
        )?;
        counter(
            &mut e,
            "ops_meta_store_seen_written",
            "BootAgent last-seen times written to the store.",
            self.seen_written,
        )?;
        let mut m = e.encode_descriptor(
            "ops_meta_bootagent_reports",
            "BootAgent status reports by path: answered from memory, or written to the store.",
            None,
            MetricType::Counter,
        )?;
        for (path, n) in [
            ("memory", self.reports_in_memory),
            ("store", self.reports_in_store),
        ] {
            ConstCounter::new(n).encode(m.encode_family(&[("path", path)])?)?;
        }
        gauge(
            &mut e,
            "ops_meta_hosts",
            "Legacy hosts known.",
            self.hosts as i64,
        )?;
        gauge(
            &mut e,
            "ops_meta_bootagent_hosts",
            "BootAgent hosts registered.",
            self.boot_hosts as i64,
        )?;
        let mut m = e.encode_descriptor(
            "ops_meta_agent_hosts",
            "Hosts by protocol and the agent, version and state they last reported.",
            None,
            MetricType::Gauge,
        )?;
        for (labels, n) in &self.agent_hosts {
            ConstGauge::new(*n as i64).encode(m.encode_family(labels)?)?;
        }
        let mut m = e.encode_descriptor(
            "ops_meta_bootagent_jobs_queued",
            "BootAgent jobs queued for hosts, by action and origin.",
            None,
            MetricType::Counter,
        )?;
        for (a, row) in ACTIONS.iter().zip(&JOBS_QUEUED) {
            for (origin, n) in JOB_ORIGINS.iter().zip(row) {
                let labels = [("action", a.as_str()), ("origin", origin)];
                ConstCounter::new(n.load(Relaxed)).encode(m.encode_family(&labels)?)?;
            }
        }
        let mut m = e.encode_descriptor(
            "ops_meta_bootagent_jobs_finished",
            "BootAgent jobs that ended, by action and result.",
            None,
            MetricType::Counter,
        )?;
        for (a, row) in ACTIONS.iter().zip(&JOBS_FINISHED) {
            for (end, n) in JOB_ENDS.iter().zip(row) {
                let labels = [("action", a.as_str()), ("result", end)];
                ConstCounter::new(n.load(Relaxed)).encode(m.encode_family(&labels)?)?;
            }
        }
        let mut m = e.encode_descriptor(
            "ops_meta_bootagent_jobs_pending",
            "BootAgent jobs waiting for a host's result, by action.",
            None,
            MetricType::Gauge,
        )?;
        for (a, n) in ACTIONS.iter().zip(&self.jobs_pending) {
            ConstGauge::new(*n as i64).encode(m.encode_family(&[("action", a.as_str())])?)?;
        }
        let mut m = e.encode_descriptor(
            "ops_meta_requests",
            "Requests answered, by endpoint kind and status code class.",
            None,
            MetricType::Counter,
        )?;
        for (i, endpoint) in ENDPOINTS.iter().enumerate() {
            for class in ["2xx", "3xx", "4xx", "5xx"] {
                let n: u64 = OUTCOMES
                    .iter()
                    .zip(&REQUESTS[i])
                    .filter(|((c, _), _)| *c == class)
                    .map(|(_, n)| n.load(Relaxed))
                    .sum();
                let labels = [("endpoint", *endpoint), ("code", class)];
                ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
            }
        }
        let mut m = e.encode_descriptor(
            "ops_meta_request_errors",
            "Requests answered with an error, by endpoint kind and error kind.",
            None,
            MetricType::Counter,
        )?;
        for (i, endpoint) in ENDPOINTS.iter().enumerate() {
            for ((_, kind), n) in OUTCOMES.iter().zip(&REQUESTS[i]).skip(2) {
                let labels = [("endpoint", *endpoint), ("kind", *kind)];
                ConstCounter::new(n.load(Relaxed)).encode(m.encode_family(&labels)?)?;
            }
        }
        gauge(
            &mut e,
            "ops_meta_connections_open",
            "Connections open now.",
            self.connections_open as i64,
        )?;
        gauge(
            &mut e,
            "ops_meta_connections_max",
            "The most connections open at once (maxConnections).",
            self.connections_max as i64,
        )?;
        counter(
            &mut e,
            "ops_meta_connections_saturated",
            "Times the accept loop found maxConnections connections open.",
            self.connections_saturated,
        )?;
        let mut m = e.encode_descriptor(
            "ops_meta_rollouts",
            "Rollouts by state.",
            None,
            MetricType::Gauge,
        )?;
        for state in [
            proto::rollout::STATE_PLANNED,
            proto::rollout::STATE_RUNNING,
            proto::rollout::STATE_PAUSED,
            proto::rollout::STATE_COMPLETED,
            proto::rollout::STATE_ABORTED,
            proto::rollout::STATE_ROLLED_BACK,
            proto::rollout::STATE_SUPERSEDED,
        ] {
            let n = self.rollout_states.get(state).copied().unwrap_or(0);
            ConstGauge::new(n as i64).encode(m.encode_family(&[("state", state)])?)?;
        }
        let mut m = e.encode_descriptor(
            "ops_meta_rollout_hosts",
            "Hosts of each wave of the newest rollouts in effect, by phase.",
            None,
            MetricType::Gauge,
        )?;
        for w in &self.rollout_waves {
            let labels = [
                ("rollout", w.rollout.as_str()),
                ("agent", w.agent.as_str()),
                ("version", w.version.as_str()),
                ("wave", w.wave.as_str()),
                ("phase", w.phase),
            ];
            ConstGauge::new(w.hosts as i64).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_by_path() {
        assert_eq!(Endpoint::of("/heartbeat"), Endpoint::Heartbeat);
        assert_eq!(Endpoint::of("/agent/status"), Endpoint::BootStatus);
        assert_eq!(Endpoint::of("/api/jobs/x"), Endpoint::Operator);
        assert_eq!(Endpoint::of("/status/json/a"), Endpoint::StatusPages);
        assert_eq!(Endpoint::of("/metrics"), Endpoint::Other);
        assert_eq!(Endpoint::of("/a/1.0/a-1.0.tar.gz"), Endpoint::Files);
    }

    #[test]
    fn states_fold_into_a_small_set() {
        assert_eq!(state_of("started"), "started");
        assert_eq!(state_of("stopped"), "stoped");
        assert_eq!(state_of("fatal"), "fatal");
        assert_eq!(state_of("exec format error"), "other");
        assert_eq!(label_value("1.0 \"x\"\n"), "1.0__x__");
        assert_eq!(label_value(""), "none");
        assert_eq!(label_value(&"v".repeat(500)).len(), MAX_LABEL_LEN);
    }

    #[test]
    fn host_series_are_capped_with_an_other_bucket() {
        let mut c = HostCounts::default();
        for i in 0..5_000 {
            c.add(Protocol::Legacy, "a", &format!("1.{i}"), "started");
        }
        c.add(Protocol::Legacy, "a", "1.0", "started");
        let s = c.series();
        assert_eq!(s.len(), MAX_HOST_SERIES);
        assert_eq!(s.iter().map(|(_, n)| n).sum::<u64>(), 5_001);
        let other = s.last().unwrap();
        assert_eq!(other.0[1].1, "other");
        assert_eq!(other.1, 5_001 - 2 - (MAX_HOST_SERIES as u64 - 2));
        assert!(s.iter().any(|(l, n)| l[2].1 == "1.0" && *n == 2));
    }

    #[test]
    fn texts_that_clean_alike_are_one_series_and_counting_is_bounded() {
        let mut c = HostCounts::default();
        c.add(Protocol::BootAgent, "a", "1 0", "running");
        c.add(Protocol::BootAgent, "a", "1/0", "running");
        c.add(Protocol::BootAgent, "a", "1/0", "disk full");
        let s = c.series();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].0[2].1, "1_0");
        assert_eq!((s[0].0[3].1.as_str(), s[0].1), ("running", 2));
        assert_eq!((s[1].0[3].1.as_str(), s[1].1), ("other", 1));

        let mut c = HostCounts::default();
        for i in 0..MAX_COUNTED_PAIRS + 10 {
            c.add(Protocol::Legacy, &format!("x{i}"), "1", "started");
        }
        // Known pairs are still counted apart past the bound.
        c.add(Protocol::Legacy, "x0", "1", "started");
        assert_eq!(c.pairs, MAX_COUNTED_PAIRS + 1);
        let s = c.series();
        assert_eq!(s.len(), MAX_HOST_SERIES);
        assert_eq!(
            s.iter().map(|(_, n)| n).sum::<u64>(),
            MAX_COUNTED_PAIRS as u64 + 11
        );
        assert!(s.iter().any(|(l, n)| l[1].1 == "x0" && *n == 2));
    }
}
