//! The simulated fleet: host names computed from an index (nothing is stored per host in
//! the load loops, so millions of hosts cost no memory), agent names, and each host's
//! heartbeat phase for the converge mode.

use rand::{Rng, SeedableRng};

use crate::error::ConfigError;

/// Digits in a simulated hostname: `sim-000000123` leaves room for a billion hosts.
pub const HOST_DIGITS: usize = 9;
/// Most hosts one run may simulate (what [`HOST_DIGITS`] can name).
pub const MAX_HOSTS: u64 = 1_000_000_000;
/// Most agents per host; a real host runs a handful.
pub const MAX_AGENTS: usize = 64;
/// Hosts whose convergence state one converge run may hold in memory (about 10 bytes each,
/// plus `2 × agents` bytes; one byte more with `--fail-share`, and a small record for each
/// host that failed).
pub const MAX_CONVERGE_HOSTS: u64 = 20_000_000;

/// Who the simulated hosts are and what they run before anyone tells them otherwise.
#[derive(Debug, Clone)]
pub struct Fleet {
    /// Number of distinct hosts, named `{host_prefix}{index:09}`.
    pub hosts: u64,
    /// Prefix of every hostname, e.g. `sim-`.
    pub host_prefix: String,
    /// Agent names every host runs, e.g. `agent-0`, `agent-1`, ...
    pub agents: Vec<String>,
    /// Version every agent reports before it is told to install another.
    pub version: String,
}

impl Fleet {
    /// Checks every name with the same rules the server applies, so a run never measures
    /// a server refusing our own input.
    pub fn new(
        hosts: u64,
        agents: usize,
        agent_prefix: &str,
        host_prefix: &str,
        version: &str,
    ) -> Result<Fleet, ConfigError> {
        if hosts == 0 || hosts > MAX_HOSTS {
            return Err(ConfigError::Invalid(format!(
                "hosts must be between 1 and {MAX_HOSTS}, got {hosts}"
            )));
        }
        if agents > MAX_AGENTS {
            return Err(ConfigError::Invalid(format!(
                "agents must be at most {MAX_AGENTS}, got {agents}"
            )));
        }
        let fleet = Fleet {
            hosts,
            host_prefix: host_prefix.to_string(),
            agents: (0..agents).map(|i| format!("{agent_prefix}{i}")).collect(),
            version: version.to_string(),
        };
        proto::validate_hostname(&fleet.hostname(hosts - 1))
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        for a in &fleet.agents {
            proto::validate_agent_name(a).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        }
        proto::validate_version(version).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        Ok(fleet)
    }

    /// The hostname of host `index`.
    pub fn hostname(&self, index: u64) -> String {
        format!("{}{index:0width$}", self.host_prefix, width = HOST_DIGITS)
    }
}

/// The BootAgent serial of host `index`: UUID-shaped and unique per host, so the server
/// sees as many serials as hosts.
pub fn agentsn(index: u64) -> String {
    format!("00000000-0000-4000-8000-{index:012}")
}

/// Writes `value` as exactly `width` decimal digits (zero-padded; higher digits dropped).
pub fn push_digits(out: &mut Vec<u8>, mut value: u64, width: usize) {
    let start = out.len();
    out.resize(start + width, b'0');
    for slot in out[start..].iter_mut().rev() {
        *slot = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// Heartbeat phases: like the real updater, each host waits a random time in
/// `[0, interval)` before its first heartbeat, then beats every `interval`. Deterministic
/// for a given seed so that runs are comparable.
pub fn phases(hosts: u64, interval_micros: u64, seed: u64) -> Vec<u64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..hosts)
        .map(|_| rng.gen_range(0..interval_micros.max(1)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_are_fixed_width_and_valid() {
        let f = Fleet::new(1_000_000, 3, "agent-", "sim-", "1.0.0").unwrap();
        assert_eq!(f.hostname(123), "sim-000000123");
        assert_eq!(f.hostname(999_999), "sim-000999999");
        assert_eq!(f.agents, vec!["agent-0", "agent-1", "agent-2"]);
    }

    #[test]
    fn bad_fleets_are_refused_by_name() {
        let e = Fleet::new(0, 3, "a-", "sim-", "1").unwrap_err().to_string();
        assert!(e.contains("hosts"), "{e}");
        let e = Fleet::new(10, 3, "a-", "sim/", "1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("hostname"), "{e}");
        let e = Fleet::new(10, 3, "../", "sim-", "1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("agent name"), "{e}");
        let e = Fleet::new(10, 65, "a-", "sim-", "1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("agents"), "{e}");
    }

    #[test]
    fn digits_are_padded() {
        let mut v = b"x".to_vec();
        push_digits(&mut v, 42, 5);
        assert_eq!(v, b"x00042");
    }

    #[test]
    fn phases_are_in_range_and_reproducible() {
        let a = phases(1000, 60_000_000, 7);
        assert_eq!(a, phases(1000, 60_000_000, 7));
        assert!(a.iter().all(|&p| p < 60_000_000));
        // Spread over the interval, not bunched at the start.
        assert!(a.iter().any(|&p| p > 50_000_000));
        assert!(a.iter().any(|&p| p < 10_000_000));
    }
}
