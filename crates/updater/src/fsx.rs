//! Durable file writes: every file that matters (`.version`, markers) is replaced atomically
//! by writing a temporary sibling, syncing it, renaming it over the target and syncing the
//! folder, so a crash leaves either the old content or the new, never a torn file.

// This module holds the blocking calls that `crates/updater/clippy.toml` fences elsewhere,
// and their twins for async code (`*_async`, on the blocking pool).
#![allow(clippy::disallowed_methods)]

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Name of the file, inside an agent's folder, that holds the version that should be current.
pub const VERSION_FILE: &str = ".version";

/// Longest `.version` file we read; anything bigger is not a version.
pub const MAX_VERSION_FILE_BYTES: u64 = 4096;

/// Infix of temporary files made by [`write_atomic`]: `.<name>.tmp-<random>`.
pub const TEMP_INFIX: &str = ".tmp-";

/// Write `data` to `path` atomically: temp file in the same dir, write, fsync, rename, fsync dir.
/// Blocking: async code uses the `_async` twin.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    write_atomic_mode(path, data, 0o666)
}

/// [`write_atomic`] for a file only its owner may read or write (mode 0600 whatever the
/// umask lets through): the file that replaces the target is created so, so no moment
/// exists in which another user could open it.
pub fn write_atomic_private(path: &Path, data: &[u8]) -> io::Result<()> {
    write_atomic_mode(path, data, 0o600)
}

/// Makes an existing file readable and writable by its owner only (mode 0600), when it
/// was more open; returns whether it changed the mode.
pub fn make_private(path: &Path) -> io::Result<bool> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)?.permissions().mode();
    if mode & 0o077 == 0 {
        return Ok(false);
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o700 | 0o600))?;
    Ok(true)
}

fn write_atomic_mode(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = parent_dir(path);
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: not a file path", path.display()),
        )
    })?;
    let tmp = dir.join(format!(
        ".{}{TEMP_INFIX}{}",
        name.to_string_lossy(),
        uuid::Uuid::new_v4().simple()
    ));
    let result = (|| {
        // create_new refuses to follow a symlink planted at the temporary name.
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    fsync_dir(&dir)
}

/// Flushes a folder's entries (new names, renames) to disk.
/// Blocking: async code uses the `_async` twin.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Read `<agent_dir>/.version` trimmed; Ok(None) if absent or empty.
pub fn read_version_file(agent_dir: &Path) -> io::Result<Option<String>> {
    use std::io::Read;
    let path = agent_dir.join(VERSION_FILE);
    let f = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut buf = Vec::new();
    // One byte over the cap tells a too-big file from one exactly at the cap.
    f.take(MAX_VERSION_FILE_BYTES + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > MAX_VERSION_FILE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: larger than {MAX_VERSION_FILE_BYTES} bytes",
                path.display()
            ),
        ));
    }
    let text = String::from_utf8(buf).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: not UTF-8", path.display()),
        )
    })?;
    let v = text.trim();
    Ok(if v.is_empty() {
        None
    } else {
        Some(v.to_string())
    })
}

/// Atomically records `version` as the one that should be current in `agent_dir`.
/// Blocking: async code uses the `_async` twin.
pub fn write_version_file(agent_dir: &Path, version: &str) -> io::Result<()> {
    write_atomic(
        &agent_dir.join(VERSION_FILE),
        format!("{version}\n").as_bytes(),
    )
}

/// Runs blocking filesystem work (removal, fsync, atomic writes) on tokio's blocking pool,
/// so the daemon's single runtime thread keeps its heartbeats and the other agents going.
/// The functions fenced by `crates/updater/clippy.toml` are called inside such closures.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(io::Error::other(format!("blocking task failed: {e}"))),
    }
}

/// [`write_atomic`] on the blocking pool.
pub async fn write_atomic_async(path: PathBuf, data: Vec<u8>) -> io::Result<()> {
    blocking(move || write_atomic(&path, &data)).await
}

/// [`fsync_dir`] on the blocking pool.
pub async fn fsync_dir_async(dir: PathBuf) -> io::Result<()> {
    blocking(move || fsync_dir(&dir)).await
}

/// `std::fs::remove_file` on the blocking pool.
pub async fn remove_file_async(path: PathBuf) -> io::Result<()> {
    blocking(move || std::fs::remove_file(&path)).await
}

/// `std::fs::remove_dir_all` on the blocking pool.
pub async fn remove_dir_all_async(path: PathBuf) -> io::Result<()> {
    blocking(move || std::fs::remove_dir_all(&path)).await
}

/// [`write_version_file`] on the blocking pool.
pub async fn write_version_file_async(agent_dir: PathBuf, version: String) -> io::Result<()> {
    blocking(move || write_version_file(&agent_dir, &version)).await
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_content_and_leaves_no_temp_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        write_atomic(&p, b"one").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        write_atomic(&p, b"two, longer").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two, longer");
        assert_eq!(test_support::tree(d.path()), vec!["f".to_string()]);
    }

    #[test]
    fn write_atomic_into_missing_folder_fails_and_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("missing").join("f");
        assert!(write_atomic(&p, b"x").is_err());
        assert!(test_support::tree(d.path()).is_empty());
    }

    #[test]
    fn version_file_round_trip() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read_version_file(d.path()).unwrap(), None);
        write_version_file(d.path(), "1.0.1").unwrap();
        assert_eq!(
            read_version_file(d.path()).unwrap().as_deref(),
            Some("1.0.1")
        );
        write_version_file(d.path(), "1.0.2").unwrap();
        assert_eq!(
            read_version_file(d.path()).unwrap().as_deref(),
            Some("1.0.2")
        );
        assert_eq!(test_support::tree(d.path()), vec![".version".to_string()]);
    }

    #[test]
    fn version_file_written_by_the_original_is_trimmed_and_empty_is_none() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(VERSION_FILE), "  0.0.9\n\n").unwrap();
        assert_eq!(
            read_version_file(d.path()).unwrap().as_deref(),
            Some("0.0.9")
        );
        std::fs::write(d.path().join(VERSION_FILE), "\n").unwrap();
        assert_eq!(read_version_file(d.path()).unwrap(), None);
    }

    #[test]
    fn huge_version_file_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(VERSION_FILE), vec![b'1'; 10_000]).unwrap();
        assert!(read_version_file(d.path()).is_err());
    }
}
