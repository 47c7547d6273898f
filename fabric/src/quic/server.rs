//! The node's side of QUIC: the endpoint, accepted connections, and the session transport
//! (control stream plus a unidirectional stream per subscription). Built with the `server`
//! feature only; the client's side (dialing, frame reading) is in `quic.rs`.

use super::*;
use crate::node::NodeCtx;
use crate::session::{Event, Transport, TransportError};
use crate::tls::Identity;
use fabric_edge::{InFrame, OutFrame, Session};
use fabric_proto::internal::ShardIdx;
use futures_util::FutureExt;
use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::watch;

/// How long a closing session waits for the client to acknowledge its last frames.
const CLOSE_LINGER_MS: u64 = 1_000;

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
    // The node sends keepalives too: a live client that sends none is never idle-closed, and
    // one that acknowledges nothing for IDLE_TIMEOUT_MS (gone, or its stack stuck) is.
    let mut t = transport_config(true);
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
                    // Connection caps (listener.rs): over one, it is refused and answered there.
                    if let Some((incoming, slot)) = crate::listener::admit_quic(&ctx, incoming) {
                        let ctx = ctx.clone();
                        tokio::spawn(async move {
                            let _slot = slot;
                            connection(incoming, ctx).await;
                        });
                    }
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
    let transport = QuicTransport {
        reader: FrameReader::new(recv, ctx.config.frame_bytes_max),
        out: QuicOut {
            conn,
            control: send,
            main: Vec::new(),
            main_off: 0,
            subs: HashMap::new(),
            streams_exhausted: false,
            released: Vec::new(),
            moved: false,
            flush_owed: false,
        },
    };
    crate::session::run(transport, ctx, "quic").await;
}

/// What one read of the control stream yields.
enum QuicIn {
    Frame(bytes::Bytes),
    Oversize(u64),
    /// The stream (or connection) ended, cleanly (`None`) or not.
    End(Option<crate::quic::FrameReadError>),
}

impl From<Result<Option<ReadFrame>, crate::quic::FrameReadError>> for QuicIn {
    fn from(read: Result<Option<ReadFrame>, crate::quic::FrameReadError>) -> QuicIn {
        match read {
            Ok(Some(ReadFrame::Frame(b))) => QuicIn::Frame(b),
            Ok(Some(ReadFrame::Oversize(n))) => QuicIn::Oversize(n),
            Ok(None) => QuicIn::End(None),
            Err(e) => QuicIn::End(Some(e)),
        }
    }
}

struct QuicTransport {
    /// The control stream, read in the session task itself (`FrameReader::next` is
    /// cancel-safe), so a frame reaches the core without a task hop.
    reader: FrameReader,
    out: QuicOut,
}

/// The writing side: the control stream and one unidirectional stream per subscription, each
/// written only as fast as it takes data, none waiting for another.
struct QuicOut {
    conn: quinn::Connection,
    control: quinn::SendStream,
    /// Frames queued for the control stream, and how much of them is written.
    main: Vec<u8>,
    main_off: usize,
    /// A unidirectional stream per subscribed conversation (never more than
    /// SUBSCRIPTION_STREAMS_MAX; kept until the session ends, so one conversation's events
    /// always travel on one stream, in order).
    subs: HashMap<Arc<str>, SubStream>,
    /// A stream could not be opened at once (the client allows fewer): conversations without
    /// one share the control stream from then on.
    streams_exhausted: bool,
    /// Push credit of held frames written since the last report.
    released: Vec<(ShardIdx, u32)>,
    /// The control stream moved since the last report.
    moved: bool,
    /// Something was queued since the core last heard a flush.
    flush_owed: bool,
}

/// One subscription stream and the frames it has not taken yet.
struct SubStream {
    send: quinn::SendStream,
    frames: VecDeque<Held>,
    /// Bytes of the front frame already written.
    off: usize,
    moved: bool,
    /// The core holds a write deadline for this stream.
    armed: bool,
}

/// A queued subscription frame (with its length prefix) and the push credit it holds.
struct Held {
    bytes: Vec<u8>,
    credit: Option<(ShardIdx, u32)>,
    /// The core was told at a flush that this frame's credit is held: it comes back through
    /// `released` when written. A frame written before that flush needs nothing.
    accounted: bool,
}

fn write_err(e: impl std::fmt::Display) -> TransportError {
    TransportError::Write(e.to_string())
}

impl QuicOut {
    fn pending(&self) -> bool {
        self.main_off < self.main.len() || self.subs.values().any(|s| !s.frames.is_empty())
    }

    /// The stream for `conv`'s events, opened on its first one if a stream is available now
    /// (an open that would wait for the client's stream credit is not awaited).
    fn sub_stream(&mut self, conv: &Arc<str>) -> Option<&mut SubStream> {
        if !self.subs.contains_key(conv)
            && !self.streams_exhausted
            && self.subs.len() < SUBSCRIPTION_STREAMS_MAX
        {
            match self.conn.open_uni().now_or_never() {
                Some(Ok(send)) => {
                    let sub = SubStream {
                        send,
                        frames: VecDeque::new(),
                        off: 0,
                        moved: false,
                        armed: false,
                    };
                    self.subs.insert(conv.clone(), sub);
                }
                _ => self.streams_exhausted = true,
            }
        }
        self.subs.get_mut(conv)
    }

