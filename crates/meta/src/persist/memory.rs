//! `store: "memory"`: nothing is kept across a restart, as in the original ops-meta. Every
//! write succeeds at once; the caches are the only copy. The audit log, which has no cache,
//! is kept here: the newest [`AUDIT_KEPT_IN_MEMORY`] entries, until the process ends.

use std::collections::VecDeque;

use parking_lot::Mutex;

use super::{
    AuditRow, BatchRow, BootRow, BootUpdate, Changes, Cursor, DbRow, Durable, LegacyRow,
    LegacySink, RolloutHostRow, RolloutRecord, RolloutRow, Snapshot, StoreFuture,
    AUDIT_KEPT_IN_MEMORY,
};
use proto::events::Event;

/// The store that keeps nothing but a bounded audit log.
#[derive(Debug, Default)]
pub struct Memory {
    /// Oldest first; and the last id given.
    audit: Mutex<(VecDeque<AuditRow>, i64)>,
}

impl Durable for Memory {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn shared(&self) -> bool {
        false
    }

    fn load(&self, _legacy: LegacySink) -> StoreFuture<'_, Snapshot> {
        Box::pin(async { Ok(Snapshot::default()) })
    }

    fn put_legacy(&self, _rows: Vec<LegacyRow>) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn update_boot(&self, _hostname: &str, update: BootUpdate) -> StoreFuture<'_, ()> {
        let _ = update(DbRow::NotRead);
        Box::pin(async { Ok(()) })
    }

    fn touch_boot(&self, _seen: Vec<(String, i64)>) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn boot_hosts(&self, _hostnames: &[String]) -> StoreFuture<'_, Vec<BootRow>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn put_events(&self, _hostname: &str, _events: &[Event]) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn put_batch(&self, _row: BatchRow) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn batch(&self, _id: &str) -> StoreFuture<'_, Option<BatchRow>> {
        Box::pin(async { Ok(None) })
    }

    fn put_audit(&self, mut row: AuditRow) -> StoreFuture<'_, i64> {
        let mut g = self.audit.lock();
        g.1 += 1;
        row.id = g.1;
        g.0.push_back(row);
        while g.0.len() > AUDIT_KEPT_IN_MEMORY {
            g.0.pop_front();
        }
        let id = g.1;
        Box::pin(async move { Ok(id) })
    }

    fn finish_audit(&self, row: AuditRow) -> StoreFuture<'_, ()> {
        let mut g = self.audit.lock();
        // Ids rise, so the log is sorted by id.
        if let Ok(i) = g.0.binary_search_by_key(&row.id, |r| r.id) {
            g.0[i].status = row.status;
            g.0[i].body = row.body;
        }
        Box::pin(async { Ok(()) })
    }

    fn audit(&self, before: Option<i64>, limit: usize) -> StoreFuture<'_, Vec<AuditRow>> {
        let out: Vec<AuditRow> = self
            .audit
            .lock()
            .0
            .iter()
            .rev()
            .filter(|r| before.is_none_or(|b| r.id < b))
            .take(limit)
            .cloned()
            .collect();
        Box::pin(async move { Ok(out) })
    }

    fn changes(&self, since: Cursor) -> StoreFuture<'_, Changes> {
        Box::pin(async move {
            Ok(Changes {
                cursor: since,
                ..Changes::default()
            })
        })
    }

    // Rollouts live in `crate::rollout`'s memory, the only copy, as everything else here.
    fn put_rollout(&self, _row: RolloutRow, _hosts: Vec<RolloutHostRow>) -> StoreFuture<'_, bool> {
        Box::pin(async { Ok(true) })
    }

    fn rollout_revs(&self) -> StoreFuture<'_, Vec<(String, i64)>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn rollouts(&self, _ids: Option<Vec<String>>) -> StoreFuture<'_, Vec<RolloutRecord>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn sweep(&self, _older_than: i64) -> StoreFuture<'_, u64> {
        Box::pin(async { Ok(0) })
    }
}
