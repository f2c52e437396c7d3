//! `opsctl publish FILE.tar.gz --dir TARBALL_DIR`: puts a release where ops-meta serves
//! it, with the `.md5` file original updaters read, a `.sha256`, and with `--key` a
//! minisign signature made by the `minisign` tool.
//!
//! Everything is made in a hidden folder beside the target first (ops-meta's file server
//! never serves a hidden name), synced, then renamed into place: the checksum and
//! signature files first and the tarball last, so that once the tarball is there,
//! everything about it is too. A different release of the same name is never replaced
//! without `--force`.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use md5::Digest as _;

use crate::cli::PublishArgs;
use crate::{exit, print, Error};

/// A release file name, split and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    pub agent: proto::AgentName,
    pub version: proto::Version,
    /// `<agent>-<version>.tar.gz`.
    pub file: String,
}

/// Splits `<agent>-<version>.tar.gz`. Both names may hold `-`: with `agent` given the
/// name must start with it; otherwise the version starts at the first `-` followed by a
/// digit (`falcon-agent-1.0.1` is agent `falcon-agent`, version `1.0.1`).
pub fn parse_release(name: &str, agent: Option<&str>) -> Result<Release, String> {
    let stem = name.strip_suffix(".tar.gz").ok_or_else(|| {
        format!(
            "{:?} is not <agent>-<version>.tar.gz",
            proto::clean_text(name, 200)
        )
    })?;
    let (a, v) = match agent {
        Some(a) => {
            let v = stem
                .strip_prefix(a)
                .and_then(|r| r.strip_prefix('-'))
                .ok_or_else(|| {
                    format!("{name:?} does not start with the agent's name {a:?} and '-'")
                })?;
            (a, v)
        }
        None => {
            let at = stem
                .char_indices()
                .find(|&(i, c)| c == '-' && stem[i + 1..].starts_with(|d: char| d.is_ascii_digit()))
                .map(|(i, _)| i)
                .ok_or_else(|| {
                    format!(
                        "cannot tell the agent from the version in {:?} (no '-' before a digit): give --agent",
                        proto::clean_text(name, 200)
                    )
                })?;
            (&stem[..at], &stem[at + 1..])
        }
    };
    let agent = proto::AgentName::parse(a).map_err(|e| format!("agent: {e}"))?;
    let version = proto::Version::parse(v).map_err(|e| format!("version: {e}"))?;
    let file = proto::names::tarball_file(&agent, &version);
    // The name is rebuilt from its checked parts: nothing else can reach the disk.
    if file != name {
        return Err(format!("{name:?} is not <agent>-<version>.tar.gz"));
    }
    Ok(Release {
        agent,
        version,
        file,
    })
}

/// `--subdir`: relative folder names ops-meta's file server would serve (plain names, no
/// `..`, nothing hidden).
pub fn check_subdir(s: &str) -> Result<PathBuf, String> {
    if s.starts_with('/') {
        return Err("is relative to --dir, not an absolute path".into());
    }
    let mut p = PathBuf::new();
    for part in s.split('/').filter(|p| !p.is_empty()) {
        proto::validate_agent_name(part)
            .map_err(|e| format!("{:?}: {e}", proto::clean_text(part, 64)))?;
        p.push(part);
    }
    if p.as_os_str().is_empty() {
        return Err("is empty".into());
    }
    Ok(p)
}

