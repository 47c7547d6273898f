//! The node's HTTP ports (the HTTP/WebSocket port, plain or TLS, and the metrics port): the
//! accept loop with its connection caps, the TLS handshake limits, and hyper with a header
//! read timeout. Also the caps' bookkeeping, which QUIC's accept loop shares.
//!
//! - Caps: [`ConnLimiter`] counts client connections, in total and per address (IPv6 per
//!   /64, which one host usually holds), from accept until the connection (or the WebSocket it
//!   was upgraded to) closes. A connection over a cap is answered where the protocol allows
//!   (HTTP 503 `overloaded`, QUIC close [`QUIC_CLOSE_OVERLOADED`]), counted in
//!   `fabric_connections_refused_total`, and closed.
//! - TLS: a handshake must finish within `tls_handshake_timeout_ms` of the accept; at most
//!   [`TLS_HANDSHAKES_MAX`] run at once (more wait, within that time) and at most
//!   [`TLS_HANDSHAKES_PER_IP_MAX`] per address (more are closed at once), so slow handshakes
//!   from one host cannot hold every slot.
//! - Headers must be in within `http_header_timeout_ms` (hyper's header read timeout, which
//!   also ends idle keep-alive connections); the body timeout is a layer in `http.rs`.

use crate::metrics::ListenerMetrics;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{watch, Semaphore};

/// TLS handshakes in progress on the HTTP port at once; more wait (within the handshake time).
pub const TLS_HANDSHAKES_MAX: usize = 256;
/// TLS handshakes in progress from one address; more are closed at once.
pub const TLS_HANDSHAKES_PER_IP_MAX: u32 = 32;
/// Refusals being answered at once; past it a refused connection is closed without an answer.
const REFUSALS_IN_FLIGHT_MAX: usize = 64;
/// How long answering one refusal may take (write, then read what the client sent).
const REFUSAL_LINGER_MS: u64 = 1_000;
/// Most bytes read from a refused client before closing (so the close is not a reset that
/// could discard the answer before the client reads it).
const REFUSAL_DRAIN_BYTES_MAX: usize = 64 * 1024;
/// Connections the metrics port holds at once, and from one address.
pub const METRICS_CONNECTIONS_MAX: u32 = 256;
pub const METRICS_CONNECTIONS_PER_IP_MAX: u32 = 64;
/// QUIC application close code of a connection refused over a cap ("try again later", as
/// WebSocket's 1013).
pub const QUIC_CLOSE_OVERLOADED: u32 = 1013;

/// Why a connection was refused; the index is its place in `metrics::REFUSAL_REASONS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    ConnectionsMax(u32),
    ConnectionsPerIpMax(u32),
    TlsHandshakesPerIp(u32),
}

impl Refusal {
    fn index(self) -> usize {
        match self {
            Refusal::ConnectionsMax(_) => 0,
            Refusal::ConnectionsPerIpMax(_) => 1,
            Refusal::TlsHandshakesPerIp(_) => 2,
        }
    }

    /// What the client is told.
    pub fn message(self) -> String {
        match self {
            Refusal::ConnectionsMax(n) => {
                format!("overloaded: the node holds connections_max ({n}) connections; retry later")
            }
            Refusal::ConnectionsPerIpMax(n) => format!(
                "overloaded: this address holds connections_per_ip_max ({n}) connections; retry later"
            ),
            Refusal::TlsHandshakesPerIp(n) => format!(
                "overloaded: this address has {n} TLS handshakes in progress; retry later"
            ),
        }
    }
}

/// The per-address key: the address itself, an IPv6 address by its /64.
fn ip_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !(u64::MAX as u128))),
        v4 => v4,
    }
}

#[derive(Default)]
struct Counts {
    total: u32,
    per_ip: HashMap<IpAddr, u32>,
}

/// Counts open connections (or handshakes) in total and per address, against two caps. The
/// map holds only addresses with something open, so it is bounded by the total cap.
pub struct ConnLimiter {
    max: u32,
    per_ip_max: u32,
    counts: Mutex<Counts>,
}

/// One counted connection; uncounted when dropped.
pub struct ConnSlot {
    limiter: Arc<ConnLimiter>,
    key: IpAddr,
    open: Option<metrics::Gauge>,
}

impl ConnLimiter {
    pub fn new(max: u32, per_ip_max: u32) -> Arc<ConnLimiter> {
        Arc::new(ConnLimiter {
            max,
            per_ip_max,
            counts: Mutex::new(Counts::default()),
        })
    }

    /// Counts a connection from `ip`, unless a cap is reached; `open` (a gauge) follows it.
    pub fn try_acquire(
        self: &Arc<Self>,
        ip: IpAddr,
        open: Option<&metrics::Gauge>,
    ) -> Result<ConnSlot, Refusal> {
        let key = ip_key(ip);
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if c.total >= self.max {
            return Err(Refusal::ConnectionsMax(self.max));
        }
        let n = c.per_ip.entry(key).or_insert(0);
        if *n >= self.per_ip_max {
            return Err(Refusal::ConnectionsPerIpMax(self.per_ip_max));
        }
        *n += 1;
        c.total += 1;
        if let Some(g) = open {
            g.increment(1.0);
        }
        Ok(ConnSlot {
            limiter: self.clone(),
            key,
            open: open.cloned(),
        })
    }

