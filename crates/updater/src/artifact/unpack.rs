//! Unpacking an agent tarball into a temporary sibling folder, checking every member
//! ourselves: no absolute paths, no `..`, no link leading out of the tree, no devices or
//! FIFOs, no writing through a link made earlier in the same archive, and caps on bytes
//! written and members. Only a fully checked tree is renamed into place.

// Unpacking runs on the blocking pool (see `install`): the fenced blocking calls are its job.
#![allow(clippy::disallowed_methods)]

use std::cell::Cell;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use flate2::bufread::GzDecoder;
use tar::EntryType;

use super::{install::MARKER, ArtifactError, Limits};
use crate::{control, fsx};

/// Infix of the temporary folder a version is unpacked into: `.<version>.unpack-<random>`.
pub(crate) const UNPACK_INFIX: &str = ".unpack-";

/// Room allowed in the decompressed stream on top of file contents: a 512-byte header and
/// up to 511 bytes of padding per member, plus long-name and pax records.
const STREAM_OVERHEAD_PER_ENTRY: u64 = 2048;

/// Reads at most `left` bytes from `inner`, then fails and raises `hit`. This bounds the
/// work spent on a decompression bomb even in data the unpacker never writes (headers,
/// skipped records).
struct CappedReader<R> {
    inner: R,
    left: u64,
    hit: Rc<Cell<bool>>,
}

impl<R: Read> Read for CappedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            // Only a probe past the cap that finds more data counts as a breach.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => {
                    self.hit.set(true);
                    Err(io::Error::other("decompressed stream over the cap"))
                }
            };
        }
        let want = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n as u64;
        Ok(n)
    }
}

/// Everything one unpack run needs to report and check.
struct Ctx<'a> {
    tarball: &'a Path,
    root: &'a Path,
    limits: &'a Limits,
    /// Set when the decompressed stream went over its cap.
    stream_hit: Rc<Cell<bool>>,
    /// File bytes written so far.
    written: u64,
}

impl Ctx<'_> {
    fn unsafe_member(&self, member: &str, reason: impl Into<String>) -> ArtifactError {
        ArtifactError::Unsafe {
            tarball: self.tarball.to_path_buf(),
            member: member.chars().take(200).collect(),
            reason: reason.into(),
        }
    }

    fn limit(&self, what: String) -> ArtifactError {
        ArtifactError::Limit {
            tarball: self.tarball.to_path_buf(),
            what,
        }
    }

    fn bytes_limit(&self) -> ArtifactError {
        self.limit(format!(
            "unpacks to more than {} bytes",
            self.limits.max_unpacked_bytes
        ))
    }

    /// A read error from the archive: a cap breach when the capped reader says so.
    fn archive(&self, e: io::Error) -> ArtifactError {
        if self.stream_hit.get() {
            self.bytes_limit()
        } else {
            ArtifactError::Archive {
                tarball: self.tarball.to_path_buf(),
                detail: e.to_string(),
            }
        }
    }

    fn io(&self, path: &Path) -> impl FnOnce(io::Error) -> ArtifactError {
        ArtifactError::io(path)
    }
}

/// A member path made relative and checked: only plain names (and `.`) are allowed.
/// Returns the reason when the path is refused.
pub(super) fn safe_relative(path: &Path) -> Result<PathBuf, &'static str> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err("'..' in the path"),
            Component::RootDir | Component::Prefix(_) => return Err("absolute path"),
        }
    }
    Ok(out)
}

