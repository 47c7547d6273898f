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

    /// The member that told this node it was removed from the cluster, if one did.
    pub fn removed_by(&self) -> Option<u64> {
        self.links.removed_by()
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
        let mut conns: std::collections::HashMap<NodeId, usize> = Default::default();
        while let Some(Inbound {
            from,
            group,
            frame,
            conn,
        }) = inbound.recv().await
        {
            // A new connection from `from`: frames of the old one may be lost, so every
            // shard's sessions forwarded there attach again (`NodeFrame::LinkReset`). The map
            // holds one entry per member.
            if conns.insert(from, conn).is_some_and(|old| old != conn) {
                for tx in &shards {
                    if tx.send((from, NodeFrame::LinkReset)).await.is_err() {
                        return;
                    }
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use fabric_proto::internal::Request;

    fn forward(conn: usize) -> Inbound<NodeFrame> {
        Inbound {
            from: 2,
            group: 0,
            frame: NodeFrame::Forward {
                session: 2 << 48,
                batch: Vec::<Request>::new(),
                seq: 1,
            },
            conn,
        }
    }

    #[tokio::test]
    async fn a_frame_on_a_new_connection_tells_every_shard_the_link_was_reset() {
        // Proves the node's side of `NodeFrame::LinkReset`: frames on the connection a peer
        // first used pass as they are; the first frame on a replacing connection is preceded,
        // on every shard, by a reset naming that peer (what was queued on the old connection
        // may be lost, so the shards' forwarded sessions attach again).
        let (in_tx, in_rx) = mpsc::channel(8);
        let (a_tx, mut a_rx) = mpsc::channel(8);
        let (b_tx, mut b_rx) = mpsc::channel(8);
        let task = route_inbound(in_rx, vec![a_tx, b_tx]);
        for conn in [7, 7, 9] {
            in_tx.send(forward(conn)).await.expect("sent");
        }
        drop(in_tx);
        task.await.expect("the task ends");
        let mut a = Vec::new();
        while let Ok((from, frame)) = a_rx.try_recv() {
            assert_eq!(from, 2);
            a.push(matches!(frame, NodeFrame::LinkReset));
        }
        assert_eq!(
            a,
            vec![false, false, true, false],
            "the reset before the new frame"
        );
        let mut b = Vec::new();
        while let Ok((_, frame)) = b_rx.try_recv() {
            b.push(matches!(frame, NodeFrame::LinkReset));
        }
        assert_eq!(b, vec![true], "every shard hears of it");
    }
}
