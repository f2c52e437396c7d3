//! The fleet store: what every host last reported, behind one narrow interface.
//!
//! HTTP handlers only see [`FleetStore`], the synchronous read cache every heartbeat and
//! status page uses; what must survive a restart is written behind it to the durable store
//! ([`crate::persist`]), told by [`FleetStore::record`] which reports need a write.
//! [`MemStore`] keeps everything in memory, sharded by hostname so heartbeats from
//! different hosts do not serialize on one lock, and interns the strings every host repeats
//! (agent names, versions, statuses) so a million hosts fit in a few hundred MiB.
//!
//! The heartbeat path is the hot one: the hostname is hashed once (foldhash) and that hash
//! picks the shard and the slot inside it; a known host that reports the same agents as
//! last time is updated in place without touching the interners' locks or allocating.

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use foldhash::fast::RandomState;
use hashbrown::HashTable;
use parking_lot::RwLock;
use proto::legacy::{RealAgent, RealAgentRef};

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
    /// reported before). A host that reports no agents is still recorded as seen. Returns
    /// true when the host's durable row must be written: it is new, its report changed
    /// (beyond timestamps), or its last-seen time entered a new step
    /// ([`crate::persist::behind::seen_step`]).
    fn record(&self, host: &str, agents: &[RealAgentRef<'_>], now: i64) -> bool;
    /// Every known host with its report of agent `name` (or none), sorted by hostname.
    fn agent_status(&self, name: &str) -> AgentStatus;
    /// What `host` last reported, if it is known.
    fn host(&self, host: &str) -> Option<Vec<RealAgent>>;
    /// When `host` last reported (server clock), if it is known and the backend keeps it.
    fn last_seen(&self, _host: &str) -> Option<i64> {
        None
    }
    /// Number of known hosts.
    fn host_count(&self) -> usize;
    /// Calls `f(hostname, agent, version, status)` for every agent of every known host, in
    /// no particular order: for counting (`/metrics`) without copying the fleet.
    fn for_each_agent(&self, f: &mut dyn FnMut(&str, &str, &str, &str)) {
        for h in self.hostnames(&|_| true) {
            for a in self.host(&h).unwrap_or_default() {
                f(&h, &a.name, &a.version, &a.status);
            }
        }
    }
    /// The known hostnames that `keep` accepts, sorted.
    fn hostnames(&self, keep: &dyn Fn(&str) -> bool) -> Vec<String>;
    /// Drops every host last seen before `older_than`; returns how many were dropped.
    fn sweep(&self, older_than: i64) -> usize;
    /// A number that changes whenever what [`FleetStore::agent_status`] returns may
    /// change, so that a snapshot can be shared until it does; `None` when the backend
    /// cannot tell (then snapshots are shared only for a short time).
    fn generation(&self) -> Option<u64> {
        None
    }
}

/// Marks a row of [`AgentStatus`] whose host does not report the agent.
const NO_AGENT: u32 = u32::MAX;

/// One host in [`AgentStatus`]: 32 bytes, the strings live in the snapshot's buffers.
#[derive(Debug, Clone, Copy)]
struct StatusRow {
    host_start: usize,
    host_len: u32,
    /// Index into `AgentStatus::dict`, or [`NO_AGENT`].
    version: u32,
    status: u32,
    timestamp: i64,
}

/// Every known host with its report of one agent, sorted by hostname: a compact copy the
/// status pages are written from piece by piece, after every lock is released. Hostnames
/// sit in one buffer, versions and statuses once each in a small dictionary, so a million
/// hosts take some 45 MiB here instead of four `String`s each.
#[derive(Debug, Default)]
pub struct AgentStatus {
    name: String,
    hosts: String,
    dict: Vec<Box<str>>,
    rows: Vec<StatusRow>,
}

/// One host of an [`AgentStatus`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusEntry<'a> {
    pub hostname: &'a str,
    /// The agent as the host reported it; `None` when it did not.
    pub agent: Option<AgentEntry<'a>>,
}

