//! The client's transports: one connection's frames over WebSocket (`ws://`, JSON or binary)
//! or QUIC (`quic://`, length-prefixed postcard on a control stream, plus one server stream per
//! subscription). `client.rs` speaks ops; this moves them.

use crate::client::{ClientConfig, ClientError};
use crate::quic::{self, LinkError};
use fabric_proto::{codec, ClientOp, ServerOp};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Where a URL points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    Ws(String),
    Quic {
        host: String,
        port: u16,
        pin: Option<String>,
    },
}

/// A node's HTTP base URL (`http://host:port`, as `welcome`'s `nodes` names it) as the
/// session URL of its WebSocket endpoint; `None` for anything else.
pub(crate) fn ws_url_of_http(base: &str) -> Option<String> {
    let (scheme, rest) = if let Some(rest) = base.strip_prefix("http://") {
        ("ws://", rest)
    } else {
        ("wss://", base.strip_prefix("https://")?)
    };
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') {
        return None;
    }
    Some(format!("{scheme}{authority}/v1/ws"))
}

pub(crate) fn parse_url(url: &str) -> Result<Target, ClientError> {
    if url.starts_with("ws://") || url.starts_with("wss://") {
        return Ok(Target::Ws(url.to_string()));
    }
    if let Some(ws) = ws_url_of_http(url) {
        return Ok(Target::Ws(ws));
    }
    let Some(rest) = url.strip_prefix("quic://") else {
        return Err(ClientError::Invalid {
            code: fabric_proto::ErrorCode::BadRequest,
            message: format!(
                "{url:?}: the URL must be http(s)://HOST:PORT, ws(s)://HOST:PORT/v1/ws or \
                 quic://HOST:PORT"
            ),
        });
    };
    let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
    let authority = authority.trim_end_matches('/');
    let bad = |why: &str| ClientError::Invalid {
        code: fabric_proto::ErrorCode::BadRequest,
        message: format!("{url:?}: {why}"),
    };
    let (host, port) = authority
        .rsplit_once(':')
        .ok_or_else(|| bad("quic:// needs host:port"))?;
    let port: u16 = port.parse().map_err(|_| bad("bad port"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let pin = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("pin="))
        .map(str::to_string);
    Ok(Target::Quic { host, port, pin })
}

/// A connection during the handshake (before it is split into halves).
pub(crate) enum Io {
    Ws(Box<Ws>),
    Quic(Box<QuicConn>),
}

pub(crate) struct QuicConn {
    pub(crate) endpoint: quinn::Endpoint,
    pub(crate) conn: quinn::Connection,
    send: quinn::SendStream,
    reader: quic::FrameReader,
}

impl Io {
    pub(crate) async fn dial(cfg: &ClientConfig, url: &str) -> Result<Io, ClientError> {
        match parse_url(url)? {
            Target::Ws(url) => {
                // `wss://…?pin=HEX`: trust the node's certificate by its SHA-256 (the pin is
                // ours, not part of the request).
                let (url, pin) = match url.split_once("?pin=") {
                    Some((u, p)) => (u.to_string(), Some(p.to_string())),
                    None => (url, None),
                };
                let connector = if url.starts_with("wss://") {
                    let trust = match pin {
                        Some(p) => crate::tls::Trust::Pin(
                            crate::tls::parse_pin(&p)
                                .map_err(|e| ClientError::Quic(e.to_string()))?,
                        ),
                        None => cfg.trust.clone(),
                    };
                    let tls = crate::tls::client_config(&trust, crate::tls::ALPN_HTTP1)
                        .map_err(|e| ClientError::Protocol(e.to_string()))?;
                    Some(tokio_tungstenite::Connector::Rustls(std::sync::Arc::new(
                        tls,
                    )))
                } else {
                    None
                };
                // Nagle would hold small frames back for the ack of the previous one: latency
                // for nothing, since the writer already batches.
                // Messages over this client's frame limit fail the connection instead of being
                // buffered (the node never sends one over its own frame_bytes_max).
                let ws_config =
                    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
                        .max_message_size(Some(cfg.frame_bytes_max))
                        .max_frame_size(Some(cfg.frame_bytes_max));
                let (ws, _) = tokio_tungstenite::connect_async_tls_with_config(
                    url.as_str(),
                    Some(ws_config),
                    true,
                    connector,
                )
                .await?;
                Ok(Io::Ws(Box::new(ws)))
            }
            Target::Quic { host, port, pin } => {
                let trust = match pin {
                    Some(p) => crate::tls::Trust::Pin(
                        crate::tls::parse_pin(&p).map_err(|e| ClientError::Quic(e.to_string()))?,
                    ),
                    None => cfg.trust.clone(),
                };
                let d = quic::dial(&host, port, &trust, &cfg.alpn)
                    .await
                    .map_err(|e| ClientError::Quic(e.to_string()))?;
                let (endpoint, conn, send) = (d.endpoint, d.conn, d.send);
                // Server frames are read up to this client's own frame limit: a length prefix
                // over it is never buffered (it ends the connection instead).
                let reader = quic::FrameReader::for_client(d.recv, cfg.frame_bytes_max);
                Ok(Io::Quic(Box::new(QuicConn {
                    endpoint,
                    conn,
                    send,
                    reader,
                })))
            }
        }
    }

    /// Whether ops go as binary frames (QUIC always; WebSocket as configured).
    pub(crate) fn binary(&self, configured: bool) -> bool {
        matches!(self, Io::Quic(_)) || configured
    }

    pub(crate) async fn send(&mut self, op: &ClientOp, binary: bool) -> Result<(), ClientError> {
        match self {
            Io::Ws(ws) => Ok(ws.send(encode_ws(op, binary)?).await?),
            Io::Quic(q) => q
                .send
                .write_all(&quic::frame(&codec::encode_client_binary(op)))
                .await
                .map_err(|e| ClientError::Quic(e.to_string())),
        }
    }

    /// The next frame's ops, during the handshake (control stream only).
    pub(crate) async fn recv(&mut self) -> Result<Vec<ServerOp>, ClientError> {
        match self {
            Io::Ws(ws) => loop {
                let ops = match ws.next().await {
                    Some(Ok(Message::Text(t))) => codec::decode_server_json(t.as_bytes()),
                    Some(Ok(Message::Binary(b))) => codec::decode_server_binary(&b),
                    Some(Ok(Message::Close(frame))) => {
                        return Err(ClientError::Protocol(format!(
                            "the node closed the connection before welcome: {}",
                            frame.map_or_else(String::new, |f| f.reason.to_string())
                        )))
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(e.into()),
                    None => {
                        return Err(ClientError::Protocol(
                            "the node closed the connection before welcome".into(),
                        ))
                    }
                };
                return ops.map_err(|e| ClientError::Protocol(format!("undecodable frame: {e}")));
            },
            Io::Quic(q) => match q.reader.next().await {
                Ok(Some(quic::ReadFrame::Frame(b))) => codec::decode_server_binary(&b)
                    .map_err(|e| ClientError::Protocol(format!("undecodable frame: {e}"))),
                Ok(Some(quic::ReadFrame::Oversize(n))) => Err(ClientError::Protocol(
                    quic::oversize(n, q.reader.frame_bytes_max()).to_string(),
                )),
                Ok(None) => Err(ClientError::Protocol(
                    "the node closed the connection before welcome".into(),
                )),
                Err(e) => Err(ClientError::Quic(format!(
                    "{e} ({})",
                    quic::close_reason(&q.conn)
                ))),
            },
        }
    }

    pub(crate) fn split(self) -> (WriteHalf, ReadHalf, Option<quinn::Endpoint>) {
        match self {
            Io::Ws(ws) => {
                let (sink, stream) = (*ws).split();
                (WriteHalf::Ws(sink), ReadHalf::Ws(stream), None)
            }
            Io::Quic(q) => {
                let q = *q;
                (
                    WriteHalf::Quic(q.send),
                    ReadHalf::Quic {
                        reader: q.reader,
                        conn: q.conn,
                    },
                    Some(q.endpoint),
                )
            }
        }
    }
}

/// The unspecified address of `remote`'s family, any port.
pub(crate) fn local_any(remote: SocketAddr) -> SocketAddr {
    if remote.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    }
}

pub(crate) fn encode_ws(op: &ClientOp, binary: bool) -> Result<Message, ClientError> {
    if binary {
        Ok(Message::Binary(codec::encode_client_binary(op).into()))
    } else {
        let mut out = Vec::with_capacity(128);
        codec::encode_client_json(op, &mut out);
        text_message(out)
    }
}

pub(crate) fn text_message(bytes: Vec<u8>) -> Result<Message, ClientError> {
    String::from_utf8(bytes)
        .map(|s| Message::Text(s.into()))
        .map_err(|_| ClientError::Protocol("encoded JSON is not UTF-8".into()))
}

/// The writing half of a connection.
pub(crate) enum WriteHalf {
    Ws(SplitSink<Ws, Message>),
    Quic(quinn::SendStream),
}

impl WriteHalf {
    /// Writes `batch` (one op, or several as one batch frame) as one frame.
    pub(crate) async fn write(
        &mut self,
        batch: &mut Vec<ClientOp>,
        binary: bool,
        json: &mut Vec<u8>,
    ) -> Result<(), LinkError> {
        let one = batch.len() == 1;
        match self {
            WriteHalf::Ws(sink) => {
                let msg = if one {
                    let op = batch.pop().expect("a batch holds at least one op");
                    encode_ws(&op, binary).map_err(|e| LinkError::Encode(e.to_string()))?
                } else if binary {
                    Message::Binary(
                        codec::encode_client_binary(&ClientOp::Batch(std::mem::take(batch))).into(),
                    )
                } else {
                    json.clear();
                    json.push(b'[');
                    for (i, op) in batch.drain(..).enumerate() {
                        if i > 0 {
                            json.push(b',');
                        }
                        codec::encode_client_json(&op, json);
                    }
                    json.push(b']');
                    text_message(std::mem::take(json))
                        .map_err(|e| LinkError::Encode(e.to_string()))?
                };
                sink.send(msg)
                    .await
                    .map_err(|e| LinkError::WebSocket(format!("write failed: {e}")))
            }
            WriteHalf::Quic(send) => {
                let bytes = if one {
                    let op = batch.pop().expect("a batch holds at least one op");
                    codec::encode_client_binary(&op)
                } else {
                    codec::encode_client_binary(&ClientOp::Batch(std::mem::take(batch)))
                };
                send.write_all(&quic::frame(&bytes))
                    .await
                    .map_err(LinkError::QuicWrite)
            }
        }
    }

    /// The client is done: a close frame, or the end of the control stream.
    pub(crate) async fn close(&mut self) {
        match self {
            WriteHalf::Ws(sink) => {
                let _ = sink.send(Message::Close(None)).await;
            }
            WriteHalf::Quic(send) => {
                let _ = send.finish();
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(1), send.stopped()).await;
            }
        }
    }
}

