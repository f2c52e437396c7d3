//! The metafile: this host's BootAgent identity (serial, tags) and the settings the server
//! or the first start gave it (server lists, report step). Its absence means "first start".
//!
//! The file is ours alone (no other program reads it), so its JSON shape lives here rather
//! than in `proto`. It is always replaced whole through [`fsx::write_atomic_private`]: it
//! holds the host's credential, so it is mode 0600 (an existing file more open than that
//! is tightened when it is read).

use std::path::{Path, PathBuf};

use proto::rules;
use serde::{Deserialize, Serialize};

use crate::fsx;

/// Largest metafile read, in bytes. A real one is a few hundred bytes.
pub const MAX_METAFILE_BYTES: u64 = 64 << 10;

/// What the metafile holds.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    /// The serial (`agentsn`); generated at first start, replaced by the one the server
    /// answers a registration with.
    pub agentsn: String,
    /// True once a status report was answered (status 0) with this serial: only then does
    /// it count as valid.
    #[serde(default)]
    pub confirmed: bool,
    /// The hostname the serial was registered under.
    #[serde(default)]
    pub hostname: String,
    /// Tags the server answered the registration with, e.g. `svc=ecs,cmpt=DB`.
    #[serde(default)]
    pub tags: String,
    /// Servers given with `-S` at first start (ignored on later starts).
    #[serde(default)]
    pub servers: Vec<String>,
    /// Servers pushed by the server with a `config` job (each job replaces the list).
    #[serde(default)]
    pub pushed: Vec<String>,
    /// Report step in seconds set by a `config` job; 0 means the config's `interval`.
    #[serde(default)]
    pub step: u64,
    /// The credential ops-meta gave this host at registration, sent as
    /// `Authorization: Bearer` with every request; empty until one is given (or against a
    /// server that gives none). Never logged.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub credential: String,
}

impl std::fmt::Debug for Meta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meta")
            .field("agentsn", &self.agentsn)
            .field("confirmed", &self.confirmed)
            .field("hostname", &self.hostname)
            .field("tags", &self.tags)
            .field("servers", &self.servers)
            .field("pushed", &self.pushed)
            .field("step", &self.step)
            .field(
                "credential",
                &if self.credential.is_empty() {
                    ""
                } else {
                    "<redacted>"
                },
            )
            .finish()
    }
}

/// Why the metafile could not be read or written. Display names the file.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("metafile {path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("metafile {path}: {len} bytes, more than the {MAX_METAFILE_BYTES} allowed")]
    TooLarge { path: PathBuf, len: u64 },
    #[error("metafile {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("metafile {path}: cannot write: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Meta {
    /// A fresh identity for a first start: a new random serial, nothing confirmed.
    pub fn first_start(hostname: &str, servers: Vec<String>) -> Meta {
        Meta {
            agentsn: uuid::Uuid::new_v4().to_string(),
            confirmed: false,
            hostname: hostname.to_string(),
            tags: String::new(),
            servers,
            pushed: Vec::new(),
            step: 0,
            credential: String::new(),
        }
    }

    /// Checks what a parse cannot: the serial's form and the server lists, each entry by
    /// the rule of every server list ([`rules::check_server`]), at most
    /// [`rules::MAX_SERVERS`] of them.
    pub fn check(&self) -> Result<(), String> {
        proto::bootagent::validate_agentsn(&self.agentsn).map_err(|e| e.to_string())?;
        if !self.credential.is_empty() {
            proto::bootagent::check_credential(&self.credential)
                .map_err(|e| format!("credential: {e}"))?;
        }
        for (field, list) in [("servers", &self.servers), ("pushed", &self.pushed)] {
            if list.len() > rules::MAX_SERVERS {
                return Err(format!(
                    "{field}: {} servers, the limit is {}",
                    list.len(),
                    rules::MAX_SERVERS
                ));
            }
            for s in list {
                rules::check_server(s).map_err(|e| format!("{field}: {e}"))?;
            }
        }
        Ok(())
    }
}

/// Reads the metafile; `Ok(None)` when it does not exist (first start).
pub fn load(path: &Path) -> Result<Option<Meta>, MetaError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(MetaError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if meta.len() > MAX_METAFILE_BYTES {
        return Err(MetaError::TooLarge {
            path: path.to_path_buf(),
            len: meta.len(),
        });
    }
    let text = std::fs::read(path).map_err(|source| MetaError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    // Written by a version that did not hold a credential in it, or by hand.
    match fsx::make_private(path) {
        Ok(true) => {
            tracing::info!(metafile = %path.display(), "metafile was readable by others; made mode 0600")
        }
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(metafile = %path.display(), error = %e, "cannot make the metafile mode 0600")
        }
    }
    parse(path, &text).map(Some)
}

