//! The durable fleet store: everything ops-meta must not forget across a restart — legacy
//! hosts and their last reports, BootAgent hosts (serial, last report, job queue, results),
//! agent events and operator batches — behind one async, fallible interface, [`Durable`].
//!
//! The in-memory structures ([`crate::store::MemStore`], [`crate::boot::Registry`],
//! [`crate::events::EventStore`]) stay the read cache every request reads from; this
//! module is what they are loaded from at start and written to:
//! - legacy reports through a bounded write-behind queue ([`behind`]): a host's row is
//!   written when its report changes or its last-seen time enters a new minute, in batches;
//!   a report lost to a crash is sent again by the host at its next heartbeat;
//! - everything a host or operator is told was taken (a serial, a queued job, a job result,
//!   an event) is written before the answer goes out ([`Durable::update_boot`],
//!   [`Durable::put_events`], [`Durable::put_batch`]).
//!
//! Backends: [`memory`] (nothing kept, the original's behaviour), [`sqlite`] (one file,
//! WAL, the default) and [`postgres`] (several ops-meta replicas on one database: a
//! BootAgent host's row is read and written under its row lock, so the database, not a
//! replica's memory, decides). The schema is versioned ([`MIGRATIONS`] per backend), applied
//! at start, and a database newer than the binary is refused.

pub mod behind;
pub mod memory;
pub mod postgres;
pub mod sqlite;

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use proto::events::Event;
use proto::legacy::RealAgent;

/// A boxed future of a store operation.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// The schema version this binary writes; a database at a higher version is refused.
pub const SCHEMA_VERSION: i64 = 3;

/// Where the fleet state is kept: the `store` key of `cfg.json`.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreSpec {
    /// Nothing is kept across a restart.
    Memory,
    /// One SQLite file (relative paths are relative to the working directory).
    Sqlite(PathBuf),
    /// A PostgreSQL connection string (`postgres://` or `postgresql://`).
    Postgres(String),
}

impl Default for StoreSpec {
    fn default() -> Self {
        StoreSpec::Sqlite(PathBuf::from(DEFAULT_SQLITE_FILE))
    }
}

/// The SQLite file used when `store` is not set.
pub const DEFAULT_SQLITE_FILE: &str = "ops-meta.db";

impl StoreSpec {
    /// Reads a `store` value. Pure: nothing is opened or resolved.
    pub fn parse(s: &str) -> Result<StoreSpec, String> {
        let shown = s.chars().take(64).collect::<String>();
        if s == "memory" {
            return Ok(StoreSpec::Memory);
        }
        if let Some(path) = s.strip_prefix("sqlite:") {
            if path.is_empty() {
                return Err(
                    "\"sqlite:\" needs a file: \"sqlite:PATH\", e.g. \"sqlite:ops-meta.db\"".into(),
                );
            }
            if path.contains('\0') {
                return Err("the sqlite path holds a NUL byte".into());
            }
            return Ok(StoreSpec::Sqlite(PathBuf::from(path)));
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            return match s.parse::<tokio_postgres::Config>() {
                Ok(c) if !c.get_hosts().is_empty() => Ok(StoreSpec::Postgres(s.to_string())),
                Ok(_) => Err(format!("{} names no host", redact(s))),
                Err(e) => Err(format!("{} is not a PostgreSQL URL: {e}", redact(s))),
            };
        }
        Err(format!(
            "{shown:?} is not \"memory\", \"sqlite:PATH\" or \"postgres://USER@HOST/DB\""
        ))
    }

    /// The backend's name, as `/metrics` and the log show it.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreSpec::Memory => "memory",
            StoreSpec::Sqlite(_) => "sqlite",
            StoreSpec::Postgres(_) => "postgres",
        }
    }
}

/// Shown without a password, so that logs and `-T` never print one.
impl fmt::Display for StoreSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreSpec::Memory => f.write_str("memory"),
            StoreSpec::Sqlite(p) => write!(f, "sqlite:{}", p.display()),
            StoreSpec::Postgres(url) => f.write_str(&redact(url)),
        }
    }
}