/// Checks that a symlink at `rel` pointing at `target` stays inside the tree, resolving the
/// target relative to the link's folder. `..` is allowed only before the first name: every
/// folder above the link is a real folder of the tree (see `parents`), so climbing through
/// them is exact, whereas `a/..` could climb out of whatever `a` links to.
pub(super) fn check_symlink_target(rel: &Path, target: &Path) -> Result<(), &'static str> {
    if target.as_os_str().is_empty() {
        return Err("symlink with an empty target");
    }
    let mut depth = rel.components().count().saturating_sub(1);
    let mut seen_name = false;
    for c in target.components() {
        match c {
            Component::RootDir | Component::Prefix(_) => return Err("symlink to an absolute path"),
            Component::CurDir => {}
            Component::Normal(_) => seen_name = true,
            Component::ParentDir if seen_name => {
                return Err("symlink target has '..' after a name")
            }
            Component::ParentDir => {
                if depth == 0 {
                    return Err("symlink leads out of the tree");
                }
                depth -= 1;
            }
        }
    }
    Ok(())
}

/// Makes sure every folder above `rel` is a real folder inside the tree (never a symlink,
/// so nothing is written through a link made earlier in the archive), creating missing ones
/// when `create` is set.
fn parents(ctx: &Ctx, member: &str, rel: &Path, create: bool) -> Result<(), ArtifactError> {
    let mut cur = ctx.root.to_path_buf();
    let mut comps: Vec<_> = rel.components().collect();
    comps.pop();
    for c in comps {
        cur.push(c);
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(ctx.unsafe_member(member, "a parent in the path is not a folder")),
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                std::fs::create_dir(&cur).map_err(ctx.io(&cur))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ctx.unsafe_member(member, "link target does not exist"))
            }
            Err(e) => return Err(ArtifactError::io(&cur)(e)),
        }
    }
    Ok(())
}

/// Clears the name `path` for a new member: an earlier file or link of the same name is
/// removed (tar semantics: the later member wins); a folder is never replaced.
fn clear_slot(ctx: &Ctx, member: &str, path: &Path) -> Result<(), ArtifactError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Err(ctx.unsafe_member(member, "would replace a folder")),
        // remove_file unlinks a symlink itself, never what it points at.
        Ok(_) => std::fs::remove_file(path).map_err(ctx.io(path)),
        Err(_) => Ok(()),
    }
}

/// Mode bits kept from the archive: permissions only, never setuid, setgid or sticky, and
/// never group or other write: agents run as root, and a world-writable `control` or binary
/// from a careless tarball would let any local user run code as root.
fn plain_mode(mode: u32) -> u32 {
    mode & 0o755
}

/// Blocking (call via spawn_blocking). Unpack tarball into a temp sibling `<agent_dir>/.<version>.unpack-<rand>/`,
/// refusing absolute paths, `..`, symlinks/hardlinks leaving the tree, devices, FIFOs; capping bytes and entries;
/// keeping modes. Requires an executable `control` at the root. Then copies in `extra_files` (e.g. the
/// tarball and its .md5, so the layout matches the original), writes a marker `.ops-updater-complete`, fsyncs
/// and renames the temp folder to `<agent_dir>/<version>/` (replacing nothing: if it exists, error AlreadyExists).
/// Any failure removes the temp folder and leaves agent_dir as it was.
pub fn unpack(
    tarball: &Path,
    agent_dir: &Path,
    version: &str,
    extra_files: &[&Path],
    limits: &Limits,
) -> Result<PathBuf, ArtifactError> {
    proto::validate::validate_version(version)?;
    let dest = agent_dir.join(version);
    if std::fs::symlink_metadata(&dest).is_ok() {
        return Err(ArtifactError::AlreadyExists { path: dest });
    }
    let tmp = temp_folder(agent_dir, version)?;
    let members = File::open(tarball)
        .map_err(ArtifactError::io(tarball))
        .and_then(|f| {
            unpack_members(
                BufReader::with_capacity(64 * 1024, f),
                tarball,
                &tmp,
                limits,
            )
        });
    if let Err(e) = members {
        discard(&tmp);
        return Err(e);
    }
    let dest = finish(&tmp, agent_dir, version, extra_files)?;
    tracing::info!(tarball = %tarball.display(), dir = %dest.display(), "unpacked");
    Ok(dest)
}

