//! The one set of rules by which a URL path becomes a file of `tarballDir`, shared by the
//! file server and the digest resolver, so that ops-meta never hashes (and hands to hosts
//! the digest of) a file it would refuse to serve.
//!
//! A path is checked as text first (`safe_relative`: no encoded separators, no dot or
//! hidden segments), then resolved (symlinks followed) and checked again to lie inside the
//! canonical `tarballDir` with no hidden component. Only regular files are opened, and they
//! are opened with `O_NONBLOCK`, so a FIFO or a device someone left in `tarballDir` is
//! refused instead of blocking a thread of the blocking pool forever. Blocking: call from
//! `spawn_blocking`.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

/// Why a path does not name a servable file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TarfsError {
    /// The path is refused as text (the reason says which rule).
    #[error("refused path: {0}")]
    BadPath(&'static str),
    /// Nothing (servable) is there: missing, a folder, hidden, or tarballDir unset.
    #[error("not found")]
    NotFound,
    /// It resolves (through a symlink) outside `tarballDir` or to a hidden name.
    #[error("resolves outside tarballDir or to a hidden file")]
    Outside,
    /// Something is there but it is not a regular file (a FIFO, a socket, a device).
    #[error("not a regular file")]
    NotRegular,
    #[error("{0}")]
    Io(String),
}

/// The request path (`/a/b.tar.gz`, percent-encoded) as a safe relative path.
pub fn safe_relative(raw: &str) -> Result<PathBuf, TarfsError> {
    let lower = raw.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") || lower.contains("%00") {
        return Err(TarfsError::BadPath("encoded '/', '\\' or NUL"));
    }
    let Some(rest) = raw.strip_prefix('/') else {
        return Err(TarfsError::BadPath("not absolute"));
    };
    let decoded = percent_decode(rest).ok_or(TarfsError::BadPath("bad percent-encoding"))?;
    if decoded.contains('\\') || decoded.contains('\0') {
        return Err(TarfsError::BadPath("'\\' or NUL"));
    }
    if decoded.is_empty() {
        // The root: no listings.
        return Err(TarfsError::NotFound);
    }
    let mut out = PathBuf::new();
    for seg in decoded.split('/') {
        match seg {
            "" => return Err(TarfsError::BadPath("empty segment")),
            "." | ".." => return Err(TarfsError::BadPath("dot segment")),
            s if s.starts_with('.') => return Err(TarfsError::NotFound),
            s => out.push(s),
        }
    }
    // Belt and braces: what we built must be plain names only.
    if !out.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(TarfsError::BadPath("not a plain relative path"));
    }
    Ok(out)
}

fn has_hidden(p: &Path) -> bool {
    p.components().any(|c| match c {
        Component::Normal(s) => s.to_string_lossy().starts_with('.'),
        _ => true,
    })
}

/// Decodes `%XX`; `None` for a malformed escape or a result that is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The canonical path of the file `url_path` names under `dir`, checked by every rule.
pub fn resolve(dir: &Path, url_path: &str) -> Result<PathBuf, TarfsError> {
    if dir.as_os_str().is_empty() {
        return Err(TarfsError::NotFound);
    }
    let rel = safe_relative(url_path)?;
    let root = std::fs::canonicalize(dir).map_err(|_| TarfsError::NotFound)?;
    let full = std::fs::canonicalize(root.join(&rel)).map_err(|_| TarfsError::NotFound)?;
    match full.strip_prefix(&root) {
        Ok(inside) if !has_hidden(inside) => Ok(full),
        _ => Err(TarfsError::Outside),
    }
}

/// Opens `url_path` under `dir` for reading, only if it is a regular file; returns the
/// file, its canonical path and its metadata. Never blocks on a FIFO or a device.
pub fn open(dir: &Path, url_path: &str) -> Result<(File, PathBuf, std::fs::Metadata), TarfsError> {
    let full = resolve(dir, url_path)?;
    // `O_NONBLOCK` makes opening a FIFO return at once; it changes nothing for the
    // regular files we keep. The type is checked on the open descriptor (not on the path,
    // which could be swapped in between).
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&full)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => TarfsError::NotFound,
            _ => TarfsError::Io(format!("{}: {e}", full.display())),
        })?;
    let md = file
        .metadata()
        .map_err(|e| TarfsError::Io(format!("{}: {e}", full.display())))?;
    if md.is_dir() {
        return Err(TarfsError::NotFound);
    }
    if !md.is_file() {
        return Err(TarfsError::NotRegular);
    }
    Ok((file, full, md))
}