impl fmt::Debug for StoreSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A PostgreSQL URL with its password (if any) replaced by `***`.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "the store URL".into(),
    }
}

/// Why the store failed. Messages name the store and what was being done.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {store}: {what}: {source}")]
    Sqlite {
        store: String,
        what: &'static str,
        source: rusqlite::Error,
    },
    #[error("store {store}: {what}: {source}")]
    Postgres {
        store: String,
        what: &'static str,
        source: tokio_postgres::Error,
    },
    #[error("store {store}: {what}: {message}")]
    Other {
        store: String,
        what: &'static str,
        message: String,
    },
    #[error(
        "store {store}: the database's schema is version {found}, newer than this ops-meta knows \
         ({known}): run the ops-meta that upgraded it (or a newer one), or restore a backup \
         taken before the upgrade"
    )]
    TooNew {
        store: String,
        found: i64,
        known: i64,
    },
    #[error("store {store}: {row}: stored data cannot be read: {message}")]
    Corrupt {
        store: String,
        row: String,
        message: String,
    },
}

/// A legacy host's row: its last report and when it was last seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyRow {
    pub hostname: String,
    /// Unix seconds (server clock).
    pub last_seen: i64,
    pub agents: Vec<RealAgent>,
}

/// A BootAgent host's row. `state` is the host's registration, last report and jobs as
/// [`crate::boot::registry`] encodes them; `rev` counts the writes of the row, so that a
/// replica can tell whether its copy is the database's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootRow {
    pub hostname: String,
    pub serial: String,
    pub rev: i64,
    /// Unix seconds (server clock).
    pub last_seen: i64,
    pub state: String,
}

/// An operator batch (`POST /api/jobs`) as kept for `GET /api/jobs/ID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRow {
    pub id: String,
    pub created: i64,
    pub body: String,
}

/// An event of a host, with its position in the store (for replicas catching up).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRow {
    pub id: i64,
    pub hostname: String,
    pub event: Event,
}

/// An operator action of the audit log (`GET /api/audit`): the columns one filters on,
/// and the whole entry as [`proto::ops::AuditEntry`] JSON in `body`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    /// Given by the store ([`Durable::put_audit`]); rises with every entry.
    pub id: i64,
    /// Unix seconds (server clock).
    pub time: i64,
    pub actor: String,
    /// HTTP status answered; 0 while the action runs.
    pub status: i64,
    pub body: String,
}

/// A rollout as kept: its columns, and the rollout without its hosts as JSON in `body`
/// (what [`crate::rollout`] encodes). `rev` counts its writes: a write names the next one
/// and is taken only when the store holds the one before, so replicas and operator actions
/// racing on one rollout never overwrite each other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutRow {
    pub id: String,
    pub agent: String,
    pub rev: i64,
    /// Unix seconds (server clock).
    pub updated: i64,
    pub body: String,
}

/// One host of a rollout (one that was admitted: hosts still pending are computed, not
/// kept), as JSON in `body`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutHostRow {
    pub hostname: String,
    pub body: String,
}

/// A rollout and its hosts, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutRecord {
    pub row: RolloutRow,
    pub hosts: Vec<RolloutHostRow>,
}

/// Where [`Durable::load`] hands legacy rows, one at a time as they are read, so that a
/// million hosts are never held twice.
pub type LegacySink = Box<dyn FnMut(LegacyRow) + Send>;

/// Everything a store holds but its legacy rows, read at start.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Legacy rows handed to the sink.
    pub legacy: usize,
    pub boot: Vec<BootRow>,
    /// Oldest first, per host.
    pub events: Vec<EventRow>,
    /// Oldest first.
    pub batches: Vec<BatchRow>,
    /// The highest event id and boot change number read: where [`Durable::changes`]
    /// continues.
    pub cursor: Cursor,
}

/// How far a replica has read the changes other replicas made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor {
    pub boot: i64,
    pub events: i64,
    pub legacy: i64,
}

