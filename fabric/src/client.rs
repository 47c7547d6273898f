//! The Rust client: [`Admin`] and two peer-token HTTP helpers over REST, and [`Client`], a
//! pipelined session over WebSocket or QUIC.
//!
//! # The session client
//!
//! [`Client::connect`] dials the URL of [`ClientConfig::url`]: `ws://host:port/v1/ws` (or
//! `wss://`) for WebSocket, `quic://host:port` for QUIC (ALPN `fabric/1`; the node's
//! certificate is trusted by [`ClientConfig::trust`], or by a `?pin=SHA256` in the URL). Over
//! QUIC every frame is postcard on one control stream, and each subscription's events arrive on
//! a stream of their own, so a busy conversation never holds up inbox deliveries or answers; a
//! change of the client's address (a phone changing networks, or [`Client::rebind`]) keeps the
//! session. Everything below is the same on both. It says hello and waits for the welcome. After
//! that every request method takes `&self`, so one `Client` (shared through an `Arc`) can have
//! many requests in flight at once: up to [`ClientConfig::window`]; further callers wait for a
//! slot. One background task owns the socket. Callers queue ops into a bounded channel; the
//! task's writer half takes whatever is queued and sends it as one batched frame (a JSON array
//! or a binary `Batch`), so a thousand concurrent appends cost a handful of frames, not a
//! thousand. Its reader half matches each answer (`ok`, `pong`, `error`) to its request by
//! `ref`; answers may come in any order. An `ok` means the server made the request durable.
//!
//! Pushed frames (`deliver` for the peer's inbox, `event` for subscribed conversations) are
//! read with [`Client::next_delivery`] from a bounded queue of
//! [`ClientConfig::incoming_frames_max`] frames. **Drain it**: when it is full the reader stops
//! reading the socket, and that also holds up the answers to your requests (there is one socket).
//!
//! ## Reconnecting and resume
//!
//! When the connection drops, requests in flight fail with [`ClientError::Disconnected`]: they
//! may or may not have taken effect. Retry them; an append with an idempotency `key` is safe to
//! retry (the server answers a retried key with the original `seq`), a `send` is not (a retry
//! may deliver twice). [`Client::next_delivery`] returns `None` once the connection is gone and
//! the queue is drained. Call [`Client::reconnect`], which:
//!
//! 1. dials again and says hello (the server then redelivers the inbox from its durable cursor);
//! 2. re-sends `ack` with the highest `upto` you passed to [`Client::ack`], in case the last ack
//!    was lost with the old connection (acks are fire-and-forget);
//! 3. re-subscribes every live subscription from (last `seq` handed to you for it) + 1.
//!
//! In a cluster, give [`ClientConfig::url`] several nodes, comma-separated. `connect` uses the
//! first that takes the session (a node that cannot be reached, or answers `unavailable` or
//! `overloaded`, is passed over); `reconnect` starts at the node after the current one. A
//! WebSocket client also adds the nodes its welcomes name ([`Client::nodes`]) to its list, so
//! one address is enough to find the others.
//!
//! De-duplication, exactly: inbox messages arrive in `pos` order, and this `Client` hands out a
//! `deliver` only if its `pos` is above every `pos` it already handed out (across all of its
//! connections). So each `pos` reaches you **at most once per `Client`**, and the redelivery of
//! messages you received but had not acked yet is swallowed. Unacked messages are handed out
//! again only to a *new* `Client` of the same peer (e.g. after a process restart): that is the
//! at-least-once guarantee, so ack what you have processed. Likewise an `event` is handed out
//! only if its `seq` is above the last one handed out for that conversation, and only while the
//! conversation is subscribed (stragglers after [`Client::unsubscribe`] are dropped).
//!
//! ```no_run
//! use fabric::client::{Admin, Client, ClientConfig, Incoming};
//! # async fn demo() -> Result<(), fabric::client::ClientError> {
//! let admin = Admin::new("http://127.0.0.1:7400", "admin-token");
//! admin.create_mesh("m").await?;
//! let token = admin.add_peer("m", "alice", &["ops"]).await?;
//!
//! let cfg = ClientConfig::new("ws://127.0.0.1:7400/v1/ws", "m", "alice", &token);
//! let client = std::sync::Arc::new(Client::connect(cfg).await?);
//! client.subscribe("chat", 1).await?;
//! // Pipelined: both appends are in flight together.
//! let (hi, again) = (serde_json::json!({"text": "hi"}), serde_json::json!({"text": "again"}));
//! let (a, b) = tokio::join!(
//!     client.append("chat", &hi, Some("msg-1")),
//!     client.append("chat", &again, None),
//! );
//! println!("durable at seq {} and {}", a?, b?);
//! while let Some(push) = client.next_delivery().await {
//!     match push {
//!         Incoming::Event { seq, body, .. } => println!("event {seq}: {body:?}"),
//!         Incoming::Deliver { pos, .. } => client.ack(pos).await?,
//!     }
//! }
//! // `None`: the connection is gone. Resume where we were.
//! client.reconnect().await?;
//! # Ok(()) }
//! ```

use crate::client_io::{Io, ReadHalf, WriteHalf};
use crate::quic::LinkError;
use fabric_proto::{
    validate_conv, validate_id, validate_key, Body, ClientOp, ConvId, DeliveredEvent, ErrorCode,
    IdKind, MeshId, PeerId, ProtoError, ServerOp, Target,
};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

/// Requests in flight per client unless configured otherwise (the node's own per-session limit
/// defaults to 1024; staying under it means the node never stops reading us).
pub const WINDOW_REQUESTS_DEFAULT: usize = 256;
/// Pushed frames buffered for [`Client::next_delivery`] unless configured otherwise.
pub const INCOMING_FRAMES_DEFAULT: usize = 4096;
/// Server ops the client asks to receive joined in one frame (`options` `batch`).
pub const BATCH_OPS_IN_DEFAULT: u32 = 256;
/// The `ref` of the `options` op a client sends with its hello (its `ok` precedes `welcome`).
const OPTIONS_REF: u64 = 0;
/// Dial + hello + welcome must finish within this unless configured otherwise.
pub const CONNECT_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// A batched frame is cut at this size even if more ops are queued: big enough to amortize
/// per-frame costs, small enough that one frame never nears the node's frame limit.
const BATCH_FRAME_BYTES_MAX: usize = 256 * 1024;
/// Upper bound of what an op adds to a JSON frame besides its body and ids (field names, ref,
/// punctuation). Ids use a restricted alphabet, so they are never escaped.
const OP_OVERHEAD_BYTES: usize = 96;
/// How long [`Client::close`] waits for the socket task to send its close frame.
const CLOSE_WAIT_MS: u64 = 5_000;
/// Most session URLs a client keeps (configured plus learned from `welcome`'s `nodes`): a
/// node cannot grow a client's list without bound.
pub const URLS_MAX: usize = 64;

