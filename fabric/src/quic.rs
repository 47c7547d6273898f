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

use crate::node::NodeCtx;
use crate::session::Transport;
use crate::tls::{self, Identity};
use fabric_edge::{InFrame, OutFrame, Session};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Bytes of a frame's length prefix.
pub const FRAME_PREFIX_BYTES: usize = 4;
/// Frames the control stream's reader task buffers for the session; when full it stops
/// reading, and QUIC flow control pushes back on the client.
const READ_QUEUE_FRAMES_MAX: usize = 256;
/// Subscription streams one session may have open; events of further subscriptions share the
/// control stream (still correct, only without their own stream).
pub const SUBSCRIPTION_STREAMS_MAX: usize = 256;
/// UDP socket buffers: the kernel default (about 208 KiB) drops datagrams at loopback rates.
const SOCKET_BUFFER_BYTES: usize = 4 << 20;
/// A connection with no packets for this long is gone (clients send keepalives).
pub const IDLE_TIMEOUT_MS: u64 = 30_000;
/// Chunk size when skipping the bytes of an oversize frame.
const SKIP_CHUNK_BYTES: usize = 64 * 1024;
/// How long a closing session waits for the client to acknowledge its last frames.
const CLOSE_LINGER_MS: u64 = 1_000;
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
}

/// A frame read from a stream.
#[derive(Debug)]
pub enum ReadFrame {
    Frame(Vec<u8>),
    /// Its length prefix said this many bytes, over the limit; they were skipped.
    Oversize(u64),
}

/// Reads one length-prefixed frame; `Ok(None)` at a clean end of stream.
pub async fn read_frame(
    recv: &mut quinn::RecvStream,
    frame_bytes_max: usize,
) -> Result<Option<ReadFrame>, String> {
    let mut prefix = [0u8; FRAME_PREFIX_BYTES];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(n)) => {
            return Err(format!(
                "stream ended {n} bytes into a frame's length prefix"
            ))
        }
        Err(quinn::ReadExactError::ReadError(e)) => return Err(e.to_string()),
    }
    let len = u32::from_le_bytes(prefix) as usize;
    if len > frame_bytes_max {
        let mut left = len;
        while left > 0 {
            let chunk = recv
                .read_chunk(left.min(SKIP_CHUNK_BYTES), true)
                .await
                .map_err(|e| e.to_string())?
                .ok_or("stream ended inside an oversize frame")?;
            left -= chunk.bytes.len();
        }
        return Ok(Some(ReadFrame::Oversize(len as u64)));
    }
    let mut buf = vec![0u8; len];
    recv.read_exact(&mut buf).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(n) => {
            format!("stream ended {n} bytes into a {len}-byte frame")
        }
        quinn::ReadExactError::ReadError(e) => e.to_string(),
    })?;
    Ok(Some(ReadFrame::Frame(buf)))
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

/// Binds the node's QUIC endpoint and starts accepting; returns its address.
pub fn start(
    ctx: Arc<NodeCtx>,
    addr: SocketAddr,
    identity: &Identity,
    mut shutdown: watch::Receiver<bool>,
) -> Result<SocketAddr, QuicError> {
    let crypto =
        tls::server_config(identity, tls::ALPN).map_err(|e| QuicError::Tls(e.to_string()))?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(crypto)
        .map_err(|e| QuicError::Tls(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut t = transport_config(false);
    // One control stream per connection; the client opens no unidirectional streams.
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(1));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    server.transport_config(Arc::new(t));
    server.migration(true);
    let socket = udp_socket(addr).map_err(|source| QuicError::Bind { addr, source })?;
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| QuicError::Bind { addr, source })?;
    let local = endpoint
        .local_addr()
        .map_err(|source| QuicError::Bind { addr, source })?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                incoming = endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    tokio::spawn(connection(incoming, ctx.clone()));
                }
                _ = shutdown.wait_for(|s| *s) => break,
            }
        }
        // Sessions close themselves (with CLOSE_SHUTDOWN) as they drain; wait for them.
        endpoint.wait_idle().await;
    });
    Ok(local)
}

