//! One suite for every durable backend (`meta::persist`), run against SQLite and against a
//! throwaway PostgreSQL cluster (test-support starts it; in CI a missing server fails):
//! what is written is read back after reopening, events and batches are deduplicated and
//! bounded, last-seen times only rise, a shared backend hands the update its row, a sweep
//! forgets, and a schema newer than the binary is refused.

use std::sync::{Arc, Mutex};

use meta::persist::{
    self, AuditRow, BatchRow, BootRow, Cursor, DbRow, Durable, LegacyRow, StoreError, StoreSpec,
};
use proto::events::Event;
use proto::legacy::RealAgent;

fn agent(name: &str, version: &str) -> RealAgent {
    RealAgent {
        name: name.into(),
        version: version.into(),
        status: "started".into(),
        timestamp: 1_431_000_000,
    }
}

fn event(seq: u64) -> Event {
    Event {
        seq,
        time: 1_700_000_000 + seq as i64,
        agent: "basic".into(),
        kind: "exited".into(),
        cause: format!("exit code {seq}"),
        ..Event::default()
    }
}

fn boot_row(host: &str, serial: &str, rev: i64, last_seen: i64) -> BootRow {
    BootRow {
        hostname: host.into(),
        serial: serial.into(),
        rev,
        last_seen,
        state: format!("{{\"rev\":{rev}}}"),
    }
}

/// Writes `row` through `update_boot`; returns what the backend showed the update.
async fn put_boot(store: &dyn Durable, row: BootRow) -> String {
    let seen = Arc::new(Mutex::new(String::new()));
    let s = seen.clone();
    let host = row.hostname.clone();
    store
        .update_boot(
            &host,
            Box::new(move |db| {
                *s.lock().unwrap() = match db {
                    DbRow::NotRead => "not read".into(),
                    DbRow::Absent => "absent".into(),
                    DbRow::Row(r) => format!("rev {}", r.rev),
                };
                Some(row)
            }),
        )
        .await
        .unwrap();
    let out = seen.lock().unwrap().clone();
    out
}

/// Everything stored: the snapshot and the legacy rows handed to the sink.
async fn load(store: &dyn Durable) -> (persist::Snapshot, Vec<LegacyRow>) {
    let rows = Arc::new(Mutex::new(Vec::new()));
    let sink = rows.clone();
    let snap = store
        .load(Box::new(move |r| sink.lock().unwrap().push(r)))
        .await
        .unwrap();
    let rows = std::mem::take(&mut *rows.lock().unwrap());
    (snap, rows)
}