pub fn run(a: &PublishArgs) -> Result<u8, Error> {
    let name = a
        .file
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::Usage(format!("{}: not a file name", a.file.display())))?;
    let rel = parse_release(name, a.agent.as_deref()).map_err(Error::Usage)?;
    let dir_meta = std::fs::metadata(&a.dir)
        .map_err(|e| Error::Usage(format!("--dir {}: {e}", a.dir.display())))?;
    if !dir_meta.is_dir() {
        return Err(Error::Usage(format!(
            "--dir {}: not a folder",
            a.dir.display()
        )));
    }
    let mut target = a.dir.clone();
    if let Some(s) = &a.subdir {
        target.push(check_subdir(s).map_err(|e| Error::Usage(format!("--subdir: {e}")))?);
        std::fs::create_dir_all(&target)
            .map_err(|e| Error::Other(format!("creating {}: {e}", target.display())))?;
    }
    if let Some(k) = &a.key {
        if !k.is_file() {
            return Err(Error::Usage(format!("--key {}: no such file", k.display())));
        }
    }
    let src =
        File::open(&a.file).map_err(|e| Error::Usage(format!("{}: {e}", a.file.display())))?;
    let src_meta = src
        .metadata()
        .map_err(|e| Error::Other(format!("{}: {e}", a.file.display())))?;
    if !src_meta.is_file() {
        return Err(Error::Usage(format!(
            "{}: not a regular file",
            a.file.display()
        )));
    }

    let stage = tempfile::Builder::new()
        .prefix(".opsctl-publish-")
        .tempdir_in(&target)
        .map_err(|e| Error::Other(format!("making a folder in {}: {e}", target.display())))?;
    let staged = stage.path().join(&rel.file);
    let (md5, sha256) = copy_hashing(src, &staged).map_err(|e| {
        Error::Other(format!(
            "copying {} to {}: {e}",
            a.file.display(),
            staged.display()
        ))
    })?;

    let dest = target.join(&rel.file);
    let same = match File::open(&dest) {
        Ok(f) => {
            let (_, existing) =
                hash(f).map_err(|e| Error::Other(format!("{}: {e}", dest.display())))?;
            if existing != sha256 && !a.force {
                return Err(Error::Conflict(format!(
                    "{} exists with other content (sha256 {existing}, this file {sha256}): a release is never replaced silently; give --force to replace it",
                    dest.display()
                )));
            }
            existing == sha256
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(Error::Other(format!("{}: {e}", dest.display()))),
    };

    let md5_name = format!("{}.md5", rel.file);
    let sha_name = format!("{}.sha256", rel.file);
    let sig_name = format!("{}.minisig", rel.file);
    let write = |n: &str, text: &str| {
        write_new(&stage.path().join(n), text.as_bytes())
            .map_err(|e| Error::Other(format!("writing {n}: {e}")))
    };
    write(&md5_name, &proto::legacy::format_md5_file(&md5, &rel.file))?;
    write(&sha_name, &format!("{sha256}  {}\n", rel.file))?;
    let mut moved = vec![md5_name.clone(), sha_name.clone()];
    if let Some(key) = &a.key {
        sign(key, &staged)?;
        fsync(&stage.path().join(&sig_name))
            .map_err(|e| Error::Other(format!("{sig_name}: {e}")))?;
        moved.push(sig_name.clone());
    } else if !same && target.join(&sig_name).exists() {
        // The old release's signature would not match the new tarball: a host that
        // requires signatures would refuse it, and one that does not is better off
        // without a wrong one.
        std::fs::remove_file(target.join(&sig_name))
            .map_err(|e| Error::Other(format!("removing the old {sig_name}: {e}")))?;
        eprintln!("opsctl: removed the old {sig_name}: it signed the release replaced (sign the new one with --key)");
    }
    if !same {
        moved.push(rel.file.clone());
    }
    for n in &moved {
        std::fs::rename(stage.path().join(n), target.join(n))
            .map_err(|e| Error::Other(format!("moving {n} into {}: {e}", target.display())))?;
    }
    File::open(&target)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::Other(format!("syncing {}: {e}", target.display())))?;

    let mut out = format!(
        "{} {}: {}\n",
        if same {
            "already published"
        } else {
            "published"
        },
        rel.file,
        dest.display()
    );
    out.push_str(&format!(
        "  agent    {}\n  version  {}\n",
        rel.agent, rel.version
    ));
    out.push_str(&format!(
        "  md5      {md5}  ({md5_name})\n  sha256   {sha256}  ({sha_name})\n"
    ));
    if a.key.is_some() {
        out.push_str(&format!("  signed   {sig_name}\n"));
    }
    out.push_str(&format!(
        "next: opsctl rollout plan --agent {} --version {} --sha256 {sha256} --wave canary:prefix=... --wave rest:percent=100\n",
        rel.agent, rel.version
    ));
    print(&out);
    Ok(exit::OK)
}

