//! One connection spoken with the proto codec directly (the least client overhead): dial,
//! hello, then frames of ops out and frames of server ops in. WebSocket (JSON or binary) or
//! QUIC (`fabric::quic`'s framing: length-prefixed postcard, a stream per subscription).

use crate::error::BenchError;
use crate::setup::Transport;
use fabric_proto::{codec, ClientOp, ServerOp};
use fabric_proto::{MeshId, PeerId};
use futures_util::{FutureExt, SinkExt, StreamExt};
use std::time::Duration;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// A reply slower than this is taken for a hung node, failing the run instead of hanging it.
pub const REPLY_TIMEOUT_MS: u64 = 30_000;
/// Client socket buffers: the node uses 8 KiB too; tungstenite's 128 KiB default would make
/// each of 10,000 idle client sessions cost far more than the server side being measured.
const WS_BUFFER_BYTES: usize = 8 * 1024;
/// Server ops per frame the load generator asks for by default (`options` `batch`), as the
/// Rust client does.
pub const BATCH_OPS_IN_DEFAULT: u32 = fabric::client::BATCH_OPS_IN_DEFAULT;
/// The `ref` of the `options` sent with the hello.
const OPTIONS_REF: u64 = 0;

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;
pub type Sink = futures_util::stream::SplitSink<Ws, Message>;
pub type Stream = futures_util::stream::SplitStream<Ws>;

/// Encodes ops as one frame: a single op alone, several as a JSON array or binary `Batch`.
pub fn encode(ops: Vec<ClientOp>, binary: bool) -> Result<Message, BenchError> {
    if ops.is_empty() {
        return Err(BenchError::Protocol("nothing to encode".into()));
    }
    if binary {
        let op = if ops.len() == 1 {
            ops.into_iter()
                .next()
                .ok_or_else(|| BenchError::Protocol("empty".into()))?
        } else {
            ClientOp::Batch(ops)
        };
        Ok(Message::Binary(codec::encode_client_binary(&op).into()))
    } else {
        let mut out = Vec::with_capacity(ops.len() * 192);
        if ops.len() == 1 {
            codec::encode_client_json(&ops[0], &mut out);
        } else {
            out.push(b'[');
            for (i, op) in ops.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                codec::encode_client_json(op, &mut out);
            }
            out.push(b']');
        }
        String::from_utf8(out)
            .map(|s| Message::Text(s.into()))
            .map_err(|_| BenchError::Protocol("JSON encoding is not UTF-8".into()))
    }
}

/// The server ops of one frame; `None` for control frames.
pub fn decode(msg: Message) -> Result<Option<Vec<ServerOp>>, BenchError> {
    let ops = match msg {
        Message::Text(t) => codec::decode_server_json(t.as_bytes()),
        Message::Binary(b) => codec::decode_server_binary(&b),
        Message::Close(f) => {
            return Err(BenchError::Protocol(format!(
                "the node closed the connection: {f:?}"
            )))
        }
        _ => return Ok(None),
    };
    ops.map(Some)
        .map_err(|e| BenchError::Protocol(format!("undecodable frame: {e}")))
}

/// An authenticated session, split into its two halves.
pub struct WsConn {
    inner: Inner,
    pub binary: bool,
    /// Ops that came in the welcome's frame after it, handed out first.
    leftover: Option<Vec<ServerOp>>,
}

enum Inner {
    Ws {
        sink: Sink,
        stream: Stream,
    },
    Quic {
        send: quinn::SendStream,
        frames: Box<fabric::quic::ServerFrames>,
        /// Frames fed and not yet flushed (one write for many frames).
        out: Vec<u8>,
        conn: quinn::Connection,
        _endpoint: quinn::Endpoint,
    },
}

fn quic_err(e: impl std::fmt::Display) -> BenchError {
    BenchError::Protocol(format!("quic: {e}"))
}

