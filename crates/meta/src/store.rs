//! The fleet store: what every host last reported, behind one narrow interface.
//!
//! HTTP handlers only see [`FleetStore`]; later backends (on disk, PostgreSQL) implement the
//! same trait. [`MemStore`] keeps everything in memory, sharded by hostname so heartbeats from
//! different hosts do not serialize on one lock, and interns the strings every host repeats
//! (agent names, versions, statuses) so a million hosts fit in a few hundred MiB.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use parking_lot::RwLock;
use proto::legacy::RealAgent;

/// Longest status text stored, in bytes. Statuses are free text when a control script
/// fails; the rest is cut (at a character boundary).
pub const MAX_STATUS_LEN: usize = 256;
/// Distinct agent names and versions interned before further ones are kept per host.
pub const MAX_INTERNED_NAMES: usize = 65_536;
/// Distinct statuses interned before further ones are kept per host. Lower than for names:
/// error texts vary far more than versions do.
pub const MAX_INTERNED_STATUSES: usize = 16_384;
/// Number of shards of [`MemStore`]; a power of two.
pub const SHARDS: usize = 64;

/// One host's report of one agent, as the store gives it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostAgent {
    pub hostname: String,
    /// `None` when the host never reported the agent asked for.
    pub agent: Option<RealAgent>,
}

/// The interface every fleet store backend offers. Times are Unix seconds of the server's
/// clock; host-reported timestamps are stored as given and never used for expiry, since
/// host clocks drift.
pub trait FleetStore: Send + Sync + 'static {
    /// Records that `host` was seen at `now` with exactly these agents (replacing what it
    /// reported before). A host that reports no agents is still recorded as seen.
    fn record(&self, host: &str, agents: &[RealAgent], now: i64);
    /// Every known host with its report of agent `name` (or `None`), sorted by hostname.
    fn agent_status(&self, name: &str) -> Vec<HostAgent>;
    /// What `host` last reported, if it is known.
    fn host(&self, host: &str) -> Option<Vec<RealAgent>>;
    /// Number of known hosts.
    fn host_count(&self) -> usize;
    /// Drops every host last seen before `older_than`; returns how many were dropped.
    fn sweep(&self, older_than: i64) -> usize;
}

/// A bounded string interner: ids are indexes into `strings`. Reads (the common case: a
/// version every host already reported) take only the read lock.
#[derive(Debug)]
struct Interner {
    cap: usize,
    inner: RwLock<InternerInner>,
}

#[derive(Debug, Default)]
struct InternerInner {
    ids: HashMap<Arc<str>, u32>,
    strings: Vec<Arc<str>>,
}

impl Interner {
    fn new(cap: usize) -> Interner {
        Interner {
            cap,
            inner: RwLock::new(InternerInner::default()),
        }
    }

    /// The id of `s`, interning it when there is room; `None` when the interner is full.
    fn intern(&self, s: &str) -> Option<u32> {
        if let Some(&id) = self.inner.read().ids.get(s) {
            return Some(id);
        }
        let mut w = self.inner.write();
        if let Some(&id) = w.ids.get(s) {
            return Some(id);
        }
        if w.strings.len() >= self.cap {
            return None;
        }
        let id = w.strings.len() as u32;
        let a: Arc<str> = Arc::from(s);
        w.strings.push(a.clone());
        w.ids.insert(a, id);
        Some(id)
    }

    fn id_of(&self, s: &str) -> Option<u32> {
        self.inner.read().ids.get(s).copied()
    }

    fn get(&self, id: u32) -> Arc<str> {
        self.inner.read().strings[id as usize].clone()
    }

    fn len(&self) -> usize {
        self.inner.read().strings.len()
    }

    fn bytes(&self) -> usize {
        let r = self.inner.read();
        // Each string once on the heap, an Arc header, a map entry and a vector slot.
        r.strings.iter().map(|s| s.len() + 16 + 32 + 16).sum()
    }
}

/// Ids at or above this refer to the host's own `local` strings rather than an interner:
/// used when the interner is full, so a host flooding us with distinct error texts costs
/// only its own memory and loses nothing.
const LOCAL: u32 = 1 << 31;

/// One agent of one host: 24 bytes.
#[derive(Debug, Clone, Copy)]
struct AgentRec {
    name: u32,
    version: u32,
    status: u32,
    timestamp: i64,
}

#[derive(Debug)]
struct HostRec {
    last_seen: i64,
    agents: Box<[AgentRec]>,
    /// Strings that did not fit in the interners; almost always `None`.
    local: Option<Box<[Box<str>]>>,
}

type Shard = RwLock<HashMap<Box<str>, HostRec>>;

/// The in-memory [`FleetStore`].
#[derive(Debug)]
pub struct MemStore {
    shards: Box<[Shard]>,
    hasher: RandomState,
    names: Interner,
    statuses: Interner,
}

