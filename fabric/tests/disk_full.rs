//! A real `fabric serve` on a real, small file system that fills up: writes are refused with
//! `storage_full` (HTTP 507), reads go on, and the node takes writes again by itself once
//! space returns, losing nothing it acknowledged.
//!
//! The file system is a 4 MiB tmpfs mounted in a private user and mount namespace
//! (`unshare --user --map-root-user --mount`, util-linux), so the test needs no root: Linux with
//! unprivileged user namespaces (the default on Debian, Ubuntu and Fedora). Without them the
//! test fails and says so.

mod common;
use common::*;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Bytes of each appended body: a few hundred appends fill the file system.
const BODY_BYTES: usize = 16 * 1024;
/// Appends the test tries at most while filling the disk.
const FILL_APPENDS_MAX: u64 = 2_000;

struct Node {
    child: Child,
    /// The mount point as seen from outside the namespace.
    inside: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the node on a fresh 4 MiB tmpfs that also holds a 1 MiB ballast file.
fn spawn_on_small_disk(mount: &std::path::Path, port: u16) -> Node {
    let script = format!(
        "mount -t tmpfs -o size=4m tmpfs '{m}' && \
         head -c 1048576 /dev/zero > '{m}/ballast' && \
         exec '{bin}' serve --data-dir '{m}/data' --listen 127.0.0.1:{port} --shards 1 \
         --wal-segment-bytes-max 262144 --retention-bytes-max 1073741824 \
         --restart-backoff-ms-max 200 --quic false",
        m = mount.display(),
        bin = env!("CARGO_BIN_EXE_fabric"),
    );
    let child = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "sh", "-c", &script])
        .env("FABRIC_ADMIN_TOKEN", "admin-secret")
        .env("FABRIC_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect(
            "`unshare` (util-linux) runs; this test needs Linux with unprivileged user \
             namespaces to mount a small tmpfs without root",
        );
    // The node's view of its mount point, from outside: /proc/PID/root follows the
    // namespace (sh execs the node, so the pid stays the same).
    let inside = PathBuf::from(format!("/proc/{}/root{}", child.id(), mount.display()));
    Node { child, inside }
}

async fn append(base: &str, token: &str, i: u64) -> (u16, Value) {
    let body = json!({"body": {"i": i, "pad": "x".repeat(BODY_BYTES)}});
    let r = http()
        .post(format!("{base}/v1/meshes/m/conversations/c/messages"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_serves_reads_and_recovers_when_space_returns() {
    // Proves the node keeps serving on a full disk: writes get storage_full (507), never a
    // crash loop; reads and /readyz answer; freeing space makes writes work again by
    // themselves; every acknowledged append is still there, in order.
    let mount = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let node = spawn_on_small_disk(mount.path(), port);
    wait_ready(&base).await;
    create_mesh(&base, "m").await;
    let token = add_peer(&base, "m", "a", &[]).await;

    let mut acked = Vec::new();
    let mut full = None;
    for i in 1..=FILL_APPENDS_MAX {
        match append(&base, &token, i).await {
            (201, v) => acked.push(v["seq"].as_u64().unwrap()),
            (507, v) => {
                assert_eq!(v["code"], "storage_full", "{v}");
                full = Some(i);
                break;
            }
            (s, v) => panic!("append {i}: {s} {v}"),
        }
    }
    assert!(full.is_some(), "the 4 MiB disk never filled");
    assert!(!acked.is_empty());

    // Full: writes keep being refused (not a crash loop), reads and health answer.
    for i in 0..5 {
        let (status, v) = append(&base, &token, 10_000 + i).await;
        assert!(matches!(status, 507 | 503), "{status} {v}");
    }
    let page = read_conv(&base, &token, "m", "c", "from=1&limit=10000").await;
    assert_eq!(page["messages"].as_array().unwrap().len(), acked.len());
    let ready = http().get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503, "not ready while the disk is full");

    // Space returns: writes work again within a few backoffs, with no operator action.
    std::fs::remove_file(node.inside.join("ballast")).expect("ballast removed");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, v) = append(&base, &token, 20_000).await;
        if status == 201 {
            acked.push(v["seq"].as_u64().unwrap());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "writes never came back: {status} {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let page = read_conv(&base, &token, "m", "c", "from=1&limit=10000").await;
    let seqs: Vec<u64> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, acked, "every acknowledged append, dense and in order");
    wait_ready(&base).await;
}
