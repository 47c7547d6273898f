//! The QUIC transport (quinn, rustls, ALPN `fabric/1`): the same session task and message set
//! as WebSocket (`session.rs`), carried as length-prefixed postcard frames.
//!
//! - A connection opens one bidirectional **control stream**; every client frame goes there,
//!   and every server frame except conversation events comes back on it.
//! - Each conversation subscription gets its own **unidirectional server stream**, opened on
//!   its first event: a slow or large tail never blocks inbox delivery or answers behind it
//!   (no head-of-line blocking between subscriptions).
//! - A frame is a 4-byte little-endian length, then that many bytes of postcard
//!   (`fabric_proto::codec`'s binary encoding). A length over `frame_bytes_max` is answered
//!   `too_large` and its bytes are skipped unread into memory; the session goes on.
//! - Connection migration is on: a client whose address changes keeps its session.

use crate::tls;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

#[cfg(feature = "server")]
mod server;
#[cfg(feature = "server")]
pub use server::start;

/// Bytes of a frame's length prefix.
pub const FRAME_PREFIX_BYTES: usize = 4;
/// Subscription streams one session may have open; events of further subscriptions share the
/// control stream (still correct, only without their own stream).
pub const SUBSCRIPTION_STREAMS_MAX: usize = 256;
/// UDP socket buffers: the kernel default (about 208 KiB) drops datagrams at loopback rates.
const SOCKET_BUFFER_BYTES: usize = 4 << 20;
/// Largest UDP payload path MTU discovery tries.
const MTU_UPPER_BOUND_BYTES: u16 = 8952;
/// ACK frequency (draft-ietf-quic-ack-frequency) asked of the peer: ack-eliciting packets it
/// may take before it must ACK, and how long it may hold an ACK back.
const ACK_ELICITING_THRESHOLD: u32 = 8;
const ACK_DELAY_MAX_MS: u64 = 5;
/// Flow-control window of one stream, and of a whole connection.
const STREAM_WINDOW_BYTES: u32 = 8 << 20;
const CONNECTION_WINDOW_BYTES: u32 = 16 << 20;
/// A connection with no packets for this long is gone (clients send keepalives).
pub const IDLE_TIMEOUT_MS: u64 = 30_000;
/// QUIC application error codes (connection close).
pub const CLOSE_SESSION_ENDED: u32 = 0;
pub const CLOSE_SHUTDOWN: u32 = 1001;
pub const CLOSE_PROTOCOL: u32 = 1002;

#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    #[error("cannot bind QUIC on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("QUIC TLS setup: {0}")]
    Tls(String),
    #[error("QUIC connection to {0}")]
    Dial(String),
}

/// Why a client's connection to the node ended: the reason the client logs and gives up the
/// connection for (its waiting requests then fail).
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    #[error("the node closed the connection ({0})")]
    Closed(String),
    #[error("QUIC read failed: {source} ({reason})")]
    QuicRead {
        source: FrameReadError,
        reason: String,
    },
    #[error("QUIC read of a subscription stream failed: {0}")]
    SubscriptionRead(FrameReadError),
    #[error("QUIC write failed: {0}")]
    QuicWrite(quinn::WriteError),
    #[error("websocket {0}")]
    WebSocket(String),
    /// A frame that cannot be read may have held answers that will never be seen: waiting
    /// requests would hang, so the connection is given up instead.
    #[error("undecodable frame from the node: {0}")]
    Undecodable(fabric_proto::ProtoError),
    #[error("the node sent a frame of {len} bytes, over this client's frame_bytes_max ({max})")]
    Oversize { len: u64, max: usize },
    /// A session-level error: the node is closing the session (unavailable, overloaded) or
    /// refused a whole frame, whose requests will then never be answered.
    #[error("session error {code}: {message}")]
    Session {
        code: fabric_proto::ErrorCode,
        message: String,
    },
    #[error("cannot encode a frame: {0}")]
    Encode(String),
    #[error("the client was dropped")]
    ClientDropped,
}

/// Why a stream of frames could not be read on.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FrameReadError {
    #[error(transparent)]
    Read(#[from] quinn::ReadError),
    #[error("stream ended {0} bytes into a frame's length prefix")]
    InPrefix(usize),
    #[error("stream ended {0} bytes into a frame")]
    InFrame(usize),
    #[error("stream ended inside an oversize frame")]
    InOversize,
}