impl Default for MemStore {
    fn default() -> Self {
        MemStore::new()
    }
}

/// Cuts `s` to at most `max` bytes at a character boundary and replaces control
/// characters, so one host's status can neither be huge nor forge lines of text output.
fn clean_status(s: &str) -> std::borrow::Cow<'_, str> {
    let mut end = s.len().min(MAX_STATUS_LEN);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let cut = &s[..end];
    if cut.chars().any(char::is_control) {
        cut.chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect::<String>()
            .into()
    } else {
        cut.into()
    }
}

impl MemStore {
    pub fn new() -> MemStore {
        MemStore::with_caps(MAX_INTERNED_NAMES, MAX_INTERNED_STATUSES)
    }

    /// A store whose interners hold at most the given numbers of strings (tests use small ones).
    pub fn with_caps(names: usize, statuses: usize) -> MemStore {
        MemStore {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            names: Interner::new(names),
            statuses: Interner::new(statuses),
        }
    }

    fn shard(&self, host: &str) -> &Shard {
        let h = self.hasher.hash_one(host);
        &self.shards[(h as usize) & (SHARDS - 1)]
    }

    /// Number of distinct strings in the name/version and status interners.
    pub fn interned(&self) -> (usize, usize) {
        (self.names.len(), self.statuses.len())
    }

    /// The store's own estimate of the memory it holds, in bytes: map slots, hostnames,
    /// agent records, per-host strings and the interners. An estimate of allocations, not
    /// of allocator overhead.
    pub fn approx_bytes(&self) -> usize {
        let slot = std::mem::size_of::<(Box<str>, HostRec)>() + 1;
        let mut total = 0;
        for shard in self.shards.iter() {
            let m = shard.read();
            total += m.capacity() * slot;
            for (host, rec) in m.iter() {
                total += host.len();
                total += rec.agents.len() * std::mem::size_of::<AgentRec>();
                if let Some(local) = &rec.local {
                    total += local.iter().map(|s| s.len() + 16).sum::<usize>();
                }
            }
        }
        total + self.names.bytes() + self.statuses.bytes()
    }

    fn resolve(&self, id: u32, interner: &Interner, rec: &HostRec) -> String {
        if id >= LOCAL {
            let local = rec.local.as_deref().unwrap_or(&[]);
            local
                .get((id - LOCAL) as usize)
                .map(|s| s.to_string())
                .unwrap_or_default()
        } else {
            interner.get(id).to_string()
        }
    }

    fn to_real(&self, rec: &HostRec, a: &AgentRec) -> RealAgent {
        RealAgent {
            name: self.resolve(a.name, &self.names, rec),
            version: self.resolve(a.version, &self.names, rec),
            status: self.resolve(a.status, &self.statuses, rec),
            timestamp: a.timestamp,
        }
    }

    fn agent_named<'a>(&self, rec: &'a HostRec, name: &str) -> Option<&'a AgentRec> {
        match self.names.id_of(name) {
            Some(id) => rec.agents.iter().find(|a| a.name == id),
            None => rec
                .agents
                .iter()
                .find(|a| a.name >= LOCAL && self.resolve(a.name, &self.names, rec) == name),
        }
    }
}

impl FleetStore for MemStore {
    fn record(&self, host: &str, agents: &[RealAgent], now: i64) {
        // Intern outside the shard lock: interning may take the interner's write lock.
        let mut local: Vec<Box<str>> = Vec::new();
        let mut id = |s: &str, interner: &Interner| -> u32 {
            interner.intern(s).unwrap_or_else(|| {
                local.push(s.into());
                LOCAL + (local.len() as u32 - 1)
            })
        };
        let recs: Box<[AgentRec]> = agents
            .iter()
            .map(|a| AgentRec {
                name: id(&a.name, &self.names),
                version: id(&a.version, &self.names),
                status: id(&clean_status(&a.status), &self.statuses),
                timestamp: a.timestamp,
            })
            .collect();
        let local = if local.is_empty() {
            None
        } else {
            Some(local.into_boxed_slice())
        };
        let mut shard = self.shard(host).write();
        match shard.get_mut(host) {
            Some(rec) => {
                rec.last_seen = now;
                rec.agents = recs;
                rec.local = local;
            }
            None => {
                shard.insert(
                    host.into(),
                    HostRec {
                        last_seen: now,
                        agents: recs,
                        local,
                    },
                );
            }
        }
    }

