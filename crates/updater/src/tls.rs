//! The trust roots of every HTTPS client of the updater: the heartbeat, the BootAgent
//! calls, the tarball, `.md5`, `.sha256` and `.minisig` downloads and the self-upgrade.
//!
//! - `tlsCaFile` set: its certificates are the only roots. A server whose certificate
//!   does not chain to one of them is refused, whatever public CA signed it.
//! - Otherwise the system's roots: the OS trust store as OpenSSL finds it (the files named
//!   by `SSL_CERT_FILE` / `SSL_CERT_DIR`, else the distribution's bundle such as
//!   `/etc/ssl/certs/ca-certificates.crt`), read once per process. A system without one
//!   falls back to the Mozilla roots compiled into the binary, with a warning.
//! - `tlsInsecure`: no certificate is checked at all (every round logs a warning).

use std::path::Path;
use std::sync::OnceLock;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// Reads the CA certificates of `path` (PEM, one or more), each checked to be usable as a
/// trust anchor; their DER. The message names the file.
pub fn read_ca_file(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it",
            path.display()
        ));
    }
    let mut store = rustls::RootCertStore::empty();
    for (i, c) in certs.iter().enumerate() {
        store.add(c.clone()).map_err(|e| {
            format!(
                "{}: certificate {} of {} is unusable: {e}",
                path.display(),
                i + 1,
                certs.len()
            )
        })?;
    }
    Ok(certs.into_iter().map(|c| c.as_ref().to_vec()).collect())
}

/// The OS trust store's certificates that parse, read once; empty when there is none.
fn system_roots() -> &'static [Vec<u8>] {
    static ROOTS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::warn!(error = %e, "reading the system's trust roots");
        }
        let mut store = rustls::RootCertStore::empty();
        let roots: Vec<Vec<u8>> = found
            .certs
            .into_iter()
            .filter(|c| store.add(c.clone()).is_ok())
            .map(|c| c.as_ref().to_vec())
            .collect();
        if roots.is_empty() {
            tracing::warn!(
                "no system trust roots found (SSL_CERT_FILE, SSL_CERT_DIR, /etc/ssl); using the Mozilla roots built into ops-updater"
            );
        } else {
            tracing::debug!(roots = roots.len(), "system trust roots loaded");
        }
        roots
    })
}

/// Sets the trust of an HTTPS client: `ca` (the DER of `tlsCaFile`'s certificates) when
/// not empty, else the system's roots; `insecure` (`tlsInsecure`) checks nothing.
pub fn configure(
    mut b: reqwest::ClientBuilder,
    ca: &[Vec<u8>],
    insecure: bool,
) -> reqwest::ClientBuilder {
    if insecure {
        return b.danger_accept_invalid_certs(true);
    }
    let roots = if ca.is_empty() { system_roots() } else { ca };
    if roots.is_empty() {
        // reqwest's own: the webpki-roots bundle.
        return b;
    }
    b = b.tls_built_in_root_certs(false);
    for der in roots {
        if let Ok(c) = reqwest::Certificate::from_der(der) {
            b = b.add_root_certificate(c);
        }
    }
    b
}

/// The warning every round logs while `tlsInsecure` is on.
pub fn warn_insecure(insecure: bool) {
    if insecure {
        tracing::warn!(
            "tlsInsecure is true: the server's certificate is not checked; anyone on the path can pose as it (set tlsCaFile instead)"
        );
    }
}
