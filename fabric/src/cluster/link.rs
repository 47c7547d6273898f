//! The node link: QUIC between the nodes of one cluster, mutually authenticated with the
//! cluster CA ([`super::pki`]).
//!
//! - **Who may connect.** Both sides present a node certificate and accept only one that
//!   chains to the cluster CA (the only root; no web PKI), is valid now, and carries the ALPN
//!   [`ALPN_NODE`]; the TLS stack refuses the rest with its alert as the QUIC close code
//!   (`0x100 + alert`). After the handshake both sides read the peer's node id from its
//!   `fabric-node://<cluster>/<node>` URI SAN and refuse, with an application close code
//!   ([`Refusal::close_code`]), a certificate without exactly one such URI, of another cluster,
//!   of a node outside the member set, of this node's own id, or (dialer) of another node than
//!   the one dialed. Every refusal is a [`LinkError::Refused`] on the side that refused and a
//!   [`LinkError::RefusedByPeer`] on the other, both naming the [`Refusal`].
//! - **Admission.** The dialer opens the node-level control stream (group [`CONTROL_GROUP`])
//!   and sends `Hello`; the listener, once it accepts the peer, answers `Welcome`. So a
//!   dialer refused by its peer learns why in `connect`, not at its first message.
//! - **One connection per node pair.** A node keeps the live connection of each peer. If two
//!   exist (both dialed at once, or a peer redialed), both ends keep the one dialed by the lower
//!   node id, or the newer one if the same node dialed both; the other is closed
//!   ([`CLOSE_DUPLICATE`] or [`CLOSE_REPLACED`]).
//! - **Streams.** A bidirectional stream per shard group: its first frame names the group
//!   ([`StreamHeader`]), then postcard frames, each a u32 little-endian length and that many
//!   bytes, at most `node_frame_bytes_max`. Heartbeats of all groups between two nodes go
//!   batched: the node's links fold a peer's queued heartbeats into one frame on a group of
//!   their own (`fabric_router::host::beats`).
//! - **Bounds.** Frame size, concurrent streams per connection, idle timeout, keep-alive
//!   interval and handshake time are [`LinkConfig`] fields; handshakes in progress and
//!   accepted connections waiting for the application are capped by constants.

use super::pki::{self, CertFacts, NodeIdentity};
use bytes::{Buf, BytesMut};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::Instrument;

/// The ALPN protocol id of the node link; the client transport's is `tls::ALPN` (`fabric/1`).
pub const ALPN_NODE: &[u8] = b"fabric-node/1";
/// The group id of the node-level control stream (hello, heartbeats); shard groups are below.
pub const CONTROL_GROUP: u32 = u32::MAX;
/// Bytes of a frame's length prefix.
pub const FRAME_PREFIX_BYTES: usize = 4;
/// Default largest frame (postcard bytes, without the prefix) sent or taken.
pub const NODE_FRAME_BYTES_MAX_DEFAULT: usize = 4 << 20;
/// Largest `node_frame_bytes_max` a configuration may set.
pub const NODE_FRAME_BYTES_MAX_LIMIT: usize = 64 << 20;
/// Default concurrent bidirectional streams a peer may open on one connection (shard groups
/// plus the control stream).
pub const STREAMS_PER_CONNECTION_MAX_DEFAULT: u32 = 1024;
/// Default time without packets after which a connection is gone.
pub const IDLE_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// Default keep-alive interval (well under the idle timeout).
pub const KEEP_ALIVE_INTERVAL_MS_DEFAULT: u64 = 2_000;
/// Default time for a TLS handshake plus hello/welcome, and for a stream's first frame.
pub const HANDSHAKE_TIMEOUT_MS_DEFAULT: u64 = 5_000;
/// Incoming handshakes in progress at once; more are refused at once (the peer retries).
pub const HANDSHAKES_PENDING_MAX: usize = 64;
/// Accepted (or refused) connections waiting for the application to take them.
pub const ACCEPTED_QUEUE_MAX: usize = 64;
/// Flow-control windows of one stream and of a whole connection.
const STREAM_WINDOW_BYTES: u32 = 8 << 20;
const CONNECTION_WINDOW_BYTES: u32 = 32 << 20;
/// Most bytes one read takes from a stream.
const READ_CHUNK_BYTES: usize = 256 * 1024;
/// The TLS server name a dialer sends. Not checked: identity is the URI SAN.
const SERVER_NAME: &str = "fabric-node";
/// Longest close reason sent to a peer.
const CLOSE_REASON_BYTES_MAX: usize = 120;

/// QUIC application close codes of the node link (connection close).
pub const CLOSE_NORMAL: u32 = 0;
pub const CLOSE_NO_NODE_IDENTITY: u32 = 0x4e01;
pub const CLOSE_OTHER_CLUSTER: u32 = 0x4e02;
pub const CLOSE_NOT_MEMBER: u32 = 0x4e03;
pub const CLOSE_UNEXPECTED_NODE: u32 = 0x4e04;
pub const CLOSE_SAME_NODE: u32 = 0x4e05;
pub const CLOSE_DUPLICATE: u32 = 0x4e06;
pub const CLOSE_REPLACED: u32 = 0x4e07;
pub const CLOSE_PROTOCOL: u32 = 0x4e08;
pub const CLOSE_ALPN: u32 = 0x4e09;
pub const CLOSE_CERTIFICATE_EXPIRED: u32 = 0x4e0a;
/// The sender dropped a frame for this peer without losing the connection (its queue full,
/// or a group stream failed): the connection ends so that the peers see a new one, and
/// everything that relies on in-order delivery over it (forwarded sessions) starts again.
pub const CLOSE_FRAME_DROPPED: u32 = 0x4e0b;
/// The closing node applied a committed change of the cluster's metadata that removed the
/// node it closes on: the one place a removed node learns it left ([`super::links`]).
pub const CLOSE_MEMBER_REMOVED: u32 = 0x4e0c;
/// Stream stop code: a frame over `node_frame_bytes_max` arrived on it.
pub const STOP_FRAME_TOO_LARGE: u32 = 0x4e10;
/// Stream stop code: its first frame was not a valid stream header.
pub const STOP_BAD_HEADER: u32 = 0x4e11;