/// Parses and checks the bytes of a metafile.
pub fn parse(path: &Path, text: &[u8]) -> Result<Meta, MetaError> {
    let corrupt = |reason: String| MetaError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let m: Meta = serde_json::from_slice(text).map_err(|e| corrupt(e.to_string()))?;
    m.check().map_err(corrupt)?;
    Ok(m)
}

/// Writes the metafile atomically, creating its folder if needed.
#[allow(clippy::disallowed_methods)] // Blocking: on the blocking pool, or once at start.
pub fn save(path: &Path, m: &Meta) -> Result<(), MetaError> {
    let write = |source| MetaError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(write)?;
    }
    let mut text = serde_json::to_vec_pretty(m).expect("the metafile serializes");
    text.push(b'\n');
    fsx::write_atomic_private(path, &text).map_err(write)
}

/// Moves a corrupt metafile aside (`<name>.corrupt-<unix seconds>`) so that the next start
/// does not trip over it again and an operator can still look at it. Returns the new path.
#[allow(clippy::disallowed_methods)] // Blocking: on the blocking pool, or once at start.
pub fn move_aside(path: &Path) -> std::io::Result<PathBuf> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "meta.json".into());
    let to = path.with_file_name(format!("{name}.corrupt-{}", crate::state::now_unix()));
    std::fs::rename(path, &to)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fsx::fsync_dir(dir)?;
    }
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_absence() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("sub/meta.json");
        assert!(load(&p).unwrap().is_none());
        let mut m = Meta::first_start("web-01", vec!["127.0.0.1:1".into()]);
        m.tags = "svc=ecs".into();
        m.pushed = vec!["127.0.0.1:2".into(), "127.0.0.1:2".into()];
        m.step = 30;
        save(&p, &m).unwrap();
        assert_eq!(load(&p).unwrap(), Some(m.clone()));
        m.confirmed = true;
        save(&p, &m).unwrap();
        assert_eq!(load(&p).unwrap().unwrap(), m);
        // No temporary file is left next to it.
        let names: Vec<_> = std::fs::read_dir(p.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["meta.json"]);
    }

    #[test]
    fn the_metafile_is_private_and_keeps_its_credential() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("meta.json");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let mut m = Meta::first_start("web-01", vec![]);
        m.credential = "ab".repeat(32);
        save(&p, &m).unwrap();
        assert_eq!(mode(&p), 0o600);
        assert!(!format!("{m:?}").contains(&m.credential));
        // One written more open (by an older version) is tightened when read.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(load(&p).unwrap(), Some(m.clone()));
        assert_eq!(mode(&p), 0o600);
        std::fs::write(&p, br#"{"agentsn":"a","credential":"not hex"}"#).unwrap();
        let e = load(&p).unwrap_err().to_string();
        assert!(
            e.contains("credential: is not 64") && !e.contains("not hex"),
            "{e}"
        );
    }

    #[test]
    fn corruption_is_reported_with_the_path() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("meta.json");
        let cases: &[&[u8]] = &[
            b"",
            b"{\"agentsn\": \"abc\"",
            b"[1]",
            b"{\"agentsn\": \"../etc\"}",
            b"{\"agentsn\": \"\"}",
            b"{\"agentsn\": \"a\", \"servers\": [\"ftp://x\"]}",
            b"{\"agentsn\": \"a\", \"pushed\": [\"m:1/heartbeat\"]}",
            b"{\"agentsn\": \"a\", \"servers\": [\" m:1\"]}",
            b"{\"agentsn\": \"a\", \"surprise\": 1}",
            b"\xff\xfe",
        ];
        for text in cases {
            std::fs::write(&p, text).unwrap();
            let e = load(&p).unwrap_err();
            let shown = e.to_string();
            assert!(matches!(e, MetaError::Corrupt { .. }), "{shown}");
            assert!(shown.contains("meta.json is corrupt"), "{shown}");
        }
        std::fs::write(&p, vec![b' '; MAX_METAFILE_BYTES as usize + 1]).unwrap();
        assert!(matches!(load(&p), Err(MetaError::TooLarge { .. })));
        let aside = move_aside(&p).unwrap();
        assert!(!p.exists() && aside.exists());
        assert!(load(&p).unwrap().is_none());
    }
}