async fn connection(incoming: quinn::Incoming, ctx: Arc<NodeCtx>) {
    let remote = incoming.remote_address();
    let hello_timeout = Duration::from_millis(ctx.config.hello_timeout_ms);
    let conn = match tokio::time::timeout(hello_timeout, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            // Wrong ALPN, a client that distrusts our certificate, a broken handshake.
            tracing::debug!(%remote, error = %e, "QUIC handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%remote, "QUIC handshake timed out");
            return;
        }
    };
    let (send, recv) = match tokio::time::timeout(hello_timeout, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%remote, error = %e, "QUIC connection ended before its control stream");
            return;
        }
        Err(_) => {
            conn.close(
                quinn::VarInt::from_u32(CLOSE_PROTOCOL),
                b"no control stream opened in time",
            );
            return;
        }
    };
    let (tx, frames) = mpsc::channel(READ_QUEUE_FRAMES_MAX);
    let frame_bytes_max = ctx.config.frame_bytes_max;
    let reader = tokio::spawn(read_control(recv, tx, frame_bytes_max));
    let transport = QuicTransport {
        conn,
        control: send,
        frames,
        subs: HashMap::new(),
    };
    crate::session::run(transport, ctx, "quic").await;
    reader.abort();
}

/// What the control stream's reader task hands the session.
enum QuicIn {
    Frame(Vec<u8>),
    Oversize(u64),
    /// The stream (or connection) ended, cleanly (`None`) or not.
    End(Option<String>),
}

/// Reads frames off the control stream into the session's queue. A task of its own because a
/// partly read frame must survive the session task's `select!` (which drops the losing arm).
async fn read_control(
    mut recv: quinn::RecvStream,
    tx: mpsc::Sender<QuicIn>,
    frame_bytes_max: usize,
) {
    loop {
        let item = match read_frame(&mut recv, frame_bytes_max).await {
            Ok(Some(ReadFrame::Frame(b))) => QuicIn::Frame(b),
            Ok(Some(ReadFrame::Oversize(n))) => QuicIn::Oversize(n),
            Ok(None) => QuicIn::End(None),
            Err(e) => QuicIn::End(Some(e)),
        };
        let end = matches!(item, QuicIn::End(_));
        if tx.send(item).await.is_err() || end {
            return;
        }
    }
}

struct QuicTransport {
    conn: quinn::Connection,
    control: quinn::SendStream,
    frames: mpsc::Receiver<QuicIn>,
    /// A unidirectional stream per subscribed conversation.
    subs: HashMap<Arc<str>, quinn::SendStream>,
}

impl Transport for QuicTransport {
    type In = QuicIn;

    async fn recv(&mut self) -> QuicIn {
        self.frames.recv().await.unwrap_or(QuicIn::End(None))
    }

    fn handle_in(core: &mut Session, now: u64, input: QuicIn) -> bool {
        match input {
            QuicIn::Frame(b) => {
                core.handle_frame(
                    now,
                    InFrame {
                        binary: true,
                        bytes: &b,
                    },
                );
                true
            }
            QuicIn::Oversize(n) => {
                core.handle_oversize_frame(now, n);
                true
            }
            QuicIn::End(why) => {
                if let Some(why) = why {
                    tracing::debug!(reason = %why, "QUIC control stream failed");
                }
                core.handle_transport_closed(now);
                false
            }
        }
    }

    async fn feed(&mut self, f: OutFrame) -> Result<(), String> {
        let bytes = frame(&f.bytes);
        if let Some(conv) = f.conv {
            if !self.subs.contains_key(&conv) && self.subs.len() < SUBSCRIPTION_STREAMS_MAX {
                let s = self.conn.open_uni().await.map_err(|e| e.to_string())?;
                self.subs.insert(conv.clone(), s);
            }
            if let Some(s) = self.subs.get_mut(&conv) {
                return s.write_all(&bytes).await.map_err(|e| e.to_string());
            }
        }
        self.control
            .write_all(&bytes)
            .await
            .map_err(|e| e.to_string())
    }

    async fn flush(&mut self) -> Result<(), String> {
        // quinn sends what `write_all` accepted without being asked.
        Ok(())
    }

    async fn close_for_shutdown(&mut self) {
        self.linger().await;
        self.conn.close(
            quinn::VarInt::from_u32(CLOSE_SHUTDOWN),
            b"node shutting down",
        );
    }

    async fn close(&mut self) {
        self.linger().await;
        self.conn.close(
            quinn::VarInt::from_u32(CLOSE_SESSION_ENDED),
            b"session ended",
        );
    }
}

impl QuicTransport {
    /// Finishes every stream and gives the client a moment to take the last frames (a closed
    /// connection discards what it has not sent).
    async fn linger(&mut self) {
        let _ = self.control.finish();
        for s in self.subs.values_mut() {
            let _ = s.finish();
        }
        let _ = tokio::time::timeout(
            Duration::from_millis(CLOSE_LINGER_MS),
            self.control.stopped(),
        )
        .await;
    }
}
