//! The `fabric` binary's client commands against a running node: mesh create, peer add (token
//! and key), keygen, send, tail, append and replay, in text and in JSON.

mod common;

use common::{base, start};
use serde_json::Value;
use std::path::Path;

/// Runs `fabric ARGS` with the node's URLs and the admin token set through the environment,
/// and returns stdout; fails the test with stderr if the command fails.
async fn fabric(node: &fabric::node::RunningNode, args: &[&str]) -> String {
    let out = fabric_output(node, args).await;
    assert!(
        out.status.success(),
        "fabric {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

async fn fabric_output(node: &fabric::node::RunningNode, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_fabric"))
        .args(args)
        .env("FABRIC_HTTP", base(node))
        .env("FABRIC_URL", format!("ws://{}/v1/ws", node.addr()))
        .env("FABRIC_ADMIN_TOKEN", "admin-secret")
        .env_remove("FABRIC_TOKEN")
        .env_remove("FABRIC_KEY")
        .env_remove("FABRIC_MESH")
        .env_remove("FABRIC_PEER")
        .output()
        .await
        .unwrap()
}

fn json_lines(out: &str) -> Vec<Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

fn key_file(dir: &Path) -> String {
    dir.join("bob.key").display().to_string()
}

// Over 70 lines: one end-to-end scenario whose steps depend on each other, read top to bottom.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_commands_create_add_send_tail_append_and_replay() {
    // Proves each client subcommand does its job against a node and prints what it says.
    let dir = tempfile::tempdir().unwrap();
    let node = start(&dir.path().join("data")).await;

    let out = fabric(&node, &["mesh", "create", "m"]).await;
    assert_eq!(out.trim(), "created mesh m");
    let alice = fabric(&node, &["peer", "add", "m", "alice", "--group", "ops"]).await;
    let alice = alice.trim().to_string();
    assert_eq!(alice.len(), 64, "a token: {alice}");
    let bob = json_lines(&fabric(&node, &["peer", "add", "m", "bob", "--json"]).await);
    assert_eq!(bob[0]["peer"], "bob");
    let bob = bob[0]["token"].as_str().unwrap().to_string();
    let out = fabric_output(&node, &["mesh", "create", "m"]).await;
    assert!(!out.status.success(), "an existing mesh is an error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("conflict"));

    let as_alice = ["--mesh", "m", "--peer", "alice", "--token", alice.as_str()];
    let as_bob = ["--mesh", "m", "--peer", "bob", "--token", bob.as_str()];
    let send = [&["send", "--to", "bob", r#"{"text":"hi"}"#][..], &as_alice].concat();
    assert_eq!(fabric(&node, &send).await.trim(), "sent pos 1");

    let tail = [
        &["tail", "--count", "1", "--timeout-secs", "10", "--json"][..],
        &as_bob,
    ]
    .concat();
    let got = json_lines(&fabric(&node, &tail).await);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["op"], "deliver");
    assert_eq!(got[0]["pos"], 1);
    assert_eq!(got[0]["from"], "alice");
    assert_eq!(got[0]["body"]["text"], "hi");
    // The tail acked it: the next tail sees nothing and ends at its timeout.
    let tail = [&["tail", "--timeout-secs", "1", "--json"][..], &as_bob].concat();
    assert_eq!(fabric(&node, &tail).await, "", "delivery 1 was acked");
    let tail = [
        &["tail", "--count", "1", "--timeout-secs", "1"][..],
        &as_bob,
    ]
    .concat();
    let out = fabric_output(&node, &tail).await;
    assert!(!out.status.success(), "a count not reached in time fails");

    let append = [
        &[
            "append",
            "--conv",
            "c1",
            "plain words",
            "--idempotency-key",
            "k1",
        ][..],
        &as_alice,
    ]
    .concat();
    assert_eq!(fabric(&node, &append).await.trim(), "appended c1 seq 1");
    assert_eq!(
        fabric(&node, &append).await.trim(),
        "appended c1 seq 1",
        "same key"
    );
    let append = [
        &["append", "--conv", "c1", "[1,2]", "--json"][..],
        &as_alice,
    ]
    .concat();
    assert_eq!(json_lines(&fabric(&node, &append).await)[0]["seq"], 2);

    let replay = [&["replay", "--conv", "c1", "--json"][..], &as_bob].concat();
    let got = json_lines(&fabric(&node, &replay).await);
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(got[0]["seq"], 1);
    assert_eq!(got[0]["body"], "plain words");
    assert_eq!(got[1]["body"], serde_json::json!([1, 2]));
    assert_eq!(got[2]["head"], 2);
    let replay = [
        &["replay", "--conv", "c1", "--from", "2", "--limit", "1"][..],
        &as_bob,
    ]
    .concat();
    let text = fabric(&node, &replay).await;
    assert!(text.starts_with("c1 #2 alice: [1,2]"), "{text}");

    let tail = [
        &[
            "tail", "--conv", "c1", "--from", "2", "--count", "1", "--json",
        ][..],
        &as_bob,
    ]
    .concat();
    let got = json_lines(&fabric(&node, &tail).await);
    assert_eq!(
        (got[0]["op"].as_str(), got[0]["seq"].as_u64()),
        (Some("event"), Some(2))
    );
}

// Over 70 lines: one end-to-end scenario whose steps depend on each other, read top to bottom.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keygen_then_peer_add_with_the_key_then_send_with_the_key_file() {
    // Proves a key made by `fabric keygen` registers with `peer add --public-key` and then
    // authenticates `send --key`, while a key file that was not registered is refused.
    let dir = tempfile::tempdir().unwrap();
    let node = start(&dir.path().join("data")).await;
    fabric(&node, &["mesh", "create", "m"]).await;
    let alice = fabric(&node, &["peer", "add", "m", "alice"]).await;

    let file = key_file(dir.path());
    let made = json_lines(&fabric(&node, &["keygen", "--out", &file, "--json"]).await);
    let public = made[0]["public_key"].as_str().unwrap().to_string();
    assert_eq!(public.len(), 64);
    let again = fabric_output(&node, &["keygen", "--out", &file]).await;
    assert!(
        !again.status.success(),
        "an existing key file is never replaced"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    let added = fabric(&node, &["peer", "add", "m", "bob", "--public-key", &public]).await;
    assert_eq!(
        added.trim(),
        format!("registered peer bob with key {public}")
    );
    // The key file itself is accepted as --public-key too.
    let carol = json_lines(
        &fabric(
            &node,
            &[
                "peer",
                "add",
                "m",
                "carol",
                "--public-key",
                &file,
                "--token",
                "--json",
            ],
        )
        .await,
    );
    assert_eq!(carol[0]["public_key"], public.as_str());
    assert_eq!(carol[0]["token"].as_str().unwrap().len(), 64);

    let send = [
        "send",
        "--to",
        "alice",
        "\"signed\"",
        "--mesh",
        "m",
        "--peer",
        "bob",
        "--key",
        &file,
    ];
    assert_eq!(fabric(&node, &send).await.trim(), "sent pos 1");
    let tail = [
        "tail",
        "--count",
        "1",
        "--timeout-secs",
        "10",
        "--mesh",
        "m",
        "--peer",
        "alice",
        "--token",
        alice.trim(),
    ];
    let got = fabric(&node, &tail).await;
    assert_eq!(got.trim(), "#1 bob -> alice: \"signed\"");

    let other = dir.path().join("other.key").display().to_string();
    fabric(&node, &["keygen", "--out", &other]).await;
    let send = [
        "send", "--to", "alice", "1", "--mesh", "m", "--peer", "bob", "--key", &other,
    ];
    let out = fabric_output(&node, &send).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unauthorized"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_sent_and_printed_byte_for_byte() {
    // Proves `fabric send`/`append` send the body text as typed and `fabric tail --json` and
    // `fabric replay --json` print it as the node forwarded it: a big integer is not rounded,
    // `1e999999` and a lone surrogate escape are not turned into null, key order and spacing
    // are kept.
    let dir = tempfile::tempdir().unwrap();
    let node = start(&dir.path().join("data")).await;
    fabric(&node, &["mesh", "create", "m"]).await;
    let alice = fabric(&node, &["peer", "add", "m", "alice"]).await;
    let as_alice = ["--mesh", "m", "--peer", "alice", "--token", alice.trim()];
    let bodies = [
        "123456789012345678901234567890",
        "1e999999",
        r#""\ud800""#,
        r#"{"b": 1,  "a":[2.50]}"#,
    ];
    for body in bodies {
        let append = [&["append", "--conv", "c", body][..], &as_alice].concat();
        fabric(&node, &append).await;
    }
    let send = [&["send", "--to", "alice", bodies[0]][..], &as_alice].concat();
    fabric(&node, &send).await;
    let tail = [
        &[
            "tail",
            "--conv",
            "c",
            "--count",
            "4",
            "--timeout-secs",
            "10",
            "--json",
        ][..],
        &as_alice,
    ]
    .concat();
    let out = fabric(&node, &tail).await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    for (line, body) in lines.iter().zip(bodies) {
        assert!(
            line.contains(&format!(r#","body":{body},"ts":"#)),
            "{line} should carry {body} as it was sent"
        );
    }
    let inbox = [
        &["tail", "--count", "1", "--timeout-secs", "10", "--json"][..],
        &as_alice,
    ]
    .concat();
    let out = fabric(&node, &inbox).await;
    assert!(
        out.contains(r#","body":123456789012345678901234567890,"ts":"#),
        "{out}"
    );
    let replay = [&["replay", "--conv", "c", "--json"][..], &as_alice].concat();
    let out = fabric(&node, &replay).await;
    for body in bodies {
        assert!(out.contains(&format!(r#","body":{body},"ts":"#)), "{out}");
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_commands_take_url_lists_and_pass_over_a_node_that_is_down() {
    // Proves --http and --url take comma-separated lists (a cluster's nodes), tried in order:
    // a node that refuses the connection is passed over, and an http:// base URL works as a
    // session URL (its WebSocket endpoint).
    let dir = tempfile::tempdir().unwrap();
    let node = start(&dir.path().join("data")).await;
    let dead = common::free_port();
    let http = format!("http://127.0.0.1:{dead},{}", base(&node));
    let url = format!("ws://127.0.0.1:{dead}/v1/ws, {}", base(&node));
    let out = fabric(&node, &["mesh", "create", "m", "--http", &http]).await;
    assert_eq!(out.trim(), "created mesh m");
    let bob = fabric(&node, &["peer", "add", "m", "bob", "--http", &http]).await;
    let as_bob = [
        "--mesh",
        "m",
        "--peer",
        "bob",
        "--token",
        bob.trim(),
        "--url",
        &url,
        "--http",
        &http,
    ];
    let send = [&["send", "--to", "bob", r#"{"n":1}"#][..], &as_bob].concat();
    assert_eq!(fabric(&node, &send).await.trim(), "sent pos 1");
    let append = [&["append", "--conv", "c", "[1]"][..], &as_bob].concat();
    assert_eq!(fabric(&node, &append).await.trim(), "appended c seq 1");
    let replay = [&["replay", "--conv", "c", "--json"][..], &as_bob].concat();
    let got = json_lines(&fabric(&node, &replay).await);
    assert_eq!(got[0]["seq"], 1, "{got:?}");
    let only_dead = format!("ws://127.0.0.1:{dead}/v1/ws");
    let send = [
        &["send", "--to", "bob", "1", "--url", &only_dead][..],
        &as_bob[..6],
    ]
    .concat();
    let out = fabric_output(&node, &send).await;
    assert!(!out.status.success(), "no node reachable is an error");
}