    fn agent_status(&self, name: &str) -> Vec<HostAgent> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let m = shard.read();
            out.reserve(m.len());
            for (host, rec) in m.iter() {
                out.push(HostAgent {
                    hostname: host.to_string(),
                    agent: self.agent_named(rec, name).map(|a| self.to_real(rec, a)),
                });
            }
        }
        out.sort_unstable_by(|a, b| a.hostname.cmp(&b.hostname));
        out
    }

    fn host(&self, host: &str) -> Option<Vec<RealAgent>> {
        let shard = self.shard(host).read();
        let rec = shard.get(host)?;
        Some(rec.agents.iter().map(|a| self.to_real(rec, a)).collect())
    }

    fn host_count(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }

    fn sweep(&self, older_than: i64) -> usize {
        let mut dropped = 0;
        for shard in self.shards.iter() {
            let mut m = shard.write();
            let before = m.len();
            m.retain(|_, rec| rec.last_seen >= older_than);
            dropped += before - m.len();
            // Give memory back after a large fleet shrank.
            if m.capacity() > 64 && m.len() < m.capacity() / 4 {
                m.shrink_to_fit();
            }
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(name: &str, version: &str, status: &str, ts: i64) -> RealAgent {
        RealAgent {
            name: name.into(),
            version: version.into(),
            status: status.into(),
            timestamp: ts,
        }
    }

    #[test]
    fn record_replaces_and_reports_per_agent() {
        let s = MemStore::new();
        s.record("h1", &[agent("a", "1", "started", 10)], 100);
        s.record("h2", &[agent("b", "2", "stoped", 11)], 100);
        s.record("h3", &[], 100);
        assert_eq!(s.host_count(), 3);
        let st = s.agent_status("a");
        assert_eq!(
            st,
            vec![
                HostAgent {
                    hostname: "h1".into(),
                    agent: Some(agent("a", "1", "started", 10))
                },
                HostAgent {
                    hostname: "h2".into(),
                    agent: None
                },
                HostAgent {
                    hostname: "h3".into(),
                    agent: None
                },
            ]
        );
        // A new report replaces the old one entirely.
        s.record("h1", &[agent("b", "3", "started", 20)], 200);
        assert_eq!(s.host("h1"), Some(vec![agent("b", "3", "started", 20)]));
        assert_eq!(s.agent_status("a")[0].agent, None);
        assert_eq!(s.host("nope"), None);
    }

    #[test]
    fn sweep_drops_hosts_last_seen_before_the_cutoff() {
        let s = MemStore::new();
        s.record("old", &[agent("a", "1", "started", 1)], 100);
        s.record("empty-old", &[], 100);
        s.record("new", &[agent("a", "1", "started", 1)], 300);
        assert_eq!(s.sweep(200), 2);
        assert_eq!(s.host_count(), 1);
        assert!(s.host("new").is_some());
        // Seen again: kept even though its agents' own timestamps are ancient.
        s.record("new", &[agent("a", "1", "started", 1)], 400);
        assert_eq!(s.sweep(350), 0);
    }

    #[test]
    fn statuses_are_capped_and_cleaned() {
        let s = MemStore::new();
        let long = "é".repeat(300);
        s.record("h", &[agent("a", "1", &long, 1)], 1);
        let got = s.host("h").unwrap()[0].status.clone();
        assert!(got.len() <= MAX_STATUS_LEN, "{}", got.len());
        assert!(got.chars().all(|c| c == 'é'));
        s.record("h", &[agent("a", "1", "error\nh2 1.0 started", 1)], 1);
        assert_eq!(s.host("h").unwrap()[0].status, "error h2 1.0 started");
    }

    #[test]
    fn interner_is_bounded_and_overflow_is_kept_per_host() {
        let s = MemStore::with_caps(4, 2);
        for i in 0..50 {
            s.record(
                &format!("h{i}"),
                &[agent("a", &format!("v{i}"), &format!("error {i}"), i)],
                1,
            );
        }
        assert_eq!(s.interned(), (4, 2));
        for i in 0..50 {
            assert_eq!(
                s.host(&format!("h{i}")).unwrap(),
                vec![agent("a", &format!("v{i}"), &format!("error {i}"), i)]
            );
        }
        // Agent names that overflowed are still found by name.
        s.record("hx", &[agent("zzz", "1", "started", 1)], 1);
        let st = s.agent_status("zzz");
        assert_eq!(st.iter().filter(|h| h.agent.is_some()).count(), 1);
    }

    #[test]
    fn hundred_thousand_hosts_stay_under_300_bytes_each() {
        let s = MemStore::new();
        let n = 100_000;
        let agents = [
            agent("falcon-agent", "1.0.0", "started", 1_700_000_000),
            agent("ops-updater", "2.1.0", "started", 1_700_000_000),
            agent("log-agent", "0.3.1", "stoped", 1_700_000_000),
        ];
        for i in 0..n {
            s.record(&format!("web-{i:07}.dc1.example.com"), &agents, 1);
        }
        assert_eq!(s.host_count(), n);
        let per_host = s.approx_bytes() / n;
        assert!(per_host <= 300, "{per_host} bytes per host");
        assert_eq!(s.interned(), (6, 2));
    }
}
