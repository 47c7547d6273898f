//! The node-to-node QUIC link: mutual TLS with the cluster CA, node ids from URI SANs, a
//! stream per shard group, and every refusal with its typed error.

use fabric::cluster::link::{
    self, LinkConfig, LinkError, NodeLink, PeerConn, Refusal, CONTROL_GROUP, STOP_FRAME_TOO_LARGE,
};
use fabric::cluster::pki::{ClusterCa, NodeIdentity};
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Every wait in these tests ends within this.
const WAIT: Duration = Duration::from_secs(10);
const DAY: Duration = Duration::from_secs(86_400);

async fn within<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen within {WAIT:?}"))
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn bind(id: &NodeIdentity, ca: &CertificateDer<'static>, config: LinkConfig) -> NodeLink {
    NodeLink::bind(loopback(), id, ca, config).unwrap()
}

fn node(ca: &ClusterCa, node_id: u64, members: &[u64]) -> NodeLink {
    let id = ca
        .issue_node(node_id, &["127.0.0.1".into()], 1)
        .unwrap()
        .identity();
    bind(&id, ca.cert_der(), LinkConfig::new(members.iter().copied()))
}

fn addr(link: &NodeLink) -> SocketAddr {
    link.local_addr().unwrap()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Msg {
    seq: u64,
    body: String,
}

fn assert_refused(r: Result<PeerConn, LinkError>, want: Refusal) -> Option<u64> {
    match r {
        Err(LinkError::Refused { refusal, peer, .. }) if refusal == want => peer,
        Err(e) => panic!("expected Refused({want:?}), got {e:?}"),
        Ok(p) => panic!(
            "expected Refused({want:?}), got a connection to {}",
            p.node_id
        ),
    }
}

fn assert_refused_by_peer(r: Result<PeerConn, LinkError>, want: Refusal) {
    match r {
        Err(LinkError::RefusedByPeer { refusal, .. }) if refusal == want => {}
        Err(e) => panic!("expected RefusedByPeer({want:?}), got {e:?}"),
        Ok(p) => panic!(
            "expected RefusedByPeer({want:?}), got a connection to {}",
            p.node_id
        ),
    }
}

/// Dials `to` from `from` and takes what `to`'s listener yields for it.
async fn dial(
    from: &NodeLink,
    to: &NodeLink,
    incoming: &mut link::Incoming,
    expect: u64,
) -> (Result<PeerConn, LinkError>, Result<PeerConn, LinkError>) {
    let dialed = within("dial", from.connect(addr(to), expect)).await;
    let accepted = within("accept", incoming.next()).await.expect("listening");
    (dialed, accepted)
}

async fn exchange(a: &PeerConn, b: &PeerConn, group: u32) {
    let mut s = within("open", a.open_group(group)).await.unwrap();
    s.send_frame(&Msg {
        seq: 1,
        body: format!("to {}", b.node_id),
    })
    .await
    .unwrap();
    let mut r = within("accept group", b.accept_group()).await.unwrap();
    assert_eq!(r.group, group);
    let got: Msg = within("recv", r.recv_frame()).await.unwrap().unwrap();
    assert_eq!(got.body, format!("to {}", b.node_id));
    r.send_frame(&Msg {
        seq: 2,
        body: "back".into(),
    })
    .await
    .unwrap();
    let back: Msg = within("recv back", s.recv_frame()).await.unwrap().unwrap();
    assert_eq!(back.seq, 2);
}

#[tokio::test]
async fn two_nodes_connect_both_ways_and_exchange_group_frames() {
    // Proves same-CA nodes connect both ways, use group streams, one link.
    let ca = ClusterCa::generate("test").unwrap();
    let n1 = node(&ca, 1, &[1, 2]);
    let n2 = node(&ca, 2, &[1, 2]);
    let mut in1 = n1.listen();
    let mut in2 = n2.listen();

    let (d, a) = dial(&n1, &n2, &mut in2, 2).await;
    let (p12, p21) = (d.unwrap(), a.unwrap());
    assert_eq!((p12.node_id, p21.node_id), (2, 1));

    // A stream per group, opened by node 1, frames both ways on each.
    let groups = [0u32, 5, 17];
    let mut opened = Vec::new();
    for g in groups {
        let mut s = within("open", p12.open_group(g)).await.unwrap();
        s.send_frame(&Msg {
            seq: u64::from(g),
            body: format!("group {g}"),
        })
        .await
        .unwrap();
        opened.push(s);
    }
    let mut accepted = Vec::new();
    for _ in groups {
        let mut s = within("accept group", p21.accept_group()).await.unwrap();
        let m: Msg = within("recv", s.recv_frame()).await.unwrap().unwrap();
        assert_eq!(m.body, format!("group {}", s.group));
        s.send_frame(&Msg {
            seq: u64::from(s.group) + 1000,
            body: "ack".into(),
        })
        .await
        .unwrap();
        accepted.push(s.group);
    }
    accepted.sort();
    assert_eq!(accepted, groups);
    for s in &mut opened {
        let m: Msg = within("recv ack", s.recv_frame()).await.unwrap().unwrap();
        assert_eq!(m.seq, u64::from(s.group) + 1000);
    }
    // The accepting node opens group streams too.
    exchange(&p21, &p12, 3).await;

    // One connection per pair: node 2 dialing node 1 now is refused (the connection node 1
    // dialed wins), on both sides.
    let (d, a) = dial(&n2, &n1, &mut in1, 1).await;
    assert_eq!(assert_refused(d, Refusal::Duplicate), Some(1));
    assert_refused_by_peer(a, Refusal::Duplicate);
    // The kept connection still works.
    exchange(&p12, &p21, 9).await;

    // Closed, the pair reconnects the other way.
    p12.close();
    within("close seen", p21.connection.closed()).await;
    let (d, a) = dial(&n2, &n1, &mut in1, 1).await;
    let (p21, p12) = (d.unwrap(), a.unwrap());
    assert_eq!((p21.node_id, p12.node_id), (1, 2));
    exchange(&p21, &p12, 4).await;
    exchange(&p12, &p21, 6).await;
    n1.close();
    n2.close();
}

#[tokio::test]
async fn two_nodes_dialing_each_other_at_once_keep_the_connection_the_lower_id_dialed() {
    // Proves a simultaneous dial converges on one connection per pair: node 1's, on both ends.
    let ca = ClusterCa::generate("test").unwrap();
    let n1 = node(&ca, 1, &[1, 2]);
    let n2 = node(&ca, 2, &[1, 2]);
    let mut in1 = n1.listen();
    let mut in2 = n2.listen();
    let (d12, d21) = within("both dials", async {
        tokio::join!(n1.connect(addr(&n2), 2), n2.connect(addr(&n1), 1))
    })
    .await;
    let p12 = d12.expect("the connection node 1 dialed is kept");
    let p21 = within("accept", in2.next()).await.unwrap().unwrap();
    // Node 2's own dial is refused or, if it completed first, replaced: either way it ends.
    match d21 {
        Ok(p) => {
            within("replaced", p.connection.closed()).await;
        }
        Err(e) => assert_eq!(e.refusal(), Some(Refusal::Duplicate), "{e:?}"),
    }
    match within("node 1's accept", in1.next()).await.unwrap() {
        Ok(p) => {
            within("replaced", p.connection.closed()).await;
        }
        Err(e) => assert!(
            e.refusal() == Some(Refusal::Duplicate) || matches!(e, LinkError::Connection(_)),
            "{e:?}"
        ),
    }
    exchange(&p12, &p21, 1).await;
    exchange(&p21, &p12, 2).await;
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_as_client_and_as_server() {
    // Proves another CA's certificate is refused (UnknownCa) whether its holder dials or listens.
    let ca = ClusterCa::generate("test").unwrap();
    let rogue = ClusterCa::generate("test").unwrap();
    let n1 = node(&ca, 1, &[1, 2]);
    let mut in1 = n1.listen();
    // The rogue node trusts the real CA but holds a certificate of its own CA.
    let rogue_id = rogue.issue_node(2, &[], 1).unwrap().identity();
    let r2 = bind(&rogue_id, ca.cert_der(), LinkConfig::new([1, 2]));
    let mut in2 = r2.listen();

    // As client: node 1 refuses it.
    let (d, a) = dial(&r2, &n1, &mut in1, 1).await;
    assert_refused_by_peer(d, Refusal::UnknownCa);
    assert_refused(a, Refusal::UnknownCa);

    // As server: node 1 refuses it.
    let (d, a) = dial(&n1, &r2, &mut in2, 2).await;
    assert_refused(d, Refusal::UnknownCa);
    assert_refused_by_peer(a, Refusal::UnknownCa);
}

#[tokio::test]
async fn an_expired_or_not_yet_valid_certificate_is_refused() {
    // Proves an expired or not-yet-valid certificate is refused (CertificateExpired) both ways.
    let ca = ClusterCa::generate("test").unwrap();
    let now = SystemTime::now();
    let n1 = node(&ca, 1, &[1, 2]);
    let mut in1 = n1.listen();
    let expired = ca
        .issue_node_window(2, &[], now - 10 * DAY, now - DAY)
        .unwrap()
        .identity();
    let e2 = bind(&expired, ca.cert_der(), LinkConfig::new([1, 2]));
    let mut in2 = e2.listen();

    let (d, a) = dial(&e2, &n1, &mut in1, 1).await;
    assert_refused_by_peer(d, Refusal::CertificateExpired);
    assert_refused(a, Refusal::CertificateExpired);

    let (d, a) = dial(&n1, &e2, &mut in2, 2).await;
    assert_refused(d, Refusal::CertificateExpired);
    assert_refused_by_peer(a, Refusal::CertificateExpired);

    let future = ca
        .issue_node_window(3, &[], now + DAY, now + 10 * DAY)
        .unwrap()
        .identity();
    let f3 = bind(&future, ca.cert_der(), LinkConfig::new([1, 3]));
    let mut in3 = f3.listen();
    let (d, a) = dial(&n1, &f3, &mut in3, 3).await;
    assert_refused(d, Refusal::CertificateExpired);
    assert_refused_by_peer(a, Refusal::CertificateExpired);
}

#[tokio::test]
async fn a_client_offering_the_client_alpn_is_refused() {
    // Proves a peer offering the client ALPN `fabric/1` is refused in the handshake (Alpn).
    let ca = ClusterCa::generate("test").unwrap();
    let n1 = node(&ca, 1, &[1, 2]);
    let mut in1 = n1.listen();
    let id2 = ca.issue_node(2, &[], 1).unwrap().identity();
    let mut tls = link::client_tls(&id2, ca.cert_der()).unwrap();
    tls.alpn_protocols = vec![fabric::tls::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let config = quinn::ClientConfig::new(Arc::new(crypto));
    let endpoint = quinn::Endpoint::client(loopback()).unwrap();
    let dialed = within(
        "dial",
        endpoint
            .connect_with(config, addr(&n1), "fabric-node")
            .unwrap(),
    )
    .await;
    match dialed {
        Err(quinn::ConnectionError::ConnectionClosed(c)) => assert_eq!(
            Refusal::from_transport_code(u64::from(c.error_code)),
            Some(Refusal::Alpn),
            "{c:?}"
        ),
        other => panic!("expected a handshake refusal, got {other:?}"),
    }
    let accepted = within("accept", in1.next()).await.expect("listening");
    assert_refused(accepted, Refusal::Alpn);
}

#[tokio::test]
async fn a_node_outside_the_member_set_is_refused_both_ways() {
    // Proves a node id outside the member set is refused (NotMember) whether it dials or listens.
    let ca = ClusterCa::generate("test").unwrap();
    let n1 = node(&ca, 1, &[1, 2]);
    let n9 = node(&ca, 9, &[1, 9]);
    let mut in1 = n1.listen();
    let mut in9 = n9.listen();

    let (d, a) = dial(&n9, &n1, &mut in1, 1).await;
    assert_refused_by_peer(d, Refusal::NotMember);
    assert_eq!(assert_refused(a, Refusal::NotMember), Some(9));

    let (d, a) = dial(&n1, &n9, &mut in9, 9).await;
    assert_eq!(assert_refused(d, Refusal::NotMember), Some(9));
    assert_refused_by_peer(a, Refusal::NotMember);
}

#[tokio::test]
async fn a_dialer_expecting_node_2_that_reaches_node_3_refuses_it() {
    // Proves a dialer expecting node 2 that reaches node 3 refuses it (UnexpectedNode).
    let ca = ClusterCa::generate("test").unwrap();
    let n1 = node(&ca, 1, &[1, 2, 3]);
    let n3 = node(&ca, 3, &[1, 2, 3]);
    let mut in3 = n3.listen();
    let (d, a) = dial(&n1, &n3, &mut in3, 2).await;
    assert_eq!(assert_refused(d, Refusal::UnexpectedNode), Some(3));
    assert_refused_by_peer(a, Refusal::UnexpectedNode);
}

#[tokio::test]
async fn a_frame_over_node_frame_bytes_max_is_refused_on_send_and_on_receive() {
    // Proves oversize frames are refused on send and on receive (stream stopped); the link lives.
    let ca = ClusterCa::generate("test").unwrap();
    let max = 1024;
    let config = |members: [u64; 2]| {
        let mut c = LinkConfig::new(members);
        c.node_frame_bytes_max = max;
        c
    };
    let id1 = ca.issue_node(1, &[], 1).unwrap().identity();
    let id2 = ca.issue_node(2, &[], 1).unwrap().identity();
    let n1 = bind(&id1, ca.cert_der(), config([1, 2]));
    let n2 = bind(&id2, ca.cert_der(), config([1, 2]));
    let mut in2 = n2.listen();
    let (d, a) = dial(&n1, &n2, &mut in2, 2).await;
    let (p12, p21) = (d.unwrap(), a.unwrap());

    // Send side.
    let mut s = within("open", p12.open_group(1)).await.unwrap();
    let e = s.send_frame(&vec![7u8; 2 * max]).await.unwrap_err();
    assert!(
        matches!(e, LinkError::FrameTooLarge { len, max: m } if len > max as u64 && m == max),
        "{e:?}"
    );
    s.send_frame(&Msg {
        seq: 1,
        body: "after".into(),
    })
    .await
    .unwrap();
    let mut r = within("accept group", p21.accept_group()).await.unwrap();
    let m: Msg = within("recv", r.recv_frame()).await.unwrap().unwrap();
    assert_eq!(m.body, "after", "nothing of the refused frame was sent");

    // Receive side: a raw stream whose header names group 9, then a length prefix over max.
    let (mut raw_send, _raw_recv) = within("raw open", p12.connection.open_bi()).await.unwrap();
    let mut bytes = vec![1, 0, 0, 0, 9]; // a 1-byte frame: postcard of StreamHeader { group: 9 }
    bytes.extend_from_slice(&(5 * max as u32).to_le_bytes());
    bytes.extend_from_slice(&[0u8; 64]);
    raw_send.write_all(&bytes).await.unwrap();
    let mut r9 = within("accept group 9", p21.accept_group()).await.unwrap();
    assert_eq!(r9.group, 9);
    let e = within("recv oversize", r9.recv_frame::<Msg>())
        .await
        .unwrap_err();
    assert!(
        matches!(e, LinkError::FrameTooLarge { len, max: m } if len == 5 * max as u64 && m == max),
        "{e:?}"
    );
    let stopped = within("stop seen", raw_send.stopped()).await.unwrap();
    assert_eq!(stopped, Some(quinn::VarInt::from_u32(STOP_FRAME_TOO_LARGE)));
    assert!(
        r9.recv_frame::<Msg>().await.is_err(),
        "the stream yields no more"
    );

    // The connection is fine: the control stream and new groups work.
    assert!(p12.connection.close_reason().is_none());
    exchange(&p12, &p21, 10).await;
    exchange(&p21, &p12, 11).await;
    assert!(matches!(
        p12.open_group(CONTROL_GROUP).await,
        Err(LinkError::Protocol(_))
    ));
}
