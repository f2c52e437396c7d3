//! The agent events hosts report (`events` on BootAgent status reports and legacy
//! heartbeats), kept per host in memory for the operator API.
//!
//! Bounded three ways: the newest [`MAX_EVENTS_PER_HOST`] per host, at most
//! [`MAX_EVENT_HOSTS`] hosts, and about [`MAX_EVENT_BYTES`] in all; past a global bound the
//! host that reported events least recently is forgotten first. A host that resends a
//! report (its answer was lost) does not double its events: an event whose seq the host's
//! kept events already hold is dropped. Reports without events never reach this module.
//!
//! Everything here sits behind [`EventStore`]'s few methods, so that a durable backend can
//! replace it without touching the handlers.

use std::collections::{HashMap, VecDeque};

use parking_lot::Mutex;
use proto::events::Event;

/// Events kept per host, the newest.
pub const MAX_EVENTS_PER_HOST: usize = 100;
/// Hosts whose events are kept at once.
pub const MAX_EVENT_HOSTS: usize = 10_000;
/// About how many bytes all kept events may take (text plus [`EVENT_OVERHEAD`] each).
pub const MAX_EVENT_BYTES: usize = 64 << 20;
/// What an event costs beyond its text, for the byte bound: the struct, the list slots.
const EVENT_OVERHEAD: usize = 128;

/// What [`EventStore::record`] did with a report's events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recorded {
    /// New events kept.
    pub added: usize,
    /// Events already held (same host and seq), dropped.
    pub duplicates: usize,
}

/// Bounds of an [`EventStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub per_host: usize,
    pub hosts: usize,
    pub bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            per_host: MAX_EVENTS_PER_HOST,
            hosts: MAX_EVENT_HOSTS,
            bytes: MAX_EVENT_BYTES,
        }
    }
}

#[derive(Debug, Default)]
struct HostEvents {
    /// Oldest first.
    events: VecDeque<Event>,
    bytes: usize,
    /// [`Inner::tick`] of the last report that brought events: the eviction order.
    last: u64,
}

#[derive(Debug, Default)]
struct Inner {
    hosts: HashMap<Box<str>, HostEvents>,
    bytes: usize,
    tick: u64,
}

impl Inner {
    /// Forgets the host that reported events least recently, other than `keep`.
    fn evict_one(&mut self, keep: &str) -> bool {
        let oldest = self
            .hosts
            .iter()
            .filter(|(h, _)| &***h != keep)
            .min_by_key(|(_, e)| e.last)
            .map(|(h, _)| h.clone());
        match oldest.and_then(|h| self.hosts.remove(&h)) {
            Some(gone) => {
                self.bytes -= gone.bytes;
                true
            }
            None => false,
        }
    }
}

/// Every host's recent events (module docs). One lock: only reports that carry events and
/// the operator API take it, never a heartbeat without events.
#[derive(Debug, Default)]
pub struct EventStore {
    inner: Mutex<Inner>,
    limits: Limits,
}

fn cost(e: &Event) -> usize {
    e.text_len() + EVENT_OVERHEAD
}

impl EventStore {
    /// A store with the default bounds.
    pub fn new() -> EventStore {
        EventStore::with_limits(Limits::default())
    }

    /// A store with explicit bounds (tests).
    pub fn with_limits(limits: Limits) -> EventStore {
        EventStore {
            inner: Mutex::new(Inner::default()),
            limits,
        }
    }

    /// Keeps `events` of `host` (a validated hostname), each cut to the protocol's bounds
    /// ([`Event::clean`]), in the order given, dropping those whose seq the host's kept
    /// events already hold.
    pub fn record(&self, host: &str, events: &[Event]) -> Recorded {
        let mut out = Recorded::default();
        if events.is_empty() {
            return out;
        }
        let lim = self.limits;
        let mut g = self.inner.lock();
        let inner = &mut *g;
        inner.tick += 1;
        let tick = inner.tick;
        if !inner.hosts.contains_key(host) && inner.hosts.len() >= lim.hosts {
            inner.evict_one(host);
        }
        let he = inner.hosts.entry(host.into()).or_default();
        he.last = tick;
        for e in events {
            if he.events.iter().any(|k| k.seq == e.seq) {
                out.duplicates += 1;
                continue;
            }
            let e = e.clone().clean();
            let c = cost(&e);
            he.bytes += c;
            inner.bytes += c;
            he.events.push_back(e);
            out.added += 1;
            while he.events.len() > lim.per_host {
                if let Some(old) = he.events.pop_front() {
                    let c = cost(&old);
                    he.bytes -= c;
                    inner.bytes -= c;
                }
            }
        }
        while inner.bytes > lim.bytes && inner.evict_one(host) {}
        out
    }

