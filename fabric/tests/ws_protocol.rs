//! Every client op and every reachable error code over a real WebSocket and HTTP connection.

mod common;
use common::*;
use serde_json::json;

// Over 70 lines: one end-to-end scenario whose steps depend on each other, read top to bottom.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_op_works_end_to_end() {
    // Proves hello, send (direct, group, *), deliver, ack, append, subscribe, unsubscribe, ping
    // and batch frames behave as docs/PROTOCOL.md says.
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path()).await;
    let base = base(&node);
    create_mesh(&base, "m").await;
    let ta = add_peer(&base, "m", "a", &["ops"]).await;
    let tb = add_peer(&base, "m", "b", &["ops"]).await;
    let tc = add_peer(&base, "m", "c", &[]).await;
    let (mut a, wa) = Peer::hello(node.addr(), "m", "a", &ta).await;
    assert_eq!(
        (wa["acked"].clone(), wa["head"].clone()),
        (json!(0), json!(0))
    );
    let (mut b, _) = Peer::hello(node.addr(), "m", "b", &tb).await;
    let (mut c, _) = Peer::hello(node.addr(), "m", "c", &tc).await;

    a.send(json!({"op":"send","ref":1,"to":"b","body":{"text":"hi b"}}))
        .await;
    assert_eq!(a.recv().await, json!({"op":"ok","ref":1,"pos":1}));
    a.send(json!({"op":"send","ref":2,"to":"group:ops","body":"ops"}))
        .await;
    a.send(json!({"op":"send","ref":3,"to":"*","body":[1,2]}))
        .await;
    // a is in ops, so its own group message reaches it too; frames may interleave.
    let mut frames = [a.recv().await, a.recv().await, a.recv().await];
    frames.sort_by_key(|v| (v["op"].as_str().unwrap().to_string(), v["ref"].as_u64()));
    assert_eq!(frames[0]["op"], "deliver");
    assert_eq!(frames[0]["pos"], 2, "a is in ops; * skips the sender");
    assert_eq!(frames[1], json!({"op":"ok","ref":2,"pos":2}));
    assert_eq!(frames[2], json!({"op":"ok","ref":3,"pos":3}));

    let got = b.collect(3, |v| v["op"] == "deliver").await;
    assert_eq!(got[0]["body"], json!({"text":"hi b"}));
    assert_eq!(got[0]["from"], "a");
    assert_eq!(got[0]["to"], "b");
    assert!(got[0]["ts"].as_u64().unwrap() > 0);
    assert_eq!(
        got.iter()
            .map(|v| v["pos"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    let got = c.collect(1, |v| v["op"] == "deliver").await;
    assert_eq!(got[0]["pos"], 3, "c is not in ops, and gets only *");
    b.send(json!({"op":"ack","upto":3})).await;

    b.send(json!({"op":"subscribe","ref":10,"conv":"chat","from":1}))
        .await;
    assert_eq!(b.recv().await, json!({"op":"ok","ref":10}));
    a.send(json!({"op":"append","ref":4,"conv":"chat","body":{"n":1}}))
        .await;
    assert_eq!(a.recv().await, json!({"op":"ok","ref":4,"seq":1}));
    a.send(json!({"op":"append","ref":5,"conv":"chat","body":{"n":2},"key":"k"}))
        .await;
    assert_eq!(a.recv().await["seq"], 2);
    a.send(json!({"op":"append","ref":6,"conv":"chat","body":{"n":2},"key":"k"}))
        .await;
    assert_eq!(
        a.recv().await,
        json!({"op":"ok","ref":6,"seq":2}),
        "a retried key returns the original seq"
    );
    let ev = b.collect(2, |v| v["op"] == "event").await;
    assert_eq!(ev[0]["conv"], "chat");
    assert_eq!(ev[1]["seq"], 2);
    assert_eq!(ev[1]["from"], "a");
    assert_eq!(ev[1]["body"], json!({"n":2}));
    b.send(json!({"op":"unsubscribe","ref":11,"conv":"chat"}))
        .await;
    assert_eq!(b.recv().await, json!({"op":"ok","ref":11}));
    b.send(json!({"op":"ping","ref":12})).await;
    assert_eq!(
        b.recv().await,
        json!({"op":"pong","ref":12}),
        "no event after unsubscribe"
    );

    // A batch frame: several ops in one text frame.
    a.send_text(r#"[{"op":"append","ref":20,"conv":"chat","body":3},{"op":"ping","ref":21}]"#)
        .await;
    let mut frames = vec![a.recv().await, a.recv().await];
    frames.sort_by_key(|v| v["ref"].as_u64());
    assert_eq!(
        frames,
        vec![
            json!({"op":"ok","ref":20,"seq":3}),
            json!({"op":"pong","ref":21})
        ]
    );

    // b reconnects: acked up to 3, nothing redelivered.
    drop(b);
    let (_b2, w) = Peer::hello(node.addr(), "m", "b", &tb).await;
    assert_eq!(
        (w["acked"].clone(), w["head"].clone()),
        (json!(3), json!(3))
    );
    node.shutdown().await;
}

// Over 70 lines: one end-to-end scenario whose steps depend on each other, read top to bottom.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_stable_error_codes_and_the_node_keeps_serving() {
    // Proves each malformed or refused frame gets its documented code and other sessions, and
    // acknowledged data, are unaffected.
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path()).await;
    let base = base(&node);
    create_mesh(&base, "m").await;
    create_mesh(&base, "other").await;
    let ta = add_peer(&base, "m", "a", &[]).await;
    let (mut good, _) = Peer::hello(node.addr(), "m", "a", &ta).await;
    good.send(json!({"op":"append","ref":1,"conv":"c","body":"kept"}))
        .await;
    assert_eq!(good.recv().await["seq"], 1);

    // Wrong token, wrong mesh: unauthorized, then the server closes.
    for hello in [
        json!({"op":"hello","mesh":"m","peer":"a","token":"wrong"}),
        json!({"op":"hello","mesh":"other","peer":"a","token":ta}),
        json!({"op":"hello","mesh":"nope","peer":"a","token":ta}),
    ] {
        let mut p = Peer::connect(node.addr()).await;
        p.send(hello).await;
        let e = p.recv().await;
        assert_eq!(
            (e["op"].as_str(), e["code"].as_str()),
            (Some("error"), Some("unauthorized")),
            "{e}"
        );
        assert!(e["message"].as_str().unwrap().len() > 5);
        assert!(p.try_recv().await.is_none(), "closed after a failed hello");
    }
    // An op before hello.
    let mut p = Peer::connect(node.addr()).await;
    p.send(json!({"op":"send","ref":1,"to":"a","body":1})).await;
    assert_eq!(p.recv().await["code"], "unauthorized");

    let (mut s, _) = Peer::hello(node.addr(), "m", "a", &ta).await;
    // Malformed JSON, unknown op, missing field: bad_request, the session stays open.
    s.send_text("{not json").await;
    assert_eq!(s.recv().await["code"], "bad_request");
    s.send(json!({"op":"teleport","ref":2})).await;
    assert_eq!(s.recv().await["code"], "bad_request");
    s.send(json!({"op":"append","ref":3,"conv":"c"})).await;
    assert_eq!(s.recv().await["code"], "bad_request");
    // Send to a peer that does not exist: not_found, with the ref.
    s.send(json!({"op":"send","ref":4,"to":"ghost","body":1}))
        .await;
    let e = s.recv().await;
    assert_eq!(
        (e["code"].as_str(), e["ref"].as_u64()),
        (Some("not_found"), Some(4))
    );
    // Over the frame limit: too_large.
    let big = format!(
        r#"{{"op":"append","ref":5,"conv":"c","body":"{}"}}"#,
        "x".repeat(1024 * 1024 + 10)
    );
    s.send_text(&big).await;
    assert_eq!(s.recv().await["code"], "too_large");
    // A second hello: bad_request.
    s.send(json!({"op":"hello","mesh":"m","peer":"a","token":ta}))
        .await;
    assert_eq!(s.recv().await["code"], "bad_request");
    s.send(json!({"op":"ping","ref":6})).await;
    assert_eq!(
        s.recv().await["op"],
        "pong",
        "still serving after every error"
    );

    // HTTP: conflict, unauthorized, not_found, bad_request with matching statuses.
    let h = http();
    let r = h
        .post(format!("{base}/v1/meshes"))
        .bearer_auth("admin-secret")
        .json(&json!({"id":"m"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["code"],
        "conflict"
    );
    let r = h
        .post(format!("{base}/v1/meshes"))
        .bearer_auth("nope")
        .json(&json!({"id":"z"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = h
        .post(format!("{base}/v1/meshes/zz/peers"))
        .bearer_auth("admin-secret")
        .json(&json!({"id":"p"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = h
        .post(format!("{base}/v1/meshes"))
        .bearer_auth("admin-secret")
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = h
        .post(format!("{base}/v1/meshes/m/peers"))
        .bearer_auth(&ta)
        .json(&json!({"id":"x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        403,
        "a peer token is a credential, but not an admin one"
    );
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["code"],
        "forbidden"
    );
    let r = h.get(format!("{base}/v1/nothing")).send().await.unwrap();
    assert_eq!(r.status(), 404);

    good.send(json!({"op":"append","ref":2,"conv":"c","body":"also kept"}))
        .await;
    assert_eq!(good.recv().await["seq"], 2, "acknowledged data unaffected");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_append_and_replay() {
    // Proves the REST conversation API: 201 {seq} once durable, replay pages, empty past head,
    // `consistency` local or linearizable (any other value is 400).
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path()).await;
    let base = base(&node);
    create_mesh(&base, "m").await;
    let t = add_peer(&base, "m", "a", &[]).await;
    let h = http();
    let url = format!("{base}/v1/meshes/m/conversations/c1/messages");
    for i in 1..=5u64 {
        let r = h
            .post(&url)
            .bearer_auth(&t)
            .json(&json!({"body":{"i":i},"key":format!("k{i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        assert_eq!(
            r.json::<serde_json::Value>().await.unwrap(),
            json!({"seq": i})
        );
    }
    let r = h
        .post(&url)
        .bearer_auth(&t)
        .json(&json!({"body":{"i":3},"key":"k3"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap(),
        json!({"seq": 3}),
        "idempotent"
    );
    let page: serde_json::Value = h
        .get(format!("{url}?from=2&limit=2"))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let msgs = page["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0]["seq"], 2);
    assert_eq!(msgs[1]["body"], json!({"i":3}));
    assert_eq!(msgs[1]["from"], "a");
    assert_eq!(page["head"], 5);
    let page: serde_json::Value = h
        .get(format!("{url}?from=99"))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["messages"], json!([]));
    // A single node's local read is its only replica's: the same page.
    for consistency in ["local", "linearizable"] {
        let query = format!("from=2&limit=2&consistency={consistency}");
        let page = read_conv(&base, &t, "m", "c1", &query).await;
        assert_eq!(page["messages"][0]["seq"], 2, "{consistency}");
        assert_eq!(page["head"], 5, "{consistency}");
    }
    let r = h
        .get(format!("{url}?consistency=eventual"))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "an unknown consistency is bad_request");
    let r = h.get(&url).bearer_auth("bad").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = h.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = h.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    node.shutdown().await;
}