/// What other replicas changed since a [`Cursor`].
#[derive(Debug, Default)]
pub struct Changes {
    /// Legacy hosts another replica wrote (to take where they are newer than memory).
    pub legacy: Vec<LegacyRow>,
    pub boot: Vec<BootRow>,
    pub events: Vec<EventRow>,
    pub cursor: Cursor,
}

/// What [`Durable::update_boot`] found in the database for the host.
#[derive(Debug)]
pub enum DbRow {
    /// The backend is not shared: this process's memory is the truth, nothing was read.
    NotRead,
    /// The database has no row for the host.
    Absent,
    /// The database's row, locked until the update commits.
    Row(BootRow),
}

/// The work of one BootAgent update: given what the database holds, change memory and
/// return the row to write (`None`: nothing changed).
pub type BootUpdate = Box<dyn FnOnce(DbRow) -> Option<BootRow> + Send>;

/// Events kept per host in the store, the newest (as in memory).
pub const EVENTS_KEPT: i64 = crate::events::MAX_EVENTS_PER_HOST as i64;
/// Operator batches kept in the store, the newest (as in memory).
pub const BATCHES_KEPT: i64 = crate::boot::MAX_BATCHES as i64;
/// Audit entries kept in a database, the newest.
pub const AUDIT_KEPT: i64 = 100_000;
/// Audit entries kept by `store: "memory"` (in this process only).
pub const AUDIT_KEPT_IN_MEMORY: usize = 10_000;

/// The durable store interface every backend implements.
pub trait Durable: Send + Sync + std::fmt::Debug + 'static {
    /// `memory`, `sqlite` or `postgres`.
    fn kind(&self) -> &'static str;
    /// True when other processes may write the same store (PostgreSQL): BootAgent updates
    /// then read the database's row first, and [`Durable::changes`] is polled.
    fn shared(&self) -> bool;
    /// Everything stored, for the caches at start; legacy rows go to `legacy` as read.
    fn load(&self, legacy: LegacySink) -> StoreFuture<'_, Snapshot>;
    /// Upserts legacy hosts (the write-behind queue's batches).
    fn put_legacy(&self, rows: Vec<LegacyRow>) -> StoreFuture<'_, ()>;
    /// Runs `update` on BootAgent host `hostname` under the database's lock of its row (a
    /// transaction), writes the row it returns, and commits before returning.
    fn update_boot(&self, hostname: &str, update: BootUpdate) -> StoreFuture<'_, ()>;
    /// Raises the last-seen times of BootAgent hosts whose reports changed nothing else
    /// (the write-behind queue's batches): no new revision, nothing another replica must
    /// re-read; a time never goes back.
    fn touch_boot(&self, seen: Vec<(String, i64)>) -> StoreFuture<'_, ()>;
    /// The rows of these BootAgent hosts as the database has them now.
    fn boot_hosts(&self, hostnames: &[String]) -> StoreFuture<'_, Vec<BootRow>>;
    /// Keeps events of `hostname` (a host resending one keeps it once), durably.
    fn put_events(&self, hostname: &str, events: &[Event]) -> StoreFuture<'_, ()>;
    /// Keeps an operator batch, durably.
    fn put_batch(&self, row: BatchRow) -> StoreFuture<'_, ()>;
    /// One operator batch.
    fn batch(&self, id: &str) -> StoreFuture<'_, Option<BatchRow>>;
    /// Keeps an audit entry, durably, and returns the id it got (`row.id` is not read);
    /// the oldest beyond [`AUDIT_KEPT`] go.
    fn put_audit(&self, row: AuditRow) -> StoreFuture<'_, i64>;
    /// Replaces entry `row.id`'s status and body (the outcome of the action), durably.
    fn finish_audit(&self, row: AuditRow) -> StoreFuture<'_, ()>;
    /// Up to `limit` audit entries with an id below `before` (all when `None`), newest
    /// first; every replica's on a shared store.
    fn audit(&self, before: Option<i64>, limit: usize) -> StoreFuture<'_, Vec<AuditRow>>;
    /// What changed after `since` (legacy and BootAgent rows, events), for replicas.
    fn changes(&self, since: Cursor) -> StoreFuture<'_, Changes>;
    /// Writes `row` and these of its hosts (inserted or replaced) in one transaction, when
    /// the store holds revision `row.rev - 1` of the rollout (none at all for
    /// `row.rev == 1`); returns false, writing nothing, when it holds another.
    fn put_rollout(&self, row: RolloutRow, hosts: Vec<RolloutHostRow>) -> StoreFuture<'_, bool>;
    /// Every rollout's id and revision.
    fn rollout_revs(&self) -> StoreFuture<'_, Vec<(String, i64)>>;
    /// The rollouts with these ids (every rollout when `None`), with their hosts.
    fn rollouts(&self, ids: Option<Vec<String>>) -> StoreFuture<'_, Vec<RolloutRecord>>;
    /// Forgets hosts last seen before `older_than`, and the events of hosts it no longer
    /// knows; returns how many hosts went.
    fn sweep(&self, older_than: i64) -> StoreFuture<'_, u64>;
}

