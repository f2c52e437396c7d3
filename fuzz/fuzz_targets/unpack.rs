//! The unpacker on in-memory archives: the input is a tar stream (gzip-compressed here,
//! unless it is gzip already) unpacked into a fresh folder with small limits. Whatever the
//! archive holds, nothing appears outside the unpack folder, and an accepted tree holds only
//! files, folders and links that stay inside it, with an executable `control` and no
//! setuid, setgid, sticky, group-write or other-write bit.
#![no_main]

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path};

use flate2::write::GzEncoder;
use libfuzzer_sys::fuzz_target;
use updater::artifact::fuzzing::unpack_members;
use updater::artifact::Limits;

fuzz_target!(|data: &[u8]| {
    let gz;
    let compressed: &[u8] = if data.starts_with(&[0x1f, 0x8b]) {
        data
    } else {
        let mut e = GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        gz = e.finish().unwrap();
        &gz
    };
    let limits = Limits {
        max_unpacked_bytes: 1 << 20,
        max_entries: 64,
        ..Limits::default()
    };
    // /dev/shm keeps the many small folders off the disk when it is there.
    let shm = Path::new("/dev/shm");
    let tmp = if shm.is_dir() {
        tempfile::Builder::new()
            .prefix("fuzz-unpack")
            .tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .unwrap();
    // Two levels above the root are ours, so a member that climbs out lands where we look.
    let root = tmp.path().join("a").join("b").join("root");
    std::fs::create_dir_all(&root).unwrap();

    let result = unpack_members(compressed, &root, &limits);

    let mut found = Vec::new();
    walk(tmp.path(), &mut found);
    for (p, _) in &found {
        let rel = p.strip_prefix(tmp.path()).unwrap();
        assert!(
            rel.starts_with("a/b/root") || rel == Path::new("a") || rel == Path::new("a/b"),
            "written outside the unpack folder: {rel:?} ({result:?})"
        );
    }
    if result.is_ok() {
        let control = std::fs::metadata(root.join("control")).expect("control");
        assert!(control.is_file() && control.permissions().mode() & 0o111 != 0);
        for (p, md) in &found {
            if !p.starts_with(&root) || p == &root {
                continue;
            }
            let t = md.file_type();
            assert!(
                t.is_file() || t.is_dir() || t.is_symlink(),
                "{p:?} is {t:?}"
            );
            if !t.is_symlink() {
                // Agents run as root: no setuid, setgid, sticky, group or other write.
                assert_eq!(
                    md.permissions().mode() & 0o7022,
                    0,
                    "{p:?} keeps a risky mode bit"
                );
            }
            if t.is_symlink() {
                let target = std::fs::read_link(p).unwrap();
                let rel = p.strip_prefix(&root).unwrap();
                let mut depth = rel.components().count() - 1;
                for c in target.components() {
                    match c {
                        Component::Normal(_) => depth += 1,
                        Component::CurDir => {}
                        Component::ParentDir => {
                            depth = depth
                                .checked_sub(1)
                                .unwrap_or_else(|| panic!("{rel:?} -> {target:?} leaves the tree"))
                        }
                        _ => panic!("{rel:?} -> {target:?} is absolute"),
                    }
                }
            }
        }
    }
    // Folders may have been left without write permission; open them up for the clean-up.
    for (p, md) in &found {
        if md.is_dir() {
            let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700));
        }
    }
});

/// Every entry below `dir`, not following links.
fn walk(dir: &Path, out: &mut Vec<(std::path::PathBuf, std::fs::Metadata)>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let is_dir = md.is_dir();
        out.push((p.clone(), md));
        if is_dir {
            walk(&p, out);
        }
    }
}
