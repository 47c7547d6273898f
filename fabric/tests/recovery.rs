//! Torn WAL tails and shard supervision, on a real node with real files.

mod common;
use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_is_cut_and_earlier_records_survive() {
    // Proves the node starts after the last bytes of the newest segment's final write are cut
    // or corrupted (what a power loss during that write leaves), keeps every record before the
    // damage, and keeps the cut bytes in quarantine/.
    let dir = tempfile::tempdir().unwrap();
    let cfg = one_shard_config(dir.path());
    for damage in ["cut", "corrupt"] {
        let _ = std::fs::remove_dir_all(dir.path());
        let node = fabric::node::start(cfg.clone()).await.unwrap();
        let base = base(&node);
        let t = mesh_with_peer(&base).await;
        let (mut a, _) = Peer::hello(node.addr(), "m", "a", &t).await;
        for i in 1..=20u64 {
            a.send(json!({"op":"append","ref":i,"conv":"c","body":{"i":i}}))
                .await;
            assert_eq!(a.recv().await["seq"], i);
        }
        drop(a);
        node.shutdown().await;
        let seg_dir = dir.path().join("shard-000");
        let mut segs: Vec<_> = std::fs::read_dir(&seg_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "wal"))
            .collect();
        segs.sort();
        let last = segs.last().unwrap();
        let mut bytes = std::fs::read(last).unwrap();
        let len = bytes.len();
        match damage {
            "cut" => bytes.truncate(len - 5),
            _ => bytes[len - 3] ^= 0xff,
        }
        std::fs::write(last, &bytes).unwrap();

        let node = fabric::node::start(cfg.clone())
            .await
            .expect("starts after a torn tail");
        let page = read_conv(&common::base(&node), &t, "m", "c", "from=1").await;
        let seqs: Vec<u64> = page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(
            seqs,
            (1..=19).collect::<Vec<_>>(),
            "{damage}: only the damaged last record is gone"
        );
        node.shutdown().await;
        let quarantined = std::fs::read_dir(seg_dir.join("quarantine"))
            .unwrap()
            .count();
        assert_eq!(quarantined, 1, "{damage}: the cut bytes are kept");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corruption_before_the_tail_refuses_to_start_and_names_the_file() {
    // Proves damage in a segment that is not the last is an error naming file and offset.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = one_shard_config(dir.path());
    cfg.wal_segment_bytes_max = 4096;
    let node = fabric::node::start(cfg.clone()).await.unwrap();
    let base = base(&node);
    let t = mesh_with_peer(&base).await;
    let (mut a, _) = Peer::hello(node.addr(), "m", "a", &t).await;
    for i in 1..=200u64 {
        a.send(json!({"op":"append","ref":i,"conv":"c","body":"a body of some length to fill segments, and then some more"})).await;
        assert_eq!(a.recv().await["seq"], i);
    }
    drop(a);
    node.shutdown().await;
    let seg_dir = dir.path().join("shard-000");
    let mut segs: Vec<_> = std::fs::read_dir(&seg_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segs.sort();
    assert!(segs.len() > 2);
    let mut bytes = std::fs::read(&segs[0]).unwrap();
    bytes[40] ^= 0x01;
    std::fs::write(&segs[0], &bytes).unwrap();
    // The shard actor fails to start, so the node does not come up.
    let result = fabric::node::start(cfg).await;
    let message = match result {
        Err(e) => e.to_string(),
        Ok(_) => panic!("started over a corrupt segment"),
    };
    let name = segs[0].file_name().unwrap().to_str().unwrap();
    assert!(message.contains(name), "error names the file: {message}");
    assert!(
        message.contains("byte"),
        "error names the offset: {message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_shard_is_restarted_and_recovers_from_its_wal() {
    // Proves supervision: after a shard incarnation fails, it comes back with its data, and
    // sessions attached to it are told to reconnect.
    let dir = tempfile::tempdir().unwrap();
    let cfg = one_shard_config(dir.path());
    let node = fabric::node::start(cfg).await.unwrap();
    let base = base(&node);
    let t = mesh_with_peer(&base).await;
    let (mut a, _) = Peer::hello(node.addr(), "m", "a", &t).await;
    for i in 1..=10u64 {
        a.send(json!({"op":"append","ref":i,"conv":"c","body":i}))
            .await;
        assert_eq!(a.recv().await["seq"], i);
    }
    node.crash_shard(0);
    let e = a.recv().await;
    assert_eq!(e["code"], "unavailable", "{e}");
    assert!(
        a.try_recv().await.is_none(),
        "session closed so the client resumes"
    );
    wait_ready(&base).await;
    let (mut a, _) = Peer::hello(node.addr(), "m", "a", &t).await;
    a.send(json!({"op":"append","ref":11,"conv":"c","body":11}))
        .await;
    assert_eq!(a.recv().await["seq"], 11, "recovered head");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_old_segment_files_and_a_restart_keeps_what_is_retained() {
    // Proves the glue deletes the segments retention retires, and a node restarted over the
    // remaining files keeps conversation heads and unacknowledged inbox messages.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = one_shard_config(dir.path());
    cfg.wal_segment_bytes_max = 8 * 1024;
    cfg.retention_bytes_max = 32 * 1024;
    let node = fabric::node::start(cfg.clone()).await.unwrap();
    let base = base(&node);
    let t = mesh_with_peer(&base).await;
    let t_off = add_peer(&base, "m", "offline", &[]).await;
    let (mut a, _) = Peer::hello(node.addr(), "m", "a", &t).await;
    a.send(json!({"op":"send","ref":0,"to":"offline","body":"kept until acked"}))
        .await;
    assert_eq!(a.recv().await["pos"], 1);
    for i in 1..=1000u64 {
        a.send(json!({"op":"append","ref":i,"conv":"c","body":"x".repeat(100)}))
            .await;
        assert_eq!(a.recv().await["seq"], i);
    }
    let seg_dir = dir.path().join("shard-000");
    let count = || std::fs::read_dir(&seg_dir).unwrap().count();
    let deadline = std::time::Instant::now() + WAIT;
    while count() > 8 {
        assert!(
            std::time::Instant::now() < deadline,
            "segments were not deleted: {}",
            count()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    drop(a);
    node.shutdown().await;
    let node = fabric::node::start(cfg).await.unwrap();
    let page = read_conv(&common::base(&node), &t, "m", "c", "from=1&limit=10000").await;
    assert_eq!(page["head"], 1000);
    let first = page["messages"][0]["seq"].as_u64().unwrap();
    assert!(first > 1, "old entries were retired");
    let msgs = page["messages"].as_array().unwrap();
    assert_eq!(msgs.last().unwrap()["seq"], 1000);
    assert_eq!(
        msgs.len() as u64,
        1000 - first + 1,
        "no gap in what is retained"
    );
    let (mut off, w) = Peer::hello(node.addr(), "m", "offline", &t_off).await;
    assert_eq!(w["acked"], 0);
    let d = off.recv().await;
    assert_eq!(
        (d["op"].as_str(), d["pos"].as_u64()),
        (Some("deliver"), Some(1))
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_older_than_the_log_cache_are_served_from_disk() {
    // Proves a node that keeps no durable entry in memory (log_cache_bytes_max 0) serves a
    // subscription from seq 1 and an HTTP read of everything from its segment files, in
    // order and whole, across segments, before and after a restart, and counts the reads.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = one_shard_config(dir.path());
    cfg.wal_segment_bytes_max = 16 * 1024;
    cfg.log_cache_bytes_max = 0;
    cfg.log_read_bytes_max = 4096;
    let node = fabric::node::start(cfg.clone()).await.unwrap();
    let base = base(&node);
    let t = mesh_with_peer(&base).await;
    let (mut a, _) = Peer::hello(node.addr(), "m", "a", &t).await;
    for i in 1..=400u64 {
        a.send(json!({"op":"append","ref":i,"conv":"c","body":format!("e{i}")}))
            .await;
        assert_eq!(a.recv().await["seq"], i);
    }
    a.send(json!({"op":"subscribe","ref":500,"conv":"c","from":1}))
        .await;
    let got = a
        .collect(401, |v| v["op"] == "event" || v["ref"] == 500)
        .await;
    let seqs: Vec<u64> = got.iter().filter_map(|v| v["seq"].as_u64()).collect();
    assert_eq!(seqs, (1..=400).collect::<Vec<_>>());
    assert!(got
        .iter()
        .all(|v| v["op"] != "event" || v["body"] == format!("e{}", v["seq"])));
    let m = metrics_text(&base).await;
    let reads = m
        .lines()
        .find(|l| l.starts_with("fabric_log_reads_total"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(reads >= 4.0, "disk reads counted: {reads}");
    drop(a);
    node.shutdown().await;
    let node = fabric::node::start(cfg).await.unwrap();
    let page = read_conv(&common::base(&node), &t, "m", "c", "from=1&limit=1000").await;
    let msgs = page["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 400);
    assert!(msgs
        .iter()
        .enumerate()
        .all(|(i, m)| m["seq"] == i as u64 + 1 && m["body"] == format!("e{}", i + 1)));
    node.shutdown().await;
}
