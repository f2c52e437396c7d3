//! The event journal: what happened to the agents on this host (abnormal exits, restarts,
//! kills), kept on disk at `<workdir>/.ops-updater.events.json` across restarts, and sent
//! to the server with each status report or heartbeat until an answer takes them.
//!
//! - Every event gets a `seq`, one more than the last, also across restarts. A journal
//!   that starts afresh (no file, or a corrupt one set aside) starts at the current Unix
//!   time in seconds, so that it never reuses the seqs of a journal before it as long as
//!   events came slower than one a second on average (the server drops an event whose
//!   `(host, seq)` it already holds).
//! - The newest `cap` events are kept; `acked` is the highest seq a server took, persisted
//!   with them, so a restart resends what no server took and nothing else.
//! - Writes go through [`fsx::write_atomic`] on the blocking pool, one at a time: pushes
//!   that come while a write is under way are written together by the next one, so a
//!   burst of events costs a few writes, not one each.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use proto::events::Event;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::fsx;
use crate::state::now_unix;

/// Events kept by default.
pub const DEFAULT_CAP: usize = 200;
/// Most events a journal may be asked to keep.
pub const MAX_CAP: usize = 10_000;
/// Largest journal file read, in bytes: [`MAX_CAP`] events at their bounds fit.
pub const MAX_JOURNAL_FILE_BYTES: u64 = 48 << 20;
/// Highest seq a journal file may hold: every integer up to it survives a JSON reader that
/// reads numbers as doubles, and counting on from it never overflows.
pub const MAX_SEQ: u64 = 1 << 53;

/// An event as the code that saw it describes it; the journal adds `seq` and `time`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventInput {
    /// The agent; empty for the daemon itself.
    pub agent: String,
    pub version: String,
    /// One of `proto::events::KIND_*`.
    pub kind: String,
    /// In words, e.g. `exit code 3`.
    pub cause: String,
    /// The last lines printed (see `proto::events::output_lines`).
    pub output: Vec<String>,
    /// The agent's state after the event (`proto::bootagent::STATE_*`), or empty.
    pub state: String,
    /// Restarts in the agent's current run of failures.
    pub restarts: u32,
}

/// The journal file's content. Local to this host; no other program reads it.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct FileBody {
    next_seq: u64,
    acked: u64,
    events: Vec<Event>,
}

#[derive(Debug)]
struct State {
    /// Oldest first.
    events: VecDeque<Event>,
    next_seq: u64,
    acked: u64,
    /// Counts changes; [`Inner::written`] holds the count last written.
    change: u64,
    /// A writer task is running.
    writing: bool,
    /// The last write failed (logged once until one succeeds).
    failing: bool,
    /// Writes done (for tests and the log).
    writes: u64,
}

#[derive(Debug)]
struct Inner {
    /// `None`: kept in memory only.
    path: Option<PathBuf>,
    cap: usize,
    state: Mutex<State>,
    written: watch::Sender<u64>,
}

/// The journal (module docs). Cheap to clone: one `Arc`.
#[derive(Debug, Clone)]
pub struct Journal {
    inner: Arc<Inner>,
}

impl Default for Journal {
    fn default() -> Self {
        Journal::in_memory(DEFAULT_CAP)
    }
}

/// Why the journal file was not used.
#[derive(Debug, thiserror::Error)]
enum LoadError {
    #[error("event journal {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("event journal {}: {len} bytes, more than the {MAX_JOURNAL_FILE_BYTES} allowed", path.display())]
    TooLarge { path: PathBuf, len: u64 },
    #[error("event journal {}: not a journal: {source}", path.display())]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("event journal {}: seq {seq} is beyond {MAX_SEQ}", path.display())]
    SeqTooLarge { path: PathBuf, seq: u64 },
}

/// Reads the journal file; `Ok(None)` when there is none.
fn load(path: &Path) -> Result<Option<FileBody>, LoadError> {
    use std::io::Read as _;
    let read = |source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    };
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(read(e)),
    };
    let mut bytes = Vec::new();
    f.take(MAX_JOURNAL_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read)?;
    if bytes.len() as u64 > MAX_JOURNAL_FILE_BYTES {
        return Err(LoadError::TooLarge {
            path: path.to_path_buf(),
            len: std::fs::metadata(path).map_or(bytes.len() as u64, |m| m.len()),
        });
    }
    let body: FileBody = serde_json::from_slice(&bytes).map_err(|source| LoadError::Corrupt {
        path: path.to_path_buf(),
        source,
    })?;
    let highest = body
        .events
        .iter()
        .map(|e| e.seq)
        .chain([body.next_seq, body.acked])
        .max()
        .unwrap_or(0);
    if highest > MAX_SEQ {
        return Err(LoadError::SeqTooLarge {
            path: path.to_path_buf(),
            seq: highest,
        });
    }
    Ok(Some(body))
}

