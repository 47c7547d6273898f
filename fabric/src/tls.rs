//! The node's TLS identity (for QUIC, and `wss://` where enabled), and the client's ways of
//! trusting it.
//!
//! With no certificate configured, the first start generates a self-signed one (ECDSA P-256,
//! a distinct common name per certificate: OpenSSL-based peers reject a leaf whose issuer and
//! subject are the default name as self-signed-by-someone-else) and keeps it in
//! `data_dir/tls/`; every start prints its SHA-256 fingerprint, which clients pin.
//! `--tls-cert`/`--tls-key` use real certificates (PEM) instead.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The ALPN protocol id of Fabric's QUIC transport. A client that offers anything else is
/// refused in the handshake.
pub const ALPN: &[u8] = b"fabric/1";
const CERT_FILE: &str = "cert.pem";
const KEY_FILE: &str = "key.pem";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no usable {what} (PEM): {message}")]
    Pem {
        path: PathBuf,
        what: &'static str,
        message: String,
    },
    #[error("cannot generate a certificate: {0}")]
    Generate(String),
    #[error("TLS configuration refused: {0}")]
    Config(String),
    #[error(transparent)]
    File(crate::files::FileError),
    #[error(
        "a certificate pin is 32 bytes of SHA-256 in hex (64 digits, colons allowed), not {0:?}"
    )]
    BadPin(String),
}

/// A certificate chain and its key.
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// Where the certificate came from (for the log line).
    pub source: PathBuf,
}

impl Identity {
    /// SHA-256 of the leaf certificate (DER): what clients pin.
    pub fn fingerprint(&self) -> [u8; 32] {
        fingerprint(&self.chain[0])
    }
}

pub fn fingerprint(cert: &CertificateDer<'_>) -> [u8; 32] {
    Sha256::digest(cert.as_ref()).into()
}

/// `ab:cd:…` for people; [`parse_pin`] takes it back (with or without colons).
pub fn fingerprint_hex(f: &[u8; 32]) -> String {
    f.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn parse_pin(s: &str) -> Result<[u8; 32], TlsError> {
    let digits: String = s.chars().filter(|c| *c != ':').collect();
    let bytes = hex::decode(&digits).map_err(|_| TlsError::BadPin(s.into()))?;
    bytes.try_into().map_err(|_| TlsError::BadPin(s.into()))
}

/// The configured certificate, or the data dir's generated one (made on first use).
///
/// A configured certificate that cannot be used is an error. A generated one that cannot be
/// used (empty or half-written after a power loss under an older version, its key missing or
/// not matching) is made anew, with a warning: nothing but this node depends on it, and
/// clients that pinned the old fingerprint must pin the new one (printed at start).
pub fn load_or_generate(
    cert: Option<&Path>,
    key: Option<&Path>,
    data_dir: &Path,
    hosts: &[String],
) -> Result<Identity, TlsError> {
    if let (Some(cert), Some(key)) = (cert, key) {
        return load(cert, key);
    }
    let dir = data_dir.join("tls");
    let (cert_path, key_path) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
    if cert_path.exists() || key_path.exists() {
        match load(&cert_path, &key_path) {
            Ok(id) => return Ok(id),
            Err(e) => tracing::warn!(
                dir = %dir.display(),
                error = %e,
                "the generated TLS certificate is unusable; generating a new one (clients that \
                 pinned the old fingerprint must pin the new one)"
            ),
        }
    }
    generate(&dir, &cert_path, &key_path, hosts)?;
    load(&cert_path, &key_path)
}

fn load(cert: &Path, key: &Path) -> Result<Identity, TlsError> {
    let pem_err = |path: &Path, what, e: rustls::pki_types::pem::Error| TlsError::Pem {
        path: path.to_path_buf(),
        what,
        message: e.to_string(),
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| pem_err(cert, "certificate", e))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem_err(cert, "certificate", e))?;
    if chain.is_empty() {
        return Err(TlsError::Pem {
            path: cert.to_path_buf(),
            what: "certificate",
            message: "no CERTIFICATE section".into(),
        });
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_err(key, "private key", e))?;
    // A certificate whose key is another one (or unreadable) would fail every handshake:
    // refuse it now, naming both files.
    rustls::sign::CertifiedKey::from_der(chain.clone(), key_der.clone_key(), &provider()).map_err(
        |e| TlsError::Pem {
            path: cert.to_path_buf(),
            what: "certificate and key pair",
            message: format!("with key {}: {e}", key.display()),
        },
    )?;
    Ok(Identity {
        chain,
        key: key_der,
        source: cert.to_path_buf(),
    })
}

