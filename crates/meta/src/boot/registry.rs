//! BootAgent hosts by hostname, with the serial each one registered under, its last status
//! report and its jobs.
//!
//! Invariant: every host holds exactly one serial and `serials[host.serial] == hostname`.
//! Both maps change together under the `serials` lock (registration, sweeps and rows
//! installed from the store, which are rare); status reports touch one host shard and
//! never that lock.
//!
//! Every host holds a credential of its own ([`HostRec::credentials`], SHA-256 only): a
//! registration for its hostname must carry it (or an operator re-admits the host, which
//! clears it), and so must every status report. Rows from before credentials hold none; such
//! a host is given one at its next registration (trust on first use).
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
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use super::jobs::HostJobs;
use crate::persist::{behind::seen_step, BootRow, DbRow};

/// A registration without a serial, for a host registered this recently that has not
/// reported since, gets the serial it was given then: the answer was lost and the host
/// asks again, or two replicas took the same host's registration at the same instant.
pub const REGISTER_REPEAT_SECS: i64 = 30;

/// Most credentials one host holds at once: the one it uses, and those of registrations
/// repeated before its first report (a lost answer, two replicas at the same instant),
/// of which its first status report keeps the one it carried.
pub const MAX_CREDENTIALS: usize = 4;

/// The SHA-256 of a host credential: all the server keeps of it.
pub type CredHash = [u8; 32];

/// The SHA-256 of a credential or secret as presented.
pub fn hash_secret(s: &str) -> CredHash {
    Sha256::digest(s.as_bytes()).into()
}

/// True when `presented` is one of `known`, compared in constant time (every entry is
/// compared, whatever matches).
pub fn matches_any(known: &[CredHash], presented: &CredHash) -> bool {
    let mut hit = subtle::Choice::from(0);
    for k in known {
        hit |= k.ct_eq(presented);
    }
    hit.into()
}

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
    /// SHA-256 of the credentials the host may present (at most [`MAX_CREDENTIALS`]);
    /// empty for a host registered before credentials existed or re-admitted by an
    /// operator, whose next registration is given one.
    pub credentials: Vec<CredHash>,
    /// A hash of what the last write (or load) of the row held, and its last-seen time.
    saved: Option<(u64, i64)>,
}

/// What a host's row keeps beyond its hostname, serial and last-seen time, as read back.
#[derive(Deserialize)]
struct Stored {
    registered: i64,
    report: Option<Report>,
    jobs: HostJobs,
    /// Hex SHA-256 of each credential; absent in rows from before credentials.
    #[serde(default)]
    credentials: Vec<String>,
}

/// The same, as written.
#[derive(Serialize)]
struct StoredRef<'a> {
    registered: i64,
    report: Option<&'a Report>,
    jobs: &'a HostJobs,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    credentials: Vec<String>,
}

/// A hash of what is worth a write of the host's row: everything but the counters that
/// move with every report (the host's clock, uptimes), which are written with the
/// last-seen time's steps. Computed on every status report, so it streams the JSON of a
/// borrowed view into the hasher: no copy of the report, no string.
fn digest(
    serial: &str,
    registered: i64,
    report: Option<&Report>,
    jobs: &HostJobs,
    credentials: &[CredHash],
) -> u64 {
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
    serde_json::to_writer(&mut feed, &(serial, registered, &steady, jobs, credentials))
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
    /// The host holds no credential yet (registered before credentials existed, or
    /// re-admitted): it must register again, which gives it one.
    NoCredential,
    /// The host holds a credential and the report carried none.
    Unauthenticated,
    /// The report carried a credential that is not the host's.
    WrongCredential,
}

/// What a registration presents besides its hostname and serial.
#[derive(Debug, Clone, Copy)]
pub struct Presented {
    /// SHA-256 of the credential it carried (`Authorization: Bearer`).
    pub credential: Option<CredHash>,
    /// True when it may enroll a host without a credential: no enrollment secret is
    /// configured, or it carried one of them.
    pub may_enroll: bool,
    /// SHA-256 of the fresh credential to give the host when it gets one.
    pub fresh: CredHash,
}

