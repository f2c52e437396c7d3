//! The `tls` listener's certificate: a certificate chain and its private key read from
//! PEM files, held by a resolver whose pair a reload replaces. A handshake takes the pair
//! current when it starts; connections already open keep theirs, so a reload drops none.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};

/// Why a certificate and key pair cannot be used; names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: not PEM: {message}", path.display())]
    Pem { path: PathBuf, message: String },
    #[error("{}: no PEM private key (PKCS#8, PKCS#1 or SEC1) in it", path.display())]
    NoKey { path: PathBuf },
    #[error("{}: unusable private key: {message}", path.display())]
    Key { path: PathBuf, message: String },
    #[error("{}: unusable certificate: {message}", path.display())]
    Certificate { path: PathBuf, message: String },
    #[error("{} is not the private key of the certificate in {}", key.display(), cert.display())]
    Mismatch { cert: PathBuf, key: PathBuf },
}

impl TlsError {
    /// The file at fault (the key file for a mismatch).
    pub fn path(&self) -> &Path {
        match self {
            TlsError::Read { path, .. }
            | TlsError::NoCertificate { path }
            | TlsError::Pem { path, .. }
            | TlsError::NoKey { path }
            | TlsError::Key { path, .. }
            | TlsError::Certificate { path, .. } => path,
            TlsError::Mismatch { key, .. } => key,
        }
    }
}

/// The crypto provider of every TLS connection of ops-meta (ring, as the HTTP client's).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads the certificate chain at `cert` (the server's certificate first, then any
/// intermediates) and the private key at `key`, and checks that they belong together.
pub fn load_pair(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let cert_pem = read(cert)?;
    let key_pem = read(key)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: cert.to_path_buf(),
            message: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.to_path_buf(),
        });
    }
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: key.to_path_buf(),
        },
        e => TlsError::Pem {
            path: key.to_path_buf(),
            message: e.to_string(),
        },
    })?;
    let signing = provider()
        .key_provider
        .load_private_key(private)
        .map_err(|e| TlsError::Key {
            path: key.to_path_buf(),
            message: e.to_string(),
        })?;
    let pair = CertifiedKey::new(chain, signing);
    match pair.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(TlsError::Mismatch {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
            })
        }
        Err(e) => {
            return Err(TlsError::Certificate {
                path: cert.to_path_buf(),
                message: e.to_string(),
            })
        }
    }
    Ok(Arc::new(pair))
}

/// The SHA-256 of the server's certificate (DER), as `openssl x509 -fingerprint -sha256`
/// prints it: what the log names a certificate by.
pub fn fingerprint(pair: &CertifiedKey) -> String {
    let der = pair.cert.first().map(|c| c.as_ref()).unwrap_or_default();
    let mut out = String::with_capacity(95);
    for (i, b) in Sha256::digest(der).iter().enumerate() {
        if i > 0 {
            out.push(':');
        }
        let _ = write!(out, "{b:02X}");
    }
    out
}

/// The pair handshakes get; empty until one is set (handshakes then fail).
#[derive(Debug, Default)]
pub struct Certs {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl Certs {
    /// Makes `pair` the one new handshakes get.
    pub fn set(&self, pair: Arc<CertifiedKey>) {
        *self.current.write() = Some(pair);
    }

    /// The pair new handshakes get.
    pub fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.current.read().clone()
    }
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

/// The server side of the `tls` listener: TLS 1.2 and 1.3, HTTP/1.1 only, the pair from
/// `certs` at each handshake.
pub fn server_config(certs: Arc<Certs>) -> Arc<rustls::ServerConfig> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_no_client_auth()
        .with_cert_resolver(certs);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}
