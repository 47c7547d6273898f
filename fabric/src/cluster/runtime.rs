//! A node's replication plumbing at run time: the node link ([`super::links::NodeLinks`])
//! carries each replicated shard host's [`NodeFrame`]s, tagged with the shard as the link's
//! group, every shard's heartbeats to one peer folded into one frame ([`beats`]); one task
//! hands frames that arrive to the shard they name.

use super::links::{Inbound, LinksLimits, Member, NodeLinks};
use super::{LinkConfig, LinkError, NodeIdentity, NodeLink};
use crate::shard_actor::NodeSender;
use fabric_proto::internal::ShardIdx;
use fabric_router::host::{beats, NodeFrame};
use fabric_shard::raft::NodeId;
use rustls::pki_types::CertificateDer;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::mpsc;

/// The node link's idle timeout in a cluster: a dead peer's connection is gone after this.
pub const LINK_IDLE_TIMEOUT_MS: u64 = 3_000;
/// Keep-alives on an otherwise quiet node link.
pub const LINK_KEEP_ALIVE_INTERVAL_MS: u64 = 500;

/// What a node needs to join its cluster's links.
pub struct LinkSetup {
    pub identity: NodeIdentity,
    pub ca_cert: CertificateDer<'static>,
    pub listen: SocketAddr,
    /// Every member, this node included: (id, node-link address).
    pub members: Vec<(NodeId, SocketAddr)>,
    pub node_frame_bytes_max: usize,
}

/// The node link as the shard hosts' [`NodeSender`].
pub struct LinkSender {
    links: NodeLinks<NodeFrame>,
}

impl NodeSender for LinkSender {
    fn send(&self, to: NodeId, shard: ShardIdx, frame: NodeFrame) -> bool {
        self.links.send(to, shard, frame)
    }
}

impl LinkSender {
    /// The link's view of each peer (`/v1/cluster`'s `up`).
    pub fn status(&self) -> Vec<super::links::PeerStatus> {
        self.links.status()
    }

    pub fn stats(&self) -> super::links::LinksStats {
        self.links.stats()
    }

    /// A member joined: dial it and let it connect.
    pub fn add_member(&self, id: NodeId, link: SocketAddr) -> Result<(), LinkError> {
        self.links.add_member(Member { id, link })
    }

    /// A member left: close and refuse it.
    pub fn remove_member(&self, id: NodeId) {
        self.links.remove_member(id)
    }
}

/// Binds the node link and starts its connections; the frames that arrive come out of the
/// returned receiver (hand it to [`route_inbound`]).
pub async fn start_links(
    setup: LinkSetup,
) -> Result<(Arc<LinkSender>, mpsc::Receiver<Inbound<NodeFrame>>), LinkError> {
    let ids = setup.members.iter().map(|(id, _)| *id);
    let mut config = LinkConfig::new(ids);
    config.node_frame_bytes_max = setup.node_frame_bytes_max;
    // A peer that restarted dials in again while this node may still hold its dead
    // connection (kept by the one-connection rule until it idles out): a short idle timeout,
    // with keep-alives well inside it, lets a restarted node rejoin within seconds.
    config.idle_timeout_ms = LINK_IDLE_TIMEOUT_MS;
    config.keep_alive_interval_ms = LINK_KEEP_ALIVE_INTERVAL_MS;
    let link = NodeLink::bind(setup.listen, &setup.identity, &setup.ca_cert, config)?;
    let members = setup
        .members
        .iter()
        .map(|(id, link)| Member {
            id: *id,
            link: *link,
        })
        .collect();
    let limits = LinksLimits::default();
    let (links, inbound) =
        NodeLinks::start_coalescing(link, members, limits, beats::coalesce).await?;
    Ok((Arc::new(LinkSender { links }), inbound))
}

/// Hands every frame that arrives to its shard's host (a frame naming a shard this node does
/// not have is dropped: a peer with another placement is misconfigured, and says so in its
/// own logs too). A full shard channel makes this task wait: backpressure onto the link.
pub fn route_inbound(
    mut inbound: mpsc::Receiver<Inbound<NodeFrame>>,
    shards: Vec<mpsc::Sender<(NodeId, NodeFrame)>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(Inbound { from, group, frame }) = inbound.recv().await {
            // A batch of heartbeats gives each shard its own.
            for (shard, frame) in beats::expand(group, frame) {
                let Some(tx) = shards.get(shard as usize) else {
                    tracing::warn!(
                        from,
                        shard,
                        "a node frame for a shard this node does not have"
                    );
                    continue;
                };
                if tx.send((from, frame)).await.is_err() {
                    return;
                }
            }
        }
    })
}
