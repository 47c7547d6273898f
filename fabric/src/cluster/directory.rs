//! The cluster's members, kept in its metadata group.
//!
//! The metadata group is a Raft group of its own beside the data shards (group number
//! `shards`, its log in `data_dir/meta`), run by the same replica code. It holds the cluster's
//! changes of membership as the entries of one conversation (`nodes` in mesh `_cluster`,
//! which no client can reach: the router places client meshes on the data shards only), each
//! a JSON [`Change`]. The directory is the founders (the voters every group was created with)
//! with every change folded in, in order.
//!
//! Every node reads the changes it has not seen (a linearizable read, forwarded to the
//! group's leader) every [`DIRECTORY_POLL_MS`], and applies a new directory: its node link
//! dials members that joined and refuses members that left, and every group's leader (data
//! shards and metadata group alike) moves its membership to the directory's nodes one change
//! at a time (`fabric_router::host::placement`). Every node holds a replica of every group.
//!
//! `POST /v1/cluster/nodes` and `DELETE /v1/cluster/nodes/{id}` (admin; `fabric cluster
//! add-node` and `remove-node`) append a change, with an idempotency key, once the change
//! makes sense against the directory as the metadata group has it.

use super::config::{ClusterConfig, Member, NODE_ID_MAX};
use crate::node::NodeCtx;
use crate::shard_actor::ShardMsg;
use fabric_proto::internal::{Reply, ShardOp};
use fabric_proto::{Body, ConvId, ErrorCode, MeshId, PeerId, ProtoError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;

/// The metadata group's directory inside the data directory.
pub const META_DIR: &str = "meta";
pub const META_MESH: &str = "_cluster";
pub const META_CONV: &str = "nodes";
/// The `from` of the changes the nodes append.
pub const META_PEER: &str = "_fabric";
/// The metadata log is not retired: it holds a few hundred bytes per change and per election.
pub const META_RETENTION_BYTES_MAX: u64 = 1 << 50;
/// How often a node reads the changes it has not seen.
pub const DIRECTORY_POLL_MS: u64 = 500;
/// Changes read per page.
pub const DIRECTORY_PAGE_CHANGES_MAX: u32 = 1_000;
/// Members a directory holds at most (every node holds every group: far more would make
/// groups no one runs).
pub const DIRECTORY_NODES_MAX: usize = fabric_shard::members::MEMBERS_NODES_MAX;

/// One change of membership, as the metadata conversation holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Change {
    /// Node `id` joins, reachable on `link` (node link) and `http` (clients).
    Add {
        id: u64,
        link: SocketAddr,
        http: String,
    },
    /// Node `id` leaves.
    Remove { id: u64 },
}

/// The cluster's members as of change `seq`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Directory {
    /// By id; `None` for a founder whose addresses this node's config does not list (one that
    /// left before this node joined: a later change removes it).
    pub nodes: BTreeMap<u64, Option<Member>>,
    /// The last change folded in (its seq in the metadata conversation; 0: none).
    pub seq: u64,
    /// Set once a read of the metadata group succeeded: only then is the directory the
    /// cluster's (before, it is the founders as this node's config knows them).
    pub read: bool,
}

impl Directory {
    /// The founders, with the addresses `c.members` gives them.
    pub fn founded(c: &ClusterConfig) -> Directory {
        let nodes = c
            .founders()
            .into_iter()
            .map(|id| (id, c.member(id).cloned()))
            .collect();
        Directory {
            nodes,
            seq: 0,
            read: false,
        }
    }

    /// Folds in change `seq`. A change that does not apply (an add of a member, a removal of
    /// a stranger) was refused before it was appended; if one is there anyway, it is no change.
    pub fn apply(&mut self, seq: u64, change: &Change) {
        self.seq = self.seq.max(seq);
        match change {
            Change::Add { id, link, http } => {
                if self.nodes.len() < DIRECTORY_NODES_MAX {
                    let m = Member {
                        id: *id,
                        link: *link,
                        http: http.clone(),
                    };
                    self.nodes.entry(*id).or_insert(Some(m));
                }
            }
            Change::Remove { id } => {
                if self.nodes.len() > 1 {
                    self.nodes.remove(id);
                }
            }
        }
    }

    pub fn ids(&self) -> BTreeSet<u64> {
        self.nodes.keys().copied().collect()
    }

    /// The members whose addresses are known.
    pub fn members(&self) -> Vec<Member> {
        self.nodes.values().flatten().cloned().collect()
    }

    /// `change` is an add of a member exactly as the directory has it.
    pub fn holds(&self, change: &Change) -> bool {
        match change {
            Change::Add { id, link, http } => self.nodes.get(id).is_some_and(|m| {
                m.as_ref()
                    .is_some_and(|m| m.link == *link && m.http == *http)
            }),
            Change::Remove { .. } => false,
        }
    }