/// Everything that can go wrong in this module.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The node refused the request (or the hello) with a stable error code.
    #[error("server error {code}: {message}")]
    Server { code: ErrorCode, message: String },
    /// The request was not sent: it breaks a protocol rule the node would refuse it for.
    #[error("invalid request ({code}): {message}")]
    Invalid { code: ErrorCode, message: String },
    /// The connection dropped before the answer came: the request may or may not have taken
    /// effect. Reconnect and retry (appends with a key are idempotent).
    #[error("disconnected; the request may or may not have taken effect")]
    Disconnected,
    /// Dialing or the WebSocket handshake failed.
    #[error("websocket: {0}")]
    WebSocket(#[from] Box<tokio_tungstenite::tungstenite::Error>),
    /// Dialing over QUIC, its TLS handshake (a certificate that does not match the pin, a
    /// refused ALPN) or a QUIC stream failed.
    #[error("quic: {0}")]
    Quic(String),
    /// An HTTP request failed below the API (connect, read, decode).
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    /// The node sent something the protocol does not allow.
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("timed out: {0}")]
    Timeout(&'static str),
}

impl ClientError {
    /// The stable code, for errors that carry one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } | ClientError::Invalid { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl From<ProtoError> for ClientError {
    /// Local validation failures (the node would have said the same).
    fn from(e: ProtoError) -> ClientError {
        ClientError::Invalid {
            code: e.code,
            message: e.message,
        }
    }
}

impl From<tokio_tungstenite::tungstenite::Error> for ClientError {
    fn from(e: tokio_tungstenite::tungstenite::Error) -> ClientError {
        ClientError::WebSocket(Box::new(e))
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

/// One connection pool for the free HTTP helpers (a `reqwest::Client` per call would dial anew).
fn shared_http() -> &'static reqwest::Client {
    static HTTP: OnceLock<reqwest::Client> = OnceLock::new();
    HTTP.get_or_init(reqwest::Client::new)
}

/// The node's error body, `{"code","message"}`.
#[derive(Deserialize)]
struct ErrorBody {
    code: String,
    #[serde(default)]
    message: String,
}

/// Returns the body of a 2xx response, or the node's error as [`ClientError::Server`].
async fn checked(resp: reqwest::Response) -> Result<bytes::Bytes, ClientError> {
    let status = resp.status();
    let body = resp.bytes().await?;
    if status.is_success() {
        return Ok(body);
    }
    match serde_json::from_slice::<ErrorBody>(&body) {
        Ok(e) => match ErrorCode::from_str_code(&e.code) {
            Some(code) => Err(ClientError::Server {
                code,
                message: e.message,
            }),
            None => Err(ClientError::Protocol(format!(
                "HTTP {status} with unknown error code {:?}: {}",
                e.code, e.message
            ))),
        },
        Err(_) => Err(ClientError::Protocol(format!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(512)])
        ))),
    }
}

fn parse_body<'a, T: Deserialize<'a>>(what: &str, body: &'a [u8]) -> Result<T, ClientError> {
    serde_json::from_slice(body).map_err(|e| {
        ClientError::Protocol(format!("{what} response is not the expected JSON: {e}"))
    })
}

/// The URLs of a list: one URL, or several separated by commas (a cluster's nodes), in
/// order, blanks dropped.
pub fn split_urls(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_string)
        .collect()
}

fn trim_base(base: &str) -> &str {
    base.trim_end_matches('/')
}

/// Admin calls (`Authorization: Bearer <admin token>`).
#[derive(Debug, Clone)]
pub struct Admin {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Admin {
    /// `base_url` is the node's HTTP address, e.g. `http://127.0.0.1:7400`.
    pub fn new(base_url: &str, admin_token: &str) -> Admin {
        Admin {
            http: reqwest::Client::new(),
            base: trim_base(base_url).to_string(),
            token: admin_token.to_string(),
        }
    }

    /// [`Admin::new`] for a node whose HTTP port speaks TLS (`https://`, `--ws-tls`), trusted
    /// as `trust` says (its certificate's pin, or roots).
    pub fn with_trust(
        base_url: &str,
        admin_token: &str,
        trust: &crate::tls::Trust,
    ) -> Result<Admin, ClientError> {
        let tls = crate::tls::client_config(trust, crate::tls::ALPN_HTTP1)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .build()?;
        Ok(Admin {
            http,
            base: trim_base(base_url).to_string(),
            token: admin_token.to_string(),
        })
    }

    /// `POST /v1/meshes`. An existing mesh is [`ErrorCode::Conflict`].
    pub async fn create_mesh(&self, mesh: &str) -> Result<(), ClientError> {
        validate_id(IdKind::Mesh, mesh)?;
        let resp = self
            .http
            .post(format!("{}/v1/meshes", self.base))
            .bearer_auth(&self.token)
            .json(&serde_json::json!({ "id": mesh }))
            .send()
            .await?;
        checked(resp).await.map(|_| ())
    }

    /// `POST /v1/meshes/M/peers`; returns the peer's token (the node keeps only its hash).
    pub async fn add_peer(
        &self,
        mesh: &str,
        peer: &str,
        groups: &[&str],
    ) -> Result<String, ClientError> {
        // Ids go into the URL path: the restricted id alphabet is what makes that safe.
        validate_id(IdKind::Mesh, mesh)?;
        validate_id(IdKind::Peer, peer)?;
        let resp = self
            .http
            .post(format!("{}/v1/meshes/{mesh}/peers", self.base))
            .bearer_auth(&self.token)
            .json(&serde_json::json!({ "id": peer, "groups": groups }))
            .send()
            .await?;
        let body = checked(resp).await?;
        #[derive(Deserialize)]
        struct Added {
            token: String,
        }
        Ok(parse_body::<Added>("add peer", &body)?.token)
    }

