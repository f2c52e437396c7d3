//! Cleaning up the cgroups a test made: what an agent left running in them is killed, then
//! the folders are removed, children first.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Removes `parent` and the cgroups directly below it (the agents' cgroups), killing every
/// process still in one, giving each folder up to two seconds. A folder that cannot be
/// removed by then is said on stderr; a missing one is fine.
pub fn remove_tree(parent: &Path) {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(parent)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    dirs.push(parent.to_path_buf());
    for dir in dirs {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.split_whitespace().filter_map(|p| p.parse().ok()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            match std::fs::remove_dir(&dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if Instant::now() > deadline => {
                    eprintln!("cleanup: cannot remove {}: {e}", dir.display());
                    break;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}