/// The agent part of a [`StatusEntry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentEntry<'a> {
    pub name: &'a str,
    pub version: &'a str,
    pub status: &'a str,
    pub timestamp: i64,
}

impl AgentEntry<'_> {
    /// As the wire type, for serializing.
    pub fn as_wire(&self) -> RealAgentRef<'_> {
        RealAgentRef {
            name: Cow::Borrowed(self.name),
            version: Cow::Borrowed(self.version),
            status: Cow::Borrowed(self.status),
            timestamp: self.timestamp,
        }
    }
}

impl AgentStatus {
    /// An empty answer for agent `name`; fill it with [`AgentStatus::push`].
    pub fn new(name: &str) -> AgentStatus {
        AgentStatus {
            name: name.to_string(),
            ..AgentStatus::default()
        }
    }

    /// Adds a host and what it reported of the agent (version, status, timestamp). Order
    /// does not matter; [`AgentStatus::sort`] puts hosts in order.
    pub fn push(&mut self, hostname: &str, agent: Option<(&str, &str, i64)>) {
        let (version, status, timestamp) = match agent {
            Some((v, s, t)) => (self.add_word(v), self.add_word(s), t),
            None => (NO_AGENT, NO_AGENT, 0),
        };
        self.push_row(hostname, version, status, timestamp);
    }

    fn add_word(&mut self, s: &str) -> u32 {
        self.dict.push(s.into());
        (self.dict.len() - 1) as u32
    }

    fn push_row(&mut self, hostname: &str, version: u32, status: u32, timestamp: i64) {
        let host_start = self.hosts.len();
        self.hosts.push_str(hostname);
        self.rows.push(StatusRow {
            host_start,
            host_len: hostname.len() as u32,
            version,
            status,
            timestamp,
        });
    }

    /// Sorts hosts by hostname (bytewise, as `str` orders).
    pub fn sort(&mut self) {
        let hosts = &self.hosts;
        let key = |r: &StatusRow| &hosts[r.host_start..r.host_start + r.host_len as usize];
        self.rows.sort_unstable_by(|a, b| key(a).cmp(key(b)));
    }

    /// The agent asked for.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of hosts.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Host number `i` (in sorted order once sorted).
    pub fn get(&self, i: usize) -> Option<StatusEntry<'_>> {
        let r = self.rows.get(i)?;
        let hostname = &self.hosts[r.host_start..r.host_start + r.host_len as usize];
        let agent = (r.version != NO_AGENT).then(|| AgentEntry {
            name: &self.name,
            version: &self.dict[r.version as usize],
            status: &self.dict[r.status as usize],
            timestamp: r.timestamp,
        });
        Some(StatusEntry { hostname, agent })
    }

    /// Every host in order.
    pub fn iter(&self) -> impl Iterator<Item = StatusEntry<'_>> + '_ {
        (0..self.rows.len()).filter_map(|i| self.get(i))
    }

    /// The same as owned values (tests and small callers).
    pub fn to_host_agents(&self) -> Vec<HostAgent> {
        self.iter()
            .map(|e| HostAgent {
                hostname: e.hostname.to_string(),
                agent: e.agent.map(|a| a.as_wire().to_owned_agent()),
            })
            .collect()
    }
}

/// Strings appended once and never changed, readable without a lock: a slot is a
/// `OnceLock`, so a reader pays one acquire load. Slots come in chunks allocated on
/// first use, so an interner that holds six strings costs a few KiB, not its capacity.
#[derive(Debug)]
struct Strings {
    chunks: Box<[OnceLock<Chunk>]>,
}

/// A run of [`CHUNK`] slots of [`Strings`].
type Chunk = Box<[OnceLock<Box<str>>]>;

/// Strings per chunk of [`Strings`].
const CHUNK: usize = 256;

impl Strings {
    fn new(cap: usize) -> Strings {
        Strings {
            chunks: (0..cap.div_ceil(CHUNK)).map(|_| OnceLock::new()).collect(),
        }
    }

    fn get(&self, id: u32) -> &str {
        let id = id as usize;
        self.chunks[id / CHUNK]
            .get()
            .and_then(|c| c[id % CHUNK].get())
            .expect("ids are handed out only after their string is set")
    }

