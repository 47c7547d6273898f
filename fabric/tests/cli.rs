//! The `fabric` binary as an operator runs it: config layering, the generated admin token,
//! graceful shutdown on SIGTERM, and `--help`.

mod common;
use common::*;
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn fabric() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fabric"));
    c.env_remove("FABRIC_ADMIN_TOKEN").env("FABRIC_LOG", "warn");
    c
}

/// Reads the child's stdout until the "listening" line; returns every line read.
fn wait_listening(child: &mut Child) -> Vec<String> {
    let out = child.stdout.take().unwrap();
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut reader = BufReader::new(out);
    while Instant::now() < deadline {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 {
            break;
        }
        let done = line.contains("listening on");
        lines.push(line);
        if done {
            // Keep draining in the background so the child never blocks on a full pipe.
            std::thread::spawn(move || for _ in reader.lines() {});
            return lines;
        }
    }
    panic!("node did not report listening: {lines:?}");
}

fn sigterm(child: &mut Child) -> std::process::ExitStatus {
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "node did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn help_documents_every_option() {
    // Proves `fabric serve --help` names each option with its environment variable.
    let out = fabric().args(["serve", "--help"]).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    for opt in [
        "--data-dir",
        "--listen",
        "--shards",
        "--partitions",
        "--admin-token",
        "--config",
        "--frame-bytes-max",
        "--retention-bytes-max",
        "--durability",
        "--log-format",
        "--http-header-timeout-ms",
        "--http-body-timeout-ms",
        "--tls-handshake-timeout-ms",
        "--connections-max",
        "--connections-per-ip-max",
    ] {
        assert!(text.contains(opt), "--help lacks {opt}");
    }
    assert!(text.contains("FABRIC_DATA_DIR"));
    assert!(text.contains("FABRIC_CONNECTIONS_PER_IP_MAX"));
}

// Over 70 lines: one end-to-end scenario whose steps depend on each other, read top to bottom.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_env_and_flags_layer_and_the_admin_token_is_generated_once() {
    // Proves file < env < flag precedence, a generated admin token printed only on the start
    // that made it, and a clean exit on SIGTERM that keeps acknowledged data.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let file = dir.path().join("fabric.toml");
    std::fs::write(
        &file,
        format!(
            "data_dir = {:?}\nlisten = \"127.0.0.1:1\"\nshards = 3\npartitions = 8\n",
            data
        ),
    )
    .unwrap();
    let run = || {
        let mut c = fabric();
        c.args(["serve", "--config"])
            .arg(&file)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("FABRIC_SHARDS", "1")
            .stdout(Stdio::piped());
        c.spawn().unwrap()
    };
    let mut child = run();
    let lines = wait_listening(&mut child);
    let printed = lines
        .iter()
        .find(|l| l.contains("generated admin token"))
        .expect("token printed on first start");
    let token = std::fs::read_to_string(data.join("admin-token")).unwrap();
    assert!(printed.contains(token.trim()));
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("node.json")).unwrap()).unwrap();
    assert_eq!(meta["placement"]["shards"], 1, "env beats file");
    assert_eq!(meta["placement"]["partitions"], 8, "file beats default");
    let base = format!("http://127.0.0.1:{port}");
    let r = http()
        .post(format!("{base}/v1/meshes"))
        .bearer_auth(token.trim())
        .json(&json!({"id":"m"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        201,
        "flag beats file for listen; generated token works"
    );
    let peer = add_peer_with(&base, token.trim(), "m", "a").await;
    let r = http()
        .post(format!("{base}/v1/meshes/m/conversations/c/messages"))
        .bearer_auth(&peer)
        .json(&json!({"body":1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert!(sigterm(&mut child).success(), "clean exit on SIGTERM");

    let mut child = run();
    let lines = wait_listening(&mut child);
    assert!(
        !lines.iter().any(|l| l.contains("generated admin token")),
        "printed once only"
    );
    let page = read_conv(&base, &peer, "m", "c", "").await;
    assert_eq!(page["head"], 1);
    assert!(sigterm(&mut child).success());

    // A placement change is refused with a clear message.
    let out = fabric()
        .args(["serve", "--config"])
        .arg(&file)
        .args(["--listen", "127.0.0.1:0"])
        .env("FABRIC_SHARDS", "2")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("placement"), "{err}");
}

async fn add_peer_with(base: &str, admin: &str, mesh: &str, peer: &str) -> String {
    let v: serde_json::Value = http()
        .post(format!("{base}/v1/meshes/{mesh}/peers"))
        .bearer_auth(admin)
        .json(&json!({"id": peer}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["token"].as_str().unwrap().to_string()
}
