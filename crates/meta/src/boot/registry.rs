//! BootAgent hosts by hostname, with the serial each one registered under, its last status
//! report and its jobs.
//!
//! Invariant: every host holds exactly one serial and `serials[host.serial] == hostname`.
//! Both maps change together under the `serials` lock (registration and sweeps only, which
//! are rare); status reports touch one host shard and never that lock.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};

use parking_lot::{Mutex, RwLock};
use proto::bootagent::AgentStatus;
use proto::{Hostname, Serial};

use super::jobs::HostJobs;

/// Number of host shards; a power of two.
pub const SHARDS: usize = 64;

/// What a host last reported about itself.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The host agent's own version string.
    pub version: String,
    pub uptime: u64,
    pub step: u64,
    /// The host's clock at the report.
    pub timestamp: i64,
    pub agents: Vec<AgentStatus>,
}

/// One registered host.
#[derive(Debug)]
pub struct HostRec {
    pub serial: Serial,
    /// Unix seconds (server clock).
    pub registered: i64,
    /// Unix seconds (server clock) of the last report; `registered` until one comes.
    pub last_seen: i64,
    pub report: Option<Report>,
    pub jobs: HostJobs,
}

/// How a registration went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    /// The serial was already registered to this hostname.
    Kept,
    /// The host sent no serial; a fresh one was issued.
    Issued,
    /// The server did not know the serial; it is now this host's.
    Adopted,
    /// The serial belongs to another hostname (a cloned disk image); a fresh one was issued.
    Cloned,
}

/// Why a status report was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No host holds this serial (or the hostname is registered under another serial
    /// and the serial is unknown).
    Unregistered,
    /// The serial is registered to another hostname.
    Conflict,
}

type Shard = RwLock<HashMap<Hostname, HostRec>>;

/// The registry.
#[derive(Debug)]
pub struct Registry {
    serials: Mutex<HashMap<Serial, Hostname>>,
    shards: Box<[Shard]>,
    hasher: RandomState,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
    }
}

impl Registry {
    pub fn new() -> Registry {
        Registry {
            serials: Mutex::new(HashMap::new()),
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
        }
    }

    fn shard(&self, host: &str) -> &Shard {
        &self.shards[(self.hasher.hash_one(host) as usize) & (SHARDS - 1)]
    }

    /// Registers `hostname` with the serial it sent (`None` when it has none) and returns
    /// the serial it must use from now on. A hostname holds one serial: registering it
    /// under another one replaces the old serial (the host lost its metafile).
    pub fn register(
        &self,
        hostname: &Hostname,
        serial: Option<&Serial>,
        now: i64,
    ) -> (Serial, Registration) {
        let mut serials = self.serials.lock();
        let (serial, how) = match serial {
            None => (new_serial(), Registration::Issued),
            Some(serial) => match serials.get(serial) {
                Some(h) if h == hostname => (serial.clone(), Registration::Kept),
                Some(_) => (new_serial(), Registration::Cloned),
                None => (serial.clone(), Registration::Adopted),
            },
        };
        let mut shard = self.shard(hostname.as_str()).write();
        match shard.get_mut(hostname) {
            Some(rec) if rec.serial == serial => {}
            Some(rec) => {
                tracing::info!(host = %hostname, old = %rec.serial, new = %serial, "host registered under a new serial; the old one is dropped");
                serials.remove(&rec.serial);
                rec.serial = serial.clone();
            }
            None => {
                shard.insert(
                    hostname.clone(),
                    HostRec {
                        serial: serial.clone(),
                        registered: now,
                        last_seen: now,
                        report: None,
                        jobs: HostJobs::default(),
                    },
                );
            }
        }
        serials.insert(serial.clone(), hostname.clone());
        (serial, how)
    }

    /// Runs `f` on the host when `serial` is the one it registered with.
    pub fn with_host<R>(
        &self,
        hostname: &str,
        serial: &str,
        f: impl FnOnce(&mut HostRec) -> R,
    ) -> Result<R, Refusal> {
        {
            let mut shard = self.shard(hostname).write();
            if let Some(rec) = shard.get_mut(hostname) {
                if rec.serial == serial {
                    return Ok(f(rec));
                }
            }
        }
        // Only refusals look at the serial index.
        match self.serials.lock().get(serial) {
            Some(h) if h != hostname => Err(Refusal::Conflict),
            _ => Err(Refusal::Unregistered),
        }
    }