/// The first seq of a journal that starts afresh (module docs).
fn fresh_seq() -> u64 {
    u64::try_from(now_unix()).unwrap_or(0).max(1)
}

impl Journal {
    /// A journal that is never written to disk (tests, and a daemon without one).
    pub fn in_memory(cap: usize) -> Journal {
        Journal::from_parts(None, cap, VecDeque::new(), fresh_seq(), None)
    }

    fn from_parts(
        path: Option<PathBuf>,
        cap: usize,
        events: VecDeque<Event>,
        next_seq: u64,
        acked: Option<u64>,
    ) -> Journal {
        let acked = acked.unwrap_or(next_seq - 1).min(next_seq - 1);
        Journal {
            inner: Arc::new(Inner {
                path,
                cap: cap.clamp(1, MAX_CAP),
                state: Mutex::new(State {
                    events,
                    next_seq,
                    acked,
                    change: 0,
                    writing: false,
                    failing: false,
                    writes: 0,
                }),
                written: watch::Sender::new(0),
            }),
        }
    }

    /// Opens the journal at `path`, keeping at most `cap` events (1 to [`MAX_CAP`]). No
    /// file means an empty journal; a file that cannot be read, is larger than
    /// [`MAX_JOURNAL_FILE_BYTES`] or is not a journal is logged, moved aside
    /// (`<name>.corrupt-<time>`) and replaced by an empty journal. Never fails: events are
    /// a report, not something the daemon needs to run.
    pub async fn open(path: &Path, cap: usize) -> Journal {
        let p = path.to_path_buf();
        let loaded = tokio::task::spawn_blocking(move || {
            let r = load(&p);
            let aside = match &r {
                Err(
                    LoadError::TooLarge { .. }
                    | LoadError::Corrupt { .. }
                    | LoadError::SeqTooLarge { .. },
                ) => Some(crate::boot::metafile::move_aside(&p)),
                _ => None,
            };
            (r, aside)
        })
        .await;
        let (loaded, aside) = match loaded {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(journal = %path.display(), error = %e, "reading the event journal failed; starting an empty one");
                (Ok(None), None)
            }
        };
        let path = Some(path.to_path_buf());
        match loaded {
            Ok(None) => Journal::from_parts(path, cap, VecDeque::new(), fresh_seq(), None),
            Ok(Some(body)) => {
                let cap = cap.clamp(1, MAX_CAP);
                let skip = body.events.len().saturating_sub(cap);
                let events: VecDeque<Event> = body
                    .events
                    .into_iter()
                    .skip(skip)
                    .map(Event::clean)
                    .collect();
                let past = events.iter().map(|e| e.seq + 1).max().unwrap_or(1);
                let next_seq = body.next_seq.max(past).max(1);
                Journal::from_parts(path, cap, events, next_seq, Some(body.acked))
            }
            Err(e) => {
                tracing::error!(error = %e, "starting an empty event journal");
                match aside {
                    Some(Ok(to)) => {
                        tracing::warn!(moved_to = %to.display(), "bad event journal kept for inspection")
                    }
                    Some(Err(me)) => {
                        tracing::warn!(error = %me, "cannot move the bad event journal aside")
                    }
                    None => {}
                }
                Journal::from_parts(path, cap, VecDeque::new(), fresh_seq(), None)
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain data behind; keep using it.
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where the journal is written, if it is.
    pub fn path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    /// Most events kept.
    pub fn cap(&self) -> usize {
        self.inner.cap
    }

    /// Records an event: gives it the next seq and the time now, cuts it to the protocol's
    /// bounds, drops the oldest past the cap, and returns once it is on disk (or the write
    /// failed, which is logged). Returns its seq.
    pub async fn push(&self, e: EventInput) -> u64 {
        let (seq, change) = {
            let mut st = self.lock();
            let seq = st.next_seq;
            st.next_seq += 1;
            let ev = Event {
                seq,
                time: now_unix(),
                agent: e.agent,
                version: e.version,
                kind: e.kind,
                cause: e.cause,
                output: e.output,
                state: e.state,
                restarts: e.restarts,
            }
            .clean();
            tracing::info!(agent = %ev.agent, version = %ev.version, kind = %ev.kind, seq, cause = %ev.cause, "agent event");
            st.events.push_back(ev);
            while st.events.len() > self.inner.cap {
                st.events.pop_front();
            }
            (seq, self.changed(&mut st))
        };
        self.written(change).await;
        seq
    }

    /// Marks every event up to `upto_seq` as taken by a server, and returns once that is
    /// on disk: they are not sent again, also after a restart.
    pub async fn acked(&self, upto_seq: u64) {
        let change = {
            let mut st = self.lock();
            let upto = upto_seq.min(st.next_seq - 1);
            if upto <= st.acked {
                return;
            }
            st.acked = upto;
            self.changed(&mut st)
        };
        self.written(change).await;
    }

    /// The newest `n` events, newest last.
    pub fn recent(&self, n: usize) -> Vec<Event> {
        let st = self.lock();
        let skip = st.events.len().saturating_sub(n);
        st.events.iter().skip(skip).cloned().collect()
    }

    /// The oldest `max` events no server took yet (seq above the acknowledged one), oldest
    /// first: what the next report carries.
    pub fn unsent(&self, max: usize) -> Vec<Event> {
        let st = self.lock();
        st.events
            .iter()
            .filter(|e| e.seq > st.acked)
            .take(max)
            .cloned()
            .collect()
    }

    /// The highest seq a server took.
    pub fn acked_seq(&self) -> u64 {
        self.lock().acked
    }

    /// Events kept.
    pub fn len(&self) -> usize {
        self.lock().events.len()
    }

    /// True when no event is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Notes a change and makes sure a writer will write it; returns the change's number.
    fn changed(&self, st: &mut State) -> u64 {
        st.change += 1;
        let change = st.change;
        if self.inner.path.is_none() {
            self.inner.written.send_replace(change);
        } else if !st.writing {
            st.writing = true;
            tokio::spawn(self.clone().write_loop());
        }
        change
    }

    /// Waits until change `n` was written (or its write failed).
    async fn written(&self, n: u64) {
        let mut rx = self.inner.written.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|w| *w >= n).await;
    }

    /// Writes the journal until no change is left unwritten, one write at a time.
    async fn write_loop(self) {
        let Some(path) = self.inner.path.clone() else {
            return;
        };
        loop {
            let (change, bytes) = {
                let mut st = self.lock();
                if *self.inner.written.borrow() >= st.change {
                    st.writing = false;
                    return;
                }
                let body = FileBody {
                    next_seq: st.next_seq,
                    acked: st.acked,
                    events: st.events.iter().cloned().collect(),
                };
                (st.change, serde_json::to_vec(&body))
            };
            let result = match bytes {
                Ok(bytes) => fsx::write_atomic_async(path.clone(), bytes)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            {
                let mut st = self.lock();
                st.writes += 1;
                match result {
                    Ok(()) if st.failing => {
                        st.failing = false;
                        tracing::info!(journal = %path.display(), "event journal written again");
                    }
                    Ok(()) => {}
                    Err(e) if !st.failing => {
                        st.failing = true;
                        tracing::warn!(journal = %path.display(), error = %e, "cannot write the event journal; events are kept in memory and written with the next change");
                    }
                    Err(_) => {}
                }
            }
            self.inner.written.send_replace(change);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::events::{KIND_EXITED, MAX_EVENT_CAUSE_LEN, MAX_EVENT_OUTPUT_LINES};

    fn input(agent: &str, cause: &str) -> EventInput {
        EventInput {
            agent: agent.into(),
            version: "1.0.0".into(),
            kind: KIND_EXITED.into(),
            cause: cause.into(),
            ..EventInput::default()
        }
    }

    fn seqs(v: &[Event]) -> Vec<u64> {
        v.iter().map(|e| e.seq).collect()
    }

    fn writes(j: &Journal) -> u64 {
        j.lock().writes
    }

    #[tokio::test]
    async fn events_are_cut_to_the_bounds_and_only_the_newest_kept() {
        let t = tempfile::tempdir().unwrap();
        let j = Journal::open(&t.path().join("j.json"), 3).await;
        let first = j.push(input("a", &"x".repeat(5000))).await;
        for i in 0..4 {
            j.push(EventInput {
                output: (0..30).map(|l| format!("line {l}")).collect(),
                ..input("a", &format!("exit {i}"))
            })
            .await;
        }
        let all = j.recent(100);
        assert_eq!(seqs(&all), [first + 2, first + 3, first + 4]);
        assert_eq!(all[2].cause, "exit 3", "newest last");
        assert_eq!(all[2].output.len(), MAX_EVENT_OUTPUT_LINES);
        assert_eq!(all[2].output[0], "line 20");
        assert_eq!(seqs(&j.recent(1)), [first + 4]);
        let big = j.push(input("a", &"x".repeat(5000))).await;
        assert_eq!(j.recent(1)[0].cause.len(), MAX_EVENT_CAUSE_LEN);
        assert_eq!(j.recent(1)[0].seq, big);
        assert_eq!(j.len(), 3);
    }

    #[tokio::test]
    async fn a_restart_keeps_seq_and_acked_and_resends_only_what_was_not_taken() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("j.json");
        let j = Journal::open(&path, DEFAULT_CAP).await;
        let s1 = j.push(input("a", "one")).await;
        let s2 = j.push(input("a", "two")).await;
        let s3 = j.push(input("b", "three")).await;
        assert_eq!((s2, s3), (s1 + 1, s1 + 2));
        assert_eq!(seqs(&j.unsent(2)), [s1, s2], "oldest first, at most max");
        j.acked(s2).await;
        assert_eq!(seqs(&j.unsent(10)), [s3]);
        // An ack past the last event, or below the one held, changes nothing wrong.
        j.acked(s1).await;
        assert_eq!(j.acked_seq(), s2);
        drop(j);

        let j = Journal::open(&path, DEFAULT_CAP).await;
        assert_eq!(seqs(&j.recent(10)), [s1, s2, s3]);
        assert_eq!(
            seqs(&j.unsent(10)),
            [s3],
            "what the server took is not resent"
        );
        assert_eq!(j.push(input("a", "four")).await, s3 + 1);
        j.acked(u64::MAX).await;
        assert_eq!(j.acked_seq(), s3 + 1);
        assert!(j.unsent(10).is_empty());
        drop(j);
        let j = Journal::open(&path, DEFAULT_CAP).await;
        assert!(j.unsent(10).is_empty());
        assert_eq!(j.push(input("a", "five")).await, s3 + 2);
    }

    #[tokio::test]
    async fn a_corrupt_or_oversized_file_is_set_aside_and_the_journal_starts_empty() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join(".ops-updater.events.json");
        let aside = |dir: &Path| {
            std::fs::read_dir(dir)
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
                .count()
        };
        std::fs::write(&path, b"{\"nextSeq\": 5, \"events\": [tor").unwrap();
        let j = Journal::open(&path, DEFAULT_CAP).await;
        assert!(j.is_empty());
        assert_eq!(aside(t.path()), 1);
        let s = j.push(input("a", "after")).await;
        assert!(
            s >= fresh_seq() - 1,
            "a fresh journal starts at the time: {s}"
        );
        let again = Journal::open(&path, DEFAULT_CAP).await;
        assert_eq!(seqs(&again.recent(10)), [s], "the new journal was written");

        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("j.json");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(MAX_JOURNAL_FILE_BYTES + 1).unwrap();
        let j = Journal::open(&path, DEFAULT_CAP).await;
        assert!(j.is_empty());
        assert_eq!(aside(t.path()), 1);
        assert!(!path.exists());

        // A seq near the end of u64 would overflow when counted on.
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("j.json");
        std::fs::write(
            &path,
            format!(r#"{{"nextSeq":{},"acked":0,"events":[]}}"#, u64::MAX),
        )
        .unwrap();
        let j = Journal::open(&path, DEFAULT_CAP).await;
        assert_eq!(aside(t.path()), 1);
        assert!(j.push(input("a", "x")).await < MAX_SEQ);
    }

    #[tokio::test]
    async fn a_burst_of_pushes_costs_a_few_writes() {
        let t = tempfile::tempdir().unwrap();
        let j = Journal::open(&t.path().join("j.json"), DEFAULT_CAP).await;
        let pushes = (0..50).map(|i| {
            let j = j.clone();
            async move { j.push(input("a", &format!("exit {i}"))).await }
        });
        let got = futures_util::future::join_all(pushes).await;
        assert_eq!(got.len(), 50);
        assert!(writes(&j) <= 2, "{} writes for 50 pushes", writes(&j));
        let again = Journal::open(&t.path().join("j.json"), DEFAULT_CAP).await;
        assert_eq!(again.len(), 50, "every push is on disk once push returned");
    }

    #[tokio::test]
    async fn a_failing_write_does_not_hang_a_push_and_the_next_change_writes_all() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("gone");
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("j.json");
        let j = Journal::open(&path, DEFAULT_CAP).await;
        std::fs::remove_dir(&dir).unwrap();
        let s = j.push(input("a", "lost write")).await;
        assert_eq!(seqs(&j.unsent(10)), [s], "kept in memory");
        std::fs::create_dir(&dir).unwrap();
        j.push(input("a", "next")).await;
        let again = Journal::open(&path, DEFAULT_CAP).await;
        assert_eq!(seqs(&again.recent(10)), [s, s + 1]);
    }

    #[tokio::test]
    async fn in_memory_journal_never_writes() {
        let j = Journal::in_memory(2);
        let s = j.push(input("a", "x")).await;
        j.push(input("a", "y")).await;
        j.push(input("a", "z")).await;
        assert_eq!(seqs(&j.recent(10)), [s + 1, s + 2]);
        assert_eq!(writes(&j), 0);
        assert!(j.path().is_none());
    }
}
