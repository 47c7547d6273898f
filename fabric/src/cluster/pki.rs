//! The cluster's private PKI: one CA per cluster, and a certificate per node that it signs.
//!
//! - The CA is ECDSA P-256, `is_ca` with path length 0 (it signs node certificates only, never
//!   another CA), valid [`CA_VALIDITY_DAYS`]. Its subject's organization is the cluster id.
//! - A node certificate is ECDSA P-256, signed by the CA, with extended key usage serverAuth and
//!   clientAuth (every node both dials and accepts). Its identity is one URI SAN,
//!   `fabric-node://<cluster_id>/<node_id>` ([`node_uri`]); DNS and IP SANs name its hosts but
//!   are not what peers check.
//! - Files: `ca.pem` (0644) and `ca.key` (0600); `node-<id>.pem` (0644) and `node-<id>.key`
//!   (0600). Every file is written through `crate::files` (temp, fsync, rename or link,
//!   directory fsync). A CA is never written over an existing one: replacing a cluster's CA
//!   key would orphan every node certificate it signed.

use crate::files::{self, FileError, MODE_PUBLIC, MODE_SECRET};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// File names of the CA in its directory.
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";
/// How long a cluster CA is valid.
pub const CA_VALIDITY_DAYS: u32 = 3650;
/// Longest validity [`ClusterCa::issue_node`] gives a node certificate.
pub const NODE_VALIDITY_DAYS_MAX: u32 = CA_VALIDITY_DAYS;
/// A certificate's validity starts this long before it is made, so a peer whose clock is a
/// little behind does not see it as not yet valid.
pub const CLOCK_SKEW_MARGIN_SECS: u64 = 300;
/// The scheme of a node's identity URI.
pub const NODE_URI_SCHEME: &str = "fabric-node";
/// Longest cluster id, in bytes.
pub const CLUSTER_ID_BYTES_MAX: usize = 64;

const SECS_PER_DAY: u64 = 86_400;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
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
    #[error(transparent)]
    File(FileError),
    #[error(
        "a cluster id is 1 to {CLUSTER_ID_BYTES_MAX} bytes of ASCII letters, digits, '.', '-' \
         or '_', not {0:?}"
    )]
    BadClusterId(String),
    #[error("a node certificate's validity must be 1 to {NODE_VALIDITY_DAYS_MAX} days, not {0}")]
    BadValidity(u64),
    #[error("{path} is not a usable cluster {what}: {message}")]
    NotUsable {
        path: PathBuf,
        what: &'static str,
        message: String,
    },
    #[error("cannot parse a certificate: {0}")]
    Parse(String),
}

/// `fabric-node://<cluster_id>/<node_id>`: the URI SAN that is a node's identity.
pub fn node_uri(cluster_id: &str, node_id: u64) -> String {
    format!("{NODE_URI_SCHEME}://{cluster_id}/{node_id}")
}

/// The cluster id and node id of a node identity URI, or `None` if `uri` is not one. The node
/// id must be canonical decimal (no sign, no leading zero), so one id has one spelling.
pub fn parse_node_uri(uri: &str) -> Option<(&str, u64)> {
    let rest = uri.strip_prefix(NODE_URI_SCHEME)?.strip_prefix("://")?;
    let (cluster, id) = rest.split_once('/')?;
    if check_cluster_id(cluster).is_err()
        || id.is_empty()
        || !id.bytes().all(|b| b.is_ascii_digit())
        || (id.len() > 1 && id.starts_with('0'))
    {
        return None;
    }
    Some((cluster, id.parse().ok()?))
}

/// Refuses a cluster id that would not fit in a URI authority and a subject name as is.
pub fn check_cluster_id(id: &str) -> Result<(), PkiError> {
    let ok = !id.is_empty()
        && id.len() <= CLUSTER_ID_BYTES_MAX
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(PkiError::BadClusterId(id.into()))
    }
}