/// Blocking. Makes the empty temporary folder `<agent_dir>/.<version>.unpack-<rand>/` that a
/// version is unpacked into, after checking the version name. Whether `<agent_dir>/<version>`
/// exists is checked again by [`finish`], right before the rename.
pub(crate) fn temp_folder(agent_dir: &Path, version: &str) -> Result<PathBuf, ArtifactError> {
    proto::validate::validate_version(version)?;
    let tmp = agent_dir.join(format!(
        ".{version}{UNPACK_INFIX}{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir(&tmp).map_err(ArtifactError::io(&tmp))?;
    Ok(tmp)
}

/// Blocking. Turns a temporary folder that [`unpack_members`] filled into
/// `<agent_dir>/<version>/`: adds `extra_files`, makes everything durable, writes the
/// completion marker and renames the folder into place (never over an existing one).
/// The caller must have verified the tarball before: this is the commit point. On failure
/// the temporary folder is removed.
pub(crate) fn finish(
    tmp: &Path,
    agent_dir: &Path,
    version: &str,
    extra_files: &[&Path],
) -> Result<PathBuf, ArtifactError> {
    let dest = agent_dir.join(version);
    let result = complete(tmp, extra_files, version).and_then(|()| {
        if std::fs::symlink_metadata(&dest).is_ok() {
            return Err(ArtifactError::AlreadyExists { path: dest.clone() });
        }
        std::fs::rename(tmp, &dest).map_err(ArtifactError::io(&dest))?;
        fsx::fsync_dir(agent_dir).map_err(ArtifactError::io(agent_dir))
    });
    match result {
        Ok(()) => Ok(dest),
        Err(e) => {
            discard(tmp);
            Err(e)
        }
    }
}

/// Removes a temporary folder after a failure, logging (not returning) a second failure so
/// that the first one is what the caller sees.
pub(crate) fn discard(tmp: &Path) {
    if let Err(rm) = remove_tree(tmp) {
        tracing::warn!(dir = %tmp.display(), error = %rm, "cannot remove temporary folder");
    }
}

/// Removes a tree even when the archive left folders without write permission.
pub(crate) fn remove_tree(dir: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(first) => {
            fn open_up(dir: &Path) {
                let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
                if let Ok(rd) = std::fs::read_dir(dir) {
                    for e in rd.flatten() {
                        if e.file_type().is_ok_and(|t| t.is_dir()) {
                            open_up(&e.path());
                        }
                    }
                }
            }
            open_up(dir);
            std::fs::remove_dir_all(dir).map_err(|_| first)
        }
    }
}

/// Blocking. Inflates the gzip-compressed tar stream `compressed` into `root` (which exists
/// and is empty), checking every member; then requires an executable `control` at the root
/// and gives folders their modes. `tarball` only names the archive in errors. The source may
/// be a file or a download still arriving: this is the one place members are checked.
/// On failure `root` is left as it is, for the caller to remove.
pub(crate) fn unpack_members(
    compressed: impl BufRead,
    tarball: &Path,
    root: &Path,
    limits: &Limits,
) -> Result<(), ArtifactError> {
    let stream_hit = Rc::new(Cell::new(false));
    let stream_cap = limits
        .max_unpacked_bytes
        .saturating_add(limits.max_entries.saturating_mul(STREAM_OVERHEAD_PER_ENTRY))
        .saturating_add(1 << 20);
    let reader = CappedReader {
        inner: GzDecoder::new(compressed),
        left: stream_cap,
        hit: stream_hit.clone(),
    };
    let mut ctx = Ctx {
        tarball,
        root,
        limits,
        stream_hit,
        written: 0,
    };
    let mut archive = tar::Archive::new(reader);
    let mut dirs: Vec<(PathBuf, u32)> = Vec::new();
    let mut count = 0u64;
    // `entries` folds GNU long names and pax records into the member they describe, so
    // long paths arrive whole and are checked like any other.
    let entries = archive.entries().map_err(|e| ctx.archive(e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| ctx.archive(e))?;
        count += 1;
        if count > limits.max_entries {
            return Err(ctx.limit(format!("has more than {} members", limits.max_entries)));
        }
        let kind = entry.header().entry_type();
        if kind == EntryType::XGlobalHeader {
            // pax defaults for the whole archive (e.g. mtime); nothing to write.
            continue;
        }
        let raw = entry.path().map_err(|e| ctx.archive(e))?.into_owned();
        let member = raw.display().to_string();
        let rel = safe_relative(&raw).map_err(|r| ctx.unsafe_member(&member, r))?;
        let mode = entry.header().mode().map_err(|e| ctx.archive(e))?;
        let path = root.join(&rel);
        if rel.as_os_str().is_empty() {
            // `./` itself: the root exists already; anything else cannot be named `.`.
            if kind == EntryType::Directory {
                continue;
            }
            return Err(ctx.unsafe_member(&member, "member without a name"));
        }
        match kind {
            EntryType::Directory => {
                parents(&ctx, &member, &rel, true)?;
                match std::fs::symlink_metadata(&path) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => return Err(ctx.unsafe_member(&member, "folder name already taken")),
                    Err(_) => std::fs::create_dir(&path).map_err(ctx.io(&path))?,
                }
                dirs.push((path, mode));
            }
            EntryType::Regular | EntryType::Continuous => {
                parents(&ctx, &member, &rel, true)?;
                clear_slot(&ctx, &member, &path)?;
                // `size` includes a pax override; the real count is kept while writing.
                let declared = entry.size();
                if ctx.written.saturating_add(declared) > limits.max_unpacked_bytes {
                    return Err(ctx.bytes_limit());
                }
                write_file(&mut ctx, &mut entry, &path, mode)?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|e| ctx.archive(e))?
                    .ok_or_else(|| ctx.unsafe_member(&member, "symlink without a target"))?
                    .into_owned();
                check_symlink_target(&rel, &target).map_err(|r| ctx.unsafe_member(&member, r))?;
                parents(&ctx, &member, &rel, true)?;
                clear_slot(&ctx, &member, &path)?;
                std::os::unix::fs::symlink(&target, &path).map_err(ctx.io(&path))?;
            }
            EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(|e| ctx.archive(e))?
                    .ok_or_else(|| ctx.unsafe_member(&member, "hard link without a target"))?
                    .into_owned();
                let trel = safe_relative(&target)
                    .map_err(|r| ctx.unsafe_member(&member, format!("hard link target: {r}")))?;
                parents(&ctx, &member, &trel, false)?;
                let tpath = root.join(&trel);
                // Only to a regular file written earlier by this archive: a link to a
                // symlink or folder could be used to reach outside.
                if trel.as_os_str().is_empty()
                    || !std::fs::symlink_metadata(&tpath).is_ok_and(|m| m.is_file())
                {
                    return Err(ctx.unsafe_member(
                        &member,
                        "hard link to something that is not a file of this archive",
                    ));
                }
                parents(&ctx, &member, &rel, true)?;
                clear_slot(&ctx, &member, &path)?;
                std::fs::hard_link(&tpath, &path).map_err(ctx.io(&path))?;
            }
            other => {
                return Err(ctx.unsafe_member(
                    &member,
                    format!("{other:?} members are not allowed (only files, folders and links)"),
                ))
            }
        }
    }

    if !control::is_executable(&root.join(control::CONTROL)) {
        return Err(ArtifactError::NoControl {
            tarball: tarball.to_path_buf(),
        });
    }
    // Folders get their modes last, so that a read-only folder in the archive did not stop
    // its own members from being written; the owner keeps full access so the tree can be
    // pruned later.
    for (dir, mode) in dirs.iter().rev() {
        std::fs::set_permissions(
            dir,
            std::fs::Permissions::from_mode(plain_mode(*mode) | 0o700),
        )
        .map_err(ArtifactError::io(dir))?;
    }
    Ok(())
}