    /// `POST /v1/meshes/M/peers` with an ed25519 public key (64 hex characters): the peer says
    /// hello by signature ([`ClientConfig::with_key`]). With `with_token` it gets a token too,
    /// returned here.
    pub async fn add_peer_with_key(
        &self,
        mesh: &str,
        peer: &str,
        groups: &[&str],
        public_key: &str,
        with_token: bool,
    ) -> Result<Option<String>, ClientError> {
        validate_id(IdKind::Mesh, mesh)?;
        validate_id(IdKind::Peer, peer)?;
        let resp = self
            .http
            .post(format!("{}/v1/meshes/{mesh}/peers", self.base))
            .bearer_auth(&self.token)
            .json(&serde_json::json!({
                "id": peer,
                "groups": groups,
                "public_key": public_key,
                "token": with_token,
            }))
            .send()
            .await?;
        let body = checked(resp).await?;
        #[derive(Deserialize)]
        struct Added {
            token: Option<String>,
        }
        Ok(parse_body::<Added>("add peer", &body)?.token)
    }
}

/// `POST /v1/meshes/M/conversations/C/messages` with a peer token; returns the durable `seq`.
pub async fn append_http(
    base: &str,
    token: &str,
    mesh: &str,
    conv: &str,
    body: &serde_json::Value,
    key: Option<&str>,
) -> Result<u64, ClientError> {
    validate_id(IdKind::Mesh, mesh)?;
    validate_conv(conv)?;
    if let Some(k) = key {
        validate_key(k)?;
    }
    let mut req = serde_json::json!({ "body": body });
    if let Some(k) = key {
        req["key"] = serde_json::Value::from(k);
    }
    let resp = shared_http()
        .post(format!(
            "{}/v1/meshes/{mesh}/conversations/{conv}/messages",
            trim_base(base)
        ))
        .bearer_auth(token)
        .json(&req)
        .send()
        .await?;
    let body = checked(resp).await?;
    #[derive(Deserialize)]
    struct Appended {
        seq: u64,
    }
    Ok(parse_body::<Appended>("append", &body)?.seq)
}

/// A conversation entry as replayed over HTTP (the same shape as a pushed `event`).
pub type Event = DeliveredEvent;

/// `GET /v1/meshes/M/conversations/C/messages?from=N&limit=L` with a peer token: up to `limit`
/// durable entries from `from` on, and the conversation's durable head.
pub async fn read_http(
    base: &str,
    token: &str,
    mesh: &str,
    conv: &str,
    from: u64,
    limit: u32,
) -> Result<(Vec<Event>, u64), ClientError> {
    validate_id(IdKind::Mesh, mesh)?;
    validate_conv(conv)?;
    let resp = shared_http()
        .get(format!(
            "{}/v1/meshes/{mesh}/conversations/{conv}/messages?from={from}&limit={limit}",
            trim_base(base)
        ))
        .bearer_auth(token)
        .send()
        .await?;
    let body = checked(resp).await?;
    #[derive(Deserialize)]
    struct Msg<'a> {
        seq: u64,
        from: String,
        // Kept as the node sent it; bodies are never re-serialized.
        #[serde(borrow)]
        body: &'a serde_json::value::RawValue,
        #[serde(default)]
        ts: u64,
    }
    #[derive(Deserialize)]
    struct Page<'a> {
        #[serde(borrow)]
        messages: Vec<Msg<'a>>,
        head: u64,
    }
    let page: Page<'_> = parse_body("read", &body)?;
    let conv: Arc<str> = conv.into();
    let events = page
        .messages
        .into_iter()
        .map(|m| DeliveredEvent {
            conv: conv.clone(),
            seq: m.seq,
            from: m.from.into(),
            body: Body::from_trusted(bytes::Bytes::copy_from_slice(m.body.get().as_bytes())),
            ts: m.ts,
        })
        .collect();
    Ok((events, page.head))
}

// ---------------------------------------------------------------------------------------------
// WebSocket client
// ---------------------------------------------------------------------------------------------

/// How to reach and authenticate as one peer.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Where to connect: `ws://host:port/v1/ws` (or `wss://`), `quic://host:port`, or a
    /// node's HTTP base URL `http://host:port` (its WebSocket endpoint is used); or several
    /// of them separated by commas (a cluster's nodes). `connect` tries them in order, and
    /// `reconnect` starts at the one after the current, so a dead node is skipped.
    pub url: String,
    pub mesh: String,
    pub peer: String,
    pub token: String,
    /// Speak postcard binary frames instead of JSON text frames.
    pub binary: bool,
    /// Most requests in flight (sent, not yet answered); further callers wait. Unit: requests.
    pub window: usize,
    /// Pushed frames buffered for [`Client::next_delivery`] before the reader stops reading.
    pub incoming_frames_max: usize,
    /// Dial + hello + welcome deadline.
    pub connect_timeout_ms: u64,
    /// The node's frame limit: a single request larger than this is refused locally (a frame
    /// over the limit would be refused by the node as a whole, with no `ref` to answer).
    pub frame_bytes_max: usize,
    /// Say hello with this ed25519 key (challenge, then a signed hello) instead of `token`.
    /// Set with [`ClientConfig::with_key`].
    pub key: Option<crate::identity::Identity>,
    /// How a `quic://` client trusts the node's certificate (a `?pin=` in the URL wins).
    pub trust: crate::tls::Trust,
    /// The ALPN protocol a `quic://` client offers (`fabric/1`; changeable only to test that
    /// the node refuses others).
    pub alpn: Vec<u8>,
    /// Most server ops the node may join into one frame for this client (`options` with
    /// `batch`, sent with the hello): fewer, larger frames for both sides. 0 or 1: one op
    /// per frame.
    pub batch_ops_in_max: u32,
}

impl ClientConfig {
    /// Authenticates with the peer's ed25519 key instead of a token: `dial` sends
    /// `challenge`, signs the nonce the node answers with, and sends `hello` with `sig` and
    /// `ts` (docs/PROTOCOL.md, "Key hellos"). The token, if any, is then not used.
    pub fn with_key(mut self, key: crate::identity::Identity) -> ClientConfig {
        self.key = Some(key);
        self
    }

    /// JSON frames, [`WINDOW_REQUESTS_DEFAULT`] in flight, the other defaults above.
    pub fn new(url: &str, mesh: &str, peer: &str, token: &str) -> ClientConfig {
        ClientConfig {
            url: url.to_string(),
            mesh: mesh.to_string(),
            peer: peer.to_string(),
            token: token.to_string(),
            binary: false,
            window: WINDOW_REQUESTS_DEFAULT,
            incoming_frames_max: INCOMING_FRAMES_DEFAULT,
            connect_timeout_ms: CONNECT_TIMEOUT_MS_DEFAULT,
            frame_bytes_max: fabric_proto::FRAME_BYTES_MAX_DEFAULT,
            key: None,
            trust: crate::tls::Trust::Unset,
            alpn: crate::tls::ALPN.to_vec(),
            batch_ops_in_max: BATCH_OPS_IN_DEFAULT,
        }
    }

    /// Trusts the node whose certificate has this SHA-256 (what `fabric serve` prints).
    pub fn with_pin(mut self, sha256: [u8; 32]) -> ClientConfig {
        self.trust = crate::tls::Trust::Pin(sha256);
        self
    }
}

/// What the node said in `welcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Welcome {
    /// The node's id for this session (changes on every connection).
    pub session: u64,
    /// The peer's durable inbox cursor: every `pos` at or below it was acked.
    pub acked: u64,
    /// The mesh's durable inbox head.
    pub head: u64,
}