    /// Sets slot `id`; each slot is set once, by the interner holding its write lock.
    fn set(&self, id: u32, s: &str) {
        let id = id as usize;
        let chunk =
            self.chunks[id / CHUNK].get_or_init(|| (0..CHUNK).map(|_| OnceLock::new()).collect());
        let _ = chunk[id % CHUNK].set(s.into());
    }
}

/// A bounded string interner: ids index `strings`, and `ids` finds the id of a string by
/// its hash. Resolving an id takes no lock; looking a string up takes the read lock of
/// `ids`, and only a new string the write lock. Ids are never reused or removed.
#[derive(Debug)]
struct Interner {
    cap: usize,
    hasher: RandomState,
    ids: RwLock<HashTable<u32>>,
    strings: Strings,
}

impl Interner {
    fn new(cap: usize) -> Interner {
        let cap = cap.min(LOCAL as usize);
        Interner {
            cap,
            hasher: RandomState::default(),
            ids: RwLock::new(HashTable::new()),
            strings: Strings::new(cap),
        }
    }

    /// The id of `s`, interning it when there is room; `None` when the interner is full.
    fn intern(&self, s: &str) -> Option<u32> {
        let hash = self.hasher.hash_one(s);
        let eq = |&id: &u32| self.strings.get(id) == s;
        if let Some(&id) = self.ids.read().find(hash, eq) {
            return Some(id);
        }
        let mut w = self.ids.write();
        if let Some(&id) = w.find(hash, eq) {
            return Some(id);
        }
        if w.len() >= self.cap {
            return None;
        }
        let id = w.len() as u32;
        self.strings.set(id, s);
        w.insert_unique(hash, id, |&id| self.hasher.hash_one(self.strings.get(id)));
        Some(id)
    }

    fn id_of(&self, s: &str) -> Option<u32> {
        let hash = self.hasher.hash_one(s);
        self.ids
            .read()
            .find(hash, |&id| self.strings.get(id) == s)
            .copied()
    }

    fn get(&self, id: u32) -> &str {
        self.strings.get(id)
    }

    fn len(&self) -> usize {
        self.ids.read().len()
    }

    fn bytes(&self) -> usize {
        let r = self.ids.read();
        // Each string once on the heap, its slot, and a table entry.
        (0..r.len() as u32)
            .map(|id| self.strings.get(id).len() + 24 + 8)
            .sum()
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
    local: LocalStrings,
}

/// A host's strings that did not fit in the interners.
type LocalStrings = Option<Box<[Box<str>]>>;

/// A slot of a shard's table.
#[derive(Debug)]
struct HostEntry {
    host: Box<str>,
    rec: HostRec,
}

/// One shard: its table behind its lock, and a count of the changes made to it, bumped
/// under the write lock (whose cache line the writer already owns, so it costs nothing
/// the lock does not).
#[derive(Debug, Default)]
struct Shard {
    map: RwLock<HashTable<HostEntry>>,
    changes: AtomicU64,
}

impl std::ops::Deref for Shard {
    type Target = RwLock<HashTable<HostEntry>>;
    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl Shard {
    /// Counts a change; call with the write lock held.
    fn changed(&self) {
        self.changes.fetch_add(1, Ordering::Relaxed);
    }
}

/// The in-memory [`FleetStore`].
#[derive(Debug)]
pub struct MemStore {
    shards: Box<[Shard]>,
    /// Hashes hostnames: seeded per process. Hostnames are validated and every shard has
    /// its own lock and table, which bounds what colliding names could cost.
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
fn clean_status(s: &str) -> Cow<'_, str> {
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

/// The shard of a hostname hash. Uses bits the shard's table does not: hashbrown takes the
/// slot from the low bits and a tag from the top seven.
fn shard_index(hash: u64) -> usize {
    (hash >> 32) as usize & (SHARDS - 1)
}

impl MemStore {
    pub fn new() -> MemStore {
        MemStore::with_caps(MAX_INTERNED_NAMES, MAX_INTERNED_STATUSES)
    }