/// What a certificate says about a node, read from its DER.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFacts {
    /// Every `fabric-node://` URI SAN, parsed; URIs of that scheme that do not parse are
    /// `None` (a peer is refused unless there is exactly one, and it parses).
    pub node_uris: Vec<Option<(String, u64)>>,
    /// Validity window, seconds since the Unix epoch.
    pub not_before_unix: i64,
    pub not_after_unix: i64,
}

/// Reads the node identity URIs and validity of a certificate.
pub fn cert_facts(der: &[u8]) -> Result<CertFacts, PkiError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Parse(e.to_string()))?;
    let mut node_uris = Vec::new();
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::Parse(e.to_string()))?;
    for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
        if let x509_parser::extensions::GeneralName::URI(uri) = name {
            if uri.starts_with(NODE_URI_SCHEME) {
                node_uris.push(parse_node_uri(uri).map(|(c, n)| (c.to_string(), n)));
            }
        }
    }
    Ok(CertFacts {
        node_uris,
        not_before_unix: cert.validity().not_before.timestamp(),
        not_after_unix: cert.validity().not_after.timestamp(),
    })
}

/// A cluster's CA: its certificate and the key that signs node certificates.
pub struct ClusterCa {
    cluster_id: String,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa")
            .field("cluster_id", &self.cluster_id)
            .finish_non_exhaustive()
    }
}

fn gen_err(e: impl std::fmt::Display) -> PkiError {
    PkiError::Generate(e.to_string())
}

/// A random positive serial number of 16 bytes.
fn random_serial() -> rcgen::SerialNumber {
    let mut serial = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut serial);
    // Positive (DER integers are signed) and never zero.
    serial[0] = (serial[0] & 0x7f) | 0x01;
    rcgen::SerialNumber::from_slice(&serial)
}

/// Sets a certificate's validity window. Times are whole seconds past the Unix epoch.
fn set_validity(
    params: &mut rcgen::CertificateParams,
    not_before: SystemTime,
    not_after: SystemTime,
) {
    let since = |t: SystemTime| {
        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        Duration::from_secs(d.as_secs())
    };
    params.not_before = rcgen::date_time_ymd(1970, 1, 1) + since(not_before);
    params.not_after = rcgen::date_time_ymd(1970, 1, 1) + since(not_after);
}