/// A frame the node pushed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// An inbox message; ack it with [`Client::ack`] once processed.
    Deliver {
        pos: u64,
        from: Arc<str>,
        to: Target,
        body: Body,
        ts: u64,
    },
    /// An entry of a subscribed conversation.
    Event {
        conv: Arc<str>,
        seq: u64,
        from: Arc<str>,
        body: Body,
        ts: u64,
    },
}

impl Incoming {
    /// The raw JSON text of the body, exactly as the sender sent it.
    pub fn body(&self) -> &Body {
        match self {
            Incoming::Deliver { body, .. } | Incoming::Event { body, .. } => body,
        }
    }

    /// The body parsed into `T`.
    pub fn body_json<T: serde::de::DeserializeOwned>(&self) -> Result<T, ClientError> {
        serde_json::from_slice(&self.body().0)
            .map_err(|e| ClientError::Protocol(format!("body does not parse as requested: {e}")))
    }
}

/// A successful answer, before it is shaped for the caller.
enum Reply {
    Ok { pos: Option<u64>, seq: Option<u64> },
    Pong,
}

type ReplyTx = oneshot::Sender<Result<Reply, ClientError>>;

/// Requests of one connection waiting for their answer, by `ref`.
#[derive(Default)]
struct Pending {
    /// Set once the connection is gone: nothing new may wait on it.
    closed: bool,
    map: HashMap<u64, ReplyTx>,
}

/// What survives reconnects: the basis of resume and de-duplication.
#[derive(Default)]
struct Resume {
    /// Highest inbox `pos` handed to the user by this client.
    delivered_max: u64,
    /// Highest `upto` the user acked; re-sent after a reconnect.
    acked_upto: u64,
    /// Live subscriptions: conversation -> last `seq` handed to the user (from - 1 at first).
    subs: BTreeMap<Arc<str>, u64>,
}

/// Poisoning only means another thread panicked mid-update of plain bookkeeping; carry on.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn fail_all(pending: &Mutex<Pending>) {
    let drained: Vec<ReplyTx> = {
        let mut p = lock(pending);
        p.closed = true;
        p.map.drain().map(|(_, tx)| tx).collect()
    };
    for tx in drained {
        let _ = tx.send(Err(ClientError::Disconnected));
    }
}

/// One connection: the queue into its socket task and what waits on it.
struct Conn {
    welcome: Welcome,
    /// The cluster's client base URLs the welcome named (empty from a single node).
    nodes: Vec<Arc<str>>,
    tx: mpsc::Sender<ClientOp>,
    pending: Arc<Mutex<Pending>>,
    /// Turns true when the socket task has ended (or was stopped).
    closed: watch::Receiver<bool>,
    closed_tx: Arc<watch::Sender<bool>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The QUIC endpoint (its UDP socket), for [`Client::rebind`].
    endpoint: Option<quinn::Endpoint>,
}

impl Conn {
    /// Stops the socket task now (no close handshake) and fails whatever waits on it.
    fn kill(&self) {
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
        fail_all(&self.pending);
        let _ = self.closed_tx.send(true);
    }
}

/// A pipelined WebSocket session of one peer. See the [module docs](self).
pub struct Client {
    cfg: ClientConfig,
    /// The session URLs to try, in order: the configured ones, then those the nodes' welcomes
    /// named (at most [`URLS_MAX`]); and the index of the current one.
    urls: Mutex<(Vec<String>, usize)>,
    window: Semaphore,
    next_ref: AtomicU64,
    conn: Mutex<Arc<Conn>>,
    resume: Arc<Mutex<Resume>>,
    incoming_tx: mpsc::Sender<Incoming>,
    incoming_rx: tokio::sync::Mutex<mpsc::Receiver<Incoming>>,
    reconnecting: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.cfg.url)
            .field("mesh", &self.cfg.mesh)
            .field("peer", &self.cfg.peer)
            .field("welcome", &self.welcome())
            .finish_non_exhaustive()
    }
}

/// Removes a request's pending entry if its caller gives up (drops the future) before the
/// answer came, so abandoned requests do not accumulate.
struct PendingGuard<'a> {
    pending: &'a Mutex<Pending>,
    r: u64,
    armed: bool,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            lock(self.pending).map.remove(&self.r);
        }
    }
}

impl Client {
    /// Dials, says hello and waits for the welcome.
    pub async fn connect(cfg: ClientConfig) -> Result<Client, ClientError> {
        if cfg.window == 0 || cfg.incoming_frames_max == 0 {
            return Err(ClientError::Invalid {
                code: ErrorCode::BadRequest,
                message: "window and incoming_frames_max must be positive".into(),
            });
        }
        validate_id(IdKind::Mesh, &cfg.mesh)?;
        validate_id(IdKind::Peer, &cfg.peer)?;
        let urls = split_urls(&cfg.url);
        if urls.is_empty() || urls.len() > URLS_MAX {
            return Err(ClientError::Invalid {
                code: ErrorCode::BadRequest,
                message: format!("give 1 to {URLS_MAX} URLs, not {}", urls.len()),
            });
        }
        for url in &urls {
            crate::client_io::parse_url(url)?;
        }
        let resume = Arc::new(Mutex::new(Resume::default()));
        let (incoming_tx, incoming_rx) = mpsc::channel(cfg.incoming_frames_max);
        let (at, conn) = dial_any(&cfg, &urls, 0, &resume, &incoming_tx).await?;
        let mut urls = (urls, at);
        learn_nodes(&mut urls, &conn.nodes);
        Ok(Client {
            window: Semaphore::new(cfg.window),
            cfg,
            urls: Mutex::new(urls),
            next_ref: AtomicU64::new(1),
            conn: Mutex::new(Arc::new(conn)),
            resume,
            incoming_tx,
            incoming_rx: tokio::sync::Mutex::new(incoming_rx),
            reconnecting: tokio::sync::Mutex::new(()),
        })
    }

    fn conn(&self) -> Arc<Conn> {
        lock(&self.conn).clone()
    }

    /// The welcome of the current connection.
    pub fn welcome(&self) -> Welcome {
        self.conn().welcome
    }

    pub fn session(&self) -> u64 {
        self.welcome().session
    }

    pub fn acked(&self) -> u64 {
        self.welcome().acked
    }

    pub fn head(&self) -> u64 {
        self.welcome().head
    }

    /// The cluster's client base URLs, as the current connection's `welcome` named them
    /// (empty when connected to a single node).
    pub fn nodes(&self) -> Vec<Arc<str>> {
        self.conn().nodes.clone()
    }