async fn suite(spec: StoreSpec) {
    let store = persist::open(&spec).await.unwrap();
    let shared = store.shared();
    let (snap, legacy) = load(&*store).await;
    assert!(legacy.is_empty() && snap.boot.is_empty() && snap.events.is_empty());

    store
        .put_legacy(vec![
            LegacyRow {
                hostname: "web-1".into(),
                last_seen: 100,
                agents: vec![agent("falcon-agent", "1.0.0")],
            },
            LegacyRow {
                hostname: "web-2".into(),
                last_seen: 100,
                agents: vec![],
            },
        ])
        .await
        .unwrap();
    // An upsert replaces the report.
    store
        .put_legacy(vec![LegacyRow {
            hostname: "web-1".into(),
            last_seen: 200,
            agents: vec![agent("falcon-agent", "1.0.1"), agent("other", "2")],
        }])
        .await
        .unwrap();

    let first = put_boot(&*store, boot_row("boot-1", "serial-1", 1, 100)).await;
    let second = put_boot(&*store, boot_row("boot-1", "serial-1", 2, 150)).await;
    if shared {
        assert_eq!((first.as_str(), second.as_str()), ("absent", "rev 1"));
    } else {
        assert_eq!((first.as_str(), second.as_str()), ("not read", "not read"));
    }
    put_boot(&*store, boot_row("boot-2", "serial-2", 1, 10)).await;
    // An update that changes nothing writes nothing.
    store
        .update_boot("boot-2", Box::new(|_| None))
        .await
        .unwrap();
    // Last-seen times alone: raised, never lowered, no new revision; unknown hosts are
    // left alone.
    store
        .touch_boot(vec![("boot-2".into(), 40), ("nope".into(), 50)])
        .await
        .unwrap();
    store.touch_boot(vec![("boot-2".into(), 30)]).await.unwrap();

    store
        .put_events("boot-1", &[event(1), event(2)])
        .await
        .unwrap();
    // A resent report: its events are kept once.
    store
        .put_events("boot-1", &[event(2), event(3)])
        .await
        .unwrap();
    let many: Vec<Event> = (10..130).map(event).collect();
    store.put_events("web-2", &many).await.unwrap();

    for i in 0..3 {
        store
            .put_batch(BatchRow {
                id: format!("batch-{i}"),
                created: 1000 + i,
                body: format!("{{\"n\":{i}}}"),
            })
            .await
            .unwrap();
    }
    assert_eq!(
        store.batch("batch-1").await.unwrap().map(|b| b.body),
        Some("{\"n\":1}".to_string())
    );
    assert_eq!(store.batch("nope").await.unwrap(), None);
    let rows = store
        .boot_hosts(&["boot-1".into(), "nope".into()])
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].rev, 2);

    // Reopened: everything is there.
    drop(store);
    let store = persist::open(&spec).await.unwrap();
    let (mut snap, mut legacy) = load(&*store).await;
    legacy.sort_by(|a, b| a.hostname.cmp(&b.hostname));
    assert_eq!((legacy.len(), snap.legacy), (2, 2));
    assert_eq!(legacy[0].hostname, "web-1");
    assert_eq!(legacy[0].last_seen, 200);
    assert_eq!(legacy[0].agents[0].version, "1.0.1");
    assert_eq!(legacy[0].agents.len(), 2);
    snap.boot.sort_by(|a, b| a.hostname.cmp(&b.hostname));
    assert_eq!(
        snap.boot,
        vec![
            boot_row("boot-1", "serial-1", 2, 150),
            boot_row("boot-2", "serial-2", 1, 40)
        ]
    );
    let seqs = |host: &str| -> Vec<u64> {
        snap.events
            .iter()
            .filter(|e| e.hostname == host)
            .map(|e| e.event.seq)
            .collect()
    };
    assert_eq!(seqs("boot-1"), [1, 2, 3]);
    // Bounded per host: the newest are kept.
    let web2 = seqs("web-2");
    assert_eq!(web2.len(), persist::EVENTS_KEPT as usize);
    assert_eq!(web2.last(), Some(&129));
    assert_eq!(snap.events[0].event, event(1));
    assert_eq!(snap.batches.len(), 3);

    if shared {
        // Another replica's write shows in the changes after the cursor.
        let since = snap.cursor;
        put_boot(&*store, boot_row("boot-2", "serial-2", 2, 20)).await;
        store.put_events("boot-2", &[event(7)]).await.unwrap();
        store
            .put_legacy(vec![LegacyRow {
                hostname: "web-1".into(),
                last_seen: 300,
                agents: vec![agent("falcon-agent", "1.0.2")],
            }])
            .await
            .unwrap();
        // An older report (a replica that heard the host before) does not win.
        store
            .put_legacy(vec![LegacyRow {
                hostname: "web-1".into(),
                last_seen: 250,
                agents: vec![agent("falcon-agent", "0.9")],
            }])
            .await
            .unwrap();
        let ch = store.changes(since).await.unwrap();
        let web1: Vec<_> = ch.legacy.iter().filter(|r| r.hostname == "web-1").collect();
        assert_eq!(web1.len(), 1, "{:?}", ch.legacy);
        assert_eq!(
            (web1[0].last_seen, web1[0].agents[0].version.as_str()),
            (300, "1.0.2")
        );
        assert!(ch.cursor.legacy > since.legacy);
        assert!(ch.boot.iter().any(|r| r.hostname == "boot-2" && r.rev == 2));
        assert!(ch.events.iter().any(|e| e.hostname == "boot-2"));
        assert!(ch.cursor.boot > since.boot && ch.cursor.events > since.events);
    } else {
        let ch = store.changes(Cursor::default()).await.unwrap();
        assert!(ch.boot.is_empty() && ch.events.is_empty());
    }

    // Hosts last seen before 120 go, and the events of hosts no table knows.
    let gone = store.sweep(120).await.unwrap();
    assert_eq!(gone, 2);
    let (snap, rows) = load(&*store).await;
    let mut legacy: Vec<_> = rows.iter().map(|r| r.hostname.as_str()).collect();
    legacy.sort();
    assert_eq!(legacy, ["web-1"]);
    let boot: Vec<_> = snap.boot.iter().map(|r| r.hostname.as_str()).collect();
    assert_eq!(boot, ["boot-1"]);
    assert!(snap.events.iter().all(|e| e.hostname == "boot-1"));
}

