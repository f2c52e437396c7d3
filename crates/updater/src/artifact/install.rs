//! Making `<agent_dir>/<version>/` installed exactly once: fetch and verify the tarball,
//! unpack it, and recognise folders that are already complete (ours, by a marker; the
//! original updater's, by the tarball matching its `.md5`).

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use md5::{Digest as _, Md5};
use proto::names::{AgentName, Version};

use super::fetch::{hash_file, verify, MAX_MD5_FILE_BYTES, PART_SUFFIX};
use super::pipe::{pipe, PIPE_BUDGET_BYTES};
use super::sign::{Admitted, SignatureError};
use super::unpack::{
    discard, finish, remove_tree, temp_folder, unpack, unpack_members, UNPACK_INFIX,
};
use super::{ArtifactError, Digests, Fetcher, Want};
use crate::{control, fsx};

/// Written last into a version folder we unpacked: its presence means "complete".
pub const MARKER: &str = ".ops-updater-complete";

/// Folder inside an agent's folder where downloads in progress live.
pub const DOWNLOAD_DIR: &str = ".download";

/// What was found the last time a folder of the original updater was checked, so that a
/// large tarball is not hashed again every round while it stays unchanged.
#[derive(Clone, PartialEq, Eq)]
struct LegacyStamp {
    len: u64,
    modified: Option<SystemTime>,
    md5_file: String,
}

static LEGACY_CHECKED: Mutex<Option<HashMap<PathBuf, (LegacyStamp, bool)>>> = Mutex::new(None);

/// True when `<agent_dir>/<version>/` is a complete install: our marker is present, or (a folder left by the
/// original updater) `control` exists and the tarball in the folder matches its `.md5` file.
///
/// Blocking: a folder of the original updater is verified by hashing its tarball (once per
/// tarball state; the answer is remembered).
pub fn is_installed(agent_dir: &Path, version: &str) -> bool {
    if proto::validate::validate_version(version).is_err() {
        return false;
    }
    let dir = agent_dir.join(version);
    if !std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
        return false;
    }
    if !control::is_executable(&dir.join(control::CONTROL)) {
        return false;
    }
    if std::fs::symlink_metadata(dir.join(MARKER)).is_ok_and(|m| m.is_file()) {
        return true;
    }
    legacy_complete(agent_dir, &dir, version)
}

/// The original updater's layout: `<name>-<version>.tar.gz` and its `.md5` in the folder.
fn legacy_complete(agent_dir: &Path, dir: &Path, version: &str) -> bool {
    let Some(name) = agent_dir.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    let file = proto::legacy::tarball_file(name, version);
    let tarball = dir.join(&file);
    let md5_path = dir.join(format!("{file}.md5"));
    let Some(md5_file) = read_small(&md5_path) else {
        return false;
    };
    let Ok(meta) = std::fs::symlink_metadata(&tarball) else {
        return false;
    };
    if !meta.is_file() {
        return false;
    }
    let stamp = LegacyStamp {
        len: meta.len(),
        modified: meta.modified().ok(),
        md5_file: md5_file.clone(),
    };
    {
        let cache = LEGACY_CHECKED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((s, ok)) = cache.as_ref().and_then(|c| c.get(&tarball)) {
            if *s == stamp {
                return *ok;
            }
        }
    }
    let ok = match proto::legacy::parse_md5_file(&md5_file) {
        Some(want) => md5_of(&tarball).is_some_and(|got| got == want),
        None => false,
    };
    LEGACY_CHECKED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(HashMap::new)
        .insert(tarball, (stamp, ok));
    ok
}

fn read_small(path: &Path) -> Option<String> {
    let f = std::fs::File::open(path).ok()?;
    let mut s = String::new();
    f.take(MAX_MD5_FILE_BYTES).read_to_string(&mut s).ok()?;
    Some(s)
}

fn md5_of(path: &Path) -> Option<String> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut h = Md5::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => h.update(&buf[..n]),
            Err(_) => return None,
        }
    }
    Some(hex::encode(h.finalize()))
}

