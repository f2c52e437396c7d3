//! The tar member checks of the unpacker: a member path is made relative (no absolute
//! paths, no `..`), and a symlink's target must stay inside the tree. Checked against a
//! plain lexical resolution: an accepted link never climbs above the unpack folder.
#![no_main]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;
use updater::artifact::fuzzing::{member_path, symlink_target};

fuzz_target!(|data: &[u8]| {
    let (member, target) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b""[..]),
    };
    let member = Path::new(OsStr::from_bytes(member));
    let Ok(rel) = member_path(member) else {
        return;
    };
    assert!(
        rel.components().all(|c| matches!(c, Component::Normal(_))),
        "{member:?} became {rel:?}"
    );
    assert!(Path::new("/root").join(&rel).starts_with("/root"));

    let target = Path::new(OsStr::from_bytes(target));
    if symlink_target(&rel, target).is_ok() {
        // Resolve the target from the link's folder, by names only.
        let mut depth = rel.components().count().saturating_sub(1);
        for c in target.components() {
            match c {
                Component::Normal(_) => depth += 1,
                Component::CurDir => {}
                Component::ParentDir => {
                    depth = depth
                        .checked_sub(1)
                        .unwrap_or_else(|| panic!("{rel:?} -> {target:?} leaves the tree"))
                }
                Component::RootDir | Component::Prefix(_) => {
                    panic!("{rel:?} -> {target:?} is absolute")
                }
            }
        }
    }
});
