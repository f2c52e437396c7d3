//! Agent tarballs: download and verify ([`Fetcher`]), unpack safely ([`unpack`]), and make a
//! version folder installed exactly once ([`install`]).
//!
//! Every input here comes from the network and is hostile until checked: sizes, entry
//! counts and times are capped by [`Limits`], checksums (and, with `trustedKeys`, the
//! minisign signature: [`sign`]) are verified before anything is installed, and an archive
//! can write nothing outside its temporary folder.

mod fetch;
mod install;
mod pipe;
pub mod sign;
mod unpack;

use std::path::PathBuf;
use std::time::Duration;

pub use fetch::{Fetcher, MAX_MD5_FILE_BYTES};
pub use install::{clean_leftovers, install, is_installed, DOWNLOAD_DIR, MARKER};
pub use sign::{SignatureError, Trust, TrustedKey};
pub use unpack::unpack;

/// Caps on everything a download or an archive may cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest tarball downloaded, in bytes.
    pub max_download_bytes: u64,
    /// Most bytes written by unpacking one tarball (file contents actually written).
    pub max_unpacked_bytes: u64,
    /// Most members in one tarball.
    pub max_entries: u64,
    /// Longest wait for a TCP connection.
    pub connect_timeout: Duration,
    /// Longest wait for the next byte (headers or body) of a response.
    pub read_timeout: Duration,
    /// Longest a whole transfer may take.
    pub total_timeout: Duration,
}

/// Default for [`Limits::max_download_bytes`]: 1 GiB.
pub const fn default_max_download_bytes() -> u64 {
    1 << 30
}
/// Default for [`Limits::max_unpacked_bytes`]: 4 GiB.
pub const fn default_max_unpacked_bytes() -> u64 {
    4 << 30
}
/// Default for [`Limits::max_entries`].
pub const fn default_max_entries() -> u64 {
    100_000
}
/// Default for [`Limits::connect_timeout`].
pub const fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
/// Default for [`Limits::read_timeout`].
pub const fn default_read_timeout() -> Duration {
    Duration::from_secs(60)
}
/// Default for [`Limits::total_timeout`]: 30 minutes.
pub const fn default_total_timeout() -> Duration {
    Duration::from_secs(30 * 60)
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_download_bytes: default_max_download_bytes(),
            max_unpacked_bytes: default_max_unpacked_bytes(),
            max_entries: default_max_entries(),
            connect_timeout: default_connect_timeout(),
            read_timeout: default_read_timeout(),
            total_timeout: default_total_timeout(),
        }
    }
}

/// The checksums a download must match (lowercase hex); `None` means "not checked".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Want {
    pub md5: Option<String>,
    pub sha256: Option<String>,
}

/// Checksums and size of a verified download (lowercase hex).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digests {
    pub md5: String,
    pub sha256: String,
    pub size: u64,
}

/// Why a tarball could not be fetched, verified, unpacked or installed. Each message names
/// the URL, file or archive member at fault.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("cannot build the http client: {0}")]
    Client(String),
    #[error("fetch {}: {detail}", crate::redact(url))]
    Http { url: String, detail: String },
    #[error("fetch {}: http status {status}", crate::redact(url))]
    Status { url: String, status: u16 },
    #[error("fetch {}: {what} timed out after {after:?}", crate::redact(url))]
    Timeout {
        url: String,
        what: &'static str,
        after: Duration,
    },
    #[error("fetch {}: larger than the limit of {limit} bytes", crate::redact(url))]
    TooLarge { url: String, limit: u64 },
    #[error("bad md5 file {}: {detail}", crate::redact(url))]
    BadMd5File { url: String, detail: String },
    #[error("{algo} mismatch for {file}: want {want}, got {got}")]
    Checksum {
        file: String,
        algo: &'static str,
        want: String,
        got: String,
    },
    #[error("refusing {file}: {reason}")]
    Signature {
        file: String,
        #[source]
        reason: SignatureError,
    },
    #[error("no checksum to verify {file} against")]
    NoChecksum { file: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("refusing {}: member {member:?}: {reason}", tarball.display())]
    Unsafe {
        tarball: PathBuf,
        member: String,
        reason: String,
    },
    #[error("bad archive {}: {detail}", tarball.display())]
    Archive { tarball: PathBuf, detail: String },
    #[error("refusing {}: {what}", tarball.display())]
    Limit { tarball: PathBuf, what: String },
    #[error("{}: no executable control at the root", tarball.display())]
    NoControl { tarball: PathBuf },
    #[error("{} already exists", path.display())]
    AlreadyExists { path: PathBuf },
    #[error(transparent)]
    Name(#[from] proto::validate::NameError),
    #[error("unpacking task failed: {0}")]
    Task(String),
}

impl ArtifactError {
    /// Wraps an I/O error with the path it concerns, for `map_err`.
    pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> ArtifactError {
        let path = path.to_path_buf();
        move |source| ArtifactError::Io { path, source }
    }

    /// The `state` of the `install_failed` event this error makes
    /// (`proto::events::INSTALL_FAILED_*`): what a rollout needs to tell a release's fault
    /// (a refused archive) from the infrastructure's (network, disk) and from the trust
    /// chain's (checksum, signature).
    ///
    /// Every local I/O error is `disk`: the download, the unpacked files and the marker
    /// are all writes to the workdir, and a read of the finished download failing is the
    /// disk's fault too. A name the server sent that cannot become a file name, and a
    /// tarball without a checksum to check, are the server's doing: `download` and
    /// `checksum`.
    pub fn install_failed_state(&self) -> &'static str {
        use proto::events as ev;
        use ArtifactError as E;
        match self {
            E::Client(_)
            | E::Http { .. }
            | E::Status { .. }
            | E::Timeout { .. }
            | E::TooLarge { .. }
            | E::BadMd5File { .. }
            | E::Name(_) => ev::INSTALL_FAILED_DOWNLOAD,
            E::Checksum { .. } | E::NoChecksum { .. } => ev::INSTALL_FAILED_CHECKSUM,
            E::Signature { .. } => ev::INSTALL_FAILED_SIGNATURE,
            E::Io { .. } | E::AlreadyExists { .. } | E::Task(_) => ev::INSTALL_FAILED_DISK,
            E::Unsafe { .. } | E::Archive { .. } | E::Limit { .. } | E::NoControl { .. } => {
                ev::INSTALL_FAILED_ARCHIVE
            }
        }
    }
}

/// Entry points for the fuzz targets in `fuzz/` (not an API: it may change at any time).
/// The member checks and the unpacker they reach stay private to [`unpack`] otherwise.
#[doc(hidden)]
pub mod fuzzing {
    use std::io::BufRead;
    use std::path::{Path, PathBuf};

    use super::{ArtifactError, Limits};

    /// A member path made relative, or why it is refused.
    pub fn member_path(path: &Path) -> Result<PathBuf, &'static str> {
        super::unpack::safe_relative(path)
    }

    /// Whether a symlink member at `rel` pointing at `target` stays inside the tree.
    pub fn symlink_target(rel: &Path, target: &Path) -> Result<(), &'static str> {
        super::unpack::check_symlink_target(rel, target)
    }

    /// Unpacks the gzip-compressed tar stream `compressed` into the existing, empty `root`.
    pub fn unpack_members(
        compressed: impl BufRead,
        root: &Path,
        limits: &Limits,
    ) -> Result<(), ArtifactError> {
        super::unpack::unpack_members(compressed, Path::new("fuzz.tar.gz"), root, limits)
    }
}

#[cfg(test)]
mod testserver;