    /// A store whose interners hold at most the given numbers of strings (tests use small ones).
    pub fn with_caps(names: usize, statuses: usize) -> MemStore {
        MemStore {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            hasher: RandomState::default(),
            names: Interner::new(names),
            statuses: Interner::new(statuses),
        }
    }

    fn hash(&self, host: &str) -> u64 {
        self.hasher.hash_one(host)
    }

    /// Number of distinct strings in the name/version and status interners.
    pub fn interned(&self) -> (usize, usize) {
        (self.names.len(), self.statuses.len())
    }

    /// The store's own estimate of the memory it holds, in bytes: table slots, hostnames,
    /// agent records, per-host strings and the interners. An estimate of allocations, not
    /// of allocator overhead.
    pub fn approx_bytes(&self) -> usize {
        let slot = std::mem::size_of::<HostEntry>() + 1;
        let mut total = 0;
        for shard in self.shards.iter() {
            let m = shard.read();
            total += m.capacity() * slot;
            for e in m.iter() {
                total += e.host.len();
                total += e.rec.agents.len() * std::mem::size_of::<AgentRec>();
                if let Some(local) = &e.rec.local {
                    total += local.iter().map(|s| s.len() + 16).sum::<usize>();
                }
            }
        }
        total + self.names.bytes() + self.statuses.bytes()
    }

    fn resolve<'a>(&'a self, id: u32, interner: &'a Interner, rec: &'a HostRec) -> &'a str {
        if id >= LOCAL {
            rec.local
                .as_deref()
                .and_then(|l| l.get((id - LOCAL) as usize))
                .map_or("", |s| s)
        } else {
            interner.get(id)
        }
    }

    fn to_real(&self, rec: &HostRec, a: &AgentRec) -> RealAgent {
        RealAgent {
            name: self.resolve(a.name, &self.names, rec).to_string(),
            version: self.resolve(a.version, &self.names, rec).to_string(),
            status: self.resolve(a.status, &self.statuses, rec).to_string(),
            timestamp: a.timestamp,
        }
    }