/// TLS alerts (RFC 8446) the TLS stack closes a refused handshake with.
const ALERT_BAD_CERTIFICATE: u8 = 42;
const ALERT_UNSUPPORTED_CERTIFICATE: u8 = 43;
const ALERT_CERTIFICATE_EXPIRED: u8 = 45;
const ALERT_CERTIFICATE_UNKNOWN: u8 = 46;
const ALERT_UNKNOWN_CA: u8 = 48;
const ALERT_DECRYPT_ERROR: u8 = 51;
const ALERT_CERTIFICATE_REQUIRED: u8 = 116;
const ALERT_NO_APPLICATION_PROTOCOL: u8 = 120;
/// QUIC carries a TLS alert as transport error `0x100 + alert` (RFC 9001 §4.8).
const QUIC_CRYPTO_ERROR_BASE: u64 = 0x100;

/// Why a peer was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its certificate does not chain to the cluster CA: no known issuer (TLS alert
    /// unknown_ca), or an issuer of the same name whose signature does not verify, or a
    /// handshake signature its certificate's key did not make (decrypt_error).
    UnknownCa,
    /// Its certificate is expired or not yet valid (TLS alert certificate_expired).
    CertificateExpired,
    /// Another certificate problem in the handshake (no certificate, wrong key usage, …).
    BadCertificate,
    /// It offered or negotiated another ALPN than [`ALPN_NODE`].
    Alpn,
    /// Its certificate lacks exactly one well-formed `fabric-node://` URI SAN.
    NoNodeIdentity,
    /// Its certificate names another cluster id.
    OtherCluster,
    /// Its node id is not in the member set.
    NotMember,
    /// The dialer expected another node id.
    UnexpectedNode,
    /// It claims this node's own id.
    SameNodeId,
    /// A connection between the two nodes already exists and is kept instead.
    Duplicate,
    /// It broke the hello/welcome exchange.
    Protocol,
}

impl Refusal {
    /// The application close code a node link sends when it refuses a peer after the
    /// handshake (refusals inside the handshake close with the TLS alert instead).
    pub fn close_code(self) -> u32 {
        match self {
            Refusal::UnknownCa | Refusal::BadCertificate => CLOSE_PROTOCOL,
            Refusal::CertificateExpired => CLOSE_CERTIFICATE_EXPIRED,
            Refusal::Alpn => CLOSE_ALPN,
            Refusal::NoNodeIdentity => CLOSE_NO_NODE_IDENTITY,
            Refusal::OtherCluster => CLOSE_OTHER_CLUSTER,
            Refusal::NotMember => CLOSE_NOT_MEMBER,
            Refusal::UnexpectedNode => CLOSE_UNEXPECTED_NODE,
            Refusal::SameNodeId => CLOSE_SAME_NODE,
            Refusal::Duplicate => CLOSE_DUPLICATE,
            Refusal::Protocol => CLOSE_PROTOCOL,
        }
    }

    /// The refusal an application close code stands for.
    pub fn from_close_code(code: u64) -> Option<Refusal> {
        const ALL: [Refusal; 9] = [
            Refusal::CertificateExpired,
            Refusal::Alpn,
            Refusal::NoNodeIdentity,
            Refusal::OtherCluster,
            Refusal::NotMember,
            Refusal::UnexpectedNode,
            Refusal::SameNodeId,
            Refusal::Duplicate,
            Refusal::Protocol,
        ];
        ALL.into_iter().find(|r| u64::from(r.close_code()) == code)
    }

