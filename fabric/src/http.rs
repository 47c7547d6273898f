//! The HTTP API on the node's one port: admin (meshes, peers), conversation append and replay,
//! health, and the WebSocket upgrade. Each HTTP request becomes a short-lived session with the
//! shards, so it follows exactly the path (and durability) of WebSocket traffic.

use crate::node::NodeCtx;
use crate::shard_actor::{SessionMsg, SessionTx, ShardMsg};
use axum::extract::{DefaultBodyLimit, Path, Query, State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fabric_edge::rest::{RestAnswer, RestOp, RestRequest};
use fabric_proto::internal::{Reply, Request, ShardOp};
use fabric_proto::{ErrorCode, ProtoError, ServerOp};
use fabric_proto::{GroupId, MeshId, PeerId};
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::Instrument;

/// Per-socket WebSocket buffers (see `ws_upgrade`).
const WS_READ_BUFFER_BYTES: usize = 8 * 1024;
const WS_WRITE_BUFFER_BYTES: usize = 8 * 1024;

pub fn routes(ctx: Arc<NodeCtx>) -> Router {
    let frame_max = ctx.config.frame_bytes_max;
    // With a metrics port, the client port keeps its details to itself: no /metrics (mesh
    // names of `metrics_meshes`, per-shard figures) and a /readyz without per-shard errors
    // (file paths). Without one, the client port serves both in full, as before.
    let private = ctx.config.metrics_listen.is_some();
    let (readyz, metrics) = if private {
        (get(readyz_brief), get(metrics_elsewhere))
    } else {
        (get(readyz), get(metrics))
    };
    Router::new()
        .route("/v1/ws", get(ws_upgrade))
        .route("/v1/meshes", post(create_mesh))
        .route("/v1/meshes/{mesh}/peers", post(add_peer))
        .route(
            "/v1/meshes/{mesh}/conversations/{conv}/messages",
            post(append).get(read),
        )
        .route("/healthz", get(healthz))
        .route("/readyz", readyz)
        .route("/metrics", metrics)
        .route("/v1/cluster", get(cluster_view))
        .route("/v1/cluster/nodes", post(cluster_add_node))
        .route(
            "/v1/cluster/nodes/{id}",
            axum::routing::delete(cluster_remove_node),
        )
        .fallback(|| async { ApiError(ProtoError::new(ErrorCode::NotFound, "no such endpoint")) })
        .layer(DefaultBodyLimit::max(frame_max))
        .layer(axum::middleware::from_fn_with_state(
            ctx.clone(),
            count_errors,
        ))
        .layer(axum::middleware::from_fn_with_state(
            ctx.clone(),
            body_deadline,
        ))
        .with_state(ctx)
}

/// A request body that fails once its deadline passes (and says so in `expired`).
struct DeadlineBody {
    inner: axum::body::Body,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    expired: Arc<std::sync::atomic::AtomicBool>,
}

impl hyper::body::Body for DeadlineBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, axum::Error>>> {
        use std::future::Future;
        let this = &mut *self;
        if let std::task::Poll::Ready(frame) = std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            return std::task::Poll::Ready(frame);
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            this.expired
                .store(true, std::sync::atomic::Ordering::Relaxed);
            return std::task::Poll::Ready(Some(Err(axum::Error::new(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the request body did not arrive in time",
            )))));
        }
        std::task::Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Gives a request body `http_body_timeout_ms` from the handler's start to arrive; a body
/// still incomplete then is answered 408 (plain text) and its connection closed, so a client
/// that sends headers and then trickles (or stalls) cannot hold a handler and a connection.
async fn body_deadline(
    State(ctx): State<Arc<NodeCtx>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use hyper::body::Body as _;
    if req.body().is_end_stream() {
        return next.run(req).await;
    }
    let limit = Duration::from_millis(ctx.config.http_body_timeout_ms);
    let expired = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = expired.clone();
    let req = req.map(|inner| {
        axum::body::Body::new(DeadlineBody {
            inner,
            deadline: Box::pin(tokio::time::sleep(limit)),
            expired: flag,
        })
    });
    let resp = next.run(req).await;
    if !expired.load(std::sync::atomic::Ordering::Relaxed) {
        return resp;
    }
    ctx.metrics.http_port.timeouts[1].increment(1);
    (
        StatusCode::REQUEST_TIMEOUT,
        [(axum::http::header::CONNECTION, "close")],
        format!(
            "the request body did not arrive within http_body_timeout_ms ({} ms)",
            limit.as_millis()
        ),
    )
        .into_response()
}

