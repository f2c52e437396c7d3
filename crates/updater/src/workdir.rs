//! The workdir's layout: what an agent is on disk ([`check_agent`], defined here once), the
//! updater's own files that no action may touch ([`Own`]), and the lock that keeps one
//! updater per workdir ([`lock`]).
//!
//! An agent is a real folder (not a symlink) directly under the workdir, with a valid agent
//! name, holding `.version` and/or at least one version folder (a real folder with a valid
//! version name and a `control` file in it), or a first install in progress (the
//! updater's own `.download/` folder), and holding none of the updater's own files.
//! Every action that removes or renames something under the workdir (uninstall, pruning old
//! versions, cleaning leftovers at start-up) checks this first; anything else is left alone,
//! whatever a server asks.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use proto::names::AgentName;

use crate::control::CONTROL;
use crate::fsx::VERSION_FILE;

/// The lock file, in the workdir; a hidden name, so never an agent name.
pub const LOCK_FILE: &str = ".ops-updater.lock";

/// The event journal ([`crate::events::Journal`]), in the workdir; a hidden name too.
pub const EVENTS_FILE: &str = ".ops-updater.events.json";

/// Exit code of a second `ops-updater` started on a workdir that another one holds
/// (EX_TEMPFAIL: try again once the other has exited).
pub const EXIT_LOCKED: u8 = 75;

/// The updater's own files and folders (config, executable, metafile and its folder, log,
/// lock file): never removed or renamed, and a folder that holds one is never an agent.
#[derive(Debug, Clone, Default)]
pub struct Own {
    paths: Vec<PathBuf>,
}

impl Own {
    /// Absolute, and canonical where the path exists (so that `./cfg.json` and a symlinked
    /// workdir compare equal to the folder an action would remove).
    pub fn new(paths: impl IntoIterator<Item = PathBuf>) -> Own {
        let mut out = Vec::new();
        for p in paths {
            let abs = std::path::absolute(&p).unwrap_or(p);
            if let Ok(c) = abs.canonicalize() {
                out.push(c);
            }
            out.push(abs);
        }
        out.sort();
        out.dedup();
        Own { paths: out }
    }

    /// The first own path that is `dir` or lies below it.
    pub fn within(&self, dir: &Path) -> Option<&Path> {
        let abs = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        let canon = abs.canonicalize().ok();
        self.paths
            .iter()
            .find(|p| p.starts_with(&abs) || canon.as_ref().is_some_and(|c| p.starts_with(c)))
            .map(PathBuf::as_path)
    }
}

/// Why a name under the workdir is not an agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotAgent {
    #[error("{0}")]
    Name(#[from] proto::NameError),
    #[error("{name:?} is not in the workdir")]
    Missing { name: String },
    #[error("{name:?} is not an agent: not a folder (symlinks are never followed)")]
    NotAFolder { name: String },
    #[error("{name:?} is not an agent: it holds the updater's own {}", own.display())]
    Own { name: String, own: PathBuf },
    #[error("{name:?} is not an agent: no .version, no version folder with a control script, no install in progress")]
    NoAgentFiles { name: String },
}

/// Checks that `name` is an agent of `workdir` (module docs); returns its folder.
pub fn check_agent(workdir: &Path, own: &Own, name: &str) -> Result<PathBuf, NotAgent> {
    proto::validate_agent_name(name)?;
    let dir = workdir.join(name);
    let meta = match std::fs::symlink_metadata(&dir) {
        Ok(m) => m,
        Err(_) => {
            return Err(NotAgent::Missing {
                name: name.to_string(),
            })
        }
    };
    if !meta.is_dir() {
        return Err(NotAgent::NotAFolder {
            name: name.to_string(),
        });
    }
    if let Some(p) = own.within(&dir) {
        return Err(NotAgent::Own {
            name: name.to_string(),
            own: p.to_path_buf(),
        });
    }
    let has_version_file =
        std::fs::symlink_metadata(dir.join(VERSION_FILE)).is_ok_and(|m| m.is_file());
    let installing = std::fs::symlink_metadata(dir.join(crate::artifact::DOWNLOAD_DIR))
        .is_ok_and(|m| m.is_dir());
    if has_version_file || installing || has_version_folder(&dir) {
        Ok(dir)
    } else {
        Err(NotAgent::NoAgentFiles {
            name: name.to_string(),
        })
    }
}

fn has_version_folder(agent_dir: &Path) -> bool {
    let Ok(rd) = std::fs::read_dir(agent_dir) else {
        return false;
    };
    rd.flatten().any(|e| {
        let n = e.file_name().to_string_lossy().into_owned();
        is_version_dir(agent_dir, &n)
    })
}

/// True when `<agent_dir>/<version>` is a version folder: a real folder with a valid
/// version name and a `control` in it. Only such folders are pruned.
pub fn is_version_dir(agent_dir: &Path, version: &str) -> bool {
    if proto::validate_version(version).is_err() {
        return false;
    }
    let dir = agent_dir.join(version);
    std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir())
        && std::fs::symlink_metadata(dir.join(CONTROL)).is_ok()
}

