//! `store: "postgres://..."`: one PostgreSQL database shared by any number of ops-meta
//! replicas.
//!
//! The database decides wherever two replicas could disagree. A BootAgent host is updated
//! in a transaction that first takes an advisory lock on its hostname (a row lock cannot
//! cover a host not inserted yet), reads the row and hands it to the update, which
//! replaces the replica's copy when the database's is another revision; so a job is handed
//! out, and its result taken, under one lock whichever replica the host talks to, and two
//! registrations of one hostname are serialized. Every write of a host's row takes the
//! next value of `boot_chg`, which other replicas poll ([`Durable::changes`]) to refresh
//! their caches for the operator's views. Legacy hosts are upserted in batches, one
//! statement per batch (`unnest` of arrays), rows sorted by hostname so that two replicas'
//! batches never deadlock. Plain TCP (no TLS): keep the database on a trusted network.

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures_util::{pin_mut, TryStreamExt};
use tokio_postgres::{NoTls, Row};

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
    CREATE SEQUENCE legacy_chg;
    CREATE TABLE legacy_hosts (
        hostname TEXT PRIMARY KEY,
        last_seen BIGINT NOT NULL,
        agents TEXT NOT NULL,
        chg BIGINT NOT NULL
    );
    CREATE INDEX legacy_hosts_chg ON legacy_hosts (chg);
    CREATE SEQUENCE boot_chg;
    CREATE TABLE boot_hosts (
        hostname TEXT PRIMARY KEY,
        serial TEXT NOT NULL UNIQUE,
        rev BIGINT NOT NULL,
        chg BIGINT NOT NULL,
        last_seen BIGINT NOT NULL,
        state TEXT NOT NULL
    );
    CREATE INDEX boot_hosts_chg ON boot_hosts (chg);
    CREATE TABLE events (
        id BIGSERIAL PRIMARY KEY,
        hostname TEXT NOT NULL,
        seq BIGINT NOT NULL,
        body TEXT NOT NULL,
        UNIQUE (hostname, seq)
    );
    CREATE TABLE batches (
        id TEXT PRIMARY KEY,
        created BIGINT NOT NULL,
        body TEXT NOT NULL
    );
    CREATE INDEX batches_created ON batches (created);
",
    "
    CREATE TABLE audit (
        id BIGSERIAL PRIMARY KEY,
        time BIGINT NOT NULL,
        actor TEXT NOT NULL,
        status BIGINT NOT NULL,
        body TEXT NOT NULL
    );
",
    "
    CREATE TABLE rollouts (
        id TEXT PRIMARY KEY,
        agent TEXT NOT NULL,
        rev BIGINT NOT NULL,
        updated BIGINT NOT NULL,
        body TEXT NOT NULL
    );
    CREATE TABLE rollout_hosts (
        rollout TEXT NOT NULL,
        hostname TEXT NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (rollout, hostname)
    );
",
];

/// Key of the advisory lock migrations run under, so that replicas starting together
/// migrate once.
const MIGRATION_LOCK: i64 = 0x6f70_735f_6d65_7461;

/// Connections per replica.
const POOL_SIZE: usize = 16;

/// Sequence numbers (and event ids) re-read behind the cursor at each poll: a
/// transaction that took its number before another but committed after it is still seen.
const LOOKBACK: i64 = 1024;
/// The same for legacy rows, which come in batches of up to
/// [`super::behind::MAX_BATCH`] per replica: re-read only every
/// [`LEGACY_LOOKBACK_EVERY`] polls, since most polls would re-read that many rows for
/// nothing.
const LEGACY_LOOKBACK: i64 = 8 * super::behind::MAX_BATCH as i64;
const LEGACY_LOOKBACK_EVERY: u64 = 20;
/// Most legacy rows one poll reads; the next poll goes on from there.
const LEGACY_PER_POLL: i64 = 100_000;

