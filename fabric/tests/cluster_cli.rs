//! `fabric cluster init` and `fabric cluster local` as an operator runs them: the files a new
//! cluster gets, its refusals, and a local cluster's nodes started, prefixed and stopped.
//! Replication itself is `cluster_replication.rs`'s.

use fabric::config::Config;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn fabric() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fabric"));
    c.env_remove("FABRIC_ADMIN_TOKEN").env("FABRIC_LOG", "warn");
    c
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// A free block of ports for `nodes` nodes, from a salt that differs between the tests of
/// this process (they run at once).
fn free_base_port(nodes: u32) -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let salt = nanos ^ std::process::id().wrapping_mul(2_654_435_761);
    fabric::cluster::init::free_base_port(nodes, salt).expect("free ports")
}

#[test]
fn cluster_init_writes_configs_serve_loads() {
    // Proves the binary's `cluster init --nodes 3` writes a CA, node certificates, a 0600
    // admin token (FABRIC_ADMIN_TOKEN's when set) and three configs that load and validate
    // with the documented ports and distinct data dirs, prints the command for each node, and
    // that `fabric serve --config` reads such a config back (with its [cluster] section).
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cluster");
    let out = fabric()
        .args([
            "cluster",
            "init",
            "--nodes",
            "3",
            "--base-port",
            "17400",
            "--dir",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = std::fs::read_to_string(dir.join("admin-token")).unwrap();
    assert_eq!(token.len(), 64, "32 random bytes, hex: {token}");
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(mode_of(&dir.join("admin-token")), 0o600);
    assert_eq!(mode_of(&dir.join("ca/ca.key")), 0o600);
    let ca = fabric::cluster::pki::ClusterCa::load_dir(&dir.join("ca")).unwrap();
    let mut data_dirs = Vec::new();
    for i in 1..=3u64 {
        let path = dir.join(format!("node-{i}.toml"));
        assert!(
            text.contains(&format!("fabric serve --config {}", path.display())),
            "{text}"
        );
        assert_eq!(mode_of(&path), 0o600);
        let c = Config::from_toml_file(&path).unwrap();
        c.validate().unwrap();
        let base = 17400 + 10 * (i as u16 - 1);
        assert_eq!(c.listen.port(), base);
        assert_eq!(c.quic_addr().map(|a| a.port()), Some(base + 1));
        assert_eq!(c.metrics_listen.map(|a| a.port()), Some(base + 3));
        assert_eq!(c.shards, 2, "the default --shards");
        assert_eq!(c.admin_token.as_deref(), Some(token.as_str()));
        assert!(!data_dirs.contains(&c.data_dir));
        data_dirs.push(c.data_dir.clone());
        let cluster = c.cluster.unwrap();
        assert_eq!(cluster.id, ca.cluster_id());
        assert_eq!((cluster.node, cluster.link_listen.port()), (i, base + 2));
        assert_eq!(cluster.members.len(), 3);
        let id = fabric::cluster::pki::NodeIdentity::load(&cluster.node_cert, &cluster.node_key)
            .unwrap();
        assert_eq!((id.cluster_id.as_str(), id.node_id), (ca.cluster_id(), i));
    }
    // serve loads it: --print-config prints the section back.
    let printed = fabric()
        .args(["serve", "--print-config", "--config"])
        .arg(dir.join("node-2.toml"))
        .output()
        .unwrap();
    let printed_text = String::from_utf8_lossy(&printed.stdout);
    assert!(printed.status.success(), "{printed_text}");
    assert!(printed_text.contains("[cluster]"), "{printed_text}");
    assert!(printed_text.contains("node = 2"), "{printed_text}");

    // FABRIC_ADMIN_TOKEN, when set, is the token.
    let other = tmp.path().join("other");
    let out = fabric()
        .env("FABRIC_ADMIN_TOKEN", "chosen-token")
        .args(["cluster", "init", "--nodes", "1", "--dir"])
        .arg(&other)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        std::fs::read_to_string(other.join("admin-token")).unwrap(),
        "chosen-token"
    );
    let c = Config::from_toml_file(&other.join("node-1.toml")).unwrap();
    assert_eq!(c.admin_token.as_deref(), Some("chosen-token"));
    assert_eq!(c.listen.port(), 7400, "the default --base-port");
}

#[test]
fn cluster_init_refuses_a_non_empty_dir_and_a_bad_node_count() {
    // Proves the binary refuses, exiting 1 with a message, a directory that is not empty
    // (naming it) unless --force, and --nodes outside 1..=5, writing nothing.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("keep"), b"x").unwrap();
    let out = fabric()
        .args(["cluster", "init", "--nodes", "1", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("{} is not empty", dir.display())),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    let forced = fabric()
        .args(["cluster", "init", "--nodes", "1", "--force", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(forced.status.success());
    assert!(dir.join("node-1.toml").exists() && dir.join("keep").exists());

    for n in ["0", "2", "6"] {
        let out = fabric()
            .args(["cluster", "init", "--nodes", n, "--dir"])
            .arg(tmp.path().join("n"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(&format!("voters), not {n}")), "{err}");
    }
    assert!(!tmp.path().join("n").exists());
}

/// Reads `child`'s stdout and stderr lines into one channel, from two threads.
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    let err = child.stderr.take().unwrap();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx2.send(l);
        }
    });
    rx
}

/// Collects lines until one satisfies `done`, for at most 30 s.
fn read_until(
    rx: &mpsc::Receiver<String>,
    seen: &mut Vec<String>,
    done: impl Fn(&[String]) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done(seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => seen.push(l),
            Err(_) => panic!("gave up waiting; lines so far: {seen:#?}"),
        }
    }
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "cluster local did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The pids `cluster local` reports starting (`node <i> started (pid <p>)`).
fn node_pids(lines: &[String]) -> Vec<i32> {
    lines
        .iter()
        .filter_map(|l| l.split("(pid ").nth(1))
        .filter_map(|r| r.split(')').next())
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn alive(pid: i32) -> bool {
    unsafe { libc::kill(pid, 0) == 0 }
}

#[test]
fn cluster_local_runs_each_node_prefixed_and_stops_them_all_on_sigterm() {
    // Proves `cluster local --nodes 3` initialises an empty directory, starts every node
    // (each reports listening, its lines prefixed `[node i]`), and on SIGTERM stops every
    // node and exits 0 with no node left running.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    let base = free_base_port(3);
    let mut child = fabric()
        .args(["cluster", "local", "--nodes", "3", "--shards", "1", "--dir"])
        .arg(&dir)
        .args(["--base-port", &base.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = lines_of(&mut child);
    let mut seen = Vec::new();
    let listening = |i: u16| {
        format!(
            "[node {}] fabric: listening on http://127.0.0.1:{}",
            i,
            base + 10 * (i - 1)
        )
    };
    read_until(&rx, &mut seen, |s| {
        (1..=3).all(|i| s.iter().any(|l| l.starts_with(&listening(i))))
    });
    assert!(dir.join("node-1.toml").exists());
    let pids = node_pids(&seen);
    assert_eq!(pids.len(), 3, "{seen:#?}");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_exit(&mut child);
    // Every line, up to the end of both pipes.
    seen.extend(rx.iter());
    assert!(status.success(), "{status}: {seen:#?}");
    for i in 1..=3 {
        let stopped = format!("fabric cluster local: node {i} stopped");
        assert!(seen.iter().any(|l| l.starts_with(&stopped)), "{seen:#?}");
    }
    for p in pids {
        assert!(!alive(p), "node pid {p} still runs");
    }
}

#[test]
fn cluster_local_stops_the_others_when_a_node_exits_by_itself() {
    // Proves that a node that exits by itself (here: its HTTP port is taken) is reported with
    // its status, the other nodes are stopped, and `cluster local` exits 1.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    let base = free_base_port(3);
    let _taken = std::net::TcpListener::bind(("127.0.0.1", base + 10)).unwrap();
    let mut child = fabric()
        .args(["cluster", "local", "--nodes", "3", "--shards", "1", "--dir"])
        .arg(&dir)
        .args(["--base-port", &base.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = lines_of(&mut child);
    let status = wait_exit(&mut child);
    let seen: Vec<String> = rx.iter().collect();
    assert_eq!(status.code(), Some(1), "{seen:#?}");
    assert!(
        seen.iter().any(|l| l.starts_with(
            "fabric cluster local: node 2 exited by itself (exit status: 1); stopping the others"
        )),
        "{seen:#?}"
    );
    assert!(
        seen.iter().any(|l| l.starts_with("[node 2] ")),
        "node 2's error, prefixed: {seen:#?}"
    );
    assert!(
        seen.iter()
            .any(|l| l.starts_with("fabric cluster local: node 1 stopped")),
        "{seen:#?}"
    );
    for p in node_pids(&seen) {
        assert!(!alive(p), "node pid {p} still runs");
    }
}
