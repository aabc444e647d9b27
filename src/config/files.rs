//! The settings read from files: the room password (`--password-file`)
//! and the server's TLS identity (`--tls-cert`, `--tls-key`), with what
//! reading them means. Reading the identity is here, not in the TLS
//! transport, so that [`Config::validate`](super::Config::validate) can
//! stop a start on a bad file with its reason; the transport reads it again
//! on every SIGHUP.

use std::fmt;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

/// The room password. Its `Debug` output does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(std::sync::Arc<[u8]>);

/// The longest password accepted: it is read like a name, as one short line.
pub(crate) const MAX_PASSWORD: usize = 1024;

impl Password {
    pub fn new(password: impl Into<Vec<u8>>) -> Password {
        Password(password.into().into())
    }

    /// The first line of the file at `path`, without its line ending.
    pub fn from_file(path: &std::path::Path) -> std::io::Result<Password> {
        let text = std::fs::read(path)?;
        let line = text.split(|&byte| byte == b'\n').next().unwrap_or_default();
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        Ok(Password::new(line))
    }

    /// Compares in constant time for a given length.
    pub(crate) fn matches(&self, attempt: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        bool::from(self.0.ct_eq(attempt))
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(..)")
    }
}

/// The PEM files of the server's TLS identity. They are read at start and
/// again on every SIGHUP, so a renewed certificate is picked up without a
/// restart.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: std::path::PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: std::path::PathBuf,
}

impl TlsFiles {
    /// The certificate chain at `cert` and the key at `key`.
    pub fn new(
        cert: impl Into<std::path::PathBuf>,
        key: impl Into<std::path::PathBuf>,
    ) -> TlsFiles {
        TlsFiles {
            cert: cert.into(),
            key: key.into(),
        }
    }

    /// Reads the certificate chain and key into a server configuration.
    pub(crate) fn load(&self) -> Result<Arc<ServerConfig>, String> {
        let certs = CertificateDer::pem_file_iter(&self.cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|err| format!("--tls-cert {}: {err}", self.cert.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "--tls-cert {}: no certificate in it (expected PEM `BEGIN CERTIFICATE` blocks)",
                self.cert.display()
            ));
        }
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .map_err(|err| format!("--tls-key {}: {err}", self.key.display()))?;
        let config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|err| err.to_string())?
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .map_err(|err| {
                    format!(
                        "--tls-cert {} with --tls-key {}: {err}",
                        self.cert.display(),
                        self.key.display()
                    )
                })?;
        Ok(Arc::new(config))
    }
}