    /// The refusal a QUIC transport error code stands for, if it carries a TLS alert about
    /// the certificate or the ALPN.
    pub fn from_transport_code(code: u64) -> Option<Refusal> {
        let alert = u8::try_from(code.checked_sub(QUIC_CRYPTO_ERROR_BASE)?).ok()?;
        Some(match alert {
            ALERT_UNKNOWN_CA | ALERT_DECRYPT_ERROR => Refusal::UnknownCa,
            ALERT_CERTIFICATE_EXPIRED => Refusal::CertificateExpired,
            ALERT_NO_APPLICATION_PROTOCOL => Refusal::Alpn,
            ALERT_BAD_CERTIFICATE
            | ALERT_UNSUPPORTED_CERTIFICATE
            | ALERT_CERTIFICATE_UNKNOWN
            | ALERT_CERTIFICATE_REQUIRED => Refusal::BadCertificate,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("node link configuration refused: {0}")]
    Config(String),
    #[error("cannot bind the node link on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot read the node link's local address: {0}")]
    LocalAddr(std::io::Error),
    #[error("cannot dial {addr}: {source}")]
    Dial {
        addr: SocketAddr,
        source: quinn::ConnectError,
    },
    /// This node refused the peer.
    #[error("refused peer {peer:?}: {refusal:?} ({detail})")]
    Refused {
        /// The node id its certificate names, when that much was read.
        peer: Option<u64>,
        refusal: Refusal,
        detail: String,
    },
    /// The peer refused this node (its close code or TLS alert says why).
    #[error("the peer refused this node: {refusal:?} ({detail})")]
    RefusedByPeer { refusal: Refusal, detail: String },
    #[error("connection lost: {0}")]
    Connection(quinn::ConnectionError),
    #[error("timed out after {ms} ms waiting for {what}")]
    Timeout { what: &'static str, ms: u64 },
    #[error("a frame of {len} bytes is over node_frame_bytes_max ({max})")]
    FrameTooLarge { len: u64, max: usize },
    #[error("stream write failed: {0}")]
    Write(quinn::WriteError),
    #[error("stream read failed: {0}")]
    Read(quinn::ReadError),
    #[error("stream ended {0} bytes into a frame")]
    Truncated(usize),
    #[error("cannot encode a frame: {0}")]
    Encode(postcard::Error),
    #[error("cannot decode a frame: {0}")]
    Decode(postcard::Error),
    #[error("node link protocol: {0}")]
    Protocol(String),
}

impl LinkError {
    /// The refusal behind this error, on either side.
    pub fn refusal(&self) -> Option<Refusal> {
        match self {
            LinkError::Refused { refusal, .. } | LinkError::RefusedByPeer { refusal, .. } => {
                Some(*refusal)
            }
            _ => None,
        }
    }
}

/// Maps a connection's end to the refusal it stands for, if any.
fn connection_error(e: quinn::ConnectionError, peer: Option<u64>) -> LinkError {
    use quinn::ConnectionError as C;
    match &e {
        // This side's TLS stack refused the peer.
        C::TransportError(t) => {
            if let Some(refusal) = Refusal::from_transport_code(u64::from(t.code)) {
                return LinkError::Refused {
                    peer,
                    refusal,
                    detail: t.reason.clone(),
                };
            }
        }
        // The peer's TLS stack refused this node.
        C::ConnectionClosed(c) => {
            if let Some(refusal) = Refusal::from_transport_code(u64::from(c.error_code)) {
                return LinkError::RefusedByPeer {
                    refusal,
                    detail: String::from_utf8_lossy(&c.reason).into_owned(),
                };
            }
        }
        // The peer's node link refused this node.
        C::ApplicationClosed(c) => {
            if let Some(refusal) = Refusal::from_close_code(c.error_code.into_inner()) {
                return LinkError::RefusedByPeer {
                    refusal,
                    detail: String::from_utf8_lossy(&c.reason).into_owned(),
                };
            }
        }
        _ => {}
    }
    LinkError::Connection(e)
}

fn read_error(e: quinn::ReadError, peer: u64) -> LinkError {
    match e {
        quinn::ReadError::ConnectionLost(c) => connection_error(c, Some(peer)),
        e => LinkError::Read(e),
    }
}

fn write_error(e: quinn::WriteError, peer: u64) -> LinkError {
    match e {
        quinn::WriteError::ConnectionLost(c) => connection_error(c, Some(peer)),
        e => LinkError::Write(e),
    }
}

/// Bounds and membership of a node link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkConfig {
    /// Node ids allowed to connect (this node's own id may be among them).
    pub members: BTreeSet<u64>,
    pub node_frame_bytes_max: usize,
    pub streams_per_connection_max: u32,
    pub idle_timeout_ms: u64,
    pub keep_alive_interval_ms: u64,
    pub handshake_timeout_ms: u64,
}

impl LinkConfig {
    /// The defaults, with `members` as the member set.
    pub fn new(members: impl IntoIterator<Item = u64>) -> LinkConfig {
        LinkConfig {
            members: members.into_iter().collect(),
            node_frame_bytes_max: NODE_FRAME_BYTES_MAX_DEFAULT,
            streams_per_connection_max: STREAMS_PER_CONNECTION_MAX_DEFAULT,
            idle_timeout_ms: IDLE_TIMEOUT_MS_DEFAULT,
            keep_alive_interval_ms: KEEP_ALIVE_INTERVAL_MS_DEFAULT,
            handshake_timeout_ms: HANDSHAKE_TIMEOUT_MS_DEFAULT,
        }
    }

    pub fn validate(&self) -> Result<(), LinkError> {
        let bad = |m: String| Err(LinkError::Config(m));
        if self.node_frame_bytes_max == 0 || self.node_frame_bytes_max > NODE_FRAME_BYTES_MAX_LIMIT
        {
            return bad(format!(
                "node_frame_bytes_max must be 1 to {NODE_FRAME_BYTES_MAX_LIMIT}, not {}",
                self.node_frame_bytes_max
            ));
        }
        if self.streams_per_connection_max < 2 {
            return bad("streams_per_connection_max must be at least 2".into());
        }
        if self.idle_timeout_ms == 0 || self.idle_timeout_ms > 3_600_000 {
            return bad("idle_timeout_ms must be 1 to 3600000".into());
        }
        if self.keep_alive_interval_ms == 0 || self.keep_alive_interval_ms >= self.idle_timeout_ms {
            return bad(
                "keep_alive_interval_ms must be at least 1 and below idle_timeout_ms".into(),
            );
        }
        if self.handshake_timeout_ms == 0 || self.handshake_timeout_ms > 600_000 {
            return bad("handshake_timeout_ms must be 1 to 600000".into());
        }
        Ok(())
    }

    fn transport(&self) -> quinn::TransportConfig {
        let mut t = quinn::TransportConfig::default();
        t.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(
            // Validated: at most an hour, which fits a u32 of milliseconds.
            self.idle_timeout_ms as u32,
        ))));
        t.keep_alive_interval(Some(Duration::from_millis(self.keep_alive_interval_ms)));
        t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(self.streams_per_connection_max));
        t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
        t.stream_receive_window(quinn::VarInt::from_u32(STREAM_WINDOW_BYTES));
        t.receive_window(quinn::VarInt::from_u32(CONNECTION_WINDOW_BYTES));
        t.send_window(u64::from(CONNECTION_WINDOW_BYTES));
        t
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca_cert: &CertificateDer<'static>) -> Result<Arc<rustls::RootCertStore>, LinkError> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(ca_cert.clone())
        .map_err(|e| LinkError::Config(format!("bad cluster CA certificate: {e}")))?;
    Ok(Arc::new(roots))
}

/// The rustls server side: TLS 1.3, ALPN [`ALPN_NODE`], a client certificate required that
/// chains to `ca_cert` (the only root).
pub fn server_tls(
    identity: &NodeIdentity,
    ca_cert: &CertificateDer<'static>,
) -> Result<rustls::ServerConfig, LinkError> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(ca_cert)?, provider())
            .build()
            .map_err(|e| LinkError::Config(e.to_string()))?;
    let mut c = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| LinkError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(|e| LinkError::Config(e.to_string()))?;
    c.alpn_protocols = vec![ALPN_NODE.to_vec()];
    Ok(c)
}

/// The rustls client side: TLS 1.3, ALPN [`ALPN_NODE`], this node's certificate presented,
/// the server's verified against `ca_cert` only (its name is not checked: the node id in its
/// URI SAN is, after the handshake).
pub fn client_tls(
    identity: &NodeIdentity,
    ca_cert: &CertificateDer<'static>,
) -> Result<rustls::ClientConfig, LinkError> {
    let verifier = Arc::new(ClusterServerVerifier {
        roots: roots(ca_cert)?,
        provider: provider(),
    });
    let mut c = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| LinkError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(|e| LinkError::Config(e.to_string()))?;
    c.alpn_protocols = vec![ALPN_NODE.to_vec()];
    Ok(c)
}

/// Verifies a server certificate's chain to the cluster CA, its validity now and its
/// serverAuth usage, as web PKI does, but not its DNS name.
#[derive(Debug)]
struct ClusterServerVerifier {
    roots: Arc<rustls::RootCertStore>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for ClusterServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
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

/// What the node-link checks after the TLS handshake are given.
#[derive(Debug)]
pub struct PeerFacts<'a> {
    pub alpn: Option<&'a [u8]>,
    /// The peer's leaf certificate, read; `None` if it presented none or it did not parse.
    pub cert: Option<&'a CertFacts>,
    pub now_unix: i64,
}

