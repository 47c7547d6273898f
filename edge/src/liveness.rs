//! Whether the peer is still there and still reading: write deadlines, pings and pongs.
//!
//! - **Writes.** The glue says when it starts or advances a write ([`Session::handle_writing`],
//!   per stream: `None` is the connection's main stream, a conversation names a subscription
//!   stream) and when one is done ([`Session::handle_flushed`],
//!   [`Session::handle_stream_written`]). A write that makes no progress for
//!   `write_timeout_ms` means the client stopped reading: on the main stream nothing more can
//!   reach it, so the session closes and the glue abandons the transport
//!   ([`Session::is_write_abandoned`]); on a subscription stream the session closes with an
//!   `overloaded` error on the main stream.
//! - **Pings.** Every `ping_interval_ms` (from the start, then from the last ping) a ping is
//!   due; the glue takes it with [`Session::poll_ping`] and sends a transport ping (a WebSocket
//!   ping control frame). A pong more than `pong_timeout_ms` late closes the session as
//!   `overloaded`: the peer is gone or stuck. A live idle client answers pings by itself (its
//!   WebSocket library does), so it is never closed. A pong can only be seen when the glue
//!   reads, so while the node itself is not reading (the in-flight limit) or is still writing
//!   (guarded by the write deadline), a late pong gets another period.
//!
//! The hello deadline is the session's own (`hello_timeout_ms`); all of these run beside it,
//! and none depends on a write finishing: the glue races every write against
//! [`Session::poll_timeout`].

use crate::{ErrorCode, ProtoError, Session, SessionConfig};
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Debug)]
pub(crate) struct Liveness {
    ping_interval_ms: u64,
    pong_timeout_ms: u64,
    write_timeout_ms: u64,
    /// When the next ping is due; `None` while one is out (or pings are off).
    ping_at: Option<u64>,
    /// The ping deadline passed: the glue should take a ping with `poll_ping`.
    ping_due: bool,
    ping_sent_at: u64,
    pong_deadline: Option<u64>,
    pings: u64,
    /// Write deadlines per stream (`None`: the main stream). At most one per subscription
    /// stream the transport has, plus one.
    writes: BTreeMap<Option<Arc<str>>, u64>,
    abandoned: bool,
}

impl Liveness {
    pub(crate) fn new(now: u64, config: &SessionConfig) -> Liveness {
        Liveness {
            ping_interval_ms: config.ping_interval_ms,
            pong_timeout_ms: config.pong_timeout_ms,
            write_timeout_ms: config.write_timeout_ms,
            ping_at: (config.ping_interval_ms > 0)
                .then(|| now.saturating_add(config.ping_interval_ms)),
            ping_due: false,
            ping_sent_at: now,
            pong_deadline: None,
            pings: 0,
            writes: BTreeMap::new(),
            abandoned: false,
        }
    }

    pub(crate) fn poll_timeout(&self, closed: bool) -> Option<u64> {
        let write = self.writes.values().min().copied();
        if closed {
            return write;
        }
        let ping = self.ping_at.filter(|_| !self.ping_due);
        [write, ping, self.pong_deadline]
            .into_iter()
            .flatten()
            .min()
    }

    pub(crate) fn written(&mut self, stream: Option<&Arc<str>>) {
        self.writes.remove(&stream.cloned());
    }
}

impl Session {
    /// The glue starts a write on `stream` (`None`: the main stream), or the one under way made
    /// progress (the transport took a frame or some bytes): it has `write_timeout_ms` to make
    /// more, or to finish.
    pub fn handle_writing(&mut self, now: u64, stream: Option<&Arc<str>>) {
        let l = &mut self.liveness;
        if l.write_timeout_ms > 0 && !l.abandoned {
            let deadline = now.saturating_add(l.write_timeout_ms);
            l.writes.insert(stream.cloned(), deadline);
        }
    }

    /// Everything queued for subscription stream `conv` is written: no deadline on it.
    pub fn handle_stream_written(&mut self, _now: u64, conv: &Arc<str>) {
        self.liveness.written(Some(conv));
    }

    /// A transport ping to send now, if one is due; its payload (a counter) is for the glue's
    /// logs only: any pong answers it.
    pub fn poll_ping(&mut self, now: u64) -> Option<u64> {
        let l = &mut self.liveness;
        if !l.ping_due || matches!(self.state, crate::State::Closed) {
            return None;
        }
        l.ping_due = false;
        l.ping_at = None;
        l.ping_sent_at = now;
        l.pong_deadline = Some(now.saturating_add(l.pong_timeout_ms));
        l.pings += 1;
        self.stats.pings_sent += 1;
        Some(l.pings)
    }

    /// A transport pong came: the peer is alive and reading. The next ping is due one interval
    /// after the last one went out.
    pub fn handle_pong(&mut self, _now: u64) {
        let l = &mut self.liveness;
        if l.pong_deadline.take().is_some() {
            l.ping_at = Some(l.ping_sent_at.saturating_add(l.ping_interval_ms));
        }
    }

    /// True once a write timed out: the glue must stop writing (nothing it writes can arrive)
    /// and drop the transport without a closing handshake.
    pub fn is_write_abandoned(&self) -> bool {
        self.liveness.abandoned
    }

    /// The write, ping and pong deadlines at `now`; true if one of them closed the session.
    pub(crate) fn liveness_timeout(&mut self, now: u64) -> bool {
        let late = self
            .liveness
            .writes
            .iter()
            .find(|(_, &d)| now >= d)
            .map(|(s, _)| s.clone());
        if let Some(stream) = late {
            self.write_timed_out(now, stream);
            return true;
        }
        if self.is_closed() {
            return false;
        }
        if self.liveness.pong_deadline.is_some_and(|d| now >= d) {
            if self.liveness.writes.is_empty() && self.wants_read() {
                self.stats.pongs_late += 1;
                let late_ms = self.liveness.pong_timeout_ms;
                self.error(
                    None,
                    ProtoError::new(
                        ErrorCode::Overloaded,
                        format!(
                            "no pong to the node's ping within {late_ms} ms (pong_timeout_ms); \
                             closing the session"
                        ),
                    ),
                );
                self.close(now);
                return true;
            }
            // The pong may be waiting behind what the node is not reading or still writing.
            self.liveness.pong_deadline = Some(now.saturating_add(self.liveness.pong_timeout_ms));
        }
        let l = &mut self.liveness;
        if l.pong_deadline.is_none() && l.ping_at.is_some_and(|t| now >= t) {
            l.ping_due = true;
        }
        false
    }

    /// A write on `stream` made no progress for `write_timeout_ms`. On the main stream the
    /// client can be told nothing more: every queued frame is dropped and the transport is
    /// abandoned. On a subscription stream the main stream still works: it says why.
    fn write_timed_out(&mut self, now: u64, stream: Option<Arc<str>>) {
        self.stats.writes_timed_out += 1;
        self.liveness.writes.remove(&stream);
        let timeout_ms = self.liveness.write_timeout_ms;
        match stream {
            None => {
                self.liveness.abandoned = true;
                self.liveness.writes.clear();
                self.transmit.clear();
                self.close(now);
            }
            Some(conv) if !self.is_closed() => {
                self.error(
                    None,
                    ProtoError::new(
                        ErrorCode::Overloaded,
                        format!(
                            "the stream of conversation {conv} took nothing for {timeout_ms} ms \
                             (write_timeout_ms): the client does not read it; closing the \
                             session"
                        ),
                    ),
                );
                self.close(now);
            }
            Some(_) => {}
        }
    }
}