/// Reads a small file (`.md5`, `.sha256`) of at most `max` bytes by the same rules.
pub fn read_small(dir: &Path, url_path: &str, max: u64) -> Result<String, TarfsError> {
    let (f, full, md) = open(dir, url_path)?;
    if md.len() > max {
        return Err(TarfsError::Io(format!(
            "{}: {} bytes, more than {max}",
            full.display(),
            md.len()
        )));
    }
    let mut s = String::new();
    f.take(max)
        .read_to_string(&mut s)
        .map_err(|e| TarfsError::Io(format!("{}: {e}", full.display())))?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_paths_are_refused() {
        for bad in [
            "/../etc/passwd",
            "/a/../../etc/passwd",
            "/%2e%2e/etc/passwd",
            "/a%2f..%2f..%2fetc",
            "/a%5c..",
            "//etc/passwd",
            "/a//b",
            "/a/./b",
            "/.hidden",
            "/a/.md5",
            "/a%00b",
            "/%2E%2E/%2e%2e/x",
            "/..%5cx",
            "/a\\..\\x",
            "/./x",
            "/%c3",
            "/%zz",
            "relative",
        ] {
            assert!(safe_relative(bad).is_err(), "{bad:?} accepted");
        }
        for hidden in ["/.env", "/a/.git/config", "/%2egit"] {
            assert_eq!(safe_relative(hidden), Err(TarfsError::NotFound), "{hidden}");
        }
        assert_eq!(
            safe_relative("/falcon/falcon-agent-3.1.3.tar.gz").unwrap(),
            PathBuf::from("falcon/falcon-agent-3.1.3.tar.gz")
        );
        assert_eq!(
            safe_relative("/a%20b.tar.gz").unwrap(),
            PathBuf::from("a b.tar.gz")
        );
    }

    #[test]
    fn only_regular_files_inside_are_opened() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("tarball");
        std::fs::create_dir_all(dir.join("falcon")).unwrap();
        std::fs::write(dir.join("falcon/a-1.tar.gz"), b"x").unwrap();
        std::fs::write(root.path().join("outside"), b"secret").unwrap();
        std::os::unix::fs::symlink(root.path().join("outside"), dir.join("escape.tar.gz")).unwrap();
        std::os::unix::fs::symlink("falcon/a-1.tar.gz", dir.join("inside.tar.gz")).unwrap();
        let fifo = dir.join("fifo.tar.gz");
        nix_mkfifo(&fifo);
        assert!(open(&dir, "/falcon/a-1.tar.gz").is_ok());
        assert!(
            open(&dir, "/inside.tar.gz").is_ok(),
            "a symlink inside is followed"
        );
        assert_eq!(
            open(&dir, "/escape.tar.gz").unwrap_err(),
            TarfsError::Outside
        );
        // Regression: opening a FIFO blocked a blocking-pool thread forever.
        assert_eq!(
            open(&dir, "/fifo.tar.gz").unwrap_err(),
            TarfsError::NotRegular
        );
        assert_eq!(open(&dir, "/falcon").unwrap_err(), TarfsError::NotFound);
        assert_eq!(open(&dir, "/nothing").unwrap_err(), TarfsError::NotFound);
        assert_eq!(open(Path::new(""), "/a").unwrap_err(), TarfsError::NotFound);
        assert_eq!(read_small(&dir, "/falcon/a-1.tar.gz", 16).unwrap(), "x");
        assert!(read_small(&dir, "/falcon/a-1.tar.gz", 0).is_err());
    }

    fn nix_mkfifo(p: &Path) {
        nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    }
}