/// Lowercase hex MD5 and SHA-256 of everything `r` yields.
fn hash(mut r: impl Read) -> std::io::Result<(String, String)> {
    let mut m = md5::Md5::new();
    let mut s = sha2::Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        m.update(&buf[..n]);
        s.update(&buf[..n]);
    }
    Ok((hex::encode(m.finalize()), hex::encode(s.finalize())))
}

/// Copies `src` to a new file `to` (mode 0644), hashing what was written; synced.
fn copy_hashing(src: File, to: &Path) -> std::io::Result<(String, String)> {
    struct Tee<R> {
        r: R,
        w: File,
    }
    impl<R: Read> Read for Tee<R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.r.read(buf)?;
            self.w.write_all(&buf[..n])?;
            Ok(n)
        }
    }
    let w = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(to)?;
    let mut tee = Tee { r: src, w };
    let digests = hash(&mut tee)?;
    tee.w.sync_all()?;
    Ok(digests)
}

fn write_new(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

fn fsync(path: &Path) -> std::io::Result<()> {
    File::open(path)?.sync_all()
}

/// `minisign -S -s KEY -m FILE`: writes `FILE.minisig` beside the staged tarball, whose
/// name is the release's, so the trusted comment's `file:` names it. The terminal is the
/// tool's, for the password of an encrypted key.
#[allow(clippy::disallowed_methods)] // opsctl's one child process, run in the foreground.
fn sign(key: &Path, file: &Path) -> Result<(), Error> {
    let st = std::process::Command::new("minisign")
        .arg("-S")
        .arg("-s")
        .arg(key)
        .arg("-m")
        .arg(file)
        .status()
        .map_err(|e| {
            Error::Other(if e.kind() == std::io::ErrorKind::NotFound {
                "--key needs the minisign tool, which is not installed (apt-get install minisign)"
                    .into()
            } else {
                format!("running minisign: {e}")
            })
        })?;
    if !st.success() {
        return Err(Error::Other(format!(
            "minisign -S -s {} failed ({st}): nothing was published",
            key.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_names_split_into_agent_and_version() {
        let ok = |name: &str, agent: Option<&str>, a: &str, v: &str| {
            let r = parse_release(name, agent).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!((r.agent.as_str(), r.version.as_str()), (a, v), "{name}");
        };
        ok("falcon-agent-1.0.1.tar.gz", None, "falcon-agent", "1.0.1");
        ok("basic-2.tar.gz", None, "basic", "2");
        ok(
            "bootagent-1.2.4-x86_64.tar.gz",
            None,
            "bootagent",
            "1.2.4-x86_64",
        );
        ok(
            "web-2-api-1.0.tar.gz",
            Some("web-2-api"),
            "web-2-api",
            "1.0",
        );
        ok(
            "agent-v1.0+build.tar.gz",
            Some("agent"),
            "agent",
            "v1.0+build",
        );
    }

    #[test]
    fn hostile_or_odd_names_are_refused() {
        for name in [
            "basic.tar.gz",
            "basic-1.0.tgz",
            "basic-1.0.tar",
            ".hidden-1.0.tar.gz",
            "basic-.tar.gz",
            "-1.0.tar.gz",
            "ba sic-1.0.tar.gz",
            "basic-1.0;rm -rf.tar.gz",
            "basic-1.0\n.tar.gz",
            "basic-1.0/../x.tar.gz",
            "basic-\u{1b}[2J1.tar.gz",
            "noversion-here.tar.gz",
        ] {
            assert!(parse_release(name, None).is_err(), "{name:?} was taken");
        }
        assert!(parse_release("basic-1.0.tar.gz", Some("other")).is_err());
        let long = format!("{}-1.0.tar.gz", "a".repeat(200));
        assert!(parse_release(&long, None).is_err());
    }

    #[test]
    fn subdirs_are_plain_relative_names() {
        assert_eq!(
            check_subdir("falcon/agent").unwrap(),
            PathBuf::from("falcon/agent")
        );
        assert_eq!(check_subdir("a//b/").unwrap(), PathBuf::from("a/b"));
        for bad in ["", "/a", "..", "a/../b", ".git", "a/.x", "a b", "a\\b"] {
            assert!(check_subdir(bad).is_err(), "{bad:?}");
        }
    }
}
