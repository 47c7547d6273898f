//! The HTTP API on the node's one port: admin (meshes, peers), conversation append and replay,
//! health, and the WebSocket upgrade. Each HTTP request becomes a short-lived session with the
//! shards, so it follows exactly the path (and durability) of WebSocket traffic.

use crate::node::NodeCtx;
use crate::shard_actor::{SessionMsg, ShardMsg};
use axum::extract::{DefaultBodyLimit, Path, Query, State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fabric_proto::internal::{Reply, Request, ShardOp};
use fabric_proto::{
    validate_conv, validate_id, validate_key, Body, ErrorCode, IdKind, ProtoError, ServerOp,
};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::Instrument;

/// Per-socket WebSocket buffers (see `ws_upgrade`).
const WS_READ_BUFFER_BYTES: usize = 8 * 1024;
const WS_WRITE_BUFFER_BYTES: usize = 8 * 1024;

/// An HTTP request waits at most this long for its shard's answer.
const HTTP_REPLY_TIMEOUT_MS: u64 = 30_000;

pub fn routes(ctx: Arc<NodeCtx>) -> Router {
    let frame_max = ctx.config.frame_bytes_max;
    Router::new()
        .route("/v1/ws", get(ws_upgrade))
        .route("/v1/meshes", post(create_mesh))
        .route("/v1/meshes/{mesh}/peers", post(add_peer))
        .route(
            "/v1/meshes/{mesh}/conversations/{conv}/messages",
            post(append).get(read),
        )
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError(ProtoError::new(ErrorCode::NotFound, "no such endpoint")) })
        .layer(DefaultBodyLimit::max(frame_max))
        .layer(axum::middleware::from_fn_with_state(
            ctx.clone(),
            count_errors,
        ))
        .with_state(ctx)
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
    let router = ctx.router();
    let shard = router
        .shard_of(op.placement())
        .ok_or_else(|| ProtoError::new(ErrorCode::Internal, "op has no placement"))?;
    let (tx, mut rx) = mpsc::channel(4);
    let send = |requests| ShardMsg::Batch {
        session,
        tx: tx.clone(),
        requests,
    };
    ctx.shards[shard as usize]
        .send(send(vec![Request { session, op }]))
        .await
        .map_err(|_| ProtoError::new(ErrorCode::Unavailable, "the shard is not running"))?;
    let reply = tokio::time::timeout(Duration::from_millis(HTTP_REPLY_TIMEOUT_MS), rx.recv()).await;
    // Let the shard forget this session's reply channel.
    let _ = ctx.shards[shard as usize]
        .send(send(vec![Request {
            session,
            op: ShardOp::Closed,
        }]))
        .await;
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
    validate_id(IdKind::Mesh, &req.id)?;
    call(
        &ctx,
        ShardOp::CreateMesh {
            r: 0,
            mesh: req.id.as_str().into(),
        },
    )
    .await?;
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
    validate_id(IdKind::Mesh, &mesh)?;
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
    validate_id(IdKind::Peer, &req.id)?;
    if req.groups.len() > fabric_proto::PEER_GROUPS_MAX {
        return Err(ProtoError::new(
            ErrorCode::TooLarge,
            format!(
                "a peer may be in at most {} groups",
                fabric_proto::PEER_GROUPS_MAX
            ),
        )
        .into());
    }
    for g in &req.groups {
        validate_id(IdKind::Group, g)?;
    }
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
            mesh: mesh.as_str().into(),
            peer: req.id.as_str().into(),
            groups: req.groups.iter().map(|g| g.as_str().into()).collect(),
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

/// Resolves a peer bearer token to its peer id (asks the mesh's shard).
async fn authenticate(
    ctx: &NodeCtx,
    mesh: &str,
    headers: &HeaderMap,
) -> Result<Arc<str>, ProtoError> {
    let token = bearer(headers)?.to_string();
    validate_id(IdKind::Mesh, mesh)?;
    match call(
        ctx,
        ShardOp::Auth {
            r: 0,
            mesh: mesh.into(),
            token,
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

#[derive(Deserialize)]
struct AppendBody<'a> {
    #[serde(borrow)]
    body: Option<&'a RawValue>,
    key: Option<String>,
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

async fn append_inner(
    ctx: &NodeCtx,
    mesh: String,
    conv: String,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult {
    let peer = authenticate(ctx, &mesh, &headers).await?;
    validate_conv(&conv)?;
    let req: AppendBody<'_> = parse_json(&body)?;
    let raw = req
        .body
        .ok_or_else(|| ProtoError::bad_request("request needs field \"body\""))?;
    if let Some(k) = &req.key {
        validate_key(k)?;
    }
    // As over WebSocket: at most body_bytes_max (so every event frame carrying it fits in
    // frame_bytes_max) and BODY_NESTING_MAX deep.
    if raw.get().len() > ctx.config.body_bytes_max() {
        return Err(ProtoError::new(
            ErrorCode::TooLarge,
            format!(
                "body is {} bytes; the limit is {} (body_bytes_max)",
                raw.get().len(),
                ctx.config.body_bytes_max()
            ),
        )
        .into());
    }
    let body = Body::from_parsed_json(raw.get())?;
    match call(
        ctx,
        ShardOp::Append {
            r: 0,
            mesh: mesh.as_str().into(),
            conv: conv.as_str().into(),
            from: peer,
            body,
            key: req.key.as_deref().map(Into::into),
        },
    )
    .await?
    {
        Reply::Frame(ServerOp::Ok { seq: Some(seq), .. }) => {
            Ok((StatusCode::CREATED, Json(serde_json::json!({"seq": seq}))).into_response())
        }
        _ => Err(ProtoError::new(ErrorCode::Internal, "unexpected reply to append").into()),
    }
}

#[derive(Deserialize)]
struct ReadQuery {
    from: Option<u64>,
    limit: Option<u32>,
}

async fn read(
    State(ctx): State<Arc<NodeCtx>>,
    Path((mesh, conv)): Path<(String, String)>,
    Query(q): Query<ReadQuery>,
    headers: HeaderMap,
) -> ApiResult {
    authenticate(&ctx, &mesh, &headers).await?;
    validate_conv(&conv)?;
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > fabric_proto::READ_LIMIT_MAX {
        return Err(ProtoError::bad_request(format!(
            "limit must be 1..={}",
            fabric_proto::READ_LIMIT_MAX
        ))
        .into());
    }
    match call(
        &ctx,
        ShardOp::Read {
            r: 0,
            mesh: mesh.as_str().into(),
            conv: conv.as_str().into(),
            from: q.from.unwrap_or(1),
            limit,
        },
    )
    .await?
    {
        Reply::Messages { events, head, .. } => {
            // Bodies are spliced in as raw JSON, exactly as they were appended.
            let mut out =
                Vec::with_capacity(64 + events.iter().map(|e| e.body.len() + 64).sum::<usize>());
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
            Ok((StatusCode::OK, [("content-type", "application/json")], out).into_response())
        }
        _ => Err(ProtoError::new(ErrorCode::Internal, "unexpected reply to read").into()),
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