    /// Why `change` cannot be appended now, if it cannot.
    pub fn refuse(&self, change: &Change) -> Option<ProtoError> {
        let conflict = |m: String| Some(ProtoError::new(ErrorCode::Conflict, m));
        match change {
            Change::Add { id, link, http } => {
                if *id == 0 || *id > NODE_ID_MAX {
                    return Some(ProtoError::bad_request(format!(
                        "node id {id} is not 1 to {NODE_ID_MAX}"
                    )));
                }
                if !super::config::is_http_url(http) {
                    return Some(ProtoError::bad_request(format!(
                        "http {http:?} is not an http:// or https:// URL"
                    )));
                }
                if self.nodes.contains_key(id) {
                    return conflict(format!("node {id} is already a member"));
                }
                if let Some(m) = self.members().iter().find(|m| m.link == *link) {
                    return conflict(format!("node {} already has link {link}", m.id));
                }
                if self.nodes.len() >= DIRECTORY_NODES_MAX {
                    return conflict(format!("the cluster has {DIRECTORY_NODES_MAX} members"));
                }
                None
            }
            Change::Remove { id } if !self.nodes.contains_key(id) => Some(ProtoError::new(
                ErrorCode::NotFound,
                format!("node {id} is not a member"),
            )),
            Change::Remove { .. } if self.nodes.len() == 1 => {
                conflict("the last member cannot leave".into())
            }
            Change::Remove { .. } => None,
        }
    }
}

/// Reads the changes this node has not seen and applies the directory they make, if it
/// changed (or was never applied). Errors are the metadata group's (no leader, a timeout).
/// One refresh at a time (the watcher's and an admin call's), so a slower one never puts an
/// older directory back.
pub async fn refresh(ctx: &NodeCtx) -> Result<Directory, ProtoError> {
    let Some(c) = &ctx.cluster else {
        return Err(ProtoError::new(ErrorCode::NotFound, "not in a cluster"));
    };
    let _one = c.refreshing.lock().await;
    let mut dir = c.directory.lock().map(|d| d.clone()).unwrap_or_default();
    let first_read = !dir.read;
    let before = dir.clone();
    loop {
        let op = ShardOp::Read {
            r: 1,
            mesh: MeshId::must(META_MESH),
            conv: ConvId::must(META_CONV),
            from: dir.seq + 1,
            limit: DIRECTORY_PAGE_CHANGES_MAX,
            local: false,
        };
        let (events, head) = match crate::http::call_meta(ctx, op).await {
            Ok(Reply::Messages { events, head, .. }) => (events, head),
            // No change was ever made: the mesh does not exist yet.
            Err(e) if e.code == ErrorCode::NotFound => (Vec::new(), 0),
            Err(e) => return Err(e),
            Ok(_) => return Err(ProtoError::new(ErrorCode::Internal, "not a page")),
        };
        for e in &events {
            match serde_json::from_str::<Change>(e.body.as_str()) {
                Ok(change) => dir.apply(e.seq, &change),
                Err(err) => {
                    tracing::warn!(seq = e.seq, error = %err, "a metadata change that is not one");
                    dir.seq = dir.seq.max(e.seq);
                }
            }
        }
        if events.is_empty() || dir.seq >= head {
            break;
        }
    }
    dir.read = true;
    if first_read || dir.nodes != before.nodes {
        apply(ctx, &before, &dir).await;
        if let Ok(mut w) = c.welcome.write() {
            *w = Some(
                dir.members()
                    .iter()
                    .map(|m| m.http.as_str().into())
                    .collect(),
            );
        }
    }
    if let Ok(mut d) = c.directory.lock() {
        *d = dir.clone();
    }
    Ok(dir)
}

/// A new directory takes effect: links first (a leader proposes a new member only once it can
/// reach it), then every group's target.
async fn apply(ctx: &NodeCtx, before: &Directory, dir: &Directory) {
    let Some(c) = &ctx.cluster else { return };
    for m in dir.members() {
        if let Err(e) = c.links.add_member(m.id, m.link) {
            tracing::warn!(peer = m.id, error = %e, "cannot link to a new member");
        }
    }
    for id in before.ids().difference(&dir.ids()) {
        if *id != c.config.node {
            c.links.remove_member(*id);
        }
    }
    let target = dir.ids();
    tracing::info!(members = ?target, seq = dir.seq, "cluster membership");
    for tx in ctx.shards.iter().chain(std::iter::once(&c.meta)) {
        let _ = tx.send(ShardMsg::Members(target.clone())).await;
    }
}