/// The node id a peer proves, or why it is refused: the rules of the module docs, in order
/// ALPN, validity, URI SAN, cluster, expected id, membership, own id.
// Over 70 lines: one flat check per rule, in the documented order, each with its own message.
pub fn check_peer(
    facts: &PeerFacts<'_>,
    cluster_id: &str,
    own_id: u64,
    members: &BTreeSet<u64>,
    expected: Option<u64>,
) -> Result<u64, (Refusal, Option<u64>, String)> {
    if facts.alpn != Some(ALPN_NODE) {
        let got = facts.alpn.map(|a| String::from_utf8_lossy(a).into_owned());
        return Err((Refusal::Alpn, None, format!("negotiated ALPN {got:?}")));
    }
    let Some(cert) = facts.cert else {
        return Err((
            Refusal::NoNodeIdentity,
            None,
            "no readable certificate".into(),
        ));
    };
    if facts.now_unix < cert.not_before_unix || facts.now_unix > cert.not_after_unix {
        return Err((
            Refusal::CertificateExpired,
            None,
            format!(
                "valid {}..{} (unix seconds), now {}",
                cert.not_before_unix, cert.not_after_unix, facts.now_unix
            ),
        ));
    }
    let (cluster, node) = match cert.node_uris.as_slice() {
        [Some((c, n))] => (c.as_str(), *n),
        [] => {
            return Err((
                Refusal::NoNodeIdentity,
                None,
                "no fabric-node:// URI SAN".into(),
            ))
        }
        _ => {
            return Err((
                Refusal::NoNodeIdentity,
                None,
                "several or malformed fabric-node:// URI SANs".into(),
            ))
        }
    };
    if cluster != cluster_id {
        return Err((
            Refusal::OtherCluster,
            Some(node),
            format!("cluster {cluster:?}, not {cluster_id:?}"),
        ));
    }
    if let Some(want) = expected {
        if want != node {
            return Err((
                Refusal::UnexpectedNode,
                Some(node),
                format!("node {node}, expected {want}"),
            ));
        }
    }
    if !members.contains(&node) {
        return Err((
            Refusal::NotMember,
            Some(node),
            format!("node {node} is not a member"),
        ));
    }
    if node == own_id {
        return Err((
            Refusal::SameNodeId,
            Some(node),
            format!("node {node} is this node's own id"),
        ));
    }
    Ok(node)
}

/// The first frame of every stream: the shard group it carries, or [`CONTROL_GROUP`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamHeader {
    pub group: u32,
}

/// One group's heartbeat: its Raft term and the leader's commit index.
/// Frames of the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlFrame {
    /// The dialer's first frame.
    Hello { cluster_id: String, node_id: u64 },
    /// The listener's answer once it accepted the dialer.
    Welcome { node_id: u64 },
}

/// The sending half of a stream: length-prefixed postcard frames.
pub struct FrameSender {
    send: quinn::SendStream,
    frame_bytes_max: usize,
    node: u64,
    group: u32,
    buf: Vec<u8>,
}

impl FrameSender {
    /// Sends one frame. A value whose encoding is over `node_frame_bytes_max` is refused
    /// ([`LinkError::FrameTooLarge`]) with nothing written: the stream stays usable. Not
    /// cancel-safe (a cancelled send may leave part of a frame written).
    pub async fn send_frame<T: Serialize>(&mut self, value: &T) -> Result<(), LinkError> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf.extend_from_slice(&[0; FRAME_PREFIX_BYTES]);
        let mut buf = postcard::to_extend(value, buf).map_err(LinkError::Encode)?;
        let len = buf.len() - FRAME_PREFIX_BYTES;
        if len > self.frame_bytes_max {
            tracing::warn!(
                node = self.node,
                shard = self.group,
                len,
                max = self.frame_bytes_max,
                "refused to send a frame over node_frame_bytes_max"
            );
            // An oversize buffer is not kept: the sender holds at most a frame's worth.
            return Err(LinkError::FrameTooLarge {
                len: len as u64,
                max: self.frame_bytes_max,
            });
        }
        // Validated: node_frame_bytes_max fits a u32.
        buf[..FRAME_PREFIX_BYTES].copy_from_slice(&(len as u32).to_le_bytes());
        let sent = self
            .send
            .write_all(&buf)
            .await
            .map_err(|e| write_error(e, self.node));
        self.buf = buf;
        sent
    }

    /// Ends the stream after what was sent.
    pub fn finish(&mut self) -> Result<(), LinkError> {
        self.send
            .finish()
            .map_err(|_| LinkError::Write(quinn::WriteError::ClosedStream))
    }
}

/// The receiving half of a stream.
pub struct FrameReceiver {
    recv: quinn::RecvStream,
    buf: BytesMut,
    frame_bytes_max: usize,
    node: u64,
    group: u32,
    /// Set once a frame over the limit arrived: the stream was stopped.
    failed: bool,
}

impl FrameReceiver {
    /// The next frame, decoded; `Ok(None)` at a clean end of stream. A length prefix over
    /// `node_frame_bytes_max` is refused ([`LinkError::FrameTooLarge`]) before its bytes are
    /// read: the stream is stopped ([`STOP_FRAME_TOO_LARGE`]) and yields nothing more.
    /// Cancel-safe: what was read is kept for the next call.
    pub async fn recv_frame<T: DeserializeOwned>(&mut self) -> Result<Option<T>, LinkError> {
        match self.next_bytes().await? {
            Some(bytes) => postcard::from_bytes(&bytes)
                .map(Some)
                .map_err(LinkError::Decode),
            None => Ok(None),
        }
    }

    async fn next_bytes(&mut self) -> Result<Option<bytes::Bytes>, LinkError> {
        if self.failed {
            return Err(LinkError::Protocol(
                "the stream was stopped after an oversize frame".into(),
            ));
        }
        loop {
            if self.buf.len() >= FRAME_PREFIX_BYTES {
                let mut prefix = [0u8; FRAME_PREFIX_BYTES];
                prefix.copy_from_slice(&self.buf[..FRAME_PREFIX_BYTES]);
                let len = u32::from_le_bytes(prefix) as usize;
                if len > self.frame_bytes_max {
                    tracing::warn!(
                        node = self.node,
                        shard = self.group,
                        len,
                        max = self.frame_bytes_max,
                        "peer sent a frame over node_frame_bytes_max; stopping the stream"
                    );
                    self.failed = true;
                    self.buf = BytesMut::new();
                    let _ = self
                        .recv
                        .stop(quinn::VarInt::from_u32(STOP_FRAME_TOO_LARGE));
                    return Err(LinkError::FrameTooLarge {
                        len: len as u64,
                        max: self.frame_bytes_max,
                    });
                }
                if self.buf.len() >= FRAME_PREFIX_BYTES + len {
                    self.buf.advance(FRAME_PREFIX_BYTES);
                    return Ok(Some(self.buf.split_to(len).freeze()));
                }
            }
            // At most a frame and a chunk are ever buffered.
            match self
                .recv
                .read_chunk(READ_CHUNK_BYTES, true)
                .await
                .map_err(|e| read_error(e, self.node))?
            {
                Some(chunk) => self.buf.extend_from_slice(&chunk.bytes),
                None if self.buf.is_empty() => return Ok(None),
                None => return Err(LinkError::Truncated(self.buf.len())),
            }
        }
    }
}

