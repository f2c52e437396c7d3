//! The self-upgrade marker, `<workdir>/.ops-updater.upgrade.json`: where an upgrade of the
//! updater itself stands, written atomically at every step so that a crash or a power loss
//! at any instant leaves a state the next start knows how to finish or undo.
//!
//! States, in order:
//! - `trial`: the new binary is staged beside the executable (`next`), the old worker
//!   has exited, the new one runs from `next` and counts good rounds. The executable is
//!   still the old binary: a crash now starts the old one, which runs the trial again.
//! - `committed`: the new worker reached its rounds; the supervisor keeps the old binary
//!   as `<exe>.prev` and renames `next` over the executable (idempotent: redone at the next
//!   start until `next` is gone), then the marker is cleared.
//!
//! Beside the state, `blocked` keeps a version that was rolled back (and why), so that it
//! is not tried again until the desired version changes; `reported` says the roll-back was
//! already told (event, job result).

use std::path::{Path, PathBuf};

use proto::names::Version;
use serde::{Deserialize, Serialize};

use crate::fsx;

/// The marker's file name in the workdir.
pub const MARKER_FILE: &str = ".ops-updater.upgrade.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Trial,
    Committed,
}

/// An upgrade in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Upgrade {
    pub stage: Stage,
    pub from: String,
    pub to: Version,
    /// The executable being replaced (symlinks resolved).
    pub exe: PathBuf,
    /// The staged new binary, in the executable's folder.
    pub next: PathBuf,
    /// Good rounds the new worker reported so far.
    #[serde(default)]
    pub rounds: u32,
    /// Unix seconds the upgrade started (the old worker's exit).
    pub started: i64,
    /// When the old worker's next round was due (unix milliseconds): the new worker's first
    /// round, so the heartbeat keeps its schedule.
    #[serde(default)]
    pub next_round_ms: Option<i64>,
    /// The BootAgent job that asked for it, if any.
    #[serde(default)]
    pub job: Option<String>,
}

/// A version that was rolled back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Blocked {
    pub version: Version,
    pub reason: String,
    pub at: i64,
    /// The failure was told (an event written); set by the worker.
    #[serde(default)]
    pub reported: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Marker {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<Upgrade>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked: Option<Blocked>,
}

pub fn path(workdir: &Path) -> PathBuf {
    workdir.join(MARKER_FILE)
}

/// The marker, or the empty one when there is none. A marker that cannot be parsed is
/// moved aside (kept for inspection) and treated as none: the executable on disk is then
/// what runs, which is always a binary that passed its checks.
pub fn load(workdir: &Path) -> Marker {
    let p = path(workdir);
    match std::fs::read(&p) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(m) => m,
            Err(e) => {
                let aside = p.with_extension(format!("bad-{}", crate::state::now_unix()));
                tracing::error!(marker = %p.display(), error = %e, aside = %aside.display(), "unreadable self-upgrade marker; set aside");
                let _ = std::fs::rename(&p, &aside);
                Marker::default()
            }
        },
        Err(_) => Marker::default(),
    }
}

/// Writes the marker atomically (blocking: the supervisor has no runtime thread to spare
/// it from, the worker calls [`save_async`]).
#[allow(clippy::disallowed_methods)] // Blocking by design; see above.
pub fn save(workdir: &Path, m: &Marker) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(m).map_err(std::io::Error::other)?;
    fsx::write_atomic(&path(workdir), &bytes)
}

pub async fn save_async(workdir: PathBuf, m: Marker) -> std::io::Result<()> {
    fsx::blocking(move || save(&workdir, &m)).await
}