fn generate(dir: &Path, cert: &Path, key: &Path, hosts: &[String]) -> Result<(), TlsError> {
    // 0700, and its entry fsynced: the key file inside must survive a power loss.
    crate::files::create_dir_private(dir).map_err(TlsError::File)?;
    let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    for h in hosts {
        if !names.contains(h) {
            names.push(h.clone());
        }
    }
    let mut params =
        rcgen::CertificateParams::new(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    let mut id = [0u8; 8];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut id);
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("fabric node {}", hex::encode(id)),
    );
    let signing = rcgen::KeyPair::generate().map_err(|e| TlsError::Generate(e.to_string()))?;
    let made = params
        .self_signed(&signing)
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    // Each file is replaced whole (temp, fsync, rename, directory fsync), the key first. A
    // crash between the two leaves a key that does not match the old certificate, or no
    // certificate: `load` refuses both, and the next start generates a fresh pair.
    let secret = signing.serialize_pem();
    crate::files::write_atomic(key, secret.as_bytes(), crate::files::MODE_SECRET)
        .map_err(TlsError::File)?;
    crate::files::write_atomic(cert, made.pem().as_bytes(), crate::files::MODE_PUBLIC)
        .map_err(TlsError::File)?;
    Ok(())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls server side: TLS 1.3 (QUIC requires it) offering `alpn` (`fabric/1` for QUIC,
/// `http/1.1` for HTTPS and `wss://`).
pub fn server_config(id: &Identity, alpn: &[u8]) -> Result<rustls::ServerConfig, TlsError> {
    let mut c = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(id.chain.clone(), id.key.clone_key())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    c.alpn_protocols = vec![alpn.to_vec()];
    Ok(c)
}

/// ALPN of HTTPS and `wss://` on the node's HTTP port (served by `listener.rs`).
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// How a client decides to trust the node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Trust {
    /// The leaf certificate's SHA-256 must be this (the fingerprint a node prints).
    Pin([u8; 32]),
    /// Certificates (PEM) to trust as roots, e.g. the node's own `cert.pem` or a private CA.
    Roots(Vec<u8>),
    /// No way to trust anything was given: connecting fails with a clear error.
    #[default]
    Unset,
}

/// The rustls client side for `trust`, offering `alpn`.
pub fn client_config(trust: &Trust, alpn: &[u8]) -> Result<rustls::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut c =
        match trust {
            Trust::Pin(pin) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinVerifier {
                    pin: *pin,
                    provider: provider(),
                }))
                .with_no_client_auth(),
            Trust::Roots(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(pem) {
                    let cert = cert.map_err(|e| TlsError::Config(format!("bad root PEM: {e}")))?;
                    roots
                        .add(cert)
                        .map_err(|e| TlsError::Config(format!("bad root certificate: {e}")))?;
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            Trust::Unset => return Err(TlsError::Config(
                "no way to trust the node: give a certificate pin (the SHA-256 fingerprint the \
                 node prints) or root certificates"
                    .into(),
            )),
        };
    c.alpn_protocols = vec![alpn.to_vec()];
    Ok(c)
}

/// Trusts exactly one leaf certificate, by its SHA-256, whatever its name or issuer; the
/// handshake signature is still verified, so only the holder of its key passes.
#[derive(Debug)]
struct PinVerifier {
    pin: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if fingerprint(end_entity) == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
