//! `fabric::client` against a real node: admin and HTTP helpers, pipelined requests, pushes,
//! acks, reconnect with resume, and binary frames.

use fabric::client::{append_http, read_http, Admin, Client, ClientConfig, ClientError, Incoming};
use fabric::config::Config;
use fabric::node::RunningNode;
use fabric_proto::ErrorCode;
use serde_json::json;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Every await on the node is bounded by this.
const WAIT: Duration = Duration::from_secs(10);
/// A push we expect not to come is waited for this long.
const QUIET: Duration = Duration::from_millis(300);

async fn w<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f)
        .await
        .expect("finished within WAIT")
}

struct Node {
    node: RunningNode,
    admin: Admin,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn start() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().to_path_buf(),
            listen: "127.0.0.1:0".parse().unwrap(),
            shards: 2,
            partitions: 16,
            admin_token: Some("admin-secret".into()),
            ..Config::default()
        };
        let node = fabric::node::start(config).await.expect("node starts");
        let admin = Admin::new(&format!("http://{}", node.addr()), "admin-secret");
        Node {
            node,
            admin,
            _dir: dir,
        }
    }

    fn base(&self) -> String {
        format!("http://{}", self.node.addr())
    }

    fn cfg(&self, mesh: &str, peer: &str, token: &str) -> ClientConfig {
        ClientConfig::new(
            &format!("ws://{}/v1/ws", self.node.addr()),
            mesh,
            peer,
            token,
        )
    }

    /// A mesh with the given peers (none in a group); returns their tokens.
    async fn mesh(&self, mesh: &str, peers: &[&str]) -> Vec<String> {
        w(self.admin.create_mesh(mesh)).await.unwrap();
        let mut tokens = Vec::new();
        for p in peers {
            tokens.push(w(self.admin.add_peer(mesh, p, &[])).await.unwrap());
        }
        tokens
    }

    async fn shutdown(self) {
        w(self.node.shutdown()).await;
    }
}

async fn next(c: &Client) -> Incoming {
    w(c.next_delivery()).await.expect("a push")
}

/// Asserts nothing is pushed for a while (the connection stays up).
async fn quiet(c: &Client) {
    if let Ok(got) = tokio::time::timeout(QUIET, c.next_delivery()).await {
        panic!("expected no push, got {got:?}");
    }
}

fn pos(i: &Incoming) -> u64 {
    match i {
        Incoming::Deliver { pos, .. } => *pos,
        other => panic!("expected deliver, got {other:?}"),
    }
}

