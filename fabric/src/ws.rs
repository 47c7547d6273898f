//! The WebSocket transport of the session task (`session.rs`): text frames are JSON, binary
//! frames postcard; every pending frame is fed and then flushed once.

use crate::node::NodeCtx;
use crate::session::Transport;
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use fabric_edge::{InFrame, OutFrame, Session};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;

pub async fn run(socket: WebSocket, ctx: Arc<NodeCtx>) {
    let (sink, stream) = socket.split();
    crate::session::run(WsTransport { sink, stream }, ctx, "ws").await
}

struct WsTransport {
    sink: SplitSink<WebSocket, Message>,
    stream: SplitStream<WebSocket>,
}

impl Transport for WsTransport {
    type In = Option<Result<Message, axum::Error>>;

    async fn recv(&mut self) -> Self::In {
        self.stream.next().await
    }

    fn handle_in(core: &mut Session, now: u64, input: Self::In) -> bool {
        match input {
            Some(Ok(Message::Text(t))) => core.handle_frame(
                now,
                InFrame {
                    binary: false,
                    bytes: t.as_bytes(),
                },
            ),
            Some(Ok(Message::Binary(b))) => core.handle_frame(
                now,
                InFrame {
                    binary: true,
                    bytes: &b,
                },
            ),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(Message::Close(_))) | None => {
                core.handle_transport_closed(now);
                return false;
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "websocket read failed");
                core.handle_transport_closed(now);
                return false;
            }
        }
        true
    }

    async fn feed(&mut self, frame: OutFrame) -> Result<(), String> {
        let msg = if frame.binary {
            Message::Binary(frame.bytes.into())
        } else {
            match String::from_utf8(frame.bytes) {
                Ok(s) => Message::Text(s.into()),
                // The codec writes UTF-8 JSON; a frame that is not is dropped, not sent.
                Err(_) => return Ok(()),
            }
        };
        self.sink.feed(msg).await.map_err(|e| e.to_string())
    }

    async fn flush(&mut self) -> Result<(), String> {
        self.sink.flush().await.map_err(|e| e.to_string())
    }

    async fn close_for_shutdown(&mut self) {
        let _ = self
            .sink
            .send(Message::Close(Some(CloseFrame {
                code: 1001,
                reason: "node shutting down".into(),
            })))
            .await;
    }

    async fn close(&mut self) {
        let _ = self.sink.close().await;
    }
}