/// A bidirectional stream of one shard group (or the control stream) with one peer.
pub struct GroupStream {
    pub group: u32,
    pub node: u64,
    pub sender: FrameSender,
    pub receiver: FrameReceiver,
}

impl GroupStream {
    fn new(
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        node: u64,
        group: u32,
        frame_bytes_max: usize,
    ) -> GroupStream {
        GroupStream {
            group,
            node,
            sender: FrameSender {
                send,
                frame_bytes_max,
                node,
                group,
                buf: Vec::new(),
            },
            receiver: FrameReceiver {
                recv,
                buf: BytesMut::new(),
                frame_bytes_max,
                node,
                group,
                failed: false,
            },
        }
    }

    /// Reads a peer-opened stream's header within `timeout_ms`; a bad or missing header stops
    /// the stream ([`STOP_BAD_HEADER`]).
    async fn accept(
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        node: u64,
        frame_bytes_max: usize,
        timeout_ms: u64,
    ) -> Result<GroupStream, LinkError> {
        // The group is unknown until the header is read.
        let mut s = GroupStream::new(send, recv, node, CONTROL_GROUP, frame_bytes_max);
        let header = tokio::time::timeout(
            Duration::from_millis(timeout_ms),
            s.receiver.recv_frame::<StreamHeader>(),
        )
        .await;
        let header = match header {
            Ok(Ok(Some(h))) => h,
            Ok(Err(
                e @ (LinkError::RefusedByPeer { .. }
                | LinkError::Refused { .. }
                | LinkError::Connection(_)),
            )) => return Err(e),
            other => {
                let _ = s
                    .receiver
                    .recv
                    .stop(quinn::VarInt::from_u32(STOP_BAD_HEADER));
                let _ = s
                    .sender
                    .send
                    .reset(quinn::VarInt::from_u32(STOP_BAD_HEADER));
                return Err(match other {
                    Err(_) => LinkError::Timeout {
                        what: "a stream header",
                        ms: timeout_ms,
                    },
                    Ok(Ok(None)) => LinkError::Protocol("a stream ended before its header".into()),
                    Ok(Err(e)) => e,
                    Ok(Ok(Some(_))) => unreachable!("matched above"),
                });
            }
        };
        s.group = header.group;
        s.sender.group = header.group;
        s.receiver.group = header.group;
        Ok(s)
    }

    pub async fn send_frame<T: Serialize>(&mut self, value: &T) -> Result<(), LinkError> {
        self.sender
            .send_frame(value)
            .instrument(tracing::debug_span!(
                "node_link",
                node = self.node,
                shard = self.group
            ))
            .await
    }

    pub async fn recv_frame<T: DeserializeOwned>(&mut self) -> Result<Option<T>, LinkError> {
        self.receiver
            .recv_frame()
            .instrument(tracing::debug_span!(
                "node_link",
                node = self.node,
                shard = self.group
            ))
            .await
    }

    /// The halves, for a sending and a receiving task.
    pub fn split(self) -> (FrameSender, FrameReceiver) {
        (self.sender, self.receiver)
    }
}

/// The node-level control stream of a connection (admission; it stays open with it).
pub struct ControlStream {
    stream: GroupStream,
}

impl ControlStream {
    pub fn split(self) -> (FrameSender, FrameReceiver) {
        self.stream.split()
    }
}

/// An authenticated connection to a peer node.
pub struct PeerConn {
    pub node_id: u64,
    pub connection: quinn::Connection,
    pub control: ControlStream,
    frame_bytes_max: usize,
    handshake_timeout_ms: u64,
}

impl PeerConn {
    /// Opens the stream of shard group `group` (not [`CONTROL_GROUP`]) and sends its header.
    pub async fn open_group(&self, group: u32) -> Result<GroupStream, LinkError> {
        if group == CONTROL_GROUP {
            return Err(LinkError::Protocol(
                "group u32::MAX is the control stream".into(),
            ));
        }
        let (send, recv) = self
            .connection
            .open_bi()
            .await
            .map_err(|e| connection_error(e, Some(self.node_id)))?;
        let mut s = GroupStream::new(send, recv, self.node_id, group, self.frame_bytes_max);
        s.send_frame(&StreamHeader { group }).await?;
        tracing::debug!(node = self.node_id, shard = group, "group stream opened");
        Ok(s)
    }

    /// The next group stream the peer opened. An error about one stream (bad header) leaves
    /// the connection usable: call again.
    pub async fn accept_group(&self) -> Result<GroupStream, LinkError> {
        let (send, recv) = self
            .connection
            .accept_bi()
            .await
            .map_err(|e| connection_error(e, Some(self.node_id)))?;
        let s = GroupStream::accept(
            send,
            recv,
            self.node_id,
            self.frame_bytes_max,
            self.handshake_timeout_ms,
        )
        .await?;
        if s.group == CONTROL_GROUP {
            return Err(LinkError::Protocol(
                "a second control stream was opened".into(),
            ));
        }
        tracing::debug!(
            node = self.node_id,
            shard = s.group,
            "group stream accepted"
        );
        Ok(s)
    }

    /// Closes the connection.
    pub fn close(&self) {
        self.connection
            .close(quinn::VarInt::from_u32(CLOSE_NORMAL), b"closed");
    }
}

/// A live connection of a peer, and who dialed it.
struct Live {
    conn: quinn::Connection,
    dialer: u64,
}

struct Inner {
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    cluster_id: String,
    node_id: u64,
    config: LinkConfig,
    /// Node ids allowed to connect: `config.members` at first, then as the cluster's
    /// membership changes ([`NodeLink::set_member`]).
    members: std::sync::RwLock<BTreeSet<u64>>,
    peers: Mutex<HashMap<u64, Live>>,
}