    /// Connections counted now (total).
    pub fn open(&self) -> u32 {
        self.counts.lock().map_or(0, |c| c.total)
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut c = self
            .limiter
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_ip.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&self.key);
            }
        }
        if let Some(g) = &self.open {
            g.decrement(1.0);
        }
    }
}

/// An I/O stream that holds its connection's slot: a WebSocket upgraded from it takes the
/// stream, and with it the slot, along.
struct Counted<T> {
    io: T,
    _slot: ConnSlot,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// TLS on an HTTP port.
pub struct TlsSide {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub handshake_timeout: Duration,
    slots: Arc<Semaphore>,
    per_ip: Arc<ConnLimiter>,
}

impl TlsSide {
    pub fn new(config: rustls::ServerConfig, handshake_timeout: Duration) -> TlsSide {
        TlsSide {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            handshake_timeout,
            slots: Arc::new(Semaphore::new(TLS_HANDSHAKES_MAX)),
            per_ip: ConnLimiter::new(u32::MAX, TLS_HANDSHAKES_PER_IP_MAX),
        }
    }
}

/// One HTTP port's settings.
pub struct HttpPort {
    pub app: axum::Router,
    pub limiter: Arc<ConnLimiter>,
    pub tls: Option<TlsSide>,
    pub header_timeout: Duration,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Which of `metrics`' listeners this port is (`http_port` or `metrics_port`).
    pub which: fn(&crate::metrics::Metrics) -> &ListenerMetrics,
    refusals: Arc<Semaphore>,
}

impl HttpPort {
    pub fn new(
        app: axum::Router,
        limiter: Arc<ConnLimiter>,
        tls: Option<TlsSide>,
        header_timeout: Duration,
        metrics: Arc<crate::metrics::Metrics>,
        which: fn(&crate::metrics::Metrics) -> &ListenerMetrics,
    ) -> HttpPort {
        HttpPort {
            app,
            limiter,
            tls,
            header_timeout,
            metrics,
            which,
            refusals: Arc::new(Semaphore::new(REFUSALS_IN_FLIGHT_MAX)),
        }
    }

    fn meter(&self) -> &ListenerMetrics {
        (self.which)(&self.metrics)
    }
}

/// Accepts connections until `stop` turns true, then lets each finish its request (hyper's
/// graceful shutdown) and returns once all have closed.
pub async fn serve(
    listener: tokio::net::TcpListener,
    port: HttpPort,
    mut stop: watch::Receiver<bool>,
) {
    let port = Arc::new(port);
    // Every connection task holds a clone; `closed()` resolves when all are gone.
    let (alive, all_closed) = tokio::sync::mpsc::channel::<()>(1);
    loop {
        let (tcp, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off a little, keep serving.
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            () = stopped(&mut stop) => break,
        };
        let _ = tcp.set_nodelay(true);
        match port
            .limiter
            .try_acquire(addr.ip(), Some(&port.meter().open))
        {
            Ok(slot) => {
                let (port, stop, alive) = (port.clone(), stop.clone(), alive.clone());
                tokio::spawn(async move {
                    connection(tcp, addr.ip(), slot, &port, stop).await;
                    drop(alive);
                });
            }
            Err(refusal) => refuse(&port, tcp, refusal),
        }
    }
    drop(alive);
    let mut all_closed = all_closed;
    let _ = all_closed.recv().await;
}

/// Resolves once the node shuts down (the watch's guard never lives across an await).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn connection(
    tcp: tokio::net::TcpStream,
    ip: IpAddr,
    slot: ConnSlot,
    port: &HttpPort,
    mut stop: watch::Receiver<bool>,
) {
    let Some(tls) = &port.tls else {
        return serve_http(
            Counted {
                io: tcp,
                _slot: slot,
            },
            port,
            stop,
        )
        .await;
    };
    let handshaking = match tls.per_ip.try_acquire(ip, None) {
        Ok(h) => h,
        Err(_) => {
            port.meter().refused[Refusal::TlsHandshakesPerIp(0).index()].increment(1);
            tracing::debug!(%ip, "too many TLS handshakes from one address; closed");
            return;
        }
    };
    // Waiting for a handshake slot counts against the handshake's time.
    let handshake = async {
        let _permit = tls.slots.acquire().await;
        tls.acceptor.accept(tcp).await
    };
    let handshake = tokio::time::timeout(tls.handshake_timeout, handshake);
    let stream = match tokio::select! {
        r = handshake => r,
        // A shutdown does not wait for handshakes: nothing was asked yet.
        () = stopped(&mut stop) => return,
    } {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%ip, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            port.meter().timeouts[2].increment(1);
            tracing::debug!(%ip, "TLS handshake timed out");
            return;
        }
    };
    drop(handshaking);
    serve_http(
        Counted {
            io: stream,
            _slot: slot,
        },
        port,
        stop,
    )
    .await
}

