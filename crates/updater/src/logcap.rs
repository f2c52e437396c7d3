//! Rate-limited warnings about what a server sends, so that a hostile or broken server
//! cannot fill the host's disk through the log. Used by the legacy round and the BootAgent
//! round alike ([`Limiter`]).
//!
//! Rules: a line about one (agent, reason) is logged at most once per [`WINDOW`]; at most
//! [`LINES_PER_REASON`] lines of one reason are logged per window, whatever the agents;
//! each line is cut at [`MAX_LINE`] bytes. What is held back is counted and summarised
//! once at the end of the round ("… and 39,999 more like it"), as a warning when lines of
//! that reason were logged this round or no summary was logged this window, else at debug
//! level. A round thus logs at most a few lines per reason, whatever the server sends.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tokio::time::Instant;

/// How long a line about one (agent, reason) keeps others like it quiet.
pub const WINDOW: Duration = Duration::from_secs(600);
/// Most lines of one reason logged per [`WINDOW`].
pub const LINES_PER_REASON: usize = 5;
/// Longest line logged, in bytes; the rest is cut.
pub const MAX_LINE: usize = 512;
/// Most (agent, reason) pairs remembered; beyond it the per-reason cap still holds.
pub const MAX_KEYS: usize = 4096;

#[derive(Debug, Default)]
struct Reason {
    window_start: Option<Instant>,
    logged_in_window: usize,
    logged_this_round: usize,
    held_this_round: u64,
    summary_at: Option<Instant>,
}

/// One summary line due at the end of a round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub reason: &'static str,
    pub held: u64,
    /// Logged as a warning (else at debug level).
    pub loud: bool,
}

/// The rate limiter of one round loop; see the module docs.
#[derive(Debug, Default)]
pub struct Limiter {
    keys: HashMap<(&'static str, String), Instant>,
    reasons: BTreeMap<&'static str, Reason>,
}

impl Limiter {
    pub fn new() -> Limiter {
        Limiter::default()
    }

    /// Whether a line about (`agent`, `reason`) may be logged now; counts it if not.
    pub fn admit(&mut self, now: Instant, reason: &'static str, agent: &str) -> bool {
        let r = self.reasons.entry(reason).or_default();
        if r.window_start
            .is_none_or(|t| now.duration_since(t) >= WINDOW)
        {
            r.window_start = Some(now);
            r.logged_in_window = 0;
        }
        let key = (reason, cut(agent, 128).to_string());
        let recent = self
            .keys
            .get(&key)
            .is_some_and(|t| now.duration_since(*t) < WINDOW);
        if recent || r.logged_in_window >= LINES_PER_REASON {
            r.held_this_round += 1;
            return false;
        }
        r.logged_in_window += 1;
        r.logged_this_round += 1;
        if self.keys.len() >= MAX_KEYS {
            self.keys.retain(|_, t| now.duration_since(*t) < WINDOW);
        }
        if self.keys.len() < MAX_KEYS {
            self.keys.insert(key, now);
        }
        true
    }

    /// Ends a round: the summaries due, and the round's counts reset.
    pub fn end_round(&mut self, now: Instant) -> Vec<Summary> {
        let mut out = Vec::new();
        for (reason, r) in &mut self.reasons {
            if r.held_this_round > 0 {
                let loud = r.logged_this_round > 0
                    || r.summary_at.is_none_or(|t| now.duration_since(t) >= WINDOW);
                if loud {
                    r.summary_at = Some(now);
                }
                out.push(Summary {
                    reason,
                    held: r.held_this_round,
                    loud,
                });
            }
            r.held_this_round = 0;
            r.logged_this_round = 0;
        }
        out
    }

    /// Logs `message` as a warning about (`agent`, `reason`) if [`Limiter::admit`] lets it.
    pub fn warn(&mut self, reason: &'static str, agent: &str, message: &str) {
        if self.admit(Instant::now(), reason, agent) {
            tracing::warn!(reason, "{}", cut_line(message));
        }
    }

    /// Ends the round and logs its summaries.
    pub fn finish_round(&mut self) {
        for s in self.end_round(Instant::now()) {
            let n = thousands(s.held);
            if s.loud {
                tracing::warn!(
                    reason = s.reason,
                    held = s.held,
                    "{}: … and {n} more like it (rate-limited)",
                    s.reason
                );
            } else {
                tracing::debug!(
                    reason = s.reason,
                    held = s.held,
                    "{}: … and {n} more like it (rate-limited)",
                    s.reason
                );
            }
        }
    }
}

/// `s` cut at [`MAX_LINE`] bytes (on a character boundary), with a note of what was cut.
pub fn cut_line(s: &str) -> std::borrow::Cow<'_, str> {
    if s.len() <= MAX_LINE {
        s.into()
    } else {
        format!("{}… ({} bytes cut)", cut(s, MAX_LINE), s.len() - MAX_LINE).into()
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `39999` as `39,999`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_entries_every_round_are_logged_once_then_summarised() {
        let mut l = Limiter::new();
        let t0 = Instant::now();
        // Round 1: 40,000 bad entries; five lines, one loud summary.
        let logged = (0..40_000)
            .filter(|i| l.admit(t0, "bad name", &format!("a{i}")))
            .count();
        assert_eq!(logged, LINES_PER_REASON);
        let s = l.end_round(t0);
        assert_eq!(
            s,
            [Summary {
                reason: "bad name",
                held: 39_995,
                loud: true
            }]
        );
        // Round 2, a second later: nothing logged, the summary is quiet.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            (0..40_000)
                .filter(|i| l.admit(t1, "bad name", &format!("a{i}")))
                .count(),
            0
        );
        assert!(!l.end_round(t1)[0].loud);
        // Another reason has its own budget.
        assert!(l.admit(t1, "unknown cmd", "a0"));
        // A window later, the same entry is logged again.
        let t2 = t0 + WINDOW;
        assert!(l.admit(t2, "bad name", "a0"));
        assert!(l.end_round(t2).iter().all(|s| s.held == 0 || s.loud));
    }

    #[test]
    fn lines_are_cut_and_counts_are_readable() {
        assert_eq!(thousands(39_999), "39,999");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000_000), "1,000,000");
        let long = "é".repeat(1000);
        let c = cut_line(&long);
        assert!(c.len() < MAX_LINE + 40, "{}", c.len());
        assert!(c.ends_with("bytes cut)"));
        assert_eq!(cut_line("short"), "short");
    }
}