    /// The session URL of the current connection.
    pub fn url(&self) -> String {
        let urls = lock(&self.urls);
        urls.0[urls.1].clone()
    }

    /// False once the current connection is gone (then [`Client::reconnect`]).
    pub fn is_connected(&self) -> bool {
        !*self.conn().closed.borrow()
    }

    /// Queues one request and waits for its answer.
    async fn request(
        &self,
        estimate_bytes: usize,
        op_for: impl FnOnce(u64) -> ClientOp,
    ) -> Result<Reply, ClientError> {
        if estimate_bytes > self.cfg.frame_bytes_max {
            return Err(ClientError::Invalid {
                code: ErrorCode::TooLarge,
                message: format!(
                    "request is about {estimate_bytes} bytes; the frame limit is {}",
                    self.cfg.frame_bytes_max
                ),
            });
        }
        // The semaphore is never closed; the error arm is unreachable but harmless.
        let _slot = self
            .window
            .acquire()
            .await
            .map_err(|_| ClientError::Disconnected)?;
        let conn = self.conn();
        let r = self.next_ref.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut p = lock(&conn.pending);
            if p.closed {
                return Err(ClientError::Disconnected);
            }
            // Registered before the op is queued: the answer cannot overtake its entry.
            p.map.insert(r, tx);
        }
        let mut guard = PendingGuard {
            pending: &conn.pending,
            r,
            armed: true,
        };
        if conn.tx.send(op_for(r)).await.is_err() {
            return Err(ClientError::Disconnected);
        }
        let answer = rx.await.unwrap_or(Err(ClientError::Disconnected));
        // The reader removed the entry when it answered.
        guard.armed = false;
        answer
    }

    /// Sends an inbox message to `to` (`peer`, `group:<name>` or `*`); returns its durable `pos`.
    /// Not idempotent: retrying after [`ClientError::Disconnected`] may deliver twice (use
    /// [`Client::send_keyed`] for retries that cannot).
    pub async fn send(&self, to: &str, body: &serde_json::Value) -> Result<u64, ClientError> {
        let to = Target::parse(to)?;
        self.send_raw(to, json_body(body)?).await
    }

    /// [`Client::send`] with an idempotency key (scoped to this peer): a retry with the same
    /// key, even from another connection, returns the original `pos` instead of sending again.
    pub async fn send_keyed(
        &self,
        to: &str,
        body: &serde_json::Value,
        key: &str,
    ) -> Result<u64, ClientError> {
        let to = Target::parse(to)?;
        validate_key(key)?;
        self.send_with(to, json_body(body)?, Some(key.into())).await
    }

    /// [`Client::send`] with a parsed target and a ready body (no per-call JSON encoding).
    pub async fn send_raw(&self, to: Target, body: Body) -> Result<u64, ClientError> {
        self.send_with(to, body, None).await
    }

    async fn send_with(
        &self,
        to: Target,
        body: Body,
        key: Option<Arc<str>>,
    ) -> Result<u64, ClientError> {
        let estimate = body.len()
            + fabric_proto::ID_BYTES_MAX
            + key.as_ref().map_or(0, |k| 2 * k.len())
            + OP_OVERHEAD_BYTES;
        match self
            .request(estimate, |r| ClientOp::Send { r, to, body, key })
            .await?
        {
            Reply::Ok { pos: Some(pos), .. } => Ok(pos),
            _ => Err(ClientError::Protocol("send answered without pos".into())),
        }
    }

    /// Appends to conversation `conv`; returns the durable `seq`. With a `key`, a retry (even
    /// from another connection) returns the original `seq` instead of appending again.
    pub async fn append(
        &self,
        conv: &str,
        body: &serde_json::Value,
        key: Option<&str>,
    ) -> Result<u64, ClientError> {
        self.append_raw(conv.into(), json_body(body)?, key.map(Into::into))
            .await
    }

    /// [`Client::append`] with shared ids and a ready body: the allocation-free hot path.
    pub async fn append_raw(
        &self,
        conv: Arc<str>,
        body: Body,
        key: Option<Arc<str>>,
    ) -> Result<u64, ClientError> {
        let conv = ConvId::from_arc(conv)?;
        if let Some(k) = &key {
            validate_key(k)?;
        }
        let estimate =
            body.len() + conv.len() + key.as_ref().map_or(0, |k| 2 * k.len()) + OP_OVERHEAD_BYTES;
        match self
            .request(estimate, |r| ClientOp::Append { r, conv, body, key })
            .await?
        {
            Reply::Ok { seq: Some(seq), .. } => Ok(seq),
            _ => Err(ClientError::Protocol("append answered without seq".into())),
        }
    }

    /// Subscribes to `conv` from `from` (1 = the oldest retained entry): the node replays the
    /// durable entries from there, then tails new ones. Subscribing again to a subscribed
    /// conversation moves its position (and may replay what was already seen).
    pub async fn subscribe(&self, conv: &str, from: u64) -> Result<(), ClientError> {
        let conv = ConvId::new(conv)?;
        // Recorded first: events may follow the `ok` closely, and must not be taken for
        // stragglers of an unknown subscription.
        lock(&self.resume)
            .subs
            .insert(conv.as_arc().clone(), from.max(1) - 1);
        let result = self.subscribe_op(conv.clone(), from).await;
        if let Err(ClientError::Server { .. } | ClientError::Invalid { .. }) = &result {
            lock(&self.resume).subs.remove(conv.as_str());
        }
        result
    }

    async fn subscribe_op(&self, conv: ConvId, from: u64) -> Result<(), ClientError> {
        let estimate = conv.len() + OP_OVERHEAD_BYTES;
        self.request(estimate, |r| ClientOp::Subscribe { r, conv, from })
            .await
            .map(|_| ())
    }

    /// Stops the subscription; events of `conv` still in flight are dropped.
    pub async fn unsubscribe(&self, conv: &str) -> Result<(), ClientError> {
        let conv = ConvId::new(conv)?;
        lock(&self.resume).subs.remove(conv.as_str());
        let estimate = conv.len() + OP_OVERHEAD_BYTES;
        self.request(estimate, |r| ClientOp::Unsubscribe { r, conv })
            .await
            .map(|_| ())
    }

    /// A round trip through the session; returns its duration.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        let started = Instant::now();
        match self
            .request(OP_OVERHEAD_BYTES, |r| ClientOp::Ping { r })
            .await?
        {
            Reply::Pong => Ok(started.elapsed()),
            Reply::Ok { .. } => Err(ClientError::Protocol("ping answered with ok".into())),
        }
    }

    /// Acknowledges every inbox message up to and including `upto`. Fire-and-forget (the node
    /// does not answer acks); a lost ack is re-sent by [`Client::reconnect`], and at worst the
    /// messages are redelivered to a later `Client`.
    pub async fn ack(&self, upto: u64) -> Result<(), ClientError> {
        {
            let mut r = lock(&self.resume);
            r.acked_upto = r.acked_upto.max(upto);
        }
        self.conn()
            .tx
            .send(ClientOp::Ack { upto })
            .await
            .map_err(|_| ClientError::Disconnected)
    }

    /// The next pushed frame. `None` means the connection is gone and everything it pushed has
    /// been handed out: call [`Client::reconnect`] to resume. Pushes are de-duplicated as the
    /// module docs describe.
    pub async fn next_delivery(&self) -> Option<Incoming> {
        let mut rx = self.incoming_rx.lock().await;
        let mut closed = self.conn().closed.clone();
        tokio::select! {
            biased;
            item = rx.recv() => item,
            _ = closed.wait_for(|c| *c) => rx.try_recv().ok(),
        }
    }

    /// Moves a QUIC session to a new local UDP socket (port chosen by the OS), as when a phone
    /// changes networks: the session, its window and its subscriptions carry on (QUIC
    /// connection migration). Returns the new local address. WebSocket sessions cannot.
    pub fn rebind(&self) -> Result<std::net::SocketAddr, ClientError> {
        let conn = self.conn();
        let endpoint = conn.endpoint.as_ref().ok_or_else(|| ClientError::Invalid {
            code: ErrorCode::BadRequest,
            message: "only a quic:// session can change its address".into(),
        })?;
        let here = endpoint
            .local_addr()
            .map_err(|e| ClientError::Quic(e.to_string()))?;
        let socket = crate::quic::udp_socket(crate::client_io::local_any(here))
            .map_err(|e| ClientError::Quic(e.to_string()))?;
        let local = socket
            .local_addr()
            .map_err(|e| ClientError::Quic(e.to_string()))?;
        endpoint
            .rebind(socket)
            .map_err(|e| ClientError::Quic(e.to_string()))?;
        Ok(local)
    }

    /// Drops the connection abruptly, without a close handshake, as a network failure would:
    /// requests in flight fail with [`ClientError::Disconnected`], and [`Client::next_delivery`]
    /// returns `None` once drained. For abandoning a stuck connection, and for tests.
    pub fn disconnect(&self) {
        self.conn().kill();
    }

    /// Drops the current connection (if any is left), dials again and resumes: hello, re-ack,
    /// re-subscribe (see the module docs). Requests in flight on the old connection fail with
    /// [`ClientError::Disconnected`]. On error the client stays disconnected; call it again.
    pub async fn reconnect(&self) -> Result<Welcome, ClientError> {
        let _one_at_a_time = self.reconnecting.lock().await;
        self.conn().kill();
        let (list, next) = {
            let urls = lock(&self.urls);
            (urls.0.clone(), urls.1 + 1)
        };
        let (at, conn) = dial_any(&self.cfg, &list, next, &self.resume, &self.incoming_tx).await?;
        {
            let mut urls = lock(&self.urls);
            urls.1 = at;
            learn_nodes(&mut urls, &conn.nodes);
        }
        let welcome = conn.welcome;
        *lock(&self.conn) = Arc::new(conn);
        let (subs, acked_upto) = {
            let r = lock(&self.resume);
            let subs: Vec<(Arc<str>, u64)> = r
                .subs
                .iter()
                .map(|(c, last)| (c.clone(), last + 1))
                .collect();
            (subs, r.acked_upto)
        };
        if acked_upto > welcome.acked {
            self.ack(acked_upto).await?;
        }
        let resubscribed = futures_util::future::join_all(
            subs.into_iter()
                // Each was a `ConvId` when it was subscribed.
                .map(|(conv, from)| self.subscribe_op(ConvId::must(&conv), from)),
        )
        .await;
        for r in resubscribed {
            r?;
        }
        tracing::debug!(session = welcome.session, "reconnected");
        Ok(welcome)
    }

    /// Closes the connection gracefully: queued ops are written, then a close frame.
    pub async fn close(self) {
        let conn = self.conn();
        drop(self);
        // With the client gone, this is the last handle on the queue: dropping it ends the
        // writer, which sends the close frame.
        if let Ok(conn) = Arc::try_unwrap(conn) {
            let task = lock(&conn.task).take();
            drop(conn);
            if let Some(task) = task {
                let _ = tokio::time::timeout(Duration::from_millis(CLOSE_WAIT_MS), task).await;
            }
        }
    }
}

