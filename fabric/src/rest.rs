//! The glue of one REST call: drives the edge's sans-IO [`RestCall`] through the session's
//! router into the shards' input channels and their replies back, exactly as a WebSocket or
//! QUIC session's task does (`session.rs`), for one request. Every decision (what to check,
//! which ops, what an answer or a restart means, whom to tell the session is gone) is the
//! core's; the simulator's HTTP clients drive the same core.

use crate::node::NodeCtx;
use crate::shard_actor::{SessionMsg, SessionTx, ShardMsg};
use fabric_edge::rest::{RestAnswer, RestCall, RestConfig, RestRequest};
use fabric_proto::{ErrorCode, ProtoError};
use std::time::Duration;
use tokio::sync::mpsc;

/// Reply batches a REST session's channel holds: it is owed at most two replies (the `Auth`
/// and the op), one at a time, and maybe a restart notice.
const REST_REPLY_BATCHES_MAX: usize = 4;

/// A call in progress. Dropped before its answer (the HTTP client went away: axum drops the
/// handler's future at an await), it still tells the shards to forget the session, which
/// they would otherwise hold (with its reply sender) until a restart.
struct Call<'a> {
    ctx: &'a NodeCtx,
    core: RestCall,
    router: fabric_router::Router,
    tx: SessionTx,
}

impl Call<'_> {
    /// The core's requests through the router, as one message per shard.
    fn next_message(&mut self) -> Option<(usize, ShardMsg)> {
        while let Some((route, req)) = self.core.poll_request() {
            self.router.handle_request(crate::now_ms(), route, req);
        }
        let (shard, requests) = self.router.poll_batch()?;
        let msg = ShardMsg::Batch {
            session: self.core.id(),
            tx: self.tx.clone(),
            requests,
        };
        Some((shard as usize, msg))
    }

    /// Hands the core's requests to the shards, waiting while a shard's queue is full.
    async fn forward(&mut self) -> Result<(), ProtoError> {
        while let Some((shard, msg)) = self.next_message() {
            // A cancelled `send` queues nothing (tokio's send is cancel-safe).
            self.ctx.shards[shard]
                .send(msg)
                .await
                .map_err(|_| ProtoError::new(ErrorCode::Unavailable, "the shard is not running"))?;
        }
        Ok(())
    }

    fn take(&mut self, msg: Option<SessionMsg>) {
        let now = crate::now_ms();
        match msg {
            Some(SessionMsg::Replies(shard, replies)) => {
                for reply in replies {
                    self.core.handle_reply(now, shard, reply);
                }
            }
            // A call is one request: a leader change under it is a restart for it.
            Some(SessionMsg::ShardRestarted(shard)) | Some(SessionMsg::ShardDetached(shard)) => {
                self.core.handle_shard_restarted(now, shard)
            }
            Some(SessionMsg::Overloaded(shard)) => self.core.handle_shard_overloaded(now, shard),
            // Every sender is gone: no answer can come.
            None => self.core.handle_timeout(u64::MAX),
        }
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        self.core.handle_cancel(crate::now_ms());
        while let Some((shard, msg)) = self.next_message() {
            send_from_drop(&self.ctx.shards[shard], msg);
        }
    }
}

/// Sends `msg` from code that cannot wait (a `Drop`): at once if the shard's queue has room,
/// else from a task as soon as it has (a shard that is gone needs nothing).
pub(crate) fn send_from_drop(queue: &mpsc::Sender<ShardMsg>, msg: ShardMsg) {
    match queue.try_send(msg) {
        Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
        Err(mpsc::error::TrySendError::Full(msg)) => {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let queue = queue.clone();
                rt.spawn(async move {
                    let _ = queue.send(msg).await;
                });
            }
        }
    }
}

/// Runs one REST call to its answer.
pub(crate) async fn call(ctx: &NodeCtx, request: RestRequest) -> Result<RestAnswer, ProtoError> {
    let (tx, rx) = mpsc::channel(REST_REPLY_BATCHES_MAX);
    call_with(ctx, request, tx, rx).await
}

/// [`call`] with its reply channel given (the leak test keeps a weak sender to see whether a
/// shard still holds one).
pub(crate) async fn call_with(
    ctx: &NodeCtx,
    request: RestRequest,
    tx: SessionTx,
    mut rx: mpsc::Receiver<SessionMsg>,
) -> Result<RestAnswer, ProtoError> {
    let config = RestConfig::new(&ctx.session_config);
    let id = ctx.next_session_id();
    let core = RestCall::new(id, crate::now_ms(), &config, request);
    let mut call = Call {
        ctx,
        core,
        router: ctx.router(),
        tx,
    };
    loop {
        call.forward().await?;
        if let Some(answer) = call.core.poll_answer() {
            // The `Closed`s the answer queued go out before the call ends.
            call.forward().await?;
            return Ok(answer);
        }
        let deadline = call.core.poll_timeout().unwrap_or(u64::MAX);
        let wait = Duration::from_millis(deadline.saturating_sub(crate::now_ms()));
        match tokio::time::timeout(wait, rx.recv()).await {
            Ok(msg) => call.take(msg),
            Err(_) => call.core.handle_timeout(crate::now_ms()),
        }
    }
}