/// The separate metrics port (`metrics_listen`): metrics and health only.
pub fn ops_routes(ctx: Arc<NodeCtx>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError(ProtoError::new(ErrorCode::NotFound, "no such endpoint")) })
        .with_state(ctx)
}

/// Counts every error response by its stable code (`ApiError` marks the response with it).
async fn count_errors(
    State(ctx): State<Arc<NodeCtx>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let resp = next.run(req).await;
    if let Some(code) = resp.extensions().get::<ErrorCode>() {
        ctx.metrics.http.errors[fabric_edge::error_code_index(*code)].increment(1);
    }
    resp
}

/// A `ProtoError` as an HTTP response: the code's status and `{"code","message"}`.
pub struct ApiError(pub ProtoError);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::json!({"code": self.0.code.as_str(), "message": self.0.message});
        let mut resp = (status, Json(body)).into_response();
        // Codes that ask for a later retry say when (docs/PROTOCOL.md, errors table).
        if let Some(secs) = self.0.code.retry_after_secs() {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        resp.extensions_mut().insert(self.0.code);
        resp
    }
}

impl From<ProtoError> for ApiError {
    fn from(e: ProtoError) -> ApiError {
        ApiError(e)
    }
}

type ApiResult = Result<Response, ApiError>;

async fn ws_upgrade(ws: WebSocketUpgrade, State(ctx): State<Arc<NodeCtx>>) -> Response {
    // The socket layer allows a little more than the protocol limit, so that a frame just over
    // the limit gets a `too_large` error frame from the session instead of a dropped connection.
    let socket_max = ctx.config.frame_bytes_max + 64 * 1024;
    // tungstenite's default 128 KiB read buffer per socket would make an idle session cost
    // ~130 KiB; 8 KiB still takes dozens of pipelined frames per read.
    ws.read_buffer_size(WS_READ_BUFFER_BYTES)
        .write_buffer_size(WS_WRITE_BUFFER_BYTES)
        .max_message_size(socket_max)
        .max_frame_size(socket_max)
        .on_upgrade(move |socket| crate::ws::run(socket, ctx))
}

fn bearer(headers: &HeaderMap) -> Result<&str, ProtoError> {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ProtoError::new(
                ErrorCode::Unauthorized,
                "missing header \"Authorization: Bearer <token>\"",
            )
        })
}

fn require_admin(ctx: &NodeCtx, headers: &HeaderMap) -> Result<(), ProtoError> {
    use subtle_eq::ct_eq;
    let token = bearer(headers)?;
    if ct_eq(token.as_bytes(), ctx.admin_token.as_bytes()) {
        Ok(())
    } else {
        Err(ProtoError::new(
            ErrorCode::Unauthorized,
            "wrong admin token",
        ))
    }
}

mod subtle_eq {
    /// Compares without an early exit, so response time does not reveal a token's prefix.
    pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
        use sha2::Digest;
        let ha = sha2::Sha256::digest(a);
        let hb = sha2::Sha256::digest(b);
        ha.iter()
            .zip(hb.iter())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
    }
}

fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ProtoError> {
    serde_json::from_slice(body)
        .map_err(|e| ProtoError::bad_request(format!("request body is not the expected JSON: {e}")))
}

/// Sends one op to its shard as a one-request session and waits for the first reply.
async fn call(ctx: &NodeCtx, op: ShardOp) -> Result<Reply, ProtoError> {
    let session = ctx.next_session_id();
    let mesh = match op.placement() {
        fabric_proto::internal::Placement::Mesh(m)
        | fabric_proto::internal::Placement::Conversation(m, _) => m.to_string(),
        fabric_proto::internal::Placement::Broadcast => String::new(),
    };
    let span = tracing::info_span!(
        "http",
        node = %ctx.node_name,
        session,
        transport = "http",
        mesh = %mesh
    );
    call_session(ctx, session, op).instrument(span).await
}

async fn call_session(ctx: &NodeCtx, session: u64, op: ShardOp) -> Result<Reply, ProtoError> {
    let (tx, rx) = mpsc::channel(4);
    call_with(ctx, session, op, tx, rx).await
}