fn json_body(value: &serde_json::Value) -> Result<Body, ClientError> {
    let text = serde_json::to_vec(value).map_err(|e| ClientError::Invalid {
        code: ErrorCode::BadRequest,
        message: format!("body does not serialize: {e}"),
    })?;
    Ok(Body::from_trusted(text.into()))
}

/// What the client says first: `challenge` for a key hello, else the token hello.
fn first_hello(cfg: &ClientConfig) -> Result<ClientOp, ClientError> {
    Ok(match cfg.key {
        Some(_) => ClientOp::Challenge,
        None => ClientOp::Hello {
            mesh: MeshId::new(&cfg.mesh)?,
            peer: PeerId::new(&cfg.peer)?,
            token: cfg.token.clone(),
        },
    })
}

/// The key hello answering the node's challenge: `nonce` signed with the config's key, now.
fn signed_hello(cfg: &ClientConfig, nonce: &[u8; 32]) -> Result<ClientOp, ClientError> {
    let ts = crate::now_ms();
    let sig = cfg.key.as_ref().map_or_else(Vec::new, |k| {
        k.sign_hello(&cfg.mesh, &cfg.peer, ts, nonce).to_vec()
    });
    Ok(ClientOp::HelloSigned {
        mesh: MeshId::new(&cfg.mesh)?,
        peer: PeerId::new(&cfg.peer)?,
        sig,
        ts,
    })
}