/// Encodes ops as one QUIC frame (postcard, length-prefixed) onto `out`.
fn encode_quic(ops: Vec<ClientOp>, out: &mut Vec<u8>) -> Result<(), BenchError> {
    let op = match ops.len() {
        0 => return Err(BenchError::Protocol("nothing to encode".into())),
        1 => ops.into_iter().next().expect("one op"),
        _ => ClientOp::Batch(ops),
    };
    out.extend_from_slice(&fabric::quic::frame(&codec::encode_client_binary(&op)));
    Ok(())
}

impl WsConn {
    /// Dials `url`, says hello and waits for the welcome. A QUIC session dials from `endpoint`
    /// if given (one UDP socket shared by many connections), else from an endpoint of its own.
    /// `batch_in` is what the hello's `options` asks for (0 or 1: no `options`, one op per
    /// frame; [`BATCH_OPS_IN_DEFAULT`] is the Rust client's).
    // Over 70 lines: one benchmark run (set up, load, measure, tear down) in the order it happens.
    pub async fn connect_via(
        endpoint: Option<&quinn::Endpoint>,
        batch_in: u32,
        url: &str,
        transport: Transport,
        mesh: &str,
        peer: &str,
        token: &str,
    ) -> Result<WsConn, BenchError> {
        let mut conn = match transport {
            Transport::Quic => WsConn::dial_quic(endpoint, url).await?,
            _ => {
                let config = WebSocketConfig::default()
                    .read_buffer_size(WS_BUFFER_BYTES)
                    .write_buffer_size(WS_BUFFER_BYTES);
                // `wss://…?pin=HEX`: TLS, trusting the node's certificate by its SHA-256 (the
                // pin is ours, not part of the request).
                let (url, connector) = match url.split_once("?pin=") {
                    Some((u, pin)) => {
                        let tls_err =
                            |e: fabric::tls::TlsError| BenchError::Protocol(format!("wss: {e}"));
                        let pin = fabric::tls::parse_pin(pin).map_err(tls_err)?;
                        let tls = fabric::tls::client_config(
                            &fabric::tls::Trust::Pin(pin),
                            fabric::tls::ALPN_HTTP1,
                        )
                        .map_err(tls_err)?;
                        (
                            u,
                            Some(tokio_tungstenite::Connector::Rustls(std::sync::Arc::new(
                                tls,
                            ))),
                        )
                    }
                    None => (url, None),
                };
                // Nagle off: small frames must not wait for the previous one's ack.
                let (ws, _) = tokio_tungstenite::connect_async_tls_with_config(
                    url,
                    Some(config),
                    true,
                    connector,
                )
                .await?;
                let (sink, stream) = ws.split();
                WsConn {
                    inner: Inner::Ws { sink, stream },
                    binary: transport.binary(),
                    leftover: None,
                }
            }
        };
        let mut first = Vec::new();
        if batch_in > 1 {
            first.push(ClientOp::Options {
                r: OPTIONS_REF,
                batch: batch_in,
            });
        }
        first.push(ClientOp::Hello {
            mesh: MeshId::must(mesh),
            peer: PeerId::must(peer),
            token: token.to_string(),
        });
        conn.send(first).await?;
        loop {
            let mut ops = conn
                .next("welcome")
                .await?
                .into_iter()
                .skip_while(|op| matches!(op, ServerOp::Ok { r: OPTIONS_REF, .. }));
            match ops.next() {
                Some(ServerOp::Welcome { .. }) => {
                    let rest: Vec<ServerOp> = ops.collect();
                    conn.leftover = (!rest.is_empty()).then_some(rest);
                    return Ok(conn);
                }
                Some(other) => {
                    return Err(BenchError::Protocol(format!(
                        "expected welcome, got {other:?}"
                    )))
                }
                None => continue,
            }
        }
    }