/// The PostgreSQL store.
pub struct Postgres {
    name: String,
    pool: Pool,
    polls: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres")
            .field("name", &self.name)
            .finish()
    }
}

fn err<'a>(
    store: &'a str,
    what: &'static str,
) -> impl FnOnce(tokio_postgres::Error) -> StoreError + 'a {
    move |source| StoreError::Postgres {
        store: store.to_string(),
        what,
        source,
    }
}

const BOOT_COLUMNS: &str = "hostname, serial, rev, last_seen, state";

fn boot_row(r: &Row) -> BootRow {
    BootRow {
        hostname: r.get(0),
        serial: r.get(1),
        rev: r.get(2),
        last_seen: r.get(3),
        state: r.get(4),
    }
}

impl Postgres {
    /// Connects (checking the server answers) and migrates.
    pub async fn open(url: &str) -> Result<Postgres, StoreError> {
        let name = super::redact(url);
        let cfg: tokio_postgres::Config = url.parse().map_err(err(&name, "read the URL"))?;
        let mgr = Manager::from_config(
            cfg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(POOL_SIZE)
            .build()
            .map_err(|e| StoreError::Other {
                store: name.clone(),
                what: "build its connection pool",
                message: e.to_string(),
            })?;
        let pg = Postgres {
            name,
            pool,
            polls: std::sync::atomic::AtomicU64::new(0),
        };
        pg.migrate().await?;
        Ok(pg)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(source) => StoreError::Postgres {
                store: self.name.clone(),
                what: "connect",
                source,
            },
            other => StoreError::Other {
                store: self.name.clone(),
                what: "connect",
                message: other.to_string(),
            },
        })
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let name = &self.name;
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(err(name, "migrate"))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(err(name, "migrate"))?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS meta_schema (version BIGINT NOT NULL)")
            .await
            .map_err(err(name, "migrate"))?;
        let found: Option<i64> = tx
            .query_one("SELECT max(version) FROM meta_schema", &[])
            .await
            .map_err(err(name, "read the schema version"))?
            .get(0);
        let found = found.unwrap_or(0);
        if found > SCHEMA_VERSION {
            return Err(StoreError::TooNew {
                store: name.clone(),
                found,
                known: SCHEMA_VERSION,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            let v = i as i64 + 1;
            tx.batch_execute(sql).await.map_err(err(name, "migrate"))?;
            tx.execute("DELETE FROM meta_schema", &[])
                .await
                .map_err(err(name, "migrate"))?;
            tx.execute("INSERT INTO meta_schema (version) VALUES ($1)", &[&v])
                .await
                .map_err(err(name, "migrate"))?;
            tracing::info!(store = %name, version = v, "store schema migrated");
        }
        tx.commit().await.map_err(err(name, "migrate"))
    }

    async fn read_events(
        &self,
        c: &tokio_postgres::Client,
        since: i64,
    ) -> Result<(Vec<EventRow>, i64), StoreError> {
        let name = &self.name;
        let rows = c
            .query(
                "SELECT id, hostname, body FROM events WHERE id > $1 ORDER BY id",
                &[&since],
            )
            .await
            .map_err(err(name, "read events"))?;
        event_rows(
            name,
            since,
            rows.iter().map(|r| Ok((r.get(0), r.get(1), r.get(2)))),
        )
    }
}

impl Durable for Postgres {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn shared(&self) -> bool {
        true
    }

