//! `fabric cluster init` as an operator runs it: the files a new cluster gets, and its
//! refusals.
//! Nothing here needs the nodes to replicate (`fabric serve` does not yet).

use fabric::config::Config;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn fabric() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fabric"));
    c.env_remove("FABRIC_ADMIN_TOKEN").env("FABRIC_LOG", "warn");
    c
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
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

    for n in ["0", "6"] {
        let out = fabric()
            .args(["cluster", "init", "--nodes", n, "--dir"])
            .arg(tmp.path().join("n"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(&format!("1 to 5 nodes, not {n}")), "{err}");
    }
    assert!(!tmp.path().join("n").exists());
}
