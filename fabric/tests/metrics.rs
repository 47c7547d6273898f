//! `GET /metrics` against a real node: known traffic moves counters and histogram counts by
//! exactly the expected amounts; health endpoints; the separate metrics port; metrics off.

mod common;
use common::*;
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;

/// Parsed exposition: series (`name` and sorted labels) to value.
struct Scrape(HashMap<(String, Vec<(String, String)>), f64>);

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut out = HashMap::new();
        for line in text.lines() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("series and value");
            let value: f64 = value.parse().expect("a number");
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => {
                    let inner = rest.strip_suffix('}').expect("closing brace");
                    let mut labels: Vec<(String, String)> = inner
                        .split("\",")
                        .filter(|p| !p.is_empty())
                        .map(|p| {
                            let (k, v) = p.split_once("=\"").expect("label k=\"v\"");
                            (k.to_string(), v.trim_end_matches('"').to_string())
                        })
                        .collect();
                    labels.sort();
                    (n.to_string(), labels)
                }
                None => (series.to_string(), Vec::new()),
            };
            assert!(
                out.insert((name, labels), value).is_none(),
                "duplicate series in {line}"
            );
        }
        Scrape(out)
    }

    /// The sum over every series of `name` whose labels include `want`.
    fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|((n, labels), _)| {
                n == name
                    && want
                        .iter()
                        .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, v)| *v)
            .sum()
    }

    fn has(&self, name: &str) -> bool {
        self.0.keys().any(|(n, _)| n == name)
    }
}

async fn scrape(base: &str) -> Scrape {
    let r = http().get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    Scrape::parse(&r.text().await.unwrap())
}