impl ClusterCa {
    /// A new CA for `cluster_id`, valid from now (less [`CLOCK_SKEW_MARGIN_SECS`]) for
    /// [`CA_VALIDITY_DAYS`].
    pub fn generate(cluster_id: &str) -> Result<ClusterCa, PkiError> {
        check_cluster_id(cluster_id)?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, cluster_id);
        // A distinct name per CA: a peer holding a certificate of another CA of the same
        // cluster id is then refused as of an unknown issuer, not a bad signature.
        let mut tag = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut tag);
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("fabric cluster CA {cluster_id} {}", hex::encode(tag)),
        );
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        let now = SystemTime::now();
        set_validity(
            &mut params,
            now - Duration::from_secs(CLOCK_SKEW_MARGIN_SECS),
            now + Duration::from_secs(u64::from(CA_VALIDITY_DAYS) * SECS_PER_DAY),
        );
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
        let cert = params.self_signed(&key).map_err(gen_err)?;
        Ok(ClusterCa {
            cluster_id: cluster_id.to_string(),
            cert_der: cert.der().clone(),
            cert_pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        })
    }

    /// The CA in `cert_pem_path` with its key in `key_pem_path`. Refuses a certificate that is
    /// not a CA, has no valid cluster id, or whose key is another one.
    pub fn load(cert_pem_path: &Path, key_pem_path: &Path) -> Result<ClusterCa, PkiError> {
        let cert_pem = read_string(cert_pem_path, "read CA certificate")?;
        let key_pem = read_string(key_pem_path, "read CA key")?;
        let cert_der =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| PkiError::Pem {
                path: cert_pem_path.to_path_buf(),
                what: "certificate",
                message: e.to_string(),
            })?;
        let key = rcgen::KeyPair::from_pem(&key_pem).map_err(|e| PkiError::Pem {
            path: key_pem_path.to_path_buf(),
            what: "private key",
            message: e.to_string(),
        })?;
        let not_usable = |message: String| PkiError::NotUsable {
            path: cert_pem_path.to_path_buf(),
            what: "CA certificate",
            message,
        };
        let cluster_id = {
            let (_, cert) = x509_parser::parse_x509_certificate(&cert_der)
                .map_err(|e| not_usable(e.to_string()))?;
            let is_ca = cert
                .basic_constraints()
                .map_err(|e| not_usable(e.to_string()))?
                .is_some_and(|bc| bc.value.ca);
            if !is_ca {
                return Err(not_usable("it is not a CA (basic constraints)".into()));
            }
            if cert.public_key().raw
                != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
            {
                return Err(not_usable(format!(
                    "its key is not the one in {}",
                    key_pem_path.display()
                )));
            }
            let org = cert
                .subject()
                .iter_organization()
                .next()
                .and_then(|o| o.as_str().ok())
                .ok_or_else(|| not_usable("its subject names no cluster id".into()))?;
            check_cluster_id(org).map_err(|e| not_usable(e.to_string()))?;
            org.to_string()
        };
        let issuer = rcgen::Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|e| not_usable(e.to_string()))?;
        Ok(ClusterCa {
            cluster_id,
            cert_der,
            cert_pem,
            issuer,
        })
    }

    /// [`ClusterCa::load`] of `dir/ca.pem` and `dir/ca.key`.
    pub fn load_dir(dir: &Path) -> Result<ClusterCa, PkiError> {
        ClusterCa::load(&dir.join(CA_CERT_FILE), &dir.join(CA_KEY_FILE))
    }

    /// Writes `dir/ca.key` (0600) then `dir/ca.pem` (0644), creating `dir` (0700) if missing.
    /// Refuses (`AlreadyExists`, nothing changed) if either exists: a cluster's CA is never
    /// replaced by accident. Returns the certificate's and the key's paths.
    pub fn save(&self, dir: &Path) -> Result<(PathBuf, PathBuf), PkiError> {
        files::create_dir_private(dir).map_err(PkiError::File)?;
        let (cert, key) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
        if cert.exists() {
            return Err(PkiError::File(FileError {
                op: "create",
                path: cert,
                source: std::io::ErrorKind::AlreadyExists.into(),
            }));
        }
        let secret = self.issuer.key().serialize_pem();
        files::write_new(&key, secret.as_bytes(), MODE_SECRET).map_err(PkiError::File)?;
        files::write_new(&cert, self.cert_pem.as_bytes(), MODE_PUBLIC).map_err(PkiError::File)?;
        Ok((cert, key))
    }

    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// The CA certificate (DER): every node's only trust root.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A certificate for node `node_id`, valid from now (less [`CLOCK_SKEW_MARGIN_SECS`]) for
    /// `validity_days` (1 to [`NODE_VALIDITY_DAYS_MAX`]). `hosts` become IP SANs (those that
    /// parse as addresses) or DNS SANs.
    pub fn issue_node(
        &self,
        node_id: u64,
        hosts: &[String],
        validity_days: u32,
    ) -> Result<NodeCert, PkiError> {
        if validity_days == 0 || validity_days > NODE_VALIDITY_DAYS_MAX {
            return Err(PkiError::BadValidity(validity_days.into()));
        }
        let now = SystemTime::now();
        self.issue_node_window(
            node_id,
            hosts,
            now - Duration::from_secs(CLOCK_SKEW_MARGIN_SECS),
            now + Duration::from_secs(u64::from(validity_days) * SECS_PER_DAY),
        )
    }

    /// [`ClusterCa::issue_node`] with an explicit validity window (which may lie in the past or
    /// the future: tests issue expired and not-yet-valid certificates this way).
    pub fn issue_node_window(
        &self,
        node_id: u64,
        hosts: &[String],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<NodeCert, PkiError> {
        let span = not_after
            .duration_since(not_before)
            .map_err(|_| PkiError::BadValidity(0))?;
        if span.as_secs() > u64::from(NODE_VALIDITY_DAYS_MAX) * SECS_PER_DAY + SECS_PER_DAY {
            return Err(PkiError::BadValidity(span.as_secs() / SECS_PER_DAY));
        }
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, self.cluster_id.as_str());
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("fabric node {node_id}"));
        let uri = node_uri(&self.cluster_id, node_id);
        params.subject_alt_names.push(rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from(uri).map_err(gen_err)?,
        ));
        for host in hosts {
            let san = match host.parse::<std::net::IpAddr>() {
                Ok(ip) => rcgen::SanType::IpAddress(ip),
                Err(_) => rcgen::SanType::DnsName(
                    rcgen::string::Ia5String::try_from(host.as_str()).map_err(gen_err)?,
                ),
            };
            if !params.subject_alt_names.contains(&san) {
                params.subject_alt_names.push(san);
            }
        }
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        set_validity(&mut params, not_before, not_after);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(gen_err)?;
        Ok(NodeCert {
            cluster_id: self.cluster_id.clone(),
            node_id,
            cert_der: cert.der().clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            key_der: key.serialize_der(),
        })
    }
}

