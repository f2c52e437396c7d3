//! `store: "sqlite:PATH"`, the default: one SQLite file (compiled in, nothing to install),
//! created at first start, in WAL mode with `synchronous=FULL`, so a commit is on disk
//! when it returns.
//!
//! One connection, owned by one thread: every operation is a closure sent to it, and its
//! answer comes back on a oneshot channel. Operations are therefore serialized, which is
//! what makes [`Durable::update_boot`] a transaction on the host without any lock of
//! ours. Commits are grouped: the thread takes every operation waiting (up to
//! [`GROUP`]), runs each in a savepoint of one transaction, commits once (one fsync), and
//! only then answers them all, so that a hundred hosts registering at once cost one disk
//! flush, not a hundred, and nothing is answered before it is on disk. One ops-meta per file: the file is `flock`ed while open (a second
//! process is refused with a clear error; use PostgreSQL for several replicas).

use std::path::{Path, PathBuf};
use std::sync::mpsc;

use nix::fcntl::{Flock, FlockArg};
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::oneshot;

use super::{
    decode_agents, encode_agents, encode_event, event_rows, AuditRow, BatchRow, BootRow,
    BootUpdate, Changes, Cursor, DbRow, Durable, EventRow, LegacyRow, LegacySink, RolloutHostRow,
    RolloutRecord, RolloutRow, Snapshot, StoreError, StoreFuture, AUDIT_KEPT, BATCHES_KEPT,
    EVENTS_KEPT, SCHEMA_VERSION,
};
use proto::events::Event;

/// The schema, one entry per version: entry `i` takes the database from version `i` to
/// `i + 1`. Never edit an entry once released; add one.
const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE legacy_hosts (
        hostname TEXT PRIMARY KEY,
        last_seen INTEGER NOT NULL,
        agents TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE boot_hosts (
        hostname TEXT PRIMARY KEY,
        serial TEXT NOT NULL UNIQUE,
        rev INTEGER NOT NULL,
        last_seen INTEGER NOT NULL,
        state TEXT NOT NULL
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        hostname TEXT NOT NULL,
        seq INTEGER NOT NULL,
        body TEXT NOT NULL,
        UNIQUE (hostname, seq)
    );
    CREATE TABLE batches (
        id TEXT PRIMARY KEY,
        created INTEGER NOT NULL,
        body TEXT NOT NULL
    );
    CREATE INDEX batches_created ON batches (created);
",
    "
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        time INTEGER NOT NULL,
        actor TEXT NOT NULL,
        status INTEGER NOT NULL,
        body TEXT NOT NULL
    );
",
    "
    CREATE TABLE rollouts (
        id TEXT PRIMARY KEY,
        agent TEXT NOT NULL,
        rev INTEGER NOT NULL,
        updated INTEGER NOT NULL,
        body TEXT NOT NULL
    );
    CREATE TABLE rollout_hosts (
        rollout TEXT NOT NULL,
        hostname TEXT NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (rollout, hostname)
    ) WITHOUT ROWID;
",
];

/// An operation: runs on the connection and returns what to do once its transaction's
/// commit is known.
type Job = Box<dyn FnOnce(&mut Connection) -> Reply + Send>;
/// Answers an operation with the outcome of the commit that carried it.
type Reply = Box<dyn FnOnce(Result<(), String>) + Send>;

/// Most operations committed together.
const GROUP: usize = 256;

