//! Signed artifacts: the minisign public keys an operator trusts (`trustedKeys`), the
//! `.minisig` published beside a tarball, and the check that the tarball on disk is the
//! one a trusted key signed, under its own file name.
//!
//! The cryptography is `minisign-verify`'s; what is ours is the policy around it. A
//! signature is bound to *which* artifact it is through minisign's trusted comment
//! (`timestamp:<n>\tfile:<name>\thashed` by default), which the global signature covers:
//! a tarball validly signed as `falcon-agent-1.0.0.tar.gz` is refused when served as
//! `falcon-agent-1.1.0.tar.gz` or as another agent.
//!
//! What can be checked without the tarball (the signature parses, its key is trusted, its
//! trusted comment names the file) is checked before the download; the signature itself
//! is verified over the downloaded file, streamed from disk, before anything is installed.

use std::fmt;
use std::io::Read;
use std::path::Path;

use base64::Engine as _;
use minisign_verify::{PublicKey, Signature};

use super::ArtifactError;

/// Largest `.minisig` file read. Minisign writes about 300 bytes; the trusted comment is
/// the only part an operator can make longer.
pub const MAX_SIGNATURE_BYTES: u64 = 8192;

/// Suffix of the signature file beside a tarball, as `minisign -S` names it.
pub const SIGNATURE_SUFFIX: &str = ".minisig";

/// Size of the reads that feed the file to the verifier.
const READ_BYTES: usize = 256 * 1024;

/// Algorithm bytes of a minisign key or signature: Ed25519 over the whole message
/// (legacy) or over its BLAKE2b-512 hash ("prehashed", the tool's default since 0.10).
const ALG_LEGACY: [u8; 2] = *b"Ed";
const ALG_PREHASHED: [u8; 2] = *b"ED";

/// A minisign key ID as the tool prints it (`minisign public key 8827838F7D404755`).
///
/// Regression (tests/signatures.rs, one run in sixteen): printed zero-padded, an ID whose
/// top digit is 0 did not match the one in the `.pub` file's comment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyId([u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // minisign prints the eight bytes as one little-endian number, in hex without
        // leading zeros (`minisign public key 69FBC60C2A73AE9`): the same here, so that an
        // ID in a message can be found in the `.pub` file's comment.
        write!(f, "{:X}", u64::from_le_bytes(self.0))
    }
}

/// One entry of `trustedKeys`: a minisign public key, and its ID for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedKey {
    id: KeyId,
    key: PublicKey,
}

impl TrustedKey {
    /// Parses a public key as minisign's `.pub` file holds it (an `untrusted comment:`
    /// line, then the key) or as its bare base64 key line. No syscalls.
    pub fn parse(text: &str) -> Result<TrustedKey, String> {
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let b64 = match lines.as_slice() {
            [] => return Err("is empty; want a minisign public key".into()),
            [comment] if is_comment(comment) => {
                return Err("has only the comment line of a .pub file, not the key line".into())
            }
            [key] => *key,
            [comment, key] if is_comment(comment) && !is_comment(key) => *key,
            _ => {
                return Err(format!(
                    "must be a minisign public key: the two lines of its .pub file or the key line alone, got {} lines",
                    lines.len()
                ))
            }
        };
        let key = PublicKey::from_base64(b64)
            .map_err(|e| format!("is not a minisign public key ({e}): {:?}", shorten(b64)))?;
        let id = key_id_of(b64)
            .ok_or_else(|| format!("is not a minisign public key: {:?}", shorten(b64)))?;
        Ok(TrustedKey { id, key })
    }

    /// The key's ID, as `minisign -G` printed it.
    pub fn id(&self) -> KeyId {
        self.id
    }
}

fn is_comment(line: &str) -> bool {
    line.starts_with("untrusted comment:")
}

fn shorten(s: &str) -> String {
    s.chars().take(64).collect()
}

/// The key ID of a base64 key or signature line: both start with two algorithm bytes,
/// then the eight of the ID.
fn key_id_of(b64: &str) -> Option<KeyId> {
    let bin = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let id: [u8; 8] = bin.get(2..10)?.try_into().ok()?;
    Some(KeyId(id))
}