    fn load(&self, mut legacy: LegacySink) -> StoreFuture<'_, Snapshot> {
        Box::pin(async move {
            let name = &self.name;
            let c = self.client().await?;
            let mut snap = Snapshot::default();
            // Streamed: a million rows are decoded as they arrive, not held twice.
            let rows = c
                .query_raw(
                    "SELECT hostname, last_seen, agents, chg FROM legacy_hosts",
                    std::iter::empty::<&str>(),
                )
                .await
                .map_err(err(name, "load legacy hosts"))?;
            pin_mut!(rows);
            while let Some(r) = rows
                .try_next()
                .await
                .map_err(err(name, "load legacy hosts"))?
            {
                let hostname: String = r.get(0);
                let agents = decode_agents(name, &hostname, r.get(2))?;
                snap.cursor.legacy = snap.cursor.legacy.max(r.get::<_, i64>(3));
                legacy(LegacyRow {
                    hostname,
                    last_seen: r.get(1),
                    agents,
                });
                snap.legacy += 1;
            }
            let rows = c
                .query(&format!("SELECT {BOOT_COLUMNS}, chg FROM boot_hosts"), &[])
                .await
                .map_err(err(name, "load BootAgent hosts"))?;
            for r in rows {
                snap.cursor.boot = snap.cursor.boot.max(r.get::<_, i64>(5));
                snap.boot.push(boot_row(&r));
            }
            let (events, last) = self.read_events(&c, 0).await?;
            snap.events = events;
            snap.cursor.events = last;
            let rows = c
                .query(
                    "SELECT id, created, body FROM batches ORDER BY created, id",
                    &[],
                )
                .await
                .map_err(err(name, "load batches"))?;
            snap.batches = rows
                .iter()
                .map(|r| BatchRow {
                    id: r.get(0),
                    created: r.get(1),
                    body: r.get(2),
                })
                .collect();
            Ok(snap)
        })
    }