/// A frame read from a stream.
#[derive(Debug)]
pub enum ReadFrame {
    /// The frame's bytes, without their length prefix (a view into the read buffer: no copy).
    Frame(bytes::Bytes),
    /// Its length prefix said this many bytes, over the limit; they were skipped.
    Oversize(u64),
}

/// Reads length-prefixed frames off a stream through a buffer: one `read_chunk` takes in many
/// small frames at once (a read per frame would lock the connection and copy per frame).
///
/// [`FrameReader::next`] is cancel-safe: everything read is kept in the reader (the buffer, and
/// how much of an oversize frame is still to skip), and its only await is quinn's cancel-safe
/// `read_chunk`. So a session can `select!` it against replies without a reader task between.
pub struct FrameReader {
    recv: quinn::RecvStream,
    buf: bytes::BytesMut,
    frame_bytes_max: usize,
    /// Bytes of an oversize frame not yet skipped, and that frame's length.
    skip_left: u64,
    skip_len: u64,
    /// Skip an oversize frame and go on (the node: the session answers `too_large`), or report
    /// it at once and read no further (a client: it gives the connection up).
    skip_oversize: bool,
}

/// Most bytes one read takes from the stream.
const READ_CHUNK_BYTES: usize = 256 * 1024;

impl FrameReader {
    pub fn new(recv: quinn::RecvStream, frame_bytes_max: usize) -> FrameReader {
        FrameReader {
            recv,
            buf: bytes::BytesMut::new(),
            frame_bytes_max,
            skip_left: 0,
            skip_len: 0,
            skip_oversize: true,
        }
    }

    /// A client's reader: a length prefix over `frame_bytes_max` is reported at once (the
    /// stream is then unusable), neither buffered nor read through.
    pub fn for_client(recv: quinn::RecvStream, frame_bytes_max: usize) -> FrameReader {
        FrameReader {
            skip_oversize: false,
            ..FrameReader::new(recv, frame_bytes_max)
        }
    }

    /// The largest frame this reader takes.
    pub fn frame_bytes_max(&self) -> usize {
        self.frame_bytes_max
    }

    /// Reads more into the buffer; false at a clean end of stream. Cancel-safe: a chunk is
    /// either returned by quinn and appended before any other await, or left in the stream.
    async fn fill(&mut self) -> Result<bool, quinn::ReadError> {
        match self.recv.read_chunk(READ_CHUNK_BYTES, true).await? {
            Some(chunk) => {
                self.buf.extend_from_slice(&chunk.bytes);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// The next frame; `Ok(None)` at a clean end of stream between frames. Cancel-safe.
    pub async fn next(&mut self) -> Result<Option<ReadFrame>, FrameReadError> {
        use bytes::Buf;
        loop {
            if self.skip_left > 0 {
                // An oversize frame is skipped without holding it: what is buffered is
                // dropped, then reading goes on past the rest.
                let take = self.skip_left.min(self.buf.len() as u64);
                self.buf.advance(take as usize);
                self.skip_left -= take;
                if self.skip_left == 0 {
                    return Ok(Some(ReadFrame::Oversize(self.skip_len)));
                }
            } else if self.buf.len() >= FRAME_PREFIX_BYTES {
                let len =
                    u32::from_le_bytes(self.buf[..FRAME_PREFIX_BYTES].try_into().expect("4 bytes"))
                        as usize;
                if len > self.frame_bytes_max {
                    self.buf.advance(FRAME_PREFIX_BYTES);
                    if !self.skip_oversize {
                        return Ok(Some(ReadFrame::Oversize(len as u64)));
                    }
                    self.skip_left = len as u64;
                    self.skip_len = len as u64;
                    continue;
                }
                if self.buf.len() >= FRAME_PREFIX_BYTES + len {
                    self.buf.advance(FRAME_PREFIX_BYTES);
                    return Ok(Some(ReadFrame::Frame(self.buf.split_to(len).freeze())));
                }
            }
            if !self.fill().await? {
                return match (self.skip_left, self.buf.len()) {
                    (0, 0) => Ok(None),
                    (0, n) if n < FRAME_PREFIX_BYTES => Err(FrameReadError::InPrefix(n)),
                    (0, n) => Err(FrameReadError::InFrame(n - FRAME_PREFIX_BYTES)),
                    _ => Err(FrameReadError::InOversize),
                };
            }
        }
    }
}

/// `bytes` with its length prefix.
pub fn frame(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_PREFIX_BYTES + bytes.len());
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
    out
}

/// A UDP socket with large buffers, for an endpoint on `addr`.
pub fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let domain = socket2::Domain::for_address(addr);
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    // Best effort: the kernel caps them at its maximum.
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    s.bind(&addr.into())?;
    Ok(s.into())
}

fn transport_config(keepalive: bool) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_millis(IDLE_TIMEOUT_MS))
            .expect("a small idle timeout"),
    ));
    if keepalive {
        t.keep_alive_interval(Some(Duration::from_millis(IDLE_TIMEOUT_MS / 3)));
    }
    // Larger flow-control windows than the defaults: a pipelining client keeps megabytes in
    // flight on one stream at loopback and datacenter speeds.
    t.stream_receive_window(quinn::VarInt::from_u32(STREAM_WINDOW_BYTES));
    t.receive_window(quinn::VarInt::from_u32(CONNECTION_WINDOW_BYTES));
    t.send_window(u64::from(CONNECTION_WINDOW_BYTES));
    // Path MTU discovery may grow datagrams past the 1452-byte default where the path allows
    // (loopback, jumbo-frame datacenter links): fewer packets, fewer syscalls and AEAD calls.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MTU_UPPER_BOUND_BYTES);
    t.mtu_discovery_config(Some(mtu));
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(quinn::VarInt::from_u32(ACK_ELICITING_THRESHOLD));
    ack.max_ack_delay(Some(Duration::from_millis(ACK_DELAY_MAX_MS)));
    t.ack_frequency_config(Some(ack));
    t
}