/// Makes the shard forget a one-request HTTP session when the call ends, however it ends. A
/// request whose client goes away is cancelled: its future is dropped at an await, and the
/// shard, which keeps a session's reply sender until it hears `Closed`, kept it forever.
struct ForgetSession<'a> {
    shard: &'a mpsc::Sender<ShardMsg>,
    session: u64,
    tx: SessionTx,
}

impl Drop for ForgetSession<'_> {
    fn drop(&mut self) {
        let msg = ShardMsg::Batch {
            session: self.session,
            tx: self.tx.clone(),
            requests: vec![Request {
                session: self.session,
                op: ShardOp::Closed,
            }],
        };
        crate::rest::send_from_drop(self.shard, msg);
    }
}

/// [`call_session`] with its reply channel given (the leak test keeps a weak sender to see
/// whether the shard still holds one).
async fn call_with(
    ctx: &NodeCtx,
    session: u64,
    op: ShardOp,
    tx: SessionTx,
    rx: mpsc::Receiver<SessionMsg>,
) -> Result<Reply, ProtoError> {
    let router = ctx.router();
    let shard = router
        .shard_of(op.placement())
        .ok_or_else(|| ProtoError::new(ErrorCode::Internal, "op has no placement"))?;
    call_on(ctx, &ctx.shards[shard as usize], session, op, tx, rx).await
}

/// One op to the cluster's metadata group (`crate::cluster::directory`), as a one-request
/// session of its own.
pub(crate) async fn call_meta(ctx: &NodeCtx, op: ShardOp) -> Result<Reply, ProtoError> {
    let Some(meta) = ctx.cluster.as_ref().map(|c| c.meta.clone()) else {
        return Err(ProtoError::new(
            ErrorCode::NotFound,
            "this node is not in a cluster",
        ));
    };
    let session = ctx.next_session_id();
    let (tx, rx) = mpsc::channel(4);
    call_on(ctx, &meta, session, op, tx, rx).await
}

async fn call_on(
    ctx: &NodeCtx,
    shard_tx: &mpsc::Sender<ShardMsg>,
    session: u64,
    op: ShardOp,
    tx: SessionTx,
    mut rx: mpsc::Receiver<SessionMsg>,
) -> Result<Reply, ProtoError> {
    // A cancelled `send` queues nothing (tokio's send is cancel-safe): no session to forget.
    shard_tx
        .send(ShardMsg::Batch {
            session,
            tx: tx.clone(),
            requests: vec![Request { session, op }],
        })
        .await
        .map_err(|_| ProtoError::new(ErrorCode::Unavailable, "the shard is not running"))?;
    let _forget = ForgetSession {
        shard: shard_tx,
        session,
        tx,
    };
    let timeout = Duration::from_millis(ctx.config.limits().request_timeout_ms);
    let reply = tokio::time::timeout(timeout, rx.recv()).await;
    match reply {
        Ok(Some(SessionMsg::Replies(_, mut replies))) if !replies.is_empty() => {
            let reply = replies.swap_remove(0);
            match reply {
                Reply::Frame(ServerOp::Error { code, message, .. }) => {
                    Err(ProtoError::new(code, message))
                }
                other => Ok(other),
            }
        }
        Ok(Some(SessionMsg::ShardRestarted(_))) | Ok(None) | Ok(Some(_)) => Err(ProtoError::new(
            ErrorCode::Unavailable,
            "the shard restarted before answering; retry",
        )),
        Err(_) => Err(ProtoError::new(
            ErrorCode::Unavailable,
            "the shard did not answer in time; retry",
        )),
    }
}

#[derive(Deserialize)]
struct CreateMesh {
    id: String,
}

