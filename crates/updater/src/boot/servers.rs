//! The server list and per-server back-off.
//!
//! Servers come from four places, tried in this order: the config's `server` key, the list
//! the server pushed with a `config` job, the list given with `-S` at first start, and the
//! list built into the binary (`OPS_UPDATER_SERVERS` at compile time; point it at a load
//! balancer). The last three are seed 003's sources; the built-in list is always kept.
//! Every list follows one syntax, [`proto::rules::parse_svrlist`], which drops duplicates
//! within a list; a server found in several lists is kept in each, as the seed says, and
//! tried only once per round.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use super::metafile::Meta;

/// First wait after a server failed; doubled per failure in a row, capped at the step.
pub const SERVER_RETRY_BASE: Duration = Duration::from_secs(1);

/// The servers built into the binary at compile time (`OPS_UPDATER_SERVERS`, a server
/// list by [`proto::rules::parse_svrlist`]); empty when it was not set, or was not a valid
/// list (logged).
pub fn builtin() -> Vec<String> {
    parse_builtin(option_env!("OPS_UPDATER_SERVERS"))
}

fn parse_builtin(list: Option<&str>) -> Vec<String> {
    let Some(list) = list.filter(|l| !l.trim().is_empty()) else {
        return Vec::new();
    };
    proto::rules::parse_svrlist(list).unwrap_or_else(|e| {
        tracing::error!(error = %e, "ignoring the built-in server list (OPS_UPDATER_SERVERS)");
        Vec::new()
    })
}

/// The base URL (`scheme://authority`) for a server entry: `host:port` means plain HTTP as
/// the legacy `server` key does; an `http://` or `https://` URL keeps its scheme, and any
/// path on it is dropped (the BootAgent endpoints are `/agent/...` at the root).
pub fn base_url(server: &str) -> Result<String, String> {
    let hb = crate::config::heartbeat_url(server)?;
    let (scheme, rest) = hb.split_once("://").unwrap_or(("http", &hb));
    let authority = rest.split('/').next().unwrap_or(rest);
    Ok(format!("{scheme}://{authority}"))
}

/// The list to try, in order: `server` (the config's key), pushed, `-S`, built-in.
pub fn merge(config_server: &str, meta: &Meta, builtin: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    if !config_server.trim().is_empty() {
        out.push(config_server.trim().to_string());
    }
    out.extend(meta.pushed.iter().cloned());
    out.extend(meta.servers.iter().cloned());
    out.extend(builtin.iter().cloned());
    out
}

/// Failures in a row and the end of the back-off, per server.
#[derive(Debug, Default)]
pub struct Backoff {
    state: HashMap<String, (u32, Instant)>,
}

impl Backoff {
    /// The servers to try this round, in order, without duplicates: those not held back
    /// first; when every server is held back, all of them anyway (a round is never
    /// skipped only because every server failed recently).
    pub fn order(&self, list: &[String], now: Instant) -> Vec<String> {
        let mut seen = Vec::new();
        for s in list {
            if !seen.contains(s) {
                seen.push(s.clone());
            }
        }
        let ready: Vec<String> = seen
            .iter()
            .filter(|s| self.state.get(*s).is_none_or(|(_, until)| *until <= now))
            .cloned()
            .collect();
        if ready.is_empty() {
            seen
        } else {
            ready
        }
    }

    /// Notes a failure of `server`; `cap` bounds the wait (the report step).
    pub fn failed(&mut self, server: &str, cap: Duration, now: Instant) {
        let e = self.state.entry(server.to_string()).or_insert((0, now));
        e.0 = e.0.saturating_add(1);
        let wait =
            crate::engine::backoff_delay(e.0, SERVER_RETRY_BASE.min(cap), cap, rand::random());
        e.1 = now + wait;
    }

    pub fn succeeded(&mut self, server: &str) {
        self.state.remove(server);
    }

    /// Failures in a row of `server`.
    pub fn failures(&self, server: &str) -> u32 {
        self.state.get(server).map_or(0, |s| s.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        assert_eq!(base_url("127.0.0.1:2000").unwrap(), "http://127.0.0.1:2000");
        assert_eq!(base_url("http://m:1/heartbeat").unwrap(), "http://m:1");
        assert_eq!(base_url("https://m/api/x").unwrap(), "https://m");
        assert!(base_url("m").is_err());
        assert!(base_url("ftp://m:1").is_err());
        assert!(base_url("").is_err());
    }

    #[test]
    fn builtin_lists_follow_the_server_list_rule() {
        assert_eq!(parse_builtin(None), Vec::<String>::new());
        assert_eq!(parse_builtin(Some(" ")), Vec::<String>::new());
        assert_eq!(parse_builtin(Some("lb:2000, lb:2000")), ["lb:2000"]);
        assert_eq!(parse_builtin(Some("lb")), Vec::<String>::new());
    }

    #[test]
    fn merge_order_keeps_duplicates() {
        let m = Meta {
            agentsn: "a".into(),
            servers: vec!["s:1".into(), "b:1".into()],
            pushed: vec!["p:1".into()],
            ..Meta::default()
        };
        assert_eq!(
            merge("c:1", &m, &["b:1".into()]),
            ["c:1", "p:1", "s:1", "b:1", "b:1"]
        );
        assert_eq!(merge(" ", &Meta::default(), &[]), Vec::<String>::new());
    }

    #[test]
    fn backoff_skips_failed_servers_until_all_failed() {
        let list: Vec<String> = vec!["a:1".into(), "b:1".into(), "a:1".into()];
        let now = Instant::now();
        let mut b = Backoff::default();
        assert_eq!(b.order(&list, now), ["a:1", "b:1"]);
        b.failed("a:1", Duration::from_secs(60), now);
        assert_eq!(b.failures("a:1"), 1);
        assert_eq!(b.order(&list, now), ["b:1"]);
        b.failed("b:1", Duration::from_secs(60), now);
        // Everyone is held back: try them all rather than lose the round.
        assert_eq!(b.order(&list, now), ["a:1", "b:1"]);
        // Past the back-off, a server is tried again; success forgets its failures.
        assert_eq!(b.order(&list, now + Duration::from_secs(2)), ["a:1", "b:1"]);
        b.succeeded("a:1");
        assert_eq!(b.failures("a:1"), 0);
        assert_eq!(b.order(&list, now), ["a:1"]);
    }
}