/// Runs HTTP/1.1 (with upgrades, for WebSocket) on one connection.
async fn serve_http<I>(io: I, port: &HttpPort, mut stop: watch::Receiver<bool>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper_util::service::TowerToHyperService::new(port.app.clone());
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(port.header_timeout);
    let conn = builder
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = stopped(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        if e.is_timeout() {
            port.meter().timeouts[0].increment(1);
        }
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}

/// Counts a refusal and answers it (on a task of its own, bounded in number and time).
fn refuse(port: &Arc<HttpPort>, tcp: tokio::net::TcpStream, refusal: Refusal) {
    port.meter().refused[refusal.index()].increment(1);
    tracing::debug!(reason = %refusal.message(), "connection refused");
    let Ok(permit) = port.refusals.clone().try_acquire_owned() else {
        return;
    };
    let port = port.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let linger = Duration::from_millis(REFUSAL_LINGER_MS);
        let _ = tokio::time::timeout(linger, async {
            match &port.tls {
                None => answer_refused(tcp, refusal).await,
                Some(tls) => {
                    if let Ok(s) = tls.acceptor.accept(tcp).await {
                        answer_refused(s, refusal).await;
                    }
                }
            }
        })
        .await;
    });
}

/// Writes a 503 `overloaded` answer and closes, reading what the client sent meanwhile.
async fn answer_refused<I: AsyncRead + AsyncWrite + Unpin>(mut io: I, refusal: Refusal) {
    let body = serde_json::json!({"code": "overloaded", "message": refusal.message()}).to_string();
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    if io.write_all(answer.as_bytes()).await.is_err() || io.shutdown().await.is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    let mut read = 0;
    while read < REFUSAL_DRAIN_BYTES_MAX {
        match io.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => read += n,
        }
    }
}

/// QUIC's side of the caps, called from its accept loop: the connection with its slot, or
/// `None` after refusing it (a close with [`QUIC_CLOSE_OVERLOADED`] and the reason when a
/// refusal slot is free, else quinn's stateless refusal).
pub fn admit_quic(
    ctx: &crate::node::NodeCtx,
    incoming: quinn::Incoming,
) -> Option<(quinn::Incoming, ConnSlot)> {
    let m = &ctx.metrics.quic_port;
    let ip = incoming.remote_address().ip();
    let refusal = match ctx.connections.try_acquire(ip, Some(&m.open)) {
        Ok(slot) => return Some((incoming, slot)),
        Err(r) => r,
    };
    m.refused[refusal.index()].increment(1);
    tracing::debug!(%ip, reason = %refusal.message(), "QUIC connection refused");
    let Ok(permit) = ctx.quic_refusals.clone().try_acquire_owned() else {
        incoming.refuse();
        return None;
    };
    tokio::spawn(async move {
        let _permit = permit;
        let linger = Duration::from_millis(REFUSAL_LINGER_MS);
        if let Ok(Ok(conn)) = tokio::time::timeout(linger, incoming).await {
            conn.close(
                quinn::VarInt::from_u32(QUIC_CLOSE_OVERLOADED),
                refusal.message().as_bytes(),
            );
        }
    });
    None
}

/// The semaphore bounding refusals answered at once (one per listener).
pub fn refusal_slots() -> Arc<Semaphore> {
    Arc::new(Semaphore::new(REFUSALS_IN_FLIGHT_MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_count_per_address_and_in_total_and_free_on_drop() {
        // Proves both caps refuse with their reason, an IPv6 /64 counts as one address, and
        // a dropped slot frees its place.
        let l = ConnLimiter::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let s1 = l.try_acquire(a, None).unwrap();
        let _s2 = l.try_acquire(a, None).unwrap();
        assert_eq!(
            l.try_acquire(a, None).err(),
            Some(Refusal::ConnectionsPerIpMax(2))
        );
        let _s3 = l.try_acquire(b, None).unwrap();
        assert_eq!(
            l.try_acquire(b, None).err(),
            Some(Refusal::ConnectionsMax(3))
        );
        drop(s1);
        assert_eq!(l.open(), 2);
        let _s4 = l.try_acquire(a, None).unwrap();
        let v6 = ConnLimiter::new(10, 1);
        let _x = v6
            .try_acquire("2001:db8::1".parse().unwrap(), None)
            .unwrap();
        assert!(v6
            .try_acquire("2001:db8::ffff:1".parse().unwrap(), None)
            .is_err());
        assert!(v6
            .try_acquire("2001:db8:0:1::1".parse().unwrap(), None)
            .is_ok());
        // An IPv4-mapped IPv6 address is its IPv4 address.
        let _y = v6.try_acquire("10.0.0.9".parse().unwrap(), None).unwrap();
        assert!(v6
            .try_acquire("::ffff:10.0.0.9".parse().unwrap(), None)
            .is_err());
    }
}
