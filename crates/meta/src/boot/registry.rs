//! BootAgent hosts by hostname, with the serial each one registered under, its last status
//! report and its jobs.
//!
//! Invariant: every host holds exactly one serial and `serials[host.serial] == hostname`.
//! Both maps change together under the `serials` lock (registration, sweeps and rows
//! installed from the store, which are rare); status reports touch one host shard and
//! never that lock.
//!
//! A host is also a row of the durable store ([`crate::persist::BootRow`]): [`Registry::save`]
//! encodes it when something worth keeping changed (anything but the count of answers
//! that carried a job, and the last-seen time within one step), bumping its `rev`;
//! [`Registry::sync`] installs the database's row when it is another revision (another
//! replica wrote it).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};

use parking_lot::{Mutex, RwLock};
use proto::bootagent::AgentStatus;
use proto::{Hostname, Serial};
use serde::{Deserialize, Serialize};

use super::jobs::HostJobs;
use crate::persist::{behind::seen_step, BootRow, DbRow};

/// A registration without a serial, for a host registered this recently that has not
/// reported since, gets the serial it was given then: the answer was lost and the host
/// asks again, or two replicas took the same host's registration at the same instant.
pub const REGISTER_REPEAT_SECS: i64 = 30;

/// Number of host shards; a power of two.
pub const SHARDS: usize = 64;

/// What a host last reported about itself.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
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
    /// Writes of the host's row ([`BootRow::rev`]).
    pub rev: i64,
    /// A hash of what the last write (or load) of the row held, and its last-seen time.
    saved: Option<(u64, i64)>,
}

/// What a host's row keeps beyond its hostname, serial and last-seen time, as read back.
#[derive(Deserialize)]
struct Stored {
    registered: i64,
    report: Option<Report>,
    jobs: HostJobs,
}

/// The same, as written.
#[derive(Serialize)]
struct StoredRef<'a> {
    registered: i64,
    report: Option<&'a Report>,
    jobs: &'a HostJobs,
}

