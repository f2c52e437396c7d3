//! The job record: which jobs were started, which finished with what result, and which
//! results the server has acknowledged. It makes jobs idempotent by id across restarts.
//!
//! - A job is recorded as started before it runs. A job found started (not finished) after
//!   a restart was interrupted; it runs again when the server delivers it again (its
//!   actions are idempotent: installing an installed version does nothing).
//! - A finished job is never run again; its result goes out with every status report until
//!   a successful status answer acknowledges it.
//! - Acknowledged results are kept (the last [`MAX_ACKED`]) so that a job delivered again
//!   after that is still recognized and its result re-reported instead of re-run.
//!
//! The record is saved whole, atomically, after every change.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};

use proto::bootagent::JobResult;
use serde::{Deserialize, Serialize};

use crate::fsx;

/// Acknowledged job ids remembered.
pub const MAX_ACKED: usize = 1000;
/// Most unacknowledged results kept; the oldest are dropped beyond it.
pub const MAX_UNACKED: usize = 256;
/// Most started jobs remembered; the oldest are dropped beyond it.
pub const MAX_STARTED: usize = 256;
/// Longest result message kept and sent, in bytes: the wire's rule.
pub use proto::rules::MAX_MESSAGE_LEN;
/// Largest record file read, in bytes.
pub const MAX_RECORD_BYTES: u64 = 4 << 20;
/// Longest job id accepted.
pub const MAX_ID_LEN: usize = 128;

/// `errcode` values (defined in `proto`, where the wire is).
pub use proto::bootagent::{
    ERRCODE_FAILED as ERR_FAILED, ERRCODE_INVALID as ERR_INVALID, ERRCODE_OK as ERR_OK,
    ERRCODE_ROLLED_BACK as ERR_ROLLED_BACK,
};

/// A job that was started, for the record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    pub action: String,
    #[serde(default)]
    pub name: String,
    /// Unix seconds.
    pub at: i64,
}

/// A finished job's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {
    pub id: String,
    pub errcode: i32,
    pub message: String,
    /// Unix seconds.
    pub at: i64,
}

impl Done {
    fn wire(&self) -> JobResult {
        JobResult {
            id: self.id.clone(),
            errcode: self.errcode,
            message: self.message.clone(),
        }
    }
}

/// Where a job id stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Never seen: run it.
    New,
    /// Started and not finished: interrupted by a restart (or running now; the caller
    /// knows which), run it again when not running.
    Started,
    /// Finished; its result is (again) due in the next report.
    Finished,
}

/// The record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Book {
    #[serde(default)]
    pub started: BTreeMap<String, Started>,
    /// Finished, not yet acknowledged, oldest first.
    #[serde(default)]
    pub unacked: VecDeque<Done>,
    /// Acknowledged, oldest first.
    #[serde(default)]
    pub acked: VecDeque<Done>,
}

