//! One WebSocket connection spoken with the proto codec directly (the least client overhead):
//! dial, hello, then frames of ops out and frames of server ops in.

use crate::error::BenchError;
use crate::setup::Transport;
use fabric_proto::{codec, ClientOp, ServerOp};
use futures_util::{FutureExt, SinkExt, StreamExt};
use std::time::Duration;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// A reply slower than this is taken for a hung node, failing the run instead of hanging it.
pub const REPLY_TIMEOUT_MS: u64 = 30_000;
/// Client socket buffers: the node uses 8 KiB too; tungstenite's 128 KiB default would make
/// each of 10,000 idle client sessions cost far more than the server side being measured.
const WS_BUFFER_BYTES: usize = 8 * 1024;

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
    pub sink: Sink,
    pub stream: Stream,
    pub binary: bool,
}

impl WsConn {
    /// Dials `url`, says hello and waits for the welcome.
    pub async fn connect(
        url: &str,
        transport: Transport,
        mesh: &str,
        peer: &str,
        token: &str,
    ) -> Result<WsConn, BenchError> {
        let binary = transport.binary();
        let config = WebSocketConfig::default()
            .read_buffer_size(WS_BUFFER_BYTES)
            .write_buffer_size(WS_BUFFER_BYTES);
        // Nagle off: small frames must not wait for the previous one's ack.
        let (mut ws, _) =
            tokio_tungstenite::connect_async_with_config(url, Some(config), true).await?;
        let hello = ClientOp::Hello {
            mesh: mesh.into(),
            peer: peer.into(),
            token: token.to_string(),
        };
        ws.send(encode(vec![hello], binary)?).await?;
        let deadline = Duration::from_millis(REPLY_TIMEOUT_MS);
        loop {
            let msg = tokio::time::timeout(deadline, ws.next())
                .await
                .map_err(|_| BenchError::Timeout("welcome"))?
                .ok_or_else(|| BenchError::Protocol("closed before welcome".into()))??;
            if let Some(op) = decode(msg)?.unwrap_or_default().into_iter().next() {
                match op {
                    ServerOp::Welcome { .. } => {
                        let (sink, stream) = ws.split();
                        return Ok(WsConn {
                            sink,
                            stream,
                            binary,
                        });
                    }
                    other => {
                        return Err(BenchError::Protocol(format!(
                            "expected welcome, got {other:?}"
                        )))
                    }
                }
            }
        }
    }

    /// Writes `ops` as one frame and flushes.
    pub async fn send(&mut self, ops: Vec<ClientOp>) -> Result<(), BenchError> {
        let msg = encode(ops, self.binary)?;
        self.sink.send(msg).await?;
        Ok(())
    }

    /// Queues `ops` as one frame without flushing (the socket is written as its buffer
    /// fills): many small frames then cost a few syscalls, not one each.
    pub async fn feed(&mut self, ops: Vec<ClientOp>) -> Result<(), BenchError> {
        let msg = encode(ops, self.binary)?;
        self.sink.feed(msg).await?;
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<(), BenchError> {
        self.sink.flush().await?;
        Ok(())
    }

    /// Waits up to `timeout` for the next frame's ops (`Ok(None)`: timed out).
    pub async fn next_within(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<Vec<ServerOp>>, BenchError> {
        match tokio::time::timeout(timeout, self.stream.next()).await {
            Err(_) => Ok(None),
            Ok(None) => Err(BenchError::Protocol(
                "the node closed the connection".into(),
            )),
            Ok(Some(msg)) => Ok(Some(decode(msg?)?.unwrap_or_default())),
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
        match self.stream.next().now_or_never() {
            None => Ok(None),
            Some(None) => Err(BenchError::Protocol(
                "the node closed the connection".into(),
            )),
            Some(Some(msg)) => Ok(Some(decode(msg?)?.unwrap_or_default())),
        }
    }

    pub async fn close(mut self) {
        let _ = self.sink.send(Message::Close(None)).await;
    }
}