/// This node's end of the node link: one QUIC endpoint that accepts and dials.
#[derive(Clone)]
pub struct NodeLink {
    inner: Arc<Inner>,
}

impl NodeLink {
    /// Binds the link's endpoint on `addr` with `identity`, trusting `ca_cert` only.
    pub fn bind(
        addr: SocketAddr,
        identity: &NodeIdentity,
        ca_cert: &CertificateDer<'static>,
        config: LinkConfig,
    ) -> Result<NodeLink, LinkError> {
        config.validate()?;
        let transport = Arc::new(config.transport());
        let crypto =
            quinn::crypto::rustls::QuicServerConfig::try_from(server_tls(identity, ca_cert)?)
                .map_err(|e| LinkError::Config(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(transport.clone());
        let crypto =
            quinn::crypto::rustls::QuicClientConfig::try_from(client_tls(identity, ca_cert)?)
                .map_err(|e| LinkError::Config(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(transport);
        let socket =
            crate::quic::udp_socket(addr).map_err(|source| LinkError::Bind { addr, source })?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| LinkError::Bind { addr, source })?;
        Ok(NodeLink {
            inner: Arc::new(Inner {
                endpoint,
                client,
                cluster_id: identity.cluster_id.clone(),
                node_id: identity.node_id,
                members: std::sync::RwLock::new(config.members.clone()),
                config,
                peers: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, LinkError> {
        self.inner
            .endpoint
            .local_addr()
            .map_err(LinkError::LocalAddr)
    }

    pub fn node_id(&self) -> u64 {
        self.inner.node_id
    }

    /// Lets node `id` connect (a member that joined), or no longer (one that left; closing
    /// its connection is the caller's: `NodeLinks::remove_member`).
    pub fn set_member(&self, id: u64, member: bool) {
        let mut members = self
            .inner
            .members
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if member {
            members.insert(id);
        } else {
            members.remove(&id);
        }
    }

    /// Dials the node `expected_node_id` at `addr`: handshake, peer checks, then hello and
    /// welcome on the control stream, all within `handshake_timeout_ms`.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        expected_node_id: u64,
    ) -> Result<PeerConn, LinkError> {
        let inner = self.inner.clone();
        let span = tracing::info_span!("node_link_dial", node = expected_node_id, %addr);
        async move {
            let r = inner.dial(addr, expected_node_id).await;
            match &r {
                Ok(_) => tracing::info!("node link connected"),
                Err(e) => tracing::warn!(error = %e, "node link dial failed"),
            }
            r
        }
        .instrument(span)
        .await
    }

    /// Starts accepting: every incoming connection is handshaken (at most
    /// [`HANDSHAKES_PENDING_MAX`] at once), checked, and yielded, accepted or refused, by the
    /// returned [`Incoming`] (at most [`ACCEPTED_QUEUE_MAX`] waiting; the cap on handshakes
    /// covers those too). Dropping it stops accepting.
    pub fn listen(&self) -> Incoming {
        let (tx, rx) = mpsc::channel(ACCEPTED_QUEUE_MAX);
        let inner = self.inner.clone();
        let task = tokio::spawn(
            async move {
                let pending = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_PENDING_MAX));
                let mut handshakes = tokio::task::JoinSet::new();
                while let Some(incoming) = inner.endpoint.accept().await {
                    while handshakes.try_join_next().is_some() {}
                    let Ok(permit) = pending.clone().try_acquire_owned() else {
                        tracing::warn!(remote = %incoming.remote_address(),
                            "too many node link handshakes in progress; refused");
                        incoming.refuse();
                        continue;
                    };
                    let (inner, tx) = (inner.clone(), tx.clone());
                    let span = tracing::info_span!("node_link_accept", node = tracing::field::Empty,
                        remote = %incoming.remote_address());
                    handshakes.spawn(
                        async move {
                            let r = inner.accept(incoming).await;
                            match &r {
                                Ok(_) => tracing::info!("node link accepted"),
                                Err(e) => tracing::warn!(error = %e, "node link refused or failed"),
                            }
                            // The permit is held until the application takes the result, so
                            // handshakes plus undelivered connections stay within the cap.
                            let _ = tx.send(r).await;
                            drop(permit);
                        }
                        .instrument(span),
                    );
                }
            }
            .instrument(tracing::info_span!("node_link_listen")),
        );
        Incoming { rx, task }
    }

    /// Closes every connection and the endpoint.
    pub fn close(&self) {
        self.inner
            .endpoint
            .close(quinn::VarInt::from_u32(CLOSE_NORMAL), b"node link closed");
    }

    /// Waits until every connection has closed (after [`NodeLink::close`]).
    pub async fn wait_idle(&self) {
        self.inner.endpoint.wait_idle().await;
    }
}

/// Connections accepted by [`NodeLink::listen`], and refusals (already logged; the peer was
/// closed), for callers that count or test them.
pub struct Incoming {
    rx: mpsc::Receiver<Result<PeerConn, LinkError>>,
    task: tokio::task::JoinHandle<()>,
}

impl Incoming {
    /// The next accepted peer or refusal; `None` once the endpoint is closed.
    pub async fn next(&mut self) -> Option<Result<PeerConn, LinkError>> {
        self.rx.recv().await
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn truncated(reason: &str) -> &[u8] {
    let mut end = reason.len().min(CLOSE_REASON_BYTES_MAX);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason.as_bytes()[..end]
}

impl Inner {
    fn timeout_ms(&self) -> u64 {
        self.config.handshake_timeout_ms
    }

    /// The peer's node id, or a refusal (the connection closed with its code).
    fn authenticate(
        &self,
        conn: &quinn::Connection,
        expected: Option<u64>,
    ) -> Result<u64, LinkError> {
        let alpn = conn
            .handshake_data()
            .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|d| d.protocol);
        let cert = conn
            .peer_identity()
            .and_then(|p| p.downcast::<Vec<CertificateDer<'static>>>().ok())
            .and_then(|chain| chain.first().map(|leaf| pki::cert_facts(leaf)))
            .and_then(Result::ok);
        let facts = PeerFacts {
            alpn: alpn.as_deref(),
            cert: cert.as_ref(),
            now_unix: crate::now_ms() as i64 / 1000,
        };
        let members = self.members.read().unwrap_or_else(|p| p.into_inner());
        let checked = check_peer(&facts, &self.cluster_id, self.node_id, &members, expected);
        drop(members);
        checked.map_err(|(refusal, peer, detail)| {
            conn.close(
                quinn::VarInt::from_u32(refusal.close_code()),
                truncated(&detail),
            );
            LinkError::Refused {
                peer,
                refusal,
                detail,
            }
        })
    }

    /// Whether another live connection to `peer` than `conn` is recorded.
    fn superseded(&self, peer: u64, conn: &quinn::Connection) -> bool {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.get(&peer).is_some_and(|live| {
            live.conn.stable_id() != conn.stable_id() && live.conn.close_reason().is_none()
        })
    }

    /// Records `conn` as the live connection to `peer`, unless one that wins is live (module
    /// docs); a losing connection is closed.
    fn register(&self, peer: u64, conn: &quinn::Connection, dialed: bool) -> Result<(), LinkError> {
        let dialer = if dialed { self.node_id } else { peer };
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = peers.get(&peer) {
            let live =
                old.conn.close_reason().is_none() && old.conn.stable_id() != conn.stable_id();
            if live && old.dialer < dialer {
                let detail = format!("a connection dialed by node {} is kept", old.dialer);
                drop(peers);
                conn.close(quinn::VarInt::from_u32(CLOSE_DUPLICATE), truncated(&detail));
                return Err(LinkError::Refused {
                    peer: Some(peer),
                    refusal: Refusal::Duplicate,
                    detail,
                });
            }
            if live {
                tracing::info!(
                    node = peer,
                    "a newer connection replaces the node's old one"
                );
                old.conn
                    .close(quinn::VarInt::from_u32(CLOSE_REPLACED), b"replaced");
            }
        }
        peers.insert(
            peer,
            Live {
                conn: conn.clone(),
                dialer,
            },
        );
        Ok(())
    }

    async fn dial(&self, addr: SocketAddr, expected: u64) -> Result<PeerConn, LinkError> {
        let ms = self.timeout_ms();
        let connecting = self
            .endpoint
            .connect_with(self.client.clone(), addr, SERVER_NAME)
            .map_err(|source| LinkError::Dial { addr, source })?;
        let conn = self.handshake(connecting, Some(expected)).await?;
        let node = self.authenticate(&conn, Some(expected))?;
        self.register(node, &conn, true)?;
        match tokio::time::timeout(Duration::from_millis(ms), self.hello(&conn, node)).await {
            Ok(Ok(control)) => Ok(self.peer_conn(node, conn, control)),
            Ok(Err(e)) => {
                conn.close(quinn::VarInt::from_u32(CLOSE_PROTOCOL), b"hello failed");
                // Both nodes dialed at once and this node kept the other connection.
                if self.superseded(node, &conn) {
                    return Err(LinkError::Refused {
                        peer: Some(node),
                        refusal: Refusal::Duplicate,
                        detail: "another connection with the node is kept".into(),
                    });
                }
                Err(e)
            }
            Err(_) => {
                conn.close(
                    quinn::VarInt::from_u32(CLOSE_PROTOCOL),
                    b"no welcome in time",
                );
                Err(LinkError::Timeout {
                    what: "the peer's welcome",
                    ms,
                })
            }
        }
    }

    /// A dial's or an accept's TLS handshake, within the handshake timeout (`peer`: the node
    /// dialed, for the error).
    async fn handshake(
        &self,
        connecting: impl std::future::IntoFuture<
            Output = Result<quinn::Connection, quinn::ConnectionError>,
        >,
        peer: Option<u64>,
    ) -> Result<quinn::Connection, LinkError> {
        let ms = self.timeout_ms();
        match tokio::time::timeout(Duration::from_millis(ms), connecting).await {
            Ok(c) => c.map_err(|e| connection_error(e, peer)),
            Err(_) => Err(LinkError::Timeout {
                what: "the TLS handshake",
                ms,
            }),
        }
    }

    /// An admitted peer's connection and control stream.
    fn peer_conn(&self, node: u64, conn: quinn::Connection, control: GroupStream) -> PeerConn {
        PeerConn {
            node_id: node,
            connection: conn,
            control: ControlStream { stream: control },
            frame_bytes_max: self.config.node_frame_bytes_max,
            handshake_timeout_ms: self.timeout_ms(),
        }
    }

    /// The dialer's side of admission: open the control stream, say hello, await welcome.
    async fn hello(&self, conn: &quinn::Connection, node: u64) -> Result<GroupStream, LinkError> {
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| connection_error(e, Some(node)))?;
        let max = self.config.node_frame_bytes_max;
        let mut control = GroupStream::new(send, recv, node, CONTROL_GROUP, max);
        control
            .sender
            .send_frame(&StreamHeader {
                group: CONTROL_GROUP,
            })
            .await?;
        control
            .sender
            .send_frame(&ControlFrame::Hello {
                cluster_id: self.cluster_id.clone(),
                node_id: self.node_id,
            })
            .await?;
        let answer = control.receiver.recv_frame::<ControlFrame>().await;
        // A refusing peer closes the connection: its close code says why, whatever the read
        // saw first (stream reset, end of stream).
        if let Some(reason) = conn.close_reason() {
            return Err(connection_error(reason, Some(node)));
        }
        match answer? {
            Some(ControlFrame::Welcome { node_id }) if node_id == node => Ok(control),
            other => Err(LinkError::Protocol(format!(
                "expected a welcome from node {node}, got {other:?}"
            ))),
        }
    }

    async fn accept(&self, incoming: quinn::Incoming) -> Result<PeerConn, LinkError> {
        let ms = self.timeout_ms();
        let conn = self.handshake(incoming, None).await?;
        let node = self.authenticate(&conn, None)?;
        tracing::Span::current().record("node", node);
        match tokio::time::timeout(Duration::from_millis(ms), self.welcome(&conn, node)).await {
            Ok(Ok(control)) => Ok(self.peer_conn(node, conn, control)),
            Ok(Err(e)) => {
                if conn.close_reason().is_none() {
                    conn.close(quinn::VarInt::from_u32(CLOSE_PROTOCOL), b"hello failed");
                }
                Err(e)
            }
            Err(_) => {
                conn.close(quinn::VarInt::from_u32(CLOSE_PROTOCOL), b"no hello in time");
                Err(LinkError::Timeout {
                    what: "the peer's hello",
                    ms,
                })
            }
        }
    }

    /// The listener's side of admission: take the control stream and hello, register the
    /// connection, answer welcome.
    async fn welcome(&self, conn: &quinn::Connection, node: u64) -> Result<GroupStream, LinkError> {
        let (send, recv) = conn
            .accept_bi()
            .await
            .map_err(|e| connection_error(e, Some(node)))?;
        let max = self.config.node_frame_bytes_max;
        let mut control = GroupStream::accept(send, recv, node, max, self.timeout_ms()).await?;
        let refuse = |detail: String| {
            conn.close(quinn::VarInt::from_u32(CLOSE_PROTOCOL), truncated(&detail));
            LinkError::Refused {
                peer: Some(node),
                refusal: Refusal::Protocol,
                detail,
            }
        };
        if control.group != CONTROL_GROUP {
            return Err(refuse(format!(
                "first stream is group {}, not the control stream",
                control.group
            )));
        }
        match control.receiver.recv_frame::<ControlFrame>().await? {
            Some(ControlFrame::Hello {
                cluster_id,
                node_id,
            }) if cluster_id == self.cluster_id && node_id == node => {}
            other => {
                return Err(refuse(format!(
                    "expected hello from node {node}, got {other:?}"
                )))
            }
        }
        self.register(node, conn, false)?;
        control
            .sender
            .send_frame(&ControlFrame::Welcome {
                node_id: self.node_id,
            })
            .await?;
        Ok(control)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(uris: Vec<Option<(String, u64)>>) -> CertFacts {
        CertFacts {
            node_uris: uris,
            not_before_unix: 1_000,
            not_after_unix: 2_000,
        }
    }

    fn check(
        alpn: Option<&[u8]>,
        cert: Option<&CertFacts>,
        now: i64,
        expected: Option<u64>,
    ) -> Result<u64, Refusal> {
        let members: BTreeSet<u64> = [1, 2, 3].into();
        check_peer(
            &PeerFacts {
                alpn,
                cert,
                now_unix: now,
            },
            "c",
            1,
            &members,
            expected,
        )
        .map_err(|(r, _, _)| r)
    }

    #[test]
    fn peer_checks_refuse_each_rule_with_its_own_refusal() {
        // Proves each post-handshake rule refuses with its own Refusal and a good peer passes.
        let good = facts(vec![Some(("c".into(), 2))]);
        let a = Some(ALPN_NODE);
        assert_eq!(check(a, Some(&good), 1_500, Some(2)), Ok(2));
        assert_eq!(check(a, Some(&good), 1_500, None), Ok(2));
        assert_eq!(
            check(Some(b"fabric/1"), Some(&good), 1_500, None),
            Err(Refusal::Alpn)
        );
        assert_eq!(check(None, Some(&good), 1_500, None), Err(Refusal::Alpn));
        assert_eq!(
            check(a, Some(&good), 999, None),
            Err(Refusal::CertificateExpired)
        );
        assert_eq!(
            check(a, Some(&good), 2_001, None),
            Err(Refusal::CertificateExpired)
        );
        assert_eq!(check(a, None, 1_500, None), Err(Refusal::NoNodeIdentity));
        let none = facts(vec![]);
        assert_eq!(
            check(a, Some(&none), 1_500, None),
            Err(Refusal::NoNodeIdentity)
        );
        let two = facts(vec![Some(("c".into(), 2)), Some(("c".into(), 3))]);
        assert_eq!(
            check(a, Some(&two), 1_500, None),
            Err(Refusal::NoNodeIdentity)
        );
        let bad = facts(vec![None]);
        assert_eq!(
            check(a, Some(&bad), 1_500, None),
            Err(Refusal::NoNodeIdentity)
        );
        let other = facts(vec![Some(("d".into(), 2))]);
        assert_eq!(
            check(a, Some(&other), 1_500, None),
            Err(Refusal::OtherCluster)
        );
        assert_eq!(
            check(a, Some(&good), 1_500, Some(3)),
            Err(Refusal::UnexpectedNode)
        );
        let stranger = facts(vec![Some(("c".into(), 9))]);
        assert_eq!(
            check(a, Some(&stranger), 1_500, None),
            Err(Refusal::NotMember)
        );
        let me = facts(vec![Some(("c".into(), 1))]);
        assert_eq!(check(a, Some(&me), 1_500, None), Err(Refusal::SameNodeId));
    }

    #[test]
    fn close_codes_and_tls_alerts_map_back_to_their_refusal() {
        // Proves close codes and TLS alerts map back to the refusal they stand for.
        for r in [
            Refusal::CertificateExpired,
            Refusal::Alpn,
            Refusal::NoNodeIdentity,
            Refusal::OtherCluster,
            Refusal::NotMember,
            Refusal::UnexpectedNode,
            Refusal::SameNodeId,
            Refusal::Duplicate,
            Refusal::Protocol,
        ] {
            assert_eq!(Refusal::from_close_code(r.close_code().into()), Some(r));
        }
        assert_eq!(Refusal::from_close_code(CLOSE_NORMAL.into()), None);
        assert_eq!(Refusal::from_close_code(CLOSE_REPLACED.into()), None);
        assert_eq!(
            Refusal::from_transport_code(0x100 + 48),
            Some(Refusal::UnknownCa)
        );
        assert_eq!(
            Refusal::from_transport_code(0x100 + 51),
            Some(Refusal::UnknownCa)
        );
        assert_eq!(
            Refusal::from_transport_code(0x100 + 45),
            Some(Refusal::CertificateExpired)
        );
        assert_eq!(
            Refusal::from_transport_code(0x100 + 120),
            Some(Refusal::Alpn)
        );
        assert_eq!(
            Refusal::from_transport_code(0x100 + 42),
            Some(Refusal::BadCertificate)
        );
        assert_eq!(Refusal::from_transport_code(0x100 + 80), None);
        assert_eq!(Refusal::from_transport_code(0x0a), None);
    }

    #[test]
    fn config_bounds_are_enforced() {
        // Proves out-of-bounds configurations are refused with a typed error and the defaults pass.
        assert!(LinkConfig::new([1, 2]).validate().is_ok());
        let mut c = LinkConfig::new([1]);
        c.node_frame_bytes_max = NODE_FRAME_BYTES_MAX_LIMIT + 1;
        assert!(matches!(c.validate(), Err(LinkError::Config(_))));
        let mut c = LinkConfig::new([1]);
        c.keep_alive_interval_ms = c.idle_timeout_ms;
        assert!(matches!(c.validate(), Err(LinkError::Config(_))));
        let mut c = LinkConfig::new([1]);
        c.streams_per_connection_max = 1;
        assert!(matches!(c.validate(), Err(LinkError::Config(_))));
    }
}