fn seq(i: &Incoming) -> u64 {
    match i {
        Incoming::Event { seq, .. } => *seq,
        other => panic!("expected event, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_and_http_helpers_work_and_map_errors_to_codes() {
    // Proves create_mesh/add_peer/append_http/read_http round-trip, keys dedupe over HTTP, and
    // HTTP errors arrive as ClientError::Server with the node's stable code.
    let n = Node::start().await;
    let t = n.mesh("m", &["a"]).await;
    let err = w(n.admin.create_mesh("m")).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Conflict), "{err}");
    let err = w(Admin::new(&n.base(), "wrong").create_mesh("x"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unauthorized), "{err}");
    assert!(matches!(
        w(n.admin.create_mesh("bad id")).await,
        Err(ClientError::Invalid {
            code: ErrorCode::BadRequest,
            ..
        })
    ));

    let base = n.base();
    let s1 = w(append_http(&base, &t[0], "m", "c", &json!({"n": 1}), None))
        .await
        .unwrap();
    let s2 = w(append_http(
        &base,
        &t[0],
        "m",
        "c",
        &json!("two"),
        Some("k"),
    ))
    .await
    .unwrap();
    let again = w(append_http(
        &base,
        &t[0],
        "m",
        "c",
        &json!("two"),
        Some("k"),
    ))
    .await
    .unwrap();
    assert_eq!(
        (s1, s2, again),
        (1, 2, 2),
        "a retried key returns the original seq"
    );
    let (events, head) = w(read_http(&base, &t[0], "m", "c", 1, 10)).await.unwrap();
    assert_eq!(head, 2);
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(events[0].body.as_str(), r#"{"n":1}"#);
    assert_eq!(&*events[1].from, "a");
    assert_eq!(&*events[1].conv, "c");
    let (tail, _) = w(read_http(&base, &t[0], "m", "c", 2, 10)).await.unwrap();
    assert_eq!(tail.len(), 1);
    let err = w(read_http(&base, "nope", "m", "c", 1, 10))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unauthorized), "{err}");
    n.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_appends_and_sends_are_all_acked_with_dense_positions() {
    // Proves many concurrent requests on one Client are each answered (out-of-order acks are
    // matched by ref) and yield dense seqs/positions, and that the window bounds nothing away.
    let n = Node::start().await;
    let t = n.mesh("m", &["a", "b"]).await;
    let mut cfg = n.cfg("m", "a", &t[0]);
    cfg.window = 64; // fewer slots than requests: callers must queue for them
    let a = Arc::new(w(Client::connect(cfg)).await.unwrap());
    assert_eq!((a.acked(), a.head()), (0, 0));
    assert!(a.session() > 0);

    let appends = (0..600).map(|i| {
        let a = a.clone();
        let conv = if i % 2 == 0 { "even" } else { "odd" };
        async move { a.append(conv, &json!({ "i": i }), None).await }
    });
    let mut seqs: Vec<u64> = w(futures_util::future::try_join_all(appends))
        .await
        .unwrap();
    seqs.sort_unstable();
    let mut expected: Vec<u64> = (1..=300).chain(1..=300).collect();
    expected.sort_unstable();
    assert_eq!(seqs, expected, "each conversation got 1..=300 exactly once");

    let sends = (0..200).map(|i| {
        let a = a.clone();
        async move { a.send("b", &json!(i)).await }
    });
    let mut positions: Vec<u64> = w(futures_util::future::try_join_all(sends)).await.unwrap();
    positions.sort_unstable();
    assert_eq!(positions, (1..=200).collect::<Vec<_>>());
    assert!(w(a.ping()).await.unwrap() < WAIT);
    n.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_replays_then_tails_and_unsubscribe_stops_events() {
    // Proves subscribe(from) replays durable entries from `from`, then pushes live ones in
    // order, and no event is handed out after unsubscribe.
    let n = Node::start().await;
    let t = n.mesh("m", &["a", "b"]).await;
    let a = w(Client::connect(n.cfg("m", "a", &t[0]))).await.unwrap();
    let b = w(Client::connect(n.cfg("m", "b", &t[1]))).await.unwrap();
    for i in 1..=3 {
        w(a.append("chat", &json!({ "n": i }), None)).await.unwrap();
    }
    w(b.subscribe("chat", 2)).await.unwrap();
    assert_eq!(seq(&next(&b).await), 2);
    assert_eq!(seq(&next(&b).await), 3);
    w(a.append("chat", &json!({"n": 4}), Some("k4")))
        .await
        .unwrap();
    match next(&b).await {
        Incoming::Event {
            conv,
            seq,
            from,
            body,
            ts,
        } => {
            assert_eq!((&*conv, seq, &*from), ("chat", 4, "a"));
            assert_eq!(body.as_str(), r#"{"n":4}"#);
            assert!(ts > 0);
        }
        other => panic!("{other:?}"),
    }
    w(b.unsubscribe("chat")).await.unwrap();
    w(a.append("chat", &json!({"n": 5}), None)).await.unwrap();
    quiet(&b).await;
    let err = w(b.subscribe("bad conv", 1)).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadRequest));
    n.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_arrive_in_order_and_acks_move_the_durable_cursor() {
    // Proves sends reach the recipient as Deliver pushes with their pos, and ack(upto) moves
    // the cursor a later session is welcomed with (and redelivered from).
    let n = Node::start().await;
    let t = n.mesh("m", &["a", "b"]).await;
    let a = w(Client::connect(n.cfg("m", "a", &t[0]))).await.unwrap();
    let b = w(Client::connect(n.cfg("m", "b", &t[1]))).await.unwrap();
    for i in 1..=3 {
        assert_eq!(w(a.send("b", &json!({ "m": i }))).await.unwrap(), i);
    }
    let d = next(&b).await;
    match &d {
        Incoming::Deliver {
            pos, from, to, ts, ..
        } => {
            assert_eq!((*pos, &**from, to.to_wire()), (1, "a", "b".to_string()));
            assert!(*ts > 0);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(d.body_json::<serde_json::Value>().unwrap(), json!({"m": 1}));
    assert_eq!(pos(&next(&b).await), 2);
    assert_eq!(pos(&next(&b).await), 3);
    w(b.ack(2)).await.unwrap();
    b.close().await;

    // The ack is fire-and-forget: poll (bounded) until a new session sees the cursor.
    let mut acked = 0;
    for _ in 0..100 {
        let probe = w(Client::connect(n.cfg("m", "b", &t[1]))).await.unwrap();
        acked = probe.acked();
        if acked == 2 {
            assert_eq!(probe.head(), 3);
            assert_eq!(
                pos(&next(&probe).await),
                3,
                "only the unacked message is redelivered"
            );
            break;
        }
        probe.close().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(acked, 2);
    n.shutdown().await;
}

// Over 70 lines: one end-to-end scenario whose steps depend on each other, read top to bottom.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_resumes_without_duplicates_and_events_continue_from_the_last_seq() {
    // Proves that after a dropped connection, reconnect() hands out no pos already handed out
    // (acked or not), resumes each subscription at last seq + 1 (events appended while
    // disconnected arrive once), and fails in-flight requests with Disconnected.
    let n = Node::start().await;
    let t = n.mesh("m", &["a", "b"]).await;
    let a = w(Client::connect(n.cfg("m", "a", &t[0]))).await.unwrap();
    let b = w(Client::connect(n.cfg("m", "b", &t[1]))).await.unwrap();
    w(b.subscribe("chat", 1)).await.unwrap();
    for i in 1..=3 {
        w(a.send("b", &json!(i))).await.unwrap();
    }
    for i in 1..=2 {
        w(a.append("chat", &json!(i), None)).await.unwrap();
    }
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(next(&b).await);
    }
    let mut poss: Vec<u64> = got
        .iter()
        .filter(|i| matches!(i, Incoming::Deliver { .. }))
        .map(pos)
        .collect();
    let mut seqs: Vec<u64> = got
        .iter()
        .filter(|i| matches!(i, Incoming::Event { .. }))
        .map(seq)
        .collect();
    poss.sort_unstable();
    seqs.sort_unstable();
    assert_eq!((poss, seqs), (vec![1, 2, 3], vec![1, 2]));
    w(b.ack(2)).await.unwrap(); // pos 3 was handed out but is not acked

    b.disconnect();
    assert!(!b.is_connected());
    assert!(
        w(b.next_delivery()).await.is_none(),
        "None once the connection is gone"
    );
    assert!(matches!(
        w(b.append("x", &json!(0), None)).await,
        Err(ClientError::Disconnected)
    ));
    // Written while b is away.
    w(a.append("chat", &json!(3), None)).await.unwrap();
    w(a.send("b", &json!(4))).await.unwrap();

    let welcome = w(b.reconnect()).await.unwrap();
    assert!(b.is_connected());
    assert!(welcome.acked <= 2);
    let mut got = [next(&b).await, next(&b).await];
    got.sort_by_key(|i| matches!(i, Incoming::Event { .. }));
    assert_eq!(
        pos(&got[0]),
        4,
        "pos 3 (handed out, unacked) is not handed out again"
    );
    assert_eq!(seq(&got[1]), 3, "the subscription resumed after seq 2");
    quiet(&b).await;

    // A fresh Client is a new reader: it gets again what was never acked (at-least-once),
    // from the cursor that reconnect() re-acked in case the first ack(2) died with the old
    // connection. Acks are fire-and-forget, so poll (bounded) until one is applied.
    let mut first = None;
    for _ in 0..100 {
        let fresh = w(Client::connect(n.cfg("m", "b", &t[1]))).await.unwrap();
        if fresh.acked() == 2 {
            first = Some(pos(&next(&fresh).await));
            break;
        }
        fresh.close().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        first,
        Some(3),
        "redelivery starts right after the re-acked cursor"
    );
    n.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_side_disconnect_fails_in_flight_requests_and_keyed_retries_are_exact() {
    // Proves that when the node drops the session (a shard restart), every in-flight request
    // resolves (ok or Disconnected, none hangs), next_delivery returns None, and retrying the
    // failed keyed appends after reconnect leaves each conversation dense with no duplicates.
    let n = Node::start().await;
    let t = n.mesh("m", &["a"]).await;
    let a = Arc::new(w(Client::connect(n.cfg("m", "a", &t[0]))).await.unwrap());
    w(a.subscribe("watch", 1)).await.unwrap();
    let appends: Vec<_> = (0..400)
        .map(|i| {
            let a = a.clone();
            tokio::spawn(async move {
                let key = format!("k{i}");
                (key.clone(), a.append("c", &json!(i), Some(&key)).await)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(5)).await;
    n.node.crash_shard(0);
    n.node.crash_shard(1);
    let mut failed = Vec::new();
    let mut seqs = Vec::new();
    for h in appends {
        let (key, r) = w(h).await.unwrap();
        match r {
            Ok(s) => seqs.push(s),
            Err(ClientError::Disconnected) => failed.push(key),
            // The restarting shard may refuse what it took in but could not write.
            Err(ClientError::Server {
                code: ErrorCode::Unavailable,
                ..
            }) => failed.push(key),
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    // The session was closed by the node: the push stream ends.
    assert!(w(a.next_delivery()).await.is_none());
    assert!(!a.is_connected());

    let mut reconnected = false;
    for _ in 0..100 {
        if w(a.reconnect()).await.is_ok() {
            reconnected = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        reconnected,
        "the node took the client back after its shards restarted"
    );
    for key in &failed {
        let i: u64 = key[1..].parse().unwrap();
        seqs.push(w(a.append("c", &json!(i), Some(key))).await.unwrap());
    }
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (1..=400).collect::<Vec<_>>(),
        "{} retried",
        failed.len()
    );
    w(a.append("watch", &json!("after"), None)).await.unwrap();
    assert_eq!(
        seq(&next(&a).await),
        1,
        "the subscription survived the reconnect"
    );
    n.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_frames_work_for_every_request_and_push() {
    // Proves a binary (postcard) client sends, appends, subscribes, receives events and
    // deliveries, pings and acks exactly like a JSON one, and talks to JSON clients.
    let n = Node::start().await;
    let t = n.mesh("m", &["a", "b"]).await;
    let mut cfg = n.cfg("m", "a", &t[0]);
    cfg.binary = true;
    let a = Arc::new(w(Client::connect(cfg)).await.unwrap());
    let b = w(Client::connect(n.cfg("m", "b", &t[1]))).await.unwrap();
    w(a.subscribe("chat", 1)).await.unwrap();
    let appends = (0..100).map(|i| {
        let a = a.clone();
        async move { a.append("chat", &json!({ "i": i, "s": "é\"" }), None).await }
    });
    let mut seqs = w(futures_util::future::try_join_all(appends))
        .await
        .unwrap();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=100).collect::<Vec<_>>());
    let mut events = Vec::new();
    for _ in 0..100 {
        events.push(next(&a).await);
    }
    assert_eq!(
        events.iter().map(seq).collect::<Vec<_>>(),
        (1..=100).collect::<Vec<_>>()
    );
    let v: serde_json::Value = events[0].body_json().unwrap();
    assert_eq!(v["s"], "é\"");
    w(b.send("a", &json!("to a"))).await.unwrap();
    let d = next(&a).await;
    assert_eq!((pos(&d), d.body().as_str()), (1, "\"to a\""));
    w(a.ack(1)).await.unwrap();
    w(a.send("b", &json!([1, 2]))).await.unwrap();
    assert_eq!(next(&b).await.body().as_str(), "[1,2]");
    w(a.ping()).await.unwrap();
    let err = w(a.send("nobody", &json!(1))).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err}");
    n.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_fail_alone_and_the_session_keeps_serving() {
    // Proves a wrong token fails connect with unauthorized, invalid or oversized requests are
    // refused locally (never poisoning a batched frame), server refusals map to their code, and
    // the session keeps serving afterwards.
    let n = Node::start().await;
    let t = n.mesh("m", &["a"]).await;
    let err = w(Client::connect(n.cfg("m", "a", "wrong")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unauthorized), "{err}");
    let err = w(Client::connect(n.cfg("nomesh", "a", &t[0])))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unauthorized), "{err}");

    let a = Arc::new(w(Client::connect(n.cfg("m", "a", &t[0]))).await.unwrap());
    let big = json!("x".repeat(2 * 1024 * 1024));
    let (one, fine) = (json!(1), json!("fine"));
    let (bad_conv, too_big, bad_key, unknown, good) = w(async {
        tokio::join!(
            a.append("no spaces", &one, None),
            a.append("c", &big, None),
            a.append("c", &one, Some("")),
            a.send("ghost", &one),
            a.append("c", &fine, None),
        )
    })
    .await;
    assert_eq!(bad_conv.unwrap_err().code(), Some(ErrorCode::BadRequest));
    assert!(matches!(
        too_big,
        Err(ClientError::Invalid {
            code: ErrorCode::TooLarge,
            ..
        })
    ));
    assert_eq!(bad_key.unwrap_err().code(), Some(ErrorCode::BadRequest));
    assert!(matches!(
        unknown,
        Err(ClientError::Server {
            code: ErrorCode::NotFound,
            ..
        })
    ));
    assert_eq!(good.unwrap(), 1);
    assert_eq!(w(a.append("c", &json!("still"), None)).await.unwrap(), 2);
    n.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_send_retried_on_json_and_binary_sessions_is_delivered_once() {
    // Proves `send_keyed` is exactly-once across retries: the same key from the same peer,
    // on a JSON and then a binary session, answers the original pos, and the recipient's
    // inbox holds the message once; another sender's equal key is its own message.
    let n = Node::start().await;
    let t = n.mesh("m", &["a", "b", "c"]).await;
    let a = w(Client::connect(n.cfg("m", "a", &t[0]))).await.unwrap();
    let first = w(a.send_keyed("b", &json!("once"), "msg-1")).await.unwrap();
    let mut cfg = n.cfg("m", "a", &t[0]);
    cfg.binary = true;
    let a2 = w(Client::connect(cfg)).await.unwrap();
    let again = w(a2.send_keyed("b", &json!("once, retried"), "msg-1"))
        .await
        .unwrap();
    assert_eq!(again, first, "a retry answers the original pos");
    let c = w(Client::connect(n.cfg("m", "c", &t[2]))).await.unwrap();
    let other = w(c.send_keyed("b", &json!("from c"), "msg-1"))
        .await
        .unwrap();
    assert_ne!(other, first, "keys are scoped to the sender");
    let err = w(a.send_keyed("b", &json!(1), "")).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadRequest), "{err}");
    let b = w(Client::connect(n.cfg("m", "b", &t[1]))).await.unwrap();
    let got: Vec<u64> = vec![pos(&next(&b).await), pos(&next(&b).await)];
    assert_eq!(got, vec![first, other]);
    quiet(&b).await;
    n.shutdown().await;
}
