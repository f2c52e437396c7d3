//! Write-behind queues: the request path only pushes the hostname of a host whose row must
//! be written; one task takes up to [`MAX_BATCH`] names at a time, reads each host's current
//! state from memory through its [`Source`] (so ten reports of one host in a batch are one
//! row) and writes them in one statement. Two queues use it: legacy reports (a host's
//! report changed, or its last-seen time entered a new [`SEEN_STEP_SECS`] step) and the
//! last-seen times of BootAgent hosts whose reports changed nothing else.
//!
//! Bounded: at most [`QUEUE_CAP`] names wait. When the store falls that far behind, a
//! heartbeat waits for room (back-pressure) instead of growing memory; [`Lag`] counts
//! what waits and for how long, for `/metrics`. A report lost to a crash before its
//! flush is sent again by its host at the next heartbeat (a full report each time), so a
//! `kill -9` loses at most the last flush interval of last-seen times.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use super::{Durable, LegacyRow, StoreFuture};
use crate::store::FleetStore;

/// Where a queue's hosts come from and go to.
pub trait Source: Send + Sync + 'static {
    /// Writes the current state of `hosts` (sorted, each once; hosts forgotten meanwhile
    /// are left out) to `durable`; returns how many rows it wrote.
    fn flush<'a>(
        &'a self,
        durable: &'a dyn Durable,
        hosts: &'a [&'a str],
    ) -> StoreFuture<'a, usize>;
}

/// Legacy reports: each host's report and last-seen time, from the fleet cache.
impl Source for dyn FleetStore {
    fn flush<'a>(
        &'a self,
        durable: &'a dyn Durable,
        hosts: &'a [&'a str],
    ) -> StoreFuture<'a, usize> {
        let rows: Vec<LegacyRow> = hosts
            .iter()
            .filter_map(|h| {
                Some(LegacyRow {
                    hostname: h.to_string(),
                    last_seen: self.last_seen(h)?,
                    agents: self.host(h)?,
                })
            })
            .collect();
        Box::pin(async move {
            let n = rows.len();
            durable.put_legacy(rows).await?;
            Ok(n)
        })
    }
}

/// A host's last-seen time alone is written when it enters a new step of this many
/// seconds (a report that changed is written at once).
pub const SEEN_STEP_SECS: i64 = 60;
/// Hostnames that may wait to be written.
pub const QUEUE_CAP: usize = 65_536;
/// Most rows of one write.
pub const MAX_BATCH: usize = 8192;
/// How long a change may wait for others to share its write.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(200);

/// True when a report at `now` must be written although it changed nothing: the host's
/// last-seen time entered a new step since `before`.
pub fn seen_step(before: i64, now: i64) -> bool {
    before.div_euclid(SEEN_STEP_SECS) != now.div_euclid(SEEN_STEP_SECS)
}

/// How far the store lags behind memory.
#[derive(Debug, Default)]
pub struct Lag {
    /// Hostnames queued and not written yet.
    pub queued: AtomicI64,
    /// Rows written since start.
    pub written: AtomicU64,
    /// Writes that failed (each retried).
    pub failures: AtomicU64,
    /// Milliseconds the oldest change of the last write had waited.
    pub last_lag_ms: AtomicU64,
}

/// The heartbeat side of the queue; with a store that keeps nothing, a no-op.
#[derive(Debug, Clone)]
pub struct WriteBehind {
    tx: Option<mpsc::Sender<(Box<str>, Instant)>>,
    pub lag: Arc<Lag>,
}

/// The writing side of the queue, run by the server ([`Writer::run`]).
#[derive(Debug)]
pub struct Writer {
    rx: mpsc::Receiver<(Box<str>, Instant)>,
    lag: Arc<Lag>,
}

/// A queue in front of a store that keeps something.
pub fn queue() -> (WriteBehind, Writer) {
    let (tx, rx) = mpsc::channel(QUEUE_CAP);
    let lag = Arc::new(Lag::default());
    (
        WriteBehind {
            tx: Some(tx),
            lag: lag.clone(),
        },
        Writer { rx, lag },
    )
}

impl WriteBehind {
    /// The queue of a store that keeps nothing: pushing does nothing.
    pub fn disabled() -> WriteBehind {
        WriteBehind {
            tx: None,
            lag: Arc::new(Lag::default()),
        }
    }

    /// Queues `host`; waits only when the queue is full.
    pub async fn push(&self, host: &str) {
        let Some(tx) = &self.tx else {
            return;
        };
        self.lag.queued.fetch_add(1, Ordering::Relaxed);
        let item = (Box::<str>::from(host), Instant::now());
        match tx.try_send(item) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(item)) => {
                // Back-pressure: the store is QUEUE_CAP hosts behind.
                if tx.send(item).await.is_err() {
                    self.lag.queued.fetch_sub(1, Ordering::Relaxed);
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.lag.queued.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

impl Writer {
    /// Writes what is queued, in batches, from `source` to `durable` until `stop`; then
    /// writes what is still queued and returns.
    pub async fn run<S: Source + ?Sized>(
        mut self,
        durable: Arc<dyn Durable>,
        source: Arc<S>,
        mut stop: watch::Receiver<bool>,
    ) {
        let lag = self.lag.clone();
        let rx = &mut self.rx;
        let mut batch: Vec<(Box<str>, Instant)> = Vec::with_capacity(MAX_BATCH);
        let mut stopping = false;
        loop {
            if batch.is_empty() {
                tokio::select! {
                    n = rx.recv_many(&mut batch, MAX_BATCH) => {
                        if n == 0 { break; }
                    }
                    _ = stop.wait_for(|s| *s), if !stopping => {
                        stopping = true;
                        rx.close();
                        continue;
                    }
                }
            }
            // Let more changes join this write, unless it is full or we are stopping.
            if !stopping && batch.len() < MAX_BATCH {
                let deadline = tokio::time::sleep(FLUSH_INTERVAL);
                tokio::pin!(deadline);
                while batch.len() < MAX_BATCH {
                    let room = MAX_BATCH - batch.len();
                    tokio::select! {
                        n = rx.recv_many(&mut batch, room) => {
                            if n == 0 { break; }
                        }
                        _ = &mut deadline => break,
                    }
                }
            }
            let oldest = batch.iter().map(|(_, t)| *t).min();
            let mut names: Vec<&str> = batch.iter().map(|(h, _)| &**h).collect();
            names.sort_unstable();
            names.dedup();
            let mut delay = Duration::from_millis(100);
            let mut attempts = 0;
            // Each attempt reads memory again: a retry writes the newest state.
            let written = loop {
                match source.flush(&*durable, &names).await {
                    Ok(n) => break n,
                    Err(e) if stopping && attempts >= 3 => {
                        // Hosts send these reports again to whoever serves them next.
                        tracing::error!(error = %e, rows = names.len(), "store write failed at shutdown; these rows are not kept");
                        break 0;
                    }
                    Err(e) => {
                        attempts += 1;
                        lag.failures.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, rows = names.len(), "store write failed; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                }
            };
            drop(names);
            lag.written.fetch_add(written as u64, Ordering::Relaxed);
            lag.queued.fetch_sub(batch.len() as i64, Ordering::Relaxed);
            if let Some(t) = oldest {
                lag.last_lag_ms
                    .store(t.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
            batch.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_seen_is_written_once_a_step() {
        assert!(!seen_step(60, 119));
        assert!(seen_step(119, 120));
        assert!(seen_step(0, 600));
        assert!(!seen_step(-1, -60));
    }
}