/// Scrapes until `done` holds (counters are exported once per loop iteration, just after the
/// replies leave), at most WAIT.
async fn scrape_until(base: &str, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let s = scrape(base).await;
        if done(&s) || std::time::Instant::now() > deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// Over 70 lines: one end-to-end scenario whose steps depend on each other, read top to bottom.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_traffic_moves_every_counter_by_exactly_its_amount() {
    // Proves N appends, M sends, bad requests, HTTP calls and a failed hello move the ack,
    // error, frame, session, latency-histogram and backlog series by exactly what they were;
    // a node outside a cluster exports no Raft or node-link series.
    let dir = tempfile::tempdir().unwrap();
    let config = fabric::config::Config {
        metrics_meshes: vec!["m".into()],
        ..config(dir.path())
    };
    let node = fabric::node::start(config).await.unwrap();
    let base = base(&node);
    create_mesh(&base, "m").await;
    let ta = add_peer(&base, "m", "a", &[]).await;
    add_peer(&base, "m", "b", &[]).await;
    let before = scrape(&base).await;
    let clustered = before
        .0
        .keys()
        .find(|(n, _)| n.starts_with("fabric_raft_") || n.starts_with("fabric_node_link_"));
    assert_eq!(clustered, None, "a single node exports no cluster series");

    const N: u64 = 20;
    const M: u64 = 7;
    let (mut a, _) = Peer::hello(node.addr(), "m", "a", &ta).await;
    for i in 0..N {
        a.send(json!({"op":"append","ref":i + 1,"conv":"c","body":{"i":i}}))
            .await;
    }
    for i in 0..M {
        a.send(json!({"op":"send","ref":100 + i,"to":"b","body":{"i":i}}))
            .await;
    }
    let oks = a.collect((N + M) as usize, |v| v["op"] == "ok").await;
    assert_eq!(oks.len() as u64, N + M);
    // A shard-answered error (counted in flight, so it is timed) and an edge-answered one.
    a.send(json!({"op":"send","ref":999,"to":"nobody","body":1}))
        .await;
    assert_eq!(a.recv().await["code"], "not_found");
    a.send_text("{\"op\":\"nonsense\"}").await;
    assert_eq!(a.recv().await["code"], "bad_request");
    // Over HTTP: one append that succeeds, one with a wrong token.
    let url = format!("{base}/v1/meshes/m/conversations/c/messages");
    let r = http()
        .post(&url)
        .bearer_auth(&ta)
        .json(&json!({"body":{"http":true}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = http()
        .post(&url)
        .bearer_auth("wrong")
        .json(&json!({"body":1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // A hello with a wrong token.
    let mut bad = Peer::connect(node.addr()).await;
    bad.send(json!({"op":"hello","mesh":"m","peer":"b","token":"wrong"}))
        .await;
    assert_eq!(bad.recv().await["code"], "unauthorized");
    assert!(bad.try_recv().await.is_none(), "the session is closed");

    let after = scrape_until(&base, |s| {
        s.sum("fabric_sessions_open", &[]) == 1.0
            && s.sum("fabric_inbox_backlog_messages", &[]) == M as f64
            && s.sum("fabric_hello_failures_total", &[])
                > before.sum("fabric_hello_failures_total", &[])
    })
    .await;
    let d =
        |name: &str, labels: &[(&str, &str)]| after.sum(name, labels) - before.sum(name, labels);
    assert_eq!(d("fabric_appends_acked_total", &[]), (N + 1) as f64);
    assert_eq!(d("fabric_sends_acked_total", &[]), M as f64);
    let ws = ("transport", "ws");
    let http_t = ("transport", "http");
    assert_eq!(
        d("fabric_errors_sent_total", &[ws, ("code", "not_found")]),
        1.0
    );
    assert_eq!(
        d("fabric_errors_sent_total", &[ws, ("code", "bad_request")]),
        1.0
    );
    assert_eq!(
        d("fabric_errors_sent_total", &[ws, ("code", "unauthorized")]),
        1.0
    );
    assert_eq!(d("fabric_errors_sent_total", &[ws]), 3.0);
    assert_eq!(
        d(
            "fabric_errors_sent_total",
            &[http_t, ("code", "unauthorized")]
        ),
        1.0
    );
    assert_eq!(d("fabric_errors_sent_total", &[http_t]), 1.0);
    assert_eq!(
        d("fabric_hello_failures_total", &[("reason", "unauthorized")]),
        1.0
    );
    assert_eq!(d("fabric_hello_failures_total", &[]), 1.0);
    assert_eq!(d("fabric_sessions_opened_total", &[ws]), 2.0);
    // a: hello, N appends, M sends, the bad send, the nonsense frame; bad: its hello.
    assert_eq!(d("fabric_frames_in_total", &[ws]), (N + M + 4) as f64);
    // a: welcome, N + M oks, two errors; bad: its error.
    assert_eq!(d("fabric_frames_out_total", &[ws]), (N + M + 4) as f64);
    assert!(d("fabric_frame_in_bytes_total", &[ws]) > 0.0);
    // Timed answers: N + M oks and the shard's not_found (the edge's own error is not a
    // request); over HTTP both appends.
    assert_eq!(
        d("fabric_ack_latency_seconds_count", &[ws]),
        (N + M + 1) as f64
    );
    assert_eq!(d("fabric_ack_latency_seconds_count", &[http_t]), 2.0);
    assert!(d("fabric_ack_latency_seconds_sum", &[ws]) > 0.0);
    let inf = after.sum("fabric_ack_latency_seconds_bucket", &[ws, ("le", "+Inf")]);
    assert_eq!(inf, after.sum("fabric_ack_latency_seconds_count", &[ws]));
    // b never connected: its M messages wait; a has nothing addressed to it.
    assert_eq!(after.sum("fabric_inbox_backlog_messages", &[]), M as f64);
    assert_eq!(
        after.sum("fabric_mesh_inbox_backlog_messages", &[("mesh", "m")]),
        M as f64
    );
    assert_eq!(
        after.sum("fabric_mesh_inbox_backlog_max_messages", &[("mesh", "m")]),
        M as f64
    );
    assert_eq!(
        after.sum("fabric_mesh_inbox_position", &[("mesh", "m")]),
        M as f64
    );
    assert_eq!(after.sum("fabric_mesh_peers", &[("mesh", "m")]), 2.0);
    assert_eq!(d("fabric_inbox_deliveries_total", &[]), 0.0);
    // WAL: every record acknowledged above went through a group commit.
    let commits = d("fabric_wal_fsync_seconds_count", &[]);
    assert!(commits >= 1.0);
    assert_eq!(d("fabric_wal_commit_records_count", &[]), commits);
    assert!(d("fabric_wal_records_total", &[]) >= (N + 1 + M) as f64);
    assert_eq!(
        d("fabric_wal_records_total", &[]),
        d("fabric_wal_commit_records_sum", &[])
    );
    assert_eq!(
        d("fabric_wal_written_bytes_total", &[]),
        d("fabric_wal_commit_bytes_sum", &[])
    );
    assert_eq!(after.sum("fabric_ready", &[]), 1.0);
    assert_eq!(after.sum("fabric_shard_ready", &[]), 2.0);
    assert_eq!(after.sum("fabric_build_info", &[]), 1.0);
    assert!(after.has("fabric_process_resident_memory_bytes"));
    assert!(after.sum("fabric_process_open_fds", &[]) > 0.0);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_redeliveries_and_backlog_follow_the_recipient() {
    // Proves deliveries count each push, a reconnect before the ack counts redeliveries, and
    // the backlog gauge falls to zero once the recipient acknowledges.
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path()).await;
    let base = base(&node);
    create_mesh(&base, "m").await;
    let ta = add_peer(&base, "m", "a", &[]).await;
    let tb = add_peer(&base, "m", "b", &[]).await;
    let before = scrape(&base).await;
    let (mut a, _) = Peer::hello(node.addr(), "m", "a", &ta).await;
    for i in 0..5u64 {
        a.send(json!({"op":"send","ref":i + 1,"to":"b","body":i}))
            .await;
    }
    a.collect(5, |v| v["op"] == "ok").await;
    let (mut b, _) = Peer::hello(node.addr(), "m", "b", &tb).await;
    b.collect(5, |v| v["op"] == "deliver").await;
    drop(b);
    // Reconnect without acknowledging: the same 5 again.
    let (mut b, _) = Peer::hello(node.addr(), "m", "b", &tb).await;
    b.collect(5, |v| v["op"] == "deliver").await;
    let mid = scrape_until(&base, |s| {
        s.sum("fabric_inbox_redeliveries_total", &[])
            - before.sum("fabric_inbox_redeliveries_total", &[])
            >= 5.0
            // Backlog gauges are refreshed at most every REFRESH_INTERVAL_MS.
            && s.sum("fabric_inbox_backlog_messages", &[]) == 5.0
    })
    .await;
    let d = |s: &Scrape, name: &str| s.sum(name, &[]) - before.sum(name, &[]);
    assert_eq!(d(&mid, "fabric_inbox_deliveries_total"), 10.0);
    assert_eq!(d(&mid, "fabric_inbox_redeliveries_total"), 5.0);
    assert_eq!(mid.sum("fabric_inbox_backlog_messages", &[]), 5.0);
    assert_eq!(mid.sum("fabric_inbox_backlog_max_messages", &[]), 5.0);
    b.send(json!({"op":"ack","upto":5})).await;
    let end = scrape_until(&base, |s| {
        s.sum("fabric_inbox_backlog_messages", &[]) == 0.0
    })
    .await;
    assert_eq!(end.sum("fabric_inbox_backlog_messages", &[]), 0.0);
    assert_eq!(end.sum("fabric_inbox_backlog_max_messages", &[]), 0.0);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_a_crashed_shard_and_the_metrics_port_serves_it() {
    // Proves /readyz and fabric_ready turn false while a shard restarts and true after, that
    // restarts are counted, and that metrics_listen serves /metrics, /healthz and /readyz only.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = fabric::config::Config {
        metrics_listen: Some(format!("127.0.0.1:{port}").parse().unwrap()),
        ..config(dir.path())
    };
    let node = fabric::node::start(config).await.unwrap();
    let ops = format!("http://{}", node.metrics_addr().expect("metrics address"));
    let r = http().get(format!("{ops}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    wait_ready(&ops).await;
    let body: serde_json::Value = http()
        .get(format!("{ops}/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["ready"], true);
    assert_eq!(body["shards"].as_array().unwrap().len(), 2);
    let r = http().get(format!("{ops}/v1/meshes")).send().await.unwrap();
    assert_eq!(r.status(), 404, "the metrics port serves no API");
    assert_eq!(scrape(&ops).await.sum("fabric_ready", &[]), 1.0);

    // Watch the readiness of the ops port while shard 1 crashes and recovers.
    node.crash_shard(1);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let r = http().get(format!("{ops}/readyz")).send().await.unwrap();
        let status = r.status();
        let body: serde_json::Value = r.json().await.unwrap();
        if status == 503 {
            assert_eq!(body["ready"], false);
            // While it is down, the body names it.
            assert!(body["reason"].as_str().unwrap().contains("[1]"), "{body}");
            assert_eq!(body["shards"][1]["ready"], false, "{body}");
        }
        if body["shards"][1]["restarts"] == 1 && status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "shard 1 did not come back: {body}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let s = scrape(&ops).await;
    assert_eq!(s.sum("fabric_shard_restarts_total", &[("shard", "1")]), 1.0);
    assert_eq!(s.sum("fabric_shard_restarts_total", &[("shard", "0")]), 0.0);
    assert_eq!(s.sum("fabric_ready", &[]), 1.0);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_off_serves_no_metrics_and_still_serves_traffic() {
    // Proves metrics = false answers /metrics with 404 not_found while the node works normally.
    let dir = tempfile::tempdir().unwrap();
    let config = fabric::config::Config {
        metrics: false,
        ..config(dir.path())
    };
    let node = fabric::node::start(config).await.unwrap();
    let base = base(&node);
    let ta = mesh_with_peer(&base).await;
    let (mut a, _) = Peer::hello(node.addr(), "m", "a", &ta).await;
    a.send(json!({"op":"append","ref":1,"conv":"c","body":1}))
        .await;
    assert_eq!(a.recv().await, json!({"op":"ok","ref":1,"seq":1}));
    let r = http().get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["code"], "not_found");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_failures_are_counted_by_reason() {
    // Proves an op before hello counts as not_hello and a silent session as timeout, each once,
    // with their unauthorized error frames.
    let dir = tempfile::tempdir().unwrap();
    let config = fabric::config::Config {
        hello_timeout_ms: 200,
        ..config(dir.path())
    };
    let node = fabric::node::start(config).await.unwrap();
    let base = base(&node);
    let before = scrape(&base).await;
    let mut early = Peer::connect(node.addr()).await;
    early
        .send(json!({"op":"send","ref":1,"to":"b","body":1}))
        .await;
    assert_eq!(early.recv().await["code"], "unauthorized");
    assert!(early.try_recv().await.is_none(), "closed after a non-hello");
    let mut silent = Peer::connect(node.addr()).await;
    assert_eq!(
        silent.recv().await["code"],
        "unauthorized",
        "hello timed out"
    );
    assert!(silent.try_recv().await.is_none());
    let after = scrape_until(&base, |s| s.sum("fabric_sessions_open", &[]) == 0.0).await;
    let d = |labels: &[(&str, &str)]| {
        after.sum("fabric_hello_failures_total", labels)
            - before.sum("fabric_hello_failures_total", labels)
    };
    assert_eq!(d(&[("reason", "not_hello")]), 1.0);
    assert_eq!(d(&[("reason", "timeout")]), 1.0);
    assert_eq!(d(&[]), 2.0);
    assert_eq!(
        after.sum(
            "fabric_errors_sent_total",
            &[("transport", "ws"), ("code", "unauthorized")]
        ) - before.sum(
            "fabric_errors_sent_total",
            &[("transport", "ws"), ("code", "unauthorized")]
        ),
        2.0
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_metrics_port_the_client_port_keeps_metrics_and_details_to_itself() {
    // Proves that with metrics_listen set, the client port answers /metrics with 404 and
    // /readyz with ready and reason only (no per-shard errors, which name files), while the
    // metrics port serves both in full (per-mesh series included).
    let dir = tempfile::tempdir().unwrap();
    let config = fabric::config::Config {
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        metrics_meshes: vec!["secret-mesh".into()],
        ..config(dir.path())
    };
    let node = fabric::node::start(config).await.unwrap();
    let base = base(&node);
    let ops = format!("http://{}", node.metrics_addr().unwrap());
    wait_ready(&base).await;
    let r = http().get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["code"], "not_found");
    assert!(scrape(&ops).await.has("fabric_mesh_peers"));
    let text = metrics_text(&ops).await;
    assert!(text.contains("secret-mesh"));

    let brief = |b: &serde_json::Value| {
        let keys: Vec<&String> = b.as_object().unwrap().keys().collect();
        assert!(
            keys.iter().all(|k| *k == "ready" || *k == "reason"),
            "client port /readyz says more than ready and reason: {b}"
        );
    };
    let body: serde_json::Value = http()
        .get(format!("{base}/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body, json!({"ready": true}));
    // While a shard is down: 503 and the reason on the client port, details on the other.
    node.crash_shard(0);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let r = http().get(format!("{base}/readyz")).send().await.unwrap();
        let status = r.status();
        let body: serde_json::Value = r.json().await.unwrap();
        brief(&body);
        if status == 503 {
            assert!(body["reason"].as_str().unwrap().contains("[0]"), "{body}");
        }
        let full: serde_json::Value = http()
            .get(format!("{ops}/readyz"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(full["shards"].is_array(), "{full}");
        if full["shards"][0]["restarts"] == 1 && status == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no restart: {full}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    node.shutdown().await;
}
