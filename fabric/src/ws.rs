//! The WebSocket transport of the session task (`session.rs`): text frames are JSON, binary
//! frames postcard. Frames are queued without I/O and written by a cancel-safe poll loop (one
//! flush for everything queued), so the session can race every write against its deadlines.

use crate::node::NodeCtx;
use crate::session::{Event, Transport, TransportError};
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use fabric_edge::{InFrame, OutFrame, Session};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{Sink, StreamExt};
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// RFC 6455 section 7.4.1: "received data within a message that was not consistent with the
/// type of the message (e.g., non-UTF-8 data within a text message)".
const CLOSE_INVALID_PAYLOAD: u16 = 1007;

pub async fn run(socket: WebSocket, ctx: Arc<NodeCtx>) {
    let (sink, stream) = socket.split();
    let transport = WsTransport {
        stream,
        out: WsOut {
            sink,
            queue: VecDeque::new(),
            unflushed: false,
            moved: false,
            flush_owed: false,
        },
        close_code: None,
    };
    crate::session::run(transport, ctx, "ws").await
}

struct WsTransport {
    stream: SplitStream<WebSocket>,
    out: WsOut,
    /// The status to close with instead of none (a protocol failure of the client's).
    close_code: Option<u16>,
}

/// The writing half: messages queued, and what the last writes did.
struct WsOut {
    sink: SplitSink<WebSocket, Message>,
    queue: VecDeque<Message>,
    /// Messages handed to the sink and not flushed yet.
    unflushed: bool,
    /// Something moved since the last report (progress for the write deadline).
    moved: bool,
    /// Something was queued since the core last heard `handle_flushed`.
    flush_owed: bool,
}

fn write_err(e: axum::Error) -> TransportError {
    TransportError::Write(e.to_string())
}

impl WsOut {
    fn pending(&self) -> bool {
        !self.queue.is_empty() || self.unflushed
    }

    /// Hands queued messages to the sink while it takes them, then flushes. Ready once
    /// something moved or everything is written. Cancel-safe: a message leaves the queue only
    /// when the sink has taken it.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        let mut moved = false;
        while !self.queue.is_empty() {
            match Pin::new(&mut self.sink).poll_ready(cx) {
                Poll::Ready(Ok(())) => {
                    let msg = self.queue.pop_front().expect("the queue is not empty");
                    Pin::new(&mut self.sink)
                        .start_send(msg)
                        .map_err(write_err)?;
                    self.unflushed = true;
                    moved = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(write_err(e))),
                Poll::Pending => break,
            }
        }
        if self.queue.is_empty() && self.unflushed {
            match Pin::new(&mut self.sink).poll_flush(cx) {
                Poll::Ready(Ok(())) => {
                    self.unflushed = false;
                    moved = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(write_err(e))),
                Poll::Pending => {}
            }
        }
        self.moved |= moved;
        if moved || !self.pending() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }

    async fn write(&mut self) -> Result<(), TransportError> {
        std::future::poll_fn(|cx| self.poll_write(cx)).await
    }

    async fn write_all(&mut self) -> Result<(), TransportError> {
        while self.pending() {
            self.write().await?;
        }
        Ok(())
    }
}

/// Whether a read failed because a text message was not UTF-8.
fn is_invalid_utf8(e: axum::Error) -> bool {
    use tokio_tungstenite::tungstenite::Error;
    e.into_inner()
        .downcast_ref::<Error>()
        .is_some_and(|e| matches!(e, Error::Utf8(_)))
}

impl Transport for WsTransport {
    type In = Option<Result<Message, axum::Error>>;
    const PINGS: bool = true;

    async fn recv(&mut self) -> Self::In {
        self.stream.next().await
    }

    fn handle_in(&mut self, core: &mut Session, now: u64, input: Self::In) -> bool {
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
            Some(Ok(Message::Pong(_))) => core.handle_pong(now),
            // tungstenite answers pings itself.
            Some(Ok(Message::Ping(_))) => {}
            Some(Ok(Message::Close(_))) | None => {
                core.handle_transport_closed(now);
                return false;
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "websocket read failed");
                if is_invalid_utf8(e) {
                    // RFC 6455 section 8.1: fail the connection with 1007.
                    self.close_code = Some(CLOSE_INVALID_PAYLOAD);
                }
                core.handle_transport_closed(now);
                return false;
            }
        }
        true
    }

    fn feed(&mut self, frame: OutFrame) -> Result<(), TransportError> {
        let msg = if frame.binary {
            Message::Binary(frame.bytes.into())
        } else {
            // The session core only makes UTF-8 JSON (a body that is not becomes an error
            // frame there); a frame that is not would end the session, never be skipped.
            let text = String::from_utf8(frame.bytes).map_err(|_| TransportError::NotUtf8)?;
            Message::Text(text.into())
        };
        self.out.queue.push_back(msg);
        self.out.flush_owed = true;
        Ok(())
    }

    fn feed_ping(&mut self, payload: u64) {
        let payload = payload.to_be_bytes().to_vec();
        self.out.queue.push_back(Message::Ping(payload.into()));
        self.out.flush_owed = true;
    }

    async fn write(&mut self) -> Result<(), TransportError> {
        self.out.write().await
    }

    async fn next(&mut self, reading: bool) -> Event<Self::In> {
        let writing = self.out.pending();
        tokio::select! {
            input = self.stream.next(), if reading => Event::In(input),
            r = self.out.write(), if writing => Event::Wrote(r),
            else => std::future::pending().await,
        }
    }

    fn report(&mut self, core: &mut Session, now: u64) -> bool {
        if std::mem::take(&mut self.out.moved) {
            core.handle_writing(now, None);
        }
        if self.out.pending() {
            return false;
        }
        if std::mem::take(&mut self.out.flush_owed) {
            core.handle_flushed(now);
        }
        true
    }

    async fn close_for_shutdown(&mut self) {
        self.out.queue.push_back(Message::Close(Some(CloseFrame {
            code: 1001,
            reason: "node shutting down".into(),
        })));
        let _ = self.out.write_all().await;
    }

    async fn close(&mut self) {
        if let Some(code) = self.close_code {
            self.out.queue.push_back(Message::Close(Some(CloseFrame {
                code,
                reason: "a text frame was not valid UTF-8".into(),
            })));
            let _ = self.out.write_all().await;
        }
        let _ = futures_util::SinkExt::close(&mut self.out.sink).await;
    }
}