    /// True when `agents` holds the same names, versions and (cleaned) statuses, in the
    /// same order, as `rec`: only timestamps may differ.
    fn same_report(&self, rec: &HostRec, agents: &[RealAgentRef<'_>]) -> bool {
        rec.agents.len() == agents.len()
            && rec.agents.iter().zip(agents).all(|(r, a)| {
                self.resolve(r.name, &self.names, rec) == a.name
                    && self.resolve(r.version, &self.names, rec) == a.version
                    && self.resolve(r.status, &self.statuses, rec) == clean_status(&a.status)
            })
    }

    /// Interns a report (outside any shard lock: interning may take an interner's write
    /// lock). Strings that do not fit go to the host's own `local` list.
    fn compile(&self, agents: &[RealAgentRef<'_>]) -> (Vec<AgentRec>, LocalStrings) {
        let mut local: Vec<Box<str>> = Vec::new();
        let mut id = |s: &str, interner: &Interner| -> u32 {
            interner.intern(s).unwrap_or_else(|| {
                local.push(s.into());
                LOCAL + (local.len() as u32 - 1)
            })
        };
        let recs = agents
            .iter()
            .map(|a| AgentRec {
                name: id(&a.name, &self.names),
                version: id(&a.version, &self.names),
                status: id(&clean_status(&a.status), &self.statuses),
                timestamp: a.timestamp,
            })
            .collect();
        let local = (!local.is_empty()).then(|| local.into_boxed_slice());
        (recs, local)
    }

    /// The agent named `name` in `rec`; `id` is the name's interned id, if any.
    fn agent_named<'a>(
        &self,
        rec: &'a HostRec,
        name: &str,
        id: Option<u32>,
    ) -> Option<&'a AgentRec> {
        match id {
            Some(id) => rec.agents.iter().find(|a| a.name == id),
            None => rec
                .agents
                .iter()
                .find(|a| a.name >= LOCAL && self.resolve(a.name, &self.names, rec) == name),
        }
    }
}

impl FleetStore for MemStore {
    fn record(&self, host: &str, agents: &[RealAgentRef<'_>], now: i64) -> bool {
        let hash = self.hash(host);
        let shard = &self.shards[shard_index(hash)];
        let eq = |e: &HostEntry| &*e.host == host;
        {
            // The common case: a known host whose agents did not change but for their
            // timestamps. Compared before interning, without allocating.
            let mut m = shard.write();
            if let Some(e) = m.find_mut(hash, eq) {
                if self.same_report(&e.rec, agents) {
                    shard.changed();
                    let step = crate::persist::behind::seen_step(e.rec.last_seen, now);
                    e.rec.last_seen = now;
                    for (r, a) in e.rec.agents.iter_mut().zip(agents) {
                        r.timestamp = a.timestamp;
                    }
                    return step;
                }
            }
        }
        let (recs, local) = self.compile(agents);
        let mut m = shard.write();
        shard.changed();
        match m.find_mut(hash, eq) {
            Some(e) => {
                e.rec.last_seen = now;
                if e.rec.agents.len() == recs.len() {
                    e.rec.agents.copy_from_slice(&recs);
                } else {
                    e.rec.agents = recs.into_boxed_slice();
                }
                e.rec.local = local;
            }
            None => {
                m.insert_unique(
                    hash,
                    HostEntry {
                        host: host.into(),
                        rec: HostRec {
                            last_seen: now,
                            agents: recs.into_boxed_slice(),
                            local,
                        },
                    },
                    |e| self.hash(&e.host),
                );
            }
        }
        true
    }

    fn agent_status(&self, name: &str) -> AgentStatus {
        let mut out = AgentStatus::new(name);
        // Sized first, so the buffers are not regrown (and briefly held twice) while a
        // million hosts are copied in; hosts added meanwhile only grow them a little.
        let (mut hosts, mut bytes) = (0, 0);
        for shard in self.shards.iter() {
            let m = shard.read();
            hosts += m.len();
            bytes += m.iter().map(|e| e.host.len()).sum::<usize>();
        }
        out.rows.reserve_exact(hosts);
        out.hosts.reserve_exact(bytes);
        let name_id = self.names.id_of(name);
        // Interned versions and statuses go to the answer's dictionary once each.
        let mut versions = HashMap::<u32, u32>::new();
        let mut statuses = HashMap::<u32, u32>::new();
        let word = |out: &mut AgentStatus,
                    seen: &mut HashMap<u32, u32>,
                    id: u32,
                    interner: &Interner,
                    rec: &HostRec| {
            if id >= LOCAL {
                return out.add_word(self.resolve(id, interner, rec));
            }
            *seen
                .entry(id)
                .or_insert_with(|| out.add_word(interner.get(id)))
        };
        for shard in self.shards.iter() {
            let m = shard.read();
            for e in m.iter() {
                let rec = &e.rec;
                match self.agent_named(rec, name, name_id) {
                    Some(a) => {
                        let v = word(&mut out, &mut versions, a.version, &self.names, rec);
                        let s = word(&mut out, &mut statuses, a.status, &self.statuses, rec);
                        out.push_row(&e.host, v, s, a.timestamp);
                    }
                    None => out.push_row(&e.host, NO_AGENT, NO_AGENT, 0),
                }
            }
        }
        out.sort();
        out
    }

    fn host(&self, host: &str) -> Option<Vec<RealAgent>> {
        let hash = self.hash(host);
        let m = self.shards[shard_index(hash)].read();
        let rec = &m.find(hash, |e| &*e.host == host)?.rec;
        Some(rec.agents.iter().map(|a| self.to_real(rec, a)).collect())
    }

    fn last_seen(&self, host: &str) -> Option<i64> {
        let hash = self.hash(host);
        let m = self.shards[shard_index(hash)].read();
        Some(m.find(hash, |e| &*e.host == host)?.rec.last_seen)
    }

    fn host_count(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }

    /// The sum of the shards' change counts: each only grows, so the sum changes
    /// whenever one does.
    fn generation(&self) -> Option<u64> {
        Some(
            self.shards
                .iter()
                .map(|s| s.changes.load(Ordering::Acquire))
                .fold(0u64, u64::wrapping_add),
        )
    }

    fn for_each_agent(&self, f: &mut dyn FnMut(&str, &str, &str, &str)) {
        // One shard's read lock at a time, held while its hosts are counted.
        for shard in self.shards.iter() {
            let m = shard.read();
            for e in m.iter() {
                let rec = &e.rec;
                for a in rec.agents.iter() {
                    f(
                        &e.host,
                        self.resolve(a.name, &self.names, rec),
                        self.resolve(a.version, &self.names, rec),
                        self.resolve(a.status, &self.statuses, rec),
                    );
                }
            }
        }
    }

    fn hostnames(&self, keep: &dyn Fn(&str) -> bool) -> Vec<String> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let m = shard.read();
            out.extend(
                m.iter()
                    .filter(|e| keep(&e.host))
                    .map(|e| e.host.to_string()),
            );
        }
        out.sort_unstable();
        out
    }

