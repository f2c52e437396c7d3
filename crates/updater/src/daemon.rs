//! The main loop: one heartbeat round every interval. A round reads the real state of every
//! agent, sends it to the server, and hands each agent's desired state to that agent's
//! worker ([`crate::agent`]); it never waits for a worker's action to finish.
//!
//! Timing: the first round waits a random time in `[0, interval)` (capped by
//! `firstDelayMaxMs`) so a fleet started together does not hit the server at once; then one
//! round per interval, spread by `jitterPercent`; after a failed heartbeat, exponential
//! back-off with jitter, capped at the interval.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use proto::legacy::{HeartbeatRequest, HeartbeatResponse, RealAgent};
use proto::names::AgentName;
use rand::Rng;
use tokio::time::Instant;

use crate::config::Resolved;
use crate::engine::{self, Desired, DesiredError, Engine};
use crate::heartbeat::{self, HeartbeatError};
use crate::state::{now_unix, Shared};

/// Most agents handled on one host; more folders or desired entries are ignored and logged.
pub const MAX_AGENTS: usize = 256;
/// First delay after a failed heartbeat; doubled per failure up to the interval.
pub const HEARTBEAT_RETRY_BASE: Duration = Duration::from_secs(1);
/// Longest the round waits for one agent's `control status` before reporting the last
/// status known for it.
pub const STATUS_WAIT: Duration = Duration::from_secs(2);
/// Longest the daemon waits at shutdown for switches in progress to finish.
pub const SHUTDOWN_GRACE_MAX_SECS: u64 = 300;
/// Most time a SIGTERM'd control script gets before SIGKILL.
pub const CONTROL_GRACE: Duration = Duration::from_secs(5);

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Heartbeat(#[from] HeartbeatError),
    #[error("download client: {0}")]
    Artifact(#[from] crate::artifact::ArtifactError),
    #[error("workdir {path}: {source}")]
    Workdir {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The events of the main loop.
enum Event {
    Round,
    Shutdown,
}

/// What the round decided to do with the server's answer.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dispatch {
    /// Desired states to hand to workers, one per agent.
    pub desired: Vec<Desired>,
    /// Entries skipped, with why (logged, rate-limited).
    pub skipped: Vec<Skipped>,
    /// The server's `errorMessage`, when non-empty (then `desired` is empty).
    pub server_error: Option<String>,
    /// The desired version of ops-updater itself (the reserved agent name), if listed.
    pub self_desired: Option<Desired>,
}

/// One entry of an answer that was not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The entry's name as sent (possibly invalid), for rate-limiting.
    pub agent: String,
    /// A fixed word for why, the other half of the rate-limiting key.
    pub reason: &'static str,
    /// The line logged.
    pub message: String,
}

impl Skipped {
    fn new(agent: &str, reason: &'static str, message: String) -> Skipped {
        Skipped {
            agent: crate::logcap::cut(agent, 128).to_string(),
            reason,
            message,
        }
    }
}

/// Turns a heartbeat answer into work: a non-empty `errorMessage` means nothing this round;
/// entries with bad names, URLs or cmds are skipped; with `filter` set only that agent is
/// kept (ops-updater's own entry, [`proto::names::SELF_AGENT`], always is, apart); a name
/// listed twice keeps its first entry. Pure, for unit tests.
pub fn dispatch(resp: &HeartbeatResponse, filter: &str) -> Dispatch {
    let mut out = Dispatch::default();
    if !resp.error_message.is_empty() {
        out.server_error = Some(resp.error_message.chars().take(500).collect());
        return out;
    }
    for d in &resp.desired_agents {
        if d.name == proto::names::SELF_AGENT {
            match Desired::from_wire(d) {
                Ok(d) if out.self_desired.is_none() => out.self_desired = Some(d),
                Ok(_) => {}
                Err(e) => out.skipped.push(Skipped::new(
                    &d.name,
                    "invalid desired agent",
                    format!("skipping desired agent: {e}"),
                )),
            }
            continue;
        }
        if !filter.is_empty() && d.name != filter {
            continue;
        }
        match Desired::from_wire(d) {
            Ok(d) => {
                if out.desired.iter().any(|x| x.name == d.name) {
                    out.skipped.push(Skipped::new(
                        d.name.as_str(),
                        "listed twice",
                        format!("agent {:?}: listed twice, later entry ignored", d.name),
                    ));
                } else if out.desired.len() >= MAX_AGENTS {
                    out.skipped.push(Skipped::new(
                        d.name.as_str(),
                        "too many agents",
                        format!("agent {:?}: more than {MAX_AGENTS} agents, ignored", d.name),
                    ));
                } else {
                    out.desired.push(d);
                }
            }
            Err(e @ DesiredError::UnknownCmd { .. }) => {
                out.skipped
                    .push(Skipped::new(&d.name, "unknown cmd", e.to_string()))
            }
            Err(e) => out.skipped.push(Skipped::new(
                &d.name,
                "invalid desired agent",
                format!("skipping desired agent: {e}"),
            )),
        }
    }
    out
}

/// The wait after a good round: `interval` spread by ± `jitter_percent`, `r` in [0, 1).
pub fn next_interval(interval: Duration, jitter_percent: u64, r: f64) -> Duration {
    let j = (jitter_percent.min(50) as f64) / 100.0;
    interval.mul_f64(1.0 + j * (2.0 * r.clamp(0.0, 1.0) - 1.0))
}

/// The wait after `failures` failed heartbeats in a row: exponential from 1 s with jitter,
/// never more than the interval.
pub fn heartbeat_backoff(failures: u32, interval: Duration, r: f64) -> Duration {
    engine::backoff_delay(failures, HEARTBEAT_RETRY_BASE.min(interval), interval, r)
}

/// The daemon: config, shared state, HTTP clients and one worker per agent.
pub struct Daemon {
    cfg: Resolved,
    shared: Shared,
    client: heartbeat::Client,
    engine: Arc<Engine>,
    /// Rate limit of the lines about what the server sent.
    log: crate::logcap::Limiter,
}

impl Daemon {
    /// The legacy daemon acting through `engine` (shared with BootAgent mode in `auto`).
    pub fn new(cfg: Resolved, shared: Shared, engine: Arc<Engine>) -> Result<Daemon, DaemonError> {
        let c = &cfg.config;
        std::fs::create_dir_all(&cfg.workdir).map_err(|source| DaemonError::Workdir {
            path: cfg.workdir.display().to_string(),
            source,
        })?;
        let client = heartbeat::Client::new(
            &cfg.heartbeat_url,
            Duration::from_secs(c.heartbeat_timeout_secs),
            c.max_response_bytes,
            heartbeat::Tls::of(c),
        )?;
        Ok(Daemon {
            cfg,
            shared,
            client,
            engine,
            log: crate::logcap::Limiter::new(),
        })
    }

    /// Runs rounds until `shutdown` resolves. The agents' actors go on (the caller stops
    /// them, [`Engine::shutdown`]); agents themselves keep running.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let c = &self.cfg.config;
        let interval = c.interval();
        let first_cap = match c.first_delay_max_ms {
            Some(ms) => Duration::from_millis(ms).min(interval),
            None => interval,
        };
        let mut first = first_cap.mul_f64(rand::thread_rng().gen_range(0.0..1.0));
        // Right after a self-upgrade: the round the previous process had scheduled.
        if let Some(due) = crate::selfup::handed_over_round(interval) {
            first = due;
        }
        tracing::info!(
            host = %self.cfg.hostname, server = %self.cfg.heartbeat_url,
            workdir = %self.cfg.workdir.display(), first_in = ?first, "ops-updater running"
        );
        // Existing agents get their workers (and their leftovers cleaned) before any round.
        self.scan_agents();
        let mut next = Instant::now() + first;
        let mut failures: u32 = 0;
        tokio::pin!(shutdown);
        loop {
            let ev = tokio::select! {
                _ = &mut shutdown => Event::Shutdown,
                _ = tokio::time::sleep_until(next) => Event::Round,
            };
            match ev {
                Event::Shutdown => break,
                Event::Round => {
                    let r: f64 = rand::thread_rng().gen_range(0.0..1.0);
                    let wait = if self.round().await {
                        failures = 0;
                        next_interval(interval, self.cfg.config.jitter_percent, r)
                    } else {
                        failures = failures.saturating_add(1);
                        heartbeat_backoff(failures, interval, r)
                    };
                    next = Instant::now() + wait;
                    if let Some(s) = &self.engine.ctx().selfup {
                        s.next_round_at(next);
                    }
                }
            }
        }
    }

    /// The agents under the workdir ([`crate::workdir::agent_names`]), filtered.
    fn scan_agents(&mut self) -> Vec<AgentName> {
        let mut names = crate::workdir::agent_names(
            &self.cfg.workdir,
            &self.engine.ctx().own,
            &self.cfg.config.desired_agent,
        );
        if names.len() > MAX_AGENTS {
            tracing::warn!(
                found = names.len(),
                max = MAX_AGENTS,
                "too many agent folders; ignoring the rest"
            );
            names.truncate(MAX_AGENTS);
        }
        for n in &names {
            self.engine.agent(n);
        }
        names
    }

    /// Reads every agent's status at once. Each read runs in its own task and the round
    /// waits for it at most [`STATUS_WAIT`] (or the status timeout, if shorter): a script
    /// that takes longer keeps running in the background (until the status timeout kills
    /// it), its result is kept for the next round, and this round reports the last status
    /// known for that agent. A hung script thus never holds up the heartbeat.
    async fn collect(&mut self, names: &[AgentName]) -> Vec<RealAgent> {
        let wait = STATUS_WAIT.min(self.engine.ctx().status.timeout);
        self.engine
            .collect(names, wait)
            .await
            .into_iter()
            .map(|c| c.real)
            .collect()
    }

    /// One round; false when the heartbeat failed. Its lines about the server's answer go
    /// through the rate limiter, summarised at the end.
    async fn round(&mut self) -> bool {
        crate::tls::warn_insecure(self.cfg.config.tls_insecure);
        let ok = self.round_inner().await;
        self.log.finish_round();
        ok
    }

    async fn round_inner(&mut self) -> bool {
        let names = self.scan_agents();
        let mut real = self.collect(&names).await;
        let selfup = self.engine.ctx().selfup.clone();
        if let Some(s) = &selfup {
            real.push(s.real_agent());
        }
        let req = HeartbeatRequest {
            hostname: self.cfg.hostname.clone(),
            real_agents: real,
        };
        if self.cfg.config.debug {
            tracing::debug!(request = %serde_json::to_string(&req).unwrap_or_default(), "heartbeat request");
        }
        let resp = match self
            .client
            .send_with_events(&req, self.shared.events())
            .await
        {
            Ok(a) => {
                for (i, s) in a.skipped.iter().enumerate() {
                    self.log.warn(
                        "malformed desired agent",
                        &i.to_string(),
                        &format!("skipping desired agent: {s}"),
                    );
                }
                a.response
            }
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat failed");
                self.shared
                    .metrics()
                    .round(crate::metrics::Protocol::Legacy, false);
                self.shared.daemon(|d| {
                    d.heartbeats_failed += 1;
                    d.last_heartbeat_error = Some(e.to_string());
                });
                return false;
            }
        };
        if self.cfg.config.debug {
            // Cut: the answer is the server's, of any size up to maxResponseBytes.
            let text = serde_json::to_string(&resp).unwrap_or_default();
            tracing::debug!(response = %crate::logcap::cut_line(&crate::redact(&text)), "heartbeat response");
        }
        let plan = dispatch(&resp, &self.cfg.config.desired_agent);
        self.shared
            .metrics()
            .round(crate::metrics::Protocol::Legacy, true);
        self.shared.daemon(|d| {
            d.heartbeats_ok += 1;
            d.last_heartbeat_at = Some(now_unix());
            d.last_heartbeat_error = None;
            d.server_error = plan.server_error.clone();
        });
        if let Some(e) = &plan.server_error {
            self.log.warn(
                "server error",
                "",
                &format!("server returned an error; doing nothing this round: {e}"),
            );
            return true;
        }
        for s in &plan.skipped {
            self.log.warn(s.reason, &s.agent, &s.message);
        }
        for d in plan.desired {
            tracing::debug!(agent = %d.name, version = %d.version, cmd = ?d.cmd, "desired");
            self.engine.agent(&d.name).desire(d);
        }
        if let Some(s) = &selfup {
            s.round_ok();
            if let Some(d) = plan.self_desired {
                if let crate::selfup::Outcome::Refused(why) = s.desire(d) {
                    self.log
                        .warn("self-upgrade refused", proto::names::SELF_AGENT, &why);
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::legacy::DesiredAgent;

    fn da(name: &str, version: &str, cmd: &str) -> DesiredAgent {
        DesiredAgent {
            name: name.into(),
            version: version.into(),
            tarball: "http://m:1/t".into(),
            md5: String::new(),
            cmd: cmd.into(),
            sha256: None,
            envs: None,
            limits: None,
        }
    }

    fn names(d: &Dispatch) -> Vec<&str> {
        d.desired.iter().map(|x| x.name.as_str()).collect()
    }

    #[test]
    fn error_message_means_nothing_this_round() {
        let r = HeartbeatResponse {
            error_message: "host blocked".into(),
            desired_agents: vec![da("a", "1", "start")],
        };
        let d = dispatch(&r, "");
        assert!(d.desired.is_empty());
        assert_eq!(d.server_error.as_deref(), Some("host blocked"));
    }

    #[test]
    fn bad_entries_are_skipped_and_the_rest_kept() {
        let r = HeartbeatResponse {
            error_message: String::new(),
            desired_agents: vec![
                da("../evil", "1", "start"),
                da("a", "../../1", "start"),
                da("b", "1", "restart"),
                da("c", "1", "start"),
                da("d", "2", "stop"),
                da("c", "9", "start"),
            ],
        };
        let d = dispatch(&r, "");
        assert_eq!(names(&d), ["c", "d"]);
        assert_eq!(d.desired[0].version, "1");
        assert_eq!(d.skipped.len(), 4, "{:?}", d.skipped);
        assert!(d.skipped.iter().any(|s| s.message.contains("unknown cmd")));
        assert!(d.skipped.iter().any(|s| s.reason == "listed twice"));
    }

    #[test]
    fn filter_keeps_one_agent() {
        let r = HeartbeatResponse {
            error_message: String::new(),
            desired_agents: vec![da("a", "1", "start"), da("b", "1", "start")],
        };
        assert_eq!(names(&dispatch(&r, "b")), ["b"]);
        assert_eq!(names(&dispatch(&r, "zzz")), Vec::<&str>::new());
        assert_eq!(
            names(&dispatch(&HeartbeatResponse::default(), "")),
            Vec::<&str>::new()
        );
    }

    #[test]
    fn intervals_and_backoff_stay_in_bounds() {
        let i = Duration::from_secs(100);
        assert_eq!(next_interval(i, 10, 0.0), Duration::from_secs(90));
        assert_eq!(next_interval(i, 10, 0.5), Duration::from_secs(100));
        assert!(next_interval(i, 10, 0.999) < Duration::from_secs(110));
        assert_eq!(next_interval(i, 0, 0.9), i);
        assert_eq!(heartbeat_backoff(1, i, 0.0), Duration::from_millis(500));
        assert_eq!(heartbeat_backoff(3, i, 0.0), Duration::from_secs(2));
        for f in 1..100 {
            assert!(heartbeat_backoff(f, i, 0.999) <= i);
        }
        // An interval below a second caps the back-off too.
        let short = Duration::from_millis(300);
        assert!(heartbeat_backoff(5, short, 0.999) <= short);
    }
}