/// The agents under `workdir` whose status is read and reported: agents (above) that have
/// a `.version`, sorted; with `only` set (`desiredAgent`), that one alone.
pub fn agent_names(workdir: &Path, own: &Own, only: &str) -> Vec<AgentName> {
    let mut names = Vec::new();
    let Ok(rd) = std::fs::read_dir(workdir) else {
        return names;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !only.is_empty() && name != only {
            continue;
        }
        // A folder without `.version` is not reported (the original's rule).
        let Ok(agent) = AgentName::parse(&name) else {
            continue;
        };
        // ops-updater's own downloads: reported as the updater itself, never run as an agent.
        if agent == proto::names::SELF_AGENT {
            continue;
        }
        if check_agent(workdir, own, &name).is_ok() && e.path().join(VERSION_FILE).is_file() {
            names.push(agent);
        }
    }
    names.sort();
    names
}

/// The held workdir lock: released by the kernel when the process ends, however it ends.
#[derive(Debug)]
pub struct Lock {
    _file: nix::fcntl::Flock<File>,
    pub path: PathBuf,
}

/// Why the workdir lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another ops-updater{} runs on workdir {} (it holds the lock {})", holder.as_deref().map(|p| format!(" (pid {p})")).unwrap_or_default(), workdir.display(), path.display())]
    Held {
        workdir: PathBuf,
        path: PathBuf,
        holder: Option<String>,
    },
    #[error("lock file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Takes the exclusive lock on `<workdir>/.ops-updater.lock` (`flock`, not waiting),
/// creating the workdir and the file if needed, and writes this process's pid into it for
/// the message a second instance prints. The descriptor is close-on-exec, so control
/// scripts and the agents they start never inherit the lock.
pub fn lock(workdir: &Path) -> Result<Lock, LockError> {
    use nix::fcntl::{Flock, FlockArg};
    let path = workdir.join(LOCK_FILE);
    let io = |source| LockError::Io {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(workdir).map_err(io)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    let mut held = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            let holder = std::fs::read_to_string(&path)
                .ok()
                .map(|s| s.trim().chars().take(20).collect::<String>())
                .filter(|s| !s.is_empty());
            return Err(LockError::Held {
                workdir: workdir.to_path_buf(),
                path,
                holder,
            });
        }
        Err((_, e)) => return Err(io(e.into())),
    };
    held.set_len(0).map_err(io)?;
    writeln!(held, "{}", std::process::id()).map_err(io)?;
    Ok(Lock { _file: held, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_an_agent() {
        let t = tempfile::tempdir().unwrap();
        let w = t.path();
        std::fs::write(w.join("cfg.json"), "{}").unwrap();
        std::fs::create_dir_all(w.join("data/2019")).unwrap();
        std::fs::create_dir_all(w.join("a/1.0")).unwrap();
        std::fs::write(w.join("a/1.0/control"), "").unwrap();
        std::fs::create_dir_all(w.join("b")).unwrap();
        std::fs::write(w.join("b/.version"), "1\n").unwrap();
        std::fs::create_dir_all(w.join("state")).unwrap();
        std::fs::write(w.join("state/.version"), "1\n").unwrap();
        std::fs::write(w.join("state/meta.json"), "{}").unwrap();
        std::os::unix::fs::symlink(w.join("b"), w.join("link")).unwrap();
        // A first install cut short: only the updater's download folder.
        std::fs::create_dir_all(w.join("c/.download")).unwrap();
        let own = Own::new([w.join("cfg.json"), w.join("state/meta.json")]);
        let check = |name: &str| {
            check_agent(w, &own, name)
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        assert_eq!(check("a"), Ok(()));
        assert_eq!(check("b"), Ok(()));
        assert_eq!(check("c"), Ok(()));
        assert!(check("cfg.json").unwrap_err().contains("not a folder"));
        assert!(check("data").unwrap_err().contains("no .version"));
        assert!(check("state").unwrap_err().contains("own"));
        assert!(check("link").unwrap_err().contains("not a folder"));
        assert!(check("gone").unwrap_err().contains("not in the workdir"));
        assert!(check("..").is_err());
        assert_eq!(agent_names(w, &own, ""), ["b"]);
        assert_eq!(agent_names(w, &own, "a"), Vec::<String>::new());
    }

    #[test]
    fn a_second_lock_on_one_workdir_is_refused_until_the_first_goes() {
        let t = tempfile::tempdir().unwrap();
        let first = lock(t.path()).unwrap();
        let e = lock(t.path()).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("another ops-updater"), "{msg}");
        assert!(msg.contains(&std::process::id().to_string()), "{msg}");
        drop(first);
        lock(t.path()).unwrap();
    }
}