async fn create_mesh(
    State(ctx): State<Arc<NodeCtx>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult {
    require_admin(&ctx, &headers)?;
    let req: CreateMesh = parse_json(&body)?;
    let mesh = MeshId::new(&req.id)?;
    call(&ctx, ShardOp::CreateMesh { r: 0, mesh }).await?;
    Ok((StatusCode::CREATED, Json(serde_json::json!({"id": req.id}))).into_response())
}

#[derive(Deserialize)]
struct AddPeer {
    id: String,
    #[serde(default)]
    groups: Vec<String>,
    /// The peer's ed25519 public key, 64 hex characters: it may then say hello by signature.
    #[serde(default)]
    public_key: Option<String>,
    /// Whether to make a token too. Default: true without `public_key`, false with one.
    #[serde(default)]
    token: Option<bool>,
}

async fn add_peer(
    State(ctx): State<Arc<NodeCtx>>,
    Path(mesh): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult {
    let mesh_id = MeshId::new(&mesh)?;
    if let Err(e) = require_admin(&ctx, &headers) {
        // A valid peer token is a credential, just not an admin one: 403, not 401.
        if authenticate(&ctx, &mesh, &headers).await.is_ok() {
            return Err(ProtoError::new(
                ErrorCode::Forbidden,
                "peer tokens cannot add peers; use the admin token",
            )
            .into());
        }
        return Err(e.into());
    }
    let req: AddPeer = parse_json(&body)?;
    let peer = PeerId::new(&req.id)?;
    let groups = peer_groups(&req.groups)?;
    let public_key = match &req.public_key {
        Some(text) => Some(
            crate::identity::parse_public_key(text)
                .map_err(|e| ProtoError::bad_request(format!("\"public_key\": {e}")))?,
        ),
        None => None,
    };
    if req.token == Some(false) && public_key.is_none() {
        return Err(
            ProtoError::bad_request("a peer without a token needs a \"public_key\"").into(),
        );
    }
    let token = req
        .token
        .unwrap_or(public_key.is_none())
        .then(crate::node::new_token);
    call(
        &ctx,
        ShardOp::AddPeer {
            r: 0,
            mesh: mesh_id,
            peer,
            groups,
            token_hash: token.as_deref().map(fabric_shard::token_hash),
            public_key,
        },
    )
    .await?;
    let mut answer = serde_json::json!({"id": req.id, "groups": req.groups});
    if let Some(t) = token {
        answer["token"] = t.into();
    }
    if let Some(k) = public_key {
        answer["public_key"] = hex::encode(k).into();
    }
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

/// A new peer's groups: at most `PEER_GROUPS_MAX`, each a valid group id.
fn peer_groups(groups: &[String]) -> Result<Vec<GroupId>, ProtoError> {
    if groups.len() > fabric_proto::PEER_GROUPS_MAX {
        return Err(ProtoError::new(
            ErrorCode::TooLarge,
            format!(
                "a peer may be in at most {} groups",
                fabric_proto::PEER_GROUPS_MAX
            ),
        ));
    }
    groups.iter().map(|g| GroupId::new(g)).collect()
}

/// Resolves a peer bearer token to its peer id (asks the mesh's shard).
async fn authenticate(
    ctx: &NodeCtx,
    mesh: &str,
    headers: &HeaderMap,
) -> Result<Arc<str>, ProtoError> {
    let token = bearer(headers)?.to_string();
    let mesh = MeshId::new(mesh)?;
    match call(
        ctx,
        ShardOp::Auth {
            r: 0,
            mesh,
            token,
            local: false,
        },
    )
    .await?
    {
        Reply::Authed { peer, .. } => Ok(peer),
        _ => Err(ProtoError::new(
            ErrorCode::Internal,
            "unexpected reply to auth",
        )),
    }
}

/// Runs a REST call on a session of its own, in a span with the fixed fields.
async fn rest_call(ctx: &NodeCtx, request: RestRequest) -> Result<RestAnswer, ProtoError> {
    let span = tracing::info_span!(
        "http",
        node = %ctx.node_name,
        transport = "http",
        mesh = %request.mesh
    );
    match crate::rest::call(ctx, request).instrument(span).await? {
        RestAnswer::Error(e) => Err(e),
        answer => Ok(answer),
    }
}

async fn append(
    State(ctx): State<Arc<NodeCtx>>,
    Path((mesh, conv)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult {
    let started = std::time::Instant::now();
    let result = append_inner(&ctx, mesh, conv, headers, body).await;
    ctx.metrics
        .http
        .ack_latency
        .record(started.elapsed().as_secs_f64());
    result
}

/// Everything but the bearer header is checked by the edge's REST core, after the token.
async fn append_inner(
    ctx: &NodeCtx,
    mesh: String,
    conv: String,
    headers: HeaderMap,
    payload: axum::body::Bytes,
) -> ApiResult {
    let request = RestRequest {
        mesh,
        token: bearer(&headers)?.to_string(),
        op: RestOp::Append { conv, payload },
    };
    match rest_call(ctx, request).await? {
        RestAnswer::Appended { seq } => {
            Ok((StatusCode::CREATED, Json(serde_json::json!({"seq": seq}))).into_response())
        }
        _ => Err(ProtoError::new(ErrorCode::Internal, "unexpected answer to append").into()),
    }
}

#[derive(Deserialize)]
struct ReadQuery {
    from: Option<u64>,
    limit: Option<u32>,
    consistency: Option<String>,
}

/// `?consistency=`: `linearizable` (the default: the shard's leader answers once a quorum
/// confirmed it still leads) or `local` (this node's replica answers from what it committed).
fn local_read(consistency: Option<&str>) -> Result<bool, ProtoError> {
    match consistency {
        None | Some("linearizable") => Ok(false),
        Some("local") => Ok(true),
        Some(other) => Err(ProtoError::bad_request(format!(
            "consistency must be \"linearizable\" or \"local\", not {other:?}"
        ))),
    }
}

async fn read(
    State(ctx): State<Arc<NodeCtx>>,
    Path((mesh, conv)): Path<(String, String)>,
    Query(q): Query<ReadQuery>,
    headers: HeaderMap,
) -> ApiResult {
    let request = RestRequest {
        mesh,
        token: bearer(&headers)?.to_string(),
        op: RestOp::Read {
            conv,
            from: q.from.unwrap_or(1),
            limit: q.limit.unwrap_or(100),
            local: local_read(q.consistency.as_deref())?,
        },
    };
    match rest_call(&ctx, request).await? {
        RestAnswer::Page { events, head } => Ok((
            StatusCode::OK,
            [("content-type", "application/json")],
            page_json(&events, head),
        )
            .into_response()),
        _ => Err(ProtoError::new(ErrorCode::Internal, "unexpected answer to read").into()),
    }
}

/// A page as JSON; bodies are spliced in as raw JSON, exactly as they were appended.
fn page_json(events: &[fabric_proto::DeliveredEvent], head: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + events.iter().map(|e| e.body.len() + 64).sum::<usize>());
    out.extend_from_slice(b"{\"messages\":[");
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"seq\":");
        out.extend_from_slice(e.seq.to_string().as_bytes());
        out.extend_from_slice(b",\"from\":");
        let _ = serde_json::to_writer(&mut out, &*e.from);
        out.extend_from_slice(b",\"body\":");
        out.extend_from_slice(&e.body.0);
        out.extend_from_slice(b",\"ts\":");
        out.extend_from_slice(e.ts.to_string().as_bytes());
        out.push(b'}');
    }
    out.extend_from_slice(b"],\"head\":");
    out.extend_from_slice(head.to_string().as_bytes());
    out.push(b'}');
    out
}

/// `GET /v1/cluster` (admin token): the cluster's nodes and every shard's Raft group as this
/// node sees them; `not_found` on a node that is not a cluster member.
async fn cluster_view(State(ctx): State<Arc<NodeCtx>>, headers: HeaderMap) -> Response {
    if let Err(e) = require_admin(&ctx, &headers) {
        return ApiError(e).into_response();
    }
    match ctx.cluster_view() {
        Some(view) => Json(view).into_response(),
        None => ApiError(ProtoError::new(
            ErrorCode::NotFound,
            "this node is not a member of a cluster (its config has no [cluster] section)",
        ))
        .into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddNodeBody {
    id: u64,
    link: std::net::SocketAddr,
    http: String,
}

/// `POST /v1/cluster/nodes` (admin token): node `id` joins the cluster (the metadata group
/// records it; every group then adds it as a learner and promotes it once caught up).
async fn cluster_add_node(
    State(ctx): State<Arc<NodeCtx>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let run = async {
        require_admin(&ctx, &headers)?;
        let b: AddNodeBody = parse_json(&body)?;
        let change = crate::cluster::directory::Change::Add {
            id: b.id,
            link: b.link,
            http: b.http,
        };
        crate::cluster::directory::propose(&ctx, change).await
    };
    membership_answer(run.await)
}

/// `DELETE /v1/cluster/nodes/{id}` (admin token): node `id` leaves the cluster (every group
/// removes its replica, its leaderships handed on first).
async fn cluster_remove_node(
    State(ctx): State<Arc<NodeCtx>>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> Response {
    let run = async {
        require_admin(&ctx, &headers)?;
        let change = crate::cluster::directory::Change::Remove { id };
        crate::cluster::directory::propose(&ctx, change).await
    };
    membership_answer(run.await)
}

/// The members once a change is recorded: `{"members":[{"id","link","http"}],"changes":N}`.
fn membership_answer(r: Result<crate::cluster::directory::Directory, ProtoError>) -> Response {
    match r {
        Ok(dir) => {
            let members: Vec<serde_json::Value> = dir
                .nodes
                .iter()
                .map(|(id, m)| {
                    let link = m.as_ref().map(|m| m.link.to_string());
                    let http = m.as_ref().map(|m| m.http.clone());
                    serde_json::json!({"id": id, "link": link, "http": http})
                })
                .collect();
            Json(serde_json::json!({"members": members, "changes": dir.seq})).into_response()
        }
        Err(e) => ApiError(e).into_response(),
    }
}

async fn healthz() -> Response {
    Json(serde_json::json!({"status": "ok"})).into_response()
}

/// 200 when ready to serve writes, else 503; the body says why, shard by shard.
async fn readyz(State(ctx): State<Arc<NodeCtx>>) -> Response {
    let r = ctx.readiness();
    let status = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(r)).into_response()
}

/// `/readyz` on the client port when a metrics port exists: ready or not, and the reason (which
/// names shard numbers only); per-shard details are on the metrics port.
async fn readyz_brief(State(ctx): State<Arc<NodeCtx>>) -> Response {
    let r = ctx.readiness();
    let status = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = serde_json::json!({"ready": r.ready});
    if let Some(reason) = r.reason {
        body["reason"] = reason.into();
    }
    (status, Json(body)).into_response()
}

/// `/metrics` on the client port when a metrics port exists.
async fn metrics_elsewhere() -> Response {
    ApiError(ProtoError::new(
        ErrorCode::NotFound,
        "metrics are served on the metrics port (metrics_listen) only",
    ))
    .into_response()
}

/// The Prometheus text exposition format (404 when `metrics = false`).
async fn metrics(State(ctx): State<Arc<NodeCtx>>) -> Response {
    match ctx.render_metrics() {
        Some(text) => (
            StatusCode::OK,
            [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
            text,
        )
            .into_response(),
        None => ApiError(ProtoError::new(
            ErrorCode::NotFound,
            "metrics are off (metrics = false)",
        ))
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::task::{Context, Wake, Waker};

    #[test]
    fn every_error_code_travels_with_its_status_and_retry_after() {
        // Proves an HTTP error carries its code's status, and exactly the codes with a
        // retry hint (storage_full 507, inbox_full 429, archive_backlog_full 503 among them)
        // carry `Retry-After`.
        for code in ErrorCode::ALL {
            let resp = ApiError(ProtoError::new(code, "m")).into_response();
            assert_eq!(resp.status().as_u16(), code.http_status(), "{code:?}");
            let retry = resp
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().parse::<u32>().unwrap());
            assert_eq!(retry, code.retry_after_secs(), "{code:?}");
        }
        for (code, status) in [
            (ErrorCode::StorageFull, 507),
            (ErrorCode::InboxFull, 429),
            (ErrorCode::ArchiveBacklogFull, 503),
        ] {
            let resp = ApiError(ProtoError::new(code, "m")).into_response();
            assert_eq!(resp.status().as_u16(), status, "{code:?}");
            assert!(resp.headers().contains_key("retry-after"), "{code:?}");
        }
    }

    /// A waker that records that it was woken.
    #[derive(Default)]
    struct Woken {
        flag: AtomicBool,
        notify: tokio::sync::Notify,
    }

    impl Wake for Woken {
        fn wake(self: Arc<Self>) {
            self.flag.store(true, Ordering::SeqCst);
            self.notify.notify_one();
        }
    }

    /// A node on a free loopback port, without QUIC, and the data dir it lives in.
    async fn test_node(
        shards: u32,
        partitions: u32,
    ) -> (tempfile::TempDir, crate::node::RunningNode) {
        let dir = tempfile::tempdir().unwrap();
        let node = crate::node::start(crate::config::Config {
            data_dir: dir.path().to_path_buf(),
            listen: "127.0.0.1:0".parse().unwrap(),
            shards,
            partitions,
            admin_token: Some("admin".into()),
            quic: false,
            ..crate::config::Config::default()
        })
        .await
        .unwrap();
        (dir, node)
    }

    /// Waits (10 s at most) until no shard holds any of the `held` reply senders.
    async fn all_released(held: &[mpsc::WeakSender<SessionMsg>], what: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let kept = held.iter().filter(|w| w.upgrade().is_some()).count();
            if kept == 0 {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "shards still hold {kept} of {} cancelled {what} reply senders",
                held.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_http_call_leaves_no_reply_sender_in_the_shard() {
        // Proves that an HTTP call cancelled after its answer reached the reply channel (the
        // client went away) still makes the shard drop its reply sender: none is kept.
        const CALLS: usize = 50;
        let (_dir, node) = test_node(1, 1).await;
        let ctx = node.ctx().clone();
        let mut held = Vec::new();
        let mut cancelled = 0;
        for i in 0..CALLS {
            let (tx, rx) = mpsc::channel(4);
            held.push(tx.downgrade());
            let op = ShardOp::CreateMesh {
                r: 0,
                mesh: MeshId::must(&format!("m{i}")),
            };
            let mut call = Box::pin(call_with(&ctx, ctx.next_session_id(), op, tx, rx));
            let woken = Arc::new(Woken::default());
            let waker = Waker::from(woken.clone());
            let mut cx = Context::from_waker(&waker);
            if call.as_mut().poll(&mut cx).is_ready() {
                // The shard answered within the first poll (another worker thread ran it):
                // this call was not cancelled; its sender must go all the same.
                continue;
            }
            cancelled += 1;
            // The answer is in the channel once the call is woken; the client goes away then.
            tokio::time::timeout(Duration::from_secs(10), async {
                while !woken.flag.load(Ordering::SeqCst) {
                    woken.notify.notified().await;
                }
            })
            .await
            .expect("the shard answered");
            drop(call);
        }
        assert!(cancelled > 0, "no call waited for its answer");
        all_released(&held, "HTTP calls'").await;
        node.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_rest_call_leaves_no_reply_sender_in_any_shard() {
        // Proves that a REST append or read dropped at any await (before any answer, after the
        // token's, after the op's) still makes every shard that may hold its session drop the
        // reply sender.
        const CALLS: usize = 60;
        let (_dir, node) = test_node(2, 8).await;
        let ctx = node.ctx().clone();
        let mesh = ShardOp::CreateMesh {
            r: 0,
            mesh: MeshId::must("m"),
        };
        call(&ctx, mesh).await.unwrap();
        let peer = ShardOp::AddPeer {
            r: 0,
            mesh: MeshId::must("m"),
            peer: PeerId::must("p"),
            groups: Vec::new(),
            token_hash: Some(fabric_shard::token_hash("tok")),
            public_key: None,
        };
        call(&ctx, peer).await.unwrap();
        let mut held = Vec::new();
        for i in 0..CALLS {
            let (tx, rx) = mpsc::channel(4);
            held.push(tx.downgrade());
            let conv = format!("c{i}");
            let op = if i % 2 == 0 {
                RestOp::Read {
                    conv,
                    from: 1,
                    limit: 10,
                    local: false,
                }
            } else {
                let payload = axum::body::Bytes::from_static(b"{\"body\":1}");
                RestOp::Append { conv, payload }
            };
            let request = RestRequest {
                mesh: "m".into(),
                token: "tok".into(),
                op,
            };
            let mut call = Box::pin(crate::rest::call_with(&ctx, request, tx, rx));
            let woken = Arc::new(Woken::default());
            let waker = Waker::from(woken.clone());
            let mut cx = Context::from_waker(&waker);
            // Wakes to wait for before the client goes away: none, the token's answer, both.
            for _ in 0..i % 3 {
                if call.as_mut().poll(&mut cx).is_ready() {
                    break;
                }
                tokio::time::timeout(Duration::from_secs(10), async {
                    while !woken.flag.swap(false, Ordering::SeqCst) {
                        woken.notify.notified().await;
                    }
                })
                .await
                .expect("a shard answered");
            }
            drop(call);
        }
        all_released(&held, "REST calls'").await;
        node.shutdown().await;
    }
}
