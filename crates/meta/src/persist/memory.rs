//! `store: "memory"`: nothing is kept across a restart, as in the original ops-meta. Every
//! write succeeds at once; the caches are the only copy.

use super::{
    BatchRow, BootRow, BootUpdate, Changes, Cursor, DbRow, Durable, LegacyRow, LegacySink,
    Snapshot, StoreFuture,
};
use proto::events::Event;

/// The store that keeps nothing.
#[derive(Debug, Default)]
pub struct Memory;

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

    fn changes(&self, since: Cursor) -> StoreFuture<'_, Changes> {
        Box::pin(async move {
            Ok(Changes {
                cursor: since,
                ..Changes::default()
            })
        })
    }

    fn sweep(&self, _older_than: i64) -> StoreFuture<'_, u64> {
        Box::pin(async { Ok(0) })
    }
}