/// Adds `extra_files` to a fully unpacked `root`, makes the whole tree durable, then writes
/// the completion marker.
fn complete(root: &Path, extra_files: &[&Path], version: &str) -> Result<(), ArtifactError> {
    for extra in extra_files {
        let name = extra.file_name().ok_or_else(|| ArtifactError::Io {
            path: extra.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a file path"),
        })?;
        let to = root.join(name);
        match std::fs::symlink_metadata(&to) {
            Ok(m) if m.is_dir() => {
                return Err(ArtifactError::AlreadyExists { path: to });
            }
            Ok(_) => std::fs::remove_file(&to).map_err(ArtifactError::io(&to))?,
            Err(_) => {}
        }
        // A hard link costs nothing (same file system); copy when that is not possible.
        if std::fs::hard_link(extra, &to).is_err() {
            std::fs::copy(extra, &to).map_err(ArtifactError::io(&to))?;
            File::open(&to)
                .and_then(|f| f.sync_all())
                .map_err(ArtifactError::io(&to))?;
        }
    }
    sync_filesystem(root)?;
    fsx::write_atomic(&root.join(MARKER), format!("{version}\n").as_bytes())
        .map_err(ArtifactError::io(&root.join(MARKER)))?;
    fsx::fsync_dir(root).map_err(ArtifactError::io(root))?;
    Ok(())
}