    /// Runs `f` on the host named `hostname`, whatever its serial.
    pub fn with_hostname<R>(&self, hostname: &str, f: impl FnOnce(&mut HostRec) -> R) -> Option<R> {
        self.shard(hostname).write().get_mut(hostname).map(f)
    }

    /// Reads the host named `hostname`.
    pub fn read<R>(&self, hostname: &str, f: impl FnOnce(&HostRec) -> R) -> Option<R> {
        self.shard(hostname).read().get(hostname).map(f)
    }

    /// Every hostname `keep` accepts, sorted.
    pub fn hostnames(&self, mut keep: impl FnMut(&str) -> bool) -> Vec<Hostname> {
        let mut out = Vec::new();
        for s in self.shards.iter() {
            out.extend(s.read().keys().filter(|h| keep(h.as_str())).cloned());
        }
        out.sort();
        out
    }

    /// Number of registered hosts.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets hosts last seen before `older_than`; returns how many.
    pub fn sweep(&self, older_than: i64) -> usize {
        let mut serials = self.serials.lock();
        let mut dropped = 0;
        for s in self.shards.iter() {
            s.write().retain(|_, rec| {
                let keep = rec.last_seen >= older_than;
                if !keep {
                    serials.remove(&rec.serial);
                    dropped += 1;
                }
                keep
            });
        }
        dropped
    }
}

/// A fresh serial: a random UUID.
pub fn new_serial() -> Serial {
    Serial::parse(&super::jobs::new_id()).expect("a UUID is a valid serial")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> Hostname {
        Hostname::parse(s).unwrap()
    }

    #[test]
    fn registration_cases() {
        let r = Registry::new();
        let (s1, how) = r.register(&h("web-1"), None, 0);
        assert_eq!(how, Registration::Issued);
        assert_eq!(
            r.register(&h("web-1"), Some(&s1), 1),
            (s1.clone(), Registration::Kept)
        );
        // A clone of web-1's disk, booted as web-2.
        let (s2, how) = r.register(&h("web-2"), Some(&s1), 2);
        assert_eq!(how, Registration::Cloned);
        assert_ne!(s2, s1);
        assert_eq!(r.with_host("web-1", s1.as_str(), |_| ()), Ok(()));
        assert_eq!(
            r.with_host("web-2", s1.as_str(), |_| ()),
            Err(Refusal::Conflict)
        );
        assert_eq!(r.with_host("web-2", s2.as_str(), |_| ()), Ok(()));
        assert_eq!(
            r.with_host("web-3", "nope", |_| ()),
            Err(Refusal::Unregistered)
        );
        // A serial the server never saw (it restarted): accepted.
        let unseen = Serial::parse("00000000-0000-4000-8000-000000000001").unwrap();
        assert_eq!(
            r.register(&h("db-1"), Some(&unseen), 3).1,
            Registration::Adopted
        );
        // web-1 lost its metafile: the new serial replaces the old one.
        let (s3, _) = r.register(&h("web-1"), None, 4);
        assert_eq!(
            r.with_host("web-1", s1.as_str(), |_| ()),
            Err(Refusal::Unregistered)
        );
        assert_eq!(r.with_host("web-1", s3.as_str(), |_| ()), Ok(()));
        assert_eq!(
            r.register(&h("web-9"), Some(&s1), 5).1,
            Registration::Adopted
        );
        assert_eq!(
            r.hostnames(|h| h.starts_with("web")),
            ["web-1", "web-2", "web-9"]
        );
    }

    #[test]
    fn sweep_forgets_hosts_and_their_serials() {
        let r = Registry::new();
        let (old, _) = r.register(&h("old"), None, 10);
        let (new, _) = r.register(&h("new"), None, 20);
        assert_eq!(r.sweep(15), 1);
        assert_eq!(r.len(), 1);
        assert_eq!(
            r.with_host("old", old.as_str(), |_| ()),
            Err(Refusal::Unregistered)
        );
        // The serial is free again: another host may adopt it without a conflict.
        assert_eq!(
            r.register(&h("other"), Some(&old), 30).1,
            Registration::Adopted
        );
        assert_eq!(r.with_host("new", new.as_str(), |_| ()), Ok(()));
    }
}