/// The client side's QUIC config: trust as given, ALPN `alpn`, keepalives, room for one
/// stream per subscription.
pub fn client_config(trust: &tls::Trust, alpn: &[u8]) -> Result<quinn::ClientConfig, QuicError> {
    let crypto = tls::client_config(trust, alpn).map_err(|e| QuicError::Tls(e.to_string()))?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto)
        .map_err(|e| QuicError::Tls(e.to_string()))?;
    let mut c = quinn::ClientConfig::new(Arc::new(crypto));
    let mut t = transport_config(true);
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(
        SUBSCRIPTION_STREAMS_MAX as u32 + 16,
    ));
    c.transport_config(Arc::new(t));
    Ok(c)
}

/// A client connection with its control stream open.
pub struct Dialed {
    pub endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
}

/// Dials `host:port` from a fresh endpoint (a UDP socket of its own, as each client process
/// has), completes the handshake with `trust` and `alpn`, and opens the control stream.
pub async fn dial(
    host: &str,
    port: u16,
    trust: &tls::Trust,
    alpn: &[u8],
) -> Result<Dialed, QuicError> {
    dial_from(None, host, port, trust, alpn).await
}

/// A client endpoint (a UDP socket and its driver) for connections to `remote`'s family.
pub fn client_endpoint(remote: SocketAddr) -> Result<quinn::Endpoint, QuicError> {
    let local = crate::client_io::local_any(remote);
    let socket = udp_socket(local).map_err(|source| QuicError::Bind {
        addr: local,
        source,
    })?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| QuicError::Bind {
        addr: local,
        source,
    })
}

/// [`dial`] from `endpoint` if given (many connections may share one UDP socket, as in a
/// process that hosts many agents), else from a fresh one.
pub async fn dial_from(
    endpoint: Option<&quinn::Endpoint>,
    host: &str,
    port: u16,
    trust: &tls::Trust,
    alpn: &[u8],
) -> Result<Dialed, QuicError> {
    let dial_err = |m: String| QuicError::Dial(format!("{host}:{port}: {m}"));
    let remote = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| dial_err(format!("cannot resolve: {e}")))?
        .next()
        .ok_or_else(|| dial_err("no address".into()))?;
    let config = client_config(trust, alpn)?;
    let endpoint = match endpoint {
        Some(e) => e.clone(),
        None => client_endpoint(remote)?,
    };
    let conn = endpoint
        .connect_with(config, remote, host)
        .map_err(|e| dial_err(e.to_string()))?
        .await
        .map_err(|e| dial_err(format!("handshake: {e}")))?;
    let (send, recv) = conn.open_bi().await.map_err(|e| dial_err(e.to_string()))?;
    Ok(Dialed {
        endpoint,
        conn,
        send,
        recv,
    })
}

/// Server frames queued from a connection's subscription streams for the reader.
const CLIENT_FRAMES_QUEUED_MAX: usize = 256;