/// A hash of what is worth a write of the host's row: everything but the counters that
/// move with every report (the host's clock, uptimes), which are written with the
/// last-seen time's steps. Computed on every status report, so it streams the JSON of a
/// borrowed view into the hasher: no copy of the report, no string.
fn digest(serial: &str, registered: i64, report: Option<&Report>, jobs: &HostJobs) -> u64 {
    use std::hash::{DefaultHasher, Hasher};

    /// The report without its clock and uptimes.
    #[derive(Serialize)]
    struct Steady<'a> {
        version: &'a str,
        step: u64,
        agents: Vec<(&'a str, &'a str, &'a str)>,
    }
    /// Feeds what is written to the hasher.
    struct Feed(DefaultHasher);
    impl std::io::Write for Feed {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.write(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let steady = report.map(|r| Steady {
        version: &r.version,
        step: r.step,
        agents: r
            .agents
            .iter()
            .map(|a| (a.name.as_str(), a.version.as_str(), a.status.as_str()))
            .collect(),
    });
    let mut feed = Feed(DefaultHasher::new());
    serde_json::to_writer(&mut feed, &(serial, registered, &steady, jobs))
        .expect("a host's state serializes");
    feed.0.finish()
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
    /// The host sent no serial but was registered moments ago and has not reported since:
    /// it got the same serial again ([`REGISTER_REPEAT_SECS`]).
    Repeated,
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
        let repeat = self
            .shard(hostname.as_str())
            .read()
            .get(hostname)
            .filter(|rec| rec.report.is_none() && now - rec.registered < REGISTER_REPEAT_SECS)
            .map(|rec| rec.serial.clone());
        let (serial, how) = match (serial, repeat) {
            (None, Some(again)) => (again, Registration::Repeated),
            (None, None) => (new_serial(), Registration::Issued),
            (Some(serial), _) => match serials.get(serial) {
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
                        rev: 0,
                        saved: None,
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

/// What a host's row needs after a change in memory ([`Registry::settle`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsaved {
    /// Nothing: the row holds what memory does.
    Nothing,
    /// Only its last-seen time entered a new step (now counted as written: queue it).
    Seen,
    /// Something worth a new revision changed: [`Registry::save`] it.
    Row,
}

impl Registry {
    /// What the host's row lacks of memory; `None` when the host is unknown. On
    /// [`Unsaved::Seen`] the last-seen time counts as written from now on, so the caller
    /// must queue it ([`crate::persist::Durable::touch_boot`]).
    pub fn settle(&self, hostname: &str) -> Option<Unsaved> {
        let mut shard = self.shard(hostname).write();
        let rec = shard.get_mut(hostname)?;
        let Some((saved, seen)) = rec.saved.as_mut() else {
            return Some(Unsaved::Row);
        };
        let hash = digest(
            rec.serial.as_str(),
            rec.registered,
            rec.report.as_ref(),
            &rec.jobs,
        );
        Some(if hash != *saved {
            Unsaved::Row
        } else if seen_step(*seen, rec.last_seen) {
            *seen = rec.last_seen;
            Unsaved::Seen
        } else {
            Unsaved::Nothing
        })
    }

    /// The last-seen times of these hosts, those still known.
    pub fn last_seen_of(&self, hostnames: &[&str]) -> Vec<(String, i64)> {
        hostnames
            .iter()
            .filter_map(|h| Some((h.to_string(), self.read(h, |rec| rec.last_seen)?)))
            .collect()
    }
}

/// The BootAgent last-seen queue's rows: each host's last-seen time, from memory.
impl crate::persist::behind::Source for Registry {
    fn flush<'a>(
        &'a self,
        durable: &'a dyn crate::persist::Durable,
        hosts: &'a [&'a str],
    ) -> crate::persist::StoreFuture<'a, usize> {
        let seen = self.last_seen_of(hosts);
        Box::pin(async move {
            let n = seen.len();
            durable.touch_boot(seen).await?;
            Ok(n)
        })
    }
}

impl Registry {
    /// The host's row, when something worth keeping changed since it was last saved (its
    /// `rev` is then bumped); `None` when nothing did or the host is unknown.
    pub fn save(&self, hostname: &str) -> Option<BootRow> {
        let mut shard = self.shard(hostname).write();
        let rec = shard.get_mut(hostname)?;
        let hash = digest(
            rec.serial.as_str(),
            rec.registered,
            rec.report.as_ref(),
            &rec.jobs,
        );
        if let Some((saved, seen)) = rec.saved {
            if saved == hash && !seen_step(seen, rec.last_seen) {
                return None;
            }
        }
        let state = serde_json::to_string(&StoredRef {
            registered: rec.registered,
            report: rec.report.as_ref(),
            jobs: &rec.jobs,
        })
        .expect("a host's state serializes");
        rec.rev += 1;
        rec.saved = Some((hash, rec.last_seen));
        Some(BootRow {
            hostname: hostname.to_string(),
            serial: rec.serial.to_string(),
            rev: rec.rev,
            last_seen: rec.last_seen,
            state,
        })
    }

    /// Makes memory agree with what the database holds for `hostname` (a shared store
    /// read it under the host's lock): the database's row replaces another revision, and
    /// a host the database does not have is forgotten. `NotRead` changes nothing.
    pub fn sync(&self, hostname: &str, db: DbRow) {
        match db {
            DbRow::NotRead => {}
            DbRow::Absent => {
                let mut serials = self.serials.lock();
                if let Some(rec) = self.shard(hostname).write().remove(hostname) {
                    serials.remove(&rec.serial);
                }
            }
            DbRow::Row(row) => {
                let current = self.read(hostname, |rec| rec.rev);
                if current != Some(row.rev) {
                    if let Err(e) = self.install(&row) {
                        tracing::error!(host = %hostname, error = %e, "a stored BootAgent host cannot be read; kept as in memory");
                    }
                }
            }
        }
    }

    /// Installs a stored row (at start, or another replica's newer revision), replacing
    /// what memory holds for that host.
    pub fn install(&self, row: &BootRow) -> Result<(), String> {
        let hostname = Hostname::parse(&row.hostname).map_err(|e| e.to_string())?;
        let serial = Serial::parse(&row.serial).map_err(|e| e.to_string())?;
        let stored: Stored = serde_json::from_str(&row.state).map_err(|e| e.to_string())?;
        let mut serials = self.serials.lock();
        let mut shard = self.shard(hostname.as_str()).write();
        if let Some(old) = shard.get(&hostname) {
            if old.serial != serial {
                serials.remove(&old.serial);
            }
        }
        // A serial another host holds in memory is the database's word now: that host
        // re-registered elsewhere or was forgotten.
        if let Some(other) = serials.get(&serial).filter(|h| **h != hostname).cloned() {
            drop(shard);
            let mut o = self.shard(other.as_str()).write();
            o.remove(&other);
            drop(o);
            shard = self.shard(hostname.as_str()).write();
        }
        serials.insert(serial.clone(), hostname.clone());
        let hash = digest(
            serial.as_str(),
            stored.registered,
            stored.report.as_ref(),
            &stored.jobs,
        );
        shard.insert(
            hostname,
            HostRec {
                serial,
                registered: stored.registered,
                last_seen: row.last_seen,
                report: stored.report,
                jobs: stored.jobs,
                rev: row.rev,
                saved: Some((hash, row.last_seen)),
            },
        );
        Ok(())
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
        let (s3, _) = r.register(&h("web-1"), None, 4 + REGISTER_REPEAT_SECS);
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
    fn a_repeated_registration_before_any_report_keeps_its_serial() {
        let r = Registry::new();
        let (s1, _) = r.register(&h("web-1"), None, 100);
        // The answer was lost, or another replica took the same registration.
        assert_eq!(
            r.register(&h("web-1"), None, 101),
            (s1.clone(), Registration::Repeated)
        );
        // Once the host reported, a registration without a serial is a lost metafile.
        r.with_host("web-1", s1.as_str(), |rec| {
            rec.report = Some(Report::default())
        })
        .unwrap();
        let (s2, how) = r.register(&h("web-1"), None, 102);
        assert_eq!(how, Registration::Issued);
        assert_ne!(s2, s1);
        // And long after the registration, too.
        let (s3, _) = r.register(&h("web-2"), None, 0);
        let (s4, _) = r.register(&h("web-2"), None, REGISTER_REPEAT_SECS);
        assert_ne!(s3, s4);
    }

    #[test]
    fn a_saved_host_reads_back_and_an_unchanged_one_is_not_saved_again() {
        let r = Registry::new();
        let (s, _) = r.register(&h("web-1"), None, 100);
        let row = r.save("web-1").expect("a new host is saved");
        assert_eq!((row.rev, row.serial.as_str()), (1, s.as_str()));
        assert!(r.save("web-1").is_none(), "nothing changed");
        r.with_hostname("web-1", |rec| rec.last_seen = 100 + 120);
        let row = r.save("web-1").expect("last seen entered a new step");
        let other = Registry::new();
        other.install(&row).unwrap();
        assert_eq!(
            other.read("web-1", |rec| (rec.rev, rec.last_seen)),
            Some((2, 220))
        );
        assert_eq!(other.with_host("web-1", s.as_str(), |_| ()), Ok(()));
        assert!(
            other.save("web-1").is_none(),
            "installed rows are saved already"
        );
    }

    #[test]
    fn settle_tells_a_new_revision_from_a_last_seen_step() {
        let r = Registry::new();
        assert_eq!(r.settle("web-1"), None);
        r.register(&h("web-1"), None, 100);
        assert_eq!(r.settle("web-1"), Some(Unsaved::Row), "never saved");
        r.save("web-1").unwrap();
        assert_eq!(r.settle("web-1"), Some(Unsaved::Nothing));
        // Within the step, then into the next one: only the time is due, once.
        r.with_hostname("web-1", |rec| rec.last_seen = 110);
        assert_eq!(r.settle("web-1"), Some(Unsaved::Nothing));
        r.with_hostname("web-1", |rec| rec.last_seen = 185);
        assert_eq!(r.settle("web-1"), Some(Unsaved::Seen));
        assert_eq!(r.settle("web-1"), Some(Unsaved::Nothing));
        assert_eq!(r.last_seen_of(&["web-1", "nope"]), [("web-1".into(), 185)]);
        // A report's uptime alone is no revision; its agents' versions are.
        let report = |version: &str, uptime: u64| Report {
            uptime,
            agents: vec![AgentStatus {
                name: "falcon-agent".into(),
                version: version.into(),
                uptime,
                ..AgentStatus::default()
            }],
            ..Report::default()
        };
        r.with_hostname("web-1", |rec| rec.report = Some(report("1.0", 5)));
        assert_eq!(r.settle("web-1"), Some(Unsaved::Row));
        let rev = r.save("web-1").unwrap().rev;
        r.with_hostname("web-1", |rec| rec.report = Some(report("1.0", 65)));
        assert_eq!(r.settle("web-1"), Some(Unsaved::Nothing));
        r.with_hostname("web-1", |rec| rec.report = Some(report("1.1", 70)));
        assert_eq!(r.settle("web-1"), Some(Unsaved::Row));
        assert_eq!(r.save("web-1").unwrap().rev, rev + 1);
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