/// The SQLite store.
#[derive(Debug)]
pub struct Sqlite {
    name: String,
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Dropping the store waits for its thread to finish what was sent and close the file
/// (and release its lock), so that the file can be opened again at once.
impl Drop for Sqlite {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn err<'a>(store: &'a str, what: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError + 'a {
    move |source| StoreError::Sqlite {
        store: store.to_string(),
        what,
        source,
    }
}

impl Sqlite {
    /// Opens (creating) the file at `path`, takes its lock and brings its schema up to
    /// [`SCHEMA_VERSION`].
    pub async fn open(path: PathBuf) -> Result<Sqlite, StoreError> {
        let name = format!("sqlite:{}", path.display());
        let (tx, rx) = oneshot::channel();
        let thread_name = name.clone();
        let thread = std::thread::Builder::new()
            .name("ops-meta-sqlite".into())
            .spawn(move || match open_file(&thread_name, &path) {
                Ok((conn, lock)) => {
                    let (jobs, queue) = mpsc::channel::<Job>();
                    let _ = tx.send(Ok(jobs));
                    let mut conn = conn;
                    // Runs until every `Sqlite` handle (and so every sender) is gone.
                    while let Ok(first) = queue.recv() {
                        let mut jobs = vec![first];
                        while jobs.len() < GROUP {
                            match queue.try_recv() {
                                Ok(j) => jobs.push(j),
                                Err(_) => break,
                            }
                        }
                        let began = conn.execute_batch("BEGIN IMMEDIATE");
                        let replies: Vec<Reply> = jobs.into_iter().map(|j| j(&mut conn)).collect();
                        let committed = began
                            .and_then(|()| conn.execute_batch("COMMIT"))
                            .map_err(|e| e.to_string());
                        if committed.is_err() {
                            let _ = conn.execute_batch("ROLLBACK");
                        }
                        for r in replies {
                            r(committed.clone());
                        }
                    }
                    drop(conn);
                    drop(lock);
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            })
            .map_err(|e| StoreError::Other {
                store: name.clone(),
                what: "start its thread",
                message: e.to_string(),
            })?;
        let jobs = rx.await.map_err(|_| StoreError::Other {
            store: name.clone(),
            what: "open",
            message: "its thread ended".into(),
        })??;
        Ok(Sqlite {
            name,
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Runs `f` on the store's thread and returns its result.
    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection, &str) -> Result<T, StoreError> + Send + 'static,
    ) -> StoreFuture<'_, T> {
        let (tx, rx) = oneshot::channel();
        let name = self.name.clone();
        let job: Job = Box::new(move |conn: &mut Connection| {
            let r = f(conn, &name);
            Box::new(move |committed: Result<(), String>| {
                let r = match committed {
                    Ok(()) => r,
                    Err(message) => Err(StoreError::Other {
                        store: name,
                        what: "commit",
                        message,
                    }),
                };
                let _ = tx.send(r);
            })
        });
        let sent = self.jobs.as_ref().map(|j| j.send(job));
        Box::pin(async move {
            if !matches!(sent, Some(Ok(()))) {
                return Err(self.gone());
            }
            rx.await.map_err(|_| self.gone())?
        })
    }

    fn gone(&self) -> StoreError {
        StoreError::Other {
            store: self.name.clone(),
            what: "run a query",
            message: "its thread ended".into(),
        }
    }
}

/// Opens the file, locks it against a second ops-meta, sets the pragmas and migrates.
fn open_file(name: &str, path: &Path) -> Result<(Connection, Flock<std::fs::File>), StoreError> {
    let other = |what: &'static str, message: String| StoreError::Other {
        store: name.to_string(),
        what,
        message,
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        let what = if parent.exists() {
            format!("{} is not a folder", parent.display())
        } else {
            format!("folder {} does not exist", parent.display())
        };
        return Err(other(
            "open",
            format!("{what}: create it, or set \"store\" to a file in a folder that exists"),
        ));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| {
            other(
                "open",
                format!(
                    "{}: {e} (ops-meta needs to create and write this file and its -wal and -shm beside it)",
                    path.display()
                ),
            )
        })?;
    let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        other(
            "lock",
            format!(
                "{}: {e}: another ops-meta uses this file (one process per SQLite file; use PostgreSQL for several)",
                path.display()
            ),
        )
    })?;
    let mut conn = Connection::open(path).map_err(err(name, "open"))?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000;",
    )
    .map_err(err(name, "set WAL mode"))?;
    migrate(name, &mut conn)?;
    Ok((conn, lock))
}