/// What the updater requires of an artifact's signature (`trustedKeys`,
/// `requireSignature`). The default checks nothing and fetches no `.minisig`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trust {
    keys: Vec<TrustedKey>,
    required: bool,
}

impl Trust {
    /// A policy over `keys`; `required` refuses an artifact without a `.minisig`.
    pub fn new(keys: Vec<TrustedKey>, required: bool) -> Trust {
        Trust { keys, required }
    }

    /// Whether signatures are looked at at all: only when keys are configured.
    pub fn checks(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Whether an artifact without a signature is refused.
    pub fn required(&self) -> bool {
        self.required
    }

    /// Checks what can be checked of the signature `text` for `file` before the tarball
    /// is there: it parses, is prehashed, is by a trusted key, and names `file`.
    pub(crate) fn admit(&self, text: &str, file: &str) -> Result<Admitted, SignatureError> {
        let sig = Signature::decode(text).map_err(|e| SignatureError::Malformed(e.to_string()))?;
        let line = text.lines().nth(1).unwrap_or_default();
        let bin = base64::engine::general_purpose::STANDARD
            .decode(line.trim())
            .map_err(|e| SignatureError::Malformed(e.to_string()))?;
        // `Signature::decode` checked the length (74 bytes) and the algorithm.
        let id = key_id_of(line).ok_or_else(|| SignatureError::Malformed("no key ID".into()))?;
        match bin.get(..2) {
            Some(alg) if alg == ALG_PREHASHED => {}
            Some(alg) if alg == ALG_LEGACY => return Err(SignatureError::Legacy),
            _ => return Err(SignatureError::Malformed("unknown algorithm".into())),
        }
        let Some(key) = self.keys.iter().find(|k| k.id == id) else {
            return Err(SignatureError::UnknownKey {
                id,
                trusted: self.keys.iter().map(|k| k.id).collect(),
            });
        };
        check_names_file(sig.trusted_comment(), file)?;
        Ok(Admitted {
            key: key.clone(),
            sig,
        })
    }
}

/// A signature that passed [`Trust::admit`], to verify over the downloaded file.
#[derive(Clone)]
pub(crate) struct Admitted {
    key: TrustedKey,
    sig: Signature,
}

impl fmt::Debug for Admitted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admitted")
            .field("key", &self.key.id)
            .field("trusted_comment", &self.sig.trusted_comment())
            .finish()
    }
}

impl Admitted {
    /// The ID of the trusted key that made the signature.
    pub(crate) fn key_id(&self) -> KeyId {
        self.key.id
    }

    /// Verifies the signature (and the global signature over its trusted comment) over
    /// the file at `path`, read in chunks. Blocking: run it on the blocking pool.
    pub(crate) fn verify_file(&self, path: &Path) -> Result<(), ArtifactError> {
        let file = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let refuse = |reason| ArtifactError::Signature {
            file: file.clone(),
            reason,
        };
        let mut verifier = self.key.key.verify_stream(&self.sig).map_err(|e| {
            refuse(match e {
                minisign_verify::Error::UnsupportedLegacyMode => SignatureError::Legacy,
                other => SignatureError::Malformed(other.to_string()),
            })
        })?;
        let mut f = std::fs::File::open(path).map_err(ArtifactError::io(path))?;
        let mut buf = vec![0u8; READ_BYTES];
        loop {
            let n = f.read(&mut buf).map_err(ArtifactError::io(path))?;
            if n == 0 {
                break;
            }
            verifier.update(&buf[..n]);
        }
        verifier
            .finalize()
            .map_err(|_| refuse(SignatureError::Invalid { id: self.key.id }))
    }
}

/// Refuses a trusted comment whose `file:` field is not exactly `file`. Minisign writes
/// the signed file's base name there (`timestamp:<n>\tfile:<name>\thashed`); a comment
/// set with `-t` must keep a `file:<name>` field, tab-separated, for the artifact to pass.
pub(crate) fn check_names_file(comment: &str, file: &str) -> Result<(), SignatureError> {
    let named = comment.split('\t').find_map(|f| f.strip_prefix("file:"));
    match named {
        Some(n) if n == file => Ok(()),
        other => Err(SignatureError::WrongFile {
            named: other.map(str::to_string),
        }),
    }
}