/// A client's view of what the node sends: the control stream, read inline (its reader is
/// cancel-safe), and every subscription stream, each read by a task of its own into one queue
/// (there may be many, and they come and go). Dropping it stops the tasks.
pub struct ServerFrames {
    control: FrameReader,
    conn: quinn::Connection,
    /// Set once the control stream has ended: only the error is left to report.
    ended: Option<LinkError>,
    subs: mpsc::Receiver<Result<Vec<fabric_proto::ServerOp>, LinkError>>,
    tasks: tokio::task::JoinSet<()>,
}

impl ServerFrames {
    /// Reads frames of at most the largest `frame_bytes_max` a node accepts
    /// (`crate::FRAME_BYTES_MAX_LIMIT`); a client with a limit of its own uses `spawn_with`.
    pub fn spawn(conn: quinn::Connection, control: quinn::RecvStream) -> ServerFrames {
        let limit = crate::FRAME_BYTES_MAX_LIMIT;
        ServerFrames::spawn_with(conn, FrameReader::for_client(control, limit))
    }

    /// [`ServerFrames::spawn`] for a control stream already being read (its buffer kept); every
    /// subscription stream is read with the same frame limit as `control`. A length prefix over
    /// it ends the connection, never an allocation of that size.
    pub fn spawn_with(conn: quinn::Connection, control: FrameReader) -> ServerFrames {
        let (tx, subs) = mpsc::channel(CLIENT_FRAMES_QUEUED_MAX);
        let mut tasks = tokio::task::JoinSet::new();
        let accept = conn.clone();
        let frame_bytes_max = control.frame_bytes_max();
        tasks.spawn(async move {
            let mut readers = tokio::task::JoinSet::new();
            while let Ok(recv) = accept.accept_uni().await {
                let reader = FrameReader::for_client(recv, frame_bytes_max);
                readers.spawn(read_subscription_stream(reader, tx.clone()));
            }
        });
        ServerFrames {
            control,
            conn,
            ended: None,
            subs,
            tasks,
        }
    }

    /// The next frame's ops, from any stream; an error ends the connection. Cancel-safe.
    pub async fn recv(&mut self) -> Result<Vec<fabric_proto::ServerOp>, LinkError> {
        if let Some(e) = &self.ended {
            return Err(e.clone());
        }
        let item = tokio::select! {
            biased;
            frame = self.control.next() => match frame {
                Ok(Some(ReadFrame::Frame(b))) => fabric_proto::codec::decode_server_binary(&b)
                    .map_err(LinkError::Undecodable),
                Ok(Some(ReadFrame::Oversize(n))) => Err(oversize(n, self.control.frame_bytes_max())),
                Ok(None) => Err(LinkError::Closed(close_reason(&self.conn))),
                Err(source) => Err(LinkError::QuicRead {
                    source,
                    reason: close_reason(&self.conn),
                }),
            },
            Some(item) = self.subs.recv() => item,
        };
        if let Err(e) = &item {
            self.ended = Some(e.clone());
        }
        item
    }

    /// A frame already received, without waiting.
    pub fn try_recv(&mut self) -> Option<Result<Vec<fabric_proto::ServerOp>, LinkError>> {
        use futures_util::FutureExt;
        self.recv().now_or_never()
    }
}

impl Drop for ServerFrames {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

/// Why a connection closed, for error messages.
pub(crate) fn close_reason(conn: &quinn::Connection) -> String {
    conn.close_reason()
        .map_or_else(|| "connection open".into(), |r| r.to_string())
}

/// A server frame over the client's limit: the client cannot know what it held (answers it
/// waits for, perhaps), so it gives the connection up.
pub(crate) fn oversize(len: u64, frame_bytes_max: usize) -> LinkError {
    LinkError::Oversize {
        len,
        max: frame_bytes_max,
    }
}

/// Reads one subscription stream's frames into `tx`; its end ends only that subscription.
async fn read_subscription_stream(
    mut reader: FrameReader,
    tx: mpsc::Sender<Result<Vec<fabric_proto::ServerOp>, LinkError>>,
) {
    loop {
        let item = match reader.next().await {
            Ok(Some(ReadFrame::Frame(b))) => {
                fabric_proto::codec::decode_server_binary(&b).map_err(LinkError::Undecodable)
            }
            Ok(Some(ReadFrame::Oversize(n))) => Err(oversize(n, reader.frame_bytes_max())),
            Ok(None) => return,
            Err(e) => Err(LinkError::SubscriptionRead(e)),
        };
        let end = item.is_err();
        if tx.send(item).await.is_err() || end {
            return;
        }
    }
}