/// Brings the schema to [`SCHEMA_VERSION`], refusing a newer one.
fn migrate(name: &str, conn: &mut Connection) -> Result<(), StoreError> {
    debug_assert_eq!(MIGRATIONS.len() as i64, SCHEMA_VERSION);
    let tx = conn.transaction().map_err(err(name, "migrate"))?;
    tx.execute_batch("CREATE TABLE IF NOT EXISTS meta_schema (version INTEGER NOT NULL)")
        .map_err(err(name, "migrate"))?;
    let found: Option<i64> = tx
        .query_row("SELECT max(version) FROM meta_schema", [], |r| r.get(0))
        .map_err(err(name, "read the schema version"))?;
    let found = found.unwrap_or(0);
    if found > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            store: name.to_string(),
            found,
            known: SCHEMA_VERSION,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        tx.execute_batch(sql).map_err(err(name, "migrate"))?;
        let v = i as i64 + 1;
        tx.execute("DELETE FROM meta_schema", [])
            .map_err(err(name, "migrate"))?;
        tx.execute("INSERT INTO meta_schema (version) VALUES (?1)", [v])
            .map_err(err(name, "migrate"))?;
        tracing::info!(store = %name, version = v, "store schema migrated");
    }
    tx.commit().map_err(err(name, "migrate"))
}

fn boot_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<BootRow> {
    Ok(BootRow {
        hostname: r.get(0)?,
        serial: r.get(1)?,
        rev: r.get(2)?,
        last_seen: r.get(3)?,
        state: r.get(4)?,
    })
}

const BOOT_COLUMNS: &str = "hostname, serial, rev, last_seen, state";

fn write_boot(name: &str, conn: &Connection, row: &BootRow) -> Result<(), StoreError> {
    // This process's memory is the truth: a serial it gave to this host is this host's,
    // whatever row (of a host forgotten in memory, not yet swept here) still holds it.
    conn.execute(
        "DELETE FROM boot_hosts WHERE serial = ?1 AND hostname <> ?2",
        params![row.serial, row.hostname],
    )
    .map_err(err(name, "write a BootAgent host"))?;
    conn.execute(
        "INSERT INTO boot_hosts (hostname, serial, rev, last_seen, state) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (hostname) DO UPDATE SET serial = excluded.serial, rev = excluded.rev,
           last_seen = max(last_seen, excluded.last_seen), state = excluded.state",
        params![row.hostname, row.serial, row.rev, row.last_seen, row.state],
    )
    .map_err(err(name, "write a BootAgent host"))?;
    Ok(())
}

fn read_events(
    name: &str,
    conn: &Connection,
    since: i64,
) -> Result<(Vec<EventRow>, i64), StoreError> {
    let mut st = conn
        .prepare("SELECT id, hostname, body FROM events WHERE id > ?1 ORDER BY id")
        .map_err(err(name, "read events"))?;
    let rows = st
        .query_map([since], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })
        .map_err(err(name, "read events"))?;
    event_rows(
        name,
        since,
        rows.map(|r| r.map_err(err(name, "read events"))),
    )
}

impl Durable for Sqlite {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    fn shared(&self) -> bool {
        false
    }