/// Why a registration was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// The hostname holds a credential and the registration did not carry it.
    Enrolled,
    /// The host would be given a credential, and the registration carried no accepted
    /// enrollment secret.
    Enrollment,
}

/// A registration taken: the serial the host must use, how, and whether it was given
/// [`Presented::fresh`] as its credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    pub serial: Serial,
    pub how: Registration,
    pub issued: bool,
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
    /// under another one replaces the old serial (the host lost its metafile and an
    /// operator re-admitted it).
    ///
    /// A hostname that holds a credential is registered again only with that credential,
    /// or, before its first report and within [`REGISTER_REPEAT_SECS`] of its registration,
    /// under the same serial it proposed (ops-updater makes its serial before it first
    /// registers, so a retry sends it again): the answer that carried its credential was
    /// lost, and it gets another one beside it. Without a serial, never: anyone can send
    /// none. A host without a credential gets
    /// [`Presented::fresh`] when [`Presented::may_enroll`].
    pub fn register(
        &self,
        hostname: &Hostname,
        serial: Option<&Serial>,
        auth: &Presented,
        now: i64,
    ) -> Result<Admitted, Denied> {
        let mut serials = self.serials.lock();
        let (repeat, issue) = {
            let shard = self.shard(hostname.as_str()).read();
            let rec = shard.get(hostname);
            let fresh = rec
                .filter(|rec| rec.report.is_none() && now - rec.registered < REGISTER_REPEAT_SECS);
            let issue = match rec {
                None => true,
                Some(rec) if rec.credentials.is_empty() => true,
                Some(rec)
                    if auth
                        .credential
                        .is_some_and(|c| matches_any(&rec.credentials, &c)) =>
                {
                    false
                }
                Some(rec)
                    if fresh.is_some()
                        && serial.is_some_and(|s| *s == rec.serial)
                        && rec.credentials.len() < MAX_CREDENTIALS =>
                {
                    true
                }
                Some(_) => return Err(Denied::Enrolled),
            };
            (fresh.map(|rec| rec.serial.clone()), issue)
        };
        if issue && !auth.may_enroll {
            return Err(Denied::Enrollment);
        }
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
            Some(rec) => {
                if rec.serial != serial {
                    tracing::info!(host = %hostname, old = %rec.serial, new = %serial, "host registered under a new serial; the old one is dropped");
                    serials.remove(&rec.serial);
                    rec.serial = serial.clone();
                }
                if issue {
                    rec.credentials.push(auth.fresh);
                }
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
                        credentials: vec![auth.fresh],
                        saved: None,
                    },
                );
            }
        }
        serials.insert(serial.clone(), hostname.clone());
        Ok(Admitted {
            serial,
            how,
            issued: issue,
        })
    }

    /// Forgets the credentials of `hostname` (an operator re-admits a host that lost its
    /// metafile): its next registration is given a new one. Returns its serial and whether
    /// it held any; `None` when no such host is registered.
    pub fn readmit(&self, hostname: &str) -> Option<(Serial, bool)> {
        self.with_hostname(hostname, |rec| {
            let had = !rec.credentials.is_empty();
            rec.credentials.clear();
            (rec.serial.clone(), had)
        })
    }

    /// True when `hostname` is a BootAgent host that holds a credential: a legacy
    /// heartbeat under its name is refused. One hash lookup.
    pub fn holds_credential(&self, hostname: &str) -> bool {
        self.read(hostname, |rec| !rec.credentials.is_empty())
            .unwrap_or(false)
    }

    /// Runs `f` on the host when `serial` is the one it registered with and `credential`
    /// (the SHA-256 of what the request carried) is one of its credentials. The first
    /// report with one of several credentials (repeated registrations) keeps only that one.
    pub fn with_host<R>(
        &self,
        hostname: &str,
        serial: &str,
        credential: Option<&CredHash>,
        f: impl FnOnce(&mut HostRec) -> R,
    ) -> Result<R, Refusal> {
        {
            let mut shard = self.shard(hostname).write();
            if let Some(rec) = shard.get_mut(hostname) {
                if rec.serial == serial {
                    let Some(c) = credential else {
                        return Err(if rec.credentials.is_empty() {
                            Refusal::NoCredential
                        } else {
                            Refusal::Unauthenticated
                        });
                    };
                    if rec.credentials.is_empty() {
                        return Err(Refusal::NoCredential);
                    }
                    if !matches_any(&rec.credentials, c) {
                        return Err(Refusal::WrongCredential);
                    }
                    if rec.credentials.len() > 1 {
                        rec.credentials.retain(|k| bool::from(k.ct_eq(c)));
                    }
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
            &rec.credentials,
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
            &rec.credentials,
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
            credentials: rec.credentials.iter().map(hex::encode).collect(),
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
        let credentials = stored
            .credentials
            .iter()
            .map(|c| {
                let mut k = CredHash::default();
                hex::decode_to_slice(c, &mut k)
                    .map_err(|e| format!("credentials: not a hex SHA-256: {e}"))?;
                Ok(k)
            })
            .collect::<Result<Vec<_>, String>>()?;
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
            &credentials,
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
                credentials,
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

    /// The credential tests give `host` (its hash).
    fn key(host: &str) -> CredHash {
        hash_secret(&format!("credential of {host}"))
    }

    /// Registers as a host that holds no credential yet (a new one, or re-admitted), given
    /// [`key`] when admitted.
    fn open(r: &Registry, host: &str, serial: Option<&Serial>, now: i64) -> (Serial, Registration) {
        r.readmit(host);
        let auth = Presented {
            credential: None,
            may_enroll: true,
            fresh: key(host),
        };
        let a = r.register(&h(host), serial, &auth, now).unwrap();
        (a.serial, a.how)
    }

    fn with(r: &Registry, host: &str, serial: &str) -> Result<(), Refusal> {
        r.with_host(host, serial, Some(&key(host)), |_| ())
    }

    #[test]
    fn registration_cases() {
        let r = Registry::new();
        let (s1, how) = open(&r, "web-1", None, 0);
        assert_eq!(how, Registration::Issued);
        assert_eq!(
            open(&r, "web-1", Some(&s1), 1),
            (s1.clone(), Registration::Kept)
        );
        // A clone of web-1's disk, booted as web-2.
        let (s2, how) = open(&r, "web-2", Some(&s1), 2);
        assert_eq!(how, Registration::Cloned);
        assert_ne!(s2, s1);
        assert_eq!(with(&r, "web-1", s1.as_str()), Ok(()));
        assert_eq!(with(&r, "web-2", s1.as_str()), Err(Refusal::Conflict));
        assert_eq!(with(&r, "web-2", s2.as_str()), Ok(()));
        assert_eq!(with(&r, "web-3", "nope"), Err(Refusal::Unregistered));
        // A serial the server never saw (it restarted): accepted.
        let unseen = Serial::parse("00000000-0000-4000-8000-000000000001").unwrap();
        assert_eq!(open(&r, "db-1", Some(&unseen), 3).1, Registration::Adopted);
        // web-1 lost its metafile: the new serial replaces the old one.
        let (s3, _) = open(&r, "web-1", None, 4 + REGISTER_REPEAT_SECS);
        assert_eq!(with(&r, "web-1", s1.as_str()), Err(Refusal::Unregistered));
        assert_eq!(with(&r, "web-1", s3.as_str()), Ok(()));
        assert_eq!(open(&r, "web-9", Some(&s1), 5).1, Registration::Adopted);
        assert_eq!(
            r.hostnames(|h| h.starts_with("web")),
            ["web-1", "web-2", "web-9"]
        );
    }

    fn auth(credential: Option<&str>, may_enroll: bool, fresh: &str) -> Presented {
        Presented {
            credential: credential.map(hash_secret),
            may_enroll,
            fresh: hash_secret(fresh),
        }
    }

    #[test]
    fn credentials_gate_registration_and_reports() {
        let r = Registry::new();
        let a = r
            .register(&h("web-1"), None, &auth(None, true, "c1"), 100)
            .unwrap();
        assert!(a.issued);
        let s1 = a.serial;
        let report = |c: Option<&str>| {
            r.with_host("web-1", s1.as_str(), c.map(hash_secret).as_ref(), |rec| {
                rec.report = Some(Report::default())
            })
        };
        assert_eq!(report(None), Err(Refusal::Unauthenticated));
        assert_eq!(report(Some("c2")), Err(Refusal::WrongCredential));
        assert_eq!(report(Some("c1")), Ok(()));
        // Enrolled: another registration needs the credential, whatever the serial.
        for (sn, c) in [(None, None), (Some(&s1), None), (Some(&s1), Some("c2"))] {
            assert_eq!(
                r.register(&h("web-1"), sn, &auth(c, true, "x"), 200),
                Err(Denied::Enrolled)
            );
        }
        let again = r
            .register(&h("web-1"), Some(&s1), &auth(Some("c1"), false, "x"), 200)
            .unwrap();
        assert_eq!((again.how, again.issued), (Registration::Kept, false));
        // A new host needs the enrollment secret; another host's credential is no help.
        assert_eq!(
            r.register(&h("web-2"), None, &auth(Some("c1"), false, "c9"), 200),
            Err(Denied::Enrollment)
        );
        // Re-admitted: the next registration gets a new credential; the old one is gone.
        assert_eq!(r.readmit("web-1"), Some((s1.clone(), true)));
        assert_eq!(report(Some("c1")), Err(Refusal::NoCredential));
        assert_eq!(
            r.register(&h("web-1"), None, &auth(None, false, "c3"), 300),
            Err(Denied::Enrollment)
        );
        let back = r
            .register(&h("web-1"), None, &auth(None, true, "c3"), 300)
            .unwrap();
        assert!(back.issued);
        assert_eq!(
            r.with_host(
                "web-1",
                back.serial.as_str(),
                Some(&hash_secret("c3")),
                |_| ()
            ),
            Ok(())
        );
        assert!(r.holds_credential("web-1"));
        assert!(!r.holds_credential("web-2"));
        assert_eq!(r.readmit("nope"), None);
    }

    #[test]
    fn a_lost_register_answer_gets_another_credential_until_the_first_report() {
        let r = Registry::new();
        let sn = Serial::parse("00000000-0000-4000-8000-000000000001").unwrap();
        let a = r
            .register(&h("web-1"), Some(&sn), &auth(None, true, "c1"), 100)
            .unwrap();
        assert!(a.issued);
        // The answer was lost: the same serial again, no credential.
        let b = r
            .register(&h("web-1"), Some(&sn), &auth(None, true, "c2"), 101)
            .unwrap();
        assert!(b.issued && b.serial == sn);
        // Not under another serial, though.
        let other = Serial::parse("00000000-0000-4000-8000-000000000002").unwrap();
        assert_eq!(
            r.register(&h("web-1"), Some(&other), &auth(None, true, "c3"), 102),
            Err(Denied::Enrolled)
        );
        // The first report keeps the credential it carried, and only that one.
        let rep = |c: &str| {
            r.with_host("web-1", sn.as_str(), Some(&hash_secret(c)), |rec| {
                rec.report = Some(Report::default())
            })
        };
        assert_eq!(rep("c2"), Ok(()));
        assert_eq!(rep("c1"), Err(Refusal::WrongCredential));
        assert_eq!(
            r.register(&h("web-1"), Some(&sn), &auth(None, true, "c4"), 103),
            Err(Denied::Enrolled)
        );
        // Past the window, even before a report, a registration needs the credential.
        r.register(&h("web-3"), None, &auth(None, true, "d1"), 100)
            .unwrap();
        assert_eq!(
            r.register(
                &h("web-3"),
                None,
                &auth(None, true, "d2"),
                100 + REGISTER_REPEAT_SECS
            ),
            Err(Denied::Enrolled)
        );
    }

    #[test]
    fn credentials_are_stored_hashed_and_old_rows_get_one_on_first_use() {
        let r = Registry::new();
        let a = r
            .register(&h("web-1"), None, &auth(None, true, "the-credential"), 100)
            .unwrap();
        let row = r.save("web-1").unwrap();
        assert!(!row.state.contains("the-credential"), "{}", row.state);
        assert!(row
            .state
            .contains(&hex::encode(hash_secret("the-credential"))));
        let other = Registry::new();
        other.install(&row).unwrap();
        assert_eq!(
            other.with_host(
                "web-1",
                a.serial.as_str(),
                Some(&hash_secret("the-credential")),
                |_| ()
            ),
            Ok(())
        );
        // A row from before credentials: the same without them.
        let mut state: serde_json::Value = serde_json::from_str(&row.state).unwrap();
        state
            .as_object_mut()
            .unwrap()
            .remove("credentials")
            .unwrap();
        let old = BootRow {
            state: state.to_string(),
            ..row
        };
        let other = Registry::new();
        other.install(&old).unwrap();
        assert!(!other.holds_credential("web-1"));
        assert_eq!(
            other.with_host("web-1", a.serial.as_str(), None, |_| ()),
            Err(Refusal::NoCredential)
        );
        let t = other
            .register(&h("web-1"), Some(&a.serial), &auth(None, true, "new"), 500)
            .unwrap();
        assert_eq!((t.how, t.issued), (Registration::Kept, true));
        // The new credential is worth a write of the row.
        assert_eq!(other.save("web-1").map(|r| r.rev), Some(old.rev + 1));
    }

    #[test]
    fn a_repeated_registration_before_any_report_keeps_its_serial() {
        let r = Registry::new();
        let (s1, _) = open(&r, "web-1", None, 100);
        // The answer was lost, or another replica took the same registration.
        assert_eq!(
            open(&r, "web-1", None, 101),
            (s1.clone(), Registration::Repeated)
        );
        // Once the host reported, a registration without a serial is a lost metafile.
        r.with_host("web-1", s1.as_str(), Some(&key("web-1")), |rec| {
            rec.report = Some(Report::default())
        })
        .unwrap();
        let (s2, how) = open(&r, "web-1", None, 102);
        assert_eq!(how, Registration::Issued);
        assert_ne!(s2, s1);
        // And long after the registration, too.
        let (s3, _) = open(&r, "web-2", None, 0);
        let (s4, _) = open(&r, "web-2", None, REGISTER_REPEAT_SECS);
        assert_ne!(s3, s4);
    }

    #[test]
    fn a_saved_host_reads_back_and_an_unchanged_one_is_not_saved_again() {
        let r = Registry::new();
        let (s, _) = open(&r, "web-1", None, 100);
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
        assert_eq!(with(&other, "web-1", s.as_str()), Ok(()));
        assert!(
            other.save("web-1").is_none(),
            "installed rows are saved already"
        );
    }

    #[test]
    fn settle_tells_a_new_revision_from_a_last_seen_step() {
        let r = Registry::new();
        assert_eq!(r.settle("web-1"), None);
        open(&r, "web-1", None, 100);
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
        let (old, _) = open(&r, "old", None, 10);
        let (new, _) = open(&r, "new", None, 20);
        assert_eq!(r.sweep(15), 1);
        assert_eq!(r.len(), 1);
        assert_eq!(with(&r, "old", old.as_str()), Err(Refusal::Unregistered));
        // The serial is free again: another host may adopt it without a conflict.
        assert_eq!(open(&r, "other", Some(&old), 30).1, Registration::Adopted);
        assert_eq!(with(&r, "new", new.as_str()), Ok(()));
    }
}