/// A node certificate just issued, with its key.
pub struct NodeCert {
    pub cluster_id: String,
    pub node_id: u64,
    pub cert_der: CertificateDer<'static>,
    pub cert_pem: String,
    key_pem: String,
    /// PKCS#8.
    key_der: Vec<u8>,
}

impl std::fmt::Debug for NodeCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCert")
            .field("cluster_id", &self.cluster_id)
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

/// `node-<id>.pem` and `node-<id>.key` in `dir`.
pub fn node_files(dir: &Path, node_id: u64) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("node-{node_id}.pem")),
        dir.join(format!("node-{node_id}.key")),
    )
}

impl NodeCert {
    /// Writes `dir/node-<id>.key` (0600) then `dir/node-<id>.pem` (0644), each replaced whole
    /// (a node's certificate is renewed in place), creating `dir` (0700) if missing. Returns
    /// the certificate's and the key's paths.
    pub fn save(&self, dir: &Path) -> Result<(PathBuf, PathBuf), PkiError> {
        files::create_dir_private(dir).map_err(PkiError::File)?;
        let (cert, key) = node_files(dir, self.node_id);
        files::write_atomic(&key, self.key_pem.as_bytes(), MODE_SECRET).map_err(PkiError::File)?;
        files::write_atomic(&cert, self.cert_pem.as_bytes(), MODE_PUBLIC)
            .map_err(PkiError::File)?;
        Ok((cert, key))
    }

    /// This certificate as the identity a node presents.
    pub fn identity(&self) -> NodeIdentity {
        NodeIdentity {
            cluster_id: self.cluster_id.clone(),
            node_id: self.node_id,
            chain: vec![self.cert_der.clone()],
            key: PrivateKeyDer::Pkcs8(self.key_der.clone().into()),
        }
    }
}

