//! SHA-256 of local tarballs, computed by ops-meta itself and cached by file size and
//! modification time.
//!
//! Hashing runs on the blocking pool from a background task (see `server`), never on the
//! heartbeat path: a heartbeat answers from the last compiled snapshot and leaves `sha256`
//! out until the value is known. We chose a periodic re-check over hashing at config load
//! only because operators replace tarballs without reloading; a stale checksum would make
//! every updater refuse a good tarball, so changes must be noticed on their own.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use crate::desired::Shas;

#[derive(Debug, Clone)]
struct Entry {
    size: u64,
    mtime: SystemTime,
    sha: String,
}

/// The cache; one per server.
#[derive(Debug, Default)]
pub struct ShaCache {
    entries: Mutex<HashMap<PathBuf, Entry>>,
}

/// Hashes a file, streaming it.
pub fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

impl ShaCache {
    /// The SHA-256 of every file of `files` that exists in `dir`, hashing only files whose
    /// size or modification time changed since they were last hashed. Files that vanished
    /// are forgotten. Blocking: call from `spawn_blocking`.
    pub fn refresh_blocking(&self, dir: &Path, files: &[String]) -> Shas {
        let mut out = Shas::new();
        if dir.as_os_str().is_empty() {
            return out;
        }
        for file in files {
            let path = dir.join(file);
            let Ok(md) = std::fs::metadata(&path) else {
                self.entries.lock().remove(&path);
                continue;
            };
            if !md.is_file() {
                continue;
            }
            let (size, mtime) = (md.len(), md.modified().unwrap_or(SystemTime::UNIX_EPOCH));
            let cached = self
                .entries
                .lock()
                .get(&path)
                .filter(|e| e.size == size && e.mtime == mtime)
                .map(|e| e.sha.clone());
            let sha = match cached {
                Some(s) => s,
                None => match hash_file(&path) {
                    Ok(s) => {
                        tracing::info!(file = %path.display(), size, sha256 = %s, "hashed tarball");
                        self.entries.lock().insert(
                            path.clone(),
                            Entry {
                                size,
                                mtime,
                                sha: s.clone(),
                            },
                        );
                        s
                    }
                    Err(e) => {
                        tracing::warn!(file = %path.display(), error = %e, "cannot hash tarball");
                        continue;
                    }
                },
            };
            out.insert(file.clone(), sha);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_existing_files_and_notices_changes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a-1.tar.gz"), b"one").unwrap();
        let c = ShaCache::default();
        let files = vec!["a-1.tar.gz".to_string(), "a-2.tar.gz".to_string()];
        let got = c.refresh_blocking(dir.path(), &files);
        assert_eq!(got.len(), 1);
        assert_eq!(got["a-1.tar.gz"], hex::encode(Sha256::digest(b"one")));
        // Different size: rehashed.
        std::fs::write(dir.path().join("a-1.tar.gz"), b"other").unwrap();
        std::fs::write(dir.path().join("a-2.tar.gz"), b"two").unwrap();
        let got = c.refresh_blocking(dir.path(), &files);
        assert_eq!(got["a-1.tar.gz"], hex::encode(Sha256::digest(b"other")));
        assert_eq!(got["a-2.tar.gz"], hex::encode(Sha256::digest(b"two")));
        std::fs::remove_file(dir.path().join("a-2.tar.gz")).unwrap();
        assert_eq!(c.refresh_blocking(dir.path(), &files).len(), 1);
    }
}