    /// `quic://host:port?pin=HEX`: dial and open the control stream.
    async fn dial_quic(
        endpoint: Option<&quinn::Endpoint>,
        url: &str,
    ) -> Result<WsConn, BenchError> {
        let rest = url
            .strip_prefix("quic://")
            .ok_or_else(|| BenchError::Options(format!("{url:?} is not a quic:// URL")))?;
        let (authority, pin) = rest
            .split_once("?pin=")
            .ok_or_else(|| BenchError::Options(format!("{url:?} needs ?pin=SHA256")))?;
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| BenchError::Options(format!("{url:?} needs host:port")))?;
        let port: u16 = port
            .parse()
            .map_err(|_| BenchError::Options(format!("{url:?}: bad port")))?;
        let trust = fabric::tls::Trust::Pin(fabric::tls::parse_pin(pin).map_err(quic_err)?);
        let d = fabric::quic::dial_from(endpoint, host, port, &trust, fabric::tls::ALPN)
            .await
            .map_err(quic_err)?;
        Ok(WsConn {
            inner: Inner::Quic {
                send: d.send,
                frames: Box::new(fabric::quic::ServerFrames::spawn(d.conn.clone(), d.recv)),
                out: Vec::new(),
                conn: d.conn,
                _endpoint: d.endpoint,
            },
            binary: true,
            leftover: None,
        })
    }

    /// Writes `ops` as one frame and flushes.
    pub async fn send(&mut self, ops: Vec<ClientOp>) -> Result<(), BenchError> {
        self.feed(ops).await?;
        self.flush().await
    }

    /// Queues `ops` as one frame without flushing (the socket is written as its buffer
    /// fills): many small frames then cost a few syscalls, not one each.
    pub async fn feed(&mut self, ops: Vec<ClientOp>) -> Result<(), BenchError> {
        match &mut self.inner {
            Inner::Ws { sink, .. } => {
                let msg = encode(ops, self.binary)?;
                sink.feed(msg).await?;
            }
            Inner::Quic { out, .. } => encode_quic(ops, out)?,
        }
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<(), BenchError> {
        match &mut self.inner {
            Inner::Ws { sink, .. } => sink.flush().await?,
            Inner::Quic { send, out, .. } => {
                if !out.is_empty() {
                    send.write_all(out).await.map_err(quic_err)?;
                    out.clear();
                }
            }
        }
        Ok(())
    }

    /// Waits up to `timeout` for the next frame's ops (`Ok(None)`: timed out).
    pub async fn next_within(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<Vec<ServerOp>>, BenchError> {
        if let Some(ops) = self.leftover.take() {
            return Ok(Some(ops));
        }
        match &mut self.inner {
            Inner::Ws { stream, .. } => match tokio::time::timeout(timeout, stream.next()).await {
                Err(_) => Ok(None),
                Ok(None) => Err(BenchError::Protocol(
                    "the node closed the connection".into(),
                )),
                Ok(Some(msg)) => Ok(Some(decode(msg?)?.unwrap_or_default())),
            },
            Inner::Quic { frames, .. } => {
                match tokio::time::timeout(timeout, frames.recv()).await {
                    Err(_) => Ok(None),
                    Ok(r) => r.map(Some).map_err(quic_err),
                }
            }
        }
    }

    /// The next frame's ops, failing after [`REPLY_TIMEOUT_MS`].
    pub async fn next(&mut self, what: &'static str) -> Result<Vec<ServerOp>, BenchError> {
        self.next_within(Duration::from_millis(REPLY_TIMEOUT_MS))
            .await?
            .ok_or(BenchError::Timeout(what))
    }

    /// A frame that is already received, without waiting.
    pub fn try_next(&mut self) -> Result<Option<Vec<ServerOp>>, BenchError> {
        if let Some(ops) = self.leftover.take() {
            return Ok(Some(ops));
        }
        match &mut self.inner {
            Inner::Ws { stream, .. } => match stream.next().now_or_never() {
                None => Ok(None),
                Some(None) => Err(BenchError::Protocol(
                    "the node closed the connection".into(),
                )),
                Some(Some(msg)) => Ok(Some(decode(msg?)?.unwrap_or_default())),
            },
            Inner::Quic { frames, .. } => frames.try_recv().transpose().map_err(quic_err),
        }
    }

    pub async fn close(mut self) {
        match &mut self.inner {
            Inner::Ws { sink, .. } => {
                let _ = sink.send(Message::Close(None)).await;
            }
            Inner::Quic { send, conn, .. } => {
                let _ = send.finish();
                let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
                conn.close(quinn::VarInt::from_u32(0), b"bench done");
            }
        }
    }
}