    /// Writes every stream as far as it takes data now. Ready once something moved, or
    /// nothing is left. Cancel-safe: only what quinn took leaves a queue.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        let mut moved = false;
        while self.main_off < self.main.len() {
            match Pin::new(&mut self.control).poll_write(cx, &self.main[self.main_off..]) {
                Poll::Ready(Ok(n)) => {
                    self.main_off += n;
                    self.moved = true;
                    moved = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(write_err(e))),
                Poll::Pending => break,
            }
        }
        if self.main_off == self.main.len() {
            self.main.clear();
            self.main_off = 0;
        }
        for sub in self.subs.values_mut() {
            while let Some(front) = sub.frames.front() {
                match Pin::new(&mut sub.send).poll_write(cx, &front.bytes[sub.off..]) {
                    Poll::Ready(Ok(n)) => {
                        sub.off += n;
                        sub.moved = true;
                        moved = true;
                        if sub.off == front.bytes.len() {
                            sub.off = 0;
                            let held = sub.frames.pop_front().expect("the front frame");
                            if let (true, Some(c)) = (held.accounted, held.credit) {
                                self.released.push(c);
                            }
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(write_err(e))),
                    Poll::Pending => break,
                }
            }
        }
        if moved || !self.pending() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }

    async fn write(&mut self) -> Result<(), TransportError> {
        std::future::poll_fn(|cx| self.poll_write(cx)).await
    }

    /// Tells the core about subscription streams: deadlines armed, moved or cleared, and the
    /// credit of held frames that were written.
    fn report_streams(&mut self, core: &mut Session, now: u64) {
        for (shard, frames) in self.released.drain(..) {
            core.handle_credit_released(now, shard, frames);
        }
        for (conv, sub) in &mut self.subs {
            if sub.frames.is_empty() {
                if std::mem::take(&mut sub.armed) {
                    core.handle_stream_written(now, conv);
                }
            } else if std::mem::take(&mut sub.moved) || !sub.armed {
                sub.armed = true;
                core.handle_writing(now, Some(conv));
            }
            sub.moved = false;
        }
    }

    /// The credit held by subscription frames the core has not been told about, per shard;
    /// from now on it is told (they return it through `released` when written).
    fn take_held(&mut self) -> Vec<(ShardIdx, u32)> {
        let mut held: Vec<(ShardIdx, u32)> = Vec::new();
        for sub in self.subs.values_mut() {
            for h in sub.frames.iter_mut().filter(|h| !h.accounted) {
                h.accounted = true;
                let Some((shard, n)) = h.credit else { continue };
                match held.iter_mut().find(|(s, _)| *s == shard) {
                    Some((_, total)) => *total += n,
                    None => held.push((shard, n)),
                }
            }
        }
        held
    }
}

impl Transport for QuicTransport {
    type In = QuicIn;
    /// QUIC keeps itself alive: both sides send PING frames (every third of the idle timeout),
    /// and a connection that acknowledged nothing for IDLE_TIMEOUT_MS is closed by QUIC.
    const PINGS: bool = false;

    async fn recv(&mut self) -> QuicIn {
        QuicIn::from(self.reader.next().await)
    }

    fn handle_in(&mut self, core: &mut Session, now: u64, input: QuicIn) -> bool {
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

    fn feed(&mut self, f: OutFrame) -> Result<(), TransportError> {
        let framed = frame(&f.bytes);
        self.out.flush_owed = true;
        if let Some(conv) = &f.conv {
            if let Some(sub) = self.out.sub_stream(conv) {
                sub.frames.push_back(Held {
                    bytes: framed,
                    credit: f.credit,
                    accounted: false,
                });
                return Ok(());
            }
        }
        self.out.main.extend_from_slice(&framed);
        Ok(())
    }

    fn feed_ping(&mut self, _payload: u64) {}

    async fn write(&mut self) -> Result<(), TransportError> {
        self.out.write().await
    }

    async fn next(&mut self, reading: bool) -> Event<QuicIn> {
        let writing = self.out.pending();
        tokio::select! {
            input = self.reader.next(), if reading => Event::In(QuicIn::from(input)),
            r = self.out.write(), if writing => Event::Wrote(r),
            else => std::future::pending().await,
        }
    }

    fn report(&mut self, core: &mut Session, now: u64) -> bool {
        let out = &mut self.out;
        if std::mem::take(&mut out.moved) {
            core.handle_writing(now, None);
        }
        let main_done = out.main_off == out.main.len();
        if main_done && std::mem::take(&mut out.flush_owed) {
            // Everything polled is written but what subscription streams still hold.
            let held = out.take_held();
            core.handle_flushed_holding(now, &held);
        }
        out.report_streams(core, now);
        main_done
    }

    async fn close_for_shutdown(&mut self) {
        self.linger().await;
        self.out.conn.close(
            quinn::VarInt::from_u32(CLOSE_SHUTDOWN),
            b"node shutting down",
        );
    }

    async fn close(&mut self) {
        self.linger().await;
        self.out.conn.close(
            quinn::VarInt::from_u32(CLOSE_SESSION_ENDED),
            b"session ended",
        );
    }
}

impl QuicTransport {
    /// Writes what is queued, finishes every stream and gives the client a moment to take the
    /// last frames (a closed connection discards what it has not sent).
    async fn linger(&mut self) {
        let linger = async {
            while self.out.pending() {
                if self.out.write().await.is_err() {
                    break;
                }
            }
            let _ = self.out.control.finish();
            for sub in self.out.subs.values_mut() {
                let _ = sub.send.finish();
            }
            let _ = self.out.control.stopped().await;
        };
        let _ = tokio::time::timeout(Duration::from_millis(CLOSE_LINGER_MS), linger).await;
    }
}
