//! Counting: a latency histogram and error counts per worker (merged at the end, so the hot
//! path shares nothing), live counters for the progress line, and the final report.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::client::Failure;
use crate::wire::BadAnswer;

/// Highest latency the histogram tells apart, in microseconds (one hour); anything slower is
/// clamped to it.
const MAX_TRACKED_MICROS: u64 = 3_600_000_000;

/// The kinds of failure the report counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ErrorCounts {
    /// No connection could be made.
    pub connect: u64,
    /// No complete answer within `--timeout-ms`.
    pub timeout: u64,
    /// An HTTP status other than 2xx.
    pub status: u64,
    /// A 2xx answer that is not the protocol's JSON.
    pub body: u64,
    /// A well-formed answer refusing the report (`errorMessage`, BootAgent `status` ≠ 0).
    pub refused: u64,
    /// The connection broke mid-request.
    pub io: u64,
}

impl ErrorCounts {
    pub fn total(&self) -> u64 {
        self.connect + self.timeout + self.status + self.body + self.refused + self.io
    }

    fn add(&mut self, o: &ErrorCounts) {
        self.connect += o.connect;
        self.timeout += o.timeout;
        self.status += o.status;
        self.body += o.body;
        self.refused += o.refused;
        self.io += o.io;
    }
}

/// One worker's tally.
#[derive(Debug)]
pub struct Recorder {
    /// From the intended send time (open loop, converge) or the actual one (closed loop).
    latency: Histogram<u64>,
    /// From the moment the request was actually sent.
    service: Histogram<u64>,
    pub ok: u64,
    pub errors: ErrorCounts,
    pub status_codes: BTreeMap<u16, u64>,
    /// First error text of each kind, so a report says what went wrong, not just how often.
    pub samples: BTreeMap<&'static str, String>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

impl Recorder {
    pub fn new() -> Recorder {
        let h = || Histogram::new_with_bounds(1, MAX_TRACKED_MICROS, 3).expect("valid bounds");
        Recorder {
            latency: h(),
            service: h(),
            ok: 0,
            errors: ErrorCounts::default(),
            status_codes: BTreeMap::new(),
            samples: BTreeMap::new(),
        }
    }