/// Appends `change` to the metadata group, once it makes sense against the directory as the
/// group has it now; answers the directory with the change in.
pub async fn propose(ctx: &NodeCtx, change: Change) -> Result<Directory, ProtoError> {
    let dir = refresh(ctx).await?;
    if dir.holds(&change) {
        // Already in (a retry of a change that went in before its answer was lost).
        return Ok(dir);
    }
    if let Some(e) = dir.refuse(&change) {
        return Err(e);
    }
    if dir.seq == 0 {
        // The first change creates the metadata mesh (again, harmlessly, after a race).
        let op = ShardOp::CreateMesh {
            r: 1,
            mesh: MeshId::must(META_MESH),
        };
        match crate::http::call_meta(ctx, op).await {
            Ok(_) => {}
            Err(e) if e.code == ErrorCode::Conflict => {}
            Err(e) => return Err(e),
        }
    }
    let body = serde_json::to_string(&change).map_err(|e| {
        ProtoError::new(
            ErrorCode::Internal,
            format!("cannot encode the change: {e}"),
        )
    })?;
    // The key names the change and the directory it was checked against: a retry appends it
    // once, and the same change later (a node that left joins again) is a change of its own.
    let digest = <sha2::Sha256 as sha2::Digest>::digest(body.as_bytes());
    let key = format!("{}@{}", hex::encode(&digest[..8]), dir.seq);
    let op = ShardOp::Append {
        r: 1,
        mesh: MeshId::must(META_MESH),
        conv: ConvId::must(META_CONV),
        from: PeerId::must(META_PEER),
        body: Body::from_json_text(body)?,
        key: Some(key.as_str().into()),
    };
    crate::http::call_meta(ctx, op).await?;
    refresh(ctx).await
}

/// Reads the directory every [`DIRECTORY_POLL_MS`] until shutdown.
pub fn spawn_watcher(ctx: Arc<NodeCtx>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut shutdown = ctx.shutdown.clone();
        loop {
            if let Err(e) = refresh(&ctx).await {
                tracing::debug!(error = %e.message, "cluster membership not read");
            }
            let wait = tokio::time::sleep(std::time::Duration::from_millis(DIRECTORY_POLL_MS));
            tokio::select! {
                _ = wait => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(id: u64) -> Change {
        Change::Add {
            id,
            link: SocketAddr::from(([127, 0, 0, 1], 7000 + id as u16)),
            http: format!("http://127.0.0.1:{}", 8000 + id),
        }
    }

    #[test]
    fn the_directory_is_the_founders_with_every_change_folded_in() {
        // Proves adds and removals fold in order over the founders, a change that does not
        // apply changes nothing, the last member never leaves, and refusals name the reason.
        let c = super::super::config::example(3, 1, "t");
        let mut d = Directory::founded(&c);
        assert_eq!(d.ids(), [1, 2, 3].into());
        assert_eq!(d.members().len(), 3);
        assert!(d.refuse(&add(4)).is_none());
        d.apply(1, &add(4));
        assert!(d.holds(&add(4)), "the same add again is already in");
        assert_eq!(d.refuse(&add(4)).map(|e| e.code), Some(ErrorCode::Conflict));
        d.apply(2, &Change::Remove { id: 1 });
        assert_eq!(d.ids(), [2, 3, 4].into());
        assert_eq!(d.seq, 2);
        let gone = d.refuse(&Change::Remove { id: 1 }).map(|e| e.code);
        assert_eq!(gone, Some(ErrorCode::NotFound));
        d.apply(3, &Change::Remove { id: 9 });
        assert_eq!(d.ids(), [2, 3, 4].into());
        for (seq, id) in [(4, 2), (5, 3), (6, 4)] {
            d.apply(seq, &Change::Remove { id });
        }
        assert_eq!(d.ids(), [4].into(), "the last member stays");
        assert!(d.refuse(&Change::Remove { id: 4 }).is_some());
        let bad = Change::Add {
            id: 7,
            link: SocketAddr::from(([127, 0, 0, 1], 1)),
            http: "ftp://x".into(),
        };
        assert_eq!(d.refuse(&bad).map(|e| e.code), Some(ErrorCode::BadRequest));
    }

    #[test]
    fn a_change_reads_back_from_its_json() {
        // Proves the metadata conversation's entries are the documented JSON.
        let text = r#"{"op":"add","id":4,"link":"127.0.0.1:7432","http":"http://127.0.0.1:7430"}"#;
        let c: Change = serde_json::from_str(text).expect("a change");
        assert_eq!(serde_json::to_string(&c).expect("json"), text);
        let r: Change = serde_json::from_str(r#"{"op":"remove","id":4}"#).expect("a change");
        assert_eq!(r, Change::Remove { id: 4 });
        assert!(serde_json::from_str::<Change>(r#"{"op":"remove","id":4,"x":1}"#).is_err());
    }
}