/// Dials and completes hello/welcome; then starts the socket task.
// Over 70 lines: the handshake's steps (dial, options, challenge, hello, welcome) in the order the
// protocol fixes.
/// Dials the URLs in turn from `start` (wrapping around) until one says welcome; a node that
/// cannot be reached, or answers `unavailable` or `overloaded`, is passed over for the next.
/// Any other refusal (a bad token) ends the attempt: every node would say the same.
async fn dial_any(
    cfg: &ClientConfig,
    urls: &[String],
    start: usize,
    resume: &Arc<Mutex<Resume>>,
    incoming: &mpsc::Sender<Incoming>,
) -> Result<(usize, Conn), ClientError> {
    let mut last = None;
    for i in 0..urls.len() {
        let at = (start + i) % urls.len();
        match dial(cfg, &urls[at], resume.clone(), incoming.clone()).await {
            Ok(conn) => return Ok((at, conn)),
            Err(e) if another_node_may_do(&e) => {
                tracing::debug!(url = %urls[at], error = %e, "node not reachable, trying the next");
                last = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or(ClientError::Invalid {
        code: ErrorCode::BadRequest,
        message: "no URL to connect to".into(),
    }))
}

/// Whether a failed dial is this node's trouble (try another) rather than the request's.
fn another_node_may_do(e: &ClientError) -> bool {
    match e {
        ClientError::Server { code, .. } => {
            matches!(code, ErrorCode::Unavailable | ErrorCode::Overloaded)
        }
        ClientError::Invalid { .. } => false,
        _ => true,
    }
}

/// Adds the WebSocket URLs of the nodes a welcome named that the list does not hold yet, up
/// to [`URLS_MAX`]. Only a WebSocket client learns: `nodes` are HTTP base URLs, which name
/// no QUIC port.
fn learn_nodes(urls: &mut (Vec<String>, usize), nodes: &[Arc<str>]) {
    use crate::client_io::{parse_url, Target as UrlTarget};
    let ws_of = |u: &str| match parse_url(u) {
        Ok(UrlTarget::Ws(ws)) => Some(ws),
        _ => None,
    };
    if ws_of(&urls.0[urls.1]).is_none() {
        return;
    }
    for node in nodes {
        let Some(ws) = crate::client_io::ws_url_of_http(node) else {
            continue;
        };
        let known = urls
            .0
            .iter()
            .any(|u| ws_of(u).as_deref() == Some(ws.as_str()));
        if !known && urls.0.len() < URLS_MAX {
            urls.0.push(ws);
        }
    }
}

async fn dial(
    cfg: &ClientConfig,
    url: &str,
    resume: Arc<Mutex<Resume>>,
    incoming: mpsc::Sender<Incoming>,
) -> Result<Conn, ClientError> {
    let handshake = async {
        let mut io = Io::dial(cfg, url).await?;
        let binary = io.binary(cfg.binary);
        let hello = first_hello(cfg)?;
        let first = if cfg.batch_ops_in_max > 1 {
            ClientOp::Batch(vec![
                ClientOp::Options {
                    r: OPTIONS_REF,
                    batch: cfg.batch_ops_in_max,
                },
                hello,
            ])
        } else {
            hello
        };
        io.send(&first, binary).await?;
        loop {
            let ops = io.recv().await?;
            // The `ok` to our options goes first; skip it.
            let mut ops = ops
                .into_iter()
                .skip_while(|op| matches!(op, ServerOp::Ok { r: OPTIONS_REF, .. }));
            // The first op decides; an empty batch frame is skipped.
            if let Some(op) = ops.next() {
                match op {
                    ServerOp::Welcome {
                        session,
                        acked,
                        head,
                        nodes,
                    } => {
                        let welcome = Welcome {
                            session,
                            acked,
                            head,
                        };
                        return Ok((io, binary, (welcome, nodes), ops.collect::<Vec<_>>()));
                    }
                    ServerOp::Challenge { nonce } if cfg.key.is_some() => {
                        let hello = signed_hello(cfg, &nonce)?;
                        io.send(&hello, binary).await?;
                    }
                    ServerOp::Error { code, message, .. } => {
                        return Err(ClientError::Server { code, message })
                    }
                    other => {
                        return Err(ClientError::Protocol(format!(
                            "expected welcome, got {}",
                            other.name()
                        )))
                    }
                }
            }
        }
    };
    let (io, binary, (welcome, nodes), leftover) =
        tokio::time::timeout(Duration::from_millis(cfg.connect_timeout_ms), handshake)
            .await
            .map_err(|_| ClientError::Timeout("connect (dial, hello, welcome)"))??;

    // The queue is as deep as the window: a full window never waits for queue space; acks
    // (which bypass the window) wait briefly at worst.
    let (tx, rx) = mpsc::channel(cfg.window.max(1));
    let pending = Arc::new(Mutex::new(Pending::default()));
    let (closed_tx, closed) = watch::channel(false);
    let closed_tx = Arc::new(closed_tx);
    let reader = Reader {
        pending: pending.clone(),
        resume,
        incoming,
    };
    let batch_bytes_max = BATCH_FRAME_BYTES_MAX.min(cfg.frame_bytes_max);
    let (write, read, endpoint) = io.split();
    let task = tokio::spawn(run_socket(
        write,
        read,
        leftover,
        rx,
        reader,
        binary,
        batch_bytes_max,
        closed_tx.clone(),
    ));
    Ok(Conn {
        welcome,
        nodes,
        tx,
        pending,
        closed,
        closed_tx,
        task: Mutex::new(Some(task)),
        endpoint,
    })
}

/// The socket task: reader and writer run concurrently (neither may block the other, or a
/// full socket in one direction would deadlock against the node); when either ends, so does
/// the connection.
#[allow(clippy::too_many_arguments)]
async fn run_socket(
    write: WriteHalf,
    read: ReadHalf,
    leftover: Vec<ServerOp>,
    rx: mpsc::Receiver<ClientOp>,
    reader: Reader,
    binary: bool,
    batch_bytes_max: usize,
    closed_tx: Arc<watch::Sender<bool>>,
) {
    let pending = reader.pending.clone();
    let why = tokio::select! {
        r = reader.run(read, leftover) => r,
        w = write_loop(write, rx, binary, batch_bytes_max) => w,
    };
    match &why {
        Ok(()) => tracing::debug!("connection closed"),
        Err(e) => tracing::debug!(reason = %e, "connection lost"),
    }
    fail_all(&pending);
    let _ = closed_tx.send(true);
}

/// Size of an op in a frame, as an upper bound (JSON; postcard is smaller).
fn op_bytes_estimate(op: &ClientOp) -> usize {
    OP_OVERHEAD_BYTES
        + match op {
            ClientOp::Send { body, .. } => body.len() + fabric_proto::ID_BYTES_MAX,
            ClientOp::Append {
                conv, body, key, ..
            } => body.len() + conv.len() + key.as_ref().map_or(0, |k| 2 * k.len()),
            ClientOp::Subscribe { conv, .. } | ClientOp::Unsubscribe { conv, .. } => conv.len(),
            _ => 0,
        }
}

/// Takes the first queued op, then everything else already queued (up to the batch limits),
/// and writes it all as one frame.
async fn write_loop(
    mut sink: WriteHalf,
    mut rx: mpsc::Receiver<ClientOp>,
    binary: bool,
    batch_bytes_max: usize,
) -> Result<(), LinkError> {
    let mut carry: Option<ClientOp> = None;
    let mut batch: Vec<ClientOp> = Vec::new();
    let mut json = Vec::new();
    loop {
        let first = match carry.take() {
            Some(op) => op,
            None => match rx.recv().await {
                Some(op) => op,
                None => {
                    // The client is gone: say goodbye properly.
                    sink.close().await;
                    return Ok(());
                }
            },
        };
        let mut bytes = op_bytes_estimate(&first);
        batch.push(first);
        while batch.len() < fabric_proto::BATCH_OPS_MAX {
            let Ok(op) = rx.try_recv() else { break };
            let n = op_bytes_estimate(&op);
            if bytes + n > batch_bytes_max {
                carry = Some(op);
                break;
            }
            bytes += n;
            batch.push(op);
        }
        sink.write(&mut batch, binary, &mut json).await?;
    }
}

/// The reading half: answers to waiting requests, pushes (de-duplicated) to the user's queue.
struct Reader {
    pending: Arc<Mutex<Pending>>,
    resume: Arc<Mutex<Resume>>,
    incoming: mpsc::Sender<Incoming>,
}

impl Reader {
    async fn run(&self, read: ReadHalf, leftover: Vec<ServerOp>) -> Result<(), LinkError> {
        self.handle(leftover).await?;
        read.run(|ops| self.handle(ops)).await
    }

    fn answer(&self, r: u64, answer: Result<Reply, ClientError>) {
        let waiter = lock(&self.pending).map.remove(&r);
        match waiter {
            Some(tx) => {
                let _ = tx.send(answer);
            }
            // Its caller gave up (dropped the future); nothing to do.
            None => tracing::trace!(r, "answer for a request nobody waits for"),
        }
    }

    // Over 70 lines: one arm per server frame.
    async fn handle(&self, ops: Vec<ServerOp>) -> Result<(), LinkError> {
        for op in ops {
            match op {
                ServerOp::Ok { r, pos, seq } => self.answer(r, Ok(Reply::Ok { pos, seq })),
                ServerOp::Pong { r } => self.answer(r, Ok(Reply::Pong)),
                ServerOp::Error {
                    r: Some(r),
                    code,
                    message,
                } => self.answer(r, Err(ClientError::Server { code, message })),
                ServerOp::Error {
                    r: None,
                    code,
                    message,
                } => {
                    // A session-level error: either the node is closing the session
                    // (unavailable, overloaded) or it refused a whole frame, whose requests
                    // will then never be answered. Both end this connection.
                    tracing::warn!(%code, %message, "session error from the node");
                    return Err(LinkError::Session { code, message });
                }
                ServerOp::Deliver {
                    pos,
                    from,
                    to,
                    body,
                    ts,
                } => {
                    let fresh = {
                        let mut r = lock(&self.resume);
                        let fresh = pos > r.delivered_max;
                        if fresh {
                            r.delivered_max = pos;
                        }
                        fresh
                    };
                    if fresh {
                        self.push(Incoming::Deliver {
                            pos,
                            from,
                            to,
                            body,
                            ts,
                        })
                        .await?;
                    }
                }
                ServerOp::Event(e) => {
                    let fresh = {
                        let mut r = lock(&self.resume);
                        match r.subs.get_mut(&e.conv) {
                            Some(last) if e.seq > *last => {
                                *last = e.seq;
                                true
                            }
                            _ => false,
                        }
                    };
                    if fresh {
                        self.push(Incoming::Event {
                            conv: e.conv,
                            seq: e.seq,
                            from: e.from,
                            body: e.body,
                            ts: e.ts,
                        })
                        .await?;
                    }
                }
                ServerOp::Welcome { .. } | ServerOp::Challenge { .. } | ServerOp::Batch(_) => {
                    tracing::warn!(op = op.name(), "unexpected frame from the node; ignored");
                }
            }
        }
        Ok(())
    }

    async fn push(&self, item: Incoming) -> Result<(), LinkError> {
        // Waits while the user's queue is full: that is the backpressure on pushes.
        self.incoming
            .send(item)
            .await
            .map_err(|_| LinkError::ClientDropped)
    }
}

#[cfg(test)]
mod url_list_tests {
    use super::*;

    #[test]
    fn a_url_list_splits_on_commas_and_http_bases_mean_their_websocket() {
        // Proves the URL forms a client and the CLI take: a comma-separated list, blanks
        // dropped, and an http(s) base URL read as its WebSocket endpoint.
        assert_eq!(
            split_urls(" http://a:1 ,, ws://b:2/v1/ws,"),
            ["http://a:1", "ws://b:2/v1/ws"]
        );
        use crate::client_io::ws_url_of_http as ws;
        assert_eq!(ws("http://a:1").as_deref(), Some("ws://a:1/v1/ws"));
        assert_eq!(
            ws("https://a.example/").as_deref(),
            Some("wss://a.example/v1/ws")
        );
        assert_eq!(ws("http://a:1/other"), None, "a path is not a base URL");
        assert_eq!(ws("quic://a:1"), None);
    }

    #[test]
    fn a_websocket_client_learns_the_nodes_a_welcome_names_once_and_within_its_bound() {
        // Proves learn_nodes adds each node not yet known (however it was written), never past
        // URLS_MAX, and that a QUIC client learns nothing (nodes name no QUIC port).
        let mut urls = (vec!["http://a:1".to_string()], 0);
        let nodes: Vec<Arc<str>> = vec!["http://a:1".into(), "http://b:1".into()];
        learn_nodes(&mut urls, &nodes);
        learn_nodes(&mut urls, &nodes);
        assert_eq!(urls.0, ["http://a:1", "ws://b:1/v1/ws"]);
        let many: Vec<Arc<str>> = (0..2 * URLS_MAX)
            .map(|i| format!("http://n{i}:1").into())
            .collect();
        learn_nodes(&mut urls, &many);
        assert_eq!(urls.0.len(), URLS_MAX);
        let mut quic = (vec!["quic://a:2".to_string()], 0);
        learn_nodes(&mut quic, &nodes);
        assert_eq!(quic.0, ["quic://a:2"]);
    }

    #[test]
    fn only_a_nodes_own_trouble_moves_a_dial_to_the_next_node() {
        // Proves which failed dials try the next URL: unreachable, unavailable, overloaded;
        // and which end the attempt: a refused hello, a request the client would not send.
        let server = |code| ClientError::Server {
            code,
            message: String::new(),
        };
        assert!(another_node_may_do(&ClientError::Timeout("connect")));
        assert!(another_node_may_do(&ClientError::Quic("refused".into())));
        assert!(another_node_may_do(&server(ErrorCode::Unavailable)));
        assert!(another_node_may_do(&server(ErrorCode::Overloaded)));
        assert!(!another_node_may_do(&server(ErrorCode::Unauthorized)));
        assert!(!another_node_may_do(&ClientError::Invalid {
            code: ErrorCode::BadRequest,
            message: String::new(),
        }));
    }
}