    fn load(&self, mut legacy: LegacySink) -> StoreFuture<'_, Snapshot> {
        self.run(move |conn, name| {
            let mut snap = Snapshot::default();
            {
                let mut st = conn
                    .prepare("SELECT hostname, last_seen, agents FROM legacy_hosts")
                    .map_err(err(name, "load legacy hosts"))?;
                let rows = st
                    .query_map([], |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, i64>(1)?,
                            r.get::<_, String>(2)?,
                        ))
                    })
                    .map_err(err(name, "load legacy hosts"))?;
                for row in rows {
                    let (hostname, last_seen, agents) =
                        row.map_err(err(name, "load legacy hosts"))?;
                    let agents = decode_agents(name, &hostname, &agents)?;
                    legacy(LegacyRow {
                        hostname,
                        last_seen,
                        agents,
                    });
                    snap.legacy += 1;
                }
            }
            {
                let mut st = conn
                    .prepare(&format!("SELECT {BOOT_COLUMNS} FROM boot_hosts"))
                    .map_err(err(name, "load BootAgent hosts"))?;
                let rows = st
                    .query_map([], boot_row)
                    .map_err(err(name, "load BootAgent hosts"))?;
                for row in rows {
                    snap.boot
                        .push(row.map_err(err(name, "load BootAgent hosts"))?);
                }
            }
            let (events, last) = read_events(name, conn, 0)?;
            snap.events = events;
            snap.cursor.events = last;
            {
                let mut st = conn
                    .prepare("SELECT id, created, body FROM batches ORDER BY created, id")
                    .map_err(err(name, "load batches"))?;
                let rows = st
                    .query_map([], |r| {
                        Ok(BatchRow {
                            id: r.get(0)?,
                            created: r.get(1)?,
                            body: r.get(2)?,
                        })
                    })
                    .map_err(err(name, "load batches"))?;
                for row in rows {
                    snap.batches.push(row.map_err(err(name, "load batches"))?);
                }
            }
            Ok(snap)
        })
    }

    fn put_legacy(&self, rows: Vec<LegacyRow>) -> StoreFuture<'_, ()> {
        self.run(move |conn, name| {
            let tx = conn.savepoint().map_err(err(name, "write legacy hosts"))?;
            {
                let mut st = tx
                    .prepare_cached(
                        "INSERT INTO legacy_hosts (hostname, last_seen, agents) VALUES (?1, ?2, ?3)
                         ON CONFLICT (hostname) DO UPDATE SET last_seen = excluded.last_seen,
                           agents = excluded.agents",
                    )
                    .map_err(err(name, "write legacy hosts"))?;
                for r in &rows {
                    st.execute(params![r.hostname, r.last_seen, encode_agents(&r.agents)])
                        .map_err(err(name, "write legacy hosts"))?;
                }
            }
            tx.commit().map_err(err(name, "write legacy hosts"))
        })
    }

    fn update_boot(&self, hostname: &str, update: BootUpdate) -> StoreFuture<'_, ()> {
        let _ = hostname;
        self.run(move |conn, name| match update(DbRow::NotRead) {
            Some(row) => {
                // One transaction: one fsync, and the serial moves atomically.
                let tx = conn
                    .savepoint()
                    .map_err(err(name, "write a BootAgent host"))?;
                write_boot(name, &tx, &row)?;
                tx.commit().map_err(err(name, "write a BootAgent host"))
            }
            None => Ok(()),
        })
    }

    fn touch_boot(&self, seen: Vec<(String, i64)>) -> StoreFuture<'_, ()> {
        self.run(move |conn, name| {
            let tx = conn
                .savepoint()
                .map_err(err(name, "write last-seen times"))?;
            {
                let mut st = tx
                    .prepare_cached(
                        "UPDATE boot_hosts SET last_seen = max(last_seen, ?2) WHERE hostname = ?1",
                    )
                    .map_err(err(name, "write last-seen times"))?;
                for (host, at) in &seen {
                    st.execute(params![host, at])
                        .map_err(err(name, "write last-seen times"))?;
                }
            }
            tx.commit().map_err(err(name, "write last-seen times"))
        })
    }

    fn boot_hosts(&self, hostnames: &[String]) -> StoreFuture<'_, Vec<BootRow>> {
        let hostnames = hostnames.to_vec();
        self.run(move |conn, name| {
            let mut st = conn
                .prepare_cached(&format!(
                    "SELECT {BOOT_COLUMNS} FROM boot_hosts WHERE hostname = ?1"
                ))
                .map_err(err(name, "read BootAgent hosts"))?;
            let mut out = Vec::new();
            for h in &hostnames {
                if let Some(r) = st
                    .query_row([h], boot_row)
                    .optional()
                    .map_err(err(name, "read BootAgent hosts"))?
                {
                    out.push(r);
                }
            }
            Ok(out)
        })
    }

    fn put_events(&self, hostname: &str, events: &[Event]) -> StoreFuture<'_, ()> {
        let hostname = hostname.to_string();
        let bodies: Vec<(i64, String)> = events
            .iter()
            .map(|e| (e.seq as i64, encode_event(e)))
            .collect();
        self.run(move |conn, name| {
            let tx = conn.savepoint().map_err(err(name, "write events"))?;
            for (seq, body) in &bodies {
                tx.execute(
                    "INSERT OR IGNORE INTO events (hostname, seq, body) VALUES (?1, ?2, ?3)",
                    params![hostname, seq, body],
                )
                .map_err(err(name, "write events"))?;
            }
            tx.execute(
                "DELETE FROM events WHERE hostname = ?1 AND id <= (SELECT id FROM events
                   WHERE hostname = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
                params![hostname, EVENTS_KEPT],
            )
            .map_err(err(name, "write events"))?;
            tx.commit().map_err(err(name, "write events"))
        })
    }

    fn put_batch(&self, row: BatchRow) -> StoreFuture<'_, ()> {
        self.run(move |conn, name| {
            let tx = conn.savepoint().map_err(err(name, "write a batch"))?;
            tx.execute(
                "INSERT OR REPLACE INTO batches (id, created, body) VALUES (?1, ?2, ?3)",
                params![row.id, row.created, row.body],
            )
            .map_err(err(name, "write a batch"))?;
            tx.execute(
                "DELETE FROM batches WHERE id NOT IN
                   (SELECT id FROM batches ORDER BY created DESC, id DESC LIMIT ?1)",
                [BATCHES_KEPT],
            )
            .map_err(err(name, "write a batch"))?;
            tx.commit().map_err(err(name, "write a batch"))
        })
    }

    fn batch(&self, id: &str) -> StoreFuture<'_, Option<BatchRow>> {
        let id = id.to_string();
        self.run(move |conn, name| {
            conn.query_row(
                "SELECT id, created, body FROM batches WHERE id = ?1",
                [id],
                |r| {
                    Ok(BatchRow {
                        id: r.get(0)?,
                        created: r.get(1)?,
                        body: r.get(2)?,
                    })
                },
            )
            .optional()
            .map_err(err(name, "read a batch"))
        })
    }

    fn put_audit(&self, row: AuditRow) -> StoreFuture<'_, i64> {
        self.run(move |conn, name| {
            let tx = conn
                .savepoint()
                .map_err(err(name, "write an audit entry"))?;
            tx.execute(
                "INSERT INTO audit (time, actor, status, body) VALUES (?1, ?2, ?3, ?4)",
                params![row.time, row.actor, row.status, row.body],
            )
            .map_err(err(name, "write an audit entry"))?;
            let id = tx.last_insert_rowid();
            tx.execute("DELETE FROM audit WHERE id <= ?1", [id - AUDIT_KEPT])
                .map_err(err(name, "write an audit entry"))?;
            tx.commit().map_err(err(name, "write an audit entry"))?;
            Ok(id)
        })
    }

    fn finish_audit(&self, row: AuditRow) -> StoreFuture<'_, ()> {
        self.run(move |conn, name| {
            conn.execute(
                "UPDATE audit SET status = ?2, body = ?3 WHERE id = ?1",
                params![row.id, row.status, row.body],
            )
            .map_err(err(name, "write an audit entry"))?;
            Ok(())
        })
    }

    fn audit(&self, before: Option<i64>, limit: usize) -> StoreFuture<'_, Vec<AuditRow>> {
        self.run(move |conn, name| {
            let mut st = conn
                .prepare_cached(
                    "SELECT id, time, actor, status, body FROM audit WHERE id < ?1
                     ORDER BY id DESC LIMIT ?2",
                )
                .map_err(err(name, "read the audit log"))?;
            let rows = st
                .query_map(
                    params![
                        before.unwrap_or(i64::MAX),
                        limit.min(i64::MAX as usize) as i64
                    ],
                    |r| {
                        Ok(AuditRow {
                            id: r.get(0)?,
                            time: r.get(1)?,
                            actor: r.get(2)?,
                            status: r.get(3)?,
                            body: r.get(4)?,
                        })
                    },
                )
                .map_err(err(name, "read the audit log"))?;
            rows.map(|r| r.map_err(err(name, "read the audit log")))
                .collect()
        })
    }

    fn put_rollout(&self, row: RolloutRow, hosts: Vec<RolloutHostRow>) -> StoreFuture<'_, bool> {
        self.run(move |conn, name| {
            let what = "write a rollout";
            let tx = conn.savepoint().map_err(err(name, what))?;
            let held: Option<i64> = tx
                .query_row("SELECT rev FROM rollouts WHERE id = ?1", [&row.id], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(err(name, what))?;
            if held.unwrap_or(0) != row.rev - 1 {
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO rollouts (id, agent, rev, updated, body) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (id) DO UPDATE SET rev = excluded.rev, updated = excluded.updated,
                   body = excluded.body",
                params![row.id, row.agent, row.rev, row.updated, row.body],
            )
            .map_err(err(name, what))?;
            {
                let mut st = tx
                    .prepare_cached(
                        "INSERT INTO rollout_hosts (rollout, hostname, body) VALUES (?1, ?2, ?3)
                         ON CONFLICT (rollout, hostname) DO UPDATE SET body = excluded.body",
                    )
                    .map_err(err(name, what))?;
                for h in &hosts {
                    st.execute(params![row.id, h.hostname, h.body])
                        .map_err(err(name, what))?;
                }
            }
            tx.commit().map_err(err(name, what))?;
            Ok(true)
        })
    }

    fn rollout_revs(&self) -> StoreFuture<'_, Vec<(String, i64)>> {
        self.run(move |conn, name| {
            let what = "read the rollouts";
            let mut st = conn
                .prepare_cached("SELECT id, rev FROM rollouts")
                .map_err(err(name, what))?;
            let rows = st
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(err(name, what))?;
            rows.map(|r| r.map_err(err(name, what))).collect()
        })
    }

    fn rollouts(&self, ids: Option<Vec<String>>) -> StoreFuture<'_, Vec<RolloutRecord>> {
        self.run(move |conn, name| {
            let what = "read the rollouts";
            let mut st = conn
                .prepare_cached("SELECT id, agent, rev, updated, body FROM rollouts")
                .map_err(err(name, what))?;
            let rows: Vec<RolloutRow> = st
                .query_map([], |r| {
                    Ok(RolloutRow {
                        id: r.get(0)?,
                        agent: r.get(1)?,
                        rev: r.get(2)?,
                        updated: r.get(3)?,
                        body: r.get(4)?,
                    })
                })
                .map_err(err(name, what))?
                .collect::<Result<_, _>>()
                .map_err(err(name, what))?;
            let mut hs = conn
                .prepare_cached("SELECT hostname, body FROM rollout_hosts WHERE rollout = ?1")
                .map_err(err(name, what))?;
            let mut out = Vec::new();
            for row in rows {
                if ids.as_ref().is_some_and(|ids| !ids.contains(&row.id)) {
                    continue;
                }
                let hosts = hs
                    .query_map([&row.id], |r| {
                        Ok(RolloutHostRow {
                            hostname: r.get(0)?,
                            body: r.get(1)?,
                        })
                    })
                    .map_err(err(name, what))?
                    .collect::<Result<_, _>>()
                    .map_err(err(name, what))?;
                out.push(RolloutRecord { row, hosts });
            }
            Ok(out)
        })
    }

    fn changes(&self, since: Cursor) -> StoreFuture<'_, Changes> {
        // Nobody else writes this file.
        Box::pin(async move {
            Ok(Changes {
                cursor: since,
                ..Changes::default()
            })
        })
    }

    fn sweep(&self, older_than: i64) -> StoreFuture<'_, u64> {
        self.run(move |conn, name| {
            let tx = conn.savepoint().map_err(err(name, "sweep"))?;
            let mut n = tx
                .execute(
                    "DELETE FROM legacy_hosts WHERE last_seen < ?1",
                    [older_than],
                )
                .map_err(err(name, "sweep"))?;
            n += tx
                .execute("DELETE FROM boot_hosts WHERE last_seen < ?1", [older_than])
                .map_err(err(name, "sweep"))?;
            tx.execute(
                "DELETE FROM events WHERE hostname NOT IN (SELECT hostname FROM legacy_hosts)
                   AND hostname NOT IN (SELECT hostname FROM boot_hosts)",
                [],
            )
            .map_err(err(name, "sweep"))?;
            tx.commit().map_err(err(name, "sweep"))?;
            Ok(n as u64)
        })
    }
}

/// Sets the stored schema version (tests: a database "from a newer ops-meta").
#[doc(hidden)]
pub fn set_schema_version(path: &Path, version: i64) -> Result<(), rusqlite::Error> {
    let conn = Connection::open(path)?;
    conn.execute_batch("CREATE TABLE IF NOT EXISTS meta_schema (version INTEGER NOT NULL)")?;
    conn.execute("DELETE FROM meta_schema", [])?;
    conn.execute("INSERT INTO meta_schema (version) VALUES (?1)", [version])?;
    Ok(())
}
