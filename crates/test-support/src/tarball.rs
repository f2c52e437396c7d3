//! Builders for `.tar.gz` agent tarballs: well-formed ones with an executable `control`,
//! and hostile ones (absolute paths, `..`, links out of the tree, devices, FIFOs, bombs)
//! written byte by byte, since the `tar` crate refuses to build most of them.

use std::io::Write;
use std::path::Path;

use flate2::write::GzEncoder;
use flate2::Compression;

/// One member of a tarball under construction.
#[derive(Debug, Clone)]
pub enum Entry {
    /// A regular file with its mode.
    File {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
    Dir {
        path: String,
    },
    Symlink {
        path: String,
        target: String,
    },
    Hardlink {
        path: String,
        target: String,
    },
    CharDevice {
        path: String,
    },
    Fifo {
        path: String,
    },
}

impl Entry {
    pub fn file(path: &str, data: impl Into<Vec<u8>>) -> Entry {
        Entry::File {
            path: path.into(),
            mode: 0o644,
            data: data.into(),
        }
    }
    pub fn exec(path: &str, data: impl Into<Vec<u8>>) -> Entry {
        Entry::File {
            path: path.into(),
            mode: 0o755,
            data: data.into(),
        }
    }
}

/// Builds an uncompressed tar stream. Paths are written verbatim into the header (no
/// sanitising), so hostile names reach the unpacker exactly as an attacker would send them.
pub fn tar_bytes(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let mut h = tar::Header::new_ustar();
        let (path, data): (&str, &[u8]) = match e {
            Entry::File { path, mode, data } => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                (path, data)
            }
            Entry::Dir { path } => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                (path, &[])
            }
            Entry::Symlink { path, target } | Entry::Hardlink { path, target } => {
                h.set_entry_type(if matches!(e, Entry::Symlink { .. }) {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                });
                h.set_mode(0o777);
                h.set_size(0);
                set_raw(&mut h.as_old_mut().linkname, target);
                (path, &[])
            }
            Entry::CharDevice { path } => {
                h.set_entry_type(tar::EntryType::Char);
                h.set_mode(0o666);
                h.set_size(0);
                (path, &[])
            }
            Entry::Fifo { path } => {
                h.set_entry_type(tar::EntryType::Fifo);
                h.set_mode(0o644);
                h.set_size(0);
                (path, &[])
            }
        };
        set_raw(&mut h.as_old_mut().name, path);
        h.set_mtime(1_600_000_000);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        out.extend(std::iter::repeat_n(0u8, pad));
    }
    out.extend(std::iter::repeat_n(0u8, 1024));
    out
}

fn set_raw(field: &mut [u8], value: &str) {
    assert!(
        value.len() <= field.len(),
        "name too long for a raw header: {value}"
    );
    field.fill(0);
    field[..value.len()].copy_from_slice(value.as_bytes());
}

/// Gzips `data`.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// A `.tar.gz` of `entries`.
pub fn targz(entries: &[Entry]) -> Vec<u8> {
    gzip(&tar_bytes(entries))
}

/// Writes `{dir}/{name}-{version}.tar.gz` and its `.md5` (as `md5sum` writes it), and
/// returns (md5, sha256) of the tarball.
pub fn publish(dir: &Path, name: &str, version: &str, tarball: &[u8]) -> (String, String) {
    std::fs::create_dir_all(dir).unwrap();
    let file = proto::legacy::tarball_file(name, version);
    std::fs::write(dir.join(&file), tarball).unwrap();
    let (md5, sha) = crate::digests(tarball);
    std::fs::write(
        dir.join(format!("{file}.md5")),
        proto::legacy::format_md5_file(&md5, &file),
    )
    .unwrap();
    (md5, sha)
}

/// The hostile archives every unpacker must refuse, by name. Each one tries to write
/// outside the folder it is unpacked into, or to exhaust the disk.
pub fn hostile_archives() -> Vec<(&'static str, Vec<u8>)> {
    let control = Entry::exec("control", "#!/bin/sh\necho started\n");
    vec![
        (
            "absolute path",
            targz(&[
                control.clone(),
                Entry::file("/tmp/agent-updater-pwned", "x"),
            ]),
        ),
        (
            "dot-dot path",
            targz(&[control.clone(), Entry::file("../../pwned", "x")]),
        ),
        (
            "dot-dot inside path",
            targz(&[control.clone(), Entry::file("bin/../../pwned", "x")]),
        ),
        (
            "symlink out of the tree",
            targz(&[
                control.clone(),
                Entry::Symlink {
                    path: "escape".into(),
                    target: "/etc".into(),
                },
            ]),
        ),
        (
            "symlink then write through it",
            targz(&[
                control.clone(),
                Entry::Symlink {
                    path: "up".into(),
                    target: "..".into(),
                },
                Entry::file("up/pwned", "x"),
            ]),
        ),
        (
            "hardlink out of the tree",
            targz(&[
                control.clone(),
                Entry::Hardlink {
                    path: "shadow".into(),
                    target: "/etc/passwd".into(),
                },
            ]),
        ),
        (
            "character device",
            targz(&[
                control.clone(),
                Entry::CharDevice {
                    path: "null".into(),
                },
            ]),
        ),
        (
            "fifo",
            targz(&[
                control.clone(),
                Entry::Fifo {
                    path: "pipe".into(),
                },
            ]),
        ),
        ("gzip bomb", gzip_bomb(64 << 20)),
        ("not a gzip stream", b"<html>404 not found</html>".to_vec()),
        ("truncated archive", truncated(&control)),
    ]
}

/// A good archive cut in half. Its gzip stream is only ~150 bytes (the payload compresses
/// well), so the cut is relative, not at a fixed offset.
fn truncated(control: &Entry) -> Vec<u8> {
    let whole = targz(&[control.clone(), Entry::file("data", vec![7u8; 4096])]);
    whole[..whole.len() / 2].to_vec()
}

/// A small `.tar.gz` that expands to one file of `size` zero bytes: use with an unpacker
/// whose size cap is below `size`.
pub fn gzip_bomb(size: u64) -> Vec<u8> {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_path("zeros").unwrap();
    h.set_mode(0o644);
    h.set_size(size);
    h.set_cksum();
    let mut enc = GzEncoder::new(Vec::new(), Compression::best());
    enc.write_all(h.as_bytes()).unwrap();
    let chunk = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        enc.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
    enc.write_all(&[0u8; 1024]).unwrap();
    enc.finish().unwrap()
}
