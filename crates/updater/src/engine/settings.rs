//! What ops-updater keeps for one agent beside its versions, in
//! `<workdir>/<agent>/.bootagent.json` (the name it had when only BootAgent jobs set it):
//! the `envs` given to every control script, the `limits`, whether the agent should run,
//! and a `fatal` verdict, so that all of them survive a restart of ops-updater. Written
//! atomically, on the blocking pool.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::supervise::Fatal;
use crate::fsx;

/// File of an agent's settings, inside its folder.
pub const SETTINGS_FILE: &str = ".bootagent.json";
/// Largest settings file read.
pub const MAX_SETTINGS_BYTES: usize = 1 << 20;

/// An agent's settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Settings {
    #[serde(default)]
    pub envs: BTreeMap<String, String>,
    #[serde(default)]
    pub limits: BTreeMap<String, String>,
    /// The agent should run (it was started by a job or a legacy `cmd: start`); `None` in
    /// files written before supervision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<bool>,
    /// The supervisor gave up on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fatal: Option<Fatal>,
}

fn path(agent_dir: &Path) -> PathBuf {
    agent_dir.join(SETTINGS_FILE)
}

/// Reads an agent's settings; absent or unreadable means none (logged). Blocking.
pub fn load(agent_dir: &Path) -> Settings {
    let path = path(agent_dir);
    match std::fs::read(&path) {
        Ok(b) if b.len() <= MAX_SETTINGS_BYTES => serde_json::from_slice(&b).unwrap_or_else(|e| {
            tracing::warn!(file = %path.display(), error = %e, "ignoring corrupt agent settings");
            Settings::default()
        }),
        Ok(_) => {
            tracing::warn!(file = %path.display(), "ignoring oversized agent settings");
            Settings::default()
        }
        Err(_) => Settings::default(),
    }
}

/// Writes an agent's settings atomically. Blocking.
#[allow(clippy::disallowed_methods)] // Called on the blocking pool (see `save_async`).
pub fn save(agent_dir: &Path, s: &Settings) -> std::io::Result<()> {
    std::fs::create_dir_all(agent_dir)?;
    let text = serde_json::to_vec_pretty(s).expect("settings serialize");
    fsx::write_atomic(&path(agent_dir), &text)
}

/// [`load`] on the blocking pool.
pub async fn load_async(agent_dir: PathBuf) -> Settings {
    fsx::blocking(move || Ok(load(&agent_dir)))
        .await
        .unwrap_or_default()
}

/// [`save`] on the blocking pool.
pub async fn save_async(agent_dir: PathBuf, s: Settings) -> std::io::Result<()> {
    fsx::blocking(move || save(&agent_dir, &s)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_round_trip_and_old_files_read() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a");
        assert_eq!(load(&d), Settings::default());
        let s = Settings {
            envs: [("PATH".to_string(), "/usr/bin".to_string())].into(),
            limits: [("CPU".to_string(), "10%".to_string())].into(),
            run: Some(true),
            fatal: Some(Fatal {
                version: proto::names::Version::parse("1").unwrap(),
                cause: "exited with code 1".into(),
                since: 5,
                killed: false,
            }),
        };
        save(&d, &s).unwrap();
        assert_eq!(load(&d), s);
        // A file written before supervision (envs and limits only) still reads.
        std::fs::write(d.join(SETTINGS_FILE), r#"{"envs":{"A":"1"},"limits":{}}"#).unwrap();
        assert_eq!(load(&d).envs["A"], "1");
        std::fs::write(d.join(SETTINGS_FILE), "garbage").unwrap();
        assert_eq!(load(&d), Settings::default());
    }
}
