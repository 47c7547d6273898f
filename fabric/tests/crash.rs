//! Kill -9 a real `fabric serve` process under pipelined load, restart it on the same data dir,
//! and check that nothing acknowledged was lost, duplicated or reordered.

mod common;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

fn spawn_node(dir: &std::path::Path, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_fabric"))
        .args(["serve", "--data-dir"])
        .arg(dir)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--shards", "2"])
        .env("FABRIC_ADMIN_TOKEN", "admin-secret")
        .env("FABRIC_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("fabric binary starts")
}

/// What the clients saw acknowledged before the kill.
#[derive(Default)]
struct Acked {
    /// conversation -> seq -> body
    appends: BTreeMap<String, BTreeMap<u64, Value>>,
    /// inbox positions acknowledged to senders, for recipient "sink"
    sends: BTreeSet<u64>,
}

const CLIENTS: usize = 8;
const WINDOW_REQUESTS_MAX: u64 = 32;
/// Each client stops after this many requests even if the kill has not come yet.
const REQUESTS_PER_CLIENT_MAX: u64 = 20_000;

async fn pipeline(addr: String, peer: String, token: String, acked: Arc<Mutex<Acked>>) {
    let Ok((mut ws, _)) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws")).await
    else {
        return;
    };
    let hello = json!({"op":"hello","mesh":"m","peer":peer,"token":token});
    if ws
        .send(Message::Text(hello.to_string().into()))
        .await
        .is_err()
    {
        return;
    }
    let conv = format!("conv-{peer}");
    let mut sent: BTreeMap<u64, Value> = BTreeMap::new();
    let mut next = 1u64;
    let mut welcomed = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        while welcomed
            && (sent.len() as u64) < WINDOW_REQUESTS_MAX
            && next <= REQUESTS_PER_CLIENT_MAX
        {
            // Odd refs append to the client's conversation, even refs send to the sink's inbox.
            let body = json!({"peer": peer, "n": next});
            let op = if next % 2 == 1 {
                json!({"op":"append","ref":next,"conv":conv,"body":body})
            } else {
                json!({"op":"send","ref":next,"to":"sink","body":body})
            };
            if ws.send(Message::Text(op.to_string().into())).await.is_err() {
                return;
            }
            sent.insert(next, body);
            next += 1;
        }
        let Ok(Some(Ok(Message::Text(t)))) =
            tokio::time::timeout(Duration::from_secs(5), ws.next()).await
        else {
            return;
        };
        let v: Value = serde_json::from_str(&t).unwrap();
        match v["op"].as_str() {
            Some("welcome") => welcomed = true,
            Some("ok") => {
                let r = v["ref"].as_u64().unwrap();
                let body = sent.remove(&r).expect("ack for a request in flight");
                let mut a = acked.lock().unwrap();
                if let Some(seq) = v["seq"].as_u64() {
                    let prev = a.appends.entry(conv.clone()).or_default().insert(seq, body);
                    assert!(prev.is_none(), "seq {seq} acknowledged twice");
                } else {
                    a.sends.insert(v["pos"].as_u64().unwrap());
                }
            }
            other => panic!("unexpected frame {other:?}: {v}"),
        }
    }
}

// Over 70 lines: one end-to-end scenario whose steps depend on each other, read top to bottom.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_nothing_acknowledged() {
    // Proves every acked append is present exactly once, in order, with dense seqs, and every
    // acked send is (re)delivered to its offline recipient, after kill -9 and restart.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut child = spawn_node(dir.path(), port);
    wait_ready(&base).await;
    create_mesh(&base, "m").await;
    let sink_token = add_peer(&base, "m", "sink", &[]).await;
    let mut tokens = Vec::new();
    for i in 0..CLIENTS {
        tokens.push(add_peer(&base, "m", &format!("p{i}"), &[]).await);
    }
    let acked = Arc::new(Mutex::new(Acked::default()));
    let mut tasks = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        tasks.push(tokio::spawn(pipeline(
            format!("127.0.0.1:{port}"),
            format!("p{i}"),
            t.clone(),
            acked.clone(),
        )));
    }
    // Let load build up, then kill without warning.
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let n = acked.lock().unwrap().sends.len();
        if n > 2_000 || Instant::now() > until {
            break;
        }
    }
    child.kill().expect("SIGKILL");
    child.wait().unwrap();
    for t in tasks {
        let _ = t.await;
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    let appends: usize = acked.appends.values().map(|c| c.len()).sum();
    eprintln!(
        "acknowledged before the kill: {} sends, {appends} appends",
        acked.sends.len()
    );
    assert!(
        acked.sends.len() > 100 && appends > 100,
        "load ran before the kill"
    );

    let mut child = spawn_node(dir.path(), port);
    wait_ready(&base).await;
    // Appends: every acked seq present with its body, dense from 1, no duplicates.
    for (i, t) in tokens.iter().enumerate() {
        let conv = format!("conv-p{i}");
        let Some(expect) = acked.appends.get(&conv) else {
            continue;
        };
        let page = read_conv(&base, t, "m", &conv, "from=1&limit=10000").await;
        let msgs = page["messages"].as_array().unwrap();
        for (k, m) in msgs.iter().enumerate() {
            assert_eq!(
                m["seq"].as_u64().unwrap(),
                k as u64 + 1,
                "dense seqs in {conv}"
            );
        }
        let mut seen_n = BTreeSet::new();
        for m in msgs {
            assert!(
                seen_n.insert(m["body"]["n"].as_u64().unwrap()),
                "duplicate body in {conv}"
            );
        }
        for (seq, body) in expect {
            let m = &msgs
                .get(*seq as usize - 1)
                .unwrap_or_else(|| panic!("acked seq {seq} of {conv} lost"));
            assert_eq!(&m["body"], body, "acked seq {seq} of {conv} changed");
        }
    }
    // Sends: the sink never acked, so every acked pos is delivered when it connects.
    let (mut sink, w) = Peer::hello(
        format!("127.0.0.1:{port}").parse().unwrap(),
        "m",
        "sink",
        &sink_token,
    )
    .await;
    let head = w["head"].as_u64().unwrap();
    assert!(
        head >= *acked.sends.last().unwrap(),
        "head {head} below an acked pos"
    );
    let mut delivered = BTreeSet::new();
    while delivered.len() < head as usize {
        let v = sink.recv().await;
        if v["op"] == "deliver" {
            delivered.insert(v["pos"].as_u64().unwrap());
            if delivered.len() % 512 == 0 {
                // Pushes stop at the session's credit until earlier ones are written; the
                // client keeps reading, so this only paces.
            }
        }
    }
    for pos in &acked.sends {
        assert!(
            delivered.contains(pos),
            "acked send at pos {pos} never delivered"
        );
    }
    child.kill().unwrap();
    child.wait().unwrap();
}
