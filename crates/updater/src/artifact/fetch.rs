//! Downloads over HTTP(S): a tarball streamed to a `.part` file while MD5 and SHA-256 are
//! computed, resumed with `Range` after an interruption, and the small files beside it
//! (`.md5`, `.minisig`). Every transfer has a size cap and connect, read and total timeouts.

use std::path::Path;
use std::sync::Arc;

use md5::{Digest as _, Md5};
use reqwest::header::{CONTENT_RANGE, RANGE};
use reqwest::StatusCode;
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::pipe::Feed;
use super::sign::{Trust, MAX_SIGNATURE_BYTES, SIGNATURE_SUFFIX};
use super::{ArtifactError, Digests, Limits, Want};
use crate::fsx;

/// Largest `.md5` file read; `md5sum` writes 32 hex digits, two spaces and a file name.
pub const MAX_MD5_FILE_BYTES: u64 = 4096;

/// Size of the writes that append a download to its `.part` file.
const PART_WRITE_BYTES: usize = 1 << 20;

/// Suffix of a download in progress.
pub(crate) const PART_SUFFIX: &str = ".part";

/// Downloads files with the [`Limits`] it was built with, and holds the signature policy
/// ([`Trust`]) every install through it obeys, an agent's and ops-updater's own alike.
/// Cheap to clone (the client is shared).
#[derive(Debug, Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    limits: Limits,
    trust: Arc<Trust>,
}

/// Both digests, fed as bytes stream by.
struct Hashers {
    md5: Md5,
    sha256: Sha256,
}

impl Hashers {
    fn new() -> Self {
        Hashers {
            md5: Md5::new(),
            sha256: Sha256::new(),
        }
    }
    fn update(&mut self, data: &[u8]) {
        self.md5.update(data);
        self.sha256.update(data);
    }
    fn finish(self, size: u64) -> Digests {
        Digests {
            md5: hex::encode(self.md5.finalize()),
            sha256: hex::encode(self.sha256.finalize()),
            size,
        }
    }
}

/// Checks `got` against `want` (case-insensitively) for `algo`.
pub(crate) fn verify(file: &str, want: &Want, got: &Digests) -> Result<(), ArtifactError> {
    let pairs = [
        ("md5", want.md5.as_deref(), &got.md5),
        ("sha256", want.sha256.as_deref(), &got.sha256),
    ];
    for (algo, want, got) in pairs {
        if let Some(w) = want {
            if !w.trim().eq_ignore_ascii_case(got) {
                return Err(ArtifactError::Checksum {
                    file: file.to_string(),
                    algo,
                    want: w.trim().to_ascii_lowercase(),
                    got: got.clone(),
                });
            }
        }
    }
    Ok(())
}

/// MD5 and SHA-256 of a local file, read in chunks.
pub(crate) async fn hash_file(path: &Path, max: u64) -> std::io::Result<Digests> {
    let mut h = Hashers::new();
    let mut f = tokio::fs::File::open(path).await?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        size += n as u64;
        if size > max {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: larger than {max} bytes", path.display()),
            ));
        }
        h.update(&buf[..n]);
    }
    Ok(h.finish(size))
}

/// Where the signature of the tarball at `tarball_url` is: `.minisig` appended to the
/// path, before any query or fragment (a URL with a token keeps it).
pub(crate) fn signature_url(tarball_url: &str) -> String {
    let cut = tarball_url.find(['?', '#']).unwrap_or(tarball_url.len());
    let (path, rest) = tarball_url.split_at(cut);
    format!("{path}{SIGNATURE_SUFFIX}{rest}")
}

/// Parses `bytes start-end/total` and returns `start`.
fn content_range_start(v: &str) -> Option<u64> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (start, _) = rest.split_once('-')?;
    start.trim().parse().ok()
}

/// What a download fed to an unpacker returns when the unpacker stopped reading; the caller
/// reports the unpacker's own error instead.
fn unpacker_stopped() -> ArtifactError {
    ArtifactError::Task("the unpacker stopped reading the download".to_string())
}

async fn remove_quietly(path: &Path) {
    if let Err(e) = tokio::fs::remove_file(path).await {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove partial download");
        }
    }
}