/// Writes one regular member with O_EXCL (never through an existing name), counting the
/// bytes actually written against the cap rather than trusting the header.
fn write_file(
    ctx: &mut Ctx,
    entry: &mut impl Read,
    path: &Path,
    mode: u32,
) -> Result<(), ArtifactError> {
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(ctx.io(path))?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match entry.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ctx.archive(e)),
        };
        ctx.written += n as u64;
        if ctx.written > ctx.limits.max_unpacked_bytes {
            return Err(ctx.bytes_limit());
        }
        out.write_all(&buf[..n]).map_err(ctx.io(path))?;
    }
    // No fsync per file: one `syncfs` before the completion marker makes every member
    // durable at once (see `complete`), which is what made thousands of small files slow.
    drop(out);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(plain_mode(mode)))
        .map_err(ctx.io(path))
}

/// Flushes the file system holding `dir` (every member just written, data and metadata)
/// with one `syncfs(2)`. The completion marker is written only after it, so a marker on
/// disk always means a complete tree on disk.
fn sync_filesystem(dir: &Path) -> Result<(), ArtifactError> {
    use std::os::fd::AsRawFd;
    let f = File::open(dir).map_err(ArtifactError::io(dir))?;
    nix::unistd::syncfs(f.as_raw_fd()).map_err(|e| ArtifactError::io(dir)(io::Error::from(e)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_support::tarball::{hostile_archives, targz, Entry};

    fn limits() -> Limits {
        Limits {
            max_unpacked_bytes: 16 << 20,
            ..Limits::default()
        }
    }

    /// A temp root with the agent folder two levels down, so that `../../x` from inside the
    /// unpack folder still lands inside the root we snapshot.
    struct Fixture {
        root: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Fixture {
            let root = tempfile::tempdir().unwrap();
            let agent = root.path().join("work").join("falcon-agent");
            std::fs::create_dir_all(agent.join("0.9")).unwrap();
            std::fs::write(agent.join(".version"), "0.9\n").unwrap();
            std::fs::write(agent.join("0.9").join("control"), "#!/bin/sh\n").unwrap();
            Fixture { root }
        }
        fn agent(&self) -> PathBuf {
            self.root.path().join("work").join("falcon-agent")
        }
        fn tarball(&self, bytes: &[u8]) -> PathBuf {
            let p = self.root.path().join("t.tar.gz");
            std::fs::write(&p, bytes).unwrap();
            p
        }
    }

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn good_archive_keeps_modes_strips_setuid_and_adds_extras() {
        let fx = Fixture::new();
        let tb = fx.tarball(&targz(&[
            Entry::exec("control", "#!/bin/sh\necho started\n"),
            Entry::Dir {
                path: "bin/".into(),
            },
            Entry::File {
                path: "bin/suid".into(),
                mode: 0o6755,
                data: b"x".to_vec(),
            },
            Entry::file("./conf/app.cfg", "a=1\n"),
            Entry::Symlink {
                path: "bin/cfg".into(),
                target: "../conf/app.cfg".into(),
            },
            Entry::Symlink {
                path: "current".into(),
                target: ".".into(),
            },
            Entry::Hardlink {
                path: "control.bak".into(),
                target: "control".into(),
            },
        ]));
        let extra = fx.root.path().join("falcon-agent-1.0.1.tar.gz.md5");
        std::fs::write(&extra, "abc  falcon-agent-1.0.1.tar.gz\n").unwrap();
        let dir = unpack(&tb, &fx.agent(), "1.0.1", &[&extra], &limits()).unwrap();
        assert_eq!(dir, fx.agent().join("1.0.1"));
        assert_eq!(mode(&dir.join("control")), 0o755);
        assert_eq!(mode(&dir.join("bin/suid")), 0o755);
        assert_eq!(
            std::fs::read_to_string(dir.join("bin/cfg")).unwrap(),
            "a=1\n"
        );
        assert_eq!(
            std::fs::read(dir.join("control.bak")).unwrap(),
            b"#!/bin/sh\necho started\n"
        );
        assert!(dir.join(MARKER).is_file());
        assert_eq!(
            std::fs::read(dir.join("falcon-agent-1.0.1.tar.gz.md5")).unwrap(),
            std::fs::read(&extra).unwrap()
        );
        // Nothing left beside it but the new folder.
        let names: Vec<String> = std::fs::read_dir(fx.agent())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(UNPACK_INFIX))
            .collect();
        assert!(names.is_empty(), "{names:?}");
    }

    #[test]
    fn long_names_from_gnu_and_pax_headers_are_unpacked() {
        let long = format!("{}/{}", "d".repeat(120), "f".repeat(120));
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o755);
        h.set_size(3);
        b.append_data(&mut h, "control", &b"#!\n"[..]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(4);
        b.append_data(&mut h, &long, &b"long"[..]).unwrap();
        // A pax record naming the next member, as GNU tar --format=pax writes it.
        let pax_name = format!("{}/{}", "p".repeat(150), "q".repeat(50));
        let record = pax_record("path", &pax_name);
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_mode(0o644);
        h.set_size(record.len() as u64);
        b.append_data(&mut h, "PaxHeaders/x", record.as_bytes())
            .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(3);
        b.append_data(&mut h, "short", &b"pax"[..]).unwrap();
        let bytes = test_support::tarball::gzip(&b.into_inner().unwrap());
        let fx = Fixture::new();
        let tb = fx.tarball(&bytes);
        let dir = unpack(&tb, &fx.agent(), "2.0", &[], &limits()).unwrap();
        assert_eq!(std::fs::read(dir.join(&long)).unwrap(), b"long");
        assert_eq!(std::fs::read(dir.join(&pax_name)).unwrap(), b"pax");
        assert!(!dir.join("short").exists());
    }

    /// `"<len> <key>=<value>\n"`, where `len` counts the whole record including itself.
    fn pax_record(key: &str, value: &str) -> String {
        let body = format!(" {key}={value}\n");
        let mut len = body.len() + 1;
        while format!("{len}{body}").len() != len {
            len += 1;
        }
        format!("{len}{body}")
    }

    #[test]
    fn pax_path_with_dot_dot_is_refused() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o755);
        h.set_size(3);
        b.append_data(&mut h, "control", &b"#!\n"[..]).unwrap();
        let record = pax_record("path", "../../pwned");
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_size(record.len() as u64);
        b.append_data(&mut h, "PaxHeaders/x", record.as_bytes())
            .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(1);
        b.append_data(&mut h, "innocent", &b"x"[..]).unwrap();
        let e = refused(
            "pax dot-dot",
            &test_support::tarball::gzip(&b.into_inner().unwrap()),
            &limits(),
        );
        assert!(matches!(e, ArtifactError::Unsafe { .. }), "{e:?}");
    }

    #[test]
    fn read_only_folder_in_archive_still_unpacks_and_can_be_removed() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o555);
        h.set_size(0);
        b.append_data(&mut h, "ro/", &b""[..]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o755);
        h.set_size(3);
        b.append_data(&mut h, "control", &b"#!\n"[..]).unwrap();
        b.append_data(&mut h, "ro/inner", &b"#!\n"[..]).unwrap();
        let fx = Fixture::new();
        let tb = fx.tarball(&test_support::tarball::gzip(&b.into_inner().unwrap()));
        let dir = unpack(&tb, &fx.agent(), "3.0", &[], &limits()).unwrap();
        assert!(dir.join("ro/inner").is_file());
        assert_eq!(mode(&dir.join("ro")), 0o755);
        remove_tree(&dir).unwrap();
        assert!(!dir.exists());
    }

    /// Runs `archive` through `unpack` and checks it failed without changing anything.
    fn refused(name: &str, archive: &[u8], limits: &Limits) -> ArtifactError {
        let fx = Fixture::new();
        let tb = fx.tarball(archive);
        let before = test_support::tree(fx.root.path());
        let e = match unpack(&tb, &fx.agent(), "1.0.1", &[], limits) {
            Ok(d) => panic!("{name}: unpacked into {}", d.display()),
            Err(e) => e,
        };
        assert_eq!(
            test_support::tree(fx.root.path()),
            before,
            "{name}: tree changed"
        );
        assert!(
            !Path::new("/tmp/agent-updater-pwned").exists(),
            "{name}: wrote outside"
        );
        e
    }

    #[test]
    fn every_hostile_archive_is_refused_and_changes_nothing() {
        for (name, archive) in hostile_archives() {
            let e = refused(name, &archive, &limits());
            eprintln!("{name}: {e}");
        }
    }

    #[test]
    fn gzip_bomb_is_a_limit_error() {
        let e = refused(
            "bomb",
            &test_support::tarball::gzip_bomb(64 << 20),
            &limits(),
        );
        assert!(matches!(e, ArtifactError::Limit { .. }), "{e:?}");
    }

    /// A header that claims a small size does not let more bytes through: the cap counts
    /// bytes written, across files.
    #[test]
    fn many_small_files_over_the_byte_cap_are_refused() {
        let mut entries = vec![Entry::exec("control", "#!/bin/sh\n")];
        for i in 0..10 {
            entries.push(Entry::file(&format!("f{i}"), vec![1u8; 1000]));
        }
        let e = refused(
            "small files",
            &targz(&entries),
            &Limits {
                max_unpacked_bytes: 5000,
                ..limits()
            },
        );
        assert!(matches!(e, ArtifactError::Limit { .. }), "{e:?}");
    }

    #[test]
    fn too_many_entries_are_refused() {
        let mut entries = vec![Entry::exec("control", "#!/bin/sh\n")];
        for i in 0..10 {
            entries.push(Entry::file(&format!("f{i}"), "x"));
        }
        let e = refused(
            "entries",
            &targz(&entries),
            &Limits {
                max_entries: 5,
                ..limits()
            },
        );
        assert!(e.to_string().contains("more than 5 members"), "{e}");
    }

    #[test]
    fn link_tricks_are_refused() {
        let control = Entry::exec("control", "#!/bin/sh\n");
        let cases: Vec<(&str, Vec<Entry>)> = vec![
            (
                "dot-dot after a name through a link to the root",
                vec![
                    control.clone(),
                    Entry::Symlink {
                        path: "here".into(),
                        target: ".".into(),
                    },
                    Entry::Symlink {
                        path: "out".into(),
                        target: "here/..".into(),
                    },
                ],
            ),
            (
                "nested symlink climbing too far",
                vec![
                    control.clone(),
                    Entry::Symlink {
                        path: "a/b/c".into(),
                        target: "../../../etc".into(),
                    },
                ],
            ),
            (
                "write through an in-tree link to a folder",
                vec![
                    control.clone(),
                    Entry::Dir {
                        path: "real/".into(),
                    },
                    Entry::Symlink {
                        path: "alias".into(),
                        target: "real".into(),
                    },
                    Entry::file("alias/f", "x"),
                ],
            ),
            (
                "hard link to a missing file",
                vec![
                    control.clone(),
                    Entry::Hardlink {
                        path: "h".into(),
                        target: "nope".into(),
                    },
                ],
            ),
            (
                "hard link with dot-dot",
                vec![
                    control.clone(),
                    Entry::Hardlink {
                        path: "h".into(),
                        target: "../falcon-agent/.version".into(),
                    },
                ],
            ),
            (
                "hard link to a symlink",
                vec![
                    control.clone(),
                    Entry::Symlink {
                        path: "s".into(),
                        target: "control".into(),
                    },
                    Entry::Hardlink {
                        path: "h".into(),
                        target: "s".into(),
                    },
                ],
            ),
            (
                "file replacing a folder",
                vec![
                    control.clone(),
                    Entry::Dir { path: "d/".into() },
                    Entry::file("d", "x"),
                ],
            ),
        ];
        for (name, entries) in cases {
            let e = refused(name, &targz(&entries), &limits());
            assert!(matches!(e, ArtifactError::Unsafe { .. }), "{name}: {e:?}");
        }
    }

    #[test]
    fn archive_without_executable_control_is_refused() {
        let e = refused(
            "no control",
            &targz(&[Entry::file("control", "#!/bin/sh\n")]),
            &limits(),
        );
        assert!(matches!(e, ArtifactError::NoControl { .. }), "{e:?}");
    }

    #[test]
    fn existing_version_folder_is_never_replaced() {
        let fx = Fixture::new();
        let tb = fx.tarball(&targz(&[Entry::exec("control", "#!/bin/sh\n")]));
        let before = test_support::tree(fx.root.path());
        let e = unpack(&tb, &fx.agent(), "0.9", &[], &limits()).unwrap_err();
        assert!(matches!(e, ArtifactError::AlreadyExists { .. }), "{e:?}");
        assert_eq!(test_support::tree(fx.root.path()), before);
    }

    #[test]
    fn hostile_version_is_refused() {
        let fx = Fixture::new();
        let tb = fx.tarball(&targz(&[Entry::exec("control", "#!/bin/sh\n")]));
        let e = unpack(&tb, &fx.agent(), "../x", &[], &limits()).unwrap_err();
        assert!(matches!(e, ArtifactError::Name(_)), "{e:?}");
    }

    #[test]
    fn symlink_targets() {
        let check = |link: &str, target: &str, ok: bool| {
            let got = check_symlink_target(Path::new(link), Path::new(target));
            assert_eq!(got.is_ok(), ok, "{link} -> {target}: {got:?}");
        };
        check("a", "b", true);
        check("a", ".", true);
        check("a/b", "../c", true);
        check("a/b/c", "../../d/e", true);
        check("a", "..", false);
        check("a/b", "../..", false);
        check("a", "/etc", false);
        check("a", "b/../c", false);
        check("a", "", false);
    }
}