    pub fn ok(&mut self, latency: Duration, service: Duration, live: &Live) {
        self.latency.saturating_record(micros(latency));
        self.service.saturating_record(micros(service));
        self.ok += 1;
        live.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub fn failure(&mut self, f: &Failure, live: &Live) {
        let (kind, text) = match f {
            Failure::Connect(e) => {
                self.errors.connect += 1;
                ("connect", e.clone())
            }
            Failure::Timeout => {
                self.errors.timeout += 1;
                ("timeout", "no answer in time".to_string())
            }
            Failure::Status(code) => {
                self.errors.status += 1;
                *self.status_codes.entry(*code).or_default() += 1;
                ("status", format!("http status {code}"))
            }
            Failure::Io(e) => {
                self.errors.io += 1;
                ("io", e.clone())
            }
        };
        self.note(kind, text, live);
    }

    pub fn bad_answer(&mut self, b: &BadAnswer, live: &Live) {
        let (kind, text) = match b {
            BadAnswer::Body(e) => {
                self.errors.body += 1;
                ("body", e.clone())
            }
            BadAnswer::Refused(e) => {
                self.errors.refused += 1;
                ("refused", e.clone())
            }
        };
        self.note(kind, text, live);
    }

    fn note(&mut self, kind: &'static str, text: String, live: &Live) {
        self.samples.entry(kind).or_insert(text);
        live.requests.fetch_add(1, Ordering::Relaxed);
        live.errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn merge(&mut self, o: &Recorder) {
        self.latency.add(&o.latency).expect("same bounds");
        self.service.add(&o.service).expect("same bounds");
        self.ok += o.ok;
        self.errors.add(&o.errors);
        for (k, v) in &o.status_codes {
            *self.status_codes.entry(*k).or_default() += v;
        }
        for (k, v) in &o.samples {
            self.samples.entry(k).or_insert_with(|| v.clone());
        }
    }

    pub fn latency(&self) -> Latency {
        Latency::of(&self.latency)
    }

    pub fn service(&self) -> Latency {
        Latency::of(&self.service)
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Latency {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            mean: h.mean() / 1000.0,
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// Counters the workers bump as they go, read once a second by the progress line.
#[derive(Debug, Default)]
pub struct Live {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub converged: AtomicU64,
    /// Converge with `--fail-share`: hosts that failed the version to the end.
    pub failed: AtomicU64,
}

/// Convergence figures of a converge run; times in seconds from the config change.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Convergence {
    pub interval_secs: f64,
    /// The version the fleet was to converge to.
    pub expect_version: String,
    /// Seconds from the start of the run to the config change (the reload, or the first
    /// answer naming the new version); `None` when it never happened.
    pub change_at_secs: Option<f64>,
    /// Hosts running the new version on every agent at the end.
    pub converged: u64,
    /// Hosts that failed the version to the end (`--fail-share`: never started, or
    /// `fatal`) and the server heard it; they never converge and the percentiles leave
    /// them out.
    pub failed: u64,
    /// Hosts neither converged nor failed when the run ended: the run stopped at
    /// `--max-duration` (a paused rollout, a slow fleet). 0 after a complete run.
    pub not_converged: u64,
    /// `--fail-share`, when given.
    pub fail_share: Option<f64>,
    /// Hosts already running it before the change (should be 0).
    pub converged_before_change: u64,
    pub t50_secs: Option<f64>,
    pub t99_secs: Option<f64>,
    pub t100_secs: Option<f64>,
}

/// Everything a run measured. `--json` prints it as is.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub mode: &'static str,
    pub protocol: &'static str,
    pub hosts: u64,
    pub agents: usize,
    pub connections: usize,
    /// Aggregate rate asked for (open loop only).
    pub target_rate: Option<f64>,
    pub duration_secs: f64,
    /// Requests completed or failed.
    pub requests: u64,
    pub ok: u64,
    pub errors: ErrorCounts,
    pub error_total: u64,
    pub status_codes: BTreeMap<u16, u64>,
    /// First message of each error kind.
    pub error_samples: BTreeMap<&'static str, String>,
    pub requests_per_sec: f64,
    /// Milliseconds; from the intended send time in the open loop and converge modes, so a
    /// stalled server cannot hide its stall (no coordinated omission).
    pub latency_ms: Latency,
    /// Milliseconds from the actual send (what the server took plus the wire).
    pub service_ms: Latency,
    /// TCP connections opened (equals `connections` when keep-alive held).
    pub connects: u64,
    pub convergence: Option<Convergence>,
}

impl Report {
    /// A human-readable summary, one fact per line.
    pub fn write_text(&self, mut w: impl std::io::Write) -> std::io::Result<()> {
        writeln!(
            w,
            "mode {} protocol {} hosts {} agents {} connections {}{}",
            self.mode,
            self.protocol,
            self.hosts,
            self.agents,
            self.connections,
            self.target_rate
                .map(|r| format!(" target {r:.0}/s"))
                .unwrap_or_default()
        )?;
        writeln!(
            w,
            "requests {} in {:.2}s: {:.0}/s, ok {}, errors {} (connect {}, timeout {}, status {}, body {}, refused {}, io {}), connects {}",
            self.requests,
            self.duration_secs,
            self.requests_per_sec,
            self.ok,
            self.error_total,
            self.errors.connect,
            self.errors.timeout,
            self.errors.status,
            self.errors.body,
            self.errors.refused,
            self.errors.io,
            self.connects
        )?;
        for (name, l) in [("latency", &self.latency_ms), ("service", &self.service_ms)] {
            writeln!(
                w,
                "{name} ms: mean {:.3} p50 {:.3} p90 {:.3} p99 {:.3} p99.9 {:.3} max {:.3}",
                l.mean, l.p50, l.p90, l.p99, l.p999, l.max
            )?;
        }
        for (kind, text) in &self.error_samples {
            writeln!(w, "first {kind} error: {text}")?;
        }
        if let Some(c) = &self.convergence {
            let t = |v: Option<f64>| {
                v.map(|s| format!("{s:.2}s"))
                    .unwrap_or_else(|| "never".into())
            };
            writeln!(
                w,
                "converge to {} (interval {}s): {} of {} hosts; 50% {} 99% {} 100% {} after the change{}",
                c.expect_version,
                c.interval_secs,
                c.converged,
                self.hosts,
                t(c.t50_secs),
                t(c.t99_secs),
                t(c.t100_secs),
                c.change_at_secs
                    .map(|s| format!(" at {s:.2}s"))
                    .unwrap_or_else(|| " (no change seen)".into())
            )?;
            if let Some(share) = c.fail_share {
                writeln!(
                    w,
                    "failing hosts (--fail-share {share}): {} failed the version and never converge; the percentiles count the {} others",
                    c.failed,
                    self.hosts.saturating_sub(c.failed)
                )?;
            }
            if c.not_converged > 0 {
                writeln!(
                    w,
                    "{} hosts had not converged when the run ended after {:.2}s (--max-duration)",
                    c.not_converged, self.duration_secs
                )?;
            }
        }
        w.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_merge() {
        let live = Live::default();
        let mut a = Recorder::new();
        let mut b = Recorder::new();
        for ms in 1..=100u64 {
            let r = if ms % 2 == 0 { &mut a } else { &mut b };
            r.ok(Duration::from_millis(ms), Duration::from_millis(1), &live);
        }
        b.failure(&Failure::Status(503), &live);
        b.failure(&Failure::Connect("refused".into()), &live);
        a.merge(&b);
        assert_eq!(a.ok, 100);
        assert_eq!(a.errors.total(), 2);
        assert_eq!(a.status_codes[&503], 1);
        assert_eq!(a.samples["connect"], "refused");
        let l = a.latency();
        assert!((l.p50 - 50.0).abs() < 0.1, "{l:?}");
        assert!((l.p99 - 99.0).abs() < 0.1, "{l:?}");
        assert!((l.max - 100.0).abs() < 0.1, "{l:?}");
        assert_eq!(live.requests.load(Ordering::Relaxed), 102);
        assert_eq!(live.errors.load(Ordering::Relaxed), 2);
    }
}