/// The reading half of a connection: yields each frame's ops, control stream and subscription
/// streams merged.
pub(crate) enum ReadHalf {
    Ws(SplitStream<Ws>),
    Quic {
        reader: quic::FrameReader,
        conn: quinn::Connection,
    },
}

impl ReadHalf {
    /// Runs `handle` on every frame's ops until the connection ends; returns why.
    pub(crate) async fn run<F, Fut>(self, mut handle: F) -> Result<(), LinkError>
    where
        F: FnMut(Vec<ServerOp>) -> Fut,
        Fut: std::future::Future<Output = Result<(), LinkError>>,
    {
        match self {
            ReadHalf::Ws(mut stream) => loop {
                let ops = match stream.next().await {
                    Some(Ok(Message::Text(t))) => codec::decode_server_json(t.as_bytes()),
                    Some(Ok(Message::Binary(b))) => codec::decode_server_binary(&b),
                    Some(Ok(Message::Close(frame))) => {
                        return Err(LinkError::Closed(
                            frame.map_or_else(|| "no reason".into(), |f| f.reason.to_string()),
                        ))
                    }
                    // Pings are answered by tungstenite itself.
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(LinkError::WebSocket(format!("read failed: {e}"))),
                    None => return Err(LinkError::Closed("end of stream".into())),
                };
                match ops {
                    Ok(ops) => handle(ops).await?,
                    // A frame we cannot read may have held answers we will never see: waiting
                    // requests would hang, so the connection is given up instead.
                    Err(e) => return Err(LinkError::Undecodable(e)),
                }
            },
            ReadHalf::Quic { reader, conn } => {
                let mut frames = quic::ServerFrames::spawn_with(conn, reader);
                loop {
                    match frames.recv().await {
                        Ok(ops) => handle(ops).await?,
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }
}
