//! Logging never takes a node down: a real `fabric serve` whose stderr fails (a full disk,
//! a closed pipe) and whose stdout is closed keeps serving, and in a process whose stderr is
//! /dev/full a crashed shard is still restarted by its supervisor (a crash drill).

mod common;
use common::*;
use serde_json::json;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The value of the unlabelled series `name` in a Prometheus exposition.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the exposition"))
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

/// A pipe whose read end is already closed: every write to the other end fails (EPIPE).
fn closed_pipe() -> std::fs::File {
    let mut fds = [0; 2];
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    unsafe { libc::close(fds[0]) };
    use std::os::fd::FromRawFd;
    unsafe { std::fs::File::from_raw_fd(fds[1]) }
}

/// Waits for `/readyz`, failing early if the child exits.
async fn ready_or_exited(child: &mut Child, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            panic!("the node exited ({s}) instead of serving");
        }
        if let Ok(r) = http().get(format!("{base}/readyz")).send().await {
            if r.status() == 200 {
                return;
            }
        }
        assert!(Instant::now() < deadline, "node did not become ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn serve_with_broken_output(stderr: std::fs::File) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_fabric"))
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .args(["--listen", &format!("127.0.0.1:{port}"), "--shards", "2"])
        // Debug logs every HTTP call and session: plenty of failing writes.
        .env("FABRIC_LOG", "debug")
        .env("FABRIC_ADMIN_TOKEN", "admin-secret")
        .stdout(Stdio::from(closed_pipe()))
        .stderr(Stdio::from(stderr))
        .spawn()
        .unwrap();
    ready_or_exited(&mut child, &base).await;
    create_mesh(&base, "m").await;
    let token = add_peer(&base, "m", "a", &[]).await;
    for i in 0..20 {
        let r = http()
            .post(format!("{base}/v1/meshes/m/conversations/c/messages"))
            .bearer_auth(&token)
            .json(&json!({ "body": i }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let (mut p, _) = Peer::hello(addr, "m", "a", &token).await;
    p.send(json!({"op":"append","ref":1,"conv":"c","body":"ws"}))
        .await;
    assert_eq!(p.recv().await["seq"], 21);
    // A bad frame is logged too (a refusal); the session answers and goes on.
    p.send_text("{not json").await;
    assert_eq!(p.recv().await["code"], "bad_request");
    let text = metrics_text(&base).await;
    assert!(
        metric(&text, "fabric_log_write_errors_total") > 0.0,
        "failed log writes are counted"
    );
    assert!(child.try_wait().unwrap().is_none(), "still running");
    assert!(sigterm(&mut child).success(), "clean exit on SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_stderr_is_a_full_disk_or_a_closed_pipe_keeps_serving() {
    // Proves failing log writes (ENOSPC from /dev/full, EPIPE from a closed pipe) and a
    // closed stdout neither stop a start nor a running node, and are counted in a metric.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    serve_with_broken_output(full).await;
    serve_with_broken_output(closed_pipe()).await;
}

/// Set in the child run of [`crash_drill_with_node_logging`] whose stderr is /dev/full.
const STDERR_BROKEN_ENV: &str = "FABRIC_TEST_STDERR_BROKEN";

#[test]
fn a_crashed_shard_is_restarted_while_stderr_fails() {
    // Proves the supervisor survives logging a shard failure when every stderr write fails:
    // the drill below runs in a child process (this test binary, without output capture,
    // which would hide the failing stderr) whose stderr is /dev/full.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "crash_drill_with_node_logging",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(STDERR_BROKEN_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(full))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the drill failed: {stdout}");
    assert!(stdout.contains("1 passed"), "the drill ran: {stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_drill_with_node_logging() {
    // Proves a crashed shard comes back and serves writes with the node's logging installed
    // as `fabric serve` installs it; run with a failing stderr (above), it also proves the
    // failed log writes are counted and harm nothing.
    let broken = std::env::var_os(STDERR_BROKEN_ENV).is_some();
    // Info logs recovery and every start: many failing writes when stderr is broken.
    std::env::set_var("FABRIC_LOG", if broken { "info" } else { "warn" });
    let _log = fabric::logging::init(fabric::config::LogFormat::Json).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let node = fabric::node::start(one_shard_config(dir.path()))
        .await
        .unwrap();
    let base = base(&node);
    let token = mesh_with_peer(&base).await;
    node.crash_shard(0);
    let deadline = Instant::now() + WAIT;
    loop {
        let body: serde_json::Value = http()
            .get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if body["ready"] == true && body["shards"][0]["restarts"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "shard 0 not restarted: {body}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = http()
        .post(format!("{base}/v1/meshes/m/conversations/c/messages"))
        .bearer_auth(&token)
        .json(&json!({"body": "after the restart"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let text = metrics_text(&base).await;
    if broken {
        assert!(metric(&text, "fabric_log_write_errors_total") > 0.0);
    }
    node.shutdown().await;
}