impl Fetcher {
    /// A fetcher over a rustls HTTP client with `limits.connect_timeout`. Proxies set in
    /// the environment (`http_proxy`, `no_proxy`) are honoured, as wget did for the original.
    pub fn new(limits: Limits) -> Result<Fetcher, ArtifactError> {
        Fetcher::with_tls(
            limits,
            crate::heartbeat::Tls {
                ca: &[],
                insecure: false,
            },
        )
    }

    /// As [`Fetcher::new`], checking `https://` tarball servers as the heartbeat checks its
    /// server (`tlsCaFile`, `tlsInsecure`): the server that hands out tarball URLs of its
    /// own serves them with the same certificate.
    pub fn with_tls(
        limits: Limits,
        tls: crate::heartbeat::Tls<'_>,
    ) -> Result<Fetcher, ArtifactError> {
        let b = reqwest::Client::builder().connect_timeout(limits.connect_timeout);
        let client = crate::tls::configure(b, tls.ca, tls.insecure)
            .user_agent(format!("ops-updater/{}", crate::selfup::VERSION))
            .build()
            .map_err(|e| ArtifactError::Client(crate::error_chain(&e)))?;
        Ok(Fetcher {
            client,
            limits,
            trust: Arc::new(Trust::default()),
        })
    }

    /// This fetcher with the signature policy `trust` (the updater's `trustedKeys` and
    /// `requireSignature`).
    pub fn with_trust(self, trust: Trust) -> Fetcher {
        Fetcher {
            trust: Arc::new(trust),
            ..self
        }
    }

    /// The limits this fetcher enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The signature policy of installs through this fetcher.
    pub fn trust(&self) -> &Trust {
        &self.trust
    }

    /// Sends a GET (from byte `from` when given) and waits for the response headers for at
    /// most the read timeout.
    async fn get(&self, url: &str, from: Option<u64>) -> Result<reqwest::Response, ArtifactError> {
        let mut req = self.client.get(url);
        if let Some(from) = from {
            req = req.header(RANGE, format!("bytes={from}-"));
        }
        match tokio::time::timeout(self.limits.read_timeout, req.send()).await {
            Err(_) => Err(ArtifactError::Timeout {
                url: url.to_string(),
                what: "waiting for the response",
                after: self.limits.read_timeout,
            }),
            Ok(Err(e)) => Err(ArtifactError::Http {
                url: url.to_string(),
                detail: crate::error_chain(&e),
            }),
            Ok(Ok(r)) => Ok(r),
        }
    }

    /// The next body chunk, waiting at most the read timeout for it.
    async fn next_chunk(
        &self,
        url: &str,
        resp: &mut reqwest::Response,
    ) -> Result<Option<bytes::Bytes>, ArtifactError> {
        match tokio::time::timeout(self.limits.read_timeout, resp.chunk()).await {
            Err(_) => Err(ArtifactError::Timeout {
                url: url.to_string(),
                what: "reading the body",
                after: self.limits.read_timeout,
            }),
            Ok(Err(e)) => Err(ArtifactError::Http {
                url: url.to_string(),
                detail: crate::error_chain(&e),
            }),
            Ok(Ok(c)) => Ok(c),
        }
    }

    /// Runs one whole transfer of `url` under [`Limits::total_timeout`].
    async fn within_total<T>(
        &self,
        url: &str,
        transfer: impl std::future::Future<Output = Result<T, ArtifactError>>,
    ) -> Result<T, ArtifactError> {
        let total = self.limits.total_timeout;
        tokio::time::timeout(total, transfer)
            .await
            .unwrap_or_else(|_| {
                Err(ArtifactError::Timeout {
                    url: url.to_string(),
                    what: "the transfer",
                    after: total,
                })
            })
    }

    /// GET a `.md5` file (capped at 4 KiB) and parse it with proto::legacy::parse_md5_file.
    pub async fn fetch_md5(&self, url: &str) -> Result<String, ArtifactError> {
        self.within_total(url, self.fetch_md5_inner(url)).await
    }