/// What a node presents to its peers: its certificate chain (leaf first), key, and the ids its
/// certificate names.
pub struct NodeIdentity {
    pub cluster_id: String,
    pub node_id: u64,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for NodeIdentity {
    fn clone(&self) -> NodeIdentity {
        NodeIdentity {
            cluster_id: self.cluster_id.clone(),
            node_id: self.node_id,
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("cluster_id", &self.cluster_id)
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

impl NodeIdentity {
    /// The identity in `cert_path` (PEM, leaf first) and `key_path` (PEM). Refuses a chain
    /// whose key is another one, or whose leaf lacks exactly one node identity URI.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<NodeIdentity, PkiError> {
        let pem_err = |path: &Path, what, e: rustls::pki_types::pem::Error| PkiError::Pem {
            path: path.to_path_buf(),
            what,
            message: e.to_string(),
        };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
            .map_err(|e| pem_err(cert_path, "certificate", e))?
            .collect::<Result<_, _>>()
            .map_err(|e| pem_err(cert_path, "certificate", e))?;
        let Some(leaf) = chain.first() else {
            return Err(PkiError::Pem {
                path: cert_path.to_path_buf(),
                what: "certificate",
                message: "no CERTIFICATE section".into(),
            });
        };
        let key = PrivateKeyDer::from_pem_file(key_path)
            .map_err(|e| pem_err(key_path, "private key", e))?;
        let not_usable = |message: String| PkiError::NotUsable {
            path: cert_path.to_path_buf(),
            what: "node certificate",
            message,
        };
        let provider = rustls::crypto::ring::default_provider();
        rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider)
            .map_err(|e| not_usable(format!("with key {}: {e}", key_path.display())))?;
        let facts = cert_facts(leaf).map_err(|e| not_usable(e.to_string()))?;
        let (cluster_id, node_id) = match facts.node_uris.as_slice() {
            [Some((c, n))] => (c.clone(), *n),
            _ => {
                return Err(not_usable(format!(
                    "it needs exactly one {NODE_URI_SCHEME}://<cluster>/<node> URI SAN"
                )))
            }
        };
        Ok(NodeIdentity {
            cluster_id,
            node_id,
            chain,
            key,
        })
    }

    /// [`NodeIdentity::load`] of `dir/node-<id>.pem` and `dir/node-<id>.key`.
    pub fn load_dir(dir: &Path, node_id: u64) -> Result<NodeIdentity, PkiError> {
        let (cert, key) = node_files(dir, node_id);
        let id = NodeIdentity::load(&cert, &key)?;
        if id.node_id != node_id {
            return Err(PkiError::NotUsable {
                path: cert,
                what: "node certificate",
                message: format!("it names node {}, not {node_id}", id.node_id),
            });
        }
        Ok(id)
    }
}

fn read_string(path: &Path, what: &'static str) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Reads the one certificate (PEM) in `path`: a cluster CA's, as a node that holds only the
/// certificate (not the CA key) loads it to trust its peers.
pub fn load_ca_cert(path: &Path) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_file(path).map_err(|e| PkiError::Pem {
        path: path.to_path_buf(),
        what: "CA certificate",
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn node_uris_parse_only_in_their_canonical_form() {
        // Proves node identity URIs round-trip and near misses are not identities.
        assert_eq!(node_uri("prod-1", 7), "fabric-node://prod-1/7");
        assert_eq!(
            parse_node_uri("fabric-node://prod-1/7"),
            Some(("prod-1", 7))
        );
        assert_eq!(
            parse_node_uri(&node_uri("c", u64::MAX)),
            Some(("c", u64::MAX))
        );
        for bad in [
            "fabric-nodes://c/1",
            "https://c/1",
            "fabric-node://c/",
            "fabric-node://c/01",
            "fabric-node://c/+1",
            "fabric-node://c/1/2",
            "fabric-node:///1",
            "fabric-node://c d/1",
            "fabric-node://c/18446744073709551616",
        ] {
            assert_eq!(parse_node_uri(bad), None, "{bad}");
        }
        assert!(check_cluster_id("").is_err());
        assert!(check_cluster_id(&"a".repeat(CLUSTER_ID_BYTES_MAX + 1)).is_err());
        assert!(check_cluster_id("a/b").is_err());
    }

    #[test]
    fn a_ca_saves_and_loads_back_and_still_signs_certificates_peers_accept() {
        // Proves CA generate/save/load round-trips, key 0600, a loaded CA still issues valid certs.
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::generate("alpha").unwrap();
        let (cert_path, key_path) = ca.save(&dir.path().join("ca")).unwrap();
        assert_eq!(mode_of(&key_path), 0o600);
        assert_eq!(mode_of(&cert_path), 0o644);
        assert_eq!(mode_of(&dir.path().join("ca")), 0o700);
        let loaded = ClusterCa::load(&cert_path, &key_path).unwrap();
        assert_eq!(loaded.cluster_id(), "alpha");
        assert_eq!(loaded.cert_der(), ca.cert_der());
        assert_eq!(load_ca_cert(&cert_path).unwrap(), *ca.cert_der());

        let node = loaded
            .issue_node(3, &["127.0.0.1".into(), "node3.example".into()], 30)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let parsed = rustls::server::ParsedCertificate::try_from(&node.cert_der).unwrap();
        let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &[],
            rustls::pki_types::UnixTime::now(),
            algs.all,
        )
        .unwrap();

        // A second save never replaces the CA.
        let e = ca.save(&dir.path().join("ca")).unwrap_err();
        assert!(matches!(&e, PkiError::File(f) if f.kind() == std::io::ErrorKind::AlreadyExists));
    }

    #[test]
    fn a_node_certificate_saves_and_loads_back_as_an_identity() {
        // Proves node cert issue/save/load round-trips ids from the URI SAN, key 0600, validity.
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::generate("beta").unwrap();
        let node = ca.issue_node(42, &["localhost".into()], 10).unwrap();
        let (cert_path, key_path) = node.save(dir.path()).unwrap();
        assert_eq!(cert_path, dir.path().join("node-42.pem"));
        assert_eq!(mode_of(&key_path), 0o600);
        assert_eq!(mode_of(&cert_path), 0o644);
        let id = NodeIdentity::load_dir(dir.path(), 42).unwrap();
        assert_eq!((id.cluster_id.as_str(), id.node_id), ("beta", 42));
        assert_eq!(id.chain, vec![node.cert_der.clone()]);
        let facts = cert_facts(&node.cert_der).unwrap();
        assert_eq!(facts.node_uris, vec![Some(("beta".to_string(), 42))]);
        let days = (facts.not_after_unix - facts.not_before_unix) as u64 / SECS_PER_DAY;
        assert_eq!(days, 10, "{facts:?}");
        // Asked for another node id, the files are refused.
        std::fs::copy(&cert_path, dir.path().join("node-43.pem")).unwrap();
        std::fs::copy(&key_path, dir.path().join("node-43.key")).unwrap();
        assert!(NodeIdentity::load_dir(dir.path(), 43).is_err());
    }

    #[test]
    fn mismatched_or_wrong_files_are_refused_by_name() {
        // Proves mismatched keys, a node cert as CA, bad validity or cluster ids are refused.
        let dir = tempfile::tempdir().unwrap();
        let a = ClusterCa::generate("c1").unwrap();
        let b = ClusterCa::generate("c1").unwrap();
        let (a_cert, _) = a.save(&dir.path().join("a")).unwrap();
        let (_, b_key) = b.save(&dir.path().join("b")).unwrap();
        assert!(matches!(
            ClusterCa::load(&a_cert, &b_key),
            Err(PkiError::NotUsable { .. })
        ));
        let n1 = a.issue_node(1, &[], 1).unwrap();
        let n2 = a.issue_node(2, &[], 1).unwrap();
        let (n1_cert, n1_key) = n1.save(dir.path()).unwrap();
        let (_, n2_key) = n2.save(dir.path()).unwrap();
        assert!(matches!(
            ClusterCa::load(&n1_cert, &n1_key),
            Err(PkiError::NotUsable { .. })
        ));
        assert!(matches!(
            NodeIdentity::load(&n1_cert, &n2_key),
            Err(PkiError::NotUsable { .. })
        ));
        assert!(matches!(
            a.issue_node(1, &[], 0),
            Err(PkiError::BadValidity(0))
        ));
        assert!(a.issue_node(1, &[], NODE_VALIDITY_DAYS_MAX + 1).is_err());
        assert!(matches!(
            ClusterCa::generate("no spaces"),
            Err(PkiError::BadClusterId(_))
        ));
    }
}