/// Cuts `s` to at most `max` bytes at a character boundary.
pub fn cut(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

impl Book {
    /// Where `id` stands. A finished job delivered again after its result was
    /// acknowledged gets its result queued again (the server evidently lost it).
    pub fn seen(&mut self, id: &str) -> Seen {
        if self.unacked.iter().any(|d| d.id == id) {
            return Seen::Finished;
        }
        if let Some(i) = self.acked.iter().position(|d| d.id == id) {
            if let Some(d) = self.acked.remove(i) {
                self.unacked.push_back(d);
            }
            return Seen::Finished;
        }
        if self.started.contains_key(id) {
            return Seen::Started;
        }
        Seen::New
    }

    pub fn start(&mut self, id: &str, action: &str, name: &str, now: i64) {
        if self.started.len() >= MAX_STARTED && !self.started.contains_key(id) {
            // Keep the bound: forget the oldest start (it was never delivered again).
            if let Some(old) = self
                .started
                .iter()
                .min_by_key(|(_, s)| s.at)
                .map(|(k, _)| k.clone())
            {
                self.started.remove(&old);
            }
        }
        self.started.insert(
            id.to_string(),
            Started {
                action: action.to_string(),
                name: name.to_string(),
                at: now,
            },
        );
    }

    pub fn finish(&mut self, id: &str, errcode: i32, message: &str, now: i64) {
        self.started.remove(id);
        if self.unacked.iter().any(|d| d.id == id) || self.acked.iter().any(|d| d.id == id) {
            return;
        }
        if self.unacked.len() >= MAX_UNACKED {
            self.unacked.pop_front();
        }
        self.unacked.push_back(Done {
            id: cut(id, MAX_ID_LEN),
            errcode,
            message: proto::rules::clean_message(message),
            at: now,
        });
    }

    /// The results to put in the next report.
    pub fn report(&self) -> Vec<JobResult> {
        self.unacked.iter().map(Done::wire).collect()
    }

    /// The server answered a report that carried `sent`: those results are acknowledged.
    /// Returns true when something changed.
    pub fn acknowledge(&mut self, sent: &[JobResult]) -> bool {
        let before = self.unacked.len();
        let mut keep = VecDeque::new();
        for d in std::mem::take(&mut self.unacked) {
            if sent.iter().any(|s| s.id == d.id) {
                self.acked.push_back(d);
            } else {
                keep.push_back(d);
            }
        }
        self.unacked = keep;
        while self.acked.len() > MAX_ACKED {
            self.acked.pop_front();
        }
        self.unacked.len() != before
    }
}

/// Why the record could not be read or written. Display names the file.
#[derive(Debug, thiserror::Error)]
pub enum BookError {
    #[error("job record {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("job record {path}: cannot write: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Reads the record; an absent file is an empty record.
pub fn load(path: &Path) -> Result<Book, BookError> {
    let fail = |message: String| BookError::Read {
        path: path.to_path_buf(),
        message,
    };
    match std::fs::metadata(path) {
        Ok(m) if m.len() > MAX_RECORD_BYTES => {
            return Err(fail(format!(
                "{} bytes, more than the {MAX_RECORD_BYTES} allowed",
                m.len()
            )))
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Book::default()),
        Err(e) => return Err(fail(format!("cannot read: {e}"))),
    }
    let text = std::fs::read(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    serde_json::from_slice(&text).map_err(|e| fail(format!("corrupt: {e}")))
}

#[allow(clippy::disallowed_methods)] // Blocking: on the blocking pool, or once at start.
pub fn save(path: &Path, b: &Book) -> Result<(), BookError> {
    let write = |source| BookError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(write)?;
    }
    let text = serde_json::to_vec(b).expect("the job record serializes");
    fsx::write_atomic(path, &text).map_err(write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finished_job_is_not_run_again_and_its_result_is_re_reported() {
        let mut b = Book::default();
        assert_eq!(b.seen("j1"), Seen::New);
        b.start("j1", "install", "a", 1);
        assert_eq!(b.seen("j1"), Seen::Started);
        b.finish("j1", ERR_OK, "installed", 2);
        assert_eq!(b.seen("j1"), Seen::Finished);
        assert!(b.started.is_empty());
        let sent = b.report();
        assert_eq!(sent.len(), 1);
        assert_eq!(
            (sent[0].errcode, sent[0].message.as_str()),
            (0, "installed")
        );
        // A second finish (the job ran twice somehow) does not report twice.
        b.finish("j1", ERR_FAILED, "again", 3);
        assert_eq!(b.report().len(), 1);
        // Acknowledged: no longer reported, still recognized.
        assert!(b.acknowledge(&sent));
        assert!(b.report().is_empty());
        assert!(!b.acknowledge(&sent));
        // Delivered again: not run, its result queued again.
        assert_eq!(b.seen("j1"), Seen::Finished);
        assert_eq!(b.report(), sent);
    }

    #[test]
    fn only_what_was_sent_is_acknowledged() {
        let mut b = Book::default();
        b.finish("a", 0, "ok", 1);
        let sent = b.report();
        b.finish("b", 2, "boom", 2);
        b.acknowledge(&sent);
        let left: Vec<_> = b.report().into_iter().map(|r| r.id).collect();
        assert_eq!(left, ["b"]);
    }

    #[test]
    fn trimming_keeps_the_bounds() {
        let mut b = Book::default();
        for i in 0..(MAX_ACKED + 10) {
            let id = format!("j{i}");
            b.start(&id, "stop", "a", i as i64);
            b.finish(&id, 0, &"m".repeat(5000), i as i64);
            let sent = b.report();
            b.acknowledge(&sent);
        }
        assert_eq!(b.acked.len(), MAX_ACKED);
        assert!(b.unacked.is_empty());
        // The oldest are forgotten, the newest recognized.
        assert_eq!(b.seen("j0"), Seen::New);
        assert_eq!(b.seen(&format!("j{}", MAX_ACKED + 9)), Seen::Finished);
        assert_eq!(b.report()[0].message.len(), MAX_MESSAGE_LEN);
        for i in 0..(MAX_STARTED + 5) {
            b.start(&format!("s{i}"), "stop", "a", i as i64);
        }
        assert_eq!(b.started.len(), MAX_STARTED);
        assert!(!b.started.contains_key("s0"));
        for i in 0..(MAX_UNACKED + 5) {
            b.finish(&format!("u{i}"), 0, "ok", 0);
        }
        assert_eq!(b.unacked.len(), MAX_UNACKED);
    }

    #[test]
    fn record_survives_a_restart_and_refuses_garbage() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("x/jobs.json");
        assert_eq!(load(&p).unwrap(), Book::default());
        let mut b = Book::default();
        b.start("j1", "install", "a", 1);
        b.finish("j2", 0, "ok", 2);
        save(&p, &b).unwrap();
        let mut back = load(&p).unwrap();
        assert_eq!(back, b);
        // The interrupted job is still "started": it runs again when delivered.
        assert_eq!(back.seen("j1"), Seen::Started);
        std::fs::write(&p, "{not json").unwrap();
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("jobs.json") && e.contains("corrupt"), "{e}");
        assert_eq!(cut("héllo", 2), "h");
    }
}