fn audit_row(time: i64, actor: &str) -> AuditRow {
    AuditRow {
        id: 0,
        time,
        actor: actor.into(),
        status: 0,
        body: format!("{{\"actor\":\"{actor}\"}}"),
    }
}

/// The audit log: ids rise, an outcome replaces the entry's status and body, pages go
/// newest first below `before`; what was written is there after reopening (but in
/// memory), and a second handle on a shared store sees the first one's entries.
async fn audit_suite(spec: StoreSpec) {
    let store = persist::open(&spec).await.unwrap();
    assert!(store.audit(None, 10).await.unwrap().is_empty());
    let mut ids = Vec::new();
    for (i, actor) in ["ci", "alice", "ci"].iter().enumerate() {
        ids.push(
            store
                .put_audit(audit_row(100 + i as i64, actor))
                .await
                .unwrap(),
        );
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    store
        .finish_audit(AuditRow {
            id: ids[1],
            status: 200,
            body: "{\"actor\":\"alice\",\"outcome\":\"ok\"}".into(),
            ..audit_row(101, "alice")
        })
        .await
        .unwrap();
    let check = |rows: Vec<AuditRow>| {
        let got: Vec<(i64, &str, i64)> = rows
            .iter()
            .map(|r| (r.id, r.actor.as_str(), r.status))
            .collect();
        assert_eq!(
            got,
            [(ids[2], "ci", 0), (ids[1], "alice", 200), (ids[0], "ci", 0)]
        );
        assert!(rows[1].body.contains("\"outcome\":\"ok\""), "{:?}", rows[1]);
        assert_eq!(rows[2].time, 100);
    };
    check(store.audit(None, 10).await.unwrap());
    let page = store.audit(None, 2).await.unwrap();
    assert_eq!(page.len(), 2);
    let rest = store.audit(Some(page[1].id), 2).await.unwrap();
    assert_eq!(rest.iter().map(|r| r.id).collect::<Vec<_>>(), [ids[0]]);
    assert!(store.audit(Some(ids[0]), 10).await.unwrap().is_empty());

    if spec == StoreSpec::Memory {
        return;
    }
    if store.shared() {
        let other = persist::open(&spec).await.unwrap();
        let id = other.put_audit(audit_row(200, "replica-2")).await.unwrap();
        let seen = store.audit(None, 1).await.unwrap();
        assert_eq!((seen[0].id, seen[0].actor.as_str()), (id, "replica-2"));
        drop(other);
        let mut all = store.audit(None, 10).await.unwrap();
        all.remove(0);
        check(all);
        drop(store);
        return;
    }
    drop(store);
    let again = persist::open(&spec).await.unwrap();
    check(again.audit(None, 10).await.unwrap());
    let next = again.put_audit(audit_row(300, "ci")).await.unwrap();
    assert!(next > ids[2], "ids go on rising after a reopen");
}

fn rollout_row(id: &str, rev: i64, body: &str) -> persist::RolloutRow {
    persist::RolloutRow {
        id: id.into(),
        agent: "falcon".into(),
        rev,
        updated: rev * 10,
        body: body.into(),
    }
}

fn rollout_host(h: &str, body: &str) -> persist::RolloutHostRow {
    persist::RolloutHostRow {
        hostname: h.into(),
        body: body.into(),
    }
}

/// Rollouts: a write is taken only over the revision before it, hosts are replaced by
/// name, and everything is read back after a reopen.
async fn rollout_suite(spec: StoreSpec) {
    let store = persist::open(&spec).await.unwrap();
    let hosts = vec![rollout_host("web-1", "a"), rollout_host("web-2", "b")];
    assert!(store
        .put_rollout(rollout_row("r-1", 1, "one"), hosts)
        .await
        .unwrap());
    // A second writer of revision 1 (another replica) loses and writes nothing.
    let lost = vec![rollout_host("web-3", "x")];
    assert!(!store
        .put_rollout(rollout_row("r-1", 1, "other"), lost)
        .await
        .unwrap());
    // Skipping a revision is refused too.
    assert!(!store
        .put_rollout(rollout_row("r-1", 3, "skip"), vec![])
        .await
        .unwrap());
    let next = vec![rollout_host("web-2", "b2")];
    assert!(store
        .put_rollout(rollout_row("r-1", 2, "two"), next)
        .await
        .unwrap());
    assert!(store
        .put_rollout(rollout_row("r-2", 1, "new"), vec![])
        .await
        .unwrap());
    drop(store);
    let store = persist::open(&spec).await.unwrap();
    let mut revs = store.rollout_revs().await.unwrap();
    revs.sort();
    assert_eq!(revs, vec![("r-1".to_string(), 2), ("r-2".to_string(), 1)]);
    let got = store.rollouts(Some(vec!["r-1".into()])).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].row.body.as_str(), got[0].row.rev), ("two", 2));
    let mut hosts: Vec<(String, String)> = got[0]
        .hosts
        .iter()
        .map(|h| (h.hostname.clone(), h.body.clone()))
        .collect();
    hosts.sort();
    assert_eq!(
        hosts,
        vec![("web-1".into(), "a".into()), ("web-2".into(), "b2".into())]
    );
    assert_eq!(store.rollouts(None).await.unwrap().len(), 2);
}