    async fn fetch_md5_inner(&self, url: &str) -> Result<String, ArtifactError> {
        // Never `None`: a missing `.md5` is an error.
        let body = self
            .fetch_small(url, MAX_MD5_FILE_BYTES, false)
            .await?
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&body);
        proto::legacy::parse_md5_file(&text).ok_or_else(|| {
            let shown: String = text.trim().chars().take(64).collect();
            ArtifactError::BadMd5File {
                url: url.to_string(),
                detail: format!("no 32-hex-digit checksum at the start of {shown:?}"),
            }
        })
    }

    /// GET the minisign signature beside the tarball at `tarball_url` (capped at
    /// [`MAX_SIGNATURE_BYTES`]); `None` when the server has none (404 or 410).
    pub async fn fetch_signature(
        &self,
        tarball_url: &str,
    ) -> Result<(String, Option<String>), ArtifactError> {
        let url = signature_url(tarball_url);
        let body = self
            .within_total(&url, self.fetch_small(&url, MAX_SIGNATURE_BYTES, true))
            .await?;
        Ok((url, body.map(|b| String::from_utf8_lossy(&b).into_owned())))
    }

    /// GET a small file whole, refusing more than `max` bytes; with `may_be_absent`, a 404
    /// or 410 is `None` rather than an error.
    async fn fetch_small(
        &self,
        url: &str,
        max: u64,
        may_be_absent: bool,
    ) -> Result<Option<Vec<u8>>, ArtifactError> {
        let mut resp = self.get(url, None).await?;
        let status = resp.status();
        if may_be_absent && (status == StatusCode::NOT_FOUND || status == StatusCode::GONE) {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(ArtifactError::Status {
                url: url.to_string(),
                status: status.as_u16(),
            });
        }
        let too_large = || ArtifactError::TooLarge {
            url: url.to_string(),
            limit: max,
        };
        if resp.content_length().is_some_and(|n| n > max) {
            return Err(too_large());
        }
        let mut body = Vec::new();
        while let Some(chunk) = self.next_chunk(url, &mut resp).await? {
            if (body.len() + chunk.len()) as u64 > max {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Some(body))
    }

    /// Stream `url` into `<dest_dir>/<file_name>.part` (resuming with Range from an existing .part when the
    /// server answers 206; restarting when it answers 200), hashing MD5+SHA-256 while streaming;
    /// verify against `want`; on success fsync + rename to `<dest_dir>/<file_name>` and return digests.
    /// On a checksum mismatch the .part is deleted and ArtifactError::Checksum{..} returned.
    ///
    /// An interrupted transfer (error, read timeout) keeps the `.part` for the next call to
    /// resume; a size-cap breach or a checksum mismatch deletes it.
    pub async fn download(
        &self,
        url: &str,
        dest_dir: &Path,
        file_name: &str,
        want: &Want,
    ) -> Result<Digests, ArtifactError> {
        self.download_feeding(url, dest_dir, file_name, want, None)
            .await
    }

    /// [`Fetcher::download`] that also hands every byte of the tarball, in order and from
    /// the first one, to `feed` (an unpacker reading it as it arrives). When the reader goes
    /// away the transfer stops early with [`ArtifactError::Task`], keeping the `.part`, and
    /// `feed.stopped()` says so. The feed is not ended here: the caller ends it once this
    /// returned success, so that the reader never sees the end of a download that failed.
    pub(crate) async fn download_feeding(
        &self,
        url: &str,
        dest_dir: &Path,
        file_name: &str,
        want: &Want,
        feed: Option<&mut Feed>,
    ) -> Result<Digests, ArtifactError> {
        self.within_total(
            url,
            self.download_inner(url, dest_dir, file_name, want, feed),
        )
        .await
    }

    async fn download_inner(
        &self,
        url: &str,
        dest_dir: &Path,
        file_name: &str,
        want: &Want,
        mut feed: Option<&mut Feed>,
    ) -> Result<Digests, ArtifactError> {
        let max = self.limits.max_download_bytes;
        tokio::fs::create_dir_all(dest_dir)
            .await
            .map_err(ArtifactError::io(dest_dir))?;
        let part = dest_dir.join(format!("{file_name}{PART_SUFFIX}"));
        let final_path = dest_dir.join(file_name);
        let too_large = || ArtifactError::TooLarge {
            url: url.to_string(),
            limit: max,
        };

        let mut offset = match tokio::fs::symlink_metadata(&part).await {
            Ok(m) if m.is_file() && m.len() <= max => m.len(),
            Ok(_) => {
                remove_quietly(&part).await;
                0
            }
            Err(_) => 0,
        };

        let mut resp = self.get(url, (offset > 0).then_some(offset)).await?;
        if offset > 0 {
            let resumable = resp.status() == StatusCode::PARTIAL_CONTENT
                && resp
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(content_range_start)
                    == Some(offset);
            if resp.status() == StatusCode::RANGE_NOT_SATISFIABLE
                || (resp.status() == StatusCode::PARTIAL_CONTENT && !resumable)
            {
                // The .part is complete, longer than the file, or the server answered a
                // range we did not ask for: nothing in it can be trusted. Start over.
                tracing::info!(url = %crate::redact(url), offset, status = %resp.status(), "cannot resume download, starting over");
                drop(resp);
                remove_quietly(&part).await;
                offset = 0;
                resp = self.get(url, None).await?;
            } else if resumable {
                tracing::info!(url = %crate::redact(url), offset, "resuming download");
            } else if resp.status().is_success() {
                tracing::info!(url = %crate::redact(url), offset, "server ignored the range, starting over");
                offset = 0;
            }
        }
        if !resp.status().is_success()
            || (offset == 0 && resp.status() == StatusCode::PARTIAL_CONTENT)
        {
            return Err(ArtifactError::Status {
                url: url.to_string(),
                status: resp.status().as_u16(),
            });
        }
        if resp
            .content_length()
            .is_some_and(|n| n.saturating_add(offset) > max)
        {
            remove_quietly(&part).await;
            return Err(too_large());
        }

        // Resuming: the digests cover the whole file, so feed them what is already on disk.
        let mut hashers = Hashers::new();
        if offset > 0 {
            let mut f = tokio::fs::File::open(&part)
                .await
                .map_err(ArtifactError::io(&part))?;
            let mut buf = vec![0u8; 64 * 1024];
            let mut left = offset;
            while left > 0 {
                let n = f.read(&mut buf).await.map_err(ArtifactError::io(&part))?;
                if n == 0 {
                    break;
                }
                let n = n.min(left as usize);
                hashers.update(&buf[..n]);
                if let Some(feed) = feed.as_deref_mut() {
                    if !feed.send(bytes::Bytes::copy_from_slice(&buf[..n])).await {
                        return Err(unpacker_stopped());
                    }
                }
                left -= n as u64;
            }
        }
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(offset > 0)
            .truncate(offset == 0)
            .open(&part)
            .await
            .map_err(ArtifactError::io(&part))?;
        // Network chunks are small (often a few KiB) and each write of a tokio file is a
        // trip to a blocking thread: gather them into large writes.
        let mut file = tokio::io::BufWriter::with_capacity(PART_WRITE_BYTES, file);

        let mut size = offset;
        let streamed: Result<(), ArtifactError> = async {
            loop {
                // While waiting on the network, notice an unpacker that refused the archive:
                // it must not take a server that stalls the read timeout to find out.
                let next = match feed.as_deref_mut() {
                    Some(f) => tokio::select! {
                        next = self.next_chunk(url, &mut resp) => next?,
                        () = f.closed() => return Err(unpacker_stopped()),
                    },
                    None => self.next_chunk(url, &mut resp).await?,
                };
                let Some(chunk) = next else { break };
                size += chunk.len() as u64;
                if size > max {
                    return Err(too_large());
                }
                hashers.update(&chunk);
                file.write_all(&chunk)
                    .await
                    .map_err(ArtifactError::io(&part))?;
                if let Some(feed) = feed.as_deref_mut() {
                    if !feed.send(chunk).await {
                        return Err(unpacker_stopped());
                    }
                }
            }
            Ok(())
        }
        .await;
        // Whatever happened, what was written must reach the disk: it is what a resume
        // continues from. Except a whole body fed to an unpacker: the caller's `syncfs`
        // makes it durable before the version folder (which links it) is committed, and a
        // crash before that leaves a file that is hashed again before any reuse.
        let sync = streamed.is_err() || feed.is_none();
        let flushed = async {
            file.flush().await?;
            if sync {
                file.get_ref().sync_all().await?;
            }
            Ok::<(), std::io::Error>(())
        }
        .await;
        drop(file);
        match streamed {
            Err(e @ ArtifactError::TooLarge { .. }) => {
                remove_quietly(&part).await;
                return Err(e);
            }
            Err(e) => {
                tracing::warn!(url = %crate::redact(url), bytes = size, error = %e, "download interrupted, keeping the partial file");
                return Err(e);
            }
            Ok(()) => {}
        }
        flushed.map_err(ArtifactError::io(&part))?;

        let digests = hashers.finish(size);
        if let Err(e) = verify(file_name, want, &digests) {
            remove_quietly(&part).await;
            return Err(e);
        }
        tokio::fs::rename(&part, &final_path)
            .await
            .map_err(ArtifactError::io(&final_path))?;
        fsx::fsync_dir_async(dest_dir.to_path_buf())
            .await
            .map_err(ArtifactError::io(dest_dir))?;
        tracing::info!(url = %crate::redact(url), bytes = size, md5 = %digests.md5, "download verified");
        Ok(digests)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_parsing() {
        assert_eq!(content_range_start("bytes 100-199/200"), Some(100));
        assert_eq!(content_range_start("bytes 0-0/*"), Some(0));
        assert_eq!(content_range_start("items 1-2/3"), None);
        assert_eq!(content_range_start("bytes x-1/2"), None);
    }

    #[test]
    fn signature_url_keeps_the_query() {
        for (tarball, want) in [
            ("http://m/f-1.tar.gz", "http://m/f-1.tar.gz.minisig"),
            (
                "http://m/a/f-1.tar.gz?t=x",
                "http://m/a/f-1.tar.gz.minisig?t=x",
            ),
            (
                "http://m/f-1.tar.gz#frag",
                "http://m/f-1.tar.gz.minisig#frag",
            ),
        ] {
            assert_eq!(signature_url(tarball), want, "{tarball}");
        }
    }

    #[test]
    fn verify_reports_want_and_got() {
        let got = Digests {
            md5: "3a".repeat(16),
            sha256: "bb".repeat(32),
            size: 1,
        };
        let want = Want {
            md5: Some("9F".repeat(16)),
            sha256: None,
        };
        let e = verify("falcon-agent-1.0.1.tar.gz", &want, &got).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "md5 mismatch for falcon-agent-1.0.1.tar.gz: want {}, got {}",
                "9f".repeat(16),
                "3a".repeat(16)
            )
        );
        let ok = Want {
            md5: Some("3A".repeat(16)),
            sha256: Some("bb".repeat(32)),
        };
        verify("f", &ok, &got).unwrap();
        let bad_sha = Want {
            md5: None,
            sha256: Some("cc".repeat(32)),
        };
        let e = verify("f", &bad_sha, &got).unwrap_err();
        assert!(
            e.to_string().starts_with("sha256 mismatch for f: want cc"),
            "{e}"
        );
    }

    use super::super::testserver::{serve, Mode, Server};
    use std::collections::HashMap;
    use std::time::Duration;

    const FILE: &str = "falcon-agent-1.0.1.tar.gz";

    fn payload() -> Vec<u8> {
        (0..200_000u32).map(|i| (i % 251) as u8).collect()
    }

    fn limits() -> Limits {
        Limits {
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(5),
            total_timeout: Duration::from_secs(60),
            ..Limits::default()
        }
    }

    fn want_of(data: &[u8]) -> Want {
        let (md5, sha256) = test_support::digests(data);
        Want {
            md5: Some(md5),
            sha256: Some(sha256),
        }
    }

    async fn server(mode: Mode, data: &[u8]) -> Server {
        serve(HashMap::from([(FILE.to_string(), data.to_vec())]), mode).await
    }

    #[tokio::test]
    async fn download_verifies_and_renames() {
        let data = payload();
        let srv = server(Mode::Normal, &data).await;
        let d = tempfile::tempdir().unwrap();
        let f = Fetcher::new(limits()).unwrap();
        let got = f
            .download(&srv.url(FILE), d.path(), FILE, &want_of(&data))
            .await
            .unwrap();
        let (md5, sha) = test_support::digests(&data);
        assert_eq!(
            got,
            Digests {
                md5,
                sha256: sha,
                size: data.len() as u64
            }
        );
        assert_eq!(std::fs::read(d.path().join(FILE)).unwrap(), data);
        assert_eq!(test_support::tree(d.path()), vec![FILE.to_string()]);
    }

    #[tokio::test]
    async fn md5_mismatch_deletes_the_download_and_reports_want_and_got() {
        let data = payload();
        let srv = server(Mode::Normal, &data).await;
        let d = tempfile::tempdir().unwrap();
        let f = Fetcher::new(limits()).unwrap();
        let (md5, _) = test_support::digests(&data);
        let bad = "9f".repeat(16);
        let want = Want {
            md5: Some(bad.clone()),
            sha256: None,
        };
        let e = f
            .download(&srv.url(FILE), d.path(), FILE, &want)
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("md5 mismatch for {FILE}: want {bad}, got {md5}")
        );
        assert!(test_support::tree(d.path()).is_empty());
    }

    #[tokio::test]
    async fn sha256_mismatch_deletes_the_download_and_reports_want_and_got() {
        let data = payload();
        let srv = server(Mode::Normal, &data).await;
        let d = tempfile::tempdir().unwrap();
        let f = Fetcher::new(limits()).unwrap();
        let (md5, sha) = test_support::digests(&data);
        let bad = "ab".repeat(32);
        let want = Want {
            md5: Some(md5),
            sha256: Some(bad.clone()),
        };
        let e = f
            .download(&srv.url(FILE), d.path(), FILE, &want)
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("sha256 mismatch for {FILE}: want {bad}, got {sha}")
        );
        assert!(test_support::tree(d.path()).is_empty());
    }

    #[tokio::test]
    async fn interrupted_download_resumes_with_range() {
        let data = payload();
        let half = data.len() / 2;
        let srv = server(Mode::CutFirstAfter(half), &data).await;
        let d = tempfile::tempdir().unwrap();
        let f = Fetcher::new(limits()).unwrap();
        let url = srv.url(FILE);
        let e = f
            .download(&url, d.path(), FILE, &want_of(&data))
            .await
            .unwrap_err();
        assert!(matches!(e, ArtifactError::Http { .. }), "{e:?}");
        let part = d.path().join(format!("{FILE}{PART_SUFFIX}"));
        assert_eq!(std::fs::read(&part).unwrap(), data[..half]);

        let got = f
            .download(&url, d.path(), FILE, &want_of(&data))
            .await
            .unwrap();
        assert_eq!(got.size, data.len() as u64);
        assert_eq!(got.md5, test_support::digests(&data).0);
        let heads = srv.heads();
        assert_eq!(heads.len(), 2, "{heads:?}");
        assert!(!heads[0].contains("range:"), "{}", heads[0]);
        assert!(
            heads[1].contains(&format!("range: bytes={half}-")),
            "{}",
            heads[1]
        );
        assert_eq!(std::fs::read(d.path().join(FILE)).unwrap(), data);
        assert!(!part.exists());
    }

    #[tokio::test]
    async fn server_ignoring_range_restarts_from_zero() {
        let data = payload();
        let srv = server(Mode::IgnoreRange, &data).await;
        let d = tempfile::tempdir().unwrap();
        // A stale partial file that does not even match the data: it must not survive.
        std::fs::write(d.path().join(format!("{FILE}{PART_SUFFIX}")), b"garbage").unwrap();
        let f = Fetcher::new(limits()).unwrap();
        f.download(&srv.url(FILE), d.path(), FILE, &want_of(&data))
            .await
            .unwrap();
        assert!(srv.heads()[0].contains("range: bytes=7-"));
        assert_eq!(std::fs::read(d.path().join(FILE)).unwrap(), data);
    }

    #[tokio::test]
    async fn range_not_satisfiable_restarts_cleanly() {
        let data = payload();
        let srv = server(Mode::Normal, &data).await;
        let d = tempfile::tempdir().unwrap();
        // Longer than the file: the server answers 416.
        let mut stale = data.clone();
        stale.extend_from_slice(b"extra");
        std::fs::write(d.path().join(format!("{FILE}{PART_SUFFIX}")), &stale).unwrap();
        let f = Fetcher::new(limits()).unwrap();
        let got = f
            .download(&srv.url(FILE), d.path(), FILE, &want_of(&data))
            .await
            .unwrap();
        assert_eq!(got.size, data.len() as u64);
        let heads = srv.heads();
        assert_eq!(heads.len(), 2, "{heads:?}");
        assert!(!heads[1].contains("range:"));
        assert_eq!(test_support::tree(d.path()), vec![FILE.to_string()]);
    }

    #[tokio::test]
    async fn content_length_over_the_cap_is_refused_before_reading() {
        let data = payload();
        let srv = server(Mode::Normal, &data).await;
        let d = tempfile::tempdir().unwrap();
        let f = Fetcher::new(Limits {
            max_download_bytes: 1000,
            ..limits()
        })
        .unwrap();
        let e = f
            .download(&srv.url(FILE), d.path(), FILE, &want_of(&data))
            .await
            .unwrap_err();
        assert!(
            matches!(e, ArtifactError::TooLarge { limit: 1000, .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains(&srv.url(FILE)), "{e}");
        assert!(test_support::tree(d.path()).is_empty());
    }

    #[tokio::test]
    async fn streaming_past_the_cap_aborts_and_deletes() {
        let data = payload();
        let srv = server(Mode::NoLength, &data).await;
        let d = tempfile::tempdir().unwrap();
        let f = Fetcher::new(Limits {
            max_download_bytes: 1000,
            ..limits()
        })
        .unwrap();
        let e = f
            .download(&srv.url(FILE), d.path(), FILE, &want_of(&data))
            .await
            .unwrap_err();
        assert!(matches!(e, ArtifactError::TooLarge { .. }), "{e:?}");
        assert!(test_support::tree(d.path()).is_empty());
    }

    #[tokio::test]
    async fn stalled_server_hits_the_read_timeout_and_keeps_the_part() {
        let data = payload();
        let srv = server(Mode::Stall(1000), &data).await;
        let d = tempfile::tempdir().unwrap();
        let f = Fetcher::new(Limits {
            read_timeout: Duration::from_secs(1),
            ..limits()
        })
        .unwrap();
        let e = f
            .download(&srv.url(FILE), d.path(), FILE, &want_of(&data))
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                ArtifactError::Timeout {
                    what: "reading the body",
                    ..
                }
            ),
            "{e:?}"
        );
        let part = d.path().join(format!("{FILE}{PART_SUFFIX}"));
        assert_eq!(std::fs::read(part).unwrap(), data[..1000]);
    }

    #[tokio::test]
    async fn total_timeout_bounds_a_trickling_transfer() {
        let data = payload();
        let srv = server(Mode::Stall(10), &data).await;
        let d = tempfile::tempdir().unwrap();
        let f = Fetcher::new(Limits {
            total_timeout: Duration::from_millis(300),
            ..limits()
        })
        .unwrap();
        let e = f
            .download(&srv.url(FILE), d.path(), FILE, &want_of(&data))
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                ArtifactError::Timeout {
                    what: "the transfer",
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn http_404_names_the_url_and_status() {
        let srv = server(Mode::Normal, b"x").await;
        let d = tempfile::tempdir().unwrap();
        let f = Fetcher::new(limits()).unwrap();
        let url = srv.url("missing.tar.gz");
        let e = f
            .download(&url, d.path(), FILE, &Want::default())
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), format!("fetch {url}: http status 404"));
        assert!(test_support::tree(d.path()).is_empty());
        let e = f.fetch_md5(&url).await.unwrap_err();
        assert!(
            matches!(e, ArtifactError::Status { status: 404, .. }),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn connection_refused_names_the_url() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let d = tempfile::tempdir().unwrap();
        let f = Fetcher::new(limits()).unwrap();
        let url = format!("http://{addr}/{FILE}");
        let e = f
            .download(&url, d.path(), FILE, &Want::default())
            .await
            .unwrap_err();
        assert!(matches!(e, ArtifactError::Http { .. }), "{e:?}");
        assert!(e.to_string().starts_with(&format!("fetch {url}: ")), "{e}");
    }

    #[tokio::test]
    async fn md5_files_good_garbage_and_huge() {
        let md5 = "0123456789abcdef0123456789ABCDEF";
        let srv = serve(
            HashMap::from([
                (
                    "good.md5".to_string(),
                    format!("{md5}  {FILE}\n").into_bytes(),
                ),
                ("garbage.md5".to_string(), b"<html>oops</html>".to_vec()),
                ("huge.md5".to_string(), vec![b'a'; 10_000]),
            ]),
            Mode::Normal,
        )
        .await;
        let f = Fetcher::new(limits()).unwrap();
        assert_eq!(
            f.fetch_md5(&srv.url("good.md5")).await.unwrap(),
            md5.to_ascii_lowercase()
        );
        let e = f.fetch_md5(&srv.url("garbage.md5")).await.unwrap_err();
        assert!(matches!(e, ArtifactError::BadMd5File { .. }), "{e:?}");
        assert!(e.to_string().contains("garbage.md5"), "{e}");
        let e = f.fetch_md5(&srv.url("huge.md5")).await.unwrap_err();
        assert!(
            matches!(
                e,
                ArtifactError::TooLarge {
                    limit: MAX_MD5_FILE_BYTES,
                    ..
                }
            ),
            "{e:?}"
        );
    }
}
