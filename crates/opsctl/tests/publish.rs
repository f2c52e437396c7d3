//! `opsctl publish` end to end: a release copied into a real ops-meta's `tarballDir` and
//! served from it with its `.md5` (the original's `md5sum` format) and `.sha256`; signed
//! with the real `minisign` tool and verified by it; hostile names refused with nothing
//! written; a different release never replaced without `--force`.

mod support;

use std::path::Path;

use serde_json::Value;
use support::{opsctl, Meta};
use test_support::{command, digests, tree};

fn publish(home: &Path, args: &[&str]) -> support::Run {
    let all: Vec<&str> = ["publish"].iter().chain(args).copied().collect();
    opsctl(home, &all, &[])
}

#[test]
fn a_release_is_published_with_its_checksums_and_served() {
    let m = Meta::start(Value::Null);
    let work = test_support::tempdir().unwrap();
    let w = work.path();
    let data = test_support::noise(300_000, 7);
    let src = test_support::write_file(w, "falcon-agent-1.0.1.tar.gz", &data);
    let files = m.files();
    let r = publish(
        w,
        &[src.to_str().unwrap(), "--dir", files.to_str().unwrap()],
    );
    assert_eq!(r.code, 0, "{r:?}");
    let (md5, sha) = digests(&data);
    assert!(
        r.stdout.contains("published falcon-agent-1.0.1.tar.gz"),
        "{r:?}"
    );
    assert!(
        r.stdout.contains("agent    falcon-agent") && r.stdout.contains(&sha),
        "{r:?}"
    );
    assert_eq!(
        tree(&files),
        [
            "falcon-agent-1.0.1.tar.gz",
            "falcon-agent-1.0.1.tar.gz.md5",
            "falcon-agent-1.0.1.tar.gz.sha256"
        ],
        "no temporary folder is left behind"
    );
    let md5_text = std::fs::read_to_string(files.join("falcon-agent-1.0.1.tar.gz.md5")).unwrap();
    assert_eq!(md5_text, format!("{md5}  falcon-agent-1.0.1.tar.gz\n"));
    assert_eq!(
        proto::legacy::parse_md5_file(&md5_text).as_deref(),
        Some(md5.as_str())
    );
    let sha_text = std::fs::read_to_string(files.join("falcon-agent-1.0.1.tar.gz.sha256")).unwrap();
    assert_eq!(sha_text, format!("{sha}  falcon-agent-1.0.1.tar.gz\n"));
    // ops-meta serves what was published, byte for byte.
    assert_eq!(m.get("/falcon-agent-1.0.1.tar.gz"), (200, data.clone()));
    assert_eq!(
        m.get("/falcon-agent-1.0.1.tar.gz.md5"),
        (200, md5_text.into_bytes())
    );
    // `md5sum -c` and `sha256sum -c` agree with the files, as an operator would check.
    for tool in ["md5sum", "sha256sum"] {
        let ext = if tool == "md5sum" { "md5" } else { "sha256" };
        let st = command(Path::new(tool))
            .args(["-c", &format!("falcon-agent-1.0.1.tar.gz.{ext}")])
            .current_dir(&files)
            .output()
            .unwrap();
        assert!(st.status.success(), "{tool}: {st:?}");
    }

    // The same release again: nothing changes. Another one of that name: refused (5).
    let before = std::fs::metadata(files.join("falcon-agent-1.0.1.tar.gz"))
        .unwrap()
        .modified()
        .unwrap();
    let r = publish(
        w,
        &[src.to_str().unwrap(), "--dir", files.to_str().unwrap()],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("already published"), "{r:?}");
    let after = std::fs::metadata(files.join("falcon-agent-1.0.1.tar.gz"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after, "an identical tarball is left as it was");
    let other = test_support::noise(1000, 8);
    let other_dir = w.join("other");
    let src2 = test_support::write_file(&other_dir, "falcon-agent-1.0.1.tar.gz", &other);
    let r = publish(
        w,
        &[src2.to_str().unwrap(), "--dir", files.to_str().unwrap()],
    );
    assert_eq!(r.code, 5, "{r:?}");
    assert!(r.stderr.contains("--force"), "{r:?}");
    assert_eq!(
        std::fs::read(files.join("falcon-agent-1.0.1.tar.gz")).unwrap(),
        data
    );
    assert_eq!(tree(&files).len(), 3, "{:?}", tree(&files));
    let r = publish(
        w,
        &[
            src2.to_str().unwrap(),
            "--dir",
            files.to_str().unwrap(),
            "--force",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        std::fs::read(files.join("falcon-agent-1.0.1.tar.gz")).unwrap(),
        other
    );
    let (md5b, _) = digests(&other);
    assert!(
        std::fs::read_to_string(files.join("falcon-agent-1.0.1.tar.gz.md5"))
            .unwrap()
            .starts_with(&md5b)
    );

    // A subfolder, created, as seed 001's layout has it.
    let src3 = test_support::write_file(w, "basic-2.0.tar.gz", b"basic");
    let r = publish(
        w,
        &[
            src3.to_str().unwrap(),
            "--dir",
            files.to_str().unwrap(),
            "--subdir",
            "falcon/basic",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        m.get("/falcon/basic/basic-2.0.tar.gz"),
        (200, b"basic".to_vec())
    );
}

#[test]
fn hostile_names_are_refused_and_nothing_is_written() {
    let work = test_support::tempdir().unwrap();
    let w = work.path();
    let dir = w.join("tarballs");
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.to_str().unwrap();
    for name in [
        "basic.tar.gz",
        "basic-1.0.zip",
        ".hidden-1.0.tar.gz",
        "ba sic-1.0.tar.gz",
        "basic-1.0;x.tar.gz",
        "basic-$(id).tar.gz",
        "basic-\u{1b}[2J.tar.gz",
        "noversion-here.tar.gz",
    ] {
        let src = test_support::write_file(&w.join("src"), name, b"x");
        let r = publish(w, &[src.to_str().unwrap(), "--dir", d]);
        assert_eq!(r.code, 2, "{name:?} was taken: {r:?}");
        assert!(
            !r.stderr.contains('\u{1b}'),
            "{name:?}: an escape reached the terminal"
        );
    }
    let ok = test_support::write_file(w, "basic-1.0.tar.gz", b"x");
    for (subdir, why) in [
        ("../out", "parent"),
        ("/abs", "absolute"),
        (".git", "hidden"),
        ("a/../../b", "parent"),
    ] {
        let r = publish(w, &[ok.to_str().unwrap(), "--dir", d, "--subdir", subdir]);
        assert_eq!(r.code, 2, "{why} subdir {subdir:?} was taken: {r:?}");
    }
    let r = publish(w, &[ok.to_str().unwrap(), "--dir", d, "--agent", "other"]);
    assert_eq!(r.code, 2, "{r:?}");
    let r = publish(
        w,
        &[
            ok.to_str().unwrap(),
            "--dir",
            w.join("missing").to_str().unwrap(),
        ],
    );
    assert_eq!(
        r.code, 2,
        "a tarballDir that does not exist is not created: {r:?}"
    );
    assert!(tree(&dir).is_empty(), "{:?}", tree(&dir));
    assert!(!w.join("out").exists() && !Path::new("/abs").exists());
}

#[test]
fn a_signed_release_verifies_with_minisign() {
    if !test_support::minisign::available() {
        return;
    }
    let work = test_support::tempdir().unwrap();
    let w = work.path();
    let keys = test_support::minisign::KeyPair::generate(&w.join("keys"), "release");
    let dir = w.join("tarballs");
    std::fs::create_dir_all(&dir).unwrap();
    let data = test_support::noise(50_000, 3);
    let src = test_support::write_file(&w.join("src"), "basic-3.1.tar.gz", &data);
    let r = publish(
        w,
        &[
            src.to_str().unwrap(),
            "--dir",
            dir.to_str().unwrap(),
            "--key",
            keys.secret.to_str().unwrap(),
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.contains("signed   basic-3.1.tar.gz.minisig"),
        "{r:?}"
    );
    let out = command(Path::new("minisign"))
        .arg("-V")
        .arg("-p")
        .arg(&keys.public)
        .arg("-m")
        .arg(dir.join("basic-3.1.tar.gz"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "minisign -V: {out:?}");
    // The trusted comment names the release, as ops-updater checks it.
    assert!(said.contains("file:basic-3.1.tar.gz"), "{said}");
    // The signature covers the published bytes: a changed tarball fails.
    std::fs::write(dir.join("basic-3.1.tar.gz"), b"tampered").unwrap();
    let out = command(Path::new("minisign"))
        .arg("-V")
        .arg("-p")
        .arg(&keys.public)
        .arg("-m")
        .arg(dir.join("basic-3.1.tar.gz"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "a tampered tarball verified");

    // Replacing the release without a key removes the old signature, which would not match.
    let r = publish(
        w,
        &[
            src.to_str().unwrap(),
            "--dir",
            dir.to_str().unwrap(),
            "--force",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert!(!dir.join("basic-3.1.tar.gz.minisig").exists());
    assert!(
        r.stderr
            .contains("removed the old basic-3.1.tar.gz.minisig"),
        "{r:?}"
    );
    // A key that is not one: nothing published.
    let bad_key = test_support::write_file(w, "bad.key", b"not a key\n");
    let src2 = test_support::write_file(&w.join("src"), "basic-3.2.tar.gz", b"x");
    let r = publish(
        w,
        &[
            src2.to_str().unwrap(),
            "--dir",
            dir.to_str().unwrap(),
            "--key",
            bad_key.to_str().unwrap(),
        ],
    );
    assert_eq!(r.code, 1, "{r:?}");
    assert!(!dir.join("basic-3.2.tar.gz").exists());
    assert!(
        tree(&dir).iter().all(|p| !p.starts_with(".opsctl")),
        "{:?}",
        tree(&dir)
    );
}