/// Opens (creating it when needed) and migrates the store `spec` names.
pub async fn open(spec: &StoreSpec) -> Result<Arc<dyn Durable>, StoreError> {
    Ok(match spec {
        StoreSpec::Memory => Arc::new(memory::Memory::default()),
        StoreSpec::Sqlite(path) => Arc::new(sqlite::Sqlite::open(path.clone()).await?),
        StoreSpec::Postgres(url) => Arc::new(postgres::Postgres::open(url).await?),
    })
}

/// Encodes a legacy report for its row.
pub(crate) fn encode_agents(agents: &[RealAgent]) -> String {
    serde_json::to_string(agents).expect("agents serialize")
}

/// Decodes a legacy report of a row.
pub(crate) fn decode_agents(
    store: &str,
    host: &str,
    s: &str,
) -> Result<Vec<RealAgent>, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt {
        store: store.to_string(),
        row: format!("legacy host {host:?}"),
        message: e.to_string(),
    })
}

/// Encodes an event for its row.
pub(crate) fn encode_event(e: &Event) -> String {
    serde_json::to_string(e).expect("events serialize")
}

/// Decodes an event of a row.
pub(crate) fn decode_event(store: &str, host: &str, s: &str) -> Result<Event, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt {
        store: store.to_string(),
        row: format!("event of {host:?}"),
        message: e.to_string(),
    })
}

/// Decodes rows of the `events` table read after id `since` (in id order), and the
/// highest id read (`since` when none).
pub(crate) fn event_rows(
    store: &str,
    since: i64,
    rows: impl IntoIterator<Item = Result<(i64, String, String), StoreError>>,
) -> Result<(Vec<EventRow>, i64), StoreError> {
    let mut out = Vec::new();
    let mut last = since;
    for row in rows {
        let (id, hostname, body) = row?;
        let event = decode_event(store, &hostname, &body)?;
        last = last.max(id);
        out.push(EventRow {
            id,
            hostname,
            event,
        });
    }
    Ok((out, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_values() {
        assert_eq!(StoreSpec::parse("memory"), Ok(StoreSpec::Memory));
        assert_eq!(
            StoreSpec::parse("sqlite:/var/lib/ops-meta.db"),
            Ok(StoreSpec::Sqlite("/var/lib/ops-meta.db".into()))
        );
        assert!(matches!(
            StoreSpec::parse("postgres://meta:pw@db.example:5432/fleet"),
            Ok(StoreSpec::Postgres(_))
        ));
        for bad in [
            "",
            "sqlite:",
            "mysql://x",
            "Memory",
            "postgres://",
            "redis:x",
        ] {
            let e = StoreSpec::parse(bad).unwrap_err();
            assert!(!e.is_empty(), "{bad:?}");
        }
        assert_eq!(StoreSpec::default().to_string(), "sqlite:ops-meta.db");
        let shown = StoreSpec::parse("postgres://meta:secret@db/fleet")
            .unwrap()
            .to_string();
        assert!(!shown.contains("secret"), "{shown}");
    }
}