    fn sweep(&self, older_than: i64) -> usize {
        let mut dropped = 0;
        for shard in self.shards.iter() {
            let mut m = shard.write();
            let before = m.len();
            m.retain(|e| e.rec.last_seen >= older_than);
            if m.len() != before {
                shard.changed();
            }
            dropped += before - m.len();
            // Give memory back after a large fleet shrank.
            if m.capacity() > 64 && m.len() < m.capacity() / 4 {
                m.shrink_to_fit(|e| self.hash(&e.host));
            }
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records owned agents, as the BootAgent path does.
    fn put(s: &MemStore, host: &str, agents: &[RealAgent], now: i64) {
        let refs: Vec<RealAgentRef> = agents.iter().map(RealAgentRef::from).collect();
        s.record(host, &refs, now);
    }

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
        put(&s, "h1", &[agent("a", "1", "started", 10)], 100);
        put(&s, "h2", &[agent("b", "2", "stoped", 11)], 100);
        put(&s, "h3", &[], 100);
        assert_eq!(s.host_count(), 3);
        let st = s.agent_status("a").to_host_agents();
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
        put(&s, "h1", &[agent("b", "3", "started", 20)], 200);
        assert_eq!(s.host("h1"), Some(vec![agent("b", "3", "started", 20)]));
        assert_eq!(s.agent_status("a").get(0).unwrap().agent, None);
        assert_eq!(s.host("nope"), None);
    }

    #[test]
    fn known_host_is_updated_in_place_and_changes_of_any_kind_are_kept() {
        let s = MemStore::new();
        let a1 = agent("a", "1", "started", 10);
        let b1 = agent("b", "1", "stoped", 10);
        put(&s, "h", &[a1.clone(), b1.clone()], 100);
        // Nothing but timestamps changed: taken in place.
        put(
            &s,
            "h",
            &[
                agent("a", "1", "started", 20),
                agent("b", "1", "stoped", 21),
            ],
            200,
        );
        assert_eq!(
            s.host("h").unwrap(),
            vec![
                agent("a", "1", "started", 20),
                agent("b", "1", "stoped", 21)
            ]
        );
        assert_eq!(
            s.sweep(150),
            0,
            "last_seen moved on with the in-place update"
        );
        // Same count, one status changed.
        put(&s, "h", &[a1.clone(), agent("b", "1", "started", 22)], 300);
        assert_eq!(
            s.host("h").unwrap(),
            vec![a1.clone(), agent("b", "1", "started", 22)]
        );
        // Same count, order swapped: stored in the order reported.
        put(&s, "h", &[agent("b", "1", "started", 23), a1.clone()], 300);
        assert_eq!(
            s.host("h").unwrap(),
            vec![agent("b", "1", "started", 23), a1.clone()]
        );
        // The agent set grows, shrinks, empties and comes back.
        let c = agent("c", "3", "started", 30);
        put(&s, "h", &[a1.clone(), b1.clone(), c.clone()], 400);
        assert_eq!(
            s.host("h").unwrap(),
            vec![a1.clone(), b1.clone(), c.clone()]
        );
        put(&s, "h", std::slice::from_ref(&c), 500);
        assert_eq!(s.host("h").unwrap(), vec![c.clone()]);
        put(&s, "h", &[], 600);
        assert_eq!(s.host("h").unwrap(), vec![]);
        put(&s, "h", &[], 700);
        assert_eq!(s.host("h").unwrap(), vec![]);
        put(&s, "h", std::slice::from_ref(&a1), 800);
        assert_eq!(s.host("h").unwrap(), vec![a1.clone()]);
        assert_eq!(s.sweep(750), 0);
        assert_eq!(s.host_count(), 1);
        // A status that differs only by the cleaning is the same report.
        put(&s, "h", &[agent("a", "1", "bad\nline", 1)], 900);
        put(&s, "h", &[agent("a", "1", "bad\nline", 2)], 901);
        assert_eq!(s.host("h").unwrap(), vec![agent("a", "1", "bad line", 2)]);
    }

    #[test]
    fn in_place_updates_keep_strings_that_overflowed_the_interners() {
        let s = MemStore::with_caps(2, 1);
        put(&s, "h0", &[agent("a", "1", "started", 1)], 1);
        // Names and statuses beyond the caps are kept per host, and compared from there.
        let odd = [agent("x", "9", "error 1", 1), agent("a", "1", "started", 1)];
        put(&s, "h1", &odd, 1);
        assert_eq!(s.interned(), (2, 1));
        let mut later = odd.clone();
        later[0].timestamp = 5;
        put(&s, "h1", &later, 2);
        assert_eq!(s.host("h1").unwrap(), later);
        later[0].status = "error 2".into();
        put(&s, "h1", &later, 3);
        assert_eq!(s.host("h1").unwrap(), later);
        // Back to interned strings only, then a bigger set mixing both.
        put(&s, "h1", &[agent("a", "1", "started", 7)], 4);
        assert_eq!(s.host("h1").unwrap(), vec![agent("a", "1", "started", 7)]);
        put(
            &s,
            "h1",
            &[agent("a", "1", "started", 8), agent("y", "2", "e", 8)],
            5,
        );
        assert_eq!(
            s.host("h1").unwrap(),
            vec![agent("a", "1", "started", 8), agent("y", "2", "e", 8)]
        );
        let st = s.agent_status("y").to_host_agents();
        assert_eq!(st[1].agent, Some(agent("y", "2", "e", 8)));
        assert_eq!(st[0].agent, None);
    }

    #[test]
    fn agent_status_of_many_hosts_matches_every_record_sorted() {
        let s = MemStore::with_caps(64, 8);
        let mut want = Vec::new();
        for i in 0..5000 {
            let host = format!("h-{:05}", (i * 7919) % 5000);
            let agents = match i % 4 {
                0 => vec![],
                1 => vec![agent("a", &format!("v{}", i % 40), "started", i)],
                2 => vec![
                    agent("b", "1", "stoped", i),
                    agent("a", "2", &format!("error {}", i % 13), i),
                ],
                _ => vec![agent("b", "1", "started", i)],
            };
            put(&s, &host, &agents, 1);
            let a = agents.iter().find(|a| a.name == "a").cloned();
            want.push(HostAgent {
                hostname: host,
                agent: a.map(|mut a| {
                    a.status = clean_status(&a.status).into_owned();
                    a
                }),
            });
        }
        want.sort_by(|x, y| x.hostname.cmp(&y.hostname));
        let got = s.agent_status("a");
        assert_eq!(got.len(), 5000);
        assert_eq!(got.name(), "a");
        assert_eq!(got.to_host_agents(), want);
        assert!(s.agent_status("nope").iter().all(|e| e.agent.is_none()));
    }

    #[test]
    fn for_each_agent_visits_every_agent_of_every_host() {
        let s = MemStore::with_caps(2, 1);
        put(&s, "h1", &[agent("a", "1", "started", 1)], 100);
        put(
            &s,
            "h2",
            &[agent("a", "2", "boom", 1), agent("b", "7", "stoped", 1)],
            100,
        );
        put(&s, "h3", &[], 100);
        let mut got = Vec::new();
        s.for_each_agent(&mut |h, n, v, st| got.push(format!("{h} {n} {v} {st}")));
        got.sort();
        // Past the interners' caps too (host-local strings).
        assert_eq!(got, ["h1 a 1 started", "h2 a 2 boom", "h2 b 7 stoped"]);
    }

    #[test]
    fn agent_status_can_be_built_by_other_backends() {
        let mut st = AgentStatus::new("a");
        assert!(st.is_empty());
        st.push("z", Some(("1", "started", 5)));
        st.push("b", None);
        st.push("m", Some(("2", "stoped", 6)));
        st.sort();
        let got: Vec<_> = st
            .iter()
            .map(|e| (e.hostname, e.agent.map(|a| a.version)))
            .collect();
        assert_eq!(got, vec![("b", None), ("m", Some("2")), ("z", Some("1"))]);
        assert_eq!(st.get(2).unwrap().agent.unwrap().name, "a");
        assert_eq!(st.get(3), None);
    }

    #[test]
    fn generation_changes_with_every_report_and_sweep_only() {
        let s = MemStore::new();
        let g = |s: &MemStore| s.generation().unwrap();
        let g0 = g(&s);
        put(&s, "h", &[agent("a", "1", "started", 1)], 100);
        let g1 = g(&s);
        assert_ne!(g1, g0);
        // Reads change nothing.
        let _ = s.agent_status("a");
        let _ = s.host("h");
        assert_eq!(g(&s), g1);
        // Only a timestamp moved: still a change, the page shows timestamps.
        put(&s, "h", &[agent("a", "1", "started", 2)], 101);
        let g2 = g(&s);
        assert_ne!(g2, g1);
        assert_eq!(s.sweep(50), 0);
        assert_eq!(g(&s), g2);
        assert_eq!(s.sweep(200), 1);
        assert_ne!(g(&s), g2);
    }

    #[test]
    fn sweep_drops_hosts_last_seen_before_the_cutoff() {
        let s = MemStore::new();
        put(&s, "old", &[agent("a", "1", "started", 1)], 100);
        put(&s, "empty-old", &[], 100);
        put(&s, "new", &[agent("a", "1", "started", 1)], 300);
        assert_eq!(s.sweep(200), 2);
        assert_eq!(s.host_count(), 1);
        assert!(s.host("new").is_some());
        // Seen again: kept even though its agents' own timestamps are ancient.
        put(&s, "new", &[agent("a", "1", "started", 1)], 400);
        assert_eq!(s.sweep(350), 0);
    }

    #[test]
    fn statuses_are_capped_and_cleaned() {
        let s = MemStore::new();
        let long = "é".repeat(300);
        put(&s, "h", &[agent("a", "1", &long, 1)], 1);
        let got = s.host("h").unwrap()[0].status.clone();
        assert!(got.len() <= MAX_STATUS_LEN, "{}", got.len());
        assert!(got.chars().all(|c| c == 'é'));
        put(&s, "h", &[agent("a", "1", "error\nh2 1.0 started", 1)], 1);
        assert_eq!(s.host("h").unwrap()[0].status, "error h2 1.0 started");
    }

    #[test]
    fn interner_is_bounded_and_overflow_is_kept_per_host() {
        let s = MemStore::with_caps(4, 2);
        for i in 0..50 {
            put(
                &s,
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
        put(&s, "hx", &[agent("zzz", "1", "started", 1)], 1);
        let st = s.agent_status("zzz").to_host_agents();
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
            put(&s, &format!("web-{i:07}.dc1.example.com"), &agents, 1);
        }
        assert_eq!(s.host_count(), n);
        let per_host = s.approx_bytes() / n;
        assert!(per_host <= 300, "{per_host} bytes per host");
        assert_eq!(s.interned(), (6, 2));
    }
}