#[tokio::test]
async fn sqlite_keeps_what_it_was_given() {
    let dir = test_support::tempdir().unwrap();
    suite(StoreSpec::Sqlite(dir.path().join("fleet.db"))).await;
    audit_suite(StoreSpec::Sqlite(dir.path().join("audit.db"))).await;
    rollout_suite(StoreSpec::Sqlite(dir.path().join("rollouts.db"))).await;
}

#[tokio::test]
async fn memory_keeps_a_bounded_audit_log() {
    audit_suite(StoreSpec::Memory).await;
    let store = persist::open(&StoreSpec::Memory).await.unwrap();
    let n = persist::AUDIT_KEPT_IN_MEMORY as i64 + 5;
    for i in 0..n {
        store.put_audit(audit_row(i, "ci")).await.unwrap();
    }
    let all = store.audit(None, usize::MAX).await.unwrap();
    assert_eq!(all.len(), persist::AUDIT_KEPT_IN_MEMORY);
    assert_eq!((all[0].time, all.last().unwrap().time), (n - 1, 5));
}

#[tokio::test]
async fn postgres_keeps_what_it_was_given() {
    let Some(pg) = test_support::postgres::Cluster::start() else {
        return;
    };
    let url = pg.create_db("suite");
    suite(StoreSpec::parse(&url).unwrap()).await;
    let url = pg.create_db("audit");
    audit_suite(StoreSpec::parse(&url).unwrap()).await;
    let url = pg.create_db("rollouts");
    rollout_suite(StoreSpec::parse(&url).unwrap()).await;
}

fn too_new(e: StoreError) -> String {
    let text = e.to_string();
    assert!(matches!(e, StoreError::TooNew { found: 99, .. }), "{text}");
    text
}

#[tokio::test]
async fn a_schema_newer_than_the_binary_is_refused() {
    let dir = test_support::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    drop(
        persist::open(&StoreSpec::Sqlite(path.clone()))
            .await
            .unwrap(),
    );
    persist::sqlite::set_schema_version(&path, 99).unwrap();
    let e = persist::open(&StoreSpec::Sqlite(path)).await.unwrap_err();
    let text = too_new(e);
    assert!(text.contains("newer than this ops-meta"), "{text}");

    let Some(pg) = test_support::postgres::Cluster::start() else {
        return;
    };
    let url = pg.create_db("newer");
    drop(
        persist::open(&StoreSpec::parse(&url).unwrap())
            .await
            .unwrap(),
    );
    pg.psql("newer", "UPDATE meta_schema SET version = 99");
    too_new(
        persist::open(&StoreSpec::parse(&url).unwrap())
            .await
            .unwrap_err(),
    );
}

#[tokio::test]
async fn a_second_process_on_one_sqlite_file_is_refused() {
    let dir = test_support::tempdir().unwrap();
    let spec = StoreSpec::Sqlite(dir.path().join("fleet.db"));
    let first = persist::open(&spec).await.unwrap();
    let e = persist::open(&spec).await.unwrap_err().to_string();
    assert!(e.contains("another ops-meta uses this file"), "{e}");
    drop(first);
}