    fn put_legacy(&self, mut rows: Vec<LegacyRow>) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let name = &self.name;
            rows.sort_by(|a, b| a.hostname.cmp(&b.hostname));
            rows.dedup_by(|b, a| a.hostname == b.hostname);
            let hosts: Vec<&str> = rows.iter().map(|r| r.hostname.as_str()).collect();
            let seen: Vec<i64> = rows.iter().map(|r| r.last_seen).collect();
            let agents: Vec<String> = rows.iter().map(|r| encode_agents(&r.agents)).collect();
            let c = self.client().await?;
            c.execute(
                "INSERT INTO legacy_hosts (hostname, last_seen, agents, chg)
                 SELECT h, s, a, nextval('legacy_chg')
                   FROM unnest($1::text[], $2::bigint[], $3::text[]) AS t (h, s, a)
                 ON CONFLICT (hostname) DO UPDATE SET last_seen = excluded.last_seen,
                   agents = excluded.agents, chg = excluded.chg
                 WHERE excluded.last_seen >= legacy_hosts.last_seen",
                &[&hosts, &seen, &agents],
            )
            .await
            .map_err(err(name, "write legacy hosts"))?;
            Ok(())
        })
    }

    fn update_boot(&self, hostname: &str, update: BootUpdate) -> StoreFuture<'_, ()> {
        let hostname = hostname.to_string();
        Box::pin(async move {
            let name = &self.name;
            let mut c = self.client().await?;
            let tx = c
                .transaction()
                .await
                .map_err(err(name, "update a BootAgent host"))?;
            tx.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                &[&hostname],
            )
            .await
            .map_err(err(name, "lock a BootAgent host"))?;
            let found = tx
                .query_opt(
                    &format!("SELECT {BOOT_COLUMNS} FROM boot_hosts WHERE hostname = $1"),
                    &[&hostname],
                )
                .await
                .map_err(err(name, "read a BootAgent host"))?;
            let db = match found {
                Some(r) => DbRow::Row(boot_row(&r)),
                None => DbRow::Absent,
            };
            if let Some(row) = update(db) {
                tx.execute(
                    "INSERT INTO boot_hosts (hostname, serial, rev, chg, last_seen, state)
                     VALUES ($1, $2, $3, nextval('boot_chg'), $4, $5)
                     ON CONFLICT (hostname) DO UPDATE SET serial = excluded.serial,
                       rev = excluded.rev, chg = excluded.chg,
                       last_seen = GREATEST(boot_hosts.last_seen, excluded.last_seen),
                       state = excluded.state",
                    &[
                        &row.hostname,
                        &row.serial,
                        &row.rev,
                        &row.last_seen,
                        &row.state,
                    ],
                )
                .await
                .map_err(err(name, "write a BootAgent host"))?;
            }
            tx.commit()
                .await
                .map_err(err(name, "commit a BootAgent host"))
        })
    }

    fn touch_boot(&self, seen: Vec<(String, i64)>) -> StoreFuture<'_, ()> {
        let (hosts, times): (Vec<String>, Vec<i64>) = seen.into_iter().unzip();
        Box::pin(async move {
            let c = self.client().await?;
            c.execute(
                "UPDATE boot_hosts b SET last_seen = GREATEST(b.last_seen, u.at)
                 FROM unnest($1::text[], $2::bigint[]) AS u(hostname, at)
                 WHERE b.hostname = u.hostname AND b.last_seen < u.at",
                &[&hosts, &times],
            )
            .await
            .map_err(err(&self.name, "write last-seen times"))?;
            Ok(())
        })
    }

    fn boot_hosts(&self, hostnames: &[String]) -> StoreFuture<'_, Vec<BootRow>> {
        let hostnames = hostnames.to_vec();
        Box::pin(async move {
            let c = self.client().await?;
            let rows = c
                .query(
                    &format!("SELECT {BOOT_COLUMNS} FROM boot_hosts WHERE hostname = ANY($1)"),
                    &[&hostnames],
                )
                .await
                .map_err(err(&self.name, "read BootAgent hosts"))?;
            Ok(rows.iter().map(boot_row).collect())
        })
    }

    fn put_events(&self, hostname: &str, events: &[Event]) -> StoreFuture<'_, ()> {
        let hostname = hostname.to_string();
        let seqs: Vec<i64> = events.iter().map(|e| e.seq as i64).collect();
        let bodies: Vec<String> = events.iter().map(encode_event).collect();
        Box::pin(async move {
            let name = &self.name;
            let c = self.client().await?;
            c.execute(
                "INSERT INTO events (hostname, seq, body)
                 SELECT $1::text, * FROM unnest($2::bigint[], $3::text[])
                 ON CONFLICT (hostname, seq) DO NOTHING",
                &[&hostname, &seqs, &bodies],
            )
            .await
            .map_err(err(name, "write events"))?;
            c.execute(
                "DELETE FROM events WHERE hostname = $1 AND id <= (SELECT id FROM events
                   WHERE hostname = $1 ORDER BY id DESC LIMIT 1 OFFSET $2)",
                &[&hostname, &EVENTS_KEPT],
            )
            .await
            .map_err(err(name, "write events"))?;
            Ok(())
        })
    }

    fn put_batch(&self, row: BatchRow) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let name = &self.name;
            let c = self.client().await?;
            c.execute(
                "INSERT INTO batches (id, created, body) VALUES ($1, $2, $3)
                 ON CONFLICT (id) DO UPDATE SET body = excluded.body",
                &[&row.id, &row.created, &row.body],
            )
            .await
            .map_err(err(name, "write a batch"))?;
            c.execute(
                "DELETE FROM batches WHERE created < (SELECT created FROM batches
                   ORDER BY created DESC LIMIT 1 OFFSET $1)",
                &[&BATCHES_KEPT],
            )
            .await
            .map_err(err(name, "write a batch"))?;
            Ok(())
        })
    }

    fn batch(&self, id: &str) -> StoreFuture<'_, Option<BatchRow>> {
        let id = id.to_string();
        Box::pin(async move {
            let c = self.client().await?;
            let r = c
                .query_opt(
                    "SELECT id, created, body FROM batches WHERE id = $1",
                    &[&id],
                )
                .await
                .map_err(err(&self.name, "read a batch"))?;
            Ok(r.map(|r| BatchRow {
                id: r.get(0),
                created: r.get(1),
                body: r.get(2),
            }))
        })
    }

    fn put_audit(&self, row: AuditRow) -> StoreFuture<'_, i64> {
        Box::pin(async move {
            let name = &self.name;
            let c = self.client().await?;
            let id: i64 = c
                .query_one(
                    "INSERT INTO audit (time, actor, status, body) VALUES ($1, $2, $3, $4)
                     RETURNING id",
                    &[&row.time, &row.actor, &row.status, &row.body],
                )
                .await
                .map_err(err(name, "write an audit entry"))?
                .get(0);
            c.execute("DELETE FROM audit WHERE id <= $1", &[&(id - AUDIT_KEPT)])
                .await
                .map_err(err(name, "write an audit entry"))?;
            Ok(id)
        })
    }

    fn finish_audit(&self, row: AuditRow) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let c = self.client().await?;
            c.execute(
                "UPDATE audit SET status = $2, body = $3 WHERE id = $1",
                &[&row.id, &row.status, &row.body],
            )
            .await
            .map_err(err(&self.name, "write an audit entry"))?;
            Ok(())
        })
    }

    fn put_rollout(&self, row: RolloutRow, hosts: Vec<RolloutHostRow>) -> StoreFuture<'_, bool> {
        Box::pin(async move {
            let name = &self.name;
            let what = "write a rollout";
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(err(name, what))?;
            // Writers of one rollout queue on its row lock (or on the id, for a new one).
            tx.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('rollout:' || $1, 0))",
                &[&row.id],
            )
            .await
            .map_err(err(name, what))?;
            let held: Option<i64> = tx
                .query_opt("SELECT rev FROM rollouts WHERE id = $1", &[&row.id])
                .await
                .map_err(err(name, what))?
                .map(|r| r.get(0));
            if held.unwrap_or(0) != row.rev - 1 {
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO rollouts (id, agent, rev, updated, body) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (id) DO UPDATE SET rev = excluded.rev, updated = excluded.updated,
                   body = excluded.body",
                &[&row.id, &row.agent, &row.rev, &row.updated, &row.body],
            )
            .await
            .map_err(err(name, what))?;
            if !hosts.is_empty() {
                let (names, bodies): (Vec<String>, Vec<String>) =
                    hosts.into_iter().map(|h| (h.hostname, h.body)).unzip();
                tx.execute(
                    "INSERT INTO rollout_hosts (rollout, hostname, body)
                     SELECT $1, h, b FROM unnest($2::text[], $3::text[]) AS t(h, b)
                     ON CONFLICT (rollout, hostname) DO UPDATE SET body = excluded.body",
                    &[&row.id, &names, &bodies],
                )
                .await
                .map_err(err(name, what))?;
            }
            tx.commit().await.map_err(err(name, what))?;
            Ok(true)
        })
    }

    fn rollout_revs(&self) -> StoreFuture<'_, Vec<(String, i64)>> {
        Box::pin(async move {
            let c = self.client().await?;
            let rows = c
                .query("SELECT id, rev FROM rollouts", &[])
                .await
                .map_err(err(&self.name, "read the rollouts"))?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    fn rollouts(&self, ids: Option<Vec<String>>) -> StoreFuture<'_, Vec<RolloutRecord>> {
        Box::pin(async move {
            let name = &self.name;
            let what = "read the rollouts";
            let c = self.client().await?;
            let rows = c
                .query("SELECT id, agent, rev, updated, body FROM rollouts", &[])
                .await
                .map_err(err(name, what))?;
            let mut out = Vec::new();
            for r in rows {
                let row = RolloutRow {
                    id: r.get(0),
                    agent: r.get(1),
                    rev: r.get(2),
                    updated: r.get(3),
                    body: r.get(4),
                };
                if ids.as_ref().is_some_and(|ids| !ids.contains(&row.id)) {
                    continue;
                }
                let hosts = c
                    .query(
                        "SELECT hostname, body FROM rollout_hosts WHERE rollout = $1",
                        &[&row.id],
                    )
                    .await
                    .map_err(err(name, what))?
                    .iter()
                    .map(|h| RolloutHostRow {
                        hostname: h.get(0),
                        body: h.get(1),
                    })
                    .collect();
                out.push(RolloutRecord { row, hosts });
            }
            Ok(out)
        })
    }

    fn audit(&self, before: Option<i64>, limit: usize) -> StoreFuture<'_, Vec<AuditRow>> {
        Box::pin(async move {
            let c = self.client().await?;
            let rows = c
                .query(
                    "SELECT id, time, actor, status, body FROM audit WHERE id < $1
                     ORDER BY id DESC LIMIT $2",
                    &[
                        &before.unwrap_or(i64::MAX),
                        &(limit.min(i64::MAX as usize) as i64),
                    ],
                )
                .await
                .map_err(err(&self.name, "read the audit log"))?;
            Ok(rows
                .iter()
                .map(|r| AuditRow {
                    id: r.get(0),
                    time: r.get(1),
                    actor: r.get(2),
                    status: r.get(3),
                    body: r.get(4),
                })
                .collect())
        })
    }

    fn changes(&self, since: Cursor) -> StoreFuture<'_, Changes> {
        Box::pin(async move {
            let name = &self.name;
            let c = self.client().await?;
            let rows = c
                .query(
                    &format!(
                        "SELECT {BOOT_COLUMNS}, chg FROM boot_hosts WHERE chg > $1 ORDER BY chg"
                    ),
                    &[&(since.boot - LOOKBACK)],
                )
                .await
                .map_err(err(name, "read changes"))?;
            let mut out = Changes {
                cursor: since,
                ..Changes::default()
            };
            for r in rows {
                out.cursor.boot = out.cursor.boot.max(r.get::<_, i64>(5));
                out.boot.push(boot_row(&r));
            }
            let poll = self
                .polls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let back = if poll.is_multiple_of(LEGACY_LOOKBACK_EVERY) {
                LEGACY_LOOKBACK
            } else {
                0
            };
            let rows = c
                .query(
                    "SELECT hostname, last_seen, agents, chg FROM legacy_hosts
                     WHERE chg > $1 ORDER BY chg LIMIT $2",
                    &[&(since.legacy - back), &LEGACY_PER_POLL],
                )
                .await
                .map_err(err(name, "read changes"))?;
            for r in rows {
                let hostname: String = r.get(0);
                let agents = decode_agents(name, &hostname, r.get(2))?;
                out.cursor.legacy = out.cursor.legacy.max(r.get::<_, i64>(3));
                out.legacy.push(LegacyRow {
                    hostname,
                    last_seen: r.get(1),
                    agents,
                });
            }
            let (events, last) = self.read_events(&c, since.events - LOOKBACK).await?;
            out.events = events;
            out.cursor.events = out.cursor.events.max(last);
            Ok(out)
        })
    }

    fn sweep(&self, older_than: i64) -> StoreFuture<'_, u64> {
        Box::pin(async move {
            let name = &self.name;
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(err(name, "sweep"))?;
            let mut n = tx
                .execute(
                    "DELETE FROM legacy_hosts WHERE last_seen < $1",
                    &[&older_than],
                )
                .await
                .map_err(err(name, "sweep"))?;
            n += tx
                .execute(
                    "DELETE FROM boot_hosts WHERE last_seen < $1",
                    &[&older_than],
                )
                .await
                .map_err(err(name, "sweep"))?;
            tx.execute(
                "DELETE FROM events e WHERE NOT EXISTS (SELECT 1 FROM legacy_hosts l
                   WHERE l.hostname = e.hostname) AND NOT EXISTS (SELECT 1 FROM boot_hosts b
                   WHERE b.hostname = e.hostname)",
                &[],
            )
            .await
            .map_err(err(name, "sweep"))?;
            tx.commit().await.map_err(err(name, "sweep"))?;
            Ok(n)
        })
    }
}