/// Why an artifact's signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("no signature at {} and requireSignature is set", crate::redact(url))]
    Missing { url: String },
    #[error("the .minisig is not a minisign signature: {0}")]
    Malformed(String),
    #[error(
        "signed in minisign's legacy mode (not prehashed); sign again with minisign 0.10 or later"
    )]
    Legacy,
    #[error(
        "signed by key {id}, which is not in trustedKeys (trusted: {})",
        list(trusted)
    )]
    UnknownKey { id: KeyId, trusted: Vec<KeyId> },
    #[error("{}", wrong_file(named))]
    WrongFile { named: Option<String> },
    #[error("the signature by key {id} does not verify: the tarball or the signature's trusted comment changed after signing")]
    Invalid { id: KeyId },
}

fn list(ids: &[KeyId]) -> String {
    ids.iter()
        .map(KeyId::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn wrong_file(named: &Option<String>) -> String {
    match named {
        Some(n) => format!("the signature is for {n:?}, not this file"),
        None => {
            "the signature's trusted comment names no file (want the default comment's file:<name>)"
                .into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Made with `minisign -G -W`; the signature with `minisign -S -m falcon-agent-5.1.5.tar.gz`
    // over the 6 bytes "hello\n".
    const PUB: &str = "untrusted comment: minisign public key 8827838F7D404755\nRWRVR0B9j4MniJ4jY+REpdsANRryXRuxSwNgD9KWLeBJYwfMcWlS3JaZ\n";
    const KEY_LINE: &str = "RWRVR0B9j4MniJ4jY+REpdsANRryXRuxSwNgD9KWLeBJYwfMcWlS3JaZ";
    const FILE: &str = "falcon-agent-5.1.5.tar.gz";
    const SIG: &str = "untrusted comment: signature from minisign secret key\nRURVR0B9j4MniLdkgYtF09czpVojs6LUQFlnSv0Rtm8QNgHiBwJ9UTOD22JpLPmnoYAaDv/SegEowTQgldPWiul48MkYiqIB9wk=\ntrusted comment: timestamp:1796303976\tfile:falcon-agent-5.1.5.tar.gz\thashed\nTwgMCxXbTBun5tiXnE3ejqdfEubmIIbyLAOiy9ZiC6TK7HUcgPGXq5ENPwBcm8zISdsxWRgcNJt36ArhdcsbBg==\n";

    fn check_key(text: &str, want: Result<&str, &str>) {
        let got = TrustedKey::parse(text).map(|k| k.id().to_string());
        match (&got, want) {
            (Ok(id), Ok(w)) => assert_eq!(id, w, "key {text:?}"),
            (Err(e), Err(w)) => assert!(
                e.contains(w),
                "key {text:?}: want an error with {w:?}, got {e:?}"
            ),
            _ => panic!("key {text:?}: want {want:?}, got {got:?}"),
        }
    }

    #[test]
    fn key_ids_print_as_minisign_prints_them() {
        assert_eq!(
            KeyId([0xE9, 0x3A, 0xC7, 0x0C, 0xC6, 0xBF, 0x69, 0x00]).to_string(),
            "69BFC60CC73AE9"
        );
    }

    #[test]
    fn keys_parse_as_pub_files_or_bare_lines() {
        check_key(PUB, Ok("8827838F7D404755"));
        check_key(KEY_LINE, Ok("8827838F7D404755"));
        check_key(&format!("  {KEY_LINE}  \n"), Ok("8827838F7D404755"));
        check_key(&PUB.replace('\n', "\r\n"), Ok("8827838F7D404755"));
        check_key("", Err("is empty"));
        check_key(
            "untrusted comment: minisign public key 88",
            Err("only the comment line"),
        );
        check_key("RWRVR0B9j4Mni", Err("is not a minisign public key"));
        check_key("not base64 at all!", Err("is not a minisign public key"));
        check_key(&format!("{PUB}{KEY_LINE}\n"), Err("got 3 lines"));
        // A signature line is not a key (wrong length).
        check_key(
            SIG.lines().nth(1).unwrap(),
            Err("is not a minisign public key"),
        );
    }

    fn check_comment(comment: &str, file: &str, want: Result<(), Option<&str>>) {
        let got = check_names_file(comment, file);
        let want = want.map_err(|n| SignatureError::WrongFile {
            named: n.map(str::to_string),
        });
        assert_eq!(got, want, "comment {comment:?} for {file:?}");
    }

    #[test]
    fn trusted_comment_must_name_the_file() {
        check_comment(
            "timestamp:1\tfile:falcon-agent-5.1.5.tar.gz\thashed",
            FILE,
            Ok(()),
        );
        check_comment("timestamp:1\tfile:falcon-agent-5.1.5.tar.gz", FILE, Ok(()));
        check_comment(
            "timestamp:1\tfile:falcon-agent-5.1.4.tar.gz\thashed",
            FILE,
            Err(Some("falcon-agent-5.1.4.tar.gz")),
        );
        check_comment(
            "timestamp:1\tfile:other-agent-5.1.5.tar.gz\thashed",
            FILE,
            Err(Some("other-agent-5.1.5.tar.gz")),
        );
        // Only a whole field counts: no prefix, suffix or path.
        check_comment(
            "timestamp:1\tfile:falcon-agent-5.1.5.tar.gz.bak",
            FILE,
            Err(Some("falcon-agent-5.1.5.tar.gz.bak")),
        );
        check_comment(
            "timestamp:1\tfile:dir/falcon-agent-5.1.5.tar.gz",
            FILE,
            Err(Some("dir/falcon-agent-5.1.5.tar.gz")),
        );
        check_comment("release falcon-agent-5.1.5.tar.gz", FILE, Err(None));
        check_comment("", FILE, Err(None));
    }

    fn trust() -> Trust {
        Trust::new(vec![TrustedKey::parse(PUB).unwrap()], true)
    }

    #[test]
    fn admit_checks_key_and_file_before_the_download() {
        let a = trust().admit(SIG, FILE).unwrap();
        assert_eq!(a.key_id().to_string(), "8827838F7D404755");
        let e = trust().admit(SIG, "falcon-agent-5.1.6.tar.gz").unwrap_err();
        assert_eq!(
            e.to_string(),
            "the signature is for \"falcon-agent-5.1.5.tar.gz\", not this file"
        );
        assert!(matches!(
            trust().admit("garbage", FILE),
            Err(SignatureError::Malformed(_))
        ));
        // Another key: `minisign -G` made a second pair.
        let other =
            TrustedKey::parse("RWQf6LRCGA9i53mlYecO4IzT51TGPpvWucNSCh1CBM0QTaLn73Y7GFO3").unwrap();
        let e = Trust::new(vec![other], true).admit(SIG, FILE).unwrap_err();
        assert_eq!(
            e.to_string(),
            "signed by key 8827838F7D404755, which is not in trustedKeys (trusted: E7620F1842B4E81F)"
        );
    }

    #[test]
    fn verify_file_streams_and_catches_changes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(FILE);
        std::fs::write(&p, b"hello\n").unwrap();
        let a = trust().admit(SIG, FILE).unwrap();
        a.verify_file(&p).unwrap();
        std::fs::write(&p, b"hellO\n").unwrap();
        let e = a.verify_file(&p).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("refusing {FILE}: the signature by key 8827838F7D404755 does not verify: the tarball or the signature's trusted comment changed after signing")
        );
        // A trusted comment edited to name another file fails the global signature.
        let forged = SIG.replace(
            "file:falcon-agent-5.1.5.tar.gz",
            "file:falcon-agent-9.9.9.tar.gz",
        );
        std::fs::write(&p, b"hello\n").unwrap();
        let a = trust().admit(&forged, "falcon-agent-9.9.9.tar.gz").unwrap();
        assert!(matches!(
            a.verify_file(&p),
            Err(ArtifactError::Signature {
                reason: SignatureError::Invalid { .. },
                ..
            })
        ));
    }
}