    /// How many events `host` has kept, and the newest.
    pub fn summary(&self, host: &str) -> (usize, Option<Event>) {
        let g = self.inner.lock();
        match g.hosts.get(host) {
            Some(he) => (he.events.len(), he.events.back().cloned()),
            None => (0, None),
        }
    }

    /// Calls `f` with every kept event of `host` whose seq is above `seq`, oldest first.
    pub fn scan(&self, host: &str, seq: u64, f: &mut dyn FnMut(&Event)) {
        let g = self.inner.lock();
        if let Some(he) = g.hosts.get(host) {
            he.events.iter().filter(|e| e.seq > seq).for_each(f);
        }
    }

    /// Every kept event of `host`, newest last.
    pub fn events(&self, host: &str) -> Vec<Event> {
        let g = self.inner.lock();
        g.hosts
            .get(host)
            .map(|he| he.events.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Forgets the events of every host `keep` refuses (hosts the fleet store forgot);
    /// returns how many hosts went.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) -> usize {
        let mut g = self.inner.lock();
        let inner = &mut *g;
        let before = inner.hosts.len();
        let mut freed = 0;
        inner.hosts.retain(|h, he| {
            let k = keep(h);
            if !k {
                freed += he.bytes;
            }
            k
        });
        inner.bytes -= freed;
        before - inner.hosts.len()
    }

    /// Hosts whose events are kept.
    pub fn host_count(&self) -> usize {
        self.inner.lock().hosts.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64) -> Event {
        Event {
            seq,
            time: seq as i64,
            agent: "a".into(),
            kind: proto::events::KIND_EXITED.into(),
            ..Event::default()
        }
    }

    fn seqs(s: &EventStore, host: &str) -> Vec<u64> {
        s.events(host).iter().map(|e| e.seq).collect()
    }

    #[test]
    fn resent_events_are_not_doubled_and_order_is_kept() {
        let s = EventStore::new();
        let r = s.record("h1", &[ev(5), ev(6)]);
        assert_eq!(
            r,
            Recorded {
                added: 2,
                duplicates: 0
            }
        );
        let r = s.record("h1", &[ev(5), ev(6), ev(7), ev(7)]);
        assert_eq!(
            r,
            Recorded {
                added: 1,
                duplicates: 3
            }
        );
        assert_eq!(seqs(&s, "h1"), [5, 6, 7]);
        // The same seq on another host is another event.
        s.record("h2", &[ev(5)]);
        assert_eq!(seqs(&s, "h2"), [5]);
        let (n, last) = s.summary("h1");
        assert_eq!((n, last.map(|e| e.seq)), (3, Some(7)));
        assert_eq!(s.summary("nope"), (0, None));
    }

    #[test]
    fn bounds_per_host_hosts_and_bytes() {
        let s = EventStore::with_limits(Limits {
            per_host: 3,
            hosts: 2,
            bytes: usize::MAX,
        });
        s.record("h1", &(1..=5).map(ev).collect::<Vec<_>>());
        assert_eq!(seqs(&s, "h1"), [3, 4, 5], "the newest are kept");
        s.record("h2", &[ev(1)]);
        s.record("h1", &[ev(6)]);
        // A third host pushes out the one that reported least recently (h2).
        s.record("h3", &[ev(1)]);
        assert_eq!(s.host_count(), 2);
        assert!(s.events("h2").is_empty());
        assert_eq!(seqs(&s, "h1"), [4, 5, 6]);

        let one = cost(&ev(1).clean());
        let s = EventStore::with_limits(Limits {
            per_host: 100,
            hosts: 100,
            bytes: one * 4,
        });
        s.record("h1", &[ev(1), ev(2)]);
        s.record("h2", &[ev(1), ev(2)]);
        s.record("h3", &[ev(1)]);
        assert!(
            s.events("h1").is_empty(),
            "over the byte bound, h1 went first"
        );
        assert_eq!(s.host_count(), 2);
        // A cut event costs its cut size.
        let big = Event {
            cause: "x".repeat(10_000),
            ..ev(9)
        };
        s.record("h2", &[big]);
        assert_eq!(
            s.events("h2")[2].cause.len(),
            proto::events::MAX_EVENT_CAUSE_LEN
        );
    }

    #[test]
    fn retain_forgets_hosts_and_their_bytes() {
        let s = EventStore::new();
        s.record("h1", &[ev(1)]);
        s.record("h2", &[ev(1)]);
        assert_eq!(s.retain(|h| h == "h2"), 1);
        assert_eq!(s.host_count(), 1);
        assert_eq!(s.inner.lock().bytes, cost(&ev(1).clean()));
    }
}