/// Remove leftovers of interrupted work in agent_dir: `.*.unpack-*` folders; keep `*.part` downloads (for resume).
/// Temporary files of interrupted atomic writes (`.*.tmp-*`) go too.
#[allow(clippy::disallowed_methods)] // Blocking: called on the blocking pool.
pub fn clean_leftovers(agent_dir: &Path) -> std::io::Result<()> {
    let rd = match std::fs::read_dir(agent_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for e in rd {
        let e = e?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with('.') {
            continue;
        }
        let ft = e.file_type()?;
        if ft.is_dir() && name.contains(UNPACK_INFIX) {
            tracing::info!(dir = %e.path().display(), "removing an interrupted unpack");
            remove_tree(&e.path())?;
        } else if ft.is_file() && name.contains(fsx::TEMP_INFIX) {
            tracing::info!(file = %e.path().display(), "removing an interrupted write");
            std::fs::remove_file(e.path())?;
        }
    }
    Ok(())
}

/// High-level: make `<agent_dir>/<version>/` installed from `tarball_url` checked against `want`
/// (fetching md5 from `md5_url` when want.md5 is None and md5_url is Some), using `<agent_dir>/.download/`
/// for the partial file. No-op if already installed. Returns the version dir.
///
/// A version folder that exists but is not complete (torn by a crash of the original
/// updater) is moved aside, replaced, and removed once the new one is in place; it is put
/// back if the install fails.
pub async fn install(
    fetcher: &Fetcher,
    agent_dir: &Path,
    name: &AgentName,
    version: &Version,
    tarball_url: &str,
    md5_url: Option<&str>,
    mut want: Want,
) -> Result<PathBuf, ArtifactError> {
    let (name, version) = (name.as_str(), version.as_str());
    let dir = agent_dir.join(version);
    let (a, v) = (agent_dir.to_path_buf(), version.to_string());
    if blocking(move || Ok(is_installed(&a, &v))).await? {
        return Ok(dir);
    }

    if want.md5.is_none() {
        if let Some(u) = md5_url {
            want.md5 = Some(fetcher.fetch_md5(u).await?);
        }
    }
    if want.md5.is_none() && want.sha256.is_none() {
        return Err(ArtifactError::NoChecksum {
            file: proto::legacy::tarball_file(name, version),
        });
    }

    let dl = agent_dir.join(DOWNLOAD_DIR);
    let result = fetch_and_unpack(fetcher, agent_dir, name, version, tarball_url, &want, &dl).await;
    if result.is_err() {
        // A failed attempt leaves no trace but a resumable `.part` (remove_dir only
        // succeeds on an empty folder).
        let _ = std::fs::remove_dir(&dl);
    }
    result
}

async fn fetch_and_unpack(
    fetcher: &Fetcher,
    agent_dir: &Path,
    name: &str,
    version: &str,
    tarball_url: &str,
    want: &Want,
    dl: &Path,
) -> Result<PathBuf, ArtifactError> {
    let file = proto::legacy::tarball_file(name, version);
    let dir = agent_dir.join(version);
    let tarball = dl.join(&file);
    let part = dl.join(format!("{file}{PART_SUFFIX}"));
    // Before the download: a missing, unknown-key or other-file signature costs no transfer.
    let signature = admit_signature(fetcher, tarball_url, &file).await?;
    // `unpacked`: a temporary folder already holding the checked members of the verified
    // tarball, when it was unpacked while downloading.
    let (digests, unpacked) = match reuse_download(&tarball, &file, want, fetcher).await {
        Some(d) => (d, None),
        // Resuming: the bytes already on disk would have to be replayed into the unpacker
        // before the network's; the plain path is simpler and this case is rare.
        None if std::fs::symlink_metadata(&part).is_ok() => {
            tracing::info!(agent = %name, version = %version, url = %crate::redact(tarball_url), "downloading");
            (fetcher.download(tarball_url, dl, &file, want).await?, None)
        }
        None => {
            tracing::info!(agent = %name, version = %version, url = %crate::redact(tarball_url), streamed = true, "downloading");
            let (d, tmp) =
                download_unpacking(fetcher, agent_dir, version, tarball_url, dl, &file, want)
                    .await?;
            (d, Some(tmp))
        }
    };
    if let Some(sig) = signature {
        // Over the verified download on disk, streamed: the tarball is never held in
        // memory. Nothing is installed yet (`unpacked` is a temporary folder).
        let (tb, id) = (tarball.clone(), sig.key_id());
        match blocking(move || sig.verify_file(&tb)).await {
            Ok(()) => {
                tracing::info!(agent = %name, version = %version, key = %id, "signature verified")
            }
            Err(e) => {
                let tb = tarball.clone();
                blocking(move || {
                    if let Some(tmp) = unpacked {
                        discard(&tmp);
                    }
                    // A refused tarball is not kept for a later attempt to reuse.
                    #[allow(clippy::disallowed_methods)] // On the blocking pool.
                    let _ = std::fs::remove_file(&tb);
                    Ok(())
                })
                .await?;
                tracing::warn!(agent = %name, version = %version, error = %e, "signature refused");
                return Err(e);
            }
        }
    }
    let md5_path = dl.join(format!("{file}.md5"));
    fsx::write_atomic_async(
        md5_path.clone(),
        proto::legacy::format_md5_file(&digests.md5, &file).into_bytes(),
    )
    .await
    .map_err(ArtifactError::io(&md5_path))?;

    let aside = if std::fs::symlink_metadata(&dir).is_ok() {
        let aside = agent_dir.join(format!(
            ".{version}{UNPACK_INFIX}stale-{}",
            uuid::Uuid::new_v4().simple()
        ));
        tracing::warn!(agent = %name, version = %version, "replacing an incomplete version folder");
        std::fs::rename(&dir, &aside).map_err(ArtifactError::io(&dir))?;
        Some(aside)
    } else {
        None
    };

    let limits = fetcher.limits().clone();
    let (tb, md5p, a, v) = (
        tarball.clone(),
        md5_path.clone(),
        agent_dir.to_path_buf(),
        version.to_string(),
    );
    let unpacked = blocking(move || {
        let extra = [tb.as_path(), md5p.as_path()];
        match unpacked {
            Some(tmp) => finish(&tmp, &a, &v, &extra),
            None => unpack(&tb, &a, &v, &extra, &limits),
        }
    })
    .await;
    match (&unpacked, &aside) {
        (Err(_), Some(aside)) => {
            if let Err(e) = std::fs::rename(aside, &dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot put the old folder back");
            }
        }
        (Ok(_), Some(aside)) => {
            let a = aside.clone();
            if let Err(e) =
                blocking(move || remove_tree(&a).map_err(|e| ArtifactError::io(&a)(e))).await
            {
                tracing::warn!(dir = %aside.display(), error = %e, "cannot remove the old folder");
            }
        }
        _ => {}
    }
    let dir = unpacked?;
    // The version folder holds its own links or copies of both files now.
    for p in [tarball, md5_path] {
        let _ = fsx::remove_file_async(p).await;
    }
    tracing::info!(agent = %name, version = %version, md5 = %digests.md5, "installed");
    Ok(dir)
}

/// Downloads the tarball (as [`Fetcher::download`] does: to a `.part`, hashed, verified,
/// renamed) while a blocking thread unpacks the same bytes into a new temporary folder,
/// through a pipe of at most [`PIPE_BUDGET_BYTES`]. Returns the digests and the temporary
/// folder, which holds the checked members but is not complete: nothing is installed until
/// the caller [`finish`]es it, which it does only because the digests matched.
///
/// An error on either side stops the other (an unsafe member stops the download early) and
/// removes the temporary folder. A download that failed for its own reasons (checksum,
/// network) is reported as such even though the unpacker then failed too; an unpacker that
/// stopped first is reported with its own error.
async fn download_unpacking(
    fetcher: &Fetcher,
    agent_dir: &Path,
    version: &str,
    tarball_url: &str,
    dl: &Path,
    file: &str,
    want: &Want,
) -> Result<(Digests, PathBuf), ArtifactError> {
    let (a, v) = (agent_dir.to_path_buf(), version.to_string());
    let tmp = blocking(move || temp_folder(&a, &v)).await?;
    let (mut feed, mut reader) = pipe(PIPE_BUDGET_BYTES);
    let (root, label, limits) = (tmp.clone(), dl.join(file), fetcher.limits().clone());
    let unpacker = tokio::task::spawn_blocking(move || {
        let unpacked = unpack_members(&mut reader, &label, &root, &limits).and_then(|()| {
            reader.drain().map_err(|e| ArtifactError::Archive {
                tarball: label,
                detail: e.to_string(),
            })
        });
        // Removed here as well as by the caller: if the install was cancelled (its future
        // dropped, which ends the feed), nobody else is left to do it.
        if unpacked.is_err() {
            discard(&root);
        }
        unpacked
    });
    let downloaded = fetcher
        .download_feeding(tarball_url, dl, file, want, Some(&mut feed))
        .await;
    let stopped = feed.stopped();
    if downloaded.is_ok() {
        feed.end();
    } else {
        // The unpacker's next read fails, so it cannot take a cut-short tarball for whole.
        drop(feed);
    }
    let unpacked = unpacker
        .await
        .map_err(|e| ArtifactError::Task(e.to_string()))
        .and_then(|r| r);
    let result = match (downloaded, unpacked) {
        (Ok(d), Ok(())) => Ok(d),
        (Ok(_), Err(u)) => Err(u),
        (Err(_), Err(u)) if stopped => Err(u),
        (Err(e), _) => Err(e),
    };
    match result {
        Ok(d) => Ok((d, tmp)),
        Err(e) => {
            blocking(move || {
                discard(&tmp);
                Ok(())
            })
            .await?;
            Err(e)
        }
    }
}

/// The signature of the tarball at `tarball_url` checked as far as it can be without the
/// tarball, when the fetcher's [`Trust`](super::Trust) has keys; `None` when there is
/// nothing to verify (no keys, or no `.minisig` and none required).
async fn admit_signature(
    fetcher: &Fetcher,
    tarball_url: &str,
    file: &str,
) -> Result<Option<Admitted>, ArtifactError> {
    let trust = fetcher.trust();
    if !trust.checks() {
        return Ok(None);
    }
    let refuse = |reason| ArtifactError::Signature {
        file: file.to_string(),
        reason,
    };
    match fetcher.fetch_signature(tarball_url).await? {
        (url, None) if trust.required() => Err(refuse(SignatureError::Missing { url })),
        (url, None) => {
            tracing::info!(file = %file, url = %crate::redact(&url), "no signature published; installing unverified (requireSignature is off)");
            Ok(None)
        }
        (_, Some(text)) => trust.admit(&text, file).map(Some).map_err(refuse),
    }
}

/// A complete download left by an install that stopped before unpacking, if it still
/// verifies; otherwise it is removed.
async fn reuse_download(
    tarball: &Path,
    file: &str,
    want: &Want,
    fetcher: &Fetcher,
) -> Option<super::Digests> {
    if !tokio::fs::symlink_metadata(tarball)
        .await
        .is_ok_and(|m| m.is_file())
    {
        return None;
    }
    match hash_file(tarball, fetcher.limits().max_download_bytes).await {
        Ok(d) if verify(file, want, &d).is_ok() => Some(d),
        _ => {
            let _ = tokio::fs::remove_file(tarball).await;
            None
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ArtifactError> + Send + 'static,
) -> Result<T, ArtifactError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ArtifactError::Task(e.to_string()))?
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // Tests set up their files directly.
mod tests {
    use super::super::testserver::{serve, Mode};
    use super::super::Limits;
    use super::*;

    fn name() -> AgentName {
        AgentName::parse(NAME).unwrap()
    }

    fn version(v: &str) -> Version {
        Version::parse(v).unwrap()
    }
    use std::collections::HashMap;
    use std::time::Duration;
    use test_support::agent::{agent_tarball, Behaviour};

    const NAME: &str = "falcon-agent";

    fn fetcher() -> Fetcher {
        Fetcher::new(Limits {
            read_timeout: Duration::from_secs(5),
            max_unpacked_bytes: 16 << 20,
            ..Limits::default()
        })
        .unwrap()
    }

    /// Publishes `name-version.tar.gz` and its `.md5` (with `md5_text` as the body).
    fn files(version: &str, tarball: &[u8], md5_text: &str) -> HashMap<String, Vec<u8>> {
        let file = proto::legacy::tarball_file(NAME, version);
        HashMap::from([
            (format!("{file}.md5"), md5_text.as_bytes().to_vec()),
            (file, tarball.to_vec()),
        ])
    }

    #[tokio::test]
    async fn install_downloads_verifies_unpacks_once() {
        let tb = agent_tarball(NAME, "1.0.1", Behaviour::Good);
        let (md5, _) = test_support::digests(&tb);
        let file = proto::legacy::tarball_file(NAME, "1.0.1");
        let srv = serve(
            files("1.0.1", &tb, &proto::legacy::format_md5_file(&md5, &file)),
            Mode::Normal,
        )
        .await;
        let root = tempfile::tempdir().unwrap();
        let agent = root.path().join(NAME);
        std::fs::create_dir(&agent).unwrap();
        let (url, md5_url) = (srv.url(&file), srv.url(&format!("{file}.md5")));
        let dir = install(
            &fetcher(),
            &agent,
            &name(),
            &version("1.0.1"),
            &url,
            Some(&md5_url),
            Want::default(),
        )
        .await
        .unwrap();
        assert_eq!(dir, agent.join("1.0.1"));
        assert!(control::is_executable(&dir.join("control")));
        assert_eq!(std::fs::read(dir.join(&file)).unwrap(), tb);
        assert_eq!(
            proto::legacy::parse_md5_file(
                &std::fs::read_to_string(dir.join(format!("{file}.md5"))).unwrap()
            ),
            Some(md5.clone())
        );
        assert!(is_installed(&agent, "1.0.1"));
        assert!(test_support::tree(&agent.join(DOWNLOAD_DIR)).is_empty());
        assert_eq!(srv.heads().len(), 2);

        // Installed: no further request, nothing touched.
        let before = test_support::tree(&agent);
        install(
            &fetcher(),
            &agent,
            &name(),
            &version("1.0.1"),
            &url,
            Some(&md5_url),
            Want::default(),
        )
        .await
        .unwrap();
        assert_eq!(srv.heads().len(), 2);
        assert_eq!(test_support::tree(&agent), before);
    }

    #[tokio::test]
    async fn md5_mismatch_changes_nothing() {
        let tb = agent_tarball(NAME, "1.0.1", Behaviour::Good);
        let file = proto::legacy::tarball_file(NAME, "1.0.1");
        let wrong = "9f".repeat(16);
        let srv = serve(
            files("1.0.1", &tb, &proto::legacy::format_md5_file(&wrong, &file)),
            Mode::Normal,
        )
        .await;
        let root = tempfile::tempdir().unwrap();
        let agent = root.path().join(NAME);
        std::fs::create_dir(&agent).unwrap();
        std::fs::write(agent.join(".version"), "1.0.0\n").unwrap();
        let before = test_support::tree(root.path());
        let e = install(
            &fetcher(),
            &agent,
            &name(),
            &version("1.0.1"),
            &srv.url(&file),
            Some(&srv.url(&format!("{file}.md5"))),
            Want::default(),
        )
        .await
        .unwrap_err();
        let (got, _) = test_support::digests(&tb);
        assert_eq!(
            e.to_string(),
            format!("md5 mismatch for {file}: want {wrong}, got {got}")
        );
        assert_eq!(test_support::tree(root.path()), before);
    }

    #[tokio::test]
    async fn hostile_tarball_with_right_checksum_changes_nothing() {
        let (_, bomb) = test_support::tarball::hostile_archives()
            .into_iter()
            .find(|(n, _)| *n == "symlink then write through it")
            .unwrap();
        let (md5, sha) = test_support::digests(&bomb);
        let file = proto::legacy::tarball_file(NAME, "6.6.6");
        let srv = serve(files("6.6.6", &bomb, ""), Mode::Normal).await;
        let root = tempfile::tempdir().unwrap();
        let agent = root.path().join(NAME);
        std::fs::create_dir(&agent).unwrap();
        let e = install(
            &fetcher(),
            &agent,
            &name(),
            &version("6.6.6"),
            &srv.url(&file),
            None,
            Want {
                md5: Some(md5),
                sha256: Some(sha),
            },
        )
        .await
        .unwrap_err();
        assert!(matches!(e, ArtifactError::Unsafe { .. }), "{e:?}");
        assert!(!agent.join("6.6.6").exists());
        assert!(!root.path().join("pwned").exists());
        assert!(!is_installed(&agent, "6.6.6"));
    }

    #[tokio::test]
    async fn no_checksum_at_all_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let e = install(
            &fetcher(),
            root.path(),
            &name(),
            &version("1.0"),
            "http://127.0.0.1:9/x",
            None,
            Want::default(),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, ArtifactError::NoChecksum { .. }), "{e:?}");
    }

    #[tokio::test]
    async fn torn_folder_is_replaced() {
        let tb = agent_tarball(NAME, "1.0.1", Behaviour::Good);
        let (md5, _) = test_support::digests(&tb);
        let file = proto::legacy::tarball_file(NAME, "1.0.1");
        let srv = serve(files("1.0.1", &tb, ""), Mode::Normal).await;
        let root = tempfile::tempdir().unwrap();
        let agent = root.path().join(NAME);
        // What a crash of the original updater leaves: the folder and half a tarball.
        std::fs::create_dir_all(agent.join("1.0.1")).unwrap();
        std::fs::write(agent.join("1.0.1").join(&file), &tb[..10]).unwrap();
        assert!(!is_installed(&agent, "1.0.1"));
        let dir = install(
            &fetcher(),
            &agent,
            &name(),
            &version("1.0.1"),
            &srv.url(&file),
            None,
            Want {
                md5: Some(md5),
                sha256: None,
            },
        )
        .await
        .unwrap();
        assert_eq!(std::fs::read(dir.join(&file)).unwrap(), tb);
        assert!(is_installed(&agent, "1.0.1"));
        let tree = test_support::tree(&agent);
        assert!(tree.iter().all(|p| !p.contains(".unpack-")), "{tree:?}");
    }

    /// An agent tarball: `control` first, then `blob` of `blob_len` random bytes.
    fn big_agent(blob_len: usize) -> (Vec<u8>, Vec<u8>) {
        use test_support::tarball::{targz, Entry};
        let blob = test_support::noise(blob_len, 1);
        let tb = targz(&[
            Entry::exec("control", "#!/bin/sh\necho started\n"),
            Entry::file("blob", blob.clone()),
        ]);
        (tb, blob)
    }

    /// Names of temporary unpack folders in `agent`.
    fn temp_folders(agent: &Path) -> Vec<String> {
        std::fs::read_dir(agent)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.contains(UNPACK_INFIX))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn want_of(data: &[u8]) -> Want {
        let (md5, sha256) = test_support::digests(data);
        Want {
            md5: Some(md5),
            sha256: Some(sha256),
        }
    }

    /// A fetcher that waits long for a stalled body: the tests below release or refuse it
    /// long before.
    fn patient_fetcher() -> Fetcher {
        Fetcher::new(Limits {
            read_timeout: Duration::from_secs(120),
            ..Limits::default()
        })
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streamed_install_unpacks_while_the_body_arrives() {
        let (tb, blob) = big_agent(1 << 20);
        let file = proto::legacy::tarball_file(NAME, "2.0");
        let srv = serve(files("2.0", &tb, ""), Mode::HoldAfter(tb.len() / 2)).await;
        let root = tempfile::tempdir().unwrap();
        let agent = root.path().join(NAME);
        std::fs::create_dir(&agent).unwrap();
        let task = {
            let (agent, url, want) = (agent.clone(), srv.url(&file), want_of(&tb));
            tokio::spawn(async move {
                install(
                    &patient_fetcher(),
                    &agent,
                    &name(),
                    &version("2.0"),
                    &url,
                    None,
                    want,
                )
                .await
            })
        };
        // Half the body is in: `control`, the first member, is already unpacked into the
        // temporary folder, and nothing is installed yet.
        let a = agent.clone();
        let tmp = tokio::task::spawn_blocking(move || {
            test_support::wait_for_some(
                "control unpacked mid-download",
                Duration::from_secs(60),
                || {
                    temp_folders(&a)
                        .into_iter()
                        .find(|t| a.join(t).join("control").is_file())
                },
            )
        })
        .await
        .unwrap();
        assert!(!agent.join("2.0").exists());
        assert!(!agent.join(&tmp).join(MARKER).exists());
        assert!(agent
            .join(DOWNLOAD_DIR)
            .join(format!("{file}{PART_SUFFIX}"))
            .is_file());
        srv.release();
        let dir = task.await.unwrap().unwrap();
        assert_eq!(dir, agent.join("2.0"));
        assert!(is_installed(&agent, "2.0"));
        assert_eq!(std::fs::read(dir.join("blob")).unwrap(), blob);
        assert_eq!(std::fs::read(dir.join(&file)).unwrap(), tb);
        assert!(temp_folders(&agent).is_empty());
        assert!(test_support::tree(&agent.join(DOWNLOAD_DIR)).is_empty());
        assert_eq!(srv.heads().len(), 1);
    }

    /// The body is larger than the pipe between download and unpacker, so the unpacker is
    /// still at work when the digest turns out wrong after the last byte.
    #[tokio::test]
    async fn streamed_checksum_mismatch_leaves_no_version_and_no_temp_folder() {
        let (tb, _) = big_agent(PIPE_BUDGET_BYTES + (2 << 20));
        let file = proto::legacy::tarball_file(NAME, "2.0");
        let srv = serve(files("2.0", &tb, ""), Mode::Normal).await;
        let root = tempfile::tempdir().unwrap();
        let agent = root.path().join(NAME);
        std::fs::create_dir(&agent).unwrap();
        std::fs::write(agent.join(".version"), "1.0\n").unwrap();
        let before = test_support::tree(root.path());
        let (md5, sha) = test_support::digests(&tb);
        let bad = "ab".repeat(32);
        let e = install(
            &patient_fetcher(),
            &agent,
            &name(),
            &version("2.0"),
            &srv.url(&file),
            None,
            Want {
                md5: Some(md5),
                sha256: Some(bad.clone()),
            },
        )
        .await
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("sha256 mismatch for {file}: want {bad}, got {sha}")
        );
        assert_eq!(test_support::tree(root.path()), before);
    }

    /// An unsafe first member stops the transfer: the server never sends the second half
    /// of the body, and the install still fails at once with the unpacker's error rather
    /// than waiting for the read timeout.
    #[tokio::test]
    async fn hostile_member_stops_the_streamed_download_early() {
        use test_support::tarball::{targz, Entry};
        let tb = targz(&[
            Entry::file("../../pwned", "x"),
            Entry::exec("control", "#!/bin/sh\n"),
            Entry::file("blob", test_support::noise(1 << 20, 1)),
        ]);
        let file = proto::legacy::tarball_file(NAME, "6.6.6");
        let srv = serve(files("6.6.6", &tb, ""), Mode::HoldAfter(tb.len() / 2)).await;
        let root = tempfile::tempdir().unwrap();
        let agent = root.path().join("work").join(NAME);
        std::fs::create_dir_all(&agent).unwrap();
        let before = test_support::tree(root.path());
        // Well inside the fetcher's read timeout: only stopping early returns in time.
        let e = tokio::time::timeout(
            Duration::from_secs(60),
            install(
                &patient_fetcher(),
                &agent,
                &name(),
                &version("6.6.6"),
                &srv.url(&file),
                None,
                want_of(&tb),
            ),
        )
        .await
        .expect("the download did not stop when the unpacker refused the archive")
        .unwrap_err();
        assert!(matches!(e, ArtifactError::Unsafe { .. }), "{e:?}");
        assert!(e.to_string().contains("../../pwned"), "{e}");
        // What arrived stays as a `.part` for the next attempt; nothing else changed.
        let part = agent
            .join(DOWNLOAD_DIR)
            .join(format!("{file}{PART_SUFFIX}"));
        let got = std::fs::read(&part).unwrap();
        assert!(tb.starts_with(&got) && got.len() <= tb.len() / 2);
        let after: Vec<String> = test_support::tree(root.path())
            .into_iter()
            .filter(|p| !p.contains(DOWNLOAD_DIR))
            .collect();
        assert_eq!(after, before);
        assert_eq!(srv.heads().len(), 1);
    }

    /// A streamed download cut in the middle leaves a `.part` and no temporary folder; the
    /// next install resumes it with `Range` (the plain path) and installs.
    #[tokio::test]
    async fn interrupted_streamed_install_resumes_and_completes() {
        let (tb, blob) = big_agent(1 << 20);
        let half = tb.len() / 2;
        let file = proto::legacy::tarball_file(NAME, "2.0");
        let srv = serve(files("2.0", &tb, ""), Mode::CutFirstAfter(half)).await;
        let root = tempfile::tempdir().unwrap();
        let agent = root.path().join(NAME);
        std::fs::create_dir(&agent).unwrap();
        let url = srv.url(&file);
        let e = install(
            &fetcher(),
            &agent,
            &name(),
            &version("2.0"),
            &url,
            None,
            want_of(&tb),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, ArtifactError::Http { .. }), "{e:?}");
        let part = agent
            .join(DOWNLOAD_DIR)
            .join(format!("{file}{PART_SUFFIX}"));
        assert_eq!(std::fs::read(&part).unwrap(), tb[..half]);
        assert!(temp_folders(&agent).is_empty());
        assert!(!agent.join("2.0").exists());

        let dir = install(
            &fetcher(),
            &agent,
            &name(),
            &version("2.0"),
            &url,
            None,
            want_of(&tb),
        )
        .await
        .unwrap();
        let heads = srv.heads();
        assert_eq!(heads.len(), 2, "{heads:?}");
        assert!(
            heads[1].contains(&format!("range: bytes={half}-")),
            "{}",
            heads[1]
        );
        assert!(is_installed(&agent, "2.0"));
        assert_eq!(std::fs::read(dir.join("blob")).unwrap(), blob);
        assert_eq!(std::fs::read(dir.join(&file)).unwrap(), tb);
        assert!(temp_folders(&agent).is_empty());
        assert!(test_support::tree(&agent.join(DOWNLOAD_DIR)).is_empty());
    }

    /// Lays out a folder the way the original updater leaves it.
    fn legacy_folder(agent: &Path, version: &str, tarball: &[u8], md5_hex: &str) -> PathBuf {
        let dir = agent.join(version);
        std::fs::create_dir_all(&dir).unwrap();
        let file = proto::legacy::tarball_file(NAME, version);
        std::fs::write(dir.join(&file), tarball).unwrap();
        std::fs::write(
            dir.join(format!("{file}.md5")),
            proto::legacy::format_md5_file(md5_hex, &file),
        )
        .unwrap();
        let control = dir.join("control");
        std::fs::write(&control, "#!/bin/sh\necho started\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    #[tokio::test]
    async fn original_updater_folder_counts_as_installed_without_any_request() {
        let root = tempfile::tempdir().unwrap();
        let agent = root.path().join(NAME);
        let tb = b"pretend tarball".to_vec();
        let (md5, _) = test_support::digests(&tb);
        legacy_folder(&agent, "0.0.9", &tb, &md5);
        assert!(is_installed(&agent, "0.0.9"));
        // A closed port: any request would fail the install.
        let dir = install(
            &fetcher(),
            &agent,
            &name(),
            &version("0.0.9"),
            "http://127.0.0.1:9/x",
            Some("http://127.0.0.1:9/x.md5"),
            Want::default(),
        )
        .await
        .unwrap();
        assert_eq!(dir, agent.join("0.0.9"));
    }

    #[test]
    fn torn_or_foreign_folders_are_not_installed() {
        let root = tempfile::tempdir().unwrap();
        let agent = root.path().join(NAME);
        let tb = b"pretend tarball".to_vec();
        // md5 file disagrees with the tarball (download cut short).
        legacy_folder(&agent, "1.0", &tb, &"0".repeat(32));
        assert!(!is_installed(&agent, "1.0"));
        // Control missing.
        let (md5, _) = test_support::digests(&tb);
        let dir = legacy_folder(&agent, "1.1", &tb, &md5);
        std::fs::remove_file(dir.join("control")).unwrap();
        assert!(!is_installed(&agent, "1.1"));
        // Folder missing, or a hostile version.
        assert!(!is_installed(&agent, "2.0"));
        assert!(!is_installed(&agent, ".."));
        // The answer follows the tarball when it changes.
        let dir = legacy_folder(&agent, "1.2", &tb, &md5);
        assert!(is_installed(&agent, "1.2"));
        std::fs::write(
            dir.join(proto::legacy::tarball_file(NAME, "1.2")),
            b"changed!!!!!!!!!",
        )
        .unwrap();
        assert!(!is_installed(&agent, "1.2"));
    }

    #[test]
    fn clean_leftovers_removes_interrupted_work_only() {
        let root = tempfile::tempdir().unwrap();
        let agent = root.path().join(NAME);
        std::fs::create_dir_all(agent.join(".1.0.unpack-abc").join("sub")).unwrap();
        std::fs::write(agent.join(".1.0.unpack-abc").join("sub").join("f"), "x").unwrap();
        std::fs::write(agent.join(".version.tmp-123"), "x").unwrap();
        std::fs::create_dir_all(agent.join(DOWNLOAD_DIR)).unwrap();
        std::fs::write(agent.join(DOWNLOAD_DIR).join("a-1.tar.gz.part"), "x").unwrap();
        std::fs::create_dir_all(agent.join("1.0")).unwrap();
        std::fs::write(agent.join(".version"), "1.0\n").unwrap();
        clean_leftovers(&agent).unwrap();
        assert_eq!(
            test_support::tree(&agent),
            vec![
                ".download/".to_string(),
                ".download/a-1.tar.gz.part".to_string(),
                ".version".to_string(),
                "1.0/".to_string(),
            ]
        );
        clean_leftovers(&root.path().join("absent")).unwrap();
    }
}
